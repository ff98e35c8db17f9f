"""Fixtures and helpers for tests against a real SeaweedFS S3 server (no mocks).

A pytest plugin (conftest.py's `pytest_plugins`): every test module can request its fixtures by
name; helpers are imported (`from s3_fixtures import make_build, ...`).

- `s3_server` (session): one `weed mini` on free ports in a temp dir, with fixed test credentials
  in the environment, so boto3's standard chain (what `make_s3_client` uses) finds them. Tests
  that start their own server (`start_private_server`) request `s3_server` for the credentials.
- `s3_store` / `s3_client` (per test): a fresh bucket, so tests never see each other's objects.
- `make_build`: a fake build directory (small random "onnx" files + a draft manifest).
- `CrashingClient`: a client whose N-th S3 call raises `SimulatedCrash`.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mitra_model.cli.local_s3 import LocalS3Server
from mitra_model.release.layout import MANIFEST_NAME, MANIFEST_SCHEMA_ID, verification_report_name
from mitra_model.release.store import StoreConfig, ensure_bucket, make_s3_client

TEST_ACCESS_KEY = "mitra-test-access"
TEST_SECRET_KEY = "mitra-test-secret-Zq83vLx0"  # tests assert it never shows up in messages
TEST_PREFIX = "releases/test"

# Variables that would point boto3 somewhere else than the test server.
_CLEARED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)

TEST_TIME_LIMIT_S = 60


@pytest.fixture
def time_limit() -> Iterator[None]:
    """Fail a test that runs longer than TEST_TIME_LIMIT_S (SIGALRM; main thread only).

    Use per module: `pytestmark = pytest.mark.usefixtures("time_limit")`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"test exceeded its {TEST_TIME_LIMIT_S} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _test_env(home: Path) -> pytest.MonkeyPatch:
    """Fixed test credentials in the environment; no user AWS config, profile or endpoint."""
    patch = pytest.MonkeyPatch()
    for var in _CLEARED_ENV:
        patch.delenv(var, raising=False)
    patch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    patch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    patch.setenv("AWS_CONFIG_FILE", str(home / "config"))  # missing files: nothing read
    patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe instance metadata
    return patch


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """The session's SeaweedFS server; while it runs, the test credentials are in os.environ."""
    env = _test_env(tmp_path_factory.mktemp("aws-home"))
    server = LocalS3Server(tmp_path_factory.mktemp("seaweedfs"), access_key=TEST_ACCESS_KEY, secret_key=TEST_SECRET_KEY,
                           startup_timeout_s=60)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        env.undo()


def start_private_server(data_dir: Path) -> LocalS3Server:
    """A server of its own (for tests that kill it); the caller stops it."""
    return LocalS3Server(
        data_dir, access_key=TEST_ACCESS_KEY, secret_key=TEST_SECRET_KEY, startup_timeout_s=60
    ).start()


def new_bucket_name() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def store_for(endpoint_url: str, bucket: str | None = None, prefix: str = TEST_PREFIX) -> StoreConfig:
    # Short timeouts and few attempts: a dead server fails the test in seconds, not minutes.
    return StoreConfig(
        bucket=bucket or new_bucket_name(),
        prefix=prefix,
        endpoint_url=endpoint_url,
        connect_timeout_s=2,
        read_timeout_s=20,
        max_attempts=2,
    )


_bucket_clients: dict[str, Any] = {}  # the client that created a test bucket, reused by s3_client


@pytest.fixture
def s3_store(s3_server: LocalS3Server) -> Iterator[StoreConfig]:
    """A StoreConfig for a fresh, existing bucket on the session server."""
    store = store_for(s3_server.endpoint_url)
    client = make_s3_client(store)
    ensure_bucket(client, store.bucket)
    _bucket_clients[store.bucket] = client
    yield store
    _bucket_clients.pop(store.bucket, None)
    _delete_bucket(client, store.bucket)


def _delete_bucket(client: Any, bucket: str) -> None:
    """Empty and remove a test's bucket. SeaweedFS gives every bucket volumes of its own and runs out
    of them after ~70 buckets on one server (PUTs then fail with InternalError); the session server
    serves hundreds of tests."""
    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for entry in (*page.get("Versions", []), *page.get("DeleteMarkers", [])):
                client.delete_object(Bucket=bucket, Key=entry["Key"], VersionId=entry["VersionId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for entry in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=entry["Key"])
        client.delete_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - a test that broke its bucket (or the server) on purpose
        pass


@pytest.fixture
def s3_client(s3_store: StoreConfig) -> Any:
    """A client (test credentials) for `s3_store`."""
    return _bucket_clients.get(s3_store.bucket) or make_s3_client(s3_store)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DEFAULT_ARTIFACTS = (("fp32", "model.onnx", 6000, "fp32"), ("int8", "model-int8.onnx", 3000, "int8"))


def make_build(
    root: Path,
    *,
    variant: str = "mitra-classifier",
    seed: int = 0,
    artifacts: tuple[tuple[str, str, int, str], ...] = DEFAULT_ARTIFACTS,
    passed: bool = True,
    version: str | None = None,
    real_files: dict[str, Path] | None = None,
    task: str | None = None,
) -> Path:
    """Write a fake build dir: random artifact bytes (from `seed`) and a draft manifest.

    `artifacts` rows are (name, file, size, precision). The version is derived from the content
    (like the real pipeline) unless given, so the same seed gives the same version. `real_files`
    (artifact name -> a file) replaces an artifact's random bytes by a real file's, and `task`
    ("CLASSIFICATION" / "REGRESSION") records the model's task, for tests that run the artifacts.
    """
    rng = random.Random(seed)
    build = root / f"build-{variant}-{seed}-{uuid.uuid4().hex[:6]}"
    build.mkdir(parents=True)
    weights = rng.randbytes(512)
    source_files = [
        {"path": "config.json", "size": 64, "sha256": _sha(b"config" + bytes([seed % 256]))},
        {"path": "model.safetensors", "size": len(weights), "sha256": _sha(weights)},
    ]
    entries = []
    for name, file, size, precision in artifacts:
        data = rng.randbytes(size) if name not in (real_files or {}) else (real_files or {})[name].read_bytes()
        size = len(data)
        (build / file).write_bytes(data)
        entries.append(
            {
                "name": name,
                "file": file,
                "size": size,
                "sha256": _sha(data),
                "precision": precision,
                "flavour": "portable",
                "runtimes": ["onnxruntime>=1.17"],
                "inputs": [
                    {"name": "x_support", "dtype": "float32", "shape": ["batch", "n_support", "n_features"]}
                ],
                "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", "n_query", 10]}],
            }
        )
    content = json.dumps([source_files, [(e["file"], e["sha256"]) for e in entries]]).encode()
    manifest = {
        "schema": MANIFEST_SCHEMA_ID,
        "variant": variant,
        "version": version or f"r-{_sha(content)[:16]}",
        "source": {
            "repo_id": "autogluon/mitra-classifier",
            "requested_revision": "main",
            "resolved_commit": _sha(b"commit" + bytes([seed % 256]))[:40],
            "synthetic": True,
            "files": source_files,
        },
        "build": {
            "toolchain": {"torch": "2.13.0", "onnx": "1.19.0", "onnxruntime": "1.23.0",
                          "python": "3.11.7", "mitra_build": "0.1.0"},
            "opset": 17,
            "config_sha256": _sha(b"config-toml"),
            "exporter": {"name": "torch.onnx.export", "dynamo": False},
        },
        "artifacts": entries,
        "verification": {
            precision: {
                "passed": passed,
                "cells": 14,
                "failed_cells": 0 if passed else 3,
                "max_abs_err": 1e-6 if passed else 0.5,
                "report": verification_report_name(precision),
            }
            for _, _, _, precision in artifacts
        },
    }
    if task is not None:
        manifest["model"] = {"task": task}
    (build / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return build


class SimulatedCrash(Exception):
    """Raised by CrashingClient: the publisher 'dies' at this S3 call."""


class CrashingClient:
    """Forwards to a real boto3 client; the `crash_at`-th S3 call raises SimulatedCrash.

    With `after=False` the call never reaches the server; with `after=True` it runs and the crash
    comes right after (the server applied it, the publisher never learned). `hook(n, name, kwargs)`
    runs before each call (e.g. to kill the server between calls).
    """

    def __init__(
        self,
        client: Any,
        crash_at: int | None = None,
        *,
        after: bool = False,
        hook: Callable[[int, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._client = client
        self.crash_at = crash_at
        self.after = after
        self.hook = hook
        self.calls: list[tuple[str, str | None]] = []

    @property
    def crashed(self) -> bool:
        return self.crash_at is not None and len(self.calls) >= self.crash_at

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or name == "meta" or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs.get("Key")))
            n = len(self.calls)
            if self.hook is not None:
                self.hook(n, name, kwargs)
            if n == self.crash_at and not self.after:
                raise SimulatedCrash(f"crash before call {n}: {name} {kwargs.get('Key')}")
            try:
                return attr(*args, **kwargs)
            finally:  # also when the call itself failed (a 404, a 412): the answer is lost
                if n == self.crash_at and self.after:
                    raise SimulatedCrash(f"crash after call {n}: {name} {kwargs.get('Key')}")

        return call


def list_keys(client: Any, store: StoreConfig) -> list[str]:
    """Every key in the store's bucket (small test buckets: one page is enough)."""
    response = client.list_objects_v2(Bucket=store.bucket)
    return sorted(item["Key"] for item in response.get("Contents", []))


def read_json_object(client: Any, store: StoreConfig, key: str) -> tuple[Any, bytes] | None:
    """The parsed JSON and raw bytes at `key`, or None if missing."""
    try:
        raw = client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(raw), raw


def put_raw(client: Any, store: StoreConfig, key: str, data: bytes) -> None:
    """Overwrite `key` unconditionally (what an attacker or a broken tool would do)."""
    client.put_object(Bucket=store.bucket, Key=key, Body=data)
