//! Leader election for `serve` replicas over a `coordination.k8s.io/v1`
//! Lease (DESIGN §5).
//!
//! The leader alone evaluates alerts into notifications and runs scheduled
//! redrives; every replica serves reads and API redrives, which is safe
//! because provider leases already give competing-consumer semantics.
//!
//! kube-rs has no leader elector of its own, so this is the standard
//! client-go algorithm in a few lines: take the Lease when it is free or its
//! holder has not renewed within `leaseDurationSeconds`, renew it at a third
//! of that, and let optimistic concurrency (`resourceVersion` on replace)
//! settle races. On shutdown the leader clears the holder so that a standby
//! takes over at once instead of after the lease expires.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::LeaderElectionConfig;

/// `true` while this process is the leader.
pub type Leadership = watch::Receiver<bool>;

/// For a single replica (election off): always the leader.
pub fn always() -> Leadership {
    let (tx, rx) = watch::channel(true);
    // Keep the sender alive so receivers never see a closed channel.
    std::mem::forget(tx);
    rx
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election needs the `k8s` feature, which this build leaves out")]
    NotCompiled,
    #[error("leader election: cannot reach the Kubernetes API: {0}")]
    Client(String),
}

/// The identity this replica writes into the Lease.
pub fn identity(cfg: &LeaderElectionConfig) -> String {
    cfg.identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("dlq-bridge-{}", std::process::id()))
}

#[cfg(not(feature = "k8s"))]
pub async fn start(_cfg: &LeaderElectionConfig, _cancel: CancellationToken) -> Result<Leadership, LeaderError> {
    Err(LeaderError::NotCompiled)
}

#[cfg(feature = "k8s")]
pub async fn start(cfg: &LeaderElectionConfig, cancel: CancellationToken) -> Result<Leadership, LeaderError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| LeaderError::Client(e.to_string()))?;
    let namespace = cfg
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| client.default_namespace().to_string());
    let elector = k8s::Elector {
        api: kube::Api::namespaced(client, &namespace),
        name: cfg.lease_name.clone(),
        me: identity(cfg),
        duration: cfg.lease_duration,
    };
    let (tx, rx) = watch::channel(false);
    tokio::spawn(elector.run(tx, cancel));
    Ok(rx)
}

#[cfg(feature = "k8s")]
mod k8s {
    use std::time::Duration;

    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    use k8s_openapi::jiff::Timestamp;
    use kube::Api;
    use kube::api::PostParams;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    pub struct Elector {
        pub api: Api<Lease>,
        pub name: String,
        pub me: String,
        pub duration: Duration,
    }

    impl Elector {
        pub async fn run(self, tx: watch::Sender<bool>, cancel: CancellationToken) {
            let period = (self.duration / 3).max(Duration::from_millis(500));
            let mut last_renewed: Option<std::time::Instant> = None;
            loop {
                let leading = match self.try_acquire_or_renew().await {
                    Ok(l) => {
                        if l {
                            last_renewed = Some(std::time::Instant::now());
                        }
                        l
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, lease = %self.name, "leader election call failed");
                        // A leader that cannot renew keeps leading only until
                        // its lease may have expired and been taken over.
                        *tx.borrow() && last_renewed.is_some_and(|t| t.elapsed() < self.duration)
                    }
                };
                if *tx.borrow() != leading {
                    tracing::info!(identity = %self.me, leading, "leadership changed");
                }
                let _ = tx.send(leading);
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = cancel.cancelled() => break,
                }
            }
            if *tx.borrow() {
                let _ = tx.send(false);
                if let Err(e) = self.release().await {
                    tracing::warn!(error = %e, "could not release the lease; it expires by itself");
                }
            }
        }

        fn spec(&self, prev: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
            let same_holder = prev.and_then(|p| p.holder_identity.as_deref()) == Some(self.me.as_str());
            LeaseSpec {
                holder_identity: Some(self.me.clone()),
                lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
                acquire_time: if same_holder {
                    prev.and_then(|p| p.acquire_time.clone())
                } else {
                    Some(MicroTime(now))
                },
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(
                    prev.and_then(|p| p.lease_transitions).unwrap_or(0) + i32::from(!same_holder && prev.is_some()),
                ),
                ..Default::default()
            }
        }

        /// Returns whether this replica holds the lease after the call.
        async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
            let now = Timestamp::now();
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            };
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
            let mine = holder == Some(self.me.as_str());
            let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                (Some(MicroTime(t)), Some(secs)) => now.as_millisecond() - t.as_millisecond() > i64::from(secs) * 1000,
                _ => true,
            };
            if !(mine || holder.is_none() || expired) {
                return Ok(false);
            }
            lease.spec = Some(self.spec(Some(&spec), now));
            // `replace` carries the resourceVersion we read: if another replica
            // wrote in between, the API answers 409 and we lost this round.
            match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }

        async fn release(&self) -> Result<(), kube::Error> {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
            if spec.holder_identity.as_deref() == Some(self.me.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                self.api.replace(&self.name, &PostParams::default(), &lease).await?;
            }
            Ok(())
        }
    }
}
