//! The AMQP 1.0 listener, written on fe2o3-amqp-types rather than the
//! fe2o3-amqp acceptor: Service Bus clients need delivery tags that are lock
//! tokens, echoed dispositions and raw message bytes, which the acceptor hides.

mod connection;
mod frame;
mod management;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{broker::Broker, entra::Entra, sas::SasRules};

#[derive(Clone)]
pub struct AmqpSettings {
    /// The max-message-size advertised on a sender's link to an entity
    /// (lowercase), as Azure advertises the entity's limit (262,144 bytes on
    /// the standard tier); a larger transfer detaches the link with
    /// amqp:link:message-size-exceeded. Other entities: 256 MiB.
    pub max_message_size: std::collections::BTreeMap<String, u64>,
    /// Delay before accepting a client's send.
    pub accept_delay: Duration,
    /// Detach a link once every token covering its entity has expired, and
    /// refuse (401) the put of a token that has, as Azure does.
    pub enforce_token_expiry: bool,
    /// Refuse (amqp:unauthorized-access) a link to an entity or its
    /// `$management` node that no `$cbs` token put on the connection covers,
    /// as Azure does.
    pub require_tokens: bool,
    /// Force-detach (amqp:link:detach-forced) a link to an entity or a
    /// `$management` node with no transfer or disposition for this long, as
    /// Azure does after 10 minutes. Zero: never.
    pub link_idle_timeout: Duration,
    /// Close (amqp:connection:forced) a connection that has had no link to an
    /// entity or a `$management` node for this long, as Azure does after 60
    /// seconds (`$cbs` does not count). Zero: never.
    pub connection_idle_timeout: Duration,
    /// With Entra ID on: a `$cbs` token of type `jwt` must be an access
    /// token the emulator issued, unaltered and unexpired (401 otherwise).
    pub entra: Option<Arc<Entra>>,
    /// With `--sas-rule`s: a shared access signature must be signed by one,
    /// cover the audience it is put for, and carry the rights a link needs.
    pub sas: Option<Arc<SasRules>>,
    /// The settlements lost on purpose (`--lose-send-settlement`,
    /// `--lose-token-put`).
    pub lost: Arc<LostSettlements>,
}

/// Settlements the emulator loses on purpose, to show how a client lives
/// with fe2o3-amqp's race that drops one: the K-th send to an entity, or the
/// K-th `$cbs` put for it, counted over every connection.
#[derive(Default)]
pub struct LostSettlements {
    /// Any loss asked for at all: without one (the usual case, and every
    /// benchmark) a send takes no lock and copies no name.
    any: bool,
    sends: Mutex<Counted>,
    token_puts: Mutex<Counted>,
    token_put_settlements: Mutex<Counted>,
}

#[derive(Default)]
struct Counted {
    /// Entity (lowercase) → which of its sends or puts to lose (1-based).
    lose: HashMap<String, BTreeSet<usize>>,
    seen: HashMap<String, usize>,
}

impl Counted {
    fn new(lose: Vec<(String, usize)>) -> Self {
        let mut counted = Counted::default();
        for (entity, k) in lose {
            counted.lose.entry(entity).or_default().insert(k);
        }
        counted
    }

    /// Count one more for `entity`; true if this is one to lose.
    fn count(&mut self, entity: &str) -> bool {
        if self.lose.is_empty() {
            return false;
        }
        let entity = entity.to_lowercase();
        let Some(lose) = self.lose.get(&entity) else {
            return false;
        };
        let seen = self.seen.entry(entity).or_default();
        *seen += 1;
        lose.contains(seen)
    }
}

impl LostSettlements {
    pub fn new(
        sends: Vec<(String, usize)>,
        token_puts: Vec<(String, usize)>,
        token_put_settlements: Vec<(String, usize)>,
    ) -> Self {
        LostSettlements {
            any: !sends.is_empty() || !token_puts.is_empty() || !token_put_settlements.is_empty(),
            sends: Mutex::new(Counted::new(sends)),
            token_puts: Mutex::new(Counted::new(token_puts)),
            token_put_settlements: Mutex::new(Counted::new(token_put_settlements)),
        }
    }

    /// Count a send to `entity`; true if its settlement is to be lost.
    pub fn send(&self, entity: &str) -> bool {
        self.any && self.sends.lock().expect("lost sends lock").count(entity)
    }

    /// Count a token put for `entity`; true if it is to be lost.
    pub fn token_put(&self, entity: &str) -> bool {
        self.any && self.token_puts.lock().expect("lost token puts lock").count(entity)
    }

    /// Count a token put for `entity` that is answered; true if its
    /// settlement is to be lost (the answer still comes).
    pub fn token_put_settlement(&self, entity: &str) -> bool {
        self.any
            && self
                .token_put_settlements
                .lock()
                .expect("lost token put settlements lock")
                .count(entity)
    }
}

/// Accepts AMQP connections on `listener`; with `tls`, each one is TLS
/// from its first byte, as on Azure's port 5671 (no AMQP TLS header first).
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, broker: Arc<Broker>, settings: AmqpSettings) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "AMQP accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (broker, settings, tls) = (broker.clone(), settings.clone(), tls.clone());
        tokio::spawn(async move {
            tracing::debug!(%peer, tls = tls.is_some(), "AMQP connection opened");
            let served = match tls {
                None => connection::serve(stream, broker, settings).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => connection::serve(stream, broker, settings).await,
                    Err(error) => {
                        tracing::info!(%peer, %error, "AMQP TLS handshake failed");
                        return;
                    }
                },
            };
            match served {
                Ok(()) => tracing::debug!(%peer, "AMQP connection closed"),
                Err(error) if error.is_disconnect() => {
                    tracing::debug!(%peer, %error, "AMQP client disconnected")
                }
                Err(error) => tracing::warn!(%peer, %error, "AMQP connection failed"),
            }
        });
    }
}
