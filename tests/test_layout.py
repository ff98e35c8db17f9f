"""One layout: mitra_model/layout.py and its JS mirror consumers/lib/layout.mjs give the same keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mitra_model.release import layout
from mitra_model.release.rules import MANIFEST_SCHEMA_PATH
from mitra_model.release.store import StoreConfig

LAYOUT_MJS = Path(__file__).resolve().parents[1] / "consumers" / "lib" / "layout.mjs"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")

PREFIXES = ("", "models", "models/mitra", "releases/test")
VARIANTS = ("mitra-classifier", "mitra-regressor")
VERSIONS = ("r-0123456789abcdef", "1.0+local_2")
FILES = ("model.onnx", "model-int8.onnx", "encode-support.onnx")
MANIFEST_VERSIONS = (1, 9, 10, 12345678)

# What layout.mjs is asked for: (function, args); the same names as layout.py in camelCase.
_CASES: list[tuple[str, str, tuple[Any, ...]]] = (
    [("artifact_key", "artifactKey", (p, v, ver, f)) for p in PREFIXES for v in VARIANTS for ver in VERSIONS for f in FILES]
    + [("manifest_key", "manifestKey", (p, v, ver)) for p in PREFIXES for v in VARIANTS for ver in VERSIONS]
    + [("version_folder", "versionFolder", (p, v, ver)) for p in PREFIXES for v in VARIANTS for ver in VERSIONS]
    + [("signature_key", "signatureKey", (p, v, ver)) for p in PREFIXES for v in VARIANTS for ver in VERSIONS]
    + [("side_folder_name", "sideFolderName", (d,)) for d in ("mitra", "dest", "model.v2")]
    + [("variant_folder", "variantFolder", (p, v)) for p in PREFIXES for v in VARIANTS]
    + [("pointer_key", "pointerKey", (p, v)) for p in PREFIXES for v in VARIANTS]
    + [("release_record_key", "releaseRecordKey", (p, v, n)) for p in PREFIXES for v in VARIANTS for n in MANIFEST_VERSIONS]
    + [("results_folder", "resultsFolder", (p,)) for p in PREFIXES]
)
_CONSTANTS = ("MANIFEST_SCHEMA_ID", "READABLE_MANIFEST_SCHEMA_IDS", "POINTER_SCHEMA_ID", "PULL_STATE_SCHEMA_ID", "MANIFEST_NAME", "POINTER_NAME",
              "RELEASES_DIR", "RESULTS_DIR", "SIGNATURE_NAME", "SIDE_SUFFIX", "STATE_FILE", "LOCK_FILE",
              "PULL_STATE_NAME")

# Reads [[jsName, args], ...] on stdin, prints {"keys": [...], "constants": {...}}. No npm package.
_NODE_SCRIPT = """
const layout = await import(process.argv[1]);
let input = '';
for await (const chunk of process.stdin) input += chunk;
const { cases, constants } = JSON.parse(input);
const keys = cases.map(([name, args]) => layout[name](...args));
process.stdout.write(JSON.stringify({ keys, constants: Object.fromEntries(constants.map((c) => [c, layout[c]])) }));
"""


@pytest.mark.needs_node
def test_js_layout_gives_the_same_keys_as_python() -> None:
    request = {"cases": [[js, list(args)] for _, js, args in _CASES], "constants": list(_CONSTANTS)}
    done = subprocess.run(
        ["node", "--input-type=module", "-e", _NODE_SCRIPT, LAYOUT_MJS.as_uri()],
        input=json.dumps(request), capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)

    expected = [getattr(layout, py)(*args) for py, _, args in _CASES]
    differ = [
        f"{js}{args}: js {got!r}, python {want!r}"
        for (_, js, args), got, want in zip(_CASES, answer["keys"], expected, strict=True)
        if got != want
    ]
    assert not differ, "layout.mjs and layout.py disagree:\n" + "\n".join(differ)
    assert answer["constants"] == json.loads(json.dumps({name: getattr(layout, name) for name in _CONSTANTS}))  # tuples: arrays


def test_keys_of_a_release() -> None:
    """The published layout (README "Releases in S3"); consumers already read it, so it must not move."""
    assert layout.artifact_key("models/mitra", "mitra-classifier", "r-1", "model.onnx") == (
        "models/mitra/mitra-classifier/r-1/model.onnx"
    )
    assert layout.artifact_key("", "mitra-classifier", "r-1", "model.onnx") == "mitra-classifier/r-1/model.onnx"
    assert layout.manifest_key("p", "v", "r-1") == "p/v/r-1/manifest.json"
    assert layout.pointer_key("p", "v") == "p/v/latest.json"
    assert layout.release_record_key("p", "v", 3) == "p/v/_releases/00000003.json"
    assert layout.signature_key("p", "v", "r-1") == "p/v/r-1/release.sig"
    assert layout.side_folder_name("mitra") == ".mitra.mitra"
    assert layout.results_folder("") == "_prefect-results"
    assert layout.verification_report_name("fp32") == "verification-fp32.json"
    assert layout.verification_report_name("int8", "md") == "verification-int8.md"


def test_store_config_uses_the_layout() -> None:
    store = StoreConfig(bucket="ok-bucket", prefix="a/b")
    assert store.results_folder() == layout.results_folder("a/b") == "a/b/_prefect-results"
    assert store.key("v", "r-1", "model.onnx") == layout.artifact_key("a/b", "v", "r-1", "model.onnx")


def test_manifest_schema_id_matches_the_schema_file() -> None:
    schema = json.loads(MANIFEST_SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["properties"]["schema"]["enum"] == list(layout.READABLE_MANIFEST_SCHEMA_IDS)
    assert layout.MANIFEST_SCHEMA_ID == layout.READABLE_MANIFEST_SCHEMA_IDS[-1]  # written: the newest


def test_layers_stay_light() -> None:
    """layout and release load without boto3 or torch; pull does not need the publisher."""
    probe = (
        "import sys\n"
        "import mitra_model.release.layout, mitra_model.release.rules\n"
        "heavy = sorted(m for m in ('boto3', 'botocore', 'torch') if m in sys.modules)\n"
        "assert not heavy, f'layout/release imported {heavy}'\n"
        "import mitra_model.release.pull\n"
        "assert 'mitra_model.release.publish' not in sys.modules, 'pull imported publish'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
