//! `redrive` (and the `--redrive` flag form), and the journal it keeps.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::args::{JournalOpts, RedriveOpts};
use super::confirm::confirm;
use super::exit::{self, Failure};
use super::signals;
use crate::config::Config;
use crate::engine::journal::{Journal, Rotation};
use crate::engine::redrive::{Engine, Progress, RunSummary, Trigger};
use crate::engine::registry::{RedriveRequest, Registry, RegistryError};
use crate::filter::Filter;
use crate::output::{self, Format};

pub(crate) async fn redrive(registry: &Registry, queue: &str, opts: RedriveOpts) -> Result<u8, Failure> {
    let req = RedriveRequest {
        filter: opts.filter.clone(),
        to: opts.to.clone(),
        dry_run: opts.dry_run,
        rate: opts.rate,
        max: opts.max,
        concurrency: opts.concurrency,
        ..Default::default()
    };
    // Validate the filter and the queue before any connection is made.
    if let Some(f) = &req.filter {
        Filter::compile(f)?;
    }
    registry.queue(queue)?;
    if !opts.dry_run {
        let what = match &req.filter {
            Some(f) => format!("the messages of {queue} matching `{f}`"),
            None => format!("every message of {queue}"),
        };
        let to = match &req.to {
            Some(t) => format!("to {t}"),
            None => "back to their source".into(),
        };
        let cap = req.max.map(|m| format!(" (at most {m})")).unwrap_or_default();
        if !confirm(opts.yes, &format!("Redrive {what} {to}{cap}?"))? {
            return Ok(exit::FAILURE);
        }
    }
    let cancel = CancellationToken::new();
    let interrupt = signals::on_interrupt(cancel.clone(), "finishing the sends in flight, releasing the rest");
    let connected = async {
        let plan = registry.plan(queue, &req, Trigger::Cli).await?;
        let backend = registry.backend(queue).await?;
        Ok::<_, RegistryError>((plan, backend))
    };
    let (plan, backend) = match interrupt.unless_stopped(connected).await {
        Ok(connected) => connected?,
        Err(code) => return Ok(code),
    };
    let mut engine = Engine::new(backend.clone());
    let journal_path = if opts.no_journal {
        None
    } else {
        opts.journal.clone().or_else(|| default_journal(registry.config()))
    };
    if let Some(path) = &journal_path {
        let journal = Journal::open_with(path, Rotation::from(&registry.config().redrive))
            .with_context(|| "opening the redrive journal (or pass --no-journal)")?;
        engine = engine.with_journal(Arc::new(journal));
    }
    engine = engine.with_cancel(cancel.clone());
    // The depth only sizes the progress bar, so ask for it only when there is
    // one: on the Pub/Sub emulator `stats` counts by draining and releasing
    // the whole DLQ, an extra pass that doubled a redrive's time (bench/run.sh).
    let depth = if std::io::stderr().is_terminal() {
        backend.stats().await.ok().map(|s| s.depth)
    } else {
        None
    };
    let bar = progress_bar(engine.progress(), depth, opts.dry_run);
    let summary = engine.run(&plan).await;
    if let Some((bar, ticker)) = bar {
        ticker.abort();
        bar.finish_and_clear();
    }
    let summary: RunSummary = summary?;
    match opts.output {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&summary)?)?,
        Format::Table => out!("{}", output::summary_text(&summary))?,
    }
    if let Some(p) = &journal_path {
        note!("journal: {}", p.display());
    }
    Ok(match interrupt.exit_code() {
        Some(code) => code,
        None if summary.ok() => exit::OK,
        None => exit::FAILURE,
    })
}

pub(crate) fn open_journal(config: &Config, opts: &JournalOpts) -> Result<Option<Arc<Journal>>, Failure> {
    if opts.no_journal {
        return Ok(None);
    }
    match opts.journal.clone().or_else(|| default_journal(config)) {
        Some(path) => {
            let j = Journal::open_with(&path, Rotation::from(&config.redrive))
                .with_context(|| "opening the journal (or pass --no-journal)")?;
            note!("journal: {}", path.display());
            Ok(Some(Arc::new(j)))
        }
        None => Ok(None),
    }
}

pub(crate) fn default_journal(config: &Config) -> Option<PathBuf> {
    config.journal_path()
}

/// A progress bar on stderr, only when stderr is a terminal.
pub(crate) fn progress_bar(
    progress: Arc<Progress>,
    depth: Option<u64>,
    dry_run: bool,
) -> Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match depth {
        Some(d) if d > 0 => indicatif::ProgressBar::new(d),
        _ => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} examined  {msg}")
            .expect("valid template"),
    );
    let ticker = tokio::spawn({
        let bar = bar.clone();
        async move {
            loop {
                bar.set_position(Progress::get(&progress.examined));
                let msg = if dry_run {
                    format!("{} would move", Progress::get(&progress.matched))
                } else {
                    format!(
                        "{} matched, {} sent, {} settled, {} failed",
                        Progress::get(&progress.matched),
                        Progress::get(&progress.sent),
                        Progress::get(&progress.settled),
                        Progress::get(&progress.failed)
                    )
                };
                bar.set_message(msg);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    Some((bar, ticker))
}
