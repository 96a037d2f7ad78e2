//! Telemetry end to end: two `cvchain serve` instances export over OTLP/HTTP to a receiver that
//! decodes what they send with OpenTelemetry's own protobuf definitions (the `opentelemetry-proto`
//! Python package, pinned, `scripts/python-otlp`), while a training's chain runs through both
//! (every notification to both at once and again, as `tests/events.rs` delivers them), Custom
//! Vision throttles the first delivery of the training, and the webhook receiver (the Standard
//! Webhooks library and the CloudEvents SDK, `scripts/python-events`) reads every event.
//!
//! It finds one trace, whose id is derived from the project and iteration, across the
//! TrainingCompleted and every ExportCompleted on both instances; storage and Custom Vision
//! client spans in it (the throttled attempt and its retries among them); each event's delivery
//! in it; the same trace in every event's `traceparent` and in the webhook's header; the metrics
//! docs/observability.md lists; and no secret anywhere in what was exported. The other tests:
//! nothing set runs nothing, a collector that never answers stalls nothing, and Application
//! Insights gets the chain as one operation.

use cvchain_azure::storage::clients::StorageClients;
use cvchain_standin::{COMPACT_DOMAIN, Faults, Metrics, Standin};
use cvchain_testkit::{Azurite, Handler, StandinApi, repo_root, unique};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

const KEY: &str = "telemetry-test-key-77aa";
const SECRET: &str = "whsec_c2VjcmV0LWZvci1jdmNoYWluLWV2ZW50cy10ZXN0czE=";
const CHAIN: &str = "ONNX, TensorFlow:TensorFlowLite";

fn venv_python(script: &str) -> String {
    let out = Command::new(repo_root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .expect("the venv script runs");
    assert!(out.status.success(), "{script} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A Python server started with `args`, killed on drop; it prints `listening` when ready.
struct PyServer {
    child: Child,
    out: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PyServer {
    fn start(python: &str, script: &str, args: impl Fn(u16, &str) -> Vec<String>) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("received.jsonl");
        let port = cvchain_testkit::free_port();
        let mut child = Command::new(python)
            .arg(repo_root().join(script))
            .args(args(port, out.to_str().unwrap()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        Self {
            child,
            out,
            port,
            _dir: dir,
        }
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn post(handler: &Handler, text: &str, id: &str, n: u32) -> u16 {
    let body = cvchain_testkit::host_envelope(text, id, n);
    let rsp = reqwest::Client::new()
        .post(handler.url("/CustomVisionNotification"))
        .header("content-type", "application/json")
        .header("x-azure-functions-invocationid", Uuid::new_v4().to_string())
        .body(body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    rsp.status().as_u16()
}

/// How many of `pid`'s threads are the OpenTelemetry SDK's (its span batcher, its metric
/// reader): none unless something is exported.
fn otel_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|name| name.starts_with("OpenTelemetry"))
        })
        .count()
}

/// The trace id an event's `traceparent` names.
fn trace_of(traceparent: &str) -> String {
    let tp = cvchain_core::trace::TraceParent::parse(traceparent)
        .unwrap_or_else(|| panic!("not a W3C traceparent: {traceparent}"));
    tp.trace_id.to_string()
}

fn attr<'a>(r: &'a Value, k: &str) -> &'a Value {
    &r["attributes"][k]
}

/// Azurite, the stand-in, a project, the OTLP and webhook receivers, and the settings of a
/// `serve` that exports where `otel` says (given the OTLP receiver's port). With `tls`, the
/// OTLP receiver speaks https with a test CA that `serve` trusts (`SSL_CERT_FILE`).
struct Ground {
    _azurite: Azurite,
    standin: Standin,
    clients: StorageClients,
    api: StandinApi,
    source: String,
    queue: String,
    project: Uuid,
    env: Vec<(&'static str, String)>,
    otlp: PyServer,
    webhook: PyServer,
    _ca: Option<cvchain_testkit::TestCa>,
}

async fn ground(tls: bool, otel: impl Fn(u16) -> Vec<(&'static str, String)>) -> Ground {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let standin = Standin::start(cvchain_testkit::standin_config(&clients, KEY, 50))
        .await
        .unwrap();
    standin.set_faults(Faults {
        next_metrics: vec![Metrics {
            precision: 0.9,
            recall: 0.85,
            average_precision: 0.88,
        }],
        ..Default::default()
    });
    let ca = tls.then(cvchain_testkit::TestCa::generate);
    let otlp = PyServer::start(
        &venv_python("scripts/python-otlp"),
        "tests/python/otlp_receiver.py",
        |port, out| {
            let mut args = vec!["serve".into(), port.to_string(), out.into()];
            if let Some(ca) = &ca {
                args.push(ca.cert.display().to_string());
                args.push(ca.key.display().to_string());
            }
            args
        },
    );
    let webhook = PyServer::start(
        &venv_python("scripts/python-events"),
        "tests/python/events_receiver.py",
        |port, out| vec!["serve".into(), port.to_string(), SECRET.into(), out.into()],
    );
    let queue = unique("cvq");
    let source = unique("cvsource");
    let table = unique("Telemetry");
    let backup = azurite.container_url("cvbackups");
    let mut env = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", queue.clone()),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", CHAIN.into()),
        ("CVCHAIN_BACKUP_CONTAINER", backup.clone()),
        ("CVCHAIN_GATE", "map>=0.80".into()),
        ("CVCHAIN_MAX_DEQUEUE", "100".into()),
        (
            "CVCHAIN_WEBHOOK_URL",
            format!(
                "http://127.0.0.1:{}/hooks?code=function-key-9f8e",
                webhook.port
            ),
        ),
        ("CVCHAIN_WEBHOOK_SECRET", SECRET.into()),
        ("CVCHAIN_EVENTS_RETRY_SECONDS", "1".into()),
    ];
    env.extend(otel(otlp.port));
    if let Some(ca) = &ca {
        env.push(("SSL_CERT_FILE", ca.ca_cert.display().to_string()));
    }
    cvchain_testkit::standin::create_queue(&clients, &source).await;
    cvchain_testkit::standin::create_container(&clients, "cvbackups").await;
    let api = StandinApi::with_storage(&standin.endpoint(), KEY, &clients);
    let queue_uri = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{source}",
        azurite.queue_port
    );
    let project = api
        .create_project(&[
            ("name", "Widgets"),
            ("domainId", COMPACT_DOMAIN),
            ("notificationQueueUri", &queue_uri),
            ("exportModelContainerUri", &backup),
        ])
        .await;
    Ground {
        _azurite: azurite,
        standin,
        clients,
        api,
        source,
        queue,
        project,
        env,
        otlp,
        webhook,
        _ca: ca,
    }
}

impl Ground {
    /// Delivers every notification to both handlers (at once, then again) until the chain's
    /// completion reached the webhook; with `throttle`, the training's first delivery meets a
    /// Custom Vision that throttles every call. Returns how many messages were delivered.
    async fn run_chain(&self, a: &Handler, b: &Handler, throttle: bool) -> usize {
        let until = Instant::now() + Duration::from_secs(120);
        let mut throttled = !throttle;
        let mut delivered = 0;
        loop {
            for (text, id) in cvchain_testkit::take_messages(&self.clients, &self.source).await {
                if !throttled && text.contains("TrainingCompleted") {
                    // Every call refused with `Retry-After: 0`; the resource's own limit off
                    // meanwhile, so the refusals are all injected ones (what is traced here).
                    self.standin.set_rate_limit(None);
                    self.standin.set_faults(Faults {
                        failure_rate: 1.0,
                        throttle_share: Some(1.0),
                        retry_after_seconds: 0,
                        ..Default::default()
                    });
                    let code = post(a, &text, &id, 1).await;
                    assert_eq!(
                        code, 500,
                        "a throttled Custom Vision asks the host to retry"
                    );
                    self.standin.set_faults(Faults::default());
                    self.standin
                        .set_rate_limit(Some(cvchain_standin::RATE_LIMIT));
                    throttled = true;
                }
                cvchain_testkit::deliver_to_both(a, b, &text, &id).await;
                delivered += 1;
            }
            if self
                .webhook
                .records()
                .iter()
                .any(|r| r["type"] == "io.cvchain.chain.completed")
            {
                return delivered;
            }
            assert!(
                Instant::now() < until,
                "the chain did not complete: {delivered} delivered\n{}\n---\n{}",
                a.stderr(),
                b.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_chain_across_two_instances_with_client_spans_events_and_metrics() {
    use cvchain_testkit::chat::Receiver as Chat;
    let (teams, slack) = (Chat::teams().await, Chat::slack().await);
    // Nothing goes out on a schedule while the test runs: the metrics, and the spans that did not
    // fill a batch, arrive because SIGTERM flushes them.
    let mut g = ground(false, |port| {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ),
            ("OTEL_METRIC_EXPORT_INTERVAL", "600000".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000".into()),
        ]
    })
    .await;
    // The chat sinks too: a Slack webhook's key is the last part of its URL's path.
    g.env.push(("CVCHAIN_TEAMS_WEBHOOK_URL", teams.url.clone()));
    g.env.push(("CVCHAIN_SLACK_WEBHOOK_URL", slack.url.clone()));
    let (project, queue) = (g.project, g.queue.clone());
    let (otlp, webhook) = (&g.otlp, &g.webhook);
    let mut a = Handler::start(&g.env);
    let mut b = Handler::start(&g.env);
    // Exporting: the SDK's span batcher and metric reader run.
    assert_eq!(otel_threads(a.pid()), 2);
    let iteration = g.api.train(project).await;
    // The training's first delivery meets a Custom Vision that throttles every call: retried
    // (and traced) until the client gives up, and the host is asked to deliver it again.
    let delivered = g.run_chain(&a, &b, true).await;
    assert!(delivered >= 4, "{delivered}");
    let until = Instant::now() + Duration::from_secs(60);
    while teams.messages().is_empty() || slack.messages().is_empty() {
        assert!(Instant::now() < until, "the chat sinks got nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The timer's round over every project measures the outbox's age.
    let timer = serde_json::json!({
        "Data": {"timer": {"Schedule": {"AdjustForDST": true}, "IsPastDue": false}},
        "Metadata": {"sys": {"MethodName": "DeliverEvents", "UtcNow": "2026-12-01T10:01:00Z"}}
    });
    let rsp = reqwest::Client::new()
        .post(a.url("/DeliverEvents"))
        .header("content-type", "application/json")
        .body(timer.to_string())
        .send()
        .await
        .unwrap();
    assert!(rsp.status().is_success());
    assert!(
        otlp.records().iter().all(|r| r["signal"] != "metric"),
        "metrics before their interval"
    );
    // SIGTERM: what is left is exported before the handlers exit.
    for h in [&mut a, &mut b] {
        let status = h.signal_and_wait("TERM", Duration::from_secs(30));
        assert!(status.is_some_and(|s| s.success()), "{}", h.stderr());
    }

    if let Ok(dump) = std::env::var("CVCHAIN_TEST_DUMP") {
        std::fs::write(dump, otlp.text()).unwrap();
    }
    let records = otlp.records();
    let errors: Vec<&Value> = records.iter().filter(|r| r["signal"] == "error").collect();
    assert!(
        errors.is_empty(),
        "the receiver could not decode: {errors:?}"
    );
    let spans: Vec<&Value> = records.iter().filter(|r| r["signal"] == "span").collect();
    let points: Vec<&Value> = records.iter().filter(|r| r["signal"] == "metric").collect();
    let chain = cvchain_core::trace::chain_trace_id(project, iteration).to_string();

    // Every span says who sent it.
    for s in &spans {
        assert_eq!(s["resource"]["service.name"], "cvchain", "{s}");
    }

    // One trace: the training and every export, on both instances.
    let invocations: Vec<&&Value> = spans
        .iter()
        .filter(|s| s["name"] == "CustomVisionNotification")
        .filter(|s| attr(s, "cvchain.iteration.id") == iteration.to_string().as_str())
        .collect();
    for s in &invocations {
        assert_eq!(s["traceId"], chain.as_str(), "{s}");
        assert_eq!(s["kind"], "SPAN_KIND_CONSUMER");
        assert_eq!(attr(s, "faas.trigger"), "pubsub");
        assert_eq!(attr(s, "messaging.destination.name"), queue.as_str());
        assert_eq!(attr(s, "cvchain.project.id"), project.to_string().as_str());
    }
    // The host's invocation id, where it sent one (the throttled delivery did).
    assert!(
        invocations
            .iter()
            .any(|s| attr(s, "faas.invocation_id").is_string())
    );
    let kinds: BTreeSet<&str> = invocations
        .iter()
        .map(|s| attr(s, "cvchain.notification.kind").as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ExportCompleted", "TrainingCompleted"]),
        "{kinds:?}"
    );
    let exports = invocations
        .iter()
        .filter(|s| attr(s, "cvchain.notification.kind") == "ExportCompleted")
        .map(|s| attr(s, "messaging.message.id").as_str().unwrap())
        .collect::<BTreeSet<_>>();
    assert_eq!(exports.len(), 2, "each ExportCompleted joins the trace");
    let outcomes: BTreeSet<&str> = invocations
        .iter()
        .map(|s| attr(s, "cvchain.outcome").as_str().unwrap())
        .collect();
    for o in ["recorded", "duplicate", "failed"] {
        assert!(outcomes.contains(o), "{o} not in {outcomes:?}");
    }
    let instances: BTreeSet<&str> = invocations
        .iter()
        .map(|s| s["resource"]["service.instance.id"].as_str().unwrap())
        .collect();
    assert_eq!(instances.len(), 2, "both instances joined the trace");
    assert!(
        invocations.iter().any(|s| attr(s, "cvchain.decision")
            .as_str()
            .is_some_and(|d| d.contains("export chain: requested ONNX"))),
        "the training's decision is on its span"
    );

    // Client spans in it: storage and Custom Vision, each under a span of the trace.
    let in_chain: Vec<&&Value> = spans
        .iter()
        .filter(|s| s["traceId"] == chain.as_str())
        .collect();
    let ids: BTreeSet<&str> = in_chain
        .iter()
        .map(|s| s["spanId"].as_str().unwrap())
        .collect();
    let clients_of = |service: &str| -> Vec<&&Value> {
        in_chain
            .iter()
            .copied()
            .filter(|s| s["kind"] == "SPAN_KIND_CLIENT" && attr(s, "cvchain.service") == service)
            .collect()
    };
    for service in ["table", "blob", "customvision", "webhook", "teams", "slack"] {
        let found = clients_of(service);
        assert!(!found.is_empty(), "no {service} client span in the trace");
        for s in found {
            assert!(
                ids.contains(s["parentSpanId"].as_str().unwrap()),
                "a {service} span without its parent: {s}"
            );
            let url = attr(s, "url.full").as_str().unwrap();
            assert!(!url.contains('?'), "{url}");
            assert!(attr(s, "http.request.method").is_string());
            assert!(attr(s, "server.address") == "127.0.0.1", "{s}");
            assert!(attr(s, "server.port").is_i64());
        }
    }
    let cv = clients_of("customvision");
    assert!(cv.iter().all(|s| {
        attr(s, "url.full")
            .as_str()
            .unwrap()
            .contains(&format!("/customvision/v3.3/training/projects/{project}"))
    }));
    assert!(
        cv.iter()
            .any(|s| attr(s, "http.response.status_code") == 429),
        "the throttled attempts are spans"
    );
    assert!(
        cv.iter()
            .any(|s| attr(s, "http.request.resend_count").as_i64().unwrap_or(0) >= 1),
        "a retry says which attempt it is"
    );
    assert!(
        cv.iter()
            .any(|s| attr(s, "cvchain.operation") == "ExportIteration"
                && attr(s, "http.response.status_code") == 200)
    );

    // The trace travels with the events: each one's traceparent (read by the CloudEvents SDK)
    // and the webhook's header name the chain's trace, and the span that recorded it.
    let received = webhook.records();
    assert!(received.len() >= 12, "{}", received.len());
    let all_ids: BTreeSet<&str> = spans
        .iter()
        .map(|s| s["spanId"].as_str().unwrap())
        .collect();
    for r in &received {
        assert_eq!(r["ok"], true, "{r}");
        let tp = r["traceparent"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert_eq!(trace_of(tp), chain, "{r}");
        let parent = cvchain_core::trace::TraceParent::parse(tp).unwrap();
        assert!(
            all_ids.contains(parent.parent_id.to_string().as_str()),
            "the event's parent span was exported: {r}"
        );
        let header = r["traceparentHeader"].as_str().unwrap();
        assert_eq!(trace_of(header), chain);
        // Each event's delivery is a span of the trace.
        let delivery = in_chain
            .iter()
            .find(|s| s["name"] == "send webhook" && *attr(s, "cloudevents.event_id") == r["id"])
            .unwrap_or_else(|| panic!("no delivery span for {r}"));
        assert_eq!(delivery["kind"], "SPAN_KIND_PRODUCER");
        assert_eq!(*attr(delivery, "cloudevents.event_type"), r["type"]);
    }

    // The metrics.
    let metric =
        |name: &str| -> Vec<&&Value> { points.iter().filter(|p| p["name"] == name).collect() };
    // Cumulative points: the last (largest) of each instance and attribute set, added up.
    let sum = |name: &str, filter: &dyn Fn(&Value) -> bool| -> f64 {
        let mut last: std::collections::BTreeMap<(String, String), f64> = Default::default();
        for p in metric(name).iter().filter(|p| filter(p)) {
            let v = p["value"].as_f64().or(p["count"].as_f64()).unwrap_or(0.0);
            let key = (
                p["resource"]["service.instance.id"].to_string(),
                p["attributes"].to_string(),
            );
            let e = last.entry(key).or_insert(0.0);
            *e = e.max(v);
        }
        last.values().sum()
    };
    let with = |k: &'static str, v: &'static str| move |p: &Value| p["attributes"][k] == v;
    assert!(
        sum(
            "faas.invocations",
            &with("cvchain.notification.kind", "TrainingCompleted")
        ) >= 1.0
    );
    assert!(
        sum(
            "faas.invocations",
            &with("cvchain.notification.kind", "ExportCompleted")
        ) >= 1.0
    );
    assert!(sum("faas.invoke_duration", &with("cvchain.outcome", "recorded")) >= 1.0);
    assert!(sum("cvchain.customvision.calls", &|_| true) >= 1.0);
    assert!(sum("cvchain.customvision.throttled", &|_| true) >= 1.0);
    assert!(
        sum(
            "cvchain.storage.requests",
            &with("cvchain.service", "table")
        ) >= 1.0
    );
    assert!(
        sum(
            "http.client.request.duration",
            &with("cvchain.service", "blob")
        ) >= 1.0
    );
    assert!(
        sum(
            "cvchain.gate.verdicts",
            &with("cvchain.gate.verdict", "passed")
        ) >= 1.0
    );
    assert!(sum("cvchain.channel.moves", &with("cvchain.outcome", "moved")) >= 1.0);
    assert!(
        sum(
            "cvchain.event.deliveries",
            &|p| p["attributes"]["cvchain.sink"] == "webhook"
                && p["attributes"]["cvchain.outcome"] == "delivered"
        ) >= 12.0
    );
    assert!(!metric("cvchain.outbox.oldest_pending_age").is_empty());
    assert!(!metric("cvchain.telemetry.dropped").is_empty());
    let instances_of_metrics: BTreeSet<&str> = metric("faas.invocations")
        .iter()
        .map(|p| p["resource"]["service.instance.id"].as_str().unwrap())
        .collect();
    assert_eq!(instances_of_metrics.len(), 2);

    // No secret in any attribute, event or resource: the training key, the account key, the
    // webhook secret, the webhook URL's query and the chat webhooks' keys.
    cvchain_testkit::assert_no_secrets(
        "what was exported",
        &otlp.text(),
        &[
            KEY,
            cvchain_azure::storage::settings::DEV_ACCOUNT_KEY,
            SECRET.trim_start_matches("whsec_"),
            "function-key-9f8e",
            &teams.key,
            &slack.key,
        ],
    );
}

/// Nothing set: no exporter is built and no SDK thread starts, neither at start-up nor by the
/// invocations of a whole chain through two instances; nothing reaches the receiver, and no
/// telemetry line is logged. The events still carry the chain's trace (`tests/events.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_set_builds_no_exporter_and_starts_no_thread() {
    let g = ground(false, |_| Vec::new()).await;
    let a = Handler::start(&g.env);
    let b = Handler::start(&g.env);
    assert_eq!(otel_threads(a.pid()), 0);
    g.api.train(g.project).await;
    g.run_chain(&a, &b, false).await;
    for h in [&a, &b] {
        assert_eq!(otel_threads(h.pid()), 0);
        assert!(!h.stderr().contains("telemetry:"), "{}", h.stderr());
    }
    assert!(g.otlp.records().is_empty());
    let received = g.webhook.records();
    assert!(received.iter().all(|r| r["traceparent"].is_string()));
}

/// A collector that takes connections and never answers: the chain runs as it does without
/// telemetry, the spans that could not be exported are counted in `cvchain.telemetry.dropped`
/// (the metrics go to a receiver that answers), and SIGTERM still exits, its flush bounded,
/// though Application Insights' exporter (pointed at the same hole) keeps retrying for longer
/// than the handler waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_stalls_nothing_and_the_drops_are_counted() {
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    // Accepts every connection and keeps it open, reading and answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hole.incoming() {
            held.push(c);
        }
    });
    let g = ground(false, |port| {
        vec![
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("http://127.0.0.1:{hole_port}/v1/traces"),
            ),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                format!("http://127.0.0.1:{port}/v1/metrics"),
            ),
            (
                "APPLICATIONINSIGHTS_CONNECTION_STRING",
                format!("InstrumentationKey=0;IngestionEndpoint=https://127.0.0.1:{hole_port}/"),
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "300".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ]
    })
    .await;
    let mut a = Handler::start(&g.env);
    let b = Handler::start(&g.env);
    g.api.train(g.project).await;
    let delivered = g.run_chain(&a, &b, false).await;
    assert!(delivered >= 4, "{delivered}");
    let dropped = |g: &Ground| {
        g.otlp
            .records()
            .iter()
            .filter(|r| r["name"] == "cvchain.telemetry.dropped")
            .filter_map(|r| r["value"].as_f64())
            .fold(0.0, f64::max)
    };
    let until = Instant::now() + Duration::from_secs(60);
    while dropped(&g) < 1.0 {
        assert!(
            Instant::now() < until,
            "no dropped span counted:\n{}",
            a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let records = g.otlp.records();
    assert!(records.iter().all(|r| r["signal"] != "span"));
    assert!(records.iter().any(|r| r["name"] == "faas.invocations"));
    let status = a.signal_and_wait("TERM", Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{}", a.stderr());
}

/// Application Insights, when `APPLICATIONINSIGHTS_CONNECTION_STRING` is set: the receiver plays
/// its ingestion endpoint (the connection string's `IngestionEndpoint`) and reads what the
/// exporter posts, as the service would. The chain is one operation (`ai.operation.id`, the
/// trace id derived from the project and iteration) whose requests are the invocations of both
/// instances and whose dependencies are their storage and Custom Vision calls; the metrics come
/// too; no secret is in any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_insights_gets_the_chain_as_one_operation() {
    const IKEY: &str = "00000000-1111-2222-3333-444444444444";
    let g = ground(true, |port| {
        vec![
            (
                "APPLICATIONINSIGHTS_CONNECTION_STRING",
                format!("InstrumentationKey={IKEY};IngestionEndpoint=https://127.0.0.1:{port}/"),
            ),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
        ]
    })
    .await;
    let mut a = Handler::start(&g.env);
    let mut b = Handler::start(&g.env);
    let iteration = g.api.train(g.project).await;
    g.run_chain(&a, &b, false).await;
    for h in [&mut a, &mut b] {
        let status = h.signal_and_wait("TERM", Duration::from_secs(30));
        assert!(status.is_some_and(|s| s.success()), "{}", h.stderr());
    }
    let records = g.otlp.records();
    assert!(
        records.iter().all(|r| r["signal"] != "error"),
        "{records:?}"
    );
    let envelopes: Vec<&Value> = records
        .iter()
        .filter(|r| r["signal"] == "appinsights")
        .map(|r| {
            // An instrumentation key alone: no token without Entra ID.
            assert_eq!(r["path"], "/v2/track");
            assert!(r["authorization"].is_null());
            &r["envelope"]
        })
        .collect();
    let chain = cvchain_core::trace::chain_trace_id(g.project, iteration).to_string();
    let of = |base: &str| -> Vec<&&Value> {
        envelopes
            .iter()
            .filter(|e| e["data"]["baseType"] == base)
            .collect()
    };
    for e in &envelopes {
        assert_eq!(e["iKey"], IKEY);
        assert_eq!(e["tags"]["ai.cloud.role"], "cvchain");
    }
    let requests: Vec<&&Value> = of("RequestData")
        .into_iter()
        .filter(|e| {
            e["data"]["baseData"]["properties"]["cvchain.iteration.id"]
                == iteration.to_string().as_str()
        })
        .collect();
    let kinds: BTreeSet<&str> = requests
        .iter()
        .map(|e| {
            assert_eq!(e["tags"]["ai.operation.id"], chain.as_str(), "{e}");
            assert_eq!(e["data"]["baseData"]["name"], "CustomVisionNotification");
            e["data"]["baseData"]["properties"]["cvchain.notification.kind"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ExportCompleted", "TrainingCompleted"])
    );
    let roles: BTreeSet<&str> = requests
        .iter()
        .map(|e| e["tags"]["ai.cloud.roleInstance"].as_str().unwrap())
        .collect();
    assert_eq!(roles.len(), 2, "both instances' requests");
    let dependencies: Vec<&&Value> = of("RemoteDependencyData")
        .into_iter()
        .filter(|e| e["tags"]["ai.operation.id"] == chain.as_str())
        .collect();
    for service in ["table", "blob", "customvision"] {
        assert!(
            dependencies.iter().any(|e| {
                e["data"]["baseData"]["properties"]["cvchain.service"] == service
                    && e["tags"]["ai.operation.parentId"].is_string()
            }),
            "no {service} dependency in the operation"
        );
    }
    let metrics: BTreeSet<&str> = of("MetricData")
        .iter()
        .flat_map(|e| e["data"]["baseData"]["metrics"].as_array().unwrap())
        .filter_map(|m| m["name"].as_str())
        .collect();
    for name in [
        "faas.invocations",
        "cvchain.customvision.calls",
        "cvchain.storage.requests",
        "cvchain.event.deliveries",
    ] {
        assert!(metrics.contains(name), "{name} not in {metrics:?}");
    }
    cvchain_testkit::assert_no_secrets(
        "what Application Insights got",
        &g.otlp.text(),
        &[
            KEY,
            cvchain_azure::storage::settings::DEV_ACCOUNT_KEY,
            SECRET.trim_start_matches("whsec_"),
            "function-key-9f8e",
        ],
    );
}
