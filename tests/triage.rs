//! The triage commands of the `dlq-bridge` binary end to end against moto:
//! report, export, import, purge and retention, with their exit codes.
#![cfg(feature = "sqs")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::sqs::SqsFixture;
use common::{Fixture, TestMessage, attrs, unique};
use dlq_bridge::engine::journal::{Record, read_records};
use dlq_bridge::engine::triage::{ExportedMessage, read_export};

fn bin(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"));
    c.env_remove("DLQ_BRIDGE_CONFIG")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("XDG_STATE_HOME", state);
    c
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = cmd.output().expect("run dlq-bridge");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(unique("dlqb-triage-cli"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &Path, f: &SqsFixture, extra: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "queues:\n  - name: orders\n    sqs:\n      queue: {}\n      endpoint_url: {}\n      region: us-east-1\n{extra}redrive:\n  hold: 2m\n",
            f.dlq_url, f.endpoint
        ),
    )
    .unwrap();
    path
}

/// `export orders --to FILE`, which must succeed: its (stdout, stderr).
fn export_to(dir: &Path, cfg: &Path, file: &Path) -> (String, String) {
    let (code, out, err) = run(bin(dir).arg("-c").arg(cfg).args(["export", "orders", "--to"]).arg(file));
    assert_eq!(code, 0, "{out}{err}");
    (out, err)
}

fn failures() -> Vec<TestMessage> {
    let cases = [
        ("Timeout", "payment gateway timed out after 3012 ms"),
        ("Timeout", "payment gateway timed out after 15 ms"),
        ("Timeout", "inventory service timed out after 1500 ms"),
        ("ValidationError", "field `sku` missing"),
        ("ValidationError", "field `qty` missing"),
        ("DownstreamUnavailable", "HTTP 503 from shipping"),
    ];
    cases
        .iter()
        .enumerate()
        .map(|(i, (error, description))| TestMessage {
            body: format!(r#"{{"order":{i}}}"#).into_bytes(),
            attributes: attrs(&[
                ("tenant", ["acme", "globex"][i % 2]),
                ("error", error),
                ("error_description", description),
            ]),
            ordering_key: None,
        })
        .collect()
}

#[tokio::test]
async fn report_groups_by_pattern_and_rejects_bad_input() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&failures()).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");

    let (code, out, err) = run(bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .args(["report", "orders", "--by", "pattern"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("no true peek"), "the side effect is stated: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("COUNT") && lines[0].ends_with("PATTERN"), "{out}");
    assert!(
        lines[1].starts_with("2 ") && lines[1].contains("Timeout: payment gateway timed out after <n> ms"),
        "{out}"
    );
    assert!(out.contains("ValidationError: field <str> missing"), "{out}");
    assert!(out.contains("6 messages grouped by pattern (6 read)"), "{out}");

    let (code, out, err) = run(bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .args(["report", "orders", "--by", "reason", "--top", "1", "-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["groups"][0]["key"], "Timeout");
    assert_eq!(r["groups"][0]["count"], 3);
    assert_eq!(r["other"]["count"], 3);
    assert_eq!(r["other"]["groups_folded"], 2);

    for bad in [
        vec!["report", "orders", "--by", "colour"],
        vec!["report", "orders", "--filter", "reason =="],
        vec!["report", "nosuch"],
    ] {
        let (code, out, err) = run(bin(&dir).arg("-c").arg(&cfg).args(&bad));
        assert_eq!(code, 2, "{bad:?}: {out}{err}");
    }
    assert_eq!(f.dlq_count().await, 6);
}

#[tokio::test]
async fn export_import_and_purge_from_the_command_line() {
    let f = SqsFixture::create(false).await;
    let msgs = failures();
    f.dead_letter(&msgs).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");
    let file = dir.join("out.jsonl");
    let journal = dir.join("journal.jsonl");

    let (code, out, err) = run(bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .args(["export", "orders", "--filter", r#"reason == "Timeout""#, "--to"])
        .arg(&file));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("exported 3 of 6 messages"), "{out}");
    let lines: Vec<ExportedMessage> = read_export(&file).unwrap().map(Result::unwrap).collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines
            .iter()
            .all(|l| l.reason.as_deref() == Some("Timeout") && l.body_preview.starts_with("{\"order\""))
    );
    assert_eq!(f.dlq_count().await, 6, "export removes nothing");

    let (code, out, err) =
        run(bin(&dir)
            .arg("-c")
            .arg(&cfg)
            .arg("import")
            .arg(&file)
            .args(["--to", "orders", "--dry-run"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("matched:   3") && out.contains("would go to"), "{out}");
    assert!(f.drain_source().await.is_empty(), "a dry run sends nothing");

    // Off a terminal, changing commands need --yes.
    let (code, _, err) = run(bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .arg("import")
        .arg(&file)
        .args(["--to", "orders"]));
    assert_eq!(code, 2, "{err}");

    let (code, out, err) = run(bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .arg("import")
        .arg(&file)
        .args(["--to", "orders", "--yes", "--rate", "50", "--journal"])
        .arg(&journal));
    assert_eq!(code, 0, "{out}{err}");
    let arrived = f.drain_source().await;
    let mut got: Vec<Vec<u8>> = arrived.iter().map(|m| m.body.clone()).collect();
    got.sort();
    let mut want: Vec<Vec<u8>> = lines.iter().map(|l| l.to_message().unwrap().body.to_vec()).collect();
    want.sort();
    assert_eq!(got, want);
    for m in &arrived {
        assert_eq!(m.attributes["error"].as_text(), "Timeout");
        assert!(m.attributes["error_description"].as_text().contains("timed out"));
    }

    // Purge the ValidationErrors, with a backup.
    let backup = dir.join("backup.jsonl");
    let (code, _, err) = run(bin(&dir).arg("-c").arg(&cfg).args(["purge", "orders"]));
    assert_eq!(code, 2, "--filter is required: {err}");
    let filter = r#"reason == "ValidationError""#;
    let (code, out, err) =
        run(bin(&dir)
            .arg("-c")
            .arg(&cfg)
            .args(["purge", "orders", "--filter", filter, "--dry-run"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("matched:   2"), "{out}");
    // The backup the real purge would write is named, and not created (it
    // said "no backup").
    let backups = dir.join("dlq-bridge/backups");
    assert!(
        out.contains(&format!("2 would be purged, backup {}/orders-", backups.display())),
        "{out}"
    );
    assert!(!backups.exists());
    assert_eq!(f.dlq_count().await, 6);
    let (code, out, err) = run(bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .args(["purge", "orders", "--filter", filter, "--yes", "--backup"])
        .arg(&backup)
        .arg("--journal")
        .arg(&journal));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("deleted:   2"), "{out}");
    assert_eq!(f.dlq_count().await, 4);
    let saved: Vec<ExportedMessage> = read_export(&backup).unwrap().map(Result::unwrap).collect();
    assert_eq!(saved.len(), 2);
    assert!(saved.iter().all(|l| l.reason.as_deref() == Some("ValidationError")));
    let records = read_records(&journal).unwrap();
    let purged: Vec<&Record> = records.iter().filter(|r| matches!(r, Record::Purged { .. })).collect();
    assert_eq!(purged.len(), 2, "{records:?}");
    assert_eq!(
        records.iter().filter(|r| matches!(r, Record::Imported { .. })).count(),
        3
    );

    // Without --backup, the default backup lands in the state directory.
    let (code, out, err) = run(bin(&dir).arg("-c").arg(&cfg).args([
        "purge",
        "orders",
        "--filter",
        r#"reason == "DownstreamUnavailable""#,
        "--yes",
        "--no-journal",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    let backups: Vec<_> = std::fs::read_dir(dir.join("dlq-bridge/backups")).unwrap().collect();
    assert_eq!(backups.len(), 1);
    assert_eq!(f.dlq_count().await, 3);
    // A purge that matches nothing leaves no empty backup behind (a
    // retention policy checked hourly left one an hour).
    let (code, out, err) = run(bin(&dir).arg("-c").arg(&cfg).args([
        "purge",
        "orders",
        "--filter",
        r#"reason == "NoSuchReason""#,
        "--yes",
        "--no-journal",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(std::fs::read_dir(dir.join("dlq-bridge/backups")).unwrap().count(), 1);

    // With serve.data_dir set, the default backup goes there, where `serve`
    // keeps its purges' backups (a sidecar pod's volume), not to the state directory.
    let data_dir = dir.join("data");
    let (code, out, err) = run(bin(&dir)
        .env("DLQ_BRIDGE__SERVE__DATA_DIR", &data_dir)
        .arg("-c")
        .arg(&cfg)
        .args([
            "purge",
            "orders",
            "--filter",
            "true",
            "--max",
            "1",
            "--yes",
            "--no-journal",
        ]));
    assert_eq!(code, 0, "{out}{err}");
    let backups: Vec<PathBuf> = std::fs::read_dir(data_dir.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(read_export(&backups[0]).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(dir.join("dlq-bridge/backups")).unwrap().count(), 1);
    assert_eq!(f.dlq_count().await, 2);
}

#[tokio::test]
async fn retention_dry_run_lists_then_export_then_purge_empties() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&failures()).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let dir = scratch();
    let export_dir = dir.join("retention");
    let cfg = config(
        &dir,
        &f,
        &format!(
            "    retention:\n      max_age: 1s\n      action: export-then-purge\n      export_dir: {}\n",
            export_dir.display()
        ),
    );
    let (code, out, err) = run(bin(&dir).arg("-c").arg(&cfg).args(["retention", "--dry-run"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("(dry run)") && out.contains("would purge 6 of 6 messages read"),
        "{out}"
    );
    assert_eq!(out.lines().filter(|l| l.contains("reason=")).count(), 6, "{out}");
    assert_eq!(f.dlq_count().await, 6);
    assert!(!export_dir.exists());

    let (code, out, err) = run(bin(&dir).arg("-c").arg(&cfg).args(["retention", "orders", "--yes"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("purged 6 expired messages"), "{out}");
    assert_eq!(f.dlq_count().await, 0);
    let files: Vec<PathBuf> = std::fs::read_dir(&export_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(read_export(&files[0]).unwrap().count(), 6);

    let (code, _, err) = run(bin(&dir).arg("-c").arg(config(&dir, &f, "")).arg("retention"));
    assert_eq!(code, 2, "no policy is a usage error: {err}");
}

/// SQS to Pub/Sub: the export of an SQS DLQ replays into a Pub/Sub queue's
/// source topic; bodies arrive exact, typed attributes as their text, and the
/// summary names every attribute whose type Pub/Sub cannot carry.
#[cfg(feature = "pubsub")]
#[tokio::test]
async fn import_crosses_providers_and_names_what_is_not_carried() {
    use common::pubsub::PubSubFixture;
    use dlq_bridge::engine::registry::Registry;
    use dlq_bridge::engine::triage::{self, ImportRequest};

    let sqs = SqsFixture::create(false).await;
    let ps = PubSubFixture::create(false).await;
    let mut typed = attrs(&[("error", "Payload"), ("kind", "typed")]);
    typed.extend(SqsFixture::typed_attributes());
    let msgs = vec![TestMessage {
        body: "unicode ✓ — \t tabs\nand newlines".as_bytes().to_vec(),
        attributes: typed.clone(),
        ordering_key: None,
    }];
    sqs.put_in_dlq(&msgs).await;
    let mut config = sqs.config();
    config.queues[0].name = "from-sqs".into();
    let mut pubsub_queue = ps.config().queues.remove(0);
    pubsub_queue.name = "to-pubsub".into();
    config.queues.push(pubsub_queue);
    let reg = Registry::new(config);
    let dir = scratch();
    let file = dir.join("sqs.jsonl");
    let s = triage::export(&reg, "from-sqs", &file, None, None, None, &Default::default())
        .await
        .unwrap();
    assert_eq!(s.written, 1);
    let req = ImportRequest::new(&file, "to-pubsub");
    let s = triage::import(&reg, &req, None, Default::default()).await.unwrap();
    assert_eq!((s.sent, s.failed), (1, 0), "{s:?}");
    for name in ["n", "blob", "custom"] {
        let named = format!("attribute `{name}`");
        assert!(s.not_carried.keys().any(|k| k.contains(&named)), "{name}: {s:?}");
    }
    let arrived = ps.drain_source().await;
    assert_eq!(arrived.len(), 1);
    assert_eq!(arrived[0].body, msgs[0].body);
    for (k, a) in &typed {
        assert_eq!(arrived[0].attributes[k].as_text(), a.as_text(), "attribute {k}");
    }
}

/// Pub/Sub to SQS: a copy SQS would refuse (or store altered) fails on its
/// own, before any call, and the copies around it arrive. SQS fails a whole
/// SendMessageBatch for one bad attribute name, and its documented character
/// rules for bodies and values are not checked by moto.
#[cfg(feature = "pubsub")]
#[tokio::test]
async fn import_into_sqs_fails_only_the_copies_sqs_refuses() {
    use common::pubsub::PubSubFixture;
    use dlq_bridge::engine::registry::Registry;
    use dlq_bridge::engine::triage::{self, ImportRequest};

    let sqs = SqsFixture::create(false).await;
    let ps = PubSubFixture::create(false).await;
    let msg = |body: &str, extra: (&str, &str)| TestMessage {
        body: body.as_bytes().to_vec(),
        attributes: attrs(&[("error", "Payload"), extra]),
        ordering_key: None,
    };
    let msgs = vec![
        msg("fine ✓", ("kind", "ok")),
        msg("a NUL \u{0} in the body", ("kind", "nul")),
        msg("spaced attribute name", ("with space", "x")),
        msg("reserved attribute name", ("AWS.trace", "x")),
        msg("empty attribute value", ("empty", "")),
        msg("", ("kind", "empty body")),
        msg("also fine", ("kind", "ok")),
    ];
    ps.put_in_dlq(&msgs).await;
    let mut config = ps.config();
    config.queues[0].name = "from-pubsub".into();
    let mut sqs_queue = sqs.config().queues.remove(0);
    sqs_queue.name = "to-sqs".into();
    config.queues.push(sqs_queue);
    let reg = Registry::new(config);
    let dir = scratch();
    let file = dir.join("pubsub.jsonl");
    let s = triage::export(&reg, "from-pubsub", &file, None, None, None, &Default::default())
        .await
        .unwrap();
    assert_eq!(s.written, msgs.len() as u64);
    let req = ImportRequest::new(&file, "to-sqs");
    let s = triage::import(&reg, &req, None, Default::default()).await.unwrap();
    assert_eq!((s.sent, s.failed), (2, 5), "{s:?}");
    let errors = s.errors.join("\n");
    // Each failure names its line, to find it among thousands.
    assert!(errors.contains("(line 2): "), "{errors}");
    for said in [
        "the body holds U+0000, which SQS does not allow",
        "attribute name `with space` has characters other than",
        "attribute name `AWS.trace` starts with a prefix AWS reserves",
        "attribute `empty` is empty",
        "the body is empty",
    ] {
        assert!(errors.contains(said), "{said}: {errors}");
    }
    let arrived: BTreeSet<Vec<u8>> = sqs.drain_source().await.into_iter().map(|m| m.body).collect();
    assert_eq!(
        arrived,
        BTreeSet::from([b"fine \xE2\x9C\x93".to_vec(), b"also fine".to_vec()])
    );
}

/// Service Bus message IDs (up to 128 characters, any text) imported into an
/// SQS FIFO queue: each copy's deduplication ID must stay distinct. IDs that
/// differ only in characters SQS does not allow there, or past its 128th
/// character, once became the same ID, and SQS accepted the second copy as
/// sent and dropped it as a duplicate.
#[tokio::test]
async fn import_into_a_fifo_queue_keeps_distinct_ids_distinct() {
    let f = SqsFixture::create(true).await;
    let long = "m".repeat(130);
    let ids = [
        "order 1".to_string(),
        "order1".into(),
        format!("{long}a"),
        format!("{long}b"),
    ];
    let dir = scratch();
    let file = dir.join("servicebus.jsonl");
    let lines: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| servicebus_line(id, &format!("message {i}"), "session ü"))
        .collect();
    let s = import_into_source(&f, &file, &lines).await;
    assert_eq!((s.sent, s.failed), (4, 0), "{s:?}");
    let arrived: Vec<Vec<u8>> = f.drain_source().await.into_iter().map(|m| m.body).collect();
    let expected: Vec<Vec<u8>> = (0..4).map(|i| format!("message {i}").into_bytes()).collect();
    assert_eq!(arrived, expected, "every copy arrives, in order");
}

/// Write `lines` to `file` and import it into the fixture's source queue
/// (by address: ministack lists no dead-letter sources).
async fn import_into_source(
    f: &SqsFixture,
    file: &Path,
    lines: &[String],
) -> dlq_bridge::engine::triage::ImportSummary {
    use dlq_bridge::engine::registry::Registry;
    use dlq_bridge::engine::triage::{self, ImportRequest};
    std::fs::write(file, lines.join("\n") + "\n").unwrap();
    let reg = Registry::new(f.config());
    let req = ImportRequest {
        address: Some(&f.source_url),
        ..ImportRequest::new(file, "dlq")
    };
    triage::import(&reg, &req, None, Default::default()).await.unwrap()
}

/// An export line of a Service Bus message of session `session`.
fn servicebus_line(id: &str, body: &str, session: &str) -> String {
    let line = ExportedMessage {
        queue: "orders".into(),
        backend: "servicebus".into(),
        id: id.to_string(),
        body_base64: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, body),
        body_preview: body.to_string(),
        body_bytes: body.len(),
        attributes: attrs(&[("error", "Timeout")]),
        properties: Default::default(),
        reason: None,
        description: None,
        delivery_count: Some(10),
        enqueued_at: None,
        source: None,
        ordering_key: Some(session.into()),
        provider_attributes: Vec::new(),
        exported_at: chrono::Utc::now(),
    };
    serde_json::to_string(&line).unwrap()
}

fn numbered(n: usize) -> Vec<TestMessage> {
    (0..n)
        .map(|i| TestMessage {
            body: format!("message {i} ✓").into_bytes(),
            attributes: attrs(&[("error", "Timeout"), ("i", &i.to_string())]),
            ordering_key: None,
        })
        .collect()
}

/// An `--address` the provider does not know is named as the `--address`
/// it is (it was called `--to`, which names the configured queue), exit 2,
/// and nothing is sent.
#[tokio::test]
async fn import_names_an_unknown_address_as_the_address() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&numbered(2)).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");
    let file = dir.join("two.jsonl");
    export_to(&dir, &cfg, &file);
    let (code, out, err) = run(bin(&dir).arg("-c").arg(&cfg).arg("import").arg(&file).args([
        "--to",
        "orders",
        "--address",
        "no-such-queue-anywhere",
        "--yes",
        "--no-journal",
    ]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--address no-such-queue-anywhere: "), "{err}");
    assert!(!err.contains("--to no-such-queue-anywhere"), "{err}");
    assert!(f.drain_source().await.is_empty(), "nothing was sent: {out}{err}");
}

/// `--address` is a provider address even when a configured queue has the
/// same name: it was taken as that queue, whose source is somewhere else.
#[tokio::test]
async fn import_takes_an_address_literally_when_a_queue_has_its_name() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&numbered(2)).await;
    let dir = scratch();
    let source_name = f.source_url.rsplit('/').next().unwrap().to_string();
    let namesake = format!(
        "  - name: {source_name}\n    sqs:\n      queue: {}\n      endpoint_url: {}\n      region: us-east-1\n    source: no-such-queue-anywhere\n",
        f.dlq_url, f.endpoint
    );
    let cfg = config(&dir, &f, &namesake);
    let file = dir.join("two.jsonl");
    export_to(&dir, &cfg, &file);
    let (code, out, err) = run(bin(&dir).arg("-c").arg(&cfg).arg("import").arg(&file).args([
        "--to",
        "orders",
        "--address",
        &source_name,
        "--yes",
        "--no-journal",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(f.drain_source().await.len(), 2, "{out}{err}");
}

/// An export that fails (here: the DLQ is gone) must not truncate the file it
/// was to replace, which may be an earlier export or a purge backup.
#[tokio::test]
async fn a_failed_export_keeps_the_file_it_was_to_replace() {
    let f = SqsFixture::create(false).await;
    let dir = scratch();
    let gone = SqsFixture {
        dlq_url: format!("{}-gone", f.dlq_url),
        ..f
    };
    let cfg = config(&dir, &gone, "");
    let file = dir.join("earlier.jsonl");
    std::fs::write(&file, EARLIER_EXPORT).unwrap();
    let (code, out, err) = run(bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .args(["export", "orders", "--to"])
        .arg(&file));
    assert_ne!(code, 0, "{out}{err}");
    assert_earlier_export_kept(&file, &dir, &err);
}

/// A malformed line half-way through the file stops the import before
/// anything is sent (a partial import, rerun after the fix, would send the
/// first part twice), and the error names the line as an editor numbers it.
#[tokio::test]
async fn import_checks_every_line_before_sending_any() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&numbered(25)).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");
    let file = dir.join("all.jsonl");
    export_to(&dir, &cfg, &file);
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 25);
    lines.insert(1, String::new());
    let good = lines[18].clone();

    // Line 19 is not JSON; then, line 19 has a body that is not base64.
    lines[18] = "{\"queue\": ".into();
    let bad_json = dir.join("bad-json.jsonl");
    std::fs::write(&bad_json, lines.join("\n") + "\n").unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["body_base64"] = "!!not base64".into();
    lines[18] = v.to_string();
    let bad_body = dir.join("bad-body.jsonl");
    std::fs::write(&bad_body, lines.join("\n") + "\n").unwrap();

    for bad in [&bad_json, &bad_body] {
        let (code, out, err) =
            run(bin(&dir)
                .arg("-c")
                .arg(&cfg)
                .arg("import")
                .arg(bad)
                .args(["--to", "orders", "--yes", "--no-journal"]));
        assert_eq!(code, 2, "{out}{err}");
        let name = bad.file_name().unwrap().to_string_lossy();
        assert!(err.contains(&format!("{name}:19: not an export line")), "{err}");
        // A line cut short is told as what a crash leaves.
        assert_eq!(bad == &bad_json, err.contains("the line is cut short"), "{err}");
        assert!(f.drain_source().await.is_empty(), "nothing was sent: {out}{err}");
    }
}

/// An SQS DLQ of `n` numbered messages, exported to `all.jsonl` in a scratch
/// directory with its config.
struct Exported {
    f: SqsFixture,
    msgs: Vec<TestMessage>,
    dir: PathBuf,
    cfg: PathBuf,
    file: PathBuf,
}

async fn exported(n: usize) -> Exported {
    exported_on(SqsFixture::create(false).await, n).await
}

/// `n` numbered messages put in `f`'s DLQ and exported to a file.
async fn exported_on(f: SqsFixture, n: usize) -> Exported {
    let msgs = numbered(n);
    f.put_in_dlq(&msgs).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");
    let file = dir.join("all.jsonl");
    export_to(&dir, &cfg, &file);
    Exported {
        f,
        msgs,
        dir,
        cfg,
        file,
    }
}

/// Ctrl-C during an import stops it cleanly: the batch in flight finishes,
/// nothing else is sent, the summary counts exactly what arrived and names the
/// line to resume from, and importing from that line completes the file with
/// every message exactly once.
#[tokio::test]
async fn an_interrupted_import_says_where_to_resume() {
    let Exported {
        f,
        msgs,
        dir,
        cfg,
        file,
    } = exported(30).await;

    let child = bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .arg("import")
        .arg(&file)
        .args(["--to", "orders", "--yes", "--no-journal", "--rate", "3", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    assert_eq!(status.code(), Some(130), "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["interrupted"], true, "{out}");
    let sent = s["sent"].as_u64().unwrap() as usize;
    let resume = s["resume_line"].as_u64().unwrap() as usize;
    assert!(sent > 0 && sent < 30, "{out}");
    assert_eq!(resume, sent + 1, "{out}");
    let mut arrived: Vec<Vec<u8>> = f.drain_source().await.into_iter().map(|m| m.body).collect();
    assert_eq!(arrived.len(), sent, "the summary counts what arrived: {out}");

    let rest = dir.join("rest.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&rest, text.lines().skip(resume - 1).collect::<Vec<_>>().join("\n")).unwrap();
    let (code, out, err) =
        run(bin(&dir)
            .arg("-c")
            .arg(&cfg)
            .arg("import")
            .arg(&rest)
            .args(["--to", "orders", "--yes", "--no-journal"]));
    assert_eq!(code, 0, "{out}{err}");
    arrived.extend(f.drain_source().await.into_iter().map(|m| m.body));
    arrived.sort();
    let mut want: Vec<Vec<u8>> = msgs.into_iter().map(|m| m.body).collect();
    want.sort();
    assert_eq!(arrived, want, "every message exactly once");
}

/// `export --to - | head`: the reader going away ends the export (exit 0,
/// as any command's output), and what the read held is released. It failed
/// with "Broken pipe" (exit 1), and the rest of the batch it was writing
/// stayed hidden for the hold.
#[tokio::test]
async fn an_export_whose_reader_goes_away_ends_and_releases_what_it_read() {
    use std::io::Read as _;
    let f = SqsFixture::create(false).await;
    let msgs: Vec<TestMessage> = (0..300)
        .map(|i| TestMessage {
            body: format!("{i:04} {}", "x".repeat(600)).into_bytes(),
            ..numbered(1).remove(0)
        })
        .collect();
    f.put_in_dlq(&msgs).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");
    let mut child = bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .args(["export", "orders", "--to", "-"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The pipe's read end is closed here, as `head -c 100` closes it.
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
    assert_eq!(f.dlq_visible().await, 300, "every message read was released: {err}");
}

/// With the journal an import is safe to run again: after a kill -9 part-way
/// the rerun sends only the lines not yet recorded as imported, a second
/// import of the whole file sends nothing, and `--again` sends it all. Each
/// rerun sent every line again under new redrive marks.
#[tokio::test]
async fn an_import_run_again_sends_only_what_the_journal_has_not_seen() {
    let Exported { f, dir, cfg, file, .. } = exported(30).await;
    let journal = dir.join("journal.jsonl");
    let import = |extra: &[&str]| {
        let mut c = bin(&dir);
        c.arg("-c")
            .arg(&cfg)
            .arg("import")
            .arg(&file)
            .args(["--to", "orders", "--yes", "--journal"])
            .arg(&journal)
            .args(extra);
        c
    };

    let mut child = import(&["--rate", "5"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let imported = || {
        std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .matches(r#""event":"imported""#)
            .count()
    };
    let started = std::time::Instant::now();
    while imported() < 5 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "nothing imported"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let recorded = imported();
    assert!(recorded < 30, "killed part-way");
    let first: Vec<Vec<u8>> = f.drain_source().await.into_iter().map(|m| m.body).collect();
    // Copies of the batch in flight at the kill may have arrived unrecorded.
    assert!(first.len() >= recorded, "{} arrived, {recorded} recorded", first.len());

    let (code, out, err) = run(&mut import(&["-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["already_imported"].as_u64(), Some(recorded as u64), "{out}");
    assert_eq!(s["sent"].as_u64(), Some(30 - recorded as u64), "{out}");
    let mut arrived = first;
    arrived.extend(f.drain_source().await.into_iter().map(|m| m.body));
    let mut distinct = arrived.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 30, "every message arrived");
    // At most the batch in flight at the kill (10 on SQS) arrived twice.
    assert!(arrived.len() - 30 <= 10, "{} copies", arrived.len());

    let (code, out, err) = run(&mut import(&["-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s["already_imported"].as_u64(), s["sent"].as_u64()),
        (Some(30), Some(0)),
        "{out}"
    );
    let (code, out, err) = run(&mut import(&["-o", "table"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("already imported: 30"), "{out}");
    assert!(f.drain_source().await.is_empty(), "nothing sent a second time");

    let (code, out, err) = run(&mut import(&["--again", "-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s["already_imported"].as_u64(), s["sent"].as_u64()),
        (Some(0), Some(30)),
        "{out}"
    );
    assert_eq!(f.drain_source().await.len(), 30);
}

/// `--again` sends copies anew, also to a FIFO queue: its copies carried the
/// deduplication IDs of the first import's, and SQS accepted them and dropped
/// them within its 5-minute window while the summary said "sent".
#[tokio::test]
async fn import_again_into_a_fifo_queue_is_not_dropped_as_a_duplicate() {
    let Exported { f, dir, cfg, file, .. } = exported_on(SqsFixture::create(true).await, 4).await;
    let journal = dir.join("journal.jsonl");
    for extra in [&[][..], &["--again"][..]] {
        let (code, out, err) = run(bin(&dir)
            .arg("-c")
            .arg(&cfg)
            .arg("import")
            .arg(&file)
            .args([
                "--to",
                "orders",
                "--address",
                &f.source_url,
                "--yes",
                "-o",
                "json",
                "--journal",
            ])
            .arg(&journal)
            .args(extra));
        assert_eq!(code, 0, "{out}{err}");
        let s: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(s["sent"].as_u64(), Some(4), "{extra:?}: {out}");
    }
    let arrived = f.drain_source().await;
    assert_eq!(
        arrived.len(),
        8,
        "the second import's copies were dropped as duplicates"
    );
}

/// An SQS FIFO DLQ delivers nothing more of a message group while any of it is
/// leased, and reading deletes nothing: past the first lease of each group
/// the rest cannot be read. export and report say how many were not read
/// instead of presenting a partial read as the whole DLQ.
#[tokio::test]
async fn reading_a_fifo_dlq_says_what_its_locked_groups_held_back() {
    let f = SqsFixture::create(true).await;
    let msgs: Vec<TestMessage> = numbered(25)
        .into_iter()
        .map(|m| TestMessage {
            ordering_key: Some("g-1".into()),
            ..m
        })
        .collect();
    f.fill_dlq_in_order(&msgs).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");
    let file = dir.join("fifo.jsonl");
    let (out, err) = export_to(&dir, &cfg, &file);
    let written = read_export(&file).unwrap().count();
    assert!(written < 25, "the emulator locks the group: {out}");
    assert!(
        err.contains(&format!("warning: {} more messages were not read", 25 - written)),
        "{out}{err}"
    );
    let (code, out, err) = run(bin(&dir).arg("-c").arg(&cfg).args(["report", "orders", "-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        r["read"].as_u64().unwrap() + r["held_back"].as_u64().unwrap(),
        25,
        "{out}"
    );
    assert!(err.contains("more messages were not read"), "{err}");
    assert_eq!(f.dlq_count().await, 25, "reading removes nothing");
}

/// Ctrl-C during `retention` (export-then-purge) stops it as it stops a
/// purge: the batch in flight is backed up and deleted, the rest is released
/// at once (not left hidden for `redrive.hold`), and the exit code says so.
#[tokio::test]
async fn an_interrupted_retention_releases_what_it_did_not_purge() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&numbered(30)).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let dir = scratch();
    let export_dir = dir.join("retention");
    let cfg = dir.join("slow.yaml");
    std::fs::write(
        &cfg,
        format!(
            "queues:\n  - name: orders\n    sqs:\n      queue: {}\n      endpoint_url: {}\n      region: us-east-1\n    retention:\n      max_age: 1s\n      action: export-then-purge\n      export_dir: {}\nredrive:\n  hold: 2m\n  rate: 3\n",
            f.dlq_url,
            f.endpoint,
            export_dir.display()
        ),
    )
    .unwrap();
    let child = bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .args(["retention", "orders", "--yes", "--no-journal", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // At 3/s a batch of 10 takes about 3.3 s, the next 3.3 s more: the
    // signal lands between them.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    assert_eq!(status.code(), Some(130), "{out}{err}");
    let o: serde_json::Value = serde_json::from_str(&out).unwrap();
    let purged = o[0]["expired"].as_u64().unwrap() as usize;
    assert!(purged > 0 && purged < 30, "{out}");
    let visible = f.dlq_visible().await;
    assert_eq!(visible, 30 - purged, "the rest is visible again at once: {out}{err}");
    let backups: Vec<PathBuf> = std::fs::read_dir(&export_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        read_export(&backups[0]).unwrap().count(),
        purged,
        "each purged message is backed up"
    );
}

/// Ctrl-C during an export (each lease slowed down by a proxy, so that the
/// signal lands mid-read): the leased messages are released at once instead
/// of staying hidden for `redrive.hold`, the file the export was to replace
/// is left as it was, no partial file is left behind, and the exit code says
/// the export was interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_export_releases_and_keeps_the_old_file() {
    use common::faultproxy::{Fault, FaultProxy};
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&numbered(60)).await;
    let upstream = f.endpoint.trim_start_matches("http://").trim_end_matches('/');
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream.parse().unwrap()).await;
    proxy.set(Fault::Delay(std::time::Duration::from_millis(300)));
    let dir = scratch();
    let slow = SqsFixture {
        endpoint: format!("http://{}", proxy.addr),
        client: f.client.clone(),
        source_url: f.source_url.clone(),
        dlq_url: f.dlq_url.clone(),
        fifo: false,
    };
    let cfg = config(&dir, &slow, "");
    let file = dir.join("earlier.jsonl");
    std::fs::write(&file, EARLIER_EXPORT).unwrap();
    let child = bin(&dir)
        .arg("-c")
        .arg(&cfg)
        .args(["export", "orders", "--to"])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    assert_eq!(status.code(), Some(130), "{out}{err}");
    assert_earlier_export_kept(&file, &dir, &err);
    let visible = f.dlq_visible().await;
    assert_eq!(visible, 60, "every message is visible again at once: {err}");
}

/// What the export tests put at `--to` before an export that must not finish.
const EARLIER_EXPORT: &str = "{\"an\": \"earlier export\"}\n";

/// An export that did not finish left `file` as it was and no partial file
/// in `dir`.
fn assert_earlier_export_kept(file: &std::path::Path, dir: &std::path::Path, err: &str) {
    assert_eq!(std::fs::read_to_string(file).unwrap(), EARLIER_EXPORT, "{err}");
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "no partial file is left behind: {left:?}");
}

/// `export --to /dev/stdout >> all.jsonl` (or `--to -`) adds to what the
/// file held: the lines go through the descriptor the shell opened. Opening
/// the name anew reached the file itself, and the export was renamed over
/// it, which took every earlier export with it. The summary goes to stderr,
/// out of the lines.
#[tokio::test]
async fn an_export_to_standard_output_appends_where_the_shell_said() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&numbered(3)).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");
    let file = dir.join("all.jsonl");
    std::fs::write(&file, EARLIER_EXPORT).unwrap();
    for to in ["/dev/stdout", "-"] {
        let out = bin(&dir)
            .arg("-c")
            .arg(&cfg)
            .args(["export", "orders", "--to", to])
            .stdout(std::fs::OpenOptions::new().append(true).open(&file).unwrap())
            .output()
            .expect("run dlq-bridge");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{to}: {err}");
        assert!(err.contains("exported 3 of 3 messages"), "{to}: {err}");
    }
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with(EARLIER_EXPORT), "{text}");
    let added: Vec<&str> = text[EARLIER_EXPORT.len()..].lines().collect();
    assert_eq!(added.len(), 6, "{text}");
    assert!(added.iter().all(|l| l.starts_with('{')), "{text}");
}

/// In front of moto, an SQS endpoint that answers `OverLimit` (SQS's limit
/// of 120,000 messages in flight, which moto does not keep) to every
/// ReceiveMessage after the first `receives`; everything else is forwarded.
async fn sqs_over_limit_after(upstream: &str, receives: usize) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let count = AtomicUsize::new(0);
    common::sqs::sqs_front(upstream, move |target, _| {
        (target.ends_with(".ReceiveMessage") && count.fetch_add(1, Ordering::SeqCst) >= receives).then_some((
            403,
            r#"{"__type":"com.amazonaws.sqs#OverLimit","message":"Too many messages in flight"}"#,
        ))
    })
    .await
}

/// A read that reaches the provider's limit on messages leased at once (on
/// SQS, 120,000 in flight: any DLQ larger than that) ends with what it read,
/// says how many were left unread, and releases what it leased. It failed as
/// a whole: `export` wrote nothing, and `report` and the retention alert's
/// check never finished on the largest DLQs.
#[tokio::test]
async fn a_read_that_reaches_the_providers_hold_limit_reports_what_it_read() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&numbered(25)).await;
    let dir = scratch();
    let moto = f.endpoint.clone();
    let front = SqsFixture {
        endpoint: sqs_over_limit_after(&moto, 2).await,
        ..f
    };
    let cfg = config(&dir, &front, "");
    let mut cmd = bin(&dir);
    cmd.arg("-c")
        .arg(&cfg)
        .args(["report", "orders", "--by", "reason", "-o", "json"]);
    let (code, out, err) = tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["read"], 20, "{out}");
    assert_eq!(report["hold_limited"], true, "{out}");
    assert_eq!(report["held_back"], 5, "{out}");
    assert!(
        err.contains(
            "the read stopped at 20 messages, where the queue reached the provider's limit on messages leased at once"
        ),
        "{err}"
    );
    // Released: every message can be received again at once.
    let f = SqsFixture {
        endpoint: moto,
        ..front
    };
    assert_eq!(f.dlq_visible().await, 25);
}

/// An import into a FIFO queue keeps each group's order when a copy fails:
/// the group's later lines are not sent (they would have arrived ahead of
/// it; `held_for_order`), in the failed copy's batch and in later ones,
/// while other groups go on. They were sent, out of order.
#[tokio::test]
async fn an_import_holds_a_groups_later_lines_after_one_fails() {
    use dlq_bridge::engine::triage::ImportStop;

    let f = SqsFixture::create(true).await;
    let dir = scratch();
    let file = dir.join("groups.jsonl");
    // g1: 0 sent, 1 refused (an empty body), 2..=14 held; g2 every 3rd line.
    let lines: Vec<String> = (0..20)
        .map(|i| {
            let group = if i % 3 == 2 { "g2" } else { "g1" };
            let body = if i == 1 { String::new() } else { format!("{group} {i}") };
            servicebus_line(&format!("m{i}"), &body, group)
        })
        .collect();
    let s = import_into_source(&f, &file, &lines).await;
    let g2: Vec<usize> = (0..20).filter(|i| i % 3 == 2).collect();
    let g1_after_failure = (0..20).filter(|i| i % 3 != 2 && *i > 1).count() as u64;
    assert_eq!(s.sent, 1 + g2.len() as u64, "{s:?}");
    assert_eq!(s.failed, 1 + g1_after_failure, "{s:?}");
    assert!(s.held_for_order > 0, "{s:?}");
    assert_eq!(s.stopped, ImportStop::EndOfFile);
    let arrived: Vec<String> = f
        .drain_source()
        .await
        .into_iter()
        .map(|m| String::from_utf8(m.body).unwrap())
        .collect();
    let mut expected = vec!["g1 0".to_string()];
    expected.extend(g2.iter().map(|i| format!("g2 {i}")));
    let mut sorted = arrived.clone();
    sorted.sort_by_key(|b| (b[..2].to_string(), b[3..].parse::<usize>().unwrap()));
    assert_eq!(sorted, expected, "only g1's first copy and all of g2: {arrived:?}");
    let summary = serde_json::to_value(&s).unwrap();
    assert_eq!(
        (summary["action"].as_str(), summary["stopped"].as_str()),
        (Some("import"), Some("end_of_file"))
    );
}

/// A file cut short while it is imported (slowly, at `--rate`) stops the
/// import where the write is seen: what went before stays sent, nothing read
/// after the write goes, and `resume_line` is the first line not sent.
#[tokio::test]
async fn an_import_whose_file_is_cut_while_it_is_sent_stops_there() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&numbered(30)).await;
    let dir = scratch();
    let cfg = config(&dir, &f, "");
    let file = dir.join("all.jsonl");
    export_to(&dir, &cfg, &file);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 30);
    let mut cmd = bin(&dir);
    cmd.arg("-c").arg(&cfg).arg("import").arg(&file).args([
        "--to",
        "orders",
        "--rate",
        "10",
        "--yes",
        "--no-journal",
        "-o",
        "json",
    ]);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ten a second: a batch of ten a second. Cut once the first has arrived.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while f.count(&f.source_url).await < 10 {
        assert!(std::time::Instant::now() < deadline, "the first batch never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let first: String = text.lines().take(5).map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, first).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(s["stopped"], "failed", "{s}");
    assert!(
        s["errors"][0]
            .as_str()
            .unwrap()
            .contains("written to while it was imported"),
        "{s}"
    );
    assert_eq!(s["errors"].as_array().unwrap().len(), 1, "{s}");
    // The batch after the first may have been checked before the cut (its
    // lines were read before it, so it goes); none after it.
    let sent = s["sent"].as_u64().unwrap();
    assert!(sent == 10 || sent == 20, "{s}");
    assert_eq!(s["resume_line"].as_u64(), Some(sent + 1), "{s}");
    assert_eq!(f.drain_source().await.len() as u64, sent, "{s}");
}
