//! Request and response on a `$cbs` or `$management` node, ended by the
//! node's answer rather than by the request's settlement.
//!
//! fe2o3-amqp 0.14 records a send as awaiting its outcome only once the
//! transfer has been handed to its session; a settlement that comes back
//! before that is dropped, and `MgmtClient::call` (and
//! `CbsClient::put_token`, built on it) then waits for it for ever. Two CI
//! runs lost a token put that way on a fresh connection, with the emulator
//! holding its settlements back 20 ms, and the redrive failed. The answer is
//! a message on the paired receiver link, which that race does not touch,
//! and it is all a call needs: a node answers only a request it took. So
//! [`RpcLink::call`] queues the request without waiting for its settlement
//! and ends at the answer; a settlement that does come and refuses the
//! request still fails the call. The request is sent as before (unsettled,
//! as every Azure SDK sends it), so the broker sees no difference.
//!
//! Answers are matched to requests by correlation ID: one left over from a
//! call that timed out is skipped rather than taken as the next call's.
//!
//! A settlement lost to that race leaves its request in fe2o3-amqp's map of
//! unsettled deliveries until the link closes: a few hundred bytes each time
//! the race is lost, which on a real network (a round trip of milliseconds
//! against a window of microseconds) is close to never.

use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::{DetachError, SendError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Receiver, Sender};
use fe2o3_amqp_cbs::put_token::{PutTokenRequest, PutTokenResponse};
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_management::error::{AttachError, Error as ManagementError};
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use fe2o3_amqp_types::messaging::{FromBody, IntoBody, MessageId, Outcome, Properties};

/// The node that takes claims-based-security tokens.
const CBS_NODE: &str = "$cbs";
/// The reply address of the `$cbs` client (fe2o3-amqp-cbs's default).
const CBS_CLIENT_NODE: &str = "cbs-client-node";

/// A sender link to a node and the receiver link its answers come back on.
#[derive(Debug)]
pub(super) struct RpcLink {
    sender: Sender,
    receiver: Receiver,
    reply_to: String,
    next_id: u64,
}

impl RpcLink {
    /// Attach to `node`, with answers addressed to `client`.
    pub async fn attach(session: &mut SessionHandle<()>, node: &str, client: &str) -> Result<Self, AttachError> {
        let sender = Sender::builder()
            .name(format!("{client}-mgmt-sender"))
            .target(node)
            .attach(session)
            .await?;
        let receiver = Receiver::builder()
            .name(format!("{client}-mgmt-receiver"))
            .source(node)
            .target(client)
            .attach(session)
            .await;
        let receiver = match receiver {
            Ok(receiver) => receiver,
            Err(e) => {
                // Closed, not dropped: fe2o3-amqp ends the session when the
                // answer to a dropped link's detach comes (see `DestSender`).
                tokio::spawn(sender.close());
                return Err(e.into());
            }
        };
        Ok(RpcLink {
            sender,
            receiver,
            reply_to: client.to_string(),
            next_id: 0,
        })
    }

    /// Attach to the namespace's `$cbs` node.
    pub async fn cbs(session: &mut SessionHandle<()>) -> Result<Self, AttachError> {
        Self::attach(session, CBS_NODE, CBS_CLIENT_NODE).await
    }

    /// Put `token` for `audience` on `$cbs`.
    pub async fn put_token(&mut self, audience: &str, token: &CbsToken<'_>) -> Result<(), ManagementError> {
        let request = PutTokenRequest::new(
            audience,
            token.token_value(),
            token.expires_at_utc().clone(),
            token.token_type(),
            None,
        );
        let _: PutTokenResponse = self.call(request).await?;
        Ok(())
    }

    /// Detach both links, the receiver even when the sender's close fails.
    pub async fn close(self) -> Result<(), DetachError> {
        let sent = self.sender.close().await;
        let received = self.receiver.close().await;
        sent.and(received)
    }

    /// Send `request` and return the node's answer to it.
    pub async fn call<Req, Res>(&mut self, request: Req) -> Result<Res, ManagementError>
    where
        Req: Request<Response = Res>,
        Res: Response,
        Res::Error: Into<ManagementError>,
        for<'de> Res::Body: FromBody<'de> + std::fmt::Debug + Send,
    {
        let id = MessageId::from(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        let mut message = request.into_message().map_body(IntoBody::into_body);
        let properties = message.properties.get_or_insert_with(Properties::default);
        properties.message_id = Some(id.clone());
        properties.reply_to = Some(self.reply_to.clone());
        let settlement: DeliveryFut<Result<Outcome, SendError>> = self.sender.send_batchable(message).await?;
        tokio::pin!(settlement);
        let mut settled = false;
        loop {
            tokio::select! {
                outcome = &mut settlement, if !settled => {
                    settled = true;
                    outcome?.accepted_or_else(ManagementError::NotAccepted)?;
                }
                delivery = self.receiver.recv::<Res::Body>() => {
                    let delivery = delivery?;
                    self.receiver.accept(&delivery).await?;
                    let message = delivery.into_message();
                    let answers = message
                        .properties
                        .as_ref()
                        .and_then(|p| p.correlation_id.as_ref())
                        .is_none_or(|correlation| *correlation == id);
                    if answers {
                        return Res::from_message(message).map_err(Into::into);
                    }
                    tracing::debug!(?id, "skipping an answer to an earlier request");
                }
            }
        }
    }
}
