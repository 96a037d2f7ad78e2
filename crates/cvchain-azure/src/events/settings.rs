//! The event sinks' settings, validated at start: each error names the setting and never quotes
//! a secret.

use azure_core::credentials::Secret;
use cvchain_core::config::{SettingsError, Vars};
use cvchain_core::events::{SOURCE_SETTING, Sink, delivery::RetryPolicy, webhook};
use std::time::Duration;
use url::Url;

pub const EVENTS_QUEUE_SETTING: &str = "CVCHAIN_EVENTS_QUEUE";
pub const EVENTGRID_ENDPOINT_SETTING: &str = "CVCHAIN_EVENTGRID_ENDPOINT";
pub const EVENTGRID_KEY_SETTING: &str = "CVCHAIN_EVENTGRID_KEY";
pub const EVENTGRID_CREDENTIAL_SETTING: &str = "CVCHAIN_EVENTGRID_CREDENTIAL";
pub const EVENTGRID_CLIENT_ID_SETTING: &str = "CVCHAIN_EVENTGRID_CLIENT_ID";
pub const WEBHOOK_URL_SETTING: &str = "CVCHAIN_WEBHOOK_URL";
pub const WEBHOOK_SECRET_SETTING: &str = "CVCHAIN_WEBHOOK_SECRET";
pub const RETRY_SECONDS_SETTING: &str = "CVCHAIN_EVENTS_RETRY_SECONDS";
pub const DELIVER_SECONDS_SETTING: &str = "CVCHAIN_EVENTS_DELIVER_SECONDS";
/// Event Grid's API version for custom topics (`…/api/events`).
pub const EVENTGRID_API_VERSION: &str = "2018-01-01";
/// For namespace topics (`…/topics/<name>:publish`).
pub const EVENTGRID_NAMESPACE_API_VERSION: &str = "2023-11-01";

/// How cvchain authenticates to Event Grid.
#[derive(Clone)]
pub enum EventGridAuth {
    /// The topic's access key, sent as `aeg-sas-key`.
    Key(Secret),
    /// A Microsoft Entra ID token (scope `https://eventgrid.azure.net/.default`) of the app's
    /// managed identity; needs the EventGrid Data Sender role.
    ManagedIdentity { client_id: Option<String> },
}

#[derive(Clone)]
pub struct EventGridSettings {
    /// With its `api-version`.
    pub endpoint: Url,
    pub auth: EventGridAuth,
}

#[derive(Clone)]
pub struct WebhookSettings {
    /// May carry a query (a receiver's `?code=` key): never logged or recorded with it.
    pub url: Url,
    /// The HMAC key (the bytes of the `whsec_` secret).
    pub key: Secret,
}

/// Which sinks get cvchain's events, and how.
#[derive(Clone, Default)]
pub struct EventsSettings {
    pub queue: Option<String>,
    pub event_grid: Option<EventGridSettings>,
    pub webhook: Option<WebhookSettings>,
    /// `CVCHAIN_EVENTS_SOURCE`; `None`: `/cvchain/<account>/<table>`.
    pub source: Option<String>,
    pub retry: RetryPolicy,
    /// How often `cvchain worker` delivers what is pending (`CVCHAIN_EVENTS_DELIVER_SECONDS`).
    pub deliver_every: Duration,
}

impl std::fmt::Debug for EventsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsSettings")
            .field("queue", &self.queue)
            .field(
                "event_grid",
                &self.event_grid.as_ref().map(|e| {
                    let auth = match &e.auth {
                        EventGridAuth::Key(_) => "aeg-sas-key".to_owned(),
                        EventGridAuth::ManagedIdentity { client_id } => {
                            format!("ManagedIdentity(client_id={client_id:?})")
                        }
                    };
                    (display_url(&e.endpoint), auth)
                }),
            )
            .field(
                "webhook",
                &self.webhook.as_ref().map(|w| display_url(&w.url)),
            )
            .field("source", &self.source)
            .finish()
    }
}

/// A URL as logs and rows may show it: without its query (where keys live) or user info.
pub fn display_url(url: &Url) -> String {
    cvchain_core::redact::url_without_secrets(url.as_str())
}

fn err(setting: &str, problem: impl Into<String>) -> SettingsError {
    SettingsError::new(setting, problem)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// An https URL (http only on the loopback interface, for local runs), without user info.
fn endpoint_url(setting: &str, value: &str) -> Result<Url, SettingsError> {
    let url = Url::parse(value.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| err(setting, "is not an http(s) URL"))?;
    if url.scheme() == "http" && !is_loopback(&url) {
        return Err(err(
            setting,
            "must use https (http only for 127.0.0.1, ::1 or localhost)",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(err(setting, "must not carry a user name or password"));
    }
    Ok(url)
}

impl EventsSettings {
    pub fn from_vars(vars: &Vars) -> Result<Self, SettingsError> {
        let get = |name: &str| vars.get(name);
        let queue = match get(EVENTS_QUEUE_SETTING) {
            Some(q) => {
                let q = q.trim().to_owned();
                crate::storage::settings::validate_queue_name(&q)
                    .map_err(|p| err(EVENTS_QUEUE_SETTING, p))?;
                Some(q)
            }
            None => None,
        };
        let event_grid = event_grid(vars)?;
        let webhook = match (get(WEBHOOK_URL_SETTING), get(WEBHOOK_SECRET_SETTING)) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(err(
                    WEBHOOK_URL_SETTING,
                    format!("is required when {WEBHOOK_SECRET_SETTING} is set"),
                ));
            }
            (Some(_), None) => {
                return Err(err(
                    WEBHOOK_SECRET_SETTING,
                    format!(
                        "is required with {WEBHOOK_URL_SETTING}: a Standard Webhooks secret ({}…)",
                        webhook::SECRET_PREFIX
                    ),
                ));
            }
            (Some(url), Some(secret)) => {
                let url = endpoint_url(WEBHOOK_URL_SETTING, &url)?;
                let key =
                    webhook::parse_secret(&secret).map_err(|p| err(WEBHOOK_SECRET_SETTING, p))?;
                Some(WebhookSettings {
                    url,
                    key: Secret::new(base64_of(&key)),
                })
            }
        };
        let source = match get(SOURCE_SETTING) {
            Some(s) if s.trim().chars().any(char::is_whitespace) || s.trim().is_empty() => {
                return Err(err(
                    SOURCE_SETTING,
                    "must be a URI reference without spaces (e.g. /cvchain/prod)",
                ));
            }
            Some(s) => Some(s.trim().to_owned()),
            None => None,
        };
        let first = vars.number(RETRY_SECONDS_SETTING, 5, 1..=3600, " of seconds", "")?;
        let deliver = vars.number(DELIVER_SECONDS_SETTING, 60, 1..=3600, " of seconds", "")?;
        Ok(Self {
            queue,
            event_grid,
            webhook,
            source,
            retry: RetryPolicy {
                first: Duration::from_secs(first),
                ..Default::default()
            },
            deliver_every: Duration::from_secs(deliver),
        })
    }

    /// The configured sinks, in a fixed order.
    pub fn sinks(&self) -> Vec<Sink> {
        let mut out = Vec::new();
        if self.queue.is_some() {
            out.push(Sink::Queue);
        }
        if self.event_grid.is_some() {
            out.push(Sink::EventGrid);
        }
        if self.webhook.is_some() {
            out.push(Sink::Webhook);
        }
        out
    }

    pub fn any(&self) -> bool {
        !self.sinks().is_empty()
    }
}

/// The HMAC key travels as a `Secret` (never printed), base64 inside.
fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn event_grid(vars: &Vars) -> Result<Option<EventGridSettings>, SettingsError> {
    let get = |name: &str| vars.get(name);
    let endpoint = get(EVENTGRID_ENDPOINT_SETTING);
    let key = get(EVENTGRID_KEY_SETTING);
    let credential = get(EVENTGRID_CREDENTIAL_SETTING);
    let Some(endpoint) = endpoint else {
        if key.is_some() || credential.is_some() {
            return Err(err(
                EVENTGRID_ENDPOINT_SETTING,
                format!(
                    "is required when {EVENTGRID_KEY_SETTING} or {EVENTGRID_CREDENTIAL_SETTING} is set"
                ),
            ));
        }
        return Ok(None);
    };
    let mut url = endpoint_url(EVENTGRID_ENDPOINT_SETTING, &endpoint)?;
    if url.query_pairs().any(|(k, _)| k != "api-version") {
        return Err(err(
            EVENTGRID_ENDPOINT_SETTING,
            format!(
                "must carry no query but api-version (the key goes in {EVENTGRID_KEY_SETTING})"
            ),
        ));
    }
    if !url.query_pairs().any(|(k, _)| k == "api-version") {
        let version = if url.path().ends_with(":publish") {
            EVENTGRID_NAMESPACE_API_VERSION
        } else {
            EVENTGRID_API_VERSION
        };
        url.query_pairs_mut().append_pair("api-version", version);
    }
    let auth = match (key, credential) {
        (Some(_), Some(_)) => {
            return Err(err(
                EVENTGRID_CREDENTIAL_SETTING,
                format!(
                    "set either {EVENTGRID_KEY_SETTING} or {EVENTGRID_CREDENTIAL_SETTING}, not both"
                ),
            ));
        }
        (Some(k), None) => EventGridAuth::Key(Secret::new(k.trim().to_owned())),
        (None, Some(c)) if c.trim().eq_ignore_ascii_case("managedidentity") => {
            if url.scheme() != "https" {
                return Err(err(
                    EVENTGRID_ENDPOINT_SETTING,
                    "must use https with Microsoft Entra ID",
                ));
            }
            EventGridAuth::ManagedIdentity {
                client_id: get(EVENTGRID_CLIENT_ID_SETTING).map(|c| c.trim().to_owned()),
            }
        }
        (None, Some(_)) => {
            return Err(err(
                EVENTGRID_CREDENTIAL_SETTING,
                format!("must be `managedidentity` (or unset to use {EVENTGRID_KEY_SETTING})"),
            ));
        }
        (None, None) => {
            return Err(err(
                EVENTGRID_KEY_SETTING,
                format!(
                    "is required with {EVENTGRID_ENDPOINT_SETTING} (or set {EVENTGRID_CREDENTIAL_SETTING}=managedidentity)"
                ),
            ));
        }
    };
    Ok(Some(EventGridSettings {
        endpoint: url,
        auth,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<EventsSettings, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| map.get(k).cloned();
        EventsSettings::from_vars(&Vars::new(&lookup))
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn nothing_set_means_no_sinks() {
        let s = settings(&[]).unwrap();
        assert!(!s.any());
        assert_eq!(s.retry.first, Duration::from_secs(5));
        assert_eq!(s.deliver_every, Duration::from_secs(60));
    }

    #[test]
    fn every_sink_at_once() {
        let s = settings(&[
            ("CVCHAIN_EVENTS_QUEUE", "cvchain-events"),
            (
                "CVCHAIN_EVENTGRID_ENDPOINT",
                "https://t.westeurope-1.eventgrid.azure.net/api/events",
            ),
            ("CVCHAIN_EVENTGRID_KEY", "egkey123"),
            (
                "CVCHAIN_WEBHOOK_URL",
                "https://hooks.example.com/cv?code=abc",
            ),
            ("CVCHAIN_WEBHOOK_SECRET", SECRET),
            ("CVCHAIN_EVENTS_SOURCE", "/cvchain/prod"),
        ])
        .unwrap();
        assert_eq!(s.sinks(), [Sink::Queue, Sink::EventGrid, Sink::Webhook]);
        assert_eq!(
            s.event_grid.as_ref().unwrap().endpoint.as_str(),
            "https://t.westeurope-1.eventgrid.azure.net/api/events?api-version=2018-01-01"
        );
        let shown = format!("{s:?}");
        for secret in ["egkey123", "MfKQ9r8", "code=abc"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let ns = settings(&[
            (
                "CVCHAIN_EVENTGRID_ENDPOINT",
                "https://ns.westeurope-1.eventgrid.azure.net/topics/cv:publish",
            ),
            ("CVCHAIN_EVENTGRID_CREDENTIAL", "ManagedIdentity"),
        ])
        .unwrap();
        assert!(
            ns.event_grid
                .unwrap()
                .endpoint
                .as_str()
                .ends_with(":publish?api-version=2023-11-01")
        );
    }

    #[test]
    fn each_mistake_names_its_setting_and_no_secret() {
        let hook = ("CVCHAIN_WEBHOOK_URL", "https://h.example.com/x");
        for (pairs, setting) in [
            (
                vec![("CVCHAIN_EVENTS_QUEUE", "Bad_Queue")],
                "CVCHAIN_EVENTS_QUEUE",
            ),
            (vec![hook], "CVCHAIN_WEBHOOK_SECRET"),
            (
                vec![("CVCHAIN_WEBHOOK_SECRET", SECRET)],
                "CVCHAIN_WEBHOOK_URL",
            ),
            (
                vec![
                    hook,
                    ("CVCHAIN_WEBHOOK_SECRET", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                ],
                "CVCHAIN_WEBHOOK_SECRET",
            ),
            (
                vec![
                    ("CVCHAIN_WEBHOOK_URL", "http://hooks.example.com/x"),
                    ("CVCHAIN_WEBHOOK_SECRET", SECRET),
                ],
                "CVCHAIN_WEBHOOK_URL",
            ),
            (
                vec![(
                    "CVCHAIN_EVENTGRID_ENDPOINT",
                    "https://t.eventgrid.azure.net/api/events",
                )],
                "CVCHAIN_EVENTGRID_KEY",
            ),
            (
                vec![("CVCHAIN_EVENTGRID_KEY", "k")],
                "CVCHAIN_EVENTGRID_ENDPOINT",
            ),
            (
                vec![
                    (
                        "CVCHAIN_EVENTGRID_ENDPOINT",
                        "https://t.eventgrid.azure.net/api/events?aeg-sas-key=k",
                    ),
                    ("CVCHAIN_EVENTGRID_KEY", "k"),
                ],
                "CVCHAIN_EVENTGRID_ENDPOINT",
            ),
            (
                vec![
                    (
                        "CVCHAIN_EVENTGRID_ENDPOINT",
                        "https://t.eventgrid.azure.net/api/events",
                    ),
                    ("CVCHAIN_EVENTGRID_CREDENTIAL", "cli"),
                ],
                "CVCHAIN_EVENTGRID_CREDENTIAL",
            ),
            (
                vec![("CVCHAIN_EVENTS_SOURCE", "a b")],
                "CVCHAIN_EVENTS_SOURCE",
            ),
            (
                vec![("CVCHAIN_EVENTS_RETRY_SECONDS", "0")],
                "CVCHAIN_EVENTS_RETRY_SECONDS",
            ),
        ] {
            let e = settings(&pairs).expect_err(&format!("{pairs:?}"));
            assert_eq!(e.setting, setting, "{pairs:?}: {e}");
            assert!(!e.to_string().contains("MfKQ9r8"), "{e}");
        }
        // Loopback may use http, for local receivers.
        assert!(
            settings(&[
                ("CVCHAIN_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
                ("CVCHAIN_WEBHOOK_SECRET", SECRET)
            ])
            .is_ok()
        );
    }
}
