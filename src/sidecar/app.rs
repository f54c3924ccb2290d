//! What the HTTP handlers, the scheduler and the alert loop share: the
//! registry, metrics, the status cache, the journal and the runs started by
//! the API or a schedule.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::journal::Journal;
use crate::engine::redrive::{Action, Engine, Progress, RedrivePlan, RunSummary, Trigger};
use crate::engine::registry::{RedriveRequest, Registry, RegistryError};
use crate::sidecar::exclusion::QueueLocks;
use crate::sidecar::history::{self, RunHistory};
use crate::sidecar::metrics::Metrics;
use crate::sidecar::poller::StatusCache;

/// Finished runs kept for `GET /v1/runs/{id}`.
const RUNS_KEPT: usize = 200;

/// Spawn `run` into `tasks` after dropping the runs that have ended. A
/// JoinSet keeps each finished task (its whole future's allocation) until it
/// is joined, and these are joined only at shutdown: a sidecar whose
/// schedule fires every minute would hold every run it ever made.
fn spawn_reaping(tasks: &mut JoinSet<()>, run: impl std::future::Future<Output = ()> + Send + 'static) {
    while tasks.try_join_next().is_some() {}
    tasks.spawn(run);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Finished,
    /// Stopped by a shutdown (SIGTERM) or cancelled over the API before it
    /// was done, nothing failed: what it left is still in the DLQ.
    Interrupted,
    Failed,
}

impl RunStatus {
    /// As the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Interrupted => "interrupted",
            Self::Failed => "failed",
        }
    }

    /// How a run that returned `s` ended.
    pub fn of(s: &RunSummary) -> Self {
        if !s.ok() {
            Self::Failed
        } else if s.stopped == crate::engine::redrive::StopReason::Cancelled {
            Self::Interrupted
        } else {
            Self::Finished
        }
    }

    /// The `outcome` label of `dlq_bridge_runs_total`.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Finished | Self::Running => "succeeded",
            Self::Interrupted => "interrupted",
            Self::Failed => "failed",
        }
    }
}

/// A redrive started by the API or a schedule, as `/v1/runs/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub run_id: String,
    pub queue: String,
    pub trigger: Trigger,
    /// `redrive` or `purge`.
    pub action: &'static str,
    pub filter: String,
    pub dry_run: bool,
    pub status: RunStatus,
    pub started_at: DateTime<Utc>,
    pub progress: ProgressView,
    pub summary: Option<RunSummary>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProgressView {
    pub examined: u64,
    pub matched: u64,
    pub sent: u64,
    pub settled: u64,
    pub failed: u64,
}

impl From<&Progress> for ProgressView {
    fn from(p: &Progress) -> Self {
        Self {
            examined: Progress::get(&p.examined),
            matched: Progress::get(&p.matched),
            sent: Progress::get(&p.sent),
            settled: Progress::get(&p.settled),
            failed: Progress::get(&p.failed),
        }
    }
}

pub(super) struct RunEntry {
    view: RunView,
    progress: Arc<Progress>,
    /// Stops the run as a shutdown does ([`App::cancel_run`]).
    cancel: CancellationToken,
}

/// What [`App::cancel_run`] did.
pub enum Cancelled {
    /// Asked to stop: it stops leasing, sends what it holds already and
    /// releases the rest, then reads `interrupted`.
    Stopping(RunView),
    /// It had ended already.
    Ended(RunView),
    /// This replica runs no run of that ID.
    Unknown,
}

/// Everything the HTTP handlers, the scheduler and the alert loop share.
pub struct App {
    pub registry: Arc<Registry>,
    pub cache: Arc<StatusCache>,
    pub metrics: Arc<Metrics>,
    pub token: Option<String>,
    /// Runs against the sidecar's own reads that lease (see `exclusion`).
    pub locks: Arc<QueueLocks>,
    /// Where purges started over HTTP write their backups and exports their files.
    pub data_dir: Option<PathBuf>,
    pub(super) journal: Option<Arc<Journal>>,
    /// The runs the journal records, for runs past those kept in `runs`.
    pub(super) history: RunHistory,
    pub(super) runs: Mutex<HashMap<String, RunEntry>>,
    pub(super) finished_order: Mutex<VecDeque<String>>,
    /// Cancelled on shutdown: runs stop leasing and release what they hold.
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: Mutex<JoinSet<()>>,
    /// The configured queues, grouped by backend: the pod is ready once
    /// each backend has polled one queue (see `ready`).
    pub(super) queues_by_backend: Vec<Vec<String>>,
}

impl App {
    /// Ready once each configured backend has polled a queue: its client
    /// is built and its first answer (or error) is in. Not every queue: the
    /// admin-call limits spread a thousand queues' first polls over a
    /// minute, and a sidecar that is not ready takes its app's pod out of
    /// service with it.
    pub async fn ready(&self) -> bool {
        self.cache.each_group_polled(&self.queues_by_backend).await
    }

    /// Validate a redrive request and start it in the background. Returns the
    /// run ID, or the reason it cannot start (nothing was touched).
    pub async fn start_run(
        self: &Arc<Self>,
        queue: &str,
        req: RedriveRequest,
        trigger: Trigger,
    ) -> Result<String, RegistryError> {
        let plan = self.registry.plan(queue, &req, trigger).await?;
        self.start_planned(plan).await
    }

    /// Start a planned run (a redrive, or a purge when `plan.action` says so)
    /// in the background and return its ID.
    pub async fn start_planned(self: &Arc<Self>, plan: RedrivePlan) -> Result<String, RegistryError> {
        let queue = plan.queue.as_str();
        let backend = self.registry.backend(queue).await?;
        let true_peek = backend.capabilities().true_peek;
        let cancel = self.shutdown.child_token();
        let mut engine = Engine::new(backend).with_cancel(cancel.clone());
        if let Some(j) = &self.journal {
            engine = engine.with_journal(j.clone());
        }
        let progress = engine.progress();
        let run_id = plan.run_id.clone();
        // Both locks before any state changes: an API request whose client
        // hangs up is dropped at an await, and one here, after the run was
        // counted as active, left it active for good (no task to end it).
        let mut tasks = self.tasks.lock().await;
        let mut runs = self.runs.lock().await;
        // Counted as active at once (the poller stops sampling the queue); it
        // leases only once a read of the queue in flight is done. Service Bus
        // browses without leasing and needs no guard.
        let ticket = (!true_peek).then(|| self.locks.run_starting(queue));
        // What it settles counts as removed as it happens (arrivals, growth).
        self.cache.run_started(queue, &run_id, progress.clone());
        runs.insert(
            run_id.clone(),
            RunEntry {
                view: RunView {
                    run_id: run_id.clone(),
                    queue: queue.to_string(),
                    trigger: plan.trigger,
                    action: plan.action.name(),
                    filter: plan.filter.source().to_string(),
                    dry_run: plan.dry_run,
                    status: RunStatus::Running,
                    started_at: Utc::now(),
                    progress: ProgressView::from(&*progress),
                    summary: None,
                    error: None,
                },
                progress,
                cancel,
            },
        );
        let app = self.clone();
        let queue = queue.to_string();
        drop(runs);
        spawn_reaping(&mut tasks, async move {
            let ticket = match ticket {
                Some(t) => Some(t.admitted().await),
                None => None,
            };
            let result = engine.run(&plan).await;
            drop(ticket);
            app.finish_run(&plan.run_id, &queue, plan.action.name(), plan.trigger, result)
                .await;
        });
        Ok(run_id)
    }

    async fn finish_run(
        &self,
        run_id: &str,
        queue: &str,
        action: &str,
        trigger: Trigger,
        result: Result<RunSummary, crate::engine::redrive::RedriveError>,
    ) {
        let status = result.as_ref().map_or(RunStatus::Failed, RunStatus::of);
        self.metrics
            .count_run(queue, action, &trigger.to_string(), status.outcome());
        let settled = match &result {
            Ok(s) => s.settled,
            Err(_) => 0,
        };
        self.cache.run_finished(queue, run_id, settled);
        if let Ok(s) = &result {
            // A purge's deletes are not redriven messages (runs_total counts
            // purges by their action).
            if action == Action::REDRIVE {
                self.metrics.add_redriven(queue, "settled", s.settled);
                self.metrics.add_redriven(queue, "send_failed", s.send_failed);
                self.metrics.add_redriven(queue, "settle_failed", s.settle_failed);
                self.metrics.add_redriven(queue, "filter_error", s.filter_errors);
            }
            if status == RunStatus::Interrupted {
                let by = if self.shutdown.is_cancelled() {
                    "by the shutdown"
                } else {
                    "by a cancel over the API"
                };
                tracing::warn!(run = %run_id, queue, settled = s.settled, trigger = %s.trigger, "redrive interrupted {by}; what it did not move is still in the DLQ");
            } else if s.ok() {
                tracing::info!(run = %run_id, queue, settled = s.settled, failed = s.send_failed + s.settle_failed, trigger = %s.trigger, "redrive finished");
            } else {
                // A schedule's runs are seen nowhere else: a run that fails
                // every tick must say so, and why, where operators look.
                tracing::error!(run = %run_id, queue, settled = s.settled, failed = s.send_failed + s.settle_failed, filter_errors = s.filter_errors, stopped = %s.stopped, errors = ?s.errors, trigger = %s.trigger, "redrive failed");
            }
        }
        if let Err(e) = &result {
            tracing::error!(run = %run_id, queue, error = %e, %trigger, "redrive failed");
        }
        let mut runs = self.runs.lock().await;
        if let Some(e) = runs.get_mut(run_id) {
            e.view.progress = ProgressView::from(&*e.progress);
            match result {
                Ok(s) => {
                    e.view.status = RunStatus::of(&s);
                    e.view.summary = Some(s);
                }
                Err(err) => {
                    e.view.status = RunStatus::Failed;
                    e.view.error = Some(format!("{err:#}"));
                }
            }
        }
        let mut order = self.finished_order.lock().await;
        order.push_back(run_id.to_string());
        while order.len() > RUNS_KEPT {
            if let Some(old) = order.pop_front() {
                runs.remove(&old);
            }
        }
    }

    pub async fn run_view(&self, run_id: &str) -> Option<RunView> {
        let runs = self.runs.lock().await;
        runs.get(run_id).map(|e| {
            let mut v = e.view.clone();
            if v.status == RunStatus::Running {
                v.progress = ProgressView::from(&*e.progress);
            }
            v
        })
    }

    /// Stop a run this replica runs, as a shutdown would stop it.
    pub async fn cancel_run(&self, run_id: &str) -> Cancelled {
        let runs = self.runs.lock().await;
        let Some(e) = runs.get(run_id) else {
            return Cancelled::Unknown;
        };
        let mut v = e.view.clone();
        if v.status != RunStatus::Running {
            return Cancelled::Ended(v);
        }
        e.cancel.cancel();
        tracing::info!(run = %run_id, queue = %v.queue, "run cancelled over the API");
        v.progress = ProgressView::from(&*e.progress);
        Cancelled::Stopping(v)
    }

    /// Every run this process still remembers (running and recently finished).
    pub async fn run_views(&self) -> Vec<RunView> {
        let runs = self.runs.lock().await;
        let mut out: Vec<RunView> = runs
            .values()
            .map(|e| {
                let mut v = e.view.clone();
                if v.status == RunStatus::Running {
                    v.progress = ProgressView::from(&*e.progress);
                }
                v
            })
            .collect();
        out.sort_by_key(|v| std::cmp::Reverse(v.started_at));
        out
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// The runs the journal records, oldest first (see [`RunHistory::runs`]);
    /// `None` without a journal.
    pub async fn journaled_runs(self: &Arc<Self>) -> std::io::Result<Option<Arc<Vec<(String, serde_json::Value)>>>> {
        let Some(j) = &self.journal else { return Ok(None) };
        let path = j.path().to_owned();
        let keep = self.registry.config().redrive.journal_keep;
        let app = self.clone();
        tokio::task::spawn_blocking(move || app.history.runs(&path, keep))
            .await
            .map_err(std::io::Error::other)?
            .map(Some)
    }

    /// A run by ID: from memory while it is kept, else from the journal, in
    /// the same shape.
    pub async fn find_run(self: &Arc<Self>, run_id: &str) -> std::io::Result<Option<serde_json::Value>> {
        if let Some(v) = self.run_view(run_id).await {
            return Ok(Some(serde_json::to_value(v).expect("run views serialize")));
        }
        let Some(runs) = self.journaled_runs().await? else {
            return Ok(None);
        };
        // A run's finish comes after its start: the last record wins.
        Ok(runs
            .iter()
            .rev()
            .find(|(id, _)| id == run_id)
            .map(|(id, summary)| history::from_summary(id, summary.clone())))
    }

    /// Wait for runs to finish after shutdown was signalled.
    pub(super) async fn drain_runs(&self, grace: Duration) {
        // Runs spawned while the first ones drain are waited for too.
        let wait = async {
            loop {
                let mut tasks = std::mem::take(&mut *self.tasks.lock().await);
                if tasks.is_empty() {
                    break;
                }
                while tasks.join_next().await.is_some() {}
            }
        };
        if tokio::time::timeout(grace, wait).await.is_err() {
            tracing::warn!("redrives still running after the shutdown grace period; their leases expire by themselves");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_runs_do_not_pile_up_in_the_task_set() {
        let mut tasks = JoinSet::new();
        for _ in 0..100 {
            spawn_reaping(&mut tasks, async {});
            // Let it finish, as a run does long before the next one starts.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        }
        assert!(tasks.len() <= 1, "{} finished runs kept", tasks.len());
        // Runs still going are kept, to be drained on shutdown.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        spawn_reaping(&mut tasks, async move {
            let _ = rx.await;
        });
        spawn_reaping(&mut tasks, async {});
        assert!(tasks.len() >= 2);
        drop(tx);
    }
}
