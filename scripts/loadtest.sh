#!/usr/bin/env bash
# Load test, everything side by side in one run against the same LocalStack and PostgreSQL:
#   A. a bare aws-sdk-sqs client's receive+delete rate on N messages      (examples/bare_sqs_client.rs)
#   R. the bare client receiving only (no deletes): the ceiling on any consumer's rows-visible rate
#   B. loginflow's end-to-end rate on N messages (process start -> the last row's commit, and -> queue empty
#      and process exited), peak RSS, whole-process CPU per message (A's too, same N)
#   C. end-to-end latency p50/p99 at a steady publish rate (LATENCY_RATE msg/s for LATENCY_SECS s),
#      SentTimestamp -> commit (pg_xact_commit_timestamp; services.sh turns track_commit_timestamp on)
#   D. psql \copy of B's rows into a fresh user_logins vs loginflow's sink writing the same rows
#   P. real round trips: P_N (10000) messages drained through scripts/latency_proxy.py (PROXY_DELAY_MS, 10, added
#      each way) and without it, loginflow's defaults (adaptive pollers) and POLLERS=4, side by side; SQS requests
#      per message by action and dollars per million messages (SQS_PRICE_PER_MILLION, 0.40)
#   I. an idle queue for IDLE_SECS (60): SQS requests a minute
# Settings: N (200000), POLLERS (4: the bare client's pollers; loginflow runs its defaults, adaptive, unless
#           its own settings are in the environment), LATENCY_RATE (1000), LATENCY_SECS (20),
#           REPLICAS (1: loginflow processes in B), PHASES (ARBCD: which of the above to run),
#           PIN (1 on a machine of 2 or more cores: during A, R and B, LocalStack and PostgreSQL run on one CPU and
#           the measured clients on another, so a client's CPU time is not inflated by preemption and context
#           switches to the services; C and D run unpinned. 0: never pin).
# Any loginflow setting (BATCH_MAX_ROWS, POLLERS, ...) set in the environment applies to B, C and D.
# Results: printed, and written to target/loadtest/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200000}
POLLERS=${POLLERS:-4}
LATENCY_RATE=${LATENCY_RATE:-1000}
LATENCY_SECS=${LATENCY_SECS:-20}
REPLICAS=${REPLICAS:-1}
PHASES=${PHASES:-ARBCDPI}
[[ $PHASES != *D* || $PHASES == *B* ]] || { echo "phase D needs the rows of phase B (PHASES=...BD)"; exit 1; }
source scripts/services.sh
trap 'unpin 2>/dev/null || true; services_down' EXIT
services_up
ADMIN_URL=$DATABASE_URL
OUT=target/loadtest
mkdir -p "$OUT"
echo "[loadtest] building (release)"
cargo build --release --quiet --bins --examples
BIN=target/release/loginflow
# The CPUs this script may use, one per line; PIN needs two of them (and uses only two).
allowed_cpus=$(awk '/^Cpus_allowed_list/ { print $2 }' /proc/$$/status)
mapfile -t cpus < <(tr ',' '\n' <<<"$allowed_cpus" | awk -F- '{ for (i = $1; i <= (NF == 2 ? $2 : $1); i++) print i }')
PIN=${PIN:-$([ "${#cpus[@]}" -ge 2 ] && echo 1 || echo 0)}
# Moves LocalStack, PostgreSQL (its running processes; backends forked later inherit the postmaster's CPUs) and
# this script with the clients it starts: `services-cpus client-cpus`. Thread by thread: `taskset -a` gives up
# on the rest of a process when one of its threads has ended meanwhile.
place() {
  local pid thread
  for pid in "$sqs_pid" "$pg_pid" $(pgrep -P "$pg_pid" || true); do
    for thread in /proc/"$pid"/task/*; do taskset -cp "$1" "${thread##*/}" >/dev/null 2>&1 || true; done
  done
  taskset -cp "$2" $$ >/dev/null
}
pinned=0
pin() {
  [ "$PIN" = 1 ] || return 0
  [ "${#cpus[@]}" -ge 2 ] || { echo "PIN=1 needs 2 CPUs; this script may use $allowed_cpus"; exit 1; }
  sqs_pid=$(cat "$LOGINFLOW_STATE/sqs.pid" 2>/dev/null || true)
  [ -n "$sqs_pid" ] && kill -0 "$sqs_pid" 2>/dev/null ||
    { echo "PIN=1 needs the LocalStack this script starts (stop the running one, or set PIN=0)"; exit 1; }
  pg_pid=$(head -n 1 "$PG_DIR/data/postmaster.pid" 2>/dev/null) ||
    { echo "PIN=1 needs the PostgreSQL this script starts in $PG_DIR (stop the running one, or set PIN=0)"; exit 1; }
  place "${cpus[0]}" "${cpus[1]}"
  pinned=1
  echo "[loadtest] pinned for A, R and B: LocalStack and PostgreSQL on CPU ${cpus[0]}, the clients on CPU ${cpus[1]}"
}
unpin() {
  [ "${pinned:-0}" = 1 ] || return 0
  place "$allowed_cpus" "$allowed_cpus"
  pinned=0
}
export MASK_KEY="loadtest-throwaway-key-0123456789abcdef" METRICS_ADDR=127.0.0.1:0
run_id=$$

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
elapsed() { calc "$2 - $1"; }
fresh_db() { PGOPTIONS='--client-min-messages=warning' psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"; echo "${ADMIN_URL%/*}/$1"; }
seed() { # queue-name count [extra args] -> prints the queue URL
  local name=$1 count=$2; shift 2
  QUEUE_URL="$AWS_ENDPOINT_URL/000000000000/$name" "$BIN" seed --count "$count" "$@" | sed 's/.* to //'
}
stored() { psql -XqtA "$1" -c "SELECT (SELECT count(*) FROM user_logins) + (SELECT count(*) FROM user_logins_quarantine)" 2>/dev/null || echo 0; }

has() { [[ $PHASES == *$1* ]]; }
if has B || has C; then
  [ "$(psql -XqtA "$ADMIN_URL" -c 'SHOW track_commit_timestamp')" = on ] ||
    { echo "phases B and C read commit timestamps: the PostgreSQL at DATABASE_URL needs track_commit_timestamp=on"; exit 1; }
fi
results=()
row() { results+=("$(printf "$@")"); }
pct() { awk "BEGIN { printf \"%.0f\", 100 * $1 / $2 }"; }

# The queue service's own CPU (user + system of LocalStack and its threads), in seconds.
# "n/a" when this script did not start it (services.sh reuses a running endpoint without a pid file).
service_cpu() {
  local pid
  pid=$(cat "$LOGINFLOW_STATE/sqs.pid" 2>/dev/null) && [ -r "/proc/$pid/stat" ] || { echo n/a; return; }
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$pid/stat"
}
# ... per message of a phase that started at CPU $1 (microseconds).
service_us_per_message() {
  local now
  now=$(service_cpu)
  if [ "$1" = n/a ] || [ "$now" = n/a ]; then echo n/a; else printf '%.1f' "$(calc "($now - $1) * 1e6 / $N")"; fi
}

# The emulator drifts over a long run (whichever phase comes later is slower), so with both A and B
# the bare client runs before and after loginflow, and B is compared with the mean of the two.
bare_rates=()
bare_service_cpu=()
bare_client() {
  echo "[loadtest] A. bare SDK client: $N messages, $POLLERS pollers ($1)"
  local queue rate cpu_before
  queue=$(seed "lt-bare-$1-$run_id" "$N")
  cpu_before=$(service_cpu)
  # Not a process substitution: /usr/bin/time writes its file only after the client exits.
  /usr/bin/time -v -o "$OUT/time-bare-$1.txt" target/release/examples/bare_sqs_client "$queue" "$N" "$POLLERS" \
    >"$OUT/bare-$1.txt"
  read -r _ _ rate <"$OUT/bare-$1.txt"
  bare_rates+=("$rate")
  bare_service_cpu+=("$(service_us_per_message "$cpu_before")")
  local total user system
  read -r total user system < <(cpu_per_message "$OUT/time-bare-$1.txt")
  bare_cpu+=("$total")
  bare_cpu_split+=("$user + $system")
}
bare_cpu=()
bare_cpu_split=()
# Whole-process CPU per message, in microseconds, from /usr/bin/time -v: "total user system" (user and system
# apart because the system part swings most between runs: see BENCHMARKS.md).
cpu_per_message() {
  awk -F': ' -v n="$N" '/User time/ {u=$2} /System time/ {s=$2}
    END { printf "%.1f %.1f %.1f\n", (u + s) * 1e6 / n, u * 1e6 / n, s * 1e6 / n }' "$1"
}
if has A || has R || has B; then
  pin
  # A LocalStack just started answers slower for its first few thousand messages, and a slower service costs a
  # client more CPU per message (more wake-ups): the first phase would be measured at a disadvantage.
  echo "[loadtest] warming the queue service up: 5000 messages, not measured"
  warm_queue=$(seed "lt-warm-up-$run_id" 5000)
  target/release/examples/bare_sqs_client "$warm_queue" 5000 "$POLLERS" >/dev/null
fi
has A && bare_client before

if has R; then
  echo "[loadtest] R. bare SDK client, receive only: $N messages, $POLLERS pollers"
  queue=$(seed "lt-receive-$run_id" "$N")
  read -r _ _ receive_rate < <(target/release/examples/bare_sqs_client "$queue" "$N" "$POLLERS" receive-only)
fi

if has B; then
  echo "[loadtest] B. loginflow run --drain: $N messages, $REPLICAS process(es)"
  queue=$(seed "lt-flow-$run_id" "$N")
  flow_db=$(fresh_db loadtest_flow)
  DATABASE_URL=$flow_db "$BIN" migrate >/dev/null
  flow_cpu_before=$(service_cpu)
  start=$(now)
  pids=()
  for r in $(seq 1 "$REPLICAS"); do
    QUEUE_URL=$queue DATABASE_URL=$flow_db /usr/bin/time -v -o "$OUT/time-$r.txt" "$BIN" run --drain \
      >"$OUT/summary-$r.json" 2>"$OUT/run-$r.log" &
    pids+=($!)
  done
  # Nothing polls the database meanwhile: a psql every 0.1 s took ~16 % of the clients' CPU and ~4 % of the
  # services' (a connection and two counts each), during B only. The last row's commit time is read afterwards.
  for r in $(seq 1 "$REPLICAS"); do
    wait "${pids[r - 1]}" || { echo "loginflow (process $r) failed"; cat "$OUT/run-$r.log"; for p in "${pids[@]}"; do pkill -TERM -P "$p" || true; done; exit 1; }
  done
  queue_empty=$(now)
  stored_rows=$(stored "$flow_db")
  [ "$stored_rows" -ge "$N" ] || { echo "loginflow stored $stored_rows of $N"; tail -n 20 "$OUT"/run-*.log; exit 1; }
  last_row=$(psql -XqtA "$flow_db" -c "SELECT extract(epoch FROM greatest(
    (SELECT max(pg_xact_commit_timestamp(xmin)) FROM user_logins),
    (SELECT max(pg_xact_commit_timestamp(xmin)) FROM user_logins_quarantine)))")
  flow_service_cpu=$(service_us_per_message "$flow_cpu_before")
  flow_secs=$(elapsed "$start" "$last_row")
  flow_rate=$(calc "$N / $flow_secs")
  empty_rate=$(calc "$N / $(elapsed "$start" "$queue_empty")")
  rss_kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$OUT/time-1.txt")
  read -r flow_cpu flow_user flow_system < <(cpu_per_message "$OUT/time-1.txt")
  row '| B. loginflow end to end, %s messages, %s process(es): rows visible | %.0f msg/s in %.1f s | >= 90%% of A |' \
    "$N" "$REPLICAS" "$flow_rate" "$flow_secs"
  row '| B. loginflow: queue empty and process exited | %.0f msg/s | |' "$empty_rate"
  row '| B. loginflow peak RSS (one process) | %.1f MiB | <= 64 MiB |' "$(calc "$rss_kib / 1024")"
  row '| B. loginflow CPU per message (user + system, whole process) | %s µs (%s + %s) | |' "$flow_cpu" "$flow_user" "$flow_system"
  row '| B. the queue service'"'"'s CPU per message during B | %s µs | |' "$flow_service_cpu"
  echo "summary of B (process 1): $(tr -d '\n ' <"$OUT/summary-1.json")"
fi

if has A; then
  has B && bare_client after
  bare_rate=$(printf '%s\n' "${bare_rates[@]}" | awk '{ sum += $1 } END { printf "%.6f", sum / NR }')
  row '| A. bare SDK client, receive+delete (%s pollers) | %.0f msg/s (runs: %s) | |' "$POLLERS" "$bare_rate" \
    "$(printf '%.0f ' "${bare_rates[@]}" | sed 's/ $//; s/ / and /')"
  bare_cpu_mean=$(printf '%s\n' "${bare_cpu[@]}" | awk '{ sum += $1 } END { printf "%.1f", sum / NR }')
  row '| A. bare SDK client CPU per message | %s µs (runs: %s) | |' "$bare_cpu_mean" "$(printf '%s ' "${bare_cpu[@]}" | sed 's/ $//; s/ / and /')"
  row '| A. ... user + system | %s | |' "$(printf '%s; ' "${bare_cpu_split[@]}" | sed 's/; $//')"
  row '| A. the queue service'"'"'s CPU per message during A | %s µs | |' "$(printf '%s ' "${bare_service_cpu[@]}" | sed 's/ $//; s/ / and /')"
  if [ -n "${flow_rate:-}" ]; then
    row '| B / A (rows visible) | %s%% | >= 90%%; goal 135%% |' "$(pct "$flow_rate" "$bare_rate")"
    row '| B CPU / A CPU per message | %s | <= 1.2 |' "$(calc "$flow_cpu / $bare_cpu_mean")"
  fi
fi
if [ -n "${receive_rate:-}" ]; then
  row '| R. bare SDK client, receive only: the ceiling on rows visible | %.0f msg/s%s | |' "$receive_rate" \
    "$([ -n "${bare_rate:-}" ] && echo ", $(pct "$receive_rate" "$bare_rate")% of A")"
fi

unpin
if has C; then
  echo "[loadtest] C. latency at $LATENCY_RATE msg/s for $LATENCY_SECS s"
  latency_n=$((LATENCY_RATE * LATENCY_SECS))
  latency_db=$(fresh_db loadtest_latency)
  queue=$(seed "lt-latency-$run_id" 0)
  QUEUE_URL=$queue DATABASE_URL=$latency_db "$BIN" run >/dev/null 2>"$OUT/latency.log" &
  latency_pid=$!
  seed "lt-latency-$run_id" "$latency_n" --rate "$LATENCY_RATE" --rng-seed 7 >/dev/null
  while [ "$(stored "$latency_db")" -lt "$latency_n" ]; do sleep 0.2; done
  kill -TERM "$latency_pid"
  wait "$latency_pid"
  read -r p50 p99 < <(psql -qtA -F' ' "$latency_db" -c "
    WITH l AS (SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - sent_at) AS s FROM user_logins)
    SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY s)::numeric * 1000, 1),
           round(percentile_cont(0.99) WITHIN GROUP (ORDER BY s)::numeric * 1000, 1)
    FROM l")
  row '| C. end-to-end latency at %s msg/s (SentTimestamp -> commit) | p50 %s ms, p99 %s ms | p50 <= 100 ms |' \
    "$LATENCY_RATE" "$p50" "$p99"
fi

# P. Real round trips: a proxy adds PROXY_DELAY_MS (10) each way to every SQS call (20 ms round trips, as AWS
# answers), and loginflow drains P_N messages through it and without it, with the adaptive defaults and with
# POLLERS=4 pinned, side by side. Also what SQS bills: requests per message, by action, and dollars per million.
# I. An idle queue for IDLE_SECS: SQS requests a minute.
SQS_PRICE_PER_MILLION=${SQS_PRICE_PER_MILLION:-0.40}
requests_of() { # summary.json -> "total receive delete visibility other"
  python3 -c 'import json,sys
r = json.load(open(sys.argv[1])).get("sqs_requests", {})
total = sum(r.values())
print(total, r.get("ReceiveMessage", 0), r.get("DeleteMessageBatch", 0), r.get("ChangeMessageVisibilityBatch", 0),
      total - r.get("ReceiveMessage", 0) - r.get("DeleteMessageBatch", 0) - r.get("ChangeMessageVisibilityBatch", 0))' "$1"
}
if has P || has I; then
  PROXY_PORT=${PROXY_PORT:-4567}
  PROXY_DELAY_MS=${PROXY_DELAY_MS:-10}
  python3 scripts/latency_proxy.py --listen "127.0.0.1:$PROXY_PORT" --target "${AWS_ENDPOINT_URL#http://}" \
    --delay-ms "$PROXY_DELAY_MS" >"$OUT/proxy.log" 2>&1 &
  proxy_pid=$!
  trap 'kill "$proxy_pid" 2>/dev/null; unpin 2>/dev/null || true; services_down' EXIT
  for _ in $(seq 1 50); do grep -q listening "$OUT/proxy.log" && break; sleep 0.1; done
  grep -q listening "$OUT/proxy.log" || { echo "the latency proxy did not start"; cat "$OUT/proxy.log"; exit 1; }
  PROXY_URL=http://127.0.0.1:$PROXY_PORT
fi
if has P; then
  P_N=${P_N:-10000}
  drain_through() { # label endpoint pollers(empty = adaptive) -> "rate requests receive delete visibility other"
    local label=$1 endpoint=$2 pollers=$3 queue db start last
    queue=$(seed "lt-rtt-$label-$run_id" "$P_N")
    db=$(fresh_db "loadtest_rtt_${label//-/_}")
    DATABASE_URL=$db "$BIN" migrate >/dev/null
    start=$(now)
    if [ -n "$pollers" ]; then
      AWS_ENDPOINT_URL=$endpoint QUEUE_URL=$queue DATABASE_URL=$db POLLERS=$pollers "$BIN" run --drain \
        >"$OUT/summary-rtt-$label.json" 2>"$OUT/run-rtt-$label.log"
    else
      env -u POLLERS AWS_ENDPOINT_URL="$endpoint" QUEUE_URL="$queue" DATABASE_URL="$db" "$BIN" run --drain \
        >"$OUT/summary-rtt-$label.json" 2>"$OUT/run-rtt-$label.log"
    fi
    [ "$(stored "$db")" -ge "$P_N" ] || { echo "P ($label) stored $(stored "$db") of $P_N"; tail -n 20 "$OUT/run-rtt-$label.log"; exit 1; }
    last=$(psql -XqtA "$db" -c "SELECT extract(epoch FROM greatest(
      (SELECT max(pg_xact_commit_timestamp(xmin)) FROM user_logins),
      (SELECT max(pg_xact_commit_timestamp(xmin)) FROM user_logins_quarantine)))")
    echo "$(calc "$P_N / $(elapsed "$start" "$last")") $(requests_of "$OUT/summary-rtt-$label.json")"
  }
  for setting in adaptive fixed4; do
    pollers=$([ "$setting" = fixed4 ] && echo 4 || echo "")
    echo "[loadtest] P. $P_N messages, $setting pollers: without the proxy, then with $((2 * PROXY_DELAY_MS)) ms round trips"
    read -r direct_rate _ < <(drain_through "$setting-direct" "$AWS_ENDPOINT_URL" "$pollers")
    read -r rtt_rate requests receives deletes visibility other < <(drain_through "$setting-rtt" "$PROXY_URL" "$pollers")
    row '| P. %s messages, %s: %s ms round trips vs none | %.0f vs %.0f msg/s (**%s%%**) | %s |' "$P_N" \
      "$([ "$setting" = fixed4 ] && echo "POLLERS=4" || echo "defaults (adaptive pollers)")" "$((2 * PROXY_DELAY_MS))" \
      "$rtt_rate" "$direct_rate" "$(pct "$rtt_rate" "$direct_rate")" "$([ "$setting" = adaptive ] && echo ">= 90%")"
    per_message=$(calc "$requests / $P_N")
    row '| P. ... SQS requests per message (%s receive, %s delete, %s visibility, %s other) | %.3f = $%.3f per million messages | %s |' \
      "$receives" "$deletes" "$visibility" "$other" "$per_message" "$(calc "$per_message * $SQS_PRICE_PER_MILLION")" \
      "$([ "$setting" = adaptive ] && echo "<= 0.25")"
  done
fi
if has I; then
  IDLE_SECS=${IDLE_SECS:-60}
  echo "[loadtest] I. an empty queue for $IDLE_SECS s, defaults"
  queue=$(seed "lt-idle-$run_id" 0)
  idle_db=$(fresh_db loadtest_idle)
  env -u POLLERS QUEUE_URL="$queue" DATABASE_URL="$idle_db" "$BIN" run >"$OUT/summary-idle.json" 2>"$OUT/idle.log" &
  idle_pid=$!
  sleep "$IDLE_SECS"
  kill -TERM "$idle_pid"
  wait "$idle_pid"
  read -r requests receives _ _ other < <(requests_of "$OUT/summary-idle.json")
  row '| I. idle queue, %s s: SQS requests a minute (%s receive, %s other) | %.1f | <= 6 |' "$IDLE_SECS" "$receives" "$other" \
    "$(calc "$requests * 60 / $IDLE_SECS")"
fi

if has D; then
  echo "[loadtest] D. psql \\copy vs loginflow's sink, same rows, same table"
  csv=$(realpath "$OUT")/rows.csv
  psql -q "$flow_db" -c "\\copy (SELECT message_id, user_id, device_type, masked_ip, masked_device_id, locale, app_version, app_version_text, to_json(sent_at) #>> '{}', create_date FROM user_logins) TO '$csv' CSV"
  rows=$(wc -l <"$csv")
  copy_db=$(fresh_db loadtest_copy)
  DATABASE_URL=$copy_db "$BIN" migrate >/dev/null
  start=$(now)
  psql -q "$copy_db" -c "\\copy user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, locale, app_version, app_version_text, sent_at, create_date) FROM '$csv' CSV"
  copy_rate=$(calc "$rows / $(elapsed "$start" "$(now)")")
  sink_db=$(fresh_db loadtest_sink)
  read -r _ _ sink_rate < <(target/release/examples/sink_load "$csv" "$sink_db" "${BATCH_MAX_ROWS:-1000}" "${SINK_CONNECTIONS:-2}")
  row '| D. psql \\copy, %s rows | %.0f rows/s | |' "$rows" "$copy_rate"
  row '| D. loginflow sink, same rows (%s/batch, %s connections) | %.0f rows/s (%s%% of \\copy) | >= 80%% of \\copy |' \
    "${BATCH_MAX_ROWS:-1000}" "${SINK_CONNECTIONS:-2}" "$sink_rate" "$(pct "$sink_rate" "$copy_rate")"
fi

{
  echo "| measure | value | bar |"
  echo "|---|---|---|"
  printf '%s\n' "${results[@]}"
} | tee "$OUT/results.md"
