"""Wall time of the full-size verification matrix: in-process (thread runner, one cell at a time)
vs prefect-dask on a 2-worker LocalCluster. Writes bench/results-dask.{json,md}.

    .venv/bin/python bench/bench_dask.py [--flavour optimized]

Both runs go through the same Prefect task (`mitra_model.pipeline.flow.verify_cell`), which loads the snapshot
and the ONNX file by path in whichever process runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, unmapped  # noqa: E402

import mitra_model.pipeline.flow as pipeline  # noqa: E402
from mitra_model.build.config import ExecutionConfig, load_config  # noqa: E402
from mitra_model.build.export import export_onnx  # noqa: E402
from mitra_model.model.snapshot import load_model, write_synthetic_snapshot  # noqa: E402
from mitra_model.release.layout import FLAVOUR_FILES  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)

WORK = REPO_ROOT / "artifacts" / "bench" / "dask"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavour", default="optimized", choices=tuple(FLAVOUR_FILES))
    args = parser.parse_args()
    config = load_config()
    snapshot = WORK / "snapshot"
    if not (snapshot / "model.safetensors").exists():
        write_synthetic_snapshot(snapshot, task="classification", size_name="full", size=config.sizes["full"], seed=0)
    onnx_path = WORK / FLAVOUR_FILES[args.flavour]
    if not onnx_path.exists():
        export_onnx(load_model(snapshot)[0], onnx_path, opset=config.export.opset,
                    trace_shape=config.export.trace_shape, flavour=args.flavour)
    cells = list(config.verification.cells)
    tolerance = config.verification.tolerance("fp32")
    reference_dir = WORK / "reference"

    timings = {}
    for name, execution in (("in-process (thread runner, 1 at a time)", ExecutionConfig()),
                            ("dask LocalCluster, 2 worker processes", ExecutionConfig(task_runner="dask", dask_workers=2))):
        @flow(task_runner=pipeline.task_runner(execution), name="bench-matrix")
        def matrix() -> list:
            futures = pipeline.verify_cell.map(unmapped(snapshot), unmapped((onnx_path,)), cells, unmapped("fp32"),
                                               unmapped("graph"), unmapped(tolerance), unmapped(config.verification.seed),
                                               unmapped(reference_dir))
            return [f.result() for f in futures]

        started = time.perf_counter()
        results = matrix()
        timings[name] = {"wall_s": time.perf_counter() - started, "passed": all(r.passed for r in results)}
        print(name, timings[name], flush=True)

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_core import machine

    results = {"machine": machine(), "flavour": args.flavour, "cells": len(cells), "runs": timings}
    (REPO_ROOT / "bench" / "results-dask.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = ["# Full-size verification matrix: in-process vs Dask", "",
             f"Machine: {m['cpu']}, {m['cores']} threads, {m['memory_gib']} GiB RAM. {len(cells)} cells, "
             f"{args.flavour} fp32 flavour, wall time including per-task model loads and cluster start-up.", "",
             "| execution | wall s | all cells passed |", "|---|---|---|"]
    lines += [f"| {name} | {t['wall_s']:.1f} | {t['passed']} |" for name, t in timings.items()]
    (REPO_ROOT / "bench" / "results-dask.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
