//! Conformance of the emulator against azservicebus 0.25.1, the Rust client
//! the project's Service Bus backend uses (fe2o3-amqp 0.14 underneath).
//!
//! azservicebus always dials 127.0.0.1:5672, whatever the connection string
//! says, so the emulator instances here run one at a time on that port.

use std::{process::Stdio, sync::Mutex, time::Duration};

use azservicebus::{core::BasicRetryPolicy, prelude::*, receiver::DeadLetterOptions};
use azservicebus_types::{
    messaging::ApplicationProperties,
    primitives::{SimpleValue, Timestamp, Uuid},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
    time::timeout,
};

type Client = ServiceBusClient<BasicRetryPolicy>;

static PORT_5672: Mutex<()> = Mutex::new(());

const CONNECTION_STRING: &str = "Endpoint=sb://127.0.0.1;SharedAccessKeyName=x;SharedAccessKey=y";
const QUEUE: &str = "conformance";
const QUEUE_MDC: &str = "conformance-mdc";
const WAIT: Duration = Duration::from_secs(3);

struct Emulator {
    _child: Child,
    http_port: u16,
}

impl Emulator {
    async fn start(extra_args: &[&str]) -> Emulator {
        let binary = std::env::var("SERVICEBUS_EMULATOR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_servicebus-emulator").to_owned());
        let topology = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/topology.yaml");
        let mut child = Command::new(&binary)
            .args(["--amqp-port", "5672", "--http-port", "0", "--https-port", "0"])
            .args(["--topology", topology])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        timeout(Duration::from_secs(10), BufReader::new(stdout).read_line(&mut line))
            .await
            .expect("the emulator prints its ready line within 10 s")
            .expect("the emulator's stdout is readable");
        let http_port = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("http=127.0.0.1:"))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"));
        Emulator {
            _child: child,
            http_port,
        }
    }

    async fn http(&self, method: &str, path: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .expect("HTTP port accepts connections");
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    async fn reset(&self) {
        let response = self.http("POST", "/$emulator/reset").await;
        assert!(response.starts_with("HTTP/1.1 204"), "{response}");
    }

    /// (ActiveMessageCount, DeadLetterMessageCount) from the ATOM GET.
    async fn counts(&self, entity: &str) -> (u64, u64) {
        let response = self.http("GET", &format!("/{entity}?api-version=2021-05")).await;
        let element = |name: &str| -> u64 {
            let open = format!("<d2p1:{name}>");
            let start = response
                .find(&open)
                .unwrap_or_else(|| panic!("no {name} in {response}"))
                + open.len();
            let end = start + response[start..].find('<').unwrap();
            response[start..end].parse().unwrap()
        };
        (element("ActiveMessageCount"), element("DeadLetterMessageCount"))
    }
}

async fn client() -> Client {
    ServiceBusClient::unsecured()
        .new_from_connection_string(CONNECTION_STRING, ServiceBusClientOptions::default())
        .await
        .expect("client connects to the emulator")
}

async fn receiver(client: &mut Client, queue: &str, sub_queue: SubQueue) -> ServiceBusReceiver {
    let options = ServiceBusReceiverOptions {
        sub_queue,
        ..Default::default()
    };
    client
        .create_receiver_for_queue(queue, options)
        .await
        .expect("receiver attaches")
}

/// Sends with a timeout and retries: fe2o3-amqp <= 0.16 can lose a fast settlement.
async fn send(client: &mut Client, queue: &str, messages: Vec<ServiceBusMessage>) {
    let mut sender = client
        .create_sender(queue, ServiceBusSenderOptions::default())
        .await
        .expect("sender attaches");
    for attempt in 1..=3 {
        match timeout(Duration::from_secs(10), sender.send_messages(messages.clone())).await {
            Ok(Ok(())) => break,
            Ok(Err(error)) => panic!("send failed: {error}"),
            Err(_) if attempt < 3 => continue,
            Err(_) => panic!("send timed out three times"),
        }
    }
    sender.dispose().await.unwrap();
}

async fn receive(receiver: &mut ServiceBusReceiver, count: u32) -> Vec<ServiceBusReceivedMessage> {
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while messages.len() < count as usize && tokio::time::Instant::now() < deadline {
        let wanted = count - messages.len() as u32;
        messages.extend(
            receiver
                .receive_messages_with_max_wait_time(wanted, WAIT)
                .await
                .expect("receive succeeds"),
        );
    }
    messages
}

fn typed_message(body: &[u8], id: &str) -> ServiceBusMessage {
    let mut message = ServiceBusMessage::new(body.to_vec());
    message.set_message_id(id).unwrap();
    message.set_correlation_id(Some("corr-1".to_owned()));
    message.set_subject(Some("subject-1".to_owned()));
    message.set_content_type(Some("application/octet-stream".to_owned()));
    message.set_reply_to(Some("reply-queue".to_owned()));
    message.set_to(Some("destination".to_owned()));
    let properties = ApplicationProperties::builder()
        .insert("int", SimpleValue::Int(-7))
        .insert("long", SimpleValue::Long(1 << 40))
        .insert("double", SimpleValue::Double(1.5.into()))
        .insert("bool", SimpleValue::Bool(true))
        .insert("string", SimpleValue::String("acme".into()))
        .insert("binary", SimpleValue::Binary(vec![0u8, 255].into()))
        .insert("uuid", SimpleValue::Uuid(Uuid::from([7u8; 16])))
        .insert(
            "timestamp",
            SimpleValue::Timestamp(Timestamp::from_milliseconds(1_704_164_645_000)),
        )
        .build();
    *message.application_properties_mut() = Some(properties);
    message
}

fn property<'a>(properties: Option<&'a ApplicationProperties>, key: &str) -> &'a SimpleValue {
    properties
        .and_then(|p| p.0.get(key))
        .unwrap_or_else(|| panic!("application property {key} is missing"))
}

async fn send_receive_complete(emulator: &Emulator, client: &mut Client) {
    send(
        client,
        QUEUE,
        vec![
            typed_message(b"\x00\x01\xfe payload", "id-1"),
            ServiceBusMessage::new(Vec::new()),
        ],
    )
    .await;
    let mut receiver = receiver(client, QUEUE, SubQueue::None).await;
    let messages = receive(&mut receiver, 2).await;
    assert_eq!(messages.len(), 2);
    let message = &messages[0];
    assert_eq!(message.body().unwrap(), b"\x00\x01\xfe payload");
    assert_eq!(message.message_id().as_deref(), Some("id-1"));
    assert_eq!(message.correlation_id().as_deref(), Some("corr-1"));
    assert_eq!(message.subject(), Some("subject-1"));
    assert_eq!(message.content_type(), Some("application/octet-stream"));
    assert_eq!(message.reply_to(), Some("reply-queue"));
    assert_eq!(message.to(), Some("destination"));
    assert_eq!(message.delivery_count(), Some(1), "azservicebus counts from 1");
    assert!(message.locked_until().is_some());
    let properties = message.application_properties();
    assert_eq!(property(properties, "int"), &SimpleValue::Int(-7));
    assert_eq!(property(properties, "long"), &SimpleValue::Long(1 << 40));
    assert_eq!(property(properties, "double"), &SimpleValue::Double(1.5.into()));
    assert_eq!(property(properties, "bool"), &SimpleValue::Bool(true));
    assert_eq!(property(properties, "string"), &SimpleValue::String("acme".into()));
    assert_eq!(
        property(properties, "binary"),
        &SimpleValue::Binary(vec![0u8, 255].into())
    );
    assert_eq!(property(properties, "uuid"), &SimpleValue::Uuid(Uuid::from([7u8; 16])));
    assert_eq!(
        property(properties, "timestamp"),
        &SimpleValue::Timestamp(Timestamp::from_milliseconds(1_704_164_645_000))
    );
    assert_eq!(messages[1].body().unwrap(), b"");
    for message in &messages {
        receiver.complete_message(message).await.expect("complete");
    }
    assert!(receive_none(&mut receiver).await);
    assert_eq!(emulator.counts(QUEUE).await, (0, 0));
    receiver.dispose().await.unwrap();
}

async fn receive_none(receiver: &mut ServiceBusReceiver) -> bool {
    receiver
        .receive_messages_with_max_wait_time(1, Duration::from_secs(1))
        .await
        .expect("receive succeeds")
        .is_empty()
}

async fn batch_send(client: &mut Client) {
    let mut sender = client
        .create_sender(QUEUE, ServiceBusSenderOptions::default())
        .await
        .unwrap();
    let mut batch = sender.create_message_batch(Default::default()).unwrap();
    for index in 0..3 {
        batch
            .try_add_message(ServiceBusMessage::new(format!("batch-{index}")))
            .unwrap();
    }
    timeout(Duration::from_secs(10), sender.send_message_batch(batch))
        .await
        .expect("batch send completes")
        .expect("batch send succeeds");
    sender.dispose().await.unwrap();
    let mut receiver = receiver(client, QUEUE, SubQueue::None).await;
    let messages = receive(&mut receiver, 3).await;
    let bodies: Vec<&[u8]> = messages.iter().map(|m| m.body().unwrap()).collect();
    assert_eq!(bodies, [b"batch-0", b"batch-1", b"batch-2"]);
    for message in &messages {
        receiver.complete_message(message).await.unwrap();
    }
    receiver.dispose().await.unwrap();
}

async fn abandon_then_dead_letter(emulator: &Emulator, client: &mut Client) {
    send(client, QUEUE, vec![typed_message(b"bad order", "order-9")]).await;
    let mut receiver = receiver(client, QUEUE, SubQueue::None).await;
    let first = receive(&mut receiver, 1).await.pop().expect("a message");
    receiver.abandon_message(&first, None).await.expect("abandon");
    let second = receive(&mut receiver, 1)
        .await
        .pop()
        .expect("the abandoned message again");
    assert_eq!(second.delivery_count(), Some(2));
    assert_eq!(second.sequence_number(), first.sequence_number());
    let options = DeadLetterOptions {
        dead_letter_reason: Some("ValidationFailed".into()),
        dead_letter_error_description: Some("total is negative".into()),
        properties_to_modify: None,
    };
    receiver
        .dead_letter_message(&second, options)
        .await
        .expect("dead-letter");
    receiver.dispose().await.unwrap();
    assert_eq!(emulator.counts(QUEUE).await, (0, 1));

    let mut dlq = receiver_dlq(client, QUEUE).await;
    let peeked = dlq.peek_messages(10, None).await.expect("peek the DLQ");
    assert_eq!(peeked.len(), 1);
    assert_eq!(peeked[0].body().unwrap(), b"bad order");
    assert_eq!(peeked[0].dead_letter_reason(), Some("ValidationFailed"));
    assert_eq!(peeked[0].dead_letter_error_description(), Some("total is negative"));
    assert_eq!(
        property(peeked[0].application_properties(), "long"),
        &SimpleValue::Long(1 << 40)
    );
    let dead = receive(&mut dlq, 1).await.pop().expect("the dead-lettered message");
    assert_eq!(dead.message_id().as_deref(), Some("order-9"));
    assert_eq!(dead.dead_letter_reason(), Some("ValidationFailed"));
    dlq.complete_message(&dead).await.expect("complete from the DLQ");
    dlq.dispose().await.unwrap();
    assert_eq!(emulator.counts(QUEUE).await, (0, 0));
}

async fn receiver_dlq(client: &mut Client, queue: &str) -> ServiceBusReceiver {
    receiver(client, queue, SubQueue::DeadLetter).await
}

async fn max_delivery_count(emulator: &Emulator, client: &mut Client) {
    send(client, QUEUE_MDC, vec![ServiceBusMessage::new("poison")]).await;
    let mut receiver = receiver(client, QUEUE_MDC, SubQueue::None).await;
    for attempt in 1..=3 {
        let message = receive(&mut receiver, 1).await.pop().expect("a delivery");
        assert_eq!(message.delivery_count(), Some(attempt));
        receiver.abandon_message(&message, None).await.unwrap();
    }
    assert!(receive_none(&mut receiver).await);
    receiver.dispose().await.unwrap();
    assert_eq!(emulator.counts(QUEUE_MDC).await, (0, 1));
    let mut dlq = receiver_dlq(client, QUEUE_MDC).await;
    let dead = receive(&mut dlq, 1)
        .await
        .pop()
        .expect("dead-lettered by MaxDeliveryCount");
    assert_eq!(dead.body().unwrap(), b"poison");
    assert_eq!(dead.dead_letter_reason(), Some("MaxDeliveryCountExceeded"));
    dlq.complete_message(&dead).await.unwrap();
    dlq.dispose().await.unwrap();
}

async fn peek_leaves_messages_alone(client: &mut Client) {
    let messages = (0..3).map(|i| ServiceBusMessage::new(format!("m{i}"))).collect();
    send(client, QUEUE, messages).await;
    let mut receiver = receiver(client, QUEUE, SubQueue::None).await;
    for _ in 0..2 {
        let peeked = receiver.peek_messages(10, Some(1)).await.unwrap();
        let bodies: Vec<&[u8]> = peeked.iter().map(|m| m.body().unwrap()).collect();
        assert_eq!(bodies, [b"m0", b"m1", b"m2"]);
    }
    let received = receive(&mut receiver, 3).await;
    assert!(received.iter().all(|m| m.delivery_count() == Some(1)));
    for message in &received {
        receiver.complete_message(message).await.unwrap();
    }
    assert!(receiver.peek_messages(10, Some(1)).await.unwrap().is_empty());
    receiver.dispose().await.unwrap();
}

/// A sender to a topic (azservicebus also opens the topic's `$management`
/// node) fans out to every subscription.
async fn topic_send_fans_out(emulator: &Emulator, client: &mut Client) {
    send(client, "conformance-topic", vec![ServiceBusMessage::new("to all")]).await;
    for sub in ["sub-a", "sub-b"] {
        let path = format!("conformance-topic/Subscriptions/{sub}");
        assert_eq!(emulator.counts(&path).await, (1, 0), "{sub}");
    }
}

async fn renew_lock(client: &mut Client) -> Result<(), String> {
    send(client, QUEUE, vec![ServiceBusMessage::new("renew me")]).await;
    let mut receiver = receiver(client, QUEUE, SubQueue::None).await;
    let mut message = receive(&mut receiver, 1).await.pop().expect("a message");
    let renewed = receiver.renew_message_lock(&mut message).await;
    // Link-level settlement uses the delivery, not the lock token: it always works.
    receiver.complete_message(&message).await.expect("complete");
    receiver.dispose().await.unwrap();
    renewed.map_err(|error| error.to_string())
}

fn run(scenarios: impl std::future::Future<Output = ()>) {
    let _port = PORT_5672.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(scenarios);
}

#[test]
fn azservicebus_flows() {
    run(async {
        let emulator = Emulator::start(&[]).await;
        let mut client = client().await;
        send_receive_complete(&emulator, &mut client).await;
        emulator.reset().await;
        batch_send(&mut client).await;
        emulator.reset().await;
        abandon_then_dead_letter(&emulator, &mut client).await;
        emulator.reset().await;
        max_delivery_count(&emulator, &mut client).await;
        emulator.reset().await;
        peek_leaves_messages_alone(&mut client).await;
        emulator.reset().await;
        topic_send_fans_out(&emulator, &mut client).await;
        emulator.reset().await;
        renew_lock(&mut client)
            .await
            .expect("renew works with x-opt-lock-token");
        client.dispose().await.unwrap();
    });
}

/// A plain fe2o3-amqp connection to the emulator on 5672, for the tests
/// that need frames azservicebus does not send (or hides).
async fn raw_connection() -> fe2o3_amqp::connection::ConnectionHandle<()> {
    fe2o3_amqp::Connection::builder()
        .container_id("raw-client")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
        .open("amqp://127.0.0.1:5672")
        .await
        .expect("open a connection")
}

/// A SAS token the emulator takes (it checks no signature).
fn any_token() -> fe2o3_amqp_cbs::token::CbsToken<'static> {
    fe2o3_amqp_cbs::token::CbsToken::new(
        "SharedAccessSignature sr=x&sig=y",
        "servicebus.windows.net:sastoken",
        None,
    )
}

/// `--require-tokens`: a link to an entity attaches only once a `$cbs` token
/// covering it was put on the connection, as on Azure; before that, and with
/// a token for another entity (or a name it merely starts with), it is
/// refused with amqp:unauthorized-access. azservicebus, which puts its tokens
/// first, works as usual.
#[test]
fn links_need_a_token_with_require_tokens() {
    use fe2o3_amqp::{Receiver, Session};
    use fe2o3_amqp_cbs::client::CbsClient;

    // On a session of its own: fe2o3-amqp 0.14 leaves a session whose link
    // was refused unusable for further attaches.
    async fn attach(connection: &mut fe2o3_amqp::connection::ConnectionHandle<()>, name: &str) -> Result<(), String> {
        let mut session = Session::begin(connection).await.expect("begin a session");
        let receiver = Receiver::attach(&mut session, name, QUEUE)
            .await
            .map_err(|e| format!("{e:?}"))?;
        receiver.close().await.expect("close the raw receiver");
        session.end().await.expect("end the session");
        Ok(())
    }

    run(async {
        let emulator = Emulator::start(&["--require-tokens"]).await;
        let mut connection = raw_connection().await;
        let mut session = Session::begin(&mut connection).await.expect("begin a session");
        let refused = attach(&mut connection, "before-any-token")
            .await
            .expect_err("no token yet");
        assert!(refused.contains("UnauthorizedAccess"), "{refused}");

        let mut cbs = CbsClient::attach(&mut session).await.expect("$cbs needs no token");
        for audience in ["amqp://127.0.0.1/other", "amqp://127.0.0.1/conform"] {
            cbs.put_token(audience, any_token()).await.expect("put a token");
            let refused = attach(&mut connection, audience)
                .await
                .expect_err("the token covers another entity");
            assert!(refused.contains("UnauthorizedAccess"), "{refused}");
        }
        cbs.put_token(format!("amqp://127.0.0.1/{QUEUE}").as_str(), any_token())
            .await
            .expect("put a token");
        attach(&mut connection, "with-its-token")
            .await
            .expect("the token covers the queue");
        cbs.close().await.expect("close $cbs");
        session.end().await.expect("end the session");
        connection.close().await.expect("close the connection");

        let mut client = client().await;
        send(&mut client, QUEUE, vec![ServiceBusMessage::new("with tokens")]).await;
        let mut receiver = receiver(&mut client, QUEUE, SubQueue::None).await;
        let message = receive(&mut receiver, 1).await.pop().expect("a message");
        receiver.complete_message(&message).await.expect("complete");
        receiver.dispose().await.unwrap();
        assert_eq!(emulator.counts(QUEUE).await, (0, 0));
        client.dispose().await.unwrap();
    });
}

/// `--accept-delay-ms`: the settlement of a client's send is held back that
/// long, a refusal (here com.microsoft:server-busy) as much as an accept,
/// since fe2o3-amqp 0.14 loses either when it comes too fast. Only lower
/// bounds are checked: a slow machine can make a settlement later, never
/// earlier.
#[test]
fn refusals_are_held_back_as_accepts_are() {
    use azservicebus_types::messaging::{Message, Outcome};
    use fe2o3_amqp::{Sender, Session};

    const DELAY: Duration = Duration::from_millis(400);
    run(async {
        let _emulator = Emulator::start(&["--accept-delay-ms", "400", "--server-busy", &format!("{QUEUE}=1")]).await;
        let mut connection = raw_connection().await;
        let mut session = Session::begin(&mut connection).await.expect("begin a session");
        let mut sender = Sender::attach(&mut session, "held-back", QUEUE)
            .await
            .expect("attach a sender");
        let mut outcomes = Vec::new();
        for body in ["refused", "accepted"] {
            let started = tokio::time::Instant::now();
            let message = Message::builder().value(body.to_string()).build();
            let outcome = timeout(WAIT, sender.send(message))
                .await
                .expect("the send is settled")
                .expect("the link stays up");
            let waited = started.elapsed();
            assert!(waited >= DELAY, "{body}: settled after {waited:?}, before {DELAY:?}");
            outcomes.push(outcome);
        }
        match &outcomes[..] {
            [Outcome::Rejected(refused), Outcome::Accepted(_)] => {
                let condition = format!("{:?}", refused.error);
                assert!(condition.contains("server-busy"), "{condition}");
            }
            other => panic!("expected a refusal then an accept, got {other:?}"),
        }
        sender.close().await.expect("close the sender");
        session.end().await.expect("end the session");
        connection.close().await.expect("close the connection");
    });
}

/// `--link-idle-timeout`: a link with no transfer or disposition for that
/// long is force-detached (amqp:link:detach-forced, "IdleTimerExpired"), as
/// Azure does after 10 minutes, even while it has credit out; a link that
/// sends keeps going, and so does `$cbs`. `--connection-idle-timeout`: a
/// connection left with no link but `$cbs` for that long is closed
/// (amqp:connection:forced), as Azure does after about a minute.
#[test]
fn idle_links_are_force_detached() {
    use azservicebus_types::messaging::{Body, Outcome};
    use azservicebus_types::primitives::Value;
    use fe2o3_amqp::{Receiver, Sender, Session};
    use fe2o3_amqp_cbs::client::CbsClient;

    run(async {
        let emulator = Emulator::start(&["--link-idle-timeout", "1s", "--connection-idle-timeout", "1s"]).await;
        let mut connection = raw_connection().await;
        let mut session = Session::begin(&mut connection).await.expect("begin a session");
        let mut cbs = CbsClient::attach(&mut session).await.expect("attach $cbs");
        let mut idle = Receiver::attach(&mut session, "idle-receiver", QUEUE_MDC)
            .await
            .expect("attach the receiver");
        let mut sender = Sender::attach(&mut session, "busy-sender", QUEUE)
            .await
            .expect("attach the sender");
        let started = tokio::time::Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_millis(2500) {
            let outcome = sender.send("keep-alive").await.expect("a busy sender stays attached");
            assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
            sent += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let detached = timeout(Duration::from_secs(1), idle.recv::<Body<Value>>())
            .await
            .expect("the idle receiver was detached by now")
            .expect_err("nothing was sent to it");
        let detached = format!("{detached:?}");
        assert!(detached.contains("DetachForced"), "{detached}");
        assert!(detached.contains("IdleTimerExpired"), "{detached}");
        assert!(detached.contains("idle-receiver"), "{detached}");
        cbs.put_token(format!("amqp://127.0.0.1/{QUEUE}").as_str(), any_token())
            .await
            .expect("$cbs is not detached for idleness");
        // With no link but `$cbs` left, the connection is closed a second later.
        sender.close().await.expect("close the sender");
        let _ = idle.close().await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let closed = timeout(
            WAIT,
            cbs.put_token(format!("amqp://127.0.0.1/{QUEUE}").as_str(), any_token()),
        )
        .await
        .expect("a put on a closed connection fails at once")
        .expect_err("the connection was closed");
        let closed = format!("{closed:?}");
        let ended = connection
            .close()
            .await
            .expect_err("the emulator closed the connection first");
        let ended = format!("{ended:?}");
        assert!(ended.contains("ConnectionForced"), "{closed} / {ended}");
        assert!(ended.contains("did not have any active links"), "{ended}");
        assert_eq!(emulator.counts(QUEUE).await.0, sent, "the sender's messages arrived");
    });
}

/// `--strict` leaves out x-opt-lock-token, as Azure does. azservicebus then
/// reads the lock token from the delivery tag in the wrong byte order: link
/// settlement still works, but renewing the lock fails, as it would on Azure.
#[test]
fn strict_mode_omits_the_lock_token_annotation() {
    run(async {
        let emulator = Emulator::start(&["--strict"]).await;
        let mut client = client().await;
        send(&mut client, QUEUE, vec![ServiceBusMessage::new("strict")]).await;
        let mut receiver = receiver(&mut client, QUEUE, SubQueue::None).await;
        let message = receive(&mut receiver, 1).await.pop().expect("a message");
        let raw = message.raw_amqp_message();
        assert!(raw.delivery_annotations.is_none(), "{:?}", raw.delivery_annotations);
        let annotations = raw.message_annotations.as_ref().expect("annotations");
        let keys: Vec<String> = annotations.0.keys().map(|k| format!("{k:?}")).collect();
        assert!(!keys.iter().any(|k| k.contains("x-opt-lock-token")), "{keys:?}");
        assert!(keys.iter().any(|k| k.contains("x-opt-sequence-number")), "{keys:?}");
        receiver
            .abandon_message(&message, None)
            .await
            .expect("link-level abandon works");
        receiver.dispose().await.unwrap();
        emulator.reset().await;
        let error = renew_lock(&mut client)
            .await
            .expect_err("renew must fail in strict mode");
        assert!(error.to_lowercase().contains("lock"), "{error}");
        assert_eq!(emulator.counts(QUEUE).await, (0, 0));
        client.dispose().await.unwrap();
    });
}
