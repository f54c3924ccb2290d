//! The stats poller of `serve`: one loop per queue polls depth, age and a
//! reason sample, caches the result for the API, updates the metrics and
//! hands each poll to the alert evaluator.
//!
//! Admin calls are rate-limited per backend kind (Service Bus throttles its
//! management API hard), and a failing queue backs off exponentially.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::{RwLock, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{AdminCallLimits, Config};
use crate::engine::registry::Registry;
use crate::model::{DlqMessage, DlqStats};
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
    pub error: Option<String>,
}

/// One poll, handed to the alert evaluator.
#[derive(Debug, Clone)]
pub struct PollResult {
    pub queue: String,
    pub backend: String,
    pub at: DateTime<Utc>,
    pub stats: DlqStats,
    /// Messages that arrived since the previous poll.
    pub arrivals: u64,
    /// The sampled messages (empty when sampling is off).
    pub sample: Vec<DlqMessage>,
}

/// Shared between pollers, the API and redrive runs.
#[derive(Default)]
pub struct StatusCache {
    statuses: RwLock<HashMap<String, QueueStatus>>,
    /// Messages our own redrives removed since the last poll, per queue, so
    /// that arrivals count a burst drained between two polls.
    removed: std::sync::Mutex<HashMap<String, Arc<AtomicU64>>>,
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

    /// Whether every one of `queues` has been polled at least once (whatever
    /// the result: a provider outage must not take the pod out of service).
    pub async fn all_polled(&self, queues: &[String]) -> bool {
        let s = self.statuses.read().await;
        queues.iter().all(|q| s.get(q).is_some_and(|st| st.polled_at.is_some()))
    }

    fn removed_counter(&self, queue: &str) -> Arc<AtomicU64> {
        self.removed
            .lock()
            .expect("cache lock")
            .entry(queue.to_string())
            .or_default()
            .clone()
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

    /// Record messages a redrive removed from `queue`.
    pub fn note_removed(&self, queue: &str, n: u64) {
        self.removed_counter(queue).fetch_add(n, Ordering::Relaxed);
    }
}

/// A per-backend-kind limiter on admin calls.
pub struct AdminLimits {
    limiters: HashMap<&'static str, DefaultDirectRateLimiter>,
}

impl AdminLimits {
    pub fn new(cfg: &AdminCallLimits) -> Self {
        let mk = |n: u32| RateLimiter::direct(Quota::per_second(NonZeroU32::new(n.max(1)).expect("at least 1")));
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
            l.until_ready().await;
        }
    }
}

pub struct Poller {
    pub registry: Arc<Registry>,
    pub cache: Arc<StatusCache>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<AdminLimits>,
    pub results: mpsc::Sender<PollResult>,
}

impl Poller {
    /// Spawn one polling loop per configured queue.
    pub fn spawn_all(self: Arc<Self>, config: &Config, sample: usize, cancel: CancellationToken) {
        for q in &config.queues {
            let me = self.clone();
            let name = q.name.clone();
            let backend = q.kind.backend_name().to_string();
            let interval = q.poll_interval.unwrap_or(config.serve.poll_interval);
            let cancel = cancel.clone();
            tokio::spawn(async move { me.run(name, backend, interval, sample, cancel).await });
        }
    }

    async fn run(&self, queue: String, backend: String, interval: Duration, sample: usize, cancel: CancellationToken) {
        let mut prev_depth: Option<u64> = None;
        let mut errors: u32 = 0;
        let removed = self.cache.removed_counter(&queue);
        loop {
            let wait = match self.poll_once(&queue, &backend, sample).await {
                Ok((stats, msgs)) => {
                    errors = 0;
                    let removed_now = removed.swap(0, Ordering::Relaxed);
                    let arrivals = match prev_depth {
                        Some(p) => (stats.depth + removed_now).saturating_sub(p),
                        None => 0,
                    };
                    prev_depth = Some(stats.depth);
                    self.record_ok(&queue, &backend, &stats, &msgs, arrivals).await;
                    let _ = self
                        .results
                        .send(PollResult {
                            queue: queue.clone(),
                            backend: backend.clone(),
                            at: Utc::now(),
                            stats,
                            arrivals,
                            sample: msgs,
                        })
                        .await;
                    interval
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    tracing::warn!(%queue, error = %e, attempt = errors, "poll failed");
                    self.metrics.poll_error(&queue, &backend);
                    self.record_err(&queue, &backend, e).await;
                    interval
                        .saturating_mul(1 << errors.min(8))
                        .min(MAX_BACKOFF.max(interval))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    async fn poll_once(
        &self,
        queue: &str,
        backend: &str,
        sample: usize,
    ) -> anyhow::Result<(DlqStats, Vec<DlqMessage>)> {
        let b = self.registry.backend(queue).await?;
        self.limits.wait(backend).await;
        let stats = b.stats().await?;
        let msgs = if sample > 0 && stats.depth > 0 {
            self.limits.wait(backend).await;
            b.peek(sample).await?
        } else {
            Vec::new()
        };
        Ok((stats, msgs))
    }

    async fn record_ok(&self, queue: &str, backend: &str, stats: &DlqStats, msgs: &[DlqMessage], arrivals: u64) {
        let mut stats = stats.clone();
        let now = Utc::now();
        // When the sample is the whole queue, its oldest message is the
        // queue's oldest (and an empty queue's oldest age is zero).
        if stats.oldest_age.is_none() && msgs.len() as u64 >= stats.depth {
            stats.oldest_age = Some(msgs.iter().filter_map(|m| m.age(now)).max().unwrap_or_default());
        }
        let top = reason_counts(msgs);
        self.cache.record_depth(queue, now, stats.depth);
        self.metrics
            .set_depth(queue, backend, stats.depth, stats.oldest_age.map(|d| d.as_secs_f64()));
        self.metrics.add_arrivals(queue, backend, arrivals);
        if !msgs.is_empty() || stats.depth == 0 {
            self.metrics.set_reasons(queue, &top);
        }
        self.cache.statuses.write().await.insert(
            queue.to_string(),
            QueueStatus {
                queue: queue.to_string(),
                backend: backend.to_string(),
                stats: Some(stats),
                sampled: msgs.len(),
                top_reasons: top.into_iter().take(5).collect(),
                polled_at: Some(now),
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
            error: None,
        });
        entry.polled_at = Some(Utc::now());
        entry.error = Some(format!("{e:#}"));
    }
}

/// Reasons in a sample with their counts, most frequent first.
pub fn reason_counts(msgs: &[DlqMessage]) -> Vec<(String, u64)> {
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
