//! Azure Service Bus adapter, on the `azservicebus` crate (AMQP 1.0) for
//! connecting and browsing, and on its AMQP library fe2o3-amqp for leases,
//! settles and sends ([`link`]).
//!
//! The DLQ is the `$DeadLetterQueue` sub-queue of a queue, or of a topic
//! subscription, or with `sub_queue: transfer_dead_letter` its transfer
//! dead-letter queue, `$Transfer/$DeadLetterQueue` (see below). The six verbs
//! map as:
//!
//! - **peek**: a true browse, `com.microsoft:peek-message` on the DLQ's
//!   `$management` node, from sequence number 1 onwards. Nothing is locked and
//!   no delivery count changes (`Capabilities::true_peek`).
//! - **lease**: a peek-lock receive from `<entity>/$DeadLetterQueue` on the
//!   adapter's own fe2o3-amqp connection and link ([`link`]), sized by a
//!   browse of the messages past the last one leased, with a bounded wait
//!   (2 s); see [`link`] for why the receive is sized. Complete and abandon
//!   are settled on the link that received a message, so what is kept of a
//!   held message is its delivery info (delivery id and tag), keyed by the
//!   [`LeaseId`] `<link generation>.<delivery id>`: a held message costs a
//!   few hundred bytes, whatever its body's size. Deferred messages, which
//!   no receive on a link gets, are leased by sequence number instead (see
//!   below). Concurrent leases
//!   overlap on the link (each browses past the previous one's messages), and
//!   completes and abandons overlap them. The hold is the entity's LockDuration: Service Bus has no per-receive
//!   lock time, and locks are not renewed (azservicebus 0.25 sends the lock
//!   token in the wrong byte order when it renews, TESTING.md); keep passes
//!   shorter than the LockDuration, or a lock lapses and the message is
//!   simply delivered again.
//! - **settle**: complete. **release**: abandon (the engine releases what it
//!   held at the end of a pass). The DLQ has no MaxDeliveryCount, so an
//!   abandon there only unlocks.
//! - **send**: batched sends (message-format `0x80013700`, the envelope the
//!   SDKs send) to the destination queue or topic, split by the link's maximum
//!   message size and Service Bus's 1 MB limit on a batch, on one sender link per destination attached on the DLQ
//!   link's connection ([`link`]): every concurrent send has its batch in
//!   flight on that link, and a pass attaches it once, while its first leases
//!   are out. Every send has
//!   a timeout and is retried on a fresh link: fe2o3-amqp 0.14 can lose a fast
//!   settlement and then waits forever (TESTING.md). A retry after a lost
//!   confirmation can duplicate a copy, never lose one; the copy's MessageId
//!   (below) lets duplicate detection absorb it.
//! - **stats**: the ATOM management GET `/<entity>?api-version=2021-05`,
//!   reading `CountDetails/DeadLetterMessageCount` (`TransferDeadLetterMessageCount`
//!   for a transfer dead-letter queue; namespace
//!   `http://schemas.microsoft.com/netservices/2011/06/servicebus`), signed
//!   with a SAS token (or an Entra ID bearer token). Azure answers a missing
//!   entity with 200 and an empty feed: that is reported as not found. The age
//!   of the oldest message is the EnqueuedTimeUtc of the first message peeked
//!   from the DLQ. Results are cached for [`STATS_TTL`], and calls are at least
//!   [`STATS_MIN_INTERVAL`] apart: Service Bus throttles management calls.
//!   Counts are `approximate` on Azure (they are eventually consistent) and
//!   `exact` on an emulator.
//!
//! One AMQP connection per namespace and credentials is shared by all the
//! queues on it ([`Clients`]); each queue attaches its own links. Every AMQP
//! call runs under a timeout, and a call that fails for the connection's sake
//! (unreachable, timed out) drops the connection so that the next call
//! reconnects: nothing waits forever, and a stopped emulator is reported as
//! unreachable within seconds. A queue drops the connection only if it is still
//! the one its link was attached on, so queues never close each other's fresh
//! connection; links of a closed connection are re-attached on the next call.
//!
//! ## The message model
//! - `id` is the MessageId and the SequenceNumber, `order-42@1187`
//!   (`seq-1187` when a message has no MessageId): senders choose MessageIds
//!   and may reuse them, the sequence number is unique in the entity. Both
//!   are also in `properties`.
//! - `body`: the concatenated data sections, exact. A body of another kind
//!   (JMS and the Python and Java SDKs send them: a TextMessage is an
//!   amqp-value string, a MapMessage an amqp-value map, a StreamMessage
//!   amqp-sequence sections) sets `properties["body_type"]` and shows an
//!   amqp-value string as its text (`amqp-value`), a binary as its bytes
//!   (`amqp-value-binary`), any other value as its AMQP encoding
//!   (`amqp-value-encoded`), and sequences as the AMQP encoding of their lists
//!   (`amqp-sequence`). A copy has the same kind of body as its original, so
//!   its consumer reads it as it would have read the original.
//! - `attributes`: the application properties, with their AMQP types:
//!   long → `Int`, double → `Float`, boolean → `Bool`, string → `String`,
//!   binary → `Binary`, uuid → `Uuid`, timestamp → `Timestamp`. Other AMQP
//!   types keep their type name in `data_type` so a copy carries the same type:
//!   byte, short, int, ubyte, ushort, uint → `Int` (`data_type` "byte", "short",
//!   "int", ...); ulong → `Int`, or `Number` above i64; float → `Float`
//!   ("float"); char and symbol → `String` ("char", "symbol"); decimal32/64/128
//!   → `Binary` of the raw IEEE 754 bytes ("decimal32"...); null → an empty
//!   `String` ("null"); the .NET SDK's described types
//!   (`com.microsoft:datetime-offset`, `timespan`, `uri`) → their inner value,
//!   `data_type` "described:<descriptor>"; a timestamp outside chrono's
//!   range → `Int` of its milliseconds ("timestamp"). Values from elsewhere go out as
//!   the canonical type of their variant; `Number` goes out as a string.
//! - `reason` / `description`: DeadLetterReason / DeadLetterErrorDescription.
//!   Both are application properties on the wire, so they also appear in
//!   `attributes`; they are the provider's dead-letter attributes, stripped
//!   from copies by default.
//! - `delivery_count`: DeliveryCount (the header's count + 1).
//! - `enqueued_at`: EnqueuedTimeUtc, which dead-lettering keeps.
//! - `source`: the parent entity: the queue, or the topic of a subscription
//!   DLQ (the config's `source` wins when set).
//! - `ordering_key`: SessionId.
//! - `properties` (kept on the copy unless marked informational):
//!   `correlation_id`, `subject`, `content_type`, `reply_to`,
//!   `reply_to_session_id`, `to`, `partition_key`, `time_to_live` (ms);
//!   informational: `message_id`, `sequence_number`, `dead_letter_source`,
//!   `message_state` (`deferred`: see below),
//!   `source_subscription` (the subscription of a subscription DLQ),
//!   `body_type`.
//!
//! ## The copy's MessageId
//! A copy does **not** keep the original MessageId. With duplicate detection
//! on the source entity, a copy sent within the detection window (10 minutes
//! by default, up to 7 days) of the original would be silently dropped as a
//! duplicate of the message that failed, and the DLQ copy would then be
//! settled: a loss. A copy's MessageId is instead `<original id>-<redrive
//! count>` (the engine's `dedup_id`, where the `id` carries the sequence
//! number, so two originals that share a MessageId get different copy IDs;
//! hashed when longer than Service Bus's 128 characters): stable across
//! retries and crashes of the same redrive, so duplicate detection absorbs a
//! crash-resend, and new for every redrive. The original ID stays readable in
//! the `dlq-bridge-redrive-id` mark.
//!
//! ## Transfer dead-letter queues
//! Each queue and subscription has a second dead-letter sub-queue,
//! `<entity>/$Transfer/$DeadLetterQueue`, where Service Bus itself puts what
//! auto-forwarding (`ForwardTo`, `ForwardDeadLetteredMessagesTo`) or a
//! send-via transfer could not deliver: the target deleted, disabled or over
//! its quota, or a message forwarded too many times
//! (`MaxTransferHopCountExceeded`), with the reason in `DeadLetterReason`.
//! It is only another address: the same browse (`SubQueue::TransferDeadLetter`
//! on the SDK's receiver), the same link, leases, settles and journal, with
//! `<entity>/$Transfer/$DeadLetterQueue` in place of `<entity>/$DeadLetterQueue`;
//! the depth is `CountDetails/TransferDeadLetterMessageCount` of the same ATOM
//! GET. Tokens are put for the sub-queue's own address, which an entity
//! policy's key (signed for the entity, a URI prefix of it) covers. The source
//! is the parent entity as for the ordinary DLQ: a copy goes back to the
//! queue (or the subscription's topic) and is forwarded again from there.
//!
//! ## Subscription DLQs
//! A copy goes back to the topic, so **every** subscription of the topic gets
//! it again (those that had processed the original too). Opt-in targeting:
//! with `target_subscription_property: P`, each copy carries the application
//! property `P = <the failing subscription>`, and each subscription `S` of the
//! topic replaces its default rule with the SQL filter
//! `[P] IS NULL OR [P] = 'S'`. Copies then reach only the subscription that
//! failed, while ordinary messages (without `P`) still reach every
//! subscription.
//!
//! ## Deferred messages
//! A consumer of a dead-letter queue may defer a message instead of settling
//! it. Service Bus then delivers it to no receiver link: only
//! `com.microsoft:receive-by-sequence-number` on the entity's `$management`
//! node gets it, and a lock taken there is settled there
//! (`com.microsoft:update-disposition`). The link's browses tell deferred
//! messages apart (`x-opt-message-state` 1): they are not counted as credit
//! for the receiver link, and their sequence numbers go to the next leases,
//! which lock them through `$management` in peek-lock mode ([`link`]). So a
//! redrive leases them like any other message: filter, `--max`, seen-set,
//! journal, dry run and the release of what did not match all apply. Their
//! [`LeaseId`] is `<link generation>:<lock token>` (a link delivery's is
//! `<link generation>.<delivery id>`): settle completes them by token
//! (`completed`) once their copies are confirmed, and release abandons them
//! (`abandoned`), which leaves them deferred. The broker's answer to
//! `update-disposition` is the confirmation; no browse follows it. A token
//! names its lock without the link, so it is settled through whichever link
//! is current, also after the one that took it was reset (should Service
//! Bus refuse it there, the settle fails and the lock lapses: the message
//! stays in the DLQ, deferred). `inspect` marks a deferred message
//! `properties.message_state = "deferred"`.
//!
//! ## Credentials and endpoints
//! A SAS connection string from the environment variable named by
//! `connection_string_env`. `UseDevelopmentEmulator=true` in it selects plain
//! `amqp://` (Microsoft's emulator convention); azservicebus always dials port
//! 5672 (5671 for TLS) whatever the string says. A connection string of an
//! entity-level policy (`EntityPath=<queue or topic>`) signs every token for
//! that entity, which its key is valid for, and is refused up front for any
//! other entity ([`ConnectionString::check_scope`]). Without a connection string,
//! Entra ID through Azure Workload Identity ([`WorkloadIdentityCredential`]):
//! the federated token file and client/tenant IDs the AKS webhook injects.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

mod link;
mod turns;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azservicebus::core::BasicRetryPolicy;
use azservicebus::prelude::*;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::delivery::{DeliveryFut, Sendable};
use fe2o3_amqp::link::{DetachError, SendError};
use fe2o3_amqp_types::definitions::ErrorCondition;
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{
    AmqpSequence, AmqpValue, ApplicationProperties, Batch, Body, Data, Message, MessageId, Outcome,
};
use fe2o3_amqp_types::primitives::{
    Binary, Dec32, Dec64, Dec128, SimpleValue, Symbol, Timestamp, Uuid as AmqpUuid, Value,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{BackendError, Capabilities, Purpose, QueueBackend, Result, abandon_send, fails_every_send};
use crate::config::{QueueConfig, ServiceBusQueueConfig, ServiceBusSubQueue};
use crate::model::{
    AttrValue, Attribute, Attributes, Destination, DlqMessage, DlqStats, Exactness, LeaseId, Leased, Outgoing,
    Properties, SendResult, SettleResult,
};

type Client = ServiceBusClient<BasicRetryPolicy>;

/// A destination's sender link on the dead-letter queue's connection (see
/// `link::send_loop`), and the link generation it was attached on.
struct DestSender {
    generation: u64,
    /// Locked only while a transfer is queued, not for its outcome: every
    /// concurrent send has its batch in flight on the one link.
    link: Mutex<fe2o3_amqp::Sender>,
    /// The largest message or batch the link takes (from its attach).
    max_message_size: usize,
    /// Cancelled when the dead-letter queue's link, whose connection this
    /// sender shares, has ended.
    link_ended: CancellationToken,
}

/// One send's AMQP message: a lone message as it is, several in the batch
/// envelope Service Bus unpacks (what azservicebus and the other SDKs send).
enum Envelope {
    Single(Sendable<Body<Value>>),
    Batch(Sendable<Batch<Data>>),
}

impl Envelope {
    /// Queue the transfer; the returned future is its outcome.
    async fn queue_on(
        &self,
        link: &mut fe2o3_amqp::Sender,
    ) -> std::result::Result<DeliveryFut<std::result::Result<Outcome, SendError>>, SendError> {
        match self {
            Envelope::Single(m) => link.send_batchable_ref(m).await,
            Envelope::Batch(b) => link.send_batchable_ref(b).await,
        }
    }
}

/// Why a send got no outcome: the transfer failed, the broker had detached
/// the link before the transfer was queued, or the connection ended.
enum SendFailure {
    Send(SendError),
    Detached(DetachError),
    ConnectionEnded,
}

impl From<SendError> for SendFailure {
    fn from(e: SendError) -> Self {
        Self::Send(e)
    }
}

/// As the inner error: errors are classified, and shown, by their text.
impl std::fmt::Debug for SendFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send(e) => e.fmt(f),
            Self::Detached(e) => e.fmt(f),
            Self::ConnectionEnded => f.write_str("the connection closed before the broker's outcome came"),
        }
    }
}

/// Service Bus's message format of a batch envelope.
const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;
/// What each message adds to a batch envelope besides its encoding: a data
/// section's descriptor and binary length.
const BATCH_ITEM_OVERHEAD: usize = 8;
/// Room for a copy's sections around its body: properties, annotations and
/// a few attributes fit; more grow the buffer once.
const ENCODED_HEADROOM: usize = 512;

const PROVIDER: &str = "Service Bus";
/// Messages per send batch and settle call, and per lease until the engine
/// knows how large bodies are.
const BATCH: usize = 100;
/// The most messages one lease asks for (a share of one browse, then that
/// much credit). The link's task browses once per round trip for whatever
/// leases wait, so behind a real network larger leases are what keeps the
/// lease rate up; the engine grows to this only while bodies are small.
const MAX_LEASE: usize = 250;
/// Held messages one release takes. The link's task applies the abandons
/// of every release waiting together, behind one confirming round trip, so
/// the end of a pass costs few round trips; but all of a large pass's
/// abandons queued at once are that many disposition frames in memory
/// (50,000 held at 100k × 1 KiB: peak RSS 68 MiB with calls of 5,000, 62 with
/// 1,000, 61 with 250), and the engine runs `redrive.concurrency` calls at a
/// time.
const MAX_RELEASE: usize = 1_000;
/// Leases the engine may keep in flight: one browse counts for all of them.
const MAX_CONCURRENT_LEASES: usize = 4;
/// The standard tier's limit on a message (premium allows up to 100 MB;
/// the link's advertised maximum decides how sends are split).
const MAX_BODY: usize = 256 * 1024;
/// The largest batch envelope Service Bus takes, whatever the link's
/// maximum message size: a premium entity with large messages advertises up
/// to 100 MB on its links but refuses any batch over 1 MB (the SDKs cap
/// their batches so, azure-sdk-for-net#44914).
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// The longest a single AMQP call (attach, receive, settle, peek) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Opening the connection (TCP, TLS, SASL, CBS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One send attempt; then it is retried on a fresh link.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const SEND_ATTEMPTS: usize = 3;
/// The condition of a send Service Bus refused because it throttles the
/// namespace or entity, and how long to wait before sending again.
const SERVER_BUSY: &str = "com.microsoft:server-busy";
const SERVER_BUSY_WAIT: Duration = Duration::from_secs(2);
/// How long a lease waits for the first message before reporting the DLQ empty.
const LEASE_WAIT: Duration = Duration::from_secs(2);
/// Messages per peek request.
const PEEK_PAGE: usize = 100;
/// The most messages counted by browsing when the counts are refused (see
/// [`ServiceBusBackend::browse_count`]), unless `browse_count_limit` says:
/// enough for alerts on small depths, little enough to browse at every poll.
const BROWSE_COUNT_LIMIT: usize = 1_000;
/// How long a stats result is reused.
pub const STATS_TTL: Duration = Duration::from_secs(2);
/// The least time between two ATOM calls of one backend.
pub const STATS_MIN_INTERVAL: Duration = Duration::from_millis(500);
const API_VERSION: &str = "2021-05";
const SB_XML_NS: &[u8] = b"http://schemas.microsoft.com/netservices/2011/06/servicebus";
/// Service Bus's limit on a MessageId.
const MAX_MESSAGE_ID: usize = 128;
/// Lifetime of the SAS tokens signed for the ATOM call.
const SAS_TTL_SECS: u64 = 3600;
/// Azure detaches a link with no traffic for 10 minutes
/// (`amqp:link:detach-forced`, "IdleTimerExpired"); it cannot be changed.
const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The application properties Service Bus adds when it dead-letters a message.
pub const DEAD_LETTER_REASON: &str = "DeadLetterReason";
pub const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";

/// [`DlqMessage::properties`] keys (see the module docs).
pub const PROP_MESSAGE_ID: &str = "message_id";
pub const PROP_SEQUENCE_NUMBER: &str = "sequence_number";
pub const PROP_CORRELATION_ID: &str = "correlation_id";
pub const PROP_SUBJECT: &str = "subject";
pub const PROP_CONTENT_TYPE: &str = "content_type";
pub const PROP_REPLY_TO: &str = "reply_to";
pub const PROP_REPLY_TO_SESSION_ID: &str = "reply_to_session_id";
pub const PROP_TO: &str = "to";
pub const PROP_PARTITION_KEY: &str = "partition_key";
pub const PROP_TIME_TO_LIVE: &str = "time_to_live";
pub const PROP_DEAD_LETTER_SOURCE: &str = "dead_letter_source";
pub const PROP_SOURCE_SUBSCRIPTION: &str = "source_subscription";
pub const PROP_BODY_TYPE: &str = "body_type";
/// `deferred` (or `scheduled`) when Service Bus says so
/// (`x-opt-message-state`); absent for an active message.
pub const PROP_MESSAGE_STATE: &str = "message_state";
/// [`PROP_BODY_TYPE`]s: the body was an amqp-value section holding a string
/// (the body is its UTF-8), a binary (the body is its bytes), or another
/// value (the body is its AMQP encoding); or amqp-sequence sections (the
/// body is the AMQP encoding of the list of their lists).
pub const BODY_VALUE_STRING: &str = "amqp-value";
pub const BODY_VALUE_BINARY: &str = "amqp-value-binary";
pub const BODY_VALUE_ENCODED: &str = "amqp-value-encoded";
pub const BODY_SEQUENCE: &str = "amqp-sequence";

/// The entity whose dead-letter sub-queue is managed.
#[derive(Debug, Clone)]
enum Entity {
    Queue(String),
    Subscription { topic: String, subscription: String },
}

impl Entity {
    /// The entity path: `queue` or `topic/Subscriptions/sub`.
    fn path(&self) -> String {
        match self {
            Self::Queue(q) => q.clone(),
            Self::Subscription { topic, subscription } => format!("{topic}/Subscriptions/{subscription}"),
        }
    }

    /// Where messages were sent: the queue, or the subscription's topic.
    fn parent(&self) -> &str {
        match self {
            Self::Queue(q) => q,
            Self::Subscription { topic, .. } => topic,
        }
    }
}

/// What a connection string holds that dlq-bridge uses. Its `Debug` leaves
/// the key and the signature out: a debug print in a log or a panic message
/// must not carry them.
#[derive(Clone, Default, PartialEq)]
pub struct ConnectionString {
    /// The namespace host, e.g. `myns.servicebus.windows.net` (no scheme, no port).
    pub host: String,
    pub key_name: Option<String>,
    pub key: Option<String>,
    /// A pre-signed token (`SharedAccessSignature=...`).
    pub signature: Option<String>,
    /// `UseDevelopmentEmulator=true`: plain AMQP and the emulator's HTTP port.
    pub emulator: bool,
    /// `EntityPath`: the queue or topic of an entity-level policy, whose key
    /// signs only for that entity (see [`ConnectionString::check_scope`]).
    pub entity_path: Option<String>,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("ConnectionString")
            .field("host", &self.host)
            .field("key_name", &self.key_name)
            .field("key", &secret(&self.key))
            .field("signature", &secret(&self.signature))
            .field("emulator", &self.emulator)
            .field("entity_path", &self.entity_path)
            .finish()
    }
}

impl ConnectionString {
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Self::default();
        for part in text.split(';') {
            let Some((k, v)) = part.split_once('=') else { continue };
            let (k, v) = (k.trim(), v.trim());
            match k.to_ascii_lowercase().as_str() {
                "endpoint" => {
                    let rest = v.split_once("://").map_or(v, |(_, r)| r);
                    let host = rest.split(['/', '?']).next().unwrap_or_default();
                    // azservicebus dials the standard port whatever is given.
                    out.host = host.split(':').next().unwrap_or_default().to_ascii_lowercase();
                }
                "sharedaccesskeyname" => out.key_name = Some(v.to_string()),
                "sharedaccesskey" => out.key = Some(v.to_string()),
                "sharedaccesssignature" => out.signature = Some(v.to_string()),
                "usedevelopmentemulator" => out.emulator = v.eq_ignore_ascii_case("true"),
                "entitypath" => out.entity_path = Some(v.trim_matches('/').to_string()).filter(|p| !p.is_empty()),
                _ => {}
            }
        }
        if out.host.is_empty() {
            return Err(BackendError::Invalid(
                "the Service Bus connection string has no `Endpoint=sb://<namespace>`".into(),
            ));
        }
        if out.signature.is_none() && (out.key_name.is_none() || out.key.is_none()) {
            return Err(BackendError::Invalid(
                "the Service Bus connection string needs `SharedAccessKeyName` and `SharedAccessKey`, or `SharedAccessSignature`".into(),
            ));
        }
        if let Some(sig) = &out.signature {
            check_signature_expiry(sig, unix_now())?;
        }
        Ok(out)
    }

    /// The string azservicebus is given: the emulator flag removed, since
    /// plain AMQP is chosen by the client constructor.
    fn for_client(&self) -> String {
        let mut s = format!("Endpoint=sb://{}/", self.host);
        if let Some(sig) = &self.signature {
            s.push_str(&format!(";SharedAccessSignature={sig}"));
        }
        if let (Some(n), Some(k)) = (&self.key_name, &self.key) {
            s.push_str(&format!(";SharedAccessKeyName={n};SharedAccessKey={k}"));
        }
        // azservicebus then signs its tokens for the entity, not the namespace.
        if let Some(e) = &self.entity_path {
            s.push_str(&format!(";EntityPath={e}"));
        }
        s
    }

    /// Whether this connection string may be used for `entity` (a queue or
    /// topic; `what` says for what, in the error). A policy of one entity
    /// (`EntityPath`) has a key that signs for that entity and what lies
    /// below it (its dead-letter queue, its subscriptions) only: Azure
    /// refuses its tokens for anything else (401 InvalidAudience), so the
    /// mismatch is refused here, before anything is read or sent, naming
    /// both. Names compare as Service Bus does, without regard to case.
    /// `var` names the environment variable that held the string.
    pub fn check_scope(&self, var: &str, entity: &str, what: &str) -> Result<()> {
        match &self.entity_path {
            Some(scope) if !scope.eq_ignore_ascii_case(entity.trim_matches('/')) => {
                Err(BackendError::Invalid(format!(
                    "{var} is the connection string of a policy of the entity `{scope}` (EntityPath={scope}), and {what} `{entity}`, which its key cannot sign for: use the connection string of a namespace-level policy (without EntityPath), or one of a policy of `{entity}`"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The longest a SharedAccessSignature may still be valid: azservicebus
/// schedules its refresh at the expiry on a timer that cannot reach further
/// (about 2.2 years) and panics beyond it.
const MAX_SIGNATURE_LIFETIME_SECS: u64 = 2 * 365 * 24 * 3600;

/// A SharedAccessSignature's expiry (`se=`, Unix seconds) must lie ahead, and
/// within [`MAX_SIGNATURE_LIFETIME_SECS`]: an expired one would fail every
/// call with a misleading "cannot reach", after azservicebus panicked.
fn check_signature_expiry(signature: &str, now: u64) -> Result<()> {
    let params = signature.trim_start_matches("SharedAccessSignature").trim();
    let expiry = params.split('&').find_map(|p| p.strip_prefix("se=")).ok_or_else(|| {
        BackendError::Invalid("the connection string's SharedAccessSignature has no expiry (`se=`)".into())
    })?;
    let expiry: u64 = expiry.parse().map_err(|_| {
        BackendError::Invalid(format!(
            "the connection string's SharedAccessSignature has an expiry that is not Unix seconds: se={expiry}"
        ))
    })?;
    let at = |secs: u64| {
        chrono::DateTime::from_timestamp(i64::try_from(secs).unwrap_or(i64::MAX), 0)
            .map_or_else(|| format!("{secs} (Unix seconds)"), |t| t.to_rfc3339())
    };
    if expiry <= now {
        return Err(BackendError::Invalid(format!(
            "the connection string's SharedAccessSignature expired at {}: issue a new one",
            at(expiry)
        )));
    }
    if expiry - now > MAX_SIGNATURE_LIFETIME_SECS {
        return Err(BackendError::Invalid(format!(
            "the connection string's SharedAccessSignature expires at {}, more than two years ahead, which the Service Bus client cannot schedule: issue one that expires sooner, or use SharedAccessKeyName and SharedAccessKey",
            at(expiry)
        )));
    }
    Ok(())
}

/// How the backend authenticates.
#[derive(Clone)]
enum Auth {
    /// The connection string, and the environment variable it came from.
    Sas(ConnectionString, String),
    Entra(Arc<WorkloadIdentityCredential>),
}

pub struct ServiceBusBackend {
    queue_name: String,
    entity: Entity,
    /// Which of the entity's dead-letter sub-queues this is.
    sub_queue: ServiceBusSubQueue,
    /// The namespace host: named in errors.
    host: String,
    auth: Auth,
    emulator: bool,
    config_source: Option<String>,
    target_property: Option<String>,
    /// The namespace's connection, shared with every queue on it.
    conn: Arc<SharedClient>,
    /// The browsing receiver, kept between calls, and when it was last used.
    receiver: Mutex<Option<(ServiceBusReceiver, Instant)>>,
    /// The connection generation the receiver was attached on.
    receiver_generation: AtomicU64,
    /// How long a kept browsing receiver may sit idle before it is attached
    /// again (half of `servicebus.link_idle_timeout`).
    receiver_keep: Duration,
    /// The copies' sender links, one per destination, on the dead-letter
    /// queue's connection. Locked while one is attached, which every send to
    /// that destination waits for anyway.
    senders: Mutex<HashMap<String, Arc<DestSender>>>,
    /// The destination of the pass (see `prepare_send`): a link that opens
    /// attaches its sender at once.
    send_to: Arc<std::sync::Mutex<Option<String>>>,
    /// What the dead-letter queue's own link needs to (re)open.
    link_config: Arc<link::LinkConfig>,
    /// The link's connection, opened by `connect` for a pass (see
    /// [`Purpose::Pass`]); the first link takes it over.
    opening: std::sync::Mutex<Option<link::Opening>>,
    /// The dead-letter queue's own link (lease, complete, abandon).
    dlq: Mutex<Option<Arc<link::DlqLink>>>,
    link_generations: AtomicU64,
    /// The order in which leases reach the link (see [`QueueBackend::lease_in_turn`]).
    lease_turns: Arc<turns::Turnstile>,
    /// What settles each held message: its delivery info, by delivery id,
    /// for the link of `generation` (a held message of an older link can no
    /// longer be settled).
    held: std::sync::Mutex<Held>,
    management: String,
    stats_cache: Mutex<Option<(Instant, DlqStats)>>,
    /// The management endpoint refused the counts for want of the Manage
    /// right: `stats` counts by browsing from then on, up to this many.
    counts_refused: AtomicBool,
    browse_count_limit: usize,
}

#[derive(Default)]
struct Held {
    generation: u64,
    infos: HashMap<u32, DeliveryInfo>,
}

/// Service Bus connections shared between queues: one per namespace and
/// credentials. A connection carries its own tasks, CBS link and TLS session;
/// the queues on it differ only by their links.
#[derive(Default)]
pub struct Clients {
    /// Keyed by a digest of the namespace and credentials (no secret kept twice).
    by_key: std::sync::Mutex<HashMap<[u8; 32], Arc<SharedClient>>>,
}

impl Clients {
    fn get(&self, auth: &Auth, host: &str) -> Arc<SharedClient> {
        let identity = match auth {
            Auth::Sas(cs, _) => format!("sas|{}|{}", cs.emulator, cs.for_client()),
            Auth::Entra(_) => format!("entra|{host}"),
        };
        let key: [u8; 32] = Sha256::digest(identity.as_bytes()).into();
        self.by_key
            .lock()
            .expect("clients lock")
            .entry(key)
            .or_default()
            .clone()
    }
}

/// One namespace's connection, opened on first use. Each opening gets a new
/// generation number, so that a queue whose link failed drops the connection
/// only if it is still the one that link was on: a queue never closes a
/// connection another queue has just reopened.
#[derive(Default)]
struct SharedClient {
    slot: Mutex<Option<(u64, Client)>>,
    generations: AtomicU64,
    /// The generation in `slot` (0: none), readable without its lock: every
    /// send checks it, and the lock is held across a sender's attach (several
    /// round trips), which sends on links already attached must not wait for.
    current: AtomicU64,
}

impl SharedClient {
    fn generation(&self) -> Option<u64> {
        Some(self.current.load(Ordering::Acquire)).filter(|g| *g != 0)
    }

    fn set(&self, slot: &mut Option<(u64, Client)>, value: Option<(u64, Client)>) {
        self.current
            .store(value.as_ref().map_or(0, |(g, _)| *g), Ordering::Release);
        *slot = value;
    }
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// azservicebus opens its TCP connection through fe2o3-amqp 0.14 without
/// TCP_NODELAY, and gives no access to the stream. With Nagle's algorithm on,
/// a small frame written while earlier ones await their ACK (the peek that
/// confirms a batch of completes, whose dispositions get no reply) waits for
/// the broker's delayed ACK, about 40 ms on Linux, once per batch: Service Bus
/// redrives ran at a flat ~1,700 messages/s (10k messages: 5.9 s; with
/// TCP_NODELAY 1.3 s). So after each connect, set it on this process's TCP
/// sockets whose peer is an AMQP port (5671 TLS, 5672 plain). Best effort: a
/// socket that is not one, or that closed meanwhile, is skipped.
fn set_nodelay_on_amqp_sockets() {
    #[cfg(target_os = "linux")]
    {
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
            return;
        };
        for fd in fds
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::c_int>().ok())
        {
            let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: `peer` and `len` are valid for writes of `len` bytes; a
            // descriptor that is not a socket (or no longer open) fails with
            // ENOTSOCK or EBADF and is skipped.
            if unsafe { libc::getpeername(fd, (&raw mut peer).cast(), &mut len) } != 0 {
                continue;
            }
            let port = match i32::from(peer.ss_family) {
                // SAFETY: the family says which sockaddr type the kernel wrote.
                libc::AF_INET => unsafe { (*(&raw const peer).cast::<libc::sockaddr_in>()).sin_port },
                libc::AF_INET6 => unsafe { (*(&raw const peer).cast::<libc::sockaddr_in6>()).sin6_port },
                _ => continue,
            };
            if matches!(u16::from_be(port), 5671 | 5672) {
                let one: libc::c_int = 1;
                // SAFETY: `one` outlives the call and its size is passed.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::IPPROTO_TCP,
                        libc::TCP_NODELAY,
                        (&raw const one).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
            }
        }
    }
}

impl ServiceBusBackend {
    pub async fn connect(
        name: &str,
        cfg: &ServiceBusQueueConfig,
        queue: &QueueConfig,
        clients: &Clients,
        purpose: Purpose,
    ) -> Result<Self> {
        let entity = match (&cfg.queue, &cfg.topic, &cfg.subscription) {
            (Some(q), None, None) => Entity::Queue(q.clone()),
            (None, Some(t), Some(s)) => Entity::Subscription {
                topic: t.clone(),
                subscription: s.clone(),
            },
            _ => {
                return Err(BackendError::Invalid(format!(
                    "queue {name}: servicebus needs either `queue`, or both `topic` and `subscription`"
                )));
            }
        };
        let (auth, host, emulator) = match non_empty(&cfg.connection_string_env) {
            Some(var) => {
                let text = std::env::var(&var)
                    .ok()
                    .filter(|v| !v.trim().is_empty())
                    .ok_or_else(|| {
                        BackendError::Invalid(format!(
                            "the environment variable {var} (servicebus.connection_string_env) is not set"
                        ))
                    })?;
                let cs = ConnectionString::parse(&text).map_err(|e| BackendError::Invalid(format!("{var}: {e}")))?;
                let host = non_empty(&cfg.namespace)
                    .map(|n| namespace_host(&n))
                    .unwrap_or(cs.host.clone());
                let emulator = cs.emulator;
                cs.check_scope(
                    &var,
                    entity.parent(),
                    &format!("queue {name} reads the dead-letter queue of"),
                )?;
                (
                    Auth::Sas(
                        ConnectionString {
                            host: host.clone(),
                            ..cs
                        },
                        var,
                    ),
                    host,
                    emulator,
                )
            }
            None => {
                let ns = non_empty(&cfg.namespace).ok_or_else(|| {
                    BackendError::Invalid(format!(
                        "queue {name}: servicebus needs `connection_string_env`, or `namespace` for Entra ID (workload identity)"
                    ))
                })?;
                let cred = WorkloadIdentityCredential::from_env().map_err(|e| BackendError::Auth {
                    provider: PROVIDER,
                    detail: format!("queue {name}: no connection string and no workload identity: {e}"),
                })?;
                (Auth::Entra(Arc::new(cred)), namespace_host(&ns), false)
            }
        };
        let management = match non_empty(&cfg.management_endpoint) {
            Some(m) => m.trim_end_matches('/').to_string(),
            None if emulator => format!("http://{host}:5300"),
            None => format!("https://{host}"),
        };
        let conn = clients.get(&auth, &host);
        let link_config = Arc::new(link::LinkConfig {
            host: host.clone(),
            tls: !emulator,
            dlq_path: format!("{}/{}", entity.path(), sub_queue_suffix(cfg.sub_queue)),
            scope: match &auth {
                Auth::Sas(cs, _) => cs.entity_path.clone(),
                Auth::Entra(_) => None,
            },
            credentials: match &auth {
                Auth::Sas(cs, _) => match (&cs.signature, &cs.key_name, &cs.key) {
                    (Some(sig), _, _) => link::Credentials::Signature(sig.clone()),
                    (None, Some(name), Some(key)) => link::Credentials::Key {
                        name: name.clone(),
                        key: key.clone(),
                    },
                    _ => unreachable!("ConnectionString::parse requires a key or a signature"),
                },
                Auth::Entra(cred) => link::Credentials::Entra(cred.clone()),
            },
            sas_ttl: cfg.sas_token_ttl.unwrap_or(Duration::from_secs(SAS_TTL_SECS)),
            label: format!("{name} ({})", entity.path()),
        });
        let backend = Self {
            queue_name: name.to_string(),
            entity,
            sub_queue: cfg.sub_queue,
            host,
            auth,
            emulator,
            config_source: queue.source.clone().filter(|s| !s.trim().is_empty()),
            target_property: non_empty(&cfg.target_subscription_property),
            conn,
            receiver: Mutex::new(None),
            receiver_generation: AtomicU64::new(0),
            receiver_keep: cfg.link_idle_timeout.unwrap_or(LINK_IDLE_TIMEOUT) / 2,
            senders: Mutex::new(HashMap::new()),
            send_to: Arc::default(),
            opening: std::sync::Mutex::new(
                (purpose == Purpose::Pass)
                    .then(|| link::Opening::Connecting(link::Connected::start(link_config.clone()))),
            ),
            link_config,
            dlq: Mutex::new(None),
            link_generations: AtomicU64::new(0),
            lease_turns: Arc::default(),
            held: std::sync::Mutex::new(Held::default()),
            management,
            stats_cache: Mutex::new(None),
            counts_refused: AtomicBool::new(false),
            browse_count_limit: cfg.browse_count_limit.unwrap_or(BROWSE_COUNT_LIMIT),
        };
        // Fail now, with a clear error, when the namespace cannot be reached
        // or refuses the credentials. No link is attached yet: an emulator
        // would auto-create the entity, and `list` needs only the management
        // call. A missing entity shows as NotFound from the first call
        // (ATOM's empty feed, or the attach's `amqp:not-found`). A pass
        // checks on its own link's connection, which puts the dead-letter
        // queue's tokens: the SDK's connection, which only browses, is then
        // opened only if something browses (a progress bar's depth).
        let connected = async {
            let opening = backend.opening.lock().expect("opening lock").take();
            match opening {
                Some(o) => {
                    let open = o.opened(&backend.link_config).await?;
                    *backend.opening.lock().expect("opening lock") = Some(open);
                    Ok(())
                }
                None => {
                    let mut slot = backend.conn.slot.lock().await;
                    backend.client(&mut slot).await.map(drop)
                }
            }
        };
        // A mistyped entity must fail here, before a receiver attaches:
        // emulators create entities on attach, so a redrive of a queue that
        // does not exist would "succeed" on an empty queue it created. The
        // management GET says so where it may be read (it needs the Manage
        // right; without it, Azure refuses the attach instead). Both at once:
        // each is several round trips.
        let (connected, counted) = tokio::join!(connected, backend.counts());
        connected?;
        if let Err(e @ BackendError::NotFound { .. }) = counted {
            return Err(e);
        }
        Ok(backend)
    }

    /// The DLQ's entity path (`queue` or `topic/Subscriptions/sub`).
    pub fn entity_path(&self) -> String {
        self.entity.path()
    }

    fn unreachable(&self, detail: impl std::fmt::Display) -> BackendError {
        BackendError::Unreachable {
            endpoint: format!("{}://{}", if self.emulator { "amqp" } else { "amqps" }, self.host),
            detail: detail.to_string(),
        }
    }

    fn classify(&self, what: &str, e: &azure_core::Error) -> BackendError {
        classify(
            e,
            &self.unreachable(""),
            &format!("{} ({})", self.queue_name, self.entity.path()),
            what,
        )
    }

    /// The namespace's client and its generation, opened on first use.
    async fn client<'a>(&self, slot: &'a mut Option<(u64, Client)>) -> Result<(u64, &'a mut Client)> {
        if slot.is_none() {
            let options = ServiceBusClientOptions {
                retry_options: ServiceBusRetryOptions {
                    max_retries: 1,
                    delay: Duration::from_millis(200),
                    max_delay: Duration::from_secs(2),
                    try_timeout: CALL_TIMEOUT,
                    ..Default::default()
                },
                ..Default::default()
            };
            let fut = async {
                match &self.auth {
                    Auth::Sas(cs, _) if cs.emulator => {
                        ServiceBusClient::unsecured()
                            .new_from_connection_string(cs.for_client(), options)
                            .await
                    }
                    Auth::Sas(cs, _) => ServiceBusClient::new_from_connection_string(cs.for_client(), options).await,
                    Auth::Entra(cred) => {
                        let cred: Arc<dyn azure_core::credentials::TokenCredential> = cred.clone();
                        ServiceBusClient::new_from_token_credential(self.host.clone(), cred, options).await
                    }
                }
            };
            let client = tokio::time::timeout(CONNECT_TIMEOUT, fut)
                .await
                .map_err(|_| self.unreachable(format!("no AMQP connection within {CONNECT_TIMEOUT:?}")))?
                .map_err(|e| self.classify("connect", &e))?;
            set_nodelay_on_amqp_sockets();
            let generation = self.conn.generations.fetch_add(1, Ordering::Relaxed) + 1;
            self.conn.set(slot, Some((generation, client)));
        }
        let (generation, client) = slot.as_mut().expect("just set");
        Ok((*generation, client))
    }

    /// Forget the connection of `generation` after a failure, so the next
    /// call reconnects (unless another queue already did). Leases taken on
    /// the old link can no longer be settled; their locks lapse and the
    /// messages return to the DLQ.
    async fn reset(&self, generation: u64) {
        let mut slot = self.conn.slot.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            self.conn.set(&mut slot, None);
        }
    }

    /// The browsing receiver: the one kept from an earlier call, unless it
    /// may be gone (see below), else a new one. `stale` says whether it was
    /// kept: such a receiver may have been detached since without a word.
    async fn ensure_receiver<'a>(
        &self,
        slot: &'a mut Option<(ServiceBusReceiver, Instant)>,
        stale: &mut bool,
    ) -> Result<&'a mut ServiceBusReceiver> {
        // A receiver on a connection that was closed since (after another
        // queue's failure) is dead. One idle for half the namespace's idle
        // timeout is likely detached, and azservicebus may not notice: a peek
        // on its detached `$management` link waits out CALL_TIMEOUT. Attach a
        // new one instead.
        if let Some((_, used)) = slot
            && (self.conn.generation() != Some(self.receiver_generation.load(Ordering::Relaxed))
                || used.elapsed() >= self.receiver_keep)
        {
            *slot = None;
        }
        *stale = slot.is_some();
        if slot.is_none() {
            let (generation, receiver) = self.attach_receiver().await?;
            *slot = Some((receiver, Instant::now()));
            self.receiver_generation.store(generation, Ordering::Relaxed);
        }
        let (receiver, used) = slot.as_mut().expect("just set");
        *used = Instant::now();
        Ok(receiver)
    }

    /// Attach a browsing receiver, with the generation of the connection it
    /// is on. Azure closes a connection that has had no link for about a
    /// minute (amqp:connection:forced), and azservicebus does not reconnect
    /// by itself: an attach on a connection kept from earlier that fails as
    /// unreachable gets one more try, on a new connection.
    async fn attach_receiver(&self) -> Result<(u64, ServiceBusReceiver)> {
        let mut client_slot = self.conn.slot.lock().await;
        let mut kept = client_slot.is_some();
        loop {
            let (generation, client) = self.client(&mut client_slot).await?;
            let options = ServiceBusReceiverOptions {
                sub_queue: match self.sub_queue {
                    ServiceBusSubQueue::DeadLetter => SubQueue::DeadLetter,
                    ServiceBusSubQueue::TransferDeadLetter => SubQueue::TransferDeadLetter,
                },
                receive_mode: ServiceBusReceiveMode::PeekLock,
                prefetch_count: 0,
                ..Default::default()
            };
            let attach = async {
                match &self.entity {
                    Entity::Queue(q) => client.create_receiver_for_queue(q.clone(), options).await,
                    Entity::Subscription { topic, subscription } => {
                        client
                            .create_receiver_for_subscription(topic.clone(), subscription.clone(), options)
                            .await
                    }
                }
            };
            let err = match tokio::time::timeout(CALL_TIMEOUT, attach).await {
                Ok(Ok(receiver)) => return Ok((generation, receiver)),
                Ok(Err(e)) => self.classify("attach to the dead-letter queue", &e),
                Err(_) => self.unreachable("attaching to the dead-letter queue timed out"),
            };
            if !matches!(err, BackendError::Unreachable { .. }) {
                return Err(err);
            }
            // Forgotten, so that the next call (or the retry) reconnects.
            self.conn.set(&mut client_slot, None);
            if !std::mem::take(&mut kept) {
                return Err(err);
            }
            tracing::debug!(queue = %self.queue_name, error = %err, "attach on a kept connection failed: reconnecting");
        }
    }

    /// Drop the DLQ receiver after a failed call, and the connection too when
    /// the failure was the connection's (unreachable, timed out): other
    /// queues share it, so an error of this entity alone leaves it open.
    async fn drop_receiver(&self, slot: &mut Option<(ServiceBusReceiver, Instant)>, connection: bool) {
        *slot = None;
        if connection {
            self.reset(self.receiver_generation.load(Ordering::Relaxed)).await;
        }
    }

    fn to_model(&self, raw: &Message<Body<Value>>, fields: Fields) -> DlqMessage {
        let mut attributes = Attributes::new();
        if let Some(props) = &raw.application_properties {
            for (k, v) in props.0.iter() {
                attributes.insert(k.clone(), attribute_from_amqp(v));
            }
        }
        let mut properties = Properties::new();
        let (body, body_type) = body_bytes(&raw.body);
        if let Some(t) = body_type {
            properties.insert(PROP_BODY_TYPE.into(), t.into());
        }
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                properties.insert(k.into(), v);
            }
        };
        put(PROP_MESSAGE_ID, fields.message_id.clone());
        put(PROP_SEQUENCE_NUMBER, Some(fields.sequence_number.to_string()));
        put(PROP_CORRELATION_ID, fields.correlation_id);
        put(PROP_SUBJECT, fields.subject);
        put(PROP_CONTENT_TYPE, fields.content_type);
        put(PROP_REPLY_TO, fields.reply_to);
        put(PROP_REPLY_TO_SESSION_ID, fields.reply_to_session_id);
        put(PROP_TO, fields.to);
        put(PROP_PARTITION_KEY, fields.partition_key);
        put(
            PROP_TIME_TO_LIVE,
            fields.time_to_live.map(|d| d.as_millis().to_string()),
        );
        put(PROP_DEAD_LETTER_SOURCE, fields.dead_letter_source);
        // A deferred message in a dead-letter queue is delivered to no
        // receiver link (a redrive leases it by sequence number): shown, so
        // that a user who receives from the DLQ can tell why it never comes.
        let state = match annotation(raw, "x-opt-message-state") {
            Some(Value::Long(1) | Value::Int(1)) => Some("deferred"),
            Some(Value::Long(2) | Value::Int(2)) => Some("scheduled"),
            _ => None,
        };
        put(PROP_MESSAGE_STATE, state.map(str::to_string));
        if let Entity::Subscription { subscription, .. } = &self.entity {
            put(PROP_SOURCE_SUBSCRIPTION, Some(subscription.clone()));
        }
        DlqMessage {
            id: message_key(fields.message_id.as_deref(), fields.sequence_number),
            body,
            reason: fields.reason,
            description: fields.description,
            delivery_count: fields.delivery_count,
            enqueued_at: Some(fields.enqueued_at),
            source: Some(
                self.config_source
                    .clone()
                    .unwrap_or_else(|| self.entity.parent().to_string()),
            ),
            ordering_key: fields.session_id,
            properties,
            attributes,
        }
    }

    /// Up to `max` messages from the DLQ's browse, from sequence number 1.
    async fn browse(&self, max: usize) -> Result<Vec<DlqMessage>> {
        let mut out = Vec::new();
        self.browse_each(max, &mut |m| {
            out.push(m);
            true
        })
        .await?;
        Ok(out)
    }

    /// The DLQ's browse, from sequence number 1, each message handed to
    /// `visit` (false: stop) and dropped; returns how many it was handed.
    async fn browse_each(&self, max: usize, visit: &mut (dyn FnMut(DlqMessage) -> bool + Send)) -> Result<usize> {
        let mut handed = 0;
        self.walk(max, |page| {
            for m in page {
                let raw = m.raw_amqp_message();
                handed += 1;
                if !visit(self.to_model(raw, fields_of(raw))) {
                    return false;
                }
            }
            true
        })
        .await?;
        Ok(handed)
    }

    /// Depth and age by browsing, for credentials without the Manage right
    /// that the counts need (a Listen and Send rule, what a team is usually
    /// given): exact up to `browse_count_limit` messages, a floor beyond.
    /// A page at a time, so a sidecar holds no more than a page of bodies.
    async fn browse_count(&self) -> Result<DlqStats> {
        let mut oldest = None;
        let now = Utc::now();
        let depth = self
            .walk(self.browse_count_limit, |page| {
                if oldest.is_none()
                    && let Some(m) = page.first()
                {
                    let raw = m.raw_amqp_message();
                    oldest = self.to_model(raw, fields_of(raw)).age(now);
                }
                true
            })
            .await?;
        Ok(DlqStats {
            depth: depth as u64,
            in_flight: None,
            oldest_age: oldest,
            exactness: if depth < self.browse_count_limit {
                Exactness::Exact
            } else {
                Exactness::AtLeast
            },
            oldest_age_exactness: None,
        })
    }

    /// Walks the dead-letter queue by true peek from its first message, a
    /// page at a time (of about 4 MiB at the size of the last page's
    /// bodies, [`super::peek_page`]), until `max` messages, its end or
    /// `visit` returns false; hands each page to `visit` and returns how
    /// many it saw.
    async fn walk(&self, max: usize, mut visit: impl FnMut(&[ServiceBusPeekedMessage]) -> bool) -> Result<usize> {
        let mut last = None;
        let mut seen = 0;
        let mut from: i64 = 1;
        let mut slot = self.receiver.lock().await;
        // A receiver kept from an earlier call may have been detached since
        // (Azure detaches idle links, and links on a namespace it moves), and
        // azservicebus then fails the next peek ("IllegalState") instead of
        // attaching again. Such a failure gets one more try, on a new link.
        let mut stale = false;
        let mut retried = false;
        while seen < max {
            let rx = self.ensure_receiver(&mut slot, &mut stale).await?;
            let n = super::peek_page(last, PEEK_PAGE).min(max - seen) as u32;
            let page = match tokio::time::timeout(CALL_TIMEOUT, rx.peek_messages(n, Some(from))).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    let err = self.classify("peek", &e);
                    let unreachable = matches!(err, BackendError::Unreachable { .. });
                    self.drop_receiver(&mut slot, unreachable).await;
                    let retry = stale
                        && !retried
                        && matches!(err, BackendError::Provider { .. } | BackendError::Unreachable { .. });
                    if retry {
                        tracing::debug!(queue = %self.queue_name, error = %err, "peek on a kept link failed: attaching a new one");
                        retried = true;
                        continue;
                    }
                    return Err(err);
                }
                Err(_) => {
                    self.drop_receiver(&mut slot, true).await;
                    return Err(self.unreachable("peek timed out"));
                }
            };
            if page.is_empty() {
                break;
            }
            for m in &page {
                from = from.max(m.sequence_number() + 1);
            }
            let page = &page[..page.len().min(max - seen)];
            let bytes = page.iter().map(|m| m.body().map_or(0, <[u8]>::len)).sum();
            last = Some((bytes, page.len()));
            seen += page.len();
            if !visit(page) {
                break;
            }
        }
        Ok(seen)
    }

    /// The AMQP message of the copy of `o` to `dest`.
    fn outgoing_message(&self, o: &Outgoing, dest: &str) -> Result<Message<Body<Value>>, String> {
        // Built without its body and application properties, which are put
        // in once, below.
        let mut m = ServiceBusMessage::new(Vec::new());
        m.set_message_id(copy_message_id(&o.dedup_id))
            .map_err(|e| e.to_string())?;
        let p = |k: &str| o.properties.get(k).cloned();
        if let Some(s) = &o.ordering_key {
            m.set_session_id(s.clone()).map_err(|e| e.to_string())?;
        }
        if let Some(pk) = p(PROP_PARTITION_KEY) {
            // Service Bus requires PartitionKey == SessionId when both are set.
            if o.ordering_key.as_ref().is_none_or(|s| *s == pk) {
                m.set_partition_key(pk).map_err(|e| e.to_string())?;
            }
        }
        m.set_correlation_id(p(PROP_CORRELATION_ID));
        m.set_subject(p(PROP_SUBJECT));
        m.set_content_type(p(PROP_CONTENT_TYPE));
        m.set_reply_to(p(PROP_REPLY_TO));
        m.set_to(p(PROP_TO));
        if let Some(r) = p(PROP_REPLY_TO_SESSION_ID) {
            m.set_reply_to_session_id(Some(r)).map_err(|e| e.to_string())?;
        }
        if let Some(ttl) = p(PROP_TIME_TO_LIVE).and_then(|t| t.parse::<u64>().ok()) {
            m.set_time_to_live(Some(Duration::from_millis(ttl)))
                .map_err(|e| e.to_string())?;
        }
        let mut props = ApplicationProperties::default();
        for (k, a) in &o.attributes {
            props.0.insert(k.clone(), attribute_to_amqp(a)?);
        }
        if let (Some(prop), Some(sub)) = (&self.target_property, o.properties.get(PROP_SOURCE_SUBSCRIPTION)) {
            // Only copies that go back to the topic of the failing subscription
            // are targeted; a `--to` elsewhere is left alone.
            if let Entity::Subscription { topic, .. } = &self.entity
                && topic.eq_ignore_ascii_case(dest)
            {
                props.0.insert(prop.clone(), SimpleValue::String(sub.clone()));
            }
        }
        // Put in after the copy out of the SDK's message, which can only be
        // read by reference: cloning the properties map cost a copy of every
        // attribute per message.
        let body = copy_body(&o.body, o.properties.get(PROP_BODY_TYPE).map(String::as_str))?;
        let mut raw = m.raw_amqp_message().clone();
        if !props.0.is_empty() {
            raw.application_properties = Some(props);
        }
        Ok(with_body(raw, body))
    }

    /// The sender link to `dest`, attached on first use and again after the
    /// dead-letter queue's link was reopened or the sender was forgotten.
    async fn dest_sender(&self, dest: &str) -> Result<Arc<DestSender>> {
        let mut senders = self.senders.lock().await;
        let link = self.link().await?;
        if let Some(s) = senders.get(dest)
            && s.generation == link.generation
        {
            return Ok(s.clone());
        }
        let sender = match link.sender(dest, &self.link_config).await {
            Ok(s) => s,
            Err(e) => {
                if matches!(e, BackendError::Unreachable { .. }) {
                    // A connection that cannot attach is not trusted with
                    // the next lease either.
                    self.drop_link(link.generation).await;
                }
                return Err(e);
            }
        };
        let max_message_size = sender
            .max_message_size()
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let s = Arc::new(DestSender {
            generation: link.generation,
            link: Mutex::new(sender),
            max_message_size,
            link_ended: link.ended(),
        });
        senders.insert(dest.to_string(), s.clone());
        Ok(s)
    }

    /// Forget `dest`'s sender if it is still `failed`: the next send attaches
    /// a new one (concurrent sends that failed on it attach only one).
    async fn forget_sender(&self, dest: &str, failed: &Arc<DestSender>) {
        let mut senders = self.senders.lock().await;
        if senders.get(dest).is_some_and(|s| Arc::ptr_eq(s, failed)) {
            senders.remove(dest);
        }
    }

    /// Send one envelope and wait for the broker's outcome, with a timeout
    /// and retries on a fresh sender link (after a pause, when Service Bus
    /// refused it as throttled).
    async fn send_envelope(&self, dest: &str, envelope: &Envelope) -> Result<(), BackendError> {
        let mut last = String::new();
        for attempt in 1..=SEND_ATTEMPTS {
            let sender = self.dest_sender(dest).await?;
            let sent = async {
                let mut link = sender.link.lock().await;
                // fe2o3-amqp reads a detach the broker sent (a deleted
                // destination, a token that lapsed) only when asked: a
                // transfer queued on that link would wait out SEND_TIMEOUT.
                if let Some(detached) = link.on_detach().now_or_never() {
                    return Err(SendFailure::Detached(detached));
                }
                let outcome = envelope.queue_on(&mut link).await?;
                drop(link);
                // fe2o3-amqp leaves the outcome pending when the connection
                // goes: without this a send would wait out SEND_TIMEOUT.
                tokio::select! {
                    biased;
                    outcome = outcome => Ok(outcome?),
                    () = sender.link_ended.cancelled() => Err(SendFailure::ConnectionEnded),
                }
            };
            match tokio::time::timeout(SEND_TIMEOUT, sent).await {
                Ok(Ok(Outcome::Accepted(_))) => return Ok(()),
                Ok(Ok(Outcome::Rejected(r))) => {
                    let busy = r
                        .error
                        .as_ref()
                        .is_some_and(|e| condition_name(&e.condition) == SERVER_BUSY);
                    let detail = r
                        .error
                        .map(|e| {
                            format!(
                                "{}: {}",
                                condition_name(&e.condition),
                                e.description.unwrap_or_default()
                            )
                        })
                        .unwrap_or_else(|| "no reason given".into());
                    if busy {
                        // Throttled: Azure asks for the send again after a
                        // pause ("Please wait 2 seconds and try again"), as
                        // the SDKs do.
                        last = format!("{dest} refused the copies: {detail}");
                        if attempt < SEND_ATTEMPTS {
                            tracing::warn!(%dest, attempt, "{last}; sending again in {SERVER_BUSY_WAIT:?}");
                            tokio::time::sleep(SERVER_BUSY_WAIT).await;
                        }
                        continue;
                    }
                    // The broker read the message and refused it (too large,
                    // quota, disabled entity): sending it again changes nothing.
                    let err = self.link_config.classify_entity(dest, "send", &detail);
                    return Err(match err {
                        BackendError::Unreachable { .. } => BackendError::Provider {
                            provider: PROVIDER,
                            detail: format!("{dest} refused the copies: {detail}"),
                        },
                        other => other,
                    });
                }
                Ok(Ok(other)) => last = format!("the broker answered {other:?}"),
                Ok(Err(e)) => {
                    self.forget_sender(dest, &sender).await;
                    let err = self.link_config.classify_entity(dest, "send", &e);
                    match err {
                        BackendError::NotFound { .. } | BackendError::Auth { .. } => return Err(err),
                        _ => last = err.to_string(),
                    }
                }
                Err(_) => {
                    // A lost settlement (fe2o3-amqp race): retry on a new link.
                    tracing::warn!(%dest, attempt, "send not confirmed within {SEND_TIMEOUT:?}; retrying");
                    self.forget_sender(dest, &sender).await;
                    last = format!("send not confirmed within {SEND_TIMEOUT:?}");
                }
            }
            tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
        }
        Err(BackendError::Provider {
            provider: PROVIDER,
            detail: format!("send to {dest} failed {SEND_ATTEMPTS} times: {last}"),
        })
    }

    /// A lease in its turn: once every lease started before it has been
    /// queued on the link, it is queued, the turn ends, and it waits for its
    /// deliveries.
    async fn lease_when_up(&self, turn: turns::Turn, max: usize) -> Result<Vec<Leased>> {
        let max = max.clamp(1, MAX_LEASE) as u32;
        turn.come_up().await;
        let link = self.link().await?;
        let queued = link.queue_lease(max, &self.link_config).await;
        drop(turn);
        let got = match queued {
            Ok(reply) => link.leased(reply, &self.link_config).await,
            Err(e) => Err(e),
        };
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                self.drop_link(link.generation).await;
                return Err(e);
            }
        };
        let mut out = Vec::with_capacity(got.len());
        let mut held = self.held.lock().expect("held lock");
        if held.generation != link.generation {
            // Leases of an older link can no longer be settled.
            *held = Held {
                generation: link.generation,
                infos: HashMap::new(),
            };
        }
        for d in got {
            let message = self.to_model(&d.message, fields_of(&d.message));
            let lease = match d.lock {
                link::Lock::Link(info) => {
                    let id = info.delivery_id();
                    held.infos.insert(id, info);
                    LeaseKind::Delivery {
                        generation: link.generation,
                        id,
                    }
                }
                link::Lock::Token(token) => LeaseKind::Token {
                    generation: link.generation,
                    token,
                },
            };
            out.push(Leased {
                message,
                lease: lease.id(),
            });
        }
        Ok(out)
    }

    /// The dead-letter queue's own link, opened on first use and again after
    /// it failed.
    async fn link(&self) -> Result<Arc<link::DlqLink>> {
        let mut slot = self.dlq.lock().await;
        if let Some(l) = slot.as_ref()
            && !l.is_closed()
        {
            return Ok(l.clone());
        }
        *slot = None;
        let generation = self.link_generations.fetch_add(1, Ordering::Relaxed) + 1;
        let opening = self.opening.lock().expect("opening lock").take();
        let l =
            Arc::new(link::DlqLink::open(self.link_config.clone(), generation, opening, self.send_to.clone()).await?);
        *slot = Some(l.clone());
        Ok(l)
    }

    /// The link of `generation`, if it is still the current one.
    async fn current_link(&self, generation: u64) -> Option<Arc<link::DlqLink>> {
        self.dlq
            .lock()
            .await
            .as_ref()
            .filter(|l| l.generation == generation && !l.is_closed())
            .cloned()
    }

    /// Forget the link of `generation` after a failure (its task ends and
    /// closes its connection once no call uses it), so the next lease opens a
    /// new one. What it held can no longer be settled; those locks lapse.
    async fn drop_link(&self, generation: u64) {
        let mut slot = self.dlq.lock().await;
        if slot.as_ref().is_some_and(|l| l.generation == generation) {
            *slot = None;
        }
        let mut held = self.held.lock().expect("held lock");
        if held.generation == generation {
            held.infos = HashMap::new();
        }
    }

    /// Take the delivery infos of `leases` out of the held set, in order
    /// (None: not held by the current link, or not a delivery), with the
    /// link's generation.
    fn take_held(&self, leases: &[LeaseId]) -> (u64, Vec<Option<DeliveryInfo>>) {
        let mut held = self.held.lock().expect("held lock");
        let generation = held.generation;
        let taken = leases
            .iter()
            .map(|l| match LeaseKind::of(l)? {
                LeaseKind::Delivery { generation: g, id } if g == generation => held.infos.remove(&id),
                _ => None,
            })
            .collect();
        if held.infos.is_empty() {
            // Give a pass's memory back once it released what it held.
            held.infos.shrink_to_fit();
        }
        (generation, taken)
    }

    /// Complete (`complete`) the deliveries among `leases`, each confirmed
    /// (see `link`); every other lease's result is a failure, for the
    /// caller to replace.
    async fn settle_deliveries(&self, leases: &[LeaseId]) -> Vec<SettleResult> {
        let (generation, taken) = self.take_held(leases);
        let mut out: Vec<SettleResult> = taken
            .iter()
            .map(|t| match t {
                Some(_) => SettleResult::Settled,
                None => SettleResult::Failed {
                    error: "the lock is no longer held (the link was reset or the lease already settled)".into(),
                },
            })
            .collect();
        let infos: Vec<DeliveryInfo> = taken.into_iter().flatten().collect();
        if !infos.is_empty() {
            let outcome = match self.current_link(generation).await {
                Some(link) => {
                    let r = link.dispose(infos, true, &self.link_config).await;
                    if r.is_err() {
                        self.drop_link(generation).await;
                    }
                    r
                }
                None => Err(self.unreachable("the dead-letter queue's link was reset")),
            };
            // A complete counts only once the broker has it (see `link`).
            if let Err(e) = outcome {
                for r in &mut out {
                    if matches!(r, SettleResult::Settled) {
                        *r = SettleResult::Failed {
                            error: format!("complete not confirmed: {e}"),
                        };
                    }
                }
            }
        }
        out
    }

    /// Abandon the deliveries among `leases`, confirmed.
    async fn release_deliveries(&self, leases: &[LeaseId]) -> Result<()> {
        let (generation, taken) = self.take_held(leases);
        let infos: Vec<DeliveryInfo> = taken.into_iter().flatten().collect();
        // Leases of a reset link are released anyway: their locks lapse.
        if infos.is_empty() {
            return Ok(());
        }
        let Some(link) = self.current_link(generation).await else {
            return Ok(());
        };
        // As for completes: an abandon still queued when the process exits
        // never reaches the broker, and the message stays locked for the
        // whole LockDuration, so it is confirmed too.
        if let Err(e) = link.dispose(infos, false, &self.link_config).await {
            self.drop_link(generation).await;
            return Err(e);
        }
        Ok(())
    }

    /// Complete (`complete`) or abandon deferred messages by their lock
    /// tokens, with each one's result and the error that failed them all, if
    /// one did. Through the current link's `$management`, opened if need be:
    /// a token names its lock without the link, so an earlier link's tokens
    /// are tried too. An abandoned message stays deferred.
    async fn settle_tokens(
        &self,
        tokens: Vec<(u64, uuid::Uuid)>,
        complete: bool,
    ) -> (Vec<SettleResult>, Option<BackendError>) {
        if tokens.is_empty() {
            return (Vec::new(), None);
        }
        let n = tokens.len();
        let verb = if complete { "complete" } else { "abandon" };
        let failed = |e: &BackendError| {
            (0..n)
                .map(|_| SettleResult::Failed {
                    error: format!("{verb} not confirmed: {e}"),
                })
                .collect()
        };
        let link = match self.link().await {
            Ok(link) => link,
            Err(e) => return (failed(&e), Some(e)),
        };
        let counted = tokens.iter().filter(|(g, _)| *g == link.generation).count();
        let tokens = tokens.into_iter().map(|(_, t)| t).collect();
        match link.settle_tokens(tokens, complete, counted, &self.link_config).await {
            Ok(outcomes) => {
                let results = outcomes
                    .into_iter()
                    .map(|o| match o {
                        None => SettleResult::Settled,
                        Some(error) => SettleResult::Failed {
                            error: format!("{verb} refused: {error}"),
                        },
                    })
                    .collect();
                (results, None)
            }
            Err(e) => {
                if matches!(e, BackendError::Unreachable { .. }) {
                    self.drop_link(link.generation).await;
                }
                (failed(&e), Some(e))
            }
        }
    }

    /// The ATOM management call: the depth of the managed sub-queue, or
    /// NotFound.
    async fn counts(&self) -> Result<u64> {
        let path = self.entity.path();
        let text = self.atom_get(&path).await?;
        let (_, dead) = parse_counts(&text).ok_or_else(|| BackendError::NotFound {
            queue: path.clone(),
            detail: format!("no such entity at {}", self.management),
        })?;
        match self.sub_queue {
            ServiceBusSubQueue::DeadLetter => Ok(dead),
            ServiceBusSubQueue::TransferDeadLetter => {
                parse_transfer_dead_letter_count(&text).ok_or_else(|| BackendError::Provider {
                    provider: PROVIDER,
                    detail: format!(
                        "the management GET of {path} at {} reports no CountDetails/TransferDeadLetterMessageCount",
                        self.management
                    ),
                })
            }
        }
    }

    /// Whether `name` is a queue or topic of the namespace: a redrive `--to`
    /// a mistyped name would otherwise fail only at its first send, after
    /// leasing (or, on an emulator that creates entities as they are named,
    /// not at all). Without the Manage right the namespace cannot be asked,
    /// and the send will tell.
    async fn check_destination(&self, name: &str) -> Result<()> {
        let text = match self.atom_get(name).await {
            Ok(text) => text,
            Err(BackendError::Auth { detail, .. }) if lacks_manage(&detail) || detail.contains(" 401") => {
                tracing::debug!(
                    destination = name,
                    "cannot check the destination without the Manage right"
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if text.contains("<QueueDescription") || text.contains("<TopicDescription") {
            // Known before anything is leased: Service Bus refuses every send
            // to a Disabled or SendDisabled entity.
            let status = text
                .split_once("<Status>")
                .and_then(|(_, rest)| rest.split_once("</Status>"))
                .map(|(s, _)| s.trim());
            if let Some(status @ ("Disabled" | "SendDisabled")) = status {
                return Err(BackendError::Provider {
                    provider: PROVIDER,
                    detail: format!(
                        "{name} is {status}: Service Bus refuses every send to it; set its status to Active first"
                    ),
                });
            }
            return Ok(());
        }
        Err(BackendError::NotFound {
            queue: name.to_string(),
            detail: format!("no queue or topic of that name at {}", self.management),
        })
    }

    /// The ATOM description of the entity at `path`, or NotFound.
    async fn atom_get(&self, path: &str) -> Result<String> {
        let path = path.to_string();
        let url = format!("{}/{}?api-version={API_VERSION}", self.management, path);
        let auth = match &self.auth {
            Auth::Sas(cs, _) => match &cs.signature {
                Some(sig) => sig.clone(),
                None => sas_token(
                    &format!("https://{}/{}", self.host, path.to_ascii_lowercase()),
                    cs.key_name.as_deref().unwrap_or_default(),
                    cs.key.as_deref().unwrap_or_default(),
                    unix_now() + SAS_TTL_SECS,
                ),
            },
            Auth::Entra(cred) => {
                let token = cred.fetch(&["https://servicebus.azure.net/.default"]).await?.0;
                format!("Bearer {token}")
            }
        };
        let resp = super::http_client()?
            .get(&url)
            .header("Authorization", auth)
            .send()
            .await
            .map_err(|e| {
                BackendError::unreachable(
                    self.management.clone(),
                    format!("management GET {url}: {e}: {}", super::root_cause(&e)),
                )
            })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| BackendError::Unreachable {
            endpoint: self.management.clone(),
            detail: e.to_string(),
        })?;
        match status.as_u16() {
            200 => {}
            401 | 403 => {
                let hint = if lacks_manage(&text) {
                    " (reading counts needs the Manage right)"
                } else {
                    ""
                };
                return Err(BackendError::Auth {
                    provider: PROVIDER,
                    detail: format!("management GET {url} answered {status}{hint}: {}", snippet(&text)),
                });
            }
            404 => {
                return Err(BackendError::NotFound {
                    queue: path,
                    detail: format!("management GET answered {status}"),
                });
            }
            _ => {
                return Err(BackendError::Provider {
                    provider: PROVIDER,
                    detail: format!("management GET {url} answered {status}: {}", snippet(&text)),
                });
            }
        }
        Ok(text)
    }
}

/// What a [`LeaseId`] names: a delivery on the dead-letter queue's receiver
/// link (`<link generation>.<delivery id>`), settled on that link, or a
/// deferred message's lock token from `$management`
/// (`<link generation>:<token>`), settled there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseKind {
    Delivery { generation: u64, id: u32 },
    Token { generation: u64, token: uuid::Uuid },
}

impl LeaseKind {
    fn id(self) -> LeaseId {
        LeaseId(match self {
            Self::Delivery { generation, id } => format!("{generation}.{id}"),
            Self::Token { generation, token } => format!("{generation}:{token}"),
        })
    }

    fn of(lease: &LeaseId) -> Option<Self> {
        if let Some((g, token)) = lease.0.split_once(':') {
            return Some(Self::Token {
                generation: g.parse().ok()?,
                token: token.parse().ok()?,
            });
        }
        let (g, id) = lease.0.split_once('.')?;
        Some(Self::Delivery {
            generation: g.parse().ok()?,
            id: id.parse().ok()?,
        })
    }
}

/// The lock tokens among `leases`, with their link generations, and where
/// each stands in `leases`.
fn lock_tokens(leases: &[LeaseId]) -> (Vec<(u64, uuid::Uuid)>, Vec<usize>) {
    leases
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match LeaseKind::of(l)? {
            LeaseKind::Token { generation, token } => Some(((generation, token), i)),
            LeaseKind::Delivery { .. } => None,
        })
        .unzip()
}

/// The fields the peeked and received message types both have.
struct Fields {
    message_id: Option<String>,
    sequence_number: i64,
    correlation_id: Option<String>,
    subject: Option<String>,
    content_type: Option<String>,
    reply_to: Option<String>,
    reply_to_session_id: Option<String>,
    to: Option<String>,
    partition_key: Option<String>,
    session_id: Option<String>,
    time_to_live: Option<Duration>,
    dead_letter_source: Option<String>,
    reason: Option<String>,
    description: Option<String>,
    delivery_count: Option<u32>,
    enqueued_at: DateTime<Utc>,
}

/// The system properties of a message, read as azservicebus reads them
/// (`ServiceBusReceivedMessage`), but tolerant of unexpected types: a
/// message this adapter cannot interpret still goes through.
fn fields_of(m: &Message<Body<Value>>) -> Fields {
    let props = m.properties.as_ref();
    let id = |v: &MessageId| match v {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => format!("{u:x}"),
        MessageId::Binary(b) => format!("{:X}", serde_amqp::primitives::BinaryRef::from(b)),
    };
    let annotation_str = |k: &str| match annotation(m, k) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let app_str = |k: &str| match m.application_properties.as_ref().and_then(|a| a.0.get(k)) {
        Some(SimpleValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let enqueued_ms = match annotation(m, "x-opt-enqueued-time") {
        Some(Value::Timestamp(t)) => t.milliseconds(),
        _ => 0,
    };
    Fields {
        message_id: props.and_then(|p| p.message_id.as_ref()).map(id),
        sequence_number: link::sequence_number(m).unwrap_or_default(),
        correlation_id: props.and_then(|p| p.correlation_id.as_ref()).map(id),
        subject: props.and_then(|p| p.subject.clone()),
        content_type: props.and_then(|p| p.content_type.as_ref()).map(|s| s.0.clone()),
        reply_to: props.and_then(|p| p.reply_to.clone()),
        reply_to_session_id: props.and_then(|p| p.reply_to_group_id.clone()),
        to: props.and_then(|p| p.to.clone()),
        partition_key: annotation_str("x-opt-partition-key"),
        session_id: props.and_then(|p| p.group_id.clone()),
        time_to_live: m
            .header
            .as_ref()
            .and_then(|h| h.ttl)
            .map(|ms| Duration::from_millis(ms as u64)),
        dead_letter_source: annotation_str("x-opt-deadletter-source"),
        reason: app_str(DEAD_LETTER_REASON),
        description: app_str(DEAD_LETTER_DESCRIPTION),
        delivery_count: m.header.as_ref().map(|h| h.delivery_count.saturating_add(1)),
        enqueued_at: DateTime::<Utc>::from_timestamp_millis(enqueued_ms).unwrap_or_default(),
    }
}

/// A message annotation by its symbol key.
fn annotation<'a>(m: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    m.message_annotations
        .as_ref()?
        .0
        .iter()
        .find_map(|(k, v)| matches!(k, OwnedKey::Symbol(s) if s.0 == key).then_some(v))
}

fn namespace_host(ns: &str) -> String {
    let ns = ns.trim();
    let rest = ns.split_once("://").map_or(ns, |(_, r)| r);
    let host = rest.split(['/', ':']).next().unwrap_or_default().to_ascii_lowercase();
    if host.contains('.') {
        host
    } else {
        format!("{host}.servicebus.windows.net")
    }
}

/// Whether a refusal of the management endpoint is for want of the Manage
/// right (Azure: "Manage,EntityRead claims required for this operation.",
/// which the emulator says too), not a bad token.
fn lacks_manage(refusal: &str) -> bool {
    let lower = refusal.to_ascii_lowercase();
    lower.contains("manage") && lower.contains("claim")
}

/// How long before an Entra ID token expires azservicebus should renew it:
/// a sixth of a short-lived token's life (as SAS tokens are renewed), four
/// minutes of a long one. Always less than `fetch`'s five-minute cache
/// window, so the renewal fetches a new token, not the cached one.
fn renew_ahead(valid_secs: u64) -> Duration {
    if valid_secs > 600 {
        Duration::from_secs(240)
    } else {
        Duration::from_millis(valid_secs * 1000 / 6)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn snippet(text: &str) -> String {
    text.chars().take(300).collect()
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A Service Bus SAS token: HMAC-SHA256 over `<url-encoded resource>\n<expiry>`.
pub fn sas_token(resource: &str, key_name: &str, key: &str, expiry: u64) -> String {
    use base64::Engine as _;
    let sr = urlencode(resource);
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}",
        urlencode(&sig),
        urlencode(key_name)
    )
}

/// `(ActiveMessageCount, DeadLetterMessageCount)` from an ATOM entry; None
/// for an empty feed (Azure's answer for a missing entity).
pub fn parse_counts(xml: &str) -> Option<(u64, u64)> {
    let [active, dead, _] = count_details(xml);
    Some((active.unwrap_or(0), dead?))
}

/// `TransferDeadLetterMessageCount` from an ATOM entry, when it has one.
pub fn parse_transfer_dead_letter_count(xml: &str) -> Option<u64> {
    count_details(xml)[2]
}

/// The active, dead-letter and transfer dead-letter counts of an ATOM
/// entry, in Service Bus's namespace (anything else of those names is not
/// the count).
fn count_details(xml: &str) -> [Option<u64>; 3] {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    let mut reader = quick_xml::NsReader::from_str(xml);
    let mut current: Option<usize> = None;
    let mut counts = [None; 3];
    loop {
        match reader.read_resolved_event() {
            Ok((ResolveResult::Bound(ns), Event::Start(e))) if ns.as_ref() == SB_XML_NS => {
                current = match e.local_name().as_ref() {
                    b"ActiveMessageCount" => Some(0),
                    b"DeadLetterMessageCount" => Some(1),
                    b"TransferDeadLetterMessageCount" => Some(2),
                    _ => None,
                };
            }
            Ok((_, Event::Text(t))) => {
                if let Some(which) = current {
                    counts[which] = t.decode().ok().and_then(|s| s.trim().parse::<u64>().ok());
                }
            }
            Ok((_, Event::End(_))) => current = None,
            Ok((_, Event::Eof)) | Err(_) => break,
            _ => {}
        }
    }
    counts
}

/// The path of a dead-letter sub-queue below its entity.
fn sub_queue_suffix(sub_queue: ServiceBusSubQueue) -> &'static str {
    match sub_queue {
        ServiceBusSubQueue::DeadLetter => "$DeadLetterQueue",
        ServiceBusSubQueue::TransferDeadLetter => "$Transfer/$DeadLetterQueue",
    }
}

/// The body bytes, and a note when the body was not data sections.
#[doc(hidden)]
pub fn body_bytes(body: &Body<Value>) -> (Bytes, Option<&'static str>) {
    match body {
        Body::Data(sections) => {
            if sections.len() == 1 {
                (Bytes::copy_from_slice(sections[0].0.as_ref()), None)
            } else {
                let mut all = Vec::new();
                for s in sections.iter() {
                    all.extend_from_slice(s.0.as_ref());
                }
                (Bytes::from(all), None)
            }
        }
        Body::Value(v) => match &v.0 {
            Value::String(s) => (Bytes::from(s.clone()), Some(BODY_VALUE_STRING)),
            Value::Binary(b) => (Bytes::copy_from_slice(b.as_ref()), Some(BODY_VALUE_BINARY)),
            other => (Bytes::from(encode_value(other)), Some(BODY_VALUE_ENCODED)),
        },
        Body::Sequence(sections) => {
            let lists: Vec<&Vec<Value>> = sections.iter().map(|s| &s.0).collect();
            (Bytes::from(encode_value(&lists)), Some(BODY_SEQUENCE))
        }
        Body::Empty => (Bytes::new(), None),
    }
}

/// The AMQP encoding of a body's value or sequences. Values decoded from the
/// wire always encode again.
fn encode_value(v: &impl serde::Serialize) -> Vec<u8> {
    serde_amqp::to_vec(v).unwrap_or_default()
}

/// The copy's body: the section kind the original had (`body_type`, from
/// [`body_bytes`]), so that a consumer reads the copy as it would have read
/// the original: a JMS TextMessage is an amqp-value string, a MapMessage an
/// amqp-value map, a StreamMessage amqp-sequence sections.
#[doc(hidden)]
pub fn copy_body(body: &Bytes, body_type: Option<&str>) -> Result<Body<Value>, String> {
    let undecodable = |e: serde_amqp::Error| {
        format!("the body (body_type {body_type:?}) is not the AMQP encoding it was read as: {e}")
    };
    Ok(match body_type {
        Some(BODY_VALUE_STRING) => match std::str::from_utf8(body) {
            Ok(s) => Body::Value(AmqpValue(Value::String(s.to_string()))),
            Err(_) => return Err("the body (body_type amqp-value, a string) is not UTF-8".into()),
        },
        Some(BODY_VALUE_BINARY) => Body::Value(AmqpValue(Value::Binary(Binary::from(body.to_vec())))),
        Some(BODY_VALUE_ENCODED) => Body::Value(AmqpValue(serde_amqp::from_slice(body).map_err(undecodable)?)),
        Some(BODY_SEQUENCE) => {
            let lists: Vec<Vec<Value>> = serde_amqp::from_slice(body).map_err(undecodable)?;
            if lists.is_empty() {
                return Err("the body (body_type amqp-sequence) holds no sequence section".into());
            }
            Body::Sequence(Batch::from(lists.into_iter().map(AmqpSequence).collect::<Vec<_>>()))
        }
        _ => Body::Data(Batch::from(vec![Data(Binary::from(body.to_vec()))])),
    })
}

/// `m` (the SDK's message, which has a data section) with `body` instead.
fn with_body(m: Message<Data>, body: Body<Value>) -> Message<Body<Value>> {
    Message {
        header: m.header,
        delivery_annotations: m.delivery_annotations,
        message_annotations: m.message_annotations,
        properties: m.properties,
        application_properties: m.application_properties,
        body,
        footer: m.footer,
    }
}

/// A copy's AMQP encoding, in a buffer sized for its body up front (growing
/// it by doubling copied each body several times).
fn encode(m: &Message<Body<Value>>) -> std::result::Result<Vec<u8>, serde_amqp::Error> {
    use serde::Serialize;
    let body = match &m.body {
        Body::Data(sections) => sections.iter().map(|d| d.0.len()).sum(),
        _ => 0,
    };
    let mut buf = Vec::with_capacity(body + ENCODED_HEADROOM);
    Serializable(m).serialize(&mut serde_amqp::ser::Serializer::new(&mut buf))?;
    Ok(buf)
}

/// The size of a batch envelope around `first` and no message yet: the
/// envelope carries the first message's properties and annotations.
fn envelope_base(first: &Message<Body<Value>>) -> usize {
    let empty = Message::builder()
        .properties(first.properties.clone())
        .message_annotations(first.message_annotations.clone())
        .data(Binary::new())
        .build();
    // A failed encoding fails the message's own encoding too, before this counts.
    serde_amqp::to_vec(&Serializable(empty)).map_or(0, |v| v.len()) + BATCH_ITEM_OVERHEAD
}

/// Consecutive batches of messages of encoded `sizes` that fit the link's
/// `max` bytes and [`MAX_BATCH_BYTES`], at most [`BATCH`] messages each;
/// `base(i)` is the size of an envelope that message `i` starts, asked only
/// of the messages that start one. A message too large for a batch goes in
/// one of its own, sent as a lone message (`send` fails those larger than
/// the link's maximum before they get here).
fn pack(sizes: &[usize], base: impl Fn(usize) -> usize, max: usize) -> Vec<std::ops::Range<usize>> {
    let max = max.min(MAX_BATCH_BYTES);
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        let mut total = base(start) + sizes[start] + BATCH_ITEM_OVERHEAD;
        let mut end = start + 1;
        while end < sizes.len() && end - start < BATCH && total + sizes[end] + BATCH_ITEM_OVERHEAD <= max {
            total += sizes[end] + BATCH_ITEM_OVERHEAD;
            end += 1;
        }
        ranges.push(start..end);
        start = end;
    }
    ranges
}

/// The envelope of `batch` (with each message's encoding in `encoded`), and
/// which results it answers: each message's index and MessageId.
fn envelope(mut batch: Vec<(usize, Message<Body<Value>>)>, encoded: Vec<Vec<u8>>) -> (Vec<(usize, String)>, Envelope) {
    let id = |m: &Message<Body<Value>>| match m.properties.as_ref().and_then(|p| p.message_id.as_ref()) {
        Some(MessageId::String(s)) => s.clone(),
        _ => String::new(),
    };
    let index = batch.iter().map(|(i, m)| (*i, id(m))).collect();
    if batch.len() == 1 {
        let (_, message) = batch.pop().expect("one message");
        return (index, Envelope::Single(Sendable::builder().message(message).build()));
    }
    let (_, first) = &batch[0];
    let message = Message::builder()
        .properties(first.properties.clone())
        .message_annotations(first.message_annotations.clone())
        .body(Batch::from(
            encoded.into_iter().map(|e| Data(Binary::from(e))).collect::<Vec<_>>(),
        ))
        .build();
    let sendable = Sendable::builder()
        .message(message)
        .message_format(BATCH_MESSAGE_FORMAT)
        .build();
    (index, Envelope::Batch(sendable))
}

/// A message's `id`: its MessageId and its SequenceNumber (`order-42@1187`),
/// or `seq-1187` when it has no MessageId. A MessageId alone does not name
/// one message: senders choose them, and reuse them. Two DLQ messages under
/// one MessageId would share a copy MessageId, so with duplicate detection on
/// the destination the second copy would be dropped, and its original then
/// completed; and a pass's seen-set would skip the second as already
/// examined. The sequence number is unique in the entity and stays with the
/// message in its DLQ, so a crash-resend still gets the same copy MessageId.
fn message_key(message_id: Option<&str>, sequence_number: i64) -> String {
    match message_id {
        Some(id) => format!("{id}@{sequence_number}"),
        None => format!("seq-{sequence_number}"),
    }
}

/// The copy's MessageId: the engine's dedup ID (`<original>-<count>`), hashed
/// when longer than Service Bus allows.
fn copy_message_id(dedup_id: &str) -> String {
    if dedup_id.len() <= MAX_MESSAGE_ID {
        return dedup_id.to_string();
    }
    let digest = Sha256::digest(dedup_id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("dlq-bridge-{hex}")
}

fn typed(value: AttrValue, t: &str) -> Attribute {
    Attribute {
        value,
        data_type: Some(t.to_string()),
    }
}

fn plain(value: AttrValue) -> Attribute {
    Attribute { value, data_type: None }
}

pub fn attribute_from_amqp(v: &SimpleValue) -> Attribute {
    match v {
        SimpleValue::Null => typed(AttrValue::String(String::new()), "null"),
        SimpleValue::Bool(b) => plain(AttrValue::Bool(*b)),
        SimpleValue::Ubyte(n) => typed(AttrValue::Int(*n as i64), "ubyte"),
        SimpleValue::Ushort(n) => typed(AttrValue::Int(*n as i64), "ushort"),
        SimpleValue::Uint(n) => typed(AttrValue::Int(*n as i64), "uint"),
        SimpleValue::Ulong(n) => match i64::try_from(*n) {
            Ok(i) => typed(AttrValue::Int(i), "ulong"),
            Err(_) => typed(AttrValue::Number(n.to_string()), "ulong"),
        },
        SimpleValue::Byte(n) => typed(AttrValue::Int(*n as i64), "byte"),
        SimpleValue::Short(n) => typed(AttrValue::Int(*n as i64), "short"),
        SimpleValue::Int(n) => typed(AttrValue::Int(*n as i64), "int"),
        SimpleValue::Long(n) => plain(AttrValue::Int(*n)),
        SimpleValue::Float(f) => typed(AttrValue::Float(f.into_inner() as f64), "float"),
        SimpleValue::Double(f) => plain(AttrValue::Float(f.into_inner())),
        SimpleValue::Decimal32(d) => typed(
            AttrValue::Binary(Bytes::copy_from_slice(&d.clone().into_inner())),
            "decimal32",
        ),
        SimpleValue::Decimal64(d) => typed(
            AttrValue::Binary(Bytes::copy_from_slice(&d.clone().into_inner())),
            "decimal64",
        ),
        SimpleValue::Decimal128(d) => typed(
            AttrValue::Binary(Bytes::copy_from_slice(&d.clone().into_inner())),
            "decimal128",
        ),
        SimpleValue::Char(c) => typed(AttrValue::String(c.to_string()), "char"),
        // AMQP timestamps span ±292 million years, chrono's ±262,000: one
        // outside that is kept as its milliseconds, labelled, so the copy
        // still carries a timestamp (found by the `attributes` fuzz target).
        SimpleValue::Timestamp(t) => match DateTime::<Utc>::from_timestamp_millis(t.milliseconds()) {
            Some(ts) => plain(AttrValue::Timestamp(ts)),
            None => typed(AttrValue::Int(t.milliseconds()), "timestamp"),
        },
        SimpleValue::Uuid(u) => plain(AttrValue::Uuid(uuid::Uuid::from_bytes(u.clone().into_inner()))),
        SimpleValue::Binary(b) => plain(AttrValue::Binary(Bytes::copy_from_slice(b.as_ref()))),
        SimpleValue::String(s) => plain(AttrValue::String(s.clone())),
        SimpleValue::Symbol(s) => typed(AttrValue::String(s.0.clone()), "symbol"),
        SimpleValue::Described(d) => {
            let descriptor = match &d.descriptor {
                serde_amqp::descriptor::Descriptor::Name(s) => s.0.clone(),
                serde_amqp::descriptor::Descriptor::Code(c) => format!("0x{c:016x}"),
            };
            let inner = match &d.value {
                Value::Long(n) => AttrValue::Int(*n),
                Value::String(s) => AttrValue::String(s.clone()),
                Value::Binary(b) => AttrValue::Binary(Bytes::copy_from_slice(b.as_ref())),
                other => AttrValue::String(format!("{other:?}")),
            };
            typed(inner, &format!("described:{descriptor}"))
        }
    }
}

pub fn attribute_to_amqp(a: &Attribute) -> Result<SimpleValue, String> {
    let t = a.data_type.as_deref().unwrap_or("");
    let int = |i: i64| -> Result<SimpleValue, String> {
        let range = |_| format!("{i} does not fit AMQP type {t}");
        Ok(match t {
            "ubyte" => SimpleValue::Ubyte(u8::try_from(i).map_err(range)?),
            "ushort" => SimpleValue::Ushort(u16::try_from(i).map_err(range)?),
            "uint" => SimpleValue::Uint(u32::try_from(i).map_err(range)?),
            "ulong" => SimpleValue::Ulong(u64::try_from(i).map_err(range)?),
            "byte" => SimpleValue::Byte(i8::try_from(i).map_err(range)?),
            "short" => SimpleValue::Short(i16::try_from(i).map_err(range)?),
            "int" => SimpleValue::Int(i32::try_from(i).map_err(range)?),
            "timestamp" => SimpleValue::Timestamp(Timestamp::from_milliseconds(i)),
            _ => SimpleValue::Long(i),
        })
    };
    if let Some(descriptor) = t.strip_prefix("described:") {
        let value = match &a.value {
            AttrValue::Int(n) => Value::Long(*n),
            AttrValue::Binary(b) => Value::Binary(b.to_vec().into()),
            _ => Value::String(a.as_text()),
        };
        let descriptor = match descriptor.strip_prefix("0x").map(|h| u64::from_str_radix(h, 16)) {
            Some(Ok(code)) => serde_amqp::descriptor::Descriptor::Code(code),
            _ => serde_amqp::descriptor::Descriptor::Name(Symbol::from(descriptor)),
        };
        return Ok(SimpleValue::Described(Box::new(serde_amqp::described::Described {
            descriptor,
            value,
        })));
    }
    Ok(match &a.value {
        AttrValue::String(s) => match t {
            "null" if s.is_empty() => SimpleValue::Null,
            "symbol" => SimpleValue::Symbol(Symbol::from(s.as_str())),
            "char" if s.chars().count() == 1 => SimpleValue::Char(s.chars().next().expect("one char")),
            _ => SimpleValue::String(s.clone()),
        },
        AttrValue::Number(n) => match (t, n.parse::<u64>()) {
            ("ulong", Ok(u)) => SimpleValue::Ulong(u),
            _ => SimpleValue::String(n.clone()),
        },
        AttrValue::Binary(b) => match t {
            "decimal32" => SimpleValue::Decimal32(Dec32::try_from(b.as_ref()).map_err(|e| format!("{e:?}"))?),
            "decimal64" => SimpleValue::Decimal64(Dec64::try_from(b.as_ref()).map_err(|e| format!("{e:?}"))?),
            "decimal128" => SimpleValue::Decimal128(Dec128::try_from(b.as_ref()).map_err(|e| format!("{e:?}"))?),
            _ => SimpleValue::Binary(b.to_vec().into()),
        },
        AttrValue::Bool(b) => SimpleValue::Bool(*b),
        AttrValue::Int(i) => int(*i)?,
        AttrValue::Float(f) => match t {
            "float" => SimpleValue::Float((*f as f32).into()),
            _ => SimpleValue::Double((*f).into()),
        },
        AttrValue::Timestamp(ts) => SimpleValue::Timestamp(Timestamp::from_milliseconds(ts.timestamp_millis())),
        AttrValue::Uuid(u) => SimpleValue::Uuid(AmqpUuid::from(*u.as_bytes())),
    })
}

/// An AMQP error condition as the broker named it (`amqp:resource-limit-exceeded`,
/// `com.microsoft:entity-disabled`), which is what Azure's documentation
/// and its exception names go by, not the client library's enum.
fn condition_name(condition: &ErrorCondition) -> String {
    let symbol = match condition {
        ErrorCondition::AmqpError(e) => Symbol::from(e),
        ErrorCondition::ConnectionError(e) => Symbol::from(e),
        ErrorCondition::SessionError(e) => Symbol::from(e),
        ErrorCondition::LinkError(e) => Symbol::from(e),
        ErrorCondition::Custom(s) => s.clone(),
        #[allow(unreachable_patterns)]
        other => return format!("{other:?}"),
    };
    symbol.0
}

/// What the broker said when it refused a call, read from an AMQP error
/// condition (an attach answered with a detach, a link detached) or a
/// `$cbs`/`$management` status code in an error's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `amqp:unauthorized-access`, status 401 or 403.
    Unauthorized,
    /// `amqp:not-found`, `amqp:resource-deleted`, status 404.
    NotFound,
    /// `com.microsoft:entity-disabled`.
    Disabled,
    /// Any other refusal, which asking again will not change
    /// (`amqp:not-allowed`, `amqp:resource-limit-exceeded`, status 400...):
    /// the condition's symbol or the status.
    Refused(String),
    /// A condition that passes (a forced detach or close, the broker busy or
    /// timing out): the link or connection is to be opened again.
    Transient,
}

/// The broker's condition or status in an error's text (its `Debug`, or
/// azservicebus's `Display`, which quotes fe2o3-amqp's), as a [`Refusal`];
/// None when there is none (an I/O error, a timeout, a local state).
pub(super) fn refusal_in(text: &str) -> Option<Refusal> {
    if let Some(symbol) = condition_in(text) {
        return Some(match symbol.as_str() {
            "amqp:unauthorized-access" => Refusal::Unauthorized,
            "amqp:not-found" | "amqp:resource-deleted" => Refusal::NotFound,
            "com.microsoft:entity-disabled" => Refusal::Disabled,
            "amqp:internal-error"
            | "amqp:illegal-state"
            | "amqp:link:detach-forced"
            | "amqp:link:stolen"
            | "amqp:link:redirect"
            | "com.microsoft:server-busy"
            | "com.microsoft:timeout"
            | "com.microsoft:operation-cancelled" => Refusal::Transient,
            s if s.starts_with("amqp:connection:") || s.starts_with("amqp:session:") => Refusal::Transient,
            _ => Refusal::Refused(symbol),
        });
    }
    let code: u16 = text
        .split_once("StatusCode(")?
        .1
        .split(')')
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some(match code {
        401 | 403 => Refusal::Unauthorized,
        404 | 410 => Refusal::NotFound,
        408 | 429 => Refusal::Transient,
        400..=499 => Refusal::Refused(format!("status {code}")),
        _ => Refusal::Transient,
    })
}

/// The AMQP condition named in fe2o3-amqp's `Debug` of an error
/// (`condition: AmqpError(NotAllowed)`,
/// `condition: Custom(Symbol("com.microsoft:entity-disabled"))`), as the
/// broker's symbol (`amqp:not-allowed`).
fn condition_in(text: &str) -> Option<String> {
    let rest = text.split_once("condition: ")?.1;
    if let Some(custom) = rest.strip_prefix("Custom(Symbol(\"") {
        return custom.split('"').next().map(str::to_string);
    }
    let (kind, rest) = rest.split_once('(')?;
    let name = rest.split(')').next()?;
    let prefix = match kind {
        "AmqpError" => "amqp:",
        "LinkError" => "amqp:link:",
        "SessionError" => "amqp:session:",
        "ConnectionError" if name == "ConnectionForced" => return Some("amqp:connection:forced".into()),
        "ConnectionError" => "amqp:connection:",
        _ => return None,
    };
    // The spec's symbols are the variants' names in kebab case.
    let mut symbol = prefix.to_string();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            symbol.push('-');
        }
        symbol.push(c.to_ascii_lowercase());
    }
    Some(symbol)
}

/// A refusal's [`BackendError`]: `entity` is what was refused (named in
/// the error), `what` the call, `words` the broker's description. None for
/// a transient condition, which the caller reports as a connection's
/// failure.
pub(super) fn refusal_error(refusal: &Refusal, entity: &str, what: &str, words: &str) -> Option<BackendError> {
    let detail = format!("{what}: {words}");
    Some(match refusal {
        Refusal::Unauthorized => BackendError::Auth {
            provider: PROVIDER,
            detail,
        },
        Refusal::NotFound => BackendError::NotFound {
            queue: entity.to_string(),
            detail,
        },
        // Reached, and refused: the connection is fine (an unreachable
        // error would also drop the dead-letter queue's link, and what it
        // holds, for a destination that refuses sends).
        Refusal::Disabled => BackendError::Refused {
            provider: PROVIDER,
            detail: format!("{entity} is disabled ({detail}): set its status to Active"),
        },
        Refusal::Refused(condition) => BackendError::Refused {
            provider: PROVIDER,
            detail: format!("{entity} refused {what}: {condition}: {words}"),
        },
        Refusal::Transient => return None,
    })
}

/// Sort an azservicebus error into the backend's classes, by its kind and
/// the AMQP condition it names.
fn classify(e: &azure_core::Error, unreachable: &BackendError, entity: &str, what: &str) -> BackendError {
    let text = format!("{e} ({e:?})");
    let lower = text.to_ascii_lowercase();
    let detail = format!("{what}: {e}");
    if let BackendError::Unreachable { endpoint, .. } = unreachable
        && let tls @ BackendError::Tls { .. } = BackendError::unreachable(endpoint.clone(), format!("{what}: {text}"))
    {
        return tls;
    }
    // The broker answered with a condition or a status: a refusal is told as
    // what it is, in the broker's words, never as "cannot reach".
    if let Some(refusal) = refusal_in(&text)
        && let Some(err) = refusal_error(
            &refusal,
            entity,
            what,
            &link::broker_words(&text).unwrap_or_else(|| e.to_string()),
        )
    {
        return err;
    }
    if lower.contains("not-found") || lower.contains("notfound") || lower.contains("messagingentitynotfound") {
        BackendError::NotFound {
            queue: entity.to_string(),
            detail,
        }
    } else if lower.contains("unauthorized")
        || lower.contains("unauthorized-access")
        || lower.contains("sasl")
        || lower.contains("status code: 401")
        || lower.contains("credential")
    {
        BackendError::Auth {
            provider: PROVIDER,
            detail,
        }
    } else if lower.contains("connection refused")
        || lower.contains("connect")
        || lower.contains("dns")
        || lower.contains("timed out")
        || lower.contains("broken pipe")
        || lower.contains("reset by peer")
        || lower.contains("io error")
        || matches!(e.kind(), azure_core::error::ErrorKind::Io)
    {
        match unreachable {
            BackendError::Unreachable { endpoint, .. } => BackendError::Unreachable {
                endpoint: endpoint.clone(),
                detail,
            },
            _ => BackendError::Provider {
                provider: PROVIDER,
                detail,
            },
        }
    } else {
        BackendError::Provider {
            provider: PROVIDER,
            detail,
        }
    }
}

#[async_trait]
impl QueueBackend for ServiceBusBackend {
    fn kind(&self) -> &'static str {
        "servicebus"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            true_peek: true,
            binary_body: true,
            empty_body: true,
            max_body_bytes: MAX_BODY,
            typed_attributes: true,
            max_attributes: None,
            batch_size: BATCH,
            // The link browses for the next lease while earlier ones are received.
            max_lease_size: MAX_LEASE,
            max_concurrent_leases: MAX_CONCURRENT_LEASES,
            max_release_size: MAX_RELEASE,
            // Session order is kept by the queue's own order; a plain
            // receiver on the dead-letter queue is never held back.
            ordered_delivery: false,
        }
    }

    fn is_dead_letter_attribute(&self, name: &str) -> bool {
        name == DEAD_LETTER_REASON || name == DEAD_LETTER_DESCRIPTION
    }

    async fn stats(&self) -> Result<DlqStats> {
        let mut cache = self.stats_cache.lock().await;
        if let Some((at, s)) = cache.as_ref() {
            if at.elapsed() < STATS_TTL {
                return Ok(s.clone());
            }
            let since = at.elapsed();
            if since < STATS_MIN_INTERVAL {
                tokio::time::sleep(STATS_MIN_INTERVAL - since).await;
            }
        }
        let counted = if self.counts_refused.load(Ordering::Relaxed) {
            None
        } else {
            match self.counts().await {
                Ok(dead) => Some(dead),
                Err(BackendError::Auth { detail, .. }) if lacks_manage(&detail) => {
                    tracing::warn!(
                        queue = %self.queue_name,
                        limit = self.browse_count_limit,
                        "the credentials lack the Manage right that Service Bus's counts need: counting by browsing (at most servicebus.browse_count_limit messages) instead"
                    );
                    self.counts_refused.store(true, Ordering::Relaxed);
                    None
                }
                Err(e) => return Err(e),
            }
        };
        let stats = match counted {
            Some(dead) => DlqStats {
                depth: dead,
                in_flight: None,
                oldest_age: if dead == 0 {
                    None
                } else {
                    self.browse(1).await?.first().and_then(|m| m.age(Utc::now()))
                },
                exactness: if self.emulator {
                    Exactness::Exact
                } else {
                    Exactness::Approximate
                },
                oldest_age_exactness: None,
            },
            None => self.browse_count().await?,
        };
        *cache = Some((Instant::now(), stats.clone()));
        Ok(stats)
    }

    async fn peek_each(&self, max: usize, visit: &mut (dyn FnMut(DlqMessage) -> bool + Send)) -> Result<usize> {
        self.browse_each(max, visit).await
    }

    async fn lease(&self, max: usize, _hold: Duration) -> Result<Vec<Leased>> {
        self.lease_when_up(self.lease_turns.take(), max).await
    }

    fn lease_in_turn(self: Arc<Self>, max: usize, _hold: Duration) -> BoxFuture<'static, Result<Vec<Leased>>> {
        let turn = self.lease_turns.take();
        Box::pin(async move { self.lease_when_up(turn, max).await })
    }

    async fn send(&self, to: &Destination, msgs: &[Outgoing]) -> Result<Vec<SendResult>> {
        let dest = to.0.as_str();
        let mut results: Vec<Option<SendResult>> = vec![None; msgs.len()];
        let mut built = Vec::new();
        for (i, o) in msgs.iter().enumerate() {
            match self.outgoing_message(o, dest) {
                Ok(m) => built.push((i, m)),
                Err(e) => results[i] = Some(SendResult::Failed { error: e }),
            }
        }
        if !built.is_empty() {
            let max = self.dest_sender(dest).await?.max_message_size;
            let encoded = built
                .iter()
                .map(|(_, m)| encode(m))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| BackendError::Provider {
                    provider: PROVIDER,
                    detail: format!("cannot encode a copy: {e}"),
                })?;
            // A copy larger than the link takes fails alone, here, as the
            // SDKs refuse it: sent, it would make Service Bus detach the
            // link (amqp:link:message-size-exceeded), failing every send in
            // flight on it, and again on each retry.
            let (built, encoded): (Vec<_>, Vec<_>) = built
                .into_iter()
                .zip(encoded)
                .filter(|((i, _), e)| {
                    let fits = e.len() <= max;
                    if !fits {
                        results[*i] = Some(SendResult::Failed {
                            error: format!(
                                "the copy is {} bytes, more than the {max} bytes a message to {dest} may have",
                                e.len()
                            ),
                        });
                    }
                    fits
                })
                .unzip();
            let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
            let ranges = pack(&sizes, |i| envelope_base(&built[i].1), max);
            let mut encoded = encoded.into_iter();
            let mut built = built.into_iter();
            for r in ranges {
                let batch: Vec<(usize, Message<Body<Value>>)> = built.by_ref().take(r.len()).collect();
                let bytes: Vec<Vec<u8>> = encoded.by_ref().take(r.len()).collect();
                let (index, envelope) = envelope(batch, bytes);
                match self.send_envelope(dest, &envelope).await {
                    Ok(()) => {
                        for (i, id) in index {
                            results[i] = Some(SendResult::Sent { dest_id: id });
                        }
                    }
                    // Envelopes already accepted keep their results.
                    Err(e) if fails_every_send(&e) => return abandon_send(results, e),
                    Err(e) => {
                        for (i, _) in index {
                            results[i] = Some(SendResult::Failed { error: e.to_string() });
                        }
                    }
                }
            }
        }
        *self.stats_cache.lock().await = None;
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or(SendResult::Failed {
                    error: "not sent".into(),
                })
            })
            .collect())
    }

    async fn settle(&self, leases: &[LeaseId]) -> Result<Vec<SettleResult>> {
        let (tokens, at) = lock_tokens(leases);
        let (by_token, mut out) = tokio::join!(self.settle_tokens(tokens, true), self.settle_deliveries(leases));
        for (i, r) in at.into_iter().zip(by_token.0) {
            out[i] = r;
        }
        *self.stats_cache.lock().await = None;
        Ok(out)
    }

    async fn release(&self, leases: &[LeaseId]) -> Result<()> {
        let (tokens, _) = lock_tokens(leases);
        let (by_token, by_link) = tokio::join!(self.settle_tokens(tokens, false), self.release_deliveries(leases));
        by_link?;
        // An abandon refused (a lost lock) leaves the message deferred all
        // the same; only the connection's failure is the release's.
        match by_token.1 {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A connection string scoped to one entity (`EntityPath`) cannot send
    /// copies anywhere else: refused when the pass is planned.
    fn check_send_to(&self, to: &Destination) -> Result<()> {
        match &self.auth {
            Auth::Sas(cs, var) => cs.check_scope(
                var,
                &to.0,
                &format!("a redrive from {} would send its copies to", self.queue_name),
            ),
            Auth::Entra(_) => Ok(()),
        }
    }

    async fn default_source(&self) -> Result<Option<Destination>> {
        Ok(Some(Destination(
            self.config_source
                .clone()
                .unwrap_or_else(|| self.entity.parent().to_string()),
        )))
    }

    /// A sender link takes a `$cbs` token put and an attach: done here,
    /// while the first leases are out, instead of by the first send. A
    /// dead-letter link still opening (the pass's connection is usually still
    /// on its way) attaches it alongside its receiver, through `send_to`.
    fn prepare_send(self: Arc<Self>, to: &Destination) {
        let dest = to.0.clone();
        *self.send_to.lock().expect("send_to lock") = Some(dest.clone());
        tokio::spawn(async move {
            if let Err(e) = self.dest_sender(&dest).await {
                tracing::debug!(%dest, error = %e, "attaching a sender ahead of the sends failed");
            }
        });
    }

    /// The dead-letter queue's own link takes a dozen round trips to open
    /// (TCP, SASL, AMQP open and begin, `$cbs` and its token puts, three
    /// attaches, one after another): opened here, while the pass's
    /// destinations are looked up, instead of by the first lease. After a
    /// connect for a pass its connection is already open, and only the
    /// attaches are left.
    fn prepare_lease(self: Arc<Self>) {
        tokio::spawn(async move {
            if let Err(e) = self.link().await {
                tracing::debug!(error = %e, "opening the dead-letter queue's link ahead of the leases failed");
            }
        });
    }

    async fn resolve_destination(&self, name: &str) -> Result<Destination> {
        let name = name.trim().trim_matches('/');
        if name.is_empty() || name.contains("$DeadLetterQueue") || name.to_ascii_lowercase().contains("/subscriptions/")
        {
            return Err(BackendError::Invalid(format!(
                "`{name}` is not a Service Bus queue or topic: copies can only be sent to a queue or a topic"
            )));
        }
        self.check_send_to(&Destination(name.to_string()))?;
        self.check_destination(name).await?;
        Ok(Destination(name.to_string()))
    }
}

/// Entra ID through Azure Workload Identity: the AKS webhook mounts a
/// federated service-account token (`AZURE_FEDERATED_TOKEN_FILE`) and sets
/// `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and `AZURE_AUTHORITY_HOST`; the token
/// is exchanged for an access token with the client-credentials grant and a
/// JWT client assertion. Implemented here against azure_core 0.25's
/// `TokenCredential` (the version azservicebus uses) with the crate-wide
/// reqwest, rather than pulling azure_identity and its HTTP stack in.
#[derive(Debug)]
pub struct WorkloadIdentityCredential {
    token_file: String,
    client_id: String,
    tenant_id: String,
    authority: String,
    http: reqwest::Client,
    cache: Mutex<HashMap<String, (String, u64)>>,
}

impl WorkloadIdentityCredential {
    pub fn from_env() -> Result<Self, String> {
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| format!("{k} is not set"))
        };
        Ok(Self {
            token_file: var("AZURE_FEDERATED_TOKEN_FILE")?,
            client_id: var("AZURE_CLIENT_ID")?,
            tenant_id: var("AZURE_TENANT_ID")?,
            authority: var("AZURE_AUTHORITY_HOST").unwrap_or_else(|_| "https://login.microsoftonline.com/".into()),
            http: super::http_client().map_err(|e| e.to_string())?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// An access token for `scopes`, with its expiry (unix seconds).
    /// A token endpoint that cannot be reached is unreachable (or a refused
    /// certificate); anything it answers that is not a token is a refusal.
    async fn fetch(&self, scopes: &[&str]) -> Result<(String, u64)> {
        let refused = |detail: String| BackendError::Auth {
            provider: PROVIDER,
            detail,
        };
        let key = scopes.join(" ");
        if let Some((tok, exp)) = self.cache.lock().await.get(&key)
            && *exp > unix_now() + 300
        {
            return Ok((tok.clone(), *exp));
        }
        // Counted from before the request: the token cannot expire before
        // `requested + expires_in`, whereas a clock read after the answer
        // could put the expiry up to a second past the token's own.
        let requested = unix_now();
        let assertion = std::fs::read_to_string(&self.token_file)
            .map_err(|e| refused(format!("cannot read {}: {e}", self.token_file)))?;
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority.trim_end_matches('/'),
            self.tenant_id
        );
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("scope", key.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.trim()),
        ];
        let body: String = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let resp = self
            .http
            .post(&url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                BackendError::unreachable(url.clone(), format!("token request: {e}: {}", super::root_cause(&e)))
            })?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await.map_err(|e| refused(format!("token response: {e}")))?;
        if !status.is_success() {
            return Err(refused(format!("token request answered {status}: {json}")));
        }
        let token = json["access_token"]
            .as_str()
            .ok_or_else(|| refused("no access_token in the token response".into()))?
            .to_string();
        let expires_in = json["expires_in"].as_u64().unwrap_or(3600);
        let exp = requested + expires_in;
        self.cache.lock().await.insert(key, (token.clone(), exp));
        Ok((token, exp))
    }
}

#[async_trait]
impl azure_core::credentials::TokenCredential for WorkloadIdentityCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        let (token, exp) = self
            .fetch(scopes)
            .await
            .map_err(|e| azure_core::Error::message(azure_core::error::ErrorKind::Credential, e.to_string()))?;
        let expires_on = azure_core::date::OffsetDateTime::from_unix_timestamp(exp as i64)
            .map_err(|e| azure_core::Error::new(azure_core::error::ErrorKind::DataConversion, e))?;
        // azservicebus puts a link's next token when the last one expires,
        // not before, so the broker may detach the link first (a browsing
        // receiver kept by the sidecar, with the emulator's
        // `--enforce-token-expiry`): it is told of an earlier expiry.
        let early = renew_ahead(exp.saturating_sub(unix_now()));
        Ok(azure_core::credentials::AccessToken::new(token, expires_on - early))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azservicebus_is_told_of_an_entra_token_expiring_early_enough_to_renew_it() {
        // A sixth of a short life; four minutes of a long one.
        assert_eq!(renew_ahead(4), Duration::from_millis(666));
        assert_eq!(renew_ahead(600), Duration::from_secs(100));
        assert_eq!(renew_ahead(3599), Duration::from_secs(240));
        // Inside `fetch`'s cache window (5 minutes), so that the renewal
        // fetches a new token instead of getting the one it renews.
        for valid in [0, 1, 4, 60, 600, 601, 3600, 86_400] {
            assert!(renew_ahead(valid) < Duration::from_secs(300), "{valid}");
        }
    }

    #[test]
    fn a_refusal_names_its_condition_as_the_broker_does() {
        use fe2o3_amqp_types::definitions::{AmqpError, LinkError};
        let named = |c| condition_name(&c);
        assert_eq!(
            named(ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded)),
            "amqp:resource-limit-exceeded"
        );
        assert_eq!(
            named(ErrorCondition::LinkError(LinkError::MessageSizeExceeded)),
            "amqp:link:message-size-exceeded"
        );
        assert_eq!(
            named(ErrorCondition::Custom(Symbol::from("com.microsoft:entity-disabled"))),
            "com.microsoft:entity-disabled"
        );
    }

    #[test]
    fn a_refusal_is_read_from_the_brokers_condition_or_status() {
        let of = |text: &str| refusal_in(text);
        let closed = |condition: &str| {
            format!(
                "RemoteClosedWithError(Error {{ condition: {condition}, description: Some(\"words\"), info: None }})"
            )
        };
        assert_eq!(
            of(&closed("AmqpError(UnauthorizedAccess)")),
            Some(Refusal::Unauthorized)
        );
        assert_eq!(of(&closed("AmqpError(NotFound)")), Some(Refusal::NotFound));
        assert_eq!(
            of(&closed(r#"Custom(Symbol("com.microsoft:entity-disabled"))"#)),
            Some(Refusal::Disabled)
        );
        assert_eq!(
            of(&closed("AmqpError(NotAllowed)")),
            Some(Refusal::Refused("amqp:not-allowed".into()))
        );
        assert_eq!(
            of(&closed("AmqpError(ResourceLimitExceeded)")),
            Some(Refusal::Refused("amqp:resource-limit-exceeded".into()))
        );
        assert_eq!(
            of(&closed(r#"Custom(Symbol("com.microsoft:argument-out-of-range"))"#)),
            Some(Refusal::Refused("com.microsoft:argument-out-of-range".into()))
        );
        for transient in [
            "LinkError(DetachForced)",
            "ConnectionError(ConnectionForced)",
            "SessionError(WindowViolation)",
            "AmqpError(InternalError)",
            r#"Custom(Symbol("com.microsoft:server-busy"))"#,
        ] {
            assert_eq!(of(&closed(transient)), Some(Refusal::Transient), "{transient}");
        }
        let status =
            |code: u16| format!("Status(StatusError {{ code: StatusCode({code}), description: Some(\"w\") }})");
        assert_eq!(of(&status(401)), Some(Refusal::Unauthorized));
        assert_eq!(of(&status(403)), Some(Refusal::Unauthorized));
        assert_eq!(of(&status(404)), Some(Refusal::NotFound));
        assert_eq!(of(&status(400)), Some(Refusal::Refused("status 400".into())));
        assert_eq!(of(&status(503)), Some(Refusal::Transient));
        assert_eq!(of("Io(Custom { kind: ConnectionRefused })"), None);
        // As the user reads it: what was refused, the condition, the words.
        let e = refusal_error(
            &Refusal::Refused("amqp:not-allowed".into()),
            "dlq (events)",
            "attach",
            "'events' is a topic",
        )
        .unwrap();
        assert_eq!(
            e.to_string(),
            "Service Bus: dlq (events) refused attach: amqp:not-allowed: 'events' is a topic"
        );
        assert!(refusal_error(&Refusal::Transient, "q", "attach", "w").is_none());
    }

    #[test]
    fn a_refusal_for_want_of_manage_is_told_from_a_bad_token() {
        // Azure's answer to a Listen or Send key, and to a token it refuses.
        assert!(lacks_manage(
            "<Error><Code>401</Code><Detail>Manage,EntityRead claims required for this operation. TrackingId:6399943f_G4S2</Detail></Error>"
        ));
        assert!(!lacks_manage(
            "<Error><Code>401</Code><Detail>InvalidSignature: The token has an invalid signature.</Detail></Error>"
        ));
        assert!(!lacks_manage("claim is empty or token is invalid."));
    }

    #[test]
    fn connection_string_parses_and_drops_the_port() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1:5672/;SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert_eq!(cs.host, "127.0.0.1");
        assert!(cs.emulator);
        assert_eq!(
            cs.for_client(),
            "Endpoint=sb://127.0.0.1/;SharedAccessKeyName=x;SharedAccessKey=y"
        );
        assert!(ConnectionString::parse("Endpoint=sb://ns.servicebus.windows.net/").is_err());
    }

    #[test]
    fn an_entity_paths_connection_string_is_for_that_entity_only() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=orders-app;SharedAccessKey=k;EntityPath=Orders",
        )
        .unwrap();
        assert_eq!(cs.entity_path.as_deref(), Some("Orders"));
        // azservicebus signs for the entity when told of it.
        assert!(cs.for_client().ends_with(";EntityPath=Orders"), "{:?}", cs.for_client());
        assert!(cs.check_scope("SB", "orders", "reads").is_ok(), "names ignore case");
        let e = cs.check_scope("SB", "invoices", "queue dlq reads").unwrap_err();
        let said = e.to_string();
        assert!(matches!(e, BackendError::Invalid(_)), "{e:?}");
        assert!(
            said.contains("EntityPath=Orders") && said.contains("`invoices`") && said.contains("namespace-level"),
            "{said}"
        );
        assert!(!said.contains("k;") && !said.contains("=k"), "{said}");
        let namespace = ConnectionString::parse("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=k").unwrap();
        assert_eq!(namespace.entity_path, None);
        assert!(namespace.check_scope("SB", "anything", "reads").is_ok());
    }

    #[test]
    fn a_debug_print_of_a_connection_string_leaves_its_secrets_out() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=s3cr3tKey=",
        )
        .unwrap();
        let printed = format!("{cs:?}");
        assert!(
            printed.contains("ns.servicebus.windows.net") && printed.contains("send"),
            "{printed}"
        );
        assert!(!printed.contains("s3cr3tKey"), "{printed}");
        let expiry = chrono::Utc::now().timestamp() + 86_400;
        let signed = ConnectionString::parse(&format!(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=s1gn4ture&se={expiry}&skn=k"
        ))
        .unwrap();
        assert!(signed.signature.is_some());
        assert!(!format!("{signed:?}").contains("s1gn4ture"));
    }

    #[test]
    fn sas_token_matches_the_documented_algorithm() {
        // HMAC-SHA256("key", "https%3A%2F%2Fns%2Fq\n1000"), base64, url-encoded.
        let t = sas_token("https://ns/q", "RootManageSharedAccessKey", "key", 1000);
        assert!(
            t.starts_with("SharedAccessSignature sr=https%3A%2F%2Fns%2Fq&sig="),
            "{t}"
        );
        assert!(t.ends_with("&se=1000&skn=RootManageSharedAccessKey"), "{t}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"https%3A%2F%2Fns%2Fq\n1000");
        use base64::Engine as _;
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert!(t.contains(&format!("sig={}", urlencode(&sig))), "{t}");
    }

    #[test]
    fn counts_come_from_the_servicebus_namespace_and_empty_feeds_are_none() {
        let xml = r#"<entry xmlns="http://www.w3.org/2005/Atom"><content type="application/xml">
            <QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect">
            <CountDetails xmlns:d2p1="http://schemas.microsoft.com/netservices/2011/06/servicebus">
            <d2p1:ActiveMessageCount>3</d2p1:ActiveMessageCount>
            <d2p1:DeadLetterMessageCount>7</d2p1:DeadLetterMessageCount>
            </CountDetails></QueueDescription></content></entry>"#;
        assert_eq!(parse_counts(xml), Some((3, 7)));
        assert_eq!(parse_transfer_dead_letter_count(xml), None, "not reported, not zero");
        let empty =
            r#"<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Publicly Listed Services</title></feed>"#;
        assert_eq!(parse_counts(empty), None);
    }

    #[test]
    fn the_transfer_dead_letter_count_is_its_own_element() {
        let xml = r#"<entry xmlns="http://www.w3.org/2005/Atom"><content type="application/xml">
            <SubscriptionDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect">
            <CountDetails xmlns:d2p1="http://schemas.microsoft.com/netservices/2011/06/servicebus">
            <d2p1:ActiveMessageCount>3</d2p1:ActiveMessageCount>
            <d2p1:DeadLetterMessageCount>7</d2p1:DeadLetterMessageCount>
            <d2p1:TransferMessageCount>1</d2p1:TransferMessageCount>
            <d2p1:TransferDeadLetterMessageCount>5</d2p1:TransferDeadLetterMessageCount>
            </CountDetails><TransferDeadLetterMessageCount>9</TransferDeadLetterMessageCount>
            </SubscriptionDescription></content></entry>"#;
        assert_eq!(parse_counts(xml), Some((3, 7)));
        assert_eq!(parse_transfer_dead_letter_count(xml), Some(5));
        assert_eq!(sub_queue_suffix(ServiceBusSubQueue::DeadLetter), "$DeadLetterQueue");
        assert_eq!(
            sub_queue_suffix(ServiceBusSubQueue::TransferDeadLetter),
            "$Transfer/$DeadLetterQueue"
        );
    }

    #[test]
    fn amqp_types_round_trip() {
        for v in [
            SimpleValue::Int(-7),
            SimpleValue::Long(1 << 40),
            SimpleValue::Double(1.5.into()),
            SimpleValue::Float(0.25f32.into()),
            SimpleValue::Bool(true),
            SimpleValue::String("acme".into()),
            SimpleValue::Symbol(Symbol::from("sym")),
            SimpleValue::Binary(vec![0u8, 255].into()),
            SimpleValue::Uuid(AmqpUuid::from([7u8; 16])),
            SimpleValue::Timestamp(Timestamp::from_milliseconds(1_704_164_645_123)),
            SimpleValue::Ubyte(200),
            SimpleValue::Ushort(60000),
            SimpleValue::Uint(4_000_000_000),
            SimpleValue::Ulong(u64::MAX),
            SimpleValue::Byte(-5),
            SimpleValue::Short(-300),
            SimpleValue::Char('é'),
            SimpleValue::Null,
            SimpleValue::Decimal128(Dec128::from([3u8; 16])),
            // Outside chrono's range (the `attributes` fuzz target's first find).
            SimpleValue::Timestamp(Timestamp::from_milliseconds(i64::MAX)),
            SimpleValue::Timestamp(Timestamp::from_milliseconds(i64::MIN)),
        ] {
            let a = attribute_from_amqp(&v);
            assert_eq!(attribute_to_amqp(&a).unwrap(), v, "{a:?}");
        }
    }

    #[test]
    fn a_signature_must_expire_ahead_and_within_two_years() {
        let now = 1_800_000_000;
        let sig = |se: &str| format!("SharedAccessSignature sr=ns&sig=abc&se={se}&skn=send");
        assert!(check_signature_expiry(&sig("1800003600"), now).is_ok());
        let expired = check_signature_expiry(&sig("1"), now).unwrap_err().to_string();
        assert!(expired.contains("expired at 1970-01-01"), "{expired}");
        let far = check_signature_expiry(&sig("99999999999"), now)
            .unwrap_err()
            .to_string();
        assert!(far.contains("more than two years"), "{far}");
        assert!(check_signature_expiry("SharedAccessSignature sr=ns&sig=abc", now).is_err());
        assert!(check_signature_expiry(&sig("soon"), now).is_err());
        let cs = ConnectionString::parse(&format!("Endpoint=sb://ns.example/;SharedAccessSignature={}", sig("1")));
        assert!(cs.is_err(), "checked when the connection string is read");
    }

    /// A lease names a link delivery or a `$management` lock token, each
    /// with its link's generation, and is read back as it was written;
    /// anything else names neither.
    #[test]
    fn a_lease_tells_a_link_delivery_from_a_lock_token() {
        let token = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
        let delivery = LeaseKind::Delivery { generation: 3, id: 17 };
        let locked = LeaseKind::Token { generation: 3, token };
        assert_eq!(delivery.id().0, "3.17");
        assert_eq!(locked.id().0, format!("3:{token}"));
        for kind in [delivery, locked] {
            assert_eq!(LeaseKind::of(&kind.id()), Some(kind));
        }
        for other in ["", "3", "x.17", "3.x", "3:not-a-token", "lock-1"] {
            assert_eq!(LeaseKind::of(&LeaseId(other.into())), None, "{other:?}");
        }
        let leases = [
            delivery.id(),
            locked.id(),
            LeaseKind::Delivery { generation: 4, id: 1 }.id(),
        ];
        assert_eq!(lock_tokens(&leases), (vec![(3, token)], vec![1]));
    }

    #[test]
    fn long_message_ids_are_hashed_to_fit() {
        assert_eq!(copy_message_id("abc-1"), "abc-1");
        let long = copy_message_id(&"x".repeat(200));
        assert!(long.len() <= MAX_MESSAGE_ID && long.starts_with("dlq-bridge-"));
    }

    #[test]
    fn batches_fit_the_link_and_the_count_and_oversized_messages_go_alone() {
        // Each message 1,000 bytes encoded, envelopes of 200 bytes.
        let even = vec![1000; 250];
        assert_eq!(pack(&even, |_| 200, usize::MAX), vec![0..100, 100..200, 200..250]);
        // 200 + k * 1,008 <= 10,000: nine per batch.
        let started = std::cell::RefCell::new(Vec::new());
        let ranges = pack(
            &even[..20],
            |i| {
                started.borrow_mut().push(i);
                200
            },
            10_000,
        );
        assert_eq!(ranges, vec![0..9, 9..18, 18..20]);
        assert_eq!(
            *started.borrow(),
            [0, 9, 18],
            "only a batch's first message sizes its envelope"
        );
        // A premium entity with large messages: 100 MB on the link, but
        // batches of 1 MB at most; a message over 1 MB still goes, alone.
        let premium = 100 << 20;
        let mut large = vec![60 * 1024; 40];
        large.insert(20, 5 << 20);
        let ranges = pack(&large, |_| 200, premium);
        assert!(ranges.contains(&(20..21)), "{ranges:?}");
        for r in &ranges {
            let total = 200 + large[r.clone()].iter().map(|s| s + BATCH_ITEM_OVERHEAD).sum::<usize>();
            assert!(r.len() == 1 || total <= MAX_BATCH_BYTES, "{r:?}: {total} bytes");
        }
        assert_eq!(ranges.len(), 5, "{ranges:?}");
        let odd = [500, 20_000, 500, 500];
        assert_eq!(pack(&odd, |_| 100, 10_000), vec![0..1, 1..2, 2..4]);
        assert!(pack(&[], |_| 100, 10_000).is_empty());
    }

    #[test]
    fn a_copy_has_the_body_section_kind_and_value_of_its_original() {
        use fe2o3_amqp_types::primitives::OrderedMap;
        let mut map = OrderedMap::new();
        map.insert(Value::String("qty".into()), Value::Int(3));
        map.insert(Value::String("blob".into()), Value::Binary(vec![0u8, 255].into()));
        let bodies = [
            Body::Value(AmqpValue(Value::String("héllo".into()))),
            Body::Value(AmqpValue(Value::Binary(vec![0xc3u8, 0x28].into()))),
            Body::Value(AmqpValue(Value::Map(map))),
            Body::Value(AmqpValue(Value::Long(-42))),
            Body::Value(AmqpValue(Value::Null)),
            Body::Sequence(Batch::from(vec![
                AmqpSequence(vec![Value::Int(1), Value::String("two".into())]),
                AmqpSequence(vec![]),
            ])),
            Body::Data(Batch::from(vec![Data(vec![1u8, 2].into())])),
        ];
        for original in bodies {
            let (bytes, kind) = body_bytes(&original);
            assert_eq!(copy_body(&bytes, kind).as_ref(), Ok(&original), "{kind:?}");
        }
        let (text, kind) = body_bytes(&Body::Value(AmqpValue(Value::String("héllo".into()))));
        assert_eq!(
            (&text[..], kind),
            ("héllo".as_bytes(), Some(BODY_VALUE_STRING)),
            "shown as its text"
        );
        let not_utf8 = copy_body(&Bytes::from_static(b"\xff"), Some(BODY_VALUE_STRING));
        assert!(not_utf8.is_err(), "{not_utf8:?}");
        let not_amqp = copy_body(&Bytes::from_static(b"\xff"), Some(BODY_SEQUENCE));
        assert!(not_amqp.is_err(), "{not_amqp:?}");
    }

    fn copy(id: &str, body: usize) -> Message<Body<Value>> {
        let mut m = ServiceBusMessage::new(vec![7u8; body]);
        m.set_message_id(id).unwrap();
        m.set_session_id(Some("s".to_string())).unwrap();
        let raw = m.raw_amqp_message().clone();
        let body = Body::Data(Batch::from(vec![raw.body.clone()]));
        with_body(raw, body)
    }

    #[test]
    fn a_batch_envelope_holds_every_message_and_is_no_larger_than_counted() {
        use fe2o3_amqp_types::messaging::message::__private::Deserializable;
        // A body of 70 KiB takes a 4-byte length: the largest item overhead.
        let batch = vec![(4, copy("a", 10)), (7, copy("b", 70 * 1024)), (9, copy("c", 0))];
        let encoded: Vec<Vec<u8>> = batch
            .iter()
            .map(|(_, m)| serde_amqp::to_vec(&Serializable(m)).unwrap())
            .collect();
        let counted = envelope_base(&batch[0].1) + encoded.iter().map(|e| e.len() + BATCH_ITEM_OVERHEAD).sum::<usize>();
        let (index, sent) = envelope(batch.clone(), encoded);
        assert_eq!(index, vec![(4, "a".into()), (7, "b".into()), (9, "c".into())]);
        let Envelope::Batch(sendable) = sent else {
            panic!("three messages go in an envelope")
        };
        assert_eq!(sendable.message_format, BATCH_MESSAGE_FORMAT);
        let bytes = serde_amqp::to_vec(&Serializable(&sendable.message)).unwrap();
        assert!(
            bytes.len() <= counted && bytes.len() + 64 > counted,
            "{} against {counted}",
            bytes.len()
        );
        // The envelope carries the first message's properties, and each item
        // decodes to the message it was made of.
        assert_eq!(sendable.message.properties, batch[0].1.properties);
        let items = &sendable.message.body;
        assert_eq!(items.len(), 3);
        for (item, (_, original)) in items.iter().zip(&batch) {
            let m: Deserializable<Message<Body<Value>>> = serde_amqp::from_slice(&item.0).unwrap();
            assert_eq!(m.0.properties, original.properties);
            assert_eq!(m.0.body, original.body);
        }
        // A lone message is sent as it is.
        let one = vec![(0, copy("d", 5))];
        let (_, sent) = envelope(one, vec![Vec::new()]);
        assert!(matches!(sent, Envelope::Single(s) if s.message_format == 0));
    }
}
