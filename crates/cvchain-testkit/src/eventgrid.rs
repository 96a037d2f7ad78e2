//! A local Event Grid topic for the tests (Event Grid has no emulator): it checks what the
//! service checks on a publish, and keeps what it accepted. Two kinds, each with its own
//! checks, as the service has them:
//!
//! A custom topic with the CloudEvents v1.0 input schema ([`EventGridTopic::start`]):
//! - `POST /api/events?api-version=2018-01-01` (another path is a 404, another version a 400);
//! - the `aeg-sas-key` header equal to the topic key, or `Authorization: Bearer <token>`
//!   equal to the expected token (401 otherwise, with Event Grid's error body);
//! - `Content-Type: application/cloudevents-batch+json` (charset optional; 400 otherwise);
//! - a JSON array (the batch) of objects, each with `specversion` "1.0" and non-empty `id`,
//!   `source` and `type` (400 otherwise); at most 1 MB per event and per request (413).
//!
//! A namespace topic ([`EventGridTopic::start_namespace`]):
//! - `POST /topics/<name>:publish?api-version=2023-11-01` (another path or topic is a 404,
//!   another version a 400);
//! - `Authorization: SharedAccessKey <key>` (what Microsoft's SDKs send for a key) or
//!   `Authorization: Bearer <token>`; an `aeg-sas-key` header is not a namespace's scheme
//!   (401);
//! - one event as `application/cloudevents+json`, or a JSON array as
//!   `application/cloudevents-batch+json` (400 otherwise);
//! - at most 1 MB per event and per request (413) and 1,000 events per request (400);
//! - success is `200 {}`.

use axum::{
    Router,
    body::Bytes,
    extract::{RawQuery, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

/// What the topic accepts as credentials.
#[derive(Debug, Clone)]
pub enum TopicAuth {
    Key(String),
    Bearer(String),
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<Value>,
    batches: usize,
    refused: Vec<String>,
    /// Answer every publish with this status (an outage), when set.
    failing: Option<u16>,
}

/// Which kind of topic: a custom topic, or a namespace's topic of this name.
#[derive(Debug, Clone)]
enum Kind {
    Custom,
    Namespace(String),
}

pub struct EventGridTopic {
    /// The topic endpoint, as the portal shows it (`…/api/events`, or a namespace topic's
    /// `…/topics/<name>:publish`).
    pub endpoint: String,
    auth: TopicAuth,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn publish(
    State((auth, inner)): State<(TopicAuth, Arc<Mutex<Inner>>)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let refuse = |status: StatusCode, code: &str, message: String| {
        inner.lock().unwrap().refused.push(message.clone());
        error(status, code, &message)
    };
    if let Some(s) = inner.lock().unwrap().failing {
        let status = StatusCode::from_u16(s).unwrap();
        return error(
            status,
            "ServiceUnavailable",
            "the topic is failing on purpose",
        );
    }
    if query.as_deref() != Some("api-version=2018-01-01") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("api-version 2018-01-01 expected, got query {query:?}"),
        );
    }
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorized = match &auth {
        TopicAuth::Key(k) => header("aeg-sas-key").as_deref() == Some(k.as_str()),
        TopicAuth::Bearer(t) => header("authorization") == Some(format!("Bearer {t}")),
    };
    if !authorized {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the request carries no valid aeg-sas-key or bearer token".into(),
        );
    }
    let content_type = header("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if media != "application/cloudevents-batch+json" {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("content type {content_type:?} is not application/cloudevents-batch+json"),
        );
    }
    if body.len() > 1_000_000 {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "the request is over 1 MB".into(),
        );
    }
    let Ok(Value::Array(events)) = serde_json::from_slice::<Value>(&body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not a JSON array of events".into(),
        );
    };
    for e in &events {
        let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default();
        if text("specversion") != "1.0"
            || text("id").is_empty()
            || text("source").is_empty()
            || text("type").is_empty()
        {
            return refuse(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("not a CloudEvents 1.0 event: {e}"),
            );
        }
        if e.to_string().len() > 1_000_000 {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                "an event is over 1 MB".into(),
            );
        }
    }
    let mut i = inner.lock().unwrap();
    i.batches += 1;
    i.events.extend(events);
    (StatusCode::OK, axum::Json(json!({}))).into_response()
}

/// A publish to a namespace topic, checked as the service checks it.
async fn publish_namespace(
    State((name, auth, inner)): State<(String, TopicAuth, Arc<Mutex<Inner>>)>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let refuse = |status: StatusCode, code: &str, message: String| {
        inner.lock().unwrap().refused.push(message.clone());
        error(status, code, &message)
    };
    if let Some(s) = inner.lock().unwrap().failing {
        let status = StatusCode::from_u16(s).unwrap();
        return error(
            status,
            "ServiceUnavailable",
            "the topic is failing on purpose",
        );
    }
    if method != Method::POST || uri.path() != format!("/topics/{name}:publish") {
        return refuse(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "{method} {} is not this namespace's topic {name}",
                uri.path()
            ),
        );
    }
    if query.as_deref() != Some("api-version=2023-11-01") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("api-version 2023-11-01 expected, got query {query:?}"),
        );
    }
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorized = match &auth {
        TopicAuth::Key(k) => header("authorization") == Some(format!("SharedAccessKey {k}")),
        TopicAuth::Bearer(t) => header("authorization") == Some(format!("Bearer {t}")),
    };
    if !authorized {
        let how = if header("aeg-sas-key").is_some() {
            "an aeg-sas-key header (a custom topic's scheme)"
        } else {
            "no valid Authorization header"
        };
        return refuse(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            format!("the request carries {how}: SharedAccessKey or Bearer expected"),
        );
    }
    if body.len() > 1_000_000 {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "the request is over 1 MB".into(),
        );
    }
    let content_type = header("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let events = match (media, serde_json::from_slice::<Value>(&body)) {
        ("application/cloudevents-batch+json", Ok(Value::Array(events))) => events,
        ("application/cloudevents+json", Ok(e @ Value::Object(_))) => vec![e],
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("content type {content_type:?} with a body that is not what it says"),
            );
        }
    };
    if events.len() > 1_000 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("{} events in one request (at most 1,000)", events.len()),
        );
    }
    if let Some(r) = check_events(&events) {
        return refuse(r.0, r.1, r.2);
    }
    let mut i = inner.lock().unwrap();
    i.batches += 1;
    i.events.extend(events);
    (StatusCode::OK, axum::Json(json!({}))).into_response()
}

/// Each event a CloudEvents 1.0 event of at most 1 MB; else why not.
fn check_events(events: &[Value]) -> Option<(StatusCode, &'static str, String)> {
    for e in events {
        let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default();
        if text("specversion") != "1.0"
            || text("id").is_empty()
            || text("source").is_empty()
            || text("type").is_empty()
        {
            return Some((
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("not a CloudEvents 1.0 event: {e}"),
            ));
        }
        if e.to_string().len() > 1_000_000 {
            return Some((
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                "an event is over 1 MB".into(),
            ));
        }
    }
    None
}

impl EventGridTopic {
    /// A namespace topic named `name` on a free loopback port, over http (the key path).
    pub async fn start_namespace(name: &str, auth: TopicAuth) -> Self {
        Self::serve(Kind::Namespace(name.to_owned()), auth, None).await
    }

    /// A namespace topic over https with a certificate of `ca` (the bearer path).
    pub async fn start_namespace_https(name: &str, auth: TopicAuth, ca: &crate::TestCa) -> Self {
        Self::serve(Kind::Namespace(name.to_owned()), auth, Some(ca)).await
    }

    async fn serve(kind: Kind, auth: TopicAuth, ca: Option<&crate::TestCa>) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let path = match &kind {
            Kind::Custom => "/api/events".to_owned(),
            Kind::Namespace(name) => format!("/topics/{name}:publish"),
        };
        let scheme = if ca.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{}{path}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = match &kind {
            Kind::Custom => Self::router(auth.clone(), inner.clone()),
            Kind::Namespace(name) => Router::new().fallback(publish_namespace).with_state((
                name.clone(),
                auth.clone(),
                inner.clone(),
            )),
        };
        let task = match ca {
            Some(ca) => {
                let acceptor = cvchain_standin::tls_acceptor(&ca.cert, &ca.key).unwrap();
                let (_never, rx) = tokio::sync::oneshot::channel::<()>();
                tokio::spawn(async move {
                    let _keep = _never;
                    cvchain_standin::serve_tls(listener, app, acceptor, rx).await;
                })
            }
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
        };
        Self {
            endpoint,
            auth,
            inner,
            task,
        }
    }

    /// A topic over https with a certificate of `ca` (a bearer token is only sent over https).
    pub async fn start_https(auth: TopicAuth, ca: &crate::TestCa) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let endpoint = format!("https://{}/api/events", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Self::router(auth.clone(), inner.clone());
        let acceptor = cvchain_standin::tls_acceptor(&ca.cert, &ca.key).unwrap();
        let (_never, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _keep = _never;
            cvchain_standin::serve_tls(listener, app, acceptor, rx).await;
        });
        Self {
            endpoint,
            auth,
            inner,
            task,
        }
    }

    /// A topic on a free loopback port, over http (the key path).
    pub async fn start(auth: TopicAuth) -> Self {
        Self::serve(Kind::Custom, auth, None).await
    }

    fn router(auth: TopicAuth, inner: Arc<Mutex<Inner>>) -> Router {
        Router::new()
            .route("/api/events", post(publish))
            .with_state((auth, inner))
    }

    /// Every event accepted, in the order received.
    pub fn events(&self) -> Vec<Value> {
        self.inner.lock().unwrap().events.clone()
    }

    /// How many publish requests were accepted.
    pub fn batches(&self) -> usize {
        self.inner.lock().unwrap().batches
    }

    /// Why requests were refused.
    pub fn refused(&self) -> Vec<String> {
        self.inner.lock().unwrap().refused.clone()
    }

    /// Answers every publish with `status` (an outage) until set back to `None`.
    pub fn set_failing(&self, status: Option<u16>) {
        self.inner.lock().unwrap().failing = status;
    }

    pub fn key(&self) -> Option<&str> {
        match &self.auth {
            TopicAuth::Key(k) => Some(k),
            TopicAuth::Bearer(_) => None,
        }
    }
}

impl Drop for EventGridTopic {
    fn drop(&mut self) {
        self.task.abort();
    }
}
