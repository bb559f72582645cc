// The one way the page talks to the API: `fetch` with the signed-in token as
// `Authorization: Bearer` (a JWT or an API key, whatever the user entered; it never
// goes into a URL, so it cannot end up in a server's or a proxy's access log), JSON
// in and out, and the API's `{"error":{"code","message"}}` turned into an ApiError.
// A 401 from any route signs the user out, which brings back the sign-in form.

const TOKEN_KEY = 'genstream.token';

/** The stored token, or null. */
export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function setToken(token) {
  localStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  localStorage.removeItem(TOKEN_KEY);
}

/** An answer that was not 2xx: its status, the API's error code and message. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    /** Seconds, from a 429's `Retry-After`. */
    this.retryAfter = retryAfter;
  }
}

let unauthorized = () => {};

/** Sets what a 401 does (the app signs out). */
export function onUnauthorized(fn) {
  unauthorized = fn;
}

/** Called by anything that got a 401 outside `api()` (the stream follower). */
export function reportUnauthorized(message) {
  unauthorized(message);
}

/** The headers every request carries. */
export function authHeaders(extra = {}) {
  const token = getToken();
  return token ? { Authorization: `Bearer ${token}`, ...extra } : { ...extra };
}

/**
 * `path` with `method` and a JSON `body`; resolves to the parsed JSON answer.
 * @throws {ApiError} on a non-2xx answer; a TypeError when the network failed.
 */
export async function api(path, { method = 'GET', body, signal } = {}) {
  const headers = authHeaders(body === undefined ? {} : { 'Content-Type': 'application/json' });
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: 'no-store',
  });
  const data = await res.json().catch(() => null);
  if (res.status === 401) {
    const message = data?.error?.message || 'unauthorized';
    unauthorized(message);
    throw new ApiError(401, 'unauthorized', message);
  }
  if (!res.ok) {
    throw new ApiError(
      res.status,
      data?.error?.code || 'http_error',
      data?.error?.message || `${res.status} ${res.statusText}`,
      Number(res.headers.get('retry-after')) || undefined,
    );
  }
  return data;
}
