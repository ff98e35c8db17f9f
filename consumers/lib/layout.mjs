// Where a mitra-build release lives in S3: the JS mirror of mitra_model/layout.py (the source of
// truth; tests/test_layout.py checks that both give the same keys for the same inputs).
//
//   <prefix>/<variant>/<version>/<file>            artifacts
//   <prefix>/<variant>/<version>/manifest.json     the manifest
//   <prefix>/<variant>/<version>/release.sig       the release signature (signed releases)
//   <prefix>/<variant>/_releases/<NNNNNNNN>.json   release record of manifest_version N
//   <prefix>/<variant>/latest.json                 pointer to the newest release
//
// Plain ES module without imports: runs in Node.js and in a browser bundle.

export const MANIFEST_SCHEMA_ID = 'mitra-build/manifest/v2';
export const READABLE_MANIFEST_SCHEMA_IDS = ['mitra-build/manifest/v1', MANIFEST_SCHEMA_ID];
export const POINTER_SCHEMA_ID = 'mitra-build/pointer/v1';
export const MANIFEST_NAME = 'manifest.json';
export const POINTER_NAME = 'latest.json';
export const RELEASES_DIR = '_releases';
export const RESULTS_DIR = '_prefect-results';
export const PULL_STATE_SCHEMA_ID = 'mitra-build/pull-state/v2';
export const SIGNATURE_NAME = 'release.sig';
// A pull's bookkeeping beside DEST: .<DEST name>.mitra/ with state.json, lock and the release folders.
export const SIDE_SUFFIX = '.mitra';
export const STATE_FILE = 'state.json';
export const LOCK_FILE = 'lock';
export const PULL_STATE_NAME = '.mitra-pull.json'; // older pulls' state inside DEST: only recognised

const RELEASE_DIGITS = 8; // zero-padded, so that listing _releases/ sorts by manifest_version

/** Join key segments with '/', skipping empty ones (an empty prefix adds nothing). */
export function joinKey(...parts) {
  return parts.filter((part) => part).join('/');
}

export function variantFolder(prefix, variant) {
  return joinKey(prefix, variant);
}

export function versionFolder(prefix, variant, version) {
  return joinKey(prefix, variant, version);
}

/** `<prefix>/<variant>/<version>/<file>`: one file of a release. */
export function artifactKey(prefix, variant, version, file) {
  return joinKey(versionFolder(prefix, variant, version), file);
}

export function manifestKey(prefix, variant, version) {
  return artifactKey(prefix, variant, version, MANIFEST_NAME);
}

/** `<prefix>/<variant>/<version>/release.sig`: the release signature of a signed release. */
export function signatureKey(prefix, variant, version) {
  return artifactKey(prefix, variant, version, SIGNATURE_NAME);
}

/** DEST's bookkeeping folder beside it: `.<destName>.mitra`. */
export function sideFolderName(destName) {
  return `.${destName}${SIDE_SUFFIX}`;
}

export function pointerKey(prefix, variant) {
  return joinKey(variantFolder(prefix, variant), POINTER_NAME);
}

export function releaseRecordKey(prefix, variant, manifestVersion) {
  return joinKey(variantFolder(prefix, variant), RELEASES_DIR, `${String(manifestVersion).padStart(RELEASE_DIGITS, '0')}.json`);
}

export function resultsFolder(prefix) {
  return joinKey(prefix, RESULTS_DIR);
}
