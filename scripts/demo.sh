#!/usr/bin/env bash
# The procurement demo (the reference scenario), all on loopback:
#   Countersign (web + ws servers behind the path router, Celery worker), the five procurement systems (examples/procurement/
#   resource_servers.py, ports 8101-8105) and the scripted agent (examples/procurement/agent.py,
#   callback on 8199), whose output is this terminal's. Ctrl-C stops everything.
#
# Environment: PORT (8000), DEMO_DIR (var/demo), DEMO_OPEN=0 (do not open the consent link in a browser),
# DEMO_STAY=0 (stop as soon as the agent is done instead of waiting for Ctrl-C), DEMO_MCP=1 (also the
# MCP server of examples/mcp on COUNTERSIGN_DEMO_MCP_PORT, 8110; what `make demo-mcp` sets),
# plus the server's own variables (DATABASE_URL, REDIS_URL, ...; see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HOST=127.0.0.1
PORT=${PORT:-8000}
export COUNTERSIGN_ISSUER=${COUNTERSIGN_ISSUER:-http://$HOST:$PORT}
DEMO_DIR=${DEMO_DIR:-var/demo}
CREDS=$DEMO_DIR/credentials.json

# 1. The virtualenv (as `make install`), Redis, the database and the demo data.
if [ ! -x "$PY" ] || [ ! -e .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  ${MAKE:-make} --no-print-directory install
fi
scripts/ensure_services.sh redis
mkdir -p "$DEMO_DIR"
chmod 700 "$DEMO_DIR"
$PY manage.py migrate --noinput >/dev/null
# seed_demo is idempotent; --rotate-secrets issues fresh secrets for the agent and the five systems, so
# this run's credentials file always holds working ones (secrets are stored hashed and cannot be re-read).
(umask 077 && $PY manage.py seed_demo --rotate-secrets --json >"$CREDS.tmp")
chmod 600 "$CREDS.tmp"
mv -f "$CREDS.tmp" "$CREDS"
echo "Demo credentials: $CREDS (mode 600)"

# 2. Every port the demo needs must be free (a `make run` or another demo would answer instead).
$PY - "$CREDS" "$COUNTERSIGN_ISSUER" <<'PY'
import json, socket, sys
from urllib.parse import urlsplit
config = json.load(open(sys.argv[1]))
urls = [sys.argv[2]] + [s["audience"] for s in config["resource_servers"]]
urls += [u for a in config["agents"] for u in a["redirect_uris"]]
busy = []
for url in urls:
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((parts.hostname, parts.port or 80)) == 0:
            busy.append(f"{parts.hostname}:{parts.port}")
if busy:
    sys.exit("These ports are in use: " + ", ".join(busy) + "\nStop what listens there (an earlier "
             "`make run` or `make demo`?) and try again.")
PY

pids=()
stop() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo; echo "Stopping the demo ..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
      alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "Stopped."
  fi
}
trap stop EXIT
# Ctrl-C is the normal way to end the demo: exit 0, so make reports no error.
trap 'exit 0' INT
trap 'exit 143' TERM

# 3. Countersign, its worker, and the five systems, in the background (logs in var/demo/).
.venv/bin/celery -A config.celery:app worker --beat --loglevel=INFO --concurrency=2 \
  --schedule="$DEMO_DIR/celerybeat-schedule" >"$DEMO_DIR/celery.log" 2>&1 &
pids+=($!)
$PY -m config.serving local --host "$HOST" --port "$PORT" >"$DEMO_DIR/server.log" 2>&1 &
pids+=($!)
$PY -m examples.procurement.resource_servers --config "$CREDS" --issuer "$COUNTERSIGN_ISSUER" \
  --data-dir "$DEMO_DIR" >"$DEMO_DIR/systems.log" 2>&1 &
pids+=($!)

# DEMO_MCP=1 (make demo-mcp): the MCP server too (examples/mcp, Streamable HTTP at /mcp).
MCP_PORT=${COUNTERSIGN_DEMO_MCP_PORT:-8110}
if [ "${DEMO_MCP:-0}" = 1 ]; then
  $PY -m examples.mcp.server --config "$CREDS" --port "$MCP_PORT" --ledger "$DEMO_DIR/mcp-ledger.jsonl" \
    >"$DEMO_DIR/mcp.log" 2>&1 &
  pids+=($!)
fi

wait_for() {  # wait_for WHAT COMMAND...: up to 30 s
  local what=$1; shift
  for _ in $(seq 1 300); do
    if "$@" 2>/dev/null; then return 0; fi
    for pid in "${pids[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "A demo process exited early; see $DEMO_DIR/*.log" >&2; tail -n 20 "$DEMO_DIR"/*.log >&2; exit 1
      fi
    done
    sleep 0.1
  done
  echo "$what did not start within 30 s; see $DEMO_DIR/*.log" >&2
  exit 1
}
http_ok() { $PY -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1"; }
systems_up() {
  $PY - "$CREDS" <<'PY'
import json, sys, urllib.request
for server in json.load(open(sys.argv[1]))["resource_servers"]:
    if not server["audience"].endswith("/mcp"):  # the MCP server (examples/mcp) has no /health
        urllib.request.urlopen(server["audience"] + "/health", timeout=1)
PY
}
wait_for "Countersign" http_ok "$COUNTERSIGN_ISSUER/.well-known/oauth-authorization-server"
wait_for "the Celery worker" grep -q "ready\." "$DEMO_DIR/celery.log"
wait_for "the procurement systems" systems_up
cat "$DEMO_DIR/systems.log"
if [ "${DEMO_MCP:-0}" = 1 ]; then
  wait_for "the MCP server" http_ok "http://$HOST:$MCP_PORT/.well-known/oauth-protected-resource/mcp"
  cat "$DEMO_DIR/mcp.log"
  echo "  Point an MCP client at http://$HOST:$MCP_PORT/mcp: it discovers Countersign, joins (CIMD or"
  echo "  registration), you consent; ledger_append waits for your approval in the inbox."
fi

cat <<MSG

  Countersign is running at $COUNTERSIGN_ISSUER
    approvals inbox: $COUNTERSIGN_ISSUER/approvals/   activity: $COUNTERSIGN_ISSUER/activity/
    sign in as officer / ${COUNTERSIGN_DEMO_PASSWORD:-countersign-demo}
  Logs: $DEMO_DIR/server.log, celery.log, systems.log. Ctrl-C stops everything.

MSG

# 4. The agent, in this terminal. It prints the consent link; open it for the user if we can.
open_args=()
if [ "${DEMO_OPEN:-1}" != 0 ]; then
  if [ "$(uname -s)" = Darwin ] && command -v open >/dev/null 2>&1; then
    open_args=(--open-command open)
  elif command -v xdg-open >/dev/null 2>&1 && [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    open_args=(--open-command xdg-open)
  fi
fi
# (Started with & so this script can watch the services meanwhile: if one dies, the run stops
# instead of waiting for a consent or an approval that can no longer come. Its output is yours.)
$PY -m examples.procurement.agent --config "$CREDS" --issuer "$COUNTERSIGN_ISSUER" \
  ${open_args[@]+"${open_args[@]}"} &
agent=$!
services=("${pids[@]}")
pids+=("$agent")
while kill -0 "$agent" 2>/dev/null; do
  for pid in "${services[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "A demo service stopped unexpectedly; see $DEMO_DIR/*.log" >&2
      tail -n 20 "$DEMO_DIR"/server.log "$DEMO_DIR"/celery.log "$DEMO_DIR"/systems.log >&2
      exit 1
    fi
  done
  sleep 0.5
done
set +e
wait "$agent"
rc=$?
set -e

if [ "${DEMO_STAY:-1}" != 0 ] && [ $rc != 130 ]; then
  ledger=$($PY -c "import json,sys; c=json.load(open(sys.argv[1])); print([s['audience'] for s in c['scopes'] if s['name']=='ledger:write'][0])" "$CREDS")
  cat <<MSG

  Everything stays up so you can look around:
    ledger entries:  $ledger/entries   (file $DEMO_DIR/ledger.jsonl)
    audit trail:     $COUNTERSIGN_ISSUER/activity/   (and: .venv/bin/python manage.py audit_verify)
    connected agents: $COUNTERSIGN_ISSUER/grants/
  Press Ctrl-C to stop.
MSG
  wait -n "${services[@]}" || true
fi
[ $rc = 130 ] && rc=0  # the agent stopped by Ctrl-C
exit $rc
