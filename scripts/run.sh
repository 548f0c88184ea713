#!/usr/bin/env bash
# Run Countersign on one port in the foreground: the web server (granian, HTTP), the ws server
# (uvicorn, websockets) and the path router in front of them that stands in for the production load
# balancer (python -m config.serving local), plus the Celery worker with its beat scheduler.
# Ctrl-C stops everything (and exits 0: that is how it is meant to stop).
#
# Environment: PORT (default 8000) and HOST (127.0.0.1) pick where it listens, e.g. PORT=8010 make run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
export COUNTERSIGN_ISSUER=${COUNTERSIGN_ISSUER:-http://$HOST:$PORT}

# Check the port before starting anything: otherwise the banner below would announce a server that
# dies a moment later with "address already in use".
if ! $PY - "$HOST" "$PORT" <<'PY'
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((sys.argv[1], int(sys.argv[2])))
    except OSError:
        sys.exit(1)
PY
then
  echo "Port $PORT on $HOST is already in use (an earlier \`make run\` or \`make demo\`?)." >&2
  echo "Stop what listens there, or pick another port: PORT=8010 make run" >&2
  exit 1
fi

pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "Stopping Countersign ..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "Stopped."
}
trap stop EXIT
# Ctrl-C and a plain kill are the normal way to stop: exit 0, so make reports no error.
trap 'exit 0' INT TERM

mkdir -p var
.venv/bin/celery -A config.celery:app worker --beat --loglevel=INFO --concurrency=2 \
  --schedule=var/celerybeat-schedule >var/celery.log 2>&1 &
pids+=($!)
# The audit sealer links committed audit events into the hash chain (PostgreSQL; SQLite links inline).
$PY manage.py audit_seal --loop >var/sealer.log 2>&1 &
pids+=($!)
$PY -m config.serving local --host "$HOST" --port "$PORT" &
pids+=($!)

cat <<MSG

  Countersign is running at $COUNTERSIGN_ISSUER
    sign in:      $COUNTERSIGN_ISSUER/accounts/login/   (officer / ${COUNTERSIGN_DEMO_PASSWORD:-countersign-demo})
    approvals:    $COUNTERSIGN_ISSUER/approvals/        (the live inbox)
    admin:        $COUNTERSIGN_ISSUER/admin/            (admin / ${COUNTERSIGN_DEMO_PASSWORD:-countersign-demo})
    metadata:     $COUNTERSIGN_ISSUER/.well-known/oauth-authorization-server
  Celery worker log: var/celery.log. Press Ctrl-C to stop.

MSG
wait -n "${pids[@]}"
