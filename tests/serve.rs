//! `dlq-bridge serve` end to end against moto: alerts delivered to a local
//! HTTP receiver, /metrics parsed as Prometheus text, the redrive API with its
//! token, and a graceful SIGTERM that loses nothing.
#![cfg(feature = "sqs")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::serve::{Receiver, Serve, TOKEN};
use common::sqs::SqsFixture;
use common::{Fixture, TestMessage, attrs};
use serde_json::{Value, json};

fn queue_yaml(name: &str, f: &SqsFixture) -> String {
    format!(
        "  - name: {name}\n    sqs:\n      queue: {}\n      endpoint_url: {}\n      region: us-east-1\n",
        f.dlq_url, f.endpoint
    )
}

fn msgs(n: usize, reason: &str) -> Vec<TestMessage> {
    (0..n)
        .map(|i| TestMessage {
            body: format!(r#"{{"n":{i},"card":"4111-1111"}}"#).into_bytes(),
            attributes: attrs(&[("error", reason), ("tenant", "acme")]),
            ordering_key: None,
        })
        .collect()
}

fn firing<'a>(notes: &'a [Value], kind: &str) -> Vec<&'a Value> {
    notes
        .iter()
        .filter(|n| n["kind"] == kind && n["status"] == "firing")
        .collect()
}

/// The first firing notice of `kind` the receiver gets, waited for up to 20 s.
async fn first_firing(serve: &Serve, rx: &Receiver, kind: &str) -> Value {
    serve
        .wait_for(Duration::from_secs(20), || async {
            !firing(&rx.webhook(), kind).is_empty()
        })
        .await;
    firing(&rx.webhook(), kind)[0].clone()
}

#[tokio::test]
async fn depth_alert_fires_once_repeats_after_interval_and_resolves_on_drain() {
    let f = SqsFixture::create(false).await;
    let (rx, base) = Receiver::start().await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\nalerts:\n  resend_delay: 1s\n  rules:\n    - name: orders-depth\n      depth_above: 3\n      repeat: 6s\n  sinks:\n    - webhook: {{url: \"{base}/webhook\"}}\n    - slack: {{url: \"{base}/slack\"}}\n    - alertmanager: {{url: \"{base}/am\", labels: {{team: payments}}}}\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    f.put_in_dlq(&msgs(5, "Timeout")).await;
    let note = first_firing(&serve, &rx, "depth_above").await;
    let first = Instant::now();
    assert_eq!(note["queue"], "orders");
    assert_eq!(note["rule"], "orders-depth");
    assert_eq!(note["value"], 5.0);
    assert_eq!(note["threshold"], 3.0);
    assert_eq!(note["version"], 1);

    // Several polls later, still one notification: deduplicated.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if first.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            firing(&rx.webhook(), "depth_above").len(),
            1,
            "deduplicated across polls"
        );
    }
    // Alertmanager meanwhile gets it again every resend_delay, each time
    // valid for four of them: not for the whole repeat interval.
    let am_firing: Vec<Value> = rx
        .on("am/api/v2/alerts")
        .into_iter()
        .filter(|a| a[0]["labels"]["alertname"] == "orders-depth")
        .collect();
    assert!(am_firing.len() >= 2, "re-sent to Alertmanager: {am_firing:?}");
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let first_am = &am_firing[0][0];
    let valid = time(&first_am["endsAt"]) - time(&first_am["startsAt"]);
    assert!(valid <= chrono::Duration::seconds(10), "valid for {valid}: {first_am}");
    assert!(
        am_firing.iter().all(|a| a[0]["startsAt"] == first_am["startsAt"]),
        "the same alert"
    );
    // After the repeat interval, it is sent again.
    serve
        .wait_for(Duration::from_secs(20), || async {
            firing(&rx.webhook(), "depth_above").len() >= 2
        })
        .await;
    assert!(
        first.elapsed() >= Duration::from_secs(5),
        "repeated only after the interval"
    );

    // Draining the DLQ resolves it, once.
    let run = serve.redrive("orders", json!({ "filter": "true" })).await;
    assert_eq!(run["status"], "finished", "{run}");
    assert_eq!(run["summary"]["settled"], 5, "{run}");
    serve
        .wait_for(Duration::from_secs(20), || async {
            rx.webhook().iter().any(|n| n["status"] == "resolved")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.webhook().iter().filter(|n| n["status"] == "resolved").count(), 1);

    let slack = rx.on("slack");
    assert!(
        slack
            .iter()
            .any(|s| s["text"].as_str().unwrap().contains("[FIRING] orders")),
        "{slack:?}"
    );
    assert!(
        slack.iter().any(|s| s["text"].as_str().unwrap().contains("[RESOLVED]")),
        "{slack:?}"
    );
    let am = rx.on("am/api/v2/alerts");
    assert!(!am.is_empty());
    assert_eq!(am[0][0]["labels"]["alertname"], "orders-depth");
    assert_eq!(am[0][0]["labels"]["team"], "payments");
    assert!(am[0][0]["startsAt"].is_string() && am[0][0]["endsAt"].is_string());
}

/// A restart of serve (every deploy of a sidecar) keeps what its alerts
/// knew, in `serve.data_dir`: an alert still true is not announced again, a
/// failure reason that first appeared while it was down is announced, and an
/// alert that cleared meanwhile is resolved.
#[tokio::test]
async fn a_restart_remembers_which_alerts_fire_and_which_reasons_are_known() {
    let f = SqsFixture::create(false).await;
    let (rx, base) = Receiver::start().await;
    let data = std::env::temp_dir().join(common::unique("dlqb-alert-state"));
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  data_dir: {}\nalerts:\n  rules:\n    - name: deep\n      depth_above: 3\n    - name: news\n      new_reason: true\n  sinks:\n    - webhook: {{url: \"{base}/webhook\"}}\n",
        queue_yaml("orders", &f),
        data.display()
    );
    let deep = |notes: &[Value], status: &str| {
        notes
            .iter()
            .filter(|n| n["rule"] == "deep" && n["status"] == status)
            .count()
    };
    f.put_in_dlq(&msgs(5, "Timeout")).await;
    let mut serve = Serve::start(&config).await;
    first_firing(&serve, &rx, "depth_above").await;
    assert!(serve.terminate().await.success());
    assert!(data.join("alerts-state.json").exists());

    f.put_in_dlq(&msgs(1, "Schema mismatch")).await;
    let mut serve = Serve::start(&config).await;
    let news = first_firing(&serve, &rx, "new_reason").await;
    assert_eq!(news["reason"], "Schema mismatch", "{news}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let notes = rx.webhook();
    assert_eq!(
        deep(&notes, "firing"),
        1,
        "announced again after the restart: {notes:?}"
    );
    assert!(
        firing(&notes, "new_reason").iter().all(|n| n["reason"] != "Timeout"),
        "{notes:?}"
    );
    assert!(serve.terminate().await.success());

    f.client.purge_queue().queue_url(&f.dlq_url).send().await.unwrap();
    let serve = Serve::start(&config).await;
    serve
        .wait_for(Duration::from_secs(20), || async {
            deep(&rx.webhook(), "resolved") == 1
        })
        .await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn growth_fires_for_a_burst_drained_before_the_next_poll_and_new_reason_only_for_new_ones() {
    let f = SqsFixture::create(false).await;
    let (rx, base) = Receiver::start().await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 4s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\nalerts:\n  rules:\n    - growth: {{messages: 4, window: 1m}}\n    - new_reason: true\n  sinks:\n    - webhook: {{url: \"{base}/webhook\"}}\n    - alertmanager: {{url: \"{base}/am\"}}\n",
        queue_yaml("orders", &f)
    );
    f.put_in_dlq(&msgs(1, "Timeout")).await;
    let serve = Serve::start(&config).await;
    // Readiness means the first poll happened: `Timeout` is now known.
    f.put_in_dlq(&msgs(5, "Timeout")).await;
    let run = serve.redrive("orders", json!({ "filter": "true" })).await;
    assert_eq!(run["summary"]["settled"], 6, "{run}");
    let growth = first_firing(&serve, &rx, "growth").await;
    assert!(growth["value"].as_f64().unwrap() >= 5.0, "{growth}");

    f.put_in_dlq(&msgs(1, "Timeout")).await;
    f.put_in_dlq(&msgs(1, "SchemaMismatch")).await;
    serve
        .wait_for(Duration::from_secs(20), || async {
            !firing(&rx.webhook(), "new_reason").is_empty()
        })
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let notes = rx.webhook();
    let news = firing(&notes, "new_reason");
    assert_eq!(news.len(), 1, "{news:?}");
    assert_eq!(news[0]["reason"], "SchemaMismatch");
    // A notification with samples, whose bodies are redacted by default.
    let samples = news[0]["samples"].as_array().expect("samples");
    assert!(!samples.is_empty(), "{news:?}");
    assert!(
        samples
            .iter()
            .all(|s| s["body_redacted"] == true && s.get("body").is_none()),
        "{news:?}"
    );
    for (_, v) in rx.got.lock().unwrap().iter() {
        assert!(
            !v.to_string().contains("4111-1111"),
            "bodies are redacted by default: {v}"
        );
    }
    // Alertmanager gets it active (an endsAt already past reads there as
    // resolved, and nobody is told), for the rule's repeat interval.
    let am: Vec<Value> = rx
        .on("am/api/v2/alerts")
        .into_iter()
        .filter(|a| a[0]["labels"]["kind"] == "new_reason")
        .collect();
    assert_eq!(am.len(), 1, "{am:?}");
    assert_eq!(am[0][0]["labels"]["reason"], "SchemaMismatch");
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let valid = time(&am[0][0]["endsAt"]) - time(&am[0][0]["startsAt"]);
    assert!(valid >= chrono::Duration::hours(4), "valid for {valid}: {am:?}");
}

#[tokio::test]
async fn metrics_match_depths_and_api_enforces_the_token() {
    let a = SqsFixture::create(false).await;
    let b = SqsFixture::create(false).await;
    a.put_in_dlq(&msgs(3, "Timeout")).await;
    let config = format!(
        "queues:\n{}{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n",
        queue_yaml("alpha", &a),
        queue_yaml("beta", &b)
    );
    let serve = Serve::start(&config).await;

    let (code, text) = serve.get("/metrics").await;
    assert_eq!(code, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let depth = |queue: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == "dlq_bridge_messages" && s.labels.get("queue") == Some(queue))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("unexpected {other:?}"),
            })
    };
    assert_eq!(depth("alpha"), Some(3.0), "{text}");
    assert_eq!(depth("beta"), Some(0.0), "{text}");
    for queue in ["alpha", "beta"] {
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == "dlq_bridge_oldest_message_age_seconds" && s.labels.get("queue") == Some(queue)),
            "age of {queue} exported: {text}"
        );
    }
    assert!(text.contains("dlq_bridge_poll_errors") && text.contains("dlq_bridge_arrivals"));
    // When each queue was last polled successfully: a moment ago.
    let now = chrono::Utc::now().timestamp() as f64;
    for queue in ["alpha", "beta"] {
        let at = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "dlq_bridge_last_poll_success_timestamp_seconds" && s.labels.get("queue") == Some(queue)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("unexpected {other:?}"),
            });
        let at = at.unwrap_or_else(|| panic!("last success of {queue}: {text}"));
        assert!((now - 30.0..=now + 1.0).contains(&at), "{queue}: {at} vs {now}");
    }

    let (code, text) = serve.get("/v1/queues").await;
    assert_eq!(code, 200);
    let queues: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(queues[0]["queue"], "alpha");
    assert_eq!(queues[0]["depth"], 3);
    // Failure reasons are message content: shown with the token only, as
    // `/report` shows them.
    assert!(queues[0].get("top_reasons").is_none(), "{queues}");
    let (_, text) = serve.get_auth("/v1/queues").await;
    let queues: Value = serde_json::from_str(&text).unwrap();
    assert!(queues[0]["top_reasons"][0][0].is_string(), "{queues}");

    // Reading bodies and redriving need the token.
    let (code, _) = serve.get("/v1/queues/alpha/messages").await;
    assert_eq!(code, 401);
    let (code, body) = serve.post("/v1/queues/alpha/redrive", json!({}), None).await;
    assert_eq!(code, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("token"));
    let (code, _) = serve.post("/v1/queues/alpha/redrive", json!({}), Some("wrong")).await;
    assert_eq!(code, 401);
    let (code, body) = serve
        .post(
            "/v1/queues/alpha/redrive",
            json!({ "filter": "reason ==" }),
            Some(TOKEN),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("invalid filter at 1:"),
        "{body}"
    );
    let (code, _) = serve.post("/v1/queues/nosuch/redrive", json!({}), Some(TOKEN)).await;
    assert_eq!(code, 404);

    let messages: Value = serve
        .http
        .get(format!("{}/v1/queues/alpha/messages?limit=2", serve.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(messages["messages"].as_array().unwrap().len(), 2, "{messages}");
    assert_eq!(messages["true_peek"], false);

    let run = serve.redrive("alpha", json!({ "dry_run": true })).await;
    assert_eq!(run["summary"]["matched"], 3, "{run}");
    assert_eq!(run["summary"]["trigger"], "api");
    let run = serve
        .redrive("alpha", json!({ "filter": "attributes.tenant == \"acme\"", "max": 2 }))
        .await;
    assert_eq!(run["summary"]["settled"], 2, "{run}");
    assert_eq!(a.drain_source().await.len(), 2);
}

/// promtool from scripts/tools.sh (`$DLQ_BRIDGE_TOOLS/bin`), else from PATH.
fn promtool() -> std::path::PathBuf {
    let tools = std::env::var_os("DLQ_BRIDGE_TOOLS")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/dlq-bridge/tools")));
    let cached = tools.map(|t| t.join("bin/promtool"));
    match cached.filter(|p| p.exists()) {
        Some(p) => p,
        None => {
            let found = std::process::Command::new("promtool").arg("--version").output();
            assert!(
                found.is_ok_and(|o| o.status.success()),
                "promtool not found: run scripts/tools.sh (it extracts it from Debian's prometheus package)"
            );
            "promtool".into()
        }
    }
}

#[tokio::test]
async fn metrics_negotiate_openmetrics_or_the_classic_text_format_promtool_accepts() {
    let a = SqsFixture::create(false).await;
    a.put_in_dlq(&msgs(2, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n",
        queue_yaml("alpha", &a)
    );
    let serve = Serve::start(&config).await;

    // What Prometheus 2.x asks for.
    let (code, content_type, text) = serve
        .get_accepting(
            "/metrics",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .await;
    assert_eq!(code, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE dlq_bridge_arrivals counter"), "{text}");

    // A classic scraper, and promtool's linter on what it gets.
    for accept in ["text/plain;version=0.0.4", "*/*"] {
        let (code, content_type, text) = serve.get_accepting("/metrics", accept).await;
        assert_eq!(code, 200);
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{accept}: {content_type}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.contains("# HELP dlq_bridge_arrivals_total "), "{text}");
        let mut check = std::process::Command::new(promtool())
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        use std::io::Write as _;
        check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = check.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics: {said}\n{text}"
        );
    }
}

#[tokio::test]
async fn non_loopback_listen_without_token_is_refused() {
    let f = SqsFixture::create(false).await;
    let path = std::env::temp_dir().join(format!("dlqb-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &path,
        format!("queues:\n{}serve:\n  listen: 0.0.0.0:0\n", queue_yaml("q", &f)),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("serve.listen") && err.contains("token"), "{err}");
}

#[tokio::test]
async fn sigterm_mid_redrive_loses_nothing() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(30, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\n",
        queue_yaml("orders", &f)
    );
    let mut serve = Serve::start(&config).await;
    let (code, _) = serve
        .post("/v1/queues/orders/redrive", json!({ "rate": 10 }), Some(TOKEN))
        .await;
    assert_eq!(code, 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = serve.terminate().await;
    assert!(status.success(), "{status:?}");
    let log = serve.log.lock().unwrap().join("\n");
    assert!(log.contains("redrive interrupted by the shutdown"), "{log}");
    let moved = f.drain_source().await.len();
    let left = f.dlq_count().await;
    assert!(moved > 0 && moved < 30, "interrupted mid-run: {moved} moved");
    assert_eq!(moved + left, 30, "every message is in exactly one place");
    // Released, not left leased: all of the rest are visible at once.
    assert_eq!(f.dlq_visible().await, left);
}

#[tokio::test]
async fn a_schedule_redrives_by_itself() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(2, "Timeout")).await;
    f.put_in_dlq(&msgs(2, "Fatal")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\nschedules:\n  - queue: orders\n    every: 1s\n    filter: 'reason == \"Timeout\"'\n",
        queue_yaml("orders", &f)
    );
    // Kept alive for the whole test; the schedule is what moves messages.
    let _serve = Serve::start(&config).await;
    let mut moved = 0;
    let start = Instant::now();
    while moved < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the schedule moved {moved} of 2"
        );
        moved += f.drain_source().await.len();
    }
    assert_eq!(moved, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(f.drain_source().await.len(), 0, "only the filtered messages move");
    assert_eq!(f.dlq_count().await, 2);
}

/// SIGTERM while a retention purge is going: serve waits for it to release
/// what it leased (and journal what it deleted) before it exits, as it does
/// for API and scheduled runs. (Against moto the purge stops within serve's
/// old 200 ms exit delay, so this guards the behaviour rather than catching
/// the slower releases of a real provider.)
#[tokio::test]
async fn sigterm_mid_retention_purge_releases_what_it_holds() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(30, "Timeout")).await;
    // Every message is past max_age by the time serve starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let export = std::env::temp_dir().join(format!("dlqb-retention-{}", uuid::Uuid::new_v4().simple()));
    let config = format!(
        "queues:\n{}    retention: {{max_age: 1s, check_every: 1h, action: export-then-purge, export_dir: {}}}\nserve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  reason_sample: 0\nredrive:\n  rate: 10\n  hold: 60s\n",
        queue_yaml("orders", &f),
        export.display()
    );
    let mut serve = Serve::start_until_ready(&config, &[]).await;
    serve
        .wait_for(Duration::from_secs(20), || async { f.dlq_count().await < 30 })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = serve.terminate().await;
    assert!(status.success(), "{status:?}");
    let left = f.dlq_count().await;
    assert!(left > 0 && left < 30, "interrupted mid-purge: {left} left");
    // Released, not left leased: all of the rest are visible at once.
    assert_eq!(f.dlq_visible().await, left);
    let _ = std::fs::remove_dir_all(&export);
}

/// A client that sends half a request head and stalls does not hold serve
/// past its shutdown grace: the server waited for every connection's request
/// with no limit, and the grace period started only after it.
#[tokio::test]
async fn a_stalled_http_request_does_not_hold_shutdown_past_the_grace() {
    use tokio::io::AsyncWriteExt as _;
    let f = SqsFixture::create(false).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  shutdown_grace: 2s\n",
        queue_yaml("orders", &f)
    );
    let mut serve = Serve::start_until_ready(&config, &[]).await;
    let addr = serve.url.trim_start_matches("http://").to_string();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // terminate() fails the test unless serve exits within 30 s; before, it
    // waited for as long as the client kept the connection open.
    let status = serve.terminate().await;
    assert!(status.success(), "{status:?}");
    drop(stalled);
}

/// A client that sends half a request head, or trickles its headers, is cut
/// off after the head timeout instead of holding its connection (and a file
/// descriptor) for good; a whole request on a fresh connection is answered.
#[tokio::test]
async fn a_request_head_that_never_completes_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let f = SqsFixture::create(false).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start_until_ready(&config, &[]).await;
    let addr = serve.url.trim_start_matches("http://").to_string();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut trickling = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickling.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    let trickle = async {
        for i in 0..20 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if trickling
                .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), trickling.read_to_end(&mut rest)).await;
        started.elapsed()
    };
    let stall = async {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the stalled connection is still open after 30 s");
        started.elapsed()
    };
    let (trickled, stalled_for) = tokio::join!(trickle, stall);
    assert!(stalled_for < Duration::from_secs(20), "{stalled_for:?}");
    assert!(
        trickled < Duration::from_secs(25),
        "the trickle held on for {trickled:?}"
    );
    assert_eq!(serve.get("/healthz").await.0, 200);
}

/// SIGTERM while a poll's reason sample reads (on SQS it leases as it
/// reads): the sample stops reading and releases what it leased before serve
/// exits, instead of leaving those messages hidden for the sample's hold.
#[tokio::test]
async fn sigterm_mid_reason_sample_releases_what_it_read() {
    const N: usize = 300;
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(N, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  reason_sample: {N}\n",
        queue_yaml("orders", &f)
    );
    let mut serve = Serve::start_until_ready(&config, &[]).await;
    // The next poll's sample hides what it has read so far.
    let start = std::time::Instant::now();
    while f.dlq_visible().await == N {
        assert!(start.elapsed() < Duration::from_secs(20), "no sample seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = serve.terminate().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        f.dlq_visible().await,
        N,
        "the sample released what it read before serve exited"
    );
}

/// A scheduled run that fails (here: its DLQ is deleted while serve runs)
/// says so in the log every time, naming the run, and /v1/runs has its
/// error: a schedule must not fail silently tick after tick.
#[tokio::test]
async fn a_scheduled_run_that_fails_says_so_in_the_log() {
    let f = SqsFixture::create(false).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\nschedules:\n  - queue: orders\n    every: 1s\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    // Exported at 0 before the first run, so that its failure shows as an increase.
    let (_, metrics) = serve.get("/metrics").await;
    assert!(
        metrics.contains(
            r#"dlq_bridge_runs_total{queue="orders",action="redrive",trigger="schedule",outcome="failed"} 0"#
        ),
        "{metrics}"
    );
    // One scheduled run that worked, so the backend is built, then the DLQ goes.
    let scheduled = |status: &'static str| {
        let serve = &serve;
        async move {
            let (_, body) = serve.get_auth("/v1/runs").await;
            let runs: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            runs.as_array().or_else(|| runs["runs"].as_array()).and_then(|runs| {
                runs.iter()
                    .find(|r| r["trigger"] == "schedule" && r["status"] == status)
                    .cloned()
            })
        }
    };
    serve
        .wait_for(Duration::from_secs(20), || async {
            scheduled("finished").await.is_some()
        })
        .await;
    f.client.delete_queue().queue_url(&f.dlq_url).send().await.unwrap();
    serve
        .wait_for(Duration::from_secs(20), || async {
            scheduled("failed").await.is_some()
        })
        .await;
    let run = scheduled("failed").await.unwrap();
    let id = run["run_id"].as_str().unwrap().to_string();
    serve
        .wait_for(Duration::from_secs(5), || async {
            serve.log.lock().unwrap().iter().any(|l| l.contains(&id))
        })
        .await;
    let log = serve.log.lock().unwrap().clone();
    let line = log.iter().find(|l| l.contains(&id)).unwrap();
    assert!(
        line.contains("ERROR") && line.contains("orders") && line.contains("schedule"),
        "{line}"
    );
    // And the metrics count it, for an alert rule to see.
    let (_, metrics) = serve.get("/metrics").await;
    let runs = |outcome: &str| {
        let series = format!(
            r#"dlq_bridge_runs_total{{queue="orders",action="redrive",trigger="schedule",outcome="{outcome}"}} "#
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{series} in\n{metrics}"))
    };
    assert!(runs("succeeded") >= 1 && runs("failed") >= 1, "{metrics}");
}

/// What a raw HTTP/1.1 request (`head`, and what follows it) is answered,
/// read until the first answer's headers end. Panics if none comes within
/// 5 s: the server's own body deadline is 10 s.
async fn raw_answer(url: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no answer within 5 s: the server waited for the body");
    String::from_utf8_lossy(&got).into_owned()
}

/// Request bodies must be JSON (415/400/422 otherwise, all JSON errors), an
/// unknown destination is the caller's 400, the token is read without its
/// trailing newline and the `bearer` scheme is case-insensitive, and runs
/// need the token like the rest of what shows message content.
#[tokio::test]
async fn api_bodies_tokens_and_runs_are_checked_and_errors_are_json() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(3, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\n",
        queue_yaml("orders", &f)
    );
    // As `kubectl create secret --from-file` stores a file that ends in a newline.
    let serve = Serve::start_with_env(&config, &[("DLQ_BRIDGE_TEST_TOKEN", &format!("{TOKEN}\n"))]).await;
    let url = format!("{}/v1/queues/orders/redrive", serve.url);
    let json_error = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "{status}: {ct}");
        let v: Value = r.json().await.unwrap();
        (status, v["error"].as_str().unwrap().to_string())
    };

    // The token is checked before the body.
    let r = serve.http.post(&url).body("not json").send().await.unwrap();
    assert_eq!(json_error(r).await.0, 401);
    // Before the body is even read: a caller without the token that sends a
    // large body slowly is answered at once, not held until it arrives.
    let head = "POST /v1/queues/orders/redrive HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{";
    assert!(
        raw_answer(&serve.url, head).await.starts_with("HTTP/1.1 401"),
        "answered before the body"
    );
    // With the token, a body past the limit is refused (413, not read whole).
    let r = serve
        .http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(format!(r#"{{"filter": "{}"}}"#, "x".repeat(100 << 10)))
        .send()
        .await
        .unwrap();
    let (code, error) = json_error(r).await;
    assert_eq!(code, 413, "{error}");
    assert!(error.contains("64 KiB"), "{error}");
    // What Python's requests.post(url, data=json.dumps(...)) sends: no Content-Type.
    let r = serve
        .http
        .post(&url)
        .bearer_auth(TOKEN)
        .body(r#"{"filter": "attributes.tenant == \"nobody\""}"#)
        .send()
        .await
        .unwrap();
    let (code, error) = json_error(r).await;
    assert_eq!(code, 415, "{error}");
    assert!(error.contains("application/json"), "{error}");
    // An empty body is not an unfiltered redrive.
    let r = serve.http.post(&url).bearer_auth(TOKEN).send().await.unwrap();
    let (code, error) = json_error(r).await;
    assert_eq!(code, 400, "{error}");
    assert!(error.contains("empty"), "{error}");
    // A misspelt field.
    let (code, body) = serve
        .post("/v1/queues/orders/redrive", json!({ "fliter": "true" }), Some(TOKEN))
        .await;
    assert_eq!(code, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("fliter"), "{body}");
    // A cap of nothing, as the config refuses it for a schedule.
    let (code, body) = serve
        .post("/v1/queues/orders/redrive", json!({ "max": 0 }), Some(TOKEN))
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("max must be at least 1"),
        "{body}"
    );
    // A destination that does not exist.
    let (code, body) = serve
        .post(
            "/v1/queues/orders/redrive",
            json!({ "to": "sidecarfix-no-such-queue" }),
            Some(TOKEN),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("sidecarfix-no-such-queue"),
        "{body}"
    );
    // A concurrency that would size the engine's semaphores past what they
    // take (the process aborted on it) is the caller's 400, dry run or not.
    let (code, body) = serve
        .post(
            "/v1/queues/orders/redrive",
            json!({ "dry_run": true, "concurrency": u64::MAX }),
            Some(TOKEN),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("from 1 to 256"), "{body}");
    // Purge and export bodies follow the same rules.
    for path in ["purge", "export"] {
        let r = serve
            .http
            .post(format!("{}/v1/queues/orders/{path}", serve.url))
            .bearer_auth(TOKEN)
            .header("content-type", "text/plain")
            .body(r#"{"filter": "true", "dry_run": true}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(json_error(r).await.0, 415, "{path}");
    }
    assert_eq!(f.dlq_count().await, 3, "nothing moved");
    assert!(f.drain_source().await.is_empty());

    // The lowercase scheme, with the token the file held (newline dropped).
    let r = serve
        .http
        .post(&url)
        .header("authorization", format!("bearer {TOKEN}"))
        .json(&json!({ "dry_run": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let started: Value = r.json().await.unwrap();
    let id = started["run_id"].as_str().unwrap();
    // Runs show filters, sample IDs and reasons: the token is needed.
    assert_eq!(serve.get(&format!("/v1/runs/{id}")).await.0, 401);
    assert_eq!(serve.get("/v1/runs").await.0, 401);
    let view = serve.wait_run(id).await;
    assert_eq!(view["summary"]["matched"], 3, "{view}");
    let (code, text) = serve.get_auth("/v1/runs").await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(id), "{text}");
}

/// A run on SQS is not cut short by the sidecar's own reads: the poller
/// samples reasons every second (leasing up to 50 messages for a moment),
/// yet each run sees every message; a browse during a run is refused rather
/// than hiding messages from it.
#[tokio::test]
async fn the_pollers_samples_and_browses_never_hide_messages_from_a_run() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(40, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 50\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    for _ in 0..20 {
        let run = serve.redrive("orders", json!({ "dry_run": true })).await;
        assert_eq!(run["summary"]["matched"], 40, "every dry run sees all 40: {run}");
    }
    // A slow real run spans several polls.
    let (code, started) = serve
        .post("/v1/queues/orders/redrive", json!({ "rate": 10 }), Some(TOKEN))
        .await;
    assert_eq!(code, 202, "{started}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, text) = serve.get_auth("/v1/queues/orders/messages?limit=5").await;
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("a run is active"), "{text}");
    let view = serve.wait_run(started["run_id"].as_str().unwrap()).await;
    assert_eq!(view["status"], "finished", "{view}");
    assert_eq!(view["summary"]["settled"], 40, "{view}");
    assert_eq!(f.drain_source().await.len(), 40);
    assert_eq!(f.dlq_count().await, 0);
    let (code, text) = serve.get_auth("/v1/queues/orders/messages?limit=5").await;
    assert_eq!(code, 200, "reads resume once the run is over: {text}");
    // A bad query string is refused in the API's own shape, JSON.
    for path in [
        "/v1/queues/orders/messages?limit=abc",
        "/v1/queues/orders/report?top=abc",
        "/v1/runs?limit=-1",
    ] {
        let (code, text) = serve.get_auth(path).await;
        assert_eq!(code, 400, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        assert!(
            v["error"].as_str().unwrap().contains("limit") || v["error"].as_str().unwrap().contains("top"),
            "{v}"
        );
    }
}

/// On SQS without CloudWatch the oldest age is known when the reason sample
/// covers the whole queue; `oldest_age_above` must then fire.
#[tokio::test]
async fn oldest_age_above_fires_on_sqs_from_the_sampled_age() {
    let f = SqsFixture::create(false).await;
    let (rx, base) = Receiver::start().await;
    f.put_in_dlq(&msgs(2, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\nalerts:\n  rules:\n    - oldest_age_above: 2s\n  sinks:\n    - webhook: {{url: \"{base}/webhook\"}}\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    let note = first_firing(&serve, &rx, "oldest_age_above").await;
    assert_eq!(note["queue"], "orders");
    assert!(note["value"].as_f64().unwrap() > 2.0, "{note}");
}

/// With `cloudwatch: true` and a reason sample smaller than the queue, the
/// age comes from CloudWatch: exported, shown as lagged, and alerted on.
#[tokio::test]
async fn oldest_age_above_fires_on_sqs_from_cloudwatch_when_the_sample_is_partial() {
    let f = SqsFixture::create(false).await;
    let (rx, base) = Receiver::start().await;
    f.put_in_dlq(&msgs(3, "Timeout")).await;
    let dlq_name = f.dlq_url.rsplit('/').next().unwrap();
    common::sqs::put_age_point(&f.endpoint, dlq_name, 3, 3600).await;
    let config = format!(
        "queues:\n{}      cloudwatch: true\n      cloudwatch_endpoint_url: {}\nserve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  reason_sample: 1\nalerts:\n  rules:\n    - oldest_age_above: 30m\n  sinks:\n    - webhook: {{url: \"{base}/webhook\"}}\n",
        queue_yaml("orders", &f),
        f.endpoint
    );
    let serve = Serve::start(&config).await;
    let note = first_firing(&serve, &rx, "oldest_age_above").await;
    assert_eq!(note["value"], 3600.0, "{note}");
    let (_, body) = serve.get("/v1/queues").await;
    let queues: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(queues[0]["oldest_age"], 3600.0, "{queues}");
    assert_eq!(queues[0]["oldest_age_exactness"], "lagged", "{queues}");
    assert_eq!(queues[0]["exactness"], "approximate", "{queues}");
    let (_, metrics) = serve.get("/metrics").await;
    assert!(
        metrics.contains("dlq_bridge_oldest_message_age_seconds{queue=\"orders\",backend=\"sqs\"} 3600"),
        "{metrics}"
    );
}

/// A run is cancelled over the API (with the token): it stops as a shutdown
/// stops it, ends `interrupted`, and what it did not move is still in the
/// DLQ; a run that has ended is a 409, an unknown one a 404.
#[tokio::test]
async fn a_running_redrive_is_cancelled_over_the_api_and_loses_nothing() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(30, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1h\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    let (code, started) = serve
        .post("/v1/queues/orders/redrive", json!({ "rate": 2 }), Some(TOKEN))
        .await;
    assert_eq!(code, 202, "{started}");
    let id = started["run_id"].as_str().unwrap().to_string();
    let cancel = format!("/v1/runs/{id}/cancel");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, _) = serve.post(&cancel, json!({}), None).await;
    assert_eq!(code, 401, "the token is needed");
    let (code, view) = serve.post(&cancel, json!({}), Some(TOKEN)).await;
    assert_eq!(code, 202, "{view}");
    assert_eq!(view["run_id"], id.as_str());
    let ended = serve.wait_run(&id).await;
    assert_eq!(ended["status"], "interrupted", "{ended}");
    assert_eq!(ended["summary"]["stopped"], "cancelled", "{ended}");
    let log = serve.log.lock().unwrap().join("\n");
    assert!(log.contains("redrive interrupted by a cancel over the API"), "{log}");
    let settled = ended["summary"]["settled"].as_u64().unwrap();
    assert!(settled < 30, "stopped before the end: {ended}");
    let moved = f.drain_source().await.len();
    assert_eq!(moved as u64, settled, "{ended}");
    assert_eq!(f.dlq_count().await + moved, 30, "nothing lost");
    let (code, again) = serve.post(&cancel, json!({}), Some(TOKEN)).await;
    assert_eq!(code, 409, "{again}");
    assert!(again["error"].as_str().unwrap().contains("interrupted"), "{again}");
    let (code, _) = serve.post("/v1/runs/nosuch/cancel", json!({}), Some(TOKEN)).await;
    assert_eq!(code, 404);
}

/// A redrive that spans polls removes messages the polls already saw go: no
/// phantom arrivals, and no growth alert, for our own removals.
#[tokio::test]
async fn a_redrive_spanning_polls_counts_no_phantom_arrivals() {
    let f = SqsFixture::create(false).await;
    let (rx, base) = Receiver::start().await;
    f.put_in_dlq(&msgs(20, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\nalerts:\n  rules:\n    - growth: {{messages: 5, window: 5m}}\n  sinks:\n    - webhook: {{url: \"{base}/webhook\"}}\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    let run = serve.redrive("orders", json!({ "rate": 5 })).await;
    assert_eq!(run["summary"]["settled"], 20, "{run}");
    let started: chrono::DateTime<chrono::Utc> = run["started_at"].as_str().unwrap().parse().unwrap();
    assert!(
        chrono::Utc::now() - started > chrono::Duration::seconds(3),
        "the run spanned several polls"
    );
    // Two more polls after the run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, text) = serve.get("/metrics").await;
    let arrivals = text
        .lines()
        .find(|l| l.starts_with(r#"dlq_bridge_arrivals_total{queue="orders""#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok());
    assert_eq!(arrivals, Some(0.0), "{text}");
    assert!(firing(&rx.webhook(), "growth").is_empty(), "{:?}", rx.webhook());
    // Real arrivals still count.
    f.put_in_dlq(&msgs(6, "Timeout")).await;
    let value = first_firing(&serve, &rx, "growth").await["value"].as_f64().unwrap();
    assert!((5.0..=6.0).contains(&value), "only the 6 real arrivals count: {value}");
}

/// `?limit=1` leases one message, not a thousand (every lease raises a
/// receive count on SQS); with a filter, at most `scan` are read.
#[tokio::test]
async fn a_browse_reads_only_what_it_needs() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(5, "Timeout")).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    let before: std::collections::HashMap<String, u32> =
        f.dlq_snapshot().await.into_iter().map(|(id, _, n)| (id, n)).collect();
    assert_eq!(before.len(), 5);
    let (code, text) = serve.get_auth("/v1/queues/orders/messages?limit=1").await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    assert_eq!(v["read"], 1, "{v}");
    let after = f.dlq_snapshot().await;
    // The snapshot itself adds one to each; the browse, one more to one message.
    let browsed: Vec<&String> = after
        .iter()
        .filter(|(id, _, n)| *n >= before[id] + 2)
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(browsed.len(), 1, "{after:?} after {before:?}");

    let (code, text) = serve
        .get_auth("/v1/queues/orders/messages?limit=1&filter=reason%20%3D%3D%20%22Nope%22&scan=3")
        .await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["read"], 3, "a filtered browse reads `scan`: {v}");
    assert!(v["messages"].as_array().unwrap().is_empty());
    assert_eq!(v["filter_errors"], 0, "{v}");

    // A filter that fails on every message is told apart from one that
    // matches none, as inspect and the dashboard's browse tell them apart.
    let (code, text) = serve
        .get_auth("/v1/queues/orders/messages?limit=1&filter=attributes.missing%20%3D%3D%20%22x%22&scan=3")
        .await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["messages"].as_array().unwrap().is_empty());
    assert_eq!(
        (v["read"].as_u64(), v["filter_errors"].as_u64()),
        (Some(3), Some(3)),
        "{v}"
    );

    // A blank filter is refused, naming the parameter, as the CLI refuses
    // `--filter ' '`; it used to read as no filter and browse everything.
    for path in [
        "/v1/queues/orders/messages?limit=1&filter=%20%20",
        "/v1/queues/orders/report?filter=%20",
        "/v1/queues/orders/browse?filter=%09",
    ] {
        let (code, text) = serve.get_auth(path).await;
        assert_eq!(code, 400, "{path}: {text}");
        assert!(text.contains("`filter` is empty"), "{path}: {text}");
    }
}

/// Two `serve` processes never share a data directory (and so a journal).
#[tokio::test]
async fn a_second_serve_on_the_same_data_dir_fails_clearly() {
    let f = SqsFixture::create(false).await;
    let state = std::env::temp_dir().join(format!("sidecarfix-state-{}", uuid::Uuid::new_v4().simple()));
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n",
        queue_yaml("orders", &f)
    );
    let first = Serve::start_with_env(&config, &[("XDG_STATE_HOME", state.to_str().unwrap())]).await;
    let path = std::env::temp_dir().join(format!("dlqb-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, config.replace("{listen}", "127.0.0.1:0")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("XDG_STATE_HOME", &state)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("serve.data_dir") && err.contains("in use by another dlq-bridge serve"),
        "{err}"
    );
    drop(first);
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&path);
}

/// Retention purges run under the same per-queue guard as other runs (the
/// poller samples every second meanwhile) and still empty the queue.
#[tokio::test]
async fn retention_purges_alongside_the_pollers_samples() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(12, "Timeout")).await;
    let config = format!(
        "queues:\n{}    retention: {{max_age: 1s, action: export-then-purge, check_every: 2s}}\nserve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    serve
        .wait_for(Duration::from_secs(30), || async { f.dlq_count().await == 0 })
        .await;
    assert!(f.drain_source().await.is_empty(), "purged, not redriven");
}

/// A sidecar with many queues is ready once each backend has polled one of
/// them, not after the admin-call limit has let every queue's first poll
/// through: an unready sidecar takes its app's pod out of service.
#[tokio::test]
async fn ready_once_each_backend_has_polled_without_waiting_for_every_queue() {
    let f = SqsFixture::create(false).await;
    let queues: String = (0..5).map(|i| queue_yaml(&format!("orders-{i}"), &f)).collect();
    // One admin call a second: the fifth queue's first poll is 4 s away.
    let config = format!(
        "queues:\n{queues}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 30s\n  reason_sample: 0\n  admin_calls_per_second: {{sqs: 1}}\n"
    );
    let serve = Serve::start_until_ready(&config, &[]).await;
    assert!(!serve.all_polled().await, "ready before every queue was polled");
    let (_, body) = serve.get("/v1/queues").await;
    let statuses: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(statuses.len(), 5, "{body}");
    assert!(statuses.iter().any(|q| q["polled_at"].is_null()), "{body}");
    serve
        .wait_for(Duration::from_secs(30), || async { serve.all_polled().await })
        .await;
}

/// A retention purge that spans polls is credited as it settles, like an API
/// run: the polls that see the depth fall count no arrivals for it, and
/// nothing is counted again when it ends (no phantom growth alert).
#[tokio::test]
async fn a_retention_purge_spanning_polls_counts_no_phantom_arrivals() {
    let f = SqsFixture::create(false).await;
    let (rx, base) = Receiver::start().await;
    f.put_in_dlq(&msgs(300, "Timeout")).await;
    // Older than max_age by the time serve applies the policy, at start-up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let config = format!(
        "queues:\n{}    retention: {{max_age: 1s, action: export-then-purge, check_every: 1h}}\nserve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  reason_sample: 0\nalerts:\n  rules:\n    - growth: {{messages: 5, window: 5m}}\n  sinks:\n    - webhook: {{url: \"{base}/webhook\"}}\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    let arrivals = || async {
        let (_, text) = serve.get("/metrics").await;
        text.lines()
            .find(|l| l.starts_with(r#"dlq_bridge_arrivals_total{queue="orders""#))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    let depth = || async {
        let (_, text) = serve.get("/v1/queues").await;
        serde_json::from_str::<Value>(&text).unwrap()[0]["depth"].as_u64()
    };
    serve
        .wait_for(Duration::from_secs(60), || async { depth().await == Some(0) })
        .await;
    // Two more polls after the purge was credited.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The 300 purged do not count. moto counts visible and in-flight
    // messages in two passes, so a poll while the purge leases can count the
    // messages moving between the two twice (300, then 303 with nothing
    // credited; 308 in a CI run while two builds ran alongside): no more
    // than the in-flight count, which the arrival counter allows for.
    let counted = arrivals().await.expect("arrivals exported");
    assert_eq!(counted, 0.0, "phantom arrivals");
    assert!(firing(&rx.webhook(), "growth").is_empty(), "{:?}", rx.webhook());
}

/// Failure reasons are label values: one with a quote, a backslash and a line
/// break must still give a scrape Prometheus (and promtool) accepts, with the
/// reason intact.
#[tokio::test]
async fn a_reason_with_quotes_and_line_breaks_keeps_the_scrape_valid() {
    let f = SqsFixture::create(false).await;
    let reason = "Unexpected token \"<\" at C:\\app\\x.js\n    at parse";
    f.put_in_dlq(&msgs(2, reason)).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    let (code, _, text) = serve.get_accepting("/metrics", "text/plain;version=0.0.4").await;
    assert_eq!(code, 200);
    let mut check = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write as _;
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == "dlq_bridge_reason_messages" && s.labels.get("queue") == Some("orders"))
        .unwrap_or_else(|| panic!("no reason series in\n{text}"));
    assert!(
        matches!(sample.value, prometheus_parse::Value::Gauge(v) if v == 2.0),
        "{sample:?}"
    );
}

/// A notification still being retried when the pod is told to stop goes out
/// before the process exits (within `shutdown_grace`): an alert that fired
/// just before a rollout must not die with the pod.
#[tokio::test]
async fn a_notification_in_retry_at_shutdown_is_still_delivered() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(2, "Timeout")).await;
    // Refuses the first attempt (503: retried after a second), takes the rest.
    let attempts = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(Mutex::new(Vec::<Value>::new()));
    let hook = {
        let (attempts, delivered) = (attempts.clone(), delivered.clone());
        axum::Router::new().fallback(move |axum::Json(v): axum::Json<Value>| {
            let (attempts, delivered) = (attempts.clone(), delivered.clone());
            async move {
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                delivered.lock().unwrap().push(v);
                axum::http::StatusCode::OK
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  reason_sample: 0\nalerts:\n  rules:\n    - depth_above: 1\n  sinks:\n    - webhook: {{url: \"http://{addr}/hook\"}}\n",
        queue_yaml("orders", &f)
    );
    let mut serve = Serve::start(&config).await;
    serve
        .wait_for(Duration::from_secs(20), || async {
            attempts.load(Ordering::SeqCst) >= 1
        })
        .await;
    let status = serve.terminate().await;
    assert!(status.success(), "{status:?}");
    let delivered = delivered.lock().unwrap().clone();
    assert_eq!(
        delivered.len(),
        1,
        "the refused notification, retried before exiting: {delivered:?}"
    );
    assert_eq!(delivered[0]["status"], "firing");
    assert_eq!(delivered[0]["queue"], "orders");
}

/// Peak RSS (VmHWM) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    common::vm_hwm_kib(&status).expect("VmHWM")
}

/// `GET /messages` holds the messages it returns, not the ones it scans:
/// a `scan=150` over bodies of 200 KB (30 MB) that match nothing must not
/// raise the sidecar's peak memory by much more than a page of them. It
/// held them all, and `scan` goes up to 10,000: with 1 MiB bodies, a
/// request could get the pod OOM-killed.
#[tokio::test]
async fn a_browse_holds_what_it_returns_not_what_it_scans() {
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&common::large_messages(150, 200_000)).await;
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1m\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\n",
        queue_yaml("orders", &f)
    );
    let serve = Serve::start(&config).await;
    // A first small browse warms up what every request uses.
    let (code, text) = serve.get_auth("/v1/queues/orders/messages?limit=1").await;
    assert_eq!(code, 200, "{text}");
    let before = peak_rss_kib(serve.child.id());
    let (code, text) = serve
        .get_auth("/v1/queues/orders/messages?limit=2&filter=body.startsWith(%22none%22)&scan=150")
        .await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["read"], 150, "{}", &text[..text.len().min(500)]);
    assert!(v["messages"].as_array().unwrap().is_empty());
    let after = peak_rss_kib(serve.child.id());
    eprintln!("serve peak RSS KiB: before {before}, after the scan {after}");
    assert!(
        after - before < 12 * 1024,
        "a scan of 150 messages of 200 KB raised serve's peak RSS from {before} to {after} KiB: the messages not returned were kept"
    );
    // Everything the browse leased was released.
    assert_eq!(f.dlq_visible().await, 150);

    // What is returned is bounded too: `limit=100` of these bodies (20 MB,
    // and its JSON twice that) stops at 8 MiB of bodies, and says so.
    let (code, text) = serve.get_auth("/v1/queues/orders/messages?limit=100").await;
    assert_eq!(code, 200, "{}", &text[..text.len().min(500)]);
    let v: Value = serde_json::from_str(&text).unwrap();
    let returned = v["messages"].as_array().unwrap().len();
    assert_eq!(returned, (8 << 20) / 200_004 + 1, "read {}", v["read"]);
    assert_eq!(v["truncated"], true);
    let (code, text) = serve.get_auth("/v1/queues/orders/messages?limit=3").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["messages"].as_array().unwrap().len(), &v["truncated"]),
        (3, &json!(false))
    );
    assert_eq!(f.dlq_visible().await, 150);
}

/// A browse that reaches the provider's limit on messages leased at once
/// (SQS's 120,000 in flight, answered here by a front that moto lacks)
/// says so in `/messages`, as `report` and `export` say it: without
/// `hold_limited`, a cut read looked like the whole DLQ.
#[tokio::test]
async fn a_browse_cut_by_the_providers_hold_limit_says_so() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&msgs(25, "Timeout")).await;
    // Receives left before OverLimit; the poll before it is not counted.
    let left = Arc::new(AtomicUsize::new(usize::MAX));
    let front = common::sqs::sqs_front(&f.endpoint, {
        let left = left.clone();
        move |target, _| {
            let over = target.ends_with(".ReceiveMessage")
                && left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_err();
            over.then_some((
                403,
                r#"{"__type":"com.amazonaws.sqs#OverLimit","message":"Too many messages in flight"}"#,
            ))
        }
    })
    .await;
    let via_front = SqsFixture { endpoint: front, ..f };
    let config = format!(
        "queues:\n{}serve:\n  listen: \"{{listen}}\"\n  poll_interval: 1h\n  token_env: DLQ_BRIDGE_TEST_TOKEN\n  reason_sample: 0\n",
        queue_yaml("orders", &via_front)
    );
    let serve = Serve::start(&config).await;
    left.store(2, Ordering::SeqCst);
    let (code, text) = serve
        .get_auth("/v1/queues/orders/messages?limit=50&filter=true&scan=100")
        .await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["hold_limited"], true, "{v}");
    assert_eq!(v["read"], 20, "two receives of ten: {v}");
    assert_eq!(v["held_back"], 5, "{v}");
    assert_eq!(v["messages"].as_array().unwrap().len(), 20, "{v}");
}
