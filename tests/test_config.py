"""Configuration validation names the offending field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from configs import edited_config

from mitra_model.build.config import DEFAULT_CONFIG_PATH, config_digest, load_config
from mitra_model.errors import ConfigError


@pytest.mark.parametrize(
    "old, new, needle",
    [
        ("max_abs = 1e-4", "max_abs = -1", "field `verification.tolerances.fp32.max_abs`"),
        ('name = "base"', 'name = "Base Cell"', "field `verification.cells.0.name`"),
        ("n_query = 16\nn_features = 8", "n_query = 0\nn_features = 8", "field `verification.cells.0.n_query`"),
        ('task = "classification"', 'task = "ranking"', "field `variants.0.task`"),
        ("n_heads = 4", "n_heads = 5", "dim 64 is not divisible by n_heads 5"),
        ("[verification]\nseed = 1234", "[verification]\nseed = 1234\ncolour = 1", "field `verification.colour`"),
    ],
)
def test_invalid_field_is_named(tmp_path: Path, old: str, new: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(edited_config(tmp_path, (old, new)))
    assert needle in str(info.value)


def test_a_cell_at_the_trace_shape_is_refused(tmp_path: Path) -> None:
    path = edited_config(tmp_path, ("batch = 1\nn_support = 64\nn_query = 16\nn_features = 8",
                                    "batch = 2\nn_support = 11\nn_query = 5\nn_features = 3"))
    with pytest.raises(ConfigError, match="has the trace shape"):
        load_config(path)


def test_padding_must_leave_a_valid_row(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="padded_support_rows \\(12\\) must leave"):
        load_config(edited_config(tmp_path, ("n_support = 48", "n_support = 12")))


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    (tmp_path / "x.toml").write_text("[export\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "x.toml")


@pytest.mark.parametrize("old, new, rebuilds", [
    ('cron = "17 3 * * *"', 'cron = "0 5 * * 1"', False),
    ('endpoint_url = "http://127.0.0.1:8333"', 'endpoint_url = "http://127.0.0.1:9000"', False),
    ('task_runner = "thread"', 'task_runner = "dask"', False),
    ('revision = "main"\ntask = "regression"', 'revision = "v2"\ntask = "regression"', False),
    ("opset = 17", "opset = 18", True),
    ("max_abs = 1e-4", "max_abs = 2e-4", True),
    (re.search(r"^precisions = .*$", DEFAULT_CONFIG_PATH.read_text(), re.M).group(0), 'precisions = ["int8"]', True),
    ("onnxruntime-node = 1e-5\nonnxruntime-web = 1e-5", "onnxruntime-node = 2e-5\nonnxruntime-web = 1e-5", True),
])
def test_only_settings_that_change_the_artifacts_change_the_version(tmp_path: Path, old: str, new: str,
                                                                    rebuilds: bool) -> None:
    """The config digest is part of every build's version: a new cron must not rebuild and republish,
    a new tolerance must."""
    changed = config_digest(load_config(edited_config(tmp_path, (old, new)))) != config_digest(load_config())
    assert changed is rebuilds


def test_run_parameters_choose_flavours_and_precisions_validated_like_the_file() -> None:
    config = load_config()
    portable_only = config.with_artifacts(flavours=["portable"], precisions=[])
    assert portable_only.artifacts.flavours == ("portable",) and portable_only.artifacts.precisions == ()
    assert config.with_artifacts(precisions=["int8"]).artifacts.flavours == config.artifacts.flavours
    with pytest.raises(ConfigError, match="int8 is built from fp32-ort .*: add 'optimized' to \\[artifacts\\] flavours"):
        config.with_artifacts(flavours=["portable"], precisions=["int8"])
    with pytest.raises(ConfigError, match="flavours must include 'portable'"):
        config.with_artifacts(flavours=["optimized"])


def test_result_storage_in_the_store_needs_a_store(tmp_path: Path) -> None:
    from configs import write_config

    with pytest.raises(ConfigError, match='execution.result_storage = "store" needs a \\[store\\] section'):
        write_config(tmp_path / "c.toml", execution={"task_runner": "dask", "result_storage": "store"})


def test_a_variant_is_a_hub_repo_or_a_local_folder_not_both(tmp_path: Path) -> None:
    from configs import write_config

    with pytest.raises(ConfigError, match="needs exactly one of repo_id .* or path"):
        write_config(tmp_path / "c.toml", variants=[{"name": "x", "task": "regression"}])
    with pytest.raises(ConfigError, match="needs exactly one of repo_id"):
        write_config(tmp_path / "c.toml", variants=[{"name": "x", "repo_id": "a/b", "path": "x", "task": "regression"}])
    config = load_config(write_config(tmp_path / "c.toml", variants=[{"name": "x", "path": "w", "task": "regression"}]))
    assert config.variant("x").path == (tmp_path / "w").resolve()  # relative to the config file


def test_run_reports_config_and_variant_mistakes_before_starting_prefect(tmp_path: Path) -> None:
    """No 15-second server start to learn about a typo."""
    import subprocess
    import sys
    import time

    from configs import write_config

    config = write_config(tmp_path / "c.toml", variants=[{"name": "mine", "path": "missing", "task": "regression"}])
    for extra, needle in ((["--variant", "nope"], "no variant named 'nope'"), ([], "missing")):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mitra_model.cli", "run", "--config", str(config), *extra],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "prefect" not in done.stderr.lower()
        assert time.perf_counter() - started < 10
