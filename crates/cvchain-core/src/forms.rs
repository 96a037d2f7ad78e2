//! Anti-forgery tokens for the console's forms.
//!
//! A page that shows a form gives the browser a session cookie (random, `HttpOnly`,
//! `SameSite=Strict`) and puts a token in each form: an HMAC, under the console's key, of what
//! the form may do (its action and the project it was rendered for), the session cookie and when
//! it was issued. A post is carried out only when its token was made for that action, that
//! project and that cookie, within [`TOKEN_LIFETIME`]. Another site can neither read the page
//! nor the cookie, so it cannot make a token that passes; a token copied from one project's
//! page does not move another project's channels.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a rendered form can be posted.
pub const TOKEN_LIFETIME: i64 = 60 * 60;
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "cvchain_session";

/// Why a post's token was refused; the answer says it, the console's page says what to do
/// (reload the page).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the form carries no anti-forgery token")]
    Missing,
    #[error("the browser sent no session cookie with the form")]
    NoSession,
    #[error("the anti-forgery token is not one this console made for this form")]
    Forged,
    #[error("the form is older than an hour; reload the page")]
    Expired,
}

/// The console's key: the same on every instance that serves the console (see the settings).
#[derive(Clone)]
pub struct FormKey(Vec<u8>);

impl std::fmt::Debug for FormKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FormKey(…)")
    }
}

impl FormKey {
    pub fn new(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// A key derived from a secret the instances share (the setting, or the account key), so
    /// the secret itself is never the HMAC key of anything a browser sees.
    pub fn derive(secret: &[u8]) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(b"cvchain console form tokens v1");
        Self(mac.finalize().into_bytes().to_vec())
    }

    fn mac(&self, action: &str, project: &str, session: &str, issued: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length");
        for part in [action, project, session, &issued.to_string()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// The token for a form doing `action` on `project`'s page, for the browser holding
    /// `session`, issued at `now` (Unix seconds).
    pub fn issue(&self, action: &str, project: &str, session: &str, now: i64) -> String {
        let tag = self
            .mac(action, project, session, now)
            .finalize()
            .into_bytes();
        format!(
            "{now}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Whether `token` was issued for this action, project and session, at most
    /// [`TOKEN_LIFETIME`] before `now` (constant-time comparison).
    pub fn check(
        &self,
        token: Option<&str>,
        action: &str,
        project: &str,
        session: Option<&str>,
        now: i64,
    ) -> Result<(), TokenError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        let session = session
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::NoSession)?;
        let (issued, tag) = token.split_once('.').ok_or(TokenError::Forged)?;
        let issued: i64 = issued.parse().map_err(|_| TokenError::Forged)?;
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Forged)?;
        self.mac(action, project, session, issued)
            .verify_slice(&tag)
            .map_err(|_| TokenError::Forged)?;
        // Checked after the MAC: only a genuine token learns that it is old.
        if now.saturating_sub(issued) > TOKEN_LIFETIME || issued > now + 60 {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// A session cookie's value from random bytes.
pub fn session_value(random: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
}

/// The session cookie in a `Cookie` header, if the browser sent one that looks like ours.
pub fn session_from_cookies(header: &str) -> Option<&str> {
    header.split(';').find_map(|c| {
        let (name, value) = c.trim().split_once('=')?;
        (name == SESSION_COOKIE
            && (16..=128).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_000_000;
    const SESSION: &str = "c2Vzc2lvbi1vZi10aGUtYnJvd3Nlcg";

    #[test]
    fn a_token_passes_only_for_its_action_project_session_and_time() {
        let key = FormKey::derive(b"shared secret");
        let t = key.issue("promote", "p1", SESSION, NOW);
        assert_eq!(
            key.check(Some(&t), "promote", "p1", Some(SESSION), NOW + 5),
            Ok(())
        );
        assert_eq!(
            key.check(Some(&t), "rollback", "p1", Some(SESSION), NOW),
            Err(TokenError::Forged)
        );
        assert_eq!(
            key.check(Some(&t), "promote", "p2", Some(SESSION), NOW),
            Err(TokenError::Forged)
        );
        assert_eq!(
            key.check(
                Some(&t),
                "promote",
                "p1",
                Some("another-browsers-session"),
                NOW
            ),
            Err(TokenError::Forged)
        );
        assert_eq!(
            key.check(
                Some(&t),
                "promote",
                "p1",
                Some(SESSION),
                NOW + TOKEN_LIFETIME + 1
            ),
            Err(TokenError::Expired)
        );
        assert_eq!(
            key.check(None, "promote", "p1", Some(SESSION), NOW),
            Err(TokenError::Missing)
        );
        assert_eq!(
            key.check(Some(&t), "promote", "p1", None, NOW),
            Err(TokenError::NoSession)
        );
        // Another console's key, a changed time, garbage.
        let other = FormKey::derive(b"another secret");
        assert_eq!(
            other.check(Some(&t), "promote", "p1", Some(SESSION), NOW),
            Err(TokenError::Forged)
        );
        let (_, tag) = t.split_once('.').unwrap();
        let moved = format!("{}.{tag}", NOW + 100);
        assert_eq!(
            key.check(Some(&moved), "promote", "p1", Some(SESSION), NOW + 100),
            Err(TokenError::Forged)
        );
        for junk in [".", "x.y", "12", "1.!!!", "-1.AAAA"] {
            assert_eq!(
                key.check(Some(junk), "promote", "p1", Some(SESSION), NOW),
                Err(TokenError::Forged),
                "{junk}"
            );
        }
        // Field boundaries are part of the MAC: ("ab", "c") is not ("a", "bc").
        let t = key.issue("ab", "c", SESSION, NOW);
        assert_eq!(
            key.check(Some(&t), "a", "bc", Some(SESSION), NOW),
            Err(TokenError::Forged)
        );
        assert!(!format!("{key:?}").contains("secret"));
    }

    #[test]
    fn the_session_cookie_is_read_from_the_header_and_nothing_odd_passes() {
        assert_eq!(
            session_from_cookies(&format!("a=b; {SESSION_COOKIE}={SESSION}; c=d")),
            Some(SESSION)
        );
        assert_eq!(session_from_cookies("a=b"), None);
        assert_eq!(
            session_from_cookies(&format!("{SESSION_COOKIE}=short")),
            None
        );
        assert_eq!(
            session_from_cookies(&format!("{SESSION_COOKIE}={SESSION}\"<x>")),
            None
        );
        assert_eq!(session_value(&[0u8; 16]).len(), 22);
    }
}
