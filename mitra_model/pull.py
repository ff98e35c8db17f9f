"""Pull a published release into a local folder, trusting nothing the store says until checked.

Chain of trust: the pointer (`latest.json`) or, for an explicit version, the release record
(`_releases/<N>.json`) pins the manifest's SHA-256; the manifest pins every artifact's size and
SHA-256. Names from the store are only used as plain file names. A pointer older than the newest
release record is refused (a rolled-back or frozen pointer), and so is a release older than the
one already in DEST.

With trusted keys (`trusted_keys`: PEM public keys) the store itself is not trusted either; in this
order (TUF's attack list, see signing.py):
  1. the pointer's signature and expiry (`signing.verify_pointer`: unsigned, tampered, foreign-key
     and expired pointers are refused), then rollback: the newest release record and DEST's
     release must not be newer than the signed pointer;
  2. the manifest's SHA-256 against the signed pointer;
  3. the release signature (`release.sig`, pinned by the signed pointer) by a trusted key; an
     unsigned release is refused;
  4. before any download, manifest.json and every selected artifact's (file, SHA-256) must be what
     the release signature signs (arbitrary artifact, mix-and-match); after each download the
     actual SHA-256 again; then the whole set (every signed file, unless `artifacts` selects some);
  5. `release.sig` is written into the release folder, so that a complete pull verifies with the
     standard tool. DEST is a symlink, which the tool refuses as the folder unless told:
       model_signing verify key --public_key KEY.pub --signature DEST/release.sig --allow_symlinks DEST
     (or pass the folder it points to: "$(realpath DEST)").
An explicit version (`version=...`) is a choice, not a pointer to follow: its release record (which
pins the manifest and release.sig) replaces steps 1's pointer, so neither expiry nor rollback
applies; the release signature is still required and checked as above.

DEST is switched in one step, so it is always exactly one complete release (or the previous one):

    DEST -> .DEST.mitra/<version>-<n>        a symlink, replaced atomically (os.replace)
    .DEST.mitra/<version>-<n>/               the release: the selected artifacts + manifest.json
    .DEST.mitra/state.json                   bookkeeping (never inside the folder consumers read,
    .DEST.mitra/lock                         so a folder signature sees exactly the release)
    .DEST.mitra/.staging-*, .link-*          work in progress; removed by the next pull

A pull stages the release in `.staging-*` (artifacts already in DEST and unchanged are hard-linked,
the rest downloaded with boto3's managed transfer: parallel ranged GETs, one progress bar),
checks every file's size and SHA-256, renames the staging folder to `<version>-<n>`, records it in
the state, flips the symlink, then removes the old folder. The state remembers each verified
file's (size, mtime_ns, sha256), as huggingface_hub's cache does: a file whose size and mtime_ns
still match is trusted without re-hashing, so re-pulling what DEST holds costs two small GETs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)
from s3transfer.exceptions import RetriesExceededError
from s3transfer.subscribers import BaseSubscriber
from tqdm import tqdm

from . import layout
from .errors import (
    BadSignatureError,
    ChecksumMismatchError,
    MitraBuildError,
    OutputError,
    PublishError,
    PullError,
    UnsignedReleaseError,
)
from .fileutil import normal_permissions, sha256_file
from .layout import (
    LOCK_FILE,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_ID,
    POINTER_SCHEMA_ID,
    PULL_STATE_NAME,
    PULL_STATE_SCHEMA_ID,
    SIGNATURE_NAME,
    STATE_FILE,
)
from .release import (
    LATEST,
    Pointer,
    canonical_json,
    file_name_problem,
    is_synthetic,
    manifest_schema_errors,
    pointer_problems,
    segment_problem,
    sha256_bytes,
)
from .signing import (
    SignedContent,
    check_not_rolled_back,
    verify_pointer,
    verify_release_signature,
)
from .store import (
    StoreConfig,
    describe_client_error,
    is_not_found,
    list_objects,
    read_small_object,
    redact_secrets,
    store_errors,
)

_STAGING_PREFIX = ".staging-"
_LINK_PREFIX = ".link-"

# aws-cli's defaults (10 requests in flight, 8 MiB parts); 16 MiB parts halve the requests.
TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=10, use_threads=True
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
            (`signing.public_key_id`); None when the pull was not asked to verify signatures.
        downloaded_bytes: bytes fetched for artifacts by this call (0: nothing changed).
    """

    version: str
    manifest_version: int
    files: dict[str, Path]
    manifest_path: Path
    manifest_sha256: str
    synthetic: bool = False
    signed_by: str | None = None
    downloaded_bytes: int = field(default=0, compare=False)


# -- the pull state, beside DEST ----------------------------------------------------------------


class FileRecord(BaseModel):
    """A file verified into a release folder: trusted again while its size and mtime_ns match."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    size: StrictInt = Field(ge=0)
    mtime_ns: StrictInt
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ReleaseRecord(BaseModel):
    """One release folder under `.DEST.mitra/`: which release, and its verified files by name."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: str
    manifest_version: StrictInt = Field(ge=1)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: dict[str, FileRecord]


class PullState(BaseModel):
    """`.DEST.mitra/state.json`: the variant DEST is for, and a record per release folder."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    schema_: str = Field(alias="schema", default=PULL_STATE_SCHEMA_ID)
    variant: str
    releases: dict[str, ReleaseRecord]

    @field_validator("schema_")
    @classmethod
    def _known_schema(cls, value: str) -> str:
        if value != PULL_STATE_SCHEMA_ID:
            raise ValueError(f"schema is {value!r}, expected {PULL_STATE_SCHEMA_ID!r}")
        return value

    def dump(self) -> bytes:
        return canonical_json(self.model_dump(by_alias=True))


@dataclass(frozen=True)
class _Dest:
    """DEST and its bookkeeping folder."""

    path: Path  # as given: the paths we return are under it
    side: Path  # .<name>.mitra beside it

    @classmethod
    def of(cls, dest: Path) -> _Dest:
        dest = Path(dest)
        absolute = Path(os.path.abspath(dest))
        if absolute.name in ("", ".", ".."):
            raise OutputError(f"cannot pull into {dest}: name a folder, e.g. ./mitra")
        return cls(path=dest, side=absolute.with_name(layout.side_folder_name(absolute.name)))

    def link_target(self, folder: str) -> str:
        return f"{self.side.name}/{folder}"  # relative: DEST's parent can move

    def current(self) -> str | None:
        """The release folder DEST points to, or None when DEST does not exist yet.

        Raises:
            OutputError: DEST is something pull did not make (a file, a folder with files, a
                foreign symlink); the message says what to do.
        """
        path = self.path
        if path.is_symlink():
            target = os.readlink(path)
            prefix = f"{self.side.name}/"
            name = target[len(prefix):] if target.startswith(prefix) else ""
            if not name or "/" in name or name.startswith(".") or not (self.side / name).is_dir():
                raise OutputError(
                    f"cannot pull into {path}: it is a symlink to {target!r}, which mitra-build pull "
                    "did not make. Remove it, or pull into another path."
                )
            return name
        if not path.exists():
            if path.parent.exists() and not path.parent.is_dir():
                raise OutputError(
                    f"cannot pull into {path}: {path.parent} is a file, not a folder. Choose a "
                    "destination inside a writable folder (nothing was written)."
                )
            return None
        if path.is_dir():
            entries = sorted(p.name for p in path.iterdir())
            if not entries:
                return None  # an empty folder: replaced by the symlink, nothing is lost
            legacy = " (it was pulled by an older mitra-build)" if PULL_STATE_NAME in entries else ""
            raise OutputError(
                f"cannot pull into {path}: it is a folder with files{legacy}, and a pull replaces "
                "DEST as a whole. Pull into a new path, or delete the folder first (nothing was "
                "written)."
            )
        raise OutputError(
            f"cannot pull into {path}: it is a regular file, not a folder. Choose another --dest "
            "(nothing was written)."
        )


def _read_state(dest: _Dest) -> PullState | None:
    path = dest.side / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror}. Fix its permissions or delete it.") from None
    try:
        return PullState.model_validate_json(raw)
    except ValidationError as exc:
        raise PullError(
            f"{path} is damaged or from another mitra-build ({exc.error_count()} problems); delete "
            f"{dest.side} (and {dest.path}) to pull afresh"
        ) from None


def _write_state(dest: _Dest, state: PullState) -> None:
    final = dest.side / STATE_FILE
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".part", dir=dest.side)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(state.dump())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(dest: _Dest) -> Iterator[None]:
    """One pull at a time into a DEST (an flock, released by the kernel if the process dies)."""
    with open(dest.side / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Local:
    """What DEST holds now: its folder, and the record of it (None when unknown)."""

    folder: str | None
    record: ReleaseRecord | None

    def trusted(self, dest: _Dest, file: str, sha256: str) -> Path | None:
        """The path of `file` in DEST's folder when the state vouches for it (same sha256, same
        size and mtime_ns as when it was verified), else None. No hashing."""
        if self.folder is None or self.record is None:
            return None
        known = self.record.files.get(file)
        path = dest.side / self.folder / file
        if known is None or known.sha256 != sha256:
            return None
        try:
            st = path.stat(follow_symlinks=False)
        except OSError:
            return None
        return path if (st.st_size, st.st_mtime_ns) == (known.size, known.mtime_ns) else None


def _local(dest: _Dest, variant: str) -> tuple[_Local, PullState | None]:
    folder = dest.current()
    state = _read_state(dest) if dest.side.is_dir() else None
    if state is not None and state.variant != variant:
        raise PullError(f"{dest.path} already holds variant {state.variant!r}; pull {variant!r} into another folder")
    record = state.releases.get(folder) if (state is not None and folder is not None) else None
    if folder is not None and record is None:  # e.g. the state file was deleted: read the manifest
        record = _record_from_manifest(dest, folder, variant)
    return _Local(folder, record), state


def _record_from_manifest(dest: _Dest, folder: str, variant: str) -> ReleaseRecord | None:
    """What release a folder holds when the state has no record of it (no file is trusted)."""
    path = dest.side / folder / MANIFEST_NAME
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
        if doc.get("variant") != variant:
            raise PullError(f"{dest.path} holds variant {doc.get('variant')!r}; pull {variant!r} into another folder")
        return ReleaseRecord(version=doc["version"], manifest_version=doc["manifest_version"],
                             manifest_sha256=sha256_bytes(raw), files={})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # unreadable: treated as "nothing trusted there"; the pull replaces it


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
        trusted_keys: PEM public keys (`signing.load_trusted_keys`). Empty: signatures are not
            checked. Otherwise the pointer and the release must be signed by one of them, and
            every file must be what the release signature signs (see the module docstring);
            `release.sig` is then written into DEST too.

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
    target = _Dest.of(dest)
    local, _ = _local(target, variant)

    raw, pin = _fetch_pinned_manifest(client, store, variant, version, trusted=trusted, local=local)
    manifest = _checked_manifest(raw, pin, store)
    manifest_sha = sha256_bytes(raw)
    if version == LATEST and not trusted:  # with keys, checked against the signed pointer already
        _refuse_stale_pointer(client, store, variant, pin)
    _refuse_older_than_dest(target, local, manifest, manifest_sha)
    signature = _verified_signature(client, store, pin, trusted) if trusted else None
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
    if signature is not None:  # before any byte is downloaded: only what the publisher signed
        for artifact in wanted:
            signature.content.check_file(artifact["file"], artifact["sha256"])
    result = PullResult(
        version=manifest["version"],
        manifest_version=manifest["manifest_version"],
        files={a["name"]: target.path / a["file"] for a in wanted},
        manifest_path=target.path / MANIFEST_NAME,
        manifest_sha256=manifest_sha,
        synthetic=synthetic,
        signed_by=signature.content.key_id if signature is not None else None,
    )
    complete = artifacts is None
    if (same and all(local.trusted(target, a["file"], a["sha256"]) for a in wanted)
            and (signature is None or local.trusted(target, SIGNATURE_NAME, signature.sha256))):
        if signature is not None:
            signature.content.check_files(_taken(wanted, manifest_sha), complete=complete)
        _tidy_if_needed(target, local.folder)
        return result
    try:
        downloaded = _install(target, variant, raw, manifest, manifest_sha, wanted, client, store, progress,
                              signature=signature, complete=complete)
    except MitraBuildError:
        raise
    except OSError as exc:  # full disk, read-only folder, a file in the way
        raise _cannot_pull(target, exc) from None
    return dataclasses.replace(result, downloaded_bytes=downloaded)


def _cannot_pull(dest: _Dest, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    hint = ("free some space or pull onto another filesystem" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose a --dest in a folder you can write to")
    return OutputError(
        f"cannot pull into {dest.path}: {reason}{where}. {hint.capitalize()}; {dest.path} was left "
        "exactly as it was and no partial files were kept."
    )


# -- signatures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Signature:
    """A verified release signature: its bytes (written into DEST) and what it signs."""

    bundle: bytes
    sha256: str
    content: SignedContent


def _taken(wanted: list[dict[str, Any]], manifest_sha: str) -> dict[str, str]:
    """file name -> SHA-256 of what a pull puts into DEST's release folder (the manifest included)."""
    return {MANIFEST_NAME: manifest_sha, **{a["file"]: a["sha256"] for a in wanted}}


def _verified_pointer(
    client: Any, store: StoreConfig, variant: str, raw: bytes, trusted: tuple[bytes, ...], local: _Local
) -> dict[str, Any]:
    """The signed pointer's fields, after its signature, its expiry and rollback were checked."""
    pointer = verify_pointer(raw, trusted, datetime.now(UTC))
    # Imported here: the slim pull path does not load the publisher unless it verifies (publish
    # itself is light: boto3, pydantic and cryptography, which pull already needs).
    from .publish import newest_release_record

    try:
        newest = newest_release_record(client, store, variant, after=pointer.manifest_version)
    except PublishError as exc:  # e.g. the signed pointer names a record that does not exist
        raise PullError(f"{exc} Nothing was pulled.") from None
    check_not_rolled_back(
        pointer, newest, known_manifest_version=local.record.manifest_version if local.record else None
    )
    return pointer.model_dump(by_alias=True, exclude={"expires", "dsse", "key_id"})


def _verified_signature(client: Any, store: StoreConfig, pin: dict[str, Any], trusted: tuple[bytes, ...]) -> _Signature:
    """Read the release signature the (verified) pointer or release record pins, and verify it."""
    variant, version = pin["variant"], pin["version"]
    what = f"{variant} {version} (manifest_version {pin['manifest_version']})"
    key, pinned = pin.get("signature_key"), pin.get("signature_sha256")
    if key is None or pinned is None:
        raise UnsignedReleaseError(
            f"{what} is not signed (its release record names no {SIGNATURE_NAME}), and trusted keys "
            "are configured. Refusing it; nothing was pulled. The publisher must sign it (publish "
            "with a signing key, or `mitra-build revert` to a signed release); or pull without "
            "trusted keys to accept unsigned releases."
        )
    expected = layout.signature_key(store.prefix, variant, version)
    if key != expected:
        raise BadSignatureError(
            f"The release record of {what} names the signature {store.url(key)}, not "
            f"{store.url(expected)}: it was tampered with. Refusing it; nothing was pulled."
        )
    bundle = _read(client, store, key)
    if bundle is None:
        raise BadSignatureError(
            f"{store.url(key)}, the signature of {what}, does not exist: it was deleted from the "
            "store. Refusing the release; nothing was pulled. The publisher must restore it."
        )
    actual = sha256_bytes(bundle)
    if actual != pinned:
        raise BadSignatureError(
            f"{store.url(key)} has sha256 {actual}, but its release record pins {pinned}: the "
            "signature was replaced in the store. Refusing the release; nothing was pulled."
        )
    return _Signature(bundle=bundle, sha256=actual, content=verify_release_signature(bundle, trusted))


# -- checks -------------------------------------------------------------------------------------


def _refuse_stale_pointer(client: Any, store: StoreConfig, variant: str, pin: dict[str, Any]) -> None:
    """Refuse a pointer older than the release log (rolled back, or frozen at an old release).

    Release records are claimed consecutively, so a pointer is current iff record N+1 is absent:
    one HEAD, and no list permission needed. Only when it exists is the log listed, to name the
    newest record.
    """
    mv = pin["manifest_version"]
    if _head_exists(client, store, layout.release_record_key(store.prefix, variant, mv + 1)):
        newest = mv + 1
        with contextlib.suppress(MitraBuildError, ClientError):  # listing may not be allowed
            folder = layout.join_key(layout.variant_folder(store.prefix, variant), layout.RELEASES_DIR)
            numbers = [_record_number(o["Key"]) for o in list_objects(client, store, folder)]
            newest = max([n for n in numbers if n is not None] + [newest])
        raise PullError(
            f"{store.url(layout.pointer_key(store.prefix, variant))} names manifest_version {mv}, "
            f"but the release log already holds manifest_version {newest} "
            f"({store.url(layout.release_record_key(store.prefix, variant, newest))}): the pointer "
            "was rolled back or is frozen at an old release. Nothing was pulled. If a publish is "
            "running right now, retry in a minute; otherwise the store's pointer must be repaired "
            "(re-run the publish of the newest build)."
        )


def _record_number(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if name.endswith(".json") and stem.isdigit() else None


def _head_exists(client: Any, store: StoreConfig, key: str) -> bool:
    with store_errors(client, store, f"checking {store.url(key)}"):
        try:
            client.head_object(Bucket=store.bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return False
            raise PullError(f"Checking {store.url(key)} failed: {describe_client_error(exc, store, client)}") from exc
    return True


def _refuse_older_than_dest(dest: _Dest, local: _Local, manifest: dict[str, Any], manifest_sha: str) -> None:
    held = local.record
    if held is None:
        return
    mv = manifest["manifest_version"]
    if held.manifest_version > mv:
        raise PullError(
            f"{dest.path} already holds {manifest['variant']} manifest_version {held.manifest_version} "
            f"(version {held.version!r}); refusing to replace it with the older "
            f"manifest_version {mv} (version {manifest['version']!r}). Pull into an empty folder "
            "to get an older release."
        )
    if held.manifest_version == mv and held.manifest_sha256 != manifest_sha:
        raise PullError(
            f"{dest.path} holds a manifest_version {mv} with manifest sha256 "
            f"{held.manifest_sha256}, but the store's has {manifest_sha}: the store's "
            "history changed. Investigate before pulling into this folder."
        )


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


# -- the manifest -------------------------------------------------------------------------------


def _read(client: Any, store: StoreConfig, key: str) -> bytes | None:
    try:
        found = read_small_object(client, store, key)
    except FlexibleChecksumError as exc:
        raise ChecksumMismatchError(f"{store.url(key)} does not match the checksum the store keeps for it") from exc
    except ClientError as exc:
        raise PullError(f"Reading {store.url(key)} failed: {describe_client_error(exc, store, client)}") from exc
    except ValueError as exc:
        raise PullError(str(exc)) from exc
    return None if found is None else found[0]


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PullError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:  # e.g. 100 000 nested arrays: no document of ours nests more than a few
        raise PullError(
            f"{what} is nested too deeply to be one of mitra-build's documents; the store holds a "
            "damaged or hostile file. Nothing was pulled; republish the release."
        ) from None


def _checked_pointer(raw: bytes, what: str) -> dict[str, Any]:
    doc = _json(raw, what)
    if isinstance(doc, dict) and doc.get("schema") != POINTER_SCHEMA_ID:
        raise PullError(
            f"{what} has schema id {doc.get('schema')!r}; this mitra-build only reads "
            f"{POINTER_SCHEMA_ID!r}. Upgrade mitra-build to pull it."
        )
    if problems := pointer_problems(doc):
        raise PullError(f"{what} is not a valid pointer: " + "; ".join(problems))
    return Pointer.model_validate(doc).model_dump(by_alias=True)


def _fetch_pinned_manifest(
    client: Any, store: StoreConfig, variant: str, version: str, *, trusted: tuple[bytes, ...], local: _Local
) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes and the pointer / release record that pins their SHA-256 (with trusted
    keys, the pointer's fields are those it signs)."""
    if version == LATEST:
        pin_key = layout.pointer_key(store.prefix, variant)
        pin_raw = _read(client, store, pin_key)
        if pin_raw is None:
            raise PullError(f"No release of {variant!r} in {store.url(pin_key)}: nothing was published yet")
        if trusted:
            pin = _verified_pointer(client, store, variant, pin_raw, trusted, local)
        else:
            pin = _checked_pointer(pin_raw, f"Pointer {store.url(pin_key)}")
        manifest_key = layout.manifest_key(store.prefix, variant, pin["version"])
    else:
        manifest_key = layout.manifest_key(store.prefix, variant, version)
        pin_key = ""
        pin = {}
    if pin and (pin["variant"] != variant or pin["manifest_key"] != manifest_key):
        raise PullError(
            f"{store.url(pin_key)} names {pin['variant']!r} / {pin['manifest_key']!r}, expected "
            f"{variant!r} / {manifest_key!r}; refusing to follow it"
        )

    raw = _read(client, store, manifest_key)
    if raw is None:
        if pin:
            raise PullError(f"{store.url(pin_key)} names {store.url(manifest_key)}, which does not exist")
        raise PullError(f"{variant} version {version!r} not found: {store.url(manifest_key)} does not exist")

    if not pin:  # explicit version: its release record pins the manifest
        doc = _json(raw, store.url(manifest_key))
        mv = doc.get("manifest_version") if isinstance(doc, dict) else None
        if not isinstance(mv, int) or isinstance(mv, bool) or mv < 1:
            raise PullError(f"{store.url(manifest_key)} has no valid manifest_version")
        pin_key = layout.release_record_key(store.prefix, variant, mv)
        pin_raw = _read(client, store, pin_key)
        pin = _checked_pointer(pin_raw, f"Release record {store.url(pin_key)}") if pin_raw else {}
        if not pin or pin["manifest_key"] != manifest_key or pin["variant"] != variant:
            raise PullError(
                f"{variant} version {version!r} was never released ({store.url(pin_key)} does not "
                "name it); its publish did not finish. Re-run the publish or pull 'latest'."
            )

    actual = sha256_bytes(raw)
    if actual != pin["manifest_sha256"]:
        raise ChecksumMismatchError(
            f"{store.url(manifest_key)} has sha256 {actual}, but {store.url(pin_key)} pins "
            f"{pin['manifest_sha256']}: the manifest was modified in the store. Nothing was pulled."
        )
    return raw, pin


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str) or not key:
        return f"s3_key must be a non-empty string, got {key!r}"
    if key.startswith("/") or "\\" in key or (len(key) >= 2 and key[1] == ":"):
        return f"s3_key {key!r} is absolute or has a backslash or drive letter"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return f"s3_key {key!r} has an empty, '.' or '..' segment"
    return None


def _artifact_key_problem(key: str, store: StoreConfig, variant: str, file: str) -> str | None:
    """Why `key` is not `<prefix>/<variant>/<V>/<file>` for a safe version V.

    Any version, not only the manifest's own: a revert (`publish.revert_release`) is a new version
    whose manifest names the artifacts where the reverted-to version stored them. The SHA-256 the
    manifest pins (and, with trusted keys, the release signature) decide what the bytes must be.
    """
    folder = layout.variant_folder(store.prefix, variant) + "/"
    held_version = key[len(folder):].split("/")[0] if key.startswith(folder) else ""
    if segment_problem(held_version, "version") is None and key == layout.artifact_key(
        store.prefix, variant, held_version, file
    ):
        return None
    example = layout.artifact_key(store.prefix, variant, "VERSION", file)
    return f"s3_key {key!r} is not {example!r} (another variant, prefix or file name)"


def _checked_manifest(raw: bytes, pin: dict[str, Any], store: StoreConfig) -> dict[str, Any]:
    what = f"Manifest {store.url(pin['manifest_key'])}"
    doc = _json(raw, what)
    if not isinstance(doc, dict):
        raise PullError(f"{what} is not a JSON object")
    if doc.get("schema") != MANIFEST_SCHEMA_ID:
        raise PullError(
            f"{what} has schema id {doc.get('schema')!r}; this mitra-build only reads "
            f"{MANIFEST_SCHEMA_ID!r}. Upgrade mitra-build to pull it."
        )
    problems: list[str] = []
    artifacts = doc.get("artifacts") if isinstance(doc.get("artifacts"), list) else []
    for index, artifact in enumerate(artifacts):
        if not isinstance(artifact, dict):
            continue
        file = artifact.get("file")
        if problem := file_name_problem(file):
            problems.append(f"artifacts[{index}]: {problem}")
            continue
        if problem := _key_problem(artifact.get("s3_key")):
            problems.append(f"artifacts[{index}]: {problem}")
            continue
        if problem := _artifact_key_problem(artifact["s3_key"], store, pin["variant"], file):
            problems.append(f"artifacts[{index}]: {problem}")
    if problems:
        raise PullError(f"{what} names unsafe files; nothing was pulled:\n  - " + "\n  - ".join(problems))
    if errors := manifest_schema_errors(doc):
        raise PullError(f"{what} does not match the manifest schema:\n  - " + "\n  - ".join(errors))
    for field_name in ("variant", "version", "manifest_version"):
        if doc[field_name] != pin[field_name]:
            raise PullError(f"{what} says {field_name}={doc[field_name]!r}, but its pointer says {pin[field_name]!r}")
    names = [a["name"] for a in doc["artifacts"]]
    files = [a["file"] for a in doc["artifacts"]]
    if len(set(names)) != len(names) or len(set(files)) != len(files):
        raise PullError(f"{what} lists an artifact name or file twice")
    return doc


# -- staging and the switch ---------------------------------------------------------------------


def _install(
    dest: _Dest, variant: str, raw: bytes, manifest: dict[str, Any], manifest_sha: str,
    wanted: list[dict[str, Any]], client: Any, store: StoreConfig, progress: bool,
    *, signature: _Signature | None, complete: bool,
) -> int:
    """Stage `wanted` + the manifest (+ release.sig) beside DEST, verify, then switch DEST to it.
    Returns the bytes downloaded. On any failure DEST is unchanged and the staging work is removed."""
    created_side = not dest.side.exists()
    if dest.path.parent.exists() and not dest.path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(dest.path.parent))
    dest.side.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(dest):
            local, state = _local(dest, variant)  # again, under the lock: another pull may have finished
            _refuse_older_than_dest(dest, local, manifest, manifest_sha)
            _tidy(dest, keep=local.folder)
            staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=dest.side))
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
                records[MANIFEST_NAME] = _record(staging / MANIFEST_NAME, manifest_sha)
                if signature is not None:
                    records[SIGNATURE_NAME] = _record(staging / SIGNATURE_NAME, signature.sha256)
                folder = dest.side / _next_folder_name(dest, manifest["version"])
                os.rename(staging, folder)
                releases = {folder.name: ReleaseRecord(
                    version=manifest["version"], manifest_version=manifest["manifest_version"],
                    manifest_sha256=manifest_sha, files=records)}
                if local.folder is not None and local.record is not None:
                    releases[local.folder] = local.record  # until the flip, DEST still shows it
                _write_state(dest, PullState(variant=variant, releases=releases))
                _flip(dest, folder.name)
                flipped = True
            finally:
                if not flipped:
                    shutil.rmtree(staging, ignore_errors=True)
                    if folder is not None:
                        shutil.rmtree(folder, ignore_errors=True)
            # The pull is done; what follows only tidies up and is retried by the next pull.
            with contextlib.suppress(OSError):
                _write_state(dest, PullState(variant=variant, releases={folder.name: releases[folder.name]}))
            with contextlib.suppress(OSError):
                _tidy(dest, keep=folder.name)
    except BaseException:
        if created_side and not os.path.lexists(dest.path):
            shutil.rmtree(dest.side, ignore_errors=True)  # a failed first pull leaves nothing
        raise
    return downloaded


def _record(path: Path, sha256: str) -> FileRecord:
    st = path.stat()
    return FileRecord(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha256)


def _next_folder_name(dest: _Dest, version: str) -> str:
    taken = {p.name for p in dest.side.iterdir()}
    n = 1
    while f"{version}-{n}" in taken:
        n += 1
    return f"{version}-{n}"


def _flip(dest: _Dest, folder: str) -> None:
    """Point DEST at `folder` in one rename: a fresh symlink replaces the old one atomically."""
    link = dest.side / f"{_LINK_PREFIX}{os.getpid()}-{folder}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(dest.link_target(folder), link)
    try:
        if dest.path.is_dir() and not dest.path.is_symlink():
            dest.path.rmdir()  # an empty folder (checked by current()): nothing is lost
        os.replace(link, dest.path)
    except BaseException:
        with contextlib.suppress(OSError):
            link.unlink()
        raise


def _tidy(dest: _Dest, *, keep: str | None) -> None:
    """Remove every release folder but `keep`, and work left by killed pulls (caller holds the lock)."""
    for entry in dest.side.iterdir():
        if entry.name in (STATE_FILE, LOCK_FILE) or entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _tidy_if_needed(dest: _Dest, keep: str | None) -> None:
    """After a no-op pull: clean up what a killed pull left, only if there is something."""
    try:
        extra = [e for e in os.listdir(dest.side) if e not in (STATE_FILE, LOCK_FILE, keep)]
        if extra:
            with _locked(dest):
                if dest.current() == keep:
                    _tidy(dest, keep=keep)
    except (OSError, MitraBuildError):
        pass  # a read-only DEST still serves its release


def _stage(
    dest: _Dest, local: _Local, staging: Path, wanted: list[dict[str, Any]],
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
        records[artifact["file"]] = _record(target, artifact["sha256"])
    for artifact in to_fetch:  # sizes first: a replaced object is refused before any byte is fetched
        _check_stored_size(client, store, artifact)
    if to_fetch:
        _download_all(client, store, to_fetch, staging, progress=progress, content=content)
        for artifact in to_fetch:
            records[artifact["file"]] = _record(staging / artifact["file"], artifact["sha256"])
    return records, sum(a["size"] for a in to_fetch)


def _check_stored_size(client: Any, store: StoreConfig, artifact: dict[str, Any]) -> None:
    key, size = artifact["s3_key"], artifact["size"]
    with store_errors(client, store, f"checking {store.url(key)}"):
        try:
            head = client.head_object(Bucket=store.bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                raise PullError(f"{store.url(key)} listed in the manifest does not exist") from exc
            raise PullError(f"Checking {store.url(key)} failed: {describe_client_error(exc, store, client)}") from exc
    stored = int(head.get("ContentLength", -1))
    if stored != size:
        raise PullError(
            f"{store.url(key)} is {stored} bytes, the manifest says {size}: "
            "the object was replaced in the store. Nothing was pulled."
        )


class _Subscriber(BaseSubscriber):
    """Tells s3transfer the size (no extra HEAD; no byte past the manifest's size is requested),
    feeds the one progress bar, and starts hashing a file as soon as it is complete."""

    def __init__(self, size: int, bar: tqdm | None, lock: threading.Lock, on_complete: Any) -> None:
        self._size, self._bar, self._lock, self._on_complete = size, bar, lock, on_complete

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        self._on_complete(future)


def _download_all(
    client: Any, store: StoreConfig, artifacts: list[dict[str, Any]], staging: Path, *, progress: bool,
    content: SignedContent | None = None,
) -> None:
    """Download `artifacts` into `staging` with one transfer manager, then check each file's size
    and SHA-256 (hashing overlaps the downloads still running): against the release signature's
    `content` when given, and against the manifest."""
    total = sum(a["size"] for a in artifacts)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pull", leave=False) if progress else None
    lock = threading.Lock()
    # s3transfer runs done-callbacks after result() returns, so each file's hash job is handed over
    # through a future of its own.
    hashes: dict[str, Future[Future[str]]] = {a["file"]: Future() for a in artifacts}
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="mitra-pull-hash") as hasher:
        def hash_when_done(file: str) -> Any:
            def done(future: Any) -> None:
                try:
                    future.result()
                except BaseException as exc:  # noqa: BLE001 - reported by the caller's result()
                    hashes[file].set_exception(exc)
                    return
                hashes[file].set_result(hasher.submit(sha256_file, staging / file))
            return done

        try:
            with create_transfer_manager(client, TRANSFER_CONFIG) as manager:
                futures = [
                    (a, manager.download(store.bucket, a["s3_key"], str(staging / a["file"]),
                                         subscribers=[_Subscriber(a["size"], bar, lock, hash_when_done(a["file"]))]))
                    for a in artifacts
                ]
                for artifact, future in futures:
                    _transfer_result(client, store, artifact, future)
        finally:
            if bar is not None:
                bar.close()
        for artifact in artifacts:
            key, path = artifact["s3_key"], staging / artifact["file"]
            written = path.stat().st_size
            if written != artifact["size"]:
                raise PullError(f"{store.url(key)} gave {written} bytes, the manifest says {artifact['size']}")
            actual = hashes[artifact["file"]].result().result()
            if content is not None:
                content.check_file(artifact["file"], actual)
            if actual != artifact["sha256"]:
                raise ChecksumMismatchError(
                    f"{store.url(key)} has sha256 {actual}, the manifest pins {artifact['sha256']}: the "
                    "object was modified in the store. Nothing was pulled."
                )


def _transfer_result(client: Any, store: StoreConfig, artifact: dict[str, Any], future: Any) -> None:
    key = artifact["s3_key"]
    with store_errors(client, store, f"downloading {store.url(key)}"):
        try:
            future.result()
        except FlexibleChecksumError as exc:
            raise ChecksumMismatchError(f"{store.url(key)} does not match the checksum the store keeps for it") from exc
        except ClientError as exc:
            if is_not_found(exc):
                raise PullError(f"{store.url(key)} listed in the manifest does not exist") from exc
            if exc.response.get("Error", {}).get("Code") in ("AccessDenied", "403", "InvalidAccessKeyId",
                                                             "SignatureDoesNotMatch"):
                raise
            raise PullError(f"Downloading {store.url(key)} failed: {describe_client_error(exc, store, client)}") from exc
        except RetriesExceededError as exc:
            last = exc.last_exception
            if isinstance(last, (BotoCoreError, ClientError)):
                raise last from None  # store_errors names the endpoint and the fix
            raise PullError(
                f"Downloading {store.url(key)} failed after retries: {redact_secrets(str(last), client)}"
            ) from None
