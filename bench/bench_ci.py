"""Paired CI benchmark: `.ci/run` of two commits, each on a fresh clone, one after the other, on this
machine. Writes bench/results-ci.{json,md}.

    .venv/bin/python bench/bench_ci.py [--before 9c8d5bd] [--after HEAD] [--order before-first]

Each run is what CI does on a clean checkout: `git clone` into a new temp folder, then `.ci/run`
(scripts/setup.sh installs the pinned toolchain into the clone's own .venv, npm packages, Chromium if
missing; then the README's test command). The target (issue 20): after <= 80% of before, every test
kept. Both clones use the same pip and npm caches, so the install costs what it costs on a CI worker
with a warm cache; its share is reported apart from pytest's own time.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TARGET_RATIO = 0.80
PYTEST_SUMMARY = re.compile(r"(?P<summary>\d+ passed[^\n]*?) in (?P<seconds>[\d.]+)s")


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def run_ci(label: str, ref: str, work: Path) -> dict:
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    clone = work / label
    git("clone", "--quiet", str(REPO), str(clone))
    git("checkout", "--quiet", "--detach", sha, cwd=clone)
    log = work / f"{label}.log"
    print(f"{label}: .ci/run of {sha[:12]} in {clone} (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run([str(clone / ".ci" / "run")], cwd=clone, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    text = log.read_text()
    found = list(PYTEST_SUMMARY.finditer(text))
    result = {"label": label, "ref": ref, "commit": sha, "exit_code": code, "wall_s": round(wall, 1),
              "pytest_s": float(found[-1]["seconds"]) if found else None,
              "pytest_summary": found[-1]["summary"] if found else None}
    print(f"{label}: exit {code}, {wall:.1f} s ({result['pytest_summary']} in {result['pytest_s']} s)", flush=True)
    if code:
        raise SystemExit(f"{label}: .ci/run failed; see {log}")
    return result


def render(results: dict, machine_text: str) -> str:
    before, after = results["runs"]["before"], results["runs"]["after"]
    ratio = after["wall_s"] / before["wall_s"]
    lines = [
        "# CI benchmark: `.ci/run` before vs after, paired, fresh clones", "",
        f"{machine_text} Date: {results['date']}.", "",
        f"- before: `{before['ref']}` = {before['commit']}", f"- after: `{after['ref']}` = {after['commit']}",
        f"- order: {' then '.join(results['order'])}; command: `{results['command']}`", "",
        f"**Target after ≤ {TARGET_RATIO:.0%} of before: {ratio:.2f} → {'met' if ratio <= TARGET_RATIO else 'missed'}.**",
        "", "| run | .ci/run wall s | of which pytest s | install and setup s | tests |", "|---|---|---|---|---|",
    ]
    for run in (before, after):
        setup = run["wall_s"] - run["pytest_s"] if run["pytest_s"] else None
        lines.append(f"| {run['label']} | {run['wall_s']:.1f} | {run['pytest_s']} | "
                     f"{'–' if setup is None else f'{setup:.1f}'} | {run['pytest_summary']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="9c8d5bd", help="commit measured as before (default: 9c8d5bd)")
    parser.add_argument("--after", default="HEAD", help="commit measured as after (default: HEAD)")
    parser.add_argument("--order", choices=("before-first", "after-first"), default="before-first")
    parser.add_argument("--output-prefix", type=Path, default=BENCH_DIR / "results-ci")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH_DIR))
    from bench_core import machine, machine_line, write_results

    host = machine()
    order = ("after", "before") if args.order == "after-first" else ("before", "after")
    work = Path(tempfile.mkdtemp(prefix="mitra-bench-ci-"))
    refs = {"before": args.before, "after": args.after}
    runs = {label: run_ci(label, refs[label], work) for label in order}
    results = {"machine": host, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "order": list(order), "command": " ".join(["bench/bench_ci.py", *sys.argv[1:]]), "runs": runs,
               "ratio": runs["after"]["wall_s"] / runs["before"]["wall_s"], "target_ratio": TARGET_RATIO}
    shutil.rmtree(work, ignore_errors=True)
    report = render(results, machine_line(host))
    write_results(args.output_prefix, results, report)
    print(report)


if __name__ == "__main__":
    main()
