//! The `serve` section: the sidecar's listener and token, polling, admin-call
//! limits, leader election and dashboard, with their defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::default_true;
use super::durations::{duration_text, poll_interval_text};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address of the HTTP API and /metrics. Loopback by default; any other
    /// address is refused unless a token is configured.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Environment variable holding the bearer token that mutating API calls
    /// (redrives) must present. Unset: no token is required (loopback only).
    #[serde(default, deserialize_with = "super::env::opt_var_name")]
    pub token_env: Option<String>,
    /// Where the journal (unless `redrive.journal` names one) and state
    /// live. Default: `$XDG_STATE_HOME/dlq-bridge`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// How often each queue is polled, unless the queue sets `poll_interval`.
    /// At least 1s (`MIN_POLL_INTERVAL`).
    #[serde(default = "default_poll_interval", with = "poll_interval_text")]
    pub poll_interval: Duration,
    /// Messages read per poll to find reasons (top-N metric, `new_reason`).
    /// On SQS and Pub/Sub reading leases and releases (delivery counts rise);
    /// 0 turns sampling off unless a `new_reason` rule needs it.
    #[serde(default = "default_reason_sample")]
    pub reason_sample: usize,
    /// At most this many admin calls per second to each backend kind: Service
    /// Bus throttles management calls hard.
    #[serde(default)]
    pub admin_calls_per_second: AdminCallLimits,
    /// How long SIGTERM waits for in-flight redrives to finish their batches.
    #[serde(default = "default_shutdown_grace", with = "duration_text")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub leader_election: LeaderElectionConfig,
    #[serde(default)]
    pub dashboard: DashboardConfig,
}

/// The web dashboard `serve` shows at `/` and `/ui`, on the API's listener
/// and under the API's rules (token, loopback, same origin).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Serve the dashboard. Off: `/` and `/ui` answer 404; the API is unchanged.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Show message bodies on the queue page. Off by default, as in alerts:
    /// bodies often hold personal data, and a dashboard is shared on screens.
    #[serde(default)]
    pub show_bodies: bool,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            show_bodies: false,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token_env: None,
            data_dir: None,
            poll_interval: default_poll_interval(),
            reason_sample: default_reason_sample(),
            admin_calls_per_second: AdminCallLimits::default(),
            shutdown_grace: default_shutdown_grace(),
            leader_election: LeaderElectionConfig::default(),
            dashboard: DashboardConfig::default(),
        }
    }
}

impl ServeConfig {
    /// `listen` is an IP address and port, and only loopback unless a token
    /// is configured: otherwise `(field, what is wrong)`. Whether the token's
    /// variable is set is checked when `serve` starts and by `check` (the
    /// environment is not the config; see
    /// [`Config::serve_env_problems`](super::Config::serve_env_problems)).
    pub fn check_listen(&self) -> Result<std::net::SocketAddr, (&'static str, String)> {
        let listen: std::net::SocketAddr = self.listen.trim().parse().map_err(|_| {
            (
                "serve.listen",
                format!(
                    "`{}` is not an IP address and port (e.g. `127.0.0.1:9090`, `[::1]:9090`, `0.0.0.0:9090`; host names are not resolved)",
                    self.listen
                ),
            )
        })?;
        match self.token_env.as_deref() {
            Some(var) if var.trim().is_empty() => Err((
                "serve.token_env",
                "must not be empty: it names the environment variable holding the API token".into(),
            )),
            None if !listen.ip().is_loopback() => Err((
                "serve.listen",
                format!(
                    "{listen} is not a loopback address: refusing to serve the API there without a token; set serve.token_env (the environment variable holding it), or listen on 127.0.0.1"
                ),
            )),
            _ => Ok(listen),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_reason_sample() -> usize {
    50
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(25)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminCallLimits {
    #[serde(default = "default_sqs_calls")]
    pub sqs: u32,
    #[serde(default = "default_pubsub_calls")]
    pub pubsub: u32,
    #[serde(default = "default_servicebus_calls")]
    pub servicebus: u32,
}

impl Default for AdminCallLimits {
    fn default() -> Self {
        Self {
            sqs: default_sqs_calls(),
            pubsub: default_pubsub_calls(),
            servicebus: default_servicebus_calls(),
        }
    }
}

fn default_sqs_calls() -> u32 {
    20
}
fn default_pubsub_calls() -> u32 {
    10
}
fn default_servicebus_calls() -> u32 {
    2
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElectionConfig {
    /// Elect one replica (through a coordination.k8s.io/v1 Lease) to evaluate
    /// alerts and run schedules. Off: this process does both.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    /// Default: the POD_NAMESPACE environment variable, else the Kubernetes
    /// client's namespace (the pod's own in a cluster, the kubeconfig
    /// context's outside one).
    #[serde(default)]
    pub namespace: Option<String>,
    /// This replica's name in the Lease. Default: POD_NAME, else the hostname.
    /// Leave it out where replicas share one config (a Deployment's
    /// ConfigMap): replicas of one identity would all lead.
    #[serde(default)]
    pub identity: Option<String>,
    /// A leader that has not renewed for this long is replaced.
    #[serde(default = "default_lease_duration", with = "duration_text")]
    pub lease_duration: Duration,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            lease_name: default_lease_name(),
            namespace: None,
            identity: None,
            lease_duration: default_lease_duration(),
        }
    }
}

fn default_lease_name() -> String {
    "dlq-bridge".into()
}
fn default_lease_duration() -> Duration {
    Duration::from_secs(15)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

    #[test]
    fn serve_listen_must_be_an_address_and_loopback_without_a_token() {
        let q = "queues:\n  - name: a\n    sqs: {queue: x}\n";
        let err = parse(&format!("{q}serve:\n  listen: notanaddr\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:5:3: serve.listen: `notanaddr` is not an IP address and port"),
            "{err}"
        );
        let err = parse(&format!("{q}serve:\n  poll_interval: 5s\n  listen: 0.0.0.0:9999\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml:6:3: serve.listen: 0.0.0.0:9999 is not a loopback address"),
            "{err}"
        );
        assert!(err.contains("set serve.token_env"), "{err}");
        let err = parse(&format!("{q}serve: {{listen: '127.0.0.1:9', token_env: ''}}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("serve.token_env: must not be empty"), "{err}");
        for ok in [
            "serve: {listen: '0.0.0.0:9999', token_env: TOKEN}\n",
            "serve: {listen: '[::1]:9090'}\n",
            "serve: {listen: '127.0.0.2:0'}\n",
        ] {
            let c = parse(&format!("{q}{ok}")).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(c.serve.check_listen().is_ok());
        }
    }
}
