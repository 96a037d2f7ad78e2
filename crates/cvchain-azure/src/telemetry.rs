//! A client span and metrics for every HTTP request cvchain makes (storage, Custom Vision, the
//! event sinks), as `azure_core` pipeline policies: [`ClientSpanPolicy`] runs once per attempt
//! (after the retry policy), so each attempt is its own span with OpenTelemetry's HTTP client
//! attributes (`http.request.method`, `server.address`, `server.port`, `url.full` without its
//! query, `http.response.status_code`, `http.request.resend_count`, `error.type`), and
//! [`AttemptsPolicy`] runs once per call, before the retries, to count them.
//!
//! The spans are `tracing` spans under [`SPAN_TARGET`]: the application's OpenTelemetry layer
//! takes them, its log output never shows them. Until [`install`] is called (no exporter
//! configured) both policies pass the request straight on: no span, no attribute, no clock.
//! Which attributes, and their redaction, are the core's (`cvchain_core::trace`).

use azure_core::http::{
    Context, Request,
    policies::{Policy, PolicyResult},
};
use cvchain_core::trace::{self, metric};
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter},
};
use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU32, Ordering},
};
use tracing::{Instrument, field::Empty};

/// The `tracing` target of every span meant for OpenTelemetry (and not for the log lines).
pub const SPAN_TARGET: &str = "cvchain_otel";

/// The instruments the policies record with.
#[derive(Debug)]
pub struct Instruments {
    http_duration: Histogram<f64>,
    storage_requests: Counter<u64>,
    cv_calls: Counter<u64>,
    cv_throttled: Counter<u64>,
}

static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();

/// Turns the client spans and metrics on, recording with `meter` (once per process; later calls
/// change nothing).
pub fn install(meter: &Meter) {
    let _ = INSTRUMENTS.set(Instruments {
        http_duration: meter
            .f64_histogram(metric::HTTP_CLIENT_DURATION)
            .with_unit("s")
            .with_description("Duration of HTTP client requests (each attempt).")
            .with_boundaries(vec![
                0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            ])
            .build(),
        storage_requests: meter
            .u64_counter(metric::STORAGE_REQUESTS)
            .with_description("Azure Storage requests (each attempt), by service and status.")
            .build(),
        cv_calls: meter
            .u64_counter(metric::CUSTOM_VISION_CALLS)
            .with_description("Custom Vision Training API calls (each attempt).")
            .build(),
        cv_throttled: meter
            .u64_counter(metric::CUSTOM_VISION_THROTTLED)
            .with_description("Custom Vision answers of 429 Too Many Requests.")
            .build(),
    });
}

/// Whether client spans and metrics are on.
pub fn enabled() -> bool {
    INSTRUMENTS.get().is_some()
}

/// The services a request can go to, as `cvchain.service` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Table,
    Blob,
    Queue,
    CustomVision,
    EventGrid,
    Webhook,
    Teams,
    Slack,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Table => "table",
            Service::Blob => "blob",
            Service::Queue => "queue",
            Service::CustomVision => "customvision",
            Service::EventGrid => "eventgrid",
            Service::Webhook => "webhook",
            Service::Teams => "teams",
            Service::Slack => "slack",
        }
    }

    fn is_storage(self) -> bool {
        matches!(self, Service::Table | Service::Blob | Service::Queue)
    }
}

/// The attempts of one call so far, shared by its tries through the [`Context`].
#[derive(Debug, Default)]
struct Attempts(AtomicU32);

/// The attempt a caller that retries on its own is making (0 for the first), and the operation,
/// set in the [`Context`] it sends with (the Custom Vision client).
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub number: u32,
    pub operation: &'static str,
}

/// Once per call, before the retry policy: gives the call's tries a counter.
#[derive(Debug, Default)]
pub struct AttemptsPolicy;

#[async_trait::async_trait]
impl Policy for AttemptsPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        if !enabled() {
            return next[0].send(ctx, request, &next[1..]).await;
        }
        let ctx = ctx.to_borrowed().with_value(Attempts::default());
        next[0].send(&ctx, request, &next[1..]).await
    }
}

/// Once per attempt: a client span around it and the request's metrics.
#[derive(Debug)]
pub struct ClientSpanPolicy {
    service: Service,
    /// How `url.full` shows the URL when its path holds a key too (a Slack webhook's), before
    /// the core's redaction.
    shown: Option<fn(&url::Url) -> String>,
}

impl ClientSpanPolicy {
    /// The policy for `service`, as a pipeline takes it.
    pub fn shared(service: Service) -> Arc<dyn Policy> {
        Arc::new(Self {
            service,
            shown: None,
        })
    }

    /// The same, for a service whose URLs `shown` must withhold more than the query of.
    pub fn shared_shown(service: Service, shown: fn(&url::Url) -> String) -> Arc<dyn Policy> {
        Arc::new(Self {
            service,
            shown: Some(shown),
        })
    }
}

#[async_trait::async_trait]
impl Policy for ClientSpanPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let Some(instruments) = INSTRUMENTS.get() else {
            return next[0].send(ctx, request, &next[1..]).await;
        };
        let (resend, operation) = match (ctx.value::<Attempt>(), ctx.value::<Attempts>()) {
            (Some(a), _) => (a.number, Some(a.operation)),
            (None, Some(a)) => (a.0.fetch_add(1, Ordering::Relaxed), None),
            (None, None) => (0, None),
        };
        let method = request.method().as_str().to_ascii_uppercase();
        let mut target = trace::http_target(request.url());
        if let Some(shown) = self.shown {
            target.url_full = trace::url_attribute(&shown(request.url()));
        }
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "http.client",
            otel.name = %trace::http_span_name(&method),
            otel.kind = "client",
            otel.status_code = Empty,
            http.request.method = %method,
            server.address = %target.server_address,
            server.port = i64::from(target.server_port),
            url.full = %target.url_full,
            http.request.resend_count = Empty,
            http.response.status_code = Empty,
            error.type = Empty,
            cvchain.service = self.service.as_str(),
            cvchain.operation = Empty,
        );
        if resend > 0 {
            span.record("http.request.resend_count", i64::from(resend));
        }
        if let Some(op) = operation {
            span.record("cvchain.operation", op);
        }
        let start = std::time::Instant::now();
        let result = next[0]
            .send(ctx, request, &next[1..])
            .instrument(span.clone())
            .await;
        let seconds = start.elapsed().as_secs_f64();
        let (status, error_type) = match &result {
            Ok(rsp) => {
                let s = u16::from(rsp.status());
                (Some(s), (s >= 400).then(|| s.to_string()))
            }
            Err(e) => (None, Some(error_kind(e))),
        };
        if let Some(s) = status {
            span.record("http.response.status_code", i64::from(s));
        }
        if let Some(t) = &error_type {
            span.record("error.type", t.as_str());
            span.record("otel.status_code", "ERROR");
        }
        let mut attrs = vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("server.address", target.server_address),
            KeyValue::new("server.port", i64::from(target.server_port)),
            KeyValue::new(trace::SERVICE, self.service.as_str()),
        ];
        if let Some(s) = status {
            attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        if let Some(t) = error_type {
            attrs.push(KeyValue::new("error.type", t));
        }
        instruments.http_duration.record(seconds, &attrs);
        if self.service.is_storage() {
            instruments.storage_requests.add(1, &attrs);
        }
        result
    }
}

/// `error.type` of a request that got no answer.
fn error_kind(e: &azure_core::Error) -> String {
    use azure_core::error::ErrorKind;
    match e.kind() {
        ErrorKind::Io => "io".into(),
        ErrorKind::Credential => "credential".into(),
        ErrorKind::Connection => "connection".into(),
        _ => "_OTHER".into(),
    }
}

/// One Custom Vision attempt's answer: `status` (`None`: no answer, `error` says why).
pub fn record_custom_vision(operation: &'static str, status: Option<u16>, error: Option<&str>) {
    let Some(i) = INSTRUMENTS.get() else {
        return;
    };
    let mut attrs = vec![KeyValue::new("cvchain.operation", operation)];
    if let Some(s) = status {
        attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
    }
    if let Some(e) = error {
        attrs.push(KeyValue::new("error.type", e.to_owned()));
    }
    i.cv_calls.add(1, &attrs);
    if status == Some(429) {
        i.cv_throttled
            .add(1, &[KeyValue::new("cvchain.operation", operation)]);
    }
}
