#!/usr/bin/env bash
# Start the lab's shared MLflow tracking server: PostgreSQL backend, an artifact root, basic authentication.
#
#   PGPASSWORD=... MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... \
#       mlflow/start-server.sh [--pg-data DIR] [options] [-- extra `mlflow server` options]
#
# Secrets come only from the environment and are never written to a config, a command line or a log:
#   PGPASSWORD                      the PostgreSQL password of --pg-user (libpq reads it)
#   MLFLOW_AUTH_ADMIN_PASSWORD      the MLflow admin's password, read on the first start (>= 12 characters)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs CSRF tokens; keep it the same across restarts and servers
#
# Options (defaults in brackets):
#   --host H           address to listen on [127.0.0.1]; for other machines use the lab's interface address
#                      and add `-- --allowed-hosts name:port`
#   --port P           [5000]            --workers N   uvicorn workers [2]
#   --state-dir D      rendered basic_auth.ini, logs, default artifact root [./mlflow-state]
#   --artifacts A      artifact destination: a directory, s3://…, gs://… [<state dir>/artifacts]
#   --pg-data D        also run PostgreSQL with this data directory (initdb when empty), stopped on exit;
#                      without it, connect to an existing server at --pg-host/--pg-port
#   --pg-host H [127.0.0.1]   --pg-port P [5432]   --pg-user U [mlflow]
#   --db NAME          tracking database [mlflow]   --auth-db NAME  users and permissions [mlflow_auth]
#   --python PY        interpreter with mlflow[auth] and psycopg[binary] [$LOWRES_PYTHON or python3]
#   --pg-os-user U     system user PostgreSQL runs as when started by root [postgres, else nobody]
#
# The script stays in the foreground; SIGTERM or Ctrl-C stops MLflow, then the PostgreSQL it started.
set -euo pipefail

HOST=127.0.0.1 PORT=5000 WORKERS=2 STATE_DIR=./mlflow-state ARTIFACTS="" PG_DATA=""
PG_HOST=127.0.0.1 PG_PORT=5432 PG_USER=mlflow DB=mlflow AUTH_DB=mlflow_auth
PY="${LOWRES_PYTHON:-python3}" PG_OS_USER=""
EXTRA=()
die() { echo "start-server.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) HOST=$2; shift 2 ;;        --port) PORT=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;  --state-dir) STATE_DIR=$2; shift 2 ;;
    --artifacts) ARTIFACTS=$2; shift 2 ;;
    --pg-data) PG_DATA=$2; shift 2 ;;  --pg-host) PG_HOST=$2; shift 2 ;;
    --pg-port) PG_PORT=$2; shift 2 ;;  --pg-user) PG_USER=$2; shift 2 ;;
    --db) DB=$2; shift 2 ;;            --auth-db) AUTH_DB=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;        --pg-os-user) PG_OS_USER=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n "${PGPASSWORD:-}" ]] || die "set PGPASSWORD (the PostgreSQL password of '$PG_USER') in the environment"
[[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] \
  || die "set MLFLOW_FLASK_SERVER_SECRET_KEY (e.g. \$(openssl rand -hex 32)) in the environment"
export PGPASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
ARTIFACTS=${ARTIFACTS:-$STATE_DIR/artifacts}
HERE=$(cd "$(dirname "$0")" && pwd)

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi; }
MLFLOW_PID="" PG_STARTED=""

stop_all() {
  trap - TERM INT EXIT
  if [[ -n "$MLFLOW_PID" ]]; then kill -TERM "$MLFLOW_PID" 2>/dev/null || true; wait "$MLFLOW_PID" 2>/dev/null || true; fi
  if [[ -n "$PG_STARTED" ]]; then as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null || true; fi
}
trap stop_all EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

if [[ -n "$PG_DATA" ]]; then
  [[ -x "$PG_BIN/initdb" ]] || die "PostgreSQL is not installed (Debian: apt-get install postgresql)"
  if [[ -z "$PG_OS_USER" ]]; then id postgres >/dev/null 2>&1 && PG_OS_USER=postgres || PG_OS_USER=nobody; fi
  mkdir -p "$PG_DATA"
  PG_DATA=$(cd "$PG_DATA" && pwd)
  [[ $(id -u) == 0 ]] && chown "$PG_OS_USER" "$PG_DATA" && chmod 700 "$PG_DATA"
  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    # The password reaches initdb through a file only its user can read (made by that user), removed at once.
    PWDIR=$(as_pg mktemp -d)
    printf '%s\n' "$PGPASSWORD" | as_pg sh -c "umask 077; cat > '$PWDIR/pw'"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --pwfile="$PWDIR/pw" -E UTF8 \
      --auth-host=scram-sha-256 --auth-local=scram-sha-256 --no-instructions > "$STATE_DIR/initdb.log" \
      || { as_pg rm -rf "$PWDIR"; die "initdb failed, see $STATE_DIR/initdb.log"; }
    as_pg rm -rf "$PWDIR"
  fi
  SOCK_DIR="$PG_DATA"  # not /var/run/postgresql, which another PostgreSQL may own
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/postgres.log" -w -t 60 start \
    -o "-c listen_addresses=$PG_HOST -c port=$PG_PORT -c unix_socket_directories=$SOCK_DIR" >/dev/null \
    || die "PostgreSQL did not start, see $PG_DATA/postgres.log"
  PG_STARTED=1
fi

# Create both databases if missing; psql takes the password from PGPASSWORD.
for db in "$DB" "$AUTH_DB"; do
  if [[ -z $(psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
             "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]; then
    psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -qc "CREATE DATABASE \"$db\"" \
      || die "could not create database $db on $PG_HOST:$PG_PORT as $PG_USER"
  fi
done

# No password in these URIs: SQLAlchemy's psycopg driver is libpq, which reads PGPASSWORD.
BACKEND_URI="postgresql://$PG_USER@$PG_HOST:$PG_PORT/$DB"
AUTH_URI="postgresql://$PG_USER@$PG_HOST:$PG_PORT/$AUTH_DB"
sed "s|@AUTH_DATABASE_URI@|$AUTH_URI|" "$HERE/basic_auth.ini" > "$STATE_DIR/basic_auth.ini"
export MLFLOW_AUTH_CONFIG_PATH="$STATE_DIR/basic_auth.ini"

echo "start-server.sh: MLflow on http://$HOST:$PORT (store $BACKEND_URI, artifacts $ARTIFACTS, basic auth)"
"$PY" -m mlflow server --app-name basic-auth --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --backend-store-uri "$BACKEND_URI" --artifacts-destination "$ARTIFACTS" "${EXTRA[@]}" &
MLFLOW_PID=$!
wait "$MLFLOW_PID"
