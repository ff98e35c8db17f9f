"""Our PyTorch module and our ONNX export against upstream AutoGluon Mitra (the reference).

Upstream is imported from the `autogluon.tabular==1.6.3` package (see tests/upstream.py), built with
random weights, and fed data real tables have. Targets: PyTorch <= 1e-5, ONNX Runtime <= 1e-4, for the
full model and for the support-cache pair (support_cache.py) alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from upstream import build_upstream, run_upstream

from mitra_model.build.export import INPUT_NAMES, export_onnx, numpy_inputs
from mitra_model.build.support_cache import ENCODE_INPUT_NAMES, QueryPredictor, SupportEncoder, export_support_cache
from mitra_model.build.verify import onnx_session
from mitra_model.model.inputs import make_inputs
from mitra_model.model.kinds import Shape
from mitra_model.model.tab2d import MitraConfig, Tab2D, Task

DIM, LAYERS, HEADS = 64, 2, 4
DIM_OUTPUT = {"classification": 10, "regression": 1}

# (id, (B, S, Q, F), data kind, padded support rows)
CASES = [
    ("continuous", (1, 60, 12, 5), "continuous", 0),
    ("integer-ties", (1, 80, 16, 6), "integer_ties", 0),
    ("integer-ties-batch-padded", (3, 40, 9, 4), "integer_ties", 10),
    ("constant-columns", (1, 30, 5, 3), "constant", 0),
    ("one-feature", (1, 50, 10, 1), "integer_ties", 0),
    ("one-query-row", (1, 40, 1, 6), "mixed", 0),
    ("one-support-row", (1, 1, 6, 4), "mixed", 0),
    ("two-support-rows", (2, 2, 5, 4), "mixed", 0),
    ("large-magnitude", (1, 70, 8, 5), "large_magnitude", 0),
    ("mixed-padded", (2, 64, 16, 10), "mixed", 20),
]


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Per task: (upstream model, our model with upstream's weights, ONNX session of our export)."""
    built = {}
    for index, task in enumerate(DIM_OUTPUT):
        upstream = build_upstream(DIM, DIM_OUTPUT[task], LAYERS, HEADS, task.upper(), seed=100 + index)
        ours = Tab2D(MitraConfig(DIM, DIM_OUTPUT[task], LAYERS, HEADS, Task(task.upper())))
        ours.load_state_dict(upstream.state_dict(), strict=True)
        ours.eval()
        path = tmp_path_factory.mktemp("fidelity") / f"{task}.onnx"
        export_onnx(ours, path, opset=17, trace_shape=Shape(batch=2, n_support=11, n_query=5, n_features=3))
        built[task] = (upstream, ours, onnx_session(path))
    return built


@pytest.mark.parametrize("case_id, shape, data, padded", CASES, ids=[c[0] for c in CASES])
def test_matches_upstream(pair, task: str, case_id: str, shape, data: str, padded: int) -> None:
    upstream, ours, session = pair[task]
    inputs = make_inputs(shape, config=ours.config, data=data, padded_support_rows=padded, seed=5, salt=case_id)
    expected = run_upstream(upstream, *numpy_inputs(inputs)).numpy()
    with torch.no_grad():
        got_torch = ours(*numpy_inputs(inputs)).numpy()
    got_onnx = session.run(None, {name: inputs[name] for name in INPUT_NAMES})[0]

    assert got_torch.shape == expected.shape == got_onnx.shape
    assert np.abs(got_torch - expected).max() <= 1e-5, f"PyTorch vs upstream: {np.abs(got_torch - expected).max():.3e}"
    assert np.abs(got_onnx - expected).max() <= 1e-4, f"ONNX vs upstream: {np.abs(got_onnx - expected).max():.3e}"


@pytest.fixture(scope="module")
def cache_pairs(pair, tmp_path_factory: pytest.TempPathFactory):
    """Per (task, flavour): ONNX sessions of our model's support-cache pair (encoder, predictor)."""
    sessions = {}
    for task, (_, ours, _) in pair.items():
        for flavour in ("portable", "optimized"):
            exported = export_support_cache(
                ours, tmp_path_factory.mktemp("fidelity-cache"), opset=17, flavour=flavour,
                trace_shape=Shape(batch=2, n_support=11, n_query=5, n_features=3),
            )
            sessions[task, flavour] = (onnx_session(exported.encode.path), onnx_session(exported.predict.path))
    return sessions


@pytest.mark.parametrize("case_id, shape, data, padded", CASES, ids=[c[0] for c in CASES])
def test_support_cache_pair_matches_upstream(pair, cache_pairs, task: str, case_id: str, shape, data: str, padded: int) -> None:
    """Encode the support set, then predict the query rows from the cache: upstream's numbers, in PyTorch
    and in ONNX Runtime (both flavours; the query rows split in two predicts against one cache)."""
    upstream, ours, _ = pair[task]
    inputs = make_inputs(shape, config=ours.config, data=data, padded_support_rows=padded, seed=5, salt=case_id)
    x_support, y_support, x_query, padding = numpy_inputs(inputs)
    expected = run_upstream(upstream, x_support, y_support, x_query, padding).numpy()
    with torch.no_grad():
        got_torch = QueryPredictor(ours)(*SupportEncoder(ours)(x_support, y_support, padding), x_query).numpy()
    assert got_torch.shape == expected.shape
    assert np.abs(got_torch - expected).max() <= 1e-5, f"PyTorch pair vs upstream: {np.abs(got_torch - expected).max():.3e}"

    for flavour in ("portable", "optimized"):
        encoder, predictor = cache_pairs[task, flavour]
        cache = encoder.run(None, {name: inputs[name] for name in ENCODE_INPUT_NAMES})
        feed = {value.name: array for value, array in zip(encoder.get_outputs(), cache)}
        parts = np.array_split(inputs["x_query"], min(2, shape[2]), axis=1)
        got_onnx = np.concatenate([predictor.run(None, {**feed, "x_query": part})[0] for part in parts], axis=1)
        error = np.abs(got_onnx - expected).max()
        assert got_onnx.shape == expected.shape and error <= 1e-4, f"{flavour} ONNX pair vs upstream: {error:.3e}"


def _scaled(function, factor: float):
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs) * factor
    return wrapper


# (model.py object, attribute, replacement factory): each a piece the full model and the pair both need
MODEL_PIECES = [
    ("module", "bucketize_strict", lambda f: lambda values, boundaries, n: f(values, boundaries, n).clamp(max=n // 2)),
    ("module", "support_quantiles", lambda f: _scaled(f, 0.5)),
    ("module", "standardize", lambda f: _scaled(f, 0.5)),
    ("module", "attention", lambda f: _scaled(f, 1.5)),
    ("MultiheadAttention", "attend", lambda f: _scaled(f, 1.5)),
    ("_Tab2DEmbeddingY", "embed_query", lambda f: _scaled(f, 2.0)),
    ("Tab2DEmbeddingYClasses", "embed_support", lambda f: _scaled(f, 2.0)),
    ("Layer", "feature_block", lambda f: _scaled(f, 0.9)),
]


@pytest.mark.parametrize("fused", [False, True], ids=["portable", "optimized"])
@pytest.mark.parametrize("owner, name, patch", MODEL_PIECES, ids=[f"{o}.{n}" for o, n, _ in MODEL_PIECES])
def test_support_cache_pair_runs_model_py(pair, monkeypatch: pytest.MonkeyPatch, owner: str, name: str, patch,
                                          fused: bool) -> None:
    """support_cache.py holds no embedding, attention or layer code of its own: change a piece of
    model.py and the pair changes exactly as the full model does (so a fidelity fix reaches both)."""
    import mitra_model.model.tab2d as model_module

    _, ours, _ = pair["classification"]
    inputs = make_inputs((2, 30, 6, 4), config=ours.config, data="integer_ties", padded_support_rows=5, seed=5,
                         salt="one-definition")
    x_support, y_support, x_query, padding = numpy_inputs(inputs)
    target = model_module if owner == "module" else getattr(model_module, owner)
    with torch.no_grad(), model_module.fused_attention(ours, fused):
        before = ours(x_support, y_support, x_query, padding)
        monkeypatch.setattr(target, name, patch(getattr(target, name)))
        full = ours(x_support, y_support, x_query, padding)
        split = QueryPredictor(ours)(*SupportEncoder(ours)(x_support, y_support, padding), x_query)
    assert (full - before).abs().max().item() > 1e-3, f"patching model.{owner}.{name} did not change the full model"
    assert (split - full).abs().max().item() <= 1e-6, f"the pair did not follow model.{owner}.{name}"


def test_support_cache_spells_out_no_model_code() -> None:
    """The other half of the check above: no attention Function, and none of the model's pieces by name."""
    import mitra_model.build.support_cache as support_cache

    classes = [value for value in vars(support_cache).values()
               if isinstance(value, type) and value.__module__ == support_cache.__name__]
    assert not [c.__name__ for c in classes if issubclass(c, torch.autograd.Function)]
    tree = ast.parse(Path(support_cache.__file__).read_text())
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    model_code = {"scaled_dot_product_attention", "bucketize_strict", "support_quantiles", "standardize", "sqrt",
                  "layer_norm1", "attention1", "feature_block", "x_embedding", "y_embedding", "y_mask", "final_layer",
                  "final_layer_norm", "layers"}
    assert not used & model_code, f"support_cache.py spells out model code {sorted(used & model_code)}; call model.py"


def test_the_tie_case_has_teeth(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucketize that counts boundaries <= the value (the known port's bug) must fail the comparison:
    proof that the tied-data cases above can catch it."""
    import mitra_model.model.tab2d as model_module

    upstream, ours, _ = pair["classification"]
    inputs = make_inputs((1, 80, 16, 6), config=ours.config, data="integer_ties", seed=5, salt="teeth")
    expected = run_upstream(upstream, *numpy_inputs(inputs)).numpy()

    def bucketize_counting_ties(values, boundaries, n_boundaries):
        return (boundaries.unsqueeze(-2) <= values.unsqueeze(-1)).sum(-1)

    monkeypatch.setattr(model_module, "bucketize_strict", bucketize_counting_ties)
    with torch.no_grad():
        wrong = ours(*numpy_inputs(inputs)).numpy()
    assert np.abs(wrong - expected).max() > 1e-3


def test_upstream_loads_our_synthetic_snapshot(tiny_snapshots) -> None:
    """A synthetic snapshot is a real upstream checkpoint: upstream's own from_pretrained reads it."""
    from upstream import upstream_tab2d_module

    snapshot = tiny_snapshots["regression"]
    upstream = upstream_tab2d_module().Tab2D.from_pretrained(str(snapshot.path), device="cpu").eval()
    from mitra_model.model.snapshot import load_model

    ours, _ = load_model(snapshot.path)
    inputs = make_inputs((1, 30, 4, 3), config=ours.config, seed=1)
    with torch.no_grad():
        got = ours(*numpy_inputs(inputs)).numpy()
    assert np.abs(got - run_upstream(upstream, *numpy_inputs(inputs)).numpy()).max() <= 1e-5


def test_our_loader_reads_upstream_save_pretrained(tmp_path: Path) -> None:
    """A fine-tuned checkpoint saved by upstream's Tab2D.save_pretrained builds like an official one."""
    from mitra_model.model.snapshot import load_model

    upstream = build_upstream(DIM, 10, LAYERS, HEADS, "CLASSIFICATION", seed=3)
    upstream.save_pretrained(str(tmp_path / "finetuned"))
    ours, snapshot = load_model(tmp_path / "finetuned")
    assert not snapshot.synthetic
    inputs = make_inputs((2, 25, 7, 4), config=ours.config, data="integer_ties", seed=2)
    with torch.no_grad():
        got = ours(*numpy_inputs(inputs)).numpy()
    assert np.abs(got - run_upstream(upstream, *numpy_inputs(inputs)).numpy()).max() <= 1e-5
