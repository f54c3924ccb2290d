//! The redrive journal: an append-only JSONL file that is both the audit trail
//! (DESIGN §3, guarantee 9) and the record that makes a restarted run
//! effectively-once (guarantee 2).
//!
//! A message's `sent` record is made durable (fsync) before the message is
//! settled. A run that finds `sent` without `settled` for a message it leases
//! settles it instead of sending a second copy.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The cause is in the message and not a `source`, so that an error
    /// chain printed whole (`{:#}`) does not say it twice.
    #[error("journal {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(
        "journal {path}:{line}: not a journal record: {message}. To go on, keep a copy of the file and delete that \
         line (a run without the journal would forget the copies it records as sent)"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "journal {path} is in use by another dlq-bridge process ({holder}): two processes writing one journal would \
         each miss what the other sent, and a rotation by one would lose the other's records. Run this through that \
         process (the sidecar's API: POST /v1/queues/QUEUE/redrive), wait for it to end, or give this one another \
         journal (--journal PATH, or redrive.journal in the config)"
    )]
    InUse { path: PathBuf, holder: String },
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    RunStarted {
        run: String,
        at: DateTime<Utc>,
        queue: String,
        /// `redrive`, `purge` or `import`, so that a run that never finished
        /// still says what it was. Absent in journals written before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        action: Option<String>,
        trigger: String,
        filter: String,
        dry_run: bool,
        destination: Option<String>,
    },
    /// Written (and fsynced) before a copy is sent. `redrive_id` is the mark
    /// the copy carries; a resend after a crash reuses it, so consumers that
    /// dedupe on `dlq-bridge-redrive-id` see one message.
    Leased {
        run: String,
        /// The configured queue the message was leased from. Replay state is
        /// kept per queue: IDs repeat across queues (two subscriptions of one
        /// topic, Service Bus MessageIds chosen by senders). Records of
        /// journals written before it was recorded take their run's queue.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue: Option<String>,
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        redrive_id: Option<String>,
    },
    Sent {
        run: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue: Option<String>,
        id: String,
        /// The original's enqueue time: a message leased later is this one
        /// only if it matches too (see `Replay::settled`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        enqueued_at: Option<DateTime<Utc>>,
        destination: String,
        dest_id: String,
    },
    /// The copy of `id` was not confirmed sent: refused, or its answer lost.
    SendFailed {
        run: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue: Option<String>,
        id: String,
        error: String,
    },
    Settled {
        run: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue: Option<String>,
        id: String,
        /// The settled message's enqueue time, when the provider gives one:
        /// it tells the same message leased again (a settle that did not take
        /// effect) from a new one that reuses the ID (Service Bus MessageIds
        /// are the sender's to choose).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        enqueued_at: Option<DateTime<Utc>>,
    },
    SettleFailed {
        run: String,
        id: String,
        error: String,
    },
    /// A purge removed this message (after writing it to the backup, when
    /// the purge had one).
    Purged {
        run: String,
        id: String,
        /// The message's failure reason, for the audit trail.
        reason: Option<String>,
    },
    /// `import` sent this copy of an exported message to `destination`. Not a
    /// `sent` record: the original is not in any DLQ this run could settle.
    Imported {
        run: String,
        id: String,
        destination: String,
        dest_id: String,
        /// The exported message's enqueue time: with its ID, what a later
        /// import of the same line is known by (absent in records written
        /// before it was kept).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        enqueued_at: Option<DateTime<Utc>>,
    },
    RunFinished {
        run: String,
        at: DateTime<Utc>,
        summary: serde_json::Value,
    },
}

/// Replay state per configured queue, then per message ID: IDs repeat across
/// queues. Records from journals that predate the queue field, whose run is
/// unknown too, are under the queue `""` and are found from every queue.
#[derive(Debug)]
struct PerQueue<T>(HashMap<String, HashMap<String, T>>);

impl<T> Default for PerQueue<T> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<T> PerQueue<T> {
    fn get(&self, queue: &str, id: &str) -> Option<&T> {
        let at = |q: &str| self.0.get(q).and_then(|ids| ids.get(id));
        at(queue).or_else(|| at(""))
    }

    fn insert(&mut self, (queue, id): (String, String), value: T) {
        self.0.entry(queue).or_default().insert(id, value);
    }

    fn remove(&mut self, (queue, id): &(String, String)) -> Option<T> {
        let ids = self.0.get_mut(queue)?;
        let value = ids.remove(id);
        if ids.is_empty() {
            self.0.remove(queue);
        }
        value
    }

    /// The entry under exactly this queue (no fallback to `""`).
    fn get_exact(&self, (queue, id): &(String, String)) -> Option<&T> {
        self.0.get(queue).and_then(|ids| ids.get(id))
    }

    fn get_exact_mut(&mut self, (queue, id): &(String, String)) -> Option<&mut T> {
        self.0.get_mut(queue).and_then(|ids| ids.get_mut(id))
    }

    /// Keep only the entries `keep` says yes to.
    fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.0.retain(|_, ids| {
            ids.retain(|_, v| keep(v));
            !ids.is_empty()
        });
    }

    /// Every entry, with its queue and ID.
    fn iter(&self) -> impl Iterator<Item = (&String, &String, &T)> {
        self.0
            .iter()
            .flat_map(|(q, ids)| ids.iter().map(move |(id, v)| (q, id, v)))
    }
}

/// A copy an earlier run sent.
#[derive(Debug, Clone)]
struct Copy {
    destination: String,
    dest_id: String,
    /// The original's enqueue time, when the record has one.
    enqueued_at: Option<DateTime<Utc>>,
}

/// A message an earlier run sent and settled: all it takes to know the
/// message if it is leased again. Where its copy went is not kept: a sidecar
/// holds one of these per message its journal remembers.
#[derive(Debug, Clone, Copy)]
struct SettledCopy {
    enqueued_at: DateTime<Utc>,
    /// The journal file the record is in (see `Replay::generation`).
    generation: u64,
}

impl Copy {
    /// Whether a message leased now, enqueued at `at`, is the original of
    /// this copy. A record without a time cannot tell, and says yes.
    fn of(&self, at: Option<DateTime<Utc>>) -> bool {
        self.enqueued_at.is_none() || self.enqueued_at == at
    }
}

/// A copy an earlier run set out to send and never recorded as sent.
#[derive(Debug, Clone)]
struct Intent {
    redrive_id: String,
    /// The run recorded the send as failed: it did not die inside it.
    failed: bool,
}

/// What earlier runs left unfinished: copies sent whose DLQ original was
/// never settled.
#[derive(Debug, Default)]
struct Replay {
    sent: PerQueue<Copy>,
    /// Messages sent and settled by an earlier run. One that is leased again
    /// was not really settled: its lease (visibility timeout, ack deadline,
    /// lock) ran out before the delete, ack or complete reached the provider,
    /// which then drops it without telling the client (a Pub/Sub ack, a
    /// link-level Service Bus complete). Its copy is at the destination, so it
    /// is settled again, never resent. It is the same message only when its
    /// enqueue time matches too (a redriven copy that fails again comes back
    /// under a new ID, but a sender may reuse a Service Bus MessageId).
    settled: PerQueue<SettledCopy>,
    /// The redrive ID of each copy an earlier run set out to send.
    intents: PerQueue<Intent>,
    /// Exported messages an import sent, by destination and ID: a second
    /// import of the same line skips it. Forgotten with their file, like
    /// settled copies.
    imported: PerQueue<SettledCopy>,
    /// The queue of each run, from its `run_started` record: the queue of
    /// records written before records named it.
    run_queues: HashMap<String, String>,
    /// Which journal file the records being applied are in: it counts up by
    /// one per file, oldest first, and by one at each rotation. A settled
    /// copy is forgotten when its file is deleted, as a restart would, so
    /// that a sidecar's memory stays bounded by what its journal keeps.
    generation: u64,
}

impl Replay {
    fn key(&self, run: &str, queue: &Option<String>, id: &str) -> (String, String) {
        let queue = queue
            .clone()
            .or_else(|| self.run_queues.get(run).cloned())
            .unwrap_or_default();
        (queue, id.to_string())
    }

    /// Whether `apply` keeps anything of records of this kind.
    fn cares_about(record: &Record) -> bool {
        matches!(
            record,
            Record::RunStarted { .. }
                | Record::Leased {
                    redrive_id: Some(_),
                    ..
                }
                | Record::Sent { .. }
                | Record::SendFailed { .. }
                | Record::Settled { .. }
                | Record::Purged { .. }
                | Record::Imported {
                    enqueued_at: Some(_),
                    ..
                }
                | Record::RunFinished { .. }
        )
    }

    /// Keep what `record` changes about unfinished work.
    fn apply(&mut self, record: &Record) {
        match record {
            Record::RunStarted { run, queue, .. } => {
                self.run_queues.insert(run.clone(), queue.clone());
            }
            Record::Leased {
                run,
                queue,
                id,
                redrive_id: Some(rid),
            } => {
                let key = self.key(run, queue, id);
                match self.intents.get_exact_mut(&key) {
                    // The first redrive ID stays (the copies keep it), but a
                    // new send is under way: a crash inside it makes the
                    // next copy a resend again, whatever an earlier send did.
                    Some(intent) => intent.failed = false,
                    None => {
                        let intent = Intent {
                            redrive_id: rid.clone(),
                            failed: false,
                        };
                        self.intents.insert(key, intent);
                    }
                }
            }
            // Known to have ended (refused, or its answer lost): a later copy
            // is no resend after a crash, though it keeps the redrive ID, as
            // a send whose answer was lost may have arrived.
            Record::SendFailed { run, queue, id, .. } => {
                let key = self.key(run, queue, id);
                if let Some(intent) = self.intents.get_exact_mut(&key) {
                    intent.failed = true;
                }
            }
            Record::Sent {
                run,
                queue,
                id,
                enqueued_at,
                destination,
                dest_id,
            } => {
                let key = self.key(run, queue, id);
                let copy = Copy {
                    destination: destination.clone(),
                    dest_id: dest_id.clone(),
                    enqueued_at: *enqueued_at,
                };
                self.sent.insert(key, copy);
            }
            Record::Settled {
                run,
                queue,
                id,
                enqueued_at,
            } => {
                let key = self.key(run, queue, id);
                let legacy = (String::new(), id.clone());
                // Another message under the same ID does not settle this copy.
                let sent = [&key, &legacy]
                    .into_iter()
                    .find(|k| self.sent.get_exact(k).is_some_and(|c| c.of(*enqueued_at)));
                if let (Some(_), Some(at)) = (sent.and_then(|k| self.sent.remove(k)), enqueued_at) {
                    let settled = SettledCopy {
                        enqueued_at: *at,
                        generation: self.generation,
                    };
                    self.settled.insert(key.clone(), settled);
                }
                self.intents.remove(&key);
                self.intents.remove(&legacy);
            }
            // A purged message is gone from its DLQ for good: no later run
            // will lease it, so what an earlier run sent or meant to send of
            // it needs no settling. Kept, it would be carried into every
            // rotated file for as long as the sidecar runs.
            Record::Purged { run, id, .. } => {
                let key = self.key(run, &None, id);
                let legacy = (String::new(), id.clone());
                for k in [&key, &legacy] {
                    self.sent.remove(k);
                    self.intents.remove(k);
                }
            }
            Record::Imported {
                id,
                destination,
                enqueued_at: Some(at),
                ..
            } => {
                let copy = SettledCopy {
                    enqueued_at: *at,
                    generation: self.generation,
                };
                self.imported.insert((destination.clone(), id.clone()), copy);
            }
            Record::RunFinished { run, .. } => {
                self.run_queues.remove(run);
            }
            _ => {}
        }
    }

    /// The journal rotated: forget the settled copies whose records were in
    /// the file it deleted. Copies not yet settled and intents are carried
    /// into the new file, so they stay.
    fn rotated(&mut self, keep: usize) {
        self.generation += 1;
        let oldest_kept = self.generation.saturating_sub(keep as u64);
        self.settled.retain(|c| c.generation >= oldest_kept);
        self.imported.retain(|c| c.generation >= oldest_kept);
    }
}

/// The run ID of the records a rotation copies into the new file (copies
/// not yet settled, intents): they belong to earlier runs, whose own records
/// are in the rotated files.
pub const CARRIED_RUN: &str = "carried";

/// When the journal is rotated and how many rotated files are kept
/// (`journal.jsonl.1` is the newest). A sidecar appends for months, so the
/// file must not grow without bound.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: usize,
}

impl From<&crate::config::RedriveConfig> for Rotation {
    fn from(c: &crate::config::RedriveConfig) -> Self {
        Self {
            max_bytes: c.journal_max_bytes,
            keep: c.journal_keep,
        }
    }
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            keep: 5,
        }
    }
}

struct Writer {
    file: BufWriter<File>,
    /// Bytes in the active file, including what is still buffered.
    bytes: u64,
    /// Why a record could not be written, if one could not. Every later
    /// sync fails with it: a sync that succeeded after a record was lost
    /// would let a send or a settle go ahead that the journal does not know
    /// about (and the lost record may be another task's).
    lost: Option<String>,
}

pub struct Journal {
    path: PathBuf,
    /// `PATH.lock`, locked (flock) for as long as this journal is open: one
    /// process writes a journal at a time. Each keeps what it read in
    /// memory, and rotation renames the file under any other writer.
    _lock: Option<File>,
    rotation: Rotation,
    writer: Mutex<Writer>,
    replay: Mutex<Replay>,
}

impl Journal {
    /// Open (or create) a journal with the default rotation, reading what
    /// earlier runs recorded.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        Self::open_with(path, Rotation::default())
    }

    pub fn open_with(path: &Path, rotation: Rotation) -> Result<Self, JournalError> {
        let io = |error| JournalError::Io {
            path: path.to_owned(),
            error,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock = lock(path)?;
        let mut replay = Replay::default();
        for file in record_files(path, rotation.keep) {
            for record in read_records(&file)? {
                replay.apply(&record);
            }
            replay.generation += 1;
        }
        // The active file's generation.
        replay.generation -= 1;
        let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        // Start on a fresh line after a torn write, so the next record is whole.
        let mut bytes = file.metadata().map_err(io)?.len();
        if bytes > 0 && !ends_with_newline(path).map_err(io)? {
            file.write_all(b"\n").map_err(io)?;
            bytes += 1;
        }
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
            rotation,
            writer: Mutex::new(Writer {
                file: BufWriter::new(file),
                bytes,
                lost: None,
            }),
            replay: Mutex::new(replay),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A message of `queue` an earlier run sent (to `destination`, as
    /// `dest_id`) but did not settle.
    pub fn unsettled(&self, queue: &str, id: &str) -> Option<(String, String)> {
        let r = self.replay.lock().expect("journal lock");
        r.sent
            .get(queue, id)
            .map(|c| (c.destination.clone(), c.dest_id.clone()))
    }

    /// Whether an earlier run sent a copy of message `id` of `queue`, settled
    /// or not: a leased message with a copy already out is settled, never
    /// resent. That covers one recorded as settled, too: if it is leased
    /// again, the settle did not take effect (see `Replay::settled`). A copy
    /// is of this message only if the enqueue times match, where the record
    /// has one: a sender may reuse an ID.
    pub fn already_sent(&self, queue: &str, id: &str, enqueued_at: Option<DateTime<Utc>>) -> bool {
        let r = self.replay.lock().expect("journal lock");
        r.sent.get(queue, id).is_some_and(|c| c.of(enqueued_at))
            || r.settled
                .get(queue, id)
                .is_some_and(|c| Some(c.enqueued_at) == enqueued_at)
    }

    /// Whether an earlier import sent the exported message `id`, enqueued
    /// at `enqueued_at`, to `destination`. A message without an enqueue time
    /// cannot be told from another under the same ID, and says no.
    pub fn already_imported(&self, destination: &str, id: &str, enqueued_at: Option<DateTime<Utc>>) -> bool {
        let r = self.replay.lock().expect("journal lock");
        let key = (destination.to_string(), id.to_string());
        enqueued_at.is_some_and(|at| r.imported.get_exact(&key).is_some_and(|c| c.enqueued_at == at))
    }

    /// The redrive ID an earlier run gave its copy of message `id` of
    /// `queue`, when that run set out to send it and never recorded it sent,
    /// and whether it recorded the send as failed (else it crashed inside
    /// the send).
    pub fn prior_redrive_id(&self, queue: &str, id: &str) -> Option<(String, bool)> {
        self.replay
            .lock()
            .expect("journal lock")
            .intents
            .get(queue, id)
            .map(|i| (i.redrive_id.clone(), i.failed))
    }

    pub fn append(&self, record: &Record) -> Result<(), JournalError> {
        if Replay::cares_about(record) {
            self.replay.lock().expect("journal lock").apply(record);
        }
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        let mut w = self.writer.lock().expect("journal lock");
        w.bytes += line.len() as u64;
        let written = w.file.write_all(&line);
        if let Err(e) = &written {
            w.lost.get_or_insert_with(|| e.to_string());
        }
        written.map_err(|e| self.io(e))
    }

    fn io(&self, error: std::io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            error,
        }
    }

    /// Flush and fsync: called once per batch, before its messages are sent
    /// and before they are settled. Rotates the file once it is too large.
    pub fn sync(&self) -> Result<(), JournalError> {
        let mut w = self.writer.lock().expect("journal lock");
        if let Some(lost) = &w.lost {
            return Err(self.io(std::io::Error::other(format!("a record could not be written ({lost})"))));
        }
        self.flush_to_disk(&mut w)?;
        if w.bytes > self.rotation.max_bytes {
            self.rotate(&mut w)?;
        }
        Ok(())
    }

    /// Shift `journal.jsonl.N` up by one (dropping the oldest beyond `keep`),
    /// move the active file to `.1` and start a new one. What is still
    /// unfinished (sent but not settled, about to be sent) is carried into
    /// the new file, so deleting old files never loses crash records.
    fn rotate(&self, w: &mut Writer) -> Result<(), JournalError> {
        let keep = self.rotation.keep.max(1);
        let _ = std::fs::remove_file(rotated(&self.path, keep));
        for k in (1..keep).rev() {
            let from = rotated(&self.path, k);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, k + 1)).map_err(|e| self.io(e))?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1)).map_err(|e| self.io(e))?;
        let file = match OpenOptions::new().create(true).append(true).open(&self.path) {
            Ok(file) => file,
            Err(e) => {
                // The records would go on into the file just renamed away,
                // and each later sync would rotate it one step older until
                // it was deleted: the journal is lost until a restart.
                w.lost
                    .get_or_insert_with(|| format!("a rotation could not open a new file: {e}"));
                return Err(self.io(e));
            }
        };
        *w = Writer {
            file: BufWriter::new(file),
            bytes: 0,
            lost: None,
        };
        let carried: Vec<Record> = {
            let mut r = self.replay.lock().expect("journal lock");
            r.rotated(keep);
            let queue = |q: &String| Some(q.clone()).filter(|q| !q.is_empty());
            let sent = r.sent.iter().map(|(q, id, c)| Record::Sent {
                run: CARRIED_RUN.into(),
                queue: queue(q),
                id: id.clone(),
                enqueued_at: c.enqueued_at,
                destination: c.destination.clone(),
                dest_id: c.dest_id.clone(),
            });
            let intents = r.intents.iter().flat_map(|(q, id, intent)| {
                let leased = Record::Leased {
                    run: CARRIED_RUN.into(),
                    queue: queue(q),
                    id: id.clone(),
                    redrive_id: Some(intent.redrive_id.clone()),
                };
                let failed = intent.failed.then(|| Record::SendFailed {
                    run: CARRIED_RUN.into(),
                    queue: queue(q),
                    id: id.clone(),
                    error: "carried from a rotated journal".into(),
                });
                std::iter::once(leased).chain(failed)
            });
            sent.chain(intents).collect()
        };
        for record in &carried {
            let mut line = serde_json::to_vec(record).expect("records serialize");
            line.push(b'\n');
            w.bytes += line.len() as u64;
            if let Err(e) = w.file.write_all(&line) {
                w.lost.get_or_insert_with(|| e.to_string());
                return Err(self.io(e));
            }
        }
        self.flush_to_disk(w)?;
        // The renames and the new file are durable once their directory is
        // synced: best effort, as some file systems refuse to sync one.
        sync_parent_dir(&self.path);
        Ok(())
    }

    /// Flush and fsync the active file. A failure marks the journal lost:
    /// Linux reports a failed write-back once and drops its pages, so a
    /// later fsync that succeeds would not mean these records, which other
    /// batches' intents may be among, are on disk.
    fn flush_to_disk(&self, w: &mut Writer) -> Result<(), JournalError> {
        if let Err(e) = w.file.flush().and_then(|_| w.file.get_ref().sync_data()) {
            w.lost.get_or_insert_with(|| e.to_string());
            return Err(self.io(e));
        }
        Ok(())
    }
}

/// Sync the directory that holds `path`, so that a rename or a file
/// created in it is durable: best effort (some file systems refuse it).
pub(crate) fn sync_parent_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Err(e) = File::open(dir).and_then(|d| d.sync_all())
    {
        tracing::debug!(error = %e, dir = %dir.display(), "syncing a directory failed");
    }
}

/// Lock `PATH.lock` for this process, or say which process holds it. A file
/// system without locks (some network mounts) is warned about, not refused.
fn lock(path: &Path) -> Result<Option<File>, JournalError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let io = |error| JournalError::Io {
        path: lock_path.clone(),
        error,
    };
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            let holder = holder.trim();
            return Err(JournalError::InUse {
                path: path.to_owned(),
                holder: if holder.is_empty() {
                    "unknown pid".into()
                } else {
                    holder.to_string()
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(journal = %path.display(), error = %e, "cannot lock the journal; make sure no other dlq-bridge process writes it");
            return Ok(None);
        }
    }
    // Who holds it, for the error another process gets.
    let _ = file.set_len(0);
    let _ = write!(file, "pid {}", std::process::id());
    Ok(Some(file))
}

/// The `n`th rotated file of the journal at `path` (`journal.jsonl.1` is the newest).
pub fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// A journal's rotated files and then the active one, oldest first.
fn record_files(path: &Path, keep: usize) -> impl Iterator<Item = PathBuf> + '_ {
    (1..=keep.max(1))
        .rev()
        .map(|k| rotated(path, k))
        .chain(std::iter::once(path.to_owned()))
}

/// Every record of a journal and its rotated files, oldest first.
pub fn read_all_records(path: &Path, keep: usize) -> Result<Vec<Record>, JournalError> {
    let mut out = Vec::new();
    for file in record_files(path, keep) {
        out.extend(read_records(&file)?);
    }
    Ok(out)
}

/// Every record in a journal file, oldest first. A torn line (a crash
/// mid-write leaves a truncated record) is skipped; any other damage is an
/// error.
pub fn read_records(path: &Path) -> Result<Vec<Record>, JournalError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(JournalError::Io {
                path: path.to_owned(),
                error,
            });
        }
    };
    let mut reader = BufReader::new(file);
    let mut out = Vec::new();
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(|error| JournalError::Io {
            path: path.to_owned(),
            error,
        })?;
        if read == 0 {
            break;
        }
        // An unterminated last line is what a crash mid-write leaves.
        let last_unterminated = line.last() != Some(&b'\n');
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        // A run of NUL bytes is what a file system may leave of blocks
        // allocated but not written before a power loss, alone on a line or
        // after a record cut short (which the next open ends with a line
        // break, so it is no longer the last line). A record never holds
        // one: JSON escapes control characters.
        if text.contains(&0) {
            tracing::warn!(path = %path.display(), line = number, "skipping a journal line with NUL bytes (a crash left it)");
            continue;
        }
        // Bytes, not text: a line torn inside a multi-byte character is
        // torn like any other, where reading it as UTF-8 refused the whole
        // file, and every command that opens the journal with it.
        match serde_json::from_slice(text) {
            Ok(r) => out.push(r),
            Err(e) if e.is_eof() || last_unterminated => {
                tracing::warn!(path = %path.display(), line = number, "skipping a torn journal line")
            }
            Err(e) => {
                return Err(JournalError::Corrupt {
                    path: path.to_owned(),
                    line: number,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

fn ends_with_newline(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path)?;
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotation that fails before the active file moves (here `.1`
    /// cannot be moved to `.2`, where a directory stands) leaves the records
    /// in the active file and is tried again at the next sync, which
    /// succeeds once the way is clear.
    #[test]
    fn a_failed_rotation_keeps_the_records_and_is_tried_again() {
        let dir = std::env::temp_dir().join(format!("dlqb-rotfail-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        std::fs::create_dir_all(&dir).unwrap();
        let j = Journal::open_with(
            &path,
            Rotation {
                max_bytes: 100,
                keep: 2,
            },
        )
        .unwrap();
        let settled = |i: usize| Record::Settled {
            run: "r".into(),
            queue: Some("orders".into()),
            id: format!("m{i}"),
            enqueued_at: None,
        };
        j.append(&settled(0)).unwrap();
        j.sync().unwrap();
        std::fs::create_dir_all(rotated(&path, 2).join("in-the-way")).unwrap();
        std::fs::write(rotated(&path, 1), b"").unwrap();
        j.append(&settled(1)).unwrap();
        assert!(j.sync().is_err());
        j.append(&settled(2)).unwrap();
        assert!(j.sync().is_err());
        let active = std::fs::read_to_string(&path).unwrap();
        assert_eq!(active.lines().count(), 3, "{active}");
        std::fs::remove_dir_all(rotated(&path, 2)).unwrap();
        j.append(&settled(3)).unwrap();
        j.sync().unwrap();
        assert_eq!(std::fs::read_to_string(rotated(&path, 1)).unwrap().lines().count(), 4);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A send that failed, then a later run that died inside its own send
    /// of the same message: the next copy is a resend after a crash again
    /// (its consumers may have it), under the first run's redrive ID.
    #[test]
    fn a_crash_inside_a_send_after_a_failed_one_is_a_resend() {
        let dir = std::env::temp_dir().join(format!("dlqb-resend-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        let leased = |run: &str| Record::Leased {
            run: run.into(),
            queue: Some("orders".into()),
            id: "m".into(),
            redrive_id: Some("r1:m".into()),
        };
        {
            let j = Journal::open(&path).unwrap();
            j.append(&leased("r1")).unwrap();
            j.append(&Record::SendFailed {
                run: "r1".into(),
                queue: Some("orders".into()),
                id: "m".into(),
                error: "throttled".into(),
            })
            .unwrap();
            j.sync().unwrap();
            assert_eq!(j.prior_redrive_id("orders", "m"), Some(("r1:m".into(), true)));
            j.append(&leased("r2")).unwrap();
            j.sync().unwrap();
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.prior_redrive_id("orders", "m"), Some(("r1:m".into(), false)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotation_keeps_n_files_and_carries_unfinished_work() {
        let dir = std::env::temp_dir().join(format!("dlqb-rot-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        let rotation = Rotation {
            max_bytes: 2_000,
            keep: 2,
        };
        {
            let j = Journal::open_with(&path, rotation).unwrap();
            j.append(&Record::Sent {
                run: "r0".into(),
                queue: Some("orders".into()),
                id: "unsettled".into(),
                enqueued_at: None,
                destination: "q".into(),
                dest_id: "d".into(),
            })
            .unwrap();
            for id in ["refused", "crashed"] {
                j.append(&Record::Leased {
                    run: "r0".into(),
                    queue: Some("orders".into()),
                    id: id.into(),
                    redrive_id: Some(format!("r0:{id}")),
                })
                .unwrap();
            }
            j.append(&Record::SendFailed {
                run: "r0".into(),
                queue: Some("orders".into()),
                id: "refused".into(),
                error: "too large".into(),
            })
            .unwrap();
            for i in 0..200 {
                j.append(&Record::Settled {
                    run: "r1".into(),
                    queue: Some("orders".into()),
                    id: format!("m{i}"),
                    enqueued_at: None,
                })
                .unwrap();
                j.sync().unwrap();
            }
        }
        assert!(rotated(&path, 1).exists() && rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists(), "only `keep` rotated files stay");
        for f in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(std::fs::metadata(&f).unwrap().len() < 4_000, "{f:?} is bounded");
        }
        let j = Journal::open_with(&path, rotation).unwrap();
        assert_eq!(
            j.unsettled("orders", "unsettled"),
            Some(("q".into(), "d".into())),
            "survives its original file being deleted"
        );
        // A send that failed stays a failed one, not a crash inside a send.
        assert_eq!(
            j.prior_redrive_id("orders", "refused"),
            Some(("r0:refused".into(), true))
        );
        assert_eq!(
            j.prior_redrive_id("orders", "crashed"),
            Some(("r0:crashed".into(), false))
        );
        assert_eq!(j.unsettled("payments", "unsettled"), None, "and keeps its queue");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A purge removes what earlier runs left unfinished of the messages it
    /// purged (a send that failed, a copy whose settle failed): they are gone
    /// from the DLQ, and carried into every rotated file they would only grow
    /// a sidecar's memory.
    #[test]
    fn a_purge_ends_what_earlier_runs_left_of_its_messages() {
        let dir = std::env::temp_dir().join(format!("dlqb-purged-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        let leased = |run: &str, id: &str| Record::Leased {
            run: run.into(),
            queue: Some("orders".into()),
            id: id.into(),
            redrive_id: Some(format!("{run}:{id}")),
        };
        let purged = |id: &str| Record::Purged {
            run: "p1".into(),
            id: id.into(),
            reason: None,
        };
        for reopened in [false, true] {
            let j = Journal::open(&path).unwrap();
            if !reopened {
                j.append(&started("r1", "orders")).unwrap();
                for id in ["a", "b", "c"] {
                    j.append(&leased("r1", id)).unwrap();
                }
                j.append(&sent("r1", Some("orders"), "b", None)).unwrap();
                j.append(&started("p1", "orders")).unwrap();
                j.append(&purged("a")).unwrap();
                j.append(&purged("b")).unwrap();
                j.sync().unwrap();
            }
            assert_eq!(j.prior_redrive_id("orders", "a"), None, "reopened: {reopened}");
            assert_eq!(j.unsettled("orders", "b"), None, "reopened: {reopened}");
            assert_eq!(
                j.prior_redrive_id("orders", "c"),
                Some(("r1:c".into(), false)),
                "reopened: {reopened}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A long-lived sidecar must not remember every message it ever settled:
    /// it forgets a settled copy when rotation deletes its record, so it
    /// knows exactly what a restart would.
    #[test]
    fn settled_copies_are_forgotten_with_their_file() {
        let dir = std::env::temp_dir().join(format!("dlqb-forget-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        let rotation = Rotation {
            max_bytes: 1_000,
            keep: 1,
        };
        let at = Some(Utc::now());
        let move_one = |j: &Journal, id: &str| {
            j.append(&sent("r1", Some("orders"), id, at)).unwrap();
            j.append(&Record::Settled {
                run: "r1".into(),
                queue: Some("orders".into()),
                id: id.into(),
                enqueued_at: at,
            })
            .unwrap();
            j.sync().unwrap();
        };
        let j = Journal::open_with(&path, rotation).unwrap();
        move_one(&j, "first");
        assert!(j.already_sent("orders", "first", at));
        let mut n = 0;
        // The first rotation moves its file to `.1`: still known.
        while !rotated(&path, 1).exists() {
            move_one(&j, &format!("m{n}"));
            n += 1;
        }
        assert!(j.already_sent("orders", "first", at), "its file is kept");
        let first_rotation = n;
        // The second deletes it.
        while n < 3 * first_rotation + 3 && j.already_sent("orders", "first", at) {
            move_one(&j, &format!("m{n}"));
            n += 1;
        }
        assert!(!read_all_records(&path, 1).unwrap().iter().any(|r| matches!(r,
            Record::Settled { id, .. } if id == "first")));
        assert!(!j.already_sent("orders", "first", at), "forgotten with its file");
        let last = format!("m{}", n - 1);
        assert!(j.already_sent("orders", &last, at));
        drop(j);
        let restarted = Journal::open_with(&path, rotation).unwrap();
        assert!(!restarted.already_sent("orders", "first", at));
        assert!(restarted.already_sent("orders", &last, at));
        let in_memory = |j: &Journal| j.replay.lock().unwrap().settled.iter().count();
        let reopened = in_memory(&restarted);
        assert!(reopened < n, "{reopened} of {n} kept");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A crash can leave a last line cut inside a multi-byte character, or
    /// blocks of NUL bytes: each is skipped like a torn line (the first
    /// refused the whole file, and every command that opens the journal). A
    /// damaged line in the middle is still an error naming its line.
    #[test]
    fn crash_remains_are_skipped_and_damage_in_the_middle_is_named() {
        let dir = std::env::temp_dir().join(format!("dlqb-journal-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j.jsonl");
        let line = |r: &Record| {
            let mut l = serde_json::to_vec(r).unwrap();
            l.push(b'\n');
            l
        };
        let whole = [
            line(&started("r1", "orders")),
            line(&sent("r1", Some("orders"), "a", None)),
        ]
        .concat();
        let mut torn = serde_json::to_vec(&sent("r1", Some("orders"), "üü", None)).unwrap();
        let cut = torn.iter().position(|&b| b == 0xC3).unwrap() + 1;
        torn.truncate(cut);
        assert!(std::str::from_utf8(&torn).is_err(), "cut inside the character");
        // A record cut short, then the NULs of blocks never written.
        let cut_then_nul = [torn[..20].to_vec(), vec![0u8; 300]].concat();
        for tail in [
            torn.clone(),
            vec![0u8; 4096],
            [vec![0u8; 100], b"\n".to_vec()].concat(),
            cut_then_nul,
        ] {
            std::fs::write(&path, [whole.clone(), tail].concat()).unwrap();
            assert_eq!(read_records(&path).unwrap().len(), 2);
            // Opened (which ends the torn line) and written on, it still reads.
            let j = Journal::open(&path).unwrap();
            assert_eq!(j.unsettled("orders", "a"), Some(("src".into(), "copy-of-a".into())));
            j.append(&sent("r2", Some("orders"), "b", None)).unwrap();
            j.sync().unwrap();
            drop(j);
            assert_eq!(read_records(&path).unwrap().len(), 3);
        }
        std::fs::write(&path, [whole.clone(), b"not json\n".to_vec(), whole].concat()).unwrap();
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains("j.jsonl:3: not a journal record"), "{e}");
        assert!(e.contains("delete that line"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_import_is_known_by_destination_id_and_enqueue_time() {
        let dir = std::env::temp_dir().join(format!("dlqb-journal-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        let at = Utc::now();
        let imported = |id: &str, enqueued_at| Record::Imported {
            run: "i1".into(),
            id: id.into(),
            destination: "q".into(),
            dest_id: "d".into(),
            enqueued_at,
        };
        let j = Journal::open(&path).unwrap();
        j.append(&imported("a", Some(at))).unwrap();
        j.append(&imported("old", None)).unwrap();
        j.sync().unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert!(j.already_imported("q", "a", Some(at)));
        assert!(!j.already_imported("other", "a", Some(at)), "another destination");
        assert!(
            !j.already_imported("q", "a", Some(at + chrono::Duration::seconds(1))),
            "a reused ID"
        );
        assert!(!j.already_imported("q", "a", None));
        assert!(
            !j.already_imported("q", "old", None),
            "a record without the time cannot tell"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_process_writes_a_journal_at_a_time() {
        let dir = std::env::temp_dir().join(format!("dlqb-journal-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        let first = Journal::open(&path).unwrap();
        // Another open (in another process, as here in this one) is refused,
        // naming the holder.
        let e = Journal::open(&path).err().expect("a second writer is refused");
        let text = e.to_string();
        assert!(matches!(e, JournalError::InUse { .. }), "{text}");
        assert!(text.contains(&format!("(pid {})", std::process::id())), "{text}");
        assert!(text.contains("another journal (--journal PATH"), "{text}");
        drop(first);
        assert!(Journal::open(&path).is_ok(), "free once the first is closed");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn replay_finds_sent_but_unsettled() {
        let enqueued = Utc::now();
        let dir = std::env::temp_dir().join(format!("dlqb-journal-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        {
            let j = Journal::open(&path).unwrap();
            for (id, settle) in [("a", true), ("b", false)] {
                j.append(&Record::Sent {
                    run: "r1".into(),
                    queue: None,
                    id: id.into(),
                    enqueued_at: None,
                    destination: "q".into(),
                    dest_id: format!("d-{id}"),
                })
                .unwrap();
                if settle {
                    j.append(&Record::Settled {
                        run: "r1".into(),
                        queue: None,
                        id: id.into(),
                        enqueued_at: Some(enqueued),
                    })
                    .unwrap();
                }
            }
            j.sync().unwrap();
        }
        // A crash mid-write leaves a torn line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"event\":\"sett").unwrap();
        drop(f);
        let j = Journal::open(&path).unwrap();
        // Records from before the queue was recorded, of a run whose start is
        // unknown, are found from any queue.
        assert_eq!(j.unsettled("orders", "a"), None);
        assert_eq!(j.unsettled("orders", "b"), Some(("q".into(), "d-b".into())));
        j.append(&Record::Settled {
            run: "r2".into(),
            queue: Some("orders".into()),
            id: "b".into(),
            enqueued_at: None,
        })
        .unwrap();
        j.sync().unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.unsettled("orders", "b"), None);
        // Settled, but should the same message be leased again, its copy is
        // already out; a new message reusing the ID is not that message.
        assert!(j.already_sent("orders", "a", Some(enqueued)));
        assert!(!j.already_sent("orders", "a", Some(enqueued + chrono::Duration::seconds(1))));
        assert!(!j.already_sent("orders", "a", None));
        // Settled without an enqueue time: not recognisable, so sent again.
        assert!(!j.already_sent("orders", "b", None));
        assert_eq!(read_records(&path).unwrap().len(), 4);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn sent(run: &str, queue: Option<&str>, id: &str, at: Option<DateTime<Utc>>) -> Record {
        Record::Sent {
            run: run.into(),
            queue: queue.map(Into::into),
            id: id.into(),
            enqueued_at: at,
            destination: "src".into(),
            dest_id: format!("copy-of-{id}"),
        }
    }

    fn started(run: &str, queue: &str) -> Record {
        Record::RunStarted {
            run: run.into(),
            at: Utc::now(),
            queue: queue.into(),
            action: Some("redrive".into()),
            trigger: "cli".into(),
            filter: "true".into(),
            dry_run: false,
            destination: None,
        }
    }

    /// One journal serves every queue, and IDs repeat across queues (two
    /// subscriptions of one topic, Service Bus MessageIds chosen by
    /// senders) and within one (a reused MessageId): a copy recorded for one
    /// message must never settle another without sending it.
    #[test]
    fn a_copy_settles_only_its_own_original() {
        let dir = std::env::temp_dir().join(format!("dlqb-keys-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(5);
        {
            let j = Journal::open(&path).unwrap();
            j.append(&started("r1", "billing")).unwrap();
            j.append(&sent("r1", Some("billing"), "order-42", Some(t0))).unwrap();
            // A record without a queue belongs to its run's queue.
            j.append(&sent("r1", None, "order-7", Some(t0))).unwrap();
            j.sync().unwrap();
        }
        for reopened in [false, true] {
            let j = Journal::open(&path).unwrap();
            let what = if reopened { "after a restart" } else { "" };
            assert!(j.already_sent("billing", "order-42", Some(t0)), "{what}");
            assert!(!j.already_sent("shipping", "order-42", Some(t0)), "{what}");
            assert!(!j.already_sent("billing", "order-42", Some(t1)), "{what}");
            assert!(j.already_sent("billing", "order-7", Some(t0)), "{what}");
            assert!(!j.already_sent("shipping", "order-7", Some(t0)), "{what}");
            if reopened {
                // Settling another message under the ID leaves this copy unsettled.
                j.append(&Record::Settled {
                    run: "r2".into(),
                    queue: Some("billing".into()),
                    id: "order-42".into(),
                    enqueued_at: Some(t1),
                })
                .unwrap();
                assert!(j.unsettled("billing", "order-42").is_some());
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_record_that_could_not_be_written_fails_every_later_sync() {
        let dir = std::env::temp_dir().join(format!("dlqb-lost-{}", uuid::Uuid::new_v4()));
        let path = dir.join("j.jsonl");
        let j = Journal::open(&path).unwrap();
        // A disk that is full for one record: larger than the write buffer,
        // it goes straight to the file and fails.
        let full = OpenOptions::new().append(true).open("/dev/full").unwrap();
        let healthy = std::mem::replace(&mut j.writer.lock().unwrap().file, BufWriter::new(full));
        let big = sent("r1", Some("orders"), &"x".repeat(16 << 10), None);
        assert!(j.append(&big).is_err());
        // The disk has room again: the flush and fsync alone would succeed.
        j.writer.lock().unwrap().file = healthy;
        j.append(&sent("r1", Some("orders"), "after", None)).unwrap();
        let e = j.sync().unwrap_err().to_string();
        assert!(e.contains("could not be written"), "{e}");
        assert!(j.sync().is_err(), "still, for every task sharing the journal");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
