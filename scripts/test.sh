#!/usr/bin/env bash
# Run the test suite from a fresh clone: installs what it needs, then pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_DISABLE_TELEMETRY=1
# One worker per core (MITRA_TEST_WORKERS overrides); a module stays on one worker, so its module-scoped
# fixtures are built once. Most tests wait on servers and subprocesses, so this halves the wall time.
exec .venv/bin/python -m pytest -q -n "${MITRA_TEST_WORKERS:-auto}" --dist loadfile "$@"
