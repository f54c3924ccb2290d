//! `import`: an export file replayed into a queue, with the documented
//! attribute mapping.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::error::{TriageError, io_err, unless_cancelled};
use super::export::read_numbered_from;
use super::read::compile;
use crate::backend::QueueBackend;
use crate::engine::journal::{Journal, JournalError, Record};
use crate::engine::redrive::{Trigger, outgoing_copy};
use crate::engine::registry::{RedriveRequest, Registry, RegistryError};
use crate::filter::Filter;
use crate::model::{AttrValue, Destination, Outgoing, SendResult};

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
    /// Send lines the journal says an earlier import already sent to the
    /// same destination (skipped otherwise).
    pub again: bool,
}

impl<'a> ImportRequest<'a> {
    /// Every line of `file` into `to`'s source: no filter, rate or cap.
    pub fn new(file: &'a Path, to: &'a str) -> Self {
        Self {
            file,
            to,
            address: None,
            filter: None,
            rate: None,
            max: None,
            dry_run: false,
            again: false,
        }
    }
}

/// Why an import stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportStop {
    /// It read the whole file.
    EndOfFile,
    /// `--max` messages matched.
    MaxReached,
    Cancelled,
    /// The journal could not record a copy sent, or the file was written
    /// to while it was sent: nothing more was sent.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportSummary {
    pub run_id: String,
    /// `import`, as `runs` and the API name the action.
    pub action: &'static str,
    pub file: PathBuf,
    pub queue: String,
    pub backend: String,
    /// Destination address → messages sent there (planned, in a dry run).
    pub destinations: BTreeMap<String, u64>,
    pub dry_run: bool,
    pub read: u64,
    /// Matching lines sent (or to be sent), failed or held: not those
    /// already imported.
    pub matched: u64,
    pub sent: u64,
    pub failed: u64,
    pub filter_errors: u64,
    /// Matching lines an earlier import sent to the same destination (the
    /// journal's `imported` records, by message ID and enqueue time):
    /// skipped, unless `--again`.
    pub already_imported: u64,
    /// What the destination could not carry as it was, and for how many messages.
    pub not_carried: BTreeMap<String, u64>,
    /// Provider dead-letter attributes stripped from the copies.
    pub stripped: BTreeMap<String, u64>,
    pub errors: Vec<String>,
    /// Stopped by an interrupt before the end of the file.
    pub interrupted: bool,
    pub stopped: ImportStop,
    /// Copies not sent because an earlier copy of their ordering key (FIFO
    /// group, session) failed: sending them would have put them ahead of it.
    /// Counted in `failed` too.
    pub held_for_order: u64,
    /// When the import stopped before the end of the file (interrupt,
    /// `--max`): the first line whose message was not sent or skipped;
    /// importing the file from that line on completes it.
    pub resume_line: Option<usize>,
}

impl ImportSummary {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.stopped != ImportStop::Failed
    }
}

/// What `backend` cannot carry of `o` exactly as it is (the documented
/// mapping, README "Triage").
pub fn not_carried(o: &Outgoing, backend: &dyn QueueBackend) -> Vec<String> {
    let caps = backend.capabilities();
    let kind = backend.kind();
    let mut out = Vec::new();
    for (name, a) in &o.attributes {
        if name == crate::engine::redrive::MARK_ID || name == crate::engine::redrive::MARK_COUNT {
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
    if kind != "servicebus" {
        // SQS carries one: the X-Ray trace header, a system attribute.
        let names: Vec<&str> = o
            .properties
            .keys()
            .map(String::as_str)
            .filter(|n| {
                !(kind == "sqs"
                    && [
                        crate::backend::AWS_TRACE_HEADER_PROPERTY,
                        crate::backend::SQS_TENANT_PROPERTY,
                    ]
                    .contains(n))
            })
            .collect();
        if !names.is_empty() {
            out.push(format!("message properties {} ({kind} has none)", names.join(", ")));
        }
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

/// An import [`check_import`] passed: the filter it compiled and the file
/// it read, still open, so that what is sent is what was checked.
pub struct CheckedImport {
    filter: Filter,
    file: std::fs::File,
    watch: FileWatch,
}

/// What changes when a file is written to: its length, its modification
/// time and, on Unix, its change time (which no one can set back, as
/// `cp -p` or `touch -r` set the modification time back; it also changes
/// when the file loses its name to a replacement). Elsewhere a same-length
/// rewrite that sets the modification time back, or a replacement, goes
/// unseen.
#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    #[cfg(unix)]
    changed: (i64, i64),
}

impl Stamp {
    fn of(file: &std::fs::File, path: &Path) -> Result<Self, TriageError> {
        let meta = file.metadata().map_err(io_err(path))?;
        Ok(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            changed: {
                use std::os::unix::fs::MetadataExt as _;
                (meta.ctime(), meta.ctime_nsec())
            },
        })
    }
}

/// What an import can be refused for before anything is asked or
/// connected: the filter, the queue and every line of the file. Every line
/// is checked before any is sent: a bad line met half-way would stop the
/// import with the lines before it sent and those after it not, and the
/// rerun after fixing the file would send the first part twice. The CLI
/// checks it before it asks for confirmation, then calls [`import_checked`],
/// which reads the same open file again, and only while nothing writes to
/// it or replaces it.
pub fn check_import(registry: &Registry, req: &ImportRequest<'_>) -> Result<CheckedImport, TriageError> {
    let filter = compile(req.filter)?;
    registry.queue(req.to).map_err(|e| match e {
        // `redrive --to` takes an address; import's --to is the queue whose
        // backend and credentials send the copies.
        RegistryError::UnknownQueue { .. } if looks_like_address(req.to) => TriageError::Usage(format!(
            "{e}: import's --to names a configured queue, whose backend and credentials send the copies; give an address with --address"
        )),
        e => e.into(),
    })?;
    // Read twice (to check it, then to send it), a pipe would be empty the
    // second time. Asked before it is opened too: opening a named pipe
    // waits for a writer.
    let not_regular = || {
        TriageError::Usage(format!(
            "{}: not a regular file (a directory, pipe or device): import reads its file twice, once to check every line; save it to a file first",
            req.file.display()
        ))
    };
    if !std::fs::metadata(req.file).map_err(io_err(req.file))?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(req.file).map_err(io_err(req.file))?;
    if !file.metadata().map_err(io_err(req.file))?.is_file() {
        return Err(not_regular());
    }
    let stamp = Stamp::of(&file, req.file)?;
    let reading = file.try_clone().map_err(io_err(req.file))?;
    let mut last_line = 0;
    for line in read_numbered_from(std::io::Read::take(reading, stamp.len), req.file) {
        let (n, line) = line?;
        line.to_message().map_err(|message| bad_line(req.file, n, message))?;
        last_line = n;
    }
    let watch = FileWatch {
        file: file.try_clone().map_err(io_err(req.file))?,
        stamp,
        last_line,
    };
    Ok(CheckedImport { filter, file, watch })
}

impl CheckedImport {
    /// The filter, the file's checked bytes from their start, and a watch
    /// on the file; refused if it was written to or replaced since it was
    /// checked.
    fn rewound(self, path: &Path) -> Result<(Filter, impl std::io::Read, FileWatch), TriageError> {
        use std::io::Seek as _;
        let Self {
            filter,
            mut file,
            watch,
        } = self;
        watch.unchanged(path)?;
        file.rewind().map_err(io_err(path))?;
        let checked = std::io::Read::take(file, watch.stamp.len);
        Ok((filter, checked, watch))
    }
}

/// The checked file, watched for writes while it is sent.
struct FileWatch {
    file: std::fs::File,
    stamp: Stamp,
    /// The number of the file's last line that holds a message.
    last_line: usize,
}

impl FileWatch {
    fn changed(&self, path: &Path) -> Result<bool, TriageError> {
        Ok(Stamp::of(&self.file, path)? != self.stamp)
    }

    /// Refused (exit 2) if the file changed before anything was sent.
    fn unchanged(&self, path: &Path) -> Result<(), TriageError> {
        if !self.changed(path)? {
            return Ok(());
        }
        Err(TriageError::Usage(format!(
            "{}: the file changed after it was checked; run the import again",
            path.display()
        )))
    }

    /// Whether the file was written to while it was sent: what the import
    /// says when it stops for it.
    fn written_while_sent(&self, path: &Path) -> Result<Option<String>, TriageError> {
        Ok(self.changed(path)?.then(|| {
            format!(
                "{}: the file was written to while it was imported; nothing read since was sent (see resume_line; lines the journal records as imported are skipped when it is imported again)",
                path.display()
            )
        }))
    }
}

/// Keep the earliest line not sent.
fn resume_at(s: &mut ImportSummary, line: usize) {
    s.resume_line = Some(s.resume_line.map_or(line, |r| r.min(line)));
}

/// Stop an import whose file was written to while it was sent: nothing of
/// `batch` goes, and it resumes after `checked_through`, the last line read
/// before a check of the file passed.
fn stop_for_write(s: &mut ImportSummary, said: String, checked_through: usize, batch: &mut Vec<Line>) {
    push_import_error(s, said);
    s.stopped = ImportStop::Failed;
    resume_at(s, checked_through + 1);
    if let Some(first) = batch.first() {
        resume_at(s, first.0);
    }
    batch.clear();
}

fn looks_like_address(to: &str) -> bool {
    to.contains("://") || to.starts_with("arn:") || to.starts_with("projects/")
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
    let checked = check_import(registry, req)?;
    import_checked(registry, req, checked, journal, cancel).await
}

/// [`import`] of a request [`check_import`] passed.
pub async fn import_checked(
    registry: &Registry,
    req: &ImportRequest<'_>,
    checked: CheckedImport,
    journal: Option<Arc<Journal>>,
    cancel: CancellationToken,
) -> Result<ImportSummary, TriageError> {
    let (filter, file, watch) = checked.rewound(req.file)?;
    let lines = read_numbered_from(file, req.file);
    let connect = async {
        let plan = registry
            .plan(
                req.to,
                &RedriveRequest {
                    to: req.address.map(str::to_string),
                    to_is_address: true,
                    dry_run: req.dry_run,
                    ..Default::default()
                },
                Trigger::Cli,
            )
            .await
            .map_err(|e| match e {
                // The destination came from --address, not from a --to.
                RegistryError::Destination { to, error, .. } if req.address.is_some() => RegistryError::Destination {
                    flag: "--address",
                    to,
                    error,
                },
                e => e,
            })?;
        Ok((plan, registry.backend(req.to).await?))
    };
    let (plan, backend) = unless_cancelled(&cancel, connect).await?;
    // Connecting may take seconds: a write meanwhile still refuses it whole.
    watch.unchanged(req.file)?;
    let configured = plan.to.clone().or_else(|| plan.fallback_source.clone());
    let caps = backend.capabilities();
    let limiter = req
        .rate
        .and_then(NonZeroU32::new)
        .map(|r| crate::engine::redrive::message_rate(r, caps.batch_size));
    let mut s = ImportSummary {
        run_id: plan.run_id.clone(),
        action: "import",
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
        already_imported: 0,
        not_carried: BTreeMap::new(),
        stripped: BTreeMap::new(),
        errors: Vec::new(),
        interrupted: false,
        stopped: ImportStop::EndOfFile,
        held_for_order: 0,
        resume_line: None,
    };
    let record = |r: Record| {
        if let Some(j) = &journal { j.append(&r) } else { Ok(()) }
    };
    // Each batch's records are synced before the next is sent: a run killed
    // (or a disk that fills) part-way still says what it sent.
    let sync = || {
        if let Some(j) = &journal { j.sync() } else { Ok(()) }
    };
    if !req.dry_run {
        record(Record::RunStarted {
            run: plan.run_id.clone(),
            at: Utc::now(),
            queue: req.to.to_string(),
            action: Some("import".into()),
            trigger: format!("import {}", req.file.display()),
            filter: filter.source().to_string(),
            dry_run: false,
            destination: configured.as_ref().map(|d| d.0.clone()),
        })?;
        sync()?;
    }
    let now = Utc::now();
    let ctx = BatchContext {
        backend: &*backend,
        limiter: limiter.as_ref(),
        record: &record,
        sync: &sync,
        run: &plan.run_id,
        cancel: &cancel,
    };
    let mut failed_keys: HashSet<String> = HashSet::new();
    let mut batch: Vec<Line> = Vec::new();
    let mut batch_dest: Option<Destination> = None;
    let mut lines = lines.peekable();
    // The last line read, and the last read before a check of the file
    // passed: an import stopped by a write resumes after the latter (lines
    // read since may be of the new content, sent or skipped for it).
    let mut last_read = 0;
    let mut checked_through = 0;
    // The loop ran out of lines (no stop): the file is checked once more.
    let mut reached_end = true;
    while lines.peek().is_some() {
        if cancel.is_cancelled() {
            reached_end = false;
            break;
        }
        if req.max.is_some_and(|m| s.matched >= m) {
            s.stopped = ImportStop::MaxReached;
            reached_end = false;
            break;
        }
        let read = lines.next().expect("peeked").and_then(|(n, line)| {
            let m = line.to_message().map_err(|message| bad_line(req.file, n, message))?;
            Ok((n, line, m))
        });
        let (n, line, mut m) = match read {
            Ok(read) => read,
            Err(e) => {
                // A checked line that no longer reads: the file was written
                // to while it was sent.
                if req.dry_run {
                    watch.unchanged(req.file)?;
                }
                if let Some(said) = watch.written_while_sent(req.file)? {
                    stop_for_write(&mut s, said, checked_through, &mut batch);
                    reached_end = false;
                    break;
                }
                return Err(e);
            }
        };
        last_read = n;
        s.read += 1;
        match filter.matches(&m, now) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                s.filter_errors += 1;
                continue;
            }
        }
        // A line exported from this same queue goes back to its own source
        // when the config and the provider name none for the queue.
        let same_queue = line.queue == req.to && line.backend == backend.kind();
        let dest = configured
            .clone()
            .or_else(|| line.source.clone().filter(|_| same_queue).map(Destination));
        // The same file imported twice, or again after a crash, sent every
        // line again under new redrive marks.
        if let (Some(d), Some(j)) = (&dest, &journal)
            && !req.again
            && j.already_imported(&d.0, &m.id, m.enqueued_at)
        {
            s.already_imported += 1;
            continue;
        }
        s.matched += 1;
        let Some(dest) = dest else {
            s.failed += 1;
            push_import_error(
                &mut s,
                format!(
                    "message {} (line {n}): no destination (queue {} names no source: set its `source` in the config, or pass --address)",
                    m.id, req.to
                ),
            );
            // As after a failed send: the key's later lines stay out, so
            // that none goes ahead of this one.
            failed_keys.extend(m.ordering_key.clone());
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
        let (mut o, marked) = outgoing_copy(&m, &plan, &*backend, &dest);
        if req.again {
            // Sent anew on purpose: a deduplication ID of its own, or SQS
            // FIFO (and Service Bus duplicate detection) drops the copy as
            // the earlier import's, within its window, after accepting it.
            o.dedup_id = format!("{}-{}", o.dedup_id, plan.run_id);
        }
        for note in not_carried(&o, &*backend) {
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
        if !batch.is_empty() && (batch_dest.as_ref().is_some_and(|d| *d != dest) || batch.len() >= caps.batch_size) {
            // Written to in place while it is sent (a long import at a low
            // --rate): lines read since may not be those checked, and none
            // of this batch goes. Checked before each send, not each line.
            if let Some(said) = watch.written_while_sent(req.file)? {
                stop_for_write(&mut s, said, checked_through, &mut batch);
                reached_end = false;
                break;
            }
            // Line `n`, read before this check, is of the checked content.
            checked_through = n;
            let to = batch_dest.clone().expect("a batch has a destination");
            let full = std::mem::take(&mut batch);
            if let Some(unsent) = send_import_batch(&ctx, &to, full, &mut s, &mut failed_keys).await {
                resume_at(&mut s, unsent);
                reached_end = false;
                break;
            }
        }
        if let Some(key) = o.ordering_key.as_ref().filter(|k| failed_keys.contains(*k)) {
            s.failed += 1;
            s.held_for_order += 1;
            push_import_error(
                &mut s,
                format!(
                    "message {} (line {n}): not sent: an earlier message of its ordering key {key:?} failed to send, and this one would have gone ahead of it",
                    m.id
                ),
            );
            continue;
        }
        batch_dest = Some(dest);
        batch.push((n, (m.id, m.enqueued_at), o));
    }
    // At the end, before the last batch: lines read since the last batch's
    // check that were all skipped, and a file cut short while it was sent
    // (`> FILE`, a shorter save in place: the end came before its last
    // checked line). A write after the last send changes nothing sent.
    if req.dry_run {
        // What it counted may be of the new content: refused as before a
        // send, whatever ended the loop.
        watch.unchanged(req.file)?;
    }
    if reached_end && s.stopped == ImportStop::EndOfFile {
        let said = watch.written_while_sent(req.file)?.or_else(|| {
            (last_read < watch.last_line).then(|| {
                format!(
                    "{}: the file ended at line {last_read}, before its last checked line {}",
                    req.file.display(),
                    watch.last_line
                )
            })
        });
        if let Some(said) = said {
            stop_for_write(&mut s, said, checked_through, &mut batch);
        }
    }
    if let Some(to) = batch_dest.filter(|_| !batch.is_empty()) {
        let first = batch[0].0;
        if cancel.is_cancelled() {
            // Read but not sent: nothing new leaves after an interrupt.
            resume_at(&mut s, first);
        } else if let Some(said) = watch.written_while_sent(req.file)? {
            stop_for_write(&mut s, said, checked_through, &mut batch);
        } else if let Some(unsent) = send_import_batch(&ctx, &to, batch, &mut s, &mut failed_keys).await {
            resume_at(&mut s, unsent);
        }
    }
    if s.resume_line.is_none() {
        match lines.next() {
            Some(Ok((n, _))) => s.resume_line = Some(n),
            // Unread after an interrupt or --max: still where to go on.
            Some(Err(TriageError::BadLine { line, .. })) => s.resume_line = Some(line),
            Some(Err(_)) => s.resume_line = Some(last_read + 1),
            None => {}
        }
    }
    s.interrupted = cancel.is_cancelled() && s.resume_line.is_some();
    if s.interrupted && s.stopped != ImportStop::Failed {
        s.stopped = ImportStop::Cancelled;
    }
    if !req.dry_run {
        let finished = record(Record::RunFinished {
            run: plan.run_id.clone(),
            at: Utc::now(),
            summary: serde_json::to_value(&s).expect("summary serializes"),
        })
        .and_then(|()| sync());
        // The summary is what tells the user what was sent and where to
        // resume: kept (exit 1) when the journal cannot take its end.
        if let Err(e) = finished {
            push_import_error(
                &mut s,
                format!("journal: {e} (the journal does not hold this import's end; `runs` shows it unfinished)"),
            );
            s.stopped = ImportStop::Failed;
        }
    }
    Ok(s)
}

/// A line to send: its number, the exported message's ID and enqueue time
/// (what the journal knows it by), and the copy.
type Line = (usize, (String, Option<DateTime<Utc>>), Outgoing);

struct BatchContext<'a, R, S> {
    backend: &'a dyn QueueBackend,
    limiter: Option<&'a governor::DefaultDirectRateLimiter>,
    record: &'a R,
    sync: &'a S,
    run: &'a str,
    cancel: &'a CancellationToken,
}

/// Send one batch (line number, original ID, copy), waiting for the rate
/// limit message by message. An interrupt during the wait sends only what
/// was admitted; the line of the first message left unsent is returned,
/// and so is the line after the batch when the journal failed to record it
/// (the import stops there). The ordering keys of copies that failed are
/// added to `failed_keys`.
async fn send_import_batch<R, S>(
    ctx: &BatchContext<'_, R, S>,
    dest: &Destination,
    mut batch: Vec<Line>,
    s: &mut ImportSummary,
    failed_keys: &mut HashSet<String>,
) -> Option<usize>
where
    R: Fn(Record) -> Result<(), JournalError>,
    S: Fn() -> Result<(), JournalError>,
{
    let mut unsent = None;
    if let Some(l) = ctx.limiter {
        for i in 0..batch.len() {
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => {
                    unsent = Some(batch[i].0);
                    batch.truncate(i);
                    break;
                }
                _ = l.until_ready() => {}
            }
        }
    } else if ctx.cancel.is_cancelled() {
        unsent = batch.first().map(|b| b.0);
        batch.clear();
    }
    if batch.is_empty() {
        return unsent;
    }
    let next_line = batch.last().map(|b| b.0 + 1);
    let (ids, outgoing): (Vec<_>, Vec<Outgoing>) = batch.into_iter().map(|(n, id, o)| ((n, id), o)).unzip();
    let results = match ctx.backend.send(dest, &outgoing).await {
        Ok(r) => r,
        Err(e) => vec![SendResult::Failed { error: e.to_string() }; outgoing.len()],
    };
    let mut journal = Ok(());
    for (((n, (id, enqueued_at)), r), o) in ids.into_iter().zip(results).zip(&outgoing) {
        match r {
            SendResult::Sent { dest_id } => {
                s.sent += 1;
                if journal.is_ok() {
                    journal = (ctx.record)(Record::Imported {
                        run: ctx.run.to_string(),
                        id,
                        destination: dest.0.clone(),
                        dest_id,
                        enqueued_at,
                    });
                }
            }
            SendResult::Failed { error } => {
                s.failed += 1;
                if let Some(k) = &o.ordering_key {
                    failed_keys.insert(k.clone());
                }
                // The line, to find it again among thousands (a rerun
                // with the journal sends only what is missing).
                push_import_error(s, format!("message {id} (line {n}): {error}"));
            }
        }
    }
    if let Err(e) = journal.and_then(|()| (ctx.sync)()) {
        s.stopped = ImportStop::Failed;
        push_import_error(
            s,
            format!("the journal could not record the copies sent: {e}; nothing more was sent"),
        );
        return unsent.or(next_line);
    }
    unsent
}

fn bad_line(file: &Path, line: usize, message: String) -> TriageError {
    TriageError::BadLine {
        path: file.to_owned(),
        line,
        message,
    }
}

fn push_import_error(s: &mut ImportSummary, e: String) {
    if s.errors.len() < 20 {
        s.errors.push(e);
    }
}

#[cfg(all(test, feature = "sqs"))]
mod tests {
    use super::*;
    use crate::config::Config;

    const LINE: &str = r#"{"queue":"q","backend":"sqs","id":"m1","body_base64":"eA==","body_preview":"x","body_bytes":1,"attributes":{},"reason":null,"description":null,"delivery_count":null,"enqueued_at":null,"source":null,"ordering_key":null,"exported_at":"2026-01-01T00:00:00Z"}"#;

    fn registry() -> Registry {
        // Nothing here connects: the import stops before its plan.
        let yaml = "queues:\n  - name: q\n    sqs:\n      queue: q-dlq\n      endpoint_url: http://127.0.0.1:9\n";
        Registry::new(Config::from_yaml(yaml, "test.yaml", &[]).unwrap())
    }

    fn file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("dlqb-import-{}.jsonl", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A file written to between the check and the send (while the CLI
    /// asked for confirmation) is refused whole: its new lines were never
    /// checked.
    #[tokio::test]
    async fn a_file_written_to_after_its_check_is_not_imported() {
        let path = file(&format!("{LINE}\n"));
        let registry = registry();
        let req = ImportRequest::new(&path, "q");
        let checked = check_import(&registry, &req).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"not json\n"))
            .unwrap();
        let e = import_checked(&registry, &req, checked, None, CancellationToken::new())
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("changed after it was checked"), "{e}");
        assert!(e.is_usage(), "{e:?}");
        std::fs::remove_file(&path).unwrap();
    }

    /// Rewritten in place with the same length and its modification time
    /// set back (`cp -p`, `touch -r`): the change time still tells.
    #[cfg(unix)]
    #[test]
    fn a_same_length_rewrite_with_the_old_mtime_is_seen() {
        let path = file(&format!("{LINE}\n"));
        let registry = registry();
        let req = ImportRequest::new(&path, "q");
        let checked = check_import(&registry, &req).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &f, LINE.replace("m1", "m2").as_bytes()).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), LINE.len() as u64 + 1);
        let e = checked.rewound(&path).err().expect("refused");
        assert!(e.to_string().contains("changed after it was checked"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    /// A pipe or device would be read empty the second time (once checked,
    /// then sent): refused, naming it, before anything is asked.
    #[cfg(unix)]
    #[test]
    fn a_file_that_is_not_regular_is_refused() {
        let registry = registry();
        for odd in ["/dev/null", "/tmp"] {
            let e = check_import(&registry, &ImportRequest::new(Path::new(odd), "q"))
                .err()
                .expect("refused");
            assert!(e.is_usage(), "{e:?}");
            assert!(e.to_string().starts_with(&format!("{odd}: not a regular file")), "{e}");
        }
    }

    /// A file replaced after its check (an editor's save) is refused too:
    /// the user changed what they confirmed. (Its old inode, which the
    /// check read, lost its name: that changes its change time.)
    #[cfg(unix)]
    #[test]
    fn a_file_replaced_after_its_check_is_not_imported() {
        let path = file(&format!("{LINE}\n{LINE}\n"));
        let registry = registry();
        let req = ImportRequest::new(&path, "q");
        let checked = check_import(&registry, &req).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let other = file(&format!("{LINE}\n"));
        std::fs::rename(&other, &path).unwrap();
        let e = checked.rewound(&path).err().expect("refused");
        assert!(e.to_string().contains("changed after it was checked"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }
}
