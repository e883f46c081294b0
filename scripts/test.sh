#!/usr/bin/env bash
# Runs the whole test suite: starts PostgreSQL and nats-server on loopback (unless
# DATABASE_URL / NATS_URL are set), then `cargo test --workspace`. Extra arguments go to
# cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh
services_start
cargo test --workspace "$@"
