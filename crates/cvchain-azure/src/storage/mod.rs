//! Azure Storage adapters: clients built from settings, the two pieces the SDK lacks (SharedKey
//! signing, Tables), the poison queue and the blobs that hold what it cannot.

pub mod blobs;
pub mod channels;
pub mod clients;
pub mod links;
pub mod queue;
pub mod rejected;
pub mod settings;
pub mod shared_key;
pub mod table;

use azure_core::{error::ErrorKind, http::StatusCode};
use cvchain_core::redact::redact;

/// A storage failure, classified so the caller knows whether a retry can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// Connection refused, reset or timed out: retry later.
    #[error("{service} storage is unreachable: {detail}")]
    Unreachable {
        service: &'static str,
        detail: String,
    },
    /// 401/403: the key, SAS or identity is wrong or lacks a role. Fix the setting; retries won't help.
    #[error(
        "{service} storage refused the credentials (HTTP {status}{code}): check the account key, SAS or the identity's role assignment"
    )]
    Denied {
        service: &'static str,
        status: u16,
        code: String,
    },
    /// Any other answer. 408, 429 and 5xx are transient.
    #[error("{service} storage answered HTTP {status}{code}: {message}")]
    Service {
        service: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    /// A local problem (a bad URL, a body that does not parse).
    #[error("{service} storage: {detail}")]
    Other {
        service: &'static str,
        detail: String,
    },
}

impl StorageError {
    /// True when the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Unreachable { .. } => true,
            StorageError::Service { status, .. } => is_transient_status(*status),
            StorageError::Denied { .. } | StorageError::Other { .. } => false,
        }
    }

    /// Classifies an `azure_core` error. Text from the transport can include a URL with a SAS, so it
    /// is redacted.
    pub fn from_azure(service: &'static str, e: &azure_core::Error) -> Self {
        match e.kind() {
            ErrorKind::Connection | ErrorKind::Io => StorageError::Unreachable {
                service,
                detail: redact(&error_chain(e)),
            },
            ErrorKind::HttpResponse {
                status, error_code, ..
            } => {
                let status = u16::from(*status);
                let code = error_code
                    .as_deref()
                    .map(|c| format!(" {c}"))
                    .unwrap_or_default();
                Self::from_status(service, status, code, redact(&e.to_string()))
            }
            ErrorKind::Credential => StorageError::Denied {
                service,
                status: 401,
                code: format!(" (no token: {})", redact(&e.to_string())),
            },
            _ => StorageError::Other {
                service,
                detail: redact(&error_chain(e)),
            },
        }
    }

    pub fn from_status(service: &'static str, status: u16, code: String, message: String) -> Self {
        if status == 401 || status == 403 {
            StorageError::Denied {
                service,
                status,
                code,
            }
        } else {
            StorageError::Service {
                service,
                status,
                code,
                message,
            }
        }
    }
}

pub fn is_transient_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

pub fn status_u16(status: StatusCode) -> u16 {
    u16::from(status)
}

/// The error and its sources on one line: the outermost message alone often says only "Io".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}
