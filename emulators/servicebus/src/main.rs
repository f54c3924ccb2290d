//! servicebus-emulator: an in-memory Azure Service Bus for tests.

mod amqp;
mod atom;
mod broker;
mod entra;
mod sas;
mod tls;
mod topology;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{ArgAction, Parser};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use broker::{Broker, BrokerOptions, StoreSettings};
use topology::Topology;

/// An in-memory Azure Service Bus emulator (AMQP 1.0 and the ATOM count
/// endpoint). Binds 127.0.0.1 (`--amqp-host` moves the AMQP listener to
/// another loopback address). Port 0 picks a free port; the ready line on
/// stdout reports the ports actually bound.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address the AMQP listener binds. azservicebus always dials port 5672,
    /// so a second emulator (e.g. a private one for fault tests) needs its own
    /// address: all of 127.0.0.0/8 is loopback on Linux. The HTTP(S)
    /// listeners stay on 127.0.0.1.
    #[arg(long, env = "SERVICEBUS_EMULATOR_AMQP_HOST", default_value = "127.0.0.1")]
    amqp_host: std::net::IpAddr,

    /// AMQP port. azservicebus always dials 5672, whatever the connection string says.
    #[arg(long, env = "SERVICEBUS_EMULATOR_AMQP_PORT", default_value_t = 5672)]
    amqp_port: u16,

    /// Plain-HTTP port of the ATOM management endpoint.
    #[arg(long, env = "SERVICEBUS_EMULATOR_HTTP_PORT", default_value_t = 5300)]
    http_port: u16,

    /// HTTPS port of the ATOM endpoint (self-signed certificate).
    #[arg(long, env = "SERVICEBUS_EMULATOR_HTTPS_PORT", default_value_t = 5443)]
    https_port: u16,

    /// Also listen for AMQP over TLS on this port of `--amqp-host`, with the
    /// HTTPS listener's self-signed certificate: TLS from the first byte, as
    /// Azure's port 5671 (which azservicebus always dials for `amqps`). Off
    /// by default.
    #[arg(long)]
    amqps_port: Option<u16>,

    /// Turn on Entra ID: the tenant of the one app registration the token
    /// endpoint (`POST /{tenant}/oauth2/v2.0/token` on the HTTP(S) listeners)
    /// knows. A `$cbs` token of type `jwt`, and a bearer token on the ATOM
    /// endpoint, must then be an access token the emulator issued.
    #[arg(long, requires_all = ["entra_client_id", "entra_subject"])]
    entra_tenant_id: Option<String>,

    /// The app registration's client ID (a client's `AZURE_CLIENT_ID`).
    #[arg(long, requires = "entra_tenant_id")]
    entra_client_id: Option<String>,

    /// The subject of its federated credential, which the client's
    /// assertion (`AZURE_FEDERATED_TOKEN_FILE`) must carry, e.g.
    /// `system:serviceaccount:apps:orders`.
    #[arg(long, requires = "entra_tenant_id")]
    entra_subject: Option<String>,

    /// An authorization rule of the namespace, `NAME=KEY` (every right) or
    /// `NAME=KEY:Listen,Send` (any of Listen, Send, Manage). Repeatable. With
    /// one or more, shared access signatures are checked as Azure checks
    /// them (signature, expiry, the resource they cover), links need a token
    /// with the right they use (receive: Listen, send: Send, `$management`:
    /// either), and the ATOM endpoint needs Manage. Without: SAS tokens are
    /// taken unchecked.
    #[arg(long = "sas-rule", value_name = "NAME=KEY[:RIGHTS]", value_parser = sas::SasRule::parse)]
    sas_rules: Vec<sas::SasRule>,

    /// An authorization rule of one queue or topic, `ENTITY:NAME=KEY[:RIGHTS]`
    /// (rights as `--sas-rule`), as an entity's "Shared access policies" on
    /// Azure: its tokens are valid only for a resource (`sr`) at or below
    /// ENTITY; one signed for the namespace or another entity is refused
    /// ("InvalidAudience"). Repeatable; turns the SAS checks on like
    /// `--sas-rule`.
    #[arg(long = "entity-sas-rule", value_name = "ENTITY:NAME=KEY[:RIGHTS]", value_parser = sas::SasRule::parse_entity)]
    entity_sas_rules: Vec<sas::SasRule>,

    /// How long an issued access token lasts (Entra's are 60 to 90 minutes).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    entra_token_ttl: Duration,

    /// Topology YAML: queues, topics, subscriptions and their settings.
    #[arg(long, env = "SERVICEBUS_EMULATOR_TOPOLOGY")]
    topology: Option<PathBuf>,

    /// Create a queue (or topic subscription) on first use of its name.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    auto_create: bool,

    /// Leave out the x-opt-lock-token annotation, as real Azure does, so that
    /// a client must read the lock token from the delivery tag.
    #[arg(long)]
    strict: bool,

    /// Milliseconds to hold back the settlement (accept or refusal) of a
    /// client's send. fe2o3-amqp <= 0.16 (azservicebus) can lose a settlement
    /// that arrives too fast.
    #[arg(long, default_value_t = 3)]
    accept_delay_ms: u64,

    /// Enforce `$cbs` token expiry as Azure does: a link is detached
    /// (amqp:unauthorized-access) once every token put for its entity has
    /// expired, and a token put after its expiry gets 401. The expiry is the
    /// SAS token's `se`, else the put's `expiration`. Off by default: tokens
    /// are accepted and never checked.
    #[arg(long)]
    enforce_token_expiry: bool,

    /// Refuse a link to an entity (or its `$management` node) until a `$cbs`
    /// token covering it was put on the connection, as Azure does: the attach
    /// is answered, then detached with amqp:unauthorized-access. Off by
    /// default: links attach without tokens.
    #[arg(long)]
    require_tokens: bool,

    /// Force-detach a link to an entity or a `$management` node after this
    /// long with no transfer or disposition on it (amqp:link:detach-forced),
    /// as Azure does after 10 minutes; credit alone does not keep a link
    /// alive. `0s` never detaches an idle link.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    link_idle_timeout: Duration,

    /// Close a connection that has had no link to an entity or a
    /// `$management` node for this long (amqp:connection:forced), as Azure
    /// does after about a minute; `$cbs` does not count. `0s` never closes
    /// one.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    connection_idle_timeout: Duration,

    /// MaxDeliveryCount of entities the topology does not configure.
    #[arg(long, default_value_t = 10)]
    max_delivery_count: u32,

    /// LockDuration of entities the topology does not configure (e.g. 30s, 1m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    lock_duration: Duration,

    /// The most messages one peek answers (0: as many as asked for). Azure
    /// may answer a peek with fewer messages than asked for while more wait;
    /// this lets a client be tested against that.
    #[arg(long, default_value_t = 0)]
    max_peek: usize,

    /// Advertise BYTES as the max-message-size of a sender's link to ENTITY
    /// (Azure: 262,144 on the standard tier), and detach the link with
    /// amqp:link:message-size-exceeded on a larger transfer, as Azure does.
    /// Repeatable.
    #[arg(long = "max-message-size", value_name = "ENTITY=BYTES", value_parser = parse_entity_count)]
    max_message_size: Vec<(String, usize)>,

    /// Refuse the next N sends to ENTITY as throttled: the transfer is
    /// rejected with com.microsoft:server-busy ("Please wait 2 seconds and
    /// try again"), as Azure does when it throttles a namespace. Repeatable.
    #[arg(long = "server-busy", value_name = "ENTITY=N", value_parser = parse_entity_count)]
    server_busy: Vec<(String, usize)>,

    /// Refuse a batch sent to ENTITY whose messages differ in MessageId,
    /// SessionId or PartitionKey, with amqp:not-allowed, as Azure does for an
    /// entity with partitioning and duplicate detection. Repeatable.
    #[arg(long = "refuse-mixed-batches", value_name = "ENTITY")]
    refuse_mixed_batches: Vec<String>,

    /// Lose the settlement of the K-th send to ENTITY (1-based, counted over
    /// every connection): the message is enqueued but no disposition comes,
    /// as when fe2o3-amqp drops one that came too fast. Repeatable.
    #[arg(long = "lose-send-settlement", value_name = "ENTITY=K", value_parser = parse_entity_count)]
    lose_send_settlement: Vec<(String, usize)>,

    /// Lose the K-th `$cbs` token put for ENTITY (1-based, counted over every
    /// connection): neither its settlement nor its answer comes, so the put
    /// waits out the client's timeout. Repeatable.
    #[arg(long = "lose-token-put", value_name = "ENTITY=K", value_parser = parse_entity_count)]
    lose_token_put: Vec<(String, usize)>,

    /// Lose the settlement of the K-th answered `$cbs` token put for ENTITY
    /// (1-based, counted over every connection), but send its answer: what
    /// a client sees when fe2o3-amqp drops a settlement that came too fast.
    /// Repeatable.
    #[arg(long = "lose-token-put-settlement", value_name = "ENTITY=K", value_parser = parse_entity_count)]
    lose_token_put_settlement: Vec<(String, usize)>,

    /// Write the HTTPS certificate (PEM) here, for clients that verify it.
    #[arg(long)]
    cert_out: Option<PathBuf>,
}

/// `ENTITY=N` of `--server-busy`, `--max-message-size` and the `--lose-*`
/// faults, the entity
/// lowercased as the broker keys them.
fn parse_entity_count(arg: &str) -> Result<(String, usize), String> {
    let (entity, n) = arg.split_once('=').ok_or("expected ENTITY=N")?;
    let n = n.parse().map_err(|e| format!("{n}: {e}"))?;
    Ok((entity.to_lowercase(), n))
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot write the certificate: {0}")]
    CertOut(std::io::Error),
}

const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

async fn bind(what: &'static str, host: std::net::IpAddr, port: u16) -> Result<TcpListener, StartError> {
    let addr = SocketAddr::new(host, port);
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".into(), |addr| addr.to_string())
}

async fn run(cli: Cli) -> Result<(), StartError> {
    let topology = match &cli.topology {
        Some(path) => Topology::load(path)?,
        None => Topology::default(),
    };
    let broker = Arc::new(Broker::new(
        topology,
        BrokerOptions {
            auto_create: cli.auto_create,
            strict: cli.strict,
            defaults: StoreSettings {
                max_delivery_count: cli.max_delivery_count,
                lock_duration: cli.lock_duration,
                default_message_ttl: None,
                max_size_bytes: None,
                status: broker::EntityStatus::Active,
            },
            max_peek: Some(cli.max_peek).filter(|m| *m > 0),
            server_busy: cli.server_busy.into_iter().collect(),
            refuse_mixed_batches: cli.refuse_mixed_batches.iter().map(|e| e.to_lowercase()).collect(),
        },
    ));
    let amqp = bind("AMQP", cli.amqp_host, cli.amqp_port).await?;
    let http = bind("HTTP", LOOPBACK, cli.http_port).await?;
    let https = bind("HTTPS", LOOPBACK, cli.https_port).await?;
    let amqps = match cli.amqps_port {
        Some(port) => Some(bind("AMQPS", cli.amqp_host, port).await?),
        None => None,
    };
    let (acceptor, pem) = tls::self_signed(cli.amqp_host)?;
    if let Some(path) = &cli.cert_out {
        std::fs::write(path, pem).map_err(StartError::CertOut)?;
    }
    println!(
        "servicebus-emulator ready amqp={} http={} https={}{}",
        local(&amqp),
        local(&http),
        local(&https),
        amqps
            .as_ref()
            .map_or_else(String::new, |l| format!(" amqps={}", local(l)))
    );
    let entra = match (cli.entra_tenant_id, cli.entra_client_id, cli.entra_subject) {
        (Some(tenant_id), Some(client_id), Some(subject)) => Some(Arc::new(entra::Entra::new(entra::EntraSettings {
            tenant_id,
            client_id,
            subject,
            token_ttl: cli.entra_token_ttl,
        }))),
        _ => None,
    };
    let rules: Vec<sas::SasRule> = cli.sas_rules.into_iter().chain(cli.entity_sas_rules).collect();
    let sas = (!rules.is_empty()).then(|| Arc::new(sas::SasRules::new(rules)));

    let settings = amqp::AmqpSettings {
        max_message_size: cli
            .max_message_size
            .into_iter()
            .map(|(entity, bytes)| (entity, bytes as u64))
            .collect(),
        accept_delay: Duration::from_millis(cli.accept_delay_ms),
        enforce_token_expiry: cli.enforce_token_expiry,
        require_tokens: cli.require_tokens,
        link_idle_timeout: cli.link_idle_timeout,
        connection_idle_timeout: cli.connection_idle_timeout,
        entra: entra.clone(),
        sas: sas.clone(),
        lost: Arc::new(amqp::LostSettlements::new(
            cli.lose_send_settlement,
            cli.lose_token_put,
            cli.lose_token_put_settlement,
        )),
    };
    let router = atom::router(broker.clone(), atom::AtomAuth { entra, sas });
    if let Some(amqps) = amqps {
        tokio::spawn(amqp::serve(
            amqps,
            Some(acceptor.clone()),
            broker.clone(),
            settings.clone(),
        ));
    }
    tokio::spawn(amqp::serve(amqp, None, broker.clone(), settings));
    tokio::spawn(tls::serve(https, acceptor, router.clone()));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(http, router).await {
            tracing::error!(%error, "HTTP server stopped");
        }
    });
    let sweeper = broker.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            sweeper.expire_locks();
        }
    });
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: tests and scripts read the log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("servicebus-emulator: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
