//! What can go wrong in a triage operation, and which of it is the user's to fix.

use std::path::{Path, PathBuf};

use crate::backend::BackendError;
use crate::engine::journal::JournalError;
use crate::engine::redrive::RedriveError;
use crate::engine::registry::RegistryError;
use crate::filter::FilterError;

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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: not an export line: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// Something the user can fix in their input (exit code 2).
    #[error("{0}")]
    Usage(String),
}

impl TriageError {
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Registry(e) => e.is_usage(),
            Self::Filter(_) | Self::Usage(_) | Self::BadLine { .. } => true,
            _ => false,
        }
    }
}

pub(super) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TriageError + '_ {
    move |source| TriageError::Io {
        path: path.to_owned(),
        source,
    }
}
