#!/usr/bin/env bash
# Run the test suite from a fresh clone: installs what it needs, then pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_DISABLE_TELEMETRY=1
# One worker per core and one more (MITRA_TEST_WORKERS overrides): many tests wait on servers and
# subprocesses, and the extra worker fills those waits (2-core VM: 628 s against 676 s with one per core).
# A module stays on one worker, so its module-scoped fixtures are built once; modules are handed out in
# collection order (tests/conftest.py puts the longest first), not xdist's most-tests-first.
workers=${MITRA_TEST_WORKERS:-$(( $(nproc) + 1 ))}
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
