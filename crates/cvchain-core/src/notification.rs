//! The notifications Custom Vision writes to its storage queue, and tolerant parsing of them.
//!
//! Nothing public shows a captured message, so parsing accepts what a producer plausibly sends:
//! raw or base64 text, a UTF-8 BOM, any key casing, whitespace, field order and extra fields.
//! Everything else is rejected with an error that names the field and what was wrong.

use base64::Engine as _;
use serde_json::{Map, Value};
use std::fmt;
use uuid::Uuid;

/// Queue messages are at most 64 KiB of text; anything longer did not come from a queue.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The only schema version cvchain knows; any other version parses as [`Notification::Unknown`].
pub const SCHEMA_VERSION: &str = "1.0";

/// One notification, typed. `Unknown` keeps anything well-formed that cvchain does not understand,
/// so it can be recorded instead of dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    ConnectionTest {
        project_id: Uuid,
    },
    Training {
        project_id: Uuid,
        iteration_id: Uuid,
        status: TrainingStatus,
    },
    Export {
        project_id: Uuid,
        iteration_id: Uuid,
        status: ExportStatus,
        /// Absent or empty in the message → `None`. May carry a SAS: never log it as is.
        model_uri: Option<String>,
    },
    Unknown {
        /// The `type` the message gave (empty when it had none).
        kind: String,
        /// The `version` the message gave, if any.
        version: Option<String>,
        /// `Content.projectId` when it is present and a UUID, so the row lands in the project's partition.
        project_id: Option<Uuid>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainingStatus {
    Completed,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportStatus {
    Completed,
    Failed,
}

impl TrainingStatus {
    pub fn as_str(self) -> &'static str {
        self.event_status().as_str()
    }

    pub fn event_status(self) -> EventStatus {
        match self {
            TrainingStatus::Completed => EventStatus::TrainingCompleted,
            TrainingStatus::Failed => EventStatus::TrainingFailed,
        }
    }
}

impl ExportStatus {
    pub fn as_str(self) -> &'static str {
        self.event_status().as_str()
    }

    pub fn event_status(self) -> EventStatus {
        match self {
            ExportStatus::Completed => EventStatus::ExportCompleted,
            ExportStatus::Failed => EventStatus::ExportFailed,
        }
    }
}

/// The status a notification's history row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventStatus {
    TrainingCompleted,
    TrainingFailed,
    ExportCompleted,
    ExportFailed,
    /// A ConnectionTest: it has no status of its own.
    Received,
    /// A kind or version cvchain does not know.
    Unrecognized,
}

impl EventStatus {
    pub const ALL: [EventStatus; 6] = [
        EventStatus::TrainingCompleted,
        EventStatus::TrainingFailed,
        EventStatus::ExportCompleted,
        EventStatus::ExportFailed,
        EventStatus::Received,
        EventStatus::Unrecognized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::TrainingCompleted => "TrainingCompleted",
            EventStatus::TrainingFailed => "TrainingFailed",
            EventStatus::ExportCompleted => "ExportCompleted",
            EventStatus::ExportFailed => "ExportFailed",
            EventStatus::Received => "Received",
            EventStatus::Unrecognized => "Unrecognized",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// The kinds of notification, as history rows name them (`EventType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    ConnectionTest,
    Training,
    Export,
    Unknown,
}

/// How the queue message text was wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    Base64,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Base64 => "base64",
        }
    }
}

/// A parsed message: the notification plus how it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub notification: Notification,
    pub encoding: Encoding,
    /// The JSON text after unwrapping base64 and the BOM.
    pub json_text: String,
}

/// Why a message was rejected. Each variant names the field and what was wrong; none echoes a value
/// that could hold a secret (a `modelUri` is never quoted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message is {len} bytes; a queue message holds at most {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("message is empty")]
    Empty,
    #[error("message is neither JSON nor base64-encoded JSON")]
    NotJsonOrBase64,
    #[error("message is base64 but the decoded bytes are not UTF-8 (at byte {at})")]
    InvalidUtf8 { at: usize },
    #[error("invalid JSON at line {line}, column {column}: {reason}")]
    InvalidJson {
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("message JSON must be an object, found {found}")]
    NotAnObject { found: &'static str },
    #[error("field `{field}` appears more than once (keys are matched case-insensitively)")]
    DuplicateField { field: String },
    #[error("missing field `{field}`")]
    MissingField { field: String },
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field `{field}` must be a UUID, found {value:?}")]
    InvalidUuid { field: String, value: String },
    #[error("field `{field}` has unknown value {value:?}; expected one of {expected}")]
    UnknownStatus {
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("field `{field}` must be an absolute http(s) URL")]
    InvalidUrl { field: String },
}

impl ParseError {
    /// The field the error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParseError::DuplicateField { field }
            | ParseError::MissingField { field }
            | ParseError::WrongType { field, .. }
            | ParseError::InvalidUuid { field, .. }
            | ParseError::UnknownStatus { field, .. }
            | ParseError::InvalidUrl { field } => Some(field),
            _ => None,
        }
    }
}

/// Parses one queue message text.
pub fn parse(text: &str) -> Result<Parsed, ParseError> {
    let (json_text, encoding) = unwrap_text(text)?;
    let notification = parse_json(&json_text)?;
    Ok(Parsed {
        notification,
        encoding,
        json_text,
    })
}

/// Parses the JSON text of a message already unwrapped by [`unwrap_text`].
pub fn parse_json(json_text: &str) -> Result<Notification, ParseError> {
    let value: Value = serde_json::from_str(json_text).map_err(|e| ParseError::InvalidJson {
        line: e.line(),
        column: e.column(),
        reason: json_reason(&e),
    })?;
    from_value(&value)
}

/// Removes a BOM and surrounding whitespace, and base64 when the text is not JSON itself.
pub fn unwrap_text(text: &str) -> Result<(String, Encoding), ParseError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(ParseError::TooLarge {
            len: text.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let trimmed = strip_bom(text).trim();
    if trimmed.is_empty() {
        return Err(ParseError::Empty);
    }
    if looks_like_json(trimmed) {
        return Ok((trimmed.to_owned(), Encoding::Raw));
    }
    let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = decode_base64(&compact).ok_or(ParseError::NotJsonOrBase64)?;
    let decoded = String::from_utf8(bytes).map_err(|e| ParseError::InvalidUtf8 {
        at: e.utf8_error().valid_up_to(),
    })?;
    let inner = strip_bom(&decoded).trim();
    if inner.is_empty() {
        return Err(ParseError::Empty);
    }
    if !looks_like_json(inner) {
        return Err(ParseError::NotJsonOrBase64);
    }
    Ok((inner.to_owned(), Encoding::Base64))
}

fn strip_bom(s: &str) -> &str {
    s.strip_prefix('\u{feff}').unwrap_or(s)
}

/// Every notification is a JSON object, and `{`/`[` never start base64 text.
fn looks_like_json(s: &str) -> bool {
    s.starts_with('{') || s.starts_with('[')
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(s).ok())
}

/// serde_json's message without its own " at line X column Y" suffix (we report those separately).
fn json_reason(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg,
    }
}

/// Builds the typed notification from parsed JSON.
pub fn from_value(value: &Value) -> Result<Notification, ParseError> {
    let root = value.as_object().ok_or(ParseError::NotAnObject {
        found: type_name(value),
    })?;
    let kind = match get(root, "", "type")? {
        Some(v) => string_field(v, "type")?.to_owned(),
        None => {
            return Err(ParseError::MissingField {
                field: "type".into(),
            });
        }
    };
    let version = match get(root, "", "version")? {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.trim().to_owned()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(ParseError::WrongType {
                field: "version".into(),
                expected: "a string",
                found: type_name(other),
            });
        }
    };
    let known_version = match version.as_deref() {
        // A message without a version is taken as 1.0: the type says what it is.
        None => true,
        Some(v) => v == SCHEMA_VERSION || v == "1",
    };
    let kind_lower = kind.to_ascii_lowercase();
    let is_known_kind = matches!(
        kind_lower.as_str(),
        "connectiontest" | "training" | "export"
    );
    if !known_version || !is_known_kind {
        let project_id = get(root, "", "content")
            .ok()
            .flatten()
            .and_then(Value::as_object)
            .and_then(|c| get(c, "Content.", "projectId").ok().flatten())
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s.trim()).ok());
        return Ok(Notification::Unknown {
            kind,
            version,
            project_id,
        });
    }

    let content = match get(root, "", "content")? {
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ParseError::WrongType {
                field: "Content".into(),
                expected: "an object",
                found: type_name(other),
            });
        }
        None => {
            return Err(ParseError::MissingField {
                field: "Content".into(),
            });
        }
    };
    let project_id = uuid_field(content, "projectId")?;
    match kind_lower.as_str() {
        "connectiontest" => Ok(Notification::ConnectionTest { project_id }),
        "training" => {
            let iteration_id = uuid_field(content, "iterationId")?;
            let status = match status_field(content, "trainingStatus")?.as_str() {
                "trainingcompleted" => TrainingStatus::Completed,
                "trainingfailed" => TrainingStatus::Failed,
                _ => {
                    return Err(ParseError::UnknownStatus {
                        field: "Content.trainingStatus".into(),
                        value: shorten(&raw_string(content, "trainingStatus")),
                        expected: "TrainingCompleted, TrainingFailed",
                    });
                }
            };
            Ok(Notification::Training {
                project_id,
                iteration_id,
                status,
            })
        }
        _ => {
            let iteration_id = uuid_field(content, "iterationId")?;
            let status = match status_field(content, "exportStatus")?.as_str() {
                "exportcompleted" => ExportStatus::Completed,
                "exportfailed" => ExportStatus::Failed,
                _ => {
                    return Err(ParseError::UnknownStatus {
                        field: "Content.exportStatus".into(),
                        value: shorten(&raw_string(content, "exportStatus")),
                        expected: "ExportCompleted, ExportFailed",
                    });
                }
            };
            let model_uri = match get(content, "Content.", "modelUri")? {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.trim().is_empty() => None,
                Some(Value::String(s)) => {
                    let s = s.trim();
                    match url::Url::parse(s) {
                        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
                            Some(s.to_owned())
                        }
                        _ => {
                            return Err(ParseError::InvalidUrl {
                                field: "Content.modelUri".into(),
                            });
                        }
                    }
                }
                Some(other) => {
                    return Err(ParseError::WrongType {
                        field: "Content.modelUri".into(),
                        expected: "a string",
                        found: type_name(other),
                    });
                }
            };
            Ok(Notification::Export {
                project_id,
                iteration_id,
                status,
                model_uri,
            })
        }
    }
}

/// Looks a key up case-insensitively; two keys that differ only by case are ambiguous.
fn get<'a>(
    map: &'a Map<String, Value>,
    prefix: &str,
    name: &str,
) -> Result<Option<&'a Value>, ParseError> {
    let mut found = None;
    for (k, v) in map {
        if k.trim().eq_ignore_ascii_case(name) {
            if found.is_some() {
                return Err(ParseError::DuplicateField {
                    field: format!("{prefix}{name}"),
                });
            }
            found = Some(v);
        }
    }
    Ok(found)
}

fn string_field<'a>(v: &'a Value, field: &str) -> Result<&'a str, ParseError> {
    v.as_str().ok_or_else(|| ParseError::WrongType {
        field: field.into(),
        expected: "a string",
        found: type_name(v),
    })
}

fn uuid_field(content: &Map<String, Value>, name: &str) -> Result<Uuid, ParseError> {
    let field = format!("Content.{name}");
    let v = get(content, "Content.", name)?.ok_or_else(|| ParseError::MissingField {
        field: field.clone(),
    })?;
    let s = string_field(v, &field)?;
    parse_uuid(s.trim()).ok_or_else(|| ParseError::InvalidUuid {
        field,
        value: shorten(s),
    })
}

/// Only the hyphenated form, with or without braces: the forms Custom Vision's API uses.
fn parse_uuid(s: &str) -> Option<Uuid> {
    let inner = s
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(s);
    if inner.len() != 36 {
        return None;
    }
    Uuid::parse_str(inner).ok()
}

fn status_field(content: &Map<String, Value>, name: &str) -> Result<String, ParseError> {
    let field = format!("Content.{name}");
    let v = get(content, "Content.", name)?.ok_or_else(|| ParseError::MissingField {
        field: field.clone(),
    })?;
    Ok(string_field(v, &field)?.trim().to_ascii_lowercase())
}

fn raw_string(content: &Map<String, Value>, name: &str) -> String {
    get(content, "", name)
        .ok()
        .flatten()
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Quoted values in errors stay short and printable.
fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX)
        .collect();
    if s.chars().count() > MAX {
        format!("{cleaned}…")
    } else {
        cleaned
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Notification {
    /// The documented message for this notification (canonical casing). `Unknown` has no such form
    /// and gives `None`. Used for round-trip tests and by the Custom Vision stand-in.
    pub fn to_message(&self) -> Option<Value> {
        use serde_json::json;
        let (kind, content) = match self {
            Notification::ConnectionTest { project_id } => {
                ("ConnectionTest", json!({ "projectId": project_id }))
            }
            Notification::Training {
                project_id,
                iteration_id,
                status,
            } => (
                "Training",
                json!({
                    "projectId": project_id,
                    "iterationId": iteration_id,
                    "trainingStatus": status.as_str(),
                }),
            ),
            Notification::Export {
                project_id,
                iteration_id,
                status,
                model_uri,
            } => (
                "Export",
                json!({
                    "projectId": project_id,
                    "iterationId": iteration_id,
                    "exportStatus": status.as_str(),
                    "modelUri": model_uri.clone().unwrap_or_default(),
                }),
            ),
            Notification::Unknown { .. } => return None,
        };
        Some(json!({ "version": SCHEMA_VERSION, "type": kind, "Content": content }))
    }

    /// The kind, as recorded in history (`EventType`).
    pub fn kind(&self) -> Kind {
        match self {
            Notification::ConnectionTest { .. } => Kind::ConnectionTest,
            Notification::Training { .. } => Kind::Training,
            Notification::Export { .. } => Kind::Export,
            Notification::Unknown { .. } => Kind::Unknown,
        }
    }

    pub fn project_id(&self) -> Option<Uuid> {
        match self {
            Notification::ConnectionTest { project_id }
            | Notification::Training { project_id, .. }
            | Notification::Export { project_id, .. } => Some(*project_id),
            Notification::Unknown { project_id, .. } => *project_id,
        }
    }

    pub fn iteration_id(&self) -> Option<Uuid> {
        match self {
            Notification::Training { iteration_id, .. }
            | Notification::Export { iteration_id, .. } => Some(*iteration_id),
            _ => None,
        }
    }

    /// The status as the message spelled it canonically, or `Received` for kinds without one.
    pub fn status(&self) -> EventStatus {
        match self {
            Notification::Training { status, .. } => status.event_status(),
            Notification::Export { status, .. } => status.event_status(),
            Notification::ConnectionTest { .. } => EventStatus::Received,
            Notification::Unknown { .. } => EventStatus::Unrecognized,
        }
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The type and version are the sender's words: shortened and scrubbed of secrets.
            Notification::Unknown { kind, version, .. } => write!(
                f,
                "Unknown(type={:?}, version={:?})",
                crate::redact::scrub(&shorten(kind)),
                crate::redact::scrub(&shorten(version.as_deref().unwrap_or("")))
            ),
            other => {
                write!(f, "{:?}", other.kind())?;
                if let Some(p) = other.project_id() {
                    write!(f, " project={p}")?;
                }
                if let Some(i) = other.iteration_id() {
                    write!(f, " iteration={i}")?;
                }
                write!(f, " status={}", other.status().as_str())
            }
        }
    }
}

#[cfg(test)]
mod tests;
