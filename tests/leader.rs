//! Two `serve` replicas share a coordination.k8s.io/v1 Lease on a real
//! kube-apiserver (scripts/kube.sh): exactly one sends alerts and runs the
//! schedules, and when it is killed the other takes over within the lease
//! duration and sends the next alert, or moves the next messages.
#![cfg(all(feature = "k8s", feature = "sqs"))]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::serve::{Receiver, Serve};
use common::sqs::SqsFixture;
use common::{Fixture, TestMessage, attrs};
use serde_json::Value;

const LEASE_SECONDS: u64 = 4;

/// A kubeconfig for the test API server: DLQ_BRIDGE_TEST_KUBECONFIG when
/// scripts/test.sh started one, else `scripts/kube.sh start` (which installs
/// what it needs). Never skipped: no API server fails the test.
/// Started once per test binary: the tests run in parallel, and two starts
/// at once would race for the same ports and data directory.
fn kubeconfig() -> String {
    static KUBECONFIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KUBECONFIG.get_or_init(start_kube).clone()
}

fn start_kube() -> String {
    if let Some(k) = std::env::var("DLQ_BRIDGE_TEST_KUBECONFIG")
        .ok()
        .filter(|k| !k.is_empty())
    {
        return k;
    }
    let out = Command::new("bash")
        .arg(common::emulator::repo_root().join("scripts/kube.sh"))
        .arg("start")
        .output()
        .expect("run scripts/kube.sh");
    assert!(
        out.status.success(),
        "scripts/kube.sh start failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export KUBECONFIG=").map(str::to_string))
        .expect("kube.sh prints export KUBECONFIG=")
}

/// The config of one replica: the fixture's DLQ as `orders`, leader
/// election on `lease`, `poll_interval`, then `rest` (alerts, schedules).
fn replica_config(f: &SqsFixture, lease: &str, replica: &str, poll_interval: &str, rest: &str) -> String {
    format!(
        "queues:\n  - name: orders\n    sqs:\n      queue: {}\n      endpoint_url: {}\n      region: us-east-1\nserve:\n  listen: \"{{listen}}\"\n  poll_interval: {poll_interval}\n  reason_sample: 0\n  leader_election:\n    enabled: true\n    lease_name: {lease}\n    namespace: default\n    identity: replica-{replica}\n    lease_duration: {LEASE_SECONDS}s\n{rest}",
        f.dlq_url, f.endpoint
    )
}

fn replica_of(n: &Value) -> String {
    n["labels"]["replica"].as_str().unwrap_or("?").to_string()
}

#[tokio::test]
async fn one_leader_alerts_and_the_standby_takes_over_when_it_dies() {
    let kubeconfig = kubeconfig();
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&[TestMessage {
        body: b"x".to_vec(),
        attributes: attrs(&[("error", "Timeout")]),
        ordering_key: None,
    }])
    .await;
    let (rx, base) = Receiver::start().await;
    let lease = common::unique("dlqb-lease");
    let config = |replica: &str| {
        let alerts = format!(
            "alerts:\n  rules:\n    - depth_above: 0\n      repeat: 2s\n  sinks:\n    - webhook: {{url: \"{base}/webhook\", labels: {{replica: {replica}}}}}\n"
        );
        replica_config(&f, &lease, replica, "1s", &alerts)
    };
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let mut a = Serve::start_with_env(&config("a"), &env).await;
    let mut b = Serve::start_with_env(&config("b"), &env).await;

    // Both poll every second; over several repeat intervals only one sends.
    a.wait_for(Duration::from_secs(30), || async { rx.webhook().len() >= 3 })
        .await;
    let senders: std::collections::BTreeSet<String> = rx.webhook().iter().map(replica_of).collect();
    assert_eq!(senders.len(), 1, "exactly one replica sends alerts: {senders:?}");
    let leader = senders.into_iter().next().unwrap();

    // Kill the leader without a chance to hand the lease over.
    let (dead, standby) = if leader == "a" { (&mut a, "b") } else { (&mut b, "a") };
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let killed_at = Instant::now();
    let before = rx.webhook().len();
    let started = Instant::now();
    loop {
        let notes = rx.webhook();
        if notes[before..].iter().any(|n| replica_of(n) == standby) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the standby never took over: {:?}",
            notes.iter().map(replica_of).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = killed_at.elapsed();
    // Lease duration, plus one renew period (a third of it), plus a poll and
    // the webhook's delivery, with room for a machine busy compiling.
    let bound = Duration::from_secs(LEASE_SECONDS) + Duration::from_secs(LEASE_SECONDS) / 3 + Duration::from_secs(5);
    assert!(took <= bound, "takeover took {took:?}, more than {bound:?}");
    let after: Vec<String> = rx.webhook()[before..].iter().map(replica_of).collect();
    assert!(
        after.iter().all(|r| r == standby),
        "only the new leader sends: {after:?}"
    );
}

/// How many messages a replica's redrives of `orders` settled, from its /metrics.
async fn settled_by(replica: &Serve) -> u64 {
    let (_, text) = replica.get("/metrics").await;
    text.lines()
        .find(|l| l.starts_with(r#"dlq_bridge_redrive_messages_total{queue="orders",outcome="settled"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How many scheduled runs a replica has started, from its /v1/runs.
async fn scheduled_runs(replica: &Serve) -> usize {
    let (_, text) = replica.get("/v1/runs?limit=10000").await;
    let runs: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    runs.as_array()
        .map_or(0, |runs| runs.iter().filter(|r| r["trigger"] == "schedule").count())
}

/// Both replicas carry the same schedule (every second, every message), and
/// only the leader runs it: each message is redriven once, by one replica.
/// When the leader dies, the standby takes the schedule over.
#[tokio::test]
async fn only_the_leader_runs_schedules_and_the_standby_takes_them_over() {
    let kubeconfig = kubeconfig();
    let f = SqsFixture::create(false).await;
    let lease = common::unique("dlqb-lease");
    let schedule = "redrive:\n  hold: 5s\nschedules:\n  - queue: orders\n    every: 1s\n    filter: \"true\"\n";
    let config = |replica: &str| replica_config(&f, &lease, replica, "1h", schedule);
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let mut a = Serve::start_with_env(&config("a"), &env).await;
    let mut b = Serve::start_with_env(&config("b"), &env).await;
    let batch = |tag: &str| -> Vec<TestMessage> {
        (0..3)
            .map(|i| TestMessage {
                body: format!("{tag}-{i}").into_bytes(),
                attributes: attrs(&[("error", "Timeout")]),
                ordering_key: None,
            })
            .collect()
    };
    let moved = |want: usize| {
        let f = &f;
        async move {
            let mut got = Vec::new();
            let started = Instant::now();
            while got.len() < want {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the schedule moved {} of {want}",
                    got.len()
                );
                got.extend(f.drain_source().await.into_iter().map(|r| r.body));
            }
            got.sort();
            got
        }
    };

    let first = batch("first");
    f.put_in_dlq(&first).await;
    let first: Vec<Vec<u8>> = first.into_iter().map(|m| m.body).collect();
    assert_eq!(moved(3).await, first, "each message once");
    let (sent_a, sent_b) = (settled_by(&a).await, settled_by(&b).await);
    assert!(
        (sent_a, sent_b) == (3, 0) || (sent_a, sent_b) == (0, 3),
        "one replica ran the schedule: a settled {sent_a}, b settled {sent_b}"
    );
    let (runs_a, runs_b) = (scheduled_runs(&a).await, scheduled_runs(&b).await);
    assert!(
        (runs_a > 0) != (runs_b > 0),
        "only one replica starts scheduled runs: a {runs_a}, b {runs_b}"
    );

    // Kill the leader without a chance to hand the lease over. A receive it
    // had out may still take the next messages (a long poll the server
    // answers after the client died): they come back once the hold (5 s)
    // lapses, as on SQS.
    let (dead, standby) = if sent_a == 3 { (&mut a, &b) } else { (&mut b, &a) };
    assert_eq!(scheduled_runs(standby).await, 0, "the standby started none");
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let second = batch("second");
    f.put_in_dlq(&second).await;
    let second: Vec<Vec<u8>> = second.into_iter().map(|m| m.body).collect();
    assert_eq!(moved(3).await, second, "each message once, by the new leader");
    assert_eq!(settled_by(standby).await, 3, "the standby took the schedule over");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(f.drain_source().await.is_empty(), "nothing was moved twice");
    assert_eq!(f.dlq_count().await, 0);
}

/// The holder of `lease` on the test API server, as it stands.
async fn lease_holder(lease: &str) -> Option<String> {
    use k8s_openapi::api::coordination::v1::Lease;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig()).expect("read the test kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("a client config from the test kubeconfig");
    let client = kube::Client::try_from(config).expect("a client for the test API server");
    let leases: kube::Api<Lease> = kube::Api::namespaced(client, "default");
    leases
        .get_opt(lease)
        .await
        .expect("read the Lease")
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Wait until `lease` is held by one of the replicas, and say by which
/// (`a` or `b`).
async fn leader_of(lease: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(h) = lease_holder(lease).await {
            return h.trim_start_matches("replica-").to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "nobody took the Lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A daily cron slot (UTC, with seconds) `ahead` from now, and the schedule
/// config that redrives every message of `orders` at it.
fn cron_slot(ahead: Duration) -> (chrono::DateTime<chrono::Utc>, String) {
    use chrono::Timelike;
    let at = chrono::Utc::now() + chrono::Duration::from_std(ahead).unwrap();
    let at = at.with_nanosecond(0).unwrap() + chrono::Duration::seconds(1);
    let schedule = format!(
        "redrive:\n  hold: 5s\nschedules:\n  - queue: orders\n    cron: \"{} {} {} * * *\"\n    filter: \"true\"\n",
        at.second(),
        at.minute(),
        at.hour()
    );
    (at, schedule)
}

async fn sleep_until_wall(at: chrono::DateTime<chrono::Utc>) {
    if let Ok(d) = (at - chrono::Utc::now()).to_std() {
        tokio::time::sleep(d).await;
    }
}

fn one_message(tag: &str) -> Vec<TestMessage> {
    vec![TestMessage {
        body: tag.as_bytes().to_vec(),
        attributes: attrs(&[("error", "Timeout")]),
        ordering_key: None,
    }]
}

/// The leader dies just before a cron slot; the standby takes the Lease over
/// only after the slot has passed. Nobody ran the slot (the Lease's record
/// says so), so the new leader runs it when it takes over, once.
#[tokio::test]
async fn a_cron_slot_that_falls_during_the_hand_over_runs_on_the_new_leader() {
    let kubeconfig = kubeconfig();
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&one_message("missed")).await;
    let lease = common::unique("dlqb-lease");
    let (slot, schedule) = cron_slot(Duration::from_secs(12));
    let config = |replica: &str| replica_config(&f, &lease, replica, "1h", &schedule);
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let mut a = Serve::start_with_env(&config("a"), &env).await;
    let mut b = Serve::start_with_env(&config("b"), &env).await;
    let leader = leader_of(&lease).await;
    let (dead, standby) = if leader == "a" { (&mut a, &b) } else { (&mut b, &a) };

    // Killed 1.5 s before the slot: the Lease moves some 4 to 6.7 s later.
    sleep_until_wall(slot - chrono::Duration::milliseconds(1500)).await;
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    sleep_until_wall(slot).await;
    assert_ne!(
        lease_holder(&lease).await.as_deref(),
        Some(format!("replica-{}", if leader == "a" { "b" } else { "a" }).as_str()),
        "the standby must take over after the slot for this test to mean anything"
    );

    let mut got = Vec::new();
    let started = Instant::now();
    while got.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "the slot that fell during the hand-over never ran"
        );
        got.extend(f.drain_source().await.into_iter().map(|r| r.body));
    }
    assert_eq!(got, [b"missed".to_vec()]);
    assert_eq!(scheduled_runs(standby).await, 1, "caught up once");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(scheduled_runs(standby).await, 1, "and only once");
    assert_eq!(f.dlq_count().await, 0);
}

/// A lone leader restarted across a cron slot (killed just before it, back
/// just after it) takes the Lease that still names it at once, which can be
/// before its schedule first looks at who leads: it catches the slot up all
/// the same, once.
#[tokio::test]
async fn a_leader_restarted_across_a_cron_slot_catches_it_up() {
    let kubeconfig = kubeconfig();
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&one_message("missed")).await;
    let lease = common::unique("dlqb-lease");
    let (slot, schedule) = cron_slot(Duration::from_secs(8));
    let config = replica_config(&f, &lease, "a", "1h", &schedule);
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let mut a = Serve::start_with_env(&config, &env).await;
    assert_eq!(leader_of(&lease).await, "a");
    sleep_until_wall(slot - chrono::Duration::milliseconds(1500)).await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    sleep_until_wall(slot + chrono::Duration::seconds(1)).await;
    assert_eq!(f.dlq_count().await, 1, "nobody ran the slot");
    let a = Serve::start_with_env(&config, &env).await;

    let mut got = Vec::new();
    let started = Instant::now();
    while got.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the slot missed while the leader restarted never ran"
        );
        got.extend(f.drain_source().await.into_iter().map(|r| r.body));
    }
    assert_eq!(got, [b"missed".to_vec()]);
    assert_eq!(scheduled_runs(&a).await, 1, "caught up once");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(scheduled_runs(&a).await, 1, "and only once");
    assert_eq!(f.dlq_count().await, 0);
}

/// The leader runs a cron slot and dies right after; the standby that takes
/// the Lease over learns from it that the slot was started, and does not run
/// it again.
#[tokio::test]
async fn a_cron_slot_the_dead_leader_ran_is_not_run_again_by_the_new_leader() {
    let kubeconfig = kubeconfig();
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&one_message("first")).await;
    let lease = common::unique("dlqb-lease");
    let (slot, schedule) = cron_slot(Duration::from_secs(10));
    let config = |replica: &str| replica_config(&f, &lease, replica, "1h", &schedule);
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let mut a = Serve::start_with_env(&config("a"), &env).await;
    let mut b = Serve::start_with_env(&config("b"), &env).await;
    let leader = leader_of(&lease).await;
    let (dead, standby, standby_name) = if leader == "a" {
        (&mut a, &b, "replica-b")
    } else {
        (&mut b, &a, "replica-a")
    };

    sleep_until_wall(slot).await;
    let mut got = Vec::new();
    let started = Instant::now();
    while got.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the leader never ran its slot"
        );
        got.extend(f.drain_source().await.into_iter().map(|r| r.body));
    }
    assert_eq!(got, [b"first".to_vec()]);
    // What a second run of the slot would move.
    f.put_in_dlq(&one_message("second")).await;
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let killed = Instant::now();
    while lease_holder(&lease).await.as_deref() != Some(standby_name) {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the standby never took over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        scheduled_runs(standby).await,
        0,
        "the new leader did not run the slot again"
    );
    assert!(f.drain_source().await.is_empty());
    assert_eq!(f.dlq_count().await, 1);
}

/// A retention alert the dead leader sent as firing is resolved by the new
/// leader once the expired messages are gone: the Lease tells the standby
/// what fired (only the leader checks retention, so the standby cannot know
/// otherwise), and a webhook hears the end of it, not only Alertmanager.
#[tokio::test]
async fn the_new_leader_resolves_a_retention_alert_its_predecessor_sent() {
    let kubeconfig = kubeconfig();
    let f = SqsFixture::create(false).await;
    f.put_in_dlq(&one_message("old")).await;
    let (rx, base) = Receiver::start().await;
    let lease = common::unique("dlqb-lease");
    let config = |replica: &str| {
        let alerts =
            format!("alerts:\n  sinks:\n    - webhook: {{url: \"{base}/webhook\", labels: {{replica: {replica}}}}}\n");
        replica_config(&f, &lease, replica, "1h", &alerts).replacen(
            "      region: us-east-1\n",
            "      region: us-east-1\n    retention: {max_age: 1s, action: alert, check_every: 1s}\n",
            1,
        )
    };
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let mut a = Serve::start_with_env(&config("a"), &env).await;
    let mut b = Serve::start_with_env(&config("b"), &env).await;
    let retention = |status: &str| {
        rx.webhook()
            .into_iter()
            .filter(|n| n["rule"] == "retention" && n["status"] == status)
            .map(|n| replica_of(&n))
            .collect::<Vec<_>>()
    };
    a.wait_for(Duration::from_secs(30), || async { !retention("firing").is_empty() })
        .await;
    let leader = retention("firing")[0].clone();
    // Let a renewal carry the alert into the Lease (it is written at once;
    // this is slack for the call).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (dead, standby, name) = if leader == "a" {
        (&mut a, &b, "b")
    } else {
        (&mut b, &a, "a")
    };
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    f.client
        .purge_queue()
        .queue_url(&f.dlq_url)
        .send()
        .await
        .expect("purge the DLQ");

    standby
        .wait_for(Duration::from_secs(30), || async { !retention("resolved").is_empty() })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        retention("resolved"),
        vec![name.to_string()],
        "the new leader resolves it, once"
    );
}
