#!/usr/bin/env bash
# The demo: the same story on the three clouds' local emulators. It starts
# them (SQS: moto, Pub/Sub: Google's emulator, Service Bus: the project's
# emulator), makes the same twelve orders from three tenants fail into each
# cloud's dead-letter queue the way that cloud does it (scripts/seed.py), and
# then shows `check`, `list` with the three DLQs side by side, and for each
# one: inspect, `report` grouping the failures by reason and by pattern, a
# dry run, a filtered redrive that moves only tenant acme's orders back to
# the source, and an export plus a purge (with a backup) of the validation
# failures. It ends with `list`, `runs` (the audit journal of every run) and
# a check on each emulator that exactly acme's orders arrived back on the
# source, each marked as redriven once.
#
#   scripts/demo.sh                      all three clouds (config/demo.yaml)
#   scripts/demo.sh --backend sqs        one cloud: sqs, pubsub, servicebus (or a comma list), or all
#   scripts/demo.sh --keep               leave the emulators it started running to explore (see the last lines)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dlq-bridge/target}

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
KEEP= BACKEND=all
while [[ $# -gt 0 ]]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --backend) [[ $# -ge 2 ]] || usage; BACKEND=$2; shift ;;
    --backend=*) BACKEND=${1#*=} ;;
    *) usage ;;
  esac
  shift
done
[[ $BACKEND == all ]] && BACKEND=sqs,pubsub,servicebus
IFS=, read -r -a BACKENDS <<<"$BACKEND"
for b in "${BACKENDS[@]}"; do
  case "$b" in sqs | pubsub | servicebus) ;; *) echo "unknown backend '$b' (sqs, pubsub, servicebus or all)" >&2; usage ;; esac
done

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
title() { printf '\n\033[1;7m %s \033[0m\n' "$*"; }
wants() { [[ ,$BACKEND, == *,$1,* ]]; }

# The clients the seeding script needs, installed when missing.
wants sqs && { python3 -c 'import boto3' 2>/dev/null || PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet boto3; }
wants servicebus && { python3 -c 'import azure.servicebus' 2>/dev/null ||
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet "azure-servicebus==7.15.0"; }

# Start the emulators that are not running yet (installing or building them),
# and stop those again at the end unless --keep.
started=()
status=$(scripts/emulators.sh status)
for b in "${BACKENDS[@]}"; do
  grep -q "^$b: running" <<<"$status" || started+=("$b")
done
if [[ ${#started[@]} -gt 0 ]]; then
  [[ -n $KEEP ]] || trap 'scripts/emulators.sh stop "${started[@]}"' EXIT
  scripts/emulators.sh start "${started[@]}"
fi
eval "$(scripts/emulators.sh env "${BACKENDS[@]}")"

echo "building dlq-bridge..."
cargo build --quiet --bin dlq-bridge
BIN=$CARGO_TARGET_DIR/debug/dlq-bridge

rm -rf /tmp/dlq-bridge-demo
mkdir -p /tmp/dlq-bridge-demo
# config/demo.yaml has one `orders` queue per cloud, named sqs-orders,
# pubsub-orders and servicebus-orders; a run on fewer clouds keeps only theirs.
CONFIG=config/demo.yaml
if [[ $BACKEND != sqs,pubsub,servicebus ]]; then
  CONFIG=/tmp/dlq-bridge-demo/config.yaml
  awk -v keep=",$BACKEND," '/^  - name: /{ n = $3; sub(/-orders$/, "", n); skip = index(keep, "," n ",") == 0 } /^[^ ]/{ skip = 0 } !skip' \
    config/demo.yaml >"$CONFIG"
fi
# Each command is shown as it would be typed: an argument with spaces or
# quotes in single quotes, so that it can be copied into a shell.
shell_words() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}
dlq() { say "dlq-bridge $(shell_words "$@")"; "$BIN" --config "$CONFIG" "$@"; }

declare -A HOW=(
  [sqs]="each order is received twice without a delete; SQS's RedrivePolicy moves it to orders-dlq"
  [pubsub]="each order is nacked 5 times; Pub/Sub's dead-letter policy forwards it to topic orders-dead"
  [servicebus]="each order is dead-lettered by its consumer, with a DeadLetterReason and description"
)
declare -A CLOUD=([sqs]="AWS SQS" [pubsub]="Google Cloud Pub/Sub" [servicebus]="Azure Service Bus")
declare -A SOURCE=([sqs]="queue orders" [pubsub]="topic orders, read through subscription orders-worker" [servicebus]="queue orders")

title "12 orders (3 tenants, 4 failures) fail on ${BACKENDS[*]}"
for b in "${BACKENDS[@]}"; do
  say "scripts/seed.py seed --backend $b   # ${HOW[$b]}"
  python3 scripts/seed.py seed --backend "$b"
done

dlq check
dlq list

for b in "${BACKENDS[@]}"; do
  q=$b-orders
  title "${CLOUD[$b]}: $q"
  dlq inspect "$q" --limit 5
  dlq report "$q" --by reason
  dlq report "$q" --by pattern
  dlq inspect "$q" --filter 'attributes.tenant == "acme" && reason == "Timeout"' -o json
  dlq redrive "$q" --filter 'attributes.tenant == "acme"' --dry-run
  dlq redrive "$q" --filter 'attributes.tenant == "acme"' --rate 50 --yes
  dlq export "$q" --filter 'reason == "ValidationError"' --to "/tmp/dlq-bridge-demo/$b-validation.jsonl"
  dlq purge "$q" --filter 'reason == "ValidationError"' --backup "/tmp/dlq-bridge-demo/$b-purged.jsonl" --yes
  dlq report "$q" --by pattern
done

title "afterwards"
dlq list --sample 0
dlq runs

for b in "${BACKENDS[@]}"; do
  say "scripts/seed.py source --backend $b --tenant acme   # what arrived back on ${SOURCE[$b]}"
  python3 scripts/seed.py source --backend "$b" --tenant acme
done

if [[ -n $KEEP ]]; then
  echo
  echo "The emulators are still running. To explore:"
  echo "  eval \"\$(scripts/emulators.sh env ${BACKENDS[*]})\"; $BIN --config $CONFIG list"
  echo "  scripts/emulators.sh stop ${BACKENDS[*]}"
fi
