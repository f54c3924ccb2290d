//! The AMQP 1.0 listener, written on fe2o3-amqp-types rather than the
//! fe2o3-amqp acceptor: Service Bus clients need delivery tags that are lock
//! tokens, echoed dispositions and raw message bytes, which the acceptor hides.

mod connection;
mod frame;
mod management;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::broker::Broker;

#[derive(Debug, Clone, Copy)]
pub struct AmqpSettings {
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
}

pub async fn serve(listener: TcpListener, broker: Arc<Broker>, settings: AmqpSettings) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "AMQP accept failed");
                continue;
            }
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            tracing::debug!(%peer, "AMQP connection opened");
            match connection::serve(stream, broker, settings).await {
                Ok(()) => tracing::debug!(%peer, "AMQP connection closed"),
                Err(error) if error.is_disconnect() => {
                    tracing::debug!(%peer, %error, "AMQP client disconnected")
                }
                Err(error) => tracing::warn!(%peer, %error, "AMQP connection failed"),
            }
        });
    }
}
