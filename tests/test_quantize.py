"""Quantize: int8 / fp16 files that load, keep the I/O contract, stay accurate, carry no fp32 copy of a
quantized weight, are byte-reproducible, and refuse bad input with a typed error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from mitra_model.check import check_onnx
from mitra_model.errors import ConfigError, ExportError, MitraBuildError, OnnxCheckError
from mitra_model.export import INPUT_NAMES, export_onnx
from mitra_model.inputs import make_inputs
from mitra_model.quantize import MIN_WEIGHT_DIM, QuantizeResult, quantize_onnx
from mitra_model.snapshot import load_model
from mitra_model.verify import onnx_session

PRECISIONS = ("int8", "fp16")
# (shape (B, S, Q, F), data, padded support rows): mixed columns, ties, a padded batch, a wider table
SHAPES = (((1, 64, 16, 8), "mixed", 0), ((1, 100, 20, 6), "integer_ties", 0), ((3, 48, 8, 5), "mixed", 12),
          ((2, 30, 7, 4), "continuous", 0), ((1, 96, 24, 12), "mixed", 0))
# The random-weight tiny regressor's outputs hardly vary between query rows (std 0.01-0.04), so its
# correlation measures int8 noise against almost no signal; it is asserted where the reference
# spread is at least this, and max abs error everywhere.
MIN_STD_FOR_CORRELATION = 0.02


@pytest.fixture(scope="module")
def sources(tiny_snapshots, build_config, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """fp32 exports of the tiny models, portable and optimized flavour: {(task, flavour): path}."""
    root = tmp_path_factory.mktemp("quantize-sources")
    paths = {}
    for task, snapshot in tiny_snapshots.items():
        model, _ = load_model(snapshot.path)
        for flavour in ("portable", "optimized"):
            paths[task, flavour] = export_onnx(
                model, root / f"{task}-{flavour}.onnx", opset=build_config.export.opset,
                trace_shape=build_config.export.trace_shape, flavour=flavour,
            ).path
    return paths


@pytest.fixture(scope="module")
def quantized(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], QuantizeResult]:
    """{(task, flavour, precision): result} for every source and precision."""
    root = tmp_path_factory.mktemp("quantized")
    return {
        (task, flavour, precision): quantize_onnx(path, root / f"{task}-{flavour}-{precision}.onnx", precision=precision)
        for (task, flavour), path in sources.items()
        for precision in PRECISIONS
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _outputs(path: Path, config, shapes=SHAPES) -> list[np.ndarray]:
    session = onnx_session(path)
    results = []
    for index, (shape, data, padded) in enumerate(shapes):
        inputs = make_inputs(shape, config=config, data=data, padded_support_rows=padded, seed=index, salt="quantize")
        results.append(session.run(None, {name: inputs[name] for name in INPUT_NAMES})[0])
    return results


@pytest.mark.parametrize("flavour", ["portable", "optimized"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_contract_and_accuracy(quantized, sources, tiny_snapshots, task: str, flavour: str, precision: str) -> None:
    config = load_model(tiny_snapshots[task].path)[0].config
    result = quantized[task, flavour, precision]
    assert result.precision == precision and result.size == result.path.stat().st_size
    check_onnx(result.path, config=config)  # onnx.checker, strict shape inference, I/O contract
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert meta["mitra_build.precision"] == precision and meta["mitra.task"] == task.upper()

    for shape, ref, got in zip(SHAPES, _outputs(sources[task, flavour], config), _outputs(result.path, config)):
        assert got.dtype == np.float32 and got.shape == ref.shape and np.isfinite(got).all()
        if task == "classification":
            assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99, shape
            assert np.abs(_softmax(got) - _softmax(ref)).max() <= 0.05, shape
        else:
            assert np.abs(got - ref).max() <= 0.05, shape
            if ref.std() >= MIN_STD_FOR_CORRELATION:
                assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] >= 0.99, shape


def test_int8_leaves_no_fp32_weight(quantized, sources, task: str) -> None:
    source = onnx.load(str(sources[task, "portable"]))
    result = quantized[task, "portable", "int8"]
    model = onnx.load(str(result.path))
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    # No float matrix big enough to have been quantized survives (only the K=1 embeddings, the head,
    # biases and LayerNorms do)...
    big = [t.name for t in floats if len(t.dims) == 2 and min(t.dims) >= MIN_WEIGHT_DIM]
    assert not big
    # ...and float initializer bytes are a small fraction of what they were.
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in floats)
    source_bytes = sum(numpy_helper.to_array(t).nbytes for t in source.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert float_bytes < 0.05 * source_bytes
    assert {n.op_type for n in model.graph.node} >= {"MatMulInteger", "DynamicQuantizeLinear"}
    assert "Identity" not in {n.op_type for n in model.graph.node}
    details = result.details
    # tiny: 2 layers x 12 weight matrices (q, k, v, o twice, four MLP), some read by both the
    # support and the query path
    assert details["quantized_weights"] == 24 and details["quantized_matmuls"] >= details["quantized_weights"]
    assert details["initializer_bytes"]["FLOAT"] == float_bytes
    assert result.size < 0.6 * sources[task, "portable"].stat().st_size


def test_fp16_weights_are_fp16_and_embedding_stays_fp32(quantized) -> None:
    result = quantized["classification", "portable", "fp16"]
    model = onnx.load(str(result.path))
    matrices = {t.name: t.data_type for t in model.graph.initializer if len(t.dims) == 2 and min(t.dims) >= MIN_WEIGHT_DIM}
    assert matrices and set(matrices.values()) == {TensorProto.FLOAT16}
    # the quantile embedding (TopK, binary search, count reductions), LayerNorm and Softmax read float32
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    guarded = [n for n in model.graph.node if n.op_type in ("TopK", "GatherElements", "ReduceSum", "LayerNormalization", "Softmax")]
    assert guarded and all(types.get(name) != TensorProto.FLOAT16 for n in guarded for name in n.input)
    # ...and the 9999 padding sentinel is still an exact float32 constant
    constants = [
        numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
        for a in n.attribute if a.name == "value" and a.t.data_type == TensorProto.FLOAT
    ]
    assert any(np.any(value == 9999.0) for value in constants)
    assert all(v.type.tensor_type.elem_type != TensorProto.FLOAT16 for v in [*model.graph.input, *model.graph.output])
    assert result.details["values_clamped"] == 0 and result.details["fp16_initializer_copies"] == 0


def test_output_is_byte_identical_across_processes(sources, tmp_path: Path) -> None:
    """Same source, two fresh interpreters with different hash seeds: same bytes, per precision."""
    source = sources["classification", "optimized"]
    script = (
        "import sys; from pathlib import Path; from mitra_model.quantize import quantize_onnx; "
        "print(quantize_onnx(Path(sys.argv[1]), Path(sys.argv[2]), precision=sys.argv[3]).sha256)"
    )
    for precision in PRECISIONS:
        digests = set()
        for seed in ("1", "2"):
            env = {**os.environ, "PYTHONHASHSEED": seed}
            done = subprocess.run(
                [sys.executable, "-c", script, str(source), str(tmp_path / f"{precision}-{seed}.onnx"), precision],
                check=True, capture_output=True, text=True, env=env, timeout=120,
            )
            digests.add(done.stdout.strip())
        assert len(digests) == 1, precision
        assert (tmp_path / f"{precision}-1.onnx").read_bytes() == (tmp_path / f"{precision}-2.onnx").read_bytes()


def test_bad_input_raises_typed_errors(sources, tmp_path: Path) -> None:
    output = tmp_path / "out.onnx"
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ExportError, match="nope.onnx"):
        quantize_onnx(missing, output, precision="int8")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(OnnxCheckError, match="junk.onnx"):
        quantize_onnx(junk, output, precision="fp16")
    with pytest.raises(ConfigError, match="'int4'"):
        quantize_onnx(sources["regression", "portable"], output, precision="int4")
    assert [p.name for p in tmp_path.iterdir()] == ["junk.onnx"]  # no output, no temp file


def test_failure_leaves_nothing_behind(sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", broken)
    output = tmp_path / "model-int8.onnx"
    with pytest.raises(MitraBuildError, match="quantizer exploded"):
        quantize_onnx(sources["classification", "portable"], output, precision="int8")
    assert list(tmp_path.iterdir()) == []


def test_int8_batch_composition(quantized, sources, tiny_snapshots, record_property) -> None:
    """Measured, not asserted: dynamic int8 scales depend on the whole call, so a table's outputs can
    change when other tables share its batch. fp32 does not change (beyond float noise)."""
    config = load_model(tiny_snapshots["classification"].path)[0].config
    alone = make_inputs((1, 40, 6, 5), config=config, data="mixed", seed=3, salt="alone")
    others = make_inputs((3, 40, 6, 5), config=config, data="large_magnitude", seed=4, salt="others")
    batch = {name: np.concatenate([alone[name], others[name]]) for name in INPUT_NAMES}
    for label, path in (("fp32", sources["classification", "portable"]), ("int8", quantized["classification", "portable", "int8"].path)):
        session = onnx_session(path)
        single = session.run(None, alone)[0][0]
        together = session.run(None, batch)[0][0]
        difference = float(np.abs(single - together).max())
        record_property(f"{label}_batch_composition_max_diff", difference)
        print(f"{label}: max |alone - in batch| = {difference:.3e}")
        if label == "fp32":
            assert difference < 1e-4
