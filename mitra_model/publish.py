"""Publish a verified build to S3 so that consumers only ever see complete releases.

Where things go is `layout.py`; what the pointer and release records hold is `release.py`.
Artifacts are created with If-None-Match: *, the manifest is immutable once released, a release
record `_releases/<N>.json` (also immutable) is the commit point, and the pointer `latest.json`
moves by compare-and-swap and never goes back.

Order of writes: artifacts -> manifest -> release record -> pointer. Consumers only follow the
pointer (or, for an explicit version, the release record), and each is written after everything it
names exists and was re-checked, so a crash at any point leaves the old complete release visible;
re-running `publish_build` finishes the job.

Why release records: `manifest_version` is the release's sequence number and goes *inside* the
manifest (with `previous_manifest_sha256`), so it must be chosen before the manifest is written.
Creating `_releases/<N>.json` with If-None-Match is an atomic "claim" of N: of two racing
publishers exactly one gets it; the loser's manifest was never released (no record names it), so
it may be rewritten (compare-and-swap on its ETag) with N+1 and the loser tries again. A manifest
named by a release record is never rewritten, so its SHA-256 can be pinned downstream.

Republishing a version that was already released is a no-op (nothing uploaded). If that release is
no longer the latest, the pointer stays where it is: publishing never rolls a variant back.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, FlexibleChecksumError

from . import layout
from .errors import PublishError, VersionConflictError
from .fileutil import sha256_file
from .layout import MANIFEST_NAME, MANIFEST_SCHEMA_ID
from .release import (
    LATEST,
    MANIFEST_SCHEMA_PATH,
    canonical_json,
    file_name_problem,
    is_sha256_hex,
    manifest_schema_errors,
    pointer_doc,
    pointer_problems,
    segment_problem,
    sha256_bytes,
)
from .store import (
    StoreConfig,
    describe_client_error,
    error_code,
    http_status,
    is_not_found,
    read_small_object,
    store_errors,
)

_PUBLISH_FIELDS = ("manifest_version", "previous_manifest_sha256")

_MAX_RELEASE_ATTEMPTS = 12  # lost manifest_version claims before giving up
_MAX_CAS_ATTEMPTS = 12  # lost compare-and-swaps (or 409s) on one key before giving up
_MAX_LOG_WALK = 10_000  # release records probed past the pointer


@dataclass(frozen=True)
class PublishResult:
    """What `publish_build` did.

    Attributes:
        manifest_version: the release's sequence number (an older one when the version had
            already been released and was superseded since).
        uploaded: keys written by this call, in order; empty when everything was already there.
        already_published: nothing had to be written (`uploaded` is empty).
    """

    variant: str
    version: str
    manifest_key: str
    manifest_sha256: str
    manifest_version: int
    pointer_key: str
    uploaded: list[str]
    already_published: bool


# -- digests and identity ------------------------------------------------------------------


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def _hex_from_b64(value: str) -> str | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _release_identity(doc: dict[str, Any]) -> dict[str, Any]:
    """What makes two manifests "the same release": names and digests of sources and artifacts."""
    source = doc.get("source") or {}
    return {
        "variant": doc.get("variant"),
        "version": doc.get("version"),
        "source_files": sorted(
            (str(f.get("path")), f.get("size"), f.get("sha256")) for f in source.get("files") or []
        ),
        "artifacts": sorted(
            (str(a.get("name")), str(a.get("file")), a.get("size"), a.get("sha256"))
            for a in doc.get("artifacts") or []
        ),
    }


# -- the draft ----------------------------------------------------------------------------------


def _read_draft(build_dir: Path) -> tuple[dict[str, Any], list[tuple[dict[str, Any], Path]]]:
    """Load and check the draft manifest and its files; raise once listing every problem."""
    path = build_dir / MANIFEST_NAME
    try:
        draft = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PublishError(f"{path} does not exist: publish needs a finished build directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PublishError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(draft, dict):
        raise PublishError(f"{path} must hold a JSON object")

    problems: list[str] = []
    if draft.get("schema") != MANIFEST_SCHEMA_ID:
        problems.append(f"schema is {draft.get('schema')!r}, expected {MANIFEST_SCHEMA_ID!r}")
    for field in ("variant", "version"):
        if problem := segment_problem(draft.get(field), field):
            problems.append(problem)
    if draft.get("version") == LATEST:
        problems.append(f"version {draft.get('version')!r} is reserved")

    verification = draft.get("verification")
    if not isinstance(verification, dict) or not verification:
        problems.append("verification is missing or empty: only verified builds are published")
        verification = {}
    for precision, result in sorted(verification.items()):
        passed = isinstance(result, dict) and result.get("passed") is True
        if not passed:
            detail = ""
            if isinstance(result, dict):
                detail = (
                    f" (failed_cells={result.get('failed_cells')!r} of {result.get('cells')!r}, "
                    f"max_abs_err={result.get('max_abs_err')!r}, report {result.get('report')!r})"
                )
            problems.append(f"verification of {precision!r} did not pass{detail}")

    artifacts = draft.get("artifacts")
    files: list[tuple[dict[str, Any], Path]] = []
    if not isinstance(artifacts, list) or not artifacts:
        problems.append("artifacts is missing or empty")
        artifacts = []
    seen_names: set[str] = set()
    seen_files: set[str] = set()
    for index, artifact in enumerate(artifacts):
        if not isinstance(artifact, dict):
            problems.append(f"artifacts[{index}] is not an object")
            continue
        name, file = artifact.get("name"), artifact.get("file")
        label = f"artifact {name!r}"
        if problem := segment_problem(name, f"artifacts[{index}].name"):
            problems.append(problem)
        if problem := file_name_problem(file):
            problems.append(f"{label}: {problem}")
            continue
        if name in seen_names or file in seen_files:
            problems.append(f"{label}: name or file {file!r} is listed twice")
        seen_names.add(str(name))
        seen_files.add(file)
        if name not in verification and artifact.get("precision") not in verification:
            problems.append(
                f"{label}: no verification entry for its name or precision "
                f"{artifact.get('precision')!r}"
            )
        size, sha = artifact.get("size"), artifact.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not is_sha256_hex(sha):
            problems.append(f"{label}: size must be an integer and sha256 64 lowercase hex digits")
            continue
        local = build_dir / file
        if not local.is_file():
            problems.append(f"{label}: file {local} is missing")
            continue
        actual_size = local.stat().st_size
        if actual_size != size:
            problems.append(f"{label}: {local} is {actual_size} bytes, the manifest says {size}")
            continue
        actual_sha = sha256_file(local)
        if actual_sha != sha:
            problems.append(f"{label}: {local} has sha256 {actual_sha}, the manifest says {sha}")
            continue
        files.append((artifact, local))

    if problems:
        raise PublishError(
            f"Refusing to publish {build_dir}: nothing was uploaded.\n  - " + "\n  - ".join(problems)
        )
    return draft, files


def _final_manifest(
    draft: dict[str, Any], store: StoreConfig, manifest_version: int, previous: str | None
) -> dict[str, Any]:
    doc = copy.deepcopy(draft)
    doc["manifest_version"] = manifest_version
    doc["previous_manifest_sha256"] = previous
    for artifact in doc["artifacts"]:
        file = artifact["file"]
        artifact["s3_key"] = layout.artifact_key(store.prefix, doc["variant"], doc["version"], file)
    return doc


# -- talking to the store -----------------------------------------------------------------------


def _is_precondition_failed(exc: ClientError) -> bool:
    return http_status(exc) == 412 or error_code(exc) == "PreconditionFailed"


def _is_conflict(exc: ClientError) -> bool:
    return http_status(exc) == 409 or error_code(exc) in ("ConditionalRequestConflict", "OperationAborted")


def _backoff(attempt: int) -> None:
    time.sleep(min(1.0, 0.02 * (2**attempt)) * (0.5 + random.random()))


class _Store:
    """The S3 operations of one publish: conditional writes, read-back checks, what was written."""

    def __init__(self, client: Any, store: StoreConfig) -> None:
        self.client = client
        self.store = store
        self.uploaded: list[str] = []

    def url(self, key: str) -> str:
        return self.store.url(key)

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            return read_small_object(self.client, self.store, key)
        except FlexibleChecksumError as exc:
            raise PublishError(
                f"{self.url(key)} fails the checksum the store keeps for it: the stored object is "
                "corrupt. Inspect it; delete it only if it is not referenced by a release."
            ) from exc
        except ClientError as exc:
            raise PublishError(
                f"Reading {self.url(key)} failed: {describe_client_error(exc, self.store)}"
            ) from exc
        except ValueError as exc:
            raise PublishError(str(exc)) from exc

    def read_json(self, key: str) -> tuple[Any, bytes, str] | None:
        found = self.read(key)
        if found is None:
            return None
        data, etag = found
        try:
            return json.loads(data.decode("utf-8")), data, etag
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PublishError(f"{self.url(key)} is not valid JSON ({exc}); the store is damaged") from exc

    def read_pointer(self, key: str) -> tuple[dict[str, Any], str] | None:
        """A pointer or release record and its ETag, checked; None if missing."""
        found = self.read_json(key)
        if found is None:
            return None
        doc, _, etag = found
        if problems := pointer_problems(doc):
            raise PublishError(f"{self.url(key)} is not a valid pointer: " + "; ".join(problems))
        return doc, etag

    def stored_sha256(self, key: str) -> str | None:
        """SHA-256 of the stored object (the store's own checksum, else by reading it); None if missing."""
        with store_errors(self.client, self.store, f"checking {self.url(key)}"):
            try:
                head = self.client.head_object(
                    Bucket=self.store.bucket, Key=key, ChecksumMode="ENABLED"
                )
            except ClientError as exc:
                if is_not_found(exc):
                    return None
                raise PublishError(
                    f"Checking {self.url(key)} failed: {describe_client_error(exc, self.store)}"
                ) from exc
        checksum = head.get("ChecksumSHA256")
        if checksum and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" and "-" not in checksum:
            if (hex_digest := _hex_from_b64(checksum)) is not None:
                return hex_digest
        # Uploaded without a SHA-256 (or as multipart): hash what the store returns.
        digest = hashlib.sha256()
        with store_errors(self.client, self.store, f"reading {self.url(key)}"):
            try:
                response = self.client.get_object(Bucket=self.store.bucket, Key=key)
                for chunk in response["Body"].iter_chunks(1 << 20):
                    digest.update(chunk)
            except ClientError as exc:
                if is_not_found(exc):
                    return None
                raise PublishError(
                    f"Reading {self.url(key)} failed: {describe_client_error(exc, self.store)}"
                ) from exc
            except FlexibleChecksumError as exc:
                raise PublishError(f"{self.url(key)} is corrupt in the store: {exc}") from exc
        return digest.hexdigest()

    def _put(self, key: str, sha256: str, body: bytes | Path, content_type: str, **condition: str) -> None:
        kwargs: dict[str, Any] = {
            "Bucket": self.store.bucket,
            "Key": key,
            "ChecksumSHA256": _b64(sha256),  # the server verifies it; botocore then skips its CRC32
            "ContentType": content_type,
            **condition,
        }
        with store_errors(self.client, self.store, f"uploading {self.url(key)}"):
            if isinstance(body, Path):
                with open(body, "rb") as handle:
                    self.client.put_object(Body=handle, **kwargs)
            else:
                self.client.put_object(Body=body, **kwargs)

    def check_written(self, key: str, sha256: str) -> None:
        stored = self.stored_sha256(key)
        if stored != sha256:
            raise PublishError(
                f"After uploading {self.url(key)} the store reports sha256 {stored}, expected "
                f"{sha256}. The store did not keep what was sent; re-run the publish."
            )

    def _put_error(self, key: str, exc: ClientError) -> PublishError:
        if error_code(exc) in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
            return PublishError(
                f"The store rejected {self.url(key)}: the bytes it received do not match their "
                "SHA-256 (was the file modified during the upload?). Rebuild and publish again."
            )
        return PublishError(f"Uploading {self.url(key)} failed: {describe_client_error(exc, self.store)}")

    def put_immutable(self, key: str, sha256: str, body: bytes | Path, content_type: str) -> bool:
        """Create `key` unless it exists; True if written. Same bytes already there: no-op.

        Raises:
            VersionConflictError: `key` holds different bytes.
        """
        for attempt in range(_MAX_CAS_ATTEMPTS):
            try:
                self._put(key, sha256, body, content_type, IfNoneMatch="*")
            except ClientError as exc:
                if _is_conflict(exc):
                    _backoff(attempt)
                    continue
                if not _is_precondition_failed(exc):
                    raise self._put_error(key, exc) from exc
                stored = self.stored_sha256(key)
                if stored is None:  # vanished between the PUT and the HEAD: try again
                    continue
                if stored == sha256:
                    return False
                raise VersionConflictError(
                    f"{self.url(key)} already exists with different content: stored sha256 "
                    f"{stored}, this build's {sha256}. Objects under a version are immutable; a "
                    "different build must get a different version id."
                ) from None
            self.check_written(key, sha256)
            self.uploaded.append(key)
            return True
        raise PublishError(f"Gave up creating {self.url(key)}: the store kept answering 409")

    def put_if_match(self, key: str, sha256: str, body: bytes, etag: str | None) -> bool:
        """Compare-and-swap: write `key` only if it still has `etag` (or, None, does not exist).

        Returns False when the condition failed (somebody else wrote first).
        """
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            self._put(key, sha256, body, "application/json", **condition)
        except ClientError as exc:
            if _is_precondition_failed(exc) or _is_conflict(exc):
                return False
            raise self._put_error(key, exc) from exc
        self.uploaded.append(key)
        return True


# -- the release protocol -----------------------------------------------------------------------


def _log_tail(s3: _Store, store: StoreConfig, variant: str) -> dict[str, Any] | None:
    """The newest release record (the pointer may lag behind after a crash), or None."""
    pointer = s3.read_pointer(layout.pointer_key(store.prefix, variant))
    tail = pointer[0] if pointer else None
    mv = tail["manifest_version"] if tail else 0
    for _ in range(_MAX_LOG_WALK):
        record = s3.read_pointer(layout.release_record_key(store.prefix, variant, mv + 1))
        if record is None:
            return tail
        tail, mv = record[0], mv + 1
    raise PublishError(f"More than {_MAX_LOG_WALK} release records past the pointer of {variant!r}")


def _advance_pointer(s3: _Store, store: StoreConfig, target: dict[str, Any]) -> bool:
    """Move the pointer to `target` unless it already names this or a newer release."""
    key = layout.pointer_key(store.prefix, target["variant"])
    body = canonical_json(target)
    sha = sha256_bytes(body)
    for attempt in range(_MAX_CAS_ATTEMPTS):
        current = s3.read_pointer(key)
        if current is not None:
            doc, etag = current
            if doc["manifest_version"] > target["manifest_version"]:
                return False  # a newer release won: never roll back
            if doc["manifest_version"] == target["manifest_version"]:
                if doc["manifest_sha256"] != target["manifest_sha256"]:
                    raise PublishError(
                        f"{s3.url(key)} names manifest_version {doc['manifest_version']} with "
                        f"manifest {doc['manifest_sha256']}, but release record "
                        f"{target['manifest_version']} names {target['manifest_sha256']}: the store "
                        "is inconsistent (was the pointer edited by hand?)."
                    )
                return False
        else:
            etag = None
        if s3.put_if_match(key, sha, body, etag):
            # Read back: ours, or already replaced by a newer release; anything else is wrong.
            after = s3.read_pointer(key)
            if after is None or after[0]["manifest_version"] < target["manifest_version"]:
                raise PublishError(f"{s3.url(key)} does not hold the pointer just written")
            if after[0]["manifest_version"] == target["manifest_version"] and after[0] != target:
                raise PublishError(f"{s3.url(key)} does not hold the pointer just written")
            return True
        _backoff(attempt)
    raise PublishError(
        f"Gave up moving {s3.url(key)} after {_MAX_CAS_ATTEMPTS} lost compare-and-swaps; "
        "another publisher is very busy. Re-run the publish."
    )


def latest_release(client: Any, store: StoreConfig, variant: str) -> dict[str, Any] | None:
    """The variant's pointer (`latest.json`) as a dict, or None when nothing was published yet."""
    found = _Store(client, store).read_pointer(layout.pointer_key(store.prefix, variant))
    return None if found is None else found[0]


def publish_build(build_dir: Path, *, client: Any, store: StoreConfig) -> PublishResult:
    """Upload a verified build and make it the variant's latest release.

    Idempotent and crash-safe: re-running after any failure completes the publish; publishing an
    already released version writes nothing.

    Args:
        build_dir: folder with the artifact files and the draft `manifest.json`.
        client: a boto3 S3 client (`store.make_s3_client(store)`).
        store: bucket and prefix to publish under.

    Returns:
        PublishResult with the manifest key, its SHA-256 and `manifest_version`.

    Raises:
        PublishError: the draft failed verification, a file is missing or differs from the draft
            (nothing is written then), or the store misbehaved.
        VersionConflictError: this version already exists in the store with different content.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    build_dir = Path(build_dir)
    draft, files = _read_draft(build_dir)
    for field in _PUBLISH_FIELDS:
        draft.pop(field, None)
    variant, version = draft["variant"], draft["version"]
    if errors := manifest_schema_errors(_final_manifest(draft, store, 1, None)):
        raise PublishError(
            f"Refusing to publish {build_dir}: the manifest would not match "
            f"{MANIFEST_SCHEMA_PATH.name}; nothing was uploaded.\n  - " + "\n  - ".join(errors)
        )

    s3 = _Store(client, store)
    for artifact, local in files:
        key = layout.artifact_key(store.prefix, variant, version, artifact["file"])
        s3.put_immutable(key, artifact["sha256"], local, "application/octet-stream")

    manifest_key = layout.manifest_key(store.prefix, variant, version)
    identity = _release_identity(draft)
    for attempt in range(_MAX_RELEASE_ATTEMPTS):
        existing = s3.read_json(manifest_key)
        manifest_etag: str | None = None
        if existing is not None:
            doc, raw, manifest_etag = existing
            if not isinstance(doc, dict) or _release_identity(doc) != identity:
                raise VersionConflictError(
                    f"{store.url(manifest_key)} already exists for a different build: its source "
                    "or artifact digests differ from this build's. Objects under a version are "
                    "immutable; a different build must get a different version id."
                )
            mv = doc.get("manifest_version")
            if not isinstance(mv, int) or mv < 1:
                raise PublishError(f"{store.url(manifest_key)} has no valid manifest_version")
            sha = sha256_bytes(raw)
            record_key = layout.release_record_key(store.prefix, variant, mv)
            record = s3.read_pointer(record_key)
            if record is not None and record[0]["manifest_key"] == manifest_key:
                if record[0]["manifest_sha256"] != sha:
                    raise PublishError(
                        f"Release record {store.url(record_key)} pins "
                        f"manifest sha256 {record[0]['manifest_sha256']} but "
                        f"{store.url(manifest_key)} now has {sha}: the released manifest was "
                        "modified in the store. Restore it; do not republish over it."
                    )
                return _finish(s3, store, record[0])  # released before: at most move the pointer
            if record is None:
                # Written by a publish that stopped before claiming its number: claim it now.
                target = pointer_doc(variant, version, manifest_key, sha, mv)
                if _claim(s3, store, target):
                    return _finish(s3, store, target)
                _backoff(attempt)
                continue
            # Its number went to another release: this manifest was never released; renumber it.

        tail = _log_tail(s3, store, variant)
        mv = tail["manifest_version"] + 1 if tail else 1
        previous = tail["manifest_sha256"] if tail else None
        doc = _final_manifest(draft, store, mv, previous)
        if errors := manifest_schema_errors(doc):
            raise PublishError("The final manifest does not match the schema:\n  - " + "\n  - ".join(errors))
        body = canonical_json(doc)
        sha = sha256_bytes(body)
        if not s3.put_if_match(manifest_key, sha, body, manifest_etag):
            _backoff(attempt)  # another publisher of this version wrote it first: look again
            continue
        s3.check_written(manifest_key, sha)
        target = pointer_doc(variant, version, manifest_key, sha, mv)
        if _claim(s3, store, target):
            return _finish(s3, store, target)
        _backoff(attempt)  # lost manifest_version `mv` to a racing release: renumber and retry
    raise PublishError(
        f"Gave up publishing {variant}/{version} after {_MAX_RELEASE_ATTEMPTS} lost races for a "
        "manifest_version; other publishers are very busy. Re-run the publish."
    )


def _claim(s3: _Store, store: StoreConfig, target: dict[str, Any]) -> bool:
    """Create the release record of `target`; True if it is (now or already) ours."""
    key = layout.release_record_key(store.prefix, target["variant"], target["manifest_version"])
    body = canonical_json(target)
    if s3.put_if_match(key, sha256_bytes(body), body, None):
        s3.check_written(key, sha256_bytes(body))
        return True
    found = s3.read_pointer(key)
    return found is not None and (
        found[0]["manifest_key"] == target["manifest_key"]
        and found[0]["manifest_sha256"] == target["manifest_sha256"]
    )


def _finish(s3: _Store, store: StoreConfig, target: dict[str, Any]) -> PublishResult:
    _advance_pointer(s3, store, target)
    return PublishResult(
        variant=target["variant"],
        version=target["version"],
        manifest_key=target["manifest_key"],
        manifest_sha256=target["manifest_sha256"],
        manifest_version=target["manifest_version"],
        pointer_key=layout.pointer_key(store.prefix, target["variant"]),
        uploaded=list(s3.uploaded),
        already_published=not s3.uploaded,
    )
