//! `dlq-bridge serve`: the long-running sidecar. It polls every DLQ, exports
//! Prometheus metrics, evaluates alert rules and notifies sinks, elects a
//! leader over a Kubernetes Lease, runs scheduled redrives and serves the
//! local HTTP API (DESIGN §5).
//!
//! Layering: `sidecar` uses `engine`, `output` and everything below them,
//! never `cli`.

pub mod alert;
pub mod api;
pub mod app;
pub mod dashboard;
pub mod exclusion;
pub mod guard;
pub mod history;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod poller;
pub mod serve;
