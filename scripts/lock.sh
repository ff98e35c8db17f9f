#!/usr/bin/env bash
# Regenerate requirements.lock from the current .venv (after changing dependencies in pyproject.toml):
# the lock pins the base install and every extra ([build], [flow], [signing], [test]) together.
# The header and the comment above a pin (why it is pinned there) are carried over to the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
# Not pinned here: this project itself (pip freeze lists the editable install as a comment and an -e
# line) and autogluon.tabular, which setup.sh installs with --no-deps.
.venv/bin/python -m pip freeze | grep -v -E '^(-e |# Editable|mitra.build|autogluon)' > requirements.lock.freeze
.venv/bin/python - <<'PY'
import re
from pathlib import Path

old = Path("requirements.lock").read_text().splitlines()
header = old[:2]
notes, pending = {}, []
for line in old[2:]:
    if line.startswith("#"):
        pending.append(line)
    elif line.strip():
        notes[re.split(r"[=<>!~ ]", line, maxsplit=1)[0].lower()] = pending
        pending = []
lines = list(header)
for pin in Path("requirements.lock.freeze").read_text().splitlines():
    lines += notes.get(re.split(r"[=<>!~ ]", pin, maxsplit=1)[0].lower(), []) + [pin]
Path("requirements.lock.new").write_text("\n".join(lines) + "\n")
PY
rm requirements.lock.freeze
mv requirements.lock.new requirements.lock
