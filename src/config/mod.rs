//! Typed configuration (DESIGN §2: "The config is the single source of truth").
//!
//! The YAML file is parsed strictly (`deny_unknown_fields` everywhere) so that a
//! typo is an error naming the file, line, field and what was expected, never a
//! silently ignored setting. Environment variables `DLQ_BRIDGE__<PATH>` (with
//! `__` between path segments, e.g. `DLQ_BRIDGE__REDRIVE__CONCURRENCY=8`)
//! override single values, read through the `config` crate's environment source.
//! Secrets are never inline: fields ending in `_env` name the environment
//! variable that holds them.
//!
//! Here: the whole file ([`Config`]), how it is loaded, and the checks that
//! span sections. Each section's types live in a module of their own and are
//! re-exported here, so that callers name `config::X` whatever the layout.

mod alerts;
mod durations;
mod env;
mod locate;
mod queue;
mod redrive;
mod serve;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use alerts::{
    AlertRule, AlertsConfig, GrowthRule, KINDS as ALERT_KINDS, SinkConfig, SinkKind, SinkTarget, check_sink_url,
};
pub use durations::{MIN_POLL_INTERVAL, duration_text, opt_duration_text, opt_poll_interval_text, poll_interval_text};
pub use env::env_overrides_from_process;
pub use queue::{
    PubSubQueueConfig, QueueConfig, QueueDefaults, QueueKind, RetentionAction, RetentionConfig, ServiceBusQueueConfig,
    ServiceBusSubQueue, SqsQueueConfig,
};
pub use redrive::{MAX_CONCURRENCY, RedriveConfig, ScheduleConfig, state_dir};
pub use serve::{AdminCallLimits, DashboardConfig, LeaderElectionConfig, ServeConfig};

use env::{apply_override, apply_override_text, env_error, env_var_for, override_holding};
use locate::{invalid, locate, locate_rule_glob, parse_located};
use queue::{backend_names, queue_name_problem};

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
        /// The dotted path of the offending field, e.g. `queues[1].sqs.region`;
        /// inside a queue's entry, followed by the queue's name:
        /// ``queues[1].sqs.region (queue `orders`)``.
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

// serde's `default = "..."` takes a function, and flags of several sections default to on.
fn default_true() -> bool {
    true
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
        Self::from_yaml_unnamed(text, origin, overrides).map_err(|e| {
            // An override of the whole list (`DLQ_BRIDGE__QUEUES`) holds
            // other queues than the file.
            if overrides.iter().any(|(key, _)| key == "queues") {
                e
            } else {
                name_the_queue(e, text)
            }
        })
    }

    fn from_yaml_unnamed(text: &str, origin: &str, overrides: &[(String, String)]) -> Result<Self, ConfigError> {
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
            // A value is read as YAML (`true`, `30`, `[a, b]`), so a text
            // field given `123` got an integer and was refused; there is no
            // quoting in an environment variable. Such a value is taken as
            // the text it is, once per override at most.
            let mut as_text: Vec<&str> = Vec::new();
            config = loop {
                match serde_path_to_error::deserialize::<_, Config>(tree.clone()) {
                    Ok(c) => break c,
                    Err(e) => {
                        let field = e.path().to_string();
                        let message = e.into_inner().to_string();
                        let given = overrides.iter().find(|(key, _)| *key == field);
                        if let Some((key, raw)) = given.filter(|(key, _)| {
                            message.ends_with("expected a string") && !as_text.contains(&key.as_str())
                        }) {
                            as_text.push(key);
                            apply_override_text(&mut tree, key, raw)?;
                            continue;
                        }
                        return Err(env_error(overrides, &field, message));
                    }
                }
            };
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
                .map(|(key, _)| key)
                .find(|key| field == **key)
                .or_else(|| override_holding(overrides, &field));
            if let Some(key) = overridden {
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
            // Endpoints are shown in errors, tables and JSON: a password in
            // one would be too.
            let endpoints: Vec<(&str, Option<&String>)> = match &q.kind {
                QueueKind::Sqs(sqs) => vec![
                    ("sqs.endpoint_url", sqs.endpoint_url.as_ref()),
                    ("sqs.cloudwatch_endpoint_url", sqs.cloudwatch_endpoint_url.as_ref()),
                ],
                QueueKind::ServiceBus(sb) => vec![("servicebus.management_endpoint", sb.management_endpoint.as_ref())],
                _ => Vec::new(),
            };
            for (field, url) in endpoints {
                if url.is_some_and(|u| has_userinfo(u)) {
                    return Err(err(
                        format!("queues[{i}].{field}"),
                        "must not carry credentials (`user:password@`): they would be shown wherever the endpoint is; give the provider's credentials the usual way".into(),
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
            if let QueueKind::PubSub(ps) = &q.kind {
                for (field, host, example) in [
                    ("endpoint", &ps.endpoint, "us-east1-pubsub.googleapis.com"),
                    (
                        "monitoring_endpoint",
                        &ps.monitoring_endpoint,
                        "monitoring.googleapis.com",
                    ),
                ] {
                    if let Some(problem) = host.as_deref().and_then(|h| pubsub_endpoint_problem(h, example)) {
                        return Err(err(format!("queues[{i}].pubsub.{field}"), problem));
                    }
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
            if r.queues.is_empty() {
                return Err(err(
                    format!("alerts.rules[{i}].queues"),
                    "names no queue, so the rule would never apply: name queues or globs, or leave it out for every queue".into(),
                ));
            }
            // A new reason is announced once: its `repeat` only sets how long
            // Alertmanager keeps it active, where 0s means the least.
            if r.repeat.is_zero() && !r.new_reason {
                return Err(err(
                    format!("alerts.rules[{i}].repeat"),
                    "must be longer than 0s (a firing alert would be sent again at every poll); a long one (`24h`) sends it seldom".into(),
                ));
            }
            if r.new_reason {
                for (field, set) in [
                    ("for", !r.for_.is_zero()),
                    ("keep_firing_for", !r.keep_firing_for.is_zero()),
                ] {
                    if set {
                        return Err(err(
                            format!("alerts.rules[{i}].{field}"),
                            "has no effect on a `new_reason` rule: a new reason is announced once, by the poll that finds it, and never resolves".into(),
                        ));
                    }
                }
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
                    match expr.parse::<croner::Cron>() {
                        Err(e) => {
                            return Err(err(
                                format!("{field}.cron"),
                                format!("invalid cron expression `{expr}`: {e}"),
                            ));
                        }
                        // `0 0 30 2 *` (30 February) parses, and never fires:
                        // serve stopped the schedule with an error in its log.
                        Ok(cron) if cron.find_next_occurrence(&chrono::Utc::now(), false).is_err() => {
                            return Err(err(
                                format!("{field}.cron"),
                                format!("cron expression `{expr}` never fires (no such date)"),
                            ));
                        }
                        Ok(_) => {}
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
            if let Some(r) = &q.retention {
                for (name, value) in [("max_age", r.max_age), ("check_every", r.check_every)] {
                    if value.is_zero() {
                        return Err(err(
                            format!("queues[{i}].retention.{name}"),
                            "must be longer than 0s".into(),
                        ));
                    }
                }
            }
            if let QueueKind::ServiceBus(sb) = &q.kind {
                let field = |name: &str| format!("queues[{i}].servicebus.{name}");
                if sb.sas_token_ttl.is_some_and(|ttl| ttl < Duration::from_secs(2)) {
                    return Err(err(
                        field("sas_token_ttl"),
                        "must be at least 2s (a link renews its tokens at 5/6 of it)".into(),
                    ));
                }
                if sb.link_idle_timeout.is_some_and(|t| t < Duration::from_secs(1)) {
                    return Err(err(field("link_idle_timeout"), "must be at least 1s".into()));
                }
                if sb.browse_count_limit == Some(0) {
                    return Err(err(field("browse_count_limit"), "must be at least 1".into()));
                }
            }
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.redrive.concurrency) {
            return Err(err(
                "redrive.concurrency".into(),
                format!("must be from 1 to {MAX_CONCURRENCY}"),
            ));
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

/// What is wrong with a Pub/Sub `endpoint` or `monitoring_endpoint`, a host
/// name with an optional port: `https://` is added (and 443 when no port is
/// given).
fn pubsub_endpoint_problem(endpoint: &str, example: &str) -> Option<String> {
    if endpoint.contains("://") {
        return Some(format!(
            "`{endpoint}` is a URL: give the host name only (e.g. `{example}`)"
        ));
    }
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (endpoint, None),
    };
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Some(format!(
            "`{endpoint}`: the port `{port}` is not a number from 1 to 65535"
        ));
    }
    let valid = !host.is_empty()
        && host
            .split('.')
            .all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    (!valid).then(|| {
        format!(
            "`{endpoint}` is not a host name, with an optional port (e.g. `{example}`; letters, digits, `-` and dots)"
        )
    })
}

/// Whether a URL's authority carries `user[:password]@`.
fn has_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#'])
        .next()
        .is_some_and(|authority| authority.contains('@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint with `user:password@` is refused at its line, and the
    /// password is not repeated.
    #[test]
    fn an_endpoint_with_credentials_is_refused() {
        let err = parse(
            "queues:\n  - name: q\n    sqs:\n      queue: q\n      endpoint_url: http://u:PASSW0RD@127.0.0.1:1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("test.yaml:5:"), "{err}");
        assert!(err.contains("must not carry credentials"), "{err}");
        assert!(!err.contains("PASSW0RD"), "{err}");
        assert!(has_userinfo("https://user@host/x") && !has_userinfo("http://127.0.0.1:1/a@b"));
    }

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

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, "test.yaml", &[])
    }

    #[test]
    fn a_pubsub_endpoint_is_a_host_name() {
        let with = |endpoint: &str| {
            parse(&format!(
                "queues:\n  - name: q\n    pubsub:\n      project: p\n      subscription: s\n      endpoint: \"{endpoint}\"\n"
            ))
        };
        let c = with("us-east1-pubsub.googleapis.com").unwrap();
        let QueueKind::PubSub(ps) = &c.queues[0].kind else {
            panic!("a Pub/Sub queue")
        };
        assert_eq!(ps.endpoint.as_deref(), Some("us-east1-pubsub.googleapis.com"));
        let c = with("pubsub.internal.example:8443").unwrap();
        let QueueKind::PubSub(ps) = &c.queues[0].kind else {
            panic!("a Pub/Sub queue")
        };
        assert_eq!(ps.endpoint.as_deref(), Some("pubsub.internal.example:8443"));
        let monitoring = |host: &str| {
            parse(&format!(
                "queues:\n  - name: q\n    pubsub:\n      project: p\n      subscription: s\n      monitoring_endpoint: \"{host}\"\n"
            ))
        };
        let c = monitoring("monitoring-psc.p.googleapis.com").unwrap();
        let QueueKind::PubSub(ps) = &c.queues[0].kind else {
            panic!("a Pub/Sub queue")
        };
        assert_eq!(
            ps.monitoring_endpoint.as_deref(),
            Some("monitoring-psc.p.googleapis.com")
        );
        let e = monitoring("https://monitoring.googleapis.com").unwrap_err().to_string();
        assert!(
            e.contains("queues[0].pubsub.monitoring_endpoint")
                && e.contains("is a URL: give the host name only (e.g. `monitoring.googleapis.com`)"),
            "{e}"
        );
        for (bad, says) in [
            (
                "https://us-east1-pubsub.googleapis.com",
                "is a URL: give the host name only",
            ),
            ("pubsub.googleapis.com:0", "the port `0` is not a number"),
            ("pubsub.googleapis.com:https", "the port `https` is not a number"),
            ("[::1]:443", "is not a host name"),
            ("", "is not a host name"),
            ("a..b", "is not a host name"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.contains("queues[0].pubsub.endpoint") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_secret_pasted_where_a_variable_name_goes_is_refused_and_not_repeated() {
        let secret = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=S3CRET";
        let url = "https://hooks.slack.com/services/T0/B0/S3CRET";
        for (text, line) in [
            (
                format!(
                    "queues:\n  - name: q\n    servicebus:\n      queue: q\n      connection_string_env: \"{secret}\"\n"
                ),
                5,
            ),
            (
                "queues:\n  - name: q\n    sqs: {queue: q}\nserve:\n  token_env: \"tok en\"\n".to_string(),
                5,
            ),
            (
                format!(
                    "queues:\n  - name: q\n    sqs: {{queue: q}}\nalerts:\n  sinks:\n    - slack: {{url_env: \"{url}\"}}\n"
                ),
                6,
            ),
            // `slack: URL` where `slack: {url: URL}` was meant: serde's
            // "invalid type" would quote it.
            (
                format!("queues:\n  - name: q\n    sqs: {{queue: q}}\nalerts:\n  sinks:\n    - slack: \"{url}\"\n"),
                6,
            ),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(!e.contains("S3CRET") && !e.contains("tok en"), "{e}");
            assert!(e.starts_with(&format!("test.yaml:{line}:")), "{e}");
        }
        // Names as Kubernetes and shells write them are taken.
        let ok = "queues:\n  - name: q\n    sqs: {queue: q}\nserve:\n  token_env: DLQ_BRIDGE.api-token_2\n";
        assert!(parse(ok).is_ok());
    }

    /// The README says config/example.yaml documents every setting: each
    /// field the parser knows, section by section (as its own "unknown
    /// field, expected one of" error lists them), is set or shown in a
    /// comment there as `field:`.
    #[test]
    fn example_config_documents_every_field() {
        let example = include_str!("../../config/example.yaml");
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
            ("config/example.yaml", include_str!("../../config/example.yaml")),
            ("config/demo.yaml", include_str!("../../config/demo.yaml")),
        ] {
            Config::from_yaml(text, name, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn a_loaded_config_serializes_back_to_an_equivalent_file() {
        let text = include_str!("../../config/example.yaml");
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
    fn an_unclosed_bracket_is_a_syntax_error_naming_where_it_opened() {
        // The typed reading met the bad value first and called it a type
        // error ("invalid type: sequence, expected a string").
        let err = parse("queues:\n  - name: a\n    sqs:\n      queue: [a, b\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "test.yaml:5:1: (top level): YAML syntax: did not find expected ',' or ']', while parsing a flow \
             sequence at line 4 column 14 (check the indentation and brackets)"
        );
        let err = parse("queues:\n  - name: a\n    sqs: {queue: q\n  - name: b\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:4:") && err.contains("while parsing a flow mapping at line 3 column 10"),
            "{err}"
        );
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
    fn an_override_of_a_text_field_keeps_its_text_and_errors_name_the_variable_set() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let over = |key: &str, raw: &str| Config::from_yaml(q, "t", &[(key.into(), raw.into())]);
        // No quoting in an environment variable: `123` for a text field is
        // the text "123" (it was an integer, refused).
        assert_eq!(
            over("defaults.reason_attribute", "123")
                .unwrap()
                .defaults
                .reason_attribute,
            "123"
        );
        assert_eq!(over("serve.reason_sample", "7").unwrap().serve.reason_sample, 7);
        // An unknown key is named by the variable that set it, not its parent.
        let err = over("nope.x", "1").unwrap_err().to_string();
        assert!(
            err.starts_with("environment override DLQ_BRIDGE__NOPE__X: nope: unknown field"),
            "{err}"
        );
        // In the config's words, not Rust's.
        let err = over("serve.reason_sample", "").unwrap_err().to_string();
        assert!(
            err.ends_with("serve.reason_sample: an empty value, expected a whole number"),
            "{err}"
        );
    }

    #[test]
    fn validation_errors_name_the_line_and_overrides_their_variable() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let err = parse(&format!("{q}redrive:\n  hold: 1m\n  concurrency: 0\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "test.yaml:6:3: redrive.concurrency: must be from 1 to 256");
        let err = Config::from_yaml(
            &format!("{q}redrive:\n  concurrency: 4\n"),
            "t",
            &[("redrive.concurrency".into(), "0".into())],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "environment override DLQ_BRIDGE__REDRIVE__CONCURRENCY: redrive.concurrency: must be from 1 to 256"
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
    fn a_cron_that_never_fires_is_refused() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        for (cron, says) in [("0 0 30 2 *", "never fires"), ("0 0 31 4 *", "never fires")] {
            let err = parse(&format!("{q}schedules:\n  - queue: a\n    cron: \"{cron}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("test.yaml:6:5: schedules[0].cron: "), "{cron}: {err}");
            assert!(err.contains(says), "{cron}: {err}");
        }
        // Six fields are seconds first (slots to the second).
        for cron in ["0 3 * * *", "*/15 * * * *", "0 0 29 2 *", "@daily", "30 0 3 * * *"] {
            assert!(
                parse(&format!("{q}schedules:\n  - queue: a\n    cron: \"{cron}\"\n")).is_ok(),
                "{cron}"
            );
        }
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
}

/// An error at `queues[N]…` also names that queue, as the file names it:
/// with many queues, the index alone sends the reader counting entries.
fn name_the_queue(e: ConfigError, text: &str) -> ConfigError {
    let (field, message) = match &e {
        ConfigError::Invalid { field, message, .. } => (field.as_str(), message),
        // Overrides cannot reach into `queues` (a list), only replace it.
        ConfigError::Env { .. } | ConfigError::Read { .. } => return e,
    };
    let Some(index) = field
        .strip_prefix("queues[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(i, _)| i.parse::<usize>().ok())
    else {
        return e;
    };
    let Some(name) = serde_yaml::from_str::<serde_yaml::Value>(text)
        .ok()
        .and_then(|tree| match tree.get("queues")?.get(index)?.get("name")? {
            // Read as text, as the typed parse reads `name: 123`.
            serde_yaml::Value::String(s) => Some(s.clone()),
            serde_yaml::Value::Number(n) => Some(n.to_string()),
            serde_yaml::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        })
        .filter(|name| queue_name_problem(name).is_none() && !message.contains(&format!("`{name}`")))
    else {
        return e;
    };
    // After the path, where the reader looks for where the error is.
    let named = |field: &str| format!("{field} (queue `{name}`)");
    match e {
        ConfigError::Invalid {
            location,
            field,
            message,
        } => ConfigError::Invalid {
            location,
            field: named(&field),
            message,
        },
        read => read,
    }
}

/// The chart's `values.schema.json` lists the keys of each config section it
/// checks strictly (`additionalProperties: false`): a key missing there is
/// refused by `helm install` although dlq-bridge reads it.
#[cfg(test)]
mod chart_schema {
    use std::collections::BTreeSet;

    use serde::de::{DeserializeOwned, Deserializer, Error as _, Visitor, value::Error};

    use super::queue::RawQueue;
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
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../charts/dlq-bridge/values.schema.json"))
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
