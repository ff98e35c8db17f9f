"""Signal benchmark on the full-size model: how much of upstream's input-dependent output each
reduced-precision artifact (and each option of one) keeps, on the verification matrix and on the real
tables of the task checks, with its batch dependence and size. Writes bench/results-signal.{json,md}.

    .venv/bin/python bench/bench_signal.py [--tasks classification,regression] [--candidates fp32-ort,int8,...] [--keep-rows]

Each candidate is verified exactly as a build verifies it (verify.verify_artifact against upstream
AutoGluon Tab2D with the same weights, references cached under artifacts/bench/signal/), with bounds
switched off so that every number is recorded. The numbers that judge a candidate:
- err/spread: RMS(candidate - upstream) / upstream's spread across a table's query rows; the worst
  cell of the matrix (tables with >= 8 query rows) and each real table;
- centred argmax agreement (classifier) / centred correlation (regressor), the worst;
- batch dependence: max |a query row predicted alone - the same row in its batch|.
Synthetic full-size weights (seed 0), like the demo's builds when the hub is unreachable: the task
scores themselves sit at chance and are not reported here (the manifest has them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORK = REPO_ROOT / "artifacts" / "bench" / "signal"


@dataclass(frozen=True)
class Candidate:
    name: str
    recipe: str  # what it is made by (a reduced-precision recipe of the registry, or an fp32 flavour)
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


CANDIDATES = {c.name: c for c in (
    Candidate("fp32-ort", "fp32-ort", note="the optimized fp32 every reduced precision is made from"),
    Candidate("fp16", "fp16"),
    Candidate("int8", "int8", note="the configured int8: per-row activation scales, 7-bit weights rounded by GPTQ"),
    Candidate("int8-nearest", "int8", {"rounding": "nearest"}, "7-bit weights rounded to nearest (before GPTQ)"),
    Candidate("int8-tensor", "int8", {"activations": "tensor"}, "ONNX Runtime's per-tensor dynamic int8 (before)"),
    Candidate("int4", "int4", note="the configured int4 (config/mitra-build.toml)"),
    Candidate("int4-b32-acc4", "int4", {"block_size": 32, "accuracy_level": 4, "eight_bit": []},
              "every weight at 4 bits, block 32, int8 activations (before)"),
    Candidate("int4-b32-acc0", "int4", {"block_size": 32, "accuracy_level": 0, "eight_bit": []},
              "every weight at 4 bits, block 32, fp32 activations"),
    Candidate("int4-b16-acc4", "int4", {"block_size": 16, "accuracy_level": 4, "eight_bit": []},
              "every weight at 4 bits, block 16 (60 MB: over the 55 MB budget)"),
    Candidate("int4-v8", "int4", {"eight_bit": ["attention2/v"]}, "feature-attention values at 8 bits"),
    Candidate("int4-vo8", "int4", {"eight_bit": ["attention2/v", "attention2/o"]},
              "feature-attention values and output at 8 bits"),
)}


def prepare(task: str, names: list[str], *, rebuild: bool = False) -> tuple[Path, dict[str, Path]]:
    """The full-size synthetic snapshot and each candidate's file (built once, reused unless `rebuild`)."""
    from mitra_model.build.config import load_config
    from mitra_model.build.export import export_onnx
    from mitra_model.build.recipes import quantize_onnx
    from mitra_model.model.snapshot import load_model, write_synthetic_snapshot

    config = load_config()
    folder = WORK / task
    snapshot = folder / "snapshot"
    if not (snapshot / "model.safetensors").exists():
        write_synthetic_snapshot(snapshot, task=task, size_name="full", size=config.sizes["full"], seed=0)
    optimized = folder / "fp32-ort.onnx"
    if not optimized.exists():
        model, _ = load_model(snapshot)
        export_onnx(model, optimized, opset=config.export.opset, trace_shape=config.export.trace_shape,
                    flavour="optimized")
    files = {}
    for name in names:
        candidate = CANDIDATES[name]
        path = folder / f"{name}.onnx"
        if candidate.recipe != "fp32-ort" and (rebuild or not path.exists()):
            options = candidate.options or config.artifacts.options.get(candidate.recipe)
            quantize_onnx(optimized, path, precision=candidate.recipe, options=options)
        files[name] = optimized if candidate.recipe == "fp32-ort" else path
    return snapshot, files


def measure(task: str, snapshot: Path, name: str, path: Path) -> dict[str, Any]:
    from mitra_model.build.config import Tolerance, load_config
    from mitra_model.build.reference import reference_for
    from mitra_model.build.verify import graph_candidate, verify_artifact

    config = load_config()
    seed = config.verification.seed
    unbounded = Tolerance(max_abs=1e9, min_argmax_agreement=0.0, min_correlation=-1.0)
    started = time.perf_counter()
    report = verify_artifact(
        lambda case: reference_for(snapshot, case, seed=seed, cache_dir=WORK / "reference"), graph_candidate(path),
        cells=config.verification.cells, tolerance=unbounded, precision=name, seed=seed,
        is_classifier=task == "classification", tasks=config.verification.tasks_for(task),
    )
    judged = [c for c in report.cells if c.shape[2] >= unbounded.signal_min_rows and c.metrics.err_over_spread is not None]
    agreement_key = "centered_argmax_agreement" if task == "classification" else "centered_correlation"

    def worst(results: list, key: str, fn=max) -> float | None:  # noqa: ANN001
        values = [getattr(r.metrics, key) for r in results if getattr(r.metrics, key) is not None]
        return fn(values) if values else None

    return {
        "candidate": name, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "file_mb": round(path.stat().st_size / 1e6, 1), "seconds": round(time.perf_counter() - started, 1),
        "matrix": {"max_err_over_spread": worst(judged, "err_over_spread"),
                   agreement_key: worst(judged, agreement_key, min),
                   "max_abs_err": worst(report.cells, "max_abs_err"),
                   "max_batch_dependence": worst(report.cells, "batch_dependence")},
        "tasks": {t.name: {"err_over_spread": t.metrics.err_over_spread, agreement_key: getattr(t.metrics, agreement_key),
                           "batch_dependence": t.metrics.batch_dependence} for t in report.tasks},
    }


def _row_dates(results: dict[str, Any]) -> str:
    """Where rows were kept from an earlier run (--keep-rows): when each was measured."""
    by_hour: dict[str, list[str]] = {}
    for task, rows in results["tasks"].items():
        for row in rows:
            by_hour.setdefault(row.get("date", "")[:13], []).append(f"{task} {row['candidate']}")
    if len(by_hour) <= 1:
        return ""
    return " (rows measured at different times: " + "; ".join(
        f"{', '.join(names)} at {hour.replace('T', ' ')}h UTC" if hour else f"{', '.join(names)} undated"
        for hour, names in sorted(by_hour.items())) + ")"


def render(results: dict[str, Any], machine_text: str) -> str:
    def f(value: float | None, fmt: str = ".4f") -> str:
        if value is None:
            return "–"
        return format(value, ".1e" if fmt == ".4f" and 0 < abs(value) < 1e-3 else fmt)

    lines = ["# Signal benchmark: what each artifact keeps of upstream's input-dependent output (full size)", "",
             f"{machine_text} Date: {results['date']}{_row_dates(results)}. Synthetic full-size weights (seed 0); references are upstream "
             "AutoGluon Tab2D with the same weights. err/spread = RMS(artifact − upstream) / upstream's spread across "
             "a table's query rows (matrix: worst cell with ≥ 8 query rows); batch dependence = max |a query row "
             "alone − in its batch| over the matrix and the tables.", ""]
    for task, rows in results["tasks"].items():
        agreement = "centred argmax agreement" if task == "classification" else "centred correlation"
        key = "centered_argmax_agreement" if task == "classification" else "centered_correlation"
        tables = list(rows[0]["tasks"]) if rows else []
        lines += [f"## {task}", "",
                  f"| candidate | MB | matrix err/spread | matrix {agreement} | "
                  + " | ".join(f"{t} err/spread" for t in tables) + f" | worst table {agreement} | batch dependence | "
                  "what it is |", "|---" * (6 + len(tables)) + "|"]
        for row in rows:
            table_values = [row["tasks"][t]["err_over_spread"] for t in tables]
            table_agreement = [row["tasks"][t][key] for t in tables if row["tasks"][t][key] is not None]
            dependence = [row["matrix"]["max_batch_dependence"], *(row["tasks"][t]["batch_dependence"] for t in tables)]
            lines.append(
                f"| {row['candidate']} | {row['file_mb']} | {f(row['matrix']['max_err_over_spread'])} | "
                f"{f(row['matrix'][key])} | " + " | ".join(f(v) for v in table_values)
                + f" | {f(min(table_agreement) if table_agreement else None)} | "
                f"{f(max(d for d in dependence if d is not None), '.1e')} | {CANDIDATES[row['candidate']].note} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="classification,regression")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--output-prefix", type=Path, default=BENCH_DIR / "results-signal")
    parser.add_argument("--keep-rows", action="store_true",
                        help="keep the rows of candidates this run does not measure from OUTPUT_PREFIX.json")
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild the candidates' files under artifacts/bench/signal (after a recipe changed)")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH_DIR))
    from bench_core import machine, machine_line, write_results

    host = machine()
    names = args.candidates.split(",")
    results: dict[str, Any] = {"machine": host, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                               "command": " ".join(["bench/bench_signal.py", *sys.argv[1:]]), "tasks": {}}
    saved = Path(f"{args.output_prefix}.json")
    kept = json.loads(saved.read_text())["tasks"] if args.keep_rows and saved.exists() else {}
    for task in args.tasks.split(","):
        snapshot, files = prepare(task, names, rebuild=args.rebuild)
        measured = {}
        for name in names:
            measured[name] = measure(task, snapshot, name, files[name])
            print(json.dumps(measured[name]), flush=True)
        earlier = [row for row in kept.get(task, []) if row["candidate"] not in measured]
        order = list(CANDIDATES)
        results["tasks"][task] = sorted([*earlier, *measured.values()], key=lambda row: order.index(row["candidate"]))
    results["tasks"] = {task: results["tasks"][task] if task in results["tasks"] else kept[task]
                        for task in dict.fromkeys([*kept, *results["tasks"]])}  # the saved file's order first
    report = render(results, machine_line(host))
    write_results(args.output_prefix, results, report)
    print(report)


if __name__ == "__main__":
    main()
