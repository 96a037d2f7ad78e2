//! Delivery, decided: per-sink state on each outbox row, which events a sink takes next (in
//! order, never past one that is waiting for its retry), what an answer means (delivered, retry
//! later, or failed for good), the backoff, and events too large for a sink.

use super::chat::{self, ChatSelection};
use super::shape::{self, Bound, Measure};
use super::wire::{EventGridKind, QueueEncoding};
use super::{CloudEvent, EventContext, OutboxRow};
use crate::history::Prop;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::ops::Range;
use std::time::Duration;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Where events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sink {
    /// A Storage queue in cvchain's account (`CVCHAIN_EVENTS_QUEUE`).
    Queue,
    /// An Event Grid topic (`CVCHAIN_EVENTGRID_ENDPOINT`).
    EventGrid,
    /// An HTTP endpoint, signed as Standard Webhooks says (`CVCHAIN_WEBHOOK_URL`).
    Webhook,
    /// A Teams channel, through a Workflows webhook (`CVCHAIN_TEAMS_WEBHOOK_URL`): a message
    /// with an Adaptive Card, for the events people act on.
    Teams,
    /// A Slack channel, through an incoming webhook (`CVCHAIN_SLACK_WEBHOOK_URL`).
    Slack,
}

impl Sink {
    pub const ALL: [Sink; 5] = [
        Sink::Queue,
        Sink::EventGrid,
        Sink::Webhook,
        Sink::Teams,
        Sink::Slack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Sink::Queue => "queue",
            Sink::EventGrid => "eventgrid",
            Sink::Webhook => "webhook",
            Sink::Teams => "teams",
            Sink::Slack => "slack",
        }
    }

    /// A channel people read: it gets a message made from the event, and only the events
    /// [`ChatSelection`] chooses.
    pub fn is_chat(self) -> bool {
        matches!(self, Sink::Teams | Sink::Slack)
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// The outbox row property holding this sink's delivery state.
    pub fn prop(self) -> Prop {
        match self {
            Sink::Queue => Prop::QueueDelivery,
            Sink::EventGrid => Prop::EventGridDelivery,
            Sink::Webhook => Prop::WebhookDelivery,
            Sink::Teams => Prop::TeamsDelivery,
            Sink::Slack => Prop::SlackDelivery,
        }
    }

    /// The largest event (bytes of JSON) the sink takes; larger ones are sent with their data's
    /// strings shortened. A queue message holds 64 KiB (48 KiB before base64, should the text
    /// need it); an Event Grid event 1 MB; a webhook the ~20 kB the Standard Webhooks
    /// specification advises; a chat message the service's own limit ([`chat`]).
    pub fn max_event_bytes(self) -> usize {
        match self {
            Sink::Queue => 48 * 1024,
            Sink::EventGrid => 1_000_000,
            Sink::Webhook => 20 * 1024,
            Sink::Teams => chat::TEAMS_MAX_BYTES,
            Sink::Slack => 40_000,
        }
    }

    /// The bound an event's JSON must fit for this sink: the queue's counts the message as the
    /// encoding sends it (64 KiB), Event Grid's is the endpoint kind's.
    pub fn bound(self, routing: &Routing) -> Bound {
        match self {
            Sink::Queue => Bound {
                by: self.as_str(),
                limit: QueueEncoding::MAX_MESSAGE,
                measure: Measure::QueueMessage(routing.queue_encoding),
            },
            Sink::EventGrid => Bound {
                by: self.as_str(),
                limit: routing.event_grid.limits().max_event_bytes,
                measure: Measure::Bytes,
            },
            _ => Bound {
                by: self.as_str(),
                limit: self.max_event_bytes(),
                measure: Measure::Bytes,
            },
        }
    }
}

/// How the configured sinks take events, as far as the decisions need to know: the queue's
/// encoding, the kind of Event Grid endpoint, which events chat gets and where the console is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub queue_encoding: QueueEncoding,
    pub event_grid: EventGridKind,
    pub chat: ChatSelection,
    /// `CVCHAIN_CONSOLE_URL`, without a trailing `/`: chat messages link to
    /// `{console}/{projectId}`.
    pub console: Option<String>,
}

impl Routing {
    /// Whether `sink` is to take `event` at all: every event for a sink of events, the chosen
    /// ones for chat.
    pub fn wants(&self, sink: Sink, event: &CloudEvent) -> bool {
        !sink.is_chat() || self.chat.wants(event)
    }

    /// Each of `sinks`' state for a new (or replayed) event: pending, or skipped for a chat
    /// sink that is not to take it, so it never holds up the ones after it.
    pub fn initial_states(&self, sinks: &[Sink], event: &CloudEvent) -> Vec<(Sink, DeliveryState)> {
        sinks
            .iter()
            .map(|s| {
                let state = if self.wants(*s, event) {
                    DeliveryState::default()
                } else {
                    DeliveryState {
                        state: State::Skipped,
                        answer: Some(format!("not chosen by {}", chat::CHAT_EVENTS_SETTING)),
                        ..Default::default()
                    }
                };
                (*s, state)
            })
            .collect()
    }
}

pub fn sinks_text(sinks: &[Sink]) -> String {
    sinks
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn parse_sinks(text: &str) -> Vec<Sink> {
    text.split(',').filter_map(Sink::parse).collect()
}

/// Where one event stands with one sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not delivered yet: never tried, or waiting for its retry.
    #[default]
    Pending,
    Delivered,
    /// Given up: the sink refused it for good (a 4xx other than 408/429), or it kept failing
    /// for [`RetryPolicy::give_up_after`]. `cvchain events replay` sends it again.
    Failed,
    /// Not for this sink: a chat sink is told only the events `CVCHAIN_CHAT_EVENTS` chooses.
    /// Done, like delivered, so it holds up nothing.
    Skipped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Skipped => "skipped",
        }
    }
}

/// One event's delivery to one sink, as recorded on its outbox row (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryState {
    pub state: State,
    #[serde(default)]
    pub attempts: u32,
    /// RFC 3339: not before then (backoff, or the sink's `Retry-After`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<String>,
    /// The last answer: `HTTP 202`, or the sink's error (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Sent trimmed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl DeliveryState {
    /// A stored state; one that does not read counts as pending, never tried.
    pub fn parse(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_default()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a delivery state serializes")
    }

    pub fn is_done(&self) -> bool {
        self.state != State::Pending
    }

    fn next(&self) -> Option<OffsetDateTime> {
        self.next_at
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
    }

    /// Pending and not waiting for a retry.
    pub fn is_due(&self, now: OffsetDateTime) -> bool {
        self.state == State::Pending && self.next().is_none_or(|at| at <= now)
    }

    /// One line for `cvchain events`.
    pub fn describe(&self) -> String {
        let mut s = self.state.as_str().to_owned();
        if self.attempts > 0 && self.state != State::Delivered {
            s.push_str(&format!(" ({} attempts", self.attempts));
            if let (State::Pending, Some(at)) = (self.state, &self.next_at) {
                s.push_str(&format!(", next {at}"));
            }
            s.push(')');
        }
        if let Some(a) = &self.answer
            && !matches!(self.state, State::Delivered | State::Skipped)
        {
            s.push_str(&format!(": {a}"));
        }
        if let Some(n) = &self.note {
            s.push_str(&format!(" [{n}]"));
        }
        s
    }
}

/// How long to wait between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// After the first failure (`CVCHAIN_EVENTS_RETRY_SECONDS`); each next wait is 3× longer.
    pub first: Duration,
    pub max: Duration,
    /// Failures for this long after the first attempt: given up (recorded as failed).
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(5),
            max: Duration::from_secs(12 * 3600),
            give_up_after: Duration::from_secs(72 * 3600),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `attempts`-th failed attempt (1-based): 5 s, 15 s, 45 s, … up to
    /// `max`, with up to 10% jitter derived from `salt` so many events do not retry in step.
    pub fn backoff(&self, attempts: u32, salt: &str) -> Duration {
        let factor = 3u32.saturating_pow(attempts.saturating_sub(1).min(20));
        let base = self.first.saturating_mul(factor).min(self.max);
        let spread = salt
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
            % 100;
        base + base / 10 * spread / 100
    }
}

/// What one attempt to deliver got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Taken (2xx, or the message is on the queue).
    Delivered(String),
    /// Not taken. `status` is the HTTP status when there was an answer (none for a refused
    /// connection or a timeout); `detail` never holds a secret.
    Refused {
        status: Option<u16>,
        detail: String,
        retry_after: Option<Duration>,
    },
}

/// Whether a status means "do not send this again": a 4xx other than 408 and 429, or a redirect
/// (not followed: the URL is to be fixed).
pub fn is_permanent(status: u16) -> bool {
    (300..500).contains(&status) && status != 408 && status != 429
}

/// The state after an attempt.
pub fn after_attempt(
    prev: &DeliveryState,
    answer: &Answer,
    policy: &RetryPolicy,
    salt: &str,
    now: OffsetDateTime,
) -> DeliveryState {
    let now_text = super::rfc3339(now);
    let mut s = prev.clone();
    s.attempts = prev.attempts.saturating_add(1);
    s.last_at = Some(now_text.clone());
    if s.first_at.is_none() {
        s.first_at = Some(now_text);
    }
    match answer {
        Answer::Delivered(what) => {
            s.state = State::Delivered;
            s.next_at = None;
            s.answer = Some(what.clone());
        }
        Answer::Refused {
            status,
            detail,
            retry_after,
        } => {
            s.answer = Some(crate::redact::excerpt(detail, false, &[], 512));
            let first = s
                .first_at
                .as_deref()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                .unwrap_or(now);
            let elapsed = (now - first).unsigned_abs();
            if status.is_some_and(is_permanent) {
                s.state = State::Failed;
                s.next_at = None;
            } else if elapsed >= policy.give_up_after {
                s.state = State::Failed;
                s.next_at = None;
                s.answer = Some(format!(
                    "gave up after {} attempts: {}",
                    s.attempts,
                    s.answer.clone().unwrap_or_default()
                ));
            } else {
                let wait = retry_after
                    .map(|r| r.clamp(Duration::from_secs(1), Duration::from_secs(24 * 3600)))
                    .unwrap_or_else(|| policy.backoff(s.attempts, salt));
                s.state = State::Pending;
                s.next_at = Some(super::rfc3339(
                    now + time::Duration::try_from(wait).unwrap_or(time::Duration::HOUR),
                ));
            }
        }
    }
    s
}

/// The rows a delivery may send while a notification placed at `horizon` (the sequence of the
/// moment its processing began) is still being processed: those placed before it. That
/// notification writes its own events when it ends, in their place before anything written
/// meanwhile; sending a later event first would put the sink's order out. `rows` are one
/// project's, in order.
pub fn settled<'a>(rows: &'a [OutboxRow], horizon: Option<&str>) -> &'a [OutboxRow] {
    match horizon {
        None => rows,
        Some(h) => {
            let end = rows
                .iter()
                .position(|r| r.sequence.as_str() >= h)
                .unwrap_or(rows.len());
            &rows[..end]
        }
    }
}

/// The events `sink` takes now, in order: the project's pending events for it, up to the first
/// one still waiting for its retry (so a later event never overtakes an earlier one).
pub fn due_for(rows: &[OutboxRow], sink: Sink, now: OffsetDateTime) -> Vec<&OutboxRow> {
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| r.sinks.contains(&sink)) {
        let state = row.state(sink);
        if state.is_done() {
            continue;
        }
        if !state.is_due(now) {
            break;
        }
        out.push(row);
    }
    out
}

/// Whether some sink of the row still has to take it.
pub fn still_pending(row: &OutboxRow) -> bool {
    row.sinks.iter().any(|s| !row.state(*s).is_done())
}

/// The earliest moment one of the rows is due again for one of its sinks.
pub fn next_due(rows: &[OutboxRow]) -> Option<OffsetDateTime> {
    rows.iter()
        .flat_map(|r| r.sinks.iter().map(move |s| r.state(*s)))
        .filter(|s| s.state == State::Pending)
        .map(|s| s.next().unwrap_or(OffsetDateTime::UNIX_EPOCH))
        .min()
}

/// The requests a batch sink (Event Grid) takes `sizes` (each event's bytes) in: consecutive
/// events, in order, each request a JSON array of at most `max_bytes` and `max_events`. An event
/// that alone exceeds `max_bytes` (none does once fitted to the sink) goes alone.
pub fn batches(sizes: &[usize], max_bytes: usize, max_events: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        // `[`, `]`, and a comma between two events.
        let mut bytes = 2 + sizes[start];
        let mut end = start + 1;
        while end < sizes.len()
            && end - start < max_events.max(1)
            && bytes + 1 + sizes[end] <= max_bytes
        {
            bytes += 1 + sizes[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// An event as a sink gets it: a CloudEvent's JSON within the sink's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fitted {
    pub body: String,
    /// Why it was made smaller, when it was.
    pub trimmed: Option<String>,
    /// The trace context the event carries (its chain's), for the delivery's span and the
    /// webhook's `traceparent` header.
    pub trace: Option<crate::trace::TraceParent>,
}

/// The row's event as a CloudEvent within `sink`'s limit, as [`Routing::default`] routes it
/// (see [`fit`]).
pub fn for_sink(row: &OutboxRow, sink: Sink, ctx: &EventContext) -> Fitted {
    cloudevent_for(row, sink.bound(&Routing::default()), ctx)
}

/// The row's event as `sink` takes it. A sink of events gets the stored CloudEvent, its data's
/// strings shortened when it is larger than the sink takes ([`shape::for_sink`]); a chat sink
/// gets the message made from it ([`chat`]). A stored text that does not read as a CloudEvent
/// (written before events were shaped, and cut) is told by what the row says of it: its id,
/// type, subject and time, `source` from `ctx`, and its ids and history pointer as data.
pub fn fit(row: &OutboxRow, sink: Sink, ctx: &EventContext, routing: &Routing) -> Fitted {
    if sink.is_chat() {
        let event = row_event(row, ctx);
        return chat_for(&event, sink, routing);
    }
    cloudevent_for(row, sink.bound(routing), ctx)
}

/// The chat message of `event` for a chat sink (`cvchain events test` too).
pub fn chat_for(event: &CloudEvent, sink: Sink, routing: &Routing) -> Fitted {
    let summary = chat::summarize(&shape::redacted(event), routing.console.as_deref());
    let m = match sink {
        Sink::Slack => chat::slack_message(&summary),
        _ => chat::teams_message(&summary),
    };
    Fitted {
        body: m.body,
        trimmed: m.trimmed,
        trace: event.trace_parent(),
    }
}

fn row_event(row: &OutboxRow, ctx: &EventContext) -> CloudEvent {
    CloudEvent::from_json(&row.event).unwrap_or_else(|_| from_row(row, ctx))
}

fn cloudevent_for(row: &OutboxRow, bound: Bound, ctx: &EventContext) -> Fitted {
    let event = row_event(row, ctx);
    let shaped = shape::for_sink(&event, bound);
    Fitted {
        body: shaped.json,
        trimmed: shaped.trimmed.map(|t| format!("sent {t}")),
        trace: event.trace_parent(),
    }
}

fn from_row(row: &OutboxRow, ctx: &EventContext) -> CloudEvent {
    CloudEvent {
        specversion: "1.0".into(),
        id: row.id.clone(),
        source: ctx.source.clone(),
        kind: if row.kind.is_empty() {
            "io.cvchain.unknown".into()
        } else {
            row.kind.clone()
        },
        subject: row.subject.clone(),
        time: row.time.map(super::rfc3339).unwrap_or_default(),
        datacontenttype: super::DATA_CONTENT_TYPE.into(),
        traceparent: None,
        tracestate: None,
        data: json!({
            "projectId": row.partition_key,
            "iterationId": (!row.iteration_id.is_empty()).then_some(&row.iteration_id),
            "history": {"table": ctx.table, "partitionKey": row.partition_key, "rowKey": row.describes},
            "trimmed": {"by": "outbox", "note": "the stored event could not be read; its history row has every fact"},
        }),
    }
}
