//! The secret scan: logs, rows and answers must never carry a key or a SAS signature.

/// Fails when `text` holds one of `secrets`, or any SAS signature (`sig=` not followed by the
/// redaction marker).
pub fn assert_no_secrets(what: &str, text: &str, secrets: &[&str]) {
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
