"""`mitra-build`: a thin command line over the library. Library errors become one-paragraph
messages on stderr (no traceback) and a non-zero exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import signal
import sys
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from mitra_model import __version__
from mitra_model.build import recipes
from mitra_model.cli.local_s3 import DEFAULT_S3_PORT, GRPC_OFFSET, MAX_S3_PORT
from mitra_model.errors import MitraBuildError, ToolMissingError, VerificationError, error_code
from mitra_model.fileutil import refuse_overwriting_inputs

EXIT_ERROR = 2  # bad input or a failed stage
EXIT_VERIFICATION_FAILED = 1

DISTRIBUTION = "mitra-build"
# The optional-dependency groups of pyproject.toml each command needs; the base install (pull, ls)
# needs none. Which distributions an extra holds is read from the installed metadata, not retyped here.
COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "synth": ("build",),
    "export": ("build",),
    "quantize": ("build",),
    "check": ("build",),
    "verify": ("build",),
    "run": ("build", "flow"),
    "local-s3": ("flow",),
    "revert": ("signing",),  # signs the new release's folder with model_signing
}
TOOLCHAIN = ("torch", "onnx", "onnxruntime", "prefect", "boto3")  # what `--version` reports
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def missing_from_extra(extra: str) -> list[str]:
    """The distributions of mitra-build's `extra` that are not installed (per the installed metadata).

    Returns:
        Their names, in pyproject.toml's order; empty when all are there, or when mitra-build itself
        is not installed (a source tree on PYTHONPATH has no metadata to read: nothing is claimed).
    """
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        marker = _EXTRA_MARKER.search(requirement)
        name = _REQUIREMENT_NAME.match(requirement)
        if marker and name and marker.group(1) == extra and _installed(name.group(0)) is None:
            missing.append(name.group(0))
    return missing


def require_extras(command: str) -> None:
    """Refuse a command whose optional dependencies are not installed, naming the extra to install.

    Checked at the CLI boundary before the command runs, so a consumer's slim install gets one
    paragraph instead of a ModuleNotFoundError traceback from deep inside the library.

    Raises:
        ToolMissingError: an extra the command needs is incomplete (exit 2).
    """
    for extra in COMMAND_EXTRAS.get(command, ()):
        if missing := missing_from_extra(extra):
            raise ToolMissingError(
                f"`mitra-build {command}` needs the [{extra}] extra, and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'mitra-build[{extra}]' "
                f"(in a checkout, ./scripts/setup.sh installs every extra). The base install only pulls and "
                f"checks releases."
            )


def version_report() -> str:
    """`mitra-build --version`: this package, then the toolchain as installed (extras may be missing)."""
    lines = [f"mitra-build {__version__}"]
    lines += [f"  {name} {_installed(name) or 'not installed'}" for name in TOOLCHAIN]
    lines.append(f"  python {platform.python_version()} ({sys.executable})")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """Like action="version", but the toolchain is looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:  # noqa: A002
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_report())
        parser.exit()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_synth(args: argparse.Namespace) -> int:
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    from mitra_model.build.config import load_config
    from mitra_model.model.snapshot import WEIGHTS_FILE, write_synthetic_snapshot

    config = load_config(args.config)
    if args.size not in config.sizes:
        raise MitraBuildError(f"--size {args.size!r} is not defined in the configuration (have: {', '.join(config.sizes)})")
    snapshot = write_synthetic_snapshot(
        args.output, task=args.task, size_name=args.size, size=config.sizes[args.size], seed=args.seed
    )
    weights = snapshot.digest(WEIGHTS_FILE)
    print(f"wrote SYNTHETIC {args.size} {args.task} snapshot (random weights, seed {args.seed}) to {snapshot.path}")
    print(f"model.safetensors: {weights.size} bytes, sha256 {weights.sha256}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    from mitra_model.build.check import check_onnx
    from mitra_model.build.config import load_config
    from mitra_model.build.export import export_onnx
    from mitra_model.model.snapshot import load_model

    config = load_config(args.config)
    refuse_overwriting_inputs(args.output, folders=[args.snapshot])
    model, snapshot = load_model(args.snapshot)
    if snapshot.synthetic:
        _say(f"note: {snapshot.path} is a SYNTHETIC snapshot (random weights); the ONNX file says so in its metadata")
    _say(f"exporting {snapshot.path} (dim {model.config.dim}, {model.config.n_layers} layers) ...")
    result = export_onnx(
        model, args.output, opset=config.export.opset, trace_shape=config.export.trace_shape,
        metadata=snapshot.onnx_metadata(), flavour=args.flavour,
    )
    try:
        checked = check_onnx(result.path, config=model.config)
    except MitraBuildError:
        result.path.unlink(missing_ok=True)  # a file that fails the gate is not an export
        raise
    print(f"wrote {result.path} ({result.size} bytes, opset {result.opset}, {checked.n_nodes} nodes) in {result.seconds:.1f} s")
    print(f"sha256 {result.sha256}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    from mitra_model.build.check import check_onnx, read_identity, require_exported_from
    from mitra_model.model.snapshot import WEIGHTS_FILE, read_snapshot

    snapshot = read_snapshot(args.snapshot)
    require_exported_from(args.onnx, read_identity(args.onnx), snapshot.digest(WEIGHTS_FILE).sha256, snapshot.path)
    result = check_onnx(args.onnx, config=snapshot.config)
    print(f"{result.path}: onnx.checker (full) and strict shape inference passed; opset {result.opset}, {result.n_nodes} nodes")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    from mitra_model.build.check import read_identity, require_exported_from
    from mitra_model.build.config import load_config
    from mitra_model.build.verify import TaskResult, require_passed, verify_onnx, write_report
    from mitra_model.model.snapshot import WEIGHTS_FILE, load_model, read_snapshot

    config = load_config(args.config)
    identity = read_identity(args.onnx)  # a non-ONNX file is one paragraph here, not an ORT traceback
    precision = args.precision or identity.precision
    tolerance = config.verification.tolerance(precision)
    snapshot = read_snapshot(args.snapshot)
    require_exported_from(args.onnx, identity, snapshot.digest(WEIGHTS_FILE).sha256, snapshot.path)
    if not args.precision:
        _say(f"{args.onnx} says it is {precision}: judging it by [verification.tolerances.{precision}]")
    model, _ = load_model(args.snapshot)
    cells = config.verification.cells
    tasks = config.verification.tasks_for(model.config.task.value.lower())  # the real tables of its task
    done = 0

    def show(result) -> None:  # noqa: ANN001 - CellResult | TaskResult
        nonlocal done
        done += 1
        status = "ok" if result.passed else "FAIL " + "; ".join(result.failures)
        signal = result.metrics.err_over_spread
        what = f"task {result.name} ({result.dataset})" if isinstance(result, TaskResult) else f"{result.name} {result.shape}"
        _say(f"[{done}/{len(cells) + len(tasks)}] {what}: max abs {result.metrics.max_abs_err:.2e}, error/spread "
             f"{'-' if signal is None else format(signal, '.3g')} {status}")

    report = verify_onnx(model, args.onnx, cells=cells, tolerance=tolerance, precision=precision,
                         seed=config.verification.seed, on_cell=show, tasks=tasks)
    if args.report:
        write_report(report, args.report, args.markdown)
    # --json: stdout is exactly one JSON document (the progress lines above went to stderr).
    sys.stdout.write(report.to_json() if args.json else report.to_markdown() + "\n")
    sys.stdout.flush()
    require_passed(report)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    from mitra_model.build.config import load_config

    # Every configuration and variant mistake is reported here, before a Prefect server starts (15 s)
    config = load_config(args.config).with_artifacts(
        flavours=args.flavour, precisions=[] if args.fp32_only else args.precision)
    config.select_variants(args.variant, snapshot=args.snapshot)

    # Prefect reads these when imported; a cold ephemeral API on a busy 2-core machine needs > 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    from mitra_model.pipeline.flow import mitra_build

    _quiet_known_errors(logging.getLogger())  # Prefect's console handler sits on the root logger
    results = mitra_build(
        variants=args.variant or None, force=args.force, snapshot=str(args.snapshot) if args.snapshot else None,
        synthetic_fallback=args.synthetic_fallback, hub_endpoint=args.hub_endpoint,
        config_path=str(args.config) if args.config else None, artifacts_root=str(args.artifacts) if args.artifacts else None,
        publish=not args.no_publish, precisions=[] if args.fp32_only else args.precision, flavours=args.flavour,
    )
    for result in results:
        marker = "  [SYNTHETIC: random weights]" if result["synthetic"] else ""
        where = result["published"] or result.get("build_dir")
        print(f"{result['variant']}: {result['status']} {result['version']} -> {where}{marker}")
    return 0


class _OneLineForKnownErrors(logging.Filter):
    """Prefect logs a flow's exception with its traceback; for our own errors the message already says
    what failed and how to fix it, so the console shows that line and the CLI's paragraph, no stack.
    (Only the console: the API log handler runs first and keeps the traceback for the Prefect UI.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, MitraBuildError):  # Prefect's message already quotes the error
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_known_errors(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        handler.addFilter(_OneLineForKnownErrors())


def cmd_quantize(args: argparse.Namespace) -> int:
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    import onnx

    from mitra_model.build.config import load_config

    refuse_overwriting_inputs(args.output, inputs=[args.onnx])
    options = load_config(args.config).artifacts.options_for(recipes.recipe(args.precision))
    result = recipes.quantize_onnx(args.onnx, args.output, precision=args.precision, options=options)  # validates the input first
    metadata = {p.key: p.value for p in onnx.load(str(args.onnx), load_external_data=False).metadata_props}
    if metadata.get("mitra_build.flavour") != "optimized":
        _say(f"note: {args.onnx} is not the optimized flavour; the pipeline quantizes that one "
             "(mitra-build export --flavour optimized), which its tolerances were measured on")
    print(f"wrote {result.path} ({result.precision}, {result.size} bytes) in {result.seconds:.1f} s")
    print(f"sha256 {result.sha256}")
    print(f"verify it: mitra-build verify --snapshot DIR --onnx {result.path} --precision {result.precision}")
    return 0


def _store(config_path: Path | None):  # noqa: ANN202 - StoreConfig
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    from mitra_model.build.config import config_path as default_config_path
    from mitra_model.build.config import load_config

    config = load_config(config_path)
    if config.store is None:
        raise MitraBuildError(f"no [store] section in {config_path or default_config_path()}: nothing to talk to")
    return config.store


def cmd_local_s3(args: argparse.Namespace) -> int:
    # deferred: a command loads only its own toolchain, so the slim install runs ls/pull and --help
    from mitra_model.cli.local_s3 import LocalS3Server
    from mitra_model.release.store import ensure_bucket, make_s3_client

    store = _store(args.config)
    server = LocalS3Server(args.dir, s3_port=args.port)
    with server:
        ensure_bucket(make_s3_client(store.model_copy(update={"endpoint_url": server.endpoint_url})), store.bucket)
        print(f"SeaweedFS S3 on {server.endpoint_url} (data in {args.dir}, log {server.log_path}); bucket "
              f"{store.bucket!r} ready. Ctrl-C stops it.", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    return 0


def _s3_port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= MAX_S3_PORT:
        raise argparse.ArgumentTypeError(f"{port} is not in 1..{MAX_S3_PORT} (port + {GRPC_OFFSET} must be a port too)")
    return port


def _examples(*lines: str) -> dict:
    """An argparse epilog with examples, kept as written (tests/test_docs.py parses each one)."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mitra-build", description=__doc__,
        **_examples("mitra-build synth --task classification --size tiny --output snap",
                    "mitra-build export --snapshot snap --output model.onnx",
                    "mitra-build verify --snapshot snap --onnx model.onnx"),
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print this package's version and the installed toolchain's (torch, onnx, ...), then exit")
    config_help = ("configuration file (default: $MITRA_BUILD_CONFIG, else config/mitra-build.toml in the working "
                   "directory, else the one packaged with mitra-build)")
    parser.add_argument("--config", type=Path, default=None, help=config_help)
    # Also accepted after the subcommand (`mitra-build run --config FILE`); SUPPRESS keeps a value given
    # before the subcommand from being overwritten by the subparser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", parents=[common], help="write a synthetic snapshot (real architecture, random weights)",
                           **_examples("mitra-build synth --task classification --size tiny --output snap",
                                       "mitra-build synth --task regression --size full --output snap-full --seed 1"))
    synth.add_argument("--task", choices=("classification", "regression"), required=True, help="which head to build")
    synth.add_argument("--size", choices=("tiny", "full"), required=True,
                       help="architecture from [sizes.<size>] in the configuration (full = the official Mitra's)")
    synth.add_argument("--output", type=Path, required=True, help="snapshot folder to create (must not exist)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    synth.set_defaults(func=cmd_synth)

    export = sub.add_parser("export", parents=[common], help="export a snapshot folder to ONNX (and run the check stage)",
                            **_examples("mitra-build export --snapshot snap --output model.onnx",
                                        "mitra-build export --snapshot snap --output model-ort.onnx --flavour optimized"))
    export.add_argument("--snapshot", type=Path, required=True,
                        help="snapshot folder (config.json + model.safetensors, upstream's save_pretrained layout)")
    export.add_argument("--output", type=Path, required=True, help="ONNX file to write")
    export.add_argument("--flavour", choices=recipes.choices("flavours"), default="portable",
                        help="portable: standard ONNX ops; optimized: ONNX Runtime's memory-efficient attention")
    export.set_defaults(func=cmd_export)

    precisions = recipes.choices("precisions")
    quantize = sub.add_parser("quantize", parents=[common],
                              help=f"derive a reduced-precision artifact ({', '.join(precisions)}) from an fp32 export",
                              **_examples("mitra-build quantize --onnx model-ort.onnx --precision int8 --output model-int8.onnx"))
    quantize.add_argument("--onnx", type=Path, required=True, help="fp32 export (the optimized flavour)")
    quantize.add_argument("--precision", choices=precisions, required=True,
                          help="options come from [artifacts.options.<precision>] in the configuration")
    quantize.add_argument("--output", type=Path, required=True, help="ONNX file to write")
    quantize.set_defaults(func=cmd_quantize)

    check = sub.add_parser("check", parents=[common], help="onnx.checker + shape inference + I/O contract",
                           **_examples("mitra-build check --snapshot snap --onnx model.onnx"))
    check.add_argument("--snapshot", type=Path, required=True, help="the snapshot the file was exported from")
    check.add_argument("--onnx", type=Path, required=True, help="ONNX file to check")
    check.set_defaults(func=cmd_check)

    verify = sub.add_parser("verify", parents=[common], help="run the verification matrix (exit 1 if any cell fails)",
                            **_examples("mitra-build verify --snapshot snap --onnx model.onnx",
                                        "mitra-build verify --snapshot snap --onnx model-int8.onnx --report r.json --markdown r.md",
                                        "mitra-build verify --snapshot snap --onnx model.onnx --json"))
    verify.add_argument("--snapshot", type=Path, required=True, help="the snapshot the file was exported from (the reference)")
    verify.add_argument("--onnx", type=Path, required=True, help="ONNX file to verify")
    verify.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    verify.add_argument("--markdown", type=Path, default=None, help="also write the Markdown table here")
    verify.add_argument("--json", action="store_true",
                        help="print the JSON report (as --report writes it) on stdout instead of the Markdown "
                             "table: one document, nothing else; progress stays on stderr")
    verify.add_argument("--precision", default=None,
                        help="tolerance set from the configuration (default: the precision the file's metadata names)")
    verify.set_defaults(func=cmd_verify)

    run = sub.add_parser("run", parents=[common], help="run the whole mitra-build flow in this process (no server to start)",
                         **_examples("mitra-build run --variant mitra-classifier --no-publish",
                                     "mitra-build run --variant mitra-classifier --snapshot snap --fp32-only --no-publish"))
    run.add_argument("--variant", action="append", help="variant name from the configuration (repeatable; default all)")
    run.add_argument("--force", action="store_true", help="rebuild even if this version is already built")
    run.add_argument("--snapshot", type=Path, default=None, help="build this local snapshot folder instead of downloading")
    run.add_argument("--synthetic-fallback", action="store_true",
                     help="if the hub is unreachable, build a SYNTHETIC full-size snapshot instead of failing")
    run.add_argument("--hub-endpoint", default=None, help="hub mirror URL (default: HF_ENDPOINT or the public hub)")
    run.add_argument("--artifacts", type=Path, default=None, help="artifacts folder (default $MITRA_BUILD_ARTIFACTS, else ./artifacts)")
    precision = run.add_mutually_exclusive_group()
    precision.add_argument("--precision", action="append", choices=precisions,
                           help="reduced precision to build (repeatable; default: [artifacts] in the configuration)")
    precision.add_argument("--fp32-only", action="store_true", help=f"build no reduced precision ({'/'.join(precisions)})")
    run.add_argument("--flavour", action="append", choices=recipes.choices("flavours"),
                     help="fp32 flavour to build (repeatable; portable is required; default: [artifacts])")
    run.add_argument("--no-publish", action="store_true", help="keep the build local even if [store] is configured")
    run.set_defaults(func=cmd_run)

    from mitra_model.cli.release_commands import add_release_commands  # `ls` and `pull`: light, no build config needed

    add_release_commands(sub, common)

    from mitra_model.cli.report_commands import add_report_commands  # `diff` is light; `report` imports plots when run

    add_report_commands(sub, common)

    local_s3 = sub.add_parser(
        "local-s3", parents=[common], help="serve the configured bucket from a local SeaweedFS until stopped",
        description=f"Serve [store]'s bucket from SeaweedFS on 127.0.0.1. It needs two ports: S3 on --port N and its "
                    f"gRPC twin on N+{GRPC_OFFSET} (SeaweedFS's fixed convention); both are checked before it starts, "
                    "and a busy one is named.",
        **_examples(f"mitra-build local-s3 --dir s3-data                 # S3 on {DEFAULT_S3_PORT}, gRPC on {DEFAULT_S3_PORT + GRPC_OFFSET}",
                    "mitra-build local-s3 --dir s3-data --port 9333     # S3 on 9333, gRPC on 19333"))
    local_s3.add_argument("--dir", type=Path, required=True, help="data folder (kept between runs)")
    local_s3.add_argument("--port", type=_s3_port, default=DEFAULT_S3_PORT, metavar="N",
                          help=f"S3 port (default {DEFAULT_S3_PORT}); N+{GRPC_OFFSET} must be free too (SeaweedFS's gRPC port)")
    local_s3.set_defaults(func=cmd_local_s3)
    return parser


def _json_error(args: argparse.Namespace, exc: MitraBuildError) -> None:
    """With --json, stdout still holds one JSON document: the error, with a stable code."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps({"error": {"code": error_code(exc), "command": args.command,
                                               "message": str(exc)}}) + "\n")
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        require_extras(args.command)
        return args.func(args)
    except VerificationError as exc:
        _say(f"mitra-build {args.command}: {exc}")  # with --json, stdout already holds the report ("passed": false)
        return EXIT_VERIFICATION_FAILED
    except MitraBuildError as exc:
        _say(f"mitra-build {args.command}: error: {exc}")
        _json_error(args, exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say(f"mitra-build {args.command}: interrupted; no partial output was left in place")
        return 130

