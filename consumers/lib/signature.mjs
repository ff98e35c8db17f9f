// Verify mitra-build release signatures with WebCrypto: the JS mirror of the verifying half of
// mitra_model/signing.py (tests/test_signing.py runs it on signatures made in Python).
//
// A release signature (`<version>/release.sig`) is an OpenSSF model-signing Sigstore bundle: a DSSE
// envelope whose payload is an in-toto statement listing every file of the release folder with its
// SHA-256. A signed pointer (`latest.json`) carries its own DSSE envelope under "dsse" and an
// "expires" time. Both are ECDSA P-256 / SHA-256 over PAE(payloadType, payload).
//
// WebCrypto differences handled here: the signature is DER in the envelope but WebCrypto wants
// r||s (64 bytes); keys come as SPKI PEM. Plain ES module without imports: Node >= 20 and browsers.

export const IN_TOTO_PAYLOAD_TYPE = 'application/vnd.in-toto+json';
export const POINTER_PAYLOAD_TYPE = 'application/vnd.mitra-build.pointer+json';
export const BUNDLE_MEDIA_TYPE = 'application/vnd.dev.sigstore.bundle.v0.3+json';
export const MODEL_SIGNING_PREDICATE_TYPE = 'https://model_signing/signature/v1.0';
export const IN_TOTO_STATEMENT_TYPE = 'https://in-toto.io/Statement/v1';
export const POINTER_ENVELOPE_FIELD = 'dsse';

/** A refused signature. `code`: unsigned | untrusted-key | bad-signature | expired | not-signed | bad-key. */
export class SignatureError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'SignatureError';
    this.code = code;
  }
}

const subtle = globalThis.crypto.subtle;
const encoder = new TextEncoder();

function toBytes(data) {
  if (typeof data === 'string') return encoder.encode(data);
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  throw new TypeError('expected a string, Uint8Array or ArrayBuffer');
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

function b64decode(value, what) {
  if (typeof value !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(value) || value.length % 4 !== 0) {
    throw new SignatureError('bad-signature', `${what} is not valid base64: the signature was damaged or tampered with.`);
  }
  const binary = atob(value);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) out[i] = binary.charCodeAt(i);
  return out;
}

function b64encode(bytes) {
  let binary = '';
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** DSSE pre-authentication encoding: the bytes actually signed. Lengths in bytes, decimal. */
export function pae(payloadType, payload) {
  const type = encoder.encode(payloadType);
  const body = toBytes(payload);
  return concat(encoder.encode(`DSSEv1 ${type.length} `), type, encoder.encode(` ${body.length} `), body);
}

/** An ECDSA signature from DER (SEQUENCE { INTEGER r, INTEGER s }) to WebCrypto's r||s. */
export function derToRaw(der, size = 32) {
  const bad = () => new SignatureError('bad-signature', 'The signature is not a DER ECDSA signature: it was damaged or tampered with.');
  let offset = 0;
  const readLength = () => {
    let length = der[offset++];
    if (length & 0x80) {
      const count = length & 0x7f;
      if (count < 1 || count > 2) throw bad();
      length = 0;
      for (let i = 0; i < count; i += 1) length = (length << 8) | der[offset++];
    }
    return length;
  };
  if (der[offset++] !== 0x30) throw bad();
  if (readLength() !== der.length - offset) throw bad();
  const out = new Uint8Array(2 * size);
  for (let part = 0; part < 2; part += 1) {
    if (der[offset++] !== 0x02) throw bad();
    const length = readLength();
    let value = der.subarray(offset, offset + length);
    offset += length;
    while (value.length > size && value[0] === 0) value = value.subarray(1); // sign-padding zero
    if (value.length > size || value.length === 0) throw bad();
    out.set(value, part * size + size - value.length); // left-pad short integers
  }
  if (offset !== der.length) throw bad();
  return out;
}

function pemBody(pem) {
  const text = typeof pem === 'string' ? pem : new TextDecoder().decode(toBytes(pem));
  const match = text.match(/-----BEGIN PUBLIC KEY-----([\s\S]*?)-----END PUBLIC KEY-----/);
  if (!match) {
    throw new SignatureError('bad-key', "A trusted key is not a PEM public key (expected '-----BEGIN PUBLIC KEY-----'); pass the public half of the signing key pair.");
  }
  return b64decode(match[1].replace(/\s+/g, ''), 'The trusted public key');
}

/**
 * Import trusted P-256 public keys (SPKI PEM) for verifying.
 * Returns [{key, keyId}], keyId being SHA-256 of the key's canonical PEM (what the bundles name).
 */
export async function importTrustedKeys(pems) {
  if (!pems || pems.length === 0) {
    throw new SignatureError('bad-key', 'No trusted public key was given: pass the release signing public key.');
  }
  const keys = [];
  for (const pem of pems) {
    const spki = pemBody(pem);
    let key;
    try {
      key = await subtle.importKey('spki', spki, { name: 'ECDSA', namedCurve: 'P-256' }, true, ['verify']);
    } catch {
      throw new SignatureError('bad-key', 'A trusted key is not an ECDSA P-256 public key.');
    }
    // The canonical PEM as Python's cryptography writes it: 64-column base64 lines.
    const exported = b64encode(new Uint8Array(await subtle.exportKey('spki', key)));
    const lines = exported.match(/.{1,64}/g).join('\n');
    const canonical = `-----BEGIN PUBLIC KEY-----\n${lines}\n-----END PUBLIC KEY-----\n`;
    keys.push({ key, keyId: await sha256Hex(encoder.encode(canonical)) });
  }
  return keys;
}

async function verifyEnvelope(envelope, payloadType, trusted, hints, what) {
  if (!envelope || typeof envelope !== 'object') {
    throw new SignatureError('bad-signature', `${what} has no DSSE envelope; it was damaged or tampered with.`);
  }
  if (envelope.payloadType !== payloadType) {
    throw new SignatureError('bad-signature', `${what} has payload type ${JSON.stringify(envelope.payloadType)}, expected ${payloadType}.`);
  }
  const payload = b64decode(envelope.payload, `The payload of ${what}`);
  const signatures = envelope.signatures;
  if (!Array.isArray(signatures) || signatures.length === 0) {
    throw new SignatureError('unsigned', `${what} carries no signature. Refusing it.`);
  }
  const signed = pae(payloadType, payload);
  const named = new Set(hints.filter(Boolean));
  for (const entry of signatures) {
    if (!entry || typeof entry !== 'object') continue;
    if (typeof entry.keyid === 'string' && entry.keyid) named.add(entry.keyid);
    const raw = derToRaw(b64decode(entry.sig, `A signature of ${what}`));
    for (const { key, keyId } of trusted) {
      if (await subtle.verify({ name: 'ECDSA', hash: 'SHA-256' }, key, raw, signed)) {
        return { payload, keyId };
      }
    }
  }
  if (trusted.some(({ keyId }) => named.has(keyId))) {
    throw new SignatureError('bad-signature', `${what} names a trusted key but its signature does not verify: the signed content was modified after signing (tampered). Refusing it.`);
  }
  throw new SignatureError('untrusted-key', `${what} was signed by a key that is not trusted. Refusing it; if the publisher rotated its key, add the new public key to the trusted keys.`);
}

function parseJson(bytes, what) {
  try {
    return JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(toBytes(bytes)));
  } catch {
    throw new SignatureError('bad-signature', `${what} is not valid JSON: it was damaged or tampered with.`);
  }
}

/**
 * Verify a release signature (release.sig, a Sigstore bundle) against trusted PEM public keys.
 * Returns {files: {name: sha256}, keyId}: check every pulled file with `checkFile`.
 */
export async function verifyReleaseSignature(bundle, trustedPems) {
  const trusted = await importTrustedKeys(trustedPems);
  if (bundle === null || bundle === undefined || toBytes(bundle).length === 0) {
    throw new SignatureError('unsigned', 'The release has no signature (release.sig), and trusted keys are configured. Refusing it.');
  }
  const what = 'The release signature (release.sig)';
  const doc = parseJson(bundle, what);
  if (!doc || doc.mediaType !== BUNDLE_MEDIA_TYPE) {
    throw new SignatureError('bad-signature', `${what} is not a Sigstore bundle (${BUNDLE_MEDIA_TYPE}).`);
  }
  const hint = doc.verificationMaterial?.publicKey?.hint ?? '';
  const { payload, keyId } = await verifyEnvelope(doc.dsseEnvelope, IN_TOTO_PAYLOAD_TYPE, trusted, [hint], what);
  const statement = parseJson(payload, `${what}'s statement`);
  const bad = (problem) => new SignatureError('bad-signature', `${what} is signed but is not a model-signing v1.0 statement: ${problem}`);
  if (statement?._type !== IN_TOTO_STATEMENT_TYPE || statement.predicateType !== MODEL_SIGNING_PREDICATE_TYPE) throw bad('wrong statement or predicate type');
  const serialization = statement.predicate?.serialization ?? {};
  if (serialization.method !== 'files' || serialization.hash_type !== 'sha256') throw bad('expected per-file sha256');
  const files = {};
  const digests = [];
  for (const resource of statement.predicate.resources ?? []) {
    if (resource.algorithm !== 'sha256' || !/^[0-9a-f]{64}$/.test(resource.digest) || typeof resource.name !== 'string') throw bad('bad resource');
    if (Object.hasOwn(files, resource.name)) throw bad(`${resource.name} is listed twice`);
    files[resource.name] = resource.digest;
    digests.push(resource.digest);
  }
  const root = await sha256Hex(concat(...digests.map((d) => Uint8Array.from(d.match(/../g), (h) => parseInt(h, 16)))));
  if (!Array.isArray(statement.subject) || statement.subject.length !== 1 || statement.subject[0]?.digest?.sha256 !== root) {
    throw bad('the subject digest does not match the listed resources');
  }
  return { files, keyId };
}

/** Refuse a file unless the verified signed content covers this name with this SHA-256. */
export function checkFile(signed, name, sha256) {
  const expected = Object.hasOwn(signed.files, name) ? signed.files[name] : undefined;
  if (expected === undefined) {
    throw new SignatureError('not-signed', `${name} is not covered by the release signature. Refusing it.`);
  }
  if (expected !== sha256) {
    throw new SignatureError('not-signed', `${name} has sha256 ${sha256}, but the release signature signs ${expected}: not the file the publisher signed (replaced, or from another release).`);
  }
}

/** Verify a signed latest.json; refuses unsigned, tampered, untrusted and expired pointers. */
export async function verifyPointer(raw, trustedPems, now = new Date()) {
  const trusted = await importTrustedKeys(trustedPems);
  const what = 'The pointer (latest.json)';
  const outer = parseJson(raw, what);
  if (!outer || typeof outer !== 'object' || !(POINTER_ENVELOPE_FIELD in outer)) {
    throw new SignatureError('unsigned', `${what} is not signed, and trusted keys are configured. Refusing it.`);
  }
  const { payload, keyId } = await verifyEnvelope(outer[POINTER_ENVELOPE_FIELD], POINTER_PAYLOAD_TYPE, trusted, [], what);
  const signed = parseJson(payload, `${what}'s payload`);
  const readable = { ...outer };
  delete readable[POINTER_ENVELOPE_FIELD];
  const canonical = (value) => JSON.stringify(value, Object.keys(value).sort());
  if (canonical(signed) !== canonical(readable) || Object.keys(signed).some((k) => JSON.stringify(signed[k]) !== JSON.stringify(readable[k]))) {
    throw new SignatureError('bad-signature', `${what}'s readable fields differ from the fields it signs (tampered). Refusing it.`);
  }
  const expires = new Date(signed.expires);
  if (Number.isNaN(expires.getTime())) throw new SignatureError('bad-signature', `${what} has no valid expires.`);
  if (expires <= now) {
    throw new SignatureError('expired', `${what} expired at ${signed.expires}: the store may be frozen on an old release. Refusing it.`);
  }
  return { ...signed, keyId };
}
