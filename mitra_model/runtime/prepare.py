"""Tables prepared for Mitra the way upstream's AutoGluon wrapper prepares them.

Each step and where it comes from (AutoGluon 1.6.3, autogluon/tabular/models/mitra/sklearn_interface.py
and _internal/data/preprocessor.py):
- labels: encoded as 0..n-1 in sorted order of the support rows' labels (AutoGluon's label encoder;
  the Preprocessor asserts `y < n_classes`), at most 10 classes (the model's 10 logits:
  sklearn_interface.DEFAULT_CLASSES); the logits of the classes a table does not have are dropped
  (Preprocessor.extract_correct_classes);
- features: NaNs imputed with the support rows' mean (Preprocessor.impute_nan_features_with_mean),
  features constant on the support rows dropped (Preprocessor.determine_which_features_are_singular),
  float32; no quantile transform, feature-count scaling or random transforms (off in
  sklearn_interface._create_config: the model's own quantile embedding normalises the features);
- regression targets: scaled to [0, 1] by the support rows' min and max (Preprocessor.normalize_y), and
  predictions scaled back (undo_normalize_y);
- support rows beyond `max_samples_support` (8192, sklearn_interface) are sub-sampled without
  replacement (_internal/data/dataset_finetune.py: `rng.choice(n_samples_support, size, replace=False)`);
- not reproduced: the wrapper's random augmentations (random_mirror_x flips a random set of features'
  signs, random_mirror_regression predicts 1 - y half the time), drawn anew at each fit: the identity
  draw keeps every prediction reproducible.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

MAX_CLASSES = 10  # the model's output logits (sklearn_interface.DEFAULT_CLASSES)
MAX_SUPPORT_ROWS = 8192  # sklearn_interface's max_samples_support


class TableError(ValueError):
    """A table Mitra cannot take (too many classes, a single row, a shape mismatch): the message says which."""


@dataclass(frozen=True, eq=False)
class SupportSet:
    """The support rows as the model takes them, and what their preparation fixed for the query rows.

    Attributes:
        x: (S, F') float32 features, constant columns dropped, NaNs imputed.
        y: (S,) int64 class codes, or float32 targets scaled to [0, 1].
        keep: which of the original columns the model sees.
        means: each kept column's support mean (imputes the query rows' NaNs).
        classes: the sorted original labels (classification), else None.
        y_range: the support targets' (min, max) (regression), else None.
    """

    x: np.ndarray
    y: np.ndarray
    keep: np.ndarray
    means: np.ndarray
    classes: np.ndarray | None
    y_range: tuple[float, float] | None

    def features(self, x: np.ndarray) -> np.ndarray:
        """Query rows prepared like the support rows: (Q, F) -> (Q, F') float32."""
        x = _matrix(x, "X")
        if x.shape[1] != len(self.keep):
            raise TableError(f"X has {x.shape[1]} features; the support set had {len(self.keep)}")
        x = x[:, self.keep]
        return np.where(np.isnan(x), self.means, x).astype(np.float32)

    def outputs(self, raw: np.ndarray) -> np.ndarray:
        """The model's raw output for one table, (1, Q, C) or (1, Q), as the task reads it: (Q, n_classes)
        logits, or (Q,) predictions in the target's units."""
        if self.classes is not None:
            return raw[0, :, : len(self.classes)]
        low, high = self.y_range
        return raw[0] * (high - low) + low


def prepare_support(x: np.ndarray, y: np.ndarray, *, classification: bool, max_rows: int = MAX_SUPPORT_ROWS,
                    seed: int = 0) -> SupportSet:
    """Prepare the support rows (see the module docstring).

    Args:
        x: (S, F) features; NaN marks a missing value.
        y: (S,) labels (any sortable values) or regression targets.
        classification: labels rather than targets.
        max_rows: rows beyond this are sub-sampled without replacement, as upstream does.
        seed: the sub-sample's seed.

    Raises:
        TableError: naming the problem (more than 10 classes, fewer than 2 rows, X and y disagree).
    """
    x = _matrix(x, "X")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise TableError(f"y must be one label per row of X: X has {len(x)} rows, y has shape {y.shape}")
    if len(x) < 2:
        raise TableError(f"the support set needs at least 2 rows, got {len(x)}")
    if len(x) > max_rows:
        chosen = np.sort(np.random.default_rng(seed).choice(len(x), size=max_rows, replace=False))
        x, y = x[chosen], y[chosen]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its mean is NaN, made 0 below
        means = np.nanmean(x, axis=0)
    means = np.where(np.isnan(means), 0.0, means)
    x = np.where(np.isnan(x), means, x)
    keep = np.array([len(np.unique(column)) > 1 for column in x.T], dtype=bool)
    if not keep.any():
        raise TableError("every feature is constant on the support rows: Mitra has nothing to condition on")
    classes, y_range = None, None
    if classification:
        classes = np.unique(y)
        if len(classes) > MAX_CLASSES:
            raise TableError(f"y has {len(classes)} classes; Mitra predicts at most {MAX_CLASSES}")
        y_model = np.searchsorted(classes, y).astype(np.int64)
    else:
        y = y.astype(np.float64)
        if not np.isfinite(y).all():
            raise TableError("y has NaN or infinite targets")
        low, high = float(y.min()), float(y.max())
        y_range = (low, high)
        y_model = ((y - low) / (high - low) if high > low else np.zeros_like(y)).astype(np.float32)
    return SupportSet(x=x[:, keep].astype(np.float32), y=y_model, keep=keep, means=means[keep], classes=classes,
                      y_range=y_range)


def model_inputs(support: SupportSet, x_query: np.ndarray) -> dict[str, np.ndarray]:
    """The four contract inputs for one table (batch 1): the prepared support set and query rows."""
    return {
        "x_support": support.x[None],
        "y_support": support.y[None],
        "x_query": x_query[None].astype(np.float32),
        "padding_obs_support": np.zeros((1, len(support.x)), dtype=bool),
    }


def _matrix(x: np.ndarray, name: str) -> np.ndarray:
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TableError(f"{name} must be numeric (encode categorical columns first): {exc}") from None
    if x.ndim != 2:
        raise TableError(f"{name} must be 2-D (rows, features), got shape {x.shape}. Reshape your data: "
                         f"{name}.reshape(-1, 1) for a single feature, {name}.reshape(1, -1) for a single row")
    return x
