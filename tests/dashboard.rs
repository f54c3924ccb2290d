//! The web dashboard of `serve` (issue 15), driven in a real headless
//! Chromium (Debian's chromium + chromedriver, over WebDriver) against serve
//! on the three emulators, plus its API rules checked over plain HTTP.
//!
//! The browser test writes screenshots of the overview, the queue page and a
//! redrive to `$DLQ_BRIDGE_SCREENSHOTS_DIR` (the README's come from
//! `DLQ_BRIDGE_SCREENSHOTS_DIR=docs/screenshots cargo test --test dashboard`),
//! else to the test's scratch directory.
#![cfg(all(feature = "sqs", feature = "pubsub", feature = "servicebus"))]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::pubsub::PubSubFixture;
use common::serve::{Serve, TOKEN};
use common::servicebus::ServiceBusFixture;
use common::sqs::SqsFixture;
use common::webdriver::Browser;
use common::{Fixture, TestMessage, attrs};
use dlq_bridge::config::{Config, QueueConfig};
use serde_json::{Value, json};

fn renamed(config: Config, name: &str) -> QueueConfig {
    let mut q = config.queues.into_iter().next().expect("fixture queue");
    q.name = name.to_string();
    q
}

fn order(i: usize, tenant: &str, reason: &str, description: &str) -> TestMessage {
    TestMessage {
        body: format!(r#"{{"order":"ord-{i}","tenant":"{tenant}","total":{}.50}}"#, 10 + i * 7).into_bytes(),
        attributes: attrs(&[
            ("error", reason),
            ("error_description", description),
            ("tenant", tenant),
        ]),
        ordering_key: None,
    }
}

/// Six orders: three of tenant acme (timeouts), three of globex (two
/// timeouts, one schema error).
fn orders() -> Vec<TestMessage> {
    vec![
        order(1, "acme", "Timeout", "timeout after 3012 ms calling payments"),
        order(2, "globex", "Timeout", "timeout after 15 ms calling payments"),
        order(3, "acme", "Timeout", "timeout after 912 ms calling payments"),
        order(4, "globex", "SchemaMismatch", "field `total` expected number"),
        order(5, "acme", "Timeout", "timeout after 40 ms calling payments"),
        order(6, "globex", "Timeout", "timeout after 77 ms calling payments"),
    ]
}

fn screenshots_dir() -> PathBuf {
    let dir = match std::env::var_os("DLQ_BRIDGE_SCREENSHOTS_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(d)
            }
        }
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn save_screenshot(b: &Browser, name: &str) {
    let path = screenshots_dir().join(name);
    std::fs::write(&path, b.screenshot().await).unwrap();
    eprintln!("screenshot: {}", path.display());
}

/// Console entries that are errors, except the refusals this test provokes on
/// purpose (the 401s of the wrong-token step, which Chromium logs as failed
/// loads). Uncaught exceptions, CSP violations and any other failed load count.
fn console_errors(entries: &[Value]) -> Vec<Value> {
    entries
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .filter(|e| {
            let msg = e["message"].as_str().unwrap_or("");
            !(e["source"] == "network" && msg.contains("401"))
        })
        .cloned()
        .collect()
}

#[tokio::test]
async fn dashboard_in_headless_chromium_lists_filters_and_redrives() {
    let sqs = SqsFixture::create(false).await;
    let pubsub = PubSubFixture::create(false).await;
    let servicebus = ServiceBusFixture::create(false).await;
    sqs.put_in_dlq(&orders()).await;
    pubsub.dead_letter(&orders()[..3]).await;
    servicebus.dead_letter(&orders()[..4]).await;

    let mut orders_q = renamed(sqs.config(), "orders");
    // Polled once: SQS has no true peek, and a poll's reason sample holds
    // messages for a moment, which a redrive racing it would not see.
    orders_q.poll_interval = Some(Duration::from_secs(3600));
    let mut config = sqs.config();
    config.queues = vec![
        orders_q,
        renamed(pubsub.config(), "payments"),
        renamed(servicebus.config(), "invoices"),
    ];
    config.serve.listen = "{listen}".into();
    config.serve.token_env = Some("DLQ_BRIDGE_TEST_TOKEN".into());
    config.serve.poll_interval = Duration::from_secs(1);
    config.serve.reason_sample = 20;
    config.serve.dashboard.show_bodies = true;
    config.alerts.rules =
        serde_yaml::from_str("[{name: orders-depth, queues: [orders], depth_above: 5}]").expect("alert rule");
    let serve = Serve::start(&serde_yaml::to_string(&config).unwrap()).await;

    let b = Browser::start().await;
    b.goto(&format!("{}/", serve.url)).await;

    // Overview: every queue of the three backends, with depth and sparkline,
    // and the firing alert highlighted.
    b.wait_until("three queues with their depths", Duration::from_secs(30), || async {
        let mut ok = true;
        for (q, depth) in [("orders", "6"), ("payments", "3"), ("invoices", "4")] {
            ok &= b.text_of(&format!("#queues tr[data-queue='{q}'] td.depth")).await == depth;
        }
        ok
    })
    .await;
    for (q, backend) in [("orders", "sqs"), ("payments", "pubsub"), ("invoices", "servicebus")] {
        let row = b.wait(&format!("#queues tr[data-queue='{q}']")).await;
        assert_eq!(b.attr(&row, "data-backend").await.as_deref(), Some(backend));
        // Failure reasons are message content: not without the token.
        let text = b.text(&row).await;
        assert!(text.contains("enter the API token to see them"), "{q}: {text}");
        assert!(!text.contains("Timeout"), "{q}: {text}");
    }
    b.wait("#queues tr.firing[data-queue='orders']").await;
    assert!(
        b.text_of("#queues tr[data-queue='orders']")
            .await
            .contains("orders-depth")
    );
    assert!(b.find("#queues tr.firing[data-queue='payments']").await.is_none());
    // The page refreshes by itself: two more payments fail, and the depth
    // and its sparkline follow without a reload.
    pubsub.dead_letter(&orders()[3..5]).await;
    b.wait_until("payments' new depth", Duration::from_secs(30), || async {
        b.text_of("#queues tr[data-queue='payments'] td.depth").await == "5"
    })
    .await;
    b.wait_until("a sparkline with the step", Duration::from_secs(20), || async {
        let v = b
            .script("const p = document.querySelector(\"#queues tr[data-queue='payments'] svg.spark polyline\"); return p ? p.getAttribute('points').split(' ').length : 0")
            .await;
        v.as_u64().unwrap_or(0) >= 3
    })
    .await;
    save_screenshot(&b, "dashboard-overview.png").await;

    // A wrong token is refused, and nothing moves.
    let token = b.wait("#token").await;
    b.type_text(&token, "not-the-token").await;
    b.click(&b.wait("#token-save").await).await;
    b.click(&b.wait("#queues tr[data-queue='orders'] a").await).await;
    let err = b.wait("#messages-error").await;
    assert!(
        b.text(&err).await.contains("wrong bearer token"),
        "{}",
        b.text(&err).await
    );
    assert!(b.text_of("#banner").await.contains("refused the token"));
    b.click(&b.wait("#tab-actions").await).await;
    b.click(&b.wait("#redrive-dry-run").await).await;
    let err = b.wait("#redrive-error").await;
    assert!(b.text(&err).await.contains("wrong bearer token"));
    assert_eq!(sqs.dlq_count().await, 6, "a refused call touched nothing");

    // The right token: the messages of the queue.
    let token = b.wait("#token").await;
    b.type_text(&token, TOKEN).await;
    b.click(&b.wait("#token-save").await).await;
    b.wait_until("six messages listed", Duration::from_secs(30), || async {
        b.find_all("#messages tbody tr.message").await.len() == 6
    })
    .await;
    // With it, the overview shows each queue's top reasons.
    b.goto(&format!("{}/#/", serve.url)).await;
    b.wait_until("top reasons with the token", Duration::from_secs(30), || async {
        let mut shown = true;
        for q in ["orders", "payments", "invoices"] {
            shown &= b
                .text_of(&format!("#queues tr[data-queue='{q}']"))
                .await
                .contains("Timeout");
        }
        shown
    })
    .await;
    b.goto(&format!("{}/#/queue/orders", serve.url)).await;
    b.wait_until("six messages listed again", Duration::from_secs(30), || async {
        b.find_all("#messages tbody tr.message").await.len() == 6
    })
    .await;

    // The filter box reports a syntax error at its position, reading nothing.
    let filter = b.wait("#filter").await;
    b.type_text(&filter, "attributes.tenant == ").await;
    b.wait_until("a syntax error with its position", Duration::from_secs(10), || async {
        b.text_of("#filter-error").await.contains("line 1, column")
    })
    .await;
    assert!(b.text_of("#filter-error").await.contains('^'));
    b.clear(&filter).await;
    b.type_text(&filter, "tenant == \"acme\"").await;
    b.wait_until(
        "an unknown variable with its position",
        Duration::from_secs(10),
        || async {
            let t = b.text_of("#filter-error").await;
            t.contains("unknown variable `tenant`") && t.contains("line 1, column 1")
        },
    )
    .await;
    // A valid filter narrows the list.
    b.clear(&filter).await;
    b.type_text(&filter, "attributes.tenant == \"acme\"").await;
    b.wait_until("the error cleared", Duration::from_secs(10), || async {
        b.find("#filter-error.hidden").await.is_some()
    })
    .await;
    b.click(&b.wait("#apply").await).await;
    b.wait_until("three acme messages", Duration::from_secs(30), || async {
        b.find_all("#messages tbody tr.message").await.len() == 3
    })
    .await;
    // A message's details: body as text, then hex; typed attributes.
    b.click(&b.find_all("#messages tbody tr.message").await[0]).await;
    let detail = b.wait("#messages tr.detail:not(.hidden) pre.body").await;
    assert!(b.text(&detail).await.contains("\"tenant\":\"acme\""));
    assert!(b.text_of("#messages tr.detail:not(.hidden)").await.contains("string"));
    save_screenshot(&b, "dashboard-queue.png").await;

    // Report by pattern, and a click from a pattern to its messages.
    b.click(&b.wait("#tab-report").await).await;
    b.wait("#report tbody tr.group").await;
    let groups = b.find_all("#report tbody tr.group").await;
    assert_eq!(groups.len(), 1, "the three acme timeouts are one pattern");
    let key = b.attr(&groups[0], "data-key").await.unwrap();
    assert_eq!(key, "Timeout: timeout after <n> ms calling payments");
    assert_eq!(b.text_of("#report tbody tr.group td.num").await, "3");
    b.click(&groups[0]).await;
    b.wait("#group-note:not(.hidden)").await;
    b.wait_until("the pattern's three messages", Duration::from_secs(30), || async {
        b.find_all("#messages tbody tr.message").await.len() == 3
    })
    .await;

    // Redrive: a dry run shows the count and a sample, then a confirmed run
    // moves exactly the matching messages.
    b.click(&b.wait("#tab-actions").await).await;
    b.click(&b.wait("#redrive-dry-run").await).await;
    let count = b.wait("#redrive-dry-result .match-count").await;
    assert_eq!(b.text(&count).await, "3");
    assert_eq!(sqs.dlq_count().await, 6, "a dry run moves nothing");
    assert!(sqs.drain_source().await.is_empty(), "a dry run sends nothing");
    b.click(&b.wait("#redrive-confirm").await).await;
    b.wait("#redrive-summary").await;
    let status = b.wait("#redrive-status[data-status]").await;
    assert_eq!(b.attr(&status, "data-status").await.as_deref(), Some("finished"));
    save_screenshot(&b, "dashboard-redrive.png").await;
    let moved = sqs.drain_source().await;
    assert_eq!(moved.len(), 3, "exactly the matching messages reached the source");
    for m in &moved {
        assert_eq!(m.attributes["tenant"].as_text(), "acme");
    }
    assert_eq!(sqs.dlq_count().await, 3, "the others stayed in the DLQ");

    // Export then purge the schema error the same way: dry run, confirm, summary.
    let filter = b.wait("#filter").await;
    b.clear(&filter).await;
    b.type_text(&filter, "reason == \"SchemaMismatch\"").await;
    b.click(&b.wait("#export-dry-run").await).await;
    assert_eq!(b.text(&b.wait("#export-dry-result .match-count").await).await, "1");
    b.click(&b.wait("#export-confirm").await).await;
    let exported = b.text(&b.wait("#export-summary").await).await;
    assert!(exported.starts_with("Exported 1 of"), "{exported}");
    b.click(&b.wait("#purge-dry-run").await).await;
    assert_eq!(b.text(&b.wait("#purge-dry-result .match-count").await).await, "1");
    assert_eq!(sqs.dlq_count().await, 3, "a purge dry run deletes nothing");
    b.click(&b.wait("#purge-confirm").await).await;
    let summary = b.text(&b.wait("#purge-summary").await).await;
    assert!(summary.contains("backup"), "{summary}");
    let status = b.wait("#purge-status[data-status]").await;
    assert_eq!(b.attr(&status, "data-status").await.as_deref(), Some("finished"));
    assert_eq!(sqs.dlq_count().await, 2, "exactly the schema error was purged");

    // Runs: the dry runs, the redrive and the purge, started from the API.
    b.goto(&format!("{}/#/runs", serve.url)).await;
    b.wait_until("four runs listed", Duration::from_secs(20), || async {
        b.find_all("#runs tbody tr.run").await.len() >= 4
    })
    .await;
    let runs = b.text_of("#runs").await;
    assert!(runs.contains("redrive (dry run)") && runs.contains("api"), "{runs}");
    assert!(runs.contains("purge (dry run)") && runs.contains("purge"), "{runs}");
    assert!(runs.contains("attributes.tenant == \"acme\""), "{runs}");

    // The log is really captured: a probe line and the provoked 401s are in it.
    b.script("console.info('dashboard-console-probe'); return 1").await;
    let console = b.console().await;
    let has = |needle: &str| {
        console
            .iter()
            .any(|e| e["message"].as_str().unwrap_or("").contains(needle))
    };
    assert!(
        has("dashboard-console-probe"),
        "the browser log is captured: {console:#?}"
    );
    assert!(has("401"), "the wrong token's refusals are in the log: {console:#?}");
    let errors = console_errors(&console);
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
}

#[tokio::test]
async fn dashboard_assets_and_api_rules() {
    let sqs = SqsFixture::create(false).await;
    sqs.put_in_dlq(&orders()).await;
    let mut config = sqs.config();
    config.queues = vec![renamed(sqs.config(), "orders")];
    config.queues[0].poll_interval = Some(Duration::from_secs(3600));
    config.serve.listen = "{listen}".into();
    // Kept across the restart below, whose runs list then comes from the journal.
    config.serve.data_dir =
        Some(std::env::temp_dir().join(format!("dlqb-dashboard-{}", uuid::Uuid::new_v4().simple())));
    let serve = Serve::start(&serde_yaml::to_string(&config).unwrap()).await;
    let http = reqwest::Client::new();

    // The page: a strict CSP, and well under 200 KB with its assets.
    let mut total = 0;
    for path in ["/", "/ui", "/ui/app.js", "/ui/app.css", "/ui/favicon.svg"] {
        let r = http.get(format!("{}{path}", serve.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        if path != "/ui" {
            total += r.bytes().await.unwrap().len();
        }
    }
    assert!(total < 200_000, "the page weighs {total} bytes");

    // Without a token: bodies are redacted unless the config opts in.
    let (code, text) = serve.get("/v1/queues/orders/browse?limit=10").await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["body_redacted"], true);
    assert_eq!(v["messages"].as_array().unwrap().len(), 6);
    assert!(!text.contains("ord-1"), "no body in a redacted browse: {text}");
    assert!(v["messages"][0]["body_text"].is_null());

    // The filter check names the position.
    let (_, text) = serve.get("/v1/filter/check?filter=attributes.tenant%20%3D%3D%20").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["valid"], false, "{v}");
    assert_eq!(v["line"], 1, "{v}");
    assert!(v["column"].as_u64().unwrap() >= 18, "{v}");
    let (_, text) = serve.get("/v1/filter/check?filter=true").await;
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["valid"], true);
    // The empty box: valid, and said to be empty (the page then sends none).
    let (_, text) = serve.get("/v1/filter/check?filter=%20").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["valid"].as_bool(), v["empty"].as_bool()),
        (Some(true), Some(true)),
        "{v}"
    );

    // CSRF: a cross-site POST is refused; so is a rebound host name.
    let redrive = format!("{}/v1/queues/orders/redrive", serve.url);
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
        ("host", "evil.example"),
    ] {
        let r = http
            .post(&redrive)
            .header(name, value)
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}: {value}");
    }
    let r = http
        .get(format!("{}/v1/queues", serve.url))
        .header("host", "rebound.example:9090")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a non-loopback Host without a token");
    assert_eq!(sqs.dlq_count().await, 6, "nothing moved");

    // Export: a dry run counts, the real one writes a file on the server.
    let (code, v) = serve
        .post(
            "/v1/queues/orders/export",
            json!({"filter": "attributes.tenant == \"globex\"", "dry_run": true}),
            None,
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["matched"], 3, "{v}");
    let (code, v) = serve
        .post(
            "/v1/queues/orders/export",
            json!({"filter": "attributes.tenant == \"globex\""}),
            None,
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["written"], 3, "{v}");
    let file = std::fs::read_to_string(v["file"].as_str().unwrap()).unwrap();
    assert_eq!(file.lines().count(), 3);
    // `max` caps the lines written, `scan` the messages read.
    let (code, v) = serve
        .post(
            "/v1/queues/orders/export",
            json!({"filter": "attributes.tenant == \"globex\"", "max": 2}),
            None,
        )
        .await;
    assert_eq!((code, &v["written"]), (200, &json!(2)), "{v}");
    let (code, v) = serve.post("/v1/queues/orders/export", json!({"scan": 2}), None).await;
    assert_eq!((code, &v["read"], &v["written"]), (200, &json!(2), &json!(2)), "{v}");

    // Purge with a backup, as a run with progress and a summary.
    let (code, started) = serve
        .post(
            "/v1/queues/orders/purge",
            json!({"filter": "reason == \"SchemaMismatch\""}),
            None,
        )
        .await;
    assert_eq!(code, 202, "{started}");
    let id = started["run_id"].as_str().unwrap().to_string();
    let start = std::time::Instant::now();
    let view = loop {
        let (_, text) = serve.get(&format!("/v1/runs/{id}")).await;
        let view: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if view["status"] != "running" {
            break view;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "purge did not finish: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(view["status"], "finished", "{view}");
    assert_eq!(view["action"], "purge", "{view}");
    assert_eq!(view["summary"]["settled"], 1, "{view}");
    let backup = std::fs::read_to_string(started["backup"].as_str().unwrap()).unwrap();
    assert_eq!(backup.lines().count(), 1);
    assert!(backup.contains("SchemaMismatch"));
    assert_eq!(sqs.dlq_count().await, 5);
    // Counted as a purge run, not as a redriven message.
    let (_, metrics) = serve.get("/metrics").await;
    assert!(
        metrics.contains(r#"dlq_bridge_runs_total{queue="orders",action="purge",trigger="api",outcome="succeeded"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains("dlq_bridge_redrive_messages_total{"), "{metrics}");

    // The runs list has it, with its trigger.
    let (_, text) = serve.get("/v1/runs").await;
    let runs: Value = serde_json::from_str(&text).unwrap();
    let run = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run_id"] == id.as_str())
        .unwrap();
    assert_eq!(run["trigger"], "api");
    assert_eq!(run["progress"]["settled"], 1);

    // The dashboard can be turned off; the API stays.
    drop(serve);
    let mut off = config.clone();
    off.serve.dashboard.enabled = false;
    let serve = Serve::start(&serde_yaml::to_string(&off).unwrap()).await;
    assert_eq!(serve.get("/").await.0, 404);
    assert_eq!(serve.get("/v1/queues").await.0, 200);
    // A new process lists the earlier purge from the audit journal.
    let (_, text) = serve.get("/v1/runs").await;
    let runs: Value = serde_json::from_str(&text).unwrap();
    let run = runs.as_array().unwrap().iter().find(|r| r["run_id"] == id.as_str());
    let run = run.unwrap_or_else(|| panic!("run {id} in the journal: {runs}"));
    assert_eq!(run["status"], "finished", "{run}");
    assert_eq!(run["trigger"], "api", "{run}");
    assert_eq!(run["action"], "purge", "{run}");
    assert_eq!(run["progress"]["settled"], 1, "{run}");
    // And finds it by ID, from the journal too, in the same shape.
    let (code, text) = serve.get(&format!("/v1/runs/{id}")).await;
    assert_eq!(code, 200, "{text}");
    let by_id: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(&by_id, run);
    let (code, text) = serve.get("/v1/runs/no-such-run").await;
    assert_eq!(code, 404, "{text}");
}
