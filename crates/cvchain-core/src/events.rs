//! Outbound events: which CloudEvents a history change emits, decided here, in pure code.
//!
//! Every event describes one history change (a row inserted, or a step row's status merged), so
//! its `id` is derived from that row's keys and what changed: a redelivered notification that
//! makes the same change produces the same id, and the outbox (one row per id, inserted if
//! absent in the same entity-group transaction as the change) holds it once. Consumers can
//! dedupe on `id` too, since a crash between a send and its mark resends it.
//!
//! - [`CloudEvent`]: CloudEvents 1.0 in structured JSON mode, `data` with what a consumer needs
//!   without another call, never a SAS (URLs are recorded without their query).
//! - The builders: [`insert_events`] (Training, ChannelMove, ChannelMoveFailed and
//!   IterationDeleted rows, step rows inserted), [`step_merge_events`] (a step row's status or release changed) and
//!   [`chain_completed`].
//! - [`outbox_row`] and [`OutboxRow`]: the event as a history row and read back.
//! - [`shape`]: the event as it is stored and sent: redacted value by value, made smaller by
//!   shortening its data's strings, never by cutting its JSON, so it is always a CloudEvent.
//! - [`delivery`]: per-sink delivery state, ordering, retries with backoff, size limits.
//! - [`webhook`]: Standard Webhooks signing and verification.

pub mod chat;
pub mod delivery;
pub mod shape;
pub mod webhook;
pub mod wire;

use crate::chain::EntryState;
use crate::history::{HistoryRow, Prop, Props, RowKind, RowStatus, StepRow, safe_key};
use crate::notification::{EventStatus, Kind};
use crate::plan::StepWrite;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

pub use delivery::{DeliveryState, Routing, Sink};

/// `CVCHAIN_EVENTS_SOURCE`: overrides the events' `source`.
pub const SOURCE_SETTING: &str = "CVCHAIN_EVENTS_SOURCE";
/// The content type of every event's `data`.
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// One event in structured mode.
pub const CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";
/// A JSON array of events (Event Grid's CloudEvents schema).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json; charset=utf-8";
/// Outbox rows' keys start with this, so one range holds a project's outbox.
pub const OUTBOX_PREFIX: &str = "Outbox_";
/// The largest event an outbox row holds whole, in UTF-16 units of its JSON as the table counts
/// the property (`bounds::encoded_units`: a `"` of a name is `\"` in the JSON, four units in
/// the table): a string property holds 32 K. A larger one is recorded with its data's strings
/// shortened ([`shape`]); the history row it points to has every fact.
pub const OUTBOX_MAX_EVENT: usize = 30_000;

/// The kinds of event cvchain emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    TrainingCompleted,
    TrainingFailed,
    GateEvaluated,
    ExportRequested,
    ExportFailed,
    ModelReleased,
    ChannelMoved,
    /// A channel move that could not happen (both paths held, a manifest to fix, storage
    /// failing past the message's last delivery).
    ChannelMoveFailed,
    ChainCompleted,
    IterationDeleted,
    /// `cvchain events test`: never written to the outbox.
    Test,
}

impl EventType {
    pub const ALL: [EventType; 11] = [
        EventType::TrainingCompleted,
        EventType::TrainingFailed,
        EventType::GateEvaluated,
        EventType::ExportRequested,
        EventType::ExportFailed,
        EventType::ModelReleased,
        EventType::ChannelMoved,
        EventType::ChannelMoveFailed,
        EventType::ChainCompleted,
        EventType::IterationDeleted,
        EventType::Test,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::TrainingCompleted => "io.cvchain.training.completed",
            EventType::TrainingFailed => "io.cvchain.training.failed",
            EventType::GateEvaluated => "io.cvchain.gate.evaluated",
            EventType::ExportRequested => "io.cvchain.export.requested",
            EventType::ExportFailed => "io.cvchain.export.failed",
            EventType::ModelReleased => "io.cvchain.model.released",
            EventType::ChannelMoved => "io.cvchain.channel.moved",
            EventType::ChannelMoveFailed => "io.cvchain.channel.move_failed",
            EventType::ChainCompleted => "io.cvchain.chain.completed",
            EventType::IterationDeleted => "io.cvchain.iteration.deleted",
            EventType::Test => "io.cvchain.test",
        }
    }

    /// The full name, or the part after `io.cvchain.` (`model.released`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL.into_iter().find(|t| {
            t.as_str().eq_ignore_ascii_case(s)
                || t.as_str()
                    .strip_prefix("io.cvchain.")
                    .is_some_and(|short| short.eq_ignore_ascii_case(s))
        })
    }
}

/// A CloudEvent, as cvchain sends it (structured JSON mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Optional in CloudEvents: left out when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    /// RFC 3339, UTC; optional in CloudEvents: left out when empty (never sent as `""`, which
    /// is not a time).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub time: String,
    pub datacontenttype: String,
    /// The distributed-tracing extension: the W3C trace context of the chain the event belongs
    /// to (`crate::trace`), so a consumer's spans join the chain's trace. Left out when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The extension's vendor trace state, when the context has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    pub data: Value,
}

impl CloudEvent {
    pub fn event_type(&self) -> Option<EventType> {
        EventType::parse(&self.kind)
    }

    /// The event's JSON: its one serialization (a smaller form is made from the data again,
    /// [`shape`], never by cutting this text).
    pub fn to_json(&self) -> String {
        // Strings and JSON values with string keys: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not a CloudEvent: {e}"))
    }

    /// The event in the trace `parent` names (the distributed-tracing extension). The id, and
    /// everything else, stays as it is: a redelivery that makes the event again in another
    /// trace context still makes the same event id.
    pub fn in_trace(
        mut self,
        parent: &crate::trace::TraceParent,
        tracestate: Option<&str>,
    ) -> Self {
        self.traceparent = Some(parent.header());
        self.tracestate = tracestate.filter(|s| !s.is_empty()).map(str::to_owned);
        self
    }

    /// The trace context the event carries, when it carries a valid one.
    pub fn trace_parent(&self) -> Option<crate::trace::TraceParent> {
        crate::trace::TraceParent::parse(self.traceparent.as_deref()?)
    }
}

/// What every event of one history table shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventContext {
    /// `/cvchain/<account>/<table>`, or `CVCHAIN_EVENTS_SOURCE`.
    pub source: String,
    /// The history table: events point at their row in it.
    pub table: String,
    /// The release container's URL (no SAS), for channel URLs.
    pub release_container: Option<String>,
}

impl EventContext {
    /// The default source: the storage account and the history table.
    pub fn default_source(account: &str, table: &str) -> String {
        format!("/cvchain/{account}/{table}")
    }

    fn blob_url(&self, path: &str) -> Option<String> {
        let base = self.release_container.as_deref()?;
        let encoded: Vec<String> = path
            .split('/')
            .map(|seg| {
                percent_encoding::utf8_percent_encode(seg, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
                    .replace("%2D", "-")
                    .replace("%2E", ".")
                    .replace("%5F", "_")
                    .replace("%7E", "~")
            })
            .collect();
        Some(format!(
            "{}/{}",
            base.trim_end_matches('/'),
            encoded.join("/")
        ))
    }
}

/// Names the step rows do not carry: what Custom Vision reported for the iteration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IterationFacts {
    pub project_name: String,
    pub iteration_name: String,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub map: Option<f64>,
}

/// The event id of one change of one row: the same change always gets the same id.
pub fn event_id(partition_key: &str, row_key: &str, change: &str) -> String {
    let mut h = Sha256::new();
    h.update(partition_key.as_bytes());
    h.update([0]);
    h.update(row_key.as_bytes());
    h.update([0]);
    h.update(change.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let utc = t.to_offset(time::UtcOffset::UTC);
    utc.replace_millisecond(utc.millisecond())
        .unwrap_or(utc)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn subject(project: &str, iteration: &str) -> String {
    if iteration.is_empty() {
        format!("projects/{project}")
    } else {
        format!("projects/{project}/iterations/{iteration}")
    }
}

/// Where the row an event describes is, so a consumer (or a trimmed event) can look it up.
fn history_pointer(ctx: &EventContext, pk: &str, rk: &str) -> Value {
    json!({ "table": ctx.table, "partitionKey": pk, "rowKey": rk })
}

fn metrics(p: &Props) -> Value {
    json!({
        "precision": p.double(Prop::Precision),
        "recall": p.double(Prop::Recall),
        "mAP": p.double(Prop::AveragePrecision),
    })
}

fn non_empty(p: &Props, prop: Prop) -> Value {
    match p.text(prop) {
        "" => Value::Null,
        s => Value::String(s.to_owned()),
    }
}

fn time_of(p: &Props, props: &[Prop]) -> Option<OffsetDateTime> {
    props.iter().find_map(|prop| p.time(*prop))
}

#[allow(clippy::too_many_arguments)]
fn event(
    ctx: &EventContext,
    kind: EventType,
    pk: &str,
    rk: &str,
    change: &str,
    project: &str,
    iteration: &str,
    at: OffsetDateTime,
    mut data: Map<String, Value>,
) -> CloudEvent {
    data.insert("history".into(), history_pointer(ctx, pk, rk));
    CloudEvent {
        specversion: "1.0".into(),
        id: event_id(pk, rk, change),
        source: ctx.source.clone(),
        kind: kind.as_str().into(),
        subject: subject(project, iteration),
        time: rfc3339(at),
        datacontenttype: DATA_CONTENT_TYPE.into(),
        traceparent: None,
        tracestate: None,
        data: Value::Object(data),
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The events a newly inserted row emits: a Training row (`training.completed` or
/// `training.failed`, and `gate.evaluated` when it carries a verdict), a step row inserted in a
/// state worth telling, a channel move, a retention deletion. Other rows emit none.
pub fn insert_events(
    row: &HistoryRow,
    facts: &IterationFacts,
    ctx: &EventContext,
    now: OffsetDateTime,
) -> Vec<CloudEvent> {
    match row.kind() {
        Some(RowKind::Notification(Kind::Training)) => training_events(row, ctx, now),
        Some(RowKind::ExportStep) => {
            let step = StepRow::from_row(row);
            step_events(
                &row.partition_key,
                &step,
                None,
                &row.properties,
                facts,
                ctx,
                now,
            )
        }
        Some(RowKind::ChannelMove) => vec![channel_moved(row, facts, ctx, now)],
        Some(RowKind::ChannelMoveFailed) => vec![channel_move_failed(row, facts, ctx, now)],
        Some(RowKind::IterationDeleted) => vec![iteration_deleted(row, facts, ctx, now)],
        _ => Vec::new(),
    }
}

fn training_events(row: &HistoryRow, ctx: &EventContext, now: OffsetDateTime) -> Vec<CloudEvent> {
    let p = &row.properties;
    // An event says what cvchain verified: a training outcome Custom Vision did not confirm (a
    // made-up id, an outcome the service contradicts, no endpoint to ask) is recorded only.
    if p.flag(Prop::Confirmed) != Some(true) {
        return Vec::new();
    }
    let (pk, rk) = (&row.partition_key, &row.row_key);
    let project = p.text(Prop::ProjectId);
    let iteration = p.text(Prop::IterationId);
    let at = time_of(p, &[Prop::ReceivedAt]).unwrap_or(now);
    let base = || {
        object(json!({
            "projectId": project,
            "projectName": non_empty(p, Prop::ProjectName),
            "iterationId": iteration,
            "iterationName": non_empty(p, Prop::IterationName),
        }))
    };
    let mut out = Vec::new();
    match row.status() {
        Some(RowStatus::Event(EventStatus::TrainingCompleted)) => {
            let mut data = base();
            data.insert(
                "trainedAt".into(),
                p.time(Prop::TrainedAt)
                    .map(|t| Value::String(rfc3339(t)))
                    .unwrap_or(Value::Null),
            );
            data.insert("metrics".into(), metrics(p));
            data.insert("domainId".into(), non_empty(p, Prop::DomainId));
            data.insert("trainingType".into(), non_empty(p, Prop::TrainingType));
            data.insert(
                "exportable".into(),
                p.flag(Prop::Exportable)
                    .map(Value::Bool)
                    .unwrap_or(Value::Null),
            );
            let to: Vec<&str> = p
                .text(Prop::ExportableTo)
                .split(',')
                .filter(|s| !s.is_empty())
                .collect();
            data.insert("exportableTo".into(), json!(to));
            data.insert("chainStatus".into(), non_empty(p, Prop::ChainStatus));
            out.push(event(
                ctx,
                EventType::TrainingCompleted,
                pk,
                rk,
                "TrainingCompleted",
                project,
                iteration,
                at,
                data,
            ));
            if let Some(verdict) = Some(p.text(Prop::GateVerdict)).filter(|v| !v.is_empty()) {
                let mut data = base();
                data.insert("verdict".into(), json!(verdict));
                data.insert("passed".into(), json!(verdict == "passed"));
                let reasons: Vec<&str> = p
                    .text(Prop::GateReasons)
                    .split("; ")
                    .filter(|s| !s.is_empty())
                    .collect();
                data.insert("reasons".into(), json!(reasons));
                data.insert("metrics".into(), metrics(p));
                data.insert("publishStatus".into(), non_empty(p, Prop::PublishStatus));
                data.insert("channelStatus".into(), non_empty(p, Prop::ChannelStatus));
                out.push(event(
                    ctx,
                    EventType::GateEvaluated,
                    pk,
                    rk,
                    &format!("gate:{verdict}"),
                    project,
                    iteration,
                    at,
                    data,
                ));
            }
        }
        Some(RowStatus::Event(EventStatus::TrainingFailed)) => {
            let mut data = base();
            data.insert(
                "reason".into(),
                json!("Custom Vision reported TrainingFailed"),
            );
            out.push(event(
                ctx,
                EventType::TrainingFailed,
                pk,
                rk,
                "TrainingFailed",
                project,
                iteration,
                at,
                data,
            ));
        }
        _ => {}
    }
    out
}

/// The events a write to a step row emits, given the row as it was before (`None` for a new
/// row): `export.requested` when it becomes `Exporting`, `export.failed` when it becomes
/// `Failed` or `Refused`, `model.released` when it records a release copy.
pub fn step_write_events(
    write: &StepWrite,
    before: Option<&StepRow>,
    facts: &IterationFacts,
    ctx: &EventContext,
    now: OffsetDateTime,
) -> Vec<CloudEvent> {
    match write {
        StepWrite::Insert(row) => insert_events(row, facts, ctx, now),
        StepWrite::Merge {
            partition_key,
            row_key,
            properties,
        } => step_merge_events(partition_key, row_key, before, properties, facts, ctx, now),
    }
}

/// As [`step_write_events`], for properties merged into an existing step row.
pub fn step_merge_events(
    partition_key: &str,
    row_key: &str,
    before: Option<&StepRow>,
    merged: &Props,
    facts: &IterationFacts,
    ctx: &EventContext,
    now: OffsetDateTime,
) -> Vec<CloudEvent> {
    let Some(before) = before else {
        // A merge into a row nobody read: no target to name, nothing to tell.
        return Vec::new();
    };
    let mut after = before.clone();
    after.row_key = row_key.to_owned();
    step_events(partition_key, &after, Some(before), merged, facts, ctx, now)
}

fn step_events(
    pk: &str,
    step: &StepRow,
    before: Option<&StepRow>,
    written: &Props,
    facts: &IterationFacts,
    ctx: &EventContext,
    now: OffsetDateTime,
) -> Vec<CloudEvent> {
    let rk = &step.row_key;
    let state = match written.text(Prop::Status) {
        "" => step.state,
        s => EntryState::parse(s),
    };
    let changed_state = state.filter(|s| before.and_then(|b| b.state) != Some(*s));
    let release_url = Some(written.text(Prop::ReleaseUrl)).filter(|u| !u.is_empty());
    let released =
        release_url.filter(|u| before.and_then(|b| b.release_url.as_deref()) != Some(*u));
    let project = pk;
    let iteration = step.iteration_id.as_str();
    let base = || {
        let mut m = object(json!({
            "projectId": project,
            "projectName": facts.project_name,
            "iterationId": iteration,
            "iterationName": facts.iteration_name,
            "platform": step.target.platform,
            "flavor": step.target.flavor,
        }));
        if step.position > 0 {
            m.insert("chainPosition".into(), json!(step.position));
        }
        m
    };
    let mut out = Vec::new();
    match changed_state {
        Some(EntryState::Exporting) => {
            let mut data = base();
            let at = time_of(written, &[Prop::RequestedAt]).unwrap_or(now);
            data.insert("requestedAt".into(), json!(rfc3339(at)));
            data.insert("note".into(), non_empty(written, Prop::Reason));
            out.push(event(
                ctx,
                EventType::ExportRequested,
                pk,
                rk,
                "Exporting",
                project,
                iteration,
                at,
                data,
            ));
        }
        Some(s @ (EntryState::Failed | EntryState::Refused)) => {
            let mut data = base();
            let at = time_of(written, &[Prop::EndedAt]).unwrap_or(now);
            data.insert("status".into(), json!(s.as_str()));
            let reason = match written.text(Prop::Reason) {
                "" if s == EntryState::Failed => "Custom Vision reports the export failed",
                "" => "Custom Vision refused the export",
                r => r,
            };
            data.insert("reason".into(), json!(reason));
            out.push(event(
                ctx,
                EventType::ExportFailed,
                pk,
                rk,
                s.as_str(),
                project,
                iteration,
                at,
                data,
            ));
        }
        _ => {}
    }
    if let Some(url) = released {
        let mut data = base();
        let at = time_of(written, &[Prop::ReleasedAt]).unwrap_or(now);
        data.insert("releaseUrl".into(), json!(url));
        data.insert("releasePath".into(), non_empty(written, Prop::ReleasePath));
        data.insert(
            "size".into(),
            written
                .int(Prop::ReleaseSize)
                .map(Value::from)
                .unwrap_or(Value::Null),
        );
        data.insert(
            "metrics".into(),
            json!({"precision": facts.precision, "recall": facts.recall, "mAP": facts.map}),
        );
        data.insert("releasedAt".into(), json!(rfc3339(at)));
        let path = written.text(Prop::ReleasePath);
        out.push(event(
            ctx,
            EventType::ModelReleased,
            pk,
            rk,
            &format!("released:{path}"),
            project,
            iteration,
            at,
            data,
        ));
    }
    out
}

fn channel_moved(
    row: &HistoryRow,
    facts: &IterationFacts,
    ctx: &EventContext,
    now: OffsetDateTime,
) -> CloudEvent {
    let p = &row.properties;
    let project = p.text(Prop::ProjectId);
    let iteration = p.text(Prop::IterationId);
    let at = time_of(p, &[Prop::PromotedAt]).unwrap_or(now);
    let pointer = p.text(Prop::Platform).is_empty();
    let previous = match p.text(Prop::PreviousIterationId) {
        "" => Value::Null,
        id => json!({"id": id, "name": p.text(Prop::PreviousIterationName)}),
    };
    let release_path = p.text(Prop::ReleasePath);
    let channel_path = p.text(Prop::ChannelPath);
    let data = object(json!({
        "projectId": project,
        "projectName": facts.project_name,
        "iterationId": iteration,
        "iterationName": p.text(Prop::IterationName),
        "channel": p.text(Prop::Channel),
        "pointer": pointer,
        "platform": non_empty(p, Prop::Platform),
        "flavor": non_empty(p, Prop::Flavor),
        "reason": p.text(Prop::Reason),
        "revision": p.int(Prop::Revision),
        "metrics": metrics(p),
        "previousIteration": previous,
        "releasePath": non_empty(p, Prop::ReleasePath),
        "releaseUrl": (!release_path.is_empty()).then(|| ctx.blob_url(release_path)).flatten(),
        "channelPath": non_empty(p, Prop::ChannelPath),
        "channelUrl": (!channel_path.is_empty()).then(|| ctx.blob_url(channel_path)).flatten(),
        "promotedAt": rfc3339(at),
        "note": non_empty(p, Prop::Note),
    }));
    event(
        ctx,
        EventType::ChannelMoved,
        &row.partition_key,
        &row.row_key,
        "moved",
        project,
        iteration,
        at,
        data,
    )
}

/// A move that could not happen: which channel and target, the iteration it was for, and why.
fn channel_move_failed(
    row: &HistoryRow,
    facts: &IterationFacts,
    ctx: &EventContext,
    now: OffsetDateTime,
) -> CloudEvent {
    let p = &row.properties;
    let project = p.text(Prop::ProjectId);
    let iteration = p.text(Prop::IterationId);
    let at = time_of(p, &[Prop::EndedAt]).unwrap_or(now);
    let data = object(json!({
        "projectId": project,
        "projectName": facts.project_name,
        "iterationId": iteration,
        "iterationName": p.text(Prop::IterationName),
        "channel": non_empty(p, Prop::Channel),
        "pointer": p.text(Prop::Platform).is_empty(),
        "platform": non_empty(p, Prop::Platform),
        "flavor": non_empty(p, Prop::Flavor),
        "reason": p.text(Prop::Reason),
        "transient": p.flag(Prop::Transient).unwrap_or(false),
        "releasePath": non_empty(p, Prop::ReleasePath),
        "channelPath": non_empty(p, Prop::ChannelPath),
        "failedAt": rfc3339(at),
    }));
    event(
        ctx,
        EventType::ChannelMoveFailed,
        &row.partition_key,
        &row.row_key,
        "failed",
        project,
        iteration,
        at,
        data,
    )
}

fn iteration_deleted(
    row: &HistoryRow,
    facts: &IterationFacts,
    ctx: &EventContext,
    now: OffsetDateTime,
) -> CloudEvent {
    let p = &row.properties;
    let project = p.text(Prop::ProjectId);
    let iteration = p.text(Prop::IterationId);
    let at = time_of(p, &[Prop::EndedAt]).unwrap_or(now);
    let data = object(json!({
        "projectId": project,
        "projectName": facts.project_name,
        "iterationId": iteration,
        "iterationName": p.text(Prop::IterationName),
        "trainedAt": p.time(Prop::TrainedAt).map(rfc3339),
        "reason": p.text(Prop::Reason),
        "kept": p.text(Prop::Kept),
        "deletedAt": rfc3339(at),
    }));
    event(
        ctx,
        EventType::IterationDeleted,
        &row.partition_key,
        &row.row_key,
        "deleted",
        project,
        iteration,
        at,
        data,
    )
}

/// `chain.completed`: every entry of the iteration's chain is done, failed, skipped or refused.
/// One per iteration, whichever notification saw it complete (the id is the iteration's, and
/// the event points at that notification's row).
pub fn chain_completed(
    row: &HistoryRow,
    project: &str,
    iteration: &str,
    steps: &[StepRow],
    facts: &IterationFacts,
    ctx: &EventContext,
    now: OffsetDateTime,
) -> CloudEvent {
    let mut steps: Vec<&StepRow> = steps
        .iter()
        .filter(|s| s.iteration_id == iteration)
        .collect();
    steps.sort_by_key(|s| (s.position == 0, s.position));
    let exports: Vec<Value> = steps
        .iter()
        .map(|s| {
            json!({
                "platform": s.target.platform,
                "flavor": s.target.flavor,
                "status": s.state.map(|st| st.as_str()),
                "releaseUrl": s.release_url,
                "releasePath": s.release_path,
                "reason": (!s.reason.is_empty()).then_some(&s.reason),
            })
        })
        .collect();
    let data = object(json!({
        "projectId": project,
        "projectName": facts.project_name,
        "iterationId": iteration,
        "iterationName": facts.iteration_name,
        "metrics": {"precision": facts.precision, "recall": facts.recall, "mAP": facts.map},
        "exports": exports,
    }));
    let mut e = event(
        ctx,
        EventType::ChainCompleted,
        &row.partition_key,
        &row.row_key,
        "",
        project,
        iteration,
        now,
        data,
    );
    // The iteration's id, not the row's: two notifications that both see the chain complete
    // tell it once.
    e.id = event_id(project, &format!("Chain_{iteration}"), "complete");
    e
}

/// `io.cvchain.test`: what `cvchain events test` sends to every sink.
pub fn test_event(ctx: &EventContext, id: &str, now: OffsetDateTime) -> CloudEvent {
    CloudEvent {
        specversion: "1.0".into(),
        id: id.to_owned(),
        source: ctx.source.clone(),
        kind: EventType::Test.as_str().into(),
        subject: "test".into(),
        time: rfc3339(now),
        datacontenttype: DATA_CONTENT_TYPE.into(),
        traceparent: None,
        tracestate: None,
        data: json!({"message": "a test event from `cvchain events test`; ignore it"}),
    }
}

/// The outbox row of `event`, in the partition of the change it describes, for `sinks`, routed
/// as [`Routing::default`] routes (see [`outbox_row_routed`]).
pub fn outbox_row(
    partition_key: &str,
    event: &CloudEvent,
    describes: &str,
    sinks: &[Sink],
    sequence: &str,
) -> HistoryRow {
    outbox_row_routed(
        partition_key,
        event,
        describes,
        sinks,
        &Routing::default(),
        sequence,
    )
}

/// The outbox row of `event`, in the partition of the change it describes, for `sinks`; a chat
/// sink `routing` does not choose it for is recorded as skipped, never pending. `sequence`
/// orders the project's events (the adapter makes it from the clock at write time).
pub fn outbox_row_routed(
    partition_key: &str,
    event: &CloudEvent,
    describes: &str,
    sinks: &[Sink],
    routing: &Routing,
    sequence: &str,
) -> HistoryRow {
    let mut p = Props::new();
    p.set(Prop::EventType, RowKind::Outbox.as_str());
    p.set(Prop::CloudEventType, &event.kind);
    p.set(Prop::EventId, &event.id);
    p.set(Prop::Subject, &event.subject);
    if let Ok(t) = OffsetDateTime::parse(&event.time, &Rfc3339) {
        p.set(Prop::EventTime, t);
    }
    p.set(Prop::Sequence, sequence);
    let states = routing.initial_states(sinks, event);
    p.set(Prop::Pending, states.iter().any(|(_, s)| !s.is_done()));
    for (sink, state) in states.iter().filter(|(_, s)| s.is_done()) {
        p.set(sink.prop(), state.to_json());
    }
    p.set(Prop::Sinks, delivery::sinks_text(sinks));
    // Redacted and bounded here, so sealing the row leaves it as it is: the stored text is this
    // CloudEvent, never one cut or withheld whole.
    let stored = shape::stored(event);
    p.set(Prop::CloudEvent, stored.json);
    if let Some(note) = stored.trimmed {
        p.set(Prop::Note, format!("recorded {note}"));
    }
    p.set(Prop::DescribesRow, describes);
    if let Some(id) = event.data.get("projectId").and_then(Value::as_str) {
        p.set(Prop::ProjectId, id);
    }
    if let Some(id) = event.data.get("iterationId").and_then(Value::as_str) {
        p.set(Prop::IterationId, id);
    }
    HistoryRow {
        partition_key: partition_key.to_owned(),
        row_key: outbox_key(&event.id),
        properties: p,
    }
}

/// The outbox row key of an event id.
pub fn outbox_key(id: &str) -> String {
    safe_key(format!("{OUTBOX_PREFIX}{id}"))
}

/// Row keys of a partition's outbox lie in `[from, to)`.
pub fn outbox_key_range() -> (&'static str, &'static str) {
    ("Outbox_", "Outbox`")
}

/// An outbox row, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub partition_key: String,
    pub row_key: String,
    pub id: String,
    pub kind: String,
    pub sequence: String,
    pub time: Option<OffsetDateTime>,
    pub pending: bool,
    pub sinks: Vec<Sink>,
    /// The CloudEvent's JSON, exactly as every sink gets it (unless trimmed for one).
    pub event: String,
    pub subject: String,
    pub iteration_id: String,
    pub describes: String,
    pub states: Vec<(Sink, DeliveryState)>,
}

impl OutboxRow {
    pub fn from_row(row: &HistoryRow) -> Option<Self> {
        if row.kind() != Some(RowKind::Outbox) {
            return None;
        }
        let p = &row.properties;
        let sinks = delivery::parse_sinks(p.text(Prop::Sinks));
        let states = Sink::ALL
            .into_iter()
            .filter_map(|s| {
                let text = p.text(s.prop());
                (!text.is_empty()).then(|| (s, DeliveryState::parse(text)))
            })
            .collect();
        Some(Self {
            partition_key: row.partition_key.clone(),
            row_key: row.row_key.clone(),
            id: p.text(Prop::EventId).to_owned(),
            kind: p.text(Prop::CloudEventType).to_owned(),
            sequence: p.text(Prop::Sequence).to_owned(),
            time: p.time(Prop::EventTime),
            pending: p.flag(Prop::Pending).unwrap_or(false),
            sinks,
            event: p.text(Prop::CloudEvent).to_owned(),
            subject: p.text(Prop::Subject).to_owned(),
            iteration_id: p.text(Prop::IterationId).to_owned(),
            describes: p.text(Prop::DescribesRow).to_owned(),
            states,
        })
    }

    /// The delivery state for `sink` (pending, never tried, when none was recorded).
    pub fn state(&self, sink: Sink) -> DeliveryState {
        self.states
            .iter()
            .find(|(s, _)| *s == sink)
            .map(|(_, st)| st.clone())
            .unwrap_or_default()
    }

    /// The outbox rows among `rows`, in the order their events happened.
    pub fn all_in_order(rows: &[HistoryRow]) -> Vec<OutboxRow> {
        let mut out: Vec<OutboxRow> = rows.iter().filter_map(Self::from_row).collect();
        out.sort_by(|a, b| {
            (a.partition_key.as_str(), a.sequence.as_str(), a.id.as_str()).cmp(&(
                b.partition_key.as_str(),
                b.sequence.as_str(),
                b.id.as_str(),
            ))
        });
        out
    }
}

#[cfg(test)]
mod tests;
