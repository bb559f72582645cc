// Many windows: tabs of one browser and other devices (separate browser contexts,
// which share no storage and no BroadcastChannel) watch the same answer live, see new
// turns within a second, and stop it from anywhere.
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
  norm,
  whenShown,
} from '../helpers.mjs';

test('two tabs on one conversation end with the same text; a turn from one appears in the other', async ({
  page,
  context,
  request,
}, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'shared answer', 'slow');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'streaming');
  const id = conversationIdOf(page);
  const second = await context.newPage();
  await second.goto(`/c/${id}`);
  // The second tab shows the running answer live.
  await expect(lastMessage(second)).toHaveAttribute('data-status', 'streaming');
  await expect.poll(async () => (await answerText(lastMessage(second))).length).toBeGreaterThan(0);
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete', { timeout: 60_000 });
  await expect(lastMessage(second)).toHaveAttribute('data-status', 'complete');
  let saved = await savedMessages(request, token, id);
  expect(await answerText(lastMessage(page))).toBe(norm(saved[1].text));
  expect(await answerText(lastMessage(second))).toBe(norm(saved[1].text));

  // A new turn started in the second tab shows in the first within a second.
  // "Within a second" counts from the moment the server accepted the turn.
  const shown = await whenShown(page, 'a follow-up from the other tab');
  const accepted = await send(second, 'a follow-up from the other tab', 'demo');
  const delay = (await shown()) - accepted;
  console.log(`a new turn showed in the other tab ${delay} ms after the server accepted it`);
  expect(delay).toBeLessThan(1000);
  await expect(lastMessage(page, 'user')).toHaveText(/a follow-up from the other tab/);
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  await expect(lastMessage(second)).toHaveAttribute('data-status', 'complete');
  saved = await savedMessages(request, token, id);
  expect(saved).toHaveLength(4);
  expect(await answerText(lastMessage(page))).toBe(norm(saved[3].text));
  expect(await answerText(lastMessage(second))).toBe(norm(saved[3].text));
  await second.close();
});

test('another device sees a new turn within a second, and its list gains the conversation', async ({
  page,
  browser,
  consoleErrors,
  request,
}, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'first turn', 'demo');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  const id = conversationIdOf(page);

  const device = await browser.newContext();
  consoleErrors.watchContext(device);
  const phone = await device.newPage();
  await signIn(phone, token, `/c/${id}`);
  await expect(lastMessage(phone)).toHaveAttribute('data-status', 'complete');

  const shown = await whenShown(phone, 'second turn, from the laptop');
  const accepted = await send(page, 'second turn, from the laptop', 'slow');
  const delay = (await shown()) - accepted;
  console.log(`a new turn showed on the other device ${delay} ms after the server accepted it`);
  expect(delay).toBeLessThan(1000);
  await expect(lastMessage(phone, 'user')).toHaveText(/second turn, from the laptop/);
  await expect(lastMessage(phone)).toHaveAttribute('data-status', 'streaming');

  // A new conversation started on the laptop shows in the phone's list.
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete', { timeout: 60_000 });
  await page.getByRole('button', { name: 'New chat' }).click();
  await send(page, 'brand new topic', 'demo');
  await expect(page).toHaveURL(/\/c\//);
  const fresh = conversationIdOf(page);
  await expect(
    phone.getByRole('navigation', { name: 'Conversations' }).getByRole('link').first(),
  ).toHaveAttribute('href', `/c/${fresh}`, { timeout: 1500 });
  await expect(lastMessage(phone)).toHaveAttribute('data-status', 'complete');
  const saved = await savedMessages(request, token, id);
  expect(await answerText(lastMessage(phone))).toBe(norm(saved[3].text));
  await device.close();
});

test('stop from another tab keeps the partial answer, marked unfinished, everywhere', async ({
  page,
  context,
  browser,
  consoleErrors,
  request,
}, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'an answer to stop', 'long');
  const id = conversationIdOf(page);
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'streaming');
  const tab = await context.newPage();
  await tab.goto(`/c/${id}`);
  const device = await browser.newContext();
  consoleErrors.watchContext(device);
  const phone = await device.newPage();
  await signIn(phone, token, `/c/${id}`);
  await expect(lastMessage(phone)).toHaveAttribute('data-status', 'streaming');
  await expect.poll(async () => (await answerText(lastMessage(tab))).split(' ').length).toBeGreaterThan(3);

  await tab.getByRole('button', { name: 'Stop' }).click();
  for (const p of [page, tab, phone]) {
    await expect(lastMessage(p)).toHaveAttribute('data-status', 'unfinished');
    await expect(p.getByRole('button', { name: 'Stop' })).toHaveCount(0);
  }
  const saved = await savedMessages(request, token, id);
  expect(saved[1].unfinished).toBe(true);
  const partial = norm(saved[1].text);
  expect(partial.length).toBeGreaterThan(0);
  for (const p of [page, tab, phone]) {
    expect(await answerText(lastMessage(p))).toBe(partial);
    await expect(lastMessage(p)).toContainText('Unfinished');
  }
  // Still unfinished after a reload.
  await page.reload();
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'unfinished');
  expect(await answerText(lastMessage(page))).toBe(partial);
  await device.close();
});
