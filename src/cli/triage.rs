//! `report`, `export`, `import`, `purge` and `retention`: the triage commands.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cli::exit::{self, Failure};
use crate::cli::signals;
use crate::config::{RetentionAction, state_dir};
use crate::engine::journal::Journal;
use crate::engine::redrive::{RunSummary, Trigger};
use crate::engine::registry::Registry;
use crate::engine::triage::{
    GroupBy, ImportRequest, ImportSummary, PurgeRequest, Report, ReportRequest, RetentionOutcome, TriageError,
    apply_retention, compile, export, import_checked, purge, read_note, report,
};
use crate::model::{preview, printable};
use crate::output::{Format, Table, destination_lines, human_age};

fn print_json<T: Serialize>(v: &T) -> Result<(), Failure> {
    outln!("{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

pub async fn cli_report(
    registry: &Registry,
    queue: &str,
    filter: Option<&str>,
    by: &str,
    top: usize,
    scan: usize,
    output: Format,
) -> Result<u8, Failure> {
    let by: GroupBy = by.parse().map_err(TriageError::Usage)?;
    compile(filter)?;
    let cancel = CancellationToken::new();
    let interrupt = signals::on_interrupt(cancel.clone(), "releasing what the read holds");
    let backend = match interrupt.unless_stopped(registry.backend(queue)).await {
        Ok(backend) => backend?,
        Err(code) => return Ok(code),
    };
    if let Some(note) = read_note(&*backend) {
        note!("{note}");
    }
    let r = report(registry, queue, &ReportRequest { by, filter, top, scan }, &cancel).await?;
    if let Some(code) = interrupt.exit_code() {
        return Ok(code);
    }
    match output {
        Format::Json => print_json(&r)?,
        Format::Table => out!("{}", report_table(&r))?,
    }
    if r.filter_errors > 0 {
        note!(
            "warning: the filter failed on {} (counted as no match)",
            crate::output::counted(r.filter_errors, "message")
        );
    }
    if let Some(note) = held_back_note(r.read, r.held_back, r.hold_limited) {
        note!("{note}");
    }
    Ok(exit::OK)
}

pub async fn cli_export(
    registry: &Registry,
    queue: &str,
    to: &Path,
    filter: Option<&str>,
    (max, scan): (Option<u64>, Option<usize>),
    output: Format,
) -> Result<u8, Failure> {
    compile(filter)?;
    let cancel = CancellationToken::new();
    let interrupt = signals::on_interrupt(cancel.clone(), "releasing what the read holds");
    let backend = match interrupt.unless_stopped(registry.backend(queue)).await {
        Ok(backend) => backend?,
        Err(code) => return Ok(code),
    };
    if let Some(note) = read_note(&*backend) {
        note!("{note}");
    }
    let s = export(registry, queue, to, filter, max, scan, &cancel).await?;
    if let Some(code) = interrupt.exit_code().filter(|_| s.interrupted) {
        note!("export interrupted: {} left as it was", s.file.display());
        return Ok(code);
    }
    // Exported to standard output: the summary goes to stderr, out of the
    // lines a pipe's reader imports.
    let summary = match output {
        Format::Json => serde_json::to_string_pretty(&s)?,
        Format::Table => {
            let mut text = format!(
                "exported {} of {} messages read from {} to {}",
                s.written,
                s.read,
                s.queue,
                s.file.display()
            );
            if s.capped {
                text.push_str("\n  the read stopped at its cap (--scan); the DLQ may hold more");
            }
            if s.filter_errors > 0 {
                text.push_str(&format!("\n  filter errors: {} (counted as no match)", s.filter_errors));
            }
            text
        }
    };
    if crate::engine::triage::to_stdout(to) {
        note!("{summary}");
    } else {
        outln!("{summary}")?;
    }
    if let Some(note) = held_back_note(s.read, s.held_back, s.hold_limited) {
        note!("{note}");
    }
    Ok(exit::OK)
}

pub async fn cli_import(
    registry: &Registry,
    req: &ImportRequest<'_>,
    checked: crate::engine::triage::CheckedImport,
    journal: Option<Arc<Journal>>,
    output: Format,
) -> Result<u8, Failure> {
    let cancel = CancellationToken::new();
    let interrupt = signals::on_interrupt(cancel.clone(), "finishing the batch in flight");
    let s = match import_checked(registry, req, checked, journal, cancel).await {
        Err(TriageError::StoppedConnecting) => return Ok(stopped_connecting(&interrupt)),
        s => s?,
    };
    match output {
        Format::Json => print_json(&s)?,
        Format::Table => out!("{}", import_text(&s))?,
    }
    Ok(match interrupt.exit_code() {
        Some(code) if s.interrupted => code,
        _ if s.ok() => exit::OK,
        _ => exit::FAILURE,
    })
}

pub async fn cli_purge(
    registry: &Registry,
    queue: &str,
    req: &PurgeRequest<'_>,
    journal: Option<Arc<Journal>>,
    output: Format,
) -> Result<u8, Failure> {
    let cancel = CancellationToken::new();
    let interrupt = signals::on_interrupt(cancel.clone(), "finishing the batches in flight, releasing the rest");
    let s = match purge(registry, queue, req, journal, cancel, None).await {
        Err(TriageError::StoppedConnecting) => return Ok(stopped_connecting(&interrupt)),
        s => s?,
    };
    match output {
        Format::Json => print_json(&s)?,
        Format::Table => out!("{}", purge_text(&s))?,
    }
    Ok(match interrupt.exit_code() {
        Some(code) => code,
        None if s.ok() => exit::OK,
        None => exit::FAILURE,
    })
}

/// The queues `retention` applies to: `queue`, or every queue with a
/// policy. Checked before the journal is opened or anything is asked.
pub fn retention_queues(registry: &Registry, queue: Option<&str>) -> Result<Vec<String>, Failure> {
    if let Some(q) = queue {
        registry.queue(q)?;
    }
    let names: Vec<String> = registry
        .config()
        .queues
        .iter()
        .filter(|q| q.retention.is_some() && queue.is_none_or(|n| n == q.name))
        .map(|q| q.name.clone())
        .collect();
    if names.is_empty() {
        return Err(TriageError::Usage(match queue {
            Some(q) => format!("queue {q} has no retention policy"),
            None => "no queue has a retention policy".into(),
        })
        .into());
    }
    Ok(names)
}

pub async fn cli_retention(
    registry: &Registry,
    names: Vec<String>,
    dry_run: bool,
    journal: Option<Arc<Journal>>,
    output: Format,
) -> Result<u8, Failure> {
    let default_dir = registry.config().serve.data_dir.clone().or_else(state_dir);
    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    // The worst outcome: a config problem (exit 2) outranks a failure (exit 1).
    let mut code = exit::OK;
    let cancel = CancellationToken::new();
    let interrupt = signals::on_interrupt(cancel.clone(), "finishing the batches in flight, releasing the rest");
    for name in &names {
        if cancel.is_cancelled() {
            break;
        }
        // Connected first (the registry keeps it) so that a signal while
        // connecting ends the run.
        let o = match interrupt.unless_stopped(registry.backend(name)).await {
            Err(_) => break,
            Ok(Err(e)) => Err(TriageError::from(e)),
            Ok(Ok(_)) => {
                apply_retention(
                    registry,
                    name,
                    dry_run,
                    default_dir.as_deref(),
                    journal.clone(),
                    Trigger::Cli,
                    cancel.clone(),
                    None,
                )
                .await
            }
        };
        match o {
            Ok(o) => {
                if o.purge.as_ref().is_some_and(|s| !s.ok()) {
                    code = code.max(exit::FAILURE);
                }
                outcomes.push(o);
            }
            Err(e) => {
                let text = e.to_string();
                let text = text
                    .strip_prefix(&format!("queue {name}: "))
                    .unwrap_or(&text)
                    .to_string();
                note!("error: queue {name}: retention failed: {text}");
                failed.push(serde_json::json!({ "queue": name, "error": text }));
                code = code.max(Failure::from(e).code);
            }
        }
    }
    match output {
        // A queue that failed is in the JSON too, with its error, as `list`
        // has it: a script could not tell which one failed.
        Format::Json => {
            let mut all: Vec<serde_json::Value> = outcomes
                .iter()
                .map(|o| serde_json::to_value(o).expect("outcomes serialize"))
                .collect();
            all.extend(failed);
            print_json(&all)?
        }
        Format::Table => {
            for o in &outcomes {
                out!("{}", retention_text(o))?;
            }
        }
    }
    Ok(interrupt.exit_code().unwrap_or(code))
}

fn stopped_connecting(interrupt: &signals::Interrupt) -> u8 {
    note!("{}", TriageError::StoppedConnecting);
    interrupt.exit_code().unwrap_or(exit::FAILURE)
}

fn held_back_note(read: u64, held_back: u64, hold_limited: bool) -> Option<String> {
    crate::engine::triage::ReadStats {
        read,
        held_back,
        hold_limited,
        ..Default::default()
    }
    .held_back_note()
}

fn report_table(r: &Report) -> String {
    let now = Utc::now();
    let mut t = Table::new(&[
        "COUNT",
        "SHARE",
        "FIRST",
        "LAST",
        "DELIVERIES",
        "SAMPLE ID",
        &r.by.to_uppercase(),
    ]);
    for g in r.groups.iter().chain(&r.other) {
        let age = |t: Option<DateTime<Utc>>| human_age(t.map(|t| (now - t).to_std().unwrap_or_default()));
        let deliveries = match (g.min_delivery_count, g.max_delivery_count) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "-".into(),
        };
        let key = if g.groups_folded > 0 {
            format!("other ({} groups)", g.groups_folded)
        } else {
            preview(&g.key, 100)
        };
        t.row(vec![
            g.count.to_string(),
            format!("{:.1}%", g.share * 100.0),
            age(g.first_enqueued_at),
            age(g.last_enqueued_at),
            deliveries,
            printable(&g.sample_id).into_owned(),
            key,
        ]);
    }
    let mut out = t.render();
    out.push_str(&format!(
        "{} grouped by {} ({} read{})\n",
        crate::output::counted(r.matched, "message"),
        r.by,
        r.read,
        if r.capped {
            "; the read stopped at --scan, the DLQ may hold more"
        } else {
            ""
        }
    ));
    out
}

fn import_text(s: &ImportSummary) -> String {
    let mut out = format!(
        "{} {} from {} into queue {} ({})\n",
        if s.dry_run { "import dry run" } else { "import" },
        s.run_id,
        s.file.display(),
        s.queue,
        s.backend,
    );
    out.push_str(&destination_lines(&s.destinations, s.dry_run, s.sent));
    out.push_str(&format!("  read:      {}\n  matched:   {}\n", s.read, s.matched));
    if !s.dry_run {
        out.push_str(&format!("  sent:      {}\n  failed:    {}\n", s.sent, s.failed));
    }
    if s.filter_errors > 0 {
        out.push_str(&format!("  filter errors: {}\n", s.filter_errors));
    }
    if s.already_imported > 0 {
        out.push_str(&format!(
            "  already imported: {} (the journal records an earlier import of each to the same destination; skipped, --again sends them)\n",
            s.already_imported
        ));
    }
    if s.held_for_order > 0 {
        out.push_str(&format!(
            "  held for order: {} (an earlier message of their ordering key failed; counted as failed)\n",
            s.held_for_order
        ));
    }
    for (name, n) in &s.stripped {
        out.push_str(&format!(
            "  stripped dead-letter attribute `{}`: {n} messages\n",
            printable(name)
        ));
    }
    if s.not_carried.is_empty() {
        out.push_str("  carried as is: bodies, attributes and their types\n");
    }
    for (what, n) in &s.not_carried {
        out.push_str(&format!("  not carried as is: {}: {n} messages\n", printable(what)));
    }
    out.push_str(&crate::output::error_lines(&s.errors));
    if let Some(n) = s.resume_line.filter(|_| !s.dry_run) {
        out.push_str(&format!(
            "  {}: lines {n} on were not sent; `tail -n +{n} {}` holds the rest\n",
            if s.interrupted { "interrupted" } else { "stopped" },
            s.file.display()
        ));
    }
    out
}

fn purge_text(s: &RunSummary) -> String {
    let mut out = format!(
        "{} {} of queue {} ({})\n  filter:    {}\n  examined:  {}\n  matched:   {}\n",
        if s.dry_run { "purge dry run" } else { "purge" },
        s.run_id,
        s.queue,
        s.stopped,
        s.filter,
        s.examined,
        s.matched
    );
    if !s.dry_run {
        out.push_str(&format!("  backed up: {}\n  deleted:   {}\n", s.sent, s.settled));
    }
    // Counted as `redrive`'s summary counts them: the errors listed below
    // stop at a few, the counts do not.
    for (label, n) in [
        ("backup failed", s.send_failed),
        ("delete failed", s.settle_failed),
        ("filter errors", s.filter_errors),
    ] {
        if n > 0 {
            out.push_str(&format!("  {label}: {n}\n"));
        }
    }
    // Matches handed to the backup (or to no backup), not deletions: those
    // are `deleted` above.
    for (to, n) in &s.destinations {
        let verb = if s.dry_run { "would be purged" } else { "planned" };
        out.push_str(&format!("  {n} {verb}, {to}\n"));
    }
    out.push_str(&crate::output::released_line(s, "deleted"));
    out.push_str(&crate::output::held_limit_line(s));
    crate::output::push_samples_and_errors(&mut out, s);
    out
}

fn retention_text(o: &RetentionOutcome) -> String {
    let action = match o.action {
        RetentionAction::Alert => "alert",
        RetentionAction::ExportThenPurge => "export-then-purge",
    };
    let age = human_age(Some(Duration::from_secs(o.max_age_seconds)));
    let mut out = format!("queue {}: retention max_age {age}, action {action}", o.queue);
    if o.dry_run {
        out.push_str(" (dry run)");
    }
    out.push('\n');
    match &o.purge {
        Some(s) => {
            // An empty backup file is removed: with nothing written there
            // is none to name.
            let backup = match &o.backup {
                Some(p) if s.sent > 0 => format!(", backed up to {}", p.display()),
                _ => String::new(),
            };
            out.push_str(&format!("  purged {} expired messages{backup}\n", s.settled));
            out.push_str(&crate::output::error_lines(&s.errors));
        }
        None => {
            let verb = if o.action == RetentionAction::ExportThenPurge {
                "would purge"
            } else {
                "expired"
            };
            out.push_str(&format!("  {verb} {} of {} messages read\n", o.expired, o.read));
            if let Some(note) = held_back_note(o.read, o.held_back, o.hold_limited) {
                out.push_str(&format!("  {note}\n"));
            }
            for m in &o.listed {
                out.push_str(&format!(
                    "    {}  age {}  reason={}\n",
                    printable(&m.id),
                    human_age(Some(Duration::from_secs(m.age_seconds))),
                    m.reason.as_deref().map_or("-".into(), printable)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A purge whose filter failed on messages said so only by listing the
    /// first few errors: the count, which `redrive`'s summary gives, was
    /// missing, and so were failed backups and deletes.
    #[test]
    fn a_purge_summary_counts_filter_errors_and_failures() {
        let now = Utc::now();
        let s = RunSummary {
            run_id: "r".into(),
            queue: "orders".into(),
            trigger: crate::engine::redrive::Trigger::Cli,
            action: "purge",
            filter: "int(attributes.n) > 1".into(),
            dry_run: false,
            started_at: now,
            finished_at: now,
            examined: 40,
            matched: 5,
            sent: 3,
            settled: 2,
            settled_from_journal: 0,
            resent_after_crash: 0,
            send_failed: 2,
            settle_failed: 1,
            filter_errors: 30,
            skipped_max_redrives: 0,
            held_for_order: 0,
            marks_omitted: 0,
            released: 38,
            destinations: Default::default(),
            samples: Vec::new(),
            errors: Vec::new(),
            stopped: crate::engine::redrive::StopReason::Drained,
            journal_error: None,
        };
        let text = purge_text(&s);
        for line in ["  backup failed: 2\n", "  delete failed: 1\n", "  filter errors: 30\n"] {
            assert!(text.contains(line), "{text}");
        }
        let clean = RunSummary {
            send_failed: 0,
            settle_failed: 0,
            filter_errors: 0,
            ..s
        };
        assert!(!purge_text(&clean).contains("failed"), "{}", purge_text(&clean));
    }

    /// An import's errors quote the IDs of the file's messages, exported
    /// from a DLQ: they reached the terminal with their escape sequences.
    #[test]
    fn an_import_summary_escapes_control_characters_in_its_errors() {
        let s = ImportSummary {
            run_id: "r".into(),
            action: "import",
            file: "f.jsonl".into(),
            queue: "orders".into(),
            backend: "servicebus".into(),
            destinations: Default::default(),
            dry_run: false,
            read: 1,
            matched: 1,
            sent: 0,
            failed: 1,
            filter_errors: 0,
            already_imported: 0,
            not_carried: [("property `n\x1b[2J` (a map)".to_string(), 1)].into_iter().collect(),
            stripped: [("n\x1b]0;pwned\x07".to_string(), 1)].into_iter().collect(),
            errors: vec!["line 1: message m-1\x1b]0;pwned\x07: send failed".into()],
            interrupted: false,
            stopped: crate::engine::triage::ImportStop::EndOfFile,
            held_for_order: 0,
            resume_line: None,
        };
        let text = import_text(&s);
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        assert!(
            text.contains(r"  error: line 1: message m-1\u{1b}]0;pwned\u{7}: send failed"),
            "{text}"
        );
    }

    /// A retention dry run lists the IDs and reasons of expired messages,
    /// which their senders chose.
    #[test]
    fn a_retention_listing_escapes_what_the_messages_hold() {
        let o = RetentionOutcome {
            queue: "orders".into(),
            max_age_seconds: 60,
            action: RetentionAction::ExportThenPurge,
            dry_run: true,
            read: 1,
            expired: 1,
            listed: vec![crate::engine::triage::ExpiredMessage {
                id: "m-1\u{202e}".into(),
                age_seconds: 120,
                reason: Some("\x1b[2J\x1b]0;pwned\x07FAKE: all good".into()),
            }],
            held_back: 0,
            hold_limited: false,
            purge: None,
            backup: None,
        };
        let text = retention_text(&o);
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        assert!(text.contains(r"m-1\u{202e}  age"), "{text}");
    }
}
