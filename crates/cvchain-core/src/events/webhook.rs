//! Standard Webhooks (spec 1.0.0): the secret, the signature and its verification.
//!
//! A request carries `webhook-id` (the event id, the same on every attempt), `webhook-timestamp`
//! (Unix seconds of this attempt) and `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of
//! `{id}.{timestamp}.{body}` under the secret's bytes. The secret is `whsec_` and the base64 of
//! 24 to 64 random bytes. Any Standard Webhooks library verifies what [`sign`] makes; the tests
//! check that with one.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SECRET_PREFIX: &str = "whsec_";
/// How far a timestamp may be from the receiver's clock (the libraries' default).
pub const TOLERANCE_SECONDS: i64 = 5 * 60;

/// The key bytes of a `whsec_…` secret. The error never quotes the secret.
pub fn parse_secret(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    let Some(encoded) = text.strip_prefix(SECRET_PREFIX) else {
        return Err(format!(
            "must start with `{SECRET_PREFIX}` (a Standard Webhooks secret: {SECRET_PREFIX} and base64 of 24 to 64 random bytes)"
        ));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .map_err(|_| format!("the part after `{SECRET_PREFIX}` is not base64"))?;
    if !(24..=64).contains(&bytes.len()) {
        return Err(format!(
            "must hold 24 to 64 bytes after `{SECRET_PREFIX}` (it holds {})",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// A secret to give both sides, from random bytes (24 to 64 of them).
pub fn secret_text(random: &[u8]) -> String {
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(random)
    )
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`: the `webhook-signature` header.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = mac(key, id, timestamp, body).finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// Why a request does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}")]
    Missing(&'static str),
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is {0} s away from now (more than 5 minutes)")]
    OutsideTolerance(i64),
    #[error("no v1 signature matches")]
    NoMatch,
    #[error("webhook-id must not contain `.`")]
    BadId,
}

/// Checks a request the way the Standard Webhooks libraries do: the headers, the timestamp
/// within [`TOLERANCE_SECONDS`] of `now_unix`, and any `v1` signature of the space-separated
/// list matching (in constant time).
pub fn verify(
    key: &[u8],
    id: Option<&str>,
    timestamp: Option<&str>,
    signatures: Option<&str>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), VerifyError> {
    let id = id.ok_or(VerifyError::Missing("webhook-id"))?;
    let ts_text = timestamp.ok_or(VerifyError::Missing("webhook-timestamp"))?;
    let signatures = signatures.ok_or(VerifyError::Missing("webhook-signature"))?;
    if id.contains('.') {
        return Err(VerifyError::BadId);
    }
    let ts: i64 = ts_text
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let skew = now_unix - ts;
    if skew.abs() > TOLERANCE_SECONDS {
        return Err(VerifyError::OutsideTolerance(skew));
    }
    for entry in signatures.split(' ') {
        let Some(encoded) = entry.strip_prefix("v1,") else {
            continue;
        };
        let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            continue;
        };
        if mac(key, id, ts, body).verify_slice(&tag).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::NoMatch)
}
