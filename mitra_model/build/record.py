"""Build bookkeeping: content-derived versions, the local build record, and the manifest draft.

A build's version is a digest of everything that decides its bytes: the source files' digests (as the
hub reports them, so deciding "up to date" needs one API call and no download), the validated build
configuration, the toolchain and the code of this package. The same inputs always map to the same
version; a commit that only edits README.md maps to the version already built.

Completed builds live in `<artifacts>/builds/<variant>/<version>/` and only appear there whole
(assembled in a temp folder, renamed into place), after verification passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from mitra_model import __version__
from mitra_model.build.export import EXPORTER_SETTINGS, TensorSpec
from mitra_model.build.recipes import ArtifactFile, Recipe
from mitra_model.build.source import SourceInfo
from mitra_model.build.verify import CellResult, TaskResult, VerificationReport
from mitra_model.errors import VerificationError
from mitra_model.fileutil import PACKAGE_DIR, atomic_directory, sha256_file
from mitra_model.model.snapshot import Snapshot
from mitra_model.model.tab2d import MitraConfig
from mitra_model.release.layout import MANIFEST_NAME as MANIFEST_FILE
from mitra_model.release.layout import MANIFEST_SCHEMA_ID, verification_report_name


@dataclass(frozen=True)
class BuiltArtifact:
    """One verified file of a recipe (a pair's two files share the pair's report)."""

    recipe: Recipe
    file: ArtifactFile
    path: Path
    size: int
    sha256: str
    report: VerificationReport
    details: dict[str, Any]  # how it was made (e.g. quantized MatMul count)
    checked_in: tuple[dict[str, Any], ...] = ()  # consumer runtimes it ran in (ConsumerResult.to_record)

    @property
    def name(self) -> str:
        return self.file.name


def built_artifacts(recipe: Recipe, paths: tuple[Path, ...], report: VerificationReport,
                    details: dict[str, Any]) -> list[BuiltArtifact]:
    """The recipe's verified files (in `recipe.files` order) as manifest entries."""
    if len(paths) != len(recipe.files):
        raise VerificationError(f"{recipe.name} made {len(paths)} file(s), its recipe declares {len(recipe.files)}",
                                [recipe.name])
    return [BuiltArtifact(recipe=recipe, file=file, path=path, size=path.stat().st_size, sha256=sha256_file(path),
                          report=report, details=details)
            for file, path in zip(recipe.files, paths)]


_TOOLCHAIN_PACKAGES = ("torch", "onnx", "onnxruntime", "numpy", "safetensors")


def toolchain_versions() -> dict[str, str]:
    versions = {name: metadata.version(name).split("+")[0] for name in _TOOLCHAIN_PACKAGES}
    versions["python"] = platform.python_version()
    versions["mitra_build"] = __version__
    return versions


def code_digest() -> str:
    """SHA-256 over this package's source: a code change is a new version."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_version(*, source_digests: dict[str, str], config_digest: str, toolchain: dict[str, str], code: str) -> str:
    """The content-derived version id: `v-` + 16 hex digits."""
    payload = json.dumps(
        {"source": source_digests, "config": config_digest, "toolchain": toolchain, "code": code}, sort_keys=True
    )
    return "v-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_dir(artifacts_root: Path, variant: str, version: str) -> Path:
    return Path(artifacts_root) / "builds" / variant / version


def fresh_work_dir(artifacts_root: Path, variant: str, version: str) -> Path:
    """An empty scratch folder for one build: what an earlier, failed attempt left there (exports of
    ~300 MB each) is removed first. Finished files leave it by rename (`assemble_build`)."""
    work = Path(artifacts_root) / "work" / variant / version
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def discard_work_dir(work: Path) -> None:
    """Remove a build's scratch folder once its build folder is assembled."""
    shutil.rmtree(work, ignore_errors=True)


def completed_build(artifacts_root: Path, variant: str, version: str) -> dict[str, Any] | None:
    """The manifest of a complete, intact local build of this version, or None.

    Intact means every artifact the manifest lists is there with its recorded size and sha256, so a
    deleted or damaged build is rebuilt instead of being trusted.
    """
    folder = build_dir(artifacts_root, variant, version)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for artifact in manifest.get("artifacts", []):
        path = folder / artifact["file"]
        if not path.is_file() or path.stat().st_size != artifact["size"] or sha256_file(path) != artifact["sha256"]:
            return None
    return manifest


@dataclass(frozen=True)
class BuildDecision:
    """Whether a variant's version needs building, and why (what the flow logs)."""

    action: Literal["build", "published", "built-locally"]
    version: str
    reason: str
    manifest: dict[str, Any] | None = None  # built-locally: the intact build's manifest
    latest: dict[str, Any] | None = None  # published: the store's latest release record


def decide_build(*, variant: str, version: str, artifacts_root: Path, latest: dict[str, Any] | None,
                 force: bool) -> BuildDecision:
    """Decide from content whether to build `version` of `variant`.

    Up to date means the store's latest release already is this version ("published"), or, with no
    such release, an intact local build folder of it exists ("built-locally": publish it, build
    nothing). `force` always builds.

    Args:
        variant: the variant name.
        version: the content-derived version (`build_version`).
        artifacts_root: the artifacts folder holding `builds/`.
        latest: the store's latest release record (`publish.latest_release`), or None (no store, or
            nothing published yet).
        force: build even when up to date.
    """
    if force:
        return BuildDecision("build", version, f"{variant} {version}: rebuilding because force=true")
    if latest is not None and latest["version"] == version:
        return BuildDecision("published", version, f"{variant} is up to date: {version} is already the published "
                             f"latest (manifest_version {latest['manifest_version']})", latest=latest)
    manifest = completed_build(artifacts_root, variant, version)
    if manifest is not None:
        return BuildDecision("built-locally", version, f"{variant} {version} is already built locally; no export "
                             "or verification needed", manifest=manifest)
    was = f"the published latest is {latest['version']}" if latest else "nothing is published or built"
    return BuildDecision("build", version, f"{variant} {version} needs building ({was})")


def _tensor_specs(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]


def draft_manifest(
    *,
    variant: str,
    version: str,
    source: SourceInfo,
    snapshot: Snapshot,
    model_config: MitraConfig,
    config_digest: str,
    opset: int,
    artifacts: list[BuiltArtifact],
    toolchain: dict[str, str],
) -> dict[str, Any]:
    """The manifest as the build writes it; publishing adds manifest_version, previous digest, S3 keys."""
    fp32_seconds = next(a.report.summary["onnx_seconds"] for a in artifacts if a.name == "fp32")
    reference = next(iter(artifacts)).report.summary if artifacts else {}
    return {
        "schema": MANIFEST_SCHEMA_ID,
        "variant": variant,
        "version": version,
        "source": {
            "repo_id": source.repo_id,
            "requested_revision": source.requested_revision,
            "resolved_commit": source.resolved_commit,
            "path": source.path,  # the local folder built (a variant's `path`, or --snapshot)
            # a synthetic snapshot stays synthetic wherever it was fetched from (e.g. a mirror)
            "synthetic": source.synthetic or snapshot.synthetic,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in snapshot.files],
        },
        "model": {
            "task": model_config.task.value, "dim": model_config.dim, "dim_output": model_config.dim_output,
            "n_layers": model_config.n_layers, "n_heads": model_config.n_heads,
        },
        "build": {
            "toolchain": toolchain,
            "opset": opset,
            "config_sha256": config_digest,
            "code_sha256": code_digest(),
            "exporter": {"name": "torch.onnx.export", **EXPORTER_SETTINGS},
            # every artifact is compared with upstream's own Tab2D on these weights, and so is our
            # PyTorch rewrite (the exporter's input): ONNX ≈ rewrite ≈ upstream, measured in this build
            "reference": {key: reference[key] for key in REFERENCE_KEYS if key in reference},
        },
        "artifacts": [_manifest_entry(a, model_config, fp32_seconds) for a in artifacts],
        "verification": {
            a.name: _verification_entry(a, synthetic=source.synthetic or snapshot.synthetic) for a in artifacts
        },
    }


# Beside the task scores of a random-weight build: what they can and cannot tell.
SYNTHETIC_TASKS_NOTE = ("SYNTHETIC weights (random): the task scores of the artifact and of upstream sit near chance "
                        "by construction; judge the artifact by err_over_spread and batch_dependence, its distance "
                        "from upstream, not by its accuracy")


def _verification_entry(a: BuiltArtifact, *, synthetic: bool) -> dict[str, Any]:
    summary = a.report.summary
    entry: dict[str, Any] = {
        "passed": a.report.passed,
        "precision": a.recipe.precision,
        "cells": len(a.report.cells),
        "failed_cells": sum(not c.passed for c in a.report.cells),
        "max_abs_err": summary["max_abs_err"],
        "onnx_seconds": summary["onnx_seconds"],
        "tolerance": a.report.tolerance,
        "report": verification_report_name(a.name),
    }
    for key in ("max_err_over_spread", "max_batch_dependence"):
        if key in summary:
            entry[key] = summary[key]
    # per cell, so a report can show where in the matrix an artifact comes close to its bounds
    entry["matrix"] = [_cell_record(c, a.report.tolerance) for c in a.report.cells]
    if a.report.tasks:
        entry["tasks"] = [_task_record(t) for t in a.report.tasks]
        if synthetic:
            entry["tasks_note"] = SYNTHETIC_TASKS_NOTE
    return entry


def _cell_record(cell: CellResult, tolerance: Mapping[str, Any]) -> dict[str, Any]:
    metrics = cell.metrics
    used = metrics.tolerance_used(tolerance)
    return {
        "cell": cell.name, "shape": list(cell.shape), "passed": cell.passed, "max_abs_err": _finite(metrics.max_abs_err),
        "err_over_spread": metrics.err_over_spread, "batch_dependence": metrics.batch_dependence,
        "tolerance_used": _finite(used),
    }


def _finite(value: float) -> float | None:
    """JSON has no infinity: an infinite error (the candidate raised) is recorded as null."""
    return value if math.isfinite(value) else None


def _task_record(task: TaskResult) -> dict[str, Any]:
    metrics = task.metrics
    record: dict[str, Any] = {
        "name": task.name, "dataset": task.dataset, "passed": task.passed,
        "rows": {"support": task.support_rows, "queries": task.query_rows, "features": task.features},
        "classes": task.classes, "err_over_spread": metrics.err_over_spread, "batch_dependence": metrics.batch_dependence,
        "scores": task.scores, "upstream_scores": task.upstream_scores, "chance_scores": task.chance_scores,
    }
    if metrics.centered_argmax_agreement is not None:
        record["centered_argmax_agreement"] = metrics.centered_argmax_agreement
    if metrics.centered_correlation is not None:
        record["centered_correlation"] = metrics.centered_correlation
    return record


# What a report's summary says about the reference (upstream's version, rewrite vs upstream).
REFERENCE_KEYS = ("upstream", "rewrite_vs_upstream_max_abs", "reference_seconds")


def _manifest_entry(a: BuiltArtifact, model_config: MitraConfig, fp32_seconds: float) -> dict[str, Any]:
    inputs, outputs = a.file.contract(model_config)
    entry: dict[str, Any] = {
        "name": a.name,
        "recipe": a.recipe.name,
        "file": a.file.file,
        "size": a.size,
        "sha256": a.sha256,
        "precision": a.recipe.precision,
        "flavour": a.recipe.flavour,
        "purpose": a.recipe.purpose,
        "runtimes": list(a.recipe.runtimes),
        "inputs": _tensor_specs(inputs),
        "outputs": _tensor_specs(outputs),
        "details": a.details,
        "checked_in": list(a.checked_in),
    }
    if a.recipe.verify_as == "graph":  # a pair's matrix time is encode + several predicts: not comparable
        # ONNX Runtime CPU time of the whole matrix on the build machine, and relative to the portable
        # fp32 file on the same cells
        seconds = a.report.summary["onnx_seconds"]
        entry["cpu"] = {"matrix_seconds": round(seconds, 3), "relative_to_fp32": round(seconds / fp32_seconds, 3)}
    return entry


def assemble_build(artifacts_root: Path, manifest: dict[str, Any], artifacts: list[BuiltArtifact]) -> Path:
    """Write the build folder whole: artifact files (moved in), verification reports, manifest.json.

    Refuses (VerificationError) a manifest whose verification did not pass: a failed build never lands.
    """
    failed = [p for p, entry in manifest["verification"].items() if not entry["passed"]]
    if failed:
        raise VerificationError(f"refusing to assemble build {manifest['version']}: verification failed for "
                                f"{', '.join(failed)}", failed)
    final = build_dir(artifacts_root, manifest["variant"], manifest["version"])
    with atomic_directory(final) as tmp:
        for artifact in artifacts:
            shutil.move(artifact.path, tmp / artifact.file.file)  # a rename: work and build share a filesystem
            (tmp / verification_report_name(artifact.name)).write_text(artifact.report.to_json(), encoding="utf-8")
            (tmp / verification_report_name(artifact.name, "md")).write_text(artifact.report.to_markdown(), encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return final


def manifest_markdown(manifest: dict[str, Any], published: dict[str, Any] | None = None) -> str:
    """A human summary of a manifest (shown as a Prefect artifact), with where it was published
    (`{"url": ..., "manifest_version": N}`) when it was."""
    source = manifest["source"]
    origin = "**SYNTHETIC snapshot (random weights)**" if source["synthetic"] else (
        f"`{source['repo_id']}` @ `{source['requested_revision']}` = commit `{source['resolved_commit']}`"
        if source.get("repo_id") else f"local folder `{source.get('path')}`")
    where = (f"Published: {published['url']} as manifest_version {published['manifest_version']}"
             if published else "Not published (local build)")
    if published and published.get("report"):
        where += f"\n\nReport: [{published['report']}]({published['report']}) (plots of this release's verification)"
    lines = [f"# {manifest['variant']} {manifest['version']}", "", f"Source: {origin}", "", where, "",
             "| artifact | precision | size | sha256 |", "|---|---|---|---|"]
    for a in manifest["artifacts"]:
        lines.append(f"| {a['file']} | {a['precision']} ({a['flavour']}) | {a['size']:,} | `{a['sha256']}` |")
    lines += ["", "| artifact | verification | cells | max abs err |", "|---|---|---|---|"]
    for name, v in manifest["verification"].items():
        lines.append(f"| {name} | {'passed' if v['passed'] else 'FAILED'} | {v['cells']} | {v['max_abs_err']:.2e} |")
    return "\n".join(lines) + "\n"
