//! Exit codes, documented in `--help` and the README, and the error that
//! carries one to `main`.

use crate::backend::BackendError;
use crate::engine::registry::RegistryError;
use crate::engine::triage::TriageError;

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
        Self {
            code: code_of(&error),
            error,
        }
    }
}

/// The exit code an error calls for: [`USAGE`] when the user's input (the
/// config, its environment variables, a filter, an argument) is wrong,
/// [`FAILURE`] for what went wrong at run time.
pub(crate) fn code_of(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<crate::config::ConfigError>().is_some()
        || error.downcast_ref::<crate::filter::FilterError>().is_some()
        || error
            .downcast_ref::<RegistryError>()
            .is_some_and(|e| e.is_usage() || is_config_backend_error(e))
        || error
            .downcast_ref::<crate::sidecar::alert::sinks::SinkError>()
            .is_some()
        || error
            .downcast_ref::<TriageError>()
            .is_some_and(|e| e.is_usage() || is_config_triage_error(e))
    {
        USAGE
    } else {
        FAILURE
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
            error: BackendError::Invalid(_) | BackendError::NotCompiled { .. },
            ..
        }
    )
}

/// The same, met inside a triage command (purge, import, retention connect
/// their queue's backend themselves).
fn is_config_triage_error(e: &TriageError) -> bool {
    match e {
        TriageError::Registry(r) => is_config_backend_error(r),
        TriageError::Backend(b) => matches!(b, BackendError::Invalid(_) | BackendError::NotCompiled { .. }),
        _ => false,
    }
}

pub(crate) fn usage(msg: impl Into<String>) -> Failure {
    Failure {
        code: USAGE,
        error: anyhow::anyhow!(msg.into()),
    }
}
