"""Download stage against a local hub: pinning, verification, errors, retries, reuse.

Every test talks only to `local_hub` (127.0.0.1) or to a closed local port, passes `endpoint=`
explicitly, and uses a 10 ms retry delay, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import huggingface_hub
import pytest
from local_hub import LocalHub

from mitra_model.build.hub import REQUIRED_FILES, download_snapshot, resolve_revision
from mitra_model.errors import ChecksumMismatchError, HubAuthError, HubNotFoundError, HubUnreachableError

REPO = "acme/mitra-tiny"
CONFIG = b'{"dim": 8, "dim_output": 10, "n_layers": 1, "n_heads": 2, "task": "CLASSIFICATION"}'
FAST = {"retry_delay_s": 0.01, "timeout_s": 5.0}  # tiny backoff, bounded waits


@pytest.fixture(autouse=True)
def _hermetic_hub_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token, login file or offline switch from the developer's machine leaks into a test."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _weights(seed: int, size: int = 4096) -> bytes:
    return bytes((seed * 31 + i * 7) % 251 for i in range(size))


def _publish(hub: LocalHub, **extra: bytes) -> str:
    return hub.add_commit(REPO, {"config.json": CONFIG, "model.safetensors": _weights(1), **extra})


def _resolve(hub: LocalHub, revision: str = "main", repo: str = REPO, **kw):
    return resolve_revision(repo, revision, endpoint=hub.endpoint, **{**FAST, **kw})


def _download(hub: LocalHub, resolved, dest: Path, **kw):
    return download_snapshot(resolved, dest, endpoint=hub.endpoint, progress=False, **{**FAST, **kw})


def _entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---- pinning and what is fetched ------------------------------------------------------------------


def test_branch_is_pinned_to_its_commit_and_files_are_fetched_by_sha(local_hub: LocalHub, tmp_path: Path):
    commit = _publish(local_hub)
    resolved = _resolve(local_hub, "main")
    assert (resolved.requested_revision, resolved.commit) == ("main", commit)

    snap = _download(local_hub, resolved, tmp_path)

    assert snap.path == tmp_path / "acme--mitra-tiny" / commit
    assert (snap.path / "config.json").read_bytes() == CONFIG
    assert (snap.path / "model.safetensors").read_bytes() == _weights(1)
    files = local_hub.file_requests()
    assert files and all(f"/resolve/{commit}/" in r.path for r in files), [r.path for r in files]


def test_branch_moving_between_resolve_and_download_does_not_mix_revisions(local_hub: LocalHub, tmp_path: Path):
    old = _publish(local_hub)
    resolved = _resolve(local_hub, "main")
    local_hub.add_commit(REPO, {"model.safetensors": _weights(2)})  # someone pushes to main

    snap = _download(local_hub, resolved, tmp_path)

    assert snap.path.name == old
    assert (snap.path / "model.safetensors").read_bytes() == _weights(1)


def test_only_the_two_required_files_are_fetched(local_hub: LocalHub, tmp_path: Path):
    _publish(local_hub, **{"README.md": b"# card", "pytorch_model.bin": _weights(9), "onnx/model.onnx": b"x"})

    snap = _download(local_hub, _resolve(local_hub), tmp_path)

    fetched = {r.path.rsplit("/", 1)[-1] for r in local_hub.file_requests()}
    assert fetched == set(REQUIRED_FILES)
    assert _entries(snap.path) == sorted(REQUIRED_FILES)
    assert _entries(tmp_path) == sorted(["acme--mitra-tiny", f"acme--mitra-tiny/{snap.path.name}",
                                         *(f"acme--mitra-tiny/{snap.path.name}/{f}" for f in REQUIRED_FILES)])


def test_tags_and_full_commit_shas_resolve_to_their_commit(local_hub: LocalHub):
    first = _publish(local_hub)
    local_hub.tag(REPO, "v1", first)
    second = local_hub.add_commit(REPO, {"model.safetensors": _weights(2)})

    assert _resolve(local_hub, "v1").commit == first
    assert _resolve(local_hub, first).commit == first
    assert _resolve(local_hub, "main").commit == second


def test_download_neither_reads_nor_writes_the_global_hub_cache(local_hub: LocalHub, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    global_cache = tmp_path / "global-hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(global_cache))
    _publish(local_hub)

    snap = _download(local_hub, _resolve(local_hub), tmp_path / "snapshots")

    assert not global_cache.exists()
    assert os.listdir(tmp_path / "snapshots") == ["acme--mitra-tiny"]  # the private cache went with the temp dir
    assert _entries(snap.path) == sorted(REQUIRED_FILES)


# ---- digests decide rebuilds ----------------------------------------------------------------------


def test_new_weights_give_different_digests(local_hub: LocalHub):
    _publish(local_hub)
    before = _resolve(local_hub)
    local_hub.add_commit(REPO, {"model.safetensors": _weights(2)})
    after = _resolve(local_hub)

    assert after.commit != before.commit
    assert after.digests()["model.safetensors"] != before.digests()["model.safetensors"]
    assert after.digests()["config.json"] == before.digests()["config.json"]
    assert after.digests()["model.safetensors"].startswith("sha256:")
    assert after.digests()["config.json"].startswith("gitsha1:")


def test_readme_only_commit_changes_the_sha_but_not_the_digests(local_hub: LocalHub):
    _publish(local_hub, **{"README.md": b"v1"})
    before = _resolve(local_hub)
    local_hub.add_commit(REPO, {"README.md": b"v2, with a longer model card"})
    after = _resolve(local_hub)

    assert after.commit != before.commit
    assert after.digests() == before.digests()


# ---- verification ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["model.safetensors", "config.json"])
def test_corrupted_download_is_refused_and_nothing_is_left(local_hub: LocalHub, tmp_path: Path, path: str):
    _publish(local_hub)
    resolved = _resolve(local_hub)
    local_hub.corrupt(REPO, path)  # same size, different bytes: huggingface_hub alone would accept it
    dest = tmp_path / "snapshots"

    with pytest.raises(ChecksumMismatchError) as err:
        _download(local_hub, resolved, dest)

    expected = resolved.digests()[path]
    assert path in str(err.value) and expected in str(err.value)
    assert "found" in str(err.value)
    assert _entries(dest) == []


# ---- not found / auth -----------------------------------------------------------------------------


def test_unknown_repo_is_not_found_and_not_retried(local_hub: LocalHub):
    _publish(local_hub)
    with pytest.raises(HubNotFoundError, match="acme/no-such-model"):
        _resolve(local_hub, repo="acme/no-such-model")
    assert len(local_hub.requests) == 1


def test_unknown_revision_is_not_found(local_hub: LocalHub):
    _publish(local_hub)
    with pytest.raises(HubNotFoundError, match="no-such-branch"):
        _resolve(local_hub, "no-such-branch")
    assert len(local_hub.requests) == 1


def test_missing_weights_file_is_not_found(local_hub: LocalHub):
    commit = local_hub.add_commit(REPO, {"config.json": CONFIG, "README.md": b"no weights yet"})
    with pytest.raises(HubNotFoundError) as err:
        _resolve(local_hub)
    message = str(err.value)
    assert "model.safetensors" in message and REPO in message and commit in message


@pytest.mark.parametrize("token", [None, "hf_wrongWRONGwrong0000"])
def test_private_repo_without_the_right_token_is_an_auth_error(local_hub: LocalHub, token: str | None):
    _publish(local_hub)
    local_hub.require_token(REPO, "hf_rightRIGHTright1111")

    with pytest.raises(HubAuthError) as err:
        _resolve(local_hub, token=token)

    message = str(err.value)
    assert "HF_TOKEN" in message and REPO in message
    assert "hf_rightRIGHTright1111" not in message and (token is None or token not in message)
    assert [r.status for r in local_hub.requests] == [401]  # never retried


def test_private_repo_with_the_right_token(local_hub: LocalHub, tmp_path: Path):
    commit = _publish(local_hub)
    local_hub.require_token(REPO, "hf_rightRIGHTright1111")

    resolved = _resolve(local_hub, token="hf_rightRIGHTright1111")
    snap = _download(local_hub, resolved, tmp_path, token="hf_rightRIGHTright1111")

    assert snap.path.name == commit
    assert all(r.authorized and r.status == 200 for r in local_hub.requests)


def test_token_none_uses_hf_token_from_the_environment(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch):
    commit = _publish(local_hub)
    local_hub.require_token(REPO, "hf_fromENVenv2222")
    monkeypatch.setenv("HF_TOKEN", "hf_fromENVenv2222")

    assert _resolve(local_hub, token=None).commit == commit


def test_wrong_token_at_download_is_an_auth_error(local_hub: LocalHub, tmp_path: Path):
    _publish(local_hub)
    local_hub.require_token(REPO, "hf_rightRIGHTright1111")
    resolved = _resolve(local_hub, token="hf_rightRIGHTright1111")

    with pytest.raises(HubAuthError) as err:
        _download(local_hub, resolved, tmp_path / "snapshots", token="hf_wrongWRONGwrong0000")

    assert "hf_wrongWRONGwrong0000" not in str(err.value)
    assert _entries(tmp_path / "snapshots") == []


# ---- transient failures ---------------------------------------------------------------------------


def test_transient_503s_are_retried(local_hub: LocalHub, tmp_path: Path):
    commit = _publish(local_hub)
    local_hub.fail_next(2, status=503)

    resolved = _resolve(local_hub)

    assert resolved.commit == commit
    assert [r.status for r in local_hub.requests] == [503, 503, 200]


def test_transient_failure_while_streaming_a_file_is_retried(local_hub: LocalHub, tmp_path: Path):
    _publish(local_hub)
    resolved = _resolve(local_hub)
    local_hub.fail_next(1, status=502, method="GET")  # the HEAD succeeds, the file GET fails once

    snap = _download(local_hub, resolved, tmp_path)

    assert (snap.path / "config.json").read_bytes() == CONFIG
    assert [r.status for r in local_hub.file_requests() if r.method == "GET"].count(502) == 1


def test_persistent_503_gives_up_after_max_attempts(local_hub: LocalHub):
    _publish(local_hub)
    local_hub.fail_next(10, status=503)

    with pytest.raises(HubUnreachableError, match="503"):
        _resolve(local_hub, max_attempts=3)
    assert len(local_hub.requests) == 3


def test_unreachable_endpoint_fails_fast_with_the_fixes(tmp_path: Path):
    with socket.socket() as s:  # a port on which, once closed, nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    started = time.monotonic()
    with pytest.raises(HubUnreachableError) as err:
        resolve_revision(REPO, endpoint=f"http://127.0.0.1:{port}", **FAST)

    assert time.monotonic() - started < 5
    assert "--snapshot" in str(err.value) and "HF_ENDPOINT" in str(err.value)


def test_offline_mode_is_reported_without_any_request(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch):
    _publish(local_hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        _resolve(local_hub)
    assert local_hub.requests == []


# ---- reuse ----------------------------------------------------------------------------------------


def test_existing_good_snapshot_is_reused_without_downloading(local_hub: LocalHub, tmp_path: Path):
    _publish(local_hub)
    resolved = _resolve(local_hub)
    first = _download(local_hub, resolved, tmp_path)
    n_requests = len(local_hub.requests)

    again = _download(local_hub, resolved, tmp_path)

    assert again == first
    assert len(local_hub.requests) == n_requests


def test_damaged_snapshot_is_downloaded_again(local_hub: LocalHub, tmp_path: Path):
    _publish(local_hub)
    resolved = _resolve(local_hub)
    first = _download(local_hub, resolved, tmp_path)
    weights = first.path / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # e.g. a crash or a bad disk

    again = _download(local_hub, resolved, tmp_path)

    assert (again.path / "model.safetensors").read_bytes() == _weights(1)
    assert again.sha256 == first.sha256
    assert os.listdir(tmp_path) == ["acme--mitra-tiny"]  # no temp or stale folders left
    assert _entries(again.path) == sorted(REQUIRED_FILES)


# ---- progress bars --------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [True, False])
def test_progress_switch(local_hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capfd: pytest.CaptureFixture[str], progress: bool):
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub: force bars on even without a TTY
    _publish(local_hub)
    resolved = _resolve(local_hub)

    download_snapshot(resolved, tmp_path, endpoint=local_hub.endpoint, progress=progress, **FAST)

    shown = "model.safetensors" in capfd.readouterr().err
    assert shown is progress
