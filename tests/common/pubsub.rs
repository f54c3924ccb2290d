//! Pub/Sub fixture on Google's emulator, per TESTING.md.
//!
//! Everything here uses gcloud-pubsub directly, not dlq-bridge. Pulls always
//! ask for `return_immediately`: the emulator keeps a cancelled or abandoned
//! blocking pull as a zombie consumer that swallows messages.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dlq_bridge::config::Config;
use dlq_bridge::model::{Attribute, Attributes};
use gcloud_gax::conn::Environment;
use gcloud_googleapis::pubsub::v1::{
    AcknowledgeRequest, DeadLetterPolicy, ModifyAckDeadlineRequest, PubsubMessage, PullRequest, ReceivedMessage,
};
use gcloud_pubsub::client::{Client, ClientConfig};
use gcloud_pubsub::subscription::{Subscription, SubscriptionConfig};

use super::emulator::{Emulator, spawn};
use super::{Fixture, Received, TestMessage, unique};

static EMULATOR: OnceLock<Emulator> = OnceLock::new();

pub const SOURCE_TOPIC: &str = "orders";
pub const SOURCE_SUB: &str = "orders-worker";
/// Ordered fixtures only: an ordered subscription on the source topic that
/// `drain_source` reads (see [`PubSubFixture::create`]).
pub const ORDERED_READER_SUB: &str = "orders-ordered-reader";
pub const DLQ_TOPIC: &str = "orders-dead";
pub const DLQ_SUB: &str = "orders-dead-sub";
pub const MAX_DELIVERY_ATTEMPTS: i32 = 5;

/// The emulator's `host:port`: `DLQ_BRIDGE_TEST_PUBSUB_HOST` when a script
/// started one, else one started for this test binary. Fails, never skips,
/// when it cannot start.
pub fn emulator_host() -> String {
    if let Some(h) = std::env::var("DLQ_BRIDGE_TEST_PUBSUB_HOST")
        .ok()
        .filter(|h| !h.trim().is_empty())
    {
        return h.trim().to_string();
    }
    let emu = EMULATOR.get_or_init(|| {
        let bin = format!("{}/platform/pubsub-emulator/bin/cloud-pubsub-emulator", sdk_root());
        assert!(
            std::path::Path::new(&bin).exists(),
            "the Pub/Sub emulator is not installed at {bin} (Debian package google-cloud-cli-pubsub-emulator)"
        );
        spawn(
            "pubsub",
            &[&bin, "--host=127.0.0.1", "--port={port}"],
            &[("JAVA_OPTS", "-Xmx512m")],
            "/",
        )
    });
    format!("127.0.0.1:{}", emu.port)
}

pub fn sdk_root() -> String {
    Command::new("gcloud")
        .args(["info", "--format=value(installation.sdk_root)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/usr/lib/google-cloud-sdk".into())
}

/// A gcloud-pubsub client on the emulator, scoped to `project`.
pub async fn client(host: &str, project: &str) -> Client {
    let config = ClientConfig {
        environment: Environment::Emulator(host.to_string()),
        project_id: Some(project.to_string()),
        ..Default::default()
    };
    Client::new(config)
        .await
        .expect("a gcloud-pubsub client on the emulator")
}

pub struct PubSubFixture {
    pub host: String,
    /// Unique per fixture, so tests never see each other's messages.
    pub project: String,
    pub client: Client,
    pub ordered: bool,
}

impl PubSubFixture {
    pub fn source_topic(&self) -> String {
        format!("projects/{}/topics/{SOURCE_TOPIC}", self.project)
    }

    pub fn source_subscription(&self) -> Subscription {
        self.client.subscription(SOURCE_SUB)
    }

    pub fn dlq_subscription(&self) -> Subscription {
        self.client.subscription(DLQ_SUB)
    }

    /// The fixture's config with extra lines under the queue's `pubsub:` section.
    pub fn config_with(&self, extra_pubsub: &str) -> Config {
        let yaml = format!(
            "queues:\n  - name: dlq\n    pubsub:\n      project: {}\n      subscription: {DLQ_SUB}\n      emulator_host: {}\n{extra_pubsub}redrive:\n  hold: 2m\n",
            self.project, self.host
        );
        Config::from_yaml(&yaml, "test", &[]).expect("fixture config")
    }

    pub async fn publish(&self, topic: &str, msgs: &[TestMessage]) -> Vec<String> {
        let mut publisher = self.client.topic(topic).new_publisher(None);
        let mut ids = Vec::with_capacity(msgs.len());
        // Pub/Sub takes at most 1,000 messages per Publish request.
        for chunk in msgs.chunks(1000) {
            let messages: Vec<PubsubMessage> = chunk.iter().map(to_pubsub).collect();
            ids.extend(
                publisher
                    .publish_immediately(messages, None)
                    .await
                    .expect("publish on the emulator"),
            );
        }
        publisher.shutdown().await;
        ids
    }

    /// One `return_immediately` pull.
    pub async fn pull(&self, sub: &Subscription, max: i32) -> Vec<ReceivedMessage> {
        #[allow(deprecated)]
        let req = PullRequest {
            subscription: sub.fully_qualified_name().to_string(),
            return_immediately: true,
            max_messages: max,
        };
        sub.get_client()
            .pull(req, None)
            .await
            .expect("pull on the emulator")
            .into_inner()
            .received_messages
    }

    pub async fn modack(&self, sub: &Subscription, ack_ids: Vec<String>, seconds: i32) {
        if ack_ids.is_empty() {
            return;
        }
        let req = ModifyAckDeadlineRequest {
            subscription: sub.fully_qualified_name().to_string(),
            ack_ids,
            ack_deadline_seconds: seconds,
        };
        sub.get_client()
            .modify_ack_deadline(req, None)
            .await
            .expect("modack on the emulator");
    }

    pub async fn ack(&self, sub: &Subscription, ack_ids: Vec<String>) {
        if ack_ids.is_empty() {
            return;
        }
        let req = AcknowledgeRequest {
            subscription: sub.fully_qualified_name().to_string(),
            ack_ids,
        };
        sub.get_client()
            .acknowledge(req, None)
            .await
            .expect("ack on the emulator");
    }

    /// Every message on the DLQ subscription, pulled and released at once.
    pub async fn browse_dlq(&self) -> Vec<PubsubMessage> {
        let sub = self.dlq_subscription();
        let mut acks = Vec::new();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        loop {
            let got = self.pull(&sub, 1000).await;
            if got.is_empty() {
                break;
            }
            let ids: Vec<String> = got.iter().map(|r| r.ack_id.clone()).collect();
            self.modack(&sub, ids.clone(), 60).await;
            acks.extend(ids);
            for r in got {
                let m = r.message.expect("a pulled message has a body");
                if seen.insert(m.message_id.clone()) {
                    out.push(m);
                }
            }
        }
        self.modack(&sub, acks, 0).await;
        out
    }
}

fn to_pubsub(m: &TestMessage) -> PubsubMessage {
    PubsubMessage {
        data: Bytes::from(m.body.clone()),
        // A Pub/Sub producer can only send strings.
        attributes: m.attributes.iter().map(|(k, a)| (k.clone(), a.as_text())).collect(),
        ordering_key: m.ordering_key.clone().unwrap_or_default(),
        ..Default::default()
    }
}

pub fn attributes_of(m: &PubsubMessage) -> Attributes {
    m.attributes
        .iter()
        .map(|(k, v)| (k.clone(), Attribute::string(v.clone())))
        .collect()
}

impl PubSubFixture {
    /// A fixture on the emulator at `host` (e.g. a private one).
    pub async fn create_on(host: String, ordered: bool) -> Self {
        let project = unique("dlqb");
        let client = client(&host, &project).await;
        let f = PubSubFixture {
            host,
            project,
            client,
            ordered,
        };
        for topic in [SOURCE_TOPIC, DLQ_TOPIC] {
            f.client.create_topic(topic, None, None).await.expect("create topic");
        }
        let dead_letter_topic = format!("projects/{}/topics/{DLQ_TOPIC}", f.project);
        // The emulator (0.8.20) cannot dead-letter from a subscription with
        // message ordering: its pull throws (NullPointerException in
        // OrderedMessageBacklog) once a message exceeds max_delivery_attempts.
        // So the failing subscription is unordered; an ordered fixture adds an
        // ordered reader subscription on the same topic, which `drain_source`
        // reads, and which `dead_letter` empties of the originals.
        if ordered {
            f.client
                .create_subscription(
                    ORDERED_READER_SUB,
                    SOURCE_TOPIC,
                    SubscriptionConfig {
                        ack_deadline_seconds: 10,
                        enable_message_ordering: true,
                        ..Default::default()
                    },
                    None,
                )
                .await
                .expect("create the ordered reader subscription");
        }
        f.client
            .create_subscription(
                SOURCE_SUB,
                SOURCE_TOPIC,
                SubscriptionConfig {
                    ack_deadline_seconds: 10,
                    dead_letter_policy: Some(DeadLetterPolicy {
                        dead_letter_topic,
                        max_delivery_attempts: MAX_DELIVERY_ATTEMPTS,
                    }),
                    ..Default::default()
                },
                None,
            )
            .await
            .expect("create the source subscription with a dead-letter policy");
        f.client
            .create_subscription(
                DLQ_SUB,
                DLQ_TOPIC,
                SubscriptionConfig {
                    ack_deadline_seconds: 10,
                    enable_message_ordering: ordered,
                    ..Default::default()
                },
                None,
            )
            .await
            .expect("create the DLQ subscription");
        f
    }
}

#[async_trait]
impl Fixture for PubSubFixture {
    async fn create(ordered: bool) -> Self {
        Self::create_on(emulator_host(), ordered).await
    }
    fn config(&self) -> Config {
        self.config_with("")
    }

    async fn dead_letter(&self, msgs: &[TestMessage]) {
        self.publish(SOURCE_TOPIC, msgs).await;
        // A consumer that always fails: nack (modack 0) every delivery until
        // Pub/Sub gives up after max_delivery_attempts and dead-letters.
        let sub = self.source_subscription();
        for _ in 0..1000 {
            let got = self.pull(&sub, 1000).await;
            if got.is_empty() {
                if self.dlq_count().await >= msgs.len() {
                    if self.ordered {
                        self.drain_source().await;
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            self.modack(&sub, got.into_iter().map(|r| r.ack_id).collect(), 0).await;
        }
        panic!(
            "messages did not reach the DLQ through the dead-letter policy ({} of {})",
            self.dlq_count().await,
            msgs.len()
        );
    }

    async fn put_in_dlq(&self, msgs: &[TestMessage]) {
        self.publish(DLQ_TOPIC, msgs).await;
    }

    async fn fill_dlq_in_order(&self, msgs: &[TestMessage]) {
        // An ordered subscription delivers a key's next message only once the
        // one before is acked, so a consumer that always nacks dead-letters
        // only the head of each key: publish to the dead-letter topic instead.
        self.put_in_dlq(msgs).await;
    }

    async fn drain_source(&self) -> Vec<Received> {
        let sub = if self.ordered {
            self.client.subscription(ORDERED_READER_SUB)
        } else {
            self.source_subscription()
        };
        let mut out = Vec::new();
        let mut empty = 0;
        while empty < 3 {
            let got = self.pull(&sub, 1000).await;
            if got.is_empty() {
                empty += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            empty = 0;
            let mut acks = Vec::new();
            for r in got {
                acks.push(r.ack_id);
                let m = r.message.expect("a pulled message has a body");
                out.push(Received {
                    body: m.data.to_vec(),
                    attributes: attributes_of(&m),
                    ordering_key: Some(m.ordering_key).filter(|k| !k.is_empty()),
                });
            }
            self.ack(&sub, acks).await;
        }
        out
    }

    async fn dlq_count(&self) -> usize {
        self.browse_dlq().await.len()
    }
}

/// Attributes as a plain string map, for assertions.
pub fn string_map(a: &Attributes) -> HashMap<String, String> {
    a.iter().map(|(k, v)| (k.clone(), v.as_text())).collect()
}
