//! `list` and `inspect`: what the DLQs hold.

use std::collections::HashMap;

use anyhow::Context as _;
use chrono::Utc;

use tokio_util::sync::CancellationToken;

use super::exit::{self, Failure};
use super::signals;
use crate::engine::registry::Registry;
use crate::engine::triage::{DISPLAY_HOLD, first_matches};
use crate::filter::Filter;
use crate::model::DlqMessage;
use crate::output::{self, Format, MessageView, QueueRow};

pub(crate) async fn list(
    registry: &Registry,
    output: Format,
    fail_if_nonempty: bool,
    sample: usize,
) -> Result<u8, Failure> {
    let names: Vec<String> = registry.config().queues.iter().map(|q| q.name.clone()).collect();
    // A reason sample leases on SQS and Pub/Sub: on a signal each read stops
    // at its next message and releases what it holds.
    let cancel = CancellationToken::new();
    let interrupt = signals::on_interrupt(cancel.clone(), "releasing what the reads hold");
    // Queues are independent; poll them at once so one slow provider does not
    // serialise the rest.
    let rows = futures::future::join_all(names.iter().map(|name| queue_row(registry, name, sample, &interrupt))).await;
    if let Some(code) = interrupt.exit_code() {
        return Ok(code);
    }
    match output {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&rows)?)?,
        Format::Table => out!("{}", output::queues_table(&rows))?,
    }
    if rows.iter().any(|r| r.error.is_some()) {
        // The table cuts long cells; the whole error goes to stderr.
        for r in rows.iter().filter(|r| r.error.is_some()) {
            note!("error: {}", r.error.as_deref().unwrap_or_default());
        }
        // A config problem (exit 2) outranks a failure (exit 1): it needs fixing
        // whatever the backends do.
        return Ok(rows.iter().map(|r| r.error_code).max().unwrap_or(exit::FAILURE));
    }
    if fail_if_nonempty && rows.iter().any(|r| r.stats.as_ref().is_some_and(|s| s.depth > 0)) {
        return Ok(exit::NONEMPTY);
    }
    Ok(exit::OK)
}

async fn queue_row(registry: &Registry, name: &str, sample: usize, interrupt: &signals::Interrupt) -> QueueRow {
    let backend_name = registry
        .queue(name)
        .map(|q| q.kind.backend_name())
        .unwrap_or("?")
        .to_string();
    let mut row = QueueRow {
        queue: name.to_string(),
        backend: backend_name,
        stats: None,
        top_reasons: Vec::new(),
        sampled: 0,
        error: None,
        error_code: exit::OK,
    };
    let result: anyhow::Result<()> = async {
        // Connect errors name the queue already; the backend's own do not.
        let Some(backend) = interrupt.or_stopped(registry.backend(name)).await else {
            return Ok(());
        };
        let backend = backend?;
        let named = || format!("queue {name}");
        // Not cut short: a count that leases (the Pub/Sub emulator's) releases
        // what it leased when it ends.
        let mut stats = backend.stats().await.with_context(named)?;
        if sample > 0 && stats.depth > 0 {
            let mut msgs = Vec::new();
            backend
                .peek_each(sample, &mut |m| {
                    msgs.push(m);
                    !interrupt.stopped()
                })
                .await
                .with_context(named)?;
            row.sampled = msgs.len();
            let mut counts: HashMap<String, u64> = HashMap::new();
            for m in &msgs {
                *counts
                    .entry(m.reason.clone().unwrap_or_else(|| "(none)".into()))
                    .or_default() += 1;
            }
            let mut top: Vec<(String, u64)> = counts.into_iter().collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            top.truncate(3);
            row.top_reasons = top;
            let now = Utc::now();
            stats.take_whole_browse_age(msgs.len() as u64, msgs.iter().filter_map(|m| m.age(now)).max());
        }
        row.stats = Some(stats);
        Ok(())
    }
    .await;
    if let Err(e) = result {
        row.error = Some(format!("{e:#}"));
        row.error_code = exit::code_of(&e);
    }
    row
}

pub(crate) async fn inspect(
    registry: &Registry,
    queue: &str,
    filter: Option<&str>,
    limit: usize,
    scan: usize,
    output: Format,
) -> Result<u8, Failure> {
    let filtered = filter.is_some();
    let filter = match filter {
        Some(f) => Filter::compile(f)?,
        None => Filter::match_all(),
    };
    registry.queue(queue)?;
    let cancel = CancellationToken::new();
    let interrupt = signals::on_interrupt(cancel.clone(), "releasing what the read holds");
    let backend = match interrupt.unless_stopped(registry.backend(queue)).await {
        Ok(backend) => backend?,
        Err(code) => return Ok(code),
    };
    if !backend.capabilities().true_peek {
        note!(
            "note: {} has no true peek; inspecting leases and releases messages, which raises their delivery count",
            backend.kind()
        );
    }
    // Without a filter every message read is shown, so read --limit (and no
    // more: on SQS and Pub/Sub each one read gets its delivery count raised);
    // --scan bounds the search for a filter's matches only.
    let read = if filtered { scan } else { limit };
    let now = Utc::now();
    // Only the matches shown are kept: the rest are dropped as they are read.
    let got = first_matches(
        &backend,
        read,
        limit,
        usize::MAX,
        DISPLAY_HOLD,
        &cancel,
        |m| match filter.matches(m, now) {
            Ok(matched) => Some(matched),
            Err(e) => {
                tracing::debug!(id = %m.id, error = %e, "filter error");
                None
            }
        },
    )
    .await
    .with_context(|| format!("queue {queue}"))?;
    // A signal that came as the read's last message was being filtered (a
    // slow filter) stops it too: it said "interrupted", then printed the
    // table and exited 0.
    if let Some(code) = interrupt.exit_code() {
        return Ok(code);
    }
    let shown: Vec<&DlqMessage> = got.messages.iter().collect();
    let errors = got.filter_errors;
    match output {
        Format::Json => {
            let views: Vec<MessageView> = shown.iter().map(|m| MessageView::new(m, now)).collect();
            outln!("{}", serde_json::to_string_pretty(&views)?)?;
        }
        Format::Table => {
            out!("{}", output::messages_table(&shown, now))?;
            note!("{} shown, {} read", shown.len(), got.read);
        }
    }
    if errors > 0 {
        note!(
            "warning: the filter failed on {} (counted as no match); -vv shows why",
            crate::output::counted(errors as u64, "message")
        );
    }
    if let Some(note) = got.held_back_note() {
        note!("{note}");
    }
    if filtered && got.capped {
        note!("note: the read stopped at --scan {scan}; the DLQ may hold more matches (raise --scan)");
    }
    Ok(exit::OK)
}
