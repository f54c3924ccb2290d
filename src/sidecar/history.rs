//! Runs as the journal records them: `/v1/runs` lists them past the runs
//! this process remembers, and `/v1/runs/{id}` answers from them for a run it
//! has forgotten (it keeps the latest few hundred) or never made (the CLI,
//! an earlier pod).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::engine::journal::{Record, rotated};

/// Finished runs kept from the journal, newest last.
const JOURNAL_RUNS_KEPT: usize = 1000;
/// A sidecar's journal holds a record per message moved (tens of MB before
/// it rotates), so the runs list is not re-read on every page refresh: at
/// most this often, and only when a journal file changed.
const JOURNAL_RESCAN: Duration = Duration::from_secs(15);

type FileStamp = (std::path::PathBuf, u64, Option<std::time::SystemTime>);

struct JournalRuns {
    stamps: Vec<FileStamp>,
    scanned: std::time::Instant,
    runs: Arc<Vec<(String, Value)>>,
}

/// The runs a journal records, read at most every [`JOURNAL_RESCAN`].
#[derive(Default)]
pub struct RunHistory {
    cache: std::sync::Mutex<Option<JournalRuns>>,
}

impl RunHistory {
    /// The `run_finished` summaries of the journal at `path` and its rotated
    /// files, oldest first, then the runs started and never finished. Only
    /// lines that name those events are parsed.
    pub fn runs(&self, path: &std::path::Path, keep: usize) -> Result<Arc<Vec<(String, Value)>>, std::io::Error> {
        use std::io::BufRead;
        let mut files: Vec<std::path::PathBuf> = (1..=keep.max(1)).rev().map(|k| rotated(path, k)).collect();
        files.push(path.to_owned());
        let stamps: Vec<FileStamp> = files
            .iter()
            .filter_map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .map(|m| (f.clone(), m.len(), m.modified().ok()))
            })
            .collect();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.as_ref()
            && (c.stamps == stamps || c.scanned.elapsed() < JOURNAL_RESCAN)
        {
            return Ok(c.runs.clone());
        }
        let mut runs = std::collections::VecDeque::new();
        // Runs started and not (yet) finished: killed, crashed, or still going
        // in another process. Shown as unfinished, from their start record.
        let mut open: Vec<(String, Value)> = Vec::new();
        for (file, _, _) in &stamps {
            let f = match std::fs::File::open(file) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut reader = std::io::BufReader::new(f);
            let mut bytes = Vec::new();
            loop {
                bytes.clear();
                if reader.read_until(b'\n', &mut bytes)? == 0 {
                    break;
                }
                // Bytes, not `lines()`: a line cut inside a multi-byte
                // character (a crash mid-write) would fail the whole read.
                // It fails to parse below and is skipped, as the journal
                // skips it.
                let line = String::from_utf8_lossy(&bytes);
                if !line.contains("\"run_finished\"") && !line.contains("\"run_started\"") {
                    // What an unfinished run did, as `dlq-bridge runs`
                    // counts it: a run killed after sending 40 showed 0.
                    if let Some((run, counter)) = progress_of(&line)
                        && let Some((_, start)) = open.iter_mut().rev().find(|(r, _)| r == run)
                    {
                        let n = start[counter].as_u64().unwrap_or(0) + 1;
                        start[counter] = json!(n);
                    }
                    continue;
                }
                // A torn last line (a crash mid-write) is skipped, as the journal does.
                match serde_json::from_str(&line) {
                    Ok(Record::RunFinished { run, summary, .. }) => {
                        open.retain(|(r, _)| *r != run);
                        runs.push_back((run, summary));
                        if runs.len() > JOURNAL_RUNS_KEPT {
                            runs.pop_front();
                        }
                    }
                    Ok(Record::RunStarted {
                        run,
                        at,
                        queue,
                        action,
                        trigger,
                        filter,
                        dry_run,
                        ..
                    }) => {
                        let start = json!({
                            "queue": queue, "trigger": trigger, "action": action, "filter": filter,
                            "dry_run": dry_run, "started_at": at, "stopped": "unfinished",
                        });
                        open.push((run, start));
                        if open.len() > JOURNAL_RUNS_KEPT {
                            open.remove(0);
                        }
                    }
                    _ => {}
                }
            }
        }
        runs.extend(open);
        let runs = Arc::new(Vec::from(runs));
        *cache = Some(JournalRuns {
            stamps,
            scanned: std::time::Instant::now(),
            runs: runs.clone(),
        });
        Ok(runs)
    }
}

/// The run a progress record (`sent`, `settled`, a failure, a purge or an
/// import) belongs to, and the summary counter it adds to; read without
/// parsing the line, as most lines of a journal are these.
fn progress_of(line: &str) -> Option<(&str, &'static str)> {
    const COUNTERS: [(&str, &str); 6] = [
        ("\"event\":\"sent\"", "sent"),
        ("\"event\":\"imported\"", "sent"),
        ("\"event\":\"settled\"", "settled"),
        ("\"event\":\"purged\"", "settled"),
        ("\"event\":\"send_failed\"", "send_failed"),
        ("\"event\":\"settle_failed\"", "settle_failed"),
    ];
    let counter = COUNTERS.iter().find(|(event, _)| line.contains(event))?.1;
    let run = line.split_once("\"run\":\"")?.1.split('"').next()?;
    Some((run, counter))
}

/// A journaled run summary in the shape of a live run view.
pub fn from_summary(run: &str, s: Value) -> Value {
    let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
    let stopped = s.get("stopped").and_then(Value::as_str);
    // As `RunSummary::ok` decides it.
    // An import's summary counts its failures as `failed`.
    let ok = stopped != Some("failed")
        && n("send_failed") == 0
        && n("settle_failed") == 0
        && n("failed") == 0
        && !(n("examined") > 0 && n("filter_errors") == n("examined"));
    let status = match stopped {
        Some("unfinished") => "unfinished",
        Some("cancelled") if ok => "interrupted",
        _ if ok => "finished",
        _ => "failed",
    };
    json!({
        "run_id": run,
        "queue": s.get("queue"),
        "trigger": s.get("trigger"),
        // Summaries from before runs named their action were redrives; an
        // unfinished run from such a journal cannot tell.
        "action": match s.get("action") {
            Some(Value::Null) => json!("-"),
            Some(a) => a.clone(),
            None => json!("redrive"),
        },
        "filter": s.get("filter"),
        "dry_run": s.get("dry_run"),
        "status": status,
        "started_at": s.get("started_at"),
        "progress": {
            "examined": n("examined"),
            "matched": n("matched"),
            "sent": n("sent"),
            "settled": n("settled"),
            "failed": n("send_failed") + n("settle_failed") + n("failed"),
        },
        "summary": s,
        "error": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::journal::Journal;

    /// A line cut inside a multi-byte character (a crash mid-write, which
    /// the journal ends and writes after) is skipped, not a failed read.
    #[test]
    fn a_line_torn_inside_a_character_is_skipped() {
        let dir = std::env::temp_dir().join(format!("dlqb-torn-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.jsonl");
        let record = |r: &Record| serde_json::to_vec(r).unwrap();
        let started = |run: &str| Record::RunStarted {
            run: run.into(),
            at: chrono::Utc::now(),
            queue: "orders".into(),
            action: None,
            trigger: "api".into(),
            filter: "reason == \"Zeitüberschreitung\"".into(),
            dry_run: false,
            destination: None,
        };
        let finished = |run: &str| Record::RunFinished {
            run: run.into(),
            at: chrono::Utc::now(),
            summary: serde_json::json!({"queue": "orders", "stopped": "drained"}),
        };
        let torn = record(&started("torn"));
        let cut = torn.windows(2).position(|w| w == "ü".as_bytes()).unwrap() + 1;
        let mut bytes = torn[..cut].to_vec();
        bytes.push(b'\n');
        for r in [started("after"), finished("after")] {
            bytes.extend(record(&r));
            bytes.push(b'\n');
        }
        std::fs::write(&path, bytes).unwrap();
        let runs = RunHistory::default().runs(&path, 1).expect("the torn line is skipped");
        let ids: Vec<&str> = runs.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(ids, ["after"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A run killed mid-way (no `run_finished`) is listed, as unfinished.
    #[test]
    fn journaled_runs_include_unfinished_ones() {
        let dir = std::env::temp_dir().join(format!("dlqb-dash-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        let j = Journal::open(&path).unwrap();
        let start = |run: &str| Record::RunStarted {
            run: run.into(),
            at: chrono::Utc::now(),
            queue: "orders".into(),
            action: Some("purge".into()),
            trigger: "api".into(),
            filter: "true".into(),
            dry_run: false,
            destination: None,
        };
        j.append(&start("done")).unwrap();
        j.append(&Record::RunFinished {
            run: "done".into(),
            at: chrono::Utc::now(),
            summary: serde_json::json!({"queue": "orders", "action": "purge", "stopped": "drained"}),
        })
        .unwrap();
        j.append(&start("killed")).unwrap();
        for id in ["a", "b"] {
            j.append(&Record::Sent {
                run: "killed".into(),
                queue: Some("orders".into()),
                id: id.into(),
                enqueued_at: None,
                destination: "src".into(),
                dest_id: format!("d-{id}"),
            })
            .unwrap();
        }
        j.append(&Record::Settled {
            run: "killed".into(),
            queue: Some("orders".into()),
            id: "a".into(),
            enqueued_at: None,
        })
        .unwrap();
        j.sync().unwrap();
        let runs = RunHistory::default().runs(&path, 1).unwrap();
        let ids: Vec<&str> = runs.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(ids, ["done", "killed"]);
        let killed = from_summary("killed", runs[1].1.clone());
        assert_eq!(killed["status"], "unfinished", "{killed}");
        assert_eq!(killed["progress"]["sent"], 2, "{killed}");
        assert_eq!(killed["progress"]["settled"], 1, "{killed}");
        assert_eq!(killed["action"], "purge", "{killed}");
        assert_eq!(from_summary("done", runs[0].1.clone())["status"], "finished");
        // Cut short by a shutdown: not a run that did all it was asked.
        let cut = serde_json::json!({"queue": "orders", "stopped": "cancelled", "settled": 40});
        assert_eq!(from_summary("cut", cut)["status"], "interrupted");
        // `settled` counts the settles a journal allowed too: they are not
        // added twice.
        let resumed =
            serde_json::json!({"queue": "orders", "stopped": "drained", "settled": 5, "settled_from_journal": 2});
        assert_eq!(from_summary("resumed", resumed)["progress"]["settled"], 5);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
