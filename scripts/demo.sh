#!/usr/bin/env bash
# The whole job end to end on this machine: start PostgreSQL and the SQS emulator if none
# is reachable, seed the sample, drain it into PostgreSQL with `loginflow run --drain`,
# and print a summary with a few masked rows.
#
#   SAMPLE=path/to/records.json scripts/demo.sh     # another JSON array of records
#   MASK_KEY=... scripts/demo.sh                     # your own key (else a throw-away one)
#   KEEP_SERVICES=1 scripts/demo.sh                  # leave PostgreSQL and the emulator running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
SAMPLE=${SAMPLE:-data/sample_logins.json}
DEMO_DATABASE=${DEMO_DATABASE:-loginflow_demo}

if [ "${KEEP_SERVICES:-0}" != 1 ]; then trap services_down EXIT; fi
services_up
ADMIN_URL=$DATABASE_URL
export DATABASE_URL="${ADMIN_URL%/*}/$DEMO_DATABASE"
export QUEUE_URL=${QUEUE_URL:-http://127.0.0.1:$SQS_PORT/000000000000/login-queue}
if [ -z "${MASK_KEY:-}" ] && [ -z "${MASK_KEY_FILE:-}" ]; then
  MASK_KEY="demo-throwaway-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export MASK_KEY
  echo "[demo] MASK_KEY is not set: using a throw-away key for this demo only (masks will differ from other runs)"
fi

echo "[demo] building loginflow"
cargo build --quiet --bin loginflow
bin=target/debug/loginflow

echo "[demo] fresh database $DEMO_DATABASE"
psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DEMO_DATABASE" -c "CREATE DATABASE $DEMO_DATABASE"

echo "[demo] seeding $SAMPLE"
seeded=$("$bin" seed --file "$SAMPLE")
echo "[demo] $seeded"
export QUEUE_URL=${seeded##* to }

# The PII vault (SPEC §4b) with a throw-away KMS key on the emulator, unless one is given.
if [ -z "${PII_KMS_KEY_ID:-}" ]; then
  py=python3 # the emulator's venv has boto3
  for candidate in "$LOGINFLOW_STATE"/localstack-*/bin/python "$LOGINFLOW_STATE"/moto/bin/python; do
    [ -x "$candidate" ] && { py=$candidate; break; }
  done
  PII_KMS_KEY_ID=$(AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test "$py" -c "
import boto3, sys
kms = boto3.client('kms', endpoint_url=sys.argv[1], region_name='us-east-1')
print(kms.create_key(Description='loginflow demo vault (throw-away)')['KeyMetadata']['KeyId'])" "$AWS_ENDPOINT_URL")
  export PII_KMS_KEY_ID
  echo "[demo] PII vault on with a throw-away KMS key on the emulator: $PII_KMS_KEY_ID"
fi

echo "[demo] loginflow run --drain"
export METRICS_ADDR=${METRICS_ADDR:-127.0.0.1:0} RECEIVE_WAIT_SECS=${RECEIVE_WAIT_SECS:-2}
summary=$(timeout 300 "$bin" run --drain)

echo
echo "== summary (loginflow run --drain)"
echo "$summary"
echo
echo "== in PostgreSQL"
psql -q "$DATABASE_URL" -P footer=off -c "
  SELECT (SELECT count(*) FROM user_logins)                          AS rows_written,
         (SELECT count(*) FROM user_logins WHERE locale IS NULL)     AS null_locale,
         (SELECT count(*) FROM user_logins_quarantine)               AS quarantined,
         (SELECT count(*) - count(DISTINCT message_id) FROM user_logins) AS duplicate_rows"
psql -q "$DATABASE_URL" -P footer=off -c "SELECT reason, detail, left(masked_body, 60) AS masked_body FROM user_logins_quarantine"
psql -q "$DATABASE_URL" -P footer=off -c "
  SELECT user_id, device_type, left(masked_ip, 16) || '…' AS masked_ip,
         left(masked_device_id, 16) || '…' AS masked_device_id, locale, app_version, app_version_string, create_date
  FROM user_logins_readable ORDER BY sent_at, user_id LIMIT 5"


echo
echo "== the vault: who is behind a demo row? (loginflow reveal, audited)"
demo_id=$(psql -qAt "$DATABASE_URL" -c "SELECT message_id FROM user_logins ORDER BY sent_at, user_id LIMIT 1")
"$bin" reveal --message-id "$demo_id" --reason "demo: show one recovery"
psql -q "$DATABASE_URL" -P footer=off -c "SELECT at, who, why, action, message_ids FROM pii_access_log ORDER BY id DESC LIMIT 1"

echo
if [ "${KEEP_SERVICES:-0}" = 1 ]; then
  echo "[demo] services left running (KEEP_SERVICES=1). Look around:"
  echo "  psql '$DATABASE_URL' -c 'SELECT * FROM user_logins_readable LIMIT 10'"
  echo "  psql '$DATABASE_URL' -c 'SELECT reason, detail, masked_body FROM user_logins_quarantine'"
  echo "Stop them with:  bash -c 'source scripts/services.sh; postgres_down; sqs_down'"
else
  echo "[demo] services this demo started are stopped on exit; KEEP_SERVICES=1 scripts/demo.sh keeps them"
fi
