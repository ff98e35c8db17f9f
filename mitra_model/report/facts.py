"""What the model card and the report page both say about a release, read from its manifest.

A manifest of any schema this package reads (v1 lacks the signal metrics, a build folder's draft
lacks the publish fields), so every fact tolerates a missing field and says "not recorded".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The checkpoints every Mitra build descends from: a local folder (a fine-tune) names its task's as base_model.
UPSTREAM_REPOS = {True: "autogluon/mitra-classifier", False: "autogluon/mitra-regressor"}
# The sources whose license is known (Hugging Face model pages of the upstream checkpoints).
KNOWN_LICENSES = {"autogluon/mitra-classifier": "apache-2.0", "autogluon/mitra-regressor": "apache-2.0"}
VERIFICATION_BOUNDS = (  # (label, manifest verification key, tolerance key)
    ("max abs err", "max_abs_err", "max_abs"),
    ("max err/spread", "max_err_over_spread", "max_err_over_spread"),
    ("batch dependence", "max_batch_dependence", "max_batch_dependence"),
)


@dataclass(frozen=True)
class ArtifactFacts:
    name: str
    file: str
    precision: str
    flavour: str
    use_for: str
    runtimes: tuple[str, ...]
    size: int
    sha256: str
    relative_cpu_time: float | None  # ONNX Runtime CPU time of the matrix over the portable fp32 file's
    verification: dict[str, Any]  # the manifest's entry (empty when none was recorded)

    @property
    def passed(self) -> bool:
        return self.verification.get("passed") is True

    def metric(self, key: str) -> float | None:
        value = self.verification.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def bound(self, key: str) -> float | None:
        value = (self.verification.get("tolerance") or {}).get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def artifacts(manifest: dict[str, Any]) -> list[ArtifactFacts]:
    """Every artifact of the release, in manifest order, with its verification entry."""
    verification = manifest.get("verification") or {}
    found = []
    for a in manifest.get("artifacts") or []:
        flavour, precision = str(a.get("flavour") or "portable"), str(a.get("precision") or "?")
        found.append(ArtifactFacts(
            name=str(a.get("name")), file=str(a.get("file")), precision=precision, flavour=flavour,
            use_for=str(a.get("purpose") or ""),  # the recipe's: what the file is for
            runtimes=tuple(a.get("runtimes") or ()), size=int(a.get("size") or 0), sha256=str(a.get("sha256") or ""),
            relative_cpu_time=(a.get("cpu") or {}).get("relative_to_fp32"),
            verification=verification.get(a.get("name")) or verification.get(precision) or {},
        ))
    return found


def base_model(manifest: dict[str, Any]) -> str:
    return (manifest.get("source") or {}).get("repo_id") or UPSTREAM_REPOS[is_classifier(manifest)]


def reference_file(manifest: dict[str, Any]) -> str:
    """The file examples run: the portable fp32 graph, else the first artifact."""
    found = artifacts(manifest)
    portable = [a for a in found if a.flavour == "portable" and a.precision == "fp32" and a.name == "fp32"]
    return (portable or found)[0].file if found else "model.onnx"


def recommendations(manifest: dict[str, Any]) -> list[tuple[str, ArtifactFacts, str]]:
    """Which single-file artifact to take per target, chosen from the release's own numbers:
    (target, artifact, why). Only artifacts that passed verification are candidates."""
    graphs = [a for a in artifacts(manifest) if a.passed and a.relative_cpu_time is not None]
    if not graphs:
        return []
    exact = next((a for a in graphs if a.file == reference_file(manifest)), graphs[0])
    fastest = min(graphs, key=lambda a: a.relative_cpu_time)
    web = [a for a in graphs if any("onnxruntime-web" in r for r in a.runtimes)]
    smallest = min(graphs, key=lambda a: a.size)
    found = [("exact, any runtime", exact, "what upstream computes: fp32, standard ops only"),
             ("a server's CPU", fastest, f"fastest here: {fastest.relative_cpu_time:.2f}x the fp32 file's CPU time")]
    if web:
        small_web = min(web, key=lambda a: a.size)
        found.append(("the browser", small_web, f"smallest file onnxruntime-web runs: {format_size(small_web.size)}"))
    found.append(("a phone, or the smallest download", smallest, f"{format_size(smallest.size)}, "
                  f"{smallest.size / exact.size:.0%} of fp32"))
    return found


def is_synthetic(manifest: dict[str, Any]) -> bool:
    return (manifest.get("source") or {}).get("synthetic") is not False


def is_classifier(manifest: dict[str, Any]) -> bool:
    task = (manifest.get("model") or {}).get("task")
    if task is not None:
        return str(task).upper().startswith("CLASS")
    return "regress" not in str(manifest.get("variant"))


def origin(manifest: dict[str, Any]) -> str:
    """Where the weights came from, in one line."""
    source = manifest.get("source") or {}
    repo, commit, path = source.get("repo_id"), source.get("resolved_commit"), source.get("path")
    if repo and commit:
        text = f"{repo} @ {source.get('requested_revision')} (commit {commit})"
    elif repo and path:
        text = f"{repo} (built from the local folder {path})"
    elif repo:
        text = f"{repo} (no commit of it was resolved)"
    else:
        text = f"the local folder {path}"
    return ("SYNTHETIC snapshot with random weights, shaped like " + text) if is_synthetic(manifest) else text


def release_label(manifest: dict[str, Any]) -> str:
    number = manifest.get("manifest_version")
    return f"{manifest.get('variant')} {manifest.get('version')}" + (f" (release {number})" if number else " (unpublished build)")


def signing_status(manifest: dict[str, Any]) -> str:
    """One of "signed", "unsigned" (published without a signature), "unpublished" (a build folder's draft)."""
    if manifest.get("signed_by"):
        return "signed"
    return "unsigned" if manifest.get("manifest_version") else "unpublished"


def format_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def format_number(value: float | None, fmt: str = ".3g") -> str:
    return "not recorded" if value is None else format(value, fmt)


SYNTHETIC_WARNING = ("SYNTHETIC: built from random weights, not a trained checkpoint. The files compute what "
                     "upstream Mitra computes with these weights, but their predictions are meaningless.")
