//! The Custom Vision Training API, as cvchain calls it: the narrow interface the processor uses
//! (Custom Vision is supported until 2028; keep it replaceable), its settings, and the client on
//! `azure_core`'s pipeline with its process-wide rate limit.

pub mod client;
pub mod limiter;

use azure_core::credentials::Secret;
use client::{CvAuth, CvRetry, TrainingClient};
use cvchain_core::config::{SettingsError, Vars, parse_url};
use cvchain_core::customvision::{CvError, Export, Iteration, IterationPerformance, Project};
use std::fmt;
use url::Url;
use uuid::Uuid;

pub const CV_ENDPOINT_SETTING: &str = "CUSTOM_VISION_ENDPOINT";
pub const CV_KEY_SETTING: &str = "CUSTOM_VISION_TRAINING_KEY";
pub const CV_CREDENTIAL_SETTING: &str = "CUSTOM_VISION_CREDENTIAL";
pub const CV_CLIENT_ID_SETTING: &str = "CUSTOM_VISION_CLIENT_ID";
pub const CV_MAX_RPS_SETTING: &str = "CVCHAIN_CV_MAX_RPS";
/// The service's quota: 10 transactions per second.
pub const DEFAULT_CV_MAX_RPS: u32 = 10;

/// The operations cvchain needs, and nothing more.
#[async_trait::async_trait]
pub trait TrainingApi: Send + Sync {
    async fn get_project(&self, project: Uuid) -> Result<Project, CvError>;
    async fn get_iteration(&self, project: Uuid, iteration: Uuid) -> Result<Iteration, CvError>;
    async fn get_iteration_performance(
        &self,
        project: Uuid,
        iteration: Uuid,
    ) -> Result<IterationPerformance, CvError>;
    async fn get_exports(&self, project: Uuid, iteration: Uuid) -> Result<Vec<Export>, CvError>;
    async fn export_iteration(
        &self,
        project: Uuid,
        iteration: Uuid,
        platform: &str,
        flavor: Option<&str>,
    ) -> Result<Export, CvError>;
    async fn publish_iteration(
        &self,
        project: Uuid,
        iteration: Uuid,
        publish_name: &str,
        prediction_id: &str,
    ) -> Result<bool, CvError>;
    /// Every iteration of the project (retention, publishing).
    async fn get_iterations(&self, project: Uuid) -> Result<Vec<Iteration>, CvError>;
    async fn unpublish_iteration(&self, project: Uuid, iteration: Uuid) -> Result<(), CvError>;
    async fn delete_iteration(&self, project: Uuid, iteration: Uuid) -> Result<(), CvError>;
}

/// Where the Training API is and how to authenticate to it.
#[derive(Clone)]
pub struct CustomVisionSettings {
    pub endpoint: Url,
    pub auth: CvAuthSetting,
    pub max_rps: u32,
}

#[derive(Clone)]
pub enum CvAuthSetting {
    Key(Secret),
    ManagedIdentity { client_id: Option<String> },
}

impl fmt::Debug for CustomVisionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            CvAuthSetting::Key(_) => "Training-Key".to_owned(),
            CvAuthSetting::ManagedIdentity { client_id } => {
                format!("ManagedIdentity(client_id={client_id:?})")
            }
        };
        f.debug_struct("CustomVisionSettings")
            .field(
                "endpoint",
                &cvchain_core::redact::url_without_secrets(self.endpoint.as_str()),
            )
            .field("auth", &auth)
            .field("max_rps", &self.max_rps)
            .finish()
    }
}

fn err(setting: impl Into<String>, problem: impl Into<String>) -> SettingsError {
    SettingsError::new(setting, problem)
}

impl CustomVisionSettings {
    /// `CUSTOM_VISION_ENDPOINT` and how to authenticate to it; `None` when the endpoint is unset.
    pub fn from_vars(vars: &Vars) -> Result<Option<Self>, SettingsError> {
        from_vars(vars)
    }
}

fn from_vars(vars: &Vars) -> Result<Option<CustomVisionSettings>, SettingsError> {
    let get = |name: &str| vars.get(name);
    let Some(endpoint) = get(CV_ENDPOINT_SETTING) else {
        return Ok(None);
    };
    let endpoint = parse_url(CV_ENDPOINT_SETTING, "value", &endpoint)?;
    let auth = match get(CV_CREDENTIAL_SETTING) {
        Some(c) if c.trim().eq_ignore_ascii_case("managedidentity") => {
            if endpoint.scheme() != "https" {
                return Err(err(
                    CV_ENDPOINT_SETTING,
                    "must use https with Microsoft Entra ID (a custom-subdomain endpoint)",
                ));
            }
            CvAuthSetting::ManagedIdentity {
                client_id: get(CV_CLIENT_ID_SETTING).map(|c| c.trim().to_owned()),
            }
        }
        Some(_) => {
            return Err(err(
                CV_CREDENTIAL_SETTING,
                format!("must be `managedidentity` (or unset to use {CV_KEY_SETTING})"),
            ));
        }
        None => match get(CV_KEY_SETTING) {
            // Sent as a header: a line break or other control character would fail every
            // request with "failed to build request".
            Some(k) if !k.trim().chars().all(|c| c.is_ascii_graphic()) => {
                return Err(err(
                    CV_KEY_SETTING,
                    "must be the key on one line, printable ASCII without spaces (as the portal shows it)",
                ));
            }
            Some(k) => CvAuthSetting::Key(Secret::new(k.trim().to_owned())),
            None => {
                return Err(err(
                    CV_KEY_SETTING,
                    format!(
                        "is required with {CV_ENDPOINT_SETTING} (or set {CV_CREDENTIAL_SETTING}=managedidentity)"
                    ),
                ));
            }
        },
    };
    let max_rps = vars.number(
        CV_MAX_RPS_SETTING,
        DEFAULT_CV_MAX_RPS.into(),
        1..=1000,
        "",
        "",
    )? as u32;
    Ok(Some(CustomVisionSettings {
        endpoint,
        auth,
        max_rps,
    }))
}

/// The Training API client the settings describe, on one lazily built HTTP client shared with
/// the identity endpoint.
pub fn training_client(settings: &CustomVisionSettings) -> Result<TrainingClient, CvError> {
    let (transport, http) = crate::transport::lazy_with_handle();
    let auth = match &settings.auth {
        CvAuthSetting::Key(k) => CvAuth::Key(k.clone()),
        CvAuthSetting::ManagedIdentity { client_id } => {
            let options = azure_identity::ManagedIdentityCredentialOptions {
                user_assigned_id: client_id
                    .clone()
                    .map(azure_identity::UserAssignedId::ClientId),
                client_options: azure_core::http::ClientOptions {
                    transport: Some(transport.clone()),
                    ..Default::default()
                },
            };
            let cred = azure_identity::ManagedIdentityCredential::new(Some(options))
                .map_err(|e| CvError::Credential(cvchain_core::redact::redact(&e.to_string())))?;
            CvAuth::Token(cred)
        }
    };
    Ok(TrainingClient::with_transport(
        &settings.endpoint,
        auth,
        settings.max_rps,
        CvRetry::default(),
        Some(transport),
    )
    .warming(http))
}
