"""Where fp32 time goes, and how far ahead of PyTorch optimized fp32 can get on this CPU; with --int8,
the same for int8 against portable fp32.

    .venv/bin/python bench/bench_ceiling.py [--repeats 3] [--int8]

The precision benchmark's full-size model and shapes, three engines: the ORT-optimized fp32 ONNX file,
our PyTorch module and upstream AutoGluon Tab2D, each in a process of its own. Latency is paired as
in bench_precision.py (every engine runs one forward of a shape back to back, order turning, median of
per-repeat ratios). Then one profiled forward per engine and shape splits the time into GEMMs (linear
layers), attention and everything else, with the FLOPs counted from the operators' shapes, and each
runtime's best fp32 GEMM rate is measured at the model's linear-layer shapes.

The ceiling: ORT's efficiency is the time its GEMM and attention FLOPs would take at the rate its
GEMMs reached in that same forward, over the forward's time. A graph doing ORT's work with nothing
but GEMM-rate arithmetic would be 1/efficiency times faster; the measured ratio to PyTorch divided by
the efficiency is the largest speed-up any fp32 graph doing this work can show against it here.
Writes bench/results-ceiling.{json,md}. Takes ~15 min on a 2-core machine.

--int8: engines portable, optimized, int8 (per-row activation scales, the default) and int8-tensor
(ONNX Runtime's per-tensor dynamic int8). The split adds the time spent quantizing activations (the
per-row graph's reductions, QuantizeLinear and row-scale Mul; per-tensor's DynamicQuantizeLinear, its
fused DynamicQuantizeMatMul counting as GEMM), and the rate is MLAS's u8 x s8 GEMM
(MatMulIntegerToFloat, prepacked weight) at the same shapes. The ceiling: a forward doing the int8
graph's GEMM FLOPs at that rate, quantizing for free, and everything else as fast as the optimized
fp32 graph does it; portable's forward over that is the largest int8 speed-up this CPU allows while
attention and the elementwise work stay fp32. Writes bench/results-ceiling-int8.{json,md}; ~8 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)


ENGINES = ("optimized", "torch", "upstream")
INT8_ENGINES = ("portable", "optimized", "int8", "int8-tensor")
GEMM_SHAPES = [(8704, 512, 2048), (8704, 2048, 512)]  # (M, K, N): the MLP of 512 support rows x 17 tokens
ORT_GEMM_OPS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                "MatMulInteger"}
ORT_QUANTIZE_OPS = {"DynamicQuantizeLinear", "QuantizeLinear", "ReduceMax", "ReduceMin"}
ROW_QUANTIZE_MARKS = ("_rows_", "_rowq_rowscale")  # node names quantize._quantize_rows gives its scale arithmetic
ORT_ATTENTION_OPS = {"MultiHeadAttention", "Attention"}
TORCH_GEMM_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"}
TORCH_ATTENTION_ENTRY = "aten::scaled_dot_product_attention"


def best_seconds(run, repeats: int = 5) -> float:  # noqa: ANN001
    from bench_precision import timed

    run()  # warm-up
    return min(timed(run) for _ in range(repeats))


def gemm_rate_ort(int8: bool = False) -> float:
    """Best GFLOP/s of one ONNX Runtime MatMul with a constant (prepacked) weight, like the model's; with
    `int8`, GOP/s of MLAS's u8 x s8 GEMM as the int8 graphs call it (MatMulIntegerToFloat on uint8
    activations, an int8 weight, the scales applied inside the kernel)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rates = []
    for m, k, n in GEMM_SHAPES:
        if int8:
            constants = [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w"),
                         numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
                         numpy_helper.from_array(np.array(128, np.uint8), "zero")]
            node = helper.make_node("MatMulIntegerToFloat", ["a", "w", "scale", "scale", "zero"], ["y"],
                                    domain="com.microsoft")
            a = rng.integers(0, 256, (m, k)).astype(np.uint8)
        else:
            constants = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")]
            node = helper.make_node("MatMul", ["a", "w"], ["y"])
            a = rng.standard_normal((m, k), dtype=np.float32)
        a_type = helper.np_dtype_to_tensor_dtype(a.dtype)
        graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                                  ir_version=9)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        rates.append(2 * m * k * n / best_seconds(lambda: session.run(None, {"a": a})) / 1e9)
    return max(rates)


def gemm_rate_torch() -> float:
    """Best GFLOP/s of torch's nn.Linear (addmm) at the same shapes."""
    import torch

    rates = []
    with torch.no_grad():
        for m, k, n in GEMM_SHAPES:
            a, weight, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
            rates.append(2 * m * k * n / best_seconds(lambda: torch.nn.functional.linear(a, weight, bias)) / 1e9)
    return max(rates)


def profile_ort(path: Path, feed: dict) -> dict:
    """Where one forward of a profiled session (ORT's default options otherwise) spends its time."""
    import onnxruntime as ort

    from mitra_model.build.export import INPUT_NAMES

    feed = {name: feed[name] for name in INPUT_NAMES}
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)  # warm-up
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    timed_run = max(e["ts"] for e in events if e.get("name") == "model_run")
    split = {"profiled_s": 0.0, "gemm_s": 0.0, "gemm_gflop": 0.0, "attention_s": 0.0, "attention_gflop": 0.0,
             "quantize_s": 0.0}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < timed_run:
            continue
        op, seconds = e["args"]["op_name"], e["dur"] / 1e6
        shapes = [next(iter(s.values())) for s in e["args"]["input_type_shape"]]
        split["profiled_s"] += seconds
        if op in ORT_QUANTIZE_OPS or (op not in ORT_GEMM_OPS and any(mark in e["name"] for mark in ROW_QUANTIZE_MARKS)):
            split["quantize_s"] += seconds
        elif op in ORT_GEMM_OPS:
            out = next(iter(e["args"]["output_type_shape"][0].values()))
            split["gemm_s"] += seconds
            split["gemm_gflop"] += 2 * math.prod(shapes[0]) * out[-1] / 1e9
        elif op in ORT_ATTENTION_OPS:
            (n, lq, d), lk = shapes[0], shapes[1][1]  # q (N, Lq, D), k (N, Lk, D): QK^T and PV
            split["attention_s"] += seconds
            split["attention_gflop"] += 4 * n * lq * lk * d / 1e9
    return split


def profile_torch(run, feed: dict) -> dict:  # noqa: ANN001
    """Operator self times from a bare profiler; FLOPs from a second forward that records shapes
    (recording shapes and FLOPs doubled the forward's time here, so it does not time anything)."""
    from torch.profiler import ProfilerActivity, profile

    split = {"profiled_s": 0.0, "gemm_s": 0.0, "gemm_gflop": 0.0, "attention_s": 0.0, "attention_gflop": 0.0,
             "quantize_s": 0.0}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(feed)
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        split["profiled_s"] += seconds
        if event.key in TORCH_GEMM_OPS:
            split["gemm_s"] += seconds
        elif "scaled_dot_product" in event.key:  # the public entry and the kernel it dispatches to
            split["attention_s"] += seconds
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        run(feed)
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in TORCH_GEMM_OPS:
            split["gemm_gflop"] += event.flops / 1e9
        elif event.key == TORCH_ATTENTION_ENTRY:
            (n, h, lq, d), lk = event.input_shapes[0], event.input_shapes[1][2]
            split["attention_gflop"] += event.count * 4 * n * h * lq * lk * d / 1e9
    return split


def worker(engine: str, folder: Path) -> None:
    """Serve one engine (warmed up on every shape first): "time I", "profile I", "gemm-rate", "quit"."""
    from bench_precision import FILES, SHAPES, load_engine, serve, timed

    from mitra_model.model.inputs import make_inputs

    config, run = load_engine(engine, folder)
    inputs = [make_inputs(shape, config=config, seed=0, salt="bench-precision") for shape in SHAPES]
    for feed in inputs:
        run(feed)  # warm-up

    def profile(index: str) -> dict:
        if engine in FILES:
            return profile_ort(folder / FILES[engine], inputs[int(index)])
        return profile_torch(run, inputs[int(index)])

    def gemm_rate() -> dict:
        if engine in FILES:
            return {"gflops": gemm_rate_ort(int8=engine.startswith("int8"))}
        return {"gflops": gemm_rate_torch()}

    serve(engine, {
        "time": lambda index: {"seconds": timed(lambda: run(inputs[int(index)]))},
        "profile": profile,
        "gemm-rate": gemm_rate,
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=ENGINES + INT8_ENGINES)
    parser.add_argument("--int8", action="store_true", help="int8 against portable fp32 (results-ceiling-int8)")
    args = parser.parse_args()
    from bench_precision import SHAPES, WORK, Engine, paired_ratio, paired_repeats, prepare

    folder = WORK / "precision-classification"
    if args.worker:
        worker(args.worker, folder)
        return
    prepare("classification")
    names = INT8_ENGINES if args.int8 else ENGINES
    running = {name: Engine(name, [sys.executable, __file__, "--worker", name]) for name in names}
    try:
        for engine in running.values():
            engine.reply()  # ready, warmed up
        seconds = paired_repeats(running, args.repeats)
        profiles = {name: [engine.ask(f"profile {i}") for i in range(len(SHAPES))] for name, engine in running.items()}
        rates = {name: engine.ask("gemm-rate")["gflops"] for name, engine in running.items()}
    finally:
        for engine in running.values():
            engine.process.kill()
    engines = {name: {"gemm_rate_gflops": rates[name],
                      "shapes": [{"shape": shape, "runs_s": seconds[name][i], "median_s": statistics.median(seconds[name][i]),
                                  **profiles[name][i]} for i, shape in enumerate(SHAPES)]}
               for name in names}
    from bench_core import machine, write_results

    results = {"machine": machine(), "repeats": args.repeats, "shapes": SHAPES, "engines": engines}
    for i in range(len(SHAPES)):
        if args.int8:
            for fast in ("int8", "int8-tensor"):
                engines[fast]["shapes"][i]["speedup_vs_portable"] = paired_ratio(engines, "portable", fast, i)
        else:
            for baseline in ("torch", "upstream"):
                engines[baseline]["shapes"][i]["optimized_speedup"] = paired_ratio(engines, baseline, "optimized", i)
    report = render_int8(results) if args.int8 else render(results)
    write_results(REPO_ROOT / "bench" / ("results-ceiling-int8" if args.int8 else "results-ceiling"), results, report)
    print(report)


def efficiency(profile: dict) -> float:
    """ORT's GEMM and attention FLOPs at the rate its GEMMs reached in this forward, over the forward's time."""
    rate = profile["gemm_gflop"] / profile["gemm_s"]
    return (profile["gemm_gflop"] + profile["attention_gflop"]) / rate / profile["profiled_s"]


def method(r: dict) -> str:
    return (f"Full-size synthetic classifier. Each engine in a process of its own; {r['repeats']} repeats in which every "
            "engine runs one forward of a shape back to back (order turning): wall = median, speed-up = median of "
            "per-repeat ratios. The split comes from one profiled forward per engine and shape")


def table_head(*cells: str) -> list[str]:
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def render(r: dict) -> str:
    from bench_core import machine_line

    m, engines = r["machine"], r["engines"]
    lines = [
        "# Where fp32 time goes, and the ceiling for optimized fp32 vs PyTorch", "",
        f"{machine_line(m)} {method(r)} (operator self times; other = everything else). GEMM = linear layers (ORT MatMul; torch addmm/mm/bmm), attention = ORT "
        "MultiHeadAttention / torch scaled_dot_product_attention; GFLOP counted from the operators' shapes.", "",
        "Best fp32 GEMM rate of each runtime on this CPU (M,K,N = "
        + ", ".join("x".join(map(str, g)) for g in GEMM_SHAPES) + "): "
        + ", ".join(f"{name} {e['gemm_rate_gflops']:.0f} GFLOP/s" for name, e in engines.items()) + ".", "",
        *table_head("shape", "engine", "wall s", "profiled s", "GEMM s", "GEMM GFLOP", "GEMM GFLOP/s", "attention s",
                    "attention GFLOP", "other s"),
    ]
    for i, shape in enumerate(r["shapes"]):
        for name, e in engines.items():
            s = e["shapes"][i]
            other = s["profiled_s"] - s["gemm_s"] - s["attention_s"]
            lines.append(f"| {'x'.join(map(str, shape))} | {name} | {s['median_s']:.2f} | {s['profiled_s']:.2f} | {s['gemm_s']:.2f} "
                         f"| {s['gemm_gflop']:.0f} | {s['gemm_gflop'] / s['gemm_s']:.0f} | {s['attention_s']:.2f} "
                         f"| {s['attention_gflop']:.0f} | {other:.2f} |")
    lines += ["", "Ceiling: ORT efficiency = its GEMM + attention FLOPs at the rate its GEMMs reached in the same forward, "
              "over that forward's time; a graph doing ORT's work at that rate with nothing else would be 1/efficiency "
              "faster. Target: optimized >= 1.3x PyTorch.", "",
              *table_head("shape", "ORT efficiency", "optimized vs our PyTorch: measured / ceiling",
                          "vs upstream: measured / ceiling")]
    for i, shape in enumerate(r["shapes"]):
        e = efficiency(engines["optimized"]["shapes"][i])
        torch_x, upstream_x = (engines[n]["shapes"][i]["optimized_speedup"] for n in ("torch", "upstream"))
        lines.append(f"| {'x'.join(map(str, shape))} | {e:.0%} | {torch_x:.2f}x / {torch_x / e:.2f}x "
                     f"| {upstream_x:.2f}x / {upstream_x / e:.2f}x |")
    return "\n".join(lines) + "\n"


def int8_ceiling(r: dict, i: int) -> tuple[float, float]:
    """(seconds, x portable) of a forward doing int8's GEMM FLOPs at MLAS's best u8 x s8 rate, quantizing
    for free, with the optimized fp32 graph's attention and other work; profiled seconds throughout."""
    optimized, int8, portable = (r["engines"][n]["shapes"][i] for n in ("optimized", "int8", "portable"))
    rest = optimized["profiled_s"] - optimized["gemm_s"]
    seconds = rest + int8["gemm_gflop"] / r["engines"]["int8"]["gemm_rate_gflops"]
    return seconds, portable["profiled_s"] / seconds


def render_int8(r: dict) -> str:
    from bench_core import machine_line

    m, engines = r["machine"], r["engines"]
    lines = [
        "# Where int8 time goes, and the ceiling for int8 vs portable fp32", "",
        f"{machine_line(m)} {method(r)} (operator self times). GEMM = linear layers (MatMul; int8: "
        "MatMulIntegerToFloat, and per-tensor's DynamicQuantizeMatMul, whose activation quantization is inside it); quantize = activation quantization outside the GEMM kernel "
        "(per-row: ReduceMax, ReduceMin, the scale arithmetic, QuantizeLinear and the row-scale Mul; per-tensor: "
        "DynamicQuantizeLinear); attention = MultiHeadAttention (portable's attention is MatMul-Softmax-MatMul, "
        "counted in its GEMM).", "",
        "Best GEMM rates on this CPU (M,K,N = " + ", ".join("x".join(map(str, g)) for g in GEMM_SHAPES) + "): fp32 "
        f"MatMul {engines['optimized']['gemm_rate_gflops']:.0f} GFLOP/s, u8 x s8 MatMulIntegerToFloat "
        f"{engines['int8']['gemm_rate_gflops']:.0f} GOP/s "
        f"({engines['int8']['gemm_rate_gflops'] / engines['optimized']['gemm_rate_gflops']:.2f}x).", "",
        *table_head("shape", "engine", "wall s", "profiled s", "GEMM s", "GEMM GOP/s", "quantize s", "attention s",
                    "other s"),
    ]
    for i, shape in enumerate(r["shapes"]):
        for name, e in engines.items():
            s = e["shapes"][i]
            other = s["profiled_s"] - s["gemm_s"] - s["attention_s"] - s["quantize_s"]
            lines.append(f"| {'x'.join(map(str, shape))} | {name} | {s['median_s']:.2f} | {s['profiled_s']:.2f} "
                         f"| {s['gemm_s']:.2f} | {s['gemm_gflop'] / s['gemm_s']:.0f} | {s['quantize_s']:.2f} "
                         f"| {s['attention_s']:.2f} | {other:.2f} |")
    lines += ["", "Ceiling: the int8 graph's GEMM work at the best u8 x s8 rate above, activation quantization free, "
              "and the optimized fp32 graph's attention and other work (its fusions kept); portable's profiled "
              "forward over that. Target: int8 >= 2.30x portable, goal 3x.", "",
              *table_head("shape", "int8 (per-row) x portable", "int8-tensor x portable", "ceiling s", "ceiling x portable")]
    for i, shape in enumerate(r["shapes"]):
        seconds, ratio = int8_ceiling(r, i)
        lines.append(f"| {'x'.join(map(str, shape))} | {engines['int8']['shapes'][i]['speedup_vs_portable']:.2f}x "
                     f"| {engines['int8-tensor']['shapes'][i]['speedup_vs_portable']:.2f}x | {seconds:.2f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent), str(REPO_ROOT / "tests")]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
