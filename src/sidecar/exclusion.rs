//! Per-queue exclusion between redrive runs and the sidecar's own reads of
//! a queue that lease (DESIGN §3, guarantee 8).
//!
//! SQS and Pub/Sub have no true peek: the poller's reason sample, `GET
//! /v1/queues/{q}/messages`, the dashboard's browse and `report` lease
//! messages and release them about a second later. A run that leases while
//! they are hidden finds the DLQ empty and ends early, reporting success. So
//! on those backends:
//!
//! - a run on a queue waits for a read of that queue that is in flight, and
//!   counts as active from the moment it is started (before it waits);
//! - the poller skips its sample while a run is active (its previous sample
//!   stands), and the API's reads are refused with 409 (they would wait for
//!   the whole run otherwise).
//!
//! Reads exclude each other too (two overlapping reads would each see part
//! of the queue). Service Bus browses without leasing: its callers take no
//! guard (`Capabilities::true_peek`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

#[derive(Default)]
struct QueueLock {
    /// Runs hold it shared (they may overlap), reads exclusively.
    lock: Arc<RwLock<()>>,
    /// Runs started and not yet finished, including those still waiting.
    runs: AtomicUsize,
}

/// The guards of every configured queue.
#[derive(Default)]
pub struct QueueLocks {
    queues: HashMap<String, Arc<QueueLock>>,
}

/// Why a read could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// A run on the queue is active (or about to start).
    RunActive,
    /// Another read of the queue did not finish within the wait.
    ReadInFlight,
}

/// Held by a read that leases, for as long as it may hold messages.
pub struct ReadGuard {
    _guard: Option<OwnedRwLockWriteGuard<()>>,
}

/// A run counted as active on its queue; [`RunTicket::admitted`] then waits
/// for reads in flight. Dropping either ends the run's claim.
pub struct RunTicket {
    lock: Option<Arc<QueueLock>>,
    guard: Option<OwnedRwLockReadGuard<()>>,
}

impl Drop for RunTicket {
    fn drop(&mut self) {
        self.guard.take();
        if let Some(l) = &self.lock {
            l.runs.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl RunTicket {
    /// Wait until no read of the queue is in flight; the run may lease then.
    pub async fn admitted(mut self) -> Self {
        if let Some(l) = &self.lock {
            self.guard = Some(l.lock.clone().read_owned().await);
        }
        self
    }
}

impl QueueLocks {
    pub fn new<'a>(queues: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            queues: queues.into_iter().map(|q| (q.to_string(), Arc::default())).collect(),
        }
    }

    /// Count a run on `queue` as active at once (samples stop from now on);
    /// it waits for reads in flight in [`RunTicket::admitted`].
    pub fn run_starting(&self, queue: &str) -> RunTicket {
        let lock = self.queues.get(queue).cloned();
        if let Some(l) = &lock {
            l.runs.fetch_add(1, Ordering::AcqRel);
        }
        RunTicket { lock, guard: None }
    }

    /// Whether a run on `queue` is active.
    pub fn run_active(&self, queue: &str) -> bool {
        self.queues
            .get(queue)
            .is_some_and(|l| l.runs.load(Ordering::Acquire) > 0)
    }

    /// A read for the poller's sample: `None` (skip it) when a run is active
    /// or another read is in flight.
    pub fn try_read(&self, queue: &str) -> Option<ReadGuard> {
        let Some(l) = self.queues.get(queue) else {
            return Some(ReadGuard { _guard: None });
        };
        if l.runs.load(Ordering::Acquire) > 0 {
            return None;
        }
        let guard = l.lock.clone().try_write_owned().ok()?;
        // A run may have been counted between the check and the lock.
        if l.runs.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(ReadGuard { _guard: Some(guard) })
    }

    /// A read for the API: refused at once while a run is active, else waits
    /// up to `wait` for another read to finish.
    pub async fn read(&self, queue: &str, wait: Duration) -> Result<ReadGuard, Busy> {
        let Some(l) = self.queues.get(queue) else {
            return Ok(ReadGuard { _guard: None });
        };
        if l.runs.load(Ordering::Acquire) > 0 {
            return Err(Busy::RunActive);
        }
        let guard = tokio::time::timeout(wait, l.lock.clone().write_owned())
            .await
            .map_err(|_| {
                if l.runs.load(Ordering::Acquire) > 0 {
                    Busy::RunActive
                } else {
                    Busy::ReadInFlight
                }
            })?;
        if l.runs.load(Ordering::Acquire) > 0 {
            return Err(Busy::RunActive);
        }
        Ok(ReadGuard { _guard: Some(guard) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_waits_for_a_read_and_reads_skip_while_a_run_is_active() {
        let locks = Arc::new(QueueLocks::new(["orders", "other"]));
        let read = locks.try_read("orders").expect("nothing else is active");
        assert!(locks.try_read("orders").is_none(), "reads exclude each other");
        let ticket = locks.run_starting("orders");
        assert!(locks.run_active("orders"));
        // The run must wait for the read in flight.
        let waiting = tokio::spawn({
            let locks = locks.clone();
            async move {
                let t = locks.run_starting("orders").admitted().await;
                drop(t);
            }
        });
        let admitted = tokio::time::timeout(Duration::from_millis(100), ticket.admitted()).await;
        assert!(admitted.is_err(), "a run is admitted only once the read is done");
        let ticket = locks.run_starting("orders");
        drop(read);
        let ticket = tokio::time::timeout(Duration::from_secs(1), ticket.admitted())
            .await
            .expect("admitted after the read ended");
        waiting.await.unwrap();
        // While a run is active, reads are skipped or refused; other queues are free.
        assert!(locks.try_read("orders").is_none());
        assert_eq!(
            locks.read("orders", Duration::from_millis(50)).await.err(),
            Some(Busy::RunActive)
        );
        assert!(locks.try_read("other").is_some());
        // Runs overlap each other.
        let second = tokio::time::timeout(Duration::from_secs(1), locks.run_starting("orders").admitted())
            .await
            .expect("runs share the queue");
        drop(second);
        assert!(locks.run_active("orders"));
        drop(ticket);
        assert!(!locks.run_active("orders"));
        assert!(locks.try_read("orders").is_some());
        assert!(locks.read("orders", Duration::from_millis(50)).await.is_ok());
    }

    #[tokio::test]
    async fn an_api_read_waits_for_another_read_then_gives_up() {
        let locks = QueueLocks::new(["q"]);
        let held = locks.try_read("q").unwrap();
        assert_eq!(
            locks.read("q", Duration::from_millis(50)).await.err(),
            Some(Busy::ReadInFlight)
        );
        drop(held);
        assert!(locks.read("q", Duration::from_millis(50)).await.is_ok());
    }
}
