//! Why a message could not be processed now: the error every part of the shell returns, split by
//! whether a retry can help.

use cvchain_azure::history::claims::HoldError;
use cvchain_azure::storage::{StorageError, channels::ChannelError};
use cvchain_core::customvision::CvError;

/// Why a message could not be processed now. It stays on the queue and is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    CustomVision(#[from] CvError),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("channels: {0}")]
    Channels(ChannelError),
}

impl From<ChannelError> for ProcessError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Storage(s) => ProcessError::Storage(s),
            other => ProcessError::Channels(other),
        }
    }
}

impl From<HoldError> for ProcessError {
    fn from(e: HoldError) -> Self {
        match e {
            HoldError::Storage(e) => ProcessError::Storage(e),
            // Whoever holds the claim now finishes the work; this delivery is retried.
            lost @ HoldError::Lost(_) => ProcessError::NotReady(lost.to_string()),
        }
    }
}

impl ProcessError {
    /// True when a retry may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ProcessError::Storage(e) => e.is_transient(),
            ProcessError::CustomVision(e) => e.is_transient(),
            ProcessError::NotReady(_) => true,
            ProcessError::Channels(e) => e.is_transient(),
        }
    }
}
