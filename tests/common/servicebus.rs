//! Service Bus fixtures on the project's emulator (`servicebus-emulator`,
//! emulators/servicebus), filled and read with azservicebus directly, not
//! through dlq-bridge.
//!
//! azservicebus always dials port 5672, so the emulator must own 5672. One
//! emulator serves a whole test binary (started here on first use, unless
//! `DLQ_BRIDGE_TEST_SERVICEBUS_HTTP` says a script started one), and every
//! fixture uses its own uniquely named entities, so the tests of one binary
//! may run in parallel against it. Test binaries run one after another
//! (`cargo test` never runs two binaries at once), and the emulator started
//! here dies with its binary; [`emulator`] waits for the previous binary's
//! emulator to release 5672 before starting its own.
//!
//! The emulator runs as Azure behaves: no `x-opt-lock-token` (`--strict`),
//! and no link attaches before a `$cbs` token covering its entity was put on
//! the connection (`--require-tokens`), so every operation the backend uses
//! is exercised the way Azure answers it, in the order Azure needs.

use std::sync::{Once, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use azservicebus::core::BasicRetryPolicy;
use azservicebus::prelude::*;
use azservicebus::receiver::DeadLetterOptions;
use bytes::Bytes;
use dlq_bridge::config::Config;
use dlq_bridge::model::{AttrValue, Attribute, Attributes};
use fe2o3_amqp_types::messaging::{ApplicationProperties, Body, Message};
use fe2o3_amqp_types::primitives::{SimpleValue, Timestamp, Uuid as AmqpUuid, Value};
use tokio::sync::Mutex;

use super::emulator::{Emulator, repo_root, spawn};
use super::{Fixture, Received, TestMessage, unique};

pub type Client = ServiceBusClient<BasicRetryPolicy>;

static EMULATOR: OnceLock<Emulator> = OnceLock::new();
static ENV: Once = Once::new();

/// The environment variable the fixtures' configs name in `connection_string_env`.
pub const CONNECTION_STRING_ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_CONNECTION_STRING";
/// A connection string to a namespace nobody listens on: 127.0.0.2 is
/// loopback too, but the emulator binds 127.0.0.1 only.
pub const UNREACHABLE_CONNECTION_STRING_ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_UNREACHABLE";
pub const EMULATOR_CONNECTION_STRING: &str =
    "Endpoint=sb://127.0.0.1;SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=true";
/// Where the private emulator of `tests/servicebus.rs`'s short-peek test
/// listens, and the variable naming its connection string (set with the
/// others, before any test reads the environment).
pub const SHORT_PEEKS_HOST: &str = "127.0.0.7";
pub const SHORT_PEEKS_CONNECTION_STRING_ENV: &str = "DLQ_BRIDGE_TEST_SERVICEBUS_SHORT_PEEKS";
/// Where the private emulator of `tests/servicebus.rs`'s token-expiry test
/// (`--enforce-token-expiry`) listens; its runs get their connection strings
/// through the child process's environment.
pub const TOKEN_EXPIRY_HOST: &str = "127.0.0.8";
/// Where the private emulator of `tests/servicebus.rs`'s deleted-destination
/// test (`--auto-create false`, as Azure) listens.
pub const DELETES_HOST: &str = "127.0.0.9";
/// Where the private emulator of `tests/servicebus.rs`'s idle-link test
/// (`--link-idle-timeout`) listens.
pub const IDLE_LINKS_HOST: &str = "127.0.0.10";
/// Where the private emulator of `tests/servicebus.rs`'s Entra ID test
/// (AMQP over TLS on 5671, the token endpoint) listens.
pub const ENTRA_HOST: &str = "127.0.0.11";
/// Where the private emulator of `tests/servicebus.rs`'s SAS rules test
/// (`--sas-rule`) listens.
pub const SAS_RULES_HOST: &str = "127.0.0.12";
/// Where the private emulator of `tests/servicebus.rs`'s throttling test
/// (`--server-busy`) listens.
pub const SERVER_BUSY_HOST: &str = "127.0.0.13";
/// Where the private emulator of `tests/servicebus.rs`'s disabled-destination
/// test (entity Status, new in the emulator) listens.
pub const DISABLED_HOST: &str = "127.0.0.14";
/// Where the private emulator of `tests/servicebus.rs`'s oversized-copy test
/// (`--max-message-size`) listens.
pub const SMALL_LINK_HOST: &str = "127.0.0.15";
/// Where the private emulator of `tests/servicebus.rs`'s entity-scoped key
/// test (`--entity-sas-rule`) listens.
pub const ENTITY_KEY_HOST: &str = "127.0.0.16";
/// Where the private emulator of `tests/servicebus.rs`'s transfer dead-letter
/// test (ForwardTo, `--auto-create false`, as Azure) listens.
pub const TRANSFER_HOST: &str = "127.0.0.20";
/// The same for its subscription case.
pub const TRANSFER_TOPIC_HOST: &str = "127.0.0.21";
/// Where the private emulator of `tests/servicebus.rs`'s refused-link test
/// (`--auto-create false`, SAS rules, a topology) listens.
pub const REFUSALS_HOST: &str = "127.0.0.17";
/// Where the private emulator of `tests/servicebus.rs`'s deferred-message
/// test listens (its own build, which marks deferred messages, whatever
/// emulator a script started).
pub const DEFERRED_HOST: &str = "127.0.0.18";
/// Where the private emulators of `tests/servicebus.rs`'s dry-run and
/// `--max` tests of deferred messages listen.
pub const DEFERRED_DRY_RUN_HOST: &str = "127.0.0.19";
pub const DEFERRED_MAX_HOST: &str = "127.0.0.22";
/// And of its test that a rerun completes what the journal says was sent.
pub const DEFERRED_JOURNAL_HOST: &str = "127.0.0.23";
/// Where the private emulator of `tests/servicebus.rs`'s lost-settlement
/// test (`--lose-send-settlement`, `--lose-token-put`) listens.
pub const LOST_SETTLEMENTS_HOST: &str = "127.0.0.24";
/// Where the private emulator of `tests/servicebus.rs`'s rated-pass test
/// (a short `--lock-duration`) listens.
pub const RATED_HOST: &str = "127.0.0.25";
/// Where the private emulator of `tests/servicebus.rs`'s partitioned
/// destination test (`--refuse-mixed-batches`) listens.
pub const PARTITIONED_HOST: &str = "127.0.0.26";
/// Where the private emulator of `tests/servicebus.rs`'s throttled-browse
/// test (`/$emulator/throttle-peeks`) listens.
pub const PEEK_BUSY_HOST: &str = "127.0.0.27";
/// Where the private emulator of `tests/servicebus.rs`'s lapsed-renewal
/// test (frozen past a short `--lock-duration`) listens.
pub const FROZEN_LOCKS_HOST: &str = "127.0.0.28";
/// How long the emulators the tests start hold back a settlement (the
/// shared one from `scripts/emulators.sh` too).
pub const TEST_ACCEPT_DELAY_MS: &str = "20";
const WAIT: Duration = Duration::from_secs(1);
const CALL: Duration = Duration::from_secs(20);

/// The connection string of an emulator whose AMQP listener is on `host`
/// (azservicebus always dials port 5672, so emulators differ by host).
pub fn emulator_connection_string(host: &str) -> String {
    format!("Endpoint=sb://{host};SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=true")
}

/// The emulator's HTTP (ATOM) base URL: `DLQ_BRIDGE_TEST_SERVICEBUS_HTTP`
/// when a script started one, else an emulator started for this test binary
/// on 5672. Fails, never skips, when it cannot start.
pub fn emulator() -> String {
    ENV.call_once(|| {
        if std::env::var_os(CONNECTION_STRING_ENV).is_none() {
            // SAFETY: `Once` blocks every other caller until this returns, and
            // every fixture calls this before reading the environment.
            unsafe { std::env::set_var(CONNECTION_STRING_ENV, EMULATOR_CONNECTION_STRING) };
        }
        // SAFETY: as above.
        unsafe {
            std::env::set_var(
                UNREACHABLE_CONNECTION_STRING_ENV,
                emulator_connection_string("127.0.0.2"),
            );
            std::env::set_var(
                SHORT_PEEKS_CONNECTION_STRING_ENV,
                emulator_connection_string(SHORT_PEEKS_HOST),
            );
        };
    });
    if let Some(url) = std::env::var("DLQ_BRIDGE_TEST_SERVICEBUS_HTTP")
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        return url.trim().trim_end_matches('/').to_string();
    }
    EMULATOR
        .get_or_init(|| {
            wait_for_port_5672();
            spawn_emulator("servicebus", &[])
        })
        .url()
}

/// A test's own emulator, its AMQP listener on `host` (besides the shared
/// one, which this starts first: it sets the environment the tests read),
/// with `extra` arguments; with its connection string and a client on it.
pub async fn private_emulator(name: &'static str, host: &str, extra: &[&str]) -> (Emulator, String, Client) {
    emulator();
    let mut args = vec!["--amqp-host", host];
    args.extend_from_slice(extra);
    let emu = spawn_emulator(name, &args);
    let cs = emulator_connection_string(host);
    let client = client_with(&cs).await;
    (emu, cs, client)
}

/// `SERVICEBUS_EMULATOR_BIN`, else the binary next to this test's target
/// directory, built with `cargo build -p servicebus-emulator` if missing.
/// Start the project's emulator (strict, AMQP on 5672, ATOM on a free port)
/// with `extra` arguments, e.g. another `--amqp-host` or `--lock-duration`.
pub fn spawn_emulator(name: &'static str, extra: &[&str]) -> Emulator {
    let bin = emulator_binary();
    let mut args = vec![
        bin.as_str(),
        "--amqp-port",
        "5672",
        "--http-port",
        "{port}",
        "--strict",
        "--require-tokens",
    ];
    if !extra.contains(&"--https-port") {
        args.extend(["--https-port", "0"]);
    }
    // Held back longer than the emulator's default 3 ms: on a loaded CI
    // machine fe2o3-amqp still lost a settlement 3 ms late (see
    // docs/reliability.md, "Lost settlements"), and a send retried after one
    // duplicates its copies.
    if !extra.contains(&"--accept-delay-ms") {
        args.extend(["--accept-delay-ms", TEST_ACCEPT_DELAY_MS]);
    }
    args.extend_from_slice(extra);
    spawn(
        name,
        &args,
        &[("RUST_LOG", "warn")],
        "/dlq-bridge-probe?api-version=2021-05",
    )
}

pub fn emulator_binary() -> String {
    if let Some(b) = std::env::var("SERVICEBUS_EMULATOR_BIN").ok().filter(|b| !b.is_empty()) {
        return b;
    }
    // <target>/debug/deps/<test> → <target>/debug/servicebus-emulator
    let exe = std::env::current_exe().expect("test executable path");
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("servicebus-emulator"))
        .expect("target directory");
    if !candidate.exists() {
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "-p", "servicebus-emulator"])
            .current_dir(repo_root())
            .status()
            .expect("run cargo build -p servicebus-emulator");
        assert!(status.success(), "cargo build -p servicebus-emulator failed");
    }
    assert!(
        candidate.exists(),
        "the Service Bus emulator binary is missing at {}: run `cargo build -p servicebus-emulator` or set SERVICEBUS_EMULATOR_BIN",
        candidate.display()
    );
    candidate.display().to_string()
}

/// The previous test binary's emulator gets a moment to release 5672.
fn wait_for_port_5672() {
    for _ in 0..100 {
        if std::net::TcpListener::bind("127.0.0.1:5672").is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "port 5672 stays taken: azservicebus always dials 5672, so stop whatever holds it (another emulator?) \
         or start one with scripts/emulators.sh and export DLQ_BRIDGE_TEST_SERVICEBUS_HTTP"
    );
}

pub async fn client() -> Client {
    let cs = std::env::var(CONNECTION_STRING_ENV).unwrap_or_else(|_| EMULATOR_CONNECTION_STRING.into());
    client_with(&cs).await
}

/// A client on the connection string given.
pub async fn client_with(cs: &str) -> Client {
    tokio::time::timeout(
        CALL,
        ServiceBusClient::unsecured().new_from_connection_string(
            cs.replace(";UseDevelopmentEmulator=true", ""),
            ServiceBusClientOptions::default(),
        ),
    )
    .await
    .expect("connect within 20 s")
    .expect("azservicebus connects to the emulator on 5672")
}

/// The fixture's own encoding of test attributes as AMQP application
/// properties (independent of dlq-bridge's): `data_type` "int" → int, other
/// integers → long, floats → double, and the remaining variants as their
/// natural AMQP type.
pub fn to_amqp(a: &Attribute) -> SimpleValue {
    match (&a.value, a.data_type.as_deref()) {
        (AttrValue::String(s), _) => SimpleValue::String(s.clone()),
        (AttrValue::Int(i), Some("int")) => SimpleValue::Int(*i as i32),
        (AttrValue::Int(i), _) => SimpleValue::Long(*i),
        (AttrValue::Float(f), _) => SimpleValue::Double((*f).into()),
        (AttrValue::Bool(b), _) => SimpleValue::Bool(*b),
        (AttrValue::Binary(b), _) => SimpleValue::Binary(b.to_vec().into()),
        (AttrValue::Uuid(u), _) => SimpleValue::Uuid(AmqpUuid::from(*u.as_bytes())),
        (AttrValue::Timestamp(t), _) => SimpleValue::Timestamp(Timestamp::from_milliseconds(t.timestamp_millis())),
        (AttrValue::Number(n), _) => panic!("the Service Bus fixture has no AMQP type for Number {n}"),
    }
}

pub fn from_amqp(v: &SimpleValue) -> Attribute {
    let (value, data_type) = match v {
        SimpleValue::String(s) => (AttrValue::String(s.clone()), None),
        SimpleValue::Int(i) => (AttrValue::Int(*i as i64), Some("int")),
        SimpleValue::Long(i) => (AttrValue::Int(*i), None),
        SimpleValue::Double(f) => (AttrValue::Float(f.into_inner()), None),
        SimpleValue::Bool(b) => (AttrValue::Bool(*b), None),
        SimpleValue::Binary(b) => (AttrValue::Binary(Bytes::copy_from_slice(b.as_ref())), None),
        SimpleValue::Uuid(u) => (AttrValue::Uuid(uuid::Uuid::from_bytes(u.clone().into_inner())), None),
        SimpleValue::Timestamp(t) => (
            AttrValue::Timestamp(chrono::DateTime::from_timestamp_millis(t.milliseconds()).unwrap()),
            None,
        ),
        other => (AttrValue::String(format!("{other:?}")), Some("unexpected")),
    };
    Attribute {
        value,
        data_type: data_type.map(str::to_string),
    }
}

pub fn to_message(m: &TestMessage) -> ServiceBusMessage {
    let mut msg = ServiceBusMessage::new(m.body.clone());
    if let Some(k) = &m.ordering_key {
        msg.set_session_id(k.clone()).unwrap();
    }
    if !m.attributes.is_empty() {
        let mut props = ApplicationProperties::default();
        for (k, a) in &m.attributes {
            props.0.insert(k.clone(), to_amqp(a));
        }
        *msg.application_properties_mut() = Some(props);
    }
    msg
}

pub fn attributes_of(props: Option<&ApplicationProperties>) -> Attributes {
    props
        .map(|p| p.0.iter().map(|(k, v)| (k.clone(), from_amqp(v))).collect())
        .unwrap_or_default()
}

/// Create the queue `name` by an ATOM PUT on the emulator at `http`, with a
/// size quota if `max_size_mb` is given; panics unless it answers 201.
pub async fn create_queue(http: &str, name: &str, max_size_mb: Option<u32>) {
    let quota = max_size_mb.map_or(String::new(), |mb| {
        format!("<MaxSizeInMegabytes>{mb}</MaxSizeInMegabytes>")
    });
    create_queue_described(http, name, &quota).await;
}

/// Create a queue by ATOM PUT with these `QueueDescription` elements
/// (`<Status>SendDisabled</Status>`, ...).
pub async fn create_queue_described(http: &str, name: &str, elements: &str) {
    atom_put(http, name, "QueueDescription", elements).await;
}

/// PUT an entity's ATOM description (`kind`, e.g. `QueueDescription`, with
/// `elements` inside) at `path` on the emulator at `http`; panics unless it
/// answers 201 Created.
async fn atom_put(http: &str, path: &str, kind: &str, elements: &str) {
    let body = format!(
        concat!(
            r#"<entry xmlns="http://www.w3.org/2005/Atom"><content type="application/xml">"#,
            r#"<{kind} xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect">"#,
            r#"{elements}</{kind}></content></entry>"#
        ),
        kind = kind,
        elements = elements
    );
    let created = reqwest::Client::new()
        .put(format!("{http}/{path}?api-version=2021-05"))
        .header("authorization", namespace_token())
        .header("content-type", "application/atom+xml;type=entry;charset=utf-8")
        .body(body)
        .send()
        .await
        .expect("the emulator's ATOM endpoint answers");
    let status = created.status();
    assert_eq!(status, 201, "PUT {path}: {}", created.text().await.unwrap_or_default());
}

/// A token of the emulators' namespace rule (`x`, key `y`) for the ATOM
/// calls: an emulator with `--sas-rule x=y` checks it, the others ignore it.
fn namespace_token() -> String {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        + 3600;
    dlq_bridge::backend::servicebus::sas_token("https://127.0.0.1/", "x", "y", expiry)
}

/// Create the subscription `topic/Subscriptions/name` of an existing topic
/// by an ATOM PUT with these `SubscriptionDescription` elements
/// (`<ForwardTo>q</ForwardTo>`); panics unless it answers 201.
pub async fn create_subscription_described(http: &str, topic: &str, name: &str, elements: &str) {
    atom_put(
        http,
        &format!("{topic}/Subscriptions/{name}"),
        "SubscriptionDescription",
        elements,
    )
    .await;
}

/// Delete the queue, topic or subscription `path` by an ATOM DELETE on the
/// emulator at `http`; panics unless it answers 200.
pub async fn delete_entity(http: &str, path: &str) {
    let deleted = reqwest::Client::new()
        .delete(format!("{http}/{path}?api-version=2021-05"))
        .header("authorization", namespace_token())
        .send()
        .await
        .expect("the emulator's ATOM endpoint answers");
    let status = deleted.status();
    assert_eq!(
        status,
        200,
        "DELETE {path}: {}",
        deleted.text().await.unwrap_or_default()
    );
}

/// The `MessageCount` the emulator's ATOM GET reports for the queue `name`.
pub async fn queue_message_count(http: &str, name: &str) -> usize {
    let entry = reqwest::Client::new()
        .get(format!("{http}/{name}?api-version=2021-05"))
        .send()
        .await
        .expect("the emulator's ATOM endpoint answers")
        .text()
        .await
        .expect("an ATOM entry");
    entry
        .split("<MessageCount>")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MessageCount for {name}: {entry}"))
}

/// A queue DLQ (`TOPIC = false`) or a topic-subscription DLQ (`TOPIC = true`).
pub struct ServiceBusFixtureOf<const TOPIC: bool> {
    pub http: String,
    /// The queue, or the topic.
    pub entity: String,
    /// The subscription, for a topic fixture.
    pub subscription: Option<String>,
    pub client: Mutex<Client>,
    /// The environment variable holding the connection string (configs name it).
    pub connection_env: String,
}

pub type ServiceBusFixture = ServiceBusFixtureOf<false>;
pub type ServiceBusTopicFixture = ServiceBusFixtureOf<true>;

impl<const TOPIC: bool> ServiceBusFixtureOf<TOPIC> {
    /// A fixture with a queue, or a topic and these subscriptions (the first
    /// is the one whose DLQ is managed).
    pub async fn with_subscriptions(subs: &[&str]) -> Self {
        let http = emulator();
        let client = client().await;
        Self::on(http, client, CONNECTION_STRING_ENV, subs).await
    }

    /// A queue fixture on an emulator that creates no entity a link names
    /// (`--auto-create false`, as Azure): the queue is created by an ATOM PUT.
    pub async fn created_on(http: String, client: Client, connection_env: &str) -> Self {
        assert!(!TOPIC, "created_on makes queue fixtures");
        let entity = unique("q");
        create_queue(&http, &entity, None).await;
        Self {
            connection_env: connection_env.to_string(),
            http,
            entity,
            subscription: None,
            client: Mutex::new(client),
        }
    }

    /// A fixture on another emulator: its ATOM base URL, a client on it, and
    /// the environment variable the configs name for its connection string
    /// (the test sets it on the CLI processes it starts).
    pub async fn on(http: String, client: Client, connection_env: &str, subs: &[&str]) -> Self {
        Self::on_named(
            http,
            client,
            connection_env,
            &unique(if TOPIC { "t" } else { "q" }),
            subs,
        )
        .await
    }

    /// As [`on`](Self::on), with the queue or topic named `entity` (for an
    /// emulator started with a flag that names it).
    pub async fn on_named(http: String, client: Client, connection_env: &str, entity: &str, subs: &[&str]) -> Self {
        let f = Self {
            connection_env: connection_env.to_string(),
            http,
            entity: entity.to_string(),
            subscription: TOPIC.then(|| subs.first().copied().unwrap_or("s").to_string()),
            client: Mutex::new(client),
        };
        // The emulator auto-creates entities when a link names them: attach a
        // receiver to each so the topic and its subscriptions exist before
        // anything is sent (a first send would create a queue).
        if TOPIC {
            for s in subs {
                let r = f.receiver_on(Some(s), SubQueue::None).await;
                r.dispose().await.ok();
            }
        } else {
            let r = f.receiver_on(None, SubQueue::None).await;
            r.dispose().await.ok();
        }
        f
    }

    pub async fn receiver_on(&self, subscription: Option<&str>, sub_queue: SubQueue) -> ServiceBusReceiver {
        let options = ServiceBusReceiverOptions {
            sub_queue,
            ..Default::default()
        };
        let mut client = self.client.lock().await;
        let fut = async {
            match subscription {
                Some(s) => {
                    client
                        .create_receiver_for_subscription(self.entity.clone(), s.to_string(), options)
                        .await
                }
                None => client.create_receiver_for_queue(self.entity.clone(), options).await,
            }
        };
        tokio::time::timeout(CALL, fut)
            .await
            .expect("attach within 20 s")
            .expect("receiver attaches")
    }

    /// The receiver of the source: the queue, or the managed subscription.
    pub async fn source_receiver(&self) -> ServiceBusReceiver {
        self.receiver_on(self.subscription.as_deref(), SubQueue::None).await
    }

    pub async fn dlq_receiver(&self) -> ServiceBusReceiver {
        self.receiver_on(self.subscription.as_deref(), SubQueue::DeadLetter)
            .await
    }

    /// The fixture's config with extra lines under the queue's `servicebus:` section.
    pub fn config_with(&self, extra_servicebus: &str) -> Config {
        Config::from_yaml(&self.config_yaml_with(extra_servicebus), "test", &[]).expect("fixture config")
    }

    /// The same as a file, for the CLI (the queue is `dlq`); the CLI reads
    /// the connection string from the fixture's environment variable.
    pub fn config_file_with(&self, extra_servicebus: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("dlqb-sb-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, self.config_yaml_with(extra_servicebus)).expect("write the fixture's config");
        path
    }

    /// The YAML of [`config_file_with`](Self::config_file_with).
    pub fn config_yaml_with(&self, extra_servicebus: &str) -> String {
        let entity = match &self.subscription {
            Some(s) => format!("      topic: {}\n      subscription: {s}\n", self.entity),
            None => format!("      queue: {}\n", self.entity),
        };
        format!(
            "queues:\n  - name: dlq\n    servicebus:\n      connection_string_env: {}\n{entity}      management_endpoint: {}\n{extra_servicebus}redrive:\n  hold: 2m\n",
            self.connection_env, self.http
        )
    }

    /// Send to the source queue or topic, with a timeout and retries (the
    /// fe2o3-amqp settlement race, TESTING.md).
    pub async fn send(&self, msgs: Vec<ServiceBusMessage>) {
        for chunk in msgs.chunks(50) {
            let mut done = false;
            for _ in 0..3 {
                let mut sender = {
                    let mut client = self.client.lock().await;
                    client
                        .create_sender(self.entity.clone(), ServiceBusSenderOptions::default())
                        .await
                        .expect("sender attaches")
                };
                match tokio::time::timeout(Duration::from_secs(10), sender.send_messages(chunk.to_vec())).await {
                    Ok(Ok(())) => {
                        sender.dispose().await.ok();
                        done = true;
                        break;
                    }
                    Ok(Err(e)) => panic!("send failed: {e}"),
                    Err(_) => continue,
                }
            }
            assert!(done, "send timed out three times");
        }
    }

    /// Receive up to `n` messages (fewer when the entity runs dry).
    pub async fn receive(rx: &mut ServiceBusReceiver, n: usize) -> Vec<ServiceBusReceivedMessage> {
        let mut out = Vec::new();
        let mut empty = 0;
        while out.len() < n && empty < 1 {
            let want = (n - out.len()).min(100) as u32;
            let got = tokio::time::timeout(CALL, rx.receive_messages_with_max_wait_time(want, Some(WAIT)))
                .await
                .expect("receive returns")
                .expect("receive succeeds");
            if got.is_empty() {
                empty += 1;
            }
            out.extend(got);
        }
        out
    }

    /// Every message in the DLQ, browsed (locked ones included).
    pub async fn browse_dlq(&self) -> Vec<ServiceBusPeekedMessage> {
        self.browse(SubQueue::DeadLetter).await
    }

    /// Every message in the source or one of its sub-queues, browsed.
    pub async fn browse(&self, sub_queue: SubQueue) -> Vec<ServiceBusPeekedMessage> {
        // The test's own reader: azservicebus's peek can hang on a machine
        // busy compiling (fe2o3-amqp loses a fast reply now and then), and a
        // browse changes nothing, so a hung one is tried again afresh.
        for attempt in 1..=3 {
            let mut rx = self.receiver_on(self.subscription.as_deref(), sub_queue.clone()).await;
            let mut out: Vec<ServiceBusPeekedMessage> = Vec::new();
            let mut from = 1;
            let whole = loop {
                let Ok(page) = tokio::time::timeout(CALL, rx.peek_messages(100, Some(from))).await else {
                    break false;
                };
                let page = page.expect("peek succeeds");
                let Some(last) = page.last() else { break true };
                from = last.sequence_number() + 1;
                out.extend(page);
            };
            rx.dispose().await.ok();
            if whole {
                return out;
            }
            eprintln!("browse attempt {attempt}: a peek did not return within {CALL:?}");
        }
        panic!("peek returns: three browses hung");
    }

    /// Dead-letter raw messages through the source: receive each and
    /// dead-letter it with its `error` attribute as the reason.
    pub async fn dead_letter_raw(&self, msgs: Vec<ServiceBusMessage>) {
        let n = msgs.len();
        let before = self.browse_dlq().await.len();
        self.send(msgs).await;
        self.dead_letter_sent(n, before).await;
    }

    /// Dead-letter AMQP messages of any body section kind (azservicebus
    /// sends data sections only), sent on a plain fe2o3-amqp connection
    /// with a `$cbs` token for the entity, as another SDK or a JMS client
    /// would send them.
    pub async fn dead_letter_amqp(&self, msgs: Vec<Message<Body<Value>>>) {
        use fe2o3_amqp::{Sender, Session};
        use fe2o3_amqp_cbs::client::CbsClient;
        use fe2o3_amqp_cbs::token::CbsToken;
        let n = msgs.len();
        let before = self.browse_dlq().await.len();
        let cs = std::env::var(&self.connection_env).expect("the fixture's connection string");
        let cs = dlq_bridge::backend::servicebus::ConnectionString::parse(&cs).expect("a connection string");
        let mut connection = fe2o3_amqp::Connection::builder()
            .container_id(unique("raw"))
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
            .open(format!("amqp://{}:5672", cs.host).as_str())
            .await
            .expect("open a connection");
        let mut session = Session::begin(&mut connection).await.expect("begin a session");
        let mut cbs = CbsClient::attach(&mut session).await.expect("attach $cbs");
        let audience = format!("amqp://{}/{}", cs.host, self.entity);
        let expiry = chrono::Utc::now().timestamp() as u64 + 3600;
        let token = dlq_bridge::backend::servicebus::sas_token(
            &audience,
            cs.key_name.as_deref().unwrap_or_default(),
            cs.key.as_deref().unwrap_or_default(),
            expiry,
        );
        cbs.put_token(
            audience.as_str(),
            CbsToken::new(token, "servicebus.windows.net:sastoken", None),
        )
        .await
        .expect("put a token");
        let mut sender = Sender::attach(&mut session, unique("raw-sender"), self.entity.clone())
            .await
            .expect("attach a sender");
        for m in msgs {
            let outcome = tokio::time::timeout(CALL, sender.send(m))
                .await
                .expect("send returns")
                .expect("send succeeds");
            assert!(outcome.is_accepted(), "{outcome:?}");
        }
        sender.close().await.ok();
        cbs.close().await.ok();
        session.end().await.ok();
        connection.close().await.ok();
        self.dead_letter_sent(n, before).await;
    }

    /// Receive `n` messages sent to the source and dead-letter each with its
    /// `error` attribute as the reason; the DLQ held `before` until then.
    async fn dead_letter_sent(&self, n: usize, before: usize) {
        let mut rx = self.source_receiver().await;
        let mut moved = 0;
        for _ in 0..10 {
            if moved >= n {
                break;
            }
            for m in Self::receive(&mut rx, n - moved).await {
                let props = m.application_properties();
                let text = |k: &str| {
                    props.and_then(|p| p.0.get(k)).map(|v| match v {
                        SimpleValue::String(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
                };
                let options = DeadLetterOptions {
                    dead_letter_reason: Some(text("error").unwrap_or_else(|| "TestFailure".into())),
                    dead_letter_error_description: Some(
                        text("error_description").unwrap_or_else(|| "made to fail by the test".into()),
                    ),
                    properties_to_modify: None,
                };
                tokio::time::timeout(CALL, rx.dead_letter_message(&m, options))
                    .await
                    .expect("dead-letter returns")
                    .expect("dead-letter succeeds");
                moved += 1;
            }
        }
        rx.dispose().await.ok();
        assert_eq!(moved, n, "every message was received and dead-lettered");
        assert_eq!(self.browse_dlq().await.len(), before + n, "the DLQ holds them");
    }
}

#[async_trait]
impl<const TOPIC: bool> Fixture for ServiceBusFixtureOf<TOPIC> {
    async fn create(_ordered: bool) -> Self {
        // Ordering is by SessionId, carried on every message; the emulator
        // keeps a queue's order, and its entities need no session flag.
        Self::with_subscriptions(&["s"]).await
    }

    fn config(&self) -> Config {
        self.config_with("")
    }

    async fn dead_letter(&self, msgs: &[TestMessage]) {
        self.dead_letter_raw(msgs.iter().map(to_message).collect()).await;
    }

    async fn put_in_dlq(&self, msgs: &[TestMessage]) {
        // Nothing can be sent to a `$DeadLetterQueue`: dead-letter them.
        self.dead_letter(msgs).await;
    }

    async fn drain_source(&self) -> Vec<Received> {
        let mut rx = self.source_receiver().await;
        let mut out = Vec::new();
        loop {
            let got = Self::receive(&mut rx, 100).await;
            if got.is_empty() {
                break;
            }
            for m in got {
                out.push(Received {
                    body: m.body().expect("a data body").to_vec(),
                    attributes: attributes_of(m.application_properties()),
                    ordering_key: m.session_id().map(str::to_string),
                });
                tokio::time::timeout(CALL, rx.complete_message(&m))
                    .await
                    .expect("complete returns")
                    .expect("complete succeeds");
            }
        }
        rx.dispose().await.ok();
        out
    }

    async fn dlq_count(&self) -> usize {
        self.browse_dlq().await.len()
    }

    fn typed_attributes() -> Attributes {
        let typed = |value, t: Option<&str>| Attribute {
            value,
            data_type: t.map(str::to_string),
        };
        [
            ("int", typed(AttrValue::Int(-7), Some("int"))),
            ("long", typed(AttrValue::Int(1 << 40), None)),
            ("double", typed(AttrValue::Float(1.5), None)),
            ("bool", typed(AttrValue::Bool(true), None)),
            ("string", typed(AttrValue::String("acme ✓".into()), None)),
            (
                "timestamp",
                typed(
                    AttrValue::Timestamp(chrono::DateTime::from_timestamp_millis(1_704_164_645_123).unwrap()),
                    None,
                ),
            ),
            (
                "uuid",
                typed(
                    AttrValue::Uuid(uuid::Uuid::parse_str("6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b").unwrap()),
                    None,
                ),
            ),
            (
                "blob",
                typed(AttrValue::Binary(Bytes::from_static(&[0, 1, 2, 254, 255])), None),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
