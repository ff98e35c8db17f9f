"""The artifact store: where releases live (an S3 bucket + prefix) and how we talk to it.

`StoreConfig` is the one validated description of the store; `make_s3_client` builds a boto3 client
from it using boto3's standard credential chain (environment, shared config/credentials files,
SSO, instance metadata ...). This module never reads `os.environ` itself: boto3 does, so
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` and `AWS_ENDPOINT_URL` work as
everywhere else.

`store_errors` turns botocore's credential and connection failures into `StoreAuthError` /
`StoreUnreachableError` with messages that name the endpoint, the bucket and the variables to set,
and never the secret: any botocore text put into a message goes through `redact_secrets` first.

Checksums (boto3 >= 1.36): the client keeps botocore's defaults, `request_checksum_calculation=
"when_supported"` (a CRC32 on every upload) and `response_checksum_validation="when_supported"`
(GETs are checked against the stored checksum). Our own uploads always pass `ChecksumSHA256`,
which botocore sends *instead of* its CRC32 (it skips its default when a checksum header is
present), so the server verifies the SHA-256 of the whole object. SeaweedFS 4.48 verifies both
(BadDigest on mismatch), stores the SHA-256 and returns it on HEAD/GET with ChecksumMode=ENABLED.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mitra_model.errors import StoreAuthError, StoreUnreachableError
from mitra_model.release import layout

# Error codes S3-compatible servers use for "these credentials are not accepted here".
AUTH_ERROR_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "403",  # HEAD responses carry no body, so botocore only has the status code
    }
)
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; plus AWS_SESSION_TOKEN for "
    "temporary keys)"
)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class StoreConfig(BaseModel):
    """Where releases are published: `s3://{bucket}/{prefix}/<variant>/...` at `endpoint_url`.

    Attributes:
        bucket: S3 bucket name (3-63 chars: lowercase letters, digits, '.', '-').
        prefix: key prefix without leading/trailing '/', e.g. "models/mitra"; may be empty.
        endpoint_url: e.g. "http://127.0.0.1:8333" for SeaweedFS; None lets boto3 decide
            (AWS, or `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` from the environment).
        region: signing region.
        connect_timeout_s / read_timeout_s: socket timeouts of every request.
        max_attempts: botocore's attempts per request (standard retry mode: throttling, 5xx and
            connection errors); our own retries are only for lost compare-and-swap races.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # a stall: no byte for this long ends the request, and a download (transfer._wait_or_stall)
    read_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    max_attempts: int = Field(default=3, ge=1, le=10)

    @field_validator("bucket")
    @classmethod
    def _valid_bucket(cls, value: str) -> str:
        if not _BUCKET_RE.match(value) or ".." in value:
            raise ValueError(
                f"bucket {value!r} is not a valid S3 bucket name: use 3-63 characters, lowercase "
                "letters, digits, '.' and '-', starting and ending with a letter or digit"
            )
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return value
        raise ValueError(f"bucket {value!r} looks like an IP address, which S3 does not allow")

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if value == "":
            return value
        if value.startswith("/") or value.endswith("/"):
            raise ValueError(
                f"prefix {value!r} must not start or end with '/': write it as {value.strip('/')!r}"
            )
        for segment in value.split("/"):
            if segment in ("", ".", "..") or not _PREFIX_SEGMENT_RE.match(segment):
                raise ValueError(
                    f"prefix {value!r} has an invalid segment {segment!r}: use '/'-separated "
                    "segments of letters, digits, '.', '_' and '-' (no empty, '.' or '..' segments)"
                )
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _valid_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"endpoint_url {value!r} must be an http(s) URL such as 'http://127.0.0.1:8333', "
                "or None to use AWS (or AWS_ENDPOINT_URL)"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(
                f"endpoint_url {value!r} must not carry credentials, a query or a fragment"
            )
        return value.rstrip("/")

    @field_validator("region")
    @classmethod
    def _valid_region(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9-]{2,32}$", value):
            raise ValueError(f"region {value!r} is not a region name such as 'us-east-1'")
        return value

    def key(self, *parts: str) -> str:
        """The object key of `parts` under the prefix: key("v", "x.onnx") -> "prefix/v/x.onnx".

        Release keys have their own functions in `layout` (`artifact_key`, `pointer_key` ...).
        """
        return layout.join_key(self.prefix, *parts)

    def results_folder(self) -> str:
        """Where Prefect persists task results when [execution] result_storage = "store"."""
        return layout.results_folder(self.prefix)

    def url(self, key: str = "") -> str:
        """`s3://bucket/key` for messages."""
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def http_url(self, key: str) -> str:
        """The object's HTTP address, for a browser: path-style on a custom endpoint, AWS's virtual-host
        style otherwise. It opens where the bucket is readable without credentials (a static site)."""
        if self.endpoint_url:
            return f"{self.endpoint_url}/{self.bucket}/{quote(key)}"
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{quote(key)}"


def make_s3_client(config: StoreConfig) -> Any:
    """A boto3 S3 client for `config`, with credentials from boto3's standard chain.

    Path-style addressing is used whenever `endpoint_url` is set (local stores such as SeaweedFS
    or MinIO do not serve `bucket.host` names).
    """
    boto_config = BotoConfig(
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        retries={"mode": "standard", "max_attempts": config.max_attempts},
        s3={"addressing_style": "path" if config.endpoint_url else "auto"},
        # Kept at botocore's defaults on purpose; see the module docstring.
        request_checksum_calculation="when_supported",
        response_checksum_validation="when_supported",
    )
    client = _new_session().client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region, config=boto_config
    )
    client.meta.events.register_first("needs-retry.s3", _one_stall_is_enough)
    return client


# botocore's JSON service descriptions (S3's model, endpoint rules, partitions), parsed once per process
# and shared by every session: parsing them made each new client cost ~80 ms of CPU, most of a no-op
# pull. A loader only reads and memoizes immutable files, so sharing it across threads is safe.
_SERVICE_DATA = botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))


def _new_session() -> boto3.session.Session:
    """A session of its own per client (boto3's sessions are not thread-safe; its clients are)."""
    core = botocore.session.get_session()
    core.register_component("data_loader", _SERVICE_DATA)
    return boto3.session.Session(botocore_session=core)


def _one_stall_is_enough(caught_exception: Exception | None = None, **_: Any) -> None:
    """botocore retries a read that timed out like any transient error, each retry as silent as the
    first: a store that stopped answering held a call for max_attempts x read_timeout_s. A timed-out
    read ends the call at once (store_errors names it); errors the store answers (5xx, throttling)
    and dropped connections are still retried."""
    if isinstance(caught_exception, ReadTimeoutError):
        raise caught_exception


def endpoint_of(client: Any) -> str:
    """The endpoint URL a client talks to (for messages)."""
    try:
        return str(client.meta.endpoint_url)
    except AttributeError:  # a stand-in client without `meta`
        return "<unknown endpoint>"


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_auth_error(exc: ClientError) -> bool:
    return error_code(exc) in AUTH_ERROR_CODES or http_status(exc) == 403


def _auth_error(client: Any, store: StoreConfig, action: str, detail: str | None) -> StoreAuthError:
    """`detail` None: no credentials were found at all (nothing was refused)."""
    what = (f"No S3 credentials were found for {action} at {endpoint_of(client)}" if detail is None else
            f"The S3 store at {endpoint_of(client)} refused the credentials for {action} ({detail})")
    return StoreAuthError(
        f"{what}. Set {CREDENTIAL_VARS} to a key that may read bucket {store.bucket!r}: "
        "pulling and listing only read; publishing also writes."
    )


@contextlib.contextmanager
def store_errors(client: Any, store: StoreConfig, action: str) -> Iterator[None]:
    """Map credential and connection failures inside the block to our typed errors.

    Every other exception (including other `ClientError`s such as 404 or 412, which callers
    handle) passes through unchanged. Messages name the endpoint, bucket and action, never the
    secret key (only the botocore error code is quoted, not its text).
    """
    try:
        yield
    except ClientError as exc:
        if is_auth_error(exc):
            raise _auth_error(client, store, action, f"{error_code(exc) or 'HTTP 403'}") from exc
        raise
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise _auth_error(client, store, action, None) from exc
    except (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError) as exc:
        raise StoreUnreachableError(
            f"Could not reach the S3 store at {endpoint_of(client)} for {action} "
            f"({type(exc).__name__}). Is the server running? Check the endpoint (--endpoint-url, "
            "$AWS_ENDPOINT_URL, or [store] endpoint_url in the configuration) and the network."
        ) from exc
    except (ReadTimeoutError, ResponseStreamingError) as exc:
        raise StoreUnreachableError(
            f"The S3 store at {endpoint_of(client)} stopped answering during {action} "
            f"({type(exc).__name__}). Retry, or raise [store] read_timeout_s in the configuration "
            "for slow links."
        ) from exc


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create `bucket` if it does not exist (for local stores; on AWS create buckets with IaC).

    Raises:
        StoreAuthError / StoreUnreachableError: as `store_errors`.
    """
    store = StoreConfig(bucket=bucket)
    with store_errors(client, store, f"checking bucket {bucket!r}"):
        try:
            client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if http_status(exc) != 404 and error_code(exc) not in ("404", "NoSuchBucket"):
                raise
    region = getattr(getattr(client, "meta", None), "region_name", None) or "us-east-1"
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    with store_errors(client, store, f"creating bucket {bucket!r}"):
        try:
            client.create_bucket(**kwargs)
        except ClientError as exc:
            if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


def is_not_found(exc: ClientError) -> bool:
    """The *object* does not exist (a missing bucket is a configuration error, not this)."""
    if error_code(exc) == "NoSuchBucket":
        return False
    return http_status(exc) == 404 or error_code(exc) in ("404", "NoSuchKey", "NotFound")


# Variables whose values are secrets. Read only to *remove* them from messages; boto3 reads them
# to sign requests.
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
REDACTED = "<redacted>"


def _client_secrets(client: Any) -> list[str]:
    """The secret key and session token a client signs with (whatever part of the chain gave them)."""
    try:
        credentials = client._request_signer._credentials  # noqa: SLF001 - botocore has no public accessor
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
    except Exception:  # noqa: BLE001 - a stand-in client, or a provider that cannot refresh now
        return []
    if frozen is None:
        return []
    return [value for value in (frozen.secret_key, frozen.token) if value]


def redact_secrets(text: str, client: Any = None) -> str:
    """`text` with every AWS secret key and session token replaced by "<redacted>".

    Servers and botocore may echo request details (a signature's canonical request, a presigned
    query) in error texts; this is applied wherever such a text goes into one of our messages.

    Args:
        text: a message that may quote botocore or the server.
        client: the boto3 client involved, so that secrets from profiles or SSO are removed too.

    Returns:
        The text without the secrets (secrets shorter than 4 characters are left alone: too
        likely to be ordinary text).
    """
    secrets = {os.environ.get(var, "") for var in SECRET_VARS} | set(_client_secrets(client))
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def describe_client_error(exc: ClientError, store: StoreConfig, client: Any = None) -> str:
    """A short reason for messages: the S3 error code and the server's message (secrets redacted),
    with the fix for the common ones."""
    code = error_code(exc) or f"HTTP {http_status(exc)}"
    if code == "NoSuchBucket":
        return (
            f"NoSuchBucket: bucket {store.bucket!r} does not exist at this endpoint: check the bucket in "
            "the release URL (s3://BUCKET/...) or [store] bucket in the configuration, and the endpoint "
            "(--endpoint-url / $AWS_ENDPOINT_URL)"
        )
    detail = str(exc.response.get("Error", {}).get("Message", "") or "").strip()
    return redact_secrets(f"{code}: {detail}" if detail else code, client)


def list_common_prefixes(client: Any, store: StoreConfig, folder: str) -> list[str]:
    """The names of the "subfolders" directly under `folder` (a key prefix without trailing '/').

    Raises:
        StoreAuthError / StoreUnreachableError: as `store_errors`.
        botocore ClientError: any other refusal.
    """
    names: list[str] = []
    start = f"{folder}/" if folder else ""
    with store_errors(client, store, f"listing {store.url(start)}"):
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=start, Delimiter="/"
        ):
            names += [p["Prefix"][len(start):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def list_objects(client: Any, store: StoreConfig, folder: str) -> list[dict[str, Any]]:
    """Every object directly or indirectly under `folder`: dicts with Key, Size, LastModified.

    Raises:
        StoreAuthError / StoreUnreachableError: as `store_errors`.
        botocore ClientError: any other refusal.
    """
    start = f"{folder}/" if folder else ""
    found: list[dict[str, Any]] = []
    with store_errors(client, store, f"listing {store.url(start)}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=start):
            found += page.get("Contents", [])
    return sorted(found, key=lambda item: item["Key"])
