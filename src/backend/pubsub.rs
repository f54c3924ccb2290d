//! Google Cloud Pub/Sub adapter, on the `gcloud-pubsub` crate.
//!
//! The DLQ is a subscription on the dead-letter topic. The six verbs map as:
//!
//! - **lease**: one unary `Pull`, then `ModifyAckDeadline` of the pulled ack IDs
//!   to `hold` (capped at Pub/Sub's 600 s). The lease returns as soon as the
//!   pull does, with the deadline change still on its way: a settle or a
//!   release of those ack IDs waits for its answer first (a release overtaken
//!   by the hold would hide the message for the whole hold). Until it lands the
//!   subscription's own ack deadline (10 s at least) holds the messages, and if
//!   it fails they are still settled within that deadline or come back, as any
//!   lease that runs out does. Pulls are never streamed and never
//!   cancelled: the emulator keeps a cancelled pull as a live "zombie" consumer
//!   that swallows messages for minutes. On the emulator the pull asks for
//!   `return_immediately`; on GCP, where that flag is deprecated and may answer
//!   empty while messages wait, the pull blocks. Either way it carries a
//!   server-side gRPC deadline (`grpc-timeout`) of 5 s, which the server ends
//!   cleanly; `DEADLINE_EXCEEDED` means "nothing to pull". A `hold` over 600 s
//!   is cut to 600 s (with one warning).
//! - **settle**: `Acknowledge`. On an exactly-once subscription a request
//!   with one ack ID no longer valid fails INVALID_ARGUMENT, acknowledges the
//!   others, and lists the failed IDs in an ErrorInfo: only those are
//!   reported unsettled, and the transient ones are acknowledged again.
//!   **release**: `ModifyAckDeadline` to 0. **extend**: `ModifyAckDeadline`
//!   to the hold again (600 s at most), changed one by one past an expired
//!   ack ID, as a release is.
//! - **peek**: Pub/Sub has no browse, so it leases and releases at once. Each
//!   peek therefore counts as a delivery attempt on the DLQ subscription and
//!   hides the messages from other consumers for the moment it takes
//!   (DESIGN §3, guarantee 8).
//! - **send**: the `Publish` RPC to the destination topic, up to 1,000
//!   messages and 10 MB per request (the call `publish_bulk` makes from its
//!   background workers; calling it directly gives the confirmation per call,
//!   with no worker tasks to start and stop per destination). A copy counts as
//!   confirmed when Pub/Sub returns its message ID. Data bytes, attributes and
//!   the ordering key are kept. The RPC takes an ordering key on any topic; the
//!   client-side "enable message ordering" switch only serialises publishes per
//!   key, which the engine already does (one batch per key in flight). One
//!   request holds one ordering key only (Pub/Sub refuses a request that
//!   mixes keys, or keyed and unkeyed messages, with FAILED_PRECONDITION; the
//!   emulator does not): a send publishes each key's requests in order, and
//!   the keys side by side.
//! - **stats**: see below.
//!
//! ## The message model
//! - `id` is the DLQ message's `message_id` (dead-lettering assigns a new one).
//! - `reason` / `description` come from the queue's `reason_attribute` /
//!   `description_attribute` attributes.
//! - `delivery_count` is `CloudPubSubDeadLetterSourceDeliveryCount`.
//! - `enqueued_at` is the time the message was first published, on its source
//!   topic: `CloudPubSubDeadLetterSourceTopicPublishTime`, falling back to the
//!   DLQ message's own `publish_time` for messages published to the
//!   dead-letter topic directly. The original time is what SQS
//!   (`SentTimestamp` survives the move) and Service Bus (`EnqueuedTimeUtc`)
//!   report, so an `age > duration("1h")` filter means the same on all three.
//! - `source` is the topic of the subscription named by
//!   `CloudPubSubDeadLetterSourceSubscription` (in
//!   `CloudPubSubDeadLetterSourceSubscriptionProject`), looked up once per
//!   subscription and cached; else the config's `source`.
//! - `ordering_key` is the message's ordering key.
//! - `properties["source_subscription"]` holds the short name of the
//!   subscription the message failed on, which the targeted redrive needs
//!   after the engine has stripped the dead-letter attributes.
//! - Attributes are strings in Pub/Sub. A copy's attributes are written as
//!   [`Attribute::as_text`] gives them: strings and SQS numbers as they are,
//!   binary as standard base64, booleans as `true`/`false`, integers and floats
//!   in decimal, timestamps in RFC 3339, UUIDs hyphenated. Type labels
//!   (`data_type`) are dropped; what Pub/Sub gives back is always a string.
//! - The `CloudPubSubDeadLetter*` attributes are the provider's dead-letter
//!   attributes, stripped from copies by default.
//!
//! ## Targeted redrive (opt-in)
//! A copy goes back to the source topic, so by default every subscription of
//! that topic gets it again, including those that had processed the original.
//! With `target_subscription_attribute: ATTR` in the queue's config, `send`
//! adds `ATTR = <short name of the failing subscription>` to each copy, and
//! each subscription SUB of the source topic is given the filter
//! `attributes.ATTR = "SUB" OR NOT attributes:ATTR`, so that copies reach only
//! the subscription that failed while ordinary messages reach everyone. Pick
//! a name of letters, digits and underscores (e.g. `dlq_bridge_target`) so it
//! needs no quoting in the filter. The attribute is added here, in the
//! adapter, because it is Pub/Sub routing (it only means something together
//! with Pub/Sub subscription filters, and it is derived from Pub/Sub's own
//! dead-letter attributes); it is not a choice of what to move, which stays in
//! the engine. When it is configured, the adapter reports one attribute fewer
//! in `max_attributes`, so the engine's room check for its marks still holds.
//! The emulator accepts filters but does not apply them.
//!
//! ## Depth and age (`stats`)
//! Picked automatically. With an emulator (the config's `emulator_host`, else
//! `PUBSUB_EMULATOR_HOST`), which has no metrics, the subscription is counted
//! exactly: pulled with `return_immediately` until empty (each batch's
//! deadline extended, message IDs de-duplicated), then released at once. The
//! count is exact for what is deliverable; messages another consumer holds
//! leased at that moment cannot be seen. On GCP, Cloud Monitoring's
//! `pubsub.googleapis.com/subscription/num_undelivered_messages` and
//! `oldest_unacked_message_age`, the latest point of the last 15 minutes,
//! marked `lagged` (1-3 minutes behind). In both cases the age is the time
//! since the oldest message reached the dead-letter topic.
//!
//! Cloud Monitoring is read through its REST API (`projects.timeSeries.list`)
//! with `reqwest`, not `google-cloud-monitoring-v3`: that crate belongs to
//! Google's official SDK family, whose own gax, auth and HTTP stack would be
//! built next to gcloud-pubsub's, for one GET. The REST call reuses the
//! `reqwest` and the Application Default Credentials token source (from
//! `gcloud-auth`, through gcloud-pubsub) already in the build.
//!
//! ## Credentials and endpoints
//! On GCP, Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS,
//! gcloud's user credentials, or the metadata server (GKE Workload Identity).
//! The gRPC channels (two pools: publishes and pulls, and the other subscriber
//! calls: acks, deadline changes, admin) are opened by the first queue on an
//! endpoint, with a 3 s connect timeout, so a stopped emulator is reported at
//! once as unreachable; every other queue on the same endpoint (emulator host,
//! or Google's) shares them. gcloud-pubsub's `SubscriberClient` is not used:
//! it wants a third pool for StreamingPull, which a redrive never sends, and
//! a sidecar would hold its connection for nothing. The channels are the
//! adapter's own too ([`channel`]): Google's endpoints are trusted as SQS's
//! are (`SSL_CERT_FILE`, else the system's CAs), and may carry a port.
//! Cloud Monitoring (depth and age on GCP) is `monitoring.googleapis.com`
//! whatever the endpoint, unless `monitoring_endpoint` names another host.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use gcloud_gax::grpc::{Code, Request, Status};
use gcloud_gax::retry::{MapErr, RetrySetting, invoke};
use gcloud_googleapis::pubsub::v1::publisher_client::PublisherClient as RawPublisherClient;
use gcloud_googleapis::pubsub::v1::subscriber_client::SubscriberClient as RawSubscriberClient;
use gcloud_googleapis::pubsub::v1::{
    AcknowledgeRequest, GetSubscriptionRequest, GetTopicRequest, ListSubscriptionsRequest, ModifyAckDeadlineRequest,
    PublishRequest, PublishResponse, PubsubMessage, PullRequest, ReceivedMessage, Subscription,
};
use gcloud_pubsub::apiv1::conn_pool::{AUDIENCE, PUBSUB, SCOPES};
use gcloud_pubsub::client::google_cloud_auth;
use google_cloud_auth::project::Config as AuthConfig;
use google_cloud_auth::token::DefaultTokenSourceProvider;
use token_source::{TokenSource, TokenSourceProvider};
use tokio::sync::{Mutex, OnceCell, watch};

use self::channel::{Channel, Dialer, Pool};
use super::{BackendError, Capabilities, OrderGate, Purpose, QueueBackend, Result, abandon_send, fails_every_send};
use crate::config::{PubSubQueueConfig, QueueConfig};
use crate::model::{
    Attribute, Attributes, Destination, DlqMessage, DlqStats, Exactness, LeaseId, Leased, Outgoing, Properties,
    SendResult, SettleResult,
};

mod channel;

const PROVIDER: &str = "Pub/Sub";
/// Messages per send batch, and per lease until the engine knows how large
/// bodies are. Measured on the emulator (debug build, 3,000 messages, half
/// matching, one lease at a time): 10 → 3.5 s, 100 → 1.1 s, 500 → 0.9 s,
/// 1000 → 0.8 s. Behind a round trip the larger leases matter more, so the
/// engine grows leases to [`COUNT_PULL`] while bodies are small, within its
/// memory budget.
const BATCH: usize = 100;
/// Pub/Sub's limits on one Publish request.
const MAX_PUBLISH_MESSAGES: usize = 1000;
const MAX_PUBLISH_BYTES: usize = 10_000_000;
/// Publish requests of different ordering keys in flight at once in one send.
const PUBLISH_CONCURRENCY: usize = 16;
/// A message's data plus attributes may not exceed 10 MB.
const MAX_MESSAGE_BYTES: usize = 10_000_000;
const MAX_ATTRIBUTES: usize = 100;
const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
/// The longest ack deadline Pub/Sub accepts.
const MAX_ACK_DEADLINE_SECS: u64 = 600;
/// Ack IDs per Acknowledge / ModifyAckDeadline call (the request limit is
/// 512 KB; ack IDs are a few hundred bytes at most).
const ACK_CHUNK: usize = 1000;
/// Acknowledge calls per chunk while an exactly-once subscription answers
/// some of its ack IDs with a transient failure, which Google's clients retry.
const ACK_ATTEMPTS: u32 = 4;
const EXACTLY_ONCE_ACK_FAILURE: &str = "EXACTLY_ONCE_ACKID_FAILURE";
const TRANSIENT_ACK_FAILURE: &str = "TRANSIENT_FAILURE";
/// The most messages one Pull returns: per lease, and per pull while
/// counting on the emulator.
const COUNT_PULL: usize = 1000;
/// The deadline of a pull on Pub/Sub, which holds a pull open until a
/// message comes (the emulator's return at once). tonic enforces the
/// deadline it sends on the client too, a round trip before the server's
/// runs out, so an empty subscription's pull ends with tonic's "Timeout
/// expired" ([`client_deadline`]): nothing to pull, as Google's clients take
/// their DEADLINE_EXCEEDED. A message the service handed out just as the
/// pull was cut off comes back once the subscription's ack deadline passes.
/// A network that stalls for the whole deadline looks the same, and ends a
/// pass as if drained (what it left stays in the DLQ); on the emulator,
/// whose pulls return at once, it is an error, which is retried.
const PULL_DEADLINE: Duration = Duration::from_secs(5);
/// The server-side deadline of a publish or a topic lookup.
const RPC_DEADLINE: Duration = Duration::from_secs(30);
/// A pull response may carry many large messages.
const PULL_DECODE_LIMIT: usize = 256 * 1024 * 1024;
/// How long peek and count keep what they pulled hidden (they release it at once).
const BROWSE_HOLD_SECS: i32 = 60;

/// How long a failed lookup of a dead-letter source subscription stands.
const SOURCE_LOOKUP_RETRY: Duration = Duration::from_secs(60);

/// A source subscription's topic, and until when a failed lookup (None: it
/// no longer exists, or could not be read) stands.
type SourceTopic = (Option<String>, Option<std::time::Instant>);

/// Attributes Pub/Sub adds when it dead-letters a message.
pub const DEAD_LETTER_PREFIX: &str = "CloudPubSubDeadLetter";
pub const ATTR_SOURCE_SUBSCRIPTION: &str = "CloudPubSubDeadLetterSourceSubscription";
pub const ATTR_SOURCE_PROJECT: &str = "CloudPubSubDeadLetterSourceSubscriptionProject";
pub const ATTR_DELIVERY_COUNT: &str = "CloudPubSubDeadLetterSourceDeliveryCount";
pub const ATTR_SOURCE_PUBLISH_TIME: &str = "CloudPubSubDeadLetterSourceTopicPublishTime";
/// The [`DlqMessage::properties`] key holding the failing subscription's short name.
pub const PROP_SOURCE_SUBSCRIPTION: &str = "source_subscription";
/// The topic of the subscription the message failed in, when it could be
/// looked up: where a copy may carry the targeting attribute.
pub const PROP_SOURCE_TOPIC: &str = "source_topic";

const MONITORING: &str = "monitoring.googleapis.com";
const METRIC_UNDELIVERED: &str = "pubsub.googleapis.com/subscription/num_undelivered_messages";
const METRIC_OLDEST_AGE: &str = "pubsub.googleapis.com/subscription/oldest_unacked_message_age";
const MONITORING_SCOPES: [&str; 1] = ["https://www.googleapis.com/auth/monitoring.read"];

pub struct PubSubBackend {
    queue_name: String,
    project: String,
    /// `projects/P/subscriptions/S`.
    subscription: String,
    /// The emulator's `host:port`, or Pub/Sub's domain: named in errors.
    endpoint: String,
    /// Cloud Monitoring's host (`stats` on GCP).
    monitoring: String,
    emulator: bool,
    /// The endpoint's channels, shared with every queue on the same endpoint.
    conns: Arc<Conns>,
    reason_attribute: String,
    description_attribute: String,
    /// The config's `source`, as a topic name.
    config_source: Option<String>,
    target_attribute: Option<String>,
    /// Failing subscription → its topic.
    source_topics: Mutex<HashMap<String, SourceTopic>>,
    /// The DLQ subscription's topic, as `connect` found it.
    dlq_topic: String,
    /// The single subscription whose dead-letter policy points at this DLQ's topic.
    listed_source: OnceCell<Option<String>>,
    /// `config_source`, when a pass's `connect` found that it exists: the
    /// pass's plan takes it instead of asking again (once; a later plan asks).
    source_checked: std::sync::Mutex<Option<String>>,
    warned_hold: AtomicBool,
    /// Leased ack IDs whose deadline change has not been answered yet.
    pending_holds: PendingHolds,
    /// The subscription has message ordering on: a key's later messages wait
    /// until its earlier ones are acked.
    ordered_delivery: bool,
}

/// The gRPC channels (and the Cloud Monitoring token) of one endpoint: the
/// emulator's `host:port`, or Google's with Application Default Credentials.
/// Nothing in them depends on the project or the subscription, so every queue
/// on the endpoint shares them.
struct Conns {
    subc: Subscriber,
    /// Publishes and pulls go through the generated clients on this pool:
    /// gcloud-pubsub keeps its own publisher client private to its background
    /// publisher, and a pull needs a server-side deadline.
    rpc_pool: Pool,
    monitoring_token: OnceCell<Arc<dyn TokenSource>>,
}

/// The deadline changes sent for leases that have already returned, by ack
/// ID, until each is answered. A settle or a release of those ack IDs waits
/// for the answer first, so that it cannot be overtaken by the change.
/// Kept by a 64-bit digest of the ack ID (they are about 150 bytes, and a
/// copy of each was kept): two IDs sharing a digest only make a settle wait
/// for the other's change too.
#[derive(Default, Clone)]
struct PendingHolds {
    by_ack_id: Arc<std::sync::Mutex<HashMap<u64, watch::Receiver<bool>, foldhash::fast::RandomState>>>,
    digests: foldhash::fast::RandomState,
}

/// One deadline change on its way, of the ack IDs it holds. Dropping it (once
/// the change is answered or has failed, or if its task ends early) forgets
/// its ack IDs and lets whoever waits for them go on.
struct Hold {
    pending: PendingHolds,
    /// Of the ack IDs it holds (the IDs themselves go into the request).
    digests: Vec<u64>,
    answered: watch::Sender<bool>,
    /// Tells this hold's entries from a later hold's of the same ack ID.
    entry: watch::Receiver<bool>,
}

impl PendingHolds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, watch::Receiver<bool>, foldhash::fast::RandomState>> {
        self.by_ack_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn digest(&self, ack_id: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.digests.hash_one(ack_id)
    }

    /// Records a deadline change of `ack_ids` as sent and not yet answered.
    fn start(&self, ack_ids: &[String]) -> Hold {
        let (answered, entry) = watch::channel(false);
        let digests: Vec<u64> = ack_ids.iter().map(|id| self.digest(id)).collect();
        let mut pending = self.lock();
        for &digest in &digests {
            pending.insert(digest, entry.clone());
        }
        drop(pending);
        Hold {
            pending: self.clone(),
            digests,
            answered,
            entry,
        }
    }

    /// Waits until the deadline changes of every lease in `leases` have been
    /// answered (at once for leases with none pending).
    async fn answered(&self, leases: &[LeaseId]) {
        let mut waits: Vec<watch::Receiver<bool>> = Vec::new();
        {
            let pending = self.lock();
            if pending.is_empty() {
                return;
            }
            for l in leases {
                if let Some(rx) = pending.get(&self.digest(&l.0))
                    && !waits.iter().any(|w| w.same_channel(rx))
                {
                    waits.push(rx.clone());
                }
            }
        }
        for mut rx in waits {
            // An error means the hold is gone, which is an answer too.
            let _ = rx.wait_for(|answered| *answered).await;
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut pending = self.pending.lock();
        for digest in &self.digests {
            // A later lease of the same message (its hold ran out) has its
            // own entry: leave that one.
            if pending.get(digest).is_some_and(|r| r.same_channel(&self.entry)) {
                pending.remove(digest);
            }
        }
        drop(pending);
        self.answered.send_replace(true);
    }
}

/// Where a queue's channels go: an emulator, or a GCP API host (the global
/// one, or a locational endpoint).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Emulator(String),
    Google(String),
}

/// Pub/Sub channels shared between queues, one set per target.
#[derive(Default)]
pub struct Clients {
    by_endpoint: Mutex<HashMap<Target, SharedConns>>,
}

/// Filled once, by the first queue that needs the endpoint.
type SharedConns = Arc<OnceCell<Arc<Conns>>>;

impl Clients {
    async fn get(&self, target: &Target) -> Result<Arc<Conns>> {
        let cell = self.by_endpoint.lock().await.entry(target.clone()).or_default().clone();
        cell.get_or_try_init(|| Conns::open(target)).await.cloned()
    }
}

impl Conns {
    /// Open the channels; a stopped emulator is reported here, within the
    /// 3 s connect timeout.
    async fn open(target: &Target) -> Result<Arc<Self>> {
        let (dialer, endpoint, pool) = match target {
            Target::Emulator(h) => (Dialer::emulator(h)?, h, 1),
            Target::Google(host) => {
                // The token's audience is the service's, whichever host serves it.
                let provider =
                    DefaultTokenSourceProvider::new(AuthConfig::default().with_audience(AUDIENCE).with_scopes(&SCOPES))
                        .await
                        .map_err(|e| BackendError::Auth {
                            provider: PROVIDER,
                            detail: format!("no Application Default Credentials: {e}"),
                        })?;
                let tokens = provider.token_source();
                (Dialer::google(host, tokens)?, host, 2)
            }
        };
        let open = |size: usize| {
            let dialer = &dialer;
            async move { dialer.open(size).await.map_err(|e| connect_error(endpoint, e)) }
        };
        // Concurrently: each channel is a TCP (and on Google's endpoint a TLS)
        // handshake, round trips a redrive would otherwise wait for in turn.
        // Acks and deadline changes have a pool of their own, so that they
        // never queue behind pulls of large bodies on one connection.
        let (rpc_pool, sub_pool) = tokio::try_join!(open(pool), open(pool))?;
        Ok(Arc::new(Self {
            subc: Subscriber(Arc::new(sub_pool)),
            rpc_pool,
            monitoring_token: OnceCell::new(),
        }))
    }
}

/// The subscriber calls other than Pull, on their own pool, each with a
/// deadline and retried as gcloud-pubsub's own client retries them (gax's
/// default: UNAVAILABLE, UNKNOWN and ABORTED, five tries).
#[derive(Clone)]
struct Subscriber(Arc<Pool>);

impl Subscriber {
    async fn call<T, F, Fut>(&self, call: F) -> std::result::Result<T, Status>
    where
        F: Fn(RawSubscriberClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        invoke(None::<RetrySetting>, || async {
            call(RawSubscriberClient::new(self.0.conn())).await.map_transient_err()
        })
        .await
    }

    async fn get_subscription(&self, subscription: &str) -> std::result::Result<Subscription, Status> {
        self.call(|mut c| async move {
            let req = GetSubscriptionRequest {
                subscription: subscription.to_string(),
            };
            let request = routed(req, "subscription", subscription, RPC_DEADLINE);
            c.get_subscription(request).await.map(|r| r.into_inner())
        })
        .await
    }

    /// Every subscription of `project` (a full name), page by page.
    async fn list_subscriptions(&self, project: &str) -> std::result::Result<Vec<Subscription>, Status> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .call(|mut c| {
                    let req = ListSubscriptionsRequest {
                        project: project.to_string(),
                        page_size: 1000,
                        page_token: page_token.clone(),
                    };
                    async move {
                        let request = routed(req, "project", project, RPC_DEADLINE);
                        c.list_subscriptions(request).await.map(|r| r.into_inner())
                    }
                })
                .await?;
            all.extend(page.subscriptions);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    async fn modify_ack_deadline(&self, req: ModifyAckDeadlineRequest) -> std::result::Result<(), Status> {
        self.call_shared(MODIFY_ACK_DEADLINE, Shared::new(req), |r| &r.subscription)
            .await
    }

    async fn acknowledge(&self, req: AcknowledgeRequest) -> std::result::Result<(), Status> {
        self.call_shared(ACKNOWLEDGE, Shared::new(req), |r| &r.subscription)
            .await
    }

    /// [`Subscriber::call`] of `method` with one request for every try.
    async fn call_shared<M, R>(
        &self,
        rpc: Rpc,
        req: Shared<M>,
        routing: impl Fn(&M) -> &str,
    ) -> std::result::Result<R, Status>
    where
        M: prost::Message + Default + Clone + 'static,
        R: prost::Message + Default + 'static,
    {
        invoke(None::<RetrySetting>, || async {
            let request = routed(req.clone(), "subscription", routing(&req.0), RPC_DEADLINE);
            unary(self.0.conn(), rpc, request, None).await.map_transient_err()
        })
        .await
    }
}

/// A gRPC method, named as the generated clients name it.
#[derive(Clone, Copy)]
struct Rpc {
    service: &'static str,
    method: &'static str,
    path: &'static str,
}

const PUBLISH: Rpc = Rpc {
    service: "google.pubsub.v1.Publisher",
    method: "Publish",
    path: "/google.pubsub.v1.Publisher/Publish",
};
const MODIFY_ACK_DEADLINE: Rpc = Rpc {
    service: "google.pubsub.v1.Subscriber",
    method: "ModifyAckDeadline",
    path: "/google.pubsub.v1.Subscriber/ModifyAckDeadline",
};
const ACKNOWLEDGE: Rpc = Rpc {
    service: "google.pubsub.v1.Subscriber",
    method: "Acknowledge",
    path: "/google.pubsub.v1.Subscriber/Acknowledge",
};

/// A request message behind an `Arc`, encoded from where it lies: a call
/// tried again (gax's retries, or a Publish's own) sends the same request
/// without copying its ack IDs or its messages' attributes once per try.
#[derive(Debug)]
struct Shared<M>(Arc<M>);

impl<M> Shared<M> {
    fn new(message: M) -> Self {
        Self(Arc::new(message))
    }
}

impl<M> Clone for Shared<M> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<M: Default> Default for Shared<M> {
    fn default() -> Self {
        Self::new(M::default())
    }
}

impl<M: prost::Message + Default + Clone> prost::Message for Shared<M> {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        self.0.encode_raw(buf)
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> std::result::Result<(), prost::DecodeError> {
        // Requests are only ever encoded; decoding into a shared one would
        // copy it first rather than change the other holders' request.
        Arc::make_mut(&mut self.0).merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.encoded_len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// One unary call of `rpc` with a [`Shared`] request, made as the generated
/// clients make theirs (the same path and method extension).
/// `max_message`: the largest request and answer, when over tonic's 4 MB.
async fn unary<M, R>(
    channel: Channel,
    rpc: Rpc,
    mut request: Request<Shared<M>>,
    max_message: Option<usize>,
) -> std::result::Result<R, Status>
where
    M: prost::Message + Default + Clone + 'static,
    R: prost::Message + Default + 'static,
{
    use gcloud_gax::grpc::codegen::http::uri::PathAndQuery;
    let mut grpc = gcloud_gax::grpc::client::Grpc::new(channel);
    if let Some(max) = max_message {
        grpc = grpc.max_encoding_message_size(max).max_decoding_message_size(max);
    }
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))?;
    request
        .extensions_mut()
        .insert(gcloud_gax::grpc::GrpcMethod::new(rpc.service, rpc.method));
    let path = PathAndQuery::from_static(rpc.path);
    grpc.unary(request, path, tonic_prost::ProstCodec::<Shared<M>, R>::default())
        .await
        .map(gcloud_gax::grpc::Response::into_inner)
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `projects/P/<kind>/N` from a short name or a full one.
fn full_name(project: &str, kind: &str, name: &str) -> Result<String> {
    if let Some(rest) = name.strip_prefix("projects/") {
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() == 3 && !parts[0].is_empty() && parts[1] == kind && !parts[2].is_empty() {
            return Ok(name.to_string());
        }
        return Err(BackendError::Invalid(format!(
            "`{name}` is not a Pub/Sub {kind} name: expected `projects/PROJECT/{kind}/NAME` or a short name"
        )));
    }
    if name.is_empty() || name.contains('/') {
        return Err(BackendError::Invalid(format!(
            "`{name}` is not a Pub/Sub {kind} name: expected `projects/PROJECT/{kind}/NAME` or a short name"
        )));
    }
    Ok(format!("projects/{project}/{kind}/{name}"))
}

/// The last segment of a resource name.
fn short_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn connect_error(endpoint: &str, e: impl std::error::Error + 'static) -> BackendError {
    // "transport error" says little; the innermost cause says
    // what happened (connection refused, DNS, TLS).
    BackendError::unreachable(endpoint, super::with_root_cause(&e))
}

impl PubSubBackend {
    pub async fn connect(
        name: &str,
        cfg: &PubSubQueueConfig,
        queue: &QueueConfig,
        clients: &Clients,
        purpose: Purpose,
    ) -> Result<Self> {
        if cfg.project.trim().is_empty() {
            return Err(BackendError::Invalid(format!(
                "queue {name}: pubsub.project must not be empty"
            )));
        }
        let subscription = full_name(&cfg.project, "subscriptions", &cfg.subscription)?;
        let emulator_host = cfg
            .emulator_host
            .clone()
            .filter(|h| !h.trim().is_empty())
            .or_else(|| non_empty_env("PUBSUB_EMULATOR_HOST"))
            .map(|h| h.trim().to_string());
        let target = match &emulator_host {
            Some(h) => Target::Emulator(h.clone()),
            None => Target::Google(cfg.endpoint.clone().unwrap_or_else(|| PUBSUB.to_string())),
        };
        let (endpoint, emulator) = match &target {
            Target::Emulator(h) => (h.clone(), true),
            Target::Google(host) => (host.clone(), false),
        };
        tracing::debug!(queue = name, %endpoint, "connecting to Pub/Sub");
        let conns = clients.get(&target).await?;
        tracing::debug!("gRPC channels open");
        let config_source = match &queue.source {
            Some(s) => Some(full_name(&cfg.project, "topics", s)?),
            None => None,
        };
        let mut backend = Self {
            queue_name: name.to_string(),
            project: cfg.project.clone(),
            subscription,
            endpoint,
            emulator,
            monitoring: cfg
                .monitoring_endpoint
                .clone()
                .unwrap_or_else(|| MONITORING.to_string()),
            conns,
            reason_attribute: queue.reason_attribute.clone(),
            description_attribute: queue.description_attribute.clone(),
            config_source,
            target_attribute: cfg.target_subscription_attribute.clone().filter(|a| !a.is_empty()),
            source_topics: Mutex::new(HashMap::new()),
            dlq_topic: String::new(),
            listed_source: OnceCell::new(),
            source_checked: std::sync::Mutex::new(None),
            warned_hold: AtomicBool::new(false),
            pending_holds: PendingHolds::default(),
            ordered_delivery: false,
        };
        // Fail now, with a clear error, if the DLQ subscription does not exist.
        // A pass's plan checks the configured source topic next: checking it
        // alongside spares the pass a round trip before its first pull. Its
        // failure is left for the plan to report, as it would without this.
        let subscription = backend.conns.subc.get_subscription(&backend.subscription);
        let source_checked = async {
            let topic = backend.config_source.as_deref().filter(|_| purpose == Purpose::Pass)?;
            backend.check_topic(topic).await.ok().map(|()| topic.to_string())
        };
        let (sub, source_checked) = tokio::join!(subscription, source_checked);
        tracing::debug!("DLQ subscription checked");
        let sub = sub.map_err(|s| backend.error(s, &backend.subscription))?;
        backend.ordered_delivery = sub.enable_message_ordering;
        backend.dlq_topic = sub.topic;
        *backend.source_checked.get_mut().expect("source_checked lock") = source_checked;
        Ok(backend)
    }

    /// Whether `topic` (a full name) exists.
    async fn check_topic(&self, topic: &str) -> Result<()> {
        self.publisher()
            .get_topic(routed(
                GetTopicRequest {
                    topic: topic.to_string(),
                },
                "topic",
                topic,
                RPC_DEADLINE,
            ))
            .await
            .map(drop)
            .map_err(|s| self.error(s, topic))
    }

    /// The DLQ subscription, `projects/P/subscriptions/S`.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// Whether this backend talks to an emulator (and so counts exactly).
    pub fn is_emulator(&self) -> bool {
        self.emulator
    }

    fn error(&self, status: Status, resource: &str) -> BackendError {
        classify(status, &self.endpoint, resource)
    }

    /// One unary Pull: `return_immediately` on the emulator, a server-side
    /// deadline always. Never cancelled from this side.
    async fn pull(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        #[allow(deprecated)]
        let req = PullRequest {
            subscription: self.subscription.clone(),
            return_immediately: self.emulator,
            max_messages: max.clamp(1, COUNT_PULL) as i32,
        };
        let request = routed(req, "subscription", &self.subscription, PULL_DEADLINE);
        let mut client =
            RawSubscriberClient::new(self.conns.rpc_pool.conn()).max_decoding_message_size(PULL_DECODE_LIMIT);
        match client.pull(request).await {
            Ok(r) => Ok(r.into_inner().received_messages),
            // The deadline passed with nothing to deliver. Not on the
            // emulator, whose pulls return at once: there a pull that
            // outlives its deadline is a stall (a network that stopped
            // answering), which must not read as a drained subscription.
            Err(s) if !self.emulator && (s.code() == Code::DeadlineExceeded || client_deadline(&s)) => Ok(Vec::new()),
            Err(s) => Err(self.error(s, &self.subscription)),
        }
    }

    fn publisher(&self) -> RawPublisherClient<Channel> {
        RawPublisherClient::new(self.conns.rpc_pool.conn())
    }

    /// One Publish, retried (with the same messages) while the service is
    /// briefly unavailable, busy or throttling ([`publish_retryable`]). A
    /// retry after a lost answer can duplicate copies, never lose them.
    async fn publish(&self, req: PublishRequest) -> Result<Vec<String>, Status> {
        let req = Shared::new(req);
        let mut attempt = 0;
        loop {
            let request = routed(req.clone(), "topic", &req.0.topic, RPC_DEADLINE);
            let answer: Result<PublishResponse, Status> = unary(
                self.conns.rpc_pool.conn(),
                PUBLISH,
                request,
                Some(2 * MAX_PUBLISH_BYTES),
            )
            .await;
            // Throttling (a publisher quota, a hot ordering key) takes
            // longer to pass than a blip: about 25 s of backoff before the
            // copies count as failed, as Google's publishers wait it out.
            let attempts = if throttled(&answer) { 7 } else { 3 };
            match answer {
                Ok(r) => return Ok(r.message_ids),
                Err(s) if publish_retryable(s.code()) && attempt < attempts => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis((100 << attempt).min(10_000))).await;
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// Set the ack deadline of leased messages to `seconds` from now (0:
    /// deliverable again at once), once the deadline change of their lease
    /// was answered: one overtaken by that change would be hidden for the
    /// whole hold.
    async fn set_deadline(&self, leases: &[LeaseId], seconds: i32) -> Result<()> {
        self.pending_holds.answered(leases).await;
        for chunk in leases.chunks(ACK_CHUNK) {
            let mut ids: Vec<String> = chunk.iter().map(|l| l.0.clone()).collect();
            for attempt in 1..=ACK_ATTEMPTS {
                let Err(s) = self.modify_deadline(ids.clone(), seconds).await else {
                    break;
                };
                // Exactly-once delivery: the IDs the error lists failed and
                // every other ID was changed, as for an Acknowledge. Those
                // it calls permanent are expired (deliverable again anyway);
                // the transient ones are asked for again.
                if let Some(failed) = exactly_once_ack_failures(&s) {
                    ids.retain(|id| {
                        failed
                            .get(id)
                            .is_some_and(|code| code.starts_with(TRANSIENT_ACK_FAILURE))
                    });
                    if ids.is_empty() {
                        break;
                    }
                    if attempt == ACK_ATTEMPTS {
                        return Err(self.error(s, &self.subscription));
                    }
                    tracing::debug!(
                        transient = ids.len(),
                        seconds,
                        attempt,
                        "a deadline change failed for a moment (exactly-once delivery); trying again"
                    );
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    continue;
                }
                // An expired or unknown ack ID (the message is deliverable
                // again anyway) can fail the whole call: the others are
                // changed one by one, so that none waits out its deadline
                // or lapses for it.
                if s.code() == Code::InvalidArgument {
                    tracing::debug!(error = %s.message(), seconds, "a deadline change included an expired lease; changing one by one");
                    for id in ids {
                        if let Err(s) = self.modify_deadline(vec![id], seconds).await
                            && s.code() != Code::InvalidArgument
                        {
                            return Err(self.error(s, &self.subscription));
                        }
                    }
                    break;
                }
                return Err(self.error(s, &self.subscription));
            }
        }
        Ok(())
    }

    async fn modify_deadline(&self, ack_ids: Vec<String>, seconds: i32) -> Result<(), Status> {
        modify_deadline(&self.conns.subc, &self.subscription, ack_ids, seconds).await
    }

    /// Sends the deadline change that holds `ack_ids` for `hold_secs`, without
    /// waiting for its answer; [`PendingHolds::answered`] waits for it.
    fn hold_in_background(&self, ack_ids: Vec<String>, hold_secs: i32) {
        let hold = self.pending_holds.start(&ack_ids);
        let subc = self.conns.subc.clone();
        let subscription = self.subscription.clone();
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            if let Err(s) = modify_deadline(&subc, &subscription, ack_ids, hold_secs).await {
                // The subscription's own ack deadline still holds them; a
                // lease that runs out before its settle comes back, as always.
                tracing::warn!(
                    subscription = %subscription,
                    messages = hold.digests.len(),
                    error = %classify(s, &endpoint, &subscription),
                    "could not extend the ack deadline of leased messages; they are held only for the subscription's own ack deadline"
                );
            }
            drop(hold);
        });
    }

    /// Pull up to `max`, hidden for `hold_secs`.
    async fn pull_and_hold(&self, max: usize, hold_secs: i32) -> Result<Vec<ReceivedMessage>> {
        let got = self.pull(max).await?;
        if got.is_empty() {
            return Ok(got);
        }
        let ids: Vec<String> = got.iter().map(|m| m.ack_id.clone()).collect();
        if let Err(s) = self.modify_deadline(ids, hold_secs).await {
            // They come back when the subscription's own ack deadline ends.
            return Err(self.error(s, &self.subscription));
        }
        Ok(got)
    }

    /// The topic of subscription `sub` (full name), looked up once; a
    /// subscription not found or not readable is looked up again only
    /// [`SOURCE_LOOKUP_RETRY`] later (not at every message: a lease of 1,000
    /// messages naming a subscription the identity cannot read made 1,000
    /// calls in a row, and a long-running `serve` never saw a subscription
    /// created again).
    async fn topic_of(&self, sub: &str) -> Option<String> {
        if let Some((t, until)) = self.source_topics.lock().await.get(sub)
            && until.is_none_or(|u| std::time::Instant::now() < u)
        {
            return t.clone();
        }
        let found = self.conns.subc.get_subscription(sub).await;
        let (topic, until) = match found {
            // A subscription whose topic was deleted names `_deleted-topic_`.
            Ok(s) => (Some(s.topic).filter(|t| t.starts_with("projects/")), None),
            Err(s) if matches!(s.code(), Code::NotFound | Code::PermissionDenied) => {
                tracing::warn!(subscription = %sub, error = %self.error(s, sub), "cannot look up the dead-letter source subscription");
                (None, Some(std::time::Instant::now() + SOURCE_LOOKUP_RETRY))
            }
            Err(s) => {
                // Not kept: a service briefly unavailable may answer the
                // next message's lookup.
                tracing::warn!(subscription = %sub, error = %self.error(s, sub), "cannot look up the dead-letter source subscription");
                return None;
            }
        };
        self.source_topics
            .lock()
            .await
            .insert(sub.to_string(), (topic.clone(), until));
        topic
    }

    async fn to_model(&self, m: Option<PubsubMessage>) -> DlqMessage {
        let (mut model, source_sub) = message_to_model(
            m.unwrap_or_default(),
            &self.project,
            &self.reason_attribute,
            &self.description_attribute,
        );
        let topic = match &source_sub {
            Some(s) => self.topic_of(s).await,
            None => None,
        };
        if let Some(t) = &topic {
            model.properties.insert(PROP_SOURCE_TOPIC.into(), t.clone());
        }
        model.source = topic.or_else(|| self.config_source.clone());
        model
    }

    /// Exact count on the emulator: pull everything, count distinct IDs,
    /// release it all.
    async fn drain_count(&self) -> Result<DlqStats> {
        let mut ids: HashSet<String> = HashSet::new();
        let mut acks: Vec<String> = Vec::new();
        let mut oldest: Option<DateTime<Utc>> = None;
        let result: Result<()> = async {
            loop {
                let got = self.pull_and_hold(COUNT_PULL, BROWSE_HOLD_SECS).await?;
                if got.is_empty() {
                    return Ok(());
                }
                for r in got {
                    acks.push(r.ack_id);
                    let Some(m) = r.message else { continue };
                    if let Some(t) = m
                        .publish_time
                        .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32))
                    {
                        oldest = Some(oldest.map_or(t, |o| o.min(t)));
                    }
                    ids.insert(m.message_id);
                }
            }
        }
        .await;
        let released = self.release(&acks.into_iter().map(LeaseId).collect::<Vec<_>>()).await;
        result?;
        released?;
        Ok(DlqStats {
            depth: ids.len() as u64,
            in_flight: None,
            oldest_age: oldest.map(|t| (Utc::now() - t).to_std().unwrap_or(Duration::ZERO)),
            exactness: Exactness::Exact,
            oldest_age_exactness: None,
        })
    }

    async fn monitoring_token(&self) -> Result<String> {
        let ts = self
            .conns
            .monitoring_token
            .get_or_try_init(|| async {
                let provider = DefaultTokenSourceProvider::new(AuthConfig::default().with_scopes(&MONITORING_SCOPES))
                    .await
                    .map_err(|e| BackendError::Auth {
                        provider: PROVIDER,
                        detail: format!("no Application Default Credentials for Cloud Monitoring: {e}"),
                    })?;
                Ok::<_, BackendError>(provider.token_source())
            })
            .await?;
        ts.token().await.map_err(|e| BackendError::Auth {
            provider: PROVIDER,
            detail: format!("cannot get a Cloud Monitoring token: {e}"),
        })
    }

    /// The latest value of a subscription metric over the last 15 minutes.
    async fn latest_metric(&self, metric: &str) -> Result<Option<i64>> {
        let token = self.monitoring_token().await?;
        let (project, sub) = split_subscription(&self.subscription);
        let now = Utc::now();
        // The project too: a metrics scope's project answers for every
        // project it monitors, where a subscription of the same name often
        // lives (staging next to production).
        let filter = format!(
            r#"metric.type = "{metric}" AND resource.type = "pubsub_subscription" AND resource.labels.project_id = "{project}" AND resource.labels.subscription_id = "{sub}""#
        );
        let url = reqwest::Url::parse_with_params(
            &format!("https://{}/v3/projects/{project}/timeSeries", self.monitoring),
            &[
                ("filter", filter.as_str()),
                (
                    "interval.startTime",
                    &(now - chrono::Duration::minutes(15)).to_rfc3339(),
                ),
                ("interval.endTime", &now.to_rfc3339()),
            ],
        )
        .map_err(|e| BackendError::Invalid(format!("Cloud Monitoring URL: {e}")))?;
        let resp = super::http_client()?
            .get(url)
            .header("Authorization", token)
            .send()
            .await
            .map_err(|e| connect_error(&self.monitoring, e))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| connect_error(&self.monitoring, e))?;
        if !status.is_success() {
            let detail = format!(
                "Cloud Monitoring at {}, {metric}: HTTP {status}: {}",
                self.monitoring,
                truncate(&body, 300)
            );
            // A 404 is not the queue's: its subscription was found when it
            // connected. It is the project or the path at this host (a
            // `monitoring_endpoint` that is not Cloud Monitoring's).
            return Err(match status.as_u16() {
                401 | 403 => BackendError::Auth {
                    provider: PROVIDER,
                    detail,
                },
                _ => BackendError::Provider {
                    provider: PROVIDER,
                    detail,
                },
            });
        }
        parse_latest_point(&body).map_err(|e| BackendError::Provider {
            provider: PROVIDER,
            detail: format!("Cloud Monitoring at {}, {metric}: {e}", self.monitoring),
        })
    }

    async fn monitored_stats(&self) -> Result<DlqStats> {
        let depth = self.latest_metric(METRIC_UNDELIVERED).await?;
        let age = self.latest_metric(METRIC_OLDEST_AGE).await?;
        if depth.is_none() {
            tracing::debug!(queue = %self.queue_name, "no num_undelivered_messages point in the last 15 minutes; reporting 0");
        }
        Ok(DlqStats {
            depth: depth.unwrap_or(0).max(0) as u64,
            in_flight: None,
            oldest_age: age.filter(|a| *a > 0).map(|a| Duration::from_secs(a as u64)),
            exactness: Exactness::Lagged,
            oldest_age_exactness: None,
        })
    }

    /// The topic of the single subscription in this project whose dead-letter
    /// policy points at the DLQ subscription's topic.
    async fn listed_source(&self) -> Result<Option<String>> {
        self.listed_source
            .get_or_try_init(|| async {
                let dlq_topic = &self.dlq_topic;
                let subs = match self.conns.subc.list_subscriptions(&format!("projects/{}", self.project)).await {
                    Ok(s) => s,
                    Err(s) => {
                        tracing::info!(error = %self.error(s, &self.project), "cannot list subscriptions to find the dead-letter source");
                        return Ok(None);
                    }
                };
                let topics: HashSet<String> = subs
                    .into_iter()
                    .filter(|s| {
                        s.dead_letter_policy
                            .as_ref()
                            .is_some_and(|p| p.dead_letter_topic == *dlq_topic)
                    })
                    .map(|s| s.topic)
                    .filter(|t| t.starts_with("projects/"))
                    .collect();
                if topics.len() > 1 {
                    tracing::info!(
                        queue = %self.queue_name,
                        sources = topics.len(),
                        "several topics dead-letter here; messages without CloudPubSubDeadLetterSourceSubscription need `source` in the config or --to"
                    );
                }
                Ok(if topics.len() == 1 { topics.into_iter().next() } else { None })
            })
            .await
            .cloned()
    }

    /// The message to publish for `o` to `to`, or why it cannot be
    /// published. The targeting attribute names the subscription the message
    /// failed in only on a copy to that subscription's topic: elsewhere (a
    /// `--to` topic, the configured `source` when the subscription could not
    /// be looked up) it would match no subscription's filter, and Pub/Sub
    /// acknowledges what a filter refuses: the copy would be confirmed, its
    /// original settled, and no consumer would ever see it. One left from an
    /// earlier redrive goes too.
    fn to_pubsub(&self, o: &Outgoing, to: &Destination) -> Result<PubsubMessage, String> {
        let Some(name) = self.target_attribute.as_deref() else {
            return pubsub_message(o, None);
        };
        if o.properties.get(PROP_SOURCE_TOPIC).is_some_and(|t| *t == to.0) {
            return pubsub_message(o, Some(name));
        }
        if o.attributes.contains_key(name) {
            let mut o = o.clone();
            o.attributes.remove(name);
            return pubsub_message(&o, None);
        }
        pubsub_message(o, None)
    }
}

/// A pulled message in the model, and the full name of the subscription it
/// failed on (from the dead-letter attributes). `source` is left for the
/// caller, which looks the subscription's topic up. The message's strings
/// move into the model: a pulled message is not copied. Pure: the fuzz
/// targets call it directly.
#[doc(hidden)]
pub fn message_to_model(
    m: PubsubMessage,
    project: &str,
    reason_attribute: &str,
    description_attribute: &str,
) -> (DlqMessage, Option<String>) {
    let attr = |k: &str| m.attributes.get(k).filter(|v| !v.is_empty());
    let source_sub = attr(ATTR_SOURCE_SUBSCRIPTION).map(|sub| {
        let project = attr(ATTR_SOURCE_PROJECT).map(String::as_str).unwrap_or(project);
        if sub.starts_with("projects/") {
            sub.clone()
        } else {
            format!("projects/{project}/subscriptions/{sub}")
        }
    });
    let mut properties = Properties::new();
    if let Some(s) = &source_sub {
        properties.insert(PROP_SOURCE_SUBSCRIPTION.into(), short_name(s).to_string());
    }
    let publish_time = m
        .publish_time
        .as_ref()
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32));
    let reason = attr(reason_attribute).cloned();
    let description = attr(description_attribute).cloned();
    let delivery_count = attr(ATTR_DELIVERY_COUNT).and_then(|c| c.trim().parse().ok());
    let enqueued_at = attr(ATTR_SOURCE_PUBLISH_TIME)
        .and_then(|t| parse_time(t))
        .or(publish_time);
    let attributes: Attributes = m
        .attributes
        .into_iter()
        .map(|(k, v)| (k, Attribute::string(v)))
        .collect();
    let model = DlqMessage {
        id: m.message_id,
        reason,
        description,
        delivery_count,
        enqueued_at,
        source: None,
        ordering_key: Some(m.ordering_key).filter(|k| !k.is_empty()),
        properties,
        attributes,
        body: m.data,
    };
    (model, source_sub)
}

/// Whether a publish was refused for a quota or throughput limit.
fn throttled<T>(answer: &Result<T, Status>) -> bool {
    answer.as_ref().is_err_and(|s| s.code() == Code::ResourceExhausted)
}

/// The message to publish for `o` (with the targeting attribute `target`
/// when configured), or why it cannot be published. Pure: the fuzz targets
/// call it directly.
#[doc(hidden)]
pub fn pubsub_message(o: &Outgoing, target: Option<&str>) -> Result<PubsubMessage, String> {
    let message = unchecked_message(o, target);
    let attributes = &message.attributes;
    if o.body.is_empty() && attributes.is_empty() {
        return Err("Pub/Sub needs data or at least one attribute; this copy has neither".into());
    }
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "{} attributes; Pub/Sub allows {MAX_ATTRIBUTES}",
            attributes.len()
        ));
    }
    for (k, v) in attributes {
        if k.len() > MAX_ATTRIBUTE_KEY_BYTES {
            return Err(format!("attribute name `{k}` is over {MAX_ATTRIBUTE_KEY_BYTES} bytes"));
        }
        if reserved_attribute(k) {
            return Err(format!(
                "attribute name `{k}` starts with `goog`, which Pub/Sub reserves"
            ));
        }
        if v.len() > MAX_ATTRIBUTE_VALUE_BYTES {
            return Err(format!(
                "attribute `{k}` is {} bytes; Pub/Sub allows {MAX_ATTRIBUTE_VALUE_BYTES}",
                v.len()
            ));
        }
    }
    let size = message_size(&message);
    if size > MAX_MESSAGE_BYTES {
        return Err(format!("{size} bytes; Pub/Sub allows {MAX_MESSAGE_BYTES}"));
    }
    Ok(message)
}

/// The message `o` publishes as, with the targeting attribute `target` when
/// configured, before any of Pub/Sub's checks.
fn unchecked_message(o: &Outgoing, target: Option<&str>) -> PubsubMessage {
    let mut attributes: HashMap<String, String> = o.attributes.iter().map(|(k, a)| (k.clone(), a.as_text())).collect();
    if let (Some(name), Some(sub)) = (target, o.properties.get(PROP_SOURCE_SUBSCRIPTION)) {
        attributes.insert(name.to_string(), sub.clone());
    }
    PubsubMessage {
        data: o.body.clone(),
        attributes,
        message_id: String::new(),
        publish_time: None,
        ordering_key: o.ordering_key.clone().unwrap_or_default(),
    }
}

/// google.rpc.ErrorInfo, which gcloud-googleapis does not generate.
#[derive(Clone, PartialEq, prost::Message)]
struct ErrorInfo {
    #[prost(string, tag = "1")]
    reason: String,
    #[prost(string, tag = "2")]
    domain: String,
    #[prost(map = "string, string", tag = "3")]
    metadata: HashMap<String, String>,
}

/// The ack IDs a failed Acknowledge on an exactly-once subscription lists,
/// each with why (`PERMANENT_FAILURE_INVALID_ACK_ID`, `TRANSIENT_FAILURE_…`):
/// there the RPC fails as soon as one ack ID fails (INVALID_ARGUMENT, in
/// what Google documents), with an ErrorInfo whose metadata names the failed
/// IDs, and acknowledges the others. Read whatever the status code, as
/// Google's own clients read it. None for any other error, which answers
/// for the whole request.
fn exactly_once_ack_failures(status: &Status) -> Option<HashMap<String, String>> {
    use prost::Message as _;
    let details = gcloud_googleapis::rpc::Status::decode(status.details()).ok()?;
    details
        .details
        .iter()
        .filter(|any| any.type_url.ends_with("/google.rpc.ErrorInfo"))
        .filter_map(|any| ErrorInfo::decode(any.value.as_slice()).ok())
        .find(|info| info.reason == EXACTLY_ONCE_ACK_FAILURE)
        .map(|info| info.metadata)
}

/// Codes an Acknowledge is sent again on, besides gax's own retries: those
/// Google's clients retry acknowledgements on.
fn ack_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::DeadlineExceeded | Code::ResourceExhausted | Code::Internal | Code::Unavailable | Code::Aborted
    )
}

/// One `ModifyAckDeadline` per [`ACK_CHUNK`] ack IDs.
async fn modify_deadline(
    subc: &Subscriber,
    subscription: &str,
    mut ack_ids: Vec<String>,
    seconds: i32,
) -> Result<(), Status> {
    while !ack_ids.is_empty() {
        let rest = ack_ids.split_off(ack_ids.len().min(ACK_CHUNK));
        subc.modify_ack_deadline(ModifyAckDeadlineRequest {
            subscription: subscription.to_string(),
            ack_ids,
            ack_deadline_seconds: seconds,
        })
        .await?;
        ack_ids = rest;
    }
    Ok(())
}

/// A request for the generated clients: the routing header Pub/Sub expects,
/// and a deadline, which the server enforces and tonic too, on the client
/// (see [`PULL_DEADLINE`]).
fn routed<T>(message: T, param: &str, resource: &str, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(v) = format!("{param}={resource}").parse() {
        request.metadata_mut().insert("x-goog-request-params", v);
    }
    request.set_timeout(deadline);
    request
}

/// Whether Pub/Sub refuses `key` as an attribute name: it reserves names
/// that begin with `goog` in any case ("must not begin with 'goog'
/// (case-insensitive)", its error says), but takes the `googclient_` ones
/// Google's client libraries add for trace propagation
/// (`googclient_traceparent`), which a traced publisher's dead letters carry.
pub(crate) fn reserved_attribute(key: &str) -> bool {
    key.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("goog")) && !key.starts_with("googclient_")
}

fn message_size(m: &PubsubMessage) -> usize {
    m.data.len() + m.ordering_key.len() + m.attributes.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

/// [`message_size`] of the message `o` becomes (see [`unchecked_message`]),
/// without building it: the engine asks for nearly every copy, and building
/// the message copied every attribute once more.
#[doc(hidden)]
pub fn copy_size(o: &Outgoing, target: Option<&str>) -> usize {
    let mut size = o.body.len()
        + o.ordering_key.as_ref().map_or(0, String::len)
        + o.attributes.iter().map(|(k, a)| k.len() + a.text_len()).sum::<usize>();
    if let (Some(name), Some(sub)) = (target, o.properties.get(PROP_SOURCE_SUBSCRIPTION)) {
        // It replaces an attribute of the same name.
        size -= o.attributes.get(name).map_or(0, |a| name.len() + a.text_len());
        size += name.len() + sub.len();
    }
    size
}

/// One Publish request's worth of copies, all of one ordering key.
struct PublishChunk {
    /// Their indexes in the send.
    idx: Vec<usize>,
    messages: Vec<PubsubMessage>,
}

/// `messages` (with their indexes in the send) split into Publish requests
/// of at most 1,000 messages and 10 MB as encoded to `topic` (of `topic_len`
/// bytes), each holding one ordering key only: Pub/Sub refuses a request
/// that mixes keys, or keyed and unkeyed messages (FAILED_PRECONDITION "all
/// messages must have no ordering key or they must all have the same
/// ordering key"). One list of requests per key, in the order the keys first
/// come, each key's messages in their order.
fn publish_chunks(messages: Vec<(usize, PubsubMessage)>, topic_len: usize) -> Vec<Vec<PublishChunk>> {
    let request_size = field_size(topic_len);
    let mut keys: HashMap<String, usize> = HashMap::new();
    let mut by_key: Vec<Vec<(usize, PublishChunk)>> = Vec::new();
    for (i, m) in messages {
        let s = field_size(prost::Message::encoded_len(&m));
        let k = *keys.entry(m.ordering_key.clone()).or_insert_with(|| {
            by_key.push(Vec::new());
            by_key.len() - 1
        });
        match by_key[k].last_mut() {
            Some((size, c)) if c.messages.len() < MAX_PUBLISH_MESSAGES && *size + s <= MAX_PUBLISH_BYTES => {
                c.idx.push(i);
                c.messages.push(m);
                *size += s;
            }
            _ => by_key[k].push((
                request_size + s,
                PublishChunk {
                    idx: vec![i],
                    messages: vec![m],
                },
            )),
        }
    }
    by_key
        .into_iter()
        .map(|chunks| chunks.into_iter().map(|(_, c)| c).collect())
        .collect()
}

/// Publish errors worth the same request again: those Google's clients retry
/// a Publish on (quota and throughput limits answer RESOURCE_EXHAUSTED; a
/// passing server fault INTERNAL, UNKNOWN or ABORTED), except
/// DEADLINE_EXCEEDED and CANCELLED, which after the request's own 30 s
/// deadline mean an endpoint too slow to wait on again.
fn publish_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::ResourceExhausted | Code::Internal | Code::Unknown | Code::Aborted
    )
}

/// The bytes a length-delimited protobuf field of `len` bytes takes in its
/// message (tag, length, content): Pub/Sub's 10 MB limit is on the encoded
/// PublishRequest, where each attribute and message carries such framing
/// (Google's clients measure a batch the same way).
fn field_size(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// `projects/P/subscriptions/S` → (P, S).
fn split_subscription(full: &str) -> (&str, &str) {
    let mut parts = full.split('/');
    let project = parts.nth(1).unwrap_or_default();
    let sub = parts.nth(1).unwrap_or_default();
    (project, sub)
}

/// `CloudPubSubDeadLetterSourceTopicPublishTime`: RFC 3339 on Pub/Sub; epoch
/// milliseconds are accepted too.
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    text.parse::<i64>()
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
}

/// The value of the newest point in a `timeSeries.list` response (Cloud
/// Monitoring lists points newest first), or None when there is none.
fn parse_latest_point(body: &str) -> Result<Option<i64>, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("unreadable response: {e}"))?;
    let mut newest: Option<(String, i64)> = None;
    for series in v["timeSeries"].as_array().into_iter().flatten() {
        let Some(point) = series["points"].as_array().and_then(|p| p.first()) else {
            continue;
        };
        let end = point["interval"]["endTime"].as_str().unwrap_or_default().to_string();
        let value = &point["value"];
        let n = value["int64Value"]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .or_else(|| value["int64Value"].as_i64())
            .or_else(|| value["doubleValue"].as_f64().map(|f| f as i64));
        if let Some(n) = n
            && newest.as_ref().is_none_or(|(t, _)| end > *t)
        {
            newest = Some((end, n));
        }
    }
    Ok(newest.map(|(_, n)| n))
}

/// Whether `status` is tonic's own end of a call whose deadline passed
/// (it sends the deadline, and enforces it on the client): a cancel, where
/// gRPC's core library reports DEADLINE_EXCEEDED.
fn client_deadline(status: &Status) -> bool {
    status.code() == Code::Cancelled && status.message() == tonic::TimeoutExpired(()).to_string()
}

fn classify(status: Status, endpoint: &str, resource: &str) -> BackendError {
    let detail = if client_deadline(&status) {
        "DeadlineExceeded: no answer before the call's deadline".to_string()
    } else {
        format!("{:?}: {}", status.code(), status.message())
    };
    match status.code() {
        Code::NotFound => BackendError::NotFound {
            queue: resource.to_string(),
            detail,
        },
        Code::Unauthenticated => BackendError::Auth {
            provider: PROVIDER,
            detail: format!("{detail} (on {resource})"),
        },
        // The credentials were taken; a permission is missing, most often
        // `pubsub.subscriptions.get`, which roles/pubsub.subscriber lacks.
        Code::PermissionDenied => BackendError::Auth {
            provider: PROVIDER,
            detail: format!(
                "the identity lacks a permission on {resource}: {} (the README's Pub/Sub IAM section lists the roles: \
                 subscriber on the DLQ subscription, viewer on its project, publisher on the topics copies go to)",
                status.message()
            ),
        },
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => BackendError::Unreachable {
            endpoint: endpoint.to_string(),
            detail,
        },
        _ => BackendError::Provider {
            provider: PROVIDER,
            detail: format!("{detail} (on {resource})"),
        },
    }
}

#[async_trait]
impl QueueBackend for PubSubBackend {
    fn kind(&self) -> &'static str {
        "pubsub"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            true_peek: false,
            binary_body: true,
            // An empty body is fine as long as the message has an attribute,
            // and every copy carries the redrive marks.
            empty_body: true,
            max_body_bytes: MAX_MESSAGE_BYTES,
            typed_attributes: false,
            // One slot is kept for the targeted-redrive attribute.
            max_attributes: Some(MAX_ATTRIBUTES - usize::from(self.target_attribute.is_some())),
            batch_size: BATCH,
            // A pull is a round trip per lease (its deadline change goes on
            // behind it), and a pull brings fewer than it asks for whenever the service
            // likes (the emulator at most 100): leases hide the round trips
            // only in numbers.
            max_lease_size: COUNT_PULL,
            max_concurrent_leases: 16,
            max_release_size: COUNT_PULL,
            ordered_delivery: self.ordered_delivery,
            fixed_hold: None,
            max_hold: Some(Duration::from_secs(MAX_ACK_DEADLINE_SECS)),
        }
    }

    fn is_dead_letter_attribute(&self, name: &str) -> bool {
        name.starts_with(DEAD_LETTER_PREFIX)
    }

    fn fits(&self, _to: &Destination, o: &Outgoing) -> bool {
        copy_size(o, self.target_attribute.as_deref()) <= MAX_MESSAGE_BYTES
    }

    async fn stats(&self) -> Result<DlqStats> {
        if self.emulator {
            self.drain_count().await
        } else {
            self.monitored_stats().await
        }
    }

    async fn peek_each(&self, max: usize, visit: &mut (dyn FnMut(DlqMessage) -> bool + Send)) -> Result<usize> {
        let mut read = 0;
        let mut seen = HashSet::new();
        let mut acks = Vec::new();
        let mut last = None;
        let result: Result<()> = async {
            while read < max {
                let page = super::peek_page(last, BATCH).min(max - read);
                let got = self.pull_and_hold(page, BROWSE_HOLD_SECS).await?;
                if got.is_empty() {
                    return Ok(());
                }
                let bytes = got
                    .iter()
                    .filter_map(|r| r.message.as_ref())
                    .map(|m| m.data.len())
                    .sum();
                last = Some((bytes, got.len()));
                // All of them, before any is visited: a visitor that stops
                // early leaves the rest of the pull to the release below.
                acks.extend(got.iter().map(|r| LeaseId(r.ack_id.clone())));
                for r in got {
                    let m = self.to_model(r.message).await;
                    if read >= max || !seen.insert(m.id.clone()) {
                        continue;
                    }
                    read += 1;
                    if !visit(m) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
        .await;
        let released = self.release(&acks).await;
        result?;
        released?;
        Ok(read)
    }

    async fn lease(&self, max: usize, hold: Duration) -> Result<Vec<Leased>> {
        if hold.as_secs() > MAX_ACK_DEADLINE_SECS && !self.warned_hold.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                queue = %self.queue_name,
                hold = ?hold,
                "Pub/Sub ack deadlines end at 600 s: leases are held for 600 s at a time, and a pass that runs longer extends what it holds every 200 s"
            );
        }
        let secs = hold.as_secs().clamp(1, MAX_ACK_DEADLINE_SECS) as i32;
        let got = self.pull(max.min(COUNT_PULL)).await?;
        if !got.is_empty() {
            self.hold_in_background(got.iter().map(|m| m.ack_id.clone()).collect(), secs);
        }
        let mut out = Vec::with_capacity(got.len());
        for r in got {
            out.push(Leased {
                message: self.to_model(r.message).await,
                lease: LeaseId(r.ack_id),
            });
        }
        Ok(out)
    }

    async fn send(&self, to: &Destination, msgs: &[Outgoing]) -> Result<Vec<SendResult>> {
        use futures::StreamExt as _;
        let mut results: Vec<Option<SendResult>> = vec![None; msgs.len()];
        let mut prepared = Vec::with_capacity(msgs.len());
        for (i, o) in msgs.iter().enumerate() {
            match self.to_pubsub(o, to) {
                Ok(m) => prepared.push((i, m)),
                Err(error) => results[i] = Some(SendResult::Failed { error }),
            }
        }
        // A copy refused here stops the later ones of its ordering key.
        let order = OrderGate::new(msgs, &results);
        prepared.retain(|(i, _)| order.admit(*i, &mut results));
        // Each ordering key's requests go one after another, in order; the
        // keys go side by side.
        let answers: Vec<Vec<(Vec<usize>, Option<Result<Vec<String>, Status>>)>> =
            futures::stream::iter(publish_chunks(prepared, to.0.len()))
                .map(|chunks| async move {
                    let mut answers = Vec::with_capacity(chunks.len());
                    let mut failed = false;
                    for chunk in chunks {
                        if failed {
                            // Published after a failed request of its key, it
                            // would arrive ahead of the copies that failed.
                            answers.push((chunk.idx, None));
                            continue;
                        }
                        let n = chunk.messages.len();
                        let req = PublishRequest {
                            topic: to.0.clone(),
                            messages: chunk.messages,
                        };
                        let answer = self.publish(req).await;
                        failed = answer.as_ref().map_or(true, |ids| ids.len() != n);
                        answers.push((chunk.idx, Some(answer)));
                    }
                    answers
                })
                .buffer_unordered(PUBLISH_CONCURRENCY)
                .collect()
                .await;
        let mut every_send_fails = None;
        for (idx, answer) in answers.into_iter().flatten() {
            let error = match answer {
                Some(Ok(ids)) if ids.len() == idx.len() => {
                    for (i, id) in idx.into_iter().zip(ids) {
                        results[i] = Some(SendResult::Sent { dest_id: id });
                    }
                    continue;
                }
                Some(Ok(ids)) => format!("Pub/Sub returned {} message IDs for {} messages", ids.len(), idx.len()),
                Some(Err(status)) => {
                    let err = self.error(status, &to.0);
                    // A wrong destination fails every message the same way.
                    if fails_every_send(&err) {
                        every_send_fails = Some(err);
                        continue;
                    }
                    err.to_string()
                }
                None => "not sent: an earlier publish of its ordering key failed".into(),
            };
            for i in idx {
                results[i] = Some(SendResult::Failed { error: error.clone() });
            }
        }
        if let Some(err) = every_send_fails {
            return abandon_send(results, err);
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or(SendResult::Failed {
                    error: "Pub/Sub did not report on this message".into(),
                })
            })
            .collect())
    }

    async fn settle(&self, leases: &[LeaseId]) -> Result<Vec<SettleResult>> {
        self.pending_holds.answered(leases).await;
        let mut results = vec![SettleResult::Settled; leases.len()];
        for (c, chunk) in leases.chunks(ACK_CHUNK).enumerate() {
            // Indexes into `results` of the acks still to be answered.
            let mut pending: Vec<usize> = (c * ACK_CHUNK..c * ACK_CHUNK + chunk.len()).collect();
            for attempt in 1..=ACK_ATTEMPTS {
                let req = AcknowledgeRequest {
                    subscription: self.subscription.clone(),
                    ack_ids: pending.iter().map(|&i| leases[i].0.clone()).collect(),
                };
                let Err(status) = self.conns.subc.acknowledge(req).await else {
                    break;
                };
                let Some(failed) = exactly_once_ack_failures(&status) else {
                    // What gax's retries leave (they retry UNAVAILABLE,
                    // UNKNOWN and ABORTED) but Google's clients retry an
                    // Acknowledge on: an ack that failed so has its copy out
                    // already, and without the journal a later run would send
                    // it again. Acknowledging twice is harmless.
                    if ack_retryable(status.code()) && attempt < ACK_ATTEMPTS {
                        tracing::debug!(code = ?status.code(), attempt, "acknowledge failed; trying again");
                        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        continue;
                    }
                    let error = self.error(status, &self.subscription).to_string();
                    for &i in &pending {
                        results[i] = SettleResult::Failed { error: error.clone() };
                    }
                    break;
                };
                // Exactly-once delivery: the IDs the error lists failed, and
                // every other ID of the request was acknowledged.
                let mut transient = Vec::new();
                for &i in &pending {
                    let Some(code) = failed.get(&leases[i].0) else { continue };
                    if code.starts_with(TRANSIENT_ACK_FAILURE) && attempt < ACK_ATTEMPTS {
                        transient.push(i);
                    } else {
                        results[i] = SettleResult::Failed {
                            error: format!("Pub/Sub did not acknowledge it: {code} (exactly-once delivery)"),
                        };
                    }
                }
                if transient.is_empty() {
                    break;
                }
                pending = transient;
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
        Ok(results)
    }

    async fn release(&self, leases: &[LeaseId]) -> Result<()> {
        self.set_deadline(leases, 0).await
    }

    async fn extend(&self, leases: &[LeaseId], hold: Duration) -> Result<()> {
        self.set_deadline(leases, hold.as_secs().clamp(1, MAX_ACK_DEADLINE_SECS) as i32)
            .await
    }

    async fn default_source(&self) -> Result<Option<Destination>> {
        Ok(self.listed_source().await?.map(Destination))
    }

    fn unresolved_source(&self, m: &DlqMessage) -> Option<String> {
        let sub = m.properties.get(PROP_SOURCE_SUBSCRIPTION)?;
        m.source.is_none().then(|| {
            format!(
                "its source subscription {sub} (CloudPubSubDeadLetterSourceSubscription) was not found or could not be read, so its topic is unknown"
            )
        })
    }

    async fn resolve_destination(&self, name: &str) -> Result<Destination> {
        let topic = full_name(&self.project, "topics", name.trim())?;
        let checked = self
            .source_checked
            .lock()
            .expect("source_checked lock")
            .take_if(|t| *t == topic)
            .is_some();
        if !checked {
            self.check_topic(&topic).await?;
        }
        Ok(Destination(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pub/Sub holds a pull open while the subscription is empty: the call
    /// ends at its deadline, on the client (tonic enforces it there), and
    /// that is an empty pull, not "cannot reach". Here an HTTP/2 server
    /// that takes calls and never answers stands in for it.
    #[tokio::test]
    async fn a_pull_that_outlives_its_deadline_is_told_as_such() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let mut unanswered = Vec::new();
            while let Some(Ok(call)) = conn.accept().await {
                unanswered.push(call);
            }
        });
        let pool = Dialer::emulator(&addr.to_string()).unwrap().open(1).await.unwrap();
        let subscription = "projects/p/subscriptions/s";
        #[allow(deprecated)]
        let req = PullRequest {
            subscription: subscription.into(),
            return_immediately: false,
            max_messages: 1,
        };
        let request = routed(req, "subscription", subscription, Duration::from_millis(300));
        let status = RawSubscriberClient::new(pool.conn()).pull(request).await.unwrap_err();
        assert!(client_deadline(&status), "{status:?}");
        let other = classify(status, "pubsub.googleapis.com", subscription).to_string();
        assert!(other.contains("no answer before the call's deadline"), "{other}");
    }

    /// A status as Pub/Sub sends it: google.rpc.Status in the details, with
    /// an ErrorInfo packed in an Any.
    fn status_with_error_info(code: Code, reason: &str, metadata: &[(&str, &str)]) -> Status {
        use prost::Message as _;
        #[derive(Clone, PartialEq, prost::Message)]
        struct Any {
            #[prost(string, tag = "1")]
            type_url: String,
            #[prost(bytes = "vec", tag = "2")]
            value: Vec<u8>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct RpcStatus {
            #[prost(int32, tag = "1")]
            code: i32,
            #[prost(string, tag = "2")]
            message: String,
            #[prost(message, repeated, tag = "3")]
            details: Vec<Any>,
        }
        let info = ErrorInfo {
            reason: reason.into(),
            domain: "pubsub.googleapis.com".into(),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let details = RpcStatus {
            code: code as i32,
            message: "Some acknowledgement ids in the request were invalid.".into(),
            details: vec![
                Any {
                    type_url: "type.googleapis.com/google.rpc.DebugInfo".into(),
                    value: Vec::new(),
                },
                Any {
                    type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                    value: info.encode_to_vec(),
                },
            ],
        };
        Status::with_details(code, "failed", details.encode_to_vec().into())
    }

    /// `fits` reckons a copy's size without building its message; it must
    /// agree with the message built, whatever the attributes' types and
    /// whether the targeting attribute replaces one of the same name.
    #[test]
    fn a_copy_is_sized_as_the_message_it_becomes() {
        use crate::model::AttrValue;
        let mut attributes = Attributes::new();
        attributes.insert("plain".into(), Attribute::string("value"));
        attributes.insert(
            "bytes".into(),
            Attribute {
                value: AttrValue::Binary(vec![1, 2, 3, 4].into()),
                data_type: None,
            },
        );
        attributes.insert(
            "n".into(),
            Attribute {
                value: AttrValue::Int(-1234),
                data_type: None,
            },
        );
        let mut properties = Properties::new();
        properties.insert(PROP_SOURCE_SUBSCRIPTION.into(), "orders-worker".into());
        let copy = Outgoing {
            body: vec![b'x'; 300].into(),
            attributes,
            properties,
            ordering_key: Some("key".into()),
            dedup_id: "m-1".into(),
            original_id: "m".into(),
        };
        for target in [None, Some("failed_subscription"), Some("plain"), Some("bytes")] {
            assert_eq!(
                copy_size(&copy, target),
                message_size(&unchecked_message(&copy, target)),
                "target {target:?}"
            );
        }
    }

    /// `send` splits by this count; an undercount (it once allowed 64 bytes
    /// of framing per message, and a message with 90 attributes takes over
    /// 700) lets a request over 10 MB through, which fails all its copies.
    #[test]
    fn attribute_names_pubsub_reserves() {
        for k in ["goog", "goog_x", "GOOGx", "Google", "googclient"] {
            assert!(reserved_attribute(k), "{k}");
        }
        for k in ["googclient_traceparent", "go", "", "tenant", "xgoog", "gooƒ"] {
            assert!(!reserved_attribute(k), "{k}");
        }
    }

    /// Retries send the shared request as it is: the bytes on the wire must
    /// be the request's own, and an answer decodes as it would unshared.
    #[test]
    fn a_shared_request_is_encoded_and_decoded_as_the_request() {
        use prost::Message as _;
        let req = PublishRequest {
            topic: "projects/p/topics/t".into(),
            messages: vec![PubsubMessage {
                data: prost::bytes::Bytes::from_static(b"body"),
                attributes: HashMap::from([("kind".into(), "retry".into()), ("n".into(), "1".into())]),
                ordering_key: "k".into(),
                ..Default::default()
            }],
        };
        let shared = Shared::new(req.clone());
        let encoded = shared.encode_to_vec();
        assert_eq!(encoded, req.encode_to_vec());
        assert_eq!(shared.encoded_len(), req.encoded_len());
        assert_eq!(shared.clone().encode_to_vec(), encoded, "a retry sends the same bytes");
        let decoded = Shared::<PublishRequest>::decode(&encoded[..]).expect("decodes");
        assert_eq!(*decoded.0, req);
    }

    #[test]
    fn publish_requests_are_measured_as_encoded() {
        use prost::Message as _;
        let message = |attributes: usize| PubsubMessage {
            data: vec![b'x'; 300].into(),
            attributes: (0..attributes)
                .map(|a| (format!("attribute-{a:06}"), "v".repeat(1000)))
                .collect(),
            ordering_key: "key".into(),
            ..Default::default()
        };
        let topic = "projects/p/topics/t";
        let messages = vec![message(0), message(1), message(90)];
        let counted = field_size(topic.len()) + messages.iter().map(|m| field_size(m.encoded_len())).sum::<usize>();
        let request = PublishRequest {
            topic: topic.into(),
            messages,
        };
        assert_eq!(counted, request.encoded_len());
    }

    /// Pub/Sub refuses a Publish whose messages do not all share one
    /// ordering key (FAILED_PRECONDITION); the emulator takes it, so this is
    /// checked here.
    #[test]
    fn each_publish_request_holds_one_ordering_key() {
        let message = |key: &str, bytes: usize| PubsubMessage {
            data: vec![b'x'; bytes].into(),
            ordering_key: key.into(),
            ..Default::default()
        };
        let keys = ["a", "b", "", "a", "b", "", "c", "a"];
        let messages = keys.iter().enumerate().map(|(i, k)| (i, message(k, 10))).collect();
        let chunks = publish_chunks(messages, 20);
        let got: Vec<Vec<(String, Vec<usize>)>> = chunks
            .iter()
            .map(|requests| {
                requests
                    .iter()
                    .map(|c| (c.messages[0].ordering_key.clone(), c.idx.clone()))
                    .collect()
            })
            .collect();
        let one = |k: &str, idx: &[usize]| vec![(k.to_string(), idx.to_vec())];
        assert_eq!(
            got,
            vec![
                one("a", &[0, 3, 7]),
                one("b", &[1, 4]),
                one("", &[2, 5]),
                one("c", &[6])
            ]
        );
        for c in chunks.iter().flatten() {
            assert!(c.messages.iter().all(|m| m.ordering_key == c.messages[0].ordering_key));
        }
        // One key over the request limits: its requests follow in order.
        let big: Vec<(usize, PubsubMessage)> = (0..5).map(|i| (i, message("k", 4_000_000))).collect();
        let split: Vec<Vec<usize>> = publish_chunks(big, 20).remove(0).into_iter().map(|c| c.idx).collect();
        assert_eq!(split, vec![vec![0, 1], vec![2, 3], vec![4]]);
        let many: Vec<(usize, PubsubMessage)> = (0..2500).map(|i| (i, message("", 1))).collect();
        let sizes: Vec<usize> = publish_chunks(many, 20)
            .remove(0)
            .iter()
            .map(|c| c.messages.len())
            .collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
    }

    #[test]
    fn throttled_and_passing_publish_failures_are_retried() {
        for code in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
            Code::Aborted,
        ] {
            assert!(publish_retryable(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::DeadlineExceeded,
        ] {
            assert!(!publish_retryable(code), "{code:?}");
        }
    }

    /// A permission refused names the resource and says a permission is
    /// missing, not that the credentials were refused.
    #[test]
    fn a_missing_permission_is_named_as_such() {
        let sub = "projects/p/subscriptions/orders-dlq";
        let e = classify(
            Status::new(Code::PermissionDenied, "User not authorized to perform this action."),
            "https://pubsub.googleapis.com",
            sub,
        );
        let text = e.to_string();
        assert!(matches!(e, BackendError::Auth { .. }), "{e:?}");
        assert!(
            text.contains(&format!(
                "the identity lacks a permission on {sub}: User not authorized"
            )),
            "{text}"
        );
        let e = classify(
            Status::new(Code::Unauthenticated, "invalid token"),
            "https://pubsub.googleapis.com",
            sub,
        );
        assert!(e.to_string().contains("Unauthenticated: invalid token"), "{e}");
    }

    #[test]
    fn acknowledgements_are_sent_again_on_the_codes_googles_clients_retry() {
        for code in [
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unavailable,
        ] {
            assert!(ack_retryable(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::FailedPrecondition,
        ] {
            assert!(!ack_retryable(code), "{code:?}");
        }
    }

    #[test]
    fn exactly_once_ack_failures_name_only_the_failed_ids() {
        let failed = exactly_once_ack_failures(&status_with_error_info(
            Code::InvalidArgument,
            EXACTLY_ONCE_ACK_FAILURE,
            &[
                ("a1", "PERMANENT_FAILURE_INVALID_ACK_ID"),
                ("a2", "TRANSIENT_FAILURE_UNORDERED_ACK_ID"),
            ],
        ))
        .expect("an exactly-once ack failure");
        assert_eq!(failed.len(), 2);
        assert!(failed["a2"].starts_with(TRANSIENT_ACK_FAILURE));
        // Anything else answers for the whole request.
        let other = status_with_error_info(Code::InvalidArgument, "SOMETHING_ELSE", &[("a1", "x")]);
        assert_eq!(exactly_once_ack_failures(&other), None);
        assert_eq!(exactly_once_ack_failures(&Status::invalid_argument("bad")), None);
        // Read whatever the code, as Google's clients read it.
        let other = status_with_error_info(Code::FailedPrecondition, EXACTLY_ONCE_ACK_FAILURE, &[("a1", "x")]);
        assert_eq!(exactly_once_ack_failures(&other).map(|f| f.len()), Some(1));
    }

    fn leases(ids: &[&str]) -> Vec<LeaseId> {
        ids.iter().map(|i| LeaseId(i.to_string())).collect()
    }

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|i| i.to_string()).collect()
    }

    /// Whether `answered(leases)` finishes without anything else happening.
    async fn answered_at_once(holds: &PendingHolds, of: &[&str]) -> bool {
        tokio::time::timeout(Duration::from_millis(50), holds.answered(&leases(of)))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_settle_waits_for_the_hold_of_its_leases_only() {
        let holds = PendingHolds::default();
        assert!(answered_at_once(&holds, &["a"]).await, "nothing pending");
        let first = holds.start(&ids(&["a", "b"]));
        let second = holds.start(&ids(&["c"]));
        assert!(!answered_at_once(&holds, &["a"]).await);
        assert!(!answered_at_once(&holds, &["x", "c"]).await);
        assert!(answered_at_once(&holds, &["x"]).await, "no hold of x is pending");

        let waiting = tokio::spawn({
            let holds = holds.clone();
            async move { holds.answered(&leases(&["b", "c"])).await }
        });
        drop(first);
        assert!(answered_at_once(&holds, &["a", "b"]).await);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "c's hold is still out");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("answered once both holds are")
            .unwrap();
        assert!(holds.lock().is_empty(), "answered holds are forgotten");
    }

    #[tokio::test]
    async fn an_earlier_holds_answer_leaves_a_later_hold_of_the_same_message_pending() {
        let holds = PendingHolds::default();
        let earlier = holds.start(&ids(&["a"]));
        let later = holds.start(&ids(&["a"]));
        drop(earlier);
        assert!(!answered_at_once(&holds, &["a"]).await);
        drop(later);
        assert!(answered_at_once(&holds, &["a"]).await);
        assert!(holds.lock().is_empty());
    }

    #[tokio::test]
    async fn a_hold_whose_task_panics_neither_blocks_its_waiters_nor_stays_pending() {
        let holds = PendingHolds::default();
        let hold = holds.start(&ids(&["a"]));
        let waiting = tokio::spawn({
            let holds = holds.clone();
            async move { holds.answered(&leases(&["a"])).await }
        });
        let task = tokio::spawn(async move {
            let _hold = hold;
            panic!("the hold's task ends early");
        });
        assert!(task.await.is_err());
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a hold dropped while unwinding answers")
            .unwrap();
        assert!(holds.lock().is_empty(), "and forgets its ack IDs");
    }

    #[test]
    fn names_expand_and_bad_ones_are_refused() {
        assert_eq!(full_name("p", "topics", "t").unwrap(), "projects/p/topics/t");
        assert_eq!(
            full_name("p", "topics", "projects/q/topics/t").unwrap(),
            "projects/q/topics/t"
        );
        assert!(full_name("p", "topics", "projects/q/subscriptions/t").is_err());
        assert!(full_name("p", "topics", "a/b").is_err());
        assert!(full_name("p", "topics", "").is_err());
        assert_eq!(split_subscription("projects/p/subscriptions/s"), ("p", "s"));
        assert_eq!(short_name("projects/p/subscriptions/s"), "s");
    }

    #[test]
    fn newest_monitoring_point_wins() {
        let body = r#"{"timeSeries":[{"points":[
            {"interval":{"endTime":"2024-05-01T10:02:00Z"},"value":{"int64Value":"42"}},
            {"interval":{"endTime":"2024-05-01T10:01:00Z"},"value":{"int64Value":"40"}}]}]}"#;
        assert_eq!(parse_latest_point(body).unwrap(), Some(42));
        assert_eq!(parse_latest_point("{}").unwrap(), None);
        assert!(parse_latest_point("<html>").is_err());
    }

    #[test]
    fn publish_times_parse() {
        let t = parse_time("2024-05-01T10:02:00.123Z").unwrap();
        assert_eq!(t.timestamp_millis(), 1_714_557_720_123);
        assert_eq!(parse_time("1714557720123").unwrap(), t);
        assert!(parse_time("soon").is_none());
    }
}
