//! Alert rules (DESIGN §5): evaluated on every poll, deduplicated across
//! polls, with `for`, repeat and resolve semantics, and sent to the sinks.
//!
//! State is kept on every replica so that a replica that becomes leader knows
//! which reasons are old news and how many messages arrived lately; only the
//! leader sends. A firing alert counts as sent only once a leader sent it, so
//! the next leader sends it on its first evaluation, and resolves it when it
//! clears, whichever leader sent it.
//!
//! Alertmanager also gets every firing alert again each `resend_delay`
//! ([`Evaluator::refresh`]), valid for four times that: if the sidecar dies or
//! restarts while the alert fires and the queue clears meanwhile, nobody is
//! left to resolve it, and it then ends by itself within minutes rather than
//! at the end of its repeat interval (hours).

pub mod sinks;
mod state;

pub use state::StateFile;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{AlertRule, AlertsConfig};
use crate::engine::triage::{MAX_KEY_CHARS, reason_pattern};
use crate::model::preview;
use crate::sidecar::metrics::Metrics;
use crate::sidecar::poller::{PollResult, SampledMessage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Firing,
    Resolved,
}

/// One notification: the generic webhook's JSON body, and what the Slack and
/// Alertmanager sinks format.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    /// Version of this JSON shape.
    pub version: u32,
    pub status: Status,
    pub rule: String,
    /// `depth_above`, `oldest_age_above`, `growth` or `new_reason`.
    pub kind: &'static str,
    pub queue: String,
    pub backend: String,
    /// The measured value (messages, seconds, arrivals in the window, or 1).
    pub value: f64,
    /// The configured threshold.
    pub threshold: f64,
    /// For `new_reason`: the failure pattern never seen before, the reason
    /// with its variable parts (numbers, IDs, quoted values) replaced
    /// (`Order <n> not found`); the samples show the reasons as they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub summary: String,
    pub started_at: DateTime<Utc>,
    pub sent_at: DateTime<Utc>,
    /// How long until this alert is sent again if it keeps firing.
    pub repeat_seconds: u64,
    /// A few messages behind the alert. Bodies only when `include_bodies`.
    pub samples: Vec<SampleMessage>,
    /// For Alertmanager only: a resolve of a rule without `send_resolved`
    /// (it only ends the alert there), or a firing alert re-sent to keep it
    /// active there. No notice for the other sinks.
    #[serde(skip)]
    pub quiet: bool,
    /// How long Alertmanager keeps a firing alert active unless it is sent
    /// again (its `endsAt`).
    #[serde(skip)]
    pub valid_for: Duration,
}

impl Notification {
    /// This notification's ID: the webhook body's `id` and the
    /// `Idempotency-Key` header of webhook and Alertmanager requests, for
    /// receivers to drop a request that a retry delivered twice (its answer
    /// was lost). Derived from the alert (rule, queue, kind, reason), its
    /// status, when that state began (`started_at`) and when this notice was
    /// made (`sent_at`), so every retry of one notification carries the same
    /// ID, and the next notice of the alert another: its resolve, or a repeat
    /// (a repeat is a reminder, which a receiver deduping by ID must not drop).
    pub fn id(&self) -> String {
        use sha2::{Digest, Sha256};
        let status = match self.status {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        };
        let started = self.started_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let sent = self.sent_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let mut hash = Sha256::new();
        for part in [
            "dlq-bridge notification 1",
            &self.rule,
            &self.queue,
            self.kind,
            self.reason.as_deref().unwrap_or(""),
            status,
            &started,
            &sent,
        ] {
            // Length-prefixed: a reason (written by whatever failed) cannot
            // make two notifications' parts run together into one key.
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        hash.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SampleMessage {
    pub id: String,
    pub reason: Option<String>,
    /// The body as text (lossy for bytes that are not UTF-8), at most
    /// [`SAMPLE_BODY_LIMIT`] bytes of it; only with `alerts.include_bodies`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    pub body_redacted: bool,
    /// The whole body's size in bytes, when `body` is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_bytes: Option<usize>,
    /// `body` is the first part of a longer body.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body_truncated: bool,
}

/// The most of a message body a notification carries. Bodies go up to
/// 1 MiB on SQS, 10 MB on Pub/Sub and 100 MB on Service Bus premium, three
/// samples to an alert: whole, they made webhook requests that receivers
/// and proxies refuse as too large (a 413 is not retried), and the alert was
/// lost with them. The poller keeps no more than this of a sampled body.
pub use crate::sidecar::poller::SAMPLE_BODY_LIMIT;

impl SampleMessage {
    /// `m` as a notification shows it: its body only when `include_body`,
    /// and then cut to [`SAMPLE_BODY_LIMIT`].
    pub fn of(m: &SampledMessage, include_body: bool) -> Self {
        if !include_body {
            return Self::redacted(m.id.clone(), m.reason.clone());
        }
        let (text, cut) = body_prefix(&m.body, SAMPLE_BODY_LIMIT);
        Self {
            body: Some(text),
            body_redacted: false,
            body_bytes: Some(m.body_bytes()),
            body_truncated: cut,
            ..Self::redacted(m.id.clone(), m.reason.clone())
        }
    }

    /// A message shown without its body.
    pub fn redacted(id: String, reason: Option<String>) -> Self {
        Self {
            id,
            reason,
            body: None,
            body_redacted: true,
            body_bytes: None,
            body_truncated: false,
        }
    }
}

/// The first `limit` bytes of `body` as text, and whether it was cut. A
/// cut inside a UTF-8 character leaves that character out rather than
/// showing half of it as a replacement character.
fn body_prefix(body: &[u8], limit: usize) -> (String, bool) {
    if body.len() <= limit {
        return (String::from_utf8_lossy(body).into_owned(), false);
    }
    let mut end = limit;
    // A continuation byte (10xxxxxx) at the cut: back off to the start of
    // its character, at most three bytes.
    while end > 0 && limit - end < 3 && body[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    (String::from_utf8_lossy(&body[..end]).into_owned(), true)
}

const SAMPLES_PER_ALERT: usize = 3;

/// (from, to, n): `n` messages arrived between the polls at `from` and `to`.
type Arrivals = (DateTime<Utc>, DateTime<Utc>, u64);

/// The first poll of a queue, against which reasons are judged new.
struct Baseline {
    at: DateTime<Utc>,
    /// Its sample held the whole queue.
    complete: bool,
}

#[derive(Debug, Default)]
struct RuleState {
    pending_since: Option<DateTime<Utc>>,
    /// Since when a firing alert's condition has been clear (it resolves
    /// after the rule's `keep_firing_for`).
    clear_since: Option<DateTime<Utc>>,
    firing_since: Option<DateTime<Utc>>,
    last_sent: Option<DateTime<Utc>>,
    /// The firing notification this replica sent (or, following, the one a
    /// leader sent), while the alert fires: what [`Evaluator::refresh`]
    /// re-sends to Alertmanager once this replica leads, and when it last did.
    sent: Option<(Notification, DateTime<Utc>)>,
    /// The alert cleared while this replica followed: the resolve the leader
    /// was to send. Sent by this replica if it leads soon after (the leader
    /// may have been gone), else dropped (see [`Evaluator::owed_resolves`]).
    owed_resolve: Option<(Notification, DateTime<Utc>)>,
}

struct Rule {
    name: String,
    kind: &'static str,
    globs: Vec<glob::Pattern>,
    cfg: AlertRule,
}

impl Rule {
    fn applies_to(&self, queue: &str) -> bool {
        self.globs.iter().any(|g| g.matches(queue))
    }
}

/// A failure pattern `new_reason` found, with the first reason seen with it.
struct NewReason {
    pattern: String,
    example: String,
}

/// The failure patterns `new_reason` knows on one queue, by digest, at most
/// this many. Patterns seldom come near it; a queue whose reasons carry
/// unique text that normalising misses would, and past it new patterns are
/// neither remembered nor announced (a warning says so once): memory stays
/// bounded, and such a queue does not page once per message.
const MAX_KNOWN_PATTERNS: usize = 1024;
/// New failure reasons of one poll announced one by one; more are announced
/// together in one notice.
const NEW_REASONS_PER_POLL: usize = 3;
/// New failure patterns a follower keeps per queue for the leader it may
/// become ([`Evaluator::with_owed_reasons`]): past the first few they are
/// announced together anyway.
const MAX_OWED_REASONS: usize = 32;

/// A failure pattern's digest: the same in every process, so that what a
/// `serve` knew is known again after its restart ([`state`]).
fn pattern_digest(pattern: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(pattern.as_bytes());
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

#[derive(Default)]
struct KnownPatterns {
    digests: HashSet<u64>,
    full: bool,
}

impl KnownPatterns {
    fn contains(&self, digest: u64) -> bool {
        self.digests.contains(&digest)
    }

    /// Remember `digest`; whether it was new and fitted.
    fn insert(&mut self, digest: u64, queue: &str) -> bool {
        if self.digests.len() >= MAX_KNOWN_PATTERNS && !self.digests.contains(&digest) {
            if !std::mem::replace(&mut self.full, true) {
                tracing::warn!(
                    %queue,
                    limit = MAX_KNOWN_PATTERNS,
                    "new_reason: too many distinct failure reasons on this queue; new ones are no longer announced"
                );
            }
            return false;
        }
        self.digests.insert(digest)
    }
}

pub struct Evaluator {
    rules: Vec<Rule>,
    include_bodies: bool,
    state: HashMap<(usize, String), RuleState>,
    known_reasons: HashMap<String, KnownPatterns>,
    /// Per queue: new failure patterns this replica found while it
    /// followed, and when: the notices the leader was to send. Sent by this
    /// replica if it leads soon after (the leader may have been gone), as
    /// owed resolves are.
    owed_reasons: HashMap<String, Vec<(NewReason, DateTime<Utc>)>>,
    /// When this replica last took the lead (None while it follows): owed
    /// reasons count as recent from then, not from the next poll of their
    /// queue, which may come minutes later.
    led_since: Option<DateTime<Utc>>,
    baselines: HashMap<String, Baseline>,
    /// Per queue: the messages that arrived between two polls.
    arrivals: HashMap<String, VecDeque<Arrivals>>,
    last_poll: HashMap<String, DateTime<Utc>>,
    longest_window: Duration,
    resend_delay: Duration,
    /// Some rule state holds an owed resolve: spares the leader a walk over
    /// every state at every poll.
    any_owed: bool,
    /// The configured queues: the only ones whose saved state a restart
    /// takes up ([`state`]).
    watched: HashSet<String>,
    /// Resolves of alerts that fired before a restart on a queue, or by a
    /// rule, that is no longer watched: nothing will clear them otherwise.
    /// Sent as owed resolves are ([`Evaluator::owed_resolves`]), with when
    /// they were found.
    retired: Vec<(Notification, DateTime<Utc>)>,
}

/// Firing alerts are valid in Alertmanager for this many resend delays, as
/// Prometheus sends them: a re-send or two may be late or lost.
const RESENDS_VALID: u32 = 4;

impl Evaluator {
    /// The evaluator of `cfg`'s rules over the configured queues `watched`.
    pub fn new<Q: Into<String>>(cfg: &AlertsConfig, watched: impl IntoIterator<Item = Q>) -> Self {
        let rules: Vec<Rule> = cfg
            .rules
            .iter()
            .map(|r| {
                Rule {
                    name: r.effective_name(),
                    kind: r.kind(),
                    // Validated when the config was loaded.
                    globs: r.queues.iter().filter_map(|g| glob::Pattern::new(g).ok()).collect(),
                    cfg: r.clone(),
                }
            })
            .collect();
        let longest_window = rules
            .iter()
            .filter_map(|r| r.cfg.growth.as_ref().map(|g| g.window))
            .max()
            .unwrap_or_default();
        Self {
            rules,
            include_bodies: cfg.include_bodies,
            state: HashMap::new(),
            known_reasons: HashMap::new(),
            owed_reasons: HashMap::new(),
            led_since: None,
            baselines: HashMap::new(),
            arrivals: HashMap::new(),
            last_poll: HashMap::new(),
            longest_window,
            resend_delay: cfg.resend_delay,
            any_owed: false,
            watched: watched.into_iter().map(Into::into).collect(),
            retired: Vec::new(),
        }
    }

    /// Resolves owed to every sink: alerts that cleared while this replica
    /// followed, sent now that it leads. A leader that was there sent them
    /// already, and Alertmanager and chat take a second one as no news; but
    /// when the alert cleared while no replica led (the leader had died, or
    /// could not reach the API server), nobody else will. Only those younger
    /// than the time Alertmanager keeps an alert without news: an older one
    /// cleared while a leader was there to send it.
    pub fn owed_resolves(&mut self, now: DateTime<Utc>, leader: bool) -> Vec<Notification> {
        self.note_lead(now, leader);
        if !leader || !std::mem::take(&mut self.any_owed) {
            return Vec::new();
        }
        let within = self.resend_delay * RESENDS_VALID;
        let retired = std::mem::take(&mut self.retired);
        self.state
            .values_mut()
            .filter_map(|st| st.owed_resolve.take())
            .chain(retired)
            .filter(|(_, cleared)| (now - *cleared).to_std().unwrap_or_default() <= within)
            .map(|(mut n, _)| {
                n.sent_at = now;
                n
            })
            .collect()
    }

    /// The firing alerts this replica sent, again, for Alertmanager only,
    /// each at most every `resend_delay`; nothing unless `leader`. Called on
    /// a timer, not per poll: while polls fail the alert keeps its state, and
    /// stays active as long as the sidecar is alive to say so. A replica that
    /// has just taken the lead keeps alive what fired while it followed: its
    /// polls may fail from the start (a provider outage), and Alertmanager
    /// would otherwise end the alert its predecessor sent.
    pub fn refresh(&mut self, now: DateTime<Utc>, leader: bool) -> Vec<Notification> {
        if !leader {
            return Vec::new();
        }
        let mut out = Vec::new();
        for st in self.state.values_mut() {
            let Some((sent, refreshed)) = st.sent.as_mut() else {
                continue;
            };
            if (now - *refreshed).to_std().unwrap_or_default() < self.resend_delay {
                continue;
            }
            *refreshed = now;
            let mut n = sent.clone();
            n.sent_at = now;
            n.quiet = true;
            out.push(n);
        }
        out
    }

    /// Whether any rule needs a sample of messages from `queue`.
    pub fn needs_reasons(&self) -> bool {
        self.rules.iter().any(|r| r.cfg.new_reason)
    }

    /// The failure patterns in `poll`'s sample never seen before on its
    /// queue, sorted. Reasons are compared by pattern (`reason_pattern`): a
    /// reason that differs from a known one only in an order number or an
    /// ID is no news, and announcing it once per message would page for
    /// every message of a reason that carries one.
    ///
    /// The first poll is the baseline: what its sample shows was there before
    /// dlq-bridge looked, so it is not news. A sample skipped (a run was
    /// active) or smaller than the queue shows only part of what was there;
    /// a later sample then finds reasons that were in the queue all along. So
    /// a reason is new only when it was seen all through (complete baseline)
    /// or when none of the messages carrying it was enqueued before the
    /// baseline. Providers keep a message's first enqueue time when they
    /// dead-letter it, so a message published before the baseline that fails
    /// only later is taken for old news too: a miss soon after start-up,
    /// rather than stale reasons announced as new after every restart.
    fn new_reasons(&mut self, poll: &PollResult) -> Vec<NewReason> {
        let known = self.known_reasons.entry(poll.queue.clone()).or_default();
        let patterns = poll
            .sample
            .iter()
            .flatten()
            .filter_map(|m| Some((m, m.reason.as_deref()?)))
            .map(|(m, r)| (m, r, reason_pattern(r)));
        let Some(baseline) = self.baselines.get(&poll.queue) else {
            let complete = poll.sample.as_ref().is_some_and(|s| s.len() as u64 >= poll.stats.depth);
            self.baselines
                .insert(poll.queue.clone(), Baseline { at: poll.at, complete });
            for (_, _, pattern) in patterns {
                known.insert(pattern_digest(&pattern), &poll.queue);
            }
            return Vec::new();
        };
        // Unknown pattern -> (whether every message with it arrived after the
        // baseline, the first reason seen with it).
        let mut unknown: BTreeMap<String, (bool, &str)> = BTreeMap::new();
        for (m, reason, pattern) in patterns {
            if known.contains(pattern_digest(&pattern)) {
                continue;
            }
            let since = baseline.complete || m.enqueued_at.is_none_or(|t| t >= baseline.at);
            unknown.entry(pattern).or_insert((true, reason)).0 &= since;
        }
        let mut new = Vec::new();
        for (pattern, (since, example)) in unknown {
            // Announced only once remembered: a queue past the bound stays quiet.
            if known.insert(pattern_digest(&pattern), &poll.queue) && since {
                new.push(NewReason {
                    // Only its preview is shown: one character past it keeps
                    // the preview's ellipsis, and an owed reason saved in
                    // alerts-state.json stays small.
                    example: example.chars().take(MAX_KEY_CHARS + 1).collect(),
                    pattern,
                });
            }
        }
        new
    }

    /// Remember when this replica took the lead, as the first call that says
    /// it leads tells it (a change of the lead, a poll's evaluation or the
    /// resend timer). A leader drops the owed reasons no longer owed: a queue
    /// whose polls fail would keep them while it leads.
    pub fn note_lead(&mut self, now: DateTime<Utc>, leader: bool) {
        if !leader {
            self.led_since = None;
            return;
        }
        if self.led_since.is_none() {
            self.led_since = Some(now);
        }
        if !self.owed_reasons.is_empty() {
            let mut owed = std::mem::take(&mut self.owed_reasons);
            owed.retain(|_, reasons| {
                reasons.retain(|(_, seen)| self.still_owed(*seen, now));
                !reasons.is_empty()
            });
            self.owed_reasons = owed;
        }
    }

    /// Whether an owed reason seen at `seen` is still owed at `now`: seen
    /// within [`RESENDS_VALID`] resend delays before this replica took the
    /// lead (or before `now`, while it follows).
    fn still_owed(&self, seen: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let at = self.led_since.map_or(now, |since| since.min(now));
        (at - seen).to_std().unwrap_or_default() <= self.resend_delay * RESENDS_VALID
    }

    /// The new reasons to announce for `queue`: as leader, those found now
    /// and those found while this replica followed, no older than owed
    /// resolves may be ([`Evaluator::owed_resolves`]): a leader that was
    /// there announced them already (a hand-over may announce them a second
    /// time), but those found while no replica led (the leader had died, or
    /// could not reach the API server) nobody else will. Recent is judged at
    /// the time this replica took the lead ([`Evaluator::still_owed`]). As
    /// follower, none: those found are kept, at most [`MAX_OWED_REASONS`] per
    /// queue, and only for a queue a `new_reason` rule watches.
    fn with_owed_reasons(
        &mut self,
        queue: &str,
        mut new: Vec<NewReason>,
        now: DateTime<Utc>,
        leader: bool,
    ) -> Vec<NewReason> {
        if leader {
            let Some(owed) = self.owed_reasons.remove(queue) else {
                return new;
            };
            let mut all: Vec<NewReason> = owed
                .into_iter()
                .filter(|(_, seen)| self.still_owed(*seen, now))
                .map(|(r, _)| r)
                .collect();
            all.append(&mut new);
            return all;
        }
        let watched = self.rules.iter().any(|r| r.cfg.new_reason && r.applies_to(queue));
        if (new.is_empty() || !watched) && !self.owed_reasons.contains_key(queue) {
            return Vec::new();
        }
        let mut owed = self.owed_reasons.remove(queue).unwrap_or_default();
        owed.retain(|(_, seen)| self.still_owed(*seen, now));
        if !watched {
            new.clear();
        }
        owed.extend(new.into_iter().map(|r| (r, now)));
        let over = owed.len().saturating_sub(MAX_OWED_REASONS);
        owed.drain(..over);
        if !owed.is_empty() {
            self.owed_reasons.insert(queue.to_string(), owed);
        }
        Vec::new()
    }

    /// Evaluate every rule that applies to the polled queue. Returns what to
    /// send; when `leader` is false nothing is returned and nothing counts as sent.
    pub fn evaluate(&mut self, poll: &PollResult, leader: bool, metrics: &Metrics) -> Vec<Notification> {
        let now = poll.at;
        self.note_lead(now, leader);
        let from = self.last_poll.insert(poll.queue.clone(), now).unwrap_or(now);
        // Arrivals a run of ours hid came at some time since an earlier poll.
        let from = poll.arrivals_since.map_or(from, |since| since.min(from));
        // Kept for the growth rules only, and only polls that saw arrivals:
        // a week's window over hundreds of queues polled every 30 s is
        // millions of entries otherwise, nearly all of them zeros.
        let growth = |r: &Rule| r.cfg.growth.is_some() && r.applies_to(&poll.queue);
        if poll.arrivals > 0 && self.rules.iter().any(growth) {
            self.arrivals
                .entry(poll.queue.clone())
                .or_default()
                .push_back((from, now, poll.arrivals));
        }
        if let Some(window) = self.arrivals.get_mut(&poll.queue) {
            while window
                .front()
                .is_some_and(|(_, to, _)| (now - *to).to_std().unwrap_or_default() > self.longest_window)
            {
                window.pop_front();
            }
        }
        let found = self.new_reasons(poll);
        // Every replica's metric says what its own poll found.
        let found_any = !found.is_empty();
        let new_reasons = self.with_owed_reasons(&poll.queue, found, now, leader);

        let mut out = self.owed_resolves(now, leader);
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.applies_to(&poll.queue) {
                continue;
            }
            if rule.cfg.new_reason {
                metrics.set_firing(&poll.queue, &rule.name, found_any);
                if leader {
                    // An event, never re-sent or resolved: Alertmanager
                    // keeps it active for the rule's repeat interval (at
                    // least what a re-sent alert gets). With no time at
                    // all its endsAt had passed on arrival, and
                    // Alertmanager took it as resolved and told nobody.
                    let valid_for = rule.cfg.repeat.max(self.resend_delay * RESENDS_VALID);
                    let notice = |reason: Option<&NewReason>, value: f64| Notification {
                        valid_for,
                        ..notification(self.include_bodies, rule, poll, Status::Firing, value, 0.0, now, reason)
                    };
                    // Many at once are one notice past the first few: reasons
                    // whose text normalising cannot group (an ID of a shape
                    // it does not know) sent one notice per message.
                    let each = if new_reasons.len() > NEW_REASONS_PER_POLL + 1 {
                        NEW_REASONS_PER_POLL
                    } else {
                        new_reasons.len()
                    };
                    out.extend(new_reasons[..each].iter().map(|r| notice(Some(r), 1.0)));
                    if let [first, ..] = &new_reasons[each..] {
                        let rest = new_reasons.len() - each;
                        let mut n = notice(None, rest as f64);
                        n.summary = format!(
                            "{}: {rest} more new failure reasons (e.g. `{}`); text that varies per message? `dlq-bridge report {}` groups them",
                            poll.queue, first.pattern, poll.queue
                        );
                        out.push(n);
                    }
                }
                continue;
            }
            let (value, threshold) = match rule.kind {
                "depth_above" => (poll.stats.depth as f64, rule.cfg.depth_above.unwrap_or(0) as f64),
                "oldest_age_above" => {
                    let threshold = rule.cfg.oldest_age_above.unwrap_or_default();
                    match poll.stats.oldest_age {
                        // A floor (the oldest of a partial sample) is evidence
                        // only when it is above the threshold.
                        Some(age)
                            if poll.stats.age_exactness() != crate::model::Exactness::AtLeast || age > threshold =>
                        {
                            (age.as_secs_f64(), threshold.as_secs_f64())
                        }
                        // Unknown age: no evidence either way; keep the state.
                        _ => continue,
                    }
                }
                _ => {
                    let g = rule.cfg.growth.as_ref().expect("growth rule");
                    (
                        self.arrivals
                            .get(&poll.queue)
                            .map_or(0.0, |a| arrivals_within(a, now, g.window)),
                        g.messages as f64,
                    )
                }
            };
            // Thresholds are "above" limits, except growth: N arrivals fire.
            let holds = if rule.kind == "growth" {
                value >= threshold
            } else {
                value > threshold
            };
            let st = self.state.entry((i, poll.queue.clone())).or_default();
            if holds {
                st.clear_since = None;
                let since = *st.pending_since.get_or_insert(now);
                if (now - since).to_std().unwrap_or_default() >= rule.cfg.for_ {
                    let started = *st.firing_since.get_or_insert(now);
                    let due = st
                        .last_sent
                        .is_none_or(|t| (now - t).to_std().unwrap_or_default() >= rule.cfg.repeat);
                    st.owed_resolve = None;
                    if due || !leader {
                        let mut n = notification(
                            self.include_bodies,
                            rule,
                            poll,
                            Status::Firing,
                            value,
                            threshold,
                            started,
                            None,
                        );
                        n.valid_for = self.resend_delay * RESENDS_VALID;
                        st.sent = Some((n.clone(), now));
                        if leader {
                            st.last_sent = Some(now);
                            out.push(n);
                        }
                    }
                }
            } else {
                st.pending_since = None;
                let cleared = *st.clear_since.get_or_insert(now);
                let kept = st.firing_since.is_some()
                    && (now - cleared).to_std().unwrap_or_default() < rule.cfg.keep_firing_for;
                if kept {
                    metrics.set_firing(&poll.queue, &rule.name, true);
                    continue;
                }
                st.clear_since = None;
                if let Some(started) = st.firing_since.take() {
                    st.last_sent = None;
                    st.sent = None;
                    // Whether or not this replica sent it: a replica that has
                    // just become leader resolves what the previous leader
                    // sent (it fired here too), or that alert would stay
                    // active in Alertmanager and unresolved in chat.
                    // Sent even without `send_resolved`: Alertmanager would
                    // otherwise show the alert active until its endsAt (the
                    // repeat interval later); the other sinks skip it.
                    let mut n = notification(
                        self.include_bodies,
                        rule,
                        poll,
                        Status::Resolved,
                        value,
                        threshold,
                        started,
                        None,
                    );
                    n.quiet = !rule.cfg.send_resolved;
                    if leader {
                        out.push(n);
                    } else {
                        st.owed_resolve = Some((n, now));
                        self.any_owed = true;
                    }
                }
            }
            metrics.set_firing(&poll.queue, &rule.name, st.firing_since.is_some());
        }
        out
    }
}

/// The messages that arrived within `window` before `now`. The arrivals
/// between two polls are known only in sum; spread evenly over the interval,
/// only its part inside the window counts. After an outage (polls failing
/// for half an hour) the first poll's arrivals span the whole outage, and
/// counting them all as within the window would fire a growth alert that
/// the rate never justified.
fn arrivals_within(entries: &VecDeque<Arrivals>, now: DateTime<Utc>, window: Duration) -> f64 {
    let start = now - chrono::Duration::from_std(window).unwrap_or(chrono::TimeDelta::MAX);
    entries
        .iter()
        .filter(|(_, to, n)| *n > 0 && *to >= start)
        .map(|(from, to, n)| {
            let span = (*to - *from).num_milliseconds();
            let inside = (*to - (*from).max(start)).num_milliseconds();
            if span <= 0 || inside >= span {
                *n as f64
            } else {
                *n as f64 * inside as f64 / span as f64
            }
        })
        .sum()
}

#[allow(clippy::too_many_arguments)]
fn notification(
    include_bodies: bool,
    rule: &Rule,
    poll: &PollResult,
    status: Status,
    value: f64,
    threshold: f64,
    started_at: DateTime<Utc>,
    reason: Option<&NewReason>,
) -> Notification {
    let summary = match (status, rule.kind) {
        (Status::Resolved, _) => format!("{}: {} resolved on {}", poll.queue, rule.name, poll.backend),
        (_, "depth_above") => format!("{}: {} messages in the DLQ (above {})", poll.queue, value, threshold),
        (_, "oldest_age_above") => format!(
            "{}: oldest message is {} old (above {})",
            poll.queue,
            humantime::format_duration(Duration::from_secs(value as u64)),
            humantime::format_duration(Duration::from_secs(threshold as u64))
        ),
        (_, "growth") => format!(
            "{}: {:.0} messages arrived within {}",
            poll.queue,
            value,
            humantime::format_duration(rule.cfg.growth.as_ref().map(|g| g.window).unwrap_or_default())
        ),
        _ => match reason {
            Some(r) if r.example != r.pattern => format!(
                "{}: new failure reason `{}` (e.g. `{}`)",
                poll.queue,
                r.pattern,
                preview(&r.example, MAX_KEY_CHARS)
            ),
            _ => format!(
                "{}: new failure reason `{}`",
                poll.queue,
                reason.map_or("", |r| &r.pattern)
            ),
        },
    };
    let samples = poll
        .sample
        .iter()
        .flatten()
        .filter(|m| reason.is_none_or(|r| m.reason.as_deref().map(reason_pattern).as_ref() == Some(&r.pattern)))
        .take(SAMPLES_PER_ALERT)
        .map(|m| SampleMessage::of(m, include_bodies))
        .collect();
    Notification {
        version: 1,
        status,
        rule: rule.name.clone(),
        kind: rule.kind,
        queue: poll.queue.clone(),
        backend: poll.backend.clone(),
        value,
        threshold,
        reason: reason.map(|r| r.pattern.clone()),
        summary,
        started_at,
        sent_at: Utc::now(),
        repeat_seconds: rule.cfg.repeat.as_secs(),
        samples,
        quiet: false,
        valid_for: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::{DlqMessage, DlqStats, Exactness};

    pub(super) fn evaluator(rules_yaml: &str) -> Evaluator {
        let cfg = Config::from_yaml(&format!("alerts:\n  rules:\n{rules_yaml}"), "t", &[]).unwrap();
        Evaluator::new(&cfg.alerts, ["orders"])
    }

    pub(super) fn poll(at_secs: i64, depth: u64, arrivals: u64, reasons: &[&str]) -> PollResult {
        PollResult {
            queue: "orders".into(),
            backend: "sqs".into(),
            at: DateTime::from_timestamp(1_700_000_000 + at_secs, 0).unwrap(),
            stats: DlqStats {
                depth,
                in_flight: None,
                oldest_age: None,
                exactness: Exactness::Exact,
                oldest_age_exactness: None,
            },
            arrivals,
            arrivals_since: None,
            sample: Some(
                reasons
                    .iter()
                    .enumerate()
                    .map(|(i, r)| message(&format!("m{i}"), r, b"secret body"))
                    .collect(),
            ),
        }
    }

    fn message(id: &str, reason: &str, body: &[u8]) -> SampledMessage {
        SampledMessage::new(DlqMessage {
            id: id.into(),
            body: bytes::Bytes::copy_from_slice(body),
            attributes: Default::default(),
            properties: Default::default(),
            reason: Some(reason.to_string()),
            description: None,
            delivery_count: None,
            enqueued_at: None,
            source: None,
            ordering_key: None,
        })
    }

    /// `p` with its sampled messages enqueued these many seconds from its time.
    fn enqueued(mut p: PollResult, offsets: &[i64]) -> PollResult {
        for (m, off) in p.sample.iter_mut().flatten().zip(offsets) {
            let mut enqueued = (**m).clone();
            enqueued.enqueued_at = Some(p.at + chrono::Duration::seconds(*off));
            *m = SampledMessage::new(enqueued);
        }
        p
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn reasons_of(n: &[Notification]) -> Vec<&str> {
        n.iter().filter_map(|n| n.reason.as_deref()).collect()
    }

    #[test]
    fn new_reason_ignores_reasons_that_predate_a_skipped_or_partial_baseline() {
        let m = Metrics::new();
        // The first poll's sample was skipped (a run was active): the
        // baseline saw nothing of the 40 messages there.
        let mut e = evaluator("    - new_reason: true\n");
        let mut skipped = poll(0, 40, 0, &[]);
        skipped.sample = None;
        assert!(e.evaluate(&skipped, true, &m).is_empty());
        let p = enqueued(poll(10, 41, 1, &["Timeout", "Boom", "Schema"]), &[-600, -60, -2]);
        assert_eq!(reasons_of(&e.evaluate(&p, true, &m)), ["Schema"]);

        // A sample of 1 from 100: the next sample shows more of what was there.
        let mut e = evaluator("    - new_reason: true\n");
        let first = enqueued(poll(0, 100, 0, &["Timeout"]), &[-600]);
        assert!(e.evaluate(&first, true, &m).is_empty());
        let p = enqueued(poll(10, 100, 0, &["Timeout", "Boom", "Boom"]), &[-600, -300, -2]);
        assert!(e.evaluate(&p, true, &m).is_empty(), "a Boom was there before");
        let p = enqueued(poll(20, 101, 1, &["Boom", "Late"]), &[-300, -5]);
        assert_eq!(reasons_of(&e.evaluate(&p, true, &m)), ["Late"]);

        // A baseline that saw the whole queue: anything unseen came since,
        // whenever its message was first enqueued (before it failed).
        let mut e = evaluator("    - new_reason: true\n");
        assert!(
            e.evaluate(&enqueued(poll(0, 1, 0, &["Timeout"]), &[-600]), true, &m)
                .is_empty()
        );
        let p = enqueued(poll(10, 2, 1, &["Timeout", "Boom"]), &[-600, -300]);
        assert_eq!(reasons_of(&e.evaluate(&p, true, &m)), ["Boom"]);
    }

    #[test]
    fn depth_fires_once_repeats_after_interval_and_resolves() {
        let mut e = evaluator("    - depth_above: 3\n      repeat: 60s\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 2, 0, &[]), true, &m).is_empty());
        let fired = e.evaluate(&poll(10, 5, 3, &[]), true, &m);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].status, Status::Firing);
        assert!(e.evaluate(&poll(20, 6, 1, &[]), true, &m).is_empty(), "deduplicated");
        assert_eq!(
            e.evaluate(&poll(75, 6, 0, &[]), true, &m).len(),
            1,
            "repeated after 60s"
        );
        let resolved = e.evaluate(&poll(80, 0, 0, &[]), true, &m);
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].status, Status::Resolved);
        assert!(e.evaluate(&poll(90, 0, 0, &[]), true, &m).is_empty());
    }

    /// Alertmanager gets a firing alert again every `resend_delay`, valid for
    /// four of them, so that it ends by itself if nobody is left to resolve it.
    #[test]
    fn firing_alerts_are_re_sent_to_alertmanager_until_they_resolve() {
        let cfg = Config::from_yaml(
            "alerts:\n  resend_delay: 30s\n  rules:\n    - depth_above: 3\n      repeat: 4h\n",
            "t",
            &[],
        )
        .unwrap();
        let mut e = Evaluator::new(&cfg.alerts, ["orders"]);
        let m = Metrics::new();
        let at = |secs: i64| DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap();
        let fired = e.evaluate(&poll(0, 5, 5, &[]), true, &m);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].valid_for, Duration::from_secs(120));
        assert!(!fired[0].quiet);
        assert!(e.refresh(at(10), true).is_empty(), "not due yet");
        let again = e.refresh(at(31), true);
        assert_eq!(again.len(), 1);
        assert!(again[0].quiet, "for Alertmanager only");
        assert_eq!((again[0].status, again[0].sent_at), (Status::Firing, at(31)));
        assert_eq!(again[0].started_at, fired[0].started_at, "the same alert");
        assert!(e.refresh(at(45), true).is_empty());
        assert!(e.refresh(at(62), false).is_empty(), "only the leader sends");
        assert_eq!(e.refresh(at(62), true).len(), 1);
        // Resolved: nothing more to keep alive.
        assert_eq!(e.evaluate(&poll(70, 0, 0, &[]), true, &m).len(), 1);
        assert!(e.refresh(at(200), true).is_empty());
    }

    /// A replica that takes the lead while the provider is down (its polls
    /// fail from the start) keeps alive in Alertmanager what fired while it
    /// followed: it was the predecessor's to re-send, and Alertmanager would
    /// end it after four resend delays, a false resolve during an outage.
    #[test]
    fn a_new_leader_keeps_alive_what_fired_while_it_followed() {
        let mut e = evaluator("    - depth_above: 3\n");
        let m = Metrics::new();
        let at = |secs: i64| DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap();
        assert!(e.evaluate(&poll(0, 5, 5, &[]), false, &m).is_empty());
        assert!(e.refresh(at(3600), false).is_empty(), "a follower sends nothing");
        let kept = e.refresh(at(3600), true);
        assert_eq!(kept.len(), 1);
        assert!(kept[0].quiet, "for Alertmanager only");
        assert_eq!(kept[0].status, Status::Firing);
    }

    /// The alert cleared while this replica followed and no replica led (the
    /// leader had died): the resolve is sent once this replica leads, to
    /// every sink, once. Long after, it is not: a leader was there to send it.
    #[test]
    fn a_resolve_seen_while_following_is_sent_by_the_next_leader() {
        let mut e = evaluator("    - depth_above: 0\n");
        let m = Metrics::new();
        let at = |secs: i64| DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap();
        assert!(e.evaluate(&poll(0, 1, 1, &[]), false, &m).is_empty());
        assert!(e.evaluate(&poll(10, 0, 0, &[]), false, &m).is_empty());
        assert!(e.owed_resolves(at(15), false).is_empty());
        let owed = e.owed_resolves(at(20), true);
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].status, Status::Resolved);
        assert!(!owed[0].quiet);
        assert!(e.owed_resolves(at(25), true).is_empty(), "once");
        // At the next poll after the lead moved, too.
        assert!(e.evaluate(&poll(30, 1, 1, &[]), false, &m).is_empty());
        assert!(e.evaluate(&poll(40, 0, 0, &[]), false, &m).is_empty());
        let n = e.evaluate(&poll(50, 0, 0, &[]), true, &m);
        assert_eq!(n.iter().map(|n| n.status).collect::<Vec<_>>(), [Status::Resolved]);
        // Fired again before anyone led: nothing owed.
        assert!(e.evaluate(&poll(60, 1, 1, &[]), false, &m).is_empty());
        assert!(e.evaluate(&poll(70, 0, 0, &[]), false, &m).is_empty());
        assert!(e.evaluate(&poll(80, 1, 1, &[]), false, &m).is_empty());
        assert!(e.owed_resolves(at(90), true).is_empty());
        // Cleared long before this replica leads: a leader sent it then.
        assert!(e.evaluate(&poll(100, 0, 0, &[]), false, &m).is_empty());
        assert!(e.owed_resolves(at(100 + 3600), true).is_empty());
    }

    #[test]
    fn without_send_resolved_the_resolve_is_quiet() {
        let mut e = evaluator("    - depth_above: 3\n      send_resolved: false\n");
        let m = Metrics::new();
        assert_eq!(e.evaluate(&poll(0, 5, 0, &[]), true, &m).len(), 1);
        let resolved = e.evaluate(&poll(10, 0, 0, &[]), true, &m);
        assert_eq!(resolved.len(), 1, "Alertmanager needs it to end the alert");
        assert_eq!(resolved[0].status, Status::Resolved);
        assert!(resolved[0].quiet);
        assert!(!serde_json::to_string(&resolved[0]).unwrap().contains("quiet"));
    }

    #[test]
    fn a_new_leader_resolves_what_the_previous_leader_sent() {
        let mut e = evaluator("    - depth_above: 0\n");
        let m = Metrics::new();
        // The previous leader sent it; here it fired as a follower.
        assert!(e.evaluate(&poll(0, 1, 1, &[]), false, &m).is_empty());
        // Leadership moves just as the queue is drained.
        let n = e.evaluate(&poll(10, 0, 0, &[]), true, &m);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].status, Status::Resolved);
        assert!(e.evaluate(&poll(20, 0, 0, &[]), true, &m).is_empty());
    }

    #[test]
    fn for_delays_firing() {
        let mut e = evaluator("    - depth_above: 0\n      for: 30s\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 1, 1, &[]), true, &m).is_empty());
        assert!(e.evaluate(&poll(20, 1, 0, &[]), true, &m).is_empty());
        assert_eq!(e.evaluate(&poll(31, 1, 0, &[]), true, &m).len(), 1);
    }

    #[test]
    fn follower_sends_nothing_and_new_leader_sends_next() {
        let mut e = evaluator("    - depth_above: 0\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 1, 1, &[]), false, &m).is_empty());
        assert_eq!(e.evaluate(&poll(10, 1, 0, &[]), true, &m).len(), 1);
    }

    #[test]
    fn new_reason_baseline_then_only_new_ones_and_bodies_redacted() {
        let mut e = evaluator("    - new_reason: true\n");
        let m = Metrics::new();
        assert!(
            e.evaluate(&poll(0, 1, 0, &["Timeout"]), true, &m).is_empty(),
            "baseline"
        );
        assert!(e.evaluate(&poll(10, 1, 0, &["Timeout"]), true, &m).is_empty());
        let n = e.evaluate(&poll(20, 2, 1, &["Timeout", "Boom"]), true, &m);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].reason.as_deref(), Some("Boom"));
        assert_eq!(n[0].valid_for, Duration::from_secs(4 * 3600), "the default repeat");
        assert!(n[0].samples.iter().all(|s| s.body.is_none() && s.body_redacted));
        let json = serde_json::to_string(&n[0]).unwrap();
        assert!(!json.contains("secret body"), "{json}");
        assert!(e.evaluate(&poll(30, 2, 0, &["Boom"]), true, &m).is_empty());
    }

    /// A new reason found while this replica followed is announced once it
    /// leads, soon after (the leader may have been gone: nobody else would
    /// announce it), and not when it leads long after (a leader was there).
    #[test]
    fn a_new_reason_found_while_following_is_announced_by_the_next_leader() {
        let mut e = evaluator("    - new_reason: true\n");
        let m = Metrics::new();
        assert!(
            e.evaluate(&poll(0, 1, 0, &["Timeout"]), false, &m).is_empty(),
            "baseline"
        );
        assert!(
            e.evaluate(&poll(10, 2, 1, &["Timeout", "Boom"]), false, &m).is_empty(),
            "a follower sends nothing"
        );
        assert_eq!(m.firing().len(), 1, "its metric fires all the same");
        let n = e.evaluate(&poll(40, 3, 1, &["Timeout", "Boom", "Crash"]), true, &m);
        assert_eq!(reasons_of(&n), ["Boom", "Crash"], "owed first, then found now");
        assert!(
            e.evaluate(&poll(50, 3, 0, &["Timeout", "Boom", "Crash"]), true, &m)
                .is_empty(),
            "each once"
        );

        let mut e = evaluator("    - new_reason: true\n");
        assert!(e.evaluate(&poll(0, 1, 0, &["Timeout"]), false, &m).is_empty());
        assert!(e.evaluate(&poll(10, 2, 1, &["Timeout", "Boom"]), false, &m).is_empty());
        // Four default resend delays (60 s each) later: a leader was there.
        assert!(
            e.evaluate(&poll(10 + 241, 2, 0, &["Timeout", "Boom"]), true, &m)
                .is_empty(),
            "too old to be owed"
        );
    }

    /// An owed reason counts as recent at the time the replica took the
    /// lead, not at the next poll of its queue, which comes minutes later on
    /// a queue polled every 5 minutes.
    #[test]
    fn an_owed_reason_is_judged_when_the_lead_was_taken() {
        let m = Metrics::new();
        let mut e = evaluator("    - new_reason: true\n");
        assert!(e.evaluate(&poll(0, 1, 0, &["Timeout"]), false, &m).is_empty());
        assert!(e.evaluate(&poll(10, 2, 1, &["Timeout", "Boom"]), false, &m).is_empty());
        // It leads from 100 s (the resend timer says so), and the queue's
        // next poll is at 310 s, past four resend delays after the find.
        assert!(e.owed_resolves(at(100), true).is_empty());
        let n = e.evaluate(&poll(310, 2, 0, &["Timeout", "Boom"]), true, &m);
        assert_eq!(reasons_of(&n), ["Boom"]);

        let mut e = evaluator("    - new_reason: true\n");
        assert!(e.evaluate(&poll(0, 1, 0, &["Timeout"]), false, &m).is_empty());
        assert!(e.evaluate(&poll(10, 2, 1, &["Timeout", "Boom"]), false, &m).is_empty());
        // It led from 260 s: a leader was there when Boom was found.
        assert!(e.owed_resolves(at(260), true).is_empty());
        assert!(e.evaluate(&poll(310, 2, 0, &["Timeout", "Boom"]), true, &m).is_empty());
        // A lead lost and taken again counts from the second time: Boom,
        // found 390 s before it, was there for the leader in between.
        let mut e = evaluator("    - new_reason: true\n");
        assert!(e.evaluate(&poll(0, 1, 0, &["Timeout"]), false, &m).is_empty());
        assert!(e.evaluate(&poll(10, 2, 1, &["Timeout", "Boom"]), false, &m).is_empty());
        e.note_lead(at(20), true);
        e.note_lead(at(30), false);
        e.note_lead(at(400), true);
        assert!(e.owed_reasons.is_empty(), "no longer owed once it leads");
        assert!(e.evaluate(&poll(410, 2, 0, &["Timeout", "Boom"]), true, &m).is_empty());
    }

    /// A follower keeps no reasons for a queue no `new_reason` rule watches:
    /// they would never be announced.
    #[test]
    fn a_follower_owes_no_reasons_where_no_rule_announces_them() {
        let m = Metrics::new();
        let mut e = evaluator("    - new_reason: true\n      queues: [\"pay*\"]\n    - depth_above: 100\n");
        assert!(e.evaluate(&poll(0, 1, 0, &["Timeout"]), false, &m).is_empty());
        assert!(e.evaluate(&poll(10, 2, 1, &["Timeout", "Boom"]), false, &m).is_empty());
        assert!(e.owed_reasons.is_empty());
    }

    /// A follower keeps a bounded number of new reasons for the leader it
    /// may become.
    #[test]
    fn a_follower_keeps_a_bounded_number_of_owed_reasons() {
        let mut e = evaluator("    - new_reason: true\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 1, 0, &["Timeout"]), false, &m).is_empty());
        let many: Vec<String> = (0..MAX_OWED_REASONS + 10)
            .map(|i| format!("step {}", "xyzw".repeat(i + 1)))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(e.evaluate(&poll(10, 50, 50, &many), false, &m).is_empty());
        assert_eq!(e.owed_reasons["orders"].len(), MAX_OWED_REASONS);
        // The newest are kept.
        let mut later = many.clone();
        later.extend(["newest one", "newest two"]);
        assert!(e.evaluate(&poll(15, 52, 2, &later), false, &m).is_empty());
        let owed = &e.owed_reasons["orders"];
        assert_eq!(owed.len(), MAX_OWED_REASONS);
        assert_eq!(
            owed.iter().filter(|(_, seen)| *seen == at(15)).count(),
            2,
            "both newest kept"
        );
        let n = e.evaluate(&poll(20, 50, 0, &[]), true, &m);
        assert_eq!(
            n.len(),
            NEW_REASONS_PER_POLL + 1,
            "announced together past the first few"
        );
        assert_eq!(
            n[NEW_REASONS_PER_POLL].value,
            (MAX_OWED_REASONS - NEW_REASONS_PER_POLL) as f64
        );
        assert!(e.owed_reasons.is_empty());
    }

    /// Alertmanager keeps a new reason active for at least four resend
    /// delays, whatever `repeat` says: an endsAt already past reads there as
    /// resolved, and nobody is told.
    #[test]
    fn a_new_reason_stays_active_in_alertmanager_even_with_no_repeat() {
        let mut e = evaluator("    - new_reason: true\n      repeat: 0s\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 1, 0, &["Timeout"]), true, &m).is_empty());
        let n = e.evaluate(&poll(10, 2, 1, &["Timeout", "Boom"]), true, &m);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].valid_for, Duration::from_secs(240), "four default resend delays");
    }

    /// Reasons that differ only in an order number or an ID are one failure:
    /// announced once, by pattern, with an example.
    #[test]
    fn new_reason_compares_reasons_by_pattern() {
        let mut e = evaluator("    - new_reason: true\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 1, 0, &["Order 17 not found"]), true, &m).is_empty());
        let p = poll(10, 3, 2, &["Order 18 not found", "Order 19 not found"]);
        assert!(e.evaluate(&p, true, &m).is_empty(), "the same failure as order 17's");
        let p = poll(
            20,
            5,
            2,
            &["Card 4242 declined", "Order 20 not found", "Card 17 declined"],
        );
        let n = e.evaluate(&p, true, &m);
        assert_eq!(reasons_of(&n), ["Card <n> declined"]);
        assert_eq!(
            n[0].summary,
            "orders: new failure reason `Card <n> declined` (e.g. `Card 4242 declined`)"
        );
        let shown: Vec<_> = n[0].samples.iter().map(|s| s.reason.as_deref().unwrap()).collect();
        assert_eq!(shown, ["Card 4242 declined", "Card 17 declined"]);
        assert!(e.evaluate(&poll(30, 6, 1, &["Card 9 declined"]), true, &m).is_empty());
    }

    /// An age that is a floor (the oldest of a partial sample) fires the
    /// rule when it is above the threshold, and otherwise tells nothing:
    /// the rule keeps its state either way.
    #[test]
    fn an_oldest_age_floor_fires_above_the_threshold_and_otherwise_waits() {
        let mut e = evaluator("    - oldest_age_above: 60s\n");
        let m = Metrics::new();
        let aged = |t: i64, secs: u64, exactness: Option<Exactness>| {
            let mut p = poll(t, 50, 0, &[]);
            p.stats.oldest_age = Some(Duration::from_secs(secs));
            p.stats.oldest_age_exactness = exactness;
            p
        };
        let floor = Some(Exactness::AtLeast);
        assert!(e.evaluate(&aged(0, 30, floor), true, &m).is_empty());
        let n = e.evaluate(&aged(10, 90, floor), true, &m);
        assert_eq!(n.iter().map(|n| n.status).collect::<Vec<_>>(), [Status::Firing]);
        // A younger floor is no evidence that the old message went.
        assert!(e.evaluate(&aged(20, 5, floor), true, &m).is_empty());
        assert!(
            m.render()
                .contains(r#"dlq_bridge_alerts_firing{queue="orders",rule="oldest_age_above"} 1"#)
        );
        // The exact age is.
        let n = e.evaluate(&aged(30, 5, None), true, &m);
        assert_eq!(n.iter().map(|n| n.status).collect::<Vec<_>>(), [Status::Resolved]);
    }

    /// `keep_firing_for`: a condition that clears and comes back within it
    /// neither resolves nor fires again; one that stays clear for it
    /// resolves. Each crossing of the threshold was a fire and a resolve.
    #[test]
    fn keep_firing_for_holds_a_flapping_alert_until_it_stays_clear() {
        let mut e = evaluator("    - depth_above: 0\n      keep_firing_for: 60s\n");
        let m = Metrics::new();
        let statuses = |n: Vec<Notification>| n.iter().map(|n| n.status).collect::<Vec<_>>();
        assert_eq!(statuses(e.evaluate(&poll(0, 1, 1, &[]), true, &m)), [Status::Firing]);
        for (t, depth) in [(10, 0), (20, 1), (30, 0), (50, 1), (60, 0), (100, 0)] {
            assert!(e.evaluate(&poll(t, depth, 0, &[]), true, &m).is_empty(), "at {t}s");
        }
        assert_eq!(
            statuses(e.evaluate(&poll(120, 0, 0, &[]), true, &m)),
            [Status::Resolved]
        );
        assert_eq!(statuses(e.evaluate(&poll(130, 1, 1, &[]), true, &m)), [Status::Firing]);
        // Without it, every crossing.
        let mut e = evaluator("    - depth_above: 0\n");
        let sent: usize = [(0, 1), (10, 0), (20, 1), (30, 0)]
            .iter()
            .map(|&(t, d)| e.evaluate(&poll(t, d, d, &[]), true, &m).len())
            .sum();
        assert_eq!(sent, 4);
    }

    /// Many new reasons in one poll (text that varies per message in a way
    /// normalising does not know) are a few notices, not one per message:
    /// fifteen went to every sink within 42 ms.
    #[test]
    fn many_new_reasons_at_once_are_announced_together_past_the_first_few() {
        let mut e = evaluator("    - new_reason: true\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 1, 0, &["Timeout"]), true, &m).is_empty());
        let n = e.evaluate(&poll(10, 5, 4, &["Timeout", "a", "b", "c", "d"]), true, &m);
        assert_eq!(reasons_of(&n), ["a", "b", "c", "d"], "four: each its own");
        let many: Vec<String> = (0..15).map(|i| format!("step {}", "xyzw".repeat(i + 1))).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let n = e.evaluate(&poll(20, 15, 15, &many), true, &m);
        assert_eq!(n.len(), NEW_REASONS_PER_POLL + 1, "{n:?}");
        let rest = &n[NEW_REASONS_PER_POLL];
        assert_eq!(rest.value, 12.0);
        assert!(
            rest.summary
                .starts_with("orders: 12 more new failure reasons (e.g. `step "),
            "{}",
            rest.summary
        );
        assert!(rest.summary.contains("dlq-bridge report orders"), "{}", rest.summary);
    }

    /// A queue whose reasons are all different, past what normalising
    /// catches, costs bounded memory and stops paging once the bound is met.
    #[test]
    fn new_reason_remembers_a_bounded_number_of_patterns() {
        let mut e = evaluator("    - new_reason: true\n");
        let m = Metrics::new();
        // Letters only, so that no two normalise alike.
        let word = |mut i: usize| {
            let mut w = String::new();
            loop {
                w.push((b'a' + (i % 26) as u8) as char);
                i /= 26;
                if i == 0 {
                    return format!("Failed at step {w}");
                }
            }
        };
        assert!(e.evaluate(&poll(0, 0, 0, &[]), true, &m).is_empty());
        let reasons: Vec<String> = (0..MAX_KNOWN_PATTERNS + 50).map(word).collect();
        let mut announced = 0;
        for (t, chunk) in reasons.chunks(50).enumerate() {
            let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
            // Counted by reason: past the first few of a poll, one notice
            // carries the rest (its value).
            let n = e.evaluate(&poll(t as i64 + 1, 50, 50, &chunk), true, &m);
            assert!(n.len() <= NEW_REASONS_PER_POLL + 1);
            announced += n.iter().map(|n| n.value as usize).sum::<usize>();
        }
        assert_eq!(announced, MAX_KNOWN_PATTERNS);
        assert_eq!(e.known_reasons["orders"].digests.len(), MAX_KNOWN_PATTERNS);
        // Known ones stay known.
        assert!(e.evaluate(&poll(999, 1, 0, &[&reasons[3]]), true, &m).is_empty());
    }

    #[test]
    fn bodies_in_notifications_are_cut_to_a_few_kilobytes() {
        let cfg = Config::from_yaml(
            "alerts:\n  include_bodies: true\n  rules:\n    - new_reason: true\n",
            "t",
            &[],
        )
        .unwrap();
        let mut e = Evaluator::new(&cfg.alerts, ["orders"]);
        let m = Metrics::new();
        assert!(
            e.evaluate(&poll(0, 1, 0, &["Timeout"]), true, &m).is_empty(),
            "baseline"
        );
        let mut p = poll(10, 3, 2, &["Timeout", "Boom", "Boom"]);
        let sample = p.sample.as_mut().unwrap();
        // 1 MiB of two-byte characters, cut in the middle of one at the limit
        // (a 1-byte prefix shifts them), and a short body kept whole.
        let big = format!("x{}", "é".repeat(512 * 1024));
        sample[1] = message("m1", "Boom", big.as_bytes());
        sample[2] = message("m2", "Boom", b"short");
        assert!(
            sample[1].body.len() < 2 * SAMPLE_BODY_LIMIT,
            "the poller keeps no whole body"
        );
        let n = e.evaluate(&p, true, &m);
        assert_eq!(n.len(), 1);
        let [cut, whole] = &n[0].samples[..] else {
            panic!("{:?}", n[0].samples)
        };
        let body = cut.body.as_deref().unwrap();
        assert!(
            body.len() <= SAMPLE_BODY_LIMIT && body.len() > SAMPLE_BODY_LIMIT - 4,
            "{}",
            body.len()
        );
        assert!(
            big.starts_with(body) && !body.contains('\u{FFFD}'),
            "cut on a character boundary"
        );
        assert!(cut.body_truncated && cut.body_bytes == Some(big.len()) && !cut.body_redacted);
        assert_eq!(whole.body.as_deref(), Some("short"));
        assert!(!whole.body_truncated && whole.body_bytes == Some(5));
        let json = serde_json::to_value(&n[0]).unwrap();
        assert!(
            json.to_string().len() < 3 * SAMPLE_BODY_LIMIT,
            "the notification stays small"
        );
        assert_eq!(json["samples"][0]["body_truncated"], true);
        assert!(json["samples"][1].get("body_truncated").is_none(), "{json}");
    }

    #[test]
    fn growth_counts_a_burst_drained_between_polls() {
        let mut e = evaluator("    - growth: {messages: 5, window: 5m}\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 0, 0, &[]), true, &m).is_empty());
        assert!(e.evaluate(&poll(30, 0, 3, &[]), true, &m).is_empty());
        let n = e.evaluate(&poll(60, 0, 3, &[]), true, &m);
        assert_eq!(n.len(), 1, "6 arrivals within 5m though the depth stayed 0");
        assert_eq!(n[0].value, 6.0);
        assert_eq!(n[0].threshold, 5.0);
    }

    #[test]
    fn growth_spreads_the_arrivals_of_a_long_gap_over_it() {
        let mut e = evaluator("    - growth: {messages: 20, window: 10m}\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 0, 0, &[]), true, &m).is_empty());
        // Polls failed for 30 minutes while 1 message a minute arrived: about
        // 10 within the last 10 minutes, not 30.
        assert!(e.evaluate(&poll(1800, 30, 30, &[]), true, &m).is_empty());
        // A real burst still fires, on top of the gap's share.
        let n = e.evaluate(&poll(1830, 50, 20, &[]), true, &m);
        assert_eq!(n.len(), 1);
        assert!((29.0..31.0).contains(&n[0].value), "{}", n[0].value);
        assert!(
            n[0].summary.contains(" 30 messages arrived within 10m"),
            "{}",
            n[0].summary
        );
    }

    /// Arrivals a long redrive hid count when it ends, spread over the run,
    /// not over the last poll interval.
    #[test]
    fn growth_spreads_arrivals_a_run_hid_over_the_run() {
        let mut e = evaluator("    - growth: {messages: 20, window: 10m}\n");
        let m = Metrics::new();
        assert!(e.evaluate(&poll(0, 100, 0, &[]), true, &m).is_empty());
        for t in (30..1800).step_by(30) {
            assert!(e.evaluate(&poll(t, 50, 0, &[]), true, &m).is_empty());
        }
        // The run ended: 30 came during its 30 minutes, 1 a minute.
        let mut end = poll(1800, 30, 30, &[]);
        end.arrivals_since = Some(DateTime::from_timestamp(1_700_000_000, 0).unwrap());
        assert!(e.evaluate(&end, true, &m).is_empty(), "10 within 10m, not 30");
    }

    #[test]
    fn globs_select_queues() {
        let mut e = evaluator("    - depth_above: 0\n      queues: [\"pay*\"]\n");
        assert!(e.evaluate(&poll(0, 9, 0, &[]), true, &Metrics::new()).is_empty());
    }
}
