#!/usr/bin/env bash
# Make sure the services Countersign needs are reachable, starting local ones if installed.
#   scripts/ensure_services.sh redis        (make run)
#   scripts/ensure_services.sh redis postgres (make test)
set -euo pipefail

redis_up() { python3 - "$REDIS_URL" <<'PY'
import socket, sys
from urllib.parse import urlparse
u = urlparse(sys.argv[1])
try:
    s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=1)
    s.sendall(b"PING\r\n"); ok = s.recv(16).startswith(b"+PONG"); s.close()
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

ensure_redis() {
  REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
  export REDIS_URL
  if redis_up; then return 0; fi
  if command -v redis-server >/dev/null 2>&1; then
    echo "Starting a local redis-server on 127.0.0.1:6379 ..."
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 50); do redis_up && return 0; sleep 0.1; done
  fi
  echo "Redis is not reachable at $REDIS_URL and no redis-server is installed." >&2
  echo "Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)" >&2
  echo "or point REDIS_URL at a running Redis." >&2
  exit 1
}

ensure_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then return 0; fi
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    echo "Starting PostgreSQL $version ..."
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 100); do pg_isready -h 127.0.0.1 -p 5432 -q && return 0; sleep 0.1; done
  fi
  echo "PostgreSQL is not reachable on 127.0.0.1:5432." >&2
  echo "Install it (Debian/Ubuntu: sudo apt-get install postgresql) or set TEST_DATABASE_URL." >&2
  exit 1
}

for service in "$@"; do
  case "$service" in
    redis) ensure_redis ;;
    postgres) ensure_postgres ;;
    *) echo "unknown service $service" >&2; exit 2 ;;
  esac
done
