//! An event as it is stored and sent: always a CloudEvent. It is built once as data; its string
//! values are redacted one by one (a value that still holds a secret is replaced, never the
//! event); and when it must be smaller than a bound (the outbox row, a sink's limit) its data's
//! strings are shortened and it is serialized again. Its JSON text is never cut: a cut inside a
//! string, or after an escape, is no longer JSON, and a webhook would get a signed body nobody
//! can read and Event Grid would refuse the whole batch.

use super::CloudEvent;
use crate::bounds::{MAX_PROPERTY_UNITS, encoded_units};
use crate::redact::{CUT_MARK, scrub, shorten};
use serde_json::{Map, Value, json};

/// Data members that are never shortened: what a consumer needs to find the rest.
const KEPT: [&str; 4] = ["projectId", "iterationId", "history", "trimmed"];

/// How a bound counts an event's JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// UTF-8 bytes, as a request body carries them (the sinks).
    Bytes,
    /// UTF-16 units once the JSON is itself a table string (`"` and `\` count twice), as the
    /// outbox row's property is counted (`bounds::encoded_units`).
    TableUnits,
    /// Bytes of the queue message the JSON makes, as the request carries it (base64, or text
    /// inside XML): the queue's 64 KiB limit is on that, not on the JSON.
    QueueMessage(super::wire::QueueEncoding),
}

impl Measure {
    pub fn of(self, json: &str) -> usize {
        match self {
            Measure::Bytes => json.len(),
            Measure::TableUnits => encoded_units(json),
            Measure::QueueMessage(encoding) => encoding.sent_size(json),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Measure::Bytes => "bytes",
            Measure::TableUnits => "UTF-16 units as stored",
            Measure::QueueMessage(super::wire::QueueEncoding::Base64) => "bytes as sent (base64)",
            Measure::QueueMessage(super::wire::QueueEncoding::None) => {
                "bytes as sent (text in XML)"
            }
        }
    }
}

/// A bound an event must fit: who sets it, how large, counted how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// `outbox`, `queue`, `eventgrid`, `webhook`: said in the event's `trimmed` member.
    pub by: &'static str,
    pub limit: usize,
    pub measure: Measure,
}

/// An event ready to store or send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shaped {
    /// A CloudEvent's JSON, within the bound.
    pub json: String,
    /// Why it was made smaller, when it was.
    pub trimmed: Option<String>,
}

/// The event with every string value redacted (`redact::scrub`): a secret's value becomes
/// `REDACTED`, and a value that still holds one in a spelling that cannot be redacted in place
/// is replaced by `redact::WITHHELD`. Member names are cvchain's own and stay.
pub fn redacted(event: &CloudEvent) -> CloudEvent {
    CloudEvent {
        specversion: event.specversion.clone(),
        id: scrub(&event.id),
        source: scrub(&event.source),
        kind: event.kind.clone(),
        subject: scrub(&event.subject),
        time: event.time.clone(),
        datacontenttype: event.datacontenttype.clone(),
        // Only a valid W3C context is kept: it is hex, so it cannot spell a secret.
        traceparent: event
            .trace_parent()
            .map(|_| event.traceparent.clone().unwrap_or_default()),
        tracestate: event
            .tracestate
            .as_deref()
            .map(scrub)
            .filter(|s| s.len() <= 512),
        data: scrub_value(&event.data),
    }
}

fn scrub_value(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(scrub(s)),
        Value::Array(items) => Value::Array(items.iter().map(scrub_value).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), scrub_value(v))).collect())
        }
        other => other.clone(),
    }
}

/// The event's JSON within `bound`: as it is when it fits; else with its data's longest strings
/// shortened (each ending in [`CUT_MARK`]) just enough, and a `trimmed` member saying so; else,
/// when even that does not fit, its data reduced to the ids and the history pointer.
pub fn shrink(event: &CloudEvent, bound: Bound) -> Shaped {
    let json = event.to_json();
    let size = bound.measure.of(&json);
    if size <= bound.limit {
        return Shaped {
            json,
            trimmed: None,
        };
    }
    let note = format!(
        "trimmed: {size} {} over the {}'s limit of {}",
        bound.measure.unit(),
        bound.by,
        bound.limit
    );
    let longest = longest_string(&event.data);
    // The largest length every string may keep that still fits (the size grows with it).
    let (mut lo, mut hi) = (0usize, longest);
    let mut best: Option<String> = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let (candidate, cut) = with_strings_cut(event, mid, size, bound);
        if cut > 0 && bound.measure.of(&candidate) <= bound.limit {
            // Fits: try keeping more.
            best = Some(candidate);
            lo = mid + 1;
        } else if mid == 0 {
            break;
        } else {
            hi = mid - 1;
        }
    }
    let json = best.unwrap_or_else(|| ids_only(event, size, bound));
    Shaped {
        json,
        trimmed: Some(note),
    }
}

/// The event for the outbox row: redacted, within [`super::OUTBOX_MAX_EVENT`] as the table
/// counts it, and stable under the row's sealing (which redacts and bounds every property), so
/// what is stored is exactly this CloudEvent.
pub fn stored(event: &CloudEvent) -> Shaped {
    let bound = Bound {
        by: "outbox",
        limit: super::OUTBOX_MAX_EVENT,
        measure: Measure::TableUnits,
    };
    let clean = redacted(event);
    let shaped = shrink(&clean, bound);
    if seals_unchanged(&shaped.json) {
        return shaped;
    }
    // Values redacted one by one make a text redaction leaves alone; should some spelling
    // across values still read as a secret, the ids are what is left to tell.
    let size = bound.measure.of(&clean.to_json());
    Shaped {
        json: ids_only(&clean, size, bound),
        trimmed: Some("reduced to its ids: its text read as holding a secret".into()),
    }
}

/// The event for a sink whose limit is `bound`.
pub fn for_sink(event: &CloudEvent, bound: Bound) -> Shaped {
    shrink(&redacted(event), bound)
}

/// Whether sealing a row (`history::seal`: scrub, then the property bound) leaves `json` as it
/// is.
pub fn seals_unchanged(json: &str) -> bool {
    encoded_units(json) <= MAX_PROPERTY_UNITS && scrub(json) == json
}

fn longest_string(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(longest_string).max().unwrap_or(0),
        Value::Object(m) => m
            .iter()
            .filter(|(k, _)| !KEPT.contains(&k.as_str()))
            .map(|(_, v)| longest_string(v))
            .max()
            .unwrap_or(0),
        _ => 0,
    }
}

/// The event with every string of its data (but the [`KEPT`] members) cut to `max_chars`, a
/// `trimmed` member added; and how many strings were cut.
fn with_strings_cut(
    event: &CloudEvent,
    max_chars: usize,
    size: usize,
    bound: Bound,
) -> (String, usize) {
    let mut cut = 0;
    let mut data = match &event.data {
        Value::Object(m) => Map::from_iter(m.iter().map(|(k, v)| {
            let v = if KEPT.contains(&k.as_str()) {
                v.clone()
            } else {
                cut_strings(v, max_chars, &mut cut)
            };
            (k.clone(), v)
        })),
        other => {
            let mut m = Map::new();
            m.insert("value".into(), cut_strings(other, max_chars, &mut cut));
            m
        }
    };
    data.insert(
        "trimmed".into(),
        json!({
            "by": bound.by,
            "size": size,
            "limit": bound.limit,
            "strings": cut,
            "note": format!("strings longer than {max_chars} characters were shortened (they end in {CUT_MARK}); the history row has every fact"),
        }),
    );
    let e = CloudEvent {
        data: Value::Object(data),
        ..event.clone()
    };
    (e.to_json(), cut)
}

fn cut_strings(v: &Value, max_chars: usize, cut: &mut usize) -> Value {
    match v {
        Value::String(s) => {
            let short = shorten(s, max_chars);
            if short != *s {
                *cut += 1;
            }
            Value::String(short)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| cut_strings(i, max_chars, cut))
                .collect(),
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), cut_strings(v, max_chars, cut)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The attributes with `data` reduced to the ids, the history pointer and `trimmed`; with the
/// attributes themselves too large (a `source` of kilobytes), the required ones only.
fn ids_only(event: &CloudEvent, size: usize, bound: Bound) -> String {
    let keep = |k: &str| event.data.get(k).cloned().unwrap_or(Value::Null);
    let trimmed = json!({
        "by": bound.by,
        "size": size,
        "limit": bound.limit,
        "note": "the data was reduced to its ids; the full event is in the outbox row (`cvchain events --json`) unless it was trimmed there too, and the history row has every fact",
    });
    let e = CloudEvent {
        data: json!({
            "projectId": keep("projectId"),
            "iterationId": keep("iterationId"),
            "history": keep("history"),
            "trimmed": trimmed,
        }),
        ..event.clone()
    };
    let body = e.to_json();
    if bound.measure.of(&body) <= bound.limit {
        return body;
    }
    let mut last = json!({
        "specversion": "1.0",
        "id": event.id,
        "source": shorten(&event.source, 256),
        "type": event.kind,
        "datacontenttype": super::DATA_CONTENT_TYPE,
        "data": {"trimmed": {"by": bound.by, "size": size, "limit": bound.limit}},
    });
    if let Some(tp) = event.trace_parent() {
        last["traceparent"] = Value::String(tp.header());
    }
    last.to_string()
}
