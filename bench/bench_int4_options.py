"""Where int4's error comes from and what each option buys, on the full-size model and real tables.
Writes bench/results-int4-options.json (bench/results-int4-options.md reads it).

    .venv/bin/python bench/bench_int4_options.py [--roles] [--options] [--bits] [--gptq]

--roles: every weight role (e.g. each layer's feature-attention value projection) rounded alone to 4
bits (block 32, asymmetric, fp32 compute: the same rounding MatMulNBits stores), the rest fp32: the
role's share of int4's error. --options: real int4 files made by the pipeline's converter with each
option. --bits: every weight rounded the same way at 4 to 8 bits, and the size a file storing them
so would have (b bits a weight, one fp32 scale and one b-bit zero point a block, the rest as the fp32
file stores it): how many bits the err/spread goal needs. --gptq: real files with GPTQ rounding and
the configured calibration ([artifacts.options.int4]), for each allocation of bits. All report err/spread (RMS error over
upstream's spread across the query rows) against the optimized fp32 file on three classification
tables (iris, wine, breast-cancer), and the file size.
Synthetic full-size weights (seed 0), the same snapshot as bench_signal.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
WORK = BENCH_DIR.parent / "artifacts" / "bench" / "int4-options"
NEAREST = {"rounding": "nearest"}
OPTIONS: dict[str, dict[str, Any]] = {
    "every weight at 4 bits (block 32, accuracy_level 4)": {**NEAREST, "eight_bit": []},
    "... accuracy_level 0 (fp32 activations)": {**NEAREST, "eight_bit": [], "accuracy_level": 0},
    "... block 16": {**NEAREST, "eight_bit": [], "block_size": 16},
    "feature-attention v at 8 bits": {**NEAREST, "eight_bit": ["attention2/v"]},
    "feature-attention v, o at 8 bits": {**NEAREST, "eight_bit": ["attention2/v", "attention2/o"]},
    "feature-attention v, o and row-attention o at 8 bits": {**NEAREST, "eight_bit": ["attention2/v", "attention2/o", "/o/"]},
    "every v and feature-attention o at 8 bits": {**NEAREST, "eight_bit": ["/v", "attention2/o"]},
}
# GPTQ rounding with the configured calibration tables (config/mitra-build.toml), each allocation of bits
GPTQ_OPTIONS: dict[str, dict[str, Any]] = {
    "GPTQ, every weight at 4 bits": {"eight_bit": []},
    "GPTQ, every v and feature-attention o at 8 bits (configured)": {},
    "GPTQ, every weight at 4 bits, accuracy_level 0": {"eight_bit": [], "accuracy_level": 0},
}


BITS = (4, 5, 6, 7, 8)
BLOCK = 32


def fake_quantize(weight: np.ndarray, bits: int = 4, block: int = BLOCK) -> np.ndarray:
    """Round-to-nearest on MatMulNBits' grid (gptq.grid), dequantized back to fp32."""
    from mitra_model.build.gptq import grid

    k, _ = weight.shape
    padded = np.pad(weight, ((0, (-k) % block), (0, 0)))
    scales, zeros = grid(padded, bits=bits, block=block)
    scale, zero = np.repeat(scales.T, block, axis=0), np.repeat(zeros.T, block, axis=0).astype(np.float64)
    levels = np.clip(np.round(padded / scale) + zero, 0, 2**bits - 1)
    return ((levels - zero) * scale)[:k].astype(np.float32)


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from mitra_model.build import quantize
    from mitra_model.build.config import load_config
    from mitra_model.build.export import export_onnx
    from mitra_model.build.recipes import quantize_onnx, recipe
    from mitra_model.build.tasks import load_table
    from mitra_model.build.verify import signal_metrics
    from mitra_model.model.snapshot import load_model, write_synthetic_snapshot

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roles", action="store_true")
    parser.add_argument("--options", action="store_true")
    parser.add_argument("--bits", action="store_true")
    parser.add_argument("--gptq", action="store_true")
    args = parser.parse_args()
    config = load_config()
    WORK.mkdir(parents=True, exist_ok=True)
    snapshot = WORK / "snapshot"
    if not (snapshot / "model.safetensors").exists():
        write_synthetic_snapshot(snapshot, task="classification", size_name="full", size=config.sizes["full"], seed=0)
    base = WORK / "fp32-ort.onnx"
    if not base.exists():
        model, _ = load_model(snapshot)
        export_onnx(model, base, opset=config.export.opset, trace_shape=config.export.trace_shape, flavour="optimized")
    tables = [load_table(t, seed=config.verification.seed) for t in config.verification.tasks_for("classification")][:3]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2

    def outputs(model: str | bytes) -> list[np.ndarray]:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return [session.run(None, t.inputs)[0] for t in tables]

    reference = outputs(str(base))

    def err_over_spread(got: list[np.ndarray]) -> list[float]:
        return [round(signal_metrics(t.outputs(r)[None], t.outputs(o)[None], is_classifier=True).err_over_spread, 4)
                for t, r, o in zip(tables, reference, got, strict=True)]

    saved = BENCH_DIR / "results-int4-options.json"
    results: dict[str, Any] = {"roles": {}, "options": {}, "bits": {}, "gptq": {}}
    if saved.exists():  # a run of some parts keeps the others' last numbers
        results.update(json.loads(saved.read_text()))
    results["tables"] = [t.task.name for t in tables]
    source = onnx.load(str(base))
    quantize._drop_weight_identities(source.graph)
    quantize._name_nodes(source.graph)
    roles: dict[str, set[str]] = {}
    for index in quantize._weight_matmuls(source.graph):
        node = source.graph.node[index]
        roles.setdefault(re.sub(r"layers\.\d+", "layers.#", re.sub(r"_\d+/", "_#/", node.name)), set()).add(node.input[1])

    def rounded(weights: set[str], bits: int) -> list[float]:
        trial = onnx.ModelProto()
        trial.CopyFrom(source)
        for tensor in trial.graph.initializer:
            if tensor.name in weights:
                tensor.CopyFrom(numpy_helper.from_array(fake_quantize(numpy_helper.to_array(tensor), bits), tensor.name))
        return err_over_spread(outputs(trial.SerializeToString()))

    if args.roles:
        for role, weights in sorted(roles.items()):
            started = time.perf_counter()
            results["roles"][role] = rounded(weights, 4)
            print(f"{role:36s} {results['roles'][role]} {time.perf_counter() - started:.0f}s", flush=True)
    if args.bits:
        every = set().union(*roles.values())
        count = sum(int(np.prod(t.dims)) for t in source.graph.initializer if t.name in every)
        rest = sum(t.ByteSize() for t in source.graph.initializer if t.name not in every)
        for bits in BITS:
            mb = (rest + count * (bits + (32 + bits) / BLOCK) / 8) / 1e6  # a weight's bits; a block's fp32 scale, zero point
            results["bits"][str(bits)] = {"file_mb": round(mb, 1), "err_over_spread": rounded(every, bits)}
            print(f"every weight at {bits} bits: {results['bits'][str(bits)]}", flush=True)
    configured = config.artifacts.options_for(recipe("int4")).model_dump(mode="json")
    chosen_options = {**(OPTIONS if args.options else {}),
                      **({name: {**configured, **change} for name, change in GPTQ_OPTIONS.items()} if args.gptq else {})}
    for name, chosen in chosen_options.items():
        path = WORK / f"int4-{hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]}.onnx"
        started = time.perf_counter()
        if not path.exists():
            quantize_onnx(base, path, precision="int4", options=chosen)
        entry = {"options": chosen, "file_mb": round(path.stat().st_size / 1e6, 1),
                 "err_over_spread": err_over_spread(outputs(str(path))),
                 "build_seconds": round(time.perf_counter() - started)}
        results["gptq" if name in GPTQ_OPTIONS else "options"][name] = entry
        print(name, entry, flush=True)
    saved.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
