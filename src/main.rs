use std::process::ExitCode;

use clap::Parser;
use dlq_bridge::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

const SECRET_BEARING_TARGETS: &[&str] = &[
    "aws_config",
    "aws_credential_types",
    "aws_runtime",
    "aws_sigv4",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
    "tonic",
    "tower",
    "google_cloud_auth",
    "gcloud_auth",
    "gcloud_gax",
    "gcloud_pubsub",
    "azservicebus",
    "azure_core",
    "fe2o3_amqp",
    "kube",
    "kube_client",
];

fn main() -> ExitCode {
    // With more than one crypto provider linked, rustls refuses to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let mut filter = EnvFilter::try_from_env("DLQ_BRIDGE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},aws_config=error,aws_smithy_runtime=error")));
    // Below `info`, these crates log credentials, signed requests, auth
    // headers or webhook URLs. Secrets never reach logs, whatever the level
    // asked for, so they are capped here.
    for noisy in SECRET_BEARING_TARGETS {
        filter = filter.add_directive(format!("{noisy}=info").parse().expect("valid directive"));
    }
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
