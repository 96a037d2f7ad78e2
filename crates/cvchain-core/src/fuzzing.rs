//! Entry points for the fuzz targets (`fuzz/`) and for the test that replays their corpus: the
//! same code runs under libFuzzer and under `cargo test`.

use crate::envelope::{TRIGGER_BINDING, decode_queue_invocation};
use crate::history::{
    HistoryRow, MAX_PROPERTY_UNITS, encoded_units, is_valid_key, notification_row, rejected_row,
    seal,
};
use crate::message::{Incoming, Received};
use crate::notification::parse;
use crate::redact::{find_leak, redact, scrub};
use time::OffsetDateTime;

/// What holds for every row as it is written: valid keys, every text within the table's bound
/// and without a secret in any spelling, and sealing twice changes nothing.
fn check_row(row: &HistoryRow) {
    assert!(is_valid_key(&row.row_key));
    assert!(is_valid_key(&row.partition_key));
    let sealed = seal(&row.properties);
    for (prop, value) in sealed.iter() {
        if let Some(text) = value.as_text() {
            assert!(
                encoded_units(text) <= MAX_PROPERTY_UNITS,
                "{prop:?} too large"
            );
            assert_eq!(find_leak(text), None, "{prop:?} leaks");
        }
    }
    assert_eq!(seal(&sealed), sealed, "sealing is idempotent");
}

/// Redaction of any text: idempotent, and what [`scrub`] lets through never holds a secret.
pub fn redaction(text: &str) {
    let once = redact(text);
    assert_eq!(redact(&once), once, "redaction is idempotent");
    assert_eq!(find_leak(&scrub(text)), None);
}

/// Decodes a message and builds its history row; must never panic.
pub fn message(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let incoming = Incoming::decode(Received {
        text: text.clone().into_owned(),
        message_id: None,
        dequeue_count: 1,
        received_at: OffsetDateTime::UNIX_EPOCH,
    });
    match &incoming.parsed {
        Ok(parsed) => {
            let row = notification_row(&incoming, parsed);
            check_row(&row);
            // What parsed once parses the same from its canonical form.
            if let Some(canonical) = parsed.notification.to_message() {
                let again = parse(&canonical.to_string()).expect("canonical form parses");
                assert_eq!(again.notification, parsed.notification);
            }
        }
        Err(e) => {
            let row = rejected_row(&incoming, &e.to_string(), e.field());
            check_row(&row);
        }
    }
    redaction(&text);
}

/// Decodes an invocation body, then the message it carries; must never panic.
pub fn envelope(data: &[u8]) {
    if let Ok(inv) = decode_queue_invocation(data, TRIGGER_BINDING) {
        message(inv.message_text.as_bytes());
    }
}
