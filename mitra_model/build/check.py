"""The check stage: `onnx.checker` (full check) and strict shape inference, plus the I/O contract."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from mitra_model.build.export import TensorSpec, io_contract
from mitra_model.errors import OnnxCheckError
from mitra_model.model.tab2d import MitraConfig

_NODE_IN_MESSAGE = re.compile(r"(?:node name|Name):\s*([^\s,)]+)")


@dataclass(frozen=True)
class CheckResult:
    path: Path
    opset: int
    n_nodes: int
    op_types: tuple[str, ...]


def check_onnx(
    path: Path, *, config: MitraConfig, contract: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None = None
) -> CheckResult:
    """Run `onnx.checker.check_model(full_check=True)` and strict shape inference on `path`, and
    check that inputs/outputs follow the I/O contract with every named dimension symbolic.

    Args:
        path: the ONNX file.
        config: the architecture it was exported from.
        contract: (inputs, outputs) to hold it to; default the full model's (`export.io_contract`).

    Raises:
        OnnxCheckError: the message names the offending node (or input/output) and the rule broken.
    """
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxCheckError(_describe(path, "onnx.checker", str(exc))) from None
    model = onnx.load(str(path))
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise OnnxCheckError(_describe(path, "shape inference", str(exc))) from None
    inputs, outputs = contract if contract is not None else io_contract(config)
    _check_values(path, "input", list(model.graph.input), inputs)
    _check_values(path, "output", list(model.graph.output), outputs)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return CheckResult(
        path=path, opset=opset, n_nodes=len(model.graph.node), op_types=tuple(sorted({n.op_type for n in model.graph.node}))
    )


def _describe(path: Path, stage: str, message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "no detail"
    found = _NODE_IN_MESSAGE.search(message)
    where = f"node `{found.group(1)}`" if found else "the graph"
    return f"{path} failed {stage} at {where}: {first}"


def _check_values(path: Path, kind: str, actual: list[onnx.ValueInfoProto], expected: tuple[TensorSpec, ...]) -> None:
    names = [value.name for value in actual]
    if names != [spec.name for spec in expected]:
        raise OnnxCheckError(f"{path}: graph {kind}s are {names}, the consumer contract expects {[s.name for s in expected]}")
    for value, spec in zip(actual, expected):
        tensor = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        if dtype != spec.dtype:
            raise OnnxCheckError(f"{path}: {kind} `{spec.name}` has dtype {dtype}, the contract expects {spec.dtype}")
        dims = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
        if len(dims) != len(spec.shape):
            raise OnnxCheckError(f"{path}: {kind} `{spec.name}` has rank {len(dims)}, the contract expects {len(spec.shape)}")
        for index, (got, want) in enumerate(zip(dims, spec.shape)):
            if isinstance(want, str) and not isinstance(got, str):
                raise OnnxCheckError(
                    f"{path}: {kind} `{spec.name}` dim {index} is fixed at {got}; the contract needs it dynamic ({want})"
                )
            if isinstance(want, int) and got != want:
                raise OnnxCheckError(f"{path}: {kind} `{spec.name}` dim {index} is {got}, the contract expects {want}")


@dataclass(frozen=True)
class FileIdentity:
    """What an exported file says about itself in its metadata."""

    precision: str  # "fp32" for an export, the quantizer's precision otherwise
    flavour: str | None
    weights_sha256: str | None  # the snapshot's model.safetensors it was exported from
    synthetic: bool


def read_identity(path: Path) -> FileIdentity:
    """Read an ONNX file's mitra-build metadata (without its weights' meaning: no session is made).

    Raises:
        OnnxCheckError: the file is missing, empty, truncated or not ONNX.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxCheckError(f"{path} does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the bytes are not a model
        raise OnnxCheckError(f"{path} is not a readable ONNX model ({type(exc).__name__}); is it truncated "
                             "or another kind of file?") from None
    if not model.graph.node:
        raise OnnxCheckError(f"{path} holds no ONNX graph (empty or not an ONNX model)")
    props = {p.key: p.value for p in model.metadata_props}
    return FileIdentity(
        precision=props.get("mitra_build.precision", "fp32"), flavour=props.get("mitra_build.flavour"),
        weights_sha256=props.get("mitra.weights_sha256"), synthetic=props.get("mitra.synthetic") == "true",
    )


def require_exported_from(path: Path, identity: FileIdentity, weights_sha256: str, snapshot: Path) -> None:
    """Refuse to check or verify a file against weights it was not exported from (every cell would
    fail, telling nothing)."""
    if identity.weights_sha256 is not None and identity.weights_sha256 != weights_sha256:
        raise OnnxCheckError(
            f"{path} was exported from weights with sha256 {identity.weights_sha256[:16]}…, but {snapshot} holds "
            f"{weights_sha256[:16]}…: these weights are not the ones this file was exported from. Pass the "
            "snapshot it was built from."
        )

