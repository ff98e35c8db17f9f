"""The report page: `report.html` in every release folder, one self-contained file.

No script, no stylesheet or font from elsewhere, plots as inline SVG: it renders the same opened
from disk, served from the bucket, or attached to a ticket. Most important first: whether the
release can be trusted and which file to take; then the plots, each number beside its bound.
"""

from __future__ import annotations

import html
from typing import Any

from mitra_model.release.diff import manifest_diff
from mitra_model.release.index import static_page
from mitra_model.release.layout import MODEL_CARD_NAME, SIGNATURE_NAME
from mitra_model.report import charts, facts
from mitra_model.report.facts import ArtifactFacts, format_number, format_size

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 76rem; padding: 0 1rem; color: #1b1f24; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; width: 100%; margin: .6rem 0; } th, td { text-align: left; padding: .3rem .55rem; border-bottom: 1px solid #d0d7de; vertical-align: top; }
th { background: #f6f8fa; } code { font-size: 88%; word-break: break-all; } code.file { white-space: nowrap; word-break: normal; }
.banner { background: #82071e; color: #fff; padding: .9rem 1rem; font-weight: 700; border-radius: .4rem; }
.take { background: #eef6ee; border: 1px solid #2da44e; padding: .8rem 1rem; border-radius: .4rem; }
.warn { background: #fff1c2; border: 1px solid #d4a72c; padding: .8rem 1rem; border-radius: .4rem; }
.fail { color: #cf222e; font-weight: 700; } .ok { color: #116329; font-weight: 600; }
figure.chart { margin: 1rem 0; } figure.chart svg { max-width: 100%; height: auto; }
figcaption { color: #57606a; font-size: 90%; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _chart(name: str, svg: str | None, caption: str) -> str:
    if svg is None:
        return f'<p class="warn" data-missing-chart="{name}">{_esc(caption)}: not recorded in this manifest.</p>'
    return f'<figure class="chart" data-chart="{name}">{svg}<figcaption>{_esc(caption)}</figcaption></figure>'


def _verdict(manifest: dict[str, Any], found: list[ArtifactFacts]) -> str:
    file = facts.reference_file(manifest)
    failed = [a.name for a in found if not a.passed]
    trust = {
        "signed": f"Signed (key id <code>{_esc(manifest.get('signed_by'))}</code>): <code>{SIGNATURE_NAME}</code> signs "
                  "every file of the release, this page included; pull with <code>--trusted-key</code> to check it.",
        "unsigned": "<strong>Not signed</strong>: only the SHA-256 digests in the manifest vouch for the files.",
        "unpublished": "An unpublished build: a release is signed when it is published.",
    }[facts.signing_status(manifest)]
    checked = ("every file passed verification against upstream" if not failed
               else f'<span class="fail">verification FAILED for {_esc(", ".join(failed))}</span>')
    return (f'<div class="take"><p><strong>Take <code>{_esc(file)}</code></strong> unless a row below fits your '
            f"runtime better: it computes what upstream Mitra computes. {checked.capitalize()}.</p><p>{trust}</p></div>")


def _files(found: list[ArtifactFacts]) -> str:
    rows = []
    for a in found:
        status = '<span class="ok">passed</span>' if a.passed else '<span class="fail">FAILED</span>'
        speed = "-" if a.relative_cpu_time is None else f"{a.relative_cpu_time:.2f}x"
        rows.append([f'<code class="file">{_esc(a.file)}</code>', _esc(a.use_for), _esc(", ".join(a.runtimes) or "-"),
                     format_size(a.size), speed, status])
    return _table(["file", "for", "runtimes", "size", "CPU time vs fp32", "verification"], rows)


def _by_target(manifest: dict[str, Any]) -> str:
    items = "".join(f"<li>For {_esc(target)}: <code>{_esc(a.file)}</code> ({_esc(why)}; signal lost: max err/spread "
                    f"{format_number(a.metric('max_err_over_spread'), '.2g')})</li>"
                    for target, a, why in facts.recommendations(manifest))
    return f"<ul>{items}</ul>" if items else ""


def _bounds(found: list[ArtifactFacts]) -> str:
    rows = []
    for a in found:
        cells, failed = a.verification.get("cells"), a.verification.get("failed_cells") or 0
        row = [_esc(a.name), "-" if cells is None else f"{cells - failed}/{cells}"]
        for _, key, bound in facts.VERIFICATION_BOUNDS:
            value, limit = a.metric(key), a.bound(bound)
            text = format_number(value, ".2e")
            row.append(text if limit is None else f"{text} <small>(&le; {limit:g})</small>")
        rows.append(row)
    return _table(["artifact", "cells passed", *(label for label, _, _ in facts.VERIFICATION_BOUNDS)], rows)


def _changes(manifest: dict[str, Any], previous: dict[str, Any] | None) -> str:
    if previous is None:
        return "<p>The first release of this variant: nothing to compare with.</p>"
    diff = manifest_diff(previous, manifest)
    parts = [f"<p>Compared with {_esc(facts.release_label(previous))}.</p>"]
    changed = diff["source"] + diff["build"]
    parts.append(_table(["what", "before", "now"], [[_esc(c["what"]), f"<code>{_esc(c['from'])}</code>",
                                                    f"<code>{_esc(c['to'])}</code>"] for c in changed])
                 if changed else "<p>Same sources, toolchain and build configuration.</p>")
    parts.append(_table(["artifact", "change"], [[_esc(a["name"]), _esc(a["change"])] for a in diff["artifacts"]]))
    parts.append(_chart("changes", charts.metric_changes(diff), "Metrics before and after, per artifact"))
    parts.append(_table(["artifact", "metric", "before", "now", "delta"], [
        [_esc(m["artifact"]), _esc(m["metric"]), format_number(m["from"]), format_number(m["to"]),
         f"{'+' if m['delta'] >= 0 else ''}{format_number(m['delta'])}"] for m in diff["metrics"]]))
    return "\n".join(parts)


def _provenance(manifest: dict[str, Any]) -> str:
    source, build = manifest.get("source") or {}, manifest.get("build") or {}
    rows = [["source", _esc(facts.origin(manifest))]]
    rows += [[f"<code>{_esc(f.get('path'))}</code>", f"{f.get('size'):,} bytes, sha256 <code>{_esc(f.get('sha256'))}</code>"]
             for f in source.get("files") or []]
    rows += [["toolchain", _esc(", ".join(f"{k} {v}" for k, v in sorted((build.get("toolchain") or {}).items())))],
             ["ONNX opset", _esc(build.get("opset"))],
             ["config / code sha256", f"<code>{_esc(build.get('config_sha256'))}</code> / <code>{_esc(build.get('code_sha256'))}</code>"]]
    if manifest.get("reverts"):
        rows.append(["revert", _esc(f"serves the files of {manifest['reverts'].get('version')} again as a new release")])
    return _table(["", ""], rows)


def report_html(manifest: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    """The release's report page.

    Args:
        manifest: the release's manifest (a build folder's draft works too).
        previous: the manifest of the release before it, for "what changed" (None: the first).

    Returns:
        One HTML document with every plot inline.
    """
    found = facts.artifacts(manifest)
    banner = (f'<p class="banner" id="synthetic-banner">{_esc(facts.SYNTHETIC_WARNING)}</p>'
              if facts.is_synthetic(manifest) else "")
    body = "\n".join([
        f"<h1>{_esc(facts.release_label(manifest))}</h1>",
        f"<p>Mitra {'classifier' if facts.is_classifier(manifest) else 'regressor'} as ONNX, from "
        f"{_esc(facts.origin(manifest))}. How to run and pull it: <code>{MODEL_CARD_NAME}</code> beside this page.</p>",
        banner, _verdict(manifest, found),
        "<h2>Which file to take</h2>", _by_target(manifest), _files(found),
        "<h2>Distance from upstream</h2>",
        "<p>Every file was run on a matrix of shapes and compared with upstream AutoGluon Mitra on the same "
        "weights; each number is shown beside its bound, and the build fails past any bound.</p>",
        _bounds(found),
        _chart("heatmap", charts.tolerance_heatmap(found), "Share of the tolerance each matrix cell uses"),
        "<h2>Size, speed and signal</h2>",
        _chart("size-speed", charts.size_speed_signal(found), "Size against CPU time, coloured by the signal lost"),
        "<h2>Real tables</h2>",
        _chart("tasks", charts.task_checks(found), "Task checks on scikit-learn's bundled datasets"),
        "<h2>What changed</h2>", _changes(manifest, previous),
        "<h2>Provenance</h2>", _provenance(manifest),
    ])
    return static_page(facts.release_label(manifest), body, _STYLE)
