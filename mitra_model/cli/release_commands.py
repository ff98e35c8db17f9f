"""The release commands: `ls` and `pull` (the consumer's, over `mitra_model.client`), and the
publisher's signing chores `keygen`, `revert` and `refresh-pointer`.

Light on purpose (no torch, onnx, numpy or build configuration): pulling by URL works in the slim
install. Errors are MitraBuildErrors (signature refusals included), which `cli.main` prints as one
paragraph with exit code 2.

Trusted keys of `pull`, first found wins: `--trusted-key` (repeatable), else $MITRA_TRUSTED_KEYS
(PEM files separated by os.pathsep), else `[signing] trusted_keys` of the configuration file in use
(--config, $MITRA_BUILD_CONFIG, or ./config/mitra-build.toml when it exists; never the packaged
default, which names none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from mitra_model.errors import MitraBuildError, SigningKeyError
from mitra_model.release.layout import SIGNATURE_NAME
from mitra_model.release.rules import LATEST

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
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.release.client import is_variant_url, list_releases, list_variants, parse_release_url
    from mitra_model.release.store import make_s3_client

    parsed = parse_release_url(args.url, variant_required=False)
    client = make_s3_client(parsed.store(args.endpoint_url))
    if is_variant_url(args.url, endpoint_url=args.endpoint_url, client=client):
        releases = list_releases(args.url, endpoint_url=args.endpoint_url, client=client)
        if args.json:
            _emit_json({"url": args.url, "variant": parsed.variant, "releases": [r.to_json() for r in releases]})
            return 0
        rows = [("#", "VERSION", "DATE (UTC)", "SOURCE", "SIGNED", "FLAGS", "FILES")]
        for r in releases:
            flags = " ".join(f for f in ("latest" if r.latest else "", "SYNTHETIC" if r.synthetic else "",
                                         "revert" if r.reverted else "") if f)
            files = ", ".join(f"{a.name}={a.file} ({_size(a.size)})" for a in r.artifacts)
            problem = f"  PROBLEM: {r.problem}" if r.problem else ""
            rows.append((str(r.manifest_version), r.version, r.date[:19].replace("T", " "), r.source_revision[:12] or "-",
                         "yes" if r.signed else "no", flags or "-", files + problem))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
        return 0
    variants = list_variants(args.url, endpoint_url=args.endpoint_url, client=client)
    if args.json:
        _emit_json({"url": args.url, "variants": [{"name": v.name, "releases": v.releases} for v in variants]})
        return 0
    if not variants:
        _say(f"no variant with a release under {args.url}")
    if variants:
        width = max(len("VARIANT"), *(len(v.name) for v in variants))
        print(f"{'VARIANT'.ljust(width)}  RELEASES")
    for v in variants:
        print(f"{v.name.ljust(width)}  {v.releases}")
    return 0


def _legacy_store(args: argparse.Namespace):  # noqa: ANN202 - StoreConfig
    """[store] from the build configuration, for the old `--variant/--version` form (and the
    publisher's commands); `--endpoint-url`, when given, replaces its endpoint."""
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.build.config import config_path as default_config_path
    from mitra_model.build.config import load_config

    config = load_config(args.config)
    if config.store is None:
        raise MitraBuildError(f"no [store] section in {args.config or default_config_path()}: nothing to talk to")
    if getattr(args, "endpoint_url", None):
        return config.store.model_copy(update={"endpoint_url": args.endpoint_url})
    return config.store


def _config_in_use(args: argparse.Namespace):  # noqa: ANN202 - BuildConfig | None
    """The configuration file the user chose, or None: --config, $MITRA_BUILD_CONFIG or
    ./config/mitra-build.toml when that file exists; never the packaged default."""
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.build.config import DEFAULT_CONFIG_PATH, config_path, load_config

    if args.config is not None:
        return load_config(args.config)
    path = config_path()
    if path == DEFAULT_CONFIG_PATH or not os.path.exists(str(path)):
        return None  # a pull by URL needs no configuration, and a missing one is not an error here
    return load_config(Path(str(path)))


def trusted_keys(args: argparse.Namespace) -> tuple[bytes, ...]:
    """The public keys `pull` verifies with: --trusted-key, else $MITRA_TRUSTED_KEYS, else the
    configuration's [signing] trusted_keys (first source that names any wins; empty: no checks).

    Raises:
        SigningKeyError: a named key file is unreadable or not a P-256 public key.
        ConfigError: the configuration file in use is invalid.
    """
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.release.keys import load_trusted_keys, trusted_key_paths_from_env

    paths: tuple[Path, ...] = tuple(args.trusted_key or ()) or trusted_key_paths_from_env()
    if not paths:
        config = _config_in_use(args)
        paths = config.signing.trusted_keys if config is not None else ()
    return load_trusted_keys(paths)


def signature_demanded(args: argparse.Namespace) -> bool:
    """--require-signature, $MITRA_REQUIRE_SIGNATURE=1, or [signing] require_signature of the file in use."""
    # deferred: a command loads only what it runs
    from mitra_model.release.keys import signature_required

    if args.require_signature or signature_required():
        return True
    config = _config_in_use(args)
    return bool(config is not None and config.signing.require_signature)


def cmd_pull(args: argparse.Namespace) -> int:
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.release.client import offline_mode, parse_release_url, pull_or_use_copy, unchecked_signature_notice
    from mitra_model.release.store import make_s3_client

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
        variant, version = args.variant, args.version or LATEST
    else:
        raise MitraBuildError(f"name the release to pull: mitra-build pull {URL_HELP} --dest DIR")
    keys = trusted_keys(args)
    offline = args.offline or offline_mode()
    result, stale = pull_or_use_copy(
        variant, version, Path(args.dest), store=store, client=None if offline else make_s3_client(store),
        progress=not (args.quiet or args.json), artifacts=args.artifact, refuse_synthetic=args.refuse_synthetic,
        trusted_keys=keys, require_signature=signature_demanded(args), offline=offline,
        verify=args.verify,
    )
    if stale is not None:
        _say(f"warning: {stale}")
    if result.synthetic:
        _say(synthetic_banner(variant, result.version))
    if result.signed and not result.signature_checked:
        _say(f"notice: {unchecked_signature_notice(variant, result.version)}")
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
            "verified": True,  # every file's size and sha256 against the manifest the pointer pins
            "signed": result.signed,
            "signature_checked": result.signature_checked,
            "signed_by": result.signed_by,
        })
        return 0
    if result.downloaded_bytes:
        what = f"downloaded {_size(result.downloaded_bytes)}; every file's size and sha256 verified"
    else:  # nothing re-hashed: say what was checked
        where = "store not contacted; " if offline else "store unreachable; " if stale is not None else ""
        checked = ("every file re-hashed: its sha256 matches" if args.verify else
                   "every file has the size and mtime it had when its sha256 was verified (--verify re-hashes)")
        what = f"{'the copy verified earlier' if where else 'already up to date'}: {where}{checked}"
    marker = "  [SYNTHETIC: random weights]" if result.synthetic else ""
    print(f"pulled {variant} {result.version} (manifest_version {result.manifest_version}) into {args.dest} "
          f"({what}){marker}")
    for name, path in sorted(result.files.items()):
        print(f"  {name}: {path}")
    print(f"  manifest: {result.manifest_path} (sha256 {result.manifest_sha256})")
    if result.signed_by is not None:
        print(f"  signature: {Path(args.dest) / SIGNATURE_NAME} (release signature and signed pointer "
              f"verified, key id {result.signed_by[:16]}...)")
    return 0


def cmd_check_release(args: argparse.Namespace) -> int:
    # deferred: a command loads only what it runs
    from mitra_model.release.client import unchecked_signature_notice
    from mitra_model.release.pull import require_trusted_keys
    from mitra_model.release.recheck import check_release_folder

    keys = trusted_keys(args)
    if signature_demanded(args):
        require_trusted_keys(str(args.dest), keys)
    found = check_release_folder(args.dest, trusted_keys=keys)
    if found.synthetic:
        _say(synthetic_banner(found.variant, found.version))
    if found.signed and found.signed_by is None:
        _say(f"notice: {unchecked_signature_notice(found.variant, found.version)}")
    if args.json:
        _emit_json({"dest": str(args.dest), "variant": found.variant, "version": found.version,
                    "checked": list(found.present), "missing": list(found.missing), "synthetic": found.synthetic,
                    "signed": found.signed, "signature_checked": found.signed_by is not None,
                    "signed_by": found.signed_by})
        return 0
    print(f"{args.dest}: {found.variant} {found.version}: {', '.join(found.present)} re-hashed, each matches the "
          f"manifest's sha256" + (f"; not pulled: {', '.join(found.missing)}" if found.missing else ""))
    if found.signed_by is not None:
        print(f"  signature: {SIGNATURE_NAME} verified (key id {found.signed_by[:16]}...), it signs the manifest "
              "and every file checked")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.release.keys import SIGNING_KEY_PASSWORD_ENV, generate_keypair

    password = os.environ.get(SIGNING_KEY_PASSWORD_ENV) or None
    key_id = generate_keypair(args.private, args.public, password=password.encode("utf-8") if password else None)
    protected = f"encrypted with ${SIGNING_KEY_PASSWORD_ENV}" if password else "not encrypted"
    # Paths and the public key's id only: the private key's bytes are never printed.
    print(f"public key: {args.public} (key id {key_id})")
    print(f"private key: written, mode 0600, {protected}; keep it secret and out of the configuration")
    print(f"publishers: export MITRA_SIGNING_KEY_FILE=<the private key>; consumers: "
          f"mitra-build pull URL --dest DIR --trusted-key {args.public}")
    return 0


def _signer(args: argparse.Namespace, *, required: bool):  # noqa: ANN202 - Signer | None
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.release.keys import SIGNING_KEY_ENV, SIGNING_KEY_FILE_ENV, signer_from_environment

    signer = signer_from_environment(args.signing_key)
    if signer is None and required:
        raise SigningKeyError(
            f"`mitra-build {args.command}` signs, and no signing key was given: pass --signing-key "
            f"PRIVATE.pem, or set {SIGNING_KEY_FILE_ENV} (a path) or {SIGNING_KEY_ENV} (the PEM)."
        )
    return signer


def _pointer_ttl(args: argparse.Namespace) -> timedelta:
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.build.config import load_config

    return timedelta(days=load_config(args.config).signing.pointer_ttl_days)


def document_renderer() -> Any:
    """`mitra_model.report.release_documents`, or an error naming the extra that provides it."""
    try:
        # deferred: matplotlib is the [report] extra's; the release commands run without it
        from mitra_model.report import release_documents
    except ImportError as exc:
        raise MitraBuildError(
            f"Rendering a release's model card and report needs the [report] extra ({exc.name} is missing): "
            "pip install 'mitra-build[report]'") from None
    return release_documents


def cmd_revert(args: argparse.Namespace) -> int:
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.release.maintenance import revert_release
    from mitra_model.release.store import make_s3_client

    store = _legacy_store(args)
    signer = _signer(args, required=False)
    if signer is None:
        _say("note: no signing key (--signing-key, MITRA_SIGNING_KEY_FILE or MITRA_SIGNING_KEY): the revert "
             "is published UNSIGNED, and consumers that trust a key will refuse it")
    result = revert_release(make_s3_client(store), store, args.variant, args.to, signer, _pointer_ttl(args),
                            document_renderer())
    signed = f", signed by key id {signer.key_id[:16]}..." if signer is not None else ", unsigned"
    if result.already_published:
        print(f"{args.variant} already serves the artifacts of {args.to}: release {result.version} "
              f"(manifest_version {result.manifest_version}); nothing new was published")
    else:
        print(f"reverted {args.variant} to the artifacts of {args.to}: new release {result.version} "
              f"(manifest_version {result.manifest_version}){signed}")
    print(f"  pointer: {store.url(result.pointer_key)}")
    return 0


def cmd_refresh_pointer(args: argparse.Namespace) -> int:
    # deferred: a command loads only what it runs (boto3 alone costs 0.3 s of start-up)
    from mitra_model.release.maintenance import refresh_pointer
    from mitra_model.release.store import make_s3_client

    store = _legacy_store(args)
    signer = _signer(args, required=True)
    result = refresh_pointer(make_s3_client(store), store, args.variant, signer, _pointer_ttl(args))
    print(f"re-signed {store.url(result.pointer_key)}: {result.variant} {result.version} "
          f"(manifest_version {result.manifest_version}) until {result.expires}")
    return 0


def _add_signature_options(parser: argparse.ArgumentParser) -> None:
    """--trusted-key and --require-signature, the same for every command that reads a release."""
    parser.add_argument("--trusted-key", action="append", type=Path, default=None, metavar="PUB",
                        help="accept only a release signed by this public key (PEM; repeatable: any one of "
                             "them). Default: $MITRA_TRUSTED_KEYS, else [signing] trusted_keys of the "
                             "configuration file in use; none: the signature is not checked (a signed "
                             "release then gets a notice)")
    parser.add_argument("--require-signature", action="store_true",
                        help="refuse any release whose signature is not checked against a trusted key "
                             "(default: $MITRA_REQUIRE_SIGNATURE=1, or [signing] require_signature)")


def add_release_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `ls`, `pull`, `keygen`, `revert` and `refresh-pointer` to the `mitra-build` subcommands.

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
                    "no-op. No configuration file is needed with a URL. With trusted keys "
                    "(--trusted-key, $MITRA_TRUSTED_KEYS or [signing] trusted_keys), only a release "
                    "signed by one of them is accepted: the pointer's signature and expiry, rollback, "
                    "and every file against the release signature are checked before anything is "
                    "used, and DEST gets the signature as release.sig (a complete pull then verifies "
                    "with `model_signing verify key`). Refusals exit 2 and leave DEST as it was.",
        epilog="examples:\n  mitra-build pull s3://mitra-build/releases/mitra-classifier@latest --dest ./mitra "
               "--endpoint-url http://127.0.0.1:8333\n"
               "  mitra-build pull s3://mitra-build/releases/mitra-classifier --dest ./mitra --artifact int8 --json\n"
               "  mitra-build pull s3://mitra-build/releases/mitra-classifier --dest ./mitra --trusted-key release-signing.pub\n"
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
    pull.add_argument("--verify", action="store_true",
                      help="re-hash the files DEST already holds (a no-op pull otherwise trusts each file's "
                           "recorded size and mtime); a file that changed is downloaded again")
    pull.add_argument("--offline", action="store_true",
                      help="use the copy DEST last verified, never the store (default: $MITRA_OFFLINE=1); "
                           "online, a store that cannot be reached falls back to it with a warning")
    _add_signature_options(pull)
    pull.set_defaults(func=cmd_pull)

    check = sub.add_parser(
        "check-release", parents=[common], formatter_class=formatter,
        help="re-check a pulled folder offline: every file's sha256, and its signature",
        description="Re-hash every artifact a pulled folder (DEST of `mitra-build pull`) holds against its "
                    "manifest and, with a trusted key, check the manifest and those files against the "
                    "release signature. No network; a partial pull (--artifact) is fine: the artifacts "
                    "it lacks are listed, not failed. Exit 2 on any mismatch.",
        epilog="examples:\n  mitra-build check-release ./mitra --trusted-key release-signing.pub\n"
               "  mitra-build check-release ./mitra --json",
    )
    check.add_argument("dest", type=Path, help="the pulled folder")
    _add_signature_options(check)
    check.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    check.set_defaults(func=cmd_check_release)

    keygen = sub.add_parser(
        "keygen", parents=[common], formatter_class=formatter,
        help="create a release signing key pair (ECDSA P-256 PEM files)",
        description="Write a new P-256 key pair: PRIVATE (mode 0600; encrypted when "
                    "$MITRA_SIGNING_KEY_PASSWORD is set; never overwritten) for the publisher, and "
                    "PUBLIC for consumers (--trusted-key). Prints the public key's id and path, never "
                    "the private key.",
        epilog="examples:\n  mitra-build keygen release-signing.pem release-signing.pub",
    )
    keygen.add_argument("private", type=Path, help="where the private key goes (must not exist)")
    keygen.add_argument("public", type=Path, help="where the public key goes, e.g. release-signing.pub")
    keygen.set_defaults(func=cmd_keygen)

    key_help = ("the private signing key (PEM; default: $MITRA_SIGNING_KEY_FILE, else the PEM in "
                "$MITRA_SIGNING_KEY; password in $MITRA_SIGNING_KEY_PASSWORD)")
    revert = sub.add_parser(
        "revert", parents=[common], formatter_class=formatter,
        help="make an earlier release's artifacts the latest again, as a new signed release",
        description="Publish a NEW release (manifest_version N+1, version <VERSION>.revert-<N>) whose "
                    "manifest names the artifacts of --to VERSION where they are stored, signed like any "
                    "release, and move the pointer to it: consumers move forward to it (they refuse "
                    "to go back). Store from the configuration's [store]; the pointer's validity from "
                    "[signing] pointer_ttl_days. Re-running the same revert is a no-op.",
        epilog="examples:\n  mitra-build revert --variant mitra-classifier --to r-0123456789abcdef\n"
               "  mitra-build revert --variant mitra-classifier --to r-0123456789abcdef --signing-key release-signing.pem",
    )
    revert.add_argument("--variant", required=True, help="the variant to revert, e.g. mitra-classifier")
    revert.add_argument("--to", required=True, metavar="VERSION", help="the released version whose artifacts come back")
    revert.add_argument("--signing-key", type=Path, default=None, metavar="PATH", help=key_help)
    revert.add_argument("--endpoint-url", default=None, help="S3 endpoint instead of [store] endpoint_url")
    revert.set_defaults(func=cmd_revert)

    refresh = sub.add_parser(
        "refresh-pointer", parents=[common], formatter_class=formatter,
        help="re-sign a variant's latest.json with a fresh expiry (the scheduled chore)",
        description="Re-sign the variant's pointer with expires = now + [signing] pointer_ttl_days, naming "
                    "the same release (or the newest release record, if a publish stopped before moving "
                    "the pointer). Consumers that trust a key refuse an expired pointer, so run this "
                    "well within the validity. Store from the configuration's [store].",
        epilog="examples:\n  mitra-build refresh-pointer --variant mitra-classifier\n"
               "  mitra-build refresh-pointer --variant mitra-classifier --signing-key release-signing.pem",
    )
    refresh.add_argument("--variant", required=True, help="the variant whose pointer to re-sign")
    refresh.add_argument("--signing-key", type=Path, default=None, metavar="PATH", help=key_help)
    refresh.add_argument("--endpoint-url", default=None, help="S3 endpoint instead of [store] endpoint_url")
    refresh.set_defaults(func=cmd_refresh_pointer)
