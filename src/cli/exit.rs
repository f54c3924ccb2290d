//! Exit codes, documented in `--help` and the README, and the error that
//! carries one to `main`.

use crate::engine::registry::RegistryError;

pub const OK: u8 = 0;
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const NONEMPTY: u8 = 3;

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
            || error
                .downcast_ref::<crate::sidecar::alert::sinks::SinkError>()
                .is_some()
            || error
                .downcast_ref::<crate::engine::triage::TriageError>()
                .is_some_and(crate::engine::triage::TriageError::is_usage)
        {
            USAGE
        } else {
            FAILURE
        };
        Self { code, error }
    }
}

/// A backend that could not be built from its config (a secret's environment
/// variable unset, a malformed connection string or resource name): the
/// user's input is wrong and no connection was made, so exit 2 like any
/// config error.
pub(crate) fn is_config_backend_error(e: &RegistryError) -> bool {
    matches!(
        e,
        RegistryError::Backend {
            error: crate::backend::BackendError::Invalid(_) | crate::backend::BackendError::NotCompiled { .. },
            ..
        }
    )
}

pub(crate) fn usage(msg: impl Into<String>) -> Failure {
    Failure {
        code: USAGE,
        error: anyhow::anyhow!(msg.into()),
    }
}
