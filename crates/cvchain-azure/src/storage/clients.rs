//! Builds the SDK's clients (and our table client) from the storage settings, with the right
//! authentication for each: SharedKey signing, a SAS, or Microsoft Entra ID tokens.

use super::settings::{StorageAuth, StorageSettings, TokenSource};
use super::{
    StorageError,
    shared_key::{Service, SharedKeyPolicy},
    table::TableClient,
};
use azure_core::{
    credentials::TokenCredential,
    http::{
        ClientOptions, ExponentialRetryOptions, Pipeline, RetryOptions, Url,
        policies::{Policy, auth::BearerTokenAuthorizationPolicy},
    },
    time::Duration,
};
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};
use azure_storage_blob::{
    BlobClient, BlobClientOptions, BlobServiceClient, BlobServiceClientOptions,
};
use azure_storage_queue::{QueueClient, QueueClientOptions};
use std::sync::Arc;

pub const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";

/// Retries inside one invocation stay short: the queue itself retries the whole message later.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub max_total: std::time::Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            max_total: std::time::Duration::from_secs(10),
        }
    }
}

/// Everything needed to make storage clients for one account.
#[derive(Clone)]
pub struct StorageClients {
    settings: StorageSettings,
    credential: Option<Arc<dyn TokenCredential>>,
    retry: RetryPolicy,
    /// Shared by every client made from this set (one HTTP client, one connection pool).
    transport: azure_core::http::Transport,
    /// The application id at the head of every request's `User-Agent`.
    application_id: String,
}

impl std::fmt::Debug for StorageClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageClients")
            .field("settings", &self.settings)
            .finish()
    }
}

impl StorageClients {
    /// Creates the token credential when the settings ask for one; no request is sent yet.
    pub fn new(settings: &StorageSettings) -> Result<Self, StorageError> {
        let transport = crate::transport::lazy();
        let credential: Option<Arc<dyn TokenCredential>> = match &settings.auth {
            StorageAuth::Token(TokenSource::ManagedIdentity { client_id }) => {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options: ClientOptions {
                        transport: Some(transport.clone()),
                        ..Default::default()
                    },
                };
                Some(
                    ManagedIdentityCredential::new(Some(options))
                        .map_err(|e| credential_error(settings, &e))?,
                )
            }
            StorageAuth::Token(TokenSource::Developer) => Some(
                DeveloperToolsCredential::new(None).map_err(|e| credential_error(settings, &e))?,
            ),
            _ => None,
        };
        Ok(Self {
            settings: settings.clone(),
            credential,
            retry: RetryPolicy::default(),
            transport,
            application_id: crate::USER_AGENT_NAME.to_owned(),
        })
    }

    /// Uses the given credential for token auth (tests, or callers with their own identity).
    pub fn with_credential(
        settings: &StorageSettings,
        credential: Arc<dyn TokenCredential>,
    ) -> Self {
        Self {
            settings: settings.clone(),
            credential: Some(credential),
            retry: RetryPolicy::default(),
            transport: crate::transport::lazy(),
            application_id: crate::USER_AGENT_NAME.to_owned(),
        }
    }

    /// Sends every request through this transport (an HTTP client that trusts a test CA…).
    pub fn with_transport(mut self, transport: azure_core::http::Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Names another application in the `User-Agent` of every request (at most 24 characters):
    /// the stand-in's own storage requests are told apart from cvchain's that way.
    pub fn with_application_id(mut self, id: &str) -> Self {
        self.application_id = id.chars().take(24).collect();
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn settings(&self) -> &StorageSettings {
        &self.settings
    }

    fn client_options(&self, service: Service) -> ClientOptions {
        let mut options = ClientOptions {
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: Duration::milliseconds(200),
                max_retries: self.retry.max_retries,
                max_total_elapsed: Duration::try_from(self.retry.max_total)
                    .unwrap_or(Duration::seconds(10)),
                max_delay: Duration::seconds(2),
            }),
            transport: Some(self.transport.clone()),
            user_agent: azure_core::http::UserAgentOptions {
                application_id: Some(self.application_id.clone()),
            },
            ..Default::default()
        };
        // A client span and metrics per attempt (nothing unless telemetry is on).
        options
            .per_call_policies
            .push(Arc::new(crate::telemetry::AttemptsPolicy));
        options
            .per_try_policies
            .push(crate::telemetry::ClientSpanPolicy::shared(
                telemetry_service(service),
            ));
        if let StorageAuth::SharedKey { account, key } = &self.settings.auth {
            options.per_try_policies.push(SharedKeyPolicy::new(
                account.clone(),
                key.clone(),
                service,
            ));
        }
        options
    }

    /// Appends the connection's SAS, if it has one.
    fn with_sas(&self, mut url: Url) -> Url {
        if let StorageAuth::Sas { token } = &self.settings.auth {
            let query = match url.query() {
                Some(q) if !q.is_empty() => format!("{q}&{}", token.secret()),
                _ => token.secret().to_owned(),
            };
            url.set_query(Some(&query));
        }
        url
    }

    fn child_url(base: &Url, name: &str) -> Result<Url, StorageError> {
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|_| StorageError::Other {
                service: "storage",
                detail: format!("{base} cannot be a base URL"),
            })?
            .pop_if_empty()
            .push(name);
        Ok(url)
    }

    /// A client for one queue.
    pub fn queue(&self, name: &str) -> Result<QueueClient, StorageError> {
        let url = self.with_sas(Self::child_url(&self.settings.queue_endpoint, name)?);
        let options = QueueClientOptions {
            client_options: self.client_options(Service::Queue),
            ..Default::default()
        };
        QueueClient::new(url, self.credential.clone(), Some(options))
            .map_err(|e| StorageError::from_azure("queue", &e))
    }

    /// A client for the blob service.
    pub fn blob_service(&self) -> Result<BlobServiceClient, StorageError> {
        let url = self.with_sas(self.settings.blob_endpoint.clone());
        let options = BlobServiceClientOptions {
            client_options: self.client_options(Service::Blob),
            ..Default::default()
        };
        BlobServiceClient::new(url, self.credential.clone(), Some(options))
            .map_err(|e| StorageError::from_azure("blob", &e))
    }

    /// A client for a blob at `url` in this account, with this connection's authentication.
    pub fn blob_at(&self, url: &Url) -> Result<BlobClient, StorageError> {
        let options = BlobClientOptions {
            client_options: self.client_options(Service::Blob),
            ..Default::default()
        };
        BlobClient::new(
            self.with_sas(url.clone()),
            self.credential.clone(),
            Some(options),
        )
        .map_err(|e| StorageError::from_azure("blob", &e))
    }

    /// A client for a blob URL that carries its own SAS: no other authentication is added.
    pub fn anonymous_blob(&self, url_with_sas: &Url) -> Result<BlobClient, StorageError> {
        let mut client_options = self.client_options(Service::Blob);
        client_options.per_try_policies.clear();
        client_options
            .per_try_policies
            .push(crate::telemetry::ClientSpanPolicy::shared(
                crate::telemetry::Service::Blob,
            ));
        let options = BlobClientOptions {
            client_options,
            ..Default::default()
        };
        BlobClient::new(url_with_sas.clone(), None, Some(options))
            .map_err(|e| StorageError::from_azure("blob", &e))
    }

    /// A client for one table, on a pipeline with the same authentication.
    pub fn table(&self, name: &str) -> Result<TableClient, StorageError> {
        let endpoint = self.settings.table_endpoint.clone();
        let mut per_try: Vec<Arc<dyn Policy>> = Vec::new();
        if let Some(cred) = &self.credential {
            if endpoint.scheme() != "https" {
                return Err(StorageError::Other {
                    service: "table",
                    detail: format!("{endpoint} must use https with token authentication"),
                });
            }
            per_try.push(Arc::new(BearerTokenAuthorizationPolicy::new(
                cred.clone(),
                [STORAGE_SCOPE],
            )));
        }
        let pipeline = Pipeline::new(
            Some(crate::USER_AGENT_NAME),
            Some(env!("CARGO_PKG_VERSION")),
            self.client_options(Service::Table),
            Vec::new(),
            per_try,
            None,
        );
        let sas = match &self.settings.auth {
            StorageAuth::Sas { token } => Some(token.clone()),
            _ => None,
        };
        Ok(TableClient::new(endpoint, name, pipeline, sas))
    }
}

fn telemetry_service(service: Service) -> crate::telemetry::Service {
    match service {
        Service::Blob => crate::telemetry::Service::Blob,
        Service::Queue => crate::telemetry::Service::Queue,
        Service::Table => crate::telemetry::Service::Table,
    }
}

fn credential_error(settings: &StorageSettings, e: &azure_core::Error) -> StorageError {
    StorageError::Other {
        service: "storage",
        detail: format!(
            "cannot create the credential for {}: {}",
            settings.source,
            cvchain_core::redact::redact(&e.to_string())
        ),
    }
}
