//! The secret scan: logs, rows and answers must never carry a key, a SAS signature, an Event
//! Grid key, a webhook secret or a URL's password, in any spelling.
//!
//! It scans what the text means, not how it is spelled: the text as it is, every JSON string
//! value in it (JSON documents and JSON lines are decoded, and a string that holds JSON again is
//! decoded again), every layer of JSON escapes undone (`\u0026sig=`, `sig\u003d`, `\u0073ig=`)
//! and percent-decoding on top (`%73ig=`), base64 text decoded. Each form is checked for the
//! given secrets and by `cvchain_core::redact::find_leak`.

use serde_json::Value;

/// Fails when `text`, in any decoded form, holds one of `secrets`, a SAS signature (`sig=` not
/// followed by the redaction marker), another secret key's value or a URL's password.
pub fn assert_no_secrets(what: &str, text: &str, secrets: &[&str]) {
    if let Some(problem) = find_secret(text, secrets) {
        panic!("{what} contains {problem}");
    }
}

/// What [`assert_no_secrets`] would fail on, if anything. Never quotes the secret.
pub fn find_secret(text: &str, secrets: &[&str]) -> Option<String> {
    let mut forms = Vec::new();
    decoded_forms(text, 0, &mut forms);
    for form in &forms {
        for (n, secret) in secrets.iter().enumerate() {
            if !secret.is_empty() && form.contains(secret) {
                return Some(format!(
                    "a secret (#{n}, {} characters) near: {}",
                    secret.len(),
                    context(form, secret)
                ));
            }
        }
        if let Some(leak) = cvchain_core::redact::find_leak(form) {
            return Some(leak);
        }
    }
    None
}

/// Where in `form` the secret is, without the secret.
fn context(form: &str, secret: &str) -> String {
    let at = form.find(secret).unwrap_or(0);
    let before: String = form[..at]
        .chars()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{before}<secret>")
}

/// The text and what it decodes to: JSON string values (recursively), escape layers undone,
/// percent-decoded, base64 decoded.
fn decoded_forms(text: &str, depth: usize, out: &mut Vec<String>) {
    if depth > 6 || out.len() > 100_000 {
        return;
    }
    out.push(text.to_owned());
    // Escape layers and percent-decoding.
    let mut level = text.to_owned();
    for _ in 0..8 {
        let percent = percent_decode(&level);
        if percent != level {
            out.push(percent);
        }
        let next = cvchain_core::redact::json_unescape(&level);
        if next == level {
            break;
        }
        out.push(next.clone());
        level = next;
    }
    // JSON: the whole text, or one document per line (JSON logs, `--rows --json`).
    let mut strings = Vec::new();
    if let Ok(v) = serde_json::from_str::<Value>(text.trim()) {
        collect_strings(&v, &mut strings);
    } else {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                collect_strings(&v, &mut strings);
            }
        }
    }
    for s in strings {
        if s != text {
            decoded_forms(&s, depth + 1, out);
        }
    }
    // base64 (a `Raw` property of a base64 message).
    let compact = text.trim();
    if compact.len() >= 8
        && compact
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'-' | b'_'))
    {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        if let Some(inner) = [STANDARD, URL_SAFE]
            .iter()
            .find_map(|e| e.decode(compact).ok())
            .and_then(|b| String::from_utf8(b).ok())
        {
            decoded_forms(&inner, depth + 1, out);
        }
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                collect_strings(v, out);
            }
        }
        _ => {}
    }
}

/// Plain percent-decoding (not form decoding: `+` stays `+`), as a URL's server reads a query.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(h) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(h);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_signature_is_caught() {
        for leaked in [
            "https://a/c/b?sv=1&sig=abc",
            r#"{"modelUri":"https://a/c/b?sv=1\u0026sig=abc"}"#,
            r#"{"modelUri":"https://a/c/b?sv=1&sig\u003dabc"}"#,
            r#"{"modelUri":"https://a/c/b?sv=1&\u0073ig=abc"}"#,
            r#"{"Raw":"{\"modelUri\":\"https://a/c/b?sv=1\\u0026sig=abc\"}"}"#,
            "https://a/c/b?sv=1&%73ig=abc",
            "https://a/c/b?sv=1&sig%3Dabc",
            "line one\n{\"msg\":\"x\",\"error\":\"https://a/b?x=1\\u0026sig=abc\"}\n",
            // base64 of {"u":"https://a/b?sig=abc"}
            "eyJ1IjoiaHR0cHM6Ly9hL2I/c2lnPWFiYyJ9",
            "endpoint=http://user:hunter2@host/",
            "secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            r#"{"aeg-sas-key":"VXbGWce53249Mt8wuotr0GPmyJ/nDT4hgdEj9DpBeRr38arnnm5OFg=="}"#,
        ] {
            assert!(find_secret(leaked, &[]).is_some(), "not caught: {leaked}");
        }
        assert!(find_secret(r#"{"k":"\u0074rainkey-1"}"#, &["trainkey-1"]).is_some());
    }

    #[test]
    fn redacted_and_ordinary_text_passes() {
        for fine in [
            "https://a/c/b?sv=1&sig=REDACTED",
            r#"{"modelUri":"https://a/c/b?sv=1\u0026sig=REDACTED"}"#,
            "design=1 signature=x the sigma",
            "http://user:REDACTED@host/",
            "",
        ] {
            assert_eq!(find_secret(fine, &["trainkey-1"]), None, "{fine}");
        }
    }
}
