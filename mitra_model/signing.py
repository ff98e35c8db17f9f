"""Signed releases: OpenSSF model signing for the release folder, a signed, expiring pointer.

Two signatures, one key (ECDSA P-256), both DSSE envelopes (PAE(payloadType, payload), signed with
ECDSA-SHA256, signature DER-encoded and base64'd):

1. The *release signature* `<version>/release.sig` is a Sigstore bundle exactly as the OpenSSF
   `model_signing` tool writes it (`model_signing sign key`): its DSSE payload is an in-toto
   statement whose predicate lists every file of the complete release folder (the artifacts and
   `manifest.json`) with its SHA-256. The statement also records `release.sig` and `.mitra-pull.json`
   as ignored paths, so a pulled folder verifies unchanged with the standard tool (DEST is a
   symlink to the release folder, which the tool follows only when told to):

       model_signing verify key --public_key KEY.pub --signature DEST/release.sig --allow_symlinks DEST

2. The *pointer signature* makes `latest.json` TUF's timestamp role: the pointer carries `expires`
   and a DSSE envelope (`"dsse"`) whose payload is the canonical JSON of every other field of the
   pointer. The readable fields stay beside the envelope so that tools which do not verify keep
   working; a verifying reader trusts only the payload and refuses a pointer whose readable fields
   differ from it. One object, so the compare-and-swap that moves the pointer also moves its
   signature (a separate `latest.json.sig` could be read half-updated).

What a verifying puller refuses, and with which error (TUF's attack list):
    unsigned release or pointer          UnsignedReleaseError
    signed by a key it does not trust    UntrustedKeyError
    tampered bundle or pointer           BadSignatureError
    arbitrary artifact, mix-and-match    NotSignedContentError  (`SignedContent.check_file`)
    indefinite freeze                    ExpiredPointerError    (`verify_pointer`)
    rollback                             RollbackError          (`check_not_rolled_back`)

Signing needs `model-signing` (and `pyopenssl` beside it), imported only when signing; verifying
needs only `cryptography`, so a consumer that only pulls does not need the signing toolchain.
Private keys are loaded from a file or an environment variable, never from configuration or a
manifest, and no message, log or repr ever shows a key, its path's content or its password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError, field_validator

from .errors import (
    BadSignatureError,
    ExpiredPointerError,
    NotSignedContentError,
    RollbackError,
    SigningKeyError,
    UnsignedReleaseError,
    UntrustedKeyError,
)
from .fileutil import sha256_file
from .layout import MANIFEST_NAME, PULL_STATE_NAME, SIGNATURE_NAME
from .release import (
    Pointer,
    canonical_json,
    file_name_problem,
    is_sha256_hex,
    pointer_problems,
)

# Not signed, so that the signature file (layout.SIGNATURE_NAME, re-exported here) and older pulls'
# bookkeeping can sit in the signed folder. The standard verifier reads this list from the signed
# statement itself.
UNSIGNED_NAMES: tuple[str, ...] = (SIGNATURE_NAME, PULL_STATE_NAME)

SIGNING_KEY_ENV = "MITRA_SIGNING_KEY"  # the PEM itself, for CI secrets
SIGNING_KEY_PASSWORD_ENV = "MITRA_SIGNING_KEY_PASSWORD"  # optional, for an encrypted PEM
DEFAULT_POINTER_TTL = timedelta(days=30)

POINTER_PAYLOAD_TYPE = "application/vnd.mitra-build.pointer+json"
POINTER_ENVELOPE_FIELD = "dsse"
# What model_signing 1.1 writes; checked so that another kind of statement is not mistaken for ours.
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MODEL_SIGNING_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
# Git paths the standard tool ignores by default; recorded like it records them.
_GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")


# -- keys ---------------------------------------------------------------------------------------


def _public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_id(key: ec.EllipticCurvePublicKey) -> str:
    # model_signing's key hint: SHA-256 of the SPKI PEM. Its verifier refuses a bundle whose hint
    # differs from the key it is given, so ours must be computed the same way.
    return hashlib.sha256(_public_pem(key)).hexdigest()


def _require_p256(key: Any, what: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise SigningKeyError(
            f"{what} is not an ECDSA P-256 (prime256v1) key. Release signing uses P-256 only; "
            "create a key pair with `generate_keypair` or `openssl ecparam -name prime256v1 "
            "-genkey -noout -out key.pem`."
        )


def public_key_id(public_pem: bytes) -> str:
    """The id of a public key: SHA-256 (hex) of its SPKI PEM, as model_signing's bundles name it.

    Args:
        public_pem: a P-256 public key in PEM (SubjectPublicKeyInfo).

    Returns:
        64 lowercase hex digits.

    Raises:
        SigningKeyError: not a PEM P-256 public key.
    """
    return _key_id(_load_public(public_pem, "the public key"))


def _load_public(pem: bytes, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"{what} is not a PEM public key (expected '-----BEGIN PUBLIC KEY-----'). Pass the "
            "public half of the signing key pair (e.g. release-signing.pub), not the private key."
        ) from exc
    _require_p256(key, what)
    return key  # type: ignore[return-value]


def generate_keypair(private_path: Path, public_path: Path, *, password: bytes | None = None) -> str:
    """Create a P-256 signing key pair as PEM files (the private one readable by its owner only).

    Args:
        private_path: where the private key goes (PKCS#8 PEM, mode 0600); must not exist.
        public_path: where the public key goes (SPKI PEM), e.g. "release-signing.pub".
        password: encrypt the private key with it (then pass the same to `Signer.from_file`).

    Returns:
        The public key's id (`public_key_id`).

    Raises:
        SigningKeyError: `private_path` already exists (a key is never overwritten).
    """
    private_path, public_path = Path(private_path), Path(public_path)
    key = ec.generate_private_key(ec.SECP256R1())
    encryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    try:
        # Created 0600 from the start (not chmod'ed later), so it is never readable by others.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningKeyError(
            f"{private_path} already exists; refusing to overwrite a signing key. Choose another "
            "path, or delete the old key deliberately first."
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(_public_pem(key.public_key()))
    return _key_id(key.public_key())


class Signer:
    """A loaded ECDSA P-256 private key that signs releases and pointers.

    Build one with `Signer.from_file` or `Signer.from_env`. Its repr shows only the key id.

    Attributes:
        key_id: SHA-256 (hex) of the public key's PEM, as recorded in the signatures.
    """

    __slots__ = ("_key", "key_id")

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        """Wrap an already loaded private key (prefer `from_file` / `from_env`)."""
        _require_p256(private_key, "The signing key")
        self._key = private_key
        self.key_id = _key_id(private_key.public_key())

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id[:16]}...)"

    def __reduce__(self) -> Any:  # never pickled into a Prefect result or a cache
        raise TypeError("a Signer holds a private key and cannot be pickled")

    @classmethod
    def from_pem(cls, pem: bytes, *, password: bytes | None = None, source: str = "the signing key") -> Signer:
        """Load a PEM private key from bytes.

        Args:
            pem: the PEM text (PKCS#8 or SEC1 "EC PRIVATE KEY").
            password: its password, when it is encrypted.
            source: how to name where it came from in an error (never the key itself).

        Raises:
            SigningKeyError: not a P-256 PEM private key, or a wrong or missing password.
        """
        try:
            key = serialization.load_pem_private_key(pem, password)
        except TypeError:  # password given for a plain key, or missing for an encrypted one
            raise SigningKeyError(
                f"{source} {'is not encrypted, but a password was given' if password else 'is encrypted'}: "
                f"set {SIGNING_KEY_PASSWORD_ENV} (or pass password=) exactly when the key has one."
            ) from None
        except ValueError:
            # `from None`: the parser's message could quote key material.
            raise SigningKeyError(
                f"{source} could not be loaded: it is not a PEM private key, or its password is "
                f"wrong. Check the key file (or {SIGNING_KEY_ENV}) and {SIGNING_KEY_PASSWORD_ENV}."
            ) from None
        _require_p256(key, source)
        return cls(key)  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: Path, *, password: bytes | None = None) -> Signer:
        """Load the private key from a PEM file.

        Args:
            path: the private key file (keep it mode 0600).
            password: its password, when it is encrypted.

        Raises:
            SigningKeyError: missing or unreadable file, not a P-256 key, or a wrong password.
        """
        path = Path(path)
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(
                f"Cannot read the signing key file {path}: {exc.strerror}. Pass the path of the "
                f"private key, or set {SIGNING_KEY_ENV} to the PEM instead."
            ) from None
        return cls.from_pem(pem, password=password, source=f"The signing key file {path}")

    @classmethod
    def from_env(
        cls,
        name: str = SIGNING_KEY_ENV,
        *,
        password_name: str = SIGNING_KEY_PASSWORD_ENV,
        environ: Mapping[str, str] | None = None,
    ) -> Signer:
        """Load the private key from an environment variable holding the PEM (a CI secret).

        Args:
            name: the variable holding the PEM text.
            password_name: the variable holding its password, if it is encrypted (may be unset).
            environ: where to read them (default: `os.environ`).

        Raises:
            SigningKeyError: the variable is unset or empty, or does not hold a P-256 PEM key.
        """
        env = os.environ if environ is None else environ
        pem = env.get(name, "")
        if not pem.strip():
            raise SigningKeyError(
                f"{name} is not set: it must hold the PEM text of the release signing key "
                "(not a path; for a file use Signer.from_file)."
            )
        password = env.get(password_name) or None
        return cls.from_pem(
            pem.encode("utf-8"),
            password=password.encode("utf-8") if password else None,
            source=f"The signing key in {name}",
        )

    def public_key_pem(self) -> bytes:
        """The public half, SPKI PEM: what consumers put in their trusted key set."""
        return _public_pem(self._key.public_key())

    def sign_dsse(self, payload_type: str, payload: bytes) -> dict[str, Any]:
        """A DSSE envelope over `payload`: {"payloadType", "payload", "signatures": [{keyid, sig}]}.

        Args:
            payload_type: the DSSE payload type (part of what is signed).
            payload: the bytes to sign.

        Returns:
            The envelope as a JSON-ready dict (base64 payload and DER signature).
        """
        signature = self._key.sign(pae(payload_type, payload), ec.ECDSA(hashes.SHA256()))
        return {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode("ascii"),
            "signatures": [{"keyid": self.key_id, "sig": base64.b64encode(signature).decode("ascii")}],
        }

    def _model_signing_signer(self) -> Any:
        """model_signing's own elliptic-key signer, holding this key (so the bundle is exactly its)."""
        from model_signing._signing import sign_ec_key  # heavy; only signers need it

        class _Loaded(sign_ec_key.Signer):
            # Its constructor only reads a PEM *file*; an env-var key must not touch the disk.
            def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
                self._private_key = key

        return _Loaded(self._key)


SIGNING_KEY_FILE_ENV = "MITRA_SIGNING_KEY_FILE"  # a path to the PEM, for a publisher's machine


def signer_from_environment(key_file: Path | None = None, *, environ: Mapping[str, str] | None = None) -> Signer | None:
    """The publisher's release signer, or None when no key is configured (releases go out unsigned).

    Looked up in order: `key_file`, the file named by $MITRA_SIGNING_KEY_FILE, the PEM in
    $MITRA_SIGNING_KEY (password, if any, in $MITRA_SIGNING_KEY_PASSWORD). Never from the build
    configuration or a manifest, which are shared and published.

    Raises:
        SigningKeyError: a key is named but cannot be loaded (the message never shows the key).
    """
    env = os.environ if environ is None else environ
    password = env.get(SIGNING_KEY_PASSWORD_ENV) or None
    path = key_file or (Path(env[SIGNING_KEY_FILE_ENV]) if env.get(SIGNING_KEY_FILE_ENV) else None)
    if path is not None:
        return Signer.from_file(Path(path), password=password.encode("utf-8") if password else None)
    if env.get(SIGNING_KEY_ENV, "").strip():
        return Signer.from_env(environ=env)
    return None


TRUSTED_KEYS_ENV = "MITRA_TRUSTED_KEYS"  # a consumer's public key files, separated by os.pathsep


def trusted_key_paths_from_env(environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The public key files named by $MITRA_TRUSTED_KEYS (separated by `os.pathsep`; empty parts skipped).

    Args:
        environ: where to read it (default: `os.environ`).

    Returns:
        The paths, in order (empty when the variable is unset or blank); read them with
        `load_trusted_keys`.
    """
    env = os.environ if environ is None else environ
    return tuple(Path(part).expanduser() for part in env.get(TRUSTED_KEYS_ENV, "").split(os.pathsep) if part.strip())


def load_trusted_keys(paths: Sequence[Path]) -> tuple[bytes, ...]:
    """Read a consumer's trusted public keys (PEM files), checking each is a P-256 public key.

    Args:
        paths: public key files, e.g. [Path("release-signing.pub")].

    Returns:
        Their PEM bytes, in order, for `verify_release_signature` / `verify_pointer`.

    Raises:
        SigningKeyError: a file is unreadable or not a P-256 public key.
    """
    keys = []
    for path in paths:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"Cannot read the trusted public key {path}: {exc.strerror}") from None
        _load_public(pem, f"The trusted key {path}")
        keys.append(pem)
    return tuple(keys)


# -- DSSE ---------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: the bytes actually signed.

    `DSSEv1 <len(type)> <type> <len(payload)> <payload>`, lengths in bytes, in decimal.
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def _b64decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadSignatureError(f"{what} is not a base64 string; the signature was damaged or tampered with.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignatureError(f"{what} is not valid base64; the signature was damaged or tampered with.") from None


def _trusted(trusted_public_keys: Sequence[bytes], what: str) -> dict[str, ec.EllipticCurvePublicKey]:
    if not trusted_public_keys:
        raise SigningKeyError(
            f"No trusted public key was given to verify {what}. Pass the release signing public "
            "key (e.g. --trusted-key release-signing.pub)."
        )
    keys = {}
    for index, pem in enumerate(trusted_public_keys):
        key = _load_public(pem, f"Trusted key #{index + 1}")
        keys[_key_id(key)] = key
    return keys


def _verify_envelope(
    envelope: Any,
    payload_type: str,
    trusted: dict[str, ec.EllipticCurvePublicKey],
    hints: Sequence[str],
    what: str,
) -> tuple[bytes, str]:
    """The envelope's payload and the id of the trusted key that signed it.

    A signature that verifies under any trusted key is enough. When none does, the key ids named by
    the envelope tell a tampered signature (names a trusted key) from a foreign key (names none).
    """
    if not isinstance(envelope, dict):
        raise BadSignatureError(f"{what} has no DSSE envelope; it was damaged or tampered with.")
    if envelope.get("payloadType") != payload_type:
        raise BadSignatureError(
            f"{what} has payload type {envelope.get('payloadType')!r}, expected {payload_type!r}: "
            "it is not the kind of signature expected here (tampered, or the wrong file)."
        )
    payload = _b64decode(envelope.get("payload"), f"The payload of {what}")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise UnsignedReleaseError(f"{what} carries no signature. Refusing it; re-sign the release.")
    signed = pae(payload_type, payload)
    named: set[str] = {h for h in hints if h}
    for entry in signatures:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("keyid"), str) and entry["keyid"]:
            named.add(entry["keyid"])
        der = _b64decode(entry.get("sig"), f"A signature of {what}")
        for key_id, key in trusted.items():
            try:
                key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            return payload, key_id
    if named & trusted.keys():
        raise BadSignatureError(
            f"{what} names a trusted key but its signature does not verify: the signed content was "
            "modified after signing (tampered). Refusing it; re-publish or re-sign from the source."
        )
    raise UntrustedKeyError(
        f"{what} was signed by a key that is not trusted (key id "
        f"{', '.join(sorted(k[:16] for k in named)) or 'unknown'}...; trusted: "
        f"{', '.join(k[:16] for k in trusted)}...). Refusing it. If the publisher rotated its key, "
        "add the new public key to the trusted keys."
    )


# -- the release signature (OpenSSF model signing) ----------------------------------------------


@dataclass(frozen=True)
class SignedContent:
    """What a verified release signature covers.

    Attributes:
        files: file name -> SHA-256 (hex) of every signed file of the release folder (the
            artifacts and manifest.json), read-only.
        key_id: id of the trusted key that signed it.
        name: the folder name recorded by the signer (informative only).
        ignored: paths the signature leaves out on purpose (release.sig, .mitra-pull.json, git).
    """

    files: Mapping[str, str]
    key_id: str
    name: str
    ignored: tuple[str, ...]

    def check_file(self, name: str, sha256: str) -> None:
        """Refuse a file unless the signature covers exactly this name with this SHA-256.

        Args:
            name: the file's name in the release folder, e.g. "model.onnx" or "manifest.json".
            sha256: its SHA-256 as downloaded (or as the manifest pins it, before downloading).

        Raises:
            NotSignedContentError: the name is not signed, or signed with another SHA-256
                (an arbitrary artifact, or one from another release: mix-and-match).
        """
        signed = self.files.get(name)
        if signed is None:
            raise NotSignedContentError(
                f"{name} is not covered by the release signature (it signs "
                f"{', '.join(sorted(self.files))}). Refusing it: the manifest or the store names "
                "a file the publisher never signed."
            )
        if signed != sha256:
            raise NotSignedContentError(
                f"{name} has sha256 {sha256}, but the release signature signs {signed}: the file "
                "is not the one the publisher signed (replaced in the store, or taken from another "
                "release). Nothing from it may be used; pull again from a trustworthy store."
            )

    def check_files(self, files: Mapping[str, str], *, complete: bool) -> None:
        """`check_file` for each entry; with `complete`, also refuse a signed file that is missing.

        Args:
            files: file name -> SHA-256 of what was (or will be) pulled.
            complete: True for a full pull (every signed file must be there); False for a partial
                pull (`--artifact`), which checks only the files it took plus manifest.json.

        Raises:
            NotSignedContentError: a file is not signed as is, or (complete) a signed file is absent.
        """
        for name, sha in sorted(files.items()):
            self.check_file(name, sha)
        if MANIFEST_NAME not in files:
            raise NotSignedContentError(
                f"{MANIFEST_NAME} was not checked against the release signature; every pull must "
                "check the manifest, which pins the artifacts."
            )
        if complete and (missing := sorted(set(self.files) - set(files))):
            raise NotSignedContentError(
                f"The release signature also signs {', '.join(missing)}, which this pull did not "
                "get: the manifest and the signature disagree about the release's files."
            )


def _release_payload(files: Mapping[str, str], name: str) -> Any:
    """model_signing's in-toto payload for a folder holding exactly `files` (name -> sha256)."""
    from model_signing import manifest as ms_manifest
    from model_signing._hashing import hashing as ms_hashing
    from model_signing._signing import signing as ms_signing

    problems = [p for f in files if (p := file_name_problem(f)) and f != MANIFEST_NAME]
    problems += [f"{f}: sha256 must be 64 lowercase hex digits" for f, s in files.items() if not is_sha256_hex(s)]
    if MANIFEST_NAME not in files:
        problems.append(f"{MANIFEST_NAME} is missing: a release signature covers the manifest")
    if problems:
        raise BadSignatureError("Cannot sign the release folder:\n  - " + "\n  - ".join(problems))
    serialization = ms_manifest._FileSerialization(
        "sha256", False, sorted([*UNSIGNED_NAMES, *_GIT_PATHS])
    )
    items = [
        ms_manifest.FileManifestItem(
            path=Path(file), digest=ms_hashing.Digest("sha256", bytes.fromhex(sha))
        )
        for file, sha in sorted(files.items())
    ]
    return ms_signing.Payload(ms_manifest.Manifest(name, items, serialization))


def sign_release_files(files: Mapping[str, str], signer: Signer, *, name: str) -> bytes:
    """Sign a release folder described by its files' digests (no folder needed).

    The bundle is the one `model_signing sign key` would write for a folder holding exactly these
    files (publish uses this: the artifacts are already hashed, and a revert has none locally).

    Args:
        files: file name -> SHA-256 hex; must include "manifest.json".
        signer: the release signing key.
        name: the folder's name to record (informative), e.g. the version.

    Returns:
        The Sigstore bundle JSON (UTF-8), to store as `release.sig`.

    Raises:
        BadSignatureError: a name is unsafe, a digest malformed, or manifest.json is missing.
    """
    signature = signer._model_signing_signer().sign(_release_payload(files, name))
    return signature.bundle.to_json().encode("utf-8")


def release_folder_files(folder: Path) -> dict[str, str]:
    """file name -> SHA-256 of every file a release signature covers in `folder`.

    Skips `release.sig`, `.mitra-pull.json` and git files, like the standard verifier does.

    Raises:
        BadSignatureError: the folder holds a subfolder or a symlink (a release folder is flat).
    """
    files = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name in UNSIGNED_NAMES or path.name in _GIT_PATHS:
            continue
        if path.is_symlink() or not path.is_file():
            raise BadSignatureError(
                f"{path} is not a plain file; a release folder holds only plain files. Remove it."
            )
        files[path.name] = sha256_file(path)
    return files


def sign_release_folder(folder: Path, signer: Signer) -> bytes:
    """Sign a complete release folder (artifacts + manifest.json) in OpenSSF model-signing format.

    Args:
        folder: the release folder, as a pull leaves it (release.sig and .mitra-pull.json, if
            there, are not signed).
        signer: the release signing key.

    Returns:
        The Sigstore bundle JSON (UTF-8). Saved as `folder/release.sig`, the folder verifies with
        `model_signing verify key --public_key KEY.pub --signature folder/release.sig folder`.

    Raises:
        BadSignatureError: the folder has no manifest.json, an unsafe name or a subfolder.
    """
    folder = Path(folder)
    return sign_release_files(release_folder_files(folder), signer, name=folder.resolve().name)


def verify_release_signature(bundle: bytes | None, trusted_public_keys: Sequence[bytes]) -> SignedContent:
    """Check a release signature (Sigstore bundle) and return what it signs.

    Args:
        bundle: the `release.sig` bytes; None or empty when the release has none.
        trusted_public_keys: PEM public keys; a signature by any one of them is accepted.

    Returns:
        SignedContent: the signed file name -> SHA-256 map, to check every pulled file against.

    Raises:
        UnsignedReleaseError: no bundle, or a bundle without a signature.
        UntrustedKeyError: signed by a key not in `trusted_public_keys`.
        BadSignatureError: the bundle is malformed or was modified after signing.
        SigningKeyError: no trusted key given, or one is not a P-256 public key.
    """
    trusted = _trusted(trusted_public_keys, "the release signature")
    if not bundle:
        raise UnsignedReleaseError(
            f"The release has no signature ({SIGNATURE_NAME}), and trusted keys are configured. "
            "Refusing it: ask the publisher to sign it (publish with a signing key, or revert to a "
            "signed release), or pull without trusted keys to accept unsigned releases."
        )
    what = f"The release signature ({SIGNATURE_NAME})"
    try:
        doc = json.loads(bundle.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSignatureError(f"{what} is not valid JSON: it was damaged or tampered with.") from None
    if not isinstance(doc, dict) or doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
        media = doc.get("mediaType") if isinstance(doc, dict) else None
        raise BadSignatureError(
            f"{what} has media type {media!r}, expected a Sigstore bundle {BUNDLE_MEDIA_TYPE!r}."
        )
    material = doc.get("verificationMaterial")
    hint = ""
    if isinstance(material, dict) and isinstance(material.get("publicKey"), dict):
        hint = material["publicKey"].get("hint") or ""
    payload, key_id = _verify_envelope(
        doc.get("dsseEnvelope"), IN_TOTO_PAYLOAD_TYPE, trusted, [hint] if isinstance(hint, str) else [], what
    )
    return _signed_content(payload, key_id, what)


def _signed_content(payload: bytes, key_id: str, what: str) -> SignedContent:
    """Parse model_signing's in-toto statement (after its signature was verified)."""
    def bad(problem: str) -> BadSignatureError:
        return BadSignatureError(f"{what} is signed but its statement is not a model-signing v1.0 statement: {problem}")

    try:
        statement = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not JSON") from None
    if not isinstance(statement, dict) or statement.get("_type") != IN_TOTO_STATEMENT_TYPE:
        raise bad("not an in-toto v1 statement")
    if statement.get("predicateType") != MODEL_SIGNING_PREDICATE_TYPE:
        raise bad(f"predicateType {statement.get('predicateType')!r}")
    predicate = statement.get("predicate") or {}
    serialization = predicate.get("serialization") or {}
    if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
        raise bad(f"serialization {serialization!r}; expected per-file sha256")
    files: dict[str, str] = {}
    root = hashlib.sha256()
    for resource in predicate.get("resources") or []:
        name, digest = resource.get("name"), resource.get("digest")
        if resource.get("algorithm") != "sha256" or not is_sha256_hex(digest) or not isinstance(name, str):
            raise bad(f"resource {resource!r}")
        if name in files:
            raise bad(f"{name} is listed twice")
        files[name] = digest
        root.update(bytes.fromhex(digest))
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise bad("expected exactly one subject")
    # The subject's digest is the SHA-256 over the resources' digests (what the standard tool checks).
    if (subjects[0].get("digest") or {}).get("sha256") != root.hexdigest():
        raise bad("the subject digest does not match the listed resources")
    ignored = serialization.get("ignore_paths") or []
    return SignedContent(
        files=MappingProxyType(files),
        key_id=key_id,
        name=str(subjects[0].get("name", "")),
        ignored=tuple(str(p) for p in ignored),
    )


# -- the signed pointer (TUF's timestamp role) --------------------------------------------------


RELEASE_SIGNATURE_FIELDS = ("signature_key", "signature_sha256")  # in a signed release's record
POINTER_ONLY_FIELDS = ("expires", POINTER_ENVELOPE_FIELD)  # in a signed pointer only


def record_problems(doc: Any) -> list[str]:
    """Why `doc` is not a valid release record or pointer, signed or not.

    `release.pointer_problems` checks the fields every record has; this also accepts (and checks)
    the signed release's `signature_key` / `signature_sha256` and the signed pointer's `expires`
    and envelope.

    Args:
        doc: a parsed record or pointer (any JSON value).

    Returns:
        One message per problem; empty when `doc` is valid.
    """
    if not isinstance(doc, dict):
        return [f"expected a JSON object, got {type(doc).__name__}"]
    extra = (*RELEASE_SIGNATURE_FIELDS, *POINTER_ONLY_FIELDS)
    problems = pointer_problems({k: v for k, v in doc.items() if k not in extra})
    key, sha = doc.get("signature_key"), doc.get("signature_sha256")
    if (key is None) != (sha is None):
        problems.append("signature_key and signature_sha256 go together")
    if key is not None and (not isinstance(key, str) or not key.endswith("/" + SIGNATURE_NAME)):
        problems.append(f"signature_key must be the key of a {SIGNATURE_NAME}, got {key!r}")
    if sha is not None and not is_sha256_hex(sha):
        problems.append("signature_sha256 must be 64 lowercase hex digits")
    if "expires" in doc and not isinstance(doc["expires"], str):
        problems.append("expires must be an ISO 8601 string")
    return problems


class SignedPointer(Pointer):
    """A verified `latest.json`: the release it names and until when that statement holds.

    The fields of `release.Pointer`, plus:

    Attributes:
        signature_key / signature_sha256: the release signature object and its SHA-256 (None for
            an unsigned release, which a consumer with trusted keys refuses).
        expires: after this (UTC) the pointer must not be trusted: a frozen store is refused.
        key_id: the trusted key that signed the pointer.
    """

    signature_key: str | None = None
    signature_sha256: str | None = None
    expires: datetime
    key_id: str = ""

    @field_validator("expires")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("expires must carry a time zone (UTC, e.g. 2026-12-31T00:00:00Z)")
        return value.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """UTC ISO 8601 with a 'Z', to the second: how `expires` is written."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sign_pointer(record: Mapping[str, Any], signer: Signer, *, expires: datetime) -> bytes:
    """The bytes of a signed `latest.json` naming the release of `record`.

    Args:
        record: the release record (pointer fields, and the signature's key and sha256 if any).
        signer: the signing key (the same that signs releases).
        expires: when consumers must stop trusting it (timezone-aware).

    Returns:
        Canonical JSON: the record's fields, `expires`, and `dsse`, an envelope whose payload is
        the canonical JSON of all other fields.

    Raises:
        BadSignatureError: `record` is not a valid pointer.
    """
    body = {k: v for k, v in record.items() if k not in POINTER_ONLY_FIELDS}
    if problems := record_problems(body):
        raise BadSignatureError("Cannot sign an invalid pointer: " + "; ".join(problems))
    if expires.tzinfo is None:
        raise BadSignatureError("Cannot sign a pointer: expires must be timezone-aware (UTC)")
    body["expires"] = format_time(expires)
    envelope = signer.sign_dsse(POINTER_PAYLOAD_TYPE, canonical_json(body))
    return canonical_json({**body, POINTER_ENVELOPE_FIELD: envelope})


def verify_pointer(raw_pointer: bytes, trusted_public_keys: Sequence[bytes], now: datetime) -> SignedPointer:
    """Check a `latest.json`'s signature and expiry; return the pointer it signs.

    Args:
        raw_pointer: the bytes of `latest.json` as read from the store.
        trusted_public_keys: PEM public keys; a signature by any one of them is accepted.
        now: the current time (timezone-aware), e.g. `datetime.now(timezone.utc)`.

    Returns:
        The SignedPointer (its fields come only from the signed payload).

    Raises:
        UnsignedReleaseError: the pointer carries no signature.
        UntrustedKeyError: signed by a key not in `trusted_public_keys`.
        BadSignatureError: malformed, or its readable fields differ from what was signed.
        ExpiredPointerError: `expires` has passed (the store may be frozen on an old release).
        SigningKeyError: no trusted key given.
    """
    trusted = _trusted(trusted_public_keys, "the pointer")
    what = "The pointer (latest.json)"
    try:
        outer = json.loads(raw_pointer.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSignatureError(f"{what} is not valid JSON: it was damaged or tampered with.") from None
    if not isinstance(outer, dict):
        raise BadSignatureError(f"{what} is not a JSON object.")
    if POINTER_ENVELOPE_FIELD not in outer:
        raise UnsignedReleaseError(
            f"{what} is not signed, and trusted keys are configured. Refusing it: the publisher must "
            "publish with a signing key or run refresh_pointer (the scheduled run) to sign it."
        )
    envelope = outer[POINTER_ENVELOPE_FIELD]
    payload, key_id = _verify_envelope(envelope, POINTER_PAYLOAD_TYPE, trusted, [], what)
    try:
        signed = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSignatureError(f"{what} signs a payload that is not JSON.") from None
    readable = {k: v for k, v in outer.items() if k != POINTER_ENVELOPE_FIELD}
    if signed != readable:
        raise BadSignatureError(
            f"{what}'s readable fields differ from the fields it signs: it was edited after "
            "signing (tampered). Refusing it."
        )
    if problems := record_problems(signed):
        raise BadSignatureError(f"{what} signs an invalid pointer: " + "; ".join(problems))
    try:
        pointer = SignedPointer.model_validate({**signed, "key_id": key_id})
    except ValidationError as exc:
        raise BadSignatureError(f"{what} signs an invalid pointer: {exc.errors()[0]['msg']}") from None
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(timezone.utc)")
    if pointer.expires <= now:
        raise ExpiredPointerError(
            f"{what} for {pointer.variant} expired at {format_time(pointer.expires)} (now "
            f"{format_time(now)}): the store may be frozen on an old release. Refusing it; the "
            "publisher's scheduled refresh_pointer must run (or check that this mirror is current)."
        )
    return pointer


def check_not_rolled_back(
    pointer: SignedPointer, newest_record: Mapping[str, Any] | None, *, known_manifest_version: int | None = None
) -> None:
    """Refuse a replayed, older pointer (TUF's rollback attack).

    Args:
        pointer: the verified pointer.
        newest_record: the newest release record in the store (`publish.newest_release_record`,
            walked from the pointer's manifest_version), or None.
        known_manifest_version: the newest manifest_version this consumer already holds (e.g. from
            DEST's pull state), if any.

    Raises:
        RollbackError: a newer release exists than the one the pointer names.
    """
    newest = newest_record.get("manifest_version") if newest_record else None
    if isinstance(newest, int) and newest > pointer.manifest_version:
        raise RollbackError(
            f"The pointer of {pointer.variant} names manifest_version {pointer.manifest_version} "
            f"(version {pointer.version!r}), but release record {newest} exists: this is an older "
            "pointer replayed (rollback), or a publish stopped before moving the pointer. Refusing "
            "it; the publisher must re-run the publish or refresh_pointer."
        )
    if known_manifest_version is not None and known_manifest_version > pointer.manifest_version:
        raise RollbackError(
            f"The pointer of {pointer.variant} names manifest_version {pointer.manifest_version}, "
            f"older than manifest_version {known_manifest_version} already pulled: rollback refused."
        )
