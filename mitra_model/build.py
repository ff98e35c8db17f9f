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
import platform
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .config import REPO_ROOT, ArtifactsConfig
from .errors import VerificationError
from .export import EXPORTER_SETTINGS, FLAVOUR_FILES, FLAVOUR_RUNTIMES, TensorSpec, io_contract
from .fileutil import atomic_directory, sha256_file
from .model import MitraConfig
from .publish import MANIFEST_NAME as MANIFEST_FILE
from .publish import MANIFEST_SCHEMA_ID
from .snapshot import Snapshot
from .support_cache import SupportCacheExport, support_cache_contract
from .verify import VerificationReport

# Why each artifact exists, for consumers choosing a file. Each artifact's `cpu` entry in the manifest
# has its measured CPU time over the matrix (benchmarks: bench/results-precision.md).
PRECISION_PURPOSE = {
    "fp32": "reference precision; what upstream computes",
    "int8": "CPU inference: dynamic int8 MatMul weights, about 4x smaller than fp32 and faster on CPU",
    "support-cache": "fit once, predict many: encode_support runs once per support set, predict_query per call",
    "fp16": "GPU / WebGPU execution providers (fp16 weights and transformer compute); runs on CPU but is no "
            "faster there than fp32 (see `cpu`)",
}


@dataclass(frozen=True)
class ArtifactSpec:
    """One file a build produces."""

    name: str  # manifest key: fp32 | fp32-ort | int8 | fp16
    file: str
    precision: str  # fp32 | int8 | fp16 (selects the verification tolerance)
    flavour: str  # portable | optimized


def planned_artifacts(artifacts: ArtifactsConfig) -> list[ArtifactSpec]:
    """The artifacts a build produces, in build order (fp32 exports first, then what derives from them)."""
    specs = [ArtifactSpec("fp32", FLAVOUR_FILES["portable"], "fp32", "portable")]
    if "optimized" in artifacts.flavours:
        specs.append(ArtifactSpec("fp32-ort", FLAVOUR_FILES["optimized"], "fp32", "optimized"))
    specs += [ArtifactSpec(p, f"model-{p}.onnx", p, "optimized") for p in artifacts.precisions]
    return specs


@dataclass(frozen=True)
class BuiltArtifact:
    spec: ArtifactSpec
    path: Path
    size: int
    sha256: str
    report: VerificationReport
    details: dict[str, Any]  # how it was made (e.g. quantized MatMul count)
    checked_in: tuple[dict[str, Any], ...] = ()  # consumer runtimes it ran in (consumers.ConsumerResult.to_record)
    contract: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None = None  # None: the model's io_contract


def support_cache_artifacts(pair: SupportCacheExport, report: VerificationReport,
                            model_config: MitraConfig) -> list[BuiltArtifact]:
    """The verified encode-support / predict-query pair as two artifacts with their own I/O contracts
    (published only together: both carry the one report)."""
    contract = support_cache_contract(model_config)
    return [
        BuiltArtifact(spec=ArtifactSpec(name, result.path.name, "fp32", pair.flavour), path=result.path,
                      size=result.size, sha256=result.sha256, report=report, details={"pair": "support-cache"},
                      contract=contract[name.replace("-", "_")])
        for name, result in (("encode-support", pair.encode), ("predict-query", pair.predict))
    ]


_TOOLCHAIN_PACKAGES = ("torch", "onnx", "onnxruntime", "numpy", "safetensors")


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from, as recorded in the manifest."""

    repo_id: str
    requested_revision: str
    resolved_commit: str | None  # None for a local or synthetic snapshot
    synthetic: bool
    digests: dict[str, str]  # path -> "sha256:<hex>" | "gitsha1:<hex>", as known before download


def toolchain_versions() -> dict[str, str]:
    versions = {name: metadata.version(name).split("+")[0] for name in _TOOLCHAIN_PACKAGES}
    versions["python"] = platform.python_version()
    versions["mitra_build"] = __version__
    return versions


def code_digest() -> str:
    """SHA-256 over this package's source: a code change is a new version."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "mitra_model").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
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


def _tensor_specs(specs) -> list[dict[str, Any]]:  # noqa: ANN001 - tuple[TensorSpec, ...]
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
    inputs, outputs = io_contract(model_config)
    fp32_seconds = next(a.report.summary["onnx_seconds"] for a in artifacts if a.spec.name == "fp32")
    return {
        "schema": MANIFEST_SCHEMA_ID,
        "variant": variant,
        "version": version,
        "source": {
            "repo_id": source.repo_id,
            "requested_revision": source.requested_revision,
            "resolved_commit": source.resolved_commit,
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
        },
        "artifacts": [
            {
                "name": a.spec.name,
                "file": a.spec.file,
                "size": a.size,
                "sha256": a.sha256,
                "precision": a.spec.precision,
                "flavour": a.spec.flavour,
                "purpose": PRECISION_PURPOSE["support-cache" if a.contract else a.spec.precision],
                "runtimes": list(FLAVOUR_RUNTIMES[a.spec.flavour]),
                "inputs": _tensor_specs(a.contract[0] if a.contract else inputs),
                "outputs": _tensor_specs(a.contract[1] if a.contract else outputs),
                "details": a.details,
                "checked_in": list(a.checked_in),
                # ONNX Runtime CPU time of the whole matrix on the build machine, and relative to the
                # portable fp32 file on the same cells (the support-cache pair is timed differently)
                **({} if a.contract else {"cpu": {
                    "matrix_seconds": round(a.report.summary["onnx_seconds"], 3),
                    "relative_to_fp32": round(a.report.summary["onnx_seconds"] / fp32_seconds, 3),
                }}),
            }
            for a in artifacts
        ],
        "verification": {
            a.spec.name: {
                "passed": a.report.passed,
                "precision": a.spec.precision,
                "cells": len(a.report.cells),
                "failed_cells": sum(not c.passed for c in a.report.cells),
                "max_abs_err": a.report.summary["max_abs_err"],
                "onnx_seconds": a.report.summary["onnx_seconds"],
                "tolerance": a.report.tolerance,
                "report": f"verification-{a.spec.name}.json",
            }
            for a in artifacts
        },
    }


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
            shutil.move(artifact.path, tmp / artifact.spec.file)  # a rename: work and build share a filesystem
            (tmp / f"verification-{artifact.spec.name}.json").write_text(artifact.report.to_json(), encoding="utf-8")
            (tmp / f"verification-{artifact.spec.name}.md").write_text(artifact.report.to_markdown(), encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return final


def manifest_markdown(manifest: dict[str, Any]) -> str:
    """A human summary of a manifest (shown as a Prefect artifact and printed by the CLI)."""
    source = manifest["source"]
    origin = "**SYNTHETIC snapshot (random weights)**" if source["synthetic"] else (
        f"`{source['repo_id']}` @ `{source['requested_revision']}` = commit `{source['resolved_commit']}`")
    lines = [f"# {manifest['variant']} {manifest['version']}", "", f"Source: {origin}", "",
             "| artifact | precision | size | sha256 |", "|---|---|---|---|"]
    for a in manifest["artifacts"]:
        lines.append(f"| {a['file']} | {a['precision']} ({a['flavour']}) | {a['size']:,} | `{a['sha256']}` |")
    lines += ["", "| artifact | verification | cells | max abs err |", "|---|---|---|---|"]
    for name, v in manifest["verification"].items():
        lines.append(f"| {name} | {'passed' if v['passed'] else 'FAILED'} | {v['cells']} | {v['max_abs_err']:.2e} |")
    return "\n".join(lines) + "\n"
