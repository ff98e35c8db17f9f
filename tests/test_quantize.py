"""Quantize: int8 / fp16 / int4 files that load, keep the I/O contract, stay accurate, carry no fp32 copy of a
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

from mitra_model.build import recipes
from mitra_model.build.check import check_onnx
from mitra_model.build.config import Cell, Tolerance
from mitra_model.build.export import INPUT_NAMES
from mitra_model.build.options import Int8Options
from mitra_model.build.quantize import MIN_WEIGHT_DIM, QuantizeResult
from mitra_model.build.recipes import quantize_onnx
from mitra_model.build.verify import onnx_session, verify_onnx
from mitra_model.errors import ConfigError, ExportError, MitraBuildError, OnnxCheckError
from mitra_model.model.inputs import make_inputs
from mitra_model.model.snapshot import load_model

ALL_PRECISIONS = recipes.choices("precisions")  # every reduced precision the registry has
PRECISIONS = ("int8", "fp16")  # held to the fp32 export's outputs; int4 has its own tests below
# (shape (B, S, Q, F), data, padded support rows): mixed columns, ties, a padded batch, a wider table
SHAPES = (((1, 64, 16, 8), "mixed", 0), ((1, 100, 20, 6), "integer_ties", 0), ((3, 48, 8, 5), "mixed", 12),
          ((2, 30, 7, 4), "continuous", 0), ((1, 96, 24, 12), "mixed", 0))
# The random-weight tiny regressor's outputs hardly vary between query rows (std 0.01-0.04), so its
# correlation measures int8 noise against almost no signal; it is asserted where the reference
# spread is at least this, and max abs error everywhere.
MIN_STD_FOR_CORRELATION = 0.02


@pytest.fixture(scope="module")
def sources(tiny_artifacts) -> dict[tuple[str, str], Path]:
    """fp32 exports of the tiny models, portable and optimized flavour: {(task, flavour): path}."""
    return {(task, flavour): tiny_artifacts.path(task, recipe)
            for task in ("classification", "regression")
            for flavour, recipe in (("portable", "fp32"), ("optimized", "fp32-ort"))}


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
    # activations quantized per row (QuantizeLinear along the rows), never per tensor (DynamicQuantizeLinear),
    # once per activation however many projections read it (q, k and v)
    ops = [n.op_type for n in model.graph.node]
    assert {"MatMulIntegerToFloat", "QuantizeLinear"} <= set(ops) and "DynamicQuantizeLinear" not in ops
    assert ops.count("QuantizeLinear") < ops.count("MatMulIntegerToFloat")
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
        "import sys; from pathlib import Path; from mitra_model.build.recipes import quantize_onnx; "
        "print(quantize_onnx(Path(sys.argv[1]), Path(sys.argv[2]), precision=sys.argv[3]).sha256)"
    )
    for precision in ALL_PRECISIONS:
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
    with pytest.raises(ConfigError, match="'int3'.*" + ", ".join(ALL_PRECISIONS)):
        quantize_onnx(sources["regression", "portable"], output, precision="int3")
    assert [p.name for p in tmp_path.iterdir()] == ["junk.onnx"]  # no output, no temp file


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_bad_options_raise_config_error(sources, tmp_path: Path, precision: str) -> None:
    """Options are checked before the source is read: the error names the key and the allowed ones."""
    allowed = ", ".join(recipes.recipe(precision).options.model_fields) or "none"
    with pytest.raises(ConfigError, match=f"{precision}.*'blocksize'.*allowed options: {allowed}"):
        quantize_onnx(sources["classification", "optimized"], tmp_path / "out.onnx", precision=precision,
                      options={"blocksize": 32})
    assert list(tmp_path.iterdir()) == []


def test_option_values_are_typed() -> None:
    int8 = recipes.recipe("int8")
    assert int8.checked_options() == int8.checked_options({}) == Int8Options()
    assert int8.checked_options({"per_channel": True}).per_channel is True
    with pytest.raises(ConfigError, match="per_channel='yes'"):
        int8.checked_options({"per_channel": "yes"})  # a TOML string is not coerced to a bool
    with pytest.raises(KeyError, match="'int3'.*" + ", ".join(ALL_PRECISIONS)):
        recipes.recipe("int3")


def test_int8_per_channel_option_reaches_the_quantizer(sources, tmp_path: Path) -> None:
    source = sources["classification", "optimized"]
    tensor = quantize_onnx(source, tmp_path / "tensor.onnx", precision="int8")
    channel = quantize_onnx(source, tmp_path / "channel.onnx", precision="int8", options={"per_channel": True})
    assert (tensor.details["per_channel"], channel.details["per_channel"]) == (False, True)
    assert tensor.sha256 != channel.sha256


def test_failure_leaves_nothing_behind(sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", broken)
    output = tmp_path / "model-int8.onnx"
    with pytest.raises(MitraBuildError, match="quantizer exploded"):  # the per-tensor path runs ORT's quantizer
        quantize_onnx(sources["classification", "portable"], output, precision="int8", options={"activations": "tensor"})
    assert list(tmp_path.iterdir()) == []


def test_int8_rows_do_not_depend_on_their_batch(quantized, sources, tiny_snapshots, tmp_path: Path,
                                                record_property) -> None:
    """A table predicted alone and the same table among others with much larger values: int8 with
    per-row activation scales gives the same numbers (like fp32); ONNX Runtime's per-tensor dynamic
    quantization does not (its one scale is set by the largest value in the call)."""
    config = load_model(tiny_snapshots["classification"].path)[0].config
    alone = make_inputs((1, 40, 6, 5), config=config, data="mixed", seed=3, salt="alone")
    others = make_inputs((3, 40, 6, 5), config=config, data="large_magnitude", seed=4, salt="others")
    batch = {name: np.concatenate([alone[name], others[name]]) for name in INPUT_NAMES}
    per_tensor = quantize_onnx(sources["classification", "optimized"], tmp_path / "per-tensor.onnx", precision="int8",
                               options={"activations": "tensor"}).path
    difference = {}
    for label, path in (("fp32", sources["classification", "portable"]),
                        ("int8", quantized["classification", "optimized", "int8"].path), ("int8-per-tensor", per_tensor)):
        session = onnx_session(path)
        single = session.run(None, alone)[0][0]
        together = session.run(None, batch)[0][0]
        difference[label] = float(np.abs(single - together).max())
        record_property(f"{label}_batch_composition_max_diff", difference[label])
    assert difference["fp32"] < 1e-5 and difference["int8"] < 1e-5, difference
    assert difference["int8-per-tensor"] > 1e-3, difference  # what per-row scales fix


# ---------------------------------------------------------------------------------------------
# int4


@pytest.fixture(scope="module")
def int4(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, QuantizeResult]:
    """{task: result}: int4 from the optimized flavour, as the pipeline builds it."""
    root = tmp_path_factory.mktemp("int4")
    return {
        task: quantize_onnx(sources[task, "optimized"], root / f"{task}-int4.onnx", precision="int4")
        for task in ("classification", "regression")
    }


def _weight_matmuls_through_identities(model: onnx.ModelProto) -> tuple[int, set[str]]:
    """Independently of quantize.py: how many MatMuls read a large 2-D float weight, directly or
    through an Identity, and which weights those are."""
    initializers = {t.name: t for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in initializers}
    count, weights = 0, set()
    for node in model.graph.node:
        weight = initializers.get(alias.get(node.input[1], node.input[1])) if node.op_type == "MatMul" else None
        if weight is not None and weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2 \
                and min(weight.dims) >= MIN_WEIGHT_DIM:
            count, weights = count + 1, weights | {weight.name}
    return count, weights


def test_int4_quantizes_every_weight_matmul_and_leaves_no_fp32_copy(int4, sources, tiny_snapshots, task: str) -> None:
    result = int4[task]
    check_onnx(result.path, config=load_model(tiny_snapshots[task].path)[0].config)  # I/O contract, shapes
    source = onnx.load(str(sources[task, "optimized"]))
    model = onnx.load(str(result.path))
    expected_matmuls, expected_weights = _weight_matmuls_through_identities(source)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all(n.domain == "com.microsoft" for n in nbits)
    # tiny: 2 layers x 12 weight matrices, some read by both the support and the query path
    assert len(expected_weights) == 24 and expected_matmuls > 24
    assert len(nbits) == expected_matmuls == result.details["quantized_matmuls"]
    assert result.details["quantized_weights"] == 24
    # the rest stay fp32 MatMuls: the K=1 embeddings and the output head
    source_matmuls = sum(n.op_type == "MatMul" for n in source.graph.node)
    assert result.details["fp32_matmuls"] == sum(n.op_type == "MatMul" for n in model.graph.node) == source_matmuls - len(nbits)
    attributes = {(a.name, a.i) for n in nbits for a in n.attribute if a.name in ("bits", "block_size", "accuracy_level")}
    assert attributes == {("bits", 4), ("block_size", 32), ("accuracy_level", 4)}

    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))  # a weight shared by two MatMuls is stored once
    assert not set(names) & expected_weights
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert not [t.name for t in floats if len(t.dims) == 2 and min(t.dims) >= MIN_WEIGHT_DIM]
    assert "Identity" not in {n.op_type for n in model.graph.node}
    assert result.details["initializer_bytes"]["FLOAT"] == sum(numpy_helper.to_array(t).nbytes for t in floats)
    assert result.size < 0.35 * sources[task, "optimized"].stat().st_size
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["mitra_build.precision"] == "int4" and model.producer_name == "mitra-build"


# Two cells of the verification matrix (a padded batch among them) against PyTorch. Measured on the
# random-weight tiny models (block 32, accuracy_level 4, seed 7): classifier max abs 0.047, max
# probability error 0.007, argmax 100%; regressor max abs 0.027, correlation 0.97-0.99. The bounds
# leave ~5x headroom; the full-size figures are in the quantize module's docstring.
INT4_CELLS = (
    Cell(name="base", batch=1, n_support=64, n_query=16, n_features=8, data="mixed"),
    Cell(name="batch-of-3-padded", batch=3, n_support=48, n_query=8, n_features=5, data="mixed", padded_support_rows=12),
)
INT4_TOLERANCE = Tolerance(max_abs=0.25, max_prob_err=0.05, min_argmax_agreement=0.9, min_correlation=0.9,
                           correlation_min_spread=MIN_STD_FOR_CORRELATION)


def test_int4_matches_pytorch(int4, tiny_snapshots, task: str, record_property) -> None:
    model = load_model(tiny_snapshots[task].path)[0]
    report = verify_onnx(model, int4[task].path, cells=INT4_CELLS, tolerance=INT4_TOLERANCE, precision="int4", seed=7)
    record_property("int4_max_abs_err", report.summary["max_abs_err"])
    assert report.passed, report.failures


def test_int4_options_reach_the_file(sources, tmp_path: Path) -> None:
    source = sources["classification", "optimized"]
    result = quantize_onnx(source, tmp_path / "sym.onnx", precision="int4",
                           options={"block_size": 64, "is_symmetric": True, "accuracy_level": 0, "rounding": "nearest"})
    assert {k: result.details[k] for k in ("block_size", "is_symmetric", "accuracy_level")} == {
        "block_size": 64, "is_symmetric": True, "accuracy_level": 0}
    nbits = [n for n in onnx.load(str(result.path)).graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) == 3 for n in nbits)  # symmetric: no zero points
    assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {64}
    assert not any(a.name == "accuracy_level" for n in nbits for a in n.attribute)  # 0: the kernel's default
    with pytest.raises(ConfigError, match="block_size=48.*power of two"):
        quantize_onnx(source, tmp_path / "bad.onnx", precision="int4", options={"block_size": 48})
    with pytest.raises(ConfigError, match="accuracy_level=5"):
        quantize_onnx(source, tmp_path / "bad.onnx", precision="int4", options={"accuracy_level": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sym.onnx"]


def test_int4_failure_leaves_nothing_behind(sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer

    def broken(self) -> None:
        raise RuntimeError("nbits quantizer exploded")

    monkeypatch.setattr(matmul_nbits_quantizer.MatMulNBitsQuantizer, "process", broken)
    with pytest.raises(ExportError, match="int4 quantization of .*nbits quantizer exploded"):
        quantize_onnx(sources["classification", "optimized"], tmp_path / "model-ort-int4.onnx", precision="int4")
    assert list(tmp_path.iterdir()) == []


def test_int4_keeps_the_process_logging_alone(sources, tmp_path: Path) -> None:
    """The nbits quantizer module calls logging.basicConfig(level=INFO) at import; in a fresh process
    (pytest's own handlers would hide it) the root logger is untouched afterwards and nothing is logged."""
    script = (
        "import logging, sys; from pathlib import Path; from mitra_model.build.recipes import quantize_onnx; "
        "quantize_onnx(Path(sys.argv[1]), Path(sys.argv[2]), precision='int4'); "
        "root = logging.getLogger(); print(len(root.handlers), logging.getLevelName(root.level))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(sources["regression", "optimized"]), str(tmp_path / "int4.onnx")],
        check=True, capture_output=True, text=True, timeout=120,
    )
    assert done.stdout.split() == ["0", "WARNING"]
    assert "matmul_nbits_quantizer" not in done.stderr


def test_int4_keeps_the_named_roles_at_8_bits(sources, tmp_path: Path) -> None:
    """`eight_bit` keeps every MatMul whose name holds a pattern at 8 bits, and a weight read by two
    MatMuls (support and query path) at the same bits in both."""
    source = sources["classification", "optimized"]
    result = quantize_onnx(source, tmp_path / "mixed.onnx", precision="int4", options={"eight_bit": ["/v", "attention2/o"]})
    nbits = [n for n in onnx.load(str(result.path)).graph.node if n.op_type == "MatMulNBits"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nbits}
    eight = {name for name, b in bits.items() if b == 8}
    assert eight and set(bits.values()) == {4, 8} and result.details["eight_bit_matmuls"] == len(eight)
    assert all("/v" in name or "attention2/o" in name for name in eight), eight
    by_weight: dict[str, set[int]] = {}
    for node in nbits:
        by_weight.setdefault(node.input[1], set()).add(bits[node.name])
    assert all(len(b) == 1 for b in by_weight.values())
    assert result.size > quantize_onnx(source, tmp_path / "all4.onnx", precision="int4", options={"eight_bit": []}).size
    with pytest.raises(ExportError, match=r"eight_bit \['attention9/z'\] matches no quantized MatMul"):
        quantize_onnx(source, tmp_path / "bad.onnx", precision="int4", options={"eight_bit": ["attention9/z"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all4.onnx", "mixed.onnx"]

