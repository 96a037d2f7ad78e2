//! How each kind of sink carries an event, decided: the events queue's message encoding (what a
//! default Functions queue trigger reads) and its size as sent, and Event Grid's two endpoint
//! kinds (custom topics and namespace topics), each with its own path, `api-version`, key header
//! and limits.

use crate::message::MAX_QUEUE_MESSAGE_BYTES;
use base64::Engine as _;

/// `CVCHAIN_EVENTS_QUEUE_ENCODING`.
pub const QUEUE_ENCODING_SETTING: &str = "CVCHAIN_EVENTS_QUEUE_ENCODING";

/// How an event's JSON is put on the events queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueEncoding {
    /// Base64 of the JSON's UTF-8 bytes: what the Functions queues extension decodes by
    /// default (`messageEncoding: base64`) and what Microsoft's SDK samples write for Functions.
    /// A default trigger sends any other text to `<queue>-poison` without running.
    #[default]
    Base64,
    /// The JSON as it is, for a trigger set to `messageEncoding: none` (or a reader that does
    /// not decode). Characters XML 1.0 cannot carry are written as JSON escapes, so the text
    /// stays the same JSON value.
    None,
}

impl QueueEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueEncoding::Base64 => "base64",
            QueueEncoding::None => "none",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [QueueEncoding::Base64, QueueEncoding::None]
            .into_iter()
            .find(|e| e.as_str().eq_ignore_ascii_case(text.trim()))
    }

    /// The message text for an event's JSON.
    pub fn encode(self, json: &str) -> String {
        match self {
            QueueEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(json),
            QueueEncoding::None => xml_safe_json(json),
        }
    }

    /// The size of the message `json` makes, as the request carries it: base64 grows it by
    /// 4/3; text goes inside XML, where `&`, `<`, `>` are 4 to 5 bytes and quotes 6 (as
    /// `message::fits_queue_message` counts the poison copy).
    pub fn sent_size(self, json: &str) -> usize {
        match self {
            QueueEncoding::Base64 => json.len().div_ceil(3) * 4,
            QueueEncoding::None => xml_safe_json(json)
                .chars()
                .map(|c| match c {
                    '&' | '<' | '>' => 5,
                    '"' | '\'' => 6,
                    c => c.len_utf8(),
                })
                .sum(),
        }
    }

    /// A queue message's limit, as sent.
    pub const MAX_MESSAGE: usize = MAX_QUEUE_MESSAGE_BYTES;
}

/// `json` with the characters XML 1.0 cannot carry (U+FFFE, U+FFFF; serde_json escapes the
/// control characters already) written as `\uXXXX`: they occur only inside JSON strings, where
/// the escape means the same character.
pub fn xml_safe_json(json: &str) -> String {
    if crate::message::xml_safe(json) {
        return json.to_owned();
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if crate::message::xml_safe(c.encode_utf8(&mut [0; 4])) {
            out.push(c);
        } else {
            out.push_str(&format!("\\u{:04x}", c as u32));
        }
    }
    out
}

/// The two kinds of Event Grid endpoint, told apart by their path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EventGridKind {
    /// `https://<topic>.<region>-1.eventgrid.azure.net/api/events`: a custom topic (Event Grid
    /// basic) with the CloudEvents v1.0 input schema.
    #[default]
    CustomTopic,
    /// `https://<namespace>.<region>-1.eventgrid.azure.net/topics/<topic>:publish`: a topic of
    /// an Event Grid namespace.
    NamespaceTopic,
}

/// What one Event Grid request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventGridLimits {
    pub max_event_bytes: usize,
    pub max_request_bytes: usize,
    pub max_events: usize,
}

/// Events per Event Grid request cvchain sends: a request's delivery states are then saved in
/// one table transaction (at most 100 writes), so a request is delivered and recorded as one.
pub const EVENTS_PER_TRANSACTION: usize = 100;

impl EventGridKind {
    /// The kind of endpoint a URL path names: `…/topics/<name>:publish` is a namespace topic;
    /// anything else is taken for a custom topic (`/api/events`), as before namespaces.
    pub fn of_path(path: &str) -> Self {
        let mut segments = path.trim_end_matches('/').rsplit('/');
        let last = segments.next().unwrap_or_default();
        let parent = segments.next().unwrap_or_default();
        match last.strip_suffix(":publish") {
            Some(name) if !name.is_empty() && parent.eq_ignore_ascii_case("topics") => {
                EventGridKind::NamespaceTopic
            }
            _ => EventGridKind::CustomTopic,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            EventGridKind::CustomTopic => "custom topic",
            EventGridKind::NamespaceTopic => "namespace topic",
        }
    }

    /// The `api-version` the kind's publish operation is documented with.
    pub fn api_version(self) -> &'static str {
        match self {
            EventGridKind::CustomTopic => "2018-01-01",
            EventGridKind::NamespaceTopic => "2023-11-01",
        }
    }

    /// The header that carries an access key: `aeg-sas-key: <key>` for a custom topic,
    /// `Authorization: SharedAccessKey <key>` for a namespace topic (as Microsoft's SDKs send
    /// it). Name and value; the value is a secret.
    pub fn key_header(self, key: &str) -> (&'static str, String) {
        match self {
            EventGridKind::CustomTopic => ("aeg-sas-key", key.to_owned()),
            EventGridKind::NamespaceTopic => ("authorization", format!("SharedAccessKey {key}")),
        }
    }

    /// The service's limits, and at most [`EVENTS_PER_TRANSACTION`] events per request.
    pub fn limits(self) -> EventGridLimits {
        match self {
            // 1 MB per event and per request.
            EventGridKind::CustomTopic => EventGridLimits {
                max_event_bytes: 1_000_000,
                max_request_bytes: 1_000_000,
                max_events: EVENTS_PER_TRANSACTION,
            },
            // 1 MB per event and per request, 1,000 events per request.
            EventGridKind::NamespaceTopic => EventGridLimits {
                max_event_bytes: 1_000_000,
                max_request_bytes: 1_000_000,
                max_events: EVENTS_PER_TRANSACTION.min(1_000),
            },
        }
    }

    /// What `cvchain check` says it detected.
    pub fn explain(self) -> String {
        let auth = match self {
            EventGridKind::CustomTopic => "aeg-sas-key",
            EventGridKind::NamespaceTopic => "Authorization: SharedAccessKey",
        };
        format!(
            "{} (api-version {}, a key goes in {auth})",
            self.describe(),
            self.api_version()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_what_a_default_trigger_decodes_and_none_stays_json() {
        let json = r#"{"a":"ü<&>'","b":"x"}"#;
        let b64 = QueueEncoding::Base64.encode(json);
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&b64)
                .unwrap(),
            json.as_bytes()
        );
        assert_eq!(QueueEncoding::None.encode(json), json);
        // A character XML cannot carry is escaped inside its string: the same JSON value.
        let odd = serde_json::json!({"name": "a\u{FFFE}b\u{FFFF}"}).to_string();
        let sent = QueueEncoding::None.encode(&odd);
        assert!(crate::message::xml_safe(&sent), "{sent}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&sent).unwrap(),
            serde_json::from_str::<serde_json::Value>(&odd).unwrap()
        );
        assert_eq!(QueueEncoding::parse(" NONE "), Some(QueueEncoding::None));
        assert_eq!(QueueEncoding::parse("base64"), Some(QueueEncoding::Base64));
        assert_eq!(QueueEncoding::parse("utf8"), None);
        assert_eq!(QueueEncoding::default(), QueueEncoding::Base64);
    }

    #[test]
    fn the_size_as_sent_counts_the_encoding() {
        let json = "x".repeat(49_152);
        assert_eq!(QueueEncoding::Base64.sent_size(&json), 65_536);
        assert_eq!(QueueEncoding::Base64.sent_size(&"x".repeat(49_153)), 65_540);
        assert_eq!(QueueEncoding::None.sent_size(&json), 49_152);
        assert_eq!(QueueEncoding::None.sent_size(r#""a"&"#), 6 + 1 + 6 + 5);
        assert_eq!(QueueEncoding::None.sent_size("\u{FFFE}"), 6);
    }

    #[test]
    fn each_endpoint_kind_has_its_own_scheme() {
        use EventGridKind::*;
        for (path, kind) in [
            ("/api/events", CustomTopic),
            ("/", CustomTopic),
            ("/topics/cv:publish", NamespaceTopic),
            ("/topics/cv-events:publish/", NamespaceTopic),
            ("/TOPICS/cv:publish", NamespaceTopic),
            ("/topics/:publish", CustomTopic),
            ("/other/cv:publish", CustomTopic),
        ] {
            assert_eq!(EventGridKind::of_path(path), kind, "{path}");
        }
        assert_eq!(
            CustomTopic.key_header("k1"),
            ("aeg-sas-key", "k1".to_owned())
        );
        assert_eq!(
            NamespaceTopic.key_header("k1"),
            ("authorization", "SharedAccessKey k1".to_owned())
        );
        assert_eq!(CustomTopic.api_version(), "2018-01-01");
        assert_eq!(NamespaceTopic.api_version(), "2023-11-01");
        for kind in [CustomTopic, NamespaceTopic] {
            let l = kind.limits();
            assert!(l.max_events <= EVENTS_PER_TRANSACTION);
            assert_eq!(
                (l.max_event_bytes, l.max_request_bytes),
                (1_000_000, 1_000_000)
            );
        }
        assert!(NamespaceTopic.explain().contains("namespace topic"));
        assert!(NamespaceTopic.explain().contains("SharedAccessKey"));
    }
}
