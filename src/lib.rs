//! dlq-bridge: one interface over the dead-letter queues of AWS SQS, Google
//! Cloud Pub/Sub and Azure Service Bus. See DESIGN.md for the architecture.
//!
//! The modules are layered; each uses only the ones listed after it:
//!
//! | layer | owns |
//! |---|---|
//! | [`cli`] | the command line: argument parsing, one file per command family, exit codes |
//! | [`sidecar`] | `serve`: poller, metrics, alerts and sinks, leader election, the HTTP API |
//! | [`output`] | how messages, queues and run summaries are shown, as tables or JSON |
//! | [`engine`] | redrive, purge, export, import, report: the policy, once for every provider |
//! | [`backend`] | one adapter per provider behind `QueueBackend`: translation, no policy |
//! | [`config`] | the typed YAML configuration |
//! | [`filter`] | CEL filters over the message model |
//! | [`model`] | the provider-neutral message model |

// Command output goes through `cli`'s `out!`/`outln!`: `print!` panics when
// the reader has gone (`dlq-bridge ... | head`).
#![deny(clippy::print_stdout)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod engine;
pub mod filter;
/// Entry points for the fuzz targets (`fuzz/`) and their corpus replay; not
/// part of the product.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod model;
pub mod output;
pub mod sidecar;
