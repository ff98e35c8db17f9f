"""Release signing keys (ECDSA P-256) and the DSSE envelopes both signatures use.

`generate_keypair` makes a pair; a `Signer` holds a private key loaded from a file or an
environment variable (never from configuration or a manifest; no message, log or repr ever shows a
key, its path's content or its password); consumers name trusted public keys by path, in
$MITRA_TRUSTED_KEYS or in the config. A DSSE envelope signs PAE(payloadType, payload) with
ECDSA-SHA256, the signature DER-encoded and base64'd; `verify_envelope` accepts a signature by any
trusted key and tells a tampered signature from a foreign key.

Verifying needs only `cryptography` (the base install); signing a release folder needs
`model-signing` (the [signing] extra), imported only when signing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mitra_model.errors import BadSignatureError, SigningKeyError, UnsignedReleaseError, UntrustedKeyError

SIGNING_KEY_ENV = "MITRA_SIGNING_KEY"  # the PEM itself, for CI secrets
SIGNING_KEY_PASSWORD_ENV = "MITRA_SIGNING_KEY_PASSWORD"  # optional, for an encrypted PEM


# -- keys ---------------------------------------------------------------------------------------


def _public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id_of(key: ec.EllipticCurvePublicKey) -> str:
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


def publickey_id_of(public_pem: bytes) -> str:
    """The id of a public key: SHA-256 (hex) of its SPKI PEM, as model_signing's bundles name it.

    Args:
        public_pem: a P-256 public key in PEM (SubjectPublicKeyInfo).

    Returns:
        64 lowercase hex digits.

    Raises:
        SigningKeyError: not a PEM P-256 public key.
    """
    return key_id_of(load_public_key(public_pem, "the public key"))


def load_public_key(pem: bytes, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        if b"PRIVATE KEY" in pem:
            raise SigningKeyError(f"{what} is a private key: pass the public half of the signing key pair "
                                  "(e.g. release-signing.pub)") from None
        if b"-----BEGIN PUBLIC KEY-----" in pem:
            raise SigningKeyError(f"{what} starts like a PEM public key but does not parse: it is truncated or "
                                  "damaged. Copy the whole file again (it ends with '-----END PUBLIC KEY-----').") from None
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
    return key_id_of(key.public_key())


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
        self.key_id = key_id_of(private_key.public_key())

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
REQUIRE_SIGNATURE_ENV = "MITRA_REQUIRE_SIGNATURE"  # "1": refuse any pull whose signature is not checked


def signature_required(environ: Mapping[str, str] | None = None) -> bool:
    """$MITRA_REQUIRE_SIGNATURE is set to 1 / true / yes."""
    env = os.environ if environ is None else environ
    return env.get(REQUIRE_SIGNATURE_ENV, "").strip().lower() in ("1", "true", "yes")


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
        load_public_key(pem, f"The trusted key {path}")
        keys.append(pem)
    return tuple(keys)


TrustedKey = str | os.PathLike[str] | bytes


def trusted_keys_from(keys: Sequence[TrustedKey] = (), environ: Mapping[str, str] | None = None) -> tuple[bytes, ...]:
    """The PEM bytes of the trusted keys an API caller passed, as paths or PEM bytes; with none passed,
    those $MITRA_TRUSTED_KEYS names (like the CLI).

    Raises:
        SigningKeyError: an entry is neither a readable public key file nor PEM public key bytes; the
            message says what was passed (a path, text, a private key) and what is expected.
    """
    if isinstance(keys, (str, bytes, os.PathLike)):
        keys = [keys]  # one key passed bare, not in a list
    if not keys:
        return load_trusted_keys(trusted_key_paths_from_env(environ))
    pems = []
    for number, key in enumerate(keys, 1):
        if isinstance(key, bytes):
            load_public_key(key, f"Trusted key #{number} (PEM bytes)")
            pems.append(key)
        elif isinstance(key, (str, os.PathLike)):
            if isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):
                raise SigningKeyError(f"Trusted key #{number} is PEM text in a str: pass it as bytes "
                                      "(pem.encode()) or pass the key file's path")
            pems += load_trusted_keys([Path(key).expanduser()])
        else:
            raise SigningKeyError(f"Trusted key #{number} is a {type(key).__name__}: pass a public key file's path "
                                  "(str or Path) or its PEM bytes")
    return tuple(pems)


# -- DSSE ---------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: the bytes actually signed.

    `DSSEv1 <len(type)> <type> <len(payload)> <payload>`, lengths in bytes, in decimal.
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def b64decode_field(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadSignatureError(f"{what} is not a base64 string; the signature was damaged or tampered with.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignatureError(f"{what} is not valid base64; the signature was damaged or tampered with.") from None


def trusted_keys_by_id(trusted_public_keys: Sequence[bytes], what: str) -> dict[str, ec.EllipticCurvePublicKey]:
    if not trusted_public_keys:
        raise SigningKeyError(
            f"No trusted public key was given to verify {what}. Pass the release signing public "
            "key (e.g. --trusted-key release-signing.pub)."
        )
    keys = {}
    for index, pem in enumerate(trusted_public_keys):
        key = load_public_key(pem, f"Trusted key #{index + 1}")
        keys[key_id_of(key)] = key
    return keys


def verify_envelope(
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
    payload = b64decode_field(envelope.get("payload"), f"The payload of {what}")
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
        der = b64decode_field(entry.get("sig"), f"A signature of {what}")
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
