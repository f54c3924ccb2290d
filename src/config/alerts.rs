//! The `alerts` section: rules, the sinks notifications go to, and the
//! checks made while the file is read (a sink's URL, a growth threshold), so
//! that such an error names its line.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::default_true;
use super::durations::{duration_text, opt_duration_text};

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
    /// Fires once for each failure reason never seen before on the queue,
    /// compared by pattern (numbers, IDs and quoted values replaced).
    #[serde(default)]
    pub new_reason: bool,
    /// The condition must hold this long before the alert fires.
    #[serde(default, rename = "for", with = "duration_text")]
    pub for_: Duration,
    /// A firing alert resolves only once the condition has stayed clear this
    /// long (Prometheus's `keep_firing_for`): a depth hovering at the
    /// threshold otherwise fires and resolves at every crossing, to every
    /// sink, whatever `repeat` says.
    #[serde(default, with = "duration_text")]
    pub keep_firing_for: Duration,
    /// A firing alert is sent again after this long.
    #[serde(default = "default_repeat", with = "duration_text")]
    pub repeat: Duration,
    /// Send a notice when the condition clears. Alertmanager is told in any
    /// case: its alert would otherwise stay active until its `endsAt`.
    #[serde(default = "default_true")]
    pub send_resolved: bool,
}

/// The names of the rules' conditions, as [`AlertRule::kind`] gives them.
pub const KINDS: [&str; 4] = ["depth_above", "oldest_age_above", "growth", "new_reason"];

impl AlertRule {
    /// The condition this rule tests: `depth_above`, `oldest_age_above`,
    /// `growth` or `new_reason`.
    /// One of [`KINDS`].
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
    /// More than 0: a rule over an empty window could never fire.
    #[serde(serialize_with = "duration_text::serialize", deserialize_with = "positive_window")]
    pub window: Duration,
}

fn positive_window<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match duration_text::deserialize(d)? {
        Duration::ZERO => Err(serde::de::Error::custom(
            "must be longer than 0s (no message arrives within an empty window: the rule could never fire)",
        )),
        w => Ok(w),
    }
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
    /// Alertmanager's `/api/v2/alerts`; `url` is Alertmanager's base URL (a
    /// URL that ends in `/api/v2/alerts` is taken as that endpoint).
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
    #[serde(default, deserialize_with = "super::env::opt_var_name")]
    pub url_env: Option<String>,
    /// Extra labels (Alertmanager) or fields (webhook) added to every notification.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

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
        let y = "alerts:\n  rules:\n    - growth: {messages: 5, window: 0s}\n";
        let err = parse(y).unwrap_err().to_string();
        assert!(
            err.contains("alerts.rules[0].growth.window") && err.contains("longer than 0s"),
            "{err}"
        );
    }

    /// Settings that would make a rule page at every poll, or that it
    /// ignores, are refused where they are written.
    #[test]
    fn rule_settings_that_spam_or_do_nothing_are_refused_at_their_line() {
        for (y, field, says) in [
            (
                "alerts:\n  rules:\n    - depth_above: 1\n      repeat: 0s\n",
                "alerts.rules[0].repeat",
                "longer than 0s",
            ),
            (
                "alerts:\n  rules:\n    - depth_above: 1\n      queues: []\n",
                "alerts.rules[0].queues",
                "never apply",
            ),
            (
                "alerts:\n  rules:\n    - new_reason: true\n      for: 10m\n",
                "alerts.rules[0].for",
                "no effect on a `new_reason` rule",
            ),
            (
                "alerts:\n  rules:\n    - new_reason: true\n      keep_firing_for: 10m\n",
                "alerts.rules[0].keep_firing_for",
                "no effect on a `new_reason` rule",
            ),
        ] {
            let err = parse(y).unwrap_err().to_string();
            assert!(err.starts_with("test.yaml:4:"), "{err}");
            assert!(err.contains(field) && err.contains(says), "{err}");
        }
        assert!(parse("alerts:\n  rules:\n    - depth_above: 1\n      repeat: 1m\n      for: 5m\n").is_ok());
    }
}
