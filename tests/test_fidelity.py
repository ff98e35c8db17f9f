"""Our PyTorch module and our ONNX export against upstream AutoGluon Mitra (the reference).

Upstream is imported from the `autogluon.tabular==1.6.3` package (see tests/upstream.py), built with
random weights, and fed data real tables have. Targets: PyTorch <= 1e-5, ONNX Runtime <= 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mitra_model.config import Shape
from mitra_model.export import INPUT_NAMES, export_onnx, numpy_inputs
from mitra_model.inputs import make_inputs
from mitra_model.model import MitraConfig, Tab2D, Task
from mitra_model.verify import onnx_session
from upstream import build_upstream, run_upstream

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


def test_the_tie_case_has_teeth(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucketize that counts boundaries <= the value (the known port's bug) must fail the comparison:
    proof that the tied-data cases above can catch it."""
    import mitra_model.model as model_module

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
    from mitra_model.snapshot import load_model

    ours, _ = load_model(snapshot.path)
    inputs = make_inputs((1, 30, 4, 3), config=ours.config, seed=1)
    with torch.no_grad():
        got = ours(*numpy_inputs(inputs)).numpy()
    assert np.abs(got - run_upstream(upstream, *numpy_inputs(inputs)).numpy()).max() <= 1e-5


def test_our_loader_reads_upstream_save_pretrained(tmp_path: Path) -> None:
    """A fine-tuned checkpoint saved by upstream's Tab2D.save_pretrained builds like an official one."""
    from mitra_model.snapshot import load_model

    upstream = build_upstream(DIM, 10, LAYERS, HEADS, "CLASSIFICATION", seed=3)
    upstream.save_pretrained(str(tmp_path / "finetuned"))
    ours, snapshot = load_model(tmp_path / "finetuned")
    assert not snapshot.synthetic
    inputs = make_inputs((2, 25, 7, 4), config=ours.config, data="integer_ties", seed=2)
    with torch.no_grad():
        got = ours(*numpy_inputs(inputs)).numpy()
    assert np.abs(got - run_upstream(upstream, *numpy_inputs(inputs)).numpy()).max() <= 1e-5
