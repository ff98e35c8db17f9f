"""Shared fixtures, registered once for every test module: tiny synthetic snapshots and every recipe's
files made from them (once per test run, shared by the pytest workers), the S3 server and the local
hub (plugins below), the `needs_node` / `needs_chromium` markers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

# Telemetry off and no hub access from any test, before anything imports the clients.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from configs import with_tiny_bounds  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

from mitra_model.build import recipes  # noqa: E402
from mitra_model.build.config import BuildConfig, load_config  # noqa: E402
from mitra_model.build.recipes import BuildContext  # noqa: E402
from mitra_model.model.snapshot import Snapshot, write_synthetic_snapshot  # noqa: E402

TASKS = ("classification", "regression")

# Fixtures of these modules are everyone's: request them by name, import only their helpers.
pytest_plugins = ("s3_fixtures", "local_hub")

# Node.js and Chromium: a test marked `needs_node` / `needs_chromium` is skipped on a machine without
# them, except in CI (CI=1), where scripts/setup.sh installs them and a missing one must fail.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")
HAS_NODE = shutil.which("node") is not None and shutil.which("npm") is not None
HAS_CHROMIUM = any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome"))


# Modules holding a test of a minute or more (a real Prefect server and worker, flow builds, a Dask
# cluster, Chromium), first: with --dist loadfile a worker takes whole modules in collection order, and
# one of these collected last kept a single worker busy for two minutes after the others had finished.
LONGEST_FIRST = ("test_schedule.py", "test_deployment.py", "test_flow.py", "test_report.py", "test_dask.py",
                 "test_publish.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_runtest_setup(item: pytest.Item) -> None:
    if IN_CI:
        return
    if item.get_closest_marker("needs_node") and not HAS_NODE:
        pytest.skip("Node.js >= 20 with npm is not installed (scripts/setup.sh installs the rest)")
    if item.get_closest_marker("needs_chromium") and not (HAS_NODE and HAS_CHROMIUM):
        pytest.skip("Chromium or Node.js is not installed (scripts/setup.sh: apt-get install chromium)")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One temporary Prefect API (its own SQLite database) for every test that runs a flow in-process."""
    from prefect.testing.utilities import prefect_test_harness  # only flow tests need Prefect loaded

    with prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """consumers/node_modules, installed (`npm ci`) when the pinned packages are not there yet."""
    from mitra_model.build.consumers import ensure_node_modules

    return ensure_node_modules()


@pytest.fixture(scope="session")
def build_config() -> BuildConfig:
    """The default configuration as the tiny test models are judged by it (configs.TINY_BOUNDS)."""
    return with_tiny_bounds(load_config())


@pytest.fixture(scope="session")
def tiny_snapshots(tmp_path_factory: pytest.TempPathFactory, build_config: BuildConfig) -> dict[str, Snapshot]:
    root = tmp_path_factory.mktemp("snapshots")
    return {
        task: write_synthetic_snapshot(root / task, task=task, size_name="tiny", size=build_config.sizes["tiny"], seed=7)
        for task in TASKS
    }


class TinyArtifacts:
    """Every recipe's files for the tiny classifier and regressor, made as the pipeline makes them, on
    first use, once per test run (an export takes seconds; a dozen modules need the same files): the
    pytest workers share one folder, and the first to need a file makes it while the others wait.
    The snapshots are the same bytes in every worker (seeded), so every worker's files are too.
    Tests read them; a test that changes a file works on a copy."""

    def __init__(self, root: Path, snapshots: dict[str, Snapshot], config: BuildConfig) -> None:
        self.root, self.snapshots, self.config = root, snapshots, config
        self._made: dict[tuple[str, str], tuple[Path, ...]] = {}

    def files(self, task: str, recipe_name: str) -> tuple[Path, ...]:
        """The files of recipe `recipe_name` (e.g. "fp32-ort", "int8", "support-cache") for `task`."""
        key = (task, recipe_name)
        if key not in self._made:
            made = self.root / f"{task}-{recipe_name}.json"  # written last: the files are complete
            with FileLock(self.root / f"{task}-{recipe_name}.lock", timeout=600):
                if not made.exists():
                    recipe = recipes.recipe(recipe_name)
                    work = self.root / task
                    work.mkdir(exist_ok=True)
                    context = BuildContext(
                        snapshot_dir=self.snapshots[task].path, work=work, opset=self.config.export.opset,
                        trace_shape=self.config.export.trace_shape, options=self.config.artifacts.options_for(recipe),
                        parent_files=self.files(task, recipe.derives_from) if recipe.derives_from else (),
                    )
                    made.write_text(json.dumps([str(path) for path in recipe.make(context).files]))
            self._made[key] = tuple(Path(path) for path in json.loads(made.read_text()))
        return self._made[key]

    def path(self, task: str, recipe_name: str) -> Path:
        """The one file of a single-graph recipe."""
        (path,) = self.files(task, recipe_name)
        return path


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_snapshots: dict[str, Snapshot],
                   build_config: BuildConfig, worker_id: str) -> TinyArtifacts:
    if worker_id == "master":  # no xdist: this process's own folder
        return TinyArtifacts(tmp_path_factory.mktemp("tiny-artifacts"), tiny_snapshots, build_config)
    shared = tmp_path_factory.getbasetemp().parent / "tiny-artifacts"  # this run's folder, above every worker's
    shared.mkdir(exist_ok=True)
    return TinyArtifacts(shared, tiny_snapshots, build_config)


@pytest.fixture(scope="session")
def tiny_exports(tiny_artifacts: TinyArtifacts) -> dict[str, Path]:
    """task -> the tiny model's portable fp32 export (model.onnx)."""
    return {task: tiny_artifacts.path(task, "fp32") for task in TASKS}


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
