//! Prometheus metrics (DESIGN §5), exported by `serve` at `/metrics`.
//!
//! Label sets stay bounded: queues come from the config, outcomes and rules
//! are fixed sets, and reasons are limited to the top N per queue with the
//! rest folded into `other`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

const RUN_SUCCEEDED: &str = "succeeded";
const RUN_FAILED: &str = "failed";
const RUN_INTERRUPTED: &str = "interrupted";

fn run_labels(queue: &str, action: &str, trigger: &str, outcome: &str) -> Labels {
    labels(&[
        ("queue", queue),
        ("action", action),
        ("trigger", trigger),
        ("outcome", outcome),
    ])
}

/// How a notification to a sink ended (`dlq_bridge_notifications_total`).
pub const NOTIFICATION_OUTCOMES: [&str; 5] = ["delivered", "superseded", "dropped", "refused", "failed"];

/// Reasons per queue exported as their own label value; the rest are `other`.
pub const TOP_REASONS: usize = 10;

pub struct Metrics {
    registry: Registry,
    messages: Family<Labels, Gauge>,
    oldest_age: Family<Labels, Gauge<f64, AtomicU64>>,
    arrivals: Family<Labels, Counter>,
    redrive_messages: Family<Labels, Counter>,
    runs: Family<Labels, Counter>,
    poll_errors: Family<Labels, Counter>,
    last_success: Family<Labels, Gauge<f64, AtomicU64>>,
    alerts_firing: Family<Labels, Gauge>,
    reason_messages: Family<Labels, Gauge>,
    /// The reason labels currently exported per queue, to remove stale ones.
    reasons_exported: Mutex<HashMap<String, Vec<String>>>,
    pattern_messages: Family<Labels, Gauge>,
    patterns_exported: Mutex<HashMap<String, Vec<String>>>,
    retention_expired: Family<Labels, Gauge>,
    notifications: Family<Labels, Counter>,
    /// (queue, rule) pairs firing now, for the dashboard's overview.
    firing: Mutex<std::collections::BTreeSet<(String, String)>>,
}

/// A label set, its values escaped for the text formats: prometheus-client
/// writes label values as given, and a failure reason holding a quote, a
/// backslash or a line break would otherwise end the value early or split
/// the line, and Prometheus would reject the whole scrape.
fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), escape_label_value(v)))
        .collect()
}

/// The escapes both OpenMetrics and the classic text format define.
fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            messages: Family::default(),
            oldest_age: Family::default(),
            arrivals: Family::default(),
            redrive_messages: Family::default(),
            runs: Family::default(),
            poll_errors: Family::default(),
            last_success: Family::default(),
            alerts_firing: Family::default(),
            reason_messages: Family::default(),
            reasons_exported: Mutex::new(HashMap::new()),
            pattern_messages: Family::default(),
            patterns_exported: Mutex::new(HashMap::new()),
            retention_expired: Family::default(),
            notifications: Family::default(),
            firing: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "dlq_bridge_messages",
            "Messages in the dead-letter queue",
            m.messages.clone(),
        );
        registry.register(
            "dlq_bridge_oldest_message_age_seconds",
            "Age of the oldest message in the dead-letter queue, where the provider makes it knowable",
            m.oldest_age.clone(),
        );
        registry.register(
            "dlq_bridge_arrivals",
            "Messages that arrived in the dead-letter queue, from depth deltas plus known redrives",
            m.arrivals.clone(),
        );
        registry.register(
            "dlq_bridge_redrive_messages",
            "Messages handled by redrives, by outcome",
            m.redrive_messages.clone(),
        );
        registry.register(
            "dlq_bridge_runs",
            "Redrives and purges the sidecar ran (trigger api, schedule or retention), by outcome: succeeded, interrupted (by a shutdown), or failed (including runs that could not start)",
            m.runs.clone(),
        );
        registry.register(
            "dlq_bridge_poll_errors",
            "Failed polls of a dead-letter queue",
            m.poll_errors.clone(),
        );
        registry.register(
            "dlq_bridge_last_poll_success_timestamp_seconds",
            "Unix time of the latest successful poll of the queue (0 until the first); the other per-queue values are as of then",
            m.last_success.clone(),
        );
        registry.register(
            "dlq_bridge_alerts_firing",
            "Alert rules currently firing, per queue",
            m.alerts_firing.clone(),
        );
        registry.register(
            "dlq_bridge_reason_messages",
            "Messages per failure reason in the latest sample (top reasons, the rest as `other`)",
            m.reason_messages.clone(),
        );
        registry.register(
            "dlq_bridge_pattern_messages",
            "Messages per failure pattern (normalised reason and description) in the latest sample (top patterns, the rest as `other`)",
            m.pattern_messages.clone(),
        );
        registry.register(
            "dlq_bridge_retention_expired_messages",
            "Messages older than the queue's retention max_age at the latest retention check",
            m.retention_expired.clone(),
        );
        registry.register(
            "dlq_bridge_notifications",
            "Alert notifications per sink, by outcome: delivered, superseded (dropped from a full sink queue for a later notice of the same alert), dropped (a full sink queue), refused (a client error), failed (given up after retries)",
            m.notifications.clone(),
        );
        Self { registry, ..m }
    }

    /// Export a sink's notification outcomes at 0 from the start (see
    /// `init_queue`).
    pub fn init_sink(&self, sink: &str) {
        for outcome in NOTIFICATION_OUTCOMES {
            let _ = self
                .notifications
                .get_or_create(&labels(&[("sink", sink), ("outcome", outcome)]));
        }
    }

    /// Count `n` notifications to `sink` that ended with `outcome`, one of
    /// [`NOTIFICATION_OUTCOMES`].
    pub fn count_notifications(&self, sink: &str, outcome: &str, n: usize) {
        debug_assert!(NOTIFICATION_OUTCOMES.contains(&outcome), "{outcome}");
        self.notifications
            .get_or_create(&labels(&[("sink", sink), ("outcome", outcome)]))
            .inc_by(n as u64);
    }

    pub fn set_depth(&self, queue: &str, backend: &str, depth: u64, oldest_age_secs: Option<f64>) {
        let l = labels(&[("queue", queue), ("backend", backend)]);
        self.messages.get_or_create(&l).set(depth as i64);
        match oldest_age_secs {
            Some(a) => {
                self.oldest_age.get_or_create(&l).set(a);
            }
            // Empty: no oldest message.
            None if depth == 0 => {
                self.oldest_age.remove(&l);
            }
            // Unknown this time (SQS past its sample without CloudWatch, a
            // CloudWatch call that failed): the last known age stands, as
            // the built-in rule keeps its state. A series that vanished
            // would resolve a Prometheus rule on it just as the queue grew.
            None => {}
        }
    }

    /// Export a configured queue's counters at 0 before anything happens:
    /// `increase()` and `rate()` see nothing in a series' first sample, so a
    /// counter that first appears at 1 hides its first error from an alert
    /// rule (Prometheus's advice: initialise the label sets you know).
    pub fn init_queue(&self, queue: &str, backend: &str) {
        let l = labels(&[("queue", queue), ("backend", backend)]);
        let _ = self.poll_errors.get_or_create(&l);
        let _ = self.arrivals.get_or_create(&l);
    }

    pub fn add_arrivals(&self, queue: &str, backend: &str, n: u64) {
        self.arrivals
            .get_or_create(&labels(&[("queue", queue), ("backend", backend)]))
            .inc_by(n);
    }

    pub fn add_redriven(&self, queue: &str, outcome: &str, n: u64) {
        if n > 0 {
            self.redrive_messages
                .get_or_create(&labels(&[("queue", queue), ("outcome", outcome)]))
                .inc_by(n);
        }
    }

    /// Export a run kind's outcomes at 0 before its first run: the first
    /// scheduled run that fails must show as an increase (see `init_queue`).
    /// Only for the kinds the config sets up (schedules, retention purges):
    /// every queue times every trigger would be a dozen series per queue.
    pub fn init_runs(&self, queue: &str, action: &str, trigger: &str) {
        for outcome in [RUN_SUCCEEDED, RUN_FAILED, RUN_INTERRUPTED] {
            let _ = self.runs.get_or_create(&run_labels(queue, action, trigger, outcome));
        }
    }

    /// Count one run (or one that could not start) by how it ended:
    /// `succeeded`, `failed` or `interrupted` (by a shutdown).
    pub fn count_run(&self, queue: &str, action: &str, trigger: &str, outcome: &str) {
        self.runs
            .get_or_create(&run_labels(queue, action, trigger, outcome))
            .inc();
    }

    pub fn poll_error(&self, queue: &str, backend: &str) {
        self.poll_errors
            .get_or_create(&labels(&[("queue", queue), ("backend", backend)]))
            .inc();
    }

    /// When the queue was last polled successfully (`None`: never yet).
    pub fn set_last_success(&self, queue: &str, backend: &str, at: Option<chrono::DateTime<chrono::Utc>>) {
        let secs = at.map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
        self.last_success
            .get_or_create(&labels(&[("queue", queue), ("backend", backend)]))
            .set(secs);
    }

    pub fn set_firing(&self, queue: &str, rule: &str, firing: bool) {
        self.alerts_firing
            .get_or_create(&labels(&[("queue", queue), ("rule", rule)]))
            .set(i64::from(firing));
        let mut set = self.firing.lock().expect("metrics lock");
        if firing {
            set.insert((queue.to_string(), rule.to_string()));
        } else {
            set.remove(&(queue.to_string(), rule.to_string()));
        }
    }

    /// The (queue, rule) pairs firing now.
    pub fn firing(&self) -> Vec<(String, String)> {
        self.firing.lock().expect("metrics lock").iter().cloned().collect()
    }

    /// Export the top reasons of a sample, each as its pattern (numbers, IDs
    /// and quoted values replaced, at most 200 characters): a reason that
    /// names an order or a request would otherwise make a new series in
    /// Prometheus for every message, and series are kept long after they
    /// leave the exposition.
    pub fn set_reasons(&self, queue: &str, counts: &[(String, u64)]) {
        let mut by_pattern: HashMap<String, u64> = HashMap::new();
        for (reason, n) in counts {
            let key = if reason == "other" || reason == "(none)" {
                reason.clone()
            } else {
                crate::engine::triage::reason_pattern(reason)
            };
            *by_pattern.entry(key).or_default() += n;
        }
        let mut counts: Vec<(String, u64)> = by_pattern.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        set_top(&self.reason_messages, &self.reasons_exported, "reason", queue, &counts);
    }

    /// Export the top failure patterns of a sample (see `triage::pattern_of`);
    /// `counts` is sorted, most frequent first (an `other` entry is summed in).
    pub fn set_patterns(&self, queue: &str, counts: &[(String, u64)]) {
        set_top(
            &self.pattern_messages,
            &self.patterns_exported,
            "pattern",
            queue,
            counts,
        );
    }

    pub fn set_retention_expired(&self, queue: &str, n: u64) {
        self.retention_expired
            .get_or_create(&labels(&[("queue", queue)]))
            .set(n as i64);
    }

    /// Only the leader checks retention: a replica that stops leading drops
    /// its last count, which every scrape of it would otherwise repeat (and
    /// a rule on it would fire after the new leader purged).
    pub fn forget_retention_expired(&self, queue: &str) {
        self.retention_expired.remove(&labels(&[("queue", queue)]));
    }

    /// The OpenMetrics text exposition, as prometheus-client encodes it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The metrics in the format `accept` asks for, with its content type.
    pub fn render_for(&self, accept: Option<&str>) -> (&'static str, String) {
        match Exposition::negotiate(accept) {
            Exposition::OpenMetrics => (Exposition::OPENMETRICS_CONTENT_TYPE, self.render()),
            Exposition::Classic => (Exposition::CLASSIC_CONTENT_TYPE, to_classic_text(&self.render())),
        }
    }
}

/// The two text formats Prometheus scrapers understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0: what Prometheus itself asks for first.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4: what every other scraper,
    /// promtool, and a bare `curl` expect.
    Classic,
}

impl Exposition {
    pub const OPENMETRICS_CONTENT_TYPE: &'static str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    pub const CLASSIC_CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";

    /// Picks the format by the `Accept` header's quality values. OpenMetrics
    /// only when the client names it and prefers it at least as much as the
    /// classic format; without an `Accept`, or with `*/*`, the classic format,
    /// which is what a scraper that predates OpenMetrics can parse.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Classic;
        };
        let mut openmetrics: Option<f32> = None;
        let mut classic: Option<f32> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut openmetrics,
                "text/plain" | "text/*" | "*/*" => &mut classic,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
        match (openmetrics, classic) {
            (Some(om), Some(c)) if om >= c && om > 0.0 => Self::OpenMetrics,
            (Some(om), None) if om > 0.0 => Self::OpenMetrics,
            _ => Self::Classic,
        }
    }
}

/// Rewrites OpenMetrics text (as prometheus-client writes it) into the
/// classic text format: prometheus-client 0.23 has no encoder for it. The two
/// differ in what matters to a classic parser: a counter's `HELP` and `TYPE`
/// name the `_total` sample, not the family; `# UNIT` and `# EOF` do not
/// exist; `info` and `stateset` are gauges and `unknown` is `untyped`;
/// exemplars and `_created` samples are not part of it.
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // Family name -> the name its samples carry in the classic format.
    let mut counters: HashMap<&str, String> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
            && kind == "counter"
        {
            let sample = if name.ends_with("_total") {
                name.to_string()
            } else {
                format!("{name}_total")
            };
            counters.insert(name, sample);
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = counters.get(name).map_or(name, String::as_str);
            out.push_str(&format!("# HELP {name} {help}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let name = counters.get(name).map_or(name, String::as_str);
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                "info" | "stateset" | "gaugehistogram" => "gauge",
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample_name = line.split(['{', ' ']).next().unwrap_or_default();
        if sample_name.ends_with("_created") {
            continue;
        }
        // An exemplar follows the value after ` # `; the first one after the
        // label set starts it (label values may hold ` # ` and `}` themselves).
        let after_labels = end_of_labels(line);
        let sample = match line[after_labels..].find(" # ") {
            Some(i) => &line[..after_labels + i],
            None => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Export the top N `counts` of a queue under `label`, the rest (and any
/// `other` entry) summed as `other`, removing the labels of the previous call.
fn set_top(
    family: &Family<Labels, Gauge>,
    exported: &Mutex<HashMap<String, Vec<String>>>,
    label: &str,
    queue: &str,
    counts: &[(String, u64)],
) {
    let mut exported = exported.lock().expect("metrics lock");
    for old in exported.remove(queue).unwrap_or_default() {
        family.remove(&labels(&[("queue", queue), (label, &old)]));
    }
    let mut names = Vec::new();
    let named = counts.iter().filter(|(k, _)| k != "other");
    let given_other: u64 = counts.iter().filter(|(k, _)| k == "other").map(|(_, n)| n).sum();
    let other: u64 = given_other + named.clone().skip(TOP_REASONS).map(|(_, n)| n).sum::<u64>();
    let top = named.take(TOP_REASONS).cloned();
    let rest = (other > 0).then(|| ("other".to_string(), other));
    for (key, n) in top.chain(rest) {
        family
            .get_or_create(&labels(&[("queue", queue), (label, &key)]))
            .set(n as i64);
        names.push(key);
    }
    exported.insert(queue.to_string(), names);
}

/// The byte offset just past a sample line's label set (`{...}`), or 0 when
/// it has none; quotes and escapes inside label values are honoured.
fn end_of_labels(line: &str) -> usize {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    if !line[name_end..].starts_with('{') {
        return 0;
    }
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line[name_end..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return name_end + i + 1,
            _ => {}
        }
    }
    line.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_accept_header() {
        use Exposition::*;
        assert_eq!(Exposition::negotiate(None), Classic);
        assert_eq!(Exposition::negotiate(Some("*/*")), Classic);
        assert_eq!(Exposition::negotiate(Some("text/plain;version=0.0.4")), Classic);
        assert_eq!(
            Exposition::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            OpenMetrics
        );
        // What Prometheus 2.x sends.
        assert_eq!(
            Exposition::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                 text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            OpenMetrics
        );
        assert_eq!(
            Exposition::negotiate(Some("application/openmetrics-text;q=0.3, text/plain;q=0.9")),
            Classic
        );
        assert_eq!(Exposition::negotiate(Some("application/openmetrics-text;q=0")), Classic);
    }

    #[test]
    fn classic_text_names_counters_by_their_samples_and_drops_openmetrics_lines() {
        let m = Metrics::new();
        m.set_depth("orders", "sqs", 7, Some(12.5));
        m.add_arrivals("orders", "sqs", 3);
        let om = m.render();
        assert!(om.contains("# TYPE dlq_bridge_arrivals counter"), "{om}");
        let text = to_classic_text(&om);
        assert!(text.contains("# TYPE dlq_bridge_arrivals_total counter\n"), "{text}");
        assert!(text.contains("# HELP dlq_bridge_arrivals_total "), "{text}");
        assert!(
            text.contains(r#"dlq_bridge_arrivals_total{queue="orders",backend="sqs"} 3"#),
            "{text}"
        );
        assert!(text.contains("# TYPE dlq_bridge_messages gauge\n"), "{text}");
        assert!(text.contains(r#"dlq_bridge_oldest_message_age_seconds{queue="orders",backend="sqs"} 12.5"#));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        // Every sample's family has HELP and TYPE lines under the sample's name.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} ")) || text.contains(&format!("# TYPE {family} ")),
                "no TYPE for {name} in\n{text}"
            );
        }
    }

    #[test]
    fn exemplars_and_created_samples_are_dropped() {
        let om = "# HELP x_seconds A thing.\n# TYPE x_seconds counter\n# UNIT x_seconds seconds\n\
                  x_seconds_total{a=\"b # c\"} 2 # {trace_id=\"1\"} 1.0\nx_seconds_created 1.7e9\n# EOF\n";
        assert_eq!(
            to_classic_text(om),
            "# HELP x_seconds_total A thing.\n# TYPE x_seconds_total counter\nx_seconds_total{a=\"b # c\"} 2\n"
        );
    }

    /// Every metric the sidecar exports is in the README, as
    /// `name{label,...}` with the labels it really carries.
    #[test]
    fn the_readme_names_every_metric_with_its_labels() {
        let readme = include_str!("../../README.md");
        let m = Metrics::new();
        m.set_depth("orders", "sqs", 7, Some(12.5));
        m.add_arrivals("orders", "sqs", 3);
        m.add_redriven("orders", "sent", 2);
        m.count_run("orders", "redrive", "api", RUN_SUCCEEDED);
        m.poll_error("orders", "sqs");
        m.set_last_success("orders", "sqs", None);
        m.set_firing("orders", "depth", true);
        m.set_reasons("orders", &[("Timeout".into(), 1)]);
        m.set_patterns("orders", &[("Timeout: <n>".into(), 1)]);
        m.set_retention_expired("orders", 1);
        m.count_notifications("webhook-0", "delivered", 1);
        let text = m.render();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let mut missing = Vec::new();
        for family in &families {
            let sample = text
                .lines()
                .find(|l| !l.starts_with('#') && l.starts_with(family))
                .unwrap_or_else(|| panic!("{family} has no sample: set it in this test"));
            let (name, rest) = sample.split_once('{').expect("every metric has labels");
            let labels: Vec<&str> = rest
                .split("\",")
                .map(|kv| kv.split('=').next().unwrap().trim_start_matches(','))
                .collect();
            let documented = format!("`{name}{{{}}}`", labels.join(","));
            if !readme.contains(&documented) {
                missing.push(documented);
            }
        }
        assert!(families.len() >= 12, "{families:?}");
        assert!(missing.is_empty(), "README.md does not name {missing:?}");
    }

    #[test]
    fn renders_the_design_names() {
        let m = Metrics::new();
        m.set_depth("orders", "sqs", 7, Some(12.5));
        m.add_arrivals("orders", "sqs", 3);
        m.add_redriven("orders", "sent", 2);
        m.poll_error("orders", "sqs");
        m.set_last_success("orders", "sqs", chrono::DateTime::from_timestamp(1_700_000_000, 0));
        m.set_last_success("beta", "sqs", None);
        m.set_firing("orders", "depth", true);
        let text = m.render();
        for needle in [
            r#"dlq_bridge_messages{queue="orders",backend="sqs"} 7"#,
            r#"dlq_bridge_oldest_message_age_seconds{queue="orders",backend="sqs"} 12.5"#,
            r#"dlq_bridge_arrivals_total{queue="orders",backend="sqs"} 3"#,
            r#"dlq_bridge_redrive_messages_total{queue="orders",outcome="sent"} 2"#,
            r#"dlq_bridge_poll_errors_total{queue="orders",backend="sqs"} 1"#,
            r#"dlq_bridge_last_poll_success_timestamp_seconds{queue="orders",backend="sqs"} 1700000000.0"#,
            r#"dlq_bridge_last_poll_success_timestamp_seconds{queue="beta",backend="sqs"} 0.0"#,
            r#"dlq_bridge_alerts_firing{queue="orders",rule="depth"} 1"#,
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
    }

    #[test]
    fn a_queue_s_counters_are_exported_at_zero_from_the_start() {
        let m = Metrics::new();
        m.init_queue("orders", "sqs");
        let text = m.render();
        for needle in [
            r#"dlq_bridge_poll_errors_total{queue="orders",backend="sqs"} 0"#,
            r#"dlq_bridge_arrivals_total{queue="orders",backend="sqs"} 0"#,
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
        m.poll_error("orders", "sqs");
        assert!(
            m.render()
                .contains(r#"dlq_bridge_poll_errors_total{queue="orders",backend="sqs"} 1"#)
        );
    }

    #[test]
    fn runs_are_counted_by_outcome_from_zero() {
        let m = Metrics::new();
        m.init_runs("orders", "redrive", "schedule");
        let text = m.render();
        for outcome in ["succeeded", "failed", "interrupted"] {
            let needle = format!(
                r#"dlq_bridge_runs_total{{queue="orders",action="redrive",trigger="schedule",outcome="{outcome}"}} 0"#
            );
            assert!(text.contains(&needle), "{needle} in\n{text}");
        }
        m.count_run("orders", "redrive", "schedule", RUN_FAILED);
        m.count_run("orders", "purge", "api", RUN_SUCCEEDED);
        let text = m.render();
        for needle in [
            r#"dlq_bridge_runs_total{queue="orders",action="redrive",trigger="schedule",outcome="failed"} 1"#,
            r#"dlq_bridge_runs_total{queue="orders",action="redrive",trigger="schedule",outcome="succeeded"} 0"#,
            r#"dlq_bridge_runs_total{queue="orders",action="purge",trigger="api",outcome="succeeded"} 1"#,
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.set_patterns("q", &[("bad \"token\" at C:\\x\nnext".into(), 2)]);
        let text = m.render();
        assert!(
            text.contains(r#"dlq_bridge_pattern_messages{queue="q",pattern="bad \"token\" at C:\\x\nnext"} 2"#),
            "{text}"
        );
        // Replaced, not left behind, by the next sample.
        m.set_patterns("q", &[("ok".into(), 1)]);
        assert_eq!(m.render().matches("dlq_bridge_pattern_messages{").count(), 1);
        let classic = to_classic_text(&m.render());
        assert!(classic.contains(r#"pattern="ok"} 1"#), "{classic}");
    }

    #[test]
    fn reasons_are_bounded_and_stale_ones_removed() {
        let m = Metrics::new();
        let many: Vec<(String, u64)> = (0..15).map(|i| (format!("r{i}"), 20 - i as u64)).collect();
        m.set_reasons("q", &many);
        let text = m.render();
        assert_eq!(text.matches("dlq_bridge_reason_messages{").count(), TOP_REASONS + 1);
        assert!(text.contains(r#"reason="other"} "#));
        m.set_reasons("q", &[("only".into(), 1)]);
        let text = m.render();
        assert_eq!(text.matches("dlq_bridge_reason_messages{").count(), 1, "{text}");
    }

    #[test]
    fn an_unknown_oldest_age_keeps_the_last_known_one_until_the_queue_is_empty() {
        let m = Metrics::new();
        let age = |m: &Metrics| {
            m.render()
                .lines()
                .find(|l| l.starts_with("dlq_bridge_oldest_message_age_seconds{"))
                .map(str::to_string)
        };
        m.set_depth("q", "sqs", 60, Some(900.0));
        m.set_depth("q", "sqs", 80, None);
        assert!(age(&m).is_some_and(|l| l.ends_with(" 900.0")), "{:?}", age(&m));
        m.set_depth("q", "sqs", 0, None);
        assert_eq!(age(&m), None);
    }

    #[test]
    fn reasons_are_exported_by_pattern() {
        let m = Metrics::new();
        m.set_reasons(
            "q",
            &[
                ("Order 18 not found".into(), 3),
                ("Timeout".into(), 3),
                ("Order 19 not found".into(), 2),
            ],
        );
        let text = m.render();
        assert!(
            text.contains(r#"dlq_bridge_reason_messages{queue="q",reason="Order <n> not found"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"dlq_bridge_reason_messages{queue="q",reason="Timeout"} 3"#),
            "{text}"
        );
        assert_eq!(text.matches("dlq_bridge_reason_messages{").count(), 2, "{text}");
    }

    #[test]
    fn patterns_are_bounded_and_fold_other() {
        let m = Metrics::new();
        let mut many: Vec<(String, u64)> = (0..12).map(|i| (format!("p{i} <n>"), 30 - i as u64)).collect();
        many.push(("other".into(), 5));
        m.set_patterns("q", &many);
        m.set_retention_expired("q", 4);
        let text = m.render();
        assert_eq!(text.matches("dlq_bridge_pattern_messages{").count(), TOP_REASONS + 1);
        // p10 (20) + p11 (19) + the given other (5)
        assert!(
            text.contains(r#"dlq_bridge_pattern_messages{queue="q",pattern="other"} 44"#),
            "{text}"
        );
        assert!(
            text.contains(r#"dlq_bridge_retention_expired_messages{queue="q"} 4"#),
            "{text}"
        );
        m.forget_retention_expired("q");
        assert!(!m.render().contains("dlq_bridge_retention_expired_messages{"));
    }
}
