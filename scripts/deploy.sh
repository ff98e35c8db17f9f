#!/usr/bin/env bash
# Create the process work pool and the deployments of prefect.yaml on the Prefect server at
# $PREFECT_API_URL (the schedule comes from config/mitra-build.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PREFECT_API_URL:?set PREFECT_API_URL to your Prefect server, e.g. http://127.0.0.1:4200/api}"
export MITRA_BUILD_ROOT="$PWD"
read -r MITRA_BUILD_CRON_TZ MITRA_BUILD_CRON < <(.venv/bin/python -c \
  'from mitra_model.build.config import load_config; s = load_config().schedule; print(s.timezone, s.cron)')
export MITRA_BUILD_CRON MITRA_BUILD_CRON_TZ
.venv/bin/prefect work-pool inspect mitra-build-pool >/dev/null 2>&1 \
  || .venv/bin/prefect work-pool create mitra-build-pool --type process
.venv/bin/prefect --no-prompt deploy --all
echo "==> deployments: mitra-build/build (manual), mitra-build/scheduled (cron '$MITRA_BUILD_CRON' $MITRA_BUILD_CRON_TZ)"
# A deployment whose schedule never fires is a broken orchestrator: fail here, not weeks later.
.venv/bin/python -m mitra_model.pipeline.plumbing upcoming mitra-build/scheduled
