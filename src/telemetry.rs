//! Logging and telemetry.
//!
//! Logging: `tracing` to stderr (the host turns stderr lines into its logs), text or JSON,
//! filtered by `RUST_LOG` (default `info`), as before telemetry existed.
//!
//! Telemetry (docs/observability.md): traces and metrics through OpenTelemetry, exported over
//! OTLP/HTTP when an `OTEL_EXPORTER_OTLP_*ENDPOINT` is set, and to Application Insights when
//! `APPLICATIONINSIGHTS_CONNECTION_STRING` is (with a Microsoft Entra ID token when
//! `APPLICATIONINSIGHTS_AUTHENTICATION_STRING` says `Authorization=AAD`). Nothing set: no layer,
//! no exporter, no thread; the spans meant for OpenTelemetry (`tracing` target
//! [`SPAN_TARGET`]) are disabled where they are declared and the client policies pass requests
//! straight on.
//!
//! Export never blocks an invocation: a finished span is handed to a bounded queue (the SDK's
//! batch processor, `OTEL_BSP_*`) and dropped, counted in `cvchain.telemetry.dropped`, when the
//! queue is full or an export fails; metrics go out every `OTEL_METRIC_EXPORT_INTERVAL`. The
//! exporters' requests run on the process's runtime through the reqwest client `azure_core`
//! already builds, with a timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s). [`Telemetry::shutdown`]
//! flushes both, within a bound, on SIGTERM.
//!
//! Which trace an invocation joins, the `traceparent` format and what an attribute may say are
//! the core's (`cvchain_core::trace`).

use crate::settings::LogFormat;
use bytes::Bytes;
pub use cvchain_azure::telemetry::SPAN_TARGET;
use cvchain_core::message::Incoming;
use cvchain_core::trace::{self as core_trace, TraceParent, metric};
use opentelemetry::{
    Context as OtelContext, KeyValue,
    metrics::{Counter, Gauge, Histogram, MeterProvider as _},
    trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceState, TracerProvider as _},
};
use opentelemetry_otlp::WithHttpConfig as _;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    metrics::{PeriodicReader, SdkMeterProvider},
    trace::{
        BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler, SamplingDecision,
        SamplingResult, SdkTracerProvider, ShouldSample, SpanData, SpanExporter, SpanProcessor,
    },
};
use std::cell::Cell;
use std::io::IsTerminal;
use std::sync::{
    Arc, Mutex, OnceLock,
    atomic::{AtomicUsize, Ordering},
};
use std::time::{Duration, Instant};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::FilterExt as _, fmt, layer::SubscriberExt as _,
};

/// Where telemetry goes, read from the standard variables.
#[derive(Clone, Default)]
pub struct TelemetrySettings {
    /// An OTLP endpoint is configured for traces (`OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, and `OTEL_TRACES_EXPORTER` is not `none`).
    pub otlp_traces: bool,
    /// The same for metrics.
    pub otlp_metrics: bool,
    /// `APPLICATIONINSIGHTS_CONNECTION_STRING` (never shown), and whether to authenticate with
    /// Microsoft Entra ID (`APPLICATIONINSIGHTS_AUTHENTICATION_STRING`).
    pub app_insights: Option<AppInsights>,
    /// Per export request (`OTEL_EXPORTER_OTLP_TIMEOUT`, milliseconds; 10 s).
    pub timeout: Duration,
    /// What was set but could not be used, each naming its setting (logged at start).
    pub problems: Vec<String>,
    /// `cvchain dev --trace`: the spans are kept in memory and printed as a tree.
    pub tree: bool,
}

impl std::fmt::Debug for TelemetrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetrySettings")
            .field("otlp_traces", &self.otlp_traces)
            .field("otlp_metrics", &self.otlp_metrics)
            .field("app_insights", &self.app_insights.is_some())
            .field("tree", &self.tree)
            .finish()
    }
}

/// Application Insights: the connection string and how to authenticate.
#[derive(Clone)]
pub struct AppInsights {
    connection_string: String,
    /// `Some`: a Microsoft Entra ID token, from the managed identity (the client id of a
    /// user-assigned one when given).
    pub entra: Option<Option<String>>,
}

pub const APPINSIGHTS_SETTING: &str = "APPLICATIONINSIGHTS_CONNECTION_STRING";
pub const APPINSIGHTS_AUTH_SETTING: &str = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING";
/// The scope of an Application Insights ingestion token.
pub const MONITOR_SCOPE: &str = "https://monitor.azure.com//.default";

impl TelemetrySettings {
    /// Reads the settings through `lookup` (empty values count as unset).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| {
            lookup(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut s = TelemetrySettings {
            timeout: Duration::from_secs(10),
            ..Default::default()
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return s;
        }
        let none = |k: &str| get(k).is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let mut endpoint = |signal: &str| -> bool {
            let specific = format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT");
            for name in [specific.as_str(), "OTEL_EXPORTER_OTLP_ENDPOINT"] {
                if let Some(v) = get(name) {
                    return match url::Url::parse(&v) {
                        Ok(u) if matches!(u.scheme(), "http" | "https") => true,
                        _ => {
                            let problem = format!(
                                "{name} is not an http(s) URL; no OTLP export of {}",
                                signal.to_ascii_lowercase()
                            );
                            if !s.problems.contains(&problem) {
                                s.problems.push(problem);
                            }
                            false
                        }
                    };
                }
            }
            false
        };
        let traces = endpoint("TRACES");
        let metrics = endpoint("METRICS");
        s.otlp_traces = traces && !none("OTEL_TRACES_EXPORTER");
        s.otlp_metrics = metrics && !none("OTEL_METRICS_EXPORTER");
        if let Some(v) = get("OTEL_EXPORTER_OTLP_PROTOCOL")
            && !v.eq_ignore_ascii_case("http/protobuf")
        {
            s.problems.push(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL is {v:?}: cvchain exports http/protobuf only"
            ));
        }
        if let Some(v) = get("OTEL_EXPORTER_OTLP_TIMEOUT") {
            match v.parse::<u64>() {
                Ok(ms) if ms > 0 => s.timeout = Duration::from_millis(ms.min(120_000)),
                _ => s.problems.push(
                    "OTEL_EXPORTER_OTLP_TIMEOUT must be a number of milliseconds; using 10000"
                        .into(),
                ),
            }
        }
        if let Some(cs) = get(APPINSIGHTS_SETTING) {
            let entra = get(APPINSIGHTS_AUTH_SETTING).and_then(|auth| {
                let mut aad = false;
                let mut client_id = None;
                for part in auth.split(';') {
                    let (k, v) = part.split_once('=').unwrap_or((part, ""));
                    if k.trim().eq_ignore_ascii_case("Authorization") {
                        aad = v.trim().eq_ignore_ascii_case("AAD");
                    } else if k.trim().eq_ignore_ascii_case("ClientId") {
                        client_id = Some(v.trim().to_owned()).filter(|c| !c.is_empty());
                    }
                }
                aad.then_some(client_id)
            });
            let has = |key: &str| {
                cs.split(';').any(|p| {
                    p.split_once('=')
                        .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(key))
                })
            };
            if has("InstrumentationKey") {
                s.app_insights = Some(AppInsights {
                    connection_string: cs,
                    entra,
                });
            } else {
                s.problems.push(format!(
                    "{APPINSIGHTS_SETTING} has no InstrumentationKey; no export to Application Insights"
                ));
            }
        }
        s
    }

    pub fn from_env() -> Self {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Whether anything is exported (or kept for the tree).
    pub fn any(&self) -> bool {
        self.otlp_traces || self.otlp_metrics || self.app_insights.is_some() || self.tree
    }

    fn traces(&self) -> bool {
        self.otlp_traces || self.app_insights.is_some() || self.tree
    }

    fn metrics(&self) -> bool {
        self.otlp_metrics || self.app_insights.is_some()
    }

    /// One line for `cvchain check` and the start-up log: where telemetry goes.
    pub fn describe(&self) -> String {
        let mut to = Vec::new();
        if self.otlp_traces || self.otlp_metrics {
            let what: Vec<&str> = [("traces", self.otlp_traces), ("metrics", self.otlp_metrics)]
                .into_iter()
                .filter_map(|(w, on)| on.then_some(w))
                .collect();
            to.push(format!("OTLP/HTTP ({})", what.join(", ")));
        }
        if let Some(ai) = &self.app_insights {
            to.push(format!(
                "Application Insights ({})",
                if ai.entra.is_some() {
                    "Microsoft Entra ID"
                } else {
                    "instrumentation key"
                }
            ));
        }
        if to.is_empty() {
            "off (no OTEL_EXPORTER_OTLP_ENDPOINT or APPLICATIONINSIGHTS_CONNECTION_STRING)".into()
        } else {
            to.join(" and ")
        }
    }
}

/// Logging only, as before telemetry: for the commands that export nothing.
pub fn init(format: LogFormat) {
    let _ = init_with(format, &TelemetrySettings::default());
}

fn env_filter(extra: &str) -> EnvFilter {
    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "info".into());
    let mut f = EnvFilter::try_new(&base).unwrap_or_else(|_| EnvFilter::new("info"));
    if let Ok(d) = extra.parse() {
        f = f.add_directive(d);
    }
    f
}

/// Logging, and telemetry when `settings` configure any; the handle flushes it at the end. A
/// second call (tests) keeps the first subscriber.
pub fn init_with(format: LogFormat, settings: &TelemetrySettings) -> Telemetry {
    let quiet = format!("{SPAN_TARGET}=off");
    if !settings.any() {
        let builder = fmt()
            .with_env_filter(env_filter(&quiet))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        let _ = match format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Text => builder.try_init(),
        };
        return Telemetry::default();
    }
    let telemetry = Telemetry::build(settings);
    let logs = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
        LogFormat::Text => logs.boxed(),
    }
    .with_filter(env_filter(&quiet));
    let registry = tracing_subscriber::registry().with(logs);
    let result = match &telemetry.tracer {
        Some(provider) => {
            // Spans: only those meant for OpenTelemetry; events (log lines, which become span
            // events): as `RUST_LOG` says.
            let only_ours = tracing_subscriber::filter::filter_fn(|meta| {
                !meta.is_span() || meta.target() == SPAN_TARGET
            });
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("cvchain"))
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(env_filter(&format!("{SPAN_TARGET}=info")).and(only_ours));
            tracing::subscriber::set_global_default(registry.with(layer))
        }
        None => tracing::subscriber::set_global_default(registry),
    };
    if result.is_ok() {
        for p in &settings.problems {
            tracing::warn!("telemetry: {p}");
        }
        tracing::info!(
            "telemetry: {}{}",
            settings.describe(),
            if settings.tree {
                " (kept for the trace tree)"
            } else {
                ""
            }
        );
    }
    telemetry
}

/// The exporters, while they run. Dropping it without [`Telemetry::shutdown`] loses what was
/// not exported yet.
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    tree: Option<Arc<Mutex<Vec<SpanData>>>>,
}

impl Telemetry {
    fn build(settings: &TelemetrySettings) -> Self {
        let resource = resource();
        let client = match tokio::runtime::Handle::try_current() {
            Ok(handle) => Some(ExportClient::new(
                handle,
                settings.timeout,
                settings.app_insights.as_ref().and_then(|a| a.entra.clone()),
            )),
            Err(_) => None,
        };
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut tracer = None;
        let mut tree = None;
        if settings.traces() {
            let mut builder = SdkTracerProvider::builder()
                .with_resource(resource.clone())
                .with_sampler(ChainSampler::from_env())
                .with_id_generator(ChainIds);
            if let Some(client) = &client {
                if settings.otlp_traces {
                    match opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_http_client(client.clone())
                        .build()
                    {
                        Ok(e) => builder = builder.with_span_processor(counted(e, &dropped)),
                        Err(e) => eprintln!("telemetry: no OTLP trace export: {e}"),
                    }
                }
                if let Some(ai) = &settings.app_insights {
                    match opentelemetry_application_insights::Exporter::new_from_connection_string(
                        &ai.connection_string,
                        client.clone(),
                    ) {
                        Ok(e) => builder = builder.with_span_processor(counted(e, &dropped)),
                        Err(_) => eprintln!(
                            "telemetry: {APPINSIGHTS_SETTING} cannot be read; no export to Application Insights"
                        ),
                    }
                }
            }
            if settings.tree {
                let kept = Arc::new(Mutex::new(Vec::new()));
                builder = builder.with_span_processor(Keep(kept.clone()));
                tree = Some(kept);
            }
            tracer = Some(builder.build());
        }
        let mut meter = None;
        if settings.metrics()
            && let Some(client) = &client
        {
            let mut builder = SdkMeterProvider::builder().with_resource(resource);
            if settings.otlp_metrics {
                match opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_http_client(client.clone())
                    .build()
                {
                    Ok(e) => builder = builder.with_reader(PeriodicReader::builder(e).build()),
                    Err(e) => eprintln!("telemetry: no OTLP metric export: {e}"),
                }
            }
            if let Some(ai) = &settings.app_insights
                && let Ok(e) =
                    opentelemetry_application_insights::Exporter::new_from_connection_string(
                        &ai.connection_string,
                        client.clone(),
                    )
            {
                builder = builder.with_reader(PeriodicReader::builder(e).build());
            }
            let provider = builder.build();
            let m = provider.meter("cvchain");
            cvchain_azure::telemetry::install(&m);
            let _ = APP.set(AppInstruments::new(&m, dropped.clone()));
            meter = Some(provider);
        }
        if tracer.is_some() {
            TRACING.store(true, Ordering::Relaxed);
            if meter.is_none() {
                // Spans without metrics (the tree alone): the client policies still make their
                // spans; what they count goes nowhere.
                let m = opentelemetry::global::meter("cvchain");
                cvchain_azure::telemetry::install(&m);
            }
        }
        Self {
            tracer,
            meter,
            tree,
        }
    }

    /// Whether spans are recorded.
    pub fn tracing(&self) -> bool {
        self.tracer.is_some()
    }

    /// Exports what is left, waiting at most `within` (the collector may be away): called on
    /// SIGTERM, after the invocations in flight finished.
    pub async fn shutdown(self, within: Duration) {
        if self.tracer.is_none() && self.meter.is_none() {
            return;
        }
        let (tracer, meter) = (self.tracer, self.meter);
        let flush = tokio::task::spawn_blocking(move || {
            if let Some(t) = &tracer {
                let _ = t.force_flush();
                let _ = t.shutdown();
            }
            if let Some(m) = &meter {
                let _ = m.force_flush();
                let _ = m.shutdown();
            }
        });
        if tokio::time::timeout(within, flush).await.is_err() {
            tracing::warn!(
                "telemetry: not all of it was exported within {within:?}; the rest is dropped"
            );
        }
    }

    /// The spans kept for the tree (`cvchain dev --trace`), flushed first.
    pub async fn kept_spans(&self) -> Vec<SpanData> {
        if let Some(t) = self.tracer.clone() {
            let _ = tokio::task::spawn_blocking(move || t.force_flush()).await;
        }
        self.tree
            .as_ref()
            .map(|t| t.lock().expect("spans").clone())
            .unwrap_or_default()
    }
}

fn resource() -> Resource {
    let mut b = Resource::builder();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if !named {
        b = b.with_service_name("cvchain");
    }
    b = b.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    // The instance: the Functions host's (Application Insights' role instance), else a fresh one.
    let instance = ["WEBSITE_INSTANCE_ID", "CONTAINER_NAME", "HOSTNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    b = b.with_attribute(KeyValue::new("service.instance.id", instance));
    if let Some(site) = std::env::var("WEBSITE_SITE_NAME")
        .ok()
        .filter(|v| !v.is_empty())
    {
        b = b.with_attributes([
            KeyValue::new("cloud.provider", "azure"),
            KeyValue::new("cloud.platform", "azure.functions"),
            KeyValue::new("faas.instance", core_trace::attribute(&site)),
        ]);
    }
    b.build()
}

// ------------------------------------------------------------------------------------------
// Trace ids: a root span of an invocation takes its chain's id.

thread_local! {
    static NEXT_TRACE_ID: Cell<Option<u128>> = const { Cell::new(None) };
}

/// Random ids, except for the root span an invocation starts: that takes the trace id derived
/// from its chain (set just before, on the same thread, by [`root_span`]).
#[derive(Debug)]
struct ChainIds;

impl IdGenerator for ChainIds {
    fn new_trace_id(&self) -> opentelemetry::trace::TraceId {
        match NEXT_TRACE_ID.with(Cell::take) {
            Some(id) => opentelemetry::trace::TraceId::from(id),
            None => RandomIdGenerator::default().new_trace_id(),
        }
    }

    fn new_span_id(&self) -> opentelemetry::trace::SpanId {
        RandomIdGenerator::default().new_span_id()
    }
}

/// Starts `span` now, as a root in the trace `trace_id`.
fn root_span(span: &tracing::Span, trace_id: core_trace::TraceId) {
    if span.is_disabled() {
        return;
    }
    NEXT_TRACE_ID.with(|c| c.set(Some(trace_id.to_u128())));
    // `context()` starts the OpenTelemetry span, which takes its trace id now.
    let _ = span.set_parent(OtelContext::new());
    let _ = span.context();
    NEXT_TRACE_ID.with(|c| c.set(None));
}

/// The SDK's sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`; every trace by default),
/// except that a client span with no parent is dropped: a request made outside any invocation
/// (the worker polling its queue) is counted in the metrics, not traced.
#[derive(Debug, Clone)]
struct ChainSampler(Sampler);

impl ChainSampler {
    fn from_env() -> Self {
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
            .ok()
            .and_then(|a| a.trim().parse::<f64>().ok())
            .unwrap_or(1.0)
            .clamp(0.0, 1.0);
        let sampler = match std::env::var("OTEL_TRACES_SAMPLER")
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(arg),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(arg)))
            }
            _ => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        };
        Self(sampler)
    }
}

impl ShouldSample for ChainSampler {
    fn should_sample(
        &self,
        parent_context: Option<&OtelContext>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let has_parent = parent_context.is_some_and(|c| c.has_active_span());
        if !has_parent && *span_kind == SpanKind::Client {
            return SamplingResult {
                decision: SamplingDecision::Drop,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.0
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

// ------------------------------------------------------------------------------------------
// Export: bounded, counted, on the runtime's reqwest client.

/// The exporters' HTTP client: reqwest (the one `azure_core` builds), driven by the process's
/// runtime (the SDK's export threads only wait for it), with a timeout per request; for
/// Application Insights with Entra ID, a bearer token for [`MONITOR_SCOPE`] and the `v2.1/track`
/// endpoint (`v2/track` takes no token).
#[derive(Clone)]
struct ExportClient {
    /// Built on the first export, not at start-up: building it reads the system's root
    /// certificates (as `cvchain_azure::transport` does for the Azure clients).
    client: Arc<OnceLock<reqwest::Client>>,
    handle: tokio::runtime::Handle,
    timeout: Duration,
    entra: Option<Arc<dyn azure_core::credentials::TokenCredential>>,
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportClient")
    }
}

impl ExportClient {
    fn new(
        handle: tokio::runtime::Handle,
        timeout: Duration,
        entra: Option<Option<String>>,
    ) -> Self {
        let entra = entra.and_then(|client_id| {
            azure_identity::ManagedIdentityCredential::new(Some(
                azure_identity::ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.map(azure_identity::UserAssignedId::ClientId),
                    ..Default::default()
                },
            ))
            .ok()
            .map(|c| c as Arc<dyn azure_core::credentials::TokenCredential>)
        });
        Self {
            client: Arc::new(OnceLock::new()),
            handle,
            timeout,
            entra,
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (client, entra, timeout) = (self.client.clone(), self.entra.clone(), self.timeout);
        let work = async move {
            let client = client.get_or_init(|| {
                reqwest::Client::builder()
                    .timeout(timeout)
                    .build()
                    .unwrap_or_default()
            });
            let (mut parts, body) = request.into_parts();
            if let Some(credential) = entra {
                let token = credential.get_token(&[MONITOR_SCOPE], None).await?;
                parts.headers.insert(
                    http::header::AUTHORIZATION,
                    http::HeaderValue::from_str(&format!("Bearer {}", token.token.secret()))?,
                );
                let uri = parts.uri.to_string().replace("/v2/track", "/v2.1/track");
                parts.uri = uri.parse()?;
            }
            let request: reqwest::Request = http::Request::from_parts(parts, body).try_into()?;
            let rsp = client.execute(request).await?;
            let mut out = http::Response::builder().status(rsp.status().as_u16());
            for (k, v) in rsp.headers() {
                out = out.header(k.as_str(), v.as_bytes());
            }
            let body = rsp.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(out.body(body)?)
        };
        // The SDK's export threads are not the runtime's: the request (and its timeout) runs on
        // the runtime, and the thread only waits for its end.
        let bounded = async move {
            match tokio::time::timeout(timeout, work).await {
                Ok(result) => result,
                Err(_) => Err("telemetry export timed out".into()),
            }
        };
        match self.handle.spawn(bounded).await {
            Ok(result) => result,
            Err(e) => Err(Box::new(e)),
        }
    }
}

/// A batch processor (bounded queue, `OTEL_BSP_*`) in front of `exporter`, counting what it
/// drops: spans that find the queue full, and spans whose export failed.
fn counted<E: SpanExporter + 'static>(exporter: E, dropped: &Arc<AtomicUsize>) -> Counted {
    let queued = Arc::new(AtomicUsize::new(0));
    let max = std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    Counted {
        inner: BatchSpanProcessor::builder(CountingExporter {
            inner: exporter,
            queued: queued.clone(),
            dropped: dropped.clone(),
        })
        .build(),
        queued,
        dropped: dropped.clone(),
        max,
    }
}

#[derive(Debug)]
struct Counted {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    max: usize,
}

impl SpanProcessor for Counted {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &OtelContext) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queued.load(Ordering::Relaxed) >= self.max {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            });
        if result.is_err() {
            self.dropped.fetch_add(n, Ordering::Relaxed);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Keeps every finished span (`cvchain dev --trace`).
#[derive(Debug)]
struct Keep(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Keep {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &OtelContext) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            let mut kept = self.0.lock().expect("spans");
            // A bound, so a long `dev --keep` cannot grow without end.
            if kept.len() < 100_000 {
                kept.push(span);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Metrics of the application (the client requests' are `cvchain_azure::telemetry`'s).

struct AppInstruments {
    invoke_duration: Histogram<f64>,
    invocations: Counter<u64>,
    gate: Counter<u64>,
    moves: Counter<u64>,
    deliveries: Counter<u64>,
    outbox_age: Gauge<f64>,
    _dropped: opentelemetry::metrics::ObservableCounter<u64>,
}

static APP: OnceLock<AppInstruments> = OnceLock::new();
/// Spans are recorded (an exporter or the tree is on).
static TRACING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl AppInstruments {
    fn new(m: &opentelemetry::metrics::Meter, dropped: Arc<AtomicUsize>) -> Self {
        Self {
            invoke_duration: m
                .f64_histogram(metric::INVOKE_DURATION)
                .with_unit("s")
                .with_description(
                    "Duration of invocations, by trigger, notification kind and outcome.",
                )
                .with_boundaries(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ])
                .build(),
            invocations: m
                .u64_counter(metric::INVOCATIONS)
                .with_description("Invocations, by trigger, notification kind and outcome.")
                .build(),
            gate: m
                .u64_counter(metric::GATE_VERDICTS)
                .with_description("The promotion gate's verdicts.")
                .build(),
            moves: m
                .u64_counter(metric::CHANNEL_MOVES)
                .with_description("Release channel moves, by channel, reason and outcome.")
                .build(),
            deliveries: m
                .u64_counter(metric::EVENT_DELIVERIES)
                .with_description("Event deliveries (each event, each sink, each attempt).")
                .build(),
            outbox_age: m
                .f64_gauge(metric::OUTBOX_OLDEST_AGE)
                .with_unit("s")
                .with_description(
                    "Age of the oldest pending event, as the last round over every project saw it.",
                )
                .build(),
            _dropped: m
                .u64_observable_counter(metric::TELEMETRY_DROPPED)
                .with_description("Spans dropped: the export queue was full or an export failed.")
                .with_callback(move |o| o.observe(dropped.load(Ordering::Relaxed) as u64, &[]))
                .build(),
        }
    }
}

/// A gate verdict was recorded (`passed` or `failed`).
pub fn gate_verdict(verdict: &str) {
    if let Some(a) = APP.get() {
        a.gate.add(
            1,
            &[KeyValue::new(
                "cvchain.gate.verdict",
                core_trace::attribute(verdict),
            )],
        );
    }
}

/// A channel move was recorded (`moved`), or one that could not happen (`failed`).
pub fn channel_move(channel: &str, reason: &str, outcome: &'static str) {
    if let Some(a) = APP.get() {
        a.moves.add(
            1,
            &[
                KeyValue::new("cvchain.channel", core_trace::attribute(channel)),
                KeyValue::new("cvchain.channel.reason", core_trace::attribute(reason)),
                KeyValue::new(core_trace::OUTCOME, outcome),
            ],
        );
    }
}

/// An event's delivery to a sink ended: `delivered`, `retry` or `failed`.
pub fn delivery(sink: &'static str, outcome: &'static str) {
    if let Some(a) = APP.get() {
        a.deliveries.add(
            1,
            &[
                KeyValue::new(core_trace::SINK, sink),
                KeyValue::new(core_trace::OUTCOME, outcome),
            ],
        );
    }
}

/// The oldest pending event's age, seen by a round over every project.
pub fn outbox_age(seconds: f64) {
    if let Some(a) = APP.get() {
        a.outbox_age.record(seconds.max(0.0), &[]);
    }
}

/// Whether metrics are recorded (callers skip work that only feeds them).
pub fn metrics_on() -> bool {
    APP.get().is_some()
}

// ------------------------------------------------------------------------------------------
// Spans: invocations, delivery rounds, each event's delivery.

tokio::task_local! {
    /// The trace of the chain the current task works for (set for an invocation or a manual
    /// move, telemetry on or off): events written in it carry its `traceparent`.
    static CHAIN: core_trace::TraceId;
}

/// What triggered an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The Functions host's queue trigger (`cvchain serve`).
    Host,
    /// `cvchain worker` reading the queue.
    Worker,
}

/// One invocation's span and clock.
pub struct Invocation {
    span: tracing::Span,
    start: Instant,
    trigger: Trigger,
    kind: &'static str,
    trace_id: core_trace::TraceId,
}

/// Starts an invocation for `incoming`: its span (a root in its chain's trace) and clock.
pub fn invocation(
    incoming: &Incoming,
    trigger: Trigger,
    queue: &str,
    invocation_id: Option<&str>,
) -> Invocation {
    let kind = core_trace::notification_kind(incoming);
    let trace_id = core_trace::trace_id_for(incoming);
    let span = if TRACING.load(Ordering::Relaxed) {
        let name = match trigger {
            Trigger::Host => cvchain_core::envelope::FUNCTION_NAME.to_owned(),
            Trigger::Worker => format!("process {queue}"),
        };
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "invocation",
            otel.name = %name,
            otel.kind = "consumer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            faas.trigger = "pubsub",
            faas.invocation_id = Empty,
            messaging.system = "azure.storage.queue",
            messaging.operation.type = "process",
            messaging.destination.name = %core_trace::attribute(queue),
        );
        if let Some(id) = invocation_id.filter(|i| !i.is_empty()) {
            span.record("faas.invocation_id", core_trace::attribute(id).as_str());
        }
        root_span(&span, trace_id);
        for (k, v) in core_trace::invocation_attributes(incoming) {
            span.set_attribute(k, v);
        }
        span
    } else {
        tracing::Span::none()
    };
    Invocation {
        span,
        start: Instant::now(),
        trigger,
        kind,
        trace_id,
    }
}

impl Invocation {
    /// Runs `work` in the invocation: its span current, its chain's trace set for the events it
    /// writes.
    pub async fn run<F: std::future::Future>(&self, work: F) -> F::Output {
        use tracing::Instrument as _;
        CHAIN
            .scope(self.trace_id, work.instrument(self.span.clone()))
            .await
    }

    /// Ends the invocation: its outcome and decision on the span, its metrics.
    pub fn finish(self, outcome: core_trace::Outcome, decision: Option<&str>, error: Option<&str>) {
        let seconds = self.start.elapsed().as_secs_f64();
        if !self.span.is_disabled() {
            self.span
                .set_attribute(core_trace::OUTCOME, outcome.as_str().to_owned());
            if let Some(d) = decision {
                self.span
                    .set_attribute(core_trace::DECISION, core_trace::attribute(d));
            }
            if outcome.is_error() {
                self.span.record("otel.status_code", "ERROR");
                if let Some(e) = error {
                    self.span
                        .record("otel.status_description", core_trace::attribute(e).as_str());
                }
            }
        }
        if let Some(a) = APP.get() {
            let attrs = [
                KeyValue::new(
                    "faas.trigger",
                    match self.trigger {
                        Trigger::Host | Trigger::Worker => "pubsub",
                    },
                ),
                KeyValue::new(core_trace::NOTIFICATION_KIND, self.kind),
                KeyValue::new(core_trace::OUTCOME, outcome.as_str()),
            ];
            a.invoke_duration.record(seconds, &attrs);
            a.invocations.add(1, &attrs);
        }
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

/// Runs `work` in the trace of `project`'s `iteration` (a manual move: `promote`, `rollback`,
/// the console's forms), with a span named `name` when spans are recorded.
pub async fn in_chain<F: std::future::Future>(
    name: &'static str,
    project: uuid::Uuid,
    iteration: Option<uuid::Uuid>,
    work: F,
) -> F::Output {
    use tracing::Instrument as _;
    let trace_id = match iteration {
        Some(i) => core_trace::chain_trace_id(project, i),
        None => core_trace::message_trace_id(&format!("{name}:{project}")),
    };
    let span = if TRACING.load(Ordering::Relaxed) {
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "manual",
            otel.name = name,
            otel.kind = "internal",
            cvchain.project.id = %project,
        );
        root_span(&span, trace_id);
        span
    } else {
        tracing::Span::none()
    };
    CHAIN.scope(trace_id, work.instrument(span)).await
}

/// The trace context an event written now carries: the current span's (telemetry on), else the
/// current chain's with a parent derived from the event's id, else the chain of the event's own
/// project and iteration. `None` only for an event of no iteration outside any chain.
pub fn event_trace(event: &cvchain_core::events::CloudEvent) -> Option<TraceParent> {
    if TRACING.load(Ordering::Relaxed) {
        let cx = tracing::Span::current().context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return Some(TraceParent {
                trace_id: core_trace::TraceId(sc.trace_id().to_bytes()),
                parent_id: core_trace::SpanId(sc.span_id().to_bytes()),
                sampled: sc.is_sampled(),
            });
        }
    }
    let trace_id = CHAIN.try_with(|t| *t).ok().or_else(|| {
        let id = |k: &str| {
            event
                .data
                .get(k)
                .and_then(|v| v.as_str())
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
        };
        Some(core_trace::chain_trace_id(
            id("projectId")?,
            id("iterationId")?,
        ))
    })?;
    Some(TraceParent {
        trace_id,
        parent_id: core_trace::event_span_id(&event.id),
        sampled: true,
    })
}

/// A span for a delivery round of one project (after an invocation: a child of it; from the
/// timer: a child of the timer's span).
pub fn round_span(project: &str, parent: Option<&tracing::Span>) -> tracing::Span {
    if !TRACING.load(Ordering::Relaxed) {
        return tracing::Span::none();
    }
    match parent {
        Some(p) => tracing::info_span!(
            target: SPAN_TARGET,
            parent: p,
            "deliver",
            otel.name = "deliver events",
            otel.kind = "internal",
            cvchain.project.id = %core_trace::attribute(project),
        ),
        None => tracing::info_span!(
            target: SPAN_TARGET,
            "deliver",
            otel.name = "deliver events",
            otel.kind = "internal",
            cvchain.project.id = %core_trace::attribute(project),
        ),
    }
}

/// A span for the `DeliverEvents` timer (the host's, or the worker's own every
/// `CVCHAIN_EVENTS_DELIVER_SECONDS`).
pub fn timer_span() -> tracing::Span {
    if !TRACING.load(Ordering::Relaxed) {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: SPAN_TARGET,
        "timer",
        otel.name = cvchain_core::envelope::DELIVER_EVENTS_FUNCTION,
        otel.kind = "server",
        faas.trigger = "timer",
    )
}

/// One event's delivery to one sink, in the event's own trace (its `traceparent`), linked to
/// the round that sends it.
pub fn delivery_span(
    sink: &'static str,
    destination: &str,
    event_id: &str,
    event_type: &str,
    trace: Option<TraceParent>,
) -> tracing::Span {
    if !TRACING.load(Ordering::Relaxed) {
        return tracing::Span::none();
    }
    let round = tracing::Span::current();
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        parent: None,
        "delivery",
        otel.name = %format!("send {sink}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.operation.type = "send",
        messaging.system = match sink {
            "queue" => "azure.storage.queue",
            other => other,
        },
        messaging.destination.name = %core_trace::attribute(destination),
        messaging.message.id = %core_trace::attribute(event_id),
        cloudevents.event_id = %core_trace::attribute(event_id),
        cloudevents.event_type = %core_trace::attribute(event_type),
        cvchain.sink = sink,
        cvchain.outcome = Empty,
    );
    if let Some(tp) = trace {
        let sc = SpanContext::new(
            opentelemetry::trace::TraceId::from(tp.trace_id.to_u128()),
            opentelemetry::trace::SpanId::from(tp.parent_id.to_u64()),
            if tp.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(OtelContext::new().with_remote_span_context(sc));
    }
    let round_cx = round.context();
    let round_sc = round_cx.span().span_context().clone();
    if round_sc.is_valid() {
        span.add_link(round_sc);
    }
    span
}

/// The `traceparent` header a delivery sends: the delivery span's context when spans are
/// recorded, else the event's own.
pub fn delivery_traceparent(span: &tracing::Span, event: Option<TraceParent>) -> Option<String> {
    if !span.is_disabled() {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return Some(
                TraceParent {
                    trace_id: core_trace::TraceId(sc.trace_id().to_bytes()),
                    parent_id: core_trace::SpanId(sc.span_id().to_bytes()),
                    sampled: sc.is_sampled(),
                }
                .header(),
            );
        }
    }
    event.map(|t| t.header())
}

/// Ends a delivery span with what the sink answered.
pub fn delivery_done(span: &tracing::Span, outcome: &'static str, error: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    span.record("cvchain.outcome", outcome);
    if outcome != "delivered" {
        span.record("otel.status_code", "ERROR");
        if let Some(e) = error {
            span.set_attribute("error.type", core_trace::attribute(e));
        }
    }
}

// ------------------------------------------------------------------------------------------
// The tree (`cvchain dev --trace`).

/// The kept spans as a tree per trace: each span with its duration and what it did, children
/// under their parent in start order.
pub fn render_tree(spans: &[SpanData]) -> String {
    use std::collections::{BTreeMap, HashMap, HashSet};
    let mut by_trace: BTreeMap<(std::time::SystemTime, String), Vec<&SpanData>> = BTreeMap::new();
    let mut first: HashMap<opentelemetry::trace::TraceId, std::time::SystemTime> = HashMap::new();
    for s in spans {
        let t = first
            .entry(s.span_context.trace_id())
            .or_insert(s.start_time);
        if s.start_time < *t {
            *t = s.start_time;
        }
    }
    for s in spans {
        let tid = s.span_context.trace_id();
        by_trace
            .entry((first[&tid], tid.to_string()))
            .or_default()
            .push(s);
    }
    let mut out = String::new();
    for ((_, tid), mut group) in by_trace {
        group.sort_by_key(|s| s.start_time);
        let ids: HashSet<opentelemetry::trace::SpanId> =
            group.iter().map(|s| s.span_context.span_id()).collect();
        let total = group
            .iter()
            .map(|s| s.end_time)
            .max()
            .and_then(|end| end.duration_since(group[0].start_time).ok())
            .unwrap_or_default();
        out.push_str(&format!(
            "trace {tid}  ({} spans, {})\n",
            group.len(),
            millis(total)
        ));
        let roots: Vec<&SpanData> = group
            .iter()
            .copied()
            .filter(|s| !ids.contains(&s.parent_span_id))
            .collect();
        for (i, r) in roots.iter().enumerate() {
            tree_node(&mut out, r, &group, "", i + 1 == roots.len());
        }
    }
    out
}

fn millis(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

fn tree_node(out: &mut String, s: &SpanData, all: &[&SpanData], prefix: &str, last: bool) {
    let attr = |k: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| kv.value.to_string())
    };
    let took = s.end_time.duration_since(s.start_time).unwrap_or_default();
    let mut what = s.name.to_string();
    for k in [
        core_trace::NOTIFICATION_KIND,
        core_trace::SERVICE,
        "cvchain.operation",
        "url.full",
        "http.response.status_code",
        "http.request.resend_count",
        "cloudevents.event_type",
        core_trace::OUTCOME,
        core_trace::DECISION,
    ] {
        if let Some(v) = attr(k) {
            let v = if k == "url.full" {
                // The path is what tells calls apart; the host is the service's.
                url::Url::parse(&v)
                    .map(|u| u.path().to_owned())
                    .unwrap_or(v)
            } else {
                v
            };
            let shown: String = v.chars().take(90).collect();
            what.push_str(&format!("  {shown}"));
        }
    }
    out.push_str(&format!(
        "{prefix}{}{what}  [{}]\n",
        if last { "└─ " } else { "├─ " },
        millis(took)
    ));
    let children: Vec<&SpanData> = all
        .iter()
        .copied()
        .filter(|c| c.parent_span_id == s.span_context.span_id())
        .collect();
    let next = format!("{prefix}{}", if last { "   " } else { "│  " });
    for (i, c) in children.iter().enumerate() {
        tree_node(out, c, all, &next, i + 1 == children.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> TelemetrySettings {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TelemetrySettings::from_lookup(&move |k| map.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_off_and_each_setting_turns_its_part_on() {
        let s = settings(&[]);
        assert!(!s.any() && s.problems.is_empty());
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")]);
        assert!(s.otlp_traces && s.otlp_metrics && s.app_insights.is_none());
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ]);
        assert!(s.otlp_traces && !s.otlp_metrics);
        let s = settings(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://127.0.0.1:4318/v1/traces",
        )]);
        assert!(s.otlp_traces && !s.otlp_metrics);
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ]);
        assert!(!s.any());
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]);
        assert!(!s.any());
        assert!(s.problems[0].contains("OTEL_EXPORTER_OTLP_ENDPOINT"));
    }

    #[test]
    fn application_insights_takes_the_connection_string_and_entra_id() {
        let cs = "InstrumentationKey=00000000-0000-0000-0000-000000000001;IngestionEndpoint=https://swedencentral-0.in.applicationinsights.azure.com/";
        let s = settings(&[(APPINSIGHTS_SETTING, cs)]);
        let ai = s.app_insights.as_ref().unwrap();
        assert!(ai.entra.is_none());
        assert!(s.describe().contains("instrumentation key"));
        // The Bicep template's setting: the system-assigned identity.
        let s = settings(&[
            (APPINSIGHTS_SETTING, cs),
            (APPINSIGHTS_AUTH_SETTING, "Authorization=AAD"),
        ]);
        assert_eq!(s.app_insights.as_ref().unwrap().entra, Some(None));
        assert!(s.describe().contains("Microsoft Entra ID"));
        let s = settings(&[
            (APPINSIGHTS_SETTING, cs),
            (APPINSIGHTS_AUTH_SETTING, "Authorization=AAD;ClientId=abc"),
        ]);
        assert_eq!(
            s.app_insights.as_ref().unwrap().entra,
            Some(Some("abc".into()))
        );
        // Never shown: neither in Debug nor in the description.
        assert!(!format!("{s:?}").contains("InstrumentationKey"));
        assert!(!s.describe().contains("0000-000000000001"));
        let s = settings(&[(APPINSIGHTS_SETTING, "IngestionEndpoint=https://x/")]);
        assert!(s.app_insights.is_none());
        assert!(s.problems[0].contains(APPINSIGHTS_SETTING));
    }

    /// Application Insights with Microsoft Entra ID: a token for Azure Monitor's scope, on the
    /// endpoint that takes one (`v2.1/track`), sent from a thread outside the runtime as the
    /// SDK's export threads send it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entra_id_sends_a_token_for_azure_monitor_to_v2_1_track() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 16 * 1024];
            let n = s.read(&mut buf).unwrap();
            tx.send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                .unwrap();
        });
        let credential = Arc::new(cvchain_testkit::RecordingCredential::default());
        let client = ExportClient {
            client: Arc::new(OnceLock::new()),
            handle: tokio::runtime::Handle::current(),
            timeout: Duration::from_secs(5),
            entra: Some(credential.clone()),
        };
        let request = http::Request::post(format!("http://127.0.0.1:{port}/v2/track"))
            .body(Bytes::from_static(b"[]"))
            .unwrap();
        let rsp = tokio::task::spawn_blocking(move || {
            futures::executor::block_on(opentelemetry_http::HttpClient::send_bytes(
                &client, request,
            ))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(rsp.status(), 200);
        let head = rx.recv().unwrap();
        assert!(head.starts_with("POST /v2.1/track HTTP/1.1"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer token-for:https://monitor.azure.com//.default"),
            "{head}"
        );
        assert_eq!(
            *credential.scopes.lock().unwrap(),
            vec![MONITOR_SCOPE.to_owned()]
        );
    }
}
