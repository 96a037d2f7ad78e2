//! A Custom Vision Training API stand-in: Custom Vision has no emulator, so cvchain ships one for
//! its tests and local runs. It follows the v3.3 OpenAPI spec for the operations cvchain uses
//! (plus CreateProject, UpdateProject, TrainProject, GetIterations, GetDomains), keeps projects
//! and iterations in memory, checks each request against the spec, and plays the service's
//! storage integration: a project set up with `notificationQueueUri` gets a ConnectionTest
//! message; training and exporting write the documented notifications to that queue, and an
//! export writes the model blob `{projectId} - {iterationId}.{platform}` to the backup container.
//!
//! Faults on request (`POST /_standin/faults`): a share of calls answered 429 (with Retry-After)
//! or 500, slow answers, exports or trainings that fail. `GET /_standin/calls` counts the calls.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use cvchain_azure::storage::{
    clients::StorageClients, queue::send_text, settings::StorageAuth, shared_key::blob_read_sas,
};
use cvchain_core::customvision::{
    Export, Iteration, IterationPerformance, Project, ProjectSettings, TagPerformance, codes,
};
use cvchain_core::notification::{ExportStatus, Notification, TrainingStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use time::OffsetDateTime;
use uuid::Uuid;

/// The domains the stand-in knows (ids as in the service; compact ones are exportable).
pub const DOMAINS: &[(&str, &str, bool)] = &[
    ("ee85a74c-405e-4adc-bb47-ffa8ca0c9f31", "General", false),
    (
        "0732100f-1a38-4e49-a514-c9b44c697ab5",
        "General (compact)",
        true,
    ),
    (
        "6b4faeda-8396-481b-9f8b-177b9fa3097f",
        "Retail (compact)",
        true,
    ),
    ("b30a91ae-e3c1-4f73-a81e-c270bff27c39", "Retail", false),
];
pub const COMPACT_DOMAIN: &str = "0732100f-1a38-4e49-a514-c9b44c697ab5";
/// The service's cap on iterations per project (TrainProject answers
/// `BadRequestExceedIterationPerProjectLimit` beyond it).
pub const MAX_ITERATIONS: usize = 20;
const EXPORTABLE_TO: &[&str] = &["ONNX", "DockerFile", "TensorFlow", "CoreML"];
/// Blob names in URLs: everything but RFC 3986 unreserved characters escaped.
const URL_PATH_ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Where models live when a project has no backup container (the service's own storage).
pub const INTERNAL_CONTAINER: &str = "standin-exports";

/// How the stand-in behaves.
#[derive(Clone)]
pub struct StandinConfig {
    /// The key callers must send as `Training-Key` (a Bearer token is accepted too).
    pub training_key: String,
    /// The storage account the integration writes to (queues and containers are found there by
    /// the last segment of the URIs given to CreateProject).
    pub storage: Option<StorageClients>,
    pub train_delay: Duration,
    pub export_delay: Duration,
    /// Base64-encode notification messages (whether the service does is unknown).
    pub base64_messages: bool,
    pub model_size: usize,
    pub seed: u64,
    /// Serve https with this PEM certificate chain and key (for Microsoft Entra ID clients,
    /// which send tokens only over https).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// A Bearer token to accept besides the key (any other token is refused).
    pub accept_bearer: Option<String>,
}

impl std::fmt::Debug for StandinConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandinConfig")
            .field("train_delay", &self.train_delay)
            .field("export_delay", &self.export_delay)
            .finish()
    }
}

impl Default for StandinConfig {
    fn default() -> Self {
        Self {
            training_key: "standin-training-key".into(),
            storage: None,
            train_delay: Duration::from_millis(200),
            export_delay: Duration::from_millis(200),
            base64_messages: false,
            model_size: 64 * 1024,
            seed: 7,
            tls: None,
            accept_bearer: None,
        }
    }
}

/// Faults to inject, set with `POST /_standin/faults`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Faults {
    /// Share of API calls answered with an error: 429 (with Retry-After) or 500.
    pub failure_rate: f64,
    /// Share of those errors that are 429 (default one half).
    pub throttle_share: Option<f64>,
    /// Share of API calls answered after `slow_ms`.
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// `Retry-After` on 429 answers, in seconds.
    pub retry_after_seconds: u64,
    /// Platforms whose exports end `Failed`.
    pub fail_export_platforms: Vec<String>,
    /// Trainings end `TrainingFailed`.
    pub fail_training: bool,
}

/// One ExportIteration call, as the stand-in saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExportCall {
    pub project_id: Uuid,
    pub iteration_id: Uuid,
    pub platform: String,
    pub flavor: Option<String>,
    /// `accepted`, `alreadyInProgress`, `rejected` or `fault`.
    pub outcome: String,
}

/// What `GET /_standin/calls` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallLog {
    /// Calls per operation, faults included.
    pub counts: HashMap<String, u64>,
    /// Injected faults per operation.
    pub faults: HashMap<String, u64>,
    pub exports: Vec<ExportCall>,
    /// Milliseconds since start of each API call, for rate checks.
    pub timeline_ms: Vec<u64>,
}

struct ProjectState {
    project: Project,
    /// Numbers iteration names: a deleted iteration's number is not reused.
    trained: u32,
    queue: Option<String>,
    container: Option<String>,
    container_url: Option<String>,
    iterations: Vec<IterationState>,
}

struct IterationState {
    iteration: Iteration,
    performance: Option<IterationPerformance>,
    exports: Vec<Export>,
}

struct State_ {
    projects: HashMap<Uuid, ProjectState>,
    faults: Faults,
    calls: CallLog,
    rng: u64,
}

struct Shared {
    config: StandinConfig,
    state: Mutex<State_>,
    started: Instant,
}

type S = Arc<Shared>;

/// A running stand-in.
pub struct Standin {
    pub addr: SocketAddr,
    shared: S,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Standin {
    /// Starts on 127.0.0.1 at a free port.
    pub async fn start(config: StandinConfig) -> std::io::Result<Self> {
        Self::start_on(config, 0).await
    }

    pub async fn start_on(config: StandinConfig, port: u16) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State_ {
                projects: HashMap::new(),
                faults: Faults::default(),
                calls: CallLog::default(),
                rng: config.seed.max(1),
            }),
            config,
            started: Instant::now(),
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared.clone());
        let tls = match &shared.config.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        match tls {
            None => {
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                });
            }
            Some(acceptor) => {
                tokio::spawn(serve_tls(listener, app, acceptor, rx));
            }
        }
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
        })
    }

    /// The endpoint to give cvchain as `CUSTOM_VISION_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.shared.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn training_key(&self) -> &str {
        &self.shared.config.training_key
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.state.lock().expect("state").faults = faults;
    }

    pub fn calls(&self) -> CallLog {
        self.shared.state.lock().expect("state").calls.clone()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| invalid(format!("{}: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| invalid(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// axum over rustls: one hyper HTTP/1 connection per accepted TLS stream.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        }
    }
}

fn router(shared: S) -> Router {
    let api = Router::new()
        .route("/domains", get(get_domains))
        .route("/projects", post(create_project))
        .route(
            "/projects/{project}",
            get(get_project).patch(update_project),
        )
        .route("/projects/{project}/train", post(train_project))
        .route("/projects/{project}/iterations", get(get_iterations))
        .route(
            "/projects/{project}/iterations/{iteration}",
            get(get_iteration).delete(delete_iteration),
        )
        .route(
            "/projects/{project}/iterations/{iteration}/performance",
            get(get_performance),
        )
        .route(
            "/projects/{project}/iterations/{iteration}/export",
            get(get_exports).post(export_iteration),
        )
        .route(
            "/projects/{project}/iterations/{iteration}/publish",
            post(publish_iteration).delete(unpublish_iteration),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "NotFound", "Resource not found") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "BadRequestNotSupported",
                "The method is not supported for this resource",
            )
        })
        .layer(middleware::from_fn_with_state(shared.clone(), gate));
    Router::new()
        .nest("/customvision/v3.3/training", api.clone())
        .nest("/customvision/v3.3/Training", api)
        .route("/_standin/faults", post(set_faults).get(get_faults))
        .route("/_standin/calls", get(get_calls))
        .with_state(shared)
}

/// An error answer in the service's shape, small enough to pass around in `Result`s.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1, &self.2)
    }
}

/// The service's error body.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

fn operation_name(method: &str, path: &str) -> &'static str {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Path relative to the nest: projects/{p}/iterations/{i}/export …
    match (method, segs.as_slice()) {
        ("GET", ["domains"]) => "GetDomains",
        ("POST", ["projects"]) => "CreateProject",
        ("GET", ["projects", _]) => "GetProject",
        ("PATCH", ["projects", _]) => "UpdateProject",
        ("POST", ["projects", _, "train"]) => "TrainProject",
        ("GET", ["projects", _, "iterations"]) => "GetIterations",
        ("GET", ["projects", _, "iterations", _]) => "GetIteration",
        ("DELETE", ["projects", _, "iterations", _]) => "DeleteIteration",
        ("GET", ["projects", _, "iterations", _, "performance"]) => "GetIterationPerformance",
        ("GET", ["projects", _, "iterations", _, "export"]) => "GetExports",
        ("POST", ["projects", _, "iterations", _, "export"]) => "ExportIteration",
        ("POST", ["projects", _, "iterations", _, "publish"]) => "PublishIteration",
        ("DELETE", ["projects", _, "iterations", _, "publish"]) => "UnpublishIteration",
        _ => "Unknown",
    }
}

/// Authentication, call counting and fault injection, before any operation runs.
async fn gate(State(s): State<S>, req: axum::extract::Request, next: Next) -> Response {
    let op = operation_name(req.method().as_str(), req.uri().path());
    let key_ok = req
        .headers()
        .get("training-key")
        .or_else(|| req.headers().get("ocp-apim-subscription-key"))
        .and_then(|v| v.to_str().ok())
        .is_some_and(|k| k == s.config.training_key);
    let bearer = match (&s.config.accept_bearer, req.headers().get("authorization")) {
        (Some(token), Some(v)) => v.to_str().ok() == Some(format!("Bearer {token}").as_str()),
        _ => false,
    };
    let (fault, slow, retry_after) = {
        let mut st = s.state.lock().expect("state");
        *st.calls.counts.entry(op.to_owned()).or_default() += 1;
        let ms = s.started.elapsed().as_millis() as u64;
        st.calls.timeline_ms.push(ms);
        let f = st.faults.clone();
        let roll = next_f64(&mut st.rng);
        let fault = if roll < f.failure_rate {
            let share = f.throttle_share.unwrap_or(0.5).clamp(0.0, 1.0);
            Some(if roll < f.failure_rate * share {
                429
            } else {
                500
            })
        } else {
            None
        };
        let slow = next_f64(&mut st.rng) < f.slow_rate;
        if fault.is_some() {
            *st.calls.faults.entry(op.to_owned()).or_default() += 1;
            if op == "ExportIteration" {
                st.calls.exports.push(export_call(req.uri(), "fault"));
            }
        }
        (fault, slow.then_some(f.slow_ms), f.retry_after_seconds)
    };
    if !key_ok && !bearer {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}})),
        )
            .into_response();
    }
    if let Some(ms) = slow {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match fault {
        Some(429) => {
            let mut rsp = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"error": {"code": "429", "message": "Requests to the Custom Vision Training API have exceeded rate limit. Please retry after 1 second."}})),
            )
                .into_response();
            rsp.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&retry_after.to_string()).expect("digits"),
            );
            rsp
        }
        Some(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ErrorUnknown",
            "An internal error occurred (injected by the stand-in)",
        ),
        None => next.run(req).await,
    }
}

fn export_call(uri: &axum::http::Uri, outcome: &str) -> ExportCall {
    let segs: Vec<&str> = uri.path().split('/').collect();
    let id = |name: &str| {
        segs.iter()
            .position(|s| *s == name)
            .and_then(|i| segs.get(i + 1))
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_default()
    };
    let q: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    ExportCall {
        project_id: id("projects"),
        iteration_id: id("iterations"),
        platform: q.get("platform").cloned().unwrap_or_default(),
        flavor: q.get("flavor").cloned(),
        outcome: outcome.into(),
    }
}

/// xorshift64*: reproducible faults for a given seed.
fn next_f64(state: &mut u64) -> f64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

fn now_string() -> String {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn parse_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "BadRequestInvalidIds",
            format!("{s} is not a valid id"),
        )
    })
}

async fn get_domains() -> Json<Value> {
    Json(Value::Array(
        DOMAINS
            .iter()
            .map(|(id, name, exportable)| {
                json!({"id": id, "name": name, "type": "Classification", "exportable": exportable, "enabled": true})
            })
            .collect(),
    ))
}

/// The last path segment of a queue or container URL: its name in the stand-in's account.
fn resource_name(uri: &str) -> Option<String> {
    let url = url::Url::parse(uri).ok()?;
    url.path_segments()?
        .rfind(|s| !s.is_empty())
        .map(str::to_owned)
}

async fn create_project(State(s): State<S>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(name) = q.get("name").filter(|n| !n.trim().is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestRequiredParamIsNull",
            "name is required",
        );
    };
    let domain = q
        .get("domainId")
        .cloned()
        .unwrap_or_else(|| DOMAINS[0].0.to_owned());
    let Some(domain_id) = Uuid::parse_str(&domain)
        .ok()
        .filter(|d| DOMAINS.iter().any(|(id, _, _)| *id == d.to_string()))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestProjectUnknownDomain",
            "Unknown domain",
        );
    };
    if let Some(c) = q.get("classificationType")
        && !matches!(c.as_str(), "Multiclass" | "Multilabel")
    {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestProjectUnknownClassification",
            "Unknown classification type",
        );
    }
    let id = Uuid::new_v4();
    let now = now_string();
    let project = Project {
        id,
        name: name.clone(),
        description: q.get("description").cloned().unwrap_or_default(),
        settings: ProjectSettings {
            domain_id: Some(domain_id),
            classification_type: q.get("classificationType").cloned(),
            target_export_platforms: None,
        },
        created: Some(now.clone()),
        last_modified: Some(now),
        status: Some("Succeeded".into()),
    };
    let queue = q.get("notificationQueueUri").and_then(|u| resource_name(u));
    let container_url = q
        .get("exportModelContainerUri")
        .map(|u| u.trim_end_matches('/').to_owned());
    let container = container_url.as_deref().and_then(resource_name);
    s.state.lock().expect("state").projects.insert(
        id,
        ProjectState {
            project: project.clone(),
            queue: queue.clone(),
            container: container.clone(),
            container_url,
            trained: 0,
            iterations: Vec::new(),
        },
    );
    integration_test(&s, id, queue, container);
    Json(project).into_response()
}

/// What the service does when an integration is set: a test blob briefly, and a ConnectionTest.
fn integration_test(s: &S, project: Uuid, queue: Option<String>, container: Option<String>) {
    let Some(storage) = s.config.storage.clone() else {
        return;
    };
    let base64 = s.config.base64_messages;
    tokio::spawn(async move {
        if let Some(container) = container
            && let Ok(service) = storage.blob_service()
        {
            let c = service.blob_container_client(&container);
            let _ = c.create(None).await;
            let blob = c.blob_client(&format!("CustomVision-TestPermission/{project}"));
            if blob
                .upload(
                    azure_core::http::RequestContent::from(b"test".to_vec()),
                    None,
                )
                .await
                .is_ok()
            {
                let _ = blob.delete(None).await;
            }
        }
        if let Some(queue) = queue {
            notify(
                &storage,
                &queue,
                &Notification::ConnectionTest {
                    project_id: project,
                },
                base64,
            )
            .await;
        }
    });
}

async fn notify(storage: &StorageClients, queue: &str, n: &Notification, base64: bool) {
    use base64::Engine as _;
    let Some(message) = n.to_message() else {
        return;
    };
    let mut text = message.to_string();
    if base64 {
        text = base64::engine::general_purpose::STANDARD.encode(text);
    }
    let Ok(q) = storage.queue(queue) else {
        tracing::warn!("stand-in has no queue client");
        return;
    };
    // Like the service, keep trying while storage is unavailable: a lost notification would
    // stall the chain for good.
    for attempt in 0..120u32 {
        match send_text(&q, &text).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "stand-in could not write a notification yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProjectUpdate {
    name: Option<String>,
    description: Option<String>,
    settings: Option<Value>,
}

async fn update_project(
    State(s): State<S>,
    Path(project): Path<String>,
    body: Option<Json<ProjectUpdate>>,
) -> Response {
    let id = match parse_id(&project) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let Some(Json(update)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestRequiredParamIsNull",
            "updatedProject is required",
        );
    };
    let (result, integration) = {
        let mut st = s.state.lock().expect("state");
        let Some(p) = st.projects.get_mut(&id) else {
            return error(
                StatusCode::NOT_FOUND,
                "NotFoundProject",
                "Project not found",
            );
        };
        if let Some(n) = update.name {
            p.project.name = n;
        }
        if let Some(d) = update.description {
            p.project.description = d;
        }
        let mut integration = None;
        if let Some(settings) = update.settings {
            let text = |k: &str| {
                settings
                    .as_object()
                    .and_then(|m| m.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)))
                    .and_then(|(_, v)| v.as_str())
                    .map(str::to_owned)
            };
            if let Some(d) = text("domainId").and_then(|d| Uuid::parse_str(&d).ok()) {
                p.project.settings.domain_id = Some(d);
            }
            let queue = text("notificationQueueUri").and_then(|u| resource_name(&u));
            let container_url = text("exportModelContainerUri");
            if queue.is_some() || container_url.is_some() {
                if queue.is_some() {
                    p.queue = queue.clone();
                }
                if let Some(c) = container_url {
                    p.container = resource_name(&c);
                    p.container_url = Some(c.trim_end_matches('/').to_owned());
                }
                integration = Some((p.queue.clone(), p.container.clone()));
            }
        }
        p.project.last_modified = Some(now_string());
        (p.project.clone(), integration)
    };
    if let Some((queue, container)) = integration {
        integration_test(&s, id, queue, container);
    }
    Json(result).into_response()
}

async fn get_project(State(s): State<S>, Path(project): Path<String>) -> Response {
    let id = match parse_id(&project) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let st = s.state.lock().expect("state");
    match st.projects.get(&id) {
        Some(p) => Json(p.project.clone()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "NotFoundProject",
            "Project not found",
        ),
    }
}

/// Runs a closure on an iteration, or answers the service's not-found error.
fn with_iteration<T>(
    s: &S,
    project: &str,
    iteration: &str,
    f: impl FnOnce(&mut ProjectState, usize) -> T,
) -> Result<T, ApiError> {
    let pid = parse_id(project)?;
    let iid = parse_id(iteration)?;
    let mut st = s.state.lock().expect("state");
    let p = st.projects.get_mut(&pid).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "NotFoundProject",
            "Project not found".into(),
        )
    })?;
    let idx = p
        .iterations
        .iter()
        .position(|i| i.iteration.id == iid)
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                "NotFoundIteration",
                "Iteration not found".into(),
            )
        })?;
    Ok(f(p, idx))
}

async fn get_iterations(State(s): State<S>, Path(project): Path<String>) -> Response {
    let id = match parse_id(&project) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let st = s.state.lock().expect("state");
    match st.projects.get(&id) {
        Some(p) => Json(
            p.iterations
                .iter()
                .map(|i| i.iteration.clone())
                .collect::<Vec<_>>(),
        )
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "NotFoundProject",
            "Project not found",
        ),
    }
}

async fn get_iteration(State(s): State<S>, Path((p, i)): Path<(String, String)>) -> Response {
    match with_iteration(&s, &p, &i, |ps, idx| ps.iterations[idx].iteration.clone()) {
        Ok(it) => Json(it).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn get_performance(
    State(s): State<S>,
    Path((p, i)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    for name in ["threshold", "overlapThreshold"] {
        if let Some(v) = q.get(name)
            && v.parse::<f64>()
                .map(|x| !(0.0..=1.0).contains(&x))
                .unwrap_or(true)
        {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequestInvalid",
                &format!("{name} must be a number between 0 and 1"),
            );
        }
    }
    match with_iteration(&s, &p, &i, |ps, idx| ps.iterations[idx].performance.clone()) {
        Ok(Some(perf)) => Json(perf).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "NotFoundIterationPerformance",
            "Iteration performance not found",
        ),
        Err(r) => r.into_response(),
    }
}

async fn train_project(
    State(s): State<S>,
    Path(project): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let id = match parse_id(&project) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    if let Some(t) = q.get("trainingType")
        && !matches!(t.as_str(), "Regular" | "Advanced")
    {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestInvalid",
            "trainingType must be Regular or Advanced",
        );
    }
    let iteration = {
        let mut st = s.state.lock().expect("state");
        let Some(p) = st.projects.get_mut(&id) else {
            return error(
                StatusCode::NOT_FOUND,
                "NotFoundProject",
                "Project not found",
            );
        };
        if p.iterations
            .iter()
            .any(|i| i.iteration.status == "Training")
        {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequestTrainingAlreadyInProgress",
                "Training is already in progress",
            );
        }
        if p.iterations.len() >= MAX_ITERATIONS {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequestExceedIterationPerProjectLimit",
                &format!(
                    "The project has reached its limit of {MAX_ITERATIONS} iterations; delete one before training"
                ),
            );
        }
        p.trained += 1;
        let now = now_string();
        let it = Iteration {
            id: Uuid::new_v4(),
            name: format!("Iteration {}", p.trained),
            status: "Training".into(),
            created: Some(now.clone()),
            last_modified: Some(now),
            project_id: id,
            domain_id: p.project.settings.domain_id,
            classification_type: p.project.settings.classification_type.clone(),
            training_type: Some(q.get("trainingType").cloned().unwrap_or("Regular".into())),
            reserved_budget_in_hours: Some(0),
            exportable_to: EXPORTABLE_TO.iter().map(|s| (*s).to_owned()).collect(),
            publish_name: Some(String::new()),
            ..Default::default()
        };
        p.iterations.push(IterationState {
            iteration: it.clone(),
            performance: None,
            exports: Vec::new(),
        });
        it
    };
    let s2 = s.clone();
    let (pid, iid) = (id, iteration.id);
    tokio::spawn(async move {
        tokio::time::sleep(s2.config.train_delay).await;
        finish_training(&s2, pid, iid).await;
    });
    Json(iteration).into_response()
}

async fn finish_training(s: &S, project: Uuid, iteration: Uuid) {
    let (queue, status) = {
        let mut st = s.state.lock().expect("state");
        let fail = st.faults.fail_training;
        let a = next_f64(&mut st.rng);
        let b = next_f64(&mut st.rng);
        let Some(p) = st.projects.get_mut(&project) else {
            return;
        };
        let compact = p
            .project
            .settings
            .domain_id
            .is_some_and(|d| DOMAINS.iter().any(|(id, _, c)| *c && *id == d.to_string()));
        let queue = p.queue.clone();
        let Some(it) = p
            .iterations
            .iter_mut()
            .find(|i| i.iteration.id == iteration)
        else {
            return;
        };
        let now = now_string();
        it.iteration.last_modified = Some(now.clone());
        if fail {
            it.iteration.status = "Failed".into();
            (queue, TrainingStatus::Failed)
        } else {
            it.iteration.status = "Completed".into();
            it.iteration.trained_at = Some(now);
            it.iteration.training_time_in_minutes = Some(1);
            it.iteration.exportable = compact;
            let precision = 0.80 + 0.19 * a;
            let recall = 0.75 + 0.2 * b;
            it.performance = Some(IterationPerformance {
                per_tag_performance: vec![TagPerformance {
                    id: Some(Uuid::new_v4()),
                    name: Some("widget".into()),
                    precision: Some(precision),
                    recall: Some(recall),
                    average_precision: Some((precision + recall) / 2.0),
                }],
                precision: Some(precision),
                precision_std_deviation: Some(0.01),
                recall: Some(recall),
                recall_std_deviation: Some(0.02),
                average_precision: Some((precision + recall) / 2.0),
            });
            (queue, TrainingStatus::Completed)
        }
    };
    if let (Some(storage), Some(queue)) = (&s.config.storage, queue) {
        let n = Notification::Training {
            project_id: project,
            iteration_id: iteration,
            status,
        };
        notify(storage, &queue, &n, s.config.base64_messages).await;
    }
}

async fn get_exports(State(s): State<S>, Path((p, i)): Path<(String, String)>) -> Response {
    match with_iteration(&s, &p, &i, |ps, idx| ps.iterations[idx].exports.clone()) {
        Ok(e) => Json(e).into_response(),
        Err(r) => r.into_response(),
    }
}

/// The platform and flavor enums of the spec, plus the values Microsoft's own samples send.
fn check_platform(
    platform: &str,
    flavor: Option<&str>,
) -> Result<(String, Option<String>), String> {
    let Some((canonical, flavors)) = cvchain_core::chain::PLATFORMS
        .iter()
        .find(|(p, _)| p.eq_ignore_ascii_case(platform))
    else {
        return Err(format!("Unsupported export platform {platform}"));
    };
    let flavor = match flavor {
        None | Some("") => None,
        Some(f) => Some(
            flavors
                .iter()
                .find(|k| k.eq_ignore_ascii_case(f))
                .map(|k| (*k).to_owned())
                .ok_or_else(|| format!("Unsupported flavor {f} for platform {canonical}"))?,
        ),
    };
    Ok(((*canonical).to_owned(), flavor))
}

async fn export_iteration(
    State(s): State<S>,
    uri: axum::http::Uri,
    Path((p, i)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let record = |outcome: &str| {
        s.state
            .lock()
            .expect("state")
            .calls
            .exports
            .push(export_call(&uri, outcome));
    };
    let Some(platform) = q.get("platform").filter(|p| !p.is_empty()) else {
        record("rejected");
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestRequiredParamIsNull",
            "platform is required",
        );
    };
    let (platform, flavor) = match check_platform(platform, q.get("flavor").map(String::as_str)) {
        Ok(v) => v,
        Err(msg) => {
            record("rejected");
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequestExportValidationFailed",
                &msg,
            );
        }
    };
    type Refusal = (StatusCode, &'static str, String);
    let result = with_iteration(&s, &p, &i, |ps, idx| -> Result<_, Refusal> {
        let it = &mut ps.iterations[idx];
        match it.iteration.status.as_str() {
            "Completed" => {}
            "Training" => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "BadRequestExportWhileTraining",
                    "Cannot export while training".into(),
                ));
            }
            _ => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "BadRequestIterationIsNotTrained",
                    "Iteration is not trained".into(),
                ));
            }
        }
        if !it.iteration.can_export_to(&platform) {
            return Err((
                StatusCode::BAD_REQUEST,
                "BadRequestProjectUnsupportedExportPlatform",
                format!("The iteration cannot be exported to {platform}"),
            ));
        }
        let same = |e: &Export| {
            e.platform.eq_ignore_ascii_case(&platform)
                && e.flavor.as_deref().map(str::to_ascii_lowercase)
                    == flavor.as_deref().map(str::to_ascii_lowercase)
        };
        if it.exports.iter().any(same) {
            // The service says this even after the first export finished.
            return Err((
                StatusCode::BAD_REQUEST,
                codes::EXPORT_ALREADY_IN_PROGRESS,
                format!("{} is already queued for export", it.iteration.id),
            ));
        }
        let export = Export {
            platform: platform.clone(),
            status: "Exporting".into(),
            download_uri: Some(String::new()),
            flavor: flavor.clone(),
            newer_version_available: false,
        };
        it.exports.push(export.clone());
        Ok((export, ps.project.id, it.iteration.id))
    });
    match result {
        Ok(Ok((export, pid, iid))) => {
            record("accepted");
            let s2 = s.clone();
            let (platform, flavor) = (export.platform.clone(), export.flavor.clone());
            tokio::spawn(async move {
                tokio::time::sleep(s2.config.export_delay).await;
                finish_export(&s2, pid, iid, platform, flavor).await;
            });
            Json(export).into_response()
        }
        Ok(Err((status, code, message))) => {
            record(if code == codes::EXPORT_ALREADY_IN_PROGRESS {
                "alreadyInProgress"
            } else {
                "rejected"
            });
            error(status, code, &message)
        }
        Err(rsp) => {
            record("rejected");
            rsp.into_response()
        }
    }
}

async fn finish_export(
    s: &S,
    project: Uuid,
    iteration: Uuid,
    platform: String,
    flavor: Option<String>,
) {
    let (queue, container, container_url, fail) = {
        let st = s.state.lock().expect("state");
        let fail = st
            .faults
            .fail_export_platforms
            .iter()
            .any(|p| p.eq_ignore_ascii_case(&platform));
        let Some(p) = st.projects.get(&project) else {
            return;
        };
        (
            p.queue.clone(),
            p.container.clone(),
            p.container_url.clone(),
            fail,
        )
    };
    let blob_name = format!("{project} - {iteration}.{platform}");
    let mut model_uri = None;
    let mut download_uri = String::new();
    if !fail && let Some(storage) = &s.config.storage {
        let body = model_bytes(
            project,
            iteration,
            &platform,
            flavor.as_deref(),
            s.config.model_size,
        );
        // The service's own copy, reachable through a SAS: GetExports' downloadUri.
        let internal_name = format!(
            "{project}/{iteration}/{}.zip",
            target_key(&platform, flavor.as_deref())
        );
        if let Some(url) = upload(storage, INTERNAL_CONTAINER, &internal_name, &body).await {
            download_uri = with_sas(storage, &url, INTERNAL_CONTAINER, &internal_name);
        }
        // The backup in the user's container, named as the documentation says.
        model_uri = match (&container, &container_url) {
            (Some(c), Some(curl)) => upload(storage, c, &blob_name, &body).await.map(|_| {
                let enc: String =
                    percent_encoding::utf8_percent_encode(&blob_name, URL_PATH_ESCAPE).to_string();
                format!("{curl}/{enc}")
            }),
            _ => Some(download_uri.clone()),
        };
    }
    {
        let mut st = s.state.lock().expect("state");
        if let Some(e) = st
            .projects
            .get_mut(&project)
            .and_then(|p| {
                p.iterations
                    .iter_mut()
                    .find(|i| i.iteration.id == iteration)
            })
            .and_then(|i| {
                i.exports
                    .iter_mut()
                    .find(|e| e.platform == platform && e.flavor.as_deref() == flavor.as_deref())
            })
        {
            e.status = if fail { "Failed" } else { "Done" }.into();
            e.download_uri = Some(download_uri);
        }
    }
    if let (Some(storage), Some(queue)) = (&s.config.storage, queue) {
        let n = Notification::Export {
            project_id: project,
            iteration_id: iteration,
            status: if fail {
                ExportStatus::Failed
            } else {
                ExportStatus::Completed
            },
            model_uri: if fail { None } else { model_uri },
        };
        notify(storage, &queue, &n, s.config.base64_messages).await;
    }
}

fn target_key(platform: &str, flavor: Option<&str>) -> String {
    match flavor {
        Some(f) => format!("{platform}-{f}"),
        None => platform.to_owned(),
    }
}

/// Deterministic model content, so a copy can be compared with its source.
pub fn model_bytes(
    project: Uuid,
    iteration: Uuid,
    platform: &str,
    flavor: Option<&str>,
    size: usize,
) -> Vec<u8> {
    let line = format!(
        "cvchain stand-in model project={project} iteration={iteration} platform={platform} flavor={}\n",
        flavor.unwrap_or("-")
    );
    line.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(size.max(line.len()))
        .collect()
}

async fn upload(
    storage: &StorageClients,
    container: &str,
    name: &str,
    body: &[u8],
) -> Option<String> {
    let service = storage.blob_service().ok()?;
    let c = service.blob_container_client(container);
    let blob = c.blob_client(name);
    // Keep trying while storage is unavailable, as the service would.
    for attempt in 0..120u32 {
        let _ = c.create(None).await;
        match blob
            .upload(azure_core::http::RequestContent::from(body.to_vec()), None)
            .await
        {
            Ok(_) => return Some(blob.url().to_string()),
            Err(e) => {
                tracing::warn!(error = %cvchain_core::redact::redact(&e.to_string()), attempt, "stand-in could not write a model blob yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    None
}

fn with_sas(storage: &StorageClients, url: &str, container: &str, name: &str) -> String {
    match &storage.settings().auth {
        StorageAuth::SharedKey { account, key } => {
            let expiry = (OffsetDateTime::now_utc() + time::Duration::days(1))
                .replace_nanosecond(0)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            match blob_read_sas(account, key, container, name, &expiry) {
                Ok(sas) => format!("{url}?{sas}"),
                Err(_) => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

async fn publish_iteration(
    State(s): State<S>,
    Path((p, i)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(name) = q.get("publishName").filter(|n| !n.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestRequiredParamIsNull",
            "publishName is required",
        );
    };
    if q.get("predictionId").is_none_or(|v| v.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestRequiredParamIsNull",
            "predictionId is required",
        );
    }
    if name.len() > 256 || name.chars().any(|c| c.is_whitespace() || c == '/') {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequestInvalidPublishName",
            "Invalid publish name",
        );
    }
    let overwrite = match q.get("overwrite").map(|v| v.to_ascii_lowercase()) {
        None => false,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST_INVALID,
                "overwrite must be true or false",
            );
        }
    };
    let prediction = q.get("predictionId").cloned().unwrap_or_default();
    let result = with_iteration(&s, &p, &i, |ps, idx| {
        let it = &ps.iterations[idx].iteration;
        if it.status != "Completed" {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                codes::ITERATION_NOT_TRAINED,
                "Iteration is not trained".into(),
            ));
        }
        if it.is_published() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                codes::ITERATION_IS_PUBLISHED,
                "Iteration is already published".into(),
            ));
        }
        // A publish name serves one iteration of the project on a prediction resource:
        // another iteration holding it is replaced only with `overwrite=true`.
        let holder = ps.iterations.iter().position(|o| {
            o.iteration.publish_name.as_deref() == Some(name.as_str())
                && o.iteration.original_publish_resource_id.as_deref() == Some(prediction.as_str())
        });
        if let Some(h) = holder {
            if !overwrite {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "BadRequestInvalidPublishName",
                    format!("The publish name {name} is already in use by another iteration"),
                ));
            }
            let other = &mut ps.iterations[h].iteration;
            other.publish_name = Some(String::new());
            other.original_publish_resource_id = None;
        }
        let it = &mut ps.iterations[idx].iteration;
        it.publish_name = Some(name.clone());
        it.original_publish_resource_id = Some(prediction.clone());
        Ok(())
    });
    match result {
        Ok(Ok(())) => Json(true).into_response(),
        Ok(Err(r)) | Err(r) => r.into_response(),
    }
}

async fn set_faults(State(s): State<S>, Json(f): Json<Faults>) -> Json<Faults> {
    s.state.lock().expect("state").faults = f.clone();
    Json(f)
}

async fn get_faults(State(s): State<S>) -> Json<Faults> {
    Json(s.state.lock().expect("state").faults.clone())
}

async fn get_calls(State(s): State<S>, _h: HeaderMap) -> Json<CallLog> {
    Json(s.state.lock().expect("state").calls.clone())
}

async fn unpublish_iteration(State(s): State<S>, Path((p, i)): Path<(String, String)>) -> Response {
    let result = with_iteration(&s, &p, &i, |ps, idx| {
        let it = &mut ps.iterations[idx].iteration;
        if !it.is_published() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "BadRequestIterationNotPublished",
                "Iteration is not published".into(),
            ));
        }
        it.publish_name = Some(String::new());
        it.original_publish_resource_id = None;
        Ok(())
    });
    match result {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(r)) | Err(r) => r.into_response(),
    }
}

/// DeleteIteration: a published iteration must be unpublished first, as the service requires;
/// one still training cannot be deleted either. Its exports go with it.
async fn delete_iteration(State(s): State<S>, Path((p, i)): Path<(String, String)>) -> Response {
    let result = with_iteration(&s, &p, &i, |ps, idx| {
        let it = &ps.iterations[idx].iteration;
        if it.is_published() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                codes::ITERATION_IS_PUBLISHED,
                "The iteration is published; unpublish it before deleting it".into(),
            ));
        }
        if it.status == "Training" {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "BadRequestIterationValidationFailed",
                "The iteration is still training".into(),
            ));
        }
        ps.iterations.remove(idx);
        Ok(())
    });
    match result {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(r)) | Err(r) => r.into_response(),
    }
}
