//! Typed configuration (DESIGN §2: "The config is the single source of truth").
//!
//! The YAML file is parsed strictly (`deny_unknown_fields` everywhere) so that a
//! typo is an error naming the file, line, field and what was expected, never a
//! silently ignored setting. Environment variables `DLQ_BRIDGE__<PATH>` (with
//! `__` between path segments, e.g. `DLQ_BRIDGE__REDRIVE__CONCURRENCY=8`)
//! override single values, read through the `config` crate's environment source.
//! Secrets are never inline: fields ending in `_env` name the environment
//! variable that holds them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// Overrides are `DLQ_BRIDGE__` + path; the double underscore keeps them apart
/// from the CLI's own variables (`DLQ_BRIDGE_CONFIG`, `DLQ_BRIDGE_LOG`).
const ENV_PREFIX: &str = "DLQ_BRIDGE";
const ENV_SEPARATOR: &str = "__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `error`, not `source`: the message already includes it, and a source
    // would be printed a second time by `{:#}`.
    #[error("{path}: cannot read the config file: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{location}: {field}: {message}")]
    Invalid {
        /// `file:line:column` when known, else the file.
        location: String,
        /// The dotted path of the offending field, e.g. `queues[1].sqs.region`.
        field: String,
        message: String,
    },
    #[error("environment override {var}: {message}")]
    Env { var: String, message: String },
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings every queue inherits unless it sets its own.
    #[serde(default)]
    pub defaults: QueueDefaults,
    /// How redrives behave, for every trigger (CLI, API, schedule).
    #[serde(default)]
    pub redrive: RedriveConfig,
    /// The dead-letter queues dlq-bridge manages. Names must be unique.
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    /// Sidecar mode (`dlq-bridge serve`): HTTP API, metrics, polling.
    #[serde(default)]
    pub serve: ServeConfig,
    /// Alert rules and where notifications go (evaluated by `serve`).
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Redrives `serve` runs on a schedule (on the leader only).
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address of the HTTP API and /metrics. Loopback by default; any other
    /// address is refused unless a token is configured.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Environment variable holding the bearer token that mutating API calls
    /// (redrives) must present. Unset: no token is required (loopback only).
    #[serde(default)]
    pub token_env: Option<String>,
    /// Where the journal (unless `redrive.journal` names one) and state
    /// live. Default: `$XDG_STATE_HOME/dlq-bridge`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// How often each queue is polled, unless the queue sets `poll_interval`.
    /// At least 1s (`MIN_POLL_INTERVAL`).
    #[serde(default = "default_poll_interval", with = "poll_interval_text")]
    pub poll_interval: Duration,
    /// Messages read per poll to find reasons (top-N metric, `new_reason`).
    /// On SQS and Pub/Sub reading leases and releases (delivery counts rise);
    /// 0 turns sampling off unless a `new_reason` rule needs it.
    #[serde(default = "default_reason_sample")]
    pub reason_sample: usize,
    /// At most this many admin calls per second to each backend kind: Service
    /// Bus throttles management calls hard.
    #[serde(default)]
    pub admin_calls_per_second: AdminCallLimits,
    /// How long SIGTERM waits for in-flight redrives to finish their batches.
    #[serde(default = "default_shutdown_grace", with = "duration_text")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub leader_election: LeaderElectionConfig,
    #[serde(default)]
    pub dashboard: DashboardConfig,
}

/// The web dashboard `serve` shows at `/` and `/ui`, on the API's listener
/// and under the API's rules (token, loopback, same origin).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Serve the dashboard. Off: `/` and `/ui` answer 404; the API is unchanged.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Show message bodies on the queue page. Off by default, as in alerts:
    /// bodies often hold personal data, and a dashboard is shared on screens.
    #[serde(default)]
    pub show_bodies: bool,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            show_bodies: false,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token_env: None,
            data_dir: None,
            poll_interval: default_poll_interval(),
            reason_sample: default_reason_sample(),
            admin_calls_per_second: AdminCallLimits::default(),
            shutdown_grace: default_shutdown_grace(),
            leader_election: LeaderElectionConfig::default(),
            dashboard: DashboardConfig::default(),
        }
    }
}

/// The shortest poll interval: shorter ones hammer the provider's admin API
/// (and a failing one, the log) for no fresher data.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// [`duration_text`] for poll intervals, refusing those under `MIN_POLL_INTERVAL`.
pub mod poll_interval_text {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        super::duration_text::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        check(super::duration_text::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    pub fn check(d: Duration) -> Result<Duration, String> {
        if d < super::MIN_POLL_INTERVAL {
            return Err(format!(
                "poll interval {} is too short: at least {}",
                humantime::format_duration(d),
                humantime::format_duration(super::MIN_POLL_INTERVAL)
            ));
        }
        Ok(d)
    }
}

/// Like [`poll_interval_text`], for a queue's optional own interval.
pub mod opt_poll_interval_text {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        super::opt_duration_text::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::opt_duration_text::deserialize(d)?
            .map(super::poll_interval_text::check)
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

fn default_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_reason_sample() -> usize {
    50
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(25)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminCallLimits {
    #[serde(default = "default_sqs_calls")]
    pub sqs: u32,
    #[serde(default = "default_pubsub_calls")]
    pub pubsub: u32,
    #[serde(default = "default_servicebus_calls")]
    pub servicebus: u32,
}

impl Default for AdminCallLimits {
    fn default() -> Self {
        Self {
            sqs: default_sqs_calls(),
            pubsub: default_pubsub_calls(),
            servicebus: default_servicebus_calls(),
        }
    }
}

fn default_sqs_calls() -> u32 {
    20
}
fn default_pubsub_calls() -> u32 {
    10
}
fn default_servicebus_calls() -> u32 {
    2
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElectionConfig {
    /// Elect one replica (through a coordination.k8s.io/v1 Lease) to evaluate
    /// alerts and run schedules. Off: this process does both.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    /// Default: the POD_NAMESPACE environment variable, else the Kubernetes
    /// client's namespace (the pod's own in a cluster, the kubeconfig
    /// context's outside one).
    #[serde(default)]
    pub namespace: Option<String>,
    /// This replica's name in the Lease. Default: POD_NAME, else the hostname.
    #[serde(default)]
    pub identity: Option<String>,
    /// A leader that has not renewed for this long is replaced.
    #[serde(default = "default_lease_duration", with = "duration_text")]
    pub lease_duration: Duration,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            lease_name: default_lease_name(),
            namespace: None,
            identity: None,
            lease_duration: default_lease_duration(),
        }
    }
}

fn default_lease_name() -> String {
    "dlq-bridge".into()
}
fn default_lease_duration() -> Duration {
    Duration::from_secs(15)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default)]
    pub rules: Vec<AlertRule>,
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// Put message bodies in notifications. Off by default: bodies often hold
    /// personal data, and alerts travel to chat rooms.
    #[serde(default)]
    pub include_bodies: bool,
    /// How often the leader re-sends each firing alert to Alertmanager sinks
    /// (as Prometheus does), each time ending it 4 times this later: an alert
    /// whose sender died or restarted ends by itself within minutes instead
    /// of staying active until its repeat interval. Alertmanager does not
    /// notify again for a re-sent alert. At least `1s`; default `1m`.
    #[serde(default = "default_resend_delay", with = "duration_text")]
    pub resend_delay: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            sinks: Vec::new(),
            include_bodies: false,
            resend_delay: default_resend_delay(),
        }
    }
}

fn default_resend_delay() -> Duration {
    Duration::from_secs(60)
}

/// One alert rule. Exactly one condition (`depth_above`, `oldest_age_above`,
/// `growth`, `new_reason`) is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Name in notifications and the `rule` label. Default: the condition's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Queue names or globs (`orders-*`) the rule applies to. Default: all.
    #[serde(default = "default_all_queues")]
    pub queues: Vec<String>,
    /// Fires when the DLQ holds more than this many messages.
    #[serde(default)]
    pub depth_above: Option<u64>,
    /// Fires when the oldest message is older than this (where knowable).
    #[serde(default, with = "opt_duration_text")]
    pub oldest_age_above: Option<Duration>,
    /// Fires when at least `messages` arrived within `window`.
    #[serde(default)]
    pub growth: Option<GrowthRule>,
    /// Fires once for each failure reason never seen before on the queue.
    #[serde(default)]
    pub new_reason: bool,
    /// The condition must hold this long before the alert fires.
    #[serde(default, rename = "for", with = "duration_text")]
    pub for_: Duration,
    /// A firing alert is sent again after this long.
    #[serde(default = "default_repeat", with = "duration_text")]
    pub repeat: Duration,
    /// Send a notice when the condition clears. Alertmanager is told in any
    /// case: its alert would otherwise stay active until its `endsAt`.
    #[serde(default = "default_true")]
    pub send_resolved: bool,
}

impl AlertRule {
    /// The condition this rule tests: `depth_above`, `oldest_age_above`,
    /// `growth` or `new_reason`.
    pub fn kind(&self) -> &'static str {
        if self.depth_above.is_some() {
            "depth_above"
        } else if self.oldest_age_above.is_some() {
            "oldest_age_above"
        } else if self.growth.is_some() {
            "growth"
        } else {
            "new_reason"
        }
    }

    /// `name`, else the condition's name.
    pub fn effective_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.kind().to_string())
    }
}

fn default_all_queues() -> Vec<String> {
    vec!["*".into()]
}
fn default_repeat() -> Duration {
    Duration::from_secs(4 * 3600)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrowthRule {
    /// At least 1: 0 would fire on every poll.
    #[serde(deserialize_with = "at_least_one")]
    pub messages: u64,
    #[serde(with = "duration_text")]
    pub window: Duration,
}

/// Where notifications go: exactly one of `webhook`, `slack` or
/// `alertmanager`. Webhook URLs often embed secrets (Slack's do), so each can
/// be given by environment variable instead (`url_env`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// POST of dlq-bridge's JSON notification (see the README for its shape).
    #[serde(default)]
    pub webhook: Option<SinkTarget>,
    /// A Slack incoming webhook.
    #[serde(default)]
    pub slack: Option<SinkTarget>,
    /// Alertmanager's `/api/v2/alerts`; `url` is Alertmanager's base URL.
    #[serde(default)]
    pub alertmanager: Option<SinkTarget>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Webhook,
    Slack,
    Alertmanager,
}

impl SinkConfig {
    /// The one sink this entry configures (validated when the file is loaded).
    pub fn target(&self) -> Option<(SinkKind, &SinkTarget)> {
        let all = [
            (SinkKind::Webhook, &self.webhook),
            (SinkKind::Slack, &self.slack),
            (SinkKind::Alertmanager, &self.alertmanager),
        ];
        let mut set = all.into_iter().filter_map(|(k, t)| t.as_ref().map(|t| (k, t)));
        match (set.next(), set.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(serde::de::Error::custom(
            "must be at least 1 (0 would fire on every poll)",
        )),
        n => Ok(n),
    }
}

/// Checks a sink's URL: absolute `http` or `https` with a host. Sinks given
/// by `url_env` are checked the same way when `serve` starts and by `check`.
///
/// The messages leave the URL out: sink URLs carry secrets (Slack's path is
/// one), and config errors reach the pod's log; the error's location says
/// which field it is.
pub fn check_sink_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url.trim()).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err("not an http:// or https:// URL with a host".into());
    }
    Ok(())
}

fn opt_sink_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let url = Option::<String>::deserialize(d)?;
    if let Some(u) = &url {
        check_sink_url(u).map_err(serde::de::Error::custom)?;
    }
    Ok(url)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkTarget {
    /// Absolute http(s) URL, checked when the file is loaded.
    #[serde(default, deserialize_with = "opt_sink_url")]
    pub url: Option<String>,
    /// Environment variable holding the URL (for URLs that carry a secret).
    #[serde(default)]
    pub url_env: Option<String>,
    /// Extra labels (Alertmanager) or fields (webhook) added to every notification.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A redrive `serve` runs by itself.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub queue: String,
    /// Run every so often (`15m`). Set this or `cron`.
    #[serde(default, with = "opt_duration_text")]
    pub every: Option<Duration>,
    /// A cron expression (`0 */2 * * *`, UTC). Set this or `every`.
    #[serde(default)]
    pub cron: Option<String>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub max: Option<u64>,
    #[serde(default)]
    pub rate: Option<u32>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueDefaults {
    /// Message attribute that carries the failure reason, for providers that
    /// have no native one (SQS, Pub/Sub). Default `error`.
    #[serde(default = "default_reason_attribute")]
    pub reason_attribute: String,
    /// Message attribute that carries a longer failure description. Default
    /// `error_description`.
    #[serde(default = "default_description_attribute")]
    pub description_attribute: String,
}

impl Default for QueueDefaults {
    fn default() -> Self {
        Self {
            reason_attribute: default_reason_attribute(),
            description_attribute: default_description_attribute(),
        }
    }
}

fn default_reason_attribute() -> String {
    "error".into()
}
fn default_description_attribute() -> String {
    "error_description".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveConfig {
    /// Send batches in flight at once (a batch gives its slot back once its
    /// copies are confirmed, while its originals are settled); also caps the
    /// leases in flight (each provider sets its own cap below this). Default 16.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long messages stay leased during a pass. Messages a pass holds
    /// (non-matching ones) are released together when it ends, so this must
    /// outlast the pass. At least `1s`; default `5m`.
    #[serde(default = "default_hold", with = "duration_text")]
    pub hold: Duration,
    /// A run stops after this long, releasing what it holds. Default `1h`.
    #[serde(default = "default_deadline", with = "duration_text")]
    pub deadline: Duration,
    /// A pass keeps every message it leased and did not move leased until it
    /// ends (so that it never sees one twice). Past this many it stops
    /// leasing and ends (`held_limit`): memory stays bounded whatever the
    /// DLQ's size, and below SQS's 120,000 in-flight messages per queue.
    /// Messages past them are not examined: narrow the filter, or raise it.
    /// At least 1; default 100,000.
    #[serde(default = "default_max_held")]
    pub max_held: usize,
    /// Messages already redriven this many times are left in the DLQ, so a
    /// poison message cannot loop forever. Default 5.
    #[serde(default = "default_max_redrives")]
    pub max_redrives: u32,
    /// Remove the attributes the provider adds when it dead-letters a message
    /// (CloudPubSubDeadLetter*, DeadLetterReason...). Default true.
    #[serde(default = "default_true")]
    pub strip_dead_letter_attributes: bool,
    /// Default messages per second for a redrive, when `--rate` is not given:
    /// at least 1. Unset means unlimited.
    #[serde(default)]
    pub rate: Option<u32>,
    /// The journal file: audit trail and crash record. Default:
    /// `journal.jsonl` in `serve.data_dir` when that is set, else in
    /// `$XDG_STATE_HOME/dlq-bridge`; the CLI and `serve` use the same one.
    /// With several replicas on one claim, leave it unset: each pod then
    /// journals in its own data directory.
    #[serde(default)]
    pub journal: Option<PathBuf>,
    /// The journal is rotated past this size (bytes). Default 64 MiB.
    #[serde(default = "default_journal_max_bytes")]
    pub journal_max_bytes: u64,
    /// Rotated journal files kept (`journal.jsonl.1` ... `.N`). Default 5.
    /// Together with `journal_max_bytes` this bounds memory too: a message
    /// moved is remembered (about 100 bytes) until rotation deletes its
    /// record, so that a settle that did not take effect is retried rather
    /// than the message resent.
    #[serde(default = "default_journal_keep")]
    pub journal_keep: usize,
}

/// Where dlq-bridge keeps its state (journal, backups, exports) when the
/// config names no place: `$XDG_STATE_HOME/dlq-bridge`, else
/// `~/.local/state/dlq-bridge`.
pub fn state_dir() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("dlq-bridge"))
}

fn default_journal_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_journal_keep() -> usize {
    5
}

impl Default for RedriveConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            hold: default_hold(),
            deadline: default_deadline(),
            max_held: default_max_held(),
            max_redrives: default_max_redrives(),
            strip_dead_letter_attributes: true,
            rate: None,
            journal: None,
            journal_max_bytes: default_journal_max_bytes(),
            journal_keep: default_journal_keep(),
        }
    }
}

fn default_concurrency() -> usize {
    16
}
fn default_hold() -> Duration {
    Duration::from_secs(300)
}
fn default_deadline() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_held() -> usize {
    100_000
}
fn default_max_redrives() -> u32 {
    5
}
fn default_true() -> bool {
    true
}

/// One dead-letter queue. Exactly one of `sqs`, `pubsub` or `servicebus` is set.
/// It serializes in the shape it is written in, so a config round-trips.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The name used on the command line, in the API's URLs and in metrics:
    /// unique, made of letters, digits, `-`, `_` and `.`.
    pub name: String,
    pub kind: QueueKind,
    /// Where redriven messages go when the message itself does not say (SQS:
    /// queue name or URL; Pub/Sub: topic; Service Bus: entity path).
    pub source: Option<String>,
    pub reason_attribute: String,
    pub description_attribute: String,
    /// How often `serve` polls this queue. Default: `serve.poll_interval`.
    pub poll_interval: Option<Duration>,
    /// How long messages may stay in this DLQ, and what happens to older
    /// ones. Unset (the default): no retention policy.
    pub retention: Option<RetentionConfig>,
}

/// A queue's retention policy, applied by `serve` on the leader only (and by
/// `dlq-bridge retention` on demand). Age is measured from the message's
/// enqueue time; a message whose provider gives none is never expired.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Messages older than this are expired (`7d`, `36h`).
    #[serde(with = "duration_text")]
    pub max_age: Duration,
    /// What happens to expired messages. Default `alert`.
    #[serde(default)]
    pub action: RetentionAction,
    /// Directory for the backups `export-then-purge` writes (one JSONL file
    /// per run, the `export` format, named `QUEUE-RUN.jsonl`). Default:
    /// `retention/` under `serve.data_dir` (or `$XDG_STATE_HOME/dlq-bridge`).
    #[serde(default)]
    pub export_dir: Option<PathBuf>,
    /// Only list what would be purged (in the log and the `retention`
    /// command's output); purge nothing. Default false.
    #[serde(default)]
    pub dry_run: bool,
    /// How often `serve` applies the policy. Default `1h`.
    #[serde(default = "default_retention_check", with = "duration_text")]
    pub check_every: Duration,
}

/// What a retention policy does with expired messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetentionAction {
    /// Count them, export the `dlq_bridge_retention_expired_messages` metric
    /// and notify the alert sinks (kind `retention`); touch nothing.
    #[default]
    Alert,
    /// Write them to a backup file in `export_dir`, then delete them; each
    /// deletion goes to the journal.
    ExportThenPurge,
}

fn default_retention_check() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    Sqs(SqsQueueConfig),
    PubSub(PubSubQueueConfig),
    ServiceBus(ServiceBusQueueConfig),
}

impl QueueKind {
    pub fn backend_name(&self) -> &'static str {
        match self {
            Self::Sqs(_) => "sqs",
            Self::PubSub(_) => "pubsub",
            Self::ServiceBus(_) => "servicebus",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqsQueueConfig {
    /// The DLQ: a queue name, a full queue URL or a queue ARN.
    pub queue: String,
    /// AWS region. Default: the region the queue URL or ARN names, else the
    /// SDK's chain (AWS_REGION, profile), else us-east-1.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint override, e.g. a local emulator. Default: the SDK's chain,
    /// which reads AWS_ENDPOINT_URL_SQS.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Owner account of the queue, when it is not the caller's.
    #[serde(default)]
    pub account_id: Option<String>,
    /// Read the age of the oldest message from CloudWatch
    /// (`AWS/SQS ApproximateAgeOfOldestMessage`, the latest one-minute point
    /// of the last 15 minutes, marked `lagged`). SQS itself cannot tell it.
    /// Needs `cloudwatch:GetMetricStatistics`; the metric lives in the
    /// queue owner's account. Asked at most once a minute per queue (SQS
    /// publishes one point a minute). Default: false, and the age is known
    /// only when the reason sample covers the whole queue.
    #[serde(default)]
    pub cloudwatch: bool,
    /// CloudWatch endpoint override, e.g. an emulator. Default:
    /// AWS_ENDPOINT_URL_CLOUDWATCH, else AWS_ENDPOINT_URL, else the region's
    /// `https://monitoring.REGION.amazonaws.com`.
    #[serde(default)]
    pub cloudwatch_endpoint_url: Option<String>,
}

/// A Pub/Sub dead-letter subscription. On GCP, credentials come from
/// Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
/// user credentials, or the metadata server, which is how GKE Workload
/// Identity works); nothing secret goes in this file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PubSubQueueConfig {
    /// GCP project of the DLQ subscription.
    pub project: String,
    /// The subscription attached to the dead-letter topic: its short name (in
    /// `project`) or `projects/P/subscriptions/S`. It is the subscription
    /// dlq-bridge pulls, acks and counts; it must not be the subscription that
    /// has the dead-letter policy.
    pub subscription: String,
    /// Emulator `host:port`. Default: PUBSUB_EMULATOR_HOST; when neither is
    /// set, dlq-bridge talks to GCP. With an emulator, `stats` counts exactly
    /// (the emulator has no metrics); on GCP it reads Cloud Monitoring, which
    /// lags by 1-3 minutes.
    #[serde(default)]
    pub emulator_host: Option<String>,
    /// Opt-in targeted redrive. When set, every redriven copy carries this
    /// attribute, valued with the short name of the subscription the message
    /// failed on (from `CloudPubSubDeadLetterSourceSubscription`). Copies go
    /// back to the source topic, so every subscription of that topic receives
    /// them unless its filter says otherwise: give each subscription of the
    /// topic the filter
    /// `attributes.ATTR = "SUB" OR NOT attributes:ATTR`
    /// (ATTR this attribute, SUB that subscription's short name) and only the
    /// subscription that failed gets the copy, while ordinary messages (without
    /// the attribute) still reach everyone. Pub/Sub filters are set when a
    /// subscription is created. Use letters, digits and underscores (e.g.
    /// `dlq_bridge_target`) so the name needs no quoting in the filter. Unset
    /// (the default): no attribute is added.
    #[serde(default)]
    pub target_subscription_attribute: Option<String>,
}

/// A Service Bus dead-letter queue: the `$DeadLetterQueue` of a queue, or of a
/// topic subscription, or their transfer dead-letter queue (`sub_queue`).
/// Secrets never go in this file: the SAS connection string is read from the
/// environment variable named by `connection_string_env`; without one, Entra
/// ID is used through Azure Workload Identity (the
/// `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_CLIENT_ID`, `AZURE_TENANT_ID`
/// variables the AKS webhook injects), which needs `namespace`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceBusQueueConfig {
    /// Environment variable holding the SAS connection string
    /// (`Endpoint=sb://NS.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...`).
    /// `UseDevelopmentEmulator=true` in the string selects plain AMQP, for an
    /// emulator. Reading counts (`list`, metrics) needs a policy with the
    /// Manage right; browsing and redriving need Listen and Send. Unset: Entra
    /// ID through workload identity, with `namespace`.
    #[serde(default)]
    pub connection_string_env: Option<String>,
    /// The namespace, `NS` or `NS.servicebus.windows.net`. Default: the
    /// connection string's endpoint. Required for Entra ID.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The queue whose `$DeadLetterQueue` is managed. Set this, or `topic` and
    /// `subscription`.
    #[serde(default)]
    pub queue: Option<String>,
    /// The topic of the subscription whose `$DeadLetterQueue` is managed.
    /// Redriven copies go back to this topic, so by default every
    /// subscription of it receives them (see `target_subscription_property`).
    #[serde(default)]
    pub topic: Option<String>,
    /// The subscription (of `topic`) whose `$DeadLetterQueue` is managed.
    #[serde(default)]
    pub subscription: Option<String>,
    /// Base URL of the ATOM management endpoint that reports message counts.
    /// Default: `https://NS.servicebus.windows.net`, or
    /// `http://HOST:5300` when the connection string says
    /// `UseDevelopmentEmulator=true` (the port both Microsoft's emulator and
    /// the project's serve it on).
    #[serde(default)]
    pub management_endpoint: Option<String>,
    /// Opt-in targeted redrive for subscription DLQs. When set, every copy sent
    /// back to the topic carries this application property, valued with the
    /// name of the subscription the message failed on. Give each subscription
    /// SUB of the topic the SQL filter rule `[P] IS NULL OR [P] = 'SUB'` (P
    /// this property) in place of its default rule, and only the failing
    /// subscription receives the copy, while ordinary messages still reach
    /// every subscription. Unset (the default): no property is added and the
    /// copy fans out to every subscription. Example: `dlq_bridge_target`.
    #[serde(default)]
    pub target_subscription_property: Option<String>,
    /// Lifetime of the SAS tokens the adapter signs with the connection
    /// string's key for its AMQP links; a link renews them at 5/6 of it for
    /// as long as it lives (a long, rate-limited redrive). Default `1h`. No
    /// effect with a pre-signed `SharedAccessSignature` (which cannot be
    /// renewed: it must outlast the run) or with Entra ID.
    #[serde(default, with = "opt_duration_text", skip_serializing_if = "Option::is_none")]
    pub sas_token_ttl: Option<Duration>,
    /// How long the namespace keeps a link with no traffic on it before it
    /// detaches it: 10 minutes on Azure, which cannot be changed. The link
    /// that browses the DLQ is kept between calls (the sidecar's API and
    /// polls); once it has been idle for half of this it is attached again
    /// before use instead of being trusted. Default `10m`; set it for an
    /// emulator or a proxy that detaches idle links sooner.
    #[serde(default, with = "opt_duration_text", skip_serializing_if = "Option::is_none")]
    pub link_idle_timeout: Option<Duration>,
    /// With a key that lacks the Manage right the counts need, the depth and
    /// age are counted by browsing the DLQ from its first message, up to
    /// this many messages (exact below, a floor `at_least` at it). Raise it
    /// for a `depth_above` alert whose threshold lies above it; each poll
    /// browses that many messages. Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browse_count_limit: Option<usize>,
    /// Which dead-letter sub-queue of the queue or subscription is managed.
    /// `dead_letter` (the default): its `$DeadLetterQueue`, where consumers
    /// and MaxDeliveryCount put what failed. `transfer_dead_letter`: its
    /// `$Transfer/$DeadLetterQueue`, where Service Bus puts what
    /// auto-forwarding (`ForwardTo`, `ForwardDeadLetteredMessagesTo`) or a
    /// send-via transfer could not deliver (the target deleted, disabled or
    /// full, or too many hops); its depth is the entity's
    /// `TransferDeadLetterMessageCount`. Either way redriven copies go back
    /// to the queue, or the subscription's topic, so forwarding gets
    /// another try.
    #[serde(default, skip_serializing_if = "ServiceBusSubQueue::is_default")]
    pub sub_queue: ServiceBusSubQueue,
}

/// A Service Bus queue's or subscription's dead-letter sub-queue
/// (`servicebus.sub_queue`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceBusSubQueue {
    /// `<entity>/$DeadLetterQueue`.
    #[default]
    DeadLetter,
    /// `<entity>/$Transfer/$DeadLetterQueue`.
    TransferDeadLetter,
}

impl ServiceBusSubQueue {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What the YAML holds for a queue, before the backend sections are checked.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sqs: Option<SqsQueueConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pubsub: Option<PubSubQueueConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    servicebus: Option<ServiceBusQueueConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason_attribute: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description_attribute: Option<String>,
    #[serde(default, with = "opt_poll_interval_text", skip_serializing_if = "Option::is_none")]
    poll_interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retention: Option<RetentionConfig>,
}

impl Serialize for QueueConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (mut sqs, mut pubsub, mut servicebus) = (None, None, None);
        match &self.kind {
            QueueKind::Sqs(c) => sqs = Some(c.clone()),
            QueueKind::PubSub(c) => pubsub = Some(c.clone()),
            QueueKind::ServiceBus(c) => servicebus = Some(c.clone()),
        }
        RawQueue {
            name: self.name.clone(),
            sqs,
            pubsub,
            servicebus,
            source: self.source.clone(),
            reason_attribute: Some(self.reason_attribute.clone()),
            description_attribute: Some(self.description_attribute.clone()),
            poll_interval: self.poll_interval,
            retention: self.retention.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for QueueConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawQueue::deserialize(d)?;
        let mut kinds: Vec<QueueKind> = Vec::new();
        kinds.extend(raw.sqs.map(QueueKind::Sqs));
        kinds.extend(raw.pubsub.map(QueueKind::PubSub));
        kinds.extend(raw.servicebus.map(QueueKind::ServiceBus));
        if kinds.len() != 1 {
            return Err(serde::de::Error::custom(format!(
                "queue `{}` must set exactly one of `sqs`, `pubsub` or `servicebus` (found {})",
                raw.name,
                kinds.len()
            )));
        }
        let kind = kinds.remove(0);
        if let QueueKind::ServiceBus(sb) = &kind {
            let by_queue = sb.queue.is_some() && sb.topic.is_none() && sb.subscription.is_none();
            let by_sub = sb.queue.is_none() && sb.topic.is_some() && sb.subscription.is_some();
            if !(by_queue || by_sub) {
                return Err(serde::de::Error::custom(format!(
                    "queue `{}`: servicebus needs either `queue`, or both `topic` and `subscription`",
                    raw.name
                )));
            }
            if sb.connection_string_env.as_deref().is_none_or(|v| v.trim().is_empty())
                && sb.namespace.as_deref().is_none_or(|v| v.trim().is_empty())
            {
                return Err(serde::de::Error::custom(format!(
                    "queue `{}`: servicebus needs `connection_string_env` (SAS), or `namespace` for Entra ID",
                    raw.name
                )));
            }
            if sb.sas_token_ttl.is_some_and(|ttl| ttl < Duration::from_secs(2)) {
                return Err(serde::de::Error::custom(format!(
                    "queue `{}`: servicebus.sas_token_ttl must be at least 2s (a link renews its tokens at 5/6 of it)",
                    raw.name
                )));
            }
            if sb.link_idle_timeout.is_some_and(|t| t < Duration::from_secs(1)) {
                return Err(serde::de::Error::custom(format!(
                    "queue `{}`: servicebus.link_idle_timeout must be at least 1s",
                    raw.name
                )));
            }
            if sb.browse_count_limit == Some(0) {
                return Err(serde::de::Error::custom(format!(
                    "queue `{}`: servicebus.browse_count_limit must be at least 1",
                    raw.name
                )));
            }
        }
        Ok(QueueConfig {
            name: raw.name,
            kind,
            source: raw.source,
            // Filled from `defaults` once the whole file is read.
            reason_attribute: raw.reason_attribute.unwrap_or_default(),
            description_attribute: raw.description_attribute.unwrap_or_default(),
            poll_interval: raw.poll_interval,
            retention: raw.retention,
        })
    }
}

impl Config {
    /// What `serve` reads from the environment when it starts, and refuses to
    /// start without: the API token (`serve.token_env`) and the URLs of the
    /// alert sinks given by `url_env`. Loading a config does not look (the
    /// environment is not the config); `check` does, so that it says whether
    /// `serve` will start. Each problem is `(field, what is wrong)`; a URL is
    /// never quoted (it can carry a secret).
    pub fn serve_env_problems(&self, env: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let Some(var) = &self.serve.token_env
            && env(var).is_none_or(|t| t.trim().is_empty())
        {
            problems.push((
                "serve.token_env".to_string(),
                format!("environment variable {var} is not set (or holds only whitespace)"),
            ));
        }
        for (i, sink) in self.alerts.sinks.iter().enumerate() {
            let Some(var) = sink.target().and_then(|(_, t)| t.url_env.as_ref()) else {
                continue;
            };
            let field = format!("alerts.sinks[{i}]");
            match env(var) {
                None => problems.push((field, format!("environment variable {var} is not set"))),
                Some(url) if check_sink_url(&url).is_err() => problems.push((
                    field,
                    format!("environment variable {var}: does not hold an http:// or https:// URL with a host"),
                )),
                Some(_) => {}
            }
        }
        problems
    }

    /// The journal every command and `serve` use: `redrive.journal`, else
    /// `journal.jsonl` in `serve.data_dir`, else in the state directory.
    /// One rule, so that `runs` and a rerun's recovery find what `serve`
    /// journaled.
    pub fn journal_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.redrive.journal {
            return Some(p.clone());
        }
        let dir = self.serve.data_dir.clone().or_else(state_dir)?;
        Some(dir.join("journal.jsonl"))
    }

    /// Read, parse, apply environment overrides and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_yaml(&text, &path.display().to_string(), &env_overrides_from_process())
    }

    /// Parse `text` (named `origin` in errors) with the given overrides
    /// (`dotted.path` → raw value).
    pub fn from_yaml(text: &str, origin: &str, overrides: &[(String, String)]) -> Result<Self, ConfigError> {
        // The strict parse of the file alone gives errors their line numbers.
        let mut config: Config = parse_located(text, origin)?;
        if !overrides.is_empty() {
            let mut tree: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| invalid(origin, "", &e))?;
            if tree.is_null() {
                tree = serde_yaml::Value::Mapping(Default::default());
            }
            for (key, raw) in overrides {
                apply_override(&mut tree, key, raw)?;
            }
            config = serde_path_to_error::deserialize(tree).map_err(|e| {
                let field = e.path().to_string();
                let mut message = e.into_inner().to_string();
                if let Some(hint) = did_you_mean(&message) {
                    message.push_str(&format!("; did you mean `{hint}`?"));
                }
                ConfigError::Env {
                    var: env_var_for(&field),
                    message: format!("{field}: {message}"),
                }
            })?;
        }
        config.resolve_defaults();
        config.validate(origin, text, overrides)?;
        config.validate_alert_globs(text, origin)?;
        Ok(config)
    }

    fn resolve_defaults(&mut self) {
        for q in &mut self.queues {
            if q.reason_attribute.is_empty() {
                q.reason_attribute = self.defaults.reason_attribute.clone();
            }
            if q.description_attribute.is_empty() {
                q.description_attribute = self.defaults.description_attribute.clone();
            }
        }
    }

    /// The checks that need more than one field, or a field's value in
    /// context. Each error names the line and column where the field is
    /// written (or the environment override that set it).
    fn validate(&self, origin: &str, text: &str, overrides: &[(String, String)]) -> Result<(), ConfigError> {
        let err = |field: String, message: String| -> ConfigError {
            let overridden = overrides
                .iter()
                .find(|(key, _)| field == *key || field.starts_with(&format!("{key}.")));
            if let Some((key, _)) = overridden {
                return ConfigError::Env {
                    var: env_var_for(key),
                    message: format!("{field}: {message}"),
                };
            }
            let location = match locate(text, &field) {
                Some((line, column)) => format!("{origin}:{line}:{column}"),
                None => origin.to_string(),
            };
            ConfigError::Invalid {
                location,
                field,
                message,
            }
        };
        // An empty default would leave every queue without one (found by the
        // `config` fuzz target: `reason_attribute: &anchor` is an empty string).
        for (field, value) in [
            ("defaults.reason_attribute", &self.defaults.reason_attribute),
            ("defaults.description_attribute", &self.defaults.description_attribute),
        ] {
            if value.trim().is_empty() {
                return Err(err(field.into(), "must not be empty".into()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, q) in self.queues.iter().enumerate() {
            if let Some(message) = queue_name_problem(&q.name) {
                return Err(err(format!("queues[{i}].name"), message));
            }
            if !seen.insert(q.name.as_str()) {
                return Err(err(
                    format!("queues[{i}].name"),
                    format!("duplicate queue name `{}`", q.name),
                ));
            }
            for (field, value, what) in backend_names(&q.kind) {
                if value.is_some_and(|v| v.trim().is_empty()) {
                    return Err(err(
                        format!("queues[{i}].{field}"),
                        format!("must not be empty: {what}"),
                    ));
                }
            }
            if let QueueKind::Sqs(sqs) = &q.kind
                && let Some(url) = &sqs.cloudwatch_endpoint_url
            {
                let field = format!("queues[{i}].sqs.cloudwatch_endpoint_url");
                if !sqs.cloudwatch {
                    return Err(err(
                        field,
                        "is set but `cloudwatch` is not: add `cloudwatch: true` to read the oldest age from CloudWatch"
                            .into(),
                    ));
                }
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(err(field, format!("`{url}` is not an http(s) URL")));
                }
            }
            if q.source.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(err(
                    format!("queues[{i}].source"),
                    "must not be empty (leave it out to use the source the provider reports)".into(),
                ));
            }
        }
        for (i, r) in self.alerts.rules.iter().enumerate() {
            let conditions = [
                r.depth_above.is_some(),
                r.oldest_age_above.is_some(),
                r.growth.is_some(),
                r.new_reason,
            ];
            if conditions.iter().filter(|c| **c).count() != 1 {
                return Err(err(
                    format!("alerts.rules[{i}]"),
                    "set exactly one of `depth_above`, `oldest_age_above`, `growth`, `new_reason`".into(),
                ));
            }
            for (j, g) in r.queues.iter().enumerate() {
                if let Err(e) = glob::Pattern::new(g) {
                    return Err(err(
                        format!("alerts.rules[{i}].queues[{j}]"),
                        format!("invalid glob `{g}`: {e}"),
                    ));
                }
            }
        }
        for (i, sink) in self.alerts.sinks.iter().enumerate() {
            let Some((_, t)) = sink.target() else {
                return Err(err(
                    format!("alerts.sinks[{i}]"),
                    "set exactly one of `webhook`, `slack` or `alertmanager`".into(),
                ));
            };
            if t.url.is_some() == t.url_env.is_some() {
                return Err(err(
                    format!("alerts.sinks[{i}]"),
                    "set exactly one of `url` and `url_env`".into(),
                ));
            }
        }
        for (i, sch) in self.schedules.iter().enumerate() {
            let field = format!("schedules[{i}]");
            if self.queue(&sch.queue).is_none() {
                return Err(err(
                    format!("{field}.queue"),
                    format!("no queue named `{}` is configured", sch.queue),
                ));
            }
            match (&sch.every, &sch.cron) {
                // 0s would start a redrive the moment the last one ends, on
                // and on; cron's own floor is a minute.
                (Some(every), None) if *every < MIN_SCHEDULE_EVERY => {
                    return Err(err(
                        format!("{field}.every"),
                        format!("must be at least {}", humantime::format_duration(MIN_SCHEDULE_EVERY)),
                    ));
                }
                (Some(_), None) => {}
                (None, Some(expr)) => {
                    if let Err(e) = expr.parse::<croner::Cron>() {
                        return Err(err(
                            format!("{field}.cron"),
                            format!("invalid cron expression `{expr}`: {e}"),
                        ));
                    }
                }
                _ => {
                    return Err(err(field, "set exactly one of `every` and `cron`".into()));
                }
            }
            if let Some(Err(e)) = sch.filter.as_deref().map(crate::filter::Filter::compile) {
                return Err(err(format!("{field}.filter"), e.to_string()));
            }
            if sch.rate == Some(0) {
                return Err(err(format!("{field}.rate"), RATE_AT_LEAST_ONE.into()));
            }
            if sch.max == Some(0) {
                return Err(err(
                    format!("{field}.max"),
                    "must be at least 1 (leave it out for no cap)".into(),
                ));
            }
            // Else every scheduled run would fail on it, as `redrive --to ''`.
            if sch.to.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err(err(
                    format!("{field}.to"),
                    "must not be empty (leave it out to redrive to each message's source)".into(),
                ));
            }
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.retention
                .as_ref()
                .is_some_and(|r| r.max_age.is_zero() || r.check_every.is_zero())
            {
                return Err(err(
                    format!("queues[{i}].retention"),
                    "`max_age` and `check_every` must be longer than 0s".into(),
                ));
            }
        }
        if self.redrive.concurrency == 0 {
            return Err(err("redrive.concurrency".into(), "must be at least 1".into()));
        }
        let limits = &self.serve.admin_calls_per_second;
        for (kind, n) in [
            ("sqs", limits.sqs),
            ("pubsub", limits.pubsub),
            ("servicebus", limits.servicebus),
        ] {
            // 0 was taken as 1 call a second, the tightest limit, where it
            // reads as "no limit".
            if n == 0 {
                return Err(err(
                    format!("serve.admin_calls_per_second.{kind}"),
                    "must be at least 1 (admin calls per second; there is no unlimited setting)".into(),
                ));
            }
        }
        if self.redrive.rate == Some(0) {
            return Err(err("redrive.rate".into(), RATE_AT_LEAST_ONE.into()));
        }
        // 0 was taken as 1 kept file, quietly: fewer than a reader of the
        // config would expect, and the journal remembers what it keeps.
        if self.redrive.journal_keep == 0 {
            return Err(err(
                "redrive.journal_keep".into(),
                "must be at least 1 (rotated journal files kept)".into(),
            ));
        }
        if self.redrive.max_held == 0 {
            return Err(err(
                "redrive.max_held".into(),
                "must be at least 1 (a pass stops leasing once it holds this many messages it did not move)".into(),
            ));
        }
        if self.alerts.resend_delay < MIN_RESEND_DELAY {
            return Err(err(
                "alerts.resend_delay".into(),
                format!(
                    "must be at least {} (firing alerts are re-sent to Alertmanager this often)",
                    humantime::format_duration(MIN_RESEND_DELAY)
                ),
            ));
        }
        if self.redrive.hold < MIN_HOLD {
            return Err(err(
                "redrive.hold".into(),
                format!(
                    "must be at least {} (messages stay leased this long while a pass examines and sends them)",
                    humantime::format_duration(MIN_HOLD)
                ),
            ));
        }
        if self.redrive.deadline < MIN_DEADLINE {
            return Err(err(
                "redrive.deadline".into(),
                format!(
                    "must be at least {} (a run stops after this long)",
                    humantime::format_duration(MIN_DEADLINE)
                ),
            ));
        }
        if self.serve.leader_election.lease_duration < MIN_LEASE_DURATION {
            return Err(err(
                "serve.leader_election.lease_duration".into(),
                format!(
                    "must be at least {} (the leader renews every third of it; a shorter lease flaps between replicas)",
                    humantime::format_duration(MIN_LEASE_DURATION)
                ),
            ));
        }
        self.serve
            .check_listen()
            .map_err(|(field, message)| err(field.into(), message))?;
        Ok(())
    }

    /// Every glob of an alert rule must match a configured queue (when any
    /// is configured): one that
    /// matches none is a typo (`order*` for `orders`) and would leave the rule
    /// silently idle. Located at the glob in `text` when it can be found.
    fn validate_alert_globs(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        // A file with no queues (alerts only, or a shared fragment) has
        // nothing to match yet.
        if self.queues.is_empty() {
            return Ok(());
        }
        for (i, r) in self.alerts.rules.iter().enumerate() {
            for (j, g) in r.queues.iter().enumerate() {
                let Ok(pattern) = glob::Pattern::new(g) else { continue };
                if self.queues.iter().any(|q| pattern.matches(&q.name)) {
                    continue;
                }
                let location = match locate_rule_glob(text, i, g).or_else(|| locate(text, "alerts.rules")) {
                    Some((line, column)) => format!("{origin}:{line}:{column}"),
                    None => origin.to_string(),
                };
                let known: Vec<&str> = self.queues.iter().map(|q| q.name.as_str()).collect();
                return Err(ConfigError::Invalid {
                    location,
                    field: format!("alerts.rules[{i}].queues[{j}]"),
                    message: format!(
                        "`{g}` matches no configured queue (configured: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                });
            }
        }
        // A rule's name identifies its alert: the `rule` label of
        // dlq_bridge_alerts_firing and Alertmanager's `alertname`. Two rules
        // with one name on one queue (two unnamed `depth_above` thresholds)
        // would overwrite each other's series and resolve each other's alert.
        let applies = |r: &AlertRule, queue: &str| {
            r.queues
                .iter()
                .filter_map(|g| glob::Pattern::new(g).ok())
                .any(|p| p.matches(queue))
        };
        for (i, r) in self.alerts.rules.iter().enumerate() {
            let name = r.effective_name();
            for (k, earlier) in self.alerts.rules[..i].iter().enumerate() {
                if earlier.effective_name() != name {
                    continue;
                }
                let Some(q) = self
                    .queues
                    .iter()
                    .find(|q| applies(r, &q.name) && applies(earlier, &q.name))
                else {
                    continue;
                };
                let location = match locate_rule_glob(text, i, r.queues.first().map_or("*", String::as_str))
                    .or_else(|| locate(text, "alerts.rules"))
                {
                    Some((line, column)) => format!("{origin}:{line}:{column}"),
                    None => origin.to_string(),
                };
                return Err(ConfigError::Invalid {
                    location,
                    field: format!("alerts.rules[{i}]"),
                    message: format!(
                        "alerts.rules[{k}] has the same name `{name}` and both apply to queue `{}`: give each a distinct `name` (it is the alert's identity in dlq_bridge_alerts_firing and Alertmanager)",
                        q.name
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }
}

/// The 1-based line and column of glob `glob` in the `rule`-th item of
/// `alerts.rules` (block style), or of that item when the glob is not written
/// out (the default `*`), or of `rules:` for a flow-style list.
fn locate_rule_glob(text: &str, rule: usize, glob: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    let alerts = lines.iter().position(|l| l.starts_with("alerts:"))?;
    let (rules, rules_line) = lines
        .iter()
        .enumerate()
        .skip(alerts + 1)
        .take_while(|(_, l)| blank(l) || indent(l) > 0)
        .find(|(_, l)| l.trim_start().starts_with("rules:"))?;
    let key_indent = indent(rules_line);
    let rules_col = key_indent + 1;
    if rules_line
        .trim_start()
        .trim_start_matches("rules:")
        .trim_start()
        .starts_with('[')
    {
        return Some((rules + 1, rules_col));
    }
    // The list's items, up to the first line back at the key's indentation.
    let body: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .skip(rules + 1)
        .take_while(|(_, l)| {
            blank(l) || indent(l) > key_indent || (indent(l) == key_indent && l.trim_start().starts_with('-'))
        })
        .map(|(n, l)| (n, *l))
        .collect();
    let item_col = body.iter().find(|(_, l)| !blank(l)).map(|(_, l)| indent(l))?;
    let starts: Vec<usize> = body
        .iter()
        .filter(|(_, l)| indent(l) == item_col && l.trim_start().starts_with('-'))
        .map(|(n, _)| *n)
        .collect();
    let start = *starts.get(rule)?;
    let end = starts
        .get(rule + 1)
        .copied()
        .unwrap_or(body.last().map_or(start, |(n, _)| n + 1));
    let from = (start..end).find(|&n| lines[n].contains("queues:")).unwrap_or(start);
    for (n, l) in lines.iter().enumerate().take(end).skip(from) {
        for quoted in [format!("\"{glob}\""), format!("'{glob}'"), glob.to_string()] {
            if let Some(c) = l.find(&quoted) {
                return Some((n + 1, c + 1));
            }
        }
    }
    Some((start + 1, item_col + 1))
}

/// What `redrive.rate` and a schedule's `rate` must be: 0 is no rate at all.
const RATE_AT_LEAST_ONE: &str = "must be at least 1 (whole messages per second); leave it out for no limit";

/// Leases shorter than this expire while their batch is examined and sent.
const MIN_HOLD: Duration = Duration::from_secs(1);
const MIN_RESEND_DELAY: Duration = Duration::from_secs(1);

/// A run given less time than this ends before its first lease is back.
const MIN_DEADLINE: Duration = Duration::from_secs(1);

/// The shortest `every` a schedule may have.
const MIN_SCHEDULE_EVERY: Duration = Duration::from_secs(1);

/// The Lease holds whole seconds, and the leader must renew (every third of
/// it) well within it.
const MIN_LEASE_DURATION: Duration = Duration::from_secs(2);

impl ServeConfig {
    /// `listen` is an IP address and port, and only loopback unless a token
    /// is configured: otherwise `(field, what is wrong)`. Whether the token's
    /// variable is set is checked when `serve` starts and by `check` (the
    /// environment is not the config; see [`Config::serve_env_problems`]).
    pub fn check_listen(&self) -> Result<std::net::SocketAddr, (&'static str, String)> {
        let listen: std::net::SocketAddr = self.listen.trim().parse().map_err(|_| {
            (
                "serve.listen",
                format!(
                    "`{}` is not an IP address and port (e.g. `127.0.0.1:9090`, `[::1]:9090`, `0.0.0.0:9090`; host names are not resolved)",
                    self.listen
                ),
            )
        })?;
        match self.token_env.as_deref() {
            Some(var) if var.trim().is_empty() => Err((
                "serve.token_env",
                "must not be empty: it names the environment variable holding the API token".into(),
            )),
            None if !listen.ip().is_loopback() => Err((
                "serve.listen",
                format!(
                    "{listen} is not a loopback address: refusing to serve the API there without a token; set serve.token_env (the environment variable holding it), or listen on 127.0.0.1"
                ),
            )),
            _ => Ok(listen),
        }
    }
}

/// Why `name` cannot name a queue, if it cannot. Names are typed on the
/// command line and appear in URLs (`/v1/queues/NAME`), file names (backups,
/// exports) and metric labels, and alert rules match them with globs.
fn queue_name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() {
        return Some("must not be empty".into());
    }
    if name.starts_with('-') {
        return Some(format!(
            "queue name `{name}` starts with `-`, which reads as an option on the command line"
        ));
    }
    let bad = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))?;
    let what = match bad {
        ' ' => "a space".to_string(),
        c if c.is_whitespace() || c.is_control() => format!("the character {:?}", c),
        c => format!("`{c}`"),
    };
    Some(format!(
        "queue name `{name}` contains {what}: use letters, digits, `-`, `_` and `.` (names appear on the command line, in URLs, file names and metric labels)"
    ))
}

/// The names a queue's backend section must not leave empty: (field under
/// `queues[i]`, value when set, what it is).
fn backend_names(kind: &QueueKind) -> Vec<(&'static str, Option<&str>, &'static str)> {
    match kind {
        QueueKind::Sqs(c) => vec![("sqs.queue", Some(c.queue.as_str()), "the DLQ's queue name or URL")],
        QueueKind::PubSub(c) => vec![
            (
                "pubsub.project",
                Some(c.project.as_str()),
                "the GCP project of the dead-letter subscription",
            ),
            (
                "pubsub.subscription",
                Some(c.subscription.as_str()),
                "the subscription on the dead-letter topic",
            ),
        ],
        QueueKind::ServiceBus(c) => vec![
            (
                "servicebus.queue",
                c.queue.as_deref(),
                "the queue whose dead-letter queue is managed",
            ),
            ("servicebus.topic", c.topic.as_deref(), "the topic of the subscription"),
            (
                "servicebus.subscription",
                c.subscription.as_deref(),
                "the subscription whose dead-letter queue is managed",
            ),
        ],
    }
}

/// Where `field` (a path as errors name it: `queues[1].name`,
/// `redrive.concurrency`) is written in `text`: the 1-based line and column
/// of its key (or list item), or of the deepest part of the path that is
/// written there. Block YAML, and flow collections on one line; None when
/// not even the path's first key is in the file.
fn locate(text: &str, field: &str) -> Option<(usize, usize)> {
    enum Step<'a> {
        Key(&'a str),
        Index(usize),
    }
    let mut steps = Vec::new();
    for part in field.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            steps.push(Step::Key(key));
        }
        while let Some((i, after)) = rest.split_once(']') {
            steps.push(Step::Index(i.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start_matches(' ').len();
    let meaningful = |l: &str| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#') && t != "---"
    };
    // Whether `line[col..]` is the key `key` (plain or quoted) followed by `:`.
    let key_at = |line: &str, col: usize, key: &str| {
        let rest = line.get(col..).unwrap_or("");
        [format!("{key}:"), format!("\"{key}\":"), format!("'{key}':")]
            .iter()
            .find(|k| rest.starts_with(k.as_str()))
            .map(|k| k.len())
            .filter(|len| rest[*len..].is_empty() || rest[*len..].starts_with([' ', '\t']))
    };
    // The current block: lines [from, to), the column its keys are at (None:
    // that of its first line), and an item line whose first key follows `- `.
    let (mut from, mut to) = (0, lines.len());
    let mut key_col: Option<usize> = None;
    let mut item_line: Option<usize> = None;
    // Inside a flow collection: its line and where the search goes on.
    let mut flow: Option<(usize, usize)> = None;
    let mut found = None;
    for step in steps {
        if let Some((n, pos)) = flow {
            // `{a: 1, b: {c: 2}}`: a key follows `{`, `,` or a space.
            let Step::Key(key) = step else { break };
            let line = lines[n];
            let at = line.get(pos..).and_then(|rest| {
                rest.match_indices(&format!("{key}:"))
                    .map(|(i, _)| pos + i)
                    .find(|&i| i == 0 || matches!(line.as_bytes()[i - 1], b'{' | b',' | b' '))
            });
            let Some(at) = at else { break };
            found = Some((n + 1, at + 1));
            flow = Some((n, at + key.len() + 1));
            continue;
        }
        match step {
            Step::Key(key) => {
                let col_of = |i: usize| {
                    if item_line == Some(i) {
                        key_col
                    } else {
                        Some(indent(lines[i]))
                    }
                };
                let Some(first) = (from..to).find(|&i| meaningful(lines[i])) else {
                    break;
                };
                let want = key_col.unwrap_or_else(|| indent(lines[first]));
                let Some((n, len)) = (from..to)
                    .filter(|&i| meaningful(lines[i]) && col_of(i) == Some(want))
                    .find_map(|i| key_at(lines[i], want, key).map(|len| (i, len)))
                else {
                    break;
                };
                found = Some((n + 1, want + 1));
                let value = lines[n][want + len..].trim_start();
                if value.starts_with('{') || value.starts_with('[') {
                    flow = Some((n, lines[n].len() - value.len()));
                    continue;
                }
                // The value's block: the lines below, more indented, or a
                // list at the key's own indentation.
                from = n + 1;
                to = (from..to)
                    .find(|&i| {
                        meaningful(lines[i])
                            && (indent(lines[i]) < want
                                || (indent(lines[i]) == want && !lines[i].trim_start().starts_with('-')))
                    })
                    .unwrap_or(to);
                key_col = None;
                item_line = None;
            }
            Step::Index(index) => {
                let Some(first) = (from..to).find(|&i| meaningful(lines[i])) else {
                    break;
                };
                if !lines[first].trim_start().starts_with('-') {
                    break;
                }
                let dash = indent(lines[first]);
                let is_item = |i: usize| indent(lines[i]) == dash && lines[i].trim_start().starts_with('-');
                let Some(n) = (from..to).filter(|&i| is_item(i)).nth(index) else {
                    break;
                };
                found = Some((n + 1, dash + 1));
                let after_dash = &lines[n][dash + 1..];
                let content = dash + 1 + (after_dash.len() - after_dash.trim_start().len());
                let end = (n + 1..to)
                    .find(|&i| meaningful(lines[i]) && indent(lines[i]) <= dash)
                    .unwrap_or(to);
                if lines[n][content..].starts_with('{') || lines[n][content..].starts_with('[') {
                    flow = Some((n, content));
                } else if lines[n][content..].trim().is_empty() {
                    (from, to, key_col, item_line) = (n + 1, end, None, None);
                } else {
                    (from, to, key_col, item_line) = (n, end, Some(content), Some(n));
                }
            }
        }
    }
    found
}

fn parse_located<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let mut err = invalid(origin, &field, e.inner());
        if let (ConfigError::Invalid { location, .. }, Some(loc)) = (&mut err, e.inner().location())
            && let Some((line, column)) = refine_location(text, loc.line(), loc.column(), &field)
        {
            *location = format!("{origin}:{line}:{column}");
        }
        err
    })
}

/// serde_yaml places errors raised by a value's own checks (a bad duration, a
/// queue with two backends) at the start of the enclosing mapping or list, not
/// at the offending entry. Move such a location to the entry the field path
/// names: the line of the path's last key at or after `line`, or the item of
/// a list for a path ending in `[i]`. None when the location already fits or
/// the entry cannot be found.
fn refine_location(text: &str, line: usize, column: usize, field: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let last = field.rsplit('.').next()?;
    if let Some(index) = last
        .rsplit_once('[')
        .and_then(|(_, i)| i.strip_suffix(']'))
        .and_then(|i| i.parse::<usize>().ok())
    {
        // The list's items start with `-` in the column the error points at.
        let col = column.checked_sub(1)?;
        let is_item = |l: &&str| l.get(..col).is_some_and(|p| p.trim().is_empty()) && l[col..].starts_with('-');
        if !lines.get(line.checked_sub(1)?).is_some_and(is_item) {
            return None;
        }
        let (n, _) = lines
            .iter()
            .enumerate()
            .skip(line - 1)
            .filter(|(_, l)| is_item(l))
            .nth(index)?;
        return (n + 1 != line).then_some((n + 1, column));
    }
    if last.is_empty() || last.contains(['[', '?']) {
        return None;
    }
    let key = format!("{last}:");
    let (n, l) = lines.iter().enumerate().skip(line.checked_sub(1)?).find(|(_, l)| {
        let t = l.trim_start().trim_start_matches("- ").trim_start();
        t.starts_with(&key)
            || l.contains(&format!("{{{key}"))
            || l.contains(&format!("{{ {key}"))
            || l.contains(&format!(", {key}"))
    })?;
    let column = l.find(&key).map_or(1, |c| c + 1);
    (n + 1 != line).then_some((n + 1, column))
}

fn invalid(origin: &str, field: &str, e: &serde_yaml::Error) -> ConfigError {
    let location = match e.location() {
        Some(loc) => format!("{origin}:{}:{}", loc.line(), loc.column()),
        None => origin.to_string(),
    };
    // serde_yaml appends its own " at line N column M"; the location is
    // already in front, so keep the message short.
    let mut message = e.to_string();
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    // serde_yaml also puts its own idea of the path in front (`queues[0]: `,
    // sometimes shorter than ours); ours is already in the error.
    if let Some((prefix, rest)) = message.split_once(": ")
        && !prefix.contains(' ')
        && field.starts_with(prefix)
    {
        message = rest.to_string();
    }
    // A syntax error deep in a document ends its path with `?` (the key that
    // could not be read): name the part that was read, and say it is syntax.
    let syntax = field == "?" || field.ends_with(".?");
    let field = field.trim_end_matches('?').trim_end_matches('.');
    if syntax {
        message = format!("YAML syntax: {message} (check the indentation and brackets)");
    }
    if let Some(hint) = did_you_mean(&message) {
        message.push_str(&format!("; did you mean `{hint}`?"));
    }
    ConfigError::Invalid {
        location,
        field: if field.is_empty() || field == "." {
            "(top level)".into()
        } else {
            field.into()
        },
        message,
    }
}

/// For serde's "unknown field `X`, expected one of `A`, `B`..." (or unknown
/// variant), the expected name closest to X when it is a plausible typo.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (typo, expected) = rest.split_once('`')?;
    let (_, expected) = expected.split_once("expected")?;
    let typo = typo.to_ascii_lowercase();
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (edit_distance(&typo, &name.to_ascii_lowercase()), name))
        .filter(|(d, name)| *d <= 2.max(name.chars().count() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name.to_string())
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Collect `DLQ_BRIDGE__*` overrides from the process environment through the
/// `config` crate's environment source.
pub fn env_overrides_from_process() -> Vec<(String, String)> {
    use config::Source as _;
    let env = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR);
    let Ok(map) = env.collect() else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = map.into_iter().map(|(k, v)| (k, v.to_string())).collect();
    out.sort();
    out
}

fn env_var_for(dotted: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}",
        dotted.replace('.', ENV_SEPARATOR).to_uppercase()
    )
}

fn apply_override(tree: &mut serde_yaml::Value, key: &str, raw: &str) -> Result<(), ConfigError> {
    let var = env_var_for(key);
    if key.split('.').any(|seg| seg.is_empty()) {
        return Err(ConfigError::Env {
            var,
            message: "empty path segment".into(),
        });
    }
    let value: serde_yaml::Value = serde_yaml::from_str(raw).unwrap_or_else(|_| serde_yaml::Value::String(raw.into()));
    let mut node = tree;
    for seg in key.split('.') {
        let map = match node {
            serde_yaml::Value::Mapping(m) => m,
            serde_yaml::Value::Null => {
                *node = serde_yaml::Value::Mapping(Default::default());
                node.as_mapping_mut().expect("just set")
            }
            _ => {
                return Err(ConfigError::Env {
                    var,
                    message: format!("`{seg}` is inside a value that is not a map (lists cannot be overridden)"),
                });
            }
        };
        node = map
            .entry(serde_yaml::Value::String(seg.into()))
            .or_insert(serde_yaml::Value::Null);
    }
    *node = value;
    Ok(())
}

/// Serde for durations written as text: `30s`, `5m`, `1h30m`, `250ms`.
pub mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim())
            .map_err(|e| format!("invalid duration `{text}` ({e}); expected e.g. `30s`, `5m`, `1h30m`"))
    }
}

/// Like [`duration_text`], for optional fields.
pub mod opt_duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::duration_text::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_and_serve_share_one_journal() {
        let q = "queues:\n  - name: q\n    sqs:\n      queue: q\n";
        let c = |extra: &str| Config::from_yaml(&format!("{q}{extra}"), "t.yaml", &[]).unwrap();
        assert_eq!(
            c("redrive:\n  journal: /j/x.jsonl\nserve:\n  data_dir: /d\n").journal_path(),
            Some(PathBuf::from("/j/x.jsonl"))
        );
        assert_eq!(
            c("serve:\n  data_dir: /d\n").journal_path(),
            Some(PathBuf::from("/d/journal.jsonl"))
        );
        assert_eq!(c("").journal_path(), state_dir().map(|d| d.join("journal.jsonl")));
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, "test.yaml", &[])
    }

    /// The README says config/example.yaml documents every setting: each
    /// field the parser knows, section by section (as its own "unknown
    /// field, expected one of" error lists them), is set or shown in a
    /// comment there as `field:`.
    #[test]
    fn example_config_documents_every_field() {
        let example = include_str!("../config/example.yaml");
        let sections = [
            ("top level", "zz_unknown: 1\n"),
            ("defaults", "defaults: {zz_unknown: 1}\n"),
            ("redrive", "redrive: {zz_unknown: 1}\n"),
            ("queues[]", "queues:\n  - zz_unknown: 1\n"),
            ("queues[].sqs", "queues:\n  - name: a\n    sqs: {zz_unknown: 1}\n"),
            ("queues[].pubsub", "queues:\n  - name: a\n    pubsub: {zz_unknown: 1}\n"),
            (
                "queues[].servicebus",
                "queues:\n  - name: a\n    servicebus: {zz_unknown: 1}\n",
            ),
            (
                "queues[].retention",
                "queues:\n  - name: a\n    retention: {zz_unknown: 1}\n",
            ),
            ("serve", "serve: {zz_unknown: 1}\n"),
            (
                "serve.admin_calls_per_second",
                "serve: {admin_calls_per_second: {zz_unknown: 1}}\n",
            ),
            ("serve.leader_election", "serve: {leader_election: {zz_unknown: 1}}\n"),
            ("serve.dashboard", "serve: {dashboard: {zz_unknown: 1}}\n"),
            ("alerts", "alerts: {zz_unknown: 1}\n"),
            ("alerts.rules[]", "alerts: {rules: [{zz_unknown: 1}]}\n"),
            (
                "alerts.rules[].growth",
                "alerts: {rules: [{growth: {zz_unknown: 1}}]}\n",
            ),
            ("alerts.sinks[]", "alerts: {sinks: [{zz_unknown: 1}]}\n"),
            (
                "alerts.sinks[].webhook",
                "alerts: {sinks: [{webhook: {zz_unknown: 1}}]}\n",
            ),
            ("schedules[]", "schedules: [{zz_unknown: 1}]\n"),
        ];
        let mut missing = Vec::new();
        for (section, text) in sections {
            let err = parse(text).unwrap_err().to_string();
            let expected = err
                .split_once("expected")
                .unwrap_or_else(|| panic!("{section}: {err}"))
                .1;
            let fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            assert!(fields.len() > 1, "{section}: {err}");
            for field in fields {
                let shown = example.lines().any(|line| {
                    let line = line.trim_start().trim_start_matches('#').trim_start();
                    let line = line.trim_start_matches("- ").trim_start_matches('{');
                    line.starts_with(&format!("{field}:"))
                        || line.contains(&format!(" {field}:"))
                        || line.contains(&format!("{{{field}:"))
                });
                if !shown {
                    missing.push(format!("{section}.{field}"));
                }
            }
        }
        assert!(missing.is_empty(), "config/example.yaml does not show: {missing:?}");
    }

    #[test]
    fn shipped_configs_parse() {
        for (name, text) in [
            ("config/example.yaml", include_str!("../config/example.yaml")),
            ("config/demo.yaml", include_str!("../config/demo.yaml")),
        ] {
            Config::from_yaml(text, name, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn a_loaded_config_serializes_back_to_an_equivalent_file() {
        let text = include_str!("../config/example.yaml");
        let c = Config::from_yaml(text, "example", &[]).unwrap();
        let again = Config::from_yaml(&serde_yaml::to_string(&c).unwrap(), "again", &[]).unwrap();
        assert_eq!(
            serde_yaml::to_string(&again).unwrap(),
            serde_yaml::to_string(&c).unwrap()
        );
    }

    #[test]
    fn minimal_sqs_queue_takes_defaults() {
        let c = parse("queues:\n  - name: orders\n    sqs:\n      queue: orders-dlq\n").unwrap();
        let q = c.queue("orders").unwrap();
        assert_eq!(q.reason_attribute, "error");
        assert!(matches!(&q.kind, QueueKind::Sqs(s) if s.queue == "orders-dlq"));
        assert_eq!(c.redrive.hold, Duration::from_secs(300));
    }

    #[test]
    fn unknown_field_names_file_line_field_and_expected() {
        let err = parse("queues:\n  - name: orders\n    sqs:\n      queue: q\n      regoin: eu-west-1\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.yaml:5:"), "{err}");
        assert!(err.contains("queues[0].sqs"), "{err}");
        assert!(err.contains("unknown field `regoin`"), "{err}");
        assert!(err.contains("`region`"), "{err}");
        assert!(err.ends_with("did you mean `region`?"), "{err}");
    }

    #[test]
    fn suggestions_only_for_plausible_typos() {
        assert_eq!(
            did_you_mean("unknown field `concurency`, expected one of `concurrency`, `hold`"),
            Some("concurrency".into())
        );
        assert_eq!(
            did_you_mean("unknown variant `delet`, expected `alert` or `delete`"),
            Some("delete".into())
        );
        assert_eq!(
            did_you_mean("unknown field `kafka`, expected one of `sqs`, `pubsub`"),
            None
        );
        assert_eq!(did_you_mean("invalid type: string, expected u32"), None);
    }

    #[test]
    fn resend_delay_defaults_to_a_minute_and_is_at_least_a_second() {
        assert_eq!(parse("{}").unwrap().alerts.resend_delay, Duration::from_secs(60));
        let err = parse("alerts:\n  resend_delay: 500ms\n").unwrap_err().to_string();
        assert!(
            err.contains("test.yaml:2:") && err.contains("alerts.resend_delay"),
            "{err}"
        );
        assert_eq!(
            parse("alerts:\n  resend_delay: 2s\n").unwrap().alerts.resend_delay,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn errors_from_value_checks_point_at_the_entry() {
        let err = parse("redrive:\n  hold: 5m\n  deadline: 30\n").unwrap_err().to_string();
        assert!(
            err.starts_with("test.yaml:3:3: redrive.deadline: invalid duration"),
            "{err}"
        );
        let y = "queues:\n  - name: a\n    sqs: {queue: x}\n  - name: b\n    servicebus: {queue: y}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:4:3: queues[1]: queue `b`"), "{err}");
        let y = "queues:\n  - name: a\n    sqs: {queue: x, region: r}\n    retention: {check_every: 1h, max_age: 1 fortnight}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        assert!(err.contains("queues[0].retention.max_age"), "{err}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = parse("redrive:\n  hold: 5 parsecs\n").unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:2:"), "{err}");
        assert!(err.contains("redrive.hold"), "{err}");
        assert!(err.contains("invalid duration `5 parsecs`"), "{err}");
    }

    #[test]
    fn malformed_yaml_gives_position() {
        let err = parse("queues:\n  - name: [unclosed\n").unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:"), "{err}");
    }

    #[test]
    fn queue_needs_exactly_one_backend() {
        let err = parse("queues:\n  - name: a\n").unwrap_err().to_string();
        assert!(err.contains("exactly one of `sqs`, `pubsub` or `servicebus`"), "{err}");
        assert!(err.contains("queues[0]"), "{err}");
    }

    #[test]
    fn duplicate_names_rejected() {
        let y = "queues:\n  - name: a\n    sqs: {queue: x}\n  - name: a\n    sqs: {queue: y}\n";
        let err = parse(y).unwrap_err().to_string();
        assert_eq!(err, "test.yaml:4:5: queues[1].name: duplicate queue name `a`");
        // Flow style, and a list at its key's own indentation.
        let y = "queues:\n- {name: a, sqs: {queue: x}}\n- {sqs: {queue: y}, name: a}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:3:21: queues[1].name: duplicate"), "{err}");
    }

    #[test]
    fn locate_finds_keys_and_items_in_block_and_flow_yaml() {
        let y = "# a comment\nredrive:\n  hold: 5m\n\n  concurrency: 0\nqueues:\n  - name: a\n    sqs:\n      queue: x\n  -\n    name: b\n    pubsub: {project: p, subscription: ''}\nserve: {listen: 'x'}\n";
        assert_eq!(locate(y, "redrive.concurrency"), Some((5, 3)));
        assert_eq!(locate(y, "queues[0].name"), Some((7, 5)));
        assert_eq!(locate(y, "queues[0].sqs.queue"), Some((9, 7)));
        assert_eq!(locate(y, "queues[1]"), Some((10, 3)));
        assert_eq!(locate(y, "queues[1].name"), Some((11, 5)));
        assert_eq!(locate(y, "queues[1].pubsub.subscription"), Some((12, 26)));
        assert_eq!(locate(y, "serve.listen"), Some((13, 9)));
        // What is not written: the deepest part that is, or nothing.
        assert_eq!(locate(y, "redrive.rate"), Some((2, 1)));
        assert_eq!(locate(y, "queues[7].name"), Some((6, 1)));
        assert_eq!(locate(y, "alerts.rules[0]"), None);
        // `hold:` under another key is not `redrive.hold`.
        assert_eq!(locate("serve:\n  hold: 1\nredrive: {}\n", "serve.listen"), Some((1, 1)));
        assert_eq!(locate("a:\n  hold: 1\n", "hold"), None);
        // A key with nothing under it, CRLF line ends, odd input: no panic.
        assert_eq!(locate("redrive:\n", "redrive.rate"), Some((1, 1)));
        assert_eq!(locate("redrive:\r\n  rate: 0\r\n", "redrive.rate"), Some((2, 3)));
        for odd in [
            "queues:\n  -\u{3000}name: a\n",
            "queues: [\n",
            "- x\n- y\n",
            "queues:\n-\n",
            "\u{e9}: 1\n",
        ] {
            let _ = locate(odd, "queues[0].name");
            let _ = locate(odd, "queues[1].sqs.queue");
        }
    }

    /// README: a glob that matches no queue is an error with its file:line,
    /// whatever the YAML style (a flow-style `alerts:` had no line at all).
    #[test]
    fn alert_rule_errors_have_a_line_in_flow_style_too() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let err = parse(&format!(
            "{q}alerts: {{rules: [{{queues: [nope], new_reason: true}}]}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        let err = parse(&format!(
            "{q}alerts: {{rules: [{{new_reason: true}}, {{new_reason: true}}]}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("test.yaml:4:") && err.contains("same name"), "{err}");
    }

    /// An empty `to` was accepted and failed every scheduled run.
    #[test]
    fn a_schedule_s_destination_is_not_empty() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        for to in ["''", "' '"] {
            let err = parse(&format!("{q}schedules:\n  - {{queue: a, every: 1h, to: {to}}}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("test.yaml:5:") && err.contains("schedules[0].to: must not be empty"),
                "{err}"
            );
        }
        assert!(parse(&format!("{q}schedules:\n  - {{queue: a, every: 1h, to: elsewhere}}\n")).is_ok());
    }

    #[test]
    fn journal_keep_is_at_least_one() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let err = parse(&format!("{q}redrive:\n  journal_keep: 0\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "test.yaml:5:3: redrive.journal_keep: must be at least 1 (rotated journal files kept)"
        );
        assert_eq!(
            parse(&format!("{q}redrive:\n  journal_keep: 1\n"))
                .unwrap()
                .redrive
                .journal_keep,
            1
        );
    }

    #[test]
    fn admin_call_limits_are_at_least_one() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let err = parse(&format!("{q}serve:\n  admin_calls_per_second: {{servicebus: 0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:5:")
                && err.contains("serve.admin_calls_per_second.servicebus: must be at least 1"),
            "{err}"
        );
        let c = parse(&format!("{q}serve:\n  admin_calls_per_second: {{sqs: 1}}\n")).unwrap();
        assert_eq!(c.serve.admin_calls_per_second.sqs, 1);
    }

    #[test]
    fn validation_errors_name_the_line_and_overrides_their_variable() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let err = parse(&format!("{q}redrive:\n  hold: 1m\n  concurrency: 0\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "test.yaml:6:3: redrive.concurrency: must be at least 1");
        let err = Config::from_yaml(
            &format!("{q}redrive:\n  concurrency: 4\n"),
            "t",
            &[("redrive.concurrency".into(), "0".into())],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "environment override DLQ_BRIDGE__REDRIVE__CONCURRENCY: redrive.concurrency: must be at least 1"
        );
        let err = parse(&format!("{q}schedules:\n  - {{queue: a, every: 1h, rate: 0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:5:27: schedules[0].rate: must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn serve_listen_must_be_an_address_and_loopback_without_a_token() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let err = parse(&format!("{q}serve:\n  listen: notanaddr\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:5:3: serve.listen: `notanaddr` is not an IP address and port"),
            "{err}"
        );
        let err = parse(&format!("{q}serve:\n  poll_interval: 5s\n  listen: 0.0.0.0:9999\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:6:3: serve.listen: 0.0.0.0:9999 is not a loopback address"),
            "{err}"
        );
        assert!(err.contains("set serve.token_env"), "{err}");
        let err = parse(&format!("{q}serve: {{listen: '127.0.0.1:9', token_env: ''}}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("serve.token_env: must not be empty"), "{err}");
        for ok in [
            "serve: {listen: '0.0.0.0:9999', token_env: TOKEN}\n",
            "serve: {listen: '[::1]:9090'}\n",
            "serve: {listen: '127.0.0.2:0'}\n",
        ] {
            let c = parse(&format!("{q}{ok}")).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(c.serve.check_listen().is_ok());
        }
    }

    #[test]
    fn limits_that_mean_nothing_are_refused() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        for (redrive, says) in [
            (
                "rate: 0",
                "test.yaml:5:3: redrive.rate: must be at least 1 (whole messages per second)",
            ),
            ("hold: 0s", "test.yaml:5:3: redrive.hold: must be at least 1s"),
            ("hold: 500ms", "test.yaml:5:3: redrive.hold: must be at least 1s"),
            ("deadline: 0s", "test.yaml:5:3: redrive.deadline: must be at least 1s"),
            ("max_held: 0", "test.yaml:5:3: redrive.max_held: must be at least 1"),
        ] {
            let err = parse(&format!("{q}redrive:\n  {redrive}\n")).unwrap_err().to_string();
            assert!(err.starts_with(says), "{redrive}: {err}");
        }
        let c = parse(&format!(
            "{q}redrive: {{rate: 1, hold: 1s, deadline: 1s, max_held: 1}}\n"
        ))
        .unwrap();
        assert_eq!(c.redrive.rate, Some(1));
        assert_eq!(c.redrive.max_held, 1);
    }

    #[test]
    fn a_schedule_every_0s_is_refused() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        for every in ["0s", "500ms"] {
            let err = parse(&format!("{q}schedules:\n  - queue: a\n    every: {every}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("test.yaml:6:5: schedules[0].every: must be at least 1s"),
                "{every}: {err}"
            );
        }
        let c = parse(&format!("{q}schedules:\n  - {{queue: a, every: 1s}}\n")).unwrap();
        assert_eq!(c.schedules[0].every, Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_lease_too_short_to_renew_is_refused() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        for d in ["0s", "1s", "500ms"] {
            let err = parse(&format!("{q}serve:\n  leader_election:\n    lease_duration: {d}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("test.yaml:6:5: serve.leader_election.lease_duration: must be at least 2s"),
                "{d}: {err}"
            );
        }
        let c = parse(&format!("{q}serve:\n  leader_election: {{lease_duration: 2s}}\n")).unwrap();
        assert_eq!(c.serve.leader_election.lease_duration, Duration::from_secs(2));
    }

    #[test]
    fn queue_names_and_backend_names_are_checked() {
        let sqs = |name: &str, queue: &str| format!("queues:\n  - name: {name}\n    sqs: {{queue: {queue}}}\n");
        for (name, says) in [
            ("'my orders'", "contains a space"),
            ("orders/eu", "contains `/`"),
            ("'-orders'", "starts with `-`"),
            ("'orders*'", "contains `*`"),
        ] {
            let err = parse(&sqs(name, "x")).unwrap_err().to_string();
            assert!(
                err.starts_with("test.yaml:2:5: queues[0].name: queue name"),
                "{name}: {err}"
            );
            assert!(err.contains(says), "{name}: {err}");
        }
        parse(&sqs("orders-eu_1.v2", "x")).unwrap();
        let err = parse(&sqs("a", "''")).unwrap_err().to_string();
        assert!(
            err.starts_with("test.yaml:3:11: queues[0].sqs.queue: must not be empty"),
            "{err}"
        );
        let err = parse("queues:\n  - name: a\n    pubsub:\n      project: p\n      subscription: ' '\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:5:7: queues[0].pubsub.subscription: must not be empty"),
            "{err}"
        );
        let err = parse("queues:\n  - name: a\n    servicebus: {namespace: n, queue: ''}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("queues[0].servicebus.queue: must not be empty"), "{err}");
        let err = parse("queues:\n  - name: a\n    source: ''\n    sqs: {queue: x}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:3:5: queues[0].source: must not be empty"),
            "{err}"
        );
    }

    #[test]
    fn env_override_sets_nested_value_and_reports_bad_ones() {
        let y = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let c = Config::from_yaml(y, "t", &[("redrive.concurrency".into(), "9".into())]).unwrap();
        assert_eq!(c.redrive.concurrency, 9);
        let err = Config::from_yaml(y, "t", &[("redrive.concurency".into(), "9".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("DLQ_BRIDGE__REDRIVE__CONCURENCY"), "{err}");
        assert!(err.contains("unknown field `concurency`"), "{err}");
    }

    #[test]
    fn poll_intervals_under_a_second_are_refused_where_written() {
        let err = parse("serve:\n  listen: 127.0.0.1:1\n  poll_interval: 0s\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.yaml:3:"), "{err}");
        assert!(
            err.contains("serve.poll_interval") && err.contains("at least 1s"),
            "{err}"
        );
        let y = "queues:\n  - name: a\n    sqs: {queue: x, region: r}\n    poll_interval: 500ms\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        assert!(err.contains("queues[0].poll_interval"), "{err}");
        assert_eq!(
            parse("serve:\n  poll_interval: 1s\n").unwrap().serve.poll_interval,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn sink_urls_and_growth_thresholds_are_checked_at_load() {
        let y = "alerts:\n  sinks:\n    - webhook: {url: \"not a url\"}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:3:"), "{err}");
        assert!(
            err.contains("alerts.sinks[0].webhook.url") && err.contains("not a URL"),
            "{err}"
        );
        // A mistyped Slack URL still holds its secret: the error leaves it out.
        let y = "alerts:\n  sinks:\n    - slack: {url: \"htps//hooks.slack.com/services/T0/B0/S3CRET\"}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(
            err.contains("alerts.sinks[0].slack.url") && err.contains("not a URL"),
            "{err}"
        );
        assert!(!err.contains("S3CRET"), "{err}");
        let y = "alerts:\n  sinks:\n    - slack:\n        url: ftp://hooks.example/x\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        assert!(err.contains("http:// or https://"), "{err}");
        assert!(parse("alerts:\n  sinks:\n    - alertmanager: {url: \"http://am:9093\"}\n").is_ok());
        let y = "alerts:\n  rules:\n    - depth_above: 1\n    - growth: {messages: 0, window: 5m}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:4:"), "{err}");
        assert!(
            err.contains("alerts.rules[1].growth.messages") && err.contains("at least 1"),
            "{err}"
        );
    }

    #[test]
    fn a_rule_glob_that_matches_no_queue_is_an_error_at_its_line() {
        let queues = "queues:\n  - name: orders\n    sqs: {queue: x, region: r}\n";
        let y = format!(
            "{queues}alerts:\n  rules:\n    - name: orders-depth\n      depth_above: 1\n      queues: [\"orders\"]\n    - name: typo\n      depth_above: 1\n      queues:\n        - \"orders\"\n        - \"order-*\"\n"
        );
        let err = parse(&y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:13:11: alerts.rules[1].queues[1]"), "{err}");
        assert!(
            err.contains("`order-*` matches no configured queue (configured: orders)"),
            "{err}"
        );
        // Flow style: the list's line.
        let y = format!("{queues}alerts:\n  rules: [{{depth_above: 1, queues: [nope]}}]\n");
        let err = parse(&y).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:5:3:"), "{err}");
        // The default (every queue) and a matching glob are fine.
        assert!(
            parse(&format!(
                "{queues}alerts:\n  rules:\n    - depth_above: 1\n    - {{new_reason: true, queues: [\"ord*\"]}}\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn two_rules_with_one_name_on_one_queue_are_refused() {
        let queues = "queues:\n  - name: orders\n    sqs: {queue: x, region: r}\n  - name: pay\n    sqs: {queue: y, region: r}\n";
        // Two unnamed thresholds: both would be `depth_above` on `orders`.
        let y = format!("{queues}alerts:\n  rules:\n    - depth_above: 10\n    - depth_above: 100\n");
        let err = parse(&y).unwrap_err().to_string();
        assert!(err.contains("alerts.rules[1]"), "{err}");
        assert!(
            err.contains("alerts.rules[0] has the same name `depth_above`") && err.contains("queue `orders`"),
            "{err}"
        );
        let y = format!(
            "{queues}alerts:\n  rules:\n    - {{name: a, depth_above: 10}}\n    - {{name: a, growth: {{messages: 1, window: 1m}}}}\n"
        );
        assert!(parse(&y).is_err());
        // Distinct names, or the same name on disjoint queues, are fine.
        for ok in [
            "    - {name: warn, depth_above: 10}\n    - {name: page, depth_above: 100}\n",
            "    - {depth_above: 10, queues: [orders]}\n    - {depth_above: 100, queues: [pay]}\n",
            "    - depth_above: 10\n    - new_reason: true\n",
        ] {
            assert!(parse(&format!("{queues}alerts:\n  rules:\n{ok}")).is_ok(), "{ok}");
        }
    }

    #[test]
    fn retention_parses_with_defaults_and_rejects_unknown_actions() {
        let y = "queues:\n  - name: a\n    sqs: {queue: x}\n    retention: {max_age: 7d, action: export-then-purge, export_dir: /b}\n  - name: b\n    sqs: {queue: y}\n    retention: {max_age: 36h}\n";
        let c = parse(y).unwrap();
        let a = c.queue("a").unwrap().retention.as_ref().unwrap();
        assert_eq!(a.max_age, Duration::from_secs(7 * 86400));
        assert_eq!(a.action, RetentionAction::ExportThenPurge);
        assert_eq!(a.check_every, Duration::from_secs(3600));
        let b = c.queue("b").unwrap().retention.as_ref().unwrap();
        assert_eq!((b.action, b.dry_run), (RetentionAction::Alert, false));
        let err = parse("queues:\n  - name: a\n    sqs: {queue: x}\n    retention: {max_age: 1d, action: delete}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `delete`"), "{err}");
    }

    #[test]
    fn empty_default_attributes_are_rejected() {
        // fuzz/corpus/config/regression-empty-default-reason.yaml
        let err = parse("defaults: {reason_attribute: &why}\nqueues:\n  - name: a\n    sqs: {queue: x}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("defaults.reason_attribute: must not be empty"), "{err}");
        let err = parse("defaults: {description_attribute: ''}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("defaults.description_attribute"), "{err}");
    }

    #[test]
    fn per_queue_reason_attribute_overrides_default() {
        let y = "defaults: {reason_attribute: why}\nqueues:\n  - name: a\n    sqs: {queue: x}\n  - name: b\n    reason_attribute: cause\n    sqs: {queue: y}\n";
        let c = parse(y).unwrap();
        assert_eq!(c.queue("a").unwrap().reason_attribute, "why");
        assert_eq!(c.queue("b").unwrap().reason_attribute, "cause");
    }

    #[test]
    fn servicebus_sas_token_ttl_parses_and_refuses_less_than_two_seconds() {
        let y = |ttl: &str| {
            format!(
                "queues:\n  - name: sb\n    servicebus: {{connection_string_env: X, queue: q, sas_token_ttl: {ttl}}}\n"
            )
        };
        let c = parse(&y("15m")).unwrap();
        let QueueKind::ServiceBus(sb) = &c.queue("sb").unwrap().kind else {
            panic!("a Service Bus queue")
        };
        assert_eq!(sb.sas_token_ttl, Some(Duration::from_secs(900)));
        let err = parse(&y("1s")).unwrap_err().to_string();
        assert!(err.contains("sas_token_ttl must be at least 2s"), "{err}");
        assert!(err.contains("test.yaml"), "{err}");
    }

    #[test]
    fn servicebus_sub_queue_selects_the_transfer_dead_letter_queue_and_refuses_other_values() {
        let yaml = |extra: &str| {
            format!("queues:\n  - name: sb\n    servicebus:\n      connection_string_env: X\n      queue: q\n{extra}")
        };
        let sub_queue = |c: &Config| match &c.queue("sb").unwrap().kind {
            QueueKind::ServiceBus(sb) => sb.sub_queue,
            _ => unreachable!(),
        };
        assert_eq!(sub_queue(&parse(&yaml("")).unwrap()), ServiceBusSubQueue::DeadLetter);
        let transfer = parse(&yaml("      sub_queue: transfer_dead_letter\n")).unwrap();
        assert_eq!(sub_queue(&transfer), ServiceBusSubQueue::TransferDeadLetter);
        let err = parse(&yaml("      sub_queue: $Transfer/$DeadLetterQueue\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.yaml:6:"), "the line of the field: {err}");
        assert!(err.contains("queues[0].servicebus.sub_queue"), "{err}");
        assert!(
            err.contains("`dead_letter`") && err.contains("`transfer_dead_letter`"),
            "says what it takes: {err}"
        );
    }

    #[test]
    fn servicebus_link_idle_timeout_parses_and_refuses_less_than_a_second() {
        let y = |t: &str| {
            format!(
                "queues:\n  - name: sb\n    servicebus: {{connection_string_env: X, queue: q, link_idle_timeout: {t}}}\n"
            )
        };
        let c = parse(&y("2s")).unwrap();
        let QueueKind::ServiceBus(sb) = &c.queue("sb").unwrap().kind else {
            panic!("a Service Bus queue")
        };
        assert_eq!(sb.link_idle_timeout, Some(Duration::from_secs(2)));
        let err = parse(&y("500ms")).unwrap_err().to_string();
        assert!(err.contains("link_idle_timeout must be at least 1s"), "{err}");
        assert!(err.contains("test.yaml"), "{err}");
    }
}

/// The chart's `values.schema.json` lists the keys of each config section it
/// checks strictly (`additionalProperties: false`): a key missing there is
/// refused by `helm install` although dlq-bridge reads it.
#[cfg(test)]
mod chart_schema {
    use std::collections::BTreeSet;

    use serde::de::{DeserializeOwned, Deserializer, Error as _, Visitor, value::Error};

    use super::*;

    /// A deserializer that only records the field names a derived
    /// `Deserialize` asks for.
    struct FieldNames<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for FieldNames<'_> {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            *self.0 = fields;
            Err(Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    fn fields_of<T: DeserializeOwned>() -> BTreeSet<&'static str> {
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(FieldNames(&mut fields));
        assert!(
            !fields.is_empty(),
            "{} is not a derived struct",
            std::any::type_name::<T>()
        );
        fields.iter().copied().collect()
    }

    #[test]
    fn every_strict_section_of_the_charts_schema_lists_the_keys_dlq_bridge_reads() {
        let schema: serde_json::Value = serde_json::from_str(include_str!("../charts/dlq-bridge/values.schema.json"))
            .expect("values.schema.json is JSON");
        let config = &schema["properties"]["config"];
        let queue = &config["properties"]["queues"]["items"];
        let sections: [(&str, &serde_json::Value, BTreeSet<&str>); 12] = [
            ("config", config, fields_of::<Config>()),
            (
                "config.defaults",
                &config["properties"]["defaults"],
                fields_of::<QueueDefaults>(),
            ),
            (
                "config.redrive",
                &config["properties"]["redrive"],
                fields_of::<RedriveConfig>(),
            ),
            (
                "config.serve",
                &config["properties"]["serve"],
                fields_of::<ServeConfig>(),
            ),
            (
                "config.serve.dashboard",
                &config["properties"]["serve"]["properties"]["dashboard"],
                fields_of::<DashboardConfig>(),
            ),
            (
                "config.serve.admin_calls_per_second",
                &config["properties"]["serve"]["properties"]["admin_calls_per_second"],
                fields_of::<AdminCallLimits>(),
            ),
            (
                "config.alerts",
                &config["properties"]["alerts"],
                fields_of::<AlertsConfig>(),
            ),
            ("config.queues[]", queue, fields_of::<RawQueue>()),
            (
                "config.queues[].sqs",
                &queue["properties"]["sqs"],
                fields_of::<SqsQueueConfig>(),
            ),
            (
                "config.queues[].pubsub",
                &queue["properties"]["pubsub"],
                fields_of::<PubSubQueueConfig>(),
            ),
            (
                "config.queues[].servicebus",
                &queue["properties"]["servicebus"],
                fields_of::<ServiceBusQueueConfig>(),
            ),
            (
                "config.queues[].retention",
                &queue["properties"]["retention"],
                fields_of::<RetentionConfig>(),
            ),
        ];
        let mut drift = Vec::new();
        for (path, node, fields) in &sections {
            let Some(listed) = node["properties"].as_object() else {
                // Not checked key by key by the chart: dlq-bridge checks it.
                assert_ne!(node["additionalProperties"], false, "{path}: strict, but lists no keys");
                continue;
            };
            assert_eq!(node["additionalProperties"], false, "{path}: lists keys but takes any");
            let listed: BTreeSet<&str> = listed.keys().map(String::as_str).collect();
            for missing in fields.difference(&listed) {
                drift.push(format!("{path}.{missing}: read by dlq-bridge, refused by the chart"));
            }
            for unknown in listed.difference(fields) {
                drift.push(format!("{path}.{unknown}: allowed by the chart, unknown to dlq-bridge"));
            }
        }
        assert!(
            drift.is_empty(),
            "values.schema.json has drifted:\n{}",
            drift.join("\n")
        );
    }
}
