"""Starts the servicebus-emulator binary once per session, or uses a real
namespace when SERVICEBUS_CONNECTION_STRING is set."""

import os
import pathlib
import re
import selectors
import subprocess
import time
import urllib.request

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.management import ServiceBusAdministrationClient

HERE = pathlib.Path(__file__).parent
READY = re.compile(r"ready amqp=127\.0\.0\.1:(\d+) http=127\.0\.0\.1:(\d+) https=127\.0\.0\.1:(\d+)")

QUEUE = "conformance"
QUEUE_MDC = "conformance-mdc"
QUEUE_SHORT_LOCK = "conformance-shortlock"
TOPIC = "conformance-topic"
SUBSCRIPTIONS = ("sub-a", "sub-b")
# A second authorization rule of the emulator's namespace, with Listen only.
LISTEN_ONLY_RULE = "listener"
LISTEN_ONLY_KEY = "listen-key"


class Target:
    def __init__(self, conn_str, admin_conn_str, http_port=None):
        self.conn_str = conn_str
        self.admin_conn_str = admin_conn_str
        self.http_port = http_port

    @property
    def is_emulator(self):
        return self.http_port is not None

    def reset(self):
        if self.is_emulator:
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/$emulator/reset", method="POST"
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 204
        else:
            drain_everything(self)


def drain_everything(target):
    """Against a real namespace there is no reset: empty every test entity."""
    with ServiceBusClient.from_connection_string(target.conn_str) as client:
        sources = [dict(queue_name=q) for q in (QUEUE, QUEUE_MDC, QUEUE_SHORT_LOCK)]
        sources += [dict(topic_name=TOPIC, subscription_name=s) for s in SUBSCRIPTIONS]
        for source in sources:
            for sub_queue in (None, ServiceBusSubQueue.DEAD_LETTER):
                receiver = (
                    client.get_queue_receiver(**source, sub_queue=sub_queue, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
                    if "queue_name" in source
                    else client.get_subscription_receiver(**source, sub_queue=sub_queue, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
                )
                with receiver:
                    while receiver.receive_messages(max_message_count=100, max_wait_time=1):
                        pass


@pytest.fixture(scope="session")
def target():
    conn_str = os.environ.get("SERVICEBUS_CONNECTION_STRING")
    if conn_str:
        yield Target(conn_str, conn_str)
        return
    binary = os.environ.get("SERVICEBUS_EMULATOR_BIN")
    if not binary or not os.access(binary, os.X_OK):
        pytest.fail(
            "SERVICEBUS_EMULATOR_BIN must name the servicebus-emulator binary "
            "(or set SERVICEBUS_CONNECTION_STRING to test a real namespace)",
            pytrace=False,
        )
    ports = [os.environ.get(f"SERVICEBUS_EMULATOR_{name}_PORT", "0") for name in ("AMQP", "HTTP", "HTTPS")]
    log = open(HERE / "emulator.log", "wb")
    process = subprocess.Popen(
        [
            binary,
            "--amqp-port", ports[0],
            "--http-port", ports[1],
            "--https-port", ports[2],
            "--topology", str(HERE.parent / "topology.yaml"),
            # As Azure: the SDK must put a $cbs token before each link.
            "--require-tokens",
            # And its SAS tokens are checked against the namespace's rules:
            # Microsoft's signer against the emulator's check, in every flow.
            "--sas-rule", "x=y",
            "--sas-rule", f"{LISTEN_ONLY_RULE}={LISTEN_ONLY_KEY}:Listen",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        amqp, http, https = wait_ready(process)
        yield Target(
            f"Endpoint=sb://127.0.0.1:{amqp};SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=true",
            f"Endpoint=sb://127.0.0.1:{https};SharedAccessKeyName=x;SharedAccessKey=y",
            http_port=http,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def wait_ready(process, timeout=10.0):
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not selector.select(timeout=deadline - time.monotonic()):
            break
        line = process.stdout.readline().decode()
        if not line:
            break
        match = READY.search(line)
        if match:
            return tuple(int(port) for port in match.groups())
    process.kill()
    pytest.fail(f"servicebus-emulator did not print its ready line (exit code {process.poll()}); see emulator.log", pytrace=False)


@pytest.fixture(autouse=True)
def clean(target):
    target.reset()


@pytest.fixture
def client(target):
    with ServiceBusClient.from_connection_string(target.conn_str) as client:
        yield client


@pytest.fixture
def admin(target):
    # The admin client always speaks https; the emulator's certificate is self-signed.
    return ServiceBusAdministrationClient.from_connection_string(
        target.admin_conn_str, connection_verify=not target.is_emulator
    )
