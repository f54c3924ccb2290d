//! `dlq-bridge list` over all three providers at once: SQS (moto), Pub/Sub
//! (Google's emulator) and Service Bus (the project's emulator), side by side
//! with depth and oldest age.
#![cfg(all(feature = "sqs", feature = "pubsub", feature = "servicebus"))]

mod common;

use std::process::Command;

use common::pubsub::PubSubFixture;
use common::servicebus::ServiceBusFixture;
use common::sqs::SqsFixture;
use common::{Fixture, TestMessage, attrs};
use dlq_bridge::config::{Config, QueueConfig};

fn renamed(config: Config, name: &str) -> QueueConfig {
    let mut q = config.queues.into_iter().next().expect("fixture queue");
    q.name = name.to_string();
    q
}

fn msgs(n: usize) -> Vec<TestMessage> {
    (0..n)
        .map(|i| TestMessage {
            body: format!(r#"{{"n":{i}}}"#).into_bytes(),
            attributes: attrs(&[("error", "Timeout")]),
            ordering_key: None,
        })
        .collect()
}

#[tokio::test]
async fn list_shows_every_provider_side_by_side() {
    let sqs = SqsFixture::create(false).await;
    let pubsub = PubSubFixture::create(false).await;
    let servicebus = ServiceBusFixture::create(false).await;
    sqs.dead_letter(&msgs(2)).await;
    pubsub.dead_letter(&msgs(3)).await;
    servicebus.dead_letter(&msgs(4)).await;

    let mut config = sqs.config();
    config.queues = vec![
        renamed(sqs.config(), "orders-sqs"),
        renamed(pubsub.config(), "orders-pubsub"),
        renamed(servicebus.config(), "orders-servicebus"),
    ];
    let path = std::env::temp_dir().join(format!("dlqb-list-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .arg("--config")
        .arg(&path)
        .args(["list", "-o", "json"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for (queue, backend, depth) in [
        ("orders-sqs", "sqs", 2),
        ("orders-pubsub", "pubsub", 3),
        ("orders-servicebus", "servicebus", 4),
    ] {
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["queue"] == queue)
            .unwrap_or_else(|| panic!("{queue} listed: {stdout}"));
        assert_eq!(row["backend"], backend, "{row}");
        assert_eq!(row["depth"], depth, "{row}");
        assert!(row["oldest_age"].as_f64().is_some(), "{queue} has an oldest age: {row}");
        assert_eq!(row["top_reasons"][0][0], "Timeout", "{row}");
    }

    let table = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
        .arg("--config")
        .arg(&path)
        .arg("list")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8_lossy(&table.stdout);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header[..3], ["QUEUE", "BACKEND", "DEPTH"], "{table}");
    for (queue, backend, depth) in [
        ("orders-sqs", "sqs", "2"),
        ("orders-pubsub", "pubsub", "3"),
        ("orders-servicebus", "servicebus", "4"),
    ] {
        let row: Vec<&str> = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.first() == Some(&queue))
            .unwrap_or_else(|| panic!("{queue} listed: {table}"));
        assert_eq!(row[1..3], [backend, depth], "{table}");
    }
}
