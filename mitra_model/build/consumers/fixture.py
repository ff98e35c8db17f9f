"""The consumer fixture: fixed inputs in the consumer I/O contract, and Python ONNX Runtime's outputs.

What Python writes for the JS checkers (`consumers/lib/fixture.mjs` reads it, in Node.js and in the
browser): a few shapes with ties, padded support rows and one support row, each case's inputs, and
what Python ONNX Runtime outputs for one model file, or for the support-cache pair (encode-support,
then predict-query on its outputs: how a fit-once / predict-many consumer runs it).

`fixture.json` is a `Fixture`, serialised as:
    {"schema": "mitra-build/consumer-fixture/v1", "model_sha256", ["predict_sha256",] "task", "seed",
     "cases": [{"name", "shape": [B, S, Q, F], "data", "padded_support_rows",
                "inputs": {name: TENSOR}, "expected": TENSOR}]}
    For a pair, "model_sha256" is the encoder's and "predict_sha256" the predictor's.
    TENSOR = {"dtype": "float32" | "int64" | "bool", "shape": [...], "data": base64 of the
              little-endian bytes (bool: one byte per element)}

The expected outputs need torch-backed modules (the I/O contract, the input generator, ONNX Runtime
sessions); they are imported in `python_ort_outputs` and `write_fixture` only, so that reading a
fixture, and importing `mitra_model.consumers` at all, needs neither torch nor onnxruntime.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, model_validator

from mitra_model.build.config import Cell
from mitra_model.errors import ConfigError
from mitra_model.fileutil import sha256_file, write_bytes_atomic
from mitra_model.model.kinds import DataKind

if TYPE_CHECKING:
    from mitra_model.model.tab2d import MitraConfig

FixtureSchemaId = Literal["mitra-build/consumer-fixture/v1"]  # lib/fixture.mjs FIXTURE_SCHEMA
FIXTURE_SCHEMA_ID: str = get_args(FixtureSchemaId)[0]
FIXTURE_NAME = "fixture.json"
TensorDtype = Literal["float32", "int64", "bool"]
# Little-endian on the wire whatever this machine is; bool as one byte (0 or 1) per element.
_WIRE_DTYPES: dict[TensorDtype, np.dtype] = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8"), "bool": np.dtype("u1")}
_SHA256 = r"^[0-9a-f]{64}$"

# Small shapes (the browser runs the WASM backend single-threaded), each dimension different from
# the export's trace shape, with every column type, heavy ties, one support row, and a batch whose
# items have different numbers of padded support rows.
DEFAULT_CASES: tuple[Cell, ...] = (
    Cell(name="base", batch=1, n_support=24, n_query=6, n_features=5, data="mixed"),
    Cell(name="integer-ties", batch=1, n_support=30, n_query=8, n_features=4, data="integer_ties"),
    Cell(name="padded-batch", batch=3, n_support=20, n_query=5, n_features=5, data="mixed", padded_support_rows=7),
    Cell(name="one-support-row", batch=1, n_support=1, n_query=3, n_features=3, data="mixed"),
)
DEFAULT_SEED = 20240


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FixtureTensor(_Document):
    """One array (TENSOR), as base64 of its little-endian bytes; the bytes must fill the shape."""

    dtype: TensorDtype
    shape: tuple[NonNegativeInt, ...]
    data: str

    @model_validator(mode="after")
    def _data_fills_the_shape(self) -> FixtureTensor:
        try:
            size = len(base64.b64decode(self.data, validate=True))
        except binascii.Error as exc:
            raise ValueError(f"data is not base64: {exc}") from None
        want = math.prod(self.shape) * _WIRE_DTYPES[self.dtype].itemsize
        if size != want:
            raise ValueError(f"{size} bytes of data for shape {list(self.shape)} of {self.dtype} (expected {want})")
        return self

    @classmethod
    def from_array(cls, array: np.ndarray) -> FixtureTensor:
        """Encode `array` (float32, int64 or bool).

        Raises:
            ConfigError: any other dtype.
        """
        names: dict[np.dtype, TensorDtype] = {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64", np.dtype(bool): "bool"}
        if array.dtype not in names:
            raise ConfigError(f"fixture tensors are float32, int64 or bool, got {array.dtype}")
        dtype = names[array.dtype]
        data = np.ascontiguousarray(array.astype(_WIRE_DTYPES[dtype], copy=False)).tobytes()
        return cls(dtype=dtype, shape=array.shape, data=base64.b64encode(data).decode("ascii"))

    def to_array(self) -> np.ndarray:
        """The array, in this machine's byte order (bool as bool)."""
        array = np.frombuffer(base64.b64decode(self.data), dtype=_WIRE_DTYPES[self.dtype]).reshape(self.shape)
        return array.astype(bool) if self.dtype == "bool" else array.astype(array.dtype.newbyteorder("="), copy=False)


class FixtureCase(_Document):
    """One input shape and table type: the inputs by contract name, and Python ORT's output."""

    name: str = Field(min_length=1)
    shape: tuple[int, int, int, int]  # (batch, n_support, n_query, n_features)
    data: DataKind
    padded_support_rows: NonNegativeInt
    inputs: dict[str, FixtureTensor]
    expected: FixtureTensor


class Fixture(_Document):
    """`fixture.json`: the cases, and the model file(s) whose Python ORT outputs they expect."""

    schema_id: FixtureSchemaId = Field(FIXTURE_SCHEMA_ID, alias="schema")
    model_sha256: str = Field(pattern=_SHA256)  # the single file, or the pair's encoder
    predict_sha256: str | None = Field(None, pattern=_SHA256)  # the pair's predictor; None for one file
    task: str = Field(min_length=1)  # model.Task's value: what the labels mean
    seed: int
    cases: tuple[FixtureCase, ...] = Field(min_length=1)

    @property
    def is_pair(self) -> bool:
        return self.predict_sha256 is not None

    def to_json(self) -> str:
        """The document lib/fixture.mjs reads: no null keys (a single file's has no predict_sha256)."""
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True), indent=1) + "\n"


def python_ort_outputs(onnx_path: Path, predict_path: Path | None = None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """What Python ONNX Runtime outputs for the consumer I/O contract's inputs.

    Args:
        onnx_path: one model file, or the support-cache pair's encoder.
        predict_path: the pair's predictor: the encoder's outputs go to it by name, with x_query.

    Returns:
        A function from the contract's inputs (by name) to the output array.
    """
    # deferred: importing the consumer checks needs no torch or onnxruntime (setup.sh does); writing a fixture does
    from mitra_model.build.export import INPUT_NAMES, OUTPUT_NAME
    from mitra_model.build.support_cache import ENCODE_INPUT_NAMES
    from mitra_model.build.verify import onnx_session

    session = onnx_session(Path(onnx_path), threads=1)
    if predict_path is None:
        return lambda inputs: session.run([OUTPUT_NAME], {name: inputs[name] for name in INPUT_NAMES})[0]
    predictor = onnx_session(Path(predict_path), threads=1)
    cache_names = [output.name for output in session.get_outputs()]

    def through_the_pair(inputs: dict[str, np.ndarray]) -> np.ndarray:
        cache = dict(zip(cache_names, session.run(None, {name: inputs[name] for name in ENCODE_INPUT_NAMES})))
        return predictor.run([OUTPUT_NAME], {**cache, "x_query": inputs["x_query"]})[0]

    return through_the_pair


def write_fixture(
    onnx_path: Path,
    model_config: MitraConfig,
    out_dir: Path,
    *,
    predict_path: Path | None = None,
    cases: Sequence[Cell] = DEFAULT_CASES,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write `out_dir/fixture.json`: the cases' inputs and Python ONNX Runtime's outputs for `onnx_path`.

    Args:
        onnx_path: the model whose outputs become the expected values (the encoder, for a pair).
        model_config: its config (decides the label dtype: int64 classes or float32 values).
        out_dir: folder to write into (created if needed).
        predict_path: the support-cache pair's predictor; the expected values are then
            predict_query(encode_support(...), x_query).
        cases: shapes and table types (name, batch, n_support, n_query, n_features, data,
            padded_support_rows); the default covers ties, one support row and padded rows.
        seed: the same (seed, cases) always gives the same inputs.

    Returns:
        The path of the fixture file.
    """
    # deferred: importing the consumer checks needs no torch or onnxruntime (setup.sh does); writing a fixture does
    from mitra_model.build.export import INPUT_NAMES
    from mitra_model.model.inputs import make_inputs

    onnx_path = Path(onnx_path)
    run = python_ort_outputs(onnx_path, predict_path)
    records = []
    for case in cases:
        inputs = make_inputs(
            case.as_tuple(), config=model_config, data=case.data, padded_support_rows=case.padded_support_rows,
            seed=seed, salt=case.name,
        )
        records.append(FixtureCase(
            name=case.name, shape=case.as_tuple(), data=case.data, padded_support_rows=case.padded_support_rows,
            inputs={name: FixtureTensor.from_array(inputs[name]) for name in INPUT_NAMES},
            expected=FixtureTensor.from_array(np.asarray(run(inputs), dtype=np.float32)),
        ))
    fixture = Fixture(
        model_sha256=sha256_file(onnx_path),
        predict_sha256=None if predict_path is None else sha256_file(Path(predict_path)),
        task=model_config.task.value, seed=seed, cases=tuple(records),
    )
    path = Path(out_dir) / FIXTURE_NAME
    write_bytes_atomic(path, fixture.to_json().encode())
    return path


def read_fixture(path: Path) -> Fixture:
    """Read and validate a fixture file.

    Args:
        path: a file from `write_fixture`.

    Returns:
        The fixture, every tensor's bytes checked against its shape.

    Raises:
        ConfigError: the file is missing, is not JSON, or is not a consumer fixture; the message
            names each bad field (e.g. `cases.2.inputs.x_query`).
    """
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"fixture {path} does not exist: make one with mitra_model.consumers.write_fixture") from None
    try:
        return Fixture.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or '(document)'}: {error['msg']}" for error in exc.errors(include_url=False)
        )
        raise ConfigError(
            f"{path} is not a consumer fixture ({FIXTURE_SCHEMA_ID}): {problems}; "
            "write it again with mitra_model.consumers.write_fixture"
        ) from None
