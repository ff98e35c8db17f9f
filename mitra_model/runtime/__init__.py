"""Running a pulled release in Python: scikit-learn-style estimators over its ONNX files.

Needs the `[runtime]` extra (the release client, onnxruntime and numpy); never torch, ONNX or Prefect.
"""

from mitra_model.runtime.estimator import MitraClassifier, MitraRegressor, NotFittedError
from mitra_model.runtime.prepare import TableError

__all__ = ["MitraClassifier", "MitraRegressor", "NotFittedError", "TableError"]
