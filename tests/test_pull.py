"""pull_release against a real SeaweedFS server: round trip, tampering, unsafe names, old versions."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from s3_fixtures import CrashingClient, SimulatedCrash, list_keys, make_build, put_raw, read_json_object

from mitra_model.errors import ChecksumMismatchError, PullError
from mitra_model.release import layout
from mitra_model.release.layout import PULL_STATE_NAME
from mitra_model.release.publish import PublishResult, publish_build
from mitra_model.release.pull import PullResult, pull_release
from mitra_model.release.rules import canonical_json
from mitra_model.release.store import StoreConfig

pytestmark = pytest.mark.usefixtures("time_limit")

VARIANT = "mitra-classifier"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pull(client: Any, store: StoreConfig, dest: Path, version: str = "latest") -> PullResult:
    return pull_release(VARIANT, version=version, dest=dest, client=client, store=store, progress=False)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _published(client: Any, store: StoreConfig, tmp_path: Path, seed: int = 1) -> tuple[Path, PublishResult]:
    build = make_build(tmp_path, seed=seed)
    return build, publish_build(build, client=client, store=store)


def _plant(client: Any, store: StoreConfig, result: PublishResult, mutate: Any) -> None:
    """Replace the released manifest by a mutated one and re-pin it in the pointer, as an attacker
    with write access (or a buggy tool) could: the sha check passes, the content checks must not."""
    manifest, _ = read_json_object(client, store, result.manifest_key)
    mutate(manifest)
    raw = canonical_json(manifest)
    put_raw(client, store, result.manifest_key, raw)
    pointer, _ = read_json_object(client, store, layout.pointer_key(store.prefix, VARIANT))
    pointer["manifest_sha256"] = _sha(raw)
    put_raw(client, store, layout.pointer_key(store.prefix, VARIANT), canonical_json(pointer))


def test_publish_then_pull_round_trip(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    build, result = _published(s3_client, s3_store, tmp_path)
    dest = tmp_path / "dest"
    pulled = _pull(s3_client, s3_store, dest)

    assert (pulled.version, pulled.manifest_version) == (result.version, 1)
    assert pulled.manifest_sha256 == result.manifest_sha256
    assert _sha(pulled.manifest_path.read_bytes()) == result.manifest_sha256
    assert set(pulled.files) == {"fp32", "int8"}
    for name, path in pulled.files.items():
        assert path.parent == dest
        assert path.read_bytes() == (build / path.name).read_bytes(), name
    # DEST holds exactly the release (a folder signature must see nothing else); the pull state
    # lives beside it (it used to be DEST/.mitra-pull.json)
    assert sorted(p.name for p in dest.iterdir()) == sorted(["manifest.json", "model.onnx", "model-int8.onnx"])
    assert not (dest / PULL_STATE_NAME).exists()
    state = json.loads((tmp_path / ".dest.mitra" / "state.json").read_text())
    (record,) = state["releases"].values()
    assert (record["manifest_version"], record["manifest_sha256"]) == (1, result.manifest_sha256)

    again = _pull(s3_client, s3_store, dest)  # idempotent
    assert again == pulled

    explicit = _pull(s3_client, s3_store, tmp_path / "explicit", version=result.version)
    assert explicit.manifest_sha256 == result.manifest_sha256


def test_pulled_files_are_readable_by_others(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    """A web server user must be able to serve a pulled release: 0644 files under umask 022."""
    _published(s3_client, s3_store, tmp_path)
    previous = os.umask(0o022)
    try:
        pulled = _pull(s3_client, s3_store, tmp_path / "dest")
    finally:
        os.umask(previous)
    for path in (*pulled.files.values(), pulled.manifest_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_pull_moves_forward_and_refuses_older(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    _, first = _published(s3_client, s3_store, tmp_path, seed=1)
    dest = tmp_path / "dest"
    _pull(s3_client, s3_store, dest)
    _, second = _published(s3_client, s3_store, tmp_path, seed=2)
    assert _pull(s3_client, s3_store, dest).manifest_version == 2
    before = _snapshot(dest)

    with pytest.raises(PullError, match="older manifest_version 1"):
        _pull(s3_client, s3_store, dest, version=first.version)
    assert _snapshot(dest) == before
    # An empty folder can still get the old release.
    assert _pull(s3_client, s3_store, tmp_path / "old", version=first.version).version == first.version


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "other-size"])
def test_tampered_artifact_is_refused_and_nothing_changes(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, same_size: bool
) -> None:
    _, first = _published(s3_client, s3_store, tmp_path, seed=1)
    dest = tmp_path / "dest"
    _pull(s3_client, s3_store, dest)
    build, second = _published(s3_client, s3_store, tmp_path, seed=2)
    manifest, _ = read_json_object(s3_client, s3_store, second.manifest_key)
    key = manifest["artifacts"][1]["s3_key"]  # the second file: the first downloads fine
    data = bytearray((build / "model-int8.onnx").read_bytes())
    data[100] ^= 0x01
    put_raw(s3_client, s3_store, key, bytes(data) if same_size else bytes(data) + b"!")
    before = _snapshot(dest)

    expected = ChecksumMismatchError if same_size else PullError
    with pytest.raises(expected, match="model-int8.onnx"):
        _pull(s3_client, s3_store, dest)
    assert _snapshot(dest) == before  # old release intact, no temp files
    fresh = tmp_path / "fresh"
    with pytest.raises(expected):
        _pull(s3_client, s3_store, fresh)
    assert not fresh.exists()


def test_tampered_manifest_is_refused(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    _, result = _published(s3_client, s3_store, tmp_path)
    manifest, _ = read_json_object(s3_client, s3_store, result.manifest_key)
    manifest["artifacts"][0]["sha256"] = "0" * 64
    put_raw(s3_client, s3_store, result.manifest_key, canonical_json(manifest))

    for version in ("latest", result.version):
        dest = tmp_path / f"dest-{version}"
        with pytest.raises(ChecksumMismatchError, match="the manifest was modified"):
            _pull(s3_client, s3_store, dest, version=version)
        assert _snapshot(dest) == {}


def _set_file(index: int, value: str) -> Any:
    def mutate(manifest: dict[str, Any]) -> None:
        manifest["artifacts"][index]["file"] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda m: m.update(schema="mitra-build/manifest/v9"), "schema id 'mitra-build/manifest/v9'"),
        (_set_file(0, "../evil"), "contains '..'"),
        (_set_file(0, "/tmp/evil.onnx"), "absolute path"),
        (_set_file(0, "C:evil.onnx"), "drive letter"),
        (_set_file(0, "C:\\evil.onnx"), "drive letter"),
        (_set_file(0, "sub\\evil.onnx"), "backslash"),
        (_set_file(0, "sub/evil.onnx"), "names a folder"),
        (_set_file(1, ".mitra-pull.json"), "hidden"),
        (lambda m: m["artifacts"][0].update(s3_key="releases/test/../../evil"), "'..' segment"),
        (lambda m: m["artifacts"][0].update(s3_key="releases/test/other/model.onnx"), "is not"),
        (lambda m: m["artifacts"][0].update(sha256="not-hex"), "does not match the manifest schema"),
        (lambda m: m.pop("verification"), "does not match the manifest schema"),
    ],
    ids=["schema-id", "dotdot", "absolute", "drive", "drive-backslash", "backslash", "folder",
         "state-file", "key-dotdot", "key-elsewhere", "bad-sha", "no-verification"],
)
def test_unsafe_or_unknown_manifest_is_refused(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, mutate: Any, fragment: str
) -> None:
    _, result = _published(s3_client, s3_store, tmp_path)
    _plant(s3_client, s3_store, result, mutate)
    dest = tmp_path / "inner" / "dest"

    with pytest.raises(PullError, match=re.escape(fragment)):
        _pull(s3_client, s3_store, dest)
    assert _snapshot(tmp_path / "inner") == {}
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil.onnx").exists()


def _as_v1(manifest: dict[str, Any]) -> None:
    """What a release published before manifest v2 holds: no signal metrics, no task checks."""
    manifest["schema"] = "mitra-build/manifest/v1"
    for summary in manifest["verification"].values():
        for key in ("max_err_over_spread", "max_batch_dependence", "tasks", "tasks_note"):
            summary.pop(key, None)


def test_a_release_with_a_v1_manifest_still_pulls(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    build, result = _published(s3_client, s3_store, tmp_path)
    _plant(s3_client, s3_store, result, _as_v1)
    pulled = _pull(s3_client, s3_store, tmp_path / "dest")
    assert json.loads(pulled.manifest_path.read_text())["schema"] == "mitra-build/manifest/v1"
    assert {name: path.read_bytes() for name, path in pulled.files.items()} == \
        {name: (build / path.name).read_bytes() for name, path in pulled.files.items()}


def test_unknown_pointer_schema_is_refused(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    _published(s3_client, s3_store, tmp_path)
    key = layout.pointer_key(s3_store.prefix, VARIANT)
    pointer, _ = read_json_object(s3_client, s3_store, key)
    pointer["schema"] = "mitra-build/pointer/v2"
    put_raw(s3_client, s3_store, key, canonical_json(pointer))
    with pytest.raises(PullError, match="schema id 'mitra-build/pointer/v2'"):
        _pull(s3_client, s3_store, tmp_path / "dest")


def test_pointer_to_another_key_is_not_followed(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    _published(s3_client, s3_store, tmp_path)
    key = layout.pointer_key(s3_store.prefix, VARIANT)
    pointer, _ = read_json_object(s3_client, s3_store, key)
    pointer["manifest_key"] = "somewhere/else/manifest.json"
    put_raw(s3_client, s3_store, key, canonical_json(pointer))
    with pytest.raises(PullError, match="refusing to follow it"):
        _pull(s3_client, s3_store, tmp_path / "dest")


def test_unreleased_version_cannot_be_pulled(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    build = make_build(tmp_path, seed=4)
    record = layout.release_record_key(s3_store.prefix, VARIANT, 1)

    def crash_before_claim(n: int, name: str, kwargs: dict[str, Any]) -> None:
        if name == "put_object" and kwargs.get("Key") == record:
            raise SimulatedCrash("before claiming release record 1")

    with pytest.raises(SimulatedCrash):
        publish_build(build, client=CrashingClient(s3_client, hook=crash_before_claim), store=s3_store)
    version = json.loads((build / "manifest.json").read_text())["version"]
    assert any(k.endswith(f"{version}/manifest.json") for k in list_keys(s3_client, s3_store))

    with pytest.raises(PullError, match="was never released"):
        _pull(s3_client, s3_store, tmp_path / "dest", version=version)
    with pytest.raises(PullError, match="nothing was published under that name"):
        _pull(s3_client, s3_store, tmp_path / "dest")
    # Re-running the publish completes it; then both ways work.
    publish_build(build, client=s3_client, store=s3_store)
    assert _pull(s3_client, s3_store, tmp_path / "dest", version=version).manifest_version == 1


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "C:x"])
def test_bad_variant_or_version_argument(s3_store: StoreConfig, s3_client: Any, tmp_path: Path, bad: str) -> None:
    with pytest.raises(PullError):
        pull_release(bad, dest=tmp_path / "d", client=s3_client, store=s3_store)
    with pytest.raises(PullError):
        _pull(s3_client, s3_store, tmp_path / "d", version=bad)


def test_a_manifest_with_30k_bad_entries_gets_a_short_message(s3_store: StoreConfig, s3_client: Any,
                                                                 tmp_path: Path) -> None:
    _, result = _published(s3_client, s3_store, tmp_path)
    entry = {"name": "x", "file": "../evil", "size": 1, "sha256": "0" * 64, "s3_key": "k"}
    _plant(s3_client, s3_store, result, lambda m: m.update(artifacts=[dict(entry, name=f"x{i}") for i in range(30_000)]))
    with pytest.raises(PullError) as caught:
        _pull(s3_client, s3_store, tmp_path / "dest")
    message = str(caught.value)
    assert len(message) < 5_000 and message.count("\n  - ") == 10 and "... and 29990 more" in message
