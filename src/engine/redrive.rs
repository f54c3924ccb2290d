//! The redrive engine: all redrive policy, generic over [`QueueBackend`]
//! (DESIGN §3).
//!
//! One pass leases batch after batch, with several leases in flight to hide
//! the provider's round trip (see [`Pass`]). Each fresh message is filtered;
//! matches are sent to their destination, and only messages whose copy was
//! confirmed are settled (guarantee 1). Everything else stays leased until the
//! pass stops leasing and is then released together (while the last sends are
//! confirmed), and a seen-set stops the pass from examining a message twice,
//! so a pass always terminates (guarantee 4).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, Capabilities, QueueBackend};
use crate::engine::held::{HeldLeases, Keeper, effective_hold};
use crate::engine::journal::{Journal, Record};
use crate::filter::Filter;
use crate::model::{
    AttrValue, Attribute, Attributes, Destination, DlqMessage, LeaseId, Leased, Outgoing, Properties, SendResult,
    SettleResult,
};

/// Marks every redriven copy carries (guarantee 3).
pub const MARK_ID: &str = "dlq-bridge-redrive-id";
pub const MARK_COUNT: &str = "dlq-bridge-redrive-count";

/// Consecutive leases that return only already-examined messages before a
/// pass concludes that everything left has been seen.
const ALL_SEEN_LIMIT: u32 = 3;
pub(crate) const LEASE_RETRIES: u32 = 3;
const MAX_REPORTED_ERRORS: usize = 20;
const SAMPLE_SIZE: usize = 10;

/// Who started a run, for the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Cli,
    Api,
    Schedule,
    /// A queue's `retention` policy, applied by `serve`.
    Retention,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cli => "cli",
            Self::Api => "api",
            Self::Schedule => "schedule",
            Self::Retention => "retention",
        })
    }
}

/// Where a purge writes what it removes, before it removes it.
pub trait Backup: Send + Sync {
    /// Write the messages durably (flushed and fsynced) before returning.
    fn write(&self, msgs: &[&DlqMessage]) -> Result<(), String>;
    /// The backup's name in summaries and errors (e.g. its file path).
    fn describe(&self) -> String;
}

/// What a run does with each matching message it leased. Both actions share
/// the pass: leases, the seen-set, filters, limits, and releasing everything
/// not removed at the end.
#[derive(Clone, Default)]
pub enum Action {
    /// Send a copy to its destination, then settle the original (guarantee 1).
    #[default]
    Redrive,
    /// Write the message to the backup (when there is one), then settle it:
    /// a purge. Each removal is journaled as `purged`.
    Discard { backup: Option<Arc<dyn Backup>> },
}

impl Action {
    pub const REDRIVE: &'static str = "redrive";
    pub const PURGE: &'static str = "purge";

    pub fn name(&self) -> &'static str {
        match self {
            Self::Redrive => Self::REDRIVE,
            Self::Discard { .. } => Self::PURGE,
        }
    }
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Redrive => f.write_str("Redrive"),
            Self::Discard { backup } => f
                .debug_struct("Discard")
                .field("backup", &backup.as_ref().map(|b| b.describe()))
                .finish(),
        }
    }
}

/// Everything a run needs to know, decided before it starts.
#[derive(Debug, Clone)]
pub struct RedrivePlan {
    pub run_id: String,
    pub queue: String,
    pub trigger: Trigger,
    pub filter: Filter,
    /// `--to`: every copy goes here.
    pub to: Option<Destination>,
    /// Used for messages that name no source of their own (the config's
    /// `source`, else what the provider reports).
    pub fallback_source: Option<Destination>,
    pub dry_run: bool,
    pub rate: Option<NonZeroU32>,
    pub max: Option<u64>,
    pub concurrency: usize,
    pub hold: Duration,
    pub deadline: Duration,
    /// Leased messages the pass may keep without moving them before it stops
    /// leasing (`redrive.max_held`).
    pub max_held: usize,
    pub max_redrives: u32,
    pub strip_dead_letter_attributes: bool,
    /// Redrive (the default) or purge.
    pub action: Action,
}

/// Live counters, readable while the run goes (progress bar, HTTP API).
#[derive(Debug, Default)]
pub struct Progress {
    pub examined: AtomicU64,
    pub matched: AtomicU64,
    pub sent: AtomicU64,
    pub settled: AtomicU64,
    pub failed: AtomicU64,
}

impl Progress {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The DLQ had nothing more to lease.
    Drained,
    /// Only messages this run had already examined came back.
    AllSeen,
    /// `--max` messages were redriven (or planned, in a dry run).
    MaxReached,
    Deadline,
    /// The pass held `redrive.max_held` messages it did not move, or the
    /// provider refused to lease more while it held them (SQS's in-flight
    /// limit): messages past them were not examined.
    HeldLimit,
    Cancelled,
    /// The provider kept failing; see `error`.
    Failed,
}

impl StopReason {
    /// The name JSON reports and `runs` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::AllSeen => "all_seen",
            Self::MaxReached => "max_reached",
            Self::Deadline => "deadline",
            Self::HeldLimit => "held_limit",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub id: String,
    pub reason: Option<String>,
    pub destination: Option<String>,
}

/// The outcome of a run: printed at the end and written to the journal.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub queue: String,
    pub trigger: Trigger,
    /// `redrive` or `purge`. For a purge, `sent` counts messages written to
    /// the backup (or discarded, without one) and `destinations` names it.
    pub action: &'static str,
    pub filter: String,
    pub dry_run: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub examined: u64,
    pub matched: u64,
    pub sent: u64,
    pub settled: u64,
    /// Copies an earlier, interrupted run had sent; settled now, not resent
    /// (counted in `settled` too).
    pub settled_from_journal: u64,
    /// Copies an interrupted run may have sent (it died inside the send), sent
    /// again under the same `dlq-bridge-redrive-id` so consumers can dedupe.
    pub resent_after_crash: u64,
    pub send_failed: u64,
    pub settle_failed: u64,
    pub filter_errors: u64,
    /// Matches left in the DLQ because they were redriven `max_redrives` times.
    pub skipped_max_redrives: u64,
    /// Matches left in the DLQ to keep their group's order (SQS FIFO group,
    /// Pub/Sub ordering key, Service Bus session): an earlier message of the
    /// group failed to send, so its later ones must not arrive before it.
    pub held_for_order: u64,
    /// Copies sent without the redrive marks, because the provider's attribute
    /// cap or message size limit left no room for them.
    pub marks_omitted: u64,
    pub released: u64,
    /// Destination → messages sent there (planned, in a dry run).
    pub destinations: BTreeMap<String, u64>,
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
    pub stopped: StopReason,
    /// The journal failed (a full disk): what the run did is in this
    /// summary, and only partly in the journal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_error: Option<String>,
}

impl RunSummary {
    /// Whether the run did what it was asked: nothing failed, and the filter
    /// did not fail on every message it saw (a typo in an attribute name
    /// fails on every message, and would otherwise look like "no match").
    pub fn ok(&self) -> bool {
        self.stopped != StopReason::Failed
            && self.journal_error.is_none()
            && self.send_failed == 0
            && self.settle_failed == 0
            && !(self.examined > 0 && self.filter_errors == self.examined)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Journal(#[from] crate::engine::journal::JournalError),
}

/// A batch's worth of results, handed back from a send task.
#[derive(Default)]
struct BatchOutcome {
    keys: Vec<String>,
    /// Ordering keys of messages whose send failed.
    failed_keys: Vec<String>,
    sent: u64,
    settled: u64,
    send_failed: u64,
    settle_failed: u64,
    /// Leases to release at the end: messages whose send failed stay in the DLQ.
    unsent: Vec<LeaseId>,
    errors: Vec<String>,
    /// The destination refused the whole batch for a reason waiting does not
    /// mend (credentials, a right, a certificate, a missing entity): every
    /// later batch would fail the same way, so the pass stops.
    refused: bool,
    marks_omitted: u64,
    resent_after_crash: u64,
}

pub struct Engine {
    backend: Arc<dyn QueueBackend>,
    journal: Option<Arc<Journal>>,
    progress: Arc<Progress>,
    cancel: CancellationToken,
}

impl Engine {
    pub fn new(backend: Arc<dyn QueueBackend>) -> Self {
        Self {
            backend,
            journal: None,
            progress: Arc::default(),
            cancel: CancellationToken::new(),
        }
    }

    pub fn with_journal(mut self, journal: Arc<Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    pub fn with_cancel(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Count into `progress`: a caller that follows the run as it goes.
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = progress;
        self
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    fn journal(&self, record: Record) -> Result<(), RedriveError> {
        if let Some(j) = &self.journal {
            j.append(&record)?;
        }
        Ok(())
    }

    fn sync_journal(&self) -> Result<(), RedriveError> {
        if let Some(j) = &self.journal {
            j.sync()?;
        }
        Ok(())
    }

    pub async fn run(&self, plan: &RedrivePlan) -> Result<RunSummary, RedriveError> {
        let started = Instant::now();
        let s = RunSummary {
            run_id: plan.run_id.clone(),
            queue: plan.queue.clone(),
            trigger: plan.trigger,
            action: plan.action.name(),
            filter: plan.filter.source().to_string(),
            dry_run: plan.dry_run,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            examined: 0,
            matched: 0,
            sent: 0,
            settled: 0,
            settled_from_journal: 0,
            resent_after_crash: 0,
            send_failed: 0,
            settle_failed: 0,
            filter_errors: 0,
            skipped_max_redrives: 0,
            held_for_order: 0,
            marks_omitted: 0,
            released: 0,
            destinations: BTreeMap::new(),
            samples: Vec::new(),
            errors: Vec::new(),
            stopped: StopReason::Drained,
            journal_error: None,
        };
        self.journal(Record::RunStarted {
            run: plan.run_id.clone(),
            at: s.started_at,
            queue: plan.queue.clone(),
            action: Some(plan.action.name().into()),
            trigger: plan.trigger.to_string(),
            filter: plan.filter.source().to_string(),
            dry_run: plan.dry_run,
            destination: plan.to.as_ref().map(|d| d.0.clone()),
        })?;
        self.sync_journal()?;

        if !plan.dry_run && matches!(plan.action, Action::Redrive) {
            // Without `--to`, copies go where each message came from: most
            // often the fallback source.
            if let Some(dest) = plan.to.as_ref().or(plan.fallback_source.as_ref()) {
                self.backend.clone().prepare_send(dest);
            }
        }
        let mut pass = Pass::new(self, plan, s);
        pass.keep_held();
        let result = pass.drive(started).await;
        let mut s = pass.finish().await;
        s.finished_at = Utc::now();
        // A journal that fails now (or failed mid-run) still leaves the user
        // the summary of what was sent and settled; it was thrown away.
        let finished = self
            .journal(Record::RunFinished {
                run: plan.run_id.clone(),
                at: s.finished_at,
                summary: serde_json::to_value(&s).expect("summary serializes"),
            })
            .and_then(|()| self.sync_journal());
        if let Err(e) = finished {
            let text = format!("{e} (the journal does not hold this run's end; `runs` shows it unfinished)");
            push_error(&mut s.errors, format!("journal: {text}"));
            s.journal_error = Some(text);
        }
        result?;
        Ok(s)
    }

    fn clone_for_task(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            journal: self.journal.clone(),
            progress: self.progress.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// Send, record, then settle only what the destination confirmed.
    async fn send_batch(
        &self,
        run: &RunRef,
        dest: &Destination,
        batch: Vec<Leased>,
        outgoing: Vec<Outgoing>,
        resends: Vec<bool>,
        slot: SendPermit,
    ) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        // Counted for the copies that went, not for those built.
        let unmarked: Vec<bool> = outgoing.iter().map(|o| !o.attributes.contains_key(MARK_ID)).collect();
        for (l, o) in batch.iter().zip(&outgoing) {
            let _ = self.journal(Record::Leased {
                run: run.id.clone(),
                queue: Some(run.queue.clone()),
                id: l.message.id.clone(),
                redrive_id: o.attributes.get(MARK_ID).map(Attribute::as_text),
            });
        }
        // The intent is durable before the send: a crash inside the send is
        // then known to the next run, which resends under the same mark.
        if let Err(e) = self.sync_journal() {
            push_error(&mut out.errors, format!("journal: {e}; not sending this batch"));
            // The journal keeps failing once it failed (a full disk): the
            // pass stops rather than lease the rest of the DLQ for nothing.
            out.refused = true;
            out.failed_keys
                .extend(batch.iter().filter_map(|l| l.message.ordering_key.clone()));
            // Counted as failed sends: a run that skipped messages it matched
            // did not do what it was asked, even if the disk recovers later.
            out.send_failed = batch.len() as u64;
            Progress::add(&self.progress.failed, out.send_failed);
            out.unsent.extend(batch.into_iter().map(|l| l.lease));
            return out;
        }
        let sending = std::time::Instant::now();
        let mut batch_error = None;
        let results = match self.backend.send(dest, &outgoing).await {
            Ok(r) => r,
            Err(e) => {
                let error = format!("send to {dest} failed: {e}");
                push_error(&mut out.errors, error.clone());
                out.refused = is_permanent(&e);
                batch_error = Some(error.clone());
                vec![SendResult::Failed { error }; batch.len()]
            }
        };
        drop((outgoing, slot));
        let mut confirmed = Vec::new();
        for (((l, r), unmarked), resend) in batch.into_iter().zip(results).zip(unmarked).zip(resends) {
            match r {
                SendResult::Sent { dest_id } => {
                    out.sent += 1;
                    out.marks_omitted += u64::from(unmarked);
                    out.resent_after_crash += u64::from(resend);
                    let _ = self.journal(Record::Sent {
                        run: run.id.clone(),
                        queue: Some(run.queue.clone()),
                        id: l.message.id.clone(),
                        enqueued_at: l.message.enqueued_at,
                        destination: dest.0.clone(),
                        dest_id,
                    });
                    confirmed.push(l.settling());
                }
                SendResult::Failed { error } => {
                    out.send_failed += 1;
                    out.failed_keys.extend(l.message.ordering_key.clone());
                    let _ = self.journal(Record::SendFailed {
                        run: run.id.clone(),
                        queue: Some(run.queue.clone()),
                        id: l.message.id.clone(),
                        error: error.clone(),
                    });
                    // The batch's own error, said once above, is not said
                    // again for each of its messages (the journal has them).
                    if batch_error.as_ref() != Some(&error) {
                        push_error(&mut out.errors, format!("message {}: {error}", l.message.id));
                    }
                    out.unsent.push(l.lease);
                }
            }
        }
        Progress::add(&self.progress.sent, out.sent);
        Progress::add(&self.progress.failed, out.send_failed);
        // The `sent` records must be durable before the originals go: after a
        // crash here, a rerun settles instead of resending.
        if let Err(e) = self.sync_journal() {
            push_error(&mut out.errors, format!("journal: {e}; not settling this batch"));
            out.refused = true;
            // Their copies went; the originals stay in the DLQ: failed settles.
            out.settle_failed = confirmed.len() as u64;
            Progress::add(&self.progress.failed, out.settle_failed);
            out.unsent.extend(confirmed.into_iter().map(|l| l.lease));
            return out;
        }
        let sent_in = sending.elapsed();
        let settled = self.settle_batch(run, confirmed, false).await;
        tracing::debug!(?sent_in, settled_in = ?(sending.elapsed() - sent_in), "batch sent and settled");
        out.settled = settled.settled;
        out.settle_failed = settled.settle_failed;
        out.unsent.extend(settled.unsent);
        out.errors.extend(settled.errors);
        out
    }

    /// Back up (when there is a backup), then settle: the purge's half of a batch.
    async fn discard_batch(
        &self,
        run: &RunRef,
        batch: Vec<Leased>,
        backup: Option<Arc<dyn Backup>>,
        slot: SendPermit,
    ) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        for l in &batch {
            let _ = self.journal(Record::Leased {
                run: run.id.clone(),
                queue: Some(run.queue.clone()),
                id: l.message.id.clone(),
                redrive_id: None,
            });
        }
        // As before a send: each deletion is recorded before it happens, and
        // a journal that cannot take records (a full disk) stops the purge.
        if let Err(e) = self.sync_journal() {
            push_error(&mut out.errors, format!("journal: {e}; not deleting this batch"));
            out.refused = true;
            out.send_failed = batch.len() as u64;
            Progress::add(&self.progress.failed, out.send_failed);
            out.unsent.extend(batch.into_iter().map(|l| l.lease));
            return out;
        }
        if let Some(b) = &backup {
            let msgs: Vec<&DlqMessage> = batch.iter().map(|l| &l.message).collect();
            if let Err(e) = b.write(&msgs) {
                push_error(
                    &mut out.errors,
                    format!(
                        "backup to {} failed ({e}); {} messages stay in the DLQ",
                        b.describe(),
                        batch.len()
                    ),
                );
                out.send_failed = batch.len() as u64;
                Progress::add(&self.progress.failed, out.send_failed);
                out.unsent.extend(batch.into_iter().map(|l| l.lease));
                return out;
            }
        }
        drop(slot);
        out.sent = batch.len() as u64;
        Progress::add(&self.progress.sent, out.sent);
        let batch = batch.into_iter().map(Leased::settling).collect();
        let settled = self.settle_batch(run, batch, true).await;
        out.settled = settled.settled;
        out.settle_failed = settled.settle_failed;
        out.unsent.extend(settled.unsent);
        out.errors.extend(settled.errors);
        let _ = self.sync_journal();
        out
    }

    /// Settle leased messages; `purged` journals each removal as a purge.
    async fn settle_batch(&self, run: &RunRef, batch: Vec<Leased>, purged: bool) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        if batch.is_empty() {
            return out;
        }
        let leases: Vec<LeaseId> = batch.iter().map(|l| l.lease.clone()).collect();
        let results = match self.backend.settle(&leases).await {
            Ok(r) => r,
            Err(e) => vec![SettleResult::Failed { error: e.to_string() }; leases.len()],
        };
        for (l, r) in batch.into_iter().zip(results) {
            match r {
                SettleResult::Settled => {
                    out.settled += 1;
                    let _ = self.journal(if purged {
                        Record::Purged {
                            run: run.id.clone(),
                            id: l.message.id,
                            reason: l.message.reason,
                        }
                    } else {
                        Record::Settled {
                            run: run.id.clone(),
                            queue: Some(run.queue.clone()),
                            id: l.message.id,
                            enqueued_at: l.message.enqueued_at,
                        }
                    });
                }
                SettleResult::Failed { error } => {
                    out.settle_failed += 1;
                    let _ = self.journal(Record::SettleFailed {
                        run: run.id.clone(),
                        id: l.message.id.clone(),
                        error: error.clone(),
                    });
                    let (what, next) = if purged {
                        (
                            "was backed up but could not be removed from the DLQ",
                            "it stays in the DLQ",
                        )
                    } else if self.journal.is_some() {
                        (
                            "was sent but could not be removed from the DLQ",
                            "a rerun with the same journal settles it without resending",
                        )
                    } else {
                        (
                            "was sent but could not be removed from the DLQ",
                            "without a journal, a rerun sends it again",
                        )
                    };
                    push_error(
                        &mut out.errors,
                        format!("message {} {what} ({error}); {next}", l.message.id),
                    );
                    out.unsent.push(l.lease);
                }
            }
        }
        Progress::add(&self.progress.settled, out.settled);
        Progress::add(&self.progress.failed, out.settle_failed);
        out
    }
}

/// Send tasks that may be settling (their copies confirmed, their slot given
/// back) per send slot. A settle is a round trip of its own after the send's:
/// were the slot held through it, a cloud's round trip would halve what the
/// slots send. A settling task holds no bodies (see [`Leased::settling`]);
/// the bound only keeps a provider whose settles lag from piling them up.
const SETTLES_PER_SEND_SLOT: usize = 3;

/// Leases in flight at once while a rate is set: the rate is then the
/// bottleneck, and a deeper prefetch only makes leased messages wait longer.
const RATED_LEASE_SLOTS: usize = 2;

/// Bodies that leases in flight may hold at once, estimated from the bodies
/// seen so far: large messages get fewer leases in flight, never fewer than one.
const LEASE_MEMORY_BUDGET: u64 = 32 << 20;

/// The body a message is assumed to have before the pass has examined any:
/// the first leases may hold [`LEASE_MEMORY_BUDGET`] of such bodies. Starting
/// every lease slot at once with nothing known let 64 KiB Pub/Sub messages
/// fill 16 leases of 100 (100 MiB) before the first came back.
const ASSUMED_BODY: u64 = 64 << 10;

/// Bodies that copies being sent may hold at once (with the SDKs' encoded
/// requests, about as much again): a send waits for room besides its slot,
/// and one always goes when none is out, however large. Sixteen send slots
/// of 100 messages of 64 KiB would otherwise hold 100 MiB.
const SEND_MEMORY_BUDGET: u64 = 16 << 20;

/// The run, and the configured queue, that a journal record is about.
struct RunRef {
    id: String,
    queue: String,
}

impl RunRef {
    fn of(plan: &RedrivePlan) -> Self {
        Self {
            id: plan.run_id.clone(),
            queue: plan.queue.clone(),
        }
    }
}

/// What a send task holds while its copies are out: a concurrency slot, and
/// room for their bodies within [`SEND_MEMORY_BUDGET`] (in KiB). Dropped once
/// the destination answered: settling holds no bodies.
struct SendPermit {
    _slot: OwnedSemaphorePermit,
    _room: OwnedSemaphorePermit,
}

/// A lease in flight: its task, the retry generation it was started in, and
/// how many messages the pass had settled when it started.
struct InFlightLease {
    generation: u32,
    settled_before: u64,
    task: JoinHandle<crate::backend::Result<Vec<Leased>>>,
}

/// One pass over a DLQ: the state kept between lease results.
///
/// Several leases are in flight at once (competing-consumer semantics make
/// that safe on every provider), but their results are examined one at a
/// time and in the order the leases were started, so the seen-set, the
/// filter, `--max` and the per-key order need no locking and hold exactly as
/// with a single lease. Matches gather per destination into full send batches;
/// a partial batch goes out as soon as no further lease result is waiting.
struct Pass<'a> {
    engine: &'a Engine,
    plan: &'a RedrivePlan,
    s: RunSummary,
    caps: Capabilities,
    /// With a rate: the fixed lease size that keeps a batch within its hold.
    rated_lease: Option<usize>,
    limiter: Option<DefaultDirectRateLimiter>,
    /// Where a purge "sends" its matches (the backup), for the summary.
    discard_to: Option<Destination>,
    seen: SeenSet,
    /// Leases released when the pass ends (guarantee 4), extended by
    /// `keeper` meanwhile.
    held: HeldLeases,
    /// How long a lease or an extension holds a message: `redrive.hold`, or
    /// less where the provider caps or fixes it.
    hold: Duration,
    keeper: Option<Keeper>,
    planned: u64,
    all_seen_streak: u32,
    /// A destination refused a batch for good (see [`BatchOutcome::refused`]):
    /// nothing more is leased or sent.
    refused: bool,
    /// Matches not yet handed to a send task, per destination, in lease order.
    pending: BTreeMap<Destination, Vec<Leased>>,
    /// Send tasks: each holds one of `send_slots` while its copies are being
    /// sent, and gives it back before it settles the originals (see
    /// [`SETTLES_PER_SEND_SLOT`]).
    sends: JoinSet<BatchOutcome>,
    send_slots: Arc<Semaphore>,
    /// Room for the bodies of copies being sent, in KiB (see [`SendPermit`]).
    send_room: Arc<Semaphore>,
    keys_in_flight: HashMap<String, usize>,
    /// Ordering keys with a message whose send failed: their later messages
    /// stay in the DLQ for the rest of the pass (see `held_for_order`).
    failed_keys: HashSet<String>,
    /// Ordering keys with a match held because `--max` was reached: should a
    /// failed send free room under `--max` later, their later messages must
    /// not go ahead of it.
    capped_keys: HashSet<String>,
    leases: VecDeque<InFlightLease>,
    body_bytes: u64,
}

impl<'a> Pass<'a> {
    fn new(engine: &'a Engine, plan: &'a RedrivePlan, s: RunSummary) -> Self {
        let caps = engine.backend.capabilities();
        // A provider that fixes its own hold (Service Bus's LockDuration)
        // or caps it (Pub/Sub's 600 s) keeps a leased message no longer than
        // that, whatever was asked.
        let hold = effective_hold(&caps, plan.hold);
        if plan.rate.is_some() && hold < plan.hold {
            tracing::info!(
                hold = ?plan.hold,
                provider_hold = ?hold,
                "the provider holds a leased message for less than redrive.hold (Service Bus: the entity's LockDuration; Pub/Sub: 600 s); rated leases are sized to it, and held messages are extended within it"
            );
        }
        // Each leased batch waits for its rate tokens behind the others in
        // flight: they share the hold.
        let rated_lease = plan
            .rate
            .map(|_| lease_size(caps.batch_size, plan.rate, hold / RATED_LEASE_SLOTS as u32));
        let discard_to = match &plan.action {
            Action::Redrive => None,
            Action::Discard { backup } => Some(Destination(match backup {
                Some(b) => format!("backup {}", b.describe()),
                None => "(discarded, no backup)".into(),
            })),
        };
        Self {
            engine,
            plan,
            s,
            caps,
            rated_lease,
            limiter: plan.rate.map(|r| message_rate(r, caps.batch_size)),
            discard_to,
            seen: SeenSet::default(),
            held: HeldLeases::new(hold),
            hold,
            keeper: None,
            planned: 0,
            all_seen_streak: 0,
            refused: false,
            pending: BTreeMap::new(),
            sends: JoinSet::new(),
            send_slots: Arc::new(Semaphore::new(plan.concurrency.max(1))),
            send_room: Arc::new(Semaphore::new((SEND_MEMORY_BUDGET >> 10) as usize)),
            keys_in_flight: HashMap::new(),
            failed_keys: HashSet::new(),
            capped_keys: HashSet::new(),
            leases: VecDeque::new(),
            body_bytes: 0,
        }
    }

    /// Start extending what the pass holds, until [`Pass::finish`].
    fn keep_held(&mut self) {
        self.keeper = Some(Keeper::start(
            &self.held,
            self.engine.backend.clone(),
            self.hold,
            self.caps.max_release_size,
            self.plan.concurrency,
        ));
    }

    /// Messages this pass has removed from the DLQ so far.
    fn settled(&self) -> u64 {
        self.s.settled
    }

    fn max_reached(&self) -> bool {
        self.plan.max.is_some_and(|m| self.planned >= m)
    }

    /// How many leases may be in flight now, and how many messages each
    /// asks for: see [`lease_plan`].
    fn lease_plan(&self) -> (usize, usize) {
        if let Some(size) = self.rated_lease {
            let slots = self.caps.max_concurrent_leases.min(self.plan.concurrency);
            return (slots.clamp(1, RATED_LEASE_SLOTS), size);
        }
        let average = self.body_bytes.checked_div(self.s.examined);
        lease_plan(&self.caps, self.plan.concurrency, average)
    }

    fn start_lease(&mut self, generation: u32, max: usize) {
        tracing::debug!(max, in_flight = self.leases.len(), "lease started");
        // The lease takes its turn here, in the order leases are started
        // and examined, whenever its task first runs.
        let lease = self.engine.backend.clone().lease_in_turn(max, self.plan.hold);
        self.leases.push_back(InFlightLease {
            generation,
            settled_before: self.settled(),
            task: tokio::spawn(lease),
        });
    }

    /// Lease, examine and send until the DLQ is drained, everything left has
    /// been seen, or a limit, a failure or a shutdown stops the pass.
    async fn drive(&mut self, started: Instant) -> Result<(), RedriveError> {
        let cancel = self.engine.cancel.clone();
        let mut leasing = true;
        // On a queue with ordered delivery, an empty lease while messages are
        // outstanding may only mean their groups are locked (SQS FIFO, Pub/Sub
        // ordering keys): leasing pauses until they settle, then looks again.
        let mut paused = false;
        let mut generation = 0;
        let mut lease_failures = 0;
        loop {
            if cancel.is_cancelled() {
                self.s.stopped = StopReason::Cancelled;
                break;
            }
            if self.refused {
                break;
            }
            if started.elapsed() >= self.plan.deadline {
                self.s.stopped = StopReason::Deadline;
                break;
            }
            if self.max_reached() {
                // Sends still out may fail and give room back (a failed
                // group's later matches leave `pending` and the count):
                // the cap is judged once they are in.
                if !self.sends.is_empty() || !self.pending.is_empty() {
                    if !self.dispatch(true).await {
                        self.s.stopped = StopReason::Cancelled;
                        break;
                    }
                    while let Some(done) = self.sends.join_next().await {
                        self.merge_send(done.expect("send tasks do not panic"));
                    }
                    // Still reached: the cap is what stopped the pass, not a
                    // deadline or a shutdown that came while it waited.
                    if !self.max_reached() {
                        continue;
                    }
                }
                self.s.stopped = StopReason::MaxReached;
                break;
            }
            let (slots, size) = self.lease_plan();
            while leasing && !paused && self.leases.len() < slots {
                self.start_lease(generation, size);
            }
            let Some(front) = self.leases.front_mut() else {
                if !paused {
                    // Nothing in flight and no more leasing: `stopped` says why.
                    break;
                }
                // Settle everything outstanding, then look again.
                if !self.dispatch(true).await {
                    self.s.stopped = StopReason::Cancelled;
                    break;
                }
                while let Some(done) = self.sends.join_next().await {
                    self.merge_send(done.expect("send tasks do not panic"));
                }
                paused = false;
                continue;
            };
            let joined = tokio::select! {
                r = &mut front.task => r,
                _ = cancel.cancelled() => { self.s.stopped = StopReason::Cancelled; break; }
            };
            let lease = self.leases.pop_front().expect("front");
            if let Ok(Ok(l)) = &joined {
                tracing::debug!(leased = l.len(), in_flight = self.leases.len(), "lease returned");
            }
            let leased = match joined.expect("lease tasks do not panic") {
                Ok(l) => {
                    lease_failures = 0;
                    l
                }
                // Leases started before the last retry failed for the same
                // reason; only a fresh attempt counts.
                Err(_) if lease.generation < generation => continue,
                // The provider leases no more while the pass holds what it
                // has: the pass ends as at `max_held`.
                Err(BackendError::HoldLimit { detail, .. }) => {
                    if leasing {
                        leasing = false;
                        self.s.stopped = StopReason::HeldLimit;
                        tracing::info!(held = self.held.len(), %detail, "the provider leases no more while the pass holds what it has");
                    }
                    continue;
                }
                Err(e) => {
                    lease_failures += 1;
                    if is_permanent(&e) {
                        self.s.stopped = StopReason::Failed;
                        self.s.errors.push(format!("lease failed: {e}"));
                        break;
                    }
                    if lease_failures > LEASE_RETRIES {
                        self.s.stopped = StopReason::Failed;
                        self.s
                            .errors
                            .push(format!("lease failed {lease_failures} times in a row: {e}"));
                        break;
                    }
                    tracing::warn!(error = %e, attempt = lease_failures, "lease failed; retrying");
                    generation += 1;
                    let backoff = tokio::time::sleep(Duration::from_millis(250 << lease_failures));
                    tokio::select! {
                        _ = backoff => {}
                        _ = cancel.cancelled() => { self.s.stopped = StopReason::Cancelled; break; }
                    }
                    continue;
                }
            };
            if leased.is_empty() {
                // Nothing was visible: what the leases still in flight bring
                // is examined, but no new lease starts. With ordered
                // delivery, messages settled since the lease went out may
                // have unlocked their groups after the provider answered it.
                let outstanding = !(self.leases.is_empty() && self.sends.is_empty() && self.pending.is_empty())
                    || self.settled() != lease.settled_before;
                if self.caps.ordered_delivery && outstanding {
                    paused = true;
                } else if leasing {
                    leasing = false;
                    self.s.stopped = StopReason::Drained;
                }
            } else if self.examine(leased).await == 0 {
                self.all_seen_streak += 1;
                if self.all_seen_streak >= ALL_SEEN_LIMIT && leasing {
                    leasing = false;
                    self.s.stopped = StopReason::AllSeen;
                }
            } else {
                self.all_seen_streak = 0;
            }
            if leasing && self.held.len() >= self.plan.max_held {
                leasing = false;
                self.s.stopped = StopReason::HeldLimit;
            }
            let more_waiting = self.leases.front().is_some_and(|l| l.task.is_finished());
            // Finished sends count as busy until joined.
            while let Some(done) = self.sends.try_join_next() {
                self.merge_send(done.expect("send tasks do not panic"));
            }
            let partial = partial_batches_may_go(leasing, more_waiting, self.sends_in_flight());
            // Matches of one ordering key wait for its one batch in flight:
            // when they pile up faster than it drains, leasing waits for them.
            let partial = partial || self.pending_over_budget();
            if !self.dispatch(partial).await {
                self.s.stopped = StopReason::Cancelled;
                break;
            }
        }
        Ok(())
    }

    /// Whether the matches waiting to be sent exceed what the sends in flight
    /// may hold (a round of full batches, or their bodies' budget). Only
    /// matches waiting for their ordering key's batch in flight can: the rest
    /// go as soon as a send slot is free.
    fn pending_over_budget(&self) -> bool {
        // With a rate, one lease's worth: matches of one busy group waited
        // here while leasing went on, each lease adding to a backlog that
        // the rate sends only seconds later, past the leases' hold (Service
        // Bus locks lapsed and their completes were lost).
        if let Some(size) = self.rated_lease {
            return self.pending.values().map(Vec::len).sum::<usize>() >= size;
        }
        let most = self.caps.batch_size.max(1) * self.plan.concurrency.max(1);
        let (mut n, mut bytes) = (0, 0);
        for l in self.pending.values().flatten() {
            n += 1;
            bytes += l.message.body.len() as u64;
            if n > most || bytes > SEND_MEMORY_BUDGET {
                return true;
            }
        }
        false
    }

    /// Examine a leased batch: skip what this run has seen, settle what an
    /// interrupted run already sent, filter the rest and queue the matches.
    /// Returns how many messages were fresh.
    async fn examine(&mut self, leased: Vec<Leased>) -> usize {
        let plan = self.plan;
        let engine = self.engine;
        let mut fresh = 0;
        let mut journal_settle: Vec<Leased> = Vec::new();
        for l in leased {
            if !self.seen.insert(&l.message.id) {
                self.held.push(l.lease);
                continue;
            }
            fresh += 1;
            self.s.examined += 1;
            self.body_bytes += l.message.body.len() as u64;
            Progress::add(&engine.progress.examined, 1);
            if !plan.dry_run
                && engine
                    .journal
                    .as_ref()
                    .is_some_and(|j| j.already_sent(&plan.queue, &l.message.id, l.message.enqueued_at))
            {
                journal_settle.push(l);
                continue;
            }
            let s = &mut self.s;
            match plan.filter.matches(&l.message, Utc::now()) {
                Err(e) => {
                    s.filter_errors += 1;
                    push_error(&mut s.errors, format!("filter on message {}: {e}", l.message.id));
                    self.held.push(l.lease);
                }
                Ok(false) => self.held.push(l.lease),
                Ok(true) if plan.max.is_some_and(|m| self.planned >= m) => {
                    self.capped_keys.extend(l.message.ordering_key.clone());
                    self.held.push(l.lease);
                }
                Ok(true) if self.discard_to.is_none() && redrive_count(&l.message) >= plan.max_redrives => {
                    s.skipped_max_redrives += 1;
                    self.held.push(l.lease);
                }
                Ok(true) => {
                    // A message that names a source it has none for goes
                    // nowhere rather than to some other entity.
                    let unresolved = engine.backend.unresolved_source(&l.message);
                    let dest = self
                        .discard_to
                        .clone()
                        .or_else(|| plan.to.clone())
                        .or_else(|| l.message.source.clone().map(Destination))
                        .or_else(|| plan.fallback_source.clone().filter(|_| unresolved.is_none()));
                    s.matched += 1;
                    Progress::add(&engine.progress.matched, 1);
                    if s.samples.len() < SAMPLE_SIZE {
                        s.samples.push(Sample {
                            id: l.message.id.clone(),
                            reason: l.message.reason.clone(),
                            destination: dest.as_ref().map(|d| d.0.clone()),
                        });
                    }
                    let Some(dest) = dest else {
                        s.send_failed += 1;
                        Progress::add(&engine.progress.failed, 1);
                        let why = unresolved.unwrap_or_else(|| "the provider names no source".into());
                        push_error(
                            &mut s.errors,
                            format!(
                                "message {}: no destination ({why}; set `source` in the config or pass --to)",
                                l.message.id
                            ),
                        );
                        // As after a failed send: the key's later messages
                        // stay in the DLQ, so that none goes ahead of it.
                        self.failed_keys.extend(l.message.ordering_key.clone());
                        self.held.push(l.lease);
                        continue;
                    };
                    if l.message
                        .ordering_key
                        .as_ref()
                        .is_some_and(|k| self.failed_keys.contains(k) || self.capped_keys.contains(k))
                    {
                        s.held_for_order += 1;
                        self.held.push(l.lease);
                        continue;
                    }
                    self.planned += 1;
                    *s.destinations.entry(dest.0.clone()).or_default() += 1;
                    if plan.dry_run {
                        self.held.push(l.lease);
                    } else {
                        self.pending.entry(dest).or_default().push(l);
                    }
                }
            }
        }
        if !journal_settle.is_empty() {
            let n = journal_settle.len() as u64;
            let out = engine.settle_batch(&RunRef::of(plan), journal_settle, false).await;
            self.s.settled_from_journal += n - out.settle_failed;
            merge(&mut self.s, out, &self.held);
        }
        fresh
    }

    /// Hand pending matches to send tasks: full batches always, partial ones
    /// when `partial`. A batch takes only messages whose ordering key has no
    /// batch in flight, so one busy group never holds up the others; with
    /// `partial`, it waits for sends until nothing is left pending. Returns
    /// false when a shutdown came while waiting for rate tokens (what was not
    /// handed over stays pending).
    async fn dispatch(&mut self, partial: bool) -> bool {
        // With a rate, a lease's matches make a full batch: sending them
        // waits for their tokens, which holds the next lease back until they
        // are due. With the provider's batch instead, matches of small
        // leases waited in `pending` while leasing went on, longer than the
        // hold the lease size was chosen for (Service Bus's locks lapsed).
        let full = self
            .rated_lease
            .map_or(self.caps.batch_size, |size| size.min(self.caps.batch_size))
            .max(1);
        loop {
            let mut progressed = false;
            let dests: Vec<Destination> = self.pending.keys().cloned().collect();
            for dest in dests {
                while let Some(queue) = self.pending.get_mut(&dest) {
                    // A destination that refused a send refuses the rest:
                    // what is pending stays in the DLQ (see `finish`).
                    if self.refused {
                        return true;
                    }
                    let Some(batch) = take_sendable(queue, &self.keys_in_flight, full, partial) else {
                        break;
                    };
                    if queue.is_empty() {
                        self.pending.remove(&dest);
                    }
                    progressed = true;
                    if !self.send(dest.clone(), batch).await {
                        return false;
                    }
                }
            }
            if self.pending.is_empty() || !partial {
                return true;
            }
            if !progressed {
                // Everything left waits for its group's batch in flight.
                let Some(done) = self.sends.join_next().await else {
                    unreachable!("pending messages wait only for keys of batches in flight")
                };
                self.merge_send(done.expect("send tasks do not panic"));
            }
        }
    }

    /// Start one send task for a single-destination batch, once the rate,
    /// a concurrency slot and earlier batches of its ordering keys allow.
    async fn send(&mut self, dest: Destination, mut batch: Vec<Leased>) -> bool {
        let engine = self.engine;
        let plan = self.plan;
        if let Some(lim) = &self.limiter {
            let tokens = async {
                for _ in 0..batch.len() {
                    lim.until_ready().await;
                }
            };
            let cancelled = tokio::select! {
                _ = tokens => false,
                _ = engine.cancel.cancelled() => true,
            };
            if cancelled {
                // Not sent: back to pending, which the shutdown releases.
                let queue = self.pending.entry(dest).or_default();
                queue.splice(0..0, batch);
                return false;
            }
        }
        let keys: Vec<String> = batch
            .iter()
            .filter_map(|l| l.message.ordering_key.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        // Guarantee 7: `take_sendable` took only keys with no batch in
        // flight, and a key's batches go out in lease order.
        let bytes: u64 = batch.iter().map(|l| l.message.body.len() as u64).sum();
        let slot = self.send_slot(bytes).await;
        if self.refused {
            // Waiting for the slot merged a batch the destination refused:
            // this one stays in the DLQ with the rest (see `finish`).
            drop(slot);
            self.pending.entry(dest).or_default().splice(0..0, batch);
            return true;
        }
        for k in &keys {
            *self.keys_in_flight.entry(k.clone()).or_default() += 1;
        }
        let mut resends = Vec::with_capacity(batch.len());
        let outgoing: Vec<Outgoing> = batch
            .iter_mut()
            .filter(|_| self.discard_to.is_none())
            .map(|l| {
                let (mut o, marked) = outgoing_copy_taking(&mut l.message, plan, &*engine.backend, &dest);
                // A copy an interrupted run may already have sent keeps
                // that run's mark, so consumers can dedupe; so does one whose
                // send failed, which may have arrived all the same (its
                // answer lost), but it is no resend after a crash.
                let prior = engine
                    .journal
                    .as_ref()
                    .and_then(|j| j.prior_redrive_id(&plan.queue, &l.message.id));
                if let Some((prior, _)) = &prior
                    && marked
                {
                    o.attributes.insert(MARK_ID.into(), Attribute::string(prior.clone()));
                }
                resends.push(prior.is_some_and(|(_, failed)| !failed));
                o
            })
            .collect();
        tracing::debug!(
            messages = batch.len(),
            sending = self.sends_in_flight(),
            settling = self.sends.len() + 1 - self.sends_in_flight(),
            "send started"
        );
        let task = engine.clone_for_task();
        let run = RunRef::of(plan);
        let action = plan.action.clone();
        self.sends.spawn(async move {
            let mut out = match action {
                Action::Redrive => task.send_batch(&run, &dest, batch, outgoing, resends, slot).await,
                Action::Discard { backup } => task.discard_batch(&run, batch, backup, slot).await,
            };
            out.keys = keys;
            out
        });
        true
    }

    /// A send slot and room for `bytes` of bodies, once both are free and
    /// the settling tasks are within their bound; finished tasks are merged
    /// while waiting.
    async fn send_slot(&mut self, bytes: u64) -> SendPermit {
        let tasks = self.plan.concurrency.max(1) * (1 + SETTLES_PER_SEND_SLOT);
        let budget = (SEND_MEMORY_BUDGET >> 10) as u32;
        let kib = (bytes.div_ceil(1024) as u32).clamp(1, budget);
        let mut slot = None;
        loop {
            let done = if slot.is_none() && self.sends.len() < tasks {
                let slots = self.send_slots.clone();
                tokio::select! {
                    biased;
                    s = slots.acquire_owned() => {
                        slot = Some(s.expect("the send slots are never closed"));
                        continue;
                    }
                    Some(done) = self.sends.join_next() => Some(done),
                }
            } else if let Some(s) = slot.take() {
                let room = self.send_room.clone();
                tokio::select! {
                    biased;
                    r = room.acquire_many_owned(kib) => {
                        return SendPermit { _slot: s, _room: r.expect("the send room is never closed") };
                    }
                    Some(done) = self.sends.join_next() => {
                        slot = Some(s);
                        Some(done)
                    }
                }
            } else {
                self.sends.join_next().await
            };
            let Some(done) = done else {
                unreachable!("every slot and all room taken is held by a send task")
            };
            self.merge_send(done.expect("send tasks do not panic"));
        }
    }

    /// Send tasks still sending (holding a slot), not yet settling.
    fn sends_in_flight(&self) -> usize {
        self.plan.concurrency.max(1) - self.send_slots.available_permits()
    }

    fn merge_send(&mut self, out: BatchOutcome) {
        tracing::debug!(settled = out.settled, "send batch done");
        if out.refused {
            self.refused = true;
            self.s.stopped = StopReason::Failed;
        }
        release_keys(&mut self.keys_in_flight, &out.keys);
        for key in &out.failed_keys {
            // Even for a key that failed before: a later message of it may
            // have found no destination while this batch was out, and the
            // messages between them still wait in `pending`.
            let first = self.failed_keys.insert(key.clone());
            self.hold_back(key, first);
        }
        merge(&mut self.s, out, &self.held);
    }

    /// A message of `key` failed to send: its later messages that wait to be
    /// sent stay in the DLQ instead, so that none arrives before it.
    fn hold_back(&mut self, key: &str, first: bool) {
        let taken = take_key(&mut self.pending, key);
        if taken.is_empty() && !first {
            return;
        }
        let n = taken.len() as u64;
        let mut leases = Vec::with_capacity(taken.len());
        for (dest, l) in taken {
            if let Some(planned) = self.s.destinations.get_mut(&dest.0) {
                *planned -= 1;
            }
            leases.push(l.lease);
        }
        // Waiting for their send since their lease returned.
        self.held.extend_overdue(leases);
        // Not sent: they do not count against `--max`.
        self.planned -= n;
        self.s.held_for_order += n;
        push_error(
            &mut self.s.errors,
            format!(
                "ordering group {key}: a message failed to send, so its later messages stay in the DLQ to keep their order"
            ),
        );
    }

    /// End the pass: send what is pending (unless shut down), take back what
    /// leases still in flight bring, and release everything held, together
    /// (guarantee 4). Nothing is leased any more by then, so the release
    /// goes out while the last sends finish instead of after them: through a
    /// cloud's round trip that hides it, and it cannot hand a released
    /// message back to this pass.
    async fn finish(mut self) -> RunSummary {
        if self.s.stopped != StopReason::Cancelled && !self.refused && !self.dispatch(true).await {
            self.s.stopped = StopReason::Cancelled;
        }
        // Matches never handed to a send task stay in the DLQ.
        for (dest, batch) in std::mem::take(&mut self.pending) {
            if let Some(n) = self.s.destinations.get_mut(&dest.0) {
                *n -= batch.len() as u64;
            }
            self.planned -= batch.len() as u64;
            self.held.extend(batch.into_iter().map(|l| l.lease));
        }
        self.s.destinations.retain(|_, n| *n > 0);
        // Leases still in flight answer within their provider's wait; what
        // they bring was never examined and goes straight back.
        for lease in std::mem::take(&mut self.leases) {
            if let Ok(Ok(leased)) = lease.task.await {
                self.held.extend(leased.into_iter().map(|l| l.lease));
            }
        }
        if let Some(keeper) = self.keeper.take() {
            keeper.stop().await;
        }
        let mut releases = Releases::new(&self);
        tracing::debug!(held = self.held.len(), "releasing what the pass held");
        releases.start(self.held.take_runs()).await;
        while let Some(done) = self.sends.join_next().await {
            self.merge_send(done.expect("send tasks do not panic"));
        }
        // Copies that were not sent (their originals are held again).
        releases.start(self.held.take_runs()).await;
        let (released, failed) = releases.finish().await;
        self.s.released = released;
        if let Some((_, e)) = failed.first() {
            let n: usize = failed.iter().map(|(n, _)| n).sum();
            push_error(
                &mut self.s.errors,
                format!(
                    "releasing {n} of {released} held messages failed ({e}); they become visible again when their lease expires"
                ),
            );
        }
        self.s
    }
}

/// A chunk's release: on failure, how many leases it held and why.
type ChunkReleased = Result<(), (usize, BackendError)>;

/// The end of a pass's release: held leases in chunks the provider takes at
/// once, `concurrency` chunks out at a time.
struct Releases {
    backend: Arc<dyn QueueBackend>,
    chunk: usize,
    parallel: usize,
    tasks: JoinSet<ChunkReleased>,
    started: u64,
    failed: Vec<(usize, BackendError)>,
}

impl Releases {
    fn new(pass: &Pass<'_>) -> Self {
        Self {
            backend: pass.engine.backend.clone(),
            chunk: pass.caps.max_release_size.max(1),
            parallel: pass.plan.concurrency.max(1),
            tasks: JoinSet::new(),
            started: 0,
            failed: Vec::new(),
        }
    }

    async fn start(&mut self, runs: Vec<Vec<LeaseId>>) {
        self.started += runs.iter().map(Vec::len).sum::<usize>() as u64;
        let chunk = self.chunk;
        for c in runs.iter().flat_map(|run| run.chunks(chunk)) {
            if self.tasks.len() >= self.parallel {
                let done = self.tasks.join_next().await;
                self.record(done);
            }
            let (backend, c) = (self.backend.clone(), c.to_vec());
            self.tasks
                .spawn(async move { backend.release(&c).await.map_err(|e| (c.len(), e)) });
        }
    }

    fn record(&mut self, done: Option<Result<ChunkReleased, tokio::task::JoinError>>) {
        if let Some(Err(f)) = done.map(|j| j.expect("release tasks do not panic")) {
            self.failed.push(f);
        }
    }

    /// How many were released, and the chunks that failed.
    async fn finish(mut self) -> (u64, Vec<(usize, BackendError)>) {
        while let Some(done) = self.tasks.join_next().await {
            self.record(Some(done));
        }
        tracing::debug!(
            released = self.started,
            failed_chunks = self.failed.len(),
            "release done"
        );
        (self.started, self.failed)
    }
}

/// Refused credentials, rights or certificates, a missing queue, a request
/// the provider calls invalid or refuses do not heal by waiting.
pub(crate) fn is_permanent(e: &BackendError) -> bool {
    matches!(
        e,
        BackendError::Auth { .. }
            | BackendError::Tls { .. }
            | BackendError::NotFound { .. }
            | BackendError::Invalid(_)
            | BackendError::Refused { .. }
    )
}

fn merge(s: &mut RunSummary, out: BatchOutcome, held: &HeldLeases) {
    s.sent += out.sent;
    s.settled += out.settled;
    s.send_failed += out.send_failed;
    s.settle_failed += out.settle_failed;
    s.marks_omitted += out.marks_omitted;
    s.resent_after_crash += out.resent_after_crash;
    // Leased before their send went out (and its retries), maybe long ago.
    held.extend_overdue(out.unsent);
    for e in out.errors {
        push_error(&mut s.errors, e);
    }
}

/// The limiter of a `--rate` of `per_second` messages, sent in batches of
/// up to `batch`. governor's bucket starts full, and held a second's worth:
/// a run sent about twice the rate in its first second. It now starts
/// empty and holds at most a batch (fewer when the rate is lower), so the
/// time a run spends sending or leasing between batches still counts
/// towards the next one, but no second's worth goes at once.
pub(crate) fn message_rate(per_second: NonZeroU32, batch: usize) -> DefaultDirectRateLimiter {
    let burst =
        NonZeroU32::new(u32::try_from(batch).unwrap_or(u32::MAX).min(per_second.get())).unwrap_or(NonZeroU32::MIN);
    let limiter = RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst));
    let _ = limiter.check_n(burst);
    limiter
}

/// How many messages to lease at once. A leased batch waits for its rate
/// tokens before it is sent, so a batch larger than the rate allows within
/// the hold would outlive its lease while it waits: the provider hands it to
/// the next consumer, and every pass of a slow-rate run released what it
/// leased without ever draining the DLQ. Half the hold is for the wait, the
/// other half for the send and the settle.
fn lease_size(batch_size: usize, rate: Option<NonZeroU32>, hold: Duration) -> usize {
    let Some(rate) = rate else { return batch_size };
    let within_hold = (f64::from(rate.get()) * hold.as_secs_f64() / 2.0).floor() as usize;
    batch_size.min(within_hold).max(1)
}

/// A partial batch goes when nothing would fill it soon and waiting would
/// delay it: no lease result is waiting to be examined, and either no send is
/// in flight (the destination would sit idle) or leasing has stopped (no full
/// batch can come any more; waiting would only add a round trip to the end of
/// the pass). While sends are in flight, the next lease's matches fill the
/// batch first: a provider call carries twice the messages where a lease
/// matches half (SQS's batches of 10), which halves the send and settle calls
/// (an SQS FIFO queue's quota counts calls), costs a lease's interval of
/// latency, and keeps send slots for full batches. What is pending goes when
/// the pass ends.
fn partial_batches_may_go(leasing: bool, lease_result_waiting: bool, sends_in_flight: usize) -> bool {
    !lease_result_waiting && (!leasing || sends_in_flight == 0)
}

/// The next batch to send from one destination's pending matches, in lease
/// order: up to `full` messages, skipping every message whose ordering key
/// has a batch in flight (guarantee 7: a key's copies go out one batch after
/// another, in order, while other keys go ahead). `None` when nothing can go,
/// or when fewer than `full` can and `partial` is false.
fn take_sendable(
    queue: &mut Vec<Leased>,
    busy: &HashMap<String, usize>,
    full: usize,
    partial: bool,
) -> Option<Vec<Leased>> {
    let free = |l: &Leased| l.message.ordering_key.as_ref().is_none_or(|k| !busy.contains_key(k));
    let ready = queue.iter().filter(|l| free(l)).take(full).count();
    if ready == 0 || (ready < full && !partial) {
        return None;
    }
    let mut batch = Vec::with_capacity(ready);
    let mut rest = Vec::with_capacity(queue.len() - ready);
    for l in queue.drain(..) {
        if batch.len() < ready && free(&l) {
            batch.push(l);
        } else {
            rest.push(l);
        }
    }
    *queue = rest;
    Some(batch)
}

/// Take every pending message of ordering key `key` out of `pending`, with
/// its destination; the others keep their order.
fn take_key(pending: &mut BTreeMap<Destination, Vec<Leased>>, key: &str) -> Vec<(Destination, Leased)> {
    let mut taken = Vec::new();
    for (dest, queue) in pending.iter_mut() {
        let (of_key, rest): (Vec<Leased>, Vec<Leased>) = std::mem::take(queue)
            .into_iter()
            .partition(|l| l.message.ordering_key.as_deref() == Some(key));
        *queue = rest;
        taken.extend(of_key.into_iter().map(|l| (dest.clone(), l)));
    }
    pending.retain(|_, q| !q.is_empty());
    taken
}

/// Leases in flight and messages per lease, within [`LEASE_MEMORY_BUDGET`]
/// for the bodies they may hold, estimated from `average` (body bytes per
/// message examined so far, counted as at least 1 KiB; `None` before the
/// first, when bodies of [`ASSUMED_BODY`] are assumed). Leases start at the
/// provider's batch size and grow to its largest lease while bodies are
/// small: fewer, larger leases mean fewer round trips per message. Large bodies shrink the leases to the batch size, then the
/// number in flight, to one.
fn lease_plan(caps: &Capabilities, concurrency: usize, average: Option<u64>) -> (usize, usize) {
    let slots = caps.max_concurrent_leases.min(concurrency).max(1);
    let smallest = caps.batch_size.min(caps.max_lease_size).max(1);
    let Some(average) = average else {
        let by_memory = (LEASE_MEMORY_BUDGET / (smallest as u64 * ASSUMED_BODY)) as usize;
        return (slots.min(by_memory).max(1), smallest);
    };
    let per_message = average.max(1024);
    let size = (LEASE_MEMORY_BUDGET / slots as u64 / per_message) as usize;
    let size = size.clamp(smallest, caps.max_lease_size.max(smallest));
    let by_memory = (LEASE_MEMORY_BUDGET / (size as u64 * per_message)) as usize;
    (slots.min(by_memory).max(1), size)
}

/// The message IDs a pass has examined, as 128-bit digests: a pass over a
/// million messages keeps 16 bytes per ID instead of the ID (Service Bus and
/// SQS IDs are 36 characters, Pub/Sub's up to 20; with the string's own
/// header and the allocator's rounding about 80 bytes). Two IDs sharing a
/// digest (about 1 in 10^26 for a million IDs) would make the second look
/// seen: held and released, never lost. The digests are two foldhash
/// hashes with seeds of their own (SipHash, twice per message and once more
/// for the set, was a few per cent of a pass's CPU time).
#[derive(Default)]
struct SeenSet {
    keys: (foldhash::quality::RandomState, foldhash::quality::RandomState),
    digests: HashSet<u128, foldhash::fast::RandomState>,
}

impl SeenSet {
    /// Whether `id` is new to the pass (and now recorded).
    fn insert(&mut self, id: &str) -> bool {
        use std::hash::BuildHasher;
        let digest = (u128::from(self.keys.0.hash_one(id)) << 64) | u128::from(self.keys.1.hash_one(id));
        self.digests.insert(digest)
    }
}

fn release_keys(in_flight: &mut HashMap<String, usize>, keys: &[String]) {
    for k in keys {
        if let Some(n) = in_flight.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(k);
            }
        }
    }
}

fn push_error(errors: &mut Vec<String>, e: String) {
    if errors.len() < MAX_REPORTED_ERRORS {
        errors.push(e);
    } else if errors.len() == MAX_REPORTED_ERRORS {
        errors.push("(further errors omitted)".into());
    }
}

/// How many times this message has already been redriven, from its marks.
pub fn redrive_count(m: &DlqMessage) -> u32 {
    marked_count(&m.attributes)
}

fn marked_count(attributes: &Attributes) -> u32 {
    attributes
        .get(MARK_COUNT)
        .and_then(|a| a.as_text().trim().parse().ok())
        .unwrap_or(0)
}

/// The copy of `m` to send: provider dead-letter attributes stripped (when
/// configured), redrive marks added. Returns whether the marks fit: within
/// the provider's attribute cap, and not taking a copy that fits its size
/// limit over it (SQS counts attributes in the queue's size limit: a message
/// near it would otherwise fail on every run).
pub fn outgoing_copy(
    m: &DlqMessage,
    plan: &RedrivePlan,
    backend: &dyn QueueBackend,
    to: &Destination,
) -> (Outgoing, bool) {
    let parts = (m.body.clone(), m.attributes.clone(), m.properties.clone());
    copy_from(parts, m, plan, backend, to)
}

/// [`outgoing_copy`] that moves the body, attributes and properties out of
/// `m`, which keeps what a send's outcome needs (its ID, ordering key and
/// enqueue time): a leased message being sent is not copied a second time.
fn outgoing_copy_taking(
    m: &mut DlqMessage,
    plan: &RedrivePlan,
    backend: &dyn QueueBackend,
    to: &Destination,
) -> (Outgoing, bool) {
    let parts = (
        std::mem::take(&mut m.body),
        std::mem::take(&mut m.attributes),
        std::mem::take(&mut m.properties),
    );
    copy_from(parts, m, plan, backend, to)
}

/// The copy of `m` made of `parts` (its body, attributes and properties).
fn copy_from(
    (body, mut attributes, properties): (Bytes, Attributes, Properties),
    m: &DlqMessage,
    plan: &RedrivePlan,
    backend: &dyn QueueBackend,
    to: &Destination,
) -> (Outgoing, bool) {
    if plan.strip_dead_letter_attributes {
        attributes.retain(|k, _| !backend.is_dead_letter_attribute(k));
    }
    let count = marked_count(&attributes).saturating_add(1);
    attributes.remove(MARK_ID);
    attributes.remove(MARK_COUNT);
    let mut room = backend
        .capabilities()
        .max_attributes
        .is_none_or(|cap| attributes.len() + 2 <= cap);
    let mut copy = Outgoing {
        body,
        attributes,
        properties,
        ordering_key: m.ordering_key.clone(),
        dedup_id: format!("{}-{count}", m.id),
        original_id: m.id.clone(),
    };
    if room {
        copy.attributes.insert(
            MARK_ID.to_string(),
            Attribute::string(format!("{}:{}", plan.run_id, m.id)),
        );
        copy.attributes.insert(
            MARK_COUNT.to_string(),
            Attribute {
                value: AttrValue::Number(count.to_string()),
                data_type: None,
            },
        );
        // Asked once for nearly every copy (it is on the hot path, and a
        // backend sizes the copy as it would send it); only a copy the marks
        // may have taken over the limit is asked about again without them.
        if !backend.fits(to, &copy) {
            let marks = [MARK_ID, MARK_COUNT].map(|k| copy.attributes.remove_entry(k));
            if backend.fits(to, &copy) {
                room = false;
            } else {
                // Over the limit anyway: its send fails on its own, marked as usual.
                copy.attributes.extend(marks.into_iter().flatten());
            }
        }
    }
    (copy, room)
}

/// A run ID: sortable by start time, unique across replicas.
pub fn new_run_id() -> String {
    format!(
        "{}-{}",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(id: &str, key: Option<&str>) -> Leased {
        Leased {
            message: DlqMessage {
                id: id.into(),
                body: Default::default(),
                attributes: Default::default(),
                properties: Default::default(),
                reason: None,
                description: None,
                delivery_count: None,
                enqueued_at: None,
                source: None,
                ordering_key: key.map(Into::into),
            },
            lease: LeaseId(id.into()),
        }
    }

    fn ids(batch: &[Leased]) -> Vec<&str> {
        batch.iter().map(|l| l.message.id.as_str()).collect()
    }

    #[test]
    fn the_seen_set_knows_each_id_once() {
        let mut seen = SeenSet::default();
        let ids: Vec<String> = (0..10_000).map(|i| format!("{i:08x}-message")).collect();
        assert!(ids.iter().all(|id| seen.insert(id)), "every new ID is new");
        assert!(ids.iter().all(|id| !seen.insert(id)), "every ID seen before is seen");
        assert!(seen.insert("0"), "a prefix of a seen ID is new");
        assert!(seen.insert(""), "the empty ID is new once");
        assert!(!seen.insert(""));
    }

    #[test]
    fn a_group_with_a_batch_in_flight_waits_while_other_groups_go_ahead_in_order() {
        let mut queue = vec![
            leased("a1", Some("a")),
            leased("b1", Some("b")),
            leased("a2", Some("a")),
            leased("c1", Some("c")),
            leased("b2", Some("b")),
            leased("n1", None),
        ];
        let busy = HashMap::from([("a".to_string(), 1)]);
        let batch = take_sendable(&mut queue, &busy, 10, true).expect("b, c and n can go");
        assert_eq!(ids(&batch), ["b1", "c1", "b2", "n1"]);
        assert_eq!(ids(&queue), ["a1", "a2"], "group a keeps its order, waiting");
        assert!(take_sendable(&mut queue, &busy, 10, true).is_none());
        // Once a's batch is done, a goes in order.
        let batch = take_sendable(&mut queue, &HashMap::new(), 10, true).expect("a is free");
        assert_eq!(ids(&batch), ["a1", "a2"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_failed_group_leaves_pending_and_the_other_groups_keep_their_order() {
        let a = Destination("a".into());
        let b = Destination("b".into());
        let mut pending = BTreeMap::from([
            (
                a.clone(),
                vec![
                    leased("1", Some("g1")),
                    leased("2", Some("g2")),
                    leased("3", Some("g1")),
                ],
            ),
            (b.clone(), vec![leased("4", Some("g1"))]),
        ]);
        let taken = take_key(&mut pending, "g1");
        let taken: Vec<(&str, &str)> = taken
            .iter()
            .map(|(d, l)| (d.0.as_str(), l.message.id.as_str()))
            .collect();
        assert_eq!(taken, [("a", "1"), ("a", "3"), ("b", "4")]);
        assert_eq!(ids(&pending[&a]), ["2"]);
        assert!(!pending.contains_key(&b), "a destination left with nothing is gone");
    }

    fn caps(batch_size: usize, max_lease_size: usize, max_concurrent_leases: usize) -> Capabilities {
        Capabilities {
            true_peek: false,
            binary_body: true,
            empty_body: true,
            max_body_bytes: 10 << 20,
            typed_attributes: false,
            max_attributes: None,
            batch_size,
            max_lease_size,
            max_concurrent_leases,
            max_release_size: max_lease_size,
            ordered_delivery: false,
            fixed_hold: None,
            max_hold: None,
        }
    }

    #[test]
    fn leases_grow_while_bodies_are_small_and_shrink_to_one_when_they_are_large() {
        let pubsub = caps(100, 1000, 8);
        assert_eq!(
            lease_plan(&pubsub, 8, None),
            (5, 100),
            "first leases: the batch size, as many as 32 MiB of 64 KiB bodies allow"
        );
        assert_eq!(lease_plan(&caps(10, 10, 8), 8, None), (8, 10));
        assert_eq!(
            lease_plan(&pubsub, 8, Some(200)),
            (8, 1000),
            "1 KiB or less: the largest lease"
        );
        assert_eq!(
            lease_plan(&pubsub, 2, Some(200)),
            (2, 1000),
            "never more than concurrency"
        );
        assert_eq!(
            lease_plan(&pubsub, 8, Some(16 << 10)),
            (8, 256),
            "32 MiB over 8 leases of 16 KiB bodies"
        );
        assert_eq!(
            lease_plan(&pubsub, 8, Some(1 << 20)),
            (1, 100),
            "1 MiB bodies: one lease of a batch"
        );
        let sqs = caps(10, 10, 8);
        assert_eq!(lease_plan(&sqs, 8, Some(200)), (8, 10));
        assert_eq!(
            lease_plan(&sqs, 8, Some(256 << 10)),
            (8, 10),
            "8 x 10 x 256 KiB fits 32 MiB"
        );
    }

    #[test]
    fn only_full_batches_go_unless_partial_ones_are_allowed() {
        let mut queue: Vec<Leased> = (0..5).map(|i| leased(&format!("m{i}"), Some("k"))).collect();
        let none = HashMap::new();
        assert!(take_sendable(&mut queue, &none, 10, false).is_none());
        assert_eq!(queue.len(), 5, "nothing taken");
        let batch = take_sendable(&mut queue, &none, 3, false).expect("a full batch of 3");
        assert_eq!(ids(&batch), ["m0", "m1", "m2"]);
        let batch = take_sendable(&mut queue, &none, 3, true).expect("the partial rest");
        assert_eq!(ids(&batch), ["m3", "m4"]);
    }

    #[test]
    fn partial_batches_wait_for_waiting_leases_and_for_busy_send_slots() {
        // Nothing to wait for: the partial batch goes.
        assert!(partial_batches_may_go(true, false, 0));
        // A lease result is waiting: it may fill the batch.
        assert!(!partial_batches_may_go(true, true, 0));
        assert!(!partial_batches_may_go(false, true, 0));
        // Sends are in flight: the next lease's matches fill it first.
        assert!(!partial_batches_may_go(true, false, 1));
        assert!(!partial_batches_may_go(true, false, 16));
        // ... unless leasing has stopped: no full batch is coming.
        assert!(partial_batches_may_go(false, false, 16));
    }

    /// A fresh limiter lets nothing through at once, not a whole second's
    /// worth, and fills up to one batch at most.
    #[test]
    fn a_rate_starts_empty_and_holds_at_most_a_batch() {
        let limiter = message_rate(NonZeroU32::new(1).unwrap(), 10);
        assert!(limiter.check().is_err(), "the first waits a second");
        // Half a second of 10/s is 5 tokens; the bucket holds a batch of 3,
        // and the next token is 100 ms away.
        let limiter = message_rate(NonZeroU32::new(10).unwrap(), 3);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!((0..10).filter(|_| limiter.check().is_ok()).count(), 3);
    }

    #[test]
    fn a_stop_reason_reads_as_its_json_name() {
        for r in [
            StopReason::Drained,
            StopReason::AllSeen,
            StopReason::MaxReached,
            StopReason::Deadline,
            StopReason::HeldLimit,
            StopReason::Cancelled,
            StopReason::Failed,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.to_string());
        }
    }

    #[test]
    fn lease_size_keeps_a_batch_within_what_the_rate_allows_in_half_the_hold() {
        let rate = |r| NonZeroU32::new(r);
        assert_eq!(lease_size(100, None, Duration::from_secs(2)), 100);
        assert_eq!(lease_size(100, rate(20), Duration::from_secs(2)), 20);
        assert_eq!(lease_size(10, rate(20), Duration::from_secs(2)), 10);
        assert_eq!(lease_size(100, rate(1000), Duration::from_secs(30)), 100);
        // A rate too slow for even one message per half hold still leases one.
        assert_eq!(lease_size(100, rate(1), Duration::from_secs(1)), 1);
    }
}
