//! The bad-input corpus (issue 9), driving the real `dlq-bridge` binary.
//!
//! Every case asserts the exit code, that the error names what is wrong (the
//! file, line and field of a config; the position in a filter; the queue,
//! backend or endpoint at run time), and that no queue was touched: each
//! table runs against a seeded DLQ whose message IDs, bodies (and on SQS,
//! receive counts) are compared before and after. Valid-but-odd inputs
//! (empty, binary and maximum-size bodies, odd attribute names and types)
//! must instead round-trip byte for byte through a real redrive.
//!
//! The README's exit codes: 0 ok, 1 runtime failure, 2 usage or config error
//! (nothing was touched), 3 `list --fail-if-nonempty` found messages.
#![cfg(all(feature = "sqs", feature = "pubsub"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pubsub::PubSubFixture;
use common::sqs::SqsFixture;
use common::{Fixture, TestMessage, attrs};

// ---------------------------------------------------------------- harness

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join("dlq-bridge-bad-input");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"));
    c.env_remove("DLQ_BRIDGE_CONFIG")
        .env_remove("DLQ_BRIDGE_LOG")
        .env_remove("PUBSUB_EMULATOR_HOST")
        .env_remove("AWS_ENDPOINT_URL_SQS")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("XDG_STATE_HOME", scratch())
        .stdin(Stdio::null());
    c
}

fn write_file(text: impl AsRef<[u8]>, ext: &str) -> PathBuf {
    let path = scratch().join(format!("{}.{ext}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    path
}

/// (exit code, stdout, stderr).
fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = cmd.output().expect("run dlq-bridge");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// One row of a table: a config (or none), the arguments after `-c FILE`,
/// extra environment, the exit code and what the output must say. `{file}`
/// in `says` stands for the config file's path.
struct Case {
    name: &'static str,
    config: Option<Vec<u8>>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    code: i32,
    says: Vec<String>,
}

fn case(name: &'static str, config: impl Into<Option<String>>, args: &[&str], code: i32, says: &[&str]) -> Case {
    Case {
        name,
        config: config.into().map(String::into_bytes),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        code,
        says: says.iter().map(|s| s.to_string()).collect(),
    }
}

/// A redrive refused before it starts because of its config: exit code 2.
fn config_error(name: &'static str, config: String, says: &[&str]) -> Case {
    case(name, config, REDRIVE, 2, says)
}

impl Case {
    fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// Run every case; report all mismatches at once, with the output.
fn run_table(cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let mut cmd = bin();
        let file = match &c.config {
            Some(text) => {
                let p = write_file(text, "yaml");
                cmd.arg("-c").arg(&p);
                p.display().to_string()
            }
            None => String::new(),
        };
        cmd.args(&c.args);
        for (k, v) in &c.env {
            cmd.env(k, v);
        }
        let (code, out, err, _) = run_bounded(&mut cmd, Duration::from_secs(180));
        let text = format!("{out}{err}");
        let mut wrong = Vec::new();
        if code != c.code {
            wrong.push(format!("exit {code}, expected {}", c.code));
        }
        for s in &c.says {
            let s = s.replace("{file}", &file);
            if !text.contains(&s) {
                wrong.push(format!("does not say {s:?}"));
            }
        }
        // No part of a message said twice (`queue q: queue q:`, an I/O error
        // repeated by its source chain).
        for line in text.lines() {
            let parts: Vec<&str> = line.split(": ").collect();
            if let Some(w) = parts.windows(2).find(|w| w[0] == w[1] && !w[0].trim().is_empty()) {
                wrong.push(format!("says {:?} twice", w[0]));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("[{}] {}\n--- output:\n{text}---", c.name, wrong.join("; ")));
        } else {
            eprintln!("[{}] exit {code}: {}", c.name, err.lines().next().unwrap_or(out.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ------------------------------------------------------ "nothing touched"

/// Nothing received, sent or deleted a DLQ message since `before` (the one
/// snapshot read in between adds exactly one receive to each).
async fn assert_sqs_untouched(f: &SqsFixture, before: &[(String, String, u32)]) {
    let after = f.dlq_snapshot().await;
    let expected: Vec<_> = before.iter().map(|(id, b, c)| (id.clone(), b.clone(), c + 1)).collect();
    assert_eq!(after, expected, "the DLQ was touched");
    assert!(f.drain_source().await.is_empty(), "something was sent to the source");
}

/// (message ID, body) of everything on the Pub/Sub DLQ subscription.
async fn pubsub_snapshot(f: &PubSubFixture) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = f
        .browse_dlq()
        .await
        .into_iter()
        .map(|m| (m.message_id, m.data.to_vec()))
        .collect();
    out.sort();
    out
}

async fn assert_pubsub_untouched(f: &PubSubFixture, before: &[(String, Vec<u8>)]) {
    assert_eq!(pubsub_snapshot(f).await, before, "the DLQ was touched");
    assert!(f.drain_source().await.is_empty(), "something was sent to the source");
}

fn orders(n: usize) -> Vec<TestMessage> {
    (0..n)
        .map(|i| TestMessage {
            body: format!(r#"{{"order":{i}}}"#).into_bytes(),
            attributes: attrs(&[("tenant", ["acme", "globex"][i % 2]), ("error", "Timeout")]),
            ordering_key: None,
        })
        .collect()
}

// ------------------------------------------------------------ the configs

/// The fixture's valid config, line by line, so a case can break one line.
/// Line 6 is `region`.
fn sqs_lines(f: &SqsFixture) -> Vec<String> {
    vec![
        "queues:".into(),
        "  - name: orders".into(),
        "    sqs:".into(),
        format!("      queue: {}", f.dlq_url),
        format!("      endpoint_url: {}", f.endpoint),
        "      region: us-east-1".into(),
    ]
}

fn join(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// The valid config with line `n` (1-based) replaced.
fn with_line(f: &SqsFixture, n: usize, line: &str) -> String {
    let mut lines = sqs_lines(f);
    lines[n - 1] = line.to_string();
    join(&lines)
}

/// The valid config with `extra` appended.
fn with_tail(f: &SqsFixture, extra: &str) -> String {
    format!("{}{extra}", join(&sqs_lines(f)))
}

const REDRIVE: &[&str] = &["redrive", "orders", "--yes"];

#[tokio::test]
async fn config_errors_name_file_line_and_field_exit_2_and_touch_nothing() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&orders(3)).await;
    let before = f.dlq_snapshot().await;
    let ok = join(&sqs_lines(&f));

    let cases = vec![
        // Malformed YAML.
        config_error("bad indent", with_line(&f, 6, "     region: us-east-1"), &["{file}:6:"]),
        config_error(
            "unclosed flow mapping",
            with_line(&f, 3, &format!("    sqs: {{queue: {}, region: us-east-1", f.dlq_url)),
            &["{file}:"],
        ),
        config_error(
            "tab indent",
            with_line(&f, 6, "\tregion: us-east-1"),
            &["{file}:6:", "tab"],
        ),
        config_error(
            "not a map",
            "- just\n- a list\n".to_string(),
            &["{file}:1:", "(top level)"],
        ),
        config_error(
            "empty file",
            String::new(),
            &["{file}: queues: no queue is configured; add one"],
        ),
        config_error(
            "no queues",
            "queues: []\n".to_string(),
            &["{file}: queues: no queue is configured; add one"],
        ),
        // Unknown fields: the typo is named, and the right field suggested.
        config_error(
            "typo in a queue",
            with_line(&f, 6, "      regoin: us-east-1"),
            &[
                "{file}:6:",
                "queues[0].sqs",
                "unknown field `regoin`",
                "did you mean `region`?",
            ],
        ),
        config_error(
            "typo at the top",
            ok.replacen("queues:", "queus:", 1),
            &["{file}:1:", "unknown field `queus`", "did you mean `queues`?"],
        ),
        config_error(
            "typo in redrive",
            with_tail(&f, "redrive:\n  concurency: 4\n"),
            &[
                "{file}:8:",
                "redrive",
                "unknown field `concurency`",
                "did you mean `concurrency`?",
            ],
        ),
        config_error(
            "unknown backend",
            with_line(&f, 3, "    kafka:"),
            &["{file}:3:", "queues[0]", "unknown field `kafka`"],
        ),
        // Durations, rates, sizes.
        config_error(
            "bad duration",
            with_tail(&f, "redrive:\n  hold: 5 parsecs\n"),
            &[
                "{file}:8:",
                "redrive.hold",
                "invalid duration `5 parsecs`",
                "expected e.g. `30s`",
            ],
        ),
        config_error(
            "negative duration",
            with_tail(&f, "redrive:\n  deadline: -1h\n"),
            &["{file}:8:", "redrive.deadline", "invalid duration `-1h`"],
        ),
        config_error(
            "number as duration",
            with_tail(&f, "    poll_interval: 30\n"),
            &["{file}:7:", "queues[0].poll_interval", "invalid duration `30`"],
        ),
        config_error(
            "zero retention",
            with_tail(&f, "    retention: {max_age: 0s}\n"),
            &["{file}:7:17: queues[0].retention.max_age (queue `orders`): must be longer than 0s"],
        ),
        config_error(
            "negative rate",
            with_tail(&f, "redrive:\n  rate: -5\n"),
            &["{file}:8:", "redrive.rate", "-5"],
        ),
        config_error(
            "rate as text",
            with_tail(&f, "redrive:\n  rate: fast\n"),
            &["{file}:8:", "redrive.rate", "\"fast\""],
        ),
        config_error(
            "size with a unit",
            with_tail(&f, "redrive:\n  journal_max_bytes: 64MiB\n"),
            &["{file}:8:", "redrive.journal_max_bytes", "\"64MiB\""],
        ),
        config_error(
            "zero concurrency",
            with_tail(&f, "redrive:\n  concurrency: 0\n"),
            &["{file}:8:3: redrive.concurrency: must be from 1 to 256"],
        ),
        config_error(
            "zero rate",
            with_tail(&f, "redrive:\n  rate: 0\n"),
            &["{file}:8:3: redrive.rate: must be at least 1 (whole messages per second)"],
        ),
        config_error(
            "zero hold",
            with_tail(&f, "redrive:\n  hold: 0s\n"),
            &["{file}:8:3: redrive.hold: must be at least 1s"],
        ),
        config_error(
            "zero schedule rate",
            with_tail(&f, "schedules:\n  - queue: orders\n    every: 1h\n    rate: 0\n"),
            &["{file}:10:5: schedules[0].rate: must be at least 1"],
        ),
        // Structure.
        config_error(
            "two backends",
            with_tail(&f, "    pubsub: {project: p, subscription: s}\n"),
            &[
                "{file}:2:",
                "queues[0]",
                "exactly one of `sqs`, `pubsub` or `servicebus` (found 2)",
            ],
        ),
        config_error(
            "duplicate names",
            with_tail(&f, "  - name: orders\n    sqs: {queue: other}\n"),
            &["{file}:7:5: queues[1].name: duplicate queue name `orders`"],
        ),
        config_error(
            "queue name with a space",
            with_line(&f, 2, "  - name: 'my orders'"),
            &["{file}:2:5: queues[0].name: queue name `my orders` contains a space"],
        ),
        config_error(
            "queue name with a slash",
            with_line(&f, 2, "  - name: eu/orders"),
            &["{file}:2:5: queues[0].name", "contains `/`"],
        ),
        config_error(
            "empty sqs queue",
            with_line(&f, 4, "      queue: ''"),
            &["{file}:4:7: queues[0].sqs.queue (queue `orders`): must not be empty"],
        ),
        config_error(
            "servicebus without credentials",
            with_tail(&f, "  - name: sb\n    servicebus: {queue: q}\n"),
            &["{file}:7:", "queues[1]", "queue `sb`", "`connection_string_env`"],
        ),
        config_error(
            "invalid schedule filter",
            with_tail(&f, "schedules:\n  - {queue: orders, every: 1h, filter: 'reason =='}\n"),
            &["{file}", "schedules[0].filter", "invalid filter at 1:"],
        ),
        config_error(
            "schedule filter with an unknown variable",
            with_tail(
                &f,
                "schedules:\n  - queue: orders\n    every: 1h\n    filter: |\n      reason == \"Timeout\" &&\n        tennant == \"acme\"\n",
            ),
            &[
                "{file}",
                "schedules[0].filter",
                "invalid filter at 2:3: unknown variable `tennant`",
            ],
        ),
        config_error(
            "schedule on an unknown queue",
            with_tail(&f, "schedules:\n  - {queue: ordrs, every: 1h}\n"),
            &["{file}", "schedules[0].queue", "no queue named `ordrs`"],
        ),
        // Environment overrides.
        config_error(
            "override typo",
            ok.clone(),
            &["DLQ_BRIDGE__REDRIVE__CONCURENCY", "unknown field `concurency`"],
        )
        .env("DLQ_BRIDGE__REDRIVE__CONCURENCY", "8"),
        config_error(
            "override bad duration",
            ok.clone(),
            &["DLQ_BRIDGE__REDRIVE__HOLD", "invalid duration `forever`"],
        )
        .env("DLQ_BRIDGE__REDRIVE__HOLD", "forever"),
    ];
    run_table(&cases);

    // A config without queues: every command that reads queues refuses it;
    // `check` passes it with a warning (the chart's default values have none).
    let cases = vec![
        case(
            "list without queues",
            "queues: []\n".to_string(),
            &["list", "--fail-if-nonempty"],
            2,
            &["{file}: queues: no queue is configured"],
        ),
        case(
            "check without queues",
            String::new(),
            &["check"],
            0,
            &["ok (0 queues)", "warning: {file}: no queue is configured"],
        ),
    ];
    run_table(&cases);

    // What only `serve` uses is checked when any command loads the config,
    // so `check` reports it as `serve` would.
    let mut cases = Vec::new();
    for command in ["check", "serve"] {
        cases.push(case(
            "listen is not an address",
            with_tail(&f, "serve:\n  listen: notanaddr\n"),
            &[command],
            2,
            &["{file}:8:3: serve.listen: `notanaddr` is not an IP address and port"],
        ));
        cases.push(case(
            "listen beyond loopback without a token",
            with_tail(&f, "serve:\n  poll_interval: 5s\n  listen: 0.0.0.0:9999\n"),
            &[command],
            2,
            &[
                "{file}:9:3: serve.listen: 0.0.0.0:9999 is not a loopback address",
                "set serve.token_env",
            ],
        ));
    }
    run_table(&cases);

    // The file itself: missing, a directory, not text.
    let missing = scratch().join("no-such-config.yaml");
    let binary = write_file([0xff, 0xfe, 0x00, 0x9f, b'\n'], "yaml");
    let cases = vec![
        case(
            "no such file",
            None,
            &["-c", &missing.display().to_string(), "redrive", "orders", "--yes"],
            2,
            &[&missing.display().to_string(), "cannot read the config file"],
        ),
        case(
            "binary file",
            None,
            &["-c", &binary.display().to_string(), "redrive", "orders", "--yes"],
            2,
            &[&binary.display().to_string(), "UTF-8"],
        ),
    ];
    run_table(&cases);
    assert_sqs_untouched(&f, &before).await;
}

#[tokio::test]
async fn filter_and_argument_errors_exit_2_and_touch_nothing() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&orders(3)).await;
    let before = f.dlq_snapshot().await;
    let cfg = join(&sqs_lines(&f));
    let export_to = scratch().join("never-written.jsonl").display().to_string();
    let empty_export = scratch().join("empty.jsonl");
    std::fs::write(&empty_export, "").unwrap();
    let empty_export = empty_export.display().to_string();
    let c = |name, args: &[&str], says: &[&str]| case(name, cfg.clone(), args, 2, says);

    let missing_file = scratch().join("no-such-export.jsonl").display().to_string();
    let cases = vec![
        // Before a subcommand, redrive flags are the flag form's: most often
        // they were meant for the subcommand, which the error says.
        c(
            "redrive flag before another subcommand",
            &["-o", "json", "list"],
            &["--output before the subcommand belongs to the `--redrive QUEUE` form: give it after `list`"],
        ),
        // Unless the subcommand does not take it: moving it there failed again.
        c(
            "redrive flag another subcommand does not take",
            &["--dry-run", "list"],
            &["--dry-run before the subcommand belongs to the `--redrive QUEUE` form, and `list` takes no --dry-run"],
        ),
        // A file named on the command line that is not there: the user's to fix.
        c(
            "import of a missing file",
            &["import", &missing_file, "--to", "orders", "--dry-run"],
            &["no-such-export.jsonl: No such file or directory (os error 2)"],
        ),
        // An empty destination is a slip, not a queue to look up.
        c(
            "empty --to",
            &["redrive", "orders", "--to", "", "--dry-run"],
            &["the destination is empty"],
        ),
        c(
            "empty --address",
            &["import", &empty_export, "--to", "orders", "--address", " ", "--dry-run"],
            &["the destination is empty"],
        ),
        // Filters are compiled before anything connects; errors give the position.
        c(
            "filter syntax",
            &[
                "redrive",
                "orders",
                "--filter",
                r#"attributes.tenant == "acme" &&"#,
                "--yes",
            ],
            &["invalid filter at 1:", r#"attributes.tenant == "acme" &&"#, "^"],
        ),
        c(
            "filter syntax, second line",
            &[
                "redrive",
                "orders",
                "--filter",
                "reason == \"Timeout\" &&\n  age > duration(\"1h\"",
                "--yes",
            ],
            &["invalid filter at 2:", "age > duration(\"1h\""],
        ),
        c(
            "unbalanced quote",
            &["inspect", "orders", "--filter", r#"reason == "Timeout"#],
            &["invalid filter at 1:"],
        ),
        c(
            "unknown variable",
            &["inspect", "orders", "--filter", r#"tenant == "acme""#],
            &[
                "unknown variable `tenant`",
                "the variables are: id, body, json, attributes",
            ],
        ),
        c(
            "unknown function",
            &["redrive", "orders", "--filter", r#"reason.startswith("Time")"#, "--yes"],
            &["invalid filter at 1:8: unknown function `startswith`", "^"],
        ),
        c(
            "a duration in days",
            &["redrive", "orders", "--filter", r#"age > duration("7d")"#, "--yes"],
            &[r#"invalid filter at 1:7: duration(): "7d" is not a duration"#, "168h"],
        ),
        c(
            "a timestamp compared with a string",
            &[
                "inspect",
                "orders",
                "--filter",
                r#"enqueued_at < "2026-01-01T00:00:00Z""#,
            ],
            &[
                "invalid filter at 1:15: `enqueued_at` is a timestamp (or null)",
                r#"write timestamp("2026-01-01T00:00:00Z")"#,
            ],
        ),
        c(
            "unknown variable, flag form",
            &["--redrive", "orders", "--filter", "reasn == \"x\"", "--yes"],
            &["invalid filter at 1:1: unknown variable `reasn`"],
        ),
        // An empty filter is refused alike everywhere (a shell-quoting slip,
        // most likely), with what to pass instead.
        c(
            "empty filter",
            &["redrive", "orders", "--filter", "", "--yes"],
            &["the filter is empty: leave --filter out to select every message"],
        ),
        c(
            "empty filter, flag form",
            &["--redrive", "orders", "--filter", " ", "--yes"],
            &["the filter is empty"],
        ),
        c(
            "empty filter, inspect",
            &["inspect", "orders", "--filter", ""],
            &["the filter is empty"],
        ),
        c(
            "empty filter, report",
            &["report", "orders", "--filter", ""],
            &["the filter is empty"],
        ),
        c(
            "empty filter, export",
            &["export", "orders", "--to", &export_to, "--filter", ""],
            &["the filter is empty"],
        ),
        c(
            "empty filter, purge",
            &["purge", "orders", "--filter", "", "--yes"],
            &["the filter is empty: pass --filter true to purge every message"],
        ),
        c(
            "purge filter",
            &["purge", "orders", "--filter", "reason ==", "--yes"],
            &["invalid filter at 1:"],
        ),
        c(
            "report filter",
            &["report", "orders", "--filter", "(reason"],
            &["invalid filter at 1:"],
        ),
        c(
            "export filter",
            &["export", "orders", "--to", &export_to, "--filter", "nope"],
            &["unknown variable `nope`"],
        ),
        // Arguments.
        c(
            "rate not a number",
            &["redrive", "orders", "--rate", "fast", "--yes"],
            &["--rate", "fast"],
        ),
        c(
            "negative rate",
            &["redrive", "orders", "--rate=-3", "--yes"],
            &["--rate", "-3"],
        ),
        c(
            "zero rate",
            &["redrive", "orders", "--rate", "0", "--yes"],
            &["'0' for '--rate <N>'", "at least 1 message per second"],
        ),
        c(
            "fractional rate",
            &["redrive", "orders", "--rate", "0.5", "--yes"],
            &["'0.5' for '--rate <N>'", "rate is whole messages per second"],
        ),
        c(
            "zero rate, flag form",
            &["--redrive", "orders", "--rate", "0", "--yes"],
            &["--rate", "at least 1"],
        ),
        c(
            "zero purge rate",
            &["purge", "orders", "--filter", "true", "--rate", "0", "--yes"],
            &["--rate", "at least 1"],
        ),
        c(
            "zero import rate",
            &["import", "x.jsonl", "--to", "orders", "--rate", "0", "--yes"],
            &["--rate", "at least 1"],
        ),
        c(
            "inspect --limit 0",
            &["inspect", "orders", "--limit", "0"],
            &["'0' for '--limit <N>'", "must be at least 1"],
        ),
        c(
            "inspect --scan 0",
            &["inspect", "orders", "--filter", "true", "--scan", "0"],
            &["'0' for '--scan <N>'", "must be at least 1"],
        ),
        c(
            "report --top 0",
            &["report", "orders", "--top", "0"],
            &["'0' for '--top <N>'", "must be at least 1"],
        ),
        c(
            "redrive --max 0",
            &["redrive", "orders", "--max", "0", "--yes"],
            &["'0' for '--max <N>'", "must be at least 1"],
        ),
        c(
            "max not a number",
            &["redrive", "orders", "--max", "many", "--yes"],
            &["--max", "many"],
        ),
        c(
            "zero concurrency",
            &["redrive", "orders", "--concurrency", "0", "--yes"],
            &["invalid value '0' for '--concurrency <N>': expected a whole number from 1 to 256"],
        ),
        c(
            "huge concurrency",
            &["redrive", "orders", "--concurrency", "18446744073709551615", "--yes"],
            &["'--concurrency <N>': expected a whole number from 1 to 256"],
        ),
        c(
            "bad --older-than",
            &[
                "purge",
                "orders",
                "--filter",
                "true",
                "--older-than",
                "5 parsecs",
                "--yes",
            ],
            &["--older-than", "invalid duration `5 parsecs`"],
        ),
        c(
            "unknown output format",
            &["list", "-o", "yaml"],
            &["'yaml'", "table", "json"],
        ),
        c(
            "unknown queue",
            &["redrive", "ordrs", "--yes"],
            &["unknown queue `ordrs` (configured: orders)"],
        ),
        c("no --yes off a terminal", &["redrive", "orders"], &["--yes"]),
        c("purge needs a filter", &["purge", "orders", "--yes"], &["--filter"]),
        c(
            "both forms",
            &["redrive", "orders", "--redrive", "orders", "--yes"],
            &["--redrive"],
        ),
        c("no command", &[], &["no command given"]),
    ];
    run_table(&cases);
    assert!(!Path::new(&export_to).exists(), "no export file was written");
    assert_sqs_untouched(&f, &before).await;
}

/// `runs --journal PATH` reads that journal with no config at all; a path
/// that is not a journal file is a usage error naming it.
#[test]
fn runs_needs_no_config_for_a_named_journal_and_refuses_a_missing_one() {
    let missing = scratch().join("no-such-journal.jsonl").display().to_string();
    let dir = scratch().display().to_string();
    let journal = write_file(
        concat!(
            r#"{"event":"run_started","run":"r-1","at":"2026-01-01T00:00:00Z","queue":"orders","trigger":"cli","filter":"true","dry_run":false,"destination":null}"#,
            "\n",
            r#"{"event":"run_finished","run":"r-1","at":"2026-01-01T00:00:01Z","summary":{"run_id":"r-1","queue":"orders","trigger":"cli","action":"redrive","filter":"true","dry_run":false,"matched":2,"sent":2,"settled":2,"send_failed":0,"settle_failed":0,"stopped":"drained"}}"#,
            "\n"
        ),
        "jsonl",
    )
    .display()
    .to_string();
    // Rotated files past the default five (a config's journal_keep of 10):
    // read without the config, the oldest run is still listed.
    for n in 1..=6 {
        let run = format!(
            r#"{{"event":"run_started","run":"r-old-{n}","at":"2025-01-01T00:00:00Z","queue":"orders","trigger":"cli","filter":"true","dry_run":false,"destination":null}}"#
        );
        std::fs::write(format!("{journal}.{n}"), format!("{run}\n")).expect("rotated journal");
    }
    let cases = vec![
        case(
            "missing journal",
            None,
            &["runs", "--journal", &missing],
            2,
            &[&missing, "no such file"],
        ),
        case(
            "journal is a directory",
            None,
            &["runs", "--journal", &dir],
            2,
            &[&dir, "is a directory"],
        ),
        case(
            "no journal and no config",
            None,
            &["runs"],
            2,
            &["pass --journal PATH, or --config FILE"],
        ),
        case(
            "a journal without a config",
            None,
            &["runs", "--journal", &journal],
            0,
            &["r-1", "orders", "redrive", "drained"],
        ),
        case(
            "a journal beside a config that does not load",
            "queues: [\n".to_string(),
            &["runs", "--journal", &journal],
            0,
            &[
                "warning: {file}",
                "reading the journal without the config",
                "r-1",
                "drained",
                "r-old-6",
            ],
        ),
    ];
    run_table(&cases);
}

/// `check --offline` checks the config and serve's environment and connects
/// to nothing: a lint step without credentials or a reachable cloud.
#[test]
fn check_offline_connects_to_nothing() {
    let port = common::emulator::free_port();
    let down = format!("queues:\n  - name: q\n    sqs: {{queue: q, endpoint_url: 'http://127.0.0.1:{port}'}}\n");
    let cases = vec![
        case(
            "offline, a backend down",
            down.clone(),
            &["check", "--offline"],
            0,
            &["ok (1 queue)", "queues: not contacted (--offline)"],
        ),
        case(
            "online, the same backend down",
            down.clone(),
            &["check"],
            1,
            &[
                "queue q (sqs): FAILED",
                &format!("cannot reach http://127.0.0.1:{port}"),
            ],
        ),
        case(
            "offline, serve's token variable unset",
            format!("{down}serve:\n  token_env: DLQ_BRIDGE_TEST_NO_SUCH_TOKEN\n"),
            &["check", "--offline"],
            2,
            &["serve.token_env", "serve settings: FAILED"],
        ),
        case(
            "offline, a malformed config",
            format!("{down}  - name: [\n"),
            &["check", "--offline"],
            2,
            &["{file}:"],
        ),
    ];
    run_table(&cases);
}

/// An import or a retention refused for its input says why before it asks
/// for confirmation, and creates no journal: without a terminal the only
/// error was "pass --yes", and the journal's directory was made first.
#[test]
fn refused_before_asking_or_opening_the_journal() {
    let port = common::emulator::free_port();
    let config = format!("queues:\n  - name: q\n    sqs: {{queue: q, endpoint_url: 'http://127.0.0.1:{port}'}}\n");
    let state = scratch().join(format!("state-{port}"));
    let state_env = state.display().to_string();
    let missing = scratch().join("no-such-export.jsonl").display().to_string();
    let export = write_file("", "jsonl").display().to_string();
    let malformed = write_file("{\"id\": 1}\n", "jsonl").display().to_string();
    let dir = scratch().display().to_string();
    let cases = vec![
        case(
            "import of a malformed file",
            config.clone(),
            &["import", &malformed, "--to", "q"],
            2,
            &[&format!("{malformed}:1: not an export line")],
        ),
        case(
            "import of a directory",
            config.clone(),
            &["import", &dir, "--to", "q"],
            2,
            &[&dir, "directory"],
        ),
        case(
            "import of a missing file",
            config.clone(),
            &["import", &missing, "--to", "q"],
            2,
            &[&missing],
        ),
        case(
            "import to an unknown queue",
            config.clone(),
            &["import", &export, "--to", "nosuch"],
            2,
            &["unknown queue `nosuch`"],
        ),
        case(
            "import to an address",
            config.clone(),
            &["import", &export, "--to", "https://sqs.us-east-1.amazonaws.com/1/q"],
            2,
            &["give an address with --address"],
        ),
        case(
            "import with a bad filter",
            config.clone(),
            &["import", &export, "--to", "q", "--filter", "attributes.x =="],
            2,
            &["filter"],
        ),
        case(
            "retention without a policy",
            config.clone(),
            &["retention"],
            2,
            &["no queue has a retention policy"],
        ),
    ]
    .into_iter()
    .map(|c| c.env("XDG_STATE_HOME", &state_env))
    .collect::<Vec<_>>();
    run_table(&cases);
    assert!(!state.exists(), "nothing was created under {}", state.display());
}

/// A filter that compiles but fails on some messages: each such message is
/// "no match" and stays, the run goes on, and the summary counts and shows why.
#[tokio::test]
async fn evaluation_errors_are_per_message_and_reported() {
    let f = SqsFixture::create(false).await;
    let mut msgs = orders(3);
    msgs[0]
        .attributes
        .insert("retry".into(), dlq_bridge::model::Attribute::string("yes"));
    f.dead_letter(&msgs).await;
    let cfg = write_file(join(&sqs_lines(&f)), "yaml");

    // Two messages lack the attribute: errors there, a match on the third.
    let (code, out, err) = run(bin().arg("-c").arg(&cfg).args([
        "redrive",
        "orders",
        "--filter",
        r#"attributes.retry == "yes""#,
        "--yes",
        "--no-journal",
        "-o",
        "json",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s["examined"].as_u64(), s["matched"].as_u64(), s["settled"].as_u64()),
        (Some(3), Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(s["filter_errors"], 2, "{s}");
    let errors = s["errors"].to_string();
    assert!(
        errors.contains("filter on message") && errors.contains("retry"),
        "{errors}"
    );
    let arrived = f.drain_source().await;
    assert_eq!(arrived.len(), 1);
    assert_eq!(arrived[0].body, msgs[0].body);

    // A type error on every message, and a filter that is not a bool: nothing
    // moves, the table says how many failed and why, and the run fails (exit
    // 1): a filter that fails on every message is a mistake, not "no match".
    for (filter, why) in [
        (r#"delivery_count + "x" > 0"#, "Unsupported binary operator 'add'"),
        // A JSON body's field may be a bool; here it is a number (`body`
        // itself, never a bool, is refused before anything is leased).
        ("json.order", "filter must yield a bool"),
    ] {
        let before = f.dlq_snapshot().await;
        let (code, out, err) =
            run(bin()
                .arg("-c")
                .arg(&cfg)
                .args(["redrive", "orders", "--filter", filter, "--yes", "--no-journal"]));
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            out.contains("matched:   0") && out.contains("filter errors: 2"),
            "{out}"
        );
        assert!(out.contains(why), "{filter}: {out}");
        // The run leased and released each message once; nothing moved.
        let after = f.dlq_snapshot().await;
        let expected: Vec<_> = before.iter().map(|(id, b, c)| (id.clone(), b.clone(), c + 2)).collect();
        assert_eq!(after, expected);
        assert!(f.drain_source().await.is_empty());
    }
    // A valid filter that matches nothing is no error at all.
    let (code, out, err) =
        run(bin()
            .arg("-c")
            .arg(&cfg)
            .args(["redrive", "orders", "--filter", "false", "--yes", "--no-journal"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("matched:   0") && !out.contains("filter errors"), "{out}");
    assert_eq!(f.dlq_count().await, 2);
    let (code, out, err) =
        run(bin()
            .arg("-c")
            .arg(&cfg)
            .args(["inspect", "orders", "--filter", r#"delivery_count + "x" > 0"#]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("the filter failed on 2 messages (counted as no match)"),
        "{err}"
    );
}

/// Run `cmd`, killing it if it has not ended after `limit`: a hang is a bug,
/// reported as such instead of stalling the suite. Returns the output and
/// how long it took (printed, never asserted).
fn run_bounded(cmd: &mut Command, limit: Duration) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dlq-bridge");
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!(
                "dlq-bridge hung (killed after {limit:?}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// The commands a runtime error must stop the same way.
const COMMANDS: &[&[&str]] = &[
    &["redrive", "q", "--yes", "--no-journal"],
    &["redrive", "q", "--dry-run", "--no-journal"],
    &["inspect", "q"],
    &["list"],
    &["check"],
];

/// Each command against `config`: exit 1, saying every one of `says`, within
/// a bound that only catches hangs.
fn runtime_error_everywhere(what: &str, config: &str, says: &[&str]) {
    runtime_error_everywhere_with(what, config, &|_| {}, says)
}

fn runtime_error_everywhere_with(what: &str, config: &str, env: &dyn Fn(&mut Command), says: &[&str]) {
    let path = write_file(config, "yaml");
    let mut failures = Vec::new();
    for args in COMMANDS {
        let mut cmd = bin();
        env(&mut cmd);
        let (code, out, err, took) = run_bounded(cmd.arg("-c").arg(&path).args(*args), Duration::from_secs(180));
        let text = format!("{out}{err}");
        let missing: Vec<_> = says.iter().filter(|s| !text.contains(**s)).collect();
        if code != 1 || !missing.is_empty() {
            failures.push(format!(
                "[{what}: {}] exit {code}, missing {missing:?}\n{text}",
                args.join(" ")
            ));
        } else {
            eprintln!(
                "[{what}: {}] exit 1 after {took:.1?}: {}",
                args.join(" "),
                text.lines().find(|l| l.contains(says[0])).unwrap_or("")
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn missing_queues_are_runtime_errors_that_name_them() {
    let s = SqsFixture::create(false).await;
    s.dead_letter(&orders(2)).await;
    let p = PubSubFixture::create(false).await;
    p.put_in_dlq(&orders(2)).await;
    let sqs_before = s.dlq_snapshot().await;
    let pubsub_before = pubsub_snapshot(&p).await;

    let gone = common::unique("no-such-queue");
    runtime_error_everywhere(
        "sqs queue missing",
        &format!(
            "queues:\n  - name: q\n    sqs: {{queue: {gone}, endpoint_url: {}}}\n",
            s.endpoint
        ),
        &[&format!("queue q: queue {gone}: not found"), "NonExistentQueue"],
    );
    // Given as a URL, the queue is named by its URL: the config's name for it
    // is in the prefix already, and said twice it named nothing the user typed.
    let gone_url = format!("{}/123456789012/{gone}", s.endpoint.trim_end_matches('/'));
    runtime_error_everywhere(
        "sqs queue URL missing",
        &format!(
            "queues:\n  - name: q\n    sqs: {{queue: \"{gone_url}\", endpoint_url: {}}}\n",
            s.endpoint
        ),
        &[&format!("queue q: queue {gone_url}: not found"), "NonExistentQueue"],
    );
    runtime_error_everywhere(
        "pubsub subscription missing",
        &format!(
            "queues:\n  - name: q\n    pubsub: {{project: {}, subscription: {gone}, emulator_host: '{}'}}\n",
            p.project, p.host
        ),
        &[&format!("projects/{}/subscriptions/{gone}: not found", p.project)],
    );

    // A destination that does not exist fails before anything is leased, as
    // the caller's mistake (exit 2), naming the `--to` it came from.
    let sqs_cfg = write_file(join(&sqs_lines(&s)), "yaml");
    let pubsub_cfg = write_file(
        format!(
            "queues:\n  - name: orders\n    pubsub: {{project: {}, subscription: {}, emulator_host: '{}'}}\n",
            p.project,
            common::pubsub::DLQ_SUB,
            p.host
        ),
        "yaml",
    );
    // A queue URL too: it was taken as given, passed a dry run, and the real
    // run leased everything to fail every send.
    let cases = [
        (&sqs_cfg, gone.clone(), format!("--to {gone}: queue {gone}: not found")),
        (
            &sqs_cfg,
            gone_url.clone(),
            format!("--to {gone_url}: queue {gone_url}: not found"),
        ),
        (
            &pubsub_cfg,
            gone.clone(),
            format!("--to {gone}: topic projects/{}/topics/{gone}: not found", p.project),
        ),
    ];
    for (cfg, to, says) in cases {
        let (code, out, err) =
            run(bin()
                .arg("-c")
                .arg(cfg)
                .args(["redrive", "orders", "--to", &to, "--yes", "--no-journal"]));
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains(&says), "{says}: {err}");
    }
    // The source is not configured and not knowable: a configured `source`
    // that does not exist is a clear error too, a mistake in the config
    // (exit 2), and `check` finds it before any redrive.
    let sourced = write_file(format!("{}    source: {gone}\n", join(&sqs_lines(&s))), "yaml");
    let (code, out, err) = run(bin()
        .arg("-c")
        .arg(&sourced)
        .args(["redrive", "orders", "--yes", "--no-journal"]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!("queue orders: source {gone}: queue {gone}: not found")),
        "{err}"
    );
    let (code, out, err) = run(bin().arg("-c").arg(&sourced).arg("check"));
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("queue orders (sqs): FAILED"), "{out}");
    assert!(
        err.contains(&format!("source {gone}: queue {gone}: not found")),
        "{err}"
    );
    // Pub/Sub checks a configured source while it connects for a pass; the
    // plan still reports a missing one.
    let (code, out, err) = run(bin()
        .arg("-c")
        .arg(write_file(
            format!(
                "queues:\n  - name: orders\n    source: {gone}\n    pubsub: {{project: {}, subscription: {}, emulator_host: '{}'}}\n",
                p.project,
                common::pubsub::DLQ_SUB,
                p.host
            ),
            "yaml",
        ))
        .args(["redrive", "orders", "--yes", "--no-journal"]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!(
            "source {gone}: topic projects/{}/topics/{gone}: not found",
            p.project
        )),
        "{err}"
    );

    assert_sqs_untouched(&s, &sqs_before).await;
    assert_pubsub_untouched(&p, &pubsub_before).await;
}

/// A queue given as its ARN (what the console, CloudFormation and
/// RedrivePolicy show) is looked up by its name in its account, and a queue
/// URL's region is the region called: a `region` that disagrees with it, or
/// a destination in another region, is named at once, rather than ending as
/// SQS's "queue does not exist".
#[tokio::test]
async fn sqs_queue_given_by_arn_or_url_region() {
    let s = SqsFixture::create(false).await;
    s.dead_letter(&orders(2)).await;
    let mut path = s.dlq_url.rsplit('/');
    let (name, account) = (path.next().unwrap(), path.next().unwrap());
    let connect = |queue: String, region: &str| {
        let yaml = format!(
            "queues:\n  - name: q\n    sqs: {{queue: '{queue}', endpoint_url: '{}', region: {region}}}\n",
            s.endpoint
        );
        let config = dlq_bridge::config::Config::from_yaml(&yaml, "test", &[]).unwrap();
        async move { dlq_bridge::backend::connect(config.queue("q").unwrap()).await }
    };
    let b = connect(format!("arn:aws:sqs:us-east-1:{account}:{name}"), "us-east-1")
        .await
        .unwrap();
    assert_eq!(b.stats().await.unwrap().depth, 2);
    let elsewhere = format!("https://sqs.eu-west-1.amazonaws.com/{account}/{name}");
    let err = b
        .resolve_destination(&elsewhere)
        .await
        .expect_err("another region's queue");
    assert!(
        err.to_string().contains("is in eu-west-1, and queue q is in us-east-1"),
        "{err}"
    );
    let err = connect(elsewhere, "us-east-1")
        .await
        .err()
        .expect("a region mismatch is refused");
    assert!(
        err.to_string().contains("`region: us-east-1` but its queue") && err.to_string().contains("is in eu-west-1"),
        "{err}"
    );
}

/// A DLQ with a RedrivePolicy of its own (a DLQ for the DLQ) moves a
/// message on once its receives pass maxReceiveCount: reading it (inspect, a
/// dry run, serve's reason sample) would empty it. Every command that
/// receives is refused, naming the policy, and the DLQ keeps every message;
/// `list` still counts, and the config may accept it.
#[tokio::test]
async fn a_dlq_with_a_redrive_policy_of_its_own_is_not_read_unless_the_config_accepts_it() {
    use aws_sdk_sqs::types::QueueAttributeName;
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&orders(3)).await;
    let next_name = common::unique("rp-next");
    let next = f.create_queue(&next_name, &[]).await;
    let arn = f.queue_arn(&next).await;
    let before = f.dlq_snapshot().await;
    f.client
        .set_queue_attributes()
        .queue_url(&f.dlq_url)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"5"}}"#),
        )
        .send()
        .await
        .unwrap();
    let cfg = write_file(join(&sqs_lines(&f)), "yaml");
    let out = scratch().join("rp-export.jsonl");
    let out = out.to_str().unwrap();
    let commands: [&[&str]; 6] = [
        &["inspect", "orders"],
        &["redrive", "orders", "--dry-run", "--yes"],
        &["redrive", "orders", "--yes"],
        &["export", "orders", "--to", out],
        &["purge", "orders", "--filter", "true", "--yes", "--no-backup"],
        &["check"],
    ];
    for args in commands {
        let (code, stdout, err) = run(bin().arg("-c").arg(&cfg).args(args));
        let said = format!("{stdout}{err}");
        assert_eq!(code, 1, "{args:?}: {said}");
        for expected in [
            "has a RedrivePolicy of its own",
            "maxReceiveCount 5",
            &next_name,
            "reads_may_move_messages: true",
        ] {
            assert!(said.contains(expected), "{args:?}: {expected:?} not in {said}");
        }
    }
    let (code, stdout, err) = run(bin().arg("-c").arg(&cfg).args(["list", "--sample", "0"]));
    assert_eq!(code, 0, "{stdout}{err}");
    assert_eq!(f.count(&next).await, 0, "moved on to the next queue");
    assert_sqs_untouched(&f, &before).await;

    let accepting = write_file(with_tail(&f, "      reads_may_move_messages: true\n"), "yaml");
    let (code, stdout, err) = run(bin()
        .arg("-c")
        .arg(&accepting)
        .args(["inspect", "orders", "-o", "json"]));
    assert_eq!(code, 0, "{stdout}{err}");
    let shown: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown.len(), 3, "{stdout}");
}

#[tokio::test]
async fn an_emulator_that_is_down_fails_fast_with_its_address() {
    // Real emulators up, so only the address differs.
    let s = SqsFixture::create(false).await;
    s.dead_letter(&orders(2)).await;
    let before = s.dlq_snapshot().await;
    let _ = common::pubsub::emulator_host();

    let port = common::emulator::free_port();
    runtime_error_everywhere(
        "sqs down",
        &format!("queues:\n  - name: q\n    sqs: {{queue: q, endpoint_url: 'http://127.0.0.1:{port}'}}\n"),
        &[
            &format!("cannot reach http://127.0.0.1:{port}"),
            "Connection refused",
            "is the service or emulator running?",
        ],
    );
    runtime_error_everywhere(
        "pubsub down",
        &format!(
            "queues:\n  - name: q\n    pubsub: {{project: p, subscription: s, emulator_host: '127.0.0.1:{port}'}}\n"
        ),
        &[
            &format!("cannot reach 127.0.0.1:{port}"),
            "is the service or emulator running?",
        ],
    );
    assert_sqs_untouched(&s, &before).await;
}

// ------------------------------------------------------ wrong credentials

/// moto's `/moto-api/reset-auth`: from now on, the first `free` requests go
/// unchecked and every later one must carry valid credentials.
async fn moto_auth_after(http: &reqwest::Client, endpoint: &str, free: &str) {
    let r = http
        .post(format!("{endpoint}/moto-api/reset-auth"))
        .header("content-type", "text/plain")
        .body(free.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "reset-auth: {}", r.status());
}

/// One IAM Query API call on moto while it checks nothing (only the service
/// named in the Authorization header matters then). Returns the XML answer.
async fn moto_iam(http: &reqwest::Client, endpoint: &str, params: &[(&str, &str)]) -> String {
    let r = http
        .post(format!("{endpoint}/"))
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0",
        )
        .form(&[params, &[("Version", "2010-05-08")]].concat())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(status.is_success(), "IAM {params:?}: {status} {text}");
    text
}

/// An IAM user on moto allowed `actions`, and its (key, secret).
async fn moto_user(http: &reqwest::Client, endpoint: &str, name: &str, actions: &[&str]) -> (String, String) {
    moto_iam(http, endpoint, &[("Action", "CreateUser"), ("UserName", name)]).await;
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
    })
    .to_string();
    moto_iam(
        http,
        endpoint,
        &[
            ("Action", "PutUserPolicy"),
            ("UserName", name),
            ("PolicyName", "allowed"),
            ("PolicyDocument", &policy),
        ],
    )
    .await;
    let key_xml = moto_iam(http, endpoint, &[("Action", "CreateAccessKey"), ("UserName", name)]).await;
    (xml_tag(&key_xml, "AccessKeyId"), xml_tag(&key_xml, "SecretAccessKey"))
}

/// A private moto that checks every request once `moto_auth_after(.., "0")`
/// (destructive settings: never the shared one).
fn moto_with_auth() -> common::emulator::Emulator {
    common::emulator::spawn(
        "moto-auth",
        &["python3", "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"],
        &[("INITIAL_NO_AUTH_ACTION_COUNT", "0")],
        "/moto-api/",
    )
}

fn xml_tag(xml: &str, tag: &str) -> String {
    let (_, rest) = xml
        .split_once(&format!("<{tag}>"))
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"));
    rest.split_once(&format!("</{tag}>")).unwrap().0.to_string()
}

#[tokio::test]
async fn wrong_credentials_are_refused_by_moto_with_auth_on_and_touch_nothing() {
    let emu = moto_with_auth();
    let endpoint = emu.url();
    let http = reqwest::Client::new();
    // It really refuses: the test's own client, with the usual test keys.
    let refused = common::sqs::client(&endpoint).list_queues().send().await.unwrap_err();
    assert_eq!(
        refused.raw_response().map(|r| r.status().as_u16()),
        Some(403),
        "{refused:?}"
    );

    // Set up unchecked: a user with an SQS policy and a key, two queues, messages.
    moto_auth_after(&http, &endpoint, "inf").await;
    let (key, secret) = moto_user(&http, &endpoint, "dlqb", &["sqs:*"]).await;
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(&key, &secret, None, None, "test"))
        .endpoint_url(&endpoint)
        .build();
    let client = aws_sdk_sqs::Client::from_conf(conf);
    let dlq_url = client
        .create_queue()
        .queue_name("auth-dlq")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let source_url = client
        .create_queue()
        .queue_name("auth")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let f = SqsFixture {
        client,
        endpoint: endpoint.clone(),
        source_url,
        dlq_url,
        fifo: false,
    };
    f.put_in_dlq(&orders(3)).await;
    moto_auth_after(&http, &endpoint, "0").await;
    // From here every request is checked; the fixture's own reads use the user's key.
    let before = f.dlq_snapshot().await;
    assert_eq!(before.len(), 3);

    let config = format!(
        "queues:\n  - name: q\n    sqs: {{queue: {}, endpoint_url: '{endpoint}', region: us-east-1}}\n    source: {}\n",
        f.dlq_url, f.source_url
    );
    runtime_error_everywhere(
        "unknown access key",
        &config,
        &[
            "SQS authentication failed: InvalidClientTokenId: The security token included in the request is invalid",
            "(queue ",
        ],
    );
    let (k, bad) = (key.clone(), format!("{secret}x"));
    runtime_error_everywhere_with(
        "wrong secret",
        &config,
        &move |c| {
            c.env("AWS_ACCESS_KEY_ID", &k).env("AWS_SECRET_ACCESS_KEY", &bad);
        },
        &["SQS authentication failed: SignatureDoesNotMatch"],
    );
    let home = scratch().join("empty-home");
    std::fs::create_dir_all(&home).unwrap();
    runtime_error_everywhere_with(
        "no credentials at all",
        &config,
        &move |c| {
            c.env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY")
                .env_remove("AWS_PROFILE")
                .env("HOME", &home);
        },
        &[
            "SQS authentication failed: no AWS credentials found for queue ",
            "AWS_ACCESS_KEY_ID",
        ],
    );
    // The control: the same config with the user's key works.
    let cfg = write_file(&config, "yaml");
    let (code, out, err) = run(bin()
        .env("AWS_ACCESS_KEY_ID", &key)
        .env("AWS_SECRET_ACCESS_KEY", &secret)
        .arg("-c")
        .arg(&cfg)
        .arg("check"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queue q (sqs): ok, depth 3"), "{out}");
    assert_sqs_untouched(&f, &before).await;
}

/// `sqs.cloudwatch: true` against a moto that checks every signature and
/// policy: the call is signed as CloudWatch takes it, the age is its latest
/// point, and a role without the permission fails `check` (told once, as an
/// error) while `list` and polls go on with the depth and no age.
#[tokio::test]
async fn cloudwatch_ages_are_signed_reads_and_a_missing_permission_fails_check_only() {
    let emu = moto_with_auth();
    let endpoint = emu.url();
    let http = reqwest::Client::new();
    moto_auth_after(&http, &endpoint, "inf").await;
    // moto names CloudWatch's IAM actions by its signing name, `monitoring`;
    // AWS by `cloudwatch`.
    let watcher = moto_user(
        &http,
        &endpoint,
        "watcher",
        &[
            "sqs:*",
            "cloudwatch:GetMetricStatistics",
            "monitoring:GetMetricStatistics",
        ],
    )
    .await;
    let blind = moto_user(&http, &endpoint, "blind", &["sqs:*"]).await;
    let sqs = common::sqs::client(&endpoint);
    let dlq = sqs.create_queue().queue_name("aged-dlq").send().await.unwrap();
    for i in 0..2 {
        sqs.send_message()
            .queue_url(dlq.queue_url().unwrap())
            .message_body(format!("m{i}"))
            .send()
            .await
            .unwrap();
    }
    // What SQS would have published: an older point, then the latest.
    common::sqs::put_age_point(&endpoint, "aged-dlq", 9, 100).await;
    common::sqs::put_age_point(&endpoint, "aged-dlq", 2, 321).await;
    moto_auth_after(&http, &endpoint, "0").await;

    let cfg = write_file(
        format!(
            "queues:\n  - name: aged\n    sqs:\n      queue: aged-dlq\n      endpoint_url: '{endpoint}'\n      region: us-east-1\n      cloudwatch: true\n      cloudwatch_endpoint_url: '{endpoint}'\n"
        ),
        "yaml",
    );
    let as_user = |(key, secret): &(String, String)| {
        let mut c = bin();
        c.env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .arg("-c")
            .arg(&cfg);
        c
    };
    let list = |user| {
        let (code, out, err) = run(as_user(user).args(["list", "--sample", "0", "-o", "json"]));
        assert_eq!(code, 0, "{out}{err}");
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        (rows[0].clone(), err)
    };

    let (row, err) = list(&watcher);
    assert_eq!(row["depth"], 2, "{row}");
    assert_eq!(row["oldest_age"], 321.0, "the latest point: {row}");
    assert_eq!(row["exactness"], "approximate", "{row}");
    assert_eq!(row["oldest_age_exactness"], "lagged", "{row}");
    assert!(!err.contains("WARN"), "{err}");
    // A reason sample of the whole queue beats a point minutes old.
    let (code, out, err) = run(as_user(&watcher).args(["list", "--sample", "10", "-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(rows[0]["oldest_age"].as_f64().unwrap() < 300.0, "{out}");
    assert!(rows[0].get("oldest_age_exactness").is_none(), "{out}");
    let (code, out, err) = run(as_user(&watcher).arg("check"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("queue aged (sqs): ok, depth 2, oldest 5m (lagged)"),
        "{out}"
    );

    let (code, out, err) = run(as_user(&blind).arg("check"));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("queue aged (sqs): FAILED"), "{out}");
    for says in [
        "error: queue aged: CloudWatch authentication failed: GetMetricStatistics (ApproximateAgeOfOldestMessage of aged-dlq): HTTP 403",
        "AccessDenied",
        "needs cloudwatch:GetMetricStatistics",
    ] {
        assert!(err.contains(says), "missing {says:?}: {err}");
    }
    assert_eq!(err.matches("AccessDenied").count(), 1, "told once: {err}");
    let (row, err) = list(&blind);
    assert_eq!(row["depth"], 2, "the depth still counts: {row}");
    assert_eq!(row["oldest_age"], serde_json::Value::Null, "{row}");
    assert!(row.get("oldest_age_exactness").is_none(), "{row}");
    assert!(
        err.contains("the oldest age is unknown") && err.contains("AccessDenied"),
        "{err}"
    );
}

// ---------------------------------------------- valid but odd: nothing lost

fn typed(value: dlq_bridge::model::AttrValue, data_type: Option<&str>) -> dlq_bridge::model::Attribute {
    dlq_bridge::model::Attribute {
        value,
        data_type: data_type.map(str::to_string),
    }
}

/// Redrive everything in `config`'s queue `orders` with the binary; every
/// message must be settled.
fn redrive_all(config: &str, n: usize) {
    let cfg = write_file(config, "yaml");
    let (code, out, err) =
        run(bin()
            .arg("-c")
            .arg(&cfg)
            .args(["redrive", "orders", "--yes", "--no-journal", "-o", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(s["settled"].as_u64(), Some(n as u64), "{s}");
}

/// Each sent message arrived once, body byte for byte and every attribute
/// with its value (and type, where the provider keeps types).
fn assert_arrived_exactly(sent: &[TestMessage], arrived: &[common::Received], typed_attributes: bool) {
    assert_eq!(arrived.len(), sent.len(), "one copy each");
    for want in sent {
        let kind = want.attributes["kind"].as_text();
        let got = arrived
            .iter()
            .find(|r| r.attributes.get("kind").map(|a| a.as_text()) == Some(kind.clone()))
            .unwrap_or_else(|| panic!("the {kind} message arrived"));
        assert!(
            got.body == want.body,
            "{kind}: body differs ({} bytes sent, {} arrived)",
            want.body.len(),
            got.body.len()
        );
        for (k, a) in &want.attributes {
            let have = got
                .attributes
                .get(k)
                .unwrap_or_else(|| panic!("{kind}: attribute {k:?} lost"));
            if typed_attributes {
                assert_eq!(have.value, a.value, "{kind}: attribute {k:?}");
                if a.data_type.is_some() {
                    assert_eq!(have.data_type, a.data_type, "{kind}: type of {k:?}");
                }
            } else {
                assert_eq!(have.as_text(), a.as_text(), "{kind}: attribute {k:?}");
            }
        }
    }
}

#[tokio::test]
async fn sqs_odd_bodies_and_attributes_round_trip_byte_exact() {
    use dlq_bridge::model::AttrValue;
    let f = SqsFixture::create(false).await;
    let long_name = format!("n{}", "a".repeat(255));
    let mut odd = attrs(&[
        ("kind", "odd-attributes"),
        ("dotted.name.v2", "x"),
        ("under_score-dash", "ü ✓ 𐍈"),
    ]);
    odd.insert(long_name, dlq_bridge::model::Attribute::string("a 256-character name"));
    odd.insert(
        "tiny".into(),
        typed(
            AttrValue::Number("-0.00000000000000000000000000000000000001".into()),
            Some("Number"),
        ),
    );
    odd.insert(
        "huge".into(),
        typed(
            AttrValue::Number("99999999999999999999999999999999999999".into()),
            Some("Number.int"),
        ),
    );
    odd.insert(
        "blob".into(),
        typed(
            AttrValue::Binary((0..=255u8).collect::<Vec<_>>().into()),
            Some("Binary.gzip"),
        ),
    );
    odd.insert(
        "json".into(),
        typed(AttrValue::String(r#"{"a":[1,"b"]}"#.into()), Some("String.json")),
    );
    let cases = vec![
        // SQS bodies are text: every range SQS allows, and control characters it allows.
        TestMessage {
            body: "tab\tnl\ncr\r \u{20}\u{D7FF}\u{E000}\u{FFFD}\u{10000}\u{10FFFF} ✓"
                .as_bytes()
                .to_vec(),
            attributes: odd,
            ordering_key: None,
        },
        // The largest message SQS takes: 1 MiB of body and attributes
        // ("kind" + "String" + "max-size": 18 bytes; moto takes more, SQS
        // does not, and dlq-bridge sizes copies as SQS counts).
        TestMessage {
            body: "y".repeat(1024 * 1024 - 18).into_bytes(),
            attributes: attrs(&[("kind", "max-size")]),
            ordering_key: None,
        },
    ];
    f.put_in_dlq(&cases).await;
    redrive_all(
        &join(&sqs_lines(&f)).replace(
            "region: us-east-1",
            &format!("region: us-east-1\n    source: {}", f.source_url),
        ),
        cases.len(),
    );
    assert_arrived_exactly(&cases, &f.drain_source().await, true);
    assert_eq!(f.dlq_count().await, 0);
}

/// A message within SQS's 1 MiB (body, attribute names, types and values)
/// that the redrive marks would take over it is sent without them, counted
/// as "sent without marks"; a smaller one keeps them. (moto does not count
/// attributes against the limit: real SQS refused such a copy on every run.)
#[tokio::test]
async fn sqs_marks_are_left_off_a_copy_they_would_take_over_the_size_limit() {
    use dlq_bridge::engine::redrive::{MARK_COUNT, MARK_ID};
    use dlq_bridge::engine::registry::RedriveRequest;
    let f = SqsFixture::create(false).await;
    // "kind" + "String" + "near-limit" + "error" + "String" + "Timeout" = 38 bytes.
    let near = TestMessage {
        body: "y".repeat(1024 * 1024 - 38 - 20).into_bytes(),
        attributes: attrs(&[("kind", "near-limit"), ("error", "Timeout")]),
        ordering_key: None,
    };
    let small = TestMessage {
        body: b"small".to_vec(),
        attributes: attrs(&[("kind", "small"), ("error", "Timeout")]),
        ordering_key: None,
    };
    f.put_in_dlq(&[near.clone(), small]).await;
    let mut config = f.config();
    config.queues[0].source = Some(f.source_url.clone());
    let s = common::redrive(config, RedriveRequest::default()).await;
    assert_eq!((s.settled, s.marks_omitted), (2, 1), "{s:?}");
    let arrived = f.drain_source().await;
    let kind = |k: &str| {
        arrived
            .iter()
            .find(|m| m.attributes["kind"].as_text() == k)
            .unwrap_or_else(|| panic!("{k} arrived"))
    };
    let near_copy = kind("near-limit");
    assert_eq!(near_copy.body, near.body);
    assert!(!near_copy.attributes.contains_key(MARK_ID) && !near_copy.attributes.contains_key(MARK_COUNT));
    assert!(kind("small").attributes.contains_key(MARK_ID));
}

#[tokio::test]
async fn pubsub_odd_bodies_and_attributes_round_trip_byte_exact() {
    let f = PubSubFixture::create(false).await;
    let mut odd = attrs(&[
        ("kind", "odd-attributes"),
        ("ünïcödé ключ", "значение ✓"),
        ("dotted.name.v2", "x"),
        ("with space", "y"),
        ("empty-value", ""),
    ]);
    odd.insert("k".repeat(256), dlq_bridge::model::Attribute::string("a 256-byte key"));
    odd.insert(
        "long-value".into(),
        dlq_bridge::model::Attribute::string("v".repeat(1024)),
    );
    let cases = vec![
        TestMessage {
            body: Vec::new(),
            attributes: attrs(&[("kind", "empty")]),
            ordering_key: None,
        },
        TestMessage {
            body: (0..=255u8).rev().cycle().take(70_000).collect(),
            attributes: attrs(&[("kind", "binary")]),
            ordering_key: None,
        },
        TestMessage {
            body: b"\xff\xfe not UTF-8 \xc3\x28".to_vec(),
            attributes: odd,
            ordering_key: None,
        },
        // Pub/Sub takes 10 MB per message; the redrive marks need some room.
        TestMessage {
            body: (0..9_990_000u32).map(|i| (i % 251) as u8).collect(),
            attributes: attrs(&[("kind", "max-size")]),
            ordering_key: None,
        },
    ];
    f.put_in_dlq(&cases).await;
    let config = format!(
        "queues:\n  - name: orders\n    pubsub: {{project: {}, subscription: {}, emulator_host: '{}'}}\n    source: {}\n",
        f.project,
        common::pubsub::DLQ_SUB,
        f.host,
        common::pubsub::SOURCE_TOPIC
    );
    redrive_all(&config, cases.len());
    assert_arrived_exactly(&cases, &f.drain_source().await, false);
    assert_eq!(f.dlq_count().await, 0);
}

// ------------------------------------------------- secrets from the environment

#[tokio::test]
async fn unset_secret_variables_are_config_errors_naming_field_and_variable() {
    let f = SqsFixture::create(false).await;
    f.dead_letter(&orders(2)).await;
    let before = f.dlq_snapshot().await;
    let unset = format!("DLQB_UNSET_{}", uuid::Uuid::new_v4().simple()).to_uppercase();
    let data_dir = scratch().join("serve-data").display().to_string();
    let sb = with_tail(
        &f,
        &format!("  - name: sb\n    servicebus: {{connection_string_env: {unset}, queue: q}}\n"),
    );
    let serve = |extra: &str| {
        with_tail(
            &f,
            &format!("serve: {{listen: '127.0.0.1:0', data_dir: '{data_dir}'{extra}}}\n"),
        )
    };
    let sb_says: &[&str] = &[
        "queue sb: the environment variable",
        &unset,
        "(servicebus.connection_string_env) is not set",
    ];
    let cases = vec![
        case(
            "connection string unset",
            sb.clone(),
            &["redrive", "sb", "--yes"],
            2,
            sb_says,
        ),
        case(
            "connection string unset, inspect",
            sb.clone(),
            &["inspect", "sb"],
            2,
            sb_says,
        ),
        case(
            "connection string empty",
            sb.clone(),
            &["redrive", "sb", "--dry-run"],
            2,
            sb_says,
        )
        .env(&unset, " "),
        case(
            "connection string malformed",
            sb.clone(),
            &["redrive", "sb", "--yes"],
            2,
            &["queue sb", &unset, "no `Endpoint=sb://<namespace>`"],
        )
        .env(&unset, "not a connection string"),
        case(
            "connection string without a key",
            sb.clone(),
            &["inspect", "sb"],
            2,
            &["queue sb", "`SharedAccessKeyName` and `SharedAccessKey`"],
        )
        .env(&unset, "Endpoint=sb://ns.servicebus.windows.net/"),
        // Commands over every queue report each one (the SQS queue still
        // answers), and exit 2 for the config problem, as the others do.
        case(
            "connection string unset, list",
            sb.clone(),
            &["list", "--sample", "0"],
            2,
            sb_says,
        ),
        case(
            "connection string unset, check",
            sb.clone(),
            &["check"],
            2,
            &[
                "queue orders (sqs): ok, depth 2",
                "queue sb (servicebus): FAILED",
                &unset,
            ],
        ),
        // The triage commands connect their queue themselves: the same exit 2.
        case(
            "connection string unset, purge",
            sb.clone(),
            &[
                "purge",
                "sb",
                "--filter",
                "true",
                "--no-backup",
                "--yes",
                "--no-journal",
            ],
            2,
            sb_says,
        ),
        case(
            "connection string unset, report",
            sb.clone(),
            &["report", "sb"],
            2,
            sb_says,
        ),
        case(
            "connection string unset, retention",
            format!("{sb}    retention: {{max_age: 1d}}\n"),
            &["retention", "sb", "--dry-run", "--no-journal"],
            2,
            &[
                "error: queue sb: retention failed: the environment variable",
                &unset,
                "is not set",
            ],
        ),
        // serve refuses to start (before it polls anything).
        case(
            "serve token unset",
            serve(&format!(", token_env: {unset}")),
            &["serve"],
            2,
            &["serve.token_env", &format!("environment variable {unset} is not set")],
        ),
        case(
            "alert sink URL unset",
            format!("{}alerts: {{sinks: [{{slack: {{url_env: {unset}}}}}]}}\n", serve("")),
            &["serve"],
            2,
            &["alerts.sinks[0]", &format!("environment variable {unset} is not set")],
        ),
        // `check` says so too, before `serve` is started: the same exit 2,
        // and every queue still checked.
        case(
            "serve token unset, check",
            serve(&format!(", token_env: {unset}")),
            &["check"],
            2,
            &[
                "serve.token_env",
                &format!("environment variable {unset} is not set"),
                "queue orders (sqs): ok, depth 2",
            ],
        ),
        case(
            "alert sink URL unset, check",
            format!("{}alerts: {{sinks: [{{slack: {{url_env: {unset}}}}}]}}\n", serve("")),
            &["check"],
            2,
            &[
                "alerts.sinks[0]",
                &format!("environment variable {unset} is not set"),
                "queue orders (sqs): ok, depth 2",
            ],
        ),
        case(
            "alert sink URL not a URL, check",
            format!("{}alerts: {{sinks: [{{webhook: {{url_env: {unset}}}}}]}}\n", serve("")),
            &["check"],
            2,
            &["alerts.sinks[0]", &unset, "does not hold an http:// or https:// URL"],
        )
        .env(&unset, "hooks.internal/dlq"),
    ];
    run_table(&cases);
    assert_sqs_untouched(&f, &before).await;
}

// ------------------------------------------------------------- Service Bus

/// On the shared emulator (127.0.0.1:5672, `scripts/emulators.sh start
/// servicebus`), with uniquely named entities.
#[cfg(feature = "servicebus")]
mod servicebus {
    use super::*;
    use common::servicebus::{CONNECTION_STRING_ENV, ServiceBusFixture, UNREACHABLE_CONNECTION_STRING_ENV, emulator};

    fn config(f: &ServiceBusFixture) -> String {
        format!(
            "queues:\n  - name: orders\n    servicebus: {{connection_string_env: {CONNECTION_STRING_ENV}, queue: {}, management_endpoint: '{}'}}\n",
            f.entity, f.http
        )
    }

    fn cs_env(c: &mut Command) {
        for k in [CONNECTION_STRING_ENV, UNREACHABLE_CONNECTION_STRING_ENV] {
            c.env(k, std::env::var(k).unwrap());
        }
    }

    /// (message ID, body) of the DLQ, browsed (a true peek: nothing changes).
    async fn snapshot(f: &ServiceBusFixture) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = f
            .browse_dlq()
            .await
            .iter()
            .map(|m| {
                (
                    m.message_id().unwrap_or_default().to_string(),
                    m.body().unwrap().to_vec(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn missing_entities_and_a_dead_namespace_are_clear_runtime_errors() {
        let http = emulator();
        let f = ServiceBusFixture::create(false).await;
        f.dead_letter(&orders(2)).await;
        let before = snapshot(&f).await;

        let gone = common::unique("no-such-queue");
        runtime_error_everywhere_with(
            "servicebus queue missing",
            &format!(
                "queues:\n  - name: q\n    servicebus: {{connection_string_env: {CONNECTION_STRING_ENV}, queue: {gone}, management_endpoint: '{http}'}}\n"
            ),
            &cs_env,
            &[&format!("queue q: queue {gone}: not found")],
        );
        runtime_error_everywhere_with(
            "servicebus subscription missing",
            &format!(
                "queues:\n  - name: q\n    servicebus: {{connection_string_env: {CONNECTION_STRING_ENV}, topic: {}, subscription: nope, management_endpoint: '{http}'}}\n",
                f.entity
            ),
            &cs_env,
            &["not found"],
        );
        // Nothing was created by asking.
        let atom = reqwest::get(format!("{http}/{gone}?api-version=2021-05"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!atom.contains("<entry"), "the missing queue was created: {atom}");

        runtime_error_everywhere_with(
            "servicebus namespace down",
            &format!(
                "queues:\n  - name: q\n    servicebus: {{connection_string_env: {UNREACHABLE_CONNECTION_STRING_ENV}, queue: q, management_endpoint: 'http://127.0.0.2:9'}}\n"
            ),
            &cs_env,
            &["cannot reach amqp://127.0.0.2", "is the service or emulator running?"],
        );
        // A destination that cannot be one: a DLQ or a subscription.
        let cfg = write_file(config(&f), "yaml");
        let mut cmd = bin();
        cs_env(&mut cmd);
        let (code, out, err) = run(cmd.arg("-c").arg(&cfg).args([
            "redrive",
            "orders",
            "--to",
            &format!("{}/$DeadLetterQueue", f.entity),
            "--yes",
            "--no-journal",
        ]));
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("is not a Service Bus queue or topic"), "{err}");
        assert_eq!(snapshot(&f).await, before, "the DLQ was touched");
        assert!(f.drain_source().await.is_empty(), "something was sent to the source");
    }

    /// The counts come from the management endpoint, apart from the AMQP
    /// connection: when only it is down, `list` and `check` still name the
    /// queue in the error, as for every other failure.
    #[tokio::test]
    async fn a_management_endpoint_that_is_down_is_named_with_its_queue() {
        emulator();
        let f = ServiceBusFixture::create(false).await;
        let port = common::emulator::free_port();
        let cfg = write_file(
            format!(
                "queues:\n  - name: orders\n    servicebus: {{connection_string_env: {CONNECTION_STRING_ENV}, queue: {}, management_endpoint: 'http://127.0.0.1:{port}'}}\n",
                f.entity
            ),
            "yaml",
        );
        for args in [&["list", "--sample", "0"][..], &["check"]] {
            let mut cmd = bin();
            cs_env(&mut cmd);
            let (code, out, err) = run(cmd.arg("-c").arg(&cfg).args(args));
            assert_eq!(code, 1, "{args:?}: {out}{err}");
            assert!(
                err.contains(&format!("error: queue orders: cannot reach http://127.0.0.1:{port}")),
                "{args:?}: {err}"
            );
        }
    }

    /// A destination that refuses the copies (a queue at its size quota:
    /// Azure answers the transfer with a Rejected outcome,
    /// `amqp:resource-limit-exceeded`): the run fails, says which
    /// destination refused and why, sends nothing again, and every original
    /// stays in the DLQ.
    #[tokio::test]
    async fn a_destination_that_refuses_the_copies_loses_nothing() {
        emulator();
        let f = ServiceBusFixture::create(false).await;
        // The broker's refusal names the queue: words in its name ("401",
        // "not-found") are not read as what the broker said.
        let full = format!("{}-401-not-found-full", f.entity);
        common::servicebus::create_queue(&f.http, &full, Some(1)).await;
        // Each over the 1 MB quota, and over the 1 MB a batch may hold, so
        // each goes alone and is refused.
        let cases: Vec<TestMessage> = (0..3u8)
            .map(|i| TestMessage {
                body: vec![b'a' + i; 1100 * 1024],
                attributes: attrs(&[("kind", "big")]),
                ordering_key: None,
            })
            .collect();
        f.dead_letter(&cases).await;
        let before = snapshot(&f).await;
        let cfg = write_file(config(&f), "yaml");
        let mut cmd = bin();
        cs_env(&mut cmd);
        let (code, out, err) =
            run(cmd
                .arg("-c")
                .arg(&cfg)
                .args(["redrive", "orders", "--to", &full, "--yes", "--no-journal"]));
        assert_eq!(code, 1, "{out}{err}");
        let said = format!("{out}{err}");
        for expected in [
            &format!("{full} refused the copies"),
            "resource-limit-exceeded",
            "Max entity size",
        ] {
            assert!(said.contains(expected), "{expected:?} not in {said}");
        }
        assert!(said.contains("settled:   0"), "{said}");
        assert_eq!(snapshot(&f).await, before, "the DLQ lost or changed a message");
        assert_eq!(
            common::servicebus::queue_message_count(&f.http, &full).await,
            0,
            "the refusing queue holds something"
        );
    }

    #[tokio::test]
    async fn odd_bodies_and_typed_properties_round_trip_byte_exact() {
        use dlq_bridge::model::AttrValue;
        emulator();
        let f = ServiceBusFixture::create(false).await;
        let mut odd = attrs(&[
            ("kind", "odd-properties"),
            ("ünïcödé ключ", "✓"),
            ("dotted.name", "x"),
            ("with space", ""),
        ]);
        odd.insert(
            "p".repeat(256),
            dlq_bridge::model::Attribute::string("a 256-character name"),
        );
        odd.insert("int".into(), typed(AttrValue::Int(i32::MIN as i64), Some("int")));
        odd.insert("long".into(), typed(AttrValue::Int(i64::MAX), None));
        odd.insert("double".into(), typed(AttrValue::Float(-1.0e-300), None));
        odd.insert("bool".into(), typed(AttrValue::Bool(false), None));
        odd.insert("uuid".into(), typed(AttrValue::Uuid(uuid::Uuid::nil()), None));
        odd.insert(
            "timestamp".into(),
            typed(
                AttrValue::Timestamp(chrono::DateTime::from_timestamp_millis(0).unwrap()),
                None,
            ),
        );
        odd.insert(
            "binary".into(),
            typed(AttrValue::Binary(vec![0u8, 255, 0].into()), None),
        );
        let cases = vec![
            TestMessage {
                body: Vec::new(),
                attributes: attrs(&[("kind", "empty")]),
                ordering_key: None,
            },
            TestMessage {
                body: b"\xff\xfe\x00 not UTF-8".to_vec(),
                attributes: odd,
                ordering_key: None,
            },
            // Premium namespaces take up to 100 MB; the emulator takes this.
            TestMessage {
                body: (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect(),
                attributes: attrs(&[("kind", "1 MiB")]),
                ordering_key: None,
            },
        ];
        f.dead_letter(&cases).await;
        let cfg = write_file(config(&f), "yaml");
        let mut cmd = bin();
        cs_env(&mut cmd);
        let (code, out, err) = run(cmd
            .arg("-c")
            .arg(&cfg)
            .args(["redrive", "orders", "--yes", "--no-journal"]));
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("settled:   {}", cases.len())), "{out}");
        assert_arrived_exactly(&cases, &f.drain_source().await, true);
        // Every original left the DLQ. This failed in 10 of 15 runs (all three
        // originals left behind, their copies delivered) until the adapter
        // confirmed its completes with a round trip before reporting them:
        // azservicebus returns once a disposition is queued, and the process
        // exited before the queue behind the 1 MiB transfer drained.
        let left = f.browse_dlq().await;
        let sizes: Vec<usize> = left.iter().map(|m| m.body().map(|b| b.len()).unwrap_or(0)).collect();
        assert!(
            left.is_empty(),
            "settled originals still in the DLQ (body sizes {sizes:?})"
        );
    }
}
