"""The artifact recipe registry: one declaration per artifact drives planning, config validation,
CLI choices and the up-to-date decision."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from configs import edited_config

from mitra_model.build import recipes
from mitra_model.build.config import DEFAULT_CONFIG_PATH, load_config
from mitra_model.build.record import decide_build
from mitra_model.cli.main import build_parser
from mitra_model.errors import ConfigError

# The default configuration's line that plans the reduced precisions, whatever it lists.
PRECISIONS_LINE = re.search(r"^precisions = .*$", DEFAULT_CONFIG_PATH.read_text(), re.M).group(0)


def test_every_recipe_derives_from_a_declared_recipe_and_names_are_unique() -> None:
    names = [r.name for r in recipes.all_recipes()]
    assert len(set(names)) == len(names)
    files = [f.file for r in recipes.all_recipes() for f in r.files]
    assert len(set(files)) == len(files)
    for recipe in recipes.all_recipes():
        assert recipe.derives_from is None or recipe.derives_from in names, recipe.name


def test_planned_order_puts_every_recipe_after_its_source() -> None:
    planned = load_config().artifacts.planned()
    order = [r.name for r in planned]
    assert order[0] == "fp32"
    for position, recipe in enumerate(planned):
        if recipe.derives_from is not None:
            assert order.index(recipe.derives_from) < position, order


def test_a_recipe_whose_source_is_not_planned_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="int8 is built from fp32-ort .*add 'optimized' to \\[artifacts\\] flavours"):
        load_config().with_artifacts(flavours=["portable"], precisions=["int8"])


def test_unknown_precision_names_the_ones_the_registry_has(tmp_path: Path) -> None:
    path = edited_config(tmp_path, (PRECISIONS_LINE, 'precisions = ["int3"]'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "int3" in str(info.value) and all(p in str(info.value) for p in recipes.choices("precisions"))


def test_a_planned_artifact_needs_its_tolerance(tmp_path: Path) -> None:
    text = DEFAULT_CONFIG_PATH.read_text()
    start = text.index("[verification.tolerances.fp16]")
    end = text.index("\n\n", start)
    path = tmp_path / "c.toml"
    path.write_text(text[:start] + text[end:])
    with pytest.raises(ConfigError, match=r"\[verification.tolerances.fp16\] \(for fp16\)"):
        load_config(path)


def test_no_tolerance_is_demanded_for_an_artifact_that_is_not_planned(tmp_path: Path) -> None:
    text = DEFAULT_CONFIG_PATH.read_text().replace(PRECISIONS_LINE, 'precisions = ["int8"]', 1)
    start = text.index("[verification.tolerances.fp16]")
    end = text.index("\n\n", start)
    text = text[:start] + text[end:]
    start = text.index("[consumers.tolerances.fp16]")
    end = text.index("\n\n", start)
    path = tmp_path / "c.toml"
    path.write_text(text[:start] + text[end:])
    assert [r.name for r in load_config(path).artifacts.planned()] == ["fp32", "fp32-ort", "int8", "support-cache"]


def test_a_planned_artifact_needs_a_consumer_bound_for_each_runtime_checked(tmp_path: Path) -> None:
    path = edited_config(tmp_path, ("[consumers.tolerances.fp16]\nonnxruntime-node = 1e-5\n",
                                   "[consumers.tolerances.fp16]\n"))
    with pytest.raises(ConfigError, match=r"\[consumers.tolerances.fp16\] onnxruntime-node \(for fp16\)"):
        load_config(path)


def test_recipe_options_are_checked_against_the_recipe(tmp_path: Path) -> None:
    path = edited_config(tmp_path, ("support_cache = true", "support_cache = true\n[artifacts.options.fp16]\nblock_size = 3"))
    with pytest.raises(ConfigError, match=r"options.fp16: .*block_size"):
        load_config(path)
    path = edited_config(tmp_path, ("support_cache = true", "support_cache = true\n[artifacts.options.int3]\n"))
    with pytest.raises(ConfigError, match="options.int3: no artifact recipe 'int3'"):
        load_config(path)


def test_cli_choices_come_from_the_registry() -> None:
    parser = build_parser()
    for command in (["quantize", "--onnx", "a", "--output", "b", "--precision"], ["run", "--precision"]):
        for precision in recipes.choices("precisions"):
            assert parser.parse_args([*command, precision]).precision in (precision, [precision])
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "int3"])


def _write_build(root: Path, variant: str, version: str) -> None:
    folder = root / "builds" / variant / version
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx")
    import hashlib

    entry = {"file": "model.onnx", "size": 4, "sha256": hashlib.sha256(b"onnx").hexdigest()}
    (folder / "manifest.json").write_text(json.dumps({"artifacts": [entry]}))


def test_the_up_to_date_decision_is_typed_and_says_why(tmp_path: Path) -> None:
    latest = {"version": "v-1", "manifest_version": 3, "manifest_key": "k"}
    published = decide_build(variant="m", version="v-1", artifacts_root=tmp_path, latest=latest, force=False)
    assert published.action == "published" and "manifest_version 3" in published.reason
    assert decide_build(variant="m", version="v-1", artifacts_root=tmp_path, latest=latest, force=True).action == "build"
    fresh = decide_build(variant="m", version="v-2", artifacts_root=tmp_path, latest=latest, force=False)
    assert fresh.action == "build" and "the published latest is v-1" in fresh.reason
    _write_build(tmp_path, "m", "v-2")
    local = decide_build(variant="m", version="v-2", artifacts_root=tmp_path, latest=latest, force=False)
    assert local.action == "built-locally" and local.manifest is not None
    (tmp_path / "builds" / "m" / "v-2" / "model.onnx").write_bytes(b"oops")  # damaged: not trusted
    assert decide_build(variant="m", version="v-2", artifacts_root=tmp_path, latest=None, force=False).action == "build"


@pytest.mark.parametrize("module", ["mitra_model.build.source", "mitra_model.build.recipes", "mitra_model.build.config"])
def test_pinning_code_does_not_import_the_model_toolchain(module: str) -> None:
    """Deciding what to build (pin a revision, read the config) must stay light: no torch, no ONNX Runtime."""
    code = (f"import sys, {module}; heavy = sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules); "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "", f"importing {module} imported {done.stdout.strip()}"
