"""The verification matrix on a real Dask LocalCluster (2 worker processes) equals the in-process run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from prefect import flow, task, unmapped
from prefect.testing.utilities import prefect_test_harness

import flows.mitra_build as flow_module
from mitra_model.build import ArtifactSpec
from mitra_model.config import ExecutionConfig
from mitra_model.snapshot import load_model
from mitra_model.verify import make_report, verify_onnx


@task
def worker_pid(_: int) -> int:
    time.sleep(0.3)  # long enough that both workers get some
    return os.getpid()


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=240):
        yield


def test_matrix_on_a_local_cluster_equals_in_process(tiny_snapshots, tiny_exports, build_config) -> None:
    snapshot, onnx_path = tiny_snapshots["classification"].path, tiny_exports["classification"].path
    cells = list(build_config.verification.cells)
    tolerance = build_config.verification.tolerance("fp32")
    spec = ArtifactSpec("fp32", "model.onnx", "fp32", "portable")
    runner = flow_module.task_runner(ExecutionConfig(task_runner="dask", dask_workers=2))
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs["processes"] is True

    @flow(task_runner=runner)
    def matrix_on_dask() -> tuple[list, set[int]]:
        futures = flow_module.verify_cell.map(unmapped(snapshot), unmapped(onnx_path), cells, unmapped(spec),
                                              unmapped(tolerance), unmapped(build_config.verification.seed))
        return [f.result() for f in futures], {f.result() for f in worker_pid.map(range(6))}

    distributed_results, pids = matrix_on_dask()
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one

    model, _ = load_model(snapshot)
    local = verify_onnx(model, onnx_path, cells=cells, tolerance=tolerance, seed=build_config.verification.seed)
    remote = make_report(Path(onnx_path), precision="fp32", tolerance=tolerance, results=distributed_results)
    assert [c.name for c in remote.cells] == [c.name for c in local.cells]
    for a, b in zip(remote.cells, local.cells):
        assert a.passed == b.passed and a.failures == b.failures
        assert a.max_abs_err == pytest.approx(b.max_abs_err, abs=1e-7)
        assert a.argmax_agreement == b.argmax_agreement
    assert remote.passed
