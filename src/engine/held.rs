//! What a redrive pass holds without moving it (non-matches, matches it may
//! not send), kept hidden until the pass ends and releases it all
//! (guarantee 4), and the keeper that stops it lapsing meanwhile.
//!
//! A lease lasts the pass's hold (`redrive.hold`, Pub/Sub's 600 s at most,
//! Service Bus's LockDuration, a minute by default). A pass that outlasts it
//! would see what it holds come back: each message delivered again (Service
//! Bus and Pub/Sub count the delivery), skipped as seen, and a run of leases
//! bringing only those ends the pass as `all_seen` while unexamined messages
//! wait behind them. So while a pass runs, a keeper task extends each run
//! of held leases once a third of the hold has passed since it was leased
//! or last extended: two more tries before it would lapse. Leases held only
//! a while after they were leased (copies that were not sent, matches held
//! back for their group) are extended at once. The keeper is stopped before
//! the release; it waits up to [`STOP_GRACE`] for the calls it has out, so
//! that none lands after the release.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, Capabilities, QueueBackend};
use crate::model::LeaseId;

/// How long a lease asked to hold for `asked` holds: less where the
/// provider fixes its own hold (Service Bus's LockDuration) or caps it
/// (Pub/Sub's 600 s).
pub(crate) fn effective_hold(caps: &Capabilities, asked: Duration) -> Duration {
    [caps.fixed_hold, caps.max_hold]
        .into_iter()
        .flatten()
        .fold(asked, Duration::min)
}

/// The held leases of one pass, shared with its [`Keeper`]. Leases are kept
/// in runs, each with the time it was leased or last extended, so the keeper
/// extends a run as a whole and the pass appends without sorting.
#[derive(Clone)]
pub(crate) struct HeldLeases(Arc<Mutex<Runs>>);

struct Runs {
    runs: VecDeque<Run>,
    /// Every held lease, those the keeper has out for extension included.
    len: usize,
    /// How long after a run was leased or extended the keeper extends it.
    interval: Duration,
    /// A run takes leases for this long after it starts, then a new one
    /// starts: a quarter of the interval, so no lease joins a run much
    /// older than itself.
    span: Duration,
    /// The last run, while it takes leases: when it was started, and
    /// whether it holds leases taken late (see [`HeldLeases::extend_overdue`]).
    open: Option<(Instant, bool)>,
}

struct Run {
    since: Instant,
    leases: Vec<LeaseId>,
}

impl HeldLeases {
    /// An empty set whose leases each last `hold` from when they were
    /// leased or extended.
    pub fn new(hold: Duration) -> Self {
        let interval = (hold / 3).max(Duration::from_millis(100));
        Self(Arc::new(Mutex::new(Runs {
            runs: VecDeque::new(),
            len: 0,
            interval,
            span: interval / 4,
            open: None,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.0.lock().expect("held leases lock")
    }

    pub fn push(&self, lease: LeaseId) {
        self.extend(std::iter::once(lease));
    }

    /// Hold leases that were just leased.
    pub fn extend(&self, leases: impl IntoIterator<Item = LeaseId>) {
        self.add(leases, false);
    }

    /// Hold leases taken a while after they were leased (copies that were
    /// not sent, matches held back for their group's order): how long ago
    /// is not known, so their run is due for extension at once.
    pub fn extend_overdue(&self, leases: impl IntoIterator<Item = LeaseId>) {
        self.add(leases, true);
    }

    fn add(&self, leases: impl IntoIterator<Item = LeaseId>, overdue: bool) {
        let mut leases = leases.into_iter().peekable();
        if leases.peek().is_none() {
            return;
        }
        let now = Instant::now();
        let mut runs = self.lock();
        let span = runs.span;
        let joins = runs
            .open
            .is_some_and(|(opened, late)| late == overdue && now.duration_since(opened) < span);
        if !joins {
            let since = if overdue {
                now.checked_sub(runs.interval).unwrap_or(now)
            } else {
                now
            };
            runs.runs.push_back(Run {
                since,
                leases: Vec::new(),
            });
            runs.open = Some((now, overdue));
        }
        let last = runs.runs.back_mut().expect("a run was just ensured");
        let before = last.leases.len();
        last.leases.extend(leases);
        let added = last.leases.len() - before;
        runs.len += added;
    }

    /// Held leases, those out for extension included.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Everything held, run by run, for the release at the end (runs, not
    /// one list: at the end of a large pass, when memory peaks, a copy of
    /// every lease into one list would cost its size again). The keeper must
    /// be stopped first, or what it has out is missed.
    pub fn take_runs(&self) -> Vec<Vec<LeaseId>> {
        let mut runs = self.lock();
        runs.len = 0;
        runs.open = None;
        let taken = runs.runs.drain(..).map(|r| r.leases).collect();
        runs.runs.shrink_to_fit();
        taken
    }

    /// The oldest run whose extension is due at `now`, taken out (still
    /// counted in `len`); and when the next one falls due otherwise.
    fn take_due(&self, now: Instant) -> Result<Run, Option<Instant>> {
        let mut runs = self.lock();
        let interval = runs.interval;
        let oldest = runs.runs.iter().enumerate().min_by_key(|(_, r)| r.since);
        match oldest {
            Some((i, r)) if r.since + interval <= now => {
                if i + 1 == runs.runs.len() {
                    runs.open = None;
                }
                Ok(runs.runs.remove(i).expect("index from the scan"))
            }
            Some((_, r)) => Err(Some(r.since + interval)),
            None => Err(None),
        }
    }

    fn put_back(&self, run: Run) {
        let mut runs = self.lock();
        runs.runs.push_back(run);
        runs.open = None;
    }
}

/// How long a stop waits for the extensions already sent.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The task that extends a pass's held leases until it is stopped.
pub(crate) struct Keeper {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Keeper {
    /// Extend what `held` holds on `backend` by `hold` every third of it,
    /// `chunk` leases per call and `parallel` calls at a time.
    pub fn start(
        held: &HeldLeases,
        backend: Arc<dyn QueueBackend>,
        hold: Duration,
        chunk: usize,
        parallel: usize,
    ) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep(
            held.clone(),
            backend,
            hold,
            chunk.max(1),
            parallel.max(1),
            stop.clone(),
        ));
        Self { stop, task }
    }

    /// Stop extending. Once this returns every held lease is back in the
    /// set, ready for the release.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Err(e) = (&mut self.task).await {
            // A panic in the keeper must not hide what it held: the leases
            // it had out lapse on their own (seen again, never lost).
            tracing::error!(error = %e, "the task extending held leases failed");
        }
    }
}

/// A pass dropped without its end (its run's future dropped, or a panic)
/// must not leave its messages hidden for good, extended by a task nobody
/// stops: they lapse within a hold instead.
impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn keep(
    held: HeldLeases,
    backend: Arc<dyn QueueBackend>,
    hold: Duration,
    chunk: usize,
    parallel: usize,
    stop: CancellationToken,
) {
    let mut warned = false;
    loop {
        let run = match held.take_due(Instant::now()) {
            Ok(run) => run,
            Err(next) => {
                // A run added overdue falls due at once: look again within
                // a span, whatever else is due later.
                let span = held.lock().span;
                let soon = Instant::now() + span;
                let wake = next.map_or(soon, |next| next.min(soon));
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let started = Instant::now();
        // Not cancelled at once: an extension dropped after it was sent
        // could reach the provider after the release at the end of the
        // pass, and hide those messages again for a whole hold. A stop
        // starts no new call and waits for those out, for a while: a
        // provider that stalls would otherwise hold the end of the pass for
        // as long as the calls' own timeouts (Service Bus renews one request
        // at a time, 20 s each).
        let calls = extend_run(&*backend, &run.leases, hold, chunk, parallel, &stop);
        let result = tokio::select! {
            r = calls => r,
            _ = async {
                stop.cancelled().await;
                tokio::time::sleep(STOP_GRACE).await;
            } => {
                tracing::debug!("extensions still out when the pass ended were given up");
                Ok(())
            }
        };
        if let Err((n, e)) = &result {
            // Not fatal: a lease that lapses comes back and is skipped as
            // seen; nothing is lost. Said once per pass, then at debug.
            if !warned {
                warned = true;
                tracing::warn!(
                    failed = n,
                    error = %e,
                    "extending held messages failed; they may be delivered again before the pass ends (skipped as seen, not lost)"
                );
            } else {
                tracing::debug!(failed = n, error = %e, "extending held messages failed");
            }
        }
        held.put_back(Run {
            since: started,
            leases: run.leases,
        });
        if stop.is_cancelled() {
            return;
        }
    }
}

/// Extend `leases`, `chunk` a call and `parallel` calls at a time, until
/// done or `stop` (the calls out then finish): on failure, how many leases
/// the failed calls held, and the first error.
async fn extend_run(
    backend: &dyn QueueBackend,
    leases: &[LeaseId],
    hold: Duration,
    chunk: usize,
    parallel: usize,
    stop: &CancellationToken,
) -> Result<(), (usize, BackendError)> {
    let mut chunks = leases.chunks(chunk);
    let mut out = FuturesUnordered::new();
    let mut failed: Option<(usize, BackendError)> = None;
    loop {
        while out.len() < parallel
            && !stop.is_cancelled()
            && let Some(c) = chunks.next()
        {
            out.push(async move { backend.extend(c, hold).await.map_err(|e| (c.len(), e)) });
        }
        match out.next().await {
            Some(Ok(())) => {}
            Some(Err((n, e))) => match &mut failed {
                Some((total, _)) => *total += n,
                None => failed = Some((n, e)),
            },
            None => break,
        }
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(held: &HeldLeases) -> Vec<String> {
        held.take_runs().into_iter().flatten().map(|l| l.0).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn leases_join_a_run_only_within_its_span() {
        // A hold of 12 s: extended every 4 s, a run takes leases for 1 s.
        let held = HeldLeases::new(Duration::from_secs(12));
        held.push(LeaseId("a".into()));
        held.extend(["b", "c"].map(|s| LeaseId(s.into())));
        tokio::time::advance(Duration::from_secs(2)).await;
        held.extend(std::iter::empty());
        held.push(LeaseId("d".into()));
        assert_eq!(held.len(), 4);
        assert_eq!(held.lock().runs.len(), 2, "an empty extend starts no run");
        assert_eq!(ids(&held), ["a", "b", "c", "d"]);
        assert_eq!(held.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn leases_held_late_are_due_at_once() {
        let held = HeldLeases::new(Duration::from_secs(30));
        held.push(LeaseId("fresh".into()));
        held.extend_overdue([LeaseId("late".into())]);
        held.extend_overdue([LeaseId("late too".into())]);
        held.push(LeaseId("fresh too".into()));
        let run = held.take_due(Instant::now()).expect("the late run is due");
        assert_eq!(run.leases, [LeaseId("late".into()), LeaseId("late too".into())]);
        assert!(held.take_due(Instant::now()).is_err(), "the fresh ones are not");
        assert_eq!(held.len(), 4);
        assert_eq!(held.lock().runs.len(), 2, "a fresh lease does not join a late run");
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_run_falls_due_first_and_is_counted_while_out() {
        let held = HeldLeases::new(Duration::from_secs(30));
        held.push(LeaseId("old".into()));
        tokio::time::advance(Duration::from_secs(4)).await;
        held.push(LeaseId("new".into()));
        let now = Instant::now();
        let Err(Some(next)) = held.take_due(now) else {
            panic!("nothing is due yet");
        };
        assert_eq!(next, now + Duration::from_secs(6));
        tokio::time::advance(Duration::from_secs(6)).await;
        let run = held.take_due(Instant::now()).expect("the old run is due");
        assert_eq!(run.leases, [LeaseId("old".into())]);
        assert_eq!(held.len(), 2, "a run out for extension is still held");
        held.put_back(Run {
            since: Instant::now(),
            leases: run.leases,
        });
        let Err(Some(next)) = held.take_due(Instant::now()) else {
            panic!("the new run is not due yet");
        };
        assert_eq!(next, Instant::now() + Duration::from_secs(4));
    }
}
