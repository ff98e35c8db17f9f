"""The verification matrix on a real Dask LocalCluster (2 worker processes) equals the in-process run,
and with [execution] result_storage = "store" the cells' results travel through the S3 bucket (one
worker process there: what is tested is the storage, and each worker imports the whole toolchain)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from configs import write_config
from prefect import flow, task, unmapped
from s3_fixtures import list_keys

import mitra_model.pipeline.flow as flow_module
from mitra_model.build.config import ExecutionConfig, load_config
from mitra_model.build.verify import make_report, verify_onnx
from mitra_model.model.snapshot import load_model
from mitra_model.pipeline import plumbing


@task
def worker_pid(_: int) -> int:
    time.sleep(0.3)  # long enough that both workers get some
    return os.getpid()


pytestmark = pytest.mark.usefixtures("prefect_api")


def test_matrix_on_a_local_cluster_equals_in_process(tiny_snapshots, tiny_exports, build_config, tmp_path: Path) -> None:
    snapshot, onnx_path = tiny_snapshots["classification"].path, tiny_exports["classification"]
    cells = list(build_config.verification.cells)
    tolerance = build_config.verification.tolerance("fp32")
    runner = plumbing.task_runner(ExecutionConfig(task_runner="dask", dask_workers=2))
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs["processes"] is True

    @flow(task_runner=runner)
    def matrix_on_dask() -> tuple[list, set[int]]:
        futures = flow_module.verify_cell.map(unmapped(snapshot), unmapped((onnx_path,)), cells, unmapped("fp32"),
                                              unmapped("graph"), unmapped(tolerance),
                                              unmapped(build_config.verification.seed), unmapped(tmp_path / "reference"))
        return [f.result() for f in futures], {f.result() for f in worker_pid.map(range(6))}

    distributed_results, pids = matrix_on_dask()
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one

    model, _ = load_model(snapshot)
    local = verify_onnx(model, onnx_path, cells=cells, tolerance=tolerance, seed=build_config.verification.seed)
    remote = make_report(Path(onnx_path), precision="fp32", tolerance=tolerance, results=distributed_results)
    assert [c.name for c in remote.cells] == [c.name for c in local.cells]
    for a, b in zip(remote.cells, local.cells):
        assert a.passed == b.passed and a.failures == b.failures
        # Dask workers run one thread each (OMP_NUM_THREADS=1), this process uses every core: the float
        # reductions are ordered differently, so errors agree to float noise, verdicts exactly.
        assert a.max_abs_err == pytest.approx(b.max_abs_err, abs=1e-6)
        assert a.argmax_agreement == b.argmax_agreement
    assert remote.passed


def test_the_flow_runs_its_cells_on_dask_and_persists_their_results_to_the_store(
        tmp_path: Path, tiny_snapshots, s3_store, s3_client) -> None:
    """The real flow with task_runner = "dask" and result_storage = "store": every cell's result is an
    object in the bucket, and reading it back gives what the build recorded."""
    from prefect._internal.result_records import ResultRecord

    config = write_config(
        tmp_path / "config.toml",
        store={"bucket": s3_store.bucket, "prefix": s3_store.prefix, "endpoint_url": s3_store.endpoint_url},
        variants=[{"name": "tiny-classifier", "repo_id": "acme/tiny", "task": "classification"}],
        artifacts={"flavours": ["portable"], "precisions": [], "support_cache": False},
        execution={"task_runner": "dask", "dask_workers": 1, "result_storage": "store"},
    )
    build_config = load_config(config)

    result = flow_module.mitra_build(config_path=str(config), artifacts_root=str(tmp_path / "artifacts"), publish=False,
                                     snapshot=str(tiny_snapshots["classification"].path))[0]
    assert result["status"] == "built"

    keys = [k for k in list_keys(s3_client, s3_store) if k.startswith(s3_store.results_folder() + "/verify-cell/")]
    cells = {cell.name for cell in build_config.verification.cells}
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == sorted(cells), list_keys(s3_client, s3_store)
    recorded = {c["name"]: c for c in json.loads((Path(result["build_dir"]) / "verification-fp32.json").read_text())["cells"]}
    for key in keys:
        body = s3_client.get_object(Bucket=s3_store.bucket, Key=key)["Body"].read()
        cell = ResultRecord.deserialize(body).result
        assert cell.passed and cell.max_abs_err == recorded[cell.name]["max_abs_err"]
