"""prefect.yaml end to end: a real `prefect server start` (SQLite), scripts/deploy.sh, a process
worker, `prefect deployment run 'mitra-build/build' --watch` on a tiny local snapshot, then the
scheduled deployment finding it up to date, and the README's `-p revision=1234567` trap."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from configs import write_config
from mitra_model.snapshot import write_synthetic_snapshot

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} not healthy after {seconds:.0f} s")


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=REPO_ROOT)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def test_deployment_runs_end_to_end(tmp_path: Path, build_config) -> None:
    snapshot = tmp_path / "snapshot"
    write_synthetic_snapshot(snapshot, task="regression", size_name="tiny", size=build_config.sizes["tiny"], seed=5)
    # portable only, two cells, no store: the point here is the Prefect plumbing
    config = write_config(tmp_path / "config.toml", artifacts={"flavours": ["portable"], "precisions": []})
    port = _free_port()
    env = {
        **os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MITRA_BUILD_CONFIG": str(config),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                    tmp_path / "server.log")
    worker = None
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/api/health", 240)
        deployed = subprocess.run([str(REPO_ROOT / "scripts" / "deploy.sh")], env=env, cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "cron '17 3 * * *'" in deployed.stdout
        worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", "mitra-build-pool"], env, tmp_path / "worker.log")
        artifacts = tmp_path / "artifacts"
        params = {"snapshot": str(snapshot), "variants": ["mitra-regressor"], "publish": False,
                  "artifacts_root": str(artifacts)}
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "mitra-build/build", "--params", json.dumps(params),
             "--watch", "--watch-timeout", "400"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=450,
        )
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "worker.log").read_text()[-3000:]
        manifests = list((artifacts / "builds" / "mitra-regressor").glob("*/manifest.json"))
        assert len(manifests) == 1
        manifest = json.loads(manifests[0].read_text())
        assert manifest["source"]["synthetic"] is True and manifest["verification"]["fp32"]["passed"] is True

        # The scheduled deployment with nothing changed: up to date, no second build.
        started = time.monotonic()
        scheduled = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "mitra-build/scheduled", "--params", json.dumps(params),
             "--watch", "--watch-timeout", "300"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=350,
        )
        assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
        assert time.monotonic() - started < 120
        assert f"mitra-regressor up-to-date {manifest['version']}" in (tmp_path / "worker.log").read_text()
        assert len(list((artifacts / "builds" / "mitra-regressor").glob("*/manifest.json"))) == 1

        # The documented trap: -p parses values as JSON, so a commit-like revision arrives as a number.
        trap = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "mitra-build/build", "-p", "revision=1234567"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
        assert trap.returncode != 0 and "revision" in trap.stdout + trap.stderr, trap.stdout + trap.stderr
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
