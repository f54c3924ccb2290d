//! Triage: group a DLQ's failures by pattern (`report`), copy messages to a
//! file and back (`export`, `import`), discard them with a backup and an
//! audit record (`purge`), and the per-queue retention policy.
//!
//! Reading for reports and exports disturbs the DLQ as little as the provider
//! allows (DESIGN §3, guarantee 8): Service Bus browses with a true peek; SQS
//! and Pub/Sub have none, so messages are leased batch by batch, examined, and
//! released together at the end, which raises their delivery counts. A purge is
//! a run of the redrive engine with [`Action::Discard`]: the same leases,
//! seen-set, limits and release discipline as a redrive, but each matching
//! message is written to the backup file (fsynced) before it is settled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, QueueBackend};
use crate::cli::{Failure, exit};
use crate::config::RetentionAction;
use crate::filter::{Filter, FilterError};
use crate::journal::{Journal, JournalError, Record};
use crate::model::{AttrValue, Attributes, Destination, DlqMessage, Outgoing, Properties, SendResult};
use crate::output::{Format, Table, human_age, preview};
use crate::redrive::{Action, Backup, Engine, RedriveError, RunSummary, Trigger, outgoing_copy};
use crate::registry::{RedriveRequest, Registry, RegistryError};

/// Groups shown by default; the rest are folded into `other`.
pub const DEFAULT_TOP: usize = 10;
/// Messages a report reads by default (`--scan`).
pub const DEFAULT_SCAN: usize = 1000;
/// Messages an export reads at most on a provider with a true peek (Service
/// Bus), where the whole read is one browse held in memory; `--max` sets it.
pub const DEFAULT_PEEK_CAP: usize = 10_000;
/// Distinct keys a report tracks; keys beyond it count towards `other`, so
/// memory stays bounded whatever the DLQ holds.
const MAX_TRACKED_GROUPS: usize = 10_000;
/// Longest group key kept (patterns of huge descriptions are cut).
const MAX_KEY_CHARS: usize = 200;
/// Consecutive leases that bring nothing new before a browse stops.
const ALL_SEEN_LIMIT: u32 = 3;
/// Expired messages a retention check lists by ID.
const MAX_LISTED: usize = 1000;
/// Characters of a body kept as the readable preview in an export line.
const PREVIEW_CHARS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Redrive(#[from] RedriveError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: not an export line: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// Something the user can fix in their input (exit code 2).
    #[error("{0}")]
    Usage(String),
}

impl TriageError {
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Registry(e) => e.is_usage(),
            Self::Filter(_) | Self::Usage(_) | Self::BadLine { .. } => true,
            _ => false,
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TriageError + '_ {
    move |source| TriageError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Patterns

/// Normalise failure text so that messages failing the same way group
/// together: quoted values become `<str>`, UUIDs `<uuid>`, hex strings
/// (`0x…`, or 8+ hex characters mixing digits and letters) `<hex>`, and numbers
/// `<n>`. Only whole tokens are replaced: a number must start a word (so
/// `3000ms` becomes `<n>ms` and `ord-17` `ord-<n>`, but `http2` and `s3` stay),
/// and an apostrophe inside a word (`can't`) is not a quote.
pub fn normalize(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at_start = i == 0 || !word(chars[i - 1]);
        if at_start && matches!(c, '"' | '\'' | '`') {
            if let Some(len) = chars[i + 1..].iter().position(|&d| d == c) {
                let close = i + 1 + len;
                if chars.get(close + 1).is_none_or(|&n| !word(n)) {
                    out.push_str("<str>");
                    i = close + 1;
                    continue;
                }
            }
            out.push(c);
            i += 1;
            continue;
        }
        if at_start && word(c) {
            if is_uuid_at(&chars[i..]) {
                out.push_str("<uuid>");
                i += 36;
                continue;
            }
            let end = (i..chars.len()).find(|&j| !word(chars[j])).unwrap_or(chars.len());
            let token = &chars[i..end];
            if is_hex_token(token) {
                out.push_str("<hex>");
                i = end;
                continue;
            }
            if c.is_ascii_digit() {
                let mut j = i;
                while j < chars.len() && chars[j].is_ascii_digit() {
                    j += 1;
                }
                if j + 1 < chars.len() && chars[j] == '.' && chars[j + 1].is_ascii_digit() {
                    j += 1;
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                }
                out.push_str("<n>");
                // A unit suffix (`ms`, `kb`) stays as it is.
                if j < end {
                    out.extend(&chars[j..end]);
                }
                i = j.max(end);
                continue;
            }
            out.extend(token);
            i = end;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

fn is_uuid_at(chars: &[char]) -> bool {
    if chars.len() < 36 || chars.get(36).is_some_and(|c| c.is_alphanumeric() || *c == '_') {
        return false;
    }
    chars[..36].iter().enumerate().all(|(k, c)| match k {
        8 | 13 | 18 | 23 => *c == '-',
        _ => c.is_ascii_hexdigit(),
    })
}

fn is_hex_token(token: &[char]) -> bool {
    if token.len() > 2 && token[0] == '0' && matches!(token[1], 'x' | 'X') {
        return token[2..].iter().all(char::is_ascii_hexdigit);
    }
    token.len() >= 8
        && token.iter().all(char::is_ascii_hexdigit)
        && token.iter().any(char::is_ascii_digit)
        && token.iter().any(char::is_ascii_alphabetic)
}

/// A message's failure pattern: its normalised reason and description
/// (`Timeout: payment gateway timed out after <n> ms`), or `(none)`.
pub fn pattern_of(m: &DlqMessage) -> String {
    let key = match (m.reason.as_deref(), m.description.as_deref()) {
        (Some(r), Some(d)) => format!("{}: {}", normalize(r), normalize(d)),
        (Some(t), None) | (None, Some(t)) => normalize(t),
        (None, None) => "(none)".into(),
    };
    preview(&key, MAX_KEY_CHARS)
}

// ---------------------------------------------------------------------------
// Grouping

/// What a report groups by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Reason,
    /// The value of one attribute (as text); `(unset)` when a message lacks it.
    Attribute(String),
    Source,
    Pattern,
}

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "reason" => Ok(Self::Reason),
            "source" => Ok(Self::Source),
            "pattern" => Ok(Self::Pattern),
            other => match other.strip_prefix("attribute:") {
                Some(name) if !name.is_empty() => Ok(Self::Attribute(name.to_string())),
                _ => Err(format!(
                    "cannot group by `{other}`: use reason, source, pattern or attribute:NAME"
                )),
            },
        }
    }
}

impl std::fmt::Display for GroupBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reason => f.write_str("reason"),
            Self::Attribute(n) => write!(f, "attribute:{n}"),
            Self::Source => f.write_str("source"),
            Self::Pattern => f.write_str("pattern"),
        }
    }
}

impl GroupBy {
    pub fn key(&self, m: &DlqMessage) -> String {
        let key = match self {
            Self::Reason => m.reason.clone().unwrap_or_else(|| "(none)".into()),
            Self::Attribute(name) => m
                .attributes
                .get(name)
                .map(|a| a.as_text())
                .unwrap_or_else(|| "(unset)".into()),
            Self::Source => m.source.clone().unwrap_or_else(|| "(unknown)".into()),
            Self::Pattern => return pattern_of(m),
        };
        preview(&key, MAX_KEY_CHARS)
    }
}

/// One group of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub key: String,
    pub count: u64,
    /// `count` over the messages grouped (0..=1).
    pub share: f64,
    pub first_enqueued_at: Option<DateTime<Utc>>,
    pub last_enqueued_at: Option<DateTime<Utc>>,
    pub min_delivery_count: Option<u32>,
    pub max_delivery_count: Option<u32>,
    /// One message of the group, to inspect.
    pub sample_id: String,
    /// For `other`: how many distinct groups it folds together.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub groups_folded: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn min_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Group {
    fn new(key: String, m: &DlqMessage) -> Self {
        Self {
            key,
            count: 1,
            share: 0.0,
            first_enqueued_at: m.enqueued_at,
            last_enqueued_at: m.enqueued_at,
            min_delivery_count: m.delivery_count,
            max_delivery_count: m.delivery_count,
            sample_id: m.id.clone(),
            groups_folded: 0,
        }
    }

    fn add(&mut self, m: &DlqMessage) {
        self.count += 1;
        self.first_enqueued_at = min_opt(self.first_enqueued_at, m.enqueued_at);
        self.last_enqueued_at = max_opt(self.last_enqueued_at, m.enqueued_at);
        self.min_delivery_count = min_opt(self.min_delivery_count, m.delivery_count);
        self.max_delivery_count = max_opt(self.max_delivery_count, m.delivery_count);
    }

    fn merge(&mut self, g: &Group) {
        self.count += g.count;
        self.first_enqueued_at = min_opt(self.first_enqueued_at, g.first_enqueued_at);
        self.last_enqueued_at = max_opt(self.last_enqueued_at, g.last_enqueued_at);
        self.min_delivery_count = min_opt(self.min_delivery_count, g.min_delivery_count);
        self.max_delivery_count = max_opt(self.max_delivery_count, g.max_delivery_count);
        self.groups_folded += g.groups_folded.max(1);
    }
}

/// Accumulates groups message by message, in bounded memory.
pub struct Grouper {
    by: GroupBy,
    groups: HashMap<String, Group>,
    /// Messages whose key arrived after MAX_TRACKED_GROUPS distinct keys.
    overflow: Option<Group>,
    total: u64,
}

impl Grouper {
    pub fn new(by: GroupBy) -> Self {
        Self {
            by,
            groups: HashMap::new(),
            overflow: None,
            total: 0,
        }
    }

    pub fn add(&mut self, m: &DlqMessage) {
        self.total += 1;
        let key = self.by.key(m);
        if let Some(g) = self.groups.get_mut(&key) {
            g.add(m);
        } else if self.groups.len() < MAX_TRACKED_GROUPS {
            self.groups.insert(key.clone(), Group::new(key, m));
        } else {
            match &mut self.overflow {
                Some(o) => o.add(m),
                None => {
                    let mut o = Group::new("other".into(), m);
                    o.groups_folded = 1;
                    self.overflow = Some(o);
                }
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The `top` largest groups (count, then key), and the rest folded into
    /// one `other` group.
    pub fn finish(self, top: usize) -> (Vec<Group>, Option<Group>) {
        let mut all: Vec<Group> = self.groups.into_values().collect();
        all.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        let rest = if all.len() > top {
            all.split_off(top)
        } else {
            Vec::new()
        };
        let mut other = self.overflow;
        for g in &rest {
            match &mut other {
                Some(o) => o.merge(g),
                None => {
                    let mut o = g.clone();
                    o.key = "other".into();
                    o.groups_folded = 1;
                    other = Some(o);
                }
            }
        }
        let total = self.total.max(1) as f64;
        for g in all.iter_mut().chain(other.iter_mut()) {
            g.share = g.count as f64 / total;
        }
        (all, other)
    }
}

/// Group messages already read (the poller's sample): `(key, count)`, most
/// frequent first, the rest summed as `other`.
pub fn top_counts(msgs: &[DlqMessage], by: &GroupBy, top: usize) -> Vec<(String, u64)> {
    let mut g = Grouper::new(by.clone());
    for m in msgs {
        g.add(m);
    }
    let (groups, other) = g.finish(top);
    groups.into_iter().chain(other).map(|g| (g.key, g.count)).collect()
}

// ---------------------------------------------------------------------------
// Reading

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
}

/// Read up to `max` messages, handing each to `each` once, as it arrives;
/// `each` returns false to stop early. With a true peek this is one browse;
/// otherwise messages are leased batch by batch (hidden for `hold`), kept
/// leased so that the same message does not come back, and released together
/// at the end, whatever happens. Memory holds the lease handles and IDs, not
/// the messages.
pub async fn browse<F>(
    backend: &dyn QueueBackend,
    max: usize,
    hold: Duration,
    mut each: F,
) -> Result<ReadStats, TriageError>
where
    F: FnMut(&DlqMessage) -> Result<bool, TriageError>,
{
    let caps = backend.capabilities();
    let mut stats = ReadStats {
        true_peek: caps.true_peek,
        ..Default::default()
    };
    if caps.true_peek {
        let msgs = backend.peek(max).await?;
        stats.capped = msgs.len() >= max;
        for m in &msgs {
            stats.read += 1;
            if !each(m)? {
                break;
            }
        }
        return Ok(stats);
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut held = Vec::new();
    let mut streak = 0;
    let result: Result<(), TriageError> = async {
        loop {
            let want = max.saturating_sub(stats.read as usize).min(caps.batch_size);
            if want == 0 {
                stats.capped = true;
                return Ok(());
            }
            let batch = backend.lease(want, hold).await?;
            if batch.is_empty() {
                return Ok(());
            }
            let mut fresh = 0;
            let mut stop = false;
            for l in batch {
                held.push(l.lease);
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
    let released = backend.release(&held).await;
    result?;
    released?;
    Ok(stats)
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

fn compile(filter: Option<&str>) -> Result<Filter, FilterError> {
    match filter.filter(|f| !f.trim().is_empty()) {
        Some(f) => Filter::compile(f),
        None => Ok(Filter::match_all()),
    }
}

// ---------------------------------------------------------------------------
// Report

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

pub async fn report(registry: &Registry, queue: &str, req: &ReportRequest<'_>) -> Result<Report, TriageError> {
    let filter = compile(req.filter)?;
    let backend = registry.backend(queue).await?;
    let mut grouper = Grouper::new(req.by.clone());
    let mut errors = 0;
    let now = Utc::now();
    let stats = browse(&*backend, req.scan.max(1), registry.config().redrive.hold, |m| {
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
        groups,
        other,
    })
}

pub fn report_table(r: &Report) -> String {
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
            g.sample_id.clone(),
            key,
        ]);
    }
    let mut out = t.render();
    out.push_str(&format!(
        "{} messages grouped by {} ({} read{})\n",
        r.matched,
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

// ---------------------------------------------------------------------------
// Export format

/// One line of an export (and of a purge backup): the message, exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedMessage {
    /// The configured queue it was read from, and that queue's backend.
    pub queue: String,
    pub backend: String,
    pub id: String,
    /// The body, exact.
    pub body_base64: String,
    /// The body as lossy UTF-8, cut to 512 characters: for people and grep.
    pub body_preview: String,
    pub body_bytes: usize,
    /// Typed attributes (`{"type": "number", "value": "…", "data_type": …}`).
    pub attributes: Attributes,
    #[serde(default, skip_serializing_if = "Properties::is_empty")]
    pub properties: Properties,
    pub reason: Option<String>,
    pub description: Option<String>,
    pub delivery_count: Option<u32>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub source: Option<String>,
    pub ordering_key: Option<String>,
    /// Attributes the provider added when it dead-lettered the message;
    /// `import` strips them (with `redrive.strip_dead_letter_attributes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provider_attributes: Vec<String>,
    pub exported_at: DateTime<Utc>,
}

impl ExportedMessage {
    pub fn new(m: &DlqMessage, queue: &str, backend: &dyn QueueBackend) -> Self {
        Self {
            queue: queue.to_string(),
            backend: backend.kind().to_string(),
            id: m.id.clone(),
            body_base64: base64::engine::general_purpose::STANDARD.encode(&m.body),
            body_preview: m.body_text().chars().take(PREVIEW_CHARS).collect(),
            body_bytes: m.body.len(),
            attributes: m.attributes.clone(),
            properties: m.properties.clone(),
            reason: m.reason.clone(),
            description: m.description.clone(),
            delivery_count: m.delivery_count,
            enqueued_at: m.enqueued_at,
            source: m.source.clone(),
            ordering_key: m.ordering_key.clone(),
            provider_attributes: m
                .attributes
                .keys()
                .filter(|k| backend.is_dead_letter_attribute(k))
                .cloned()
                .collect(),
            exported_at: Utc::now(),
        }
    }

    pub fn to_message(&self) -> Result<DlqMessage, String> {
        let body = base64::engine::general_purpose::STANDARD
            .decode(&self.body_base64)
            .map_err(|e| format!("body_base64: {e}"))?;
        Ok(DlqMessage {
            id: self.id.clone(),
            body: Bytes::from(body),
            attributes: self.attributes.clone(),
            properties: self.properties.clone(),
            reason: self.reason.clone(),
            description: self.description.clone(),
            delivery_count: self.delivery_count,
            enqueued_at: self.enqueued_at,
            source: self.source.clone(),
            ordering_key: self.ordering_key.clone(),
        })
    }
}

/// Writes export lines to a file as they come.
pub struct ExportWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl ExportWriter {
    /// Create (or truncate) `path`; with `append`, add to it instead.
    pub fn create(path: &Path, append: bool) -> Result<Self, TriageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(path))?;
        }
        let mut opts = OpenOptions::new();
        opts.create(true);
        if append {
            opts.append(true);
        } else {
            opts.write(true).truncate(true);
        }
        let file = opts.open(path).map_err(io_err(path))?;
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, line: &ExportedMessage) -> Result<(), TriageError> {
        let mut bytes = serde_json::to_vec(line).expect("export lines serialize");
        bytes.push(b'\n');
        self.out.write_all(&bytes).map_err(io_err(&self.path))
    }

    /// Flush and fsync: what was written survives a crash.
    pub fn sync(&mut self) -> Result<(), TriageError> {
        self.out.flush().map_err(io_err(&self.path))?;
        self.out.get_ref().sync_data().map_err(io_err(&self.path))
    }
}

/// Read an export file line by line (one line in memory at a time).
pub fn read_export(path: &Path) -> Result<impl Iterator<Item = Result<ExportedMessage, TriageError>>, TriageError> {
    let file = File::open(path).map_err(io_err(path))?;
    let path = path.to_owned();
    Ok(BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(move |(i, line)| {
            let line = line.map_err(io_err(&path))?;
            serde_json::from_str(&line).map_err(|e| TriageError::BadLine {
                path: path.clone(),
                line: i + 1,
                message: e.to_string(),
            })
        }))
}

// ---------------------------------------------------------------------------
// Export

#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub queue: String,
    pub file: PathBuf,
    pub read: u64,
    pub written: u64,
    pub filter_errors: u64,
    pub capped: bool,
    pub true_peek: bool,
}

/// Write every message of `queue` matching `filter` to `path`, one JSON line
/// each, as it is read. `max` caps the lines written (and, on a provider with
/// a true peek, the messages browsed: [`DEFAULT_PEEK_CAP`] by default).
pub async fn export(
    registry: &Registry,
    queue: &str,
    path: &Path,
    filter: Option<&str>,
    max: Option<u64>,
) -> Result<ExportSummary, TriageError> {
    let filter = compile(filter)?;
    let backend = registry.backend(queue).await?;
    let mut writer = ExportWriter::create(path, false)?;
    let read_cap = match (backend.capabilities().true_peek, max) {
        (true, Some(m)) => m as usize,
        (true, None) => DEFAULT_PEEK_CAP,
        (false, _) => usize::MAX,
    };
    let mut written = 0u64;
    let mut errors = 0u64;
    let now = Utc::now();
    let stats = browse(&*backend, read_cap, registry.config().redrive.hold, |m| {
        if max.is_some_and(|cap| written >= cap) {
            return Ok(false);
        }
        match filter.matches(m, now) {
            Ok(true) => {
                writer.write(&ExportedMessage::new(m, queue, &*backend))?;
                written += 1;
            }
            Ok(false) => {}
            Err(e) => {
                errors += 1;
                tracing::debug!(id = %m.id, error = %e, "filter error");
            }
        }
        Ok(max.is_none_or(|cap| written < cap))
    })
    .await?;
    writer.sync()?;
    Ok(ExportSummary {
        queue: queue.to_string(),
        file: path.to_owned(),
        read: stats.read,
        written,
        filter_errors: errors,
        capped: stats.capped && max.is_none_or(|cap| written < cap),
        true_peek: stats.true_peek,
    })
}

// ---------------------------------------------------------------------------
// Import

pub struct ImportRequest<'a> {
    pub file: &'a Path,
    /// A configured queue: copies go to its source entity (the queue's
    /// `source`, else what its provider reports), or to `address`.
    pub to: &'a str,
    /// A provider-native address on `to`'s backend, instead of its source.
    pub address: Option<&'a str>,
    pub filter: Option<&'a str>,
    pub rate: Option<u32>,
    pub max: Option<u64>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportSummary {
    pub run_id: String,
    pub file: PathBuf,
    pub queue: String,
    pub backend: String,
    /// Destination address → messages sent there (planned, in a dry run).
    pub destinations: BTreeMap<String, u64>,
    pub dry_run: bool,
    pub read: u64,
    pub matched: u64,
    pub sent: u64,
    pub failed: u64,
    pub filter_errors: u64,
    /// What the destination could not carry as it was, and for how many messages.
    pub not_carried: BTreeMap<String, u64>,
    /// Provider dead-letter attributes stripped from the copies.
    pub stripped: BTreeMap<String, u64>,
    pub errors: Vec<String>,
}

impl ImportSummary {
    pub fn ok(&self) -> bool {
        self.failed == 0
    }
}

/// What `backend` cannot carry of `o` exactly as it is (the documented
/// mapping, README "Triage").
pub fn not_carried(o: &Outgoing, backend: &dyn QueueBackend, dest: &Destination) -> Vec<String> {
    let caps = backend.capabilities();
    let kind = backend.kind();
    let mut out = Vec::new();
    for (name, a) in &o.attributes {
        if name == crate::redrive::MARK_ID || name == crate::redrive::MARK_COUNT {
            // dlq-bridge's own marks: text wherever they go, by design.
            continue;
        }
        let typed = !matches!(a.value, AttrValue::String(_)) || a.data_type.is_some();
        if !caps.typed_attributes && typed {
            let ty = match &a.value {
                AttrValue::Binary(_) => "binary, sent as base64 text".to_string(),
                v => format!(
                    "{}, sent as text",
                    serde_json::to_value(v)
                        .ok()
                        .and_then(|j| j["type"].as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            };
            out.push(format!("attribute `{name}`: {ty} ({kind} attributes are strings)"));
        } else if kind == "sqs" {
            let label = match a.value {
                AttrValue::Bool(_) => Some("String.bool"),
                AttrValue::Int(_) => Some("Number.int"),
                AttrValue::Float(_) => Some("Number.float"),
                AttrValue::Timestamp(_) => Some("String.timestamp"),
                AttrValue::Uuid(_) => Some("String.uuid"),
                _ => None,
            };
            if let Some(label) = label {
                out.push(format!("attribute `{name}`: typed value sent as SQS {label}"));
            }
        }
    }
    if kind != "servicebus" && !o.properties.is_empty() {
        let names: Vec<&str> = o.properties.keys().map(String::as_str).collect();
        out.push(format!("message properties {} ({kind} has none)", names.join(", ")));
    }
    if kind == "sqs" && o.ordering_key.is_some() && !dest.0.ends_with(".fifo") {
        out.push("ordering key (a standard SQS queue has no message groups)".into());
    }
    if let Some(cap) = caps.max_attributes
        && o.attributes.len() > cap
    {
        out.push(format!(
            "{} attributes, more than {kind}'s {cap}: the send fails",
            o.attributes.len()
        ));
    }
    if !caps.binary_body && std::str::from_utf8(&o.body).is_err() {
        out.push(format!("a binary body ({kind} bodies are text): the send fails"));
    }
    if o.body.len() > caps.max_body_bytes {
        out.push(format!("a body over {} bytes: the send fails", caps.max_body_bytes));
    }
    out
}

/// Replay an export into the configured queue `to` (its source entity, or
/// `address`), converting attributes with the documented mapping. Copies are
/// marked like redriven ones (guarantee 3) and journaled as `imported`.
pub async fn import(
    registry: &Registry,
    req: &ImportRequest<'_>,
    journal: Option<Arc<Journal>>,
    cancel: CancellationToken,
) -> Result<ImportSummary, TriageError> {
    let filter = compile(req.filter)?;
    let lines = read_export(req.file)?;
    let plan = registry
        .plan(
            req.to,
            &RedriveRequest {
                to: req.address.map(str::to_string),
                dry_run: req.dry_run,
                ..Default::default()
            },
            Trigger::Cli,
        )
        .await?;
    let configured = plan.to.clone().or_else(|| plan.fallback_source.clone());
    let backend = registry.backend(req.to).await?;
    let caps = backend.capabilities();
    let limiter = req
        .rate
        .and_then(NonZeroU32::new)
        .map(|r| RateLimiter::direct(Quota::per_second(r)));
    let mut s = ImportSummary {
        run_id: plan.run_id.clone(),
        file: req.file.to_owned(),
        queue: req.to.to_string(),
        backend: backend.kind().to_string(),
        destinations: BTreeMap::new(),
        dry_run: req.dry_run,
        read: 0,
        matched: 0,
        sent: 0,
        failed: 0,
        filter_errors: 0,
        not_carried: BTreeMap::new(),
        stripped: BTreeMap::new(),
        errors: Vec::new(),
    };
    let record = |r: Record| {
        if let Some(j) = &journal { j.append(&r) } else { Ok(()) }
    };
    if !req.dry_run {
        record(Record::RunStarted {
            run: plan.run_id.clone(),
            at: Utc::now(),
            queue: req.to.to_string(),
            trigger: format!("import {}", req.file.display()),
            filter: filter.source().to_string(),
            dry_run: false,
            destination: configured.as_ref().map(|d| d.0.clone()),
        })?;
    }
    let now = Utc::now();
    let mut batch: Vec<(String, Outgoing)> = Vec::new();
    let mut batch_dest: Option<Destination> = None;
    for line in lines {
        if cancel.is_cancelled() || req.max.is_some_and(|m| s.matched >= m) {
            break;
        }
        let line = line?;
        s.read += 1;
        let mut m = line.to_message().map_err(|message| TriageError::BadLine {
            path: req.file.to_owned(),
            line: s.read as usize,
            message,
        })?;
        match filter.matches(&m, now) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                s.filter_errors += 1;
                continue;
            }
        }
        s.matched += 1;
        // A line exported from this same queue goes back to its own source
        // when the config and the provider name none for the queue.
        let same_queue = line.queue == req.to && line.backend == backend.kind();
        let Some(dest) = configured
            .clone()
            .or_else(|| line.source.clone().filter(|_| same_queue).map(Destination))
        else {
            s.failed += 1;
            push_import_error(
                &mut s,
                format!(
                    "message {}: no destination (queue {} names no source: set its `source` in the config, or pass --address)",
                    m.id, req.to
                ),
            );
            continue;
        };
        *s.destinations.entry(dest.0.clone()).or_default() += 1;
        if plan.strip_dead_letter_attributes {
            for name in &line.provider_attributes {
                if m.attributes.remove(name).is_some() {
                    *s.stripped.entry(name.clone()).or_default() += 1;
                }
            }
        }
        let (o, marked) = outgoing_copy(&m, &plan, &*backend);
        for note in not_carried(&o, &*backend, &dest) {
            *s.not_carried.entry(note).or_default() += 1;
        }
        if !marked {
            *s.not_carried
                .entry("redrive marks (no room under the attribute cap)".into())
                .or_default() += 1;
        }
        if req.dry_run {
            continue;
        }
        if batch_dest.as_ref().is_some_and(|d| *d != dest) || batch.len() >= caps.batch_size {
            let to = batch_dest.clone().expect("a batch has a destination");
            let full = std::mem::take(&mut batch);
            send_import_batch(&*backend, &to, full, limiter.as_ref(), &record, &mut s, &plan.run_id).await;
        }
        batch_dest = Some(dest);
        batch.push((m.id, o));
    }
    if let Some(to) = batch_dest.filter(|_| !batch.is_empty()) {
        send_import_batch(&*backend, &to, batch, limiter.as_ref(), &record, &mut s, &plan.run_id).await;
    }
    if !req.dry_run {
        record(Record::RunFinished {
            run: plan.run_id.clone(),
            at: Utc::now(),
            summary: serde_json::to_value(&s).expect("summary serializes"),
        })?;
        if let Some(j) = &journal {
            j.sync()?;
        }
    }
    Ok(s)
}

async fn send_import_batch(
    backend: &dyn QueueBackend,
    dest: &Destination,
    batch: Vec<(String, Outgoing)>,
    limiter: Option<&governor::DefaultDirectRateLimiter>,
    record: &impl Fn(Record) -> Result<(), JournalError>,
    s: &mut ImportSummary,
    run: &str,
) {
    if let Some(l) = limiter {
        for _ in 0..batch.len() {
            l.until_ready().await;
        }
    }
    let (ids, outgoing): (Vec<String>, Vec<Outgoing>) = batch.into_iter().unzip();
    let results = match backend.send(dest, &outgoing).await {
        Ok(r) => r,
        Err(e) => vec![SendResult::Failed { error: e.to_string() }; outgoing.len()],
    };
    for (id, r) in ids.into_iter().zip(results) {
        match r {
            SendResult::Sent { dest_id } => {
                s.sent += 1;
                let _ = record(Record::Imported {
                    run: run.to_string(),
                    id,
                    destination: dest.0.clone(),
                    dest_id,
                });
            }
            SendResult::Failed { error } => {
                s.failed += 1;
                push_import_error(s, format!("message {id}: {error}"));
            }
        }
    }
}

fn push_import_error(s: &mut ImportSummary, e: String) {
    if s.errors.len() < 20 {
        s.errors.push(e);
    }
}

pub fn import_text(s: &ImportSummary) -> String {
    let mut out = format!(
        "{} {} from {} into queue {} ({})\n",
        if s.dry_run { "import dry run" } else { "import" },
        s.run_id,
        s.file.display(),
        s.queue,
        s.backend,
    );
    for (to, n) in &s.destinations {
        out.push_str(&format!(
            "  {n} {} {to}\n",
            if s.dry_run { "would go to" } else { "to" }
        ));
    }
    out.push_str(&format!("  read:      {}\n  matched:   {}\n", s.read, s.matched));
    if !s.dry_run {
        out.push_str(&format!("  sent:      {}\n  failed:    {}\n", s.sent, s.failed));
    }
    if s.filter_errors > 0 {
        out.push_str(&format!("  filter errors: {}\n", s.filter_errors));
    }
    for (name, n) in &s.stripped {
        out.push_str(&format!("  stripped dead-letter attribute `{name}`: {n} messages\n"));
    }
    if s.not_carried.is_empty() {
        out.push_str("  carried as is: bodies, attributes and their types\n");
    }
    for (what, n) in &s.not_carried {
        out.push_str(&format!("  not carried as is: {what}: {n} messages\n"));
    }
    for e in &s.errors {
        out.push_str(&format!("  error: {e}\n"));
    }
    out
}

// ---------------------------------------------------------------------------
// Purge

/// A purge's backup: export lines appended to a file, fsynced per batch.
pub struct FileBackup {
    writer: Mutex<ExportWriter>,
    queue: String,
    backend: Arc<dyn QueueBackend>,
}

impl FileBackup {
    pub fn create(path: &Path, queue: &str, backend: Arc<dyn QueueBackend>) -> Result<Self, TriageError> {
        Ok(Self {
            writer: Mutex::new(ExportWriter::create(path, true)?),
            queue: queue.to_string(),
            backend,
        })
    }
}

impl Backup for FileBackup {
    fn write(&self, msgs: &[&DlqMessage]) -> Result<(), String> {
        let mut w = self.writer.lock().map_err(|_| "backup lock poisoned".to_string())?;
        for m in msgs {
            w.write(&ExportedMessage::new(m, &self.queue, &*self.backend))
                .map_err(|e| e.to_string())?;
        }
        w.sync().map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        self.writer
            .lock()
            .map(|w| w.path().display().to_string())
            .unwrap_or_default()
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
pub fn purge_filter(filter: &str, older_than: Option<Duration>) -> String {
    match older_than {
        Some(d) => format!("({filter}) && age > duration(\"{}s\")", d.as_secs()),
        None => filter.to_string(),
    }
}

/// Delete the messages of `queue` that match, each only after it was written
/// to the backup (when there is one), through the redrive engine: messages
/// that do not match stay leased until the pass ends and are then released.
pub async fn purge(
    registry: &Registry,
    queue: &str,
    req: &PurgeRequest<'_>,
    journal: Option<Arc<Journal>>,
    cancel: CancellationToken,
) -> Result<RunSummary, TriageError> {
    let filter = purge_filter(req.filter, req.older_than);
    let mut plan = registry
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
    let backend = registry.backend(queue).await?;
    let backup: Option<Arc<dyn Backup>> = match req.backup {
        Some(path) if !req.dry_run => Some(Arc::new(FileBackup::create(path, queue, backend.clone())?)),
        _ => None,
    };
    plan.action = Action::Discard { backup };
    let mut engine = Engine::new(backend).with_cancel(cancel);
    if let Some(j) = journal {
        engine = engine.with_journal(j);
    }
    Ok(engine.run(&plan).await?)
}

pub fn purge_text(s: &RunSummary) -> String {
    let mut out = format!(
        "{} {} of queue {} ({:?})\n  filter:    {}\n  examined:  {}\n  matched:   {}\n",
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
    for (to, n) in &s.destinations {
        let verb = if s.dry_run { "would be purged" } else { "purged" };
        out.push_str(&format!("  {n} {verb}, {to}\n"));
    }
    out.push_str(&format!("  left in DLQ (released): {}\n", s.released));
    crate::output::push_samples_and_errors(&mut out, s);
    out
}

// ---------------------------------------------------------------------------
// Retention

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
    /// The purge run (export-then-purge, not a dry run).
    pub purge: Option<RunSummary>,
    pub backup: Option<PathBuf>,
}

/// Apply `queue`'s retention policy once. An `alert` policy, or any policy
/// with `dry_run` (config or `force_dry_run`), only reads and lists the
/// expired messages; `export-then-purge` purges them through
/// [`purge`], backed up to `QUEUE-RUN.jsonl` in the export directory.
pub async fn apply_retention(
    registry: &Registry,
    queue: &str,
    force_dry_run: bool,
    default_dir: Option<&Path>,
    journal: Option<Arc<Journal>>,
    trigger: Trigger,
    cancel: CancellationToken,
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
        purge: None,
        backup: None,
    };
    if r.action == RetentionAction::Alert || dry_run {
        let backend = registry.backend(queue).await?;
        let now = Utc::now();
        let stats = browse(&*backend, usize::MAX, registry.config().redrive.hold, |m| {
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
        return Ok(out);
    }
    let dir = r
        .export_dir
        .clone()
        .or_else(|| default_dir.map(|d| d.join("retention")))
        .ok_or_else(|| TriageError::Usage(format!("queue {queue}: set retention.export_dir")))?;
    let path = dir.join(format!("{queue}-{}.jsonl", crate::redrive::new_run_id()));
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
    )
    .await?;
    out.expired = summary.settled;
    out.read = summary.examined;
    out.backup = Some(path);
    out.purge = Some(summary);
    Ok(out)
}

pub fn retention_text(o: &RetentionOutcome) -> String {
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
            out.push_str(&format!(
                "  purged {} expired messages, backed up to {}\n",
                s.settled,
                o.backup.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
            ));
            for e in &s.errors {
                out.push_str(&format!("  error: {e}\n"));
            }
        }
        None => {
            let verb = if o.action == RetentionAction::ExportThenPurge {
                "would purge"
            } else {
                "expired"
            };
            out.push_str(&format!("  {verb} {} of {} messages read\n", o.expired, o.read));
            for m in &o.listed {
                out.push_str(&format!(
                    "    {}  age {}  reason={}\n",
                    m.id,
                    human_age(Some(Duration::from_secs(m.age_seconds))),
                    m.reason.as_deref().unwrap_or("-")
                ));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The CLI commands (dispatched from `cli.rs`)

fn print_json<T: Serialize>(v: &T) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(v)?);
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
    let backend = registry.backend(queue).await?;
    if let Some(note) = read_note(&*backend) {
        eprintln!("{note}");
    }
    let r = report(registry, queue, &ReportRequest { by, filter, top, scan }).await?;
    match output {
        Format::Json => print_json(&r)?,
        Format::Table => print!("{}", report_table(&r)),
    }
    if r.filter_errors > 0 {
        eprintln!(
            "warning: the filter failed on {} messages (counted as no match)",
            r.filter_errors
        );
    }
    Ok(exit::OK)
}

pub async fn cli_export(
    registry: &Registry,
    queue: &str,
    to: &Path,
    filter: Option<&str>,
    max: Option<u64>,
    output: Format,
) -> Result<u8, Failure> {
    compile(filter)?;
    let backend = registry.backend(queue).await?;
    if let Some(note) = read_note(&*backend) {
        eprintln!("{note}");
    }
    let s = export(registry, queue, to, filter, max).await?;
    match output {
        Format::Json => print_json(&s)?,
        Format::Table => {
            println!(
                "exported {} of {} messages read from {} to {}",
                s.written,
                s.read,
                s.queue,
                s.file.display()
            );
            if s.capped {
                println!("  the browse stopped at its cap (--max); the DLQ may hold more");
            }
            if s.filter_errors > 0 {
                println!("  filter errors: {} (counted as no match)", s.filter_errors);
            }
        }
    }
    Ok(exit::OK)
}

pub async fn cli_import(
    registry: &Registry,
    req: &ImportRequest<'_>,
    journal: Option<Arc<Journal>>,
    output: Format,
) -> Result<u8, Failure> {
    let s = import(registry, req, journal, CancellationToken::new()).await?;
    match output {
        Format::Json => print_json(&s)?,
        Format::Table => print!("{}", import_text(&s)),
    }
    Ok(if s.ok() { exit::OK } else { exit::FAILURE })
}

pub async fn cli_purge(
    registry: &Registry,
    queue: &str,
    req: &PurgeRequest<'_>,
    journal: Option<Arc<Journal>>,
    output: Format,
) -> Result<u8, Failure> {
    let cancel = CancellationToken::new();
    let ctrl_c = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: finishing in-flight batches, releasing the rest");
                cancel.cancel();
            }
        }
    });
    let s = purge(registry, queue, req, journal, cancel).await;
    ctrl_c.abort();
    let s = s?;
    match output {
        Format::Json => print_json(&s)?,
        Format::Table => print!("{}", purge_text(&s)),
    }
    Ok(if s.ok() { exit::OK } else { exit::FAILURE })
}

pub async fn cli_retention(
    registry: &Registry,
    queue: Option<&str>,
    dry_run: bool,
    journal: Option<Arc<Journal>>,
    output: Format,
) -> Result<u8, Failure> {
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
    let default_dir = registry.config().serve.data_dir.clone().or_else(crate::cli::state_dir);
    let mut outcomes = Vec::new();
    let mut failed = false;
    for name in &names {
        let o = apply_retention(
            registry,
            name,
            dry_run,
            default_dir.as_deref(),
            journal.clone(),
            Trigger::Cli,
            CancellationToken::new(),
        )
        .await;
        match o {
            Ok(o) => {
                failed |= o.purge.as_ref().is_some_and(|s| !s.ok());
                outcomes.push(o);
            }
            Err(e) => {
                failed = true;
                eprintln!("queue {name}: retention failed: {e}");
            }
        }
    }
    match output {
        Format::Json => print_json(&outcomes)?,
        Format::Table => {
            for o in &outcomes {
                print!("{}", retention_text(o));
            }
        }
    }
    Ok(if failed { exit::FAILURE } else { exit::OK })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Attribute;

    #[test]
    fn numbers_in_the_issue_example_fall_in_one_pattern() {
        let a = normalize("timeout after 3012 ms on order 8812");
        assert_eq!(a, "timeout after <n> ms on order <n>");
        assert_eq!(normalize("timeout after 15 ms on order 7"), a);
    }

    #[test]
    fn placeholders_for_uuids_hex_quotes_and_decimals() {
        assert_eq!(
            normalize("trace 3f2b8c1e-9a4d-4e2b-8c7f-0123456789ab failed"),
            "trace <uuid> failed"
        );
        assert_eq!(normalize("commit deadbeef12 at 0x7ffd"), "commit <hex> at <hex>");
        assert_eq!(
            normalize(r#"field `sku` missing in "A-17""#),
            "field <str> missing in <str>"
        );
        assert_eq!(
            normalize("user 'bob' can't pay 12.50 EUR"),
            "user <str> can't pay <n> EUR"
        );
        assert_eq!(
            normalize("took 3000ms, ord-1017, http2 s3"),
            "took <n>ms, ord-<n>, http2 s3"
        );
        assert_eq!(normalize("HTTP 503 from shipping"), "HTTP <n> from shipping");
        assert_eq!(normalize("unterminated \"quote"), "unterminated \"quote");
        assert_eq!(normalize("façade 42"), "façade <n>");
    }

    fn msg(id: &str, reason: &str, desc: &str, count: u32, secs: i64) -> DlqMessage {
        DlqMessage {
            id: id.into(),
            body: Bytes::from_static(b"{}"),
            attributes: [("tenant".to_string(), Attribute::string(id))].into(),
            properties: Properties::new(),
            reason: Some(reason.into()),
            description: Some(desc.into()),
            delivery_count: Some(count),
            enqueued_at: Some(DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()),
            source: None,
            ordering_key: None,
        }
    }

    #[test]
    fn groups_have_counts_times_ranges_and_fold_into_other() {
        let msgs = [
            msg("a", "Timeout", "after 3012 ms", 2, 30),
            msg("b", "Timeout", "after 15 ms", 5, 10),
            msg("c", "Timeout", "after 9 ms", 3, 20),
            msg("d", "Bad", "field `x`", 1, 0),
            msg("e", "Bad", "field `y`", 1, 5),
            msg("f", "Gone", "404", 1, 0),
        ];
        let mut g = Grouper::new(GroupBy::Pattern);
        for m in &msgs {
            g.add(m);
        }
        let (groups, other) = g.finish(2);
        assert_eq!(groups.len(), 2);
        let t = &groups[0];
        assert_eq!((t.key.as_str(), t.count), ("Timeout: after <n> ms", 3));
        assert_eq!((t.min_delivery_count, t.max_delivery_count), (Some(2), Some(5)));
        assert_eq!(t.first_enqueued_at, msgs[1].enqueued_at);
        assert_eq!(t.last_enqueued_at, msgs[0].enqueued_at);
        assert!((t.share - 0.5).abs() < 1e-9);
        assert_eq!((groups[1].key.as_str(), groups[1].count), ("Bad: field <str>", 2));
        let o = other.unwrap();
        assert_eq!((o.key.as_str(), o.count, o.groups_folded), ("other", 1, 1));
        assert_eq!(
            top_counts(&msgs, &GroupBy::Attribute("tenant".into()), 10).len(),
            6,
            "one group per attribute value"
        );
    }

    #[test]
    fn group_by_parses() {
        assert_eq!("pattern".parse::<GroupBy>().unwrap(), GroupBy::Pattern);
        assert_eq!(
            "attribute:tenant".parse::<GroupBy>().unwrap(),
            GroupBy::Attribute("tenant".into())
        );
        assert!("attribute:".parse::<GroupBy>().is_err());
        assert!("colour".parse::<GroupBy>().is_err());
    }

    #[test]
    fn export_line_round_trips_the_message() {
        let mut m = msg("a", "Timeout", "x", 1, 0);
        m.body = Bytes::from_static(&[0, 159, 146, 150, b'\n']);
        m.attributes.insert(
            "n".into(),
            Attribute {
                value: AttrValue::Number("1.50".into()),
                data_type: Some("Number.float".into()),
            },
        );
        let line = ExportedMessage {
            queue: "q".into(),
            backend: "sqs".into(),
            id: m.id.clone(),
            body_base64: base64::engine::general_purpose::STANDARD.encode(&m.body),
            body_preview: m.body_text(),
            body_bytes: m.body.len(),
            attributes: m.attributes.clone(),
            properties: Properties::new(),
            reason: m.reason.clone(),
            description: m.description.clone(),
            delivery_count: m.delivery_count,
            enqueued_at: m.enqueued_at,
            source: None,
            ordering_key: None,
            provider_attributes: vec![],
            exported_at: Utc::now(),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(!text.contains('\n'));
        let back: ExportedMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_message().unwrap(), m);
    }

    #[test]
    fn older_than_narrows_the_filter() {
        assert_eq!(
            purge_filter("reason == \"x\"", Some(Duration::from_secs(90))),
            "(reason == \"x\") && age > duration(\"90s\")"
        );
        Filter::compile(&purge_filter("true", Some(Duration::from_secs(5)))).unwrap();
    }
}
