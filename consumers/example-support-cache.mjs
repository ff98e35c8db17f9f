#!/usr/bin/env node
// Fit once, predict many in onnxruntime-node with the support-cache pair of a build:
//
//   node consumers/example-support-cache.mjs --encode encode-support.onnx --predict predict-query.onnx
//
// The encoder runs once per support set; its outputs are fed back BY NAME, unchanged (int64 ones
// stay BigInt64Array), with each new batch of query rows. Query item b goes with support item b.
// Random table data: the predictions mean nothing, the mechanics are the real ones.

import { parseArgs } from 'node:util';

import * as ort from 'onnxruntime-node';

const { values: args } = parseArgs({
  options: { encode: { type: 'string' }, predict: { type: 'string' }, rows: { type: 'string', default: '300' } },
  strict: true,
});
if (!args.encode || !args.predict) {
  process.stderr.write('usage: node example-support-cache.mjs --encode encode-support.onnx --predict predict-query.onnx\n');
  process.exit(2);
}

const rows = Number(args.rows);
const features = 6;
const random = () => Math.random() * 2 - 1;
const encoder = await ort.InferenceSession.create(args.encode);
const predictor = await ort.InferenceSession.create(args.predict);

// Fit: one table (batch 1) of `rows` labelled rows; classes 0..2 from the first two features.
const x = Float32Array.from({ length: rows * features }, random);
const labels = BigInt64Array.from({ length: rows }, (_, i) => BigInt(Math.min(2, Math.max(0, Math.round(x[i * features] + x[i * features + 1] + 1)))));
const labelType = encoder.inputMetadata?.find?.((m) => m.name === 'y_support')?.type;
const ySupport = labelType === 'float32'
  ? new ort.Tensor('float32', Float32Array.from(labels, Number), [1, rows])  // a regressor's targets
  : new ort.Tensor('int64', labels, [1, rows]);
const started = performance.now();
const cache = await encoder.run({
  x_support: new ort.Tensor('float32', x, [1, rows, features]),
  y_support: ySupport,
  padding_obs_support: new ort.Tensor('bool', new Uint8Array(rows), [1, rows]),
});
const cacheBytes = Object.values(cache).reduce((sum, t) => sum + t.data.byteLength, 0);
console.log(`encoded ${rows} support rows once in ${(performance.now() - started).toFixed(0)} ms: `
  + `${Object.keys(cache).length} cache tensors, ${(cacheBytes / 1e6).toFixed(1)} MB`);

// Predict many: every batch reads the same cache; the support side is never recomputed.
for (let batch = 0; batch < 3; batch += 1) {
  const q = 4;
  const xQuery = new ort.Tensor('float32', Float32Array.from({ length: q * features }, random), [1, q, features]);
  const t0 = performance.now();
  const { output } = await predictor.run({ ...cache, x_query: xQuery });
  console.log(`batch ${batch}: output ${JSON.stringify(output.dims)} in ${(performance.now() - t0).toFixed(1)} ms, `
    + `first row ${Array.from(output.data.slice(0, 3), (v) => v.toFixed(3)).join(', ')}`);
}
