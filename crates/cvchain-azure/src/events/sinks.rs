//! The sinks: a Storage queue in cvchain's account, an Event Grid topic, a Standard Webhooks
//! endpoint. Each send comes back as an [`Answer`] (delivered, or refused with the status and
//! `Retry-After`); the decisions about it are the core's (`events::delivery`). No secret ever
//! reaches an answer: bodies are cut short and redacted, and the configured secrets removed.

use super::settings::{EventGridAuth, EventsSettings, display_url};
use crate::storage::{StorageError, clients::StorageClients, queue::send_text};
use azure_core::{
    credentials::{Secret, TokenCredential},
    http::{
        ClientOptions, Context, Method, Pipeline, PipelineSendOptions, RawResponse, Request,
        RetryOptions, Transport, Url,
        headers::HeaderName,
        policies::{Policy, auth::BearerTokenAuthorizationPolicy},
    },
};
use azure_storage_queue::QueueClient;
use base64::Engine as _;
use cvchain_core::events::{BATCH_CONTENT_TYPE, CONTENT_TYPE, Sink, delivery::Answer, webhook};
use std::{sync::Arc, time::Duration};

pub const EVENTGRID_SCOPE: &str = "https://eventgrid.azure.net/.default";
/// One attempt; a sink that hangs costs this much, once per round.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Event Grid takes at most 1 MB per request.
const EVENTGRID_MAX_REQUEST: usize = 1_000_000;

/// What tests and callers with their own transport or identity may set.
#[derive(Clone, Default)]
pub struct SinkOptions {
    /// Every HTTP request goes through it (an HTTP client that trusts a test CA…).
    pub transport: Option<Transport>,
    /// The identity for Event Grid instead of the managed identity.
    pub eventgrid_credential: Option<Arc<dyn TokenCredential>>,
    pub timeout: Option<Duration>,
}

/// The configured sinks.
pub struct Sinks {
    pub queue: Option<QueueSink>,
    pub event_grid: Option<EventGridSink>,
    pub webhook: Option<WebhookSink>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.configured().iter().map(|s| self.describe(*s)))
            .finish()
    }
}

impl Sinks {
    /// The sinks the settings configure; no request is sent yet.
    pub fn new(
        settings: &EventsSettings,
        clients: &StorageClients,
        options: SinkOptions,
    ) -> Result<Self, StorageError> {
        let transport = options
            .transport
            .clone()
            .unwrap_or_else(crate::transport::lazy);
        let timeout = options.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let queue = match &settings.queue {
            Some(name) => Some(QueueSink {
                client: clients.queue(name)?,
                name: name.clone(),
            }),
            None => None,
        };
        let event_grid = match &settings.event_grid {
            Some(eg) => {
                let (key, credential) = match &eg.auth {
                    EventGridAuth::Key(k) => (Some(k.clone()), None),
                    EventGridAuth::ManagedIdentity { client_id } => {
                        let cred: Arc<dyn TokenCredential> = match &options.eventgrid_credential {
                            Some(c) => c.clone(),
                            None => azure_identity::ManagedIdentityCredential::new(Some(
                                azure_identity::ManagedIdentityCredentialOptions {
                                    user_assigned_id: client_id
                                        .clone()
                                        .map(azure_identity::UserAssignedId::ClientId),
                                    client_options: ClientOptions {
                                        transport: Some(transport.clone()),
                                        ..Default::default()
                                    },
                                },
                            ))
                            .map_err(|e| StorageError::Other {
                                service: "eventgrid",
                                detail: format!(
                                    "cannot create the managed identity credential: {}",
                                    cvchain_core::redact::redact(&e.to_string())
                                ),
                            })?,
                        };
                        (None, Some(cred))
                    }
                };
                let mut per_try: Vec<Arc<dyn Policy>> = Vec::new();
                if let Some(c) = credential {
                    per_try.push(Arc::new(BearerTokenAuthorizationPolicy::new(
                        c,
                        [EVENTGRID_SCOPE],
                    )));
                }
                Some(EventGridSink {
                    endpoint: eg.endpoint.clone(),
                    key,
                    http: Http::new(transport.clone(), per_try, timeout),
                })
            }
            None => None,
        };
        let webhook = settings.webhook.as_ref().map(|w| WebhookSink {
            url: w.url.clone(),
            key: w.key.clone(),
            http: Http::new(transport.clone(), Vec::new(), timeout),
        });
        Ok(Self {
            queue,
            event_grid,
            webhook,
        })
    }

    pub fn configured(&self) -> Vec<Sink> {
        let mut out = Vec::new();
        if self.queue.is_some() {
            out.push(Sink::Queue);
        }
        if self.event_grid.is_some() {
            out.push(Sink::EventGrid);
        }
        if self.webhook.is_some() {
            out.push(Sink::Webhook);
        }
        out
    }

    /// The sink as logs show it (no key, no query).
    pub fn describe(&self, sink: Sink) -> String {
        match sink {
            Sink::Queue => format!(
                "queue {}",
                self.queue.as_ref().map(|q| q.name.as_str()).unwrap_or("-")
            ),
            Sink::EventGrid => format!(
                "Event Grid {}",
                self.event_grid
                    .as_ref()
                    .map(|e| display_url(&e.endpoint))
                    .unwrap_or_default()
            ),
            Sink::Webhook => format!(
                "webhook {}",
                self.webhook
                    .as_ref()
                    .map(|w| display_url(&w.url))
                    .unwrap_or_default()
            ),
        }
    }

    /// Sends events to one sink, in order: one message each to the queue, one request each to
    /// the webhook, as few requests as 1 MB allows to Event Grid. `events` are `(id, body)`.
    /// Returns one answer per event sent; it stops at the first refusal (the rest keep their
    /// place in the order), so fewer answers than events means the rest were not tried.
    pub async fn send(&self, sink: Sink, events: &[(String, String)]) -> Vec<Answer> {
        let mut out = Vec::new();
        match sink {
            Sink::Queue => {
                let Some(q) = &self.queue else { return out };
                for (_, body) in events {
                    let a = q.send(body).await;
                    let stop = !matches!(a, Answer::Delivered(_));
                    out.push(a);
                    if stop {
                        break;
                    }
                }
            }
            Sink::Webhook => {
                let Some(w) = &self.webhook else { return out };
                for (id, body) in events {
                    let a = w.send(id, body).await;
                    let stop = !matches!(a, Answer::Delivered(_));
                    out.push(a);
                    if stop {
                        break;
                    }
                }
            }
            Sink::EventGrid => {
                let Some(eg) = &self.event_grid else {
                    return out;
                };
                let mut start = 0;
                while start < events.len() {
                    let mut end = start;
                    let mut size = 2;
                    while end < events.len()
                        && (end == start || size + events[end].1.len() < EVENTGRID_MAX_REQUEST)
                    {
                        size += events[end].1.len() + 1;
                        end += 1;
                    }
                    let bodies: Vec<&str> =
                        events[start..end].iter().map(|(_, b)| b.as_str()).collect();
                    let a = eg.send(&bodies).await;
                    let stop = !matches!(a, Answer::Delivered(_));
                    out.extend(std::iter::repeat_n(a, end - start));
                    if stop {
                        break;
                    }
                    start = end;
                }
            }
        }
        out
    }

    /// Reaches the sink without sending an event: the queue's properties, an empty batch to
    /// Event Grid (a 401 or 403 says the key or role is wrong), a HEAD to the webhook (any
    /// answer means it is reachable). `Err` says what to fix.
    pub async fn reach(&self, sink: Sink) -> Result<String, String> {
        match sink {
            Sink::Queue => {
                let q = self.queue.as_ref().ok_or("not configured")?;
                match q.client.get_properties(None).await {
                    Ok(_) => Ok("reachable".into()),
                    Err(e) if e.http_status() == Some(azure_core::http::StatusCode::NotFound) => {
                        Ok("does not exist yet (created with the first event)".into())
                    }
                    Err(e) => Err(StorageError::from_azure("queue", &e).to_string()),
                }
            }
            Sink::EventGrid => {
                let eg = self.event_grid.as_ref().ok_or("not configured")?;
                match eg.send(&[]).await {
                    Answer::Delivered(a) => Ok(format!("reachable, credentials accepted ({a})")),
                    Answer::Refused {
                        status: Some(s @ (401 | 403)),
                        detail,
                        ..
                    } => Err(format!(
                        "HTTP {s}: {detail} — fix CVCHAIN_EVENTGRID_KEY, or give the identity the EventGrid Data Sender role on the topic"
                    )),
                    Answer::Refused {
                        status: Some(s), ..
                    } if s < 500 && s != 404 => Ok(format!(
                        "reachable, credentials accepted (HTTP {s} for an empty batch)"
                    )),
                    Answer::Refused { detail, .. } => {
                        Err(format!("{detail} — check CVCHAIN_EVENTGRID_ENDPOINT"))
                    }
                }
            }
            Sink::Webhook => {
                let w = self.webhook.as_ref().ok_or("not configured")?;
                let mut req = Request::new(w.url.clone(), Method::Head);
                match w.http.send(&mut req).await {
                    Ok(rsp) => Ok(format!(
                        "reachable (HEAD answered HTTP {})",
                        u16::from(rsp.status())
                    )),
                    Err(detail) => Err(format!("{detail} — check CVCHAIN_WEBHOOK_URL")),
                }
            }
        }
    }
}

/// The Storage queue sink: one event per message.
pub struct QueueSink {
    client: QueueClient,
    pub name: String,
}

impl QueueSink {
    async fn send(&self, body: &str) -> Answer {
        match send_text(&self.client, body).await {
            Ok(_) => Answer::Delivered("on the queue".into()),
            Err(e) => Answer::Refused {
                status: match &e {
                    StorageError::Service { status, .. } => Some(*status),
                    StorageError::Denied { status, .. } => Some(*status),
                    _ => None,
                },
                detail: e.to_string(),
                retry_after: None,
            },
        }
    }
}

/// An HTTP client for one sink: no retries of its own (the outbox retries), one timeout per
/// attempt.
struct Http {
    pipeline: Pipeline,
    timeout: Duration,
}

impl Http {
    fn new(transport: Transport, per_try: Vec<Arc<dyn Policy>>, timeout: Duration) -> Self {
        let options = ClientOptions {
            retry: RetryOptions::none(),
            transport: Some(transport),
            ..Default::default()
        };
        Self {
            pipeline: Pipeline::new(
                Some(crate::USER_AGENT_NAME),
                Some(env!("CARGO_PKG_VERSION")),
                options,
                Vec::new(),
                per_try,
                None,
            ),
            timeout,
        }
    }

    async fn send(&self, req: &mut Request) -> Result<RawResponse, String> {
        let ctx = Context::new();
        let send = self.pipeline.send(
            &ctx,
            req,
            Some(PipelineSendOptions {
                skip_checks: true,
                ..Default::default()
            }),
        );
        match tokio::time::timeout(self.timeout, send).await {
            Err(_) => Err(format!("no answer within {} s", self.timeout.as_secs())),
            Ok(Err(e)) => Err(cvchain_core::redact::redact(&error_chain(&e))),
            Ok(Ok(rsp)) => Ok(rsp),
        }
    }

    /// Sends and classifies: 2xx delivered, anything else refused with what the sink said.
    async fn answer(&self, req: &mut Request, secrets: &[&str]) -> Answer {
        match self.send(req).await {
            Err(detail) => Answer::Refused {
                status: None,
                detail: scrub(&detail, secrets),
                retry_after: None,
            },
            Ok(rsp) => {
                let status = u16::from(rsp.status());
                if (200..300).contains(&status) {
                    return Answer::Delivered(format!("HTTP {status}"));
                }
                let body = String::from_utf8_lossy(rsp.body().as_ref());
                let excerpt: String = body.chars().take(200).collect();
                let excerpt = excerpt.split_whitespace().collect::<Vec<_>>().join(" ");
                Answer::Refused {
                    status: Some(status),
                    detail: scrub(
                        &if excerpt.is_empty() {
                            format!("HTTP {status}")
                        } else {
                            format!("HTTP {status}: {excerpt}")
                        },
                        secrets,
                    ),
                    retry_after: retry_after(&rsp),
                }
            }
        }
    }
}

/// Redacts, and removes the sink's own secrets wherever an answer echoes them.
fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut t = cvchain_core::redact::redact(text);
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        t = t.replace(s, cvchain_core::redact::REDACTED);
    }
    t
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(rsp: &RawResponse) -> Option<Duration> {
    let v = rsp
        .headers()
        .get_optional_string(&HeaderName::from_static("retry-after"))?;
    if let Ok(secs) = v.trim().parse::<f64>() {
        return (secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = azure_core::time::parse_rfc7231(v.trim()).ok()?;
    Some(Duration::try_from(at - azure_core::time::OffsetDateTime::now_utc()).unwrap_or_default())
}

/// An Event Grid topic (CloudEvents schema): a batch per request.
pub struct EventGridSink {
    pub endpoint: Url,
    key: Option<Secret>,
    http: Http,
}

impl EventGridSink {
    async fn send(&self, bodies: &[&str]) -> Answer {
        let mut req = Request::new(self.endpoint.clone(), Method::Post);
        req.insert_header("content-type", BATCH_CONTENT_TYPE);
        if let Some(k) = &self.key {
            req.insert_header("aeg-sas-key", k.secret().to_owned());
        }
        req.set_body(format!("[{}]", bodies.join(",")).into_bytes());
        let secrets: Vec<&str> = self.key.iter().map(|k| k.secret()).collect();
        self.http.answer(&mut req, &secrets).await
    }
}

/// A Standard Webhooks endpoint: one event per request, signed.
pub struct WebhookSink {
    pub url: Url,
    /// Base64 of the HMAC key.
    key: Secret,
    http: Http,
}

impl WebhookSink {
    async fn send(&self, id: &str, body: &str) -> Answer {
        let key = base64::engine::general_purpose::STANDARD
            .decode(self.key.secret())
            .unwrap_or_default();
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut req = Request::new(self.url.clone(), Method::Post);
        req.insert_header("content-type", CONTENT_TYPE);
        req.insert_header("webhook-id", id.to_owned());
        req.insert_header("webhook-timestamp", timestamp.to_string());
        req.insert_header(
            "webhook-signature",
            webhook::sign(&key, id, timestamp, body.as_bytes()),
        );
        req.set_body(body.as_bytes().to_vec());
        let query = self.url.query().unwrap_or_default().to_owned();
        let secrets = [self.key.secret(), query.as_str()];
        self.http.answer(&mut req, &secrets).await
    }
}
