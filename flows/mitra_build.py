"""The `mitra-build` Prefect flow: thin orchestration over `mitra_model`, readable as the pipeline.

    resolve revision -> (up to date? stop) -> download -> checksum -> export -> check
    -> verification matrix -> assemble the build folder (manifest.json)

Every task wraps one library function. Tasks keep no Prefect cache: whether to rebuild is decided
from content (the version is a digest of source digests, config, toolchain and code), and a build
only counts as done while its folder holds every file with its recorded sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from mitra_model import build as builds
from mitra_model import source as sources
from mitra_model.check import check_onnx
from mitra_model.config import REPO_ROOT, BuildConfig, Variant, config_digest, load_config
from mitra_model.export import ExportResult, export_onnx
from mitra_model.snapshot import Snapshot, load_model
from mitra_model.verify import VerificationReport, require_passed, verify_onnx

DEFAULT_ARTIFACTS = REPO_ROOT / "artifacts"


@task(name="resolve-revision", cache_policy=NO_CACHE)
def resolve_revision(variant: Variant, config: BuildConfig, artifacts: Path, snapshot: str | None,
                     hub_endpoint: str | None, synthetic_fallback: bool):
    return sources.resolve_source(
        variant, config, cache_root=artifacts / "cache", snapshot_dir=Path(snapshot) if snapshot else None,
        endpoint=hub_endpoint, synthetic_fallback=synthetic_fallback,
    )


@task(name="download", cache_policy=NO_CACHE)
def download(revision, artifacts: Path, hub_endpoint: str | None) -> Snapshot:
    return sources.fetch_snapshot(revision, cache_root=artifacts / "cache", endpoint=hub_endpoint)


@task(name="checksum", cache_policy=NO_CACHE)
def checksum(snapshot: Snapshot, source: builds.SourceInfo) -> None:
    sources.verify_checksums(snapshot, source)


@task(name="export", cache_policy=NO_CACHE)
def export(snapshot: Snapshot, config: BuildConfig, work: Path) -> ExportResult:
    model, _ = load_model(snapshot.path)
    return export_onnx(model, work / "model.onnx", opset=config.export.opset,
                       trace_shape=config.export.trace_shape, metadata=snapshot.onnx_metadata())


@task(name="check", cache_policy=NO_CACHE)
def check(exported: ExportResult, snapshot: Snapshot) -> None:
    check_onnx(exported.path, config=snapshot.config)


@task(name="verify", cache_policy=NO_CACHE)
def verify(exported: ExportResult, snapshot: Snapshot, config: BuildConfig, variant: Variant) -> VerificationReport:
    logger = get_run_logger()
    model, _ = load_model(snapshot.path)
    report = verify_onnx(
        model, exported.path, cells=config.verification.cells, tolerance=config.verification.tolerance("fp32"),
        seed=config.verification.seed,
        on_cell=lambda c: logger.info("cell %s %s: max abs %.2e %s", c.name, c.shape, c.max_abs_err,
                                      "ok" if c.passed else "FAIL " + "; ".join(c.failures)),
    )
    create_table_artifact(
        key=f"{variant.name}-verification-fp32",
        table=[{"cell": c.name, "B,S,Q,F": ",".join(map(str, c.shape)), "data": c.data, "max_abs_err": f"{c.max_abs_err:.2e}",
                "passed": c.passed} for c in report.cells],
        description=f"{variant.name}: verification matrix, fp32 ({'passed' if report.passed else 'FAILED'})",
    )
    require_passed(report)
    return report


@task(name="assemble", cache_policy=NO_CACHE)
def assemble(manifest: dict[str, Any], files: list[Path], reports: dict[str, VerificationReport], artifacts: Path) -> Path:
    folder = builds.assemble_build(artifacts, manifest, files=files, reports=reports)
    create_markdown_artifact(key=f"{manifest['variant']}-manifest", markdown=builds.manifest_markdown(manifest),
                             description=f"{manifest['variant']} {manifest['version']}")
    return folder


@flow(name="build-variant", flow_run_name="{variant_name}@{revision}")
def build_variant(variant_name: str, revision: str, config: BuildConfig, artifacts: Path, force: bool,
                  snapshot: str | None, hub_endpoint: str | None, synthetic_fallback: bool) -> dict[str, Any]:
    logger = get_run_logger()
    variant = config.variant(variant_name).model_copy(update={"revision": revision})
    source, pinned, local = resolve_revision(variant, config, artifacts, snapshot, hub_endpoint, synthetic_fallback)
    toolchain = builds.toolchain_versions()
    version = builds.build_version(source_digests=source.digests, config_digest=config_digest(config),
                                   toolchain=toolchain, code=builds.code_digest())
    done = builds.completed_build(artifacts, variant.name, version)
    if done is not None and not force:
        logger.info("%s is up to date: version %s already built from these weights and config", variant.name, version)
        return {"variant": variant.name, "status": "up-to-date", "version": version, "synthetic": source.synthetic,
                "build_dir": str(builds.build_dir(artifacts, variant.name, version))}

    snapshot_files = local if local is not None else download(pinned, artifacts, hub_endpoint)
    checksum(snapshot_files, source)
    work = artifacts / "work" / variant.name / version
    exported = export(snapshot_files, config, work)
    check(exported, snapshot_files)
    reports = {"fp32": verify(exported, snapshot_files, config, variant)}
    manifest = builds.draft_manifest(
        variant=variant.name, version=version, source=source, snapshot=snapshot_files, model_config=snapshot_files.config,
        config_digest=config_digest(config), opset=config.export.opset, export=exported, reports=reports,
        toolchain=toolchain,
    )
    folder = assemble(manifest, [exported.path], reports, artifacts)
    if source.synthetic:
        logger.warning(sources.SYNTHETIC_BANNER.format(variant=variant.name))
    logger.info("%s %s built into %s", variant.name, version, folder)
    return {"variant": variant.name, "status": "built", "version": version, "synthetic": source.synthetic,
            "build_dir": str(folder)}


@flow(name="mitra-build")
def mitra_build(variants: list[str] | None = None, revision: str | None = None, force: bool = False, snapshot: str | None = None,
                synthetic_fallback: bool = False, hub_endpoint: str | None = None, config_path: str | None = None,
                artifacts_root: str | None = None) -> list[dict[str, Any]]:
    """Build every configured variant (or the named ones) whose weights or config changed.

    Args:
        variants: variant names from the configuration; default all.
        revision: branch, tag or commit to build instead of each variant's configured revision. On the
            command line quote it as JSON: `-p revision='"1234567"'` (a bare 1234567 parses as a number).
        force: rebuild even when the same version is already built.
        snapshot: a local snapshot folder to build instead of downloading (one variant only).
        synthetic_fallback: if the hub is unreachable, build a SYNTHETIC full-size snapshot instead
            of failing (the demo's default; marked synthetic everywhere).
        hub_endpoint: a hub mirror (default: huggingface_hub's, i.e. HF_ENDPOINT or the public hub).
        config_path: configuration file (default config/mitra-build.toml or $MITRA_BUILD_CONFIG).
        artifacts_root: where builds and caches go (default ./artifacts).
    """
    config = load_config(Path(config_path) if config_path else None)
    selected = [config.variant(name) for name in variants] if variants else list(config.variants)
    if snapshot and len(selected) != 1:
        raise ValueError(f"--snapshot builds one variant; {len(selected)} selected: name one with variants=[...]")
    artifacts = Path(artifacts_root) if artifacts_root else DEFAULT_ARTIFACTS
    results = [
        build_variant(v.name, revision or v.revision, config, artifacts, force, snapshot, hub_endpoint, synthetic_fallback)
        for v in selected
    ]
    get_run_logger().info("summary: %s", "; ".join(f"{r['variant']} {r['status']} {r['version']}" for r in results))
    return results
