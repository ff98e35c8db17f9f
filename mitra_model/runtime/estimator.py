"""`MitraClassifier` and `MitraRegressor`: scikit-learn-style estimators over a pulled release.

Mitra learns in context: `fit` keeps (and, with the support-cache pair, encodes once) the support rows,
`predict` conditions every query row on them. No weights change.

    from mitra_model.runtime import MitraClassifier

    model = MitraClassifier.from_release("s3://bucket/models/mitra-classifier@latest", artifact="int8",
                                         trusted_keys=["release-signing.pub"])
    model.fit(X_train, y_train)
    model.predict_proba(X_test)

The estimators follow scikit-learn's conventions (`get_params`/`set_params`, `fit` returning self,
fitted attributes ending in `_`, `classes_`, `n_features_in_`) without importing scikit-learn, so the
`[runtime]` extra stays the release client, onnxruntime and numpy.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from mitra_model.release.client import cache_dest, parse_release_url, pull_release_url
from mitra_model.release.layout import MANIFEST_NAME
from mitra_model.runtime.prepare import MAX_SUPPORT_ROWS, TableError, model_inputs, prepare_support

PAIR = ("encode-support", "predict-query")  # the support-cache pair's artifact names in a manifest
QUERY_BATCH_ROWS = 1024  # upstream's max_samples_query: query rows per call (rows never see each other)


try:  # where scikit-learn is installed, its checks and `except sklearn.exceptions.NotFittedError` catch ours
    from sklearn.exceptions import NotFittedError as _NotFittedBase
except ImportError:  # the [runtime] extra does without scikit-learn: the same bases as its NotFittedError
    class _NotFittedBase(ValueError, AttributeError):  # type: ignore[no-redef]
        pass


class NotFittedError(_NotFittedBase):
    """`predict` before `fit`: a ValueError and an AttributeError, and scikit-learn's NotFittedError when
    scikit-learn is installed."""


class _MitraEstimator:
    _task: ClassVar[str]
    _estimator_type: ClassVar[str]

    def __init__(self, release: str | Path, artifact: str = "int8", *, trusted_keys: Sequence[str | Path | bytes] = (),
                 endpoint_url: str | None = None, max_support_rows: int = MAX_SUPPORT_ROWS, random_state: int = 0,
                 threads: int = 0) -> None:
        """
        Args:
            release: a pulled release folder (`mitra-build pull`'s DEST), or a release URL
                `s3://BUCKET/PREFIX/VARIANT[@VERSION]`, pulled into the cache at `fit` (pull_artifact's cache).
            artifact: which file predicts: "int8", "fp32", "fp16", "int4", ... (the manifest's names), or
                "support-cache" for the fp32 encode/predict pair. "fp32" uses the pair when the release has it
                (the same numbers; the support rows are encoded once per `fit`).
            trusted_keys: public key paths or PEM bytes; with any, a URL's release must be signed by one
                (`$MITRA_TRUSTED_KEYS` is honoured too).
            endpoint_url: the S3 endpoint for a URL (None: AWS, or $AWS_ENDPOINT_URL).
            max_support_rows: support rows beyond this are sub-sampled, as upstream does (8192).
            random_state: the sub-sample's seed.
            threads: ONNX Runtime intra-op threads (0: its default, every core).
        """
        self.release = release
        self.artifact = artifact
        self.trusted_keys = trusted_keys
        self.endpoint_url = endpoint_url
        self.max_support_rows = max_support_rows
        self.random_state = random_state
        self.threads = threads

    @classmethod
    def from_release(cls, url: str, artifact: str = "int8", **params: Any) -> _MitraEstimator:
        """An estimator over a release URL, pulled (and verified) now rather than at the first `fit`."""
        estimator = cls(url, artifact, **params)
        estimator._folder()
        return estimator

    # -- scikit-learn's estimator conventions ----------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        del deep  # no nested estimators
        return {name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters
                if name != "self"}

    def set_params(self, **params: Any) -> _MitraEstimator:
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r}; it has: {', '.join(valid)}")
            setattr(self, name, value)
        for fitted in [name for name in vars(self) if name.endswith("_") and not name.startswith("_")]:
            delattr(self, fitted)
        return self

    def __sklearn_tags__(self) -> Any:
        # deferred: only scikit-learn calls this, so it is installed then; the [runtime] extra does not need it
        from sklearn.base import BaseEstimator
        from sklearn.utils import ClassifierTags, RegressorTags

        tags = BaseEstimator.__sklearn_tags__(self)
        tags.estimator_type = self._estimator_type
        tags.target_tags.required = True
        tags.input_tags.allow_nan = True  # imputed with the support rows' means, as upstream's wrapper does
        if self._estimator_type == "classifier":
            tags.classifier_tags = ClassifierTags()
        else:
            tags.regressor_tags = RegressorTags()
        return tags

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.release!r}, artifact={self.artifact!r})"

    # -- fit / predict ---------------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> _MitraEstimator:  # noqa: N803 - scikit-learn's names
        """Keep the support rows (prepared like upstream's wrapper: mitra_model.runtime.prepare) and, with
        the support-cache pair, encode them once.

        Raises:
            TableError: more than 10 classes, fewer than 2 rows, X and y disagree (the message says which).
            PullError, SignatureError, ...: pulling a release URL failed (mitra_model.errors).
        """
        folder = self._folder()
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        task = str(manifest.get("model", {}).get("task", "")).lower()
        if task != self._task:
            raise TableError(f"{folder} holds a {task or 'unknown'} model; {type(self).__name__} needs a "
                             f"{self._task} release (mitra-classifier / mitra-regressor)")
        files = {entry["name"]: folder / entry["file"] for entry in manifest["artifacts"]}
        use_pair = self.artifact == "support-cache" or (self.artifact == "fp32" and all(n in files for n in PAIR))
        wanted = PAIR if use_pair else (self.artifact,)
        missing = [name for name in wanted if name not in files or not files[name].exists()]
        if missing:
            pulled = sorted(name for name, path in files.items() if path.exists())
            raise TableError(f"{folder} has no artifact {', '.join(missing)}: it holds {', '.join(pulled) or 'none'} "
                             "(pull it, or pass artifact= one of those)")
        support = prepare_support(X, y, classification=self._task == "classification",
                                  max_rows=self.max_support_rows, seed=self.random_state)
        self.support_ = support
        self.n_features_in_ = len(support.keep)
        self.synthetic_ = bool(manifest.get("source", {}).get("synthetic"))
        self.version_ = manifest.get("version")
        self.files_ = tuple(files[name] for name in wanted)  # one graph, or the encode/predict pair
        self._runner = self._make_runner()  # the pair encodes the support set here, once
        return self

    def _make_runner(self) -> Any:
        """x_query (Q, F') -> the model's raw output for the fitted support set."""
        support = self.support_
        sessions = [self._session(path) for path in self.files_]
        if len(sessions) == 2:
            encoder, predictor = sessions
            inputs = model_inputs(support, support.x[:0])
            cache = encoder.run(None, {i.name: inputs[i.name] for i in encoder.get_inputs()})
            return _pair_runner(dict(zip((o.name for o in encoder.get_outputs()), cache)), predictor)
        (graph,) = sessions
        return lambda x_query: graph.run(None, model_inputs(support, x_query))[0]

    def __getstate__(self) -> dict[str, Any]:
        # ONNX Runtime sessions do not pickle: an unpickled estimator opens them again at its first predict
        return {name: value for name, value in vars(self).items() if name != "_runner"}

    def _raw(self, X: Any) -> np.ndarray:  # noqa: N803
        if not hasattr(self, "support_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(X_support, y_support) first")
        if getattr(self, "_runner", None) is None:
            self._runner = self._make_runner()
        x_query = self.support_.features(X)
        if not len(x_query):
            return self.support_.outputs(self._runner(self.support_.x[:1]))[:0]
        chunks = [x_query[start:start + QUERY_BATCH_ROWS] for start in range(0, len(x_query), QUERY_BATCH_ROWS)]
        return np.concatenate([self.support_.outputs(self._runner(chunk)) for chunk in chunks])

    # -- loading ---------------------------------------------------------------------------------

    def _folder(self) -> Path:
        if not str(self.release).startswith("s3://"):
            folder = Path(self.release).expanduser()
            if not (folder / MANIFEST_NAME).exists():
                raise TableError(f"{folder} is not a pulled release (no {MANIFEST_NAME}): pass the folder "
                                 "`mitra-build pull` wrote, or an s3:// release URL")
            return folder
        url = str(self.release)
        parse_release_url(url)  # a malformed URL is reported before anything is fetched
        dest = cache_dest(url, endpoint_url=self.endpoint_url)
        wanted = list(PAIR) if self.artifact == "support-cache" else [self.artifact]
        pull_release_url(url, dest, artifacts=wanted, endpoint_url=self.endpoint_url, trusted_keys=self.trusted_keys)
        return dest

    def _session(self, path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _pair_runner(cache: dict[str, np.ndarray], predictor: ort.InferenceSession) -> Any:
    def run(x_query: np.ndarray) -> np.ndarray:
        return predictor.run(None, {**cache, "x_query": x_query[None].astype(np.float32)})[0]

    return run


class MitraClassifier(_MitraEstimator):
    """Mitra's classifier over a release: up to 10 classes, any sortable labels."""

    _task = "classification"
    _estimator_type = "classifier"

    def fit(self, X: Any, y: Any) -> MitraClassifier:  # noqa: N803
        super().fit(X, y)
        self.classes_ = self.support_.classes
        return self

    def predict_proba(self, X: Any) -> np.ndarray:  # noqa: N803
        """(n_rows, n_classes) probabilities, columns in `classes_` order (softmax over the table's classes)."""
        logits = self._raw(X).astype(np.float64)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        logits = self._raw(X)
        return self.classes_[logits.argmax(axis=1)]

    def score(self, X: Any, y: Any) -> float:  # noqa: N803
        """Accuracy, like scikit-learn's ClassifierMixin."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


class MitraRegressor(_MitraEstimator):
    """Mitra's regressor over a release: predictions in the targets' units."""

    _task = "regression"
    _estimator_type = "regressor"

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        return self._raw(X).astype(np.float64)

    def score(self, X: Any, y: Any) -> float:  # noqa: N803
        """R², like scikit-learn's RegressorMixin."""
        y = np.asarray(y, dtype=np.float64)
        total = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((self.predict(X) - y) ** 2).sum()) / total if total > 0 else 0.0


__all__ = ["MitraClassifier", "MitraRegressor", "NotFittedError", "TableError"]
