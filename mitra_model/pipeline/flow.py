"""The `mitra-build` Prefect flow: thin orchestration over `mitra_model`, readable as the pipeline.

    resolve revision -> decide (up to date? stop) -> download -> checksum
    -> reference: upstream Tab2D and our rewrite on every matrix cell, once
    -> per planned recipe (mitra_model/recipes.py), each after the one it derives from:
       make (export | quantize | export the pair) -> check -> verification matrix vs the reference
       -> consumer check (onnxruntime-node, optionally the browser)
    -> assemble the build folder (manifest.json) -> publish to S3 (artifacts, manifest, signature, pointer)
       (up to date: re-sign the pointer with a fresh expiry)

Every task wraps one library function. Tasks keep no Prefect cache: whether to rebuild is decided
from content (the version is a digest of source digests, config, toolchain and code), and a build
only counts as done while its folder holds every file with its recorded sha256.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import WritableFileSystem

from mitra_model.build import consumers
from mitra_model.build import record as builds
from mitra_model.build import reference as references
from mitra_model.build import source as sources
from mitra_model.build import verify as verification
from mitra_model.build.check import check_onnx
from mitra_model.build.config import BuildConfig, Cell, TaskCell, Tolerance, Variant, config_digest, load_config
from mitra_model.build.config import artifacts_root as artifacts_root_from
from mitra_model.build.recipes import BuildContext, Made, Recipe
from mitra_model.build.verify import CellResult, TaskResult, VerificationReport
from mitra_model.errors import ConfigError, StoreAuthError, VersionConflictError
from mitra_model.model.snapshot import Snapshot, read_model_config
from mitra_model.pipeline import plumbing
from mitra_model.release import keys as signing_keys
from mitra_model.release import layout
from mitra_model.release.log import latest_release
from mitra_model.release.maintenance import refresh_pointer
from mitra_model.release.publish import PublishResult, publish_build
from mitra_model.release.store import StoreConfig, make_s3_client
from mitra_model.report import release_documents


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


@task(name="make-artifact", cache_policy=NO_CACHE, task_run_name="{recipe.verb}-{recipe.name}")
def make_artifact(recipe: Recipe, snapshot: Snapshot, config: BuildConfig, work: Path,
                  parent_files: tuple[Path, ...]) -> Made:
    context = BuildContext(snapshot_dir=snapshot.path, work=work, opset=config.export.opset,
                           trace_shape=config.export.trace_shape, parent_files=parent_files,
                           options=config.artifacts.options_for(recipe))
    return recipe.make(context)


@task(name="check", cache_policy=NO_CACHE, task_run_name="check-{recipe.name}")
def check(recipe: Recipe, made: Made, snapshot: Snapshot) -> None:
    for file, path in zip(recipe.files, made.files):
        check_onnx(path, config=snapshot.config, contract=file.contract(snapshot.config))


@task(name="reference-cell", cache_policy=NO_CACHE, task_run_name="reference-{cell.name}")
def reference_cell(snapshot_dir: Path, cell: Cell | TaskCell, seed: int, cache_dir: Path) -> None:
    """Upstream's Tab2D and our rewrite on one cell's (or real table's) inputs, computed once per
    build and cached for every artifact's verification."""
    reference = references.reference_for(snapshot_dir, cell, seed=seed, cache_dir=cache_dir)
    get_run_logger().info("reference %s: upstream vs rewrite max abs %.2e", cell.name, reference.rewrite_vs_upstream_max_abs)


@task(name="verify-cell", cache_policy=NO_CACHE, task_run_name="verify-{recipe_name}-{cell.name}")
def verify_cell(snapshot_dir: Path, paths: tuple[Path, ...], cell: Cell, recipe_name: str, kind: str,
                tolerance: Tolerance, seed: int, reference_dir: Path) -> CellResult:
    plumbing.attach_log_bridge()  # this task may run in a Dask worker: its library logs reach the UI too
    result = verification.verify_cell(snapshot_dir, paths, cell, kind=kind, tolerance=tolerance, seed=seed,
                                      reference_dir=reference_dir)
    metrics = result.metrics
    signal = "-" if metrics.err_over_spread is None else f"{metrics.err_over_spread:.3g} of spread {metrics.spread:.3g}"
    get_run_logger().info("%s cell %s %s: max abs %.2e, error/spread %s, batch dependence %s %s", recipe_name,
                          cell.name, result.shape, result.max_abs_err, signal,
                          "-" if metrics.batch_dependence is None else f"{metrics.batch_dependence:.1e}",
                          "ok" if result.passed else "FAIL " + "; ".join(result.failures))
    return result


@task(name="verify-task", cache_policy=NO_CACHE, task_run_name="verify-{recipe_name}-task-{task.name}")
def verify_task(snapshot_dir: Path, paths: tuple[Path, ...], task: TaskCell, recipe_name: str, kind: str,
                tolerance: Tolerance, seed: int, reference_dir: Path) -> TaskResult:
    plumbing.attach_log_bridge()  # this task may run in a Dask worker: its library logs reach the UI too
    result = verification.verify_task(snapshot_dir, paths, task, kind=kind, tolerance=tolerance, seed=seed,
                                      reference_dir=reference_dir)
    scores = ", ".join(f"{k} {v:.3f} (upstream {result.upstream_scores[k]:.3f}, chance {result.chance_scores[k]:.3f})"
                       for k, v in result.scores.items())
    _, synthetic = read_model_config(snapshot_dir)
    get_run_logger().info("%s task %s (%s): error/spread %s, %s%s %s", recipe_name, task.name, task.dataset,
                          f"{result.metrics.err_over_spread:.3g}" if result.metrics.err_over_spread is not None else "-",
                          scores, f" [{builds.SYNTHETIC_TASKS_NOTE}]" if synthetic else "",
                          "ok" if result.passed else "FAIL " + "; ".join(result.failures))
    return result


@task(name="verification-report", cache_policy=NO_CACHE, task_run_name="report-{recipe.name}")
def verification_report(recipe: Recipe, made: Made, tolerance: Tolerance, results: list[CellResult],
                        tasks: list[TaskResult]) -> VerificationReport:
    summary = {"query_batches": verification.QUERY_BATCHES} if recipe.verify_as == "pair" else None
    return verification.make_report(made.files[-1], precision=recipe.precision, tolerance=tolerance, results=results,
                                    summary=summary, tasks=tasks)


def verify(recipe: Recipe, made: Made, snapshot: Snapshot, config: BuildConfig, tasks: tuple[TaskCell, ...],
           reference_dir: Path, storage: WritableFileSystem | None,
           board: plumbing.VariantBoard) -> list[builds.BuiltArtifact]:
    """The matrix and the task checks as one task each on the configured task runner (threads here,
    or Dask); with a result storage, each result is persisted there by whichever worker ran it."""
    tolerance = config.verification.tolerance(recipe.tolerance)
    limit = config.execution.task_timeout_s
    shared = (unmapped(recipe.name), unmapped(recipe.verify_as), unmapped(tolerance),
              unmapped(config.verification.seed), unmapped(reference_dir))
    futures = {}
    for kind, prefect_task, cases in (("cells", verify_cell, config.verification.cells), ("tasks", verify_task, tasks)):
        # The key names where the result goes (Prefect ignores result_storage_key under NO_CACHE)
        run = prefect_task.with_options(timeout_seconds=limit) if storage is None else prefect_task.with_options(
            result_storage=storage, result_storage_key=plumbing.RESULT_KEYS[kind], cache_policy=None,
            timeout_seconds=limit)
        futures[kind] = run.map(unmapped(snapshot.path), unmapped(made.files), list(cases), *shared) if cases else []
    results = {kind: [] for kind in futures}
    for kind, pending in futures.items():
        for future in pending:
            results[kind].append(future.result())
            board.step(f"verifying {recipe.name}")
    report = verification_report(recipe, made, tolerance, results["cells"], results["tasks"])
    board.verified(recipe.name, report)  # shown failed or not
    verification.require_passed(report)
    return builds.built_artifacts(recipe, made.files, report, made.details)


@task(name="consumer-check", cache_policy=NO_CACHE, task_run_name="consumer-check-{recipe.name}")
def consumer_check(recipe: Recipe, built: list[builds.BuiltArtifact], snapshot: Snapshot, config: BuildConfig,
                   work: Path) -> list[builds.BuiltArtifact]:
    results = consumers.check_where_consumed(tuple(a.path for a in built), snapshot.config,
                                             folder=work / f"fixture-{recipe.name}",
                                             bounds=config.consumers.bounds(recipe.tolerance))
    for result in results:
        get_run_logger().info("%s in %s %s (%s): max abs %.2e vs Python ONNX Runtime", recipe.name, result.runtime,
                              result.runtime_version, result.host, result.max_abs_err)
    records = tuple(result.to_record() for result in results)
    return [dataclasses.replace(artifact, checked_in=records) for artifact in built]


@task(name="assemble", cache_policy=NO_CACHE)
def assemble(manifest: dict[str, Any], built: list[builds.BuiltArtifact], artifacts: Path) -> Path:
    return builds.assemble_build(artifacts, manifest, built)


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
def publish_release(folder: Path, store: StoreConfig, ttl_days: int, signing_key: str | None) -> PublishResult:
    # the signer is made here, inside the task: it refuses to be pickled into a Prefect result
    signer = signing_keys.signer_from_environment(Path(signing_key) if signing_key else None)
    logger = get_run_logger()
    result = publish_build(folder, client=make_s3_client(store), store=store, signer=signer,
                           pointer_ttl=timedelta(days=ttl_days), documents=release_documents)
    logger.info("published %s %s as manifest_version %d (%s)", result.variant, result.version,
                result.manifest_version, store.url(result.manifest_key))
    if signer is None:
        logger.warning("%s %s is UNSIGNED: consumers that trust a key will refuse it. Set %s (or %s) to sign "
                       "releases.", result.variant, result.version, signing_keys.SIGNING_KEY_FILE_ENV, signing_keys.SIGNING_KEY_ENV)
    return result


@task(name="refresh-pointer", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_io_only)
def refresh_release_pointer(store: StoreConfig, variant: Variant, ttl_days: int, signing_key: str | None) -> None:
    """TUF's timestamp role: an unchanged release still gets a freshly signed latest.json, so
    consumers can refuse a pointer that stopped being renewed (a frozen mirror)."""
    signer = signing_keys.signer_from_environment(Path(signing_key) if signing_key else None)
    if signer is None:
        return  # unsigned releases have no expiry to renew
    result = refresh_pointer(make_s3_client(store), store, variant.name, signer, timedelta(days=ttl_days))
    get_run_logger().info("re-signed %s's latest.json (manifest_version %d, unchanged): expires %s",
                          variant.name, result.manifest_version, result.expires)


@flow(name="build-variant", flow_run_name="{variant_name}@{revision}")
def build_variant(variant_name: str, revision: str, config: BuildConfig, artifacts: Path, force: bool,
                  snapshot: str | None, hub_endpoint: str | None, synthetic_fallback: bool,
                  publish_to_store: bool, signing_key: str | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    plumbing.tag_this_flow_run(f"variant:{variant_name}")
    variant = config.variant(variant_name).model_copy(update={"revision": revision})
    source, pinned, local = resolve_revision(variant, config, artifacts, snapshot, hub_endpoint, synthetic_fallback)
    toolchain = builds.toolchain_versions()
    version = builds.build_version(source_digests=source.digests, config_digest=config_digest(config),
                                   toolchain=toolchain, code=builds.code_digest())
    store = config.store if publish_to_store else None
    latest = read_latest_release(store, variant) if store else None
    decision = builds.decide_build(variant=variant.name, version=version, artifacts_root=artifacts, latest=latest,
                                   force=force)
    logger.info(decision.reason)
    ttl_days = config.signing.pointer_ttl_days
    if decision.action == "published":
        if store is not None:
            refresh_release_pointer(store, variant, ttl_days, signing_key)
        return {"variant": variant.name, "status": "up-to-date", "version": version, "synthetic": source.synthetic,
                "build_dir": None, "published": store.url(latest["manifest_key"]) if store and latest else None}
    planned = config.artifacts.planned()
    tasks = config.verification.tasks_for(variant.task)  # the real tables of this model's task
    cases = (*config.verification.cells, *tasks)
    board = plumbing.VariantBoard(variant.name, total_steps=len(cases) * (1 + len(planned)))
    if decision.action == "built-locally":
        folder = builds.build_dir(artifacts, variant.name, version)
        return finish(variant, version, folder, decision.manifest, store, "up-to-date" if store is None else "published",
                      ttl_days, signing_key, board)

    limit = config.execution.task_timeout_s  # every long task gets it: a hang fails the run, not the worker
    snapshot_files = local if local is not None else download.with_options(timeout_seconds=limit)(
        pinned, artifacts, hub_endpoint)
    checksum(snapshot_files, source)
    work = builds.fresh_work_dir(artifacts, variant.name, version)
    storage = plumbing.result_storage(config)
    reference_dir = artifacts / "cache" / "reference"
    for case in cases:  # once per build; every artifact below is compared with these
        reference_cell.with_options(timeout_seconds=limit)(snapshot_files.path, case, config.verification.seed,
                                                           reference_dir)
        board.step("computing the reference")
    made: dict[str, Made] = {}
    built: list[builds.BuiltArtifact] = []
    for recipe in planned:  # each after the recipe it derives from
        parent = made[recipe.derives_from].files if recipe.derives_from else ()
        made[recipe.name] = make_artifact.with_options(timeout_seconds=limit)(recipe, snapshot_files, config, work,
                                                                              parent)
        check(recipe, made[recipe.name], snapshot_files)
        verified = verify(recipe, made[recipe.name], snapshot_files, config, tasks, reference_dir, storage, board)
        if config.consumers.runtimes():
            verified = consumer_check.with_options(timeout_seconds=limit)(recipe, verified, snapshot_files, config,
                                                                          work)
        built += verified
    manifest = builds.draft_manifest(
        variant=variant.name, version=version, source=source, snapshot=snapshot_files, model_config=snapshot_files.config,
        config_digest=config_digest(config), opset=config.export.opset, artifacts=built,
        toolchain=toolchain,
    )
    folder = assemble(manifest, built, artifacts)
    builds.discard_work_dir(work)
    return finish(variant, version, folder, manifest, store, "built", ttl_days, signing_key, board)


def finish(variant: Variant, version: str, folder: Path, manifest: dict[str, Any], store: StoreConfig | None,
           status: str, ttl_days: int, signing_key: str | None, board: plumbing.VariantBoard) -> dict[str, Any]:
    """Publish a complete build folder (when a store is configured; signed when a key is) and report."""
    logger = get_run_logger()
    published = publish_release(folder, store, ttl_days, signing_key) if store is not None else None
    where = None if published is None or store is None else {
        "url": store.url(published.manifest_key), "manifest_version": published.manifest_version,
        "report": store.http_url(layout.artifact_key(store.prefix, variant.name, published.version, layout.REPORT_NAME))}
    # after publishing, so the summary can say where the release is and which manifest_version it got
    board.finished(version, builds.manifest_markdown(manifest, where))
    synthetic = manifest["source"]["synthetic"]
    if synthetic:
        logger.warning(sources.SYNTHETIC_BANNER.format(variant=variant.name))
    return {"variant": variant.name, "status": status, "version": version, "synthetic": synthetic,
            "build_dir": str(folder),
            "published": store.url(published.manifest_key) if published and store else None}


@flow(name="mitra-build", flow_run_name=plumbing.run_name)
def mitra_build(variants: list[str] | None = None, revision: str | None = None, force: bool = False, snapshot: str | None = None,
                synthetic_fallback: bool = False, hub_endpoint: str | None = None, config_path: str | None = None,
                artifacts_root: str | None = None, publish: bool = True,
                precisions: list[str] | None = None, flavours: list[str] | None = None,
                signing_key: str | None = None) -> list[dict[str, Any]]:
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
        artifacts_root: where builds and caches go (default $MITRA_BUILD_ARTIFACTS, else ./artifacts).
        publish: publish to the configured [store] (default); False keeps builds local.
        precisions: reduced precisions to build (e.g. ["int8"]; [] for fp32 only); default from
            [artifacts] in the configuration.
        flavours: fp32 flavours to build (["portable"] or ["portable", "optimized"]; reduced precisions
            need "optimized"); default from [artifacts] in the configuration.
        signing_key: the release signing key's PEM file on the machine that publishes (default
            $MITRA_SIGNING_KEY_FILE, else the PEM in $MITRA_SIGNING_KEY; none: unsigned releases).
            Never put the key itself in a parameter: parameters are stored by the Prefect server.
    """
    plumbing.attach_log_bridge()
    config = load_config(Path(config_path) if config_path else None)
    config = config.with_artifacts(flavours=flavours, precisions=precisions)
    selected = config.select_variants(variants, snapshot=snapshot)
    artifacts = artifacts_root_from(artifacts_root)
    build = build_variant.with_options(task_runner=plumbing.task_runner(config.execution))
    results = []
    for v in selected:
        with plumbing.variant_lock(v.name, timeout_s=config.execution.variant_lock_timeout_s):
            results.append(build(v.name, revision or v.revision, config, artifacts, force, snapshot, hub_endpoint,
                                 synthetic_fallback, publish, signing_key))
    get_run_logger().info("summary: %s", "; ".join(summary_line(r) for r in results))
    return results


def summary_line(result: dict[str, Any]) -> str:
    """`mitra-classifier built v-0123 SYNTHETIC -> s3://.../manifest.json`: status, version, whether the
    weights are random, and where the release is (or the local folder)."""
    where = result["published"] or result["build_dir"] or "not published"
    synthetic = " SYNTHETIC (random weights)" if result["synthetic"] else ""
    return f"{result['variant']} {result['status']} {result['version']}{synthetic} -> {where}"
