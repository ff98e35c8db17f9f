"""Where int4's error comes from and what each option buys, on the full-size model and real tables.
Writes bench/results-int4-options.json (bench/results-int4-options.md reads it).

    .venv/bin/python bench/bench_int4_options.py [--roles] [--options]

--roles: every weight role (e.g. each layer's feature-attention value projection) rounded alone to 4
bits (block 32, asymmetric, fp32 compute: the same rounding MatMulNBits stores), the rest fp32: the
role's share of int4's error. --options: real int4 files made by the pipeline's converter with each
option. Both report err/spread (RMS error over upstream's spread across the query rows) against the
optimized fp32 file on three classification tables (iris, wine, breast-cancer), and the file size.
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
OPTIONS: dict[str, dict[str, Any]] = {
    "every weight at 4 bits (block 32, accuracy_level 4)": {"eight_bit": []},
    "... accuracy_level 0 (fp32 activations)": {"eight_bit": [], "accuracy_level": 0},
    "... block 16": {"eight_bit": [], "block_size": 16},
    "feature-attention v at 8 bits": {"eight_bit": ["attention2/v"]},
    "feature-attention v, o at 8 bits": {"eight_bit": ["attention2/v", "attention2/o"]},
    "feature-attention v, o and row-attention o at 8 bits": {"eight_bit": ["attention2/v", "attention2/o", "/o/"]},
    "every v and feature-attention o at 8 bits (configured)": {"eight_bit": ["/v", "attention2/o"]},
}


def fake_int4(weight: np.ndarray, block: int = 32) -> np.ndarray:
    """Round-to-nearest 4-bit, asymmetric, one scale and zero point per `block` input rows."""
    k, n = weight.shape
    padded = np.pad(weight, ((0, (-k) % block), (0, 0))).reshape(-1, block, n)
    low = np.minimum(padded.min(1, keepdims=True), 0)
    high = np.maximum(padded.max(1, keepdims=True), 0)
    scale = np.maximum(high - low, 1e-12) / 15
    zero = np.clip(np.round(-low / scale), 0, 15)
    levels = np.clip(np.round(padded / scale) + zero, 0, 15)
    return ((levels - zero) * scale).reshape(-1, n)[:k].astype(np.float32)


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from mitra_model.build import quantize
    from mitra_model.build.config import load_config
    from mitra_model.build.export import export_onnx
    from mitra_model.build.recipes import quantize_onnx
    from mitra_model.build.tasks import load_table
    from mitra_model.build.verify import signal_metrics
    from mitra_model.model.snapshot import load_model, write_synthetic_snapshot

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roles", action="store_true")
    parser.add_argument("--options", action="store_true")
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

    results: dict[str, Any] = {"tables": [t.task.name for t in tables], "roles": {}, "options": {}}
    if args.roles:
        source = onnx.load(str(base))
        graph = source.graph
        quantize._drop_weight_identities(graph)
        quantize._name_nodes(graph)
        roles: dict[str, set[str]] = {}
        for index in quantize._weight_matmuls(graph):
            node = graph.node[index]
            roles.setdefault(re.sub(r"layers\.\d+", "layers.#", re.sub(r"_\d+/", "_#/", node.name)), set()).add(node.input[1])
        for role, weights in sorted(roles.items()):
            started = time.perf_counter()
            trial = onnx.ModelProto()
            trial.CopyFrom(source)
            for tensor in trial.graph.initializer:
                if tensor.name in weights:
                    tensor.CopyFrom(numpy_helper.from_array(fake_int4(numpy_helper.to_array(tensor)), tensor.name))
            results["roles"][role] = err_over_spread(outputs(trial.SerializeToString()))
            print(f"{role:36s} {results['roles'][role]} {time.perf_counter() - started:.0f}s", flush=True)
    if args.options:
        for name, chosen in OPTIONS.items():
            path = WORK / f"int4-{hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]}.onnx"
            if not path.exists():
                quantize_onnx(base, path, precision="int4", options=chosen)
            results["options"][name] = {"options": chosen, "file_mb": round(path.stat().st_size / 1e6, 1),
                                        "err_over_spread": err_over_spread(outputs(str(path)))}
            print(name, results["options"][name], flush=True)
    (BENCH_DIR / "results-int4-options.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
