//! The HTTP side of the Functions custom-handler protocol (`cvchain serve`). Decoding lives in
//! the core's `envelope` and `message`, decisions in its `plan`, effects in `process`; this file
//! only maps them to HTTP.

use crate::process::{Disposition, Processor};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use cvchain_core::envelope::{
    FUNCTION_NAME, InvocationResponse, TRIGGER_BINDING, decode_queue_invocation,
};
use cvchain_core::message::{Incoming, Received};
use cvchain_core::report;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tracing::Instrument;

/// A queue message is at most 64 KiB; its envelope, double-encoded, stays well below this.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub processor: Arc<Processor>,
}

/// The handler's routes, usable without a socket (`tower::ServiceExt::oneshot`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(ready))
        .route(&format!("/{FUNCTION_NAME}"), post(invoke))
        // The History function: forwarded as a plain HTTP request (host.json
        // enableForwardingHttpRequest), under the host's `api` route prefix.
        .route("/api/history", get(history_all))
        .route("/api/history/{project}", get(history_project))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The host polls `GET /` until any answer: answer at once, without touching storage.
async fn ready() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ready" }))
}

async fn history_all(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: RawQuery,
) -> Response {
    history_page(state, None, &headers, query.0.as_deref()).await
}

async fn history_project(
    State(state): State<AppState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
) -> Response {
    history_page(state, Some(project), &headers, query.0.as_deref()).await
}

/// JSON for API clients, HTML (with the chart) for browsers or `?format=html`.
async fn history_page(
    state: AppState,
    project: Option<String>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Response {
    let project = match project.map(|p| uuid::Uuid::parse_str(&p)) {
        None => None,
        Some(Ok(id)) => Some(id.to_string()),
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": "projectId must be a UUID"})),
            )
                .into_response();
        }
    };
    let rows = match state
        .processor
        .history()
        .recent(project.as_deref(), 5000)
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "history page: cannot read the history table");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"error": "the history table cannot be read right now"})),
            )
                .into_response();
        }
    };
    let views = report::iterations(&rows);
    let format = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("format="))
        .unwrap_or_default();
    let wants_html = format == "html"
        || (format != "json"
            && headers
                .get("accept")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html")));
    if wants_html {
        let title = match &project {
            Some(p) => format!("cvchain history — project {p}"),
            None => "cvchain history".to_owned(),
        };
        axum::response::Html(report::html_page(&title, &views)).into_response()
    } else {
        Json(views).into_response()
    }
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

async fn invoke(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let invocation_id = headers
        .get("x-azure-functions-invocationid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!("invocation", id = %invocation_id);
    handle(state, body).instrument(span).await
}

async fn handle(state: AppState, body: Bytes) -> Response {
    let received_at = OffsetDateTime::now_utc();

    let (result, notes) = match decode_queue_invocation(&body, TRIGGER_BINDING) {
        Ok(inv) => {
            let received = Received {
                text: inv.message_text,
                message_id: inv.message_id,
                dequeue_count: inv.dequeue_count,
                received_at,
            };
            (
                state.processor.process(&Incoming::decode(received)).await,
                inv.notes,
            )
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
            (
                state
                    .processor
                    .process_unreadable(&Incoming::decode(received), &e.to_string())
                    .await,
                Vec::new(),
            )
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

/// Serves on `addr` until SIGTERM or SIGINT, then lets in-flight invocations finish (up to
/// `drain`). Binding 127.0.0.1: the host always connects there.
pub async fn serve(listener: TcpListener, state: AppState, drain: Duration) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "cvchain handler listening");
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; finishing in-flight invocations");
        let _ = tx.send(true);
    });
    let server = tokio::spawn(async move { server.await });
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => return res.map_err(std::io::Error::other)?,
        _ = rx.wait_for(|v| *v) => {}
    }
    match tokio::time::timeout(drain, &mut server).await {
        Ok(res) => res.map_err(std::io::Error::other)?,
        Err(_) => {
            tracing::warn!(
                ?drain,
                "in-flight invocations did not finish in time; exiting"
            );
            Ok(())
        }
    }
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
