"""The one reader of mitra-build's small documents in the store: pointers, release records,
manifests and signatures.

Publish, pull and the client all read through here, so one set of bounds and one set of errors
hold for every reader:
- size: an object larger than `max_bytes` is not one of ours (StoreDocumentError), and is never
  read past that size;
- nesting: JSON nested deeper than MAX_JSON_DEPTH is refused before the parser recurses
  (StoreDocumentError, never a RecursionError traceback);
- checksum: an object that fails the checksum the store keeps for it is ChecksumMismatchError;
- other refusals: StoreAuthError / StoreUnreachableError (`store.store_errors`), else StoreError
  naming the object.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError, FlexibleChecksumError

from mitra_model.errors import ChecksumMismatchError, StoreDocumentError, StoreError
from mitra_model.release.store import StoreConfig, describe_client_error, is_not_found, store_errors

MAX_DOCUMENT_BYTES = 16 << 20  # our largest document, a full manifest, is ~40 kB
# Our documents nest a few levels (a manifest: 5); a hostile one nests 100 000 deep to crash the parser.
MAX_JSON_DEPTH = 64


def read_object(client: Any, store: StoreConfig, key: str, *, max_bytes: int = MAX_DOCUMENT_BYTES
                ) -> tuple[bytes, str] | None:
    """The bytes and ETag of a small object, or None when it does not exist.

    Raises:
        StoreDocumentError: the object is larger than `max_bytes`.
        ChecksumMismatchError: the object fails the checksum the store keeps for it.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
        StoreError: any other refusal, naming the object and the store's answer.
    """
    try:
        with store_errors(client, store, f"reading {store.url(key)}"):  # refused credentials, no endpoint
            try:
                response = client.get_object(Bucket=store.bucket, Key=key)
            except ClientError as exc:
                if is_not_found(exc):
                    return None
                raise
            length = int(response.get("ContentLength") or 0)
            body = response["Body"]
            try:
                if length > max_bytes:
                    raise StoreDocumentError(
                        f"{store.url(key)} is {length} bytes, more than the {max_bytes} expected of it: it is not "
                        "one of mitra-build's documents")
                data = body.read(max_bytes + 1)
            finally:
                body.close()
    except FlexibleChecksumError as exc:
        raise ChecksumMismatchError(
            f"{store.url(key)} does not match the checksum the store keeps for it: the stored object is corrupt"
        ) from exc
    except ClientError as exc:
        raise StoreError(f"Reading {store.url(key)} failed: {describe_client_error(exc, store, client)}") from exc
    if len(data) > max_bytes:
        raise StoreDocumentError(f"{store.url(key)} is larger than the {max_bytes} bytes expected of it")
    return data, str(response.get("ETag", ""))


def parse_json(raw: bytes, what: str) -> Any:
    """`raw` parsed as JSON, refusing what none of our documents is.

    Args:
        raw: the bytes as read.
        what: how messages name it, e.g. "s3://b/p/v/latest.json".

    Raises:
        StoreDocumentError: not UTF-8 JSON, or nested deeper than MAX_JSON_DEPTH.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreDocumentError(f"{what} is not valid JSON: {exc}") from None
    if (depth := _nesting(text)) > MAX_JSON_DEPTH:
        raise StoreDocumentError(
            f"{what} is nested too deeply ({depth} levels; mitra-build's documents nest at most "
            f"{MAX_JSON_DEPTH}): the store holds a damaged or hostile file. Nothing was read from it; "
            "republish the release.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreDocumentError(f"{what} is not valid JSON: {exc}") from None


def read_document(client: Any, store: StoreConfig, key: str, *, max_bytes: int = MAX_DOCUMENT_BYTES
                  ) -> tuple[Any, bytes, str] | None:
    """A small JSON document: (parsed, raw bytes, ETag), or None when it does not exist.

    Raises: as `read_object` and `parse_json`.
    """
    found = read_object(client, store, key, max_bytes=max_bytes)
    if found is None:
        return None
    raw, etag = found
    return parse_json(raw, store.url(key)), raw, etag


def _nesting(text: str) -> int:
    """The deepest bracket nesting of a JSON text, brackets inside strings ignored (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
