//! The `defaults` and `queues` sections: each queue with exactly one backend
//! section (`sqs`, `pubsub`, `servicebus`) and its retention policy. A queue
//! is read through `RawQueue` so that its backend sections are checked
//! together, and written back in the same shape.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::durations::{duration_text, opt_duration_text, opt_poll_interval_text};

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
    /// Read the DLQ even though it has a RedrivePolicy of its own (a
    /// dead-letter queue for the DLQ). Every receive dlq-bridge makes
    /// (`inspect`, a dry run, serve's reason sample, the messages a redrive
    /// does not match) counts toward that policy's maxReceiveCount, and SQS
    /// then moves a message on to the next queue instead of handing it
    /// over. Default: false, and every command that receives from such a
    /// DLQ is refused, naming the policy (counts and `list` depths still work).
    #[serde(default)]
    pub reads_may_move_messages: bool,
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
    /// The Pub/Sub API host on GCP, for a locational endpoint
    /// (`us-east1-pubsub.googleapis.com`): a topic whose message storage
    /// policy enforces regions in transit refuses publishes and pulls that
    /// reach another region (FAILED_PRECONDITION), and ordering keys are
    /// kept only for messages published in one region. Default: the global
    /// `pubsub.googleapis.com`. A host name, with `:port` when it is not 443
    /// (a private endpoint behind a proxy); always over TLS, trusting the CAs
    /// of SSL_CERT_FILE when set, else the system's.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The Cloud Monitoring API host that `stats` reads depth and age from on
    /// GCP, for a network that reaches Google's APIs only through a private
    /// endpoint (Private Service Connect). Default: `monitoring.googleapis.com`.
    /// A host name, with `:port` when it is not 443; over TLS, trusting the
    /// CAs of SSL_CERT_FILE (or SSL_CERT_DIR) when set, else the system's (with neither, the
    /// call fails: unlike `endpoint`, it has no built-in CAs to fall back on).
    #[serde(default)]
    pub monitoring_endpoint: Option<String>,
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
    #[serde(default, deserialize_with = "super::env::opt_var_name")]
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
pub(super) struct RawQueue {
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
            // The bounds of single fields are checked with the whole file
            // (`Config::validate`), where an error can name the field's line.
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

/// Why `name` cannot name a queue, if it cannot. Names are typed on the
/// command line and appear in URLs (`/v1/queues/NAME`), file names (backups,
/// exports) and metric labels, and alert rules match them with globs.
pub(super) fn queue_name_problem(name: &str) -> Option<String> {
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
pub(super) fn backend_names(kind: &QueueKind) -> Vec<(&'static str, Option<&str>, &'static str)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::parse;

    #[test]
    fn queue_needs_exactly_one_backend() {
        let err = parse("queues:\n  - name: a\n").unwrap_err().to_string();
        assert!(err.contains("exactly one of `sqs`, `pubsub` or `servicebus`"), "{err}");
        assert!(err.contains("queues[0]"), "{err}");
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
            err.starts_with("test.yaml:3:11: queues[0].sqs.queue (queue `a`): must not be empty"),
            "{err}"
        );
        let err = parse("queues:\n  - name: a\n    pubsub:\n      project: p\n      subscription: ' '\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:5:7: queues[0].pubsub.subscription (queue `a`): must not be empty"),
            "{err}"
        );
        let err = parse("queues:\n  - name: a\n    servicebus: {namespace: n, queue: ''}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("queues[0].servicebus.queue (queue `a`): must not be empty"),
            "{err}"
        );
        let err = parse("queues:\n  - name: a\n    source: ''\n    sqs: {queue: x}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:3:5: queues[0].source (queue `a`): must not be empty"),
            "{err}"
        );
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
        assert!(
            err.starts_with("test.yaml:3:54: queues[0].servicebus.sas_token_ttl (queue `sb`): must be at least 2s"),
            "{err}"
        );
        let block = "queues:\n  - name: sb\n    servicebus:\n      connection_string_env: X\n      queue: q\n";
        for (field, value, says) in [
            ("sas_token_ttl", "1s", "must be at least 2s"),
            ("link_idle_timeout", "500ms", "must be at least 1s"),
            ("browse_count_limit", "0", "must be at least 1"),
        ] {
            let err = parse(&format!("{block}      {field}: {value}\n"))
                .unwrap_err()
                .to_string();
            let want = format!("test.yaml:6:7: queues[0].servicebus.{field} (queue `sb`): {says}");
            assert!(err.starts_with(&want), "{err}");
        }
        // Each retention duration is named on its own line.
        let retention = "queues:\n  - name: q\n    sqs: {queue: q}\n    retention:\n      action: alert\n";
        for (field, line) in [("max_age", 6), ("check_every", 7)] {
            let (age, every) = if field == "max_age" { ("0s", "1h") } else { ("1h", "0s") };
            let err = parse(&format!(
                "{retention}      max_age: {age}\n      check_every: {every}\n"
            ))
            .unwrap_err()
            .to_string();
            let want = format!("test.yaml:{line}:7: queues[0].retention.{field} (queue `q`): must be longer than 0s");
            assert!(err.starts_with(&want), "{err}");
        }
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
        assert!(
            err.starts_with("test.yaml:3:54: queues[0].servicebus.link_idle_timeout (queue `sb`): must be at least 1s"),
            "{err}"
        );
    }
}
