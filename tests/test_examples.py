"""The fit-once / predict-many examples run as documented (Python and Node)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mitra_model.build.consumers import ensure_node_modules, find_node
from mitra_model.build.support_cache import export_support_cache
from mitra_model.model.snapshot import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)


def test_python_example_predicts_three_batches_from_one_cache() -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "support_cache.py")], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("batch") >= 3 and "support cache" in done.stdout


def test_node_example_feeds_the_cache_back_by_name(tiny_snapshots, build_config, tmp_path: Path) -> None:
    ensure_node_modules()
    model, _ = load_model(tiny_snapshots["regression"].path)
    pair = export_support_cache(model, tmp_path, opset=build_config.export.opset, trace_shape=build_config.export.trace_shape)
    done = subprocess.run(
        [str(find_node()), "example-support-cache.mjs", "--encode", str(pair.encode.path), "--predict", str(pair.predict.path)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT / "consumers",
    )
    assert done.returncode == 0, done.stderr
    assert "encoded 300 support rows once" in done.stdout
    assert [line.split(":")[0] for line in done.stdout.splitlines()[1:]] == ["batch 0", "batch 1", "batch 2"]
    assert "output [1,4]" in done.stdout  # the regressor's (B, Q)
