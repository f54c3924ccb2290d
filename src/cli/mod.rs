//! The command line (clap derive) and what each command does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::engine::redrive::Trigger;
use crate::engine::registry::Registry;

/// `print!` for command output. A reader that went away (`... | head`) ends
/// the output, not the command: nothing panics, and the exit code and the
/// journal still say what the command did.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` for command output; see [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` for notes, warnings and errors. A closed stderr (`2>&1 |
/// head`, a `tee` stopped with the rest of the job) loses the text, never the
/// command: `eprintln!` panics there (exit 101, after the work was done), and
/// in the signal handler's task that panic kept a Ctrl-C from stopping a
/// redrive at all.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod check;
mod confirm;
pub mod exit;
mod inspect;
mod redrive;
mod runs;
mod signals;
mod triage;

pub use args::{Cli, Command, JournalOpts, RedriveOpts};
use check::check;
use confirm::confirm;
use exit::{Failure, usage};
use inspect::{inspect, list};
use redrive::{open_journal, redrive};
use runs::runs;

pub async fn run(cli: Cli) -> Result<u8, Failure> {
    let command = match (cli.command, cli.redrive) {
        (Some(c), None) if cli.redrive_opts.any_set() => {
            // Before a subcommand these flags are the `--redrive QUEUE`
            // form's; most often they were meant for the subcommand itself.
            let set = cli.redrive_opts.set_flags();
            let flags = set.join(" ");
            let name = c.name();
            // Advice to move a flag the subcommand does not take sent the
            // user into a second error.
            let untaken: Vec<&str> = {
                use clap::CommandFactory;
                let cmd = Cli::command();
                let sub = cmd.find_subcommand(name);
                set.iter()
                    .copied()
                    .filter(|flag| {
                        !sub.is_some_and(|s| s.get_arguments().any(|a| a.get_long() == flag.strip_prefix("--")))
                    })
                    .collect()
            };
            return Err(usage(if untaken.is_empty() {
                format!(
                    "{flags} before the subcommand belongs to the `--redrive QUEUE` form: give it after `{name}` instead"
                )
            } else {
                format!(
                    "{flags} before the subcommand belongs to the `--redrive QUEUE` form, and `{name}` takes no {}: see `dlq-bridge {name} --help`",
                    untaken.join(", ")
                )
            }));
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
    if let Command::Runs { journal, output } = command {
        // Reading a journal named on the command line needs no config; one
        // found is still read, for its rotation settings, and one that does
        // not load is only warned about (a pod's DLQ_BRIDGE_CONFIG may name
        // a file this shell cannot read).
        let config = match (config_path(cli.config), &journal) {
            (Ok(path), Some(_)) => match Config::load(&path) {
                Ok(config) => Some(config),
                Err(e) => {
                    note!("warning: {e}; reading the journal without the config");
                    None
                }
            },
            (Ok(path), None) => Some(Config::load(&path)?),
            (Err(_), Some(_)) => None,
            (Err(_), None) => {
                return Err(usage(
                    "no config file to find the journal from: pass --journal PATH, or --config FILE (or set DLQ_BRIDGE_CONFIG)",
                ));
            }
        };
        return runs(config.as_ref(), journal, output);
    }
    let config_path = config_path(cli.config)?;
    let config = Config::load(&config_path)?;
    if config.queues.is_empty() {
        match command {
            // `check` says so; `serve` still serves its API and dashboard
            // (the chart's default values configure no queue).
            Command::Check { .. } => {}
            Command::Serve => note!(
                "warning: {}: no queue is configured; serve has nothing to poll",
                config_path.display()
            ),
            _ => {
                return Err(crate::config::ConfigError::Invalid {
                    location: config_path.display().to_string(),
                    field: "queues".into(),
                    message: "no queue is configured; add one (see config/example.yaml)".into(),
                }
                .into());
            }
        }
    }
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
        Command::Check { offline } => check(&registry, &config_path, offline).await,
        Command::Serve => {
            crate::sidecar::serve::run(registry.config().clone()).await?;
            Ok(exit::OK)
        }
        Command::Runs { .. } => unreachable!("handled before the config is loaded"),
        Command::Report {
            queue,
            filter,
            by,
            top,
            scan,
            output,
        } => triage::cli_report(&registry, &queue, filter.as_deref(), &by, top, scan, output).await,
        Command::Export {
            queue,
            to,
            filter,
            max,
            scan,
            output,
        } => triage::cli_export(&registry, &queue, &to, filter.as_deref(), (max, scan), output).await,
        Command::Import {
            file,
            to,
            address,
            filter,
            rate,
            max,
            dry_run,
            again,
            yes,
            journal,
            output,
        } => {
            let req = crate::engine::triage::ImportRequest {
                file: &file,
                to: &to,
                address: address.as_deref(),
                filter: filter.as_deref(),
                rate,
                max,
                dry_run,
                again,
            };
            let checked = crate::engine::triage::check_import(&registry, &req)?;
            if !dry_run && !confirm(yes, &format!("Import {} into queue {to}?", file.display()))? {
                return Ok(exit::FAILURE);
            }
            let journal = open_journal(registry.config(), &journal)?;
            triage::cli_import(&registry, &req, checked, journal, output).await
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
            // The user's filter, then the one the purge runs, checked before
            // anyone is asked.
            crate::filter::Filter::compile(&filter)?;
            crate::filter::Filter::compile(&crate::engine::triage::purge_filter(&filter, older_than))?;
            registry.queue(&queue)?;
            let backup = match (no_backup, backup) {
                (true, _) => None,
                (false, Some(p)) => Some(p),
                (false, None) => Some(
                    registry
                        .config()
                        .serve
                        .data_dir
                        .clone()
                        .or_else(crate::config::state_dir)
                        .map(|dir| crate::engine::triage::dated_path(&dir.join("backups"), &queue))
                        .ok_or_else(|| usage("no backup directory: pass --backup FILE or --no-backup"))?,
                ),
            };
            if !dry_run
                && !confirm(
                    yes,
                    &format!(
                        "Delete messages of {queue} matching `{}`{}{}?",
                        filter,
                        match older_than {
                            Some(d) => format!(" older than {}", humantime::format_duration(d)),
                            None => String::new(),
                        },
                        match &backup {
                            Some(p) => format!(" (backup: {})", p.display()),
                            None => " WITHOUT a backup".into(),
                        }
                    ),
                )?
            {
                return Ok(exit::FAILURE);
            }
            let req = crate::engine::triage::PurgeRequest {
                filter: &filter,
                older_than,
                dry_run,
                backup: backup.as_deref(),
                max,
                rate,
                trigger: Trigger::Cli,
            };
            let journal = open_journal(registry.config(), &journal)?;
            triage::cli_purge(&registry, &queue, &req, journal, output).await
        }
        Command::Retention {
            queue,
            dry_run,
            yes,
            journal,
            output,
        } => {
            let names = triage::retention_queues(&registry, queue.as_deref())?;
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
            triage::cli_retention(&registry, names, dry_run, journal, output).await
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

/// Write command output to stdout, at once. Only a closed pipe is forgiven.
pub(crate) fn write_stdout(args: std::fmt::Arguments) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
