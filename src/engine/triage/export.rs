//! `export`: messages copied to a JSONL file, exactly, and the file format
//! that `import` and purge backups share.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::error::{TriageError, io_err};
use super::read::{browse, compile};
use crate::backend::QueueBackend;
use crate::engine::registry::Registry;
use crate::model::{Attributes, DlqMessage, Properties};

/// Messages an export reads at most on a provider with a true peek (Service
/// Bus), where the whole read is one browse held in memory; `--max` sets it.
pub const DEFAULT_PEEK_CAP: usize = 10_000;
/// Characters of a body kept as the readable preview in an export line.
pub(super) const PREVIEW_CHARS: usize = 512;

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

/// A file for one run's messages of `queue` in `dir` (`backups/` or `exports/`
/// under the state directory): `QUEUE-TIME.jsonl`, the same name whether the CLI
/// or the HTTP API asks. The time is to the millisecond, so that two purges or
/// exports of a queue in one second do not share a file (an export would
/// replace the other's).
pub fn dated_path(dir: &Path, queue: &str) -> PathBuf {
    use std::sync::atomic::{AtomicI64, Ordering};
    // Each name of this process a millisecond later than the last: two
    // purges or exports the API starts in one millisecond would otherwise
    // write one file (and one partial file) together.
    static LAST: AtomicI64 = AtomicI64::new(i64::MIN);
    let now = Utc::now().timestamp_millis();
    let prev = LAST.fetch_max(now, Ordering::Relaxed);
    let millis = if prev >= now {
        LAST.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        now
    };
    let at = chrono::DateTime::<Utc>::from_timestamp_millis(millis).unwrap_or_else(Utc::now);
    dir.join(format!("{queue}-{}.jsonl", at.format("%Y%m%dT%H%M%S%.3fZ")))
}

/// Whether an export to `path` goes to standard output: `-`, or a name of
/// the process's descriptor 1.
pub fn to_stdout(path: &Path) -> bool {
    ["-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"]
        .iter()
        .any(|p| path == Path::new(p))
}

/// Writes export lines to a file as they come.
pub struct ExportWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Written under this name (the first) until [`ExportWriter::commit`]
    /// renames it to `path` (the second: `path` with symlinks resolved);
    /// removed if the writer is dropped before.
    partial: Option<(PathBuf, PathBuf)>,
    /// Why an [`ExportWriter::append_batch`] failed: every later one is
    /// refused.
    broken: Option<String>,
    /// Standard output's reader went away (`export --to - | head`).
    reader_gone: bool,
}

impl ExportWriter {
    /// Create (or truncate) `path`; with `append`, add to it instead.
    pub fn create(path: &Path, append: bool) -> Result<Self, TriageError> {
        create_parent(path)?;
        let mut opts = OpenOptions::new();
        opts.create(true);
        private(&mut opts);
        if append {
            opts.append(true).read(true);
        } else {
            opts.write(true).truncate(true);
        }
        let mut file = opts.open(path).map_err(io_err(path))?;
        if append {
            end_last_line(&mut file).map_err(io_err(path))?;
        }
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(file),
            partial: None,
            broken: None,
            reader_gone: false,
        })
    }

    /// Write to a temporary file next to `path` that replaces it only on
    /// [`ExportWriter::commit`]: an export that fails or is interrupted half-way
    /// leaves an existing `path` (an earlier export, a backup) as it was
    /// instead of truncated.
    pub fn create_replacing(path: &Path) -> Result<Self, TriageError> {
        // Standard output (`-`, `/dev/stdout`, `/dev/fd/1`) is written
        // through the descriptor the shell opened: with `>> file` it appends,
        // where opening the name anew reaches the file itself (renamed over,
        // or truncated).
        if to_stdout(path) {
            let fd = std::io::stdout().as_fd().try_clone_to_owned().map_err(io_err(path))?;
            return Ok(Self {
                path: path.to_owned(),
                out: BufWriter::new(File::from(fd)),
                partial: None,
                broken: None,
                reader_gone: false,
            });
        }
        // Another descriptor or a device (`/dev/fd/N`, `/dev/null`) holds
        // nothing to keep and cannot be replaced: added to, never truncated.
        if path.starts_with("/dev/")
            || path.starts_with("/proc/")
            || std::fs::metadata(path).is_ok_and(|m| !m.is_file())
        {
            let file = OpenOptions::new().append(true).open(path).map_err(io_err(path))?;
            return Ok(Self {
                path: path.to_owned(),
                out: BufWriter::new(file),
                partial: None,
                broken: None,
                reader_gone: false,
            });
        }
        create_parent(path)?;
        // A symlink is written through, as truncating it did: the file it
        // points to is replaced, not the link.
        let target = match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).map_err(io_err(path))?,
            _ => path.to_owned(),
        };
        let name = target
            .file_name()
            .ok_or_else(|| TriageError::Usage(format!("{}: not a file name", path.display())))?;
        // Named for the file it becomes, cut short enough that a name near
        // the file system's limit (255 bytes) leaves room for the rest.
        let name = name.to_string_lossy();
        let mut cut = name.len().min(200);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        remove_abandoned_partials(&target, &name[..cut]);
        let partial = target.with_file_name(format!(".{}.{}.partial", &name[..cut], std::process::id()));
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        private(&mut opts);
        let file = opts.open(&partial).map_err(io_err(&partial))?;
        // The file it replaces keeps its permissions (a reader it was shared with).
        if let Ok(m) = std::fs::metadata(&target) {
            let _ = file.set_permissions(m.permissions());
        }
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(file),
            partial: Some((partial, target)),
            broken: None,
            reader_gone: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, line: &ExportedMessage) -> Result<(), TriageError> {
        if self.reader_gone {
            return Ok(());
        }
        let mut bytes = serde_json::to_vec(line).expect("export lines serialize");
        bytes.push(b'\n');
        let written = self.out.write_all(&bytes);
        self.unless_reader_gone(written)
    }

    /// Whether standard output's reader went away: the export then ends
    /// there, as any command's output does when its reader goes (`| head`),
    /// where it failed with "Broken pipe" (exit 1).
    pub fn reader_gone(&self) -> bool {
        self.reader_gone
    }

    fn unless_reader_gone(&mut self, r: std::io::Result<()>) -> Result<(), TriageError> {
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe && to_stdout(&self.path) => {
                self.reader_gone = true;
                Ok(())
            }
            r => r.map_err(io_err(&self.path)),
        }
    }

    /// Append `lines` and sync, whole or not at all: a write that fails
    /// half-way (a full disk) is cut back to where the batch began. The file
    /// ended in a torn line that the next batch's first line was glued to, so
    /// the line of a message then deleted could not be imported, and the
    /// batch's whole lines were of messages left in the DLQ. After a failure
    /// every later batch is refused.
    pub fn append_batch(&mut self, lines: &[ExportedMessage]) -> Result<(), TriageError> {
        if let Some(e) = &self.broken {
            let e = std::io::Error::other(format!("an earlier write failed ({e}); nothing more is written"));
            return Err(io_err(&self.path)(e));
        }
        let mut bytes = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut bytes, line).expect("export lines serialize");
            bytes.push(b'\n');
        }
        let written = self.out.flush().and_then(|()| {
            // Past the (empty) buffer, straight to the file.
            let file = self.out.get_mut();
            let start = file.metadata()?.len();
            file.write_all(&bytes).and_then(|()| file.sync_data()).inspect_err(|_| {
                let _ = file.set_len(start).and_then(|()| file.sync_data());
            })
        });
        if let Err(e) = &written {
            self.broken = Some(e.to_string());
        }
        written.map_err(io_err(&self.path))
    }

    /// Flush and fsync: what was written survives a crash. A pipe or a
    /// terminal cannot be synced, and needs no more than the flush.
    pub fn sync(&mut self) -> Result<(), TriageError> {
        if self.reader_gone {
            return Ok(());
        }
        let flushed = self.out.flush();
        self.unless_reader_gone(flushed)?;
        if self.reader_gone {
            return Ok(());
        }
        match self.out.get_ref().sync_data() {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput && self.partial.is_none() => Ok(()),
            r => r.map_err(io_err(&self.path)),
        }
    }

    /// Sync, and put a [`ExportWriter::create_replacing`] file in place.
    pub fn commit(mut self) -> Result<(), TriageError> {
        self.sync()?;
        if let Some((partial, target)) = self.partial.take() {
            if let Err(e) = std::fs::rename(&partial, &target) {
                let _ = std::fs::remove_file(&partial);
                return Err(io_err(&self.path)(e));
            }
            // The rename itself is durable only once the directory is synced.
            crate::engine::journal::sync_parent_dir(&target);
        }
        Ok(())
    }
}

impl Drop for ExportWriter {
    fn drop(&mut self) {
        if let Some((partial, _)) = &self.partial {
            let _ = std::fs::remove_file(partial);
        }
    }
}

/// Exports and backups hold message bodies, which may be personal data: a
/// file dlq-bridge creates is readable by its owner only.
fn private(opts: &mut OpenOptions) {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(opts, 0o600);
}

/// A backup cut short by a crash can end in half a line; appending to it as
/// it is would glue the next message to that half, and that message (deleted
/// from the DLQ once backed up) would be unreadable too. End the half line.
fn end_last_line(file: &mut File) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 || !file.metadata()?.is_file() {
        return Ok(());
    }
    let mut last = [0u8];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
    }
    Ok(())
}

fn create_parent(path: &Path) -> Result<(), TriageError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(path))?;
    }
    Ok(())
}

/// Read an export file line by line (one line in memory at a time).
pub fn read_export(path: &Path) -> Result<impl Iterator<Item = Result<ExportedMessage, TriageError>>, TriageError> {
    Ok(read_numbered(path)?.map(|r| r.map(|(_, line)| line)))
}

/// [`read_export`], each line with its number in the file (blank lines
/// count, as in an editor), so that errors found later can name it.
pub(super) fn read_numbered(
    path: &Path,
) -> Result<impl Iterator<Item = Result<(usize, ExportedMessage), TriageError>>, TriageError> {
    Ok(read_numbered_from(File::open(path).map_err(io_err(path))?, path))
}

/// [`read_numbered`] of a file already open, from where it stands; `path`
/// names it in errors.
pub(super) fn read_numbered_from(
    file: impl std::io::Read,
    path: &Path,
) -> impl Iterator<Item = Result<(usize, ExportedMessage), TriageError>> {
    let path = path.to_owned();
    BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(move |(i, line)| {
            let bad = |message: String| TriageError::BadLine {
                path: path.clone(),
                line: i + 1,
                message,
            };
            let line = line.map_err(|e| match e.kind() {
                // Not UTF-8: the line's fault, not the file system's.
                std::io::ErrorKind::InvalidData => bad(e.to_string()),
                _ => io_err(&path)(e),
            })?;
            // serde's "at line 1 column 16" after `FILE:3:` read as a
            // contradiction: the line is the file's, the column the line's.
            serde_json::from_str(&line).map(|m| (i + 1, m)).map_err(|e| {
                let text = e.to_string();
                let text = match text.rsplit_once(" at line ") {
                    Some((what, _)) if e.column() > 0 => format!("{what} at column {}", e.column()),
                    _ => text,
                };
                // What a crash leaves of the batch being written (a backup's
                // is appended, then synced, then deleted from the DLQ).
                if e.is_eof() || line.contains('\0') {
                    bad(format!(
                        "{text}: the line is cut short, as a crash while it was written leaves it; in a purge's backup, a batch cut short was never deleted from the DLQ, so the line can be removed"
                    ))
                } else {
                    bad(text)
                }
            })
        })
}

/// A partial file not written to for this long, whose process is gone, was
/// left by an export killed before its end. The age guards one of another
/// PID namespace (a container sharing the directory), which `/proc` here
/// cannot see, as long as it is writing.
const ABANDONED_PARTIAL_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Remove what exports to `target` killed before they could clean up (kill
/// -9, an OOM kill) left: `.NAME.PID.partial` files whose process is gone
/// and that nothing wrote to for [`ABANDONED_PARTIAL_AGE`]. They hold
/// message bodies, and each run's has a name of its own, so they piled up.
/// Only where a process's liveness can be told (`/proc`); one still running
/// (another export to the same file) is left alone.
fn remove_abandoned_partials(target: &Path, name: &str) {
    let Some(dir) = target
        .parent()
        .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
    else {
        return;
    };
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(".partial"))
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|idle| idle >= ABANDONED_PARTIAL_AGE);
        if idle && !Path::new("/proc").join(pid).exists() {
            tracing::info!(file = %entry.path().display(), "removing what an export killed before its end left");
            let _ = std::fs::remove_file(entry.path());
        }
    }
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
    /// Messages not read: held back by the provider (see [`super::ReadStats::held_back`]).
    pub held_back: u64,
    /// The provider's limit on messages leased at once stopped the read
    /// (see [`super::ReadStats::hold_limited`]).
    pub hold_limited: bool,
    /// Stopped by an interrupt: nothing was written to `file`.
    pub interrupted: bool,
}

/// Write every message of `queue` matching `filter` to `path`, one JSON line
/// each, as it is read. `max` caps the lines written, `scan` the messages
/// read: by default the whole DLQ, and on a provider with a true peek
/// (one browse) [`DEFAULT_PEEK_CAP`], or `max` when that is larger.
/// `path` is replaced only once the export is complete.
pub async fn export(
    registry: &Registry,
    queue: &str,
    path: &Path,
    filter: Option<&str>,
    max: Option<u64>,
    scan: Option<usize>,
    cancel: &CancellationToken,
) -> Result<ExportSummary, TriageError> {
    let filter = compile(filter)?;
    let backend = registry.backend(queue).await?;
    let mut writer = ExportWriter::create_replacing(path)?;
    let read_cap = scan.unwrap_or(if backend.capabilities().true_peek {
        DEFAULT_PEEK_CAP.max(max.map_or(0, |m| usize::try_from(m).unwrap_or(usize::MAX)))
    } else {
        usize::MAX
    });
    let mut written = 0u64;
    let mut errors = 0u64;
    let now = Utc::now();
    let stats = browse(&backend, read_cap, registry.config().redrive.hold, cancel, |m| {
        if max.is_some_and(|cap| written >= cap) {
            return Ok(false);
        }
        match filter.matches(m, now) {
            Ok(true) => {
                writer.write(&ExportedMessage::new(m, queue, &*backend))?;
                if writer.reader_gone() {
                    return Ok(false);
                }
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
    // An interrupted export is not the export asked for: the file it was to
    // replace stays as it was (dropping the writer removes the partial one).
    if !stats.interrupted {
        writer.commit()?;
    }
    Ok(ExportSummary {
        queue: queue.to_string(),
        file: path.to_owned(),
        read: stats.read,
        written,
        filter_errors: errors,
        capped: stats.capped && max.is_none_or(|cap| written < cap),
        true_peek: stats.true_peek,
        held_back: stats.held_back,
        hold_limited: stats.hold_limited,
        interrupted: stats.interrupted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DlqMessage;

    #[test]
    fn dated_paths_of_one_process_never_repeat() {
        let dir = Path::new("/d");
        let names: std::collections::HashSet<PathBuf> = (0..200).map(|_| dated_path(dir, "q")).collect();
        assert_eq!(names.len(), 200);
    }

    /// What an export killed before its end left next to its file is
    /// removed by the next export to that file; another running export's
    /// is not, nor another file's.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_export_removes_what_killed_exports_to_its_file_left() {
        let dir = std::env::temp_dir().join(format!("dlqb-partials-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        // PIDs are below 2^22 on Linux: this one is no process.
        let dead = dir.join(".out.jsonl.99999999.partial");
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let alive = dir.join(format!(".out.jsonl.{}.partial", child.id()));
        let other = dir.join(".other.jsonl.99999999.partial");
        let old = std::time::SystemTime::now() - 2 * ABANDONED_PARTIAL_AGE;
        for f in [&dead, &alive, &other] {
            std::fs::write(f, "{}\n").unwrap();
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        // Written to lately: perhaps an export of another PID namespace.
        let recent = dir.join(".out.jsonl.99999998.partial");
        std::fs::write(&recent, "{}\n").unwrap();
        let w = ExportWriter::create_replacing(&path).unwrap();
        assert!(!dead.exists(), "a killed export's partial file");
        assert!(alive.exists(), "a running export's");
        assert!(other.exists() && recent.exists());
        drop(w);
        let _ = child.kill();
        let _ = child.wait();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn appending_after_a_half_written_line_keeps_the_new_line_readable() {
        let dir = std::env::temp_dir().join(format!("dlqb-export-{}", uuid::Uuid::new_v4().simple()));
        let path = dir.join("backup.jsonl");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, "{\"queue\":\"q\",\"id\":\"cut sh").unwrap();
        let m = DlqMessage {
            id: "m1".into(),
            body: Bytes::from_static(b"x"),
            attributes: Default::default(),
            properties: Properties::new(),
            reason: None,
            description: None,
            delivery_count: None,
            enqueued_at: None,
            source: None,
            ordering_key: None,
        };
        let line = ExportedMessage {
            queue: "q".into(),
            backend: "sqs".into(),
            id: m.id.clone(),
            body_base64: "eA==".into(),
            body_preview: "x".into(),
            body_bytes: 1,
            attributes: Default::default(),
            properties: Properties::new(),
            reason: None,
            description: None,
            delivery_count: None,
            enqueued_at: None,
            source: None,
            ordering_key: None,
            provider_attributes: vec![],
            exported_at: Utc::now(),
        };
        let mut w = ExportWriter::create(&path, true).unwrap();
        w.write(&line).unwrap();
        w.sync().unwrap();
        drop(w);
        let read: Vec<_> = read_numbered(&path).unwrap().collect();
        assert_eq!(read.len(), 2);
        assert!(matches!(read[0], Err(TriageError::BadLine { line: 1, .. })));
        let (n, back) = read[1].as_ref().unwrap();
        assert_eq!((*n, back.to_message().unwrap()), (2, m));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Message bodies stay with the file's owner: new exports and backups
    /// are 0600, and a file an export replaces keeps the mode it had.
    #[cfg(unix)]
    #[test]
    fn exports_are_private_unless_they_replace_a_shared_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dlqb-export-{}", uuid::Uuid::new_v4().simple()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = dir.join("fresh.jsonl");
        ExportWriter::create_replacing(&fresh).unwrap().commit().unwrap();
        assert_eq!(mode(&fresh), 0o600);
        let backup = dir.join("backup.jsonl");
        drop(ExportWriter::create(&backup, true).unwrap());
        assert_eq!(mode(&backup), 0o600);
        let shared = dir.join("shared.jsonl");
        std::fs::write(&shared, "").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        ExportWriter::create_replacing(&shared).unwrap().commit().unwrap();
        assert_eq!(mode(&shared), 0o640);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn replacing_writes_through_a_symlink_and_keeps_the_old_file_until_commit() {
        let dir = std::env::temp_dir().join(format!("dlqb-export-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let real = dir.join("real/out.jsonl");
        let link = dir.join("out.jsonl");
        std::fs::write(&real, "old\n").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let w = ExportWriter::create_replacing(&link).unwrap();
        drop(w);
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "old\n", "dropped: kept");
        let mut w = ExportWriter::create_replacing(&link).unwrap();
        w.out.write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "old\n", "not committed yet");
        w.commit().unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "new\n");
        let names: Vec<_> = std::fs::read_dir(dir.join("real")).unwrap().collect();
        assert_eq!(names.len(), 1, "no partial file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A name the file system takes (up to 255 bytes) is not refused
    /// because the temporary file's name, longer, is not.
    #[test]
    fn a_long_file_name_is_replaced_too() {
        let dir = std::env::temp_dir().join(format!("dlqb-export-{}", uuid::Uuid::new_v4().simple()));
        let long = dir.join(format!("{}.jsonl", "é".repeat(120)));
        assert_eq!(long.file_name().unwrap().len(), 246);
        let mut w = ExportWriter::create_replacing(&long).unwrap();
        w.out.write_all(b"new\n").unwrap();
        w.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&long).unwrap(), "new\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_line_that_is_not_utf8_is_named() {
        let dir = std::env::temp_dir().join(format!("dlqb-export-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("latin1.jsonl");
        std::fs::write(&path, b"\n\n{\"queue\": \"caf\xe9\"}\n").unwrap();
        let err = read_numbered(&path).unwrap().next().unwrap().unwrap_err();
        assert!(err.is_usage(), "{err}");
        assert!(err.to_string().starts_with(&format!("{}:3: ", path.display())), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
