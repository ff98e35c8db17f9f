"""The architecture of a Mitra checkpoint: the five keys of upstream's `config.json`.

Kept apart from `model.py` (which needs torch) so that reading a snapshot's config, pinning a revision
or planning a build imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Task(str, Enum):
    CLASSIFICATION = "CLASSIFICATION"
    REGRESSION = "REGRESSION"


@dataclass(frozen=True)
class MitraConfig:
    """The five keys of upstream's `config.json` (written by `Tab2D.save_pretrained`)."""

    dim: int
    dim_output: int  # classes for classification; 1 for the official regressor
    n_layers: int
    n_heads: int
    task: Task

    @property
    def label_is_class(self) -> bool:
        # Upstream embeds labels as classes for classification, and also for "regression" with
        # several outputs (binned regression); only single-output regression embeds a float.
        return self.task is Task.CLASSIFICATION or self.dim_output > 1


# Sane bounds, checked before any module or tensor is built: a hostile or mistyped config.json
# (n_layers = 10**9) would otherwise allocate until the machine gives out. The official checkpoints
# are dim 512, 12 layers, 4 heads, 10 or 1 outputs; upstream is used with up to 8192 support and
# 1024 query rows per forward.
LIMITS: dict[str, int] = {
    "dim": 8192,
    "n_layers": 128,
    "n_heads": 128,
    "dim_output": 10_000,
    "batch": 1024,
    "n_support": 65_536,
    "n_query": 65_536,
    "n_features": 4096,
}


def limit_problem(field: str, value: int) -> str | None:
    """Why `value` is out of bounds for `field` (a LIMITS key), or None when it is within them."""
    bound = LIMITS[field]
    return f"`{field}` is {value}, above the bound of {bound}" if value > bound else None
