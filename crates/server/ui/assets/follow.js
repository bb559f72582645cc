// Following one job's event log over SSE, exactly: never a gap, never a repeat.
//
// The page reads the stream with `fetch` rather than EventSource, so that the token
// travels in the `Authorization` header (never in a URL) and the cursor in
// `Last-Event-ID`, and so that the page, not the browser, decides when and how to
// reconnect. The cursor is the seq of the last event handed on; on every reconnect the
// server sends the events after it and nothing else. A connection cut in the middle of
// a frame loses only that half frame: each connection gets a fresh parser, and the
// frame comes again, whole, after the cursor. Events at or below the cursor are
// dropped all the same, so that nothing can ever be applied twice.
//
// Joining a job that is already running (a reload, a second tab) asks for
// `?resume=true`: one `sync` frame holding the answer so far and the seq it covers,
// then every event after it.

import { createParser } from './vendor/eventsource-parser.mjs';
import { authHeaders, reportUnauthorized } from './api.js';

/** Backoff between reconnects: 250 ms doubling to 8 s, each wait jittered to 50–100 %. */
function backoff(attempt) {
  const base = Math.min(250 * 2 ** attempt, 8000);
  return base / 2 + (Math.random() * base) / 2;
}

/**
 * Follows `streamId` until its terminal event.
 *
 * - `resume`: start with a `sync` snapshot (joining a running job) instead of seq 0.
 * - `onEvent(ev)`: each event `{seq, event, data}` in seq order, `sync` included
 *   (`data.resumeState`), each exactly once.
 * - `onConnection(state)`: `"open"` when the stream flows, `"reconnecting"` while it
 *   waits to reconnect.
 *
 * Returns `{stop, done}`; `done` resolves to `{end: "terminal", event}`, `{end: "gone"}`
 * (the log expired or never existed: read the saved messages), `{end: "unauthorized"}`
 * or `{end: "stopped"}`.
 */
export function follow(streamId, { resume = false, onEvent, onConnection = () => {} }) {
  const abort = new AbortController();
  let cursor = null;
  let wantSync = resume;
  let attempt = 0;

  const wait = (ms) =>
    new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      // Back online: try at once instead of finishing the wait.
      const online = () => {
        clearTimeout(t);
        resolve();
      };
      window.addEventListener('online', online, { once: true });
      abort.signal.addEventListener('abort', online, { once: true });
    });

  async function connectOnce() {
    const params = new URLSearchParams();
    const headers = {};
    if (cursor !== null) headers['Last-Event-ID'] = String(cursor);
    else if (wantSync) params.set('resume', 'true');
    const qs = params.toString();
    const url = `/api/chat/stream/${encodeURIComponent(streamId)}${qs ? `?${qs}` : ''}`;
    const res = await fetch(url, { headers: authHeaders(headers), signal: abort.signal, cache: 'no-store' });
    if (res.status === 401) return { end: 'unauthorized' };
    if (res.status === 204 || res.status === 404) return { end: 'gone' };
    if (res.status === 400) {
      const body = await res.json().catch(() => null);
      if (body?.error?.code === 'cursor_out_of_range') {
        // The log no longer knows our cursor (it cannot happen while the job runs;
        // kept for safety): start again from a snapshot.
        cursor = null;
        wantSync = true;
        return { retry: true, now: true };
      }
      return { end: 'gone' };
    }
    if (!res.ok || !res.body) return { retry: true };
    onConnection('open');

    let terminal = null;
    const parser = createParser({
      onEvent(msg) {
        if (terminal) return;
        let ev;
        try {
          ev = JSON.parse(msg.data);
        } catch {
          return;
        }
        const seq = msg.event === 'sync' ? ev.seq : Number(msg.id ?? ev.seq);
        if (msg.event === 'sync') {
          ev = { seq, event: 'sync', data: ev };
        } else if (cursor !== null && seq <= cursor) {
          return; // already applied
        }
        cursor = seq;
        wantSync = false;
        attempt = 0;
        onEvent(ev);
        if (ev.event === 'final' || ev.event === 'error') terminal = ev;
      },
    });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(value);
        if (terminal) break;
      }
    } catch (e) {
      if (abort.signal.aborted) throw e;
      // The connection broke: reconnect from the cursor.
    } finally {
      reader.cancel().catch(() => {});
    }
    return terminal ? { end: 'terminal', event: terminal } : { retry: true };
  }

  const done = (async () => {
    for (;;) {
      let r;
      try {
        r = await connectOnce();
      } catch (e) {
        if (abort.signal.aborted) return { end: 'stopped' };
        r = { retry: true };
      }
      if (r.end === 'unauthorized') {
        reportUnauthorized('the stream refused the token');
        return r;
      }
      if (r.end) return r;
      if (abort.signal.aborted) return { end: 'stopped' };
      onConnection('reconnecting');
      if (!r.now) await wait(backoff(attempt++));
      if (abort.signal.aborted) return { end: 'stopped' };
    }
  })();

  return {
    stop: () => abort.abort(),
    done,
  };
}
