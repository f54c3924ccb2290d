//! What can go wrong in a triage operation, and which of it is the user's to fix.

use std::path::{Path, PathBuf};

use crate::backend::BackendError;
use crate::engine::journal::JournalError;
use crate::engine::redrive::RedriveError;
use crate::engine::registry::RegistryError;
use crate::filter::FilterError;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Redrive(#[from] RedriveError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    // `error`, not `source`: thiserror would make a `source` field the
    // error's cause, and the top level prints causes after the message, so
    // the OS error showed twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}: not an export line: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// Something the user can fix in their input (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// A signal (or the server's shutdown) came while the run connected,
    /// before anything was read or leased.
    #[error("stopped while connecting: nothing was leased")]
    StoppedConnecting,
}

impl TriageError {
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Registry(e) => e.is_usage(),
            Self::Filter(_) | Self::Usage(_) | Self::BadLine { .. } => true,
            // A file named on the command line that is not there, is a
            // directory or may not be opened: the user's to fix. A write
            // that fails half-way (a full disk) is not.
            Self::Io { error, .. } => matches!(
                error.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::IsADirectory
                    | std::io::ErrorKind::NotADirectory
                    | std::io::ErrorKind::PermissionDenied
            ),
            _ => false,
        }
    }
}

/// `connect`'s result, unless `cancel` fires first: a run stopped while an
/// endpoint is slow to answer holds nothing yet, so it may simply end.
pub(super) async fn unless_cancelled<T>(
    cancel: &CancellationToken,
    connect: impl Future<Output = Result<T, TriageError>>,
) -> Result<T, TriageError> {
    tokio::select! {
        connected = connect => connected,
        () = cancel.cancelled() => Err(TriageError::StoppedConnecting),
    }
}

pub(super) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TriageError + '_ {
    move |error| TriageError::Io {
        path: path.to_owned(),
        error,
    }
}
