"""Peak memory of one ONNX Runtime forward at Mitra's real support sizes, per flavour.

    .venv/bin/python bench/bench_memory.py [--limit-gib 18]

Targets (issue 5): with the optimized flavour, a tiny-model forward at (1,4096,16,64) peaks under
1.5 GB RSS and a full-size forward at (1,4096,32,32) completes on a 24 GB machine. Each forward runs
in its own process, sampled every 50 ms; a process above --limit-gib is killed and reported as such
(the portable flavour materializes the (B*(F+1), H, S, S) attention scores). Writes
bench/results-memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mitra_model.config import REPO_ROOT, load_config

WORK = REPO_ROOT / "artifacts" / "bench" / "memory"
RUNS = [("tiny", (1, 4096, 16, 64)), ("full", (1, 4096, 32, 32))]


def prepare(size: str) -> Path:
    from mitra_model.export import FLAVOUR_FILES, export_onnx
    from mitra_model.snapshot import load_model, write_synthetic_snapshot

    config = load_config()
    folder = WORK / size
    if not (folder / "snapshot" / "model.safetensors").exists():
        write_synthetic_snapshot(folder / "snapshot", task="classification", size_name=size, size=config.sizes[size], seed=0)
    model, _ = load_model(folder / "snapshot")
    for flavour, name in FLAVOUR_FILES.items():
        if not (folder / name).exists():
            export_onnx(model, folder / name, opset=config.export.opset, trace_shape=config.export.trace_shape, flavour=flavour)
    return folder


def child(path: Path, shape: tuple[int, ...]) -> None:
    from mitra_model.export import INPUT_NAMES
    from mitra_model.inputs import make_inputs
    from mitra_model.model import MitraConfig, Task
    from mitra_model.verify import onnx_session

    session = onnx_session(path)
    config = MitraConfig(dim=8, dim_output=10, n_layers=1, n_heads=1, task=Task.CLASSIFICATION)  # inputs only
    inputs = make_inputs(shape, config=config, seed=0, salt="memory")
    started = time.perf_counter()
    session.run(None, {name: inputs[name] for name in INPUT_NAMES})
    print(json.dumps({"seconds": time.perf_counter() - started}))


def measure(path: Path, shape: tuple[int, ...], limit_gib: float) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(path), *map(str, shape)], stdout=subprocess.PIPE, text=True)
    handle, peak, killed = psutil.Process(proc.pid), 0, False
    while proc.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > limit_gib * 2**30:
            proc.kill()
            killed = True
            break
        time.sleep(0.05)
    out, _ = proc.communicate()
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"] if proc.returncode == 0 else None
    return {"peak_rss_gib": peak / 2**30, "killed_at_limit": killed, "seconds": seconds, "returncode": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit-gib", type=float, default=18.0)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), tuple(int(v) for v in args.child[1:]))
        return
    from bench_core import machine
    from mitra_model.export import FLAVOUR_FILES

    rows = []
    for size, shape in RUNS:
        folder = prepare(size)
        for flavour, name in FLAVOUR_FILES.items():
            result = measure(folder / name, shape, args.limit_gib)
            rows.append({"size": size, "shape": shape, "flavour": flavour, **result})
            print(rows[-1], flush=True)
    results = {"machine": machine(), "limit_gib": args.limit_gib, "runs": rows}
    (REPO_ROOT / "bench" / "results-memory.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Peak RSS of one forward (ONNX Runtime, CPU)", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['memory_gib']} GiB RAM, onnxruntime "
             f"{results['machine']['onnxruntime']}. Sampled every 50 ms; killed above {args.limit_gib} GiB.", "",
             "| model | B,S,Q,F | flavour | peak RSS GiB | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        peak = f"> {args.limit_gib:.0f} (killed)" if r["killed_at_limit"] else f"{r['peak_rss_gib']:.2f}"
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['size']} | {','.join(map(str, r['shape']))} | {r['flavour']} | {peak} | {secs} |")
    (REPO_ROOT / "bench" / "results-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
