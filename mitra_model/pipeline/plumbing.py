"""What Prefect needs besides the pipeline: the log bridge, the UI's cards, run names and tags, the
per-variant lock, result storage, the task runner, the schedule check and the check of Prefect's own logs.

Kept out of `flow.py`, which reads as the pipeline. Nothing here runs at import: the log bridge is
attached when a run starts (`attach_log_bridge`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.filesystems import WritableFileSystem
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from mitra_model.build.config import BuildConfig, ExecutionConfig, load_config
from mitra_model.build.verify import VerificationReport

# Persisted results: one object per flow run, artifact and cell (or task check) under the store's results folder.
RESULT_KEYS = {"cells": "verify-cell/{flow_run.id}/{parameters[recipe_name]}/{parameters[cell].name}",
               "tasks": "verify-task/{flow_run.id}/{parameters[recipe_name]}/{parameters[task].name}"}
RESULT_STORAGE_BLOCK = "mitra-build-results"  # the S3Bucket block document on the Prefect server


# -- logs ---------------------------------------------------------------------------------------


class _NoCompletedNoise(logging.Filter):
    # Prefect says, once per task run, that a success succeeded, and that a timeout cannot interrupt
    # a task in a worker thread (it fails the task when the blocking call returns; that is all we ask)
    NOISE = ("Finished in state Completed", "Timeout of ")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOISE)


def attach_log_bridge() -> None:
    """Make the library's log records (hub fallback, retries, the synthetic banner) part of the run's
    logs in the Prefect UI, as PREFECT_LOGGING_EXTRA_LOGGERS would, without depending on that being
    set before Prefect was imported; and keep per-task "Finished in state Completed()" lines out of
    them (failures and retries are still logged). Idempotent: every run (and every Dask worker's
    task) calls it when it starts."""
    library = logging.getLogger("mitra_model")
    if not any(isinstance(handler, APILogHandler) for handler in library.handlers):
        library.addHandler(APILogHandler())
        library.setLevel(logging.INFO)
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoCompletedNoise) for f in task_runs.filters):
        task_runs.addFilter(_NoCompletedNoise())


# -- names and tags -----------------------------------------------------------------------------


def run_name() -> str:
    """What the run builds, for the UI's run list: `mitra-build: mitra-classifier, mitra-regressor @ main`
    (each variant at its own revision when they differ: `mitra-build: a @ main, b @ v2`)."""
    parameters = flow_run.parameters or {}
    if parameters.get("snapshot"):
        return f"mitra-build: {', '.join(parameters.get('variants') or ['one variant'])} @ local snapshot"
    try:
        config = load_config(Path(parameters["config_path"]) if parameters.get("config_path") else None)
        chosen = config.select_variants(parameters.get("variants") or None)
    except Exception:  # noqa: BLE001 - a bad config fails the run itself, with its own message
        return f"mitra-build: {', '.join(parameters.get('variants') or ['all variants'])}"
    revisions = {v.name: parameters.get("revision") or (v.revision if v.repo_id else "local folder") for v in chosen}
    if len(set(revisions.values())) == 1:
        return f"mitra-build: {', '.join(revisions)} @ {next(iter(revisions.values()))}"
    return "mitra-build: " + ", ".join(f"{name} @ {revision}" for name, revision in revisions.items())


def tag_this_flow_run(tag: str) -> None:
    """Tag the running flow run (the UI finds a variant's builds by it), and only the flow run.

    Not with `prefect.tags()`: every task run created inside it would inherit the tag, and Prefect
    asks the server for a tag's concurrency slots before each tagged task run starts. Its client
    caches "no limit for this tag" for only 5 s, so after every task longer than that it asks
    again; on the SQLite server that write races the server's task-run recorder, gets a 503
    ("database is locked") and the client retries after a 2 s back-off: 55 s lost per full build.
    """
    run_id = flow_run.id
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags or []
        client.update_flow_run(run_id, tags=sorted({*current, tag}))


# -- the variant lock ---------------------------------------------------------------------------


@contextlib.contextmanager
def variant_lock(variant: str, *, timeout_s: float) -> Iterator[None]:
    """Hold the one-slot global concurrency limit `mitra-build-variant-<variant>`, so that no variant
    is built by two runs at once across deployments and workers (created on first use)."""
    name = f"mitra-build-variant-{variant}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it in between
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, strict=True, timeout_seconds=timeout_s):
        yield


# -- where cells run and where their results go -------------------------------------------------


def task_runner(execution: ExecutionConfig) -> TaskRunner:
    """The runner for the verification cells, from [execution] in the configuration."""
    if execution.task_runner == "dask":
        from prefect_dask import DaskTaskRunner  # only a Dask configuration needs prefect-dask loaded

        if execution.dask_address:
            return DaskTaskRunner(address=execution.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": execution.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=execution.max_workers)


def result_storage(config: BuildConfig) -> WritableFileSystem | None:
    """Prefect result storage for the tasks that may run on other hosts: the [store] bucket when
    [execution] result_storage = "store", else None.

    Prefect only accepts result storage saved on its server (a worker elsewhere loads it from
    there), so the block is saved, overwriting the previous one. It holds no secret: credentials
    come from boto3's standard chain on whichever host reads or writes.
    """
    if config.execution.result_storage != "store" or config.store is None:
        return None
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket  # only a "store" configuration needs it

    store = config.store
    client = AwsClientParameters(endpoint_url=store.endpoint_url,
                                 config={"s3": {"addressing_style": "path" if store.endpoint_url else "auto"}})
    block = S3Bucket(bucket_name=store.bucket, bucket_folder=store.results_folder(),
                     credentials=AwsCredentials(region_name=store.region, aws_client_parameters=client))
    block.save(RESULT_STORAGE_BLOCK, overwrite=True)
    return block


# -- the UI's cards -----------------------------------------------------------------------------


class VariantBoard:
    """A variant's cards on the Prefect artifacts page, one per kind, each updated in place:
    `<variant>-progress` (the build's progress, step by step), `<variant>-verification` (every
    artifact's matrix, the tolerance beside each error) and `<variant>-manifest` (what was published,
    where, SYNTHETIC or not). Same keys on every run, so the page keeps their history."""

    def __init__(self, variant: str, total_steps: int) -> None:
        self.variant = variant
        self.total = max(total_steps, 1)
        self.done = 0
        self.rows: list[dict[str, Any]] = []
        self.progress_id = create_progress_artifact(0.0, key=f"{variant}-progress",
                                                    description=f"{variant}: starting the build")

    def step(self, what: str) -> None:
        """One step (a reference cell, a verification cell) is done; `what` says what comes next."""
        self.done = min(self.done + 1, self.total)
        update_progress_artifact(self.progress_id, 100.0 * self.done / self.total,
                                 description=f"{self.variant}: {what} ({self.done}/{self.total})")

    def verified(self, artifact: str, report: VerificationReport) -> None:
        """Add an artifact's matrix to the verification card (passed or not: a failure is shown too)."""
        self.rows += [{"artifact": artifact, **row} for row in report.table_rows()]
        verdict = "passed" if report.passed else f"{artifact} FAILED"
        create_table_artifact(key=f"{self.variant}-verification", table=self.rows,
                              description=f"{self.variant}: verification matrix vs upstream Tab2D ({verdict})")

    def finished(self, version: str, markdown: str) -> None:
        """The build's summary card; the progress card reads 100%."""
        update_progress_artifact(self.progress_id, 100.0, description=f"{self.variant}: done")
        create_markdown_artifact(key=f"{self.variant}-manifest", markdown=markdown,
                                 description=f"{self.variant} {version}")


# -- the schedule -------------------------------------------------------------------------------


def upcoming_runs(deployment: str, *, wait_s: float = 30.0, limit: int = 3) -> list[datetime]:
    """The start times of the next runs the server's scheduler created for `deployment`.

    Args:
        deployment: "flow-name/deployment-name", e.g. "mitra-build/scheduled".
        wait_s: how long to give the scheduler after a deploy (it looks at new deployments every 5 s).
        limit: how many runs to return at most.

    Returns:
        Their expected start times, earliest first; empty when the scheduler made none in time.
    """
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [deployment_id]}),
                flow_run_filter=FlowRunFilter(state={"type": {"any_": [StateType.SCHEDULED]}}),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=limit,
            )
            if runs or time.monotonic() > deadline:
                return [run.expected_start_time for run in runs]
            time.sleep(2)


# -- the orchestrator's own logs ---------------------------------------------------------------

_RECORD_START = re.compile(r"(?m)^(?=\d\d:\d\d:\d\d\.\d+ \| )")  # Prefect's "12:49:02.490 | ERROR | ..."
_EXCEPTION_LINE = re.compile(r"(?m)^[A-Za-z_][\w.]*(?:Error|Exception)\b.*$")


@dataclass(frozen=True)
class LogFailures:
    """The tracebacks in a Prefect server or worker log, each as its whole log record.

    Attributes:
        tolerated: worker heartbeats SQLite refused to write under load ("database is locked"): Prefect
            writes the next beat anyway, and a busy server wants PostgreSQL, not a fix here.
        failures: every other traceback: a green run over a broken server or worker is not green.
    """

    tolerated: list[str]
    failures: list[str]


def log_failures(text: str) -> LogFailures:
    """Sort the tracebacks of a Prefect server or worker log (what scripts/demo.sh and the tests check)."""
    tolerated: list[str] = []
    failures: list[str] = []
    for record in _RECORD_START.split(text):
        if "Traceback (most recent call last)" not in record:
            continue
        errors = _EXCEPTION_LINE.findall(record)
        # Only a record that is a heartbeat write and whose every exception is the lock: another traceback
        # printed without a timestamp lands in the record before it and must not hide behind one.
        heartbeat_locked = ("heartbeat persistence failed" in record.split("\n", 1)[0] and errors
                            and all("database is locked" in error for error in errors))
        (tolerated if heartbeat_locked else failures).append(record)
    return LogFailures(tolerated=tolerated, failures=failures)


def _check_logs(paths: list[str]) -> int:
    broken = 0
    for path in paths:
        found = log_failures(Path(path).read_text(errors="replace"))
        if found.tolerated:
            print(f"    note: {len(found.tolerated)} worker heartbeat write(s) in {path} met SQLite's 'database is "
                  "locked' under load (Prefect writes the next beat; a busy server wants PostgreSQL)")
        for record in found.failures:
            errors = _EXCEPTION_LINE.findall(record)
            print(f"!! {path}: {record.splitlines()[0][:160]} -> {errors[-1] if errors else '(no exception line)'}",
                  file=sys.stderr)
            broken += 1
    return 1 if broken else 0


USAGE = ("usage: python -m mitra_model.pipeline.plumbing upcoming FLOW/DEPLOYMENT\n"
         "       python -m mitra_model.pipeline.plumbing check-logs LOG [LOG ...]")


def main(argv: list[str]) -> int:
    """`upcoming DEPLOYMENT`: print its next runs; exit 1 when there are none, which means the server's
    scheduler is broken (deploy.sh and the demo fail on it). `check-logs LOG...`: exit 1 when a Prefect
    server or worker log holds a traceback other than the tolerated heartbeat lock (log_failures)."""
    if len(argv) >= 2 and argv[0] == "check-logs":
        return _check_logs(argv[1:])
    if len(argv) != 2 or argv[0] != "upcoming":
        print(USAGE, file=sys.stderr)
        return 2
    runs = upcoming_runs(argv[1])
    if not runs:
        print(f"!! the Prefect server scheduled no run of {argv[1]} within 30 s of its deploy: its scheduler is "
              "broken; read the server's log (Prefect 3.8 with SQLAlchemy 2.1 fails this way on every tick)",
              file=sys.stderr)
        return 1
    print(f"==> {argv[1]}: next runs " + ", ".join(run.isoformat(timespec="minutes") for run in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
