"""Where everything lives: every S3 key and file name of a release, in one place.

Layout under `s3://BUCKET/PREFIX/`:

    <variant>/<version>/<file>             artifacts, immutable
    <variant>/<version>/manifest.json      the manifest; immutable once released
    <variant>/<version>/release.sig        the release signature (signed releases only)
    <variant>/_releases/<NNNNNNNN>.json    release record of manifest_version N (the commit point)
    <variant>/latest.json                  pointer to the newest release
    <variant>/<version>/README.md, report.html   the release's model card and report page
    <variant>/index.html, index.html       static pages: a variant's releases, the variants
    _prefect-results/                      Prefect task results (no variant can be named like
                                           this: variant names start with a letter or digit)

A build folder holds the artifact files, `manifest.json` and `verification-<name>.json/.md`. A
pull destination DEST is a symlink to a release folder holding exactly the release: the pulled
artifact files, `manifest.json` and, for a verified signed release, `release.sig`. The puller's
bookkeeping lives beside it, in `.<DEST name>.mitra/` (`state.json`, `lock`, the release folders),
so the folder consumers read (and a folder signature covers) holds nothing else.

Only names here: no I/O, no boto3. `consumers/lib/layout.mjs` mirrors the key functions for the
JS consumers, and tests/test_layout.py checks that both give the same keys. Changing anything
here changes where published releases are looked for, so it breaks every consumer that already
pulls from a bucket.
"""

from __future__ import annotations

from typing import Literal

# v2 (issue 21): each artifact's verification also records the signal kept (error over spread, batch
# dependence) and the task checks on real tables; a v1 manifest lacks them and still pulls.
MANIFEST_SCHEMA_ID = "mitra-build/manifest/v2"
READABLE_MANIFEST_SCHEMA_IDS = ("mitra-build/manifest/v1", MANIFEST_SCHEMA_ID)
POINTER_SCHEMA_ID = "mitra-build/pointer/v1"  # latest.json and the release records
PULL_STATE_SCHEMA_ID = "mitra-build/pull-state/v2"  # .<DEST>.mitra/state.json

MANIFEST_NAME = "manifest.json"
POINTER_NAME = "latest.json"
RELEASES_DIR = "_releases"
RESULTS_DIR = "_prefect-results"
# A release's documents (mitra_model.report renders them, the manifest lists them, the signature covers them)
MODEL_CARD_NAME = "README.md"
REPORT_NAME = "report.html"
INDEX_NAME = "index.html"  # the static pages of the bucket and of each variant (release/index.py)
SIGNATURE_NAME = "release.sig"  # the release signature: in the store's version folder and in DEST
# A pull's bookkeeping: `.<DEST name><SIDE_SUFFIX>/` beside DEST, holding these and the release folders.
SIDE_SUFFIX = ".mitra"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
# Where older pulls (pull-state v1) kept their state: inside DEST. Only looked for, so that refusing
# to replace such a folder can say where it came from; release signatures list it as not signed, so
# an old pulled folder still verifies.
PULL_STATE_NAME = ".mitra-pull.json"

# Artifact files, as the recipes (mitra_model/recipes.py) publish them. "-ort": the optimized flavour.
FLAVOUR_FILES: dict[str, str] = {"portable": "model.onnx", "optimized": "model-ort.onnx"}
SUPPORT_CACHE_FILES: dict[str, tuple[str, str]] = {  # (encoder, predictor) per flavour
    "portable": ("encode-support.onnx", "predict-query.onnx"),
    "optimized": ("encode-support-ort.onnx", "predict-query-ort.onnx"),
}


def precision_file(precision: str) -> str:
    """The file of a reduced-precision artifact, e.g. "model-int8.onnx"."""
    return f"model-{precision}.onnx"


_RELEASE_DIGITS = 8  # zero-padded, so that listing `_releases/` sorts by manifest_version


def join_key(*parts: str) -> str:
    """Join key segments with '/', skipping empty ones (an empty prefix adds nothing).

    Args:
        parts: a prefix (may be empty or hold '/') and plain segments.

    Returns:
        e.g. join_key("models/mitra", "v", "x.onnx") -> "models/mitra/v/x.onnx".
    """
    return "/".join(p for p in parts if p)


def variant_folder(prefix: str, variant: str) -> str:
    """`<prefix>/<variant>`: everything published for one variant."""
    return join_key(prefix, variant)


def version_folder(prefix: str, variant: str, version: str) -> str:
    """`<prefix>/<variant>/<version>`: the artifacts and the manifest of one version."""
    return join_key(prefix, variant, version)


def artifact_key(prefix: str, variant: str, version: str, file: str) -> str:
    """The key of one file of a release (an artifact, or `manifest.json`).

    Args:
        prefix: the store's key prefix (may be empty).
        variant: e.g. "mitra-classifier".
        version: the release's version id.
        file: a plain file name, e.g. "model.onnx".

    Returns:
        `<prefix>/<variant>/<version>/<file>`.
    """
    return join_key(version_folder(prefix, variant, version), file)


def manifest_key(prefix: str, variant: str, version: str) -> str:
    """`<prefix>/<variant>/<version>/manifest.json`."""
    return artifact_key(prefix, variant, version, MANIFEST_NAME)


def signature_key(prefix: str, variant: str, version: str) -> str:
    """`<prefix>/<variant>/<version>/release.sig`: the release signature of a signed release."""
    return artifact_key(prefix, variant, version, SIGNATURE_NAME)


def side_folder_name(dest_name: str) -> str:
    """The name of DEST's bookkeeping folder beside it: `.<dest_name>.mitra` (e.g. ".mitra.mitra")."""
    return f".{dest_name}{SIDE_SUFFIX}"


def pointer_key(prefix: str, variant: str) -> str:
    """`<prefix>/<variant>/latest.json`: the pointer to the variant's newest release."""
    return join_key(variant_folder(prefix, variant), POINTER_NAME)


def release_record_key(prefix: str, variant: str, manifest_version: int) -> str:
    """`<prefix>/<variant>/_releases/<NNNNNNNN>.json`: the record that claims `manifest_version` (>= 1)."""
    return join_key(variant_folder(prefix, variant), RELEASES_DIR, f"{manifest_version:0{_RELEASE_DIGITS}d}.json")


def index_key(prefix: str, variant: str | None = None) -> str:
    """`<prefix>/<variant>/index.html` (a variant's releases), or `<prefix>/index.html` (the variants)."""
    return join_key(variant_folder(prefix, variant) if variant else prefix, INDEX_NAME)


def results_folder(prefix: str) -> str:
    """`<prefix>/_prefect-results`: where Prefect persists task results in the store."""
    return join_key(prefix, RESULTS_DIR)


def verification_report_name(artifact: str, fmt: Literal["json", "md"] = "json") -> str:
    """The build-folder file of an artifact's verification report: `verification-<artifact>.<fmt>`.

    Args:
        artifact: the artifact (or precision) name the report is about, e.g. "fp32".
        fmt: "json" (the machine-readable report the manifest names) or "md" (for people).

    Returns:
        e.g. "verification-fp32.json".
    """
    return f"verification-{artifact}.{fmt}"
