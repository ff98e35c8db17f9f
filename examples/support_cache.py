"""Fit once, predict many with ONNX Runtime: encode a table's labelled rows once, then predict new
rows against the cached support set as they arrive.

    .venv/bin/python examples/support_cache.py [--snapshot DIR]

Without --snapshot it builds a tiny synthetic classifier (random weights: the predictions mean
nothing, the mechanics are the real ones). The ONNX Runtime part needs only numpy and onnxruntime.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort


def export_pair(snapshot: Path | None, out_dir: Path) -> tuple[Path, Path]:
    """encode-support.onnx and predict-query.onnx for a snapshot (the build step, done once)."""
    from mitra_model.build.config import load_config
    from mitra_model.build.support_cache import export_support_cache
    from mitra_model.model.snapshot import load_model, write_synthetic_snapshot

    config = load_config()
    if snapshot is None:
        snapshot = write_synthetic_snapshot(out_dir / "snapshot", task="classification", size_name="tiny",
                                            size=config.sizes["tiny"], seed=0).path
    model, _ = load_model(snapshot)
    pair = export_support_cache(model, out_dir, opset=config.export.opset, trace_shape=config.export.trace_shape)
    return pair.encode.path, pair.predict.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, help="a classifier checkpoint folder (config.json + model.safetensors)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        encode_path, predict_path = export_pair(args.snapshot, Path(tmp))
        encoder = ort.InferenceSession(str(encode_path), providers=["CPUExecutionProvider"])
        predictor = ort.InferenceSession(str(predict_path), providers=["CPUExecutionProvider"])

        # Fit: one table (batch 1) of 300 labelled rows, 6 features, 3 classes.
        rng = np.random.default_rng(0)
        x_support = rng.normal(size=(1, 300, 6)).astype(np.float32)
        y_support = np.digitize(x_support[..., 0] + x_support[..., 1], [-0.5, 0.5]).astype(np.int64)  # (1, 300)
        padding = np.zeros((1, 300), dtype=bool)  # True marks padded rows
        cache = encoder.run(None, {"x_support": x_support, "y_support": y_support, "padding_obs_support": padding})
        cache_feed = {output.name: value for output, value in zip(encoder.get_outputs(), cache)}
        print(f"support cache: {sum(v.nbytes for v in cache) / 1e6:.1f} MB in {len(cache)} tensors "
              f"({', '.join(f'{k} {v.shape}' for k, v in cache_feed.items())})")

        # Predict many: each batch of new rows reads the same cache; the support side is never recomputed.
        for batch in range(3):
            x_query = rng.normal(size=(1, 4, 6)).astype(np.float32)
            logits = predictor.run(None, {**cache_feed, "x_query": x_query})[0]  # (1, 4, 10)
            scores = logits[0, :, :3]  # Mitra's 10 outputs: the first n_classes are the table's
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            print(f"batch {batch}: classes {probs.argmax(-1).tolist()}, P(class 0) {[round(float(p), 3) for p in probs[:, 0]]}")


if __name__ == "__main__":
    main()
