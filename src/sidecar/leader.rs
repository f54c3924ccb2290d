//! Leader election for `serve` replicas over a `coordination.k8s.io/v1`
//! Lease (DESIGN §5).
//!
//! The leader alone evaluates alerts into notifications and runs scheduled
//! redrives; every replica serves reads and API redrives, which is safe
//! because provider leases already give competing-consumer semantics.
//!
//! kube-rs has no leader elector of its own, so this is the standard
//! client-go algorithm in a few lines: take the Lease when it is free or has
//! stood unchanged for `leaseDurationSeconds` by this replica's own clock,
//! renew it at a third of that, step down when no renewal has succeeded for
//! two thirds of it (every call is bounded by that deadline), and let
//! optimistic concurrency (`resourceVersion` on replace) settle races. On
//! shutdown the leader clears the holder so that a standby takes over at
//! once instead of after the lease expires.
//!
//! The Lease also carries the cron slots the leaders started
//! ([`ScheduleSlots`]), so that a replica taking it over runs a slot that fell
//! during the hand-over, and not one its predecessor already started, and the
//! retention alerts the leader has firing ([`RetentionFiring`]), so that the
//! next leader resolves one that clears.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::LeaderElectionConfig;

/// The Lease annotation that carries [`ScheduleSlots`]: a JSON object, each
/// schedule's key to the latest cron slot a leader started for it.
pub const SLOTS_ANNOTATION: &str = "dlq-bridge/schedule-slots";

/// The Lease annotation that carries [`RetentionFiring`]: a JSON object, each
/// queue whose retention alert fires to when it started firing.
pub const RETENTION_ANNOTATION: &str = "dlq-bridge/retention-firing";

/// The cron slots the leader has started, per schedule, kept in the Lease
/// (annotation [`SLOTS_ANNOTATION`], written with the renewals) so that a
/// replica that takes the Lease over knows which slots its predecessor ran:
/// it catches up a slot that fell during the hand-over only when no leader
/// started it. A slot is written to the Lease before its run starts, by a
/// write that succeeds only while this replica holds the Lease.
pub struct ScheduleSlots {
    state: Mutex<SlotState>,
    /// Wakes the elector to write a slot just started at once.
    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    wake: Notify,
    /// The latest generation of `state` written to the Lease.
    written: watch::Sender<u64>,
}

struct SlotState {
    /// The keys of this replica's schedules: nothing else is kept.
    keys: Vec<String>,
    slots: BTreeMap<String, DateTime<Utc>>,
    /// Bumped by every slot started here.
    generation: u64,
    /// Kept in a Lease (election on); else a start counts as recorded at once.
    lease_backed: bool,
    /// When this replica last took the Lease, it carried the annotation (or
    /// this replica created it): what the previous holders started is known.
    known: bool,
}

impl ScheduleSlots {
    /// For the schedules with these keys; `lease_backed` when leader
    /// election is on.
    pub fn new(keys: impl IntoIterator<Item = String>, lease_backed: bool) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState {
                keys: keys.into_iter().collect(),
                slots: BTreeMap::new(),
                generation: 0,
                lease_backed,
                known: !lease_backed,
            }),
            wake: Notify::new(),
            written: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().expect("schedule slots lock")
    }

    /// Note that the schedule `key` starts its `slot`; returns the generation
    /// to wait for with [`Self::recorded`], and the slot noted before.
    pub fn start(&self, key: &str, slot: DateTime<Utc>) -> (u64, Option<DateTime<Utc>>) {
        let mut st = self.lock();
        let previous = st.slots.get(key).copied();
        st.slots.insert(key.to_string(), previous.map_or(slot, |p| p.max(slot)));
        st.generation += 1;
        let generation = st.generation;
        if !st.lease_backed {
            self.written.send_replace(generation);
        }
        drop(st);
        self.wake.notify_one();
        (generation, previous)
    }

    /// Take back a slot [`Self::start`] noted that the Lease did not get in
    /// time and that is not run: unless a later slot was noted meanwhile,
    /// `key` goes back to what it was, `previous`.
    pub fn abandon(&self, key: &str, slot: DateTime<Utc>, previous: Option<DateTime<Utc>>) {
        let mut st = self.lock();
        if st.slots.get(key) == Some(&slot) {
            match previous {
                Some(p) => st.slots.insert(key.to_string(), p),
                None => st.slots.remove(key),
            };
        }
    }

    /// Whether the Lease holds generation `generation` (or a later one)
    /// within `within`.
    pub async fn recorded(&self, generation: u64, within: Duration) -> bool {
        let mut rx = self.written.subscribe();
        tokio::time::timeout(within, rx.wait_for(|w| *w >= generation))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The latest slot of `key` that a leader started, as far as known.
    pub fn last(&self, key: &str) -> Option<DateTime<Utc>> {
        self.lock().slots.get(key).copied()
    }

    /// Whether the Lease, when this replica last took it, told what the
    /// previous holders started.
    pub fn known(&self) -> bool {
        self.lock().known
    }

    /// Merge what a Lease's annotation says (`None`: it has none); when
    /// `taking_over` (this replica is not leading yet), note whether it told.
    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    pub(crate) fn learn(&self, annotation: Option<&str>, taking_over: bool) {
        let mut st = self.lock();
        let theirs: Option<BTreeMap<String, DateTime<Utc>>> = annotation.and_then(|text| {
            serde_json::from_str(text)
                .inspect_err(|e| tracing::warn!(error = %e, "the Lease's {SLOTS_ANNOTATION} annotation is unreadable; its slots are unknown"))
                .ok()
        });
        if taking_over {
            st.known = theirs.is_some();
        }
        for (key, slot) in theirs.into_iter().flatten() {
            if st.keys.contains(&key) {
                let e = st.slots.entry(key).or_insert(slot);
                *e = (*e).max(slot);
            }
        }
    }

    /// The annotation to write, and the generation it holds.
    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    pub(crate) fn annotation(&self) -> (String, u64) {
        let st = self.lock();
        let text = serde_json::to_string(&st.slots).expect("a map of strings to times serializes");
        (text, st.generation)
    }

    /// This replica created the Lease: nobody held it before.
    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    pub(crate) fn created(&self) {
        self.lock().known = true;
    }

    /// The Lease now holds `generation`.
    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    pub(crate) fn wrote(&self, generation: u64) {
        self.written.send_if_modified(|w| {
            let newer = generation > *w;
            *w = (*w).max(generation);
            newer
        });
    }
}

/// The queues whose retention alert the leader has sent as firing, and
/// since when, kept in the Lease (annotation [`RETENTION_ANNOTATION`],
/// written with the renewals and at once when it changes).
///
/// Only the leader checks retention (a check reads the DLQ, and on SQS and
/// Pub/Sub a read leases), so unlike the poller's alerts a standby cannot
/// work out for itself what fires. It mirrors what the leader wrote instead,
/// and when it takes over, resolves an alert its predecessor sent once the
/// messages are gone, as the poller's alerts are: a webhook or Slack channel
/// is told, and not only Alertmanager by `endsAt`.
#[derive(Default)]
pub struct RetentionFiring {
    firing: Mutex<BTreeMap<String, DateTime<Utc>>>,
    /// Wakes the elector to write a change at once.
    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    wake: Notify,
}

impl RetentionFiring {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DateTime<Utc>>> {
        self.firing.lock().expect("retention firing lock")
    }

    /// Since when `queue`'s retention alert fires, as far as known.
    pub fn since(&self, queue: &str) -> Option<DateTime<Utc>> {
        self.lock().get(queue).copied()
    }

    /// Note what the leader's latest check of `queue` left firing.
    pub fn set(&self, queue: &str, since: Option<DateTime<Utc>>) {
        let mut firing = self.lock();
        let changed = match since {
            Some(t) => firing.insert(queue.to_string(), t) != Some(t),
            None => firing.remove(queue).is_some(),
        };
        drop(firing);
        if changed {
            self.wake.notify_one();
        }
    }

    /// Take what the Lease says while another replica leads (`None`: it has
    /// none, so nothing fires as far as that leader said). A leader keeps its
    /// own: it is the one writing.
    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    pub(crate) fn learn(&self, annotation: Option<&str>, leading: bool) {
        if leading {
            return;
        }
        let theirs = match annotation.map(serde_json::from_str::<BTreeMap<String, DateTime<Utc>>>) {
            None => BTreeMap::new(),
            Some(Ok(map)) => map,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the Lease's {RETENTION_ANNOTATION} annotation is unreadable; ignored");
                return;
            }
        };
        *self.lock() = theirs;
    }

    /// The annotation to write.
    #[cfg_attr(not(feature = "k8s"), allow(dead_code))]
    pub(crate) fn annotation(&self) -> String {
        serde_json::to_string(&*self.lock()).expect("a map of strings to times serializes")
    }
}

/// `true` while this process is the leader.
pub type Leadership = watch::Receiver<bool>;

/// How far back a replica that takes the Lease over looks for a cron slot
/// that no leader started: twice the lease, plus 10 s. A dead leader is
/// replaced within a lease and two renewal periods (a third of it each) of
/// its last renewal; the rest is slack for timers and API calls.
pub fn catch_up_window(cfg: &LeaderElectionConfig) -> Duration {
    cfg.lease_duration * 2 + Duration::from_secs(10)
}

/// How long a leader waits for a slot to be written to the Lease before it
/// gives the slot up: two thirds of the lease, after which a leader that
/// could not renew has stepped down.
pub fn record_within(cfg: &LeaderElectionConfig) -> Duration {
    cfg.lease_duration * 2 / 3
}

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
    let pod = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty());
    if let (Some(set), Some(pod)) = (&cfg.identity, &pod)
        && set != pod
    {
        // Replicas of a Deployment share one config: each would take the
        // Lease as its own, and several would lead at once.
        tracing::warn!(
            identity = %set,
            pod = %pod,
            "leader_election.identity is set and overrides POD_NAME: every replica that reads this config claims the same identity, and they all lead; leave it out unless each replica has a config of its own"
        );
    }
    cfg.identity
        .clone()
        .or(pod)
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("dlq-bridge-{}", std::process::id()))
}

/// The elector's task: it ends once it has handed the Lease over after
/// `cancel` (or given up doing so).
pub type Elector = tokio::task::JoinHandle<()>;

#[cfg(not(feature = "k8s"))]
pub async fn start(
    _cfg: &LeaderElectionConfig,
    _slots: Arc<ScheduleSlots>,
    _retention: Arc<RetentionFiring>,
    _cancel: CancellationToken,
) -> Result<(Leadership, Elector), LeaderError> {
    Err(LeaderError::NotCompiled)
}

#[cfg(feature = "k8s")]
pub async fn start(
    cfg: &LeaderElectionConfig,
    slots: Arc<ScheduleSlots>,
    retention: Arc<RetentionFiring>,
    cancel: CancellationToken,
) -> Result<(Leadership, Elector), LeaderError> {
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
        slots,
        retention,
    };
    let (tx, rx) = watch::channel(false);
    Ok((rx, tokio::spawn(elector.run(tx, cancel))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_mirrors_the_retention_alerts_the_leader_wrote() {
        let at = |s: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let firing = RetentionFiring::default();
        firing.set("orders", Some(at(0)));
        let written = firing.annotation();
        // Another replica, standing by, takes what the leader wrote...
        let standby = RetentionFiring::default();
        standby.learn(Some(&written), false);
        assert_eq!(standby.since("orders"), Some(at(0)));
        // ...and forgets what the leader resolved, or a Lease without it.
        standby.learn(Some("{}"), false);
        assert_eq!(standby.since("orders"), None);
        standby.learn(Some(&written), false);
        standby.learn(None, false);
        assert_eq!(standby.since("orders"), None);
        // An unreadable annotation changes nothing.
        standby.learn(Some(&written), false);
        standby.learn(Some("not json"), false);
        assert_eq!(standby.since("orders"), Some(at(0)));
        // While it leads, it is the one writing: what it reads is its own.
        firing.learn(Some("{}"), true);
        assert_eq!(firing.since("orders"), Some(at(0)));
        firing.set("orders", None);
        assert_eq!(firing.annotation(), "{}");
    }
}

#[cfg(feature = "k8s")]
mod k8s {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    use k8s_openapi::jiff::Timestamp;
    use kube::Api;
    use kube::api::PostParams;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::{RETENTION_ANNOTATION, RetentionFiring, SLOTS_ANNOTATION, ScheduleSlots};

    pub struct Elector {
        pub api: Api<Lease>,
        pub name: String,
        pub me: String,
        pub duration: Duration,
        pub slots: Arc<ScheduleSlots>,
        pub retention: Arc<RetentionFiring>,
    }

    /// How often to renew (or try to acquire): a third of the lease, as
    /// client-go's 15s lease renews every 5s or so.
    pub(super) fn retry_period(duration: Duration) -> Duration {
        (duration / 3).max(Duration::from_millis(500))
    }

    /// How long after its last renewal a leader that cannot renew keeps
    /// leading: two thirds of the lease (client-go's 10s of 15s). Another
    /// replica takes over only once the Lease has stood unchanged for the
    /// whole lease by its own clock, so the old leader has stepped down a
    /// third of the lease before then.
    pub(super) fn renew_deadline(duration: Duration) -> Duration {
        duration * 2 / 3
    }

    /// How long the next call may take. Bounded whatever happens: kube's
    /// client has no response timeout, and a call hung on a half-open
    /// connection would otherwise keep a stale leader leading for as long
    /// as it hangs, next to the replica that took the Lease over.
    pub(super) fn call_budget(
        renewed_at: Option<Instant>,
        now: Instant,
        period: Duration,
        deadline: Duration,
    ) -> Duration {
        match renewed_at {
            Some(t) => (t + deadline).saturating_duration_since(now).min(period),
            None => period,
        }
    }

    /// The Lease as this replica last saw it and when, by its own monotonic
    /// clock, it last changed. Expiry is judged by that, as client-go does,
    /// and not by the holder's `renewTime`: that is another node's wall
    /// clock, and a skew of more than a lease would let two replicas lead.
    #[derive(Debug, Default)]
    pub(super) struct Observed {
        version: Option<String>,
        since: Option<Instant>,
    }

    impl Observed {
        /// Note the record's `resourceVersion` (every write changes it) as
        /// seen at `now`; returns how long it has stood unchanged.
        pub(super) fn note(&mut self, version: Option<&str>, now: Instant) -> Duration {
            if self.since.is_none() || self.version.as_deref() != version {
                self.version = version.map(str::to_owned);
                self.since = Some(now);
            }
            now.saturating_duration_since(self.since.unwrap_or(now))
        }
    }

    /// Whether this replica may take the Lease: it is free, already ours, or
    /// its holder has not written it for longer than the lease it declares
    /// (ours when it declares none).
    pub(super) fn may_take(
        holder: Option<&str>,
        me: &str,
        unchanged_for: Duration,
        declared_secs: Option<i32>,
        ours: Duration,
    ) -> bool {
        let lease = declared_secs
            .and_then(|s| u64::try_from(s).ok())
            .map_or(ours, Duration::from_secs);
        match holder {
            None => true,
            Some(h) => h == me || unchanged_for > lease,
        }
    }

    impl Elector {
        pub async fn run(self, tx: watch::Sender<bool>, cancel: CancellationToken) {
            let period = retry_period(self.duration);
            let deadline = renew_deadline(self.duration);
            let mut observed = Observed::default();
            // When the last renewal that succeeded was sent.
            let mut renewed_at: Option<Instant> = None;
            loop {
                let started = Instant::now();
                let budget = call_budget(renewed_at.filter(|_| *tx.borrow()), started, period, deadline);
                let was_leading = *tx.borrow();
                let outcome = if budget.is_zero() {
                    None
                } else {
                    tokio::time::timeout(budget, self.try_acquire_or_renew(&mut observed, was_leading))
                        .await
                        .ok()
                };
                let leading = match outcome {
                    Some(Ok(true)) => {
                        renewed_at = Some(started);
                        true
                    }
                    Some(Ok(false)) => {
                        renewed_at = None;
                        false
                    }
                    failed => {
                        match failed {
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, lease = %self.name, "leader election call failed")
                            }
                            _ => {
                                tracing::warn!(lease = %self.name, timeout = ?budget, "leader election call timed out")
                            }
                        }
                        // A leader that cannot renew keeps leading only until
                        // its renew deadline, well before another replica may
                        // take the Lease over.
                        *tx.borrow() && renewed_at.is_some_and(|t| t.elapsed() < deadline)
                    }
                };
                if *tx.borrow() != leading {
                    tracing::info!(identity = %self.me, leading, "leadership changed");
                }
                let _ = tx.send(leading);
                // A leader wakes by its renew deadline at the latest, to step
                // down on time if renewals keep failing.
                let pause = match renewed_at.filter(|_| leading) {
                    Some(t) => (t + deadline).saturating_duration_since(Instant::now()).min(period),
                    None => period,
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    // A schedule's slot to record before its run starts.
                    _ = self.slots.wake.notified(), if leading => {}
                    // A retention alert that fired or resolved.
                    _ = self.retention.wake.notified(), if leading => {}
                    _ = cancel.cancelled() => break,
                }
            }
            if *tx.borrow() {
                let _ = tx.send(false);
                match tokio::time::timeout(period, self.release()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not release the lease; it expires by itself"),
                    Err(_) => tracing::warn!("releasing the lease timed out; it expires by itself"),
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
        /// `leading`: this replica led after its previous call.
        async fn try_acquire_or_renew(&self, observed: &mut Observed, leading: bool) -> Result<bool, kube::Error> {
            let now = Timestamp::now();
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                let (slots, generation) = self.slots.annotation();
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        annotations: Some(
                            [
                                (SLOTS_ANNOTATION.to_string(), slots),
                                (RETENTION_ANNOTATION.to_string(), self.retention.annotation()),
                            ]
                            .into(),
                        ),
                        ..Default::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => {
                        self.slots.created();
                        self.slots.wrote(generation);
                        Ok(true)
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            };
            // What the holders so far started: read before this replica
            // leads, so its schedules know which slots to catch up.
            self.slots.learn(
                lease
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SLOTS_ANNOTATION))
                    .map(String::as_str),
                !leading,
            );
            // A standby mirrors the leader's retention alerts.
            self.retention.learn(
                lease
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(RETENTION_ANNOTATION))
                    .map(String::as_str),
                leading,
            );
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
            let unchanged_for = observed.note(lease.metadata.resource_version.as_deref(), Instant::now());
            if !may_take(
                holder,
                &self.me,
                unchanged_for,
                spec.lease_duration_seconds,
                self.duration,
            ) {
                return Ok(false);
            }
            lease.spec = Some(self.spec(Some(&spec), now));
            let (slots, generation) = self.slots.annotation();
            let annotations = lease.metadata.annotations.get_or_insert_default();
            annotations.insert(SLOTS_ANNOTATION.to_string(), slots);
            annotations.insert(RETENTION_ANNOTATION.to_string(), self.retention.annotation());
            // `replace` carries the resourceVersion we read: if another replica
            // wrote in between, the API answers 409 and we lost this round.
            match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                Ok(written) => {
                    observed.note(written.metadata.resource_version.as_deref(), Instant::now());
                    self.slots.wrote(generation);
                    Ok(true)
                }
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

    #[cfg(test)]
    mod tests {
        use super::*;

        #[tokio::test]
        async fn slots_are_learned_from_the_lease_and_a_slot_counts_once_written() {
            use chrono::{DateTime, Utc};
            let at = |s: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + s, 0).unwrap();
            let slots = ScheduleSlots::new(["orders/abc".to_string()], true);
            assert!(!slots.known());
            // Taking over a Lease without the annotation: what ran is unknown.
            slots.learn(None, true);
            assert!(!slots.known());
            // With it: known, and only this replica's schedules are kept.
            let theirs = format!(r#"{{"orders/abc": "{}", "gone/xyz": "{}"}}"#, at(60), at(0));
            slots.learn(Some(&theirs), true);
            assert!(slots.known());
            assert_eq!(slots.last("orders/abc"), Some(at(60)));
            assert!(!slots.annotation().0.contains("gone/xyz"));
            // A renewal read while leading leaves `known` as it was at takeover.
            slots.learn(None, false);
            assert!(slots.known());

            // A slot started counts once the Lease holds it.
            let (generation, previous) = slots.start("orders/abc", at(120));
            assert_eq!(previous, Some(at(60)));
            assert!(!slots.recorded(generation, Duration::from_millis(50)).await);
            let (text, written) = slots.annotation();
            assert!(
                text.contains(&at(120).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                "{text}"
            );
            slots.wrote(written);
            assert!(slots.recorded(generation, Duration::ZERO).await);
            // One that never made it is taken back.
            let (_, previous) = slots.start("orders/abc", at(180));
            slots.abandon("orders/abc", at(180), previous);
            assert_eq!(slots.last("orders/abc"), Some(at(120)));

            // Without election, a start counts as recorded at once.
            let local = ScheduleSlots::new(["q/k".to_string()], false);
            let (generation, _) = local.start("q/k", at(0));
            assert!(local.recorded(generation, Duration::ZERO).await);
        }

        #[test]
        fn a_skewed_renew_time_does_not_expire_a_lease_that_keeps_changing() {
            let me = "replica-b";
            let mut seen = Observed::default();
            let t0 = Instant::now();
            let secs = Some(15);
            let d = Duration::from_secs(15);
            // The holder renews every 5s. Its renewTime may read minutes old
            // on this node's clock: it does not matter, the record changes.
            for (i, version) in ["1", "2", "3", "4", "5"].iter().enumerate() {
                let now = t0 + Duration::from_secs(5 * i as u64);
                let unchanged = seen.note(Some(version), now);
                assert!(!may_take(Some("replica-a"), me, unchanged, secs, d), "round {i}");
            }
            // It stops renewing: taken over once the record stood still for a
            // whole lease by this replica's clock, not before.
            let last = t0 + Duration::from_secs(20);
            let unchanged = seen.note(Some("5"), last + Duration::from_secs(14));
            assert!(!may_take(Some("replica-a"), me, unchanged, secs, d));
            let unchanged = seen.note(Some("5"), last + Duration::from_secs(16));
            assert!(may_take(Some("replica-a"), me, unchanged, secs, d));
            // Free or ours: at once.
            assert!(may_take(None, me, Duration::ZERO, secs, d));
            assert!(may_take(Some(me), me, Duration::ZERO, secs, d));
        }

        #[test]
        fn a_leader_that_cannot_renew_steps_down_before_others_may_take_over() {
            let d = Duration::from_secs(15);
            let (period, deadline) = (retry_period(d), renew_deadline(d));
            assert_eq!(period, Duration::from_secs(5));
            assert!(deadline + period <= d + Duration::from_millis(1) && deadline > period);
            let t0 = Instant::now();
            // Renewed at t0: the next call (at about t0 + 5s) may take at most
            // what is left until t0 + 10s, however long the API hangs.
            assert_eq!(call_budget(Some(t0), t0 + period, period, deadline), period);
            assert_eq!(
                call_budget(Some(t0), t0 + Duration::from_secs(8), period, deadline),
                Duration::from_secs(2)
            );
            assert_eq!(call_budget(Some(t0), t0 + deadline, period, deadline), Duration::ZERO);
            // Not leading: one period per try.
            assert_eq!(call_budget(None, t0 + d * 10, period, deadline), period);
        }
    }
}
