#!/usr/bin/env node
// Open the check page in headless Chromium (the system's, via playwright-core: no browser download)
// and print the page's report as one JSON line on stdout.
//
//   node consumers/browser-check.mjs --url http://127.0.0.1:PORT/browser/index.html \
//        --chromium /usr/bin/chromium [--timeout-ms 120000]
//
// The page (browser/check.mjs) runs the fixture in onnxruntime-web and sets `window.mitraResult`.
// The report adds {"browser": "<Chromium version>", "log": [console errors, page errors]}.
// Exit code 0 when the page reported (the caller judges the numbers), 1 when it did not.
// mitra_model/consumers/checks.py `check_in_browser` starts the server and runs this.

import { launchChromium, pageArgs } from './lib/chromium.mjs';

const LOG_LIMIT = 40;
const args = pageArgs('browser-check.mjs', 120000);
const { timeout } = args;
const log = [];
let browser;
try {
  browser = await launchChromium(args.chromium, timeout);
  const page = await browser.newPage();
  page.on('console', (message) => {
    if (['error', 'warning'].includes(message.type()) && log.length < LOG_LIMIT) log.push(`console.${message.type()}: ${message.text()}`);
  });
  page.on('pageerror', (error) => { if (log.length < LOG_LIMIT) log.push(`page error: ${error.message}`); });
  page.on('requestfailed', (request) => {
    if (log.length < LOG_LIMIT) log.push(`request failed: ${request.url()} ${request.failure()?.errorText ?? ''}`);
  });
  await page.goto(args.url, { timeout, waitUntil: 'load' });
  await page.waitForFunction(() => window.mitraResult !== undefined, null, { timeout, polling: 100 });
  const result = await page.evaluate(() => window.mitraResult);
  process.stdout.write(`${JSON.stringify({ ...result, browser: `Chromium ${browser.version()}`, log })}\n`);
} catch (error) {
  process.stdout.write(`${JSON.stringify({ runtime: 'onnxruntime-web', backend: 'wasm', error: `browser check failed: ${error.message.split('\n')[0]}`, log })}\n`);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
}
