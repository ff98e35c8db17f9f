"""The typed options a recipe takes (`[artifacts.options.<recipe>]`), validated without its toolchain.

Each recipe of the registry names its options model here; loading the configuration checks the
table against it, so a mistyped key fails before any build starts, in the slim install too (this
module needs only pydantic).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mitra_model.errors import ConfigError


class RecipeOptions(BaseModel):
    """A recipe's options; a recipe that takes none uses this model itself (no fields)."""

    # strict: a TOML string "true" or a float block size is a mistake to report, not to coerce
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GptqCalibration(RecipeOptions):
    """The calibration of GPTQ rounding (mitra_model/build/gptq.py), for the recipes that can round with it."""

    # GPTQ's calibration: one synthetic table per (n_support, n_query, n_features), drawn like a real
    # table and prepared as the wrapper prepares one (gptq.calibration_table), with this seed; never the
    # verification's tables. The default's 24 shapes span the support sizes, query counts and widths of
    # the matrix; 12 of them instead left int4's breast-cancer err/spread at 0.30 against 0.13: fewer
    # tables make the rounding fit them (bench/results-int4-options.md).
    calibration: tuple[tuple[int, int, int], ...] = Field(default=(
        (256, 32, 8), (128, 32, 12), (300, 40, 5), (200, 20, 16), (96, 24, 30), (64, 16, 4),
        (400, 50, 3), (150, 30, 24), (80, 20, 40), (500, 60, 6), (120, 24, 20), (60, 12, 64),
        (100, 20, 10), (350, 40, 7), (50, 10, 50), (220, 30, 14), (40, 10, 20), (600, 64, 4),
        (180, 36, 18), (70, 14, 36), (300, 30, 9), (130, 26, 26), (90, 18, 45), (450, 50, 11),
    ), strict=False)
    calibration_seed: int = 0
    # Added to the calibration Hessian's diagonal, as a share of its mean (GPTQ's dampening).
    gptq_damp: float = Field(default=0.01, gt=0, le=1)

    @field_validator("calibration", mode="before")
    @classmethod
    def _shapes_from_lists(cls, value: Any) -> Any:  # TOML gives arrays of arrays; strict mode wants tuples
        if isinstance(value, list | tuple):
            return tuple(tuple(shape) if isinstance(shape, list) else shape for shape in value)
        return value

    @field_validator("calibration")
    @classmethod
    def _table_shapes(cls, value: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, int, int], ...]:
        if not value:
            raise ValueError("needs at least one (n_support, n_query, n_features) table")
        for shape in value:
            if len(shape) != 3 or min(shape) < 1 or shape[0] < 2:
                raise ValueError(f"every (n_support, n_query, n_features) must be >= 1, with n_support >= 2 "
                                 f"(a support set needs 2 rows), got {list(shape)}")
        return value


class Int8Options(GptqCalibration):
    # Weight scales per tensor, not per output channel. Measured on the synthetic full-size classifier
    # (random weights): per-tensor max logit error 0.017-0.022 vs 0.021-0.025 per-channel, same speed,
    # 77.3 vs 77.8 MB; on the tiny models the two were within noise. Random uniform weights have no
    # outlier channels, which is where per-channel wins: re-measure on the published weights.
    per_channel: bool = False
    # How activations are quantized at run time. "row": one scale per row (per token: a table cell's
    # embedding), so a row's output never depends on what else is in the batch; "tensor": ONNX Runtime's
    # dynamic quantization, one scale per tensor (set by the largest value anywhere in the call, support
    # rows and other tables included). bench/results-precision.md compares the two.
    activations: Literal["row", "tensor"] = "row"
    # Weight levels: 7 bits ([-63, 63]) or 8 ([-127, 127]). ONNX Runtime's u8 x s8 GEMM on x86 CPUs without
    # VNNI (AVX2, AVX-512 without VNNI) sums pairs of products in saturating int16 (VPMADDUBSW): with
    # 8-bit weights a pair overflows and the result depends on the consumer's CPU. Measured (full-size
    # classifier, err/spread on iris / wine / breast-cancer / digits): on an AVX2-only EPYC 8-bit weights
    # gave 0.75 / 1.27 / 1.86 / 2.98, 7-bit 0.072 / 0.104 / 0.094 / 0.191; on an AVX-512 VNNI EPYC 8-bit
    # gave 0.044 / 0.069 / 0.088 / 0.125. 7 bits cannot overflow (255 * 63 * 2 < 2**15) on any CPU:
    # ONNX Runtime's own remedy (`reduce_range`). The same size and kernel, so the same speed.
    weight_bits: Literal[7, 8] = 7
    # How the weights are rounded onto their levels: "nearest", or "gptq" (as int4's `rounding`; per-row
    # activations only: ONNX Runtime's per-tensor path rounds the weights itself). 7-bit weights cost
    # int8 a share of its signal that GPTQ wins back: full-size classifier, err/spread on iris / wine /
    # breast-cancer / digits 0.072 / 0.104 / 0.094 / 0.191 to nearest, 0.042 / 0.064 / 0.077 / 0.121 with
    # GPTQ on the default calibration (bench/results-signal.md). Costs ~5 min a full-size int8 on 2 vCPUs.
    rounding: Literal["nearest", "gptq"] = "gptq"

    @model_validator(mode="before")
    @classmethod
    def _per_tensor_rounds_to_nearest(cls, data: Any) -> Any:  # unless told otherwise (then refused below)
        if isinstance(data, Mapping) and data.get("activations") == "tensor" and "rounding" not in data:
            return {**data, "rounding": "nearest"}
        return data

    @model_validator(mode="after")
    def _gptq_rows(self) -> Int8Options:
        if self.rounding == "gptq" and self.activations == "tensor":
            raise ValueError("rounding 'gptq' needs activations = 'row' (with 'tensor' ONNX Runtime's quantizer "
                             "rounds the weights)")
        return self


class Fp16Options(RecipeOptions):
    pass


class Int4Options(GptqCalibration):
    # Weights per block of this many input rows (K) share one scale (and zero point); MatMulNBits
    # needs a power of two >= 16. Measured (full-size synthetic classifier, verification matrix):
    # 32: 49.5 MB, argmax 99.4%; 64: 44.1 MB, 95.5%; 128: 41.5 MB, 96.6%; same speed within noise.
    block_size: int = Field(default=32, ge=16)
    # MatMulNBits compute type: 0 unset (the kernel's default), 1 fp32, 2 fp16, 3 bf16, 4 int8
    # (activations quantized per block at run time). Measured: 0 was 0.89-1.12x fp32's speed, 4 1.13-1.17x.
    accuracy_level: int = Field(default=4, ge=0, le=4)
    # Symmetric drops the zero points (48.3 MB at block 32) but measured 97.2% argmax vs 99.4%.
    is_symmetric: bool = False
    # Weights kept at 8 bits (MatMulNBits bits=8, same blocks): those of every MatMul whose node name
    # contains one of these (e.g. "attention2/v" is every layer's feature-attention value projection).
    # The sensitive few cost little: bench/results-int4-options.md measures each role's share of the error.
    eight_bit: tuple[str, ...] = Field(default=(), strict=False)
    # How the 4-bit weights are rounded onto their grid: "nearest" (ONNX Runtime's quantizer), or
    # "gptq", which moves each weight's rounding error where calibration inputs do not reach
    # (mitra_model/build/gptq.py; bench/results-int4-options.md measures both).
    rounding: Literal["nearest", "gptq"] = "gptq"

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two >= 16 (MatMulNBits), got {value}")
        return value

    @model_validator(mode="after")
    def _gptq_grid(self) -> Int4Options:
        if self.rounding == "gptq" and self.is_symmetric:
            raise ValueError("rounding 'gptq' rounds onto the asymmetric grid (zero points): set is_symmetric = false "
                             "or rounding = 'nearest'")
        return self


def validate_options(recipe: str, model: type[RecipeOptions], options: Mapping[str, Any] | None = None
                     ) -> RecipeOptions:
    """Validate `options` against the recipe's options model, filling in defaults.

    Args:
        recipe: the recipe's name, for messages (e.g. "int4").
        model: its options model.
        options: option name -> value (e.g. from a TOML table); None or empty for the defaults.

    Returns:
        The frozen options.

    Raises:
        ConfigError: an option key is unknown (the error names it and the allowed keys), or a
            value has the wrong type or range.
    """
    allowed = ", ".join(model.model_fields) or "none"
    try:
        return model.model_validate(dict(options or {}))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "options"
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown option {key!r}")
            else:
                problems.append(f"option {key}={error.get('input')!r}: {error['msg']}")
        raise ConfigError(f"{recipe}: {'; '.join(problems)} (allowed options: {allowed})") from None
