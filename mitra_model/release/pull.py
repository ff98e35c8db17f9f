"""Pull a published release into a local folder, trusting nothing the store says until checked.

Three jobs, one module each: `trust` (the chain of trust: pointer or release record, manifest,
signatures, rollback), `local` (DEST and its bookkeeping, switched in one step) and `transfer`
(the downloads). This module runs them in order:

  1. resolve and verify what to pull (`trust`): with trusted keys, the pointer's signature and expiry,
     rollback, the release signature, and every selected file's (name, SHA-256) against what the
     release signature signs, before any byte is downloaded;
  2. stage it beside DEST (`local`): files DEST already holds and still match are hard-linked, the
     rest downloaded (`transfer`) and hashed; with a signature, the set is checked again and
     `release.sig` is written beside what it signs, so a complete pull verifies with the standard tool:
       model_signing verify key --public_key KEY.pub --signature DEST/release.sig --allow_symlinks DEST
  3. rename the staging folder, record it, flip DEST's symlink, remove the old folder.

Re-pulling what DEST holds verified downloads nothing and hashes nothing (two small GETs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitra_model.errors import (
    MitraBuildError,
    OutputError,
    PullError,
    UnsignedReleaseError,
)
from mitra_model.fileutil import normal_permissions
from mitra_model.release.keys import REQUIRE_SIGNATURE_ENV, TRUSTED_KEYS_ENV
from mitra_model.release.layout import (
    MANIFEST_NAME,
    POINTER_NAME,
    SIGNATURE_NAME,
)
from mitra_model.release.local import (
    STAGING_PREFIX,
    Dest,
    FileRecord,
    LocalRelease,
    PullState,
    ReleaseRecord,
    file_record,
    flip,
    locked,
    next_folder_name,
    read_local,
    refuse_older_than_dest,
    tidy,
    tidy_if_needed,
    write_state,
)
from mitra_model.release.rules import (
    LATEST,
    is_synthetic,
    segment_problem,
    sha256_bytes,
)
from mitra_model.release.signature import SignedContent, verify_release_signature
from mitra_model.release.store import (
    StoreConfig,
)
from mitra_model.release.transfer import check_stored_size, download_all
from mitra_model.release.trust import (
    VerifiedSignature,
    checked_manifest,
    fetch_pinned_manifest,
    refuse_stale_pointer,
    verified_signature,
)


@dataclass(frozen=True)
class PullResult:
    """A release pulled into DEST.

    Attributes:
        version / manifest_version: the release in DEST.
        files: artifact name (e.g. "fp32") -> DEST/<file>, verified (every selected artifact, plus
            those of the same release DEST already held).
        manifest_path: DEST/manifest.json, byte-identical to the published manifest.
        manifest_sha256: SHA-256 of that manifest (what the pointer pins).
        synthetic: the manifest says the weights are SYNTHETIC (random, not a real checkpoint).
        signed_by: id of the trusted key whose release signature every file was checked against
            (`keys.public_key_id`); None when the pull was not asked to verify signatures.
        signed: the release carries a signature (its pointer or release record pins one), whether
            or not this pull checked it.
        downloaded_bytes: bytes fetched for artifacts by this call (0: nothing changed).
        documents: the release's documents in DEST by file name (README.md: the model card,
            report.html: the report page), verified like the artifacts; empty for a release
            published without them.
    """

    version: str
    manifest_version: int
    files: dict[str, Path]
    manifest_path: Path
    manifest_sha256: str
    synthetic: bool = False
    signed_by: str | None = None
    signed: bool = False
    downloaded_bytes: int = field(default=0, compare=False)
    documents: dict[str, Path] = field(default_factory=dict)

    @property
    def signature_checked(self) -> bool:
        """Every file was checked against the release signature with a trusted key."""
        return self.signed_by is not None


# -- public entry point -------------------------------------------------------------------------


def pull_release(
    variant: str,
    *,
    version: str = LATEST,
    dest: Path,
    client: Any,
    store: StoreConfig,
    progress: bool = True,
    artifacts: Sequence[str] | None = None,
    refuse_synthetic: bool = False,
    trusted_keys: Sequence[bytes] = (),
    require_signature: bool = False,
    verify: bool = False,
) -> PullResult:
    """Download and verify one release of `variant` into `dest`, switching DEST in one step.

    Args:
        variant: e.g. "mitra-classifier".
        version: a version id, or "latest" to follow the variant's pointer.
        dest: the path consumers read (created as a symlink to a release folder beside it).
        client: a boto3 S3 client (`store.make_s3_client(store)`).
        store: bucket and prefix the release was published under.
        progress: one tqdm progress bar (stderr) for all the bytes to download.
        artifacts: names of the artifacts to pull (e.g. ["int8"]); None pulls them all. The
            manifest is always pulled and checked.
        refuse_synthetic: raise before downloading anything when the release is SYNTHETIC.
        trusted_keys: PEM public keys (`keys.load_trusted_keys`). Empty: signatures are not
            checked. Otherwise the pointer and the release must be signed by one of them, and
            every file must be what the release signature signs (see the module docstring);
            `release.sig` is then written into DEST too.
        require_signature: refuse to pull without a trusted key (UnsignedReleaseError), so a
            signature is never skipped by omission.
        verify: re-hash the files DEST already holds instead of trusting their recorded size and
            mtime; a file that changed is downloaded again.

    Returns:
        PullResult naming the verified files under `dest`. Pulling what `dest` already holds
        verified downloads nothing and hashes nothing.

    Raises:
        PullError: no such release, unknown or invalid pointer or manifest, unsafe file name or
            key, wrong size, unknown artifact name, a pointer older than the release log, a
            release older than the one in `dest`, or a refused SYNTHETIC release.
        ChecksumMismatchError: the manifest or an artifact does not have the pinned SHA-256.
        UnsignedReleaseError / UntrustedKeyError / BadSignatureError / NotSignedContentError /
            ExpiredPointerError / RollbackError: with `trusted_keys`, the pointer or the release
            is unsigned, signed by another key, tampered, names a file it does not sign, has
            expired, or is older than the release log or DEST (`signing` explains each).
        SigningKeyError: a trusted key is not a P-256 PEM public key.
        OutputError: `dest` cannot hold a release (a file, a foreign folder, read-only, full).
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    if problem := segment_problem(variant, "variant"):
        raise PullError(f"Cannot pull: {problem}")
    if version != LATEST and (problem := segment_problem(version, "version")):
        raise PullError(f"Cannot pull: {problem}")
    trusted = tuple(trusted_keys)
    if require_signature:
        require_trusted_keys(variant, trusted)
    target = Dest.of(dest)
    local, _ = read_local(target, variant)
    local = dataclasses.replace(local, rehash=verify)

    raw, pin = fetch_pinned_manifest(client, store, variant, version, trusted=trusted, local=local)
    manifest = checked_manifest(raw, pin, store)
    manifest_sha = sha256_bytes(raw)
    if version == LATEST and not trusted:  # with keys, checked against the signed pointer already
        refuse_stale_pointer(client, store, variant, pin)
    refuse_older_than_dest(target, local, manifest, manifest_sha)
    pinned_by = f"the signed pointer ({POINTER_NAME})" if version == LATEST else "its release record"
    signature = verified_signature(client, store, pin, trusted, pinned_by=pinned_by) if trusted else None
    if signature is not None:
        signature.content.check_file(MANIFEST_NAME, manifest_sha)
    synthetic = is_synthetic(manifest)
    if synthetic and refuse_synthetic:
        raise PullError(
            f"{variant} {manifest['version']} (manifest_version {manifest['manifest_version']}) is a "
            "SYNTHETIC release: its weights are random, not a trained checkpoint. Refused as asked "
            "(refuse_synthetic / --refuse-synthetic); nothing was downloaded. Publish a build of "
            "the real weights, or drop the flag to pull it anyway."
        )
    wanted = _select(manifest, artifacts)
    same = local.record is not None and local.record.manifest_sha256 == manifest_sha
    if same:  # keep what DEST already holds of this release: repeated single-artifact pulls add up
        wanted += [a for a in manifest["artifacts"]
                   if a not in wanted and local.trusted(target, a["file"], a["sha256"]) is not None]
    named = list(wanted)
    wanted += manifest.get("documents") or []  # whichever artifacts are pulled, the card and report come too
    if signature is not None:  # before any byte is downloaded: only what the publisher signed
        for artifact in wanted:
            signature.content.check_file(artifact["file"], artifact["sha256"])
    result = PullResult(
        version=manifest["version"],
        manifest_version=manifest["manifest_version"],
        files={a["name"]: target.path / a["file"] for a in named},
        documents=_documents_in(manifest, target.path),
        manifest_path=target.path / MANIFEST_NAME,
        manifest_sha256=manifest_sha,
        synthetic=synthetic,
        signed_by=signature.content.key_id if signature is not None else None,
        signed=bool(pin.get("signature_key")),
    )
    complete = artifacts is None
    if (same and all(local.trusted(target, a["file"], a["sha256"]) for a in wanted)
            and (signature is None or local.trusted(target, SIGNATURE_NAME, signature.sha256))):
        if signature is not None:
            signature.content.check_files(_taken(wanted, manifest_sha), complete=complete)
        tidy_if_needed(target, local.folder)
        return result
    try:
        downloaded = _install(target, variant, raw, manifest, manifest_sha, wanted, client, store, progress,
                              signature=signature, complete=complete, rehash=verify)
    except MitraBuildError:
        raise
    except OSError as exc:  # full disk, read-only folder, a file in the way
        raise _cannot_pull(target, exc) from None
    return dataclasses.replace(result, downloaded_bytes=downloaded)


def require_trusted_keys(variant: str, trusted: Sequence[bytes]) -> None:
    """Refuse a pull asked to check the signature (--require-signature) that has no key to check it with.

    Raises:
        UnsignedReleaseError: no trusted key.
    """
    if not trusted:
        raise UnsignedReleaseError(
            f"Cannot pull {variant}: a checked signature is required (--require-signature / "
            f"${REQUIRE_SIGNATURE_ENV}=1) but no trusted key was given. Pass --trusted-key KEY.pub (or set "
            f"${TRUSTED_KEYS_ENV}); nothing was downloaded.")


def verified_copy(dest: Path, variant: str, *, artifacts: Sequence[str] | None = None,
                  trusted_keys: Sequence[bytes] = (), rehash: bool = False) -> PullResult | None:
    """The release DEST holds, as its last pull verified it, without touching the store.

    Every wanted file must still have the size and mtime it had when verified (no hashing, like a
    no-op pull, unless `rehash`); with trusted keys, DEST's `release.sig` must verify and sign the manifest and every
    wanted file.

    Returns:
        The PullResult (downloaded_bytes 0), or None when DEST holds no verified copy of them.

    Raises:
        PullError: DEST holds another variant, or its release has no artifact of a wanted name.
        SignatureError: with trusted keys, DEST's signature is missing or refused.
    """
    target = Dest.of(dest)
    local, _ = read_local(target, variant)
    local = dataclasses.replace(local, rehash=rehash)
    if local.folder is None or local.record is None:
        return None
    folder = target.side / local.folder
    try:
        raw = (folder / MANIFEST_NAME).read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None
    if sha256_bytes(raw) != local.record.manifest_sha256:
        return None
    named = _select(manifest, artifacts)
    wanted = named + (manifest.get("documents") or [])
    if any(local.trusted(target, a["file"], a["sha256"]) is None for a in wanted):
        return None
    signed_by = None
    if trusted_keys:
        try:
            bundle = (folder / SIGNATURE_NAME).read_bytes()
        except OSError:
            bundle = None
        content = verify_release_signature(bundle, trusted_keys)
        content.check_files(_taken(wanted, local.record.manifest_sha256), complete=artifacts is None)
        signed_by = content.key_id
    return PullResult(
        version=local.record.version, manifest_version=local.record.manifest_version,
        files={a["name"]: target.path / a["file"] for a in named}, manifest_path=target.path / MANIFEST_NAME,
        documents=_documents_in(manifest, target.path),
        manifest_sha256=local.record.manifest_sha256, synthetic=is_synthetic(manifest), signed_by=signed_by,
        signed=(folder / SIGNATURE_NAME).exists() or signed_by is not None,
    )


def _cannot_pull(dest: Dest, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    hint = ("free some space or pull onto another filesystem" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose a --dest in a folder you can write to")
    return OutputError(
        f"cannot pull into {dest.path}: {reason}{where}. {hint.capitalize()}; {dest.path} was left "
        "exactly as it was and no partial files were kept."
    )


def _taken(wanted: list[dict[str, Any]], manifest_sha: str) -> dict[str, str]:
    """file name -> SHA-256 of what a pull puts into DEST's release folder (the manifest included)."""
    return {MANIFEST_NAME: manifest_sha, **{a["file"]: a["sha256"] for a in wanted}}


def _documents_in(manifest: dict[str, Any], folder: Path) -> dict[str, Path]:
    return {d["file"]: folder / d["file"] for d in manifest.get("documents") or []}


def _select(manifest: dict[str, Any], names: Sequence[str] | None) -> list[dict[str, Any]]:
    if names is None:
        return list(manifest["artifacts"])
    by_name = {a["name"]: a for a in manifest["artifacts"]}
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise PullError(
            f"{manifest['variant']} {manifest['version']} has no artifact "
            f"{', '.join(map(repr, unknown)) or '(none named)'}; it has: {', '.join(by_name)}. "
            "Pass one of those (--artifact NAME), or none to pull them all."
        )
    return [by_name[n] for n in dict.fromkeys(names)]


# -- staging and the switch ---------------------------------------------------------------------


def _install(
    dest: Dest, variant: str, raw: bytes, manifest: dict[str, Any], manifest_sha: str,
    wanted: list[dict[str, Any]], client: Any, store: StoreConfig, progress: bool,
    *, signature: VerifiedSignature | None, complete: bool, rehash: bool = False,
) -> int:
    """Stage `wanted` + the manifest (+ release.sig) beside DEST, verify, then switch DEST to it.
    Returns the bytes downloaded. On any failure DEST is unchanged and the staging work is removed."""
    created_side = not dest.side.exists()
    if dest.path.parent.exists() and not dest.path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(dest.path.parent))
    dest.side.mkdir(parents=True, exist_ok=True)
    try:
        with locked(dest):
            local, state = read_local(dest, variant)  # again, under the lock: another pull may have finished
            local = dataclasses.replace(local, rehash=rehash)
            refuse_older_than_dest(dest, local, manifest, manifest_sha)
            tidy(dest, keep=local.folder)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest.side))
            folder: Path | None = None
            flipped = False
            try:
                content = signature.content if signature is not None else None
                records, downloaded = _stage(dest, local, staging, wanted, client, store, progress, content)
                (staging / MANIFEST_NAME).write_bytes(raw)
                if signature is not None:
                    content_files = {**{n: r.sha256 for n, r in records.items()}, MANIFEST_NAME: manifest_sha}
                    signature.content.check_files(content_files, complete=complete)
                    # Beside what it signs, so the folder verifies with the standard tool.
                    (staging / SIGNATURE_NAME).write_bytes(signature.bundle)
                for entry in staging.iterdir():
                    normal_permissions(entry)  # mkdtemp/mkstemp are owner-only; releases are served to others
                normal_permissions(staging)
                records[MANIFEST_NAME] = file_record(staging / MANIFEST_NAME, manifest_sha)
                if signature is not None:
                    records[SIGNATURE_NAME] = file_record(staging / SIGNATURE_NAME, signature.sha256)
                folder = dest.side / next_folder_name(dest, manifest["version"])
                os.rename(staging, folder)
                releases = {folder.name: ReleaseRecord(
                    version=manifest["version"], manifest_version=manifest["manifest_version"],
                    manifest_sha256=manifest_sha, files=records)}
                if local.folder is not None and local.record is not None:
                    releases[local.folder] = local.record  # until the flip, DEST still shows it
                write_state(dest, PullState(variant=variant, releases=releases))
                flip(dest, folder.name)
                flipped = True
            finally:
                if not flipped:
                    shutil.rmtree(staging, ignore_errors=True)
                    if folder is not None:
                        shutil.rmtree(folder, ignore_errors=True)
            # The pull is done; what follows only tidies up and is retried by the next pull.
            with contextlib.suppress(OSError):
                write_state(dest, PullState(variant=variant, releases={folder.name: releases[folder.name]}))
            with contextlib.suppress(OSError):
                tidy(dest, keep=folder.name)
    except BaseException:
        if created_side and not os.path.lexists(dest.path):
            shutil.rmtree(dest.side, ignore_errors=True)  # a failed first pull leaves nothing
        raise
    return downloaded


def _stage(
    dest: Dest, local: LocalRelease, staging: Path, wanted: list[dict[str, Any]],
    client: Any, store: StoreConfig, progress: bool, content: SignedContent | None,
) -> tuple[dict[str, FileRecord], int]:
    """Fill `staging` with the wanted artifacts: hard links of trusted local files, downloads of
    the rest (each checked against `content`, the verified release signature, when given). Returns
    each file's record and the bytes downloaded."""
    records: dict[str, FileRecord] = {}
    to_fetch: list[dict[str, Any]] = []
    for artifact in wanted:
        source = local.trusted(dest, artifact["file"], artifact["sha256"])
        if source is None:
            to_fetch.append(artifact)
            continue
        target = staging / artifact["file"]
        try:
            os.link(source, target)  # same inode: same mtime_ns, so the record stays valid
        except OSError:
            shutil.copy2(source, target)
        records[artifact["file"]] = file_record(target, artifact["sha256"])
    for artifact in to_fetch:  # sizes first: a replaced object is refused before any byte is fetched
        check_stored_size(client, store, artifact)
    if to_fetch:
        download_all(client, store, to_fetch, staging, progress=progress, content=content)
        for artifact in to_fetch:
            records[artifact["file"]] = file_record(staging / artifact["file"], artifact["sha256"])
    return records, sum(a["size"] for a in to_fetch)
