#!/usr/bin/env bash
# The fault-injection suite (RELIABILITY.md): kill -9, PostgreSQL stopped for 30 s, the SQS endpoint gone
# for 30 s, three replicas, a flush slower than the visibility timeout, SIGTERM mid-drain.
# One test at a time: some of them stop the shared PostgreSQL. Called by scripts/test.sh;
# runs on its own too (it starts the services it needs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
trap services_down EXIT
export PG_FAST=1
services_up
export LOGINFLOW_TEST_DATABASE_URL="$DATABASE_URL"
cargo test --test chaos -- --test-threads 1 --nocapture "$@"
