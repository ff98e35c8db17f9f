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
  # Every extra (build: torch/ONNX, flow: Prefect + the local S3 store, test), each at the version the
  # lock pins (one resolve: pip refuses a lock that contradicts pyproject.toml's ranges).
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
