"""Shared fixtures: tiny synthetic snapshots and their exports (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Telemetry off and no hub access from any test, before anything imports the clients.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from mitra_model.build.config import BuildConfig, load_config  # noqa: E402
from mitra_model.build.export import ExportResult, export_onnx  # noqa: E402
from mitra_model.model.snapshot import Snapshot, load_model, write_synthetic_snapshot  # noqa: E402

TASKS = ("classification", "regression")


@pytest.fixture(scope="session")
def build_config() -> BuildConfig:
    return load_config()


@pytest.fixture(scope="session")
def tiny_snapshots(tmp_path_factory: pytest.TempPathFactory, build_config: BuildConfig) -> dict[str, Snapshot]:
    root = tmp_path_factory.mktemp("snapshots")
    return {
        task: write_synthetic_snapshot(root / task, task=task, size_name="tiny", size=build_config.sizes["tiny"], seed=7)
        for task in TASKS
    }


@pytest.fixture(scope="session")
def tiny_exports(
    tmp_path_factory: pytest.TempPathFactory, tiny_snapshots: dict[str, Snapshot], build_config: BuildConfig
) -> dict[str, ExportResult]:
    root = tmp_path_factory.mktemp("exports")
    results = {}
    for task, snapshot in tiny_snapshots.items():
        model, _ = load_model(snapshot.path)
        results[task] = export_onnx(
            model, root / f"{task}.onnx", opset=build_config.export.opset, trace_shape=build_config.export.trace_shape,
            metadata=snapshot.onnx_metadata(),
        )
    return results


@pytest.fixture(params=TASKS)
def task(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture()
def snapshot_copy(tmp_path: Path, tiny_snapshots: dict[str, Snapshot]) -> Path:
    """A writable copy of the tiny classifier snapshot, for tests that break it."""
    import shutil

    target = tmp_path / "snapshot"
    shutil.copytree(tiny_snapshots["classification"].path, target)
    return target
