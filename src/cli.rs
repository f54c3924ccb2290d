//! The command line (clap derive) and what each command does.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::filter::Filter;
use crate::journal::{Journal, Record, read_all_records};
use crate::output::{self, Format, MessageView, QueueRow};
use crate::redrive::{Engine, Progress, RunSummary, Trigger};
use crate::registry::{RedriveRequest, Registry, RegistryError};

/// Exit codes, documented in `--help` and the README.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NONEMPTY: u8 = 3;
}

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 runtime failure, 2 usage or config error, 3 `list --fail-if-nonempty` found messages.

Filters are CEL expressions over: id, body, json, attributes, reason, description,
delivery_count, enqueued_at (timestamp), age (duration), source. For example:
  dlq-bridge redrive orders --filter 'reason == \"Timeout\" && age > duration(\"1h\")' --dry-run
  dlq-bridge --config /etc/dlq-bridge/config.yaml --redrive orders --filter 'attributes.tenant == \"acme\"' --yes";

#[derive(Debug, Parser)]
#[command(name = "dlq-bridge", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Config file. Default: ./dlq-bridge.yaml, else /etc/dlq-bridge/config.yaml.
    #[arg(long, short = 'c', global = true, env = "DLQ_BRIDGE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// More logging (-v info, -vv debug). DLQ_BRIDGE_LOG takes a full tracing filter.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Redrive QUEUE: the flag form of `redrive`, for container args and Jobs.
    #[arg(long, value_name = "QUEUE")]
    pub redrive: Option<String>,

    #[command(flatten, next_help_heading = "Redrive options (flag form: with --redrive QUEUE)")]
    pub redrive_opts: RedriveOpts,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every configured DLQ: depth, age of the oldest message, top failure reasons.
    List {
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
        /// Exit 3 when any DLQ holds messages (for cron jobs and CI gates).
        #[arg(long)]
        fail_if_nonempty: bool,
        /// Messages read per queue to find the top reasons (0: none). On SQS and
        /// Pub/Sub reading leases and releases, which raises delivery counts.
        #[arg(long, default_value_t = 100, value_name = "N")]
        sample: usize,
    },
    /// Browse a DLQ's messages. On SQS and Pub/Sub this leases and releases
    /// (delivery counts rise); Service Bus uses a true peek.
    Inspect {
        queue: String,
        /// CEL filter; only matching messages are shown.
        #[arg(long, short = 'f')]
        filter: Option<String>,
        /// Messages shown at most.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Messages read at most while looking for matches.
        #[arg(long, default_value_t = 1000, value_name = "N")]
        scan: usize,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Move the messages a filter selects back to their source (or --to).
    Redrive {
        queue: String,
        #[command(flatten)]
        opts: RedriveOpts,
    },
    /// Validate the config and reach every backend.
    Check,
    /// The sidecar: poll every queue, export /metrics, evaluate alert rules,
    /// run scheduled redrives and serve the local HTTP API, until SIGTERM.
    Serve,
    /// Group a DLQ's messages (by failure pattern, reason, source or an
    /// attribute): count, share, first/last enqueue, delivery counts, a sample
    /// ID. Reading is as for `inspect` (a true peek on Service Bus only).
    Report {
        queue: String,
        /// CEL filter; only matching messages are grouped.
        #[arg(long, short = 'f')]
        filter: Option<String>,
        /// reason, source, pattern (the reason and description with numbers,
        /// UUIDs, hex and quoted values as placeholders) or attribute:NAME.
        #[arg(long, default_value = "pattern", value_name = "BY")]
        by: String,
        /// Groups shown; the rest are folded into `other`.
        #[arg(long, default_value_t = crate::triage::DEFAULT_TOP, value_name = "N")]
        top: usize,
        /// Messages read at most (large DLQs: raise it; only what is read is grouped).
        #[arg(long, default_value_t = crate::triage::DEFAULT_SCAN, value_name = "N")]
        scan: usize,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Write a DLQ's messages to a JSONL file, one line each (base64 body and
    /// preview, typed attributes, reason, times, source), streamed as read.
    /// Nothing is removed; reading is as for `inspect`.
    Export {
        queue: String,
        #[arg(long, value_name = "FILE.jsonl")]
        to: PathBuf,
        #[arg(long, short = 'f')]
        filter: Option<String>,
        /// Write at most N messages (Service Bus: browse at most N; default 10000).
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Send the messages of an export file to the configured queue DEST's source
    /// entity (the queue's `source`, else what its provider reports), or to
    /// --address on DEST's backend: any provider, converting attributes as the
    /// README's mapping says and naming what could not be carried.
    Import {
        file: PathBuf,
        /// A configured queue name.
        #[arg(long, value_name = "DEST")]
        to: String,
        /// A provider-native address on DEST's backend, instead of its source.
        #[arg(long, value_name = "ADDRESS")]
        address: Option<String>,
        #[arg(long, short = 'f')]
        filter: Option<String>,
        /// Messages per second at most.
        #[arg(long, value_name = "N")]
        rate: Option<u32>,
        /// Import at most N messages.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        /// Read, filter and report what would be sent (and what could not be carried); send nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        journal: JournalOpts,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Delete the messages a filter selects, each only after it was written to a
    /// backup file (on by default), each deletion journaled. Messages that do
    /// not match are released at the end of the pass.
    Purge {
        queue: String,
        /// CEL filter selecting what to delete (required; `true` for everything).
        #[arg(long, short = 'f')]
        filter: String,
        /// Only messages older than this (`7d`, `36h`), by enqueue time.
        #[arg(long, value_name = "DURATION", value_parser = crate::config::duration_text::parse)]
        older_than: Option<std::time::Duration>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, short = 'y')]
        yes: bool,
        /// Backup file (JSONL, the `export` format; appended to). Default:
        /// $XDG_STATE_HOME/dlq-bridge/backups/QUEUE-TIME.jsonl.
        #[arg(long, value_name = "FILE")]
        backup: Option<PathBuf>,
        /// Delete without writing a backup.
        #[arg(long, conflicts_with = "backup")]
        no_backup: bool,
        /// Delete at most N messages.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        #[arg(long, value_name = "N")]
        rate: Option<u32>,
        #[command(flatten)]
        journal: JournalOpts,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Apply the queues' `retention` policies once, as `serve` does on its
    /// leader: list expired messages (alert, --dry-run) or export-then-purge them.
    Retention {
        /// One queue; default: every queue with a policy.
        queue: Option<String>,
        /// List what would be purged; purge nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        journal: JournalOpts,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Past redrive runs from the journal: the audit trail.
    Runs {
        /// Journal file. Default: as for `redrive`.
        #[arg(long, value_name = "PATH")]
        journal: Option<PathBuf>,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Debug, Args, Default)]
pub struct JournalOpts {
    /// Journal (audit trail). Default: the config's `redrive.journal`, else
    /// $XDG_STATE_HOME/dlq-bridge/journal.jsonl.
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,
    /// Keep no journal for this run.
    #[arg(long, conflicts_with = "journal")]
    pub no_journal: bool,
}

#[derive(Debug, Args, Default)]
pub struct RedriveOpts {
    /// CEL filter selecting the messages to move. Default: all.
    #[arg(long, short = 'f')]
    pub filter: Option<String>,
    /// Destination instead of each message's source: a configured queue name or
    /// a provider address (SQS queue name/URL, Pub/Sub topic, Service Bus entity).
    #[arg(long, value_name = "DEST")]
    pub to: Option<String>,
    /// Lease, filter and report what would move; send and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Messages per second at most.
    #[arg(long, value_name = "N")]
    pub rate: Option<u32>,
    /// Move at most N messages.
    #[arg(long, value_name = "N")]
    pub max: Option<u64>,
    /// Batches in flight at once. Default: the config's `redrive.concurrency`.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Do not ask for confirmation (required when not on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Journal (audit trail and crash record). Default: the config's
    /// `redrive.journal`, else $XDG_STATE_HOME/dlq-bridge/journal.jsonl.
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,
    /// Keep no journal for this run.
    #[arg(long, conflicts_with = "journal")]
    pub no_journal: bool,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Format,
}

impl RedriveOpts {
    fn any_set(&self) -> bool {
        self.filter.is_some()
            || self.to.is_some()
            || self.dry_run
            || self.rate.is_some()
            || self.max.is_some()
            || self.concurrency.is_some()
            || self.yes
            || self.journal.is_some()
            || self.no_journal
            || self.output != Format::Table
    }
}

/// An error with the exit code it should produce.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = if error.downcast_ref::<crate::config::ConfigError>().is_some()
            || error.downcast_ref::<crate::filter::FilterError>().is_some()
            || error
                .downcast_ref::<RegistryError>()
                .is_some_and(|e| e.is_usage() || is_config_backend_error(e))
            || error.downcast_ref::<crate::alert::sinks::SinkError>().is_some()
            || error
                .downcast_ref::<crate::triage::TriageError>()
                .is_some_and(crate::triage::TriageError::is_usage)
        {
            exit::USAGE
        } else {
            exit::FAILURE
        };
        Self { code, error }
    }
}

/// A backend that could not be built from its config (a secret's environment
/// variable unset, a malformed connection string or resource name): the
/// user's input is wrong and no connection was made, so exit 2 like any
/// config error.
fn is_config_backend_error(e: &RegistryError) -> bool {
    matches!(
        e,
        RegistryError::Backend {
            error: crate::backend::BackendError::Invalid(_) | crate::backend::BackendError::NotCompiled { .. },
            ..
        }
    )
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure {
        code: exit::USAGE,
        error: anyhow::anyhow!(msg.into()),
    }
}

pub async fn run(cli: Cli) -> Result<u8, Failure> {
    let command = match (cli.command, cli.redrive) {
        (Some(_), None) if cli.redrive_opts.any_set() => {
            return Err(usage(
                "redrive options go after the `redrive` subcommand, or with `--redrive QUEUE`",
            ));
        }
        (Some(c), None) => c,
        (None, Some(queue)) => Command::Redrive {
            queue,
            opts: cli.redrive_opts,
        },
        (None, None) if cli.redrive_opts.any_set() => {
            return Err(usage(
                "redrive options need `--redrive QUEUE` or the `redrive` subcommand",
            ));
        }
        (None, None) => {
            return Err(usage("no command given; try `dlq-bridge --help`"));
        }
        (Some(_), Some(_)) => {
            return Err(usage(
                "`--redrive QUEUE` is the flag form of the `redrive` command; use one or the other",
            ));
        }
    };
    let config_path = config_path(cli.config)?;
    let config = Config::load(&config_path)?;
    let registry = Arc::new(Registry::new(config));
    match command {
        Command::List {
            output,
            fail_if_nonempty,
            sample,
        } => list(&registry, output, fail_if_nonempty, sample).await,
        Command::Inspect {
            queue,
            filter,
            limit,
            scan,
            output,
        } => inspect(&registry, &queue, filter.as_deref(), limit, scan, output).await,
        Command::Redrive { queue, opts } => redrive(&registry, &queue, opts).await,
        Command::Check => check(&registry, &config_path).await,
        Command::Serve => {
            crate::serve::run(registry.config().clone()).await?;
            Ok(exit::OK)
        }
        Command::Runs { journal, output } => runs(&registry, journal, output),
        Command::Report {
            queue,
            filter,
            by,
            top,
            scan,
            output,
        } => crate::triage::cli_report(&registry, &queue, filter.as_deref(), &by, top, scan, output).await,
        Command::Export {
            queue,
            to,
            filter,
            max,
            output,
        } => crate::triage::cli_export(&registry, &queue, &to, filter.as_deref(), max, output).await,
        Command::Import {
            file,
            to,
            address,
            filter,
            rate,
            max,
            dry_run,
            yes,
            journal,
            output,
        } => {
            let req = crate::triage::ImportRequest {
                file: &file,
                to: &to,
                address: address.as_deref(),
                filter: filter.as_deref(),
                rate,
                max,
                dry_run,
            };
            if !dry_run && !confirm(yes, &format!("Import {} into queue {to}?", file.display()))? {
                return Ok(exit::FAILURE);
            }
            let journal = open_journal(registry.config(), &journal)?;
            crate::triage::cli_import(&registry, &req, journal, output).await
        }
        Command::Purge {
            queue,
            filter,
            older_than,
            dry_run,
            yes,
            backup,
            no_backup,
            max,
            rate,
            journal,
            output,
        } => {
            crate::filter::Filter::compile(&filter)?;
            registry.queue(&queue)?;
            let backup = match (no_backup, backup) {
                (true, _) => None,
                (false, Some(p)) => Some(p),
                (false, None) => Some(
                    default_backup(&queue)
                        .ok_or_else(|| usage("no backup directory: pass --backup FILE or --no-backup"))?,
                ),
            };
            if !dry_run
                && !confirm(
                    yes,
                    &format!(
                        "Delete messages of {queue} matching `{}`{}?",
                        crate::triage::purge_filter(&filter, older_than),
                        match &backup {
                            Some(p) => format!(" (backup: {})", p.display()),
                            None => " WITHOUT a backup".into(),
                        }
                    ),
                )?
            {
                return Ok(exit::FAILURE);
            }
            let req = crate::triage::PurgeRequest {
                filter: &filter,
                older_than,
                dry_run,
                backup: backup.as_deref(),
                max,
                rate,
                trigger: Trigger::Cli,
            };
            let journal = open_journal(registry.config(), &journal)?;
            crate::triage::cli_purge(&registry, &queue, &req, journal, output).await
        }
        Command::Retention {
            queue,
            dry_run,
            yes,
            journal,
            output,
        } => {
            let purges = registry.config().queues.iter().any(|q| {
                queue.as_ref().is_none_or(|n| *n == q.name)
                    && q.retention
                        .as_ref()
                        .is_some_and(|r| r.action == crate::config::RetentionAction::ExportThenPurge && !r.dry_run)
            });
            if purges && !dry_run && !confirm(yes, "Apply retention, deleting expired messages (after a backup)?")? {
                return Ok(exit::FAILURE);
            }
            let journal = open_journal(registry.config(), &journal)?;
            crate::triage::cli_retention(&registry, queue.as_deref(), dry_run, journal, output).await
        }
    }
}

fn config_path(given: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(p) = given {
        return Ok(p);
    }
    for candidate in ["dlq-bridge.yaml", "/etc/dlq-bridge/config.yaml"] {
        if Path::new(candidate).exists() {
            return Ok(candidate.into());
        }
    }
    Err(usage(
        "no config file: pass --config FILE (or set DLQ_BRIDGE_CONFIG); see config/example.yaml",
    ))
}

async fn list(registry: &Registry, output: Format, fail_if_nonempty: bool, sample: usize) -> Result<u8, Failure> {
    let names: Vec<String> = registry.config().queues.iter().map(|q| q.name.clone()).collect();
    // Queues are independent; poll them at once so one slow provider does not
    // serialise the rest.
    let rows = futures::future::join_all(names.iter().map(|name| queue_row(registry, name, sample))).await;
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => print!("{}", output::queues_table(&rows)),
    }
    if rows.iter().any(|r| r.error.is_some()) {
        // The table cuts long cells; the whole error goes to stderr.
        for r in rows.iter().filter(|r| r.error.is_some()) {
            eprintln!("error: {}", r.error.as_deref().unwrap_or_default());
        }
        return Ok(exit::FAILURE);
    }
    if fail_if_nonempty && rows.iter().any(|r| r.stats.as_ref().is_some_and(|s| s.depth > 0)) {
        return Ok(exit::NONEMPTY);
    }
    Ok(exit::OK)
}

async fn queue_row(registry: &Registry, name: &str, sample: usize) -> QueueRow {
    let backend_name = registry
        .queue(name)
        .map(|q| q.kind.backend_name())
        .unwrap_or("?")
        .to_string();
    let mut row = QueueRow {
        queue: name.to_string(),
        backend: backend_name,
        stats: None,
        top_reasons: Vec::new(),
        sampled: 0,
        error: None,
    };
    let result: anyhow::Result<()> = async {
        let backend = registry.backend(name).await?;
        let mut stats = backend.stats().await?;
        if sample > 0 && stats.depth > 0 {
            let msgs = backend.peek(sample).await?;
            row.sampled = msgs.len();
            let mut counts: HashMap<String, u64> = HashMap::new();
            for m in &msgs {
                *counts
                    .entry(m.reason.clone().unwrap_or_else(|| "(none)".into()))
                    .or_default() += 1;
            }
            let mut top: Vec<(String, u64)> = counts.into_iter().collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            top.truncate(3);
            row.top_reasons = top;
            // Only when the sample is the whole queue is its oldest message
            // the queue's oldest; otherwise the age stays unknown.
            if stats.oldest_age.is_none() && msgs.len() as u64 >= stats.depth {
                let now = Utc::now();
                stats.oldest_age = msgs.iter().filter_map(|m| m.age(now)).max();
            }
        }
        row.stats = Some(stats);
        Ok(())
    }
    .await;
    if let Err(e) = result {
        row.error = Some(format!("{e:#}"));
    }
    row
}

async fn inspect(
    registry: &Registry,
    queue: &str,
    filter: Option<&str>,
    limit: usize,
    scan: usize,
    output: Format,
) -> Result<u8, Failure> {
    let filter = match filter {
        Some(f) => Filter::compile(f)?,
        None => Filter::match_all(),
    };
    registry.queue(queue)?;
    let backend = registry.backend(queue).await?;
    if !backend.capabilities().true_peek {
        eprintln!(
            "note: {} has no true peek; inspecting leases and releases messages, which raises their delivery count",
            backend.kind()
        );
    }
    let msgs = backend.peek(scan.max(limit)).await?;
    let now = Utc::now();
    let mut shown = Vec::new();
    let mut errors = 0;
    for m in &msgs {
        match filter.matches(m, now) {
            Ok(true) => shown.push(m),
            Ok(false) => {}
            Err(e) => {
                errors += 1;
                tracing::debug!(id = %m.id, error = %e, "filter error");
            }
        }
        if shown.len() >= limit {
            break;
        }
    }
    match output {
        Format::Json => {
            let views: Vec<MessageView> = shown.iter().map(|m| MessageView::new(m, now)).collect();
            println!("{}", serde_json::to_string_pretty(&views)?);
        }
        Format::Table => {
            print!("{}", output::messages_table(&shown, now));
            eprintln!("{} shown, {} read", shown.len(), msgs.len());
        }
    }
    if errors > 0 {
        eprintln!("warning: the filter failed on {errors} messages (counted as no match); -vv shows why");
    }
    Ok(exit::OK)
}

async fn redrive(registry: &Registry, queue: &str, opts: RedriveOpts) -> Result<u8, Failure> {
    let req = RedriveRequest {
        filter: opts.filter.clone(),
        to: opts.to.clone(),
        dry_run: opts.dry_run,
        rate: opts.rate,
        max: opts.max,
        concurrency: opts.concurrency,
    };
    // Validate the filter and the queue before any connection is made.
    if let Some(f) = &req.filter {
        Filter::compile(f)?;
    }
    registry.queue(queue)?;
    if !opts.dry_run && !opts.yes {
        if !std::io::stdin().is_terminal() {
            return Err(usage(
                "a real redrive needs --yes when not run from a terminal (or use --dry-run)",
            ));
        }
        eprint!(
            "Redrive messages of {queue} matching `{}`? [y/N] ",
            req.filter.as_deref().unwrap_or("true")
        );
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("aborted; nothing was touched");
            return Ok(exit::FAILURE);
        }
    }
    let plan = registry.plan(queue, &req, Trigger::Cli).await?;
    let backend = registry.backend(queue).await?;
    let mut engine = Engine::new(backend.clone());
    let journal_path = if opts.no_journal {
        None
    } else {
        opts.journal.clone().or_else(|| default_journal(registry.config()))
    };
    if let Some(path) = &journal_path {
        let journal = Journal::open_with(path, registry.config().redrive.journal_rotation())
            .with_context(|| "opening the redrive journal (or pass --no-journal)")?;
        engine = engine.with_journal(Arc::new(journal));
    }
    let cancel = CancellationToken::new();
    engine = engine.with_cancel(cancel.clone());
    let ctrl_c = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: finishing in-flight sends, releasing the rest");
                cancel.cancel();
            }
        }
    });
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
    ctrl_c.abort();
    if let Some((bar, ticker)) = bar {
        ticker.abort();
        bar.finish_and_clear();
    }
    let summary: RunSummary = summary?;
    match opts.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
        Format::Table => print!("{}", output::summary_text(&summary)),
    }
    if let Some(p) = &journal_path {
        eprintln!("journal: {}", p.display());
    }
    Ok(if summary.ok() { exit::OK } else { exit::FAILURE })
}

/// Ask before a destructive command, or require --yes off a terminal.
fn confirm(yes: bool, question: &str) -> Result<bool, Failure> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(usage(
            "this command changes queues: pass --yes when not run from a terminal (or use --dry-run)",
        ));
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    let ok = matches!(answer.trim(), "y" | "Y" | "yes");
    if !ok {
        eprintln!("aborted; nothing was touched");
    }
    Ok(ok)
}

fn open_journal(config: &Config, opts: &JournalOpts) -> Result<Option<Arc<Journal>>, Failure> {
    if opts.no_journal {
        return Ok(None);
    }
    match opts.journal.clone().or_else(|| default_journal(config)) {
        Some(path) => {
            let j = Journal::open_with(&path, config.redrive.journal_rotation())
                .with_context(|| "opening the journal (or pass --no-journal)")?;
            eprintln!("journal: {}", path.display());
            Ok(Some(Arc::new(j)))
        }
        None => Ok(None),
    }
}

/// Where a purge's backup goes when --backup is not given.
fn default_backup(queue: &str) -> Option<PathBuf> {
    Some(
        state_dir()?
            .join("backups")
            .join(format!("{queue}-{}.jsonl", Utc::now().format("%Y%m%dT%H%M%S%.3fZ"))),
    )
}

/// `$XDG_STATE_HOME/dlq-bridge`, else `~/.local/state/dlq-bridge`.
pub(crate) fn state_dir() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("dlq-bridge"))
}

fn default_journal(config: &Config) -> Option<PathBuf> {
    if let Some(p) = &config.redrive.journal {
        return Some(p.clone());
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("dlq-bridge").join("journal.jsonl"))
}

/// A progress bar on stderr, only when stderr is a terminal.
fn progress_bar(
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

async fn check(registry: &Registry, path: &Path) -> Result<u8, Failure> {
    println!(
        "config {}: ok ({} queues)",
        path.display(),
        registry.config().queues.len()
    );
    let mut failed = 0;
    for q in &registry.config().queues {
        let result = async {
            let b = registry.backend(&q.name).await?;
            anyhow::Ok(b.stats().await?)
        }
        .await;
        match result {
            Ok(s) => println!("queue {} ({}): ok, depth {}", q.name, q.kind.backend_name(), s.depth),
            Err(e) => {
                failed += 1;
                println!("queue {} ({}): FAILED: {e:#}", q.name, q.kind.backend_name());
            }
        }
    }
    Ok(if failed == 0 { exit::OK } else { exit::FAILURE })
}

fn runs(registry: &Registry, journal: Option<PathBuf>, output: Format) -> Result<u8, Failure> {
    let Some(path) = journal.or_else(|| default_journal(registry.config())) else {
        return Err(usage("no journal path: pass --journal PATH"));
    };
    let records = read_all_records(&path, registry.config().redrive.journal_keep)?;
    let finished: Vec<serde_json::Value> = records
        .into_iter()
        .filter_map(|r| match r {
            Record::RunFinished { summary, .. } => Some(summary),
            _ => None,
        })
        .collect();
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&finished)?),
        Format::Table => {
            let mut t = output::Table::new(&[
                "RUN", "QUEUE", "TRIGGER", "DRY", "MATCHED", "SENT", "SETTLED", "FAILED", "STOPPED", "FILTER",
            ]);
            for s in &finished {
                let n = |k: &str| s.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                let t_ = |k: &str| s.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                t.row(vec![
                    t_("run_id"),
                    t_("queue"),
                    t_("trigger"),
                    s.get("dry_run").and_then(|v| v.as_bool()).unwrap_or(false).to_string(),
                    n("matched").to_string(),
                    n("sent").to_string(),
                    n("settled").to_string(),
                    (n("send_failed") + n("settle_failed")).to_string(),
                    t_("stopped"),
                    output::preview(&t_("filter"), 50),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(exit::OK)
}
