"""The reference is upstream's output, computed once per (weights, cell, seed, code) and reused by
every artifact; the one loop verifies a graph and a pair alike; Metrics drive the report's tables."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file

import mitra_model.build.reference as reference_module
from mitra_model.build.config import Cell, Tolerance
from mitra_model.build.export import INPUT_NAMES, numpy_inputs
from mitra_model.build.reference import (
    ReferenceCacheError,
    compute_reference,
    load_reference,
    reference_for,
    reference_key,
    reference_path,
)
from mitra_model.build.support_cache import ENCODE_INPUT_NAMES, cache_names
from mitra_model.build.upstream import (
    INSTALL_COMMAND,
    UpstreamMissingError,
    load_upstream,
    run_upstream,
    upstream_version,
)
from mitra_model.build.verify import (
    CellResult,
    Metrics,
    VerificationReport,
    graph_candidate,
    make_report,
    pair_candidate,
    run_cell,
    verify_artifact,
    verify_cell,
    verify_onnx,
)
from mitra_model.errors import MitraBuildError
from mitra_model.model.snapshot import WEIGHTS_FILE, load_model

CELLS = [
    Cell(name="base", batch=1, n_support=40, n_query=7, n_features=5),
    Cell(name="ties-padded", batch=3, n_support=30, n_query=5, n_features=4, data="integer_ties", padded_support_rows=9),
]
TIES = Cell(name="ties", batch=1, n_support=80, n_query=16, n_features=6, data="integer_ties")
FP32 = Tolerance(max_abs=1e-4, min_argmax_agreement=1.0, min_correlation=0.99999)


def _pair_of_graph(graph: Path, n_layers: int, out: Path) -> tuple[Path, Path]:
    """An encode/predict pair that computes exactly what `graph` computes: "encode" hands the support
    inputs through under the first cache names (constants fill the rest), "predict" is the graph
    reading them from there."""
    out.mkdir(parents=True, exist_ok=True)
    names = cache_names(n_layers)
    proto = onnx.load(str(graph))
    types = {value.name: value.type.tensor_type.elem_type for value in proto.graph.input}
    carried = dict(zip(ENCODE_INPUT_NAMES, names))  # x_support -> quantile_boundaries, ...
    filler = {name: TensorProto.INT64 if name == "model_fingerprint" else TensorProto.FLOAT for name in names[3:]}

    encode = helper.make_graph(
        [helper.make_node("Identity", [src], [dst]) for src, dst in carried.items()]
        + [helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [1], [0])) for name, dtype in filler.items()],
        "encode",
        [helper.make_tensor_value_info(name, types[name], None) for name in ENCODE_INPUT_NAMES],
        [helper.make_tensor_value_info(dst, types[src], None) for src, dst in carried.items()]
        + [helper.make_tensor_value_info(name, dtype, None) for name, dtype in filler.items()],
    )
    encode_model = helper.make_model(encode, opset_imports=list(proto.opset_import))
    encode_model.ir_version = proto.ir_version

    kept = [value for value in proto.graph.input if value.name not in carried]
    del proto.graph.input[:]
    proto.graph.input.extend(
        [helper.make_tensor_value_info(dst, types[src], None) for src, dst in carried.items()]
        + [helper.make_tensor_value_info(name, dtype, None) for name, dtype in filler.items()] + kept
    )
    nodes = [helper.make_node("Identity", [dst], [src]) for src, dst in carried.items()] + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    paths = out / "encode.onnx", out / "predict.onnx"
    onnx.save(encode_model, str(paths[0]))
    onnx.save(proto, str(paths[1]))
    return paths


@pytest.fixture()
def count_upstream(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many cells upstream has run in this test (reference.run_upstream, counted)."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return run_upstream(*args, **kwargs)

    monkeypatch.setattr(reference_module, "run_upstream", counted)
    return calls


def test_reference_is_computed_once_and_reused_by_every_artifact(
    tiny_snapshots, tiny_exports, tmp_path: Path, count_upstream: list[int]
) -> None:
    snapshot = tiny_snapshots["classification"].path
    graph = tiny_exports["classification"]
    pair = _pair_of_graph(graph, tiny_snapshots["classification"].config.n_layers, tmp_path / "pair")
    references = tmp_path / "reference"
    verify = functools.partial(verify_cell, snapshot, tolerance=FP32, seed=11, reference_dir=references)

    first = [verify((graph,), cell, kind="graph") for cell in CELLS]
    assert len(count_upstream) == len(CELLS)
    assert all(r.passed and not r.reference_cached and r.torch_seconds > 0 for r in first)
    assert sorted(p.name for p in references.iterdir()) == sorted(
        reference_path(references, cell, reference_key(snapshot, cell, seed=11)).name for cell in CELLS
    )  # one file per cell, no temp files left

    second = [verify(pair, cell, kind="pair") for cell in CELLS]
    again = [verify((graph,), cell, kind="graph") for cell in CELLS]
    assert len(count_upstream) == len(CELLS), "a second artifact recomputed the reference"
    assert all(r.passed and r.reference_cached for r in second + again)
    # reading it back changes nothing: same verdicts, metrics and recorded reference time
    assert [(r.metrics, r.torch_seconds) for r in again] == [(r.metrics, r.torch_seconds) for r in first]

    verify((graph,), CELLS[0], kind="graph", reference_dir=None)  # no cache folder: computed again
    assert len(count_upstream) == len(CELLS) + 1


def test_a_model_in_memory_computes_each_cell_once_for_every_artifact(
    tiny_snapshots, tiny_exports, count_upstream: list[int]
) -> None:
    """verify_onnx on one model for several artifacts (each precision, the pair) runs upstream once per
    cell; the same model with other weights is another reference, never a stale one."""
    model, _ = load_model(tiny_snapshots["classification"].path)
    graph = tiny_exports["classification"]
    first = verify_onnx(model, graph, cells=CELLS, tolerance=FP32, seed=13)
    assert len(count_upstream) == len(CELLS) and not any(c.reference_cached for c in first.cells)
    again = verify_onnx(model, graph, cells=CELLS, tolerance=FP32, seed=13)
    assert len(count_upstream) == len(CELLS), "a second artifact of the same model recomputed the reference"
    assert all(c.reference_cached for c in again.cells)
    assert [c.metrics for c in again.cells] == [c.metrics for c in first.cells]

    verify_onnx(model, graph, cells=CELLS[:1], tolerance=FP32, seed=14)  # another seed: other inputs
    assert len(count_upstream) == len(CELLS) + 1
    with torch.no_grad():
        model.final_layer.bias.add_(1.0)  # the same object, other weights: the ONNX file no longer matches
    changed = verify_onnx(model, graph, cells=CELLS[:1], tolerance=FP32, seed=13)
    assert len(count_upstream) == len(CELLS) + 2 and not changed.passed


def test_key_follows_weights_cell_and_seed(tiny_snapshots, tmp_path: Path) -> None:
    snapshot = tiny_snapshots["classification"].path
    key = reference_key(snapshot, CELLS[0], seed=0)
    assert reference_key(snapshot, CELLS[0], seed=0) == key
    assert reference_key(snapshot, CELLS[0], seed=1) != key
    assert reference_key(snapshot, CELLS[1], seed=0) != key
    assert reference_key(snapshot, CELLS[0].model_copy(update={"n_query": 8}), seed=0) != key  # same name, other cell
    assert reference_key(tiny_snapshots["regression"].path, CELLS[0], seed=0) != key

    copy = tmp_path / "copy"
    shutil.copytree(snapshot, copy)
    assert reference_key(copy, CELLS[0], seed=0) == key  # content, not location
    state = load_file(str(copy / WEIGHTS_FILE))
    state["final_layer.bias"] = state["final_layer.bias"] + 1e-3
    save_file(state, str(copy / WEIGHTS_FILE))
    assert reference_key(copy, CELLS[0], seed=0) != key


def test_reference_is_upstream_and_a_broken_rewrite_fails_by_name(
    tiny_snapshots, tiny_exports, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The known port bug (bucketize counting ties `<=`) in the rewrite only: the ONNX file still
    matches upstream, and the cell fails on the rewrite-vs-upstream check, which names it."""
    import mitra_model.model.tab2d as model_module

    snapshot, graph = tiny_snapshots["classification"].path, tiny_exports["classification"]
    verify = functools.partial(verify_cell, snapshot, (graph,), TIES, kind="graph", tolerance=FP32, seed=5)
    good = verify(reference_dir=tmp_path / "good")
    assert good.passed and good.rewrite_vs_upstream_max_abs <= 1e-6

    def bucketize_counting_ties(values, boundaries, n_boundaries):
        return (boundaries.unsqueeze(-2) <= values.unsqueeze(-1)).sum(-1)

    monkeypatch.setattr(model_module, "bucketize_strict", bucketize_counting_ties)
    broken = verify(reference_dir=tmp_path / "broken")
    assert broken.metrics == good.metrics  # the artifact is compared with upstream, not with the rewrite
    assert broken.rewrite_vs_upstream_max_abs > 1e-3
    [failure] = broken.failures
    assert "rewrite (mitra_model.model.tab2d) differs from upstream Tab2D" in failure and upstream_version() in failure


def test_a_perturbed_rewrite_weight_fails_the_rewrite_check(tiny_snapshots, tiny_exports) -> None:
    snapshot = tiny_snapshots["regression"].path
    rewrite, _ = load_model(snapshot)
    with torch.no_grad():
        rewrite.final_layer.bias.add_(1e-2)
    reference = compute_reference(load_upstream(snapshot), rewrite, CELLS[0], seed=0)
    result = run_cell(reference, graph_candidate(tiny_exports["regression"]), tolerance=FP32, is_classifier=False)
    assert reference.rewrite_vs_upstream_max_abs == pytest.approx(1e-2, rel=1e-3)
    assert len(result.failures) == 1 and "rewrite" in result.failures[0] and result.metrics.max_abs_err <= 1e-4


def test_pair_and_graph_loops_give_the_same_metrics(tiny_snapshots, tiny_exports, tmp_path: Path, task: str) -> None:
    snapshot = tiny_snapshots[task]
    graph = tiny_exports[task]
    reference = functools.partial(reference_for, snapshot.path, seed=3, cache_dir=tmp_path / "reference")
    verify = functools.partial(verify_artifact, reference, cells=CELLS, tolerance=FP32, precision="fp32", seed=3,
                               is_classifier=snapshot.config.label_is_class)
    encode, predict = _pair_of_graph(graph, snapshot.config.n_layers, tmp_path / "pair")

    whole = verify(graph_candidate(graph))
    one_batch = verify(pair_candidate(encode, predict, snapshot.config.n_layers, query_batches=1))
    three = verify(pair_candidate(encode, predict, snapshot.config.n_layers, query_batches=3))
    assert whole.passed and one_batch.passed and three.passed
    assert [c.metrics for c in one_batch.cells] == [c.metrics for c in whole.cells]
    for a, b in zip(three.cells, whole.cells):  # query rows never see each other: same numbers, other batching
        assert a.max_abs_err == pytest.approx(b.max_abs_err, abs=1e-6) and a.argmax_agreement == b.argmax_agreement
    assert three.summary["query_batches"] == 3 and three.onnx_path == str(predict) and "query_batches" not in whole.summary
    assert whole.summary["reference_cached_cells"] == 0 and three.summary["reference_cached_cells"] == len(CELLS)


def _result(metrics: Metrics, **changes) -> CellResult:
    fields = dict(name="base", shape=(1, 40, 7, 5), data="mixed", padded_support_rows=0, metrics=metrics,
                  rewrite_vs_upstream_max_abs=3e-8, upstream="autogluon.tabular==1.6.3", torch_seconds=0.5,
                  reference_cached=False, onnx_seconds=0.25, failures=())
    return CellResult(**{**fields, **changes})


def _report(results: list[CellResult], tmp_path: Path, tolerance: Tolerance = FP32) -> VerificationReport:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    return make_report(tmp_path / "model.onnx", precision="fp32", tolerance=tolerance, results=results)


def test_every_metric_is_in_the_table_the_markdown_and_the_json(tmp_path: Path) -> None:
    tolerance = FP32.model_copy(update={"max_prob_err": 0.05})
    measured = Metrics(max_abs_err=2.1e-6, max_rel_err=3e-5, argmax_agreement=1.0, max_prob_err=4e-7, correlation=None)
    report = _report([_result(measured), _result(Metrics.no_output(), name="broken", failures=("ONNX Runtime failed: x",))],
                     tmp_path, tolerance)
    rows = report.table_rows()
    names = [f.name for f in dataclasses.fields(Metrics)]
    assert all(set(names) <= set(row) for row in rows)
    assert rows[0]["max_abs_err"] == "2.10e-06 (<= 0.0001)" and rows[0]["argmax_agreement"] == "1.0000 (>= 1)"
    assert rows[0]["max_prob_err"] == "4.00e-07 (<= 0.05)" and rows[0]["max_rel_err"] == "3.00e-05"
    assert rows[0]["correlation"] == "-" and rows[1]["max_abs_err"] == "inf (<= 0.0001)"
    assert rows[1]["result"] == "FAIL: ONNX Runtime failed: x"

    markdown = report.to_markdown()
    header = markdown.splitlines()[2]
    assert all(f" {name} " in header for name in names)
    assert "| 2.10e-06 (<= 0.0001) |" in markdown and "**FAILED**" in markdown

    saved = json.loads(report.to_json())
    assert all(set(names) <= set(cell) for cell in saved["cells"]) and saved["cells"][0]["max_abs_err"] == 2.1e-6
    assert report.summary["upstream"] == "autogluon.tabular==1.6.3" and report.summary["reference_seconds"] == 1.0


def test_a_new_metric_field_reaches_the_table(tmp_path: Path) -> None:
    """Adding a metric is one field: tables derive from the fields and their bound metadata."""

    @dataclasses.dataclass(frozen=True)
    class WithMedian(Metrics):
        median_abs_err: float | None = dataclasses.field(default=None, metadata={"bound": "max_abs", "op": "<=", "fmt": ".1e"})

    report = _report([_result(WithMedian(max_abs_err=1e-6, max_rel_err=1e-6, median_abs_err=5e-7))], tmp_path)
    assert report.table_rows()[0]["median_abs_err"] == "5.0e-07 (<= 0.0001)"
    assert " median_abs_err " in report.to_markdown()


def test_cached_file_round_trips_and_a_corrupt_one_is_named(tiny_snapshots, tmp_path: Path) -> None:
    snapshot = tiny_snapshots["regression"].path
    computed = reference_for(snapshot, CELLS[1], seed=2, cache_dir=tmp_path)
    [path] = tmp_path.iterdir()
    loaded = load_reference(path, cell=CELLS[1], key=computed.key)
    assert loaded.cached and not computed.cached and loaded.cell == CELLS[1]
    assert np.array_equal(loaded.upstream, computed.upstream) and np.array_equal(loaded.rewrite, computed.rewrite)
    assert all(np.array_equal(loaded.inputs[name], computed.inputs[name]) for name in INPUT_NAMES)
    assert loaded.rewrite_vs_upstream_max_abs == computed.rewrite_vs_upstream_max_abs <= 1e-6
    upstream = run_upstream(load_upstream(snapshot), *numpy_inputs(loaded.inputs)).numpy()
    assert np.array_equal(loaded.upstream, upstream)  # the stored reference is upstream's output

    with pytest.raises(ReferenceCacheError, match="holds another reference"):
        load_reference(path, cell=CELLS[0])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ReferenceCacheError, match=f"{path.name} is unreadable.*delete it"):
        reference_for(snapshot, CELLS[1], seed=2, cache_dir=tmp_path)


def test_missing_upstream_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tiny_snapshots) -> None:
    import importlib.util

    import mitra_model.build.upstream as upstream_module

    monkeypatch.delitem(sys.modules, upstream_module._ALIAS, raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "autogluon" else real_find_spec(name, *a))
    with pytest.raises(UpstreamMissingError) as caught:
        load_upstream(tiny_snapshots["classification"].path)
    assert INSTALL_COMMAND in str(caught.value) and INSTALL_COMMAND.startswith("pip install --no-deps autogluon.tabular==1.6.3")
    assert isinstance(caught.value, MitraBuildError) and isinstance(caught.value, ModuleNotFoundError)
