//! Service Bus specifics, against the project's emulator (strict mode, as
//! Azure): true peek, typed and system properties, dead-letter attributes,
//! subscription DLQs, ATOM counts, and errors. The shared guarantees are in
//! tests/conformance.rs.
//!
//! Every test here and in the conformance instance talks to one emulator per
//! test binary on port 5672 (see tests/common/servicebus.rs), with its own
//! uniquely named entities.
#![cfg(feature = "servicebus")]

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use azservicebus::prelude::*;
use common::servicebus::{
    CONNECTION_STRING_ENV, ServiceBusFixture, ServiceBusTopicFixture, UNREACHABLE_CONNECTION_STRING_ENV, attributes_of,
    emulator,
};
use common::{Fixture, TestMessage, attrs, redrive, run_measured};
use dlq_bridge::backend::{BackendError, QueueBackend};
use dlq_bridge::config::Config;
use dlq_bridge::engine::redrive::{MARK_COUNT, MARK_ID, Trigger};
use dlq_bridge::engine::registry::{RedriveRequest, Registry, RegistryError};
use dlq_bridge::model::{AttrValue, Exactness, Leased};
use fe2o3_amqp_types::messaging::ApplicationProperties;
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol, Timestamp, Uuid as AmqpUuid};

fn all() -> RedriveRequest {
    RedriveRequest {
        filter: Some("true".into()),
        ..Default::default()
    }
}

/// A redrive of the messages dead-lettered for `reason`.
fn by_reason(reason: &str) -> RedriveRequest {
    RedriveRequest {
        filter: Some(format!("reason == {reason:?}")),
        ..Default::default()
    }
}

fn failing(i: usize, error: &str) -> TestMessage {
    TestMessage {
        body: format!("m{i}").into_bytes(),
        attributes: attrs(&[("error", error)]),
        ordering_key: None,
    }
}

/// Every application property type azservicebus can send, and the system
/// properties a copy keeps.
fn rich_message() -> (ServiceBusMessage, ApplicationProperties) {
    let mut m = ServiceBusMessage::new(b"\x00\x01\xfe\xff binary \xc3\x28".to_vec());
    m.set_message_id("orig-1").unwrap();
    m.set_correlation_id(Some("corr-1".to_owned()));
    m.set_subject(Some("subject-1".to_owned()));
    m.set_content_type(Some("application/octet-stream".to_owned()));
    m.set_reply_to(Some("reply-queue".to_owned()));
    m.set_to(Some("destination".to_owned()));
    m.set_session_id("session-1".to_owned()).unwrap();
    m.set_reply_to_session_id(Some("reply-session".to_owned())).unwrap();
    m.set_time_to_live(Some(Duration::from_secs(3600))).unwrap();
    let props = ApplicationProperties::builder()
        .insert("int", SimpleValue::Int(-7))
        .insert("long", SimpleValue::Long(1 << 40))
        .insert("double", SimpleValue::Double(1.5.into()))
        .insert("float", SimpleValue::Float(0.25f32.into()))
        .insert("bool", SimpleValue::Bool(true))
        .insert("string", SimpleValue::String("acme ✓".into()))
        .insert("binary", SimpleValue::Binary(vec![0u8, 255].into()))
        .insert("uuid", SimpleValue::Uuid(AmqpUuid::from([7u8; 16])))
        .insert(
            "timestamp",
            SimpleValue::Timestamp(Timestamp::from_milliseconds(1_704_164_645_123)),
        )
        .insert("ubyte", SimpleValue::Ubyte(200))
        .insert("short", SimpleValue::Short(-300))
        .insert("ulong", SimpleValue::Ulong(u64::MAX))
        .insert("symbol", SimpleValue::Symbol(Symbol::from("sym")))
        .insert("error", SimpleValue::String("Boom".into()))
        .insert("error_description", SimpleValue::String("it went boom".into()))
        .build();
    *m.application_properties_mut() = Some(props.clone());
    (m, props)
}

/// `inspect` (the CLI, a true peek) leaves every delivery count unchanged.
#[tokio::test]
async fn inspect_leaves_delivery_counts_unchanged() {
    let f = ServiceBusFixture::create(false).await;
    f.dead_letter(&(0..4).map(|i| failing(i, "Timeout")).collect::<Vec<_>>())
        .await;
    let counts = |msgs: Vec<ServiceBusPeekedMessage>| -> Vec<(i64, Option<u32>)> {
        msgs.iter().map(|m| (m.sequence_number(), m.delivery_count())).collect()
    };
    let before = counts(f.browse_dlq().await);
    assert_eq!(before.len(), 4);

    let path = f.config_file_with("");
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
            .env_remove("DLQ_BRIDGE_CONFIG")
            .env(
                CONNECTION_STRING_ENV,
                std::env::var(CONNECTION_STRING_ENV).expect("set by the fixture"),
            )
            .args(["--config", path.to_str().unwrap(), "inspect", "dlq", "-o", "json"])
            .output()
            .expect("run dlq-bridge inspect");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "inspect failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..4 {
            // Bodies are base64 in JSON: "m0" → "bTA=" ...
            let b64 = ["bTA=", "bTE=", "bTI=", "bTM="][i];
            assert!(stdout.contains(b64), "message m{i} is shown: {stdout}");
        }
    }
    // The backend's own peek, too.
    let reg = Registry::new(f.config());
    let b = reg.backend("dlq").await.unwrap();
    assert!(b.capabilities().true_peek);
    assert_eq!(b.peek(10).await.unwrap().len(), 4);
    assert_eq!(counts(f.browse_dlq().await), before, "delivery counts are unchanged");
}

/// System properties and typed application properties survive a redrive
/// byte for byte; DeadLetterReason/ErrorDescription are stripped and the
/// marks added; the copy gets `<original id>-<redrive count>` as MessageId.
#[tokio::test]
async fn properties_survive_and_dead_letter_attributes_are_replaced_by_marks() {
    let f = ServiceBusFixture::create(false).await;
    let (msg, props) = rich_message();
    f.dead_letter_raw(vec![msg]).await;

    let reg = Registry::new(f.config());
    let b = reg.backend("dlq").await.unwrap();
    let peeked = b.peek(10).await.unwrap();
    assert_eq!(peeked.len(), 1);
    let m = &peeked[0];
    let seq = m.properties["sequence_number"].clone();
    assert_eq!(m.id, format!("orig-1@{seq}"), "MessageId and SequenceNumber");
    assert_eq!(m.reason.as_deref(), Some("Boom"));
    assert_eq!(m.description.as_deref(), Some("it went boom"));
    assert_eq!(m.source.as_deref(), Some(f.entity.as_str()), "the source is the queue");
    assert_eq!(m.ordering_key.as_deref(), Some("session-1"));
    assert!(m.delivery_count.is_some_and(|c| c >= 1), "{m:?}");
    assert!(m.enqueued_at.is_some());
    for (k, v) in [
        ("correlation_id", "corr-1"),
        ("subject", "subject-1"),
        ("content_type", "application/octet-stream"),
        ("reply_to", "reply-queue"),
        ("to", "destination"),
        ("reply_to_session_id", "reply-session"),
        ("time_to_live", "3600000"),
        ("message_id", "orig-1"),
    ] {
        assert_eq!(m.properties.get(k).map(String::as_str), Some(v), "property {k}: {m:?}");
    }
    assert!(m.properties.contains_key("sequence_number"));
    assert!(b.is_dead_letter_attribute("DeadLetterReason"));
    assert!(m.attributes.contains_key("DeadLetterReason"));
    assert_eq!(m.attributes["int"].value, AttrValue::Int(-7));
    assert_eq!(m.attributes["int"].data_type.as_deref(), Some("int"));
    assert_eq!(m.attributes["long"].value, AttrValue::Int(1 << 40));
    drop(b);
    drop(reg);

    let s = redrive(f.config(), all()).await;
    assert_eq!(s.settled, 1, "{s:?}");
    assert!(s.ok(), "{s:?}");

    let mut rx = f.source_receiver().await;
    let got = ServiceBusFixture::receive(&mut rx, 10).await;
    assert_eq!(got.len(), 1);
    let c = &got[0];
    assert_eq!(c.body().unwrap(), b"\x00\x01\xfe\xff binary \xc3\x28");
    let copy_id = c.message_id().expect("a MessageId").to_string();
    assert!(
        copy_id.starts_with(&format!("orig-1@{seq}-1~")) && copy_id.len() == format!("orig-1@{seq}-1~").len() + 8,
        "the copy's MessageId: {copy_id}"
    );
    assert_eq!(c.correlation_id().as_deref(), Some("corr-1"));
    assert_eq!(c.subject(), Some("subject-1"));
    assert_eq!(c.content_type(), Some("application/octet-stream"));
    assert_eq!(c.reply_to(), Some("reply-queue"));
    assert_eq!(c.to(), Some("destination"));
    assert_eq!(c.session_id(), Some("session-1"));
    assert_eq!(c.reply_to_session_id(), Some("reply-session"));
    assert_eq!(c.time_to_live(), Some(Duration::from_secs(3600)));
    let have = c.application_properties().expect("application properties");
    for (k, v) in props.0.iter() {
        assert_eq!(
            have.0.get(k),
            Some(v),
            "application property {k} keeps value and AMQP type"
        );
    }
    assert!(!have.0.contains_key("DeadLetterReason"), "{have:?}");
    assert!(!have.0.contains_key("DeadLetterErrorDescription"), "{have:?}");
    let marks = attributes_of(Some(have));
    assert_eq!(marks[MARK_COUNT].as_text(), "1");
    assert_eq!(marks[MARK_ID].as_text(), format!("{}:orig-1@{seq}", s.run_id));
    rx.complete_message(&got[0]).await.unwrap();
    rx.dispose().await.ok();
    assert_eq!(f.dlq_count().await, 0);
}

/// JMS clients and the Python and Java SDKs send bodies that are not data
/// sections: a TextMessage is an amqp-value string, a MapMessage an
/// amqp-value map, a StreamMessage amqp-sequence sections. Each copy has
/// the same section kind and value as its original, so its consumer reads it
/// as it would have read the original (a StreamMessage's copy was empty, a
/// map's was its debug text, a string's a data section).
#[tokio::test]
async fn bodies_of_every_section_kind_are_copied_as_they_were() {
    use fe2o3_amqp_types::messaging::{AmqpSequence, AmqpValue, Batch, Body, Message, Properties};
    use fe2o3_amqp_types::primitives::{OrderedMap, Value};

    let f = ServiceBusFixture::create(false).await;
    let mut map = OrderedMap::new();
    map.insert(Value::String("qty".into()), Value::Int(3));
    map.insert(Value::String("sku".into()), Value::String("A-1".into()));
    let bodies = [
        Body::Value(AmqpValue(Value::String("a text message ✓".into()))),
        Body::Value(AmqpValue(Value::Map(map))),
        Body::Value(AmqpValue(Value::Binary(vec![0u8, 0xff, 0xc3, 0x28].into()))),
        Body::Sequence(Batch::from(vec![AmqpSequence(vec![
            Value::Long(7),
            Value::String("stream".into()),
        ])])),
    ];
    let messages = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(format!("kind-{i}").into()),
                ..Default::default()
            }),
            application_properties: None,
            body: body.clone(),
            footer: None,
        })
        .collect();
    f.dead_letter_amqp(messages).await;

    let s = redrive(f.config(), all()).await;
    assert_eq!(s.settled, bodies.len() as u64, "{s:?}");
    let mut rx = f.source_receiver().await;
    let got = ServiceBusFixture::receive(&mut rx, 10).await;
    assert_eq!(got.len(), bodies.len());
    for c in &got {
        let id = c.message_id().expect("a MessageId").to_string();
        let i: usize = id["kind-".len()..id.find('@').expect("a copy's MessageId")]
            .parse()
            .expect("the original's index");
        assert_eq!(c.raw_amqp_message().body, bodies[i], "the copy of {id}");
        rx.complete_message(c).await.unwrap();
    }
    rx.dispose().await.ok();
    assert_eq!(f.dlq_count().await, 0);
}

/// `dlq-bridge redrive dlq --to DEST` on `f`'s private emulator, its
/// connection string `cs` in `env`: the exit code, and stdout and stderr.
fn redrive_to(f: &ServiceBusFixture, env: &str, cs: &str, dest: &str) -> (Option<i32>, String) {
    redrive_to_with(f, env, cs, dest, &[])
}

fn redrive_to_with(f: &ServiceBusFixture, env: &str, cs: &str, dest: &str, extra: &[&str]) -> (Option<i32>, String) {
    let config = f.config_file_with("");
    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .env_remove("DLQ_BRIDGE_CONFIG")
        .env(env, cs)
        .args(["--config", config.to_str().unwrap(), "redrive", "dlq", "--to", dest])
        .args(["--yes", "--no-journal"])
        .args(extra)
        .output()
        .expect("dlq-bridge ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said)
}

/// The delivery count of every message in `f`'s dead-letter queue, browsed.
async fn dlq_delivery_counts(f: &ServiceBusFixture) -> Vec<u32> {
    f.browse_dlq()
        .await
        .iter()
        .map(|m| m.delivery_count().unwrap_or_default())
        .collect()
}

/// Service Bus holds a leased message for the entity's LockDuration, not for
/// `redrive.hold` (5 minutes here): a rated pass sizes its leases to the
/// LockDuration, so no lock lapses while a leased message waits for its turn.
/// Leases sized to the hold took all 8 messages at once, the last ones' locks
/// lapsed before their turn (8 at 2 a second is 4 s, twice the lock), and
/// their completes were lost without a word: "settled" for messages that
/// were still in the dead-letter queue.
#[tokio::test]
async fn a_rated_pass_keeps_within_the_entitys_lock_duration() {
    use common::servicebus::{RATED_HOST, create_queue, private_emulator, queue_message_count};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_RATED";
    const DEST: &str = "rated-dest";
    let (emu, cs, client) = private_emulator("servicebus-rated", RATED_HOST, &["--lock-duration", "2s"]).await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    create_queue(&f.http, DEST, None).await;
    let msgs: Vec<TestMessage> = (0..8).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    let (code, said) = redrive_to_with(&f, ENV, &cs, DEST, &["--rate", "2"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("settled:   8"), "{said}");
    assert_eq!(queue_message_count(&f.http, DEST).await, 8, "{said}");
    // Past any lock that could have lapsed: nothing comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(f.dlq_count().await, 0, "{said}");

    // One session: its batches go one after another, and the pass leased on
    // while its matches waited for them, seconds past their locks. The
    // completes of lapsed locks were lost and counted settled: "drained",
    // with messages left in the dead-letter queue.
    let session: Vec<TestMessage> = (0..12)
        .map(|i| TestMessage {
            ordering_key: Some("S1".into()),
            ..failing(i, "Timeout")
        })
        .collect();
    f.put_in_dlq(&session).await;
    let (code, said) = redrive_to_with(&f, ENV, &cs, DEST, &["--rate", "4"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("settled:   12"), "{said}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(f.dlq_count().await, 0, "{said}");
    assert_eq!(queue_message_count(&f.http, DEST).await, 20, "{said}");

    // A pass that outlasts the lock: 10 matches at 2 a second take about
    // 5 s, and the 20 messages it holds without moving, from its first
    // leases on, keep their locks (renew-lock). Unrenewed, their locks
    // lapsed after 2 s, each was delivered again (its DeliveryCount raised)
    // and held a second time: `released` counted 20 and more.
    let mixed: Vec<TestMessage> = (0..30)
        .map(|i| failing(i, if i % 3 == 0 { "Timeout" } else { "Poison" }))
        .collect();
    f.put_in_dlq(&mixed).await;
    let before = dlq_delivery_counts(&f).await;
    let (code, said) = redrive_to_with(
        &f,
        ENV,
        &cs,
        DEST,
        &["--rate", "2", "--filter", r#"attributes.error == "Timeout""#],
    );
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("settled:   10"), "{said}");
    assert!(
        said.contains("released:  20 "),
        "each held message was held once: {said}"
    );
    assert_eq!(queue_message_count(&f.http, DEST).await, 30, "{said}");
    let after = dlq_delivery_counts(&f).await;
    assert_eq!(after.len(), 20, "{said}");
    let base = before.iter().max().copied().unwrap_or_default();
    assert!(
        after.iter().all(|&c| c <= base + 1),
        "delivered once by the pass: {before:?} -> {after:?}"
    );
}

/// A stall past the LockDuration: the emulator is frozen 3 s against a 2 s
/// lock while a pass holds messages it does not move. Their renewals then
/// come back refused (the locks are gone): the pass warns once, does not
/// ask again for those locks, goes on, and loses nothing (a lapsed message
/// is back in the dead-letter queue; a match whose complete came too late
/// may have a copy and stay, which a journal would settle).
#[tokio::test]
async fn renewals_refused_after_a_stall_are_warned_of_once_and_lose_nothing() {
    use common::servicebus::{FROZEN_LOCKS_HOST, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_FROZEN_LOCKS";
    let (emu, cs, client) =
        private_emulator("servicebus-frozen-locks", FROZEN_LOCKS_HOST, &["--lock-duration", "2s"]).await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let msgs: Vec<TestMessage> = (0..30)
        .map(|i| failing(i, if i % 3 == 0 { "Timeout" } else { "Poison" }))
        .collect();
    f.put_in_dlq(&msgs).await;
    let pid = emu.server_pid().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    // 10 matches at 2 a second: about 5 s, frozen from 2.5 s (the pass
    // holds messages by then, even on a slow machine) to 5.5 s.
    let handle = {
        let config = f.config_file_with("");
        let cs = cs.clone();
        let dest = f.entity.clone();
        std::thread::spawn(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
                .env_remove("DLQ_BRIDGE_CONFIG")
                .env(ENV, &cs)
                .args(["--config", config.to_str().unwrap(), "redrive", "dlq", "--to", &dest])
                .args([
                    "--yes",
                    "--no-journal",
                    "--rate",
                    "2",
                    "--filter",
                    r#"attributes.error == "Timeout""#,
                ])
                .output()
                .expect("dlq-bridge ran");
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    signal("-STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal("-CONT");
    let said = tokio::task::spawn_blocking(move || handle.join().expect("the run's thread"))
        .await
        .unwrap();
    assert_eq!(
        said.matches("extending held messages failed").count(),
        1,
        "refused renewals are warned of once: {said}"
    );
    let text = |m: &ServiceBusPeekedMessage| String::from_utf8_lossy(m.body().unwrap()).into_owned();
    let left: std::collections::BTreeSet<String> = f.browse_dlq().await.iter().map(text).collect();
    let arrived: std::collections::BTreeSet<String> = f.browse(SubQueue::None).await.iter().map(text).collect();
    for m in &msgs {
        let body = String::from_utf8_lossy(&m.body).into_owned();
        assert!(left.contains(&body) || arrived.contains(&body), "{body} lost: {said}");
    }
    for body in &arrived {
        let i: usize = body[1..].parse().unwrap();
        assert_eq!(i % 3, 0, "only matches were moved: {body}");
    }
}

/// Azure refuses a batch of messages with distinct MessageIds (every copy
/// has its own) to an entity with partitioning and duplicate detection
/// (amqp:not-allowed). The copies then go one a send, and every message
/// moves; the refused batch's copies each failed, on every run.
#[tokio::test]
async fn a_destination_that_refuses_batches_gets_the_copies_one_by_one() {
    use common::servicebus::{PARTITIONED_HOST, create_queue, private_emulator, queue_message_count};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_PARTITIONED";
    const DEST: &str = "partitioned-dest";
    let (emu, cs, client) = private_emulator(
        "servicebus-partitioned",
        PARTITIONED_HOST,
        &["--refuse-mixed-batches", DEST],
    )
    .await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    create_queue(&f.http, DEST, None).await;
    let msgs: Vec<TestMessage> = (0..12).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    let (code, said) = redrive_to(&f, ENV, &cs, DEST);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("settled:   12"), "{said}");
    assert_eq!(queue_message_count(&f.http, DEST).await, 12, "{said}");
    assert_eq!(f.dlq_count().await, 0, "{said}");
}

/// Azure rejects a send with com.microsoft:server-busy while it throttles a
/// namespace ("Please wait 2 seconds and try again"). The envelope is sent
/// again after a pause, so a throttled redrive still moves every message
/// (each copy of a throttled envelope failed, and the pass moved nothing).
#[tokio::test]
async fn sends_refused_as_throttled_are_sent_again() {
    use common::servicebus::{SERVER_BUSY_HOST, create_queue, private_emulator, queue_message_count};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_SERVER_BUSY";
    const DEST: &str = "throttled-dest";
    let (emu, cs, client) = private_emulator(
        "servicebus-server-busy",
        SERVER_BUSY_HOST,
        &["--server-busy", &format!("{DEST}=2")],
    )
    .await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    create_queue(&f.http, DEST, None).await;
    let msgs: Vec<TestMessage> = (0..10).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    let (code, said) = redrive_to(&f, ENV, &cs, DEST);
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(queue_message_count(&f.http, DEST).await, 10, "{said}");
    assert_eq!(f.dlq_count().await, 0, "{said}");
    assert_eq!(
        said.matches("com.microsoft:server-busy").count(),
        2,
        "each refusal is told, then the send goes again: {said}"
    );
}

/// Azure counts a peek against a namespace's throttling credits as it does a
/// send (one per message), and answers one over them with 503 server-busy.
/// The dead-letter link browses before every lease and confirms every batch
/// of settles with a browse: a throttled browse is asked again after a
/// pause, and the pass moves every message. It ended the link, and with it
/// the pass, saying the emulator could not be reached.
#[tokio::test]
async fn browses_refused_as_throttled_are_asked_again() {
    use common::servicebus::{PEEK_BUSY_HOST, create_queue, private_emulator, queue_message_count};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_PEEK_BUSY";
    const DLQ: &str = "throttled-browses";
    const DEST: &str = "throttled-browses-dest";
    let (emu, cs, client) = private_emulator("servicebus-peek-busy", PEEK_BUSY_HOST, &[]).await;
    let f = ServiceBusFixture::on_named(emu.url(), client, ENV, DLQ, &[]).await;
    create_queue(&f.http, DEST, None).await;
    let msgs: Vec<TestMessage> = (0..10).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    // From here: the fixture's own browses above are not throttled.
    let throttled = reqwest::Client::new()
        .post(format!("{}/$emulator/throttle-peeks/{DLQ}/2", emu.url()))
        .send()
        .await
        .unwrap();
    assert!(throttled.status().is_success(), "{throttled:?}");
    let (code, said) = redrive_to(&f, ENV, &cs, DEST);
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(
        said.matches("throttled (server busy)").count(),
        2,
        "each refusal is told, then the browse goes again: {said}"
    );
    assert_eq!(queue_message_count(&f.http, DEST).await, 10, "{said}");
    assert_eq!(f.dlq_count().await, 0, "{said}");
}

/// fe2o3-amqp (azservicebus's AMQP layer) can lose a settlement that comes
/// too fast, so a send can wait for an outcome that never comes. Here the
/// emulator loses the first send's settlement (the copy is enqueued, the
/// client never hears so), then the whole token put (no answer either) of
/// the sender link attached again for the retry, so the retry opens a new
/// connection; there, the token put's settlement is lost but its answer
/// comes, as two CI runs lost one (they then gave up with "the $cbs token
/// put timed out"): the answer is enough, and the copies are sent and
/// confirmed. Nothing is lost: the originals, whose locks were on the
/// dropped connection, are back in the dead-letter queue once those locks
/// lapse, and the destination holds every copy (the first send's twice: at
/// least once).
#[tokio::test]
async fn a_lost_settlement_and_a_lost_token_put_are_outlived() {
    use common::servicebus::{LOST_SETTLEMENTS_HOST, create_queue, private_emulator, queue_message_count};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_LOST_SETTLEMENTS";
    const DEST: &str = "lost-settlements-dest";
    let (emu, cs, client) = private_emulator(
        "servicebus-lost-settlements",
        LOST_SETTLEMENTS_HOST,
        &[
            "--lock-duration",
            "3s",
            "--lose-send-settlement",
            &format!("{DEST}=1"),
            // The first put for DEST attaches the sender; the second, for
            // the sender attached again after the lost settlement, is lost.
            "--lose-token-put",
            &format!("{DEST}=2"),
            // Counts the puts answered: the first (attach), then the one on
            // the new connection.
            "--lose-token-put-settlement",
            &format!("{DEST}=2"),
        ],
    )
    .await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    create_queue(&f.http, DEST, None).await;
    let msgs: Vec<TestMessage> = (0..3).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    let (code, said) = redrive_to(&f, ENV, &cs, DEST);
    assert!(said.contains("send not confirmed within"), "{said}");
    assert!(said.contains("the $cbs token put timed out"), "{said}");
    assert!(said.contains("retrying on a new connection"), "{said}");
    assert_eq!(said.matches("the $cbs token put timed out").count(), 1, "{said}");
    assert!(!said.contains(&format!("send to {DEST} failed")), "{said}");
    // Sent, but not removed: their locks went with the dropped connection.
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("sent:      3"), "{said}");
    // No journal (`--no-journal`): nothing would settle them without sending again.
    assert!(said.contains("without a journal, a rerun sends it again"), "{said}");
    assert_eq!(queue_message_count(&f.http, DEST).await, 6, "{code:?} {said}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(f.dlq_count().await, 3, "{code:?} {said}");
}

/// Azure refuses every send to a Disabled or SendDisabled entity
/// (com.microsoft:entity-disabled): a redrive to one fails at once, before
/// anything is leased, saying so; it said "cannot reach ... (is the service
/// or emulator running?)" and dropped the dead-letter queue's link (and what
/// it held) at each batch's attach.
#[tokio::test]
async fn a_redrive_to_a_disabled_destination_says_so() {
    use common::servicebus::{DISABLED_HOST, create_queue_described, private_emulator, queue_message_count};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_DISABLED";
    let (emu, cs, client) = private_emulator("servicebus-disabled", DISABLED_HOST, &[]).await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let dest = format!("{}-dest", f.entity);
    create_queue_described(&f.http, &dest, "<Status>SendDisabled</Status>").await;
    let msgs: Vec<TestMessage> = (0..3).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    let (code, said) = redrive_to(&f, ENV, &cs, &dest);
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains(&format!("{dest} is SendDisabled")), "{said}");
    assert!(!said.contains("cannot reach"), "{said}");
    assert_eq!(f.dlq_count().await, 3, "{said}");
    assert_eq!(queue_message_count(&f.http, &dest).await, 0, "{said}");
}

/// What auto-forwarding could not deliver lands in the transfer dead-letter
/// queue, `<queue>/$Transfer/$DeadLetterQueue`, not in the dead-letter queue.
/// With `sub_queue: transfer_dead_letter`, `list` counts it (from
/// TransferDeadLetterMessageCount) and `inspect` shows each message with the
/// reason Service Bus gave, while the queue's own DLQ stays empty. Once the
/// forward target is back, a filtered redrive sends exactly the matching
/// messages back to the queue, whose ForwardTo moves them on to the target:
/// none lost, none twice, and the others stay where they were. All with the
/// key of the queue's own policy (`EntityPath`), whose tokens, signed for
/// the queue, must cover its transfer dead-letter queue.
#[tokio::test]
async fn transfer_dead_letters_are_listed_inspected_and_redriven_back_through_forwarding() {
    use common::servicebus::{
        TRANSFER_HOST, create_queue, create_queue_described, delete_entity, private_emulator, to_message,
    };
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_TRANSFER";
    let source = common::unique("fwd");
    let entity_rule = format!("{source}:fwd-app=fwd-key");
    let (emu, namespace_cs, client) = private_emulator(
        "servicebus-transfer",
        TRANSFER_HOST,
        &[
            "--auto-create",
            "false",
            "--sas-rule",
            "x=y",
            "--entity-sas-rule",
            &entity_rule,
        ],
    )
    .await;
    let cs = with_sas_rule(&namespace_cs, "fwd-app", "fwd-key") + &format!(";EntityPath={source}");
    let http = emu.url();
    let target = format!("{source}-target");
    create_queue(&http, &target, None).await;
    create_queue_described(&http, &source, &format!("<ForwardTo>{target}</ForwardTo>")).await;
    let f = ServiceBusFixture {
        http: http.clone(),
        entity: source.clone(),
        subscription: None,
        client: tokio::sync::Mutex::new(client),
        connection_env: ENV.into(),
    };
    // The target goes away: what reaches the source cannot be forwarded.
    delete_entity(&http, &target).await;
    let tenants = ["acme", "globex", "acme", "initech", "acme"];
    let msgs: Vec<TestMessage> = tenants
        .iter()
        .enumerate()
        .map(|(i, tenant)| TestMessage {
            body: format!("order-{i}").into_bytes(),
            attributes: attrs(&[("tenant", *tenant)]),
            ordering_key: None,
        })
        .collect();
    f.send(msgs.iter().map(to_message).collect()).await;
    assert_eq!(f.browse(SubQueue::TransferDeadLetter).await.len(), 5);
    assert!(f.browse_dlq().await.is_empty(), "not the ordinary dead-letter queue");

    let transfer = f.config_file_with("      sub_queue: transfer_dead_letter\n");
    let (code, out, said) = run_with_connection_string(ENV, &transfer, &cs, &["list", "-o", "json"]);
    assert_eq!(code, Some(0), "{said}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("list's JSON");
    assert_eq!(rows[0]["depth"], 5, "{out}");
    assert_eq!(rows[0]["exactness"], "exact", "from the ATOM count: {out}");
    assert_eq!(rows[0]["top_reasons"][0][0], "MessagingEntityNotFound", "{out}");
    let (code, out, said) = run_with_connection_string(ENV, &f.config_file_with(""), &cs, &["list", "-o", "json"]);
    assert_eq!(code, Some(0), "{said}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("list's JSON");
    assert_eq!(rows[0]["depth"], 0, "the $DeadLetterQueue is another sub-queue: {out}");

    let (code, out, said) = run_with_connection_string(ENV, &transfer, &cs, &["inspect", "dlq", "-o", "json"]);
    assert_eq!(code, Some(0), "{said}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("inspect's JSON");
    let shown = shown.as_array().expect("a list of messages");
    assert_eq!(shown.len(), 5, "{out}");
    for m in shown {
        assert_eq!(m["reason"], "MessagingEntityNotFound", "{m}");
        assert!(m["description"].as_str().unwrap_or_default().contains(&target), "{m}");
        assert_eq!(m["source"], source.as_str(), "{m}");
    }

    // Forwarding works again once the target is back; acme's orders go
    // through the source to it.
    create_queue(&http, &target, None).await;
    let (code, _, said) = run_with_connection_string(
        ENV,
        &transfer,
        &cs,
        &[
            "redrive",
            "dlq",
            "--filter",
            r#"attributes.tenant == "acme""#,
            "--yes",
            "--no-journal",
        ],
    );
    assert_eq!(code, Some(0), "{said}");
    let arrived = drained_bodies(&http, &target, &namespace_cs, ENV).await;
    assert_eq!(arrived, ["order-0", "order-2", "order-4"], "{said}");
    assert!(f.browse(SubQueue::None).await.is_empty(), "forwarded on, not kept");
    let mut left: Vec<String> = f
        .browse(SubQueue::TransferDeadLetter)
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(m.body().unwrap()).into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["order-1", "order-3"], "the others stay: {said}");

    // Export and purge read and settle there too.
    let exported = std::env::temp_dir().join(format!("dlqb-sb-transfer-{}.jsonl", uuid::Uuid::new_v4().simple()));
    let (code, _, said) = run_with_connection_string(
        ENV,
        &transfer,
        &cs,
        &["export", "dlq", "--to", exported.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{said}");
    let lines = std::fs::read_to_string(&exported).expect("the export");
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(lines.contains("MessagingEntityNotFound"), "{lines}");
    let (code, _, said) = run_with_connection_string(
        ENV,
        &transfer,
        &cs,
        &[
            "purge",
            "dlq",
            "--filter",
            r#"attributes.tenant == "globex""#,
            "--yes",
            "--no-backup",
            "--no-journal",
        ],
    );
    assert_eq!(code, Some(0), "{said}");
    let left = f.browse(SubQueue::TransferDeadLetter).await;
    assert_eq!(left.len(), 1, "{said}");
    assert_eq!(left[0].body().unwrap(), b"order-3");
    std::fs::remove_file(&exported).ok();
}

/// A subscription has its own transfer dead-letter queue
/// (`topic/Subscriptions/sub/$Transfer/$DeadLetterQueue`): what its ForwardTo
/// could not deliver is counted and browsed there, and redriven to the
/// topic, from which the subscription forwards it again; a sibling without
/// ForwardTo gets the topic's messages as usual.
#[tokio::test]
async fn a_subscriptions_transfer_dead_letters_are_counted_and_redriven_through_its_topic() {
    use common::servicebus::{
        ServiceBusTopicFixture, TRANSFER_TOPIC_HOST, create_queue, create_subscription_described, delete_entity,
        private_emulator, to_message,
    };
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_TRANSFER_TOPIC";
    let topic = common::unique("fwd-topic");
    let topology = std::env::temp_dir().join(format!("dlqb-sb-topology-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &topology,
        format!("topics:\n  - name: {topic}\n    subscriptions:\n      - name: plain\n"),
    )
    .unwrap();
    let (emu, cs, client) = private_emulator(
        "servicebus-transfer-topic",
        TRANSFER_TOPIC_HOST,
        &["--auto-create", "false", "--topology", topology.to_str().unwrap()],
    )
    .await;
    let http = emu.url();
    let target = format!("{topic}-target");
    create_queue(&http, &target, None).await;
    create_subscription_described(&http, &topic, "fwd", &format!("<ForwardTo>{target}</ForwardTo>")).await;
    delete_entity(&http, &target).await;
    let f = ServiceBusTopicFixture {
        http: http.clone(),
        entity: topic.clone(),
        subscription: Some("fwd".into()),
        client: tokio::sync::Mutex::new(client),
        connection_env: ENV.into(),
    };
    let msgs: Vec<TestMessage> = (0..2).map(|i| failing(i, "unused")).collect();
    f.send(msgs.iter().map(to_message).collect()).await;

    let transfer = f.config_file_with("      sub_queue: transfer_dead_letter\n");
    let (code, out, said) = run_with_connection_string(ENV, &transfer, &cs, &["list", "-o", "json"]);
    assert_eq!(code, Some(0), "{said}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("list's JSON");
    assert_eq!(rows[0]["depth"], 2, "{out}");
    assert_eq!(rows[0]["top_reasons"][0][0], "MessagingEntityNotFound", "{out}");

    create_queue(&http, &target, None).await;
    let (code, _, said) = run_with_connection_string(ENV, &transfer, &cs, &["redrive", "dlq", "--yes", "--no-journal"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(f.browse(SubQueue::TransferDeadLetter).await.is_empty(), "{said}");
    let arrived = drained_bodies(&http, &target, &cs, ENV).await;
    assert_eq!(arrived, ["m0", "m1"], "{said}");
    // The sibling got the two sends and the two copies, as any redrive to a
    // topic fans out (see `target_subscription_property`).
    let plain = ServiceBusTopicFixture {
        subscription: Some("plain".into()),
        ..f
    };
    assert_eq!(plain.browse(SubQueue::None).await.len(), 4);
    std::fs::remove_file(&topology).ok();
}

/// `servicebus.sub_queue` takes `dead_letter` or `transfer_dead_letter`;
/// anything else (the sub-queue's path, say) is refused before anything is
/// read, naming the file, line and field.
#[test]
fn a_bad_sub_queue_is_refused_with_its_line_and_field() {
    let config = std::env::temp_dir().join(format!("dlqb-sb-subq-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        "queues:\n  - name: dlq\n    servicebus:\n      connection_string_env: UNSET_FOR_THIS_TEST\n      queue: orders\n      sub_queue: transfer\n",
    )
    .unwrap();
    let (code, _, said) = run_with_connection_string("UNUSED_BY_THIS_TEST", &config, "", &["list"]);
    assert_eq!(code, Some(2), "{said}");
    let at = format!("{}:6:", config.display());
    assert!(said.contains(&at), "names the line: {said}");
    assert!(
        said.contains("queues[0].servicebus.sub_queue"),
        "names the field: {said}"
    );
    assert!(said.contains("transfer_dead_letter"), "says what it takes: {said}");
    std::fs::remove_file(&config).ok();
}

/// A copy larger than the destination's link takes (its max-message-size,
/// 256 KiB on the standard tier) fails alone, before it is sent, and says
/// so; the others go. Sent, it made Service Bus detach the link
/// (amqp:link:message-size-exceeded), failing every send in flight on it,
/// three times over, reported as "cannot reach" the namespace.
#[tokio::test]
async fn a_copy_larger_than_the_destination_takes_fails_alone_and_says_so() {
    use common::servicebus::{SMALL_LINK_HOST, create_queue, private_emulator, queue_message_count};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_SMALL_LINK";
    const DEST: &str = "small-dest";
    let (emu, cs, client) = private_emulator(
        "servicebus-small-link",
        SMALL_LINK_HOST,
        &["--max-message-size", &format!("{DEST}=65536")],
    )
    .await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    create_queue(&f.http, DEST, None).await;
    let mut msgs: Vec<TestMessage> = (0..4).map(|i| failing(i, "Timeout")).collect();
    msgs[2].body = vec![b'x'; 100 * 1024];
    f.put_in_dlq(&msgs).await;
    let (code, said) = redrive_to(&f, ENV, &cs, DEST);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("more than the 65536 bytes a message to small-dest may have"),
        "{said}"
    );
    assert!(!said.contains("cannot reach"), "{said}");
    assert_eq!(queue_message_count(&f.http, DEST).await, 3, "{said}");
    let left = f.browse_dlq().await;
    assert_eq!(left.len(), 1, "{said}");
    assert_eq!(left[0].body().unwrap().len(), 100 * 1024, "the large one stays");
}

/// Senders choose MessageIds and may reuse them: two dead-lettered messages
/// under one MessageId are two messages. A pass examines and moves both, and
/// their copies get different MessageIds, so duplicate detection on the
/// source could not drop the second copy and let its original be completed.
#[tokio::test]
async fn messages_that_share_a_message_id_are_each_redriven() {
    let f = ServiceBusFixture::create(false).await;
    let msgs = ["first", "second"]
        .map(|body| {
            let mut m = ServiceBusMessage::new(body.as_bytes().to_vec());
            m.set_message_id("order-42").unwrap();
            m
        })
        .to_vec();
    f.dead_letter_raw(msgs).await;

    let reg = Registry::new(f.config());
    let ids: HashSet<String> = reg
        .backend("dlq")
        .await
        .unwrap()
        .peek(10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids.len(), 2, "two messages, two IDs: {ids:?}");
    drop(reg);

    let s = redrive(f.config(), all()).await;
    assert!(s.ok(), "{s:?}");
    assert_eq!((s.examined, s.settled), (2, 2), "{s:?}");
    assert_eq!(f.dlq_count().await, 0);
    let mut rx = f.source_receiver().await;
    let got = ServiceBusFixture::receive(&mut rx, 10).await;
    let bodies: HashSet<Vec<u8>> = got.iter().map(|c| c.body().unwrap().to_vec()).collect();
    assert_eq!(bodies, HashSet::from([b"first".to_vec(), b"second".to_vec()]));
    let copy_ids: HashSet<Option<String>> = got.iter().map(|c| c.message_id().map(|i| i.to_string())).collect();
    assert_eq!(copy_ids.len(), 2, "{copy_ids:?}");
    for c in &got {
        rx.complete_message(c).await.unwrap();
    }
    rx.dispose().await.ok();
}

/// `--to` names a configured queue (its source gets the copies, as with
/// `import --to`) or an entity, checked before anything is leased: a typo
/// fails the plan instead of the first send, and a queue on another cloud
/// is refused.
#[tokio::test]
async fn to_names_a_configured_queue_or_an_existing_entity() {
    let f = ServiceBusFixture::create(false).await;
    let other = ServiceBusFixture::create(false).await;
    f.dead_letter(&[failing(0, "Boom"), failing(1, "Boom")]).await;
    // Two configured queues, and one on SQS.
    let mut yaml = f.config_yaml_with("");
    let second = other.config_yaml_with("").replace("name: dlq", "name: other");
    let second = second
        .split("queues:\n")
        .nth(1)
        .unwrap()
        .split("redrive:")
        .next()
        .unwrap()
        .to_string();
    yaml = yaml.replace(
        "redrive:",
        &format!("{second}  - name: elsewhere\n    sqs:\n      queue: q\n      region: us-east-1\nredrive:"),
    );
    let cfg = Config::from_yaml(&yaml, "test", &[]).unwrap();
    let reg = Registry::new(cfg.clone());
    let plan = |to: &str| {
        let req = RedriveRequest {
            to: Some(to.into()),
            dry_run: true,
            ..all()
        };
        let reg = &reg;
        async move { reg.plan("dlq", &req, Trigger::Cli).await }
    };
    let typo = plan("no-such-queue").await.unwrap_err();
    assert!(
        matches!(
            &typo,
            RegistryError::Destination {
                error: BackendError::NotFound { .. },
                ..
            }
        ) && typo.is_usage(),
        "{typo}"
    );
    let cross = plan("elsewhere").await.unwrap_err();
    assert!(cross.is_usage() && cross.to_string().contains("on sqs"), "{cross}");
    let to_other = plan("other").await.unwrap();
    assert_eq!(
        to_other.to.map(|d| d.0),
        Some(other.entity.clone()),
        "the other queue's source"
    );
    let entity = plan(&other.entity).await.unwrap();
    assert_eq!(entity.to.map(|d| d.0), Some(other.entity.clone()));

    let s = redrive(
        cfg,
        RedriveRequest {
            to: Some("other".into()),
            ..all()
        },
    )
    .await;
    assert!(s.ok() && s.settled == 2, "{s:?}");
    assert_eq!(
        other.drain_source().await.len(),
        2,
        "the copies went to the other queue"
    );
    assert!(f.drain_source().await.is_empty());
}

/// A subscription DLQ redrives to the topic, which fans out to every
/// subscription; with `target_subscription_property` each copy names the
/// failing subscription, for the documented SQL filter rule.
#[tokio::test]
async fn subscription_dlq_redrives_to_the_topic_and_can_name_the_subscription() {
    let f = ServiceBusTopicFixture::with_subscriptions(&["billing", "audit"]).await;
    let msgs: Vec<TestMessage> = (0..3).map(|i| failing(i, "Timeout")).collect();
    f.dead_letter(&msgs).await;
    // Dead-lettering on `billing` consumed the originals there; `audit` still
    // holds its own copies of the originals: drain them.
    let mut audit = f.receiver_on(Some("audit"), SubQueue::None).await;
    for m in ServiceBusTopicFixture::receive(&mut audit, 10).await {
        audit.complete_message(&m).await.unwrap();
    }

    let reg = Registry::new(f.config());
    let b = reg.backend("dlq").await.unwrap();
    let peeked = b.peek(10).await.unwrap();
    assert_eq!(peeked.len(), 3);
    for m in &peeked {
        assert_eq!(m.source.as_deref(), Some(f.entity.as_str()), "the source is the topic");
        assert_eq!(m.properties["source_subscription"], "billing");
    }
    drop(b);
    drop(reg);

    // Default: back to the topic, so both subscriptions get the copies.
    let s = redrive(f.config(), all()).await;
    assert_eq!(s.settled, 3, "{s:?}");
    let billing_got = f.drain_source().await;
    assert_eq!(billing_got.len(), 3);
    let audit_got = ServiceBusTopicFixture::receive(&mut audit, 10).await;
    assert_eq!(audit_got.len(), 3, "the topic fans out to every subscription");
    for m in &audit_got {
        assert!(!attributes_of(m.application_properties()).contains_key("dlq_bridge_target"));
        audit.complete_message(m).await.unwrap();
    }

    // Opt-in: the copy names the failing subscription. A fresh failure, so
    // this run does not depend on a message an earlier run released.
    f.dead_letter(&[failing(9, "Timeout")]).await;
    for m in ServiceBusTopicFixture::receive(&mut audit, 10).await {
        audit.complete_message(&m).await.unwrap();
    }
    let s = redrive(
        f.config_with("      target_subscription_property: dlq_bridge_target\n"),
        all(),
    )
    .await;
    assert_eq!(s.settled, 1, "{s:?}");
    let billing_got = f.drain_source().await;
    assert_eq!(billing_got.len(), 1);
    assert_eq!(
        billing_got[0].attributes["dlq_bridge_target"].value,
        AttrValue::String("billing".into())
    );
    // The emulator applies no rules; on Azure, `[dlq_bridge_target] IS NULL OR
    // [dlq_bridge_target] = 'audit'` on `audit` would keep this copy out.
    let audit_got = ServiceBusTopicFixture::receive(&mut audit, 10).await;
    assert_eq!(audit_got.len(), 1);
    for m in &audit_got {
        audit.complete_message(m).await.unwrap();
    }
    audit.dispose().await.ok();
    assert_eq!(f.dlq_count().await, 0);
}

/// The ATOM counts are exact on the emulator, for queues and subscriptions,
/// and the oldest age comes from the first peeked message.
#[tokio::test]
async fn atom_counts_are_exact() {
    let q = ServiceBusFixture::create(false).await;
    let t = ServiceBusTopicFixture::create(false).await;
    let reg = Registry::new(q.config());
    let b = reg.backend("dlq").await.unwrap();
    let empty = b.stats().await.unwrap();
    assert_eq!((empty.depth, empty.oldest_age), (0, None), "{empty:?}");

    q.dead_letter(&(0..5).map(|i| failing(i, "Timeout")).collect::<Vec<_>>())
        .await;
    t.dead_letter(&(0..3).map(|i| failing(i, "Timeout")).collect::<Vec<_>>())
        .await;
    for (config, want) in [(q.config(), 5), (t.config(), 3)] {
        let reg = Registry::new(config);
        let b = reg.backend("dlq").await.unwrap();
        let s = b.stats().await.unwrap();
        assert_eq!(s.depth, want, "{s:?}");
        assert_eq!(s.exactness, Exactness::Exact);
        assert!(s.oldest_age.is_some(), "{s:?}");
    }
    let s = redrive(q.config(), RedriveRequest { max: Some(2), ..all() }).await;
    assert_eq!(s.settled, 2);
    let reg = Registry::new(q.config());
    assert_eq!(reg.backend("dlq").await.unwrap().stats().await.unwrap().depth, 3);
}

/// The bodies that reached queue `entity`, received off it (as text, sorted);
/// `env` names the variable that holds `cs` for the runs.
async fn drained_bodies(http: &str, entity: &str, cs: &str, env: &str) -> Vec<String> {
    let t = ServiceBusFixture {
        http: http.to_string(),
        entity: entity.to_string(),
        subscription: None,
        client: tokio::sync::Mutex::new(common::servicebus::client_with(cs).await),
        connection_env: env.into(),
    };
    let mut bodies: Vec<String> = t
        .drain_source()
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    bodies.sort();
    bodies
}

/// `cs` (a private emulator's connection string, signed with the rule `x`)
/// signed with the SAS rule `rule` and its `key` instead.
fn with_sas_rule(cs: &str, rule: &str, key: &str) -> String {
    cs.replace("SharedAccessKeyName=x", &format!("SharedAccessKeyName={rule}"))
        .replace("SharedAccessKey=y", &format!("SharedAccessKey={key}"))
}

/// Runs dlq-bridge with the config `config` and the connection string `cs`
/// in the environment variable `env`: its exit code, its stdout, and stdout
/// and stderr together.
fn run_with_connection_string(
    env: &str,
    config: &std::path::Path,
    cs: &str,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .env_remove("DLQ_BRIDGE_CONFIG")
        .env(env, cs)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let said = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code(), stdout, said)
}

fn config_for(entity_yaml: &str, cs_env: &str, http: &str) -> Config {
    let yaml = format!(
        "queues:\n  - name: dlq\n    servicebus:\n      connection_string_env: {cs_env}\n{entity_yaml}      management_endpoint: {http}\n"
    );
    Config::from_yaml(&yaml, "test", &[]).unwrap()
}

/// A missing entity is NotFound when the backend connects: from the ATOM
/// call (Azure's 200 with an empty feed).
#[tokio::test]
async fn missing_entity_is_not_found() {
    let http = emulator();
    let reg = Registry::new(config_for(
        &format!("      queue: {}\n", common::unique("never-created")),
        CONNECTION_STRING_ENV,
        &http,
    ));
    let err = not_found_on_connect(reg.backend("dlq").await);
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");

    // A "subscription" of a queue does not exist.
    let q = ServiceBusFixture::create(false).await;
    let reg = Registry::new(config_for(
        &format!("      topic: {}\n      subscription: nope\n", q.entity),
        CONNECTION_STRING_ENV,
        &http,
    ));
    let err = not_found_on_connect(reg.backend("dlq").await);
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
}

/// A redrive of a missing entity fails when it is planned and leaves no
/// entity behind: what a pass starts opening while it connects (the DLQ
/// link's connection) must not attach to the entity before the check says
/// it exists, or the emulator would create it.
#[tokio::test]
async fn a_redrive_of_a_missing_entity_creates_nothing() {
    let http = emulator();
    let entity = format!("      queue: {}\n", common::unique("never-created"));
    let reg = Registry::new(config_for(&entity, CONNECTION_STRING_ENV, &http));
    let planned = reg.plan("dlq", &RedriveRequest::default(), Trigger::Cli).await;
    let err = not_found_on_connect(planned);
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    // Time for anything left opening in the background to attach, if it would.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reg = Registry::new(config_for(&entity, CONNECTION_STRING_ENV, &http));
    let err = not_found_on_connect(reg.backend("dlq").await);
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
}

/// The backend checks that its entity exists when it connects (before any
/// link attaches, since the emulator creates entities on attach).
fn not_found_on_connect<T>(r: Result<T, RegistryError>) -> BackendError {
    match r {
        Err(RegistryError::Backend { error, .. }) => error,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("connected to an entity that does not exist"),
    }
}

/// A namespace nobody listens on fails fast as Unreachable, never hangs.
#[tokio::test]
async fn unreachable_namespace_fails_fast() {
    emulator();
    let reg = Registry::new(config_for(
        "      queue: q\n",
        UNREACHABLE_CONNECTION_STRING_ENV,
        "http://127.0.0.2:9",
    ));
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), reg.backend("dlq"))
        .await
        .expect("connecting to a dead namespace must not hang");
    let err = match result {
        Err(RegistryError::Backend { error, .. }) => error,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err}");
    eprintln!("unreachable reported after {:?}", started.elapsed());
}

/// Several leases in flight at once (the pipelined engine's use) take
/// disjoint messages; settles and releases run alongside; a lease whose
/// caller gave up leaves nothing locked; and a new pass sees every message
/// released before it.
#[tokio::test]
async fn concurrent_leases_are_disjoint_and_leave_nothing_locked() {
    let f = ServiceBusFixture::create(false).await;
    f.dead_letter(&(0..30).map(|i| failing(i, "Timeout")).collect::<Vec<_>>())
        .await;
    let reg = Registry::new(f.config());
    let b = reg.backend("dlq").await.unwrap();
    let hold = Duration::from_secs(60);
    let (x, y, z) = tokio::join!(b.lease(10, hold), b.lease(10, hold), b.lease(10, hold));
    let (x, y, z) = (x.unwrap(), y.unwrap(), z.unwrap());
    let ids: HashSet<String> = [&x, &y, &z]
        .iter()
        .flat_map(|l| l.iter().map(|m| m.message.id.clone()))
        .collect();
    assert_eq!(ids.len(), 30, "three concurrent leases took every message once");
    assert_eq!(x.len() + y.len() + z.len(), 30);

    // Settle one batch while another is released and a fourth lease runs:
    // the pass has seen everything, so that lease is empty.
    let lease_ids = |l: &[dlq_bridge::model::Leased]| l.iter().map(|m| m.lease.clone()).collect::<Vec<_>>();
    let (xs, ys) = (lease_ids(&x), lease_ids(&y));
    let (settled, released, more) = tokio::join!(b.settle(&xs), b.release(&ys), b.lease(10, hold));
    assert!(
        settled
            .unwrap()
            .iter()
            .all(|r| matches!(r, dlq_bridge::model::SettleResult::Settled))
    );
    released.unwrap();
    assert!(more.unwrap().is_empty(), "nothing past the last leased message");
    b.release(&lease_ids(&z)).await.unwrap();

    // A lease given up by its caller (timed out at once) abandons what it
    // got: nothing stays locked. (This pass may skip those messages; the
    // next one sees them.)
    let _ = tokio::time::timeout(Duration::ZERO, b.lease(10, hold)).await;
    let rest = b.lease(100, hold).await.unwrap();
    b.release(&lease_ids(&rest)).await.unwrap();
    let mut again = Vec::new();
    for _ in 0..3 {
        let got = b.lease(100, hold).await.unwrap();
        if got.is_empty() {
            break;
        }
        again.extend(got);
    }
    let left: HashSet<String> = again.iter().map(|m| m.message.id.clone()).collect();
    assert_eq!(left.len(), 20, "every released message is leasable again: {left:?}");
    b.release(&lease_ids(&again)).await.unwrap();
    assert_eq!(f.browse_dlq().await.len(), 20);
}

/// Azure may answer a peek with fewer messages than it was asked for while
/// more wait. The link's read-ahead then hands the leases what the browse
/// showed instead of waiting for full shares, and browses on from past it:
/// the pass must still see every message once. Against an emulator whose
/// peeks answer at most 70 messages (the link asks for 1,000).
#[tokio::test]
async fn a_pass_sees_every_message_when_peeks_answer_short() {
    use common::servicebus::{SHORT_PEEKS_CONNECTION_STRING_ENV, SHORT_PEEKS_HOST, private_emulator};
    let (emu, _, client) = private_emulator("servicebus-short-peeks", SHORT_PEEKS_HOST, &["--max-peek", "70"]).await;
    let f = ServiceBusFixture::on(emu.url(), client, SHORT_PEEKS_CONNECTION_STRING_ENV, &["s"]).await;
    let msgs: Vec<TestMessage> = (0..600)
        .map(|i| failing(i, if i % 2 == 0 { "Timeout" } else { "Invalid" }))
        .collect();
    f.put_in_dlq(&msgs).await;
    let s = redrive(f.config(), by_reason("Timeout")).await;
    assert_eq!((s.examined, s.matched, s.settled), (600, 300, 300), "{s:?}");
    assert!(s.ok(), "{s:?}");
    assert_eq!(f.drain_source().await.len(), 300);
    assert_eq!(f.dlq_count().await, 300);
}

/// A dead-letter queue keeps the original sequence numbers, so a redrive of
/// a middle stretch leaves a gap that later passes browse across: each browse
/// starts past the last message browsed or received. Each pass then sees
/// every message once, and nothing it released stays locked (credit granted
/// for messages that are not there would take them back).
#[tokio::test]
async fn passes_across_a_gap_in_sequence_numbers_see_every_message_once() {
    let f = ServiceBusFixture::create(false).await;
    let reason = |i: usize| match i {
        1100..1600 => "Gap",
        _ if i.is_multiple_of(2) => "Timeout",
        _ => "Invalid",
    };
    let msgs: Vec<TestMessage> = (0..2500).map(|i| failing(i, reason(i))).collect();
    f.put_in_dlq(&msgs).await;
    let s = redrive(f.config(), by_reason("Gap")).await;
    assert_eq!((s.examined, s.matched, s.settled), (2500, 500, 500), "{s:?}");
    // 128 browsed from the start, then 1,000 from past them, across the gap.
    let s = redrive(f.config(), by_reason("Timeout")).await;
    assert_eq!((s.examined, s.matched, s.settled), (2000, 1000, 1000), "{s:?}");
    let s = redrive(f.config(), by_reason("Invalid")).await;
    assert_eq!((s.examined, s.matched, s.settled), (1000, 1000, 1000), "{s:?}");
    assert!(s.ok(), "{s:?}");
    assert_eq!(f.drain_source().await.len(), 2500);
    assert_eq!(f.dlq_count().await, 0);
}

/// A browse's answer carries whole messages, so the link sizes each browse
/// to about 8 MiB of them at the size of the last ones browsed (the first
/// assumes 64 KiB): with 96 KiB bodies a lease takes several browses' worth,
/// and the pass must still see every message once.
#[tokio::test]
async fn browses_sized_by_bytes_let_a_pass_of_large_messages_see_each_once() {
    let f = ServiceBusFixture::create(false).await;
    let msgs: Vec<TestMessage> = (0..300)
        .map(|i| {
            let mut m = failing(i, if i.is_multiple_of(3) { "Timeout" } else { "Invalid" });
            m.body = vec![b'x'; 96 << 10];
            m
        })
        .collect();
    f.put_in_dlq(&msgs).await;
    let s = redrive(f.config(), by_reason("Timeout")).await;
    assert_eq!((s.examined, s.matched, s.settled), (300, 100, 100), "{s:?}");
    assert!(s.ok(), "{s:?}");
    let moved = f.drain_source().await;
    assert_eq!(moved.len(), 100);
    assert!(moved.iter().all(|m| m.body.len() == 96 << 10));
    assert_eq!(f.dlq_count().await, 200);
}

/// A pass that outlives its `$cbs` tokens renews them, against an emulator
/// that detaches a link once its tokens expire, as Azure does: a 30-message
/// redrive at 4 msg/s (about 7 s) with 4 s tokens (renewed at 5/6 of what
/// is left of them) moves everything and no link is detached. The same run with a pre-signed signature that expires
/// 3 s in (it cannot be renewed) shows that the emulator does detach: the run
/// fails and says the token expired, and loses nothing.
#[tokio::test]
async fn a_pass_longer_than_its_tokens_renews_them() {
    use common::servicebus::{TOKEN_EXPIRY_HOST, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_TOKEN_EXPIRY";
    let (emu, key_cs, client) = private_emulator(
        "servicebus-token-expiry",
        TOKEN_EXPIRY_HOST,
        &["--enforce-token-expiry"],
    )
    .await;
    let log = emu.log_path();
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let redrive_with = |cs: &str| {
        let path = f.config_file_with("      sas_token_ttl: 4s\n");
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
            .env_remove("DLQ_BRIDGE_CONFIG")
            .env(ENV, cs)
            .args([
                "--config",
                path.to_str().unwrap(),
                "redrive",
                "dlq",
                "--rate",
                "4",
                "--yes",
                "--no-journal",
            ])
            .output()
            .expect("run dlq-bridge redrive");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            started.elapsed() > Duration::from_secs(5),
            "the pass did not outlive its tokens: {said}"
        );
        (out.status.code(), said)
    };

    let msgs: Vec<TestMessage> = (0..30).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    let (code, said) = redrive_with(&key_cs);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("settled:   30"), "{said}");
    assert_eq!(f.drain_source().await.len(), 30);
    assert_eq!(f.dlq_count().await, 0);
    let detached = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !detached.contains("token expired"),
        "a link outlived its token: {detached}"
    );

    // The control: a signature that expires 3 s in, which nothing can renew.
    f.put_in_dlq(&msgs).await;
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3;
    let signed = dlq_bridge::backend::servicebus::sas_token(&format!("sb://{TOKEN_EXPIRY_HOST}/"), "x", "y", expiry);
    let sig_cs =
        format!("Endpoint=sb://{TOKEN_EXPIRY_HOST};SharedAccessSignature={signed};UseDevelopmentEmulator=true");
    let (code, said) = redrive_with(&sig_cs);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("authentication failed"), "{said}");
    assert!(
        said.to_lowercase().contains("expired"),
        "the error does not say the token expired: {said}"
    );
    let detached = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        detached.contains("token expired"),
        "the emulator detached nothing: {detached}"
    );
    // Nothing lost: every message is in the DLQ (unsettled originals, perhaps
    // still locked) or was copied to the source.
    let moved: HashSet<Vec<u8>> = f.drain_source().await.into_iter().map(|r| r.body).collect();
    let left: HashSet<Vec<u8>> = f
        .browse_dlq()
        .await
        .iter()
        .map(|m| m.body().expect("a data body").to_vec())
        .collect();
    for m in &msgs {
        assert!(
            moved.contains(&m.body) || left.contains(&m.body),
            "message {:?} was lost",
            String::from_utf8_lossy(&m.body)
        );
    }
}

/// Entities deleted in the middle of a pass, against an emulator that, as
/// Azure, detaches the links to a deleted entity (`amqp:not-found`) and
/// creates none that a link names.
///
/// 1. The destination: the copies it had accepted go with it (the operator
///    deleted them), and nothing else is lost. Every other message is still
///    in the dead-letter queue, and no more left it than the destination
///    held copies when it was deleted (the emulator logs that count). The
///    send after the delete fails at once on the detached link, and the run
///    names the destination and exits 1.
/// 2. The dead-letter queue's own queue: the link fails as not found, and
///    the run stops and says so instead of reconnecting into the same
///    refusal; the destination holds at least a copy of every message the
///    run settled.
#[tokio::test]
async fn entities_deleted_mid_pass_lose_nothing_else() {
    use common::servicebus::{DELETES_HOST, create_queue, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_DELETES";
    let (emu, cs, client) = private_emulator("servicebus-deletes", DELETES_HOST, &["--auto-create", "false"]).await;
    let log = emu.log_path();
    let f = ServiceBusFixture::created_on(emu.url(), client, ENV).await;
    let dest = format!("{}-dest", f.entity);
    create_queue(&f.http, &dest, None).await;
    let config = f.config_file_with("");
    let http = reqwest::Client::new();
    // Sends of 100 at 100 msg/s: the first goes at once, the second a second
    // later; the delete lands before the third.
    let redrive_deleting = |doomed: String| {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
            .env_remove("DLQ_BRIDGE_CONFIG")
            .env(ENV, &cs)
            .args(["--config", config.to_str().unwrap(), "redrive", "dlq", "--to", &dest])
            .args(["--rate", "100", "--yes", "--no-journal"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start dlq-bridge redrive");
        let url = format!("{}/{doomed}?api-version=2021-05", f.http);
        let http = http.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let deleted = http
                .delete(url)
                .send()
                .await
                .expect("the emulator's ATOM endpoint answers");
            assert_eq!(deleted.status(), 200);
            let out = tokio::task::spawn_blocking(move || child.wait_with_output())
                .await
                .unwrap()
                .expect("dlq-bridge ran");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.status.code(), Some(1), "{said}");
            // Named as itself, not as the start of the destination's name.
            let named = |l: &str| l.contains(&format!("{doomed}:")) || l.contains(&format!("({doomed})"));
            assert!(
                said.lines().any(|l| named(l) && l.contains("not found")),
                "no error says that {doomed} is not found: {said}"
            );
            said
        }
    };
    let settled = |said: &str| -> usize {
        said.lines()
            .find_map(|l| l.trim().strip_prefix("settled:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no settled count in {said}"))
    };

    // 1. The destination.
    let msgs: Vec<TestMessage> = (0..300).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    let said = redrive_deleting(dest.clone()).await;
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let held: usize = logged
        .lines()
        .find(|l| l.contains("deleted with its messages") && l.contains(&dest))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("active=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let left: Vec<Vec<u8>> = f
        .browse_dlq()
        .await
        .iter()
        .map(|m| m.body().expect("a data body").to_vec())
        .collect();
    let gone = msgs.len() - left.len();
    assert!(
        gone > 0 && !left.is_empty(),
        "the delete did not land mid-pass ({gone} moved): {said}"
    );
    assert!(
        gone <= held,
        "{gone} messages left the DLQ, but the destination held only {held} copies: {said}"
    );
    assert_eq!(settled(&said), gone, "{said}");
    let sent: HashSet<&[u8]> = msgs.iter().map(|m| m.body.as_slice()).collect();
    let distinct: HashSet<&[u8]> = left.iter().map(Vec::as_slice).collect();
    assert_eq!(distinct.len(), left.len(), "a message is in the DLQ twice");
    assert!(
        distinct.is_subset(&sent),
        "the DLQ holds a message that was never put there"
    );

    // 2. The dead-letter queue's own queue, with the destination back.
    create_queue(&f.http, &dest, None).await;
    let more: Vec<TestMessage> = (300..500).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&more).await;
    let said = redrive_deleting(f.entity.clone()).await;
    let copies = common::servicebus::queue_message_count(&f.http, &dest).await;
    let settled = settled(&said);
    assert!(settled > 0, "the delete did not land mid-pass: {said}");
    assert!(
        copies >= settled,
        "{settled} settled, but only {copies} copies arrived: {said}"
    );
}

/// A sidecar whose links sit idle between calls, against an emulator that
/// force-detaches every link idle for 2 s (`amqp:link:detach-forced`), as
/// Azure does after 10 minutes, then closes each connection left without
/// links for 1 s (`amqp:connection:forced`), as Azure does after about a
/// minute: the dead-letter queue's receiver and its `$management` links, the
/// copies' senders, the browsing receiver and their connections. Each later
/// browse and redrive works on new links, moves everything once, and does
/// not first wait out a call's timeout (20 s) on a link that is gone.
#[tokio::test]
async fn a_sidecar_outlives_links_detached_for_idleness() {
    use common::serve::Serve;
    use common::servicebus::{IDLE_LINKS_HOST, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_IDLE_LINKS";
    /// Long enough for the links to be detached (2 s idle), then their
    /// connections closed (1 s without links).
    const QUIET: Duration = Duration::from_secs(4);
    /// Well under the backend's call timeout: a browse or a pass that waited
    /// on a detached link would take at least that.
    const NO_STALL: Duration = Duration::from_secs(12);
    let (emu, cs, client) = private_emulator(
        "servicebus-idle-links",
        IDLE_LINKS_HOST,
        &["--link-idle-timeout", "2s", "--connection-idle-timeout", "1s"],
    )
    .await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let config = format!(
        "{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1h\n  reason_sample: 0\n",
        f.config_yaml_with("      link_idle_timeout: 2s\n")
    );
    let serve = Serve::start_with_env(&config, &[(ENV, cs.as_str())]).await;
    let browse = || async {
        let started = Instant::now();
        let (code, body) = serve.get("/v1/queues/dlq/messages?limit=500").await;
        assert_eq!(code, 200, "{body}");
        assert!(
            started.elapsed() < NO_STALL,
            "the browse waited {:?}",
            started.elapsed()
        );
        let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
        body["messages"].as_array().expect("messages").len()
    };
    let redrive = || async {
        let started = Instant::now();
        let run = serve.redrive("dlq", serde_json::json!({ "filter": "true" })).await;
        assert_eq!(run["status"], "finished", "{run}");
        assert!(
            started.elapsed() < NO_STALL,
            "the pass waited {:?}: {run}",
            started.elapsed()
        );
        run["summary"]["settled"].as_u64().expect("a settled count")
    };

    // The emulator closes the fixture's own connection too while the test
    // idles, and azservicebus does not reconnect: a new one for each use.
    let reconnect = || async { *f.client.lock().await = common::servicebus::client_with(&cs).await };
    let mut moved = 0;
    for round in 0..3 {
        let msgs: Vec<TestMessage> = (0..20).map(|i| failing(100 * round + i, "Timeout")).collect();
        reconnect().await;
        f.put_in_dlq(&msgs).await;
        assert_eq!(browse().await, 20, "round {round}: browse");
        tokio::time::sleep(QUIET).await;
        assert_eq!(browse().await, 20, "round {round}: browse after the links went idle");
        tokio::time::sleep(QUIET).await;
        assert_eq!(redrive().await, 20, "round {round}: redrive after the links went idle");
        moved += 20;
        reconnect().await;
        assert_eq!(f.dlq_count().await, 0, "round {round}");
    }
    reconnect().await;
    let copies = f.drain_source().await.len();
    assert_eq!(copies, moved, "every message was moved once");
    let log = std::fs::read_to_string(emu.log_path()).unwrap_or_default();
    assert!(
        log.contains("IdleTimerExpired"),
        "the emulator detached no idle link: {log}"
    );
    assert!(
        log.contains("did not have any active links"),
        "the emulator closed no connection: {log}"
    );
}

/// A federated service-account token, as the AKS webhook mounts it: a JWT
/// for Entra ID's token exchange, signed by the cluster (the emulator reads
/// its claims, not its signature), expiring `valid_for` from now.
fn service_account_token(subject: &str, valid_for: Duration) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let exp = (std::time::SystemTime::now() + valid_for)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://oidc.prod-aks.azure.com/tenant-1/",
        "sub": subject,
        "aud": ["api://AzureADTokenExchange"],
        "exp": exp,
    });
    format!(
        "{}.{}.c2lnbmVkIGJ5IHRoZSBjbHVzdGVy",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// Entra ID through Azure Workload Identity, over TLS, as a sidecar on AKS
/// meets Service Bus: no connection string, only `namespace`, the federated
/// token file and the IDs the webhook sets. The private emulator speaks AMQP
/// over TLS on 5671 (its self-signed certificate trusted through
/// `SSL_CERT_FILE`), serves the token endpoint and the ATOM endpoint on
/// HTTPS, and checks every `jwt` token put on `$cbs` and every bearer token
/// (issued by it, unaltered, unexpired); its access tokens last 4 s, and it
/// detaches a link whose tokens have all expired.
///
/// 1. `inspect` browses over TLS (azservicebus with the credential) and
///    `list` counts through the ATOM endpoint with a bearer token; both also
///    with a SAS connection string in Azure's form (TLS too).
/// 2. A redrive that lasts about 8 s, two tokens' lifetimes, moves all 30
///    messages with no link detached: its link renewed its token. The
///    service-account token it started with expires 3 s in and is rotated
///    in the file after 1 s, as the kubelet does: renewals read the file
///    again (the old assertion would be refused, AADSTS700024).
/// 3. `serve` browses twice, 6 s apart: the SDK's connection renews its
///    tokens too, or the second browse fails.
/// 4. A service account the federated credential does not name: `list`
///    fails with Entra's AADSTS70021, names the queue and says
///    authentication failed, exit 1.
/// 5. Without `SSL_CERT_FILE`, the emulator's certificate is refused, over
///    AMQP and over HTTPS: exit 1, an error that says the certificate is not
///    trusted and what to set (not "is the service running?"), and nothing
///    leaves the DLQ.
#[tokio::test]
async fn entra_workload_identity_over_tls_renews_its_tokens() {
    use common::serve::Serve;
    use common::servicebus::{ENTRA_HOST, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_ENTRA_SEED";
    const SUBJECT: &str = "system:serviceaccount:apps:orders";
    let dir = std::env::temp_dir().join(format!("dlqb-entra-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("emulator.pem");
    let https_port = common::emulator::free_port().to_string();
    let (emu, _seed_cs, client) = private_emulator(
        "servicebus-entra",
        ENTRA_HOST,
        &[
            "--amqps-port",
            "5671",
            "--https-port",
            &https_port,
            "--cert-out",
            cert.to_str().unwrap(),
            "--enforce-token-expiry",
            "--entra-tenant-id",
            "tenant-1",
            "--entra-client-id",
            "client-1",
            "--entra-subject",
            SUBJECT,
            "--entra-token-ttl",
            "4s",
        ],
    )
    .await;
    let log = emu.log_path();
    // Seeded over plain AMQP with a SAS connection string, which the
    // emulator takes unchecked.
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let https = format!("https://127.0.0.1:{https_port}");
    let config = format!(
        "queues:\n  - name: dlq\n    servicebus:\n      namespace: {ENTRA_HOST}\n      queue: {}\n      management_endpoint: {https}\nredrive:\n  hold: 2m\n",
        f.entity
    );
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, &config).unwrap();
    let token_file = dir.join("azure-identity-token");
    let write_token = |subject: &str, valid_for: Duration| {
        // Written aside and renamed in, as the kubelet swaps a projected file.
        let part = dir.join("azure-identity-token.part");
        std::fs::write(&part, service_account_token(subject, valid_for)).unwrap();
        std::fs::rename(&part, &token_file).unwrap();
    };
    let identity = [
        ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().unwrap().to_string()),
        ("AZURE_CLIENT_ID", "client-1".to_string()),
        ("AZURE_TENANT_ID", "tenant-1".to_string()),
        ("AZURE_AUTHORITY_HOST", format!("{https}/")),
        ("SSL_CERT_FILE", cert.to_str().unwrap().to_string()),
    ];
    // The same queue through a SAS connection string in Azure's form (no
    // `UseDevelopmentEmulator`), which is also AMQP over TLS.
    let sas_config_path = dir.join("sas-config.yaml");
    std::fs::write(
        &sas_config_path,
        config.replace(
            &format!("namespace: {ENTRA_HOST}"),
            "connection_string_env: DLQ_BRIDGE_TEST_SERVICEBUS_TLS",
        ),
    )
    .unwrap();
    let cli_with = |config: &std::path::Path, args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dlq-bridge"));
        c.env_remove("DLQ_BRIDGE_CONFIG")
            .envs(identity.iter().map(|(k, v)| (*k, v.as_str())))
            .env(
                "DLQ_BRIDGE_TEST_SERVICEBUS_TLS",
                format!("Endpoint=sb://{ENTRA_HOST}/;SharedAccessKeyName=x;SharedAccessKey=y"),
            )
            .arg("--config")
            .arg(config)
            .args(args);
        c
    };
    let cli = |args: &[&str]| cli_with(&config_path, args);
    let said = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let detaches = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("token expired")
            .count()
    };

    // 1. Browse and count, with Entra ID and with SAS.
    write_token(SUBJECT, Duration::from_secs(3600));
    let msgs: Vec<TestMessage> = (0..30).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    for config in [&config_path, &sas_config_path] {
        let out = cli_with(config, &["inspect", "dlq", "-o", "json", "--limit", "100"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", said(&out));
        let shown: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("inspect -o json");
        assert_eq!(shown.len(), 30, "{}", config.display());
        let out = cli_with(config, &["list", "-o", "json"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", said(&out));
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list -o json");
        assert_eq!(listed[0]["depth"], 30, "{}: {listed}", config.display());
    }

    // 2. A pass of two tokens' lifetimes, its assertion rotated under it.
    write_token(SUBJECT, Duration::from_secs(3));
    let started = Instant::now();
    let child = cli(&["redrive", "dlq", "--rate", "4", "--yes", "--no-journal"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    write_token(SUBJECT, Duration::from_secs(3600));
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() > Duration::from_secs(6),
        "the pass did not outlive its tokens"
    );
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    assert!(said(&out).contains("settled:   30"), "{}", said(&out));
    assert_eq!(f.drain_source().await.len(), 30);
    assert_eq!(f.dlq_count().await, 0);
    assert_eq!(detaches(), 0, "a link outlived its token");

    // 3. The sidecar's browsing connection outlives its first token.
    f.put_in_dlq(&msgs[..10]).await;
    let serve_config = format!("{config}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1h\n  reason_sample: 0\n");
    let env: Vec<(&str, &str)> = identity.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let serve = Serve::start_with_env(&serve_config, &env).await;
    for round in 0..2 {
        if round > 0 {
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        let (code, body) = serve.get("/v1/queues/dlq/messages?limit=100").await;
        assert_eq!(code, 200, "browse {round}: {body}");
        let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            listed["messages"].as_array().map(Vec::len),
            Some(10),
            "browse {round}: {listed}"
        );
    }
    drop(serve);
    assert_eq!(detaches(), 0, "the sidecar's browsing link outlived its token");

    // 4. A service account the federated credential does not name.
    write_token("system:serviceaccount:apps:billing", Duration::from_secs(3600));
    let out = cli(&["list"]).output().unwrap();
    let text = said(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("AADSTS70021"), "{text}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(text.contains("dlq"), "{text}");

    // 5. Without the emulator's certificate trusted: a refused certificate,
    // told apart from an endpoint that is down, over AMQP (OpenSSL) and
    // HTTPS (rustls), and nothing leaves the DLQ.
    write_token(SUBJECT, Duration::from_secs(3600));
    for (config, args) in [
        (&sas_config_path, &["inspect", "dlq"][..]),
        (&config_path, &["list"][..]),
        (&config_path, &["redrive", "dlq", "--yes", "--no-journal"][..]),
    ] {
        let out = cli_with(config, args).env_remove("SSL_CERT_FILE").output().unwrap();
        let text = said(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
        assert!(
            text.contains("failed: its certificate is not trusted (") && text.contains("SSL_CERT_FILE"),
            "{args:?}: {text}"
        );
        assert!(!text.contains("is the service or emulator running"), "{args:?}: {text}");
        assert!(!text.contains("ERROR"), "a library logged the refusal itself: {text}");
    }
    assert_eq!(f.dlq_count().await, 10);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Shared access signatures checked as Azure checks them, against a
/// namespace with three authorization rules: `x` (every right; the
/// fixture's), `app` (Listen and Send, no Manage: what a team is usually
/// given) and `reader` (Listen only).
///
/// 1. A wrong key: `list` and `redrive` fail, exit 1, saying authentication
///    failed and why (the broker's InvalidSignature), and nothing moves.
/// 2. `app`: browsing and redriving work; the counts, which need Manage, are
///    refused, and `list` counts by browsing instead (exact, or a floor past
///    `browse_count_limit`) and says so.
/// 3. `reader`: the redrive reads the DLQ but the copies are refused (the
///    Send claim): exit 1, the error names the claim, nothing is lost.
#[tokio::test]
async fn sas_rules_and_their_rights_are_enforced() {
    use common::servicebus::{SAS_RULES_HOST, emulator_connection_string, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_SAS_RULES";
    let (emu, _cs, client) = private_emulator(
        "servicebus-sas-rules",
        SAS_RULES_HOST,
        &[
            "--sas-rule",
            "x=y",
            "--sas-rule",
            "app=app-key:Listen,Send",
            "--sas-rule",
            "reader=reader-key:Listen",
        ],
    )
    .await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let config = f.config_file_with("");
    let with_rule = |rule: &str, key: &str| with_sas_rule(&emulator_connection_string(SAS_RULES_HOST), rule, key);
    let floored = f.config_file_with("      browse_count_limit: 10\n");
    let run_with =
        |config: &std::path::Path, cs: &str, args: &[&str]| run_with_connection_string(ENV, config, cs, args);
    let run = |cs: &str, args: &[&str]| run_with(&config, cs, args);
    let msgs: Vec<TestMessage> = (0..20).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;

    // 1. A wrong key.
    let wrong = with_rule("x", "not-the-key");
    for args in [&["list"][..], &["redrive", "dlq", "--yes", "--no-journal"][..]] {
        let (code, _, said) = run(&wrong, args);
        assert_eq!(code, Some(1), "{args:?}: {said}");
        assert!(
            said.contains("Service Bus authentication failed")
                && said.contains("InvalidSignature: The token has an invalid signature."),
            "{args:?}: {said}"
        );
        assert!(
            !said.contains("StatusCode("),
            "a debug dump instead of the broker's words: {said}"
        );
    }
    assert_eq!(f.dlq_count().await, 20);

    // 2. Listen and Send, no Manage: counted by browsing.
    let app = with_rule("app", "app-key");
    let (code, stdout, said) = run(&app, &["list", "-o", "json"]);
    assert_eq!(code, Some(0), "{said}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("list -o json");
    assert_eq!(listed[0]["depth"], 20, "{listed}");
    assert_eq!(listed[0]["exactness"], "exact", "{listed}");
    assert!(
        said.contains("lack the Manage right"),
        "no word of the fallback: {said}"
    );
    // Past the limit, the depth is a floor, and says so.
    let (code, stdout, said) = run_with(&floored, &app, &["list", "-o", "json"]);
    assert_eq!(code, Some(0), "{said}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("list -o json");
    assert_eq!(
        (listed[0]["depth"].as_u64(), listed[0]["exactness"].as_str()),
        (Some(10), Some("at_least")),
        "{listed}"
    );
    let (_, stdout, _) = run_with(&floored, &app, &["list"]);
    assert!(stdout.contains("10+") && stdout.contains("at least"), "{stdout}");
    let (code, _, said) = run(&app, &["inspect", "dlq"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("20 shown, 20 read"), "{said}");
    let (code, _, said) = run(&app, &["redrive", "dlq", "--yes", "--no-journal"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("settled:   20"), "{said}");
    assert_eq!(f.drain_source().await.len(), 20);

    // 3. Listen only: the copies are refused, once, and the pass stops.
    f.put_in_dlq(&msgs[..10]).await;
    let reader = with_rule("reader", "reader-key");
    let (code, _, said) = run(&reader, &["redrive", "dlq", "--yes", "--no-journal"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("(failed"), "{said}");
    assert!(
        said.contains("'Send' claim(s) are required to perform this operation"),
        "{said}"
    );
    assert_eq!(
        said.matches("claim(s) are required").count(),
        1,
        "the refusal is said once: {said}"
    );
    assert!(said.contains("settled:   0"), "{said}");
    assert_eq!(f.dlq_count().await, 10);
    assert!(f.drain_source().await.is_empty());
}

/// A connection string of an entity-level policy (Azure's portal gives one
/// per queue or topic, ending in `EntityPath=<entity>`) works for its
/// entity's dead-letter queue: counts, browse and redrive, for a queue and
/// for a subscription of a topic, with every token signed for the entity, as
/// its key allows (the emulator's `--entity-sas-rule` refuses a token such a
/// key signed for the namespace, as Azure does: the adapter signed for the
/// namespace whatever `EntityPath` said, and every call failed with
/// InvalidAudience). Used for anything outside that entity (another queue in
/// the config, a `--to`, a `source`), it is refused before anything is read
/// or leased, with exit 2 and both entities named.
#[tokio::test]
async fn a_connection_string_scoped_to_an_entity_works_for_it_and_is_refused_beyond_it() {
    use common::servicebus::{ENTITY_KEY_HOST, ServiceBusTopicFixture, emulator_connection_string};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_ENTITY_KEY";
    let queue = common::unique("orders");
    let topic = common::unique("billing");
    let (emu, _cs, client) = common::servicebus::private_emulator(
        "servicebus-entity-key",
        ENTITY_KEY_HOST,
        &[
            "--sas-rule",
            "x=y",
            "--entity-sas-rule",
            &format!("{queue}:orders-app=orders-key"),
            "--entity-sas-rule",
            &format!("{topic}:billing-app=billing-key:Listen,Send"),
        ],
    )
    .await;
    let f = ServiceBusFixture::on_named(emu.url(), client, ENV, &queue, &[]).await;
    let t = ServiceBusTopicFixture::on_named(
        emu.url(),
        common::servicebus::client_with(&emulator_connection_string(ENTITY_KEY_HOST)).await,
        ENV,
        &topic,
        &["invoices"],
    )
    .await;
    // Created by a link's attach: with SAS rules on, the ATOM PUT needs a token.
    let other = common::unique("other");
    let o = ServiceBusFixture::on_named(
        emu.url(),
        common::servicebus::client_with(&emulator_connection_string(ENTITY_KEY_HOST)).await,
        ENV,
        &other,
        &[],
    )
    .await;
    let scoped = |rule: &str, key: &str, entity: &str| {
        with_sas_rule(&emulator_connection_string(ENTITY_KEY_HOST), rule, key) + &format!(";EntityPath={entity}")
    };
    let orders_cs = scoped("orders-app", "orders-key", &queue);
    let billing_cs = scoped("billing-app", "billing-key", &topic);
    let run = |config: &std::path::Path, cs: &str, args: &[&str]| run_with_connection_string(ENV, config, cs, args);
    let msgs: Vec<TestMessage> = (0..5).map(|i| failing(i, "Timeout")).collect();
    f.put_in_dlq(&msgs).await;
    t.put_in_dlq(&msgs[..3]).await;

    // The queue's own key: counts (it has Manage), browse, redrive.
    let config = f.config_file_with("");
    let (code, stdout, said) = run(&config, &orders_cs, &["list", "-o", "json"]);
    assert_eq!(code, Some(0), "{said}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("list -o json");
    assert_eq!(
        (listed[0]["depth"].as_u64(), listed[0]["exactness"].as_str()),
        (Some(5), Some("exact")),
        "{listed}"
    );
    let (code, _, said) = run(&config, &orders_cs, &["inspect", "dlq"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("5 shown, 5 read"), "{said}");
    let (code, _, said) = run(&config, &orders_cs, &["redrive", "dlq", "--yes", "--no-journal"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("settled:   5"), "{said}");
    assert_eq!(f.drain_source().await.len(), 5);

    // A subscription's dead-letter queue with its topic's key (Listen and
    // Send: depth by browsing), redriven to the topic.
    let (code, stdout, said) = run(&t.config_file_with(""), &billing_cs, &["list", "-o", "json"]);
    assert_eq!(code, Some(0), "{said}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("list -o json");
    assert_eq!(listed[0]["depth"].as_u64(), Some(3), "{listed}");
    let (code, _, said) = run(
        &t.config_file_with(""),
        &billing_cs,
        &["redrive", "dlq", "--yes", "--no-journal"],
    );
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("settled:   3"), "{said}");
    assert_eq!(t.drain_source().await.len(), 3);

    // Beyond the entity: refused up front, naming both, exit 2.
    f.put_in_dlq(&msgs[..2]).await;
    let refused = |said: &str, beyond: &str| {
        said.contains(&format!("EntityPath={queue}"))
            && said.contains(&format!("`{beyond}`"))
            && said.contains("namespace-level")
            && !said.contains("orders-key")
    };
    let elsewhere = std::env::temp_dir().join(format!("dlqb-sb-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &elsewhere,
        f.config_yaml_with("")
            .replace(&format!("queue: {queue}\n"), &format!("queue: {other}\n")),
    )
    .unwrap();
    let (code, _, said) = run(&elsewhere, &orders_cs, &["list"]);
    assert_eq!(code, Some(2), "{said}");
    assert!(refused(&said, &other), "{said}");
    let (code, _, said) = run(
        &config,
        &orders_cs,
        &["redrive", "dlq", "--to", &other, "--yes", "--no-journal"],
    );
    assert_eq!(code, Some(2), "{said}");
    assert!(refused(&said, &other), "{said}");
    // `--to` a configured queue: its own connection string may reach it, but
    // the copies go out on this queue's.
    let two = std::env::temp_dir().join(format!("dlqb-sb-{}.yaml", uuid::Uuid::new_v4().simple()));
    let second = format!(
        "  - name: second\n    servicebus:\n      connection_string_env: {ENV}_NAMESPACE\n      queue: {other}\n      management_endpoint: {}\n",
        f.http
    );
    std::fs::write(
        &two,
        f.config_yaml_with("").replace("redrive:", &format!("{second}redrive:")),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .env_remove("DLQ_BRIDGE_CONFIG")
        .env(ENV, &orders_cs)
        .env(format!("{ENV}_NAMESPACE"), emulator_connection_string(ENTITY_KEY_HOST))
        .arg("--config")
        .arg(&two)
        .args(["redrive", "dlq", "--to", "second", "--yes", "--no-journal"])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(refused(&said, &other), "{said}");
    // A `source` elsewhere.
    let sourced = std::env::temp_dir().join(format!("dlqb-sb-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &sourced,
        f.config_yaml_with("")
            .replace("    servicebus:\n", &format!("    source: {other}\n    servicebus:\n")),
    )
    .unwrap();
    let (code, _, said) = run(&sourced, &orders_cs, &["redrive", "dlq", "--yes", "--no-journal"]);
    assert_eq!(code, Some(2), "{said}");
    assert!(refused(&said, &other), "{said}");
    assert_eq!(f.dlq_count().await, 2, "nothing was leased or moved");
    assert!(o.drain_source().await.is_empty());
}

/// When the broker refuses the dead-letter queue's link (the attach, or the
/// `$cbs` token put before it), the user is told what was refused and why,
/// with the broker's condition and words, and the pass stops at once: a
/// refusal is no connection failure. An attach refused for a reason other
/// than a missing entity, a missing claim or a disabled entity (here
/// amqp:not-allowed: `queue:` names a topic, which has no dead-letter queue
/// of its own) read "cannot reach ... (is the service or emulator
/// running?)". The keys have Listen
/// and Send but not Manage, so the existence check that needs Manage is
/// skipped and the attach is what answers, as on Azure with such a key.
#[tokio::test]
async fn refused_links_are_told_as_refusals_not_as_unreachable() {
    use common::servicebus::{REFUSALS_HOST, emulator_connection_string, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_REFUSALS";
    let topology = std::env::temp_dir().join(format!("dlqb-sb-topology-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &topology,
        "queues:\n  - name: orders\ntopics:\n  - name: events\n    subscriptions:\n      - name: audit\n",
    )
    .unwrap();
    let (emu, _cs, _client) = private_emulator(
        "servicebus-refusals",
        REFUSALS_HOST,
        &[
            "--auto-create",
            "false",
            "--topology",
            topology.to_str().unwrap(),
            "--sas-rule",
            "x=y",
            "--sas-rule",
            "app=app-key:Listen,Send",
            "--sas-rule",
            "sender=sender-key:Send",
        ],
    )
    .await;
    let with_rule = |rule: &str, key: &str| with_sas_rule(&emulator_connection_string(REFUSALS_HOST), rule, key);
    let run = |queue: &str, cs: &str, args: &[&str]| {
        let config = std::env::temp_dir().join(format!("dlqb-sb-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(
            &config,
            format!(
                "queues:\n  - name: dlq\n    servicebus:\n      connection_string_env: {ENV}\n      queue: {queue}\n      management_endpoint: {}\n",
                emu.url()
            ),
        )
        .unwrap();
        let (code, _, said) = run_with_connection_string(ENV, &config, cs, args);
        (code, said)
    };
    let app = with_rule("app", "app-key");
    let sender = with_rule("sender", "sender-key");
    let redrive: &[&str] = &["redrive", "dlq", "--yes", "--no-journal"];
    let inspect: &[&str] = &["inspect", "dlq"];
    for args in [redrive, inspect] {
        // Refused for what it is: a topic.
        let (code, said) = run("events", &app, args);
        assert_eq!(code, Some(1), "{args:?}: {said}");
        assert!(
            said.contains("refused") && said.contains("amqp:not-allowed") && said.contains("is a topic"),
            "{args:?}: {said}"
        );
        // Refused for good: not retried as a throttled call would be.
        assert!(
            !said.contains("cannot reach") && !said.contains("retrying"),
            "{args:?}: {said}"
        );
        assert!(
            !said.contains("Error {"),
            "a debug dump instead of the broker's words: {args:?}: {said}"
        );
        // A key without the Listen claim.
        let (code, said) = run("orders", &sender, args);
        assert_eq!(code, Some(1), "{args:?}: {said}");
        assert!(
            said.contains("Service Bus authentication failed") && said.contains("'Listen' claim(s) are required"),
            "{args:?}: {said}"
        );
        assert!(
            !said.contains("cannot reach") && !said.contains("retrying"),
            "{args:?}: {said}"
        );
        assert!(!said.contains("Error {"), "{args:?}: {said}");
        // No such queue.
        let (code, said) = run("missing", &app, args);
        assert_eq!(code, Some(1), "{args:?}: {said}");
        assert!(
            said.contains("not found") && said.contains("'missing' could not be found"),
            "{args:?}: {said}"
        );
        assert!(
            !said.contains("cannot reach") && !said.contains("retrying"),
            "{args:?}: {said}"
        );
        assert!(!said.contains("Error {"), "{args:?}: {said}");
    }
}

/// The bodies of the messages a browse of `f`'s dead-letter queue shows,
/// sorted, and those of the deferred ones among them.
async fn dlq_bodies(f: &ServiceBusFixture) -> (Vec<String>, Vec<String>) {
    let body = |m: &ServiceBusPeekedMessage| String::from_utf8_lossy(m.body().expect("a data body")).into_owned();
    let browsed = f.browse_dlq().await;
    let mut all: Vec<String> = browsed.iter().map(body).collect();
    let mut deferred: Vec<String> = browsed
        .iter()
        .filter(|m| m.state() == ServiceBusMessageState::Deferred)
        .map(body)
        .collect();
    all.sort();
    deferred.sort();
    (all, deferred)
}

/// Dead-letter `msgs` into `f`'s dead-letter queue and defer the first
/// `n` of them there, as a consumer of the dead-letter queue would; waits
/// until a browse shows them deferred, and returns their bodies, sorted.
async fn dead_letter_and_defer(f: &ServiceBusFixture, msgs: &[TestMessage], n: usize) -> Vec<String> {
    f.dead_letter(msgs).await;
    let mut rx = f.dlq_receiver().await;
    let got = ServiceBusFixture::receive(&mut rx, n).await;
    assert_eq!(got.len(), n, "received the messages to defer");
    let mut bodies = Vec::new();
    for m in &got {
        bodies.push(String::from_utf8_lossy(m.body().expect("a data body")).into_owned());
        tokio::time::timeout(Duration::from_secs(20), rx.defer_message(m, None))
            .await
            .expect("defer returns")
            .expect("defer succeeds");
    }
    rx.dispose().await.ok();
    bodies.sort();
    // A deferral is queued, not confirmed: wait until a browse shows them
    // deferred (as Azure marks them, `x-opt-message-state` 1).
    let deadline = Instant::now() + Duration::from_secs(10);
    while dlq_bodies(f).await.1 != bodies {
        assert!(
            Instant::now() < deadline,
            "the emulator never showed {bodies:?} deferred"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bodies
}

/// `dlq-bridge redrive dlq ARGS --yes --no-journal -o json` on a private
/// emulator (its connection string `cs` in `env`), logging at debug level:
/// the exit code, the JSON summary and stderr.
fn redrive_json(f: &ServiceBusFixture, env: &str, cs: &str, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let config = f.config_file_with("");
    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .env_remove("DLQ_BRIDGE_CONFIG")
        .env(env, cs)
        .env("DLQ_BRIDGE_LOG", "dlq_bridge=debug")
        .args(["--config", config.to_str().unwrap(), "redrive", "dlq"])
        .args(args)
        .args(["--yes", "--no-journal", "-o", "json"])
        .output()
        .expect("dlq-bridge ran");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("a JSON summary ({e}): {}{stderr}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), summary, stderr)
}

/// What the link logs when a lease waits out LEASE_WAIT for deliveries a
/// browse promised and none came: a deferred message counted as credit did
/// that to every pass that met one.
const LEASE_WAITED: &str = "fewer messages than browsed could be locked";

fn bodies(f: impl Fn(usize) -> bool, n: usize) -> Vec<String> {
    (0..n).filter(|i| f(*i)).map(|i| format!("m{i}")).collect()
}

/// A message a consumer of the dead-letter queue deferred is delivered to no
/// receiver: `inspect` marks it `message_state: deferred`, and a redrive
/// leases it by sequence number through `$management`, like any other
/// message. Of eight messages, four deferred, half of each kind matching:
/// exactly the four matching ones (two deferred) are moved, once each; the
/// non-matching deferred ones stay, still deferred. And the pass never waits
/// out the lease's bounded wait for a delivery that cannot come (a deferred
/// message counted as credit did; without a lease for it, it stayed).
#[tokio::test]
async fn deferred_messages_are_marked_by_inspect_and_redriven_by_filter() {
    use common::servicebus::{DEFERRED_HOST, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_DEFERRED";
    let (emu, cs, client) = private_emulator("servicebus-deferred", DEFERRED_HOST, &[]).await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let reason = |i: usize| if i.is_multiple_of(2) { "Timeout" } else { "Invalid" };
    let msgs: Vec<TestMessage> = (0..8).map(|i| failing(i, reason(i))).collect();
    let deferred = dead_letter_and_defer(&f, &msgs, 4).await;
    assert_eq!(deferred, bodies(|i| i < 4, 8));

    let config = f.config_file_with("");
    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .env_remove("DLQ_BRIDGE_CONFIG")
        .env(ENV, &cs)
        .args(["--config", config.to_str().unwrap(), "inspect", "dlq", "-o", "json"])
        .output()
        .expect("dlq-bridge ran");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect -o json");
    let messages = shown["messages"]
        .as_array()
        .or_else(|| shown.as_array())
        .expect("a list of messages");
    assert_eq!(messages.len(), 8, "{shown}");
    for m in messages {
        let body = m["body_text"].as_str().unwrap_or_default();
        let want = deferred.iter().any(|d| d == body).then_some("deferred");
        assert_eq!(m["properties"]["message_state"].as_str(), want, "{m}");
    }

    let (code, summary, log) = redrive_json(&f, ENV, &cs, &["--filter", r#"reason == "Timeout""#]);
    assert_eq!(code, Some(0), "{summary}{log}");
    assert!(!log.contains(LEASE_WAITED), "the pass waited for a delivery: {log}");
    assert_eq!(summary["examined"], 8, "{summary}");
    assert_eq!(summary["matched"], 4, "{summary}");
    assert_eq!(summary["settled"], 4, "{summary}");
    let mut moved: Vec<String> = f
        .drain_source()
        .await
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    moved.sort();
    assert_eq!(moved, bodies(|i| i.is_multiple_of(2), 8), "each match moved once");
    let (left, still_deferred) = dlq_bodies(&f).await;
    assert_eq!(left, bodies(|i| !i.is_multiple_of(2), 8), "the others stay");
    assert_eq!(
        still_deferred,
        bodies(|i| !i.is_multiple_of(2) && i < 4, 8),
        "and stay deferred"
    );
}

/// A dry run leases the deferred messages too (they count as matched), and
/// abandons their locks through `$management`: they stay deferred, and at
/// once a redrive can lease them again (a lock left to lapse would keep them
/// from it for the lock's duration).
#[tokio::test]
async fn a_dry_run_leaves_deferred_messages_deferred() {
    use common::servicebus::{DEFERRED_DRY_RUN_HOST, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_DEFERRED_DRY_RUN";
    let (emu, cs, client) = private_emulator(
        "servicebus-deferred-dry-run",
        DEFERRED_DRY_RUN_HOST,
        &["--lock-duration", "5m"],
    )
    .await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let msgs: Vec<TestMessage> = (0..5).map(|i| failing(i, "Timeout")).collect();
    let deferred = dead_letter_and_defer(&f, &msgs, 3).await;

    let (code, summary, log) = redrive_json(&f, ENV, &cs, &["--dry-run"]);
    assert_eq!(code, Some(0), "{summary}{log}");
    assert_eq!(summary["matched"], 5, "deferred messages are leased too: {summary}");
    assert_eq!(summary["settled"], 0, "{summary}");
    assert!(!log.contains(LEASE_WAITED), "{log}");
    assert_eq!(dlq_bodies(&f).await, (bodies(|_| true, 5), deferred));

    let (code, summary, log) = redrive_json(&f, ENV, &cs, &[]);
    assert_eq!(code, Some(0), "{summary}{log}");
    assert_eq!(summary["settled"], 5, "released, not left locked: {summary}");
    assert_eq!(f.drain_source().await.len(), 5);
    assert_eq!(f.dlq_count().await, 0);
}

/// `--max` counts deferred messages as any others, exactly: with the first
/// three of six deferred, `--max 4` moves four (the messages leased past the
/// cap are released, the deferred ones among them still deferred), and the
/// next run the other two; each message arrives once.
#[tokio::test]
async fn max_counts_deferred_messages_exactly() {
    use common::servicebus::{DEFERRED_MAX_HOST, private_emulator};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_DEFERRED_MAX";
    let (emu, cs, client) = private_emulator("servicebus-deferred-max", DEFERRED_MAX_HOST, &[]).await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let msgs: Vec<TestMessage> = (0..6).map(|i| failing(i, "Timeout")).collect();
    let deferred = dead_letter_and_defer(&f, &msgs, 3).await;

    let (code, summary, log) = redrive_json(&f, ENV, &cs, &["--max", "4"]);
    assert_eq!(code, Some(0), "{summary}{log}");
    assert_eq!(summary["settled"], 4, "{summary}");
    let first: Vec<String> = f
        .drain_source()
        .await
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(first.len(), 4, "{first:?}");
    let (left, still_deferred) = dlq_bodies(&f).await;
    assert_eq!(left.len(), 2, "{left:?}");
    let want: Vec<String> = left.iter().filter(|b| deferred.contains(b)).cloned().collect();
    assert_eq!(still_deferred, want, "a deferred message left stays deferred");

    let (code, summary, log) = redrive_json(&f, ENV, &cs, &["--max", "10"]);
    assert_eq!(code, Some(0), "{summary}{log}");
    assert_eq!(summary["settled"], 2, "{summary}");
    let mut all: Vec<String> = first;
    all.extend(
        f.drain_source()
            .await
            .into_iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned()),
    );
    all.sort();
    assert_eq!(all, bodies(|_| true, 6), "each message moved once");
    assert_eq!(f.dlq_count().await, 0);
}

/// The journal covers deferred messages as any others: a rerun with the
/// journal of a run that sent their copies and died before completing them
/// completes them (by lock token, through `$management`) instead of sending
/// them again, and redrives the rest.
#[tokio::test]
async fn a_rerun_completes_deferred_messages_the_journal_says_were_sent() {
    use common::servicebus::{DEFERRED_JOURNAL_HOST, private_emulator};
    use dlq_bridge::engine::journal::{Journal, Record};
    const ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_DEFERRED_JOURNAL";
    let (emu, cs, client) = private_emulator("servicebus-deferred-journal", DEFERRED_JOURNAL_HOST, &[]).await;
    let f = ServiceBusFixture::on(emu.url(), client, ENV, &[]).await;
    let msgs: Vec<TestMessage> = (0..4).map(|i| failing(i, "Timeout")).collect();
    let deferred = dead_letter_and_defer(&f, &msgs, 2).await;

    // The run that died: it had sent the deferred messages' copies.
    let config = f.config_file_with("");
    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .env_remove("DLQ_BRIDGE_CONFIG")
        .env(ENV, &cs)
        .args(["--config", config.to_str().unwrap(), "inspect", "dlq", "-o", "json"])
        .output()
        .expect("dlq-bridge ran");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect -o json");
    let messages = shown["messages"]
        .as_array()
        .or_else(|| shown.as_array())
        .expect("a list of messages");
    let dir = std::env::temp_dir().join(format!("dlqb-sb-deferred-{}", uuid::Uuid::new_v4().simple()));
    let path = dir.join("journal.jsonl");
    let journal = Journal::open(&path).expect("a journal");
    for m in messages {
        if !deferred.iter().any(|d| m["body_text"] == d.as_str()) {
            continue;
        }
        let enqueued_at = m["enqueued_at"].as_str().expect("an enqueue time");
        journal
            .append(&Record::Sent {
                run: "died".into(),
                queue: Some("dlq".into()),
                id: m["id"].as_str().expect("an id").into(),
                enqueued_at: Some(enqueued_at.parse().expect("an RFC 3339 time")),
                destination: f.entity.clone(),
                dest_id: "copy".into(),
            })
            .expect("journaled");
    }
    journal.sync().expect("synced");
    drop(journal);

    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .env_remove("DLQ_BRIDGE_CONFIG")
        .env(ENV, &cs)
        .args([
            "--config",
            config.to_str().unwrap(),
            "redrive",
            "dlq",
            "--yes",
            "-o",
            "json",
        ])
        .arg("--journal")
        .arg(&path)
        .output()
        .expect("dlq-bridge ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{said}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON summary");
    assert_eq!(summary["settled_from_journal"], 2, "{summary}");
    assert_eq!(summary["sent"], 2, "{summary}");
    let mut moved: Vec<String> = f
        .drain_source()
        .await
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    moved.sort();
    assert_eq!(moved, bodies(|i| i >= 2, 4), "the deferred ones are not sent again");
    assert_eq!(f.dlq_count().await, 0, "and are completed");
    std::fs::remove_dir_all(dir).ok();
}

/// `report --scan N` on Service Bus (a true peek) keeps its groups, not the
/// messages: the browse goes a page at a time and each message is dropped
/// once grouped. It browsed all N into memory first, so the peak grew with
/// `--scan` (150 bodies of 200 KB: about 30 MB more than 10 of them).
#[tokio::test]
async fn a_report_holds_its_groups_not_the_messages_it_read() {
    let f = ServiceBusFixture::create(false).await;
    f.put_in_dlq(&common::large_messages(150, 200_000)).await;
    let config = f.config_file_with("");
    let peak = |scan: &str| {
        let (code, out, err, rss) = run_measured(
            Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
                .env_remove("DLQ_BRIDGE_CONFIG")
                .args(["--config", config.to_str().unwrap()])
                .args(["report", "dlq", "--by", "reason", "-o", "json", "--scan", scan]),
        );
        assert_eq!(code, 0, "{err}");
        let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
        assert_eq!(r["read"].to_string(), scan, "{r}");
        rss
    };
    let small = peak("10");
    let large = peak("150");
    eprintln!("report peak RSS KiB: scan 10 {small}, scan 150 {large}");
    assert!(
        large - small < 12 * 1024,
        "a report over 150 messages of 200 KB peaked at {large} KiB, over 10 of them at {small} KiB: the messages read were kept"
    );
}

/// A DLQ of ten messages, every one leased (for a minute) by another
/// consumer: the backend holding them and their leases.
async fn ten_held_by_another_consumer() -> (ServiceBusFixture, Arc<dyn QueueBackend>, Vec<Leased>) {
    let f = ServiceBusFixture::create(false).await;
    f.dead_letter(&(0..10).map(|i| failing(i, "Timeout")).collect::<Vec<_>>())
        .await;
    let holder = Registry::new(f.config()).backend("dlq").await.unwrap();
    let held = holder.lease(100, Duration::from_secs(60)).await.unwrap();
    assert_eq!(held.len(), 10);
    (f, holder, held)
}

/// Another consumer holds every message a lease was granted credit for:
/// nothing comes, but the broker answers, so the lease returns empty (the
/// pass ends as drained, as a receive of another provider would) rather
/// than fail as if the broker stalled; its wait is bounded.
#[tokio::test]
async fn a_lease_whose_messages_another_consumer_holds_returns_empty() {
    let (f, holder, held) = ten_held_by_another_consumer().await;
    let hold = Duration::from_secs(60);
    let other = Registry::new(f.config()).backend("dlq").await.unwrap();
    let started = Instant::now();
    // Two leases in flight, as a redrive has: the second waits behind the
    // first, and is judged by what the broker answered since its own first
    // wait ran out.
    let (first, second) = tokio::join!(other.lease(5, hold), other.lease(5, hold));
    let took = started.elapsed();
    for got in [first, second] {
        assert!(
            matches!(&got, Ok(l) if l.is_empty()),
            "empty, not an error: {:?}",
            got.map(|l| l.len())
        );
    }
    // It waited for late deliveries (2 s, then up to 10 s in all) first.
    assert!(took >= Duration::from_secs(9), "took {took:?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let leases: Vec<_> = held.iter().map(|m| m.lease.clone()).collect();
    holder.release(&leases).await.unwrap();
}

/// Credit left from leases that another consumer beat to their messages
/// brings back what a pass released, straight onto the link: those count as
/// delivered again, so the next pass grants credit anew for each and sees
/// all 15 messages that are not the other consumer's, though it starts
/// with the credit still out (a kept link in `serve`).
#[tokio::test]
async fn a_pass_after_leftover_credit_sees_all_that_the_last_one_released() {
    let (f, holder, held) = ten_held_by_another_consumer().await;
    let hold = Duration::from_secs(60);
    f.dead_letter(&(10..25).map(|i| failing(i, "Timeout")).collect::<Vec<_>>())
        .await;
    let other = Registry::new(f.config()).backend("dlq").await.unwrap();
    let pass = || async {
        let mut got = Vec::new();
        loop {
            let leased = other.lease(100, hold).await.unwrap();
            if leased.is_empty() {
                break got;
            }
            got.extend(leased);
        }
    };
    let ids =
        |got: &[Leased]| -> std::collections::BTreeSet<String> { got.iter().map(|l| l.message.id.clone()).collect() };
    let first = pass().await;
    assert_eq!(ids(&first).len(), 15);
    other
        .release(&first.iter().map(|l| l.lease.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    let second = pass().await;
    assert_eq!(ids(&second), ids(&first), "the second pass saw {} of 15", second.len());
    other
        .release(&second.iter().map(|l| l.lease.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    let leases: Vec<_> = held.iter().map(|m| m.lease.clone()).collect();
    holder.release(&leases).await.unwrap();
}

/// `export --max` caps the lines written, `--scan` the messages read, as on
/// the other backends: with a filter that one message in three matches,
/// `--max 3` writes three (it read only three and wrote one, because a
/// Service Bus read is one browse and `--max` capped it), and `--scan 6`
/// stops the read at six.
#[tokio::test]
async fn export_max_caps_what_is_written_and_scan_what_is_read() {
    let f = ServiceBusFixture::create(false).await;
    let msgs: Vec<TestMessage> = (0..15)
        .map(|i| failing(i, if i % 3 == 0 { "Timeout" } else { "Other" }))
        .collect();
    f.put_in_dlq(&msgs).await;
    let config = f.config_file_with("");
    let export = |extra: &[&str]| {
        let file = std::env::temp_dir().join(format!("dlqb-sb-export-{}.jsonl", uuid::Uuid::new_v4().simple()));
        let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
            .env_remove("DLQ_BRIDGE_CONFIG")
            .args(["--config", config.to_str().unwrap()])
            .args([
                "export",
                "dlq",
                "-o",
                "json",
                "--filter",
                r#"attributes.error == "Timeout""#,
                "--to",
            ])
            .arg(&file)
            .args(extra)
            .output()
            .expect("run dlq-bridge");
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{said}");
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
        let lines = std::fs::read_to_string(&file).expect("the export").lines().count();
        std::fs::remove_file(&file).ok();
        (summary, lines)
    };
    let (summary, lines) = export(&["--max", "3"]);
    assert_eq!(lines, 3, "{summary}");
    let (summary, lines) = export(&["--scan", "6"]);
    assert_eq!(lines, 2, "m0 and m3: {summary}");
    assert_eq!(f.browse_dlq().await.len(), 15, "an export removes nothing");
}
