"""The verification matrix passes on a faithful export and fails, naming cells, on a corrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mitra_model.build.config import Cell, Tolerance
from mitra_model.build.upstream import upstream_version
from mitra_model.build.verify import require_passed, verify_onnx, write_report
from mitra_model.errors import VerificationError
from mitra_model.model.snapshot import load_model


def test_matrix_passes_for_both_tasks(tiny_exports, tiny_snapshots, build_config, task: str, tmp_path: Path) -> None:
    model, _ = load_model(tiny_snapshots[task].path)
    report = verify_onnx(
        model, tiny_exports[task], cells=build_config.verification.cells,
        tolerance=build_config.verification.tolerance("fp32"), seed=build_config.verification.seed,
    )
    require_passed(report)
    assert [c.name for c in report.cells] == [c.name for c in build_config.verification.cells]
    assert report.summary["max_abs_err"] <= 1e-4
    # the reference is upstream AutoGluon, and the rewrite was checked against it in the same pass
    assert report.summary["upstream"] == upstream_version() and report.summary["rewrite_vs_upstream_max_abs"] <= 1e-6
    assert report.summary["reference_seconds"] > 0 and len(report.table_rows()) == len(report.cells)
    write_report(report, tmp_path / "r.json", tmp_path / "r.md")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["passed"] is True and len(saved["cells"]) == len(build_config.verification.cells)
    metric = "argmax_agreement" if task == "classification" else "correlation"
    assert saved["cells"][0][metric] is not None
    assert "| largest |" in (tmp_path / "r.md").read_text()


def test_matrix_covers_the_edges(build_config) -> None:
    cells = build_config.verification.cells
    assert {1, 2} <= {c.n_support for c in cells}
    assert 1 in {c.n_query for c in cells} and 1 in {c.n_features for c in cells}
    assert any(c.batch > 1 for c in cells) and any(c.padded_support_rows for c in cells)
    traced = build_config.export.trace_shape.as_tuple()
    assert all(c.as_tuple() != traced for c in cells)


def _perturbed_copy(source: Path, target: Path, scale: float) -> Path:
    """Same graph, one weight matrix nudged: passes onnx.checker, must fail verification."""
    model = onnx.load(str(source))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init).copy()
    values += scale * np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype)
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(target))
    return target


def test_corrupted_onnx_fails_and_names_the_cells(tiny_exports, tiny_snapshots, build_config, tmp_path: Path) -> None:
    bad = _perturbed_copy(tiny_exports["classification"], tmp_path / "bad.onnx", scale=0.05)
    model, _ = load_model(tiny_snapshots["classification"].path)
    cells = build_config.verification.cells[:3]
    report = verify_onnx(model, bad, cells=cells, tolerance=build_config.verification.tolerance("fp32"))
    assert not report.passed
    with pytest.raises(VerificationError) as info:
        require_passed(report)
    assert f"cell '{cells[0].name}'" in str(info.value)
    assert "max abs error" in str(info.value) and "tolerance 1.0e-04" in str(info.value)
    assert len(info.value.failures) >= 1


def test_tiny_error_over_tolerance_is_a_failure_not_a_warning(tiny_exports, tiny_snapshots, tmp_path: Path) -> None:
    model, _ = load_model(tiny_snapshots["regression"].path)
    strict = Tolerance(max_abs=1e-12, min_argmax_agreement=1.0, min_correlation=0.0)
    cell = Cell(name="c", batch=1, n_support=20, n_query=4, n_features=3)
    report = verify_onnx(model, tiny_exports["regression"], cells=[cell], tolerance=strict)
    assert not report.passed and "max abs error" in report.cells[0].failures[0]


def test_runtime_failure_is_a_failed_cell(tiny_exports, tiny_snapshots, tmp_path: Path) -> None:
    """An export with a dimension frozen at trace time must fail the cells of other shapes, not crash."""
    model = onnx.load(str(tiny_exports["regression"]))
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_param")
    dim.dim_value = 11
    onnx.save(model, str(tmp_path / "frozen.onnx"))
    torch_model, _ = load_model(tiny_snapshots["regression"].path)
    cells = [Cell(name="other-shape", batch=1, n_support=13, n_query=2, n_features=5),
             Cell(name="trace-shape", batch=1, n_support=11, n_query=2, n_features=5)]
    tolerance = Tolerance(max_abs=1e-4, min_argmax_agreement=1, min_correlation=0.9)
    report = verify_onnx(torch_model, tmp_path / "frozen.onnx", cells=cells, tolerance=tolerance)
    assert [c.passed for c in report.cells] == [False, True]
    assert "ONNX Runtime failed" in report.cells[0].failures[0]
