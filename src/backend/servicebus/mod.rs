//! Azure Service Bus adapter, on the `azservicebus` crate (AMQP 1.0) for
//! connecting and browsing, and on its AMQP library fe2o3-amqp for leases,
//! settles and sends ([`link`]).
//!
//! The parts that read and test on their own live beside this file:
//! [`auth`] (connection strings, SAS and Entra ID tokens), [`codec`] (AMQP
//! messages to the model and back), [`batch`] (copies packed into batch
//! envelopes), [`errors`] (broker refusals as [`BackendError`]s) and
//! [`atom`] (the management endpoint's counts).
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
//!   (2 s; 10 s when nothing comes, for a broker that stalls); see [`link`]
//!   for why the receive is sized. Complete and abandon
//!   are settled on the link that received a message, so what is kept of a
//!   held message is its delivery info (delivery id and tag), keyed by the
//!   [`LeaseId`] `<link generation>.<delivery id>`: a held message costs a
//!   few hundred bytes, whatever its body's size. Deferred messages, which
//!   no receive on a link gets, are leased by sequence number instead (see
//!   below). Concurrent leases
//!   overlap on the link (each browses past the previous one's messages), and
//!   completes and abandons overlap them. The hold is the entity's
//!   LockDuration: Service Bus has no per-receive lock time.
//! - **extend**: `com.microsoft:renew-lock` on `$management`, by lock token:
//!   a delivery's is its delivery tag, a GUID in .NET's byte order (read
//!   here, not through azservicebus 0.25, which reads it in the wrong order
//!   when it renews, TESTING.md); a deferred message's, the token it was
//!   received with. The engine renews what a pass holds every third of the
//!   LockDuration, so a pass may outlast it.
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
//!   `correlation_id` (with `correlation_id_type` `uuid`, `ulong` or
//!   `binary` when it is not a string; a binary one in hex), `subject`, `content_type`, `reply_to`,
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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

mod atom;
mod auth;
mod batch;
mod codec;
mod errors;
mod link;
mod rpc;
mod turns;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azservicebus::core::BasicRetryPolicy;
use azservicebus::prelude::*;
use chrono::Utc;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{DetachError, SendError};
use fe2o3_amqp_types::messaging::{ApplicationProperties, Body, Message, Outcome};
use fe2o3_amqp_types::primitives::{SimpleValue, Value};
use futures::FutureExt;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{BackendError, Capabilities, OrderGate, Purpose, QueueBackend, Result, abandon_send, fails_every_send};
use crate::config::{QueueConfig, ServiceBusQueueConfig, ServiceBusSubQueue};
use crate::model::{
    Attributes, Destination, DlqMessage, DlqStats, Exactness, LeaseId, Leased, Outgoing, Properties, SendResult,
    SettleResult,
};

use atom::{API_VERSION, lacks_manage, snippet};
pub use atom::{parse_counts, parse_transfer_dead_letter_count};
use auth::{Auth, unix_now};
pub use auth::{ConnectionString, WorkloadIdentityCredential, sas_token};
use batch::{Envelope, encode, envelope, envelope_base, pack};
pub use codec::{
    BODY_SEQUENCE, BODY_VALUE_BINARY, BODY_VALUE_ENCODED, BODY_VALUE_STRING, attribute_from_amqp,
    attribute_from_amqp_owned, attribute_to_amqp, body_bytes, body_into_bytes, copy_body,
};
use codec::{Fields, annotation, copy_message_id, copy_scope, fields_of, fields_taking, message_key, with_body};
use errors::{Refusal, classify, condition_name, refusal_error, refusal_of};

type Client = ServiceBusClient<BasicRetryPolicy>;

/// A destination's sender link on the dead-letter queue's connection (see
/// `link::send_loop`), and the link generation it was attached on.
struct DestSender {
    generation: u64,
    /// Locked only while a transfer is queued, not for its outcome: every
    /// concurrent send has its batch in flight on the one link. Taken only
    /// by [`Drop`], to close the link.
    link: Mutex<Option<fe2o3_amqp::Sender>>,
    /// The largest message or batch the link takes (from its attach).
    max_message_size: usize,
    /// Cancelled when the dead-letter queue's link, whose connection this
    /// sender shares, has ended.
    link_ended: CancellationToken,
}

impl Drop for DestSender {
    /// Close the link rather than drop it: fe2o3-amqp 0.14 detaches a
    /// dropped sender, and the broker's answering detach, which no link is
    /// left to take, ends the whole session with unattached-handle. That
    /// session holds the other destinations' senders and the `$cbs` link
    /// their tokens are put on: a send retried after a lost settlement
    /// (which forgets the sender) then failed to attach again, and cost a
    /// new connection. The close has no deadline of its own: one cut short
    /// would drop the link as it waits for that answering detach. It ends
    /// with the answer, or with the session.
    fn drop(&mut self) {
        let (Some(link), Ok(runtime)) = (self.link.get_mut().take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        runtime.spawn(link.close());
    }
}

/// Why a destination's sender could not be had.
enum SenderError {
    /// The dead-letter queue's connection could not be opened.
    Connection(BackendError),
    /// The connection was open; attaching the sender on it failed.
    Attach(BackendError),
}

impl SenderError {
    fn into_inner(self) -> BackendError {
        match self {
            SenderError::Connection(e) | SenderError::Attach(e) => e,
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
/// The LockDuration assumed while the entity's is unknown (its description
/// needs the Manage right): half of Azure's default of a minute, so that
/// held messages are renewed in time on an entity that kept the default.
const ASSUMED_LOCK_DURATION: Duration = Duration::from_secs(30);
/// The standard tier's limit on a message (premium allows up to 100 MB;
/// the link's advertised maximum decides how sends are split).
const MAX_BODY: usize = 256 * 1024;
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
/// How long a lease waits for the messages its browse showed before it
/// returns with what came (others may have taken some).
const LEASE_WAIT: Duration = Duration::from_secs(2);
/// How long in all a lease that nothing reached waits, before it fails
/// (`BackendError::Stalled`: the engine retries it on the same link): a
/// broker that stalls (a pause, a congested link) delivers late what the
/// browse showed, and a stall shorter than this costs no retry. Well within
/// the call's own limit (`DlqLink::leased`).
const LEASE_STALL_WAIT: Duration = Duration::from_secs(10);
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
/// The CorrelationId's AMQP type when it is not a string.
pub const PROP_CORRELATION_ID_TYPE: &str = "correlation_id_type";
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
    /// What this DLQ adds to its copies' MessageIds ([`copy_message_id`]).
    copy_scope: String,
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
    /// The entity's LockDuration, from its description (the management GET):
    /// how long every lease holds, whatever the engine asks.
    lock_duration: std::sync::Mutex<Option<Duration>>,
    /// Deferred messages' lock tokens whose renewal was refused (the lock is
    /// lost): not asked for again. A delivery's is dropped from `held`.
    lost_locks: std::sync::Mutex<HashSet<uuid::Uuid>>,
    /// Destinations that refused a batch of distinct messages (Azure, for an
    /// entity with partitioning and duplicate detection): their copies go
    /// one a send.
    single_sends: std::sync::Mutex<HashSet<String>>,
    /// The management endpoint refused the counts for want of the Manage
    /// right: `stats` counts by browsing from then on, up to this many.
    counts_refused: AtomicBool,
    browse_count_limit: usize,
}

#[derive(Default)]
struct Held {
    generation: u64,
    /// Each delivery held, with when it reached the client (its lock began
    /// a little before), or when its lock was last renewed.
    infos: HashMap<u32, (DeliveryInfo, std::time::Instant)>,
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
            copy_scope: copy_scope(&link_config.dlq_path),
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
            lost_locks: std::sync::Mutex::default(),
            management,
            stats_cache: Mutex::new(None),
            lock_duration: std::sync::Mutex::new(None),
            single_sends: Default::default(),
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
        let attributes: Attributes = raw
            .application_properties
            .iter()
            .flat_map(|props| props.0.iter())
            .map(|(k, v)| (k.clone(), attribute_from_amqp(v)))
            .collect();
        let (body, body_type) = body_bytes(&raw.body);
        self.model_of(raw, fields, attributes, (body, body_type))
    }

    /// [`Self::to_model`] of a received message, whose body, properties and
    /// application properties move into the model instead of being copied.
    fn received_to_model(&self, mut raw: Message<Body<Value>>) -> DlqMessage {
        let fields = fields_taking(&mut raw);
        let attributes: Attributes = raw
            .application_properties
            .take()
            .into_iter()
            .flat_map(|props| props.0.into_inner())
            .map(|(k, v)| (k, attribute_from_amqp_owned(v)))
            .collect();
        let body = body_into_bytes(std::mem::replace(&mut raw.body, Body::Empty));
        self.model_of(&raw, fields, attributes, body)
    }

    /// The model of `raw` with its attributes and body already converted.
    fn model_of(
        &self,
        raw: &Message<Body<Value>>,
        fields: Fields,
        attributes: Attributes,
        (body, body_type): (bytes::Bytes, Option<&'static str>),
    ) -> DlqMessage {
        let mut properties = Properties::new();
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
        put(PROP_CORRELATION_ID_TYPE, fields.correlation_id_type.map(str::to_string));
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
        m.set_message_id(copy_message_id(&o.dedup_id, &self.copy_scope))
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
        if let Some(prop) = &self.target_property {
            // Only copies that go back to the topic of the failing
            // subscription are targeted. Elsewhere (a `--to`) a property left
            // by an earlier redrive goes too: naming a subscription of
            // another topic, it would match no filter there, and the copy
            // would be dropped after its original was completed.
            let sub = o.properties.get(PROP_SOURCE_SUBSCRIPTION);
            match (&self.entity, sub) {
                (Entity::Subscription { topic, .. }, Some(sub)) if topic.eq_ignore_ascii_case(dest) => {
                    props.0.insert(prop.clone(), SimpleValue::String(sub.clone()));
                }
                _ => {
                    props.0.shift_remove(prop.as_str());
                }
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
        // The SDK's message takes a string CorrelationId only.
        if let (Some(text), Some(ty)) = (p(PROP_CORRELATION_ID), p(PROP_CORRELATION_ID_TYPE))
            && let Some(id) = codec::typed_message_id(&text, &ty)
            && let Some(properties) = raw.properties.as_mut()
        {
            properties.correlation_id = Some(id);
        }
        Ok(with_body(raw, body))
    }

    /// The sender link to `dest`, attached on first use and again after the
    /// dead-letter queue's link was reopened or the sender was forgotten.
    async fn dest_sender(&self, dest: &str) -> Result<Arc<DestSender>> {
        self.try_dest_sender(dest).await.map_err(SenderError::into_inner)
    }

    /// [`Self::dest_sender`], telling a connection that could not be opened
    /// from an attach that failed on an open one.
    async fn try_dest_sender(&self, dest: &str) -> Result<Arc<DestSender>, SenderError> {
        let mut senders = self.senders.lock().await;
        let link = self.link().await.map_err(SenderError::Connection)?;
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
                return Err(SenderError::Attach(e));
            }
        };
        let max_message_size = sender
            .max_message_size()
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let s = Arc::new(DestSender {
            generation: link.generation,
            link: Mutex::new(Some(sender)),
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
        let pause = |attempt: usize| Duration::from_millis(100 * attempt as u64);
        for attempt in 1..=SEND_ATTEMPTS {
            let sender = match self.try_dest_sender(dest).await {
                Ok(sender) => sender,
                // The connection was up, but the attach timed out or the
                // connection failed under it (a `$cbs` answer lost as a
                // settlement can be, see below): the connection was dropped,
                // and the next attempt opens a new one. A connection that
                // cannot be opened at all fails the send at once.
                Err(SenderError::Attach(e @ BackendError::Unreachable { .. })) if attempt < SEND_ATTEMPTS => {
                    tracing::warn!(%dest, attempt, error = %e, "attaching a sender failed; retrying on a new connection");
                    last = e.to_string();
                    tokio::time::sleep(pause(attempt)).await;
                    continue;
                }
                Err(e) => return Err(e.into_inner()),
            };
            let sent = async {
                let mut guard = sender.link.lock().await;
                let link = guard.as_mut().expect("taken only when dropped");
                // fe2o3-amqp reads a detach the broker sent (a deleted
                // destination, a token that lapsed) only when asked: a
                // transfer queued on that link would wait out SEND_TIMEOUT.
                if let Some(detached) = link.on_detach().now_or_never() {
                    return Err(SendFailure::Detached(detached));
                }
                let outcome = envelope.queue_on(link).await?;
                drop(guard);
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
                    // Classified by the condition itself, never by words in
                    // its description (which names the entity, whose name
                    // may hold "401" or "not-found").
                    let (symbol, words) = match r.error {
                        Some(e) => (condition_name(&e.condition), e.description.unwrap_or_default()),
                        None => ("amqp:rejected".to_string(), "no reason given".to_string()),
                    };
                    last = format!("{dest} refused the copies: {symbol}: {words}");
                    if symbol == SERVER_BUSY {
                        // Throttled: Azure asks for the send again after a
                        // pause ("Please wait 2 seconds and try again"), as
                        // the SDKs do.
                        if attempt < SEND_ATTEMPTS {
                            tracing::warn!(%dest, attempt, "{last}; sending again in {SERVER_BUSY_WAIT:?}");
                            tokio::time::sleep(SERVER_BUSY_WAIT).await;
                        }
                        continue;
                    }
                    // The broker read the message and refused it (too large,
                    // quota, disabled entity): sending it again changes
                    // nothing. A refusal of these copies fails them alone
                    // (an envelope of distinct messages that a partitioned
                    // entity refuses is sent again one by one); a missing
                    // entity, credentials or a disabled entity fail every
                    // send. A transient condition is tried again.
                    match refusal_of(symbol) {
                        Refusal::Refused(_) => {
                            return Err(BackendError::Provider {
                                provider: PROVIDER,
                                detail: last,
                            });
                        }
                        refusal => {
                            if let Some(err) = refusal_error(&refusal, dest, "send", &words) {
                                return Err(err);
                            }
                        }
                    }
                    tracing::warn!(%dest, attempt, "{last}; sending again");
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
            tokio::time::sleep(pause(attempt)).await;
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
            // The link answered: it is sound, and what it holds stays
            // settleable (a new link could settle none of it, and would
            // find the messages its leases were granted locked until their
            // locks lapsed).
            Err(e @ BackendError::Stalled { .. }) => return Err(e),
            Err(e) => {
                self.drop_link(link.generation).await;
                return Err(e);
            }
        };
        let got = match self.hold_delivered(link.generation, got) {
            Ok(out) => return Ok(out),
            Err(got) => got,
        };
        // A lease of a link already replaced (dropped after a failure while
        // this lease was out): its deliveries could never be completed
        // through the current one, and were their copies sent, the originals
        // would stay behind. Given back instead; deferred messages settle by
        // token on any link.
        let mut infos = Vec::new();
        let mut out = Vec::new();
        for d in got {
            match d.lock {
                link::Lock::Link(info) => infos.push(info),
                link::Lock::Token(token) => out.push(Leased {
                    message: self.received_to_model(d.message),
                    lease: LeaseKind::Token {
                        generation: link.generation,
                        token,
                    }
                    .id(),
                }),
            }
        }
        if let Err(e) = link.dispose(infos, false, &self.link_config).await {
            tracing::debug!(error = %e, "abandon of a replaced link's lease failed; its locks lapse");
        }
        Ok(out)
    }

    /// The leases of deliveries on the link of `generation`, held for their
    /// settles; the deliveries back (Err) when a newer link replaced it.
    fn hold_delivered(
        &self,
        generation: u64,
        got: Vec<link::Delivered>,
    ) -> std::result::Result<Vec<Leased>, Vec<link::Delivered>> {
        let mut held = self.held.lock().expect("held lock");
        if held.generation > generation {
            return Err(got);
        }
        if held.generation < generation {
            // Leases of an older link can no longer be settled.
            *held = Held {
                generation,
                infos: HashMap::new(),
            };
        }
        let mut out = Vec::with_capacity(got.len());
        for d in got {
            let message = self.received_to_model(d.message);
            let lease = match d.lock {
                link::Lock::Link(info) => {
                    let id = info.delivery_id();
                    held.infos.insert(id, (info, d.arrived.into_std()));
                    LeaseKind::Delivery { generation, id }
                }
                link::Lock::Token(token) => LeaseKind::Token { generation, token },
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
    fn take_held(&self, leases: &[LeaseId]) -> (u64, Vec<Option<(DeliveryInfo, std::time::Instant)>>) {
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

    /// The lock tokens of the deliveries among `leases` still held on the
    /// current link (a delivery's tag is its lock token, in .NET's byte
    /// order), each with its delivery's key; and the link's generation.
    fn held_lock_tokens(&self, leases: &[LeaseId]) -> (u64, Vec<(u32, uuid::Uuid)>) {
        let held = self.held.lock().expect("held lock");
        let tokens = leases
            .iter()
            .filter_map(|l| match LeaseKind::of(l)? {
                LeaseKind::Delivery { generation, id } if generation == held.generation => {
                    let (info, _) = held.infos.get(&id)?;
                    let token = uuid::Uuid::from_slice_le(info.delivery_tag()).ok()?;
                    Some((id, token))
                }
                _ => None,
            })
            .collect();
        (held.generation, tokens)
    }

    /// Complete (`complete`) the deliveries among `leases`, each confirmed
    /// (see `link`); every other lease's result is a failure, for the
    /// caller to replace.
    async fn settle_deliveries(&self, leases: &[LeaseId]) -> Vec<SettleResult> {
        let (generation, taken) = self.take_held(leases);
        // A complete after the lock lapsed is refused by the broker
        // (message-lock-lost), and the link does not report refusals: the
        // message was counted settled while it stayed in the DLQ. One whose
        // lock may have lapsed is not completed but abandoned (a no-op if
        // the lock is gone) and reported failed; its copy is in the journal.
        let lock = *self.lock_duration.lock().expect("lock duration lock");
        let lapsed = |at: &std::time::Instant| {
            lock.is_some_and(|lock| at.elapsed() + (lock / 5).min(Duration::from_secs(2)) >= lock)
        };
        let mut out = Vec::with_capacity(taken.len());
        let mut infos = Vec::with_capacity(taken.len());
        let mut expired = Vec::new();
        for t in taken {
            out.push(match t {
                Some((info, at)) if lapsed(&at) => {
                    expired.push(info);
                    SettleResult::Failed {
                        error: format!(
                            "queue {}: held {:.1?}, too close to the LockDuration of {} ({:?}) to complete it: it stays in the dead-letter queue",
                            self.queue_name,
                            at.elapsed(),
                            self.entity.path(),
                            lock.unwrap_or_default()
                        ),
                    }
                }
                Some((info, _)) => {
                    infos.push(info);
                    SettleResult::Settled
                }
                None => SettleResult::Failed {
                    error: "the lock is no longer held (the link was reset or the lease already settled)".into(),
                },
            });
        }
        if !expired.is_empty()
            && let Some(link) = self.current_link(generation).await
            && let Err(e) = link.dispose(expired, false, &self.link_config).await
        {
            tracing::debug!(error = %e, "abandon of deliveries whose lock lapsed failed; the locks lapse anyway");
        }
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
        let infos: Vec<DeliveryInfo> = taken.into_iter().flatten().map(|(info, _)| info).collect();
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
        if let Some(lock) = atom::parse_lock_duration(&text) {
            *self.lock_duration.lock().expect("lock duration lock") = Some(lock);
        }
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
                    format!("management GET {url}: {}", super::with_root_cause(&e)),
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

/// The path of a dead-letter sub-queue below its entity.
fn sub_queue_suffix(sub_queue: ServiceBusSubQueue) -> &'static str {
    match sub_queue {
        ServiceBusSubQueue::DeadLetter => "$DeadLetterQueue",
        ServiceBusSubQueue::TransferDeadLetter => "$Transfer/$DeadLetterQueue",
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
            fixed_hold: Some(
                self.lock_duration
                    .lock()
                    .expect("lock duration lock")
                    .unwrap_or(ASSUMED_LOCK_DURATION),
            ),
            max_hold: None,
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
            let ranges = if self.single_sends.lock().expect("single sends lock").contains(dest) {
                (0..sizes.len()).map(|i| i..i + 1).collect()
            } else {
                pack(&sizes, |i| envelope_base(&built[i].1), max)
            };
            let mut encoded = encoded.into_iter();
            let mut built = built.into_iter();
            // A session's copies in later envelopes wait for its earlier ones.
            let mut order = OrderGate::new(msgs, &results);
            for r in ranges {
                let (batch, bytes): (Vec<(usize, Message<Body<Value>>)>, Vec<Vec<u8>>) = built
                    .by_ref()
                    .take(r.len())
                    .zip(encoded.by_ref().take(r.len()))
                    .filter(|((i, _), _)| order.admit(*i, &mut results))
                    .unzip();
                if batch.is_empty() {
                    continue;
                }
                let (index, envelope) = envelope(batch, bytes);
                match self.send_envelope(dest, &envelope).await {
                    Ok(()) => {
                        for (i, id) in index {
                            results[i] = Some(SendResult::Sent { dest_id: id });
                        }
                    }
                    // Envelopes already accepted keep their results.
                    Err(e) if fails_every_send(&e) => return abandon_send(results, e),
                    Err(e) if index.len() > 1 && refuses_batches(&e) => {
                        tracing::info!(%dest, error = %e, "the destination refuses batches of distinct messages (partitioning with duplicate detection); its copies go one a send");
                        self.single_sends
                            .lock()
                            .expect("single sends lock")
                            .insert(dest.to_string());
                        for (i, _) in index {
                            if !order.admit(i, &mut results) {
                                continue;
                            }
                            let (single, sent) = match self.outgoing_message(&msgs[i], dest) {
                                Ok(m) => {
                                    let (single, alone) = batch::envelope(vec![(i, m)], Vec::new());
                                    (single, self.send_envelope(dest, &alone).await)
                                }
                                Err(error) => (Vec::new(), Err(BackendError::Invalid(error))),
                            };
                            match sent {
                                Ok(()) => {
                                    for (i, id) in single {
                                        results[i] = Some(SendResult::Sent { dest_id: id });
                                    }
                                }
                                Err(e) if fails_every_send(&e) => return abandon_send(results, e),
                                Err(e) => {
                                    results[i] = Some(SendResult::Failed { error: e.to_string() });
                                    order.note([i], &results);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        for (i, _) in &index {
                            results[*i] = Some(SendResult::Failed { error: e.to_string() });
                        }
                        order.note(index.iter().map(|(i, _)| *i), &results);
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

    /// Renews the locks (`com.microsoft:renew-lock`) for another
    /// LockDuration, whatever `hold` asks: Service Bus has no other.
    async fn extend(&self, leases: &[LeaseId], _hold: Duration) -> Result<()> {
        let (generation, mut delivered) = self.held_lock_tokens(leases);
        // Deferred messages' locks are named by their tokens alone.
        let (mut deferred, _) = lock_tokens(leases);
        {
            let lost = self.lost_locks.lock().expect("lost locks lock");
            deferred.retain(|(_, t)| !lost.contains(t));
        }
        if delivered.is_empty() && deferred.is_empty() {
            return Ok(());
        }
        let link = match self.current_link(generation).await {
            Some(link) => link,
            // Locks taken on a link that was reset are gone with it (their
            // messages come back and are skipped as seen); a deferred
            // message's lock is the entity's, renewed on any link.
            None if !deferred.is_empty() => {
                delivered.clear();
                self.link().await?
            }
            None => return Ok(()),
        };
        let tokens: Vec<uuid::Uuid> = delivered
            .iter()
            .map(|(_, t)| *t)
            .chain(deferred.iter().map(|(_, t)| *t))
            .collect();
        let asked = std::time::Instant::now();
        let outcomes = link.renew_locks(tokens, &self.link_config).await?;
        let mut lost_deliveries = Vec::new();
        {
            let mut held = self.held.lock().expect("held lock");
            if held.generation == generation {
                for ((id, _), outcome) in delivered.iter().zip(&outcomes) {
                    if outcome.is_some() {
                        // The lock is lost: not renewed again, and not
                        // settled by the engine later.
                        lost_deliveries.extend(held.infos.remove(id).map(|(info, _)| info));
                    } else if let Some((_, at)) = held.infos.get_mut(id) {
                        *at = asked;
                    }
                }
            }
        }
        if !lost_deliveries.is_empty() {
            // The link still counts them as handed out, and a kept link
            // (`serve`) starts a new pass, browsing from the start, only
            // once it has handed out nothing: without this it never would
            // again. The abandon is a no-op at the broker (the lock is gone)
            // and frees the delivery's state in the client. Not awaited: the
            // link postpones abandons while a lease is being received, and
            // the other held batches' renewals must not wait behind it.
            let (link, cfg) = (link.clone(), self.link_config.clone());
            tokio::spawn(async move {
                if let Err(e) = link.dispose(lost_deliveries, false, &cfg).await {
                    tracing::debug!(error = %e, "abandon of deliveries whose lock was lost failed");
                }
            });
        }
        {
            let mut lost = self.lost_locks.lock().expect("lost locks lock");
            if lost.len() > 10_000 {
                // A long-lived sidecar's: kept only to spare calls.
                lost.clear();
            }
            let refused = deferred.iter().zip(&outcomes[delivered.len()..]);
            lost.extend(refused.filter(|(_, o)| o.is_some()).map(|((_, t), _)| *t));
        }
        let refused = outcomes.iter().flatten().count();
        let first = outcomes.iter().flatten().next();
        if refused == outcomes.len()
            && let Some(first) = first
        {
            // Every lock refused: a stall past the LockDuration, or a broker
            // that reads the tokens otherwise; the caller warns.
            return Err(BackendError::Refused {
                provider: PROVIDER,
                detail: format!(
                    "queue {}: renew-lock refused for all {refused} locks: {first}",
                    self.queue_name
                ),
            });
        }
        if refused > 0 {
            tracing::debug!(
                refused,
                first = first.map(String::as_str),
                "locks not renewed (already lost): those messages come back and are skipped as seen"
            );
        }
        Ok(())
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

/// Whether a send of several copies was refused for being a batch: Azure
/// refuses, with amqp:not-allowed, a batch of messages with distinct
/// MessageId, SessionId or PartitionKey to an entity with partitioning and
/// duplicate detection, and every copy carries its own MessageId.
fn refuses_batches(e: &BackendError) -> bool {
    matches!(e, BackendError::Provider { detail, .. } if detail.contains("amqp:not-allowed"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
