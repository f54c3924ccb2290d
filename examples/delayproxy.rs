//! Benchmark helper for `bench/run.sh` (issue 14): a TCP proxy that adds a
//! fixed one-way delay, to measure redrive throughput under network latency.
//!
//! The emulators answer in well under a millisecond over loopback, so the
//! benchmark's other figures say nothing about how a tool behaves when every
//! call costs a round trip, which is what bounds a redrive against a real
//! cloud service (about 20 ms in-region): a loop that waits for one call at a
//! time runs at one batch per round trip, whatever the server's speed. This
//! proxy sits between a tool and an emulator and delays every byte by the same
//! time in each direction, so a request/response pays one round trip of
//! `2 × ONE_WAY_DELAY_MS`.
//!
//! The delay is a latency, not a bandwidth cap: each direction has a reader
//! task that stamps every chunk it reads with its due time (now + delay) and
//! queues it on an unbounded channel, and a writer task that sleeps until each
//! chunk's due time and writes it. Chunks keep their order, and any number of
//! bytes can be in flight. A new connection also waits one round trip before
//! the proxy connects upstream, as a TCP handshake would (the first request
//! then reaches the server 1.5 round trips after `connect`). TCP_NODELAY is
//! set on both sockets so that Nagle's algorithm adds no delay of its own. EOF
//! is passed on (the write half is shut down once the queued chunks are
//! written), and a connection closes when both directions have.
//!
//! ```text
//! delayproxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_DELAY_MS
//! delayproxy LISTEN=UPSTREAM [LISTEN=UPSTREAM ...] ONE_WAY_DELAY_MS
//! ```
//! A listen port of 0 takes a free port. Once every listener is bound, the
//! proxy prints one line `listening on ADDR` per listener (in the order given,
//! with the bound address) and runs until it is killed.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

const USAGE: &str = "usage: delayproxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_DELAY_MS\n       \
                     delayproxy LISTEN=UPSTREAM [LISTEN=UPSTREAM ...] ONE_WAY_DELAY_MS";

/// The largest chunk one read takes off a socket.
const CHUNK: usize = 64 * 1024;

fn parse_args(args: &[String]) -> Result<(Vec<(String, String)>, Duration)> {
    let Some((delay, rest)) = args.split_last() else {
        bail!("{USAGE}");
    };
    let delay =
        Duration::from_millis(delay.parse().with_context(|| {
            format!("ONE_WAY_DELAY_MS must be a whole number of milliseconds, not {delay:?}\n{USAGE}")
        })?);
    let pairs = match rest {
        [listen, upstream] if !listen.contains('=') && !upstream.contains('=') => {
            vec![(listen.clone(), upstream.clone())]
        }
        [] => bail!("{USAGE}"),
        pairs => pairs
            .iter()
            .map(|p| {
                p.split_once('=')
                    .map(|(l, u)| (l.to_string(), u.to_string()))
                    .with_context(|| format!("expected LISTEN=UPSTREAM, got {p:?}\n{USAGE}"))
            })
            .collect::<Result<_>>()?,
    };
    Ok((pairs, delay))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (pairs, delay) = parse_args(&args)?;
    let mut listeners = Vec::new();
    for (listen, upstream) in pairs {
        let listener = TcpListener::bind(&listen)
            .await
            .with_context(|| format!("bind {listen}"))?;
        listeners.push((listener, upstream));
    }
    for (listener, _) in &listeners {
        println!("listening on {}", listener.local_addr()?);
    }
    let mut tasks = Vec::new();
    for (listener, upstream) in listeners {
        tasks.push(tokio::spawn(accept_loop(listener, upstream, delay)));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, upstream: String, delay: Duration) -> Result<()> {
    loop {
        let (client, peer) = listener.accept().await.context("accept")?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(client, &upstream, delay).await {
                eprintln!("delayproxy: {peer} -> {upstream}: {e:#}");
            }
        });
    }
}

/// Connect upstream (after one round trip, as a handshake would take) and
/// relay both directions with the delay.
async fn relay(client: TcpStream, upstream: &str, delay: Duration) -> Result<()> {
    tokio::time::sleep(delay * 2).await;
    let server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connect {upstream}"))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    pipe(client_r, server_w, delay);
    pipe(server_r, client_w, delay);
    Ok(())
}

/// One direction: a reader task that stamps and queues each chunk, and a
/// writer task that writes it at its due time. The sockets close when both
/// directions' tasks have ended (each task owns one half).
fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf).await {
                // EOF or a reset: dropping `tx` lets the writer finish the
                // queued chunks and then shut its side down.
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break; // the writer failed: stop reading
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return; // dropping `rx` stops the reader
            }
        }
        let _ = to.shutdown().await;
    });
}
