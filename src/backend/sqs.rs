//! AWS SQS adapter.
//!
//! SQS has no true peek: `peek` receives and releases at once, which raises
//! `ApproximateReceiveCount` (DESIGN §3, guarantee 8). Every call handles at
//! most 10 messages, SQS's batch limit. The age of the oldest message is not
//! knowable from SQS itself: with `cloudwatch: true`, `stats` reads it from
//! CloudWatch ([`cloudwatch`], marked `lagged`); otherwise it reports it as
//! unknown rather than guessing. Queues with the same region and endpoint
//! share one SDK client ([`Clients`]).

mod cloudwatch;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::SharedCredentialsProvider;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::config::interceptors::InterceptorContext;
use aws_sdk_sqs::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::operation::receive_message::ReceiveMessageError;
use aws_sdk_sqs::operation::receive_message::builders::ReceiveMessageFluentBuilder;
use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message, MessageAttributeValue,
    MessageSystemAttributeName, MessageSystemAttributeNameForSends, MessageSystemAttributeValue, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, OnceCell};

use super::{BackendError, Capabilities, OrderGate, QueueBackend, Result, abandon_send, fails_every_send};
use crate::config::{QueueConfig, SqsQueueConfig};
use crate::model::{
    AttrValue, Attribute, Attributes, Destination, DlqMessage, DlqStats, Exactness, LeaseId, Leased, Outgoing,
    SendResult, SettleResult,
};

/// Receives in a row of messages a read already visited that end it.
const ALL_SEEN_RECEIVES: u32 = 3;
const PROVIDER: &str = "SQS";
const BATCH: usize = 10;
/// SQS's limit on a message, and on a whole batch request.
const MAX_PAYLOAD: usize = 1024 * 1024;
const MAX_ATTRIBUTES: usize = 10;
/// The longest FIFO deduplication or group ID.
const MAX_FIFO_ID: usize = 128;
/// The longest visibility timeout SQS accepts (12 hours).
const MAX_VISIBILITY_SECS: u64 = 43_200;

pub struct SqsBackend {
    client: Client,
    queue_name: String,
    /// The queue as the config names it on SQS (a name or a URL), which
    /// errors name: the config's own name for it is in their prefix already.
    configured_queue: String,
    queue_url: String,
    endpoint: String,
    /// Destination queue URL → its `MaximumMessageSize` (1 KiB to 1 MiB;
    /// infrastructure tools still create queues with the old 256 KiB
    /// default). Learnt once per destination, before its copies are made.
    send_limits: std::sync::Mutex<HashMap<String, usize>>,
    reason_attribute: String,
    description_attribute: String,
    /// `DeadLetterQueueSourceArn` → queue URL, so each source is looked up once.
    arn_urls: Mutex<HashMap<String, String>>,
    /// The single queue whose RedrivePolicy points here, if there is exactly
    /// one; or the refusal of the call, which a policy without
    /// `sqs:ListDeadLetterSourceQueues` gives every time: asked again for
    /// every message without a source ARN, it cost a round trip each and an
    /// AccessDenied in CloudTrail.
    listed_source: OnceCell<Result<Option<String>>>,
    /// Where the oldest age comes from, when the config asks for CloudWatch.
    cloudwatch: Option<cloudwatch::CloudWatch>,
    /// The config accepts receives on a DLQ with a RedrivePolicy of its own.
    reads_may_move_messages: bool,
    /// Whether receives are allowed here, learnt once: not when the DLQ has
    /// a RedrivePolicy of its own (its error then, said again on each read).
    receives: OnceCell<std::result::Result<(), String>>,
}

/// SQS clients shared between queues, one per (region, endpoint) as the
/// config gives them (the rest of the SDK's chain, environment and profile, is
/// the same for the whole process). An SDK client is a whole `aws_config` load:
/// its own HTTPS client, TLS configuration and credentials cache.
#[derive(Default)]
pub struct Clients {
    by_key: Mutex<HashMap<ClientKey, SharedClient>>,
}

/// (region, endpoint): the region is the queue's own when its URL or ARN
/// names one ([`queue_region`]).
type ClientKey = (Option<String>, Option<String>);
/// The client, its endpoint and its credentials, filled once by the first
/// queue that needs it.
type SharedClient = Arc<OnceCell<Built>>;
/// An SDK client with its endpoint and the credentials provider it signs with
/// (which CloudWatch's call signs with too: the client does not hand it out).
type Built = (Client, String, Option<SharedCredentialsProvider>);

impl Clients {
    /// The client for `cfg`, built on first use.
    pub async fn get(&self, cfg: &SqsQueueConfig) -> Built {
        let key = (region_of(cfg), cfg.endpoint_url.clone());
        let cell = self.by_key.lock().await.entry(key).or_default().clone();
        cell.get_or_init(|| client(cfg)).await.clone()
    }
}

/// Build an SQS client for `cfg`, with timeouts always set (the SDK has no
/// default read timeout, so a stalled endpoint would hang a run forever).
pub async fn client(cfg: &SqsQueueConfig) -> Built {
    let region = RegionProviderChain::first_try(region_of(cfg).map(aws_config::Region::new))
        .or_default_provider()
        .or_else("us-east-1");
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .read_timeout(Duration::from_secs(30))
                .operation_attempt_timeout(Duration::from_secs(35))
                .operation_timeout(Duration::from_secs(90))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    let env_endpoint = non_empty_env("AWS_ENDPOINT_URL_SQS").or_else(|| non_empty_env("AWS_ENDPOINT_URL"));
    let endpoint_set_empty = std::env::var("AWS_ENDPOINT_URL_SQS").is_ok_and(|v| v.trim().is_empty())
        || std::env::var("AWS_ENDPOINT_URL").is_ok_and(|v| v.trim().is_empty());
    let explicit = cfg.endpoint_url.clone().filter(|u| !u.trim().is_empty());
    if let Some(url) = &explicit {
        loader = loader.endpoint_url(url);
    }
    let sdk = loader.load().await;
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "us-east-1".into());
    let default_endpoint = format!("https://sqs.{region}.amazonaws.com");
    let mut builder = aws_sdk_sqs::config::Builder::from(&sdk)
        .retry_classifier(KmsThrottling::<ReceiveMessageError>::new())
        .retry_classifier(KmsThrottling::<SendMessageBatchError>::new());
    // An empty AWS_ENDPOINT_URL_SQS makes the SDK panic; treat it as unset by
    // pinning the regional endpoint.
    if explicit.is_none() && env_endpoint.is_none() && endpoint_set_empty {
        builder = builder.endpoint_url(&default_endpoint);
    }
    let endpoint = explicit.or(env_endpoint).unwrap_or(default_endpoint);
    (Client::from_conf(builder.build()), endpoint, sdk.credentials_provider())
}

/// The region to call for `cfg`: `region`, else the region its queue URL or
/// ARN names (SQS answers a queue URL of another region than the endpoint's
/// with "queue does not exist"), else None (the SDK's chain).
fn region_of(cfg: &SqsQueueConfig) -> Option<String> {
    cfg.region.clone().or_else(|| queue_region(&cfg.queue))
}

/// The region an AWS queue URL (`https://sqs.REGION.amazonaws.com/…`, the
/// legacy `https://REGION.queue.amazonaws.com/…`, FIPS, China and VPC
/// endpoint hosts) or queue ARN names; None for a name, or a URL of another
/// host (an emulator, a proxy).
fn queue_region(queue: &str) -> Option<String> {
    if let Some(arn) = QueueArn::parse(queue) {
        return Some(arn.region.to_string());
    }
    let host = queue
        .strip_prefix("https://")
        .or_else(|| queue.strip_prefix("http://"))?
        .split(['/', ':'])
        .next()?;
    let labels: Vec<&str> = host
        .strip_suffix(".amazonaws.com")
        .or_else(|| host.strip_suffix(".amazonaws.com.cn"))?
        .split('.')
        .collect();
    let region = match labels.as_slice() {
        [.., "sqs" | "sqs-fips", region] | [.., "sqs" | "sqs-fips", region, "vpce"] => region,
        [region, "queue"] => region,
        ["queue"] => "us-east-1",
        _ => return None,
    };
    let plausible = region.split('-').count() >= 3 && region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    plausible.then(|| region.to_string())
}

/// `arn:PARTITION:sqs:REGION:ACCOUNT:NAME`.
struct QueueArn<'a> {
    region: &'a str,
    account: &'a str,
    name: &'a str,
}

impl<'a> QueueArn<'a> {
    fn parse(arn: &'a str) -> Option<Self> {
        let mut parts = arn.splitn(6, ':');
        let (_arn, _partition, service, region, account, name) = (
            parts.next().filter(|p| *p == "arn")?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        (service == "sqs" && !name.is_empty()).then_some(Self { region, account, name })
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl SqsBackend {
    /// Set the visibility timeout of leased messages (0: visible at once),
    /// ten a call. A lease that already expired is visible again anyway, so
    /// an entry refused for it is no failure.
    async fn change_visibility(&self, leases: &[LeaseId], secs: i32) -> Result<()> {
        for chunk in leases.chunks(BATCH) {
            let mut req = self.client.change_message_visibility_batch().queue_url(&self.queue_url);
            for (j, lease) in chunk.iter().enumerate() {
                req = req.entries(
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(j.to_string())
                        .receipt_handle(&lease.0)
                        .visibility_timeout(secs)
                        .build()
                        .expect("id and handle are set"),
                );
            }
            let out = req.send().await.map_err(|e| self.error(e))?;
            for bad in out.failed() {
                tracing::debug!(code = bad.code(), secs, "visibility change of an expired lease ignored");
            }
        }
        Ok(())
    }
    pub async fn connect(name: &str, cfg: &SqsQueueConfig, queue: &QueueConfig, clients: &Clients) -> Result<Self> {
        if let (Some(region), Some(named)) = (&cfg.region, queue_region(&cfg.queue))
            && *region != named
        {
            return Err(BackendError::Invalid(format!(
                "queue {name}: `region: {region}` but its queue {} is in {named}; SQS would answer that it does not exist (drop `region`, or fix it)",
                cfg.queue
            )));
        }
        let (client, endpoint, credentials) = clients.get(cfg).await;
        let queue_url = resolve_queue_url(&client, &endpoint, &cfg.queue, cfg.account_id.as_deref()).await?;
        let cloudwatch = cfg.cloudwatch.then(|| {
            let region = client
                .config()
                .region()
                .map_or_else(|| "us-east-1".to_string(), |r| r.to_string());
            cloudwatch::CloudWatch::new(name, cfg, &region, credentials, &queue_url)
        });
        Ok(Self {
            client,
            queue_name: name.to_string(),
            configured_queue: cfg.queue.clone(),
            queue_url,
            send_limits: std::sync::Mutex::new(HashMap::new()),
            endpoint,
            reason_attribute: queue.reason_attribute.clone(),
            description_attribute: queue.description_attribute.clone(),
            arn_urls: Mutex::new(HashMap::new()),
            listed_source: OnceCell::new(),
            cloudwatch,
            reads_may_move_messages: cfg.reads_may_move_messages,
            receives: OnceCell::new(),
        })
    }

    /// Refuse to receive from a DLQ that has a RedrivePolicy of its own,
    /// unless the config accepts it: each receive counts toward that
    /// policy's maxReceiveCount, and SQS then moves the message on to the
    /// next queue instead of handing it over, so that reading the DLQ (an
    /// `inspect`, a dry run, serve's every poll) would empty it. Asked once.
    async fn receives_allowed(&self) -> Result<()> {
        let allowed = self
            .receives
            .get_or_try_init(|| async {
                let out = self
                    .client
                    .get_queue_attributes()
                    .queue_url(&self.queue_url)
                    .attribute_names(QueueAttributeName::RedrivePolicy)
                    .send()
                    .await
                    .map_err(|e| self.error(e))?;
                let policy = out
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
                    .filter(|p| !p.trim().is_empty());
                Ok::<_, BackendError>(match policy {
                    None => Ok(()),
                    Some(policy) => {
                        let (count, target) = own_redrive_policy(policy);
                        if self.reads_may_move_messages {
                            tracing::warn!(
                                queue = %self.queue_name,
                                max_receive_count = count.as_deref().unwrap_or("?"),
                                to = target.as_deref().unwrap_or("?"),
                                "this DLQ has a RedrivePolicy of its own: each receive counts toward it (reads_may_move_messages: true)"
                            );
                            Ok(())
                        } else {
                            Err(format!(
                                "{} has a RedrivePolicy of its own (maxReceiveCount {}, to {}): every receive dlq-bridge makes \
                                 (inspect, a dry run, serve's reason sample, the messages a redrive does not match) counts \
                                 toward it, and SQS then moves the message on to that queue instead of handing it over. \
                                 Remove the DLQ's RedrivePolicy, point dlq-bridge at the queue it names, or set \
                                 `reads_may_move_messages: true` under this queue's `sqs:` to read it anyway",
                                self.configured_queue,
                                count.as_deref().unwrap_or("unknown"),
                                target.as_deref().unwrap_or("another queue"),
                            ))
                        }
                    }
                })
            })
            .await?;
        allowed.clone().map_err(|detail| BackendError::Refused {
            provider: PROVIDER,
            detail,
        })
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    fn error<E>(&self, err: SdkError<E, HttpResponse>) -> BackendError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(err, &self.endpoint, &self.configured_queue)
    }

    async fn source_from_arn(&self, arn: &str) -> Option<String> {
        if let Some(url) = self.arn_urls.lock().await.get(arn) {
            return Some(url.clone());
        }
        let url = match resolve_queue_url(&self.client, &self.endpoint, arn, None).await {
            Ok(url) => url,
            // The message names its source: its copy goes there or nowhere,
            // never to another queue (the one ListDeadLetterSourceQueues
            // lists, once this one was deleted). The URL the ARN names, on
            // this endpoint: a queue that is gone fails its sends, saying so.
            Err(e) => {
                let a = QueueArn::parse(arn)?;
                let url = format!("{}/{}/{}", self.endpoint.trim_end_matches('/'), a.account, a.name);
                tracing::warn!(%arn, error = %e, %url, "cannot look up the dead-letter source queue; sending to the URL its ARN names");
                url
            }
        };
        // A source that is gone fails its sends, saying so.
        let _ = self.learn_send_limit(&url).await;
        self.arn_urls.lock().await.insert(arn.to_string(), url.clone());
        Some(url)
    }

    /// The most a copy sent to `url` may weigh (body and attributes), as
    /// learnt by [`Self::learn_send_limit`]; SQS's own limit until then.
    fn send_limit(&self, url: &str) -> usize {
        let limits = self.send_limits.lock().unwrap_or_else(|e| e.into_inner());
        limits.get(url).copied().unwrap_or(MAX_PAYLOAD)
    }

    /// Ask `url` its `MaximumMessageSize`, once. A destination this role may
    /// only send to (no `sqs:GetQueueAttributes` there) keeps SQS's own
    /// limit: a copy over the queue's then fails its send, saying so.
    async fn learn_send_limit(&self, url: &str) -> Result<()> {
        if self
            .send_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(url)
        {
            return Ok(());
        }
        let asked = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::MaximumMessageSize)
            .send()
            .await;
        let limit = match asked {
            Ok(out) => out
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::MaximumMessageSize))
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(MAX_PAYLOAD, |v| v.clamp(1024, MAX_PAYLOAD)),
            Err(e) => match classify(e, &self.endpoint, url) {
                // A queue URL given as the destination is not looked up
                // otherwise: one that is not there passed the dry run, and
                // the real run leased everything to fail every send.
                e @ BackendError::NotFound { .. } => return Err(e),
                e => {
                    tracing::debug!(%url, error = %e, "cannot read the destination's MaximumMessageSize; assuming SQS's limit");
                    MAX_PAYLOAD
                }
            },
        };
        self.send_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_string(), limit);
        Ok(())
    }

    /// Sends go through this queue's client, to its region's endpoint,
    /// which answers a queue URL of another region "does not exist".
    fn check_region(&self, destination: &str) -> Result<()> {
        let here = self.client.config().region().map(|r| r.as_ref().to_string());
        match (queue_region(destination), here) {
            (Some(there), Some(here)) if there != here => Err(BackendError::Invalid(format!(
                "{destination} is in {there}, and queue {} is in {here}: copies go to queues of its own region",
                self.queue_name
            ))),
            _ => Ok(()),
        }
    }

    async fn listed_source(&self) -> Result<Option<String>> {
        self.listed_source
            .get_or_try_init(|| async {
                let out = match self
                    .client
                    .list_dead_letter_source_queues()
                    .queue_url(&self.queue_url)
                    .send()
                    .await
                    .map_err(|e| self.error(e))
                {
                    Ok(out) => out,
                    // Some SQS-compatible services lack this call; the
                    // config's `source` is the remaining fallback.
                    Err(BackendError::Provider { detail, .. }) => {
                        tracing::debug!(%detail, "ListDeadLetterSourceQueues unavailable");
                        return Ok(Ok(None));
                    }
                    // A missing permission, not a blip of the credentials
                    // (an expired token, a clock skew, a chain that failed
                    // to load), which the next call may not meet.
                    Err(e @ BackendError::Auth { .. }) if e.to_string().contains("AccessDenied") => {
                        return Ok(Err(e));
                    }
                    Err(e) => return Err(e),
                };
                let urls = out.queue_urls();
                if urls.len() > 1 {
                    tracing::info!(
                        queue = %self.queue_name,
                        sources = urls.len(),
                        "several queues dead-letter here; messages without DeadLetterQueueSourceArn need `source` in the config or --to"
                    );
                }
                Ok(Ok(if urls.len() == 1 { Some(urls[0].clone()) } else { None }))
            })
            .await?
            .clone()
    }

    async fn to_model(&self, m: &Message) -> DlqMessage {
        let sys = m.attributes();
        let sys_get = |k: MessageSystemAttributeName| sys.and_then(|s| s.get(&k)).map(String::as_str);
        let mut attributes = Attributes::new();
        for (name, v) in m.message_attributes().into_iter().flatten() {
            attributes.insert(name.clone(), attribute_from_sqs(v));
        }
        let text_attr = |name: &str| attributes.get(name).map(Attribute::as_text);
        // A FIFO queue's group orders its messages; a standard queue's is a
        // fair queue's tenant, and orders nothing.
        let group = sys_get(MessageSystemAttributeName::MessageGroupId);
        let fifo = self.queue_url.ends_with(".fifo");
        let source = match sys_get(MessageSystemAttributeName::DeadLetterQueueSourceArn) {
            Some(arn) => self.source_from_arn(arn).await,
            None => None,
        };
        let source = match source {
            Some(s) => Some(s),
            None => self.listed_source().await.ok().flatten(),
        };
        DlqMessage {
            id: m.message_id().unwrap_or_default().to_string(),
            body: Bytes::from(m.body().unwrap_or_default().to_string()),
            reason: text_attr(&self.reason_attribute),
            description: text_attr(&self.description_attribute),
            delivery_count: sys_get(MessageSystemAttributeName::ApproximateReceiveCount).and_then(|c| c.parse().ok()),
            enqueued_at: sys_get(MessageSystemAttributeName::SentTimestamp)
                .and_then(|ms| ms.parse::<i64>().ok())
                .and_then(DateTime::<Utc>::from_timestamp_millis),
            source,
            ordering_key: group.filter(|_| fifo).map(str::to_string),
            // The X-Ray trace the message was sent with: its copy continues
            // it; and a fair queue's tenant, which its copy keeps.
            properties: sys_get(MessageSystemAttributeName::AwsTraceHeader)
                .map(|t| (super::AWS_TRACE_HEADER_PROPERTY.to_string(), t.to_string()))
                .into_iter()
                .chain(
                    group
                        .filter(|_| !fifo)
                        .map(|g| (super::SQS_TENANT_PROPERTY.to_string(), g.to_string())),
                )
                .collect(),
            attributes,
        }
    }

    async fn receive(&self, max: usize, hold: Duration) -> Result<Vec<Message>> {
        self.receives_allowed().await?;
        let out = receive_request(&self.client, &self.queue_url, max, hold)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(out.messages.unwrap_or_default())
    }
}

/// A RedrivePolicy's maxReceiveCount and target queue (its name, from the
/// ARN), as far as they can be read: the policy is JSON whose count SQS has
/// written as a number or a string.
fn own_redrive_policy(policy: &str) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(policy) else {
        return (None, None);
    };
    let count = match &v["maxReceiveCount"] {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    };
    let target = v["deadLetterTargetArn"]
        .as_str()
        .map(|arn| QueueArn::parse(arn).map_or_else(|| arn.to_string(), |a| a.name.to_string()));
    (count, target)
}

/// The ReceiveMessage call of one receive (a lease, a page of a peek).
///
/// On a FIFO queue it carries a ReceiveRequestAttemptId of its own. The SDK
/// serializes a call's input once and sends that same request again on each
/// of its retries (aws-smithy-runtime's orchestrator rewinds to the request
/// it saved before the first attempt), so the retries of this call carry the
/// same ID. When the first attempt's answer is lost (a reset, a timeout),
/// SQS then answers the retry with the messages that attempt received.
/// Without an ID those messages stayed hidden for the visibility timeout
/// (`redrive.hold`, 5 minutes by default), unseen by the read, and their
/// message groups stayed locked that long. The next receive gets a new ID:
/// SQS would otherwise answer it with the same messages for 5 minutes.
fn receive_request(client: &Client, queue_url: &str, max: usize, hold: Duration) -> ReceiveMessageFluentBuilder {
    let req = client
        .receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(max.clamp(1, BATCH) as i32)
        .visibility_timeout(hold.as_secs().clamp(1, MAX_VISIBILITY_SECS) as i32)
        // A short long-poll: unlike a zero wait, it asks every SQS server,
        // so an empty answer really means nothing is visible.
        .wait_time_seconds(1)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .message_attribute_names("All");
    if queue_url.ends_with(".fifo") {
        req.receive_request_attempt_id(uuid::Uuid::new_v4().simple().to_string())
    } else {
        req
    }
}

/// The codes SQS gives KmsThrottled: the queue's SSE-KMS key's request
/// quota was exceeded (`KMS.ThrottlingException`, the query-compatible code
/// of the JSON protocol that the SDK reports, and the shape's own name).
const KMS_THROTTLING_CODES: &[&str] = &["KMS.ThrottlingException", "KmsThrottled"];

/// Retries an operation's KmsThrottled error as throttling (with the
/// standard strategy's backoff), as the SDK retries SQS's own
/// RequestThrottled. The SDK's classifiers know neither of its codes (they
/// are not in its throttling list, and the error is not modelled as
/// retryable), so a receive or send that KMS throttled for a moment failed
/// at once: a lease failed, and with it the pass.
struct KmsThrottling<E>(std::marker::PhantomData<fn() -> E>);

impl<E> KmsThrottling<E> {
    fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<E> std::fmt::Debug for KmsThrottling<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KmsThrottling")
    }
}

impl<E> ClassifyRetry for KmsThrottling<E>
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let Some(Err(err)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        let code = err
            .as_operation_error()
            .and_then(|e| e.downcast_ref::<E>())
            .and_then(|e| e.code());
        if code.is_some_and(|c| KMS_THROTTLING_CODES.contains(&c)) {
            RetryAction::throttling_error()
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "dlq-bridge: SQS KmsThrottled"
    }
}

async fn resolve_queue_url(client: &Client, endpoint: &str, queue: &str, account: Option<&str>) -> Result<String> {
    if queue.starts_with("https://") || queue.starts_with("http://") {
        return Ok(queue.to_string());
    }
    let (queue, account) = match QueueArn::parse(queue) {
        Some(arn) => (arn.name, Some(arn.account)),
        None => (queue, account),
    };
    let mut req = client.get_queue_url().queue_name(queue);
    if let Some(a) = account {
        req = req.queue_owner_aws_account_id(a);
    }
    let out = req.send().await.map_err(|e| classify(e, endpoint, queue))?;
    out.queue_url()
        .map(str::to_string)
        .ok_or_else(|| BackendError::NotFound {
            queue: queue.into(),
            detail: "GetQueueUrl returned no URL".into(),
        })
}

fn classify<E>(err: SdkError<E, HttpResponse>, endpoint: &str, queue: &str) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        // No credentials anywhere in the chain fails before any request is
        // sent; it is not a connection problem.
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) if is_credentials_error(&err) => {
            BackendError::Auth {
                provider: PROVIDER,
                detail: format!(
                    "no AWS credentials found for queue {queue} ({}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a workload identity (IRSA, Pod Identity)",
                    super::root_cause(&err)
                ),
            }
        }
        SdkError::TimeoutError(_) => BackendError::Unreachable {
            endpoint: endpoint.to_string(),
            detail: "timed out".into(),
        },
        SdkError::DispatchFailure(_) => BackendError::unreachable(endpoint, super::root_cause(&err)),
        _ => {
            let mut code = err.code().unwrap_or_default().to_string();
            let mut detail = match err.message() {
                Some(m) => format!("{code}: {m}"),
                None => DisplayErrorContext(&err).to_string(),
            };
            // An error body the SDK could not parse (an XML or HTML answer to
            // a JSON request: moto's auth errors, a proxy) would otherwise be
            // shown as a dump of the raw response: take its code and message.
            let raw = err.raw_response();
            if code.is_empty()
                && let Some(raw) = raw
            {
                let status = raw.status().as_u16();
                let body = raw.body().bytes().map(String::from_utf8_lossy).unwrap_or_default();
                let tag = |t: &str| {
                    let (_, rest) = body.split_once(&format!("<{t}>"))?;
                    Some(rest.split_once(&format!("</{t}>"))?.0.trim().to_string())
                };
                detail = match (tag("Code"), tag("Message")) {
                    (Some(c), m) => {
                        code = c;
                        format!("{code}: {} (HTTP {status})", m.unwrap_or_default())
                    }
                    (None, _) => format!("HTTP {status}: {}", body.chars().take(300).collect::<String>().trim()),
                };
                if code.is_empty() && matches!(status, 401 | 403) {
                    code = "AccessDenied".into();
                }
            }
            match code.as_str() {
                // With the endpoint, whose region is where SQS looked: a
                // queue of another region "does not exist" there.
                "AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist" => BackendError::NotFound {
                    queue: queue.to_string(),
                    detail: format!("{detail}; looked for at {endpoint}"),
                },
                "InvalidClientTokenId"
                | "UnrecognizedClientException"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "AccessDeniedException"
                | "ExpiredToken"
                | "InvalidSecurity"
                // The queue's SSE-KMS key refuses the caller: every send to
                // (or receive from) the queue fails the same way.
                | "KMS.AccessDeniedException" => BackendError::Auth {
                    provider: PROVIDER,
                    detail: format!("{detail} (queue {queue} at {endpoint})"),
                },
                // The queue's SSE-KMS key cannot be used at all (disabled,
                // pending deletion, gone, not a key for this), or the address
                // is no queue: every later call fails the same way, so a
                // pass stops at the first send instead of leasing the whole
                // DLQ to fail it batch by batch.
                "KMS.DisabledException"
                | "KMS.NotFoundException"
                | "KMS.InvalidStateException"
                | "KMS.InvalidKeyUsageException"
                | "KMS.OptInRequired"
                | "InvalidAddress" => BackendError::Refused {
                    provider: PROVIDER,
                    detail: format!("{detail} (queue {queue})"),
                },
                // ReceiveMessage with 120,000 messages in flight on the queue.
                "OverLimit" | "AWS.SimpleQueueService.OverLimit" => BackendError::HoldLimit {
                    provider: PROVIDER,
                    detail: format!("{detail} (queue {queue})"),
                },
                _ => BackendError::Provider {
                    provider: PROVIDER,
                    detail,
                },
            }
        }
    }
}

/// Whether the SDK failed to load credentials (its chain ends with IMDS when
/// nothing else provides any), as opposed to failing to connect.
fn is_credentials_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if text.contains("credentials") || text.contains("IMDS") {
            return true;
        }
        cur = e.source();
    }
    false
}

#[doc(hidden)]
pub fn attribute_from_sqs(v: &MessageAttributeValue) -> Attribute {
    let data_type = v.data_type().to_string();
    let value = if data_type.starts_with("Binary") {
        AttrValue::Binary(
            v.binary_value()
                .map(|b| Bytes::copy_from_slice(b.as_ref()))
                .unwrap_or_default(),
        )
    } else if data_type.starts_with("Number") {
        AttrValue::Number(v.string_value().unwrap_or_default().to_string())
    } else {
        AttrValue::String(v.string_value().unwrap_or_default().to_string())
    };
    Attribute {
        value,
        data_type: Some(data_type),
    }
}

/// SQS's own DataType for an attribute. A type label from SQS is kept as is;
/// values from other providers get a custom-typed label that says what they were.
///
/// The kept label must be of the value's own family (String, Number or
/// Binary): an attribute whose label and value disagree (an export edited by
/// hand, then imported) would otherwise go out as, say, `Binary` with a
/// string value, which SQS refuses or reads back empty (found by the
/// `attributes` fuzz target).
#[doc(hidden)]
pub fn attribute_to_sqs(a: &Attribute) -> MessageAttributeValue {
    let (label, text, binary): (&str, Option<String>, Option<Blob>) = match &a.value {
        AttrValue::String(s) => ("String", Some(s.clone()), None),
        AttrValue::Number(n) => ("Number", Some(n.clone()), None),
        AttrValue::Binary(b) => ("Binary", None, Some(Blob::new(b.to_vec()))),
        AttrValue::Bool(b) => ("String.bool", Some(b.to_string()), None),
        AttrValue::Int(i) => ("Number.int", Some(i.to_string()), None),
        AttrValue::Float(f) => ("Number.float", Some(f.to_string()), None),
        AttrValue::Timestamp(t) => ("String.timestamp", Some(t.to_rfc3339()), None),
        AttrValue::Uuid(u) => ("String.uuid", Some(u.to_string()), None),
    };
    let family = |t: &str| ["String", "Number", "Binary"].into_iter().find(|f| t.starts_with(f));
    let sqs_label = a
        .data_type
        .as_deref()
        .filter(|t| family(t).is_some() && family(t) == family(label));
    MessageAttributeValue::builder()
        .data_type(sqs_label.unwrap_or(label))
        .set_string_value(text)
        .set_binary_value(binary)
        .build()
        .expect("data_type is always set")
}

/// Why SQS would refuse `o`, checked here for each copy on its own: SQS
/// fails a whole SendMessageBatch for one entry's bad attribute name
/// (InvalidParameterValue), which would fail the nine copies batched with it
/// on every run, and it has been documented to store a body's disallowed
/// characters as U+FFFD, which would settle the original after sending an
/// altered copy: a loss. Such copies come from other providers (`import`),
/// whose bodies and attributes SQS never checked.
fn refused_by_sqs(o: &Outgoing) -> Option<String> {
    // SQS bodies are text. A copy with its invalid bytes replaced would be
    // accepted, and its original then deleted: a loss.
    let Ok(body) = std::str::from_utf8(&o.body) else {
        return Some("the body is binary (not valid UTF-8) and SQS bodies are text".into());
    };
    if body.is_empty() {
        return Some("the body is empty and SQS needs at least one character".into());
    }
    if let Some(c) = disallowed_char(body) {
        return Some(format!("the body holds {}, which SQS does not allow", char_name(c)));
    }
    for (name, a) in &o.attributes {
        if let Some(why) = bad_attribute_name(name) {
            return Some(format!("attribute name `{}` {why}", name.escape_debug()));
        }
        let sqs = attribute_to_sqs(a);
        if let Some(c) = disallowed_char(sqs.data_type()) {
            return Some(format!(
                "attribute `{name}` has a type with {}, which SQS does not allow",
                char_name(c)
            ));
        }
        let value_empty = match (sqs.string_value(), sqs.binary_value()) {
            (Some(text), _) => {
                if let Some(c) = disallowed_char(text) {
                    return Some(format!(
                        "attribute `{name}` holds {}, which SQS does not allow",
                        char_name(c)
                    ));
                }
                text.is_empty()
            }
            (None, Some(b)) => b.as_ref().is_empty(),
            (None, None) => true,
        };
        if value_empty {
            return Some(format!(
                "attribute `{name}` is empty, and SQS attribute values must not be"
            ));
        }
        // A Service Bus double or an exported number can be NaN or infinite;
        // SQS fails the whole batch for a Number it cannot parse.
        if sqs.data_type().starts_with("Number")
            && let Some(text) = sqs.string_value()
            && text.trim().parse::<f64>().is_ok_and(|f| !f.is_finite())
        {
            return Some(format!(
                "attribute `{name}` is the number `{}`, and an SQS Number must be finite",
                text.escape_debug()
            ));
        }
    }
    None
}

/// The first character outside what SQS allows in bodies and string
/// attributes: #x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD | #x10000-#x10FFFF
/// (surrogates cannot occur in a `str`).
fn disallowed_char(text: &str) -> Option<char> {
    text.chars()
        .find(|&c| !matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..))
}

fn char_name(c: char) -> String {
    format!("U+{:04X}", u32::from(c))
}

/// Why SQS refuses a message attribute name, if it does: A-Z a-z 0-9 `_` `-`
/// `.`, at most 256 characters, not starting with `AWS.` or `Amazon.` in any
/// case, no leading or trailing period, no two periods in a row.
fn bad_attribute_name(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > 256 {
        Some("is over 256 characters")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        Some("has characters other than A-Z a-z 0-9 _ - .")
    } else if lower.starts_with("aws.") || lower.starts_with("amazon.") {
        Some("starts with a prefix AWS reserves (AWS. or Amazon.)")
    } else if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        Some("starts or ends with a period, or has two in a row")
    } else {
        None
    }
}

/// What SQS counts against its payload limit for one message: the body, and
/// each attribute's name, type and value as they are sent (the type label
/// [`attribute_to_sqs`] gives it, binary values as bytes, not base64).
fn payload_size(o: &Outgoing) -> usize {
    o.body.len()
        + o.attributes
            .iter()
            .map(|(k, a)| {
                let v = attribute_to_sqs(a);
                let value = v.string_value().map_or(0, str::len) + v.binary_value().map_or(0, |b| b.as_ref().len());
                k.len() + v.data_type().len() + value
            })
            .sum::<usize>()
}

/// An SQS FIFO deduplication or group ID for `raw`: at most 128 characters
/// of ASCII alphanumerics and punctuation. A valid `raw` is kept; any other
/// becomes its readable part and a SHA-256 of all of it, so that distinct
/// IDs stay distinct. Cutting or filtering alone would not: SQS accepts a
/// copy whose deduplication ID it saw in the last 5 minutes and drops it,
/// and the original would then be settled, a loss (two IDs differing only in
/// a space, or past the 128th character, as `<long id>-1` and `<long id>-2`
/// of the same message redriven twice).
fn fifo_id(raw: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c.is_ascii_punctuation();
    if !raw.is_empty() && raw.len() <= MAX_FIFO_ID && raw.chars().all(allowed) {
        return raw.to_string();
    }
    let hex: String = Sha256::digest(raw.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let readable: String = raw
        .chars()
        .filter(|&c| allowed(c))
        .take(MAX_FIFO_ID - hex.len() - 1)
        .collect();
    format!("{readable}~{hex}")
}

#[async_trait]
impl QueueBackend for SqsBackend {
    fn kind(&self) -> &'static str {
        "sqs"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            true_peek: false,
            binary_body: false,
            empty_body: false,
            max_body_bytes: MAX_PAYLOAD,
            typed_attributes: true,
            max_attributes: Some(MAX_ATTRIBUTES),
            batch_size: BATCH,
            // Ten messages a call: it takes several calls in flight to hide a round trip.
            max_lease_size: BATCH,
            max_concurrent_leases: 8,
            // ChangeMessageVisibilityBatch: ten entries a call.
            max_release_size: BATCH,
            ordered_delivery: self.queue_url.ends_with(".fifo"),
            fixed_hold: None,
            max_hold: Some(Duration::from_secs(MAX_VISIBILITY_SECS)),
        }
    }

    fn fits(&self, to: &Destination, o: &Outgoing) -> bool {
        payload_size(o) <= self.send_limit(&to.0)
    }

    fn is_dead_letter_attribute(&self, _name: &str) -> bool {
        // SQS records dead-lettering in system attributes, which a send cannot
        // set anyway; it adds no message attributes.
        false
    }

    async fn stats(&self) -> Result<DlqStats> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        let get = |k: QueueAttributeName| -> u64 {
            out.attributes()
                .and_then(|a| a.get(&k))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let visible = get(QueueAttributeName::ApproximateNumberOfMessages);
        let in_flight = get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
        let depth = visible + in_flight;
        // An empty queue has no oldest message, whatever a point of minutes
        // ago says; so no call.
        let oldest_age = match &self.cloudwatch {
            Some(cw) if depth > 0 => cw.oldest_age().await,
            _ => None,
        };
        Ok(DlqStats {
            depth,
            in_flight: Some(in_flight),
            oldest_age,
            exactness: Exactness::Approximate,
            oldest_age_exactness: oldest_age.map(|_| Exactness::Lagged),
        })
    }

    async fn check_optional_reads(&self) -> Result<()> {
        self.receives_allowed().await?;
        match &self.cloudwatch {
            Some(cw) => cw.refresh().await.map(drop),
            None => Ok(()),
        }
    }

    async fn peek_each(&self, max: usize, visit: &mut (dyn FnMut(DlqMessage) -> bool + Send)) -> Result<usize> {
        let mut handles = Vec::new();
        // A read that outlasts the hold gets messages again: each is visited once.
        let mut seen = HashSet::new();
        let mut read = 0;
        let hold = Duration::from_secs(30);
        // Receives that brought back only messages already visited: once the
        // read outlasts the hold, a queue smaller than `max` hands back what
        // was read before, and the read went round for good.
        let mut all_seen = 0;
        let result: Result<()> = async {
            while read < max {
                let batch = self.receive(max - read, hold).await?;
                if batch.is_empty() {
                    return Ok(());
                }
                handles.extend(
                    batch
                        .iter()
                        .filter_map(|m| m.receipt_handle().map(|h| LeaseId(h.to_string()))),
                );
                let before = read;
                for m in &batch {
                    if read >= max || !seen.insert(m.message_id().unwrap_or_default().to_string()) {
                        continue;
                    }
                    read += 1;
                    if !visit(self.to_model(m).await) {
                        return Ok(());
                    }
                }
                all_seen = if read == before { all_seen + 1 } else { 0 };
                if all_seen >= ALL_SEEN_RECEIVES {
                    return Ok(());
                }
            }
            Ok(())
        }
        .await;
        // Whatever happened, nothing stays hidden for the hold.
        let released = self.release(&handles).await;
        result?;
        released?;
        Ok(read)
    }

    async fn lease(&self, max: usize, hold: Duration) -> Result<Vec<Leased>> {
        let batch = self.receive(max, hold).await?;
        let mut out = Vec::with_capacity(batch.len());
        for m in &batch {
            let Some(handle) = m.receipt_handle() else { continue };
            out.push(Leased {
                message: self.to_model(m).await,
                lease: LeaseId(handle.to_string()),
            });
        }
        Ok(out)
    }

    async fn send(&self, to: &Destination, msgs: &[Outgoing]) -> Result<Vec<SendResult>> {
        let fifo = to.0.ends_with(".fifo");
        let mut results: Vec<Option<SendResult>> = vec![None; msgs.len()];
        // Learnt when the destination was resolved; a send that finds the
        // queue gone says so itself.
        let _ = self.learn_send_limit(&to.0).await;
        let limit = self.send_limit(&to.0);
        // Split into requests of at most 10 entries and the queue's limit:
        // SQS caps a batch at 1 MiB, and one report has it refuse a batch
        // over a smaller queue's own limit; smaller batches cost nothing else.
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        let mut size = 0;
        for (i, m) in msgs.iter().enumerate() {
            let s = payload_size(m);
            let refused = refused_by_sqs(m).or_else(|| {
                (s > limit).then(|| {
                    format!("the copy is {s} bytes with its attributes, over the destination's MaximumMessageSize of {limit}")
                })
            });
            if let Some(error) = refused {
                results[i] = Some(SendResult::Failed {
                    error: format!("{error}: not sent"),
                });
                continue;
            }
            match chunks.last_mut() {
                Some(c) if c.len() < BATCH && size + s <= limit => {
                    c.push(i);
                    size += s;
                }
                _ => {
                    chunks.push(vec![i]);
                    size = s;
                }
            }
        }
        // A FIFO group's copies in later chunks wait for its earlier ones.
        let mut order = OrderGate::new(msgs, &results);
        for chunk in chunks {
            let chunk: Vec<usize> = chunk.into_iter().filter(|&i| order.admit(i, &mut results)).collect();
            if chunk.is_empty() {
                continue;
            }
            let mut req = self.client.send_message_batch().queue_url(&to.0);
            for &i in &chunk {
                let m = &msgs[i];
                let mut entry = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(std::str::from_utf8(&m.body).expect("checked above"));
                for (k, a) in &m.attributes {
                    entry = entry.message_attributes(k, attribute_to_sqs(a));
                }
                if let Some(trace) = m.properties.get(super::AWS_TRACE_HEADER_PROPERTY) {
                    // Not counted in the message's size, as SQS counts it.
                    let value = MessageSystemAttributeValue::builder()
                        .data_type("String")
                        .string_value(trace)
                        .build()
                        .expect("the data type is set");
                    entry = entry.message_system_attributes(MessageSystemAttributeNameForSends::AwsTraceHeader, value);
                }
                let group = m
                    .ordering_key
                    .as_deref()
                    .or(m.properties.get(super::SQS_TENANT_PROPERTY).map(String::as_str));
                if fifo {
                    entry = entry
                        .message_group_id(fifo_id(group.unwrap_or("dlq-bridge")))
                        .message_deduplication_id(fifo_id(&m.dedup_id));
                } else if let Some(tenant) = group {
                    // A fair queue's tenant: standard queues take a group ID
                    // too (since 2025), and without it the copy would lose its
                    // tenant and the noisy-neighbour protection with it.
                    entry = entry.message_group_id(fifo_id(tenant));
                }
                req = req.entries(entry.build().expect("id and body are set"));
            }
            match req.send().await {
                Ok(out) => {
                    // Entries are looked up by the IDs the answer names; an ID
                    // this request did not send (a non-conforming endpoint)
                    // confirms nothing.
                    for ok in out.successful() {
                        if let Some(r) = entry(&mut results, &chunk, ok.id()) {
                            *r = Some(SendResult::Sent {
                                dest_id: ok.message_id().to_string(),
                            });
                        }
                    }
                    for bad in out.failed() {
                        if let Some(r) = entry(&mut results, &chunk, bad.id()) {
                            *r = Some(SendResult::Failed {
                                error: format!("{}: {}", bad.code(), bad.message().unwrap_or_default()),
                            });
                        }
                    }
                }
                Err(e) => {
                    // Named by the destination: a queue that is not there is the
                    // destination, not this DLQ.
                    let err = classify(e, &self.endpoint, &to.0);
                    // Nothing about this request can be confirmed. A wrong
                    // destination fails every message the same way, so say so.
                    if fails_every_send(&err) {
                        return abandon_send(results, err);
                    }
                    for &i in &chunk {
                        results[i] = Some(SendResult::Failed { error: err.to_string() });
                    }
                }
            }
            order.note(chunk, &results);
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or(SendResult::Failed {
                    error: "SQS did not report on this entry".into(),
                })
            })
            .collect())
    }

    async fn settle(&self, leases: &[LeaseId]) -> Result<Vec<SettleResult>> {
        let mut results = vec![SettleResult::Settled; leases.len()];
        for (c, chunk) in leases.chunks(BATCH).enumerate() {
            let mut req = self.client.delete_message_batch().queue_url(&self.queue_url);
            for (j, lease) in chunk.iter().enumerate() {
                req = req.entries(
                    DeleteMessageBatchRequestEntry::builder()
                        .id((c * BATCH + j).to_string())
                        .receipt_handle(&lease.0)
                        .build()
                        .expect("id and handle are set"),
                );
            }
            match req.send().await {
                Ok(out) => {
                    let sent: Vec<usize> = (c * BATCH..c * BATCH + chunk.len()).collect();
                    for bad in out.failed() {
                        if let Some(r) = entry(&mut results, &sent, bad.id()) {
                            *r = SettleResult::Failed {
                                error: format!("{}: {}", bad.code(), bad.message().unwrap_or_default()),
                            };
                        }
                    }
                }
                Err(e) => {
                    let error = self.error(e).to_string();
                    for j in 0..chunk.len() {
                        results[c * BATCH + j] = SettleResult::Failed { error: error.clone() };
                    }
                }
            }
        }
        Ok(results)
    }

    async fn release(&self, leases: &[LeaseId]) -> Result<()> {
        self.change_visibility(leases, 0).await
    }

    async fn extend(&self, leases: &[LeaseId], hold: Duration) -> Result<()> {
        self.change_visibility(leases, hold.as_secs().clamp(1, MAX_VISIBILITY_SECS) as i32)
            .await
    }

    async fn default_source(&self) -> Result<Option<Destination>> {
        let Some(url) = self.listed_source().await? else {
            return Ok(None);
        };
        let _ = self.learn_send_limit(&url).await;
        Ok(Some(Destination(url)))
    }

    /// A configured queue named by `--to` was resolved by its own backend,
    /// perhaps of another region: refused before anything is leased.
    fn check_send_to(&self, to: &Destination) -> Result<()> {
        self.check_region(&to.0)
    }

    async fn resolve_destination(&self, name: &str) -> Result<Destination> {
        self.check_region(name)?;
        // A bare name is a queue of the DLQ's own account (SQS keeps a DLQ
        // and its sources in one account), not of the caller's: a tooling
        // role in another account would otherwise send to its own account's
        // queue of that name, or be told it does not exist.
        let owner = url_account(&self.queue_url);
        let url = resolve_queue_url(&self.client, &self.endpoint, name, owner).await?;
        self.learn_send_limit(&url).await?;
        Ok(Destination(url))
    }
}

/// The account that owns the queue at `url` (`…/ACCOUNT/NAME`), when the
/// URL shows one.
fn url_account(url: &str) -> Option<&str> {
    let mut segments = url.trim_end_matches('/').rsplit('/');
    let _name = segments.next()?;
    segments
        .next()
        .filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))
}

/// The result of the batch entry that `id` names, when it is one of `sent`
/// (the indexes this request sent, which are also its entries' IDs).
fn entry<'a, T>(results: &'a mut [T], sent: &[usize], id: &str) -> Option<&'a mut T> {
    let i = id.parse::<usize>().ok().filter(|i| sent.contains(i))?;
    results.get_mut(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_urls_account_is_its_owner() {
        assert_eq!(
            url_account("https://sqs.eu-west-1.amazonaws.com/123456789012/orders-dlq"),
            Some("123456789012")
        );
        assert_eq!(
            url_account("http://localhost:4566/000000000000/q/"),
            Some("000000000000")
        );
        assert_eq!(url_account("http://localhost:5000/queue/q"), None);
        assert_eq!(url_account("q"), None);
    }

    #[test]
    fn attributes_round_trip_through_sqs_types() {
        for (dt, value) in [
            ("String", AttrValue::String("acme".into())),
            ("String.custom", AttrValue::String("x".into())),
            ("Number", AttrValue::Number("12345678901234567890.5".into())),
            ("Number.float", AttrValue::Number("1.5".into())),
            ("Binary", AttrValue::Binary(Bytes::from_static(&[0, 255, 1]))),
            ("Binary.gif", AttrValue::Binary(Bytes::from_static(b"GIF89a"))),
        ] {
            let a = Attribute {
                value,
                data_type: Some(dt.into()),
            };
            assert_eq!(attribute_from_sqs(&attribute_to_sqs(&a)), a, "{dt}");
        }
    }

    #[test]
    fn foreign_types_get_descriptive_sqs_labels() {
        let a = Attribute {
            value: AttrValue::Int(7),
            data_type: None,
        };
        let v = attribute_to_sqs(&a);
        assert_eq!(v.data_type(), "Number.int");
        assert_eq!(v.string_value(), Some("7"));
    }

    #[test]
    fn a_label_of_another_family_is_not_kept() {
        // Each once crashed the `attributes` fuzz target (fuzz/corpus/attributes/regression-sqs-*).
        for (value, dt, expected) in [
            (AttrValue::Binary(Bytes::from_static(b"\x04\xf6")), "String", "Binary"),
            (AttrValue::Uuid(uuid::Uuid::nil()), "Binary.gif", "String.uuid"),
            (AttrValue::Float(2.5), "Binary", "Number.float"),
            (AttrValue::Int(3), "Number.custom", "Number.custom"),
        ] {
            let a = Attribute {
                value,
                data_type: Some(dt.into()),
            };
            let v = attribute_to_sqs(&a);
            assert_eq!(v.data_type(), expected, "{a:?}");
            assert_eq!(v.binary_value().is_some(), expected.starts_with("Binary"), "{a:?}");
        }
    }

    /// `classify` of a service error with `code`, as the SDK builds it.
    fn service_error(code: &str) -> BackendError {
        use aws_sdk_sqs::error::ErrorMetadata;
        use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;
        use aws_smithy_types::body::SdkBody;
        let meta = ErrorMetadata::builder().code(code).message("refused").build();
        let raw = HttpResponse::new(400.try_into().unwrap(), SdkBody::empty());
        classify(
            SdkError::service_error(SendMessageBatchError::generic(meta), raw),
            "http://sqs",
            "orders",
        )
    }

    /// A receive refused for the in-flight limit ends the pass like
    /// `max_held` (the engine stops leasing), not like a provider failure.
    #[test]
    fn over_limit_is_a_hold_limit() {
        for code in ["OverLimit", "AWS.SimpleQueueService.OverLimit"] {
            assert!(matches!(service_error(code), BackendError::HoldLimit { .. }), "{code}");
        }
        assert!(matches!(service_error("InternalError"), BackendError::Provider { .. }));
    }

    /// A destination whose SSE-KMS key refuses the caller fails every batch
    /// the same way: the send says so once and the pass stops, rather than
    /// leasing and failing the whole DLQ batch by batch.
    #[test]
    fn a_kms_key_that_refuses_the_caller_fails_every_send() {
        // The code the SDK reports for KmsAccessDenied (the query-compatible
        // code of SQS's JSON protocol).
        let kms = service_error("KMS.AccessDeniedException");
        assert!(
            matches!(kms, BackendError::Auth { .. }) && fails_every_send(&kms),
            "{kms:?}"
        );
        assert!(matches!(
            service_error("KMS.ThrottlingException"),
            BackendError::Provider { .. }
        ));
        // A key that cannot be used at all, and an address that is no queue,
        // fail every send too.
        for code in [
            "KMS.DisabledException",
            "KMS.NotFoundException",
            "KMS.InvalidStateException",
            "KMS.InvalidKeyUsageException",
            "KMS.OptInRequired",
            "InvalidAddress",
        ] {
            let e = service_error(code);
            assert!(
                matches!(e, BackendError::Refused { .. }) && fails_every_send(&e),
                "{code}: {e:?}"
            );
        }
        // Not found says where SQS looked (its region).
        let gone = service_error("AWS.SimpleQueueService.NonExistentQueue").to_string();
        assert!(gone.contains("looked for at http://sqs"), "{gone}");
    }

    /// Each receive from a FIFO queue carries an attempt ID of its own (the
    /// SDK's retries of that call resend the request it serialized, ID
    /// included); receives from a standard queue carry none.
    #[test]
    fn each_fifo_receive_carries_its_own_attempt_id() {
        use aws_sdk_sqs::config::{BehaviorVersion, Region};
        let client = Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new("us-east-1"))
                .build(),
        );
        let fifo = "https://sqs.us-east-1.amazonaws.com/123456789012/orders-dlq.fifo";
        let attempt = |url: &str| {
            receive_request(&client, url, 10, Duration::from_secs(30))
                .as_input()
                .get_receive_request_attempt_id()
                .clone()
        };
        let (a, b) = (
            attempt(fifo).expect("an attempt ID"),
            attempt(fifo).expect("an attempt ID"),
        );
        assert_ne!(a, b, "a new receive, a new attempt");
        for id in [&a, &b] {
            // SQS: 1 to 128 characters, alphanumerics and punctuation.
            assert!(
                (1..=128).contains(&id.len())
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c.is_ascii_punctuation()),
                "{id}"
            );
        }
        assert_eq!(
            attempt("https://sqs.us-east-1.amazonaws.com/123456789012/orders-dlq"),
            None
        );
    }

    /// KmsThrottled (the queue's KMS key over its request quota) is retried
    /// as throttling on receive and send; the SDK's own classifiers leave it
    /// alone, so it failed the lease at once.
    #[test]
    fn kms_throttling_is_retried_as_throttling() {
        use aws_sdk_sqs::error::ErrorMetadata;
        use aws_sdk_sqs::types::error::KmsThrottled;
        use aws_smithy_runtime_api::client::interceptors::context::{Error, Input};
        use aws_smithy_runtime_api::client::orchestrator::OrchestratorError;

        let failed_with = |err: Error| {
            let mut ctx = InterceptorContext::new(Input::erase(()));
            ctx.set_output_or_error(Err(OrchestratorError::operation(err)));
            ctx
        };
        let kms = |code: &str| {
            ReceiveMessageError::KmsThrottled(
                KmsThrottled::builder()
                    .message("Rate exceeded")
                    .meta(ErrorMetadata::builder().code(code).message("Rate exceeded").build())
                    .build(),
            )
        };
        let classifier = KmsThrottling::<ReceiveMessageError>::new();
        for code in KMS_THROTTLING_CODES {
            assert_eq!(
                classifier.classify_retry(&failed_with(Error::erase(kms(code)))),
                RetryAction::throttling_error(),
                "{code}"
            );
        }
        let other = ReceiveMessageError::generic(ErrorMetadata::builder().code("KMS.DisabledException").build());
        assert_eq!(
            classifier.classify_retry(&failed_with(Error::erase(other))),
            RetryAction::NoActionIndicated
        );
        let send = SendMessageBatchError::generic(ErrorMetadata::builder().code("KMS.ThrottlingException").build());
        assert_eq!(
            KmsThrottling::<SendMessageBatchError>::new().classify_retry(&failed_with(Error::erase(send))),
            RetryAction::throttling_error()
        );
    }

    /// Every SQS client the adapter builds carries that classifier.
    #[tokio::test]
    async fn the_clients_retry_kms_throttling() {
        let cfg = SqsQueueConfig {
            queue: "orders-dlq".into(),
            region: Some("us-east-1".into()),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            account_id: None,
            cloudwatch: false,
            cloudwatch_endpoint_url: None,
            reads_may_move_messages: false,
        };
        let (c, _, _) = client(&cfg).await;
        let names: Vec<&str> = c.config().retry_classifiers().map(|r| r.name()).collect();
        // One for ReceiveMessage, one for SendMessageBatch.
        let ours = names.iter().filter(|n| **n == "dlq-bridge: SQS KmsThrottled").count();
        assert_eq!(ours, 2, "{names:?}");
    }

    /// A NaN or infinite number (a Service Bus double, an exported number)
    /// cannot be an SQS Number: SQS refuses the whole SendMessageBatch for
    /// it, failing the copies batched with it. It is refused for its own
    /// copy, named; finite numbers and the text "NaN" as a String still go.
    #[test]
    fn a_number_that_is_not_finite_is_refused_for_its_copy() {
        let copy = |value: AttrValue| Outgoing {
            body: Bytes::from_static(b"x"),
            attributes: [("n".to_string(), Attribute { value, data_type: None })].into(),
            properties: Default::default(),
            ordering_key: None,
            dedup_id: "d".into(),
            original_id: "o".into(),
        };
        let number = |s: &str| AttrValue::Number(s.into());
        for (value, shown) in [
            (AttrValue::Float(f64::NAN), "`NaN`"),
            (AttrValue::Float(f64::INFINITY), "`inf`"),
            (AttrValue::Float(f64::NEG_INFINITY), "`-inf`"),
            (number("NaN"), "`NaN`"),
            (number("-Infinity"), "`-Infinity`"),
            (number("1e400"), "`1e400`"),
        ] {
            let refused = refused_by_sqs(&copy(value.clone())).unwrap_or_default();
            assert!(
                refused.contains(&format!(
                    "attribute `n` is the number {shown}, and an SQS Number must be finite"
                )),
                "{value:?}: {refused:?}"
            );
        }
        for value in [
            AttrValue::Float(1.5),
            AttrValue::Float(-0.0),
            AttrValue::Int(i64::MIN),
            number("12345678901234567890.125"),
            AttrValue::String("NaN".into()),
        ] {
            assert_eq!(refused_by_sqs(&copy(value.clone())), None, "{value:?}");
        }
    }

    /// The edges of SQS's rules, which moto does not check.
    #[test]
    fn copies_sqs_refuses_are_named() {
        let copy = |body: &str, name: &str, value: AttrValue| Outgoing {
            body: Bytes::from(body.to_string()),
            attributes: [(name.to_string(), Attribute { value, data_type: None })].into(),
            properties: Default::default(),
            ordering_key: None,
            dedup_id: "d".into(),
            original_id: "o".into(),
        };
        let text = |s: &str| AttrValue::String(s.into());
        let allowed = "\t\n\r \u{D7FF}\u{E000}\u{FFFD}\u{10000}\u{10FFFF}";
        for (body, name, value) in [
            (allowed, "a.b_c-D9", text(allowed)),
            ("x", &"n".repeat(256), text("x")),
            ("x", "awsx.Amazonx", AttrValue::Binary(Bytes::from_static(&[0]))),
        ] {
            assert_eq!(refused_by_sqs(&copy(body, name, value)), None, "{name}");
        }
        for (body, name, value, why) in [
            ("\u{FFFE}", "n", text("x"), "the body holds U+FFFE"),
            ("\u{1F}", "n", text("x"), "the body holds U+001F"),
            ("x", "n", text("\u{FFFF}"), "attribute `n` holds U+FFFF"),
            ("x", "n", AttrValue::Binary(Bytes::new()), "attribute `n` is empty"),
            ("x", &"n".repeat(257), text("x"), "is over 256 characters"),
            ("x", "amazon.x", text("x"), "reserves"),
            ("x", "aWs.x", text("x"), "reserves"),
            ("x", "x.", text("x"), "period"),
            ("x", "a..b", text("x"), "period"),
            ("x", "ü", text("x"), "characters other than"),
        ] {
            let refused = refused_by_sqs(&copy(body, name, value)).unwrap_or_default();
            assert!(refused.contains(why), "{name}: {refused:?}");
        }
    }

    #[test]
    fn a_queue_url_or_arn_gives_the_region_to_call() {
        for (queue, region) in [
            (
                "https://sqs.eu-west-1.amazonaws.com/123456789012/orders",
                Some("eu-west-1"),
            ),
            (
                "https://sqs-fips.us-gov-west-1.amazonaws.com/123456789012/orders",
                Some("us-gov-west-1"),
            ),
            (
                "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/orders",
                Some("cn-north-1"),
            ),
            (
                "https://ap-southeast-2.queue.amazonaws.com/123456789012/orders",
                Some("ap-southeast-2"),
            ),
            ("https://queue.amazonaws.com/123456789012/orders", Some("us-east-1")),
            (
                "https://vpce-0a1b-c2d3.sqs.eu-central-1.vpce.amazonaws.com/123456789012/orders",
                Some("eu-central-1"),
            ),
            ("arn:aws:sqs:sa-east-1:123456789012:orders.fifo", Some("sa-east-1")),
            ("orders", None),
            ("http://127.0.0.1:4566/123456789012/orders", None),
            (
                "http://sqs.us-east-1.localhost.localstack.cloud:4566/000000000000/orders",
                None,
            ),
            ("arn:aws:sns:us-east-1:123456789012:orders", None),
        ] {
            assert_eq!(queue_region(queue).as_deref(), region, "{queue}");
        }
        let cfg = |queue: &str, region: Option<&str>| SqsQueueConfig {
            queue: queue.into(),
            region: region.map(Into::into),
            endpoint_url: None,
            account_id: None,
            cloudwatch: false,
            cloudwatch_endpoint_url: None,
            reads_may_move_messages: false,
        };
        let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders";
        assert_eq!(region_of(&cfg(url, None)).as_deref(), Some("eu-west-1"));
        assert_eq!(region_of(&cfg("orders", None)), None, "the SDK's chain decides");
        assert_eq!(
            region_of(&cfg("orders", Some("us-west-2"))).as_deref(),
            Some("us-west-2")
        );
    }

    /// `send` splits batches by this count: an undercount lets a request
    /// over SQS's 1 MiB batch limit through, which fails all of its copies
    /// (BatchRequestTooLong), the same way on every rerun.
    #[test]
    fn payload_size_is_what_sqs_counts() {
        let attrs =
            |value: AttrValue| -> Attributes { [("when".to_string(), Attribute { value, data_type: None })].into() };
        let copy = |body: usize, attributes: Attributes| Outgoing {
            body: Bytes::from("b".repeat(body)),
            attributes,
            properties: Default::default(),
            ordering_key: None,
            dedup_id: "d".into(),
            original_id: "o".into(),
        };
        let t = chrono::DateTime::from_timestamp(0, 0).unwrap();
        // "when" + "String.timestamp" + "1970-01-01T00:00:00+00:00"
        assert_eq!(
            payload_size(&copy(10, attrs(AttrValue::Timestamp(t)))),
            10 + 4 + 16 + 25
        );
        // "when" + "Binary" + 3 bytes (not their base64)
        let binary = AttrValue::Binary(Bytes::from_static(&[1, 2, 3]));
        assert_eq!(payload_size(&copy(10, attrs(binary))), 10 + 4 + 6 + 3);
    }

    #[test]
    fn fifo_ids_are_valid_and_distinct() {
        let long = "a".repeat(127);
        let raws = [
            format!("{} é {}", "a".repeat(100), "b".repeat(100)),
            format!("{long}-1"),
            format!("{long}-2"),
            "order 1-1".into(),
            "order1-1".into(),
            "ключ".into(),
            "ключ2".into(),
            String::new(),
        ];
        let ids: Vec<String> = raws.iter().map(|r| fifo_id(r)).collect();
        for id in &ids {
            assert!(!id.is_empty() && id.len() <= 128, "{id}");
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c.is_ascii_punctuation()),
                "{id}"
            );
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), raws.len(), "{ids:?}");
        // A valid ID (an SQS message ID, a group ID from SQS) is kept as it is.
        assert_eq!(fifo_id("order1-1"), "order1-1");
        assert_eq!(fifo_id(&"x".repeat(128)), "x".repeat(128));
        assert_eq!(
            fifo_id("3f2b9c1e-8d6a-4b7f-9e0d-1a2b3c4d5e6f-2"),
            "3f2b9c1e-8d6a-4b7f-9e0d-1a2b3c4d5e6f-2"
        );
    }
}
