//! The `redrive` and `schedules` sections, and where state lives when the
//! config names no place.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::default_true;
use super::durations::{duration_text, opt_duration_text};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveConfig {
    /// Send batches in flight at once (a batch gives its slot back once its
    /// copies are confirmed, while its originals are settled); also caps the
    /// leases in flight (each provider sets its own cap below this). From 1
    /// to 256 (`MAX_CONCURRENCY`); default 16.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long a lease hides a message. Messages a pass holds (non-matching
    /// ones) are released together when it ends; a pass that outlasts this
    /// extends them every third of it, so they do not come back mid-pass
    /// (Pub/Sub caps it at 600 s; Service Bus holds for the entity's
    /// LockDuration whatever this says). At least `1s`; default `5m`.
    #[serde(default = "default_hold", with = "duration_text")]
    pub hold: Duration,
    /// A run stops after this long, releasing what it holds. Default `1h`.
    #[serde(default = "default_deadline", with = "duration_text")]
    pub deadline: Duration,
    /// A pass keeps every message it leased and did not move leased until it
    /// ends (so that it never sees one twice). Past this many it stops
    /// leasing and ends (`held_limit`): memory stays bounded whatever the
    /// DLQ's size, and below SQS's 120,000 in-flight messages per queue.
    /// Messages past them are not examined: narrow the filter, or raise it.
    /// At least 1; default 100,000.
    #[serde(default = "default_max_held")]
    pub max_held: usize,
    /// Messages already redriven this many times are left in the DLQ, so a
    /// poison message cannot loop forever. Default 5.
    #[serde(default = "default_max_redrives")]
    pub max_redrives: u32,
    /// Remove the attributes the provider adds when it dead-letters a message
    /// (CloudPubSubDeadLetter*, DeadLetterReason...). Default true.
    #[serde(default = "default_true")]
    pub strip_dead_letter_attributes: bool,
    /// Default messages per second for a redrive, when `--rate` is not given:
    /// at least 1. Unset means unlimited.
    #[serde(default)]
    pub rate: Option<u32>,
    /// The journal file: audit trail and crash record. Default:
    /// `journal.jsonl` in `serve.data_dir` when that is set, else in
    /// `$XDG_STATE_HOME/dlq-bridge`; the CLI and `serve` use the same one.
    /// With several replicas on one claim, leave it unset: each pod then
    /// journals in its own data directory.
    #[serde(default)]
    pub journal: Option<PathBuf>,
    /// The journal is rotated past this size (bytes). Default 64 MiB.
    #[serde(default = "default_journal_max_bytes")]
    pub journal_max_bytes: u64,
    /// Rotated journal files kept (`journal.jsonl.1` ... `.N`). Default 5.
    /// Together with `journal_max_bytes` this bounds memory too: a message
    /// moved is remembered (about 100 bytes) until rotation deletes its
    /// record, so that a settle that did not take effect is retried rather
    /// than the message resent.
    #[serde(default = "default_journal_keep")]
    pub journal_keep: usize,
}

/// Where dlq-bridge keeps its state (journal, backups, exports) when the
/// config names no place: `$XDG_STATE_HOME/dlq-bridge`, else
/// `~/.local/state/dlq-bridge`.
pub fn state_dir() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("dlq-bridge"))
}

fn default_journal_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_journal_keep() -> usize {
    5
}

impl Default for RedriveConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            hold: default_hold(),
            deadline: default_deadline(),
            max_held: default_max_held(),
            max_redrives: default_max_redrives(),
            strip_dead_letter_attributes: true,
            rate: None,
            journal: None,
            journal_max_bytes: default_journal_max_bytes(),
            journal_keep: default_journal_keep(),
        }
    }
}

/// The most send batches a run keeps in flight. Each holds up to a batch of
/// copies (10 MiB of bodies on SQS), so a larger number only buys memory and
/// the providers' throttling; it also keeps a mistyped `concurrency` from
/// sizing the engine's semaphores past what they take.
pub const MAX_CONCURRENCY: usize = 256;

fn default_concurrency() -> usize {
    16
}
fn default_hold() -> Duration {
    Duration::from_secs(300)
}
fn default_deadline() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_held() -> usize {
    100_000
}
fn default_max_redrives() -> u32 {
    5
}

/// A redrive `serve` runs by itself.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub queue: String,
    /// Run every so often (`15m`). Set this or `cron`.
    #[serde(default, with = "opt_duration_text")]
    pub every: Option<Duration>,
    /// A cron expression (`0 */2 * * *`, UTC). Set this or `every`.
    #[serde(default)]
    pub cron: Option<String>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub max: Option<u64>,
    #[serde(default)]
    pub rate: Option<u32>,
    #[serde(default)]
    pub dry_run: bool,
}
