//! dlq-bridge: one interface over the dead-letter queues of AWS SQS, Google
//! Cloud Pub/Sub and Azure Service Bus. See DESIGN.md for the architecture.

pub mod alert;
pub mod backend;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod journal;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod output;
pub mod poller;
pub mod redrive;
pub mod registry;
pub mod serve;
pub mod server;
pub mod triage;
