"""Export: I/O contract, dynamic dims, byte-identical re-export; the onnx.checker gate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from mitra_model.build.check import check_onnx
from mitra_model.build.export import export_onnx
from mitra_model.errors import ExportError, OnnxCheckError
from mitra_model.model.snapshot import load_model


def test_io_contract(tiny_exports, tiny_snapshots, task: str) -> None:
    model = onnx.load(str(tiny_exports[task]))
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == ["x_support", "y_support", "x_query", "padding_obs_support"]
    label_type = onnx.TensorProto.INT64 if task == "classification" else onnx.TensorProto.FLOAT
    assert inputs["y_support"].elem_type == label_type
    assert inputs["padding_obs_support"].elem_type == onnx.TensorProto.BOOL
    dims = [d.dim_param for d in inputs["x_support"].shape.dim]
    assert dims == ["batch", "n_support", "n_features"]
    output = model.graph.output[0]
    assert output.name == "output"
    out_dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert out_dims == (["batch", "n_query", 10] if task == "classification" else ["batch", "n_query"])
    assert model.opset_import[0].version >= 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["mitra.task"] == task.upper()
    check_onnx(tiny_exports[task], config=load_model(tiny_snapshots[task].path)[0].config)


def test_reexport_is_byte_identical_across_processes(tiny_snapshots, tmp_path: Path) -> None:
    """Two independent `mitra-build export` runs of one checkpoint give the same bytes."""
    digests = []
    for name in ("a.onnx", "b.onnx"):
        subprocess.run(
            [sys.executable, "-m", "mitra_model.cli", "export", "--snapshot", str(tiny_snapshots["classification"].path),
             "--output", str(tmp_path / name)],
            check=True, capture_output=True, timeout=300,
        )
        digests.append((tmp_path / name).read_bytes())
    assert digests[0] == digests[1]


def test_metadata_carries_the_synthetic_flag(tiny_snapshots, tmp_path: Path) -> None:
    from mitra_model.cli.main import main

    assert main(["export", "--snapshot", str(tiny_snapshots["regression"].path), "--output", str(tmp_path / "m.onnx")]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["mitra.synthetic"] == "true"
    assert meta["mitra.weights_sha256"] == tiny_snapshots["regression"].digest("model.safetensors").sha256


def test_failed_export_leaves_nothing(tiny_snapshots, tmp_path: Path, build_config, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def broken_export(*args, **kwargs):
        Path(args[2]).write_bytes(b"half a file")
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    model, _ = load_model(tiny_snapshots["classification"].path)
    with pytest.raises(ExportError, match="simulated exporter crash"):
        export_onnx(model, tmp_path / "out.onnx", opset=17, trace_shape=build_config.export.trace_shape)
    assert list(tmp_path.iterdir()) == []


def _corrupt(source: Path, target: Path, edit) -> Path:
    model = onnx.load(str(source))
    edit(model)
    onnx.save(model, str(target))
    return target


def test_checker_names_the_broken_node(tiny_exports, tiny_snapshots, tmp_path: Path) -> None:
    def break_a_node(model: onnx.ModelProto) -> None:
        node = next(n for n in model.graph.node if n.op_type == "Softmax")
        node.name = "broken_softmax"
        node.input.append(node.input[0])  # Softmax takes exactly one input

    bad = _corrupt(tiny_exports["classification"], tmp_path / "bad.onnx", break_a_node)
    config = load_model(tiny_snapshots["classification"].path)[0].config
    with pytest.raises(OnnxCheckError, match="broken_softmax"):
        check_onnx(bad, config=config)


def test_check_refuses_a_frozen_dimension(tiny_exports, tiny_snapshots, tmp_path: Path) -> None:
    def freeze(model: onnx.ModelProto) -> None:
        dim = model.graph.input[0].type.tensor_type.shape.dim[1]
        dim.ClearField("dim_param")
        dim.dim_value = 11

    bad = _corrupt(tiny_exports["classification"], tmp_path / "frozen.onnx", freeze)
    config = load_model(tiny_snapshots["classification"].path)[0].config
    with pytest.raises(OnnxCheckError, match="`x_support` dim 1 is fixed at 11"):
        check_onnx(bad, config=config)


def test_check_refuses_a_renamed_input(tiny_exports, tiny_snapshots, tmp_path: Path) -> None:
    def rename(model: onnx.ModelProto) -> None:
        old = model.graph.input[3].name
        model.graph.input[3].name = "mask"
        for node in model.graph.node:
            node.input[:] = ["mask" if i == old else i for i in node.input]

    bad = _corrupt(tiny_exports["classification"], tmp_path / "renamed.onnx", rename)
    config = load_model(tiny_snapshots["classification"].path)[0].config
    with pytest.raises(OnnxCheckError, match="consumer contract expects"):
        check_onnx(bad, config=config)


def test_export_output_shape_follows_inputs(tiny_exports) -> None:
    from mitra_model.build.verify import onnx_session

    session = onnx_session(tiny_exports["regression"])
    feed = {
        "x_support": np.random.default_rng(0).normal(size=(4, 9, 13)).astype(np.float32),
        "y_support": np.zeros((4, 9), dtype=np.float32),
        "x_query": np.zeros((4, 6, 13), dtype=np.float32),
        "padding_obs_support": np.zeros((4, 9), dtype=bool),
    }
    assert session.run(None, feed)[0].shape == (4, 6)


def test_optimized_flavour_never_materializes_attention_scores(tiny_snapshots, tmp_path: Path, build_config) -> None:
    """Every attention of the optimized flavour is ONNX Runtime's MultiHeadAttention (no Softmax over
    an S x S score matrix anywhere); the portable flavour uses standard ops only."""
    model, _ = load_model(tiny_snapshots["classification"].path)
    graphs = {}
    for flavour in ("portable", "optimized"):
        path = export_onnx(model, tmp_path / f"{flavour}.onnx", opset=build_config.export.opset,
                           trace_shape=build_config.export.trace_shape, flavour=flavour).path
        graphs[flavour] = onnx.load(str(path)).graph
    n_layers = model.config.n_layers
    # per layer: row attention of support and of query rows, feature attention of both; in the last
    # layer nothing depends on the support side, so only the query's two attentions are left
    fused = [n for n in graphs["optimized"].node if (n.domain, n.op_type) == ("com.microsoft", "MultiHeadAttention")]
    assert len(fused) == 4 * n_layers - 2
    assert not [n for n in graphs["optimized"].node if n.op_type == "Softmax"]
    assert {n.domain for n in graphs["portable"].node} <= {"", "ai.onnx"}
    assert len([n for n in graphs["portable"].node if n.op_type == "Softmax"]) == 4 * n_layers - 2
