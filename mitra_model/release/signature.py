"""The release signature: OpenSSF model signing over the release folder.

`<version>/release.sig` is a Sigstore bundle exactly as the OpenSSF `model_signing` tool writes it
(`model_signing sign key`): its DSSE payload is an in-toto statement whose predicate lists every
file of the complete release folder (the artifacts and `manifest.json`) with its SHA-256. The
statement also records `release.sig` and `.mitra-pull.json` as ignored paths, so a pulled folder
verifies unchanged with the standard tool (DEST is a symlink to the release folder, which the tool
follows only when told to):

    model_signing verify key --public_key KEY.pub --signature DEST/release.sig --allow_symlinks DEST

A verified signature is a `SignedContent`: what it covers. `check_file` refuses an arbitrary
artifact or a mix-and-match across releases (NotSignedContentError).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mitra_model.errors import BadSignatureError, NotSignedContentError, StoreDocumentError, UnsignedReleaseError
from mitra_model.fileutil import sha256_file
from mitra_model.release.keys import Signer, trusted_keys_by_id, verify_envelope
from mitra_model.release.layout import MANIFEST_NAME, PULL_STATE_NAME, SIGNATURE_NAME
from mitra_model.release.objects import parse_json
from mitra_model.release.rules import file_name_problem, is_sha256_hex

# Not signed, so that the signature file (layout.SIGNATURE_NAME) and older pulls' bookkeeping can
# sit in the signed folder. The standard verifier reads this list from the signed statement itself.
UNSIGNED_NAMES: tuple[str, ...] = (SIGNATURE_NAME, PULL_STATE_NAME)
# What model_signing 1.1 writes; checked so that another kind of statement is not mistaken for ours.
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MODEL_SIGNING_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
# Git paths the standard tool ignores by default; recorded like it records them.
_GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")


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
    # deferred: signing needs the [signing] extra; verifying a signature does not
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
    trusted = trusted_keys_by_id(trusted_public_keys, "the release signature")
    if not bundle:
        raise UnsignedReleaseError(
            f"The release has no signature ({SIGNATURE_NAME}), and trusted keys are configured. "
            "Refusing it: ask the publisher to sign it (publish with a signing key, or revert to a "
            "signed release), or pull without trusted keys to accept unsigned releases."
        )
    what = f"The release signature ({SIGNATURE_NAME})"
    try:
        doc = parse_json(bundle, what)
    except StoreDocumentError as exc:
        raise BadSignatureError(f"{exc}: it was damaged or tampered with.") from None
    if not isinstance(doc, dict) or doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
        media = doc.get("mediaType") if isinstance(doc, dict) else None
        raise BadSignatureError(
            f"{what} has media type {media!r}, expected a Sigstore bundle {BUNDLE_MEDIA_TYPE!r}."
        )
    material = doc.get("verificationMaterial")
    hint = ""
    if isinstance(material, dict) and isinstance(material.get("publicKey"), dict):
        hint = material["publicKey"].get("hint") or ""
    payload, key_id = verify_envelope(
        doc.get("dsseEnvelope"), IN_TOTO_PAYLOAD_TYPE, trusted, [hint] if isinstance(hint, str) else [], what
    )
    return _signed_content(payload, key_id, what)


def _signed_content(payload: bytes, key_id: str, what: str) -> SignedContent:
    """Parse model_signing's in-toto statement (after its signature was verified)."""
    def bad(problem: str) -> BadSignatureError:
        return BadSignatureError(f"{what} is signed but its statement is not a model-signing v1.0 statement: {problem}")

    try:
        statement = parse_json(payload, "its statement")
    except StoreDocumentError as exc:
        raise bad(str(exc)) from None
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
