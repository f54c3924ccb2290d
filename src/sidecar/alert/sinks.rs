//! Notification sinks: a generic JSON webhook, Slack incoming webhooks and
//! Alertmanager's v2 API.
//!
//! Each sink has its own task and bounded queue: a slow or failing sink is
//! retried with backoff without ever blocking polling. When its queue is
//! full, room is made by dropping what matters least ([`make_room`]): a
//! queued firing notice that a later notice of the same alert supersedes,
//! else the oldest of the least important notices (Alertmanager re-sends,
//! then firing notices, then resolves). A resolve is never dropped while a
//! firing notice could go instead: a lost resolve leaves the alert open in
//! chat and at the receiver for good. Every drop is counted in
//! `dlq_bridge_notifications_total` and logged with the alert's name. On
//! shutdown, `serve` gives what is queued or being retried a bounded time to
//! go out ([`Sinks::flush`]): an alert that fired just before a rollout is
//! not lost with the pod.
//!
//! A request that fails (408, 429, 5xx, or its answer lost) is sent again,
//! the same: receivers drop a duplicate by the notification's ID
//! ([`Notification::id`]), in the webhook body and in the `Idempotency-Key`
//! header of webhook and Alertmanager requests.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;

use super::{Notification, Status};
use crate::config::{SinkConfig, SinkKind as Kind};
use crate::sidecar::metrics::Metrics;

const QUEUE_DEPTH: usize = 256;
/// Alerts per Alertmanager request when firing alerts are re-sent.
const RESEND_CHUNK: usize = 100;
/// Attempts per notification: 1, 2, 4, 8, 16 s apart, then every 30 s, about
/// two minutes in all, so that a receiver's restart or a short outage does
/// not lose a resolve (sent once) or a new failure reason (announced once).
const ATTEMPTS: u32 = 9;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured: a sink asking for more is retried
/// sooner (and, if still refusing, counted failed) rather than holding every
/// notification behind it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Slack takes about one message a second per incoming webhook and answers
/// a burst with 429: requests to one Slack sink go at most this often.
const SLACK_SPACING: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("alerts.sinks[{index}]: environment variable {var} is not set")]
    MissingEnv { index: usize, var: String },
    #[error("alerts.sinks[{index}]: environment variable {var}: {message}")]
    BadUrl { index: usize, var: String, message: String },
}

struct Sink {
    kind: Kind,
    url: String,
    labels: BTreeMap<String, String>,
}

/// One request's notifications: one, or several in one Alertmanager array.
type Request = Arc<Vec<Notification>>;

/// One sink's bounded queue, shared with its delivery task.
struct SinkQueue {
    /// The kind and its index in `alerts.sinks` (`webhook-0`), never the
    /// URL: webhook URLs can carry secrets. The logs' and metrics' name.
    name: String,
    kind: Kind,
    items: Mutex<VecDeque<Request>>,
    ready: Notify,
    /// Every `Sinks` handle is gone: the task ends once the queue is empty.
    closed: AtomicBool,
}

impl SinkQueue {
    fn new(name: String, kind: Kind) -> Self {
        Self {
            name,
            kind,
            items: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// The next request, waiting for one; `None` once closed and empty.
    async fn next(&self) -> Option<Request> {
        loop {
            if let Some(item) = self.items.lock().expect("sink queue lock").pop_front() {
                return Some(item);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            // `notify_one` keeps a permit when nobody waits: a push between
            // the check above and this wait is not missed.
            self.ready.notified().await;
        }
    }
}

/// Hands notifications to every sink's task.
#[derive(Clone, Default)]
pub struct Sinks {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    queues: Vec<Arc<SinkQueue>>,
    pending: Arc<Pending>,
    metrics: Arc<Metrics>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for q in &self.queues {
            q.closed.store(true, Ordering::SeqCst);
            q.ready.notify_one();
        }
    }
}

/// Notifications queued or being delivered, over all sinks.
#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    idle: Notify,
}

impl Pending {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// One notification delivered, refused or given up on.
    fn done(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// How much a request matters, least first: Alertmanager re-sends of alerts
/// it already has (0), firing notices (1), resolves (2).
fn importance(item: &[Notification]) -> u8 {
    if item.iter().any(|n| n.status == Status::Resolved) {
        2
    } else if item.iter().all(|n| n.quiet) {
        0
    } else {
        1
    }
}

/// The same alert, in the same episode: a resolve or a repeat of it makes a
/// queued firing notice of it redundant.
fn same_alert(a: &Notification, b: &Notification) -> bool {
    a.rule == b.rule && a.queue == b.queue && a.kind == b.kind && a.reason == b.reason && a.started_at == b.started_at
}

/// The queued request to drop to make room for `new` in a full queue, with
/// its outcome for the metrics; `None` to drop `new` itself.
///
/// A queued firing notice of the alert `new` is about goes first: its resolve
/// or its repeat says all it said (`superseded`). Else the oldest of the
/// least important requests ([`importance`]), unless `new` matters less than
/// all of them (`dropped`). So a resolve goes only when the queue holds
/// nothing but resolves.
fn make_room(queued: &VecDeque<Request>, new: &[Notification]) -> Option<(usize, &'static str)> {
    if let [n] = new {
        let stale = queued
            .iter()
            .position(|q| matches!(&q[..], [o] if o.status == Status::Firing && same_alert(o, n)));
        if let Some(i) = stale {
            return Some((i, "superseded"));
        }
    }
    let (i, least) = queued
        .iter()
        .enumerate()
        .map(|(i, q)| (i, importance(q)))
        .min_by_key(|&(i, rank)| (rank, i))?;
    (least <= importance(new)).then_some((i, "dropped"))
}

impl Sinks {
    /// Resolve the sinks' URLs and start one delivery task per sink, which
    /// counts its outcomes in `metrics`.
    pub fn start(configs: &[SinkConfig], metrics: Arc<Metrics>) -> Result<Self, SinkError> {
        let client = reqwest::Client::builder()
            // A redirect is not followed: reqwest turns a POST redirected by
            // 301/302/303 into a GET without its body, which a receiver
            // answers 200, and the notification counted delivered was lost.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client with default TLS settings");
        let pending = Arc::new(Pending::default());
        let mut queues = Vec::new();
        for (index, cfg) in configs.iter().enumerate() {
            let (kind, target) = cfg.target().expect("validated when the config was loaded");
            let url = match (&target.url, &target.url_env) {
                (Some(u), _) => u.clone(),
                (None, Some(var)) => {
                    let url = std::env::var(var).map_err(|_| SinkError::MissingEnv {
                        index,
                        var: var.clone(),
                    })?;
                    // Checked like `url` is at load; the message leaves the
                    // URL out (it can carry a secret).
                    crate::config::check_sink_url(&url).map_err(|_| SinkError::BadUrl {
                        index,
                        var: var.clone(),
                        message: "does not hold an http:// or https:// URL with a host".into(),
                    })?;
                    url.trim().to_string()
                }
                (None, None) => unreachable!("validated when the config was loaded"),
            };
            let sink = Sink {
                kind,
                url: match kind {
                    Kind::Alertmanager => alertmanager_endpoint(&url),
                    _ => url,
                },
                labels: target.labels.clone(),
            };
            let queue = Arc::new(SinkQueue::new(format!("{kind:?}-{index}").to_lowercase(), kind));
            metrics.init_sink(&queue.name);
            tokio::spawn(deliver(
                queue.clone(),
                sink,
                client.clone(),
                pending.clone(),
                metrics.clone(),
            ));
            queues.push(queue);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                queues,
                pending,
                metrics,
            }),
        })
    }

    /// Wait, at most `within`, until every notification handed over so far
    /// has been delivered or given up on. Returns how many were still out.
    pub async fn flush(&self, within: Duration) -> usize {
        let pending = &self.inner.pending;
        let wait = async {
            loop {
                let idle = pending.idle.notified();
                tokio::pin!(idle);
                // Registered before the count is read, so a `done` in between
                // is not missed.
                idle.as_mut().enable();
                if pending.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
        pending.count.load(Ordering::SeqCst)
    }

    pub fn send(&self, n: Notification) {
        let quiet = n.quiet;
        let item = Arc::new(vec![n]);
        for q in &self.inner.queues {
            if quiet && q.kind != Kind::Alertmanager {
                continue;
            }
            self.enqueue(q, item.clone());
        }
    }

    /// Firing alerts re-sent to keep them active: to the Alertmanager sinks
    /// only, many to a request. One request each would take a queue slot
    /// each, and with a few hundred alerts firing, the re-sends of every
    /// minute would fill the queue and push out the notices that matter.
    pub fn resend(&self, alerts: Vec<Notification>) {
        for chunk in alerts.chunks(RESEND_CHUNK) {
            let item = Arc::new(chunk.to_vec());
            for q in &self.inner.queues {
                if q.kind == Kind::Alertmanager {
                    self.enqueue(q, item.clone());
                }
            }
        }
    }

    fn enqueue(&self, q: &SinkQueue, item: Request) {
        let Inner { pending, metrics, .. } = &*self.inner;
        pending.add();
        let dropped = {
            let mut items = q.items.lock().expect("sink queue lock");
            if items.len() < QUEUE_DEPTH {
                items.push_back(item);
                None
            } else {
                match make_room(&items, &item) {
                    Some((i, outcome)) => {
                        let old = items.remove(i).expect("an index make_room found");
                        items.push_back(item);
                        Some((old, outcome))
                    }
                    None => Some((item, "dropped")),
                }
            }
        };
        q.ready.notify_one();
        if let Some((gone, outcome)) = dropped {
            pending.done();
            metrics.count_notifications(&q.name, outcome, gone.len());
            let n = &gone[0];
            tracing::warn!(sink = %q.name, rule = %n.rule, queue = %n.queue, status = ?n.status, alerts = gone.len(), outcome, "sink queue full; notification dropped");
        }
    }
}

async fn deliver(
    queue: Arc<SinkQueue>,
    sink: Sink,
    client: reqwest::Client,
    pending: Arc<Pending>,
    metrics: Arc<Metrics>,
) {
    let name = &queue.name;
    let mut last_request: Option<tokio::time::Instant> = None;
    while let Some(item) = queue.next().await {
        match sink.kind {
            // Alertmanager takes an array of alerts in one request.
            Kind::Alertmanager => {
                let alerts: Vec<serde_json::Value> = item
                    .iter()
                    .flat_map(|n| match payload(&sink, n) {
                        serde_json::Value::Array(a) => a,
                        one => vec![one],
                    })
                    .collect();
                let body = serde_json::Value::Array(alerts);
                let outcome = deliver_one(name, &sink, &client, &body, Some(&request_id(&item)), &item).await;
                metrics.count_notifications(name, outcome, item.len());
            }
            _ => {
                for n in item.iter() {
                    // Slack would take the header for nothing.
                    let key = (sink.kind == Kind::Webhook).then(|| n.id());
                    let body = payload(&sink, n);
                    if sink.kind == Kind::Slack {
                        if let Some(at) = last_request {
                            tokio::time::sleep_until(at + SLACK_SPACING).await;
                        }
                        last_request = Some(tokio::time::Instant::now());
                    }
                    let outcome =
                        deliver_one(name, &sink, &client, &body, key.as_deref(), std::slice::from_ref(n)).await;
                    metrics.count_notifications(name, outcome, 1);
                }
            }
        }
        pending.done();
    }
}

/// The `Idempotency-Key` of a request carrying `notes`: the notification's
/// own ID for one, one derived from all of theirs for several (re-sends to
/// Alertmanager), the same on every retry.
fn request_id(notes: &[Notification]) -> String {
    use sha2::{Digest, Sha256};
    match notes {
        [n] => n.id(),
        _ => {
            let mut hash = Sha256::new();
            for n in notes {
                hash.update(n.id().as_bytes());
            }
            hash.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// POST `body` (which carries `notes`, named in the logs) with retries, each
/// attempt the same request: the same body and `Idempotency-Key` (`key`).
async fn deliver_one(
    name: &str,
    sink: &Sink,
    client: &reqwest::Client,
    body: &serde_json::Value,
    key: Option<&str>,
    notes: &[Notification],
) -> &'static str {
    let n = &notes[0];
    let alerts = notes.len();
    for attempt in 1..=ATTEMPTS {
        let mut request = client.post(&sink.url).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let result = request.send().await;
        let mut asked_wait = None;
        match result {
            Ok(r) if r.status().is_success() => return "delivered",
            Ok(r) if r.status().is_redirection() => {
                // Its Location is left out of the log: it may carry the
                // same secret as the URL.
                let status = r.status();
                tracing::error!(sink = %name, %status, rule = %n.rule, queue = %n.queue, alerts, "sink answered with a redirect, which is not followed (a POST would arrive as a GET without its body); configure the URL it redirects to. Dropped");
                return "refused";
            }
            Ok(r) => {
                let status = r.status();
                asked_wait = retry_after(&r);
                // What the sink objects to: Slack's `invalid_payload` or
                // `no_service`, the label Alertmanager refuses.
                let said: String = r.text().await.unwrap_or_default().chars().take(200).collect();
                // The same request would be refused again: retrying it
                // only holds the notifications queued behind it.
                if status.is_client_error()
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                {
                    tracing::error!(sink = %name, %status, %said, rule = %n.rule, queue = %n.queue, alerts, "sink refused a notification; dropped without retrying");
                    return "refused";
                }
                tracing::warn!(sink = %name, %status, %said, attempt, "sink refused a notification");
            }
            Err(e) => tracing::warn!(sink = %name, error = %without_url(e, &sink.url), attempt, "sink unreachable"),
        }
        if attempt == ATTEMPTS {
            tracing::error!(sink = %name, rule = %n.rule, queue = %n.queue, alerts, "notification dropped after {ATTEMPTS} attempts");
        } else {
            tokio::time::sleep(backoff(attempt).max(asked_wait.unwrap_or_default())).await;
        }
    }
    "failed"
}

/// The wait after failed attempt `attempt` (from 1).
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.min(16))).min(MAX_BACKOFF)
}

/// The wait a 429 or 503 asks for in seconds (`Retry-After: 30`, as Slack
/// and Alertmanager's proxies send it), at most `MAX_RETRY_AFTER`.
fn retry_after(r: &reqwest::Response) -> Option<Duration> {
    let seconds: u64 = r
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// A reqwest error without its URL, which for Slack is a secret, but with its
/// causes (refused, timed out, DNS): reqwest's own text is only "error
/// sending request", which tells an operator nothing. The causes do not hold
/// the URL; it is scrubbed anyway, should a future version put it there.
fn without_url(e: reqwest::Error, url: &str) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    let bare = url.split(['?', '#']).next().unwrap_or(url);
    for secret in [url, bare] {
        if !secret.is_empty() {
            text = text.replace(secret, "<sink url>");
        }
    }
    text
}

/// Slack reads `<...>` as a link or a mention (`<!channel>` pages everyone)
/// and `&` as the start of an entity. Failure reasons are written by whatever
/// failed, so they are escaped as Slack asks, to show as written.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn payload(sink: &Sink, n: &Notification) -> serde_json::Value {
    match sink.kind {
        Kind::Webhook => {
            let mut v = serde_json::to_value(n).expect("notifications serialize");
            v["id"] = json!(n.id());
            if !sink.labels.is_empty() {
                v["labels"] = json!(sink.labels);
            }
            v
        }
        Kind::Slack => {
            let icon = match n.status {
                Status::Firing => ":rotating_light:",
                Status::Resolved => ":white_check_mark:",
            };
            let state = match n.status {
                Status::Firing => "FIRING",
                Status::Resolved => "RESOLVED",
            };
            json!({ "text": format!(
                "{icon} [{state}] {} (rule `{}`, {})",
                slack_escape(&n.summary),
                slack_escape(&n.rule),
                slack_escape(&n.backend)
            ) })
        }
        Kind::Alertmanager => {
            let mut labels = sink.labels.clone();
            labels.insert("alertname".into(), n.rule.clone());
            labels.insert("queue".into(), n.queue.clone());
            labels.insert("backend".into(), n.backend.clone());
            labels.insert("kind".into(), n.kind.into());
            labels.entry("severity".into()).or_insert_with(|| "warning".into());
            if let Some(r) = &n.reason {
                labels.insert("reason".into(), r.clone());
            }
            // A firing alert stays active until it is re-sent or resolved;
            // without an endsAt, Alertmanager would expire it after its own
            // resolve_timeout.
            let ends_at = match n.status {
                Status::Resolved => n.sent_at,
                // A `repeat` of centuries (the config takes any duration)
                // would overflow the date, or pass the four-digit years that
                // RFC 3339 allows: such an alert ends at the end of 9999.
                Status::Firing => {
                    let last = chrono::DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31T23:59:59Z");
                    chrono::TimeDelta::from_std(n.valid_for)
                        .ok()
                        .and_then(|d| n.sent_at.checked_add_signed(d))
                        .map_or(last, |t| t.min(last))
                }
            };
            json!([{
                "labels": labels,
                "annotations": {
                    "summary": n.summary,
                    "description": format!("{} = {} (threshold {})", n.kind, n.value, n.threshold),
                },
                "startsAt": n.started_at,
                "endsAt": ends_at,
            }])
        }
    }
}

/// Where alerts are posted, from Alertmanager's base URL, or from the
/// endpoint itself, which tools that take it whole have users give (posting
/// to `…/api/v2/alerts/api/v2/alerts` would fail every notice).
fn alertmanager_endpoint(url: &str) -> String {
    let base = url.trim_end_matches('/');
    let base = base.strip_suffix("/api/v2/alerts").unwrap_or(base);
    format!("{base}/api/v2/alerts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn note(status: Status) -> Notification {
        Notification {
            version: 1,
            status,
            rule: "dlq-depth".into(),
            kind: "depth_above",
            queue: "orders".into(),
            backend: "sqs".into(),
            value: 12.0,
            threshold: 10.0,
            reason: None,
            summary: "orders: 12 messages".into(),
            started_at: Utc::now(),
            sent_at: Utc::now(),
            repeat_seconds: 3600,
            samples: vec![],
            quiet: false,
            valid_for: Duration::from_secs(240),
        }
    }

    /// Sinks of these kinds with no delivery task: what is handed over stays
    /// queued, to be looked at.
    fn idle(kinds: &[Kind]) -> (Sinks, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let queues = kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| Arc::new(SinkQueue::new(format!("{kind:?}-{i}").to_lowercase(), *kind)))
            .collect();
        let inner = Inner {
            queues,
            pending: Default::default(),
            metrics: metrics.clone(),
        };
        (Sinks { inner: Arc::new(inner) }, metrics)
    }

    /// What sink `i` holds, oldest first: each request's (status, rule) pairs.
    fn queued(sinks: &Sinks, i: usize) -> Vec<Vec<(Status, String)>> {
        let items = sinks.inner.queues[i].items.lock().unwrap();
        items
            .iter()
            .map(|r| r.iter().map(|n| (n.status, n.rule.clone())).collect())
            .collect()
    }

    #[test]
    fn a_quiet_resolve_goes_to_alertmanager_only() {
        let (sinks, _) = idle(&[Kind::Webhook, Kind::Slack, Kind::Alertmanager]);
        let mut quiet = note(Status::Resolved);
        quiet.quiet = true;
        sinks.send(quiet);
        sinks.send(note(Status::Resolved));
        let got: Vec<usize> = (0..3).map(|i| queued(&sinks, i).len()).collect();
        assert_eq!(got, [1, 1, 2]);
    }

    /// A full queue makes room for a resolve by dropping a firing notice: the
    /// resolve's own firing notice when it is queued, else the oldest firing
    /// one; Alertmanager re-sends go before either. A resolve goes only when
    /// nothing but resolves is queued. Each drop is counted.
    #[test]
    fn a_full_sink_queue_drops_firing_notices_before_a_resolve() {
        let firing = |rule: &str| Notification {
            rule: rule.into(),
            ..note(Status::Firing)
        };
        let (sinks, metrics) = idle(&[Kind::Webhook]);
        for i in 0..QUEUE_DEPTH {
            sinks.send(firing(&format!("r{i}")));
        }
        // The resolve of a queued alert replaces its firing notice.
        let mut resolve = queued_note(&sinks, 7);
        resolve.status = Status::Resolved;
        sinks.send(resolve);
        let q = queued(&sinks, 0);
        assert_eq!(q.len(), QUEUE_DEPTH);
        assert!(!q.contains(&vec![(Status::Firing, "r7".to_string())]), "superseded");
        assert_eq!(q.last().unwrap(), &vec![(Status::Resolved, "r7".to_string())]);
        // A resolve of an alert not queued: the oldest firing notice goes.
        sinks.send(Notification {
            rule: "other".into(),
            ..note(Status::Resolved)
        });
        let q = queued(&sinks, 0);
        assert_eq!(q[0], vec![(Status::Firing, "r1".to_string())], "r0 dropped");
        assert_eq!(q.last().unwrap(), &vec![(Status::Resolved, "other".to_string())]);
        assert_eq!(sinks.inner.pending.count.load(Ordering::SeqCst), QUEUE_DEPTH);

        // Nothing but resolves queued: a firing notice is what goes.
        let (sinks, _) = idle(&[Kind::Alertmanager]);
        for i in 0..QUEUE_DEPTH {
            sinks.send(Notification {
                rule: format!("r{i}"),
                ..note(Status::Resolved)
            });
        }
        sinks.send(firing("late"));
        let q = queued(&sinks, 0);
        assert!(q.iter().all(|r| r[0].0 == Status::Resolved));
        // Re-sends go before firing notices, and a re-send is dropped itself
        // rather than push out a notice that matters more.
        let (sinks, _) = idle(&[Kind::Alertmanager]);
        let mut again = firing("again");
        again.quiet = true;
        sinks.resend(vec![again.clone()]);
        for i in 1..QUEUE_DEPTH {
            sinks.send(firing(&format!("r{i}")));
        }
        sinks.send(Notification {
            rule: "x".into(),
            ..note(Status::Resolved)
        });
        let q = queued(&sinks, 0);
        assert_eq!(q[0], vec![(Status::Firing, "r1".to_string())], "the re-send went first");
        sinks.resend(vec![again]);
        assert!(queued(&sinks, 0).iter().all(|r| r[0].1 != "again"));

        let text = metrics.render();
        for line in [
            r#"dlq_bridge_notifications_total{sink="webhook-0",outcome="superseded"} 1"#,
            r#"dlq_bridge_notifications_total{sink="webhook-0",outcome="dropped"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    /// The notification queued `i`-th in the first sink.
    fn queued_note(sinks: &Sinks, i: usize) -> Notification {
        sinks.inner.queues[0].items.lock().unwrap()[i][0].clone()
    }

    type Received = Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

    /// A receiver that answers every POST with `status` and keeps its body.
    async fn receiver(status: u16) -> (String, Received) {
        let got = Received::default();
        let kept = got.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                kept.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap_or_default());
                (axum::http::StatusCode::from_u16(status).unwrap(), "invalid_payload")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/hook"), got)
    }

    /// Sinks started from the `alerts.sinks` YAML list `sinks`.
    fn sinks(sinks: &str) -> Sinks {
        let cfg = crate::config::Config::from_yaml(&format!("alerts:\n  sinks:\n{sinks}"), "t", &[]).unwrap();
        Sinks::start(&cfg.alerts.sinks, Arc::new(Metrics::new())).unwrap()
    }

    /// Each request's `Idempotency-Key` header and JSON body.
    type Keyed = Arc<std::sync::Mutex<Vec<(Option<String>, serde_json::Value)>>>;

    /// An HTTP receiver that keeps every request's `Idempotency-Key` and body,
    /// and loses its answer to the first: it reads that request whole (the
    /// receiver has it), then closes the connection without answering. Later
    /// requests get 200.
    async fn forgetful_receiver() -> (String, Keyed) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let got = Keyed::default();
        let kept = got.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut conn = BufReader::new(socket);
                    loop {
                        let (mut key, mut length) = (None, 0);
                        let mut line = String::new();
                        if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            line.clear();
                            conn.read_line(&mut line).await.unwrap();
                            let Some((name, value)) = line.trim_end().split_once(':') else {
                                break;
                            };
                            match name.to_ascii_lowercase().as_str() {
                                "idempotency-key" => key = Some(value.trim().to_string()),
                                "content-length" => length = value.trim().parse().unwrap(),
                                _ => {}
                            }
                        }
                        let mut body = vec![0; length];
                        conn.read_exact(&mut body).await.unwrap();
                        let first = {
                            let mut kept = kept.lock().unwrap();
                            kept.push((key, serde_json::from_slice(&body).unwrap()));
                            kept.len() == 1
                        };
                        if first {
                            return;
                        }
                        conn.get_mut()
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        (format!("http://{addr}/hook"), got)
    }

    /// A notification retried after its answer was lost carries the same ID
    /// (header and webhook body), so the receiver can drop the duplicate; the
    /// alert's next notice carries another.
    #[tokio::test]
    async fn a_retry_after_a_lost_answer_carries_the_same_id_and_the_next_notice_another() {
        let (webhook, hooked) = forgetful_receiver().await;
        let (alertmanager, alerted) = forgetful_receiver().await;
        let sinks = sinks(&format!(
            "    - webhook: {{url: \"{webhook}\"}}\n    - alertmanager: {{url: \"{alertmanager}\"}}\n"
        ));
        let firing = note(Status::Firing);
        sinks.send(firing.clone());
        assert_eq!(sinks.flush(Duration::from_secs(10)).await, 0);
        sinks.send(Notification {
            status: Status::Resolved,
            sent_at: firing.sent_at + chrono::Duration::seconds(30),
            ..firing.clone()
        });
        assert_eq!(sinks.flush(Duration::from_secs(10)).await, 0);

        let hooked = hooked.lock().unwrap().clone();
        assert_eq!(hooked.len(), 3, "the lost one, its retry, the resolve: {hooked:?}");
        let ids: Vec<&str> = hooked.iter().map(|(_, body)| body["id"].as_str().unwrap()).collect();
        for (key, body) in &hooked {
            assert_eq!(key.as_deref(), body["id"].as_str(), "the header is the body's id");
        }
        assert_eq!(hooked[0], hooked[1], "the retry is the same request");
        assert_eq!(ids[0], firing.id());
        assert_ne!(ids[2], ids[0], "the resolve is another notification");
        assert_eq!(hooked[2].1["status"], "resolved");

        let alerted = alerted.lock().unwrap().clone();
        assert_eq!(alerted.len(), 3, "{alerted:?}");
        let keys: Vec<&str> = alerted.iter().map(|(key, _)| key.as_deref().unwrap()).collect();
        assert_eq!((keys[0], keys[1]), (firing.id().as_str(), firing.id().as_str()));
        assert_ne!(keys[2], keys[0]);
    }

    #[test]
    fn a_repeat_is_another_notification_a_copy_the_same() {
        let n = note(Status::Firing);
        assert_eq!(n.clone().id(), n.id());
        assert_eq!(n.id().len(), 32);
        let repeat = Notification {
            sent_at: n.sent_at + chrono::Duration::hours(4),
            ..n.clone()
        };
        assert_ne!(repeat.id(), n.id());
        let next = Notification {
            started_at: n.started_at + chrono::Duration::hours(5),
            ..repeat.clone()
        };
        assert_ne!(next.id(), repeat.id());
        assert_ne!(request_id(&[n.clone(), repeat.clone()]), n.id());
        assert_eq!(request_id(&[n.clone(), repeat.clone()]), request_id(&[n, repeat]));
    }

    #[tokio::test]
    async fn flush_waits_for_deliveries_and_says_how_many_are_still_out() {
        let (ok, _) = receiver(200).await;
        let (failing, _) = receiver(503).await;
        let webhook = |url: &str| sinks(&format!("    - webhook: {{url: \"{url}\"}}\n"));
        let sinks = webhook(&ok);
        assert_eq!(sinks.flush(Duration::ZERO).await, 0, "nothing handed over yet");
        sinks.send(note(Status::Firing));
        sinks.send(note(Status::Resolved));
        assert_eq!(sinks.flush(Duration::from_secs(10)).await, 0);
        // A sink in retry holds its notification past a short wait.
        let sinks = webhook(&failing);
        sinks.send(note(Status::Firing));
        assert_eq!(sinks.flush(Duration::from_millis(300)).await, 1);
    }

    /// Re-sent firing alerts go to Alertmanager only, a hundred to a request:
    /// one request each would fill the sink's queue with a few hundred alerts
    /// firing.
    #[tokio::test]
    async fn re_sent_alerts_go_to_alertmanager_only_many_to_a_request() {
        let (alertmanager, requests) = receiver(200).await;
        let (webhook, webhook_hits) = receiver(200).await;
        let sinks = sinks(&format!(
            "    - alertmanager: {{url: \"{alertmanager}\"}}\n    - webhook: {{url: \"{webhook}\"}}\n"
        ));
        let mut firing = note(Status::Firing);
        firing.quiet = true;
        sinks.resend(vec![firing; 250]);
        assert_eq!(sinks.flush(Duration::from_secs(10)).await, 0);
        let mut got: Vec<usize> = requests
            .lock()
            .unwrap()
            .iter()
            .map(|v| v.as_array().map_or(0, Vec::len))
            .collect();
        got.sort_unstable();
        assert_eq!(got, [50, 100, 100]);
        assert!(webhook_hits.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_client_error_is_not_retried_a_server_error_is() {
        let (refusing, refused) = receiver(400).await;
        let (failing, failed) = receiver(503).await;
        let sinks = sinks(&format!(
            "    - webhook: {{url: \"{refusing}\"}}\n    - webhook: {{url: \"{failing}\"}}\n"
        ));
        sinks.send(note(Status::Firing));
        // Retries come after 1 s, then 2 s more.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(refused.lock().unwrap().len(), 1);
        assert_eq!(failed.lock().unwrap().len(), 2);
    }

    /// A receiver whose `/hook` answers each POST with the next of `answers`
    /// (status, extra header), then 200, and keeps each request's method,
    /// path and arrival.
    async fn scripted_receiver(
        answers: Vec<(u16, Option<(&'static str, &'static str)>)>,
    ) -> (String, Arc<std::sync::Mutex<Vec<(String, String, std::time::Instant)>>>) {
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let answers = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(answers)));
        let kept = got.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (kept, answers) = (kept.clone(), answers.clone());
            async move {
                kept.lock().unwrap().push((
                    req.method().to_string(),
                    req.uri().path().to_string(),
                    std::time::Instant::now(),
                ));
                let (status, header) = answers.lock().unwrap().pop_front().unwrap_or((200, None));
                let mut r = axum::response::Response::new(axum::body::Body::from("ok"));
                *r.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                if let Some((name, value)) = header {
                    r.headers_mut().insert(name, value.parse().unwrap());
                }
                r
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/hook"), got)
    }

    /// reqwest followed a 302 with a GET without the body, which the receiver
    /// answered 200: the notification was lost and counted delivered.
    #[tokio::test]
    async fn a_redirect_is_not_followed_and_counts_refused() {
        let (url, got) = scripted_receiver(vec![(302, Some(("location", "/elsewhere")))]).await;
        let metrics = Arc::new(Metrics::new());
        let cfg = crate::config::Config::from_yaml(
            &format!("alerts:\n  sinks:\n    - webhook: {{url: \"{url}\"}}\n"),
            "t",
            &[],
        )
        .unwrap();
        let sinks = Sinks::start(&cfg.alerts.sinks, metrics.clone()).unwrap();
        sinks.send(note(Status::Firing));
        assert_eq!(sinks.flush(Duration::from_secs(10)).await, 0);
        let requests: Vec<(String, String)> = got
            .lock()
            .unwrap()
            .iter()
            .map(|(m, p, _)| (m.clone(), p.clone()))
            .collect();
        assert_eq!(requests, [("POST".to_string(), "/hook".to_string())]);
        let text = metrics.render();
        let refused = r#"dlq_bridge_notifications_total{sink="webhook-0",outcome="refused"} 1"#;
        assert!(text.contains(refused), "{text}");
    }

    /// A 429's `Retry-After` is waited out (the fixed backoff retried after
    /// 1 s), and a Slack sink sends at most one request a second.
    #[tokio::test]
    async fn retry_after_is_honoured_and_slack_is_paced() {
        let (url, got) = scripted_receiver(vec![(429, Some(("retry-after", "3")))]).await;
        let webhook = sinks(&format!("    - webhook: {{url: \"{url}\"}}\n"));
        webhook.send(note(Status::Firing));
        assert_eq!(webhook.flush(Duration::from_secs(10)).await, 0);
        let at: Vec<std::time::Instant> = got.lock().unwrap().iter().map(|r| r.2).collect();
        assert_eq!(at.len(), 2);
        assert!(at[1] - at[0] >= Duration::from_millis(2900), "{:?}", at[1] - at[0]);

        let (url, got) = scripted_receiver(Vec::new()).await;
        let slack = sinks(&format!("    - slack: {{url: \"{url}\"}}\n"));
        for rule in ["a", "b", "c"] {
            slack.send(Notification {
                rule: rule.into(),
                ..note(Status::Firing)
            });
        }
        assert_eq!(slack.flush(Duration::from_secs(10)).await, 0);
        let at: Vec<std::time::Instant> = got.lock().unwrap().iter().map(|r| r.2).collect();
        assert_eq!(at.len(), 3);
        for pair in at.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(950),
                "{:?}",
                pair[1] - pair[0]
            );
        }
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let waits: Vec<u64> = (1..ATTEMPTS).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn delivery_errors_say_why_without_the_url() {
        let url = "http://127.0.0.1:1/services/T0/B0/SLACKSECRET?token=QSECRET";
        let e = reqwest::Client::new().post(url).send().await.unwrap_err();
        let text = without_url(e, url);
        assert!(!text.contains("SECRET") && !text.contains("127.0.0.1:1"), "{text}");
        assert!(text.contains("error sending request: "), "{text}");
        assert!(text.to_lowercase().contains("connect"), "the cause: {text}");
    }

    #[test]
    fn alertmanager_shape() {
        let sink = Sink {
            kind: Kind::Alertmanager,
            url: String::new(),
            labels: BTreeMap::from([("team".into(), "payments".into())]),
        };
        let ends_at = |n: &Notification| {
            let v = payload(&sink, n);
            serde_json::from_value::<chrono::DateTime<Utc>>(v[0]["endsAt"].clone()).unwrap()
        };
        let resolved = note(Status::Resolved);
        let v = payload(&sink, &resolved);
        let a = &v[0];
        assert_eq!(a["labels"]["alertname"], "dlq-depth");
        assert_eq!(a["labels"]["queue"], "orders");
        assert_eq!(a["labels"]["team"], "payments");
        assert_eq!(a["labels"]["severity"], "warning");
        assert!(a["annotations"]["summary"].as_str().unwrap().contains("12 messages"));
        // A resolve ends the alert now; a firing one is valid until re-sent,
        // not for the whole repeat interval.
        assert_eq!(ends_at(&resolved), resolved.sent_at);
        let firing = note(Status::Firing);
        assert_eq!(ends_at(&firing), firing.sent_at + Duration::from_secs(240));
        // `repeat: 1000000y` on a new_reason rule: no overflow, a date
        // Alertmanager can read.
        let mut forever = note(Status::Firing);
        forever.valid_for = Duration::from_secs(1_000_000 * 365 * 86_400);
        assert_eq!(ends_at(&forever).to_rfc3339(), "9999-12-31T23:59:59+00:00");
    }

    #[test]
    fn slack_text_escapes_what_slack_would_read_as_markup() {
        let sink = Sink {
            kind: Kind::Slack,
            url: String::new(),
            labels: BTreeMap::new(),
        };
        let mut n = note(Status::Firing);
        n.summary = "orders: new failure reason `x < 5 & <!channel> <https://evil|ok>`".into();
        let text = payload(&sink, &n)["text"].as_str().unwrap().to_string();
        assert!(
            text.contains("`x &lt; 5 &amp; &lt;!channel&gt; &lt;https://evil|ok&gt;`"),
            "{text}"
        );
        assert!(!text.contains('<') && !text.contains('>'), "{text}");
    }

    #[test]
    fn slack_shape() {
        let sink = Sink {
            kind: Kind::Slack,
            url: String::new(),
            labels: BTreeMap::new(),
        };
        let v = payload(&sink, &note(Status::Firing));
        assert!(
            v["text"]
                .as_str()
                .unwrap()
                .starts_with(":rotating_light: [FIRING] orders")
        );
    }

    #[test]
    fn alertmanager_is_given_by_its_base_url_or_its_endpoint() {
        for url in [
            "http://am:9093",
            "http://am:9093/",
            "http://am:9093/api/v2/alerts",
            "http://am:9093/api/v2/alerts/",
        ] {
            assert_eq!(alertmanager_endpoint(url), "http://am:9093/api/v2/alerts", "{url}");
        }
        assert_eq!(
            alertmanager_endpoint("https://proxy/alertmanager"),
            "https://proxy/alertmanager/api/v2/alerts"
        );
    }
}
