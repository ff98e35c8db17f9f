// Headless Chromium for the page checks (browser-check.mjs, page-check.mjs): the system's browser,
// driven by playwright-core (no browser download), and their shared command line.

import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

// The flags this machine's closed network needs (no background connections, no QUIC, no sync);
// playwright-core adds --headless, --no-sandbox (it runs as root in CI) and a fresh profile dir.
const CHROMIUM_ARGS = [
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

// --url (required), --chromium, --timeout-ms, and `extra` options; on a bad command line, the usage
// line on stderr and exit 2.
export function pageArgs(script, defaultTimeoutMs, extra = {}) {
  const usage = Object.keys(extra).map((name) => ` [--${name} ${name.toUpperCase()}]`).join('');
  try {
    const { values } = parseArgs({
      options: {
        url: { type: 'string' },
        chromium: { type: 'string', default: '/usr/bin/chromium' },
        'timeout-ms': { type: 'string', default: String(defaultTimeoutMs) },
        ...extra,
      },
      strict: true,
    });
    if (!values.url) throw new Error('--url is required');
    return { ...values, timeout: Number(values['timeout-ms']) };
  } catch (error) {
    process.stderr.write(`usage: node ${script} --url URL [--chromium PATH] [--timeout-ms N]${usage}\n${error.message}\n`);
    process.exit(2);
  }
}

export function launchChromium(executablePath, timeout) {
  return chromium.launch({ executablePath, headless: true, args: CHROMIUM_ARGS, timeout, handleSIGTERM: true });
}
