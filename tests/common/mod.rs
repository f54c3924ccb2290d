//! Shared test harness: emulator processes and the backend fixtures the
//! conformance suite runs against. Everything talks to real emulators over real
//! connections; a missing emulator fails the test, it never skips it.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod emulator;
pub mod faultproxy;
#[cfg(feature = "pubsub")]
pub mod pubsub;
pub mod serve;
#[cfg(feature = "servicebus")]
pub mod servicebus;
#[cfg(feature = "sqs")]
pub mod sqs;
pub mod tls;
pub mod webdriver;

use std::sync::Arc;

use async_trait::async_trait;
use dlq_bridge::config::Config;
use dlq_bridge::engine::redrive::{Engine, RunSummary, Trigger};
use dlq_bridge::engine::registry::{RedriveRequest, Registry};
use dlq_bridge::model::Attributes;

/// A message a test makes fail into a DLQ.
#[derive(Debug, Clone, Default)]
pub struct TestMessage {
    pub body: Vec<u8>,
    pub attributes: Attributes,
    /// FIFO group, ordering key or session.
    pub ordering_key: Option<String>,
}

/// A message as it arrived at the redrive destination, read with the
/// provider's own SDK, not through dlq-bridge.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub attributes: Attributes,
    pub ordering_key: Option<String>,
}

/// One backend's emulator-side set-up for the conformance suite: a source
/// entity and its DLQ, filled and read with the provider's SDK.
#[async_trait]
pub trait Fixture: Send + Sync + Sized {
    /// Create a fresh source and DLQ (unique names). `ordered` asks for the
    /// provider's ordering feature (SQS FIFO, ordering keys, sessions).
    async fn create(ordered: bool) -> Self;

    /// The dlq-bridge config managing this fixture's DLQ as queue `dlq`.
    fn config(&self) -> Config;

    /// Make messages fail into the DLQ the way production does (receive
    /// count, nacks, abandons...). `reason` becomes the failure reason.
    async fn dead_letter(&self, msgs: &[TestMessage]);

    /// Put messages into the DLQ directly, for payloads too large or numerous
    /// for the failure route. Backends where that is impossible dead-letter them.
    async fn put_in_dlq(&self, msgs: &[TestMessage]);

    /// Fill the DLQ with ordered messages, keeping each group's order: the
    /// failure route where it keeps order, else a direct put.
    async fn fill_dlq_in_order(&self, msgs: &[TestMessage]) {
        self.dead_letter(msgs).await;
    }

    /// Read and remove everything that arrived at the source.
    async fn drain_source(&self) -> Vec<Received>;

    /// How many messages the DLQ holds (exact: read with the SDK).
    async fn dlq_count(&self) -> usize;

    /// Attributes in the provider's own types, for the byte-for-byte test:
    /// each must come back with the same value and, where set, `data_type`.
    /// The default is SQS-flavoured (a 38-digit number, binary, a custom type label).
    fn typed_attributes() -> Attributes {
        use bytes::Bytes;
        use dlq_bridge::model::{AttrValue, Attribute};
        let mut typed = Attributes::new();
        typed.insert(
            "n".into(),
            Attribute {
                value: AttrValue::Number("12345678901234567890.125".into()),
                data_type: Some("Number".into()),
            },
        );
        typed.insert(
            "blob".into(),
            Attribute {
                value: AttrValue::Binary(Bytes::from_static(&[0, 1, 2, 254, 255])),
                data_type: Some("Binary".into()),
            },
        );
        typed.insert(
            "custom".into(),
            Attribute {
                value: AttrValue::String("v1".into()),
                data_type: Some("String.schema".into()),
            },
        );
        typed
    }
}

pub fn registry(config: Config) -> Arc<Registry> {
    Arc::new(Registry::new(config))
}

/// Run a redrive of queue `dlq` the way the CLI does (same planning path).
pub async fn redrive(config: Config, req: RedriveRequest) -> RunSummary {
    redrive_on(&registry(config), req).await
}

/// The same, on a registry that keeps its backends from run to run, as a
/// long-lived process (`serve`) does.
pub async fn redrive_on(reg: &Registry, req: RedriveRequest) -> RunSummary {
    let plan = reg.plan("dlq", &req, Trigger::Cli).await.expect("plan");
    let backend = reg.backend("dlq").await.expect("backend");
    Engine::new(backend).run(&plan).await.expect("run")
}

pub fn attrs(pairs: &[(&str, &str)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), dlq_bridge::model::Attribute::string(*v)))
        .collect()
}

/// `n` messages with bodies of about `size` bytes (numbered, so each is
/// distinct) and the reason attribute `error: Timeout`: for the tests of
/// what a read holds in memory.
pub fn large_messages(n: usize, size: usize) -> Vec<TestMessage> {
    let body = "x".repeat(size);
    (0..n)
        .map(|i| TestMessage {
            body: format!("{i:04}{body}").into_bytes(),
            attributes: attrs(&[("error", "Timeout")]),
            ordering_key: None,
        })
        .collect()
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Runs `cmd` and returns its exit code, stdout, stderr and peak RSS in
/// KiB: its VmHWM, read from `/proc` every few milliseconds until it exits
/// (`ru_maxrss` would count the test binary's own RSS from before the exec).
pub fn run_measured(cmd: &mut std::process::Command) -> (i32, String, String, i64) {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dlq-bridge");
    let read_all = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("stdout piped")));
    let stderr = read_all(Box::new(child.stderr.take().expect("stderr piped")));
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        // Once it is a zombie the file has no VmHWM: the last read stands.
        if let Some(hwm) = std::fs::read_to_string(&status_file).ok().and_then(|s| vm_hwm_kib(&s)) {
            peak = peak.max(hwm);
        }
        std::thread::sleep(std::time::Duration::from_millis(3));
    };
    (
        status.code().unwrap_or(-1),
        stdout.join().unwrap(),
        stderr.join().unwrap(),
        peak,
    )
}

/// The VmHWM line of a `/proc/PID/status`, in KiB.
pub fn vm_hwm_kib(status: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
