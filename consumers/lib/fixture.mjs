// Consumer fixtures, shared by node-check.mjs (onnxruntime-node) and browser/check.mjs
// (onnxruntime-web): decode the inputs, run every case through a session of the consumer I/O
// contract, and measure the output against what Python ONNX Runtime computed.
//
// Fixture format (written by mitra_model/consumers.py `write_fixture`), one JSON document:
//   {"schema": "mitra-build/consumer-fixture/v1", "model_sha256", "task", "cases": [
//     {"name", "shape": [B, S, Q, F], "data", "padded_support_rows",
//      "inputs": {<name>: TENSOR, ...}, "expected": TENSOR}]}
//   TENSOR = {"dtype": "float32" | "int64" | "bool", "shape": [...], "data": base64 of the
//             little-endian bytes (bool: one byte per element, 0 or 1)}
// Plain ES module, no Node.js or DOM API beyond atob / performance: runs in both.

export const FIXTURE_SCHEMA = 'mitra-build/consumer-fixture/v1';
export const INPUT_NAMES = ['x_support', 'y_support', 'x_query', 'padding_obs_support'];
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

/** The session must expose exactly the consumer I/O contract's names. */
export function checkContract(session) {
  const inputs = [...session.inputNames].sort().join(',');
  const outputs = [...session.outputNames].join(',');
  if (inputs !== [...INPUT_NAMES].sort().join(',') || outputs !== OUTPUT_NAME) {
    throw new Error(`the model's inputs [${session.inputNames}] / outputs [${session.outputNames}] are not the consumer I/O contract ` +
      `(inputs [${INPUT_NAMES}], output [${OUTPUT_NAME}])`);
  }
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
 * Run every case of `fixture` through `session` (an InferenceSession of onnxruntime-node or -web).
 * Returns one record per case: {name, shape, output_shape, max_abs_err, non_finite, seconds, error}.
 * A case that throws is recorded with its error; the caller (Python) applies the tolerance.
 */
export async function runFixture(ort, session, fixture) {
  checkFixture(fixture);
  checkContract(session);
  const results = [];
  for (const testCase of fixture.cases) {
    const record = { name: testCase.name, shape: testCase.shape, output_shape: null, max_abs_err: null, non_finite: 0, seconds: null, error: null };
    results.push(record);
    let outputs;
    const feeds = {};
    try {
      for (const name of INPUT_NAMES) feeds[name] = toTensor(ort, testCase.inputs[name], `case ${testCase.name}: input ${name}`);
      const started = performance.now();
      outputs = await session.run(feeds);
      record.seconds = (performance.now() - started) / 1000;
    } catch (error) {
      record.error = `run failed: ${error && error.message ? error.message : error}`;
      continue;
    }
    const got = outputs[OUTPUT_NAME];
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
