//! The secret scan: logs, rows and answers must never carry a key, a SAS signature, an Event
//! Grid key or a webhook secret.

/// Fails when `text` holds one of `secrets`, any SAS signature (`sig=` not followed by the
/// redaction marker), any Standard Webhooks secret (`whsec_` and base64) or an `aeg-sas-key`
/// header value.
pub fn assert_no_secrets(what: &str, text: &str, secrets: &[&str]) {
    let base64_run = |s: &str| {
        s.bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
            .count()
    };
    for (at, _) in text.match_indices("whsec_") {
        let value = &text[at + "whsec_".len()..];
        assert!(
            value.starts_with("REDACTED") || base64_run(value) < 16,
            "{what} contains a webhook secret (whsec_…)"
        );
    }
    let lower_text = text.to_ascii_lowercase();
    for (at, _) in lower_text.match_indices("aeg-sas-key") {
        let value = lower_text[at + "aeg-sas-key".len()..].trim_start_matches(['"', ':', '=', ' ']);
        assert!(
            value.starts_with("redacted") || base64_run(value) < 16,
            "{what} contains an Event Grid key (aeg-sas-key)"
        );
    }
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} contains a secret ({} characters)",
            secret.len()
        );
    }
    let lower = text.to_ascii_lowercase();
    for marker in ["sig=", "sig%3d", "sig\\u003d"] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(marker) {
            let start = from + at;
            let value = &lower[start + marker.len()..];
            let preceded_by_word = start > 0 && lower.as_bytes()[start - 1].is_ascii_alphanumeric();
            if !preceded_by_word {
                assert!(
                    value.is_empty() || value.starts_with("redacted"),
                    "{what} contains a SAS signature near: {}",
                    &text[start.saturating_sub(40)..(start + 12).min(text.len())]
                );
            }
            from = start + marker.len();
        }
    }
}
