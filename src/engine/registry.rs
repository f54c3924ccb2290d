//! The queues registry: the app core that the CLI, the HTTP API and the
//! scheduler share (DESIGN §2). It owns the config, connects backends lazily
//! (once each), and turns redrive requests into validated plans, so every
//! trigger gets the same checks and defaults.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use tokio::sync::{Mutex, OnceCell, Semaphore};

use crate::backend::{self, BackendError, Purpose, QueueBackend};
use crate::config::{Config, MAX_CONCURRENCY, QueueConfig};
use crate::engine::redrive::{RedrivePlan, Trigger, new_run_id};
use crate::filter::{Filter, FilterError};
use crate::model::Destination;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown queue `{name}` (configured: {known})")]
    UnknownQueue { name: String, known: String },
    #[error(transparent)]
    Filter(#[from] FilterError),
    // Not a `#[source]`: the message already includes it, and anyhow's
    // chain would print it twice.
    #[error("queue {queue}: {error}")]
    Backend { queue: String, error: BackendError },
    #[error("{0}")]
    Invalid(String),
    /// The redrive's destination (`--to`, `to` over HTTP, `import
    /// --address`: `flag` names which) could not be resolved. One the
    /// provider does not know or cannot take is the caller's mistake; an
    /// unreachable one is not.
    #[error("{flag} {to}: {error}")]
    Destination {
        flag: &'static str,
        to: String,
        error: BackendError,
    },
    /// The queue's configured `source` could not be resolved: one the
    /// provider does not know is a mistake in the config.
    // `name`, not `source`: thiserror would take a `source` field for the
    // error's cause.
    #[error("queue {queue}: source {name}: {error}")]
    Source {
        queue: String,
        name: String,
        error: BackendError,
    },
}

impl RegistryError {
    /// Errors the user can fix in their input (exit code 2), as opposed to
    /// failures at run time (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::UnknownQueue { .. } | Self::Filter(_) | Self::Invalid(_))
            || matches!(
                self,
                Self::Destination {
                    error: BackendError::NotFound { .. } | BackendError::Invalid(_),
                    ..
                } | Self::Source {
                    error: BackendError::NotFound { .. } | BackendError::Invalid(_),
                    ..
                }
            )
    }
}

/// The queue's configured `source`, resolved by its backend (None when it
/// has none). What a redrive sends to without `--to`, and what `check` looks
/// up: one that does not exist is a mistake in the config.
pub async fn configured_source(
    queue: &QueueConfig,
    backend: &dyn QueueBackend,
) -> Result<Option<Destination>, RegistryError> {
    let Some(source) = &queue.source else {
        return Ok(None);
    };
    backend
        .resolve_destination(source)
        .await
        .map(Some)
        .map_err(|error| RegistryError::Source {
            queue: queue.name.clone(),
            name: source.clone(),
            error,
        })
}

/// What a caller asks of a redrive; unset fields take the config's defaults.
#[derive(Debug, Clone, Default)]
pub struct RedriveRequest {
    pub filter: Option<String>,
    pub to: Option<String>,
    /// `to` is a provider address even when a configured queue has that name
    /// (`import --address`); otherwise a queue's name means its source.
    pub to_is_address: bool,
    pub dry_run: bool,
    pub rate: Option<u32>,
    pub max: Option<u64>,
    pub concurrency: Option<usize>,
}

pub struct Registry {
    config: Arc<Config>,
    /// Each queue's backend, once connected. A cell per queue: two callers
    /// that first need a queue at once (the sidecar's first poll and an API
    /// redrive) share one connect instead of making two adapters (a second
    /// Service Bus link, lease order and lock state of its own).
    backends: Mutex<HashMap<String, Arc<BackendCell>>>,
    /// Provider clients, shared by the queues that can use the same one.
    clients: backend::SharedClients,
    /// Bounds the connects in flight. `serve` polls every queue at start-up;
    /// unbounded, a thousand queues connect at once, each connect future and
    /// its own pooled HTTP connection alive together (heaptrack, 1,000 SQS
    /// queues: 19 MiB of futures and 1,029 connections at the peak).
    connects: Semaphore,
}

/// A queue's backend, connected by the first caller that needs it.
type BackendCell = OnceCell<Arc<dyn QueueBackend>>;

/// Connects in flight at once: enough that start-up is bound by the
/// admin-call limits rather than by connects.
const MAX_CONCURRENT_CONNECTS: usize = 16;

impl Registry {
    pub fn new(config: Config) -> Self {
        Self {
            config: Arc::new(config),
            backends: Mutex::new(HashMap::new()),
            clients: backend::SharedClients::default(),
            connects: Semaphore::new(MAX_CONCURRENT_CONNECTS),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn queue(&self, name: &str) -> Result<&QueueConfig, RegistryError> {
        self.config.queue(name).ok_or_else(|| RegistryError::UnknownQueue {
            name: name.to_string(),
            known: if self.config.queues.is_empty() {
                "none".into()
            } else {
                self.config
                    .queues
                    .iter()
                    .map(|q| q.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    pub async fn backend(&self, name: &str) -> Result<Arc<dyn QueueBackend>, RegistryError> {
        self.backend_for(name, Purpose::Inspect).await
    }

    /// The queue's backend, connected for `purpose` if it is not connected
    /// yet (a backend connected once serves every purpose after).
    async fn backend_for(&self, name: &str, purpose: Purpose) -> Result<Arc<dyn QueueBackend>, RegistryError> {
        let queue = self.queue(name)?;
        let cell = self.backends.lock().await.entry(name.to_string()).or_default().clone();
        // A connect that failed leaves the cell empty: the next caller tries again.
        let b = cell
            .get_or_try_init(|| async {
                let _permit = self.connects.acquire().await.expect("the semaphore is never closed");
                // Boxed: the SDKs' connect futures are large, and unboxed they would be
                // inlined into every caller's state, including each queue's polling
                // task for its whole life (about 23 KiB per queue, measured with heaptrack).
                Box::pin(backend::connect_shared(queue, &self.clients, purpose))
                    .await
                    .map_err(|error| RegistryError::Backend {
                        queue: name.to_string(),
                        error,
                    })
            })
            .await?;
        Ok(b.clone())
    }

    /// Validate a request and resolve everything a run needs, before any
    /// message is touched: a bad filter or destination fails here.
    pub async fn plan(
        &self,
        queue: &str,
        req: &RedriveRequest,
        trigger: Trigger,
    ) -> Result<RedrivePlan, RegistryError> {
        let qcfg = self.queue(queue)?;
        // The CLI and the config refuse these already; the HTTP API passes
        // what it is sent.
        let filter = match &req.filter {
            Some(f) if f.trim().is_empty() => {
                return Err(RegistryError::Invalid(
                    "the filter is empty: leave it out to select every message".into(),
                ));
            }
            Some(f) => Filter::compile(f)?,
            None => Filter::match_all(),
        };
        if req.to.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(RegistryError::Invalid(
                "the destination is empty: leave it out to send each message back to its source".into(),
            ));
        }
        let rate = match req.rate.or(self.config.redrive.rate) {
            None => None,
            Some(r) => Some(NonZeroU32::new(r).ok_or_else(|| {
                RegistryError::Invalid(
                    "the rate must be at least 1 message per second; leave it out for no limit".into(),
                )
            })?),
        };
        if req.max == Some(0) {
            return Err(RegistryError::Invalid(
                "max must be at least 1; leave it out for no cap".into(),
            ));
        }
        let concurrency = req.concurrency.unwrap_or(self.config.redrive.concurrency);
        if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
            return Err(RegistryError::Invalid(format!(
                "concurrency must be from 1 to {MAX_CONCURRENCY}"
            )));
        }
        let backend = self.backend_for(queue, Purpose::Pass).await?;
        backend.clone().prepare_lease();
        let to = async {
            let Some(t) = &req.to else { return Ok(None) };
            let configured = match req.to_is_address {
                true => None,
                false => self.configured_destination(queue, t).await?,
            };
            let dest = match configured {
                // Resolved by the other queue's backend, but sent by this one.
                Some(dest) => backend.check_send_to(&dest).map(|()| dest),
                None => backend.resolve_destination(t).await,
            };
            dest.map(Some).map_err(|error| RegistryError::Destination {
                flag: "--to",
                to: t.clone(),
                error,
            })
        };
        let fallback_source = async {
            match &qcfg.source {
                Some(_) => configured_source(qcfg, &*backend).await,
                None => backend.default_source().await.map_err(|error| RegistryError::Backend {
                    queue: queue.to_string(),
                    error,
                }),
            }
        };
        // Each may be a round trip to the provider, before the first lease.
        let (to, fallback_source) = tokio::join!(to, fallback_source);
        let (to, fallback_source) = (to?, fallback_source?);
        Ok(RedrivePlan {
            run_id: new_run_id(),
            queue: queue.to_string(),
            trigger,
            filter,
            to,
            fallback_source,
            dry_run: req.dry_run,
            rate,
            max: req.max,
            concurrency,
            hold: self.config.redrive.hold,
            deadline: self.config.redrive.deadline,
            max_held: self.config.redrive.max_held,
            max_redrives: self.config.redrive.max_redrives,
            strip_dead_letter_attributes: self.config.redrive.strip_dead_letter_attributes,
            action: crate::engine::redrive::Action::Redrive,
        })
    }

    /// `--to` naming another configured queue means that queue's source:
    /// where its own redrives go (`source` in its config, else what its
    /// provider reports), as `import --to` does. A DLQ itself is no place to
    /// send to (Service Bus refuses sends to `$DeadLetterQueue`, a Pub/Sub
    /// subscription takes none). `None`: `to` is no configured queue, but a
    /// provider address.
    async fn configured_destination(&self, queue: &str, to: &str) -> Result<Option<Destination>, RegistryError> {
        let Some(other) = self.config.queue(to) else {
            return Ok(None);
        };
        let (from, into) = (self.queue(queue)?.kind.backend_name(), other.kind.backend_name());
        if from != into {
            return Err(RegistryError::Invalid(format!(
                "destination {to}: that queue is on {into}, and a redrive from {queue} sends with {from}; name a queue on {from} or a {from} address"
            )));
        }
        let other_backend = self.backend_for(to, Purpose::Pass).await?;
        let source = match &other.source {
            Some(s) => other_backend.resolve_destination(s).await.map(Some),
            None => other_backend.default_source().await,
        };
        match source.map_err(|error| RegistryError::Destination {
            flag: "--to",
            to: to.to_string(),
            error,
        })? {
            Some(dest) => Ok(Some(dest)),
            None => Err(RegistryError::Invalid(format!(
                "destination {to}: its provider names no source for that queue; set `source` for it in the config, or name an address"
            ))),
        }
    }
}
