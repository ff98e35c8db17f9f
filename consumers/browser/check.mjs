// Runs a consumer fixture through onnxruntime-web (WASM backend) in the page and publishes the
// report as `window.mitraResult` (read by ../browser-check.mjs). URLs, relative to the page's server:
//   ?model=/model.onnx&fixture=/fixture.json (the defaults); onnxruntime-web's files under /ort/.
//   &predict=/predict.onnx: model is the support-cache pair's encoder, every case runs encode -> predict.
import * as ort from 'onnxruntime-web';

import { checkFixture, fullModel, runFixture, supportCachePair } from '../lib/fixture.mjs';

ort.env.wasm.wasmPaths = new URL('/ort/', window.location.href).href; // never a CDN
ort.env.wasm.numThreads = 1; // multi-threaded WASM needs cross-origin isolation (COOP/COEP)
ort.env.wasm.proxy = false;
ort.env.logLevel = 'error';

async function fetchOk(url) {
  const response = await fetch(url, { cache: 'no-store' });
  if (!response.ok) throw new Error(`GET ${url}: HTTP ${response.status}`);
  return response;
}

async function load(url) {
  const model = await fetchOk(url).then((r) => r.arrayBuffer());
  try {
    return await ort.InferenceSession.create(new Uint8Array(model), {
      executionProviders: ['wasm'],
      graphOptimizationLevel: 'all',
      logSeverityLevel: 3,
    });
  } catch (error) {
    throw new Error(`onnxruntime-web ${ort.env.versions.web} (wasm) could not load ${url}: ${error.message || error}`);
  }
}

async function check() {
  const params = new URLSearchParams(window.location.search);
  const modelUrls = [params.get('model') || '/model.onnx', params.get('predict')].filter(Boolean);
  const fixture = checkFixture(await fetchOk(params.get('fixture') || '/fixture.json').then((r) => r.json()));
  const sessions = [];
  try {
    for (const url of modelUrls) sessions.push(await load(url));
    const predict = sessions.length === 2 ? supportCachePair(...sessions) : fullModel(sessions[0]);
    return { cases: await runFixture(ort, predict, fixture) };
  } finally {
    for (const session of sessions) await session.release();
  }
}

function show(result) {
  document.getElementById('status').textContent = result.error
    ? `error: ${result.error}`
    : `onnxruntime-web ${result.version} (${result.backend}): ${result.cases.length} cases run`;
  const table = document.getElementById('cases');
  const row = (cells, tag) => {
    const tr = table.insertRow();
    for (const text of cells) tr.appendChild(document.createElement(tag)).textContent = text;
  };
  row(['case', 'B,S,Q,F', 'max abs err vs Python ORT', 's'], 'th');
  for (const c of result.cases || []) {
    row([c.name, String(c.shape), c.error || String(c.max_abs_err), c.seconds === null ? '' : c.seconds.toFixed(3)], 'td');
  }
}

const base = {
  runtime: 'onnxruntime-web',
  version: ort.env.versions.web,
  backend: 'wasm',
  user_agent: navigator.userAgent,
  cross_origin_isolated: window.crossOriginIsolated,
};
check().then(
  (report) => ({ ...base, ...report }),
  (error) => ({ ...base, error: String((error && error.message) || error) }),
).then((result) => {
  window.mitraResult = result;
  show(result);
});
