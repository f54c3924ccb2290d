//! Notification sinks: a generic JSON webhook, Slack incoming webhooks and
//! Alertmanager's v2 API.
//!
//! Each sink has its own task and bounded queue: a slow or failing sink is
//! retried with backoff without ever blocking polling, and when its queue is
//! full the newest notification is dropped with a warning. On shutdown,
//! `serve` gives what is queued or being retried a bounded time to go out
//! ([`Sinks::flush`]): an alert that fired just before a rollout is not lost
//! with the pod.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Notify, mpsc};

use super::{Notification, Status};
use crate::config::{SinkConfig, SinkKind as Kind};

const QUEUE_DEPTH: usize = 256;
/// Alerts per Alertmanager request when firing alerts are re-sent.
const RESEND_CHUNK: usize = 100;
const ATTEMPTS: u32 = 5;

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

/// Hands notifications to every sink's task.
#[derive(Clone, Default)]
pub struct Sinks {
    /// Each item is one request's notifications: one, or (re-sends to
    /// Alertmanager) several in one array.
    queues: Vec<(String, Kind, mpsc::Sender<Request>)>,
    pending: Arc<Pending>,
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

impl Sinks {
    /// Resolve the sinks' URLs and start one delivery task per sink.
    pub fn start(configs: &[SinkConfig]) -> Result<Self, SinkError> {
        let client = reqwest::Client::builder()
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
                    Kind::Alertmanager => format!("{}/api/v2/alerts", url.trim_end_matches('/')),
                    _ => url,
                },
                labels: target.labels.clone(),
            };
            // Named without the URL: webhook URLs can carry secrets.
            let name = format!("{kind:?} sink #{index}").to_lowercase();
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            tokio::spawn(deliver(name.clone(), sink, client.clone(), rx, pending.clone()));
            queues.push((name, kind, tx));
        }
        Ok(Self { queues, pending })
    }

    /// Wait, at most `within`, until every notification handed over so far
    /// has been delivered or given up on. Returns how many were still out.
    pub async fn flush(&self, within: Duration) -> usize {
        let wait = async {
            loop {
                let idle = self.pending.idle.notified();
                tokio::pin!(idle);
                // Registered before the count is read, so a `done` in between
                // is not missed.
                idle.as_mut().enable();
                if self.pending.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
        self.pending.count.load(Ordering::SeqCst)
    }

    pub fn send(&self, n: Notification) {
        let quiet = n.quiet;
        let item = Arc::new(vec![n]);
        for (name, kind, q) in &self.queues {
            if quiet && *kind != Kind::Alertmanager {
                continue;
            }
            self.enqueue(name, q, item.clone());
        }
    }

    /// Firing alerts re-sent to keep them active: to the Alertmanager sinks
    /// only, many to a request. One request each would take a queue slot
    /// each, and with a few hundred alerts firing, the re-sends of every
    /// minute would fill the queue and push out the notices that matter.
    pub fn resend(&self, alerts: Vec<Notification>) {
        for chunk in alerts.chunks(RESEND_CHUNK) {
            let item = Arc::new(chunk.to_vec());
            for (name, kind, q) in &self.queues {
                if *kind == Kind::Alertmanager {
                    self.enqueue(name, q, item.clone());
                }
            }
        }
    }

    fn enqueue(&self, name: &str, q: &mpsc::Sender<Request>, item: Request) {
        self.pending.add();
        if q.try_send(item.clone()).is_err() {
            self.pending.done();
            let n = &item[0];
            tracing::warn!(sink = %name, rule = %n.rule, queue = %n.queue, alerts = item.len(), "sink queue full; notification dropped");
        }
    }
}

async fn deliver(
    name: String,
    sink: Sink,
    client: reqwest::Client,
    mut rx: mpsc::Receiver<Request>,
    pending: Arc<Pending>,
) {
    while let Some(item) = rx.recv().await {
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
                deliver_one(&name, &sink, &client, &serde_json::Value::Array(alerts), &item).await;
            }
            _ => {
                for n in item.iter() {
                    deliver_one(&name, &sink, &client, &payload(&sink, n), std::slice::from_ref(n)).await;
                }
            }
        }
        pending.done();
    }
}

/// POST `body` (which carries `notes`, named in the logs) with retries.
async fn deliver_one(
    name: &str,
    sink: &Sink,
    client: &reqwest::Client,
    body: &serde_json::Value,
    notes: &[Notification],
) {
    let n = &notes[0];
    let alerts = notes.len();
    for attempt in 1..=ATTEMPTS {
        let result = client.post(&sink.url).json(body).send().await;
        match result {
            Ok(r) if r.status().is_success() => break,
            Ok(r) => {
                let status = r.status();
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
                    break;
                }
                tracing::warn!(sink = %name, %status, %said, attempt, "sink refused a notification");
            }
            Err(e) => tracing::warn!(sink = %name, error = %without_url(e, &sink.url), attempt, "sink unreachable"),
        }
        if attempt == ATTEMPTS {
            tracing::error!(sink = %name, rule = %n.rule, queue = %n.queue, alerts, "notification dropped after {ATTEMPTS} attempts");
        } else {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
    }
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
                Status::Firing => n.sent_at + n.valid_for,
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

    #[test]
    fn a_quiet_resolve_goes_to_alertmanager_only() {
        let mut queues = Vec::new();
        let mut rxs = Vec::new();
        for kind in [Kind::Webhook, Kind::Slack, Kind::Alertmanager] {
            let (tx, rx) = mpsc::channel(4);
            queues.push((format!("{kind:?}"), kind, tx));
            rxs.push(rx);
        }
        let sinks = Sinks {
            queues,
            pending: Default::default(),
        };
        let mut quiet = note(Status::Resolved);
        quiet.quiet = true;
        sinks.send(quiet);
        sinks.send(note(Status::Resolved));
        let got: Vec<usize> = rxs
            .iter_mut()
            .map(|rx| std::iter::from_fn(|| rx.try_recv().ok()).count())
            .collect();
        assert_eq!(got, [1, 1, 2]);
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
        Sinks::start(&cfg.alerts.sinks).unwrap()
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
}
