//! Removes secrets from text before it reaches a log line, a history row or an error message.
//!
//! A notification's `modelUri` may carry a SAS, and a misconfigured producer could paste a connection
//! string anywhere, so every text cvchain stores or logs goes through [`redact`] (or [`scrub`]).
//!
//! Secrets hide in spellings: System.Text.Json writes `&` as `\u0026`, any character may be a
//! JSON escape (`\u0073ig`) or a percent escape (`%73ig`), and a message is JSON inside a JSON
//! string inside the host's envelope, so escapes come behind any number of backslashes. The
//! redactor therefore matches what the text *means*: each character of a key, separator or
//! value may be spelled plainly or escaped. [`find_leak`] is the independent check: it decodes
//! every layer first and then looks; [`scrub`] withholds a text outright when the check still
//! finds something after redaction, so what is stored never carries a secret in any spelling.

use url::Url;

/// What replaces a secret.
pub const REDACTED: &str = "REDACTED";

/// What replaces a whole text that still held a secret after redaction (an exotic spelling):
/// withheld rather than stored.
pub const WITHHELD: &str =
    "[withheld by cvchain: it holds a secret in a spelling that cannot be redacted in place]";

/// Keys whose values are secrets, in URLs (`sig=`), connection strings (`AccountKey=`), headers
/// and JSON.
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
const WEBHOOK_SECRET_PREFIX: &[u8] = b"whsec_";

/// Characters that end a secret's value, in URLs, connection strings, headers and JSON.
fn ends_value(c: char) -> bool {
    matches!(
        c,
        '&' | ';' | '"' | '\'' | '\\' | ' ' | '\t' | '\r' | '\n' | ',' | '}' | '<' | '>'
    )
}

/// Replaces the value after any `key=`, `key: ` or `"key":"` whose key is a secret, however
/// its characters are escaped, and the password in any URL's user info.
pub fn redact(text: &str) -> String {
    if !may_hold_a_secret(text) {
        return text.to_owned();
    }
    let out = redact_userinfo(&redact_keys(text));
    if has_webhook_prefix(&out) {
        redact_webhook_secrets(&out)
    } else {
        out
    }
}

fn has_webhook_prefix(text: &str) -> bool {
    text.as_bytes()
        .windows(WEBHOOK_SECRET_PREFIX.len())
        .any(|w| w.eq_ignore_ascii_case(WEBHOOK_SECRET_PREFIX))
}

/// Where a `whsec_…` value starting at byte `i` ends, when one does (a word boundary before
/// it, base64 after the prefix).
fn webhook_secret_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let prefix = WEBHOOK_SECRET_PREFIX.len();
    if !b
        .get(i..i + prefix)?
        .eq_ignore_ascii_case(WEBHOOK_SECRET_PREFIX)
        || (i > 0 && b[i - 1].is_ascii_alphanumeric())
    {
        return None;
    }
    let start = i + prefix;
    let end = start
        + b[start..]
            .iter()
            .take_while(|c| {
                c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'-' | b'_')
            })
            .count();
    (end > start).then_some((start, end))
}

/// `whsec_<base64>` → `whsec_REDACTED`: a webhook secret needs no key to be one.
fn redact_webhook_secrets(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut i) = (0, 0);
    while i < b.len() {
        if let Some((start, end)) = webhook_secret_at(b, i) {
            if !text[start..end].starts_with(REDACTED) {
                out.push_str(&text[copied..start]);
                out.push_str(REDACTED);
                copied = end;
            }
            i = end;
            continue;
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// A key's separator (`=`, `:`, or one escaped with `%` or a backslash) or a URL's user info
/// (`:` and `@`) is needed for a secret to be spelled at all: most texts (ids, statuses, names)
/// have none, and are left as they are without a scan.
fn may_hold_a_secret(text: &str) -> bool {
    text.bytes()
        .any(|b| matches!(b, b'=' | b':' | b'%' | b'\\'))
        || has_webhook_prefix(text)
}

/// [`redact`], and when [`find_leak`] still finds a secret in the result, [`WITHHELD`] instead
/// of the text. Used for everything cvchain stores or logs from outside input.
pub fn scrub(text: &str) -> String {
    let out = redact(text);
    if find_leak(&out).is_some() {
        WITHHELD.to_owned()
    } else {
        out
    }
}

/// What ends a shortened text.
pub const CUT_MARK: &str = "…";

/// `text` with at most `max_chars` of its characters, and [`CUT_MARK`] when it was longer. The
/// cut never leaves something that reads as a secret (`sig=RED…` of a redacted `sig=REDACTED`,
/// `whsec_…` of half a value): it backs off until [`find_leak`] finds nothing.
pub fn shorten(text: &str, max_chars: usize) -> String {
    let mut end = match text.char_indices().nth(max_chars) {
        None => return text.to_owned(),
        Some((at, _)) => at,
    };
    for _ in 0..64 {
        let candidate = format!("{}{CUT_MARK}", &text[..end]);
        if end == 0 || find_leak(&candidate).is_none() {
            return candidate;
        }
        end = text[..end]
            .char_indices()
            .rev()
            .nth(7)
            .map_or(0, |(at, _)| at);
    }
    CUT_MARK.to_owned()
}

/// What a service answered, fit to record and show: at most `max_chars` characters, whitespace
/// and control characters collapsed to single spaces, the caller's own `secrets` (a key it
/// sent, a URL's query) removed wherever they appear whole, then redacted ([`scrub`]), and only
/// then shortened ([`shorten`]), so a cut cannot leave part of a secret for redaction to miss.
/// `cut_short` says the text is only the start of the answer (its reading stopped at a bound):
/// then whatever it ends with that could be the start of a secret is dropped first (the start
/// of one of `secrets`, and the last word).
pub fn excerpt(text: &str, cut_short: bool, secrets: &[&str], max_chars: usize) -> String {
    let secrets: Vec<&str> = secrets.iter().copied().filter(|s| s.len() >= 4).collect();
    let mut t = text.to_owned();
    if cut_short {
        for s in &secrets {
            // The longest start of the secret the text ends with.
            if let Some(k) = (1..s.len())
                .rev()
                .filter(|k| s.is_char_boundary(*k))
                .find(|k| t.ends_with(&s[..*k]))
            {
                t.truncate(t.len() - k);
            }
        }
        let word_start = t
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace() || ends_value(*c))
            .map_or(0, |(at, c)| at + c.len_utf8());
        t.truncate(word_start);
    }
    let remove = |mut t: String| {
        for s in &secrets {
            t = t.replace(s, REDACTED);
        }
        t
    };
    let t = remove(t);
    let collapsed = t
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let clean = scrub(&remove(collapsed));
    let out = shorten(&clean, max_chars);
    if cut_short && !out.ends_with(CUT_MARK) {
        format!("{}{CUT_MARK}", out.trim_end())
    } else {
        out
    }
}

/// The character the text spells at byte `i`, and how many bytes spell it: the byte itself, a
/// percent escape of an ASCII character (`%73`), or a JSON escape behind any number of
/// backslashes (`\u0073`, `\\u0073`, `\"`, `\/`). A byte of a multi-byte character reads as
/// U+0080: never a key, separator or delimiter.
fn spelled(b: &[u8], i: usize) -> Option<(char, usize)> {
    let c = *b.get(i)?;
    match c {
        b'%' => match b.get(i + 1..i + 3).and_then(hex) {
            Some(v) if v < 0x80 => Some((v as u8 as char, 3)),
            _ => Some(('%', 1)),
        },
        b'\\' => {
            let mut j = i;
            while b.get(j) == Some(&b'\\') {
                j += 1;
            }
            match b.get(j) {
                Some(b'u') => match b.get(j + 1..j + 5).and_then(hex).and_then(char::from_u32) {
                    Some(ch) => Some((ch, j + 5 - i)),
                    None => Some(('\\', 1)),
                },
                Some(&q @ (b'"' | b'/')) => Some((q as char, j + 1 - i)),
                _ => Some(('\\', 1)),
            }
        }
        c if c.is_ascii() => Some((c as char, 1)),
        _ => Some(('\u{80}', 1)),
    }
}

/// Hex digits as a number.
fn hex(digits: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(digits).ok()?;
    if s.is_empty() || !s.bytes().all(|d| d.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Whether the character before byte `i` (as spelled) continues a word, so a key starting at
/// `i` is only the tail of a longer word (`design=`): a `\u0026` or `%26` before it is an `&`.
fn word_before(b: &[u8], i: usize) -> bool {
    if i == 0 {
        return false;
    }
    if i >= 6
        && b[i - 6] == b'\\'
        && b[i - 5] == b'u'
        && let Some(c) = hex(&b[i - 4..i]).and_then(char::from_u32)
    {
        return is_word(c);
    }
    if i >= 3
        && b[i - 3] == b'%'
        && let Some(v) = hex(&b[i - 2..i])
    {
        return is_word(char::from_u32(v).unwrap_or('\u{80}'));
    }
    is_word(b[i - 1] as char)
}

/// Skips any run of spaces and (escaped) quotes.
fn skip_quotes(b: &[u8], mut j: usize) -> usize {
    while let Some(('"' | ' ', n)) = spelled(b, j) {
        j += n;
    }
    j
}

/// If a secret key starts at `i` (at a word boundary), the index where its value begins.
fn secret_value_start(b: &[u8], i: usize) -> Option<usize> {
    let first = b[i].to_ascii_lowercase();
    // Most positions start no key: one byte check before any decoding (the per-notification
    // profile showed this scan).
    if !(first == b'%' || first == b'\\' || SECRET_KEYS.iter().any(|k| k.as_bytes()[0] == first))
        || word_before(b, i)
    {
        return None;
    }
    'keys: for key in SECRET_KEYS {
        let mut j = i;
        for want in key.chars() {
            match spelled(b, j) {
                Some((c, n)) if c.to_ascii_lowercase() == want => j += n,
                _ => continue 'keys,
            }
        }
        // `key=value`, `key: value`, `"key": "value"`, `key%3Dvalue`, `key\u003dvalue`.
        j = skip_quotes(b, j);
        match spelled(b, j) {
            Some(('=' | ':', n)) => j += n,
            _ => continue,
        }
        return Some(skip_quotes(b, j));
    }
    None
}

/// A value runs until a delimiter of URLs, connection strings or JSON, however it is spelled.
fn value_end(b: &[u8], start: usize) -> usize {
    let mut j = start;
    while let Some((c, n)) = spelled(b, j) {
        if ends_value(c) {
            break;
        }
        j += n;
    }
    j
}

fn redact_keys(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        // Every position of a run of backslashes spells the same character (the run's escape),
        // and past its first two none follows a word: they start a key exactly as the second
        // does. Skipping them keeps a long run linear (a name of 12,000 backslashes took
        // seconds).
        if i >= 2 && b[i] == b'\\' && b[i - 1] == b'\\' && b[i - 2] == b'\\' {
            i += 1;
            continue;
        }
        if let Some(value_start) = secret_value_start(b, i) {
            let value_end = value_end(b, value_start);
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

/// `scheme://user:password@host` → `scheme://user:REDACTED@host` (also with `\/` escapes).
fn redact_userinfo(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b':' {
            i += 1;
            continue;
        }
        let mut k = i + 1;
        let mut slashes = 0;
        while slashes < 2 {
            match spelled(b, k) {
                Some(('/', n)) => {
                    k += n;
                    slashes += 1;
                }
                _ => break,
            }
        }
        if slashes < 2 {
            i += 1;
            continue;
        }
        // The authority runs to the first `/`, `?` or `#`; user info ends at its last `@`.
        let mut end = k;
        let mut at = None;
        while let Some((c, n)) = spelled(b, end) {
            if matches!(c, '/' | '?' | '#')
                || c.is_whitespace()
                || matches!(c, '"' | '\'' | '<' | '>' | '\\')
            {
                break;
            }
            if c == '@' {
                at = Some(end);
            }
            end += n;
        }
        if let Some(at) = at
            && let Some(colon) = text[k..at].find(':').map(|c| k + c)
            && colon + 1 < at
        {
            out.push_str(&text[copied..colon + 1]);
            out.push_str(REDACTED);
            copied = at;
        }
        i = end.max(i + 1);
    }
    out.push_str(&text[copied..]);
    out
}

/// A URL fit to record: no query (a SAS lives there), no fragment and no user info.
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

/// The independent check: decodes every layer of JSON escaping (and then one of percent
/// encoding, as a URL's server would) and says what secret is left in clear, if any: a
/// secret key's value that is not [`REDACTED`], or a URL's password. Never quotes the secret.
pub fn find_leak(text: &str) -> Option<String> {
    // Without a separator or an escape nothing is spelled in clear; only base64 can hide one.
    if may_hold_a_secret(text) {
        let mut level = text.to_owned();
        for _ in 0..8 {
            if let Some(leak) = leak_in(&level) {
                return Some(leak);
            }
            if level.contains('%')
                && let Some(leak) =
                    leak_in(&percent_encoding::percent_decode_str(&level).decode_utf8_lossy())
            {
                return Some(leak);
            }
            if !level.contains('\\') {
                break;
            }
            let next = json_unescape(&level);
            if next == level {
                break;
            }
            level = next;
        }
    }
    // A base64 message (the text of a `Raw` property): look inside it too.
    let compact = text.trim();
    if could_be_base64(compact) {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        if let Some(inner) = [STANDARD, URL_SAFE]
            .iter()
            .find_map(|e| e.decode(compact).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok())
            && inner != text
        {
            return find_leak(&inner);
        }
    }
    None
}

/// Long enough and of base64's characters only.
fn could_be_base64(text: &str) -> bool {
    let t = text.trim();
    t.len() >= 8
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'-' | b'_'))
}

/// One layer of JSON string escapes undone, leniently: what is not a valid escape stays.
pub fn json_unescape(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.char_indices().peekable();
    let b = s.as_bytes();
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let simple = match b.get(i + 1) {
            Some(b'"') => Some('"'),
            Some(b'\\') => Some('\\'),
            Some(b'/') => Some('/'),
            Some(b'n') => Some('\n'),
            Some(b't') => Some('\t'),
            Some(b'r') => Some('\r'),
            Some(b'b') => Some('\u{8}'),
            Some(b'f') => Some('\u{c}'),
            _ => None,
        };
        if let Some(ch) = simple {
            out.push(ch);
            chars.next();
            continue;
        }
        if b.get(i + 1) == Some(&b'u')
            && let Some(v) = b.get(i + 2..i + 6).and_then(hex)
        {
            let mut consumed = 6;
            let ch = if (0xD800..0xDC00).contains(&v)
                && b.get(i + 6) == Some(&b'\\')
                && b.get(i + 7) == Some(&b'u')
                && let Some(lo) = b.get(i + 8..i + 12).and_then(hex)
                && (0xDC00..0xE000).contains(&lo)
            {
                consumed = 12;
                char::from_u32(0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00))
            } else {
                char::from_u32(v)
            };
            out.push(ch.unwrap_or('\u{FFFD}'));
            for _ in 1..consumed {
                chars.next();
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A secret left in clear in already-decoded text.
fn leak_in(s: &str) -> Option<String> {
    let lower = s.to_ascii_lowercase();
    let b = lower.as_bytes();
    // One pass: only a key's first letter after a word boundary can start one.
    for start in 0..b.len() {
        if !SECRET_KEYS.iter().any(|k| k.as_bytes()[0] == b[start])
            || (start > 0 && is_word(b[start - 1] as char))
        {
            continue;
        }
        for key in SECRET_KEYS {
            if !b[start..].starts_with(key.as_bytes()) {
                continue;
            }
            let mut j = start + key.len();
            while matches!(b.get(j), Some(b'"' | b' ')) {
                j += 1;
            }
            if !matches!(b.get(j), Some(b'=' | b':')) {
                continue;
            }
            j += 1;
            while matches!(b.get(j), Some(b'"' | b' ')) {
                j += 1;
            }
            let value: String = lower[j..].chars().take_while(|c| !ends_value(*c)).collect();
            if !value.is_empty() && !value.starts_with("redacted") {
                return Some(if *key == "sig" {
                    "a SAS signature in clear".to_owned()
                } else {
                    format!("a `{key}` value in clear")
                });
            }
        }
    }
    // A webhook secret, recognised by its value.
    if (0..b.len()).any(|i| {
        webhook_secret_at(b, i).is_some_and(|(start, _)| !lower[start..].starts_with("redacted"))
    }) {
        return Some("a webhook secret in clear".into());
    }
    // A URL's password.
    let mut from = 0;
    while let Some(at) = lower[from..].find("://") {
        let k = from + at + 3;
        from = k;
        let authority: &str = lower[k..]
            .split(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '\\') || c.is_whitespace()
            })
            .next()
            .unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
            && !password.is_empty()
            && password != "redacted"
        {
            return Some("a URL's password in clear".into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            find_leak("told whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Some("a webhook secret in clear".into())
        );
        assert_eq!(find_leak("told whsec_REDACTED"), None);
        assert_eq!(
            scrub("told whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            "told whsec_REDACTED"
        );
    }

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
    fn escaped_signatures_are_removed_as_they_are_meant() {
        // System.Text.Json writes `&` as `\u0026`; any character may be a JSON or percent escape.
        let cases = [
            r#"{"modelUri":"https://a/c/b?sv=1\u0026sig=SECRET1\u0026se=2"}"#,
            r#"{"modelUri":"https://a/c/b?sv=1&sig\u003dSECRET2"}"#,
            r#"{"modelUri":"https://a/c/b?sv=1&\u0073ig=SECRET3"}"#,
            r#"{"modelUri":"https://a/c/b?sv=1&%73ig=SECRET4"}"#,
            r#""{\"modelUri\":\"https://a/c/b?sv=1\\u0026sig=SECRET5\"}""#,
            r#"{"\u0073ig":"SECRET6"}"#,
            r#"{"modelUri":"https://a/c/b?sv=1&sig=SEC\u002BRET7"}"#,
            "http://user:SECRET8@host.example/x",
        ];
        for input in cases {
            let out = redact(input);
            assert!(!out.contains("SEC"), "{input} -> {out}");
            assert_eq!(find_leak(&out), None, "{input} -> {out}");
            assert!(find_leak(input).is_some(), "{input}");
            assert_eq!(redact(&out), out, "idempotent");
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
        for s in [
            "signature=x design=1 the sigma; sig=&x sig",
            "(sent as `Training-Key`; never logged)",
            "https://a.blob.core.windows.net/c/b?sv=1&sig=REDACTED",
            "http://user:REDACTED@host/",
            "mailto:someone@example.com https://host/a@b",
            r#"{"\u0073ig":"REDACTED"}"#,
        ] {
            assert_eq!(find_leak(s), None, "{s}");
        }
    }

    #[test]
    fn what_cannot_be_redacted_in_place_is_withheld() {
        // A percent sign written as a JSON escape, then percent-encoded letters: a URL server
        // reads `sig`, and no in-place spelling match does.
        let exotic = r#"https://a/c/b?sv=1&\u002573ig=SECRET"#;
        assert!(find_leak(&redact(exotic)).is_some());
        assert_eq!(scrub(exotic), WITHHELD);
        assert_eq!(scrub("sig=abc&x=1"), "sig=REDACTED&x=1");
    }

    #[test]
    fn a_shortened_text_never_ends_in_part_of_a_secret() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(shorten("abcdef", 3), "abc…");
        let text = format!(
            "{} sig=REDACTED and whsec_REDACTED {}",
            "x".repeat(30),
            "y".repeat(30)
        );
        for max in 0..text.chars().count() {
            let cut = shorten(&text, max);
            assert_eq!(find_leak(&cut), None, "{cut}");
            assert!(cut.chars().count() <= max + 1, "{cut}");
        }
    }

    #[test]
    fn an_answer_is_redacted_before_it_is_cut_and_keeps_no_part_of_a_secret() {
        let key = "VXbGWce53249Mt8wuotr0GPmyJ/nDT4hgdEj9DpBeRr38arnnm5OFg==";
        // An answer that echoes the key the request sent, without naming it.
        let answer = format!(
            "{{\"error\": \"{} the key {key} is not valid for this topic\"}}",
            "a".repeat(150)
        );
        for max in [150, 170, 180, 200, 400] {
            let e = excerpt(&answer, false, &[key], max);
            for part in key.as_bytes().windows(6) {
                let part = std::str::from_utf8(part).unwrap();
                assert!(!e.contains(part), "{max}: {e}");
            }
        }
        // Read only in part (the read stopped inside the key): its start is dropped too.
        let read = &answer[..answer.find(key).unwrap() + 20];
        let e = excerpt(read, true, &[key], 400);
        assert!(!e.contains(&key[..8]), "{e}");
        assert!(e.ends_with('…'), "{e}");
        // A key the text names: redacted, and the cut does not leave half the marker.
        let named = format!("{} aeg-sas-key: {key} and more", "b".repeat(100));
        for max in 100..140 {
            let e = excerpt(&named, false, &[], max);
            assert_eq!(find_leak(&e), None, "{max}: {e}");
            assert!(!e.contains(&key[..6]), "{e}");
        }
        // A secret split by a line break is still one once the whitespace is collapsed.
        assert_eq!(
            excerpt("x sig\n\n=abc def", false, &[], 100),
            "x sig =REDACTED def"
        );
        assert_eq!(
            excerpt("  HTTP   error \u{1} here ", false, &[], 100),
            "HTTP error here"
        );
        // A webhook URL's query is a secret of the caller's: gone whole or in part.
        let q = "code=Zm9vYmFyYmF6cXV4cXV1eA";
        assert_eq!(
            excerpt(&format!("no route for /hook?{q}"), false, &[q], 100),
            "no route for /hook?REDACTED"
        );
        let e = excerpt(&format!("no route for /hook?{}", &q[..12]), true, &[q], 100);
        assert!(!e.contains(&q[5..12]), "{e}");
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
