#!/usr/bin/env python3
"""Fill an SQS dead-letter queue the way production does: messages fail on a
source queue until SQS moves them, through the RedrivePolicy, to the DLQ.

Used by scripts/demo.sh. Talks to the endpoint in AWS_ENDPOINT_URL_SQS.
"""
import argparse
import json
import os
import random
import uuid

import boto3

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="orders")
    p.add_argument("--dlq", default="orders-dlq")
    p.add_argument("--count", type=int, default=12)
    args = p.parse_args()

    sqs = boto3.client(
        "sqs",
        endpoint_url=os.environ["AWS_ENDPOINT_URL_SQS"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )
    dlq_url = sqs.create_queue(QueueName=args.dlq)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    src_url = sqs.create_queue(
        QueueName=args.source,
        Attributes={"RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})},
    )["QueueUrl"]

    rnd = random.Random(7)
    for i in range(args.count):
        tenant = TENANTS[i % len(TENANTS)]
        error, template = ERRORS[i % len(ERRORS)]
        description = template.format(
            ms=rnd.choice([250, 1500, 3000, 3012, 15000]),
            field=rnd.choice(FIELDS),
            status=rnd.choice([502, 503, 504]),
        )
        order = {"order_id": f"ord-{1000 + i}", "tenant": tenant, "total": round(rnd.uniform(5, 500), 2)}
        sqs.send_message(
            QueueUrl=src_url,
            MessageBody=json.dumps(order),
            MessageAttributes={
                "tenant": {"DataType": "String", "StringValue": tenant},
                "error": {"DataType": "String", "StringValue": error},
                "error_description": {"DataType": "String", "StringValue": description},
                "trace_id": {"DataType": "String", "StringValue": str(uuid.UUID(int=rnd.getrandbits(128)))},
            },
        )

    # The consumer "fails": receive without deleting, so each receive counts,
    # and SQS dead-letters a message once its receives exceed maxReceiveCount.
    for _ in range(200):
        got = sqs.receive_message(QueueUrl=src_url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        if not got.get("Messages"):
            depth = int(
                sqs.get_queue_attributes(QueueUrl=src_url, AttributeNames=["ApproximateNumberOfMessages"])[
                    "Attributes"
                ]["ApproximateNumberOfMessages"]
            )
            if depth == 0:
                break
    print(f"{args.count} messages failed into {args.dlq} (source {args.source})")


if __name__ == "__main__":
    main()
