#!/usr/bin/env python3
"""The demo's failing orders, on each cloud's emulator.

  scripts/seed.py seed   --backend sqs|pubsub|servicebus [--count 12]
  scripts/seed.py source --backend sqs|pubsub|servicebus --tenant acme

`seed` makes the demo's entities afresh (so the demo can be rerun) and makes
the same orders (three tenants, four failures, the same bodies and trace IDs
on every backend) fail into the dead-letter queue the way production does:

- sqs: a consumer receives without deleting; after maxReceiveCount (2)
  receives, SQS's RedrivePolicy moves each message from `orders` to
  `orders-dlq`.
- pubsub: a consumer nacks (ModifyAckDeadline 0); after max_delivery_attempts
  (5, Pub/Sub's minimum) the subscription `orders-worker` of topic `orders`
  forwards each message to the dead-letter topic `orders-dead`, read through
  its subscription `orders-dead-sub`.
- servicebus: a consumer of queue `orders` dead-letters each message with a
  DeadLetterReason and DeadLetterErrorDescription, as Service Bus consumers do.

Neither SQS nor Pub/Sub records why a message failed, so on those two the
orders carry the failure in the attributes `error` and `error_description`,
which dlq-bridge reads as reason and description (`defaults.reason_attribute`
and `description_attribute`). The messages are stamped when published because
an SQS or Pub/Sub consumer cannot change a message it gives up on.

`source` consumes what arrived back on the source (`orders`), prints it and
asserts that it is exactly the orders of TENANT, each carrying the redrive
mark `dlq-bridge-redrive-count` = 1.

Endpoints come from `scripts/emulators.sh env`: AWS_ENDPOINT_URL_SQS,
PUBSUB_EMULATOR_HOST, DLQ_BRIDGE_TEST_SERVICEBUS_CONNECTION_STRING. Only
the standard library, boto3 (sqs) and azure-servicebus (servicebus) are used;
Pub/Sub is driven through the emulator's REST API.
"""
import argparse
import base64
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
import uuid

TENANTS = ["acme", "globex", "initech"]
# (reason, description template): the numbers and quoted values vary from one
# failure to the next, as they do in production, so that `report --by pattern`
# has something to group.
ERRORS = [
    ("Timeout", "payment gateway timed out after {ms} ms"),
    ("ValidationError", "field `{field}` missing"),
    ("Timeout", "inventory service timed out after {ms} ms"),
    ("DownstreamUnavailable", "HTTP {status} from shipping"),
]
FIELDS = ["sku", "qty", "price"]
MARK_COUNT = "dlq-bridge-redrive-count"

SOURCE = "orders"
SQS_DLQ = "orders-dlq"
PUBSUB_PROJECT = "dlq-bridge-demo"  # config/demo.yaml names it too
PUBSUB_WORKER_SUB = "orders-worker"
PUBSUB_DEAD_TOPIC = "orders-dead"
PUBSUB_DEAD_SUB = "orders-dead-sub"
PUBSUB_MAX_DELIVERY_ATTEMPTS = 5


def orders(count):
    """The same orders every time and on every backend: (order, attributes, reason, description)."""
    rnd = random.Random(7)
    out = []
    for i in range(count):
        tenant = TENANTS[i % len(TENANTS)]
        error, template = ERRORS[i % len(ERRORS)]
        description = template.format(
            ms=rnd.choice([250, 1500, 3000, 3012, 15000]),
            field=rnd.choice(FIELDS),
            status=rnd.choice([502, 503, 504]),
        )
        order = {"order_id": f"ord-{1000 + i}", "tenant": tenant, "total": round(rnd.uniform(5, 500), 2)}
        attributes = {"tenant": tenant, "trace_id": str(uuid.UUID(int=rnd.getrandbits(128)))}
        out.append((order, attributes, error, description))
    return out


def check_arrivals(seen, tenant, expected):
    """seen: (tenant, redrive count, body) per message that arrived back on the source."""
    for t, count, body in sorted(seen):
        print(f"  tenant={t} {MARK_COUNT}={count} {body}")
    want = sorted(json.dumps(o) for o, *_ in expected)
    got = sorted(body for _, _, body in seen)
    assert got == want and {t for t, _, _ in seen} == {tenant}, (
        f"expected exactly the {len(want)} orders of tenant {tenant}, got {seen}"
    )
    assert all(c == "1" for _, c, _ in seen), f"every copy should carry {MARK_COUNT}=1, got {seen}"
    print(f"ok: {len(seen)} messages back on {SOURCE}, all tenant={tenant}, each marked {MARK_COUNT}=1;"
          " the other tenants' stay in the dead-letter queue")


# ---------------------------------------------------------------------- SQS
def sqs_client():
    import boto3

    return boto3.client(
        "sqs",
        endpoint_url=os.environ["AWS_ENDPOINT_URL_SQS"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )


def sqs_seed(count):
    sqs = sqs_client()
    for name in (SOURCE, SQS_DLQ):
        try:
            sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])
        except sqs.exceptions.QueueDoesNotExist:
            pass
    dlq_url = sqs.create_queue(QueueName=SQS_DLQ)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    src_url = sqs.create_queue(
        QueueName=SOURCE,
        Attributes={"RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})},
    )["QueueUrl"]
    for order, attributes, error, description in orders(count):
        attrs = dict(attributes, error=error, error_description=description)
        sqs.send_message(
            QueueUrl=src_url,
            MessageBody=json.dumps(order),
            MessageAttributes={k: {"DataType": "String", "StringValue": v} for k, v in attrs.items()},
        )
    # The consumer "fails": receive without deleting, so each receive counts,
    # and SQS dead-letters a message once its receives exceed maxReceiveCount.
    for _ in range(200):
        got = sqs.receive_message(QueueUrl=src_url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        if not got.get("Messages"):
            depth = sqs.get_queue_attributes(QueueUrl=src_url, AttributeNames=["ApproximateNumberOfMessages"])
            if int(depth["Attributes"]["ApproximateNumberOfMessages"]) == 0:
                break
    print(f"{count} orders failed into {SQS_DLQ} (source {SOURCE})")


def sqs_source(tenant, count):
    sqs = sqs_client()
    url = sqs.get_queue_url(QueueName=SOURCE)["QueueUrl"]
    seen = []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=1)
        msgs = got.get("Messages", [])
        if not msgs:
            break
        for m in msgs:
            a = m["MessageAttributes"]
            seen.append((a["tenant"]["StringValue"], a.get(MARK_COUNT, {}).get("StringValue"), m["Body"]))
        sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)]
        )
    check_arrivals(seen, tenant, [o for o in orders(count) if o[0]["tenant"] == tenant])


# ------------------------------------------------------------------ Pub/Sub
# The emulator serves REST on its gRPC port. Pulls always ask for
# returnImmediately: the emulator keeps an abandoned blocking pull as a
# zombie consumer that swallows messages (TESTING.md).
def pubsub(method, path, body=None, ok_missing=False):
    url = f"http://{os.environ['PUBSUB_EMULATOR_HOST']}/v1/projects/{PUBSUB_PROJECT}/{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read()
    except urllib.error.HTTPError as e:
        if ok_missing and e.code == 404:
            return {}
        raise SystemExit(f"pubsub {method} {path}: HTTP {e.code} {e.read().decode(errors='replace')}")
    return json.loads(text) if text.strip() else {}


def pubsub_pull(sub, max_messages=100):
    got = pubsub("POST", f"subscriptions/{sub}:pull", {"returnImmediately": True, "maxMessages": max_messages})
    return got.get("receivedMessages", [])


def pubsub_modack(sub, ack_ids, seconds):
    for i in range(0, len(ack_ids), 1000):
        pubsub("POST", f"subscriptions/{sub}:modifyAckDeadline",
               {"ackIds": ack_ids[i:i + 1000], "ackDeadlineSeconds": seconds})


def pubsub_seed(count):
    for sub in (PUBSUB_WORKER_SUB, PUBSUB_DEAD_SUB):
        pubsub("DELETE", f"subscriptions/{sub}", ok_missing=True)
    for topic in (SOURCE, PUBSUB_DEAD_TOPIC):
        pubsub("DELETE", f"topics/{topic}", ok_missing=True)
    for topic in (SOURCE, PUBSUB_DEAD_TOPIC):
        pubsub("PUT", f"topics/{topic}", {})
    topic = lambda t: f"projects/{PUBSUB_PROJECT}/topics/{t}"  # noqa: E731
    # The dead-letter topic needs its subscription first, or what it receives is lost.
    pubsub("PUT", f"subscriptions/{PUBSUB_DEAD_SUB}", {"topic": topic(PUBSUB_DEAD_TOPIC), "ackDeadlineSeconds": 60})
    # No ordering: the emulator cannot dead-letter from an ordered subscription.
    pubsub("PUT", f"subscriptions/{PUBSUB_WORKER_SUB}", {
        "topic": topic(SOURCE),
        "ackDeadlineSeconds": 60,
        "deadLetterPolicy": {
            "deadLetterTopic": topic(PUBSUB_DEAD_TOPIC),
            "maxDeliveryAttempts": PUBSUB_MAX_DELIVERY_ATTEMPTS,
        },
    })
    messages = []
    for order, attributes, error, description in orders(count):
        messages.append({
            "data": base64.b64encode(json.dumps(order).encode()).decode(),
            "attributes": dict(attributes, error=error, error_description=description),
        })
    pubsub("POST", f"topics/{SOURCE}:publish", {"messages": messages})

    # The consumer "fails": it nacks every delivery. The emulator forwards a
    # message to the dead-letter topic when a pull would deliver it after
    # max_delivery_attempts, so the consumer keeps pulling until the DLQ holds
    # every order, counted by pulling (and holding) them, then releasing them.
    held, dead = [], set()
    deadline = time.monotonic() + 60
    while len(dead) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"pubsub: only {len(dead)} of {count} orders reached {PUBSUB_DEAD_TOPIC}")
        got = pubsub_pull(PUBSUB_WORKER_SUB)
        pubsub_modack(PUBSUB_WORKER_SUB, [r["ackId"] for r in got], 0)
        arrived = pubsub_pull(PUBSUB_DEAD_SUB)
        held += [r["ackId"] for r in arrived]
        dead |= {r["message"]["messageId"] for r in arrived}
        if not got and not arrived:
            time.sleep(0.05)
    pubsub_modack(PUBSUB_DEAD_SUB, held, 0)
    print(f"{count} orders failed into topic {PUBSUB_DEAD_TOPIC}, read by subscription {PUBSUB_DEAD_SUB}"
          f" (source: topic {SOURCE}, subscription {PUBSUB_WORKER_SUB})")


def pubsub_source(tenant, count):
    seen, empty = [], 0
    while empty < 10:  # one second without a message
        got = pubsub_pull(PUBSUB_WORKER_SUB)
        if not got:
            empty += 1
            time.sleep(0.1)
            continue
        empty = 0
        for r in got:
            a = r["message"].get("attributes", {})
            body = base64.b64decode(r["message"].get("data", "")).decode()
            seen.append((a.get("tenant"), a.get(MARK_COUNT), body))
        pubsub("POST", f"subscriptions/{PUBSUB_WORKER_SUB}:acknowledge", {"ackIds": [r["ackId"] for r in got]})
    check_arrivals(seen, tenant, [o for o in orders(count) if o[0]["tenant"] == tenant])


# --------------------------------------------------------------- Service Bus
def servicebus_client():
    from azure.servicebus import ServiceBusClient

    return ServiceBusClient.from_connection_string(os.environ["DLQ_BRIDGE_TEST_SERVICEBUS_CONNECTION_STRING"])


def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def servicebus_seed(count):
    from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode, ServiceBusSubQueue

    expected = orders(count)
    failures = {o["order_id"]: (error, description) for o, _, error, description in expected}
    with servicebus_client() as client:
        # Entities cannot be deleted on the emulator: empty the queue and its DLQ.
        for sub_queue in (None, ServiceBusSubQueue.DEAD_LETTER):
            with client.get_queue_receiver(
                SOURCE, sub_queue=sub_queue, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
            ) as drain:
                while drain.receive_messages(max_message_count=100, max_wait_time=0.5):
                    pass
        with client.get_queue_sender(SOURCE) as sender:
            sender.send_messages([
                ServiceBusMessage(
                    json.dumps(order),
                    message_id=order["order_id"],
                    content_type="application/json",
                    application_properties=attributes,
                )
                for order, attributes, _, _ in expected
            ])
        # The consumer fails on each order and dead-letters it, saying why.
        moved = 0
        with client.get_queue_receiver(SOURCE) as receiver:
            while moved < count:
                got = receiver.receive_messages(max_message_count=count - moved, max_wait_time=5)
                if not got:
                    raise SystemExit(f"servicebus: only {moved} of {count} orders were received")
                for m in got:
                    error, description = failures[json.loads(str(m))["order_id"]]
                    receiver.dead_letter_message(m, reason=error, error_description=description)
                    moved += 1
    print(f"{count} orders failed into {SOURCE}/$DeadLetterQueue (source {SOURCE})")


def servicebus_source(tenant, count):
    seen = []
    with servicebus_client() as client:
        with client.get_queue_receiver(SOURCE) as receiver:
            while True:
                got = receiver.receive_messages(max_message_count=100, max_wait_time=1)
                if not got:
                    break
                for m in got:
                    props = {text(k): text(v) for k, v in (m.application_properties or {}).items()}
                    seen.append((props.get("tenant"), props.get(MARK_COUNT), str(m)))
                    receiver.complete_message(m)
    check_arrivals(seen, tenant, [o for o in orders(count) if o[0]["tenant"] == tenant])


BACKENDS = {
    "sqs": (sqs_seed, sqs_source),
    "pubsub": (pubsub_seed, pubsub_source),
    "servicebus": (servicebus_seed, servicebus_source),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["seed", "source"])
    p.add_argument("--backend", required=True, choices=sorted(BACKENDS))
    p.add_argument("--count", type=int, default=12)
    p.add_argument("--tenant", default="acme", help="source: the tenant whose orders were redriven")
    args = p.parse_args()
    seed, source = BACKENDS[args.backend]
    if args.action == "seed":
        seed(args.count)
    else:
        source(args.tenant, args.count)


if __name__ == "__main__":
    sys.exit(main())
