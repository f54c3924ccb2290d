//! `dlq-bridge serve`: the sidecar (DESIGN §5). Wires the poller, the alert
//! evaluator and its sinks, scheduled redrives, leader election and the HTTP
//! API around the shared queues registry, and shuts down gracefully.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ScheduleConfig};
use crate::engine::journal::{Journal, Rotation};
use crate::engine::redrive::{Action, Trigger};
use crate::engine::registry::{RedriveRequest, Registry};
use crate::sidecar::alert::sinks::Sinks;
use crate::sidecar::alert::{Evaluator, StateFile};
use crate::sidecar::app::{App, RunStatus};
use crate::sidecar::exclusion::QueueLocks;
use crate::sidecar::leader::{self, Leadership, RetentionFiring, ScheduleSlots};
use crate::sidecar::metrics::Metrics;
use crate::sidecar::poller::{AdminLimits, PollResult, Poller, StatusCache};
use crate::sidecar::{dashboard, guard};

/// Run the sidecar until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // An IP address and port, loopback unless token_env is set: checked when
    // the config is loaded (so `check` reports it too), and again here for a
    // config built in code.
    let listen: SocketAddr =
        config
            .serve
            .check_listen()
            .map_err(|(field, message)| crate::config::ConfigError::Invalid {
                location: "config".into(),
                field: field.into(),
                message,
            })?;
    let token = match &config.serve.token_env {
        Some(var) => Some(
            token_from(std::env::var(var).ok()).ok_or_else(|| crate::config::ConfigError::Invalid {
                location: "config".into(),
                field: "serve.token_env".into(),
                message: format!("environment variable {var} is not set (or holds only whitespace)"),
            })?,
        ),
        None => None,
    };
    let data_dir = config.serve.data_dir.clone().or_else(crate::config::state_dir);
    // Held until the process exits: one `serve` per data directory.
    let _data_dir_lock = match &data_dir {
        Some(dir) => Some(lock_data_dir(dir)?),
        None => None,
    };
    let journal = match config.journal_path() {
        Some(path) => Some(Arc::new(Journal::open_with(&path, Rotation::from(&config.redrive))?)),
        None => None,
    };
    // Sinks read their URLs from the environment: one that is not set fails
    // before serve says it is listening.
    let metrics = Arc::new(Metrics::new());
    let sinks = Sinks::start(&config.alerts.sinks, metrics.clone())?;
    // Bind before taking the Lease: a port already in use fails before this
    // replica leads, and /healthz answers as soon as leadership is visible.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, queues = config.queues.len(), "serving");
    let _ = writeln!(std::io::stderr(), "dlq-bridge serve: listening on http://{bound}");
    let shutdown = CancellationToken::new();
    let election = &config.serve.leader_election;
    let slots = ScheduleSlots::new(config.schedules.iter().map(schedule_key), election.enabled);
    let hand_over = HandOver {
        slots: slots.clone(),
        catch_up: election.enabled.then(|| leader::catch_up_window(election)),
        record_within: leader::record_within(election),
    };
    let retention_firing = Arc::new(RetentionFiring::default());
    let (leadership, elector): (Leadership, Option<leader::Elector>) = if config.serve.leader_election.enabled {
        let (leadership, elector) = leader::start(
            &config.serve.leader_election,
            slots.clone(),
            retention_firing.clone(),
            shutdown.clone(),
        )
        .await?;
        (leadership, Some(elector))
    } else {
        (leader::always(), None)
    };
    if !config.alerts.rules.is_empty() && config.alerts.sinks.is_empty() {
        tracing::warn!(
            rules = config.alerts.rules.len(),
            "alerts.rules are set but alerts.sinks is empty: rules only set dlq_bridge_alerts_firing and /v1/alerts, no notification is sent"
        );
    }
    let mut evaluator = Evaluator::new(&config.alerts, config.queues.iter().map(|q| q.name.clone()));
    // What the alerts knew before a restart: which fire, which reasons are
    // known. Only with rules, in the data directory this process holds.
    let alert_state = data_dir
        .as_deref()
        .filter(|_| !config.alerts.rules.is_empty())
        .map(StateFile::in_dir);
    if let Some(file) = &alert_state {
        file.load(&mut evaluator, Utc::now());
    }
    let sample = if evaluator.needs_reasons() {
        config.serve.reason_sample.max(1)
    } else {
        config.serve.reason_sample
    };
    let registry = Arc::new(Registry::new(config.clone()));
    let cache = Arc::new(StatusCache::default());
    let locks = Arc::new(QueueLocks::new(config.queues.iter().map(|q| q.name.as_str())));
    let app = Arc::new(App {
        registry: registry.clone(),
        cache: cache.clone(),
        metrics: metrics.clone(),
        token,
        locks: locks.clone(),
        data_dir: data_dir.clone(),
        journal,
        history: Default::default(),
        runs: Mutex::new(HashMap::new()),
        finished_order: Mutex::new(VecDeque::new()),
        shutdown: shutdown.clone(),
        tasks: Mutex::new(JoinSet::new()),
        queues_by_backend: queues_by_backend(&config),
    });

    let (results_tx, results_rx) = mpsc::channel::<PollResult>(1024);
    let limits = Arc::new(AdminLimits::new(&config.serve.admin_calls_per_second));
    for o in limits.overloaded(&config) {
        tracing::warn!(
            "{} {} queues at their poll intervals ask for {:.1} admin calls/s, over \
             serve.admin_calls_per_second.{} ({}): each is polled about every {:.0} s instead",
            o.queues,
            o.backend,
            o.calls_per_second,
            o.backend,
            o.limit,
            o.round.as_secs_f64().ceil()
        );
    }
    let poller = Arc::new(Poller {
        registry: registry.clone(),
        cache,
        metrics: metrics.clone(),
        limits,
        locks,
        results: results_tx,
    });
    // The loops that lease or start work: waited for on shutdown, so that a
    // poll's reason sample and a purge a retention check is running release
    // what they hold, and a run a schedule is starting is among the runs
    // drained.
    let mut loops = JoinSet::new();
    poller.spawn_all(&config, sample, shutdown.clone(), &mut loops);
    for q in config.queues.iter() {
        let Some(policy) = &q.retention else { continue };
        if purges(policy) {
            app.metrics
                .init_runs(&q.name, Action::PURGE, &Trigger::Retention.to_string());
        }
        loops.spawn(retention_loop(
            app.clone(),
            q.name.clone(),
            data_dir.clone(),
            sinks.clone(),
            retention_firing.clone(),
            leadership.clone(),
            shutdown.clone(),
        ));
    }
    let outgoing = sinks.clone();
    let alerts_done = tokio::spawn(alert_loop(
        results_rx,
        evaluator,
        alert_state,
        config.alerts.resend_delay,
        sinks,
        metrics,
        leadership.clone(),
    ));
    for s in &config.schedules {
        app.metrics
            .init_runs(&s.queue, Action::REDRIVE, &Trigger::Schedule.to_string());
        loops.spawn(schedule_loop(
            app.clone(),
            s.clone(),
            leadership.clone(),
            shutdown.clone(),
            hand_over.clone(),
        ));
    }

    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: no new leases, finishing in-flight batches");
        signal.cancel();
    });
    let router = crate::sidecar::api::routes()
        .merge(dashboard::api::routes())
        .merge(dashboard::routes(config.serve.dashboard.enabled))
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard::guard))
        .with_state(app.clone());
    let mut server = std::pin::pin!(crate::sidecar::http::serve(listener, router, shutdown.clone()));
    // The server ends only after the shutdown: when both are ready at once
    // and the server's branch is taken, it must not be polled again (an
    // `async fn` polled after it completed panics: a CI run's SIGTERM did).
    let served = tokio::select! {
        () = &mut server => true,
        () = shutdown.cancelled() => false,
    };
    // The grace period counts from the signal, for open HTTP requests too:
    // the server waits for every connection to finish its request, and one
    // that sent half a request head and stalled held the process until the
    // pod's SIGKILL, with no drain, journal sync or notification flush.
    let deadline = tokio::time::Instant::now() + config.serve.shutdown_grace;
    if !served && tokio::time::timeout_at(deadline, &mut server).await.is_err() {
        tracing::warn!("HTTP requests still open after the shutdown grace period; closed");
    }
    let loops_done = async { while loops.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline, loops_done).await.is_err() {
        tracing::warn!(
            "polls or retention checks still running after the shutdown grace period; their leases expire by themselves"
        );
    }
    // The polls are over (and with them the poller, which sends their
    // results): the alert loop evaluates what they sent last, saves its
    // state and ends.
    drop(loops);
    if tokio::time::timeout_at(deadline, alerts_done).await.is_err() {
        tracing::warn!("the alert state was not saved within the shutdown grace period");
    }
    app.drain_runs(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    // A journal that cannot sync is reported in the exit status, after the
    // notifications are flushed and the Lease handed over, not instead.
    let journal_synced = app.journal.as_ref().map_or(Ok(()), |j| j.sync());
    // Notifications queued or in retry would die with the process: an alert
    // that fired just before a rollout must still reach its sinks.
    let left = outgoing
        .flush(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    if left > 0 {
        tracing::warn!(
            left,
            "notifications not delivered within the shutdown grace period; dropped"
        );
    }
    // The elector hands the Lease over as soon as shutdown starts, and gives
    // up after a renewal period: wait for it, so that a standby takes over
    // now rather than after the lease expires.
    if let Some(elector) = elector {
        let _ = elector.await;
    }
    journal_synced?;
    Ok(())
}

/// The configured queues' names, one group per backend, in config order.
fn queues_by_backend(config: &Config) -> Vec<Vec<String>> {
    let mut groups: Vec<(&str, Vec<String>)> = Vec::new();
    for q in &config.queues {
        let backend = q.kind.backend_name();
        match groups.iter_mut().find(|(b, _)| *b == backend) {
            Some((_, names)) => names.push(q.name.clone()),
            None => groups.push((backend, vec![q.name.clone()])),
        }
    }
    groups.into_iter().map(|(_, names)| names).collect()
}

/// The API token from its environment variable: surrounding whitespace is
/// not part of it (`kubectl create secret --from-file` keeps the file's
/// trailing newline); empty means unset.
fn token_from(raw: Option<String>) -> Option<String> {
    raw.map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Take an exclusive advisory lock (flock) on `dir/serve.lock`, so that two
/// `serve` processes never append to and rotate the same journal (a claim
/// shared by several replicas). Fails at once, naming the directory, when
/// another process holds it. On NFS the lock is only as good as the mount's
/// lock support (NFSv4, or NFSv3 with lockd; `nolock` makes it local).
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let path = dir.join("serve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(crate::config::ConfigError::Invalid {
            location: "config".into(),
            field: "serve.data_dir".into(),
            message: format!(
                "{} is in use by another dlq-bridge serve (it holds {}): give each replica its own data directory",
                dir.display(),
                path.display()
            ),
        }
        .into()),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("cannot lock {}", path.display())))
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How often the alert state is written while it changes: what a crash
/// loses at most (a notification sent again after the restart).
const ALERT_STATE_SAVED_EVERY: Duration = Duration::from_secs(5);

async fn alert_loop(
    mut results: mpsc::Receiver<PollResult>,
    mut evaluator: Evaluator,
    mut state: Option<StateFile>,
    resend_delay: Duration,
    sinks: Sinks,
    metrics: Arc<Metrics>,
    mut leadership: Leadership,
) {
    let mut lead_open = true;
    let mut resend = tokio::time::interval(resend_delay);
    resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut save = tokio::time::interval(ALERT_STATE_SAVED_EVERY);
    save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changed = false;
    loop {
        let poll = tokio::select! {
            poll = results.recv() => match poll {
                Some(p) => p,
                // Shutting down: the last changes, before the process ends.
                None => {
                    if let Some(file) = state.as_mut().filter(|_| changed) {
                        file.save(&evaluator, Utc::now()).await;
                    }
                    return;
                }
            },
            _ = save.tick(), if changed => {
                if let Some(file) = state.as_mut() {
                    file.save(&evaluator, Utc::now()).await;
                }
                changed = false;
                continue;
            }
            // When the lead was taken counts for the new reasons this replica
            // owes (`Evaluator::note_lead`): told at once, not at the next
            // poll or resend tick.
            lead = leadership.changed(), if lead_open => {
                match lead {
                    Ok(()) => {
                        let leader = *leadership.borrow_and_update();
                        evaluator.note_lead(Utc::now(), leader);
                    }
                    Err(_) => lead_open = false,
                }
                continue;
            }
            _ = resend.tick() => {
                changed = true;
                let (now, leader) = (Utc::now(), *leadership.borrow());
                for n in evaluator.owed_resolves(now, leader) {
                    tracing::info!(rule = %n.rule, queue = %n.queue, "alert resolved while no replica led: sent now");
                    sinks.send(n);
                }
                let alerts = evaluator.refresh(now, leader);
                if !alerts.is_empty() {
                    tracing::debug!(alerts = alerts.len(), "firing alerts re-sent to Alertmanager");
                    sinks.resend(alerts);
                }
                continue;
            }
        };
        if let Some(sample) = poll.sample.as_ref().filter(|s| !s.is_empty() || poll.stats.depth == 0) {
            let patterns = crate::engine::triage::top_counts(
                sample.iter().map(|m| &**m),
                &crate::engine::triage::GroupBy::Pattern,
                crate::sidecar::metrics::TOP_REASONS,
            );
            metrics.set_patterns(&poll.queue, &patterns);
        }
        let leader = *leadership.borrow();
        changed = true;
        for n in evaluator.evaluate(&poll, leader, &metrics) {
            tracing::info!(rule = %n.rule, queue = %n.queue, status = ?n.status, "alert");
            sinks.send(n);
        }
    }
}

/// When a schedule fires. `every` keeps a fixed cadence from startup rather
/// than waiting `every` after each run ends (a 15m schedule whose runs take 5m
/// would otherwise fire every 20m); a run that outlasts its interval skips the
/// slots it overran instead of starting them back to back.
enum Cadence {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Cadence {
    /// `None` for a schedule with neither (refused when the config is loaded).
    fn of(s: &ScheduleConfig) -> Option<Self> {
        match (&s.cron, s.every) {
            (Some(c), _) => c.parse::<croner::Cron>().ok().map(|c| Self::Cron(Box::new(c))),
            (None, Some(every)) if !every.is_zero() => Some(Self::Every(every)),
            _ => None,
        }
    }
}

/// The first `every` slot (`anchor + k * every`, k >= 1) strictly after `now`.
fn next_every(anchor: tokio::time::Instant, every: Duration, now: tokio::time::Instant) -> tokio::time::Instant {
    let elapsed = now.saturating_duration_since(anchor).as_nanos();
    let k = elapsed / every.as_nanos() + 1;
    let offset = every.as_nanos().saturating_mul(k);
    anchor + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
}

/// The first cron slot after both `now` and the slot that fired last: a
/// timer that wakes a little before its slot (the wall clock stepped back
/// while it slept) must not fire that slot a second time.
fn next_cron(
    cron: &croner::Cron,
    now: DateTime<Utc>,
    last: Option<DateTime<Utc>>,
) -> Result<DateTime<Utc>, croner::errors::CronError> {
    let from = last.map_or(now, |l| l.max(now));
    cron.find_next_occurrence(&from, false)
}

/// A schedule's name in the Lease's record of the cron slots started: its
/// queue and a digest of its settings, the same on every replica that has
/// the same schedule.
fn schedule_key(s: &ScheduleConfig) -> String {
    use sha2::{Digest, Sha256};
    let settings = serde_json::to_string(s).expect("a schedule serializes");
    let digest: String = Sha256::digest(settings.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}/{digest}", s.queue)
}

/// What the schedules need to get through a leader hand-over.
#[derive(Clone)]
struct HandOver {
    /// The cron slots started, kept in the Lease.
    slots: Arc<ScheduleSlots>,
    /// How far back a new leader catches up a cron slot no leader started;
    /// `None` with election off (one replica, always the leader).
    catch_up: Option<Duration>,
    /// How long to wait for a slot to be written to the Lease.
    record_within: Duration,
}

/// The cron slot a replica that has just taken the Lease over runs late: the
/// latest slot at or before `now`, if it fell within `window` and no leader
/// started it (`started`: the latest slot the Lease's record shows). The
/// caller runs it only when the Lease told what its previous holders started
/// ([`ScheduleSlots::known`]): else the slot may have run, and a slot is run
/// at most once.
fn missed_slot(
    cron: &croner::Cron,
    now: DateTime<Utc>,
    window: Duration,
    started: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    // croner's backward search keeps `now`'s fraction of a second in what it
    // finds: a slot is a whole second, as the forward search gives it.
    let slot = cron.find_previous_occurrence(&now, true).ok()?;
    let slot = slot - chrono::Duration::nanoseconds(i64::from(slot.timestamp_subsec_nanos()));
    let ago = (now - slot).to_std().unwrap_or_default();
    (ago <= window && started.is_none_or(|s| s < slot)).then_some(slot)
}

async fn schedule_loop(
    app: Arc<App>,
    s: ScheduleConfig,
    mut leadership: Leadership,
    shutdown: CancellationToken,
    hand_over: HandOver,
) {
    let Some(cadence) = Cadence::of(&s) else { return };
    let key = schedule_key(&s);
    let anchor = tokio::time::Instant::now();
    let mut last_cron: Option<DateTime<Utc>> = None;
    // A replica whose elector took the Lease before this loop first looked
    // has taken it over all the same (a restart into a free Lease, or one
    // that still names this pod): the slot it missed while down is caught up.
    let mut led = *leadership.borrow_and_update();
    if led {
        catch_up(&app, &s, &key, &cadence, &hand_over).await;
    }
    // False once the elector has ended (shutdown): nothing more to watch.
    let mut watching = true;
    'schedule: loop {
        let wake = match &cadence {
            Cadence::Every(every) => next_every(anchor, *every, tokio::time::Instant::now()),
            Cadence::Cron(c) => match next_cron(c, Utc::now(), last_cron) {
                Ok(next) => {
                    last_cron = Some(next);
                    tokio::time::Instant::now() + (next - Utc::now()).to_std().unwrap_or_default()
                }
                Err(e) => {
                    tracing::error!(queue = %s.queue, error = %e, "cron schedule has no next run; stopping it");
                    return;
                }
            },
        };
        let slot = loop {
            tokio::select! {
                // Shutdown first: after a run that outlasted its slot both are
                // ready, and a run started now would only be cancelled.
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => break last_cron,
                changed = leadership.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    let leading = *leadership.borrow_and_update();
                    let taken_over = leading && !led;
                    led = leading;
                    // A run that outlasted the next slot skips it, as any run does.
                    if taken_over
                        && catch_up(&app, &s, &key, &cadence, &hand_over).await
                        && tokio::time::Instant::now() >= wake
                    {
                        continue 'schedule;
                    }
                }
            }
        };
        if !*leadership.borrow() {
            continue;
        }
        run_scheduled(&app, &s, &key, slot, &hand_over).await;
    }
}

/// This replica has just taken the Lease: a cron slot of `s` that fell during
/// the hand-over and that no leader started runs now, once. Whether it ran.
async fn catch_up(app: &Arc<App>, s: &ScheduleConfig, key: &str, cadence: &Cadence, hand_over: &HandOver) -> bool {
    let (Cadence::Cron(c), Some(window)) = (cadence, hand_over.catch_up) else {
        return false;
    };
    let Some(missed) = missed_slot(c, Utc::now(), window, hand_over.slots.last(key)) else {
        return false;
    };
    if !hand_over.slots.known() {
        tracing::warn!(queue = %s.queue, slot = %missed, "took the Lease over from a holder that did not record its cron slots: whether this slot, within the hand-over, ran is unknown; not run again here");
        return false;
    }
    tracing::info!(queue = %s.queue, slot = %missed, "cron slot fell during the leader hand-over and no leader started it: running it now");
    run_scheduled(app, s, key, Some(missed), hand_over).await;
    true
}

/// Run schedule `s` once and wait for the run to end. A cron `slot` is first
/// recorded in the Lease: a replica that takes the Lease over then knows it
/// was started, and does not run it again; a slot that cannot be recorded in
/// time is not run here (the Lease is about to move, and the next leader
/// catches the slot up).
async fn run_scheduled(
    app: &Arc<App>,
    s: &ScheduleConfig,
    key: &str,
    slot: Option<DateTime<Utc>>,
    hand_over: &HandOver,
) {
    if let Some(slot) = slot {
        // Caught up already: its timer, computed before the wall clock
        // passed it, can fire after the catch-up's run ended.
        if hand_over.slots.last(key).is_some_and(|started| started >= slot) {
            tracing::debug!(queue = %s.queue, %slot, "cron slot already started; not run again");
            return;
        }
        let (generation, previous) = hand_over.slots.start(key, slot);
        if !hand_over.slots.recorded(generation, hand_over.record_within).await {
            hand_over.slots.abandon(key, slot, previous);
            tracing::warn!(queue = %s.queue, %slot, "could not record the cron slot in the Lease in time; not run here, left to the next leader");
            return;
        }
    }
    let req = RedriveRequest {
        filter: s.filter.clone(),
        to: s.to.clone(),
        dry_run: s.dry_run,
        rate: s.rate,
        max: s.max,
        concurrency: None,
        ..Default::default()
    };
    match app.start_run(&s.queue, req, Trigger::Schedule).await {
        Ok(id) => {
            // One run at a time per schedule: wait for it before the next.
            while app.run_view(&id).await.is_some_and(|v| v.status == RunStatus::Running) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Err(e) => {
            app.metrics.count_run(
                &s.queue,
                Action::REDRIVE,
                &Trigger::Schedule.to_string(),
                RunStatus::Failed.outcome(),
            );
            tracing::error!(queue = %s.queue, error = %e, "scheduled redrive could not start");
        }
    }
}

/// Whether a retention policy purges (and so counts as runs): an
/// `export-then-purge` one that is not a dry run.
fn purges(policy: &crate::config::RetentionConfig) -> bool {
    policy.action == crate::config::RetentionAction::ExportThenPurge && !policy.dry_run
}

/// Apply one queue's retention policy every `check_every`, on the leader only
/// (and at once when this replica becomes leader). `alert` policies notify the
/// sinks while expired messages remain, and once more when they are gone.
async fn retention_loop(
    app: Arc<App>,
    queue: String,
    data_dir: Option<PathBuf>,
    sinks: Sinks,
    firing: Arc<RetentionFiring>,
    mut leadership: Leadership,
    shutdown: CancellationToken,
) {
    use crate::config::RetentionAction;
    use crate::sidecar::alert::{Notification, SampleMessage, Status};
    let Some(policy) = app.registry.queue(&queue).ok().and_then(|q| q.retention.clone()) else {
        return;
    };
    let backend = app
        .registry
        .queue(&queue)
        .map(|q| q.kind.backend_name().to_string())
        .unwrap_or_default();
    loop {
        if *leadership.borrow_and_update() {
            // A purge run like any other: the poller's sample and the API's
            // reads keep off the queue meanwhile (see `exclusion`).
            let leases = match app.registry.backend(&queue).await {
                Ok(b) => !b.capabilities().true_peek,
                Err(_) => true,
            };
            let ticket = match leases.then(|| app.locks.run_starting(&queue)) {
                Some(t) => Some(t.admitted().await),
                None => None,
            };
            // Credited as it settles, like an API run: a poll during a long
            // purge sees the depth fall, and a credit only at the end would
            // then count the purged messages again, as arrivals.
            let progress = Arc::new(crate::engine::redrive::Progress::default());
            let key = format!("retention-{}", uuid::Uuid::new_v4().simple());
            app.cache.run_started(&queue, &key, progress.clone());
            let outcome = crate::engine::triage::apply_retention(
                &app.registry,
                &queue,
                false,
                data_dir.as_deref(),
                app.journal.clone(),
                Trigger::Retention,
                shutdown.child_token(),
                Some(progress),
            )
            .await;
            let settled = outcome
                .as_ref()
                .ok()
                .and_then(|o| o.purge.as_ref())
                .map_or(0, |s| s.settled);
            app.cache.run_finished(&queue, &key, settled);
            drop(ticket);
            match outcome {
                Ok(o) => {
                    if let Some(s) = &o.purge {
                        app.metrics.count_run(
                            &queue,
                            Action::PURGE,
                            &Trigger::Retention.to_string(),
                            RunStatus::of(s).outcome(),
                        );
                    }
                    app.metrics
                        .set_retention_expired(&queue, if o.purge.is_some() { 0 } else { o.expired });
                    if let Some(s) = &o.purge {
                        tracing::info!(%queue, purged = s.settled, backup = ?o.backup, "retention: expired messages exported and purged");
                    } else if o.dry_run && policy.action == RetentionAction::ExportThenPurge {
                        let ids: Vec<&str> = o.listed.iter().map(|m| m.id.as_str()).collect();
                        tracing::info!(%queue, would_purge = o.expired, ?ids, "retention dry run: would export and purge");
                    }
                    if policy.action == RetentionAction::Alert {
                        let now = Utc::now();
                        // What this replica sent while leading, or, just
                        // after it took over, what its predecessor did.
                        let mut firing_since = firing.since(&queue);
                        let status = if o.expired > 0 {
                            firing_since.get_or_insert(now);
                            Some(Status::Firing)
                        } else {
                            firing_since.take().map(|_| Status::Resolved)
                        };
                        if let Some(status) = status {
                            sinks.send(Notification {
                                version: 1,
                                status,
                                rule: "retention".into(),
                                kind: "retention",
                                queue: queue.clone(),
                                backend: backend.clone(),
                                value: o.expired as f64,
                                threshold: policy.max_age.as_secs_f64(),
                                reason: None,
                                summary: format!(
                                    "{} messages in {queue} are older than the retention max_age ({})",
                                    o.expired,
                                    humantime::format_duration(policy.max_age)
                                ),
                                started_at: firing_since.unwrap_or(now),
                                sent_at: now,
                                repeat_seconds: policy.check_every.as_secs(),
                                samples: o
                                    .listed
                                    .iter()
                                    .take(3)
                                    .map(|m| SampleMessage::redacted(m.id.clone(), m.reason.clone()))
                                    .collect(),
                                quiet: false,
                                // Checked again every `check_every`.
                                valid_for: policy.check_every + Duration::from_secs(300),
                            });
                        }
                        firing.set(&queue, firing_since);
                    }
                }
                Err(e) => {
                    // The purge this check was to make did not happen.
                    if purges(&policy) {
                        app.metrics.count_run(
                            &queue,
                            Action::PURGE,
                            &Trigger::Retention.to_string(),
                            RunStatus::Failed.outcome(),
                        );
                    }
                    tracing::error!(%queue, error = %e, "retention check failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(policy.check_every) => {}
            changed = leadership.changed() => {
                if changed.is_err() {
                    return;
                }
                if !*leadership.borrow() {
                    app.metrics.forget_retention_expired(&queue);
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_keeps_its_cadence_whatever_the_runs_take() {
        let t0 = tokio::time::Instant::now();
        let every = Duration::from_secs(10);
        let at = |s: u64| t0 + Duration::from_millis(s);
        // Startup waits a whole interval: nothing fires at once.
        assert_eq!(next_every(t0, every, t0), at(10_000));
        // A run started at 10s that took 3s: the next slot is 20s, not 23s.
        assert_eq!(next_every(t0, every, at(13_000)), at(20_000));
        // On the slot itself: the following one.
        assert_eq!(next_every(t0, every, at(20_000)), at(30_000));
        // A run that took 25s overran the 20s and 30s slots: they are skipped,
        // not started back to back.
        assert_eq!(next_every(t0, every, at(35_000)), at(40_000));
    }

    #[test]
    fn a_cron_slot_fires_once_even_when_the_timer_wakes_early() {
        let cron: croner::Cron = "0 * * * *".parse().unwrap();
        let t = |h: u32, m: u32, s: u32, ms: u32| {
            chrono::NaiveDate::from_ymd_opt(2026, 3, 29)
                .unwrap()
                .and_hms_milli_opt(h, m, s, ms)
                .unwrap()
                .and_utc()
        };
        assert_eq!(next_cron(&cron, t(1, 20, 0, 0), None).unwrap(), t(2, 0, 0, 0));
        // Woke 5ms before 02:00 (the wall clock stepped back meanwhile) and
        // fired the 02:00 slot: the next is 03:00, not 02:00 again.
        assert_eq!(
            next_cron(&cron, t(1, 59, 59, 995), Some(t(2, 0, 0, 0))).unwrap(),
            t(3, 0, 0, 0)
        );
        // A run that overran 03:00 skips it.
        assert_eq!(
            next_cron(&cron, t(3, 10, 0, 0), Some(t(2, 0, 0, 0))).unwrap(),
            t(4, 0, 0, 0)
        );
        // UTC: no DST gap or repeat (29 March 2026 is the EU switch).
        let daily: croner::Cron = "30 2 * * *".parse().unwrap();
        assert_eq!(next_cron(&daily, t(1, 0, 0, 0), None).unwrap(), t(2, 30, 0, 0));
    }

    /// A new leader runs the latest cron slot that fell within the window
    /// and that no leader started.
    #[test]
    fn a_new_leader_catches_up_a_recent_slot_nobody_started() {
        let cron: croner::Cron = "0 3 * * *".parse().unwrap();
        let t = |h: u32, m: u32, s: u32| {
            chrono::NaiveDate::from_ymd_opt(2026, 12, 5)
                .unwrap()
                .and_hms_opt(h, m, s)
                .unwrap()
                .and_utc()
        };
        let window = Duration::from_secs(40);
        // 03:00 passed 20 s ago and nobody started it: run it.
        assert_eq!(missed_slot(&cron, t(3, 0, 20), window, None), Some(t(3, 0, 0)));
        let yesterday = t(3, 0, 0) - chrono::Duration::days(1);
        assert_eq!(
            missed_slot(&cron, t(3, 0, 20), window, Some(yesterday)),
            Some(t(3, 0, 0))
        );
        // The old leader started it: not again, whatever the fraction of a
        // second the new one looks at.
        assert_eq!(missed_slot(&cron, t(3, 0, 20), window, Some(t(3, 0, 0))), None);
        let late = t(3, 0, 20) + chrono::Duration::milliseconds(873);
        assert_eq!(missed_slot(&cron, late, window, None), Some(t(3, 0, 0)));
        assert_eq!(missed_slot(&cron, late, window, Some(t(3, 0, 0))), None);
        // Longer ago than the window: not a hand-over's slot.
        assert_eq!(missed_slot(&cron, t(3, 1, 0), window, None), None);
    }

    #[test]
    fn a_schedule_key_is_its_queue_and_a_digest_of_its_settings() {
        let s: ScheduleConfig =
            serde_yaml::from_str("{queue: orders, cron: \"0 3 * * *\", filter: 'reason == \"Timeout\"'}").unwrap();
        let key = schedule_key(&s);
        assert!(key.starts_with("orders/") && key.len() == "orders/".len() + 12, "{key}");
        assert_eq!(schedule_key(&s.clone()), key);
        let other = ScheduleConfig {
            max: Some(10),
            ..s.clone()
        };
        assert_ne!(schedule_key(&other), key);
    }

    #[test]
    fn token_whitespace_is_not_part_of_it() {
        assert_eq!(token_from(Some("s3cret\n".into())).as_deref(), Some("s3cret"));
        assert_eq!(token_from(Some("  s3cret \r\n".into())).as_deref(), Some("s3cret"));
        assert_eq!(token_from(Some("\n".into())), None);
        assert_eq!(token_from(None), None);
    }

    #[test]
    fn a_second_serve_on_the_same_data_dir_is_refused() {
        let dir = std::env::temp_dir().join(format!("sidecarfix-lock-{}", uuid::Uuid::new_v4().simple()));
        let held = lock_data_dir(&dir).expect("first lock");
        let err = lock_data_dir(&dir).expect_err("second lock refused").to_string();
        assert!(
            err.contains("serve.data_dir") && err.contains("another dlq-bridge serve"),
            "{err}"
        );
        drop(held);
        lock_data_dir(&dir).expect("free again once the first is dropped");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
