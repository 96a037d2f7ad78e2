//! History rows: what cvchain records for every message, under keys derived from the event so a
//! redelivered message maps to the same row and changes nothing. Pure: building rows, no I/O.

pub mod claims;
pub mod store;

use crate::chain::ExportTarget;
use crate::customvision::{Iteration, IterationPerformance, Project};
use crate::notification::{Encoding, Notification, Parsed, unwrap_text};
use crate::redact::{redact, url_without_secrets};
use crate::storage::table::{Entity, is_valid_key};
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

/// Rejected messages live in their own partition, apart from any project.
pub const REJECTED_PARTITION: &str = "_rejected";
/// Well-formed messages that name no project.
pub const NO_PROJECT_PARTITION: &str = "_noproject";
/// A table string property holds 32 K UTF-16 units; stay well below.
pub const MAX_TEXT_CHARS: usize = 30_000;

/// A message as it arrived, whatever the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The queue message text.
    pub text: String,
    /// The queue message id, stable across redeliveries.
    pub message_id: Option<String>,
    pub dequeue_count: u32,
    pub received_at: OffsetDateTime,
}

impl Received {
    /// A key fragment that identifies the message: its id when that is a safe key, else a hash of
    /// the text (the same text redelivered gives the same key).
    pub fn message_key(&self) -> String {
        match &self.message_id {
            Some(id)
                if !id.is_empty()
                    && id.len() <= 128
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                id.clone()
            }
            _ => format!("sha256-{}", short_hash(&self.text)),
        }
    }
}

fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// One history entity.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub partition_key: String,
    pub row_key: String,
    pub properties: Entity,
}

impl HistoryRow {
    pub fn to_entity(&self) -> Entity {
        let mut e = Entity::new();
        e.insert(
            "PartitionKey".into(),
            Value::String(self.partition_key.clone()),
        );
        e.insert("RowKey".into(), Value::String(self.row_key.clone()));
        for (k, v) in &self.properties {
            e.insert(k.clone(), v.clone());
        }
        e
    }

    pub fn describe(&self) -> String {
        format!("{}/{}", self.partition_key, self.row_key)
    }
}

/// The platform in a backup blob named `{projectId} - {iterationId}.{platform}`, if the URL is one.
pub fn platform_from_model_uri(model_uri: &str, n: &Notification) -> Option<String> {
    let url = url::Url::parse(model_uri).ok()?;
    let last = url.path_segments()?.next_back()?;
    let name = percent_encoding::percent_decode_str(last)
        .decode_utf8()
        .ok()?
        .into_owned();
    let (stem, ext) = name.rsplit_once('.')?;
    let expected = format!(
        "{} - {}",
        n.project_id()?.hyphenated(),
        n.iteration_id()?.hyphenated()
    );
    let platform_ok =
        !ext.is_empty() && ext.len() <= 32 && ext.chars().all(|c| c.is_ascii_alphanumeric());
    (stem.eq_ignore_ascii_case(&expected) && platform_ok).then(|| ext.to_owned())
}

/// The row for a message that parsed.
pub fn notification_row(received: &Received, parsed: &Parsed) -> HistoryRow {
    let n = &parsed.notification;
    let msg = received.message_key();
    let partition_key = n
        .project_id()
        .map(|p| p.hyphenated().to_string())
        .unwrap_or_else(|| NO_PROJECT_PARTITION.to_owned());
    // Parsed once: the row key and `ModelPlatform` both need it.
    let platform = match n {
        Notification::Export {
            model_uri: Some(uri),
            ..
        } => platform_from_model_uri(uri, n),
        _ => None,
    };
    let row_key = match n {
        Notification::ConnectionTest { .. } => format!("ConnectionTest_{msg}"),
        Notification::Training {
            iteration_id,
            status,
            ..
        } => format!("Training_{iteration_id}_{}", status.as_str()),
        Notification::Export {
            iteration_id,
            status,
            ..
        } => {
            let which = platform.clone().unwrap_or_else(|| format!("msg-{msg}"));
            format!("Export_{iteration_id}_{which}_{}", status.as_str())
        }
        Notification::Unknown { .. } => format!("Unknown_{msg}"),
    };
    let mut p = common_properties(received);
    p.insert("EventType".into(), json!(n.event_type()));
    p.insert(
        "ProjectId".into(),
        json!(n.project_id().map(|u| u.to_string()).unwrap_or_default()),
    );
    p.insert(
        "IterationId".into(),
        json!(n.iteration_id().map(|u| u.to_string()).unwrap_or_default()),
    );
    p.insert("Status".into(), json!(n.status()));
    p.insert("Encoding".into(), json!(parsed.encoding.as_str()));
    match n {
        Notification::Export {
            model_uri: Some(uri),
            ..
        } => {
            p.insert("ModelUri".into(), json!(url_without_secrets(uri)));
            if let Some(platform) = platform {
                p.insert("ModelPlatform".into(), json!(platform));
            }
        }
        Notification::Unknown { kind, version, .. } => {
            p.insert("UnknownType".into(), json!(truncate(kind, 256).0));
            p.insert(
                "Version".into(),
                json!(truncate(version.as_deref().unwrap_or(""), 64).0),
            );
        }
        _ => {}
    }
    insert_raw(
        &mut p,
        &received.text,
        Some((&parsed.json_text, parsed.encoding)),
    );
    HistoryRow {
        partition_key,
        row_key: safe_key(row_key),
        properties: p,
    }
}

/// Adds what Custom Vision reports about a trained iteration to its Training row.
pub fn enrich_training(
    row: &mut HistoryRow,
    project: Option<&Project>,
    iteration: Option<&Iteration>,
    performance: Option<&IterationPerformance>,
) {
    let p = &mut row.properties;
    if let Some(project) = project {
        p.insert("ProjectName".into(), json!(truncate(&project.name, 256).0));
    }
    if let Some(it) = iteration {
        p.insert("IterationName".into(), json!(truncate(&it.name, 256).0));
        p.insert("IterationStatus".into(), json!(it.status));
        if let Some(at) = it.trained_at.as_deref().and_then(parse_service_time) {
            p.insert("TrainedAt".into(), json!(table_datetime(at)));
            p.insert("TrainedAt@odata.type".into(), json!("Edm.DateTime"));
        }
        if let Some(m) = it.training_time_in_minutes {
            p.insert("TrainingTimeInMinutes".into(), json!(m));
        }
        if let Some(d) = it.domain_id {
            p.insert("DomainId".into(), json!(d.to_string()));
        }
        if let Some(t) = &it.training_type {
            p.insert("TrainingType".into(), json!(t));
        }
        p.insert("Exportable".into(), json!(it.exportable));
        p.insert("ExportableTo".into(), json!(it.exportable_to.join(",")));
    }
    if let Some(perf) = performance {
        for (name, v) in [
            ("Precision", perf.precision),
            ("Recall", perf.recall),
            ("AveragePrecision", perf.average_precision),
        ] {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                p.insert(name.into(), json!(v));
                p.insert(format!("{name}@odata.type"), json!("Edm.Double"));
            }
        }
    }
}

/// The service writes RFC 3339 times.
pub fn parse_service_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// The row key of an export step: one row per chain entry of an iteration.
pub fn step_row_key(iteration: Uuid, target: &ExportTarget) -> String {
    safe_key(format!("ExportStep_{iteration}_{}", target.key()))
}

/// Row keys of an iteration's export steps lie in `[prefix, prefix_end)`.
pub fn step_key_range(iteration: Uuid) -> (String, String) {
    (
        format!("ExportStep_{iteration}_"),
        format!("ExportStep_{iteration}`"),
    )
}

/// A new export step row.
pub fn step_row(
    project: Uuid,
    iteration: Uuid,
    position: usize,
    target: &ExportTarget,
    status: &str,
) -> HistoryRow {
    let mut p = Entity::new();
    p.insert("EventType".into(), json!("ExportStep"));
    p.insert("ProjectId".into(), json!(project.to_string()));
    p.insert("IterationId".into(), json!(iteration.to_string()));
    p.insert("Platform".into(), json!(target.platform));
    p.insert(
        "Flavor".into(),
        json!(target.flavor.clone().unwrap_or_default()),
    );
    p.insert("ChainPosition".into(), json!(position + 1));
    p.insert("Status".into(), json!(status));
    HistoryRow {
        partition_key: project.to_string(),
        row_key: step_row_key(iteration, target),
        properties: p,
    }
}

/// A time property with its `Edm.DateTime` annotation.
pub fn time_property(p: &mut Entity, name: &str, at: OffsetDateTime) {
    p.insert(name.into(), json!(table_datetime(at)));
    p.insert(format!("{name}@odata.type"), json!("Edm.DateTime"));
}

/// Messages whose last delivery failed: the host moves them to the poison queue.
pub const FAILED_PARTITION: &str = "_failed";

/// The row for a message the host will not retry again.
pub fn failed_row(received: &Received, reason: &str, transient: bool) -> HistoryRow {
    let mut p = common_properties(received);
    p.insert("EventType".into(), json!("Failed"));
    p.insert("Status".into(), json!("GaveUp"));
    p.insert("Reason".into(), json!(truncate(&redact(reason), 1024).0));
    p.insert("Transient".into(), json!(transient));
    let decoded = unwrap_text(&received.text).ok();
    insert_raw(
        &mut p,
        &received.text,
        decoded.as_ref().map(|(t, e)| (t.as_str(), *e)),
    );
    HistoryRow {
        partition_key: FAILED_PARTITION.to_owned(),
        row_key: safe_key(received.message_key()),
        properties: p,
    }
}

/// The row for a message that was rejected (it is also copied to the poison queue).
pub fn rejected_row(received: &Received, reason: &str, field: Option<&str>) -> HistoryRow {
    let mut p = common_properties(received);
    p.insert("EventType".into(), json!("Rejected"));
    p.insert("Status".into(), json!("Rejected"));
    p.insert("Reason".into(), json!(truncate(&redact(reason), 1024).0));
    p.insert("Field".into(), json!(field.unwrap_or_default()));
    p.insert("ProjectId".into(), json!(""));
    p.insert("IterationId".into(), json!(""));
    let decoded = unwrap_text(&received.text).ok();
    if let Some((_, enc)) = &decoded {
        p.insert("Encoding".into(), json!(enc.as_str()));
    }
    insert_raw(
        &mut p,
        &received.text,
        decoded.as_ref().map(|(t, e)| (t.as_str(), *e)),
    );
    HistoryRow {
        partition_key: REJECTED_PARTITION.to_owned(),
        row_key: safe_key(received.message_key()),
        properties: p,
    }
}

/// `Edm.DateTime` holds 100 ns ticks: seven fractional digits at most, always UTC.
pub fn table_datetime(t: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_else(|_| t.format(&Rfc3339).unwrap_or_default())
}

fn common_properties(received: &Received) -> Entity {
    let mut p = Entity::new();
    let at = table_datetime(received.received_at);
    p.insert("ReceivedAt".into(), json!(at));
    p.insert("ReceivedAt@odata.type".into(), json!("Edm.DateTime"));
    p.insert(
        "MessageId".into(),
        json!(truncate(&redact(received.message_id.as_deref().unwrap_or("")), 256).0),
    );
    p.insert("DequeueCount".into(), json!(received.dequeue_count));
    p
}

/// `Raw` is the received text with secrets redacted. A base64 message cannot be redacted as it
/// is, so its decoded JSON is redacted and encoded again; `Decoded` shows it in clear.
fn insert_raw(p: &mut Entity, text: &str, decoded: Option<(&str, Encoding)>) {
    let raw = match decoded {
        Some((json_text, Encoding::Base64)) => {
            let clean = redact(json_text);
            let (d, truncated) = truncate(&clean, MAX_TEXT_CHARS);
            p.insert("Decoded".into(), json!(d));
            if truncated {
                p.insert("DecodedTruncated".into(), json!(true));
            }
            base64::engine::general_purpose::STANDARD.encode(clean)
        }
        _ => redact(text),
    };
    let (raw, truncated) = truncate(&raw, MAX_TEXT_CHARS);
    p.insert("Raw".into(), json!(raw));
    if truncated {
        p.insert("RawTruncated".into(), json!(true));
    }
}

/// At most `max` characters, control characters other than whitespace escaped.
fn truncate(s: &str, max: usize) -> (String, bool) {
    let mut out = String::with_capacity(s.len().min(max * 4));
    for (count, c) in s.chars().enumerate() {
        if count >= max {
            return (out, true);
        }
        if c.is_control() && !matches!(c, '\n' | '\r' | '\t') {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    (out, false)
}

/// Keys built from message data must still be valid table keys.
fn safe_key(key: String) -> String {
    if is_valid_key(&key) {
        key
    } else {
        format!("sha256-{}", short_hash(&key))
    }
}

#[cfg(test)]
mod tests;
