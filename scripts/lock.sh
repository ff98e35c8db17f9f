#!/usr/bin/env bash
# Regenerate requirements.lock from the current .venv (after changing dependencies in pyproject.toml):
# the lock pins the base install and every extra ([build], [flow], [signing], [test]) together.
set -euo pipefail
cd "$(dirname "$0")/.."
# Not pinned here: this project itself (pip freeze lists the editable install as a comment and an -e
# line) and autogluon.tabular, which setup.sh installs with --no-deps.
{ head -2 requirements.lock; .venv/bin/python -m pip freeze | grep -v -E '^(-e |# Editable|mitra.build|autogluon)'; } > requirements.lock.new
mv requirements.lock.new requirements.lock
