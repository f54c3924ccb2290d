//! Pub/Sub-specific behaviour, against Google's emulator (the shared
//! guarantees are in `conformance.rs`).

#![cfg(feature = "pubsub")]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use common::pubsub::{DLQ_SUB, PubSubFixture, SOURCE_SUB, SOURCE_TOPIC, attributes_of, emulator_host};
use common::{Fixture, TestMessage, attrs, redrive};
use dlq_bridge::backend::{self, BackendError, QueueBackend};
use dlq_bridge::config::Config;
use dlq_bridge::engine::redrive::{MARK_COUNT, MARK_ID};
use dlq_bridge::engine::registry::{RedriveRequest, Registry};
use dlq_bridge::model::{AttrValue, Attribute, Destination, Exactness, Outgoing, SendResult, SettleResult};

fn failing(i: usize) -> TestMessage {
    TestMessage {
        body: format!(r#"{{"order":{i}}}"#).into_bytes(),
        attributes: attrs(&[("error", "Timeout"), ("tenant", "acme")]),
        ordering_key: None,
    }
}

fn all() -> RedriveRequest {
    RedriveRequest {
        filter: Some("true".into()),
        ..Default::default()
    }
}

async fn backend_for(config: &Config) -> Result<std::sync::Arc<dyn QueueBackend>, BackendError> {
    backend::connect(config.queue("dlq").expect("queue dlq")).await
}

#[tokio::test]
async fn source_is_the_topic_of_the_failing_subscription() {
    let f = PubSubFixture::create(false).await;
    let before = Utc::now();
    f.dead_letter(&[failing(1), failing(2)]).await;
    let b = backend_for(&f.config()).await.unwrap();
    let peeked = b.peek(10).await.unwrap();
    assert_eq!(peeked.len(), 2);
    for m in &peeked {
        assert_eq!(m.source.as_deref(), Some(f.source_topic().as_str()), "{m:?}");
        assert_eq!(
            m.properties.get("source_subscription").map(String::as_str),
            Some(SOURCE_SUB)
        );
        assert_eq!(m.reason.as_deref(), Some("Timeout"));
        assert!(m.delivery_count.is_some_and(|c| c >= 5), "{m:?}");
        // The original publish time, not the dead-lettering time.
        let at = m.enqueued_at.expect("enqueued_at");
        assert!(at >= before - chrono::Duration::seconds(5) && at <= Utc::now(), "{at}");
        let original = m.attributes["CloudPubSubDeadLetterSourceTopicPublishTime"].as_text();
        assert_eq!(at, chrono::DateTime::parse_from_rfc3339(&original).unwrap(), "{m:?}");
        assert!(m.attributes.contains_key("CloudPubSubDeadLetterSourceSubscription"));
        assert!(b.is_dead_letter_attribute("CloudPubSubDeadLetterSourceDeliveryCount"));
    }
    // The one subscription whose dead-letter policy points here names the
    // default source, too.
    assert_eq!(b.default_source().await.unwrap(), Some(Destination(f.source_topic())));
}

/// A message whose source subscription was deleted names a topic nobody can
/// tell any more: it is not sent to the one other topic whose subscription
/// dead-letters here (what a message naming no source gets), but stays in the
/// DLQ, saying why.
#[tokio::test]
async fn a_message_whose_source_subscription_is_gone_is_not_sent_elsewhere() {
    use common::pubsub::{DLQ_TOPIC, MAX_DELIVERY_ATTEMPTS};
    use gcloud_googleapis::pubsub::v1::DeadLetterPolicy;
    use gcloud_pubsub::subscription::SubscriptionConfig;
    let f = PubSubFixture::create(false).await;
    f.dead_letter(&[failing(1), failing(2)]).await;
    f.client.create_topic("other", None, None).await.unwrap();
    let other = f
        .client
        .create_subscription(
            "other-worker",
            "other",
            SubscriptionConfig {
                dead_letter_policy: Some(DeadLetterPolicy {
                    dead_letter_topic: format!("projects/{}/topics/{DLQ_TOPIC}", f.project),
                    max_delivery_attempts: MAX_DELIVERY_ATTEMPTS,
                }),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    f.source_subscription().delete(None).await.unwrap();
    let s = redrive(f.config(), all()).await;
    assert_eq!((s.settled, s.send_failed), (0, 2), "{s:?}");
    assert!(
        s.errors.iter().any(|e| e.contains(SOURCE_SUB) && e.contains("--to")),
        "{s:?}"
    );
    assert!(f.pull(&other, 10).await.is_empty(), "nothing went to the other topic");
    assert_eq!(f.dlq_count().await, 2);
}

/// A browse that stops early (its visitor had enough) still releases every
/// message its last pull brought, not only those it looked at: the next
/// browse sees them all instead of waiting out the browse's 60 s hold.
#[tokio::test]
async fn a_browse_that_stops_early_releases_all_it_pulled() {
    let f = PubSubFixture::create(false).await;
    f.put_in_dlq(&(0..5).map(failing).collect::<Vec<_>>()).await;
    let b = backend_for(&f.config()).await.unwrap();
    let mut visited = 0;
    b.peek_each(100, &mut |_| {
        visited += 1;
        false
    })
    .await
    .unwrap();
    assert_eq!(visited, 1);
    assert_eq!(b.peek(10).await.unwrap().len(), 5, "held messages were not released");
}

#[tokio::test]
async fn messages_without_dead_letter_attributes_fall_back_to_the_configured_source() {
    let f = PubSubFixture::create(false).await;
    f.put_in_dlq(&[failing(1)]).await;
    let yaml = format!(
        "queues:\n  - name: dlq\n    source: {SOURCE_TOPIC}\n    pubsub:\n      project: {}\n      subscription: {DLQ_SUB}\n      emulator_host: {}\n",
        f.project, f.host
    );
    let config = Config::from_yaml(&yaml, "test", &[]).unwrap();
    let b = backend_for(&config).await.unwrap();
    let m = b.peek(1).await.unwrap().remove(0);
    assert_eq!(m.source.as_deref(), Some(f.source_topic().as_str()));
    assert!(m.properties.is_empty(), "{m:?}");
    assert!(m.enqueued_at.is_some(), "publish_time is the fallback: {m:?}");
    assert_eq!(m.delivery_count, None);
}

#[tokio::test]
async fn copies_lose_the_dead_letter_attributes_and_carry_the_redrive_marks() {
    let f = PubSubFixture::create(false).await;
    f.dead_letter(&[failing(1), failing(2), failing(3)]).await;
    let s = redrive(f.config(), all()).await;
    assert_eq!(s.settled, 3, "{s:?}");
    let arrived = f.drain_source().await;
    assert_eq!(arrived.len(), 3);
    for m in &arrived {
        let dead: Vec<&String> = m
            .attributes
            .keys()
            .filter(|k| k.starts_with("CloudPubSubDeadLetter"))
            .collect();
        assert!(dead.is_empty(), "dead-letter attributes stripped: {dead:?}");
        assert!(m.attributes[MARK_ID].as_text().starts_with(&s.run_id), "{m:?}");
        assert_eq!(m.attributes[MARK_COUNT].as_text(), "1");
        assert_eq!(m.attributes["tenant"].as_text(), "acme");
        assert_eq!(m.attributes["error"].as_text(), "Timeout");
        assert!(
            !m.attributes.contains_key("dlq_bridge_target"),
            "targeted redrive is opt-in"
        );
    }
    assert_eq!(f.dlq_count().await, 0);
}

#[tokio::test]
async fn targeted_redrive_names_the_failing_subscription() {
    let f = PubSubFixture::create(false).await;
    f.dead_letter(&[failing(1), failing(2)]).await;
    let config = f.config_with("      target_subscription_attribute: dlq_bridge_target\n");
    let s = redrive(config, all()).await;
    assert_eq!(s.settled, 2, "{s:?}");
    let arrived = f.drain_source().await;
    assert_eq!(arrived.len(), 2);
    for m in &arrived {
        // The emulator ignores subscription filters, so only the attribute
        // itself can be checked here.
        assert_eq!(m.attributes["dlq_bridge_target"].as_text(), SOURCE_SUB, "{m:?}");
    }
    // A copy to another topic goes without it: naming a subscription of
    // the source topic, it would match no filter there, and Pub/Sub acks
    // what a filter refuses (the copy would be lost).
    f.dead_letter(&[failing(3)]).await;
    f.client.create_topic("elsewhere", None, None).await.unwrap();
    let elsewhere = f
        .client
        .create_subscription("elsewhere-reader", "elsewhere", Default::default(), None)
        .await
        .unwrap();
    let to_elsewhere = RedriveRequest {
        to: Some("elsewhere".into()),
        ..all()
    };
    let s = redrive(
        f.config_with("      target_subscription_attribute: dlq_bridge_target\n"),
        to_elsewhere,
    )
    .await;
    assert_eq!(s.settled, 1, "{s:?}");
    let got = f.pull(&elsewhere, 10).await;
    assert_eq!(got.len(), 1);
    let attributes = &got[0].message.as_ref().unwrap().attributes;
    assert!(!attributes.contains_key("dlq_bridge_target"), "{attributes:?}");
}

#[tokio::test]
async fn stats_count_exactly_on_the_emulator_and_leave_everything_in_place() {
    let f = PubSubFixture::create(false).await;
    f.dead_letter(&[failing(1), failing(2), failing(3), failing(4)]).await;
    f.put_in_dlq(&[failing(5), failing(6), failing(7)]).await;
    let b = backend_for(&f.config()).await.unwrap();
    let stats = b.stats().await.unwrap();
    assert_eq!(stats.depth, 7, "{stats:?}");
    assert_eq!(stats.exactness, Exactness::Exact);
    assert!(stats.oldest_age.is_some(), "{stats:?}");
    // Counting released everything at once: it is all deliverable again.
    assert_eq!(b.stats().await.unwrap().depth, 7);
    let leased = b.lease(100, Duration::from_secs(30)).await.unwrap();
    assert_eq!(leased.len(), 7);
    b.release(&leased.into_iter().map(|l| l.lease).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(f.dlq_count().await, 7);
}

#[tokio::test]
async fn send_writes_typed_attributes_as_text_and_refuses_what_pubsub_cannot_carry() {
    let f = PubSubFixture::create(false).await;
    let b = backend_for(&f.config()).await.unwrap();
    let to = b.resolve_destination(SOURCE_TOPIC).await.unwrap();
    assert_eq!(to, Destination(f.source_topic()));
    let mut typed = attrs(&[("s", "text")]);
    for (k, v) in [
        ("int", AttrValue::Int(-7)),
        ("bool", AttrValue::Bool(true)),
        ("bin", AttrValue::Binary(Bytes::from_static(&[0, 255]))),
        ("num", AttrValue::Number("1.50".into())),
    ] {
        typed.insert(
            k.into(),
            Attribute {
                value: v,
                data_type: None,
            },
        );
    }
    let ok = Outgoing {
        body: Bytes::from_static(&[0, 1, 2]),
        attributes: typed,
        properties: Default::default(),
        ordering_key: None,
        dedup_id: "a-1".into(),
        original_id: "a".into(),
    };
    // Pub/Sub needs data or at least one attribute.
    let empty = Outgoing {
        body: Bytes::new(),
        attributes: Default::default(),
        dedup_id: "b-1".into(),
        original_id: "b".into(),
        ..ok.clone()
    };
    let results = b.send(&to, &[ok, empty]).await.unwrap();
    assert!(
        matches!(&results[0], SendResult::Sent { dest_id } if !dest_id.is_empty()),
        "{results:?}"
    );
    assert!(matches!(&results[1], SendResult::Failed { .. }), "{results:?}");
    let arrived = f.drain_source().await;
    assert_eq!(arrived.len(), 1);
    let got = &arrived[0];
    assert_eq!(got.body, vec![0, 1, 2]);
    let text = |k: &str| got.attributes[k].as_text();
    assert_eq!(
        (text("s"), text("int"), text("bool"), text("bin"), text("num")),
        ("text".into(), "-7".into(), "true".into(), "AP8=".into(), "1.50".into())
    );

    // Pub/Sub reserves attribute names that begin with `goog` in any case,
    // but not the `googclient_` ones its client libraries add for tracing.
    // A copy refused stops the later ones of its ordering key (published,
    // they would arrive ahead of it); another key goes.
    let keyed = |id: &str, key: &str, name: &str| Outgoing {
        body: Bytes::from(id.to_string()),
        attributes: attrs(&[(name, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]),
        properties: Default::default(),
        ordering_key: Some(key.into()),
        dedup_id: format!("{id}-1"),
        original_id: id.into(),
    };
    let results = b
        .send(
            &to,
            &[
                keyed("k1", "k", "GOOG_trace"),
                keyed("k2", "k", "trace"),
                keyed("o1", "other", "googclient_traceparent"),
            ],
        )
        .await
        .unwrap();
    assert!(
        matches!(&results[0], SendResult::Failed { error } if error.contains("`goog`")),
        "{results:?}"
    );
    assert!(
        matches!(&results[1], SendResult::Failed { error } if error.contains("earlier copy of its ordering key")),
        "{results:?}"
    );
    assert!(matches!(&results[2], SendResult::Sent { .. }), "{results:?}");
    let arrived = f.drain_source().await;
    assert_eq!(arrived.len(), 1, "{arrived:?}");
    assert_eq!(arrived[0].body, b"o1");
    assert!(arrived[0].attributes.contains_key("googclient_traceparent"));
}

/// Everything one backend can lease now, lease after lease, held for `hold`.
async fn lease_all(b: &dyn QueueBackend, hold: Duration) -> Vec<dlq_bridge::model::Leased> {
    let mut all = Vec::new();
    loop {
        let got = b.lease(1000, hold).await.unwrap();
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

/// A lease returns before its deadline change is answered. A release or a
/// settle right behind it must not be overtaken by that change: a hold
/// landing after a release would hide the messages for the whole hold (here
/// 600 s, so the next round would find none). The emulator answers one
/// connection's calls in order, so this checks the contract end to end; the
/// waiting itself is checked by the unit tests of `PendingHolds`.
#[tokio::test]
async fn release_and_settle_right_after_a_lease_are_not_overtaken_by_its_hold() {
    let f = PubSubFixture::create(false).await;
    f.put_in_dlq(&(0..60).map(failing).collect::<Vec<_>>()).await;
    let b = backend_for(&f.config()).await.unwrap();
    let hold = Duration::from_secs(600);
    for round in 0..5 {
        let leased = lease_all(b.as_ref(), hold).await;
        assert_eq!(
            leased.len(),
            60,
            "round {round}: released messages must be deliverable again at once"
        );
        b.release(&leased.into_iter().map(|l| l.lease).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    let leased = lease_all(b.as_ref(), hold).await;
    assert_eq!(leased.len(), 60);
    let settled = b
        .settle(&leased.into_iter().map(|l| l.lease).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        settled.iter().all(|r| matches!(r, SettleResult::Settled)),
        "{settled:?}"
    );
    assert_eq!(f.dlq_count().await, 0);
}

#[tokio::test]
async fn missing_subscription_and_topic_are_not_found() {
    let f = PubSubFixture::create(false).await;
    let yaml = format!(
        "queues:\n  - name: dlq\n    pubsub:\n      project: {}\n      subscription: no-such-sub\n      emulator_host: {}\n",
        f.project, f.host
    );
    let config = Config::from_yaml(&yaml, "test", &[]).unwrap();
    match backend_for(&config).await {
        Err(BackendError::NotFound { queue, .. }) => assert!(queue.ends_with("/subscriptions/no-such-sub"), "{queue}"),
        Err(other) => panic!("expected NotFound, got {other}"),
        Ok(_) => panic!("expected NotFound, got a backend"),
    }
    let b = backend_for(&f.config()).await.unwrap();
    match b.resolve_destination("no-such-topic").await {
        Err(BackendError::NotFound { queue, .. }) => assert!(queue.ends_with("/topics/no-such-topic"), "{queue}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        b.resolve_destination("projects/x/subscriptions/y").await,
        Err(BackendError::Invalid(_))
    ));
    // The registry reports the same error, naming the queue.
    let err = Registry::new(config).backend("dlq").await.err().expect("an error");
    assert!(err.to_string().contains("not found"), "{err}");
}

#[tokio::test]
async fn a_stopped_emulator_is_unreachable_at_once() {
    // Make sure the real emulator is up, so that only the address differs.
    let _ = emulator_host();
    let port = common::emulator::free_port();
    let yaml = format!(
        "queues:\n  - name: dlq\n    pubsub:\n      project: p\n      subscription: s\n      emulator_host: 127.0.0.1:{port}\n"
    );
    let config = Config::from_yaml(&yaml, "test", &[]).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), backend_for(&config))
        .await
        .expect("connecting to a stopped emulator does not hang");
    match result {
        Err(e @ BackendError::Unreachable { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
            assert!(text.contains("emulator"), "{text}");
        }
        Err(other) => panic!("expected Unreachable, got {other}"),
        Ok(_) => panic!("expected Unreachable, got a backend"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn dead_lettered_copies_keep_their_attributes_on_the_dlq() {
    // The fixture's own view, as a check on the emulator's dead-letter
    // attributes that the adapter relies on.
    let f = PubSubFixture::create(false).await;
    f.dead_letter(&[failing(1)]).await;
    let dlq = f.browse_dlq().await;
    assert_eq!(dlq.len(), 1);
    let a = attributes_of(&dlq[0]);
    for k in [
        "CloudPubSubDeadLetterSourceDeliveryCount",
        "CloudPubSubDeadLetterSourceSubscription",
        "CloudPubSubDeadLetterSourceSubscriptionProject",
        "CloudPubSubDeadLetterSourceTopicPublishTime",
    ] {
        assert!(a.contains_key(k), "{k} missing: {a:?}");
    }
    assert_eq!(a["CloudPubSubDeadLetterSourceSubscription"].as_text(), SOURCE_SUB);
    assert_eq!(a["CloudPubSubDeadLetterSourceSubscriptionProject"].as_text(), f.project);
}

/// The destination topic deleted in the middle of a pass (redriven at 100
/// msg/s, so sends go a second apart, and deleted 1.5 s in). The publishes
/// after the delete fail as not found, the run says so, and nothing is lost:
/// the failing subscription outlives its topic with the copies published
/// before the delete, and every message is either one of those copies or
/// still in the dead-letter subscription, once.
#[tokio::test]
async fn a_destination_topic_deleted_mid_pass_loses_nothing() {
    let f = PubSubFixture::create(false).await;
    let msgs: Vec<TestMessage> = (0..300)
        .map(|i| TestMessage {
            body: format!("deleted-topic-{i}").into_bytes(),
            attributes: attrs(&[("kind", "retry")]),
            ordering_key: None,
        })
        .collect();
    f.put_in_dlq(&msgs).await;
    let topic = f.client.topic(SOURCE_TOPIC);
    let deleting = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        topic.delete(None).await.expect("delete the source topic");
    });
    let s = redrive(
        f.config(),
        RedriveRequest {
            rate: Some(100),
            ..Default::default()
        },
    )
    .await;
    deleting.await.unwrap();
    assert!(!s.ok(), "{s:?}");
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("not found") && e.contains(SOURCE_TOPIC)),
        "no error says the topic is not found: {:?}",
        s.errors
    );
    let copies: Vec<Vec<u8>> = f.drain_source().await.into_iter().map(|r| r.body).collect();
    let left: Vec<Vec<u8>> = f.browse_dlq().await.into_iter().map(|m| m.data.to_vec()).collect();
    assert!(
        s.settled > 0 && !left.is_empty(),
        "the delete did not land mid-pass: {s:?}"
    );
    assert_eq!(left.len() as u64 + s.settled, msgs.len() as u64, "{s:?}");
    let copied: std::collections::HashSet<&[u8]> = copies.iter().map(Vec::as_slice).collect();
    let kept: std::collections::HashSet<&[u8]> = left.iter().map(Vec::as_slice).collect();
    assert_eq!(kept.len(), left.len(), "a message is in the DLQ twice");
    for m in &msgs {
        assert!(
            copied.contains(m.body.as_slice()) || kept.contains(m.body.as_slice()),
            "message {:?} was lost",
            String::from_utf8_lossy(&m.body)
        );
    }
}

/// An exactly-once DLQ subscription: Acknowledge fails INVALID_ARGUMENT as
/// soon as one of its ack IDs is no longer valid, yet acknowledges the
/// others. Only the invalid one is reported unsettled, so a redrive or purge
/// does not say that messages it removed "stay in the DLQ".
#[tokio::test]
async fn an_exactly_once_subscription_settles_what_it_acknowledged() {
    use gcloud_pubsub::subscription::SubscriptionConfig;
    let f = PubSubFixture::create(false).await;
    let eod = "orders-dead-eod";
    f.client
        .create_subscription(
            eod,
            common::pubsub::DLQ_TOPIC,
            SubscriptionConfig {
                ack_deadline_seconds: 10,
                enable_exactly_once_delivery: true,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    f.put_in_dlq(&[failing(1), failing(2)]).await;
    let yaml = format!(
        "queues:\n  - name: dlq\n    pubsub: {{project: {}, subscription: {eod}, emulator_host: '{}'}}\n",
        f.project, f.host
    );
    let b = backend_for(&Config::from_yaml(&yaml, "test", &[]).unwrap())
        .await
        .unwrap();
    let leased = lease_all(b.as_ref(), Duration::from_secs(600)).await;
    assert_eq!(leased.len(), 2);
    // Another consumer's nack makes the first lease's ack ID invalid.
    f.modack(&f.client.subscription(eod), vec![leased[0].lease.0.clone()], 0)
        .await;
    let leases: Vec<_> = leased.iter().map(|l| l.lease.clone()).collect();
    let results = b.settle(&leases).await.unwrap();
    assert!(
        matches!(&results[0], SettleResult::Failed { error } if error.contains("PERMANENT_FAILURE_INVALID_ACK_ID")),
        "{results:?}"
    );
    assert_eq!(results[1], SettleResult::Settled, "{results:?}");
    let left: Vec<String> = lease_all(b.as_ref(), Duration::from_secs(10))
        .await
        .into_iter()
        .map(|l| l.message.id)
        .collect();
    assert_eq!(left, vec![leased[0].message.id.clone()], "the second was acknowledged");
}

/// A message within Pub/Sub's 10 MB that the redrive marks would take over
/// it is sent without them and counted as "sent without marks"; it used to
/// fail ("… bytes; Pub/Sub allows 10000000") on every run.
#[tokio::test]
async fn marks_are_left_off_a_copy_they_would_take_over_the_size_limit() {
    let f = PubSubFixture::create(false).await;
    // "error" + "Timeout" + "kind" + "near" = 20 bytes of attributes.
    let near = TestMessage {
        body: vec![b'y'; 10_000_000 - 20 - 30],
        attributes: attrs(&[("error", "Timeout"), ("kind", "near")]),
        ordering_key: None,
    };
    f.put_in_dlq(&[near.clone(), failing(1)]).await;
    let mut config = f.config();
    config.queues[0].source = Some(SOURCE_TOPIC.into());
    let s = redrive(config, RedriveRequest::default()).await;
    assert_eq!((s.settled, s.marks_omitted, s.send_failed), (2, 1, 0), "{:?}", s.errors);
    let arrived = f.drain_source().await;
    let near_copy = arrived
        .iter()
        .find(|m| m.attributes.get("kind").map(|a| a.as_text()).as_deref() == Some("near"))
        .expect("the near-limit copy arrived");
    assert_eq!(near_copy.body.len(), near.body.len());
    assert!(!near_copy.attributes.contains_key(MARK_ID), "sent without marks");
    assert_eq!(arrived.iter().filter(|m| m.attributes.contains_key(MARK_ID)).count(), 1);
}

/// A match with nowhere to go (the source subscription it names is gone, so
/// its topic is unknown) keeps its ordering key's later messages in the DLQ,
/// as a failed send does: sent, they would arrive ahead of it. Another key
/// goes.
#[tokio::test]
async fn a_match_with_no_destination_holds_back_the_rest_of_its_ordering_key() {
    let f = PubSubFixture::create(false).await;
    let from = |body: &str, sub: &str, key: &str| TestMessage {
        body: body.as_bytes().to_vec(),
        attributes: attrs(&[
            ("CloudPubSubDeadLetterSourceSubscription", sub),
            ("CloudPubSubDeadLetterSourceSubscriptionProject", f.project.as_str()),
        ]),
        ordering_key: Some(key.into()),
    };
    f.put_in_dlq(&[
        from("k-first", "a-subscription-since-deleted", "k"),
        from("k-second", SOURCE_SUB, "k"),
        from("other", SOURCE_SUB, "o"),
    ])
    .await;
    let s = redrive(f.config(), all()).await;
    assert_eq!((s.sent, s.send_failed, s.held_for_order), (1, 1, 1), "{s:?}");
    assert!(s.errors.iter().any(|e| e.contains("no destination")), "{:?}", s.errors);
    let arrived: Vec<Vec<u8>> = f.drain_source().await.into_iter().map(|r| r.body).collect();
    assert_eq!(arrived, [b"other".to_vec()]);
    assert_eq!(f.dlq_count().await, 2);
}

/// Google's endpoints read SSL_CERT_FILE, as the other backends do: a private
/// CA (a private endpoint, a TLS-inspecting proxy) is trusted once it names it,
/// and an endpoint can carry a port. Here a TLS terminator with a test CA
/// stands in front of the emulator, and the CLI talks to it as to Google's
/// endpoint: TLS, and a bearer token from a service account's key.
#[tokio::test]
async fn a_private_ca_named_by_ssl_cert_file_is_trusted_on_a_google_endpoint() {
    let f = PubSubFixture::create(false).await;
    f.dead_letter(&[failing(1), failing(2), failing(3)]).await;
    let tls = common::tls::TlsTerminator::start(&f.host, &[b"h2"]).await;
    let dir = std::env::temp_dir().join(common::unique("dlqb-pubsub-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "queues:\n  - name: dlq\n    pubsub:\n      project: {}\n      subscription: {DLQ_SUB}\n      endpoint: {}\n",
            f.project, tls.endpoint
        ),
    )
    .unwrap();
    let key = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pubsub/service-account.json");
    let redrive = |ca_file: Option<&std::path::Path>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dlq-bridge"));
        cmd.arg("-c")
            .arg(&config)
            .args(["redrive", "dlq", "--yes", "--no-journal"])
            .env_remove("PUBSUB_EMULATOR_HOST")
            .env_remove("SSL_CERT_DIR")
            .env_remove("SSL_CERT_FILE")
            .env("GOOGLE_APPLICATION_CREDENTIALS", &key);
        if let Some(ca_file) = ca_file {
            cmd.env("SSL_CERT_FILE", ca_file);
        }
        async move {
            let out = cmd.output().await.expect("run dlq-bridge");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.code(), text)
        }
    };

    // The system's CAs do not know the test CA: refused, with the remedy.
    let (code, out) = redrive(None).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "TLS with {} failed: its certificate is not trusted",
            tls.endpoint
        )),
        "{out}"
    );
    assert!(out.contains("set SSL_CERT_FILE"), "{out}");
    assert_eq!(f.dlq_count().await, 3, "nothing moved");

    // A bundle without the issuer: the remedy says so.
    let other = dir.join("other-ca.pem");
    std::fs::write(&other, common::tls::unrelated_ca_pem()).unwrap();
    let (code, out) = redrive(Some(&other)).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "SSL_CERT_FILE names {}, which holds no CA that issued it",
            other.display()
        )),
        "{out}"
    );
    assert_eq!(f.dlq_count().await, 3, "nothing moved");

    // A bundle that cannot be read is named, not skipped for other CAs.
    let missing = dir.join("no-such-bundle.pem");
    let (code, out) = redrive(Some(&missing)).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains(&format!("SSL_CERT_FILE={}", missing.display())), "{out}");
    assert_eq!(f.dlq_count().await, 3, "nothing moved");

    // Trusted: every message goes back to its source over TLS.
    let (code, out) = redrive(Some(&ca)).await;
    assert_eq!(code, Some(0), "{out}");
    let arrived = f.drain_source().await;
    assert_eq!(arrived.len(), 3, "{out}");
    assert_eq!(f.dlq_count().await, 0, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
