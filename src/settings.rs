//! Settings, assembled: each part parses its own (the storage connection in
//! `cvchain_azure::storage::settings`, Custom Vision in `cvchain_azure::customvision`, the chain
//! in `cvchain_core::config`, the worker's options in [`crate::worker`]); this module reads the
//! rest and checks how they fit together. Settings come from the environment, with the names
//! Azure Functions uses, validated once at start; every error names the setting that is wrong and
//! never quotes a secret.

use cvchain_azure::customvision::{CV_ENDPOINT_SETTING, CustomVisionSettings};
use cvchain_azure::events::settings::EventsSettings;
use cvchain_azure::storage::settings::{
    StorageSettings, validate_container_name, validate_queue_name, validate_table_name,
};
use cvchain_core::config::{
    ChainSettings, EXPORTS_SETTING, LifecycleSettings, PUBLISH_NAME_SETTING, ReleaseSettings,
    SettingsError, Vars, parse_url,
};
use cvchain_core::release::PathTemplate;

pub const QUEUE_SETTING: &str = "CVCHAIN_QUEUE";
pub const HISTORY_TABLE_SETTING: &str = "CVCHAIN_HISTORY_TABLE";
pub const LOG_FORMAT_SETTING: &str = "CVCHAIN_LOG_FORMAT";
/// The console: `off` for a read-only one.
pub const CONSOLE_ACTIONS_SETTING: &str = "CVCHAIN_CONSOLE_ACTIONS";
/// The console: what its forms' tokens are signed with.
pub const CONSOLE_SECRET_SETTING: &str = "CVCHAIN_CONSOLE_SECRET";
pub const PORT_SETTING: &str = "FUNCTIONS_CUSTOMHANDLER_PORT";
const LEGACY_PORT_SETTING: &str = "FUNCTIONS_HTTPWORKER_PORT";
pub const BACKUP_CONTAINER_SETTING: &str = "CVCHAIN_BACKUP_CONTAINER";
pub const RELEASE_CONTAINER_SETTING: &str = "CVCHAIN_RELEASE_CONTAINER";
pub const RELEASE_PATH_SETTING: &str = "CVCHAIN_RELEASE_PATH";
pub const PROJECTS_SETTING: &str = "CVCHAIN_PROJECTS";
pub const MAX_DEQUEUE_SETTING: &str = "CVCHAIN_MAX_DEQUEUE";
pub const CLAIM_SECONDS_SETTING: &str = "CVCHAIN_CLAIM_SECONDS";
/// How long a claim lasts: longer than a request or a copy takes, short enough that a crashed
/// instance's claim does not hold a chain up for long (the retries of host.json outlast it).
pub const DEFAULT_CLAIM_SECONDS: u64 = 60;
/// The same as host.json's `maxDequeueCount`.
pub const DEFAULT_MAX_DEQUEUE: u32 = 5;
pub const DEFAULT_QUEUE: &str = "customvision-notifications";
pub const DEFAULT_HISTORY_TABLE: &str = "CustomVisionHistory";
/// Used by `cvchain serve` when no host gave it a port.
pub const DEFAULT_PORT: u16 = 8080;

fn err(setting: impl Into<String>, problem: impl Into<String>) -> SettingsError {
    SettingsError::new(setting, problem)
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
    /// The gate, the channels and retention.
    pub lifecycle: LifecycleSettings,
    /// `CVCHAIN_PROJECTS`: only these projects are acted on; `None` means all.
    pub projects: Option<Vec<uuid::Uuid>>,
    /// The delivery at which the host gives up on a message (its `maxDequeueCount`).
    pub max_dequeue: u32,
    /// How long a claim on an export request or a copy lasts.
    pub claim_seconds: u64,
    /// Where outbound events go (none configured: no event is recorded).
    pub events: EventsSettings,
    /// The console's actions and the key its forms are signed with.
    pub console: ConsoleSettings,
}

/// `CVCHAIN_CONSOLE_ACTIONS` and `CVCHAIN_CONSOLE_SECRET`.
#[derive(Clone)]
pub struct ConsoleSettings {
    /// The page offers its forms and takes their posts.
    pub actions: bool,
    /// What the forms' tokens are signed with, shared by every instance.
    pub secret: Option<String>,
}

impl std::fmt::Debug for ConsoleSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSettings")
            .field("actions", &self.actions)
            .field("secret", &self.secret.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            actions: true,
            secret: None,
        }
    }
}

impl ConsoleSettings {
    pub fn from_vars(vars: &Vars) -> Result<Self, SettingsError> {
        let actions = match vars.get(CONSOLE_ACTIONS_SETTING).as_deref().map(str::trim) {
            None => true,
            Some(v)
                if ["on", "true", "1"]
                    .iter()
                    .any(|x| v.eq_ignore_ascii_case(x)) =>
            {
                true
            }
            Some(v)
                if ["off", "false", "0"]
                    .iter()
                    .any(|x| v.eq_ignore_ascii_case(x)) =>
            {
                false
            }
            Some(_) => {
                return Err(SettingsError::new(
                    CONSOLE_ACTIONS_SETTING,
                    "must be `on` or `off` (off: a read-only console)",
                ));
            }
        };
        let secret = vars
            .get(CONSOLE_SECRET_SETTING)
            .map(|s| s.trim().to_owned());
        if let Some(s) = &secret
            && s.len() < 16
        {
            return Err(SettingsError::new(
                CONSOLE_SECRET_SETTING,
                "must be at least 16 characters (random text the instances share)",
            ));
        }
        Ok(Self { actions, secret })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Settings {
    /// Reads settings through `lookup` (the environment in production, a map in tests).
    /// Empty values count as unset, as in the Functions host.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let vars = Vars::new(lookup);
        let get = |name: &str| vars.get(name);
        let storage = StorageSettings::from_vars(&vars)?;
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
        let chain = ChainSettings::from_vars(&vars)?;
        let release = release_from_vars(&vars)?;
        let mut lifecycle = LifecycleSettings::from_vars(&vars)?;
        // A manifest's release paths are checked against the release template.
        lifecycle.channels.release = release.template.clone();
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
        let claim_seconds = vars.number(
            CLAIM_SECONDS_SETTING,
            DEFAULT_CLAIM_SECONDS,
            1..=3600,
            " of seconds",
            "",
        )?;
        let max_dequeue = vars.number(
            MAX_DEQUEUE_SETTING,
            DEFAULT_MAX_DEQUEUE.into(),
            1..=100,
            "",
            " (host.json's maxDequeueCount)",
        )? as u32;
        let custom_vision = CustomVisionSettings::from_vars(&vars)?;
        let events = EventsSettings::from_vars(&vars)?;
        let console = ConsoleSettings::from_vars(&vars)?;
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
            lifecycle,
            projects,
            max_dequeue,
            claim_seconds,
            events,
            console,
        })
    }

    /// Reads settings from the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }
}

fn release_from_vars(vars: &Vars) -> Result<ReleaseSettings, SettingsError> {
    let mut r = ReleaseSettings::default();
    if let Some(v) = vars.get(BACKUP_CONTAINER_SETTING) {
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
    if let Some(v) = vars.get(RELEASE_CONTAINER_SETTING) {
        let name = v.trim().to_owned();
        validate_container_name(&name).map_err(|p| err(RELEASE_CONTAINER_SETTING, p))?;
        r.container = name;
    }
    if let Some(v) = vars.get(RELEASE_PATH_SETTING) {
        r.template = PathTemplate::parse(&v).map_err(|p| err(RELEASE_PATH_SETTING, p))?;
    }
    Ok(r)
}

/// The log format alone, so logging can start before the rest is validated.
pub fn log_format_from_env() -> LogFormat {
    match std::env::var(LOG_FORMAT_SETTING) {
        Ok(v) if v.trim().eq_ignore_ascii_case("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use cvchain_azure::customvision::CvAuthSetting;
    use cvchain_azure::storage::settings::{DEV_ACCOUNT, StorageAuth};
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(&move |k| map.get(k).cloned())
    }

    #[test]
    fn the_console_is_on_unless_switched_off_and_its_secret_is_never_quoted() {
        let dev = ("CVCHAIN_STORAGE", "UseDevelopmentStorage=true");
        let s = settings(&[dev]).unwrap();
        assert!(s.console.actions);
        assert!(s.console.secret.is_none());
        let s = settings(&[dev, (CONSOLE_ACTIONS_SETTING, "OFF")]).unwrap();
        assert!(!s.console.actions);
        let e = settings(&[dev, (CONSOLE_ACTIONS_SETTING, "maybe")]).unwrap_err();
        assert!(e.to_string().contains(CONSOLE_ACTIONS_SETTING), "{e}");
        let e = settings(&[dev, (CONSOLE_SECRET_SETTING, "short-s3cret")]).unwrap_err();
        assert!(e.to_string().contains(CONSOLE_SECRET_SETTING), "{e}");
        assert!(!e.to_string().contains("short-s3cret"), "{e}");
        let s = settings(&[
            dev,
            (CONSOLE_SECRET_SETTING, "a-long-enough-console-s3cret"),
        ])
        .unwrap();
        assert!(!format!("{s:?}").contains("console-s3cret"));
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
    fn each_error_names_the_wrong_setting() {
        type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
        // The storage connection's own errors: cvchain-azure's storage::settings tests.
        let cases: Vec<Case> = vec![
            (vec![], "CVCHAIN_STORAGE", "not set"),
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
