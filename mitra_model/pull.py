"""Pull a published release into a local folder, trusting nothing the store says until checked.

Chain of trust: the pointer (`latest.json`) or, for an explicit version, the release record
(`_releases/<N>.json`) pins the manifest's SHA-256; the manifest pins every artifact's size and
SHA-256. Names from the store are only used as plain file names inside DEST.

DEST gets the artifact files, `manifest.json` (written last) and `.mitra-pull.json`, a small state
file remembering the release pulled there; a release older than that one is refused. Artifacts
are downloaded to temp files in DEST and only renamed into place once every one of them passed
its size and SHA-256 check, so a failed pull leaves DEST as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, FlexibleChecksumError
from tqdm import tqdm

from . import layout
from .errors import ChecksumMismatchError, PullError
from .fileutil import normal_permissions, sha256_file, write_bytes_atomic
from .layout import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_ID,
    POINTER_SCHEMA_ID,
    PULL_STATE_NAME,
    PULL_STATE_SCHEMA_ID,
    PULL_TEMP_PREFIX,
)
from .release import (
    LATEST,
    file_name_problem,
    manifest_schema_errors,
    pointer_problems,
    segment_problem,
    sha256_bytes,
)
from .store import StoreConfig, describe_client_error, is_not_found, read_small_object, store_errors

PROGRESS_MIN_BYTES = 8 << 20  # files smaller than this download without a progress bar
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PullResult:
    """A release pulled into DEST.

    Attributes:
        files: artifact name (e.g. "fp32") -> path of its verified file in DEST.
        manifest_path: DEST/manifest.json, byte-identical to the published manifest.
        manifest_sha256: SHA-256 of that manifest (what the pointer pins).
    """

    version: str
    manifest_version: int
    files: dict[str, Path]
    manifest_path: Path
    manifest_sha256: str


def pull_release(
    variant: str,
    *,
    version: str = LATEST,
    dest: Path,
    client: Any,
    store: StoreConfig,
    progress: bool = True,
) -> PullResult:
    """Download and verify one release of `variant` into `dest`.

    Args:
        variant: e.g. "mitra-classifier".
        version: a version id, or "latest" to follow the variant's pointer.
        dest: local folder (created if needed) that receives the files.
        client: a boto3 S3 client (`store.make_s3_client(store)`).
        store: bucket and prefix the release was published under.
        progress: show a tqdm progress bar for large files.

    Returns:
        PullResult naming the verified files.

    Raises:
        PullError: no such release, unknown or invalid manifest, unsafe file name or key, wrong
            size, or a release older than the one already in `dest`.
        ChecksumMismatchError: the manifest or an artifact does not have the pinned SHA-256.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    if problem := segment_problem(variant, "variant"):
        raise PullError(f"Cannot pull: {problem}")
    if version != LATEST and (problem := segment_problem(version, "version")):
        raise PullError(f"Cannot pull: {problem}")
    dest = Path(dest)
    state = _read_state(dest)
    if state is not None and state["variant"] != variant:
        raise PullError(
            f"{dest} already holds variant {state['variant']!r}; pull {variant!r} into another folder"
        )

    raw, pin = _fetch_pinned_manifest(client, store, variant, version)
    manifest = _checked_manifest(raw, pin, store)
    manifest_sha = sha256_bytes(raw)
    mv = manifest["manifest_version"]
    if state is not None:
        if state["manifest_version"] > mv:
            raise PullError(
                f"{dest} already holds {variant} manifest_version {state['manifest_version']} "
                f"(version {state['version']!r}); refusing to replace it with the older "
                f"manifest_version {mv} (version {manifest['version']!r}). Pull into an empty folder "
                "to get an older release."
            )
        if state["manifest_version"] == mv and state["manifest_sha256"] != manifest_sha:
            raise PullError(
                f"{dest} holds a manifest_version {mv} with manifest sha256 "
                f"{state['manifest_sha256']}, but the store's has {manifest_sha}: the store's "
                "history changed. Investigate before pulling into this folder."
            )

    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        files = _download_all(client, store, manifest, dest, progress=progress)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if still empty: it is, _download_all removed its temp files
        raise
    manifest_path = dest / MANIFEST_NAME
    write_bytes_atomic(manifest_path, raw)
    new_files = sorted(a["file"] for a in manifest["artifacts"])
    write_bytes_atomic(
        dest / PULL_STATE_NAME,
        (
            json.dumps(
                {
                    "schema": PULL_STATE_SCHEMA_ID,
                    "variant": variant,
                    "version": manifest["version"],
                    "manifest_version": mv,
                    "manifest_sha256": manifest_sha,
                    "files": new_files,
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        ).encode(),
    )
    if state is not None:  # files of the release this one replaced
        for old in set(state["files"]) - set(new_files):
            if file_name_problem(old) is None:
                (dest / old).unlink(missing_ok=True)
    return PullResult(
        version=manifest["version"],
        manifest_version=mv,
        files=files,
        manifest_path=manifest_path,
        manifest_sha256=manifest_sha,
    )


# -- state in DEST ------------------------------------------------------------------------------


def _read_state(dest: Path) -> dict[str, Any] | None:
    path = dest / PULL_STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PullError(f"{path} is damaged ({exc}); delete it (and the folder's files) to pull afresh") from exc
    ok = (
        isinstance(state, dict)
        and state.get("schema") == PULL_STATE_SCHEMA_ID
        and isinstance(state.get("variant"), str)
        and isinstance(state.get("version"), str)
        and isinstance(state.get("manifest_version"), int)
        and isinstance(state.get("manifest_sha256"), str)
        and isinstance(state.get("files"), list)
    )
    if not ok:
        raise PullError(f"{path} is not a pull state file this version understands; delete it to pull afresh")
    return state


# -- the manifest -------------------------------------------------------------------------------


def _read(client: Any, store: StoreConfig, key: str) -> bytes | None:
    try:
        found = read_small_object(client, store, key)
    except FlexibleChecksumError as exc:
        raise ChecksumMismatchError(f"{store.url(key)} does not match the checksum the store keeps for it") from exc
    except ClientError as exc:
        raise PullError(f"Reading {store.url(key)} failed: {describe_client_error(exc, store)}") from exc
    except ValueError as exc:
        raise PullError(str(exc)) from exc
    return None if found is None else found[0]


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PullError(f"{what} is not valid JSON: {exc}") from exc


def _checked_pointer(raw: bytes, what: str) -> dict[str, Any]:
    doc = _json(raw, what)
    if isinstance(doc, dict) and doc.get("schema") != POINTER_SCHEMA_ID:
        raise PullError(
            f"{what} has schema id {doc.get('schema')!r}; this mitra-build only reads "
            f"{POINTER_SCHEMA_ID!r}. Upgrade mitra-build to pull it."
        )
    if problems := pointer_problems(doc):
        raise PullError(f"{what} is not a valid pointer: " + "; ".join(problems))
    return doc


def _fetch_pinned_manifest(
    client: Any, store: StoreConfig, variant: str, version: str
) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes and the pointer / release record that pins their SHA-256."""
    if version == LATEST:
        pin_key = layout.pointer_key(store.prefix, variant)
        pin_raw = _read(client, store, pin_key)
        if pin_raw is None:
            raise PullError(f"No release of {variant!r} in {store.url(pin_key)}: nothing was published yet")
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
        expected = layout.artifact_key(store.prefix, pin["variant"], pin["version"], file)
        if artifact["s3_key"] != expected:
            problems.append(f"artifacts[{index}]: s3_key {artifact['s3_key']!r} is not {expected!r}")
    if problems:
        raise PullError(f"{what} names unsafe files; nothing was pulled:\n  - " + "\n  - ".join(problems))
    if errors := manifest_schema_errors(doc):
        raise PullError(f"{what} does not match the manifest schema:\n  - " + "\n  - ".join(errors))
    for field in ("variant", "version", "manifest_version"):
        if doc[field] != pin[field]:
            raise PullError(f"{what} says {field}={doc[field]!r}, but its pointer says {pin[field]!r}")
    names = [a["name"] for a in doc["artifacts"]]
    files = [a["file"] for a in doc["artifacts"]]
    if len(set(names)) != len(names) or len(set(files)) != len(files):
        raise PullError(f"{what} lists an artifact name or file twice")
    return doc


# -- artifacts ----------------------------------------------------------------------------------


def _already_there(path: Path, size: int, sha256: str) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256


def _download_all(
    client: Any, store: StoreConfig, manifest: dict[str, Any], dest: Path, *, progress: bool
) -> dict[str, Path]:
    """Download every artifact to a temp file, check them all, then rename them into place."""
    temps: dict[str, Path] = {}
    try:
        for artifact in manifest["artifacts"]:
            final = dest / artifact["file"]
            if _already_there(final, artifact["size"], artifact["sha256"]):
                continue
            temps[artifact["file"]] = _download(client, store, artifact, dest, progress=progress)
        for file, tmp in temps.items():
            normal_permissions(tmp)  # mkstemp made it owner-only; a pulled release is served to others
            os.replace(tmp, dest / file)
        temps.clear()
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return {a["name"]: dest / a["file"] for a in manifest["artifacts"]}


def _download(
    client: Any, store: StoreConfig, artifact: dict[str, Any], dest: Path, *, progress: bool
) -> Path:
    key, size, expected = artifact["s3_key"], artifact["size"], artifact["sha256"]
    fd, name = tempfile.mkstemp(prefix=PULL_TEMP_PREFIX, suffix=".part", dir=dest)
    tmp = Path(name)
    try:
        digest = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out, store_errors(client, store, f"downloading {store.url(key)}"):
            try:
                response = client.get_object(Bucket=store.bucket, Key=key)
            except ClientError as exc:
                if is_not_found(exc):
                    raise PullError(f"{store.url(key)} listed in the manifest does not exist") from exc
                raise PullError(
                    f"Downloading {store.url(key)} failed: {describe_client_error(exc, store)}"
                ) from exc
            body = response["Body"]
            bar = None
            try:
                stored_size = int(response.get("ContentLength", -1))
                if stored_size != size:
                    raise PullError(
                        f"{store.url(key)} is {stored_size} bytes, the manifest says {size}: "
                        "the object was replaced in the store. Nothing was pulled."
                    )
                if progress and size >= PROGRESS_MIN_BYTES:
                    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=artifact["file"], leave=False)
                for chunk in body.iter_chunks(_CHUNK):
                    written += len(chunk)
                    if written > size:
                        raise PullError(f"{store.url(key)} is longer than the {size} bytes the manifest says")
                    digest.update(chunk)
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            except FlexibleChecksumError as exc:
                raise ChecksumMismatchError(
                    f"{store.url(key)} does not match the checksum the store keeps for it"
                ) from exc
            finally:
                if bar is not None:
                    bar.close()
                body.close()
        if written != size:
            raise PullError(f"{store.url(key)} ended after {written} of {size} bytes")
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumMismatchError(
                f"{store.url(key)} has sha256 {actual}, the manifest pins {expected}: the object "
                "was modified in the store. Nothing was pulled."
            )
        return tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
