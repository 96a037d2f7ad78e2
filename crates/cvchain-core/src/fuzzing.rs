//! Entry points for the fuzz targets (`fuzz/`) and for the test that replays their corpus: the
//! same code runs under libFuzzer and under `cargo test`.

use crate::envelope::{TRIGGER_BINDING, decode_queue_invocation};
use crate::history::{is_valid_key, notification_row, rejected_row};
use crate::message::{Incoming, Received};
use crate::notification::parse;
use time::OffsetDateTime;

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
            assert!(is_valid_key(&row.row_key));
            // What parsed once parses the same from its canonical form.
            if let Some(canonical) = parsed.notification.to_message() {
                let again = parse(&canonical.to_string()).expect("canonical form parses");
                assert_eq!(again.notification, parsed.notification);
            }
        }
        Err(e) => {
            let row = rejected_row(&incoming, &e.to_string(), e.field());
            assert!(is_valid_key(&row.row_key));
        }
    }
}

/// Decodes an invocation body, then the message it carries; must never panic.
pub fn envelope(data: &[u8]) {
    if let Ok(inv) = decode_queue_invocation(data, TRIGGER_BINDING) {
        message(inv.message_text.as_bytes());
    }
}
