#!/usr/bin/env bash
# Each supported combination of edupulse-events' features builds without warnings, and a
# build holds only the drivers it asked for: a PostgreSQL + NATS build has no SQLite
# library, an embedded build neither the PostgreSQL driver nor the NATS client.
#
#   scripts/features.sh
set -euo pipefail
cd "$(dirname "$0")/.."

combinations=(
  "derive,postgres,nats"   # a service on PostgreSQL and NATS JetStream
  "derive,sqlite"          # an embedded tool, or tests on the embedded store
  "derive,sqlite,nats"     # embedded store, NATS
  "postgres"               # without the derive (events implemented by hand)
)
for features in "${combinations[@]}"; do
  echo "== cargo clippy -p edupulse-events --no-default-features --features $features"
  cargo clippy -q -p edupulse-events --no-default-features --features "$features" -- -D warnings
done

# What each build links (normal and build dependencies: what a service ships).
tree() {
  cargo tree -q -p edupulse-events --no-default-features --features "$1" -e normal,build --prefix none |
    sed 's/ (\*)$//' | sort -u
}
absent() {
  local features="$1"; shift
  local found
  found=$(tree "$features" | grep -E "^($(IFS='|'; echo "$*")) v" || true)
  if [ -n "$found" ]; then
    echo "features: the build with \`$features\` holds what it did not ask for:" >&2
    echo "$found" >&2
    exit 1
  fi
  echo "== \`$features\`: none of $*"
}
absent "derive,postgres,nats" libsqlite3-sys sqlx-sqlite
absent "derive,sqlite" sqlx-postgres async-nats
absent "derive,sqlite,nats" sqlx-postgres
absent "postgres" libsqlite3-sys sqlx-sqlite async-nats edupulse-events-derive
echo "features: every combination builds; each holds only its drivers"
