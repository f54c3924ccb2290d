"""Conformance of the emulator against Microsoft's Python SDK (azure-servicebus).

Every test asserts on content: bodies, typed properties, reasons and counts."""

import datetime
import time
import uuid

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import MessageLockLostError, ServiceBusAuthenticationError, ServiceBusError

# The SDK's public API sends every int as AMQP int and every bytes value as a
# string; its encoder's typed values are the only way to send long and binary.
from azure.servicebus._pyamqp.types import TYPE, VALUE, AMQPTypes

from conftest import QUEUE, QUEUE_MDC, QUEUE_SHORT_LOCK, TOPIC

WAIT = 2  # seconds a receive waits for messages that should be there
EMPTY_WAIT = 1  # seconds a receive waits to show that nothing is there


def body(message):
    return b"".join(message.body)


def receive(client, queue, count=1, sub_queue=None, wait=WAIT, **kwargs):
    """Receives exactly `count` messages (or fewer if the queue runs dry)."""
    with client.get_queue_receiver(queue, sub_queue=sub_queue, **kwargs) as receiver:
        messages = []
        deadline = time.monotonic() + wait
        while len(messages) < count and time.monotonic() < deadline:
            messages += receiver.receive_messages(max_message_count=count - len(messages), max_wait_time=wait)
        return receiver, messages


def send(client, queue, *messages):
    with client.get_queue_sender(queue) as sender:
        sender.send_messages(list(messages))


def test_send_receive_complete_keeps_the_message(client, admin):
    send(
        client,
        QUEUE,
        ServiceBusMessage(
            b"\x00\x01\xfe payload",
            message_id="id-1",
            correlation_id="corr-1",
            subject="subject-1",
            content_type="application/octet-stream",
            reply_to="reply-queue",
            to="destination",
            application_properties={"tenant": "acme"},
        ),
    )
    with client.get_queue_receiver(QUEUE) as receiver:
        [message] = receiver.receive_messages(max_message_count=5, max_wait_time=WAIT)
        assert body(message) == b"\x00\x01\xfe payload"
        assert message.message_id == "id-1"
        assert message.correlation_id == "corr-1"
        assert message.subject == "subject-1"
        assert message.content_type == "application/octet-stream"
        assert message.reply_to == "reply-queue"
        assert message.to == "destination"
        assert message.application_properties == {b"tenant": b"acme"}
        assert message.delivery_count == 0
        assert message.sequence_number >= 1
        assert message.enqueued_time_utc is not None
        assert isinstance(message.lock_token, uuid.UUID)
        assert message.locked_until_utc > datetime.datetime.now(datetime.timezone.utc)
        receiver.complete_message(message)
        assert receiver.receive_messages(max_message_count=1, max_wait_time=EMPTY_WAIT) == []
    props = admin.get_queue_runtime_properties(QUEUE)
    assert props.active_message_count == 0
    assert props.dead_letter_message_count == 0


def test_batch_send_splits_into_messages(client):
    with client.get_queue_sender(QUEUE) as sender:
        batch = sender.create_message_batch()
        for index in range(5):
            batch.add_message(ServiceBusMessage(f"batch-{index}", application_properties={"index": index}))
        sender.send_messages(batch)
    receiver, messages = receive(client, QUEUE, count=5, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
    assert [str(m) for m in messages] == [f"batch-{i}" for i in range(5)]
    assert [m.application_properties[b"index"] for m in messages] == list(range(5))
    sequence_numbers = [m.sequence_number for m in messages]
    assert sequence_numbers == sorted(set(sequence_numbers))


def test_application_property_types_and_bodies_round_trip(client):
    token = uuid.uuid4()
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    send(
        client,
        QUEUE,
        ServiceBusMessage(
            b"\x00\xff\x10",
            application_properties={
                "int": -7,
                "long": {TYPE: AMQPTypes.long, VALUE: 2**40},
                "double": 1.5,
                "bool": True,
                "string": "text",
                "binary": {TYPE: AMQPTypes.binary, VALUE: b"\x00\xff"},
                "uuid": token,
                "timestamp": when,
            },
        ),
        ServiceBusMessage(b""),
    )
    _, [typed, empty] = receive(client, QUEUE, count=2, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
    assert body(typed) == b"\x00\xff\x10"
    assert typed.application_properties == {
        b"int": -7,
        b"long": 2**40,
        b"double": 1.5,
        b"bool": True,
        b"string": b"text",
        b"binary": b"\x00\xff",
        b"uuid": token,
        # pyamqp decodes an AMQP timestamp to milliseconds since the epoch.
        b"timestamp": int(when.timestamp() * 1000),
    }
    assert isinstance(typed.application_properties[b"bool"], bool)
    assert body(empty) == b""


def test_abandon_increments_delivery_count(client):
    send(client, QUEUE, ServiceBusMessage("retry me"))
    with client.get_queue_receiver(QUEUE) as receiver:
        [first] = receiver.receive_messages(max_wait_time=WAIT)
        assert first.delivery_count == 0
        receiver.abandon_message(first)
        [second] = receiver.receive_messages(max_wait_time=WAIT)
        assert str(second) == "retry me"
        assert second.delivery_count == 1
        assert second.sequence_number == first.sequence_number
        assert second.lock_token != first.lock_token
        receiver.complete_message(second)


def test_max_delivery_count_dead_letters(client, admin):
    send(client, QUEUE_MDC, ServiceBusMessage("poison", application_properties={"kind": "poison"}))
    with client.get_queue_receiver(QUEUE_MDC) as receiver:
        for attempt in range(3):
            [message] = receiver.receive_messages(max_wait_time=WAIT)
            assert message.delivery_count == attempt
            receiver.abandon_message(message)
        assert receiver.receive_messages(max_wait_time=EMPTY_WAIT) == []
    props = admin.get_queue_runtime_properties(QUEUE_MDC)
    assert props.active_message_count == 0
    assert props.dead_letter_message_count == 1
    _, [dead] = receive(client, QUEUE_MDC, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
    assert str(dead) == "poison"
    assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
    assert dead.dead_letter_error_description
    assert dead.application_properties[b"kind"] == b"poison"


def test_dead_letter_with_reason_then_peek_receive_and_complete_from_dlq(client, admin):
    send(client, QUEUE, ServiceBusMessage(b"bad order", message_id="order-9", application_properties={"tenant": "acme", "n": 3}))
    with client.get_queue_receiver(QUEUE) as receiver:
        [message] = receiver.receive_messages(max_wait_time=WAIT)
        receiver.dead_letter_message(message, reason="ValidationFailed", error_description="total is negative")
    assert admin.get_queue_runtime_properties(QUEUE).dead_letter_message_count == 1

    with client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        [peeked] = dlq.peek_messages(max_message_count=10)
        assert body(peeked) == b"bad order"
        assert peeked.message_id == "order-9"
        assert peeked.dead_letter_reason == "ValidationFailed"
        assert peeked.dead_letter_error_description == "total is negative"
        assert peeked.application_properties[b"tenant"] == b"acme"
        assert peeked.application_properties[b"n"] == 3

        [received] = dlq.receive_messages(max_wait_time=WAIT)
        assert received.message_id == "order-9"
        assert received.dead_letter_reason == "ValidationFailed"
        dlq.complete_message(received)
    props = admin.get_queue_runtime_properties(QUEUE)
    assert props.dead_letter_message_count == 0
    assert props.active_message_count == 0


def test_peek_does_not_lock_or_count_deliveries(client):
    send(client, QUEUE, *[ServiceBusMessage(f"m{i}") for i in range(3)])
    with client.get_queue_receiver(QUEUE) as receiver:
        for _ in range(2):
            peeked = receiver.peek_messages(max_message_count=10, sequence_number=1)
            assert [str(m) for m in peeked] == ["m0", "m1", "m2"]
            assert [m.delivery_count for m in peeked] == [0, 0, 0]
        # Peeking from a later sequence number skips the earlier messages.
        later = receiver.peek_messages(max_message_count=10, sequence_number=peeked[1].sequence_number)
        assert [str(m) for m in later] == ["m1", "m2"]
        messages = receiver.receive_messages(max_message_count=3, max_wait_time=WAIT)
        assert [m.delivery_count for m in messages] == [0, 0, 0]
        # A locked message is still visible to peek.
        assert len(receiver.peek_messages(max_message_count=10, sequence_number=1)) == 3
        for message in messages:
            receiver.complete_message(message)
        assert receiver.peek_messages(max_message_count=10, sequence_number=1) == []


def test_peek_on_dlq_keeps_delivery_count(client):
    send(client, QUEUE, ServiceBusMessage("to dlq"))
    with client.get_queue_receiver(QUEUE) as receiver:
        [message] = receiver.receive_messages(max_wait_time=WAIT)
        receiver.dead_letter_message(message, reason="r", error_description="d")
    with client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        first = dlq.peek_messages(max_message_count=5, sequence_number=1)
        second = dlq.peek_messages(max_message_count=5, sequence_number=1)
        assert [(str(m), m.delivery_count) for m in first] == [("to dlq", 1)]
        assert [(str(m), m.delivery_count) for m in second] == [("to dlq", 1)]


def test_renew_lock_extends_the_lock(client):
    send(client, QUEUE_SHORT_LOCK, ServiceBusMessage("long job"))
    with client.get_queue_receiver(QUEUE_SHORT_LOCK) as receiver:
        [message] = receiver.receive_messages(max_wait_time=WAIT)
        before = message.locked_until_utc
        time.sleep(1.2)
        receiver.renew_message_lock(message)
        assert message.locked_until_utc > before
        time.sleep(1.2)  # past the original 2 s lock, inside the renewed one
        receiver.complete_message(message)
        assert receiver.receive_messages(max_wait_time=EMPTY_WAIT) == []


def test_lock_expiry_returns_the_message(client):
    send(client, QUEUE_SHORT_LOCK, ServiceBusMessage("forgotten"))
    with client.get_queue_receiver(QUEUE_SHORT_LOCK) as receiver:
        [first] = receiver.receive_messages(max_wait_time=WAIT)
        assert first.delivery_count == 0
        time.sleep(2.5)
        [again] = receiver.receive_messages(max_wait_time=WAIT)
        assert str(again) == "forgotten"
        assert again.delivery_count == 1
        with pytest.raises(MessageLockLostError):
            receiver.complete_message(first)
        receiver.complete_message(again)


def test_lost_lock_is_reported_by_the_service(client):
    send(client, QUEUE_SHORT_LOCK, ServiceBusMessage("renew too late"))
    with client.get_queue_receiver(QUEUE_SHORT_LOCK) as receiver:
        [message] = receiver.receive_messages(max_wait_time=WAIT)
        time.sleep(2.5)
        # The SDK refuses locally once locked_until passes; move its copy of the
        # expiry forward so that the request reaches the emulator, which must
        # answer 410 com.microsoft:message-lock-lost.
        message._expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)
        with pytest.raises(MessageLockLostError) as lost:
            receiver.renew_message_lock(message)
        assert "410" in str(lost.value)


def test_defer_then_receive_deferred(client):
    send(client, QUEUE, ServiceBusMessage("later"))
    with client.get_queue_receiver(QUEUE) as receiver:
        [message] = receiver.receive_messages(max_wait_time=WAIT)
        sequence_number = message.sequence_number
        receiver.defer_message(message)
        assert receiver.receive_messages(max_wait_time=EMPTY_WAIT) == []
        [deferred] = receiver.receive_deferred_messages([sequence_number])
        assert str(deferred) == "later"
        receiver.complete_message(deferred)  # settles through $management update-disposition
        assert receiver.peek_messages(max_message_count=5, sequence_number=1) == []


def test_receive_and_delete_removes_on_delivery(client, admin):
    send(client, QUEUE, ServiceBusMessage("once"))
    _, [message] = receive(client, QUEUE, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
    assert str(message) == "once"
    assert admin.get_queue_runtime_properties(QUEUE).active_message_count == 0


def test_topic_fans_out_to_subscriptions_and_subscription_dlq(client, admin):
    with client.get_topic_sender(TOPIC) as sender:
        sender.send_messages(ServiceBusMessage("event-1", application_properties={"type": "created"}))
    copies = {}
    for sub in ("sub-a", "sub-b"):
        with client.get_subscription_receiver(TOPIC, sub) as receiver:
            [message] = receiver.receive_messages(max_wait_time=WAIT)
            copies[sub] = message
            assert str(message) == "event-1"
            assert message.application_properties == {b"type": b"created"}
            if sub == "sub-a":
                receiver.dead_letter_message(message, reason="Unhandled", error_description="no handler")
            else:
                receiver.complete_message(message)
    props = admin.get_subscription_runtime_properties(TOPIC, "sub-a")
    assert props.dead_letter_message_count == 1
    assert props.active_message_count == 0
    assert admin.get_subscription_runtime_properties(TOPIC, "sub-b").dead_letter_message_count == 0
    with client.get_subscription_receiver(TOPIC, "sub-a", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        [dead] = dlq.receive_messages(max_wait_time=WAIT)
        assert str(dead) == "event-1"
        assert dead.dead_letter_reason == "Unhandled"
        assert dead.dead_letter_error_description == "no handler"
        dlq.complete_message(dead)


def test_admin_runtime_properties_count_messages(client, admin):
    send(client, QUEUE, *[ServiceBusMessage(f"n{i}") for i in range(4)])
    with client.get_queue_receiver(QUEUE) as receiver:
        messages = receiver.receive_messages(max_message_count=2, max_wait_time=WAIT)
        assert len(messages) == 2
        for message in messages:
            receiver.dead_letter_message(message, reason="x")
    props = admin.get_queue_runtime_properties(QUEUE)
    assert props.active_message_count == 2
    assert props.dead_letter_message_count == 2
    assert props.total_message_count == 4
    queue = admin.get_queue(QUEUE)
    assert queue.max_delivery_count == 10
    assert queue.lock_duration == datetime.timedelta(seconds=30)


def test_missing_entity_raises_not_found(admin):
    with pytest.raises(ResourceNotFoundError):
        admin.get_queue_runtime_properties("no-such-queue")


def test_what_forward_to_cannot_deliver_lands_in_the_transfer_dead_letter_queue(client, admin):
    # Azure refuses a ForwardTo to a missing entity, so the target is created,
    # then deleted under the forwarding queue.
    source, target = f"fwd-{uuid.uuid4().hex[:8]}", f"fwd-target-{uuid.uuid4().hex[:8]}"
    admin.create_queue(target)
    admin.create_queue(source, forward_to=target)
    assert admin.get_queue(source).forward_to.rstrip("/").endswith(target)
    send(client, source, ServiceBusMessage("forwarded"))
    assert admin.get_queue_runtime_properties(target).active_message_count == 1
    admin.delete_queue(target)
    send(client, source, ServiceBusMessage("stranded"))
    props = admin.get_queue_runtime_properties(source)
    assert (props.active_message_count, props.dead_letter_message_count) == (0, 0)
    assert props.transfer_dead_letter_message_count == 1
    with client.get_queue_receiver(source, sub_queue=ServiceBusSubQueue.TRANSFER_DEAD_LETTER) as tdlq:
        [stranded] = tdlq.receive_messages(max_wait_time=WAIT)
        assert str(stranded) == "stranded"
        assert stranded.dead_letter_reason == "MessagingEntityNotFound"
        assert target in stranded.dead_letter_error_description
        tdlq.complete_message(stranded)
    assert admin.get_queue_runtime_properties(source).transfer_dead_letter_message_count == 0


def test_large_message_spans_frames(client):
    payload = bytes(range(256)) * 800  # 200 KiB: several AMQP frames each way
    send(client, QUEUE, ServiceBusMessage(payload))
    _, [message] = receive(client, QUEUE, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
    assert body(message) == payload


def test_unimplemented_feature_fails_fast_with_a_clear_error(target):
    # Sessions are not emulated: the link is refused, never left hanging.
    with ServiceBusClient.from_connection_string(target.conn_str, retry_total=0) as client:
        started = time.monotonic()
        with pytest.raises(ServiceBusError) as refused:
            with client.get_queue_receiver(QUEUE, session_id="s1") as receiver:
                receiver.receive_messages(max_wait_time=WAIT)
        assert time.monotonic() - started < 10
    if target.is_emulator:
        assert "amqp:not-implemented" in str(refused.value)


def test_expired_messages_are_not_delivered(client, admin):
    send(
        client,
        QUEUE,
        ServiceBusMessage("short-lived", time_to_live=datetime.timedelta(seconds=1)),
        ServiceBusMessage("long-lived"),
    )
    time.sleep(1.5)
    _, messages = receive(client, QUEUE, count=2, wait=EMPTY_WAIT, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
    assert [str(m) for m in messages] == ["long-lived"]
    assert admin.get_queue_runtime_properties(QUEUE).active_message_count == 0


def test_shared_access_signatures_are_checked_against_the_rules(target, client, admin):
    """The SDK's own SAS tokens pass the emulator's check in every flow here
    (rule `x`); a wrong key, and a rule without the right an operation needs,
    are refused as Azure refuses them."""
    if not target.is_emulator:
        pytest.skip("needs the emulator's known rules")
    from azure.core.exceptions import ClientAuthenticationError
    from azure.servicebus.management import ServiceBusAdministrationClient

    from conftest import LISTEN_ONLY_KEY, LISTEN_ONLY_RULE

    send(client, QUEUE, ServiceBusMessage(b"checked"))
    assert admin.get_queue_runtime_properties(QUEUE).active_message_count == 1

    wrong = target.conn_str.replace("SharedAccessKey=y", "SharedAccessKey=not-y")
    with ServiceBusClient.from_connection_string(wrong, retry_total=0) as bad:
        # The SDK does not pass the put-token's status description on.
        with pytest.raises(ServiceBusAuthenticationError):
            send(bad, QUEUE, ServiceBusMessage(b"refused"))

    listener = target.conn_str.replace("SharedAccessKeyName=x", f"SharedAccessKeyName={LISTEN_ONLY_RULE}")
    listener = listener.replace("SharedAccessKey=y", f"SharedAccessKey={LISTEN_ONLY_KEY}")
    with ServiceBusClient.from_connection_string(listener, retry_total=0) as reader:
        _, got = receive(reader, QUEUE)
        assert [body(m) for m in got] == [b"checked"]
        with pytest.raises(ServiceBusError) as refused:
            send(reader, QUEUE, ServiceBusMessage(b"no send right"))
    assert "'Send' claim(s) are required" in str(refused.value)

    listening_admin = ServiceBusAdministrationClient.from_connection_string(
        target.admin_conn_str.replace("SharedAccessKeyName=x", f"SharedAccessKeyName={LISTEN_ONLY_RULE}").replace(
            "SharedAccessKey=y", f"SharedAccessKey={LISTEN_ONLY_KEY}"
        ),
        connection_verify=False,
    )
    with pytest.raises(ClientAuthenticationError) as refused:
        listening_admin.get_queue_runtime_properties(QUEUE)
    assert "Manage,EntityRead claims required for this operation." in str(refused.value)
