//! SQS fixtures: moto (primary) and ministack (FIFO, DeadLetterQueueSourceArn),
//! per TESTING.md.

use std::collections::BTreeMap;
use std::sync::{Once, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
};
use bytes::Bytes;
use dlq_bridge::config::Config;
use dlq_bridge::model::{AttrValue, Attribute, Attributes};

use super::emulator::{Emulator, spawn};
use super::{Fixture, Received, TestMessage, unique};

static MOTO: OnceLock<Emulator> = OnceLock::new();
static MINISTACK: OnceLock<Emulator> = OnceLock::new();
static ENV: Once = Once::new();

/// The SDK's default credential chain (what dlq-bridge uses in production)
/// must find credentials; emulators accept any.
pub fn init_env() {
    ENV.call_once(|| {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ] {
            if std::env::var_os(k).is_none() {
                // SAFETY: every test calls this first, and `Once` blocks the
                // others until it returns, so no thread reads the environment
                // while it is written.
                unsafe { std::env::set_var(k, v) };
            }
        }
    });
}

/// moto's endpoint: `DLQ_BRIDGE_TEST_SQS_ENDPOINT` when a script started one,
/// else one started for this test binary.
pub fn moto_endpoint() -> String {
    init_env();
    if let Some(url) = std::env::var("DLQ_BRIDGE_TEST_SQS_ENDPOINT")
        .ok()
        .filter(|u| !u.is_empty())
    {
        return url;
    }
    MOTO.get_or_init(|| {
        spawn(
            "moto",
            &["python3", "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"],
            &[],
            "/moto-api/",
        )
    })
    .url()
}

pub fn ministack_endpoint() -> String {
    init_env();
    MINISTACK
        .get_or_init(|| {
            spawn(
                "ministack",
                &["python3", "-m", "ministack"],
                &[("BIND_HOST", "127.0.0.1"), ("GATEWAY_PORT", "{port}")],
                "/",
            )
        })
        .url()
}

pub fn client(endpoint: &str) -> Client {
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::for_tests())
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(conf)
}

pub struct SqsFixture {
    pub client: Client,
    pub endpoint: String,
    pub source_url: String,
    pub dlq_url: String,
    pub fifo: bool,
}

impl SqsFixture {
    /// (message ID, body, receive count) of everything in an SQS DLQ, read in one
    /// pass and released. The read raises each count by one, which callers
    /// account for.
    pub async fn dlq_snapshot(&self) -> Vec<(String, String, u32)> {
        let mut out = Vec::new();
        let mut handles = Vec::new();
        loop {
            let got = self
                .client
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages(10)
                .visibility_timeout(30)
                .wait_time_seconds(1)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send()
                .await
                .unwrap();
            let msgs = got.messages.unwrap_or_default();
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                let count = m.attributes().unwrap()[&MessageSystemAttributeName::ApproximateReceiveCount]
                    .parse()
                    .unwrap();
                out.push((
                    m.message_id().unwrap().to_string(),
                    m.body().unwrap_or_default().to_string(),
                    count,
                ));
                handles.push(m.receipt_handle().unwrap().to_string());
            }
        }
        for h in handles {
            self.client
                .change_message_visibility()
                .queue_url(&self.dlq_url)
                .receipt_handle(h)
                .visibility_timeout(0)
                .send()
                .await
                .unwrap();
        }
        out.sort();
        out
    }

    /// The ARN of the queue at `url`.
    pub async fn queue_arn(&self, url: &str) -> String {
        self.client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes()
            .unwrap()[&QueueAttributeName::QueueArn]
            .clone()
    }

    /// The RedrivePolicy attribute of a queue that dead-letters into this
    /// fixture's DLQ after one receive.
    pub async fn dead_lettering_here(&self) -> (QueueAttributeName, String) {
        let arn = self.queue_arn(&self.dlq_url).await;
        (
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"1"}}"#),
        )
    }

    /// A queue with `attrs`; its `MaximumMessageSize` is 1 MiB (the most SQS
    /// allows since 2025) unless they say otherwise. Created without it, a
    /// queue says 256 KiB, on moto as on AWS, and dlq-bridge sizes copies to
    /// what a destination says it takes: the tests of 1 MiB bodies need it.
    pub async fn create_queue(&self, name: &str, attrs: &[(QueueAttributeName, String)]) -> String {
        let mut req = self.client.create_queue().queue_name(name);
        if !attrs.iter().any(|(k, _)| *k == QueueAttributeName::MaximumMessageSize) {
            req = req.attributes(QueueAttributeName::MaximumMessageSize, (1024 * 1024).to_string());
        }
        for (k, v) in attrs {
            req = req.attributes(k.clone(), v);
        }
        req.send().await.expect("create queue").queue_url().unwrap().to_string()
    }

    async fn send(&self, url: &str, msgs: &[TestMessage]) {
        for (i, m) in msgs.iter().enumerate() {
            let mut req = self
                .client
                .send_message()
                .queue_url(url)
                .message_body(String::from_utf8(m.body.clone()).expect("SQS bodies are text"));
            for (k, a) in &m.attributes {
                req = req.message_attributes(k, to_sqs(a));
            }
            if self.fifo {
                req = req
                    .message_group_id(m.ordering_key.clone().unwrap_or_else(|| "g".into()))
                    .message_deduplication_id(format!("{}-{i}", uuid::Uuid::new_v4().simple()));
            } else if let Some(tenant) = &m.ordering_key {
                // A fair queue's tenant (standard queues take a group ID too).
                req = req.message_group_id(tenant);
            }
            req.send().await.expect("send");
        }
    }

    /// Messages in the DLQ that a receive would get now (not leased).
    pub async fn dlq_visible(&self) -> usize {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.dlq_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .expect("queue attributes");
        out.attributes()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
            .and_then(|v| v.parse().ok())
            .expect("ApproximateNumberOfMessages")
    }

    pub async fn count(&self, url: &str) -> usize {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("queue attributes");
        let attrs = out.attributes().unwrap();
        [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .map(|k| attrs.get(k).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0))
        .sum()
    }
}

fn to_sqs(a: &Attribute) -> MessageAttributeValue {
    let b = MessageAttributeValue::builder();
    let b = match &a.value {
        AttrValue::String(s) => b
            .data_type(a.data_type.clone().unwrap_or("String".into()))
            .string_value(s),
        AttrValue::Number(n) => b
            .data_type(a.data_type.clone().unwrap_or("Number".into()))
            .string_value(n),
        AttrValue::Binary(v) => b
            .data_type(a.data_type.clone().unwrap_or("Binary".into()))
            .binary_value(Blob::new(v.to_vec())),
        other => panic!("SQS fixtures send String, Number and Binary attributes, not {other:?}"),
    };
    b.build().unwrap()
}

fn from_sqs(v: &MessageAttributeValue) -> Attribute {
    let dt = v.data_type().to_string();
    let value = if dt.starts_with("Binary") {
        AttrValue::Binary(Bytes::copy_from_slice(v.binary_value().unwrap().as_ref()))
    } else if dt.starts_with("Number") {
        AttrValue::Number(v.string_value().unwrap().to_string())
    } else {
        AttrValue::String(v.string_value().unwrap().to_string())
    };
    Attribute {
        value,
        data_type: Some(dt),
    }
}

impl SqsFixture {
    /// A fixture on the SQS endpoint given (e.g. a private emulator).
    pub async fn create_on(endpoint: String, ordered: bool) -> Self {
        let mut f = SqsFixture {
            client: client(&endpoint),
            endpoint,
            source_url: String::new(),
            dlq_url: String::new(),
            fifo: ordered,
        };
        let base = unique("t");
        let suffix = if ordered { ".fifo" } else { "" };
        let fifo_attrs: Vec<(QueueAttributeName, String)> = if ordered {
            vec![(QueueAttributeName::FifoQueue, "true".into())]
        } else {
            vec![]
        };
        f.dlq_url = f.create_queue(&format!("{base}-dlq{suffix}"), &fifo_attrs).await;
        let mut src_attrs = fifo_attrs.clone();
        src_attrs.push(f.dead_lettering_here().await);
        f.source_url = f.create_queue(&format!("{base}{suffix}"), &src_attrs).await;
        f
    }
}

#[async_trait]
impl Fixture for SqsFixture {
    async fn create(ordered: bool) -> Self {
        let endpoint = if ordered { ministack_endpoint() } else { moto_endpoint() };
        Self::create_on(endpoint, ordered).await
    }
    fn config(&self) -> Config {
        let yaml = format!(
            "queues:\n  - name: dlq\n    sqs:\n      queue: {}\n      endpoint_url: {}\n      region: us-east-1\nredrive:\n  hold: 2m\n",
            self.dlq_url, self.endpoint
        );
        Config::from_yaml(&yaml, "test", &[]).expect("fixture config")
    }

    async fn dead_letter(&self, msgs: &[TestMessage]) {
        self.send(&self.source_url, msgs).await;
        // A consumer that never deletes: with maxReceiveCount 1, the receive
        // after the first moves each message to the DLQ.
        for _ in 0..300 {
            if self.count(&self.dlq_url).await >= msgs.len() && self.count(&self.source_url).await == 0 {
                return;
            }
            self.client
                .receive_message()
                .queue_url(&self.source_url)
                .max_number_of_messages(10)
                .visibility_timeout(0)
                .send()
                .await
                .expect("receive from source");
        }
        panic!("messages did not reach the DLQ through the RedrivePolicy");
    }

    async fn put_in_dlq(&self, msgs: &[TestMessage]) {
        self.send(&self.dlq_url, msgs).await;
    }

    async fn drain_source(&self) -> Vec<Received> {
        let mut out = Vec::new();
        let mut empty = 0;
        while empty < 2 {
            let got = self
                .client
                .receive_message()
                .queue_url(&self.source_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .visibility_timeout(60)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await
                .expect("receive");
            let msgs = got.messages.unwrap_or_default();
            if msgs.is_empty() {
                empty += 1;
                continue;
            }
            empty = 0;
            let mut entries = Vec::new();
            for m in msgs {
                let attributes: Attributes = m
                    .message_attributes()
                    .map(|a| {
                        a.iter()
                            .map(|(k, v)| (k.clone(), from_sqs(v)))
                            .collect::<BTreeMap<_, _>>()
                    })
                    .unwrap_or_default();
                out.push(Received {
                    body: m.body().unwrap_or_default().as_bytes().to_vec(),
                    attributes,
                    ordering_key: m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                        .cloned(),
                });
                entries.push(
                    DeleteMessageBatchRequestEntry::builder()
                        .id(entries.len().to_string())
                        .receipt_handle(m.receipt_handle().unwrap())
                        .build()
                        .expect("a delete entry"),
                );
            }
            // One request per receive: moto answers each in tens of ms, and a
            // fault run drains thousands of copies.
            let deleted = self
                .client
                .delete_message_batch()
                .queue_url(&self.source_url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("delete");
            assert!(deleted.failed().is_empty(), "delete failed: {:?}", deleted.failed());
        }
        out
    }

    async fn dlq_count(&self) -> usize {
        // Released messages become visible at once; give the emulator a beat.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.count(&self.dlq_url).await
    }
}

/// Publish an `AWS/SQS ApproximateAgeOfOldestMessage` point for `queue_name`
/// into moto's CloudWatch, as SQS would: `age_secs`, `minutes_ago`. moto
/// routes by the service the Authorization header names (`monitoring`) and
/// checks nothing unless its auth is on.
pub async fn put_age_point(endpoint: &str, queue_name: &str, minutes_ago: i64, age_secs: u64) {
    let at = (chrono::Utc::now() - chrono::Duration::minutes(minutes_ago))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let age = age_secs.to_string();
    let r = reqwest::Client::new()
        .post(format!("{endpoint}/"))
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/monitoring/aws4_request, SignedHeaders=host, Signature=0",
        )
        .form(&[
            ("Action", "PutMetricData"),
            ("Version", "2010-08-01"),
            ("Namespace", "AWS/SQS"),
            ("MetricData.member.1.MetricName", "ApproximateAgeOfOldestMessage"),
            ("MetricData.member.1.Dimensions.member.1.Name", "QueueName"),
            ("MetricData.member.1.Dimensions.member.1.Value", queue_name),
            ("MetricData.member.1.Value", age.as_str()),
            ("MetricData.member.1.Unit", "Seconds"),
            ("MetricData.member.1.Timestamp", at.as_str()),
        ])
        .send()
        .await
        .expect("moto answers");
    let status = r.status();
    assert!(
        status.is_success(),
        "PutMetricData: {status} {}",
        r.text().await.unwrap_or_default()
    );
}

/// What a front's hook answers in place of the endpoint behind it: an HTTP
/// status and an SQS JSON error body.
pub type FrontAnswer = Option<(u16, &'static str)>;

/// An SQS endpoint in front of `upstream` (moto) that shows `hook` every
/// request (its `X-Amz-Target` operation, e.g. `AmazonSQS.SendMessageBatch`,
/// and its JSON body) and forwards it unless the hook answers it: for what
/// moto does not do (SQS's OverLimit) or does not keep (a batch entry's
/// system attributes).
pub async fn sqs_front(upstream: &str, hook: impl Fn(&str, &[u8]) -> FrontAnswer + Send + Sync + 'static) -> String {
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    let upstream = upstream.trim_end_matches('/').to_string();
    let hook = std::sync::Arc::new(hook);
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let (upstream, hook, client) = (upstream.clone(), hook.clone(), client.clone());
        async move {
            let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
            if let Some((status, answer)) = hook(target, &body) {
                return (
                    StatusCode::from_u16(status).expect("an HTTP status"),
                    [("content-type", "application/x-amz-json-1.0")],
                    Bytes::from_static(answer.as_bytes()),
                );
            }
            let mut req = client.request(method, format!("{upstream}{uri}")).body(body);
            for (k, v) in &headers {
                if k != "host" && k != "content-length" {
                    req = req.header(k, v);
                }
            }
            let resp = req.send().await.expect("moto answers");
            let status = resp.status();
            let bytes = resp.bytes().await.expect("moto's answer");
            (status, [("content-type", "application/x-amz-json-1.0")], bytes)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}
