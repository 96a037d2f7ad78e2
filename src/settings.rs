//! Settings from the environment, with the names Azure Functions uses, validated once at start.
//!
//! Every error names the setting that is wrong and never quotes a secret.

use azure_core::credentials::Secret;
use base64::Engine as _;
use std::fmt;
use url::Url;

/// The storage connection setting, and the one the host itself falls back to.
pub const STORAGE_SETTING: &str = "CVCHAIN_STORAGE";
pub const FALLBACK_STORAGE_SETTING: &str = "AzureWebJobsStorage";
pub const QUEUE_SETTING: &str = "CVCHAIN_QUEUE";
pub const HISTORY_TABLE_SETTING: &str = "CVCHAIN_HISTORY_TABLE";
pub const LOG_FORMAT_SETTING: &str = "CVCHAIN_LOG_FORMAT";
pub const PORT_SETTING: &str = "FUNCTIONS_CUSTOMHANDLER_PORT";
const LEGACY_PORT_SETTING: &str = "FUNCTIONS_HTTPWORKER_PORT";

pub const CV_ENDPOINT_SETTING: &str = "CUSTOM_VISION_ENDPOINT";
pub const CV_KEY_SETTING: &str = "CUSTOM_VISION_TRAINING_KEY";
pub const CV_CREDENTIAL_SETTING: &str = "CUSTOM_VISION_CREDENTIAL";
pub const CV_CLIENT_ID_SETTING: &str = "CUSTOM_VISION_CLIENT_ID";
pub const CV_MAX_RPS_SETTING: &str = "CVCHAIN_CV_MAX_RPS";
pub const EXPORTS_SETTING: &str = "CVCHAIN_EXPORTS";
pub const PUBLISH_NAME_SETTING: &str = "CVCHAIN_PUBLISH_NAME";
pub const PREDICTION_RESOURCE_SETTING: &str = "CVCHAIN_PREDICTION_RESOURCE_ID";
pub const BACKUP_CONTAINER_SETTING: &str = "CVCHAIN_BACKUP_CONTAINER";
pub const PROJECTS_SETTING: &str = "CVCHAIN_PROJECTS";
pub const MAX_DEQUEUE_SETTING: &str = "CVCHAIN_MAX_DEQUEUE";
pub const CLAIM_SECONDS_SETTING: &str = "CVCHAIN_CLAIM_SECONDS";
/// How long a claim lasts: longer than a request or a copy takes, short enough that a crashed
/// instance's claim does not hold a chain up for long (the retries of host.json outlast it).
pub const DEFAULT_CLAIM_SECONDS: u64 = 60;
/// The same as host.json's `maxDequeueCount`.
pub const DEFAULT_MAX_DEQUEUE: u32 = 5;
pub const RELEASE_CONTAINER_SETTING: &str = "CVCHAIN_RELEASE_CONTAINER";
pub const RELEASE_PATH_SETTING: &str = "CVCHAIN_RELEASE_PATH";
/// The service's quota: 10 transactions per second.
pub const DEFAULT_CV_MAX_RPS: u32 = 10;

pub const DEFAULT_QUEUE: &str = "customvision-notifications";
pub const DEFAULT_HISTORY_TABLE: &str = "CustomVisionHistory";
/// Used by `cvchain serve` when no host gave it a port.
pub const DEFAULT_PORT: u16 = 8080;

/// Azurite's well-known development account (published in Microsoft's Azurite docs).
pub const DEV_ACCOUNT: &str = "devstoreaccount1";
pub const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A setting that is missing or wrong, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting {setting}: {problem}")]
pub struct SettingsError {
    pub setting: String,
    pub problem: String,
}

fn err(setting: impl Into<String>, problem: impl Into<String>) -> SettingsError {
    SettingsError {
        setting: setting.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub storage: StorageSettings,
    pub queue_name: String,
    pub history_table: String,
    pub log_format: LogFormat,
    /// `None`: no Custom Vision endpoint, so cvchain only records notifications.
    pub custom_vision: Option<CustomVisionSettings>,
    pub chain: ChainSettings,
    pub release: ReleaseSettings,
    /// `CVCHAIN_PROJECTS`: only these projects are acted on; `None` means all.
    pub projects: Option<Vec<uuid::Uuid>>,
    /// The delivery at which the host gives up on a message (its `maxDequeueCount`).
    pub max_dequeue: u32,
    /// How long a claim on an export request or a copy lasts.
    pub claim_seconds: u64,
}

/// Where exported models are copied from and to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSettings {
    /// The container given to Custom Vision as `exportModelContainerUri`; a `modelUri` is used
    /// only when it lies inside it.
    pub backup_container: Option<Url>,
    /// The container in cvchain's account that receives the release copies.
    pub container: String,
    pub template: crate::release::PathTemplate,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        Self {
            backup_container: None,
            container: crate::release::DEFAULT_CONTAINER.to_owned(),
            template: crate::release::PathTemplate::parse(crate::release::DEFAULT_TEMPLATE)
                .expect("the default template is valid"),
        }
    }
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
            .field("endpoint", &self.endpoint.as_str())
            .field("auth", &auth)
            .field("max_rps", &self.max_rps)
            .finish()
    }
}

/// What happens after training: the exports, in order, and optional publishing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainSettings {
    pub exports: Vec<crate::chain::ExportTarget>,
    pub publish: Option<PublishSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishSettings {
    pub name: String,
    pub prediction_resource_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where storage is and how cvchain authenticates to it.
#[derive(Clone)]
pub struct StorageSettings {
    /// The setting the connection came from, for messages.
    pub source: String,
    pub blob_endpoint: Url,
    pub queue_endpoint: Url,
    pub table_endpoint: Url,
    pub auth: StorageAuth,
}

#[derive(Clone)]
pub enum StorageAuth {
    /// Account key from a connection string: requests are signed with SharedKey.
    SharedKey { account: String, key: Secret },
    /// A SAS from a connection string, appended to every URL.
    Sas { token: Secret },
    /// Microsoft Entra ID tokens from `azure_identity`.
    Token(TokenSource),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `__credential=managedidentity`, with `__clientId` for a user-assigned identity.
    ManagedIdentity { client_id: Option<String> },
    /// No `__credential`: the developer's own identity (Azure CLI, azd), as the host does locally.
    Developer,
}

impl fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageSettings")
            .field("source", &self.source)
            .field("blob_endpoint", &self.blob_endpoint.as_str())
            .field("queue_endpoint", &self.queue_endpoint.as_str())
            .field("table_endpoint", &self.table_endpoint.as_str())
            .field("auth", &self.auth)
            .finish()
    }
}

impl fmt::Debug for StorageAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageAuth::SharedKey { account, .. } => write!(f, "SharedKey({account})"),
            StorageAuth::Sas { .. } => f.write_str("Sas"),
            StorageAuth::Token(t) => write!(f, "Token({t:?})"),
        }
    }
}

impl StorageAuth {
    pub fn describe(&self) -> String {
        format!("{self:?}")
    }
}

/// Reads settings through `lookup` (the environment in production, a map in tests).
/// Empty values count as unset, as in the Functions host.
pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
    let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
    let storage = storage_from_lookup(&get)?;
    let queue_name = get(QUEUE_SETTING).unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
    validate_queue_name(&queue_name).map_err(|p| err(QUEUE_SETTING, p))?;
    let history_table =
        get(HISTORY_TABLE_SETTING).unwrap_or_else(|| DEFAULT_HISTORY_TABLE.to_owned());
    validate_table_name(&history_table).map_err(|p| err(HISTORY_TABLE_SETTING, p))?;
    let log_format = match get(LOG_FORMAT_SETTING).as_deref().map(str::trim) {
        None => LogFormat::Text,
        Some(v) if v.eq_ignore_ascii_case("text") => LogFormat::Text,
        Some(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
        Some(_) => return Err(err(LOG_FORMAT_SETTING, "must be `text` or `json`")),
    };
    let chain = chain_from_lookup(&get)?;
    let release = release_from_lookup(&get)?;
    let projects = match get(PROJECTS_SETTING) {
        None => None,
        Some(v) => {
            let mut ids = Vec::new();
            for part in v
                .split([',', ';', ' '])
                .map(str::trim)
                .filter(|p| !p.is_empty())
            {
                let id = uuid::Uuid::parse_str(part).map_err(|_| {
                    err(
                        PROJECTS_SETTING,
                        format!("{part:?} is not a project id (a UUID)"),
                    )
                })?;
                ids.push(id);
            }
            if ids.is_empty() {
                return Err(err(PROJECTS_SETTING, "is set but lists no project id"));
            }
            Some(ids)
        }
    };
    let claim_seconds = match get(CLAIM_SECONDS_SETTING) {
        None => DEFAULT_CLAIM_SECONDS,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if (1..=3600).contains(&n) => n,
            _ => {
                return Err(err(
                    CLAIM_SECONDS_SETTING,
                    "must be a whole number of seconds from 1 to 3600",
                ));
            }
        },
    };
    let max_dequeue = match get(MAX_DEQUEUE_SETTING) {
        None => DEFAULT_MAX_DEQUEUE,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(err(
                    MAX_DEQUEUE_SETTING,
                    "must be a whole number from 1 to 100 (host.json's maxDequeueCount)",
                ));
            }
        },
    };
    let custom_vision = custom_vision_from_lookup(&get)?;
    if custom_vision.is_none() {
        let needs = if !chain.exports.is_empty() {
            Some(EXPORTS_SETTING)
        } else if chain.publish.is_some() {
            Some(PUBLISH_NAME_SETTING)
        } else {
            None
        };
        if let Some(by) = needs {
            return Err(err(
                CV_ENDPOINT_SETTING,
                format!(
                    "is required when {by} is set (e.g. https://<name>.cognitiveservices.azure.com)"
                ),
            ));
        }
    }
    Ok(Settings {
        storage,
        queue_name,
        history_table,
        log_format,
        custom_vision,
        chain,
        release,
        projects,
        max_dequeue,
        claim_seconds,
    })
}

fn release_from_lookup(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<ReleaseSettings, SettingsError> {
    let mut r = ReleaseSettings::default();
    if let Some(v) = get(BACKUP_CONTAINER_SETTING) {
        let url = parse_url(BACKUP_CONTAINER_SETTING, "value", &v)?;
        let container = url
            .path_segments()
            .and_then(|mut s| s.rfind(|p| !p.is_empty()))
            .unwrap_or_default()
            .to_owned();
        validate_container_name(&container).map_err(|p| {
            err(
                BACKUP_CONTAINER_SETTING,
                format!("must be a container URL such as https://<account>.blob.core.windows.net/<container>: {p}"),
            )
        })?;
        r.backup_container = Some(url);
    }
    if let Some(v) = get(RELEASE_CONTAINER_SETTING) {
        let name = v.trim().to_owned();
        validate_container_name(&name).map_err(|p| err(RELEASE_CONTAINER_SETTING, p))?;
        r.container = name;
    }
    if let Some(v) = get(RELEASE_PATH_SETTING) {
        r.template =
            crate::release::PathTemplate::parse(&v).map_err(|p| err(RELEASE_PATH_SETTING, p))?;
    }
    Ok(r)
}

/// Azure container names: 3-63 lowercase letters, digits and single hyphens.
pub fn validate_container_name(name: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid container name (3-63 lowercase letters, digits and single hyphens)"
        ))
    }
}

fn chain_from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<ChainSettings, SettingsError> {
    let exports = match get(EXPORTS_SETTING) {
        Some(v) => crate::chain::parse_chain(&v).map_err(|p| err(EXPORTS_SETTING, p))?,
        None => Vec::new(),
    };
    let publish = match (get(PUBLISH_NAME_SETTING), get(PREDICTION_RESOURCE_SETTING)) {
        (None, None) => None,
        (Some(name), Some(id)) => {
            let name = name.trim().to_owned();
            if name.chars().any(|c| c.is_whitespace() || c == '/') {
                return Err(err(PUBLISH_NAME_SETTING, "must not contain spaces or `/`"));
            }
            let id = id.trim().to_owned();
            if !id.starts_with("/subscriptions/") {
                return Err(err(
                    PREDICTION_RESOURCE_SETTING,
                    "must be the prediction resource's id (/subscriptions/…/providers/Microsoft.CognitiveServices/accounts/…)",
                ));
            }
            Some(PublishSettings {
                name,
                prediction_resource_id: id,
            })
        }
        (Some(_), None) => {
            return Err(err(
                PREDICTION_RESOURCE_SETTING,
                format!("is required when {PUBLISH_NAME_SETTING} is set"),
            ));
        }
        (None, Some(_)) => {
            return Err(err(
                PUBLISH_NAME_SETTING,
                format!("is required when {PREDICTION_RESOURCE_SETTING} is set"),
            ));
        }
    };
    Ok(ChainSettings { exports, publish })
}

fn custom_vision_from_lookup(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<CustomVisionSettings>, SettingsError> {
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
    let max_rps = match get(CV_MAX_RPS_SETTING) {
        None => DEFAULT_CV_MAX_RPS,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(err(
                    CV_MAX_RPS_SETTING,
                    "must be a whole number from 1 to 1000",
                ));
            }
        },
    };
    Ok(Some(CustomVisionSettings {
        endpoint,
        auth,
        max_rps,
    }))
}

/// Reads settings from the process environment.
pub fn from_env() -> Result<Settings, SettingsError> {
    from_lookup(&|name| std::env::var(name).ok())
}

/// The log format alone, so logging can start before the rest is validated.
pub fn log_format_from_env() -> LogFormat {
    match std::env::var(LOG_FORMAT_SETTING) {
        Ok(v) if v.trim().eq_ignore_ascii_case("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// The worker's queue settings: `CVCHAIN_WORKER_BATCH` (1-32, default 16),
/// `CVCHAIN_WORKER_VISIBILITY_SECONDS` (60), `CVCHAIN_WORKER_RETRY_SECONDS` (30),
/// `CVCHAIN_WORKER_MAX_POLL_SECONDS` (10); the last delivery is `CVCHAIN_MAX_DEQUEUE`.
pub fn worker_options(
    lookup: &dyn Fn(&str) -> Option<String>,
    max_dequeue: u32,
) -> Result<crate::worker::WorkerOptions, SettingsError> {
    let number = |name: &str, default: u64, range: std::ops::RangeInclusive<u64>| match lookup(name)
        .filter(|v| !v.trim().is_empty())
    {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                err(
                    name,
                    format!(
                        "must be a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )
            }),
    };
    let secs = std::time::Duration::from_secs;
    Ok(crate::worker::WorkerOptions {
        batch: number("CVCHAIN_WORKER_BATCH", 16, 1..=32)? as u32,
        visibility: secs(number("CVCHAIN_WORKER_VISIBILITY_SECONDS", 60, 2..=3600)?),
        retry_delay: secs(number("CVCHAIN_WORKER_RETRY_SECONDS", 30, 0..=3600)?),
        max_poll: secs(number("CVCHAIN_WORKER_MAX_POLL_SECONDS", 10, 1..=600)?),
        max_dequeue,
        drain: secs(20),
    })
}

/// The port the host told the handler to listen on.
pub fn handler_port(lookup: &dyn Fn(&str) -> Option<String>) -> Result<u16, SettingsError> {
    for name in [PORT_SETTING, LEGACY_PORT_SETTING] {
        if let Some(v) = lookup(name).filter(|v| !v.trim().is_empty()) {
            return v
                .trim()
                .parse::<u16>()
                .map_err(|_| err(name, "must be a port number (0-65535)"));
        }
    }
    Ok(DEFAULT_PORT)
}

const IDENTITY_SUFFIXES: &[&str] = &[
    "accountName",
    "blobServiceUri",
    "serviceUri",
    "queueServiceUri",
    "tableServiceUri",
    "credential",
    "clientId",
];

/// The storage connection: `CVCHAIN_STORAGE` (string or `__` settings), else `AzureWebJobsStorage`.
fn storage_from_lookup(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<StorageSettings, SettingsError> {
    for prefix in [STORAGE_SETTING, FALLBACK_STORAGE_SETTING] {
        if let Some(value) = get(prefix) {
            return parse_connection_string(prefix, &value);
        }
        if IDENTITY_SUFFIXES
            .iter()
            .any(|s| get(&format!("{prefix}__{s}")).is_some())
        {
            return identity_connection(prefix, get);
        }
    }
    Err(err(
        STORAGE_SETTING,
        format!(
            "not set (nor {FALLBACK_STORAGE_SETTING}): give a connection string \
             (`UseDevelopmentStorage=true` for Azurite) or identity-based settings \
             {STORAGE_SETTING}__blobServiceUri, __queueServiceUri and __tableServiceUri"
        ),
    ))
}

/// Parses `Key=Value;…` storage connection strings, as the Azure SDKs do.
pub fn parse_connection_string(
    setting: &str,
    value: &str,
) -> Result<StorageSettings, SettingsError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in value.split(';') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((k, v)) = part.split_once('=') else {
            return Err(err(
                setting,
                "is not a connection string (expected `Key=Value;…` pairs)",
            ));
        };
        pairs.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let find = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());

    if let Some(v) = find("usedevelopmentstorage") {
        if !v.eq_ignore_ascii_case("true") {
            return Err(err(setting, "UseDevelopmentStorage must be `true`"));
        }
        let base = match find("developmentstorageproxyuri") {
            Some(p) => parse_url(setting, "DevelopmentStorageProxyUri", &p)?,
            None => Url::parse("http://127.0.0.1").expect("static URL"),
        };
        let host = base.host_str().unwrap_or("127.0.0.1").to_owned();
        let at = |port: u16| {
            Url::parse(&format!("{}://{host}:{port}/{DEV_ACCOUNT}", base.scheme()))
                .expect("valid dev URL")
        };
        return Ok(StorageSettings {
            source: setting.to_owned(),
            blob_endpoint: at(10000),
            queue_endpoint: at(10001),
            table_endpoint: at(10002),
            auth: StorageAuth::SharedKey {
                account: DEV_ACCOUNT.to_owned(),
                key: Secret::new(DEV_ACCOUNT_KEY),
            },
        });
    }

    let account = find("accountname");
    let protocol = find("defaultendpointsprotocol").unwrap_or_else(|| "https".into());
    if !matches!(protocol.as_str(), "http" | "https") {
        return Err(err(
            setting,
            "DefaultEndpointsProtocol must be `http` or `https`",
        ));
    }
    let suffix = find("endpointsuffix").unwrap_or_else(|| "core.windows.net".into());
    let endpoint = |key: &str, service: &str| -> Result<Url, SettingsError> {
        if let Some(v) = find(&key.to_ascii_lowercase()) {
            return parse_url(setting, key, &v);
        }
        match &account {
            Some(a) => parse_url(
                setting,
                "AccountName",
                &format!("{protocol}://{a}.{service}.{suffix}"),
            ),
            None => Err(err(
                setting,
                format!("needs AccountName or {key} to know where the {service} service is"),
            )),
        }
    };
    let blob_endpoint = endpoint("BlobEndpoint", "blob")?;
    let queue_endpoint = endpoint("QueueEndpoint", "queue")?;
    let table_endpoint = endpoint("TableEndpoint", "table")?;

    let auth = if let Some(key) = find("accountkey") {
        let Some(account) = account.clone() else {
            return Err(err(setting, "has AccountKey but no AccountName"));
        };
        if base64::engine::general_purpose::STANDARD
            .decode(&key)
            .map(|k| k.is_empty())
            .unwrap_or(true)
        {
            return Err(err(
                setting,
                "AccountKey is not valid base64 (copy it again from the storage account's Access keys)",
            ));
        }
        StorageAuth::SharedKey {
            account,
            key: Secret::new(key),
        }
    } else if let Some(sas) = find("sharedaccesssignature") {
        StorageAuth::Sas {
            token: Secret::new(sas.trim_start_matches('?').to_owned()),
        }
    } else {
        return Err(err(
            setting,
            "has neither AccountKey nor SharedAccessSignature; for Microsoft Entra ID use the \
             identity-based settings (__blobServiceUri, __queueServiceUri, __tableServiceUri, __credential)",
        ));
    };
    Ok(StorageSettings {
        source: setting.to_owned(),
        blob_endpoint,
        queue_endpoint,
        table_endpoint,
        auth,
    })
}

fn identity_connection(
    prefix: &str,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<StorageSettings, SettingsError> {
    let name = |s: &str| format!("{prefix}__{s}");
    let (blob, queue, table) = if let Some(account) = get(&name("accountName")) {
        let account = account.trim().to_owned();
        if account.is_empty()
            || account.len() > 24
            || !account
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(err(
                name("accountName"),
                "must be a storage account name (3-24 lowercase letters and digits)",
            ));
        }
        let at = |svc: &str| {
            Url::parse(&format!("https://{account}.{svc}.core.windows.net")).expect("valid URL")
        };
        (at("blob"), at("queue"), at("table"))
    } else {
        let service = |suffixes: &[&str]| -> Result<Url, SettingsError> {
            for s in suffixes {
                if let Some(v) = get(&name(s)) {
                    let url = parse_url(&name(s), "value", &v)?;
                    if url.scheme() != "https" {
                        return Err(err(
                            name(s),
                            "must use https: Microsoft Entra ID tokens are only sent over https",
                        ));
                    }
                    return Ok(url);
                }
            }
            Err(err(
                name(suffixes[0]),
                format!(
                    "is required with identity-based connections (or set {})",
                    name("accountName")
                ),
            ))
        };
        (
            service(&["blobServiceUri", "serviceUri"])?,
            service(&["queueServiceUri"])?,
            service(&["tableServiceUri"])?,
        )
    };
    let client_id = get(&name("clientId")).map(|c| c.trim().to_owned());
    let source = match get(&name("credential")) {
        None => {
            if client_id.is_some() {
                return Err(err(
                    name("clientId"),
                    format!("only applies with {}=managedidentity", name("credential")),
                ));
            }
            TokenSource::Developer
        }
        Some(c) if c.trim().eq_ignore_ascii_case("managedidentity") => {
            TokenSource::ManagedIdentity { client_id }
        }
        Some(_) => {
            return Err(err(
                name("credential"),
                "must be `managedidentity` (or unset to use your developer sign-in)",
            ));
        }
    };
    Ok(StorageSettings {
        source: prefix.to_owned(),
        blob_endpoint: blob,
        queue_endpoint: queue,
        table_endpoint: table,
        auth: StorageAuth::Token(source),
    })
}

fn parse_url(setting: &str, what: &str, value: &str) -> Result<Url, SettingsError> {
    match Url::parse(value.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
            if u.query().is_some() {
                return Err(err(
                    setting,
                    format!(
                        "{what} must not carry a query string (put a SAS in SharedAccessSignature)"
                    ),
                ));
            }
            Ok(u)
        }
        _ => Err(err(setting, format!("{what} is not an http(s) URL"))),
    }
}

/// Azure queue names: 3-63 lowercase letters, digits and single hyphens; `-poison` must still fit.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !(3..=56).contains(&name.len())
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
        || name.contains("--")
    {
        return Err(format!(
            "{name:?} is not a valid queue name (3-56 lowercase letters, digits and single hyphens, \
             so that `{name}-poison` is valid too)"
        ));
    }
    Ok(())
}

/// Azure table names: a letter, then 2-62 letters or digits.
pub fn validate_table_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !(3..=63).contains(&name.len()) || !chars.all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "{name:?} is not a valid table name (a letter, then 2-62 letters or digits)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_lookup(&move |k| map.get(k).cloned())
    }

    #[test]
    fn development_storage_means_azurite_on_its_default_ports() {
        let s = settings(&[("CVCHAIN_STORAGE", "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(
            s.storage.blob_endpoint.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        assert_eq!(
            s.storage.queue_endpoint.as_str(),
            "http://127.0.0.1:10001/devstoreaccount1"
        );
        assert_eq!(
            s.storage.table_endpoint.as_str(),
            "http://127.0.0.1:10002/devstoreaccount1"
        );
        assert!(
            matches!(s.storage.auth, StorageAuth::SharedKey { ref account, .. } if account == DEV_ACCOUNT)
        );
        assert_eq!(s.queue_name, DEFAULT_QUEUE);
        assert_eq!(s.history_table, DEFAULT_HISTORY_TABLE);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn falls_back_to_azure_web_jobs_storage() {
        let s = settings(&[("AzureWebJobsStorage", "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(s.storage.source, "AzureWebJobsStorage");
        // CVCHAIN_STORAGE wins when both are set.
        let s = settings(&[
            ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
            (
                "CVCHAIN_STORAGE__blobServiceUri",
                "https://a.blob.core.windows.net",
            ),
            (
                "CVCHAIN_STORAGE__queueServiceUri",
                "https://a.queue.core.windows.net",
            ),
            (
                "CVCHAIN_STORAGE__tableServiceUri",
                "https://a.table.core.windows.net",
            ),
        ])
        .unwrap();
        assert_eq!(s.storage.source, "CVCHAIN_STORAGE");
        assert!(matches!(
            s.storage.auth,
            StorageAuth::Token(TokenSource::Developer)
        ));
    }

    #[test]
    fn account_key_connection_strings_with_and_without_endpoints() {
        let s = settings(&[(
            "CVCHAIN_STORAGE",
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net",
        )])
        .unwrap();
        assert_eq!(
            s.storage.table_endpoint.as_str(),
            "https://acct.table.core.windows.net/"
        );
        let s = settings(&[(
            "CVCHAIN_STORAGE",
            "AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:5000/devstoreaccount1;QueueEndpoint=http://127.0.0.1:5001/devstoreaccount1;TableEndpoint=http://127.0.0.1:5002/devstoreaccount1;",
        )])
        .unwrap();
        assert_eq!(
            s.storage.queue_endpoint.as_str(),
            "http://127.0.0.1:5001/devstoreaccount1"
        );
    }

    #[test]
    fn identity_settings_build_token_auth() {
        let s = settings(&[
            ("CVCHAIN_STORAGE__accountName", "prodmodels"),
            ("CVCHAIN_STORAGE__credential", "managedidentity"),
            (
                "CVCHAIN_STORAGE__clientId",
                "11111111-2222-3333-4444-555555555555",
            ),
        ])
        .unwrap();
        assert_eq!(
            s.storage.blob_endpoint.as_str(),
            "https://prodmodels.blob.core.windows.net/"
        );
        assert_eq!(
            s.storage.auth.describe(),
            r#"Token(ManagedIdentity { client_id: Some("11111111-2222-3333-4444-555555555555") })"#
        );
    }

    #[test]
    fn each_error_names_the_wrong_setting() {
        type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (vec![], "CVCHAIN_STORAGE", "not set"),
            (
                vec![("CVCHAIN_STORAGE", "garbage")],
                "CVCHAIN_STORAGE",
                "not a connection string",
            ),
            (
                vec![(
                    "CVCHAIN_STORAGE",
                    "AccountName=a;AccountKey=***notbase64***",
                )],
                "CVCHAIN_STORAGE",
                "AccountKey is not valid base64",
            ),
            (
                vec![("CVCHAIN_STORAGE", "AccountName=a")],
                "CVCHAIN_STORAGE",
                "neither AccountKey nor SharedAccessSignature",
            ),
            (
                vec![("CVCHAIN_STORAGE", "AccountKey=a2V5;BlobEndpoint=http://x")],
                "CVCHAIN_STORAGE",
                "QueueEndpoint",
            ),
            (
                vec![(
                    "CVCHAIN_STORAGE",
                    "AccountName=a;AccountKey=a2V5;BlobEndpoint=nope",
                )],
                "CVCHAIN_STORAGE",
                "BlobEndpoint is not an http(s) URL",
            ),
            (
                vec![(
                    "CVCHAIN_STORAGE__blobServiceUri",
                    "https://a.blob.core.windows.net",
                )],
                "CVCHAIN_STORAGE__queueServiceUri",
                "is required",
            ),
            (
                vec![(
                    "CVCHAIN_STORAGE__blobServiceUri",
                    "http://a.blob.core.windows.net",
                )],
                "CVCHAIN_STORAGE__blobServiceUri",
                "must use https",
            ),
            (
                vec![
                    ("CVCHAIN_STORAGE__accountName", "acct"),
                    ("CVCHAIN_STORAGE__credential", "clientsecret"),
                ],
                "CVCHAIN_STORAGE__credential",
                "must be `managedidentity`",
            ),
            (
                vec![("CVCHAIN_STORAGE__accountName", "Bad_Name")],
                "CVCHAIN_STORAGE__accountName",
                "storage account name",
            ),
            (
                vec![
                    ("CVCHAIN_STORAGE", "UseDevelopmentStorage=true"),
                    ("CVCHAIN_QUEUE", "Bad_Queue"),
                ],
                "CVCHAIN_QUEUE",
                "not a valid queue name",
            ),
            (
                vec![
                    ("CVCHAIN_STORAGE", "UseDevelopmentStorage=true"),
                    ("CVCHAIN_HISTORY_TABLE", "1table"),
                ],
                "CVCHAIN_HISTORY_TABLE",
                "not a valid table name",
            ),
            (
                vec![
                    ("CVCHAIN_STORAGE", "UseDevelopmentStorage=true"),
                    ("CVCHAIN_LOG_FORMAT", "xml"),
                ],
                "CVCHAIN_LOG_FORMAT",
                "`text` or `json`",
            ),
        ];
        for (vars, setting, problem) in cases {
            let e = settings(&vars).expect_err(&format!("{vars:?} should fail"));
            assert_eq!(e.setting, setting, "{vars:?}: {e}");
            assert!(e.problem.contains(problem), "{vars:?}: {e}");
            assert!(e.to_string().starts_with(&format!("setting {setting}:")));
            assert!(!e.to_string().contains("***notbase64***"), "{e}");
        }
    }

    #[test]
    fn custom_vision_and_chain_settings() {
        let base = ("CVCHAIN_STORAGE", "UseDevelopmentStorage=true");
        let s = settings(&[base]).unwrap();
        assert!(s.custom_vision.is_none());
        assert_eq!(s.chain, ChainSettings::default());
        let s = settings(&[
            base,
            ("CUSTOM_VISION_ENDPOINT", "https://cv.cognitiveservices.azure.com"),
            ("CUSTOM_VISION_TRAINING_KEY", "k3y-value"),
            ("CVCHAIN_EXPORTS", "onnx, tensorflow:tensorflowlite"),
            ("CVCHAIN_PUBLISH_NAME", "prod"),
            (
                "CVCHAIN_PREDICTION_RESOURCE_ID",
                "/subscriptions/s/resourceGroups/g/providers/Microsoft.CognitiveServices/accounts/p",
            ),
        ])
        .unwrap();
        let cv = s.custom_vision.as_ref().unwrap();
        assert_eq!(cv.max_rps, 10);
        assert!(!format!("{s:?}").contains("k3y-value"));
        assert_eq!(s.chain.exports.len(), 2);
        assert_eq!(s.chain.publish.as_ref().unwrap().name, "prod");
        let s = settings(&[
            base,
            (
                "CUSTOM_VISION_ENDPOINT",
                "https://cv.cognitiveservices.azure.com",
            ),
            ("CUSTOM_VISION_CREDENTIAL", "ManagedIdentity"),
            ("CVCHAIN_CV_MAX_RPS", "5"),
        ])
        .unwrap();
        assert!(matches!(
            s.custom_vision.unwrap().auth,
            CvAuthSetting::ManagedIdentity { client_id: None }
        ));
    }

    #[test]
    fn custom_vision_errors_name_the_setting() {
        let base = ("CVCHAIN_STORAGE", "UseDevelopmentStorage=true");
        let ep = (
            "CUSTOM_VISION_ENDPOINT",
            "https://cv.cognitiveservices.azure.com",
        );
        let key = ("CUSTOM_VISION_TRAINING_KEY", "k");
        for (vars, setting) in [
            (
                vec![base, ("CVCHAIN_EXPORTS", "ONNX")],
                "CUSTOM_VISION_ENDPOINT",
            ),
            (vec![base, ep], "CUSTOM_VISION_TRAINING_KEY"),
            (
                vec![base, ep, key, ("CVCHAIN_EXPORTS", "Nope")],
                "CVCHAIN_EXPORTS",
            ),
            (
                vec![base, ep, key, ("CVCHAIN_CV_MAX_RPS", "0")],
                "CVCHAIN_CV_MAX_RPS",
            ),
            (
                vec![base, ep, ("CUSTOM_VISION_CREDENTIAL", "cli")],
                "CUSTOM_VISION_CREDENTIAL",
            ),
            (
                vec![
                    base,
                    ("CUSTOM_VISION_ENDPOINT", "http://x"),
                    ("CUSTOM_VISION_CREDENTIAL", "managedidentity"),
                ],
                "CUSTOM_VISION_ENDPOINT",
            ),
            (
                vec![base, ep, key, ("CVCHAIN_PUBLISH_NAME", "p")],
                "CVCHAIN_PREDICTION_RESOURCE_ID",
            ),
            (
                vec![
                    base,
                    ep,
                    key,
                    ("CVCHAIN_PREDICTION_RESOURCE_ID", "/subscriptions/x"),
                ],
                "CVCHAIN_PUBLISH_NAME",
            ),
            (
                vec![
                    base,
                    ep,
                    key,
                    ("CVCHAIN_PUBLISH_NAME", "p"),
                    ("CVCHAIN_PREDICTION_RESOURCE_ID", "x"),
                ],
                "CVCHAIN_PREDICTION_RESOURCE_ID",
            ),
        ] {
            let e = settings(&vars).expect_err(&format!("{vars:?}"));
            assert_eq!(e.setting, setting, "{vars:?}: {e}");
        }
    }

    #[test]
    fn release_settings_are_validated() {
        let base = ("CVCHAIN_STORAGE", "UseDevelopmentStorage=true");
        let s = settings(&[base]).unwrap();
        assert_eq!(s.release, ReleaseSettings::default());
        assert_eq!(s.release.container, "models");
        let s = settings(&[
            base,
            (
                "CVCHAIN_BACKUP_CONTAINER",
                "http://127.0.0.1:10000/devstoreaccount1/cvbackups",
            ),
            ("CVCHAIN_RELEASE_CONTAINER", "releases"),
            (
                "CVCHAIN_RELEASE_PATH",
                "{projectId}/{iterationId}/{platform}-{flavor}.bin",
            ),
        ])
        .unwrap();
        assert_eq!(s.release.container, "releases");
        assert!(s.release.backup_container.is_some());
        for (vars, setting) in [
            (
                vec![
                    base,
                    (
                        "CVCHAIN_BACKUP_CONTAINER",
                        "https://a.blob.core.windows.net/",
                    ),
                ],
                "CVCHAIN_BACKUP_CONTAINER",
            ),
            (
                vec![
                    base,
                    (
                        "CVCHAIN_BACKUP_CONTAINER",
                        "https://a.blob.core.windows.net/c?sv=1",
                    ),
                ],
                "CVCHAIN_BACKUP_CONTAINER",
            ),
            (
                vec![base, ("CVCHAIN_RELEASE_CONTAINER", "Models")],
                "CVCHAIN_RELEASE_CONTAINER",
            ),
            (
                vec![base, ("CVCHAIN_RELEASE_PATH", "{projectName}/{platform}")],
                "CVCHAIN_RELEASE_PATH",
            ),
        ] {
            let e = settings(&vars).expect_err(&format!("{vars:?}"));
            assert_eq!(e.setting, setting, "{e}");
        }
    }

    #[test]
    fn allow_list_and_max_dequeue() {
        let base = ("CVCHAIN_STORAGE", "UseDevelopmentStorage=true");
        let s = settings(&[base]).unwrap();
        assert_eq!((s.projects, s.max_dequeue), (None, 5));
        let s = settings(&[
            base,
            (
                "CVCHAIN_PROJECTS",
                "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f, 3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d",
            ),
            ("CVCHAIN_MAX_DEQUEUE", "3"),
        ])
        .unwrap();
        assert_eq!(s.projects.unwrap().len(), 2);
        assert_eq!(s.max_dequeue, 3);
        for (vars, setting) in [
            (
                vec![base, ("CVCHAIN_PROJECTS", "widgets")],
                "CVCHAIN_PROJECTS",
            ),
            (vec![base, ("CVCHAIN_PROJECTS", ", ,")], "CVCHAIN_PROJECTS"),
            (
                vec![base, ("CVCHAIN_MAX_DEQUEUE", "0")],
                "CVCHAIN_MAX_DEQUEUE",
            ),
        ] {
            assert_eq!(settings(&vars).unwrap_err().setting, setting);
        }
    }

    #[test]
    fn handler_port_comes_from_the_host() {
        assert_eq!(handler_port(&|_| None).unwrap(), DEFAULT_PORT);
        assert_eq!(
            handler_port(&|k| (k == PORT_SETTING).then(|| "4711".to_owned())).unwrap(),
            4711
        );
        assert_eq!(
            handler_port(&|k| (k == "FUNCTIONS_HTTPWORKER_PORT").then(|| "4712".to_owned()))
                .unwrap(),
            4712
        );
        let e = handler_port(&|k| (k == PORT_SETTING).then(|| "http".to_owned())).unwrap_err();
        assert_eq!(e.setting, PORT_SETTING);
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let s = settings(&[(
            "CVCHAIN_STORAGE",
            "AccountName=acct;AccountKey=c2VjcmV0a2V5",
        )])
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("c2VjcmV0a2V5"), "{shown}");
    }
}
