//! Benchmark helper for `bench/run.sh` (issue 8): seeds dead-letter queues
//! quickly, and runs baseline (a), the minimal hand-written batched SDK loop
//! that dlq-bridge's filtered redrive is compared against.
//!
//! The baseline does what a person would write by hand with each SDK, one
//! batch at a time and nothing in parallel: receive a batch, keep the
//! messages whose `kind` attribute is `retry` (the benchmark's filter), send
//! copies of those to the source in one batch, delete (ack, complete) them,
//! and leave the others leased until the end, then release them all. It
//! prints one JSON line: `{"examined": N, "moved": N, "secs": F}`. CPU time
//! and memory are measured by the harness from outside (wait4 rusage).
//!
//! ```text
//! cargo run --release --example baseline -- sqs-seed --endpoint URL --queue Q --n 1000 --size 1024
//! cargo run --release --example baseline -- sqs-run --endpoint URL --dlq Q --dest Q2
//! ```
//! (see `--help` for every command; bench/bench.py drives them.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};

/// The attribute the benchmark filters on, and the value that matches.
const FILTER_ATTR: &str = "kind";
const FILTER_MATCH: &str = "retry";
const FILTER_OTHER: &str = "keep";
/// How long held messages stay leased (as dlq-bridge's default `hold`).
const HOLD_SECS: i32 = 300;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the source and DLQ queues and fill the DLQ with N messages.
    SqsSeed {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        source: String,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        size: usize,
    },
    /// Create N empty queues PREFIX-0 .. PREFIX-(N-1).
    SqsMkqueues {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        n: usize,
    },
    /// Baseline (a) on SQS.
    SqsRun {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        dlq: String,
        #[arg(long)]
        dest: String,
    },
    /// Create the DLQ topic and subscription and the source topic (with one
    /// subscription), and publish N messages to the DLQ topic.
    PubsubSeed {
        #[arg(long)]
        host: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        subscription: String,
        #[arg(long)]
        source: String,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        size: usize,
    },
    /// Create N topics with one subscription each, PREFIX-i / PREFIX-i-sub.
    PubsubMksubs {
        #[arg(long)]
        host: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        n: usize,
    },
    /// Baseline (a) on Pub/Sub.
    PubsubRun {
        #[arg(long)]
        host: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        subscription: String,
        #[arg(long)]
        dest: String,
    },
    /// Fill QUEUE's dead-letter queue with N messages (sent in batches, then
    /// received and dead-lettered). azservicebus always dials 127.0.0.1:5672.
    SbSeed {
        #[arg(long)]
        queue: String,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        size: usize,
    },
    /// Baseline (a) on Service Bus: QUEUE/$DeadLetterQueue back to QUEUE.
    SbRun {
        #[arg(long)]
        queue: String,
        /// The connection string's host: azservicebus dials port 5672 on it
        /// (the benchmark's latency mode gives a delay proxy's address).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
    },
}

fn body(i: usize, size: usize) -> String {
    let mut b = format!("{{\"n\":{i},\"pad\":\"");
    while b.len() + 2 < size {
        b.push('x');
    }
    b.push_str("\"}");
    b
}

fn kind(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        FILTER_MATCH
    } else {
        FILTER_OTHER
    }
}

fn report(examined: usize, moved: usize, started: Instant) {
    println!(
        "{}",
        serde_json::json!({"examined": examined, "moved": moved, "secs": started.elapsed().as_secs_f64()})
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().cmd {
        Cmd::SqsSeed {
            endpoint,
            queue,
            source,
            n,
            size,
        } => sqs::seed(&endpoint, &queue, &source, n, size).await,
        Cmd::SqsMkqueues { endpoint, prefix, n } => sqs::mkqueues(&endpoint, &prefix, n).await,
        Cmd::SqsRun { endpoint, dlq, dest } => sqs::run(&endpoint, &dlq, &dest).await,
        Cmd::PubsubSeed {
            host,
            project,
            topic,
            subscription,
            source,
            n,
            size,
        } => pubsub::seed(&host, &project, &topic, &subscription, &source, n, size).await,
        Cmd::PubsubMksubs {
            host,
            project,
            prefix,
            n,
        } => pubsub::mksubs(&host, &project, &prefix, n).await,
        Cmd::PubsubRun {
            host,
            project,
            subscription,
            dest,
        } => pubsub::run(&host, &project, &subscription, &dest).await,
        Cmd::SbSeed { queue, n, size } => servicebus::seed(&queue, n, size).await,
        Cmd::SbRun { queue, host } => servicebus::run(&queue, &host).await,
    }
}

mod sqs {
    use super::*;
    use aws_config::BehaviorVersion;
    use aws_config::timeout::TimeoutConfig;
    use aws_sdk_sqs::Client;
    use aws_sdk_sqs::types::{
        ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageAttributeValue,
        SendMessageBatchRequestEntry,
    };

    async fn client(endpoint: &str) -> Client {
        let cfg = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(30))
                    .build(),
            )
            .load()
            .await;
        Client::new(&cfg)
    }

    async fn create(c: &Client, name: &str) -> Result<String> {
        let out = c.create_queue().queue_name(name).send().await.context("CreateQueue")?;
        out.queue_url.ok_or_else(|| anyhow!("no queue URL"))
    }

    fn text(v: &str) -> MessageAttributeValue {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .expect("type set")
    }

    pub async fn seed(endpoint: &str, queue: &str, source: &str, n: usize, size: usize) -> Result<()> {
        let c = client(endpoint).await;
        create(&c, source).await?;
        let url = create(&c, queue).await?;
        // Batches of 10, eight requests in flight.
        let starts: Vec<usize> = (0..n).step_by(10).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for group in starts.chunks(starts.len().div_ceil(8).max(1)) {
            let (c, url, group) = (c.clone(), url.clone(), group.to_vec());
            tasks.spawn(async move {
                for start in group {
                    let mut req = c.send_message_batch().queue_url(&url);
                    for i in start..(start + 10).min(n) {
                        req = req.entries(
                            SendMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .message_body(body(i, size))
                                .message_attributes(FILTER_ATTR, text(kind(i)))
                                .message_attributes("error", text("Timeout"))
                                .build()?,
                        );
                    }
                    let out = req.send().await.context("SendMessageBatch")?;
                    if !out.failed().is_empty() {
                        bail!("seed: {} entries failed: {:?}", out.failed().len(), out.failed()[0]);
                    }
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    }

    pub async fn mkqueues(endpoint: &str, prefix: &str, n: usize) -> Result<()> {
        let c = client(endpoint).await;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..8 {
            let (c, prefix) = (c.clone(), prefix.to_string());
            tasks.spawn(async move {
                for i in (w..n).step_by(8) {
                    create(&c, &format!("{prefix}-{i}")).await?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    }

    pub async fn run(endpoint: &str, dlq: &str, dest: &str) -> Result<()> {
        let started = Instant::now();
        let c = client(endpoint).await;
        let dlq_url = c
            .get_queue_url()
            .queue_name(dlq)
            .send()
            .await?
            .queue_url
            .unwrap_or_default();
        let dest_url = c
            .get_queue_url()
            .queue_name(dest)
            .send()
            .await?
            .queue_url
            .unwrap_or_default();
        let (mut examined, mut moved) = (0, 0);
        let mut held: Vec<String> = Vec::new();
        loop {
            let got = c
                .receive_message()
                .queue_url(&dlq_url)
                .max_number_of_messages(10)
                .visibility_timeout(HOLD_SECS)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await?
                .messages
                .unwrap_or_default();
            if got.is_empty() {
                break;
            }
            examined += got.len();
            let mut send = c.send_message_batch().queue_url(&dest_url);
            let mut delete = c.delete_message_batch().queue_url(&dlq_url);
            let mut matched = 0;
            for (j, m) in got.into_iter().enumerate() {
                let attrs = m.message_attributes.unwrap_or_default();
                let hit = attrs.get(FILTER_ATTR).and_then(|a| a.string_value()) == Some(FILTER_MATCH);
                let handle = m.receipt_handle.unwrap_or_default();
                if !hit {
                    held.push(handle);
                    continue;
                }
                matched += 1;
                let mut entry = SendMessageBatchRequestEntry::builder()
                    .id(j.to_string())
                    .message_body(m.body.unwrap_or_default());
                for (k, v) in attrs {
                    entry = entry.message_attributes(k, v);
                }
                send = send.entries(entry.build()?);
                delete = delete.entries(
                    DeleteMessageBatchRequestEntry::builder()
                        .id(j.to_string())
                        .receipt_handle(handle)
                        .build()?,
                );
            }
            if matched > 0 {
                let out = send.send().await?;
                if !out.failed().is_empty() {
                    bail!("send failed: {:?}", out.failed()[0]);
                }
                delete.send().await?;
                moved += matched;
            }
        }
        for chunk in held.chunks(10) {
            let mut req = c.change_message_visibility_batch().queue_url(&dlq_url);
            for (j, h) in chunk.iter().enumerate() {
                req = req.entries(
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(j.to_string())
                        .receipt_handle(h)
                        .visibility_timeout(0)
                        .build()?,
                );
            }
            req.send().await?;
        }
        report(examined, moved, started);
        Ok(())
    }
}

mod pubsub {
    use super::*;
    use gcloud_gax::conn::{Channel, ConnectionOptions, Environment};
    use gcloud_gax::grpc::Request;
    use gcloud_googleapis::pubsub::v1::publisher_client::PublisherClient;
    use gcloud_googleapis::pubsub::v1::subscriber_client::SubscriberClient;
    use gcloud_googleapis::pubsub::v1::{
        AcknowledgeRequest, ModifyAckDeadlineRequest, PublishRequest, PubsubMessage, PullRequest, Subscription, Topic,
    };
    use gcloud_pubsub::apiv1::conn_pool::{ConnectionManager, PUBSUB};

    async fn channel(host: &str) -> Result<Channel> {
        let cm = ConnectionManager::new(
            1,
            PUBSUB,
            &Environment::Emulator(host.to_string()),
            &ConnectionOptions {
                timeout: Some(Duration::from_secs(60)),
                connect_timeout: Some(Duration::from_secs(3)),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow!("connect to {host}: {e}"))?;
        Ok(cm.conn())
    }

    fn publisher(ch: &Channel) -> PublisherClient<Channel> {
        PublisherClient::new(ch.clone())
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20)
    }

    fn subscriber(ch: &Channel) -> SubscriberClient<Channel> {
        SubscriberClient::new(ch.clone())
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(256 << 20)
    }

    async fn create_topic(ch: &Channel, name: &str) -> Result<()> {
        publisher(ch)
            .create_topic(Topic {
                name: name.to_string(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("create topic {name}"))?;
        Ok(())
    }

    async fn create_sub(ch: &Channel, name: &str, topic: &str) -> Result<()> {
        subscriber(ch)
            .create_subscription(Subscription {
                name: name.to_string(),
                topic: topic.to_string(),
                ack_deadline_seconds: 60,
                ..Default::default()
            })
            .await
            .with_context(|| format!("create subscription {name}"))?;
        Ok(())
    }

    pub async fn seed(
        host: &str,
        project: &str,
        topic: &str,
        subscription: &str,
        source: &str,
        n: usize,
        size: usize,
    ) -> Result<()> {
        let ch = channel(host).await?;
        let topic = format!("projects/{project}/topics/{topic}");
        let source_topic = format!("projects/{project}/topics/{source}");
        create_topic(&ch, &topic).await?;
        create_topic(&ch, &source_topic).await?;
        create_sub(&ch, &format!("projects/{project}/subscriptions/{subscription}"), &topic).await?;
        create_sub(
            &ch,
            &format!("projects/{project}/subscriptions/{source}-sub"),
            &source_topic,
        )
        .await?;
        let mut tasks = tokio::task::JoinSet::new();
        let starts: Vec<usize> = (0..n).step_by(100).collect();
        for group in starts.chunks(starts.len().div_ceil(4).max(1)) {
            let (ch, topic, group) = (ch.clone(), topic.clone(), group.to_vec());
            tasks.spawn(async move {
                for start in group {
                    let messages = (start..(start + 100).min(n))
                        .map(|i| PubsubMessage {
                            data: body(i, size).into(),
                            attributes: HashMap::from([
                                (FILTER_ATTR.to_string(), kind(i).to_string()),
                                ("error".to_string(), "Timeout".to_string()),
                            ]),
                            ..Default::default()
                        })
                        .collect();
                    publisher(&ch)
                        .publish(PublishRequest {
                            topic: topic.clone(),
                            messages,
                        })
                        .await
                        .context("publish")?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    }

    pub async fn mksubs(host: &str, project: &str, prefix: &str, n: usize) -> Result<()> {
        let ch = channel(host).await?;
        for i in 0..n {
            let topic = format!("projects/{project}/topics/{prefix}-{i}");
            create_topic(&ch, &topic).await?;
            create_sub(
                &ch,
                &format!("projects/{project}/subscriptions/{prefix}-{i}-sub"),
                &topic,
            )
            .await?;
        }
        Ok(())
    }

    pub async fn run(host: &str, project: &str, subscription: &str, dest: &str) -> Result<()> {
        let started = Instant::now();
        let ch = channel(host).await?;
        let subscription = format!("projects/{project}/subscriptions/{subscription}");
        let dest = format!("projects/{project}/topics/{dest}");
        let (mut examined, mut moved) = (0, 0);
        let mut held: Vec<String> = Vec::new();
        loop {
            #[allow(deprecated)]
            let mut req = Request::new(PullRequest {
                subscription: subscription.clone(),
                return_immediately: true,
                max_messages: 100,
            });
            req.set_timeout(Duration::from_secs(5));
            let got = subscriber(&ch).pull(req).await?.into_inner().received_messages;
            if got.is_empty() {
                break;
            }
            examined += got.len();
            subscriber(&ch)
                .modify_ack_deadline(ModifyAckDeadlineRequest {
                    subscription: subscription.clone(),
                    ack_ids: got.iter().map(|r| r.ack_id.clone()).collect(),
                    ack_deadline_seconds: HOLD_SECS,
                })
                .await?;
            let mut copies = Vec::new();
            let mut acks = Vec::new();
            for r in got {
                let m = r.message.unwrap_or_default();
                if m.attributes.get(FILTER_ATTR).map(String::as_str) == Some(FILTER_MATCH) {
                    copies.push(PubsubMessage {
                        data: m.data,
                        attributes: m.attributes,
                        ordering_key: m.ordering_key,
                        ..Default::default()
                    });
                    acks.push(r.ack_id);
                } else {
                    held.push(r.ack_id);
                }
            }
            if !copies.is_empty() {
                let n = copies.len();
                let ids = publisher(&ch)
                    .publish(PublishRequest {
                        topic: dest.clone(),
                        messages: copies,
                    })
                    .await?
                    .into_inner()
                    .message_ids;
                if ids.len() != n {
                    bail!("publish confirmed {} of {n}", ids.len());
                }
                subscriber(&ch)
                    .acknowledge(AcknowledgeRequest {
                        subscription: subscription.clone(),
                        ack_ids: acks,
                    })
                    .await?;
                moved += n;
            }
        }
        for chunk in held.chunks(1000) {
            subscriber(&ch)
                .modify_ack_deadline(ModifyAckDeadlineRequest {
                    subscription: subscription.clone(),
                    ack_ids: chunk.to_vec(),
                    ack_deadline_seconds: 0,
                })
                .await?;
        }
        report(examined, moved, started);
        Ok(())
    }
}

mod servicebus {
    use super::*;
    use azservicebus::core::BasicRetryPolicy;
    use azservicebus::prelude::*;
    use azservicebus::receiver::DeadLetterOptions;
    use fe2o3_amqp_types::messaging::ApplicationProperties;
    use fe2o3_amqp_types::primitives::SimpleValue;

    const CALL: Duration = Duration::from_secs(30);

    async fn client(host: &str) -> Result<ServiceBusClient<BasicRetryPolicy>> {
        let connection = format!("Endpoint=sb://{host};SharedAccessKeyName=x;SharedAccessKey=y");
        Ok(ServiceBusClient::unsecured()
            .new_from_connection_string(connection, ServiceBusClientOptions::default())
            .await?)
    }

    fn props(i: usize) -> ApplicationProperties {
        let mut p = ApplicationProperties::default();
        p.0.insert(FILTER_ATTR.into(), SimpleValue::String(kind(i).into()));
        p.0.insert("error".into(), SimpleValue::String("Timeout".into()));
        p
    }

    /// Send `msgs` in as few batches as the link allows, each with a timeout
    /// and retries (fe2o3-amqp can lose a fast settlement; TESTING.md).
    async fn send_all(
        client: &mut ServiceBusClient<BasicRetryPolicy>,
        sender: &mut ServiceBusSender,
        queue: &str,
        msgs: Vec<ServiceBusMessage>,
    ) -> Result<()> {
        let mut batches: Vec<Vec<ServiceBusMessage>> = Vec::new();
        let mut probe = sender.create_message_batch(CreateMessageBatchOptions::default())?;
        let mut current = Vec::new();
        for m in msgs {
            if probe.try_add_message(m.clone()).is_err() {
                batches.push(std::mem::take(&mut current));
                probe = sender.create_message_batch(CreateMessageBatchOptions::default())?;
                probe
                    .try_add_message(m.clone())
                    .map_err(|_| anyhow!("a message is too large"))?;
            }
            current.push(m);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        for b in batches {
            let mut ok = false;
            for _ in 0..3 {
                match tokio::time::timeout(Duration::from_secs(10), sender.send_messages(b.clone())).await {
                    Ok(r) => {
                        r?;
                        ok = true;
                        break;
                    }
                    Err(_) => {
                        *sender = client
                            .create_sender(queue.to_string(), ServiceBusSenderOptions::default())
                            .await?;
                    }
                }
            }
            if !ok {
                bail!("send timed out three times");
            }
        }
        Ok(())
    }

    pub async fn seed(queue: &str, n: usize, size: usize) -> Result<()> {
        let mut client = client("127.0.0.1").await?;
        let mut sender = client
            .create_sender(queue.to_string(), ServiceBusSenderOptions::default())
            .await?;
        let mut rx = client
            .create_receiver_for_queue(queue.to_string(), ServiceBusReceiverOptions::default())
            .await?;
        let mut dead = 0;
        for start in (0..n).step_by(500) {
            let end = (start + 500).min(n);
            let msgs = (start..end)
                .map(|i| {
                    let mut m = ServiceBusMessage::new(body(i, size).into_bytes());
                    *m.application_properties_mut() = Some(props(i));
                    m
                })
                .collect();
            send_all(&mut client, &mut sender, queue, msgs).await?;
            while dead < end {
                let got = tokio::time::timeout(
                    CALL,
                    rx.receive_messages_with_max_wait_time((end - dead).min(100) as u32, Duration::from_secs(2)),
                )
                .await??;
                for m in got {
                    let options = DeadLetterOptions {
                        dead_letter_reason: Some("Timeout".into()),
                        dead_letter_error_description: Some("seeded by the benchmark".into()),
                        properties_to_modify: None,
                    };
                    tokio::time::timeout(CALL, rx.dead_letter_message(&m, options)).await??;
                    dead += 1;
                }
            }
        }
        rx.dispose().await.ok();
        sender.dispose().await.ok();
        client.dispose().await.ok();
        Ok(())
    }

    pub async fn run(queue: &str, host: &str) -> Result<()> {
        let started = Instant::now();
        let mut client = client(host).await?;
        let mut sender = client
            .create_sender(queue.to_string(), ServiceBusSenderOptions::default())
            .await?;
        let mut rx = client
            .create_receiver_for_queue(
                queue.to_string(),
                ServiceBusReceiverOptions {
                    sub_queue: SubQueue::DeadLetter,
                    receive_mode: ServiceBusReceiveMode::PeekLock,
                    ..Default::default()
                },
            )
            .await?;
        let (mut examined, mut moved) = (0, 0);
        let mut held = Vec::new();
        loop {
            let got = tokio::time::timeout(
                CALL,
                rx.receive_messages_with_max_wait_time(100, Duration::from_secs(1)),
            )
            .await??;
            if got.is_empty() {
                break;
            }
            examined += got.len();
            let mut copies = Vec::new();
            let mut matched = Vec::new();
            for m in got {
                let hit = matches!(
                    m.application_properties().and_then(|p| p.0.get(FILTER_ATTR)),
                    Some(SimpleValue::String(s)) if s == FILTER_MATCH
                );
                if !hit {
                    held.push(m);
                    continue;
                }
                let mut copy = ServiceBusMessage::new(m.body().map_err(|e| anyhow!("{e:?}"))?.to_vec());
                if let Some(p) = m.application_properties() {
                    *copy.application_properties_mut() = Some(p.clone());
                }
                copies.push(copy);
                matched.push(m);
            }
            if !copies.is_empty() {
                send_all(&mut client, &mut sender, queue, copies).await?;
                for m in &matched {
                    tokio::time::timeout(CALL, rx.complete_message(m)).await??;
                }
                moved += matched.len();
            }
        }
        for m in &held {
            tokio::time::timeout(CALL, rx.abandon_message(m, None)).await??;
        }
        report(examined, moved, started);
        rx.dispose().await.ok();
        sender.dispose().await.ok();
        client.dispose().await.ok();
        Ok(())
    }
}
