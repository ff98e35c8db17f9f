#!/usr/bin/env bash
# Regenerate requirements.lock from the current .venv (after changing dependencies in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
{ head -2 requirements.lock; .venv/bin/python -m pip freeze | grep -v -E '^(-e |mitra.build|autogluon)'; } > requirements.lock.new
mv requirements.lock.new requirements.lock
