"""Deterministic model inputs shaped like real tables, for tracing, verification and benchmarks."""

from __future__ import annotations

import zlib

import numpy as np

from mitra_model.model.architecture import MitraConfig
from mitra_model.model.kinds import DataKind

# Column generators for "mixed" data, in rotation: what real tables hold.
_MIXED_COLUMNS: tuple[DataKind, ...] = ("continuous", "integer_ties", "categorical", "constant", "large_magnitude")
PADDED_CLASS_LABEL = -100  # what upstream's data pipeline puts in padded label slots


def _column(kind: str, rng: np.random.Generator, rows: int) -> np.ndarray:
    if kind == "continuous":
        return rng.normal(loc=rng.normal(), scale=rng.uniform(0.5, 3.0), size=rows)
    if kind == "integer_ties":
        return rng.integers(0, 6, size=rows).astype(np.float64)  # heavy ties, values equal to boundaries
    if kind == "categorical":
        return rng.integers(0, 3, size=rows).astype(np.float64)
    if kind == "constant":
        return np.full(rows, 3.0)
    if kind == "large_magnitude":
        return rng.normal(loc=2e6, scale=5e5, size=rows).round()
    raise ValueError(f"unknown column kind {kind!r}")


def make_inputs(
    shape: tuple[int, int, int, int],
    *,
    config: MitraConfig,
    data: DataKind = "mixed",
    padded_support_rows: int = 0,
    seed: int = 0,
    salt: str = "",
) -> dict[str, np.ndarray]:
    """Inputs for one forward, in the consumer I/O contract.

    Args:
        shape: (batch, n_support, n_query, n_features).
        config: the model's config (decides the label dtype and class count).
        data: column type; "mixed" rotates through every type.
        padded_support_rows: batch item b pads its last `padded_support_rows * b // (batch - 1)` rows,
            so one batch mixes unpadded and padded items. Padded rows hold garbage on purpose.
        seed, salt: the same (seed, salt, shape, data) always gives the same arrays.
    """
    batch, n_support, n_query, n_features = shape
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode()), *shape])
    rows = n_support + n_query
    x = np.empty((batch, rows, n_features), dtype=np.float32)
    for b in range(batch):
        for f in range(n_features):
            kind = _MIXED_COLUMNS[f % len(_MIXED_COLUMNS)] if data == "mixed" else data
            x[b, :, f] = _column(kind, rng, rows)
    x_support, x_query = x[:, :n_support].copy(), x[:, n_support:].copy()

    padding = np.zeros((batch, n_support), dtype=bool)
    for b in range(batch):
        n_pad = padded_support_rows * b // max(batch - 1, 1) if batch > 1 else padded_support_rows
        if n_pad:
            padding[b, n_support - n_pad :] = True
    x_support[padding] = rng.normal(scale=1e3, size=(int(padding.sum()), n_features))

    if config.label_is_class:
        y = rng.integers(0, config.dim_output, size=(batch, n_support)).astype(np.int64)
        y[padding] = PADDED_CLASS_LABEL
    else:
        y = rng.normal(size=(batch, n_support)).astype(np.float32)
        y[padding] = rng.normal(scale=1e3, size=int(padding.sum()))
    return {"x_support": x_support, "y_support": y, "x_query": x_query, "padding_obs_support": padding}
