//! Removes secrets from text before it reaches a log line, a history row or an error message.
//!
//! A notification's `modelUri` may carry a SAS, and a misconfigured producer could paste a connection
//! string anywhere, so every text cvchain stores or logs goes through [`redact`].

use url::Url;

/// What replaces a secret.
pub const REDACTED: &str = "REDACTED";

/// Keys whose values are secrets, in URLs (`sig=`) and in connection strings (`AccountKey=`).
const SECRET_KEYS: &[&str] = &[
    "sig",
    "accountkey",
    "sharedaccesskey",
    "sharedaccesssignature",
    "training-key",
    "trainingkey",
    "ocp-apim-subscription-key",
    "client_secret",
    "password",
    // Event Grid's access key and SAS token headers.
    "aeg-sas-key",
    "aeg-sas-token",
];

/// A Standard Webhooks secret is recognised by its value: `whsec_` and base64.
const WEBHOOK_SECRET_PREFIX: &str = "whsec_";

/// Replaces the value after any `key=` or `"key":"` whose key is a secret, case-insensitively.
pub fn redact(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'w'
            && lower[i..].starts_with(WEBHOOK_SECRET_PREFIX)
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric())
        {
            let value_start = i + WEBHOOK_SECRET_PREFIX.len();
            // Base64 (standard or URL-safe), nothing else.
            let value_end = value_start
                + bytes[value_start..]
                    .iter()
                    .take_while(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
                    })
                    .count();
            if value_end > value_start {
                out.push_str(&text[copied..value_start]);
                out.push_str(REDACTED);
                copied = value_end;
                i = value_end;
                continue;
            }
        }
        if let Some(value_start) = secret_value_start(&lower, i) {
            let value_end = value_end(bytes, value_start);
            if value_end > value_start {
                out.push_str(&text[copied..value_start]);
                out.push_str(REDACTED);
                copied = value_end;
                i = value_end;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// If a secret key starts at `i` (at a word boundary), the index where its value begins.
fn secret_value_start(lower: &str, i: usize) -> Option<usize> {
    let bytes = lower.as_bytes();
    // Most positions start no key: one byte comparison instead of nine prefix checks (the
    // per-notification profile showed this scan).
    if !SECRET_KEYS.iter().any(|k| k.as_bytes()[0] == bytes[i]) || !lower.is_char_boundary(i) {
        return None;
    }
    if i > 0 {
        let prev = bytes[i - 1];
        if prev.is_ascii_alphanumeric() || prev == b'_' || prev == b'-' {
            return None;
        }
    }
    for key in SECRET_KEYS {
        if !lower[i..].starts_with(key) {
            continue;
        }
        let mut j = i + key.len();
        // `key=value`, `key: value`, `"key": "value"`, `key%3Dvalue`.
        if bytes.get(j) == Some(&b'"') {
            j += 1;
        }
        while bytes.get(j) == Some(&b' ') {
            j += 1;
        }
        let sep_len = match bytes.get(j) {
            Some(b'=') | Some(b':') => 1,
            Some(b'%') if lower[j..].starts_with("%3d") => 3,
            _ => continue,
        };
        j += sep_len;
        while bytes.get(j) == Some(&b' ') {
            j += 1;
        }
        if bytes.get(j) == Some(&b'"') || bytes.get(j) == Some(&b'\\') {
            // JSON string value, possibly escaped inside another JSON string.
            while bytes.get(j) == Some(&b'\\') {
                j += 1;
            }
            if bytes.get(j) == Some(&b'"') {
                j += 1;
            }
        }
        return Some(j);
    }
    None
}

/// A value runs until a delimiter of URLs, connection strings or JSON.
fn value_end(bytes: &[u8], start: usize) -> usize {
    let mut j = start;
    while let Some(&b) = bytes.get(j) {
        if matches!(
            b,
            b'&' | b';' | b'"' | b'\'' | b'\\' | b' ' | b'\t' | b'\r' | b'\n' | b',' | b'}' | b'<'
        ) {
            break;
        }
        j += 1;
    }
    j
}

/// A URL fit to record: no query (a SAS lives there) and no user info.
pub fn url_without_secrets(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            u.set_fragment(None);
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => redact(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_signatures_are_removed_wherever_they_appear() {
        let cases = [
            (
                "https://a.blob.core.windows.net/c/b?sv=2020&sig=abc%2Bdef%3D&se=1",
                "https://a.blob.core.windows.net/c/b?sv=2020&sig=REDACTED&se=1",
            ),
            ("?SIG=xyz", "?SIG=REDACTED"),
            (
                r#"{"modelUri":"https://x/y?sig=abc"}"#,
                r#"{"modelUri":"https://x/y?sig=REDACTED"}"#,
            ),
            (
                r#""{\"modelUri\":\"https://x/y?sp=r&sig=abc\"}""#,
                r#""{\"modelUri\":\"https://x/y?sp=r&sig=REDACTED\"}""#,
            ),
            ("sig%3Dabc&x=1", "sig%3DREDACTED&x=1"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
        }
    }

    #[test]
    fn connection_string_keys_and_training_keys_are_removed() {
        let s = "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=bXlrZXk=;EndpointSuffix=core.windows.net";
        assert_eq!(
            redact(s),
            "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=REDACTED;EndpointSuffix=core.windows.net"
        );
        assert_eq!(redact("Training-Key: 0123abcd"), "Training-Key: REDACTED");
        assert_eq!(
            redact(r#"{"trainingKey": "k1"}"#),
            r#"{"trainingKey": "REDACTED"}"#
        );
    }

    #[test]
    fn event_grid_keys_and_webhook_secrets_are_removed() {
        assert_eq!(
            redact("aeg-sas-key: VXbGWce53249Mt8wuotr0GPmyJ/nDT4hgdEj9DpBeRr38arnnm5OFg=="),
            "aeg-sas-key: REDACTED"
        );
        assert_eq!(
            redact("secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw in a message"),
            "secret whsec_REDACTED in a message"
        );
        assert_eq!(
            redact(r#"{"CVCHAIN_WEBHOOK_SECRET":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}"#),
            r#"{"CVCHAIN_WEBHOOK_SECRET":"whsec_REDACTED"}"#
        );
        // The prefix alone (in help texts) is not a secret.
        assert_eq!(redact("a `whsec_` secret"), "a `whsec_` secret");
    }

    #[test]
    fn ordinary_words_are_left_alone() {
        for s in [
            "signature=x",
            "design=1",
            "assign=2",
            "projectId=3",
            "sig",
            "sig=",
            "the sigma",
        ] {
            assert_eq!(redact(s), s);
        }
        assert_eq!(redact("ünïcödé sig=é;x"), "ünïcödé sig=REDACTED;x");
    }

    #[test]
    fn recorded_urls_lose_their_query() {
        assert_eq!(
            url_without_secrets("https://a.blob.core.windows.net/c/p%20-%20i.ONNX?sv=1&sig=abc"),
            "https://a.blob.core.windows.net/c/p%20-%20i.ONNX"
        );
        assert_eq!(
            url_without_secrets("not a url sig=abc"),
            "not a url sig=REDACTED"
        );
    }
}
