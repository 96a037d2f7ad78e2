//! A queue message as it arrived, and the same message decoded once at the edge: its text
//! unwrapped from base64 and the BOM, parsed into a notification (or the reason it is not one),
//! and what a history row records of it, redacted and bounded. Everything after the edge uses
//! the [`Incoming`] value; nothing unwraps, parses or redacts the text again.

use crate::bounds::{MAX_PROPERTY_UNITS, fit};
use crate::notification::{Encoding, ParseError, Parsed, parse_json, unwrap_text};
use crate::redact::redact;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// A queue message holds 64 KiB of text (the service counts its UTF-8 bytes).
pub const MAX_QUEUE_MESSAGE_BYTES: usize = 64 * 1024;

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
    /// the id and the text (a redelivery, same id and text, gives the same key; two messages
    /// with the same text under different ids do not share one).
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
            Some(id) if !id.is_empty() => {
                format!("sha256-{}", short_hash(&format!("{id}\n{}", self.text)))
            }
            _ => format!("sha256-{}", short_hash(&self.text)),
        }
    }
}

/// What history rows record of a message's text: secrets redacted, control characters escaped,
/// bounded by its size as the table counts it (a cut text ends with a marker that says so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedText {
    /// The text as received. A base64 message's JSON is redacted and encoded again, since base64
    /// cannot be redacted as it is.
    pub raw: String,
    pub raw_truncated: bool,
    /// A base64 message's JSON, in clear: (text, truncated).
    pub decoded: Option<(String, bool)>,
    /// How the text was wrapped, when it could be unwrapped.
    pub encoding: Option<Encoding>,
}

impl RecordedText {
    fn of(text: &str, unwrapped: Option<(&str, Encoding)>) -> Self {
        let (raw, decoded) = match unwrapped {
            Some((json_text, Encoding::Base64)) => {
                let clean = redact(json_text);
                let decoded = fit(&escape_controls(&clean), MAX_PROPERTY_UNITS);
                (
                    base64::engine::general_purpose::STANDARD.encode(clean),
                    Some(decoded),
                )
            }
            _ => (redact(text), None),
        };
        let (raw, raw_truncated) = fit(&escape_controls(&raw), MAX_PROPERTY_UNITS);
        Self {
            raw,
            raw_truncated,
            decoded,
            encoding: unwrapped.map(|(_, e)| e),
        }
    }
}

/// A message decoded once.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub received: Received,
    /// [`Received::message_key`], computed once.
    pub key: String,
    /// The notification, or why the text is not one.
    pub parsed: Result<Parsed, ParseError>,
    /// What rows record of the text.
    pub recorded: RecordedText,
}

impl Incoming {
    pub fn decode(received: Received) -> Self {
        let unwrapped = unwrap_text(&received.text);
        let recorded = RecordedText::of(
            &received.text,
            unwrapped.as_ref().ok().map(|(t, e)| (t.as_str(), *e)),
        );
        let parsed = unwrapped.and_then(|(json_text, encoding)| {
            Ok(Parsed {
                notification: parse_json(&json_text)?,
                encoding,
                json_text,
            })
        });
        Self {
            key: received.message_key(),
            received,
            parsed,
            recorded,
        }
    }
}

/// The first 16 bytes of the text's SHA-256, in hex.
pub fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Control characters other than whitespace escaped (`\u{1}`), so a recorded text prints safely.
pub fn escape_controls(s: &str) -> String {
    if !s
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return s.to_owned();
    }
    bounded(s, usize::MAX).0
}

/// Characters XML 1.0 (and so a queue message) can carry.
pub fn xml_safe(text: &str) -> bool {
    text.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r')
            || ('\u{20}'..='\u{D7FF}').contains(&c)
            || ('\u{E000}'..='\u{FFFD}').contains(&c)
            || c >= '\u{10000}'
    })
}

/// Whether `text` can be copied to a queue: as it is when XML can carry it, else as base64,
/// counted as the request carries it (XML escapes included), so a copy is never refused as
/// too large.
pub fn fits_queue_message(text: &str) -> bool {
    if xml_safe(text) {
        let escaped: usize = text
            .chars()
            .map(|c| match c {
                '&' | '<' | '>' => 5,
                '"' | '\'' => 6,
                c => c.len_utf8(),
            })
            .sum();
        escaped <= MAX_QUEUE_MESSAGE_BYTES
    } else {
        text.len().div_ceil(3) * 4 <= MAX_QUEUE_MESSAGE_BYTES
    }
}

/// At most `max` characters, control characters other than whitespace escaped; true when cut.
pub fn bounded(s: &str, max: usize) -> (String, bool) {
    let mut out = String::with_capacity(s.len().min(max.saturating_mul(4)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn received(text: &str) -> Received {
        Received {
            text: text.into(),
            message_id: None,
            dequeue_count: 1,
            received_at: datetime!(2026-11-26 10:00 UTC),
        }
    }

    #[test]
    fn a_message_is_unwrapped_parsed_and_redacted_once() {
        let json = r#"{"version":"1.0","type":"ConnectionTest","Content":{"projectId":"b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f"},"x":"sig=abc"}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        let m = Incoming::decode(received(&b64));
        let parsed = m.parsed.as_ref().unwrap();
        assert_eq!(parsed.encoding, Encoding::Base64);
        assert_eq!(parsed.json_text, json);
        assert_eq!(m.recorded.encoding, Some(Encoding::Base64));
        let (decoded, cut) = m.recorded.decoded.clone().unwrap();
        assert!(decoded.contains("sig=REDACTED") && !cut);
        assert!(m.key.starts_with("sha256-"));

        let m = Incoming::decode(received("{oops sig=abc"));
        assert!(m.parsed.is_err());
        assert_eq!(m.recorded.raw, "{oops sig=REDACTED");
        assert_eq!(m.recorded.encoding, Some(Encoding::Raw));
        let m = Incoming::decode(received("%%%"));
        assert_eq!(m.recorded.encoding, None);
    }
}
