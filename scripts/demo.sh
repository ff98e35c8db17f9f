#!/usr/bin/env bash
# The main job end to end on embedded defaults: a local Prefect server (SQLite), a process worker,
# the deployments, and a run of `mitra-build/build` watched to the end. The hub is tried first;
# if it is unreachable the build uses a SYNTHETIC full-size snapshot and says so everywhere.
# Everything it starts is stopped on exit; state and logs are kept under artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export PREFECT_HOME="$PWD/artifacts/prefect" # the server's SQLite database lives here
export PREFECT_API_URL="http://127.0.0.1:${MITRA_DEMO_PREFECT_PORT:-4200}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1
# The local SeaweedFS accepts these (demo-only) keys; boto3 in the worker picks them up the usual way.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-mitra-demo}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-mitra-demo-secret}"
mkdir -p "$PREFECT_HOME" artifacts/logs
pids=()
cleanup() { # stop what we started, last first (a worker outliving its server logs a traceback), SIGKILL after 15 s
  local pid
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[$i]}
    kill -- "-$pid" 2>/dev/null || continue
    for _ in $(seq 15); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
    kill -9 -- "-$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
start() { # name, command...: run in its own process group, log to artifacts/logs/NAME.log
  local name=$1; shift
  setsid "$@" >"artifacts/logs/$name.log" 2>&1 &
  pids+=($!)
}
wait_for() { # what, seconds, test command...
  local what=$1 limit=$2; shift 2
  for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "!! $what did not come up in ${limit}s; see artifacts/logs/" >&2; exit 1
}

echo "==> starting local S3 (SeaweedFS) on 127.0.0.1:8333, data in artifacts/s3"
start local-s3 .venv/bin/mitra-build local-s3 --dir artifacts/s3 --port 8333
wait_for "local S3" 60 grep -q "bucket .* ready" artifacts/logs/local-s3.log

echo "==> starting Prefect server on $PREFECT_API_URL (SQLite in $PREFECT_HOME)"
start prefect-server .venv/bin/prefect server start --host 127.0.0.1 --port "${MITRA_DEMO_PREFECT_PORT:-4200}"
wait_for "Prefect server" 240 curl -sf "$PREFECT_API_URL/health"

echo "==> a release signing key for this demo in artifacts/keys/ (for real releases keep it in a secret store)"
mkdir -p artifacts/keys
[ -f artifacts/keys/release.pem ] || .venv/bin/mitra-build keygen artifacts/keys/release.pem artifacts/keys/release.pub
export MITRA_SIGNING_KEY_FILE="$PWD/artifacts/keys/release.pem" # the worker signs every release it publishes

scripts/deploy.sh
echo "==> starting a process worker on mitra-build-pool"
start prefect-worker .venv/bin/prefect worker start --pool mitra-build-pool

echo "==> running mitra-build/build (hub first; SYNTHETIC full-size fallback if the hub is unreachable)"
.venv/bin/prefect deployment run 'mitra-build/build' -p synthetic_fallback=true --watch --watch-timeout 3600
echo "==> the server's scheduler has queued the nightly rebuild (cron from config/mitra-build.toml):"
.venv/bin/python -m mitra_model.pipeline.plumbing upcoming mitra-build/scheduled
echo "==> running mitra-build/scheduled now instead of waiting: nothing changed, so it finishes in seconds as up to"
echo "    date and re-signs each variant's latest.json with a fresh expiry"
.venv/bin/prefect deployment run 'mitra-build/scheduled' -p synthetic_fallback=true --watch --watch-timeout 600

echo "==> pulling latest of every variant into a fresh folder: signature, expiry, rollback, size + sha256 checked"
pulled=$(mktemp -d artifacts/pulled.XXXXXX)
.venv/bin/mitra-build ls s3://mitra-build/releases --endpoint-url http://127.0.0.1:8333
for variant in $(.venv/bin/python -c 'from mitra_model.build.config import load_config; print(" ".join(v.name for v in load_config().variants))'); do
  .venv/bin/mitra-build pull "s3://mitra-build/releases/$variant@latest" --dest "$pulled/$variant" \
    --endpoint-url http://127.0.0.1:8333 --trusted-key artifacts/keys/release.pub --quiet
  # the standard OpenSSF tool accepts the pulled folder as it is
  .venv/bin/model_signing verify key --public_key artifacts/keys/release.pub \
    --signature "$pulled/$variant/release.sig" --allow_symlinks "$pulled/$variant"
  .venv/bin/python - "$pulled/$variant/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
tag = "  ** SYNTHETIC (random weights) **" if m["source"]["synthetic"] else ""
print(f"{m['variant']} {m['version']} (manifest_version {m['manifest_version']}){tag}")
for a in m["artifacts"]:
    v = m["verification"][a["name"]]
    ran = ", ".join(f"{c['runtime']} {c['version']} (max abs {c['max_abs_err']:.1e})" for c in a.get("checked_in", []))
    print(f"  {a['file']:24} {a['size'] / 1e6:7.1f} MB  sha256 {a['sha256'][:16]}  "
          f"verified {v['cells']} cells, max abs err {v['max_abs_err']:.1e}" + (f"; ran in {ran}" if ran else ""))
PY
done
echo "==> the orchestrator's own logs: a green run over a broken Prefect server or worker is not green"
# One kind is transient and tolerated, and said: under load, SQLite refuses a worker-heartbeat write
# ("database is locked"); Prefect writes the next beat anyway. Any other traceback fails the demo.
.venv/bin/python -m mitra_model.pipeline.plumbing check-logs artifacts/logs/prefect-server.log \
  artifacts/logs/prefect-worker.log || exit 1
echo "    no failure in artifacts/logs/prefect-server.log or prefect-worker.log"
echo "==> done: releases in s3://mitra-build/releases (SeaweedFS data: artifacts/s3), pulled copies in $pulled"
echo "    release index: http://127.0.0.1:8333/mitra-build/releases/index.html (while the local store runs; pages are also in each pulled folder)"
echo "    each release's model card is README.md beside its files; its report page (open it in a browser):"
for report in "$pulled"/*/report.html; do
  echo "    $PWD/$report"
done
