// Playwright configuration of the browser tests. Run by crates/genstream/tests/browser.rs,
// which starts the real `genstream` binary and passes its address in the environment;
// see README.md beside this file.
import { defineConfig } from '@playwright/test';

const chromium = process.env.CHROMIUM || '/usr/bin/chromium';

export default defineConfig({
  testDir: './specs',
  // Everything that waits waits for a condition; these are upper bounds on a loaded
  // machine, not expected durations.
  timeout: 90_000,
  expect: { timeout: 20_000 },
  fullyParallel: false,
  forbidOnly: true,
  retries: 0,
  workers: Number(process.env.BROWSER_TEST_WORKERS || 2),
  reporter: [['list'], ['json', { outputFile: process.env.BROWSER_TEST_REPORT || 'report.json' }]],
  outputDir: process.env.BROWSER_TEST_ARTIFACTS || 'test-results',
  use: {
    browserName: 'chromium',
    baseURL: process.env.BROWSER_TEST_URL,
    viewport: { width: 1280, height: 800 },
    trace: 'retain-on-failure',
    launchOptions: {
      // Debian's Chromium, never a browser download.
      executablePath: chromium,
      // Without the background-networking flags Chromium keeps calling Google's
      // services, which this machine refuses many at a time.
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    },
  },
  projects: [
    { name: 'tests', testIgnore: /screenshots\.spec/ },
    // Run only when asked (BROWSER_SCREENSHOTS=1): rewrites docs/screenshots/.
    { name: 'screenshots', testMatch: /screenshots\.spec/ },
  ],
});
