#!/usr/bin/env bash
# dlq-bridge benchmarks (issue 8): filtered-redrive throughput and CPU per
# message against two baselines run alongside, sidecar footprint, peak RSS,
# sizes. Prints every figure and ratio with MET/MISSED beside each target; it
# never fails on a figure, only when something cannot run.
#
#   bench/run.sh --quick   a few minutes (CI): 1k messages, 2 runs each, 30 s idle
#                          window, latency part at 1k; report to $BENCH_OUT (default
#                          ${TMPDIR:-/tmp}/dlq-bridge-bench/benchmarks-quick.md)
#   bench/run.sh           full: 1k, 10k and 100k messages (100k: not SQS, see the notes), 3 runs each (100k: 1),
#                          latency part at 10k, 60 s idle window, image size (BENCH_IMAGE=0
#                          skips the image's static build); writes docs/benchmarks.md
#
# The latency part (--only latency runs it alone) redrives once direct and once
# through examples/delayproxy.rs, a TCP proxy with a fixed one-way delay
# (--latency-ms 20 round trip, --latency-count N), for dlq-bridge and baseline (a).
# Its Service Bus runs need 127.0.0.2:5672 free as well.
#
# Options after the mode are passed to bench/bench.py, e.g. --backends sqs,pubsub.
# The machine is shared: run the full mode when `uptime` shows a load under 2.5.
# Starts its own ministack, Pub/Sub emulator and Service Bus emulator (which
# needs port 5672, the only port azservicebus dials) and stops them at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=full
if [[ ${1:-} == --quick ]]; then MODE=quick; shift; fi
MINISTACK_VERSION=1.5.33

log() { echo "bench: $*" >&2; }

python3 -c 'import ministack' 2>/dev/null || {
  log "installing ministack==$MINISTACK_VERSION"
  python3 -m pip install --quiet "ministack==$MINISTACK_VERSION" >&2
}
python3 -c 'import boto3' 2>/dev/null || python3 -m pip install --quiet boto3 >&2

ensure_pubsub_emulator() {
  local root
  root=$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null || true)
  for c in "$root" /usr/lib/google-cloud-sdk /usr/share/google-cloud-sdk; do
    [[ -n $c && -x $c/platform/pubsub-emulator/bin/cloud-pubsub-emulator ]] && return 0
  done
  log "installing google-cloud-cli-pubsub-emulator (apt)"
  apt-get install -y -q google-cloud-cli-pubsub-emulator >&2 ||
    { apt-get update -q >&2 && apt-get install -y -q google-cloud-cli-pubsub-emulator >&2; }
}
ensure_pubsub_emulator

log "building release binaries (dlq-bridge, examples/baseline.rs, examples/delayproxy.rs, servicebus-emulator)"
nice -n 5 cargo build --release --locked --bin dlq-bridge --example baseline --example delayproxy -p dlq-bridge >&2
nice -n 5 cargo build --release --locked -p servicebus-emulator >&2
TARGET=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

load=$(cut -d' ' -f1 /proc/loadavg)
if [[ $MODE == full ]] && python3 -c "import sys; sys.exit(0 if $load >= 2.5 else 1)"; then
  log "warning: load average is $load (>= 2.5): timings will be noisy"
fi

IMAGE_SIZE="n/a (measured in full mode only: scripts/image.sh builds a static binary and an image)"
if [[ $MODE == full && ${BENCH_IMAGE:-1} == 0 ]]; then
  IMAGE_SIZE="n/a: not built in this run (BENCH_IMAGE=0); scripts/image.sh prints it"
elif [[ $MODE == full ]]; then
  if [[ -x scripts/image.sh ]]; then
    log "building the image with scripts/image.sh"
    if out=$(scripts/image.sh 2>"$TARGET/bench-image.log"); then
      IMAGE_SIZE=$(echo "$out" | tail -n 1)
    else
      IMAGE_SIZE="n/a: scripts/image.sh failed ($(tail -n 1 "$TARGET/bench-image.log"))"
    fi
  else
    IMAGE_SIZE="n/a: scripts/image.sh does not exist yet"
  fi
fi

if [[ $MODE == quick ]]; then
  OUT=${BENCH_OUT:-${TMPDIR:-/tmp}/dlq-bridge-bench/benchmarks-quick.md}
  QUICK=(--quick)
else
  OUT=${BENCH_OUT:-$ROOT/docs/benchmarks.md}
  # A full run of one part (--only PART) writes docs/benchmarks-PART.md and
  # leaves the whole report alone.
  for ((i = 1; i <= $#; i++)); do
    if [[ ${!i} == --only ]]; then
      j=$((i + 1))
      OUT=${BENCH_OUT:-$ROOT/docs/benchmarks-${!j}.md}
    fi
  done
  QUICK=()
fi
exec python3 bench/bench.py "${QUICK[@]}" \
  --bin "$TARGET/release/dlq-bridge" \
  --baseline "$TARGET/release/examples/baseline" \
  --delayproxy "$TARGET/release/examples/delayproxy" \
  --sb-emulator "$TARGET/release/servicebus-emulator" \
  --image-size "$IMAGE_SIZE" \
  --out "$OUT" "$@"
