//! One client connection: SASL, then sessions and links, driven by a single task.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::{
    definitions::{self, AmqpError, ErrorCondition, Handle, LinkError, Role, SenderSettleMode},
    messaging::{Accepted, DeliveryState, Modified, Rejected, Source, TargetArchetype},
    performatives::{Attach, Begin, Close, Detach, Disposition, End, Flow, Open, Performative, Transfer},
    primitives::{Array, Symbol},
    sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome},
};
use serde_amqp::value::Value;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    sync::{mpsc, watch},
    time::{Instant, sleep_until},
};
use uuid::Uuid;

use super::{
    AmqpSettings,
    frame::{self, AMQP_HEADER, Frame, FrameError, SASL_HEADER},
    management,
};
use crate::broker::{
    Broker, BrokerError, Outcome, ReceiveMode,
    address::{self, Node},
    codec::{self, Request},
    now_ms,
};
use crate::sas::{Right, Rights};

/// Our receive limits: generous, so that clients never stall on flow control.
const MAX_FRAME_SIZE: u32 = 1024 * 1024;
const SESSION_WINDOW: u32 = 50_000;
const LINK_CREDIT: u32 = 5_000;
const MAX_MESSAGE_SIZE: u64 = 256 * 1024 * 1024;

const DEAD_LETTER_CONDITION: &str = "com.microsoft:dead-letter";
const LOCK_LOST_CONDITION: &str = "com.microsoft:message-lock-lost";

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("protocol header {0:?} is not AMQP 1.0")]
    BadProtocolHeader([u8; 8]),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ConnectionError {
    /// The client went away without closing: routine for SDKs that drop sockets.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ConnectionError::Frame(FrameError::Io(e)) if matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
        ))
    }
}

impl From<std::io::Error> for ConnectionError {
    fn from(error: std::io::Error) -> Self {
        ConnectionError::Frame(FrameError::Io(error))
    }
}

/// The path a token must cover for a link to `node`, lower-cased as
/// [`management::token_audience`] gives audiences (None: `$cbs` itself).
fn token_path(node: &Node) -> Option<String> {
    let path = match node {
        Node::Entity(p) => p.to_string(),
        Node::Management(p) => format!("{p}/$management"),
        Node::Cbs => return None,
    };
    Some(path.to_lowercase())
}

fn amqp_error(condition: ErrorCondition, description: impl Into<String>) -> definitions::Error {
    definitions::Error {
        condition,
        description: Some(description.into()),
        info: None,
    }
}

fn custom_condition(name: &str) -> ErrorCondition {
    ErrorCondition::Custom(Symbol::from(name))
}

impl From<&BrokerError> for definitions::Error {
    fn from(error: &BrokerError) -> Self {
        let condition = match error {
            BrokerError::NotFound(_) => ErrorCondition::AmqpError(AmqpError::NotFound),
            BrokerError::LockLost => custom_condition(LOCK_LOST_CONDITION),
            BrokerError::MessageNotFound(_) => custom_condition("com.microsoft:message-not-found"),
            BrokerError::NotAllowed(_) => ErrorCondition::AmqpError(AmqpError::NotAllowed),
            BrokerError::Codec(_) => ErrorCondition::AmqpError(AmqpError::DecodeError),
            BrokerError::QuotaExceeded { .. } => ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded),
            BrokerError::Conflict(_) => custom_condition("com.microsoft:entity-already-exists"),
            BrokerError::ServerBusy(_) => custom_condition("com.microsoft:server-busy"),
            BrokerError::EntityDisabled(_) => custom_condition("com.microsoft:entity-disabled"),
        };
        amqp_error(condition, error.to_string())
    }
}

/// A transfer split over several frames, being reassembled.
#[derive(Debug)]
struct Partial {
    delivery_id: u32,
    settled: bool,
    message_format: u32,
    payload: BytesMut,
}

#[derive(Debug)]
enum Direction {
    /// The client sends, the emulator receives.
    Inbound {
        credit: u32,
        delivery_count: u32,
        partial: Option<Partial>,
    },
    /// The emulator sends, the client receives.
    Outbound {
        credit: u32,
        delivery_count: u32,
        drain: bool,
        mode: ReceiveMode,
        /// Replies of `$cbs` and `$management`, waiting for credit.
        replies: VecDeque<Bytes>,
        /// The client's target address, which request messages name in reply-to.
        reply_address: Option<String>,
    },
}

#[derive(Debug)]
struct Link {
    /// The client's name for the link, which Azure's detach names.
    name: String,
    node: Node,
    direction: Direction,
    /// The last transfer on the link, either way, or disposition of one of
    /// its deliveries: what Azure's idle timer counts (credit does not).
    last_active: Instant,
}

impl Link {
    fn touch(&mut self) {
        self.last_active = Instant::now();
    }
}

#[derive(Debug)]
struct Sent {
    handle: u32,
    lock_token: Uuid,
}

#[derive(Debug)]
struct Session {
    next_outgoing_id: u32,
    next_incoming_id: u32,
    incoming_since_flow: u32,
    links: HashMap<u32, Link>,
    unsettled: HashMap<u32, Sent>,
    /// Links we detached whose client has not answered with its own detach
    /// yet: until it does, the handle is still the client's, and transfers
    /// it sent before it saw our detach are dropped, not a protocol error.
    detaching: HashSet<u32>,
}

impl Session {
    fn flow(&self, handle: Option<u32>) -> Flow {
        session_flow(self.next_incoming_id, self.next_outgoing_id, handle)
    }
}

/// A flow frame carrying the session's state, for `handle` if given.
fn session_flow(next_incoming_id: u32, next_outgoing_id: u32, handle: Option<u32>) -> Flow {
    Flow {
        next_incoming_id: Some(next_incoming_id),
        incoming_window: SESSION_WINDOW,
        next_outgoing_id,
        outgoing_window: SESSION_WINDOW,
        handle: handle.map(Handle),
        delivery_count: None,
        link_credit: None,
        available: None,
        drain: false,
        echo: false,
        properties: None,
    }
}

struct Connection {
    broker: Arc<Broker>,
    settings: AmqpSettings,
    out: BytesMut,
    peer_max_frame_size: usize,
    sessions: HashMap<u16, Session>,
    /// Accepts for inbound deliveries, held back by `accept_delay`.
    pending_accepts: Vec<(u16, u32)>,
    /// Refusals (`rejected`) of inbound deliveries, held back as the
    /// accepts are: fe2o3-amqp loses a refusal that comes too fast just as it
    /// loses an accept.
    pending_refusals: Vec<(u16, u32, DeliveryState)>,
    accept_deadline: Option<Instant>,
    /// With `enforce_token_expiry`, `require_tokens` or SAS rules: the
    /// tokens put on `$cbs`.
    tokens: Vec<PutToken>,
    /// The broker's count of deletes this connection has acted on.
    deletions_seen: u64,
    /// The last time the connection had a link to an entity or a
    /// `$management` node (`$cbs` does not count, as on Azure).
    last_linked: Instant,
    closed: bool,
}

/// A token put on `$cbs`: the audience path it was put for (see
/// [`management::token_audience`]), when it expires (`i64::MAX`: not
/// enforced) and what it allows.
struct PutToken {
    audience: String,
    expires: i64,
    rights: Rights,
}

/// Serves one connection on `stream`: a TCP stream, or TLS over one (amqps).
pub async fn serve<S>(stream: S, broker: Arc<Broker>, settings: AmqpSettings) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(reader);
    handshake(&mut reader, &mut writer).await?;

    // Reading runs in its own task so that a half-read frame is never lost
    // when the main loop wakes up for something else.
    let (frames_tx, mut frames) = mpsc::channel::<Result<Frame, FrameError>>(256);
    let reader_task = tokio::spawn(async move {
        loop {
            let frame = frame::read_frame(&mut reader, MAX_FRAME_SIZE as usize).await;
            let failed = frame.is_err();
            if frames_tx.send(frame).await.is_err() || failed {
                break;
            }
        }
    });

    let mut changed: watch::Receiver<u64> = broker.subscribe();
    let deletions_seen = broker.deletions();
    let mut connection = Connection {
        broker,
        settings,
        out: BytesMut::new(),
        peer_max_frame_size: 512,
        sessions: HashMap::new(),
        pending_accepts: Vec::new(),
        pending_refusals: Vec::new(),
        accept_deadline: None,
        tokens: Vec::new(),
        deletions_seen,
        last_linked: Instant::now(),
        closed: false,
    };
    let mut heartbeat: Option<tokio::time::Interval> = None;
    let mut expiry_check = connection
        .settings
        .enforce_token_expiry
        .then(|| tokio::time::interval(Duration::from_millis(100)));
    let link_idle_timeout = Some(connection.settings.link_idle_timeout).filter(|t| !t.is_zero());
    let connection_idle_timeout = Some(connection.settings.connection_idle_timeout).filter(|t| !t.is_zero());
    // Checked often enough that a link or connection outlives its timeout by
    // a tenth at most.
    let mut idle_check = [link_idle_timeout, connection_idle_timeout]
        .into_iter()
        .flatten()
        .min()
        .map(|t| tokio::time::interval((t / 10).max(Duration::from_millis(50))));
    let result = loop {
        let deadline = connection.accept_deadline;
        let step = tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(frame)) => connection.handle(frame, &mut heartbeat),
                Some(Err(FrameError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Some(Err(error)) => Err(error.into()),
                None => break Ok(()),
            },
            Ok(()) = changed.changed() => connection.detach_deleted().and_then(|()| connection.pump()),
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                connection.flush_settlements()
            }
            _ = async { heartbeat.as_mut().expect("guarded").tick().await }, if heartbeat.is_some() => {
                frame::put_empty(&mut connection.out);
                Ok(())
            }
            _ = async { expiry_check.as_mut().expect("guarded").tick().await }, if expiry_check.is_some() => {
                connection.detach_expired()
            }
            _ = async { idle_check.as_mut().expect("guarded").tick().await }, if idle_check.is_some() => {
                link_idle_timeout
                    .map_or(Ok(()), |t| connection.detach_idle(t))
                    .and_then(|()| connection_idle_timeout.map_or(Ok(()), |t| connection.close_if_unlinked(t)))
            }
        };
        if let Err(error) = step {
            break Err(error);
        }
        if !connection.out.is_empty() {
            if let Err(error) = writer.write_all(&connection.out).await {
                break Err(error.into());
            }
            connection.out.clear();
        }
        if connection.closed {
            break Ok(());
        }
    };
    reader_task.abort();
    result
}

/// Protocol headers and SASL. Any mechanism is accepted: the emulator has no
/// identities, and clients send ANONYMOUS, PLAIN or MSSBCBS.
async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut BufReader<R>,
    writer: &mut W,
) -> Result<(), ConnectionError> {
    let mut header = [0u8; 8];
    reader.read_exact(&mut header).await?;
    if header == SASL_HEADER {
        writer.write_all(&SASL_HEADER).await?;
        let mut out = BytesMut::new();
        let mechanisms = ["ANONYMOUS", "PLAIN", "MSSBCBS", "EXTERNAL"]
            .into_iter()
            .map(Symbol::from)
            .collect();
        frame::put_sasl(
            &mut out,
            &SaslMechanisms {
                sasl_server_mechanisms: Array(mechanisms),
            },
        )?;
        writer.write_all(&out).await?;
        let init: SaslInit = frame::read_sasl(reader).await?;
        tracing::debug!(mechanism = init.mechanism.as_str(), "SASL init");
        out.clear();
        frame::put_sasl(
            &mut out,
            &SaslOutcome {
                code: SaslCode::Ok,
                additional_data: None,
            },
        )?;
        writer.write_all(&out).await?;
        reader.read_exact(&mut header).await?;
    }
    if header != AMQP_HEADER {
        writer.write_all(&AMQP_HEADER).await?;
        return Err(ConnectionError::BadProtocolHeader(header));
    }
    writer.write_all(&AMQP_HEADER).await?;
    Ok(())
}

impl Connection {
    fn send(&mut self, channel: u16, performative: Performative) -> Result<(), ConnectionError> {
        frame::put_performative(&mut self.out, channel, &performative)?;
        Ok(())
    }

    fn session(&mut self, channel: u16) -> Result<&mut Session, ConnectionError> {
        self.sessions
            .get_mut(&channel)
            .ok_or_else(|| ConnectionError::Protocol(format!("no session on channel {channel}")))
    }

    fn handle(&mut self, frame: Frame, heartbeat: &mut Option<tokio::time::Interval>) -> Result<(), ConnectionError> {
        let Some(performative) = frame.performative else {
            return Ok(()); // heartbeat
        };
        let channel = frame.channel;
        match performative {
            Performative::Open(open) => {
                self.peer_max_frame_size = open.max_frame_size.0 as usize;
                if let Some(idle) = open.idle_time_out.filter(|ms| *ms > 0) {
                    // Half the peer's idle timeout, as the spec recommends.
                    let period = Duration::from_millis(u64::from(idle) / 2);
                    *heartbeat = Some(tokio::time::interval_at(Instant::now() + period, period));
                }
                self.send(
                    0,
                    Performative::Open(Open {
                        container_id: "servicebus-emulator".into(),
                        hostname: None,
                        max_frame_size: MAX_FRAME_SIZE.into(),
                        channel_max: open.channel_max.0.into(),
                        idle_time_out: None,
                        outgoing_locales: None,
                        incoming_locales: None,
                        offered_capabilities: None,
                        desired_capabilities: None,
                        properties: None,
                    }),
                )
            }
            Performative::Begin(begin) => self.on_begin(channel, begin),
            Performative::Attach(attach) => self.on_attach(channel, attach),
            Performative::Flow(flow) => self.on_flow(channel, flow),
            Performative::Transfer(transfer) => self.on_transfer(channel, transfer, frame.payload),
            Performative::Disposition(disposition) => self.on_disposition(channel, disposition),
            // Locks of unsettled deliveries stay until they expire, as on Azure.
            Performative::Detach(detach) => self.on_detach(channel, detach.handle.0),
            Performative::End(_) => {
                self.sessions.remove(&channel);
                self.pending_accepts.retain(|(c, _)| *c != channel);
                self.pending_refusals.retain(|(c, _, _)| *c != channel);
                self.send(channel, Performative::End(End { error: None }))
            }
            Performative::Close(_) => {
                self.closed = true;
                self.send(0, Performative::Close(Close { error: None }))
            }
        }
    }

    fn on_begin(&mut self, channel: u16, begin: Begin) -> Result<(), ConnectionError> {
        // Answer on the same channel number: ours are allocated one-to-one.
        let session = Session {
            next_outgoing_id: 1,
            next_incoming_id: begin.next_outgoing_id,
            incoming_since_flow: 0,
            links: HashMap::new(),
            unsettled: HashMap::new(),
            detaching: HashSet::new(),
        };
        self.sessions.insert(channel, session);
        self.send(
            channel,
            Performative::Begin(Begin {
                remote_channel: Some(channel),
                next_outgoing_id: 1,
                incoming_window: SESSION_WINDOW,
                outgoing_window: SESSION_WINDOW,
                handle_max: begin.handle_max,
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
        )
    }

    fn on_attach(&mut self, channel: u16, attach: Attach) -> Result<(), ConnectionError> {
        let client_sends = attach.role == Role::Sender;
        let target_address = match attach.target.as_deref() {
            Some(TargetArchetype::Target(target)) => target.address.clone(),
            _ => None,
        };
        let address = if client_sends {
            target_address.clone()
        } else {
            attach.source.as_ref().and_then(|s| s.address.clone())
        };
        let node = self.check_attach(&attach, address.as_deref(), client_sends);
        let handle = attach.handle.0;
        let mut reply = Attach {
            name: attach.name.clone(),
            handle: attach.handle.clone(),
            role: if client_sends { Role::Receiver } else { Role::Sender },
            snd_settle_mode: attach.snd_settle_mode.clone(),
            // Echoed: fe2o3-amqp (azservicebus) refuses a link whose mode differs.
            rcv_settle_mode: attach.rcv_settle_mode.clone(),
            source: attach.source.clone(),
            target: attach.target.clone(),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: (!client_sends).then_some(0),
            max_message_size: Some(MAX_MESSAGE_SIZE),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let node = match node {
            Ok(node) => node,
            Err(error) => {
                tracing::info!(link = %attach.name, ?address, reason = ?error.description, "refusing link");
                // A refused link answers with a null terminus, then detaches (2.6.3).
                if client_sends {
                    reply.target = None;
                } else {
                    reply.source = None;
                }
                self.send(channel, Performative::Attach(reply))?;
                return self.detach(channel, handle, Some(error));
            }
        };
        tracing::debug!(link = %attach.name, ?node, client_sends, "attached");
        if client_sends && let Node::Entity(path) = &node {
            reply.max_message_size = Some(self.max_message_size(path));
        }
        self.send(channel, Performative::Attach(reply))?;
        let direction = if client_sends {
            Direction::Inbound {
                credit: LINK_CREDIT,
                delivery_count: attach.initial_delivery_count.unwrap_or(0),
                partial: None,
            }
        } else {
            Direction::Outbound {
                credit: 0,
                delivery_count: 0,
                drain: false,
                mode: if attach.snd_settle_mode == SenderSettleMode::Settled {
                    ReceiveMode::ReceiveAndDelete
                } else {
                    ReceiveMode::PeekLock
                },
                replies: VecDeque::new(),
                reply_address: target_address,
            }
        };
        let session = self.session(channel)?;
        let link = Link {
            name: attach.name.to_string(),
            node,
            direction,
            last_active: Instant::now(),
        };
        session.links.insert(handle, link);
        if client_sends {
            let mut flow = session.flow(Some(handle));
            flow.delivery_count = Some(attach.initial_delivery_count.unwrap_or(0));
            flow.link_credit = Some(LINK_CREDIT);
            self.send(channel, Performative::Flow(flow))?;
        }
        Ok(())
    }

    /// Decides whether a link may attach, and to which node.
    fn check_attach(
        &self,
        attach: &Attach,
        address: Option<&str>,
        client_sends: bool,
    ) -> Result<Node, definitions::Error> {
        if matches!(attach.target.as_deref(), Some(TargetArchetype::Coordinator(_))) {
            return Err(amqp_error(
                ErrorCondition::AmqpError(AmqpError::NotImplemented),
                "servicebus-emulator does not implement transactions",
            ));
        }
        if !client_sends && has_session_filter(attach.source.as_deref()) {
            return Err(amqp_error(
                ErrorCondition::AmqpError(AmqpError::NotImplemented),
                "servicebus-emulator does not implement sessions",
            ));
        }
        let address = address.ok_or_else(|| {
            amqp_error(
                ErrorCondition::AmqpError(AmqpError::InvalidField),
                "the link has no address",
            )
        })?;
        let node = address::parse(address)
            .map_err(|error| amqp_error(ErrorCondition::AmqpError(AmqpError::NotFound), error.to_string()))?;
        match &node {
            Node::Cbs => {}
            Node::Entity(path) | Node::Management(path) => {
                if self.settings.require_tokens || self.settings.sas.is_some() {
                    self.check_token(&node, client_sends)?;
                }
                // A queue's or topic's `$management` node is attached like a
                // sender (azservicebus opens one next to every sender, also on
                // a topic, which refuses receivers); those of subscriptions and
                // dead-letter queues like a receiver.
                let sending = match &node {
                    Node::Entity(_) => client_sends,
                    _ => path.subscription.is_none() && !path.sub_queue.is_dead_letter(),
                };
                self.broker
                    .attach(path, sending)
                    .map_err(|error| definitions::Error::from(&error))?;
            }
        }
        Ok(node)
    }

    fn on_flow(&mut self, channel: u16, flow: Flow) -> Result<(), ConnectionError> {
        let session = self.session(channel)?;
        let Some(handle) = flow.handle.as_ref().map(|h| h.0) else {
            if flow.echo {
                let reply = session.flow(None);
                self.send(channel, Performative::Flow(reply))?;
            }
            return Ok(());
        };
        let Some(link) = session.links.get_mut(&handle) else {
            return Ok(());
        };
        let echo = match &mut link.direction {
            Direction::Outbound {
                credit,
                delivery_count,
                drain,
                ..
            } => {
                // link-credit(snd) = delivery-count(rcv) + link-credit(rcv) - delivery-count(snd)
                let theirs = flow.delivery_count.unwrap_or(0);
                *credit = theirs
                    .wrapping_add(flow.link_credit.unwrap_or(0))
                    .wrapping_sub(*delivery_count);
                *drain = flow.drain;
                flow.echo.then_some((*delivery_count, *credit))
            }
            Direction::Inbound {
                credit, delivery_count, ..
            } => flow.echo.then_some((*delivery_count, *credit)),
        };
        if let Some((delivery_count, credit)) = echo {
            let mut reply = session.flow(Some(handle));
            reply.delivery_count = Some(delivery_count);
            reply.link_credit = Some(credit);
            self.send(channel, Performative::Flow(reply))?;
        }
        self.pump()
    }

    fn on_transfer(&mut self, channel: u16, transfer: Transfer, payload: Bytes) -> Result<(), ConnectionError> {
        let session = self.session(channel)?;
        session.next_incoming_id = session.next_incoming_id.wrapping_add(1);
        session.incoming_since_flow += 1;
        let handle = transfer.handle.0;
        if session.detaching.contains(&handle) {
            // Sent before the client saw our detach: it learns the link's
            // fate from that detach, as on Azure. A transfer left half-read
            // belongs to the dropped link too.
            return Ok(());
        }
        let link = session
            .links
            .get_mut(&handle)
            .ok_or_else(|| ConnectionError::Protocol(format!("transfer on unknown handle {handle}")))?;
        link.touch();
        let Direction::Inbound {
            credit,
            delivery_count,
            partial,
        } = &mut link.direction
        else {
            return Err(ConnectionError::Protocol(
                "transfer on a link the emulator sends on".into(),
            ));
        };
        let mut current = match partial.take() {
            Some(p) => p,
            None => Partial {
                delivery_id: transfer
                    .delivery_id
                    .ok_or_else(|| ConnectionError::Protocol("first transfer frame has no delivery-id".into()))?,
                settled: false,
                message_format: transfer.message_format.unwrap_or(0),
                payload: BytesMut::new(),
            },
        };
        current.settled |= transfer.settled.unwrap_or(false);
        current.payload.extend_from_slice(&payload);
        if transfer.aborted {
            return Ok(());
        }
        if transfer.more {
            *partial = Some(current);
            return Ok(());
        }
        *delivery_count = delivery_count.wrapping_add(1);
        *credit = credit.saturating_sub(1);
        let refill = *credit < LINK_CREDIT / 2;
        if refill {
            *credit = LINK_CREDIT;
        }
        let (link_delivery_count, link_credit) = (*delivery_count, *credit);
        let node = link.node.clone();
        let refill_session = session.incoming_since_flow >= SESSION_WINDOW / 2;
        if refill || refill_session {
            session.incoming_since_flow = 0;
            let mut flow = session.flow(Some(handle));
            flow.delivery_count = Some(link_delivery_count);
            flow.link_credit = Some(link_credit);
            self.send(channel, Performative::Flow(flow))?;
        }

        let payload = current.payload.freeze();
        if let Node::Entity(path) = &node
            && payload.len() as u64 > self.max_message_size(path)
        {
            // As Azure: the link is detached, and every transfer still
            // unsettled on it goes with it.
            let description = format!(
                "The received message (delivery-id:{}, size:{} bytes) exceeds the limit ({} bytes) currently allowed on the link.",
                current.delivery_id,
                payload.len(),
                self.max_message_size(path)
            );
            tracing::info!(%description, "detaching a link for an oversized message");
            let error = amqp_error(ErrorCondition::LinkError(LinkError::MessageSizeExceeded), description);
            return self.detach(channel, handle, Some(error));
        }
        let (result, lost) = match &node {
            Node::Entity(path) => {
                let result = codec::parse_transfer(current.message_format, &payload)
                    .map_err(BrokerError::from)
                    .and_then(|messages| self.broker.send(&path.entity, messages));
                (result, !current.settled && self.settings.lost.send(&path.entity))
            }
            Node::Cbs | Node::Management(_) => {
                let answered = self.answer_request(channel, &node, &payload)?;
                (Ok(()), !answered)
            }
        };
        if current.settled {
            if let Err(error) = result {
                tracing::warn!(%error, "pre-settled transfer failed");
            }
            return Ok(());
        }
        if lost {
            tracing::info!(
                ?node,
                delivery_id = current.delivery_id,
                ?result,
                "losing a settlement on purpose"
            );
            return Ok(());
        }
        match result {
            Ok(()) if self.settings.accept_delay.is_zero() => {
                self.dispose_inbound(channel, current.delivery_id, DeliveryState::Accepted(Accepted {}))
            }
            Ok(()) => {
                // Held back a little: fe2o3-amqp <= 0.16 (azservicebus) loses
                // a settlement that arrives before it starts waiting for one.
                self.pending_accepts.push((channel, current.delivery_id));
                self.hold_settlements();
                Ok(())
            }
            Err(error) => {
                tracing::info!(%error, "rejecting transfer");
                let state = DeliveryState::Rejected(Rejected {
                    error: Some((&error).into()),
                });
                if self.settings.accept_delay.is_zero() {
                    return self.dispose_inbound(channel, current.delivery_id, state);
                }
                self.pending_refusals.push((channel, current.delivery_id, state));
                self.hold_settlements();
                Ok(())
            }
        }
    }

    /// Start the `accept_delay` clock for the settlements held back, unless
    /// it is already running.
    fn hold_settlements(&mut self) {
        if self.accept_deadline.is_none() {
            self.accept_deadline = Some(Instant::now() + self.settings.accept_delay);
        }
    }

    /// The largest message a sender's link to `path` takes.
    fn max_message_size(&self, path: &crate::broker::EntityPath) -> u64 {
        self.settings
            .max_message_size
            .get(&path.entity)
            .copied()
            .unwrap_or(MAX_MESSAGE_SIZE)
    }

    fn dispose_inbound(&mut self, channel: u16, delivery_id: u32, state: DeliveryState) -> Result<(), ConnectionError> {
        self.send(
            channel,
            Performative::Disposition(Disposition {
                role: Role::Receiver,
                first: delivery_id,
                last: None,
                settled: true,
                state: Some(state),
                batchable: false,
            }),
        )
    }

    fn flush_settlements(&mut self) -> Result<(), ConnectionError> {
        self.accept_deadline = None;
        for (channel, delivery_id, state) in std::mem::take(&mut self.pending_refusals) {
            self.dispose_inbound(channel, delivery_id, state)?;
        }
        let mut pending = std::mem::take(&mut self.pending_accepts);
        pending.sort_unstable();
        // Consecutive delivery ids on one channel collapse into one range.
        let mut index = 0;
        while index < pending.len() {
            let (channel, first) = pending[index];
            let mut last = first;
            while index + 1 < pending.len() && pending[index + 1] == (channel, last.wrapping_add(1)) {
                index += 1;
                last = pending[index].1;
            }
            index += 1;
            self.send(
                channel,
                Performative::Disposition(Disposition {
                    role: Role::Receiver,
                    first,
                    last: (last != first).then_some(last),
                    settled: true,
                    state: Some(DeliveryState::Accepted(Accepted {})),
                    batchable: false,
                }),
            )?;
        }
        Ok(())
    }

    /// Runs a `$cbs` or `$management` request and queues its reply on the
    /// link paired with it by address (the Python SDK leaves reply-to unset).
    /// False when the request's settlement is to be lost: a token put lost
    /// on purpose (`--lose-token-put`) gets neither an answer nor a
    /// settlement; one whose settlement alone is lost
    /// (`--lose-token-put-settlement`) is answered.
    fn answer_request(&mut self, channel: u16, node: &Node, payload: &Bytes) -> Result<bool, ConnectionError> {
        let request = match Request::parse(payload) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(%error, "undecodable request");
                return Ok(true);
            }
        };
        let mut settle = true;
        let encoded = match node {
            Node::Cbs => {
                let audience = management::token_audience(&request);
                if audience.as_deref().is_some_and(|a| self.settings.lost.token_put(a)) {
                    return Ok(false);
                }
                settle = !audience.is_some_and(|a| self.settings.lost.token_put_settlement(&a));
                let (status, description) = self.put_token(&request);
                management::encode_cbs_reply(&request, status, &description)
            }
            Node::Management(path) => {
                let reply = management::handle(&self.broker, path, &request);
                management::encode_reply(&request, reply)
            }
            Node::Entity(_) => return Ok(true),
        };
        let reply = match encoded {
            Ok(reply) => reply,
            Err(error) => {
                tracing::warn!(%error, "cannot encode reply");
                return Ok(true);
            }
        };
        let reply_to = request.properties.reply_to.as_deref();
        if let Some(replies) = self.reply_link(channel, node, reply_to) {
            replies.push_back(reply);
        } else {
            tracing::warn!(?node, ?reply_to, "no receiver link to reply on");
        }
        self.pump()?;
        Ok(settle)
    }

    fn reply_link(&mut self, channel: u16, node: &Node, reply_to: Option<&str>) -> Option<&mut VecDeque<Bytes>> {
        // Prefer the request's own session, then any link naming reply-to.
        let mut channels: Vec<u16> = self.sessions.keys().copied().collect();
        channels.sort_by_key(|c| *c != channel);
        let mut best: Option<(u16, u32, bool)> = None;
        for c in channels {
            for (handle, link) in &self.sessions[&c].links {
                if let Direction::Outbound { reply_address, .. } = &link.direction {
                    if &link.node != node {
                        continue;
                    }
                    let exact = reply_to.is_some() && reply_address.as_deref() == reply_to;
                    if best.is_none_or(|(_, _, was_exact)| exact && !was_exact) {
                        best = Some((c, *handle, exact));
                    }
                }
            }
        }
        let (c, handle, _) = best?;
        match &mut self.sessions.get_mut(&c)?.links.get_mut(&handle)?.direction {
            Direction::Outbound { replies, .. } => Some(replies),
            Direction::Inbound { .. } => None,
        }
    }

    /// Hands messages to every receiving link that has credit.
    fn pump(&mut self) -> Result<(), ConnectionError> {
        let max_frame = self.peer_max_frame_size;
        let mut failed = Vec::new();
        for (&channel, session) in &mut self.sessions {
            for (&handle, link) in &mut session.links {
                let Direction::Outbound {
                    credit,
                    delivery_count,
                    drain,
                    mode,
                    replies,
                    ..
                } = &mut link.direction
                else {
                    continue;
                };
                while *credit > 0 {
                    let (payload, tag, lock_token) = if let Some(reply) = replies.pop_front() {
                        (reply, session.next_outgoing_id.to_be_bytes().to_vec(), None)
                    } else if let Node::Entity(path) = &link.node {
                        match self.broker.acquire(path, *mode) {
                            Ok(Some(acquired)) => {
                                // Service Bus tags a delivery with its lock token in .NET (mixed-endian) order.
                                let tag = acquired.lock_token.unwrap_or_else(Uuid::new_v4).to_bytes_le().to_vec();
                                (acquired.payload, tag, acquired.lock_token)
                            }
                            Ok(None) => break,
                            Err(error) => {
                                // E.g. the entity went away in a reset: end the link
                                // rather than fail on every wake-up.
                                tracing::info!(%error, %path, "detaching receiver");
                                failed.push((channel, handle, definitions::Error::from(&error)));
                                break;
                            }
                        }
                    } else {
                        break;
                    };
                    let delivery_id = session.next_outgoing_id;
                    session.next_outgoing_id = delivery_id.wrapping_add(1);
                    link.last_active = Instant::now();
                    *delivery_count = delivery_count.wrapping_add(1);
                    *credit -= 1;
                    if let Some(lock_token) = lock_token {
                        session.unsettled.insert(delivery_id, Sent { handle, lock_token });
                    }
                    let transfer = Transfer {
                        handle: Handle(handle),
                        delivery_id: Some(delivery_id),
                        delivery_tag: Some(tag.into()),
                        message_format: Some(0),
                        settled: Some(lock_token.is_none()),
                        more: false,
                        rcv_settle_mode: None,
                        state: None,
                        resume: false,
                        aborted: false,
                        batchable: false,
                    };
                    frame::put_transfer(&mut self.out, channel, transfer, &payload, max_frame)?;
                }
                if *drain && *credit > 0 {
                    // Drain: use up the credit so the client's receive returns promptly.
                    *delivery_count = delivery_count.wrapping_add(*credit);
                    *credit = 0;
                    *drain = false;
                    let mut flow = session_flow(session.next_incoming_id, session.next_outgoing_id, Some(handle));
                    flow.delivery_count = Some(*delivery_count);
                    flow.link_credit = Some(0);
                    flow.drain = true;
                    frame::put_performative(&mut self.out, channel, &Performative::Flow(flow))?;
                }
            }
        }
        for (channel, handle, error) in failed {
            self.detach(channel, handle, Some(error))?;
        }
        Ok(())
    }

    /// Detaches every link to an entity deleted since the last look, with
    /// `amqp:not-found`, as Azure does when an entity goes away under a link.
    fn detach_deleted(&mut self) -> Result<(), ConnectionError> {
        let deletions = self.broker.deletions();
        if deletions == self.deletions_seen {
            return Ok(());
        }
        self.deletions_seen = deletions;
        let mut gone = Vec::new();
        for (&channel, session) in &self.sessions {
            for (&handle, link) in &session.links {
                let (Node::Entity(path) | Node::Management(path)) = &link.node else {
                    continue;
                };
                if !self.broker.exists(&path.parent()) {
                    gone.push((channel, handle, path.parent()));
                }
            }
        }
        for (channel, handle, path) in gone {
            tracing::info!(%path, "the link's entity was deleted: detaching it");
            let error = (&BrokerError::NotFound(path.to_string())).into();
            self.detach(channel, handle, Some(error))?;
        }
        Ok(())
    }

    /// Answers a `$cbs` put-token. The token is checked where the emulator
    /// can, as Azure does whatever the flags: an Entra ID token when Entra is
    /// on, a shared access signature against the `--sas-rule`s (its rule's
    /// key, its expiry, and a resource that covers the audience). What it
    /// covers, until when and with which rights is kept for the link checks.
    fn put_token(&mut self, request: &Request) -> (i32, Cow<'static, str>) {
        let (status, description) = management::handle_cbs(request);
        if status != 202 {
            return (status, description.into());
        }
        let audience = management::token_audience(request);
        let mut expiry = management::token_expiry(request);
        let mut rights = Rights::ALL;
        if let (Some(entra), Some(jwt)) = (&self.settings.entra, management::jwt_token(request)) {
            match entra.verify(jwt) {
                Ok(expires) => expiry = Some(expires),
                Err(refusal) => return (401, refusal.description().into()),
            }
        }
        if let (Some(rules), Some(sas)) = (&self.settings.sas, management::sas_token(request)) {
            match rules.verify(sas) {
                Ok(verified) => {
                    if let Some(audience) = &audience
                        && !address::token_covers(&verified.resource, audience)
                    {
                        return (
                            401,
                            format!(
                                "InvalidAudience: the token is for '{}', which does not cover '{audience}'",
                                verified.resource
                            )
                            .into(),
                        );
                    }
                    (expiry, rights) = (Some(verified.expires), verified.rights);
                }
                Err(refusal) => return (401, refusal.into()),
            }
        }
        if !(self.settings.enforce_token_expiry || self.settings.require_tokens || self.settings.sas.is_some()) {
            return (status, description.into());
        }
        let enforced = expiry.filter(|_| self.settings.enforce_token_expiry);
        match (audience, enforced) {
            (Some(_), Some(expires)) if expires <= now_ms() => (401, "ExpiredToken: the token has expired".into()),
            (Some(audience), enforced) => {
                self.tokens.retain(|t| t.audience != audience);
                self.tokens.push(PutToken {
                    audience,
                    expires: enforced.unwrap_or(i64::MAX),
                    rights,
                });
                (status, description.into())
            }
            (None, _) => (status, description.into()),
        }
    }

    /// The latest expiry of the tokens put for `path` (None: no token covers it).
    fn token_expiry_for(&self, path: &str) -> Option<i64> {
        self.tokens
            .iter()
            .filter(|t| address::token_covers(&t.audience, path))
            .map(|t| t.expires)
            .max()
    }

    /// Refuses a link to `node` that no unexpired token covers, or none with
    /// a right the link needs, with Azure's condition and a description that
    /// names the resource (and the claims, as Azure does).
    fn check_token(&self, node: &Node, client_sends: bool) -> Result<(), definitions::Error> {
        let Some(path) = token_path(node) else { return Ok(()) };
        let now = now_ms();
        let covering: Vec<&PutToken> = self
            .tokens
            .iter()
            .filter(|t| t.expires > now && address::token_covers(&t.audience, &path))
            .collect();
        let refuse = |description: String| {
            Err(amqp_error(
                ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
                description,
            ))
        };
        if covering.is_empty() {
            return refuse(format!(
                "Unauthorized access. No unexpired token covers '{path}': put one on $cbs before attaching a link to it"
            ));
        }
        // A `$management` node takes requests of either kind (a peek, a
        // scheduled send): Listen or Send will do.
        let needed: &[Right] = match node {
            Node::Entity(_) if client_sends => &[Right::Send],
            Node::Entity(_) => &[Right::Listen],
            _ => &[Right::Listen, Right::Send],
        };
        if covering
            .iter()
            .any(|t| needed.iter().any(|right| right.granted_by(t.rights)))
        {
            return Ok(());
        }
        refuse(format!(
            "Unauthorized access. '{}' claim(s) are required to perform this operation. Resource: '{path}'.",
            needed[0]
        ))
    }

    /// Detaches every link whose entity had tokens put for it that have all
    /// expired, as Azure does (without `require_tokens`, a link no token ever
    /// covered is left alone).
    fn detach_expired(&mut self) -> Result<(), ConnectionError> {
        let now = now_ms();
        let mut expired = Vec::new();
        for (&channel, session) in &self.sessions {
            for (&handle, link) in &session.links {
                let Some(path) = token_path(&link.node) else { continue };
                if self.token_expiry_for(&path).is_some_and(|expires| expires <= now) {
                    expired.push((channel, handle, path));
                }
            }
        }
        for (channel, handle, path) in expired {
            tracing::warn!(%path, "the link's token expired: detaching it");
            let error = amqp_error(
                ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
                format!("ExpiredToken: the token for '{path}' has expired; put a new one on $cbs before it does"),
            );
            self.detach(channel, handle, Some(error))?;
        }
        Ok(())
    }

    /// Detaches every link to an entity or a `$management` node with no
    /// transfer or disposition for `timeout`, with Azure's condition and
    /// description (`amqp:link:detach-forced`, "IdleTimerExpired"). Azure's
    /// timer is 10 minutes and cannot be changed; outstanding credit does not
    /// keep a link alive.
    fn detach_idle(&mut self, timeout: Duration) -> Result<(), ConnectionError> {
        let now = Instant::now();
        let mut idle = Vec::new();
        for (&channel, session) in &self.sessions {
            for (&handle, link) in &session.links {
                if matches!(link.node, Node::Cbs) || now.duration_since(link.last_active) < timeout {
                    continue;
                }
                let (code, role) = match link.direction {
                    Direction::Inbound { .. } => ("publisher", "Publisher"),
                    Direction::Outbound { .. } => ("consumer", "Consumer"),
                };
                let secs = timeout.as_secs();
                let description = format!(
                    "The link '{}' is force detached. Code: {code}(link{handle}). Details: AmqpMessage{role}.IdleTimerExpired: Idle timeout: {:02}:{:02}:{:02}.",
                    link.name,
                    secs / 3600,
                    secs / 60 % 60,
                    secs % 60
                );
                idle.push((channel, handle, description));
            }
        }
        for (channel, handle, description) in idle {
            tracing::warn!(%description, "detaching an idle link");
            let error = amqp_error(ErrorCondition::LinkError(LinkError::DetachForced), description);
            self.detach(channel, handle, Some(error))?;
        }
        Ok(())
    }

    /// Closes the connection once it has had no link to an entity or a
    /// `$management` node for `timeout` (`$cbs` does not count), with Azure's
    /// condition and description (`amqp:connection:forced`, "did not have any
    /// active links").
    fn close_if_unlinked(&mut self, timeout: Duration) -> Result<(), ConnectionError> {
        let now = Instant::now();
        let linked = self
            .sessions
            .values()
            .any(|session| session.links.values().any(|link| !matches!(link.node, Node::Cbs)));
        if linked {
            self.last_linked = now;
            return Ok(());
        }
        if now.duration_since(self.last_linked) < timeout {
            return Ok(());
        }
        let description = format!(
            "The connection was closed by container 'servicebus-emulator' because it did not have any active links in the past {} milliseconds.",
            timeout.as_millis()
        );
        tracing::warn!(%description, "closing a connection without links");
        self.closed = true;
        self.send(
            0,
            Performative::Close(Close {
                error: Some(amqp_error(
                    ErrorCondition::ConnectionError(definitions::ConnectionError::ConnectionForced),
                    description,
                )),
            }),
        )
    }

    /// The client detaches a link: answered with our detach, unless it is
    /// the answer to ours.
    fn on_detach(&mut self, channel: u16, handle: u32) -> Result<(), ConnectionError> {
        if self.session(channel)?.detaching.remove(&handle) {
            return Ok(());
        }
        self.detach(channel, handle, None)?;
        self.session(channel)?.detaching.remove(&handle);
        Ok(())
    }

    /// Ends a link from our side, forgetting its unsettled deliveries; the
    /// handle stays reserved until the client's detach answers ours.
    fn detach(&mut self, channel: u16, handle: u32, error: Option<definitions::Error>) -> Result<(), ConnectionError> {
        let session = self.session(channel)?;
        session.links.remove(&handle);
        session.unsettled.retain(|_, sent| sent.handle != handle);
        session.detaching.insert(handle);
        self.send(
            channel,
            Performative::Detach(Detach {
                handle: Handle(handle),
                closed: true,
                error,
            }),
        )
    }

    /// The client settles (or asks us to settle) messages we delivered.
    fn on_disposition(&mut self, channel: u16, disposition: Disposition) -> Result<(), ConnectionError> {
        if disposition.role == Role::Sender {
            return Ok(()); // the client settling its own sends after our accept
        }
        let last = disposition.last.unwrap_or(disposition.first);
        let mut echoes = Vec::new();
        let session = self.session(channel)?;
        let mut settled = Vec::new();
        let mut id = disposition.first;
        loop {
            settled.push((id, session.unsettled.remove(&id)));
            if id == last {
                break;
            }
            id = id.wrapping_add(1);
        }
        for (id, sent) in settled {
            let outcome = disposition.state.as_ref().and_then(outcome_of);
            let result = match (&sent, outcome) {
                (Some(sent), Some(outcome)) => {
                    let path = self
                        .sessions
                        .get_mut(&channel)
                        .and_then(|s| s.links.get_mut(&sent.handle))
                        .and_then(|link| {
                            link.touch();
                            match &link.node {
                                Node::Entity(path) => Some(path.clone()),
                                _ => None,
                            }
                        });
                    match path {
                        Some(path) => self.broker.settle(&path, &sent.lock_token, outcome),
                        // The link is gone; so is the client's right to settle on it.
                        None => Err(BrokerError::LockLost),
                    }
                }
                (Some(_), None) => Ok(()),
                (None, _) => Err(BrokerError::LockLost),
            };
            if let Err(error) = &result {
                tracing::debug!(%error, delivery_id = id, "settlement failed");
            }
            if !disposition.settled {
                let state = match result {
                    // The echo names the outcome applied; a rejected echo that
                    // carries an error means the settlement failed.
                    Ok(()) => disposition.state.clone().map(|state| match state {
                        DeliveryState::Rejected(_) => DeliveryState::Rejected(Rejected { error: None }),
                        other => other,
                    }),
                    Err(error) => Some(DeliveryState::Rejected(Rejected {
                        error: Some((&error).into()),
                    })),
                };
                echoes.push(Disposition {
                    role: Role::Sender,
                    first: id,
                    last: None,
                    settled: true,
                    state,
                    batchable: false,
                });
            }
        }
        for echo in echoes {
            self.send(channel, Performative::Disposition(echo))?;
        }
        Ok(())
    }
}

/// Maps an AMQP outcome to what Service Bus does with the locked message.
fn outcome_of(state: &DeliveryState) -> Option<Outcome> {
    match state {
        DeliveryState::Accepted(_) => Some(Outcome::Complete),
        DeliveryState::Released(_) => Some(Outcome::Abandon {
            annotations: Vec::new(),
        }),
        DeliveryState::Modified(Modified {
            undeliverable_here: Some(true),
            ..
        }) => Some(Outcome::Defer),
        DeliveryState::Modified(modified) => Some(Outcome::Abandon {
            annotations: modified
                .message_annotations
                .iter()
                .flat_map(|fields| fields.iter())
                .map(|(k, v)| (Value::Symbol(k.clone()), v.clone()))
                .collect(),
        }),
        DeliveryState::Rejected(rejected) => {
            let error = rejected.error.as_ref();
            let info = |key: &str| {
                error
                    .and_then(|e| e.info.as_ref())
                    .and_then(|info| info.get(&Symbol::from(key)))
                    .and_then(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        _ => None,
                    })
            };
            if let Some(e) = error.filter(|e| e.condition != custom_condition(DEAD_LETTER_CONDITION)) {
                // Service Bus dead-letters on any rejection.
                tracing::debug!(condition = ?e.condition, "rejected without the dead-letter condition");
            }
            Some(Outcome::DeadLetter {
                reason: info("DeadLetterReason"),
                description: info("DeadLetterErrorDescription").or_else(|| error.and_then(|e| e.description.clone())),
            })
        }
        _ => None,
    }
}

fn has_session_filter(source: Option<&Source>) -> bool {
    source
        .and_then(|s| s.filter.as_ref())
        .is_some_and(|filters| filters.keys().any(|key| key.as_str() == "com.microsoft:session-filter"))
}
