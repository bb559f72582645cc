// Streaming that never loses or repeats text: a reload in the middle of an answer, and
// connections cut in the middle of frames by a proxy.
import {
  test,
  expect,
  mintToken,
  uniqueUser,
  signIn,
  send,
  lastMessage,
  answerText,
  savedMessages,
  conversationIdOf,
  apiGet,
  norm,
  recordSamples,
  checkSamples,
  cuttingProxy,
  allowConsole,
} from '../helpers.mjs';

test('a reload in the middle of an answer continues it exactly where it is', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'a long answer please', 'slow');
  const answer = lastMessage(page);
  await expect(answer).toHaveAttribute('data-status', 'streaming');
  // Some words in, reload.
  await expect.poll(async () => (await answerText(answer)).split(' ').length).toBeGreaterThan(5);
  const id = conversationIdOf(page);
  const before = await answerText(answer);
  const status = await apiGet(request, token, `/api/chat/status/${id}`);
  expect(status.active).toBe(true);
  await page.reload();
  // The page finds the running job and shows the answer so far at once, still
  // streaming, then the rest.
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'streaming');
  await expect.poll(async () => (await answerText(lastMessage(page))).length).toBeGreaterThanOrEqual(before.length);
  await recordSamples(page);
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete', { timeout: 60_000 });
  const saved = await savedMessages(request, token, id);
  expect(saved).toHaveLength(2);
  const final = norm(saved[1].text);
  expect(await answerText(lastMessage(page))).toBe(final);
  expect(final.startsWith(before)).toBeTruthy();
  expect(await checkSamples(page, final)).toBeGreaterThan(1);
  // The user's message is there once.
  await expect(page.locator('[data-testid="message"][data-author="user"]')).toHaveCount(1);
});

test('connections cut in the middle of frames lose and repeat nothing', async ({ page, request }, testInfo) => {
  // The browser reports each cut stream as a failed load; the page itself must stay quiet.
  allowConsole('net::ERR_');
  const proxy = await cuttingProxy(process.env.BROWSER_TEST_URL);
  try {
    const token = mintToken(uniqueUser(testInfo));
    await page.goto(`${proxy.url}/#token=${token}`);
    await expect(page.getByRole('button', { name: 'New chat' })).toBeVisible();
    await recordSamples(page);
    // Each reconnect should carry the cursor: the seq of the last event the page has.
    const cursors = [];
    page.on('request', (r) => {
      if (r.url().includes('/api/chat/stream/')) cursors.push(r.headers()['last-event-id']);
    });
    await send(page, 'keep going through the cuts', 'cut');
    const answer = lastMessage(page);
    // The quiet reconnecting state shows while the stream is down.
    await expect(answer.getByTestId('reconnecting')).toBeVisible();
    await expect(answer).toHaveAttribute('data-status', 'complete', { timeout: 80_000 });
    const saved = await savedMessages(request, token, conversationIdOf(page));
    const final = norm(saved[1].text);
    expect(await answerText(answer)).toBe(final);
    const samples = await checkSamples(page, final);
    console.log(
      `${proxy.stats.cuts} cuts, ${proxy.stats.streams} connections, cursors ${cursors.join(' ')}; ` +
        `${samples} texts shown, each a prefix of the saved one`,
    );
    expect(proxy.stats.cuts, 'the proxy cut streams').toBe(10);
    // The first connection had no cursor; every later one resumed further on.
    expect(cursors[0]).toBeUndefined();
    const resumed = cursors.slice(1).map(Number);
    expect(resumed.length).toBeGreaterThanOrEqual(10);
    for (let i = 1; i < resumed.length; i++) expect(resumed[i]).toBeGreaterThanOrEqual(resumed[i - 1]);
    expect(new Set(resumed).size, 'resumed from distinct places in the answer').toBeGreaterThanOrEqual(5);
    expect(samples, 'partial answers were shown between cuts').toBeGreaterThan(3);
    await expect(answer.getByTestId('reconnecting')).toHaveCount(0);
  } finally {
    await proxy.close();
  }
});
