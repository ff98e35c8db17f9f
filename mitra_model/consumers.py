"""Prove the artifacts where they are consumed: onnxruntime-node, and onnxruntime-web in a browser.

A *fixture* is a fixed set of inputs in the consumer I/O contract (a few shapes, ties, padded support
rows) together with what Python ONNX Runtime outputs for one model file, or for the support-cache
pair (encode-support, then predict-query on its outputs: how a fit-once / predict-many consumer runs
it). `check_in_node` runs the fixture through onnxruntime-node (`consumers/node-check.mjs`);
`check_in_browser` serves a small page (`consumers/browser/`) with onnxruntime-web's WASM backend
from a 127.0.0.1 HTTP server and drives headless Chromium through it (`consumers/browser-check.mjs`,
playwright-core with the system Chromium: no browser download). Both compare every case's output with Python's within
`tolerance_abs` and return a `ConsumerResult` naming each case's max abs error.

The JS packages are pinned in `consumers/package-lock.json`; `ensure_node_modules` installs them with
`npm ci` (and `ONNXRUNTIME_NODE_INSTALL=skip`: onnxruntime-node's install script otherwise tries to
download CUDA binaries; the CPU binaries ship in the package).

Fixture format (`fixture.json`, read by `consumers/lib/fixture.mjs`):
    {"schema": "mitra-build/consumer-fixture/v1", "model_sha256", "task", "seed",
     "cases": [{"name", "shape": [B, S, Q, F], "data", "padded_support_rows",
                "inputs": {name: TENSOR}, "expected": TENSOR}]}
    For a pair, "model_sha256" is the encoder's and "predict_sha256" the predictor's.
    TENSOR = {"dtype": "float32" | "int64" | "bool", "shape": [...], "data": base64 of the
              little-endian bytes (bool: one byte per element)}
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import REPO_ROOT, Cell
from .errors import ConfigError, VerificationError
from .export import INPUT_NAMES, OUTPUT_NAME
from .fileutil import sha256_file, write_bytes_atomic
from .inputs import make_inputs
from .model import MitraConfig
from .support_cache import ENCODE_INPUT_NAMES
from .verify import onnx_session

CONSUMERS_DIR = REPO_ROOT / "consumers"
FIXTURE_SCHEMA_ID = "mitra-build/consumer-fixture/v1"
FIXTURE_NAME = "fixture.json"
NODE_CHECK_SCRIPT = CONSUMERS_DIR / "node-check.mjs"
BROWSER_CHECK_SCRIPT = CONSUMERS_DIR / "browser-check.mjs"
NODE_RUNTIME = "onnxruntime-node"
WEB_RUNTIME = "onnxruntime-web"
NPM_CI_COMMAND = "cd consumers && ONNXRUNTIME_NODE_INSTALL=skip npm ci"
CHROMIUM_INSTALL_COMMAND = "apt-get update && apt-get install -y chromium"
NODE_HINT = "install Node.js 20 or newer with npm (Debian 12's own `nodejs` package is 18: too old for playwright-core and @aws-sdk/client-s3)"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MIN_NODE_MAJOR = 20  # consumers/package.json "engines"; playwright-core and @aws-sdk/client-s3 need it

# The fixture: small shapes (the browser runs the WASM backend single-threaded), each dimension
# different from the export's trace shape, with every column type, heavy ties, one support row,
# and a batch whose items have different numbers of padded support rows.
DEFAULT_CASES: tuple[Cell, ...] = (
    Cell(name="base", batch=1, n_support=24, n_query=6, n_features=5, data="mixed"),
    Cell(name="integer-ties", batch=1, n_support=30, n_query=8, n_features=4, data="integer_ties"),
    Cell(name="padded-batch", batch=3, n_support=20, n_query=5, n_features=5, data="mixed", padded_support_rows=7),
    Cell(name="one-support-row", batch=1, n_support=1, n_query=3, n_features=3, data="mixed"),
)
DEFAULT_SEED = 20240

# The bounds live in config/mitra-build.toml ([consumers.tolerances]). Measured |consumer - Python
# ORT| per output value: onnxruntime-node runs
# the same CPU kernels as Python ONNX Runtime and matched bit for bit (0.0) for every artifact, tiny
# and full-size. onnxruntime-web's WASM kernels round differently; measured max over the default
# cases, tiny / full-size (dim 512, 12 layers) synthetic classifier: fp32 6e-7 / 1.1e-6 (portable
# and optimized alike), fp16 1.5e-4 / 4e-4, int8 5.5e-3 / 2.3e-2. The int8 gap is how dynamically
# quantized activations round: web int8 is as close to fp32 as Python's int8 is (1.7e-2 vs 1.8e-2 at
# full size), the numbers just differ; the int8 verification bound vs PyTorch is 1.0.


@dataclass(frozen=True)
class CaseResult:
    """One fixture case in one runtime.

    Attributes:
        max_abs_err: largest |runtime - Python ORT| over the output; inf when the output held NaN/inf
            or the case did not run.
        error: why the case did not run or could not be compared (None when it was compared).
    """

    name: str
    shape: tuple[int, ...]  # (batch, n_support, n_query, n_features)
    max_abs_err: float
    seconds: float | None
    error: str | None


@dataclass(frozen=True)
class ConsumerResult:
    """A model file checked in one consumer runtime against Python ONNX Runtime's outputs.

    Attributes:
        runtime / runtime_version: the npm package and its installed version (from node_modules).
        backend: "cpu" (onnxruntime-node) or "wasm" (onnxruntime-web).
        host: where it ran, e.g. "node v20.20.2" or "Chromium 156.0.8078.79 (headless)".
        onnx_path / onnx_sha256: the model file; for the support-cache pair, the encoder, with the
            predictor in predict_path / predict_sha256 (None for a single file).
        cases: per-case errors, in fixture order.
        failures: one line per failed case (empty when passed), or why nothing ran.
    """

    runtime: str
    runtime_version: str
    backend: str
    host: str
    onnx_path: str
    onnx_sha256: str
    fixture_model_sha256: str
    tolerance_abs: float
    cases: tuple[CaseResult, ...]
    failures: tuple[str, ...]
    seconds: float
    predict_path: str | None = None
    predict_sha256: str | None = None
    fixture_predict_sha256: str | None = None

    @property
    def files(self) -> str:
        """The checked file's name, or the pair's as "encoder + predictor"."""
        return _names(Path(self.onnx_path), None if self.predict_path is None else Path(self.predict_path))

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_err(self) -> float:
        return max((c.max_abs_err for c in self.cases), default=math.inf)

    @property
    def case_errors(self) -> dict[str, float]:
        return {c.name: c.max_abs_err for c in self.cases}

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready summary, e.g. for a manifest's `checked_in` list (inf becomes None)."""
        return {
            "runtime": self.runtime,
            "version": self.runtime_version,
            "backend": self.backend,
            "host": self.host,
            "passed": self.passed,
            "tolerance_abs": self.tolerance_abs,
            "max_abs_err": _finite(self.max_abs_err),
            "cases": {c.name: _finite(c.max_abs_err) for c in self.cases},
            "onnx_sha256": self.onnx_sha256,
            **({"predict_sha256": self.predict_sha256} if self.predict_sha256 else {}),
        }

    def to_json(self) -> str:
        payload = asdict(self)
        payload["passed"] = self.passed
        for case in payload["cases"]:
            case["max_abs_err"] = _finite(case["max_abs_err"])
        return json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _finite(value: float | None) -> float | None:
    """JSON has no inf/NaN: a case that did not run or gave NaN is recorded as null."""
    return value if value is not None and math.isfinite(value) else None


def require_passed(result: ConsumerResult) -> ConsumerResult:
    """Raise `VerificationError` naming every failed case of `result`; return it when it passed."""
    if result.passed:
        return result
    mismatch_hint = ""
    pairs = [(result.fixture_model_sha256, result.onnx_sha256, result.onnx_path),
             (result.fixture_predict_sha256, result.predict_sha256, result.predict_path)]
    mismatched = [(want, got, Path(path).name) for want, got, path in pairs if path is not None and want != got]
    if mismatched:
        mismatch_hint = " (note: " + "; ".join(
            f"the fixture's expected outputs come from a file with sha256 {(want or '?')[:12]}, {name} has {got[:12]}"
            for want, got, name in mismatched) + ")"
    raise VerificationError(
        f"{result.files} in {result.runtime} {result.runtime_version} ({result.backend}, {result.host}) "
        f"does not match Python ONNX Runtime within {result.tolerance_abs:.1e}: "
        + "; ".join(result.failures) + mismatch_hint,
        list(result.failures),
    )


# -- the fixture ---------------------------------------------------------------------------------


def _tensor(array: np.ndarray) -> dict[str, Any]:
    dtypes = {np.dtype(np.float32): ("float32", "<f4"), np.dtype(np.int64): ("int64", "<i8"), np.dtype(bool): ("bool", "u1")}
    if array.dtype not in dtypes:
        raise ValueError(f"fixture tensors are float32, int64 or bool, got {array.dtype}")
    name, wire = dtypes[array.dtype]
    data = np.ascontiguousarray(array.astype(wire, copy=False)).tobytes()
    return {"dtype": name, "shape": list(array.shape), "data": base64.b64encode(data).decode("ascii")}


def python_ort_outputs(onnx_path: Path, predict_path: Path | None = None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """What Python ONNX Runtime outputs for the consumer I/O contract's inputs: one model file, or the
    support-cache pair (`onnx_path` the encoder; its outputs go to `predict_path` by name with x_query)."""
    session = onnx_session(Path(onnx_path), threads=1)
    if predict_path is None:
        return lambda inputs: session.run([OUTPUT_NAME], {name: inputs[name] for name in INPUT_NAMES})[0]
    predictor = onnx_session(Path(predict_path), threads=1)
    cache_names = [output.name for output in session.get_outputs()]

    def through_the_pair(inputs: dict[str, np.ndarray]) -> np.ndarray:
        cache = dict(zip(cache_names, session.run(None, {name: inputs[name] for name in ENCODE_INPUT_NAMES})))
        return predictor.run([OUTPUT_NAME], {**cache, "x_query": inputs["x_query"]})[0]

    return through_the_pair


def write_fixture(
    onnx_path: Path,
    model_config: MitraConfig,
    out_dir: Path,
    *,
    predict_path: Path | None = None,
    cases: Sequence[Cell] = DEFAULT_CASES,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write `out_dir/fixture.json`: the cases' inputs and Python ONNX Runtime's outputs for `onnx_path`.

    Args:
        onnx_path: the model whose outputs become the expected values (the encoder, for a pair).
        model_config: its config (decides the label dtype: int64 classes or float32 values).
        out_dir: folder to write into (created if needed).
        predict_path: the support-cache pair's predictor; the expected values are then
            predict_query(encode_support(...), x_query).
        cases: shapes and table types (name, batch, n_support, n_query, n_features, data,
            padded_support_rows); the default covers ties, one support row and padded rows.
        seed: the same (seed, cases) always gives the same inputs.

    Returns:
        The path of the fixture file.
    """
    onnx_path = Path(onnx_path)
    run = python_ort_outputs(onnx_path, predict_path)
    records = []
    for case in cases:
        inputs = make_inputs(
            case.as_tuple(), config=model_config, data=case.data, padded_support_rows=case.padded_support_rows,
            seed=seed, salt=case.name,
        )
        records.append({
            "name": case.name,
            "shape": list(case.as_tuple()),
            "data": case.data,
            "padded_support_rows": case.padded_support_rows,
            "inputs": {name: _tensor(inputs[name]) for name in INPUT_NAMES},
            "expected": _tensor(np.asarray(run(inputs), dtype=np.float32)),
        })
    doc = {
        "schema": FIXTURE_SCHEMA_ID,
        "model_sha256": sha256_file(onnx_path),
        **({"predict_sha256": sha256_file(Path(predict_path))} if predict_path is not None else {}),
        "task": model_config.task.value,
        "seed": seed,
        "cases": records,
    }
    path = Path(out_dir) / FIXTURE_NAME
    write_bytes_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def read_fixture(fixture: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(fixture).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"fixture {fixture} does not exist: make one with mitra_model.consumers.write_fixture") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"fixture {fixture} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != FIXTURE_SCHEMA_ID or not doc.get("cases"):
        raise ConfigError(f"{fixture} is not a consumer fixture (schema {FIXTURE_SCHEMA_ID!r} with at least one case)")
    return doc


# -- tools: node, npm packages, chromium ---------------------------------------------------------


def find_node() -> Path:
    """The `node` executable (Node.js >= MIN_NODE_MAJOR), or ConfigError saying what to install."""
    found = shutil.which("node")
    if found is None:
        raise ConfigError(f"Node.js is not installed (no `node` on PATH): {NODE_HINT}")
    version = node_version(Path(found))
    if int(version.lstrip("v").split(".")[0]) < MIN_NODE_MAJOR:
        raise ConfigError(f"{found} is Node.js {version}; the consumer checks need Node.js >= {MIN_NODE_MAJOR}: {NODE_HINT}")
    return Path(found)


@functools.cache
def node_version(node: Path) -> str:
    return subprocess.run([str(node), "--version"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def _pinned_dependencies() -> dict[str, str]:
    return json.loads((CONSUMERS_DIR / "package.json").read_text(encoding="utf-8"))["dependencies"]


def package_version(package: str) -> str | None:
    """The version of `package` installed in consumers/node_modules, or None."""
    try:
        return json.loads((CONSUMERS_DIR / "node_modules" / package / "package.json").read_text(encoding="utf-8"))["version"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def ensure_node_modules(*, timeout_s: float = 600) -> Path:
    """Make consumers/node_modules hold exactly the pinned packages; run `npm ci` when it does not.

    Returns:
        The node_modules folder.

    Raises:
        ConfigError: node or npm is missing, or `npm ci` failed (its output's tail is in the message).
    """
    find_node()
    modules = CONSUMERS_DIR / "node_modules"
    pinned = _pinned_dependencies()
    if all(package_version(name) == version for name, version in pinned.items()):
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError(f"npm is not installed: {NODE_HINT}; then run `{NPM_CI_COMMAND}`")
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip", "npm_config_fund": "false", "npm_config_audit": "false"}
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=CONSUMERS_DIR, env=env, capture_output=True, text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"`{NPM_CI_COMMAND}` did not finish in {timeout_s:.0f} s; run it by hand to see why") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ConfigError(f"`{NPM_CI_COMMAND}` failed (exit {done.returncode}):\n{tail}")
    missing = [f"{name}@{version}" for name, version in pinned.items() if package_version(name) != version]
    if missing:
        raise ConfigError(f"`npm ci` in {CONSUMERS_DIR} did not install {', '.join(missing)}: is package-lock.json in sync with package.json?")
    return modules


def find_chromium(explicit: Path | str | None = None) -> Path:
    """The Chromium executable (`explicit`, else the first of CHROMIUM_NAMES on PATH).

    Raises:
        ConfigError: none found; the message gives the Debian install command.
    """
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"Chromium executable {path} does not exist or is not executable")
        return path
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return Path(found)
    raise ConfigError(
        f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH): install it with "
        f"`{CHROMIUM_INSTALL_COMMAND}` (Debian's package; no browser download is needed or used)"
    )


# -- running a check script ----------------------------------------------------------------------


def _run_script(args: list[str], *, timeout_s: float, what: str) -> dict[str, Any]:
    """Run a node script in its own process group; return its JSON report (stdout's last line).

    On timeout the whole group (node and any browser it started) is killed.
    """
    process = subprocess.Popen(
        args, cwd=CONSUMERS_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise VerificationError(f"{what} did not finish in {timeout_s:.0f} s (killed)", [f"{what}: timed out"]) from None
    finally:
        if process.poll() is None:  # an exception other than the timeout: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise VerificationError(
            f"{what} exited {process.returncode} without a report:\n{tail}", [f"{what}: crashed (exit {process.returncode})"]
        ) from None
    if process.returncode not in (0, 1):
        raise VerificationError(f"{what} failed (exit {process.returncode}): {report}", [f"{what}: exit {process.returncode}"])
    return report


def _read_fixture_for(fixture: Path, predict_path: Path | None) -> dict[str, Any]:
    """The fixture, refused when it was written for a single file and a pair is checked, or the reverse."""
    doc = read_fixture(fixture)
    if predict_path is not None and "predict_sha256" not in doc:
        raise ConfigError(f"fixture {fixture} holds one model file's outputs, not the support-cache pair's: "
                          "write it with write_fixture(encoder, ..., predict_path=predictor)")
    if predict_path is None and "predict_sha256" in doc:
        raise ConfigError(f"fixture {fixture} holds the support-cache pair's outputs: pass predict_path (the predictor) too")
    return doc


def _judge(
    report: dict[str, Any], *, runtime: str, backend: str, host: str, onnx_path: Path, predict_path: Path | None,
    fixture_doc: dict[str, Any], tolerance_abs: float, seconds: float,
) -> ConsumerResult:
    cases: list[CaseResult] = []
    failures: list[str] = []
    if report.get("error"):
        failures.append(f"could not run: {report['error']}")
    expected_names = [c["name"] for c in fixture_doc["cases"]]
    for record in report.get("cases") or []:
        err = record.get("max_abs_err")
        value = float(err) if err is not None and record.get("error") is None else math.inf
        cases.append(CaseResult(
            name=record["name"], shape=tuple(record.get("shape") or ()), max_abs_err=value,
            seconds=record.get("seconds"), error=record.get("error"),
        ))
        if record.get("error"):
            failures.append(f"case {record['name']!r}: {record['error']}")
        elif err is None:
            failures.append(f"case {record['name']!r}: output has {record.get('non_finite')} NaN/inf values")
        elif value > tolerance_abs:
            failures.append(f"case {record['name']!r}: max abs error {value:.3e} > tolerance {tolerance_abs:.1e}")
    if not report.get("error") and [c.name for c in cases] != expected_names:
        failures.append(f"ran cases {[c.name for c in cases]}, the fixture has {expected_names}")
    return ConsumerResult(
        runtime=runtime, runtime_version=package_version(runtime) or str(report.get("version")), backend=backend, host=host,
        onnx_path=str(onnx_path), onnx_sha256=sha256_file(onnx_path), fixture_model_sha256=fixture_doc["model_sha256"],
        tolerance_abs=tolerance_abs, cases=tuple(cases), failures=tuple(failures), seconds=seconds,
        predict_path=None if predict_path is None else str(predict_path),
        predict_sha256=None if predict_path is None else sha256_file(predict_path),
        fixture_predict_sha256=fixture_doc.get("predict_sha256"),
    )


def _names(onnx_path: Path, predict_path: Path | None) -> str:
    return onnx_path.name if predict_path is None else f"{onnx_path.name} + {predict_path.name}"


def _finish(result: ConsumerResult, raise_on_failure: bool) -> ConsumerResult:
    return require_passed(result) if raise_on_failure else result


def check_in_node(
    onnx_path: Path,
    fixture: Path,
    *,
    tolerance_abs: float,
    predict_path: Path | None = None,
    timeout_s: float = 120,
    threads: int = 1,
    raise_on_failure: bool = True,
) -> ConsumerResult:
    """Run every fixture case through onnxruntime-node and compare with Python ONNX Runtime.

    Args:
        onnx_path: the model file (the one the fixture was written from, normally); for the
            support-cache pair, the encoder.
        fixture: a file from `write_fixture` (with the same predict_path for a pair).
        predict_path: the pair's predictor: each case runs encode-support, then predict-query on
            its outputs, in onnxruntime-node.
        tolerance_abs: largest allowed |node - python| per output value.
        timeout_s: the whole check (model load included) is killed after this.
        threads: onnxruntime-node's intra-op threads.
        raise_on_failure: False returns a failed result instead of raising (to record a matrix).

    Raises:
        VerificationError: a case exceeded the tolerance or failed to run, the model did not load,
            or the check did not finish; the message names each failed case.
        ConfigError: node or the npm packages are missing (the message gives the install command), or
            the fixture was written for a single file and a pair is checked (or the reverse).
    """
    onnx_path, fixture = Path(onnx_path).resolve(), Path(fixture).resolve()
    predict_path = None if predict_path is None else Path(predict_path).resolve()
    fixture_doc = _read_fixture_for(fixture, predict_path)
    node = find_node()
    ensure_node_modules()
    started = time.perf_counter()
    pair_args = [] if predict_path is None else ["--predict", str(predict_path)]
    report = _run_script(
        [str(node), str(NODE_CHECK_SCRIPT), "--model", str(onnx_path), *pair_args, "--fixture", str(fixture),
         "--threads", str(threads)],
        timeout_s=timeout_s, what=f"{NODE_RUNTIME} check of {_names(onnx_path, predict_path)}",
    )
    result = _judge(
        report, runtime=NODE_RUNTIME, backend="cpu", host=f"node {node_version(node)}", onnx_path=onnx_path,
        predict_path=predict_path, fixture_doc=fixture_doc, tolerance_abs=tolerance_abs,
        seconds=time.perf_counter() - started,
    )
    return _finish(result, raise_on_failure)


# -- the browser ---------------------------------------------------------------------------------

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",  # required for WebAssembly.instantiateStreaming
    ".json": "application/json",
    ".map": "application/json",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of exactly the files in `server.files` (URL path -> local file); 404 for the rest."""

    server: _StaticServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = self.server.resolve(self.path.split("?", 1)[0])
        if path is None:
            self.send_error(404, "not served")
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", _CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


class _StaticServer(http.server.ThreadingHTTPServer):
    """Serves fixed files and the plain files directly inside fixed folders; nothing else."""

    daemon_threads = True

    def __init__(self, files: dict[str, Path], folders: dict[str, Path]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.folders = folders  # URL prefix ending in "/" -> local folder

    def resolve(self, url_path: str) -> Path | None:
        if url_path in self.files:
            return self.files[url_path]
        for prefix, folder in self.folders.items():
            if url_path.startswith(prefix):
                name = url_path[len(prefix):]
                if name and "/" not in name and "\\" not in name and ".." not in name and not name.startswith("."):
                    candidate = folder / name
                    return candidate if candidate.is_file() else None
        return None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


@contextlib.contextmanager
def _serving(files: dict[str, Path], folders: dict[str, Path]) -> Iterator[_StaticServer]:
    server = _StaticServer(files, folders)
    thread = threading.Thread(target=server.serve_forever, name="mitra-consumer-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def check_in_browser(
    onnx_path: Path,
    fixture: Path,
    *,
    tolerance_abs: float,
    predict_path: Path | None = None,
    timeout_s: float = 180,
    chromium: Path | str | None = None,
    raise_on_failure: bool = True,
) -> ConsumerResult:
    """Run every fixture case through onnxruntime-web (WASM) in headless Chromium; compare with Python.

    Serves consumers/browser/ (the page), consumers/lib/, onnxruntime-web's dist/ (from node_modules),
    the model and the fixture from a server on 127.0.0.1 (a free port), opens the page in headless
    Chromium through playwright-core, and reads the page's report. The server and the browser are
    gone when this returns, whatever happened.

    Args:
        onnx_path, fixture, tolerance_abs, predict_path, raise_on_failure: as for `check_in_node`.
        timeout_s: the whole check (browser start, WASM compile, model load, all cases).
        chromium: the browser executable; default: `chromium` (Debian's package) on PATH.

    Raises:
        VerificationError: a case exceeded the tolerance or failed, the model did not load in
            onnxruntime-web, or the check did not finish in time.
        ConfigError: node, the npm packages or Chromium are missing (with the install command).
    """
    onnx_path, fixture = Path(onnx_path).resolve(), Path(fixture).resolve()
    predict_path = None if predict_path is None else Path(predict_path).resolve()
    fixture_doc = _read_fixture_for(fixture, predict_path)
    node = find_node()
    browser = find_chromium(chromium)
    modules = ensure_node_modules()
    started = time.perf_counter()
    files = {"/model.onnx": onnx_path, "/fixture.json": fixture}
    page = "/browser/index.html"
    if predict_path is not None:
        files["/predict.onnx"] = predict_path
        page += "?predict=/predict.onnx"
    folders = {
        "/browser/": CONSUMERS_DIR / "browser",
        "/lib/": CONSUMERS_DIR / "lib",
        "/ort/": modules / WEB_RUNTIME / "dist",
    }
    with _serving(files, folders) as server:
        report = _run_script(
            [str(node), str(BROWSER_CHECK_SCRIPT), "--url", f"{server.url}{page}", "--chromium", str(browser),
             "--timeout-ms", str(int(timeout_s * 1000))],
            timeout_s=timeout_s + 30, what=f"{WEB_RUNTIME} check of {_names(onnx_path, predict_path)} in {browser}",
        )
    if report.get("error") and report.get("log"):
        report["error"] += " | browser log: " + " | ".join(report["log"][:5])
    result = _judge(
        report, runtime=WEB_RUNTIME, backend="wasm", host=f"{report.get('browser', 'Chromium')} (headless)",
        onnx_path=onnx_path, predict_path=predict_path, fixture_doc=fixture_doc, tolerance_abs=tolerance_abs,
        seconds=time.perf_counter() - started,
    )
    return _finish(result, raise_on_failure)
