//! `report`: a DLQ's failures grouped by pattern, reason or attribute.

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::error::TriageError;
use super::patterns::{Group, GroupBy, Grouper};
use super::read::{browse, compile};
use crate::engine::registry::Registry;

/// Groups shown by default; the rest are folded into `other`.
pub const DEFAULT_TOP: usize = 10;
/// Messages a report reads by default (`--scan`).
pub const DEFAULT_SCAN: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub queue: String,
    pub backend: String,
    pub by: String,
    pub filter: String,
    /// Messages read; only these are grouped.
    pub read: u64,
    /// Messages that matched the filter and were grouped.
    pub matched: u64,
    pub filter_errors: u64,
    /// The read stopped at `--scan`: the DLQ may hold more than was grouped.
    pub capped: bool,
    pub true_peek: bool,
    /// Messages not read: held back by the provider (see [`super::ReadStats::held_back`]).
    pub held_back: u64,
    /// The provider's limit on messages leased at once stopped the read
    /// (see [`super::ReadStats::hold_limited`]).
    pub hold_limited: bool,
    /// Stopped by an interrupt: only what was read before is grouped.
    pub interrupted: bool,
    pub groups: Vec<Group>,
    /// Everything past the top N, folded.
    pub other: Option<Group>,
}

pub struct ReportRequest<'a> {
    pub by: GroupBy,
    pub filter: Option<&'a str>,
    pub top: usize,
    pub scan: usize,
}

pub async fn report(
    registry: &Registry,
    queue: &str,
    req: &ReportRequest<'_>,
    cancel: &CancellationToken,
) -> Result<Report, TriageError> {
    let filter = compile(req.filter)?;
    let backend = registry.backend(queue).await?;
    let mut grouper = Grouper::new(req.by.clone());
    let mut errors = 0;
    let now = Utc::now();
    let stats = browse(&backend, req.scan.max(1), registry.config().redrive.hold, cancel, |m| {
        match filter.matches(m, now) {
            Ok(true) => grouper.add(m),
            Ok(false) => {}
            Err(e) => {
                errors += 1;
                tracing::debug!(id = %m.id, error = %e, "filter error");
            }
        }
        Ok(true)
    })
    .await?;
    let matched = grouper.total();
    let (groups, other) = grouper.finish(req.top.max(1));
    Ok(Report {
        queue: queue.to_string(),
        backend: backend.kind().to_string(),
        by: req.by.to_string(),
        filter: filter.source().to_string(),
        read: stats.read,
        matched,
        filter_errors: errors,
        capped: stats.capped,
        true_peek: stats.true_peek,
        held_back: stats.held_back,
        hold_limited: stats.hold_limited,
        interrupted: stats.interrupted,
        groups,
        other,
    })
}
