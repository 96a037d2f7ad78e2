//! History rows: what cvchain records for every message, under keys derived from the event so a
//! redelivered message maps to the same row and changes nothing; and the typed views read back
//! from stored rows. Pure: building and reading rows, no I/O.

mod row;
mod seal;
mod views;

pub use crate::bounds::{MAX_ENTITY_BYTES, MAX_PROPERTY_UNITS, encoded_units, fit};
pub use row::{HistoryRow, PoisonCopy, Prop, Props, RowKind, RowStatus, Value, ValueKind};
pub use seal::seal;
pub use views::{ChannelMoveRow, StepRow, TrainingFacts, TrainingRow};

use crate::chain::{EntryState, ExportTarget};
use crate::customvision::{Iteration, IterationPerformance, Project};
use crate::message::{Incoming, RecordedText, bounded, short_hash};
use crate::notification::{Notification, Parsed};
use crate::redact::{redact, url_without_secrets};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

/// Rejected messages live in their own partition, apart from any project.
pub const REJECTED_PARTITION: &str = "_rejected";
/// Well-formed messages that name no project.
pub const NO_PROJECT_PARTITION: &str = "_noproject";
/// Messages whose last delivery failed: the host moves them to the poison queue.
pub const FAILED_PARTITION: &str = "_failed";
/// Replayed messages get a row each in this partition.
pub const REPLAYED_PARTITION: &str = "_replayed";

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
    // Blob names are case-sensitive: only the name Custom Vision writes (lower-case ids) is it.
    (stem == expected && platform_ok).then(|| ext.to_owned())
}

/// The row for a message that parsed.
pub fn notification_row(incoming: &Incoming, parsed: &Parsed) -> HistoryRow {
    let n = &parsed.notification;
    let msg = &incoming.key;
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
        } => training_row_key(*iteration_id, *status),
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
    let mut p = common_properties(incoming);
    p.set(Prop::EventType, RowKind::Notification(n.kind()).as_str());
    p.set(
        Prop::ProjectId,
        n.project_id().map(|u| u.to_string()).unwrap_or_default(),
    );
    p.set(
        Prop::IterationId,
        n.iteration_id().map(|u| u.to_string()).unwrap_or_default(),
    );
    p.set(Prop::Status, RowStatus::Event(n.status()).as_str());
    p.set(Prop::Encoding, parsed.encoding.as_str());
    match n {
        Notification::Export {
            model_uri: Some(uri),
            ..
        } => {
            p.set(Prop::ModelUri, url_without_secrets(uri));
            if let Some(platform) = platform {
                p.set(Prop::ModelPlatform, platform);
            }
        }
        Notification::Unknown { kind, version, .. } => {
            p.set(Prop::UnknownType, bounded(kind, 256).0);
            p.set(
                Prop::Version,
                bounded(version.as_deref().unwrap_or(""), 64).0,
            );
        }
        _ => {}
    }
    insert_raw(&mut p, &incoming.recorded);
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
        p.set(Prop::ProjectName, bounded(&project.name, 256).0);
    }
    if let Some(it) = iteration {
        p.set(Prop::IterationName, bounded(&it.name, 256).0);
        p.set(Prop::IterationStatus, &it.status);
        if let Some(at) = it.trained_at.as_deref().and_then(parse_service_time) {
            p.set(Prop::TrainedAt, at);
        }
        if let Some(m) = it.training_time_in_minutes {
            p.set_int(Prop::TrainingTimeInMinutes, m.into());
        }
        if let Some(d) = it.domain_id {
            p.set(Prop::DomainId, d.to_string());
        }
        if let Some(t) = &it.training_type {
            p.set(Prop::TrainingType, t);
        }
        p.set(Prop::Exportable, it.exportable);
        p.set(Prop::ExportableTo, it.exportable_to.join(","));
    }
    if let Some(perf) = performance {
        for (prop, v) in [
            (Prop::Precision, perf.precision),
            (Prop::Recall, perf.recall),
            (Prop::AveragePrecision, perf.average_precision),
        ] {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                p.set(prop, v);
            }
        }
    }
}

/// The service writes RFC 3339 times.
pub fn parse_service_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// The row key of a Training notification's row: one per iteration and outcome.
pub fn training_row_key(iteration: Uuid, status: crate::notification::TrainingStatus) -> String {
    format!("Training_{iteration}_{}", status.as_str())
}

/// The row key of an export step: one row per chain entry of an iteration.
pub fn step_row_key(iteration: Uuid, target: &ExportTarget) -> String {
    safe_key(format!(
        "ExportStep_{iteration}_{}",
        key_part(&target.key())
    ))
}

/// A part of a key made from a name the service reported (a platform, a flavor): kept as it
/// is when it is letters, digits, `.`, `_` and `-`; otherwise sanitized to those, with a short
/// hash of the original so two names never share a key. The key stays readable and inside its
/// range (`ExportStep_<iteration>_…`), where a hash of the whole key would not.
pub fn key_part(name: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !name.is_empty() && name.len() <= 100 && name.chars().all(ok) {
        return name.to_owned();
    }
    let clean: String = name
        .chars()
        .take(64)
        .map(|c| if ok(c) { c } else { '-' })
        .collect();
    format!("{clean}-h{}", &short_hash(name)[..12])
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
    state: EntryState,
) -> HistoryRow {
    let mut row = HistoryRow {
        partition_key: project.to_string(),
        row_key: step_row_key(iteration, target),
        properties: Props::new(),
    };
    row.set_kind(RowKind::ExportStep);
    let p = &mut row.properties;
    p.set(Prop::ProjectId, project.to_string());
    p.set(Prop::IterationId, iteration.to_string());
    p.set(Prop::Platform, &target.platform);
    p.set(Prop::Flavor, target.flavor.clone().unwrap_or_default());
    p.set_int(Prop::ChainPosition, position as i64 + 1);
    row.set_status(RowStatus::Step(state));
    row
}

/// The row for a message the host will not retry again.
pub fn failed_row(incoming: &Incoming, reason: &str, transient: bool) -> HistoryRow {
    let mut p = common_properties(incoming);
    p.set(Prop::EventType, RowKind::Failed.as_str());
    p.set(Prop::Status, RowStatus::GaveUp.as_str());
    p.set(Prop::Reason, bounded(&redact(reason), 1024).0);
    p.set(Prop::Transient, transient);
    insert_raw(&mut p, &incoming.recorded);
    HistoryRow {
        partition_key: FAILED_PARTITION.to_owned(),
        row_key: safe_key(incoming.key.clone()),
        properties: p,
    }
}

/// The row for a message moved back from the poison queue to the queue.
pub fn replayed_row(incoming: &Incoming) -> HistoryRow {
    let mut p = common_properties(incoming);
    p.set(Prop::EventType, RowKind::Replayed.as_str());
    p.set(Prop::Status, RowStatus::Replayed.as_str());
    p.set(Prop::Reason, "moved back from the poison queue");
    insert_raw(&mut p, &incoming.recorded);
    HistoryRow {
        partition_key: REPLAYED_PARTITION.to_owned(),
        row_key: safe_key(incoming.key.clone()),
        properties: p,
    }
}

/// The row for a message that was rejected (it is also copied to the poison queue).
pub fn rejected_row(incoming: &Incoming, reason: &str, field: Option<&str>) -> HistoryRow {
    let mut p = common_properties(incoming);
    p.set(Prop::EventType, RowKind::Rejected.as_str());
    p.set(Prop::Status, RowStatus::Rejected.as_str());
    p.set(Prop::Reason, bounded(&redact(reason), 1024).0);
    p.set(Prop::Field, field.unwrap_or_default());
    p.set(Prop::ProjectId, "");
    p.set(Prop::IterationId, "");
    if let Some(enc) = incoming.recorded.encoding {
        p.set(Prop::Encoding, enc.as_str());
    }
    insert_raw(&mut p, &incoming.recorded);
    HistoryRow {
        partition_key: REJECTED_PARTITION.to_owned(),
        row_key: safe_key(incoming.key.clone()),
        properties: p,
    }
}

/// What a row already holding a new row's keys is to the message being recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Existing {
    /// This message's own row: a redelivery, nothing to write.
    Redelivery,
    /// Another message recorded the same event first (a forgery, or a second genuine message):
    /// this one gets a row of its own, keyed by its message, that names the first and says how
    /// they differ; `note` goes onto the first row once the new row is written.
    Another { row: HistoryRow, note: Props },
}

/// Whether `existing` (found under `row`'s keys) is this message's own row. A notification's
/// key comes from its event, so a forged message recorded first would otherwise pass the
/// genuine one off as a redelivery.
pub fn existing_row(row: &HistoryRow, existing: &HistoryRow, message_key: &str) -> Existing {
    let notification = matches!(row.kind(), Some(RowKind::Notification(_)));
    let (ours, theirs) = (&row.properties, &existing.properties);
    let same_message = theirs.text(Prop::MessageId) == ours.text(Prop::MessageId)
        && (!ours.text(Prop::MessageId).is_empty()
            || theirs.text(Prop::Raw) == ours.text(Prop::Raw));
    if !notification || same_message || existing.properties.contains(Prop::SameEventAs) {
        return Existing::Redelivery;
    }
    let id_of = |p: &Props| match p.text(Prop::MessageId) {
        "" => "a message without an id".to_owned(),
        id => format!("message {id}"),
    };
    let mut differences = Vec::new();
    if theirs.text(Prop::ModelUri) != ours.text(Prop::ModelUri) {
        differences.push(format!(
            "its modelUri was {:?}",
            theirs.text(Prop::ModelUri)
        ));
    }
    if theirs.text(Prop::Raw) != ours.text(Prop::Raw) {
        differences.push("its text differs".to_owned());
    }
    let received = theirs
        .time(Prop::ReceivedAt)
        .map(|t| format!(", received {}", table_datetime(t)))
        .unwrap_or_default();
    let mut alternate = row.clone();
    alternate.row_key = apart_key(&row.row_key, message_key);
    let p = &mut alternate.properties;
    p.set(Prop::SameEventAs, &existing.row_key);
    p.set(
        Prop::Disagreement,
        format!(
            "{}{received} recorded this event first (row {}){}",
            id_of(theirs),
            existing.row_key,
            if differences.is_empty() {
                // A producer that sent one notification twice (or a forgery word for word).
                "; the same text under another message id".to_owned()
            } else {
                format!("; {}", differences.join("; "))
            }
        ),
    );
    let mut note = Props::new();
    note.set(
        Prop::Disagreement,
        format!(
            "{} claims the same event: row {}",
            id_of(ours),
            alternate.row_key
        ),
    );
    Existing::Another {
        row: alternate,
        note,
    }
}

/// The key of the row apart that a message gets when another message recorded its event first
/// (see [`existing_row`]): the first row's key and the message's, so the two sort together and
/// one range read finds both.
pub fn apart_key(row_key: &str, message_key: &str) -> String {
    safe_key(format!("{row_key}_{message_key}"))
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

fn common_properties(incoming: &Incoming) -> Props {
    let received = &incoming.received;
    let mut p = Props::new();
    p.set(Prop::ReceivedAt, received.received_at);
    p.set(
        Prop::MessageId,
        bounded(&redact(received.message_id.as_deref().unwrap_or("")), 256).0,
    );
    p.set_int(Prop::DequeueCount, received.dequeue_count.into());
    p
}

fn insert_raw(p: &mut Props, recorded: &RecordedText) {
    if let Some((decoded, truncated)) = &recorded.decoded {
        p.set(Prop::Decoded, decoded);
        if *truncated {
            p.set(Prop::DecodedTruncated, true);
        }
    }
    p.set(Prop::Raw, &recorded.raw);
    if recorded.raw_truncated {
        p.set(Prop::RawTruncated, true);
    }
}

/// What the Table service accepts in PartitionKey and RowKey (at most 1 KiB, which is 512
/// UTF-16 units).
pub fn is_valid_key(k: &str) -> bool {
    k.len() <= 512
        && !k
            .chars()
            .any(|c| matches!(c, '/' | '\\' | '#' | '?') || c.is_control())
}

/// Keys built from message data must still be valid table keys.
pub fn safe_key(key: String) -> String {
    if is_valid_key(&key) {
        key
    } else {
        format!("sha256-{}", short_hash(&key))
    }
}

#[cfg(test)]
mod tests;
