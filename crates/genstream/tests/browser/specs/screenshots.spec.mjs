// Not a test: makes the screenshots of docs/screenshots/ (run with
// BROWSER_SCREENSHOTS=1 cargo nextest run -p genstream -E 'test(browser)').
import { test, expect, mintToken, signIn, send, lastMessage } from '../helpers.mjs';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const dir = process.env.BROWSER_TEST_SCREENSHOT_DIR;
const shot = (page, name) => page.screenshot({ path: join(dir, `${name}.png`) });

test.describe.configure({ mode: 'serial' });
test.use({ colorScheme: 'light' });

let token;

test.beforeAll(() => {
  mkdirSync(dir, { recursive: true });
  token = mintToken('ada');
});

test('sign-in', async ({ page }) => {
  await page.setViewportSize({ width: 1100, height: 640 });
  await page.goto('/');
  await expect(page.getByLabel('Token or API key')).toBeFocused();
  await shot(page, 'sign-in');
});

test('a conversation: reasoning, Markdown, a tool call, usage and balance', async ({ page }) => {
  await page.setViewportSize({ width: 1280, height: 960 });
  await signIn(page, token);
  await send(page, 'Explain durable streams in one paragraph', 'demo');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  await page.getByRole('button', { name: 'New chat' }).click();
  await send(page, 'Multiply two numbers of your choice', 'tools');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  await send(page, 'Thanks! And how do I cross a street safely?', 'claude');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
  await lastMessage(page).locator('details.reasoning summary').click();
  await page.getByRole('textbox', { name: 'Message' }).blur();
  await page.locator('.messages').evaluate((el) => {
    el.scrollTop = 0;
  });
  await shot(page, 'chat');
});

test('a retry in progress', async ({ page }) => {
  await signIn(page, token);
  await send(page, 'An answer that needs a second try', 'flaky-long');
  await expect(lastMessage(page).getByTestId('retry')).toBeVisible();
  await page.getByRole('textbox', { name: 'Message' }).blur();
  await shot(page, 'retry');
  await page.getByRole('button', { name: 'Stop' }).click();
  await expect(lastMessage(page)).not.toHaveAttribute('data-status', 'streaming');
});

test('streaming, stopped, failed', async ({ page }) => {
  await signIn(page, token);
  await send(page, 'Tell me a long story', 'slow');
  await expect.poll(async () => (await lastMessage(page).textContent()).length).toBeGreaterThan(200);
  await page.getByRole('button', { name: 'Stop' }).click();
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'unfinished');
  await send(page, 'Try again, please', 'fails');
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'error');
  await send(page, 'Once more, and slowly', 'long');
  await expect.poll(async () => (await lastMessage(page).textContent()).length).toBeGreaterThan(120);
  await page.getByRole('textbox', { name: 'Message' }).blur();
  await shot(page, 'states');
  await page.getByRole('button', { name: 'Stop' }).click();
  await expect(lastMessage(page)).toHaveAttribute('data-status', 'unfinished');
});

test.describe('phone', () => {
  test.use({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });

  test('a conversation and the list on a phone', async ({ page }) => {
    await signIn(page, token);
    await page.getByRole('button', { name: 'Chats' }).click();
    await page.getByRole('navigation', { name: 'Conversations' }).getByRole('link', { name: /Multiply two numbers/ }).click();
    await expect(lastMessage(page)).toHaveAttribute('data-status', 'complete');
    await page.getByRole('textbox', { name: 'Message' }).blur();
    await shot(page, 'phone');
    await page.getByRole('button', { name: 'Chats' }).click();
    await expect(page.getByRole('navigation', { name: 'Conversations' })).toBeVisible();
    await page.waitForTimeout(300); // the slide-in
    await shot(page, 'phone-list');
  });
});
