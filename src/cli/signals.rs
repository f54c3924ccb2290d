//! Stopping a run cleanly on Ctrl-C (SIGINT) and on SIGTERM: leasing stops,
//! sends in flight finish and their originals are settled, the rest is
//! released. SIGTERM is how Kubernetes stops a Job's pod and `docker stop` a
//! container; the image runs the binary as PID 1, where a signal without a
//! handler is ignored until the kill that follows the grace period.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Cancels a token on the first SIGINT or SIGTERM while it lives.
pub struct Interrupt {
    task: JoinHandle<()>,
    cancel: CancellationToken,
    /// The signal's number, once one came.
    signal: Arc<AtomicU8>,
}

/// Cancel `cancel` on the first SIGINT or SIGTERM, saying on stderr what
/// the run does before it ends (`doing`: "finishing the sends in flight, …").
pub fn on_interrupt(cancel: CancellationToken, doing: &'static str) -> Interrupt {
    let signal = Arc::new(AtomicU8::new(0));
    let task = tokio::spawn({
        let signal = signal.clone();
        let cancel = cancel.clone();
        async move {
            let number = interrupted().await;
            signal.store(number, Ordering::Relaxed);
            // Cancelled before anything is said: a stderr that cannot take
            // the words must not keep the run going.
            cancel.cancel();
            note!("\ninterrupted: {doing}");
        }
    });
    Interrupt { task, cancel, signal }
}

impl Interrupt {
    /// The exit code of a run a signal stopped: 128 + its number (130 for
    /// SIGINT, 143 for SIGTERM), as shells report it.
    pub fn exit_code(&self) -> Option<u8> {
        match self.signal.load(Ordering::Relaxed) {
            0 => None,
            n => Some(128 + n),
        }
    }

    /// `connect`'s output, unless a signal comes first: then the run's exit
    /// code. Every command connects before it reads or leases anything, so a
    /// signal while an endpoint is slow to answer ends it at once, where the
    /// default action killed it without a word and, as PID 1 in a container,
    /// was ignored until the grace period's SIGKILL.
    pub async fn unless_stopped<T>(&self, connect: impl Future<Output = T>) -> Result<T, u8> {
        self.or_stopped(connect).await.ok_or_else(|| {
            note!("stopped while connecting: nothing was leased");
            self.exit_code().unwrap_or(crate::cli::exit::FAILURE)
        })
    }

    /// `work`'s output, or `None` (and `work` dropped) if a signal comes
    /// first. Only for work that holds nothing when dropped.
    pub async fn or_stopped<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            done = work => Some(done),
            () = self.cancel.cancelled() => None,
        }
    }

    /// Whether a signal has come: a read checks it at each message.
    pub fn stopped(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The number of the first SIGINT or SIGTERM to come.
async fn interrupted() -> u8 {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => 2,
                _ = term.recv() => 15,
            };
        }
    }
    // Without a SIGTERM handler (not on Unix, or it could not be set up),
    // Ctrl-C alone; a failed handler never counts as a signal.
    match tokio::signal::ctrl_c().await {
        Ok(()) => 2,
        Err(_) => std::future::pending().await,
    }
}
