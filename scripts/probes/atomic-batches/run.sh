#!/usr/bin/env bash
# Runs the probe against one nats-server version: ./run.sh 2.15.1 cases|extra|bench
set -u
v=$1; mode=$2
bin=${PROBE_DIR:-/tmp/probe}/srv/$v/bin/nats-server
mkdir -p ${PROBE_DIR:-/tmp/probe}/results
for _ in $(seq 1 50); do
  port=$(( 20000 + RANDOM % 30000 ))
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
done
rm -rf ${PROBE_DIR:-/tmp/probe}/js-$v
$bin -a 127.0.0.1 -p $port -js -sd ${PROBE_DIR:-/tmp/probe}/js-$v >${PROBE_DIR:-/tmp/probe}/results/server-$v-$mode.log 2>&1 &
pid=$!
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
${PROBE_DIR:-/tmp/probe}/target/debug/batch-probe nats://127.0.0.1:$port $mode 2>&1 | tee ${PROBE_DIR:-/tmp/probe}/results/$v-$mode.txt
kill $pid; wait $pid 2>/dev/null
