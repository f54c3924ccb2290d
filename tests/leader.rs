//! Two `serve` replicas share a coordination.k8s.io/v1 Lease on a real
//! kube-apiserver (scripts/kube.sh): exactly one sends alerts, and when it is
//! killed the other takes over within the lease duration and sends the next.
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
fn kubeconfig() -> String {
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
        format!(
            "queues:\n  - name: orders\n    sqs:\n      queue: {}\n      endpoint_url: {}\n      region: us-east-1\nserve:\n  listen: \"{{listen}}\"\n  poll_interval: 1s\n  reason_sample: 0\n  leader_election:\n    enabled: true\n    lease_name: {lease}\n    namespace: default\n    identity: replica-{replica}\n    lease_duration: {LEASE_SECONDS}s\nalerts:\n  rules:\n    - depth_above: 0\n      repeat: 2s\n  sinks:\n    - webhook: {{url: \"{base}/webhook\", labels: {{replica: {replica}}}}}\n",
            f.dlq_url, f.endpoint
        )
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
    // Lease duration, plus one renew period (a third of it), plus one poll.
    let bound = Duration::from_secs(LEASE_SECONDS) + Duration::from_secs(LEASE_SECONDS) / 3 + Duration::from_secs(2);
    assert!(took <= bound, "takeover took {took:?}, more than {bound:?}");
    let after: Vec<String> = rx.webhook()[before..].iter().map(replica_of).collect();
    assert!(
        after.iter().all(|r| r == standby),
        "only the new leader sends: {after:?}"
    );
}
