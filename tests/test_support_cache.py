"""Fit once, predict many: the support encoder / query predictor pair computes Tab2D.forward's numbers,
in PyTorch and in ONNX Runtime, composes with int8, and refuses a cache that does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mitra_model.build.export import numpy_inputs
from mitra_model.build.recipes import quantize_onnx
from mitra_model.build.support_cache import (
    ENCODE_INPUT_NAMES,
    SUPPORT_CACHE_FILES,
    QueryPredictor,
    SupportCacheError,
    SupportCacheExport,
    SupportEncoder,
    cache_names,
    cache_nbytes,
    export_support_cache,
    support_cache_contract,
)
from mitra_model.build.verify import onnx_session, require_passed, verify_support_cache
from mitra_model.errors import ExportError, MitraBuildError
from mitra_model.fileutil import sha256_file
from mitra_model.model.inputs import make_inputs
from mitra_model.model.snapshot import load_model, write_synthetic_snapshot

FLAVOURS = ("portable", "optimized")
# (id, (B, S, Q, F), data, padded support rows)
CASES = [
    ("mixed", (1, 64, 16, 8), "mixed", 0),
    ("integer-ties", (1, 100, 20, 6), "integer_ties", 0),
    ("batch-padded", (3, 48, 8, 5), "mixed", 12),
    ("one-support-row", (1, 1, 6, 4), "mixed", 0),
    ("one-feature", (1, 50, 10, 1), "integer_ties", 0),
    ("one-query-row", (2, 40, 1, 7), "mixed", 0),
    ("constant-columns", (1, 30, 6, 4), "constant", 0),
    ("large-magnitude", (1, 70, 8, 5), "large_magnitude", 0),
]


@pytest.fixture(scope="module")
def models(tiny_snapshots):
    return {task: load_model(snapshot.path)[0] for task, snapshot in tiny_snapshots.items()}


@pytest.fixture(scope="module")
def pairs(models, build_config, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], SupportCacheExport]:
    root = tmp_path_factory.mktemp("support-cache")
    return {
        (task, flavour): export_support_cache(
            model, root / task, opset=build_config.export.opset, trace_shape=build_config.export.trace_shape, flavour=flavour,
        )
        for task, model in models.items()
        for flavour in FLAVOURS
    }


def _inputs(model, shape, data="mixed", padded=0, salt="support-cache") -> dict[str, np.ndarray]:
    return make_inputs(shape, config=model.config, data=data, padded_support_rows=padded, seed=3, salt=salt)


def _encode(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = onnx_session(path)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {name: inputs[name] for name in ENCODE_INPUT_NAMES})))


@pytest.mark.parametrize("case_id, shape, data, padded", CASES, ids=[c[0] for c in CASES])
def test_pytorch_pair_is_forward(models, task: str, case_id: str, shape, data: str, padded: int) -> None:
    model = models[task]
    x_support, y_support, x_query, padding = numpy_inputs(_inputs(model, shape, data, padded, salt=case_id))
    with torch.no_grad():
        expected = model(x_support, y_support, x_query, padding)
        cache = SupportEncoder(model)(x_support, y_support, padding)
        got = QueryPredictor(model)(*cache, x_query)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6  # measured: bit-identical


def test_cache_contents_and_size(models, task: str) -> None:
    model = models[task]
    batch, n_support, n_query, n_features = 2, 40, 5, 6
    x_support, y_support, _, padding = numpy_inputs(_inputs(model, (batch, n_support, n_query, n_features), padded=10))
    with torch.no_grad():
        cache = SupportEncoder(model)(x_support, y_support, padding)
    _, outputs = support_cache_contract(model.config)["encode_support"]
    sizes = {"batch": batch, "n_features": n_features, "n_tokens": n_features + 1, "n_support": n_support}
    for spec, tensor in zip(outputs, cache):
        assert tuple(sizes.get(d, d) for d in spec.shape) == tuple(tensor.shape), spec.name
        assert str(tensor.dtype).removeprefix("torch.") == spec.dtype, spec.name
    assert [spec.name for spec in outputs] == list(cache_names(model.config.n_layers))
    assert cache[1].tolist() == [40, 30]  # n_valid_support: batch item 1 pads 10 rows
    assert sum(t.numel() * t.element_size() for t in cache) == cache_nbytes(
        model.config, batch=batch, n_support=n_support, n_features=n_features
    )


def test_files_follow_the_contract(pairs, models, task: str) -> None:
    contract = support_cache_contract(models[task].config)
    for flavour in FLAVOURS:
        pair = pairs[task, flavour]
        assert (pair.encode.path.name, pair.predict.path.name) == SUPPORT_CACHE_FILES[flavour]
        for role, result in (("encode_support", pair.encode), ("predict_query", pair.predict)):
            onnx.checker.check_model(str(result.path), full_check=True)
            proto = onnx.load(str(result.path))
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
            inputs, outputs = contract[role]
            for values, specs in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
                assert [v.name for v in values] == [s.name for s in specs]
                for value, spec in zip(values, specs):
                    tensor = value.type.tensor_type
                    assert onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name == spec.dtype, spec.name
                    assert tuple(d.dim_param or d.dim_value for d in tensor.shape.dim) == spec.shape, spec.name
            meta = {p.key: p.value for p in proto.metadata_props}
            assert meta["mitra_build.support_cache"] == role and meta["mitra_build.flavour"] == flavour
            assert int(meta["mitra_build.model_fingerprint"], 16) == pair.fingerprint & (2**64 - 1)
            assert result.sha256 == sha256_file(result.path) and result.size == result.path.stat().st_size


def test_reexport_is_byte_identical(pairs, models, build_config, tmp_path: Path) -> None:
    again = export_support_cache(
        models["classification"], tmp_path, opset=build_config.export.opset, trace_shape=build_config.export.trace_shape,
    )
    first = pairs["classification", "portable"]
    assert (again.encode.sha256, again.predict.sha256) == (first.encode.sha256, first.predict.sha256)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SUPPORT_CACHE_FILES["portable"])  # no temp files left


def test_unknown_flavour_is_refused(models, build_config, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown export flavour 'fast'"):
        export_support_cache(
            models["classification"], tmp_path, opset=17, trace_shape=build_config.export.trace_shape,
            flavour="fast",  # type: ignore[arg-type]
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_onnx_pair_matches_full_model_over_the_matrix(pairs, models, build_config, task: str, flavour: str) -> None:
    pair = pairs[task, flavour]
    report = verify_support_cache(
        models[task], pair.encode.path, pair.predict.path, cells=build_config.verification.cells,
        tolerance=build_config.verification.tolerance("support-cache"), seed=build_config.verification.seed, query_batches=3,
    )
    require_passed(report)
    assert [c.name for c in report.cells] == [c.name for c in build_config.verification.cells]
    assert report.summary["max_abs_err"] <= 1e-5, report.to_markdown()
    assert report.summary["query_batches"] == 3 and report.onnx_path == str(pair.predict.path)


def test_query_batches_equal_one_batch(pairs, models, task: str) -> None:
    model = models[task]
    inputs = _inputs(model, (2, 60, 12, 5), padded=7)
    x_support, y_support, x_query, padding = numpy_inputs(inputs)
    with torch.no_grad():
        cache = SupportEncoder(model)(x_support, y_support, padding)
        predictor = QueryPredictor(model)
        whole = predictor(*cache, x_query)
        batched = torch.cat([predictor(*cache, part) for part in x_query.split([1, 4, 7], dim=1)], dim=1)
    assert (batched - whole).abs().max().item() <= 1e-6

    pair = pairs[task, "portable"]
    feed = _encode(pair.encode.path, inputs)
    session = onnx_session(pair.predict.path)
    whole_onnx = session.run(None, {**feed, "x_query": inputs["x_query"]})[0]
    parts = [session.run(None, {**feed, "x_query": inputs["x_query"][:, i : i + 1]})[0] for i in range(12)]
    assert np.abs(np.concatenate(parts, axis=1) - whole_onnx).max() <= 1e-5
    assert np.abs(whole_onnx - whole.numpy()).max() <= 1e-5


def test_optimized_predict_reads_a_portable_cache(pairs, models, task: str) -> None:
    inputs = _inputs(models[task], (1, 50, 9, 6))
    feed = {**_encode(pairs[task, "portable"].encode.path, inputs), "x_query": inputs["x_query"]}
    portable = onnx_session(pairs[task, "portable"].predict.path).run(None, feed)[0]
    optimized = onnx_session(pairs[task, "optimized"].predict.path).run(None, feed)[0]
    assert np.abs(portable - optimized).max() <= 1e-5


def test_int8_predict_composes(pairs, models, build_config, task: str, tmp_path: Path) -> None:
    """The int8 predictor (quantize.py; rounded to nearest: GPTQ cannot calibrate a predictor) reads the
    fp32 encoder's cache; held to the int8 tolerance."""
    pair = pairs[task, "optimized"]
    int8 = quantize_onnx(pair.predict.path, tmp_path / "predict-query-ort-int8.onnx", precision="int8",
                         options={"rounding": "nearest"})
    assert int8.details["quantized_matmuls"] > 0
    model, cells = models[task], build_config.verification.cells
    tolerance = build_config.verification.tolerance("int8")
    report = verify_support_cache(
        model, pair.encode.path, int8.path, cells=cells, tolerance=tolerance,
        seed=build_config.verification.seed, precision="int8",
    )
    require_passed(report)  # the config's int8 bounds, incl. its correlation_min_spread for flat regressors
    assert report.precision == "int8" and report.summary["max_abs_err"] > 0


@pytest.fixture(scope="module")
def other_model_pair(build_config, tmp_path_factory: pytest.TempPathFactory) -> SupportCacheExport:
    """The tiny classifier's architecture with other weights (a different seed)."""
    root = tmp_path_factory.mktemp("other-model")
    snapshot = write_synthetic_snapshot(root / "snapshot", task="classification", size_name="tiny",
                                        size=build_config.sizes["tiny"], seed=8)
    model, _ = load_model(snapshot.path)
    return export_support_cache(model, root, opset=build_config.export.opset, trace_shape=build_config.export.trace_shape)


def _query_with_features(x_query: np.ndarray, n_features: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(x_query, (*x_query.shape[:2], n_features)))


# (id, the query or cache change, the ONNX Runtime error's node, the PyTorch message)
MISMATCHES = [
    ("one-feature-query", lambda c, q: (c, _query_with_features(q, 1)), "/cache_must_fit_query/", "feature_mean"),
    ("fewer-features", lambda c, q: (c, _query_with_features(q, 3)), "/cache_must_fit_query/", "feature_mean"),
    ("more-features", lambda c, q: (c, _query_with_features(q, 5)), "/cache_must_fit_query/", "feature_mean"),
    ("one-batch-item", lambda c, q: (c, q[:1].copy()), "/cache_must_fit_query/", "n_valid_support"),
    ("keys-of-another-batch", lambda c, q: ({**c, "support_values_1": c["support_values_1"][:1].copy()}, q),
     "/cache_must_fit_query/", r"support_values_1 \(1, 5, 4, 20, 16\) \(expected \(2, 5, 4, 20, 16\)\)"),
    ("keys-of-another-support-set", lambda c, q: ({**c, "support_keys_1": c["support_keys_1"][:, :, :, :7].copy()}, q),
     "/cache_must_fit_query/", "support_keys_1"),
    ("fingerprint", lambda c, q: ({**c, "model_fingerprint": c["model_fingerprint"] + 1}, q),
     "/cache_must_come_from_this_model/", "other weights"),
]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("case_id, change, node, message", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_cache_fails_loudly(pairs, models, flavour: str, case_id: str, change, node: str, message: str) -> None:
    """Without the guards, a one-feature query against a 4-feature cache broadcast silently into garbage."""
    model, pair = models["classification"], pairs["classification", flavour]
    inputs = _inputs(model, (2, 20, 5, 4))
    cache, x_query = change(_encode(pair.encode.path, inputs), inputs["x_query"])
    with pytest.raises(Exception, match=f"Gather node. Name:'{node}.*indices element out of data bounds"):
        onnx_session(pair.predict.path).run(None, {**cache, "x_query": x_query})
    with pytest.raises(SupportCacheError, match=message) as caught:
        QueryPredictor(model)(*(torch.from_numpy(cache[name]) for name in cache_names(model.config.n_layers)),
                              torch.from_numpy(x_query))
    assert isinstance(caught.value, MitraBuildError) and isinstance(caught.value, ValueError)


def test_cache_of_another_model_fails_loudly(pairs, models, other_model_pair) -> None:
    """Same architecture, other weights: every shape fits, so only the fingerprint can tell."""
    inputs = _inputs(models["classification"], (1, 30, 4, 5))
    feed = {**_encode(pairs["classification", "portable"].encode.path, inputs), "x_query": inputs["x_query"]}
    with pytest.raises(Exception, match="Gather node. Name:'/cache_must_come_from_this_model/"):
        onnx_session(other_model_pair.predict.path).run(None, feed)
    assert other_model_pair.fingerprint != pairs["classification", "portable"].fingerprint
