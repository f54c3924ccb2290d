use std::process::ExitCode;

use clap::Parser;
use dlq_bridge::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // With more than one crypto provider linked, rustls refuses to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("DLQ_BRIDGE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},aws_config=error,aws_smithy_runtime=error")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::exit::FAILURE);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
