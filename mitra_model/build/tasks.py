"""Real tables for the task checks: datasets that ship inside scikit-learn, prepared the way upstream's
Mitra wrapper prepares them, with the task metrics an AutoGluon user would read.

A task check (`[[verification.tasks]]` in the configuration) is a verification cell whose inputs come
from a real table instead of the synthetic matrix generator: a fixed, seeded split of one of
scikit-learn's bundled datasets (`load_*`: no download) into support rows (the "training" rows Mitra
conditions on) and query rows (the rows it predicts). Every artifact is compared with upstream's Tab2D
on these inputs by the signal-aware metrics (verify.signal_metrics), and both are scored on the task.

How the inputs are prepared, and where each step comes from (AutoGluon 1.6.3,
autogluon/tabular/models/mitra/sklearn_interface.py and _internal/data/preprocessor.py):
- the split: up to `support` / `queries` rows, stratified by class for classification
  (sklearn.model_selection.train_test_split with the matrix seed);
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
- not reproduced: the wrapper's random augmentations (random_mirror_x flips a random set of features'
  signs, random_mirror_regression predicts 1 - y half the time). Each fit draws them anew; the task
  check uses the identity draw, so every build computes the same numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn import datasets
from sklearn.model_selection import train_test_split

from mitra_model.build.config import TABLE_TASKS, TableName, TaskCell
from mitra_model.errors import ConfigError

MAX_CLASSES = 10  # the model's output logits (sklearn_interface.DEFAULT_CLASSES)

_LOADERS: dict[TableName, Callable[..., Any]] = {
    "iris": datasets.load_iris,
    "wine": datasets.load_wine,
    "breast_cancer": datasets.load_breast_cancer,
    "digits": datasets.load_digits,
    "diabetes": datasets.load_diabetes,
}


@dataclass(frozen=True, eq=False)
class TaskTable:
    """One real table, ready for the model.

    Attributes:
        task: the task check it comes from.
        inputs: the four contract inputs (export.INPUT_NAMES): one table (batch 1).
        y_query: the query rows' true labels (encoded 0..n-1) or values (original units).
        n_classes: classes in the table (classification), else 0.
        y_range: the support rows' (min, max) target (regression; predictions are scaled back by it).
        features_dropped: features constant on the support rows, dropped like upstream does.
        digest: SHA-256 of the prepared arrays (what a reference's cache key covers).
    """

    task: TaskCell
    inputs: dict[str, np.ndarray]
    y_query: np.ndarray
    n_classes: int
    y_range: tuple[float, float] | None
    features_dropped: int
    digest: str

    @property
    def is_classification(self) -> bool:
        return self.n_classes > 0

    def outputs(self, raw: np.ndarray) -> np.ndarray:
        """A model's raw output for this table as the task reads it: (Q, n_classes) logits, or (Q,)
        predictions in the target's units."""
        if self.is_classification:
            return raw[0, :, : self.n_classes]
        low, high = self.y_range
        return raw[0] * (high - low) + low


def load_table(task: TaskCell, *, seed: int) -> TaskTable:
    """The task's table, split and prepared (see the module docstring).

    Args:
        task: the task check (dataset, support and query row counts).
        seed: the split's seed (the matrix seed).

    Raises:
        ConfigError: the table has more than 10 classes, or fewer rows than the task asks for.
    """
    x, y = _LOADERS[task.dataset](return_X_y=True)
    x = np.asarray(x, dtype=np.float64)
    classification = TABLE_TASKS[task.dataset] == "classification"
    if task.support + task.queries > len(x):
        raise ConfigError(f"task {task.name!r}: {task.dataset} has {len(x)} rows, fewer than support "
                          f"{task.support} + queries {task.queries}")
    x_support, x_query, y_support, y_query = train_test_split(
        x, y, train_size=task.support, test_size=task.queries, random_state=seed,
        stratify=y if classification else None,
    )
    mean = np.nanmean(x_support, axis=0)
    x_support, x_query = (np.where(np.isnan(part), mean, part) for part in (x_support, x_query))
    varying = np.array([len(np.unique(column)) > 1 for column in x_support.T])
    x_support, x_query = x_support[:, varying], x_query[:, varying]
    n_classes, y_range = 0, None
    if classification:
        classes = np.unique(y_support)
        if len(classes) > MAX_CLASSES:
            raise ConfigError(f"task {task.name!r}: {task.dataset} has {len(classes)} classes; Mitra predicts at "
                              f"most {MAX_CLASSES}")
        n_classes = len(classes)
        y_support, y_query = np.searchsorted(classes, y_support), np.searchsorted(classes, y_query)
        y_model = y_support.astype(np.int64)
    else:
        low, high = float(y_support.min()), float(y_support.max())
        y_range = (low, high)
        y_model = ((y_support - low) / (high - low)).astype(np.float32)
    inputs = {
        "x_support": x_support[None].astype(np.float32),
        "y_support": y_model[None],
        "x_query": x_query[None].astype(np.float32),
        "padding_obs_support": np.zeros((1, len(x_support)), dtype=bool),
    }
    digest = hashlib.sha256(b"".join(inputs[name].tobytes() for name in sorted(inputs))
                            + np.asarray(y_query).tobytes()).hexdigest()
    return TaskTable(task=task, inputs=inputs, y_query=np.asarray(y_query), n_classes=n_classes, y_range=y_range,
                     features_dropped=int((~varying).sum()), digest=digest)


def task_scores(table: TaskTable, raw: np.ndarray) -> dict[str, float]:
    """The task metric of a model's raw output on the table: accuracy and log loss (classification;
    softmax over the table's classes), or R² and RMSE in the target's units (regression)."""
    predicted = table.outputs(raw).astype(np.float64)
    if table.is_classification:
        shifted = np.exp(predicted - predicted.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        picked = np.clip(probabilities[np.arange(len(table.y_query)), table.y_query], 1e-15, 1.0)
        return {"accuracy": float((predicted.argmax(axis=1) == table.y_query).mean()),
                "log_loss": float(-np.log(picked).mean())}
    residual = predicted - table.y_query
    total = float(((table.y_query - table.y_query.mean()) ** 2).sum())
    return {"r2": 1.0 - float((residual ** 2).sum()) / total if total > 0 else 0.0,
            "rmse": float(np.sqrt((residual ** 2).mean()))}


def chance_scores(table: TaskTable) -> dict[str, float]:
    """What a model that ignores the features scores: the support rows' class frequencies (majority
    class accuracy), or their mean (R² 0). Random-weight models land here."""
    y_support = table.inputs["y_support"][0]
    if table.is_classification:
        frequencies = np.bincount(y_support, minlength=table.n_classes) / len(y_support)
        picked = np.clip(frequencies[table.y_query], 1e-15, 1.0)
        return {"accuracy": float((table.y_query == frequencies.argmax()).mean()),
                "log_loss": float(-np.log(picked).mean())}
    low, high = table.y_range
    constant = np.full(table.y_query.shape, float(y_support.mean()))[None]  # one table, in the model's scale
    return task_scores(table, constant)
