//! The in-memory namespace: entities, message stores, locks and sequence numbers.

pub mod address;
pub mod codec;
mod store;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::watch;
use uuid::Uuid;

pub use address::{EntityPath, SubQueue};
pub use codec::{CodecError, ParsedMessage};
pub use store::{Acquired, Counts, EntityStatus, Outcome, ReceiveMode, StoreSettings};

use crate::topology::{EntitySettings, Topology};
use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the messaging entity '{0}' could not be found")]
    NotFound(String),
    #[error("the lock supplied is invalid: it has expired or the message was already settled")]
    LockLost,
    #[error("no deferred message with sequence number {0}")]
    MessageNotFound(i64),
    #[error("{0}")]
    NotAllowed(String),
    #[error(
        "The maximum entity size has been reached or exceeded for Queue: '{entity}'. Size of entity in bytes:{size}, Max entity size in bytes: {max}."
    )]
    QuotaExceeded { entity: String, size: usize, max: usize },
    #[error("the messaging entity '{0}' already exists")]
    Conflict(String),
    #[error("Messaging entity '{0}' is currently disabled.")]
    EntityDisabled(String),
    #[error(
        "The request was terminated because the entity '{0}' is being throttled. Error code : 50009. Please wait 2 seconds and try again."
    )]
    ServerBusy(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The most times Service Bus forwards a message (ForwardTo) from entity to
/// entity: one that would be forwarded once more goes to the transfer
/// dead-letter queue of the entity it is in, reason `MaxTransferHopCountExceeded`.
pub const MAX_TRANSFER_HOPS: u32 = 4;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What the ATOM endpoint reports about one entity.
#[derive(Debug, Clone)]
pub enum Description {
    Queue {
        name: String,
        settings: StoreSettings,
        counts: Counts,
        created_at_ms: i64,
        forward_to: Option<String>,
    },
    Topic {
        name: String,
        subscription_count: usize,
        created_at_ms: i64,
    },
    Subscription {
        name: String,
        settings: StoreSettings,
        counts: Counts,
        created_at_ms: i64,
        forward_to: Option<String>,
    },
}

#[derive(Debug)]
enum Entity {
    Queue(Box<Store>),
    Topic(Topic),
}

#[derive(Debug)]
struct Topic {
    default_message_ttl: Option<Duration>,
    created_at_ms: i64,
    subscriptions: BTreeMap<String, Store>,
}

#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub auto_create: bool,
    /// Leaves out `x-opt-lock-token`, so that clients must read the delivery tag.
    pub strict: bool,
    /// CLI defaults, below the topology file's own `defaults`.
    pub defaults: StoreSettings,
    /// The most messages one peek answers (None: as many as asked). Azure may
    /// answer a peek with fewer than it was asked for, while more wait.
    pub max_peek: Option<usize>,
    /// Sends to refuse as throttled (`com.microsoft:server-busy`), by entity
    /// (lowercase): Azure rejects a transfer so when it throttles a namespace.
    pub server_busy: BTreeMap<String, usize>,
    /// Entities (lowercase) that refuse, as a partitioned entity with
    /// duplicate detection does on Azure, a batch whose messages differ in
    /// MessageId, SessionId or PartitionKey (amqp:not-allowed).
    pub refuse_mixed_batches: BTreeSet<String>,
}

/// Azure's words for a batch a partitioned entity with duplicate detection
/// refuses.
pub const MIXED_BATCH_REFUSAL: &str = "Batching brokered messages with distinct SessionId, PartitionKey, or MessageId is not supported for an entity with partitioning and duplicate detection enabled.";

pub struct Broker {
    entities: Mutex<BTreeMap<String, Entity>>,
    topology: Topology,
    options: BrokerOptions,
    /// Bumped whenever a message may have become available to a receiver.
    changed: watch::Sender<u64>,
    /// Counts deletes: a connection that sees it move detaches its links to
    /// entities that are gone (see [`Broker::exists`]).
    deletions: AtomicU64,
    /// What is left of `options.server_busy`.
    busy: Mutex<BTreeMap<String, usize>>,
    /// Peeks (`com.microsoft:peek-message`) still to refuse as throttled, by
    /// entity (lowercase, any sub-queue; see [`Broker::throttle_peeks`]).
    peeks_busy: Mutex<BTreeMap<String, usize>>,
}

impl Broker {
    pub fn new(topology: Topology, options: BrokerOptions) -> Self {
        let busy = Mutex::new(options.server_busy.clone());
        let broker = Broker {
            entities: Mutex::new(BTreeMap::new()),
            topology,
            options,
            changed: watch::Sender::new(0),
            deletions: AtomicU64::new(0),
            busy,
            peeks_busy: Mutex::new(BTreeMap::new()),
        };
        broker.reset();
        broker
    }

    /// Drops every message and auto-created entity, back to the topology file.
    pub fn reset(&self) {
        let now = now_ms();
        let mut entities = BTreeMap::new();
        for queue in &self.topology.queues {
            let settings = self.resolve(&queue.settings(), None);
            entities.insert(
                queue.name.to_lowercase(),
                Entity::Queue(Box::new(Store::new(settings, now))),
            );
        }
        for topic in &self.topology.topics {
            let subscriptions = topic
                .subscriptions
                .iter()
                .map(|sub| {
                    let settings = self.resolve(&sub.settings(), topic.default_message_ttl);
                    (sub.name.to_lowercase(), Store::new(settings, now))
                })
                .collect();
            entities.insert(
                topic.name.to_lowercase(),
                Entity::Topic(Topic {
                    default_message_ttl: topic.default_message_ttl,
                    created_at_ms: now,
                    subscriptions,
                }),
            );
        }
        *self.lock() = entities;
        self.wake();
    }

    fn resolve(&self, settings: &EntitySettings, topic_ttl: Option<Duration>) -> StoreSettings {
        let merged = settings.or(&self.topology.defaults);
        let defaults = self.options.defaults;
        StoreSettings {
            max_delivery_count: merged.max_delivery_count.unwrap_or(defaults.max_delivery_count),
            lock_duration: merged.lock_duration.unwrap_or(defaults.lock_duration),
            default_message_ttl: merged
                .default_message_ttl
                .or(topic_ttl)
                .or(defaults.default_message_ttl),
            max_size_bytes: defaults.max_size_bytes,
            status: EntityStatus::Active,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entity>> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.entities.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn wake(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Checks that a link may attach to `path`, creating it if allowed.
    pub fn attach(&self, path: &EntityPath, sending: bool) -> Result<(), BrokerError> {
        if sending && (path.sub_queue.is_dead_letter() || path.subscription.is_some()) {
            return Err(BrokerError::NotAllowed(format!(
                "cannot send to '{path}': send to the queue or topic instead"
            )));
        }
        let mut entities = self.lock();
        let exists = match (entities.get(&path.entity), &path.subscription) {
            (Some(Entity::Queue(store)), None) if sending && store.settings.status.refuses_sends() => {
                return Err(BrokerError::EntityDisabled(path.entity.clone()));
            }
            (Some(Entity::Queue(_)), None) | (Some(Entity::Topic(_)), None) => {
                if !sending && matches!(entities.get(&path.entity), Some(Entity::Topic(_))) {
                    return Err(BrokerError::NotAllowed(format!(
                        "'{path}' is a topic: receive from one of its subscriptions"
                    )));
                }
                true
            }
            (Some(Entity::Topic(topic)), Some(sub)) => topic.subscriptions.contains_key(sub),
            (Some(Entity::Queue(_)), Some(_)) => {
                return Err(BrokerError::NotFound(path.to_string()));
            }
            (None, _) => false,
        };
        if exists {
            return Ok(());
        }
        if !self.options.auto_create {
            return Err(BrokerError::NotFound(path.parent().to_string()));
        }
        let now = now_ms();
        match &path.subscription {
            None => {
                tracing::info!(entity = %path.entity, "auto-creating queue");
                let settings = self.resolve(&EntitySettings::default(), None);
                entities.insert(path.entity.clone(), Entity::Queue(Box::new(Store::new(settings, now))));
            }
            Some(sub) => {
                tracing::info!(topic = %path.entity, subscription = %sub, "auto-creating subscription");
                let topic = entities.entry(path.entity.clone()).or_insert_with(|| {
                    Entity::Topic(Topic {
                        default_message_ttl: None,
                        created_at_ms: now,
                        subscriptions: BTreeMap::new(),
                    })
                });
                if let Entity::Topic(topic) = topic {
                    let settings = self.resolve(&EntitySettings::default(), topic.default_message_ttl);
                    topic.subscriptions.insert(sub.clone(), Store::new(settings, now));
                }
            }
        }
        Ok(())
    }

    /// Enqueues to a queue, or copies to every subscription of a topic; an
    /// entity with ForwardTo passes what it gets on (see [`forward`]).
    pub fn send(&self, entity: &str, messages: Vec<ParsedMessage>) -> Result<(), BrokerError> {
        if let Some(left) = self.busy.lock().expect("busy lock").get_mut(entity)
            && *left > 0
        {
            *left -= 1;
            return Err(BrokerError::ServerBusy(entity.to_owned()));
        }
        if messages.len() > 1
            && self.options.refuse_mixed_batches.contains(entity)
            && messages
                .iter()
                .any(|m| batch_identity(m) != batch_identity(&messages[0]))
        {
            return Err(BrokerError::NotAllowed(MIXED_BATCH_REFUSAL.into()));
        }
        deliver(&mut self.lock(), entity, messages, 0, now_ms())?;
        self.wake();
        Ok(())
    }

    fn with_store<T>(
        &self,
        path: &EntityPath,
        f: impl FnOnce(&mut Store) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let mut entities = self.lock();
        let store = match (entities.get_mut(&path.entity), &path.subscription) {
            (Some(Entity::Queue(store)), None) => Some(&mut **store),
            (Some(Entity::Topic(topic)), Some(sub)) => topic.subscriptions.get_mut(sub),
            _ => None,
        };
        match store {
            Some(store) => f(store),
            None => Err(BrokerError::NotFound(path.parent().to_string())),
        }
    }

    pub fn acquire(&self, path: &EntityPath, mode: ReceiveMode) -> Result<Option<Acquired>, BrokerError> {
        let strict = self.options.strict;
        self.with_store(path, |store| store.acquire(path.sub_queue, mode, now_ms(), strict))
    }

    pub fn settle(&self, path: &EntityPath, token: &Uuid, outcome: Outcome) -> Result<(), BrokerError> {
        let woke = self.with_store(path, |store| store.settle(path.sub_queue, token, outcome))?;
        if woke {
            self.wake();
        }
        Ok(())
    }

    pub fn renew(&self, path: &EntityPath, tokens: &[Uuid]) -> Result<Vec<i64>, BrokerError> {
        let now = now_ms();
        self.with_store(path, |store| {
            tokens
                .iter()
                .map(|token| store.renew(path.sub_queue, token, now))
                .collect()
        })
    }

    /// Refuse the next `n` peeks of `entity` (or its sub-queues) as
    /// throttled: Azure counts a peek against a namespace's throttling
    /// credits as it does a send, and answers one over them with 503
    /// `com.microsoft:server-busy`.
    pub fn throttle_peeks(&self, entity: &str, n: usize) {
        self.peeks_busy
            .lock()
            .expect("busy lock")
            .insert(entity.to_lowercase(), n);
    }

    pub fn peek(&self, path: &EntityPath, from_sequence_number: i64, count: usize) -> Result<Vec<Bytes>, BrokerError> {
        if let Some(left) = self.peeks_busy.lock().expect("busy lock").get_mut(&path.entity)
            && *left > 0
        {
            *left -= 1;
            return Err(BrokerError::ServerBusy(path.entity.clone()));
        }
        let strict = self.options.strict;
        let count = self.options.max_peek.map_or(count, |max| count.min(max));
        self.with_store(path, |store| {
            store.peek(path.sub_queue, from_sequence_number, count, now_ms(), strict)
        })
    }

    pub fn receive_deferred(
        &self,
        path: &EntityPath,
        sequence_numbers: &[i64],
        mode: ReceiveMode,
    ) -> Result<Vec<Acquired>, BrokerError> {
        let strict = self.options.strict;
        self.with_store(path, |store| {
            store.receive_deferred(path.sub_queue, sequence_numbers, mode, now_ms(), strict)
        })
    }

    /// Returns expired locks to their queues; run periodically.
    pub fn expire_locks(&self) {
        let now = now_ms();
        let mut woke = false;
        {
            let mut entities = self.lock();
            for entity in entities.values_mut() {
                let stores: Vec<&mut Store> = match entity {
                    Entity::Queue(store) => vec![store],
                    Entity::Topic(topic) => topic.subscriptions.values_mut().collect(),
                };
                for store in stores {
                    match store.expire_locks(now) {
                        Ok(returned) => woke |= returned,
                        Err(error) => tracing::warn!(%error, "lock expiry failed"),
                    }
                }
            }
        }
        if woke {
            self.wake();
        }
    }

    /// Deletes a queue, a topic (with its subscriptions) or a subscription,
    /// with its messages and dead-letter queue, as an ATOM DELETE does.
    /// Links attached to it are detached by their connections.
    pub fn delete(&self, path: &EntityPath) -> Result<(), BrokerError> {
        let mut entities = self.lock();
        let mut stores: Vec<Store> = match &path.subscription {
            None => match entities.remove(&path.entity) {
                Some(Entity::Queue(store)) => vec![*store],
                Some(Entity::Topic(topic)) => topic.subscriptions.into_values().collect(),
                None => return Err(BrokerError::NotFound(path.to_string())),
            },
            Some(sub) => match entities.get_mut(&path.entity) {
                Some(Entity::Topic(topic)) => match topic.subscriptions.remove(sub) {
                    Some(store) => vec![store],
                    None => return Err(BrokerError::NotFound(path.to_string())),
                },
                _ => return Err(BrokerError::NotFound(path.to_string())),
            },
        };
        drop(entities);
        let now = now_ms();
        let (active, dead_letter) = stores.iter_mut().fold((0, 0), |(a, d), store| {
            let counts = store.counts(now);
            (a + counts.active, d + counts.dead_letter + counts.transfer_dead_letter)
        });
        // Loud when messages go with it: a test reads what a delete destroyed.
        if active + dead_letter > 0 {
            tracing::warn!(entity = %path, active, dead_letter, "deleted with its messages");
        } else {
            tracing::info!(entity = %path, "deleted");
        }
        self.deletions.fetch_add(1, Ordering::Relaxed);
        self.wake();
        Ok(())
    }

    /// How many deletes there have been (see [`Broker::delete`]).
    pub fn deletions(&self) -> u64 {
        self.deletions.load(Ordering::Relaxed)
    }

    /// Whether the entity (or subscription) `path` names still exists.
    pub fn exists(&self, path: &EntityPath) -> bool {
        let entities = self.lock();
        match (entities.get(&path.entity), &path.subscription) {
            (Some(Entity::Queue(_)) | Some(Entity::Topic(_)), None) => true,
            (Some(Entity::Topic(topic)), Some(sub)) => topic.subscriptions.contains_key(sub),
            _ => false,
        }
    }

    /// Creates a queue, as an ATOM PUT does; an existing entity is a conflict.
    /// A ForwardTo must name a queue or topic that exists, as Azure requires.
    pub fn create_queue(
        &self,
        name: &str,
        max_size_bytes: Option<usize>,
        status: EntityStatus,
        forward_to: Option<&str>,
    ) -> Result<(), BrokerError> {
        let mut entities = self.lock();
        let name = name.to_lowercase();
        if entities.contains_key(&name) {
            return Err(BrokerError::Conflict(name));
        }
        let forward_to = forward_target(&entities, forward_to)?;
        let mut settings = self.resolve(&EntitySettings::default(), None);
        settings.max_size_bytes = max_size_bytes;
        settings.status = status;
        let mut store = Store::new(settings, now_ms());
        store.forward_to = forward_to;
        entities.insert(name, Entity::Queue(Box::new(store)));
        Ok(())
    }

    /// Creates a subscription of an existing topic, as an ATOM PUT of a
    /// `SubscriptionDescription` does; a taken name is a conflict.
    pub fn create_subscription(&self, topic: &str, name: &str, forward_to: Option<&str>) -> Result<(), BrokerError> {
        let mut entities = self.lock();
        let (topic, name) = (topic.to_lowercase(), name.to_lowercase());
        let forward_to = forward_target(&entities, forward_to)?;
        let Some(Entity::Topic(t)) = entities.get_mut(&topic) else {
            return Err(BrokerError::NotFound(topic));
        };
        if t.subscriptions.contains_key(&name) {
            return Err(BrokerError::Conflict(format!("{topic}/Subscriptions/{name}")));
        }
        let settings = self.resolve(&EntitySettings::default(), t.default_message_ttl);
        let mut store = Store::new(settings, now_ms());
        store.forward_to = forward_to;
        t.subscriptions.insert(name, store);
        Ok(())
    }

    /// `path` is the ATOM path: `queue`, `topic` or `topic/Subscriptions/sub`.
    pub fn describe(&self, path: &EntityPath) -> Option<Description> {
        let now = now_ms();
        let mut entities = self.lock();
        match (entities.get_mut(&path.entity)?, &path.subscription) {
            (Entity::Queue(store), None) => Some(Description::Queue {
                name: path.entity.clone(),
                settings: store.settings,
                counts: store.counts(now),
                created_at_ms: store.created_at_ms,
                forward_to: store.forward_to.clone(),
            }),
            (Entity::Topic(topic), None) => Some(Description::Topic {
                name: path.entity.clone(),
                subscription_count: topic.subscriptions.len(),
                created_at_ms: topic.created_at_ms,
            }),
            (Entity::Topic(topic), Some(sub)) => {
                let store = topic.subscriptions.get_mut(sub)?;
                Some(Description::Subscription {
                    name: sub.clone(),
                    settings: store.settings,
                    counts: store.counts(now),
                    created_at_ms: store.created_at_ms,
                    forward_to: store.forward_to.clone(),
                })
            }
            (Entity::Queue(_), Some(_)) => None,
        }
    }
}

/// A ForwardTo's entity (a name or a URI), lower-cased; it must exist.
fn forward_target(
    entities: &BTreeMap<String, Entity>,
    forward_to: Option<&str>,
) -> Result<Option<String>, BrokerError> {
    let Some(target) = forward_to.map(address::path_of).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if !entities.contains_key(&target) {
        return Err(BrokerError::NotFound(target));
    }
    Ok(Some(target))
}

/// Puts messages sent to `entity` (a queue or topic) where they belong,
/// `hops` forwards after they were sent.
fn deliver(
    entities: &mut BTreeMap<String, Entity>,
    entity: &str,
    messages: Vec<ParsedMessage>,
    hops: u32,
    now: i64,
) -> Result<(), BrokerError> {
    match entities.get_mut(entity) {
        None => Err(BrokerError::NotFound(entity.to_owned())),
        Some(Entity::Queue(store)) => {
            if let Some(target) = store.forward_to.clone() {
                return forward(entities, entity, None, &target, messages, hops, now);
            }
            if let Some(max) = store.settings.max_size_bytes {
                // A batch is taken whole or refused whole, as Azure does.
                let size = store.size_bytes();
                if size + messages.iter().map(ParsedMessage::size).sum::<usize>() > max {
                    return Err(BrokerError::QuotaExceeded {
                        entity: entity.to_owned(),
                        size,
                        max,
                    });
                }
            }
            for message in messages {
                store.enqueue(message, now);
            }
            Ok(())
        }
        Some(Entity::Topic(topic)) => {
            let mut forwarding = Vec::new();
            for (name, store) in &mut topic.subscriptions {
                match &store.forward_to {
                    Some(target) => forwarding.push((name.clone(), target.clone())),
                    None => messages.iter().for_each(|m| store.enqueue(m.clone(), now)),
                }
            }
            for (subscription, target) in forwarding {
                forward(
                    entities,
                    entity,
                    Some(&subscription),
                    &target,
                    messages.clone(),
                    hops,
                    now,
                )?;
            }
            Ok(())
        }
    }
}

/// Auto-forwarding: what reaches a queue or subscription with ForwardTo is
/// moved on to the target. When the target cannot take it (gone, disabled,
/// full) or the message was forwarded [`MAX_TRANSFER_HOPS`] times already,
/// it goes to the transfer dead-letter queue of the entity it is in instead,
/// with a DeadLetterReason and DeadLetterErrorDescription saying why.
fn forward(
    entities: &mut BTreeMap<String, Entity>,
    entity: &str,
    subscription: Option<&str>,
    target: &str,
    messages: Vec<ParsedMessage>,
    hops: u32,
    now: i64,
) -> Result<(), BrokerError> {
    let bytes = messages.iter().map(ParsedMessage::size).sum::<usize>();
    let Some((reason, description)) = forward_refusal(entities, target, bytes, hops) else {
        return deliver(entities, target, messages, hops + 1, now);
    };
    let store = match (entities.get_mut(entity), subscription) {
        (Some(Entity::Queue(store)), None) => &mut **store,
        (Some(Entity::Topic(topic)), Some(sub)) => topic
            .subscriptions
            .get_mut(sub)
            .ok_or_else(|| BrokerError::NotFound(format!("{entity}/Subscriptions/{sub}")))?,
        _ => return Err(BrokerError::NotFound(entity.to_owned())),
    };
    tracing::info!(%entity, ?subscription, %target, reason, "forwarding failed: moved to the transfer dead-letter queue");
    for message in messages {
        store.transfer_dead_letter(message, now, reason, &description)?;
    }
    Ok(())
}

/// What a partitioned entity with duplicate detection needs alike across a
/// batch: the MessageId, SessionId (group-id) and PartitionKey of a message.
fn batch_identity(m: &ParsedMessage) -> (String, String, String) {
    let properties = m
        .bare
        .iter()
        .find(|s| s.code == codec::PROPERTIES)
        .and_then(|s| serde_amqp::from_slice::<fe2o3_amqp_types::messaging::Properties>(&s.raw).ok())
        .unwrap_or_default();
    let partition_key = m.annotations.get(&codec::symbol("x-opt-partition-key"));
    (
        format!("{:?}", properties.message_id),
        format!("{:?}", properties.group_id),
        format!("{partition_key:?}"),
    )
}

/// Why `target` cannot take a forwarded batch of `bytes` now, as a
/// DeadLetterReason and DeadLetterErrorDescription. Azure documents when it
/// moves a message to the transfer dead-letter queue (the target deleted,
/// disabled or over its size quota; too many hops) and the reason of the
/// last case only; for the others the reason is the name of the error a
/// client would get sending to the target, and the description its text.
fn forward_refusal(
    entities: &BTreeMap<String, Entity>,
    target: &str,
    bytes: usize,
    hops: u32,
) -> Option<(&'static str, String)> {
    if hops >= MAX_TRANSFER_HOPS {
        return Some((
            "MaxTransferHopCountExceeded",
            format!(
                "The maximum number of allowed hops when forwarding between queues is exceeded. This value is set to {MAX_TRANSFER_HOPS}."
            ),
        ));
    }
    match entities.get(target) {
        None => Some((
            "MessagingEntityNotFound",
            BrokerError::NotFound(target.to_owned()).to_string(),
        )),
        Some(Entity::Queue(store)) if store.settings.status.refuses_sends() => Some((
            "MessagingEntityDisabled",
            BrokerError::EntityDisabled(target.to_owned()).to_string(),
        )),
        Some(Entity::Queue(store)) => {
            let (size, max) = (store.size_bytes(), store.settings.max_size_bytes?);
            (size + bytes > max).then(|| {
                let error = BrokerError::QuotaExceeded {
                    entity: target.to_owned(),
                    size,
                    max,
                };
                ("QuotaExceeded", error.to_string())
            })
        }
        Some(Entity::Topic(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn broker(max_delivery_count: u32) -> Broker {
        broker_with(max_delivery_count, true)
    }

    fn broker_with(max_delivery_count: u32, auto_create: bool) -> Broker {
        Broker::new(
            Topology::default(),
            BrokerOptions {
                auto_create,
                strict: false,
                defaults: StoreSettings {
                    max_delivery_count,
                    lock_duration: Duration::from_secs(60),
                    default_message_ttl: None,
                    max_size_bytes: None,
                    status: EntityStatus::Active,
                },
                max_peek: None,
                server_busy: BTreeMap::new(),
                refuse_mixed_batches: BTreeSet::new(),
            },
        )
    }

    fn message() -> ParsedMessage {
        let body = serde_amqp::to_vec(&serde_amqp::described::Described {
            descriptor: serde_amqp::descriptor::Descriptor::Code(codec::DATA),
            value: serde_amqp::value::Value::Binary(b"x".to_vec().into()),
        })
        .unwrap();
        codec::parse_message(&Bytes::from(body)).unwrap()
    }

    fn path(dead_letter: bool) -> EntityPath {
        EntityPath {
            entity: "q".into(),
            subscription: None,
            sub_queue: if dead_letter {
                SubQueue::DeadLetter
            } else {
                SubQueue::None
            },
        }
    }

    #[test]
    fn abandon_past_max_delivery_count_dead_letters() {
        let broker = broker(2);
        broker.attach(&path(false), true).unwrap();
        broker.send("q", vec![message()]).unwrap();
        for _ in 0..2 {
            let got = broker.acquire(&path(false), ReceiveMode::PeekLock).unwrap().unwrap();
            let abandon = Outcome::Abandon {
                annotations: Vec::new(),
            };
            broker.settle(&path(false), &got.lock_token.unwrap(), abandon).unwrap();
        }
        assert!(broker.acquire(&path(false), ReceiveMode::PeekLock).unwrap().is_none());
        let dead = broker.acquire(&path(true), ReceiveMode::PeekLock).unwrap().unwrap();
        let text = String::from_utf8_lossy(&dead.payload);
        assert!(text.contains("MaxDeliveryCountExceeded"));
    }

    #[test]
    fn a_queue_created_with_a_size_limit_refuses_a_batch_that_would_pass_it_whole() {
        let broker = broker(10);
        let size = message().size();
        broker
            .create_queue("Q", Some(3 * size), EntityStatus::Active, None)
            .unwrap();
        assert!(matches!(
            broker.create_queue("q", None, EntityStatus::Active, None),
            Err(BrokerError::Conflict(_))
        ));
        broker.send("q", vec![message(), message()]).unwrap();
        let refused = broker.send("q", vec![message(), message()]).unwrap_err();
        assert!(
            matches!(refused, BrokerError::QuotaExceeded { size: s, max, .. } if s == 2 * size && max == 3 * size),
            "{refused:?}"
        );
        assert_eq!(
            broker.describe(&path(false)).map(|d| match d {
                Description::Queue { counts, .. } => counts.active,
                _ => 0,
            }),
            Some(2),
            "nothing of the refused batch was taken"
        );
        broker.send("q", vec![message()]).unwrap();
    }

    /// Azure keeps a deferred message deferred when the lock a receive by
    /// sequence number took is abandoned or lapses: no receiver gets it, a
    /// browse still shows it deferred, and it can be received by sequence
    /// number again.
    #[test]
    fn a_deferred_message_stays_deferred_when_its_lock_is_abandoned_or_lapses() {
        let broker = broker(10);
        broker.attach(&path(false), true).unwrap();
        broker.send("q", vec![message()]).unwrap();
        let got = broker.acquire(&path(false), ReceiveMode::PeekLock).unwrap().unwrap();
        broker
            .settle(&path(false), &got.lock_token.unwrap(), Outcome::Defer)
            .unwrap();
        let deferred = |broker: &Broker| {
            let peeked = broker.peek(&path(false), 1, 10).unwrap();
            assert_eq!(peeked.len(), 1);
            String::from_utf8_lossy(&peeked[0]).contains("x-opt-message-state")
        };
        let again = broker
            .receive_deferred(&path(false), &[1], ReceiveMode::PeekLock)
            .unwrap();
        assert!(deferred(&broker), "deferred while locked");
        let abandon = Outcome::Abandon {
            annotations: Vec::new(),
        };
        broker
            .settle(&path(false), &again[0].lock_token.unwrap(), abandon)
            .unwrap();
        assert!(broker.acquire(&path(false), ReceiveMode::PeekLock).unwrap().is_none());
        assert!(deferred(&broker), "deferred after an abandon");
        let mut short = broker_with(10, true);
        short.options.defaults.lock_duration = Duration::ZERO;
        short.attach(&path(false), true).unwrap();
        short.send("q", vec![message()]).unwrap();
        let got = short.acquire(&path(false), ReceiveMode::PeekLock).unwrap().unwrap();
        short
            .settle(&path(false), &got.lock_token.unwrap(), Outcome::Defer)
            .unwrap();
        short
            .receive_deferred(&path(false), &[1], ReceiveMode::PeekLock)
            .unwrap();
        short.expire_locks();
        assert!(short.acquire(&path(false), ReceiveMode::PeekLock).unwrap().is_none());
        assert!(deferred(&short), "deferred after its lock lapsed");
        let last = short
            .receive_deferred(&path(false), &[1], ReceiveMode::PeekLock)
            .unwrap();
        short
            .settle(&path(false), &last[0].lock_token.unwrap(), Outcome::Complete)
            .unwrap();
        assert!(short.peek(&path(false), 1, 10).unwrap().is_empty());
    }

    #[test]
    fn settling_twice_loses_the_lock() {
        let broker = broker(10);
        broker.attach(&path(false), true).unwrap();
        broker.send("q", vec![message()]).unwrap();
        let got = broker.acquire(&path(false), ReceiveMode::PeekLock).unwrap().unwrap();
        let token = got.lock_token.unwrap();
        broker.settle(&path(false), &token, Outcome::Complete).unwrap();
        assert!(matches!(
            broker.settle(&path(false), &token, Outcome::Complete),
            Err(BrokerError::LockLost)
        ));
    }

    #[test]
    fn a_send_disabled_queue_refuses_senders_and_still_lets_receivers_attach() {
        let broker = broker(10);
        broker
            .create_queue("q", None, EntityStatus::SendDisabled, None)
            .unwrap();
        assert!(matches!(
            broker.attach(&path(false), true),
            Err(BrokerError::EntityDisabled(_))
        ));
        broker.attach(&path(false), false).unwrap();
        broker.attach(&path(true), false).unwrap();
    }

    #[test]
    fn sends_to_a_throttled_entity_are_refused_as_many_times_as_configured() {
        let mut options = broker(10).options.clone();
        options.server_busy.insert("q".into(), 2);
        let broker = Broker::new(Topology::default(), options);
        broker.attach(&path(false), true).unwrap();
        let other = EntityPath {
            entity: "other".into(),
            ..path(false)
        };
        broker.attach(&other, true).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                broker.send("q", vec![message()]),
                Err(BrokerError::ServerBusy(_))
            ));
        }
        broker.send("other", vec![message()]).unwrap();
        broker.send("q", vec![message()]).unwrap();
        assert_eq!(
            broker.peek(&path(false), 1, 10).unwrap().len(),
            1,
            "only the accepted send"
        );
    }

    #[test]
    fn peeks_of_a_throttled_entity_are_refused_as_many_times_as_configured() {
        let broker = broker(10);
        broker.attach(&path(false), true).unwrap();
        broker.send("q", vec![message()]).unwrap();
        broker.throttle_peeks("Q", 2);
        for dead_letter in [true, false] {
            assert!(matches!(
                broker.peek(&path(dead_letter), 1, 10),
                Err(BrokerError::ServerBusy(_))
            ));
        }
        assert_eq!(broker.peek(&path(false), 1, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_partitioned_entity_refuses_batches_of_distinct_message_ids() {
        let with_id = |id: &str| {
            let properties = fe2o3_amqp_types::messaging::Properties {
                message_id: Some(fe2o3_amqp_types::messaging::MessageId::String(id.into())),
                ..Default::default()
            };
            let mut bytes = serde_amqp::to_vec(&properties).unwrap();
            bytes.extend(
                serde_amqp::to_vec(&serde_amqp::described::Described {
                    descriptor: serde_amqp::descriptor::Descriptor::Code(codec::DATA),
                    value: serde_amqp::value::Value::Binary(b"x".to_vec().into()),
                })
                .unwrap(),
            );
            codec::parse_message(&Bytes::from(bytes)).unwrap()
        };
        let mut options = broker(10).options.clone();
        options.refuse_mixed_batches.insert("q".into());
        let broker = Broker::new(Topology::default(), options);
        broker.attach(&path(false), true).unwrap();
        assert!(matches!(
            broker.send("q", vec![with_id("a"), with_id("b")]),
            Err(BrokerError::NotAllowed(why)) if why == MIXED_BATCH_REFUSAL
        ));
        broker.send("q", vec![with_id("a"), with_id("a")]).unwrap();
        broker.send("q", vec![with_id("b")]).unwrap();
        assert_eq!(broker.peek(&path(false), 1, 10).unwrap().len(), 3);
    }

    #[test]
    fn max_peek_bounds_each_peek_and_the_next_peek_goes_on_from_past_it() {
        let mut broker = broker(10);
        broker.options.max_peek = Some(2);
        broker.attach(&path(false), true).unwrap();
        broker.send("q", (0..5).map(|_| message()).collect()).unwrap();
        assert_eq!(broker.peek(&path(false), 1, 10).unwrap().len(), 2);
        assert_eq!(broker.peek(&path(false), 1, 1).unwrap().len(), 1);
        assert_eq!(
            broker.peek(&path(false), 4, 10).unwrap().len(),
            2,
            "sequence numbers 4 and 5"
        );
        assert_eq!(broker.peek(&path(false), 5, 10).unwrap().len(), 1);
    }

    #[test]
    fn unknown_entities_are_refused_without_auto_create() {
        let broker = broker_with(10, false);
        assert!(matches!(
            broker.attach(&path(false), true),
            Err(BrokerError::NotFound(_))
        ));
    }

    #[test]
    fn a_deleted_entity_is_gone_with_its_messages() {
        let broker = broker_with(10, false);
        broker.create_queue("q", None, EntityStatus::Active, None).unwrap();
        broker.send("q", vec![message()]).unwrap();
        assert!(broker.exists(&path(true).parent()));
        broker.delete(&path(false)).unwrap();
        assert_eq!(broker.deletions(), 1);
        assert!(!broker.exists(&path(false)));
        assert!(matches!(
            broker.send("q", vec![message()]),
            Err(BrokerError::NotFound(_))
        ));
        assert!(matches!(broker.delete(&path(false)), Err(BrokerError::NotFound(_))));
        assert_eq!(broker.deletions(), 1, "a failed delete deletes nothing");

        let topics = broker_with(10, true);
        let subscription = |name: &str| EntityPath {
            entity: "t".into(),
            subscription: Some(name.into()),
            sub_queue: SubQueue::None,
        };
        topics.attach(&subscription("s1"), false).unwrap();
        topics.attach(&subscription("s2"), false).unwrap();
        topics.delete(&subscription("s1")).unwrap();
        assert!(!topics.exists(&subscription("s1")));
        assert!(topics.exists(&subscription("s2")), "its topic and siblings stay");
    }

    #[test]
    fn subscriptions_and_dead_letter_queues_refuse_senders() {
        let broker = broker(10);
        let subscription = EntityPath {
            entity: "t".into(),
            subscription: Some("s".into()),
            sub_queue: SubQueue::None,
        };
        broker.attach(&subscription, false).unwrap();
        assert!(matches!(
            broker.attach(&subscription, true),
            Err(BrokerError::NotAllowed(_))
        ));
        assert!(matches!(
            broker.attach(&path(true), true),
            Err(BrokerError::NotAllowed(_))
        ));
        // The topic was created with the subscription; a send fans out to it.
        broker.send("t", vec![message()]).unwrap();
        assert!(
            broker
                .acquire(&subscription, ReceiveMode::ReceiveAndDelete)
                .unwrap()
                .is_some()
        );
    }

    fn transfer_dlq(entity: &str, subscription: Option<&str>) -> EntityPath {
        EntityPath {
            entity: entity.into(),
            subscription: subscription.map(Into::into),
            sub_queue: SubQueue::TransferDeadLetter,
        }
    }

    fn reason_of(payload: &Bytes) -> String {
        let text = String::from_utf8_lossy(payload);
        [
            "MessagingEntityNotFound",
            "MessagingEntityDisabled",
            "QuotaExceeded",
            "MaxTransferHopCountExceeded",
        ]
        .into_iter()
        .find(|r| text.contains(r))
        .unwrap_or("none")
        .to_string()
    }

    fn counts_of(broker: &Broker, path: &EntityPath) -> Counts {
        match broker.describe(path) {
            Some(Description::Queue { counts, .. } | Description::Subscription { counts, .. }) => counts,
            other => panic!("no counts for {path}: {other:?}"),
        }
    }

    #[test]
    fn a_queue_with_forward_to_moves_what_it_gets_to_the_target() {
        let broker = broker_with(10, false);
        broker.create_queue("target", None, EntityStatus::Active, None).unwrap();
        broker
            .create_queue("q", None, EntityStatus::Active, Some("Target"))
            .unwrap();
        broker.send("q", vec![message(), message()]).unwrap();
        let q = counts_of(&broker, &path(false));
        assert_eq!((q.active, q.dead_letter, q.transfer_dead_letter), (0, 0, 0));
        let target = EntityPath {
            entity: "target".into(),
            ..path(false)
        };
        assert_eq!(counts_of(&broker, &target).active, 2);
        // Azure: "The destination entity must already exist."
        assert!(matches!(
            broker.create_queue("other", None, EntityStatus::Active, Some("missing")),
            Err(BrokerError::NotFound(_))
        ));
    }

    #[test]
    fn what_cannot_be_forwarded_goes_to_the_transfer_dead_letter_queue_with_its_reason() {
        let broker = broker_with(10, false);
        let size = message().size();
        broker.create_queue("gone", None, EntityStatus::Active, None).unwrap();
        broker.create_queue("off", None, EntityStatus::Disabled, None).unwrap();
        broker
            .create_queue("full", Some(size), EntityStatus::Active, None)
            .unwrap();
        for (source, target, reason) in [
            ("a", "gone", "MessagingEntityNotFound"),
            ("b", "off", "MessagingEntityDisabled"),
            ("c", "full", "QuotaExceeded"),
        ] {
            broker
                .create_queue(source, None, EntityStatus::Active, Some(target))
                .unwrap();
            if target == "gone" {
                broker
                    .delete(&EntityPath {
                        entity: "gone".into(),
                        ..path(false)
                    })
                    .unwrap();
            }
            broker.send(source, vec![message(), message()]).unwrap();
            let at = EntityPath {
                entity: source.into(),
                ..path(false)
            };
            let counts = counts_of(&broker, &at);
            assert_eq!(
                (counts.active, counts.dead_letter, counts.transfer_dead_letter),
                (0, 0, 2),
                "{source}"
            );
            let tdlq = transfer_dlq(source, None);
            let got = broker.acquire(&tdlq, ReceiveMode::PeekLock).unwrap().unwrap();
            assert_eq!(reason_of(&got.payload), reason, "{source}");
            assert!(
                String::from_utf8_lossy(&got.payload).contains(target),
                "the description names {target}"
            );
            // Completed there like in any dead-letter queue; not dead-lettered again.
            assert!(matches!(
                broker.settle(
                    &tdlq,
                    &got.lock_token.unwrap(),
                    Outcome::DeadLetter {
                        reason: None,
                        description: None
                    }
                ),
                Err(BrokerError::NotAllowed(_))
            ));
            let got = broker.acquire(&tdlq, ReceiveMode::PeekLock).unwrap().unwrap();
            broker
                .settle(&tdlq, &got.lock_token.unwrap(), Outcome::Complete)
                .unwrap();
            assert_eq!(broker.peek(&tdlq, 1, 10).unwrap().len(), 1);
        }
        assert_eq!(
            counts_of(
                &broker,
                &EntityPath {
                    entity: "full".into(),
                    ..path(false)
                }
            )
            .active,
            0
        );
        assert!(matches!(
            broker.attach(&transfer_dlq("a", None), true),
            Err(BrokerError::NotAllowed(_))
        ));
    }

    #[test]
    fn a_forwarding_loop_stops_after_four_hops_in_a_transfer_dead_letter_queue() {
        let broker = broker_with(10, false);
        broker.create_queue("a", None, EntityStatus::Active, None).unwrap();
        broker.create_queue("b", None, EntityStatus::Active, Some("a")).unwrap();
        // Azure has no update here; the emulator's is test code reaching in.
        if let Some(Entity::Queue(a)) = broker.lock().get_mut("a") {
            a.forward_to = Some("b".into());
        }
        broker.send("a", vec![message()]).unwrap();
        // a→b→a→b→a: four hops, then it stays in a's transfer dead-letter queue.
        let got = broker
            .acquire(&transfer_dlq("a", None), ReceiveMode::PeekLock)
            .unwrap()
            .unwrap();
        assert_eq!(reason_of(&got.payload), "MaxTransferHopCountExceeded");
        assert_eq!(
            counts_of(&broker, &transfer_dlq("b", None).parent()).transfer_dead_letter,
            0
        );
    }

    #[test]
    fn a_subscription_with_forward_to_forwards_its_copy_and_its_siblings_keep_theirs() {
        let broker = broker_with(10, true);
        let sub = |name: &str| EntityPath {
            entity: "t".into(),
            subscription: Some(name.into()),
            sub_queue: SubQueue::None,
        };
        broker.attach(&sub("plain"), false).unwrap();
        broker.create_queue("target", None, EntityStatus::Active, None).unwrap();
        broker.create_subscription("T", "Fwd", Some("target")).unwrap();
        assert!(matches!(
            broker.create_subscription("t", "fwd", None),
            Err(BrokerError::Conflict(_))
        ));
        assert!(matches!(
            broker.create_subscription("nope", "s", None),
            Err(BrokerError::NotFound(_))
        ));
        broker.send("t", vec![message()]).unwrap();
        assert_eq!(counts_of(&broker, &sub("plain")).active, 1);
        assert_eq!(counts_of(&broker, &sub("fwd")).active, 0);
        let target = EntityPath {
            entity: "target".into(),
            ..path(false)
        };
        assert_eq!(counts_of(&broker, &target).active, 1);
        broker.delete(&target).unwrap();
        broker.send("t", vec![message()]).unwrap();
        let counts = counts_of(&broker, &sub("fwd"));
        assert_eq!((counts.active, counts.transfer_dead_letter), (0, 1));
        let got = broker
            .acquire(&transfer_dlq("t", Some("fwd")), ReceiveMode::PeekLock)
            .unwrap()
            .unwrap();
        assert_eq!(reason_of(&got.payload), "MessagingEntityNotFound");
    }
}
