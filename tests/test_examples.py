"""The fit-once / predict-many examples run as documented (Python and Node)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mitra_model.build.consumers import find_node

REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (tests and benchmarks run from it)


def test_python_example_predicts_three_batches_from_one_cache() -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "support_cache.py")], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("batch") >= 3 and "support cache" in done.stdout


@pytest.mark.needs_node
def test_node_example_feeds_the_cache_back_by_name(node_modules, tiny_artifacts) -> None:
    encode, predict = tiny_artifacts.files("regression", "support-cache")
    done = subprocess.run(
        [str(find_node()), "example-support-cache.mjs", "--encode", str(encode), "--predict", str(predict)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT / "consumers",
    )
    assert done.returncode == 0, done.stderr
    assert "encoded 300 support rows once" in done.stdout
    assert [line.split(":")[0] for line in done.stdout.splitlines()[1:]] == ["batch 0", "batch 1", "batch 2"]
    assert "output [1,4]" in done.stdout  # the regressor's (B, Q)
