// Consumer fixtures, shared by node-check.mjs (onnxruntime-node) and browser/check.mjs
// (onnxruntime-web): decode the inputs, run every case through the consumer I/O contract (one
// model file, or the support-cache pair encode-support -> predict-query), and measure the output
// against what Python ONNX Runtime computed.
//
// Fixture format (mitra_model/consumers/fixture.py: the `Fixture` schema, written by `write_fixture`),
// one JSON document:
//   {"schema": "mitra-build/consumer-fixture/v1", "model_sha256", ["predict_sha256",] "task", "seed", "cases": [
//     {"name", "shape": [B, S, Q, F], "data", "padded_support_rows",
//      "inputs": {<name>: TENSOR, ...}, "expected": TENSOR}]}
//   TENSOR = {"dtype": "float32" | "int64" | "bool", "shape": [...], "data": base64 of the
//             little-endian bytes (bool: one byte per element, 0 or 1)}
// predict_sha256 is there when the expected outputs come from a support-cache pair (model_sha256
// is then the encoder's).
// Plain ES module, no Node.js or DOM API beyond atob / performance: runs in both.

export const FIXTURE_SCHEMA = 'mitra-build/consumer-fixture/v1';
export const INPUT_NAMES = ['x_support', 'y_support', 'x_query', 'padding_obs_support'];
export const ENCODE_INPUT_NAMES = ['x_support', 'y_support', 'padding_obs_support'];
export const QUERY_INPUT_NAME = 'x_query';
export const OUTPUT_NAME = 'output';

const TYPED_ARRAYS = { float32: Float32Array, int64: BigInt64Array, bool: Uint8Array };
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

export function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length); // a fresh buffer: aligned for any typed array view
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** A typed array holding the tensor's values; `where` names it in errors. */
export function decodeArray(spec, where) {
  const Typed = TYPED_ARRAYS[spec.dtype];
  if (!Typed) throw new Error(`${where}: dtype ${JSON.stringify(spec.dtype)} is not one of ${Object.keys(TYPED_ARRAYS).join(', ')}`);
  if (!LITTLE_ENDIAN && Typed.BYTES_PER_ELEMENT > 1) throw new Error(`${where}: fixtures are little-endian and this platform is not`);
  const bytes = base64ToBytes(spec.data);
  const count = spec.shape.reduce((a, b) => a * b, 1);
  if (bytes.length !== count * Typed.BYTES_PER_ELEMENT) {
    throw new Error(`${where}: ${bytes.length} bytes for shape [${spec.shape}] of ${spec.dtype} (expected ${count * Typed.BYTES_PER_ELEMENT})`);
  }
  return new Typed(bytes.buffer, 0, count);
}

export function toTensor(ort, spec, where) {
  return new ort.Tensor(spec.dtype, decodeArray(spec, where), spec.shape);
}

export function checkFixture(fixture) {
  if (!fixture || fixture.schema !== FIXTURE_SCHEMA) {
    throw new Error(`not a consumer fixture: schema is ${JSON.stringify(fixture && fixture.schema)}, expected ${JSON.stringify(FIXTURE_SCHEMA)}`);
  }
  if (!Array.isArray(fixture.cases) || fixture.cases.length === 0) throw new Error('the fixture has no cases');
  return fixture;
}

function sameNames(a, b) {
  return [...a].sort().join(',') === [...b].sort().join(',');
}

/**
 * The consumer I/O contract served by one model file: returns `inputs -> output tensor`.
 * The session must expose exactly the contract's names.
 */
export function fullModel(session) {
  if (!sameNames(session.inputNames, INPUT_NAMES) || session.outputNames.join(',') !== OUTPUT_NAME) {
    throw new Error(`the model's inputs [${session.inputNames}] / outputs [${session.outputNames}] are not the consumer I/O contract ` +
      `(inputs [${INPUT_NAMES}], output [${OUTPUT_NAME}])`);
  }
  return async (inputs) => (await session.run(inputs))[OUTPUT_NAME];
}

/**
 * The same contract served by the support-cache pair, the way a fit-once / predict-many consumer
 * uses it: the encoder's outputs go to the predictor by name, unchanged, with x_query beside them.
 */
export function supportCachePair(encoder, predictor) {
  if (!sameNames(encoder.inputNames, ENCODE_INPUT_NAMES)) {
    throw new Error(`the encoder's inputs [${encoder.inputNames}] are not [${ENCODE_INPUT_NAMES}]`);
  }
  const wanted = [...encoder.outputNames, QUERY_INPUT_NAME];
  if (!sameNames(predictor.inputNames, wanted) || predictor.outputNames.join(',') !== OUTPUT_NAME) {
    throw new Error(`the predictor's inputs [${predictor.inputNames}] / outputs [${predictor.outputNames}] do not fit the encoder: ` +
      `expected inputs [${wanted}] (the encoder's outputs and ${QUERY_INPUT_NAME}), output [${OUTPUT_NAME}]`);
  }
  return async (inputs) => {
    const support = Object.fromEntries(ENCODE_INPUT_NAMES.map((name) => [name, inputs[name]]));
    const cache = await encoder.run(support);
    try {
      return (await predictor.run({ ...cache, [QUERY_INPUT_NAME]: inputs[QUERY_INPUT_NAME] }))[OUTPUT_NAME];
    } finally {
      for (const tensor of Object.values(cache)) if (typeof tensor.dispose === 'function') tensor.dispose();
    }
  };
}

/** Largest |got - want| in float64; null when `got` holds NaN or an infinity. */
function maxAbsDiff(got, want) {
  let max = 0;
  let nonFinite = 0;
  for (let i = 0; i < want.length; i += 1) {
    const value = got[i];
    if (!Number.isFinite(value)) { nonFinite += 1; continue; }
    const diff = Math.abs(value - want[i]);
    if (diff > max) max = diff;
  }
  return { max_abs_err: nonFinite ? null : max, non_finite: nonFinite };
}

/**
 * Run every case of `fixture` through `predict` (from `fullModel` or `supportCachePair`).
 * Returns one record per case: {name, shape, output_shape, max_abs_err, non_finite, seconds, error}.
 * A case that throws is recorded with its error; the caller (Python) applies the tolerance.
 */
export async function runFixture(ort, predict, fixture) {
  checkFixture(fixture);
  const results = [];
  for (const testCase of fixture.cases) {
    const record = { name: testCase.name, shape: testCase.shape, output_shape: null, max_abs_err: null, non_finite: 0, seconds: null, error: null };
    results.push(record);
    let got;
    const feeds = {};
    try {
      for (const name of INPUT_NAMES) feeds[name] = toTensor(ort, testCase.inputs[name], `case ${testCase.name}: input ${name}`);
      const started = performance.now();
      got = await predict(feeds);
      record.seconds = (performance.now() - started) / 1000;
    } catch (error) {
      record.error = `run failed: ${error && error.message ? error.message : error}`;
      continue;
    }
    const want = testCase.expected;
    record.output_shape = Array.from(got.dims, Number);
    if (got.type !== 'float32') {
      record.error = `output ${OUTPUT_NAME} has type ${got.type}, expected float32`;
    } else if (record.output_shape.join(',') !== want.shape.join(',')) {
      record.error = `output ${OUTPUT_NAME} has shape [${record.output_shape}], expected [${want.shape}]`;
    } else {
      Object.assign(record, maxAbsDiff(got.data, decodeArray(want, `case ${testCase.name}: expected`)));
    }
    if (typeof got.dispose === 'function') got.dispose();
  }
  return results;
}
