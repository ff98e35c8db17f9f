"""publish_build against a real SeaweedFS server: idempotence, conflicts, crashes, races, auth."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import threading
import traceback
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from s3_fixtures import (
    TEST_SECRET_KEY,
    CrashingClient,
    SimulatedCrash,
    list_keys,
    make_build,
    read_json_object,
    start_private_server,
    store_for,
)

from mitra_model.cli.local_s3 import LocalS3Server, free_ports
from mitra_model.errors import (
    PublishError,
    PullError,
    StoreAuthError,
    StoreError,
    StoreUnreachableError,
    VersionConflictError,
)
from mitra_model.release import layout
from mitra_model.release.layout import POINTER_SCHEMA_ID
from mitra_model.release.publish import DocumentRenderer, PublishResult, publish_build
from mitra_model.release.pull import pull_release
from mitra_model.release.store import StoreConfig, ensure_bucket, make_s3_client
from mitra_model.report import release_documents

pytestmark = pytest.mark.usefixtures("time_limit")

VARIANT = "mitra-classifier"


def _version(build: Path) -> str:
    return json.loads((build / "manifest.json").read_text())["version"]


def _pointer(client: Any, store: StoreConfig, variant: str = VARIANT) -> dict[str, Any] | None:
    found = read_json_object(client, store, layout.pointer_key(store.prefix, variant))
    return None if found is None else found[0]


STALE_POINTER = "refused: pointer behind the release log"


def _consumer_sees(client: Any, store: StoreConfig, dest: Path) -> str | None:
    """What a consumer following the pointer gets: a fully verified version, None, or a refusal.

    A crash between claiming release record N+1 and moving the pointer leaves the pointer one
    behind the log; pull refuses that (it cannot tell it from a rolled-back pointer) until the
    publish is re-run. Refusing is safe: nothing partial is ever seen.
    """
    pointer = _pointer(client, store)
    if pointer is None:
        return None
    try:
        return pull_release(VARIANT, dest=dest, client=client, store=store, progress=False).version
    except PullError:
        next_record = layout.release_record_key(store.prefix, VARIANT, pointer["manifest_version"] + 1)
        if read_json_object(client, store, next_record) is None:
            raise
        return STALE_POINTER


def _assert_consistent(client: Any, store: StoreConfig, expected_mv: int) -> dict[str, Any]:
    """The pointer names the newest release record and a manifest with the pinned sha."""
    pointer = _pointer(client, store)
    assert pointer is not None
    assert pointer["schema"] == POINTER_SCHEMA_ID
    assert pointer["manifest_version"] == expected_mv
    manifest, raw = read_json_object(client, store, pointer["manifest_key"])
    assert hashlib.sha256(raw).hexdigest() == pointer["manifest_sha256"]
    assert manifest["manifest_version"] == expected_mv
    record, _ = read_json_object(client, store, layout.release_record_key(store.prefix, VARIANT, expected_mv))
    assert record == pointer
    assert read_json_object(client, store, layout.release_record_key(store.prefix, VARIANT, expected_mv + 1)) is None
    return pointer


def _chain(client: Any, store: StoreConfig, newest: int) -> None:
    """Each release's previous_manifest_sha256 is the sha of release mv-1's manifest."""
    previous = None
    for mv in range(1, newest + 1):
        record, _ = read_json_object(client, store, layout.release_record_key(store.prefix, VARIANT, mv))
        manifest, raw = read_json_object(client, store, record["manifest_key"])
        assert hashlib.sha256(raw).hexdigest() == record["manifest_sha256"]
        assert manifest["manifest_version"] == mv
        assert manifest["previous_manifest_sha256"] == previous
        previous = record["manifest_sha256"]


# -- StoreConfig ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"bucket": "AB"}, "not a valid S3 bucket name"),
        ({"bucket": "ok-bucket", "prefix": "/models"}, "must not start or end with '/'"),
        ({"bucket": "ok-bucket", "prefix": "models/"}, "must not start or end with '/'"),
        ({"bucket": "ok-bucket", "prefix": "a//b"}, "invalid segment"),
        ({"bucket": "ok-bucket", "prefix": "a/../b"}, "invalid segment"),
        ({"bucket": "ok-bucket", "endpoint_url": "ftp://host"}, "must be an http(s) URL"),
    ],
)
def test_store_config_rejects_bad_values(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        StoreConfig(**kwargs)


def test_store_config_keys_and_frozen() -> None:
    store = StoreConfig(bucket="ok-bucket", prefix="a/b", endpoint_url="http://127.0.0.1:8333/")
    assert store.endpoint_url == "http://127.0.0.1:8333"
    assert store.key("v", "x.onnx") == "a/b/v/x.onnx"
    assert StoreConfig(bucket="ok-bucket").key("v", "x.onnx") == "v/x.onnx"
    with pytest.raises(ValidationError):
        store.bucket = "other"  # type: ignore[misc]


def test_a_new_client_parses_no_service_description_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pull and publish makes its own client (sessions are not thread-safe); S3's service
    description is parsed once per process, not once per client (it was most of a no-op pull)."""
    import botocore.loaders

    store = StoreConfig(bucket="ok-bucket", endpoint_url="http://127.0.0.1:9")
    make_s3_client(store)
    parsed: list[str] = []
    real_load = botocore.loaders.JSONFileLoader.load_file
    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file",
                        lambda self, path: parsed.append(path) or real_load(self, path))
    first, second = make_s3_client(store), make_s3_client(store)
    assert parsed == []
    assert first is not second and first.meta.events is not second.meta.events  # still a session each

# -- publishing ----------------------------------------------------------------------------------


def test_publish_writes_layout_and_republish_is_noop(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    build = make_build(tmp_path, seed=1)
    version = _version(build)
    first = publish_build(build, client=s3_client, store=s3_store)

    base = f"{s3_store.prefix}/{VARIANT}"
    assert isinstance(first, PublishResult)
    assert first.manifest_version == 1 and not first.already_published
    assert first.uploaded == [
        f"{base}/{version}/model.onnx",
        f"{base}/{version}/model-int8.onnx",
        f"{base}/{version}/manifest.json",
        f"{base}/_releases/00000001.json",
        f"{base}/latest.json",
    ]
    # beside the release, the bucket's static pages (views of the log, not part of any release)
    pages = [layout.index_key(s3_store.prefix), layout.index_key(s3_store.prefix, VARIANT)]
    assert sorted([*first.uploaded, *pages]) == list_keys(s3_client, s3_store)
    pointer = _assert_consistent(s3_client, s3_store, 1)
    assert pointer == {
        "schema": POINTER_SCHEMA_ID,
        "variant": VARIANT,
        "version": version,
        "manifest_key": first.manifest_key,
        "manifest_sha256": first.manifest_sha256,
        "manifest_version": 1,
    }
    manifest, _ = read_json_object(s3_client, s3_store, first.manifest_key)
    assert manifest["previous_manifest_sha256"] is None
    assert [a["s3_key"] for a in manifest["artifacts"]] == first.uploaded[:2]

    again = publish_build(build, client=s3_client, store=s3_store)
    assert again.already_published and again.uploaded == []
    assert (again.manifest_sha256, again.manifest_version) == (first.manifest_sha256, 1)

    second = publish_build(make_build(tmp_path, seed=2), client=s3_client, store=s3_store)
    assert second.manifest_version == 2
    _assert_consistent(s3_client, s3_store, 2)
    _chain(s3_client, s3_store, 2)

    # Republishing the superseded release writes nothing and does not roll the pointer back.
    old = publish_build(build, client=s3_client, store=s3_store)
    assert old.already_published and old.manifest_version == 1
    assert _pointer(s3_client, s3_store)["version"] == second.version


def test_different_artifact_under_existing_version_conflicts(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path
) -> None:
    first = make_build(tmp_path, seed=1)
    publish_build(first, client=s3_client, store=s3_store)
    before = list_keys(s3_client, s3_store)
    impostor = make_build(tmp_path, seed=99, version=_version(first))

    with pytest.raises(VersionConflictError) as info:
        publish_build(impostor, client=s3_client, store=s3_store)
    message = str(info.value)
    draft = json.loads((impostor / "manifest.json").read_text())
    assert f"{_version(first)}/model.onnx" in message
    assert draft["artifacts"][0]["sha256"] in message
    assert json.loads((first / "manifest.json").read_text())["artifacts"][0]["sha256"] in message
    assert list_keys(s3_client, s3_store) == before
    assert _pointer(s3_client, s3_store)["version"] == _version(first)


def test_different_source_under_existing_version_conflicts(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path
) -> None:
    build = make_build(tmp_path, seed=1)
    publish_build(build, client=s3_client, store=s3_store)
    draft = json.loads((build / "manifest.json").read_text())
    draft["source"]["files"][1]["sha256"] = "0" * 64  # same artifacts, other weights
    (build / "manifest.json").write_text(json.dumps(draft))

    with pytest.raises(VersionConflictError, match="manifest.json already exists for a different build"):
        publish_build(build, client=s3_client, store=s3_store)


@pytest.mark.parametrize("damage", ["failed-verification", "missing-file", "wrong-sha256", "wrong-size"])
def test_refused_draft_writes_nothing(s3_store: StoreConfig, s3_client: Any, tmp_path: Path, damage: str) -> None:
    build = make_build(tmp_path, seed=3, passed=damage != "failed-verification")
    if damage == "missing-file":
        (build / "model-int8.onnx").unlink()
    elif damage == "wrong-sha256":
        data = bytearray((build / "model.onnx").read_bytes())
        data[10] ^= 0xFF
        (build / "model.onnx").write_bytes(bytes(data))
    elif damage == "wrong-size":
        with open(build / "model.onnx", "ab") as handle:
            handle.write(b"extra")

    with pytest.raises(PublishError, match="nothing was uploaded"):
        publish_build(build, client=s3_client, store=s3_store)
    assert list_keys(s3_client, s3_store) == []


@pytest.mark.parametrize(("after", "first_release", "documents"), [
    (False, False, None), (True, False, None), (False, True, None), (True, True, None),
    (True, False, release_documents),  # the card and report are written before the manifest that lists them
], ids=["crash-before-call-second-release", "crash-after-call-second-release", "crash-before-call-first-release",
        "crash-after-call-first-release", "crash-after-call-second-release-with-documents"])
def test_publish_interrupted_at_every_call_converges(
    s3_server: LocalS3Server, s3_store: StoreConfig, s3_client: Any, tmp_path: Path, after: bool, first_release: bool,
    documents: DocumentRenderer | None,
) -> None:
    """Crash the N-th S3 call of a publish, for every N: a consumer sees the old release (or, for the
    first one, nothing) or the new one, complete; a plain re-run finishes the publish."""
    v1, v2 = make_build(tmp_path, seed=1), make_build(tmp_path, seed=2)
    publish = functools.partial(publish_build, documents=documents)
    expected_mv = 1 if first_release else 2
    completed_at = None
    for n in range(1, 100):
        store = store_for(s3_server.endpoint_url, bucket=s3_store.bucket, prefix=f"crash/{n}")
        first = None if first_release else publish(v1, client=s3_client, store=store)
        crashing = CrashingClient(s3_client, crash_at=n, after=after)
        try:
            publish(v2, client=crashing, store=store)
            completed_at = n
        except SimulatedCrash:
            pass
        seen = _consumer_sees(s3_client, store, tmp_path / f"consumer-{n}")
        allowed = (None, _version(v2)) if first_release else (_version(v1), _version(v2), STALE_POINTER)
        assert seen in allowed, f"crash at call {n}: consumer saw {seen}"

        rerun = publish(v2, client=s3_client, store=store)
        assert (rerun.version, rerun.manifest_version) == (_version(v2), expected_mv), f"crash at call {n}"
        pointer = _assert_consistent(s3_client, store, expected_mv)
        manifest, _ = read_json_object(s3_client, store, pointer["manifest_key"])
        assert manifest["previous_manifest_sha256"] == (None if first is None else first.manifest_sha256)
        # the explicit version pulls too, whatever the crash left behind
        assert pull_release(VARIANT, version=_version(v2), dest=tmp_path / f"explicit-{n}", client=s3_client,
                            store=store, progress=False).version == _version(v2)
        if completed_at is not None:
            break
    # every call of a publish was hit: the first run without a crash had one call fewer than n
    counting = CrashingClient(s3_client)
    store = store_for(s3_server.endpoint_url, bucket=s3_store.bucket, prefix="crash/count")
    if not first_release:
        publish(v1, client=s3_client, store=store)
    publish(v2, client=counting, store=store)
    assert completed_at == len(counting.calls) + 1 and len(counting.calls) > 5


def test_lost_race_for_manifest_version_renumbers(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    slow, fast = make_build(tmp_path, seed=1), make_build(tmp_path, seed=2)
    record_1 = layout.release_record_key(s3_store.prefix, VARIANT, 1)

    def let_fast_win(n: int, name: str, kwargs: dict[str, Any]) -> None:
        if name == "put_object" and kwargs.get("Key") == record_1 and not fast_done:
            fast_done.append(publish_build(fast, client=s3_client, store=s3_store))

    fast_done: list[PublishResult] = []
    result = publish_build(slow, client=CrashingClient(s3_client, hook=let_fast_win), store=s3_store)
    assert fast_done[0].manifest_version == 1
    assert result.manifest_version == 2 and result.version == _version(slow)
    _assert_consistent(s3_client, s3_store, 2)
    _chain(s3_client, s3_store, 2)


def test_a_renumbered_release_renders_its_documents_again(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    """The documents say which release came before: a manifest that lost its number gets them anew."""
    slow, fast = make_build(tmp_path, seed=1), make_build(tmp_path, seed=2)
    record_1 = layout.release_record_key(s3_store.prefix, VARIANT, 1)

    def let_fast_win(n: int, name: str, kwargs: dict[str, Any]) -> None:
        if name == "put_object" and kwargs.get("Key") == record_1 and not fast_done:
            fast_done.append(publish_build(fast, client=s3_client, store=s3_store, documents=release_documents))

    fast_done: list[PublishResult] = []
    result = publish_build(slow, client=CrashingClient(s3_client, hook=let_fast_win), store=s3_store,
                           documents=release_documents)
    assert result.manifest_version == 2
    pulled = pull_release(VARIANT, dest=tmp_path / "dest", client=s3_client, store=s3_store, progress=False)
    assert f"Compared with {VARIANT} {fast_done[0].version} (release 1)" in pulled.documents["report.html"].read_text()
    assert f"{_version(slow)} (release 2)" in pulled.documents["README.md"].read_text()


def test_slow_racer_never_rolls_the_pointer_back(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    slow, fast = make_build(tmp_path, seed=1), make_build(tmp_path, seed=2)
    pointer_key = layout.pointer_key(s3_store.prefix, VARIANT)

    def newer_release_first(n: int, name: str, kwargs: dict[str, Any]) -> None:
        if name == "put_object" and kwargs.get("Key") == pointer_key and not fast_done:
            fast_done.append(publish_build(fast, client=s3_client, store=s3_store))

    fast_done: list[PublishResult] = []
    result = publish_build(slow, client=CrashingClient(s3_client, hook=newer_release_first), store=s3_store)
    assert result.manifest_version == 1 and pointer_key not in result.uploaded
    assert fast_done[0].manifest_version == 2
    pointer = _assert_consistent(s3_client, s3_store, 2)
    assert pointer["version"] == _version(fast)


def test_racing_publishers_leave_a_consistent_pointer(s3_store: StoreConfig, tmp_path: Path) -> None:
    builds = [make_build(tmp_path, seed=10 + i) for i in range(4)]
    clients = [make_s3_client(s3_store) for _ in builds]
    barrier = threading.Barrier(len(builds))
    results: dict[int, PublishResult] = {}
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[i] = publish_build(builds[i], client=clients[i], store=s3_store)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(builds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=45)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert sorted(r.manifest_version for r in results.values()) == [1, 2, 3, 4]
    client = clients[0]
    pointer = _assert_consistent(client, s3_store, 4)
    newest = next(r for r in results.values() if r.manifest_version == 4)
    assert pointer["version"] == newest.version
    assert pointer["manifest_sha256"] == newest.manifest_sha256
    _chain(client, s3_store, 4)
    pulled = pull_release(VARIANT, dest=tmp_path / "dest", client=clients[0], store=s3_store, progress=False)
    assert pulled.version == newest.version


class _KillingProxy:
    """A TCP proxy in front of the S3 server. Once armed, it kills the server after `after_bytes` more
    bytes of requests went over the wire: the server dies while an upload is in flight (botocore
    hashes the body before sending it, so a crash inside the body reader would come too early)."""

    def __init__(self, target_port: int, kill: Any) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._target, self._kill, self._lock = target_port, kill, threading.Lock()
        self._left: int | None = None  # bytes to forward before the kill; None: not armed
        self.killed_after: int | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, after_bytes: int) -> None:
        with self._lock:
            self._left, self._after = after_bytes, after_bytes

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:  # the server is down: the client sees a closed connection
                downstream.close()
                continue
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                if request:
                    self._count(len(data))
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def _count(self, n: int) -> None:
        with self._lock:
            if self._left is None:
                return
            self._left -= n
            if self._left <= 0:
                self._left, self.killed_after = None, self._after - self._left
                self._kill()


def _upload_is_cut(server: LocalS3Server, tmp_path: Path, store: StoreConfig, build: Path) -> None:
    """The server is killed while model.onnx is on the wire; the publish fails naming the endpoint."""
    proxy = _KillingProxy(int(server.endpoint_url.rsplit(":", 1)[1]), server.kill)
    try:
        via_proxy = make_s3_client(store.model_copy(update={"endpoint_url": proxy.endpoint_url}))

        def arm_on_the_big_upload(n: int, name: str, kwargs: dict[str, Any]) -> None:
            if name == "put_object" and (kwargs.get("Key") or "").endswith("model.onnx"):
                proxy.arm(after_bytes=1 << 20)

        with pytest.raises(StoreUnreachableError, match=proxy.endpoint_url):
            publish_build(build, client=CrashingClient(via_proxy, hook=arm_on_the_big_upload), store=store)
        assert proxy.killed_after is not None and proxy.killed_after < (build / "model.onnx").stat().st_size
        assert not server.is_running()
    finally:
        proxy.close()


@pytest.mark.parametrize("when", ["mid-upload", "before-manifest", "before-pointer"])
def test_server_killed_then_restarted_publish_completes(tmp_path: Path, when: str, s3_server: LocalS3Server) -> None:
    server = start_private_server(tmp_path / "seaweedfs")
    try:
        store = store_for(server.endpoint_url)
        client = make_s3_client(store)
        ensure_bucket(client, store.bucket)
        big = 9 << 20  # above pull's progress-bar threshold
        build = make_build(tmp_path, seed=5, artifacts=(("fp32", "model.onnx", big, "fp32"),))
        version = _version(build)

        if when == "mid-upload":
            _upload_is_cut(server, tmp_path, store, build)
        else:
            def kill_server(n: int, name: str, kwargs: dict[str, Any]) -> None:
                key = kwargs.get("Key") or ""
                if name == "put_object" and not killed and key.endswith(
                        "manifest.json" if when == "before-manifest" else "latest.json"):
                    killed.append(server.kill())

            killed: list[None] = []
            with pytest.raises(StoreUnreachableError, match=server.endpoint_url):
                publish_build(build, client=CrashingClient(client, hook=kill_server), store=store)
            assert killed and not server.is_running()

        server.start()  # same dir, same ports
        assert _pointer(client, store) is None  # nothing half-published is visible
        result = publish_build(build, client=client, store=store)
        assert (result.version, result.manifest_version) == (version, 1)
        _assert_consistent(client, store, 1)
        pulled = pull_release(VARIANT, dest=tmp_path / "dest", client=client, store=store, progress=True)
        assert (tmp_path / "dest" / "model.onnx").read_bytes() == (build / "model.onnx").read_bytes()
        assert pulled.version == version
    finally:
        server.kill()  # fast; the graceful stop() is covered by test_local_server_lifecycle


def test_local_server_lifecycle(tmp_path: Path, s3_server: LocalS3Server) -> None:
    with LocalS3Server(tmp_path / "seaweedfs") as server:
        pid = server.pid
        assert pid is not None and server.is_running()
        client = make_s3_client(store_for(server.endpoint_url, bucket="lifecycle"))
        ensure_bucket(client, "lifecycle")
        ensure_bucket(client, "lifecycle")  # idempotent
        assert client.list_buckets()["Buckets"][0]["Name"] == "lifecycle"
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    assert (tmp_path / "seaweedfs" / "weed-mini.log").stat().st_size > 0
    assert not [p for port in server.ports.values() for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]


# -- credentials and reachability -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["secret", "access-key"])
def test_wrong_credentials_raise_store_auth_error_without_the_secret(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    build = make_build(tmp_path, seed=1)
    publish_build(build, client=s3_client, store=s3_store)  # something to pull
    wrong_secret = "wrong-secret-Qm4rT9zK"
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-we-know")
    bad_client = make_s3_client(s3_store)

    attempts = [
        lambda: publish_build(make_build(tmp_path, seed=2), client=bad_client, store=s3_store),
        lambda: pull_release(VARIANT, dest=tmp_path / "dest", client=bad_client, store=s3_store),
    ]
    for attempt in attempts:
        with pytest.raises(StoreAuthError) as info:
            attempt()
        full = "".join(traceback.format_exception(info.value))  # message and the chained cause
        assert wrong_secret not in full and TEST_SECRET_KEY not in full
        message = str(info.value)
        assert s3_store.endpoint_url in message and s3_store.bucket in message
        assert "AWS_SECRET_ACCESS_KEY" in message and "AWS_ACCESS_KEY_ID" in message
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())
    assert _pointer(s3_client, s3_store)["manifest_version"] == 1


def test_unreachable_endpoint_raises_store_unreachable_error(tmp_path: Path, s3_server: LocalS3Server) -> None:
    (port,) = free_ports(1)
    store = StoreConfig(bucket="nobody-home", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    with pytest.raises(StoreUnreachableError, match=f"127.0.0.1:{port}"):
        publish_build(make_build(tmp_path, seed=1), client=make_s3_client(store), store=store)
    with pytest.raises(StoreUnreachableError):
        pull_release(VARIANT, dest=tmp_path / "dest", client=make_s3_client(store), store=store)


def test_pull_of_missing_variant_is_a_clean_error(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    with pytest.raises(PullError, match="nothing was published under that name. .* has no released variant"):
        pull_release(VARIANT, dest=tmp_path / "dest", client=s3_client, store=s3_store)
    publish_build(make_build(tmp_path, seed=2), client=s3_client, store=s3_store)
    with pytest.raises(PullError, match=f"No release of 'mitra-clasifier' .* Variants released there: {VARIANT}\\."):
        pull_release("mitra-clasifier", dest=tmp_path / "dest", client=s3_client, store=s3_store)


def test_missing_bucket_is_a_clear_error(s3_server: LocalS3Server, tmp_path: Path) -> None:
    store = store_for(s3_server.endpoint_url)  # never created
    client = make_s3_client(store)
    with pytest.raises(PublishError, match=f"bucket '{store.bucket}' does not exist"):
        publish_build(make_build(tmp_path, seed=1), client=client, store=store)
    # the pull's first read goes through the one reader of the store's documents: StoreError
    with pytest.raises(StoreError, match=f"bucket '{store.bucket}' does not exist"):
        pull_release(VARIANT, dest=tmp_path / "dest", client=client, store=store)
    assert not (tmp_path / "dest").exists()


def test_seaweedfs_checksum_behaviour(s3_store: StoreConfig, s3_client: Any) -> None:
    """What publish relies on, pinned as a test (SeaweedFS 4.48, boto3 >= 1.36 defaults)."""
    import base64

    from botocore.exceptions import ClientError

    data = b"mitra" * 1000
    sha_b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()
    bucket = s3_store.bucket
    # boto3's default (request_checksum_calculation="when_supported") sends a CRC32 the server keeps.
    s3_client.put_object(Bucket=bucket, Key="crc", Body=data)
    head = s3_client.head_object(Bucket=bucket, Key="crc", ChecksumMode="ENABLED")
    assert "ChecksumCRC32" in head and "ChecksumSHA256" not in head
    # An explicit ChecksumSHA256 replaces the CRC32; the server stores and returns it.
    s3_client.put_object(Bucket=bucket, Key="sha", Body=data, ChecksumSHA256=sha_b64, IfNoneMatch="*")
    head = s3_client.head_object(Bucket=bucket, Key="sha", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == sha_b64 and "ChecksumCRC32" not in head
    # A wrong digest is refused and nothing is stored; If-None-Match refuses an existing key.
    with pytest.raises(ClientError, match="BadDigest"):
        s3_client.put_object(Bucket=bucket, Key="bad", Body=data + b"!", ChecksumSHA256=sha_b64)
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3_client.put_object(Bucket=bucket, Key="sha", Body=data, IfNoneMatch="*")
    assert list_keys(s3_client, s3_store) == ["crc", "sha"]
    # If-Match on a stale ETag loses (the pointer's compare-and-swap).
    etag = head["ETag"]
    s3_client.put_object(Bucket=bucket, Key="sha", Body=b"new", IfMatch=etag)
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3_client.put_object(Bucket=bucket, Key="sha", Body=b"newer", IfMatch=etag)
