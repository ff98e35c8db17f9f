"""The build configuration: `config/mitra-build.toml`, validated at load.

This is the only module that reads the configuration file or the environment variable naming it;
every other module receives typed values from here. Which file: `--config`, else
$MITRA_BUILD_CONFIG, else `config/mitra-build.toml` in the working directory, else the default
packaged with the library (so an installed wheel works from any folder).
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from datetime import datetime
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mitra_model.build import recipes
from mitra_model.build.options import RecipeOptions
from mitra_model.errors import ConfigError
from mitra_model.model.architecture import LIMITS
from mitra_model.model.kinds import DataKind, Shape, SizeConfig, SizeName, TaskName
from mitra_model.release.store import StoreConfig

# The packaged default (package data: a symlink to config/mitra-build.toml in a checkout, the file
# itself in a wheel), used when neither --config, $MITRA_BUILD_CONFIG nor ./config/ names one.
DEFAULT_CONFIG_PATH: Traversable = files("mitra_model") / "data" / "mitra-build.toml"
CONFIG_ENV_VAR = "MITRA_BUILD_CONFIG"
WORKDIR_CONFIG_PATH = Path("config") / "mitra-build.toml"  # relative to the working directory
# Where builds and caches go when a run names no folder: a worker's scheduled runs take no
# parameters, so an operator points them at a big disk (or a test at its temp folder) with this.
ARTIFACTS_ENV_VAR = "MITRA_BUILD_ARTIFACTS"

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportConfig(_Strict):
    opset: int = Field(ge=17, le=21)
    trace_shape: Shape


OptionValue = int | float | bool | str | list[str] | list[list[int]]  # the recipe checks what its option takes


class ArtifactsConfig(_Strict):
    """Which artifacts a build produces (the recipes in mitra_model/recipes.py). Each is verified over
    the full matrix; one that fails is not published and fails the run."""

    flavours: tuple[str, ...] = ("portable",)  # fp32 exports: recipes.choices("flavours")
    precisions: tuple[str, ...] = ()  # reduced precisions: recipes.choices("precisions")
    support_cache: bool = False  # also the encode_support / predict_query pair (fit once, predict many)
    # Per-recipe settings, e.g. [artifacts.options.int4] block_size = 32; checked by the recipe at load.
    options: dict[str, dict[str, OptionValue]] = {}

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactsConfig:
        for key in ("flavours", "precisions"):
            values, allowed = getattr(self, key), recipes.choices(key)  # type: ignore[arg-type]
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"{key} has unknown value(s) {unknown}; expected some of {list(allowed)}")
            if len(set(values)) != len(values):
                raise ValueError(f"{key} lists a value twice: {list(values)}")
        if "portable" not in self.flavours:
            raise ValueError("flavours must include 'portable' (the reference artifact every consumer can run)")
        recipes.planned(self)  # ValueError: a recipe whose source recipe is not planned
        for name, options in self.options.items():  # checked even when not planned: a run may plan it
            try:
                recipes.recipe(name).checked_options(options)
            except KeyError as exc:
                raise ValueError(f"options.{name}: {exc.args[0]}") from None
            except ConfigError as exc:
                raise ValueError(f"options.{name}: {exc}") from None
        return self

    def planned(self) -> list[recipes.Recipe]:
        """The recipes this selects, each after the one it derives from."""
        return recipes.planned(self)

    def options_for(self, recipe: recipes.Recipe) -> RecipeOptions:
        """[artifacts.options.<name>] of the recipe, typed (unset keys: the maker's defaults)."""
        return recipe.checked_options(self.options.get(recipe.name))


class Tolerance(_Strict):
    # allow_inf_nan=False: `max_abs = inf` would switch verification off without saying so
    max_abs: float = Field(gt=0, allow_inf_nan=False)
    max_prob_err: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)  # classifier: softmax probabilities
    min_argmax_agreement: float = Field(ge=0, le=1, allow_inf_nan=False)
    min_correlation: float = Field(ge=-1, le=1, allow_inf_nan=False)
    # Correlation is only judged where the reference's spread (std) reaches this: below it, quantization
    # noise of a few 1e-2 dominates any correlation while max_abs still bounds the error.
    correlation_min_spread: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # The signal an artifact keeps: what the output varies by across a table's query rows (the part
    # that depends on the input), not its absolute error. A random-weight model predicts nearly one
    # class everywhere, so plain argmax agreement passes anything; these do not (verify.signal_metrics).
    # RMS(artifact - reference) / the reference's spread across query rows (per class, pooled), on the
    # matrix's cells (random inputs) and, unless the next bound is set, on the real tables:
    max_err_over_spread: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # the same on the task checks' real tables, whose rows vary the way a user's do
    max_task_err_over_spread: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # classifier: argmax agreement after centring each class over the query rows
    min_centered_argmax_agreement: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    # regressor: correlation after centring each table over its query rows
    min_centered_correlation: float | None = Field(default=None, ge=-1, le=1, allow_inf_nan=False)
    # signal metrics are judged on tables with at least this many query rows (fewer: too noisy to judge)
    signal_min_rows: int = Field(default=8, ge=2)
    # regressor: its signal is judged where its outputs vary across the query rows by at least this (in
    # the model's normalized target units, where the support's targets span 0..1); below it the model
    # predicts nearly one value, int8's noise of a few 1e-3 is then most of the spread, and max_abs
    # bounds the error. Logits are judged whatever their spread.
    signal_min_spread: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # a query row predicted alone against the same row predicted in the cell's batch (max abs)
    max_batch_dependence: float | None = Field(default=None, gt=0, allow_inf_nan=False)


    def on_tables(self) -> Tolerance:
        """The bounds a task check (a real table) is judged by."""
        if self.max_task_err_over_spread is None:
            return self
        return self.model_copy(update={"max_err_over_spread": self.max_task_err_over_spread})


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


# The real tables of the task checks (tasks.py loads them from scikit-learn's bundled datasets).
TableName = Literal["iris", "wine", "breast_cancer", "digits", "diabetes"]
TABLE_TASKS: dict[str, TaskName] = {"iris": "classification", "wine": "classification",
                                    "breast_cancer": "classification", "digits": "classification",
                                    "diabetes": "regression"}


class TaskCell(_Strict):
    """A task check: one real table, split into support and query rows (tasks.load_table). A variant
    runs the task checks of its own task (a classifier the classification tables)."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")
    dataset: TableName
    support: int = Field(ge=2, le=LIMITS["n_support"])
    queries: int = Field(ge=2, le=LIMITS["n_query"])

    @property
    def task(self) -> TaskName:
        return TABLE_TASKS[self.dataset]


class VerificationConfig(_Strict):
    seed: int
    tolerances: dict[str, Tolerance]
    cells: tuple[Cell, ...] = Field(min_length=1)
    tasks: tuple[TaskCell, ...] = ()

    def tasks_for(self, task: TaskName) -> tuple[TaskCell, ...]:
        """The task checks a model of `task` runs (a classifier: the classification tables)."""
        return tuple(t for t in self.tasks if t.task == task)

    @model_validator(mode="after")
    def _unique_names(self) -> VerificationConfig:
        names = [cell.name for cell in self.cells] + [task.name for task in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"cell names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def tolerance(self, key: str) -> Tolerance:
        """The tolerance of a recipe's `tolerance` key (e.g. "fp32", "int8", "support-cache")."""
        if key not in self.tolerances:
            raise ConfigError(
                f"no verification tolerance {key!r}: add [verification.tolerances.{key}] "
                f"to the configuration (have: {', '.join(sorted(self.tolerances))})"
            )
        return self.tolerances[key]


class Variant(_Strict):
    """One model to build: a hub repo at a revision, or a local folder in upstream's save_pretrained
    layout (config.json + model.safetensors), e.g. your own fine-tuned checkpoint."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    repo_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    # relative paths are resolved against the configuration file's folder at load
    path: Path | None = None
    revision: str = Field(default="main", min_length=1)  # hub variants only
    task: TaskName

    @model_validator(mode="after")
    def _one_source(self) -> Variant:
        if (self.repo_id is None) == (self.path is None):
            raise ValueError(f"variant {self.name!r} needs exactly one of repo_id (a hub repo) or path (a local "
                             "snapshot folder)")
        return self


class ScheduleConfig(_Strict):
    cron: str
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid_cron(self) -> ScheduleConfig:
        try:
            CronSim(self.cron, datetime(2026, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"cron {self.cron!r} is not a valid 5-field cron expression: {exc}") from None
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not a known IANA time zone (e.g. \"UTC\", "
                             "\"Europe/Berlin\")") from None
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
    # A task still running after this is failed (a hung export or runtime must not hold a worker
    # forever); the full-size model's longest task, one matrix cell, takes ~30 s on 2 cores.
    task_timeout_s: int = Field(default=3600, ge=60, le=86_400)
    # How long a run waits for another run building the same variant to finish.
    variant_lock_timeout_s: int = Field(default=4 * 3600, ge=60, le=7 * 86_400)


class SigningConfig(_Strict):
    """Release signing and what consumers trust. The private key is never configured here (this file
    is shared): publishers set MITRA_SIGNING_KEY_FILE or MITRA_SIGNING_KEY."""

    # latest.json expires this long after it was signed; the scheduled run re-signs it well before
    pointer_ttl_days: int = Field(default=30, ge=1, le=366)
    # public keys `mitra-build pull` trusts (PEM files; relative to this file); also --trusted-key
    # and $MITRA_TRUSTED_KEYS. With any trusted key, unsigned releases are refused.
    trusted_keys: tuple[Path, ...] = ()
    # `mitra-build pull` and `check-release` refuse to run without a trusted key (also
    # --require-signature and $MITRA_REQUIRE_SIGNATURE=1)
    require_signature: bool = False


ConsumerRuntime = Literal["onnxruntime-node", "onnxruntime-web"]


class ConsumersConfig(_Strict):
    """Where each artifact is loaded after verification, and how close it must stay to Python ORT."""

    node: bool = True  # the flow's consumer-check stage (onnxruntime-node)
    browser: bool = False  # headless Chromium + onnxruntime-web (WASM); the tests always run it on tiny models
    tolerances: dict[str, dict[ConsumerRuntime, float]]

    def runtimes(self) -> tuple[str, ...]:
        """The runtimes the consumer check runs in, as configured."""
        return tuple(name for name, on in (("onnxruntime-node", self.node), ("onnxruntime-web", self.browser)) if on)

    def bounds(self, key: str) -> dict[str, float]:
        """runtime -> bound for a recipe's `tolerance` key, for each runtime the check runs in."""
        return {runtime: self.tolerance(key, runtime) for runtime in self.runtimes()}

    def tolerance(self, key: str, runtime: str) -> float:
        """The bound of a recipe's `tolerance` key in `runtime` (the same key as its verification tolerance)."""
        try:
            return self.tolerances[key][runtime]  # type: ignore[index]
        except KeyError:
            raise ConfigError(f"no consumer tolerance for {key} in {runtime}: add it under "
                              f"[consumers.tolerances.{key}]") from None


class BuildConfig(_Strict):
    export: ExportConfig
    consumers: ConsumersConfig
    execution: ExecutionConfig = ExecutionConfig()
    artifacts: ArtifactsConfig = ArtifactsConfig()
    schedule: ScheduleConfig
    store: StoreConfig | None = None  # where builds are published; None: local builds only
    signing: SigningConfig = SigningConfig()
    sizes: dict[SizeName, SizeConfig]
    verification: VerificationConfig
    variants: tuple[Variant, ...] = ()

    @model_validator(mode="after")
    def _result_storage_has_a_store(self) -> BuildConfig:
        if self.execution.result_storage == "store" and self.store is None:
            raise ValueError('execution.result_storage = "store" needs a [store] section (the bucket results go to)')
        return self

    @model_validator(mode="after")
    def _planned_artifacts_have_tolerances(self) -> BuildConfig:
        """Every planned artifact can be judged: its verification tolerance, and its consumer bound
        for each runtime the consumer check runs in. Nothing is demanded for unplanned artifacts."""
        runtimes = self.consumers.runtimes()
        missing = []
        for recipe in self.artifacts.planned():
            if recipe.tolerance not in self.verification.tolerances:
                missing.append(f"[verification.tolerances.{recipe.tolerance}] (for {recipe.name})")
            bounds = self.consumers.tolerances.get(recipe.tolerance, {})
            missing += [f"[consumers.tolerances.{recipe.tolerance}] {runtime} (for {recipe.name})"
                        for runtime in runtimes if runtime not in bounds]
        if missing:
            raise ValueError("planned artifacts need tolerances: add " + ", ".join(missing))
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
        raw = self.model_dump()
        raw["artifacts"] = {**raw["artifacts"], **chosen}
        try:
            return BuildConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"artifacts {chosen!r}: {exc.errors()[0]['msg']}") from None

    def select_variants(self, names: list[str] | None, *, snapshot: str | Path | None = None) -> list[Variant]:
        """The variants a run builds (all when `names` is empty), checked before anything starts:
        known names, one variant for `snapshot`, and every local `path` a readable snapshot folder.

        Raises:
            ConfigError: an unknown name, several variants with `snapshot`, or no variant at all.
            SnapshotError: a variant's `path` is not a valid snapshot folder.
        """
        # deferred: loading the configuration needs no torch; checking a variant's folder does
        from mitra_model.model.snapshot import read_model_config

        selected = [self.variant(name) for name in names] if names else list(self.variants)
        if not selected:
            raise ConfigError("no variant to build: add a [[variants]] table to the configuration")
        if snapshot and len(selected) != 1:
            raise ConfigError(f"--snapshot builds one variant but {len(selected)} are selected "
                              f"({', '.join(v.name for v in selected)}): name one with --variant NAME (variants=[NAME])")
        for variant in selected:
            if variant.path is not None and not snapshot:
                read_model_config(variant.path)  # a wrong folder fails here, not minutes into the run
        return selected

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        known = ", ".join(v.name for v in self.variants) or "none"
        raise ConfigError(f"no variant named {name!r} in the configuration (known: {known})")


def config_path() -> Path | Traversable:
    """The configuration file in use when none is passed.

    Returns:
        $MITRA_BUILD_CONFIG if set; else `config/mitra-build.toml` in the working directory if that
        name exists there (even broken: load_config then reports it rather than silently building
        with other settings); else the packaged default, DEFAULT_CONFIG_PATH.
    """
    if named := os.environ.get(CONFIG_ENV_VAR):
        return Path(named)
    local = Path.cwd() / WORKDIR_CONFIG_PATH
    if os.path.lexists(local):  # lexists: a dangling symlink is reported as missing, not skipped
        return local
    return DEFAULT_CONFIG_PATH


def artifacts_root(named: str | Path | None = None) -> Path:
    """The artifacts folder: `named`, else $MITRA_BUILD_ARTIFACTS, else ./artifacts (working directory)."""
    if named:
        return Path(named)
    if from_env := os.environ.get(ARTIFACTS_ENV_VAR):
        return Path(from_env)
    return Path.cwd() / "artifacts"


def load_config(path: Path | None = None) -> BuildConfig:
    """Read and validate the build configuration.

    Args:
        path: the file to read; default: `config_path()` ($MITRA_BUILD_CONFIG, ./config/, packaged).

    Raises:
        ConfigError: the file is missing, is not TOML, or a field is invalid (the message names the
            file and every bad field with its dotted path).
    """
    path = Path(path) if path is not None else config_path()
    # A variant's relative `path` is relative to its configuration file (the packaged default names
    # none; were it ever read from a zip, the working directory stands in for its folder).
    folder = path.parent if isinstance(path, Path) else Path.cwd()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist (set {CONFIG_ENV_VAR} or pass --config)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc.strerror or exc}") from None
    signing = raw.get("signing")
    if isinstance(signing, dict) and isinstance(signing.get("trusted_keys"), list):
        signing["trusted_keys"] = [str((folder / Path(k).expanduser()).resolve()) if isinstance(k, str) else k
                                   for k in signing["trusted_keys"]]
    for variant in raw.get("variants", []) if isinstance(raw.get("variants"), list) else []:
        if isinstance(variant, dict) and isinstance(variant.get("path"), str):
            variant["path"] = str((folder / Path(variant["path"]).expanduser()).resolve())
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
