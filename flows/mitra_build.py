"""The `mitra-build` Prefect flow: thin orchestration over `mitra_model`, readable as the pipeline.

    resolve revision -> (published latest is this version? stop) -> download -> checksum
    -> per artifact: export (portable, optimized) | quantize (int8, fp16) -> check -> verification matrix
       -> consumer check (onnxruntime-node, optionally the browser)
    -> support-cache pair (encode_support / predict_query) -> verified against the full model
       -> consumer check of the pair (encode, then predict on its outputs, in the same runtimes)
    -> assemble the build folder (manifest.json) -> publish to S3 (artifacts, manifest, pointer)

Every task wraps one library function. Tasks keep no Prefect cache: whether to rebuild is decided
from content (the version is a digest of source digests, config, toolchain and code), and a build
only counts as done while its folder holds every file with its recorded sha256.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import WritableFileSystem

from mitra_model import build as builds
from mitra_model import consumers, support_cache
from mitra_model import source as sources
from mitra_model.check import check_onnx
from mitra_model.errors import ConfigError, StoreAuthError, VersionConflictError
from mitra_model.store import StoreConfig, make_s3_client
from mitra_model.config import REPO_ROOT, SUPPORT_CACHE_TOLERANCE, BuildConfig, Cell, ExecutionConfig, Tolerance, Variant, config_digest, load_config
from mitra_model.export import export_onnx
from mitra_model.publish import PublishResult, latest_release, publish_build
from mitra_model.quantize import quantize_onnx
from mitra_model.snapshot import Snapshot, load_model
from mitra_model import verify as verification
from mitra_model.verify import CellResult

DEFAULT_ARTIFACTS = REPO_ROOT / "artifacts"
# Persisted cell results: one object per flow run, artifact and cell under the store's results folder.
CELL_RESULT_KEY = "verify-cell/{flow_run.id}/{parameters[spec].name}/{parameters[cell].name}"
RESULT_STORAGE_BLOCK = "mitra-build-results"  # the S3Bucket block document on the Prefect server


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
def export(snapshot: Snapshot, config: BuildConfig, work: Path, spec: builds.ArtifactSpec) -> Path:
    model, _ = load_model(snapshot.path)
    return export_onnx(model, work / spec.file, opset=config.export.opset, trace_shape=config.export.trace_shape,
                       metadata=snapshot.onnx_metadata(), flavour=spec.flavour).path


@task(name="quantize", cache_policy=NO_CACHE)
def quantize(source: Path, work: Path, spec: builds.ArtifactSpec) -> tuple[Path, dict[str, Any]]:
    result = quantize_onnx(source, work / spec.file, precision=spec.precision)
    return result.path, result.details


@task(name="check", cache_policy=NO_CACHE)
def check(path: Path, snapshot: Snapshot) -> None:
    check_onnx(path, config=snapshot.config)


@task(name="verify-cell", cache_policy=NO_CACHE, task_run_name="verify-{spec.name}-{cell.name}")
def verify_cell(snapshot_dir: Path, path: Path, cell: Cell, spec: builds.ArtifactSpec, tolerance: Tolerance,
                seed: int) -> CellResult:
    result = verification.verify_cell(snapshot_dir, path, cell, tolerance=tolerance, seed=seed)
    get_run_logger().info("%s cell %s %s: max abs %.2e %s", spec.name, cell.name, result.shape,
                          result.max_abs_err, "ok" if result.passed else "FAIL " + "; ".join(result.failures))
    return result


@task(name="verification-report", cache_policy=NO_CACHE)
def verification_report(path: Path, spec: builds.ArtifactSpec, tolerance: Tolerance, results: list[CellResult],
                        variant: Variant, details: dict[str, Any]) -> builds.BuiltArtifact:
    report = verification.make_report(path, precision=spec.precision, tolerance=tolerance, results=results)
    create_table_artifact(
        key=f"{variant.name}-verification-{spec.name}",
        table=[{"cell": c.name, "B,S,Q,F": ",".join(map(str, c.shape)), "data": c.data, "max_abs_err": f"{c.max_abs_err:.2e}",
                "agreement/corr": c.argmax_agreement if c.argmax_agreement is not None else c.correlation,
                "onnx_s": round(c.onnx_seconds, 3), "passed": c.passed} for c in report.cells],
        description=f"{variant.name}: verification matrix, {spec.name} ({'passed' if report.passed else 'FAILED'})",
    )
    verification.require_passed(report)
    return builds.BuiltArtifact(spec=spec, path=path, size=path.stat().st_size, sha256=report.onnx_sha256,
                                report=report, details=details)


def verify(path: Path, snapshot: Snapshot, config: BuildConfig, variant: Variant, spec: builds.ArtifactSpec,
           details: dict[str, Any], storage: WritableFileSystem | None) -> builds.BuiltArtifact:
    """The matrix as one task per cell on the configured task runner (threads here, or Dask); with a
    result storage, each cell's result is persisted there by whichever worker ran it."""
    tolerance = config.verification.tolerance(spec.precision)
    cells = list(config.verification.cells)
    # The key names where the result goes (Prefect ignores result_storage_key under NO_CACHE)
    cell_task = verify_cell if storage is None else verify_cell.with_options(
        result_storage=storage, result_storage_key=CELL_RESULT_KEY, cache_policy=None)
    futures = cell_task.map(unmapped(snapshot.path), unmapped(path), cells, unmapped(spec), unmapped(tolerance),
                              unmapped(config.verification.seed))
    return verification_report(path, spec, tolerance, [f.result() for f in futures], variant, details)


@task(name="consumer-check", cache_policy=NO_CACHE)
def consumer_check(built: list[builds.BuiltArtifact], snapshot: Snapshot, config: BuildConfig,
                   work: Path) -> list[builds.BuiltArtifact]:
    """Load the artifact where it is consumed (onnxruntime-node; optionally the browser) and require
    the outputs of Python ONNX Runtime on a fixed set of inputs. Two artifacts are the support-cache
    pair, checked together as consumers run it: encode-support, then predict-query on its outputs."""
    model, *predictor = [artifact.path for artifact in built]
    predict_path = predictor[0] if predictor else None
    name = " + ".join(artifact.spec.name for artifact in built)
    precision = built[0].spec.precision
    fixture = consumers.write_fixture(model, snapshot.config, work / f"fixture-{built[0].spec.name}",
                                      predict_path=predict_path)
    checks = []
    if config.consumers.node:
        consumers.ensure_node_modules()
        checks.append(consumers.check_in_node(
            model, fixture, predict_path=predict_path,
            tolerance_abs=config.consumers.tolerance(precision, consumers.NODE_RUNTIME)))
    if config.consumers.browser:
        checks.append(consumers.check_in_browser(
            model, fixture, predict_path=predict_path,
            tolerance_abs=config.consumers.tolerance(precision, consumers.WEB_RUNTIME)))
    for check in checks:
        get_run_logger().info("%s in %s %s (%s): max abs %.2e vs Python ONNX Runtime", name, check.runtime,
                              check.runtime_version, check.host, check.max_abs_err)
    records = tuple(check.to_record() for check in checks)
    return [dataclasses.replace(artifact, checked_in=records) for artifact in built]


@task(name="export-support-cache", cache_policy=NO_CACHE)
def export_support_cache_pair(snapshot: Snapshot, config: BuildConfig, work: Path) -> support_cache.SupportCacheExport:
    model, _ = load_model(snapshot.path)
    return support_cache.export_support_cache(model, work, opset=config.export.opset,
                                              trace_shape=config.export.trace_shape, metadata=snapshot.onnx_metadata())


@task(name="verify-support-cache", cache_policy=NO_CACHE)
def verify_support_cache_pair(pair: support_cache.SupportCacheExport, snapshot: Snapshot, config: BuildConfig,
                              variant: Variant) -> list[builds.BuiltArtifact]:
    """predict_query(encode_support(...)) against the full PyTorch model on every matrix cell, with
    several query batches per cache; the pair is published only together."""
    model, _ = load_model(snapshot.path)
    tolerance = config.verification.tolerance(SUPPORT_CACHE_TOLERANCE)
    report = support_cache.verify_support_cache(model, pair.encode.path, pair.predict.path,
                                                cells=config.verification.cells, tolerance=tolerance,
                                                seed=config.verification.seed)
    create_table_artifact(
        key=f"{variant.name}-verification-support-cache",
        table=[{"cell": c.name, "B,S,Q,F": ",".join(map(str, c.shape)), "max_abs_err": f"{c.max_abs_err:.2e}",
                "passed": c.passed} for c in report.cells],
        description=f"{variant.name}: support-cache pair vs full model ({'passed' if report.passed else 'FAILED'})",
    )
    verification.require_passed(report)
    return builds.support_cache_artifacts(pair, report, snapshot.config)


@task(name="assemble", cache_policy=NO_CACHE)
def assemble(manifest: dict[str, Any], built: list[builds.BuiltArtifact], artifacts: Path) -> Path:
    folder = builds.assemble_build(artifacts, manifest, built)
    create_markdown_artifact(key=f"{manifest['variant']}-manifest", markdown=builds.manifest_markdown(manifest),
                             description=f"{manifest['variant']} {manifest['version']}")
    return folder


def retry_io_only(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry S3 I/O unless another try cannot help: a refused version, refused credentials or a
    bad configuration fail the same way every time, and a retry would only hide the message."""
    try:
        state.result()
    except (VersionConflictError, StoreAuthError, ConfigError):
        return False
    except Exception:  # noqa: BLE001 - anything else (lost connection, 5xx after botocore's retries)
        return True
    return False


@task(name="read-latest-release", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3,
      retry_condition_fn=retry_io_only)
def read_latest_release(store: StoreConfig, variant: Variant) -> dict[str, Any] | None:
    return latest_release(make_s3_client(store), store, variant.name)


@task(name="publish", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,  # idempotent: a retry converges
      retry_condition_fn=retry_io_only)
def publish_release(folder: Path, store: StoreConfig) -> PublishResult:
    result = publish_build(folder, client=make_s3_client(store), store=store)
    get_run_logger().info("published %s %s as manifest_version %d (%s)", result.variant, result.version,
                          result.manifest_version, store.url(result.manifest_key))
    return result


@flow(name="build-variant", flow_run_name="{variant_name}@{revision}")
def build_variant(variant_name: str, revision: str, config: BuildConfig, artifacts: Path, force: bool,
                  snapshot: str | None, hub_endpoint: str | None, synthetic_fallback: bool,
                  publish_to_store: bool) -> dict[str, Any]:
    logger = get_run_logger()
    variant = config.variant(variant_name).model_copy(update={"revision": revision})
    source, pinned, local = resolve_revision(variant, config, artifacts, snapshot, hub_endpoint, synthetic_fallback)
    toolchain = builds.toolchain_versions()
    version = builds.build_version(source_digests=source.digests, config_digest=config_digest(config),
                                   toolchain=toolchain, code=builds.code_digest())
    store = config.store if publish_to_store else None
    latest = read_latest_release(store, variant) if store else None
    if latest is not None and latest["version"] == version and not force:
        logger.info("%s is up to date: %s is already the published latest (manifest_version %d)",
                    variant.name, version, latest["manifest_version"])
        return {"variant": variant.name, "status": "up-to-date", "version": version,
                "synthetic": source.synthetic, "build_dir": None, "published": store.url(latest["manifest_key"])}
    done = builds.completed_build(artifacts, variant.name, version)
    if done is not None and not force:
        logger.info("%s %s is already built locally; no export or verification needed", variant.name, version)
        folder = builds.build_dir(artifacts, variant.name, version)
        return finish(variant, version, folder, done, store, "up-to-date" if store is None else "published")

    snapshot_files = local if local is not None else download(pinned, artifacts, hub_endpoint)
    checksum(snapshot_files, source)
    work = builds.fresh_work_dir(artifacts, variant.name, version)
    storage = result_storage(config)
    built: dict[str, builds.BuiltArtifact] = {}
    check_in_consumers = config.consumers.node or config.consumers.browser
    for spec in builds.planned_artifacts(config.artifacts):
        if spec.precision == "fp32":
            path, details = export(snapshot_files, config, work, spec), {}
        else:  # reduced precisions derive from the verified optimized fp32 file
            path, details = quantize(built["fp32-ort"].path, work, spec)
        check(path, snapshot_files)
        verified = [verify(path, snapshot_files, config, variant, spec, details, storage)]
        if check_in_consumers:
            verified = consumer_check(verified, snapshot_files, config, work)
        built[spec.name] = verified[0]
    if config.artifacts.support_cache:
        pair = export_support_cache_pair(snapshot_files, config, work)
        verified = verify_support_cache_pair(pair, snapshot_files, config, variant)
        if check_in_consumers:
            verified = consumer_check(verified, snapshot_files, config, work)
        built.update((artifact.spec.name, artifact) for artifact in verified)
    manifest = builds.draft_manifest(
        variant=variant.name, version=version, source=source, snapshot=snapshot_files, model_config=snapshot_files.config,
        config_digest=config_digest(config), opset=config.export.opset, artifacts=list(built.values()),
        toolchain=toolchain,
    )
    folder = assemble(manifest, list(built.values()), artifacts)
    builds.discard_work_dir(work)
    return finish(variant, version, folder, manifest, store, "built")


def finish(variant: Variant, version: str, folder: Path, manifest: dict[str, Any], store: StoreConfig | None,
           status: str) -> dict[str, Any]:
    """Publish a complete build folder (when a store is configured) and report."""
    logger = get_run_logger()
    published = publish_release(folder, store) if store is not None else None
    synthetic = manifest["source"]["synthetic"]
    if synthetic:
        logger.warning(sources.SYNTHETIC_BANNER.format(variant=variant.name))
    return {"variant": variant.name, "status": status, "version": version, "synthetic": synthetic,
            "build_dir": str(folder),
            "published": store.url(published.manifest_key) if published and store else None}


def result_storage(config: BuildConfig) -> WritableFileSystem | None:
    """Prefect result storage for the tasks that may run on other hosts: the [store] bucket when
    [execution] result_storage = "store", else None.

    Prefect only accepts result storage saved on its server (a worker elsewhere loads it from
    there), so the block is saved, overwriting the previous one. It holds no secret: credentials
    come from boto3's standard chain on whichever host reads or writes.
    """
    if config.execution.result_storage != "store" or config.store is None:
        return None
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    store = config.store
    client = AwsClientParameters(endpoint_url=store.endpoint_url,
                                 config={"s3": {"addressing_style": "path" if store.endpoint_url else "auto"}})
    block = S3Bucket(bucket_name=store.bucket, bucket_folder=store.results_folder(),
                     credentials=AwsCredentials(region_name=store.region, aws_client_parameters=client))
    block.save(RESULT_STORAGE_BLOCK, overwrite=True)
    return block


def task_runner(execution: ExecutionConfig) -> TaskRunner:
    """The runner for the verification cells, from [execution] in the configuration."""
    if execution.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if execution.dask_address:
            return DaskTaskRunner(address=execution.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": execution.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=execution.max_workers)


@flow(name="mitra-build")
def mitra_build(variants: list[str] | None = None, revision: str | None = None, force: bool = False, snapshot: str | None = None,
                synthetic_fallback: bool = False, hub_endpoint: str | None = None, config_path: str | None = None,
                artifacts_root: str | None = None, publish: bool = True,
                precisions: list[str] | None = None, flavours: list[str] | None = None) -> list[dict[str, Any]]:
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
        publish: publish to the configured [store] (default); False keeps builds local.
        precisions: reduced precisions to build (e.g. ["int8"]; [] for fp32 only); default from
            [artifacts] in the configuration.
        flavours: fp32 flavours to build (["portable"] or ["portable", "optimized"]; int8/fp16 need
            "optimized"); default from [artifacts] in the configuration.
    """
    config = load_config(Path(config_path) if config_path else None)
    config = config.with_artifacts(flavours=flavours, precisions=precisions)
    selected = [config.variant(name) for name in variants] if variants else list(config.variants)
    if snapshot and len(selected) != 1:
        raise ConfigError(f"--snapshot builds one variant but {len(selected)} are selected "
                          f"({', '.join(v.name for v in selected)}): name one with --variant NAME (variants=[NAME])")
    artifacts = Path(artifacts_root) if artifacts_root else DEFAULT_ARTIFACTS
    build = build_variant.with_options(task_runner=task_runner(config.execution))
    results = [
        build(v.name, revision or v.revision, config, artifacts, force, snapshot, hub_endpoint,
                      synthetic_fallback, publish)
        for v in selected
    ]
    get_run_logger().info("summary: %s", "; ".join(f"{r['variant']} {r['status']} {r['version']}" for r in results))
    return results
