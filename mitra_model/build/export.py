"""ONNX export with every dimension dynamic, the consumer I/O contract, and byte-identical output.

The TorchScript exporter (`dynamo=False`) is used on purpose: it writes one self-contained file and,
given the same weights, the same bytes on every run (the dynamo exporter took ~5x longer here and
writes external data). Anything volatile is pinned after export: producer fields, doc strings, and
the metadata we add is derived from content only (no timestamps, no paths).

`export_module` is the one export routine (a module and its I/O contract in, a file out); the full
model (`export_onnx`) and the support-cache pair (support_cache.py) both go through it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
import torch.nn as nn

from mitra_model import __version__
from mitra_model.errors import ExportError
from mitra_model.fileutil import atomic_file, sha256_file
from mitra_model.model.inputs import make_inputs
from mitra_model.model.kinds import Shape
from mitra_model.model.tab2d import MitraConfig, Tab2D, fused_attention

Flavour = Literal["portable", "optimized"]
# portable: standard ONNX ops only; optimized: attention as ONNX Runtime's contrib MultiHeadAttention
FLAVOURS: tuple[str, ...] = ("portable", "optimized")
# How every file is exported (recorded in the manifest): the TorchScript exporter, constants folded.
EXPORTER_SETTINGS: dict[str, bool] = {"dynamo": False, "do_constant_folding": True}
INPUT_NAMES = ("x_support", "y_support", "x_query", "padding_obs_support")
OUTPUT_NAME = "output"
_DIM_NAMES = {
    "x_support": ("batch", "n_support", "n_features"),
    "y_support": ("batch", "n_support"),
    "x_query": ("batch", "n_query", "n_features"),
    "padding_obs_support": ("batch", "n_support"),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]  # symbolic dims are names


Contract = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]  # (inputs, outputs), in graph order


def io_contract(config: MitraConfig) -> Contract:
    """The inputs and outputs consumers (e.g. @wlearn/mitra) feed and read."""
    label_dtype = "int64" if config.label_is_class else "float32"
    dtypes = {"x_support": "float32", "y_support": label_dtype, "x_query": "float32", "padding_obs_support": "bool"}
    inputs = tuple(TensorSpec(name, dtypes[name], _DIM_NAMES[name]) for name in INPUT_NAMES)
    out_shape: tuple[str | int, ...] = ("batch", "n_query", config.dim_output) if config.label_is_class else ("batch", "n_query")
    return inputs, (TensorSpec(OUTPUT_NAME, "float32", out_shape),)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    size: int
    opset: int
    seconds: float


def check_flavour(flavour: str) -> None:
    """Refuse an unknown flavour before any work is done (export_module and export_support_cache).

    Raises:
        ExportError: `flavour` is not one of FLAVOURS.
    """
    if flavour not in FLAVOURS:
        raise ExportError(f"unknown export flavour {flavour!r}; expected one of {', '.join(FLAVOURS)}")


def export_onnx(
    model: Tab2D,
    output: Path,
    *,
    opset: int,
    trace_shape: Shape,
    metadata: dict[str, str] | None = None,
    flavour: Flavour = "portable",
) -> ExportResult:
    """Export `model` to `output` (written atomically; nothing is left behind on failure).

    Args:
        model: an eval-mode Tab2D.
        output: the .onnx file to write.
        opset: ONNX opset (>= 17).
        trace_shape: shape of the example inputs the export is traced with.
        metadata: extra `metadata_props` (content-derived values only, to keep the file reproducible).
        flavour: "portable" (standard ONNX ops only) or "optimized" (attention as ONNX Runtime's
            memory-efficient contrib MultiHeadAttention; same numbers, far less memory at large S).

    Returns:
        The written file's path, digest, size, opset and export time.

    Raises:
        ExportError: unknown flavour, the exporter failed, or the graph does not match io_contract.
    """
    config = model.config
    example = make_inputs(trace_shape.as_tuple(), config=config, data="mixed", seed=0, salt="trace")
    args = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
    return export_module(
        model, args, Path(output), io_contract(config), model_config=config, opset=opset, flavour=flavour,
        metadata=metadata or {},
    )


def export_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    output: Path,
    contract: Contract,
    *,
    model_config: MitraConfig,
    opset: int,
    flavour: Flavour,
    metadata: dict[str, str],
) -> ExportResult:
    """Export `module` (a Tab2D, or a module built on one) traced with `args` to `output`, atomically.

    The TorchScript exporter with EXPORTER_SETTINGS; every input and output named, and every dim
    named or fixed, as `contract` says; volatile fields pinned (pin_volatile_fields), so the same
    weights give the same bytes.

    Args:
        module: the module to export; it is put in eval mode.
        args: example inputs, in the order of the contract's inputs.
        output: the .onnx file to write.
        contract: (inputs, outputs) the graph must have; str dims become dynamic and named, int dims fixed.
        model_config: the config of the Tab2D inside `module`, recorded in the metadata.
        opset: ONNX opset (>= 17).
        flavour: "portable" or "optimized" (attention as contrib MultiHeadAttention).
        metadata: extra `metadata_props` (content-derived values only); "mitra_build.flavour" is added.

    Returns:
        The written file's path, digest, size, opset and export time.

    Raises:
        ExportError: unknown flavour, the exporter failed, or the graph's inputs/outputs differ from the contract.
    """
    check_flavour(flavour)
    inputs, outputs = contract
    specs = (*inputs, *outputs)
    dynamic_axes = {spec.name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)} for spec in specs}
    started = time.perf_counter()
    with atomic_file(output) as raw_path, torch.no_grad(), warnings.catch_warnings(), \
            fused_attention(module, flavour == "optimized"):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(
                module.eval(),
                args,
                str(raw_path),
                input_names=[spec.name for spec in inputs],
                output_names=[spec.name for spec in outputs],
                dynamic_axes={name: axes for name, axes in dynamic_axes.items() if axes},
                opset_version=opset,
                custom_opsets={"com.microsoft": 1} if flavour == "optimized" else None,
                **EXPORTER_SETTINGS,
            )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(f"torch.onnx.export failed for {output}: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load(str(raw_path))
        _check_names(proto, inputs, outputs, output)
        pin_volatile_fields(proto, model_config, {**metadata, "mitra_build.flavour": flavour})
        for value, spec in zip((*proto.graph.input, *proto.graph.output), specs):
            name_dims(value, spec.shape)
        onnx.save_model(proto, str(raw_path))
    seconds = time.perf_counter() - started
    return ExportResult(path=output, sha256=sha256_file(output), size=output.stat().st_size, opset=opset, seconds=seconds)


def _check_names(proto: onnx.ModelProto, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], output: Path) -> None:
    """The exporter drops unused inputs silently; a graph that lost one would break the contract."""
    got = ([v.name for v in proto.graph.input], [v.name for v in proto.graph.output])
    want = ([s.name for s in inputs], [s.name for s in outputs])
    if got != want:
        raise ExportError(
            f"exported {output.name} has inputs/outputs {got}, its contract expects {want}: every contract input "
            "must be used by the module's forward, and its outputs returned in contract order"
        )


def name_dims(value: onnx.ValueInfoProto, dims: tuple[str | int, ...]) -> None:
    """Set `value`'s dims to the contract's: a str names a dynamic dim, an int fixes it.

    The exporter names dynamic dims after internal nodes. dim_value and dim_param are one protobuf
    oneof, so setting either clears the other; the explicit ClearField keeps that visible.
    """
    shape = value.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise ExportError(f"exported `{value.name}` has {len(shape.dim)} dims, its contract says {len(dims)}: {dims}")
    for dim, want in zip(shape.dim, dims):
        if isinstance(want, str):
            dim.ClearField("dim_value")
            dim.dim_param = want
        else:
            dim.ClearField("dim_param")
            dim.dim_value = want


def pin_volatile_fields(proto: onnx.ModelProto, config: MitraConfig, metadata: dict[str, str]) -> None:
    proto.producer_name = "mitra-build"
    proto.producer_version = __version__
    proto.doc_string = ""
    proto.graph.doc_string = ""
    for node in proto.graph.node:
        node.doc_string = ""
    props = {
        "mitra.task": config.task.value,
        "mitra.dim": str(config.dim),
        "mitra.dim_output": str(config.dim_output),
        "mitra.n_layers": str(config.n_layers),
        "mitra.n_heads": str(config.n_heads),
        "mitra_build.exporter": f"torch.onnx.export(dynamo=False) torch=={torch.__version__.split('+')[0]}",
        **metadata,
    }
    del proto.metadata_props[:]
    for key in sorted(props):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, props[key]


def numpy_inputs(inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Contract-ordered torch tensors from a feed dict (copies: the model must not alias caller data)."""
    return tuple(torch.from_numpy(np.array(inputs[name])) for name in INPUT_NAMES)
