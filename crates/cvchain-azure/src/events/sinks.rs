//! The sinks: a Storage queue in cvchain's account, an Event Grid topic, a Standard Webhooks
//! endpoint. Each send comes back as an [`Answer`] (delivered, or refused with the status and
//! `Retry-After`); the decisions about it are the core's (`events::delivery`).
//!
//! An answer is never read whole: its body is streamed and only its first [`ANSWER_READ`]
//! bytes are read, then the connection is dropped, so a sink answering hundreds of megabytes
//! costs a few kilobytes, on every attempt. No secret reaches an answer or an error: the sink's
//! own secrets (the Event Grid key, the webhook secret and its URL's query) are removed and the
//! text redacted before it is shortened (`redact::excerpt`), and a URL is only ever shown as
//! [`display_url`] shows it.

use super::settings::{EventGridAuth, EventsSettings, display_url, slack_key};
use crate::storage::{StorageError, clients::StorageClients, queue::send_text};
use azure_core::{
    credentials::{Secret, TokenCredential},
    http::{
        ClientOptions, Context, Method, Pipeline, PipelineStreamOptions, Request, RetryOptions,
        Transport, Url,
        headers::{HeaderName, Headers},
        policies::{Policy, auth::BearerTokenAuthorizationPolicy},
    },
};
use azure_storage_queue::QueueClient;
use base64::Engine as _;
use cvchain_core::events::{
    BATCH_CONTENT_TYPE, CONTENT_TYPE, Sink,
    delivery::{Answer, batches},
    webhook,
    wire::{EventGridKind, QueueEncoding},
};
use futures::StreamExt as _;
use std::{sync::Arc, time::Duration};
use tokio::time::Instant;

pub const EVENTGRID_SCOPE: &str = "https://eventgrid.azure.net/.default";
/// One attempt; a sink that hangs costs this much, once per round.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Event Grid takes at most 1 MB per request (either kind: `EventGridKind::limits`).
pub const EVENTGRID_MAX_REQUEST: usize = 1_000_000;
/// Events per Event Grid request: a batch's delivery states are then saved in one table
/// transaction (at most 100 writes), so a batch is delivered and recorded as one.
pub const EVENTGRID_MAX_EVENTS: usize = cvchain_core::events::wire::EVENTS_PER_TRANSACTION;
/// The bytes of an answer's body that are read: its excerpt comes from them. The rest is never
/// read; the connection is closed instead.
pub const ANSWER_READ: usize = 4 * 1024;
/// The characters of an answer kept in a delivery state.
const EXCERPT_CHARS: usize = 200;

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
    pub teams: Option<ChatSink>,
    pub slack: Option<ChatSink>,
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
                encoding: settings.queue_encoding,
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
                    kind: eg.kind(),
                    key,
                    http: Http::new(
                        transport.clone(),
                        per_try,
                        timeout,
                        crate::telemetry::Service::EventGrid,
                    ),
                })
            }
            None => None,
        };
        let webhook = settings.webhook.as_ref().map(|w| WebhookSink {
            url: w.url.clone(),
            key: w.key.clone(),
            http: Http::new(
                transport.clone(),
                Vec::new(),
                timeout,
                crate::telemetry::Service::Webhook,
            ),
        });
        let chat = |sink: Sink, url: &Option<Url>| {
            url.as_ref().map(|u| ChatSink {
                sink,
                url: u.clone(),
                http: Http::new(
                    transport.clone(),
                    Vec::new(),
                    timeout,
                    match sink {
                        Sink::Slack => crate::telemetry::Service::Slack,
                        _ => crate::telemetry::Service::Teams,
                    },
                ),
            })
        };
        Ok(Self {
            queue,
            event_grid,
            webhook,
            teams: chat(Sink::Teams, &settings.teams),
            slack: chat(Sink::Slack, &settings.slack),
        })
    }

    fn chat(&self, sink: Sink) -> Option<&ChatSink> {
        match sink {
            Sink::Teams => self.teams.as_ref(),
            Sink::Slack => self.slack.as_ref(),
            _ => None,
        }
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
        if self.teams.is_some() {
            out.push(Sink::Teams);
        }
        if self.slack.is_some() {
            out.push(Sink::Slack);
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
            Sink::Teams | Sink::Slack => format!(
                "{} {}",
                if sink == Sink::Teams {
                    "Teams"
                } else {
                    "Slack"
                },
                self.chat(sink)
                    .map(|c| display_url(&c.url))
                    .unwrap_or_default()
            ),
        }
    }

    /// Sends one event to one sink (to Event Grid, as a batch of one). `traceparent`: the W3C
    /// trace context the webhook request carries in its `traceparent` header.
    pub async fn send_one(
        &self,
        sink: Sink,
        id: &str,
        body: &str,
        traceparent: Option<&str>,
    ) -> Answer {
        match sink {
            Sink::Queue => match &self.queue {
                Some(q) => q.send(body).await,
                None => not_configured(),
            },
            Sink::Webhook => match &self.webhook {
                Some(w) => w.send(id, body, traceparent).await,
                None => not_configured(),
            },
            Sink::Teams | Sink::Slack => match self.chat(sink) {
                Some(c) => c.send(body).await,
                None => not_configured(),
            },
            Sink::EventGrid => self.send_batch(&[body]).await,
        }
    }

    /// How many events, and bytes, one Event Grid request may carry (its endpoint kind's).
    pub fn eventgrid_request_limits(&self) -> (usize, usize) {
        let l = self
            .event_grid
            .as_ref()
            .map(|e| e.kind)
            .unwrap_or_default()
            .limits();
        (l.max_request_bytes, l.max_events)
    }

    /// Sends events to Event Grid in one request: they are taken or refused together.
    pub async fn send_batch(&self, bodies: &[&str]) -> Answer {
        match &self.event_grid {
            Some(eg) => eg.send(bodies).await,
            None => not_configured(),
        }
    }

    /// Sends events to one sink, in order: one message each to the queue, one request each to
    /// the webhook, as few requests as Event Grid's limits allow. `events` are `(id, body)`.
    /// Returns one answer per event sent; it stops at the first refusal (the rest keep their
    /// place in the order), so fewer answers than events means the rest were not tried.
    pub async fn send(&self, sink: Sink, events: &[(String, String)]) -> Vec<Answer> {
        let mut out = Vec::new();
        let groups = match sink {
            Sink::EventGrid => {
                let sizes: Vec<usize> = events.iter().map(|(_, b)| b.len()).collect();
                let (bytes, count) = self.eventgrid_request_limits();
                batches(&sizes, bytes, count)
            }
            _ => (0..events.len()).map(|i| i..i + 1).collect(),
        };
        for group in groups {
            let answer = match sink {
                Sink::EventGrid => {
                    let bodies: Vec<&str> = events[group.clone()]
                        .iter()
                        .map(|(_, b)| b.as_str())
                        .collect();
                    self.send_batch(&bodies).await
                }
                _ => {
                    let (id, body) = &events[group.start];
                    self.send_one(sink, id, body, None).await
                }
            };
            let stop = !matches!(answer, Answer::Delivered(_));
            out.extend(std::iter::repeat_n(answer, group.len()));
            if stop {
                break;
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
                let kind = eg.kind.explain();
                match eg.send(&[]).await {
                    Answer::Delivered(a) => {
                        Ok(format!("{kind}: reachable, credentials accepted ({a})"))
                    }
                    Answer::Refused {
                        status: Some(s @ (401 | 403)),
                        detail,
                        ..
                    } => Err(format!(
                        "{kind}: HTTP {s}: {detail} — fix CVCHAIN_EVENTGRID_KEY, or give the identity the EventGrid Data Sender role on the topic"
                    )),
                    Answer::Refused {
                        status: Some(s), ..
                    } if s < 500 && s != 404 => Ok(format!(
                        "{kind}: reachable, credentials accepted (HTTP {s} for an empty batch)"
                    )),
                    Answer::Refused { detail, .. } => Err(format!(
                        "{kind}: {detail} — check CVCHAIN_EVENTGRID_ENDPOINT"
                    )),
                }
            }
            Sink::Teams | Sink::Slack => {
                let c = self.chat(sink).ok_or("not configured")?;
                c.reach().await
            }
            Sink::Webhook => {
                let w = self.webhook.as_ref().ok_or("not configured")?;
                let mut req = Request::new(w.url.clone(), Method::Head);
                match w.http.exchange(&mut req, &w.url, &w.secrets()).await {
                    Ok(rsp) => Ok(format!("reachable (HEAD answered HTTP {})", rsp.status)),
                    Err(detail) => Err(format!("{detail} — check CVCHAIN_WEBHOOK_URL")),
                }
            }
        }
    }
}

/// The Storage queue sink: one event per message, encoded as `CVCHAIN_EVENTS_QUEUE_ENCODING`
/// says (base64 by default: what a Functions queue trigger decodes unless told otherwise).
pub struct QueueSink {
    client: QueueClient,
    pub name: String,
    pub encoding: QueueEncoding,
}

impl QueueSink {
    async fn send(&self, body: &str) -> Answer {
        match send_text(&self.client, &self.encoding.encode(body)).await {
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

fn not_configured() -> Answer {
    Answer::Refused {
        status: None,
        detail: "the sink is not configured".into(),
        retry_after: None,
    }
}

/// An HTTP client for one sink: no retries of its own (the outbox retries), one timeout per
/// attempt.
struct Http {
    pipeline: Pipeline,
    timeout: Duration,
}

/// What a sink answered: the status, `Retry-After`, and the start of the body.
struct Exchange {
    status: u16,
    retry_after: Option<Duration>,
    /// At most [`ANSWER_READ`] bytes.
    body: Vec<u8>,
    /// Whether `body` is the whole body.
    complete: bool,
}

impl Http {
    fn new(
        transport: Transport,
        mut per_try: Vec<Arc<dyn Policy>>,
        timeout: Duration,
        service: crate::telemetry::Service,
    ) -> Self {
        let spans = match service {
            // A Slack webhook's key is the last part of its path.
            crate::telemetry::Service::Slack => {
                crate::telemetry::ClientSpanPolicy::shared_shown(service, display_url)
            }
            _ => crate::telemetry::ClientSpanPolicy::shared(service),
        };
        per_try.insert(0, spans);
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

    /// Sends `req` to `url` and reads the answer's head and at most [`ANSWER_READ`] bytes of
    /// its body, all within the timeout; then the body is dropped, which closes the connection
    /// when more was coming. `Err` says why there was no answer, cleaned of `secrets` and with
    /// the URL as [`display_url`] shows it.
    async fn exchange(
        &self,
        req: &mut Request,
        url: &Url,
        secrets: &[&str],
    ) -> Result<Exchange, String> {
        let deadline = Instant::now() + self.timeout;
        let ctx = Context::new();
        // `stream`, not `send`: `send` buffers the whole body before it returns.
        let sent = self.pipeline.stream(
            &ctx,
            req,
            Some(PipelineStreamOptions {
                skip_checks: true,
                ..Default::default()
            }),
        );
        let rsp = match tokio::time::timeout_at(deadline, sent).await {
            Err(_) => return Err(format!("no answer within {} s", self.timeout.as_secs())),
            Ok(Err(e)) => return Err(clean_error(&error_chain(&e), url, secrets)),
            Ok(Ok(rsp)) => rsp,
        };
        let (status, headers, mut stream) = rsp.deconstruct();
        let mut body = Vec::new();
        let mut complete = false;
        while body.len() < ANSWER_READ {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(None) => {
                    complete = true;
                    break;
                }
                Ok(Some(Ok(chunk))) => {
                    let room = ANSWER_READ - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                // A body that breaks off or takes too long: what was read is the answer.
                Ok(Some(Err(_))) | Err(_) => break,
            }
        }
        drop(stream);
        Ok(Exchange {
            status: u16::from(status),
            retry_after: retry_after(&headers),
            body,
            complete,
        })
    }

    /// Sends and classifies: 2xx delivered, anything else refused with what the sink said.
    async fn answer(&self, req: &mut Request, url: &Url, secrets: &[&str]) -> Answer {
        match self.exchange(req, url, secrets).await {
            Err(detail) => Answer::Refused {
                status: None,
                detail,
                retry_after: None,
            },
            Ok(rsp) if (200..300).contains(&rsp.status) => {
                Answer::Delivered(format!("HTTP {}", rsp.status))
            }
            Ok(rsp) => {
                let text = String::from_utf8_lossy(&rsp.body);
                let excerpt =
                    cvchain_core::redact::excerpt(&text, !rsp.complete, secrets, EXCERPT_CHARS);
                Answer::Refused {
                    status: Some(rsp.status),
                    detail: if excerpt.is_empty() {
                        format!("HTTP {}", rsp.status)
                    } else {
                        format!("HTTP {}: {excerpt}", rsp.status)
                    },
                    retry_after: rsp.retry_after,
                }
            }
        }
    }
}

/// An HTTP client's error, fit to show: the URL as [`display_url`] shows it (the client's
/// errors quote it whole, query and all), the sink's secrets removed, redacted, bounded.
fn clean_error(text: &str, url: &Url, secrets: &[&str]) -> String {
    let text = text.replace(url.as_str(), &display_url(url));
    cvchain_core::redact::excerpt(&text, false, secrets, 400)
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
fn retry_after(headers: &Headers) -> Option<Duration> {
    let v = headers.get_optional_string(&HeaderName::from_static("retry-after"))?;
    if let Ok(secs) = v.trim().parse::<f64>() {
        return (secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = azure_core::time::parse_rfc7231(v.trim()).ok()?;
    Some(Duration::try_from(at - azure_core::time::OffsetDateTime::now_utc()).unwrap_or_default())
}

/// An Event Grid topic (CloudEvents schema): a batch per request, authenticated as its
/// endpoint kind asks.
pub struct EventGridSink {
    pub endpoint: Url,
    pub kind: EventGridKind,
    key: Option<Secret>,
    http: Http,
}

impl EventGridSink {
    async fn send(&self, bodies: &[&str]) -> Answer {
        let mut req = Request::new(self.endpoint.clone(), Method::Post);
        req.insert_header("content-type", BATCH_CONTENT_TYPE);
        if let Some(k) = &self.key {
            let (name, value) = self.kind.key_header(k.secret());
            req.insert_header(name, value);
        }
        req.set_body(format!("[{}]", bodies.join(",")).into_bytes());
        let secrets: Vec<&str> = self.key.iter().map(|k| k.secret()).collect();
        self.http.answer(&mut req, &self.endpoint, &secrets).await
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
    async fn send(&self, id: &str, body: &str, traceparent: Option<&str>) -> Answer {
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
        if let Some(tp) = traceparent {
            req.insert_header("traceparent", tp.to_owned());
        }
        req.set_body(body.as_bytes().to_vec());
        self.http.answer(&mut req, &self.url, &self.secrets()).await
    }

    /// What no answer or error may show: the secret, and the URL's query (a receiver's
    /// `?code=` key).
    fn secrets(&self) -> Vec<&str> {
        let mut out = vec![self.key.secret()];
        out.extend(self.url.query().filter(|q| !q.is_empty()));
        out
    }
}

/// A chat channel's webhook (Teams Workflows, or a Slack incoming webhook): one message per
/// event, `application/json`. Its URL is its key: the query (Teams's `sig=`) and a Slack path's
/// key are never shown or kept.
pub struct ChatSink {
    pub sink: Sink,
    pub url: Url,
    http: Http,
}

impl ChatSink {
    async fn send(&self, body: &str) -> Answer {
        let mut req = Request::new(self.url.clone(), Method::Post);
        req.insert_header("content-type", "application/json");
        req.set_body(body.as_bytes().to_vec());
        self.http.answer(&mut req, &self.url, &self.secrets()).await
    }

    fn setting(&self) -> &'static str {
        match self.sink {
            Sink::Slack => super::settings::SLACK_URL_SETTING,
            _ => super::settings::TEAMS_URL_SETTING,
        }
    }

    /// Reaches the webhook without posting a message: to Teams a `HEAD`; to Slack an empty
    /// payload, which it refuses (400 `no_text` or `invalid_payload`) when the URL is good, and
    /// answers 403, 404 or 410 when the URL or its channel is not.
    async fn reach(&self) -> Result<String, String> {
        let fix = format!("check {}", self.setting());
        let mut req = match self.sink {
            Sink::Slack => {
                let mut r = Request::new(self.url.clone(), Method::Post);
                r.insert_header("content-type", "application/json");
                r.set_body(b"{}".to_vec());
                r
            }
            _ => Request::new(self.url.clone(), Method::Head),
        };
        match self
            .http
            .exchange(&mut req, &self.url, &self.secrets())
            .await
        {
            Err(detail) => Err(format!("{detail} — {fix}")),
            Ok(rsp) if matches!(rsp.status, 401 | 403 | 404 | 410) || rsp.status >= 500 => {
                let text = String::from_utf8_lossy(&rsp.body);
                let excerpt = cvchain_core::redact::excerpt(
                    &text,
                    !rsp.complete,
                    &self.secrets(),
                    EXCERPT_CHARS,
                );
                Err(format!("HTTP {}: {excerpt} — {fix}", rsp.status))
            }
            Ok(rsp) => Ok(format!(
                "reachable, URL accepted ({} answered HTTP {}; no message posted)",
                if self.sink == Sink::Slack {
                    "an empty payload"
                } else {
                    "HEAD"
                },
                rsp.status
            )),
        }
    }

    /// What no answer or error may show: the URL's query, and a Slack path's key.
    fn secrets(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .url
            .query()
            .filter(|q| !q.is_empty())
            .into_iter()
            .collect();
        out.extend(slack_key(&self.url));
        out
    }
}
