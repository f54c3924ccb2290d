//! The engine: everything dlq-bridge *does* to a DLQ, provider-neutral and
//! generic over [`crate::backend::QueueBackend`]. Redrive, purge, export and
//! import all run here, once, for every provider (DESIGN §2, §3); the command
//! line and the sidecar only build requests for it and show its results.
//!
//! Layering: `engine` uses `backend`, `config`, `filter` and `model`, never
//! `sidecar` or `cli`.

mod held;
pub mod journal;
pub mod redrive;
pub mod registry;
pub mod triage;
