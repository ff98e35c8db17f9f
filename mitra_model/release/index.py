"""The bucket as a static site: `<prefix>/index.html` lists the variants, `<prefix>/<variant>/index.html`
every release of one variant, each linking to the release's report page.

Both are views of the release log, written again after every publish, revert and pointer refresh;
nothing pins them, so a stale or edited index misleads a reader but never a pull (which follows the
signed pointer and the release records). Plain HTML with relative links and inline style: they read
the same from the bucket over HTTP and from a copy on disk.
"""

from __future__ import annotations

import html
import logging

from mitra_model.errors import MitraBuildError
from mitra_model.release import layout
from mitra_model.release.client import ReleaseInfo, VariantInfo, list_releases, list_variants
from mitra_model.release.layout import INDEX_NAME, MANIFEST_NAME, REPORT_NAME
from mitra_model.release.writes import ConditionalWriter

logger = logging.getLogger(__name__)

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #1b1f24; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #d0d7de; }
th { background: #f6f8fa; } code { font-size: 90%; } .latest { background: #eef6ee; }
.flag { display: inline-block; padding: 0 .4rem; border-radius: .3rem; font-size: 85%; font-weight: 600; }
.synthetic { background: #ffd7d5; color: #82071e; } .signed { background: #dafbe1; color: #116329; }
.unsigned { background: #fff1c2; color: #7d4e00; } .revert { background: #ddf4ff; color: #0550ae; }
.banner { background: #82071e; color: #fff; padding: .8rem 1rem; font-weight: 700; border-radius: .4rem; }
"""


def static_page(title: str, body: str, style: str = _STYLE) -> str:
    """A whole HTML page that needs nothing beyond itself (the report page is one too).

    The empty inline icon keeps the browser from asking the bucket for /favicon.ico, which does
    not exist there: a 403 in the console of every page served from S3.
    """
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f"<style>{style}</style></head>\n<body>\n{body}\n</body></html>\n")


def _flag(css: str, text: str) -> str:
    return f'<span class="flag {css}">{html.escape(text)}</span>'


def variant_index_html(variant: str, releases: list[ReleaseInfo]) -> str:
    """The variant's page: every release, newest first, the one the pointer names marked latest.

    Args:
        variant: e.g. "mitra-classifier".
        releases: the release log (`client.list_releases`), any order.

    Returns:
        The HTML page; links are relative to `<prefix>/<variant>/`.
    """
    rows = []
    for r in sorted(releases, key=lambda r: r.manifest_version, reverse=True):
        esc = html.escape
        version = esc(r.version)
        target = REPORT_NAME if REPORT_NAME in r.documents else MANIFEST_NAME
        flags = [_flag("synthetic", "SYNTHETIC") if r.synthetic else "",
                 _flag("signed", "signed") if r.signed else _flag("unsigned", "unsigned"),
                 _flag("revert", "revert") if r.reverted else "",
                 _flag("signed", "latest") if r.latest else ""]
        rows.append(
            f'<tr class="{"latest" if r.latest else ""}"><td>{r.manifest_version}</td>'
            f'<td><a href="{version}/{target}">{version}</a></td><td>{esc(r.date[:19].replace("T", " "))}</td>'
            f"<td><code>{esc(r.source_revision[:12] or '-')}</code></td><td>{' '.join(f for f in flags if f)}</td>"
            f"<td>{len(r.artifacts)} files, {sum(a.size for a in r.artifacts) / 1e6:.1f} MB</td>"
            f"<td>{esc(r.problem or '')}</td></tr>")
    latest = next((r for r in releases if r.latest), None)
    banner = ""
    if latest is not None and latest.synthetic:
        banner = ('<p class="banner" id="synthetic-banner">SYNTHETIC: the latest release was built from random '
                  "weights, not a trained checkpoint. Do not use its predictions.</p>")
    body = (f"<h1>{html.escape(variant)}: releases</h1>\n{banner}\n"
            f'<p><a href="../{INDEX_NAME}">all variants</a> · newest first · a revert publishes an earlier '
            "release's files again as a new release</p>\n"
            "<table><thead><tr><th>#</th><th>version (report)</th><th>date (UTC)</th><th>source revision</th>"
            "<th>flags</th><th>artifacts</th><th>problem</th></tr></thead>\n<tbody>\n"
            + "\n".join(rows) + "\n</tbody></table>")
    return static_page(f"{variant} releases", body)


def bucket_index_html(where: str, variants: list[VariantInfo]) -> str:
    """The bucket's page: every variant with its release count, linking to the variant's page."""
    rows = "\n".join(f'<tr><td><a href="{html.escape(v.name)}/{INDEX_NAME}">{html.escape(v.name)}</a></td>'
                     f"<td>{v.releases}</td></tr>" for v in variants)
    body = (f"<h1>Mitra releases</h1>\n<p><code>{html.escape(where)}</code></p>\n"
            "<table><thead><tr><th>variant</th><th>releases</th></tr></thead>\n<tbody>\n"
            + rows + "\n</tbody></table>")
    return static_page("Mitra releases", body)


def write_indexes(s3: ConditionalWriter, variant: str) -> dict[str, str]:
    """Write the variant's page and the bucket's page again from the release log.

    Returns:
        {"variant": key, "bucket": key}.
    """
    store = s3.store
    base = f"s3://{store.bucket}/{store.prefix}".rstrip("/")
    keys = {"variant": layout.index_key(store.prefix, variant), "bucket": layout.index_key(store.prefix)}
    pages = {"variant": variant_index_html(variant, list_releases(f"{base}/{variant}", client=s3.client)),
             "bucket": bucket_index_html(base, list_variants(base, client=s3.client))}
    for which, key in keys.items():
        s3.put_view(key, pages[which].encode(), "text/html; charset=utf-8")
    return keys


def rewrite_indexes(s3: ConditionalWriter, variant: str) -> dict[str, str] | None:
    """`write_indexes` after a release moved, where a failure must not undo it: the release is out
    whatever happens to its pages, so a failure is logged (the next publish or refresh rewrites them)."""
    try:
        return write_indexes(s3, variant)
    except MitraBuildError as exc:
        logger.warning("%s is published, but its index pages were not rewritten (the next publish or pointer "
                       "refresh rewrites them): %s", variant, str(exc).splitlines()[0])
        return None
