//! The `dlq-bridge` binary end to end against moto: the issue's acceptance
//! points and exit codes. Bad input (config, filters, arguments, missing
//! queues, unreachable endpoints) is in tests/bad_input.rs.
#![cfg(feature = "sqs")]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::sqs::SqsFixture;
use common::{Fixture, TestMessage, attrs, run_measured};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"));
    c.env_remove("DLQ_BRIDGE_CONFIG")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // A state directory (and so a default journal) of its own: one process
        // writes a journal at a time, and the tests run in parallel.
        .env(
            "XDG_STATE_HOME",
            std::env::temp_dir().join(format!("dlq-bridge-cli-tests/{}", uuid::Uuid::new_v4().simple())),
        );
    c
}

fn write_config(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("dlqb-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    path
}

fn fixture_config(f: &SqsFixture) -> PathBuf {
    write_config(&format!(
        "queues:\n  - name: orders\n    sqs:\n      queue: {}\n      endpoint_url: {}\n      region: us-east-1\n",
        f.dlq_url, f.endpoint
    ))
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = cmd.output().expect("run dlq-bridge");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn tenants(n: usize) -> Vec<TestMessage> {
    (0..n)
        .map(|i| {
            let tenant = ["acme", "globex", "initech"][i % 3];
            TestMessage {
                body: format!(r#"{{"order":{i},"tenant":"{tenant}"}}"#).into_bytes(),
                attributes: attrs(&[("tenant", tenant), ("error", "Timeout")]),
                ordering_key: None,
            }
        })
        .collect()
}

#[tokio::test]
async fn redrive_by_tenant_moves_only_acme_and_dry_run_changes_nothing() {
    let f = SqsFixture::create(false).await;
    let msgs = tenants(9);
    f.dead_letter(&msgs).await;
    let cfg = fixture_config(&f);
    let filter = r#"attributes.tenant == "acme""#;

    let before = f.dlq_snapshot().await;
    let (code, out, err) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .args(["redrive", "orders", "--filter", filter, "--dry-run"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("matched:   3"), "{out}");
    // The dry run leased and released: each message was received once more,
    // and nothing else changed in either queue.
    let after = f.dlq_snapshot().await;
    assert_eq!(after.len(), 9);
    assert_eq!(
        after.iter().map(|(id, ..)| id).collect::<Vec<_>>(),
        before.iter().map(|(id, ..)| id).collect::<Vec<_>>()
    );
    assert!(f.drain_source().await.is_empty(), "a dry run sends nothing");

    let (code, out, err) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .args(["redrive", "orders", "--filter", filter, "--yes"]));
    assert_eq!(code, 0, "{out}{err}");
    let arrived = f.drain_source().await;
    assert_eq!(arrived.len(), 3, "{out}");
    for m in &arrived {
        assert_eq!(m.attributes["tenant"].as_text(), "acme");
        assert_eq!(m.attributes["error"].as_text(), "Timeout");
        let want = msgs.iter().find(|t| t.body == m.body).expect("body intact");
        assert_eq!(want.attributes["tenant"].as_text(), "acme");
    }
    let left = f.dlq_snapshot().await;
    assert_eq!(left.len(), 6, "every other message stays in the DLQ");
}

#[tokio::test]
async fn flag_form_behaves_like_the_subcommand() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&tenants(6)).await;
    let cfg = fixture_config(&f);
    let (code, out, err) = run(bin().arg("--config").arg(&cfg).args([
        "--redrive",
        "orders",
        "--filter",
        r#"attributes.tenant == "globex""#,
        "--yes",
        "-o",
        "json",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON summary");
    assert_eq!(summary["settled"], 2);
    assert_eq!(summary["trigger"], "cli");
    assert_eq!(f.drain_source().await.len(), 2);
}

#[tokio::test]
async fn list_inspect_and_check() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&tenants(4)).await;
    let cfg = fixture_config(&f);

    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args(["list", "-o", "json"]));
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["queue"], "orders");
    assert_eq!(rows[0]["depth"], 4);
    assert_eq!(rows[0]["exactness"], "approximate");
    assert_eq!(rows[0]["top_reasons"][0][0], "Timeout");

    let (code, out, _) = run(bin().arg("-c").arg(&cfg).args(["list", "--fail-if-nonempty"]));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("orders") && out.contains("Timeout (4)"), "{out}");

    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args([
        "inspect",
        "orders",
        "--filter",
        r#"json.tenant == "acme""#,
        "-o",
        "json",
    ]));
    assert_eq!(code, 0, "{err}");
    let msgs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(msgs.as_array().unwrap().len(), 2, "{out}");
    assert_eq!(msgs[0]["reason"], "Timeout");
    assert!(
        msgs[0]["source"]
            .as_str()
            .unwrap()
            .ends_with(f.source_url.rsplit('/').next().unwrap())
    );
    assert!(err.contains("no true peek"), "the side effect is stated: {err}");

    let (code, out, err) = run(bin().arg("-c").arg(&cfg).arg("check"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queue orders (sqs): ok, depth 4"), "{out}");
    assert!(out.contains(": ok (1 queue)\n"), "one queue, not `1 queues`: {out}");
}

/// SIGTERM, how Kubernetes stops a Job's pod and `docker stop` a container,
/// stops a redrive as Ctrl-C does: leasing stops, what was sent is deleted,
/// the rest is released at once (not left invisible for the hold), the
/// summary is printed and the exit code says the run was stopped.
#[tokio::test]
async fn sigterm_stops_a_redrive_cleanly_and_loses_nothing() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&tenants(30)).await;
    let cfg = fixture_config(&f);
    let child = bin()
        .arg("-c")
        .arg(&cfg)
        .args([
            "redrive",
            "orders",
            "--rate",
            "4",
            "--yes",
            "--no-journal",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // SAFETY: signalling our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(143), "{stdout}{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("the summary is printed");
    assert_eq!(summary["stopped"], "cancelled", "{summary}");
    let moved = summary["settled"].as_u64().unwrap();
    assert!(moved > 0 && moved < 30, "{summary}");
    assert_eq!(
        f.drain_source().await.len() as u64,
        moved,
        "every deleted message has its copy"
    );
    assert_eq!(
        f.dlq_visible().await as u64,
        30 - moved,
        "the rest is back in the DLQ, visible (released, not left leased for the hold)"
    );
}

/// A signal while an endpoint is slow to answer ends every command that
/// connects (nothing is read or leased yet) with 143 and says so, where the
/// default action killed it without a word and, as PID 1 in a container, was
/// ignored until the grace period's SIGKILL.
#[tokio::test]
async fn sigterm_while_connecting_ends_each_command_with_143() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    // Accepted by the kernel's backlog, never read, never answered.
    let cfg = write_config(&format!(
        "queues:\n  - name: orders\n    sqs:\n      queue: orders-dlq\n      endpoint_url: http://{addr}\n      region: us-east-1\n    retention:\n      max_age: 7d\n"
    ));
    let empty = std::env::temp_dir().join(format!("dlqb-empty-{}.jsonl", uuid::Uuid::new_v4().simple()));
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    let commands: [&[&str]; 8] = [
        &["redrive", "orders", "--yes", "--no-journal"],
        &["inspect", "orders"],
        &["list"],
        &["report", "orders"],
        &["export", "orders", "--to", "-"],
        &["import", empty, "--to", "orders", "--yes", "--no-journal"],
        &[
            "purge",
            "orders",
            "--filter",
            "true",
            "--yes",
            "--no-backup",
            "--no-journal",
        ],
        &["retention", "--dry-run"],
    ];
    let children: Vec<_> = commands
        .iter()
        .map(|args| {
            let child = bin()
                .arg("-c")
                .arg(&cfg)
                .args(*args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (args, child)
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    for (args, child) in children {
        // SAFETY: signalling our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(143), "{args:?}: {stderr}");
        assert!(stderr.contains("interrupted: "), "{args:?}: {stderr}");
        // `list` reads every queue at once and says only what it releases.
        if args[0] != "list" {
            assert!(
                stderr.contains("stopped while connecting: nothing was leased"),
                "{args:?}: {stderr}"
            );
        }
    }
    drop(silent);
}

/// Files the command writes fail past `bytes` (EFBIG), as on a full disk.
fn limit_file_size(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: only async-signal-safe calls between fork and exec. An ignored
    // SIGXFSZ stays ignored across exec, so a write past the limit fails
    // with EFBIG instead of killing the process.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

type Ids = std::collections::BTreeSet<String>;

/// What a purge on a full disk did: its file, its JSON summary, and the IDs
/// it deleted from the DLQ (some, not all).
struct FullDiskPurge {
    file: PathBuf,
    summary: serde_json::Value,
    deleted: Ids,
}

/// Purge 60 messages, `skip` (`--no-journal`, `--no-backup`) the other file,
/// writing to `file_flag`'s file (`--backup`, `--journal`) on a disk that
/// takes `limit` bytes: the run must fail (exit 1) after deleting some.
async fn purge_on_a_full_disk(skip: &str, file_flag: &str, limit: u64) -> FullDiskPurge {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&tenants(60)).await;
    let ids = |snapshot: Vec<(String, String, u32)>| -> Ids { snapshot.into_iter().map(|m| m.0).collect() };
    let before = ids(f.dlq_snapshot().await);
    let cfg = fixture_config(&f);
    let file = std::env::temp_dir().join(format!("dlqb-{}.jsonl", uuid::Uuid::new_v4().simple()));
    let mut cmd = bin();
    cmd.arg("-c")
        .arg(&cfg)
        .args([
            "purge", "orders", "--filter", "true", "--yes", skip, "-o", "json", file_flag,
        ])
        .arg(&file);
    limit_file_size(&mut cmd, limit);
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap();
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let summary = serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("a JSON summary: {stderr}"));
    let after = ids(f.dlq_snapshot().await);
    let deleted: Ids = before.difference(&after).cloned().collect();
    assert!(
        !deleted.is_empty() && !after.is_empty(),
        "{} deleted of {}",
        deleted.len(),
        before.len()
    );
    FullDiskPurge { file, summary, deleted }
}

/// A purge's backup that fills up mid-batch is cut back to its last whole
/// batch, and nothing more is deleted: it holds exactly the messages gone
/// from the DLQ, every line importable. It kept a torn line (and the whole
/// lines of a batch whose messages stayed in the DLQ).
#[tokio::test]
async fn a_purge_whose_backup_fills_keeps_a_whole_backup_of_what_it_deleted() {
    let run = purge_on_a_full_disk("--no-journal", "--backup", 12_000).await;
    let text = std::fs::read_to_string(&run.file).unwrap();
    assert!(text.ends_with('\n'), "a torn last line");
    let backed_up: Ids = text
        .lines()
        .map(|l| {
            let line: serde_json::Value = serde_json::from_str(l).expect("a whole line");
            line["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(backed_up, run.deleted);
}

/// A purge whose journal stops taking records (a full disk; here a file
/// size limit) stops deleting: every message gone from the DLQ has its
/// `leased` record in the journal, and the summary still says what the run
/// did. It went on deleting unrecorded, and the summary was thrown away.
#[tokio::test]
async fn a_purge_whose_journal_fills_stops_deleting_and_still_reports() {
    let run = purge_on_a_full_disk("--no-backup", "--journal", 6000).await;
    let summary = &run.summary;
    assert!(
        summary["journal_error"]
            .as_str()
            .is_some_and(|e| e.contains("File too large")),
        "{summary}"
    );
    let recorded: Ids = std::fs::read_to_string(&run.file)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "leased")
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    let unrecorded: Vec<&String> = run.deleted.difference(&recorded).collect();
    assert!(unrecorded.is_empty(), "deleted without a record: {unrecorded:?}");
    assert_eq!(summary["settled"].as_u64(), Some(run.deleted.len() as u64), "{summary}");
    // The pass stops at the journal's failure instead of leasing the rest
    // of the DLQ only to fail every batch.
    assert_eq!(summary["stopped"], "failed", "{summary}");
}

/// Ctrl-C stops a redrive whose stderr has gone (`... 2>&1 | tee log`, the
/// `tee` stopped by the same Ctrl-C): the handler wrote "interrupted" first,
/// panicked on the closed pipe and never cancelled, and the redrive went on
/// until killed.
#[tokio::test]
async fn ctrl_c_stops_a_redrive_whose_stderr_is_closed() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&tenants(40)).await;
    let cfg = fixture_config(&f);
    let mut child = bin()
        .arg("-c")
        .arg(&cfg)
        .args(["redrive", "orders", "--rate", "2", "--yes", "--no-journal"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // SAFETY: signalling our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("still redriving 30 s after Ctrl-C");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(130));
    assert!(f.dlq_visible().await > 0, "stopped before the end");
}

/// `retention -o json` has a queue that failed, with its error, as `list`
/// has: it was only on stderr, and a script could not tell which failed.
#[test]
fn retention_json_names_the_queues_that_failed() {
    let cfg = write_config(
        "queues:\n  - name: gone\n    sqs:\n      queue: q\n      endpoint_url: http://127.0.0.1:1\n      region: us-east-1\n    retention:\n      max_age: 7d\n",
    );
    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args(["retention", "--dry-run", "-o", "json"]));
    assert_eq!(code, 1, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("JSON: {out}{err}"));
    assert_eq!(rows[0]["queue"], "gone", "{rows}");
    assert!(
        rows[0]["error"].as_str().is_some_and(|e| e.contains("127.0.0.1:1")),
        "{rows}"
    );
}

/// A redrive killed mid-run leaves no summary in the journal: `runs` shows it
/// as unfinished with what its records say, beside a finished purge, and says
/// which run was which.
#[tokio::test]
async fn runs_shows_killed_runs_as_unfinished_and_each_runs_action() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&tenants(30)).await;
    let cfg = fixture_config(&f);
    let journal = std::env::temp_dir().join(format!("dlqb-{}.jsonl", uuid::Uuid::new_v4().simple()));
    let mut child = bin()
        .arg("-c")
        .arg(&cfg)
        .args(["redrive", "orders", "--rate", "5", "--yes", "--journal"])
        .arg(&journal)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start dlq-bridge");
    // Kill it once it has settled something, well before its 30 messages at 5/s.
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&journal)
        .unwrap_or_default()
        .contains(r#""event":"settled""#)
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "nothing settled within a minute"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(!text.contains("run_finished"), "the run finished before it was killed");
    let settled = text.matches(r#""event":"settled""#).count() as u64;
    let sent = text.matches(r#""event":"sent""#).count() as u64;

    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args([
        "purge",
        "orders",
        "--filter",
        "true",
        "--max",
        "1",
        "--no-backup",
        "--yes",
        "--journal",
        journal.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{out}{err}");

    let (code, out, err) =
        run(bin()
            .arg("-c")
            .arg(&cfg)
            .args(["runs", "--journal", journal.to_str().unwrap(), "-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    let (killed, purge) = (&rows[0], &rows[1]);
    assert_eq!(
        (killed["action"].as_str(), killed["stopped"].as_str()),
        (Some("redrive"), Some("unfinished")),
        "{killed}"
    );
    assert_eq!(
        (killed["sent"].as_u64(), killed["settled"].as_u64()),
        (Some(sent), Some(settled))
    );
    assert_eq!(
        (killed["queue"].as_str(), killed["trigger"].as_str()),
        (Some("orders"), Some("cli"))
    );
    assert_eq!(purge["action"], "purge", "{purge}");
    assert_ne!(purge["stopped"], "unfinished");

    let (code, out, err) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .args(["runs", "--journal", journal.to_str().unwrap()]));
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].contains("ACTION"), "{out}");
    let killed_cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        killed_cells[2..].join(" "),
        format!("redrive cli false - {sent} {settled} 0 unfinished true"),
        "{out}"
    );
    assert_eq!(lines[2].split_whitespace().nth(2), Some("purge"), "{out}");
}

/// `inspect` reads what its help says: without a filter no more than
/// `--limit` (each read raises an SQS receive count), with one at most
/// `--scan`, and it says when that read may have missed matches.
#[tokio::test]
async fn inspect_reads_at_most_limit_unfiltered_and_at_most_scan_filtered() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&tenants(6)).await;
    let cfg = fixture_config(&f);
    let before = f.dlq_snapshot().await;

    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args(["inspect", "orders", "-n", "2"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("2 shown, 2 read"), "{err}");
    // The snapshot adds one receive to each; the inspect one more to two only.
    let after = f.dlq_snapshot().await;
    let raised: Vec<u32> = after
        .iter()
        .map(|(id, _, c)| c - before.iter().find(|(b, ..)| b == id).unwrap().2)
        .collect();
    assert_eq!(raised.iter().filter(|&&d| d == 2).count(), 2, "{raised:?}");
    assert_eq!(raised.iter().filter(|&&d| d == 1).count(), 4, "{raised:?}");

    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args([
        "inspect",
        "orders",
        "--filter",
        r#"attributes.tenant == "acme""#,
        "--scan",
        "3",
        "-n",
        "10",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains(" shown, 3 read"), "{err}");
    assert!(err.contains("the read stopped at --scan 3"), "{err}");

    let (code, out, err) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .args(["inspect", "orders", "-o", "json", "-n", "10"]));
    assert_eq!(code, 0, "{out}{err}");
    let msgs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(msgs.as_array().unwrap().len(), 6, "{out}");
    assert!(!err.contains("--scan"), "{err}");

    // --scan bounds the search for a filter's matches, not an unfiltered
    // read: `-n 5 --scan 3` shows five (it showed three, and said nothing).
    let (code, out, err) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .args(["inspect", "orders", "-n", "5", "--scan", "3"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("5 shown, 5 read"), "{err}");
}

/// `dlq-bridge ... | head` closes the pipe before the command has written
/// its output. That ends the output, not the command: no panic, and the exit
/// code still says what the redrive did.
#[tokio::test]
async fn a_closed_stdout_does_not_turn_a_redrive_into_a_crash() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&tenants(6)).await;
    let cfg = fixture_config(&f);
    for format in ["json", "table"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = bin()
            .arg("-c")
            .arg(&cfg)
            .args(["redrive", "orders", "--filter", "true", "--yes", "-o", format])
            .stdout(writer)
            .output()
            .expect("run dlq-bridge");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{format}: {err}");
        assert!(!err.contains("panicked"), "{format}: {err}");
    }
    assert_eq!(f.drain_source().await.len(), 6);
    assert!(f.dlq_snapshot().await.is_empty());
}

/// `inspect --scan N` holds what it shows, not what it scans: the messages
/// the filter passes over are dropped as they are read. 150 bodies of
/// 200 KB (30 MB) scanned for matches that are not there must cost about
/// what 10 of them cost; holding them all made the peak grow with `--scan`
/// (with 1 MiB bodies and a sidecar's `scan=10000`, gigabytes).
#[tokio::test]
async fn inspect_memory_follows_what_it_shows_not_what_it_scans() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&common::large_messages(150, 200_000)).await;
    let cfg = fixture_config(&f);
    let peak = |scan: &str| {
        let (code, _, err, rss) = run_measured(bin().arg("-c").arg(&cfg).args([
            "inspect",
            "orders",
            "--filter",
            r#"body.startsWith("none")"#,
            "--scan",
            scan,
            "-n",
            "5",
        ]));
        assert_eq!(code, 0, "{err}");
        assert!(err.contains(&format!("0 shown, {scan} read")), "{err}");
        rss
    };
    let small = peak("10");
    let large = peak("150");
    eprintln!("peak RSS KiB: scan 10 {small}, scan 150 {large}");
    assert!(
        large - small < 12 * 1024,
        "scanning 150 messages of 200 KB peaked at {} KiB, 10 of them at {} KiB: the messages not shown were kept",
        large,
        small
    );
}

/// A destination whose `MaximumMessageSize` is below SQS's 1 MiB (256 KiB is
/// still the default of infrastructure tools): a copy over it is refused
/// before any call, naming the limit, and stays in the DLQ; a copy that fits
/// only without the redrive marks goes without them. Sized to 1 MiB, the
/// first failed on every run with SQS's own error and the second too.
#[tokio::test]
async fn copies_are_sized_to_the_destination_queues_own_limit() {
    use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};

    let f = SqsFixture::create(false).await;
    let small = f
        .create_queue(
            &format!("small-{}", uuid::Uuid::new_v4().simple()),
            &[(QueueAttributeName::MaximumMessageSize, "2048".into())],
        )
        .await;
    let sized = |n: usize| TestMessage {
        body: "x".repeat(n).into_bytes(),
        attributes: Default::default(),
        ordering_key: None,
    };
    // With its marks (about 130 bytes) 1,650; 2,040 only without them; 3,000 over.
    f.put_in_dlq(&[sized(1500), sized(2000), sized(3000)]).await;
    let cfg = fixture_config(&f);
    let journal = std::env::temp_dir().join(format!("dlqb-sized-{}.jsonl", uuid::Uuid::new_v4().simple()));
    let journal = journal.to_str().unwrap();
    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args([
        "redrive",
        "orders",
        "--to",
        &small,
        "--yes",
        "--journal",
        journal,
        "-o",
        "json",
    ]));
    assert_eq!(code, 1, "one copy could not be sent: {out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s["sent"].as_u64(), s["send_failed"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    assert_eq!(s["marks_omitted"], 1, "{s}");
    assert!(
        s["errors"]
            .to_string()
            .contains("over the destination's MaximumMessageSize of 2048"),
        "{s}"
    );
    assert_eq!(f.dlq_count().await, 1, "the copy not sent stays in the DLQ");
    let got = f
        .client
        .receive_message()
        .queue_url(&small)
        .max_number_of_messages(10)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap();
    let mut arrived: Vec<(usize, bool)> = got
        .messages()
        .iter()
        .map(|m| {
            let marked = m.message_attributes().is_some_and(|a| !a.is_empty());
            (m.body().unwrap().len(), marked)
        })
        .collect();
    arrived.sort();
    assert_eq!(arrived, [(1500, true), (2000, false)]);

    // The refused copy goes elsewhere in a later run: a send that failed,
    // recorded so, is no resend after a crash.
    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args([
        "redrive",
        "orders",
        "--to",
        &f.source_url,
        "--yes",
        "--journal",
        journal,
        "-o",
        "json",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s["sent"].as_u64(), s["resent_after_crash"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
    let _ = std::fs::remove_file(journal);
}

/// An SQS message's X-Ray trace (`AWSTraceHeader`, the one system attribute a
/// send may set) goes on with its copy: redriven without it, the trace of
/// the request that failed ended at the DLQ. moto keeps it on a single send
/// but drops it from a batch entry, so what the batch carries is read off
/// the request, in a front before moto.
#[tokio::test]
async fn a_copy_keeps_the_messages_xray_trace_header() {
    use aws_sdk_sqs::types::{MessageSystemAttributeNameForSends, MessageSystemAttributeValue};
    const TRACE: &str = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
    let f = SqsFixture::create(false).await;
    f.client
        .send_message()
        .queue_url(&f.dlq_url)
        .message_body(r#"{"order":1}"#)
        .message_system_attributes(
            MessageSystemAttributeNameForSends::AwsTraceHeader,
            MessageSystemAttributeValue::builder()
                .data_type("String")
                .string_value(TRACE)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    // Read: shown among the message's properties.
    let cfg = fixture_config(&f);
    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args(["inspect", "orders", "-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown[0]["properties"]["aws_trace_header"], TRACE, "{shown}");
    // Redriven: the copy's batch entry carries it as a system attribute.
    let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let seen = batches.clone();
    let front = common::sqs::sqs_front(&f.endpoint, move |target, body| {
        if target.ends_with(".SendMessageBatch") {
            seen.lock().unwrap().push(serde_json::from_slice(body).unwrap());
        }
        None
    })
    .await;
    let cfg = write_config(&format!(
        "queues:\n  - name: orders\n    sqs:\n      queue: {}\n      endpoint_url: {front}\n      region: us-east-1\n",
        f.dlq_url
    ));
    let mut cmd = bin();
    cmd.arg("-c")
        .arg(&cfg)
        .args(["redrive", "orders", "--to", &f.source_url, "--yes", "--no-journal"]);
    // Off the runtime's thread: the front answers on it.
    let (code, out, err) = tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches.len(), 1, "{batches:?}");
    let entry = &batches[0]["Entries"][0];
    assert_eq!(
        entry["MessageSystemAttributes"]["AWSTraceHeader"],
        serde_json::json!({"DataType": "String", "StringValue": TRACE}),
        "{entry}"
    );
    assert_eq!(f.drain_source().await.len(), 1);
}

/// SQS trusts the CAs of SSL_CERT_FILE, like every backend: an endpoint
/// behind a private CA (a TLS terminator with a test CA, in front of moto) is refused without it, with the remedy, and trusted with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqs_endpoint_behind_a_private_ca_is_trusted_through_ssl_cert_file() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&tenants(3)).await;
    let upstream = f.endpoint.trim_start_matches("http://").trim_end_matches('/');
    let tls = common::tls::TlsTerminator::start(upstream, &[b"http/1.1"]).await;
    let ca = write_config(&tls.ca_pem);
    let cfg = write_config(&format!(
        "queues:\n  - name: orders\n    sqs:\n      queue: {}\n      endpoint_url: https://{}\n      region: us-east-1\n",
        f.dlq_url, tls.endpoint
    ));
    let redrive = |ca_file: Option<&PathBuf>| {
        let mut cmd = bin();
        cmd.arg("-c")
            .arg(&cfg)
            .args(["redrive", "orders", "--yes", "--no-journal"])
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        if let Some(ca_file) = ca_file {
            cmd.env("SSL_CERT_FILE", ca_file);
        }
        run(&mut cmd)
    };

    let (code, out, err) = redrive(None);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("TLS with https://{}", tls.endpoint))
            && err.contains("its certificate is not trusted (its issuer is not a trusted CA)")
            && err.contains("set SSL_CERT_FILE"),
        "{err}"
    );
    assert_eq!(f.dlq_snapshot().await.len(), 3, "nothing moved");

    let (code, out, err) = redrive(Some(&ca));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(f.drain_source().await.len(), 3, "{out}{err}");
    assert!(f.dlq_snapshot().await.is_empty(), "{out}{err}");
    for path in [ca, cfg] {
        let _ = std::fs::remove_file(path);
    }
}
