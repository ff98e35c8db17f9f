"""Precision and speed benchmark on the full-size model, all engines in one run on the same inputs:
upstream AutoGluon Tab2D in PyTorch eager (the test oracle, loaded with the same weights), our
upstream-equivalent PyTorch module, portable fp32, ORT-optimized fp32, int8 and fp16 ONNX.

    .venv/bin/python bench/bench_precision.py [--repeats 3] [--task classification]

Latency is measured in rounds: each round runs every engine once, in a fresh process of its own (so
its peak RSS is its own), one warm-up then one timed forward per shape, and the engines' order turns
from round to round. The median over `--repeats` rounds is reported. On a shared 2-core VM whose
speed drifts by ±20% over minutes, this puts every engine under the same conditions; timing each
engine's repeats back to back did not. Errors are measured against PyTorch fp32 on identical inputs.
Writes bench/results-precision.{json,md}. Takes ~20 min on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mitra_model.config import REPO_ROOT, load_config

WORK = REPO_ROOT / "artifacts" / "bench"
SHAPES = [(1, 512, 32, 16), (2, 256, 16, 8), (1, 2048, 8, 4)]
COMPOSITION_SHAPE = (2, 256, 16, 8)  # batch-composition dependence: a table alone vs in a batch of 2
ENGINES = ("upstream", "torch", "portable", "optimized", "int8", "fp16")
FILES = {"portable": "model.onnx", "optimized": "model-ort.onnx", "int8": "model-int8.onnx", "fp16": "model-fp16.onnx"}


def prepare(task: str) -> Path:
    """Snapshot and the four ONNX files (built once, reused)."""
    from mitra_model.export import export_onnx
    from mitra_model.quantize import quantize_onnx
    from mitra_model.snapshot import load_model, write_synthetic_snapshot

    config = load_config()
    folder = WORK / f"precision-{task}"
    snapshot = folder / "snapshot"
    if not (snapshot / "model.safetensors").exists():
        write_synthetic_snapshot(snapshot, task=task, size_name="full", size=config.sizes["full"], seed=0)
    model, _ = load_model(snapshot)
    for flavour in ("portable", "optimized"):
        if not (folder / FILES[flavour]).exists():
            export_onnx(model, folder / FILES[flavour], opset=config.export.opset,
                        trace_shape=config.export.trace_shape, flavour=flavour)
    for precision in ("int8", "fp16"):
        if not (folder / FILES[precision]).exists():
            quantize_onnx(folder / FILES["optimized"], folder / FILES[precision], precision=precision)
    return folder


def child(engine: str, folder: Path, first_round: bool) -> None:
    """One round of one engine: per shape a warm-up and one timed forward; print a JSON line with the
    times and this process's peak RSS. The first round also saves the outputs (for the errors) and
    measures batch-composition dependence."""
    import resource

    import torch

    from mitra_model.export import INPUT_NAMES, numpy_inputs
    from mitra_model.inputs import make_inputs
    from mitra_model.snapshot import load_model
    from mitra_model.verify import onnx_session

    model, _ = load_model(folder / "snapshot")
    if engine == "upstream":
        from upstream import build_upstream, run_upstream  # tests/upstream.py: the oracle without AutoGluon's tree

        c = model.config
        reference = build_upstream(c.dim, c.dim_output, c.n_layers, c.n_heads, c.task.value, seed=0)
        reference.load_state_dict(model.state_dict(), strict=True)

        def run(inputs):
            return run_upstream(reference, *numpy_inputs(inputs)).numpy()
    elif engine == "torch":
        def run(inputs):
            with torch.no_grad():
                return model(*numpy_inputs(inputs)).numpy()
    else:
        session = onnx_session(folder / FILES[engine], memory_arena=True)  # ORT's default session options

        def run(inputs):
            return session.run(None, {name: inputs[name] for name in INPUT_NAMES})[0]
    seconds = []
    for shape in SHAPES:
        inputs = make_inputs(shape, config=model.config, seed=0, salt="bench-precision")
        output = run(inputs)  # warm-up
        started = time.perf_counter()
        run(inputs)
        seconds.append(time.perf_counter() - started)
        if first_round:
            np.save(folder / f"out-{engine}-{'x'.join(map(str, shape))}.npy", output)
        print(f"{engine} {shape}: {seconds[-1]:.2f} s", file=sys.stderr, flush=True)
    composition = composition_dependence(run, model.config) if first_round else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"engine": engine, "peak_rss_gib": peak, "seconds": seconds, "composition": composition}))


def composition_dependence(run, config) -> dict[str, float]:
    """How much one table's (or query row's) output moves with what else is in the call: dynamic int8
    computes activation scales over the whole call, so its outputs depend on the batch; fp32 should not."""
    from mitra_model.inputs import make_inputs

    inputs = make_inputs(COMPOSITION_SHAPE, config=config, seed=1, salt="bench-composition")
    together = run(inputs)
    alone = run({name: value[:1] for name, value in inputs.items()})
    half = COMPOSITION_SHAPE[2] // 2
    fewer_queries = run({**inputs, "x_query": inputs["x_query"][:, :half]})
    return {"table_alone_vs_in_batch": float(np.abs(alone - together[:1]).max()),
            "half_the_queries_vs_all": float(np.abs(fewer_queries - together[:, :half]).max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="classification", choices=("classification", "regression"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=ENGINES)
    parser.add_argument("--first-round", action="store_true")
    args = parser.parse_args()
    folder = WORK / f"precision-{args.task}"
    if args.child:
        child(args.child, folder, args.first_round)
        return
    prepare(args.task)
    rounds: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for number in range(args.repeats):
        order = ENGINES[number % len(ENGINES):] + ENGINES[:number % len(ENGINES)]
        for engine in order:
            command = [sys.executable, __file__, "--child", engine, "--task", args.task]
            done = subprocess.run(command + (["--first-round"] if number == 0 else []), check=True,
                                  stdout=subprocess.PIPE, text=True)
            rounds[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
    engines = {
        engine: {
            "engine": engine,
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
            "composition": runs[0]["composition"],
            "shapes": [{"shape": shape, "median_s": statistics.median(r["seconds"][i] for r in runs),
                        "runs_s": [r["seconds"][i] for r in runs]} for i, shape in enumerate(SHAPES)],
        }
        for engine, runs in rounds.items()
    }
    for engine, result in engines.items():
        result["file_mb"] = (folder / FILES[engine]).stat().st_size / 1e6 if engine in FILES else None
        for entry in result["shapes"]:
            tag = "x".join(map(str, entry["shape"]))
            ref, out = np.load(folder / f"out-torch-{tag}.npy"), np.load(folder / f"out-{engine}-{tag}.npy")
            entry["max_abs_err"] = float(np.abs(out - ref).max())
            if args.task == "classification":
                entry["argmax_agreement"] = float((out.argmax(-1) == ref.argmax(-1)).mean())
            else:
                entry["correlation"] = float(np.corrcoef(out.ravel(), ref.ravel())[0, 1])
    from bench_core import machine  # same folder

    results = {"machine": machine(), "task": args.task, "repeats": args.repeats, "engines": engines}
    (REPO_ROOT / "bench" / "results-precision.json").write_text(json.dumps(results, indent=2) + "\n")
    (REPO_ROOT / "bench" / "results-precision.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    m, engines = r["machine"], r["engines"]
    lines = [
        "# Precision and speed benchmark (full-size model)", "",
        f"Machine: {m['cpu']}, {m['cores']} threads, {m['memory_gib']} GiB RAM; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}. Task {r['task']}, synthetic full-size weights, median of {r['repeats']} "
        "rounds (each round: every engine in a fresh process, one warm-up then one timed forward per shape, the "
        "engines' order turning from round to round) on identical inputs. Errors vs PyTorch fp32. "
        "ONNX Runtime sessions use its default options (CPU memory arena on; the pipeline's verification turns it "
        "off to lower peak RSS at large S, see results-memory.md).", "",
        "Engines: `upstream` is AutoGluon 1.6.3's own Tab2D (CPU path); `torch` is our PyTorch rewrite "
        "(same numbers, skips upstream's unused last-layer support update), the reference for errors.", "",
        "| engine | file MB | peak RSS GiB | " + " | ".join(f"{'x'.join(map(str, s))} s" for s in SHAPES)
        + " | max abs err | agreement / corr |",
        "|---|---|---|" + "---|" * len(SHAPES) + "---|---|",
    ]
    for name, e in engines.items():
        times = " | ".join(f"{s['median_s']:.2f}" for s in e["shapes"])
        err = max(s["max_abs_err"] for s in e["shapes"])
        quality = min(s.get("argmax_agreement", s.get("correlation", 1.0)) for s in e["shapes"])
        size = "-" if e["file_mb"] is None else f"{e['file_mb']:.1f}"
        lines.append(f"| {name} | {size} | {e['peak_rss_gib']:.2f} | {times} | {err:.2e} | {quality:.4f} |")
    lines += ["", f"Batch-composition dependence at {'x'.join(map(str, COMPOSITION_SHAPE))} (max abs change of an output "
              "when the rest of the call changes; dynamic int8 computes activation scales per call):", "",
              "| engine | table alone vs in a batch of 2 | half the query rows vs all |", "|---|---|---|"]
    for name, e in engines.items():
        c = e["composition"]
        lines.append(f"| {name} | {c['table_alone_vs_in_batch']:.2e} | {c['half_the_queries_vs_all']:.2e} |")
    lines += ["", "Speed-up ratios (median latency; targets: optimized >= 1.3x PyTorch, int8 >= 1.8x portable):", "",
              "| shape | optimized vs upstream | optimized vs our PyTorch | portable vs our PyTorch | int8 vs portable "
              "| fp16 vs portable |", "|---|---|---|---|---|---|"]
    for i, shape in enumerate(SHAPES):
        t = {name: e["shapes"][i]["median_s"] for name, e in engines.items()}
        lines.append(f"| {'x'.join(map(str, shape))} | {t['upstream'] / t['optimized']:.2f}x | {t['torch'] / t['optimized']:.2f}x "
                     f"| {t['torch'] / t['portable']:.2f}x | {t['portable'] / t['int8']:.2f}x | {t['portable'] / t['fp16']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent), str(REPO_ROOT / "tests")]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
