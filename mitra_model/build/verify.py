"""The verification loop: an artifact's outputs against upstream's, over the matrix of cells.

One loop, `verify_artifact`, feeds every cell's inputs to a *candidate* (a single ONNX graph, or the
support-cache pair run as consumers run it: encode the support set once, predict the query rows in
batches) and compares its output with the cell's *reference* (reference.py): upstream AutoGluon
Tab2D's output with the same weights. The reference also holds our PyTorch rewrite's output, and
every cell checks rewrite vs upstream against the same tolerance's `max_abs`, so a passing build
proves ONNX ≈ rewrite ≈ upstream on the weights it publishes.

Each cell is judged against the tolerance of the artifact's precision on the metrics of `Metrics`;
a failed cell fails the stage and is named in the error. Nothing here ever downgrades a mismatch to
a warning. Adding a metric means one field on `Metrics` (its metadata names its bound in
config.Tolerance) and its check in `compare_outputs`: reports and tables derive from the fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from mitra_model.build.config import Cell, TaskCell, Tolerance
from mitra_model.build.export import INPUT_NAMES
from mitra_model.build.reference import Case, CellReference, model_reference, reference_for
from mitra_model.build.support_cache import ENCODE_INPUT_NAMES, cache_names
from mitra_model.build.tasks import TaskTable, chance_scores, load_table, task_scores
from mitra_model.errors import ConfigError, VerificationError
from mitra_model.fileutil import sha256_file, write_bytes_atomic
from mitra_model.model.architecture import MitraConfig
from mitra_model.model.snapshot import read_model_config
from mitra_model.model.tab2d import Tab2D

CandidateKind = Literal["graph", "pair"]
SummaryValue = float | int | bool | str

# The pair predicts each cell in this many query batches against one cache: query rows must not see
# each other, so any split gives the full model's numbers.
QUERY_BATCHES = 3


def _metric(bound: str | None = None, op: str = "<=", fmt: str = ".2e", *, optional: bool = True) -> Any:
    """A Metrics field: `bound` is the config.Tolerance field that bounds it (None: reported, not
    judged), `op` how the value must compare with it, `fmt` how tables print the value."""
    metadata = {"bound": bound, "op": op, "fmt": fmt}
    return field(default=None, metadata=metadata) if optional else field(metadata=metadata)


@dataclass(frozen=True)
class Metrics:
    """A candidate's output against the reference. None: not measured for this output (argmax and
    probabilities for a regressor, correlation for a classifier or a (near-)constant reference)."""

    max_abs_err: float = _metric("max_abs", optional=False)
    max_rel_err: float = _metric(optional=False)  # relative to max(|reference|, 1e-6); reported only
    argmax_agreement: float | None = _metric("min_argmax_agreement", ">=", ".4f")  # classifier
    max_prob_err: float | None = _metric("max_prob_err")  # classifier, when the tolerance bounds it
    correlation: float | None = _metric("min_correlation", ">=", ".6f")  # regressor
    # the signal kept (signal_metrics): None on tables with a single query row or a constant reference
    err_over_spread: float | None = _metric("max_err_over_spread", "<=", ".4f")
    centered_argmax_agreement: float | None = _metric("min_centered_argmax_agreement", ">=", ".4f")  # classifier
    centered_correlation: float | None = _metric("min_centered_correlation", ">=", ".6f")  # regressor
    spread: float | None = _metric(fmt=".3e")  # the reference's, across the query rows (what err_over_spread divides by)
    # max |a row predicted alone - the same row in the batch|; None when not measured
    batch_dependence: float | None = _metric("max_batch_dependence")

    @classmethod
    def no_output(cls) -> Metrics:
        """The metrics of a candidate that produced no output (it raised): infinite errors."""
        return cls(max_abs_err=float("inf"), max_rel_err=float("inf"))

    def tolerance_used(self, tolerance: Mapping[str, float | None]) -> float:
        """The largest share of its bound any judged metric uses: 0.5 is half the tolerance, above 1 fails.

        An upper bound is used by value / bound; a lower bound (agreement, correlation) by the
        distance from perfect, (1 - value) / (1 - bound). Metrics not measured, or not bounded by
        this tolerance, do not count; an infinite error uses infinitely much.
        """
        used = 0.0
        for spec in fields(self):
            value, meta = getattr(self, spec.name), spec.metadata
            limit = tolerance.get(meta["bound"]) if meta["bound"] else None
            if value is None or limit is None:
                continue
            if meta["op"] == "<=":
                share = value / limit if limit > 0 else (0.0 if value <= 0 else float("inf"))
            else:
                share = (1 - value) / (1 - limit) if limit < 1 else (0.0 if value >= limit else float("inf"))
            used = max(used, share)
        return used

    def describe(self, tolerance: Mapping[str, float | None]) -> dict[str, str]:
        """Each metric as tables show it: the value next to its bound, e.g. "2.10e-06 (<= 0.0001)";
        "-" where not measured.

        Args:
            tolerance: the tolerance as a mapping (VerificationReport.tolerance).
        """
        shown = {}
        for spec in fields(self):
            value, meta = getattr(self, spec.name), spec.metadata
            limit = tolerance.get(meta["bound"]) if meta["bound"] else None
            if value is None:
                shown[spec.name] = "-"
            else:
                text = format(value, meta["fmt"])
                shown[spec.name] = text if limit is None else f"{text} ({meta['op']} {limit:g})"
        return shown


def compare_outputs(
    reference: np.ndarray, candidate: np.ndarray, *, is_classifier: bool, tolerance: Tolerance
) -> tuple[Metrics, list[str]]:
    """Error metrics of `candidate` against `reference` and the list of tolerance violations.

    Args:
        reference: upstream's output, (B, Q, C) logits or (B, Q) values.
        candidate: the artifact's output on the same inputs.
        is_classifier: the outputs are logits (argmax and softmax metrics) rather than values (correlation).
        tolerance: the bounds.

    Returns:
        (metrics, failures): one failure line per violated bound, naming the metric, value and bound.
    """
    if candidate.shape != reference.shape:
        return Metrics.no_output(), [f"output shape {candidate.shape} != reference {reference.shape}"]
    failures: list[str] = []
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    finite = bool(np.isfinite(candidate).all())
    max_abs = float(diff.max(initial=0.0)) if finite else float("inf")
    max_rel = float((diff / np.maximum(np.abs(reference), 1e-6)).max(initial=0.0)) if finite else float("inf")
    agreement = prob_err = correlation = None
    if not finite:
        failures.append("output has NaN or inf")
    if max_abs > tolerance.max_abs:
        failures.append(f"max abs error {max_abs:.3e} > tolerance {tolerance.max_abs:.1e}")
    if is_classifier:
        agreement = float((candidate.argmax(-1) == reference.argmax(-1)).mean())
        if tolerance.max_prob_err is not None and finite:
            prob_err = float(np.abs(_softmax(candidate) - _softmax(reference)).max())
            if prob_err > tolerance.max_prob_err:
                failures.append(f"max probability error {prob_err:.3e} > {tolerance.max_prob_err}")
        if agreement < tolerance.min_argmax_agreement:
            failures.append(f"argmax agreement {agreement:.4f} < {tolerance.min_argmax_agreement}")
    elif finite and reference.size >= 3 and reference.std() > 1e-4 * max(1.0, float(np.abs(reference).max())):
        # (near-)constant outputs (e.g. all-constant columns) make correlation meaningless: max_abs covers them
        correlation = float(np.corrcoef(reference.ravel(), candidate.ravel())[0, 1])
        gated = reference.std() >= tolerance.correlation_min_spread
        if gated and not correlation >= tolerance.min_correlation:
            failures.append(f"correlation {correlation:.6f} < {tolerance.min_correlation}")
    signal = signal_metrics(reference, candidate, is_classifier=is_classifier) if finite else SignalMetrics()
    judged = is_classifier or (signal.spread or 0.0) >= tolerance.signal_min_spread
    if signal.err_over_spread is not None and reference.shape[1] >= tolerance.signal_min_rows and judged:
        failures += _signal_failures(signal, tolerance)
    metrics = Metrics(max_abs_err=max_abs, max_rel_err=max_rel, argmax_agreement=agreement, max_prob_err=prob_err,
                      correlation=correlation, err_over_spread=signal.err_over_spread,
                      centered_argmax_agreement=signal.centered_argmax_agreement,
                      centered_correlation=signal.centered_correlation, spread=signal.spread)
    return metrics, failures


@dataclass(frozen=True)
class SignalMetrics:
    """How much of the reference's input-dependent signal a candidate keeps (None: not measurable)."""

    err_over_spread: float | None = None
    centered_argmax_agreement: float | None = None
    centered_correlation: float | None = None
    spread: float | None = None


def signal_metrics(reference: np.ndarray, candidate: np.ndarray, *, is_classifier: bool) -> SignalMetrics:
    """The error measured against what the reference varies by across each table's query rows.

    The spread is the RMS over tables and output columns of the reference's standard deviation
    across the query rows: a model that predicts the same thing for every row has none, and an
    artifact whose error is as large as it has lost the signal, however small the error looks in
    absolute terms. Arg-maxes (classifier) and correlations (regressor) are taken after centring
    each output column over the query rows, so a shared offset cannot decide them.

    Args:
        reference: (B, Q, C) logits or (B, Q) values.
        candidate: the same shape.
        is_classifier: logits (centred argmax agreement) or values (centred correlation).

    Returns:
        The metrics; all None when a table has one query row or the reference does not vary.
    """
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    if ref.ndim == 2:
        ref, cand = ref[..., None], cand[..., None]
    if ref.shape[1] < 2:
        return SignalMetrics()
    centred_ref = ref - ref.mean(axis=1, keepdims=True)
    spread = float(np.sqrt(np.mean(centred_ref ** 2)))
    if not spread > 1e-9 * max(1.0, float(np.abs(ref).max())):
        return SignalMetrics(spread=spread)
    error = float(np.sqrt(np.mean((cand - ref) ** 2)))
    centred_cand = cand - cand.mean(axis=1, keepdims=True)
    agreement = correlation = None
    if is_classifier:
        agreement = float((centred_ref.argmax(-1) == centred_cand.argmax(-1)).mean())
    elif centred_ref.size >= 3 and centred_cand.std() > 0:
        correlation = float(np.corrcoef(centred_ref.ravel(), centred_cand.ravel())[0, 1])
    return SignalMetrics(err_over_spread=error / spread, centered_argmax_agreement=agreement,
                         centered_correlation=correlation, spread=spread)


def _signal_failures(signal: SignalMetrics, tolerance: Tolerance) -> list[str]:
    failures = []
    if tolerance.max_err_over_spread is not None and signal.err_over_spread > tolerance.max_err_over_spread:
        failures.append(f"error / spread {signal.err_over_spread:.4f} > {tolerance.max_err_over_spread} (the "
                        f"error is that share of what the output varies by across the query rows)")
    agreement = signal.centered_argmax_agreement
    if tolerance.min_centered_argmax_agreement is not None and agreement is not None \
            and agreement < tolerance.min_centered_argmax_agreement:
        failures.append(f"centred argmax agreement {agreement:.4f} < {tolerance.min_centered_argmax_agreement}")
    correlation = signal.centered_correlation
    if tolerance.min_centered_correlation is not None and correlation is not None \
            and not correlation >= tolerance.min_centered_correlation:
        failures.append(f"centred correlation {correlation:.6f} < {tolerance.min_centered_correlation}")
    return failures


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


@dataclass(frozen=True)
class CellResult:
    name: str
    shape: tuple[int, int, int, int]  # (batch, n_support, n_query, n_features)
    data: str
    padded_support_rows: int
    metrics: Metrics  # the candidate against upstream
    rewrite_vs_upstream_max_abs: float  # our PyTorch rewrite against upstream, same inputs
    upstream: str  # the upstream that computed the reference, e.g. "autogluon.tabular==1.6.3"
    # What computing the reference took (upstream + rewrite forwards), whenever it was computed: with
    # `reference_cached` an earlier artifact or process spent it and this cell only read the file.
    torch_seconds: float
    reference_cached: bool
    onnx_seconds: float  # the candidate (a pair: the encode plus every predict)
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_err(self) -> float:
        return self.metrics.max_abs_err

    @property
    def argmax_agreement(self) -> float | None:
        return self.metrics.argmax_agreement

    @property
    def correlation(self) -> float | None:
        return self.metrics.correlation


@dataclass(frozen=True)
class TaskResult:
    """An artifact on a real table (a task check): its signal kept against upstream, judged like a
    cell, and the task scored for it, for upstream and for chance (what ignoring the features scores)."""

    name: str
    dataset: str
    support_rows: int
    query_rows: int
    features: int
    classes: int  # 0: regression
    metrics: Metrics  # the candidate against upstream, on the outputs the task reads
    scores: dict[str, float]  # the candidate's: accuracy and log_loss, or r2 and rmse
    upstream_scores: dict[str, float]
    chance_scores: dict[str, float]
    rewrite_vs_upstream_max_abs: float
    onnx_seconds: float
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class VerificationReport:
    onnx_path: str  # the file verified (a support-cache pair: its predictor)
    onnx_sha256: str
    precision: str
    tolerance: dict[str, float | None]
    cells: tuple[CellResult, ...]
    summary: dict[str, SummaryValue] = field(default_factory=dict)
    tasks: tuple[TaskResult, ...] = ()  # the real tables

    @property
    def passed(self) -> bool:
        return all(cell.passed for cell in self.cells) and all(task.passed for task in self.tasks)

    @property
    def failures(self) -> list[str]:
        return ([f"cell {c.name!r} {c.shape}: {failure}" for c in self.cells for failure in c.failures]
                + [f"task {t.name!r} ({t.dataset}): {failure}" for t in self.tasks for failure in t.failures])

    def to_json(self) -> str:
        """The report as JSON; each cell's metrics sit at the cell's top level (`cells[i].max_abs_err`)."""
        payload = asdict(self)
        for result, record in zip((*self.cells, *self.tasks), (*payload["cells"], *payload["tasks"])):
            record.update(record.pop("metrics"))
            record["passed"] = result.passed
        payload["passed"] = self.passed
        return json.dumps(payload, indent=2, sort_keys=True) + "\n"

    def table_rows(self) -> list[dict[str, str | int | float | bool]]:
        """One row per cell, as the Prefect UI table shows it: every Metrics field next to its bound
        (e.g. "max_abs_err": "2.10e-06 (<= 0.0001)"), the rewrite-vs-upstream check, timings, verdict."""
        max_abs = self.tolerance.get("max_abs")
        return [
            {
                "cell": c.name, "B,S,Q,F": ",".join(map(str, c.shape)), "data": c.data, "padded": c.padded_support_rows,
                **c.metrics.describe(self.tolerance),
                "rewrite_vs_upstream": f"{c.rewrite_vs_upstream_max_abs:.2e} (<= {max_abs:g})",
                "reference_s": f"{c.torch_seconds:.3f}" + (" (cached)" if c.reference_cached else ""),
                "onnx_s": round(c.onnx_seconds, 3),
                "result": "ok" if c.passed else "FAIL: " + "; ".join(c.failures),
            }
            for c in self.cells
        ] + [
            {
                "cell": f"task:{t.name}", "B,S,Q,F": f"1,{t.support_rows},{t.query_rows},{t.features}", "data": t.dataset,
                "padded": 0, **t.metrics.describe(self.tolerance),
                "rewrite_vs_upstream": f"{t.rewrite_vs_upstream_max_abs:.2e} (<= {max_abs:g})",
                "task": ", ".join(f"{k} {v:.3f} (upstream {t.upstream_scores[k]:.3f}, chance {t.chance_scores[k]:.3f})"
                                  for k, v in t.scores.items()),
                "onnx_s": round(t.onnx_seconds, 3),
                "result": "ok" if t.passed else "FAIL: " + "; ".join(t.failures),
            }
            for t in self.tasks
        ]

    def to_markdown(self) -> str:
        """A headline and the `table_rows` table."""
        rows = self.table_rows()
        lines = [
            f"Verification of `{Path(self.onnx_path).name}` ({self.precision}, sha256 `{self.onnx_sha256[:12]}`) "
            f"against {self.summary.get('upstream', 'upstream')}: " + ("**PASSED**" if self.passed else "**FAILED**"),
            "",
        ]
        if rows:
            lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(str(value) for value in row.values()) + " |" for row in rows]
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


# ---------------------------------------------------------------------------------------------
# Candidates: what is verified


@dataclass(frozen=True)
class Candidate:
    """An artifact as the loop runs it.

    Attributes:
        path: the file the report names and digests (a pair: its predictor).
        run: a cell's contract inputs (export.INPUT_NAMES) -> the artifact's output; raises when the runtime fails.
        summary: how it ran, recorded in the report's summary (e.g. a pair's query_batches).
    """

    path: Path
    run: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    summary: Mapping[str, SummaryValue] = field(default_factory=dict)


def graph_candidate(path: Path) -> Candidate:
    """A single ONNX graph (model*.onnx) fed the four contract inputs (export.INPUT_NAMES)."""
    session = onnx_session(Path(path))

    def run(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return session.run(None, {name: inputs[name] for name in INPUT_NAMES})[0]

    return Candidate(path=Path(path), run=run)


def pair_candidate(encode_path: Path, predict_path: Path, n_layers: int, *, query_batches: int = QUERY_BATCHES) -> Candidate:
    """The support-cache pair as consumers run it: encode the support set once, predict the query
    rows in up to `query_batches` batches against that one cache, and join the outputs.

    Args:
        encode_path, predict_path: encode-support[-ort].onnx and predict-query[-ort][-int8].onnx.
        n_layers: the model's layer count (the cache's tensor names: support_cache.cache_names).
        query_batches: how many query batches each cell is split into (fewer when it has fewer rows).
    """
    encoder, predictor = onnx_session(Path(encode_path)), onnx_session(Path(predict_path))
    names = cache_names(n_layers)

    def run(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = dict(zip(names, encoder.run(None, {name: inputs[name] for name in ENCODE_INPUT_NAMES})))
        x_query = inputs["x_query"]
        chunks = np.array_split(x_query, min(query_batches, x_query.shape[1]), axis=1)
        return np.concatenate([predictor.run(None, {**feed, "x_query": chunk})[0] for chunk in chunks], axis=1)

    return Candidate(path=Path(predict_path), run=run, summary={"query_batches": query_batches})


# ---------------------------------------------------------------------------------------------
# The loop


def alone(inputs: Mapping[str, np.ndarray], table: int, row: int) -> dict[str, np.ndarray]:
    """The contract inputs of one query row of one table, with that table's support set only."""
    return {"x_support": inputs["x_support"][table:table + 1], "y_support": inputs["y_support"][table:table + 1],
            "x_query": inputs["x_query"][table:table + 1, row:row + 1],
            "padding_obs_support": inputs["padding_obs_support"][table:table + 1]}


def batch_dependence(candidate: Candidate, inputs: Mapping[str, np.ndarray], output: np.ndarray, *,
                     both_ends: bool = True) -> float:
    """Max |a query row predicted alone - the same row in the batch|, over the first row of the first
    table and (`both_ends`) the last row of the last table, one forward each: 0 up to float noise for
    an artifact whose rows never see each other's numbers; dynamic per-tensor quantization is not one
    (inf when the candidate fails on a single row)."""
    tables, rows = inputs["x_query"].shape[:2]
    worst = 0.0
    for table, row in dict.fromkeys([(0, 0), (tables - 1, rows - 1)] if both_ends else [(0, 0)]):
        try:
            single = candidate.run(alone(inputs, table, row))
        except Exception:  # noqa: BLE001 - a runtime that fails on one row depends on more than that row
            return float("inf")
        worst = max(worst, float(np.abs(single[0, 0].astype(np.float64) - output[table, row]).max(initial=0.0)))
    return worst


def run_cell(reference: CellReference, candidate: Candidate, *, tolerance: Tolerance, is_classifier: bool) -> CellResult:
    """One cell: the candidate on the reference's inputs, compared with upstream's output; and the
    rewrite's output compared with upstream's under `tolerance.max_abs`."""
    cell = reference.cell
    started = time.perf_counter()
    try:
        output, error = candidate.run(reference.inputs), ""
    except Exception as exc:  # a runtime failure on one cell is a failed cell, not a crash
        output, error = None, f"ONNX Runtime failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    onnx_seconds = time.perf_counter() - started
    if output is None:
        metrics, failures = Metrics.no_output(), [error]
    else:
        metrics, failures = compare_outputs(reference.upstream, output, is_classifier=is_classifier, tolerance=tolerance)
        dependence = batch_dependence(candidate, reference.inputs, output)
        metrics = dataclasses.replace(metrics, batch_dependence=dependence)
        if tolerance.max_batch_dependence is not None and not dependence <= tolerance.max_batch_dependence:
            failures.append(f"batch dependence {dependence:.3e} > {tolerance.max_batch_dependence:.1e}: a query row "
                            "predicted alone differs from the same row predicted in the batch")
    if not reference.rewrite_vs_upstream_max_abs <= tolerance.max_abs:
        failures.append(
            f"our PyTorch rewrite (mitra_model.model.tab2d) differs from upstream Tab2D ({reference.upstream_version}): "
            f"max abs {reference.rewrite_vs_upstream_max_abs:.3e} > tolerance {tolerance.max_abs:.1e}"
        )
    return CellResult(
        name=cell.name, shape=cell.as_tuple(), data=cell.data, padded_support_rows=cell.padded_support_rows,
        metrics=metrics, rewrite_vs_upstream_max_abs=reference.rewrite_vs_upstream_max_abs,
        upstream=reference.upstream_version, torch_seconds=reference.seconds, reference_cached=reference.cached,
        onnx_seconds=onnx_seconds, failures=tuple(failures),
    )


def run_task(reference: CellReference, candidate: Candidate, *, tolerance: Tolerance, table: TaskTable) -> TaskResult:
    """One real table: the candidate against upstream on the outputs the task reads (a classifier's
    logits of the table's classes; the regressor's value), judged like a cell, and the task scored."""
    task = reference.cell
    started = time.perf_counter()
    try:
        output, error = candidate.run(reference.inputs), ""
    except Exception as exc:  # a runtime failure is a failed check, not a crash
        output, error = None, f"ONNX Runtime failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    onnx_seconds = time.perf_counter() - started
    scores: dict[str, float] = {}
    if output is None:
        metrics, failures = Metrics.no_output(), [error]
    else:
        reads = (lambda raw: raw[..., : table.n_classes]) if table.is_classification else (lambda raw: raw)
        metrics, failures = compare_outputs(reads(reference.upstream), reads(output),
                                            is_classifier=table.is_classification, tolerance=tolerance.on_tables())
        # one row: a real table's support side costs a whole forward per row predicted alone
        dependence = batch_dependence(candidate, reference.inputs, output, both_ends=False)
        metrics = dataclasses.replace(metrics, batch_dependence=dependence)
        if tolerance.max_batch_dependence is not None and not dependence <= tolerance.max_batch_dependence:
            failures.append(f"batch dependence {dependence:.3e} > {tolerance.max_batch_dependence:.1e}")
        scores = task_scores(table, output)
    if not reference.rewrite_vs_upstream_max_abs <= tolerance.max_abs:
        failures.append(f"our PyTorch rewrite differs from upstream Tab2D: max abs "
                        f"{reference.rewrite_vs_upstream_max_abs:.3e} > tolerance {tolerance.max_abs:.1e}")
    support_rows, features = reference.inputs["x_support"].shape[1:]
    return TaskResult(
        name=task.name, dataset=task.dataset, support_rows=int(support_rows), query_rows=len(table.y_query),
        features=int(features), classes=table.n_classes, metrics=metrics, scores=scores,
        upstream_scores=task_scores(table, reference.upstream), chance_scores=chance_scores(table),
        rewrite_vs_upstream_max_abs=reference.rewrite_vs_upstream_max_abs, onnx_seconds=onnx_seconds,
        failures=tuple(failures),
    )


def verify_artifact(
    reference: Callable[[Cell], CellReference],
    candidate: Candidate,
    *,
    cells: Sequence[Cell],
    tolerance: Tolerance,
    precision: str,
    seed: int,
    is_classifier: bool,
    on_cell: Callable[[CellResult | TaskResult], None] | None = None,
    tasks: Sequence[TaskCell] = (),
) -> VerificationReport:
    """Every cell and task check through `candidate`, compared with `reference(cell)`, in this process.

    Args:
        reference: a cell's inputs and upstream's output (reference.reference_for / model_reference).
        candidate: graph_candidate or pair_candidate.
        cells: the matrix, in report order.
        tolerance: the bounds of the artifact's precision (also bounds rewrite vs upstream's max abs).
        precision: recorded in the report ("fp32", "int8", ...).
        seed: the matrix seed the reference was computed with (recorded in the summary).
        is_classifier: the model's outputs are logits.
        on_cell: called with each cell's (and task check's) result as it finishes (progress).
        tasks: the task checks (real tables), after the cells.

    Returns:
        The report, whether or not cells failed; `require_passed` turns failure into an error.
    """
    results: list[CellResult] = []
    for cell in cells:
        results.append(run_cell(reference(cell), candidate, tolerance=tolerance, is_classifier=is_classifier))
        if on_cell is not None:
            on_cell(results[-1])
    checks: list[TaskResult] = []
    for task in tasks:
        checks.append(run_task(reference(task), candidate, tolerance=tolerance, table=load_table(task, seed=seed)))
        if on_cell is not None:
            on_cell(checks[-1])
    return make_report(candidate.path, precision=precision, tolerance=tolerance, results=results,
                       summary={"seed": seed, **candidate.summary}, tasks=checks)


def verify_cell(
    snapshot_dir: Path,
    paths: tuple[Path, ...],
    cell: Cell,
    *,
    kind: CandidateKind,
    tolerance: Tolerance,
    seed: int,
    reference_dir: Path | None,
    query_batches: int = QUERY_BATCHES,
) -> CellResult:
    """One cell from files alone: what a worker in another process or on another machine runs.

    Every path must be readable there (a shared filesystem); nothing crosses but paths and small
    values. A process keeps the last candidate it opened, so a matrix pays the session load once.

    Args:
        snapshot_dir: the checkpoint folder being built.
        paths: (model.onnx,) for kind "graph"; (encode-support.onnx, predict-query.onnx) for "pair".
        cell: the matrix cell.
        kind: "graph" or "pair".
        tolerance: the artifact's bounds.
        seed: the matrix seed.
        reference_dir: the build's reference cache (reference.reference_for); None computes without caching.
        query_batches: a pair's query batches per cell.

    Raises:
        ConfigError: `kind` unknown, or the wrong number of paths for it.
        ReferenceCacheError, SnapshotError, UpstreamMissingError: see reference.reference_for.
    """
    config, reference, candidate = _from_files("verify_cell", snapshot_dir, paths, cell, kind=kind, seed=seed,
                                               reference_dir=reference_dir, query_batches=query_batches)
    return run_cell(reference, candidate, tolerance=tolerance, is_classifier=config.label_is_class)


def verify_task(
    snapshot_dir: Path,
    paths: tuple[Path, ...],
    task: TaskCell,
    *,
    kind: CandidateKind,
    tolerance: Tolerance,
    seed: int,
    reference_dir: Path | None,
    query_batches: int = QUERY_BATCHES,
) -> TaskResult:
    """One task check from files alone (like `verify_cell`, for a real table)."""
    _, reference, candidate = _from_files("verify_task", snapshot_dir, paths, task, kind=kind, seed=seed,
                                          reference_dir=reference_dir, query_batches=query_batches)
    return run_task(reference, candidate, tolerance=tolerance, table=load_table(task, seed=seed))


def _from_files(caller: str, snapshot_dir: Path, paths: tuple[Path, ...], case: Case, *, kind: CandidateKind,
                seed: int, reference_dir: Path | None, query_batches: int) -> tuple[MitraConfig, CellReference, Candidate]:
    """The model config, the case's (cached) reference and the candidate, from paths alone (what a
    Dask worker receives)."""
    wanted = {"graph": 1, "pair": 2}
    if kind not in wanted or len(paths) != wanted[kind]:
        raise ConfigError(f"{caller}: kind {kind!r} with {len(paths)} path(s); expected kind 'graph' with "
                          "(model.onnx,) or 'pair' with (encode-support.onnx, predict-query.onnx)")
    config, _ = read_model_config(Path(snapshot_dir))
    reference = reference_for(Path(snapshot_dir), case, seed=seed, cache_dir=reference_dir)
    files = tuple(str(p) for p in paths)
    candidate = _cached_candidate(kind, files, tuple(_stamp(Path(p)) for p in files), config.n_layers, query_batches)
    return config, reference, candidate


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()  # a rewritten file gets a new cache entry
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=1)
def _cached_candidate(kind: CandidateKind, paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...],
                      n_layers: int, query_batches: int) -> Candidate:
    if kind == "graph":
        return graph_candidate(Path(paths[0]))
    return pair_candidate(Path(paths[0]), Path(paths[1]), n_layers, query_batches=query_batches)


def make_report(
    onnx_path: Path,
    *,
    precision: str,
    tolerance: Tolerance,
    results: Sequence[CellResult],
    summary: Mapping[str, SummaryValue] | None = None,
    tasks: Sequence[TaskResult] = (),
) -> VerificationReport:
    """Assemble cell results (in matrix order) into a report.

    The summary records, for the manifest: cells and failed cells, the worst max abs error, the
    candidate's total seconds, the upstream version the reference came from, the worst rewrite vs
    upstream difference, and what computing the references took (`reference_seconds`, however many
    cells read it from the cache: `reference_cached_cells`); `summary` adds entries (seed, query_batches).
    """
    totals: dict[str, SummaryValue] = {
        "cells": len(results),
        "failed_cells": sum(not r.passed for r in results),
        "max_abs_err": max(r.max_abs_err for r in results),
        "onnx_seconds": sum(r.onnx_seconds for r in results),
        "upstream": ", ".join(sorted({r.upstream for r in results})),
        "rewrite_vs_upstream_max_abs": max(r.rewrite_vs_upstream_max_abs for r in results),
        "reference_seconds": sum(r.torch_seconds for r in results),
        "reference_cached_cells": sum(r.reference_cached for r in results),
        "tasks": len(tasks),
        "failed_tasks": sum(not t.passed for t in tasks),
    }
    signal = [r.metrics.err_over_spread for r in (*results, *tasks) if r.metrics.err_over_spread is not None]
    if signal:
        totals["max_err_over_spread"] = max(signal)
    dependence = [r.metrics.batch_dependence for r in (*results, *tasks) if r.metrics.batch_dependence is not None]
    if dependence:
        totals["max_batch_dependence"] = max(dependence)
    return VerificationReport(
        onnx_path=str(onnx_path), onnx_sha256=sha256_file(Path(onnx_path)), precision=precision,
        tolerance=tolerance.model_dump(), cells=tuple(results), summary={**totals, **(summary or {})},
        tasks=tuple(tasks),
    )


# ---------------------------------------------------------------------------------------------
# In-memory entry points (tests, the CLI): the reference from a loaded model, computed per call


def verify_onnx(
    model: Tab2D,
    onnx_path: Path,
    *,
    cells: Sequence[Cell],
    tolerance: Tolerance,
    precision: str = "fp32",
    seed: int = 0,
    on_cell: Callable[[CellResult | TaskResult], None] | None = None,
    tasks: Sequence[TaskCell] = (),
) -> VerificationReport:
    """Every cell (and task check) through `onnx_path` (ONNX Runtime) against upstream Tab2D with
    `model`'s weights.

    Returns:
        The report, whether or not cells failed; `require_passed` turns failure into an error.

    Raises:
        UpstreamMissingError: upstream AutoGluon Mitra is not installed.
    """
    return verify_artifact(
        model_reference(model, seed=seed), graph_candidate(onnx_path), cells=cells, tolerance=tolerance,
        precision=precision, seed=seed, is_classifier=model.config.label_is_class, on_cell=on_cell, tasks=tasks,
    )


def verify_support_cache(
    model: Tab2D,
    encode_path: Path,
    predict_path: Path,
    *,
    cells: Sequence[Cell],
    tolerance: Tolerance,
    seed: int = 0,
    query_batches: int = QUERY_BATCHES,
    precision: str = "fp32",
    on_cell: Callable[[CellResult | TaskResult], None] | None = None,
    tasks: Sequence[TaskCell] = (),
) -> VerificationReport:
    """The support-cache pair (pair_candidate) against upstream Tab2D with `model`'s weights.

    The report names the predictor; its summary records `query_batches`.

    Returns:
        The report, whether or not cells failed; `require_passed` turns failure into an error.

    Raises:
        UpstreamMissingError: upstream AutoGluon Mitra is not installed.
    """
    return verify_artifact(
        model_reference(model, seed=seed),
        pair_candidate(encode_path, predict_path, model.config.n_layers, query_batches=query_batches),
        cells=cells, tolerance=tolerance, precision=precision, seed=seed,
        is_classifier=model.config.label_is_class, on_cell=on_cell, tasks=tasks,
    )


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
    """Write the report as JSON (and optionally Markdown), each file atomically."""
    write_bytes_atomic(Path(json_path), report.to_json().encode())
    if markdown_path is not None:
        write_bytes_atomic(Path(markdown_path), report.to_markdown().encode())
