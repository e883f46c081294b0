#!/usr/bin/env bash
# Runs the benchmarks: the criterion decode benchmark, then the end-to-end load generator
# against a throw-away PostgreSQL and nats-server on loopback (unless DATABASE_URL / NATS_URL
# are set). PostgreSQL runs with fsync and synchronous_commit on, as in production, or with
# both off after `--fsync off` (the second table). Other arguments go to the load generator:
# --quick, --only append|publish|relay|replay|wake.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh
export SERVICES_DURABLE=1
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--fsync" ] && [ "${2:-}" = "off" ]; then
    SERVICES_DURABLE=0
    shift 2
  else
    args+=("$1")
    shift
  fi
done
services_start
cargo bench -p edupulse-events-bench --bench decode
cargo bench -p edupulse-events-bench --bench loadgen -- "${args[@]}"
