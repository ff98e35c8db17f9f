"""Real tables for the task checks: datasets that ship inside scikit-learn, prepared the way upstream's
Mitra wrapper prepares them, with the task metrics an AutoGluon user would read.

A task check (`[[verification.tasks]]` in the configuration) is a verification cell whose inputs come
from a real table instead of the synthetic matrix generator: a fixed, seeded split of one of
scikit-learn's bundled datasets (`load_*`: no download) into support rows (the "training" rows Mitra
conditions on) and query rows (the rows it predicts). Every artifact is compared with upstream's Tab2D
on these inputs by the signal-aware metrics (verify.signal_metrics), and both are scored on the task.

The split: up to `support` / `queries` rows, stratified by class for classification
(sklearn.model_selection.train_test_split with the matrix seed). Then the rows are prepared as
upstream's AutoGluon wrapper prepares them, by the same code the Python estimator uses
(mitra_model.runtime.prepare, which names each step's source).
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
from mitra_model.runtime.prepare import SupportSet, TableError, model_inputs, prepare_support

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
        support: the prepared support rows and what their preparation fixed (classes, target range,
            columns kept).
        digest: SHA-256 of the prepared arrays (what a reference's cache key covers).
    """

    task: TaskCell
    inputs: dict[str, np.ndarray]
    y_query: np.ndarray
    support: SupportSet
    digest: str

    @property
    def n_classes(self) -> int:
        """Classes in the table (classification), else 0."""
        return 0 if self.support.classes is None else len(self.support.classes)

    @property
    def y_range(self) -> tuple[float, float] | None:
        """The support rows' (min, max) target (regression; predictions are scaled back by it)."""
        return self.support.y_range

    @property
    def features_dropped(self) -> int:
        """Features constant on the support rows, dropped like upstream does."""
        return int((~self.support.keep).sum())

    @property
    def is_classification(self) -> bool:
        return self.n_classes > 0

    def outputs(self, raw: np.ndarray) -> np.ndarray:
        """A model's raw output for this table as the task reads it: (Q, n_classes) logits, or (Q,)
        predictions in the target's units."""
        return self.support.outputs(raw)


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
    try:
        support = prepare_support(x_support, y_support, classification=classification, max_rows=task.support)
    except TableError as exc:
        raise ConfigError(f"task {task.name!r}: {task.dataset}: {exc}") from None
    if classification:
        y_query = np.searchsorted(support.classes, y_query)
    inputs = model_inputs(support, support.features(x_query))
    digest = hashlib.sha256(b"".join(inputs[name].tobytes() for name in sorted(inputs))
                            + np.asarray(y_query).tobytes()).hexdigest()
    return TaskTable(task=task, inputs=inputs, y_query=np.asarray(y_query), support=support, digest=digest)


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
