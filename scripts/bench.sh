#!/usr/bin/env bash
# Runs the benchmarks: the criterion decode benchmark, then the end-to-end load generator
# against a throw-away PostgreSQL and nats-server on loopback (unless DATABASE_URL / NATS_URL
# are set). PostgreSQL runs with fsync and synchronous_commit on, as in production; the load
# generator's `--fsync off` turns fsync off for a second table. Arguments go to the load
# generator: --quick, --only append|publish|relay|replay|wake, --fsync off.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh
export SERVICES_DURABLE=1
services_start
cargo bench -p edupulse-events-bench --bench decode
cargo bench -p edupulse-events-bench --bench loadgen -- "$@"
