#!/usr/bin/env python3
"""Baseline (b) of bench/run.sh: the self-managed SQS redrive snippet people copy.

One message at a time with boto3: receive 1, and if it matches the filter
(attribute kind == "retry") send it to the source queue and delete it; a
message that does not match stays hidden until the loop ends and is then made
visible again, one call per message. Prints one JSON line like
examples/baseline.rs.

    bench/baseline_boto3.py ENDPOINT DLQ_NAME DEST_NAME
"""
import json
import sys
import time

import boto3
from botocore.config import Config


def main():
    endpoint, dlq, dest = sys.argv[1:4]
    started = time.monotonic()
    sqs = boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 3}),
    )
    dlq_url = sqs.get_queue_url(QueueName=dlq)["QueueUrl"]
    dest_url = sqs.get_queue_url(QueueName=dest)["QueueUrl"]
    examined = moved = 0
    held = []
    while True:
        got = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=1,
            VisibilityTimeout=300,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not got:
            break
        m = got[0]
        examined += 1
        attrs = m.get("MessageAttributes", {})
        if attrs.get("kind", {}).get("StringValue") != "retry":
            held.append(m["ReceiptHandle"])
            continue
        sqs.send_message(QueueUrl=dest_url, MessageBody=m["Body"], MessageAttributes=attrs)
        sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=m["ReceiptHandle"])
        moved += 1
    for h in held:
        sqs.change_message_visibility(QueueUrl=dlq_url, ReceiptHandle=h, VisibilityTimeout=0)
    print(json.dumps({"examined": examined, "moved": moved, "secs": time.monotonic() - started}))


if __name__ == "__main__":
    main()
