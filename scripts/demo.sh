#!/usr/bin/env bash
# The demo: starts the SQS emulator, makes realistic orders fail into a
# dead-letter queue, then shows list, inspect, `report` grouping the failures
# by reason and by pattern, a dry run, a filtered redrive that moves only one
# tenant's messages back to the source queue, and an export plus a purge
# (with a backup) of the validation failures.
#
#   scripts/demo.sh          run the demo, then stop the emulator it started
#   scripts/demo.sh --keep   leave the emulator running to explore (see the last lines)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dlq-bridge/target}
KEEP=${1:-}

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

python3 -c 'import boto3' 2>/dev/null || python3 -m pip install --quiet boto3
started=
if ! scripts/emulators.sh status | grep -q '^sqs: running'; then
  scripts/emulators.sh start sqs
  started=1
fi
if [[ -n $started && $KEEP != --keep ]]; then trap 'scripts/emulators.sh stop sqs' EXIT; fi
eval "$(scripts/emulators.sh env sqs)"

echo "building dlq-bridge..."
cargo build --quiet --bin dlq-bridge
BIN=$CARGO_TARGET_DIR/debug/dlq-bridge
CONFIG=config/demo.yaml
dlq() { say "dlq-bridge $*"; "$BIN" --config "$CONFIG" "$@"; }

# A fresh pair of queues each time, so the demo can be rerun.
python3 - <<'PY'
import os, boto3
sqs = boto3.client("sqs", endpoint_url=os.environ["AWS_ENDPOINT_URL_SQS"], region_name="us-east-1")
for name in ("orders", "orders-dlq"):
    try:
        sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])
    except sqs.exceptions.QueueDoesNotExist:
        pass
PY
rm -rf /tmp/dlq-bridge-demo
say "scripts/seed_sqs.py   # 12 orders fail twice each and land in orders-dlq"
python3 scripts/seed_sqs.py --count 12

dlq check
dlq list
dlq inspect orders --limit 5
dlq report orders --by reason
dlq report orders --by pattern
dlq inspect orders --filter 'attributes.tenant == "acme" && reason == "Timeout"' -o json
dlq redrive orders --filter 'attributes.tenant == "acme"' --dry-run
dlq redrive orders --filter 'attributes.tenant == "acme"' --rate 50 --yes
dlq list --sample 0
dlq runs
dlq export orders --filter 'reason == "ValidationError"' --to /tmp/dlq-bridge-demo/validation.jsonl
dlq purge orders --filter 'reason == "ValidationError"' --backup /tmp/dlq-bridge-demo/purged.jsonl --yes
dlq report orders --by pattern

say "what arrived back on the source queue"
python3 - <<'PY'
import os, boto3
sqs = boto3.client("sqs", endpoint_url=os.environ["AWS_ENDPOINT_URL_SQS"], region_name="us-east-1")
url = sqs.get_queue_url(QueueName="orders")["QueueUrl"]
seen = []
while True:
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=1)
    msgs = got.get("Messages", [])
    if not msgs:
        break
    for m in msgs:
        a = m["MessageAttributes"]
        seen.append((a["tenant"]["StringValue"], a["dlq-bridge-redrive-count"]["StringValue"], m["Body"]))
for tenant, count, body in sorted(seen):
    print(f"  tenant={tenant} redrive-count={count} {body}")
tenants = {t for t, _, _ in seen}
assert tenants == {"acme"} and len(seen) == 4, f"expected the 4 acme orders only, got {seen}"
print(f"\nok: {len(seen)} messages moved, all tenant=acme; the other tenants' messages stay in orders-dlq")
PY
if [[ $KEEP == --keep ]]; then
  echo
  echo "The emulator is still running. To explore:"
  echo "  eval \"\$(scripts/emulators.sh env sqs)\"; $BIN --config $CONFIG list"
  echo "  scripts/emulators.sh stop sqs"
fi
