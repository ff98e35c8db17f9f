"""Hostile or mistaken inputs are refused before any work starts, with one paragraph naming the field
and the bound (CLI exit 2), never a traceback or an allocation that runs the machine out of memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from configs import edited_config

from mitra_model.build.config import DEFAULT_CONFIG_PATH, load_config
from mitra_model.errors import ConfigError, SnapshotError
from mitra_model.model.architecture import LIMITS
from mitra_model.model.snapshot import read_snapshot


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mitra_model.cli", *args], capture_output=True, text=True, timeout=120)


def _edit_config_json(snapshot: Path, **fields: object) -> None:
    path = snapshot / "config.json"
    raw = json.loads(path.read_text())
    raw.update(fields)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("field, value", [("n_layers", 10**9), ("dim", 10**40), ("n_heads", 10**6),
                                          ("dim_output", 10**12)])
def test_a_huge_architecture_in_config_json_is_refused_at_once(snapshot_copy: Path, field: str, value: int) -> None:
    _edit_config_json(snapshot_copy, **{field: value})
    started = time.perf_counter()
    with pytest.raises(SnapshotError) as info:
        read_snapshot(snapshot_copy)
    assert time.perf_counter() - started < 5  # no module or tensor was built first
    message = str(info.value)
    assert f"`{field}`" in message and str(LIMITS[field]) in message and len(message) < 400


def test_the_cli_refuses_it_in_one_paragraph_with_exit_2(snapshot_copy: Path, tmp_path: Path) -> None:
    _edit_config_json(snapshot_copy, n_layers=10**9)
    done = run_cli("export", "--snapshot", str(snapshot_copy), "--output", str(tmp_path / "m.onnx"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "`n_layers` is 1000000000" in done.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_deeply_nested_config_json_is_an_error_not_a_recursion_crash(snapshot_copy: Path) -> None:
    (snapshot_copy / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SnapshotError, match="config.json"):
        read_snapshot(snapshot_copy)


def test_weights_that_are_a_folder_are_named(snapshot_copy: Path) -> None:
    (snapshot_copy / "model.safetensors").unlink()
    (snapshot_copy / "model.safetensors").mkdir()
    with pytest.raises(SnapshotError, match="model.safetensors is not a file"):
        read_snapshot(snapshot_copy)


def test_config_json_that_is_a_folder_is_named(snapshot_copy: Path) -> None:
    (snapshot_copy / "config.json").unlink()
    (snapshot_copy / "config.json").mkdir()
    with pytest.raises(SnapshotError, match="config.json cannot be read"):
        read_snapshot(snapshot_copy)


@pytest.mark.parametrize("old, new, needle", [
    ("max_abs = 1e-4", "max_abs = inf", "verification.tolerances.fp32.max_abs"),
    ("max_abs = 1e-4", "max_abs = nan", "verification.tolerances.fp32.max_abs"),
    ('timezone = "UTC"', 'timezone = "Mars/Olympus"', "'Mars/Olympus' is not a known IANA time zone"),
    ("n_support = 64", "n_support = 1000000000", "verification.cells.0.n_support"),
    ("[sizes.tiny]\ndim = 64\nn_layers = 2", "[sizes.tiny]\ndim = 64\nn_layers = 1000000000", "sizes.tiny.n_layers"),
])
def test_config_holes_are_closed(tmp_path: Path, old: str, new: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(edited_config(tmp_path, (old, new)))
    assert needle in str(info.value)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(DEFAULT_CONFIG_PATH.read_bytes() + b"\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_config(path)
    done = run_cli("--config", str(path), "synth", "--task", "regression", "--size", "tiny", "--output",
                   str(tmp_path / "s"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "not UTF-8" in done.stderr
    shutil.rmtree(tmp_path / "s", ignore_errors=True)


def test_export_refuses_to_write_into_its_snapshot(snapshot_copy: Path) -> None:
    weights = (snapshot_copy / "model.safetensors").read_bytes()
    done = run_cli("export", "--snapshot", str(snapshot_copy), "--output", str(snapshot_copy / "model.safetensors"))
    assert done.returncode == 2 and "inside the snapshot folder" in done.stderr and "Traceback" not in done.stderr
    assert (snapshot_copy / "model.safetensors").read_bytes() == weights


def test_quantize_refuses_to_overwrite_its_input(tiny_exports, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    shutil.copy(tiny_exports["classification"], source)
    before = source.read_bytes()
    done = run_cli("quantize", "--onnx", str(source), "--output", str(tmp_path / "." / "model.onnx"),
                   "--precision", "int8")
    assert done.returncode == 2 and "is the input" in done.stderr and "Traceback" not in done.stderr
    assert source.read_bytes() == before


@pytest.mark.parametrize("where", ["a folder", "a read-only folder"])
def test_export_to_an_unwritable_place_is_one_paragraph(snapshot_copy: Path, tmp_path: Path, where: str) -> None:
    if where == "a folder":
        output = tmp_path / "out.onnx"
        output.mkdir()
    else:
        if os.geteuid() == 0:
            locked = tmp_path / "ro"  # root ignores permissions: a path under a file cannot be created either
            locked.write_text("a file, not a folder")
        else:
            locked = tmp_path / "ro"
            locked.mkdir(mode=0o555)
        output = locked / "out.onnx"
    done = run_cli("export", "--snapshot", str(snapshot_copy), "--output", str(output))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and f"cannot write {output}" in done.stderr
