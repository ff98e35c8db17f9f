#!/usr/bin/env bash
# The main job end to end on embedded defaults. Interim version (core only): synthetic full-size
# snapshot -> export -> check -> verification matrix, into artifacts/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out=artifacts/demo
mkdir -p "$out"
echo "==> hub unreachable from here: building from a SYNTHETIC full-size snapshot (random weights)"
.venv/bin/mitra-build synth --task classification --size full --output "$out/snapshot"
.venv/bin/mitra-build export --snapshot "$out/snapshot" --output "$out/model.onnx"
.venv/bin/mitra-build verify --snapshot "$out/snapshot" --onnx "$out/model.onnx" --report "$out/verification.json" --markdown "$out/verification.md"
