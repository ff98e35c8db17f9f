"""The artifact registry: one declaration per published artifact, read by every stage.

In the spirit of Optimum's `TasksManager`, each `Recipe` says what the artifact is (its files and
their I/O contracts), where it comes from (the snapshot, or the files of another recipe), how it is
made (its maker) and with which typed options (`[artifacts.options.<name>]`), how it is judged (its
tolerance key, the same for `[verification.tolerances.<key>]` and `[consumers.tolerances.<key>]`;
one graph or an encode/predict pair), and what it is for (purpose and runtimes, copied into the
manifest). The flow is a loop over `planned(...)`; CLI choices, config validation and the manifest's
text come from the registry. A new artifact is one `register(Recipe(...))` plus its tolerances in
the configuration; a new reduced precision's maker is `Quantize(converter=...)`.

The registry is read by the slim install (the configuration checks `[artifacts]` against it), so
this module imports nothing heavy: each maker imports the exporter or the quantizer when it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mitra_model.build.options import Fp16Options, Int4Options, Int8Options, RecipeOptions, validate_options
from mitra_model.errors import ConfigError
from mitra_model.release.layout import FLAVOUR_FILES, SUPPORT_CACHE_FILES, precision_file

if TYPE_CHECKING:
    from mitra_model.build.export import TensorSpec
    from mitra_model.model.kinds import Shape
    from mitra_model.model.tab2d import MitraConfig

    Contract = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]

VerifyAs = Literal["graph", "pair"]


class Selection(Protocol):
    """What plans recipes: [artifacts] of the configuration (`config.ArtifactsConfig`)."""

    flavours: tuple[str, ...]
    precisions: tuple[str, ...]
    support_cache: bool

# The [artifacts] option that plans a recipe: a value in `flavours` or `precisions`, or `support_cache = true`.
SelectField = Literal["flavours", "precisions", "support_cache"]

# Where each kind of graph runs (the manifest's `runtimes`).
PORTABLE_RUNTIMES = ("any ONNX runtime with opset 17 (standard ops only)", "onnxruntime", "onnxruntime-node",
                     "onnxruntime-web")
CONTRIB_RUNTIMES = ("onnxruntime>=1.17 with com.microsoft contrib ops (Python, C++, onnxruntime-node, "
                    "onnxruntime-web WASM)",)


@dataclass(frozen=True)
class BuildContext:
    """What a recipe's `make` gets: the snapshot, the export settings, a scratch folder, and the
    files of the recipe it derives from (empty when it derives from the snapshot)."""

    snapshot_dir: Path
    work: Path
    opset: int
    trace_shape: Shape
    parent_files: tuple[Path, ...] = ()
    options: RecipeOptions = field(default_factory=RecipeOptions)  # [artifacts.options.<recipe>], checked at load


@dataclass(frozen=True)
class Made:
    """The files a recipe wrote (in `Recipe.files` order) and how they were made."""

    files: tuple[Path, ...]
    details: dict[str, Any]


@dataclass(frozen=True)
class ArtifactFile:
    """One published file of a recipe: its manifest entry name, file name and I/O contract."""

    name: str
    file: str
    contract: Callable[[MitraConfig], Contract]


@dataclass(frozen=True)
class Recipe:
    name: str
    files: tuple[ArtifactFile, ...]
    derives_from: str | None  # None: exported from the snapshot; else the recipe whose files it transforms
    make: Callable[[BuildContext], Made]
    precision: str  # what the weights are stored as: fp32 | int8 | fp16 | int4
    flavour: Literal["portable", "optimized"]  # optimized: ONNX Runtime contrib ops inside
    tolerance: str  # [verification.tolerances.<key>] (consumer checks use [consumers.tolerances.<precision>])
    purpose: str
    runtimes: tuple[str, ...]
    verify_as: VerifyAs
    select: tuple[SelectField, str | bool]  # how [artifacts] plans it
    options: type[RecipeOptions] = RecipeOptions  # what [artifacts.options.<name>] may set; RecipeOptions: none

    def checked_options(self, raw: Mapping[str, Any] | None = None) -> RecipeOptions:
        """[artifacts.options.<name>] as this recipe's typed options (ConfigError names a bad key)."""
        return validate_options(self.name, self.options, raw)

    def selected(self, artifacts: Selection) -> bool:
        key, value = self.select
        chosen = getattr(artifacts, key)
        return chosen is value if isinstance(value, bool) else value in chosen

    @property
    def verb(self) -> str:
        """What making it is called in task names: "export-fp32-ort", "quantize-int8"."""
        return "export" if self.derives_from is None else "quantize"

    @property
    def how_to_plan(self) -> str:
        key, value = self.select
        return f"set support_cache = true" if key == "support_cache" else f"add {value!r} to [artifacts] {key}"


# ---------------------------------------------------------------------------------------------
# How each kind is made. The exporter and the quantizer are imported inside the makers, when an
# artifact is made: the registry itself must load in the slim install (see the module docstring).


def _full_contract(config: MitraConfig) -> Contract:
    from mitra_model.build.export import io_contract  # deferred: the slim install reads the registry

    return io_contract(config)


def _pair_contract(role: str) -> Callable[[MitraConfig], Contract]:
    def contract(config: MitraConfig) -> Contract:
        from mitra_model.build.support_cache import support_cache_contract  # deferred: as above

        return support_cache_contract(config)[role]

    return contract


def _export(flavour: Literal["portable", "optimized"], file: str) -> Callable[[BuildContext], Made]:
    def make(ctx: BuildContext) -> Made:
        from mitra_model.build.export import export_onnx  # deferred: as above
        from mitra_model.model.snapshot import load_model  # deferred: as above

        model, snapshot = load_model(ctx.snapshot_dir)
        result = export_onnx(model, ctx.work / file, opset=ctx.opset, trace_shape=ctx.trace_shape,
                             metadata=snapshot.onnx_metadata(), flavour=flavour)
        return Made(files=(result.path,), details={})

    return make


@dataclass(frozen=True)
class Quantize:
    """The maker of a reduced precision: `quantize.quantize_onnx` with one converter, on the file of
    the recipe it derives from.

    Attributes:
        precision: what the weights become (the file's metadata and the manifest say it).
        file: the file it writes.
        converter: the name of a converter in `mitra_model.build.quantize` (looked up when it runs),
            or a converter function itself: (model, tmp path, source path, options) -> (model, details).
    """

    precision: str
    file: str
    converter: str | Callable[..., Any]

    def __call__(self, ctx: BuildContext) -> Made:
        from mitra_model.build.quantize import convert_onnx  # deferred: as above

        result = convert_onnx(ctx.parent_files[0], ctx.work / self.file, precision=self.precision,
                              converter=self.converter, options=ctx.options)
        return Made(files=(result.path,), details=result.details)


def quantize_onnx(source: Path, output: Path, *, precision: str,
                  options: Mapping[str, Any] | RecipeOptions | None = None) -> Any:
    """Write the reduced-precision recipe `precision` of the fp32 Mitra ONNX `source` to `output`,
    as a build makes it (`mitra-build quantize` does this).

    Args:
        source: an fp32 Mitra ONNX (the portable export or the optimized flavour).
        output: the .onnx file to write (atomically; byte-identical for the same inputs).
        precision: a reduced-precision recipe: one of `choices("precisions")` (int8, fp16, int4, or
            one registered since).
        options: its settings ([artifacts.options.<precision>], as a table or already typed); None
            for the defaults.

    Returns:
        The `quantize.QuantizeResult`: the written file's digest, size and `details`.

    Raises:
        ConfigError: `precision` is not a reduced precision of the registry, or `options` are not
            valid for it (before the source is read).
        ExportError / OnnxCheckError: as `quantize.convert_onnx`.
    """
    recipe = _REGISTRY.get(precision)
    if recipe is None or not isinstance(recipe.make, Quantize):
        raise ConfigError(f"unknown precision {precision!r}: expected one of {', '.join(choices('precisions'))}")
    settings = options if isinstance(options, RecipeOptions) else recipe.checked_options(options)
    from mitra_model.build.quantize import convert_onnx  # deferred: the slim install reads the registry

    return convert_onnx(source, output, precision=recipe.make.precision, converter=recipe.make.converter,
                        options=settings)


def _export_pair(ctx: BuildContext) -> Made:
    from mitra_model.build.support_cache import export_support_cache  # deferred: as above
    from mitra_model.model.snapshot import load_model  # deferred: as above

    model, snapshot = load_model(ctx.snapshot_dir)
    pair = export_support_cache(model, ctx.work, opset=ctx.opset, trace_shape=ctx.trace_shape,
                                metadata=snapshot.onnx_metadata(), flavour="portable")
    return Made(files=(pair.encode.path, pair.predict.path), details={"pair": "support-cache"})


def _graph(name: str, file: str) -> tuple[ArtifactFile, ...]:
    return (ArtifactFile(name, file, _full_contract),)


def reduced_precision(name: str, *, converter: str | Callable[..., Any], options: type[RecipeOptions],
                      purpose: str, precision: str | None = None, file: str | None = None) -> Recipe:
    """A reduced-precision copy of the optimized fp32 file, planned by `precisions = ["<name>"]` and
    judged by its own tolerances ([verification.tolerances.<name>], [consumers.tolerances.<name>]).

    Args:
        name: the recipe, the manifest's artifact name and the tolerance key.
        converter: see `Quantize.converter`.
        options: its typed options ([artifacts.options.<name>]).
        purpose: one line for the manifest and the model card.
        precision: what the weights are stored as (default: `name`).
        file: the published file (default model-<name>.onnx).
    """
    file = file or precision_file(name)
    return Recipe(
        name=name, files=_graph(name, file), derives_from="fp32-ort",
        make=Quantize(precision=precision or name, file=file, converter=converter), precision=precision or name,
        flavour="optimized", tolerance=name, verify_as="graph", select=("precisions", name),
        runtimes=CONTRIB_RUNTIMES, purpose=purpose, options=options,
    )


_BUILT_IN: tuple[Recipe, ...] = (
    Recipe(
        name="fp32", files=_graph("fp32", FLAVOUR_FILES["portable"]), derives_from=None,
        make=_export("portable", FLAVOUR_FILES["portable"]), precision="fp32", flavour="portable", tolerance="fp32",
        verify_as="graph", select=("flavours", "portable"), runtimes=PORTABLE_RUNTIMES,
        purpose="reference precision; what upstream computes",
    ),
    Recipe(
        name="fp32-ort", files=_graph("fp32-ort", FLAVOUR_FILES["optimized"]), derives_from=None,
        make=_export("optimized", FLAVOUR_FILES["optimized"]), precision="fp32", flavour="optimized", tolerance="fp32",
        verify_as="graph", select=("flavours", "optimized"), runtimes=CONTRIB_RUNTIMES,
        purpose="reference precision with attention as ONNX Runtime's memory-efficient contrib MultiHeadAttention "
                "(never materializes the attention scores)",
    ),
    reduced_precision("int8", converter="to_int8", options=Int8Options,
                      purpose="CPU inference: dynamic int8 MatMul weights, about 4x smaller than fp32 and faster on CPU"),
    reduced_precision("fp16", converter="to_fp16", options=Fp16Options,
                      purpose="GPU / WebGPU execution providers (fp16 weights and transformer compute); runs on CPU "
                              "but is no faster there than fp32 (see `cpu`)"),
    reduced_precision("int4", converter="to_int4", options=Int4Options,
                      purpose="smallest download: 4-bit block-quantized MatMul weights (ONNX Runtime MatMulNBits), "
                              "about 6x smaller than fp32; a little faster than fp32 on CPU (see `cpu`)"),
    Recipe(
        name="support-cache",
        files=(ArtifactFile("encode-support", SUPPORT_CACHE_FILES["portable"][0], _pair_contract("encode_support")),
               ArtifactFile("predict-query", SUPPORT_CACHE_FILES["portable"][1], _pair_contract("predict_query"))),
        derives_from=None, make=_export_pair, precision="fp32", flavour="portable", tolerance="support-cache",
        verify_as="pair", select=("support_cache", True), runtimes=PORTABLE_RUNTIMES,
        purpose="fit once, predict many: encode_support runs once per support set, predict_query per call",
    ),
)

_REGISTRY: dict[str, Recipe] = {recipe.name: recipe for recipe in _BUILT_IN}


def register(new: Recipe) -> Recipe:
    """Add an artifact to the registry (a plugin's, or a test's toy); from then on the configuration
    plans it, the flow builds, verifies and publishes it like the built-in ones.

    Raises:
        ValueError: its name or one of its files is already registered, or it derives from an unknown recipe.
    """
    files = {f.name for r in _REGISTRY.values() for f in r.files} | {f.file for r in _REGISTRY.values() for f in r.files}
    if new.name in _REGISTRY or any(f.name in files or f.file in files for f in new.files):
        raise ValueError(f"recipe {new.name!r}: its name or a file is already registered")
    if new.derives_from is not None and new.derives_from not in _REGISTRY:
        raise ValueError(f"recipe {new.name!r} derives from {new.derives_from!r}, which is not registered")
    _REGISTRY[new.name] = new
    return new


def unregister(name: str) -> None:
    """Remove a recipe added with `register` (the built-in ones stay)."""
    if any(r.name == name for r in _BUILT_IN):
        raise ValueError(f"{name!r} is a built-in recipe")
    _REGISTRY.pop(name, None)


def all_recipes() -> tuple[Recipe, ...]:
    """Every registered recipe, in declaration order."""
    return tuple(_REGISTRY.values())


def choices(key: SelectField) -> tuple[str, ...]:
    """The values [artifacts] `flavours` or `precisions` accept (CLI choices too)."""
    return tuple(str(r.select[1]) for r in _REGISTRY.values() if r.select[0] == key)


def recipe(name: str) -> Recipe:
    """The recipe called `name`; KeyError names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no artifact recipe {name!r} (known: {', '.join(_REGISTRY)})") from None


def planned(artifacts: Selection) -> list[Recipe]:
    """The recipes [artifacts] selects, each after the recipe it derives from (declaration order
    otherwise). Raises ValueError when a selected recipe derives from one that is not selected."""
    chosen = {r.name: r for r in _REGISTRY.values() if r.selected(artifacts)}
    for r in chosen.values():
        if r.derives_from is not None and r.derives_from not in chosen:
            parent = _REGISTRY[r.derives_from]
            raise ValueError(f"{r.name} is built from {parent.name} ({parent.flavour} {parent.precision}), which is "
                             f"not planned: {parent.how_to_plan}")
    ordered: list[Recipe] = []
    while len(ordered) < len(chosen):
        for r in chosen.values():
            if r not in ordered and (r.derives_from is None or _REGISTRY[r.derives_from] in ordered):
                ordered.append(r)
    return ordered


def artifact_file(name: str) -> tuple[Recipe, ArtifactFile]:
    """The recipe and file of a manifest artifact entry name (e.g. "int8", "predict-query")."""
    for r in _REGISTRY.values():
        for f in r.files:
            if f.name == name:
                return r, f
    raise KeyError(f"no artifact named {name!r} (known: {', '.join(f.name for r in _REGISTRY.values() for f in r.files)})")
