//! One message store: a queue or subscription with its two dead-letter
//! sub-queues (`$DeadLetterQueue`, `$Transfer/$DeadLetterQueue`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use bytes::Bytes;
use fe2o3_amqp_types::messaging::Header;
use serde_amqp::{
    primitives::{OrderedMap, Timestamp},
    value::Value,
};
use uuid::Uuid;

use super::{
    BrokerError,
    address::SubQueue,
    codec::{self, ParsedMessage, Section, symbol},
};

/// An entity's Status, as the ATOM description says it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EntityStatus {
    #[default]
    Active,
    Disabled,
    SendDisabled,
    ReceiveDisabled,
}

impl EntityStatus {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "Active" => Self::Active,
            "Disabled" => Self::Disabled,
            "SendDisabled" => Self::SendDisabled,
            "ReceiveDisabled" => Self::ReceiveDisabled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "Active",
            Self::Disabled => "Disabled",
            Self::SendDisabled => "SendDisabled",
            Self::ReceiveDisabled => "ReceiveDisabled",
        }
    }

    /// Whether Azure refuses sends to the entity (com.microsoft:entity-disabled).
    pub fn refuses_sends(self) -> bool {
        matches!(self, Self::Disabled | Self::SendDisabled)
    }
}

/// Settings of one store, resolved from the topology and the CLI defaults.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    pub max_delivery_count: u32,
    pub lock_duration: Duration,
    pub default_message_ttl: Option<Duration>,
    /// MaxSizeInMegabytes, in bytes: a send that would take the entity past
    /// it is refused, as Azure refuses it (QuotaExceeded). None: no limit.
    pub max_size_bytes: Option<usize>,
    /// Set by an ATOM PUT's `Status`.
    pub status: EntityStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveMode {
    PeekLock,
    ReceiveAndDelete,
}

/// How a receiver settles a locked message.
#[derive(Debug, Clone)]
pub enum Outcome {
    Complete,
    Abandon {
        annotations: Vec<(Value, Value)>,
    },
    Defer,
    DeadLetter {
        reason: Option<String>,
        description: Option<String>,
    },
}

/// A message handed to a receiver.
#[derive(Debug)]
pub struct Acquired {
    pub payload: Bytes,
    /// `None` in receive-and-delete mode: nothing is left to settle.
    pub lock_token: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub active: usize,
    pub dead_letter: usize,
    pub transfer_dead_letter: usize,
    pub size_bytes: usize,
}

#[derive(Debug, Clone)]
struct StoredMessage {
    header: Header,
    annotations: OrderedMap<Value, Value>,
    bare: Vec<Section>,
    enqueued_at_ms: i64,
    expires_at_ms: Option<i64>,
    /// Times the message was handed out under a lock or deleted by a receive.
    deliveries: u32,
}

impl StoredMessage {
    fn size(&self) -> usize {
        codec::bare_size(&self.bare)
    }

    /// `deferred`: the message was deferred, which Azure tells by
    /// `x-opt-message-state` 1 (Deferred) on a peeked or received message.
    fn encode(
        &self,
        sequence_number: i64,
        lock: Option<(Uuid, i64)>,
        strict: bool,
        deferred: bool,
    ) -> Result<Bytes, BrokerError> {
        let mut header = self.header.clone();
        // AMQP counts prior attempts; the SDKs present it as-is (Python) or +1 (.NET).
        header.delivery_count = self.deliveries.saturating_sub(u32::from(lock.is_some()));
        let mut annotations = self.annotations.clone();
        annotations.insert(symbol("x-opt-sequence-number"), Value::Long(sequence_number));
        if deferred {
            annotations.insert(symbol("x-opt-message-state"), Value::Long(1));
        }
        annotations.insert(
            symbol("x-opt-enqueued-time"),
            Value::Timestamp(Timestamp::from_milliseconds(self.enqueued_at_ms)),
        );
        if let Some((_, until_ms)) = lock {
            annotations.insert(
                symbol("x-opt-locked-until"),
                Value::Timestamp(Timestamp::from_milliseconds(until_ms)),
            );
        }
        // Both azservicebus and the Python SDK look for the lock token in the
        // delivery annotations before falling back to the delivery tag.
        let delivery_annotations = lock.filter(|_| !strict).map(|(token, _)| {
            let mut map = OrderedMap::new();
            map.insert(
                symbol("x-opt-lock-token"),
                Value::Uuid(serde_amqp::primitives::Uuid::from(*token.as_bytes())),
            );
            map
        });
        Ok(codec::encode_message(
            &header,
            delivery_annotations,
            annotations,
            &self.bare,
        )?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Available,
    Locked { token: Uuid, until_ms: i64 },
    Deferred,
}

#[derive(Debug)]
struct Entry {
    message: StoredMessage,
    state: State,
    /// Deferred, whether locked now or not: on Azure a deferred message
    /// received by sequence number stays deferred when it is abandoned or
    /// its lock lapses (only a receive by sequence number gets it again),
    /// and a browse shows it deferred while it is locked.
    deferred: bool,
}

/// Messages of one queue (main or dead-letter), ordered by sequence number.
#[derive(Debug, Default)]
struct MessageList {
    messages: BTreeMap<i64, Entry>,
    available: BTreeSet<i64>,
    locks: HashMap<Uuid, i64>,
}

impl MessageList {
    fn insert(&mut self, sequence_number: i64, message: StoredMessage) {
        self.available.insert(sequence_number);
        self.messages.insert(
            sequence_number,
            Entry {
                message,
                state: State::Available,
                deferred: false,
            },
        );
    }

    fn remove(&mut self, sequence_number: i64) -> Option<StoredMessage> {
        let entry = self.messages.remove(&sequence_number)?;
        match entry.state {
            State::Available => {
                self.available.remove(&sequence_number);
            }
            State::Locked { token, .. } => {
                self.locks.remove(&token);
            }
            State::Deferred => {}
        }
        Some(entry.message)
    }

    fn is_expired(&self, sequence_number: i64, now_ms: i64) -> bool {
        self.messages[&sequence_number]
            .message
            .expires_at_ms
            .is_some_and(|at| at <= now_ms)
    }

    /// The oldest available message, dropping expired ones on the way: only
    /// the head is examined, so a receive costs the same for any queue depth.
    fn first_available(&mut self, now_ms: i64) -> Option<i64> {
        while let Some(&seq) = self.available.first() {
            if !self.is_expired(seq, now_ms) {
                return Some(seq);
            }
            self.remove(seq);
        }
        None
    }

    fn drop_expired(&mut self, now_ms: i64) {
        let expired: Vec<i64> = self
            .available
            .iter()
            .copied()
            .filter(|&seq| self.is_expired(seq, now_ms))
            .collect();
        for seq in expired {
            self.remove(seq);
        }
    }

    fn lock(&mut self, sequence_number: i64, token: Uuid, until_ms: i64) {
        let entry = self.messages.get_mut(&sequence_number).expect("locked message exists");
        self.available.remove(&sequence_number);
        entry.state = State::Locked { token, until_ms };
        entry.message.deliveries += 1;
        self.locks.insert(token, sequence_number);
    }

    fn locked(&self, token: &Uuid) -> Result<i64, BrokerError> {
        self.locks.get(token).copied().ok_or(BrokerError::LockLost)
    }

    fn unlock(&mut self, sequence_number: i64, state: State) {
        let entry = self
            .messages
            .get_mut(&sequence_number)
            .expect("unlocked message exists");
        if let State::Locked { token, .. } = entry.state {
            self.locks.remove(&token);
        }
        if state == State::Deferred {
            entry.deferred = true;
        }
        let state = if state == State::Available && entry.deferred {
            State::Deferred
        } else {
            state
        };
        entry.state = state;
        if state == State::Available {
            self.available.insert(sequence_number);
        }
    }
}

#[derive(Debug)]
pub struct Store {
    pub settings: StoreSettings,
    pub created_at_ms: i64,
    /// ForwardTo: the queue or topic (lower-cased) every message sent here
    /// is moved to; None: messages stay here.
    pub forward_to: Option<String>,
    next_sequence_number: i64,
    main: MessageList,
    dead_letter: MessageList,
    transfer_dead_letter: MessageList,
}

impl Store {
    pub fn new(settings: StoreSettings, now_ms: i64) -> Self {
        Store {
            settings,
            created_at_ms: now_ms,
            forward_to: None,
            next_sequence_number: 1,
            main: MessageList::default(),
            dead_letter: MessageList::default(),
            transfer_dead_letter: MessageList::default(),
        }
    }

    fn list(&mut self, sub_queue: SubQueue) -> &mut MessageList {
        match sub_queue {
            SubQueue::None => &mut self.main,
            SubQueue::DeadLetter => &mut self.dead_letter,
            SubQueue::TransferDeadLetter => &mut self.transfer_dead_letter,
        }
    }

    pub fn enqueue(&mut self, message: ParsedMessage, now_ms: i64) {
        let (seq, stored) = self.store(message, now_ms);
        self.main.insert(seq, stored);
    }

    /// A message auto-forwarding could not deliver: it takes the entity's
    /// next sequence number, as if enqueued, and goes straight to the
    /// transfer dead-letter queue with the reason, as Service Bus moves it.
    pub fn transfer_dead_letter(
        &mut self,
        message: ParsedMessage,
        now_ms: i64,
        reason: &str,
        description: &str,
    ) -> Result<(), BrokerError> {
        let (seq, mut stored) = self.store(message, now_ms);
        codec::set_application_properties(
            &mut stored.bare,
            &[
                ("DeadLetterReason", reason.to_owned()),
                ("DeadLetterErrorDescription", description.to_owned()),
            ],
        )?;
        self.transfer_dead_letter.insert(seq, stored);
        Ok(())
    }

    /// The stored form of a message sent now, and its sequence number.
    fn store(&mut self, message: ParsedMessage, now_ms: i64) -> (i64, StoredMessage) {
        let ttl = message
            .header
            .ttl
            .map(|ms| Duration::from_millis(u64::from(ms)))
            .or(self.settings.default_message_ttl);
        let stored = StoredMessage {
            header: message.header,
            annotations: message.annotations,
            bare: message.bare,
            enqueued_at_ms: now_ms,
            expires_at_ms: ttl.map(|ttl| now_ms.saturating_add(ttl.as_millis() as i64)),
            deliveries: 0,
        };
        let seq = self.next_sequence_number;
        self.next_sequence_number += 1;
        (seq, stored)
    }

    pub fn acquire(
        &mut self,
        sub_queue: SubQueue,
        mode: ReceiveMode,
        now_ms: i64,
        strict: bool,
    ) -> Result<Option<Acquired>, BrokerError> {
        let lock_ms = self.settings.lock_duration.as_millis() as i64;
        let list = self.list(sub_queue);
        let Some(seq) = list.first_available(now_ms) else {
            return Ok(None);
        };
        match mode {
            ReceiveMode::ReceiveAndDelete => {
                let mut message = list.remove(seq).expect("available message exists");
                let payload = message.encode(seq, None, strict, false)?;
                message.deliveries += 1;
                Ok(Some(Acquired {
                    payload,
                    lock_token: None,
                }))
            }
            ReceiveMode::PeekLock => {
                let token = Uuid::new_v4();
                let until_ms = now_ms + lock_ms;
                list.lock(seq, token, until_ms);
                let payload = list.messages[&seq]
                    .message
                    .encode(seq, Some((token, until_ms)), strict, false)?;
                Ok(Some(Acquired {
                    payload,
                    lock_token: Some(token),
                }))
            }
        }
    }

    /// Returns whether a message became available again (receivers should be woken).
    pub fn settle(&mut self, sub_queue: SubQueue, token: &Uuid, outcome: Outcome) -> Result<bool, BrokerError> {
        let max_delivery_count = self.settings.max_delivery_count;
        let list = self.list(sub_queue);
        let seq = list.locked(token)?;
        match outcome {
            Outcome::Complete => {
                list.remove(seq);
                Ok(false)
            }
            Outcome::Defer => {
                list.unlock(seq, State::Deferred);
                Ok(false)
            }
            Outcome::Abandon { annotations } => {
                let entry = list.messages.get_mut(&seq).expect("locked message exists");
                for (key, value) in annotations {
                    entry.message.annotations.insert(key, value);
                }
                Ok(self.release(sub_queue, seq, max_delivery_count)?)
            }
            Outcome::DeadLetter { reason, description } => {
                if sub_queue.is_dead_letter() {
                    return Err(BrokerError::NotAllowed(
                        "a message in a dead-letter queue cannot be dead-lettered again".into(),
                    ));
                }
                self.move_to_dead_letter(seq, reason, description)?;
                Ok(false)
            }
        }
    }

    /// Unlocks after an abandon or a lock expiry; past MaxDeliveryCount the
    /// message is dead-lettered, as Service Bus does.
    fn release(&mut self, sub_queue: SubQueue, seq: i64, max_delivery_count: u32) -> Result<bool, BrokerError> {
        let list = self.list(sub_queue);
        let deliveries = list.messages[&seq].message.deliveries;
        if !sub_queue.is_dead_letter() && deliveries >= max_delivery_count {
            self.move_to_dead_letter(
                seq,
                Some("MaxDeliveryCountExceeded".into()),
                Some(format!(
                    "Message could not be consumed after {max_delivery_count} delivery attempts."
                )),
            )?;
            return Ok(false);
        }
        list.unlock(seq, State::Available);
        Ok(true)
    }

    fn move_to_dead_letter(
        &mut self,
        seq: i64,
        reason: Option<String>,
        description: Option<String>,
    ) -> Result<(), BrokerError> {
        let mut message = self.main.remove(seq).expect("message to dead-letter exists");
        let properties: Vec<(&str, String)> = [
            ("DeadLetterReason", reason),
            ("DeadLetterErrorDescription", description),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|value| (key, value)))
        .collect();
        if !properties.is_empty() {
            codec::set_application_properties(&mut message.bare, &properties)?;
        }
        // The dead-letter queue keeps the original sequence number, as Service Bus does.
        self.dead_letter.insert(seq, message);
        Ok(())
    }

    pub fn renew(&mut self, sub_queue: SubQueue, token: &Uuid, now_ms: i64) -> Result<i64, BrokerError> {
        let until = now_ms + self.settings.lock_duration.as_millis() as i64;
        let list = self.list(sub_queue);
        let seq = list.locked(token)?;
        let entry = list.messages.get_mut(&seq).expect("locked message exists");
        // A lock past its time is lost, as on Service Bus, even before the
        // sweeper has unlocked its message.
        if matches!(entry.state, State::Locked { until_ms, .. } if until_ms <= now_ms) {
            return Err(BrokerError::LockLost);
        }
        entry.state = State::Locked {
            token: *token,
            until_ms: until,
        };
        Ok(until)
    }

    /// Browses without locking or counting a delivery.
    pub fn peek(
        &mut self,
        sub_queue: SubQueue,
        from_sequence_number: i64,
        count: usize,
        now_ms: i64,
        strict: bool,
    ) -> Result<Vec<Bytes>, BrokerError> {
        let list = self.list(sub_queue);
        list.messages
            .range(from_sequence_number..)
            .filter(|(_, entry)| {
                entry.state != State::Available || entry.message.expires_at_ms.is_none_or(|at| at > now_ms)
            })
            .take(count)
            .map(|(seq, entry)| entry.message.encode(*seq, None, strict, entry.deferred))
            .collect()
    }

    /// Locks deferred messages by sequence number (`receive-by-sequence-number`).
    pub fn receive_deferred(
        &mut self,
        sub_queue: SubQueue,
        sequence_numbers: &[i64],
        mode: ReceiveMode,
        now_ms: i64,
        strict: bool,
    ) -> Result<Vec<Acquired>, BrokerError> {
        let lock_ms = self.settings.lock_duration.as_millis() as i64;
        let list = self.list(sub_queue);
        let mut out = Vec::new();
        for &seq in sequence_numbers {
            if list.messages.get(&seq).map(|e| e.state) != Some(State::Deferred) {
                return Err(BrokerError::MessageNotFound(seq));
            }
            if mode == ReceiveMode::ReceiveAndDelete {
                let message = list.remove(seq).expect("deferred message exists");
                out.push(Acquired {
                    payload: message.encode(seq, None, strict, true)?,
                    lock_token: None,
                });
                continue;
            }
            let token = Uuid::new_v4();
            let until_ms = now_ms + lock_ms;
            list.lock(seq, token, until_ms);
            out.push(Acquired {
                payload: list.messages[&seq]
                    .message
                    .encode(seq, Some((token, until_ms)), strict, true)?,
                lock_token: Some(token),
            });
        }
        Ok(out)
    }

    /// Returns expired locks to the queue; true if any message became available.
    pub fn expire_locks(&mut self, now_ms: i64) -> Result<bool, BrokerError> {
        let mut woke = false;
        for sub_queue in [SubQueue::None, SubQueue::DeadLetter, SubQueue::TransferDeadLetter] {
            let list = self.list(sub_queue);
            let expired: Vec<i64> = list
                .locks
                .values()
                .copied()
                .filter(|seq| {
                    matches!(
                        list.messages[seq].state,
                        State::Locked { until_ms, .. } if until_ms <= now_ms
                    )
                })
                .collect();
            for seq in expired {
                woke |= self.release(sub_queue, seq, self.settings.max_delivery_count)?;
            }
        }
        Ok(woke)
    }

    pub fn counts(&mut self, now_ms: i64) -> Counts {
        self.main.drop_expired(now_ms);
        Counts {
            active: self.main.messages.len(),
            dead_letter: self.dead_letter.messages.len(),
            transfer_dead_letter: self.transfer_dead_letter.messages.len(),
            size_bytes: self.size_bytes(),
        }
    }

    /// Bytes held, dead letters included (Azure counts them in SizeInBytes).
    pub fn size_bytes(&self) -> usize {
        self.main
            .messages
            .values()
            .chain(self.dead_letter.messages.values())
            .chain(self.transfer_dead_letter.messages.values())
            .map(|e| e.message.size())
            .sum()
    }
}
