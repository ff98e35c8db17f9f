"""The schedule proved where an operator meets it: a real Prefect server's scheduler creates a run of
`mitra-build/scheduled` from the configured cron, a process worker executes it, and it finds the
variant built before up to date and re-signs its pointer (TUF's timestamp role). Nothing here
triggers the scheduled deployment by hand."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from configs import write_config
from prefect_servers import BIN, deploy, failures, free_port, prefect_env, start_server, start_worker, stop

from mitra_model.model.snapshot import write_synthetic_snapshot
from mitra_model.release import layout
from mitra_model.release.keys import generate_keypair
from mitra_model.release.pointer import verify_pointer

VARIANT = "mitra-regressor"


def _api(env: dict[str, str], path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _auto_scheduled_runs(env: dict[str, str]) -> list[dict[str, Any]]:
    runs = _api(env, "flow_runs/filter", {"deployments": {"name": {"any_": ["scheduled"]}}, "sort": "EXPECTED_START_TIME_ASC"})
    return [run for run in runs if run["auto_scheduled"]]


def test_the_server_schedules_the_rebuild_and_a_worker_runs_it(tmp_path: Path, build_config, s3_store,
                                                                s3_client) -> None:
    snapshot = tmp_path / "weights"
    write_synthetic_snapshot(snapshot, task="regression", size_name="tiny", size=build_config.sizes["tiny"], seed=5)
    generate_keypair(tmp_path / "release.pem", tmp_path / "release.pub")
    # A cron that fires every minute, set through the configuration as an operator would; a variant
    # from a local folder; portable fp32 on two cells: the point here is the orchestration.
    config = write_config(
        tmp_path / "config.toml", schedule={"cron": "* * * * *", "timezone": "UTC"},
        variants=[{"name": VARIANT, "path": str(snapshot), "task": "regression"}],
        artifacts={"flavours": ["portable"], "precisions": [], "support_cache": False}, consumers={"node": False},
        store={"bucket": s3_store.bucket, "prefix": s3_store.prefix, "endpoint_url": s3_store.endpoint_url},
    )
    env = prefect_env(tmp_path / "prefect", free_port(), MITRA_BUILD_CONFIG=str(config),
                      MITRA_BUILD_ARTIFACTS=str(tmp_path / "artifacts"),
                      MITRA_SIGNING_KEY_FILE=str(tmp_path / "release.pem"),
                      PREFECT_WORKER_QUERY_SECONDS="2")  # the worker polls every 2 s, not 10
    trusted = [(tmp_path / "release.pub").read_bytes()]

    def pointer():
        raw = s3_client.get_object(Bucket=s3_store.bucket, Key=layout.pointer_key(s3_store.prefix, VARIANT))
        return verify_pointer(raw["Body"].read(), trusted, datetime.now(timezone.utc))

    server = start_server(env, tmp_path / "server.log")
    worker = None
    try:
        # Built and published before the schedule exists, so the scheduled run has nothing to build.
        built = subprocess.run([str(BIN / "mitra-build"), "run"], env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=400)
        assert built.returncode == 0, built.stdout + built.stderr
        first = pointer()
        assert list((tmp_path / "artifacts" / "builds" / VARIANT).glob("*/manifest.json"))  # $MITRA_BUILD_ARTIFACTS

        deployed = deploy(env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "cron '* * * * *' UTC" in deployed.stdout and "mitra-build/scheduled: next runs " in deployed.stdout
        worker = start_worker(env, tmp_path / "worker.log")

        # The next minute's auto-scheduled run, picked up by the worker and completed.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = [run for run in _auto_scheduled_runs(env) if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
            if done:
                break
            time.sleep(3)
        else:
            raise AssertionError("no auto-scheduled run of mitra-build/scheduled finished within 180 s:\n"
                                 + (tmp_path / "worker.log").read_text()[-3000:])
        run = done[0]
        worker_log = (tmp_path / "worker.log").read_text()
        assert run["state_type"] == "COMPLETED", worker_log[-3000:]
        assert run["parameters"] == {}  # what the deployment gives it: the configuration decides everything
        assert f"summary: {VARIANT} up-to-date" in worker_log
        renewed = pointer()
        assert renewed.manifest_version == first.manifest_version and renewed.expires > first.expires
        assert f"re-signed {VARIANT}'s latest.json" in worker_log
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
    for log in ("server.log", "worker.log"):
        assert not failures(tmp_path / log), f"{log}: {failures(tmp_path / log)[0]}"
