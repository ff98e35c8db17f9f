#!/usr/bin/env node
// What a downstream JS bundle does with a mitra-build release: follow the variant's pointer in S3,
// verify the chain of SHA-256 digests, and run one prediction with onnxruntime-node.
//
//   cd consumers && node example-pull-latest.mjs --endpoint http://127.0.0.1:8333 --bucket mitra-build \
//       --prefix releases --variant mitra-classifier --artifact int8     # AWS_* credentials in the env
//   [--save DIR] keeps the verified file; [--trusted-key release-signing.pub] (repeatable) accepts
//   only releases signed by that key; --help prints the options.
//
// Chain of trust (as mitra_model/pull.py; the keys come from lib/layout.mjs, the mirror of
// mitra_model/layout.py):
//   <prefix>/<variant>/latest.json   {"schema": "mitra-build/pointer/v1", "variant", "version",
//                                     "manifest_key", "manifest_sha256", "manifest_version"}
//   manifest_key                     its SHA-256 must equal the pointer's manifest_sha256
//   manifest.artifacts[]             {name, file, size, sha256, s3_key, precision, flavour, ...}:
//                                    each downloaded file must have exactly that size and SHA-256.
// Nothing is trusted before it is checked; keys and file names from the store are validated.
// With --trusted-key (lib/signature.mjs, the WebCrypto mirror of mitra_model/signing.py): the
// pointer must carry a valid, unexpired signature by a trusted key (its signed fields are the ones
// used), the release signature it pins (<version>/release.sig, by sha256) must verify, and
// manifest.json and the artifact must be exactly what it signs (checked before and after the
// download). A refusal is one line on stderr and exit code 2. Like the Python puller, a pointer older
// than the release log (record manifest_version + 1 exists: rolled back, or frozen at an old
// release) is refused (exit 2). Without --trusted-key a signed release is still pulled, with a notice
// on stderr that its signature was not checked and "signature_checked": false in the JSON line.
// Prints one JSON line on stdout ({"verified": true, "synthetic": false, ..., "prediction": {...}});
// a release whose manifest says source.synthetic (random weights) is announced as SYNTHETIC on
// stderr and in that line. Errors go to stderr with exit code 1 (bad options and signature
// refusals: 2). The digests use WebCrypto (crypto.subtle), as a browser bundle would.

import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { GetObjectCommand, HeadObjectCommand, S3Client } from '@aws-sdk/client-s3';
import * as ort from 'onnxruntime-node';

import {
  MANIFEST_NAME, POINTER_SCHEMA_ID, READABLE_MANIFEST_SCHEMA_IDS, artifactKey, manifestKey, pointerKey, releaseRecordKey, signatureKey,
  variantFolder,
} from './lib/layout.mjs';
import { SignatureError, checkFile, verifyPointer, verifyReleaseSignature } from './lib/signature.mjs';

const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]*$/;

class ReleaseError extends Error {}

const USAGE = `usage: node example-pull-latest.mjs --bucket BUCKET [--prefix PREFIX] [--variant NAME]
                                [--artifact NAME] [--endpoint URL] [--region REGION] [--save DIR]
                                [--trusted-key PEM ...]

Pull the latest mitra-build release of a variant from S3, verify the pointer -> manifest -> artifact
SHA-256 chain, and run one prediction with onnxruntime-node. Credentials: the AWS SDK's default chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles ...).

  --bucket BUCKET     bucket the releases are published in (e.g. mitra-build)
  --prefix PREFIX     key prefix (e.g. releases; default: none)
  --variant NAME      variant (default: mitra-classifier)
  --artifact NAME     artifact name in the manifest (default: fp32; e.g. int8)
  --endpoint URL      S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)
  --region REGION     signing region (default: AWS_REGION or us-east-1)
  --save DIR          also write the verified artifact into DIR
  --trusted-key PEM   accept only a release signed by this public key (repeatable: any of them);
                      refusals exit 2
  -h, --help          show this help

example:
  node example-pull-latest.mjs --endpoint http://127.0.0.1:8333 --bucket mitra-build --prefix releases \\
      --variant mitra-classifier --artifact int8 --trusted-key release-signing.pub
`;

class UsageError extends Error {}

const subtle = globalThis.crypto?.subtle ?? (await import('node:crypto')).webcrypto.subtle;

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

async function getBytes(s3, bucket, key) {
  try {
    const response = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
    return await response.Body.transformToByteArray();
  } catch (error) {
    const status = error.$metadata?.httpStatusCode;
    if (error.name === 'NoSuchKey' || status === 404) throw new ReleaseError(`s3://${bucket}/${key} does not exist`);
    throw new ReleaseError(`GET s3://${bucket}/${key} failed: ${error.name}${status ? ` (HTTP ${status})` : ''}: ${error.message}`);
  }
}

async function exists(s3, bucket, key) {
  try {
    await s3.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
    return true;
  } catch (error) {
    if (error.name === 'NotFound' || error.name === 'NoSuchKey' || error.$metadata?.httpStatusCode === 404) return false;
    throw new ReleaseError(`HEAD s3://${bucket}/${key} failed: ${error.name}: ${error.message}`);
  }
}

/** The pointer must name the newest release: release records are claimed consecutively, so record
 * manifest_version + 1 existing means the pointer was rolled back (trust.refuse_stale_pointer). */
async function refuseStalePointer(s3, { bucket, prefix, variant }, pointer) {
  const next = releaseRecordKey(prefix, variant, pointer.manifest_version + 1);
  if (await exists(s3, bucket, next)) {
    throw new SignatureError('rollback', `${pointerKey(prefix, variant)} names manifest_version ${pointer.manifest_version}, but the release log already holds s3://${bucket}/${next}: the pointer was rolled back or is frozen at an old release. Nothing was pulled.`);
  }
}

function parseJson(bytes, what) {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (error) {
    throw new ReleaseError(`${what} is not valid JSON: ${error.message}`);
  }
}

/** Where a manifest may keep an artifact: `<prefix>/<variant>/<any safe version>/<file>` (a revert
 * names the files of the version it brings back, where they are stored). */
function isArtifactKey(key, prefix, variant, file) {
  const folder = `${variantFolder(prefix, variant)}/`;
  const version = typeof key === 'string' && key.startsWith(folder) ? key.slice(folder.length).split('/')[0] : '';
  return SAFE_NAME.test(version) && !version.includes('..') && key === artifactKey(prefix, variant, version, file);
}

/** With trusted keys: the release signature the verified pointer pins, verified (lib/signature.mjs). */
async function signedContent(s3, { bucket, prefix, variant }, pointer, trustedPems) {
  if (!pointer.signature_key) {
    throw new SignatureError('unsigned', `${variant} ${pointer.version} is not signed (its pointer names no release.sig), and trusted keys are given. Refusing it.`);
  }
  if (pointer.signature_key !== signatureKey(prefix, variant, pointer.version)) {
    throw new SignatureError('bad-signature', `the pointer names the signature ${pointer.signature_key}, not ${signatureKey(prefix, variant, pointer.version)}. Refusing it.`);
  }
  const bundle = await getBytes(s3, bucket, pointer.signature_key);
  const sha = await sha256Hex(bundle);
  if (sha !== pointer.signature_sha256) {
    throw new SignatureError('bad-signature', `${pointer.signature_key}: sha256 ${sha}, but the signed pointer pins ${pointer.signature_sha256}: replaced in the store. Refusing it.`);
  }
  return verifyReleaseSignature(bundle, trustedPems);
}

/** Pointer -> manifest (pinned by sha256) -> artifact bytes (pinned by size and sha256); with
 * trusted keys, the signed pointer and the release signature over all of them. */
async function pullVerified(s3, { bucket, prefix, variant, artifact: wanted }, trustedPems) {
  const pinKey = pointerKey(prefix, variant);
  const pointerBytes = await getBytes(s3, bucket, pinKey);
  // Signed: only the fields the signature covers are used; an unsigned or expired one is refused.
  const pointer = trustedPems.length ? await verifyPointer(pointerBytes, trustedPems) : parseJson(pointerBytes, pinKey);
  if (pointer.schema !== POINTER_SCHEMA_ID) throw new ReleaseError(`${pinKey}: schema ${JSON.stringify(pointer.schema)}, expected ${POINTER_SCHEMA_ID}`);
  if (pointer.variant !== variant || !SAFE_NAME.test(pointer.version ?? '')) throw new ReleaseError(`${pinKey}: bad variant/version ${pointer.variant}/${pointer.version}`);
  if (pointer.manifest_key !== manifestKey(prefix, variant, pointer.version)) throw new ReleaseError(`${pinKey}: unexpected manifest_key ${pointer.manifest_key}`);
  if (!Number.isInteger(pointer.manifest_version) || pointer.manifest_version < 1) throw new ReleaseError(`${pinKey}: bad manifest_version ${pointer.manifest_version}`);
  await refuseStalePointer(s3, { bucket, prefix, variant }, pointer);

  const manifestBytes = await getBytes(s3, bucket, pointer.manifest_key);
  const manifestSha = await sha256Hex(manifestBytes);
  if (manifestSha !== pointer.manifest_sha256) {
    throw new ReleaseError(`${pointer.manifest_key}: sha256 ${manifestSha}, but ${pinKey} pins ${pointer.manifest_sha256}`);
  }
  const signed = trustedPems.length ? await signedContent(s3, { bucket, prefix, variant }, pointer, trustedPems) : null;
  if (signed) checkFile(signed, MANIFEST_NAME, manifestSha);
  const manifest = parseJson(manifestBytes, pointer.manifest_key);
  if (!READABLE_MANIFEST_SCHEMA_IDS.includes(manifest.schema)) {
    throw new ReleaseError(`manifest schema ${JSON.stringify(manifest.schema)}, expected one of ${READABLE_MANIFEST_SCHEMA_IDS.join(', ')}`);
  }
  if (manifest.variant !== variant || manifest.version !== pointer.version || manifest.manifest_version !== pointer.manifest_version) {
    throw new ReleaseError(`the manifest (${manifest.variant} ${manifest.version} #${manifest.manifest_version}) is not the release the pointer names`);
  }

  const entry = (manifest.artifacts ?? []).find((a) => a.name === wanted);
  if (!entry) throw new ReleaseError(`release ${manifest.version} has no artifact ${JSON.stringify(wanted)} (has: ${(manifest.artifacts ?? []).map((a) => a.name).join(', ')})`);
  if (!SAFE_NAME.test(entry.file ?? '') || !isArtifactKey(entry.s3_key, prefix, variant, entry.file)) {
    throw new ReleaseError(`artifact ${wanted}: unsafe file ${JSON.stringify(entry.file)} or key ${JSON.stringify(entry.s3_key)}`);
  }
  if (signed) checkFile(signed, entry.file, entry.sha256); // before downloading: only what was signed
  const bytes = await getBytes(s3, bucket, entry.s3_key);
  if (bytes.length !== entry.size) throw new ReleaseError(`${entry.s3_key}: ${bytes.length} bytes, the manifest says ${entry.size}`);
  const sha = await sha256Hex(bytes);
  if (signed) checkFile(signed, entry.file, sha); // and what actually came
  if (sha !== entry.sha256) throw new ReleaseError(`${entry.s3_key}: sha256 ${sha}, the manifest says ${entry.sha256}`);
  return { pointer, manifest, manifestSha, entry, bytes, signedBy: signed ? signed.keyId : null };
}

/** A small deterministic table: 16 support rows, 4 query rows, 3 features. */
function toyTable(isClassifier) {
  let state = 12345;
  const next = () => { state = (state * 1103515245 + 12345) % 2147483648; return state / 2147483648 - 0.5; };
  const [support, query, features] = [16, 4, 3];
  const xs = Float32Array.from({ length: support * features }, next);
  const xq = Float32Array.from({ length: query * features }, next);
  const target = (i) => xs[i * features] + 0.5 * xs[i * features + 1];
  const y = isClassifier
    ? BigInt64Array.from({ length: support }, (_, i) => (target(i) > 0 ? 1n : 0n))
    : Float32Array.from({ length: support }, (_, i) => target(i));
  return {
    x_support: new ort.Tensor('float32', xs, [1, support, features]),
    y_support: new ort.Tensor(isClassifier ? 'int64' : 'float32', y, [1, support]),
    x_query: new ort.Tensor('float32', xq, [1, query, features]),
    padding_obs_support: new ort.Tensor('bool', new Uint8Array(support), [1, support]),
  };
}

async function predict(bytes, entry) {
  const labels = (entry.inputs ?? []).find((i) => i.name === 'y_support');
  const isClassifier = labels ? labels.dtype === 'int64' : true;
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ['cpu'], intraOpNumThreads: 1 });
  try {
    const output = (await session.run(toyTable(isClassifier))).output;
    const values = Array.from(output.data);
    if (!values.every(Number.isFinite)) throw new ReleaseError('the prediction holds NaN or inf');
    if (!isClassifier) return { task: 'regression', output_shape: output.dims, values };
    const classes = output.dims[2];
    const predicted = Array.from({ length: output.dims[1] }, (_, q) => {
      const logits = values.slice(q * classes, q * classes + 2); // the toy table has classes 0 and 1
      return logits[1] > logits[0] ? 1 : 0;
    });
    return { task: 'classification', output_shape: output.dims, predicted_class: predicted, logits: values };
  } finally {
    await session.release();
  }
}

function parseOptions(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        endpoint: { type: 'string', default: process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL },
        region: { type: 'string', default: process.env.AWS_REGION ?? 'us-east-1' },
        bucket: { type: 'string' },
        prefix: { type: 'string', default: '' },
        variant: { type: 'string', default: 'mitra-classifier' },
        artifact: { type: 'string', default: 'fp32' },
        save: { type: 'string' },
        'trusted-key': { type: 'string', multiple: true, default: [] },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
      allowPositionals: false,
    });
  } catch (error) {
    throw new UsageError(error.message); // unknown option, missing value: no stack trace
  }
  return parsed.values;
}

async function main() {
  const args = parseOptions(process.argv.slice(2));
  if (args.help) {
    process.stdout.write(USAGE);
    return;
  }
  if (!args.bucket) throw new UsageError('--bucket is required');
  const trustedPems = [];
  for (const path of args['trusted-key']) {
    try {
      trustedPems.push(await readFile(path));
    } catch (error) {
      throw new UsageError(`cannot read --trusted-key ${path}: ${error.code ?? error.message}`);
    }
  }
  const s3 = new S3Client({
    endpoint: args.endpoint, // undefined: AWS S3
    region: args.region,
    forcePathStyle: Boolean(args.endpoint), // SeaweedFS and most S3-compatible stores
    maxAttempts: 3,
  }); // credentials: the SDK's default chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles...)
  try {
    const release = await pullVerified(s3, { ...args, prefix: args.prefix.replace(/^\/+|\/+$/g, '') }, trustedPems);
    process.stderr.write(`verified ${args.variant} ${release.manifest.version} (manifest_version ${release.manifest.manifest_version}): `
      + `${release.entry.file} ${release.entry.size} bytes, sha256 ${release.entry.sha256}\n`);
    const signed = Boolean(release.pointer.signature_key);
    if (signed && !release.signedBy) {
      process.stderr.write(`notice: ${args.variant} ${release.manifest.version} is signed, but its signature was NOT checked: `
        + 'no trusted key was given. Check it with --trusted-key release-signing.pub.\n');
    }
    const synthetic = release.manifest.source?.synthetic === true;
    if (synthetic) {
      process.stderr.write(`SYNTHETIC release: ${args.variant} ${release.manifest.version} has RANDOM weights, `
        + 'not a trained checkpoint; its predictions mean nothing.\n');
    }
    if (args.save) {
      await mkdir(args.save, { recursive: true });
      await writeFile(join(args.save, release.entry.file), release.bytes);
    }
    const prediction = await predict(release.bytes, release.entry);
    process.stdout.write(`${JSON.stringify({
      verified: true,
      synthetic,
      variant: args.variant,
      version: release.manifest.version,
      manifest_version: release.manifest.manifest_version,
      manifest_sha256: release.manifestSha,
      signed,
      signature_checked: release.signedBy !== null,
      signed_by: release.signedBy,
      artifact: { name: release.entry.name, file: release.entry.file, size: release.entry.size, sha256: release.entry.sha256 },
      runtime: { name: 'onnxruntime-node', version: ort.env.versions.node },
      prediction,
    })}\n`);
  } finally {
    s3.destroy();
  }
}

main().catch((error) => {
  if (error instanceof SignatureError) {
    // A refusal, not a bug: one line, no stack trace (the message names what was refused and why).
    process.stderr.write(`error: refused: ${error.message.replace(/\s+/g, ' ')}\n`);
    process.exitCode = 2;
    return;
  }
  if (error instanceof UsageError) {
    process.stderr.write(`error: ${error.message}\n\n${USAGE}`);
    process.exitCode = 2;
    return;
  }
  process.stderr.write(`error: ${error instanceof ReleaseError ? error.message : error.stack || error}\n`);
  process.exitCode = 1;
});
