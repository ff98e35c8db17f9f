"""`mitra-build ls` and `mitra-build pull`: the consumer's commands, over `mitra_model.client`.

Light on purpose (no torch, onnx, numpy or build configuration): pulling by URL works in the slim
install. Errors are MitraBuildErrors, which `cli.main` prints as one paragraph with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import MitraBuildError
from .release import LATEST

URL_HELP = "s3://BUCKET/PREFIX/VARIANT[@VERSION|@latest] (no version: latest)"
ENDPOINT_HELP = "S3 endpoint, e.g. http://127.0.0.1:8333 (default: AWS, or $AWS_ENDPOINT_URL)"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def synthetic_banner(variant: str, version: str) -> str:
    """The stderr banner of a SYNTHETIC release (random weights)."""
    line = "!" * 78
    return (f"{line}\n!! SYNTHETIC release: {variant} {version} has RANDOM weights, not a trained checkpoint.\n"
            f"!! Its predictions mean nothing. Use --refuse-synthetic to refuse such releases.\n{line}")


def cmd_ls(args: argparse.Namespace) -> int:
    from .client import is_variant_url, list_releases, list_variants, parse_release_url
    from .store import make_s3_client

    parsed = parse_release_url(args.url, variant_required=False)
    client = make_s3_client(parsed.store(args.endpoint_url))
    if is_variant_url(args.url, endpoint_url=args.endpoint_url, client=client):
        releases = list_releases(args.url, endpoint_url=args.endpoint_url, client=client)
        if args.json:
            _emit_json({"url": args.url, "variant": parsed.variant, "releases": [r.to_json() for r in releases]})
            return 0
        for r in releases:
            flags = " ".join(f for f in ("latest" if r.latest else "", "SYNTHETIC" if r.synthetic else "") if f)
            files = ", ".join(f"{a.name}={a.file} ({_size(a.size)})" for a in r.artifacts)
            problem = f"  PROBLEM: {r.problem}" if r.problem else ""
            print(f"{r.manifest_version:>4}  {r.version}  {r.date}  {flags or '-'}  {files}{problem}")
        return 0
    variants = list_variants(args.url, endpoint_url=args.endpoint_url, client=client)
    if args.json:
        _emit_json({"url": args.url, "variants": [{"name": v.name, "releases": v.releases} for v in variants]})
        return 0
    if not variants:
        _say(f"no variant with a release under {args.url}")
    for v in variants:
        print(f"{v.name}\t{v.releases} release{'s' if v.releases != 1 else ''}")
    return 0


def _legacy_store(args: argparse.Namespace):  # noqa: ANN202 - StoreConfig
    """[store] from the build configuration, for the old `--variant/--version` form."""
    from .config import config_path as default_config_path
    from .config import load_config

    config = load_config(args.config)
    if config.store is None:
        raise MitraBuildError(f"no [store] section in {args.config or default_config_path()}: nothing to talk to")
    return config.store


def cmd_pull(args: argparse.Namespace) -> int:
    from .client import parse_release_url
    from .pull import pull_release
    from .store import make_s3_client

    if args.url and args.variant:
        raise MitraBuildError("give either a release URL or --variant (with [store] from the configuration), not both")
    if args.url:
        parsed = parse_release_url(args.url)
        store = parsed.store(args.endpoint_url)
        variant, version = parsed.variant or "", parsed.version
        if args.version is not None:
            raise MitraBuildError(f"the version goes into the URL ({args.url}@VERSION), not --version")
    elif args.variant:
        store = _legacy_store(args)
        if args.endpoint_url:
            store = store.model_copy(update={"endpoint_url": args.endpoint_url})
        variant, version = args.variant, args.version or LATEST
    else:
        raise MitraBuildError(f"name the release to pull: mitra-build pull {URL_HELP} --dest DIR")
    result = pull_release(
        variant, version=version, dest=args.dest, client=make_s3_client(store), store=store,
        progress=not (args.quiet or args.json), artifacts=args.artifact, refuse_synthetic=args.refuse_synthetic,
    )
    if result.synthetic:
        _say(synthetic_banner(variant, result.version))
    if args.json:
        _emit_json({
            "variant": variant,
            "version": result.version,
            "manifest_version": result.manifest_version,
            "manifest_sha256": result.manifest_sha256,
            "synthetic": result.synthetic,
            "dest": str(args.dest),
            "manifest": str(result.manifest_path),
            "files": {name: str(path) for name, path in sorted(result.files.items())},
            "downloaded_bytes": result.downloaded_bytes,
            "verified": True,
        })
        return 0
    what = "already up to date" if result.downloaded_bytes == 0 else f"downloaded {_size(result.downloaded_bytes)}"
    marker = "  [SYNTHETIC: random weights]" if result.synthetic else ""
    print(f"pulled {variant} {result.version} (manifest_version {result.manifest_version}) into {args.dest} "
          f"({what}); every file's size and sha256 verified{marker}")
    for name, path in sorted(result.files.items()):
        print(f"  {name}: {path}")
    print(f"  manifest: {result.manifest_path} (sha256 {result.manifest_sha256})")
    return 0


def add_release_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `ls` and `pull` to the `mitra-build` subcommands.

    Args:
        sub: the parser's subparsers action.
        common: the parent parser with the options every subcommand accepts (`--config`).
    """
    formatter = argparse.RawDescriptionHelpFormatter
    ls = sub.add_parser(
        "ls", parents=[common], formatter_class=formatter,
        help="list the variants under a bucket/prefix, or one variant's releases",
        description="List variants (one line each) under s3://BUCKET/PREFIX, or the releases of "
                    "s3://BUCKET/PREFIX/VARIANT from its release log (_releases/): manifest_version, "
                    "version, date, flags (latest, SYNTHETIC), artifacts and sizes.",
        epilog="examples:\n  mitra-build ls s3://mitra-build/releases --endpoint-url http://127.0.0.1:8333\n"
               "  mitra-build ls s3://mitra-build/releases/mitra-classifier --json",
    )
    ls.add_argument("url", help="s3://BUCKET/PREFIX (variants) or s3://BUCKET/PREFIX/VARIANT (releases)")
    ls.add_argument("--endpoint-url", default=None, help=ENDPOINT_HELP)
    ls.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    ls.set_defaults(func=cmd_ls)

    pull = sub.add_parser(
        "pull", parents=[common], formatter_class=formatter,
        help="download a published release, verify every byte, switch DEST to it atomically",
        description="Pull a release into DEST: the manifest (pinned by the pointer or release record) "
                    "and the selected artifacts, each checked for size and sha256. DEST becomes a "
                    "symlink switched in one step, so it always holds one complete release; "
                    "bookkeeping lives beside it in .DEST.mitra/. Re-pulling what DEST holds is a "
                    "no-op. No configuration file is needed with a URL.",
        epilog="examples:\n  mitra-build pull s3://mitra-build/releases/mitra-classifier@latest --dest ./mitra "
               "--endpoint-url http://127.0.0.1:8333\n"
               "  mitra-build pull s3://mitra-build/releases/mitra-classifier --dest ./mitra --artifact int8 --json\n"
               "  mitra-build pull --variant mitra-classifier --version latest --dest ./mitra   # [store] of the config",
    )
    pull.add_argument("url", nargs="?", default=None, help=URL_HELP)
    pull.add_argument("--dest", type=Path, required=True, help="the folder consumers read (becomes a symlink)")
    pull.add_argument("--artifact", action="append", default=None, metavar="NAME",
                      help="artifact to pull, e.g. int8 (repeatable; default: all)")
    pull.add_argument("--endpoint-url", default=None, help=ENDPOINT_HELP)
    pull.add_argument("--refuse-synthetic", action="store_true",
                      help="refuse a SYNTHETIC release (random weights) before downloading anything")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    pull.add_argument("--json", action="store_true", help="print one JSON document on stdout (no progress bar)")
    pull.add_argument("--variant", default=None, help="instead of a URL: a variant of the configuration's [store]")
    pull.add_argument("--version", default=None, help="with --variant: 'latest' (default) or a version id")
    pull.set_defaults(func=cmd_pull)
