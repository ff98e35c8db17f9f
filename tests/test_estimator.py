"""The Python estimators over a pulled release (mitra_model.runtime): scikit-learn's conventions, inputs
prepared like upstream's wrapper, the release graph's own numbers, and the support-cache pair giving
the full model's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from s3_fixtures import make_build
from sklearn.base import clone
from sklearn.datasets import load_diabetes, load_iris
from sklearn.model_selection import train_test_split

from mitra_model.release.client import pull_release_url
from mitra_model.release.publish import publish_build
from mitra_model.release.store import StoreConfig, ensure_bucket, make_s3_client
from mitra_model.runtime import MitraClassifier, MitraRegressor, NotFittedError, TableError
from mitra_model.runtime.prepare import model_inputs, prepare_support

README = Path(__file__).resolve().parents[1] / "README.md"
ARTIFACTS = (("fp32", "model.onnx", 0, "fp32"), ("int8", "model-int8.onnx", 0, "int8"),
             ("encode-support", "encode-support.onnx", 0, "fp32"), ("predict-query", "predict-query.onnx", 0, "fp32"))
VARIANTS = {"classification": "mitra-classifier", "regression": "mitra-regressor"}


def _publish(tiny_artifacts: Any, task: str, client: Any, store: StoreConfig, root: Path) -> str:
    """A release of the tiny model's real files; returns its URL."""
    encode, predict = tiny_artifacts.files(task, "support-cache")
    files = {"fp32": tiny_artifacts.path(task, "fp32"), "int8": tiny_artifacts.path(task, "int8"),
             "encode-support": encode, "predict-query": predict}
    build = make_build(root, variant=VARIANTS[task], artifacts=ARTIFACTS, real_files=files, task=task.upper())
    publish_build(build, client=client, store=store)
    return f"s3://{store.bucket}/{store.prefix}/{VARIANTS[task]}"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MITRA_BUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MITRA_TRUSTED_KEYS", raising=False)
    return tmp_path / "cache"


def _iris() -> tuple[np.ndarray, ...]:
    x, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]  # labels that are not 0..n-1
    return tuple(train_test_split(x, names, test_size=30, stratify=names, random_state=0))


def _graph_output(path: Path, x_support: np.ndarray, y_support: np.ndarray, x_query: np.ndarray, *,
                  classification: bool) -> np.ndarray:
    support = prepare_support(x_support, y_support, classification=classification)
    raw = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, model_inputs(support, support.features(x_query)))[0]
    return support.outputs(raw)


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_a_classifier_from_a_release_url_predicts_what_its_graph_computes(tiny_artifacts, s3_store, s3_client, cache,
                                                                           tmp_path: Path) -> None:
    url = _publish(tiny_artifacts, "classification", s3_client, s3_store, tmp_path)
    x_train, x_test, y_train, _ = _iris()
    model = MitraClassifier.from_release(f"{url}@latest", artifact="int8", endpoint_url=s3_store.endpoint_url)
    assert model.fit(x_train, y_train) is model
    assert model.classes_.tolist() == ["setosa", "versicolor", "virginica"] and model.n_features_in_ == 4
    proba = model.predict_proba(x_test)
    logits = _graph_output(tiny_artifacts.path("classification", "int8"), x_train, y_train, x_test, classification=True)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(proba, expected / expected.sum(axis=1, keepdims=True), atol=1e-6)
    assert proba.shape == (30, 3) and np.allclose(proba.sum(axis=1), 1.0)
    assert model.predict(x_test).tolist() == model.classes_[logits.argmax(axis=1)].tolist()
    assert model.synthetic_ is True and model.version_
    assert any(cache.rglob("model-int8.onnx"))  # pulled into the cache, like hf_hub_download


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_fp32_encodes_the_support_set_once_through_the_pair_and_matches_the_full_graph(
        tiny_artifacts, s3_store, s3_client, cache, tmp_path: Path) -> None:
    url = _publish(tiny_artifacts, "classification", s3_client, s3_store, tmp_path)
    dest = tmp_path / "pulled"
    pull_release_url(url, dest, endpoint_url=s3_store.endpoint_url, client=s3_client)
    x_train, x_test, y_train, _ = _iris()
    pair = MitraClassifier(dest, artifact="fp32").fit(x_train, y_train)
    full = _graph_output(tiny_artifacts.path("classification", "fp32"), x_train, y_train, x_test, classification=True)
    expected = np.exp(full - full.max(axis=1, keepdims=True))
    np.testing.assert_allclose(pair.predict_proba(x_test), expected / expected.sum(axis=1, keepdims=True), atol=1e-5)
    one_by_one = np.concatenate([pair.predict_proba(x_test[i:i + 1]) for i in range(len(x_test))])
    np.testing.assert_allclose(one_by_one, pair.predict_proba(x_test), atol=1e-5)  # a row never sees its batch


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_a_regressor_predicts_in_the_targets_units(tiny_artifacts, s3_store, s3_client, cache, tmp_path: Path) -> None:
    url = _publish(tiny_artifacts, "regression", s3_client, s3_store, tmp_path)
    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=40, random_state=0)
    model = MitraRegressor(url, artifact="int8", endpoint_url=s3_store.endpoint_url).fit(x_train, y_train)
    predicted = model.predict(x_test)
    expected = _graph_output(tiny_artifacts.path("regression", "int8"), x_train, y_train, x_test, classification=False)
    np.testing.assert_allclose(predicted, expected, rtol=1e-6)
    assert predicted.shape == (40,)
    rescaled = clone(model).fit(x_train, 2 * y_train + 5).predict(x_test)  # targets scaled by the support's range
    np.testing.assert_allclose(rescaled, 2 * predicted + 5, rtol=1e-5)
    assert isinstance(model.score(x_test, y_test), float)
    with pytest.raises(TableError, match="holds a regression model; MitraClassifier needs a classification release"):
        MitraClassifier(url, artifact="int8", endpoint_url=s3_store.endpoint_url).fit(x_train, y_train > 150)


def test_scikit_learn_conventions_and_errors_that_say_what_is_wrong(tiny_artifacts, tmp_path: Path) -> None:
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "model-int8.onnx").write_bytes(tiny_artifacts.path("classification", "int8").read_bytes())
    (folder / "manifest.json").write_text('{"model": {"task": "CLASSIFICATION"}, "version": "v1", "source": {},'
                                          ' "artifacts": [{"name": "int8", "file": "model-int8.onnx"}]}')
    model = MitraClassifier(folder, artifact="int8", random_state=3)
    assert model.get_params() == {"release": folder, "artifact": "int8", "trusted_keys": (), "endpoint_url": None,
                                  "max_support_rows": 8192, "random_state": 3, "threads": 0}
    copy = clone(model)
    assert copy.get_params() == model.get_params() and copy is not model
    with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
        model.predict(np.zeros((2, 4)))
    x_train, x_test, y_train, _ = _iris()
    model.fit(x_train, y_train)
    with pytest.raises(TableError, match="X has 3 features; the support set had 4"):
        model.predict(x_test[:, :3])
    with pytest.raises(TableError, match="y has 12 classes; Mitra predicts at most 10"):
        clone(model).fit(np.random.default_rng(0).normal(size=(48, 3)), np.arange(48) % 12)
    with pytest.raises(ValueError, match="has no parameter 'block_size'"):
        model.set_params(block_size=4)
    assert not hasattr(model.set_params(random_state=4), "classes_")  # new params: fit again
    with pytest.raises(TableError, match="has no artifact fp16: it holds int8"):
        MitraClassifier(folder, artifact="fp16").fit(x_train, y_train)
    with pytest.raises(TableError, match="is not a pulled release"):
        MitraClassifier(tmp_path / "nowhere").fit(x_train, y_train)


def test_support_rows_beyond_the_limit_are_sub_sampled_like_upstream() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 3)), rng.integers(0, 3, 500)
    support = prepare_support(x, y, classification=True, max_rows=100, seed=1)
    assert support.x.shape == (100, 3)
    assert prepare_support(x, y, classification=True, max_rows=100, seed=1).x.tobytes() == support.x.tobytes()
    rows = {tuple(r) for r in x.astype(np.float32)}
    assert all(tuple(r) in rows for r in support.x)  # rows kept whole, none made up


def _readme_snippet() -> str:
    text = README.read_text()
    section = text[text.index("### Predict in Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.filterwarnings("ignore::mitra_model.release.client.SyntheticReleaseWarning")
def test_the_readme_estimator_snippet_runs_as_written(tiny_artifacts, s3_server, tmp_path: Path) -> None:
    """The README's consumer example, against the demo's bucket on a local S3 server."""
    snippet = _readme_snippet()
    bucket, prefix = re.search(r'"s3://([^/]+)/([^"]+)/mitra-classifier@latest"', snippet).groups()
    store = StoreConfig(bucket=bucket, prefix=prefix, endpoint_url=s3_server.endpoint_url)
    client = make_s3_client(store)
    ensure_bucket(client, bucket)
    try:
        _publish(tiny_artifacts, "classification", client, store, tmp_path)
        env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint_url, "MITRA_BUILD_CACHE": str(tmp_path / "cache")}
        env.pop("MITRA_TRUSTED_KEYS", None)
        done = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
    finally:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for entry in (*page.get("Versions", []), *page.get("DeleteMarkers", [])):
                client.delete_object(Bucket=bucket, Key=entry["Key"], VersionId=entry["VersionId"])
        client.delete_bucket(Bucket=bucket)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "SYNTHETIC" in done.stderr


GENERIC_CHECKS = ("check_get_params_invariance", "check_set_params", "check_dont_overwrite_parameters",
                  "check_fit2d_predict1d", "check_n_features_in", "check_estimators_dtypes", "check_fit_score_takes_y",
                  "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_fit_idempotent",
                  "check_estimators_pickle", "check_estimators_unfitted")
CLASSIFIER_CHECKS = ("check_classifiers_classes", "check_classifiers_one_label")


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_scikit_learns_estimator_checks_that_apply_to_an_in_context_model(tiny_artifacts, tmp_path: Path,
                                                                         task: str) -> None:
    """scikit-learn's own checks, those that make sense for a model that learns in context: not the
    ones that expect a trained model's accuracy (random weights).
    Row order and subsets not changing a row's prediction is Mitra's batch independence."""
    import sklearn.utils.estimator_checks as checks

    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(tiny_artifacts.path(task, "fp32").read_bytes())
    (folder / "manifest.json").write_text(json.dumps({"model": {"task": task.upper()}, "version": "v1", "source": {},
                                                      "artifacts": [{"name": "fp32", "file": "model.onnx"}]}))
    estimator = (MitraClassifier if task == "classification" else MitraRegressor)(folder, artifact="fp32")
    for name in GENERIC_CHECKS + (CLASSIFIER_CHECKS if task == "classification" else ()):
        getattr(checks, name)(type(estimator).__name__, estimator)
