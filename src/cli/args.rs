//! The command line's arguments (clap derive): the commands, their options
//! and `--help`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::output::Format;

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 runtime failure, 2 usage or config error, 3 `list --fail-if-nonempty` found messages, 130/143 a command that changes or reads queues (redrive, purge, retention, import, list, inspect, report, export) stopped by SIGINT/SIGTERM.

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
        /// Output: an aligned table for people, or JSON for scripts.
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
        /// The DLQ: a queue name from the config (`dlq-bridge list` shows them).
        #[arg(value_name = "QUEUE")]
        queue: String,
        /// CEL filter; only matching messages are shown. Default: every message.
        #[arg(long, short = 'f', value_name = "CEL", value_parser = optional_filter, allow_hyphen_values = true)]
        filter: Option<String>,
        /// Messages shown at most. Without --filter only this many are read.
        #[arg(long, short = 'n', default_value_t = 20, value_name = "N", value_parser = at_least_one::<usize>)]
        limit: usize,
        /// Messages read at most while looking for --filter's matches; the read
        /// stops at the --limit-th match. Without --filter, --limit alone
        /// bounds the read.
        #[arg(long, default_value_t = 1000, value_name = "N", value_parser = at_least_one::<usize>)]
        scan: usize,
        /// Output: an aligned table for people, or JSON for scripts.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Move the messages a filter selects back to their source (or --to).
    Redrive {
        /// The DLQ: a queue name from the config (`dlq-bridge list` shows them).
        #[arg(value_name = "QUEUE")]
        queue: String,
        #[command(flatten)]
        opts: RedriveOpts,
    },
    /// Validate the config and reach every backend.
    Check {
        /// Validate the config and serve's environment only, connecting to
        /// nothing: a lint step that needs no cloud credentials.
        #[arg(long)]
        offline: bool,
    },
    /// The sidecar: poll every queue, export /metrics, evaluate alert rules,
    /// run scheduled redrives and serve the local HTTP API, until SIGTERM
    /// or Ctrl-C.
    Serve,
    /// Group a DLQ's messages (by failure pattern, reason, source or an
    /// attribute): count, share, first/last enqueue, delivery counts, a sample
    /// ID. Reading is as for `inspect` (a true peek on Service Bus only).
    Report {
        /// The DLQ: a queue name from the config (`dlq-bridge list` shows them).
        #[arg(value_name = "QUEUE")]
        queue: String,
        /// CEL filter; only matching messages are grouped. Default: every message.
        #[arg(long, short = 'f', value_name = "CEL", value_parser = optional_filter, allow_hyphen_values = true)]
        filter: Option<String>,
        /// reason, source, pattern (the reason and description with numbers,
        /// UUIDs, hex and quoted values as placeholders) or attribute:NAME.
        #[arg(long, default_value = "pattern", value_name = "BY")]
        by: String,
        /// Groups shown; the rest are folded into `other`.
        #[arg(long, default_value_t = crate::engine::triage::DEFAULT_TOP, value_name = "N", value_parser = at_least_one::<usize>)]
        top: usize,
        /// Messages read at most (large DLQs: raise it; only what is read is grouped).
        #[arg(long, default_value_t = crate::engine::triage::DEFAULT_SCAN, value_name = "N", value_parser = at_least_one::<usize>)]
        scan: usize,
        /// Output: an aligned table for people, or JSON for scripts.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Write a DLQ's messages to a JSONL file, one line each (base64 body and
    /// preview, typed attributes, reason, times, source), streamed as read.
    /// Nothing is removed; reading is as for `inspect`.
    Export {
        /// The DLQ: a queue name from the config (`dlq-bridge list` shows them).
        #[arg(value_name = "QUEUE")]
        queue: String,
        /// The JSONL file to write, one message per line (replaced if it
        /// exists); `-` for standard output (the summary then goes to stderr).
        #[arg(long, value_name = "FILE.jsonl")]
        to: PathBuf,
        /// CEL filter; only matching messages are written. Default: every message.
        #[arg(long, short = 'f', value_name = "CEL", value_parser = optional_filter, allow_hyphen_values = true)]
        filter: Option<String>,
        /// Write at most N messages.
        #[arg(long, value_name = "N", value_parser = at_least_one::<u64>)]
        max: Option<u64>,
        /// Read at most N messages. Default: the whole DLQ; on Service Bus,
        /// whose read is one browse, 10000 (or --max, when larger).
        #[arg(long, value_name = "N", value_parser = at_least_one::<usize>)]
        scan: Option<usize>,
        /// Output: an aligned table for people, or JSON for scripts.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Send the messages of an export file to the configured queue DEST's source
    /// entity (the queue's `source`, else what its provider reports), or to
    /// --address on DEST's backend: any provider, converting attributes as the
    /// README's mapping says and naming what could not be carried.
    Import {
        /// An export file (JSONL, as `export` and purge backups write it).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// A queue name from the config: copies go to its source entity.
        #[arg(long, value_name = "DEST")]
        to: String,
        /// A provider-native address on DEST's backend, instead of its source.
        #[arg(long, value_name = "ADDRESS")]
        address: Option<String>,
        /// CEL filter over the exported messages; only matching lines are sent.
        /// Default: every line.
        #[arg(long, short = 'f', value_name = "CEL", value_parser = optional_filter, allow_hyphen_values = true)]
        filter: Option<String>,
        /// Messages per second at most: a whole number, at least 1. Default: no limit.
        #[arg(long, value_name = "N", value_parser = parse_rate)]
        rate: Option<u32>,
        /// Import at most N messages.
        #[arg(long, value_name = "N", value_parser = at_least_one::<u64>)]
        max: Option<u64>,
        /// Read, filter and report what would be sent (and what could not be carried); send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also send lines the journal says an earlier import sent to the same destination
        /// (by message ID and enqueue time); without it they are skipped and counted.
        #[arg(long)]
        again: bool,
        /// Do not ask for confirmation (required when not on a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        journal: JournalOpts,
        /// Output: an aligned table for people, or JSON for scripts.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Delete the messages a filter selects, each only after it was written to a
    /// backup file (on by default), each deletion journaled. Messages that do
    /// not match are released at the end of the pass.
    Purge {
        /// The DLQ: a queue name from the config (`dlq-bridge list` shows them).
        #[arg(value_name = "QUEUE")]
        queue: String,
        /// CEL filter selecting what to delete (required; `true` for everything).
        #[arg(long, short = 'f', value_name = "CEL", value_parser = purge_filter, allow_hyphen_values = true)]
        filter: String,
        /// Only messages older than this (`7d`, `36h`), by enqueue time.
        #[arg(long, value_name = "DURATION", value_parser = older_than)]
        older_than: Option<std::time::Duration>,
        /// Lease, filter and report what would be deleted, then release it all;
        /// delete nothing and write no backup.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation (required when not on a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        /// Backup file (JSONL, the `export` format; appended to). Default:
        /// backups/QUEUE-TIME.jsonl in serve.data_dir, else in
        /// $XDG_STATE_HOME/dlq-bridge.
        #[arg(long, value_name = "FILE")]
        backup: Option<PathBuf>,
        /// Delete without writing a backup.
        #[arg(long, conflicts_with = "backup")]
        no_backup: bool,
        /// Delete at most N messages.
        #[arg(long, value_name = "N", value_parser = at_least_one::<u64>)]
        max: Option<u64>,
        /// Messages per second at most: a whole number, at least 1. Default: the
        /// config's `redrive.rate`, else no limit.
        #[arg(long, value_name = "N", value_parser = parse_rate)]
        rate: Option<u32>,
        #[command(flatten)]
        journal: JournalOpts,
        /// Output: an aligned table for people, or JSON for scripts.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Apply the queues' `retention` policies once, as `serve` does on its
    /// leader: list expired messages (alert, --dry-run) or export-then-purge them.
    Retention {
        /// One queue name from the config; default: every queue with a policy.
        #[arg(value_name = "QUEUE")]
        queue: Option<String>,
        /// List the expired messages each policy would purge; purge nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation (required when not on a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        journal: JournalOpts,
        /// Output: an aligned table for people, or JSON for scripts.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Past runs (redrive, purge, import) from the journal: the audit trail.
    /// Runs without a summary (killed, crashed or still going) show as unfinished.
    Runs {
        /// Journal file to read; it must exist. With it no config is needed
        /// (one found is read for its rotation settings, and only warned
        /// about when it does not load).
        /// Default: the config's `redrive.journal`, else journal.jsonl in
        /// `serve.data_dir`, else in $XDG_STATE_HOME/dlq-bridge (where `serve` journals).
        #[arg(long, value_name = "PATH")]
        journal: Option<PathBuf>,
        /// Output: an aligned table for people, or JSON for scripts.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Debug, Args, Default)]
pub struct JournalOpts {
    /// Journal (audit trail). Default: the config's `redrive.journal`, else
    /// journal.jsonl in `serve.data_dir`, else in $XDG_STATE_HOME/dlq-bridge.
    #[arg(long, value_name = "PATH", value_parser = journal_file)]
    pub journal: Option<PathBuf>,
    /// Keep no journal for this run.
    #[arg(long, conflicts_with = "journal")]
    pub no_journal: bool,
}

#[derive(Debug, Args, Default)]
pub struct RedriveOpts {
    /// CEL filter selecting the messages to move. Default: every message.
    #[arg(long, short = 'f', value_name = "CEL", value_parser = optional_filter, allow_hyphen_values = true)]
    pub filter: Option<String>,
    /// Destination instead of each message's source: a configured queue name or
    /// a provider address (SQS queue name/URL, Pub/Sub topic, Service Bus entity).
    #[arg(long, value_name = "DEST")]
    pub to: Option<String>,
    /// Lease, filter and report what would move; send and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Messages per second at most: a whole number, at least 1. Default: the
    /// config's `redrive.rate`, else no limit.
    #[arg(long, value_name = "N", value_parser = parse_rate)]
    pub rate: Option<u32>,
    /// Move at most N messages: the run stops once N matches went to a send,
    /// whether or not each send succeeded (a failed one stays in the DLQ).
    #[arg(long, value_name = "N", value_parser = at_least_one::<u64>)]
    pub max: Option<u64>,
    /// Send batches in flight at once, 1 to 256. Default: the config's `redrive.concurrency`.
    #[arg(long, value_name = "N", value_parser = concurrency)]
    pub concurrency: Option<usize>,
    /// Do not ask for confirmation (required when not on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Journal (audit trail and crash record). Default: the config's
    /// `redrive.journal`, else journal.jsonl in `serve.data_dir`, else in
    /// $XDG_STATE_HOME/dlq-bridge.
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,
    /// Keep no journal for this run.
    #[arg(long, conflicts_with = "journal")]
    pub no_journal: bool,
    /// Output of the summary: an aligned table for people, or JSON for scripts.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Format,
}

impl Command {
    /// The subcommand as typed.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::List { .. } => "list",
            Self::Inspect { .. } => "inspect",
            Self::Redrive { .. } => "redrive",
            Self::Check { .. } => "check",
            Self::Serve => "serve",
            Self::Report { .. } => "report",
            Self::Export { .. } => "export",
            Self::Import { .. } => "import",
            Self::Purge { .. } => "purge",
            Self::Retention { .. } => "retention",
            Self::Runs { .. } => "runs",
        }
    }
}

impl RedriveOpts {
    pub(super) fn any_set(&self) -> bool {
        !self.set_flags().is_empty()
    }

    /// The flags given, as typed (for an error that names them).
    pub(super) fn set_flags(&self) -> Vec<&'static str> {
        [
            (self.filter.is_some(), "--filter"),
            (self.to.is_some(), "--to"),
            (self.dry_run, "--dry-run"),
            (self.rate.is_some(), "--rate"),
            (self.max.is_some(), "--max"),
            (self.concurrency.is_some(), "--concurrency"),
            (self.yes, "--yes"),
            (self.journal.is_some(), "--journal"),
            (self.no_journal, "--no-journal"),
            (self.output != Format::Table, "--output"),
        ]
        .into_iter()
        .filter_map(|(set, flag)| set.then_some(flag))
        .collect()
    }
}

/// `--rate`: whole messages per second, at least 1 (0 would mean no limit at
/// all, which leaving `--rate` out already says).
fn parse_rate(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err("must be at least 1 message per second (leave --rate out for no limit)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("rate is whole messages per second: an integer of at least 1, e.g. --rate 50".into()),
    }
}

/// An optional `--filter`: given, it must say something. An empty one is
/// most often a shell-quoting slip (`--filter "$F"` with F unset), and some
/// commands read it as "every message" where others refused it.
fn optional_filter(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("the filter is empty: leave --filter out to select every message (an empty value is often a shell-quoting slip)".into());
    }
    Ok(text.to_string())
}

/// Purge's required `--filter`: `true` purges everything, so nothing is implied.
/// `--journal`: a file. A directory was refused only once the run had
/// connected, or after the confirmation, with exit 1.
fn journal_file(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if path.is_dir() {
        return Err(format!(
            "`{text}` is a directory: give the journal's file (such as {})",
            path.join("journal.jsonl").display()
        ));
    }
    Ok(path)
}

/// `--older-than`: a duration that a filter's `duration()` can hold too.
fn older_than(text: &str) -> Result<std::time::Duration, String> {
    let d = crate::config::duration_text::parse(text)?;
    crate::filter::Filter::compile(&crate::engine::triage::purge_filter("true", Some(d)))
        .map_err(|_| format!("`{text}` is longer than a filter's durations can be"))?;
    Ok(d)
}

fn purge_filter(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("the filter is empty: pass --filter true to purge every message (an empty value is often a shell-quoting slip)".into());
    }
    Ok(text.to_string())
}

/// A count that must be at least 1: 0 would show, read or move nothing.
fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(text: &str) -> Result<T, String> {
    match text.trim().parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err("expected a whole number of at least 1".into()),
    }
}

fn concurrency(text: &str) -> Result<usize, String> {
    let max = crate::config::MAX_CONCURRENCY;
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory given as the journal is a usage error, before anything runs.
    #[test]
    fn a_journal_that_is_a_directory_is_refused_as_an_argument() {
        let dir = std::env::temp_dir();
        let parsed = Cli::try_parse_from(
            ["dlq-bridge", "purge", "orders", "--filter", "true", "--journal"]
                .iter()
                .copied()
                .chain([dir.to_str().unwrap()]),
        );
        let Err(e) = parsed else {
            panic!("a directory was taken as the journal")
        };
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    /// A filter may start with `-` (`-1 < delivery_count`): it is the
    /// option's value, not an unknown flag.
    #[test]
    fn a_filter_may_start_with_a_minus() {
        for cmd in [
            &["inspect"][..],
            &["redrive"],
            &["purge"],
            &["export", "--to", "x.jsonl"],
        ] {
            let args = ["dlq-bridge"]
                .iter()
                .chain(cmd)
                .chain(&["orders", "--filter", "-1 < delivery_count"]);
            let parsed = Cli::try_parse_from(args);
            assert!(
                parsed.is_ok(),
                "{cmd:?}: {}",
                parsed.err().map(|e| e.to_string()).unwrap_or_default()
            );
        }
    }

    /// Every command and every option `--help` lists is named in the README
    /// (an option by its long form, or by its short one as `-o`), so an
    /// option added to the CLI is added to the docs too.
    #[test]
    fn the_readme_names_every_command_and_option() {
        use clap::CommandFactory;
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let names = |text: &str, prefix: &str| -> bool {
            // `--no-backup` must not count as `--no`: the name ends at a
            // character that cannot continue it.
            text.match_indices(prefix).any(|(i, _)| {
                !text[i + prefix.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        };
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            if !names(&readme, &format!("dlq-bridge {}", sub.get_name()))
                && !names(&readme, &format!("`{}", sub.get_name()))
            {
                missing.push(sub.get_name().to_string());
            }
        }
        for cmd in std::iter::once(&cli).chain(cli.get_subcommands()) {
            for arg in cmd.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if matches!(long, "help" | "version") {
                    continue;
                }
                let by_long = names(&readme, &format!("--{long}"));
                let by_short = arg.get_short().is_some_and(|s| names(&readme, &format!("`-{s}")));
                if !by_long && !by_short {
                    missing.push(format!("{} --{long}", cmd.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "README.md does not name: {missing:?}");
    }

    #[test]
    fn counts_are_whole_numbers_of_at_least_one() {
        assert_eq!(at_least_one::<usize>("3"), Ok(3));
        assert_eq!(at_least_one::<u64>("1"), Ok(1));
        assert_eq!(at_least_one::<usize>("0"), Err("must be at least 1".into()));
        assert!(at_least_one::<u64>("-1").unwrap_err().contains("whole number"));
        assert!(at_least_one::<usize>("2.5").unwrap_err().contains("whole number"));
    }

    #[test]
    fn an_empty_filter_is_refused_with_what_to_do_instead() {
        assert_eq!(optional_filter("reason == \"x\""), Ok("reason == \"x\"".into()));
        for empty in ["", "  ", "\n"] {
            assert!(optional_filter(empty).unwrap_err().contains("leave --filter out"));
            assert!(purge_filter(empty).unwrap_err().contains("--filter true"));
        }
    }

    #[test]
    fn every_argument_has_help() {
        use clap::CommandFactory;
        let mut missing = Vec::new();
        let cli = Cli::command();
        let mut commands = vec![&cli];
        commands.extend(cli.get_subcommands());
        for cmd in commands {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_help().is_none() && !matches!(id, "help" | "version") {
                    missing.push(format!("{} {id}", cmd.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn rate_is_whole_messages_per_second_and_at_least_one() {
        assert_eq!(parse_rate("50"), Ok(50));
        assert_eq!(parse_rate("1"), Ok(1));
        assert!(parse_rate("0").unwrap_err().contains("at least 1"));
        for bad in ["0.5", "-3", "fast", ""] {
            assert!(
                parse_rate(bad).unwrap_err().contains("whole messages per second"),
                "{bad}"
            );
        }
    }
}
