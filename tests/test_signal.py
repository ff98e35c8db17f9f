"""Judging an artifact by the signal it keeps: the signal-aware metrics, the task checks on real tables
(scikit-learn's bundled datasets, prepared like upstream's Mitra wrapper), and an int8 whose rows do
not depend on the rest of the batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mitra_model.build import tasks as task_tables
from mitra_model.build.config import TaskCell, Tolerance, load_config
from mitra_model.build.recipes import quantize_onnx
from mitra_model.build.support_cache import export_support_cache
from mitra_model.build.verify import (
    graph_candidate,
    pair_candidate,
    signal_metrics,
    verify_onnx,
)
from mitra_model.errors import ConfigError
from mitra_model.model.inputs import make_inputs
from mitra_model.model.snapshot import load_model

IRIS = TaskCell(name="iris", dataset="iris", support=112, queries=38)
WINE = TaskCell(name="wine", dataset="wine", support=133, queries=45)
DIABETES = TaskCell(name="diabetes", dataset="diabetes", support=256, queries=64)
TABLES = {"classification": (IRIS, WINE), "regression": (DIABETES,)}
# int4's bounds before issue 21: loose enough to pass almost anything
OLD_INT4 = Tolerance(max_abs=0.5, max_prob_err=0.05, min_argmax_agreement=0.8, min_correlation=0.98,
                     correlation_min_spread=0.2)


# -- the metrics ----------------------------------------------------------------------------------


def test_an_offset_as_large_as_the_spread_is_an_error_of_one_spread() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(2, 20, 3))
    spread = np.sqrt(np.mean((reference - reference.mean(axis=1, keepdims=True)) ** 2))
    shifted = signal_metrics(reference, reference + spread, is_classifier=True)
    assert shifted.err_over_spread == pytest.approx(1.0)
    assert shifted.centered_argmax_agreement == 1.0  # a shared offset changes no centred argmax
    assert signal_metrics(reference, reference, is_classifier=True).err_over_spread == 0.0


def test_a_near_constant_predictor_agrees_on_argmax_but_not_on_its_signal() -> None:
    """Random-weight Mitra: one class wins every row by a wide margin, the rows differ a little. An
    artifact that loses those differences keeps every plain argmax and none of the signal."""
    rng = np.random.default_rng(1)
    reference = np.array([5.0, 0.0, -1.0]) + 0.05 * rng.normal(size=(1, 40, 3))
    flattened = np.broadcast_to(reference.mean(axis=1, keepdims=True), reference.shape) \
        + 0.05 * rng.normal(size=(1, 40, 3))
    plain = (flattened.argmax(-1) == reference.argmax(-1)).mean()
    signal = signal_metrics(reference, flattened, is_classifier=True)
    assert plain == 1.0
    assert signal.err_over_spread > 1.0 and signal.centered_argmax_agreement < 0.6


def test_a_regressor_is_judged_by_its_centred_correlation() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(3, 30))
    kept = signal_metrics(reference, reference * 1.01 + 0.3, is_classifier=False)
    lost = signal_metrics(reference, rng.normal(size=(3, 30)), is_classifier=False)
    assert kept.centered_correlation > 0.999 and kept.centered_argmax_agreement is None
    assert lost.centered_correlation < 0.5
    assert signal_metrics(reference[:, :1], reference[:, :1], is_classifier=False).err_over_spread is None  # one row


# -- real tables ----------------------------------------------------------------------------------


def test_tables_are_split_and_encoded_like_upstreams_wrapper() -> None:
    iris = task_tables.load_table(IRIS, seed=1234)
    assert iris.inputs["x_support"].shape == (1, 112, 4) and iris.inputs["x_query"].shape == (1, 38, 4)
    assert iris.inputs["y_support"].dtype == np.int64 and set(np.unique(iris.inputs["y_support"])) == {0, 1, 2}
    assert sorted(np.bincount(iris.y_query).tolist()) == [12, 13, 13]  # stratified
    assert iris.digest == task_tables.load_table(IRIS, seed=1234).digest != task_tables.load_table(IRIS, seed=1).digest
    digits = task_tables.load_table(TaskCell(name="d", dataset="digits", support=120, queries=40), seed=1234)
    assert digits.features_dropped > 0 and digits.inputs["x_support"].shape[2] == 64 - digits.features_dropped
    assert (digits.inputs["x_support"][0].std(axis=0) > 0).all()  # no constant column left
    diabetes = task_tables.load_table(DIABETES, seed=1234)
    y = diabetes.inputs["y_support"][0]
    assert y.dtype == np.float32 and y.min() == 0.0 and y.max() == 1.0  # scaled by the support rows
    low, high = diabetes.y_range
    assert diabetes.outputs(np.array([[0.0, 1.0]]))[1] == pytest.approx(high) and low < high


def test_a_table_with_more_than_ten_classes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    twelve = np.repeat(np.arange(12), 20)
    monkeypatch.setitem(task_tables._LOADERS, "digits",
                        lambda return_X_y: (np.random.default_rng(0).normal(size=(240, 5)), twelve))
    with pytest.raises(ConfigError, match="task 'many': digits: y has 12 classes; Mitra predicts at most 10"):
        task_tables.load_table(TaskCell(name="many", dataset="digits", support=150, queries=60), seed=0)
    with pytest.raises(ConfigError, match="task 'big': digits has 240 rows, fewer than support 200 \\+ queries 60"):
        task_tables.load_table(TaskCell(name="big", dataset="digits", support=200, queries=60), seed=0)


def test_task_scores_and_chance() -> None:
    iris = task_tables.load_table(IRIS, seed=1234)
    perfect = np.full((1, 38, 10), -30.0)
    perfect[0, np.arange(38), iris.y_query] = 30.0
    scores = task_tables.task_scores(iris, perfect)
    assert scores["accuracy"] == 1.0 and scores["log_loss"] < 1e-6
    chance = task_tables.chance_scores(iris)
    # the support's most frequent class (one of the two with 38 support rows) is 12 of the 38 queries
    assert chance["accuracy"] == pytest.approx(12 / 38) and chance["log_loss"] == pytest.approx(np.log(3), abs=0.01)


# -- artifacts on the matrix and the real tables ---------------------------------------------------


# Per task, the coarsest rounding of every big weight (levels per tensor) that int4's old bounds still
# passed on the tiny models: 4 levels (2 bits) for the regressor; the classifier's probabilities gave 2
# bits away, 8 levels (3 bits) did not.
COARSE_LEVELS = {"classification": 8, "regression": 4}


@pytest.fixture(scope="module")
def coarse(tiny_artifacts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A deliberately bad artifact per task: the optimized fp32 file with every big weight rounded to
    COARSE_LEVELS levels per tensor."""
    root = tmp_path_factory.mktemp("coarse")
    files = {}
    for task, levels in COARSE_LEVELS.items():
        model = onnx.load(str(tiny_artifacts.path(task, "fp32-ort")))
        for tensor in model.graph.initializer:
            weight = numpy_helper.to_array(tensor)
            if weight.ndim == 2 and min(weight.shape) >= 16:
                step = 2 * np.abs(weight).max() / levels
                rounded = (np.clip(np.floor(weight / step), -levels // 2, levels // 2 - 1) + 0.5) * step
                tensor.CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), tensor.name))
        files[task] = root / f"{task}-{levels}-levels.onnx"
        onnx.save(model, str(files[task]))
    return files


def test_coarsely_rounded_weights_pass_the_old_bounds_and_fail_the_signal_gate(coarse, tiny_snapshots, build_config,
                                                                               task: str) -> None:
    model, _ = load_model(tiny_snapshots[task].path)
    cells = build_config.verification.cells
    old = verify_onnx(model, coarse[task], cells=cells, tolerance=OLD_INT4, precision="int4",
                      seed=build_config.verification.seed, tasks=TABLES[task])
    assert old.passed, old.failures  # what int4's bounds let through before
    new = verify_onnx(model, coarse[task], cells=cells, tolerance=build_config.verification.tolerance("int4"),
                      precision="int4", seed=build_config.verification.seed, tasks=TABLES[task])
    assert not new.passed
    assert any("error / spread" in failure for failure in new.failures), new.failures


@pytest.mark.parametrize("precision", ["fp32-ort", "fp16", "int8", "int4"])
def test_every_precision_keeps_the_signal_on_real_tables(tiny_artifacts, tiny_snapshots, build_config, task: str,
                                                         precision: str) -> None:
    """The configured bounds, signal gate and batch dependence included, on the matrix and the tables."""
    model, _ = load_model(tiny_snapshots[task].path)
    key = "fp32" if precision == "fp32-ort" else precision
    report = verify_onnx(model, tiny_artifacts.path(task, precision), cells=build_config.verification.cells,
                         tolerance=build_config.verification.tolerance(key), precision=key,
                         seed=build_config.verification.seed, tasks=TABLES[task])
    assert report.passed, report.failures
    assert len(report.tasks) == len(TABLES[task]) and all(t.metrics.err_over_spread is not None for t in report.tasks)
    assert all(set(t.scores) == set(t.upstream_scores) == set(t.chance_scores) for t in report.tasks)


def test_int8_rows_are_the_same_alone_and_in_any_batch(tiny_artifacts, tiny_snapshots, build_config, task: str) -> None:
    """Every query row of the matrix and of the real tables, alone and in its batch: within 1e-5."""
    model, _ = load_model(tiny_snapshots[task].path)
    report = verify_onnx(model, tiny_artifacts.path(task, "int8"), cells=build_config.verification.cells,
                         tolerance=build_config.verification.tolerance("int8"), precision="int8",
                         seed=build_config.verification.seed, tasks=TABLES[task])
    dependence = [r.metrics.batch_dependence for r in (*report.cells, *report.tasks)]
    assert max(dependence) <= 1e-5, dependence
    candidate = graph_candidate(tiny_artifacts.path(task, "int8"))
    inputs = task_tables.load_table(TABLES[task][0], seed=0).inputs
    together = candidate.run(inputs)
    for row in range(inputs["x_query"].shape[1]):  # every row of a real table, not only the ones the matrix samples
        alone = candidate.run({**inputs, "x_query": inputs["x_query"][:, row:row + 1]})
        assert np.abs(alone[0, 0] - together[0, row]).max() <= 1e-5


def test_the_int8_pair_is_the_int8_full_model(tiny_snapshots, build_config, tmp_path: Path, task: str) -> None:
    """Encode-support and predict-query quantized like the full model give its numbers: per-row
    scales let the support rows' int8 projections be the same whether the query rows are there.
    Rounded to nearest: GPTQ's levels come from the activations of the graph quantized, and a half of
    the pair cannot be calibrated like the full model (test_gptq: it is refused)."""
    model, _ = load_model(tiny_snapshots[task].path)
    shape, opset = build_config.export.trace_shape, build_config.export.opset
    from mitra_model.build.export import export_onnx

    full = export_onnx(model, tmp_path / "model.onnx", opset=opset, trace_shape=shape).path
    pair = export_support_cache(model, tmp_path / "pair", opset=opset, trace_shape=shape)
    int8 = {name: quantize_onnx(path, tmp_path / f"{name}-int8.onnx", precision="int8", options={"rounding": "nearest"}).path
            for name, path in (("full", full), ("encode", pair.encode.path), ("predict", pair.predict.path))}
    whole = graph_candidate(int8["full"])
    split = pair_candidate(int8["encode"], int8["predict"], model.config.n_layers)
    for seed, shape_ in enumerate(((1, 64, 16, 8), (3, 48, 8, 5))):
        inputs = make_inputs(shape_, config=model.config, data="mixed", seed=seed, salt="pair")
        assert np.abs(whole.run(inputs) - split.run(inputs)).max() <= 1e-5


def test_the_configured_bounds_hold_what_was_measured_at_full_size() -> None:
    """config/mitra-build.toml's signal bounds against bench/results-signal.json (the full-size models):
    a bound tightened below its measurement, or a measurement that got worse, is caught here."""
    recorded = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results-signal.json").read_text())
    config = load_config()
    assert set(recorded["tasks"]) == {"classification", "regression"}
    for task, rows in recorded["tasks"].items():
        assert {"fp32-ort", *config.artifacts.precisions} <= {row["candidate"] for row in rows}, task  # none unmeasured
        for row in rows:
            key = "fp32" if row["candidate"] == "fp32-ort" else row["candidate"]
            if key not in config.verification.tolerances:  # an option measured beside the configured one (int8-nearest)
                continue
            tolerance = config.verification.tolerance(key)
            where = f"{task} {row['candidate']}"
            assert row["matrix"]["max_err_over_spread"] <= tolerance.max_err_over_spread, where
            assert row["matrix"]["max_batch_dependence"] <= tolerance.max_batch_dependence, where
            for name, table in row["tasks"].items():
                assert table["err_over_spread"] <= tolerance.on_tables().max_err_over_spread, f"{where} {name}"
                assert table["batch_dependence"] <= tolerance.max_batch_dependence, f"{where} {name}"
