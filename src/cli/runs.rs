//! `runs`: the audit trail, one row per run the journal knows of.
//!
//! A run that ended wrote a `run_finished` record with its summary. One that
//! crashed or was killed (or is still going) did not: it is shown as
//! `unfinished`, with the counts its `sent`, `settled`, `purged`, `imported`
//! and failure records give.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::exit::{self, Failure, usage};
use crate::config::Config;
use crate::engine::journal::{CARRIED_RUN, Record, Rotation, read_all_records, rotated};
use crate::output::{self, Format};

/// `stopped` of a run the journal has no `run_finished` record for.
pub(crate) const UNFINISHED: &str = "unfinished";

pub(crate) fn runs(config: Option<&Config>, journal: Option<PathBuf>, output: Format) -> Result<u8, Failure> {
    let explicit = journal.is_some();
    let Some(path) = journal.or_else(|| config.and_then(super::redrive::default_journal)) else {
        return Err(usage(
            "no journal path: pass --journal PATH (or set XDG_STATE_HOME or HOME)",
        ));
    };
    if path.is_dir() {
        return Err(usage(format!(
            "journal {}: is a directory, not a journal file",
            path.display()
        )));
    }
    if !journal_exists(&path) {
        if explicit {
            return Err(usage(format!(
                "journal {}: no such file (runs are journaled by redrive, purge, import and retention)",
                path.display()
            )));
        }
        // The default place, before any run was journaled there: no runs yet.
        note!("note: no runs journaled yet (no journal at {})", path.display());
    }
    // Without the config, the rotated files on disk: a journal_keep above
    // the default would otherwise hide the oldest runs.
    let keep = config.map_or_else(
        || {
            (1..)
                .take_while(|n| rotated(&path, *n).exists())
                .count()
                .max(Rotation::default().keep)
        },
        |c| c.redrive.journal_keep,
    );
    let rows = run_rows(read_all_records(&path, keep)?);
    match output {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&rows)?)?,
        Format::Table => out!("{}", runs_table(&rows))?,
    }
    Ok(exit::OK)
}

/// The journal file, or (should it be gone) its newest rotated file.
fn journal_exists(path: &Path) -> bool {
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    path.exists() || Path::new(&rotated).exists()
}

/// What the records of one run say.
#[derive(Debug, Default)]
struct RunRecords {
    run: String,
    started: Option<Value>,
    summary: Option<Value>,
    sent: u64,
    settled: u64,
    purged: u64,
    imported: u64,
    send_failed: u64,
    settle_failed: u64,
    /// A `leased` record carried a redrive ID: only redrives mark copies.
    marked: bool,
}

impl RunRecords {
    /// `redrive`, `purge` or `import`, when the records tell.
    fn action(&self) -> Option<&'static str> {
        if let Some(a) = self.summary.as_ref().and_then(|s| s["action"].as_str()) {
            return match a {
                "purge" => Some("purge"),
                "import" => Some("import"),
                _ => Some("redrive"),
            };
        }
        if let Some(a) = self.started.as_ref().and_then(|s| s["action"].as_str()) {
            return match a {
                "purge" => Some("purge"),
                "import" => Some("import"),
                _ => Some("redrive"),
            };
        }
        // Journals from before runs recorded their action. An import's
        // summary has no action (it names its file); its start record says
        // `import FILE` as its trigger.
        let trigger = self.started.as_ref().and_then(|s| s["trigger"].as_str()).unwrap_or("");
        if self.imported > 0
            || trigger.starts_with("import ")
            || self.summary.as_ref().is_some_and(|s| s.get("file").is_some())
        {
            Some("import")
        } else if self.purged > 0 {
            Some("purge")
        } else if self.sent > 0 || self.settled > 0 || self.marked {
            Some("redrive")
        } else {
            // A dry run, or a run killed before it moved anything: its start
            // record does not say what it was for.
            None
        }
    }

    /// The run as `runs -o json` shows it: the summary of a finished run
    /// (with the action, trigger and start time filled in from its start
    /// record where the summary lacks them), or what the records of an
    /// unfinished one give.
    fn to_json(&self) -> Value {
        let started = self.started.as_ref();
        let from_start = |k: &str| started.and_then(|s| s.get(k)).cloned().unwrap_or(Value::Null);
        if let Some(summary) = &self.summary {
            let mut s = summary.clone();
            if let Some(obj) = s.as_object_mut() {
                obj.entry("action").or_insert(json!(self.action()));
                obj.entry("trigger").or_insert(from_start("trigger"));
                obj.entry("started_at").or_insert(from_start("at"));
                obj.entry("filter").or_insert(from_start("filter"));
                obj.entry("stopped").or_insert(json!("finished"));
            }
            return s;
        }
        let action = self.action();
        // What each action journals: a redrive its sends and settles, a purge
        // each deletion (its backups are not journaled), an import its sends.
        let (sent, settled) = match action {
            Some("purge") => (Value::Null, json!(self.purged)),
            Some("import") => (json!(self.imported), Value::Null),
            _ => (json!(self.sent), json!(self.settled)),
        };
        json!({
            "run_id": self.run,
            "queue": from_start("queue"),
            "trigger": from_start("trigger"),
            "action": action,
            "filter": from_start("filter"),
            "dry_run": from_start("dry_run"),
            "destination": from_start("destination"),
            "started_at": from_start("at"),
            "finished_at": null,
            "sent": sent,
            "settled": settled,
            "send_failed": self.send_failed,
            "settle_failed": self.settle_failed,
            "stopped": UNFINISHED,
        })
    }
}

/// One JSON object per run, in the order the runs started.
fn run_rows(records: Vec<Record>) -> Vec<Value> {
    let mut runs: Vec<RunRecords> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for record in records {
        let run_id = match &record {
            Record::RunStarted { run, .. }
            | Record::Leased { run, .. }
            | Record::Sent { run, .. }
            | Record::SendFailed { run, .. }
            | Record::Settled { run, .. }
            | Record::SettleFailed { run, .. }
            | Record::Purged { run, .. }
            | Record::Imported { run, .. }
            | Record::RunFinished { run, .. } => run.clone(),
        };
        // Copies a rotation carried over belong to earlier runs, whose own
        // records are in the rotated files: they make no run of their own.
        if run_id == CARRIED_RUN {
            continue;
        }
        let i = *index.entry(run_id.clone()).or_insert_with(|| {
            runs.push(RunRecords {
                run: run_id,
                ..Default::default()
            });
            runs.len() - 1
        });
        let r = &mut runs[i];
        match record {
            Record::RunStarted { .. } => r.started = serde_json::to_value(&record).ok(),
            Record::Leased { redrive_id, .. } => r.marked |= redrive_id.is_some(),
            Record::Sent { .. } => r.sent += 1,
            Record::SendFailed { .. } => r.send_failed += 1,
            Record::Settled { .. } => r.settled += 1,
            Record::SettleFailed { .. } => r.settle_failed += 1,
            Record::Purged { .. } => r.purged += 1,
            Record::Imported { .. } => r.imported += 1,
            Record::RunFinished { summary, .. } => r.summary = Some(summary),
        }
    }
    runs.iter().map(RunRecords::to_json).collect()
}

fn runs_table(rows: &[Value]) -> String {
    let mut t = output::Table::new(&[
        "RUN", "QUEUE", "ACTION", "TRIGGER", "DRY", "MATCHED", "SENT", "SETTLED", "FAILED", "STOPPED", "FILTER",
    ]);
    for s in rows {
        let n = |k: &str| s.get(k).and_then(Value::as_u64);
        let count = |k: &str| n(k).map_or("-".into(), |v| v.to_string());
        let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        // A redrive's and a purge's send and settle failures; an import's failures.
        let failed = ["send_failed", "settle_failed", "failed"]
            .iter()
            .filter_map(|k| n(k))
            .reduce(|a, b| a + b);
        t.row(vec![
            text("run_id"),
            text("queue"),
            text("action"),
            text("trigger"),
            s.get("dry_run")
                .and_then(Value::as_bool)
                .map_or("-".into(), |d| d.to_string()),
            count("matched"),
            count("sent"),
            count("settled"),
            failed.map_or("-".into(), |f| f.to_string()),
            text("stopped"),
            crate::model::preview(&text("filter"), 50),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn started(run: &str, queue: &str, trigger: &str, dry_run: bool) -> Record {
        Record::RunStarted {
            run: run.into(),
            at: Utc::now(),
            queue: queue.into(),
            // As journals written before runs recorded their action.
            action: None,
            trigger: trigger.into(),
            filter: "true".into(),
            dry_run,
            destination: None,
        }
    }

    fn sent(run: &str, id: &str) -> [Record; 2] {
        [
            Record::Leased {
                run: run.into(),
                queue: None,
                id: id.into(),
                redrive_id: Some(format!("{run}:{id}")),
            },
            Record::Sent {
                run: run.into(),
                queue: None,
                id: id.into(),
                enqueued_at: None,
                destination: "src".into(),
                dest_id: format!("d-{id}"),
            },
        ]
    }

    fn settled(run: &str, id: &str) -> Record {
        Record::Settled {
            run: run.into(),
            queue: None,
            id: id.into(),
            enqueued_at: None,
        }
    }

    fn finished(run: &str, summary: Value) -> Record {
        Record::RunFinished {
            run: run.into(),
            at: Utc::now(),
            summary,
        }
    }

    fn row<'a>(rows: &'a [Value], run: &str) -> &'a Value {
        rows.iter()
            .find(|r| r["run_id"] == run)
            .unwrap_or_else(|| panic!("no row for {run}: {rows:?}"))
    }

    #[test]
    fn a_killed_redrive_is_shown_unfinished_with_its_journaled_counts() {
        let mut records = vec![started("r1", "orders", "cli", false)];
        records.extend(sent("r1", "a"));
        records.extend(sent("r1", "b"));
        records.push(settled("r1", "a"));
        records.push(Record::SendFailed {
            run: "r1".into(),
            queue: None,
            id: "c".into(),
            error: "boom".into(),
        });
        let rows = run_rows(records);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let r = &rows[0];
        assert_eq!(r["stopped"], UNFINISHED);
        assert_eq!(r["action"], "redrive");
        assert_eq!(r["queue"], "orders");
        assert_eq!(r["trigger"], "cli");
        assert_eq!((r["sent"].as_u64(), r["settled"].as_u64()), (Some(2), Some(1)));
        assert_eq!(r["send_failed"], 1);
        assert!(r["finished_at"].is_null());
        let table = runs_table(&rows);
        let line = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "r1",
                "orders",
                "redrive",
                "cli",
                "false",
                "-",
                "2",
                "1",
                "1",
                "unfinished",
                "true"
            ],
            "{table}"
        );
    }

    #[test]
    fn a_run_killed_before_its_first_batch_says_its_action_from_its_start() {
        let mut start = started("p9", "orders", "cli", true);
        if let Record::RunStarted { action, .. } = &mut start {
            *action = Some("purge".into());
        }
        let rows = run_rows(vec![start]);
        assert_eq!(rows[0]["action"], "purge", "{rows:?}");
        assert_eq!(rows[0]["stopped"], "unfinished", "{rows:?}");
    }

    #[test]
    fn finished_and_unfinished_runs_keep_journal_order_and_say_their_action() {
        let mut records = vec![
            started("p1", "orders", "cli", false),
            Record::Leased {
                run: "p1".into(),
                queue: None,
                id: "x".into(),
                redrive_id: None,
            },
            Record::Purged {
                run: "p1".into(),
                id: "x".into(),
                reason: None,
            },
            started("r2", "orders", "api", false),
        ];
        records.extend(sent("r2", "a"));
        records.push(settled("r2", "a"));
        records.push(finished(
            "r2",
            json!({"run_id": "r2", "queue": "orders", "trigger": "api", "action": "redrive", "filter": "true",
                   "dry_run": false, "matched": 1, "sent": 1, "settled": 1, "send_failed": 0,
                   "settle_failed": 0, "stopped": "drained"}),
        ));
        records.push(started("d3", "orders", "cli", true));
        records.push(started("p4", "orders", "retention", false));
        records.push(finished(
            "p4",
            json!({"run_id": "p4", "queue": "orders", "trigger": "retention", "action": "purge", "filter": "true",
                   "dry_run": false, "matched": 2, "sent": 2, "settled": 2, "send_failed": 0,
                   "settle_failed": 0, "stopped": "drained"}),
        ));
        let rows = run_rows(records);
        let ids: Vec<&str> = rows.iter().map(|r| r["run_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["p1", "r2", "d3", "p4"]);
        // A killed purge: its deletions are journaled, its backups are not.
        let p1 = row(&rows, "p1");
        assert_eq!(
            (p1["action"].as_str(), p1["stopped"].as_str()),
            (Some("purge"), Some(UNFINISHED))
        );
        assert_eq!((p1["sent"].is_null(), p1["settled"].as_u64()), (true, Some(1)));
        assert_eq!(row(&rows, "r2")["stopped"], "drained");
        assert_eq!(row(&rows, "p4")["action"], "purge");
        // A dry run killed before its summary: nothing tells its action.
        let d3 = row(&rows, "d3");
        assert!(d3["action"].is_null(), "{d3}");
        assert_eq!(
            (d3["dry_run"].as_bool(), d3["stopped"].as_str()),
            (Some(true), Some(UNFINISHED))
        );
        let table = runs_table(&rows);
        let actions: Vec<&str> = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(2).unwrap())
            .collect();
        assert_eq!(actions, ["purge", "redrive", "-", "purge"], "{table}");
        let p1_line = table.lines().nth(1).unwrap();
        assert!(p1_line.contains(" -  ") && p1_line.contains("unfinished"), "{table}");
    }

    #[test]
    fn an_import_takes_its_trigger_and_action_from_its_start_record() {
        let records = vec![
            started("i1", "payments", "import failed.jsonl", false),
            Record::Imported {
                run: "i1".into(),
                id: "a".into(),
                destination: "t".into(),
                dest_id: "1".into(),
                enqueued_at: None,
            },
            finished(
                "i1",
                json!({"run_id": "i1", "file": "failed.jsonl", "queue": "payments", "dry_run": false,
                       "read": 3, "matched": 2, "sent": 1, "failed": 1}),
            ),
            // A killed import.
            started("i2", "payments", "import more.jsonl", false),
            Record::Imported {
                run: "i2".into(),
                id: "b".into(),
                destination: "t".into(),
                dest_id: "2".into(),
                enqueued_at: None,
            },
        ];
        let rows = run_rows(records);
        let i1 = row(&rows, "i1");
        assert_eq!(
            (i1["action"].as_str(), i1["trigger"].as_str(), i1["stopped"].as_str()),
            (Some("import"), Some("import failed.jsonl"), Some("finished"))
        );
        let i2 = row(&rows, "i2");
        assert_eq!((i2["action"].as_str(), i2["sent"].as_u64()), (Some("import"), Some(1)));
        let table = runs_table(&rows);
        let i1_cells: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        // RUN QUEUE ACTION TRIGGER(2 words) DRY MATCHED SENT SETTLED FAILED STOPPED FILTER
        assert_eq!(
            i1_cells,
            [
                "i1",
                "payments",
                "import",
                "import",
                "failed.jsonl",
                "false",
                "2",
                "1",
                "-",
                "1",
                "finished",
                "true"
            ],
            "{table}"
        );
    }

    #[test]
    fn records_a_rotation_carries_over_make_no_run() {
        let mut records = vec![started("r1", "orders", "cli", false)];
        records.extend(sent("r1", "a"));
        records.extend(sent(CARRIED_RUN, "a"));
        let rows = run_rows(records);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["sent"], 1);
    }

    #[test]
    fn records_whose_start_was_rotated_away_still_make_a_row() {
        let rows = run_rows(vec![settled("old", "a"), settled("old", "b")]);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["settled"], 2);
        assert_eq!(rows[0]["stopped"], UNFINISHED);
        assert!(rows[0]["queue"].is_null());
    }
}
