//! A fault proxy in front of Azurite's blob port for long copies.
//!
//! Azurite completes every Copy Blob at once, so a real service's `pending` copy, polled for
//! minutes, never happens against it. This proxy forwards every request to Azurite and then
//! makes each copy behave as a slow one: Copy Blob answers `x-ms-copy-status: pending`, the
//! destination's properties say `pending` with a growing `x-ms-copy-progress` for a while, and
//! then `success`, `failed` or `aborted`, as the test's rules say for that destination. A second
//! Copy Blob into a destination whose copy is still pending is refused with 409
//! `PendingCopyOperation`, as the service refuses it. It counts what it saw, so a test can tell
//! how often each model was copied and whether two copies of one ever overlapped.

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
    response::Response,
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How a copy ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    Success,
    Failed,
    Aborted,
}

impl CopyEnd {
    fn status(self) -> &'static str {
        match self {
            CopyEnd::Success => "success",
            CopyEnd::Failed => "failed",
            CopyEnd::Aborted => "aborted",
        }
    }
}

/// What the proxy does to copies.
#[derive(Debug, Clone)]
pub struct CopyFaults {
    /// How long each copy stays `pending`.
    pub pending_for: Duration,
    /// For destinations whose path contains the text: how their successive copies end (the
    /// last entry repeats). Destinations no rule names succeed.
    pub rules: Vec<(String, Vec<CopyEnd>)>,
}

impl Default for CopyFaults {
    fn default() -> Self {
        Self {
            pending_for: Duration::from_secs(2),
            rules: Vec::new(),
        }
    }
}

/// One Copy Blob the proxy let through.
#[derive(Debug, Clone)]
pub struct CopyRecord {
    /// `/<account>/<container>/<blob>`, as requested.
    pub destination: String,
    pub started: Instant,
    pub end: CopyEnd,
    pub copy_id: String,
}

/// What the proxy saw.
#[derive(Debug, Clone, Default)]
pub struct CopyLog {
    pub copies: Vec<CopyRecord>,
    /// Copy Blob requests refused because a copy into the destination was still pending.
    pub refused_while_pending: u32,
    /// Their destinations, in order.
    pub refused: Vec<String>,
    /// Property reads of a destination while its copy was pending (cvchain polling).
    pub polls_while_pending: u32,
}

impl CopyLog {
    /// Copies started per destination.
    pub fn starts(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for c in &self.copies {
            *out.entry(c.destination.clone()).or_default() += 1;
        }
        out
    }
}

struct Shared {
    upstream: String,
    faults: Mutex<CopyFaults>,
    log: Mutex<CopyLog>,
    http: reqwest::Client,
}

/// The running proxy; stops when dropped.
pub struct CopyProxy {
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CopyProxy {
    /// Starts on a free loopback port in front of `upstream_port` (Azurite's blob port), on a
    /// thread and runtime of its own, so a test that blocks does not stall it.
    pub fn start(upstream_port: u16, faults: CopyFaults) -> Self {
        let port = crate::free_port();
        let shared = Arc::new(Shared {
            upstream: format!("http://127.0.0.1:{upstream_port}"),
            faults: Mutex::new(faults),
            log: Mutex::new(CopyLog::default()),
            http: reqwest::Client::new(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("the proxy's runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("the proxy's port");
                ready_tx.send(()).unwrap();
                let app = Router::new().fallback(forward).with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ready.recv().expect("the proxy started");
        Self {
            port,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The blob service URL through the proxy (Azurite's account path).
    pub fn blob_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            cvchain_azure::storage::settings::DEV_ACCOUNT
        )
    }

    /// A connection string for Azurite with the blob endpoint through the proxy.
    pub fn connection_string(&self, azurite: &crate::Azurite) -> String {
        use cvchain_azure::storage::settings::{DEV_ACCOUNT, DEV_ACCOUNT_KEY};
        format!(
            "DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_ACCOUNT_KEY};\
             BlobEndpoint={};\
             QueueEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};\
             TableEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};",
            self.blob_url(),
            azurite.queue_port,
            azurite.table_port
        )
    }

    pub fn set_faults(&self, faults: CopyFaults) {
        *self.shared.faults.lock().unwrap() = faults;
    }

    pub fn log(&self) -> CopyLog {
        self.shared.log.lock().unwrap().clone()
    }
}

impl Drop for CopyProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a copy into `destination` stands at `now`: pending (with the share done) or ended.
fn copy_state(record: &CopyRecord, pending_for: Duration, now: Instant) -> Result<f64, CopyEnd> {
    let elapsed = now.duration_since(record.started);
    if elapsed < pending_for {
        Ok(elapsed.as_secs_f64() / pending_for.as_secs_f64().max(0.001))
    } else {
        Err(record.end)
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    headers.insert(
        HeaderName::from_static(name),
        HeaderValue::from_str(value).expect("a header value"),
    );
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 256 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| path.clone());
    let is_copy = parts.method == Method::PUT && parts.headers.contains_key("x-ms-copy-source");
    let reads_properties = matches!(parts.method, Method::HEAD | Method::GET)
        && !path_and_query.contains("comp=")
        && !path_and_query.contains("restype=");
    let now = Instant::now();
    let pending_for = shared.faults.lock().unwrap().pending_for;

    // The service refuses a second copy into a destination whose copy is still pending.
    if is_copy {
        let log = shared.log.lock().unwrap();
        let pending = log
            .copies
            .iter()
            .rev()
            .find(|c| c.destination == path)
            .is_some_and(|c| copy_state(c, pending_for, now).is_ok());
        drop(log);
        if pending {
            let mut log = shared.log.lock().unwrap();
            log.refused_while_pending += 1;
            log.refused.push(path.clone());
            drop(log);
            return Response::builder()
                .status(StatusCode::CONFLICT)
                .header("x-ms-error-code", "PendingCopyOperation")
                .header("content-type", "application/xml")
                .body(Body::from(
                    "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>PendingCopyOperation</Code>\
                     <Message>There is currently a pending copy operation.</Message></Error>",
                ))
                .unwrap();
        }
    }

    let mut upstream = shared.http.request(
        parts.method.clone(),
        format!("{}{}", shared.upstream, path_and_query),
    );
    for (name, value) in &parts.headers {
        if !matches!(
            name.as_str(),
            "host" | "connection" | "content-length" | "transfer-encoding"
        ) {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.body(body).send().await {
        Ok(a) => a,
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(format!("proxy: {e}")))
                .unwrap();
        }
    };
    let status = answer.status();
    let mut headers = HeaderMap::new();
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "connection" | "transfer-encoding" | "keep-alive"
        ) {
            headers.append(name.clone(), value.clone());
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();

    if is_copy && status.is_success() {
        let copy_id = headers
            .get("x-ms-copy-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let faults = shared.faults.lock().unwrap().clone();
        let mut log = shared.log.lock().unwrap();
        let attempt = log.copies.iter().filter(|c| c.destination == path).count();
        let end = faults
            .rules
            .iter()
            .find(|(text, _)| path.contains(text.as_str()))
            .map(|(_, ends)| ends[attempt.min(ends.len() - 1)])
            .unwrap_or(CopyEnd::Success);
        log.copies.push(CopyRecord {
            destination: path.clone(),
            started: now,
            end,
            copy_id,
        });
        set(&mut headers, "x-ms-copy-status", "pending");
    } else if reads_properties && status.is_success() {
        let log = shared.log.lock().unwrap();
        if let Some(record) = log.copies.iter().rev().find(|c| c.destination == path) {
            let record = record.clone();
            drop(log);
            let total: u64 = headers
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            set(&mut headers, "x-ms-copy-id", &record.copy_id);
            match copy_state(&record, pending_for, now) {
                Ok(share) => {
                    shared.log.lock().unwrap().polls_while_pending += 1;
                    set(&mut headers, "x-ms-copy-status", "pending");
                    let done = (total as f64 * share) as u64;
                    set(
                        &mut headers,
                        "x-ms-copy-progress",
                        &format!("{done}/{total}"),
                    );
                }
                Err(end) => {
                    set(&mut headers, "x-ms-copy-status", end.status());
                    if end != CopyEnd::Success {
                        set(&mut headers, "x-ms-copy-progress", &format!("0/{total}"));
                        set(
                            &mut headers,
                            "x-ms-copy-status-description",
                            "500 InternalError \"Copy failed (injected by the test's proxy).\"",
                        );
                    }
                }
            }
        }
    }

    let mut response = Response::builder().status(status);
    *response.headers_mut().unwrap() = headers;
    response.body(Body::from(bytes)).unwrap()
}
