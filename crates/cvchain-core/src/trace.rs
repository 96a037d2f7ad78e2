//! Distributed tracing, decided in pure code: which trace an invocation joins, how a W3C
//! `traceparent` is written and read, what an invocation's and a call's attributes are, and what
//! an attribute value may say. The exporters, spans and metrics are the application's
//! (`src/telemetry.rs`) and the adapters' (`cvchain_azure::telemetry`); nothing here knows them.
//!
//! Neither the Functions host (its custom-handler request carries `Data` and `Metadata` only) nor
//! Custom Vision's notifications carry a trace context, so cvchain makes its own: every
//! invocation that concerns one iteration of one project joins the trace whose id is derived
//! from the project and iteration ids ([`chain_trace_id`]), so a redelivery, on any instance,
//! lands in the same trace; any other message joins the trace of its message key
//! ([`message_trace_id`]), so its redeliveries land together too.

use crate::message::Incoming;
use crate::notification::Notification;
use crate::redact::{scrub, shorten, url_without_secrets};
use sha2::{Digest, Sha256};
use std::fmt;
use uuid::Uuid;

/// A W3C trace id: 16 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A W3C span (parent) id: 8 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

fn hex(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(&self.0, f)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(&self.0, f)
    }
}

impl TraceId {
    pub fn to_u128(self) -> u128 {
        u128::from_be_bytes(self.0)
    }

    pub fn from_u128(v: u128) -> Option<Self> {
        (v != 0).then(|| TraceId(v.to_be_bytes()))
    }
}

impl SpanId {
    pub fn to_u64(self) -> u64 {
        u64::from_be_bytes(self.0)
    }

    pub fn from_u64(v: u64) -> Option<Self> {
        (v != 0).then(|| SpanId(v.to_be_bytes()))
    }
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    h.finalize().into()
}

fn trace_id_of(d: [u8; 32]) -> TraceId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    if id == [0; 16] {
        // SHA-256 prefixes of zero are as likely as any other; W3C forbids the all-zero id.
        id[15] = 1;
    }
    TraceId(id)
}

/// The trace of one iteration's chain: its TrainingCompleted, every ExportCompleted, the channel
/// moves and the deliveries of their events. The same ids always give the same trace.
pub fn chain_trace_id(project: Uuid, iteration: Uuid) -> TraceId {
    trace_id_of(digest(&[
        b"cvchain-chain",
        project.as_bytes(),
        iteration.as_bytes(),
    ]))
}

/// The trace of a message that concerns no iteration (a ConnectionTest, an unknown or
/// unreadable message): its message key, so its redeliveries share it.
pub fn message_trace_id(message_key: &str) -> TraceId {
    trace_id_of(digest(&[b"cvchain-message", message_key.as_bytes()]))
}

/// The trace an incoming message joins.
pub fn trace_id_for(incoming: &Incoming) -> TraceId {
    match incoming.parsed.as_ref().ok().map(|p| &p.notification) {
        Some(n) => match (n.project_id(), n.iteration_id()) {
            (Some(p), Some(i)) => chain_trace_id(p, i),
            _ => message_trace_id(&incoming.key),
        },
        None => message_trace_id(&incoming.key),
    }
}

/// A parent span id for an event whose producer recorded no span (telemetry off): derived from
/// the event's id, so the event always carries a valid `traceparent` in its chain's trace.
pub fn event_span_id(event_id: &str) -> SpanId {
    let d = digest(&[b"cvchain-event", event_id.as_bytes()]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    SpanId(id)
}

/// A W3C trace context (`traceparent`, version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// `00-<trace id>-<parent id>-<flags>`, lower-case hex.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id,
            self.parent_id,
            if self.sampled { "01" } else { "00" }
        )
    }

    /// Reads a `traceparent` as W3C Trace Context level 1 says a receiver must: version `00`
    /// exactly four fields; a later version (not `ff`) at least the first four; lower-case hex
    /// only; neither id all zero. Anything else is `None` (start a new trace).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim_matches([' ', '\t']);
        let mut parts = text.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        let rest: Vec<&str> = parts.collect();
        let lower_hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2) || version == "ff" || !lower_hex(flags, 2) {
            return None;
        }
        if version == "00" && !rest.is_empty() {
            return None;
        }
        if !lower_hex(trace, 32) || !lower_hex(parent, 16) {
            return None;
        }
        let trace_id = TraceId::from_u128(u128::from_str_radix(trace, 16).ok()?)?;
        let parent_id = SpanId::from_u64(u64::from_str_radix(parent, 16).ok()?)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }
}

/// The longest attribute value cvchain records (characters): a reason or a status line, never
/// a document.
pub const MAX_ATTRIBUTE_CHARS: usize = 512;

/// A text fit to be a span or metric attribute: redacted as logs and rows are
/// ([`scrub`]: a secret's value becomes `REDACTED`, a text that still holds one is withheld) and
/// shortened to [`MAX_ATTRIBUTE_CHARS`] so that a cut never leaves part of a secret.
pub fn attribute(text: &str) -> String {
    shorten(&scrub(text), MAX_ATTRIBUTE_CHARS)
}

/// A URL fit to be an attribute (`url.full`): no query (a SAS, a webhook's `?code=`), no
/// fragment, no user info, redacted.
pub fn url_attribute(url: &str) -> String {
    attribute(&url_without_secrets(url))
}

/// What an HTTP client span says about where a request went (OpenTelemetry's HTTP client
/// conventions): `server.address`, `server.port` and `url.full`, the URL without its query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub server_address: String,
    pub server_port: u16,
    pub url_full: String,
}

/// The attributes of a request to `url`.
pub fn http_target(url: &url::Url) -> HttpTarget {
    HttpTarget {
        server_address: url.host_str().unwrap_or_default().to_owned(),
        server_port: url.port_or_known_default().unwrap_or(0),
        url_full: url_attribute(url.as_str()),
    }
}

/// An HTTP client span's name: the method alone (the conventions' name when no route template
/// is known; paths hold ids and names, which would make every span name unique).
pub fn http_span_name(method: &str) -> String {
    method.to_ascii_uppercase()
}

/// What kind of notification an invocation handled, as spans and metrics name it: the status
/// the history row records (`TrainingCompleted`, `ExportFailed`, `ConnectionTest`, …), `Unknown`
/// for a type or version cvchain does not know, `Unreadable` for a text that is no
/// notification.
pub fn notification_kind(incoming: &Incoming) -> &'static str {
    match incoming.parsed.as_ref().ok().map(|p| &p.notification) {
        Some(Notification::ConnectionTest { .. }) => "ConnectionTest",
        Some(n @ (Notification::Training { .. } | Notification::Export { .. })) => {
            n.status().as_str()
        }
        Some(Notification::Unknown { .. }) => "Unknown",
        None => "Unreadable",
    }
}

/// How an invocation ended, as spans and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Understood and recorded.
    Recorded,
    /// A redelivery of something already recorded: nothing changed.
    Duplicate,
    /// Rejected for good, recorded and copied to the poison queue.
    Rejected,
    /// Not ready yet (another instance holds a claim, Custom Vision is not done): the message is
    /// retried.
    Retry,
    /// Failed; the message is retried (or poisoned on its last delivery).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Recorded => "recorded",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected => "rejected",
            Outcome::Retry => "retry",
            Outcome::Failed => "failed",
        }
    }

    /// Whether the span's status is an error (`Retry` is the chain waiting, not a fault).
    pub fn is_error(self) -> bool {
        matches!(self, Outcome::Failed)
    }
}

/// The attributes an invocation's span starts with: the notification's kind and ids
/// (`cvchain.*`), and the message's (`messaging.*`, OpenTelemetry's messaging conventions).
pub fn invocation_attributes(incoming: &Incoming) -> Vec<(&'static str, String)> {
    let mut out = vec![
        (NOTIFICATION_KIND, notification_kind(incoming).to_owned()),
        (
            "messaging.message.id",
            attribute(incoming.received.message_id.as_deref().unwrap_or_default()),
        ),
        (DEQUEUE_COUNT, incoming.received.dequeue_count.to_string()),
    ];
    if let Ok(parsed) = &incoming.parsed {
        if let Some(p) = parsed.notification.project_id() {
            out.push((PROJECT_ID, p.to_string()));
        }
        if let Some(i) = parsed.notification.iteration_id() {
            out.push((ITERATION_ID, i.to_string()));
        }
    }
    out.retain(|(_, v)| !v.is_empty());
    out
}

/// Attribute names of cvchain's own (no convention has them).
pub const NOTIFICATION_KIND: &str = "cvchain.notification.kind";
pub const PROJECT_ID: &str = "cvchain.project.id";
pub const ITERATION_ID: &str = "cvchain.iteration.id";
pub const DEQUEUE_COUNT: &str = "cvchain.dequeue_count";
pub const OUTCOME: &str = "cvchain.outcome";
pub const DECISION: &str = "cvchain.decision";
/// Which service a client call went to: `table`, `blob`, `queue`, `customvision`, `eventgrid`,
/// `webhook`.
pub const SERVICE: &str = "cvchain.service";
pub const SINK: &str = "cvchain.sink";

/// The metrics, by name. Those with a convention take its name; cvchain's own are `cvchain.*`.
pub mod metric {
    /// Histogram, seconds: every invocation, by `faas.trigger`, kind and outcome (its count is
    /// the number of invocations).
    pub const INVOKE_DURATION: &str = "faas.invoke_duration";
    /// Counter: invocations, by `faas.trigger`, kind and outcome.
    pub const INVOCATIONS: &str = "faas.invocations";
    /// Histogram, seconds: every HTTP request to storage, Custom Vision and the sinks, by
    /// service, method and status.
    pub const HTTP_CLIENT_DURATION: &str = "http.client.request.duration";
    /// Counter: Custom Vision calls (each attempt), by operation and status.
    pub const CUSTOM_VISION_CALLS: &str = "cvchain.customvision.calls";
    /// Counter: Custom Vision answers of 429 (throttled), by operation.
    pub const CUSTOM_VISION_THROTTLED: &str = "cvchain.customvision.throttled";
    /// Counter: storage requests (each attempt), by service, method and status.
    pub const STORAGE_REQUESTS: &str = "cvchain.storage.requests";
    /// Counter: the gate's verdicts, by `cvchain.gate.verdict`.
    pub const GATE_VERDICTS: &str = "cvchain.gate.verdicts";
    /// Counter: channel moves, by channel, reason and outcome (`moved`, `failed`).
    pub const CHANNEL_MOVES: &str = "cvchain.channel.moves";
    /// Counter: event deliveries (each event, each sink, each attempt), by sink and outcome
    /// (`delivered`, `retry`, `failed`).
    pub const EVENT_DELIVERIES: &str = "cvchain.event.deliveries";
    /// Gauge, seconds: how long the oldest event still pending has waited, as the last delivery
    /// round over every project saw it (0 when none is pending).
    pub const OUTBOX_OLDEST_AGE: &str = "cvchain.outbox.oldest_pending_age";
    /// Counter: spans and metric exports telemetry dropped (the collector away or too slow).
    pub const TELEMETRY_DROPPED: &str = "cvchain.telemetry.dropped";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Received;

    fn incoming(text: &str) -> Incoming {
        Incoming::decode(Received {
            text: text.into(),
            message_id: Some("m-1".into()),
            dequeue_count: 2,
            received_at: time::OffsetDateTime::UNIX_EPOCH,
        })
    }

    const P: &str = "11111111-2222-3333-4444-555555555555";
    const I: &str = "66666666-7777-8888-9999-000000000000";

    fn training(status: &str) -> String {
        format!(
            r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{P}","iterationId":"{I}","trainingStatus":"{status}"}}}}"#
        )
    }

    fn export(id_suffix: &str) -> String {
        format!(
            r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}","exportStatus":"ExportCompleted","modelUri":"https://a.blob.core.windows.net/b/x{id_suffix}?sv=1&sig=abc"}}}}"#
        )
    }

    #[test]
    fn every_notification_of_one_iteration_joins_one_trace() {
        let p = Uuid::parse_str(P).unwrap();
        let i = Uuid::parse_str(I).unwrap();
        let chain = chain_trace_id(p, i);
        for text in [
            training("TrainingCompleted"),
            export("1"),
            export("2"),
            training("TrainingFailed"),
        ] {
            assert_eq!(trace_id_for(&incoming(&text)), chain, "{text}");
        }
        // Another iteration, another project: another trace.
        assert_ne!(chain_trace_id(p, p), chain);
        assert_ne!(chain_trace_id(i, p), chain);
        // Not random: the same ids always give the same id (another instance agrees).
        assert_eq!(
            chain.to_string(),
            chain_trace_id(Uuid::parse_str(P).unwrap(), Uuid::parse_str(I).unwrap()).to_string()
        );
        assert_eq!(chain.to_string().len(), 32);
    }

    #[test]
    fn a_message_of_no_iteration_joins_the_trace_of_its_key() {
        let test = format!(
            r#"{{"version":"1.0","type":"ConnectionTest","Content":{{"projectId":"{P}"}}}}"#
        );
        let a = incoming(&test);
        assert_eq!(trace_id_for(&a), message_trace_id(&a.key));
        assert_eq!(trace_id_for(&incoming(&test)), trace_id_for(&a));
        let mut junk = incoming("not a notification");
        junk.key = "m-2".into();
        assert_eq!(trace_id_for(&junk), message_trace_id("m-2"));
        assert_ne!(trace_id_for(&junk), trace_id_for(&a));
        assert_eq!(notification_kind(&junk), "Unreadable");
        assert_eq!(notification_kind(&a), "ConnectionTest");
    }

    #[test]
    fn traceparent_is_written_and_read_as_w3c_says() {
        let tp = TraceParent {
            trace_id: TraceId([
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ]),
            parent_id: SpanId([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]),
            sampled: true,
        };
        // The specification's own example.
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(tp.header(), text);
        assert_eq!(TraceParent::parse(text), Some(tp));
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!TraceParent::parse(unsampled).unwrap().sampled);
        // A later version with more fields is read; version ff, upper case, zero ids, extra
        // fields on 00 and wrong lengths are not.
        assert!(TraceParent::parse(&format!("cc{}-what-the-future-holds", &text[2..])).is_some());
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_event_without_a_span_gets_a_stable_parent() {
        assert_eq!(event_span_id("e-1"), event_span_id("e-1"));
        assert_ne!(event_span_id("e-1"), event_span_id("e-2"));
        assert_ne!(event_span_id("e-1").0, [0; 8]);
    }

    #[test]
    fn attributes_never_hold_a_secret_or_a_query() {
        let url = url::Url::parse(
            "https://acct.blob.core.windows.net/models/a%20b/m.zip?sv=2024&sig=c2VjcmV0&se=2030",
        )
        .unwrap();
        let t = http_target(&url);
        assert_eq!(t.server_address, "acct.blob.core.windows.net");
        assert_eq!(t.server_port, 443);
        assert_eq!(
            t.url_full,
            "https://acct.blob.core.windows.net/models/a%20b/m.zip"
        );
        let hook =
            url::Url::parse("http://user:pw@127.0.0.1:9000/hooks?code=function-key").unwrap();
        let t = http_target(&hook);
        assert_eq!(t.url_full, "http://127.0.0.1:9000/hooks");
        assert_eq!(t.server_port, 9000);
        // A path that spells a SAS signature (a blob named so) is redacted like a log line.
        let spelled =
            url::Url::parse("https://a.blob.core.windows.net/c/x%26sig%3Dc2VjcmV0").unwrap();
        assert!(crate::redact::find_leak(&http_target(&spelled).url_full).is_none());
        // A reason quoting a key: redacted, and bounded.
        let reason = format!(
            "failed: AccountKey=c2VjcmV0a2V5c2VjcmV0a2V5; {}",
            "x".repeat(2000)
        );
        let a = attribute(&reason);
        assert!(!a.contains("c2VjcmV0a2V5"), "{a}");
        assert!(a.chars().count() <= MAX_ATTRIBUTE_CHARS + 1);
        assert!(crate::redact::find_leak(&a).is_none());
        assert_eq!(http_span_name("get"), "GET");
    }

    #[test]
    fn an_invocation_says_its_kind_ids_and_message() {
        let attrs = invocation_attributes(&incoming(&export("1")));
        let get = |k: &str| attrs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get(NOTIFICATION_KIND), Some("ExportCompleted"));
        assert_eq!(get(PROJECT_ID), Some(P));
        assert_eq!(get(ITERATION_ID), Some(I));
        assert_eq!(get("messaging.message.id"), Some("m-1"));
        assert_eq!(get(DEQUEUE_COUNT), Some("2"));
        // The model URI (with its SAS) is not an attribute at all.
        assert!(attrs.iter().all(|(_, v)| !v.contains("sig")));
        assert_eq!(Outcome::Retry.as_str(), "retry");
        assert!(Outcome::Failed.is_error() && !Outcome::Retry.is_error());
    }
}
