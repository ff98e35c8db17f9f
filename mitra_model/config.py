"""The build configuration: `config/mitra-build.toml`, validated at load.

This is the only module that reads the configuration file or the environment variable naming it;
every other module receives typed values from here.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .store import StoreConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "mitra-build.toml"
CONFIG_ENV_VAR = "MITRA_BUILD_CONFIG"

TaskName = Literal["classification", "regression"]
SizeName = Literal["tiny", "full"]
DataKind = Literal["mixed", "continuous", "integer_ties", "large_magnitude", "constant"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Shape(_Strict):
    batch: int = Field(ge=1)
    n_support: int = Field(ge=1)
    n_query: int = Field(ge=1)
    n_features: int = Field(ge=1)

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.batch, self.n_support, self.n_query, self.n_features)


class ExportConfig(_Strict):
    opset: int = Field(ge=17, le=21)
    trace_shape: Shape


FlavourName = Literal["portable", "optimized"]
SUPPORT_CACHE_TOLERANCE = "support-cache"  # [verification.tolerances.support-cache]: the pair vs the full model
PrecisionName = Literal["int8", "fp16"]


class ArtifactsConfig(_Strict):
    """Which artifacts a build produces. Each is verified over the full matrix; one that fails is not
    published and fails the run."""

    flavours: tuple[FlavourName, ...] = ("portable",)
    precisions: tuple[PrecisionName, ...] = ()
    support_cache: bool = False  # also the encode_support / predict_query pair (fit once, predict many)

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactsConfig:
        if "portable" not in self.flavours:
            raise ValueError("flavours must include 'portable' (the reference artifact every consumer can run)")
        if self.precisions and "optimized" not in self.flavours:
            raise ValueError("precisions (int8/fp16) are built from the optimized flavour: add 'optimized' to flavours")
        for field, values in (("flavours", self.flavours), ("precisions", self.precisions)):
            if len(set(values)) != len(values):
                raise ValueError(f"{field} lists a value twice: {list(values)}")
        return self


class SizeConfig(_Strict):
    dim: int = Field(ge=8)
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> SizeConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        return self


class Tolerance(_Strict):
    max_abs: float = Field(gt=0)
    max_prob_err: float | None = Field(default=None, gt=0, le=1)  # classifier: softmax probabilities
    min_argmax_agreement: float = Field(ge=0, le=1)
    min_correlation: float = Field(ge=-1, le=1)
    # Correlation is only judged where the reference's spread (std) reaches this: below it, quantization
    # noise of a few 1e-2 dominates any correlation while max_abs still bounds the error.
    correlation_min_spread: float = Field(default=0.0, ge=0)


class Cell(Shape):
    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")
    data: DataKind = "mixed"
    padded_support_rows: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _keeps_a_valid_row(self) -> Cell:
        if self.padded_support_rows >= self.n_support:
            raise ValueError(
                f"padded_support_rows ({self.padded_support_rows}) must leave at least one valid row "
                f"of n_support ({self.n_support})"
            )
        return self


class VerificationConfig(_Strict):
    seed: int
    tolerances: dict[str, Tolerance]
    cells: tuple[Cell, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names_and_fp32(self) -> VerificationConfig:
        names = [cell.name for cell in self.cells]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"cell names must be unique; repeated: {', '.join(duplicates)}")
        missing = {"fp32", "int8", "fp16"} - set(self.tolerances)
        if missing:
            raise ValueError(f"tolerances for {', '.join(sorted(missing))} are required")
        return self

    def tolerance(self, precision: str) -> Tolerance:
        if precision not in self.tolerances:
            raise ConfigError(
                f"no verification tolerance for precision {precision!r}: add [verification.tolerances.{precision}] "
                f"to the configuration (have: {', '.join(sorted(self.tolerances))})"
            )
        return self.tolerances[precision]


class Variant(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    repo_id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    revision: str = Field(default="main", min_length=1)
    task: TaskName


class ScheduleConfig(_Strict):
    cron: str
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid_cron(self) -> ScheduleConfig:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(self.cron, datetime(2026, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"cron {self.cron!r} is not a valid 5-field cron expression: {exc}") from None
        return self


class ExecutionConfig(_Strict):
    """How the verification cells run (each cell is one Prefect task)."""

    task_runner: Literal["thread", "dask"] = "thread"
    max_workers: int = Field(default=1, ge=1)  # thread runner: cells at once (each already uses every core)
    dask_address: str | None = None  # an existing scheduler, e.g. "tcp://10.0.0.5:8786"; None: a LocalCluster
    dask_workers: int = Field(default=2, ge=1)  # LocalCluster worker processes (one thread each)
    # "store": the cells' results are persisted to the [store] bucket (Prefect result storage), so a
    # worker on another host hands them back through S3; "local": in memory / the flow's own disk.
    result_storage: Literal["local", "store"] = "local"


ConsumerRuntime = Literal["onnxruntime-node", "onnxruntime-web"]


class ConsumersConfig(_Strict):
    """Where each artifact is loaded after verification, and how close it must stay to Python ORT."""

    node: bool = True  # the flow's consumer-check stage (onnxruntime-node)
    browser: bool = False  # headless Chromium + onnxruntime-web (WASM); the tests always run it on tiny models
    tolerances: dict[str, dict[ConsumerRuntime, float]]

    def tolerance(self, precision: str, runtime: str) -> float:
        try:
            return self.tolerances[precision][runtime]  # type: ignore[index]
        except KeyError:
            raise ConfigError(f"no consumer tolerance for {precision} in {runtime}: add it under "
                              f"[consumers.tolerances.{precision}]") from None


class BuildConfig(_Strict):
    export: ExportConfig
    consumers: ConsumersConfig
    execution: ExecutionConfig = ExecutionConfig()
    artifacts: ArtifactsConfig = ArtifactsConfig()
    schedule: ScheduleConfig
    store: StoreConfig | None = None  # where builds are published; None: local builds only
    sizes: dict[SizeName, SizeConfig]
    verification: VerificationConfig
    variants: tuple[Variant, ...] = ()

    @model_validator(mode="after")
    def _result_storage_has_a_store(self) -> BuildConfig:
        if self.execution.result_storage == "store" and self.store is None:
            raise ValueError('execution.result_storage = "store" needs a [store] section (the bucket results go to)')
        return self

    @model_validator(mode="after")
    def _support_cache_has_a_tolerance(self) -> BuildConfig:
        if self.artifacts.support_cache and SUPPORT_CACHE_TOLERANCE not in self.verification.tolerances:
            raise ValueError(f"artifacts.support_cache needs [verification.tolerances.{SUPPORT_CACHE_TOLERANCE}]")
        return self

    @model_validator(mode="after")
    def _matrix_avoids_trace_shape(self) -> BuildConfig:
        traced = self.export.trace_shape.as_tuple()
        for cell in self.verification.cells:
            if cell.as_tuple() == traced:
                raise ValueError(
                    f"verification cell {cell.name!r} has the trace shape {traced}: a dimension frozen "
                    "at trace time would pass unnoticed; change the cell or export.trace_shape"
                )
        return self

    def with_artifacts(self, *, flavours: list[str] | None = None, precisions: list[str] | None = None) -> BuildConfig:
        """This configuration building the given flavours and/or reduced precisions instead of those in
        [artifacts] (None keeps the file's choice), validated like the file."""
        chosen = {key: tuple(value) for key, value in (("flavours", flavours), ("precisions", precisions)) if value is not None}
        try:
            artifacts = self.artifacts.model_validate({**self.artifacts.model_dump(), **chosen})
        except ValidationError as exc:
            raise ConfigError(f"artifacts {chosen!r}: {exc.errors()[0]['msg']}") from None
        return self.model_copy(update={"artifacts": artifacts})

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        known = ", ".join(v.name for v in self.variants) or "none"
        raise ConfigError(f"no variant named {name!r} in the configuration (known: {known})")


def config_path() -> Path:
    """The configuration file in use: $MITRA_BUILD_CONFIG if set, else config/mitra-build.toml."""
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_config(path: Path | None = None) -> BuildConfig:
    """Read and validate the build configuration.

    Raises:
        ConfigError: the file is missing, is not TOML, or a field is invalid (the message names the
            file and every bad field with its dotted path).
    """
    path = Path(path) if path is not None else config_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist (set {CONFIG_ENV_VAR} or pass --config)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field `{'.'.join(str(part) for part in err['loc']) or '<root>'}`: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"configuration file {path} is invalid: {problems}") from None


# The sections that decide a build's bytes and its verification record. The schedule, the store, the
# task runner and the variant list do not: changing the cron or adding a variant rebuilds nothing.
BUILD_SECTIONS = frozenset({"export", "artifacts", "verification", "consumers"})


def config_digest(config: BuildConfig) -> str:
    """SHA-256 of the configuration sections that decide a build, in canonical form (part of the version)."""
    return hashlib.sha256(config.model_dump_json(include=set(BUILD_SECTIONS)).encode()).hexdigest()
