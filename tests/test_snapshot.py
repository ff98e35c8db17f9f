"""The strict checkpoint loader and the synthetic snapshot generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mitra_model.errors import SnapshotError
from mitra_model.model.snapshot import SYNTHETIC_KEY, load_model, read_snapshot, write_synthetic_snapshot


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_synthetic_snapshot_is_marked_everywhere(tiny_snapshots) -> None:
    snapshot = tiny_snapshots["classification"]
    assert snapshot.synthetic
    assert "NOT the published" in json.loads((snapshot.path / "config.json").read_text())[SYNTHETIC_KEY]["note"]
    from safetensors import safe_open

    with safe_open(str(snapshot.path / "model.safetensors"), framework="pt") as handle:
        assert SYNTHETIC_KEY in handle.metadata()


def test_synthetic_snapshot_is_reproducible(tmp_path: Path, build_config) -> None:
    size = build_config.sizes["tiny"]
    a = write_synthetic_snapshot(tmp_path / "a", task="regression", size_name="tiny", size=size, seed=3)
    b = write_synthetic_snapshot(tmp_path / "b", task="regression", size_name="tiny", size=size, seed=3)
    c = write_synthetic_snapshot(tmp_path / "c", task="regression", size_name="tiny", size=size, seed=4)
    assert a.digest("model.safetensors").sha256 == b.digest("model.safetensors").sha256
    assert a.digest("model.safetensors").sha256 != c.digest("model.safetensors").sha256


def test_full_size_architecture_matches_official_checkpoints(build_config) -> None:
    from mitra_model.model.tab2d import MitraConfig, Task, count_parameters, expected_parameter_shapes

    full = build_config.sizes["full"]
    config = MitraConfig(full.dim, 10, full.n_layers, full.n_heads, Task.CLASSIFICATION)
    assert len(expected_parameter_shapes(config)) == 392  # the official classifier's tensor count
    assert 75_000_000 < count_parameters(config) < 76_500_000


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"dim": "64"}, "field `dim` must be a positive integer"),
        ({"n_layers": 0}, "field `n_layers` must be a positive integer"),
        ({"task": "classification"}, "field `task`"),
        ({"n_heads": 5}, "divisible by `n_heads`"),
    ],
)
def test_bad_config_field_is_named(snapshot_copy: Path, change: dict, needle: str) -> None:
    _edit_config(snapshot_copy, **change)
    with pytest.raises(SnapshotError, match="config.json") as info:
        load_model(snapshot_copy)
    assert needle in str(info.value)


def test_missing_config_key_is_named(snapshot_copy: Path) -> None:
    config = json.loads((snapshot_copy / "config.json").read_text())
    del config["dim_output"]
    (snapshot_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(SnapshotError, match="dim_output"):
        load_model(snapshot_copy)


def test_config_that_disagrees_with_weights_is_refused(snapshot_copy: Path) -> None:
    _edit_config(snapshot_copy, n_layers=3)
    with pytest.raises(SnapshotError, match=r"missing tensors layers\.2\."):
        load_model(snapshot_copy)


def test_wrong_shape_is_named(snapshot_copy: Path) -> None:
    _edit_weights(snapshot_copy, lambda s: s.__setitem__("final_layer.bias", torch.zeros(11)))
    with pytest.raises(SnapshotError, match=r"`final_layer.bias` has shape \(11,\), expected \(10,\)"):
        load_model(snapshot_copy)


def test_wrong_dtype_is_named(snapshot_copy: Path) -> None:
    _edit_weights(snapshot_copy, lambda s: s.__setitem__("final_layer.bias", s["final_layer.bias"].half()))
    with pytest.raises(SnapshotError, match=r"`final_layer.bias` has dtype torch.float16"):
        load_model(snapshot_copy)


def test_non_finite_weights_are_refused(snapshot_copy: Path) -> None:
    def poison(state):
        state["layers.1.linear3.weight"][0, 0] = float("nan")

    _edit_weights(snapshot_copy, poison)
    with pytest.raises(SnapshotError, match=r"`layers.1.linear3.weight` has 1 non-finite"):
        load_model(snapshot_copy)


def test_unexpected_tensor_is_named(snapshot_copy: Path) -> None:
    _edit_weights(snapshot_copy, lambda s: s.__setitem__("extra.head", torch.zeros(2)))
    with pytest.raises(SnapshotError, match="unexpected tensors extra.head"):
        load_model(snapshot_copy)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dim": 64, "dim_output": 10, "n_layers": 2, "n_heads": 4, "task": "CLASSIFICATION"}))
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(SnapshotError, match="only pickle weights \\(pytorch_model.bin\\).*never unpickles"):
        load_model(folder)
    with pytest.raises(SnapshotError, match="is a pickle checkpoint"):
        load_model(folder / "pytorch_model.bin")


def test_truncated_safetensors_is_refused(snapshot_copy: Path) -> None:
    weights = snapshot_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SnapshotError, match="not a readable safetensors file"):
        load_model(snapshot_copy)


def test_read_snapshot_digests_files(tiny_snapshots) -> None:
    import hashlib

    snapshot = read_snapshot(tiny_snapshots["regression"].path)
    weights = snapshot.path / "model.safetensors"
    assert snapshot.digest("model.safetensors").sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert snapshot.digest("model.safetensors").size == weights.stat().st_size
