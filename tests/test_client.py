"""The consumer side against a real SeaweedFS: release URLs, `ls`, `pull` (CLI and API), selection,
no-op re-pulls, SYNTHETIC warnings, atomic switching (fault injection, SIGKILL), rollback refusal,
hostile destinations and documents, secret redaction, and the Node example's surface."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from configs import write_config
from s3_fixtures import TEST_SECRET_KEY, CrashingClient, make_build, put_raw, read_json_object

from mitra_model.cli.main import main
from mitra_model.errors import OutputError, PullError, StoreUnreachableError
from mitra_model.release import layout, pull, transfer
from mitra_model.release.client import (
    SyntheticReleaseWarning,
    cache_dest,
    list_releases,
    list_variants,
    parse_release_url,
    pull_artifact,
    pull_release_url,
)
from mitra_model.release.publish import PublishResult, publish_build
from mitra_model.release.rules import canonical_json
from mitra_model.release.store import StoreConfig, describe_client_error, make_s3_client, redact_secrets

pytestmark = [pytest.mark.usefixtures("time_limit"),
              pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")]

VARIANT = "mitra-classifier"
REPO = Path(__file__).resolve().parents[1]
SIX = tuple((f"a{i}", f"model-{i}.onnx", 20_000 + 1000 * i, "fp32") for i in range(6))


def _url(store: StoreConfig, suffix: str = "") -> str:
    return f"s3://{store.bucket}/{store.prefix}/{VARIANT}{suffix}"


def _publish(client: Any, store: StoreConfig, root: Path, *, seed: int = 1, synthetic: bool = True,
             artifacts: Any = None) -> tuple[Path, PublishResult]:
    build = make_build(root, seed=seed, **({"artifacts": artifacts} if artifacts else {}))
    if not synthetic:
        manifest = json.loads((build / "manifest.json").read_text())
        manifest["source"]["synthetic"] = False
        (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return build, publish_build(build, client=client, store=store)


def _tree(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _release_files(build: Path) -> dict[str, bytes]:
    """What DEST must hold for a full pull of `build`: its artifacts and the published manifest."""
    manifest = json.loads((build / "manifest.json").read_text())
    return {a["file"]: (build / a["file"]).read_bytes() for a in manifest["artifacts"]}


def _assert_is_release(dest: Path, build: Path) -> None:
    tree = _tree(dest)
    manifest = json.loads(tree.pop("manifest.json"))
    assert tree == _release_files(build)
    assert manifest["version"] == json.loads((build / "manifest.json").read_text())["version"]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- URLs ---------------------------------------------------------------------------------------


def test_release_urls_parse_and_refuse_bad_ones() -> None:
    url = parse_release_url("s3://mitra-build/releases/a/mitra-classifier@r-1234")
    assert (url.bucket, url.prefix, url.variant, url.version) == ("mitra-build", "releases/a", "mitra-classifier", "r-1234")
    assert parse_release_url("s3://b1x/v").version == "latest" and parse_release_url("s3://b1x/v").prefix == ""
    assert parse_release_url("s3://b1x/v@latest").version == "latest"
    assert parse_release_url("s3://b1x", variant_required=False).variant is None
    for bad, fragment in [("http://x/y", "not a release URL"), ("s3://b1x", "names no variant"),
                          ("s3://b1x/p/..@1", "variant"), ("s3://b1x/p/v@../x", "version"),
                          ("s3://b1x/v?x=1", "not a release URL"), ("s3://b1x//v", "empty path segment"),
                          ("s3://b1x/p/v/", "empty path segment"), ("s3://b1x/p//v@latest", "empty path segment")]:
        with pytest.raises(PullError, match=fragment):
            parse_release_url(bad)
    with pytest.raises(PullError, match="not a valid S3 bucket name"):
        parse_release_url("s3://B_AD/v").store()


# -- ls -----------------------------------------------------------------------------------------


def test_ls_lists_variants_and_releases(s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = s3_store.endpoint_url or ""
    _publish(s3_client, s3_store, tmp_path, seed=1)
    _, second = _publish(s3_client, s3_store, tmp_path, seed=2, synthetic=False)
    other = make_build(tmp_path, variant="mitra-regressor", seed=3)
    publish_build(other, client=s3_client, store=s3_store)
    put_raw(s3_client, s3_store, s3_store.key("_prefect-results", "x"), b"{}")  # not a variant

    variants = list_variants(f"s3://{s3_store.bucket}/{s3_store.prefix}", endpoint_url=endpoint)
    assert [(v.name, v.releases) for v in variants] == [("mitra-classifier", 2), ("mitra-regressor", 1)]
    releases = list_releases(_url(s3_store), endpoint_url=endpoint)
    assert [(r.manifest_version, r.synthetic, r.latest) for r in releases] == [(1, True, False), (2, False, True)]
    assert releases[1].version == second.version and releases[1].problem is None
    assert [(a.name, a.size) for a in releases[1].artifacts] == [("fp32", 6000), ("int8", 3000)]
    assert releases[0].date.startswith("20")

    code, out, err = _cli(capsys, "ls", f"s3://{s3_store.bucket}/{s3_store.prefix}", "--endpoint-url", endpoint)
    assert code == 0 and [line.split() for line in out.splitlines()] == [
        ["VARIANT", "RELEASES"], ["mitra-classifier", "2"], ["mitra-regressor", "1"]]
    code, out, _ = _cli(capsys, "ls", _url(s3_store), "--endpoint-url", endpoint)
    header, *lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert header.split() == ["#", "VERSION", "DATE", "(UTC)", "SOURCE", "SIGNED", "FLAGS", "FILES"]
    assert "SYNTHETIC" in lines[0] and "latest" in lines[1] and second.version in lines[1]
    assert "fp32=model.onnx (5.9 KiB)" in lines[1] and lines[1].split()[5] == "no"  # unsigned
    assert lines[1].split()[4] == releases[1].source_revision[:12] and releases[1].source_revision
    code, out, err = _cli(capsys, "ls", _url(s3_store), "--endpoint-url", endpoint, "--json")
    doc = json.loads(out)  # one JSON document, nothing else on stdout
    assert code == 0 and [r["manifest_version"] for r in doc["releases"]] == [1, 2]
    assert doc["releases"][0]["synthetic"] is True and doc["releases"][1]["artifacts"][0]["size"] == 6000
    code, out, _ = _cli(capsys, "ls", f"s3://{s3_store.bucket}/{s3_store.prefix}", "--endpoint-url", endpoint, "--json")
    assert json.loads(out)["variants"] == [{"name": "mitra-classifier", "releases": 2},
                                           {"name": "mitra-regressor", "releases": 1}]


def test_ls_shows_a_tampered_release_as_a_problem(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    _, result = _publish(s3_client, s3_store, tmp_path)
    put_raw(s3_client, s3_store, result.manifest_key, b'{"tampered": true}')
    (release,) = list_releases(_url(s3_store), endpoint_url=s3_store.endpoint_url)
    assert release.problem and "sha256" in release.problem


# -- pull by URL: no config, selection, JSON, no-op ---------------------------------------------


def test_cli_pull_by_url_needs_no_config_and_json_is_clean(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    build, result = _publish(s3_client, s3_store, tmp_path, synthetic=False)
    env = {**os.environ, "MITRA_BUILD_CONFIG": str(tmp_path / "missing.toml")}
    dest = tmp_path / "dest"
    done = subprocess.run(
        [sys.executable, "-m", "mitra_model.cli", "pull", _url(s3_store, "@latest"), "--dest", str(dest),
         "--endpoint-url", s3_store.endpoint_url or "", "--json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["version"], doc["manifest_sha256"], doc["synthetic"]) == (result.version, result.manifest_sha256, False)
    assert set(doc["files"]) == {"fp32", "int8"} and doc["downloaded_bytes"] == 9000
    assert "SYNTHETIC" not in done.stderr
    _assert_is_release(dest, build)


def test_pull_selected_artifacts_only_and_unknown_names_listed(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, _ = _publish(s3_client, s3_store, tmp_path)
    dest = tmp_path / "dest"
    counting = CrashingClient(s3_client)
    result = pull_release_url(_url(s3_store), dest, artifacts=["int8"], client=counting,
                              endpoint_url=s3_store.endpoint_url)
    assert set(result.files) == {"int8"} and result.downloaded_bytes == 3000
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "model-int8.onnx"]
    assert not any(key and key.endswith("/model.onnx") for _, key in counting.calls)

    code, out, err = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "d2"), "--artifact", "int4",
                          "--endpoint-url", s3_store.endpoint_url or "", "--quiet")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "'int4'" in err and "it has: fp32, int8" in err
    assert not (tmp_path / "d2").exists() and not (tmp_path / ".d2.mitra").exists()
    assert _tree(dest)["model-int8.onnx"] == (build / "model-int8.onnx").read_bytes()


def test_repull_is_a_no_op_without_hashing(s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    build, _ = _publish(s3_client, s3_store, tmp_path)
    dest = tmp_path / "dest"
    first = pull_release_url(_url(s3_store), dest, client=s3_client, endpoint_url=s3_store.endpoint_url)
    assert first.downloaded_bytes == 9000

    def no_hashing(path: Any) -> str:
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(transfer, "sha256_file", no_hashing)  # where a pull hashes what it downloads
    counting = CrashingClient(s3_client)
    again = pull_release_url(_url(s3_store), dest, client=counting, endpoint_url=s3_store.endpoint_url)
    assert again == first and again.downloaded_bytes == 0
    # pointer, manifest, one HEAD: no GET of an artifact (a wall-clock bound here only measured the machine's load)
    assert [name for name, _ in counting.calls] == ["get_object", "get_object", "head_object"]
    monkeypatch.undo()

    # A file changed on disk (new mtime) is no longer trusted: downloaded and verified again.
    target = dest / "model.onnx"
    target.write_bytes(b"x" * 6000)
    repaired = pull_release_url(_url(s3_store), dest, client=s3_client, endpoint_url=s3_store.endpoint_url)
    assert repaired.downloaded_bytes == 6000
    _assert_is_release(dest, build)


def test_pull_artifact_api_adds_artifacts_and_repeats_cheaply(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    build, first = _publish(s3_client, s3_store, tmp_path, synthetic=False)
    cache = tmp_path / "cache"
    url = _url(s3_store, "@latest")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real release warns nothing
        int8 = pull_artifact(url, "int8", cache_dir=cache, endpoint_url=s3_store.endpoint_url)
        assert int8.read_bytes() == (build / "model-int8.onnx").read_bytes()
        assert int8 == cache_dest(url, cache_dir=cache, endpoint_url=s3_store.endpoint_url) / "model-int8.onnx"
        fp32 = pull_artifact(url, "fp32", cache_dir=cache, endpoint_url=s3_store.endpoint_url)
        assert int8.exists() and fp32.read_bytes() == (build / "model.onnx").read_bytes()  # same release: both kept
        assert pull_artifact(url, "int8", cache_dir=cache, endpoint_url=s3_store.endpoint_url) == int8
    pinned = pull_artifact(_url(s3_store, f"@{first.version}"), "fp32", cache_dir=cache,
                           endpoint_url=s3_store.endpoint_url)
    assert pinned != fp32 and pinned.read_bytes() == fp32.read_bytes()  # its own folder


# -- SYNTHETIC is loud --------------------------------------------------------------------------


def test_synthetic_release_is_announced_and_can_be_refused(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish(s3_client, s3_store, tmp_path, synthetic=True)
    endpoint = s3_store.endpoint_url or ""
    with pytest.warns(SyntheticReleaseWarning, match="SYNTHETIC"):
        result = pull_release_url(_url(s3_store), tmp_path / "api", endpoint_url=endpoint)
    assert result.synthetic is True

    code, out, err = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "cli"), "--endpoint-url", endpoint, "--quiet")
    assert code == 0 and "SYNTHETIC" in err and "RANDOM weights" in err and "[SYNTHETIC" in out
    code, out, err = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "json"), "--endpoint-url", endpoint, "--json")
    assert code == 0 and json.loads(out)["synthetic"] is True and "SYNTHETIC" in err

    counting = CrashingClient(s3_client)
    with pytest.raises(PullError, match="SYNTHETIC release"):
        pull_release_url(_url(s3_store), tmp_path / "refused", refuse_synthetic=True, client=counting,
                         endpoint_url=endpoint)
    assert not any(key and key.endswith(".onnx") for _, key in counting.calls)  # refused before any artifact
    code, out, err = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "refused"), "--endpoint-url", endpoint,
                          "--refuse-synthetic")
    assert code == 2 and out == "" and "--refuse-synthetic" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists() and not (tmp_path / ".refused.mitra").exists()


# -- atomic switching ---------------------------------------------------------------------------


def test_a_failure_at_every_rename_leaves_the_old_or_the_new_release(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_build, old = _publish(s3_client, s3_store, tmp_path, seed=1)
    new_build, _ = _publish(s3_client, s3_store, tmp_path, seed=2)
    real = {name: getattr(os, name) for name in ("replace", "rename", "symlink")}
    calls: list[str] = []
    fail_at: list[int] = [0]

    def counted(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            if len(calls) == fail_at[0]:
                raise OSError(errno.EIO, f"injected failure at {name} #{len(calls)}")
            return real[name](*args, **kwargs)
        return call

    def pull_latest(dest: Path) -> None:
        pull.pull_release(VARIANT, dest=dest, client=s3_client, store=s3_store, progress=False)

    # Count the renames of one old -> new pull, then fail each in turn.
    pull.pull_release(VARIANT, version=old.version, dest=tmp_path / "count", client=s3_client, store=s3_store, progress=False)
    for name in real:
        monkeypatch.setattr(os, name, counted(name))
    pull_latest(tmp_path / "count")
    total = len(calls)
    assert total >= 3, calls  # staging -> folder, state, symlink flip at least
    for k in range(1, total + 1):
        monkeypatch.undo()
        dest = tmp_path / f"dest-{k}"
        pull.pull_release(VARIANT, version=old.version, dest=dest, client=s3_client, store=s3_store, progress=False)
        calls.clear()
        fail_at[0] = k
        for name in real:
            monkeypatch.setattr(os, name, counted(name))
        try:
            pull_latest(dest)
        except OutputError as exc:
            assert "injected failure" in str(exc)
        tree = _tree(dest)
        assert tree in ({**_release_files(old_build), "manifest.json": tree.get("manifest.json")},
                        {**_release_files(new_build), "manifest.json": tree.get("manifest.json")}), k
        monkeypatch.undo()
        pull_latest(dest)  # converges
        _assert_is_release(dest, new_build)
        leftovers = [p.name for p in (tmp_path / f".dest-{k}.mitra").iterdir() if p.name not in ("state.json", "lock")]
        assert len(leftovers) == 1, leftovers  # only the current release folder


def test_killed_pulls_leave_a_complete_release_and_the_next_pull_converges(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path
) -> None:
    big = tuple((f"a{i}", f"model-{i}.onnx", 3 << 20, "fp32") for i in range(4))
    builds = [_publish(s3_client, s3_store, tmp_path, seed=s, artifacts=big)[0] for s in (1, 2)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = ("import sys; from mitra_model.release.client import pull_release_url; "
              "pull_release_url(sys.argv[1], sys.argv[2], endpoint_url=sys.argv[3])")
    dest = tmp_path / "dest"
    rng = random.Random(7)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script, _url(s3_store, "@" + json.loads((builds[0] / "manifest.json").read_text())["version"]),
                    str(dest), s3_store.endpoint_url or ""], env=env, check=True, timeout=60)
    duration = time.perf_counter() - start
    seen = set()
    for _ in range(10):
        if json.loads((dest / "manifest.json").read_text())["manifest_version"] == 2:
            shutil.rmtree(tmp_path / ".dest.mitra")  # start over from release 1, to kill the switch again
            dest.unlink()
            subprocess.run([sys.executable, "-c", script, _url(s3_store, "@" + json.loads(
                (builds[0] / "manifest.json").read_text())["version"]), str(dest), s3_store.endpoint_url or ""],
                env=env, check=True, timeout=60)
        proc = subprocess.Popen([sys.executable, "-c", script, _url(s3_store), str(dest), s3_store.endpoint_url or ""],
                                env=env)
        time.sleep(rng.uniform(0.2, duration * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        mv = json.loads((dest / "manifest.json").read_text())["manifest_version"]
        _assert_is_release(dest, builds[mv - 1])  # whole old or whole new, never a mix
        seen.add(mv)
    pull_release_url(_url(s3_store), dest, endpoint_url=s3_store.endpoint_url)
    _assert_is_release(dest, builds[1])
    assert sorted(p.name for p in (tmp_path / ".dest.mitra").iterdir() if p.name not in ("state.json", "lock")) \
        == [os.readlink(dest).split("/")[-1]]
    assert 1 in seen  # at least one kill landed before the switch


# -- rollback -----------------------------------------------------------------------------------


def test_pointer_older_than_the_release_log_is_refused(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    _publish(s3_client, s3_store, tmp_path, seed=1)
    _publish(s3_client, s3_store, tmp_path, seed=2)
    record1, _ = read_json_object(s3_client, s3_store, layout.release_record_key(s3_store.prefix, VARIANT, 1))
    put_raw(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT), canonical_json(record1))
    assert read_json_object(s3_client, s3_store, layout.release_record_key(s3_store.prefix, VARIANT, 2))

    with pytest.raises(PullError, match="names manifest_version 1, but the release log already holds manifest_version 2"):
        pull.pull_release(VARIANT, dest=tmp_path / "fresh", client=s3_client, store=s3_store, progress=False)
    assert not (tmp_path / "fresh").exists() and not (tmp_path / ".fresh.mitra").exists()


def test_a_verifying_pull_by_url_stays_light(s3_store: StoreConfig, s3_client: Any, tmp_path: Path) -> None:
    """The whole verifying pull, in a fresh interpreter: no torch, ONNX, numpy, Prefect, and not the
    signing toolchain (model_signing) either: a consumer needs only the base install to verify."""
    from mitra_model.release.keys import Signer, generate_keypair

    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    build = make_build(tmp_path, seed=1)
    publish_build(build, client=s3_client, store=s3_store, signer=Signer.from_file(tmp_path / "k.pem"))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mitra_model.release.client import pull_release_url\n"
        "from mitra_model.release.keys import load_trusted_keys\n"
        f"result = pull_release_url({_url(s3_store)!r}, {str(tmp_path / 'dest')!r}, endpoint_url={s3_store.endpoint_url!r},"
        f" trusted_keys=load_trusted_keys([Path({str(tmp_path / 'k.pub')!r})]))\n"
        "assert result.signed_by, result\n"
        "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'prefect', 'model_signing') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "dest" / "release.sig").is_file()


# -- hostile destinations and documents ---------------------------------------------------------


def _cli_pull(capsys: pytest.CaptureFixture[str], store: StoreConfig, dest: Path) -> tuple[int, str, str]:
    return _cli(capsys, "pull", _url(store), "--dest", str(dest), "--endpoint-url", store.endpoint_url or "", "--quiet")


def _one_paragraph(code: int, out: str, err: str) -> None:
    assert code == 2 and out == "", (code, out, err)
    assert "Traceback" not in err and err.startswith("mitra-build pull: error: ")


def test_pull_onto_a_full_disk(s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _publish(s3_client, s3_store, tmp_path, artifacts=(("fp32", "model.onnx", 300_000, "fp32"),))
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], check=False,
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        code, out, err = _cli_pull(capsys, s3_store, mount / "dest")
        _one_paragraph(code, out, err)
        assert "No space left on device" in err and "free some space" in err.lower()
        assert os.listdir(mount) == []  # nothing partial
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_pull_onto_a_full_disk_simulated(s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC while writing the manifest (the downloads went through), without a tmpfs."""
    _publish(s3_client, s3_store, tmp_path)
    real_write_bytes = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    code, out, err = _cli_pull(capsys, s3_store, tmp_path / "dest")
    _one_paragraph(code, out, err)
    assert "No space left on device" in err
    assert not (tmp_path / "dest").exists() and not (tmp_path / ".dest.mitra").exists()


def test_pull_into_read_only_places_and_onto_a_file(s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _publish(s3_client, s3_store, tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    for dest, fragment in [(a_file, "is a regular file"), (a_file / "dest", "is a file, not a folder")]:
        code, out, err = _cli_pull(capsys, s3_store, dest)
        _one_paragraph(code, out, err)
        assert fragment in err and str(dest) in err
    assert a_file.read_text() == "keep me"

    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], check=False, capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        code, out, err = _cli_pull(capsys, s3_store, locked / "dest")
        _one_paragraph(code, out, err)
        assert "Operation not permitted" in err and "writable" in err or "write to" in err
        assert os.listdir(locked) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=False)


def test_deeply_nested_pointer_is_one_paragraph(s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _publish(s3_client, s3_store, tmp_path)
    put_raw(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT), b"[" * 100_000 + b"]" * 100_000)
    code, out, err = _cli_pull(capsys, s3_store, tmp_path / "dest")
    _one_paragraph(code, out, err)
    assert "nested too deeply" in err
    assert not (tmp_path / "dest").exists() and not (tmp_path / ".dest.mitra").exists()


def test_a_foreign_folder_is_not_replaced(s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _publish(s3_client, s3_store, tmp_path)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "mine.txt").write_text("x")
    code, out, err = _cli_pull(capsys, s3_store, tmp_path / "dest")
    _one_paragraph(code, out, err)
    assert "folder with files" in err and (tmp_path / "dest" / "mine.txt").read_text() == "x"


# -- secrets ------------------------------------------------------------------------------------


def test_store_messages_redact_the_secret_key(s3_store: StoreConfig, s3_client: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-Xy81Qp")
    echoed = ClientError({"Error": {"Code": "SignatureDoesNotMatch",
                                    "Message": f"canonical request signed with {TEST_SECRET_KEY} and session-token-Xy81Qp"},
                          "ResponseMetadata": {"HTTPStatusCode": 400}}, "GetObject")
    message = describe_client_error(echoed, s3_store, s3_client)
    assert TEST_SECRET_KEY not in message and "session-token-Xy81Qp" not in message
    assert message.startswith("SignatureDoesNotMatch: canonical request signed with <redacted>")
    # a secret that came from the client (a profile), not the environment
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert TEST_SECRET_KEY not in redact_secrets(f"x {TEST_SECRET_KEY} y", s3_client)


# -- the Node example ---------------------------------------------------------------------------

EXAMPLE = REPO / "consumers" / "example-pull-latest.mjs"


def _tiny_onnx(path: Path) -> None:
    """A valid model with the example's inputs: output = x_query (1, 4, 3) logits."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in [
        ("x_support", TensorProto.FLOAT, [1, "s", "f"]), ("y_support", TensorProto.INT64, [1, "s"]),
        ("x_query", TensorProto.FLOAT, [1, "q", "f"]), ("padding_obs_support", TensorProto.BOOL, [1, "s"])]]
    graph = helper.make_graph([helper.make_node("Identity", ["x_query"], ["output"])], "tiny", inputs,
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, "q", "f"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.needs_node
def test_node_example_help_and_bad_options_have_no_stack_trace(node_modules: Path) -> None:
    done = subprocess.run(["node", "--throw-deprecation", str(EXAMPLE), "--help"], capture_output=True, text=True,
                          timeout=60, cwd=EXAMPLE.parent, check=False)
    assert done.returncode == 0 and "usage:" in done.stdout and done.stderr == ""
    assert "--bucket mitra-build --prefix releases" in done.stdout
    assert "--bucket mitra-build \\\n//       --prefix releases" in EXAMPLE.read_text()  # the README's command
    done = subprocess.run(["node", str(EXAMPLE), "--bogus"], capture_output=True, text=True, timeout=60,
                          cwd=EXAMPLE.parent, check=False)
    assert done.returncode == 2 and "Unknown option '--bogus'" in done.stderr and "    at " not in done.stderr


@pytest.mark.needs_node
def test_node_example_says_synthetic_without_deprecation_warnings(
    node_modules: Path, s3_store: StoreConfig, s3_client: Any, tmp_path: Path
) -> None:
    build = make_build(tmp_path, artifacts=(("fp32", "model.onnx", 16, "fp32"),))
    _tiny_onnx(build / "model.onnx")
    manifest = json.loads((build / "manifest.json").read_text())
    data = (build / "model.onnx").read_bytes()
    manifest["artifacts"][0].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    publish_build(build, client=s3_client, store=s3_store)
    done = subprocess.run(
        ["node", "--throw-deprecation", "--trace-warnings", str(EXAMPLE), "--endpoint", s3_store.endpoint_url or "",
         "--bucket", s3_store.bucket, "--prefix", s3_store.prefix, "--variant", VARIANT],
        capture_output=True, text=True, timeout=60, cwd=EXAMPLE.parent, check=False,
    )
    assert done.returncode == 0, done.stderr  # --throw-deprecation: any DeprecationWarning would exit 1
    # The AWS SDK's NodeVersionSupportWarning (node < 22 after January 2027) is a plain Warning, not a
    # deprecation, and is left visible on purpose: it is true.
    assert "SYNTHETIC release" in done.stderr and "DeprecationWarning" not in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["synthetic"] is True


@pytest.mark.needs_node
def test_node_example_verifies_signed_releases_with_trusted_keys(
    node_modules: Path, s3_store: StoreConfig, s3_client: Any, tmp_path: Path
) -> None:
    from mitra_model.release.keys import Signer, generate_keypair
    from mitra_model.release.maintenance import revert_release

    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    signer = Signer.from_file(tmp_path / "k.pem")
    versions = []
    for seed in (1, 2):
        build = make_build(tmp_path, seed=seed, artifacts=(("fp32", "model.onnx", 16, "fp32"),))
        _tiny_onnx(build / "model.onnx")
        import onnx

        model = onnx.load(str(build / "model.onnx"))
        model.doc_string = f"release {seed}"  # the same model, another digest
        onnx.save(model, str(build / "model.onnx"))
        manifest = json.loads((build / "manifest.json").read_text())
        data = (build / "model.onnx").read_bytes()
        manifest["artifacts"][0].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        versions.append(publish_build(build, client=s3_client, store=s3_store, signer=signer).version)

    def example(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["node", str(EXAMPLE), "--endpoint", s3_store.endpoint_url or "", "--bucket", s3_store.bucket,
             "--prefix", s3_store.prefix, "--variant", VARIANT, *extra],
            capture_output=True, text=True, timeout=60, cwd=EXAMPLE.parent, check=False,
        )

    done = example("--trusted-key", str(tmp_path / "other.pub"), "--trusted-key", str(tmp_path / "k.pub"))
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert (line["version"], line["signed_by"]) == (versions[1], signer.key_id)

    done = example("--trusted-key", str(tmp_path / "other.pub"))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "not trusted" in errors[0] and "    at " not in done.stderr

    # A revert names release 1's objects: accepted (signed as a release of its own) ...
    revert_release(s3_client, s3_store, VARIANT, versions[0], signer)
    done = example("--trusted-key", str(tmp_path / "k.pub"))
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["version"] == f"{versions[0]}.revert-2"
    done = example()  # no key: pulled, but never silently
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and (line["signed"], line["signature_checked"]) == (True, False)
    assert "signature was NOT checked" in done.stderr
    # ... and an object the signature does not cover is refused after download.
    key = layout.artifact_key(s3_store.prefix, VARIANT, versions[0], "model.onnx")
    stored = s3_client.get_object(Bucket=s3_store.bucket, Key=key)["Body"].read()
    put_raw(s3_client, s3_store, key, stored[:-1] + b"!")
    done = example("--trusted-key", str(tmp_path / "k.pub"))
    assert done.returncode == 2 and "release signature signs" in done.stderr and "    at " not in done.stderr
    assert example().returncode == 1  # without keys: the manifest's sha256 still refuses it (exit 1, as before)

    # A pointer rolled back to release 1 while the log holds 3 releases: refused, as the Python pull does
    record = s3_client.get_object(Bucket=s3_store.bucket,
                                  Key=layout.release_record_key(s3_store.prefix, VARIANT, 1))["Body"].read()
    put_raw(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT), record)
    done = example()
    assert done.returncode == 2 and "rolled back" in done.stderr and "    at " not in done.stderr


# -- signatures are never skipped silently ------------------------------------------------------


@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mitra_model.release.keys import Signer, generate_keypair

    root = tmp_path_factory.mktemp("consumer-keys")
    generate_keypair(root / "release.pem", root / "release.pub")
    return {"signer": Signer.from_file(root / "release.pem"), "pub": root / "release.pub", "private": root / "release.pem"}


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_a_signed_release_pulled_without_a_key_says_its_signature_was_not_checked(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, signing_keys: dict[str, Any],
) -> None:
    from mitra_model.release.client import UncheckedSignatureWarning

    monkeypatch.delenv("MITRA_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("MITRA_REQUIRE_SIGNATURE", raising=False)
    publish_build(make_build(tmp_path, seed=3), client=s3_client, store=s3_store, signer=signing_keys["signer"])
    endpoint = s3_store.endpoint_url or ""
    with pytest.warns(UncheckedSignatureWarning, match="is signed, but its signature was NOT checked"):
        unchecked = pull_release_url(_url(s3_store), tmp_path / "api", endpoint_url=endpoint)
    assert unchecked.signed is True and unchecked.signature_checked is False

    with warnings.catch_warnings():
        warnings.simplefilter("error", UncheckedSignatureWarning)
        by_path = pull_release_url(_url(s3_store), tmp_path / "path", endpoint_url=endpoint,
                                   trusted_keys=[signing_keys["pub"]])  # a path, not PEM bytes
        monkeypatch.setenv("MITRA_TRUSTED_KEYS", str(signing_keys["pub"]))
        by_env = pull_release_url(_url(s3_store), tmp_path / "env", endpoint_url=endpoint)
    assert by_path.signature_checked and by_env.signature_checked
    monkeypatch.delenv("MITRA_TRUSTED_KEYS")

    code, out, err = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "cli"), "--endpoint-url", endpoint,
                          "--json")
    answer = json.loads(out)
    assert code == 0 and answer["signed"] is True and answer["signature_checked"] is False
    assert "notice:" in err and "--trusted-key" in err


def test_require_signature_refuses_a_pull_without_a_trusted_key(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, signing_keys: dict[str, Any],
) -> None:
    from mitra_model.errors import UnsignedReleaseError

    monkeypatch.delenv("MITRA_TRUSTED_KEYS", raising=False)
    publish_build(make_build(tmp_path, seed=4), client=s3_client, store=s3_store, signer=signing_keys["signer"])
    endpoint = s3_store.endpoint_url or ""
    with pytest.raises(UnsignedReleaseError, match="--require-signature / \\$MITRA_REQUIRE_SIGNATURE=1"):
        pull_release_url(_url(s3_store), tmp_path / "api", endpoint_url=endpoint, require_signature=True)
    monkeypatch.setenv("MITRA_REQUIRE_SIGNATURE", "1")
    code, out, err = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "cli"), "--endpoint-url", endpoint)
    assert code == 2 and "no trusted key was given" in err and "Traceback" not in err
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
    checked = pull_release_url(_url(s3_store), tmp_path / "ok", endpoint_url=endpoint, trusted_keys=[signing_keys["pub"]])
    assert checked.signature_checked

    monkeypatch.delenv("MITRA_REQUIRE_SIGNATURE")  # the same from the configuration file in use
    config = write_config(tmp_path / "config.toml")
    config.write_text(config.read_text() + "\n[signing]\nrequire_signature = true\n")
    code, out, err = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "by-config"), "--endpoint-url",
                          endpoint, "--config", str(config))
    assert code == 2 and "no trusted key was given" in err and not (tmp_path / "by-config").exists()


@pytest.mark.parametrize("key, fragment", [
    ("private", "is a private key: pass the public half"),
    ("truncated", "starts like a PEM public key but does not parse: it is truncated"),
    ("pem-text", "is PEM text in a str: pass it as bytes"),
    ("number", "is a int: pass a public key file's path"),
    ("missing", "Cannot read the trusted public key"),
])
def test_a_trusted_key_of_the_wrong_kind_says_what_was_passed(signing_keys: dict[str, Any], key: str,
                                                               fragment: str, tmp_path: Path) -> None:
    from mitra_model.errors import SigningKeyError
    from mitra_model.release.keys import trusted_keys_from

    given = {"private": signing_keys["private"].read_bytes(), "pem-text": signing_keys["pub"].read_text(),
             "truncated": signing_keys["pub"].read_bytes()[:60],
             "number": 7, "missing": tmp_path / "nope.pub"}[key]
    with pytest.raises(SigningKeyError, match=re.escape(fragment)):
        trusted_keys_from([given])
    assert trusted_keys_from([signing_keys["pub"], signing_keys["pub"].read_bytes()]) == \
        (signing_keys["pub"].read_bytes(),) * 2


# -- offline use of what was verified -----------------------------------------------------------

DEAD_ENDPOINT = "http://127.0.0.1:9"  # nothing listens: connection refused at once


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_offline_returns_the_copy_verified_earlier_without_touching_the_store(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _publish(s3_client, s3_store, tmp_path)
    dest = tmp_path / "dest"
    online = pull_release_url(_url(s3_store), dest, endpoint_url=s3_store.endpoint_url, client=s3_client)
    offline = pull_release_url(_url(s3_store), dest, endpoint_url=DEAD_ENDPOINT, offline=True)
    assert (offline.version, offline.files, offline.downloaded_bytes) == (online.version, online.files, 0)
    monkeypatch.setenv("MITRA_OFFLINE", "1")
    with pytest.raises(PullError, match="offline \\(MITRA_OFFLINE=1 / --offline\\): .* holds no verified copy"):
        pull_release_url(_url(s3_store), tmp_path / "never-pulled", endpoint_url=DEAD_ENDPOINT)
    code, out, err = _cli(capsys, "pull", _url(s3_store), "--dest", str(dest), "--endpoint-url", DEAD_ENDPOINT)
    assert code == 0 and "store not contacted" in out and "sha256 was verified" in out


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_a_store_that_cannot_be_reached_returns_the_verified_copy_with_a_warning(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mitra_model.errors import StoreUnreachableError
    from mitra_model.release.client import OfflineCopyWarning

    monkeypatch.delenv("MITRA_OFFLINE", raising=False)
    _publish(s3_client, s3_store, tmp_path)
    cache = tmp_path / "cache"
    path = pull_artifact(_url(s3_store), "int8", cache_dir=cache, endpoint_url=s3_store.endpoint_url, client=s3_client)
    version = json.loads((path.parent / "manifest.json").read_text())["version"]
    dead = make_s3_client(parse_release_url(_url(s3_store)).store(DEAD_ENDPOINT))
    with pytest.warns(OfflineCopyWarning, match=f"cannot be reached .* using the copy of {VARIANT} {version}"):
        again = pull_artifact(_url(s3_store), "int8", cache_dir=cache, endpoint_url=s3_store.endpoint_url, client=dead)
    assert again == path and again.read_bytes() == path.read_bytes()
    with pytest.raises(StoreUnreachableError):  # never verified here: nothing to fall back on
        pull_artifact(_url(s3_store), "fp32", cache_dir=cache, endpoint_url=s3_store.endpoint_url, client=dead)


def test_errors_are_in_the_users_words_and_json_on_stdout_with_json(
    s3_store: StoreConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a consumer can change (a flag, a variable, a config key), never a class or function name."""
    url = f"s3://{s3_store.bucket}-missing/{s3_store.prefix}/{VARIANT}"
    code, out, err = _cli(capsys, "pull", url, "--dest", str(tmp_path / "d"), "--endpoint-url",
                          s3_store.endpoint_url or "", "--json")
    answer = json.loads(out)["error"]
    assert code == 2 and answer["command"] == "pull" and answer["code"] == "store"
    assert "does not exist at this endpoint" in answer["message"] and "s3://BUCKET" in answer["message"]
    assert "ensure_bucket" not in err and "StoreConfig" not in err

    code, out, _ = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "d"), "--endpoint-url", DEAD_ENDPOINT,
                        "--json")
    answer = json.loads(out)["error"]
    assert code == 2 and answer["code"] == "store_unreachable" and "--endpoint-url, $AWS_ENDPOINT_URL" in answer["message"]

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    code, out, _ = _cli(capsys, "pull", _url(s3_store), "--dest", str(tmp_path / "d"), "--endpoint-url",
                        s3_store.endpoint_url or "", "--json")
    message = json.loads(out)["error"]["message"]
    assert code == 2 and message.startswith("No S3 credentials were found") and "refused" not in message
    assert "pulling and listing only read" in message


@pytest.mark.parametrize("where", ["pointer", "release-record", "release-signature"])
def test_deeply_nested_signed_documents_are_one_paragraph_with_a_trusted_key(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    signing_keys: dict[str, Any], where: str,
) -> None:
    result = publish_build(make_build(tmp_path, seed=5), client=s3_client, store=s3_store,
                           signer=signing_keys["signer"])
    key = {"pointer": layout.pointer_key(s3_store.prefix, VARIANT),
           "release-record": layout.release_record_key(s3_store.prefix, VARIANT, result.manifest_version),
           "release-signature": result.signature_key}[where]
    put_raw(s3_client, s3_store, key, b"[" * 100_000 + b"]" * 100_000)
    url = _url(s3_store, f"@{result.version}" if where == "release-record" else "")
    code, out, err = _cli(capsys, "pull", url, "--dest", str(tmp_path / "dest"), "--endpoint-url",
                          s3_store.endpoint_url or "", "--trusted-key", str(signing_keys["pub"]), "--quiet")
    _one_paragraph(code, out, err)
    assert "Traceback" not in err and "RecursionError" not in err
    assert not (tmp_path / "dest").exists()


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_files_a_user_saved_in_the_bookkeeping_folder_are_never_deleted(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _publish(s3_client, s3_store, tmp_path)
    side = tmp_path / ".dest.mitra"
    (side / "sub").mkdir(parents=True)
    (side / "notes.txt").write_text("mine")
    (side / "sub" / "more.txt").write_text("mine too")
    code, out, err = _cli_pull(capsys, s3_store, tmp_path / "dest")
    _one_paragraph(code, out, err)
    assert "holds files mitra-build did not write (notes.txt, sub)" in err
    assert (side / "notes.txt").read_text() == "mine" and (side / "sub" / "more.txt").exists()
    assert not (tmp_path / "dest").exists()
    (side / "notes.txt").unlink()
    shutil.rmtree(side / "sub")
    assert _cli_pull(capsys, s3_store, tmp_path / "dest")[0] == 0
    assert _cli_pull(capsys, s3_store, tmp_path / "dest")[0] == 0  # its own files are its own


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_a_state_file_a_killed_pull_was_writing_is_its_own_and_is_tidied(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Killed between writing the new state and renaming it over the old (test_killed_pulls met this
    once in ten kills): the next pulls go ahead and remove the half-written file."""
    _publish(s3_client, s3_store, tmp_path)
    assert _cli_pull(capsys, s3_store, tmp_path / "dest")[0] == 0
    side = tmp_path / ".dest.mitra"
    (side / ".state-hbmxwcu4.part").write_text('{"half": ')
    assert _cli_pull(capsys, s3_store, tmp_path / "dest")[0] == 0
    assert _cli_pull(capsys, s3_store, tmp_path / "dest")[0] == 0
    assert not (side / ".state-hbmxwcu4.part").exists()


def test_a_dest_name_too_long_for_the_filesystem_is_one_paragraph(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _publish(s3_client, s3_store, tmp_path)
    code, out, err = _cli_pull(capsys, s3_store, tmp_path / ("d" * 251))
    _one_paragraph(code, out, err)
    assert "its name is 251 bytes long" in err and "at most 248 bytes" in err
    assert not any(p.name.startswith(("ddd", ".ddd")) for p in tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_a_no_op_pull_says_what_it_checked_and_verify_re_hashes(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A file tampered with its mtime kept passes the size-and-mtime check of a no-op pull, which says
    so; --verify re-hashes, finds it and downloads it again."""
    build, _ = _publish(s3_client, s3_store, tmp_path)
    dest = tmp_path / "dest"
    assert _cli_pull(capsys, s3_store, dest)[0] == 0
    int8 = (dest / "model-int8.onnx").resolve()
    before = int8.stat()
    int8.write_bytes(bytes(b ^ 0xFF for b in int8.read_bytes()))
    os.utime(int8, ns=(before.st_atime_ns, before.st_mtime_ns))
    code, out, _ = _cli_pull(capsys, s3_store, dest)
    assert code == 0 and "size and mtime it had when its sha256 was verified (--verify re-hashes)" in out
    assert "sha256 verified" not in out.replace("its sha256 was verified", "")
    code, out, _ = _cli(capsys, "pull", _url(s3_store), "--dest", str(dest), "--endpoint-url",
                        s3_store.endpoint_url or "", "--quiet", "--verify")
    assert code == 0 and "downloaded" in out
    assert (dest / "model-int8.onnx").read_bytes() == (build / "model-int8.onnx").read_bytes()


# -- a hung server ------------------------------------------------------------------------------


class StallingProxy:
    """A TCP proxy to the S3 server that forwards everything, except that the response to a GET whose
    request line holds `stall_on` stops after `first_bytes`: the connection stays open and silent, as a
    hung server's."""

    def __init__(self, backend: str, stall_on: bytes = b".onnx", first_bytes: int = 2000) -> None:
        self._stall_on, self._first_bytes = stall_on, first_bytes
        import socket
        import threading
        from urllib.parse import urlsplit

        parts = urlsplit(backend)
        self._backend = (parts.hostname, parts.port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint_url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: list[Any] = [self._server]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            backend = socket.create_connection(self._backend)
            self._sockets += [client, backend]
            stall = threading.Event()
            threading.Thread(target=self._requests, args=(client, backend, stall), daemon=True).start()
            threading.Thread(target=self._responses, args=(backend, client, stall), daemon=True).start()

    def _requests(self, source: Any, target: Any, stall: Any) -> None:
        while data := self._recv(source):
            if data.startswith(b"GET ") and self._stall_on in data.split(b"\r\n", 1)[0]:
                stall.set()
            target.sendall(data)

    def _responses(self, source: Any, target: Any, stall: Any) -> None:
        sent = 0
        while data := self._recv(source):
            if stall.is_set():
                if sent > 0:
                    self._stop.wait()  # silent from here on, the connection open
                    return
                data = data[:self._first_bytes]  # the headers and a few bytes (or nothing), then nothing
            target.sendall(data)
            sent += len(data) if stall.is_set() else 0

    @staticmethod
    def _recv(sock: Any) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def close(self) -> None:
        self._stop.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def _pull_through(proxy: StallingProxy, s3_store: StoreConfig, dest: Path, match: str, **store_fields: Any) -> float:
    """Pull through `proxy` with `store_fields` changed; assert it ends as StoreUnreachableError matching
    `match`, and return how long it took."""
    store = s3_store.model_copy(update={"endpoint_url": proxy.endpoint_url, **store_fields})
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnreachableError, match=match):
            pull.pull_release(VARIANT, dest=dest, client=make_s3_client(store), store=store, progress=False)
    finally:
        proxy.close()
    return time.monotonic() - started


@pytest.mark.parametrize("noticed_by", ["stall watch", "socket timeout"])
def test_a_server_that_stalls_mid_download_ends_the_pull_without_writing_anything(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noticed_by: str,
) -> None:
    if noticed_by == "socket timeout":  # the race the stall watch can lose on a busy machine
        monkeypatch.setattr(transfer, "_wait_or_stall", lambda client, store, artifact, future, watch: None)
    _publish(s3_client, s3_store, tmp_path, artifacts=(("fp32", "model.onnx", 300_000, "fp32"),))
    took = _pull_through(StallingProxy(s3_store.endpoint_url or ""), s3_store, tmp_path / "dest",
                         "sent no byte of .*model.onnx for 2 s: it stalled", read_timeout_s=2.0)
    assert took < 20  # one stall (2 s) and the blocked read's own timeout; 40 s with retries
    assert not (tmp_path / "dest").exists() and not any((tmp_path / ".dest.mitra").glob("*/model.onnx"))


def test_a_server_that_stalls_before_answering_the_pointer_ends_the_pull_after_one_stall(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
) -> None:
    _publish(s3_client, s3_store, tmp_path)
    proxy = StallingProxy(s3_store.endpoint_url or "", stall_on=b"latest.json", first_bytes=0)
    took = _pull_through(proxy, s3_store, tmp_path / "dest", "stopped answering during reading .*latest.json",
                         read_timeout_s=3.0, max_attempts=4)
    assert took < 9  # one stall of 3 s; each of the 3 retries botocore made stalled as long
    assert not (tmp_path / "dest").exists()
