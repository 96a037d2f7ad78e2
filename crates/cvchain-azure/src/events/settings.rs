//! The event sinks' settings, validated at start: each error names the setting and never quotes
//! a secret.

use azure_core::credentials::Secret;
use cvchain_core::config::{SettingsError, Vars};
use cvchain_core::events::{
    Routing, SOURCE_SETTING, Sink,
    chat::{CHAT_EVENTS_SETTING, CONSOLE_URL_SETTING, ChatSelection},
    delivery::RetryPolicy,
    webhook,
    wire::{EventGridKind, QUEUE_ENCODING_SETTING, QueueEncoding},
};
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
pub const TEAMS_URL_SETTING: &str = "CVCHAIN_TEAMS_WEBHOOK_URL";
pub const SLACK_URL_SETTING: &str = "CVCHAIN_SLACK_WEBHOOK_URL";
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

impl EventGridSettings {
    /// A custom topic or a namespace topic: told by the endpoint's path.
    pub fn kind(&self) -> EventGridKind {
        EventGridKind::of_path(self.endpoint.path())
    }
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
    /// `CVCHAIN_EVENTS_QUEUE_ENCODING`: base64 (what a default queue trigger reads) or none.
    pub queue_encoding: QueueEncoding,
    pub event_grid: Option<EventGridSettings>,
    pub webhook: Option<WebhookSettings>,
    /// A Teams Workflows webhook: its URL carries its key (`sig=` in the query), never shown.
    pub teams: Option<Url>,
    /// A Slack incoming webhook: its URL's path is its key, never shown.
    pub slack: Option<Url>,
    /// `CVCHAIN_CHAT_EVENTS`: which events Teams and Slack are told.
    pub chat_events: ChatSelection,
    /// `CVCHAIN_CONSOLE_URL`, without a trailing `/`: chat messages link to a project's page.
    pub console: Option<Url>,
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
            .field("teams", &self.teams.as_ref().map(display_url))
            .field("slack", &self.slack.as_ref().map(display_url))
            .field("chat_events", &self.chat_events.describe())
            .field("console", &self.console.as_ref().map(display_url))
            .field("source", &self.source)
            .finish()
    }
}

/// A URL as logs and rows may show it: without its query (where keys live, a Teams Workflows
/// URL's `sig=` among them) or user info, and with the key of a Slack incoming webhook's path
/// (`/services/<team>/<bot>/<key>`, on any host, so a local receiver is shown the same way)
/// withheld.
pub fn display_url(url: &Url) -> String {
    let shown = cvchain_core::redact::url_without_secrets(url.as_str());
    match slack_key(url) {
        Some(key) => match Url::parse(&shown) {
            Ok(mut u) => {
                let path = u.path().replacen(key, cvchain_core::redact::REDACTED, 1);
                u.set_path(&path);
                u.to_string()
            }
            Err(_) => shown.replace(key, cvchain_core::redact::REDACTED),
        },
        None => shown,
    }
}

/// The key of a Slack incoming webhook's URL: what follows `/services/<team>/<bot>/`.
pub fn slack_key(url: &Url) -> Option<&str> {
    let path = url.path();
    let rest = path.strip_prefix("/services/")?;
    let mut parts = rest.splitn(3, '/');
    let (_team, _bot, key) = (parts.next()?, parts.next()?, parts.next()?);
    (!key.is_empty()).then_some(key)
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
pub fn endpoint_url(setting: &str, value: &str) -> Result<Url, SettingsError> {
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
        let queue_encoding = match get(QUEUE_ENCODING_SETTING) {
            None => QueueEncoding::default(),
            Some(v) => QueueEncoding::parse(&v).ok_or_else(|| {
                err(
                    QUEUE_ENCODING_SETTING,
                    "must be `base64` (what a Functions queue trigger reads by default) or `none`",
                )
            })?,
        };
        let event_grid = event_grid(vars)?;
        let teams = get(TEAMS_URL_SETTING)
            .map(|v| endpoint_url(TEAMS_URL_SETTING, &v))
            .transpose()?;
        let slack = match get(SLACK_URL_SETTING) {
            Some(v) => {
                let url = endpoint_url(SLACK_URL_SETTING, &v)?;
                if slack_key(&url).is_none() {
                    return Err(err(
                        SLACK_URL_SETTING,
                        "must be a Slack incoming webhook URL (https://hooks.slack.com/services/T…/B…/…)",
                    ));
                }
                Some(url)
            }
            None => None,
        };
        let chat_events = match get(CHAT_EVENTS_SETTING) {
            Some(v) => ChatSelection::parse(&v).map_err(|p| err(CHAT_EVENTS_SETTING, p))?,
            None => ChatSelection::default(),
        };
        let console = match get(CONSOLE_URL_SETTING) {
            Some(v) => {
                let mut url = endpoint_url(CONSOLE_URL_SETTING, &v)?;
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(err(
                        CONSOLE_URL_SETTING,
                        "must carry no query or fragment: it is posted to every chat channel, so never put a function key (?code=) in it",
                    ));
                }
                let path = url.path().trim_end_matches('/').to_owned();
                url.set_path(&path);
                Some(url)
            }
            None => None,
        };
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
            queue_encoding,
            event_grid,
            webhook,
            teams,
            slack,
            chat_events,
            console,
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
        if self.teams.is_some() {
            out.push(Sink::Teams);
        }
        if self.slack.is_some() {
            out.push(Sink::Slack);
        }
        out
    }

    pub fn any(&self) -> bool {
        !self.sinks().is_empty()
    }

    /// What the core's decisions need of these settings.
    pub fn routing(&self) -> Routing {
        Routing {
            queue_encoding: self.queue_encoding,
            event_grid: self
                .event_grid
                .as_ref()
                .map(EventGridSettings::kind)
                .unwrap_or_default(),
            chat: self.chat_events.clone(),
            console: self
                .console
                .as_ref()
                .map(|u| u.as_str().trim_end_matches('/').to_owned()),
        }
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
    let kind = EventGridKind::of_path(url.path());
    if !url.query_pairs().any(|(k, _)| k == "api-version") {
        url.query_pairs_mut()
            .append_pair("api-version", kind.api_version());
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

    #[test]
    fn chat_settings_are_checked_and_their_keys_never_shown() {
        let teams = "https://prod-12.westeurope.logic.azure.com:443/workflows/0a1b/triggers/manual/paths/invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=c2lnLXNlY3JldC12YWx1ZQ";
        let slack = "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/aBcDeFgHiJkLmNoPqRsTuVwX";
        let s = settings(&[
            ("CVCHAIN_TEAMS_WEBHOOK_URL", teams),
            ("CVCHAIN_SLACK_WEBHOOK_URL", slack),
            (
                "CVCHAIN_CONSOLE_URL",
                "https://cv-app.azurewebsites.net/api/history/",
            ),
            ("CVCHAIN_CHAT_EVENTS", "gate.evaluated, channel.moved:all"),
            ("CVCHAIN_EVENTS_QUEUE", "cvchain-events"),
            ("CVCHAIN_EVENTS_QUEUE_ENCODING", "none"),
        ])
        .unwrap();
        assert_eq!(s.sinks(), [Sink::Queue, Sink::Teams, Sink::Slack]);
        let r = s.routing();
        assert_eq!(r.queue_encoding, QueueEncoding::None);
        assert_eq!(
            r.console.as_deref(),
            Some("https://cv-app.azurewebsites.net/api/history")
        );
        assert_eq!(r.chat.describe(), "gate.evaluated, channel.moved:all");
        assert_eq!(
            display_url(s.slack.as_ref().unwrap()),
            "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/REDACTED"
        );
        assert_eq!(
            display_url(s.teams.as_ref().unwrap()),
            "https://prod-12.westeurope.logic.azure.com/workflows/0a1b/triggers/manual/paths/invoke"
        );
        let shown = format!("{s:?}");
        for secret in ["c2lnLXNlY3JldC12YWx1ZQ", "aBcDeFgHiJkLmNoPqRsTuVwX"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        // Defaults: base64, the default chat events, no console.
        let d = settings(&[("CVCHAIN_SLACK_WEBHOOK_URL", slack)]).unwrap();
        assert_eq!(d.routing().queue_encoding, QueueEncoding::Base64);
        assert_eq!(d.routing().chat, ChatSelection::default());
        assert_eq!(d.routing().console, None);
        // Namespace topics: their api-version, their kind.
        let ns = settings(&[
            (
                "CVCHAIN_EVENTGRID_ENDPOINT",
                "https://ns.westeurope-1.eventgrid.azure.net/topics/cv:publish",
            ),
            ("CVCHAIN_EVENTGRID_KEY", "k"),
        ])
        .unwrap();
        assert_eq!(ns.routing().event_grid, EventGridKind::NamespaceTopic);
        for (pairs, setting) in [
            (
                vec![(
                    "CVCHAIN_TEAMS_WEBHOOK_URL",
                    "http://prod-12.logic.azure.com/workflows/x?sig=abc",
                )],
                "CVCHAIN_TEAMS_WEBHOOK_URL",
            ),
            (
                vec![(
                    "CVCHAIN_SLACK_WEBHOOK_URL",
                    "http://hooks.slack.com/services/T/B/aBcDeFgHiJkLmNoPqRsTuVwX",
                )],
                "CVCHAIN_SLACK_WEBHOOK_URL",
            ),
            (
                vec![(
                    "CVCHAIN_SLACK_WEBHOOK_URL",
                    "https://hooks.slack.com/aBcDeFgHiJkLmNoPqRsTuVwX",
                )],
                "CVCHAIN_SLACK_WEBHOOK_URL",
            ),
            (
                vec![(
                    "CVCHAIN_CONSOLE_URL",
                    "https://cv-app.azurewebsites.net/api/history?code=aBcDeFgHiJkLmNoPqRsTuVwX",
                )],
                "CVCHAIN_CONSOLE_URL",
            ),
            (
                vec![(
                    "CVCHAIN_CONSOLE_URL",
                    "http://cv-app.azurewebsites.net/api/history",
                )],
                "CVCHAIN_CONSOLE_URL",
            ),
            (
                vec![("CVCHAIN_CHAT_EVENTS", "gate.evaluted")],
                "CVCHAIN_CHAT_EVENTS",
            ),
            (
                vec![("CVCHAIN_EVENTS_QUEUE_ENCODING", "utf8")],
                "CVCHAIN_EVENTS_QUEUE_ENCODING",
            ),
        ] {
            let e = settings(&pairs).expect_err(&format!("{pairs:?}"));
            assert_eq!(e.setting, setting, "{pairs:?}: {e}");
            for secret in ["abc", "aBcDeFgHiJkLmNoPqRsTuVwX"] {
                assert!(!e.to_string().contains(secret), "{e}");
            }
        }
        // Loopback may use http, for local receivers.
        assert!(
            settings(&[
                (
                    "CVCHAIN_TEAMS_WEBHOOK_URL",
                    "http://127.0.0.1:9/workflows/x?sig=abc"
                ),
                (
                    "CVCHAIN_SLACK_WEBHOOK_URL",
                    "http://localhost:9/services/T/B/k"
                ),
                ("CVCHAIN_CONSOLE_URL", "http://127.0.0.1:7071/api/history"),
            ])
            .is_ok()
        );
    }
}
