"""Test configurations derived from config/mitra-build.toml with a few fields replaced."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import toml

from mitra_model.build.config import DEFAULT_CONFIG_PATH, BuildConfig, load_config

SMALL_CELLS = [
    {"name": "small", "batch": 1, "n_support": 20, "n_query": 4, "n_features": 3},
    {"name": "ties-padded", "batch": 2, "n_support": 16, "n_query": 2, "n_features": 2, "data": "integer_ties",
     "padded_support_rows": 4},
]

# The signal bounds in config/mitra-build.toml were set on the full-size models (bench/results-signal.md).
# The tests' tiny models (2 layers, dim 64, random weights) have int4 and int8 bounds of their own, set the same
# way from their own measurements (seed 7, the configured 8-bit roles): err/spread up to 1.21 on the
# matrix and 0.97 on digits for the classifier, 0.66 on diabetes for the regressor. int8 on the real
# tables: up to 0.157 (per-tensor scales) and 0.205 (per-channel, wine) on the seed-4 classifier with
# the calibration drawn like real tables, against 0.13 with the matrix's generator: the tiny models'
# rounding fits it less well than the full-size one does (2026-12-08). Every other bound is the configured one.
TINY_BOUNDS: dict[str, dict[str, float]] = {
    "int4": {"max_err_over_spread": 2.0, "max_task_err_over_spread": 1.5, "min_centered_argmax_agreement": 0.5,
             "min_centered_correlation": 0.9},
    "int8": {"max_task_err_over_spread": 0.3},
}


def with_tiny_bounds(config: BuildConfig) -> BuildConfig:
    """`config` with TINY_BOUNDS in its verification tolerances."""
    tolerances = {key: tolerance.model_copy(update=TINY_BOUNDS.get(key, {}))
                  for key, tolerance in config.verification.tolerances.items()}
    verification = config.verification.model_copy(update={"tolerances": tolerances})
    return config.model_copy(update={"verification": verification})


def write_config(path: Path, *, cells: list[dict[str, Any]] | None = None, store: dict[str, Any] | None = None,
                 variants: list[dict[str, Any]] | None = None, artifacts: dict[str, Any] | None = None,
                 execution: dict[str, Any] | None = None, schedule: dict[str, Any] | None = None,
                 consumers: dict[str, Any] | None = None, tolerances: dict[str, Any] | None = None) -> Path:
    """The default configuration with the matrix, store, variants, artifacts, execution, schedule or
    consumers (merged into the default's) replaced, TINY_BOUNDS applied and verification tolerances
    added; validated."""
    raw = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    for key, bounds in TINY_BOUNDS.items():
        raw["verification"]["tolerances"][key].update(bounds)
    raw["verification"]["cells"] = cells if cells is not None else SMALL_CELLS
    raw.pop("store", None)
    if store is not None:
        raw["store"] = store
    if variants is not None:
        raw["variants"] = variants
    if artifacts is not None:
        raw["artifacts"] = artifacts
    if execution is not None:
        raw["execution"] = execution
    if schedule is not None:
        raw["schedule"] = schedule
    if consumers is not None:
        raw["consumers"] = {**raw["consumers"], **consumers}
    if tolerances is not None:
        raw["verification"]["tolerances"].update(tolerances)
    path.write_text(toml.dumps(raw))
    load_config(path)
    return path


def edited_config(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    """The default configuration file with each (old, new) text replaced once (old must be there)."""
    text = DEFAULT_CONFIG_PATH.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "edited.toml"
    path.write_text(text)
    return path
