// Shared pieces of the browser tests: a fixture that fails a test on any console
// error, tokens minted by the real binary, the saved messages read from the API, and
// a TCP proxy that cuts SSE connections in the middle.
import { test as base, expect } from '@playwright/test';
import { execFileSync } from 'node:child_process';
import { appendFileSync } from 'node:fs';
import net from 'node:net';

export { expect };

const BIN = process.env.BROWSER_TEST_BIN;
const CONFIG = process.env.BROWSER_TEST_CONFIG;

/** A JWT for `user`, from `genstream token` (the secret `serve` keeps in its database). */
export function mintToken(user, ttl = '1h') {
  const token = execFileSync(BIN, ['token', '--user', user, '--ttl', ttl, '--config', CONFIG]).toString().trim();
  // The Rust side checks that none of these ever shows up in the server's log.
  if (process.env.BROWSER_TEST_TOKENS_FILE) appendFileSync(process.env.BROWSER_TEST_TOKENS_FILE, `${token}\n`);
  return token;
}

let counter = 0;
/** A user of this test alone, so that tests running side by side never share a list. */
export function uniqueUser(testInfo) {
  counter += 1;
  return `u${process.pid}-${testInfo.workerIndex}-${counter}-${testInfo.title.replace(/[^a-z0-9]+/gi, '-').slice(0, 30)}`;
}

/** Calls the API as `token`. */
export async function apiGet(request, token, path) {
  const r = await request.get(path, { headers: { Authorization: `Bearer ${token}` } });
  expect(r.ok(), `${path}: ${r.status()}`).toBeTruthy();
  return r.json();
}

/** The saved messages of a conversation. */
export async function savedMessages(request, token, conversationId) {
  return (await apiGet(request, token, `/api/conversations/${conversationId}/messages`)).messages;
}

/** The conversation id of a page at `/c/{id}`. */
export function conversationIdOf(page) {
  const m = /\/c\/([^/?#]+)/.exec(page.url());
  expect(m, `not a conversation URL: ${page.url()}`).toBeTruthy();
  return decodeURIComponent(m[1]);
}

/** Opens the app signed in as `token` (through the `#token=` link). */
export async function signIn(page, token, path = '/') {
  await page.goto(`${path}#token=${encodeURIComponent(token)}`);
  await expect(page.getByRole('textbox', { name: 'Message' })).toBeVisible();
}

/**
 * Types `text` into the composer and sends it with Enter; resolves once the server
 * accepted the turn (and the page is at the conversation's URL), to the time it did:
 * the end of the `POST /api/chat` response, in ms since the epoch.
 */
export async function send(page, text, model) {
  if (model) await page.getByRole('combobox', { name: 'Model' }).selectOption(model);
  const box = page.getByRole('textbox', { name: 'Message' });
  await box.fill(text);
  const accepted = page.waitForResponse((r) => new URL(r.url()).pathname === '/api/chat' && r.request().method() === 'POST');
  await box.press('Enter');
  const response = await accepted;
  expect(response.status(), await response.text()).toBe(200);
  await expect(page).toHaveURL(/\/c\/[^/]+$/);
  const t = response.request().timing();
  return t.startTime + t.responseEnd;
}

/**
 * Starts watching `page` for `text` to show in a message; resolves to the time it
 * first did (ms since the epoch, from the page's own clock: the same machine's).
 * Measured in the page, so the test's polling adds nothing to it.
 */
export async function whenShown(page, text) {
  const handle = await page.evaluateHandle((needle) => {
    const has = () =>
      [...document.querySelectorAll('[data-testid="message"]')].some((m) => m.textContent.includes(needle));
    return {
      at: new Promise((resolve) => {
        if (has()) return resolve(Date.now());
        const obs = new MutationObserver(() => {
          if (has()) {
            obs.disconnect();
            resolve(Date.now());
          }
        });
        obs.observe(document.body, { subtree: true, childList: true, characterData: true });
      }),
    };
  }, text);
  return () => handle.evaluate((h) => h.at);
}

/** The last message of `author` ("user" or "assistant"). */
export function lastMessage(page, author = 'assistant') {
  return page.locator(`[data-testid="message"][data-author="${author}"]`).last();
}

/** The visible text of an answer (its text parts), whitespace-normalized. */
export async function answerText(message) {
  const parts = await message.locator('[data-testid="message-text"]').allTextContents();
  return norm(parts.join(' '));
}

export function norm(s) {
  return String(s).replace(/\s+/g, ' ').trim();
}

/**
 * Records every text the last answer shows, at each change of the page (a
 * MutationObserver, which, unlike animation frames, runs however busy or hidden the
 * page is): a repeated or a lost piece of text shows as a sample that is not a prefix
 * of the final text.
 */
export async function recordSamples(page) {
  await page.evaluate(() => {
    window.__samples = [];
    const sample = () => {
      const msgs = document.querySelectorAll('[data-testid="message"][data-author="assistant"]');
      const m = msgs[msgs.length - 1];
      if (!m) return;
      const text = [...m.querySelectorAll('[data-testid="message-text"]')].map((e) => e.textContent).join(' ');
      const s = text.replace(/\s+/g, ' ').trim();
      const last = window.__samples[window.__samples.length - 1];
      if (s && s !== last) window.__samples.push(s);
    };
    window.__sampler = new MutationObserver(sample);
    window.__sampler.observe(document.body, { subtree: true, childList: true, characterData: true });
    sample();
  });
}

/** Every recorded sample must be a prefix of `final`; returns how many there were. */
export async function checkSamples(page, final) {
  const samples = await page.evaluate(() => {
    window.__sampler.disconnect();
    return window.__samples;
  });
  for (const s of samples) {
    expect(final.startsWith(s), `shown text is not a prefix of the saved answer:\n  shown: ${s}\n  saved: ${final}`).toBeTruthy();
  }
  return samples.length;
}

/**
 * The test fixture: `allowConsole` (patterns of console errors a test expects, such as
 * the browser's own line for a 401) and a check after each test that the page logged
 * no other console error and threw nothing.
 */
export const test = base.extend({
  allowConsole: [[], { option: true }],
  consoleErrors: async ({ context }, use) => {
    const errors = [];
    const watch = (page) => {
      page.on('console', (m) => {
        if (m.type() === 'error') errors.push(`console: ${m.text()} (${page.url()})`);
      });
      page.on('pageerror', (e) => errors.push(`uncaught: ${e.message}`));
      page.on('dialog', (d) => {
        errors.push(`dialog: ${d.message()}`);
        d.dismiss().catch(() => {});
      });
    };
    // Other browser contexts (other "devices") are watched with errors.watchContext(ctx).
    errors.watchContext = (ctx) => {
      ctx.pages().forEach(watch);
      ctx.on('page', watch);
    };
    errors.watchContext(context);
    await use(errors);
  },
  page: async ({ page, consoleErrors }, use, testInfo) => {
    await use(page);
    const allowed = testInfo.annotations.filter((a) => a.type === 'allow-console').map((a) => new RegExp(a.description));
    const unexpected = consoleErrors.filter((e) => !allowed.some((re) => re.test(e)));
    expect(unexpected, 'console errors').toEqual([]);
  },
});

/** Lets a test expect console errors matching `pattern` (a RegExp source). */
export function allowConsole(pattern) {
  test.info().annotations.push({ type: 'allow-console', description: pattern });
}

/**
 * A TCP proxy in front of the server that cuts every SSE stream after one or two KB
 * (so, mostly in the middle of a frame), `maxCuts` times: the page must reconnect by
 * cursor each time. Other requests pass untouched. The cut points are the same in
 * every run.
 */
export async function cuttingProxy(target, { maxCuts = 10 } = {}) {
  const { hostname, port } = new URL(target);
  const stats = { cuts: 0, streams: 0 };
  // xorshift32: cut points spread over 1100–2600 bytes, the same in every run: past
  // the headers and the first frame (about 1 KB), so each connection brings something,
  // and mostly in the middle of a frame.
  let seed = 0x9e3779b9;
  const nextLimit = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    seed >>>= 0;
    return 1100 + (seed % 1500);
  };
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    sockets.add(client);
    sockets.add(upstream);
    let streaming = false;
    let sent = 0;
    let limit = Infinity;
    let cut = false;
    const close = () => {
      // A cut connection is closed by its own timer, once its last bytes are read.
      if (!cut) client.destroy();
      upstream.destroy();
    };
    client.on('data', (buf) => {
      const head = buf.toString('latin1');
      if (/^(GET|POST|DELETE|HEAD|PUT) /.test(head)) {
        streaming = head.startsWith('GET /api/chat/stream/');
        if (streaming) {
          stats.streams += 1;
          sent = 0;
          // After maxCuts the streams pass whole, so that a terminal event larger
          // than any cut point still gets through.
          limit = stats.cuts < maxCuts ? nextLimit() : Infinity;
        }
      }
      upstream.write(buf);
    });
    upstream.on('data', (buf) => {
      if (!streaming || sent + buf.length <= limit) {
        sent += buf.length;
        client.write(buf);
        return;
      }
      // Deliver the bytes up to the cut point (ending inside a frame), then, a moment
      // later, break the connection. (Breaking it at once would make the browser drop
      // what it had not yet handed to the page: an error discards a stream's queue.)
      cut = true;
      stats.cuts += 1;
      upstream.destroy();
      client.write(buf.subarray(0, Math.max(0, limit - sent)));
      setTimeout(() => client.destroy(), 150).unref();
    });
    client.on('close', close);
    upstream.on('close', close);
    client.on('error', close);
    upstream.on('error', close);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    stats,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
