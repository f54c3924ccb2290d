//! The dead-letter queue's own AMQP connection and receiver link, on which
//! the adapter leases (peek-lock receives), completes and abandons; and the
//! copies' sender links, on a session of the same connection (see
//! [`send_loop`]).
//!
//! Why not azservicebus: a message is settled on the link that received it,
//! and azservicebus 0.25 needs its whole received message object to complete
//! or abandon one (its fields are private, its body cannot be dropped). A
//! redrive holds every non-matching message until the end of the pass, so the
//! adapter kept every body: 3.6 KiB per held 1 KiB message, 242 MiB at 100k.
//! On its own fe2o3-amqp link the adapter keeps only the [`DeliveryInfo`]
//! (delivery id and tag) of a held message. Settling by lock token through
//! `$management` (`com.microsoft:update-disposition`) is no way out: Service
//! Bus accepts it only for messages received through `$management`
//! (deferred ones, see below); a lock taken on a link is settled on that link.
//!
//! One task owns the connection, the session, the `$cbs` client and the
//! receiver link of the dead-letter queue, and serves the backend's commands
//! as they come: concurrent `lease` calls overlap (each takes its credit
//! while earlier ones are still being received, and deliveries fill them in
//! order), and completes and abandons are applied as soon as they arrive,
//! between two deliveries, so that the settles of one batch overlap the next
//! leases. Browses and confirms go on two `$management` links, each served by
//! a task of its own, so the link's task never waits for their round trips;
//! the browsing link has a session of its own, so that opening the link
//! attaches it at the same time as the receiver.
//!
//! ## Credit
//! Credit is only ever granted for messages a browse
//! (`com.microsoft:peek-message`) has shown past the last one browsed (or
//! received): the receive then completes without waiting, and no credit is
//! left on the link afterwards. The browses run ahead of the leases: while
//! fewer than [`MAX_BROWSE`] messages are known and not yet granted, a browse
//! is out, so a lease takes its credit at once and costs one round trip
//! instead of two. A browse's answer carries whole messages, so it asks for
//! as many as fit in [`BROWSE_BYTES`] at the size of the last ones browsed.
//! No browsed message is decoded: each is read, where it lies in the
//! answer, only as far as its message annotations (`scan_annotations`), for
//! its sequence number and whether it is deferred. The next browse starts
//! past the last one, so no message is counted twice; a deferred one is not
//! counted as credit at all (see below). A lease waits for a full share while more may come; once a
//! browse shows fewer than it asked for, a lease takes what is known, and a
//! browse that shows none answers the waiting leases empty (the pass is
//! drained). Credit left over would make the broker deliver a
//! message released later straight back to this link, where it would stay
//! locked until its lock lapsed (a message abandoned at the end of a pass
//! would not be seen by the next). fe2o3-amqp 0.14's drain cannot replace the
//! browse: it does not reset the link's credit when the broker answers a drain,
//! and counts deliveries read after that answer twice, so the next grant is
//! too large. When another consumer locks some browsed messages first, fewer
//! arrive: the lease returns after [`LEASE_WAIT`] with what it has, and the
//! credit still open is tracked; messages that arrive on it later are kept
//! (at most that credit, at most a batch) and handed to the next lease. A
//! lease that nothing reached by then (the broker stalls, or others took
//! every message browsed) would end the pass as drained: it waits on, first
//! in line, until [`LEASE_STALL_WAIT`] after it was asked (at least
//! [`LEASE_WAIT`] at the front, and at most [`LEASE_WAIT`] more after an
//! answer that came just then), for what a broker that stalled delivers
//! late. A browse asked as the first such lease starts waiting on tells the
//! two apart: the broker's answers since the lease's first wait ran out
//! count (for a lease that waited behind another, those to the browse that
//! lease asked). If the broker answered since, it returns empty (others hold
//! what was browsed; [`LEASE_WAIT`] after an answer that came just now, for
//! deliveries right behind it); if not, it fails
//! (`BackendError::Stalled`, which the engine retries on the same link)
//! rather than end the pass with the browsed messages unseen. The retry
//! takes what came late; a browse that finds the queue drained meanwhile
//! leaves the waiting leases [`LEASE_WAIT`] for what the stalled lease's
//! credit still brings before one answers empty. A
//! message delivered again in a pass (its lock lapsed, or it was abandoned)
//! took credit granted for one browsed and not yet delivered: the link keeps
//! the sequence numbers it delivered in the pass, and each delivered again
//! makes that message known again, to be granted credit anew. A
//! lease whose caller went away (cancelled) abandons what it received.
//!
//! ## Deferred messages
//! A deferred message is delivered to no receiver link: credit granted for
//! one would bring nothing, and the lease would wait out [`LEASE_WAIT`]. The
//! browses keep the sequence numbers of the deferred messages they show
//! apart instead, and the next leases take those first, each up to its
//! share, before any credit: a third `$management` link, attached when the
//! first deferred message is met, in a task of its own (`deferred_loop`),
//! locks them with `com.microsoft:receive-by-sequence-number` (peek-lock,
//! `receiver-settle-mode` 1) and settles them by lock token with
//! `com.microsoft:update-disposition` (`completed`, or `abandoned`, which
//! leaves a message deferred). A receive that names a message another
//! consumer locked or settled since the browse is refused whole: it is made
//! again a message at a time, and the refused ones are left out. The
//! broker's answer to a disposition is its confirmation. Such leases count
//! as handed out like the link's deliveries, so a new pass starts only once
//! they too are settled or released.
//!
//! ## Dispositions
//! fe2o3-amqp returns from `accept` / `modify` once the disposition is queued
//! for the session, not once it is on the wire: a process that exits (or is
//! killed) right after would lose it. Each batch of dispositions is therefore
//! followed by a one-message browse on the same session; its answer proves the
//! dispositions before it reached the broker, which handles a connection's
//! frames in order. A second `$management` link, in a task of its own, sends
//! these browses (one out at a time, covering every batch queued meanwhile),
//! so a settle's round trip never holds up the next lease's browse.
//!
//! ## Authorization and transport
//! Claims-based security: SASL ANONYMOUS, then a token put on `$cbs` for the
//! dead-letter queue and its `$management` node, put again before it
//! expires: a SAS token signed from the connection string's key (valid
//! `servicebus.sas_token_ttl`, default [`SAS_TTL_SECS`](super::SAS_TTL_SECS),
//! renewed at 5/6 of it), a pre-signed `SharedAccessSignature` as given (it
//! cannot be renewed), or an Entra ID access token from workload identity
//! (renewed 4 minutes before it expires).
//! `amqps://` on port 5671 with TLS (native-tls, as azservicebus) for Azure;
//! plain `amqp://` on 5672 for `UseDevelopmentEmulator=true`. The adapter
//! opens the TCP stream itself, so it sets TCP_NODELAY on it directly (see
//! `set_nodelay_on_amqp_sockets` for why that matters).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_management::error::Error as ManagementError;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use fe2o3_amqp_management::status::StatusCode;
use fe2o3_amqp_types::definitions::ReceiverSettleMode;
use fe2o3_amqp_types::messaging::{AmqpValue, FromBody, FromEmptyBody};
use fe2o3_amqp_types::messaging::{Body, Message, Modified, Source};
use fe2o3_amqp_types::primitives::{Array, OrderedMap, Timestamp, Uuid as AmqpUuid, Value};
use futures::FutureExt as _;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::auth::{WorkloadIdentityCredential, sas_token, unix_now};
use super::codec::{is_deferred, sequence_number};
use super::errors::{Refusal, broker_words, is_server_busy, refusal_error, refusal_in};
use super::rpc::RpcLink;
use super::{BackendError, CALL_TIMEOUT, CONNECT_TIMEOUT, LEASE_STALL_WAIT, LEASE_WAIT, PROVIDER, Result};

const PEEK_OPERATION: &str = "com.microsoft:peek-message";
const RECEIVE_BY_SEQUENCE_OPERATION: &str = "com.microsoft:receive-by-sequence-number";
const UPDATE_DISPOSITION_OPERATION: &str = "com.microsoft:update-disposition";
const RENEW_LOCK_OPERATION: &str = "com.microsoft:renew-lock";
const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";
const JWT_TOKEN_TYPE: &str = "jwt";
const ENTRA_SCOPE: &str = "https://servicebus.azure.net/.default";
/// The connection's idle timeout (heartbeats), as azservicebus sets it.
const IDLE_TIMEOUT_MS: u32 = 60_000;
const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// How long closing the connection may take when the task ends.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most messages one browse counts for the leases waiting to start.
const MAX_BROWSE: usize = super::MAX_CONCURRENT_LEASES * super::MAX_LEASE;
/// The encoded messages one browse's answer may carry, as estimated from the
/// last answer: the answer carries whole messages and is assembled in memory
/// before it is counted, so at 64 KiB one of [`MAX_BROWSE`] held 64 MiB. The
/// first browse, with nothing known, assumes 64 KiB messages: 128 of them,
/// more than the first lease takes.
const BROWSE_BYTES: usize = 8 << 20;
const FIRST_BROWSE: usize = BROWSE_BYTES / (64 << 10);

/// How the link authorizes itself on `$cbs`.
pub(super) enum Credentials {
    /// A SAS key: tokens are signed here, and renewed.
    Key {
        name: String,
        key: String,
    },
    /// A pre-signed `SharedAccessSignature` from the connection string.
    Signature(String),
    Entra(Arc<WorkloadIdentityCredential>),
}

pub(super) struct LinkConfig {
    pub host: String,
    /// `amqps://` (Azure) or plain `amqp://` (an emulator).
    pub tls: bool,
    /// `<entity>/$DeadLetterQueue`, or `<entity>/$Transfer/$DeadLetterQueue`.
    pub dlq_path: String,
    /// The connection string's `EntityPath`: its key signs for that queue
    /// or topic only, so tokens are signed for it, not the namespace.
    pub scope: Option<String>,
    pub credentials: Credentials,
    /// Lifetime of a SAS token signed from a key (`servicebus.sas_token_ttl`).
    pub sas_ttl: Duration,
    /// Names the queue in errors.
    pub label: String,
}

impl LinkConfig {
    fn scheme(&self) -> &'static str {
        if self.tls { "amqps" } else { "amqp" }
    }

    fn unreachable(&self, detail: impl std::fmt::Display) -> BackendError {
        BackendError::unreachable(format!("{}://{}", self.scheme(), self.host), detail.to_string())
    }

    /// Sorts an error of the link's opening by the broker's condition or
    /// status ([`refusal_in`]): a missing entity, refused credentials, a
    /// disabled entity and any other refusal (`amqp:not-allowed`...) are the
    /// caller's to fix and say so; a transient condition, and an error the
    /// broker did not answer with (I/O, a timeout), are the connection's.
    fn classify(&self, what: &str, e: &dyn std::fmt::Debug) -> BackendError {
        self.classify_entity(&self.label, what, e)
    }

    /// As [`classify`](Self::classify), for an error about `entity`.
    pub fn classify_entity(&self, entity: &str, what: &str, e: &dyn std::fmt::Debug) -> BackendError {
        let text = format!("{e:?}");
        // The words below are looked for outside the entity's name, which
        // may well hold "401" or "not-found".
        let lower = text.replace(entity, "").to_ascii_lowercase();
        let words = broker_words(&text).unwrap_or_else(|| text.clone());
        let detail = format!("{what}: {words}");
        if let tls @ BackendError::Tls { .. } = self.unreachable(format!("{what}: {text}")) {
            return tls;
        }
        // The broker's condition or status says what it refused, and why;
        // only a transient one (a forced detach, busy) or none at all (I/O,
        // a timeout) is the connection's failure.
        if let Some(refusal) = refusal_in(&text) {
            return refusal_error(&refusal, entity, what, &words).unwrap_or_else(|| self.unreachable(detail));
        }
        if lower.contains("not-found") || lower.contains("notfound") {
            BackendError::NotFound {
                queue: entity.to_string(),
                detail,
            }
        } else if lower.contains("unauthorized") || lower.contains("401") {
            BackendError::Auth {
                provider: PROVIDER,
                detail,
            }
        } else if lower.contains("entity-disabled") {
            // Reached, and refused: the connection is fine (an unreachable
            // error would also drop the dead-letter queue's link, and what
            // it holds, for a destination that refuses sends).
            BackendError::Refused {
                provider: PROVIDER,
                detail: format!("{entity} is disabled ({detail}): set its status to Active"),
            }
        } else {
            self.unreachable(detail)
        }
    }

    /// The token for `$cbs` and when to put a fresh one (None: never).
    async fn token(&self) -> Result<(CbsToken<'static>, Option<Instant>)> {
        let now = unix_now();
        match &self.credentials {
            Credentials::Key { name, key } => {
                let ttl = self.sas_ttl.as_secs().max(1);
                let expiry = now + ttl;
                // Signed for the namespace, as the SDKs do: it covers every
                // entity the key's rule allows. A key of an entity-level
                // policy signs for its entity (the SDKs sign for EntityPath):
                // Azure refuses such a key's token for the namespace.
                let resource = match &self.scope {
                    Some(entity) => self.audience(entity),
                    None => format!("{}://{}/", self.scheme(), self.host),
                };
                let token = sas_token(&resource, name, key, expiry);
                let renew = Instant::now() + valid_for(expiry) * 5 / 6;
                Ok((
                    CbsToken::new(token, SAS_TOKEN_TYPE, Some(timestamp(expiry))),
                    Some(renew),
                ))
            }
            Credentials::Signature(sig) => Ok((CbsToken::new(sig.clone(), SAS_TOKEN_TYPE, None), None)),
            Credentials::Entra(cred) => {
                let (token, expiry) = cred.fetch(&[ENTRA_SCOPE]).await?;
                Ok((
                    CbsToken::new(token, JWT_TOKEN_TYPE, Some(timestamp(expiry))),
                    Some(Instant::now() + entra_renewal(valid_for(expiry))),
                ))
            }
        }
    }

    /// The address of an entity, which is also its token's audience.
    pub fn audience(&self, entity: &str) -> String {
        format!("{}://{}/{}", self.scheme(), self.host, entity)
    }

    /// The dead-letter queue's address, the one audience its token is put
    /// for: Service Bus audiences are URI prefixes, so it also covers the
    /// queue's `$management` node (Microsoft's Python SDK puts one token,
    /// for the entity, and browses through `$management` on it). One put
    /// instead of two is a round trip less when the link opens and renews.
    fn dlq_audience(&self) -> String {
        self.audience(&self.dlq_path)
    }
}

/// How long a token that expires at `expiry` (a whole Unix second, as SAS
/// tokens and Entra ID's `expires_in` give it) is still valid: up to a second
/// less than its whole-second lifetime says.
fn valid_for(expiry: u64) -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(Duration::ZERO, |since| {
            Duration::from_secs(expiry).saturating_sub(since)
        })
}

/// When to put a fresh Entra ID token, `valid_for` before the one put
/// expires. Within the last 4 minutes of a long-lived token (Entra's last 60
/// to 90 minutes), which is inside the credential's cache window of 5: the
/// fetch then gets a new token, not the cached one. A short-lived token
/// (10 minutes or less) is renewed at 5/6 of what it has left, as SAS tokens
/// are, never after it expired.
fn entra_renewal(valid_for: Duration) -> Duration {
    if valid_for > Duration::from_secs(600) {
        valid_for - Duration::from_secs(240)
    } else {
        valid_for * 5 / 6
    }
}

fn timestamp(unix_secs: u64) -> Timestamp {
    Timestamp::from_milliseconds(i64::try_from(unix_secs).unwrap_or(i64::MAX / 1000) * 1000)
}

/// A received message, what settles it, and when it reached the client:
/// its lock runs from about then, however long it waited for a lease (a
/// delivery kept from credit left over waits for the next one).
pub(super) struct Delivered {
    pub lock: Lock,
    pub message: Message<Body<Value>>,
    pub arrived: Instant,
}

/// What settles a received message: a delivery on the receiver link is
/// settled on that link; a deferred message, received by sequence number
/// through `$management`, by its lock token there.
pub(super) enum Lock {
    Link(DeliveryInfo),
    Token(uuid::Uuid),
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// Each lock token's outcome, in order: None when it was applied, else why not.
pub(super) type TokenOutcomes = Vec<Option<String>>;

enum Command {
    Lease {
        max: u32,
        reply: Reply<Vec<Delivered>>,
    },
    Dispose {
        infos: Vec<DeliveryInfo>,
        complete: bool,
        reply: Reply<()>,
    },
    /// Complete or abandon lock tokens of deferred messages; `counted` of
    /// them were handed out by this link (the others by an earlier one).
    Settle {
        tokens: Vec<uuid::Uuid>,
        complete: bool,
        counted: usize,
        reply: Reply<TokenOutcomes>,
    },
    /// Renew the locks of these tokens (deliveries' and deferred messages').
    Renew {
        tokens: Vec<uuid::Uuid>,
        reply: Reply<TokenOutcomes>,
    },
}

/// The backend's handle on the link's task. Dropping the last handle ends
/// the task and closes the connection.
pub(super) struct DlqLink {
    commands: mpsc::Sender<Command>,
    /// Asks [`send_loop`] for sender links.
    attaches: mpsc::UnboundedSender<AttachRequest>,
    /// The sender asked for while the link opened, and its destination.
    early: std::sync::Mutex<Option<(String, oneshot::Receiver<Result<Sender>>)>>,
    pub generation: u64,
    /// Cancelled once the link's task ends (the link or its connection
    /// failed, or it was dropped): the senders on its connection are dead too.
    ended: CancellationToken,
}

impl DlqLink {
    /// Open the link, on `opening` if the connection is already on its way
    /// or open (see [`Connected::start`]). A sender to the destination `send_to`
    /// names once the connection is open attaches alongside the receiver.
    pub async fn open(
        cfg: Arc<LinkConfig>,
        generation: u64,
        opening: Option<Opening>,
        send_to: Arc<std::sync::Mutex<Option<String>>>,
    ) -> Result<Self> {
        let opening = async {
            let mut connected = match opening {
                Some(o) => o.finish(&cfg).await?,
                None => Connected::open(&cfg).await?,
            };
            let send_session = connected.send_session.take().expect("begun with the connection");
            let (attaches, requests) = mpsc::unbounded_channel();
            tokio::spawn(send_loop(
                cfg.clone(),
                connected.container.clone(),
                send_session,
                requests,
            ));
            // Read now, not when the opening started: the pass names its
            // destination while the connection opens.
            let early = send_to.lock().expect("send_to lock").clone().map(|dest| {
                let (reply, rx) = oneshot::channel();
                let _ = attaches.send(AttachRequest {
                    dest: dest.clone(),
                    reply,
                });
                (dest, rx)
            });
            let actor = Actor::open(cfg.clone(), connected).await?;
            Ok::<_, BackendError>((actor, attaches, early))
        };
        let (actor, attaches, early) = tokio::time::timeout(CONNECT_TIMEOUT + CALL_TIMEOUT, opening)
            .await
            .map_err(|_| cfg.unreachable("opening the dead-letter queue's link timed out"))??;
        let (commands, rx) = mpsc::channel(64);
        let ended = CancellationToken::new();
        tokio::spawn(actor.run(rx, ended.clone()));
        Ok(Self {
            commands,
            attaches,
            early: std::sync::Mutex::new(early),
            generation,
            ended,
        })
    }

    /// Cancelled once the link's task has ended: a send on its connection
    /// that still waits for its outcome will not get one.
    pub fn ended(&self) -> CancellationToken {
        self.ended.clone()
    }

    /// A sender link to the queue or topic `dest`, on this link's connection.
    pub async fn sender(&self, dest: &str, cfg: &LinkConfig) -> Result<Sender> {
        let gone = || cfg.unreachable("the dead-letter queue's connection closed");
        let early = self.early.lock().expect("early lock").take_if(|(d, _)| d == dest);
        let rx = match early {
            Some((_, rx)) => rx,
            None => {
                let (reply, rx) = oneshot::channel();
                let request = AttachRequest {
                    dest: dest.to_string(),
                    reply,
                };
                self.attaches.send(request).map_err(|_| gone())?;
                rx
            }
        };
        // Behind the attaches asked for before it, each bounded.
        match tokio::time::timeout(4 * CALL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(cfg.unreachable(format!("attaching a sender to {dest} timed out"))),
        }
    }

    /// The task ended (the link or its connection failed).
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    /// Queue a lease of up to `max` messages; [`Self::leased`] waits for its
    /// deliveries. The link serves leases in the order they were queued.
    pub async fn queue_lease(&self, max: u32, label: &LinkConfig) -> Result<LeaseReply> {
        let (reply, rx) = oneshot::channel();
        self.queue(Command::Lease { max, reply }, label).await?;
        Ok(LeaseReply(rx))
    }

    pub async fn leased(&self, reply: LeaseReply, label: &LinkConfig) -> Result<Vec<Delivered>> {
        answer(reply.0, LEASE_STALL_WAIT + 2 * CALL_TIMEOUT, label).await
    }

    /// Complete (`complete`) or abandon the deliveries, and confirm that the
    /// dispositions reached the broker.
    pub async fn dispose(&self, infos: Vec<DeliveryInfo>, complete: bool, label: &LinkConfig) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Dispose { infos, complete, reply }, rx, 2 * CALL_TIMEOUT, label)
            .await
    }

    /// Complete (`complete`) or abandon deferred messages by their lock
    /// tokens (`com.microsoft:update-disposition`), `counted` of which this
    /// link handed out. The answer is the broker's: no confirming browse.
    pub async fn settle_tokens(
        &self,
        tokens: Vec<uuid::Uuid>,
        complete: bool,
        counted: usize,
        label: &LinkConfig,
    ) -> Result<TokenOutcomes> {
        let (reply, rx) = oneshot::channel();
        // One call per chunk, and one per token of a chunk that failed, behind
        // what the `$management` link has queued already.
        let limit = CALL_TIMEOUT * (4 + tokens.len().div_ceil(MGMT_BATCH) as u32);
        let cmd = Command::Settle {
            tokens,
            complete,
            counted,
            reply,
        };
        self.call(cmd, rx, limit, label).await
    }

    /// Renew the locks of `tokens` (`com.microsoft:renew-lock`) for another
    /// LockDuration: each token's outcome (a lock already lost is refused).
    pub async fn renew_locks(&self, tokens: Vec<uuid::Uuid>, label: &LinkConfig) -> Result<TokenOutcomes> {
        let (reply, rx) = oneshot::channel();
        let limit = CALL_TIMEOUT * (4 + tokens.len().div_ceil(MGMT_BATCH) as u32);
        self.call(Command::Renew { tokens, reply }, rx, limit, label).await
    }

    async fn call<T>(
        &self,
        cmd: Command,
        rx: oneshot::Receiver<Result<T>>,
        limit: Duration,
        cfg: &LinkConfig,
    ) -> Result<T> {
        self.queue(cmd, cfg).await?;
        answer(rx, limit, cfg).await
    }

    async fn queue(&self, cmd: Command, cfg: &LinkConfig) -> Result<()> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| cfg.unreachable("the dead-letter queue's link closed"))
    }
}

/// A queued lease's deliveries, to come.
pub struct LeaseReply(oneshot::Receiver<Result<Vec<Delivered>>>);

/// The link task's answer to a command, within `limit`.
async fn answer<T>(rx: oneshot::Receiver<Result<T>>, limit: Duration, cfg: &LinkConfig) -> Result<T> {
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(cfg.unreachable("the dead-letter queue's link closed")),
        Err(_) => Err(cfg.unreachable(format!("no answer from the dead-letter queue's link within {limit:?}"))),
    }
}

struct LeaseRequest {
    max: u32,
    reply: Reply<Vec<Delivered>>,
}

/// What a lease waits for, and what its deadline does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Its share of what the browse showed, [`LEASE_WAIT`]: then it
    /// returns what came.
    First,
    /// Nothing came by the first deadline (at `since`): waiting on, to
    /// [`LEASE_STALL_WAIT`] in all, at least [`LEASE_WAIT`] at the front,
    /// and to `since` + [`LEASE_STALL_WAIT`] after an answer that came just
    /// then (see the deadline).
    Stalled { since: Instant },
    /// The queue is drained, but credit granted to a lease that failed
    /// stalled is still out: what the broker delivers late for it,
    /// [`LEASE_WAIT`], then what came (nothing: the pass ends).
    Late,
}

struct Active {
    want: usize,
    wait: Wait,
    got: Vec<Delivered>,
    deadline: Instant,
    reply: Reply<Vec<Delivered>>,
}

impl Active {
    /// A lease waiting for `want` deliveries, first for [`LEASE_WAIT`].
    fn new(want: usize, wait: Wait, reply: Reply<Vec<Delivered>>) -> Self {
        Self {
            want,
            wait,
            got: Vec::with_capacity(want),
            deadline: Instant::now() + LEASE_WAIT,
            reply,
        }
    }
}

struct Actor {
    cfg: Arc<LinkConfig>,
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    /// The session of the browsing `$management` link.
    browse_session: SessionHandle<()>,
    cbs: RpcLink,
    receiver: Receiver,
    /// Browses go to a task of their own (see [`browse_loop`]), so the link
    /// goes on receiving and granting while one is out.
    browser: mpsc::UnboundedSender<BrowseRequest>,
    /// The browse out, if any: the pass it was asked for, how many messages
    /// it asked for, and its answer.
    browse_out: Option<(u64, usize, oneshot::Receiver<Result<Browsed>>)>,
    /// How many messages the next browse asks for: [`BROWSE_BYTES`] of them
    /// at the size of the last ones browsed.
    browse_count: usize,
    /// Messages browsed ahead and not yet granted to a lease: a lease takes
    /// its credit from them at once, without waiting for a browse.
    known: usize,
    /// The last browse showed fewer messages than asked for (none: `drained`),
    /// so no more is known to come: a lease takes what is known.
    short: bool,
    drained: bool,
    /// Credit granted to leases that failed stalled and not yet used: the
    /// broker may still deliver on it (see `on_browsed`). Counted down by
    /// every delivery, so at most what is still out.
    stalled_credit: usize,
    /// When a browse was last answered: a lease waiting on since before
    /// then waits on a broker that answers (see the deadline).
    browse_answered_at: Option<Instant>,
    /// Counts passes over the queue (see `start_leases`): a browse asked for
    /// in an earlier one is ignored.
    pass: u64,
    /// Something was handed out since the pass began.
    pass_used: bool,
    /// Dispositions' callers, answered by the confirming task once a round
    /// trip behind them came back (see [`confirm_loop`]).
    confirms: mpsc::UnboundedSender<Vec<Reply<()>>>,
    /// Why the confirming task failed: the link fails with it.
    confirm_failed: mpsc::Receiver<BackendError>,
    renew_at: Option<Instant>,
    /// Token renewals that failed in a row ([`retry_renewal`]).
    renew_failures: u32,
    /// Credit the broker may still use on the receiver link.
    credit: u32,
    /// Where the next lease's browse starts: after the last message browsed
    /// for a lease (or received, whichever is further).
    browse_from: i64,
    /// Deliveries handed to the backend and not disposed of yet: none means
    /// a new pass, which browses from the beginning again.
    handed_out: usize,
    /// Deliveries that arrived on credit left over from a lease.
    stash: Vec<Delivered>,
    /// Sequence numbers delivered this pass: one delivered again (its lock
    /// lapsed, or it was abandoned) took credit granted for a message
    /// browsed and not yet delivered, which needs credit again.
    delivered: std::collections::HashSet<i64, foldhash::fast::RandomState>,
    pending: VecDeque<LeaseRequest>,
    /// Leases being received, oldest first: deliveries fill them in order.
    actives: VecDeque<Active>,
    /// Abandons waiting until no lease is being received (see `dispose`),
    /// with the caller to answer (none: a cancelled lease's deliveries).
    postponed: Vec<(Vec<DeliveryInfo>, Option<Reply<()>>)>,
    /// Names the links the task attaches.
    container: String,
    /// Sequence numbers of deferred messages browsed and not yet asked for:
    /// no credit brings them, a receive by sequence number does.
    deferred: VecDeque<i64>,
    /// The `$management` link of deferred messages ([`deferred_loop`]),
    /// attached when the first one is met.
    deferred_ops: Option<mpsc::UnboundedSender<DeferredOp>>,
    /// Receives by sequence number come back here, to be handed out.
    deferred_done: mpsc::UnboundedReceiver<DeferredDone>,
    deferred_done_tx: mpsc::UnboundedSender<DeferredDone>,
    /// Receives by sequence number out.
    receiving_deferred: usize,
}

/// The part of the link's opening that does not name the dead-letter queue:
/// TCP (and TLS), SASL, AMQP open, both sessions, and `$cbs` with the
/// tokens put. About nine round trips in series; since nothing here attaches
/// to the entity, it may run while `connect` still checks that the entity
/// exists (an emulator creates an entity a link attaches to), see
/// [`Connected::start`].
pub(super) struct Connected {
    container: String,
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    browse_session: SessionHandle<()>,
    /// The session of the copies' sender links (see [`send_loop`]), taken
    /// when the link opens.
    send_session: Option<SessionHandle<()>>,
    cbs: RpcLink,
    renew_at: Option<Instant>,
}

/// A [`Connected`] being opened in the background; dropping it stops the
/// opening (a backend whose connect failed leaves no connection behind).
pub(super) struct Connecting(tokio::task::JoinHandle<Result<Connected>>);

impl Drop for Connecting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The link's connection as a pass's `connect` leaves it: still opening, or
/// open (`connect` waited for it, as the check that the namespace answers and
/// takes the credentials).
pub(super) enum Opening {
    Connecting(Connecting),
    Connected(Box<Connected>),
}

impl Opening {
    /// Wait until the connection is open.
    pub async fn opened(self, cfg: &LinkConfig) -> Result<Self> {
        Ok(Self::Connected(Box::new(self.finish(cfg).await?)))
    }

    async fn finish(self, cfg: &LinkConfig) -> Result<Connected> {
        match self {
            Self::Connecting(c) => c.finish(cfg).await,
            Self::Connected(c) => Ok(*c),
        }
    }
}

impl Connecting {
    async fn finish(mut self, cfg: &LinkConfig) -> Result<Connected> {
        (&mut self.0)
            .await
            .map_err(|e| cfg.unreachable(format!("opening the AMQP connection ended early: {e}")))?
    }
}

impl Connected {
    /// Open in the background; [`DlqLink::open`] takes it over.
    pub fn start(cfg: Arc<LinkConfig>) -> Connecting {
        Connecting(tokio::spawn(async move {
            tokio::time::timeout(CONNECT_TIMEOUT + CALL_TIMEOUT, Self::open(&cfg))
                .await
                .map_err(|_| cfg.unreachable("opening the AMQP connection timed out"))?
        }))
    }

    async fn open(cfg: &LinkConfig) -> Result<Self> {
        let port = if cfg.tls { 5671 } else { 5672 };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((cfg.host.as_str(), port)),
        )
        .await
        .map_err(|_| cfg.unreachable(format!("no TCP connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| cfg.unreachable(format!("connect to port {port}: {e}")))?;
        // See `set_nodelay_on_amqp_sockets`: without it every confirming
        // browse waits out the broker's delayed ACK.
        let _ = tcp.set_nodelay(true);
        tracing::debug!("TCP connected");
        let container = format!("dlq-bridge-{}", uuid::Uuid::new_v4());
        let mut connection = Connection::builder()
            .container_id(container.as_str())
            .hostname(cfg.host.as_str())
            .domain(cfg.host.as_str())
            .scheme(cfg.scheme())
            .alt_tls_establishment(true)
            .sasl_profile(SaslProfile::Anonymous)
            .max_frame_size(MAX_FRAME_SIZE)
            .idle_time_out(IDLE_TIMEOUT_MS)
            .open_with_stream(tcp)
            .await
            .map_err(|e| cfg.classify("open the AMQP connection", &e))?;
        tracing::debug!("AMQP connection open");
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|e| cfg.classify("begin an AMQP session", &e))?;
        tracing::debug!("session begun");
        // Browses go on a session of their own, begun while `$cbs` authorizes
        // on the first: their link attaches at the same time as the receiver,
        // and the first browse is out before the link's task starts. Confirms
        // stay on the receiver's session: a session sends its frames in the
        // order they were queued, which is what makes a browse behind the
        // dispositions prove them; frames of two sessions may pass each other.
        let authorized = async {
            let mut cbs = RpcLink::cbs(&mut session)
                .await
                .map_err(|e| cfg.classify("attach to $cbs", &e))?;
            tracing::debug!("$cbs attached");
            let renew_at = put_tokens(cfg, &mut cbs).await?;
            tracing::debug!("token put");
            Ok::<_, BackendError>((cbs, renew_at))
        };
        let begun = async {
            let browse = Session::begin(&mut connection)
                .await
                .map_err(|e| cfg.classify("begin an AMQP session", &e))?;
            let send = Session::begin(&mut connection)
                .await
                .map_err(|e| cfg.classify("begin an AMQP session", &e))?;
            Ok::<_, BackendError>((browse, send))
        };
        let (authorized, begun) = tokio::join!(authorized, begun);
        let (cbs, renew_at) = authorized?;
        let (browse_session, send_session) = begun?;
        Ok(Self {
            container,
            connection,
            session,
            browse_session,
            send_session: Some(send_session),
            cbs,
            renew_at,
        })
    }
}

impl Actor {
    /// Attach the receiver and both `$management` links on `connected`.
    async fn open(cfg: Arc<LinkConfig>, connected: Connected) -> Result<Self> {
        let Connected {
            container,
            connection,
            mut session,
            mut browse_session,
            send_session: _,
            cbs,
            renew_at,
        } = connected;
        let address = cfg.dlq_audience();
        let receiving = async {
            let receiver = Receiver::builder()
                .name(format!("{container}-dlq"))
                .source(Source::builder().address(address).build())
                .target(format!("{container}-dlq-target"))
                .receiver_settle_mode(ReceiverSettleMode::Second)
                .credit_mode(CreditMode::Manual)
                .auto_accept(false)
                .attach(&mut session)
                .await
                .map_err(|e| cfg.classify("attach to the dead-letter queue", &e))?;
            tracing::debug!("receiver attached");
            let confirming = attach_management(&cfg, &mut session, format!("{container}-confirm")).await?;
            Ok::<_, BackendError>((receiver, confirming))
        };
        let browsing = async {
            let mgmt = attach_management(&cfg, &mut browse_session, format!("{container}-mgmt")).await?;
            tracing::debug!("browsing $management attached");
            let (browser, browses) = mpsc::unbounded_channel();
            let (reply, first) = oneshot::channel();
            let _ = browser.send(BrowseRequest {
                from: 1,
                count: FIRST_BROWSE as i32,
                reply,
            });
            tokio::spawn(browse_loop(cfg.clone(), mgmt, browses));
            Ok::<_, BackendError>((browser, first))
        };
        let ((receiver, confirming), (browser, first)) = tokio::try_join!(receiving, browsing)?;
        tracing::debug!("receiver and both $management links attached");
        let (confirms, batches) = mpsc::unbounded_channel();
        let (failed, confirm_failed) = mpsc::channel(1);
        tokio::spawn(confirm_loop(cfg.clone(), confirming, batches, failed));
        let (deferred_done_tx, deferred_done) = mpsc::unbounded_channel();
        Ok(Self {
            cfg,
            connection,
            session,
            browse_session,
            cbs,
            receiver,
            browser,
            browse_out: Some((0, FIRST_BROWSE, first)),
            browse_count: FIRST_BROWSE,
            known: 0,
            short: false,
            drained: false,
            stalled_credit: 0,
            browse_answered_at: None,
            pass: 0,
            pass_used: false,
            confirms,
            confirm_failed,
            renew_at,
            renew_failures: 0,
            credit: 0,
            browse_from: 1,
            handed_out: 0,
            stash: Vec::new(),
            delivered: Default::default(),
            pending: VecDeque::new(),
            actives: VecDeque::new(),
            postponed: Vec::new(),
            container,
            deferred: VecDeque::new(),
            deferred_ops: None,
            deferred_done,
            deferred_done_tx,
            receiving_deferred: 0,
        })
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, ended: CancellationToken) {
        let served = self.serve(&mut commands).await;
        // Before the close below, which may take CLOSE_TIMEOUT: sends waiting
        // for an outcome on this connection retry on a new one now.
        ended.cancel();
        if let Err(e) = served {
            tracing::debug!(error = %e, "the dead-letter queue's link failed");
            // Refused credentials (a token that expired and cannot be
            // renewed) and a vanished entity keep their kind: the engine
            // stops on them instead of reconnecting into the same refusal.
            // Any other refusal (a disabled entity) stays one too: only a
            // connection's failure reads as "cannot reach".
            let failed = |detail: &str| format!("the dead-letter queue's link failed: {detail}");
            let err = || match &e {
                BackendError::Auth { provider, detail } => BackendError::Auth {
                    provider,
                    detail: failed(detail),
                },
                BackendError::NotFound { queue, detail } => BackendError::NotFound {
                    queue: queue.clone(),
                    detail: failed(detail),
                },
                BackendError::Provider { provider, detail } => BackendError::Provider {
                    provider,
                    detail: failed(detail),
                },
                BackendError::Unreachable { detail, .. } => self.cfg.unreachable(failed(detail)),
                other => self.cfg.unreachable(failed(&other.to_string())),
            };
            for a in self.actives.drain(..) {
                let _ = a.reply.send(Err(err()));
            }
            for p in self.pending.drain(..) {
                let _ = p.reply.send(Err(err()));
            }
            for (_, reply) in self.postponed.drain(..) {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(err()));
                }
            }
            commands.close();
            while let Ok(cmd) = commands.try_recv() {
                match cmd {
                    Command::Lease { reply, .. } => drop(reply.send(Err(err()))),
                    Command::Dispose { reply, .. } => drop(reply.send(Err(err()))),
                    Command::Settle { reply, .. } | Command::Renew { reply, .. } => drop(reply.send(Err(err()))),
                }
            }
        }
        // Closing the link tells the broker its locks are no longer taken
        // care of; a lease's messages come back when their locks lapse.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let _ = self.receiver.close().await;
            let _ = self.session.end().await;
            let _ = self.browse_session.end().await;
            let _ = self.connection.close().await;
        })
        .await;
    }

    async fn serve(&mut self, commands: &mut mpsc::Receiver<Command>) -> Result<()> {
        loop {
            // Leases asked for while the task was busy share one browse.
            let mut disposals = Vec::new();
            while let Ok(cmd) = commands.try_recv() {
                match cmd {
                    Command::Lease { max, reply } => self.pending.push_back(LeaseRequest { max, reply }),
                    Command::Dispose { infos, complete, reply } => disposals.push((infos, complete, reply)),
                    Command::Settle {
                        tokens,
                        complete,
                        counted,
                        reply,
                    } => self.settle_tokens(tokens, complete, counted, Some(reply)).await?,
                    Command::Renew { tokens, reply } => self.renew(tokens, reply).await,
                }
            }
            if !disposals.is_empty() {
                self.dispose(disposals).await?;
            }
            // Leases start (browse and grant their credit) while earlier ones
            // are still being received: with several leases in flight, the
            // leases asked for during one browse cost the next one together.
            if !self.postponed.is_empty() {
                // No new lease starts before the abandons waiting for the
                // ones being received are applied: they wait one lease at most.
                if self.actives.is_empty() {
                    self.flush_postponed().await?;
                    continue;
                }
            } else if !self.pending.is_empty() && self.start_leases().await? {
                continue;
            }
            self.read_ahead();
            let deadline = self.actives.front().map(|a| a.deadline);
            let renew_at = self.renew_at;
            let far = Instant::now() + Duration::from_secs(3600);
            let mut browse_out = self.browse_out.take();
            tokio::select! {
                // Unwrapped only when polled, and polled only when there is one.
                r = async { (&mut browse_out.as_mut().expect("a browse is out").2).await }, if browse_out.is_some() => {
                    let (pass, asked, _) = browse_out.take().expect("a browse is out");
                    let r = r.unwrap_or_else(|_| Err(self.cfg.unreachable("the browsing link ended")))?;
                    self.on_browsed(pass, asked, r);
                }
                cmd = commands.recv() => match cmd {
                    None => return Ok(()),
                    Some(Command::Lease { max, reply }) => self.pending.push_back(LeaseRequest { max, reply }),
                    Some(Command::Dispose { infos, complete, reply }) => {
                        self.dispose(vec![(infos, complete, reply)]).await?;
                    }
                    Some(Command::Settle { tokens, complete, counted, reply }) => {
                        self.settle_tokens(tokens, complete, counted, Some(reply)).await?;
                    }
                    Some(Command::Renew { tokens, reply }) => self.renew(tokens, reply).await,
                },
                Some((req, got)) = self.deferred_done.recv() => {
                    self.receiving_deferred -= 1;
                    match got {
                        // Every one was refused (another consumer has them):
                        // an empty lease would end the pass, so the lease
                        // waits for what comes next instead.
                        Ok(got) if got.is_empty() => self.pending.push_front(req),
                        Ok(got) => self.hand_out(req.reply, got).await?,
                        Err(e) => drop(req.reply.send(Err(e))),
                    }
                }
                // Polled with no credit out too: nothing can arrive then but
                // the broker's detach (a deleted entity, a lapsed token),
                // which an idle link must notice, or the leases and settles
                // asked of it would wait out their timeouts instead.
                d = self.receiver.recv::<Body<Value>>() => {
                    // A detach keeps its kind: a deleted entity is not found.
                    let d = d.map_err(|e| self.cfg.classify("receive from the dead-letter queue", &e))?;
                    self.on_delivery(d.into_parts()).await?;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    // Fewer messages than browsed could be locked: another
                    // consumer took some, or the broker stalls. The credit
                    // stays open (see above).
                    if let Some(a) = self.actives.pop_front() {
                        tracing::debug!(
                            browsed = a.want,
                            received = a.got.len(),
                            "fewer messages than browsed arrived in time (another consumer holds some, or the broker stalls)"
                        );
                        if a.got.is_empty() && a.wait == Wait::First && !a.reply.is_closed() {
                            // An empty lease ends the pass as drained, and
                            // the browse showed messages: a broker that
                            // stalls delivers them late. The lease waits on,
                            // first in line, so that deliveries still fill
                            // the leases in the order they were asked for.
                            // A browse asked now tells a broker that stalls
                            // (no answer) from one that answers while
                            // another consumer holds what was browsed.
                            // (The browse out, if any, is in `browse_out`
                            // while the select runs.)
                            if browse_out.is_none() {
                                self.ask_browse();
                            }
                            // Its first wait ran out at its deadline (long
                            // ago for one that waited behind others): what
                            // the broker answered since counts. One that
                            // reaches the front that late still waits
                            // LEASE_WAIT there: what the broker delivers
                            // after a stall comes in a burst, its share
                            // right behind the share of the lease before.
                            self.actives.push_front(Active {
                                wait: Wait::Stalled { since: a.deadline },
                                deadline: (a.deadline + LEASE_STALL_WAIT.saturating_sub(LEASE_WAIT))
                                    .max(Instant::now() + LEASE_WAIT),
                                ..a
                            });
                        } else if let (true, Wait::Stalled { since }) = (a.got.is_empty(), a.wait) {
                            match self.browse_answered_at.filter(|at| *at > since) {
                                // Answered just now, as a broker that comes
                                // back answers: what it delivers late may be
                                // right behind the answer.
                                Some(at) if at.elapsed() < LEASE_WAIT && Instant::now() < since + LEASE_STALL_WAIT => {
                                    self.actives.push_front(Active {
                                        deadline: (at + LEASE_WAIT).min(since + LEASE_STALL_WAIT),
                                        ..a
                                    });
                                }
                                // The broker answers, and delivered nothing:
                                // another consumer holds what was browsed.
                                // Empty, as before the stall wait: the pass
                                // ends unless more is known.
                                Some(_) => self.hand_out(a.reply, a.got).await?,
                                // No answer since it began waiting on: the
                                // broker stalls. An empty answer would end
                                // the pass with the browsed messages unseen;
                                // the caller retries instead, and what comes
                                // late goes to its next lease.
                                None => {
                                    self.stalled_credit += a.want;
                                    let _ = a.reply.send(Err(BackendError::Stalled {
                                        provider: PROVIDER,
                                        detail: format!(
                                            "none of the {} messages browsed arrived within {} s, and the broker has not answered since (it stalls)",
                                            a.want,
                                            LEASE_STALL_WAIT.as_secs()
                                        ),
                                    }));
                                }
                            }
                        } else {
                            self.hand_out(a.reply, a.got).await?;
                        }
                    }
                }
                failed = self.confirm_failed.recv() => {
                    return Err(failed.unwrap_or_else(|| self.cfg.unreachable("the confirming link ended")));
                }
                // An idle link notices a dropped connection at once, so the
                // next lease opens a new one instead of failing on this one.
                r = self.connection.on_close() => {
                    return Err(self.cfg.unreachable(format!("the AMQP connection closed: {r:?}")));
                }
                _ = tokio::time::sleep_until(renew_at.unwrap_or(far)), if renew_at.is_some() => {
                    match put_tokens(&self.cfg, &mut self.cbs).await {
                        Ok(next) => {
                            self.renew_at = next;
                            self.renew_failures = 0;
                        }
                        Err(e) => match retry_renewal(&mut self.renew_failures, &e) {
                            Some(again) => self.renew_at = Some(again),
                            None => return Err(e),
                        },
                    }
                }
            }
            if browse_out.is_some() {
                self.browse_out = browse_out;
            }
        }
    }

    /// Start the pending leases that can start now: the first from the
    /// stash when earlier credit brought messages nobody asked for, then each
    /// with credit for messages already browsed; ask for a browse when they
    /// are not enough. Returns whether anything changed.
    async fn start_leases(&mut self) -> Result<bool> {
        if !self.stash.is_empty() {
            let req = self.pending.pop_front().expect("pending");
            let n = (req.max.max(1) as usize).min(self.stash.len());
            let out: Vec<Delivered> = self.stash.drain(..n).collect();
            self.hand_out(req.reply, out).await?;
            return Ok(true);
        }
        if self.handed_out == 0
            && self.actives.is_empty()
            && self.credit == 0
            && self.receiving_deferred == 0
            && self.pass_used
        {
            // Nothing is held or coming: a new pass, which must see from the
            // beginning again what the last one released.
            self.pass += 1;
            self.pass_used = false;
            self.browse_from = 1;
            self.known = 0;
            self.deferred.clear();
            self.delivered = Default::default();
            self.short = false;
            self.drained = false;
            self.stalled_credit = 0;
            self.browse_out = None;
        }
        // Deferred messages browsed go first, each lease taking up to its
        // share by sequence number: credit would bring none of them.
        let mut started = false;
        while !self.deferred.is_empty() {
            let Some(req) = self.pending.pop_front() else { break };
            let n = (req.max.max(1) as usize).min(self.deferred.len());
            let seqs: Vec<i64> = self.deferred.drain(..n).collect();
            self.receive_deferred(seqs, req).await?;
            self.pass_used = true;
            started = true;
        }
        if started {
            return Ok(true);
        }
        // With no more known to come, a lease takes what there is; otherwise
        // it waits for a full share (the browse out, or the next, brings it).
        let more_coming = !self.short && !self.drained;
        let mut granted = 0;
        while let Some(req) = self.pending.front() {
            let max = req.max.max(1) as usize;
            if self.known == 0 || (self.known < max && more_coming) {
                break;
            }
            let req = self.pending.pop_front().expect("front");
            let want = self.known.min(max);
            self.known -= want;
            granted += want;
            self.actives.push_back(Active::new(want, Wait::First, req.reply));
        }
        if granted > 0 {
            self.pass_used = true;
            // The grant is absolute and counts deliveries still in flight: it
            // is what earlier leases still wait for plus these ones' shares,
            // so the link never holds more credit than the leases it serves.
            self.credit += granted as u32;
            tracing::debug!(granted, credit = self.credit, known = self.known, "credit granted");
            within(&self.cfg, "grant credit", self.receiver.set_credit(self.credit)).await?;
        }
        if self.pending.is_empty() {
            return Ok(granted > 0);
        }
        if self.browse_out.is_none() {
            self.ask_browse();
        }
        Ok(granted > 0)
    }

    /// Browse ahead while no lease waits: the next leases then start with
    /// the credit at once, and a lease costs one round trip instead of two.
    fn read_ahead(&mut self) {
        if self.browse_out.is_none()
            && !self.drained
            && self.postponed.is_empty()
            && self.known + self.deferred.len() < MAX_BROWSE
        {
            self.ask_browse();
        }
    }

    fn ask_browse(&mut self) {
        let count = self.browse_count;
        let (reply, rx) = oneshot::channel();
        // A closed channel shows as the answer's error.
        let _ = self.browser.send(BrowseRequest {
            from: self.browse_from,
            count: count as i32,
            reply,
        });
        self.browse_out = Some((self.pass, count, rx));
    }

    /// What a browse showed: more messages known, and where the next browse
    /// starts. When it showed none and none are known, the leases waiting
    /// are answered empty (the queue holds nothing more for this pass).
    fn on_browsed(&mut self, pass: u64, asked: usize, browsed: Browsed) {
        self.browse_answered_at = Some(Instant::now());
        if let Some(size) = browsed.bytes.checked_div(browsed.shown) {
            self.browse_count = (BROWSE_BYTES / size.max(1)).clamp(1, MAX_BROWSE);
        }
        if pass != self.pass {
            return;
        }
        // Deferred messages are not counted for credit: none would come for
        // them, and a lease would wait out LEASE_WAIT.
        self.known += browsed.active();
        self.short = browsed.shown < asked;
        self.drained = browsed.shown == 0;
        if let Some(last) = browsed.last {
            self.browse_from = self.browse_from.max(last.saturating_add(1));
        }
        self.deferred.extend(browsed.deferred);
        if self.drained && self.known == 0 && self.deferred.is_empty() {
            // Messages browsed for a lease that failed stalled may still be
            // on their way (this answer can overtake them): the waiting
            // leases take them for LEASE_WAIT, with the credit already out,
            // before one answers empty and ends the pass.
            let mut owed = std::mem::take(&mut self.stalled_credit);
            for req in self.pending.drain(..) {
                if owed == 0 {
                    let _ = req.reply.send(Ok(Vec::new()));
                    continue;
                }
                let want = (req.max.max(1) as usize).min(owed);
                owed -= want;
                self.actives.push_back(Active::new(want, Wait::Late, req.reply));
            }
            self.stalled_credit = owed;
        }
        // Leases the browse showed too little for stay pending and browse
        // again from past it: a browse may show fewer messages than asked for
        // without the queue holding fewer (the service bounds its answer),
        // and an empty lease would end the pass.
    }

    async fn on_delivery(&mut self, (info, message): (DeliveryInfo, Message<Body<Value>>)) -> Result<()> {
        self.credit = self.credit.saturating_sub(1);
        // A late lease's share was taken from the stalled credit when it
        // began to wait: counted down again here, the credit still out
        // would read low and a later drained browse end the pass early.
        if !matches!(self.actives.front(), Some(a) if a.wait == Wait::Late) {
            self.stalled_credit = self.stalled_credit.saturating_sub(1);
        }
        if let Some(seq) = sequence_number(&message) {
            self.browse_from = self.browse_from.max(seq.saturating_add(1));
            if !self.delivered.insert(seq) {
                // Without this, the message it displaced would get no credit,
                // and a pass could end as drained before it was delivered.
                self.known += 1;
            }
        }
        let d = Delivered {
            lock: Lock::Link(info),
            message,
            arrived: Instant::now(),
        };
        match self.actives.front_mut() {
            Some(a) => {
                if matches!(a.wait, Wait::Stalled { .. }) && a.got.is_empty() {
                    // What comes after a stall goes out within LEASE_WAIT,
                    // as any lease's: its locks run from now, and the
                    // renewals from when the lease returns.
                    a.deadline = a.deadline.min(Instant::now() + LEASE_WAIT);
                }
                a.got.push(d);
                if a.got.len() >= a.want {
                    let a = self.actives.pop_front().expect("front");
                    self.hand_out(a.reply, a.got).await?;
                }
            }
            None => self.stash.push(d),
        }
        Ok(())
    }

    /// Hand deliveries to the lease's caller, or abandon them when it is gone
    /// (its future was dropped): nothing stays locked for nobody.
    async fn hand_out(&mut self, reply: Reply<Vec<Delivered>>, got: Vec<Delivered>) -> Result<()> {
        let n = got.len();
        match reply.send(Ok(got)) {
            Ok(()) => self.handed_out += n,
            Err(Ok(got)) if !got.is_empty() => {
                let (mut infos, mut tokens) = (Vec::new(), Vec::new());
                for d in got {
                    match d.lock {
                        Lock::Link(info) => infos.push(info),
                        Lock::Token(token) => tokens.push(token),
                    }
                }
                if !infos.is_empty() {
                    self.postponed.push((infos, None));
                }
                if !tokens.is_empty() {
                    self.settle_tokens(tokens, false, 0, None).await?;
                }
            }
            Err(_) => {}
        }
        Ok(())
    }

    /// The `$management` link of deferred messages, attached on first use
    /// (on the browsing session: most passes meet no deferred message).
    async fn deferred_ops(&mut self) -> Result<&mpsc::UnboundedSender<DeferredOp>> {
        if self.deferred_ops.as_ref().is_none_or(|ops| ops.is_closed()) {
            let name = format!("{}-deferred", self.container);
            let mgmt = attach_management(&self.cfg, &mut self.browse_session, name).await?;
            let (ops, rx) = mpsc::unbounded_channel();
            tokio::spawn(deferred_loop(self.cfg.clone(), mgmt, rx));
            self.deferred_ops = Some(ops);
        }
        Ok(self.deferred_ops.as_ref().expect("just attached"))
    }

    /// Lock the deferred messages `seqs` for the lease `req`; the answer
    /// comes back on `deferred_done` and is handed out from there.
    async fn receive_deferred(&mut self, seqs: Vec<i64>, req: LeaseRequest) -> Result<()> {
        let done = self.deferred_done_tx.clone();
        let ops = self.deferred_ops().await?;
        if let Err(mpsc::error::SendError(op)) = ops.send(DeferredOp::Receive { seqs, req, done }) {
            if let DeferredOp::Receive { req, .. } = op {
                let _ = req
                    .reply
                    .send(Err(self.cfg.unreachable("the deferred messages' link ended")));
            }
            return Ok(());
        }
        self.receiving_deferred += 1;
        Ok(())
    }

    /// Hand lock tokens to the deferred messages' link to complete or
    /// abandon; `counted` of them were handed out by this link.
    async fn settle_tokens(
        &mut self,
        tokens: Vec<uuid::Uuid>,
        complete: bool,
        counted: usize,
        reply: Option<Reply<TokenOutcomes>>,
    ) -> Result<()> {
        self.handed_out = self.handed_out.saturating_sub(counted);
        let ops = match self.deferred_ops().await {
            Ok(ops) => ops,
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e));
                }
                return Ok(());
            }
        };
        if let Err(mpsc::error::SendError(DeferredOp::Settle { reply: Some(reply), .. })) =
            ops.send(DeferredOp::Settle {
                tokens,
                complete,
                reply,
            })
        {
            let _ = reply.send(Err(self.cfg.unreachable("the deferred messages' link ended")));
        }
        Ok(())
    }

    /// Hand lock tokens to the `$management` link of calls by lock token to
    /// renew. A renewal that cannot be made fails its caller, not the link.
    async fn renew(&mut self, tokens: Vec<uuid::Uuid>, reply: Reply<TokenOutcomes>) {
        let ops = match self.deferred_ops().await {
            Ok(ops) => ops,
            Err(e) => return drop(reply.send(Err(e))),
        };
        if let Err(mpsc::error::SendError(DeferredOp::Renew { reply, .. })) =
            ops.send(DeferredOp::Renew { tokens, reply })
        {
            let _ = reply.send(Err(self.cfg.unreachable("the deferred messages' link ended")));
        }
    }

    /// Apply a batch of dispositions and hand their callers to the
    /// confirming task. Abandons wait while a lease is being received: an
    /// abandoned message could otherwise be delivered straight back on the
    /// credit granted for the browsed ones, which would then not be
    /// delivered, and the pass would skip them.
    async fn dispose(&mut self, batch: Vec<(Vec<DeliveryInfo>, bool, Reply<()>)>) -> Result<()> {
        let mut failure = None;
        let mut replies = Vec::with_capacity(batch.len());
        for (infos, complete, reply) in batch {
            if !complete && !self.actives.is_empty() {
                self.postponed.push((infos, Some(reply)));
                continue;
            }
            if failure.is_none() {
                let n = infos.len();
                let r = if complete {
                    within(&self.cfg, "complete", self.receiver.accept_all(infos)).await
                } else {
                    within(&self.cfg, "abandon", self.receiver.modify_all(infos, abandon())).await
                };
                self.handed_out = self.handed_out.saturating_sub(n);
                failure = r.err();
            }
            replies.push(reply);
        }
        self.confirm(failure, replies)
    }

    async fn flush_postponed(&mut self) -> Result<()> {
        let mut failure = None;
        let mut replies = Vec::new();
        for (infos, reply) in std::mem::take(&mut self.postponed) {
            if failure.is_none() {
                let n = infos.len();
                failure = within(&self.cfg, "abandon", self.receiver.modify_all(infos, abandon()))
                    .await
                    .err();
                if reply.is_some() {
                    self.handed_out = self.handed_out.saturating_sub(n);
                }
            }
            replies.extend(reply);
        }
        self.confirm(failure, replies)
    }

    /// Have the dispositions just queued confirmed by a round trip behind
    /// them, without waiting for it here: the task goes on leasing.
    fn confirm(&mut self, failure: Option<BackendError>, replies: Vec<Reply<()>>) -> Result<()> {
        if let Some(e) = failure {
            let detail = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(self
                    .cfg
                    .unreachable(format!("dispositions not confirmed: {detail}"))));
            }
            return Err(e);
        }
        if !replies.is_empty() && self.confirms.send(replies).is_err() {
            // Its failure is on `confirm_failed`; the callers see the link close.
            return Err(self.cfg.unreachable("the confirming link ended"));
        }
        Ok(())
    }
}

/// A client of the dead-letter queue's `$management` node, as `client`.
async fn attach_management(cfg: &LinkConfig, session: &mut SessionHandle<()>, client: String) -> Result<RpcLink> {
    RpcLink::attach(session, &format!("{}/$management", cfg.dlq_path), &client)
        .await
        .map_err(|e| cfg.classify("attach to the dead-letter queue's $management", &e))
}

/// Confirms dispositions for the link's task, on a `$management` link of its
/// own: a browse sent after the dispositions were queued on the same session
/// is answered after the broker applied them (it handles a connection's
/// frames in order). Every batch handed over while one browse is out is
/// confirmed by the next, so settles cost the task no round trip and a
/// burst of them costs the broker one browse.
async fn confirm_loop(
    cfg: Arc<LinkConfig>,
    mut mgmt: RpcLink,
    mut batches: mpsc::UnboundedReceiver<Vec<Reply<()>>>,
    failed: mpsc::Sender<BackendError>,
) {
    while let Some(mut replies) = batches.recv().await {
        while let Ok(more) = batches.try_recv() {
            replies.extend(more);
        }
        match browse(&cfg, &mut mgmt, i64::MAX, 1).await {
            Ok(_) => {
                for reply in replies {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                let detail = e.to_string();
                batches.close();
                while let Ok(more) = batches.try_recv() {
                    replies.extend(more);
                }
                for reply in replies {
                    let _ = reply.send(Err(cfg.unreachable(format!("dispositions not confirmed: {detail}"))));
                }
                let _ = failed.send(e).await;
                return;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, mgmt.close()).await;
}

struct AttachRequest {
    dest: String,
    reply: Reply<Sender>,
}

/// Attaches the copies' sender links, one per destination and connection, on
/// the send session, and keeps their `$cbs` tokens fresh. A sender takes
/// many batches in flight (each `send_batchable` returns once its transfer
/// is queued; its outcome is awaited apart), so one attach per destination
/// serves every concurrent send: no pool of links to attach one after
/// another, each several round trips. Its own `$cbs` link, on this session,
/// puts the destinations' tokens without waiting for the receiver's task.
async fn send_loop(
    cfg: Arc<LinkConfig>,
    container: String,
    mut session: SessionHandle<()>,
    mut requests: mpsc::UnboundedReceiver<AttachRequest>,
) {
    let mut cbs: Option<RpcLink> = None;
    let mut audiences: Vec<String> = Vec::new();
    let mut renew_at: Option<Instant> = None;
    let mut renew_failures = 0u32;
    let mut attached = 0u32;
    let far = Instant::now() + Duration::from_secs(3600);
    loop {
        tokio::select! {
            req = requests.recv() => {
                let Some(req) = req else { break };
                attached += 1;
                let name = format!("{container}-send-{attached}");
                let r = attach_sender(&cfg, &mut session, &mut cbs, &req.dest, name).await;
                let r = r.map(|(sender, renew)| {
                    let audience = cfg.audience(&req.dest);
                    if !audiences.contains(&audience) {
                        audiences.push(audience);
                    }
                    renew_at = match (renew_at, renew) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    sender
                });
                if let Err(Ok(unwanted)) = req.reply.send(r) {
                    // Its caller went away: closed, not dropped (see
                    // `DestSender`'s `Drop`), so the session stays up.
                    tokio::spawn(unwanted.close());
                }
            }
            _ = tokio::time::sleep_until(renew_at.unwrap_or(far)), if renew_at.is_some() => {
                let Some(client) = cbs.as_mut() else { break };
                match put_tokens_for(&cfg, client, &audiences).await {
                    Ok(next) => {
                        renew_at = next;
                        renew_failures = 0;
                    }
                    Err(e) => match retry_renewal(&mut renew_failures, &e) {
                        Some(again) => renew_at = Some(again),
                        None => {
                            // Its senders are refused once their tokens lapse,
                            // and each send retries on a link opened afresh.
                            tracing::warn!(error = %e, "renewing the senders' $cbs tokens failed");
                            break;
                        }
                    },
                }
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.end()).await;
}

/// Tries of a failed token renewal before a link gives up, and the wait
/// between them: 90 s, within which the token put last is still valid
/// (renewals start 4 minutes before an Entra token's end, at 5/6 of a SAS
/// token's life: a TTL of 9 minutes or more). A token server's or the
/// broker's blip (a 429, a timeout) must not end a run that holds locks, as
/// one failed renewal did.
const RENEW_RETRIES: u32 = 6;
const RENEW_RETRY_AFTER: Duration = Duration::from_secs(15);

/// After renewal failure number `failures` (counted here): when to try
/// again, or `None` to give up.
fn retry_renewal(failures: &mut u32, e: &BackendError) -> Option<Instant> {
    *failures += 1;
    if *failures > RENEW_RETRIES {
        return None;
    }
    tracing::warn!(error = %e, attempt = *failures, "renewing a $cbs token failed; the current one is still valid, trying again");
    Some(Instant::now() + RENEW_RETRY_AFTER)
}

/// Put a token for `dest` and attach a sender link to it; also returns when
/// the token is to be put again.
async fn attach_sender(
    cfg: &LinkConfig,
    session: &mut SessionHandle<()>,
    cbs: &mut Option<RpcLink>,
    dest: &str,
    name: String,
) -> Result<(Sender, Option<Instant>)> {
    if cbs.is_none() {
        let client = within(cfg, "attach to $cbs", RpcLink::cbs(session)).await?;
        *cbs = Some(client);
    }
    let client = cbs.as_mut().expect("just attached");
    let renew = put_tokens_for(cfg, client, &[cfg.audience(dest)]).await?;
    let attach = Sender::builder().name(name).target(cfg.audience(dest)).attach(session);
    match tokio::time::timeout(CALL_TIMEOUT, attach).await {
        Ok(Ok(sender)) => Ok((sender, renew)),
        Ok(Err(e)) => Err(cfg.classify_entity(dest, &format!("attach a sender to {dest}"), &e)),
        Err(_) => Err(cfg.unreachable(format!("attaching a sender to {dest} timed out"))),
    }
}

/// What a browse showed: how many messages, the last one's sequence number,
/// the bytes of their encodings (which size the next browse), and the
/// sequence numbers of the deferred ones among them, which no credit brings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Browsed {
    shown: usize,
    last: Option<i64>,
    bytes: usize,
    deferred: Vec<i64>,
}

impl Browsed {
    /// The messages a receive on the link can get.
    fn active(&self) -> usize {
        self.shown - self.deferred.len()
    }
}

struct BrowseRequest {
    from: i64,
    count: i32,
    reply: Reply<Browsed>,
}

/// Browses for the link's task, one at a time, on the `$management` link.
/// Once a browse failed, every later one gets the same error: the link's
/// task may have dropped the failed one's answer (a new pass), and must still
/// learn why (a deleted entity is not found, not unreachable).
async fn browse_loop(cfg: Arc<LinkConfig>, mut mgmt: RpcLink, mut requests: mpsc::UnboundedReceiver<BrowseRequest>) {
    let mut failed: Option<BackendError> = None;
    while let Some(req) = requests.recv().await {
        let r = match &failed {
            Some(e) => Err(e.clone()),
            None => {
                tracing::debug!(from = req.from, count = req.count, "browse out");
                let r = browse(&cfg, &mut mgmt, req.from, req.count).await;
                tracing::debug!(shown = r.as_ref().map_or(0, |b| b.shown), "browse back");
                r
            }
        };
        if let Err(e) = &r {
            failed.get_or_insert_with(|| e.clone());
        }
        let _ = req.reply.send(r);
    }
    if failed.is_none() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, mgmt.close()).await;
    }
}

/// How many messages from `from` the dead-letter queue's browse shows, up to
/// `count`, and the sequence number of the last (only that one is decoded).
///
/// A browse Service Bus refuses as throttled is asked again after a pause
/// (a peek changes nothing), a few times: failed, it would end the link and
/// every lease and confirm on it.
async fn browse(cfg: &LinkConfig, mgmt: &mut RpcLink, from: i64, count: i32) -> Result<Browsed> {
    for attempt in 1.. {
        let req = PeekCount::request(from, count);
        match tokio::time::timeout(CALL_TIMEOUT, mgmt.call(req)).await {
            Ok(Ok(PeekCount(browsed))) => return Ok(browsed),
            Ok(Err(e)) if attempt < BUSY_ATTEMPTS && is_server_busy(&format!("{e:?}")) => {
                let wait = super::SERVER_BUSY_WAIT * attempt;
                tracing::warn!(
                    attempt,
                    "a browse of the dead-letter queue was throttled (server busy); asking again in {wait:?}"
                );
                tokio::time::sleep(wait).await;
            }
            Ok(Err(e)) => return Err(cfg.classify("browse the dead-letter queue", &e)),
            Err(_) => return Err(cfg.unreachable("browsing the dead-letter queue timed out")),
        }
    }
    unreachable!("the attempts end in a return")
}

/// How many times a throttled browse is sent (waiting 2, 4, 6 s between):
/// within the shortest lock Service Bus allows (5 s) the first retry goes,
/// and all of them well within its default (60 s).
const BUSY_ATTEMPTS: u32 = 4;

/// What the deferred messages' `$management` link ([`deferred_loop`]) is asked.
enum DeferredOp {
    /// Lock these deferred messages for a lease; the answer goes to `done`
    /// with the lease's request, for the link's task to hand out.
    Receive {
        seqs: Vec<i64>,
        req: LeaseRequest,
        done: mpsc::UnboundedSender<DeferredDone>,
    },
    /// Complete or abandon by lock token (no caller: a cancelled lease's).
    Settle {
        tokens: Vec<uuid::Uuid>,
        complete: bool,
        reply: Option<Reply<TokenOutcomes>>,
    },
    /// Renew locks by lock token.
    Renew {
        tokens: Vec<uuid::Uuid>,
        reply: Reply<TokenOutcomes>,
    },
}

/// A receive by sequence number's answer, with the lease it is for.
type DeferredDone = (LeaseRequest, Result<Vec<Delivered>>);

/// Sequence numbers or lock tokens per `$management` request: Service Bus
/// documents no limit, and the SDKs send a handful; a pass's releases can
/// hold a thousand.
const MGMT_BATCH: usize = 100;

/// Receives deferred messages by sequence number and settles them by lock
/// token, one request at a time, on a `$management` link of its own: a
/// deferred message is delivered to no receiver link, and a lock taken
/// through `$management` is settled there. The broker's answer to a
/// disposition is its confirmation (no browse behind it, as a link's
/// dispositions need).
async fn deferred_loop(cfg: Arc<LinkConfig>, mut mgmt: RpcLink, mut ops: mpsc::UnboundedReceiver<DeferredOp>) {
    while let Some(op) = ops.recv().await {
        match op {
            DeferredOp::Receive { seqs, req, done } => {
                let got = receive_deferred(&cfg, &mut mgmt, &seqs).await;
                let _ = done.send((req, got));
            }
            DeferredOp::Settle {
                tokens,
                complete,
                reply,
            } => {
                let outcomes = by_token(&cfg, &mut mgmt, &tokens, TokenOp::Dispose { complete }).await;
                match reply {
                    Some(reply) => drop(reply.send(outcomes)),
                    // A cancelled lease's locks lapse if this fails: the
                    // messages stay deferred in the dead-letter queue.
                    None => {
                        if let Err(e) = outcomes {
                            tracing::debug!(error = %e, "abandoning a cancelled lease's deferred messages failed");
                        }
                    }
                }
            }
            DeferredOp::Renew { tokens, reply } => {
                let _ = reply.send(by_token(&cfg, &mut mgmt, &tokens, TokenOp::Renew).await);
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, mgmt.close()).await;
}

/// The broker answered, and refused: another call may still go through (a
/// message another consumer locked or completed meanwhile, a lost lock).
fn refused(e: &BackendError) -> bool {
    !matches!(e, BackendError::Unreachable { .. } | BackendError::Tls { .. })
}

/// Lock the deferred messages `seqs` (`com.microsoft:receive-by-sequence-number`,
/// peek-lock). One that another consumer locked or settled since the browse
/// fails its whole request: a chunk refused so is asked again a message at
/// a time, and those still refused are left out (someone else has them).
async fn receive_deferred(cfg: &LinkConfig, mgmt: &mut RpcLink, seqs: &[i64]) -> Result<Vec<Delivered>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(MGMT_BATCH) {
        match receive_by_sequence(cfg, mgmt, chunk).await {
            Ok(got) => out.extend(got),
            Err(e) if refused(&e) => {
                tracing::debug!(error = %e, count = chunk.len(), "a receive of deferred messages was refused");
                if chunk.len() == 1 {
                    continue;
                }
                for seq in chunk {
                    match receive_by_sequence(cfg, mgmt, std::slice::from_ref(seq)).await {
                        Ok(got) => out.extend(got),
                        Err(e) if refused(&e) => {
                            tracing::debug!(error = %e, seq, "deferred message not locked");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

async fn receive_by_sequence(cfg: &LinkConfig, mgmt: &mut RpcLink, seqs: &[i64]) -> Result<Vec<Delivered>> {
    let what = "receive deferred messages of the dead-letter queue";
    match tokio::time::timeout(CALL_TIMEOUT, mgmt.call(ReceiveBySequence::request(seqs))).await {
        Ok(Ok(ReceivedDeferred(got))) => Ok(got),
        Ok(Err(e)) => Err(cfg.classify(what, &e)),
        Err(_) => Err(cfg.unreachable(format!("{what}: timed out"))),
    }
}

/// What is done to messages by their lock tokens through `$management`.
#[derive(Clone, Copy)]
enum TokenOp {
    /// `com.microsoft:update-disposition`: completed or abandoned.
    Dispose { complete: bool },
    /// `com.microsoft:renew-lock`.
    Renew,
}

/// Apply `op` to messages by lock token: each token's outcome. A request
/// the broker refuses (one lock lost) is made again a token at a time, so
/// that the others still go through and each failure is known. For a
/// renewal, three refused in a row stand for the rest of their request:
/// locks lapse together after a stall past the LockDuration, and a pass
/// holding 50,000 would otherwise ask for each lost lock alone.
async fn by_token(cfg: &LinkConfig, mgmt: &mut RpcLink, tokens: &[uuid::Uuid], op: TokenOp) -> Result<TokenOutcomes> {
    const RENEWALS_REFUSED_IN_A_ROW: usize = 3;
    let mut out = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(MGMT_BATCH) {
        match token_request(cfg, mgmt, chunk, op).await {
            Ok(()) => out.extend(chunk.iter().map(|_| None)),
            Err(e) if refused(&e) && chunk.len() > 1 => {
                let mut in_a_row = 0;
                for (i, token) in chunk.iter().enumerate() {
                    if matches!(op, TokenOp::Renew) && in_a_row == RENEWALS_REFUSED_IN_A_ROW {
                        let e = e.to_string();
                        out.extend(chunk[i..].iter().map(|_| Some(e.clone())));
                        break;
                    }
                    match token_request(cfg, mgmt, std::slice::from_ref(token), op).await {
                        Ok(()) => {
                            in_a_row = 0;
                            out.push(None);
                        }
                        Err(e) if refused(&e) => {
                            in_a_row += 1;
                            out.push(Some(e.to_string()));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) if refused(&e) => out.push(Some(e.to_string())),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

async fn token_request(cfg: &LinkConfig, mgmt: &mut RpcLink, tokens: &[uuid::Uuid], op: TokenOp) -> Result<()> {
    let (what, call) = match op {
        TokenOp::Dispose { complete: true } => (
            "complete deferred messages of the dead-letter queue",
            mgmt.call(UpdateDisposition::request(tokens, true)).boxed(),
        ),
        TokenOp::Dispose { complete: false } => (
            "abandon deferred messages of the dead-letter queue",
            mgmt.call(UpdateDisposition::request(tokens, false)).boxed(),
        ),
        TokenOp::Renew => (
            "renew locks of the dead-letter queue's messages",
            mgmt.call(RenewLock::request(tokens)).boxed(),
        ),
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(Done)) => Ok(()),
        Ok(Err(e)) => Err(cfg.classify(what, &e)),
        Err(_) => Err(cfg.unreachable(format!("{what}: timed out"))),
    }
}

/// A call on the link, bounded: a session that stopped taking frames (a
/// stalled connection) must fail the link, not hang its task.
async fn within<T, E: std::fmt::Debug>(
    cfg: &LinkConfig,
    what: &str,
    call: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(cfg.classify(&format!("{what} on the dead-letter queue"), &e)),
        Err(_) => Err(cfg.unreachable(format!("{what} on the dead-letter queue timed out"))),
    }
}

/// Abandon: `modified` with no flags, which Service Bus reads as "unlock, and
/// count the delivery" (the DLQ has no MaxDeliveryCount).
fn abandon() -> Modified {
    Modified {
        delivery_failed: None,
        undeliverable_here: None,
        message_annotations: None,
    }
}

async fn put_tokens(cfg: &LinkConfig, cbs: &mut RpcLink) -> Result<Option<Instant>> {
    put_tokens_for(cfg, cbs, &[cfg.dlq_audience()]).await
}

/// Put a token for each of `audiences`; returns when to put them again.
async fn put_tokens_for(cfg: &LinkConfig, cbs: &mut RpcLink, audiences: &[String]) -> Result<Option<Instant>> {
    let (token, renew) = cfg.token().await?;
    for audience in audiences {
        tokio::time::timeout(CALL_TIMEOUT, cbs.put_token(audience, &token))
            .await
            .map_err(|_| cfg.unreachable("the $cbs token put timed out"))?
            .map_err(|e| {
                let text = format!("{e:?}");
                // By the status, and words outside the audience's entity
                // name (which may hold "401").
                let unauthorized = refusal_in(&text) == Some(Refusal::Unauthorized)
                    || text
                        .replace(audience.as_str(), "")
                        .to_ascii_lowercase()
                        .contains("unauthorized");
                if unauthorized {
                    // The token itself is not in `e`: only the broker's status.
                    BackendError::Auth {
                        provider: PROVIDER,
                        detail: format!(
                            "the $cbs token put was refused: {}",
                            broker_words(&text).unwrap_or(text)
                        ),
                    }
                } else {
                    cfg.classify("put a $cbs token", &e)
                }
            })?;
    }
    Ok(renew)
}

/// `com.microsoft:peek-message`, answered by the number of messages and the
/// last one's sequence number.
struct PeekCount(Browsed);

struct PeekRequest {
    body: OrderedMap<String, Value>,
}

impl PeekCount {
    fn request(from: i64, count: i32) -> PeekRequest {
        let mut body = OrderedMap::with_capacity(2);
        body.insert("from-sequence-number".to_string(), Value::Long(from));
        body.insert("message-count".to_string(), Value::Int(count));
        PeekRequest { body }
    }
}

impl Request for PeekRequest {
    const OPERATION: &'static str = PEEK_OPERATION;
    type Response = PeekCount;
    type Body = OrderedMap<String, Value>;

    fn encode_body(self) -> Self::Body {
        self.body
    }
}

/// `com.microsoft:receive-by-sequence-number`, in peek-lock mode.
struct ReceiveBySequence {
    body: OrderedMap<String, Value>,
}

impl ReceiveBySequence {
    fn request(seqs: &[i64]) -> Self {
        let mut body = OrderedMap::with_capacity(2);
        let seqs: Vec<Value> = seqs.iter().map(|s| Value::Long(*s)).collect();
        body.insert("sequence-numbers".to_string(), Value::Array(Array::from(seqs)));
        // AMQP's receiver-settle-mode `second`: peek-lock. A uint, as the
        // SDKs send it.
        body.insert("receiver-settle-mode".to_string(), Value::Uint(1));
        Self { body }
    }
}

impl Request for ReceiveBySequence {
    const OPERATION: &'static str = RECEIVE_BY_SEQUENCE_OPERATION;
    type Response = ReceivedDeferred;
    type Body = OrderedMap<String, Value>;

    fn encode_body(self) -> Self::Body {
        self.body
    }
}

/// The deferred messages a receive by sequence number locked.
struct ReceivedDeferred(Vec<Delivered>);

impl Response for ReceivedDeferred {
    const STATUS_CODE: u16 = 200;
    type Body = AnyBody;
    type Error = ManagementError;

    fn decode_message(message: Message<Self::Body>) -> std::result::Result<Self, Self::Error> {
        use fe2o3_amqp_types::messaging::message::__private::Deserializable;
        let invalid = |expected: &str, actual: &dyn std::fmt::Debug| {
            ManagementError::from(fe2o3_amqp_management::error::InvalidType {
                expected: expected.into(),
                actual: format!("{actual:?}"),
            })
        };
        let messages = match &message.body.0 {
            Value::Map(map) => match entry(map, "messages") {
                Some(Value::List(list)) => list.as_slice(),
                Some(Value::Array(Array(list))) => list.as_slice(),
                _ => &[],
            },
            _ => &[],
        };
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let Value::Map(m) = m else {
                return Err(invalid("a map with `message` and `lock-token`", m));
            };
            let token = match entry(m, "lock-token") {
                Some(Value::Uuid(u)) => uuid::Uuid::from_bytes(u.clone().into_inner()),
                other => return Err(invalid("a `lock-token` uuid", &other)),
            };
            let message = match entry(m, "message") {
                Some(Value::Binary(b)) => {
                    let decoded: Deserializable<Message<Body<Value>>> =
                        serde_amqp::from_slice(b.as_ref()).map_err(|e| invalid("an AMQP message", &e))?;
                    decoded.0
                }
                other => return Err(invalid("a `message` binary", &other)),
            };
            out.push(Delivered {
                lock: Lock::Token(token),
                message,
                arrived: Instant::now(),
            });
        }
        Ok(Self(out))
    }
}

/// `com.microsoft:update-disposition` of lock tokens: completed or abandoned.
struct UpdateDisposition {
    body: OrderedMap<String, Value>,
}

impl UpdateDisposition {
    fn request(tokens: &[uuid::Uuid], complete: bool) -> Self {
        let mut body = OrderedMap::with_capacity(2);
        let status = if complete { "completed" } else { "abandoned" };
        body.insert("disposition-status".to_string(), Value::String(status.into()));
        body.insert("lock-tokens".to_string(), token_array(tokens));
        Self { body }
    }
}

/// Lock tokens as `$management` takes them: an AMQP array of uuids.
fn token_array(tokens: &[uuid::Uuid]) -> Value {
    let tokens: Vec<Value> = tokens
        .iter()
        .map(|t| Value::Uuid(AmqpUuid::from(*t.as_bytes())))
        .collect();
    Value::Array(Array::from(tokens))
}

impl Request for UpdateDisposition {
    const OPERATION: &'static str = UPDATE_DISPOSITION_OPERATION;
    type Response = Done;
    type Body = OrderedMap<String, Value>;

    fn encode_body(self) -> Self::Body {
        self.body
    }
}

/// `com.microsoft:renew-lock` of lock tokens. The answer's `expirations`
/// are not read: the caller counts the LockDuration from when it asked.
struct RenewLock {
    body: OrderedMap<String, Value>,
}

impl RenewLock {
    fn request(tokens: &[uuid::Uuid]) -> Self {
        let mut body = OrderedMap::with_capacity(1);
        body.insert("lock-tokens".to_string(), token_array(tokens));
        Self { body }
    }
}

impl Request for RenewLock {
    const OPERATION: &'static str = RENEW_LOCK_OPERATION;
    type Response = Done;
    type Body = OrderedMap<String, Value>;

    fn encode_body(self) -> Self::Body {
        self.body
    }
}

/// The broker did what a request by lock token asked.
struct Done;

impl Response for Done {
    const STATUS_CODE: u16 = 200;
    type Body = AnyBody;
    type Error = ManagementError;

    fn decode_message(_: Message<Self::Body>) -> std::result::Result<Self, Self::Error> {
        Ok(Self)
    }
}

/// A management answer's body, whatever it holds (null when none).
#[derive(Debug)]
struct AnyBody(Value);

impl FromEmptyBody for AnyBody {
    fn from_empty_body() -> std::result::Result<Self, serde_amqp::Error> {
        Ok(Self(Value::Null))
    }
}

impl FromBody<'_> for AnyBody {
    type Body = AmqpValue<Value>;

    fn from_body(body: Self::Body) -> Self {
        Self(body.0)
    }
}

/// A map's entry by its string or symbol key.
fn entry<'a>(map: &'a OrderedMap<Value, Value>, key: &str) -> Option<&'a Value> {
    map.iter().find_map(|(k, v)| match k {
        Value::String(s) if s == key => Some(v),
        Value::Symbol(s) if s.0 == key => Some(v),
        _ => None,
    })
}

/// The body of a peek's answer, read without keeping its messages: how many
/// there are, their encodings' bytes, the greatest sequence number among
/// them and those of the deferred ones. The answer holds up to
/// [`MAX_BROWSE`] whole messages; decoding them into maps of owned buffers
/// was a twentieth of a redrive's CPU (bench/analysis.md, seventh round), so
/// each message is read only up to its message annotations
/// ([`scan_annotations`]), in the answer's buffer. A 204 answer's body is
/// null.
#[derive(Debug, Default)]
struct PeekBody {
    count: usize,
    bytes: usize,
    last: Option<i64>,
    deferred: Vec<i64>,
}

impl FromEmptyBody for PeekBody {
    fn from_empty_body() -> std::result::Result<Self, serde_amqp::Error> {
        Ok(Self::default())
    }
}

impl FromBody<'_> for PeekBody {
    type Body = AmqpValue<Self>;

    fn from_body(body: Self::Body) -> Self {
        body.0
    }
}

impl<'de> Deserialize<'de> for PeekBody {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_option(PeekBodyVisitor)
    }
}

struct PeekBodyVisitor;

impl<'de> Visitor<'de> for PeekBodyVisitor {
    type Value = PeekBody;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("null or a map with `messages`")
    }

    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<PeekBody, E> {
        Ok(PeekBody::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<PeekBody, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<PeekBody, A::Error> {
        let mut body = PeekBody::default();
        while let Some(wanted) = map.next_key_seed(KeyIs("messages"))? {
            if wanted {
                map.next_value_seed(PeekedMessages(&mut body))?;
            } else {
                map.next_value::<Value>()?;
            }
        }
        Ok(body)
    }
}

/// A map key, read as a borrowed string: whether it is the one named.
struct KeyIs(&'static str);

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIs {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<bool, E> {
        Ok(v == self.0)
    }
}

/// The `messages` list, counted into a [`PeekBody`].
struct PeekedMessages<'a>(&'a mut PeekBody);

impl<'de> DeserializeSeed<'de> for PeekedMessages<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PeekedMessages<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while seq.next_element_seed(PeekedMessage(&mut *self.0))?.is_some() {
            self.0.count += 1;
        }
        Ok(())
    }
}

/// One peeked message's map: its `message` binary is scanned where it lies.
struct PeekedMessage<'a>(&'a mut PeekBody);

impl<'de> DeserializeSeed<'de> for PeekedMessage<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PeekedMessage<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map with `message`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(wanted) = map.next_key_seed(KeyIs("message"))? {
            if wanted {
                map.next_value_seed(ScanMessage(&mut *self.0))?;
            } else {
                map.next_value::<Value>()?;
            }
        }
        Ok(())
    }
}

/// A peeked message's encoding, counted and scanned into a [`PeekBody`].
struct ScanMessage<'a>(&'a mut PeekBody);

impl<'de> DeserializeSeed<'de> for ScanMessage<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_bytes(self)
    }
}

impl Visitor<'_> for ScanMessage<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("binary")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<(), E> {
        let body = self.0;
        body.bytes += v.len();
        // An encoding the scan does not follow is decoded whole: slower, and
        // as sure as the decoding.
        let (seq, deferred) = scan_annotations(v).unwrap_or_else(|| {
            use fe2o3_amqp_types::messaging::message::__private::Deserializable;
            let m: Option<Deserializable<Message<Body<Value>>>> = serde_amqp::from_slice(v).ok();
            m.map_or((None, false), |m| (sequence_number(&m.0), is_deferred(&m.0)))
        });
        if let Some(seq) = seq {
            body.last = Some(body.last.map_or(seq, |last| last.max(seq)));
            if deferred {
                body.deferred.push(seq);
            }
        }
        Ok(())
    }
}

/// A message's sequence number and whether it is deferred
/// (`x-opt-message-state` 1), read from its AMQP encoding up to its
/// message-annotations section (header and delivery annotations are
/// skipped by their sizes; nothing after is looked at). None when the
/// encoding is not the one expected.
fn scan_annotations(bytes: &[u8]) -> Option<(Option<i64>, bool)> {
    let mut scan = Scan { bytes, at: 0 };
    while scan.at < bytes.len() {
        match scan.section()? {
            HEADER | DELIVERY_ANNOTATIONS => scan.skip()?,
            MESSAGE_ANNOTATIONS => return scan.annotations(),
            // Sections come in order: none of message annotations.
            _ => break,
        }
    }
    Some((None, false))
}

const HEADER: u64 = 0x70;
const DELIVERY_ANNOTATIONS: u64 = 0x71;
const MESSAGE_ANNOTATIONS: u64 = 0x72;

/// A cursor over an AMQP encoding.
struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let taken = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    /// A big-endian unsigned size or count of `width` bytes.
    fn size(&mut self, width: usize) -> Option<usize> {
        let be = self.take(width)?;
        Some(be.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)))
    }

    /// A section's descriptor, as its code (an unknown name: `u64::MAX`).
    fn section(&mut self) -> Option<u64> {
        if self.byte()? != 0x00 {
            return None;
        }
        match self.byte()? {
            0x53 => self.byte().map(u64::from),
            0x80 => Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?)),
            c @ (0xa3 | 0xb3) => {
                let n = self.size(if c == 0xa3 { 1 } else { 4 })?;
                Some(match self.take(n)? {
                    b"amqp:header:list" => HEADER,
                    b"amqp:delivery-annotations:map" => DELIVERY_ANNOTATIONS,
                    b"amqp:message-annotations:map" => MESSAGE_ANNOTATIONS,
                    _ => u64::MAX,
                })
            }
            _ => None,
        }
    }

    /// Past one value, whatever its type: AMQP's constructor codes say how
    /// its size is given by their high nibble.
    fn skip(&mut self) -> Option<()> {
        let c = self.byte()?;
        if c == 0x00 {
            self.skip()?;
            return self.skip();
        }
        let n = match c >> 4 {
            0x4 => 0,
            0x5 => 1,
            0x6 => 2,
            0x7 => 4,
            0x8 => 8,
            0x9 => 16,
            0xa | 0xc | 0xe => self.size(1)?,
            0xb | 0xd | 0xf => self.size(4)?,
            _ => return None,
        };
        self.take(n).map(drop)
    }

    /// An integer value of any AMQP integer type; Some(None) for a value of
    /// another type, skipped.
    fn integer(&mut self) -> Option<Option<i64>> {
        let c = self.byte()?;
        let int = |b: &[u8]| b.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
        let n = match c {
            0x43 | 0x44 => 0,
            0x50 | 0x52 | 0x53 => i64::from(self.byte()?),
            0x51 | 0x54 | 0x55 => i64::from(self.byte()? as i8),
            0x60 => int(self.take(2)?) as i64,
            0x61 => i64::from(int(self.take(2)?) as u16 as i16),
            0x70 => int(self.take(4)?) as i64,
            0x71 => i64::from(int(self.take(4)?) as u32 as i32),
            0x80 => i64::try_from(int(self.take(8)?)).ok()?,
            0x81 => int(self.take(8)?) as i64,
            _ => {
                self.at -= 1;
                self.skip()?;
                return Some(None);
            }
        };
        Some(Some(n))
    }

    /// A symbol or string key; Some(None) for a key of another type, skipped.
    fn key(&mut self) -> Option<Option<&'a [u8]>> {
        let width = match self.byte()? {
            0xa1 | 0xa3 => 1,
            0xb1 | 0xb3 => 4,
            _ => {
                self.at -= 1;
                self.skip()?;
                return Some(None);
            }
        };
        let n = self.size(width)?;
        self.take(n).map(Some)
    }

    /// The message-annotations map: the sequence number and the state.
    fn annotations(&mut self) -> Option<(Option<i64>, bool)> {
        let count = match self.byte()? {
            0x40 => 0,
            0xc1 => {
                self.size(1)?;
                self.size(1)?
            }
            0xd1 => {
                self.size(4)?;
                self.size(4)?
            }
            _ => return None,
        };
        let (mut seq, mut deferred) = (None, false);
        for _ in 0..count / 2 {
            match self.key()? {
                Some(b"x-opt-sequence-number") => seq = self.integer()?,
                Some(b"x-opt-message-state") => deferred = self.integer()? == Some(1),
                _ => self.skip()?,
            }
        }
        Some((seq, deferred))
    }
}

impl Response for PeekCount {
    const STATUS_CODE: u16 = 200;
    type Body = PeekBody;
    type Error = ManagementError;

    /// 204 (no messages) is an answer too.
    fn verify_status_code(message: &mut Message<Self::Body>) -> std::result::Result<StatusCode, Self::Error> {
        use fe2o3_amqp_management::mgmt_ext::AmqpMessageManagementExt;
        let code = message
            .remove_status_code()
            .ok_or(ManagementError::StatusCodeNotFound)?
            .map_err(|e| {
                ManagementError::from(fe2o3_amqp_management::error::InvalidType {
                    expected: "u16".into(),
                    actual: format!("{e:?}"),
                })
            })?;
        match code.0.get() {
            200 | 204 => Ok(code),
            _ => {
                let description = message.remove_status_description().and_then(|d| d.ok());
                Err(fe2o3_amqp_management::error::StatusError { code, description }.into())
            }
        }
    }

    fn decode_message(message: Message<Self::Body>) -> std::result::Result<Self, Self::Error> {
        let PeekBody {
            count,
            bytes,
            last,
            deferred,
        } = message.body;
        Ok(Self(Browsed {
            shown: count,
            last,
            bytes,
            deferred,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal that fails is tried again a few times, 15 s apart, while
    /// the token put last is still valid; then the link gives up.
    #[test]
    fn a_failed_token_renewal_is_tried_again_before_the_link_gives_up() {
        let e = BackendError::Unreachable {
            endpoint: "login.microsoftonline.com".into(),
            detail: "429".into(),
        };
        let mut failures = 0;
        for _ in 0..RENEW_RETRIES {
            let again = retry_renewal(&mut failures, &e).expect("tried again");
            assert!(again > Instant::now() + RENEW_RETRY_AFTER - Duration::from_secs(1));
        }
        assert_eq!(retry_renewal(&mut failures, &e), None);
        // The token's real end leaves room for every try.
        assert!(RENEW_RETRY_AFTER * RENEW_RETRIES < Duration::from_secs(4 * 60));
    }
    use fe2o3_amqp_types::messaging::MessageAnnotations;
    use fe2o3_amqp_types::messaging::annotations::OwnedKey;
    use fe2o3_amqp_types::messaging::message::__private::Serializable;
    use fe2o3_amqp_types::primitives::{Binary, Symbol};

    #[test]
    fn a_disabled_entity_is_refused_not_unreachable() {
        let cfg = LinkConfig {
            host: "ns.servicebus.windows.net".into(),
            tls: true,
            dlq_path: "q/$DeadLetterQueue".into(),
            scope: None,
            credentials: Credentials::Signature(String::new()),
            sas_ttl: Duration::from_secs(60),
            label: "dlq (q)".into(),
        };
        let attach = r#"RemoteClosedWithError(Error { condition: Custom(Symbol("com.microsoft:entity-disabled")), description: Some("Messaging entity 'ns:Queue:dest' is currently disabled."), info: None })"#;
        let e = cfg.classify_entity("dest", "attach a sender to dest", &attach);
        assert!(
            matches!(&e, BackendError::Refused { detail, .. } if detail.contains("dest is disabled") && detail.contains("currently disabled")),
            "{e:?}"
        );
    }

    #[test]
    fn entra_tokens_are_renewed_before_they_expire_and_after_the_cache_lets_go() {
        let secs = Duration::from_secs;
        // Entra's usual hour: 4 minutes before, inside the credential
        // cache's 5-minute window (it hands out a new token then).
        assert_eq!(entra_renewal(secs(3600)), secs(3360));
        assert_eq!(entra_renewal(secs(601)), secs(361));
        // Short-lived tokens: well before they expire, never after.
        assert_eq!(entra_renewal(secs(600)), secs(500));
        assert_eq!(entra_renewal(secs(6)), secs(5));
        assert_eq!(entra_renewal(Duration::ZERO), Duration::ZERO);
    }

    fn peeked(seq: i64) -> Value {
        peeked_as(encoded(seq))
    }

    fn peeked_as(bytes: Vec<u8>) -> Value {
        let mut entry = OrderedMap::new();
        entry.insert(Value::String("message".into()), Value::Binary(Binary::from(bytes)));
        entry.insert(Value::String("lock-token".into()), Value::Null);
        Value::Map(entry)
    }

    fn encoded(seq: i64) -> Vec<u8> {
        encoded_with(seq, None)
    }

    /// A message as Service Bus browses it: a header, delivery annotations,
    /// and message annotations with the sequence number, others around it
    /// (and `x-opt-message-state` when `state` is given), then properties,
    /// application properties and a body the scan never reads.
    fn encoded_with(seq: i64, state: Option<Value>) -> Vec<u8> {
        use fe2o3_amqp_types::messaging::{DeliveryAnnotations, Header, Properties};
        let mut annotations = MessageAnnotations::default();
        annotations.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-enqueued-time")),
            Value::Timestamp(Timestamp::from_milliseconds(1_700_000_000_000)),
        );
        annotations.insert(OwnedKey::Symbol(Symbol::from("x-opt-partition-key")), Value::Null);
        annotations.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-sequence-number")),
            Value::Long(seq),
        );
        if let Some(state) = state {
            annotations.insert(OwnedKey::Symbol(Symbol::from("x-opt-message-state")), state);
        }
        annotations.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-locked-until")),
            Value::List(vec![Value::Binary(Binary::from(vec![1u8; 300]))]),
        );
        let mut delivery = DeliveryAnnotations::default();
        delivery.insert(OwnedKey::Symbol(Symbol::from("x-opt-lock-token")), Value::Uint(7));
        let m = Message::builder()
            .header(Header {
                durable: true,
                delivery_count: 3,
                ..Default::default()
            })
            .delivery_annotations(delivery)
            .message_annotations(annotations)
            .properties(Properties::builder().message_id(format!("m{seq}")).build())
            .value(Value::String(format!("body {seq}")))
            .build();
        serde_amqp::to_vec(&Serializable(m)).unwrap()
    }

    /// The management answer as it arrives: a message whose body is `value`.
    fn answer_of(value: Value) -> Vec<u8> {
        serde_amqp::to_vec(&Serializable(Message::builder().value(value).build())).unwrap()
    }

    fn answer(messages: Value) -> Vec<u8> {
        let mut body = OrderedMap::new();
        body.insert(Value::String("other".into()), Value::Int(1));
        body.insert(Value::String("messages".into()), messages);
        answer_of(Value::Map(body))
    }

    fn decode(bytes: &[u8]) -> Browsed {
        use fe2o3_amqp_types::messaging::message::__private::Deserializable;
        let m: Deserializable<Message<PeekBody>> = serde_amqp::from_slice(bytes).unwrap();
        PeekCount::decode_message(m.0).unwrap().0
    }

    /// A peek's answer is counted, its messages' bytes summed and its last
    /// message's sequence number read, beside keys the count does not use; a 204's null body is no
    /// messages. (An AMQP array of maps is not tested: serde_amqp 0.14 cannot
    /// decode one into any type, `Value` included, nor could the SDK's own
    /// peek, which reads `messages` as this code does.)
    #[test]
    fn a_peek_answer_is_counted_without_keeping_its_messages() {
        let list = answer(Value::List((5..=9).map(peeked).collect()));
        let bytes = (5..=9).map(|seq| encoded(seq).len()).sum();
        let shown = |shown, last, bytes| Browsed {
            shown,
            last,
            bytes,
            deferred: Vec::new(),
        };
        assert_eq!(decode(&list), shown(5, Some(9), bytes));
        assert_eq!(decode(&answer(Value::List(Vec::new()))), Browsed::default());
        assert_eq!(decode(&answer_of(Value::Null)), Browsed::default());
    }

    /// A browse tells the deferred messages (`x-opt-message-state` 1, as a
    /// long or an int) from the others by reading each only up to its
    /// message annotations: they are not counted as credit, and their
    /// sequence numbers are kept for a receive by sequence number.
    #[test]
    fn a_peek_answer_tells_deferred_messages_apart() {
        let states = [
            None,
            Some(Value::Long(1)),
            Some(Value::Int(0)),
            Some(Value::Int(1)),
            Some(Value::Long(2)),
        ];
        let messages: Vec<Vec<u8>> = states
            .iter()
            .enumerate()
            .map(|(i, state)| encoded_with(20 + i as i64, state.clone()))
            .collect();
        for (i, m) in messages.iter().enumerate() {
            let deferred = matches!(states[i], Some(Value::Long(1) | Value::Int(1)));
            assert_eq!(
                scan_annotations(m),
                Some((Some(20 + i as i64), deferred)),
                "message {i}"
            );
        }
        let bytes = messages.iter().map(Vec::len).sum();
        let browsed = decode(&answer(Value::List(messages.into_iter().map(peeked_as).collect())));
        assert_eq!(
            browsed,
            Browsed {
                shown: 5,
                last: Some(24),
                bytes,
                deferred: vec![21, 23],
            }
        );
        assert_eq!(browsed.active(), 3);
    }

    /// The scan follows every way AMQP may encode what it reads (a section
    /// named by its symbol, 32-bit maps, small integers), finds no
    /// annotations where there are none, and gives up on what it cannot
    /// follow, for the message to be decoded whole.
    #[test]
    fn the_annotation_scan_follows_amqps_encodings_and_gives_up_on_others() {
        let symbol = |s: &str| {
            let mut v = vec![0xa3, s.len() as u8];
            v.extend_from_slice(s.as_bytes());
            v
        };
        // Described by name, a map32, smalllong 5, smallint state 1.
        let mut named = vec![0x00];
        named.extend(symbol("amqp:message-annotations:map"));
        let mut entries = symbol("x-opt-sequence-number");
        entries.extend([0x55, 5]);
        entries.extend(symbol("x-opt-message-state"));
        entries.extend([0x54, 1]);
        named.push(0xd1);
        named.extend(((entries.len() + 4) as u32).to_be_bytes());
        named.extend(4u32.to_be_bytes());
        named.extend(&entries);
        assert_eq!(scan_annotations(&named), Some((Some(5), true)));
        // Only properties and a body: no annotations at all.
        let bare = serde_amqp::to_vec(&Serializable(
            Message::builder().value(Value::String("no annotations".into())).build(),
        ))
        .unwrap();
        assert_eq!(scan_annotations(&bare), Some((None, false)));
        assert_eq!(scan_annotations(&[]), Some((None, false)));
        // Not a section, and a section cut short.
        assert_eq!(scan_annotations(&[0x40]), None);
        let whole = encoded_with(9, Some(Value::Long(1)));
        assert_eq!(scan_annotations(&whole[..whole.len() / 3]), None);
    }
}
