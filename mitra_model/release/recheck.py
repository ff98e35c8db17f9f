"""Re-checking a pulled folder without the network: every file it holds against its manifest's
SHA-256 (re-hashed), and, with a trusted key, against the release signature it carries.

A partial pull (`--artifact int8`) is checked as what it is: the artifacts present must be exactly
what the manifest (and the signature) say; the others are reported missing, not failed. The standard
`model_signing verify` refuses such a folder ("Missing files"), which is why this exists.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mitra_model.errors import ChecksumMismatchError, PullError
from mitra_model.fileutil import sha256_file
from mitra_model.release.layout import MANIFEST_NAME, SIGNATURE_NAME
from mitra_model.release.rules import sha256_bytes
from mitra_model.release.signature import verify_release_signature


@dataclass(frozen=True)
class FolderCheck:
    """What `check_release_folder` found (every present file matched, or it raised).

    Attributes:
        variant / version: the release the folder holds.
        present: artifact names whose files are in the folder, each re-hashed and matching.
        missing: artifact names of the manifest the folder does not hold (a partial pull).
        signed: the folder carries the release signature (`release.sig`).
        signed_by: the trusted key id the signature verified with; None when no key was given.
        synthetic: the manifest says the weights are SYNTHETIC.
    """

    variant: str
    version: str
    present: tuple[str, ...]
    missing: tuple[str, ...]
    signed: bool
    signed_by: str | None
    synthetic: bool


def check_release_folder(folder: Path, *, trusted_keys: Sequence[bytes] = ()) -> FolderCheck:
    """Re-hash every artifact file in `folder` against its manifest and, with trusted keys, check the
    manifest and those files against the release signature (a partial folder is fine). The release's
    documents (model card, report page) must all be there: every pull brings them.

    Raises:
        PullError: not a pulled release folder (no or unreadable manifest), or no artifact in it.
        ChecksumMismatchError: a file differs from what the manifest (or signature) says.
        SignatureError: with trusted keys, the signature is missing, untrusted or does not cover a file.
    """
    folder = Path(folder)
    try:
        raw = (folder / MANIFEST_NAME).read_bytes()
        manifest = json.loads(raw)
        artifacts = manifest["artifacts"]
    except FileNotFoundError:
        raise PullError(f"{folder} is not a pulled release: it has no {MANIFEST_NAME} (the folder `mitra-build "
                        "pull --dest` wrote)") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise PullError(f"{folder / MANIFEST_NAME} cannot be read as a release manifest: {exc}") from None
    present, missing, digests = [], [], {MANIFEST_NAME: sha256_bytes(raw)}
    for artifact in artifacts:
        path = folder / artifact["file"]
        if not path.exists():
            missing.append(artifact["name"])
            continue
        actual = sha256_file(path)
        if actual != artifact["sha256"]:
            raise ChecksumMismatchError(f"{path} has sha256 {actual}; the manifest says {artifact['sha256']}: the "
                                        "file changed after it was pulled. Pull the release again.")
        present.append(artifact["name"])
        digests[artifact["file"]] = actual
    if not present:
        raise PullError(f"{folder} holds none of its manifest's artifacts ({', '.join(missing)})")
    for document in manifest.get("documents") or []:  # every pull brings them: a missing one was removed
        path = folder / document["file"]
        actual = sha256_file(path) if path.exists() else None
        if actual != document["sha256"]:
            raise ChecksumMismatchError(f"{path} {'is missing' if actual is None else f'has sha256 {actual}'}; the "
                                        f"manifest says {document['sha256']}: the folder changed after it was pulled. "
                                        "Pull the release again.")
        digests[document["file"]] = actual
    signature = folder / SIGNATURE_NAME
    signed_by = None
    if trusted_keys:
        content = verify_release_signature(signature.read_bytes() if signature.exists() else None, trusted_keys)
        content.check_files(digests, complete=False)
        signed_by = content.key_id
    return FolderCheck(variant=str(manifest.get("variant", "")), version=str(manifest.get("version", "")),
                       present=tuple(present), missing=tuple(missing), signed=signature.exists(),
                       signed_by=signed_by, synthetic=bool(manifest.get("source", {}).get("synthetic")))
