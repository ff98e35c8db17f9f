"""Writing to the store the way a release needs it: every object a single PUT with `ChecksumSHA256`
(the server verifies the whole file) and read back; objects under a version created only if absent
(`IfNoneMatch='*'`: the same bytes again are a no-op, other bytes a VersionConflictError); the pointer
and the release records moved by compare-and-swap (`IfMatch` on the ETag); 409s retried with back-off.
`publish` runs the release protocol on top of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, FlexibleChecksumError

from mitra_model.errors import ChecksumMismatchError, PublishError, VersionConflictError
from mitra_model.release.log import read_record
from mitra_model.release.objects import read_document, read_object
from mitra_model.release.rules import sha256_bytes
from mitra_model.release.store import (
    StoreConfig,
    describe_client_error,
    error_code,
    http_status,
    is_not_found,
    store_errors,
)

MAX_CAS_ATTEMPTS = 12  # lost compare-and-swaps (or 409s) on one key before giving up


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def _hex_from_b64(value: str) -> str | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def is_precondition_failed(exc: ClientError) -> bool:
    return http_status(exc) == 412 or error_code(exc) == "PreconditionFailed"


def is_conflict(exc: ClientError) -> bool:
    return http_status(exc) == 409 or error_code(exc) in ("ConditionalRequestConflict", "OperationAborted")


def backoff(attempt: int) -> None:
    time.sleep(min(1.0, 0.02 * (2**attempt)) * (0.5 + random.random()))


class ConditionalWriter:
    """The S3 operations of one publish: conditional writes, read-back checks, what was written."""

    def __init__(self, client: Any, store: StoreConfig) -> None:
        self.client = client
        self.store = store
        self.uploaded: list[str] = []

    def url(self, key: str) -> str:
        return self.store.url(key)

    def read(self, key: str) -> tuple[bytes, str] | None:
        return read_object(self.client, self.store, key)

    def read_json(self, key: str) -> tuple[Any, bytes, str] | None:
        return read_document(self.client, self.store, key)

    def read_pointer(self, key: str) -> tuple[dict[str, Any], str] | None:
        """A pointer or release record and its ETag, checked; None if missing."""
        return read_record(self.client, self.store, key)

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
                raise ChecksumMismatchError(
                    f"{self.url(key)} does not match the checksum the store keeps for it: the stored object is "
                    "corrupt") from exc
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
        for attempt in range(MAX_CAS_ATTEMPTS):
            try:
                self._put(key, sha256, body, content_type, IfNoneMatch="*")
            except ClientError as exc:
                if is_conflict(exc):
                    backoff(attempt)
                    continue
                if not is_precondition_failed(exc):
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
            if is_precondition_failed(exc) or is_conflict(exc):
                return False
            raise self._put_error(key, exc) from exc
        self.uploaded.append(key)
        return True

    def put_unreleased(self, key: str, sha256: str, body: bytes, content_type: str) -> None:
        """Write `key` unless it already holds these bytes, replacing what is there.

        Only for objects no release names yet (a release's documents before its manifest is
        written): replacing them cannot change anything a consumer was promised.
        """
        if self.stored_sha256(key) == sha256:
            return
        try:
            self._put(key, sha256, body, content_type)
        except ClientError as exc:
            raise self._put_error(key, exc) from exc
        self.check_written(key, sha256)
        self.uploaded.append(key)

    def put_view(self, key: str, body: bytes, content_type: str) -> None:
        """Overwrite a derived page (an index), which names releases but is never pinned by one."""
        try:
            self._put(key, sha256_bytes(body), body, content_type)
        except ClientError as exc:
            raise self._put_error(key, exc) from exc
