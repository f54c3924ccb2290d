use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use dlq_bridge::cli::{self, Cli};
use tracing_subscriber::filter::{FilterExt as _, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Crates that, below the level given here, log credentials, signed
/// requests, auth headers or webhook URLs (or, for the AWS config chain,
/// warn about every missing source). Secrets never reach logs, whatever level
/// is asked for, so these caps always apply: they are a filter of their own
/// that every event must pass as well as `DLQ_BRIDGE_LOG`'s (a directive
/// added to the user's filter lost to a more specific one of theirs, such
/// as `aws_sigv4::http_request=trace`).
const CAPPED_TARGETS: &[(&str, &str)] = &[
    ("aws_config", "error"),
    ("aws_smithy_runtime", "error"),
    ("aws_credential_types", "info"),
    ("aws_runtime", "info"),
    ("aws_sigv4", "info"),
    ("aws_smithy_runtime_api", "info"),
    ("aws_smithy_http_client", "info"),
    ("hyper", "info"),
    ("hyper_util", "info"),
    ("h2", "info"),
    ("reqwest", "info"),
    ("rustls", "info"),
    ("tonic", "info"),
    ("tower", "info"),
    ("google_cloud_auth", "info"),
    ("gcloud_auth", "info"),
    ("gcloud_gax", "info"),
    ("gcloud_pubsub", "info"),
    ("azservicebus", "info"),
    ("azure_core", "info"),
    // It logs a refused certificate as an error of its own; the backend's
    // error says the same, with what to do about it.
    ("rustls_platform_verifier", "off"),
    ("fe2o3_amqp", "info"),
    ("kube", "info"),
    ("kube_client", "info"),
];

/// glibc gives threads that allocate at the same time heaps of their own
/// (up to 8 per core), and memory freed in one heap is not reused by another:
/// a redrive of 100k × 1 KiB Service Bus messages peaked at 62 MiB RSS with
/// the default, 61 MiB with two heaps and 57 MiB with one. Per-thread caches
/// keep one heap's lock off the hot path. `MALLOC_ARENA_MAX`, when set, wins.
/// Called before any thread starts.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a glibc tuning parameter; no other
        // thread exists yet to allocate concurrently.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    one_malloc_arena();
    // With more than one crypto provider linked, rustls refuses to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // An empty DLQ_BRIDGE_CONFIG is unset (as an empty AWS_ENDPOINT_URL is):
    // clap took it for a --config given without its value.
    if std::env::var_os("DLQ_BRIDGE_CONFIG").is_some_and(|v| v.is_empty()) {
        // SAFETY: no other thread runs yet; the runtime starts below.
        unsafe { std::env::remove_var("DLQ_BRIDGE_CONFIG") };
    }
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = match std::env::var("DLQ_BRIDGE_LOG").ok().filter(|v| !v.trim().is_empty()) {
        None => EnvFilter::new(default_level),
        Some(value) => EnvFilter::try_new(&value).unwrap_or_else(|e| {
            // Said, not ignored: a typo left the user wondering why no debug
            // line appeared.
            let _ = writeln!(
                std::io::stderr(),
                "warning: DLQ_BRIDGE_LOG={value:?} is not a log filter ({e}); logging at {default_level}"
            );
            EnvFilter::new(default_level)
        }),
    };
    let caps = CAPPED_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |caps, (target, level)| caps.with_target(*target, level.parse::<LevelFilter>().expect("valid level")),
    );
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only on a terminal (a sidecar's log is read from a file),
        // and never with NO_COLOR set (no-color.org), which with_ansi overrode.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_filter(filter.and(caps));
    tracing_subscriber::registry().with(log).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::exit::FAILURE);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            let _ = writeln!(std::io::stderr(), "error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
