#!/usr/bin/env bash
# Starts (or reuses) the services loginflow needs, on loopback, without Docker:
#   - a private PostgreSQL cluster (Debian's postgresql package, installed if missing)
#   - a second, TLS-only cluster (`tls_postgres_up`: a throw-away CA made with openssl, `hostssl` only)
#   - LocalStack's SQS, KMS and SNS in host mode (Python >= 3.13 venv), or moto's server as a fallback
#
# Source it, then call `services_up`; `services_down` stops only what it started.
# Exports DATABASE_URL (the `postgres` database of the cluster) and AWS_ENDPOINT_URL.
#
# Settings: LOGINFLOW_STATE (venvs and logs, default ~/.cache/loginflow),
#           PG_PORT (default 25432), PG_TLS_PORT (default 25433; both below the ephemeral port range, so no client socket holds them when a server starts), SQS_PORT (default 4566), PG_FAST=1 (no fsync: tests only),
#           LOGINFLOW_SQS=auto|localstack|moto (default auto: LocalStack when Python >= 3.13 is found, else moto).

LOGINFLOW_STATE=${LOGINFLOW_STATE:-$HOME/.cache/loginflow}
PG_PORT=${PG_PORT:-25432}
PG_TLS_PORT=${PG_TLS_PORT:-25433}
SQS_PORT=${SQS_PORT:-4566}
LOCALSTACK_VERSION=${LOCALSTACK_VERSION:-2026.3.0}
PG_DIR=${PG_DIR:-/var/tmp/loginflow-pg-$PG_PORT}
_STARTED=()

_log() { printf '[services] %s\n' "$*" >&2; }

_as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

_pg_bindir() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  return 1
}

_install_postgres() {
  _log "PostgreSQL not found: installing Debian's postgresql package"
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
}

postgres_up() {
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
    _log "PostgreSQL already running on 127.0.0.1:$PG_PORT"
    return 0
  fi
  local bin
  bin=$(_pg_bindir) || { _install_postgres; bin=$(_pg_bindir); } || { _log "no PostgreSQL server binaries"; return 1; }
  mkdir -p "$PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR" && chmod 700 "$PG_DIR"
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    _log "initialising a private cluster in $PG_DIR/data"
    _as_postgres "$bin/initdb" -D "$PG_DIR/data" --auth=trust -U postgres -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  # track_commit_timestamp: the load test measures latency to commit (pg_xact_commit_timestamp).
  local opts="-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c track_commit_timestamp=on"
  [ "${PG_FAST:-0}" = 1 ] && opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  _as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -o "$opts" -w -t 60 start >/dev/null
  _STARTED+=("postgres")
  _log "PostgreSQL started on 127.0.0.1:$PG_PORT (log: $PG_DIR/postgres.log)"
}

postgres_down() {
  local bin; bin=$(_pg_bindir) || return 0
  _as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
}

# A TLS-only cluster for the TLS tests: certificates from a throw-away CA (subjectAltName
# localhost and 127.0.0.1), `hostssl ... trust` and `hostnossl ... reject`. Exports
# TLS_DATABASE_URL (no TLS parameters: tests add sslmode/sslrootcert), TLS_CA_FILE (the
# cluster's CA) and TLS_OTHER_CA_FILE (a CA that did not sign it).
tls_postgres_up() {
  local dir=/var/tmp/loginflow-pg-tls-$PG_TLS_PORT
  local certs=$dir/certs
  export TLS_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_TLS_PORT/postgres"
  export TLS_CA_FILE=$certs/ca.pem TLS_OTHER_CA_FILE=$certs/other-ca.pem
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p "$PG_TLS_PORT"; then
    _log "TLS-only PostgreSQL already running on 127.0.0.1:$PG_TLS_PORT"
    return 0
  fi
  local bin
  bin=$(_pg_bindir) || { _install_postgres; bin=$(_pg_bindir); } || return 1
  command -v openssl >/dev/null || { _log "openssl is needed to make the test CA"; return 1; }
  mkdir -p "$certs"
  if [ ! -f "$certs/server.pem" ]; then
    _log "making a throw-away CA and server certificate in $certs"
    local ca
    for ca in ca other-ca; do
      openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 3650 \
        -keyout "$certs/$ca.key" -out "$certs/$ca.pem" -subj "/CN=loginflow test $ca" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null || return 1
    done
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
      -keyout "$certs/server.key" -out "$certs/server.csr" -subj "/CN=localhost" 2>/dev/null || return 1
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
      >"$certs/server.ext"
    openssl x509 -req -in "$certs/server.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" -CAcreateserial \
      -days 825 -sha256 -extfile "$certs/server.ext" -out "$certs/server.pem" 2>/dev/null || return 1
  fi
  if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir"; chmod 700 "$dir"; fi
  chmod 600 "$certs/server.key"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    _as_postgres "$bin/initdb" -D "$dir/data" --auth=trust -U postgres -E UTF8 --locale=C.UTF-8 >/dev/null
    printf 'local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n' >"$dir/data/pg_hba.conf"
    [ "$(id -u)" = 0 ] && chown postgres "$dir/data/pg_hba.conf"
  fi
  local opts="-p $PG_TLS_PORT -k $dir -c listen_addresses=127.0.0.1 -c ssl=on"
  opts="$opts -c ssl_cert_file=$certs/server.pem -c ssl_key_file=$certs/server.key -c fsync=off"
  _as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -o "$opts" -w -t 60 start >/dev/null || return 1
  _STARTED+=("tls_postgres")
  _log "TLS-only PostgreSQL started on 127.0.0.1:$PG_TLS_PORT (CA: $TLS_CA_FILE)"
}

tls_postgres_down() {
  local bin; bin=$(_pg_bindir) || return 0
  _as_postgres "$bin/pg_ctl" -D "/var/tmp/loginflow-pg-tls-$PG_TLS_PORT/data" -m fast -w stop >/dev/null 2>&1 || true
}

_python_for_localstack() {
  local py
  for py in python3.13 python3.14 "$HOME"/.pyenv/versions/3.13*/bin/python3 "$HOME"/.pyenv/versions/3.14*/bin/python3 python3; do
    command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 13) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

_sqs_healthy() {
  local health
  health=$(curl -fsS "http://127.0.0.1:$SQS_PORT/_localstack/health" 2>/dev/null)
  if [ -n "$health" ]; then
    # LocalStack: SQS, KMS (the PII vault) and SNS (fan-out tests) needed.
    echo "$health" | grep -q '"sqs": "\(available\|running\)"' &&
      echo "$health" | grep -q '"kms": "\(available\|running\)"' &&
      echo "$health" | grep -q '"sns": "\(available\|running\)"'
    return
  fi
  # moto answers a ListQueues call.
  curl -fsS -X POST -H 'X-Amz-Target: AmazonSQS.ListQueues' -H 'Content-Type: application/x-amz-json-1.0' \
    -d '{}' "http://127.0.0.1:$SQS_PORT/" >/dev/null 2>&1
}

sqs_up() {
  export AWS_ENDPOINT_URL="http://127.0.0.1:$SQS_PORT"
  export AWS_REGION=${AWS_REGION:-us-east-1}
  if _sqs_healthy; then
    _log "an SQS/KMS endpoint is already running on 127.0.0.1:$SQS_PORT"
    return 0
  fi
  if curl -fsS "http://127.0.0.1:$SQS_PORT/_localstack/health" >/dev/null 2>&1; then
    _log "the LocalStack on 127.0.0.1:$SQS_PORT lacks KMS or SNS: restarting it (it must be one this script started)"
    sqs_down
  fi
  mkdir -p "$LOGINFLOW_STATE"
  local py=""
  case "${LOGINFLOW_SQS:-auto}" in
    moto) ;;
    localstack) py=$(_python_for_localstack) || { _log "LOGINFLOW_SQS=localstack but no Python >= 3.13 found"; return 1; } ;;
    *) py=$(_python_for_localstack) || py="" ;;
  esac
  if [ -n "$py" ]; then
    local venv="$LOGINFLOW_STATE/localstack-$LOCALSTACK_VERSION"
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import localstack' 2>/dev/null; then
      _log "installing LocalStack $LOCALSTACK_VERSION into $venv (about a minute)"
      rm -rf "$venv" && "$py" -m venv "$venv" &&
        "$venv/bin/pip" install -q --disable-pip-version-check "localstack-core[runtime]==$LOCALSTACK_VERSION" \
          'cbor2<6' 'pyopenssl<25' 'cryptography<45' service_identity >"$LOGINFLOW_STATE/localstack-install.log" 2>&1 ||
        { _log "LocalStack install failed (see $LOGINFLOW_STATE/localstack-install.log)"; return 1; }
    fi
    mkdir -p "$LOGINFLOW_STATE/localstack-volume"
    SERVICES=sqs,kms,sns GATEWAY_LISTEN="127.0.0.1:$SQS_PORT" SQS_ENDPOINT_STRATEGY=path DNS_ADDRESS=0 \
      SKIP_SSL_CERT_DOWNLOAD=1 DISABLE_EVENTS=1 LOCALSTACK_HOST="127.0.0.1:$SQS_PORT" LOCALSTACK_VOLUME_DIR="$LOGINFLOW_STATE/localstack-volume" \
      nohup "$venv/bin/python" -m localstack.runtime.main >"$LOGINFLOW_STATE/localstack.log" 2>&1 &
    echo $! >"$LOGINFLOW_STATE/sqs.pid"
    _log "starting LocalStack $LOCALSTACK_VERSION (host mode) on 127.0.0.1:$SQS_PORT"
  else
    # No Python >= 3.13: moto's server works for functional runs but slows with a backlog (not for load tests).
    _log "no Python >= 3.13 for LocalStack: falling back to moto's server (functional runs only, not load tests)"
    local venv="$LOGINFLOW_STATE/moto"
    if [ ! -x "$venv/bin/moto_server" ]; then
      python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6' \
        >"$LOGINFLOW_STATE/moto-install.log" 2>&1 || { _log "moto install failed"; return 1; }
    fi
    nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$SQS_PORT" >"$LOGINFLOW_STATE/moto.log" 2>&1 &
    echo $! >"$LOGINFLOW_STATE/sqs.pid"
  fi
  _STARTED+=("sqs")
  local i
  for i in $(seq 1 120); do
    _sqs_healthy && { _log "SQS endpoint ready"; return 0; }
    sleep 0.5
  done
  _log "SQS endpoint did not become ready; last log lines:"
  tail -n 20 "$LOGINFLOW_STATE"/localstack.log "$LOGINFLOW_STATE"/moto.log 2>/dev/null >&2
  return 1
}

sqs_down() {
  local pid
  pid=$(cat "$LOGINFLOW_STATE/sqs.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null && for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$LOGINFLOW_STATE/sqs.pid"
}

# Prometheus and promtool for the dashboard tests (Debian's prometheus package).
prometheus_installed() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return 0
  _log "installing Debian's prometheus package (for the dashboard and alert tests)"
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
}

services_up() {
  postgres_up && sqs_up
}

# Stops what services_up started in this shell, leaving services that were already running.
services_down() {
  local s
  for s in "${_STARTED[@]}"; do
    case $s in
      postgres) postgres_down ;;
      tls_postgres) tls_postgres_down ;;
      sqs) sqs_down ;;
    esac
  done
  _STARTED=()
}

# A primary and its streaming standby, for the failover test (tests/chaos/failover.rs), in DIR:
#   pg_pair_up DIR PRIMARY_PORT STANDBY_PORT   fresh primary in DIR/primary, standby in DIR/standby (pg_basebackup -R -X stream)
#   pg_pair_stop_primary DIR                   the primary dies (`pg_ctl -m immediate stop`)
#   pg_pair_promote DIR                        the standby becomes the primary (`pg_ctl promote -w`)
#   pg_pair_down DIR                           both stopped, DIR removed
# Replication is synchronous (the standby confirms each commit's WAL before the commit returns),
# so a commit the primary acknowledged is on the standby when the primary dies: an asynchronous
# standby may miss the last commits, which no client can make up for. The setting lives only in
# the primary's postgresql.auto.conf, written after the base backup, so the promoted standby does
# not wait for a standby of its own.
_pg_pair_ctl() { # DIR NAME PORT pg_ctl-arguments...
  local dir=$1 name=$2 port=$3 bin; shift 3
  bin=$(_pg_bindir) || return 1
  _as_postgres "$bin/pg_ctl" -D "$dir/$name" -l "$dir/$name.log" -o "-p $port -k $dir" "$@"
}

_pg_pair_psql() { # PORT SQL
  local bin; bin=$(_pg_bindir) || return 1
  _as_postgres "$bin/psql" -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"
}

_pg_pair_wait() { # PORT SQL EXPECTED: up to 30 s for the query to answer EXPECTED
  local _
  for _ in $(seq 1 120); do
    [ "$(_pg_pair_psql "$1" "$2" 2>/dev/null)" = "$3" ] && return 0
    sleep 0.25
  done
  return 1
}

pg_pair_up() {
  local dir=$1 primary_port=$2 standby_port=$3 bin
  [ -n "$dir" ] && [ -n "$primary_port" ] && [ -n "$standby_port" ] || { _log "usage: pg-pair-up DIR PRIMARY_PORT STANDBY_PORT"; return 2; }
  bin=$(_pg_bindir) || { _install_postgres; bin=$(_pg_bindir); } || { _log "no PostgreSQL server binaries"; return 1; }
  pg_pair_down "$dir" || return 2
  mkdir -p "$dir" || return 1
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir" || return 1; fi
  chmod 700 "$dir"
  _as_postgres "$bin/initdb" -D "$dir/primary" --auth=trust -U postgres -E UTF8 --locale=C.UTF-8 >/dev/null || return 1
  # Settings both servers share (the standby copies this file); port and socket dir are per server.
  _as_postgres tee -a "$dir/primary/postgresql.conf" >/dev/null <<'CONF' || return 1
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
hot_standby = on
fsync = off
full_page_writes = off
max_connections = 100
CONF
  if ! grep -Eq '^[[:space:]]*host[[:space:]]+replication[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$dir/primary/pg_hba.conf"; then
    echo 'host replication all 127.0.0.1/32 trust' | _as_postgres tee -a "$dir/primary/pg_hba.conf" >/dev/null || return 1
  fi
  _pg_pair_ctl "$dir" primary "$primary_port" -w -t 60 start >/dev/null || { _log "primary did not start:"; tail -n 20 "$dir/primary.log" >&2; return 1; }
  _as_postgres "$bin/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres -D "$dir/standby" -R -X stream >/dev/null ||
    { _log "pg_basebackup failed"; return 1; }
  _pg_pair_ctl "$dir" standby "$standby_port" -w -t 60 start >/dev/null || { _log "standby did not start:"; tail -n 20 "$dir/standby.log" >&2; return 1; }
  _pg_pair_wait "$primary_port" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" 1 &&
    _pg_pair_wait "$standby_port" 'SELECT pg_is_in_recovery()' t ||
    { _log "the standby is not streaming (logs: $dir/*.log)"; return 1; }
  _pg_pair_psql "$primary_port" "ALTER SYSTEM SET synchronous_standby_names = '*'" &&
    _pg_pair_psql "$primary_port" 'SELECT pg_reload_conf()' >/dev/null || return 1
  _pg_pair_wait "$primary_port" "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'" 1 ||
    { _log "the standby did not become synchronous"; return 1; }
  _log "primary on 127.0.0.1:$primary_port, synchronous streaming standby on 127.0.0.1:$standby_port (in $dir)"
}

pg_pair_stop_primary() {
  _pg_pair_ctl "$1" primary 0 -m immediate -w stop >/dev/null
}

pg_pair_promote() {
  _pg_pair_ctl "$1" standby 0 -w -t 60 promote >/dev/null
}

pg_pair_down() {
  local dir=$1 name
  case $dir in "" | / | /tmp | /var/tmp) _log "usage: pg-pair-down DIR (a directory of its own)"; return 2 ;; esac
  for name in primary standby; do
    [ -f "$dir/$name/PG_VERSION" ] && _pg_pair_ctl "$dir" "$name" 0 -m fast -w -t 30 stop >/dev/null 2>&1
  done
  rm -rf "$dir"
  return 0
}

# Run as a command (the fault-injection tests use this to stop and restart PostgreSQL).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    postgres-stop) postgres_down ;;
    postgres-start) PG_FAST=${PG_FAST:-1} postgres_up ;;
    pg-pair-up) pg_pair_up "${@:2}" ;;
    pg-pair-stop-primary) pg_pair_stop_primary "${2:?pg-pair-stop-primary DIR}" ;;
    pg-pair-promote) pg_pair_promote "${2:?pg-pair-promote DIR}" ;;
    pg-pair-down) pg_pair_down "${2:-}" ;;
    *) echo "usage: scripts/services.sh postgres-stop|postgres-start|pg-pair-up DIR PRIMARY_PORT STANDBY_PORT|pg-pair-stop-primary DIR|pg-pair-promote DIR|pg-pair-down DIR (or source it and call services_up)" >&2; exit 2 ;;
  esac
fi
