// The chat itself: sign-in, sending, the answer equal to the saved message, the
// conversation list and its URLs, the model picker, reasoning, tools, retries, errors.
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
  allowConsole,
} from '../helpers.mjs';

test('the link serve prints signs in, and the token leaves the address bar', async ({ page }) => {
  const link = process.env.BROWSER_TEST_SIGNIN;
  expect(link, 'serve printed no sign-in link').toMatch(/^http:\/\/127\.0\.0\.1:\d+\/#token=ey/);
  await page.goto(link);
  await expect(page.getByRole('button', { name: 'New chat' })).toBeVisible();
  expect(page.url()).not.toContain('token');
  expect(await page.evaluate(() => localStorage.getItem('genstream.token'))).toBe(new URL(link).hash.slice('#token='.length));
});

test('the sign-in form takes a token and refuses a bad one', async ({ page }, testInfo) => {
  allowConsole('401 \\(Unauthorized\\)');
  const token = mintToken(uniqueUser(testInfo));
  await page.goto('/');
  const field = page.getByLabel('Token or API key');
  await expect(field).toBeFocused();
  await field.fill('not-a-token');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await expect(page.getByRole('alert')).toContainText('refused');
  await field.fill(token);
  await field.press('Enter');
  await expect(page.getByRole('button', { name: 'New chat' })).toBeVisible();
  await expect(page.getByRole('navigation', { name: 'Conversations' })).toBeVisible();
});

test('send: the streamed answer equals the saved message', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await recordSamples(page);
  await send(page, 'Tell me about durable streams', 'demo');
  await expect(page).toHaveURL(/\/c\/[0-9a-f-]+$/);
  const answer = lastMessage(page);
  await expect(answer).toHaveAttribute('data-status', 'complete');
  const id = conversationIdOf(page);
  const saved = await savedMessages(request, token, id);
  expect(saved.map((m) => m.isCreatedByUser)).toEqual([true, false]);
  expect(saved[0].text).toBe('Tell me about durable streams');
  expect(await answerText(answer)).toBe(norm(saved[1].text));
  expect(await checkSamples(page, norm(saved[1].text))).toBeGreaterThan(0);
  // Usage and cost of the answer.
  await expect(answer.getByTestId('usage')).toContainText('tokens out');
  // The question shows as sent, the user's message is the user's.
  await expect(lastMessage(page, 'user')).toContainText('Tell me about durable streams');
  // The list shows the conversation, newest first, as a link to its URL.
  const nav = page.getByRole('navigation', { name: 'Conversations' });
  await expect(nav.getByRole('link').first()).toHaveAttribute('href', `/c/${id}`);
  await expect(nav.getByRole('link').first()).toHaveText('Tell me about durable streams');
});

test('Enter sends, Shift+Enter is a new line', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  const box = page.getByRole('textbox', { name: 'Message' });
  await box.fill('first line');
  await box.press('Shift+Enter');
  await box.pressSequentially('second line');
  await expect(box).toHaveValue('first line\nsecond line');
  await expect(page.locator('[data-testid="message"]')).toHaveCount(0);
  await box.press('Enter');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  await expect(box).toHaveValue('');
  const saved = await savedMessages(request, token, conversationIdOf(page));
  expect(saved[0].text).toBe('first line\nsecond line');
});

test('conversations: newest first, own URLs, deep links, back and forward', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'first conversation', 'demo');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  const first = conversationIdOf(page);
  await page.getByRole('button', { name: 'New chat' }).click();
  await expect(page).toHaveURL(/\/$/);
  await expect(page.locator('[data-testid="message"]')).toHaveCount(0);
  await send(page, 'second conversation', 'demo');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  const second = conversationIdOf(page);
  expect(second).not.toBe(first);

  const links = page.getByRole('navigation', { name: 'Conversations' }).getByRole('link');
  await expect(links).toHaveCount(2);
  await expect(links.nth(0)).toHaveAttribute('href', `/c/${second}`);
  await expect(links.nth(1)).toHaveAttribute('href', `/c/${first}`);
  const listed = (await apiGet(request, token, '/api/conversations')).conversations.map((c) => c.conversationId);
  expect(listed).toEqual([second, first]);

  await links.nth(1).click();
  await expect(page).toHaveURL(new RegExp(`/c/${first}$`));
  await expect(lastMessage(page, 'user')).toHaveText(/first conversation/);
  await expect(links.nth(1)).toHaveAttribute('aria-current', 'page');
  await page.goBack();
  await expect(page).toHaveURL(new RegExp(`/c/${second}$`));
  await expect(lastMessage(page, 'user')).toHaveText(/second conversation/);
  await page.goForward();
  await expect(lastMessage(page, 'user')).toHaveText(/first conversation/);

  // A deep link opened fresh (a new tab) shows the conversation.
  const other = await page.context().newPage();
  await other.goto(`/c/${second}`);
  await expect(lastMessage(other, 'user')).toHaveText(/second conversation/);
  await expect(lastMessage(other)).toHaveAttribute('data-status', 'complete');
  const saved = await savedMessages(request, token, second);
  expect(await answerText(lastMessage(other))).toBe(norm(saved[1].text));
  await other.close();
});

test('the model picker lists /api/models and sends the chosen one', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  const { models } = await apiGet(request, token, '/api/models');
  const picker = page.getByRole('combobox', { name: 'Model' });
  await expect(picker.locator('option')).toHaveCount(models.length);
  const names = await picker.locator('option').evaluateAll((os) => os.map((o) => o.value));
  expect(names).toEqual(models.map((m) => m.name));
  await send(page, 'which model?', 'reasoning');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  const saved = await savedMessages(request, token, conversationIdOf(page));
  expect(saved[1].model).toBe('reasoning');
});

test('reasoning shows collapsed, tool calls show name, arguments and result', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'think first', 'reasoning');
  const answer = lastMessage(page);
  await expect(answer).toHaveAttribute('data-status', 'complete');
  const details = answer.locator('details.reasoning');
  await expect(details).toHaveCount(1);
  await expect(details).not.toHaveAttribute('open', '');
  const saved = await savedMessages(request, token, conversationIdOf(page));
  const think = saved[1].content.find((p) => p.type === 'think').think;
  await details.locator('summary').click();
  await expect(details.locator('.think')).toHaveText(think);
  expect(await answerText(answer)).toBe(norm(saved[1].text));

  await page.getByRole('button', { name: 'New chat' }).click();
  await send(page, 'compute something', 'tools');
  const tool = lastMessage(page);
  await expect(tool).toHaveAttribute('data-status', 'complete');
  const call = tool.getByTestId('tool-call');
  await expect(call).toContainText('calculator');
  const savedTool = (await savedMessages(request, token, conversationIdOf(page)))[1];
  const part = savedTool.content.find((p) => p.type === 'tool_call').tool_call;
  await expect(call).toContainText(JSON.parse(part.args).expression);
  await expect(call.getByTestId('tool-result')).toHaveText(part.output);
  expect(await answerText(tool)).toBe(norm(savedTool.text));
});

test('a retry shows "retrying in N s (attempt k of n)" with its reason, then the answer', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'an answer after one failure', 'flaky');
  const answer = lastMessage(page);
  const retry = answer.getByTestId('retry');
  // One assertion for the whole notice: it shows for the 2 s of Retry-After only, and
  // on loaded cores separate checks could each start after it is gone.
  await expect(retry).toContainText(/retrying in \d+ s \(attempt 1 of 4\)[^]*503/);
  await expect(answer).toHaveAttribute('data-status', 'complete');
  await expect(retry).toHaveCount(0);
  const saved = await savedMessages(request, token, conversationIdOf(page));
  expect(await answerText(answer)).toBe(norm(saved[1].text));
  expect(norm(saved[1].text)).toBe('an answer after one failure');
});

test('an error shows its message with the partial answer', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'this one breaks', 'fails');
  const answer = lastMessage(page);
  await expect(answer).toHaveAttribute('data-status', 'error');
  await expect(answer.getByRole('alert')).toContainText('failure mid-stream');
  const saved = await savedMessages(request, token, conversationIdOf(page));
  expect(saved[1].error).toBe(true);
  expect(saved[1].text.length).toBeGreaterThan(0);
  expect(await answerText(answer)).toBe(norm(saved[1].text));
  // After a reload the saved partial answer is still marked as failed.
  await page.reload();
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'error');
  expect(await answerText(lastMessage(page))).toBe(norm(saved[1].text));
});

test('usage and cost per answer, and the balance, which the answer lowers', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  const balance = page.locator('.balance');
  await expect(balance).toContainText('$1.00');
  const usd = (credits, digits) => (credits / 1e6).toLocaleString('en-US', { maximumSignificantDigits: digits });
  await send(page, 'How do I cross a street safely?', 'claude');
  const answer = lastMessage(page);
  await expect(answer).toHaveAttribute('data-status', 'complete');
  // Markdown from a recorded Anthropic answer: bold and lists.
  await expect(answer.getByTestId('message-text').locator('strong').first()).toBeVisible();
  await expect(answer.getByTestId('message-text').locator('li').first()).toBeVisible();
  const { balance: left } = await apiGet(request, token, '/api/balance');
  expect(left).toBeLessThan(1000000);
  const cost = usd(1000000 - left, 3);
  const usage = answer.getByTestId('usage');
  await expect(usage).toContainText(/\d+ tokens in · \d+ tokens out/);
  await expect(usage).toContainText(`$${cost}`);
  await expect(balance).toContainText(`$${usd(left, 3)}`);
  // The usage survives a reload (kept in this browser for the saved message).
  await page.reload();
  await expect(lastMessage(page).getByTestId('usage')).toContainText(`$${cost}`);
});

test('the message tree: regenerate makes a second version, and both can be shown', async ({ page, request }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await send(page, 'a first question', 'demo');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  // The first turn has no parent to branch under; a later one has.
  await expect(page.getByRole('button', { name: 'Regenerate' })).toHaveCount(0);
  await send(page, 'one question, two answers', 'demo');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  const id = conversationIdOf(page);
  const first = await answerText(lastMessage(page));
  await page.getByRole('button', { name: 'Regenerate' }).click();
  await expect(lastMessage(page, 'user')).toContainText('2 / 2');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  const saved = await savedMessages(request, token, id);
  expect(saved).toHaveLength(6);
  // Both versions of the question answer the first answer: siblings in the tree.
  const [q1, a1, q2, a2, q3, a3] = saved;
  expect(q2.text).toBe(q3.text);
  expect(q2.parentMessageId).toBe(a1.messageId);
  expect(q3.parentMessageId).toBe(a1.messageId);
  expect(a3.parentMessageId).toBe(q3.messageId);
  expect(await answerText(lastMessage(page))).toBe(norm(a3.text));
  expect(first).toBe(norm(a2.text));
  await page.getByRole('button', { name: 'Previous version' }).click();
  await expect(lastMessage(page, 'user')).toContainText('1 / 2');
  expect(await answerText(lastMessage(page))).toBe(first);
  await expect(page.locator('[data-testid="message"]')).toHaveCount(4);
  expect(q1.parentMessageId).toBeNull();
});
