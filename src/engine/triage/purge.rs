//! `purge`: matching messages deleted, each after its backup is written,
//! through the redrive engine.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::error::{TriageError, unless_cancelled};
use super::export::{ExportWriter, ExportedMessage};
use crate::backend::QueueBackend;
use crate::engine::journal::Journal;
use crate::engine::redrive::{Action, Backup, Engine, Progress, RunSummary, Trigger};
use crate::engine::registry::{RedriveRequest, Registry};
use crate::filter::Filter;
use crate::model::DlqMessage;

/// A purge's backup: export lines appended to a file, fsynced per batch.
pub struct FileBackup {
    writer: Mutex<ExportWriter>,
    queue: String,
    backend: Arc<dyn QueueBackend>,
    /// The file this backup created, removed again if nothing was written
    /// to it: a retention policy checked hourly on a queue with nothing
    /// expired would leave an empty file every hour, for good.
    created: Option<PathBuf>,
    written: AtomicBool,
}

impl FileBackup {
    /// Open `path` for appending, creating it (and its directory) when
    /// missing: before anything is deleted, so that a path that cannot be
    /// written stops the purge at once.
    pub fn create(path: &Path, queue: &str, backend: Arc<dyn QueueBackend>) -> Result<Self, TriageError> {
        let existed = path.exists();
        let writer = ExportWriter::create(path, true)?;
        if !existed {
            // The batches are synced as they are written; the new file's
            // (and directory's) entry must be too, or a power loss could
            // take the whole file after its messages were deleted.
            crate::engine::journal::sync_parent_dir(path);
            if let Some(dir) = path.parent() {
                crate::engine::journal::sync_parent_dir(dir);
            }
        }
        Ok(Self {
            writer: Mutex::new(writer),
            queue: queue.to_string(),
            backend,
            created: (!existed).then(|| path.to_owned()),
            written: AtomicBool::new(false),
        })
    }
}

impl Drop for FileBackup {
    fn drop(&mut self) {
        if let Some(path) = &self.created
            && !self.written.load(Ordering::Relaxed)
            && std::fs::metadata(path).is_ok_and(|m| m.len() == 0)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Backup for FileBackup {
    fn write(&self, msgs: &[&DlqMessage]) -> Result<(), String> {
        let lines: Vec<ExportedMessage> = msgs
            .iter()
            .map(|m| ExportedMessage::new(m, &self.queue, &*self.backend))
            .collect();
        let mut w = self.writer.lock().map_err(|_| "backup lock poisoned".to_string())?;
        self.written.store(true, Ordering::Relaxed);
        w.append_batch(&lines).map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        self.writer
            .lock()
            .map(|w| w.path().display().to_string())
            .unwrap_or_default()
    }
}

/// The backup a dry run's purge would write: named in its plan, never
/// written (a dry run deletes nothing).
struct PlannedBackup(String);

impl Backup for PlannedBackup {
    fn write(&self, _: &[&DlqMessage]) -> Result<(), String> {
        Err("a dry run writes no backup".into())
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

pub struct PurgeRequest<'a> {
    pub filter: &'a str,
    pub older_than: Option<Duration>,
    pub dry_run: bool,
    /// The backup file; `None` purges without one.
    pub backup: Option<&'a Path>,
    pub max: Option<u64>,
    pub rate: Option<u32>,
    pub trigger: Trigger,
}

/// The filter a purge runs with: the user's, narrowed by `--older-than`.
/// The user's text keeps its line and columns (an error in it is reported
/// where they wrote it). One that holds `//` is closed on a line of its own:
/// a comment at its end would otherwise swallow the `)`. Others stay on one
/// line, as summaries and the journal show them.
pub fn purge_filter(filter: &str, older_than: Option<Duration>) -> String {
    let close = if filter.contains("//") { "\n)" } else { ")" };
    match older_than {
        // Whole seconds read best; a fraction is kept (in nanoseconds) rather
        // than cut, which would purge messages younger than asked.
        Some(d) if d.subsec_nanos() == 0 => format!("({filter}{close} && age > duration(\"{}s\")", d.as_secs()),
        Some(d) => format!("({filter}{close} && age > duration(\"{}ns\")", d.as_nanos()),
        None => filter.to_string(),
    }
}

/// Delete the messages of `queue` that match, each only after it was written
/// to the backup (when there is one), through the redrive engine: messages
/// that do not match stay leased until the pass ends and are then released.
/// With `progress`, the run counts into it as it goes (`serve` credits the
/// removals to the queue's arrivals while the purge runs).
pub async fn purge(
    registry: &Registry,
    queue: &str,
    req: &PurgeRequest<'_>,
    journal: Option<Arc<Journal>>,
    cancel: CancellationToken,
    progress: Option<Arc<Progress>>,
) -> Result<RunSummary, TriageError> {
    // The user's own filter first: wrapped, one that is never true or false
    // would compile (the `&&` is a bool) and fail on every older message.
    Filter::compile(req.filter)?;
    let filter = purge_filter(req.filter, req.older_than);
    let connect = async {
        let plan = registry
            .plan(
                queue,
                &RedriveRequest {
                    filter: Some(filter),
                    dry_run: req.dry_run,
                    rate: req.rate,
                    max: req.max,
                    ..Default::default()
                },
                req.trigger,
            )
            .await?;
        Ok((plan, registry.backend(queue).await?))
    };
    let (mut plan, backend) = unless_cancelled(&cancel, connect).await?;
    let backup: Option<Arc<dyn Backup>> = match req.backup {
        Some(path) if !req.dry_run => Some(Arc::new(FileBackup::create(path, queue, backend.clone())?)),
        // Named, not created: the dry run said "no backup" of a purge that
        // makes one.
        Some(path) => Some(Arc::new(PlannedBackup(path.display().to_string()))),
        None => None,
    };
    plan.action = Action::Discard { backup };
    let mut engine = Engine::new(backend).with_cancel(cancel);
    if let Some(j) = journal {
        engine = engine.with_journal(j);
    }
    if let Some(p) = progress {
        engine = engine.with_progress(p);
    }
    Ok(engine.run(&plan).await?)
}
