#!/usr/bin/env bash
# The whole test suite: formatting, clippy, unit and integration tests against a real
# PostgreSQL and a real SQS emulator, both started here (and stopped after) if not running.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
cargo clippy --test chaos --quiet -- -D warnings

trap services_down EXIT
export PG_FAST=1
services_up
tls_postgres_up
prometheus_installed

export LOGINFLOW_TEST_DATABASE_URL="$DATABASE_URL"
echo "== cargo test (unit, integration, deploy files)"
cargo test --lib --bins --tests -- --test-threads "${TEST_THREADS:-4}"
echo "== Kubernetes manifests (deploy/kubernetes): schemas, KEDA CRDs, agreement with the binary"
scripts/validate_manifests.sh
echo "== benches, once each in test mode (they compile and run)"
cargo test --bench cpu_path --bench sink
echo "== fault injection (scripts/chaos.sh)"
scripts/chaos.sh
