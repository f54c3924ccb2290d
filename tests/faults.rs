//! Fault injection (DESIGN §3, guarantees 1 and 2): the redrive process is
//! killed with SIGKILL at random points and resumed, over and over. Every
//! original message must end up in exactly one place, the source or the DLQ:
//! nothing lost, and with the journal nothing duplicated.
//!
//! `DLQ_BRIDGE_FAULT_KILLS` sets the kills per backend (quick default 50; the
//! long run in docs/reliability.md uses 200).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, TestMessage, attrs};
use dlq_bridge::redrive::MARK_ID;

const MESSAGES: usize = 40;

fn kills() -> usize {
    std::env::var("DLQ_BRIDGE_FAULT_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(50)
}

/// A small deterministic generator: failures must be reproducible from the seed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

fn write_config<F: Fixture>(f: &F) -> PathBuf {
    let mut config = f.config();
    // Killed runs leave their leases behind; short ones come back quickly.
    config.redrive.hold = Duration::from_secs(2);
    let path = std::env::temp_dir().join(format!("dlqb-faults-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

fn redrive_cmd(config: &PathBuf, journal: Option<&PathBuf>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"));
    c.arg("--config")
        .arg(config)
        .args(["redrive", "dlq", "--yes", "--rate", "60", "-o", "json"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match journal {
        Some(j) => c.arg("--journal").arg(j),
        None => c.arg("--no-journal"),
    };
    c
}

#[derive(Debug)]
#[allow(dead_code)] // printed with Debug
struct Outcome {
    kills: usize,
    lost: usize,
    /// Extra copies at the destination, whatever their marks.
    extra_copies: usize,
    /// Extra copies with a different `dlq-bridge-redrive-id`: duplicates a
    /// consumer deduping on the mark would still see.
    duplicated: usize,
}

/// Kill the redrive `kills` times, then let it finish; count what is where.
async fn kill_and_resume<F: Fixture>(kills: usize, journal: bool, seed: u64) -> Outcome {
    let f = F::create(false).await;
    let batch_of = |from: usize| -> Vec<TestMessage> {
        (from..from + MESSAGES)
            .map(|i| TestMessage {
                body: format!(r#"{{"seq":{i}}}"#).into_bytes(),
                attributes: attrs(&[("error", "Timeout")]),
                ordering_key: None,
            })
            .collect()
    };
    let mut msgs = batch_of(0);
    f.put_in_dlq(&msgs).await;
    let config = write_config(&f);
    let journal_path = journal
        .then(|| std::env::temp_dir().join(format!("dlqb-faults-{seed}-{}.jsonl", uuid::Uuid::new_v4().simple())));
    let mut rng = Lcg(seed);
    for _ in 0..kills {
        // Every kill lands on a run with work to do: refill a drained DLQ.
        if f.dlq_count().await == 0 {
            let more = batch_of(msgs.len());
            f.put_in_dlq(&more).await;
            msgs.extend(more);
        }
        let mut child = redrive_cmd(&config, journal_path.as_ref()).spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(100 + rng.next(900))).await;
        let _ = child.kill();
        let _ = child.wait();
    }
    // Resume until the DLQ is empty. Leases of killed runs expire after
    // `hold` (2 s), or after the provider's own lease when a run died between
    // receiving and extending it (Pub/Sub fixtures: a 10 s ack deadline). Some
    // providers count leased messages as absent, so the DLQ is only empty once
    // it stays empty past the longest lease.
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(2100)).await;
        if f.dlq_count().await == 0 {
            tokio::time::sleep(Duration::from_secs(11)).await;
            if f.dlq_count().await == 0 {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(300), "the DLQ never drained");
        let status = redrive_cmd(&config, journal_path.as_ref()).status().unwrap();
        assert!(status.code().is_some(), "a clean run exits normally");
    }
    let arrived = f.drain_source().await;
    let mut copies: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    for r in &arrived {
        let mark = r.attributes.get(MARK_ID).map(|a| a.as_text()).unwrap_or_default();
        copies.entry(r.body.clone()).or_default().push(mark);
    }
    let lost = msgs.iter().filter(|m| !copies.contains_key(&m.body)).count();
    let extra_copies = copies.values().map(|v| v.len() - 1).sum();
    let duplicated = copies
        .values()
        .map(|v| v.iter().collect::<std::collections::HashSet<_>>().len() - 1)
        .sum();
    let outcome = Outcome {
        kills,
        lost,
        extra_copies,
        duplicated,
    };
    eprintln!(
        "fault run ({}journal, seed {seed}): {outcome:?} journal={journal_path:?}",
        if journal { "" } else { "no " }
    );
    outcome
}

pub async fn kill9_with_journal_loses_and_duplicates_nothing<F: Fixture>(batch: usize) {
    let kills = kills();
    let o = kill_and_resume::<F>(kills, true, 0x5eed).await;
    assert_eq!(o.lost, 0, "{o:?}");
    // A kill inside a send can leave a copy the run never heard confirmed;
    // the resumed run sends it again under the same mark.
    assert_eq!(o.duplicated, 0, "{o:?}");
    assert!(o.extra_copies <= kills * batch, "{o:?}");
}

pub async fn kill9_without_journal_loses_nothing_and_bounds_duplicates<F: Fixture>(batch: usize) {
    let kills = (kills() / 5).max(5);
    let o = kill_and_resume::<F>(kills, false, 0xfa11).await;
    assert_eq!(o.lost, 0, "{o:?}");
    // A kill between a confirmed send and its delete can repeat at most the
    // batches in flight at that moment (concurrency 4).
    assert!(o.duplicated <= kills * batch * 4, "{o:?}");
}

macro_rules! faults {
    ($module:ident, $fixture:ty, $batch:expr) => {
        mod $module {
            #[tokio::test]
            async fn kill9_with_journal_loses_and_duplicates_nothing() {
                super::kill9_with_journal_loses_and_duplicates_nothing::<$fixture>($batch).await;
            }
            #[tokio::test]
            async fn kill9_without_journal_loses_nothing_and_bounds_duplicates() {
                super::kill9_without_journal_loses_nothing_and_bounds_duplicates::<$fixture>($batch).await;
            }
        }
    };
}

#[cfg(feature = "sqs")]
faults!(sqs, crate::common::sqs::SqsFixture, 10);
#[cfg(feature = "pubsub")]
faults!(pubsub, crate::common::pubsub::PubSubFixture, 100);
