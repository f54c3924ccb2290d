//! Reading a DLQ for triage with as little disturbance as the provider
//! allows (DESIGN §3, guarantee 8).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::error::TriageError;
use crate::backend::{BackendError, QueueBackend};
use crate::engine::held::{HeldLeases, Keeper, effective_hold};
use crate::engine::redrive::{LEASE_RETRIES, is_permanent};
use crate::filter::{Filter, FilterError};
use crate::model::{DlqMessage, LeaseId};

/// Consecutive leases that bring nothing new before a browse stops.
pub(super) const ALL_SEEN_LIMIT: u32 = 3;

/// How a read went.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ReadStats {
    /// Messages read (examined), each once.
    pub read: u64,
    /// The read stopped at its cap: the DLQ may hold more.
    pub capped: bool,
    /// Read with a true peek (no side effect); otherwise leased and released,
    /// which raised each message's delivery count.
    pub true_peek: bool,
    /// Messages the provider held back, by its count: their group's earlier
    /// messages were leased by this read (an SQS FIFO queue delivers nothing
    /// more of a group while any of it is in flight), so they could not be
    /// read without deleting those. 0 when the read saw everything.
    pub held_back: u64,
    /// Stopped early by `cancel` (an interrupt).
    pub interrupted: bool,
    /// The provider leased no more while the read held what it had read (SQS:
    /// 120,000 messages in flight): [`ReadStats::held_back`] counts the rest.
    pub hold_limited: bool,
}

impl ReadStats {
    /// What the user is told when the read could not see the whole DLQ
    /// because of [`ReadStats::held_back`].
    pub fn held_back_note(&self) -> Option<String> {
        if self.hold_limited {
            return Some(format!(
                "warning: the read stopped at {} messages, where the queue reached the provider's limit on messages leased at once (SQS: about 120,000 in flight, other consumers' leases included); {} more were not read",
                self.read, self.held_back
            ));
        }
        (self.held_back > 0).then(|| {
            format!(
                "warning: {} more messages were not read: the provider delivers a message group's later messages only once its earlier ones are deleted (SQS FIFO), and reading deletes nothing",
                self.held_back
            )
        })
    }
}

/// Read up to `max` messages, handing each to `each` once, as it arrives;
/// `each` returns false to stop early. With a true peek this is one browse,
/// a page at a time ([`QueueBackend::peek_each`]); otherwise messages are leased batch by batch (hidden for `hold`), kept
/// leased (and extended, a read that outlasts the hold: [`Keeper`]) so that
/// the same message does not come back, and released together at the end,
/// whatever happens. Memory holds the lease handles and IDs, not
/// the messages. `cancel` stops it between leases, releasing what it holds
/// at once rather than leaving it hidden for `hold`.
pub async fn browse<F>(
    backend: &Arc<dyn QueueBackend>,
    max: usize,
    hold: Duration,
    cancel: &CancellationToken,
    mut each: F,
) -> Result<ReadStats, TriageError>
where
    F: FnMut(&DlqMessage) -> Result<bool, TriageError> + Send,
{
    let caps = backend.capabilities();
    let mut stats = ReadStats {
        true_peek: caps.true_peek,
        ..Default::default()
    };
    if caps.true_peek {
        let mut failed = None;
        let mut stopped = false;
        backend
            .peek_each(max, &mut |m| {
                if cancel.is_cancelled() {
                    stats.interrupted = true;
                    return false;
                }
                stats.read += 1;
                match each(&m) {
                    Ok(go) => {
                        stopped = !go;
                        go
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            })
            .await?;
        if let Some(e) = failed {
            return Err(e);
        }
        stats.capped = !stopped && !stats.interrupted && stats.read >= max as u64;
        return Ok(stats);
    }
    let mut seen: HashSet<String> = HashSet::new();
    let hold = effective_hold(&caps, hold);
    let held = HeldLeases::new(hold);
    let keeper = Keeper::start(
        &held,
        backend.clone(),
        hold,
        caps.max_release_size,
        caps.max_concurrent_leases,
    );
    let mut streak = 0;
    let mut failures = 0;
    // Body bytes and messages of the last lease.
    let mut last = None;
    let result: Result<(), TriageError> = async {
        loop {
            if cancel.is_cancelled() {
                stats.interrupted = true;
                return Ok(());
            }
            // Pages of about 4 MiB of bodies, as a browse's: a provider's
            // batch of large bodies would otherwise all be in memory at once.
            // Not with ordered delivery: a key's later messages come only
            // once what was delivered of it is settled (Pub/Sub delivers a
            // key's messages a pull at a time), so a read sees of each key
            // what its first lease brings, and a smaller lease saw less.
            let page = if caps.ordered_delivery {
                caps.batch_size
            } else {
                crate::backend::peek_page(last, caps.batch_size)
            };
            let want = max.saturating_sub(stats.read as usize).min(page);
            if want == 0 {
                stats.capped = true;
                return Ok(());
            }
            let batch = match backend.lease(want, hold).await {
                Ok(batch) => {
                    failures = 0;
                    batch
                }
                // What is read so far is what can be read without deleting.
                Err(BackendError::HoldLimit { .. }) => {
                    stats.hold_limited = true;
                    stats.held_back = backend.stats().await?.depth.saturating_sub(stats.read);
                    return Ok(());
                }
                Err(e) if !is_permanent(&e) && failures < LEASE_RETRIES => {
                    failures += 1;
                    tracing::warn!(error = %e, attempt = failures, "lease failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(250 << failures)) => {}
                        _ = cancel.cancelled() => {}
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if batch.is_empty() {
                // An empty lease proves the queue read only when the provider
                // holds nothing back for the leases this read keeps.
                if caps.ordered_delivery && held.len() > 0 {
                    let depth = backend.stats().await?.depth;
                    stats.held_back = depth.saturating_sub(stats.read);
                }
                return Ok(());
            }
            last = Some((batch.iter().map(|l| l.message.body.len()).sum(), batch.len()));
            let mut fresh = 0;
            let mut stop = false;
            // Every lease of the batch is held (for the release) before any
            // message is handed over: one whose handling failed (an export
            // whose pipe closed) returned with the rest of the batch not yet
            // held, and those stayed hidden for the whole hold.
            held.extend(batch.iter().map(|l| l.lease.clone()));
            for l in batch {
                if stop || !seen.insert(l.message.id.clone()) {
                    continue;
                }
                fresh += 1;
                stats.read += 1;
                stop = !each(&l.message)?;
            }
            if stop {
                return Ok(());
            }
            if fresh == 0 {
                streak += 1;
                if streak >= ALL_SEEN_LIMIT {
                    return Ok(());
                }
            } else {
                streak = 0;
            }
        }
    }
    .await;
    keeper.stop().await;
    let held: Vec<LeaseId> = held.take_runs().into_iter().flatten().collect();
    let released = backend.release(&held).await;
    result?;
    released?;
    Ok(stats)
}

/// What [`first_matches`] kept and how the read went.
#[derive(Debug, Default)]
pub struct Shown {
    /// The first matches, in the order read: at most the limit asked for.
    pub messages: Vec<DlqMessage>,
    /// Messages read (each handed to the predicate once).
    pub read: usize,
    /// Messages the predicate failed on (counted as no match).
    pub filter_errors: u64,
    /// The read stopped at its cap before `limit` matches: the DLQ may hold more.
    pub capped: bool,
    /// The matches kept reached `max_body_bytes` of bodies before `limit`:
    /// the read stopped there, and the DLQ may hold more matches.
    pub truncated: bool,
    /// Stopped by `cancel`.
    pub interrupted: bool,
    /// As [`ReadStats::held_back`] and [`ReadStats::hold_limited`]: what the
    /// provider did not let the read see (an SQS FIFO queue's later messages).
    pub held_back: u64,
    pub hold_limited: bool,
}

impl Shown {
    /// What the user is told when the read could not see the whole DLQ.
    pub fn held_back_note(&self) -> Option<String> {
        ReadStats {
            read: self.read as u64,
            held_back: self.held_back,
            hold_limited: self.hold_limited,
            ..Default::default()
        }
        .held_back_note()
    }
}

/// How long a read for display ([`first_matches`]) holds what it leases
/// (SQS, Pub/Sub) between extensions: what a read killed with it still
/// running leaves hidden, at most.
pub const DISPLAY_HOLD: Duration = Duration::from_secs(30);

/// Browse up to `scan` messages ([`browse`]) and keep the first `limit` for
/// which `matches` says `Some(true)` (`None`: the filter failed on it).
/// Messages that do not match are dropped as they are read and the read
/// stops at the `limit`-th match, or once the matches kept hold
/// `max_body_bytes` of bodies (at least one is kept; `truncated`), so the
/// bodies in memory are those shown and one page's, whatever `scan` is.
/// Where the provider has no true peek, what is read is leased for `hold`
/// and kept leased (extended) until the read ends, however long the scan
/// takes; the IDs and lease handles of what was read are kept until then.
/// `cancel` stops it at the next message; what was leased is released
/// either way.
pub async fn first_matches(
    backend: &Arc<dyn QueueBackend>,
    scan: usize,
    limit: usize,
    max_body_bytes: usize,
    hold: Duration,
    cancel: &CancellationToken,
    mut matches: impl FnMut(&DlqMessage) -> Option<bool> + Send,
) -> Result<Shown, TriageError> {
    let mut shown = Shown::default();
    if limit == 0 {
        return Ok(shown);
    }
    let mut kept_bytes = 0usize;
    let mut interrupted = false;
    let mut filter_errors = 0;
    let mut kept = Vec::new();
    let stats = browse(backend, scan, hold, cancel, |m| {
        if cancel.is_cancelled() {
            interrupted = true;
            return Ok(false);
        }
        match matches(m) {
            Some(true) => {
                kept_bytes = kept_bytes.saturating_add(m.body.len());
                kept.push(m.clone());
            }
            Some(false) => {}
            None => filter_errors += 1,
        }
        Ok(kept.len() < limit && kept_bytes < max_body_bytes)
    })
    .await?;
    shown.messages = kept;
    shown.filter_errors = filter_errors;
    shown.interrupted = interrupted || stats.interrupted;
    // The browse counts a message read before it hands it over: the one
    // turned away for the cancel was not.
    shown.read = stats.read as usize - usize::from(interrupted);
    shown.truncated = shown.messages.len() < limit && kept_bytes >= max_body_bytes;
    shown.held_back = stats.held_back;
    shown.hold_limited = stats.hold_limited;
    shown.capped = shown.messages.len() < limit && !shown.interrupted && !shown.truncated && shown.read >= scan;
    Ok(shown)
}

/// The side effect of reading this backend, for the user (guarantee 8).
pub fn read_note(backend: &dyn QueueBackend) -> Option<String> {
    (!backend.capabilities().true_peek).then(|| {
        format!(
            "note: {} has no true peek; reading leases and releases messages, which raises their delivery count",
            backend.kind()
        )
    })
}

pub(crate) fn compile(filter: Option<&str>) -> Result<Filter, FilterError> {
    match filter.filter(|f| !f.trim().is_empty()) {
        Some(f) => Filter::compile(f),
        None => Ok(Filter::match_all()),
    }
}
