//! What the CLI prints: aligned tables for people, JSON for machines.
//!
//! Tables are hand-aligned rather than drawn with a table crate: the output is
//! a few fixed columns, and plain space-aligned text pipes well into grep,
//! awk and column.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::engine::redrive::{RunSummary, StopReason};
use crate::model::{Attributes, DlqMessage, DlqStats, Exactness, preview, printable};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// A table with a header row; columns are padded to their widest cell.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        // Counting characters misaligned every column after a cell with CJK
        // text or emoji, which a terminal shows two columns wide.
        let width = |c: &str| unicode_width::UnicodeWidthStr::width(c);
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(width(c));
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let last = r.len() - 1;
            for (i, c) in r.iter().enumerate() {
                out.push_str(c);
                if i < last {
                    out.extend(std::iter::repeat_n(' ', widths[i] - width(c) + 2));
                }
            }
            out.push('\n');
        }
        out
    }
}

pub fn human_age(d: Option<std::time::Duration>) -> String {
    let Some(d) = d else { return "-".into() };
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A queue as `list` shows it.
#[derive(Debug, Serialize)]
pub struct QueueRow {
    pub queue: String,
    pub backend: String,
    #[serde(flatten)]
    pub stats: Option<DlqStats>,
    /// Most frequent reasons in the sample, with counts.
    pub top_reasons: Vec<(String, u64)>,
    pub sampled: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exit code `error` calls for (a config problem or a failure).
    #[serde(skip)]
    pub error_code: u8,
}

pub fn queues_table(rows: &[QueueRow]) -> String {
    let mut t = Table::new(&["QUEUE", "BACKEND", "DEPTH", "OLDEST", "HOW", "TOP REASONS"]);
    for r in rows {
        let (depth, age, how) = match &r.stats {
            Some(s) => {
                let depth = match s.exactness {
                    Exactness::AtLeast => format!("{}+", s.depth),
                    _ => s.depth.to_string(),
                };
                let how = match s.oldest_age_exactness {
                    Some(age) if s.oldest_age.is_some() && age != s.exactness => format!("{}, age {age}", s.exactness),
                    _ => s.exactness.to_string(),
                };
                let age = match s.age_exactness() {
                    Exactness::AtLeast if s.oldest_age.is_some() => format!("{}+", human_age(s.oldest_age)),
                    _ => human_age(s.oldest_age),
                };
                (depth, age, how)
            }
            None => ("?".into(), "-".into(), "-".into()),
        };
        let reasons = match &r.error {
            // The QUEUE column names the queue; the whole error goes to stderr.
            Some(e) => {
                let e = e.strip_prefix(&format!("queue {}: ", r.queue)).unwrap_or(e);
                format!("error: {}", preview(e, 100))
            }
            None => r
                .top_reasons
                .iter()
                .map(|(reason, n)| format!("{} ({n})", preview(reason, 40)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        t.row(vec![r.queue.clone(), r.backend.clone(), depth, age, how, reasons]);
    }
    t.render()
}

/// A message as `inspect -o json` shows it: the body both exact (base64) and
/// readable (lossy UTF-8).
#[derive(Debug, Serialize)]
pub struct MessageView<'a> {
    pub id: &'a str,
    pub body_base64: String,
    pub body_text: String,
    pub body_bytes: usize,
    pub attributes: &'a Attributes,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: &'a BTreeMap<String, String>,
    pub reason: Option<&'a str>,
    pub description: Option<&'a str>,
    pub delivery_count: Option<u32>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub age_seconds: Option<u64>,
    pub source: Option<&'a str>,
    pub ordering_key: Option<&'a str>,
}

impl<'a> MessageView<'a> {
    pub fn new(m: &'a DlqMessage, now: DateTime<Utc>) -> Self {
        Self {
            id: &m.id,
            body_base64: base64::engine::general_purpose::STANDARD.encode(&m.body),
            body_text: m.body_text(),
            body_bytes: m.body.len(),
            attributes: &m.attributes,
            properties: &m.properties,
            reason: m.reason.as_deref(),
            description: m.description.as_deref(),
            delivery_count: m.delivery_count,
            enqueued_at: m.enqueued_at,
            age_seconds: m.age(now).map(|d| d.as_secs()),
            source: m.source.as_deref(),
            ordering_key: m.ordering_key.as_deref(),
        }
    }
}

pub fn messages_table(msgs: &[&DlqMessage], now: DateTime<Utc>) -> String {
    let mut t = Table::new(&["ID", "AGE", "DELIVERIES", "REASON", "ATTRIBUTES", "BODY"]);
    for m in msgs {
        let attrs = m
            .attributes
            .iter()
            .map(|(k, v)| format!("{k}={}", preview(&v.as_text(), 24)))
            .collect::<Vec<_>>()
            .join(" ");
        t.row(vec![
            printable(&m.id).into_owned(),
            human_age(m.age(now)),
            m.delivery_count.map_or("-".into(), |c| c.to_string()),
            preview(m.reason.as_deref().unwrap_or("-"), 32),
            preview(&attrs, 60),
            preview(&m.body_text(), 60),
        ]);
    }
    t.render()
}

pub fn summary_text(s: &RunSummary) -> String {
    let mut out = String::new();
    let verb = if s.dry_run { "dry run" } else { "redrive" };
    out.push_str(&format!(
        "{verb} {} of queue {} ({}, {:.1}s)\n",
        s.run_id,
        s.queue,
        s.stopped,
        (s.finished_at - s.started_at).num_milliseconds() as f64 / 1000.0
    ));
    out.push_str(&format!("  filter:    {}\n", s.filter));
    out.push_str(&format!("  examined:  {}\n", s.examined));
    out.push_str(&format!("  matched:   {}\n", s.matched));
    if !s.dry_run {
        out.push_str(&format!("  sent:      {}\n", s.sent));
        out.push_str(&format!("  settled:   {}\n", s.settled));
    }
    let extras = [
        ("settled from journal", s.settled_from_journal),
        ("resent after a crash (same redrive id)", s.resent_after_crash),
        ("send failed", s.send_failed),
        ("settle failed", s.settle_failed),
        ("filter errors", s.filter_errors),
        ("skipped (max_redrives)", s.skipped_max_redrives),
        ("held back behind a failed send of their group", s.held_for_order),
        ("sent without marks", s.marks_omitted),
    ];
    for (label, n) in extras {
        if n > 0 {
            out.push_str(&format!("  {label}: {n}\n"));
        }
    }
    out.push_str(&released_line(s, "sent"));
    out.push_str(&held_limit_line(s));
    out.push_str(&destination_lines(&s.destinations, s.dry_run, s.sent));
    push_samples_and_errors(&mut out, s);
    out
}

/// A line per destination. `destinations` counts the matches handed to each,
/// not the copies it confirmed: with one destination the run's `sent` is its own.
pub fn destination_lines(destinations: &BTreeMap<String, u64>, dry_run: bool, sent: u64) -> String {
    let mut out = String::new();
    for (dest, n) in destinations {
        if dry_run {
            out.push_str(&format!("  {n} would go to {dest}\n"));
        } else if destinations.len() == 1 {
            out.push_str(&format!("  {n} planned for {dest}, {sent} sent\n"));
        } else {
            out.push_str(&format!("  {n} planned for {dest}\n"));
        }
    }
    out
}

/// What `released` counts: the messages the pass leased and handed back
/// unchanged at its end (every one, in a dry run). Not what the DLQ holds
/// now: a pass stopped by `--max` or its deadline never leased the rest.
/// `moved` is what the action does to a match (`sent`, `deleted`).
pub fn released_line(s: &RunSummary, moved: &str) -> String {
    if s.dry_run {
        format!("  released:  {} (leased, then put back unchanged)\n", s.released)
    } else if s.settle_failed > 0 {
        format!(
            "  released:  {} (leased, then put back: not matched, not {moved}, or {moved} but not removed)\n",
            s.released
        )
    } else {
        format!(
            "  released:  {} (leased, then put back: not matched or not {moved})\n",
            s.released
        )
    }
}

/// Why a pass that stopped at the held limit did not see the whole DLQ.
pub fn held_limit_line(s: &RunSummary) -> String {
    if s.stopped != StopReason::HeldLimit {
        return String::new();
    }
    "  stopped leasing: the pass held as many messages as it may (redrive.max_held, or the provider's in-flight limit); messages past them were not examined. Narrow the filter, or raise redrive.max_held, and run again\n".into()
}

/// The closing lines every run summary shares: a dry run's sample of
/// matches, then the errors.
pub fn push_samples_and_errors(out: &mut String, s: &RunSummary) {
    if s.dry_run && !s.samples.is_empty() {
        out.push_str("  sample of matches:\n");
        for m in &s.samples {
            out.push_str(&format!(
                "    {}  reason={}\n",
                printable(&m.id),
                printable(m.reason.as_deref().unwrap_or("-"))
            ));
        }
    }
    out.push_str(&error_lines(&s.errors));
}

/// A run's errors, a line each. They quote message IDs (a Service Bus
/// sender picks its MessageId) and provider text, so control and
/// bidirectional formatting characters are escaped rather than sent to the
/// terminal.
pub fn error_lines(errors: &[String]) -> String {
    errors.iter().map(|e| format!("  error: {}\n", printable(e))).collect()
}

/// `n` and the noun, singular for one: "1 message", "3 messages".
pub fn counted(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["A", "BB"]);
        t.row(vec!["long".into(), "x".into()]);
        assert_eq!(t.render(), "A     BB\nlong  x\n");
    }

    #[test]
    fn wide_characters_keep_the_columns_aligned() {
        let mut t = Table::new(&["REASON", "BODY"]);
        t.row(vec!["注文タイムアウト".into(), "x".into()]);
        t.row(vec!["Timeout 🔥".into(), "y".into()]);
        t.row(vec!["e\u{301}tat".into(), "z".into()]);
        let text = t.render();
        let columns: Vec<usize> = text
            .lines()
            .map(|l| {
                let body = l.rfind(' ').unwrap() + 1;
                unicode_width::UnicodeWidthStr::width(&l[..body])
            })
            .collect();
        assert_eq!(columns, vec![18; 4], "{text}");
    }

    #[test]
    fn a_depth_that_is_a_floor_says_so() {
        let row = |depth, exactness| QueueRow {
            queue: "q".into(),
            backend: "servicebus".into(),
            stats: Some(DlqStats {
                depth,
                in_flight: None,
                oldest_age: None,
                exactness,
                oldest_age_exactness: None,
            }),
            top_reasons: Vec::new(),
            sampled: 0,
            error: None,
            error_code: 0,
        };
        let table = queues_table(&[row(1000, Exactness::AtLeast), row(7, Exactness::Exact)]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].contains("1000+") && lines[1].contains("at least"), "{table}");
        assert!(lines[2].contains(" 7 ") && lines[2].contains("exact"), "{table}");
        let json = serde_json::to_value(row(1000, Exactness::AtLeast)).unwrap();
        assert_eq!(
            (json["depth"].as_u64(), json["exactness"].as_str()),
            (Some(1000), Some("at_least"))
        );
    }

    fn summary(dry_run: bool, destinations: &[(&str, u64)], sent: u64) -> RunSummary {
        let now = Utc::now();
        RunSummary {
            run_id: "r".into(),
            queue: "orders".into(),
            trigger: crate::engine::redrive::Trigger::Cli,
            action: "redrive",
            filter: "true".into(),
            dry_run,
            started_at: now,
            finished_at: now,
            examined: 5,
            matched: 3,
            sent,
            settled: sent,
            settled_from_journal: 0,
            resent_after_crash: 0,
            send_failed: 3 - sent,
            settle_failed: 0,
            filter_errors: 0,
            skipped_max_redrives: 0,
            held_for_order: 0,
            marks_omitted: 0,
            released: 5 - sent,
            destinations: destinations.iter().map(|(d, n)| (d.to_string(), *n)).collect(),
            samples: Vec::new(),
            errors: Vec::new(),
            stopped: crate::engine::redrive::StopReason::Drained,
            journal_error: None,
        }
    }

    #[test]
    fn a_summary_says_what_was_planned_sent_and_released() {
        // A send that failed: the three matches were planned, none sent.
        let text = summary_text(&summary(false, &[("src", 3)], 0));
        assert!(text.contains("  3 planned for src, 0 sent\n"), "{text}");
        assert!(
            text.contains("  released:  5 (leased, then put back: not matched or not sent)\n"),
            "{text}"
        );
        assert!(!text.contains("left in DLQ"), "{text}");
        let text = summary_text(&summary(false, &[("a", 2), ("b", 1)], 3));
        assert!(
            text.contains("  2 planned for a\n") && text.contains("  1 planned for b\n"),
            "{text}"
        );
        // Sent, but the originals could not be removed: they are put back too.
        let mut failed_settles = summary(false, &[("src", 3)], 3);
        (
            failed_settles.settled,
            failed_settles.settle_failed,
            failed_settles.released,
        ) = (0, 3, 5);
        let text = summary_text(&failed_settles);
        assert!(
            text.contains("  released:  5 (leased, then put back: not matched, not sent, or sent but not removed)\n"),
            "{text}"
        );
        let text = summary_text(&summary(true, &[("src", 3)], 0));
        assert!(text.contains("  3 would go to src\n"), "{text}");
        assert!(text.contains("(leased, then put back unchanged)"), "{text}");
    }

    /// A Service Bus sender sets the MessageId, and a receiver the
    /// dead-letter reason: escape sequences in either reached the terminal
    /// raw from the inspect table and a dry run's sample and errors.
    #[test]
    fn message_ids_reasons_and_errors_reach_the_terminal_without_control_characters() {
        let evil = "m-1\x1b]0;pwned\x07\x1b[2J\r";
        let m = DlqMessage {
            id: evil.into(),
            body: bytes::Bytes::from_static(b"{}"),
            attributes: Attributes::new(),
            properties: Default::default(),
            reason: Some(format!("Timeout{evil}")),
            description: None,
            delivery_count: Some(1),
            enqueued_at: None,
            source: None,
            ordering_key: None,
        };
        let table = messages_table(&[&m], Utc::now());
        assert!(!table.chars().any(|c| c.is_control() && c != '\n'), "{table:?}");
        assert!(table.contains(r"m-1\u{1b}]0;pwned\u{7}\u{1b}[2J\u{d}"), "{table:?}");
        let mut s = summary(true, &[("src", 1)], 0);
        s.samples.push(crate::engine::redrive::Sample {
            id: m.id.clone(),
            reason: m.reason.clone(),
            destination: None,
        });
        s.errors.push(format!("filter on message {evil}: No such key: x"));
        let text = summary_text(&s);
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        assert!(text.contains(r"filter on message m-1\u{1b}]0;"), "{text}");
    }

    #[test]
    fn preview_is_one_line_and_bounded() {
        assert_eq!(preview("a\nb", 10), "a b");
        assert_eq!(preview("abcdef", 4), "abc…");
    }

    #[test]
    fn error_lines_escape_bidi_overrides() {
        let lines = error_lines(&["message \u{202E}1-dro\u{202C}: send failed\u{2067}".to_string()]);
        assert_eq!(
            lines,
            "  error: message \\u{202e}1-dro\\u{202c}: send failed\\u{2067}\n"
        );
    }

    #[test]
    fn counts_say_one_in_the_singular() {
        assert_eq!(counted(1u64, "message"), "1 message");
        assert_eq!(counted(0u64, "message"), "0 messages");
        assert_eq!(counted(6u64, "message"), "6 messages");
    }
}
