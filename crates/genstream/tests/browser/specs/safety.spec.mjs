// Untrusted model output, the page's security headers, its weight, and sign-out on 401.
import {
  test,
  expect,
  mintToken,
  uniqueUser,
  signIn,
  send,
  lastMessage,
  savedMessages,
  conversationIdOf,
  allowConsole,
} from '../helpers.mjs';

const PAYLOAD = [
  '**bold words** and `inline code` and a [safe link](https://example.com/docs) and',
  '<img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script>',
  'and [bad link](javascript:window.__pwned=3) and <b onclick="window.__pwned=4">html bold</b>',
  'and <svg onload="window.__pwned=5"></svg> and <iframe src="javascript:window.__pwned=6"></iframe> done',
].join(' ');

test('model output with <img onerror>, <script> and Markdown renders the Markdown and runs nothing', async ({
  page,
  request,
}, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await page.evaluate(() => {
    window.__pwned = 0;
  });
  // The mock upstream's `echo` model answers with the question: the HTML is in the
  // model's output.
  await send(page, PAYLOAD, 'echo');
  const answer = lastMessage(page);
  await expect(answer).toHaveAttribute('data-status', 'complete');
  const saved = await savedMessages(request, token, conversationIdOf(page));
  expect(saved[1].text).toContain('<script>');

  const body = answer.getByTestId('message-text');
  // The Markdown is rendered…
  await expect(body.locator('strong')).toHaveText('bold words');
  await expect(body.locator('code')).toHaveText('inline code');
  const safe = body.getByRole('link', { name: 'safe link' });
  await expect(safe).toHaveAttribute('href', 'https://example.com/docs');
  await expect(safe).toHaveAttribute('rel', /noopener/);
  // …the HTML shows as text…
  await expect(body).toContainText('<img src=x onerror="window.__pwned=1">');
  await expect(body).toContainText('<script>window.__pwned=2</script>');
  // …and nothing of it became an element or ran.
  for (const sel of ['img', 'script', 'iframe', 'svg', '[onerror]', '[onclick]', '[onload]', 'a[href^="javascript"]']) {
    await expect(page.locator(`[data-testid="message"] ${sel}`), sel).toHaveCount(0);
  }
  await body.getByText('bad link').click();
  await page.waitForTimeout(200);
  expect(await page.evaluate(() => window.__pwned)).toBe(0);
  // The user's own message is plain text too.
  await expect(lastMessage(page, 'user').locator('img, script, strong')).toHaveCount(0);
  // After a reload (rendered from the saved message) the same holds.
  await page.reload();
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  await expect(page.locator('[data-testid="message"] img, [data-testid="message"] script')).toHaveCount(0);
  await expect(lastMessage(page).getByTestId('message-text').locator('strong')).toHaveText('bold words');
  expect(await page.evaluate(() => window.__pwned)).toBeUndefined();
});

test('the page sends its security headers and allows no inline script', async ({ page, request }) => {
  for (const path of ['/', '/c/some-conversation', '/assets/app.js']) {
    const r = await request.get(path);
    expect(r.status(), path).toBe(200);
    const h = r.headers();
    expect(h['content-security-policy'], path).toContain("script-src 'self'");
    expect(h['content-security-policy'], path).not.toContain('unsafe-inline');
    expect(h['x-content-type-options'], path).toBe('nosniff');
    expect(h['referrer-policy'], path).toBe('no-referrer');
  }
  // The policy holds in the browser: an inline script injected into the page is refused.
  allowConsole('Content Security Policy');
  await page.goto('/');
  const ran = await page.evaluate(async () => {
    window.__inline = false;
    const s = document.createElement('script');
    s.textContent = 'window.__inline = true';
    document.body.append(s);
    await new Promise((r) => setTimeout(r, 100));
    return window.__inline;
  });
  expect(ran).toBe(false);
  // Other paths stay the API's JSON 404.
  const missing = await request.get('/no-such-page');
  expect(missing.status()).toBe(404);
  expect((await missing.json()).error.code).toBe('not_found');
});

test('the first load is under 200 KB over the wire', async ({ page }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Network.enable');
  await cdp.send('Network.setCacheDisabled', { cacheDisabled: true });
  let bytes = 0;
  const urls = [];
  // Requests sent and not yet finished, by CDP request id.
  const pending = new Map();
  cdp.on('Network.requestWillBeSent', (e) => {
    urls.push(e.request.url);
    pending.set(e.requestId, e.request.url);
  });
  cdp.on('Network.loadingFinished', (e) => {
    bytes += e.encodedDataLength;
    pending.delete(e.requestId);
  });
  cdp.on('Network.loadingFailed', (e) => pending.delete(e.requestId));
  await page.goto(`/#token=${token}`);
  await expect(page.getByRole('button', { name: 'New chat' })).toBeVisible();
  await expect(page.getByRole('combobox', { name: 'Model' }).locator('option').first()).toBeAttached();
  await page.waitForLoadState('load');
  // Every request of the first load has finished. The page polls the running jobs
  // every 500 ms for as long as it is open, so a `networkidle` wait (500 ms without a
  // request) may never come; those polls are counted when they finish, not waited for.
  await expect
    .poll(() => [...pending.values()].filter((u) => !u.includes('/api/chat/active')))
    .toEqual([]);
  console.log(`first load: ${bytes} bytes over the wire in ${urls.length} requests`);
  expect(bytes).toBeGreaterThan(10_000);
  expect(bytes).toBeLessThan(200_000);
  // Nothing from another origin, and no token in any URL.
  for (const u of urls) {
    expect(new URL(u).origin).toBe(new URL(process.env.BROWSER_TEST_URL).origin);
    expect(u.split('#')[0]).not.toContain(token);
  }
});

test('a 401 sends the user back to sign-in', async ({ page }, testInfo) => {
  allowConsole('401 \\(Unauthorized\\)');
  const token = mintToken(uniqueUser(testInfo), '3s');
  await signIn(page, token);
  // The token expires; the page's next call is refused.
  await expect(page.getByLabel('Token or API key')).toBeVisible({ timeout: 15_000 });
  await expect(page.getByRole('status').first()).toContainText('Sign in again');
  expect(await page.evaluate(() => localStorage.getItem('genstream.token'))).toBeNull();
  // Signing in again brings the app back.
  const fresh = mintToken(uniqueUser(testInfo));
  await page.getByLabel('Token or API key').fill(fresh);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await expect(page.getByRole('button', { name: 'New chat' })).toBeVisible();
});

test('tokens stay out of URLs; the stream route takes one in ?access_token= and does not log it', async ({
  request,
}, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  const started = await (
    await request.post('/api/chat', { headers: { Authorization: `Bearer ${token}` }, data: { text: 'hi', model: 'demo' } })
  ).json();
  // EventSource-style: the token in the query, as the API allows. The browser test
  // harness then checks that the server's log holds no token at all.
  const ok = await request.get(`/api/chat/stream/${started.streamId}?access_token=${token}&cursor=0`);
  expect(ok.status()).toBe(200);
  expect(await ok.text()).toContain('event: final');
  const missing = await request.get(`/api/chat/stream/no-such-stream?access_token=${token}`);
  expect(missing.status()).toBe(404);
  const refused = await request.get(`/api/chat/stream/${started.streamId}?access_token=${token}x`);
  expect(refused.status()).toBe(401);
});
