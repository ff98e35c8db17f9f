"""Fit once, predict many: ONNX Runtime latency of predict-query.onnx against a cached support set vs
the full model.onnx forward, on the full-size model. Writes bench/results-support-cache.{json,md}.

    .venv/bin/python bench/bench_support_cache.py [--support 512 2048] [--queries 1 8 64] [--repeats 3]

Per support size S (one table, F features): the support set is encoded once (encode-support.onnx,
timed like the rest), then for each query count Q the full forward (model.onnx on the same support
rows and the first Q query rows) and the cached predict are each timed as the median of `--repeats`
runs after one warm-up. Every (S, Q) row also records the largest difference between the two
outputs. The snapshot is synthetic (full-size architecture, random weights): speed does not depend on
the weight values. Cost on 2 busy cores: ~5 min for the S=512 rows (export included); the S=2048 rows
add ~20 min (16 forwards of ~1 min each: 4 encodes, 12 full).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine  # noqa: E402

from mitra_model.build.config import load_config  # noqa: E402
from mitra_model.build.export import INPUT_NAMES, export_onnx  # noqa: E402
from mitra_model.build.support_cache import ENCODE_INPUT_NAMES, cache_names, export_support_cache  # noqa: E402
from mitra_model.build.verify import onnx_session  # noqa: E402
from mitra_model.model.inputs import make_inputs  # noqa: E402
from mitra_model.model.snapshot import load_model, write_synthetic_snapshot  # noqa: E402
from mitra_model.release.layout import FLAVOUR_FILES  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)

WORK = REPO_ROOT / "artifacts" / "bench"
TARGET = (512, 8, 30.0)  # (S, Q, speed-up the cache must reach there)


def timed(run: Callable[[], list[np.ndarray]], repeats: int) -> tuple[float, list[np.ndarray]]:
    """Median seconds of `repeats` runs after one warm-up, and the last run's outputs."""
    outputs = run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="classification", choices=("classification", "regression"))
    parser.add_argument("--flavour", default="portable", choices=tuple(FLAVOUR_FILES))
    parser.add_argument("--support", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config()
    snapshot_dir, out_dir = WORK / f"snapshot-{args.task}", WORK / f"support-cache-{args.task}"
    if not (snapshot_dir / "model.safetensors").exists():
        write_synthetic_snapshot(snapshot_dir, task=args.task, size_name="full", size=config.sizes["full"], seed=0)
    model, snapshot = load_model(snapshot_dir)

    started = time.perf_counter()
    full = export_onnx(model, out_dir / FLAVOUR_FILES[args.flavour], opset=config.export.opset,
                       trace_shape=config.export.trace_shape, flavour=args.flavour, metadata=snapshot.onnx_metadata())
    pair = export_support_cache(model, out_dir, opset=config.export.opset, trace_shape=config.export.trace_shape,
                                flavour=args.flavour, metadata=snapshot.onnx_metadata())
    export_s = time.perf_counter() - started
    print(f"exported in {export_s:.0f} s: {full.path.name} {full.size / 1e6:.0f} MB, {pair.encode.path.name} "
          f"{pair.encode.size / 1e6:.0f} MB, {pair.predict.path.name} {pair.predict.size / 1e6:.0f} MB", flush=True)
    del model  # the sessions hold their own weights
    full_session, encoder, predictor = (onnx_session(p, memory_arena=True) for p in (full.path, pair.encode.path, pair.predict.path))

    rows = []
    for n_support in args.support:
        inputs = make_inputs((1, n_support, max(args.queries), args.features), config=snapshot.config, seed=0, salt="bench")
        encode_feed = {name: inputs[name] for name in ENCODE_INPUT_NAMES}
        encode_s, encoded = timed(lambda: encoder.run(None, encode_feed), args.repeats)
        cache = dict(zip(cache_names(snapshot.config.n_layers), encoded))
        cache_bytes = sum(int(array.nbytes) for array in cache.values())
        print(f"S={n_support}: encode {encode_s:.2f} s, cache {cache_bytes / 1e6:.1f} MB", flush=True)
        for n_query in args.queries:
            x_query = np.ascontiguousarray(inputs["x_query"][:, :n_query])
            full_feed = {**{name: inputs[name] for name in INPUT_NAMES}, "x_query": x_query}
            predict_feed = {**cache, "x_query": x_query}
            full_s, (full_out,) = timed(lambda: full_session.run(None, full_feed), args.repeats)
            predict_s, (predict_out,) = timed(lambda: predictor.run(None, predict_feed), args.repeats)
            diff = float(np.abs(full_out - predict_out).max())
            rows.append({
                "n_support": n_support, "n_query": n_query, "n_features": args.features, "full_s": full_s,
                "predict_s": predict_s, "speedup": full_s / predict_s, "encode_s": encode_s, "cache_bytes": cache_bytes,
                "max_abs_diff": diff, "repeats": args.repeats,
            })
            print(f"  Q={n_query}: full {full_s:.3f} s, cached predict {predict_s:.4f} s ({full_s / predict_s:.1f}x), "
                  f"max |diff| {diff:.1e}", flush=True)

    previous = REPO_ROOT / "bench" / "results-support-cache.json"
    if previous.exists():  # keep rows of support sizes not re-measured in this run (same task and flavour)
        old = json.loads(previous.read_text())
        if (old.get("task"), old.get("flavour")) == (args.task, args.flavour):
            kept = [{"repeats": old.get("repeats"), **row} for row in old["rows"] if row["n_support"] not in args.support]
            rows = sorted(kept + rows, key=lambda row: (row["n_support"], row["n_query"]))
    results = {
        "machine": machine(), "task": args.task, "flavour": args.flavour, "repeats": args.repeats,
        "synthetic": snapshot.synthetic, "export_seconds": export_s,
        "files": {r.path.name: {"bytes": r.size, "sha256": r.sha256} for r in (full, pair.encode, pair.predict)},
        "target": {"n_support": TARGET[0], "n_query": TARGET[1], "min_speedup": TARGET[2]},
        "rows": rows,
    }
    (REPO_ROOT / "bench" / "results-support-cache.json").write_text(json.dumps(results, indent=2) + "\n")
    (REPO_ROOT / "bench" / "results-support-cache.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    m = r["machine"]
    files = ", ".join(f"`{name}` {info['bytes'] / 1e6:.0f} MB" for name, info in r["files"].items())
    lines = [
        "# Support cache benchmark: fit once, predict many (full-size model)", "",
        f"Machine: {m['cpu']}, {m['cores']} threads, {m['memory_gib']} GiB RAM; Python {m['python']}, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}. Task: {r['task']}, {r['flavour']} flavour, "
        f"synthetic full-size weights. ONNX Runtime CPU, one table (batch 1); each time is the median of the "
        "row's `runs` after one warm-up.",
        "", f"Files: {files}.", "",
        "| S | Q | F | runs | full forward s | cached predict s | speed-up | encode (once) s | cache MB | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['n_support']} | {row['n_query']} | {row['n_features']} | {row.get('repeats', r['repeats'])} "
            f"| {row['full_s']:.3f} | {row['predict_s']:.4f} "
            f"| {row['speedup']:.1f}x | {row['encode_s']:.2f} | {row['cache_bytes'] / 1e6:.1f} | {row['max_abs_diff']:.1e} |"
        )
    target = r["target"]
    hit = [row for row in r["rows"] if (row["n_support"], row["n_query"]) == (target["n_support"], target["n_query"])]
    if hit:
        verdict = "met" if hit[0]["speedup"] >= target["min_speedup"] else "NOT met"
        lines += ["", f"Target >= {target['min_speedup']:.0f}x at S={target['n_support']}, Q={target['n_query']}: "
                      f"{verdict} ({hit[0]['speedup']:.1f}x)."]
    lines += ["", "The cache is per table: 2 x layers x (F+1) x S x dim float32 K/V, plus 999 quantiles, mean "
                  "and std per feature. Speed-up = full forward / cached predict; the encode is paid once per support set. "
                  "The predict does the query rows' share of the work (Q of S+Q rows) and reads the cache, so the "
                  "speed-up is bounded by about (S+Q)/Q and falls as Q grows."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
