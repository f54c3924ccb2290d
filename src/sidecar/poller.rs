//! The stats poller of `serve`: one loop per queue polls depth, age and a
//! reason sample, caches the result for the API, updates the metrics and
//! hands each poll to the alert evaluator.
//!
//! Admin calls are rate-limited per backend kind (Service Bus throttles its
//! management API hard), and a failing queue backs off exponentially.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::{RwLock, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{AdminCallLimits, Config, QueueConfig};
use crate::engine::redrive::Progress;
use crate::engine::registry::Registry;
use crate::model::{DlqMessage, DlqStats, Exactness};
use crate::sidecar::exclusion::QueueLocks;
use crate::sidecar::metrics::Metrics;

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Depth history kept per queue for the dashboard's sparklines: points older
/// than this are dropped, and at most `HISTORY_POINTS` are kept (runs of equal
/// depths are merged, so an idle queue costs a couple of points).
const HISTORY_SPAN: Duration = Duration::from_secs(6 * 3600);
const HISTORY_POINTS: usize = 360;

/// The latest known state of one queue, as `/v1/queues` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub queue: String,
    pub backend: String,
    #[serde(flatten)]
    pub stats: Option<DlqStats>,
    /// Reasons in the latest sample, most frequent first.
    pub top_reasons: Vec<(String, u64)>,
    pub sampled: usize,
    pub polled_at: Option<DateTime<Utc>>,
    /// The latest poll that succeeded; older than `polled_at` while polls
    /// fail, when depth, age and reasons are the last known ones.
    pub last_success_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// One poll, handed to the alert evaluator.
#[derive(Debug, Clone)]
pub struct PollResult {
    pub queue: String,
    pub backend: String,
    pub at: DateTime<Utc>,
    pub stats: DlqStats,
    /// Messages that arrived since the previous poll, as far as it can tell.
    pub arrivals: u64,
    /// Since when they may have arrived: the previous poll, or an earlier
    /// one when a run of ours hid them until now (see `ArrivalCounter`).
    pub arrivals_since: Option<DateTime<Utc>>,
    /// The sampled messages (empty when sampling is off or the queue is
    /// empty); `None` when this poll skipped its sample because a run was
    /// active on the queue, so it tells nothing about reasons.
    pub sample: Option<Vec<SampledMessage>>,
}

/// The most of a sampled message's body that anything shows: a notification
/// with `alerts.include_bodies` carries this much of it, and nothing else
/// reads a sample's bodies.
pub const SAMPLE_BODY_LIMIT: usize = 4096;

/// A sampled message as the poller keeps it until the next poll: its body cut
/// to a few bytes past [`SAMPLE_BODY_LIMIT`], with the whole body's size.
/// Kept whole, a sample of 50 held up to 50 MiB on SQS (1 MiB bodies), 500 MB
/// on Pub/Sub (10 MB) and more on Service Bus premium, in a sidecar whose
/// chart limits it to 256 MiB.
#[derive(Debug, Clone)]
pub struct SampledMessage {
    message: DlqMessage,
    body_bytes: usize,
}

impl SampledMessage {
    pub fn new(mut message: DlqMessage) -> Self {
        let body_bytes = message.body.len();
        // Past the limit, so that the notification still sees a longer body
        // and cuts it on a character boundary (up to three bytes back). A
        // copy, not a slice: a slice would keep the whole buffer alive.
        let keep = SAMPLE_BODY_LIMIT + 4;
        if body_bytes > keep {
            message.body = Bytes::copy_from_slice(&message.body[..keep]);
        }
        Self { message, body_bytes }
    }

    /// The size of the whole body, before the cut.
    pub fn body_bytes(&self) -> usize {
        self.body_bytes
    }
}

impl std::ops::Deref for SampledMessage {
    type Target = DlqMessage;

    fn deref(&self) -> &DlqMessage {
        &self.message
    }
}

/// Messages our own runs removed from one queue: the final counts of
/// finished runs plus the live counts of the runs in progress, so that a
/// poll during a run credits what the run settled so far (and not again when
/// it ends).
#[derive(Default)]
struct Removals {
    finished: u64,
    live: HashMap<String, Arc<Progress>>,
}

impl Removals {
    fn total(&self) -> u64 {
        self.finished + self.live.values().map(|p| Progress::get(&p.settled)).sum::<u64>()
    }
}

/// Shared between pollers, the API and redrive runs.
#[derive(Default)]
pub struct StatusCache {
    statuses: RwLock<HashMap<String, QueueStatus>>,
    /// Messages our own runs removed, per queue, so that arrivals count a
    /// burst drained between two polls (depth deltas alone would miss it).
    removed: std::sync::Mutex<HashMap<String, Removals>>,
    /// Depth over time per queue: (unix seconds, depth), oldest first. u32s
    /// keep a full history at 8 bytes a point.
    history: std::sync::Mutex<HashMap<String, std::collections::VecDeque<(u32, u32)>>>,
}

impl StatusCache {
    pub async fn all(&self) -> Vec<QueueStatus> {
        let mut v: Vec<QueueStatus> = self.statuses.read().await.values().cloned().collect();
        v.sort_by(|a, b| a.queue.cmp(&b.queue));
        v
    }

    pub async fn get(&self, queue: &str) -> Option<QueueStatus> {
        self.statuses.read().await.get(queue).cloned()
    }

    /// Whether each group of queues has at least one queue polled (whatever
    /// the result: a provider outage must not take the pod out of service).
    pub async fn each_group_polled(&self, groups: &[Vec<String>]) -> bool {
        let s = self.statuses.read().await;
        groups
            .iter()
            .all(|g| g.iter().any(|q| s.get(q).is_some_and(|st| st.polled_at.is_some())))
    }

    /// Everything our runs removed from `queue` so far (monotonic).
    pub fn removed_total(&self, queue: &str) -> u64 {
        self.removed
            .lock()
            .expect("cache lock")
            .get(queue)
            .map_or(0, Removals::total)
    }

    /// Whether a run of ours is removing messages from `queue`, or one has
    /// since `removed_total` was read.
    pub fn removing(&self, queue: &str, removed_total: u64) -> bool {
        self.removed
            .lock()
            .expect("cache lock")
            .get(queue)
            .is_some_and(|r| !r.live.is_empty() || r.total() != removed_total)
    }

    /// A run on `queue` started: what it settles counts as removed as it happens.
    pub fn run_started(&self, queue: &str, run_id: &str, progress: Arc<Progress>) {
        self.removed
            .lock()
            .expect("cache lock")
            .entry(queue.to_string())
            .or_default()
            .live
            .insert(run_id.to_string(), progress);
    }

    /// A run ended having removed `settled` messages in all (at least what
    /// its progress showed): its live count becomes a final one.
    pub fn run_finished(&self, queue: &str, run_id: &str, settled: u64) {
        let mut all = self.removed.lock().expect("cache lock");
        let r = all.entry(queue.to_string()).or_default();
        let live = r.live.remove(run_id).map_or(0, |p| Progress::get(&p.settled));
        r.finished += settled.max(live);
    }

    /// The depth history of every queue that has one: (unix seconds, depth).
    pub fn history(&self) -> HashMap<String, Vec<(u32, u32)>> {
        self.history
            .lock()
            .expect("cache lock")
            .iter()
            .map(|(q, h)| (q.clone(), h.iter().copied().collect()))
            .collect()
    }

    fn record_depth(&self, queue: &str, at: DateTime<Utc>, depth: u64) {
        let t = u32::try_from(at.timestamp()).unwrap_or(u32::MAX);
        let d = u32::try_from(depth).unwrap_or(u32::MAX);
        let mut all = self.history.lock().expect("cache lock");
        let h = all.entry(queue.to_string()).or_default();
        // A third equal point in a row only moves the second one forward.
        let n = h.len();
        if n >= 2 && h[n - 1].1 == d && h[n - 2].1 == d {
            h[n - 1].0 = t;
        } else {
            h.push_back((t, d));
        }
        let oldest = t.saturating_sub(HISTORY_SPAN.as_secs() as u32);
        while h.len() > HISTORY_POINTS || h.front().is_some_and(|p| p.0 < oldest) {
            h.pop_front();
        }
    }

    /// Record messages a run this cache did not follow removed from `queue`.
    pub fn note_removed(&self, queue: &str, n: u64) {
        self.removed
            .lock()
            .expect("cache lock")
            .entry(queue.to_string())
            .or_default()
            .finished += n;
    }
}

/// A per-backend-kind limiter on admin calls, first come first served.
pub struct AdminLimits {
    limiters: HashMap<&'static str, FairLimiter>,
}

struct FairLimiter {
    /// Tokio's mutex hands the lock out in the order it was asked for.
    /// governor's `until_ready` alone lets whichever waiter wakes first
    /// through: with more queues than a limit serves per poll interval, the
    /// queues that had polled once asked again and won against some that
    /// never had (980 SQS queues at 20 calls/s: 35 still unpolled after 90 s).
    turn: tokio::sync::Mutex<()>,
    limiter: DefaultDirectRateLimiter,
    per_second: u32,
}

impl AdminLimits {
    pub fn new(cfg: &AdminCallLimits) -> Self {
        let mk = |n: u32| {
            let per_second = n.max(1);
            FairLimiter {
                turn: tokio::sync::Mutex::new(()),
                limiter: RateLimiter::direct(Quota::per_second(NonZeroU32::new(per_second).expect("at least 1"))),
                per_second,
            }
        };
        Self {
            limiters: HashMap::from([
                ("sqs", mk(cfg.sqs)),
                ("pubsub", mk(cfg.pubsub)),
                ("servicebus", mk(cfg.servicebus)),
            ]),
        }
    }

    pub async fn wait(&self, backend: &str) {
        if let Some(l) = self.limiters.get(backend) {
            let _turn = l.turn.lock().await;
            l.limiter.until_ready().await;
        }
    }

    /// Per backend kind whose queues' polls (one admin call each, at their
    /// poll intervals) ask for more calls than its limit allows: how long a
    /// round of every queue's poll takes instead, at least. Calls for reason
    /// samples come on top.
    pub fn overloaded(&self, config: &Config) -> Vec<Overload> {
        let mut demand: HashMap<&'static str, (usize, f64)> = HashMap::new();
        for q in &config.queues {
            let interval = q
                .poll_interval
                .unwrap_or(config.serve.poll_interval)
                .as_secs_f64()
                .max(1e-3);
            let d = demand.entry(q.kind.backend_name()).or_default();
            d.0 += 1;
            d.1 += 1.0 / interval;
        }
        let mut out: Vec<Overload> = demand
            .into_iter()
            .filter_map(|(backend, (queues, per_second))| {
                let limit = self.limiters.get(backend)?.per_second;
                (per_second > f64::from(limit)).then(|| Overload {
                    backend,
                    queues,
                    calls_per_second: per_second,
                    limit,
                    round: Duration::from_secs_f64(queues as f64 / f64::from(limit)),
                })
            })
            .collect();
        out.sort_by_key(|o| o.backend);
        out
    }
}

/// See [`AdminLimits::overloaded`].
#[derive(Debug, PartialEq)]
pub struct Overload {
    pub backend: &'static str,
    pub queues: usize,
    pub calls_per_second: f64,
    pub limit: u32,
    pub round: Duration,
}

pub struct Poller {
    pub registry: Arc<Registry>,
    pub cache: Arc<StatusCache>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<AdminLimits>,
    pub locks: Arc<QueueLocks>,
    pub results: mpsc::Sender<PollResult>,
}

/// What one successful poll read.
struct Polled {
    /// When `removed_total` was read, just before the stats.
    at: Instant,
    stats: DlqStats,
    /// `removed_total` just before the stats were read.
    removed_total: u64,
    /// A run of ours was removing messages around the stats read: the depth
    /// may show removals not credited yet.
    removing: bool,
    /// `None`: the sample was skipped (a run is active on the queue); the
    /// previous one stands.
    sample: Option<Vec<SampledMessage>>,
}

/// The wait before the next poll after `errors` failures in a row: the
/// interval doubled per failure, up to `MAX_BACKOFF` (or the interval, when
/// that is longer). Config validation keeps the interval at 1 s or more.
fn backoff(interval: Duration, errors: u32) -> Duration {
    let interval = interval.max(Duration::from_secs(1));
    interval
        .saturating_mul(1 << errors.min(8))
        .min(MAX_BACKOFF.max(interval))
}

/// How far behind the truth a depth of this kind may be: removals credited
/// more recently may not show in it yet. Cloud Monitoring samples Pub/Sub's
/// backlog every 60 s and shows a sample up to 120 s later.
fn depth_lag(exactness: Exactness) -> Duration {
    match exactness {
        Exactness::Lagged => Duration::from_secs(180),
        Exactness::Exact | Exactness::Approximate | Exactness::AtLeast => Duration::ZERO,
    }
}

/// One depth reading, as the arrival counter needs it.
#[derive(Debug, Clone, Copy)]
struct DepthReading {
    at: Instant,
    depth: u64,
    /// Messages leased when the depth was read, included in it (SQS).
    in_flight: Option<u64>,
    /// What our runs had removed, credited as they settle, before the depth
    /// was read (see `Removals`).
    removed_total: u64,
    /// A run of ours was removing messages while the depth was read.
    removing: bool,
    /// See `depth_lag`.
    lag: Duration,
}

/// Counts the messages that arrived between polls: the depth's rise plus
/// what our runs removed meanwhile.
///
/// Arrivals are counted against the last *trusted* reading, taken with no
/// run of ours removing and with every credit old enough to show in the
/// depth; between two trusted readings, only what each reading proves. A
/// reading taken while a run removes can be wrong both ways: SQS counts
/// visible and in-flight messages in two reads, so a message leased or
/// released in between is counted twice (never more than the in-flight
/// count); a message deleted is gone from the depth before its removal is
/// credited; a lagging depth (Cloud Monitoring) still shows messages removed
/// minutes ago. Counting from the previous poll instead took a reading's
/// excess for arrivals (phantom growth alerts). The cost: arrivals that a run
/// hides by removing faster than they come count when the run is done (or,
/// for a lagging depth, `depth_lag` after).
#[derive(Default)]
struct ArrivalCounter {
    base: Option<Base>,
    /// Arrivals counted since `base`.
    counted: u64,
    /// Recent (time, removed_total) pairs: the credits a lagging depth
    /// shows are those read `lag` ago.
    credits: VecDeque<(Instant, u64)>,
    /// When the previous reading was taken.
    previous: Option<Instant>,
}

/// What one reading counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counted {
    arrivals: u64,
    /// The earliest they may have come: the reading counted against.
    since: Option<Instant>,
}

/// The reading arrivals are counted from.
#[derive(Debug, Clone, Copy)]
struct Base {
    at: Instant,
    /// `removed_total` as read then, trusted or not.
    removed_then: u64,
    /// The most the depth could have been then.
    depth: u64,
    /// What our runs had removed by then; `None` when untrusted (the first
    /// reading, taken while a run removed): removals credited later may
    /// already be missing from its depth, so credits cannot count.
    removed_total: Option<u64>,
}

impl ArrivalCounter {
    /// Arrivals since the previous reading (the first is the baseline).
    fn observe(&mut self, r: DepthReading) -> Counted {
        self.credits.push_back((r.at, r.removed_total));
        // None: the clock (since boot) is younger than the lag, so no credit
        // is old enough yet.
        let shown_since = r.at.checked_sub(r.lag);
        let old_enough = |at: Instant| shown_since.is_some_and(|since| at <= since);
        // Keep the newest pair old enough to show in the depth, and after it.
        while self.credits.get(1).is_some_and(|&(at, _)| old_enough(at)) {
            self.credits.pop_front();
        }
        let shown = match self.credits.front() {
            Some(&(at, removed)) if old_enough(at) => Some(removed),
            _ => None,
        };
        let trusted = !r.removing && shown == Some(r.removed_total);
        // A message counted twice is leased or released between SQS's two
        // counts, so it is in the in-flight count read.
        let excess = if r.removing { r.in_flight.unwrap_or(0) } else { 0 };
        // Only removals of ours since the base can have hidden arrivals from
        // earlier polls; without any, what this reading proves beyond the
        // last came since the last.
        let since = match self.base {
            Some(base) if base.removed_then != r.removed_total => Some(base.at),
            _ => self.previous,
        };
        self.previous = Some(r.at);
        let new = match self.base {
            None => 0,
            Some(base) => {
                let floor = r.depth.saturating_sub(excess);
                let removed = match (base.removed_total, shown) {
                    (Some(then), Some(now)) => now.saturating_sub(then),
                    _ => 0,
                };
                let proven = (floor + removed).saturating_sub(base.depth);
                let new = proven.saturating_sub(self.counted);
                self.counted += new;
                new
            }
        };
        if trusted {
            self.base = Some(Base {
                at: r.at,
                removed_then: r.removed_total,
                depth: r.depth,
                removed_total: Some(r.removed_total),
            });
            self.counted = 0;
        } else if self.base.is_none() {
            self.base = Some(Base {
                at: r.at,
                removed_then: r.removed_total,
                depth: r.depth + excess,
                removed_total: None,
            });
        }
        Counted { arrivals: new, since }
    }
}

/// Fill in the oldest age when the sample is the whole queue: its oldest
/// message is the queue's oldest (and an empty queue's oldest age is zero).
/// That beats an age minutes late (SQS's from CloudWatch).
fn with_known_age(mut stats: DlqStats, sample: Option<&[SampledMessage]>, now: DateTime<Utc>) -> DlqStats {
    if stats.depth == 0 {
        stats.take_whole_browse_age(0, Some(Duration::ZERO));
    } else if let Some(msgs) = sample {
        let oldest = msgs.iter().filter_map(|m| m.age(now)).max().unwrap_or_default();
        stats.take_whole_browse_age(msgs.len() as u64, Some(oldest));
    }
    stats
}

/// The queues in the order their polling loops start: the first queue of
/// each backend, then the second of each, and so on, each backend's in config
/// order. Connects wait in that order for the registry's few connect slots,
/// and the pod is ready once each backend has polled a queue: with the
/// config's order, a Pub/Sub queue listed after 980 SQS queues waited for all
/// of their connects (454 ms to ready at 1,000 queues).
fn interleaved_by_backend(queues: &[QueueConfig]) -> Vec<&QueueConfig> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut ranked: Vec<(usize, &QueueConfig)> = queues
        .iter()
        .map(|q| {
            let n = seen.entry(q.kind.backend_name()).or_default();
            *n += 1;
            (*n, q)
        })
        .collect();
    // Stable: equal ranks keep the config's order.
    ranked.sort_by_key(|&(rank, _)| rank);
    ranked.into_iter().map(|(_, q)| q).collect()
}

impl Poller {
    /// Spawn one polling loop per configured queue into `loops`. On `cancel`
    /// a loop ends after the poll it is in, whose reason sample stops reading
    /// and releases what it leased (dropped mid-read on SQS or Pub/Sub, it
    /// would leave those messages hidden for its hold).
    pub fn spawn_all(
        self: Arc<Self>,
        config: &Config,
        sample: usize,
        cancel: CancellationToken,
        loops: &mut tokio::task::JoinSet<()>,
    ) {
        for q in interleaved_by_backend(&config.queues) {
            let me = self.clone();
            let name = q.name.clone();
            let backend = q.kind.backend_name().to_string();
            let interval = q.poll_interval.unwrap_or(config.serve.poll_interval);
            let cancel = cancel.clone();
            // Stale from the start until the first poll succeeds.
            self.metrics.set_last_success(&name, &backend, None);
            self.metrics.init_queue(&name, &backend);
            loops.spawn(async move { me.run(name, backend, interval, sample, cancel).await });
        }
    }

    async fn run(&self, queue: String, backend: String, interval: Duration, sample: usize, cancel: CancellationToken) {
        let mut arrivals_counter = ArrivalCounter::default();
        let mut errors: u32 = 0;
        loop {
            let polled = self.poll_once(&queue, &backend, sample, &cancel).await;
            if cancel.is_cancelled() {
                return;
            }
            let wait = match polled {
                Ok(polled) => {
                    errors = 0;
                    let counted = arrivals_counter.observe(DepthReading {
                        at: polled.at,
                        depth: polled.stats.depth,
                        in_flight: polled.stats.in_flight,
                        removed_total: polled.removed_total,
                        removing: polled.removing,
                        lag: depth_lag(polled.stats.exactness),
                    });
                    let now = Utc::now();
                    let arrivals = counted.arrivals;
                    let arrivals_since = counted
                        .since
                        .and_then(|at| chrono::Duration::from_std(at.elapsed()).ok())
                        .map(|ago| now - ago);
                    let stats = with_known_age(polled.stats, polled.sample.as_deref(), now);
                    self.record_ok(&queue, &backend, &stats, polled.sample.as_deref(), arrivals, now)
                        .await;
                    let _ = self
                        .results
                        .send(PollResult {
                            queue: queue.clone(),
                            backend: backend.clone(),
                            at: now,
                            stats,
                            arrivals,
                            arrivals_since,
                            sample: polled.sample,
                        })
                        .await;
                    interval
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    tracing::warn!(%queue, error = %e, attempt = errors, "poll failed");
                    self.metrics.poll_error(&queue, &backend);
                    self.record_err(&queue, &backend, e).await;
                    backoff(interval, errors)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// One poll. Shutdown (`cancel`) cuts it short anywhere but in its
    /// reason sample, which releases what it leased before it returns.
    async fn poll_once(
        &self,
        queue: &str,
        backend: &str,
        sample: usize,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Polled> {
        let stopped = || anyhow::anyhow!("shutting down");
        let b = tokio::select! {
            b = self.registry.backend(queue) => b?,
            _ = cancel.cancelled() => return Err(stopped()),
        };
        tokio::select! {
            _ = self.limits.wait(backend) => {}
            _ = cancel.cancelled() => return Err(stopped()),
        }
        // Read before the stats: a removal credited by then shows in the
        // depth, so the credit is never ahead of the depth (it can lag, see
        // `ArrivalCounter`).
        let at = Instant::now();
        let removed_total = self.cache.removed_total(queue);
        let stats = tokio::select! {
            stats = b.stats() => stats?,
            _ = cancel.cancelled() => return Err(stopped()),
        };
        let removing = self.cache.removing(queue, removed_total);
        let msgs = if sample > 0 && stats.depth > 0 {
            // Reading leases on SQS and Pub/Sub: never while a run is active
            // on the queue (it would find the queue empty and stop early).
            let guard = if b.capabilities().true_peek {
                None
            } else {
                match self.locks.try_read(queue) {
                    Some(g) => Some(g),
                    None => {
                        tracing::debug!(%queue, "a run or read is active on the queue: reason sample skipped");
                        return Ok(Polled {
                            at,
                            stats,
                            removed_total,
                            removing,
                            sample: None,
                        });
                    }
                }
            };
            tokio::select! {
                _ = self.limits.wait(backend) => {}
                _ = cancel.cancelled() => return Err(stopped()),
            }
            let mut msgs = Vec::new();
            // On shutdown the sample stops at the next message and releases
            // what it leased: read to its end first, a sample of hundreds on
            // a slow endpoint outlasted the shutdown grace and left them
            // hidden for the hold.
            b.peek_each(sample, &mut |m| {
                msgs.push(SampledMessage::new(m));
                !cancel.is_cancelled()
            })
            .await?;
            drop(guard);
            msgs
        } else {
            Vec::new()
        };
        Ok(Polled {
            at,
            stats,
            removed_total,
            removing,
            sample: Some(msgs),
        })
    }

    async fn record_ok(
        &self,
        queue: &str,
        backend: &str,
        stats: &DlqStats,
        sample: Option<&[SampledMessage]>,
        arrivals: u64,
        now: DateTime<Utc>,
    ) {
        self.cache.record_depth(queue, now, stats.depth);
        self.metrics
            .set_depth(queue, backend, stats.depth, stats.oldest_age.map(|d| d.as_secs_f64()));
        self.metrics.add_arrivals(queue, backend, arrivals);
        self.metrics.set_last_success(queue, backend, Some(now));
        let mut all = self.cache.statuses.write().await;
        let previous = all.get(queue);
        let (top, sampled) = match sample {
            Some(msgs) => {
                let top = reason_counts(msgs.iter().map(|m| &**m));
                if !msgs.is_empty() || stats.depth == 0 {
                    self.metrics.set_reasons(queue, &top);
                }
                (top.into_iter().take(5).collect(), msgs.len())
            }
            // Skipped: the previous sample's reasons stand.
            None => previous.map_or((Vec::new(), 0), |p| (p.top_reasons.clone(), p.sampled)),
        };
        all.insert(
            queue.to_string(),
            QueueStatus {
                queue: queue.to_string(),
                backend: backend.to_string(),
                stats: Some(stats.clone()),
                sampled,
                top_reasons: top,
                polled_at: Some(now),
                last_success_at: Some(now),
                error: None,
            },
        );
    }

    async fn record_err(&self, queue: &str, backend: &str, e: anyhow::Error) {
        let mut all = self.cache.statuses.write().await;
        let entry = all.entry(queue.to_string()).or_insert_with(|| QueueStatus {
            queue: queue.to_string(),
            backend: backend.to_string(),
            stats: None,
            top_reasons: Vec::new(),
            sampled: 0,
            polled_at: None,
            last_success_at: None,
            error: None,
        });
        entry.polled_at = Some(Utc::now());
        entry.error = Some(format!("{e:#}"));
    }
}

/// Reasons in a sample with their counts, most frequent first.
pub fn reason_counts<'a>(msgs: impl IntoIterator<Item = &'a DlqMessage>) -> Vec<(String, u64)> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for m in msgs {
        *counts
            .entry(m.reason.clone().unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(depth: u64) -> DlqStats {
        DlqStats {
            depth,
            in_flight: None,
            oldest_age: None,
            exactness: Exactness::Approximate,
            oldest_age_exactness: None,
        }
    }

    fn msg(age_secs: i64, now: DateTime<Utc>) -> DlqMessage {
        DlqMessage {
            id: format!("m{age_secs}"),
            body: bytes::Bytes::new(),
            attributes: Default::default(),
            properties: Default::default(),
            reason: None,
            description: None,
            delivery_count: None,
            enqueued_at: Some(now - chrono::Duration::seconds(age_secs)),
            source: None,
            ordering_key: None,
        }
    }

    #[test]
    fn polling_starts_with_the_first_queue_of_each_backend() {
        let yaml = "queues:
  - {name: s1, sqs: {queue: a}}
  - {name: s2, sqs: {queue: b}}
  - {name: s3, sqs: {queue: c}}
  - {name: p1, pubsub: {project: p, subscription: x}}
  - {name: b1, servicebus: {connection_string_env: CS, queue: y}}
  - {name: p2, pubsub: {project: p, subscription: z}}
";
        let config = Config::from_yaml(yaml, "t.yaml", &[]).unwrap();
        let order: Vec<&str> = interleaved_by_backend(&config.queues)
            .iter()
            .map(|q| q.name.as_str())
            .collect();
        assert_eq!(order, ["s1", "p1", "b1", "s2", "p2", "s3"]);
    }

    #[test]
    fn backends_whose_polls_ask_for_more_than_their_limit_are_named() {
        // 3 Service Bus queues every second (3 calls/s) against a limit of 2;
        // 4 SQS queues every 30 s and one every second (1.13 calls/s) against 20.
        let mut yaml = String::from(
            "serve:\n  admin_calls_per_second: {servicebus: 2}\nqueues:\n  - {name: s0, poll_interval: 1s, sqs: {queue: q}}\n",
        );
        for i in 1..5 {
            yaml.push_str(&format!("  - {{name: s{i}, sqs: {{queue: q{i}}}}}\n"));
        }
        for i in 0..3 {
            yaml.push_str(&format!(
                "  - {{name: b{i}, poll_interval: 1s, servicebus: {{connection_string_env: CS, queue: q{i}}}}}\n"
            ));
        }
        let config = Config::from_yaml(&yaml, "t.yaml", &[]).unwrap();
        let limits = AdminLimits::new(&config.serve.admin_calls_per_second);
        let over = limits.overloaded(&config);
        assert_eq!(over.len(), 1, "{over:?}");
        assert_eq!(over[0].backend, "servicebus");
        assert_eq!((over[0].queues, over[0].limit), (3, 2));
        assert!((over[0].calls_per_second - 3.0).abs() < 1e-9);
        assert_eq!(over[0].round, Duration::from_millis(1500));
    }

    /// Callers get through in the order they asked, whatever order their
    /// waits would end in: without the turn, later callers overtake earlier
    /// ones (the limiter lets whichever wakes first through).
    #[tokio::test]
    async fn admin_calls_are_served_in_the_order_asked() {
        let limits = Arc::new(AdminLimits::new(&AdminCallLimits {
            sqs: 50,
            pubsub: 1,
            servicebus: 1,
        }));
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..120 {
            let (limits, served) = (limits.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                limits.wait("sqs").await;
                served.lock().unwrap().push(i);
            }));
            // On this one-thread runtime the caller runs up to its wait
            // here, before the next one starts.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let served = served.lock().unwrap();
        assert!(
            served.windows(2).all(|w| w[0] < w[1]),
            "served out of order: {served:?}"
        );
    }

    #[test]
    fn the_age_a_whole_sample_shows_is_the_one_polls_carry() {
        let now = Utc::now();
        let sample = [msg(30, now), msg(700, now)].map(SampledMessage::new);
        let s = with_known_age(stats(2), Some(&sample), now);
        assert_eq!(s.oldest_age, Some(Duration::from_secs(700)));
        // Part of the queue only: a floor, said to be one (the queue holds a
        // message that old); the age was unknown, and its gauge froze.
        let part = with_known_age(stats(3), Some(&sample), now);
        assert_eq!(part.oldest_age, Some(Duration::from_secs(700)));
        assert_eq!(part.age_exactness(), Exactness::AtLeast);
        // A skipped sample tells nothing; an empty queue has no old message.
        assert_eq!(with_known_age(stats(2), None, now).oldest_age, None);
        assert_eq!(with_known_age(stats(0), None, now).oldest_age, Some(Duration::ZERO));
        // The provider's own figure is kept.
        let mut given = stats(2);
        given.oldest_age = Some(Duration::from_secs(5));
        assert_eq!(
            with_known_age(given.clone(), Some(&sample), now).oldest_age,
            Some(Duration::from_secs(5))
        );
        // ... unless it is minutes late (CloudWatch) while the depth is not.
        given.oldest_age_exactness = Some(Exactness::Lagged);
        let s = with_known_age(given.clone(), Some(&sample), now);
        assert_eq!(
            (s.oldest_age, s.oldest_age_exactness),
            (Some(Duration::from_secs(700)), None)
        );
        assert_eq!(
            with_known_age(given.clone(), None, now).oldest_age_exactness,
            Some(Exactness::Lagged)
        );
        // Lagged throughout (Pub/Sub on GCP): the depth cannot tell a whole sample.
        given.exactness = Exactness::Lagged;
        given.oldest_age_exactness = None;
        assert_eq!(
            with_known_age(given, Some(&sample), now).oldest_age,
            Some(Duration::from_secs(5))
        );
    }

    /// Readings a second apart, from a fixed start.
    struct Readings {
        start: Instant,
        lag: Duration,
        counter: ArrivalCounter,
    }

    impl Readings {
        fn new(lag: Duration) -> Self {
            Self {
                start: Instant::now(),
                lag,
                counter: ArrivalCounter::default(),
            }
        }

        /// Arrivals counted at second `t`.
        fn at(&mut self, t: u64, depth: u64, in_flight: u64, removed_total: u64, removing: bool) -> u64 {
            self.counted_at(t, depth, in_flight, removed_total, removing).arrivals
        }

        fn counted_at(&mut self, t: u64, depth: u64, in_flight: u64, removed_total: u64, removing: bool) -> Counted {
            self.counter.observe(DepthReading {
                at: self.start + Duration::from_secs(t),
                depth,
                in_flight: Some(in_flight),
                removed_total,
                removing,
                lag: self.lag,
            })
        }
    }

    #[test]
    fn removals_are_credited_as_runs_settle_and_once() {
        let cache = StatusCache::default();
        let progress = Arc::new(Progress::default());
        let mut r = Readings::new(Duration::ZERO);
        let mut poll = |t, depth| {
            let removed = cache.removed_total("q");
            let removing = cache.removing("q", removed);
            r.at(t, depth, 0, removed, removing)
        };
        // Poll 1: 10 messages, nothing removed yet: the baseline.
        assert_eq!(poll(0, 10), 0);
        cache.run_started("q", "run-1", progress.clone());
        // The run settles 4 before poll 2, which sees depth 6: no arrival.
        progress.settled.fetch_add(4, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(poll(1, 6), 0);
        // It settles 6 more and ends (its summary says 10) before poll 3,
        // which sees depth 2: the 2 new ones are the only arrivals.
        progress.settled.fetch_add(6, std::sync::atomic::Ordering::Relaxed);
        cache.run_finished("q", "run-1", 10);
        assert_eq!(cache.removed_total("q"), 10);
        assert_eq!(poll(2, 2), 2);
        // Nothing changes: nothing arrived (the finished run is not counted again).
        assert_eq!(poll(3, 2), 0);
        // A burst of 5 drained by a retention purge between two polls still counts.
        cache.note_removed("q", 5);
        assert_eq!(poll(4, 2), 5);
    }

    /// SQS counts visible and in-flight messages in two reads: while a run
    /// leases and releases, a reading can count up to the in-flight messages
    /// twice. That excess is no arrival, and it costs no real arrival later.
    #[test]
    fn messages_counted_twice_while_a_run_leases_are_no_arrivals() {
        let mut r = Readings::new(Duration::ZERO);
        assert_eq!(r.at(0, 300, 0, 0, false), 0);
        // 80 leased, 8 of them counted twice, 20 removed and credited.
        assert_eq!(r.at(1, 288, 80, 20, true), 0);
        // 80 more leased, 80 more removed; 3 arrived, not proven while
        // 80 are in flight.
        assert_eq!(r.at(2, 203, 80, 100, true), 0);
        // Non-matches released at the end of the pass: 10 counted twice.
        assert_eq!(r.at(3, 213, 80, 100, true), 0);
        // The run is done: the 3 arrivals count, once.
        assert_eq!(r.at(4, 203, 0, 100, false), 3);
        // Then 4 arrive.
        assert_eq!(r.at(5, 207, 0, 100, false), 4);
    }

    #[test]
    fn a_removal_seen_before_it_is_credited_is_no_arrival_when_credited() {
        let mut r = Readings::new(Duration::ZERO);
        assert_eq!(r.at(0, 300, 0, 0, false), 0);
        // A batch of 10 is deleted but not credited yet when poll 2 reads.
        assert_eq!(r.at(1, 290, 0, 0, true), 0);
        // Poll 3: the late 10 plus 90 more credited, and 3 real arrivals.
        assert_eq!(r.at(2, 203, 0, 100, true), 3);
        assert_eq!(r.at(3, 203, 0, 100, false), 0);
        // A removal never credited (a CLI run elsewhere) costs no arrivals
        // later: 4 arrive after 50 went.
        assert_eq!(r.at(4, 153, 0, 100, false), 0);
        assert_eq!(r.at(5, 157, 0, 100, false), 4);
    }

    /// Arrivals that outpace a run count while it runs; those it hides by
    /// removing faster count once it is done.
    #[test]
    fn arrivals_during_a_run_count_when_proven() {
        let mut r = Readings::new(Duration::ZERO);
        assert_eq!(r.at(0, 100, 0, 0, false), 0);
        // 10 removed, 30 arrived: the depth proves 20 of them (10 may be
        // counted twice, in flight).
        assert_eq!(r.at(1, 120, 10, 10, true), 20);
        // 50 more removed, 5 arrived: 5 more proven.
        assert_eq!(r.at(2, 75, 10, 60, true), 5);
        // Done: the 10 left of the 35 count now, as arrivals since the
        // reading before the run (growth spreads them over that time).
        let done = r.counted_at(3, 75, 0, 60, false);
        assert_eq!(done.arrivals, 10);
        assert_eq!(done.since, Some(r.start));
        // From then on, since the previous poll.
        assert_eq!(
            r.counted_at(4, 77, 0, 60, false).since,
            Some(r.start + Duration::from_secs(3))
        );
    }

    /// A purge that starts with `serve` (a retention policy) deletes while
    /// the first poll reads: its baseline depth may already lack messages
    /// credited only at the next poll, and those are no arrivals.
    #[test]
    fn a_baseline_read_during_a_run_counts_no_late_credits_as_arrivals() {
        let mut r = Readings::new(Duration::ZERO);
        // 300 in the DLQ; 7 deleted, none credited yet, when the baseline
        // reads; 10 in flight.
        assert_eq!(r.at(0, 293, 10, 0, true), 0);
        // 100 more deleted: 107 credited now.
        assert_eq!(r.at(1, 193, 10, 107, true), 0);
        // 140 arrive while the purge goes on: the depth alone proves 20.
        assert_eq!(r.at(2, 333, 10, 107, true), 20);
        // Done: from now on, counted as usual.
        assert_eq!(r.at(3, 20, 0, 400, false), 0);
        assert_eq!(r.at(4, 22, 0, 400, false), 2);
        // A baseline with no run about keeps nothing back.
        let mut r = Readings::new(Duration::ZERO);
        assert_eq!(r.at(0, 10, 0, 0, false), 0);
        assert_eq!(r.at(1, 10, 0, 3, false), 3);
    }

    /// Pub/Sub's backlog from Cloud Monitoring shows removals minutes late:
    /// a redrive's credits are no arrivals while the depth has not caught up.
    #[test]
    fn credits_a_lagging_depth_does_not_show_yet_are_no_arrivals() {
        let mut r = Readings::new(Duration::from_secs(180));
        assert_eq!(r.at(0, 1000, 0, 0, false), 0);
        // A redrive removes all 1,000 within the minute; the depth still
        // says 1,000 for a while, then falls.
        assert_eq!(r.at(60, 1000, 0, 1000, false), 0);
        assert_eq!(r.at(120, 1000, 0, 1000, false), 0);
        assert_eq!(r.at(180, 400, 0, 1000, false), 0);
        assert_eq!(r.at(240, 0, 0, 1000, false), 0);
        // The credits show by now: 5 arrivals count.
        assert_eq!(r.at(300, 5, 0, 1000, false), 5);
        assert_eq!(r.at(360, 5, 0, 1000, false), 0);
        // With no run about, a rise counts at once.
        assert_eq!(r.at(420, 12, 0, 1000, false), 7);
    }

    /// Until a lagging depth has been read for its lag, no reading is
    /// trusted; with no run of ours about, a rise still came since the
    /// previous poll, not since the first (growth would spread it thin).
    #[test]
    fn arrivals_of_an_untrusted_reading_with_no_run_came_since_the_previous_poll() {
        let mut r = Readings::new(Duration::from_secs(180));
        assert_eq!(r.counted_at(0, 10, 0, 0, false).since, None);
        let start = r.start;
        let at = |t| Some(start + Duration::from_secs(t));
        assert_eq!(
            r.counted_at(60, 10, 0, 0, false),
            Counted {
                arrivals: 0,
                since: at(0)
            }
        );
        assert_eq!(
            r.counted_at(120, 16, 0, 0, false),
            Counted {
                arrivals: 6,
                since: at(60)
            }
        );
        // A run removes 16 (credited) and 3 arrive: hidden, from the base on.
        assert_eq!(
            r.counted_at(150, 3, 0, 16, false),
            Counted {
                arrivals: 0,
                since: at(0)
            }
        );
    }

    #[test]
    fn a_finished_run_counts_at_least_what_its_progress_showed() {
        let cache = StatusCache::default();
        let progress = Arc::new(Progress::default());
        cache.run_started("q", "r", progress.clone());
        progress.settled.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        // A run that failed reports no summary: its progress stands.
        cache.run_finished("q", "r", 0);
        assert_eq!(cache.removed_total("q"), 3);
        assert_eq!(cache.removed_total("other"), 0);
    }

    #[test]
    fn backoff_doubles_from_at_least_a_second_up_to_the_cap() {
        assert_eq!(backoff(Duration::from_secs(30), 1), Duration::from_secs(60));
        assert_eq!(backoff(Duration::from_secs(30), 20), MAX_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, 1), Duration::from_secs(2));
        assert_eq!(backoff(Duration::from_secs(600), 3), Duration::from_secs(600));
    }
}
