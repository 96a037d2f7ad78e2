//! The Azure Functions custom-handler envelope, as the host (runtime v4) really sends it.
//!
//! Strings arrive JSON-encoded twice, numbers arrive as strings, and a non-2xx answer loses its
//! body: see `reference/functions-host-protocol.md`. Pure decoding and encoding, no I/O.

use serde::Serialize;
use serde_json::{Map, Value};

/// The function folder name, and so the path the host POSTs to.
pub const FUNCTION_NAME: &str = "CustomVisionNotification";
/// The queue trigger's binding name in `function.json`.
pub const TRIGGER_BINDING: &str = "notification";

/// What a queue-trigger invocation carries that cvchain uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInvocation {
    /// The queue message text, decoded from the host's encoding.
    pub message_text: String,
    /// The queue message id (stable across redeliveries).
    pub message_id: Option<String>,
    /// 1 on the first delivery.
    pub dequeue_count: u32,
    /// Notes about tolerated oddities, for the invocation's logs.
    pub notes: Vec<String>,
}

/// An envelope cvchain cannot read at all. Retrying the same body cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("invocation body is not JSON: {0}")]
    NotJson(String),
    #[error("invocation body must be a JSON object with `Data`")]
    NotAnObject,
    #[error("invocation body has no `Data` object")]
    MissingData,
    #[error("`Data` has no `{0}` value (the queue trigger binding)")]
    MissingBinding(String),
}

/// Decodes the host's POST body for a queue trigger bound as `binding`.
pub fn decode_queue_invocation(
    body: &[u8],
    binding: &str,
) -> Result<QueueInvocation, EnvelopeError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        EnvelopeError::NotJson(format!("invalid UTF-8 at byte {}", e.valid_up_to()))
    })?;
    let root: Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    let root = root.as_object().ok_or(EnvelopeError::NotAnObject)?;
    let data = get_ci(root, "Data")
        .and_then(Value::as_object)
        .ok_or(EnvelopeError::MissingData)?;
    let mut notes = Vec::new();
    let message_text = match get_ci(data, binding) {
        None | Some(Value::Null) => return Err(EnvelopeError::MissingBinding(binding.to_owned())),
        Some(Value::String(s)) => unwrap_host_string(s),
        // A host that passes the message parsed: give the parser the JSON text back.
        Some(other) => {
            notes.push(format!("`Data.{binding}` arrived as JSON, not as a string"));
            other.to_string()
        }
    };
    let metadata = get_ci(root, "Metadata").and_then(Value::as_object);
    let message_id = metadata
        .and_then(|m| get_ci(m, "Id"))
        .and_then(|v| match v {
            Value::String(s) => Some(unwrap_host_string(s)),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let dequeue_count = match metadata.and_then(|m| get_ci(m, "DequeueCount")) {
        None | Some(Value::Null) => 1,
        Some(v) => match number_or_string(v) {
            Some(n) => n.clamp(1, u32::MAX as u64) as u32,
            None => {
                notes.push("`Metadata.DequeueCount` is not a number; taken as 1".into());
                1
            }
        },
    };
    Ok(QueueInvocation {
        message_text,
        message_id,
        dequeue_count,
        notes,
    })
}

/// The host JSON-encodes strings twice: `"\"hello\""` holds `hello`. A string that is not itself a
/// JSON string literal is taken as it is, in case a host ever sends it once.
pub fn unwrap_host_string(s: &str) -> String {
    match serde_json::from_str::<String>(s) {
        Ok(inner) => inner,
        Err(_) => s.to_owned(),
    }
}

fn number_or_string(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => {
            let s = unwrap_host_string(s);
            s.trim().parse::<u64>().ok()
        }
        _ => None,
    }
}

/// The host spells keys one way; other callers may not.
fn get_ci<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// The timer-triggered function that delivers pending events (`functions/DeliverEvents`).
pub const DELIVER_EVENTS_FUNCTION: &str = "DeliverEvents";
/// Its timer binding's name: `Data.timer` holds the host's `TimerInfo`.
pub const TIMER_BINDING: &str = "timer";

/// What a timer invocation says: whether the run is late (`IsPastDue`, after a restart). The
/// host sends `{"Data": {"timer": {"Schedule": …, "ScheduleStatus": …, "IsPastDue": false}},
/// "Metadata": {…}}`; anything else that is a JSON object is accepted too, since a timer run
/// needs nothing from it.
pub fn timer_is_past_due(body: &[u8]) -> Result<bool, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(root) = v else {
        return Err("not a JSON object".into());
    };
    let timer = get_ci(&root, "Data")
        .and_then(Value::as_object)
        .and_then(|d| get_ci(d, TIMER_BINDING))
        .and_then(Value::as_object);
    Ok(timer.and_then(|t| get_ci(t, "IsPastDue")).is_some_and(|p| {
        p == &Value::Bool(true) || p.as_str().is_some_and(|s| s.eq_ignore_ascii_case("true"))
    }))
}

/// The answer the host expects: always a JSON object, never an empty body.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InvocationResponse {
    #[serde(rename = "Outputs")]
    pub outputs: Map<String, Value>,
    #[serde(rename = "Logs")]
    pub logs: Vec<String>,
    #[serde(rename = "ReturnValue")]
    pub return_value: Value,
}

impl InvocationResponse {
    pub fn with_logs(logs: Vec<String>) -> Self {
        Self {
            outputs: Map::new(),
            logs,
            return_value: Value::Null,
        }
    }
}

/// The body the host POSTs for a queue message, built the way the host builds it (for
/// `cvchain invoke` and local runs): the text JSON-encoded twice, the count as a string, the id
/// double-encoded. `now` and `rand_guid` fill the host's `sys` block.
pub fn encode_queue_invocation(
    message_text: &str,
    message_id: &str,
    dequeue_count: u32,
    now: time::OffsetDateTime,
    rand_guid: uuid::Uuid,
) -> String {
    let twice = |s: &str| Value::String(Value::String(s.to_owned()).to_string());
    let now = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    serde_json::json!({
        "Data": { TRIGGER_BINDING: twice(message_text) },
        "Metadata": {
            "DequeueCount": dequeue_count.to_string(),
            "Id": twice(message_id),
            "InsertionTime": now,
            "PopReceipt": twice("cvchain-invoke"),
            "sys": { "MethodName": FUNCTION_NAME, "UtcNow": now, "RandGuid": rand_guid.to_string() }
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_invocation_says_whether_it_is_late() {
        let body = br#"{"Data":{"timer":{"Schedule":{"AdjustForDST":true},
            "ScheduleStatus":{"Last":"2026-12-01T10:00:00+00:00","Next":"2026-12-01T10:01:00+00:00",
            "LastUpdated":"2026-12-01T10:00:00+00:00"},"IsPastDue":true}},
            "Metadata":{"sys":{"MethodName":"DeliverEvents","UtcNow":"2026-12-01T10:01:00.1Z","RandGuid":"x"}}}"#;
        assert_eq!(timer_is_past_due(body), Ok(true));
        assert_eq!(
            timer_is_past_due(br#"{"Data":{"timer":{"IsPastDue":"False"}}}"#),
            Ok(false)
        );
        assert_eq!(timer_is_past_due(b"{}"), Ok(false));
        assert!(timer_is_past_due(b"[").is_err());
    }

    #[test]
    fn the_encoder_produces_what_the_decoder_reads_in_the_hosts_shape() {
        let text = r#"{"version":"1.0","type":"ConnectionTest"}"#;
        let body = encode_queue_invocation(
            text,
            "id-1",
            4,
            time::OffsetDateTime::UNIX_EPOCH,
            uuid::Uuid::nil(),
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["Metadata"]["DequeueCount"], "4");
        assert_eq!(v["Metadata"]["Id"], "\"id-1\"");
        assert_eq!(
            v["Data"]["notification"],
            serde_json::to_string(text).unwrap()
        );
        let inv = decode_queue_invocation(body.as_bytes(), TRIGGER_BINDING).unwrap();
        assert_eq!(inv.message_text, text);
        assert_eq!(inv.message_id.as_deref(), Some("id-1"));
        assert_eq!(inv.dequeue_count, 4);
    }

    /// The captured request from the reference, with the binding renamed.
    const CAPTURED: &str = r#"{"Data": {"notification": "\"hello!!\""},
 "Metadata": {"DequeueCount": "1", "ExpirationTime": "2025-02-25T03:06:19+00:00",
   "Id": "\"52d53c5f-e212-487e-998b-abbe3b9d51e4\"", "InsertionTime": "2025-02-18T03:06:19+00:00",
   "NextVisibleTime": "2025-02-18T03:16:20+00:00", "PopReceipt": "\"MThGZWIyMDI1MDM6MDY6MjA3NjM1\"",
   "sys": {"MethodName": "notification", "RandGuid": "e59556b5-0000-0000-0000-000000000000",
           "UtcNow": "2025-02-18T03:06:20.7562691Z"}}}"#;

    #[test]
    fn the_captured_host_request_decodes() {
        let inv = decode_queue_invocation(CAPTURED.as_bytes(), TRIGGER_BINDING).unwrap();
        assert_eq!(inv.message_text, "hello!!");
        assert_eq!(
            inv.message_id.as_deref(),
            Some("52d53c5f-e212-487e-998b-abbe3b9d51e4")
        );
        assert_eq!(inv.dequeue_count, 1);
        assert!(inv.notes.is_empty());
    }

    #[test]
    fn a_json_message_arrives_double_encoded() {
        let message = r#"{"version":"1.0","type":"ConnectionTest"}"#;
        let once = serde_json::to_string(message).unwrap();
        let twice = serde_json::to_string(&once).unwrap();
        let body = format!(
            r#"{{"Data":{{"notification":{twice}}},"Metadata":{{"DequeueCount":"3","Id":"\"abc\""}}}}"#
        );
        let inv = decode_queue_invocation(body.as_bytes(), "notification").unwrap();
        assert_eq!(inv.message_text, message);
        assert_eq!(inv.dequeue_count, 3);
        // Single-encoded (the docs' form) and numbers are accepted too.
        let body = format!(
            r#"{{"Data":{{"notification":{once}}},"Metadata":{{"DequeueCount":2,"Id":"abc"}}}}"#
        );
        let inv = decode_queue_invocation(body.as_bytes(), "notification").unwrap();
        assert_eq!(inv.message_text, message);
        assert_eq!(inv.dequeue_count, 2);
        assert_eq!(inv.message_id.as_deref(), Some("abc"));
    }

    #[test]
    fn odd_but_readable_envelopes_are_tolerated() {
        let body = r#"{"data":{"notification":{"type":"x"}},"metadata":{"dequeueCount":"many"}}"#;
        let inv = decode_queue_invocation(body.as_bytes(), "notification").unwrap();
        assert_eq!(inv.message_text, r#"{"type":"x"}"#);
        assert_eq!(inv.dequeue_count, 1);
        assert_eq!(inv.message_id, None);
        assert_eq!(inv.notes.len(), 2);
    }

    #[test]
    fn unreadable_envelopes_say_why() {
        let cases: [(&[u8], EnvelopeError); 5] = [
            (
                b"nope",
                EnvelopeError::NotJson("expected ident at line 1 column 2".into()),
            ),
            (b"[]", EnvelopeError::NotAnObject),
            (b"{}", EnvelopeError::MissingData),
            (
                br#"{"Data":{"other":"\"x\""}}"#,
                EnvelopeError::MissingBinding("notification".into()),
            ),
            (
                b"\xff\xfe",
                EnvelopeError::NotJson("invalid UTF-8 at byte 0".into()),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                decode_queue_invocation(body, "notification").unwrap_err(),
                want
            );
        }
    }

    #[test]
    fn the_response_has_the_hosts_shape() {
        let r = InvocationResponse::with_logs(vec!["done".into()]);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"Outputs":{},"Logs":["done"],"ReturnValue":null}"#
        );
    }
}
