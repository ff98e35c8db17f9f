"""Peak memory of one ONNX Runtime forward at Mitra's real support sizes: before and after, per flavour.

    .venv/bin/python bench/bench_memory.py [--limit-gib 19]

Targets (issue 5): with the optimized flavour, a tiny-model forward at (1,4096,16,64) peaks under
1.5 GB RSS and a full-size forward at (1,4096,32,32) completes on a 24 GB machine.

Four exports of the same weights: {portable, optimized} attention x {all-pairs, binary-search}
bucketize. "all-pairs" is the quantile embedding before issue 5 (every value compared with all 999
boundaries: a (B, F, S+Q, 999) intermediate); "binary-search" is what the pipeline ships. So
portable/all-pairs is the original plain export, optimized/binary-search the shipped optimized
flavour, and the other two isolate what each change bought.

Each forward runs in its own process (CPU memory arena off, as in the pipeline's verification),
sampled every 50 ms; a process above --limit-gib is killed and reported as such, with the size of
the attention scores the portable graph materializes. Writes bench/results-memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mitra_model.build.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)

WORK = REPO_ROOT / "artifacts" / "bench" / "memory"
# (model size, (B, S, Q, F)); S=2048 tiny is where every variant still fits, for ratios measured to the end
RUNS = [("tiny", (1, 2048, 16, 64)), ("tiny", (1, 4096, 16, 64)), ("full", (1, 4096, 32, 32))]
FLAVOURS = ("portable", "optimized")
BUCKETIZE = ("all-pairs", "binary-search")
SAMPLE_SECONDS = 0.05


def bucketize_all_pairs(values, boundaries, n_boundaries: int):  # noqa: ANN001, ANN201
    """The quantile embedding's bucketize before issue 5: count of boundaries strictly below each value,
    by comparing every value with every boundary (a (..., N, 999) intermediate)."""
    return (values.unsqueeze(-1) > boundaries.unsqueeze(-2)).sum(-1)


def variant_file(folder: Path, flavour: str, bucketize: str) -> Path:
    return folder / f"{flavour}-{bucketize}.onnx"


def prepare(size: str) -> Path:
    """Snapshot and the four exports of one model size (built once, reused)."""
    from unittest import mock

    from mitra_model.build.export import export_onnx
    from mitra_model.model import tab2d as model_module
    from mitra_model.model.snapshot import load_model, write_synthetic_snapshot

    config = load_config()
    folder = WORK / size
    if not (folder / "snapshot" / "model.safetensors").exists():
        write_synthetic_snapshot(folder / "snapshot", task="classification", size_name=size, size=config.sizes[size], seed=0)
    model, _ = load_model(folder / "snapshot")
    for flavour in FLAVOURS:
        for bucketize in BUCKETIZE:
            path = variant_file(folder, flavour, bucketize)
            if path.exists():
                continue
            replacement = bucketize_all_pairs if bucketize == "all-pairs" else model_module.bucketize_strict
            with mock.patch.object(model_module, "bucketize_strict", replacement):
                export_onnx(model, path, opset=config.export.opset, trace_shape=config.export.trace_shape, flavour=flavour)
    return folder


def child(path: Path, shape: tuple[int, ...]) -> None:
    from mitra_model.build.export import INPUT_NAMES
    from mitra_model.build.verify import onnx_session
    from mitra_model.model.inputs import make_inputs
    from mitra_model.model.tab2d import MitraConfig, Task

    session = onnx_session(path)
    config = MitraConfig(dim=8, dim_output=10, n_layers=1, n_heads=1, task=Task.CLASSIFICATION)  # inputs only
    inputs = make_inputs(shape, config=config, seed=0, salt="memory")
    started = time.perf_counter()
    session.run(None, {name: inputs[name] for name in INPUT_NAMES})
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def measure(path: Path, shape: tuple[int, ...], limit_gib: float) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(path), *map(str, shape)], stdout=subprocess.PIPE, text=True)
    handle, sampled, killed = psutil.Process(proc.pid), 0, False
    while proc.poll() is None:
        try:
            sampled = max(sampled, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if sampled > limit_gib * 2**30:
            proc.kill()
            killed = True
            break
        time.sleep(SAMPLE_SECONDS)
    out, _ = proc.communicate()
    if proc.returncode == 0:
        report = json.loads(out.strip().splitlines()[-1])  # the child's own exact peak (getrusage)
        return {"peak_rss_gib": report["peak_rss_gib"], "killed_at_limit": False, "seconds": report["seconds"], "returncode": 0}
    return {"peak_rss_gib": sampled / 2**30, "killed_at_limit": killed, "seconds": None, "returncode": proc.returncode}


def attention_scores_gib(size: str, shape: tuple[int, ...]) -> float:
    """What one (B*(F+1), H, S, S) float32 score tensor of support row attention takes, in GiB: the
    portable graph materializes it (and the Softmax output beside it)."""
    batch, support, _, features = shape
    heads = load_config().sizes[size].n_heads
    return batch * (features + 1) * heads * support * support * 4 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit-gib", type=float, default=19.0)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), tuple(int(v) for v in args.child[1:]))
        return
    from bench_core import machine

    rows = []
    for size, shape in RUNS:
        folder = prepare(size)
        for flavour in FLAVOURS:
            for bucketize in BUCKETIZE:
                result = measure(variant_file(folder, flavour, bucketize), shape, args.limit_gib)
                rows.append({"size": size, "shape": shape, "flavour": flavour, "bucketize": bucketize,
                             "scores_gib": attention_scores_gib(size, shape), **result})
                print(rows[-1], flush=True)
    results = {"machine": machine(), "limit_gib": args.limit_gib, "runs": rows}
    (REPO_ROOT / "bench" / "results-memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (REPO_ROOT / "bench" / "results-memory.md").write_text(render(results))
    print(render(results))


def render(results: dict) -> str:
    m, limit = results["machine"], results["limit_gib"]
    lines = ["# Peak RSS of one forward (ONNX Runtime, CPU): before and after, both flavours", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, onnxruntime {m['onnxruntime']}. "
             f"Each forward in a fresh process, CPU memory arena off; peak = the process's own maximum RSS "
             f"(getrusage) when it completes; sampled every 50 ms and killed above {limit:g} GiB otherwise.", "",
             "Bucketize: `all-pairs` is the quantile embedding before this work (a (B, F, S+Q, 999) comparison), "
             "`binary-search` the shipped one. Flavour: `portable` attention is MatMul-Softmax-MatMul, `optimized` "
             "is ONNX Runtime's MultiHeadAttention. Shipped: portable/binary-search (`model.onnx`) and "
             "optimized/binary-search (`model-ort.onnx`). \"scores\" is one (B*(F+1), H, S, S) float32 score "
             "tensor, which the portable graph materializes next to its Softmax output.", "",
             "| model | B,S,Q,F | flavour | bucketize | peak RSS GiB | seconds | scores GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        # killed: the scores and the Softmax output beside them are live at once, >= 2 x scores
        peak = (f"> {limit:g} (killed; needs >= {2 * r['scores_gib']:.1f})" if r["killed_at_limit"]
                else f"{r['peak_rss_gib']:.2f}")
        if r["returncode"] not in (0, -9):
            peak = f"failed (exit {r['returncode']}) at {r['peak_rss_gib']:.2f}"
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['size']} | {','.join(map(str, r['shape']))} | {r['flavour']} | {r['bucketize']} | {peak} "
                     f"| {secs} | {r['scores_gib']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
