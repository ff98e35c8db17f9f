"""A real `prefect server start` (SQLite) and process workers for the deployment tests, each in its own
process group with its log in the test's folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mitra_model.pipeline.plumbing import log_failures

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (prefect.yaml and scripts/deploy.sh)
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a server, worker or CLI call that talks to the server on `port`."""
    return {
        **os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
        **extra,
    }


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=REPO_ROOT)


def start_server(env: dict[str, str], log: Path, *, timeout_s: float = 240) -> subprocess.Popen:
    """`prefect server start` on the port of env's PREFECT_API_URL, returned once /health answers."""
    port = env["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0]
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port], env, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    stop(server)
    raise AssertionError(f"Prefect server not healthy after {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return start([str(BIN / "prefect"), "worker", "start", "--pool", "mitra-build-pool"], env, log)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def deploy(env: dict[str, str]) -> subprocess.CompletedProcess:
    """scripts/deploy.sh, as an operator runs it."""
    return subprocess.run([str(REPO_ROOT / "scripts" / "deploy.sh")], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def failures(log: Path) -> list[str]:
    """Each traceback in a server or worker log, as its whole record (so that a failing assertion shows
    which part of Prefect raised what), but SQLite's transient heartbeat lock (plumbing.log_failures)."""
    return log_failures(log.read_text(errors="replace")).failures
