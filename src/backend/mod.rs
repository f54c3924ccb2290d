//! The `QueueBackend` trait and the adapters behind it (DESIGN §2).
//!
//! Adapters contain no policy: they translate six verbs and the message model.
//! Filtering, batching across calls, rate limits, dry runs, journaling and
//! retries of whole messages live once, in [`crate::engine::redrive`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::config::{QueueConfig, QueueKind};
use crate::model::{Destination, DlqMessage, DlqStats, LeaseId, Leased, Outgoing, SendResult, SettleResult};

#[cfg(feature = "pubsub")]
pub mod pubsub;
#[cfg(feature = "servicebus")]
pub mod servicebus;
#[cfg(feature = "sqs")]
pub mod sqs;

/// The property an SQS message's `AWSTraceHeader` system attribute (its X-Ray
/// trace) is kept in, and sent from with its copy: the only system attribute
/// a send may set.
pub const AWS_TRACE_HEADER_PROPERTY: &str = "aws_trace_header";
/// The property that carries a standard SQS queue's `MessageGroupId` (a
/// fair queue's tenant): kept on the copy, but no ordering key, since a
/// standard queue promises no order (as an ordering key it would send one
/// tenant's copies one batch at a time, and hold them all back after one
/// failed).
pub const SQS_TENANT_PROPERTY: &str = "message_group_id";

/// What a missing provider resource is, by its name: a Pub/Sub path names
/// its kind (`projects/p/topics/t`), so does a Service Bus subscription
/// (`topic/Subscriptions/s`); anything else is a queue.
fn kind_of(name: &str) -> &'static str {
    let name = name.to_ascii_lowercase();
    if name.contains("/topics/") {
        "topic"
    } else if name.contains("/subscriptions/") {
        "subscription"
    } else {
        "queue"
    }
}

/// What went wrong talking to a provider, classified so the CLI can tell the
/// user what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// `queue` is the provider's name for what is missing: a queue, or a
    /// resource path that says itself what it is (a Pub/Sub topic).
    #[error("{} {queue}: not found ({detail})", kind_of(queue))]
    NotFound { queue: String, detail: String },
    #[error("cannot reach {endpoint}: {detail} (is the service or emulator running?)")]
    Unreachable { endpoint: String, detail: String },
    /// Reached, but its TLS certificate was refused (see [`BackendError::unreachable`]).
    /// What to do about it depends on the reason, and on whether
    /// SSL_CERT_FILE already names a bundle: read when the error is shown
    /// (the process never changes it),
    /// so that the error stays small (it rides in every backend `Result`).
    #[error(
        "TLS with {endpoint} failed: its certificate is not trusted ({reason}). {}",
        tls_remedy(reason, std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()))
    )]
    Tls {
        endpoint: String,
        reason: &'static str,
        /// The TLS library's own words, for `-v` and the debug log.
        detail: String,
    },
    /// Credentials refused by the provider, or none found.
    #[error("{provider} authentication failed: {detail}")]
    Auth { provider: &'static str, detail: String },
    #[error("{provider}: {detail}")]
    Provider { provider: &'static str, detail: String },
    /// Reached, and refused for a reason the provider gives that a retry
    /// does not change (a disabled entity, an operation the entity does not
    /// allow, a destination over its quota): the caller's to fix.
    #[error("{provider}: {detail}")]
    Refused { provider: &'static str, detail: String },
    /// The provider leases no more messages while the client holds the ones
    /// it has (SQS: 120,000 in flight per queue).
    #[error("{provider}: {detail}")]
    HoldLimit { provider: &'static str, detail: String },
    /// Reached, and what it showed was leased, but none of it arrived in
    /// time, and the service has not answered since (a Service Bus broker
    /// that stalls). The connection is kept; a retry may bring it.
    #[error("{provider}: {detail}")]
    Stalled { provider: &'static str, detail: String },
    #[error("{0}")]
    Invalid(String),
    #[error("queue {queue} uses the {backend} backend, which this build leaves out (cargo feature `{backend}`)")]
    NotCompiled { queue: String, backend: &'static str },
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// A send's call failed for a reason that fails every later call to the
/// destination the same way (not found, credentials, TLS, unreachable, a
/// refusal).
#[cfg(any(feature = "sqs", feature = "pubsub", feature = "servicebus"))]
pub(crate) fn fails_every_send(e: &BackendError) -> bool {
    matches!(
        e,
        BackendError::NotFound { .. }
            | BackendError::Unreachable { .. }
            | BackendError::Tls { .. }
            | BackendError::Auth { .. }
            | BackendError::Refused { .. }
    )
}

/// End a send that one of its calls (a chunk, an envelope) failed with `e`,
/// which [`fails_every_send`]. Nothing confirmed yet: the whole send fails,
/// which tells the engine the destination refused it. Copies already
/// confirmed keep their results, so their originals are settled rather than
/// released and sent again by a later run; every other message fails with `e`.
#[cfg(any(feature = "sqs", feature = "pubsub", feature = "servicebus"))]
pub(crate) fn abandon_send(results: Vec<Option<SendResult>>, e: BackendError) -> Result<Vec<SendResult>> {
    if !results.iter().any(|r| matches!(r, Some(SendResult::Sent { .. }))) {
        return Err(e);
    }
    let error = e.to_string();
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| SendResult::Failed { error: error.clone() }))
        .collect())
}

/// Keeps one send's copies of an ordering key (SQS FIFO group, Pub/Sub
/// ordering key, Service Bus session) in order when an adapter splits the
/// send into several calls: a copy after one of its key that failed (or was
/// refused before any call) is not sent, since it would arrive ahead of it.
/// The engine holds a failed key's later batches back; within one batch this
/// is the adapter's to keep.
#[cfg(any(feature = "sqs", feature = "pubsub", feature = "servicebus"))]
pub(crate) struct OrderGate<'a> {
    msgs: &'a [Outgoing],
    /// Each key's first copy (by position in the send) that failed.
    first_failed: std::collections::HashMap<&'a str, usize>,
}

#[cfg(any(feature = "sqs", feature = "pubsub", feature = "servicebus"))]
impl<'a> OrderGate<'a> {
    pub(crate) const HELD: &'static str = "not sent: an earlier copy of its ordering key failed";

    /// The gate for `msgs`, with the copies `results` already fails.
    pub(crate) fn new(msgs: &'a [Outgoing], results: &[Option<SendResult>]) -> Self {
        let mut gate = Self {
            msgs,
            first_failed: Default::default(),
        };
        gate.fail((0..msgs.len()).filter(|&i| matches!(results[i], Some(SendResult::Failed { .. }))));
        gate
    }

    /// Notes those of copies `idx`, just sent, that `results` does not show
    /// sent (an entry the answer left out counts as failed).
    #[cfg_attr(not(any(feature = "sqs", feature = "servicebus")), allow(dead_code))]
    pub(crate) fn note(&mut self, idx: impl IntoIterator<Item = usize>, results: &[Option<SendResult>]) {
        for i in idx {
            if !matches!(results[i], Some(SendResult::Sent { .. })) {
                self.mark(i);
            }
        }
    }

    /// Notes that copies `idx` failed.
    pub(crate) fn fail(&mut self, idx: impl IntoIterator<Item = usize>) {
        for i in idx {
            self.mark(i);
        }
    }

    fn mark(&mut self, i: usize) {
        if let Some(k) = self.msgs[i].ordering_key.as_deref() {
            let first = self.first_failed.entry(k).or_insert(i);
            *first = (*first).min(i);
        }
    }

    /// Whether copy `i` may be sent; if not, fails it in `results`.
    pub(crate) fn admit(&self, i: usize, results: &mut [Option<SendResult>]) -> bool {
        let held = self.msgs[i]
            .ordering_key
            .as_deref()
            .and_then(|k| self.first_failed.get(k))
            .is_some_and(|&first| first < i);
        if held {
            results[i] = Some(SendResult::Failed {
                error: Self::HELD.into(),
            });
        }
        !held
    }
}

impl BackendError {
    /// An endpoint that could not be reached, unless `detail` shows that it
    /// was reached and its certificate refused: that does not heal by
    /// retrying, and "is it running?" is the wrong hint (a private CA, a
    /// TLS-inspecting proxy, an endpoint of another name).
    pub fn unreachable(endpoint: impl Into<String>, detail: impl Into<String>) -> Self {
        let (endpoint, detail) = (endpoint.into(), detail.into());
        match untrusted_certificate(&detail) {
            Some(reason) => {
                tracing::debug!(%endpoint, %detail, "TLS certificate refused");
                Self::Tls {
                    endpoint,
                    reason,
                    detail,
                }
            }
            None => Self::Unreachable { endpoint, detail },
        }
    }
}

const SELF_SIGNED: &str = "it is self-signed";
const UNKNOWN_ISSUER: &str = "its issuer is not a trusted CA";
const EXPIRED: &str = "it has expired";
const NOT_YET_VALID: &str = "it is not valid yet";
const OTHER_NAME: &str = "it does not name this host";
const FAILED: &str = "it failed verification";

/// What to do about a refused certificate. A CA bundle helps only when the
/// issuer is the problem. When `SSL_CERT_FILE` is already set, every backend
/// reads it instead of the system's CAs, and it lacks the issuer: in the
/// image it names the image's own public bundle (which cannot be edited)
/// unless the chart's `caBundle` replaced it. `SSL_CERT_DIR` is not named:
/// it is often the system's own directory, set by the distribution.
fn tls_remedy(reason: &str, ssl_cert_file: Option<std::ffi::OsString>) -> String {
    match reason {
        EXPIRED => "The endpoint must serve a certificate that is valid now (check this machine's clock too)".into(),
        NOT_YET_VALID => "Check this machine's clock: the certificate's validity has not begun by it".into(),
        OTHER_NAME => "Check the endpoint's host name: the certificate was issued for another one".into(),
        _ => match ssl_cert_file {
            Some(path) => {
                let path = std::path::Path::new(&path);
                // A bundle that cannot be read holds nothing: that is the
                // mistake to name (SQS's client only logs it, then trusts
                // nothing). Opening it, not just finding it: a Secret mounted
                // for root alone exists for a non-root process too.
                let holds = match std::fs::File::open(path).and_then(|f| f.metadata()) {
                    Ok(m) if m.is_file() => "which holds no CA that issued it".to_string(),
                    Ok(_) => "which is not a file".to_string(),
                    Err(e) => format!("which cannot be read ({e})"),
                };
                format!(
                    "SSL_CERT_FILE names {}, {holds}: if this is the right endpoint, add its CA certificate to that bundle, or name one that holds it as well as the public CAs (in Kubernetes, the chart's caBundle)",
                    path.display()
                )
            }
            None => {
                "If this is the right endpoint, set SSL_CERT_FILE to a PEM file that holds its CA certificate".into()
            }
        },
    }
}

/// Why a TLS library refused a server's certificate, read from its error
/// text (OpenSSL through native-tls for AMQP, rustls for HTTP and gRPC);
/// None when the text is not such a refusal. The specific signs come before
/// rustls's generic "invalid peer certificate".
fn untrusted_certificate(text: &str) -> Option<&'static str> {
    const SIGNS: &[(&str, &str)] = &[
        ("self-signed certificate", SELF_SIGNED),
        ("self signed certificate", SELF_SIGNED),
        ("unable to get local issuer certificate", UNKNOWN_ISSUER),
        ("unknownissuer", UNKNOWN_ISSUER),
        ("certificate has expired", EXPIRED),
        ("certificate expired", EXPIRED),
        ("invalid peer certificate: expired", EXPIRED),
        ("certificate is not yet valid", NOT_YET_VALID),
        ("certificate not valid yet", NOT_YET_VALID),
        ("invalid peer certificate: notvalidyet", NOT_YET_VALID),
        ("hostname mismatch", OTHER_NAME),
        ("ip address mismatch", OTHER_NAME),
        ("certificate not valid for name", OTHER_NAME),
        ("notvalidforname", OTHER_NAME),
        ("certificate verify failed", FAILED),
        ("invalid peer certificate", FAILED),
    ];
    let lower = text.to_ascii_lowercase();
    SIGNS
        .iter()
        .find(|(sign, _)| lower.contains(sign))
        .map(|&(_, reason)| reason)
}

/// The innermost cause of an error, e.g. "Connection refused (os error 111)"
/// under layers of "dispatch failure: io error: client error (Connect)".
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// An error's own words followed by its innermost cause, which wrappers
/// ("transport error", "http error") leave out; once when they are the same.
pub fn with_root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let (top, root) = (e.to_string(), root_cause(e));
    if root == top { top } else { format!("{top}: {root}") }
}

/// Bytes of bodies one page of a browse ([`QueueBackend::peek_each`], and
/// the leases of a triage read) asks for, at the size of the bodies of the
/// page before (SQS's pages are 10 messages anyway).
const PEEK_PAGE_BYTES: usize = 4 << 20;
/// The body size assumed for a browse's first page: Service Bus's standard
/// tier limit (16 messages).
const PEEK_FIRST_BODY: usize = 256 << 10;

/// Messages the next page of a browse asks for, at most `cap` (the
/// provider's page) and at least one: [`PEEK_PAGE_BYTES`] at the average
/// body size of the last page, `last` (bytes, messages).
pub(crate) fn peek_page(last: Option<(usize, usize)>, cap: usize) -> usize {
    let avg = match last {
        Some((bytes, n)) if n > 0 => (bytes / n).max(1),
        _ => PEEK_FIRST_BODY,
    };
    (PEEK_PAGE_BYTES / avg).clamp(1, cap.max(1))
}

/// What a provider can carry, so that callers (and the conformance tests) know
/// which parts of the message model apply.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// `peek` browses without leasing (Service Bus). Otherwise it leases and
    /// releases, which raises delivery counts (DESIGN §3, guarantee 8).
    pub true_peek: bool,
    /// Bodies may hold arbitrary bytes (SQS bodies are XML-safe text only).
    pub binary_body: bool,
    /// Bodies may be empty (SQS requires at least one character).
    pub empty_body: bool,
    /// The largest body the provider accepts.
    pub max_body_bytes: usize,
    /// Attribute values keep their type through the provider (SQS String /
    /// Number / Binary, Service Bus's AMQP types). Pub/Sub attributes are
    /// strings: a typed value arrives as its text ([`crate::model::Attribute::as_text`]).
    pub typed_attributes: bool,
    /// The most attributes one message may carry, when the provider caps it.
    pub max_attributes: Option<usize>,
    /// How many messages one lease/send/settle call handles.
    pub batch_size: usize,
    /// The most messages one lease may ask for. The engine starts at
    /// `batch_size` and grows towards this while bodies are small.
    pub max_lease_size: usize,
    /// Leases the engine may have in flight at once on one queue, to hide
    /// the provider's round trip (further capped by `redrive.concurrency`).
    pub max_concurrent_leases: usize,
    /// The most held messages one `release` call takes: the end of a pass
    /// releases in calls of this many, `redrive.concurrency` at a time.
    pub max_release_size: usize,
    /// The provider holds back a group's later messages while earlier ones
    /// are leased (SQS FIFO queues, Pub/Sub subscriptions with message
    /// ordering): an empty lease then does not prove the queue empty.
    pub ordered_delivery: bool,
    /// How long a lease holds a message whatever hold it asks for, when the
    /// provider fixes it (Service Bus: the entity's LockDuration, once its
    /// description was read). The engine sizes its rated leases to it.
    pub fixed_hold: Option<Duration>,
    /// The longest hold one lease or extension can ask for (Pub/Sub's ack
    /// deadline: 600 s; SQS's visibility timeout: 12 hours).
    pub max_hold: Option<Duration>,
}

#[async_trait]
pub trait QueueBackend: Send + Sync {
    /// `sqs`, `pubsub` or `servicebus`.
    fn kind(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Whether an attribute was added by the provider when it dead-lettered the
    /// message (and so is stripped from a redriven copy by default).
    fn is_dead_letter_attribute(&self, name: &str) -> bool;

    /// Whether `o` is within the size limit for one message sent to `to`,
    /// where that limit counts attributes too (SQS: body, attribute names,
    /// types and values, up to the queue's `MaximumMessageSize`; Pub/Sub:
    /// data, attributes and ordering key). The engine leaves the redrive
    /// marks off a copy they would take over it.
    fn fits(&self, _to: &Destination, _o: &Outgoing) -> bool {
        true
    }

    /// Depth, age of the oldest message when knowable, and how exact they are.
    async fn stats(&self) -> Result<DlqStats>;

    /// Ask directly what `stats` goes on without when it fails (SQS's age
    /// from CloudWatch: the depth still counts), so that `check` reports a
    /// setup that would leave it unknown. Default: nothing of the kind.
    async fn check_optional_reads(&self) -> Result<()> {
        Ok(())
    }

    /// Browse up to `max` messages, disturbing them as little as the provider
    /// allows, a page at a time: each message goes to `visit` as it is read
    /// and is not kept, so memory holds one page of bodies plus what `visit`
    /// keeps. `visit` returns false to stop. Returns how many messages went
    /// to `visit`. Adapters without a true peek lease each page and release
    /// everything they leased at the end, on success, error or stop alike.
    async fn peek_each(&self, max: usize, visit: &mut (dyn FnMut(DlqMessage) -> bool + Send)) -> Result<usize>;

    /// Browse up to `max` messages into a `Vec` (a small sample: `list`'s
    /// reasons, the poller's). Readers of many messages use [`QueueBackend::peek_each`]
    /// (through `engine::triage::browse`, which leases instead where there
    /// is no true peek, so that a long read keeps what it holds).
    async fn peek(&self, max: usize) -> Result<Vec<DlqMessage>> {
        let mut out = Vec::new();
        self.peek_each(max, &mut |m| {
            out.push(m);
            true
        })
        .await?;
        Ok(out)
    }

    /// Lease up to `max` messages (at most one provider call's worth), hiding
    /// them from other consumers for `hold`. An empty result means the queue
    /// had nothing visible.
    async fn lease(&self, max: usize, hold: Duration) -> Result<Vec<Leased>>;

    /// A lease that takes its place in line now, before the returned future
    /// first runs. The engine examines lease results in the order it starts
    /// them, and several leases' tasks may first run in any order (on a
    /// multi-threaded runtime the last one spawned often runs first). Where
    /// the provider holds back a group's later messages while earlier ones
    /// are leased (SQS FIFO, ordered Pub/Sub), that order does not matter.
    /// Where it hands each lease whatever is next (a Service Bus DLQ, never
    /// session-aware), leases must be served in the order of this call, or a
    /// session's later messages could be examined, and sent, before its
    /// earlier ones.
    fn lease_in_turn(self: Arc<Self>, max: usize, hold: Duration) -> BoxFuture<'static, Result<Vec<Leased>>>
    where
        Self: 'static,
    {
        Box::pin(async move { self.lease(max, hold).await })
    }

    /// Send copies to `to` and wait for the destination to confirm each.
    async fn send(&self, to: &Destination, msgs: &[Outgoing]) -> Result<Vec<SendResult>>;

    /// Remove leased messages from the DLQ for good (delete, ack, complete).
    async fn settle(&self, leases: &[LeaseId]) -> Result<Vec<SettleResult>>;

    /// Make leased messages visible again at once (visibility 0, modack 0, abandon).
    async fn release(&self, leases: &[LeaseId]) -> Result<()>;

    /// Keep leased messages hidden for another `hold` from now (visibility,
    /// ack deadline, renew-lock), so that a pass longer than its hold does
    /// not see what it holds come back. A lease the provider no longer knows
    /// (lapsed, settled) is skipped; an error means the call failed as a
    /// whole, and those leases may lapse (seen again, never lost).
    async fn extend(&self, leases: &[LeaseId], hold: Duration) -> Result<()>;

    /// The destination used when a message does not name its own source and the
    /// config gives none: discovered from the provider where it can tell.
    async fn default_source(&self) -> Result<Option<Destination>>;

    /// Why `m`, which names its own source, has none (a source that was
    /// deleted or cannot be read): the engine then sends it nowhere, not to
    /// [`default_source`](Self::default_source), which is some other entity.
    /// None when the message names no source or its source was found.
    fn unresolved_source(&self, _m: &DlqMessage) -> Option<String> {
        None
    }

    /// Turn a user-given destination (`--to`) into the provider's address.
    async fn resolve_destination(&self, name: &str) -> Result<Destination>;

    /// Whether this queue's credentials can send copies to `to` at all, as
    /// far as can be told without a call: a Service Bus connection string
    /// scoped to one entity (`EntityPath`) can send nowhere else. Checked
    /// when a pass is planned, also for a destination another queue's
    /// backend resolved (`--to` a configured queue), before anything is
    /// leased.
    fn check_send_to(&self, _to: &Destination) -> Result<()> {
        Ok(())
    }

    /// A pass is about to send to `to`: open in the background what sends
    /// there will need, so that the first batches do not wait for it behind
    /// the first leases. Never fails; a send reports its own errors.
    fn prepare_send(self: Arc<Self>, _to: &Destination) {}

    /// A pass is about to lease: open in the background what leases will
    /// need, while the caller still resolves the pass's destinations. Never
    /// fails; the first lease reports the error.
    fn prepare_lease(self: Arc<Self>) {}
}

/// Provider clients shared by every queue that can use the same one: one AWS
/// SDK client per (region, endpoint), one set of Pub/Sub gRPC channels per
/// endpoint (emulator host or Google), one Service Bus connection per
/// (namespace, credentials). Each is created on first use and handed to each
/// queue's adapter, so a sidecar with many queues holds a handful of
/// connections, HTTP clients and TLS configurations instead of one set per
/// queue. The [`crate::engine::registry::Registry`] owns one.
#[derive(Default)]
pub struct SharedClients {
    #[cfg(feature = "sqs")]
    pub(crate) sqs: sqs::Clients,
    #[cfg(feature = "pubsub")]
    pub(crate) pubsub: pubsub::Clients,
    #[cfg(feature = "servicebus")]
    pub(crate) servicebus: servicebus::Clients,
}

/// The HTTP client of the REST side calls (Service Bus ATOM counts, Entra ID
/// tokens, Cloud Monitoring, CloudWatch), built once per process: each build
/// loads a TLS configuration and its root certificates.
#[cfg(any(feature = "sqs", feature = "pubsub", feature = "servicebus"))]
pub(crate) fn http_client() -> Result<reqwest::Client> {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(c) = HTTP.get() {
        return Ok(c.clone());
    }
    let c = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| BackendError::Invalid(format!("cannot build the HTTP client: {e}")))?;
    Ok(HTTP.get_or_init(|| c).clone())
}

/// What a backend is connected for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Counts, browsing, alerting: nothing says a lease follows.
    Inspect,
    /// A redrive pass leases right after: the adapter may start opening what
    /// leasing needs, and checking what the pass's plan resolves next, while
    /// it connects.
    Pass,
}

/// Build the adapter a queue's config asks for, with clients of its own.
pub async fn connect(queue: &QueueConfig) -> Result<Arc<dyn QueueBackend>> {
    connect_shared(queue, &SharedClients::default(), Purpose::Inspect).await
}

/// Build the adapter a queue's config asks for, reusing (or creating) the
/// provider client in `shared` that fits it.
pub async fn connect_shared(
    queue: &QueueConfig,
    shared: &SharedClients,
    purpose: Purpose,
) -> Result<Arc<dyn QueueBackend>> {
    #[cfg(not(all(feature = "sqs", feature = "pubsub", feature = "servicebus")))]
    let _ = shared;
    #[cfg(not(any(feature = "pubsub", feature = "servicebus")))]
    let _ = purpose;
    match &queue.kind {
        #[cfg(feature = "sqs")]
        QueueKind::Sqs(cfg) => Ok(Arc::new(
            sqs::SqsBackend::connect(&queue.name, cfg, queue, &shared.sqs).await?,
        )),
        #[cfg(not(feature = "sqs"))]
        QueueKind::Sqs(_) => Err(BackendError::NotCompiled {
            queue: queue.name.clone(),
            backend: "sqs",
        }),
        #[cfg(feature = "pubsub")]
        QueueKind::PubSub(cfg) => Ok(Arc::new(
            pubsub::PubSubBackend::connect(&queue.name, cfg, queue, &shared.pubsub, purpose).await?,
        )),
        #[cfg(not(feature = "pubsub"))]
        QueueKind::PubSub(_) => Err(BackendError::NotCompiled {
            queue: queue.name.clone(),
            backend: "pubsub",
        }),
        #[cfg(feature = "servicebus")]
        QueueKind::ServiceBus(cfg) => Ok(Arc::new(
            servicebus::ServiceBusBackend::connect(&queue.name, cfg, queue, &shared.servicebus, purpose).await?,
        )),
        #[cfg(not(feature = "servicebus"))]
        QueueKind::ServiceBus(_) => Err(BackendError::NotCompiled {
            queue: queue.name.clone(),
            backend: "servicebus",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(feature = "sqs", feature = "pubsub", feature = "servicebus"))]
    fn a_send_cut_short_keeps_what_was_confirmed() {
        let down = || BackendError::unreachable("sqs.example", "connection refused");
        let sent = || Some(SendResult::Sent { dest_id: "d1".into() });
        assert!(
            abandon_send(vec![None, None], down()).is_err(),
            "nothing confirmed: the send fails"
        );
        let failed_before = Some(SendResult::Failed {
            error: "too large".into(),
        });
        assert!(abandon_send(vec![failed_before, None], down()).is_err());
        let results = abandon_send(vec![sent(), None], down()).unwrap();
        assert!(matches!(&results[0], SendResult::Sent { dest_id } if dest_id == "d1"));
        assert!(matches!(&results[1], SendResult::Failed { error } if error.contains("cannot reach")));
    }

    #[test]
    #[cfg(any(feature = "sqs", feature = "pubsub", feature = "servicebus"))]
    fn a_copy_after_a_failed_one_of_its_key_is_not_sent() {
        let out = |key: Option<&str>| Outgoing {
            body: bytes::Bytes::from_static(b"x"),
            attributes: Default::default(),
            properties: Default::default(),
            ordering_key: key.map(str::to_string),
            dedup_id: String::new(),
            original_id: String::new(),
        };
        let msgs = [
            out(Some("a")),
            out(Some("b")),
            out(Some("a")),
            out(None),
            out(Some("a")),
        ];
        let refused = || {
            Some(SendResult::Failed {
                error: "too large".into(),
            })
        };
        // Copy 2 (key a) was refused before any call: 0 may still go, 4 not.
        let mut results = vec![None, None, refused(), None, None];
        let gate = OrderGate::new(&msgs, &results);
        let admitted: Vec<bool> = (0..5).map(|i| i == 2 || gate.admit(i, &mut results)).collect();
        assert_eq!(admitted, [true, true, true, true, false]);
        assert!(matches!(&results[4], Some(SendResult::Failed { error }) if error == OrderGate::HELD));
        // A call carrying copy 1 (key b) failed: key b stops, key a is as it was.
        let mut results = vec![None; 5];
        let mut gate = OrderGate::new(&msgs, &results);
        results[0] = Some(SendResult::Sent { dest_id: "d".into() });
        gate.note([0], &results);
        gate.fail([1]);
        let admitted: Vec<bool> = (2..5).map(|i| gate.admit(i, &mut results)).collect();
        assert_eq!(admitted, [true, true, true]);
        let late_b = [out(Some("b")), out(Some("b"))];
        let mut gate = OrderGate::new(&late_b, &[None, None]);
        gate.fail([0]);
        assert!(!gate.admit(1, &mut [None, None]));
    }

    #[test]
    fn a_refused_certificate_is_told_apart_from_an_unreachable_endpoint() {
        let reason = |detail: &str| match BackendError::unreachable("amqps://ns", detail) {
            BackendError::Tls { reason, .. } => Some(reason),
            BackendError::Unreachable { .. } => None,
            other => panic!("{other:?}"),
        };
        // OpenSSL through native-tls (AMQP), as azservicebus words it.
        let openssl = r#"connect: Ssl(Error { code: ErrorCode(1), cause: Some(Ssl(ErrorStack([Error { code: 167772294, library: "SSL routines", function: "tls_post_process_server_certificate", reason: "certificate verify failed" }]))) }, X509VerifyResult { code: 18, error: "self-signed certificate" })"#;
        assert_eq!(reason(openssl), Some("it is self-signed"));
        assert_eq!(
            reason(r#"X509VerifyResult { code: 20, error: "unable to get local issuer certificate" }"#),
            Some("its issuer is not a trusted CA")
        );
        assert_eq!(
            reason(r#"X509VerifyResult { code: 62, error: "hostname mismatch" }"#),
            Some("it does not name this host")
        );
        // rustls (HTTP and gRPC).
        assert_eq!(
            reason("error sending request: invalid peer certificate: UnknownIssuer"),
            Some("its issuer is not a trusted CA")
        );
        assert_eq!(reason("invalid peer certificate: Expired"), Some("it has expired"));
        assert_eq!(
            reason("invalid peer certificate: NotValidForName"),
            Some("it does not name this host")
        );
        // rustls's own words for the errors its webpki verifier gives now,
        // with their context (this version's, so a change of words fails here).
        use rustls::CertificateError as C;
        use rustls::pki_types::{ServerName, UnixTime};
        let at = |secs| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
        let words = |e: C| rustls::Error::InvalidCertificate(e).to_string();
        for (error, want) in [
            (
                C::ExpiredContext {
                    time: at(2_000_000_000),
                    not_after: at(1_900_000_000),
                },
                EXPIRED,
            ),
            (
                C::NotValidYetContext {
                    time: at(1_800_000_000),
                    not_before: at(1_900_000_000),
                },
                NOT_YET_VALID,
            ),
            (
                C::NotValidForNameContext {
                    expected: ServerName::try_from("pubsub.googleapis.com").unwrap(),
                    presented: vec!["DnsName(\"proxy.example\")".into()],
                },
                OTHER_NAME,
            ),
            (C::UnknownIssuer, UNKNOWN_ISSUER),
            (C::BadSignature, FAILED),
        ] {
            let text = words(error);
            assert_eq!(reason(&text), Some(want), "{text}");
        }
        assert_eq!(
            reason(r#"X509VerifyResult { code: 9, error: "certificate is not yet valid" }"#),
            Some(NOT_YET_VALID)
        );
        // Not certificates.
        assert_eq!(reason("Connection refused (os error 111)"), None);
        assert_eq!(reason("ExpiredToken: The token is expired."), None);
        assert_eq!(reason("dns error: failed to lookup address"), None);
        let tls = BackendError::unreachable("amqps://ns", openssl).to_string();
        assert!(
            tls.starts_with("TLS with amqps://ns failed: its certificate is not trusted (it is self-signed)"),
            "{tls}"
        );
        assert!(tls.contains("SSL_CERT_FILE"), "{tls}");
    }

    #[test]
    fn the_remedy_for_a_refused_certificate_fits_its_reason() {
        let dir = std::env::temp_dir().join(format!("dlqb-remedy-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bundle.pem");
        std::fs::write(&file, "").unwrap();
        let bundle = Some(file.clone().into_os_string());
        for reason in [SELF_SIGNED, UNKNOWN_ISSUER, FAILED] {
            assert!(tls_remedy(reason, None).contains("set SSL_CERT_FILE to a PEM file"));
            let named = tls_remedy(reason, bundle.clone());
            assert!(
                named.contains(&format!(
                    "SSL_CERT_FILE names {}, which holds no CA that issued it",
                    file.display()
                )) && named.contains("add its CA certificate to that bundle, or name one that holds it as well"),
                "{named}"
            );
        }
        let missing = dir.join("missing.pem");
        let gone = tls_remedy(UNKNOWN_ISSUER, Some(missing.clone().into_os_string()));
        assert!(
            gone.starts_with(&format!(
                "SSL_CERT_FILE names {}, which cannot be read (",
                missing.display()
            )),
            "{gone}"
        );
        let a_dir = tls_remedy(UNKNOWN_ISSUER, Some(dir.clone().into_os_string()));
        assert!(
            a_dir.starts_with(&format!("SSL_CERT_FILE names {}, which is not a file", dir.display())),
            "{a_dir}"
        );
        for (reason, says) in [
            (EXPIRED, "valid now"),
            (NOT_YET_VALID, "clock"),
            (OTHER_NAME, "issued for another one"),
        ] {
            for file in [None, bundle.clone()] {
                let remedy = tls_remedy(reason, file);
                assert!(remedy.contains(says) && !remedy.contains("SSL_CERT_FILE"), "{remedy}");
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
