#!/usr/bin/env bash
# Start, stop and describe the local cloud emulators dlq-bridge is tested against.
#
#   scripts/emulators.sh start [NAME...]   start (installing if missing) and wait until ready
#   scripts/emulators.sh stop  [NAME...]   stop what `start` started
#   scripts/emulators.sh env   [NAME...]   print `export` lines pointing clients at them
#   scripts/emulators.sh status
#   scripts/emulators.sh logs  [NAME...]   print the last lines of each one's log (CI prints them on a failure)
#
# NAME is sqs (moto), pubsub (Google's emulator) or servicebus (the project's
# emulator, emulators/servicebus); default: all of them.
# Everything binds 127.0.0.1. Ports: DLQ_BRIDGE_SQS_PORT (4566), DLQ_BRIDGE_PUBSUB_PORT (8085),
# DLQ_BRIDGE_SERVICEBUS_HTTP_PORT (5300, the ATOM counts). Service Bus's AMQP port is
# always 5672: azservicebus dials 5672 whatever the connection string says, so
# nothing else (e.g. emulators/servicebus/tests/run.sh) may use 5672 meanwhile.
# State (pids, logs) lives in DLQ_BRIDGE_EMULATOR_STATE (default /tmp/dlq-bridge-emulators).
set -euo pipefail

ALL=(sqs pubsub servicebus)
STATE=${DLQ_BRIDGE_EMULATOR_STATE:-${TMPDIR:-/tmp}/dlq-bridge-emulators}
SQS_PORT=${DLQ_BRIDGE_SQS_PORT:-4566}
PUBSUB_PORT=${DLQ_BRIDGE_PUBSUB_PORT:-8085}
SERVICEBUS_HTTP_PORT=${DLQ_BRIDGE_SERVICEBUS_HTTP_PORT:-5300}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MOTO_VERSION=5.2.1
mkdir -p "$STATE"

log() { echo "emulators: $*" >&2; }
die() { log "error: $*"; exit 1; }

port_of() { case "$1" in sqs) echo "$SQS_PORT" ;; pubsub) echo "$PUBSUB_PORT" ;; servicebus) servicebus_http_port ;; *) die "unknown emulator '$1' (known: ${ALL[*]})" ;; esac; }
# The HTTP port the running Service Bus emulator reported (0 picks a free one).
servicebus_http_port() {
  if [[ -f $STATE/servicebus.port ]]; then cat "$STATE/servicebus.port"; else echo "$SERVICEBUS_HTTP_PORT"; fi
}

ready_url() {
  case "$1" in
    sqs) echo "http://127.0.0.1:$SQS_PORT/moto-api/" ;;
    pubsub) echo "http://127.0.0.1:$PUBSUB_PORT/" ;;
    # Any entity path answers 200 (an empty feed when it does not exist).
    servicebus) echo "http://127.0.0.1:$(servicebus_http_port)/ready-probe?api-version=2021-05" ;;
  esac
}

is_running() {
  local pidfile="$STATE/$1.pid"
  [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

is_ready() { curl -fsS -o /dev/null --max-time 2 "$(ready_url "$1")" 2>/dev/null; }

wait_ready() {
  local name=$1 pid=$2 deadline=$((SECONDS + ${3:-60}))
  until is_ready "$name"; do
    kill -0 "$pid" 2>/dev/null || die "$name exited during start-up; log: $STATE/$name.log ($(tail -n 5 "$STATE/$name.log" | tr '\n' ' '))"
    ((SECONDS < deadline)) || die "$name not ready on port $(port_of "$name") after ${3:-60}s; log: $STATE/$name.log"
    sleep 0.2
  done
}

ensure_moto() {
  python3 -c 'import moto.server, flask' 2>/dev/null && return
  log "installing moto[server]==$MOTO_VERSION"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet "moto[server]==$MOTO_VERSION" >&2 || die "cannot install moto"
}

pubsub_emulator_bin() {
  local root
  root=$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null || true)
  for candidate in "$root" /usr/lib/google-cloud-sdk /usr/share/google-cloud-sdk; do
    [[ -n $candidate && -x $candidate/platform/pubsub-emulator/bin/cloud-pubsub-emulator ]] &&
      { echo "$candidate/platform/pubsub-emulator/bin/cloud-pubsub-emulator"; return; }
  done
  return 1
}

ensure_pubsub() {
  pubsub_emulator_bin >/dev/null && return
  log "installing google-cloud-cli-pubsub-emulator (apt)"
  { apt-get install -y -q google-cloud-cli-pubsub-emulator >&2 ||
    { apt-get update -q >&2 && apt-get install -y -q google-cloud-cli-pubsub-emulator >&2; }; } ||
    die "cannot install the Pub/Sub emulator"
  pubsub_emulator_bin >/dev/null || die "the Pub/Sub emulator is installed but its binary was not found"
}

# Build the project's Service Bus emulator (a workspace member) and print its path.
servicebus_emulator_bin() {
  local target
  target=${CARGO_TARGET_DIR:-$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}
  (cd "$ROOT" && cargo build --quiet -p servicebus-emulator >&2) || die "cannot build servicebus-emulator"
  echo "$target/debug/servicebus-emulator"
}

# With SO_REUSEADDR, as the emulator binds (tokio sets it): a listener makes
# this fail, but the TIME_WAIT connections a previous run leaves for a minute do not.
port_5672_free() {
  python3 -c 'import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 5672))' 2>/dev/null
}

start_one() {
  local name=$1 port pid
  port=$(port_of "$name")
  if is_running "$name" && is_ready "$name"; then log "$name already running on $port"; return; fi
  if is_ready "$name"; then die "port $port is taken by another process; set DLQ_BRIDGE_$(echo "$name" | tr a-z A-Z)_PORT"; fi
  case "$name" in
    sqs)
      ensure_moto
      nohup python3 -m moto.server -H 127.0.0.1 -p "$port" >"$STATE/sqs.log" 2>&1 &
      pid=$!
      ;;
    pubsub)
      ensure_pubsub
      # Started directly, not through the gcloud wrapper, whose death would
      # leave the JVM running.
      JAVA_OPTS=${JAVA_OPTS:--Xmx512m} nohup "$(pubsub_emulator_bin)" --host=127.0.0.1 --port="$port" \
        >"$STATE/pubsub.log" 2>&1 &
      pid=$!
      ;;
    servicebus)
      local bin
      bin=$(servicebus_emulator_bin)
      port_5672_free || die "port 5672 is taken (azservicebus only dials 5672): stop whatever holds it"
      # As Azure behaves: no x-opt-lock-token (--strict), and a link attaches
      # only once a $cbs token covers its entity (--require-tokens).
      # Settlements 20 ms late, not 3: on a loaded CI machine fe2o3-amqp still
      # lost one 3 ms late (docs/reliability.md, "Lost settlements").
      rm -f "$STATE/servicebus.port"
      RUST_LOG=${RUST_LOG:-warn} nohup "$bin" --amqp-port 5672 --http-port "$SERVICEBUS_HTTP_PORT" --https-port 0 \
        --strict --require-tokens --accept-delay-ms 20 >"$STATE/servicebus.log" 2>&1 &
      pid=$!
      # The ready line names the ports actually bound.
      local deadline=$((SECONDS + 30)) ready=""
      until ready=$(grep -o 'http=127.0.0.1:[0-9]*' "$STATE/servicebus.log" 2>/dev/null); do
        kill -0 "$pid" 2>/dev/null || die "servicebus exited during start-up; log: $STATE/servicebus.log ($(tail -n 5 "$STATE/servicebus.log" | tr '\n' ' '))"
        ((SECONDS < deadline)) || die "servicebus printed no ready line within 30s; log: $STATE/servicebus.log"
        sleep 0.1
      done
      echo "${ready##*:}" >"$STATE/servicebus.port"
      ;;
  esac
  echo "$pid" >"$STATE/$name.pid"
  wait_ready "$name" "$pid" 90
  log "$name ready on 127.0.0.1:$(port_of "$name") (pid $pid)"
}

stop_one() {
  local pidfile="$STATE/$1.pid"
  if is_running "$1"; then
    local pid
    pid=$(cat "$pidfile")
    pkill -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "$1 stopped"
  fi
  rm -f "$pidfile"
  [[ $1 != servicebus ]] || rm -f "$STATE/servicebus.port"
}

env_one() {
  case "$1" in
    sqs)
      cat <<ENV
export AWS_ENDPOINT_URL_SQS=http://127.0.0.1:$SQS_PORT
export DLQ_BRIDGE_TEST_SQS_ENDPOINT=http://127.0.0.1:$SQS_PORT
export AWS_ACCESS_KEY_ID=\${AWS_ACCESS_KEY_ID:-testing}
export AWS_SECRET_ACCESS_KEY=\${AWS_SECRET_ACCESS_KEY:-testing}
export AWS_REGION=\${AWS_REGION:-us-east-1}
export AWS_EC2_METADATA_DISABLED=true
ENV
      ;;
    pubsub)
      cat <<ENV
export PUBSUB_EMULATOR_HOST=127.0.0.1:$PUBSUB_PORT
export DLQ_BRIDGE_TEST_PUBSUB_HOST=127.0.0.1:$PUBSUB_PORT
ENV
      ;;
    servicebus)
      # Not SERVICEBUS_CONNECTION_STRING: emulators/servicebus/tests/run.sh
      # reads that as "a real namespace" and skips its Rust flows.
      cat <<ENV
export DLQ_BRIDGE_TEST_SERVICEBUS_HTTP=http://127.0.0.1:$(servicebus_http_port)
export DLQ_BRIDGE_TEST_SERVICEBUS_CONNECTION_STRING='Endpoint=sb://127.0.0.1;SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=true'
ENV
      ;;
  esac
}

cmd=${1:-}
shift || true
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=("${ALL[@]}")
case "$cmd" in
  start) for n in "${names[@]}"; do start_one "$n"; done ;;
  stop) for n in "${names[@]}"; do stop_one "$n"; done ;;
  env) for n in "${names[@]}"; do port_of "$n" >/dev/null; env_one "$n"; done ;;
  status)
    for n in "${ALL[@]}"; do
      if is_running "$n" && is_ready "$n"; then echo "$n: running on $(port_of "$n")"; else echo "$n: stopped"; fi
    done
    ;;
  logs)
    for n in "${names[@]}"; do
      port_of "$n" >/dev/null
      echo "--- $n: last ${LOG_LINES:-40} lines of $STATE/$n.log"
      tail -n "${LOG_LINES:-40}" "$STATE/$n.log" 2>/dev/null || echo "(no log)"
    done
    ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
