//! What the alert evaluator knows, kept in `serve.data_dir`
//! (`alerts-state.json`) so that a restart of `serve` (every deploy of a
//! sidecar) does not forget it: without it, an alert still true fired again
//! as a new one, one that cleared while `serve` was down was never resolved
//! at a webhook or in Slack, and a failure reason that first appeared
//! meanwhile became part of a new baseline and was never announced.
//!
//! Written whole to a temporary file and renamed over the last one, so a
//! crash leaves the previous state or the new one, never half of each. A
//! file that cannot be read is moved aside and the evaluator starts afresh,
//! as it did before there was a file: alerting is never held up by it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    Arrivals, Baseline, Evaluator, KnownPatterns, MAX_OWED_REASONS, NewReason, Notification, RESENDS_VALID, RuleState,
    SampleMessage, Status,
};

/// Version of the file's shape; a file of another version is set aside.
const VERSION: u32 = 1;

/// A condition that was pending (within its rule's `for`) or clearing
/// (within `keep_firing_for`) keeps its count across a restart only if the
/// state was saved at most this long ago: after a longer gap nobody watched
/// the condition, so the count starts again. Prometheus restores `for` the
/// same way, within its `for_outage_tolerance` (1 h by default).
const TIMERS_KEPT_WITHIN: Duration = Duration::from_secs(3600);

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    saved_at: DateTime<Utc>,
    rules: Vec<SavedRule>,
    queues: Vec<SavedQueue>,
}

/// One rule's state on one queue.
#[derive(Serialize, Deserialize)]
struct SavedRule {
    rule: String,
    kind: String,
    queue: String,
    pending_since: Option<DateTime<Utc>>,
    clear_since: Option<DateTime<Utc>>,
    firing_since: Option<DateTime<Utc>>,
    last_sent: Option<DateTime<Utc>>,
    /// The firing notification sent, and when it was last re-sent to
    /// Alertmanager.
    sent: Option<SavedNotice>,
    /// A resolve owed by a follower, and when the alert cleared.
    owed_resolve: Option<SavedNotice>,
}

/// A notification, less what its rule and queue say.
#[derive(Serialize, Deserialize)]
struct SavedNotice {
    at: DateTime<Utc>,
    status: Status,
    backend: String,
    value: f64,
    threshold: f64,
    summary: String,
    started_at: DateTime<Utc>,
    sent_at: DateTime<Utc>,
    samples: Vec<SampleMessage>,
}

/// What `new_reason` and `growth` know of one queue.
#[derive(Serialize, Deserialize)]
struct SavedQueue {
    queue: String,
    last_poll: Option<DateTime<Utc>>,
    baseline_at: Option<DateTime<Utc>>,
    baseline_complete: bool,
    /// Digests of the failure patterns seen ([`super::pattern_digest`]).
    known_patterns: Vec<u64>,
    patterns_full: bool,
    arrivals: Vec<Arrivals>,
    /// New failure reasons this replica found while it followed, owed to
    /// the leader it may become: a follower restarted in a rolling deploy
    /// is often that leader. Absent from files of earlier builds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    owed_reasons: Vec<SavedReason>,
}

/// A new failure reason found while following, and when.
#[derive(Serialize, Deserialize)]
struct SavedReason {
    pattern: String,
    example: String,
    seen: DateTime<Utc>,
}

impl SavedNotice {
    fn of(n: &Notification, at: DateTime<Utc>) -> Self {
        Self {
            at,
            status: n.status,
            backend: n.backend.clone(),
            value: n.value,
            threshold: n.threshold,
            summary: n.summary.clone(),
            started_at: n.started_at,
            sent_at: n.sent_at,
            samples: n.samples.clone(),
        }
    }
}

impl Evaluator {
    fn saved(&self, now: DateTime<Utc>) -> Saved {
        let notice = |n: &Option<(Notification, DateTime<Utc>)>| n.as_ref().map(|(n, at)| SavedNotice::of(n, *at));
        let mut rules: Vec<SavedRule> = self
            .state
            .iter()
            .map(|((i, queue), st)| SavedRule {
                rule: self.rules[*i].name.clone(),
                kind: self.rules[*i].kind.to_string(),
                queue: queue.clone(),
                pending_since: st.pending_since,
                clear_since: st.clear_since,
                firing_since: st.firing_since,
                last_sent: st.last_sent,
                sent: notice(&st.sent),
                owed_resolve: notice(&st.owed_resolve),
            })
            .collect();
        rules.sort_by(|a, b| (&a.rule, &a.queue).cmp(&(&b.rule, &b.queue)));
        let mut names: Vec<&String> = self
            .last_poll
            .keys()
            .chain(self.known_reasons.keys())
            .chain(self.baselines.keys())
            .chain(self.arrivals.keys())
            .chain(self.owed_reasons.keys())
            .collect();
        names.sort();
        names.dedup();
        let queues = names
            .into_iter()
            .map(|queue| {
                let known = self.known_reasons.get(queue);
                let baseline = self.baselines.get(queue);
                let mut known_patterns: Vec<u64> =
                    known.map(|k| k.digests.iter().copied().collect()).unwrap_or_default();
                known_patterns.sort_unstable();
                SavedQueue {
                    queue: queue.clone(),
                    last_poll: self.last_poll.get(queue).copied(),
                    baseline_at: baseline.map(|b| b.at),
                    baseline_complete: baseline.is_some_and(|b| b.complete),
                    known_patterns,
                    patterns_full: known.is_some_and(|k| k.full),
                    arrivals: self
                        .arrivals
                        .get(queue)
                        .map(|a| a.iter().copied().collect())
                        .unwrap_or_default(),
                    owed_reasons: self
                        .owed_reasons
                        .get(queue)
                        .into_iter()
                        .flatten()
                        .filter(|(_, seen)| self.still_owed(*seen, now))
                        .map(|(r, seen)| SavedReason {
                            pattern: r.pattern.clone(),
                            example: r.example.clone(),
                            seen: *seen,
                        })
                        .collect(),
                }
            })
            .collect();
        Saved {
            version: VERSION,
            saved_at: now,
            rules,
            queues,
        }
    }

    /// Take up what `saved` knew, for the rules and queues still configured
    /// (a rule is matched by its name and kind). What fired on a queue, or
    /// by a rule, no longer watched is resolved instead: nothing would ever
    /// clear it, and Alertmanager would keep it active for as long as this
    /// replica re-sent it.
    fn restore(&mut self, saved: Saved, now: DateTime<Utc>) {
        let timers_kept = (now - saved.saved_at).to_std().unwrap_or_default() <= TIMERS_KEPT_WITHIN;
        for r in saved.rules {
            // Two rules may share a name on queues apart (two unnamed
            // `depth_above` rules): the one that applies to the queue.
            let same = |rule: &super::Rule| rule.name == r.rule && rule.kind == r.kind;
            let applying = self
                .rules
                .iter()
                .position(|rule| same(rule) && rule.applies_to(&r.queue));
            let rule = applying.or_else(|| self.rules.iter().position(same));
            let watched = self.watched.contains(&r.queue);
            let Some(i) = applying.filter(|_| watched) else {
                let why = match rule {
                    None => "the rule is no longer configured",
                    Some(_) if !watched => "the queue is no longer configured",
                    Some(_) => "the rule no longer watches this queue",
                };
                let send_resolved = rule.is_none_or(|i| self.rules[i].cfg.send_resolved);
                if let Some(n) = r.sent {
                    self.retire(r.rule, &r.kind, r.queue, n, why, !send_resolved, now);
                }
                continue;
            };
            let rule = &self.rules[i];
            let notice = |n: SavedNotice, quiet: bool, valid_for: Duration| {
                (
                    Notification {
                        version: 1,
                        status: n.status,
                        rule: rule.name.clone(),
                        kind: rule.kind,
                        queue: r.queue.clone(),
                        backend: n.backend,
                        value: n.value,
                        threshold: n.threshold,
                        reason: None,
                        summary: n.summary,
                        started_at: n.started_at,
                        sent_at: n.sent_at,
                        repeat_seconds: rule.cfg.repeat.as_secs(),
                        samples: n.samples,
                        quiet,
                        valid_for,
                    },
                    n.at,
                )
            };
            let state = RuleState {
                pending_since: r.pending_since.filter(|_| timers_kept),
                clear_since: r.clear_since.filter(|_| timers_kept),
                firing_since: r.firing_since,
                last_sent: r.last_sent,
                sent: r.sent.map(|n| notice(n, false, self.resend_delay * RESENDS_VALID)),
                owed_resolve: r
                    .owed_resolve
                    .map(|n| notice(n, !rule.cfg.send_resolved, Duration::ZERO)),
            };
            self.any_owed |= state.owed_resolve.is_some();
            self.state.insert((i, r.queue), state);
        }
        for q in saved.queues {
            if !self.watched.contains(&q.queue) || !self.rules.iter().any(|r| r.applies_to(&q.queue)) {
                continue;
            }
            if let Some(at) = q.last_poll {
                self.last_poll.insert(q.queue.clone(), at);
            }
            if let Some(at) = q.baseline_at {
                self.baselines.insert(
                    q.queue.clone(),
                    Baseline {
                        at,
                        complete: q.baseline_complete,
                    },
                );
            }
            if !q.known_patterns.is_empty() || q.patterns_full {
                self.known_reasons.insert(
                    q.queue.clone(),
                    KnownPatterns {
                        digests: q.known_patterns.into_iter().collect(),
                        full: q.patterns_full,
                    },
                );
            }
            if !q.owed_reasons.is_empty() {
                // The newest, as a follower keeps them, and only those still
                // owed: this replica leads from now at the earliest.
                let over = q.owed_reasons.len().saturating_sub(MAX_OWED_REASONS);
                let owed: Vec<_> = q
                    .owed_reasons
                    .into_iter()
                    .skip(over)
                    .filter(|r| self.still_owed(r.seen, now))
                    .map(|r| {
                        let reason = NewReason {
                            pattern: r.pattern,
                            example: r.example,
                        };
                        (reason, r.seen)
                    })
                    .collect();
                if !owed.is_empty() {
                    self.owed_reasons.insert(q.queue.clone(), owed);
                }
            }
            if !q.arrivals.is_empty() {
                self.arrivals
                    .insert(q.queue, q.arrivals.into_iter().collect::<VecDeque<_>>());
            }
        }
    }
}

impl Evaluator {
    /// Owe the resolve of `sent`, an alert that fired by `rule` on `queue`
    /// before a restart and that is no longer evaluated (`why`).
    #[allow(clippy::too_many_arguments)]
    fn retire(
        &mut self,
        rule: String,
        kind: &str,
        queue: String,
        sent: SavedNotice,
        why: &str,
        quiet: bool,
        now: DateTime<Utc>,
    ) {
        tracing::info!(%rule, %queue, why, "an alert that fired before the restart is resolved");
        let n = Notification {
            version: 1,
            status: Status::Resolved,
            summary: format!("{queue}: {rule} resolved on {}: {why}", sent.backend),
            rule,
            kind: crate::config::ALERT_KINDS
                .into_iter()
                .find(|k| *k == kind)
                .unwrap_or("unknown"),
            queue,
            backend: sent.backend,
            value: sent.value,
            threshold: sent.threshold,
            reason: None,
            started_at: sent.started_at,
            sent_at: now,
            repeat_seconds: 0,
            samples: Vec::new(),
            quiet,
            valid_for: Duration::ZERO,
        };
        self.retired.push((n, now));
        self.any_owed = true;
    }
}

/// Where the evaluator's state is kept, and whether the last save failed
/// (warned about once until one succeeds).
pub struct StateFile {
    path: PathBuf,
    failing: bool,
}

impl StateFile {
    pub const NAME: &'static str = "alerts-state.json";

    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(Self::NAME),
            failing: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Give `evaluator` what the file knew. A missing file is a first
    /// start; one that cannot be read or parsed is moved aside (to
    /// `alerts-state.json.unreadable`) with a warning naming it, and the
    /// evaluator starts afresh.
    pub fn load(&self, evaluator: &mut Evaluator, now: DateTime<Utc>) {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the alert state; alerts start afresh");
                return;
            }
        };
        let saved = serde_json::from_slice::<Saved>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                if s.version == VERSION {
                    Ok(s)
                } else {
                    Err(format!("version {} (this build reads {VERSION})", s.version))
                }
            });
        match saved {
            Ok(saved) => {
                tracing::info!(
                    path = %self.path.display(),
                    saved_at = %saved.saved_at,
                    rules = saved.rules.len(),
                    "alert state restored"
                );
                evaluator.restore(saved, now);
            }
            Err(error) => {
                let aside = self.path.with_extension("json.unreadable");
                let moved = std::fs::rename(&self.path, &aside);
                tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    moved_to = %aside.display(),
                    moved = moved.is_ok(),
                    "the alert state cannot be read; alerts start afresh"
                );
            }
        }
    }

    /// Write `evaluator`'s state in place of the last. A failure is warned
    /// about (once until a save succeeds); alerting goes on.
    pub async fn save(&mut self, evaluator: &Evaluator, now: DateTime<Utc>) {
        let bytes = match serde_json::to_vec(&evaluator.saved(now)) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode the alert state");
                return;
            }
        };
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || write_replacing(&path, &bytes))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(()) => self.failing = false,
            Err(e) if !std::mem::replace(&mut self.failing, true) => {
                tracing::warn!(
                    path = %self.path.display(),
                    error = %e,
                    "cannot save the alert state; a restart will forget which alerts fire"
                );
            }
            Err(_) => {}
        }
    }
}

/// Write `bytes` to a file beside `path`, sync it, and rename it over
/// `path`. Owner-only: sample bodies are in it when `alerts.include_bodies`.
fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let partial = path.with_extension("json.partial");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&partial)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::triage::MAX_KEY_CHARS;
    use crate::sidecar::alert::tests::{evaluator, poll};
    use crate::sidecar::metrics::Metrics;

    /// A directory of its own under the system's temporary one, removed after.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("dlqb-alerts-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).expect("dir");
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const RULES: &str = "    - name: deep\n      depth_above: 10\n    - name: news\n      new_reason: true\n    - name: slow-for\n      depth_above: 5\n      for: 10m\n";

    /// What one evaluator knew, saved at `saved`, into a new one started at
    /// `started`.
    async fn restarted(before: &Evaluator, dir: &Path, saved: DateTime<Utc>, started: DateTime<Utc>) -> Evaluator {
        let mut file = StateFile::in_dir(dir);
        file.save(before, saved).await;
        let mut after = evaluator(RULES);
        StateFile::in_dir(dir).load(&mut after, started);
        after
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).expect("time")
    }

    #[tokio::test]
    async fn a_restart_neither_fires_again_nor_forgets_to_resolve() {
        let dir = TempDir::new();
        let m = Metrics::new();
        let mut e = evaluator(RULES);
        let fired = e.evaluate(&poll(0, 50, 0, &[]), true, &m);
        assert_eq!(fired.iter().filter(|n| n.rule == "deep").count(), 1);

        // Still deep after the restart: no second "firing", and the alert
        // is still kept alive at Alertmanager.
        let mut after = restarted(&e, dir.path(), at(30), at(60)).await;
        let again = after.evaluate(&poll(60, 50, 0, &[]), true, &m);
        assert!(again.iter().all(|n| n.rule != "deep"), "fired again: {again:?}");
        let kept = after.refresh(at(60) + chrono::Duration::hours(1), true);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept[0].started_at, fired[0].started_at);

        // Cleared while serve was down: resolved on the first poll after.
        let mut after = restarted(&e, dir.path(), at(30), at(120)).await;
        let resolved = after.evaluate(&poll(120, 0, 0, &[]), true, &m);
        let deep: Vec<_> = resolved.iter().filter(|n| n.rule == "deep").collect();
        assert_eq!(deep.len(), 1, "{resolved:?}");
        assert_eq!(deep[0].status, Status::Resolved);
        assert_eq!(deep[0].started_at, fired[0].started_at);
    }

    #[tokio::test]
    async fn a_reason_that_appeared_while_serve_was_down_is_announced() {
        let dir = TempDir::new();
        let m = Metrics::new();
        let mut e = evaluator(RULES);
        assert!(e.evaluate(&poll(0, 1, 0, &["timeout"]), true, &m).is_empty());
        let mut after = restarted(&e, dir.path(), at(30), at(60)).await;
        let news = after.evaluate(&poll(60, 2, 1, &["timeout", "schema mismatch"]), true, &m);
        let reasons: Vec<_> = news.iter().filter_map(|n| n.reason.as_deref()).collect();
        assert_eq!(reasons, ["schema mismatch"], "{news:?}");
    }

    /// A follower restarted in a rolling deploy is often the next leader:
    /// what it found while following is still owed after the restart.
    #[tokio::test]
    async fn a_reason_found_while_following_is_announced_after_a_restart_into_the_lead() {
        let dir = TempDir::new();
        let m = Metrics::new();
        let mut e = evaluator(RULES);
        assert!(e.evaluate(&poll(0, 1, 0, &["timeout"]), false, &m).is_empty());
        assert!(
            e.evaluate(&poll(10, 2, 1, &["timeout", "schema mismatch"]), false, &m)
                .is_empty()
        );
        let mut after = restarted(&e, dir.path(), at(20), at(40)).await;
        let news = after.evaluate(&poll(40, 2, 0, &["timeout", "schema mismatch"]), true, &m);
        let reasons: Vec<_> = news.iter().filter_map(|n| n.reason.as_deref()).collect();
        assert_eq!(reasons, ["schema mismatch"], "{news:?}");
    }

    /// Owed reasons too old to be announced by the time this replica could
    /// lead are not taken up again (a queue no longer polled kept them for
    /// good), and their text is saved cut to what a notice shows.
    #[tokio::test]
    async fn owed_reasons_too_old_to_announce_are_dropped_at_a_restart() {
        let dir = TempDir::new();
        let m = Metrics::new();
        let mut e = evaluator(RULES);
        assert!(e.evaluate(&poll(0, 1, 0, &["timeout"]), false, &m).is_empty());
        let long = format!("schema mismatch {}", "x".repeat(10_000));
        assert!(e.evaluate(&poll(10, 2, 1, &["timeout", &long]), false, &m).is_empty());
        let saved = e.saved(at(20));
        let example = &saved.queues[0].owed_reasons[0].example;
        assert_eq!(example.chars().count(), MAX_KEY_CHARS + 1);
        let after = restarted(&e, dir.path(), at(20), at(30)).await;
        assert_eq!(after.owed_reasons["orders"].len(), 1);
        // Four resend delays (of 60 s) after it was found: a leader was there.
        let after = restarted(&e, dir.path(), at(20), at(10 + 241)).await;
        assert!(after.owed_reasons.is_empty());
        // Nor is it saved then.
        assert!(e.saved(at(10 + 241)).queues[0].owed_reasons.is_empty());
    }

    #[tokio::test]
    async fn a_pending_count_survives_a_short_gap_only() {
        let dir = TempDir::new();
        let m = Metrics::new();
        let mut e = evaluator(RULES);
        let slow = |n: &[Notification]| n.iter().filter(|n| n.rule == "slow-for").count();
        assert_eq!(slow(&e.evaluate(&poll(0, 8, 0, &[]), true, &m)), 0);
        // 11 minutes after it began to hold, 1 of them down: it fires.
        let mut after = restarted(&e, dir.path(), at(540), at(600)).await;
        assert_eq!(slow(&after.evaluate(&poll(660, 8, 0, &[]), true, &m)), 1);
        // After two hours down, nobody watched it: `for` counts again.
        let mut after = restarted(&e, dir.path(), at(60), at(7200)).await;
        assert_eq!(slow(&after.evaluate(&poll(7200, 8, 0, &[]), true, &m)), 0);
        assert_eq!(slow(&after.evaluate(&poll(7200 + 601, 8, 0, &[]), true, &m)), 1);
    }

    #[tokio::test]
    async fn an_unreadable_file_is_set_aside_and_alerting_starts_afresh() {
        let dir = TempDir::new();
        let file = StateFile::in_dir(dir.path());
        std::fs::write(file.path(), b"{\"version\": 1, \"saved_at\": tru").expect("write");
        let mut e = evaluator(RULES);
        file.load(&mut e, at(0));
        assert!(!file.path().exists());
        assert!(dir.path().join("alerts-state.json.unreadable").exists());
        let fired = e.evaluate(&poll(0, 50, 0, &[]), true, &Metrics::new());
        assert_eq!(fired.len(), 1, "{fired:?}");
    }

    #[tokio::test]
    async fn a_rule_renamed_or_dropped_leaves_its_state_behind() {
        let dir = TempDir::new();
        let m = Metrics::new();
        let mut e = evaluator(RULES);
        e.evaluate(&poll(0, 50, 0, &[]), true, &m);
        let mut file = StateFile::in_dir(dir.path());
        file.save(&e, at(30)).await;
        let mut renamed = evaluator("    - name: deeper\n      depth_above: 10\n");
        StateFile::in_dir(dir.path()).load(&mut renamed, at(60));
        let fired = renamed.evaluate(&poll(60, 50, 0, &[]), true, &m);
        let got: Vec<_> = fired.iter().map(|n| (n.rule.as_str(), n.status)).collect();
        // The old rule's alert is resolved (nothing else would end it), the
        // new rule's is new.
        assert_eq!(
            got,
            [("deep", Status::Resolved), ("deeper", Status::Firing)],
            "{fired:?}"
        );
        assert!(
            fired[0].summary.ends_with("the rule is no longer configured"),
            "{fired:?}"
        );
        assert_eq!(fired[0].kind, "depth_above");
        assert!(!fired[0].quiet);
    }

    /// Two unnamed rules of one kind share a name on queues apart: a
    /// restart restores the firing alert under the one that applies, and
    /// neither resolves nor fires it again.
    #[tokio::test]
    async fn rules_sharing_a_name_on_queues_apart_are_restored_each_to_its_own() {
        let dir = TempDir::new();
        let m = Metrics::new();
        let rules =
            "    - depth_above: 10\n      queues: [\"pay*\"]\n    - depth_above: 10\n      queues: [\"ord*\"]\n";
        let mut e = evaluator(rules);
        assert_eq!(e.evaluate(&poll(0, 50, 0, &[]), true, &m).len(), 1);
        StateFile::in_dir(dir.path()).save(&e, at(30)).await;
        let mut after = evaluator(rules);
        StateFile::in_dir(dir.path()).load(&mut after, at(60));
        let again = after.evaluate(&poll(60, 50, 0, &[]), true, &m);
        assert!(again.is_empty(), "neither resolved nor fired again: {again:?}");
        assert_eq!(after.refresh(at(60) + chrono::Duration::hours(1), true).len(), 1);
    }

    /// A queue removed from the config (or renamed) while its alert fired:
    /// the alert is resolved once by the next leader, not kept alive at
    /// Alertmanager for good, and its state is not saved again.
    #[tokio::test]
    async fn an_alert_of_a_queue_no_longer_configured_is_resolved_after_a_restart() {
        let dir = TempDir::new();
        let m = Metrics::new();
        let mut e = evaluator(RULES);
        let fired = e.evaluate(&poll(0, 50, 0, &[]), true, &m);
        assert_eq!(fired.iter().filter(|n| n.rule == "deep").count(), 1);
        StateFile::in_dir(dir.path()).save(&e, at(30)).await;
        let cfg = crate::config::Config::from_yaml(&format!("alerts:\n  rules:\n{RULES}"), "t", &[]).unwrap();
        let mut after = Evaluator::new(&cfg.alerts, ["payments"]);
        StateFile::in_dir(dir.path()).load(&mut after, at(60));
        assert!(after.owed_resolves(at(60), false).is_empty(), "only a leader sends it");
        let resolved = after.owed_resolves(at(70), true);
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert_eq!(
            (resolved[0].rule.as_str(), resolved[0].queue.as_str()),
            ("deep", "orders")
        );
        assert_eq!(resolved[0].status, Status::Resolved);
        assert_eq!(resolved[0].started_at, fired[0].started_at);
        assert!(
            resolved[0].summary.ends_with("the queue is no longer configured"),
            "{resolved:?}"
        );
        assert!(after.owed_resolves(at(80), true).is_empty(), "once");
        assert!(after.refresh(at(60) + chrono::Duration::hours(1), true).is_empty());
        let saved = after.saved(at(90));
        assert!(saved.rules.is_empty() && saved.queues.is_empty(), "not saved again");
    }
}
