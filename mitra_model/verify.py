"""The verification matrix: reference PyTorch vs ONNX Runtime over a grid of shapes and table types.

Every cell is checked against the tolerance of its precision; a failed cell fails the stage and is
named in the error. Nothing here ever downgrades a mismatch to a warning.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .config import Cell, Tolerance
from .errors import VerificationError
from .export import INPUT_NAMES, numpy_inputs
from .fileutil import sha256_file, write_bytes_atomic
from .inputs import make_inputs
from .model import Tab2D
from .snapshot import WEIGHTS_FILE, load_model


@dataclass(frozen=True)
class CellResult:
    name: str
    shape: tuple[int, int, int, int]  # (batch, n_support, n_query, n_features)
    data: str
    padded_support_rows: int
    max_abs_err: float
    max_rel_err: float
    argmax_agreement: float | None  # classifier
    max_prob_err: float | None  # classifier, when the tolerance bounds it
    correlation: float | None  # regressor
    torch_seconds: float
    onnx_seconds: float
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class VerificationReport:
    onnx_path: str
    onnx_sha256: str
    precision: str
    tolerance: dict[str, float]
    cells: tuple[CellResult, ...]
    summary: dict[str, float | int | bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(cell.passed for cell in self.cells)

    @property
    def failures(self) -> list[str]:
        return [f"cell {c.name!r} {c.shape}: {failure}" for c in self.cells for failure in c.failures]

    def to_json(self) -> str:
        payload = asdict(self)
        payload["passed"] = self.passed
        return json.dumps(payload, indent=2, sort_keys=True) + "\n"

    def to_markdown(self) -> str:
        metric = "argmax agree" if any(c.argmax_agreement is not None for c in self.cells) else "correlation"
        lines = [
            f"Verification of `{Path(self.onnx_path).name}` ({self.precision}, sha256 `{self.onnx_sha256[:12]}`): "
            + ("**PASSED**" if self.passed else "**FAILED**"),
            "",
            f"| cell | B,S,Q,F | data | padded | max abs | max rel | {metric} | torch s | onnx s | result |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.cells:
            value = c.argmax_agreement if c.argmax_agreement is not None else c.correlation
            lines.append(
                f"| {c.name} | {','.join(map(str, c.shape))} | {c.data} | {c.padded_support_rows} | {c.max_abs_err:.2e} "
                f"| {c.max_rel_err:.2e} | {'-' if value is None else f'{value:.6f}'} | {c.torch_seconds:.3f} "
                f"| {c.onnx_seconds:.3f} | {'ok' if c.passed else 'FAIL: ' + '; '.join(c.failures)} |"
            )
        return "\n".join(lines) + "\n"


def onnx_session(path: Path, *, threads: int = 0, memory_arena: bool = False) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (threads=0: ORT's default, all cores).

    The CPU memory arena is off by default: it keeps every freed block, which took a tiny-model
    forward at (1,4096,16,64) from 1.12 to 1.49 GiB peak RSS here (bench/results-memory.md). ORT's own
    default is on, which is ~10% faster at (1,512,32,16) full size (no fresh pages every forward):
    latency benchmarks use `memory_arena=True`, like a consumer's default session.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = memory_arena
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def compare_outputs(
    reference: np.ndarray, candidate: np.ndarray, *, is_classifier: bool, tolerance: Tolerance
) -> tuple[dict[str, float | None], list[str]]:
    """Error metrics of `candidate` against `reference` and the list of tolerance violations."""
    failures: list[str] = []
    if candidate.shape != reference.shape:
        return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "argmax_agreement": None, "correlation": None, "max_prob_err": None}, [
            f"output shape {candidate.shape} != reference {reference.shape}"
        ]
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    finite = bool(np.isfinite(candidate).all())
    max_abs = float(diff.max()) if finite else float("inf")
    max_rel = float((diff / np.maximum(np.abs(reference), 1e-6)).max()) if finite else float("inf")
    metrics: dict[str, float | None] = {
        "max_abs_err": max_abs, "max_rel_err": max_rel, "argmax_agreement": None, "correlation": None, "max_prob_err": None,
    }
    if not finite:
        failures.append("output has NaN or inf")
    if max_abs > tolerance.max_abs:
        failures.append(f"max abs error {max_abs:.3e} > tolerance {tolerance.max_abs:.1e}")
    if is_classifier:
        agreement = float((candidate.argmax(-1) == reference.argmax(-1)).mean())
        metrics["argmax_agreement"] = agreement
        if tolerance.max_prob_err is not None and finite:
            prob_err = float(np.abs(_softmax(candidate) - _softmax(reference)).max())
            metrics["max_prob_err"] = prob_err
            if prob_err > tolerance.max_prob_err:
                failures.append(f"max probability error {prob_err:.3e} > {tolerance.max_prob_err}")
        if agreement < tolerance.min_argmax_agreement:
            failures.append(f"argmax agreement {agreement:.4f} < {tolerance.min_argmax_agreement}")
    elif finite and reference.size >= 3 and reference.std() > 1e-4 * max(1.0, float(np.abs(reference).max())):
        # (near-)constant outputs (e.g. all-constant columns) make correlation meaningless: max_abs covers them
        correlation = float(np.corrcoef(reference.ravel(), candidate.ravel())[0, 1])
        metrics["correlation"] = correlation
        gated = reference.std() >= tolerance.correlation_min_spread
        if gated and not correlation >= tolerance.min_correlation:
            failures.append(f"correlation {correlation:.6f} < {tolerance.min_correlation}")
    return metrics, failures


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def run_cell(model: Tab2D, session: ort.InferenceSession, cell: Cell, *, tolerance: Tolerance, seed: int) -> CellResult:
    """One cell: the same inputs through PyTorch and ONNX Runtime, compared against `tolerance`."""
    inputs = make_inputs(
        cell.as_tuple(), config=model.config, data=cell.data, padded_support_rows=cell.padded_support_rows,
        seed=seed, salt=cell.name,
    )
    started = time.perf_counter()
    with torch.no_grad():
        reference = model(*numpy_inputs(inputs)).numpy()
    torch_seconds = time.perf_counter() - started
    started = time.perf_counter()
    try:
        candidate = session.run(None, {name: inputs[name] for name in INPUT_NAMES})[0]
    except Exception as exc:  # an ORT failure on one cell is a failed cell, not a crash
        candidate, error = None, f"ONNX Runtime failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    onnx_seconds = time.perf_counter() - started
    if candidate is None:
        metrics: dict[str, float | None] = {
            "max_abs_err": float("inf"), "max_rel_err": float("inf"), "argmax_agreement": None, "correlation": None,
            "max_prob_err": None,
        }
        failures = [error]
    else:
        metrics, failures = compare_outputs(
            reference, candidate, is_classifier=model.config.label_is_class, tolerance=tolerance
        )
    return CellResult(
        name=cell.name, shape=cell.as_tuple(), data=cell.data, padded_support_rows=cell.padded_support_rows,
        max_abs_err=float(metrics["max_abs_err"]), max_rel_err=float(metrics["max_rel_err"]),
        argmax_agreement=metrics["argmax_agreement"], correlation=metrics["correlation"],
        max_prob_err=metrics["max_prob_err"],
        torch_seconds=torch_seconds, onnx_seconds=onnx_seconds, failures=tuple(failures),
    )


def verify_cell(snapshot_dir: Path, onnx_path: Path, cell: Cell, *, tolerance: Tolerance, seed: int) -> CellResult:
    """`run_cell` from files alone: what a worker on another process or machine runs. Both paths
    must be readable there (a shared filesystem); nothing is pickled but paths and small values.
    A process keeps the last two models and sessions it loaded, so a matrix pays the load once."""
    model = _cached_model(str(snapshot_dir), _stamp(Path(snapshot_dir) / WEIGHTS_FILE))
    session = _cached_session(str(onnx_path), _stamp(Path(onnx_path)))
    return run_cell(model, session, cell, tolerance=tolerance, seed=seed)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()  # a rewritten file gets a new cache entry
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _cached_model(snapshot_dir: str, stamp: tuple[int, int]) -> Tab2D:
    return load_model(Path(snapshot_dir))[0]


@functools.lru_cache(maxsize=2)
def _cached_session(onnx_path: str, stamp: tuple[int, int]) -> ort.InferenceSession:
    return onnx_session(Path(onnx_path))


def make_report(onnx_path: Path, *, precision: str, tolerance: Tolerance, results: Sequence[CellResult]) -> VerificationReport:
    """Assemble cell results (in matrix order) into a report."""
    summary: dict[str, float | int | bool] = {
        "cells": len(results),
        "failed_cells": sum(not r.passed for r in results),
        "max_abs_err": max(r.max_abs_err for r in results),
        "torch_seconds": sum(r.torch_seconds for r in results),
        "onnx_seconds": sum(r.onnx_seconds for r in results),
    }
    return VerificationReport(
        onnx_path=str(onnx_path), onnx_sha256=sha256_file(Path(onnx_path)), precision=precision,
        tolerance=tolerance.model_dump(), cells=tuple(results), summary=summary,
    )


def verify_onnx(
    model: Tab2D,
    onnx_path: Path,
    *,
    cells: Sequence[Cell],
    tolerance: Tolerance,
    precision: str = "fp32",
    seed: int = 0,
    on_cell: Callable[[CellResult], None] | None = None,
) -> VerificationReport:
    """Run every cell through `model` (PyTorch) and `onnx_path` (ONNX Runtime) in this process.

    Returns the report whether or not cells failed; call `require_passed` to turn failure into an error.
    """
    session = onnx_session(onnx_path)
    results: list[CellResult] = []
    for cell in cells:
        results.append(run_cell(model, session, cell, tolerance=tolerance, seed=seed))
        if on_cell is not None:
            on_cell(results[-1])
    return make_report(onnx_path, precision=precision, tolerance=tolerance, results=results)


def require_passed(report: VerificationReport) -> None:
    """Raise `VerificationError` naming every failed cell, if any."""
    if report.passed:
        return
    failures = report.failures
    raise VerificationError(
        f"verification of {report.onnx_path} ({report.precision}) failed in {len(failures)} check(s): " + "; ".join(failures),
        failures,
    )


def write_report(report: VerificationReport, json_path: Path, markdown_path: Path | None = None) -> None:
    write_bytes_atomic(Path(json_path), report.to_json().encode())
    if markdown_path is not None:
        write_bytes_atomic(Path(markdown_path), report.to_markdown().encode())
