//! Local chat webhooks for the tests (neither service has an emulator): each checks what its
//! service documents of a request, answers as it does, and keeps what it accepted. The checks
//! are written here from the services' documentation, not from cvchain's code.
//!
//! [`TeamsWorkflow`], a Teams Workflows webhook ("Post to a channel when a webhook request is
//! received"):
//! - `POST /workflows/<id>/triggers/manual/paths/invoke?api-version=1&sp=…&sv=1.0&sig=<sig>`;
//!   another `sig` is a 401 (`HEAD` with the right one: 405, as a POST-only trigger answers);
//! - `Content-Type: application/json`, at most 28 KB (413 otherwise);
//! - `{"type": "message", "attachments": [...]}`, each attachment of content type
//!   `application/vnd.microsoft.card.adaptive` with `contentUrl` null and an `AdaptiveCard` of
//!   version 1.5 or lower, with its `$schema`, as content (400 otherwise); answered 202.
//!
//! [`SlackWebhook`], a Slack incoming webhook:
//! - `POST /services/<team>/<bot>/<key>`; another key is a 403 `invalid_token`;
//! - a JSON object with a non-empty `text` (400 `no_text` otherwise: what an empty payload
//!   gets), at most 50 `blocks` of known types (`header` with plain text of at most 150
//!   characters, `section` with a text of at most 3,000 characters or at most 10 fields of at
//!   most 2,000, `context` with at most 10 elements, `divider`), else 400 `invalid_blocks`;
//!   mrkdwn that is not escaped (a `<` that does not start a link) is refused too, so a
//!   name never becomes a mention; answered 200 `ok`.

use axum::{
    Router,
    body::Bytes,
    extract::{RawQuery, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::Value;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Inner {
    accepted: Vec<Value>,
    refused: Vec<String>,
    failing: Option<u16>,
}

/// What both receivers share: the accepted payloads, the refusals, an outage switch.
pub struct Receiver {
    /// The webhook URL to give cvchain (with its key).
    pub url: String,
    /// The key in it (the `sig`, or the Slack path's last segment).
    pub key: String,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Every payload accepted, in the order received.
    pub fn messages(&self) -> Vec<Value> {
        self.inner.lock().unwrap().accepted.clone()
    }

    /// Why requests were refused.
    pub fn refused(&self) -> Vec<String> {
        self.inner.lock().unwrap().refused.clone()
    }

    /// Answers every request with `status` until set back to `None`.
    pub fn set_failing(&self, status: Option<u16>) {
        self.inner.lock().unwrap().failing = status;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type TeamsWorkflow = Receiver;
pub type SlackWebhook = Receiver;

type Checked = Result<Value, (StatusCode, String)>;

fn refuse(inner: &Mutex<Inner>, status: StatusCode, why: String, body: String) -> Response {
    inner.lock().unwrap().refused.push(why);
    (status, body).into_response()
}

/// A version `major.minor` no higher than 1.5.
fn version_ok(v: &str) -> bool {
    let mut parts = v.split('.');
    let (Some(major), Some(minor), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    match (major.parse::<u32>(), minor.parse::<u32>()) {
        (Ok(1), Ok(minor)) => minor <= 5,
        (Ok(0), Ok(_)) => true,
        _ => false,
    }
}

fn check_teams(body: &[u8]) -> Checked {
    let bad = |why: String| Err((StatusCode::BAD_REQUEST, why));
    if body.len() > 28_000 {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{} bytes (at most 28 KB)", body.len()),
        ));
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return bad("not JSON".into());
    };
    if v["type"] != "message" {
        return bad(format!("type {} is not \"message\"", v["type"]));
    }
    let Some(attachments) = v["attachments"].as_array().filter(|a| !a.is_empty()) else {
        return bad("no attachments".into());
    };
    for a in attachments {
        if a["contentType"] != "application/vnd.microsoft.card.adaptive" {
            return bad(format!("attachment contentType {}", a["contentType"]));
        }
        if a.get("contentUrl").is_some_and(|u| !u.is_null()) {
            return bad("contentUrl is not null".into());
        }
        let card = &a["content"];
        if card["type"] != "AdaptiveCard" {
            return bad(format!("content type {}", card["type"]));
        }
        if card["$schema"] != "http://adaptivecards.io/schemas/adaptive-card.json" {
            return bad(format!("$schema {}", card["$schema"]));
        }
        if !card["version"].as_str().is_some_and(version_ok) {
            return bad(format!(
                "card version {} (Teams renders 1.5 and lower)",
                card["version"]
            ));
        }
        if !card["body"].is_array() {
            return bad("card without a body".into());
        }
    }
    Ok(v)
}

/// A `<` in mrkdwn that does not start a link (`<http…|…>`, `<https…>`): an unescaped name.
fn unescaped(mrkdwn: &str) -> bool {
    mrkdwn
        .match_indices('<')
        .any(|(at, _)| !mrkdwn[at + 1..].starts_with("http"))
}

fn check_slack(body: &[u8]) -> Checked {
    let bad = |code: &str, why: String| Err((StatusCode::BAD_REQUEST, format!("{code}: {why}")));
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return bad("invalid_payload", "not JSON".into());
    };
    let Some(text) = v["text"].as_str().filter(|t| !t.trim().is_empty()) else {
        return bad("no_text", "no text".into());
    };
    if text.chars().count() > 40_000 || unescaped(text) {
        return bad("invalid_payload", "text too long or not escaped".into());
    }
    let blocks = v["blocks"].as_array().cloned().unwrap_or_default();
    if blocks.len() > 50 {
        return bad("invalid_blocks", format!("{} blocks", blocks.len()));
    }
    let text_ok = |t: &Value, max: usize| {
        let s = t["text"].as_str().unwrap_or_default();
        match t["type"].as_str() {
            Some("plain_text") => !s.is_empty() && s.chars().count() <= max,
            Some("mrkdwn") => !s.is_empty() && s.chars().count() <= max && !unescaped(s),
            _ => false,
        }
    };
    for b in &blocks {
        let ok = match b["type"].as_str() {
            Some("header") => b["text"]["type"] == "plain_text" && text_ok(&b["text"], 150),
            Some("section") => {
                let text = b.get("text").map(|t| text_ok(t, 3000));
                let fields = b
                    .get("fields")
                    .and_then(Value::as_array)
                    .map(|f| !f.is_empty() && f.len() <= 10 && f.iter().all(|t| text_ok(t, 2000)));
                (text.is_some() || fields.is_some())
                    && text.unwrap_or(true)
                    && fields.unwrap_or(true)
            }
            Some("context") => b["elements"].as_array().is_some_and(|e| {
                !e.is_empty() && e.len() <= 10 && e.iter().all(|t| text_ok(t, 3000))
            }),
            Some("divider") => true,
            _ => false,
        };
        if !ok {
            return bad("invalid_blocks", format!("block {b}"));
        }
    }
    Ok(v)
}

async fn teams(
    State((sig, inner)): State<(String, Arc<Mutex<Inner>>)>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(s) = inner.lock().unwrap().failing {
        return (StatusCode::from_u16(s).unwrap(), "failing on purpose").into_response();
    }
    let query = query.unwrap_or_default();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if !uri.path().starts_with("/workflows/") || !uri.path().ends_with("/paths/invoke") {
        return refuse(
            &inner,
            StatusCode::NOT_FOUND,
            "no such workflow".into(),
            String::new(),
        );
    }
    if get("sig") != Some(sig.as_str()) || get("sv") != Some("1.0") || get("api-version").is_none()
    {
        return refuse(
            &inner,
            StatusCode::UNAUTHORIZED,
            "sig, sv or api-version not as issued".into(),
            r#"{"error":{"code":"DirectApiAuthorizationRequired","message":"The request must be authenticated only by Shared Access scheme."}}"#.into(),
        );
    }
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "").into_response();
    }
    let media = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !media.starts_with("application/json") {
        return refuse(
            &inner,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {media:?}"),
            String::new(),
        );
    }
    match check_teams(&body) {
        Ok(v) => {
            inner.lock().unwrap().accepted.push(v);
            (StatusCode::ACCEPTED, "").into_response()
        }
        Err((status, why)) => refuse(&inner, status, why.clone(), why),
    }
}

async fn slack(
    State((key, inner)): State<(String, Arc<Mutex<Inner>>)>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    if let Some(s) = inner.lock().unwrap().failing {
        return (StatusCode::from_u16(s).unwrap(), "failing on purpose").into_response();
    }
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "invalid_method").into_response();
    }
    if uri.path() != format!("/services/T0CVCHAIN/B0CVCHAIN/{key}") {
        return refuse(
            &inner,
            StatusCode::FORBIDDEN,
            "invalid_token".into(),
            "invalid_token".into(),
        );
    }
    match check_slack(&body) {
        Ok(v) => {
            inner.lock().unwrap().accepted.push(v);
            (StatusCode::OK, "ok").into_response()
        }
        Err((status, why)) => {
            let code = why.split(':').next().unwrap_or_default().to_owned();
            refuse(&inner, status, why, code)
        }
    }
}

async fn serve(app: Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, task)
}

/// A random key of `n` letters and digits, as the services issue them.
fn key(n: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .chain(uuid::Uuid::new_v4().as_bytes())
        .take(n)
        .map(|b| alphabet[*b as usize % alphabet.len()] as char)
        .collect()
}

impl Receiver {
    /// A Teams Workflows webhook on a free loopback port.
    pub async fn teams() -> TeamsWorkflow {
        let sig = key(32);
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .fallback(teams)
            .with_state((sig.clone(), inner.clone()));
        let (base, task) = serve(app).await;
        let id = uuid::Uuid::new_v4().simple();
        Self {
            url: format!(
                "{base}/workflows/{id}/triggers/manual/paths/invoke?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={sig}"
            ),
            key: sig,
            inner,
            task,
        }
    }

    /// A Slack incoming webhook on a free loopback port.
    pub async fn slack() -> SlackWebhook {
        let token = key(24);
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .fallback(slack)
            .with_state((token.clone(), inner.clone()));
        let (base, task) = serve(app).await;
        Self {
            url: format!("{base}/services/T0CVCHAIN/B0CVCHAIN/{token}"),
            key: token,
            inner,
            task,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checks_refuse_what_the_services_refuse() {
        let card = |version: &str| {
            serde_json::json!({"type": "message", "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": null,
                "content": {"type": "AdaptiveCard", "version": version, "body": [],
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json"}}]})
            .to_string()
        };
        assert!(check_teams(card("1.5").as_bytes()).is_ok());
        assert!(check_teams(card("1.2").as_bytes()).is_ok());
        assert!(check_teams(card("1.6").as_bytes()).is_err());
        assert!(check_teams(br#"{"text": "legacy connector card"}"#).is_err());
        assert!(check_teams(&vec![b' '; 28_001]).is_err());
        let slack = |blocks: Value| serde_json::json!({"text": "t", "blocks": blocks}).to_string();
        assert!(check_slack(b"{}").unwrap_err().1.starts_with("no_text"));
        let header =
            serde_json::json!({"type": "header", "text": {"type": "plain_text", "text": "h"}});
        assert!(check_slack(slack(serde_json::json!([header])).as_bytes()).is_ok());
        assert!(check_slack(slack(Value::Array(vec![header.clone(); 51])).as_bytes()).is_err());
        let long = serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": "x".repeat(3001)}});
        assert!(check_slack(slack(serde_json::json!([long])).as_bytes()).is_err());
        let mention = serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": "<!channel>"}});
        assert!(check_slack(slack(serde_json::json!([mention])).as_bytes()).is_err());
        let link = serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": "<https://x.example/a|open> &lt;b&gt;"}});
        assert!(check_slack(slack(serde_json::json!([link])).as_bytes()).is_ok());
    }
}
