#!/usr/bin/env bash
# Runs the whole test suite: starts PostgreSQL and nats-server on loopback (unless
# DATABASE_URL / NATS_URL are set), then `cargo test --workspace`, then the broker tests that
# start servers of their own (tests/bus.rs, tests/broker_durability.rs) once more on the
# nats-server with atomic batches (2.15.1). Extra arguments go to cargo test (and skip the
# second pass).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh
services_start
cargo test --workspace "$@"
if [ $# -eq 0 ]; then
  echo "[test] tests/bus.rs and tests/broker_durability.rs on $EDUPULSE_NATS_SERVER_BATCH_BIN" >&2
  EDUPULSE_NATS_SERVER_BIN="$EDUPULSE_NATS_SERVER_BATCH_BIN" cargo test --test bus --test broker_durability
fi
