"""`mitra-build report` (a release's report page, from a build folder or the store) and
`mitra-build diff` (what changed between two releases).

`diff` reads manifests only and works in the slim install; `report` draws plots and needs the
`[report]` extra, which it names when it is missing.
"""

from __future__ import annotations

import argparse
import json
import webbrowser
from pathlib import Path
from typing import Any

from mitra_model.cli.release_commands import ENDPOINT_HELP, URL_HELP, document_renderer
from mitra_model.errors import MitraBuildError, OutputError
from mitra_model.fileutil import write_bytes_atomic
from mitra_model.release.layout import MANIFEST_NAME, REPORT_NAME


def _manifests(source: str, endpoint_url: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(manifest, previous) of a build folder (no previous: it is not released) or a published release."""
    if source.startswith("s3://"):
        # deferred: boto3 costs 0.3 s of start-up, and a build folder needs none of it
        from mitra_model.release.client import read_release_manifest

        return read_release_manifest(source, endpoint_url=endpoint_url)
    path = Path(source) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        raise MitraBuildError(f"{source} is neither s3://... nor a build folder: {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MitraBuildError(f"{path} is not a manifest: {exc}") from None


def cmd_report(args: argparse.Namespace) -> int:
    render = document_renderer()
    manifest, previous = _manifests(args.source, args.endpoint_url)
    where = args.source.split("@", 1)[0] if args.source.startswith("s3://") else "s3://BUCKET/PREFIX/" + str(manifest.get("variant"))
    documents = render(manifest, previous, where)
    out = args.out or Path(f"report-{manifest.get('variant')}-{manifest.get('version')}.html")
    try:
        write_bytes_atomic(out, documents[REPORT_NAME])
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(out.resolve())
    if args.open:
        webbrowser.open(out.resolve().as_uri())
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    # deferred: boto3 costs 0.3 s of start-up
    from mitra_model.release.client import read_release_manifest
    from mitra_model.release.diff import diff_text, manifest_diff

    old, _ = read_release_manifest(args.old, endpoint_url=args.endpoint_url)
    new, _ = read_release_manifest(args.new, endpoint_url=args.endpoint_url)
    if old.get("variant") != new.get("variant"):
        raise MitraBuildError(f"{args.old} and {args.new} are releases of different variants "
                              f"({old.get('variant')} and {new.get('variant')}): diff compares releases of one variant")
    diff = manifest_diff(old, new)
    print(json.dumps(diff, indent=2) if args.json else diff_text(diff), end="\n" if args.json else "")
    return 0


def add_report_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `report` and `diff` to the `mitra-build` subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    report = sub.add_parser(
        "report", parents=[common], formatter_class=formatter,
        help="write a release's report page (plots of its verification) and print its path",
        description="Write the report page of a build folder or a published release: one self-contained "
                    "HTML file (plots inline, no network) with which file to take, each file's distance from "
                    "upstream beside its bounds, size and speed, the real-table checks and, for a published "
                    "release, what changed since the release before. Published releases carry the same page "
                    "as report.html. Needs the [report] extra.",
        epilog="examples:\n  mitra-build report artifacts/builds/mitra-classifier/v-0123456789abcdef --open\n"
               "  mitra-build report s3://mitra-build/releases/mitra-classifier@latest --endpoint-url http://127.0.0.1:8333",
    )
    report.add_argument("source", help="a build folder, or " + URL_HELP)
    report.add_argument("--out", type=Path, default=None,
                        help="where to write it (default: ./report-VARIANT-VERSION.html)")
    report.add_argument("--open", action="store_true", help="open it in the default browser")
    report.add_argument("--endpoint-url", default=None, help=ENDPOINT_HELP)
    report.set_defaults(func=cmd_report)

    diff = sub.add_parser(
        "diff", parents=[common], formatter_class=formatter,
        help="what changed between two published releases of a variant",
        description="Compare two releases' manifests: source digests and revision, toolchain and build "
                    "configuration, which artifacts were added, removed or rebuilt, and every number both "
                    "record (size, CPU time, errors, signal kept) with its delta.",
        epilog="example:\n  mitra-build diff s3://mitra-build/releases/mitra-classifier@V1 "
               "s3://mitra-build/releases/mitra-classifier@V2 --json",
    )
    diff.add_argument("old", help=URL_HELP)
    diff.add_argument("new", help=URL_HELP)
    diff.add_argument("--endpoint-url", default=None, help=ENDPOINT_HELP)
    diff.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    diff.set_defaults(func=cmd_diff)
