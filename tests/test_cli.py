"""The `mitra-build` command line: the documented forms work, bad input gets one clean paragraph."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from configs import write_config
from onnx import numpy_helper

from mitra_model.cli.main import main


@pytest.fixture(scope="module", autouse=True)
def small_matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The commands read a configuration with a two-cell matrix ($MITRA_BUILD_CONFIG): what is tested
    here is the command line, and the full matrix is the pipeline's (each cell runs upstream too)."""
    default_store = {"bucket": "mitra-build", "prefix": "releases", "endpoint_url": "http://127.0.0.1:8333"}
    config = write_config(tmp_path_factory.mktemp("cli-config") / "config.toml", store=default_store)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MITRA_BUILD_CONFIG", str(config))
        yield config


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mitra_model.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_synth_export_verify_round_trip(tmp_path: Path, capsys) -> None:
    """The documented commands in a row (test_install runs them as processes of an installed wheel)."""
    snap, model, report = tmp_path / "snap", tmp_path / "model.onnx", tmp_path / "report.json"
    code = main(["synth", "--task", "regression", "--size", "tiny", "--output", str(snap), "--seed", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "SYNTHETIC" in out
    code = main(["export", "--snapshot", str(snap), "--output", str(model)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "SYNTHETIC" in err and "sha256" in out
    code = main(["verify", "--snapshot", str(snap), "--onnx", str(model), "--report", str(report)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(report.read_text())["passed"] is True
    assert "**PASSED**" in out


def test_verify_exits_non_zero_on_a_corrupted_model(tiny_exports, tiny_snapshots, tmp_path: Path) -> None:
    proto = onnx.load(str(tiny_exports["classification"]))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init) * 1.5
    init.CopyFrom(numpy_helper.from_array(values.astype(np.float32), init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    code = main(["verify", "--snapshot", str(tiny_snapshots["classification"].path), "--onnx", str(tmp_path / "bad.onnx"),
                 "--report", str(tmp_path / "r.json")])
    assert code == 1
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_verify_json_is_one_document_on_stdout(tiny_exports, tiny_snapshots, tmp_path: Path, capsys) -> None:
    """`verify --json`: stdout is exactly the report `--report` writes (a script parses it; a process of
    its own, so nothing any library prints on import can hide there); the progress lines stay on stderr;
    a failed verification still prints its report, and exits 1."""
    snapshot, exported = tiny_snapshots["classification"].path, tiny_exports["classification"]
    done = run_cli("verify", "--snapshot", str(snapshot), "--onnx", str(exported), "--json",
                   "--report", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads((tmp_path / "r.json").read_text())
    assert json.loads(done.stdout)["passed"] is True and "[1/" in done.stderr and "**PASSED**" not in done.stdout

    proto = onnx.load(str(exported))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * 1.5).astype(np.float32), init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    capsys.readouterr()
    code = main(["verify", "--snapshot", str(snapshot), "--onnx", str(tmp_path / "bad.onnx"), "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["passed"] is False and "failed" in err


def test_bad_snapshot_is_one_paragraph_without_traceback(tmp_path: Path, capsys) -> None:
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "config.json").write_text("{not json")
    (tmp_path / "snap" / "model.safetensors").write_bytes(b"x")
    code = main(["export", "--snapshot", str(tmp_path / "snap"), "--output", str(tmp_path / "out.onnx")])
    assert code == 2  # an uncaught error would fail this test with its traceback
    assert "config.json is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]


def test_missing_snapshot_folder_is_named(tmp_path: Path, capsys) -> None:
    code = main(["export", "--snapshot", str(tmp_path / "nope"), "--output", str(tmp_path / "o.onnx")])
    assert code == 2
    assert f"snapshot folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_bad_config_file_names_the_field(tmp_path: Path, capsys) -> None:
    from mitra_model.build.config import DEFAULT_CONFIG_PATH

    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_CONFIG_PATH.read_text().replace("opset = 17", "opset = 9"))
    code = main(["--config", str(bad), "synth", "--task", "regression", "--size", "tiny", "--output", str(tmp_path / "s")])
    assert code == 2
    err = capsys.readouterr().err
    assert "field `export.opset`" in err and str(bad) in err
    assert not (tmp_path / "s").exists()


def test_a_failing_run_is_one_paragraph_without_traceback(tiny_snapshots, tmp_path: Path) -> None:
    """`mitra-build run` fails inside the Prefect flow; the user still gets our message, no stack."""
    from mitra_model.build.config import DEFAULT_CONFIG_PATH

    config = tmp_path / "two-variants.toml"
    config.write_text(DEFAULT_CONFIG_PATH.read_text())
    done = run_cli("run", "--config", str(config), "--snapshot", str(tiny_snapshots["classification"].path),
                   "--artifacts", str(tmp_path / "artifacts"), "--no-publish")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert "--snapshot builds one variant but 2 are selected (mitra-classifier, mitra-regressor)" in done.stderr
    assert "--variant NAME" in done.stderr


def test_verify_takes_the_precision_from_the_file(tiny_snapshots, tiny_artifacts, capsys) -> None:
    """An int8 file is judged by the int8 tolerances without --precision (fp32's would fail it)."""
    snapshot = tiny_snapshots["classification"]
    int8 = tiny_artifacts.path("classification", "int8")
    code = main(["verify", "--snapshot", str(snapshot.path), "--onnx", str(int8)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "says it is int8" in err and "(int8" in out


def _trace_shape():
    from mitra_model.build.config import load_config

    return load_config().export.trace_shape


def test_check_and_verify_against_other_weights_is_one_clear_error(tiny_exports, tiny_snapshots, capsys) -> None:
    exported = tiny_exports["classification"]
    for command in ("check", "verify"):
        code = main([command, "--snapshot", str(tiny_snapshots["regression"].path), "--onnx", str(exported)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "not the ones this file was exported from" in err and "[1/" not in err


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", "truncated"])
def test_verify_on_a_file_that_is_not_onnx_is_exit_2(tiny_exports, tiny_snapshots, tmp_path: Path, content,
                                                      capsys) -> None:
    bad = tmp_path / "bad.onnx"
    if content == "truncated":
        content = tiny_exports["classification"].read_bytes()[:5000]
    bad.write_bytes(content)
    code = main(["verify", "--snapshot", str(tiny_snapshots["classification"].path), "--onnx", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "bad.onnx" in err, err  # an uncaught error would fail this test with its traceback


def test_version_lists_the_toolchain_and_what_is_missing(capsys, monkeypatch) -> None:
    from importlib import metadata

    from mitra_model.cli import main as cli

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name))
                        if name == "prefect" else real(name))
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("mitra-build 0.1.0\n")
    assert f"torch {real('torch')}" in out and "prefect not installed" in out and "python 3." in out


def test_a_command_whose_extra_is_missing_names_the_extra(tmp_path: Path, capsys, monkeypatch) -> None:
    """The check reads the extras from mitra-build's installed metadata; torch is made to look absent."""
    from importlib import metadata

    from mitra_model.cli import main as cli

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name))
                        if name == "torch" else real(name))
    assert cli.missing_from_extra("build") == ["torch"] and cli.missing_from_extra("flow") == []
    code = main(["export", "--snapshot", str(tmp_path / "snap"), "--output", str(tmp_path / "m.onnx")])
    assert code == 2
    err = capsys.readouterr().err
    assert "`mitra-build export` needs the [build] extra, and torch is not installed: pip install 'mitra-build[build]'" in err
    assert "\n" not in err.strip() and not (tmp_path / "m.onnx").exists()


def test_config_lookup_env_then_working_directory_then_packaged(tmp_path: Path, capsys, monkeypatch) -> None:
    from mitra_model.build.config import DEFAULT_CONFIG_PATH, config_path

    monkeypatch.delenv("MITRA_BUILD_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert config_path() == DEFAULT_CONFIG_PATH  # no ./config here: the packaged default
    (tmp_path / "config").mkdir()
    broken = tmp_path / "config" / "mitra-build.toml"
    broken.write_text("this is = not [toml")
    assert config_path() == broken
    code = main(["synth", "--task", "regression", "--size", "tiny", "--output", str(tmp_path / "s")])
    assert code == 2 and f"configuration file {broken} is not valid TOML" in capsys.readouterr().err
    broken.unlink()
    broken.symlink_to(tmp_path / "gone.toml")  # dangling: reported, not skipped
    assert config_path() == broken
    named = tmp_path / "named.toml"
    monkeypatch.setenv("MITRA_BUILD_CONFIG", str(named))
    assert config_path() == named


@pytest.mark.parametrize("busy", ["s3", "grpc"])
def test_local_s3_names_the_busy_port(tmp_path: Path, capsys, busy: str) -> None:
    import socket

    from mitra_model.cli.local_s3 import GRPC_OFFSET, free_port_pairs

    port = free_port_pairs(1)[0]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port if busy == "s3" else port + GRPC_OFFSET))
        holder.listen()
        code = main(["local-s3", "--dir", str(tmp_path / "data"), "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    taken = port if busy == "s3" else port + GRPC_OFFSET
    assert f"port {taken} on 127.0.0.1" in err and "already in use" in err and "--port N" in err
    assert not (tmp_path / "data").exists()


def test_local_s3_port_needs_room_for_its_grpc_twin(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["local-s3", "--dir", "d", "--port", "60000"])
    assert exited.value.code == 2 and "port + 10000 must be a port too" in capsys.readouterr().err
