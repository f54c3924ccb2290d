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
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("journal {path}:{line}: not a journal record: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    RunStarted {
        run: String,
        at: DateTime<Utc>,
        queue: String,
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
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        redrive_id: Option<String>,
    },
    Sent {
        run: String,
        id: String,
        destination: String,
        dest_id: String,
    },
    SendFailed {
        run: String,
        id: String,
        error: String,
    },
    Settled {
        run: String,
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
    },
    RunFinished {
        run: String,
        at: DateTime<Utc>,
        summary: serde_json::Value,
    },
}

/// What earlier runs left unfinished: copies sent whose DLQ original was
/// never settled.
#[derive(Debug, Default)]
struct Replay {
    sent: HashMap<String, (String, String)>,
    /// Messages sent and settled by an earlier run. One that is leased again
    /// was not really settled: its lease (visibility timeout, ack deadline,
    /// lock) ran out before the delete, ack or complete reached the provider,
    /// which then drops it without telling the client (a Pub/Sub ack, a
    /// link-level Service Bus complete). Its copy is at the destination, so it
    /// is settled again, never resent. It is the same message only when its
    /// enqueue time matches too (a redriven copy that fails again comes back
    /// under a new ID, but a sender may reuse a Service Bus MessageId).
    settled: HashMap<String, (String, String, DateTime<Utc>)>,
    /// The redrive ID of each copy an earlier run set out to send.
    intents: HashMap<String, String>,
}

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
}

pub struct Journal {
    path: PathBuf,
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
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut replay = Replay::default();
        for record in read_all_records(path, rotation.keep)? {
            match record {
                Record::Sent {
                    id,
                    destination,
                    dest_id,
                    ..
                } => {
                    replay.sent.insert(id, (destination, dest_id));
                }
                Record::Settled { id, enqueued_at, .. } => {
                    if let (Some((dest, dest_id)), Some(at)) = (replay.sent.remove(&id), enqueued_at) {
                        replay.settled.insert(id.clone(), (dest, dest_id, at));
                    }
                    replay.intents.remove(&id);
                }
                Record::Leased {
                    id,
                    redrive_id: Some(rid),
                    ..
                } => {
                    replay.intents.entry(id).or_insert(rid);
                }
                _ => {}
            }
        }
        let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        // Start on a fresh line after a torn write, so the next record is whole.
        let mut bytes = file.metadata().map_err(io)?.len();
        if bytes > 0 && !ends_with_newline(path).map_err(io)? {
            file.write_all(b"\n").map_err(io)?;
            bytes += 1;
        }
        Ok(Self {
            path: path.to_owned(),
            rotation,
            writer: Mutex::new(Writer {
                file: BufWriter::new(file),
                bytes,
            }),
            replay: Mutex::new(replay),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A message an earlier run sent (to `destination`, as `dest_id`) but did
    /// not settle.
    pub fn unsettled(&self, id: &str) -> Option<(String, String)> {
        self.replay.lock().expect("journal lock").sent.get(id).cloned()
    }

    /// Where an earlier run sent its copy of message `id`, settled or not: a
    /// leased message with a copy already out is settled, never resent. That
    /// covers one recorded as settled, too: if it is leased again, the settle
    /// did not take effect (see `Replay::settled`).
    pub fn already_sent(&self, id: &str, enqueued_at: Option<DateTime<Utc>>) -> Option<(String, String)> {
        let r = self.replay.lock().expect("journal lock");
        r.sent.get(id).cloned().or_else(|| {
            r.settled
                .get(id)
                .filter(|(_, _, at)| Some(*at) == enqueued_at)
                .map(|(dest, dest_id, _)| (dest.clone(), dest_id.clone()))
        })
    }

    /// The redrive ID an earlier run gave its copy of message `id`, when that
    /// run may have sent it without recording the outcome (it crashed inside
    /// the send).
    pub fn prior_redrive_id(&self, id: &str) -> Option<String> {
        self.replay.lock().expect("journal lock").intents.get(id).cloned()
    }

    pub fn append(&self, record: &Record) -> Result<(), JournalError> {
        match record {
            Record::Settled { id, enqueued_at, .. } => {
                let mut r = self.replay.lock().expect("journal lock");
                if let (Some((dest, dest_id)), Some(at)) = (r.sent.remove(id), enqueued_at) {
                    r.settled.insert(id.clone(), (dest, dest_id, *at));
                }
                r.intents.remove(id);
            }
            Record::Leased {
                id,
                redrive_id: Some(rid),
                ..
            } => {
                self.replay
                    .lock()
                    .expect("journal lock")
                    .intents
                    .entry(id.clone())
                    .or_insert_with(|| rid.clone());
            }
            // Tracked so that a rotation carries it forward until settled.
            Record::Sent {
                id,
                destination,
                dest_id,
                ..
            } => {
                self.replay
                    .lock()
                    .expect("journal lock")
                    .sent
                    .insert(id.clone(), (destination.clone(), dest_id.clone()));
            }
            _ => {}
        }
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        let mut w = self.writer.lock().expect("journal lock");
        w.bytes += line.len() as u64;
        w.file.write_all(&line).map_err(|source| self.io(source))
    }

    fn io(&self, source: std::io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Flush and fsync: called once per batch, before its messages are sent
    /// and before they are settled. Rotates the file once it is too large.
    pub fn sync(&self) -> Result<(), JournalError> {
        let mut w = self.writer.lock().expect("journal lock");
        w.file
            .flush()
            .and_then(|_| w.file.get_ref().sync_data())
            .map_err(|source| self.io(source))?;
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
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        *w = Writer {
            file: BufWriter::new(file),
            bytes: 0,
        };
        let carried: Vec<Record> = {
            let r = self.replay.lock().expect("journal lock");
            let sent = r.sent.iter().map(|(id, (destination, dest_id))| Record::Sent {
                run: "carried".into(),
                id: id.clone(),
                destination: destination.clone(),
                dest_id: dest_id.clone(),
            });
            let intents = r.intents.iter().map(|(id, rid)| Record::Leased {
                run: "carried".into(),
                id: id.clone(),
                redrive_id: Some(rid.clone()),
            });
            sent.chain(intents).collect()
        };
        for record in &carried {
            let mut line = serde_json::to_vec(record).expect("records serialize");
            line.push(b'\n');
            w.bytes += line.len() as u64;
            w.file.write_all(&line).map_err(|e| self.io(e))?;
        }
        w.file
            .flush()
            .and_then(|_| w.file.get_ref().sync_data())
            .map_err(|e| self.io(e))
    }
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Every record of a journal and its rotated files, oldest first.
pub fn read_all_records(path: &Path, keep: usize) -> Result<Vec<Record>, JournalError> {
    let mut out = Vec::new();
    for k in (1..=keep.max(1)).rev() {
        out.extend(read_records(&rotated(path, k))?);
    }
    out.extend(read_records(path)?);
    Ok(out)
}

/// Every record in a journal file, oldest first. A torn line (a crash
/// mid-write leaves a truncated record) is skipped; any other damage is an
/// error.
pub fn read_records(path: &Path) -> Result<Vec<Record>, JournalError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(JournalError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| JournalError::Io {
            path: path.to_owned(),
            source,
        })?;
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(e) if e.is_eof() => {
                tracing::warn!(path = %path.display(), line = i + 1, "skipping a torn journal line")
            }
            Err(e) => {
                return Err(JournalError::Corrupt {
                    path: path.to_owned(),
                    line: i + 1,
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
                id: "unsettled".into(),
                destination: "q".into(),
                dest_id: "d".into(),
            })
            .unwrap();
            for i in 0..200 {
                j.append(&Record::Settled {
                    run: "r1".into(),
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
            j.unsettled("unsettled"),
            Some(("q".into(), "d".into())),
            "survives its original file being deleted"
        );
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
                    id: id.into(),
                    destination: "q".into(),
                    dest_id: format!("d-{id}"),
                })
                .unwrap();
                if settle {
                    j.append(&Record::Settled {
                        run: "r1".into(),
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
        assert_eq!(j.unsettled("a"), None);
        assert_eq!(j.unsettled("b"), Some(("q".into(), "d-b".into())));
        j.append(&Record::Settled {
            run: "r2".into(),
            id: "b".into(),
            enqueued_at: None,
        })
        .unwrap();
        j.sync().unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.unsettled("b"), None);
        // Settled, but should the same message be leased again, its copy is
        // already out; a new message reusing the ID is not that message.
        assert_eq!(j.already_sent("a", Some(enqueued)), Some(("q".into(), "d-a".into())));
        assert_eq!(j.already_sent("a", Some(enqueued + chrono::Duration::seconds(1))), None);
        assert_eq!(j.already_sent("a", None), None);
        // Settled without an enqueue time: not recognisable, so sent again.
        assert_eq!(j.already_sent("b", None), None);
        assert_eq!(read_records(&path).unwrap().len(), 4);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
