#!/usr/bin/env node
// Open one page (a release's report.html, an index) in headless Chromium and print what a reader's
// browser saw, as one JSON line: console errors, page errors, every request beyond the page itself,
// the plots present (SVG elements per `figure[data-chart]`), whether the SYNTHETIC banner shows.
//
//   node page-check.mjs --url file:///.../report.html --chromium /usr/bin/chromium \
//        [--screenshot out.png] [--timeout-ms 60000]
//
// Exit code 0 when the page loaded (the caller judges what it saw), 1 when it did not.
// tests/test_report.py runs it on pages from disk and from the local S3 store.

import { launchChromium, pageArgs } from './lib/chromium.mjs';

const args = pageArgs('page-check.mjs', 60000, { screenshot: { type: 'string' } });
const { timeout } = args;
const consoleErrors = [];
const pageErrors = [];
const requests = [];
let browser;
try {
  browser = await launchChromium(args.chromium, timeout);
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('console', (message) => { if (message.type() === 'error') consoleErrors.push(message.text()); });
  page.on('pageerror', (error) => pageErrors.push(error.message));
  page.on('request', (request) => { if (request.url() !== args.url) requests.push(request.url()); });
  const response = await page.goto(args.url, { timeout, waitUntil: 'networkidle' });
  const seen = await page.evaluate(() => ({
    title: document.title,
    charts: Object.fromEntries([...document.querySelectorAll('figure[data-chart]')].map(
      (figure) => [figure.dataset.chart, figure.querySelectorAll('svg').length])),
    missingCharts: [...document.querySelectorAll('[data-missing-chart]')].map((node) => node.dataset.missingChart),
    svgPaths: document.querySelectorAll('figure[data-chart] svg path').length,
    syntheticBanner: Boolean(document.querySelector('#synthetic-banner')),
    links: [...document.querySelectorAll('a[href]')].map((a) => a.getAttribute('href')),
  }));
  if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
  process.stdout.write(`${JSON.stringify({
    status: response ? response.status() : null, contentType: response ? response.headers()['content-type'] ?? null : null,
    browser: `Chromium ${browser.version()}`, consoleErrors, pageErrors, requests, ...seen,
  })}\n`);
} catch (error) {
  process.stdout.write(`${JSON.stringify({ error: `page check failed: ${error.message.split('\n')[0]}`, consoleErrors, pageErrors, requests })}\n`);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
}
