"""What changed between two releases of a variant, read from their manifests alone.

`mitra-build diff` prints it, and each release's report page shows it against the release before.
The manifest is the whole record (sources, toolchain, artifacts, verification), so this needs no
artifact bytes and no ONNX, and works on the slim client.
"""

from __future__ import annotations

from typing import Any

# Per-artifact numbers a reader compares across releases: (label, where in the verification entry).
_VERIFICATION_METRICS = (
    ("max abs err", "max_abs_err"),
    ("max err/spread", "max_err_over_spread"),
    ("max batch dependence", "max_batch_dependence"),
)


def _release(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: doc.get(key) for key in ("variant", "version", "manifest_version")}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"what": key, "from": old.get(key), "to": new.get(key)}
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _source(doc: dict[str, Any]) -> dict[str, Any]:
    source = doc.get("source") or {}
    fields = {key: source.get(key) for key in ("repo_id", "requested_revision", "resolved_commit", "path", "synthetic")}
    fields.update({f"file {f.get('path')}": f.get("sha256") for f in source.get("files") or [] if isinstance(f, dict)})
    return fields


def _build(doc: dict[str, Any]) -> dict[str, Any]:
    build = doc.get("build") or {}
    fields = {key: build.get(key) for key in ("opset", "config_sha256", "code_sha256")}
    fields.update({f"toolchain {name}": version for name, version in (build.get("toolchain") or {}).items()})
    return fields


def _artifact_numbers(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """artifact name -> {metric label: value}, for every number the two releases can share."""
    verification = doc.get("verification") or {}
    numbers: dict[str, dict[str, float]] = {}
    for artifact in doc.get("artifacts") or []:
        name = artifact.get("name")
        entry = verification.get(name) or verification.get(artifact.get("precision")) or {}
        values: dict[str, Any] = {"size": artifact.get("size"),
                                  "cpu time vs fp32": (artifact.get("cpu") or {}).get("relative_to_fp32")}
        values.update({label: entry.get(key) for label, key in _VERIFICATION_METRICS})
        values.update({f"{t.get('name')} err/spread": t.get("err_over_spread") for t in entry.get("tasks") or []})
        numbers[name] = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return numbers


def manifest_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What changed from release `old` to release `new` (two manifests of one variant).

    Returns:
        {"from": release, "to": release, "source": [...], "build": [...], "artifacts": [...],
        "metrics": [...]}: source and build changes as {"what", "from", "to"}; each artifact as
        {"name", "change": added | removed | rebuilt | same, "from_sha256", "to_sha256"}; each number
        both releases have for an artifact as {"artifact", "metric", "from", "to", "delta"}.
    """
    old_files = {a.get("name"): a for a in old.get("artifacts") or []}
    new_files = {a.get("name"): a for a in new.get("artifacts") or []}
    artifacts = []
    for name in sorted(set(old_files) | set(new_files), key=str):
        before, after = old_files.get(name), new_files.get(name)
        change = ("added" if before is None else "removed" if after is None
                  else "same" if before.get("sha256") == after.get("sha256") else "rebuilt")
        artifacts.append({"name": name, "change": change,
                          "from_sha256": before and before.get("sha256"), "to_sha256": after and after.get("sha256")})
    old_numbers, new_numbers = _artifact_numbers(old), _artifact_numbers(new)
    metrics = []
    for name in sorted(set(old_numbers) & set(new_numbers), key=str):
        for metric in old_numbers[name]:
            if metric in new_numbers[name]:
                before, after = old_numbers[name][metric], new_numbers[name][metric]
                metrics.append({"artifact": name, "metric": metric, "from": before, "to": after, "delta": after - before})
    return {"from": _release(old), "to": _release(new), "source": _changes(_source(old), _source(new)),
            "build": _changes(_build(old), _build(new)), "artifacts": artifacts, "metrics": metrics}


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def diff_text(diff: dict[str, Any]) -> str:
    """The diff for a terminal: what changed first, then every shared number with its delta."""
    def release(r: dict[str, Any]) -> str:
        return f"{r['variant']} {r['version']} (release {r['manifest_version']})"

    lines = [f"from {release(diff['from'])}", f"  to {release(diff['to'])}", ""]
    for section, title in (("source", "source"), ("build", "build and toolchain")):
        changes = diff[section]
        lines.append(f"{title}: {'unchanged' if not changes else ''}".rstrip())
        lines += [f"  {c['what']}: {c['from']} -> {c['to']}" for c in changes]
    lines.append("artifacts:")
    lines += [f"  {a['name']}: {a['change']}" for a in diff["artifacts"]]
    lines.append("numbers (from -> to, delta):")
    lines += [f"  {m['artifact']} {m['metric']}: {_number(m['from'])} -> {_number(m['to'])} "
              f"({'+' if m['delta'] >= 0 else ''}{_number(m['delta'])})" for m in diff["metrics"]]
    return "\n".join(lines) + "\n"
