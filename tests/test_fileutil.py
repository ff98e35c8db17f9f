"""Outputs are written atomically and still get the permissions an ordinary file would have."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mitra_model.fileutil import atomic_directory, atomic_file, write_bytes_atomic
from mitra_model.model.snapshot import write_synthetic_snapshot


@pytest.fixture()
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_are_readable_by_others_under_umask_022(tmp_path: Path, umask_022) -> None:
    write_bytes_atomic(tmp_path / "a.bin", b"x")
    with atomic_file(tmp_path / "b.onnx") as tmp:
        tmp.write_bytes(b"y")
    with atomic_directory(tmp_path / "release") as folder:
        (folder / "manifest.json").write_text("{}")
    assert mode(tmp_path / "a.bin") == 0o644 and mode(tmp_path / "b.onnx") == 0o644
    assert mode(tmp_path / "release") == 0o755 and mode(tmp_path / "release" / "manifest.json") == 0o644


def test_a_stricter_umask_is_respected(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        write_bytes_atomic(tmp_path / "secret.bin", b"x")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "secret.bin") == 0o600


def test_synthetic_snapshot_files_are_readable_by_others(tmp_path: Path, umask_022, build_config) -> None:
    snapshot = write_synthetic_snapshot(tmp_path / "snap", task="classification", size_name="tiny",
                                        size=build_config.sizes["tiny"], seed=1)
    assert mode(snapshot.path) == 0o755
    assert {mode(snapshot.path / f.path) for f in snapshot.files} == {0o644}
