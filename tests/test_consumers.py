"""The artifacts where they are consumed: onnxruntime-node, onnxruntime-web (WASM) in headless Chromium,
and the downstream example that pulls the latest release from S3 and predicts.

Every check compares a runtime's output with Python ONNX Runtime's on the same file (int8 vs int8,
not vs fp32). Needs Node.js + npm (the packages are installed from consumers/package-lock.json on
first use) and, for the browser, Debian's chromium. Without them these tests skip, except under CI
(CI=true), where a missing tool fails with the install command instead of hiding.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s3_fixtures import make_build, put_raw

from mitra_model.build.config import load_config
from mitra_model.build.consumers import (
    CONSUMERS_DIR,
    DEFAULT_CASES,
    FIXTURE_SCHEMA_ID,
    NODE_RUNTIME,
    WEB_RUNTIME,
    CaseResult,
    ConsumerResult,
    check_in_browser,
    check_in_node,
    find_chromium,
    find_node,
    package_version,
    read_fixture,
    write_fixture,
)
from mitra_model.build.export import INPUT_NAMES, OUTPUT_NAME, export_onnx, io_contract
from mitra_model.build.recipes import recipe
from mitra_model.build.support_cache import ENCODE_INPUT_NAMES, export_support_cache
from mitra_model.errors import ConfigError, VerificationError
from mitra_model.model.inputs import PADDED_CLASS_LABEL, make_inputs
from mitra_model.model.snapshot import load_model, write_synthetic_snapshot
from mitra_model.release.publish import publish_build

TASKS = ("classification", "regression")
# Every single-graph artifact a build publishes, from the recipe registry: a new recipe is checked here too.
GRAPH_RECIPES = [r for r in load_config().artifacts.planned() if r.verify_as == "graph"]
ARTIFACTS = tuple(r.name for r in GRAPH_RECIPES)


def _tolerance(artifact: str, runtime: str) -> float:
    return load_config().consumers.tolerance(recipe(artifact).tolerance, runtime)




@pytest.fixture(scope="module")
def models(tiny_artifacts) -> dict[tuple[str, str], Path]:
    """(task, artifact) -> file, made by each recipe as the pipeline makes it (derived ones from their source)."""
    return {(task, r.name): tiny_artifacts.path(task, r.name) for task in TASKS for r in GRAPH_RECIPES}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory, models, tiny_snapshots) -> dict[tuple[str, str], Path]:
    """(task, artifact) -> its fixture (inputs + Python ORT's outputs for that very file)."""
    root = tmp_path_factory.mktemp("consumer-fixtures")
    return {
        key: write_fixture(path, tiny_snapshots[key[0]].config, root / "-".join(key))
        for key, path in models.items()
    }


# -- the fixture ---------------------------------------------------------------------------------


def _decode(tensor: dict[str, Any]) -> np.ndarray:
    wire = {"float32": "<f4", "int64": "<i8", "bool": "u1"}[tensor["dtype"]]
    array = np.frombuffer(base64.b64decode(tensor["data"]), dtype=wire).reshape(tensor["shape"])
    return array.astype(bool) if tensor["dtype"] == "bool" else array


def test_fixture_holds_the_inputs_and_python_outputs(fixtures, models, tiny_snapshots) -> None:
    config = tiny_snapshots["classification"].config
    doc = json.loads(fixtures["classification", "fp32"].read_text())
    assert doc["schema"] == FIXTURE_SCHEMA_ID
    assert doc["model_sha256"] == hashlib.sha256(models["classification", "fp32"].read_bytes()).hexdigest()
    assert [c["name"] for c in doc["cases"]] == [c.name for c in DEFAULT_CASES]
    for case, cell in zip(doc["cases"], DEFAULT_CASES):
        inputs = {name: _decode(tensor) for name, tensor in case["inputs"].items()}
        expected = make_inputs(cell.as_tuple(), config=config, data=cell.data, padded_support_rows=cell.padded_support_rows,
                               seed=doc["seed"], salt=cell.name)
        for name, array in expected.items():
            assert inputs[name].dtype == array.dtype and np.array_equal(inputs[name], array), (cell.name, name)
        assert _decode(case["expected"]).shape == (cell.batch, cell.n_query, config.dim_output)
    padded = {c["name"]: _decode(c["inputs"]["padding_obs_support"]) for c in doc["cases"]}["padded-batch"]
    labels = _decode(doc["cases"][2]["inputs"]["y_support"])
    assert padded.sum() > 0 and not padded[0].any()  # padded rows, and an unpadded item beside them
    assert (labels[padded] == PADDED_CLASS_LABEL).all()
    ties = _decode(doc["cases"][1]["inputs"]["x_support"])
    assert len(np.unique(ties[0, :, 0])) < ties.shape[1] // 3  # heavy ties


def test_fixture_reads_back_as_written(fixtures) -> None:
    path = fixtures["classification", "fp32"]
    fixture = read_fixture(path)
    assert fixture.to_json() == path.read_text()  # what lib/fixture.mjs reads, byte for byte
    raw = json.loads(path.read_text())
    for case, raw_case in zip(fixture.cases, raw["cases"], strict=True):
        for name, tensor in case.inputs.items():
            decoded = _decode(raw_case["inputs"][name])
            assert tensor.to_array().dtype == decoded.dtype and np.array_equal(tensor.to_array(), decoded), (case.name, name)


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda doc: doc.update(schema="mitra-build/consumer-fixture/v0"), r"schema: Input should be 'mitra-build/consumer-fixture/v1'"),
    (lambda doc: doc.update(cases=[]), r"cases: .*at least 1 item"),
    (lambda doc: doc["cases"][2]["inputs"]["x_query"].update(data=doc["cases"][2]["inputs"]["x_query"]["data"][:-8]),
     r"cases\.2\.inputs\.x_query: .*\d+ bytes of data for shape \[3, 5, 5\] of float32 \(expected 300\)"),
    (lambda doc: doc["cases"][0]["expected"].update(dtype="float64"), r"cases\.0\.expected\.dtype: "),
])
def test_read_fixture_names_what_is_wrong(fixtures, tmp_path: Path, edit, problem: str) -> None:
    doc = json.loads(fixtures["classification", "fp32"].read_text())
    edit(doc)
    bad = tmp_path / "fixture.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=problem):
        read_fixture(bad)
    with pytest.raises(ConfigError, match="is not a consumer fixture"):
        check_in_node(tmp_path / "any.onnx", bad, tolerance_abs=1e-5)  # refused before node runs


def test_read_fixture_refuses_a_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist: make one with mitra_model.consumers.write_fixture"):
        read_fixture(tmp_path / "fixture.json")
    (tmp_path / "fixture.json").write_text('{"schema": ')
    with pytest.raises(ConfigError, match="Invalid JSON"):
        read_fixture(tmp_path / "fixture.json")


def test_importing_the_consumer_checks_needs_no_build_toolchain() -> None:
    # scripts/setup.sh imports the package to install the npm packages; a consumer that only checks
    # must not pay for torch or onnxruntime
    done = subprocess.run(
        [sys.executable, "-c", "import sys, mitra_model.build.consumers; print([m for m in ('torch', 'onnxruntime') if m in sys.modules])"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.needs_node
def test_js_fixture_reader_mirrors_python() -> None:
    script = ("import * as f from './lib/fixture.mjs'; console.log(JSON.stringify("
              "[f.FIXTURE_SCHEMA, f.INPUT_NAMES, f.ENCODE_INPUT_NAMES, f.QUERY_INPUT_NAME, f.OUTPUT_NAME]))")
    done = subprocess.run([str(find_node()), "--input-type=module", "-e", script], capture_output=True, text=True,
                          timeout=60, cwd=CONSUMERS_DIR, check=True)
    query = [name for name in INPUT_NAMES if name not in ENCODE_INPUT_NAMES]
    assert json.loads(done.stdout) == [FIXTURE_SCHEMA_ID, list(INPUT_NAMES), list(ENCODE_INPUT_NAMES), *query, OUTPUT_NAME]


# -- onnxruntime-node ----------------------------------------------------------------------------


@pytest.mark.needs_node
@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_node_matches_python_ort(node_modules, models, fixtures, task: str, artifact: str) -> None:
    result = check_in_node(models[task, artifact], fixtures[task, artifact], tolerance_abs=_tolerance(artifact, NODE_RUNTIME))
    assert result.passed and result.runtime == NODE_RUNTIME and result.backend == "cpu"
    assert result.runtime_version == json.loads((CONSUMERS_DIR / "package.json").read_text())["dependencies"][NODE_RUNTIME]
    assert [c.name for c in result.cases] == [c.name for c in DEFAULT_CASES]
    assert all(c.error is None and c.max_abs_err <= result.tolerance_abs for c in result.cases)
    record = result.to_record()
    assert json.loads(json.dumps(record)) == record and record["passed"] is True


@pytest.fixture(scope="module")
def other_snapshot(tmp_path_factory: pytest.TempPathFactory, build_config) -> Path:
    """Model B: the same architecture and I/O as the tiny classifier, different weights."""
    return write_synthetic_snapshot(tmp_path_factory.mktemp("model-b") / "snap", task="classification",
                                    size_name="tiny", size=build_config.sizes["tiny"], seed=99).path


@pytest.fixture(scope="module")
def other_classifier(other_snapshot: Path, build_config) -> Path:
    model, _ = load_model(other_snapshot)
    return export_onnx(model, other_snapshot.parent / "b.onnx", opset=build_config.export.opset,
                       trace_shape=build_config.export.trace_shape).path


@pytest.mark.needs_node
def test_node_refuses_a_different_model_naming_each_case(node_modules, fixtures, other_classifier) -> None:
    with pytest.raises(VerificationError) as caught:
        check_in_node(other_classifier, fixtures["classification", "fp32"], tolerance_abs=1e-5)
    message = str(caught.value)
    assert "onnxruntime-node" in message and "b.onnx" in message
    for case in DEFAULT_CASES:
        assert f"case {case.name!r}: max abs error" in message
    assert len(caught.value.failures) == len(DEFAULT_CASES)
    assert "the fixture's expected outputs come from a file with sha256" in message and "b.onnx has" in message

    result = check_in_node(other_classifier, fixtures["classification", "fp32"], tolerance_abs=1e-5, raise_on_failure=False)
    assert not result.passed and result.max_abs_err > 1e-3


@pytest.mark.needs_node
def test_node_reports_a_model_that_breaks_the_contract(node_modules, models, fixtures, tmp_path: Path) -> None:
    # the regressor takes float32 labels: each case of a classifier fixture fails to run, by name
    with pytest.raises(VerificationError, match=r"case 'base': run failed: .*tensor\(int64\)"):
        check_in_node(models["regression", "fp32"], fixtures["classification", "fp32"], tolerance_abs=1e-5)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model" * 10)
    with pytest.raises(VerificationError, match=r"could not run: onnxruntime-node 1\.\S+ could not load .*garbage\.onnx"):
        check_in_node(garbage, fixtures["classification", "fp32"], tolerance_abs=1e-5)


# -- the support-cache pair: encode-support, then predict-query on its outputs ------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, tiny_snapshots, tiny_artifacts, build_config,
          other_snapshot) -> dict[str, Any]:
    """Each task's pair as the pipeline builds it, its fixture, and model B's pair (other weights)."""
    root = tmp_path_factory.mktemp("consumer-pairs")
    out: dict[str, Any] = {task: tiny_artifacts.files(task, "support-cache") for task in TASKS}
    model, _ = load_model(other_snapshot)
    pair = export_support_cache(model, root / "other", opset=build_config.export.opset,
                                trace_shape=build_config.export.trace_shape)
    out["other"] = (pair.encode.path, pair.predict.path)
    for task in TASKS:
        encode, predict = out[task]
        out[task, "fixture"] = write_fixture(encode, tiny_snapshots[task].config, root / f"{task}-fixture", predict_path=predict)
    return out


def test_pair_fixture_expects_what_the_full_model_computes(pairs, models, fixtures) -> None:
    doc = json.loads(pairs["classification", "fixture"].read_text())
    encode, predict = pairs["classification"]
    assert doc["model_sha256"] == hashlib.sha256(encode.read_bytes()).hexdigest()
    assert doc["predict_sha256"] == hashlib.sha256(predict.read_bytes()).hexdigest()
    full = json.loads(fixtures["classification", "fp32"].read_text())
    for pair_case, full_case in zip(doc["cases"], full["cases"], strict=True):
        assert pair_case["inputs"] == full_case["inputs"]
        np.testing.assert_allclose(_decode(pair_case["expected"]), _decode(full_case["expected"]), atol=1e-5)


@pytest.mark.needs_node
@pytest.mark.parametrize("task_name", TASKS)
def test_node_runs_the_pair_like_python(node_modules, pairs, task_name: str) -> None:
    encode, predict = pairs[task_name]
    result = check_in_node(encode, pairs[task_name, "fixture"], predict_path=predict,
                           tolerance_abs=_tolerance("fp32", NODE_RUNTIME))
    assert result.passed and [c.name for c in result.cases] == [c.name for c in DEFAULT_CASES]
    record = result.to_record()
    assert record["onnx_sha256"] == hashlib.sha256(encode.read_bytes()).hexdigest()
    assert record["predict_sha256"] == hashlib.sha256(predict.read_bytes()).hexdigest()


@pytest.mark.needs_node
def test_node_refuses_a_cache_from_other_weights_naming_the_gate(node_modules, pairs) -> None:
    # model B's encoder feeding model A's predictor: the fingerprint gate stops every case
    other_encode, _ = pairs["other"]
    _, predict = pairs["classification"]
    with pytest.raises(VerificationError) as caught:
        check_in_node(other_encode, pairs["classification", "fixture"], predict_path=predict, tolerance_abs=1e-5)
    message = str(caught.value)
    assert f"{other_encode.name} + {predict.name} in onnxruntime-node" in message
    assert "case 'base': run failed: " in message and "cache_must_come_from_this_model" in message
    assert len(caught.value.failures) == len(DEFAULT_CASES)
    assert f"{other_encode.name} has" in message  # the fixture came from model A's encoder


def test_pair_and_single_file_fixtures_are_not_interchangeable(pairs, fixtures, models) -> None:
    encode, predict = pairs["classification"]
    with pytest.raises(ConfigError, match="holds one model file's outputs, not the support-cache pair's"):
        check_in_node(encode, fixtures["classification", "fp32"], predict_path=predict, tolerance_abs=1e-5)
    with pytest.raises(ConfigError, match="holds the support-cache pair's outputs: pass predict_path"):
        check_in_browser(models["classification", "fp32"], pairs["classification", "fixture"], tolerance_abs=1e-5)


# -- onnxruntime-web in headless Chromium --------------------------------------------------------

# Everything a build publishes runs in onnxruntime-web's WASM backend, the optimized flavour's
# com.microsoft.MultiHeadAttention included (the WASM build carries the CPU contrib ops).
BROWSER_MATRIX = [("classification", a) for a in ARTIFACTS] + [("regression", "fp32"), ("regression", "int8")]


@pytest.mark.needs_chromium
@pytest.mark.parametrize(("task_name", "artifact"), BROWSER_MATRIX, ids=["-".join(k) for k in BROWSER_MATRIX])
def test_browser_matches_python_ort(node_modules, models, fixtures, task_name: str, artifact: str) -> None:
    result = check_in_browser(
        models[task_name, artifact], fixtures[task_name, artifact], tolerance_abs=_tolerance(artifact, WEB_RUNTIME)
    )
    assert result.passed and result.runtime == WEB_RUNTIME and result.backend == "wasm"
    assert result.host.startswith("Chromium ") and result.runtime_version == package_version(WEB_RUNTIME)
    assert [c.name for c in result.cases] == [c.name for c in DEFAULT_CASES]


@pytest.mark.needs_chromium
def test_browser_refuses_a_different_model_naming_the_case(node_modules, fixtures, other_classifier) -> None:
    with pytest.raises(VerificationError, match=r"onnxruntime-web .*case 'base': max abs error .* > tolerance 1\.0e-05"):
        check_in_browser(other_classifier, fixtures["classification", "fp32"], tolerance_abs=1e-5)


@pytest.mark.needs_chromium
def test_browser_runs_the_pair_like_python(node_modules, pairs) -> None:
    encode, predict = pairs["classification"]
    result = check_in_browser(encode, pairs["classification", "fixture"], predict_path=predict,
                              tolerance_abs=_tolerance("fp32", WEB_RUNTIME))
    assert result.passed and result.backend == "wasm" and result.predict_path == str(predict.resolve())
    assert [c.name for c in result.cases] == [c.name for c in DEFAULT_CASES]


def test_missing_chromium_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"apt-get install -y chromium"):
        find_chromium()
    with pytest.raises(ConfigError, match="does not exist"):
        find_chromium(tmp_path / "no-such-browser")


def test_consumer_result_record_is_json() -> None:
    result = ConsumerResult(
        runtime=WEB_RUNTIME, runtime_version="1.30.0", backend="wasm", host="Chromium", onnx_path="m.onnx",
        onnx_sha256="a" * 64, fixture_model_sha256="a" * 64, tolerance_abs=1e-5,
        cases=(CaseResult(name="base", shape=(1, 2, 3, 4), max_abs_err=math.inf, seconds=None, error="run failed: x"),),
        failures=("case 'base': run failed: x",),
        seconds=1.0,
    )
    record = result.to_record()
    assert record["passed"] is False and record["max_abs_err"] is None and record["cases"] == {"base": None}  # no inf in JSON
    json.dumps(record, allow_nan=False)
    assert json.loads(result.to_json())["passed"] is False


# -- the downstream example: pull latest from S3, verify, predict --------------------------------

EXAMPLE = CONSUMERS_DIR / "example-pull-latest.mjs"


def _real_build(root: Path, onnx_path: Path, model_config) -> Path:
    """A publishable build whose fp32 artifact is a real tiny classifier export."""
    build = make_build(root, artifacts=(("fp32", "model.onnx", 16, "fp32"),))
    data = onnx_path.read_bytes()
    (build / "model.onnx").write_bytes(data)
    manifest = json.loads((build / "manifest.json").read_text())
    inputs, outputs = io_contract(model_config)
    manifest["artifacts"][0].update(
        size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        inputs=[{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in inputs],
        outputs=[{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in outputs],
    )
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return build


def _run_example(store, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(EXAMPLE), "--endpoint", store.endpoint_url, "--bucket", store.bucket, "--prefix", store.prefix,
         "--variant", "mitra-classifier", *extra],
        capture_output=True, text=True, timeout=60, cwd=CONSUMERS_DIR,
    )


@pytest.mark.needs_node
@pytest.mark.usefixtures("time_limit")
def test_example_pulls_latest_verifies_and_predicts(
    node_modules, s3_client, s3_store, tmp_path: Path, tiny_exports, tiny_snapshots
) -> None:
    build = _real_build(tmp_path, tiny_exports["classification"], tiny_snapshots["classification"].config)
    published = publish_build(build, client=s3_client, store=s3_store)

    done = _run_example(s3_store, "--save", str(tmp_path / "pulled"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["verified"] is True
    assert report["version"] == published.version and report["manifest_sha256"] == published.manifest_sha256
    assert report["artifact"]["sha256"] == hashlib.sha256((build / "model.onnx").read_bytes()).hexdigest()
    assert (tmp_path / "pulled" / "model.onnx").read_bytes() == (build / "model.onnx").read_bytes()
    prediction = report["prediction"]
    assert prediction["task"] == "classification" and prediction["output_shape"] == [1, 4, 10]
    assert len(prediction["predicted_class"]) == 4 and set(prediction["predicted_class"]) <= {0, 1}
    assert np.isfinite(prediction["logits"]).all()
    assert f"verified mitra-classifier {published.version}" in done.stderr


@pytest.mark.needs_node
@pytest.mark.usefixtures("time_limit")
def test_example_refuses_a_tampered_artifact_and_manifest(
    node_modules, s3_client, s3_store, tmp_path: Path, tiny_exports, tiny_snapshots
) -> None:
    build = _real_build(tmp_path, tiny_exports["classification"], tiny_snapshots["classification"].config)
    published = publish_build(build, client=s3_client, store=s3_store)
    artifact_key = s3_store.key("mitra-classifier", published.version, "model.onnx")
    data = bytearray((build / "model.onnx").read_bytes())
    data[-1] ^= 1  # same size, one bit flipped
    put_raw(s3_client, s3_store, artifact_key, bytes(data))
    done = _run_example(s3_store)
    assert done.returncode == 1 and done.stdout == ""
    assert f"{artifact_key}: sha256" in done.stderr and "the manifest says" in done.stderr

    manifest = s3_client.get_object(Bucket=s3_store.bucket, Key=published.manifest_key)["Body"].read()
    put_raw(s3_client, s3_store, published.manifest_key, manifest.replace(b'"fp32"', b'"fp32" '))
    done = _run_example(s3_store)
    assert done.returncode == 1 and f"but {s3_store.prefix}/mitra-classifier/latest.json pins" in done.stderr
