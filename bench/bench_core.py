"""Core benchmark on the full-size model: export time and peak RSS, verification time per cell, and
ONNX Runtime vs PyTorch latency at a few shapes. Writes bench/results-core.{json,md}.

    .venv/bin/python bench/bench_core.py [--task classification] [--repeats 3]

Uses a synthetic full-size snapshot (same architecture and size as the official checkpoints, random
weights): speed and memory do not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import torch

from mitra_model.build.config import load_config
from mitra_model.build.export import INPUT_NAMES, numpy_inputs
from mitra_model.build.verify import onnx_session
from mitra_model.model.inputs import make_inputs
from mitra_model.model.snapshot import load_model, write_synthetic_snapshot

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)

WORK = REPO_ROOT / "artifacts" / "bench"
LATENCY_SHAPES = [(1, 256, 32, 8), (1, 512, 64, 16), (4, 128, 16, 8)]


# The instruction sets ONNX Runtime's MLAS picks its GEMM kernels by: two hosts both named "AMD EPYC"
# differed 1.6x in fp32 GEMM rate, and int8's speed-up over fp32 depends on VNNI.
GEMM_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine() -> dict[str, str | int]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    return {
        "cpu": cpu, "isa": " ".join(f for f in GEMM_ISA if f in flags),
        "cores": torch.get_num_threads(), "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
    }


def machine_line(m: dict) -> str:
    """How a results file names the machine and runtimes its figures were measured on."""
    isa = f" ({m['isa']})" if m.get("isa") else ""  # results written before it was recorded lack it
    return (f"Machine: {m['cpu']}{isa}, {m['cores']} threads, {m['memory_gib']} GiB RAM; torch {m['torch']}, "
            f"onnxruntime {m['onnxruntime']}.")


def write_results(prefix: Path | str, results: dict, markdown: str) -> None:
    """PREFIX.json (the numbers) and PREFIX.md (the report), as every benchmark writes them."""
    Path(f"{prefix}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{prefix}.md").write_text(markdown)


def run_child(args: list[str]) -> tuple[float, float]:
    """Run a CLI command in a fresh process; return (seconds, that process's own peak RSS in GiB)."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "mitra_model.cli", *args])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"mitra-build {args[0]} failed with exit code {child.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss / 2**20


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="classification", choices=("classification", "regression"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config()
    WORK.mkdir(parents=True, exist_ok=True)
    snapshot_dir, onnx_path, report_path = WORK / f"snapshot-{args.task}", WORK / f"{args.task}.onnx", WORK / "verify.json"
    if not (snapshot_dir / "model.safetensors").exists():
        write_synthetic_snapshot(snapshot_dir, task=args.task, size_name="full", size=config.sizes["full"], seed=0)

    # Each stage in its own process so its peak RSS is its own (export first: the smallest child).
    export_s, export_rss = run_child(["export", "--snapshot", str(snapshot_dir), "--output", str(onnx_path)])
    verify_s, verify_rss = run_child(["verify", "--snapshot", str(snapshot_dir), "--onnx", str(onnx_path), "--report", str(report_path)])
    cells = json.loads(report_path.read_text())["cells"]

    model, _ = load_model(snapshot_dir)
    session = onnx_session(onnx_path, memory_arena=True)  # ORT default options, as a consumer runs it
    latency = []
    for shape in LATENCY_SHAPES:
        inputs = make_inputs(shape, config=model.config, seed=0, salt="bench")
        feed = {name: inputs[name] for name in INPUT_NAMES}
        tensors = numpy_inputs(inputs)
        with torch.no_grad():
            torch_s = median_seconds(lambda: model(*tensors), args.repeats)
        onnx_s = median_seconds(lambda: session.run(None, feed), args.repeats)
        latency.append({"shape": shape, "torch_s": torch_s, "onnx_s": onnx_s, "speedup": torch_s / onnx_s})
        print(f"latency {shape}: torch {torch_s:.2f} s, onnx {onnx_s:.2f} s", flush=True)

    results = {
        "machine": machine(), "task": args.task, "onnx_bytes": onnx_path.stat().st_size,
        "export": {"seconds": export_s, "peak_rss_gib": export_rss},
        "verify": {"seconds": verify_s, "peak_rss_gib": verify_rss,
                   "cells": [{k: c[k] for k in ("name", "shape", "max_abs_err", "torch_seconds", "onnx_seconds")} for c in cells]},
        "latency": latency,
    }
    out = REPO_ROOT / "bench" / "results-core.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    (REPO_ROOT / "bench" / "results-core.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Core benchmark (full-size model)", "",
        f"Machine: {m['cpu']}, {m['cores']} threads, {m['memory_gib']} GiB RAM; Python {m['python']}, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}. Task: {r['task']}, synthetic full-size weights.", "",
        f"- Export (fresh process, `mitra-build export` incl. check): {r['export']['seconds']:.1f} s, "
        f"peak RSS {r['export']['peak_rss_gib']:.2f} GiB, file {r['onnx_bytes'] / 1e6:.1f} MB",
        f"- Verification matrix (fresh process): {r['verify']['seconds']:.1f} s, peak RSS {r['verify']['peak_rss_gib']:.2f} GiB", "",
        "| cell | B,S,Q,F | max abs err | torch s | onnx s |", "|---|---|---|---|---|",
    ]
    for c in r["verify"]["cells"]:
        lines.append(f"| {c['name']} | {','.join(map(str, c['shape']))} | {c['max_abs_err']:.2e} | {c['torch_seconds']:.2f} | {c['onnx_seconds']:.2f} |")
    lines += ["", "Latency, median of repeats after one warm-up:", "",
              "| B,S,Q,F | PyTorch eager s | ONNX Runtime s | ORT speed-up |", "|---|---|---|---|"]
    for entry in r["latency"]:
        lines.append(f"| {','.join(map(str, entry['shape']))} | {entry['torch_s']:.2f} | {entry['onnx_s']:.2f} | {entry['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
