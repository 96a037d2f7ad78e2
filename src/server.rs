//! The HTTP side of the Functions custom-handler protocol (`cvchain serve`). Decoding lives in
//! the core's `envelope` and `message`, decisions in its `plan`, effects in `process`; this file
//! only maps them to HTTP.
//!
//! It also bounds what one client can hold ([`Limits`]): a request's headers must arrive within
//! a few seconds, its body (on every route) within a few more, bodies buffered at once share a
//! budget, and at most so many connections are kept: a new one closes the oldest idle one
//! rather than wait, so the host's readiness probe (`GET /`) is answered at once whatever
//! slow clients hold.

use crate::console::{self, Console};
use crate::process::{Disposition, Processor};
use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use cvchain_core::envelope::{
    DELIVER_EVENTS_FUNCTION, FUNCTION_NAME, InvocationResponse, TRIGGER_BINDING,
    decode_queue_invocation, timer_is_past_due,
};
use cvchain_core::message::{Incoming, Received};
use futures::StreamExt;
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};
use time::OffsetDateTime;
use tokio::{
    net::TcpListener,
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tracing::Instrument;

/// A queue message is at most 64 KiB; its envelope, double-encoded, stays well below this.
const MAX_BODY: usize = 1024 * 1024;

/// What one client can hold of the handler.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request's headers must arrive within this; an idle keep-alive connection is closed
    /// after it too. The host sends its requests at once.
    pub header_timeout: Duration,
    /// A request's body must arrive within this once its headers have.
    pub body_timeout: Duration,
    /// Connections kept at once: beyond it, each new connection closes the oldest one that has
    /// no request in progress.
    pub max_connections: usize,
    /// Bytes of request bodies buffered at once, all connections together.
    pub body_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(15),
            max_connections: 256,
            body_budget: 16 * 1024 * 1024,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub processor: Arc<Processor>,
    /// The History function: the registry console.
    pub console: Arc<Console>,
    pub limits: Limits,
    /// Permits for [`Limits::body_budget`] bytes.
    bodies: Arc<Semaphore>,
}

impl AppState {
    pub fn new(processor: Arc<Processor>, console: Console) -> Self {
        Self::with_limits(processor, console, Limits::default())
    }

    pub fn with_limits(processor: Arc<Processor>, console: Console, limits: Limits) -> Self {
        Self {
            processor,
            console: Arc::new(console),
            limits,
            bodies: Arc::new(Semaphore::new(limits.body_budget)),
        }
    }
}

/// The handler's routes, usable without a socket (`tower::ServiceExt::oneshot`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(ready))
        .route(&format!("/{FUNCTION_NAME}"), post(invoke))
        // The timer function: pending events go out every minute.
        .route(&format!("/{DELIVER_EVENTS_FUNCTION}"), post(deliver_events))
        // The History function, the registry console: forwarded as a plain HTTP request
        // (host.json enableForwardingHttpRequest), under the host's `api` route prefix.
        .route(console::BASE, get(console_list))
        .route(
            &format!("{}/{{project}}", console::BASE),
            get(console_project),
        )
        .route(
            &format!("{}/{{project}}/promote", console::BASE),
            post(console_promote),
        )
        .route(
            &format!("{}/{{project}}/rollback", console::BASE),
            post(console_rollback),
        )
        .fallback(not_found)
        // Every route, whatever it reads, takes its body through the same bounds.
        .layer(axum::middleware::from_fn_with_state(state.clone(), bounded))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Reads every request's body within [`Limits`] before its route sees it (see [`read_body`]),
/// and holds the body's share of the budget until the route has answered: a stalled or
/// oversized body on any route is cut off the same way, so none can hold a connection slot, or
/// memory, beyond the bounds.
async fn bounded(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let (bytes, _permit) = match read_body(&state, &parts.headers, body).await {
        Ok(read) => read,
        Err((status, why)) => {
            tracing::warn!(%status, route = %parts.uri.path(), "request body not read: {why}");
            return (
                status,
                Json(InvocationResponse::with_logs(vec![why.to_owned()])),
            )
                .into_response();
        }
    };
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The host polls `GET /` until any answer: answer at once, without touching storage.
async fn ready() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ready" }))
}

/// The routes, once the application behind them is built. Until then `GET /` (the host's
/// readiness probe) answers at once and every other request waits for them: start-up answers
/// the probe as soon as it listens, and builds the clients and the processor after.
#[derive(Clone)]
pub struct Routes {
    built: tokio::sync::watch::Receiver<Option<Router>>,
    /// Told when the first request came (answered, for the probe).
    asked: Arc<Notify>,
}

/// Hands the built application's routes to the server.
pub struct RoutesReady {
    built: tokio::sync::watch::Sender<Option<Router>>,
    asked: Arc<Notify>,
}

impl RoutesReady {
    pub fn ready(self, state: AppState) {
        let _ = self.built.send(Some(app(state)));
    }

    /// Once a request came: the probe was answered, or another request waits for the routes.
    pub async fn asked(&self) {
        self.asked.notified().await
    }
}

impl Routes {
    /// Routes still to be built, and the handle that gives them.
    pub fn pending() -> (RoutesReady, Self) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let asked = Arc::new(Notify::new());
        (
            RoutesReady {
                built: tx,
                asked: asked.clone(),
            },
            Self { built: rx, asked },
        )
    }

    /// The answer to `request`: through the routes, waiting for them unless it is the probe.
    async fn answer(
        &mut self,
        request: axum::http::Request<hyper::body::Incoming>,
    ) -> Result<Response, std::convert::Infallible> {
        let built = self.built.borrow().clone();
        let router = match built {
            Some(router) => router,
            None if request.method() == axum::http::Method::GET && request.uri().path() == "/" => {
                let answer = ready().await.into_response();
                self.asked.notify_one();
                return Ok(answer);
            }
            None => {
                self.asked.notify_one();
                match self.built.wait_for(Option::is_some).await {
                    Ok(built) => built.clone().expect("built"),
                    // The start failed: the process is exiting with the reason.
                    Err(_) => return Ok(StatusCode::SERVICE_UNAVAILABLE.into_response()),
                }
            }
        };
        hyper::service::Service::call(
            &hyper_util::service::TowerToHyperService::new(router),
            request,
        )
        .await
    }
}

async fn console_list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: RawQuery,
) -> Response {
    console::list(
        &state.processor,
        &state.console,
        &headers,
        query.0.as_deref(),
    )
    .await
}

async fn console_project(
    State(state): State<AppState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
) -> Response {
    console::project(
        &state.processor,
        &state.console,
        &project,
        &headers,
        query.0.as_deref(),
    )
    .await
}

async fn console_promote(
    State(state): State<AppState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
    body: Bytes,
) -> Response {
    console::act(
        &state.processor,
        &state.console,
        &project,
        console::Action::Promote,
        &headers,
        query.0.as_deref(),
        body,
    )
    .await
}

async fn console_rollback(
    State(state): State<AppState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
    body: Bytes,
) -> Response {
    console::act(
        &state.processor,
        &state.console,
        &project,
        console::Action::Rollback,
        &headers,
        query.0.as_deref(),
        body,
    )
    .await
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(InvocationResponse::with_logs(vec![format!(
            "cvchain handles only POST /{FUNCTION_NAME}"
        )])),
    )
        .into_response()
}

/// The body was read within the bounds by [`bounded`].
async fn invoke(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let invocation_id = headers
        .get("x-azure-functions-invocationid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!("invocation", id = %invocation_id);
    handle(state, body, Some(invocation_id).filter(|i| !i.is_empty()))
        .instrument(span)
        .await
}

/// Reads a request body within the body timeout and the shared budget: a client that stalls
/// is answered 408, one that cannot get a share of the budget in time 503, one that sends more
/// than 1 MiB 413. The permit is the body's share of the budget, held while it is in memory.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), (StatusCode, &'static str)> {
    const TOO_LARGE: (StatusCode, &str) = (
        StatusCode::PAYLOAD_TOO_LARGE,
        "the request body is over 1 MiB",
    );
    const STALLED: (StatusCode, &str) = (
        StatusCode::REQUEST_TIMEOUT,
        "the request body did not arrive in time",
    );
    const BUSY: (StatusCode, &str) = (
        StatusCode::SERVICE_UNAVAILABLE,
        "too many request bodies in flight; try again",
    );
    let deadline = Instant::now() + state.limits.body_timeout;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(TOO_LARGE);
    }
    let share = |n: usize| {
        let bodies = state.bodies.clone();
        async move {
            match tokio::time::timeout_at(deadline, bodies.acquire_many_owned(n as u32)).await {
                Ok(Ok(permit)) => Ok(permit),
                _ => Err(BUSY),
            }
        }
    };
    // A declared length is reserved at once, and the buffer is allocated to it.
    let mut held = match declared {
        Some(n) => Some(share(n).await?),
        None => None,
    };
    let mut buf = Vec::with_capacity(declared.unwrap_or(0));
    let mut stream = body.into_data_stream();
    loop {
        let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Err(STALLED),
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                ));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        if buf.len() + chunk.len() > declared.unwrap_or(MAX_BODY).min(MAX_BODY) {
            return Err(TOO_LARGE);
        }
        if declared.is_none() {
            let permit = share(chunk.len()).await?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((Bytes::from(buf), held))
}

/// `DeliverEvents`: every project's pending events to the sinks that are due. A failure answers
/// 500 (the host logs it; the next minute's run tries again).
async fn deliver_events(State(state): State<AppState>, body: Bytes) -> Response {
    let late = match timer_is_past_due(&body) {
        Ok(late) => late,
        Err(e) => {
            tracing::warn!(error = %e, "DeliverEvents: unreadable timer invocation; delivering anyway");
            false
        }
    };
    let Some(events) = state.processor.events() else {
        return (
            StatusCode::OK,
            Json(InvocationResponse::with_logs(vec![
                "no event sink configured (CVCHAIN_EVENTS_QUEUE, CVCHAIN_EVENTGRID_ENDPOINT, CVCHAIN_WEBHOOK_URL, CVCHAIN_TEAMS_WEBHOOK_URL, CVCHAIN_SLACK_WEBHOOK_URL)".into(),
            ])),
        )
            .into_response();
    };
    match events
        .deliver_all()
        .instrument(crate::telemetry::timer_span())
        .await
    {
        Ok(report) => {
            let line = format!(
                "events: {}{}",
                report.describe(),
                if late { " (a late run)" } else { "" }
            );
            tracing::info!("{line}");
            (
                StatusCode::OK,
                Json(InvocationResponse::with_logs(vec![line])),
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "DeliverEvents failed; the next run tries again");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(InvocationResponse::with_logs(vec![e.to_string()])),
            )
                .into_response()
        }
    }
}

async fn handle(state: AppState, body: Bytes, invocation_id: Option<String>) -> Response {
    let received_at = OffsetDateTime::now_utc();

    let (result, notes) = match decode_queue_invocation(&body, TRIGGER_BINDING) {
        Ok(inv) => {
            let received = Received {
                text: inv.message_text,
                message_id: inv.message_id,
                dequeue_count: inv.dequeue_count,
                received_at,
            };
            let incoming = Incoming::decode(received);
            let traced = crate::telemetry::invocation(
                &incoming,
                crate::telemetry::Trigger::Host,
                state.processor.queue_name(),
                invocation_id.as_deref(),
            );
            let result = traced.run(state.processor.process(&incoming)).await;
            let (outcome, decision, error) = crate::process::traced(&result);
            traced.finish(outcome, decision.as_deref(), error.as_deref());
            (result, inv.notes)
        }
        Err(e) => {
            // Nothing to retry: record what arrived so it is not lost.
            let received = Received {
                text: String::from_utf8_lossy(&body).into_owned(),
                message_id: None,
                dequeue_count: 1,
                received_at,
            };
            tracing::warn!(error = %e, "unreadable invocation body");
            let incoming = Incoming::decode(received);
            let traced = crate::telemetry::invocation(
                &incoming,
                crate::telemetry::Trigger::Host,
                state.processor.queue_name(),
                invocation_id.as_deref(),
            );
            let result = traced
                .run(
                    state
                        .processor
                        .process_unreadable(&incoming, &e.to_string()),
                )
                .await;
            let (outcome, decision, error) = crate::process::traced(&result);
            traced.finish(outcome, decision.as_deref(), error.as_deref());
            (result, Vec::new())
        }
    };

    match result {
        Ok(outcome) => {
            let mut logs = notes;
            logs.extend(outcome.logs);
            match outcome.disposition {
                Disposition::Recorded => tracing::info!(
                    row = %outcome.row, duplicate = outcome.duplicate, "notification recorded"
                ),
                Disposition::Rejected => tracing::warn!(
                    row = %outcome.row, duplicate = outcome.duplicate, "message rejected and recorded"
                ),
            }
            (StatusCode::OK, Json(InvocationResponse::with_logs(logs))).into_response()
        }
        Err(e) => {
            // The host drops a non-2xx body, so the reason goes to stderr first.
            tracing::error!(
                error = %e,
                transient = e.is_transient(),
                "invocation failed; the host will retry the message"
            );
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(InvocationResponse::with_logs(vec![
                    cvchain_core::redact::scrub(&e.to_string()),
                ])),
            )
                .into_response()
        }
    }
}

/// One connection, as the accept loop tracks it.
struct Conn {
    opened: Instant,
    /// Requests in progress on it.
    busy: AtomicUsize,
    evicted: AtomicBool,
    evict: Notify,
}

/// Marks a request in progress on its connection for as long as it lives.
struct InProgress(Arc<Conn>);

impl InProgress {
    fn enter(conn: &Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Self(conn.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connections being served.
#[derive(Default)]
struct Conns {
    open: Mutex<Vec<Arc<Conn>>>,
    closed: Notify,
}

impl Conns {
    /// Makes room for one more connection: at the cap, the oldest connection without a request
    /// in progress is closed (a slow or idle client); when every one has a request in progress,
    /// waits for one to end (requests end within their own bounds).
    async fn make_room(&self, max: usize) {
        loop {
            {
                let open = self.open.lock().expect("connections");
                let kept = open
                    .iter()
                    .filter(|c| !c.evicted.load(Ordering::SeqCst))
                    .count();
                if kept < max {
                    return;
                }
                if let Some(idle) = open
                    .iter()
                    .filter(|c| {
                        !c.evicted.load(Ordering::SeqCst) && c.busy.load(Ordering::SeqCst) == 0
                    })
                    .min_by_key(|c| c.opened)
                {
                    idle.evicted.store(true, Ordering::SeqCst);
                    idle.evict.notify_one();
                    return;
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.closed.notified()).await;
        }
    }

    fn add(&self) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            opened: Instant::now(),
            busy: AtomicUsize::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.open.lock().expect("connections").push(conn.clone());
        conn
    }

    fn remove(&self, conn: &Arc<Conn>) {
        self.open
            .lock()
            .expect("connections")
            .retain(|c| !Arc::ptr_eq(c, conn));
        self.closed.notify_one();
    }
}

/// Serves one connection until it ends, is evicted, or shutdown asks it to finish.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    routes: Routes,
    conn: Arc<Conn>,
    conns: Arc<Conns>,
    limits: Limits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let tracked = conn.clone();
    let service = hyper::service::service_fn(move |request| {
        let in_progress = InProgress::enter(&tracked);
        let mut routes = routes.clone();
        async move {
            let answer = routes.answer(request).await;
            drop(in_progress);
            answer
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        // Evicted to make room: dropping the connection closes it.
        _ = conn.evict.notified() => {}
        _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.as_mut().await;
        }
    }
    conns.remove(&conn);
}

/// Serves `routes` on `listener` until SIGTERM or SIGINT, then lets in-flight invocations
/// finish (up to `drain`). Binding 127.0.0.1: the host always connects there.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    limits: Limits,
    drain: Duration,
) -> std::io::Result<()> {
    let conns = Arc::new(Conns::default());
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        while tasks.try_join_next().is_some() {}
        let stream = tokio::select! {
            _ = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        conns.make_room(limits.max_connections).await;
        let conn = conns.add();
        tasks.spawn(serve_connection(
            stream,
            routes.clone(),
            conn,
            conns.clone(),
            limits,
            stopping.clone(),
        ));
    }
    tracing::info!("shutdown requested; finishing in-flight invocations");
    drop(listener);
    let _ = stop.send(true);
    let drained =
        tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            ?drain,
            "in-flight invocations did not finish in time; exiting"
        );
    }
    Ok(())
}

/// SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
