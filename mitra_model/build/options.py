"""The settings of each reduced precision, validated without the quantizer's toolchain.

Kept apart from `quantize.py` (onnx, numpy, ONNX Runtime) so that loading the configuration, which
checks `[artifacts.options.<precision>]`, works in the slim install. `quantize.METHODS` pairs each
entry here with its converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mitra_model.errors import ConfigError


class QuantizeOptions(BaseModel):
    # strict: a TOML string "true" or a float block size is a mistake to report, not to coerce
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Int8Options(QuantizeOptions):
    # Weight scales per tensor, not per output channel. Measured on the synthetic full-size classifier
    # (random weights): per-tensor max logit error 0.017-0.022 vs 0.021-0.025 per-channel, same speed,
    # 77.3 vs 77.8 MB; on the tiny models the two were within noise. Random uniform weights have no
    # outlier channels, which is where per-channel wins: re-measure on the published weights.
    per_channel: bool = False


class Fp16Options(QuantizeOptions):
    pass


class Int4Options(QuantizeOptions):
    # Weights per block of this many input rows (K) share one scale (and zero point); MatMulNBits
    # needs a power of two >= 16. Measured (full-size synthetic classifier, verification matrix):
    # 32: 49.5 MB, argmax 99.4%; 64: 44.1 MB, 95.5%; 128: 41.5 MB, 96.6%; same speed within noise.
    block_size: int = Field(default=32, ge=16)
    # MatMulNBits compute type: 0 unset (the kernel's default), 1 fp32, 2 fp16, 3 bf16, 4 int8
    # (activations quantized per block at run time). Measured: 0 was 0.89-1.12x fp32's speed, 4 1.13-1.17x.
    accuracy_level: int = Field(default=4, ge=0, le=4)
    # Symmetric drops the zero points (48.3 MB at block 32) but measured 97.2% argmax vs 99.4%.
    is_symmetric: bool = False

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two >= 16 (MatMulNBits), got {value}")
        return value


OPTIONS: dict[str, type[QuantizeOptions]] = {"int8": Int8Options, "fp16": Fp16Options, "int4": Int4Options}


def quantize_options(precision: str, options: Mapping[str, Any] | None = None) -> QuantizeOptions:
    """Validate per-precision `options` against the method's option model, filling in defaults.

    The configuration can call this at load time, so a bad key fails before any build starts.

    Args:
        precision: one of OPTIONS (the quantizer's precisions).
        options: option name -> value (e.g. from a TOML table); None or empty for the defaults.

    Returns:
        The method's frozen options model.

    Raises:
        ConfigError: `precision` is unknown, an option key is unknown (the error names it and the
            allowed keys), or a value has the wrong type or range.
    """
    if precision not in OPTIONS:
        raise ConfigError(f"unknown precision {precision!r}: expected one of {', '.join(OPTIONS)}")
    model = OPTIONS[precision]
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
        raise ConfigError(f"{precision} quantization: {'; '.join(problems)} (allowed options: {allowed})") from None
