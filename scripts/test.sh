#!/usr/bin/env bash
# Runs the whole test suite: starts PostgreSQL and nats-server on loopback (unless
# DATABASE_URL / NATS_URL are set), then `cargo test --workspace`. Extra arguments go to
# cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh
services_start
# Tests that need a server fail when it is absent; in this script it is always present.
export EDUPULSE_REQUIRE_SERVERS=1
cargo test --workspace "$@"
