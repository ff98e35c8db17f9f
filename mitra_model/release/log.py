"""The release log: `<variant>/_releases/<N>.json`, one record per manifest_version, and the pointer.

Release records are claimed consecutively by publish (N only once N-1 exists) and never change, so
the newest release is found by galloping forward from a known record. Pull reads the log to refuse
a rolled-back pointer; publish reads it to claim the next number. Both read it here, through the
one reader of small objects (`objects`), so neither imports the other.
"""

from __future__ import annotations

from typing import Any

from mitra_model.errors import StoreDocumentError
from mitra_model.release import layout
from mitra_model.release.objects import read_document
from mitra_model.release.pointer import record_problems
from mitra_model.release.rules import pointer_doc
from mitra_model.release.store import StoreConfig

_MAX_LOG_WALK = 10_000  # release records probed past the pointer
_RECORD_FIELDS = (
    "schema", "variant", "version", "manifest_key", "manifest_sha256", "manifest_version",
    "signature_key", "signature_sha256",
)


def read_record(client: Any, store: StoreConfig, key: str) -> tuple[dict[str, Any], str] | None:
    """A pointer or release record and its ETag, checked; None if missing.

    Raises:
        StoreDocumentError: not JSON, too large, too deeply nested, or not a valid record.
        ChecksumMismatchError / StoreError (and subclasses): as `objects.read_object`.
    """
    found = read_document(client, store, key)
    if found is None:
        return None
    doc, _, etag = found
    if problems := record_problems(doc):
        raise StoreDocumentError(f"{store.url(key)} is not a valid pointer: " + "; ".join(problems))
    return doc, etag


def record_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """A pointer without what only the pointer has (`expires`, its envelope): the release record."""
    return {k: doc[k] for k in _RECORD_FIELDS if k in doc}


def release_record(variant: str, version: str, manifest_key: str, sha: str, mv: int,
                   signature: tuple[str, str] | None) -> dict[str, Any]:
    """The release record of a manifest; a signed release also pins its signature object."""
    doc = pointer_doc(variant, version, manifest_key, sha, mv)
    if signature is not None:
        doc["signature_key"], doc["signature_sha256"] = signature
    return doc


def newest_record_from(client: Any, store: StoreConfig, variant: str, start: dict[str, Any] | None
                       ) -> dict[str, Any] | None:
    """The newest release record at or after `start` (a record or pointer), probing as few as possible.

    Records are contiguous (N is claimed only once N-1 exists), so: gallop forward (N+1, N+2, N+4,
    ...) to the first missing one, then bisect; O(log n) GETs instead of one per release.
    """
    def read(mv: int) -> dict[str, Any] | None:
        found = read_record(client, store, layout.release_record_key(store.prefix, variant, mv))
        return None if found is None else found[0]

    base_mv = start["manifest_version"] if start else 0
    best = record_fields(start) if start else None
    step = 1
    while True:  # invariant: `best` is record base_mv (or None for 0); probe base_mv + step
        if step > _MAX_LOG_WALK:
            raise StoreDocumentError(f"More than {_MAX_LOG_WALK} release records past the pointer of {variant!r}")
        found = read(base_mv + step)
        if found is None:
            break
        base_mv, best, step = base_mv + step, found, step * 2
    low, high = base_mv, base_mv + step  # record `low` exists (or is 0), record `high` does not
    while high - low > 1:
        middle = (low + high) // 2
        found = read(middle)
        if found is None:
            high = middle
        else:
            low, best = middle, found
    return best


def log_tail(client: Any, store: StoreConfig, variant: str) -> dict[str, Any] | None:
    """The newest release record (the pointer may lag behind after a crash), or None."""
    pointer = read_record(client, store, layout.pointer_key(store.prefix, variant))
    return newest_record_from(client, store, variant, pointer[0] if pointer else None)


def newest_release_record(
    client: Any, store: StoreConfig, variant: str, *, after: int = 0
) -> dict[str, Any] | None:
    """The newest release record of `variant` (what a puller compares a pointer with: rollback).

    Args:
        client: a boto3 S3 client.
        store: bucket and prefix.
        variant: e.g. "mitra-classifier".
        after: a manifest_version known to be released (e.g. the verified pointer's): the search
            starts there, so it costs about 2*log2(newer releases) + 1 small GETs.

    Returns:
        The record as a dict (schema, variant, version, manifest_key, manifest_sha256,
        manifest_version, and signature_key / signature_sha256 for a signed release), or None
        when no record exists after `after` and `after` is 0.

    Raises:
        StoreDocumentError: a record is unreadable or invalid, or `after` names a record that
            does not exist.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    start = None
    if after > 0:
        found = read_record(client, store, layout.release_record_key(store.prefix, variant, after))
        if found is None:
            raise StoreDocumentError(
                f"Release record {after} of {variant!r} does not exist in "
                f"{store.url(layout.variant_folder(store.prefix, variant))}: the pointer names a "
                "release that was never recorded."
            )
        start = found[0]
    return newest_record_from(client, store, variant, start)


def latest_release(client: Any, store: StoreConfig, variant: str) -> dict[str, Any] | None:
    """The variant's pointer (`latest.json`) as a dict, or None when nothing was published yet.

    Not verified: a consumer that trusts keys reads it with `pointer.verify_pointer` instead.
    """
    found = read_record(client, store, layout.pointer_key(store.prefix, variant))
    return None if found is None else found[0]
