//! Retention: a queue's policy for messages past their age limit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::error::TriageError;
use super::purge::{PurgeRequest, purge};
use super::read::browse;
use crate::config::RetentionAction;
use crate::engine::journal::Journal;
use crate::engine::redrive::{Progress, RunSummary, Trigger};
use crate::engine::registry::Registry;

/// Expired messages a retention check lists by ID.
pub(super) const MAX_LISTED: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct ExpiredMessage {
    pub id: String,
    pub age_seconds: u64,
    pub reason: Option<String>,
}

/// What one application of a queue's retention policy found and did.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionOutcome {
    pub queue: String,
    pub max_age_seconds: u64,
    pub action: RetentionAction,
    pub dry_run: bool,
    /// Messages read to find the expired ones (alert and dry runs).
    pub read: u64,
    /// Expired messages: found (alert, dry run) or purged.
    pub expired: u64,
    /// The expired messages by ID (alert and dry runs; at most 1000).
    pub listed: Vec<ExpiredMessage>,
    /// Messages not read (alert and dry runs): held back by the provider
    /// (see [`super::ReadStats::held_back`]); some may be expired too.
    pub held_back: u64,
    /// The provider's limit on messages leased at once stopped the read
    /// (see [`super::ReadStats::hold_limited`]); some not read may be
    /// expired too.
    pub hold_limited: bool,
    /// The purge run (export-then-purge, not a dry run).
    pub purge: Option<RunSummary>,
    pub backup: Option<PathBuf>,
}

/// Apply `queue`'s retention policy once. An `alert` policy, or any policy
/// with `dry_run` (config or `force_dry_run`), only reads and lists the
/// expired messages; `export-then-purge` purges them through
/// [`purge`], backed up to `QUEUE-RUN.jsonl` in the export directory, counting
/// into `progress` (when given) as it goes.
#[allow(clippy::too_many_arguments)]
pub async fn apply_retention(
    registry: &Registry,
    queue: &str,
    force_dry_run: bool,
    default_dir: Option<&Path>,
    journal: Option<Arc<Journal>>,
    trigger: Trigger,
    cancel: CancellationToken,
    progress: Option<Arc<Progress>>,
) -> Result<RetentionOutcome, TriageError> {
    let qcfg = registry.queue(queue)?;
    let Some(r) = qcfg.retention.clone() else {
        return Err(TriageError::Usage(format!("queue {queue} has no retention policy")));
    };
    let dry_run = force_dry_run || r.dry_run;
    let mut out = RetentionOutcome {
        queue: queue.to_string(),
        max_age_seconds: r.max_age.as_secs(),
        action: r.action,
        dry_run,
        read: 0,
        expired: 0,
        listed: Vec::new(),
        held_back: 0,
        hold_limited: false,
        purge: None,
        backup: None,
    };
    if r.action == RetentionAction::Alert || dry_run {
        let backend = registry.backend(queue).await?;
        let now = Utc::now();
        let stats = browse(&backend, usize::MAX, registry.config().redrive.hold, &cancel, |m| {
            if let Some(age) = m.age(now).filter(|a| *a > r.max_age) {
                out.expired += 1;
                if out.listed.len() < MAX_LISTED {
                    out.listed.push(ExpiredMessage {
                        id: m.id.clone(),
                        age_seconds: age.as_secs(),
                        reason: m.reason.clone(),
                    });
                }
            }
            Ok(true)
        })
        .await?;
        out.read = stats.read;
        out.held_back = stats.held_back;
        out.hold_limited = stats.hold_limited;
        return Ok(out);
    }
    let dir = r
        .export_dir
        .clone()
        .or_else(|| default_dir.map(|d| d.join("retention")))
        .ok_or_else(|| TriageError::Usage(format!("queue {queue}: set retention.export_dir")))?;
    let path = dir.join(format!("{queue}-{}.jsonl", crate::engine::redrive::new_run_id()));
    let summary = purge(
        registry,
        queue,
        &PurgeRequest {
            filter: "true",
            older_than: Some(r.max_age),
            dry_run: false,
            backup: Some(&path),
            max: None,
            rate: None,
            trigger,
        },
        journal,
        cancel,
        progress,
    )
    .await?;
    out.expired = summary.settled;
    out.read = summary.examined;
    out.backup = Some(path);
    out.purge = Some(summary);
    Ok(out)
}
