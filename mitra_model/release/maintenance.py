"""Keeping a published variant right: re-sign its pointer with a fresh expiry (TUF's timestamp role,
what the scheduled run does when nothing changed), and revert to an earlier release by publishing a
new one that names its artifacts (consumers move forward to it instead of being rolled back).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mitra_model.errors import (
    PublishError,
)
from mitra_model.release import layout
from mitra_model.release.index import rewrite_indexes
from mitra_model.release.keys import Signer
from mitra_model.release.log import log_tail, newest_record_from
from mitra_model.release.pointer import DEFAULT_POINTER_TTL, format_time, sign_pointer
from mitra_model.release.publish import (
    PUBLISH_FIELDS,
    DocumentRenderer,
    PublishResult,
    move_pointer,
    publish_manifest,
)
from mitra_model.release.rules import (
    segment_problem,
    sha256_bytes,
)
from mitra_model.release.store import (
    StoreConfig,
)
from mitra_model.release.writes import MAX_CAS_ATTEMPTS, ConditionalWriter, backoff


@dataclass(frozen=True)
class PointerResult:
    """What `refresh_pointer` wrote.

    Attributes:
        manifest_version: the release the pointer names (unchanged, unless a crashed publish had
            left the pointer behind its newest release record: then that one).
        expires: the new expiry, UTC ISO 8601.
    """

    variant: str
    version: str
    manifest_version: int
    expires: str
    pointer_key: str


def refresh_pointer(
    client: Any,
    store: StoreConfig,
    variant: str,
    signer: Signer,
    ttl: timedelta = DEFAULT_POINTER_TTL,
) -> PointerResult:
    """Re-sign the variant's pointer with a fresh expiry, naming the same release.

    For the scheduled run when nothing else changed: a consumer refuses an expired pointer
    (freeze attack), so the pointer must be re-signed well within `ttl`. Compare-and-swap like
    publish: a release published meanwhile is never undone (the loop re-reads and signs that).
    A pointer behind the newest release record (a publish that crashed before moving it) is
    moved to that record, which is what re-running the publish would do.

    Args:
        client: a boto3 S3 client.
        store: bucket and prefix.
        variant: e.g. "mitra-classifier".
        signer: the release signing key.
        ttl: validity of the new pointer from now.

    Returns:
        PointerResult naming the release and the new expiry.

    Raises:
        PublishError: nothing was published for `variant`, or the store misbehaved.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    s3 = ConditionalWriter(client, store)
    key = layout.pointer_key(store.prefix, variant)
    for attempt in range(MAX_CAS_ATTEMPTS):
        current = s3.read_pointer(key)
        if current is None:
            raise PublishError(
                f"{s3.url(key)} does not exist: nothing of {variant!r} was published yet, so there "
                "is no pointer to refresh. Publish a build first."
            )
        doc, etag = current
        target = newest_record_from(s3.client, store, variant, doc)
        assert target is not None  # at least the pointer's own
        expires = datetime.now(UTC) + ttl
        body = sign_pointer(target, signer, expires=expires)
        if s3.put_if_match(key, sha256_bytes(body), body, etag):
            s3.check_written(key, sha256_bytes(body))
            rewrite_indexes(s3, variant)
            return PointerResult(
                variant=variant,
                version=target["version"],
                manifest_version=target["manifest_version"],
                expires=format_time(expires),
                pointer_key=key,
            )
        backoff(attempt)
    raise PublishError(
        f"Gave up refreshing {s3.url(key)} after {MAX_CAS_ATTEMPTS} lost compare-and-swaps; "
        "another publisher is very busy. Re-run it."
    )


def revert_version_id(to_version: str, from_manifest_version: int) -> str:
    """The version id of a revert: `<to_version>.revert-<manifest_version it reverts from>`.

    A new id (so the revert gets its own manifest and signature under the standard layout) that is
    the same for a re-run of the same revert, and different for a later revert to the same version.
    """
    return f"{to_version}.revert-{from_manifest_version}"


def revert_release(
    client: Any,
    store: StoreConfig,
    variant: str,
    to_version: str,
    signer: Signer | None,
    ttl: timedelta = DEFAULT_POINTER_TTL,
    documents: DocumentRenderer | None = None,
) -> PublishResult:
    """Make an earlier release's artifacts the latest again, as a NEW release (forward, not back).

    Consumers refuse to go back to an older manifest_version (rollback protection), so a revert
    publishes manifest_version N+1, version `revert_version_id(to_version, N)`, whose manifest is
    `to_version`'s with the same artifacts: same files, sizes, SHA-256 and S3 keys (under
    `to_version`'s folder; nothing is copied). It is signed like any release. Re-running the same
    revert is a no-op.

    Args:
        client: a boto3 S3 client.
        store: bucket and prefix.
        variant: e.g. "mitra-classifier".
        to_version: the version id whose artifacts come back; it must have been released.
        signer: the release signing key (None: an unsigned release, refused by consumers with keys).
        ttl: validity of the new signed pointer.

    Returns:
        PublishResult of the new release (already_published when the latest release already has
        exactly these artifacts).

    Raises:
        PublishError: `to_version` was never released, or an artifact of it is missing or differs
            in the store.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    for value, what in ((variant, "variant"), (to_version, "version")):
        if problem := segment_problem(value, what):
            raise PublishError(f"Cannot revert: {problem}")
    s3 = ConditionalWriter(client, store)
    old_key = layout.manifest_key(store.prefix, variant, to_version)
    found = s3.read_json(old_key)
    record = None
    if found is not None and isinstance(found[0], dict) and isinstance(found[0].get("manifest_version"), int):
        old, old_raw, _ = found
        record_found = s3.read_pointer(layout.release_record_key(store.prefix, variant, old["manifest_version"]))
        if record_found is not None and record_found[0]["manifest_key"] == old_key:
            record = record_found[0]
    if record is None:
        raise PublishError(
            f"Cannot revert {variant} to {to_version!r}: it was never released (no release record "
            f"names {store.url(old_key)}). Pick a version from the release log "
            f"{store.url(layout.join_key(layout.variant_folder(store.prefix, variant), layout.RELEASES_DIR))}/."
        )
    if record["manifest_sha256"] != sha256_bytes(old_raw):
        raise PublishError(
            f"Cannot revert to {to_version!r}: {store.url(old_key)} no longer has the sha256 its "
            "release record pins; the released manifest was modified in the store. Restore it first."
        )
    artifacts = old["artifacts"]
    for artifact in artifacts:
        stored = s3.stored_sha256(artifact["s3_key"])
        if stored != artifact["sha256"]:
            raise PublishError(
                f"Cannot revert to {to_version!r}: {s3.url(artifact['s3_key'])} "
                f"{'is missing' if stored is None else f'has sha256 {stored}'}, its manifest pins "
                f"{artifact['sha256']}. Restore the object (or publish a fresh build) instead."
            )

    def same_files(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
        return {(a["file"], a["sha256"], a["s3_key"]) for a in doc.get("artifacts") or []}

    tail = log_tail(s3.client, store, variant)
    assert tail is not None  # `record` exists
    tail_manifest = s3.read_json(tail["manifest_key"])
    if tail_manifest is not None and same_files(tail_manifest[0]) == same_files(old):
        return move_pointer(s3, store, tail, signer, ttl)  # already serving these artifacts

    draft = copy.deepcopy(old)
    for field in (*PUBLISH_FIELDS, "documents"):  # the revert's documents are its own (they say it reverts)
        draft.pop(field, None)
    draft["version"] = revert_version_id(to_version, tail["manifest_version"])
    draft["reverts"] = {"version": to_version, "manifest_version": record["manifest_version"]}
    return publish_manifest(s3, store, draft, signer, ttl, documents)
