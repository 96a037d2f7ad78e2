//! The Training API client on `azure_core`'s HTTP pipeline: key or Microsoft Entra ID auth,
//! typed errors from both error body shapes, retries with backoff that honours `Retry-After`,
//! per-attempt timeouts, and a process-wide rate limit that adapts to the service's 429s.

use super::{TrainingApi, limiter::RateLimiter};
use azure_core::{
    credentials::{Secret, TokenCredential},
    http::{
        ClientOptions, Context, Method, Pipeline, PipelineSendOptions, RawResponse, Request,
        RetryOptions, Url,
        headers::HeaderName,
        policies::{Policy, PolicyResult, auth::BearerTokenAuthorizationPolicy},
    },
};
use cvchain_core::customvision::{CvError, Export, Iteration, IterationPerformance, Project};
use cvchain_core::ratelimit::Outcome;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::{sync::Arc, time::Duration};
use uuid::Uuid;

pub const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
const API_PATH: &str = "customvision/v3.3/training/";

/// How the client authenticates.
#[derive(Clone)]
pub enum CvAuth {
    /// `Training-Key` header.
    Key(Secret),
    /// `Authorization: Bearer` from a token credential.
    Token(Arc<dyn TokenCredential>),
}

impl std::fmt::Debug for CvAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CvAuth::Key(_) => f.write_str("Key(REDACTED)"),
            CvAuth::Token(_) => f.write_str("Token"),
        }
    }
}

/// Refusals for rate (429) a call may get before they count against its attempts.
pub const FREE_REFUSALS: u32 = 4;

/// Retry and timeout behaviour.
#[derive(Debug, Clone, Copy)]
pub struct CvRetry {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Per attempt.
    pub timeout: Duration,
}

impl Default for CvRetry {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(20),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Adds the `Training-Key` header. Its Debug output never shows the key.
#[derive(Clone)]
struct TrainingKeyPolicy(Secret);

impl std::fmt::Debug for TrainingKeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrainingKeyPolicy")
    }
}

#[async_trait::async_trait]
impl Policy for TrainingKeyPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        request.insert_header("training-key", self.0.secret().to_owned());
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// The Training API client. Clone it freely: clones share the rate limit.
#[derive(Clone)]
pub struct TrainingClient {
    base: Url,
    pipeline: Pipeline,
    limiter: Arc<RateLimiter>,
    retry: CvRetry,
    /// The lazily built HTTP client, when this client made its own transport.
    http: Option<Arc<crate::transport::Lazy>>,
}

impl std::fmt::Debug for TrainingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingClient")
            .field("base", &self.base.as_str())
            .field("retry", &self.retry)
            .finish()
    }
}

/// `https://x.cognitiveservices.azure.com` → `…/customvision/v3.3/training/`; a URL that already
/// ends with the API path is kept.
pub fn api_base(endpoint: &Url) -> Url {
    let mut s = endpoint.as_str().trim_end_matches('/').to_owned();
    if !s
        .to_ascii_lowercase()
        .ends_with("/customvision/v3.3/training")
    {
        s.push('/');
        s.push_str(API_PATH.trim_end_matches('/'));
    }
    s.push('/');
    Url::parse(&s).unwrap_or_else(|_| endpoint.clone())
}

impl TrainingClient {
    pub fn new(endpoint: &Url, auth: CvAuth, max_rps: u32, retry: CvRetry) -> Self {
        Self::with_transport(endpoint, auth, max_rps, retry, None)
    }

    /// As `new`, over a given HTTP transport (a client that trusts a test CA, a proxy…).
    pub fn with_transport(
        endpoint: &Url,
        auth: CvAuth,
        max_rps: u32,
        retry: CvRetry,
        transport: Option<azure_core::http::Transport>,
    ) -> Self {
        let mut per_try: Vec<Arc<dyn Policy>> = vec![crate::telemetry::ClientSpanPolicy::shared(
            crate::telemetry::Service::CustomVision,
        )];
        match auth {
            CvAuth::Key(key) => per_try.push(Arc::new(TrainingKeyPolicy(key))),
            CvAuth::Token(cred) => per_try.push(Arc::new(BearerTokenAuthorizationPolicy::new(
                cred,
                [COGNITIVE_SERVICES_SCOPE],
            ))),
        }
        let (transport, http) = match transport {
            Some(t) => (t, None),
            None => {
                let (t, lazy) = crate::transport::lazy_with_handle();
                (t, Some(lazy))
            }
        };
        let options = ClientOptions {
            // Retries are ours: they honour Retry-After, count against the rate limit and stop
            // at the per-call budget.
            retry: RetryOptions::none(),
            transport: Some(transport),
            ..Default::default()
        };
        let pipeline = Pipeline::new(
            Some(crate::USER_AGENT_NAME),
            Some(env!("CARGO_PKG_VERSION")),
            options,
            Vec::new(),
            per_try,
            None,
        );
        Self {
            base: api_base(endpoint),
            pipeline,
            limiter: Arc::new(RateLimiter::per_second(max_rps)),
            http,
            retry,
        }
    }

    /// The calls per second this client (and its clones) allows itself since the service last
    /// refused one for rate, or `None` while only `CVCHAIN_CV_MAX_RPS` applies.
    pub fn adaptive_rate(&self) -> Option<f64> {
        self.limiter.rate()
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Url {
        let mut url = self.base.join(path).unwrap_or_else(|_| self.base.clone());
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        url
    }

    async fn call<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        method: Method,
        url: Url,
    ) -> Result<T, CvError> {
        let rsp = self.call_raw(operation, method, url).await?;
        // Optional fields the service sends in a shape cvchain cannot read are taken as absent
        // and noted; only an unusable answer is an error.
        cvchain_core::customvision::decode_lenient(operation, rsp.body().as_ref())
            .map_err(|detail| CvError::Decode { operation, detail })
    }

    /// A call whose answer has no body to read (204 No Content).
    async fn call_no_content(
        &self,
        operation: &'static str,
        method: Method,
        url: Url,
    ) -> Result<(), CvError> {
        self.call_raw(operation, method, url).await.map(|_| ())
    }

    async fn call_raw(
        &self,
        operation: &'static str,
        method: Method,
        url: Url,
    ) -> Result<RawResponse, CvError> {
        let mut attempt = 1;
        let mut refusals = 0;
        loop {
            let (result, retry_after) = self
                .attempt(operation, method, url.clone(), attempt - 1)
                .await;
            let err = match result {
                Ok(rsp) => return Ok(rsp),
                Err(e) => e,
            };
            let retryable = match &err {
                CvError::Service { status, .. } => matches!(*status, 408 | 429) || *status >= 500,
                CvError::Unreachable { .. } | CvError::Timeout { .. } => true,
                _ => false,
            };
            // A refusal for rate was not processed and says when to come back: with instances
            // sharing the resource it is the normal way to learn the share, so it takes an
            // attempt only after the first few.
            let refused = matches!(&err, CvError::Service { status: 429, .. });
            if refused {
                refusals += 1;
            }
            let counted = !refused || refusals > FREE_REFUSALS;
            if !retryable || (counted && attempt >= self.retry.max_attempts) {
                return Err(err);
            }
            if counted {
                attempt += 1;
            }
            let backoff = self.retry.base_delay * 2u32.saturating_pow(attempt.saturating_sub(2));
            let delay = retry_after.unwrap_or(backoff).min(self.retry.max_delay);
            tracing::warn!(operation, attempt, refusals, ?delay, error = %err, "Custom Vision call failed; retrying");
            tokio::time::sleep(delay + jitter(delay)).await;
        }
    }

    /// Builds `http` (the lazy client behind the given transport) before taking a rate-limit
    /// slot, so the first call is not sent late in its slot.
    pub fn warming(mut self, http: Arc<crate::transport::Lazy>) -> Self {
        self.http = Some(http);
        self
    }

    /// One try: rate-limited, timed out, classified.
    async fn attempt(
        &self,
        operation: &'static str,
        method: Method,
        url: Url,
        resend: u32,
    ) -> (Result<RawResponse, CvError>, Option<Duration>) {
        if let Some(http) = &self.http {
            http.warm();
        }
        let started = self.limiter.acquire().await;
        let mut req = Request::new(url, method);
        req.insert_header("accept", "application/json");
        if method == Method::Post {
            req.set_body(Vec::new());
        }
        let ctx = Context::new().with_value(crate::telemetry::Attempt {
            number: resend,
            operation,
        });
        let send = self.pipeline.send(
            &ctx,
            &mut req,
            Some(PipelineSendOptions {
                skip_checks: true,
                ..Default::default()
            }),
        );
        let rsp = match tokio::time::timeout(self.retry.timeout, send).await {
            Err(_) => {
                crate::telemetry::record_custom_vision(operation, None, Some("timeout"));
                return (
                    Err(CvError::Timeout {
                        operation,
                        seconds: self.retry.timeout.as_secs(),
                    }),
                    None,
                );
            }
            Ok(Err(e)) => {
                crate::telemetry::record_custom_vision(operation, None, Some("connection"));
                return (Err(transport_error(operation, &e)), None);
            }
            Ok(Ok(rsp)) => rsp,
        };
        let status = u16::from(rsp.status());
        crate::telemetry::record_custom_vision(operation, Some(status), None);
        let retry_after = retry_after(&rsp);
        // Only answers teach the limiter: a timeout or a broken connection says nothing of rate.
        self.limiter.record(
            started,
            if status == 429 {
                Outcome::Refused { retry_after }
            } else {
                Outcome::Answered
            },
        );
        if (200..300).contains(&status) {
            return (Ok(rsp), None);
        }
        (Err(service_error(operation, status, &rsp)), retry_after)
    }
}

fn transport_error(operation: &'static str, e: &azure_core::Error) -> CvError {
    use azure_core::error::ErrorKind;
    let detail = cvchain_core::redact::redact(&e.to_string());
    match e.kind() {
        ErrorKind::Credential => CvError::Credential(detail),
        _ => CvError::Unreachable { operation, detail },
    }
}

/// Small jitter so many invocations retrying together do not stay in step.
fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    delay / 10 * (nanos % 100) / 100
}

/// `Retry-After` as seconds or an HTTP date; `retry-after-ms` too.
fn retry_after(rsp: &RawResponse) -> Option<Duration> {
    let get = |name: &'static str| {
        rsp.headers()
            .get_optional_string(&HeaderName::from_static(name))
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_millis(ms));
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.trim().parse::<f64>() {
        return (secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)));
    }
    let at = azure_core::time::parse_rfc7231(v.trim()).ok()?;
    let now = azure_core::time::OffsetDateTime::now_utc();
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

/// Both error shapes: `{"code","message"}` and the gateway's `{"error":{"code","message"}}`.
fn service_error(operation: &'static str, status: u16, rsp: &RawResponse) -> CvError {
    let body: Option<Value> = serde_json::from_slice(rsp.body().as_ref()).ok();
    let inner = body
        .as_ref()
        .map(|b| b.get("error").filter(|e| e.is_object()).unwrap_or(b));
    let field = |name: &str| {
        inner
            .and_then(|e| e.get(name))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default()
    };
    let code = field("code");
    let message = field("message");
    CvError::Service {
        operation,
        status,
        code: if code.is_empty() {
            status.to_string()
        } else {
            code
        },
        message: cvchain_core::redact::redact(if message.is_empty() {
            "(no message)"
        } else {
            &message
        }),
    }
}

#[async_trait::async_trait]
impl TrainingApi for TrainingClient {
    async fn get_project(&self, project: Uuid) -> Result<Project, CvError> {
        let url = self.url(&format!("projects/{project}"), &[]);
        self.call("GetProject", Method::Get, url).await
    }

    async fn get_iteration(&self, project: Uuid, iteration: Uuid) -> Result<Iteration, CvError> {
        let url = self.url(&format!("projects/{project}/iterations/{iteration}"), &[]);
        self.call("GetIteration", Method::Get, url).await
    }

    async fn get_iteration_performance(
        &self,
        project: Uuid,
        iteration: Uuid,
    ) -> Result<IterationPerformance, CvError> {
        let url = self.url(
            &format!("projects/{project}/iterations/{iteration}/performance"),
            &[],
        );
        self.call("GetIterationPerformance", Method::Get, url).await
    }

    async fn get_exports(&self, project: Uuid, iteration: Uuid) -> Result<Vec<Export>, CvError> {
        let url = self.url(
            &format!("projects/{project}/iterations/{iteration}/export"),
            &[],
        );
        let exports: Option<Vec<Export>> = self.call("GetExports", Method::Get, url).await?;
        Ok(exports.unwrap_or_default())
    }

    async fn export_iteration(
        &self,
        project: Uuid,
        iteration: Uuid,
        platform: &str,
        flavor: Option<&str>,
    ) -> Result<Export, CvError> {
        let mut query = vec![("platform", platform)];
        if let Some(f) = flavor {
            query.push(("flavor", f));
        }
        let url = self.url(
            &format!("projects/{project}/iterations/{iteration}/export"),
            &query,
        );
        self.call("ExportIteration", Method::Post, url).await
    }

    async fn publish_iteration(
        &self,
        project: Uuid,
        iteration: Uuid,
        publish_name: &str,
        prediction_id: &str,
    ) -> Result<bool, CvError> {
        let url = self.url(
            &format!("projects/{project}/iterations/{iteration}/publish"),
            &[
                ("publishName", publish_name),
                ("predictionId", prediction_id),
            ],
        );
        self.call("PublishIteration", Method::Post, url).await
    }

    async fn get_iterations(&self, project: Uuid) -> Result<Vec<Iteration>, CvError> {
        let url = self.url(&format!("projects/{project}/iterations"), &[]);
        let iterations: Option<Vec<Iteration>> =
            self.call("GetIterations", Method::Get, url).await?;
        Ok(iterations.unwrap_or_default())
    }

    async fn unpublish_iteration(&self, project: Uuid, iteration: Uuid) -> Result<(), CvError> {
        let url = self.url(
            &format!("projects/{project}/iterations/{iteration}/publish"),
            &[],
        );
        self.call_no_content("UnpublishIteration", Method::Delete, url)
            .await
    }

    async fn delete_iteration(&self, project: Uuid, iteration: Uuid) -> Result<(), CvError> {
        let url = self.url(&format!("projects/{project}/iterations/{iteration}"), &[]);
        self.call_no_content("DeleteIteration", Method::Delete, url)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_path_is_added_once() {
        for (endpoint, want) in [
            (
                "https://x.cognitiveservices.azure.com",
                "https://x.cognitiveservices.azure.com/customvision/v3.3/training/",
            ),
            (
                "https://x.cognitiveservices.azure.com/",
                "https://x.cognitiveservices.azure.com/customvision/v3.3/training/",
            ),
            (
                "http://127.0.0.1:9000/customvision/v3.3/Training/",
                "http://127.0.0.1:9000/customvision/v3.3/Training/",
            ),
        ] {
            assert_eq!(api_base(&Url::parse(endpoint).unwrap()).as_str(), want);
        }
    }

    #[test]
    fn both_error_shapes_are_read() {
        use azure_core::http::{StatusCode, headers::Headers};
        let rsp = |body: &str| {
            RawResponse::from_bytes(
                StatusCode::BadRequest,
                Headers::new(),
                body.as_bytes().to_vec(),
            )
        };
        let e = service_error(
            "ExportIteration",
            400,
            &rsp(
                r#"{"code":"BadRequestExportAlreadyInProgress","message":"x is already queued for export"}"#,
            ),
        );
        assert_eq!(e.code(), Some("BadRequestExportAlreadyInProgress"));
        let e = service_error(
            "GetProject",
            401,
            &rsp(
                r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key."}}"#,
            ),
        );
        assert_eq!(e.code(), Some("401"));
        assert!(e.to_string().contains("Access denied"));
        let e = service_error("GetProject", 502, &rsp("<html>bad gateway</html>"));
        assert_eq!(e.code(), Some("502"));
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let auth = CvAuth::Key(Secret::new("super-secret-key"));
        assert!(!format!("{auth:?}").contains("super-secret-key"));
        let policy = TrainingKeyPolicy(Secret::new("super-secret-key"));
        assert!(!format!("{policy:?}").contains("super-secret-key"));
    }
}
