// Element names for tests and assistive technology, the keyboard alone, a phone-sized
// screen.
import {
  test,
  expect,
  mintToken,
  uniqueUser,
  signIn,
  send,
  lastMessage,
  conversationIdOf,
} from '../helpers.mjs';

test('the page names its parts', async ({ page }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  await expect(page.getByRole('textbox', { name: 'Message' })).toBeVisible();
  await expect(page.getByRole('button', { name: 'Send' })).toBeVisible();
  await expect(page.getByRole('button', { name: 'New chat' })).toBeVisible();
  await expect(page.getByRole('combobox', { name: 'Model' })).toBeVisible();
  const nav = page.getByRole('navigation', { name: 'Conversations' });
  await expect(nav).toBeVisible();
  await send(page, 'names', 'long');
  await expect(page.getByRole('button', { name: 'Stop' })).toBeVisible();
  const user = page.locator('[data-testid="message"][data-author="user"]');
  await expect(user).toHaveCount(1);
  await expect(user).toHaveAttribute('data-status', 'complete');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'streaming');
  await expect(nav.getByRole('link', { name: /names/ })).toHaveAttribute('href', `/c/${conversationIdOf(page)}`);
  await page.getByRole('button', { name: 'Stop' }).click();
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'unfinished');
  // The live region says what happened.
  await expect(page.getByRole('status').filter({ hasText: 'Answer stopped.' })).toBeAttached();
});

test('works with the keyboard alone', async ({ page }, testInfo) => {
  const token = mintToken(uniqueUser(testInfo));
  await signIn(page, token);
  // The composer has focus on arrival; type and send with Enter.
  await expect(page.getByRole('textbox', { name: 'Message' })).toBeFocused();
  await page.keyboard.type('from the keyboard');
  await page.keyboard.press('Enter');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  const first = conversationIdOf(page);
  // Tab order from the composer: model picker, then Send.
  await page.keyboard.press('Tab');
  await expect(page.getByRole('combobox', { name: 'Model' })).toBeFocused();
  // Reach "New chat" by tabbing from the top of the page, and press it.
  let found = false;
  for (let i = 0; i < 15 && !found; i++) {
    await page.keyboard.press('Tab');
    found = await page.getByRole('button', { name: 'New chat' }).evaluate((b) => b === document.activeElement);
  }
  expect(found, 'Tab reaches "New chat"').toBeTruthy();
  // Focus is visible.
  const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
  expect(outline).not.toBe('none');
  await page.keyboard.press('Enter');
  await expect(page).toHaveURL(/\/$/);
  // Then the conversation's link is reachable by Tab and opens with Enter.
  found = false;
  for (let i = 0; i < 15 && !found; i++) {
    await page.keyboard.press('Tab');
    found = await page.evaluate((id) => document.activeElement?.getAttribute('href') === `/c/${id}`, first);
  }
  expect(found, 'Tab reaches the conversation link').toBeTruthy();
  await page.keyboard.press('Enter');
  await expect(page).toHaveURL(new RegExp(`/c/${first}$`));
});

test.describe('on a phone-sized screen', () => {
  test.use({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });

  test('chat and the conversation list fit the screen', async ({ page }, testInfo) => {
    const token = mintToken(uniqueUser(testInfo));
    await signIn(page, token);
    await send(page, 'a question from a phone', 'demo');
    await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
    const id = conversationIdOf(page);
    const fits = await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth);
    expect(fits, 'no horizontal scrolling').toBeTruthy();
    await expect(page.getByRole('button', { name: 'Send' })).toBeInViewport();
    // The list hides behind a menu button.
    const nav = page.getByRole('navigation', { name: 'Conversations' });
    await expect(nav).toBeHidden();
    await page.getByRole('button', { name: 'Chats' }).click();
    await expect(nav).toBeVisible();
    await page.getByRole('button', { name: 'New chat' }).click();
    await expect(nav).toBeHidden();
    await expect(page).toHaveURL(/\/$/);
    await page.getByRole('button', { name: 'Chats' }).click();
    await nav.getByRole('link', { name: /a question from a phone/ }).click();
    await expect(page).toHaveURL(new RegExp(`/c/${id}$`));
    await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  });
});
