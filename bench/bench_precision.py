"""Precision and speed benchmark on the full-size model, all engines in one run on the same inputs:
upstream AutoGluon Tab2D in PyTorch eager (the test oracle, loaded with the same weights), our
upstream-equivalent PyTorch module, portable fp32, ORT-optimized fp32, and every reduced precision of the recipe registry (int8, fp16, int4).

    .venv/bin/python bench/bench_precision.py [--repeats 5] [--task classification]

Every engine runs in a process of its own (so its peak RSS is its own), all loaded before anything is
timed. Latency is measured in paired repeats: for each shape, every engine runs one forward back to back
(the order turning each time) while the others sit idle, after one warm-up per shape. Ratios are the
median over repeats of the per-repeat ratio. On a shared 2-core VM whose speed drifts by ±20% over
minutes, only engines timed within seconds of each other compare; one fresh process per engine per
round (a minute apart) still let drift decide ratios near 1.3x. Errors are measured against PyTorch
fp32 on identical inputs.
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

from mitra_model.build import recipes
from mitra_model.build.config import load_config
from mitra_model.release.layout import FLAVOUR_FILES, precision_file

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)

WORK = REPO_ROOT / "artifacts" / "bench"
SHAPES = [(1, 512, 32, 16), (2, 256, 16, 8), (1, 2048, 8, 4)]
COMPOSITION_SHAPE = (2, 256, 16, 8)  # batch-composition dependence: a table alone vs in a batch of 2
REDUCED = recipes.choices("precisions")  # every reduced precision the registry has (int8, fp16, int4, ...)
# An option of a reduced precision against the configured one: engine -> (recipe, options)
OPTION_ENGINES = {
    "int8-tensor": ("int8", {"activations": "tensor"}),  # ORT's dynamic int8, one scale per tensor (before)
    "int4-all4": ("int4", {"eight_bit": []}),  # every weight at 4 bits (before)
}
ENGINES = ("upstream", "torch", "portable", "optimized", *REDUCED, *OPTION_ENGINES)
FILES = {**FLAVOUR_FILES, **{precision: precision_file(precision) for precision in REDUCED},
         **{engine: f"model-{engine}.onnx" for engine in OPTION_ENGINES}}


def prepare(task: str) -> Path:
    """Snapshot and the ONNX files (built once, reused)."""
    from mitra_model.build.export import export_onnx
    from mitra_model.build.recipes import quantize_onnx
    from mitra_model.model.snapshot import load_model, write_synthetic_snapshot

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
    for precision in REDUCED:
        if not (folder / FILES[precision]).exists():
            options = config.artifacts.options_for(recipes.recipe(precision))
            quantize_onnx(folder / FILES["optimized"], folder / FILES[precision], precision=precision, options=options)
    for engine, (precision, options) in OPTION_ENGINES.items():
        if not (folder / FILES[engine]).exists():
            quantize_onnx(folder / FILES["optimized"], folder / FILES[engine], precision=precision, options=options)
    return folder


def load_engine(engine: str, folder: Path):  # noqa: ANN201
    """(config, run): `run(inputs) -> np.ndarray` for one engine, loaded in this process."""
    import torch

    from mitra_model.build.export import INPUT_NAMES, numpy_inputs
    from mitra_model.build.verify import onnx_session
    from mitra_model.model.snapshot import load_model

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
    return model.config, run


def timed(run) -> float:  # noqa: ANN001
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def serve(engine: str, handlers: dict) -> None:  # noqa: ANN001
    """Answer requests "COMMAND [ARG]" on stdin with one JSON line each, until "quit" (answered with
    this process's peak RSS). `handlers[COMMAND](ARG...)` returns the reply."""
    import resource

    print(json.dumps({"ready": engine}), flush=True)
    for line in sys.stdin:
        command, *arg = line.split()
        if command == "quit":
            print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}), flush=True)
            return
        print(json.dumps(handlers[command](*arg)), flush=True)


def worker(engine: str, folder: Path) -> None:
    """Serve one engine: "warm-up I" (saves the outputs for the errors), "time I", "composition", "quit"."""
    from mitra_model.model.inputs import make_inputs

    config, run = load_engine(engine, folder)
    inputs = [make_inputs(shape, config=config, seed=0, salt="bench-precision") for shape in SHAPES]

    def warm_up(index: str) -> dict:
        shape = SHAPES[int(index)]
        np.save(folder / f"out-{engine}-{'x'.join(map(str, shape))}.npy", run(inputs[int(index)]))
        return {}

    serve(engine, {
        "warm-up": warm_up,
        "time": lambda index: {"seconds": timed(lambda: run(inputs[int(index)]))},
        "composition": lambda: composition_dependence(run, config),
    })


class Engine:
    """One engine's worker process: requests are answered one at a time while the others sit idle."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, request: str) -> dict:
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return self.reply()

    def reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"engine {self.name} exited (code {self.process.wait()})")
        return json.loads(line)


def composition_dependence(run, config) -> dict[str, float]:
    """How much one table's (or query row's) output moves with what else is in the call: dynamic int8
    computes activation scales over the whole call, so its outputs depend on the batch; fp32 should not."""
    from mitra_model.model.inputs import make_inputs

    inputs = make_inputs(COMPOSITION_SHAPE, config=config, seed=1, salt="bench-composition")
    together = run(inputs)
    alone = run({name: value[:1] for name, value in inputs.items()})
    half = COMPOSITION_SHAPE[2] // 2
    fewer_queries = run({**inputs, "x_query": inputs["x_query"][:, :half]})
    one_query = run({**inputs, "x_query": inputs["x_query"][:, :1]})
    return {"table_alone_vs_in_batch": float(np.abs(alone - together[:1]).max()),
            "half_the_queries_vs_all": float(np.abs(fewer_queries - together[:, :half]).max()),
            "one_query_row_vs_all": float(np.abs(one_query - together[:, :1]).max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="classification", choices=("classification", "regression"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=ENGINES)
    parser.add_argument("--output-prefix", type=Path, default=REPO_ROOT / "bench" / "results-precision",
                        help="writes PREFIX.md and PREFIX.json")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated subset (torch and portable are always run: errors and ratios use them)")
    args = parser.parse_args()
    chosen = [e for e in ENGINES if e in {"torch", "portable", *args.engines.split(",")}]
    folder = WORK / f"precision-{args.task}"
    if args.worker:
        worker(args.worker, folder)
        return
    prepare(args.task)
    engines_running = {engine: Engine(engine, [sys.executable, __file__, "--worker", engine, "--task", args.task])
                       for engine in chosen}
    try:
        for engine in engines_running.values():
            engine.reply()  # ready: every model loaded before anything is timed
        for index in range(len(SHAPES)):
            for engine in engines_running.values():
                engine.ask(f"warm-up {index}")
        seconds = paired_repeats(engines_running, args.repeats)
        composition = {name: engine.ask("composition") for name, engine in engines_running.items()}
        peaks = {name: engine.ask("quit")["peak_rss_gib"] for name, engine in engines_running.items()}
    finally:
        for engine in engines_running.values():
            engine.process.kill()
    engines = {
        engine: {
            "engine": engine,
            "peak_rss_gib": peaks[engine],
            "composition": composition[engine],
            "shapes": [{"shape": shape, "median_s": statistics.median(seconds[engine][i]), "runs_s": seconds[engine][i]}
                       for i, shape in enumerate(SHAPES)],
        }
        for engine in chosen
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
    from bench_core import machine, write_results  # same folder

    results = {"machine": machine(), "task": args.task, "repeats": args.repeats, "engines": engines}
    write_results(args.output_prefix, results, render(results))
    print(render(results))


def paired_repeats(engines: dict[str, Engine], repeats: int) -> dict[str, list[list[float]]]:
    """seconds[engine][shape][repeat]: in each repeat every engine runs one forward of a shape back to
    back (the order turning), so the engines' times within a repeat share the machine's conditions."""
    names = list(engines)
    seconds: dict[str, list[list[float]]] = {name: [[] for _ in SHAPES] for name in names}
    for repeat in range(repeats):
        for index, shape in enumerate(SHAPES):
            turn = (repeat + index) % len(names)
            for name in names[turn:] + names[:turn]:
                seconds[name][index].append(engines[name].ask(f"time {index}")["seconds"])
            print(f"repeat {repeat + 1}/{repeats} {shape}: " + ", ".join(f"{n} {seconds[n][index][-1]:.2f}" for n in names),
                  file=sys.stderr, flush=True)
    return seconds


def paired_ratio(engines: dict, slow: str, fast: str, index: int) -> float:
    """Median over repeats of slow/fast, each repeat's two forwards timed back to back."""
    runs = zip(engines[slow]["shapes"][index]["runs_s"], engines[fast]["shapes"][index]["runs_s"])
    return statistics.median(a / b for a, b in runs)


def render(r: dict) -> str:
    from bench_core import machine_line

    m, engines = r["machine"], r["engines"]
    reduced = [e for e in engines if e not in ("upstream", "torch", "portable", "optimized")]
    lines = [
        "# Precision and speed benchmark (full-size model)", "",
        f"{machine_line(m)} Task {r['task']}, synthetic full-size weights, identical inputs. Each engine "
        f"in a process of its own, all loaded first; one warm-up per shape, then {r['repeats']} repeats in which every "
        "engine runs one forward of the shape back to back (order turning). Latency: median over repeats; ratios: "
        "median of the per-repeat ratios (robust to this VM's drift over minutes). Errors vs PyTorch fp32. "
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
              "| engine | table alone vs in a batch of 2 | half the query rows vs all | one query row vs all |",
              "|---|---|---|---|"]
    for name, e in engines.items():
        c = e["composition"]
        lines.append(f"| {name} | {c['table_alone_vs_in_batch']:.2e} | {c['half_the_queries_vs_all']:.2e} | "
                     f"{c['one_query_row_vs_all']:.2e} |")
    lines += ["", "Speed-up ratios (median of per-repeat ratios; targets: optimized >= 1.3x PyTorch, int8 >= 1.8x "
              "portable):", "",
              "| shape | optimized vs upstream | optimized vs our PyTorch | portable vs our PyTorch | "
              + " | ".join(f"{p} vs portable" for p in reduced) + " |", "|---" * (4 + len(reduced)) + "|"]
    pairs = [("upstream", "optimized"), ("torch", "optimized"), ("torch", "portable"),
             *(("portable", precision) for precision in reduced)]
    for i, shape in enumerate(SHAPES):
        cells = " | ".join(f"{paired_ratio(engines, slow, fast, i):.2f}x" if slow in engines and fast in engines else "-"
                           for slow, fast in pairs)
        lines.append(f"| {'x'.join(map(str, shape))} | {cells} |")
    lines += ["", "Each option measured for a reduced precision, with its size, speed and error: "
              "`results-precision-options.md` (int8 activation schemes, MatMulNBits at 8 bits, static scales), "
              "`results-ceiling-int8.md` (where int8's time goes, and the most any int8 graph can gain here), "
              "`results-int4-options.md` (int4's weight roles, blocks, HQQ, GPTQ, bits per weight), "
              "`results-signal.md` (what each artifact keeps of the signal, on the matrix and the real tables)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent), str(REPO_ROOT / "tests")]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
