"""The pull's downloads: boto3's managed transfer (parallel ranged GETs, one progress bar), each
file's size checked before and after, its SHA-256 hashed while the others still download."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError, ReadTimeoutError
from s3transfer.exceptions import RetriesExceededError
from s3transfer.subscribers import BaseSubscriber
from tqdm import tqdm

from mitra_model.errors import (
    ChecksumMismatchError,
    PullError,
    StoreUnreachableError,
)
from mitra_model.fileutil import sha256_file
from mitra_model.release.signature import SignedContent
from mitra_model.release.store import (
    StoreConfig,
    describe_client_error,
    endpoint_of,
    is_not_found,
    redact_secrets,
    store_errors,
)

# aws-cli's defaults (10 requests in flight, 8 MiB parts); 16 MiB parts halve the requests.
# One attempt per part: s3transfer retries a broken stream without checking for cancellation, so a
# hung server cost one read_timeout_s per attempt (5 by default) after the pull had already given up.
# botocore still retries each request (max_attempts); a stream cut mid-way fails the pull, which a
# re-run resumes from nothing, atomically.
TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=10, use_threads=True,
    num_download_attempts=1,
)


def check_stored_size(client: Any, store: StoreConfig, artifact: dict[str, Any]) -> None:
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


class _StallWatch:
    """When the downloads last received a byte (any of them)."""

    def __init__(self) -> None:
        self.last_byte = time.monotonic()


class _Subscriber(BaseSubscriber):
    """Tells s3transfer the size (no extra HEAD; no byte past the manifest's size is requested),
    feeds the one progress bar, and starts hashing a file as soon as it is complete."""

    def __init__(self, size: int, bar: tqdm | None, lock: threading.Lock, on_complete: Any, watch: _StallWatch) -> None:
        self._size, self._bar, self._lock, self._on_complete, self._watch = size, bar, lock, on_complete, watch

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._watch.last_byte = time.monotonic()
        if self._bar is not None:
            with self._lock:
                self._bar.update(bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        self._on_complete(future)


def download_all(
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

        watch = _StallWatch()
        try:
            with create_transfer_manager(client, TRANSFER_CONFIG) as manager:
                futures = [
                    (a, manager.download(store.bucket, a["s3_key"], str(staging / a["file"]),
                                         subscribers=[_Subscriber(a["size"], bar, lock, hash_when_done(a["file"]), watch)]))
                    for a in artifacts
                ]
                for artifact, future in futures:
                    _wait_or_stall(client, store, artifact, future, watch)
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


def _wait_or_stall(client: Any, store: StoreConfig, artifact: dict[str, Any], future: Any, watch: _StallWatch) -> None:
    """Wait for a download; end the pull when no byte has come for `read_timeout_s`.

    A stalled socket read times out after read_timeout_s, but s3transfer would then retry it, each
    retry stalling as long again (a hung server held a pull for 16 minutes): one stall is enough.
    Leaving the transfer manager cancels the rest; a read still blocked ends at its own timeout.

    Raises:
        StoreUnreachableError: naming the object, the stall and the setting.
    """
    while not future.done():
        if time.monotonic() - watch.last_byte > store.read_timeout_s:
            raise _stalled(client, store, artifact)
        time.sleep(0.05)


def _stalled(client: Any, store: StoreConfig, artifact: dict[str, Any]) -> StoreUnreachableError:
    return StoreUnreachableError(
        f"The S3 store at {endpoint_of(client)} sent no byte of {store.url(artifact['s3_key'])} for "
        f"{store.read_timeout_s:g} s: it stalled. Nothing was pulled; retry, or raise [store] "
        "read_timeout_s for very slow links.")


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
            # The socket's own read timeout and the stall watch measure the same silence; whichever
            # notices first, the user reads one message.
            if isinstance(last, ReadTimeoutError):
                raise _stalled(client, store, artifact) from None
            if isinstance(last, (BotoCoreError, ClientError)):
                raise last from None  # store_errors names the endpoint and the fix
            raise PullError(
                f"Downloading {store.url(key)} failed after retries: {redact_secrets(str(last), client)}"
            ) from None
