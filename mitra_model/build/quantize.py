"""Reduced-precision variants of an exported fp32 Mitra ONNX: dynamic int8, fp16 and 4-bit int4.

All keep the consumer I/O contract (float32 / int64 / bool in, float32 out) and all touch only the
transformer's weight matrices: the MatMuls whose weight is a 2-D float initializer with at least
`MIN_WEIGHT_DIM` rows and columns. That selects the q/k/v/o projections and the MLPs (99.98% of the
weights) and leaves out the K=1 input embeddings (the quantile rank and the regression target: one
value per token, whose per-call int8 range would be set by padded rows holding garbage) and the
output head (10 or 1 columns; measured as the largest single source of int8 error on the tiny
regressor). No node name is relied on, so the portable export and the optimized flavour (attention as
`com.microsoft.MultiHeadAttention`) both work.

Each precision is a recipe of the registry (`recipes.reduced_precision`) naming its converter here
(`to_int8`, `to_fp16`, `to_int4`) and the typed options it takes (`options.py`: unknown keys and
mistyped values are a ConfigError when the configuration loads).

- int8: int8 weights (one scale per tensor, or per output column) and uint8 activations quantized at
  run time with one scale per row (`_quantize_rows`: QuantizeLinear per row, once per activation,
  `com.microsoft.MatMulIntegerToFloat`, the row scale), so a row's output never depends on the rest
  of the batch; ONNX Runtime's `quantize_dynamic` (one activation scale per tensor:
  DynamicQuantizeLinear + MatMulInteger, standard ops only) remains as `activations = "tensor"`.
  The TorchScript export feeds most weights through `Identity` nodes, and a quantizer skips a MatMul
  whose weight is not an initializer, leaving every fp32 weight in the file (331 MB from 303 MB); so the
  Identities on initializers are removed first by a small graph pass (no ORT optimizer round trip:
  the file stays plain ONNX and byte-reproducible). The result is checked to hold no fp32 copy of a
  quantized weight.
- fp16: our own pass, because both fp16 converters tried round every float edge to fp16, blocked
  nodes included (onnxconverter-common leaves unloadable Casts; onnxruntime.transformers.float16
  casts between two blocked nodes, which would turn the 9999 padding sentinel into 10000). The fp16
  region is the data flow downstream of the weight MatMuls: the transformer layers and the head.
  Everything upstream stays float32 untouched (quantile embedding: Sort/TopK, the GatherElements
  binary search, divisions by counts, the 9999 sentinel; label and value embeddings), and inside the
  region LayerNormalization, Softmax, reductions and exp/log/sqrt run in float32 between Casts. fp16
  is meant for GPU / WebGPU execution providers; on a CPU without fp16 kernels ONNX Runtime casts
  around most nodes and it is slower than fp32.
- int4: weight-only, `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` with
  `DefaultWeightOnlyQuantConfig`: each selected MatMul becomes a `com.microsoft.MatMulNBits` (4-bit
  weights, one scale and zero point per `block_size` input rows of a column; the roles named by the
  `eight_bit` option at 8 bits); activations stay
  float32 at the node's edges, and with `accuracy_level=4` the kernel quantizes them to int8 per block
  inside (without it, no faster than fp32 here). Built from the optimized flavour (a contrib op
  already, so the file needs ONNX Runtime; onnxruntime-node 1.30 ran the tiny int4 files identically
  to Python's, onnxruntime-web's WASM within 0.008 of it). Same Identity pass
  as int8, and the same check for fp32 leftovers; the quantizer takes every constant-weight MatMul,
  so the rule above is applied by excluding the others by name. Measured on the synthetic full-size
  classifier (random weights; 2-vCPU AMD EPYC VM, onnxruntime 1.31.1) with the defaults: 49.5 MB from
  303 MB, max logit error 0.20 and max probability error 0.018 against fp32 PyTorch over the
  verification matrix, argmax agreement 99.4% of its 179 query rows, 1.13-1.17x the portable fp32
  file's speed. Random weights leave classes nearly tied, so argmax flips at tiny probability errors:
  re-measure on the published weights.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mitra_model import __version__
from mitra_model.build import gptq
from mitra_model.build.options import Fp16Options, GptqCalibration, Int4Options, Int8Options, RecipeOptions
from mitra_model.errors import ExportError, OnnxCheckError
from mitra_model.fileutil import atomic_file, sha256_file

# A MatMul weight is reduced only if both of its dims are at least this (see the module docstring).
MIN_WEIGHT_DIM = 16
# Inside the fp16 region these stay float32 (fp16 loses too much in normalizations, reductions and
# exponentials); ONNX Runtime contrib ops other than those listed also stay float32.
FP32_OPS = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare",
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMin", "ReduceProd",
    "Exp", "Log", "Sqrt", "Pow", "Reciprocal", "TopK", "Sort", "CumSum",
})
FP16_CONTRIB_OPS = frozenset({"MultiHeadAttention"})  # com.microsoft, fp16 kernels on CPU and CUDA
_DEFAULT_DOMAINS = ("", "ai.onnx")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    precision: str  # what the weights are stored as (int8, fp16, int4)
    size: int
    sha256: str
    seconds: float
    details: dict[str, Any]  # counts of what was converted and what was left in float32


# (fp32 model loaded from source, temp output path, source path, validated options) -> (model to save, details)
Converter = Callable[[onnx.ModelProto, Path, Path, Any], tuple[onnx.ModelProto, dict[str, Any]]]


def convert_onnx(source: Path, output: Path, *, precision: str, converter: str | Converter,
                 options: RecipeOptions) -> QuantizeResult:
    """Write a reduced-precision copy of the fp32 Mitra ONNX `source` to `output` with one converter
    (what a `recipes.Quantize` maker does; `recipes.quantize_onnx` picks the converter by precision).

    The file is written atomically (nothing is left at `output` on failure) and is byte-identical on
    every run with the same source, options and toolchain. Inputs and outputs keep their fp32 contract.

    Args:
        source: an fp32 Mitra ONNX (the portable export or the optimized flavour).
        output: the .onnx file to write.
        precision: what the file's metadata says its weights are (int8, fp16, int4).
        converter: a converter of this module by name ("to_int8"), or the function itself.
        options: the converter's typed options.

    Returns:
        The written file's digest and size, and `details` counting what was converted.

    Raises:
        ExportError: `source` does not exist, or the conversion failed or left an fp32 weight behind.
        OnnxCheckError: `source` is not a loadable ONNX model.
    """
    convert = _CONVERTERS[converter] if isinstance(converter, str) else converter
    source, output = Path(source), Path(output)
    model = _load(source)
    started = time.perf_counter()
    with atomic_file(output) as tmp:
        model, details = convert(model, tmp, source, options)
        _pin_fields(model, precision)
        onnx.save_model(model, str(tmp))
    seconds = time.perf_counter() - started
    return QuantizeResult(
        path=output, precision=precision, size=output.stat().st_size, sha256=sha256_file(output),
        seconds=seconds, details=details,
    )


# ---------------------------------------------------------------------------------------------
# Shared graph helpers


def _load(source: Path) -> onnx.ModelProto:
    if not source.is_file():
        raise ExportError(f"ONNX file {source} does not exist: export the fp32 model first (`mitra-build export`)")
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish types, ...
        raise OnnxCheckError(f"{source} is not a loadable ONNX model ({type(exc).__name__}: {exc}); pass an fp32 Mitra export") from None
    if not model.graph.node or not model.graph.output:
        raise OnnxCheckError(f"{source} holds no ONNX graph (no nodes or no outputs); pass an fp32 Mitra export")
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        raise OnnxCheckError(f"{source} keeps its weights in external data; pass a self-contained export")
    return model


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a unique name (the int8 quantizer selects nodes by name)."""
    taken = {node.name for node in graph.node if node.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _drop_weight_identities(graph: onnx.GraphProto) -> int:
    """Remove `Identity` nodes whose input is an initializer, wiring their consumers to it directly.

    Returns how many were removed. Identities producing a graph output are kept.
    """
    initializers = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:
        source = alias.get(node.input[0], node.input[0]) if node.input else ""
        if node.op_type == "Identity" and node.domain in _DEFAULT_DOMAINS and source in initializers \
                and node.output[0] not in graph_outputs:
            alias[node.output[0]] = source
        else:
            kept.append(node)
    if not alias:
        return 0
    _rename_inputs(kept, alias)
    del graph.node[:]
    graph.node.extend(kept)
    stale = [v for v in graph.value_info if v.name in alias]
    for value in stale:
        graph.value_info.remove(value)
    return len(alias)


def _rename_inputs(nodes: Iterable[onnx.NodeProto], mapping: dict[str, str]) -> None:
    """Rename node inputs per `mapping`, including references from subgraphs (If/Loop bodies)."""
    for node in nodes:
        for index, name in enumerate(node.input):
            if name in mapping:
                node.input[index] = mapping[name]
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _rename_inputs(subgraph.node, mapping)


def _weight_matmuls(graph: onnx.GraphProto) -> list[int]:
    """Indices of the MatMuls whose weight (input 1) is a 2-D float32 initializer with both dims >=
    MIN_WEIGHT_DIM."""
    initializers = {t.name: t for t in graph.initializer}
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in _DEFAULT_DOMAINS or node.input[1] not in initializers:
            continue
        weight = initializers[node.input[1]]
        if weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2 and min(weight.dims) >= MIN_WEIGHT_DIM:
            found.append(index)
    return found


def _initializer_bytes(graph: onnx.GraphProto) -> dict[str, int]:
    """Bytes of initializer data per element type name (e.g. {"FLOAT": ..., "INT8": ...})."""
    totals: dict[str, int] = defaultdict(int)
    for tensor in graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        totals[TensorProto.DataType.Name(tensor.data_type)] += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return dict(sorted(totals.items()))


def _nothing_to_reduce(source: Path, verb: str) -> ExportError:
    return ExportError(
        f"{source} has no MatMul with a 2-D float32 weight initializer of at least {MIN_WEIGHT_DIM}x{MIN_WEIGHT_DIM}: "
        f"nothing to {verb}; pass an fp32 Mitra export"
    )


def _require_no_fp32_weights(graph: onnx.GraphProto, weights: Iterable[str], source: Path, precision: str) -> None:
    """Raise if a weight that was quantized is still in the file or still read by a node.

    Raises:
        ExportError: naming one such weight and how many there are.
    """
    quantized = set(weights)
    left = sorted({t.name for t in graph.initializer} & quantized)
    still_read = sorted({name for node in graph.node for name in node.input} & quantized)
    if left or still_read:
        raise ExportError(
            f"{precision} quantization of {source} left fp32 copies of {len(set(left) | set(still_read))} quantized "
            f"weight(s) (e.g. {(left or still_read)[0]!r}); an Identity or other node still feeds them to a MatMul"
        )


def _pin_fields(model: onnx.ModelProto, precision: str) -> None:
    """Content-only provenance: our producer name, the precision in metadata, no tool leftovers."""
    model.producer_name = "mitra-build"
    model.producer_version = __version__
    del model.graph.value_info[:]  # inferred by the quantizer; stale after the fp16 pass; runtimes infer their own
    props = {p.key: p.value for p in model.metadata_props if p.key != "onnx.infer"}
    props["mitra_build.precision"] = precision
    del model.metadata_props[:]
    for key in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, props[key]


# ---------------------------------------------------------------------------------------------
# int8


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop the quantizer's root-logger advice to run its pre-processing (our Identity pass is ours)."""
    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    quiet = _Filter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def to_int8(model: onnx.ModelProto, tmp: Path, source: Path, options: Int8Options) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """int8 weights (symmetric, one scale per tensor or per output column) and int8 activations
    quantized at run time, one scale per row (`options.activations == "row"`, the default) or per
    tensor (ONNX Runtime's dynamic quantization)."""
    if options.activations == "tensor":
        return _to_int8_per_tensor(model, tmp, source, options)
    del tmp  # this pass rewrites the model in memory
    graph = model.graph
    identities = _drop_weight_identities(graph)
    _name_nodes(graph)
    selected = _weight_matmuls(graph)
    if not selected:
        raise _nothing_to_reduce(source, "quantize")
    all_matmuls = sum(node.op_type == "MatMul" for node in graph.node)
    weights = sorted({graph.node[index].input[1] for index in selected})
    weight_levels = 2 ** (options.weight_bits - 1) - 1
    rounded = _gptq_round_int8(model, source, options, weight_levels, {
        weight: [graph.node[index].input[0] for index in selected if graph.node[index].input[1] == weight]
        for weight in weights
    }) if options.rounding == "gptq" else {}
    _quantize_rows(graph, set(selected), per_channel=options.per_channel, opset=_default_opset(model),
                   weight_levels=weight_levels, rounded=rounded)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _require_no_fp32_weights(graph, weights, source, "int8")
    details: dict[str, Any] = {
        "method": "per-row dynamic int8 (QuantizeLinear per row, MatMulIntegerToFloat, a per-row scale)",
        "activations": "row",
        "weight_type": "QInt8",
        "weight_bits": options.weight_bits,
        "per_channel": options.per_channel,
        "rounding": options.rounding,
        "gptq_weights": len(rounded),
        "identities_removed": identities,
        "quantized_matmuls": sum(node.op_type == "MatMulIntegerToFloat" for node in graph.node),
        "quantized_weights": len(weights),
        "fp32_matmuls": sum(node.op_type == "MatMul" for node in graph.node),
        "matmuls_in_source": all_matmuls,
        "initializer_bytes": _initializer_bytes(graph),
    }
    return model, details


def _symmetric_scale(weight: np.ndarray, *, levels: int, per_channel: bool) -> np.ndarray:
    """int8's weight scale (per tensor: a scalar; per channel: one per output column): the largest |w| on `levels`."""
    peak = np.abs(weight).max(axis=0) if per_channel else np.abs(weight).max()
    return (np.maximum(peak, 1e-12).astype(np.float32) / np.float32(levels)).astype(np.float32)


def _gptq_round_int8(model: onnx.ModelProto, source: Path, options: Int8Options, weight_levels: int,
                     activations: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """GPTQ's int8 levels of each weight, on `_symmetric_scale`'s grid."""
    hessians = _calibration_hessians(model, source, options, "int8", activations)
    arrays = {t.name: t for t in model.graph.initializer if t.name in activations}
    rounded: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for done, name in enumerate(sorted(activations), 1):
        weight = numpy_helper.to_array(arrays[name]).astype(np.float32)
        scale = _symmetric_scale(weight, levels=weight_levels, per_channel=options.per_channel)
        rounded[name] = gptq.gptq_symmetric(weight, hessians[name], scale, levels=weight_levels, damp=options.gptq_damp)
        _gptq_log("int8", done, len(activations), started)
    return rounded


def _reduce(op: str, source: str, out: str, axes: str | None) -> onnx.NodeProto:
    """ReduceMax / ReduceMin over the last axis of a 2-D tensor, keeping it: `axes` is the name of a
    [1] constant from opset 18 on (an input there), None before (an attribute)."""
    if axes is None:
        return helper.make_node(op, [source], [out], name=out, axes=[1], keepdims=1)
    return helper.make_node(op, [source, axes], [out], name=out, keepdims=1)


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS)


def _quantize_rows(graph: onnx.GraphProto, selected: set[int], *, per_channel: bool, opset: int,
                   weight_levels: int, rounded: Mapping[str, np.ndarray]) -> None:
    """Replace each selected MatMul(x, W) by its per-row int8 form, in place:

        x2 = Reshape(x, [-1, K])                            # (M, K): a row is one token's features
        s  = max(max(x2), -min(x2), tiny) / 127 per row     # (M, 1) one scale per row, from that row alone
        q  = QuantizeLinear(x2, s, 128, axis=0)             # uint8, symmetric around 128
        y  = MatMulIntegerToFloat(q, W_int8, 1, s_W, 128)   # (M, N) float; MLAS's u8 x s8 kernel, s_W applied in it
                                                            # W_int8 in [-weight_levels, weight_levels] (Int8Options.weight_bits)
        y  = y * s                                          # per row
        out = Reshape(y, [*x.shape[:-1], N])

    The first four steps are made once per activation: the q, k and v projections of an attention
    read the same x (36 of the full-size model's 146 quantized MatMuls share their input with
    another). Max and min instead of Abs: two reads of x2 and no (M, K) temporary.

    Symmetric, because ONNX Runtime's MatMulInteger takes one activation zero point per call (a
    per-row zero point is refused), so an asymmetric row would need an (M, N) correction pass.
    `com.microsoft.MatMulIntegerToFloat` (the kernel ONNX Runtime fuses per-tensor dynamic int8 into)
    takes one activation scale per call too, so the row scale is a Mul after it; against standard
    MatMulInteger + DequantizeLinear it saves the int32 (M, N) temporary and a pass over it
    (bench/results-precision-options.md).
    """
    initializers = {t.name: t for t in graph.initializer}
    made: dict[str, tuple[str, str]] = {}  # weight -> (its int8 initializer, its scale initializer)
    rows_made: dict[tuple[str, int], str] = {}  # (activation, K) -> the prefix of its quantized tensors
    new_initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        if name not in initializers and all(t.name != name for t in new_initializers):
            new_initializers.append(numpy_helper.from_array(value, name))
        return name

    zero_point = const("mitra_int8_zero_point", np.array(128, dtype=np.uint8))
    levels = const("mitra_int8_levels", np.array(127.0, dtype=np.float32))
    one = const("mitra_int8_one", np.array(1.0, dtype=np.float32))
    tiny = const("mitra_int8_tiny", np.array(1e-12, dtype=np.float32))  # an all-zero row: scale stays finite
    flat = const("mitra_int8_flat", np.array([-1], dtype=np.int64))
    axes = const("mitra_int8_axes", np.array([1], dtype=np.int64)) if opset >= 18 else None
    for index, node in enumerate(graph.node):
        if index not in selected:
            nodes.append(node)
            continue
        x, weight_name = node.input
        k, n = initializers[weight_name].dims
        if weight_name not in made:
            weight = numpy_helper.to_array(initializers[weight_name]).astype(np.float32)
            scale = _symmetric_scale(weight, levels=weight_levels, per_channel=per_channel)
            quantized = rounded[weight_name] if weight_name in rounded else np.clip(
                np.rint(weight / scale), -weight_levels, weight_levels).astype(np.int8)
            made[weight_name] = (const(f"{weight_name}_int8", quantized), const(f"{weight_name}_scale", scale))
        if (x, k) not in rows_made:
            r = f"{node.name}_rows"  # named after the first MatMul that reads x
            rows_made[x, k] = r
            nodes += [
                helper.make_node("Reshape", [x, const(f"mitra_int8_shape2d_{k}", np.array([-1, k], dtype=np.int64))],
                                 [f"{r}_x2"], name=f"{r}_reshape_in"),
                _reduce("ReduceMax", f"{r}_x2", f"{r}_hi", axes),
                _reduce("ReduceMin", f"{r}_x2", f"{r}_lo", axes),
                helper.make_node("Neg", [f"{r}_lo"], [f"{r}_neg_lo"], name=f"{r}_neg_lo"),
                helper.make_node("Max", [f"{r}_hi", f"{r}_neg_lo", tiny], [f"{r}_amax"], name=f"{r}_amax"),
                helper.make_node("Div", [f"{r}_amax", levels], [f"{r}_scale"], name=f"{r}_scale"),
                helper.make_node("Reshape", [f"{r}_scale", flat], [f"{r}_scale1"], name=f"{r}_scale1"),
                helper.make_node("Shape", [f"{r}_scale1"], [f"{r}_count"], name=f"{r}_count"),
                helper.make_node("ConstantOfShape", [f"{r}_count"], [f"{r}_zp"], name=f"{r}_zp",
                                 value=numpy_helper.from_array(np.array([128], dtype=np.uint8))),
                helper.make_node("QuantizeLinear", [f"{r}_x2", f"{r}_scale1", f"{r}_zp"], [f"{r}_q"],
                                 name=f"{r}_quant", axis=0),
                helper.make_node("Shape", [x], [f"{r}_lead"], name=f"{r}_lead", end=-1),
            ]
        r = rows_made[x, k]
        weight_int8, weight_scale = made[weight_name]
        p = f"{node.name}_rowq"  # every tensor of this MatMul's rewrite is named after it
        out = node.output[0]
        nodes += [
            helper.make_node("MatMulIntegerToFloat", [f"{r}_q", weight_int8, one, weight_scale, zero_point],
                             [f"{p}_colf"], name=f"{p}_matmul", domain="com.microsoft"),
            helper.make_node("Mul", [f"{p}_colf", f"{r}_scale"], [f"{p}_y2"], name=f"{p}_rowscale"),
            helper.make_node("Concat", [f"{r}_lead", const(f"mitra_int8_columns_{n}", np.array([n], dtype=np.int64))],
                             [f"{p}_shape_out"], name=f"{p}_shape_out", axis=0),
            helper.make_node("Reshape", [f"{p}_y2", f"{p}_shape_out"], [out], name=f"{p}_reshape_out"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for t in new_initializers if t.name in still_read])


def _to_int8_per_tensor(model: onnx.ModelProto, tmp: Path, source: Path, options: Int8Options) -> tuple[onnx.ModelProto, dict[str, Any]]:
    # deferred: only the precision that uses it loads onnxruntime's quantizer
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = model.graph
    identities = _drop_weight_identities(graph)
    _name_nodes(graph)
    selected = [graph.node[index] for index in _weight_matmuls(graph)]
    weights = sorted({node.input[1] for node in selected})
    all_matmuls = sum(node.op_type == "MatMul" for node in graph.node)
    if not selected:
        raise _nothing_to_reduce(source, "quantize")
    try:
        with _quiet_quantizer():
            quantize_dynamic(
                model, tmp, op_types_to_quantize=["MatMul"], nodes_to_quantize=[node.name for node in selected],
                per_channel=options.per_channel, reduce_range=options.weight_bits == 7, weight_type=QuantType.QInt8,
                # DefaultTensorType: the quantizer cannot type the outputs of contrib ops (MultiHeadAttention)
                extra_options={"DefaultTensorType": TensorProto.FLOAT, "MatMulConstBOnly": True},
            )
        quantized = onnx.load(str(tmp))
    except Exception as exc:  # the quantizer raises many unrelated types
        raise ExportError(f"int8 quantization of {source} failed: {type(exc).__name__}: {exc}") from exc

    out = quantized.graph
    _require_no_fp32_weights(out, weights, source, "int8")
    integer_ops = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    details: dict[str, Any] = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "weight_bits": options.weight_bits,
        "per_channel": options.per_channel,
        "reduce_range": options.weight_bits == 7,
        "identities_removed": identities,
        "quantized_matmuls": sum(node.op_type in integer_ops for node in out.node),
        "quantized_weights": len(weights),
        "fp32_matmuls": sum(node.op_type == "MatMul" for node in out.node),
        "matmuls_in_source": all_matmuls,
        "initializer_bytes": _initializer_bytes(out),
    }
    return quantized, details


# ---------------------------------------------------------------------------------------------
# fp16


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from ONNX type inference.

    ONNX does not know ONNX Runtime's contrib ops, so for inference each one is stood in for by an
    `Identity` of its first input (true of MultiHeadAttention and the other attention/GELU contrib
    ops: their outputs have their first input's type).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.initializer[:]  # declared as inputs instead: inference needs their types, not their data
    declared = {value.name for value in probe.graph.input}
    probe.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer if t.name not in declared
    )
    for node in probe.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            first = node.input[0]
            outputs = list(node.output)
            node.Clear()
            node.op_type, node.name = "Identity", f"type_probe_{outputs[0]}"
            node.input.append(first)
            node.output.append(outputs[0])
    default_opsets = [o for o in probe.opset_import if o.domain in _DEFAULT_DOMAINS]
    del probe.opset_import[:]
    probe.opset_import.extend(default_opsets)
    inferred = onnx.shape_inference.infer_shapes(probe)
    types = {t.name: t.data_type for t in model.graph.initializer}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _fp16_region(graph: onnx.GraphProto, types: dict[str, int]) -> tuple[set[int], set[int]]:
    """Indices of the nodes that compute in fp16, and of the reached nodes kept in fp32.

    The region is every node reached from a weight MatMul through float tensors (a Shape output, an
    int64, ends the walk), minus FP32_OPS and contrib ops not in FP16_CONTRIB_OPS.
    """
    consumers: dict[str, list[int]] = defaultdict(list)
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].append(index)
    stack = _weight_matmuls(graph)
    reached: set[int] = set()
    while stack:
        index = stack.pop()
        if index in reached:
            continue
        reached.add(index)
        for name in graph.node[index].output:
            if types.get(name) == TensorProto.FLOAT:
                stack.extend(consumers.get(name, ()))
    kept = set()
    for index in reached:
        node = graph.node[index]
        default = node.domain in _DEFAULT_DOMAINS
        if (default and node.op_type in FP32_OPS) or (not default and node.op_type not in FP16_CONTRIB_OPS):
            kept.add(index)
    return reached - kept, kept


def _to_fp16_tensor(tensor: TensorProto, name: str) -> tuple[TensorProto, int]:
    """An fp16 copy of a float32 tensor, saturated at the fp16 range; returns it and the count clamped."""
    values = numpy_helper.to_array(tensor)
    limit = float(np.finfo(np.float16).max)
    clamped = int(np.count_nonzero(np.isfinite(values) & (np.abs(values) > limit)))
    converted = np.where(np.isfinite(values), np.clip(values, -limit, limit), values).astype(np.float16)
    return numpy_helper.from_array(converted, name), clamped


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The float32 value of a `Constant` node, or None if it holds anything else."""
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
            return attribute.t
        if attribute.name == "value_float":
            return numpy_helper.from_array(np.array(attribute.f, dtype=np.float32))
        if attribute.name == "value_floats":
            return numpy_helper.from_array(np.array(attribute.floats, dtype=np.float32))
    return None


def to_fp16(model: onnx.ModelProto, tmp: Path, source: Path, options: Fp16Options) -> tuple[onnx.ModelProto, dict[str, Any]]:
    del tmp, options  # a Converter's arguments; this pass writes no file of its own and takes no options
    graph = model.graph
    identities = _drop_weight_identities(graph)
    types = _elem_types(model)
    region, kept_fp32 = _fp16_region(graph, types)
    if not region:
        raise _nothing_to_reduce(source, "convert to fp16")
    nodes = list(graph.node)
    initializers = {t.name: t for t in graph.initializer}
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    consumers: dict[str, set[int]] = defaultdict(set)
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers[name].add(index)
    graph_outputs = {o.name for o in graph.output}

    def is_float(name: str) -> bool:
        return types.get(name) == TensorProto.FLOAT

    to_fp16: dict[str, str] = {}  # fp32 tensor outside the region -> its fp16 name inside
    casts_after: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # node index (-1: graph start) -> casts
    new_initializers: list[TensorProto] = []
    clamped = converted_initializers = converted_constants = 0

    def cast(name: str, target: str, to: int, after: int) -> None:
        casts_after[after].append(helper.make_node("Cast", [name], [target], name=f"{target}/Cast", to=to))

    # 1. float32 tensors entering the region: convert in place where only the region reads them, else cast
    for index in sorted(region):
        for name in nodes[index].input:
            if not name or not is_float(name) or name in to_fp16 or producer.get(name) in region:
                continue
            only_region = consumers[name] <= region and name not in graph_outputs
            if name in initializers:
                fp16, count = _to_fp16_tensor(initializers[name], name if only_region else f"{name}_fp16")
                clamped += count
                if only_region:
                    initializers[name].CopyFrom(fp16)
                    to_fp16[name] = name
                else:
                    new_initializers.append(fp16)
                    to_fp16[name] = fp16.name
                converted_initializers += 1
            elif name in producer and nodes[producer[name]].op_type == "Constant" and only_region \
                    and _constant_tensor(nodes[producer[name]]) is not None:
                constant = nodes[producer[name]]
                fp16, count = _to_fp16_tensor(_constant_tensor(constant), "")
                clamped += count
                del constant.attribute[:]
                constant.attribute.append(helper.make_attribute("value", fp16))
                to_fp16[name] = name
                converted_constants += 1
            else:
                to_fp16[name] = f"{name}_fp16"
                cast(name, to_fp16[name], TensorProto.FLOAT16, producer.get(name, -1))

    # 2. float tensors leaving the region: back to float32 for fp32 readers and graph outputs
    to_fp32: dict[str, str] = {}
    renamed_outputs: dict[str, str] = {}
    for index in sorted(region):
        node = nodes[index]
        for slot, name in enumerate(node.output):
            if not is_float(name):
                continue
            if name in graph_outputs:
                renamed_outputs[name] = f"{name}_fp16"
                node.output[slot] = renamed_outputs[name]
                cast(renamed_outputs[name], name, TensorProto.FLOAT, index)
            elif consumers[name] - region:
                to_fp32[name] = f"{name}_fp32"
                cast(name, to_fp32[name], TensorProto.FLOAT, index)

    # 3. rewire, and retype the region's own Casts
    for index, node in enumerate(nodes):
        mapping = {**to_fp16, **renamed_outputs} if index in region else to_fp32
        for slot, name in enumerate(node.input):
            if name in mapping:
                node.input[slot] = mapping[name]
        if index in region and node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                    attribute.i = TensorProto.FLOAT16
        if index in region and node.op_type == "ConstantOfShape":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                    attribute.t.CopyFrom(_to_fp16_tensor(attribute.t, attribute.t.name)[0])

    ordered = list(casts_after[-1])
    for index, node in enumerate(nodes):
        ordered.append(node)
        ordered.extend(casts_after[index])
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_initializers)

    details: dict[str, Any] = {
        "method": "mitra-build fp16 region pass (weight MatMuls and everything downstream)",
        "identities_removed": identities,
        "fp16_nodes": len(region),
        "fp32_nodes": len(nodes) - len(region),
        "fp32_ops_in_region": sorted({nodes[i].op_type for i in kept_fp32}),
        "fp16_initializers": converted_initializers,
        "fp16_initializer_copies": len(new_initializers),
        "fp16_constants": converted_constants,
        "casts_inserted": sum(len(c) for c in casts_after.values()),
        "values_clamped": clamped,
        "initializer_bytes": _initializer_bytes(graph),
    }
    return model, details


# ---------------------------------------------------------------------------------------------
# int4


@contextlib.contextmanager
def _contained_logging(noisy: str) -> Iterator[None]:
    """Undo what the weight-only quantizer does to the process's logging.

    Importing `matmul_nbits_quantizer` calls `logging.basicConfig(level=INFO)` (a root handler and
    level for every library in the process, Prefect's included), and it logs each node at INFO.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    chatty = logging.getLogger(noisy)
    chatty_level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        chatty.setLevel(chatty_level)


def to_int4(model: onnx.ModelProto, tmp: Path, source: Path, options: Int4Options) -> tuple[onnx.ModelProto, dict[str, Any]]:
    del tmp  # a Converter's argument; this quantizer works on the model in memory
    graph = model.graph
    identities = _drop_weight_identities(graph)
    _name_nodes(graph)
    selected = {graph.node[index].name for index in _weight_matmuls(graph)}
    if not selected:
        raise _nothing_to_reduce(source, "quantize")
    weights = sorted({node.input[1] for node in graph.node if node.name in selected})
    all_matmuls = sum(node.op_type == "MatMul" for node in graph.node)
    # The quantizer takes every MatMul with a constant weight (its nodes_to_include only adds to that),
    # so the rule is applied by excluding the rest: the K=1 embeddings and the output head.
    excluded = [node.name for node in graph.node if node.op_type == "MatMul" and node.name not in selected]
    # A weight read by two MatMuls (support and query path) takes the same bits in both.
    eight_bit_weights = {node.input[1] for node in graph.node
                         if node.name in selected and any(part in node.name for part in options.eight_bit)}
    if options.eight_bit and not eight_bit_weights:
        raise ExportError(f"int4 option eight_bit {list(options.eight_bit)} matches no quantized MatMul of {source}")
    eight_bit = {node.name for node in graph.node if node.name in selected and node.input[1] in eight_bit_weights}
    gptq_rounded = _gptq_round(model, source, options, {
        weight: [node.input[0] for node in graph.node if node.name in selected and node.input[1] == weight]
        for weight in weights if weight not in eight_bit_weights
    }) if options.rounding == "gptq" else {}
    try:
        with _contained_logging("onnxruntime.quantization.matmul_nbits_quantizer"):
            # deferred: only the precision that uses it loads onnxruntime's quantizer
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            quantized = model
            # 8 bits first: the 4-bit pass then sees those nodes as MatMulNBits and leaves them alone
            for bits, skipped in ((8, selected - eight_bit), (4, set())):
                if bits == 8 and not eight_bit:
                    continue
                config = DefaultWeightOnlyQuantConfig(
                    block_size=options.block_size, is_symmetric=options.is_symmetric, bits=bits,
                    accuracy_level=options.accuracy_level, op_types_to_quantize=("MatMul",),
                )
                quantizer = MatMulNBitsQuantizer(quantized, nodes_to_exclude=[*excluded, *skipped], algo_config=config)
                # A weight read by two MatMuls (support and query path) is quantized for each under the
                # same derived names; the quantizer's final clean_initializers drops the repeats.
                quantizer.process()
                quantized = quantizer.model.model
    except Exception as exc:  # the quantizer raises many unrelated types
        raise ExportError(f"int4 quantization of {source} failed: {type(exc).__name__}: {exc}") from exc

    out = quantized.graph
    _require_no_fp32_weights(out, weights, source, "int4")
    _replace_initializers(out, gptq_rounded, source)

    details: dict[str, Any] = {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer (com.microsoft.MatMulNBits)"
                  + (", 4-bit weights rounded by GPTQ (mitra_model.build.gptq)" if gptq_rounded else ""),
        "bits": 4,
        **options.model_dump(mode="json"),
        "eight_bit_matmuls": len(eight_bit),
        "gptq_weights": len(gptq_rounded),
        "identities_removed": identities,
        "quantized_matmuls": sum(node.op_type == "MatMulNBits" for node in out.node),
        "quantized_weights": len(weights),
        "fp32_matmuls": sum(node.op_type == "MatMul" for node in out.node),
        "matmuls_in_source": all_matmuls,
        "initializer_bytes": _initializer_bytes(out),
    }
    return quantized, details


def _calibration_hessians(model: onnx.ModelProto, source: Path, options: GptqCalibration, precision: str,
                          activations: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """GPTQ's H for each weight, on the calibration tables `options` names."""
    config = gptq.config_from_metadata(model, source)
    tables = gptq.calibration_inputs(config, options.calibration, seed=options.calibration_seed)
    # The support-cache pair's predict-query reads a cache no table holds; its levels, calibrated on one
    # half's activations alone, would not be the full model's anyway (different levels: other numbers).
    unfed = [i.name for i in model.graph.input if i.name not in tables[0]]
    if unfed:
        raise ExportError(f"{precision} GPTQ rounding calibrates on the full model's inputs, but {source} takes "
                          f"{unfed}; quantize it with rounding = 'nearest'")
    log.info("%s: calibrating GPTQ on %d synthetic tables (%d MatMul weights)", precision, len(tables), len(activations))
    return gptq.activation_hessians(model, activations, tables)


def _gptq_log(precision: str, done: int, total: int, started: float) -> None:
    if done % 16 == 0 or done == total:
        log.info("%s: GPTQ rounded %d/%d weights (%.0f s)", precision, done, total, time.perf_counter() - started)


def _gptq_round(model: onnx.ModelProto, source: Path, options: Int4Options, activations: dict[str, list[str]]
                ) -> dict[str, np.ndarray]:
    """GPTQ's B, scales and zero_points for each 4-bit weight, named as the quantizer names them."""
    hessians = _calibration_hessians(model, source, options, "int4", activations)
    arrays = {t.name: t for t in model.graph.initializer if t.name in activations}
    rounded: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for done, name in enumerate(sorted(activations), 1):
        levels, scales, zeros = gptq.gptq_levels(numpy_helper.to_array(arrays[name]), hessians[name], bits=4,
                                                 block=options.block_size, damp=options.gptq_damp)
        packed, packed_zeros = gptq.pack(levels, zeros, block=options.block_size)
        rounded |= {f"{name}_Q4": packed, f"{name}_scales": scales, f"{name}_zero_points": packed_zeros}
        _gptq_log("int4", done, len(activations), started)
    return rounded


def _replace_initializers(graph: onnx.GraphProto, arrays: dict[str, np.ndarray], source: Path) -> None:
    """Put `arrays` in place of the quantizer's initializers of the same names, which must have their shapes."""
    found = {tensor.name: tensor for tensor in graph.initializer if tensor.name in arrays}
    for name, array in arrays.items():
        tensor = found.get(name)
        if tensor is None or tuple(tensor.dims) != array.shape:
            raise ExportError(f"int4 of {source}: the quantizer wrote no {name} of shape {list(array.shape)} "
                              f"(found {list(tensor.dims) if tensor is not None else 'none'}) for the GPTQ-rounded "
                              "weights; its naming or layout changed")
        tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype, copy=False), name))


# ---------------------------------------------------------------------------------------------
# The converters the registry names (recipes.reduced_precision(converter="to_int8", ...))

_CONVERTERS: Mapping[str, Converter] = MappingProxyType({"to_int8": to_int8, "to_fp16": to_fp16, "to_int4": to_int4})
