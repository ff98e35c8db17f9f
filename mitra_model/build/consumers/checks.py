"""Judge a model file where it is consumed: run the fixture in a JS runtime, compare with Python ORT.

`check_in_node` runs the fixture through onnxruntime-node (`consumers/node-check.mjs`);
`check_in_browser` serves a small page (`consumers/browser/`) with onnxruntime-web's WASM backend
from a 127.0.0.1 HTTP server and drives headless Chromium through it (`consumers/browser-check.mjs`,
playwright-core with the system Chromium: no browser download). Both compare every case's output
with Python's within `tolerance_abs` and return a `ConsumerResult` naming each case's max abs error;
`ConsumerResult.to_record` is what the manifest keeps under `artifacts[].checked_in`.

The bounds live in config/mitra-build.toml ([consumers.tolerances]). Measured |consumer - Python ORT|
per output value: onnxruntime-node runs the same CPU kernels as Python ONNX Runtime and matched bit
for bit (0.0) for every artifact, tiny and full-size. onnxruntime-web's WASM kernels round
differently; max over the default cases, tiny / full-size (dim 512, 12 layers) synthetic classifier:
fp32 6e-7 / 1.1e-6 (portable and optimized alike), fp16 1.5e-4 / 4e-4, int8 5.5e-3 / 2.3e-2. The
int8 gap is how dynamically quantized activations round: web int8 is as close to fp32 as Python's
int8 is (1.7e-2 vs 1.8e-2 at full size), the numbers just differ.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mitra_model.build.consumers.fixture import Fixture, read_fixture, write_fixture
from mitra_model.build.consumers.page_server import serving
from mitra_model.build.consumers.runtimes import (
    BROWSER_CHECK_SCRIPT,
    BROWSER_PAGE_DIR,
    CONSUMERS_DIR,
    JS_LIB_DIR,
    NODE_CHECK_SCRIPT,
    NODE_RUNTIME,
    WEB_RUNTIME,
    WEB_RUNTIME_DIST,
    ensure_node_modules,
    find_chromium,
    find_node,
    node_version,
    package_version,
)
from mitra_model.errors import ConfigError, VerificationError
from mitra_model.fileutil import sha256_file


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
        fixture_model_sha256 / fixture_predict_sha256: the files the fixture's expected outputs
            come from (named in the error when they differ from the checked files).
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

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready summary for the manifest's `checked_in` list (config/manifest.schema.json);
        inf becomes None."""
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
        """Every field, `passed` included, as indented JSON (inf as null)."""
        payload = asdict(self)
        payload["passed"] = self.passed
        for case in payload["cases"]:
            case["max_abs_err"] = _finite(case["max_abs_err"])
        return json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _finite(value: float | None) -> float | None:
    """JSON has no inf/NaN: a case that did not run or gave NaN is recorded as null."""
    return value if value is not None and math.isfinite(value) else None


def _names(onnx_path: Path, predict_path: Path | None) -> str:
    return onnx_path.name if predict_path is None else f"{onnx_path.name} + {predict_path.name}"


def require_passed(result: ConsumerResult) -> ConsumerResult:
    """Turn a failed check into an error.

    Args:
        result: from `check_in_node` / `check_in_browser` with raise_on_failure=False.

    Returns:
        `result`, when it passed.

    Raises:
        VerificationError: naming every failed case, and the fixture's source file when it is not
            the checked one.
    """
    if result.passed:
        return result
    mismatch_hint = ""
    pairs = [(result.fixture_model_sha256, result.onnx_sha256, result.onnx_path),
             (result.fixture_predict_sha256, result.predict_sha256, result.predict_path)]
    mismatched = [(want, got, Path(path).name) for want, got, path in pairs if path is not None and want != got]
    if mismatched:
        mismatch_hint = " (note: " + "; ".join(
            f"the fixture's expected outputs come from a file with sha256 {(want or '?')[:12]}, {name} has {(got or '?')[:12]}"
            for want, got, name in mismatched) + ")"
    raise VerificationError(
        f"{result.files} in {result.runtime} {result.runtime_version} ({result.backend}, {result.host}) "
        f"does not match Python ONNX Runtime within {result.tolerance_abs:.1e}: "
        + "; ".join(result.failures) + mismatch_hint,
        list(result.failures),
    )


# -- what the check scripts print ----------------------------------------------------------------


class _CaseReport(BaseModel):
    """One record of lib/fixture.mjs `runFixture` (the caller applies the tolerance)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    shape: tuple[int, ...] = ()
    max_abs_err: float | None = None  # null when the output held NaN/inf, or the case did not run
    non_finite: int = 0
    seconds: float | None = None
    error: str | None = None


class _CheckReport(BaseModel):
    """The JSON line node-check.mjs / browser-check.mjs print last on stdout."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str | None = None  # the runtime's own idea of its version
    error: str | None = None  # the model or the fixture could not be used: no case ran
    cases: tuple[_CaseReport, ...] = ()
    browser: str | None = None  # browser-check.mjs: "Chromium <version>"
    log: tuple[str, ...] = ()  # browser-check.mjs: console errors and page errors


def _run_script(args: list[str], *, timeout_s: float, what: str) -> _CheckReport:
    """Run a node script in its own process group and read its report (stdout's last JSON line).

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
        report = _CheckReport.model_validate_json(lines[-1])
    except (IndexError, ValidationError) as exc:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        why = "" if isinstance(exc, IndexError) else f" (its last JSON line is not a report: {exc})"
        raise VerificationError(
            f"{what} exited {process.returncode} without a report{why}:\n{tail}",
            [f"{what}: crashed (exit {process.returncode})"],
        ) from None
    if process.returncode not in (0, 1):
        raise VerificationError(f"{what} failed (exit {process.returncode}): {report}", [f"{what}: exit {process.returncode}"])
    return report


def _read_fixture_for(path: Path, predict_path: Path | None) -> Fixture:
    """The fixture, refused when it was written for a single file and a pair is checked, or the reverse."""
    fixture = read_fixture(path)
    if predict_path is not None and not fixture.is_pair:
        raise ConfigError(f"fixture {path} holds one model file's outputs, not the support-cache pair's: "
                          "write it with write_fixture(encoder, ..., predict_path=predictor)")
    if predict_path is None and fixture.is_pair:
        raise ConfigError(f"fixture {path} holds the support-cache pair's outputs: pass predict_path (the predictor) too")
    return fixture


def _judge(
    report: _CheckReport, *, runtime: str, backend: str, host: str, onnx_path: Path, predict_path: Path | None,
    fixture: Fixture, tolerance_abs: float, seconds: float,
) -> ConsumerResult:
    cases: list[CaseResult] = []
    failures: list[str] = []
    if report.error:
        failures.append(f"could not run: {report.error}")
    for record in report.cases:
        err = record.max_abs_err
        value = err if err is not None and record.error is None else math.inf
        cases.append(CaseResult(name=record.name, shape=record.shape, max_abs_err=value, seconds=record.seconds,
                                error=record.error))
        if record.error:
            failures.append(f"case {record.name!r}: {record.error}")
        elif err is None:
            failures.append(f"case {record.name!r}: output has {record.non_finite} NaN/inf values")
        elif value > tolerance_abs:
            failures.append(f"case {record.name!r}: max abs error {value:.3e} > tolerance {tolerance_abs:.1e}")
    expected_names = [c.name for c in fixture.cases]
    if not report.error and [c.name for c in cases] != expected_names:
        failures.append(f"ran cases {[c.name for c in cases]}, the fixture has {expected_names}")
    return ConsumerResult(
        runtime=runtime, runtime_version=package_version(runtime) or str(report.version), backend=backend, host=host,
        onnx_path=str(onnx_path), onnx_sha256=sha256_file(onnx_path), fixture_model_sha256=fixture.model_sha256,
        tolerance_abs=tolerance_abs, cases=tuple(cases), failures=tuple(failures), seconds=seconds,
        predict_path=None if predict_path is None else str(predict_path),
        predict_sha256=None if predict_path is None else sha256_file(predict_path),
        fixture_predict_sha256=fixture.predict_sha256,
    )


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

    Returns:
        The result, passed unless raise_on_failure is False.

    Raises:
        VerificationError: a case exceeded the tolerance or failed to run, the model did not load,
            or the check did not finish; the message names each failed case.
        ConfigError: node or the npm packages are missing (the message gives the install command),
            the fixture is not valid, or it was written for a single file and a pair is checked
            (or the reverse).
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
        predict_path=predict_path, fixture=fixture_doc, tolerance_abs=tolerance_abs,
        seconds=time.perf_counter() - started,
    )
    return require_passed(result) if raise_on_failure else result


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

    Returns:
        The result, passed unless raise_on_failure is False.

    Raises:
        VerificationError: a case exceeded the tolerance or failed, the model did not load in
            onnxruntime-web, or the check did not finish in time.
        ConfigError: node, the npm packages or Chromium are missing (with the install command), or
            the fixture does not fit (as for `check_in_node`).
    """
    onnx_path, fixture = Path(onnx_path).resolve(), Path(fixture).resolve()
    predict_path = None if predict_path is None else Path(predict_path).resolve()
    fixture_doc = _read_fixture_for(fixture, predict_path)
    node = find_node()
    browser = find_chromium(chromium)
    ensure_node_modules()
    started = time.perf_counter()
    # URL paths browser/check.mjs and index.html's import map expect
    files = {"/model.onnx": onnx_path, "/fixture.json": fixture}
    page = "/browser/index.html"
    if predict_path is not None:
        files["/predict.onnx"] = predict_path
        page += "?predict=/predict.onnx"
    folders = {"/browser/": BROWSER_PAGE_DIR, "/lib/": JS_LIB_DIR, "/ort/": WEB_RUNTIME_DIST}
    with serving(files, folders) as server:
        report = _run_script(
            [str(node), str(BROWSER_CHECK_SCRIPT), "--url", f"{server.url}{page}", "--chromium", str(browser),
             "--timeout-ms", str(int(timeout_s * 1000))],
            timeout_s=timeout_s + 30, what=f"{WEB_RUNTIME} check of {_names(onnx_path, predict_path)} in {browser}",
        )
    if report.error and report.log:
        report = report.model_copy(update={"error": f"{report.error} | browser log: {' | '.join(report.log[:5])}"})
    result = _judge(
        report, runtime=WEB_RUNTIME, backend="wasm", host=f"{report.browser or 'Chromium'} (headless)",
        onnx_path=onnx_path, predict_path=predict_path, fixture=fixture_doc, tolerance_abs=tolerance_abs,
        seconds=time.perf_counter() - started,
    )
    return require_passed(result) if raise_on_failure else result


def check_where_consumed(files: tuple[Path, ...], model_config: Any, *, folder: Path,
                         bounds: dict[str, float]) -> list[ConsumerResult]:
    """Load an artifact where it is consumed and require Python ONNX Runtime's outputs there.

    A fixed set of inputs (ties, padded batches, one support row) is written with Python ORT's
    outputs; then each runtime runs them. A pair is checked as consumers run it: encode-support,
    then predict-query on its outputs.

    Args:
        files: the artifact's files: one graph, or the encoder and the predictor.
        model_config: the snapshot's `MitraConfig` (the fixture's shapes).
        folder: where the fixture is written.
        bounds: runtime ("onnxruntime-node", "onnxruntime-web") -> largest allowed |runtime - python|.

    Returns:
        One result per runtime, each passed (`ConsumerResult.to_record` is the manifest's record).

    Raises:
        VerificationError: a runtime exceeded its bound or could not run the artifact.
        ToolMissingError / ConfigError: the runtime is not installed (the message says how to).
    """
    model, *predictor = files
    predict_path = predictor[0] if predictor else None
    fixture = write_fixture(model, model_config, folder, predict_path=predict_path)
    results = []
    for runtime, bound in bounds.items():
        if runtime == NODE_RUNTIME:
            ensure_node_modules()
            results.append(check_in_node(model, fixture, predict_path=predict_path, tolerance_abs=bound))
        elif runtime == WEB_RUNTIME:
            results.append(check_in_browser(model, fixture, predict_path=predict_path, tolerance_abs=bound))
        else:
            raise ConfigError(f"unknown consumer runtime {runtime!r}: expected {NODE_RUNTIME} or {WEB_RUNTIME}")
    return results
