//! The HTTP server: the router on hyper, with what `axum::serve` leaves
//! out for a port that anyone on the network may reach. A request's head
//! must arrive within [`HEAD_TIMEOUT`], and an idle keep-alive connection is
//! closed after as long: a client that opened connections and sent half a
//! head (or one header every few seconds) held each open for good, until
//! the process ran out of file descriptors, and with them its connections to
//! the providers and its liveness probe. At most [`MAX_CONNECTIONS`] are open
//! at once; more wait in the kernel's backlog.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long a client has to send a request's head (and how long a
/// keep-alive connection may wait for its next request).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. Far above what probes, scrapes, the
/// dashboard and API callers of one sidecar open; far below a process's file
/// descriptor limit.
pub const MAX_CONNECTIONS: usize = 512;

/// Serve `router` on `listener` until `shutdown`; then stop accepting, let
/// each connection finish the request it is in, and return once all have
/// closed (the caller bounds that wait).
pub async fn serve(listener: TcpListener, router: axum::Router, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (closing, closed) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = async {
                let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
                (permit, listener.accept().await)
            } => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (permit, stream) = match accepted {
            (permit, Ok((stream, _))) => (permit, stream),
            (_, Err(e)) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: pause rather than spin.
                tracing::debug!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let mut closed = closed.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT);
            let mut conn = pin!(http.serve_connection(TokioIo::new(stream), service));
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::trace!(error = %e, "HTTP connection ended");
                    }
                    return;
                }
                _ = closed.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
}
