//! Outbound events end to end (Azurite, the stand-in, `cvchain worker` and `cvchain serve`): a
//! training's chain tells every sink what happened, in order, signed; checked by what is not
//! cvchain's own code: the Standard Webhooks library verifies every webhook and the CloudEvents
//! SDK parses every event (Python, pinned, `scripts/python-events`), and a local Event Grid
//! topic checks what the service checks (`cvchain_testkit::eventgrid`).
//!
//! - one chain: the twelve events, in order, to the queue, the webhook and Event Grid;
//! - every notification delivered three times, two of them at once to two instances: each event
//!   id once per sink;
//! - the webhook receiver down while the chain runs: the queue gets everything meanwhile, Event
//!   Grid answering 400 records each event as failed for good, and once the receiver is up every
//!   event arrives, in order, none lost; then `events test`, `events replay` and `check`;
//! - delivery under load: two instances and a slow receiver (each event once, in order, one
//!   request at a time), a crash mid-round (at most the event in flight twice), a round that
//!   loses its claim (it stops), one slow project among others (the others are not held up);
//! - answers read only in part (a 400 MB error body), never keeping part of a secret, and no
//!   command showing the webhook URL's query;
//! - hostile names: every event any sink gets is a CloudEvent the SDK reads.

use cvchain_azure::storage::{clients::StorageClients, table::StoredEntity};
use cvchain_standin::{COMPACT_DOMAIN, Faults, Metrics, Standin};
use cvchain_testkit::{Azurite, EventGridTopic, Handler, StandinApi, TopicAuth, repo_root, unique};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

const KEY: &str = "events-test-key-5e1d";
const CHAIN: &str = "ONNX, TensorFlow:TensorFlowLite";
/// A Standard Webhooks secret (whsec_ and base64 of 32 bytes).
const SECRET: &str = "whsec_c2VjcmV0LWZvci1jdmNoYWluLWV2ZW50cy10ZXN0czE=";
const TOPIC_KEY: &str = "topic-key-Zm9vYmFyYmF6cXV4";

/// What one training's chain tells, in order (the platform where the event has one; the
/// pointer's move has none). The chain runs before the channels move: each notification
/// requests the next export, then moves the channels.
const EXPECTED: [(&str, &str); 12] = [
    ("io.cvchain.training.completed", ""),
    ("io.cvchain.gate.evaluated", ""),
    ("io.cvchain.export.requested", "ONNX"),
    ("io.cvchain.channel.moved", ""),
    ("io.cvchain.model.released", "ONNX"),
    ("io.cvchain.export.requested", "TensorFlow"),
    ("io.cvchain.channel.moved", "ONNX"),
    ("io.cvchain.channel.moved", "ONNX"),
    ("io.cvchain.model.released", "TensorFlow"),
    ("io.cvchain.channel.moved", "TensorFlow"),
    ("io.cvchain.channel.moved", "TensorFlow"),
    ("io.cvchain.chain.completed", ""),
];

/// The venv's python, installed (once) by the script `.ci/run` runs.
fn python() -> String {
    let out = Command::new(repo_root().join("scripts/python-events"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/python-events runs");
    assert!(out.status.success(), "scripts/python-events failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The Python receiver: Standard Webhooks verification and the CloudEvents SDK.
struct Receiver {
    child: Option<Child>,
    port: u16,
    out: PathBuf,
    python: String,
    /// Seconds each request (each whose body holds the text, when given) waits for its answer.
    delay: Option<(f64, Option<String>)>,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn new(python: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            child: None,
            port: cvchain_testkit::free_port(),
            out: dir.path().join("received.jsonl"),
            python: python.to_owned(),
            delay: None,
            _dir: dir,
        }
    }

    /// A receiver that takes `seconds` to answer each request whose body holds `only` (each
    /// request, when `None`).
    fn slow(python: &str, seconds: f64, only: Option<&str>) -> Self {
        let mut r = Self::new(python);
        r.delay = Some((seconds, only.map(str::to_owned)));
        r
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/cvchain", self.port)
    }

    fn start(&mut self) {
        use std::io::BufRead;
        let mut child = Command::new(&self.python)
            .arg(repo_root().join("tests/python/events_receiver.py"))
            .args(["serve", &self.port.to_string(), SECRET])
            .arg(&self.out)
            .args(
                self.delay
                    .iter()
                    .flat_map(|(secs, only)| std::iter::once(secs.to_string()).chain(only.clone())),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        self.child = Some(child);
    }

    /// Every request received, as the receiver recorded it.
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Parses event texts with the CloudEvents SDK; returns the attributes it read.
fn parse_with_sdk(python: &str, texts: &[String]) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new(python)
        .arg(repo_root().join("tests/python/events_receiver.py"))
        .arg("parse")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(texts).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK refused an event: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct World {
    _azurite: Azurite,
    _standin: Standin,
    clients: StorageClients,
    api: StandinApi,
    table: String,
    /// The queue Custom Vision writes notifications to.
    source: String,
    events_queue: String,
    project: Uuid,
    env: Vec<(&'static str, String)>,
    python: String,
    receiver: Receiver,
    topic: EventGridTopic,
    handlers: Vec<Handler>,
    /// Messages taken from the events queue so far.
    queued: Vec<String>,
}

/// `worker_reads_source`: the project notifies the worker's queue directly; otherwise the test
/// takes the notifications and delivers them itself.
async fn world(worker_reads_source: bool) -> World {
    world_named(worker_reads_source, "Widgets").await
}

/// As [`world`], with a project of this name.
async fn world_named(worker_reads_source: bool, name: &str) -> World {
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
    let python = python();
    let receiver = Receiver::new(&python);
    let topic = EventGridTopic::start(TopicAuth::Key(TOPIC_KEY.into())).await;
    let queue = unique("cvq");
    let source = if worker_reads_source {
        queue.clone()
    } else {
        unique("cvsource")
    };
    let table = unique("Events");
    let events_queue = unique("cvevents");
    let backup = azurite.container_url("cvbackups");
    let env = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", queue),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", CHAIN.into()),
        ("CVCHAIN_BACKUP_CONTAINER", backup.clone()),
        ("CVCHAIN_GATE", "map>=0.80".into()),
        ("CVCHAIN_MAX_DEQUEUE", "100".into()),
        ("CVCHAIN_WORKER_RETRY_SECONDS", "1".into()),
        ("CVCHAIN_WORKER_MAX_POLL_SECONDS", "1".into()),
        ("CVCHAIN_EVENTS_QUEUE", events_queue.clone()),
        ("CVCHAIN_WEBHOOK_URL", receiver.url()),
        ("CVCHAIN_WEBHOOK_SECRET", SECRET.into()),
        ("CVCHAIN_EVENTGRID_ENDPOINT", topic.endpoint.clone()),
        ("CVCHAIN_EVENTGRID_KEY", TOPIC_KEY.into()),
        ("CVCHAIN_EVENTS_RETRY_SECONDS", "1".into()),
        ("CVCHAIN_EVENTS_DELIVER_SECONDS", "1".into()),
    ];
    cvchain_testkit::standin::create_queue(&clients, &source).await;
    cvchain_testkit::standin::create_container(&clients, "cvbackups").await;
    let api = StandinApi::with_storage(&standin.endpoint(), KEY, &clients);
    let queue_uri = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{source}",
        azurite.queue_port
    );
    let project = api
        .create_project(&[
            ("name", name),
            ("domainId", COMPACT_DOMAIN),
            ("notificationQueueUri", &queue_uri),
            ("exportModelContainerUri", &backup),
        ])
        .await;
    World {
        _azurite: azurite,
        _standin: standin,
        clients,
        api,
        table,
        source,
        events_queue,
        project,
        env,
        python,
        receiver,
        topic,
        handlers: Vec::new(),
        queued: Vec::new(),
    }
}

impl World {
    async fn rows(&self) -> Vec<StoredEntity> {
        self.clients
            .table(&self.table)
            .unwrap()
            .query(None, 10_000)
            .await
            .unwrap_or_default()
    }

    /// The outbox rows, in the project's order.
    async fn outbox(&self) -> Vec<StoredEntity> {
        let mut rows: Vec<StoredEntity> = self
            .rows()
            .await
            .into_iter()
            .filter(|r| r.entity["EventType"] == "Outbox")
            .collect();
        rows.sort_by_key(|r| r.entity["Sequence"].as_str().unwrap_or_default().to_owned());
        rows
    }

    async fn outbox_ids(&self) -> Vec<String> {
        self.outbox()
            .await
            .iter()
            .map(|r| r.entity["EventId"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Takes what the events queue holds now, each message's JSON (base64 on the queue: the
    /// default `CVCHAIN_EVENTS_QUEUE_ENCODING`).
    async fn drain_events_queue(&mut self) {
        use base64::Engine as _;
        loop {
            let got = cvchain_testkit::take_messages(&self.clients, &self.events_queue).await;
            if got.is_empty() {
                return;
            }
            self.queued.extend(got.into_iter().map(|(text, _)| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&text)
                    .unwrap_or_else(|e| panic!("not base64 ({e}): {text:.100}"));
                String::from_utf8(bytes).unwrap()
            }));
        }
    }

    fn queued_ids(&self) -> Vec<String> {
        self.queued
            .iter()
            .map(|t| {
                serde_json::from_str::<Value>(t).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    fn webhook_ids(&self) -> Vec<String> {
        self.receiver
            .records()
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn topic_ids(&self) -> Vec<String> {
        self.topic
            .events()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until the chain is complete (its completion is in the outbox) and `done` holds.
    async fn wait(
        &mut self,
        what: &str,
        secs: u64,
        done: impl Fn(&World, &[StoredEntity]) -> bool,
    ) {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            self.drain_events_queue().await;
            let outbox = self.outbox().await;
            if done(self, &outbox) {
                return;
            }
            if Instant::now() > until {
                let logs: Vec<String> = self.handlers.iter().map(|h| h.stderr()).collect();
                panic!(
                    "{what}: not reached in {secs} s; outbox {} rows, webhook {}, queue {}, topic {} (refused {:?})\n{}",
                    outbox.len(),
                    self.receiver.records().len(),
                    self.queued.len(),
                    self.topic.events().len(),
                    self.topic.refused(),
                    logs.join("\n---\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The next notifications of the stand-in's queue, deleted from it.
    async fn take(&self) -> Vec<(String, String)> {
        cvchain_testkit::take_messages(&self.clients, &self.source).await
    }

    /// One message to both `serve` instances at the same moment, then once more to each after
    /// it succeeded: three deliveries or more. A 500 (the other instance holds a claim) is
    /// retried, as the host would.
    async fn deliver(&self, text: &str, id: &str) {
        cvchain_testkit::deliver_to_both(&self.handlers[0], &self.handlers[1], text, id).await;
    }

    fn cvchain(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_cvchain"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap()
    }

    /// No key, secret or signature in the handlers' logs, the rows, or what the sinks got.
    async fn assert_no_secrets(&self) {
        let mut text: Vec<String> = self.handlers.iter().map(|h| h.stderr()).collect();
        text.extend(
            self.rows()
                .await
                .iter()
                .map(|r| Value::Object(r.entity.clone()).to_string()),
        );
        text.extend(self.queued.iter().cloned());
        text.extend(self.receiver.records().iter().map(Value::to_string));
        text.extend(self.topic.events().iter().map(Value::to_string));
        let secret_b64 = SECRET.trim_start_matches("whsec_");
        cvchain_testkit::assert_no_secrets(
            "logs, rows and events",
            &text.join("\n"),
            &[
                secret_b64,
                TOPIC_KEY,
                KEY,
                cvchain_azure::storage::settings::DEV_ACCOUNT_KEY,
            ],
        );
    }
}

fn all_delivered(rows: &[StoredEntity]) -> bool {
    rows.len() == EXPECTED.len() && rows.iter().all(|r| r.entity["Pending"] == false)
}

/// The outbox says the expected events, in order.
fn assert_expected(outbox: &[StoredEntity], project: Uuid) {
    let got: Vec<(String, String)> = outbox
        .iter()
        .map(|r| {
            let e: Value = serde_json::from_str(r.entity["CloudEvent"].as_str().unwrap()).unwrap();
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["platform"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = EXPECTED
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
    assert_eq!(got, want);
    for r in outbox {
        assert_eq!(r.entity["PartitionKey"], project.to_string().as_str());
    }
}

#[tokio::test]
async fn one_chain_tells_every_sink_every_event_in_order_signed() {
    let mut w = world(true).await;
    w.receiver.start();
    w.handlers.push(Handler::start_worker(&w.env));
    let iteration = w.api.train(w.project).await;
    w.wait("every event delivered to every sink", 90, |w, outbox| {
        all_delivered(outbox)
            && w.queued.len() >= EXPECTED.len()
            && w.receiver.records().len() >= EXPECTED.len()
            && w.topic.events().len() >= EXPECTED.len()
    })
    .await;
    let outbox = w.outbox().await;
    assert_expected(&outbox, w.project);
    let ids = w.outbox_ids().await;
    // Each sink got exactly the outbox, in its order.
    assert_eq!(w.webhook_ids(), ids, "webhook");
    assert_eq!(w.queued_ids(), ids, "queue");
    assert_eq!(w.topic_ids(), ids, "Event Grid");
    assert!(w.topic.refused().is_empty(), "{:?}", w.topic.refused());
    // The Standard Webhooks library verified every signature; the CloudEvents SDK read every
    // event, with webhook-id = the event's id.
    for r in w.receiver.records() {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(
            r["contentType"],
            "application/cloudevents+json; charset=utf-8"
        );
        assert_eq!(r["specversion"], "1.0");
        assert_eq!(r["datacontenttype"], "application/json");
        assert_eq!(
            r["source"],
            format!("/cvchain/devstoreaccount1/{}", w.table).as_str()
        );
        assert_eq!(
            r["subject"],
            format!("projects/{}/iterations/{iteration}", w.project).as_str()
        );
        assert_eq!(r["data"]["projectId"], w.project.to_string().as_str());
        assert!(r["time"].as_str().is_some_and(|t| t.starts_with("20")));
    }
    // The queue's messages and Event Grid's batch, read by the SDK too.
    let mut texts = w.queued.clone();
    texts.extend(w.topic.events().iter().map(Value::to_string));
    let parsed = parse_with_sdk(&w.python, &texts);
    assert_eq!(parsed.len(), 2 * EXPECTED.len());
    // Telemetry off (this worker exports nothing): every event still carries its chain's trace
    // (the distributed-tracing extension, as the SDK reads it), and the webhook's header too.
    let chain = cvchain_core::trace::chain_trace_id(w.project, iteration).to_string();
    let trace_of = |tp: &Value| {
        cvchain_core::trace::TraceParent::parse(tp.as_str().unwrap_or_default())
            .map(|t| t.trace_id.to_string())
    };
    for e in parsed.iter().chain(w.receiver.records().iter()) {
        assert_eq!(trace_of(&e["traceparent"]), Some(chain.clone()), "{e}");
    }
    for r in w.receiver.records() {
        assert_eq!(
            trace_of(&r["traceparentHeader"]),
            Some(chain.clone()),
            "{r}"
        );
    }
    // What a consumer needs without another call.
    let records = w.receiver.records();
    let of = |t: &'static str| records.iter().filter(move |r| r["type"] == t);
    let trained = of("io.cvchain.training.completed").next().unwrap();
    assert_eq!(trained["data"]["projectName"], "Widgets");
    assert_eq!(trained["data"]["metrics"]["mAP"], 0.88);
    let gate = of("io.cvchain.gate.evaluated").next().unwrap();
    assert_eq!(gate["data"]["verdict"], "passed");
    for released in of("io.cvchain.model.released") {
        let url = released["data"]["releaseUrl"].as_str().unwrap();
        assert!(
            url.starts_with("http://127.0.0.1:") && !url.contains('?'),
            "{url}"
        );
        assert_eq!(released["data"]["iterationName"], "Iteration 1");
    }
    let moves: Vec<&Value> = of("io.cvchain.channel.moved").collect();
    assert_eq!(moves[0]["data"]["pointer"], true);
    assert!(moves[1..].iter().all(|m| {
        m["data"]["channelUrl"]
            .as_str()
            .unwrap()
            .contains("/channels/")
    }));
    let done = of("io.cvchain.chain.completed").next().unwrap();
    assert_eq!(done["data"]["exports"].as_array().unwrap().len(), 2);
    assert!(w.topic.batches() >= 1);
    w.assert_no_secrets().await;
}

#[tokio::test]
async fn every_notification_three_times_and_two_at_once_tells_each_event_once_per_sink() {
    let mut w = world(false).await;
    w.receiver.start();
    w.handlers.push(Handler::start(&w.env));
    w.handlers.push(Handler::start(&w.env));
    w.api.train(w.project).await;
    let until = Instant::now() + Duration::from_secs(90);
    let mut delivered = 0;
    loop {
        for (text, id) in w.take().await {
            w.deliver(&text, &id).await;
            delivered += 1;
        }
        let outbox = w.outbox().await;
        if outbox
            .iter()
            .any(|r| r.entity["CloudEventType"] == "io.cvchain.chain.completed")
        {
            break;
        }
        assert!(Instant::now() < until, "the chain did not complete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ConnectionTest, the training, two exports.
    assert!(delivered >= 4, "{delivered}");
    w.wait("every event delivered once", 60, |w, outbox| {
        all_delivered(outbox)
            && w.queued.len() >= EXPECTED.len()
            && w.receiver.records().len() >= EXPECTED.len()
            && w.topic.events().len() >= EXPECTED.len()
    })
    .await;
    // A moment more: a duplicate would arrive now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.drain_events_queue().await;
    let outbox = w.outbox().await;
    let mut kinds: Vec<String> = outbox
        .iter()
        .map(|r| r.entity["CloudEventType"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    let mut want: Vec<String> = EXPECTED.iter().map(|(t, _)| t.to_string()).collect();
    want.sort();
    assert_eq!(kinds, want);
    let ids: BTreeSet<String> = w.outbox_ids().await.into_iter().collect();
    assert_eq!(ids.len(), EXPECTED.len());
    for (sink, got) in [
        ("webhook", w.webhook_ids()),
        ("queue", w.queued_ids()),
        ("Event Grid", w.topic_ids()),
    ] {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for id in got {
            *counts.entry(id).or_default() += 1;
        }
        assert_eq!(
            counts.keys().cloned().collect::<BTreeSet<_>>(),
            ids,
            "{sink}"
        );
        assert!(counts.values().all(|n| *n == 1), "{sink}: {counts:?}");
    }
    assert!(w.receiver.records().iter().all(|r| r["ok"] == true));
    w.assert_no_secrets().await;
}

/// Two flavors of one platform: the second's ExportCompleted has the first's keys, so its row is
/// recorded apart. When it ends the chain, `chain.completed` is still told (on the row apart),
/// with its own release, once, and its redelivery tells nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_ending_on_a_second_flavor_of_a_platform_is_told_complete() {
    let mut w = world(true).await;
    for (k, v) in w.env.iter_mut() {
        if *k == "CVCHAIN_EXPORTS" {
            *v = "ONNX, TensorFlow:TensorFlowLite, TensorFlow:TensorFlowNormal".into();
        }
    }
    w.receiver.start();
    w.handlers.push(Handler::start_worker(&w.env));
    w.api.train(w.project).await;
    w.wait("the chain told complete", 90, |_, outbox| {
        outbox
            .iter()
            .any(|r| r.entity["CloudEventType"] == "io.cvchain.chain.completed")
            && outbox.iter().all(|r| r.entity["Pending"] == false)
    })
    .await;
    // A moment more: a second completion would be written now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outbox = w.outbox().await;
    let count = |kind: &str| {
        outbox
            .iter()
            .filter(|r| r.entity["CloudEventType"] == kind)
            .count()
    };
    assert_eq!(count("io.cvchain.chain.completed"), 1);
    assert_eq!(count("io.cvchain.model.released"), 3);
    let done = outbox
        .iter()
        .find(|r| r.entity["CloudEventType"] == "io.cvchain.chain.completed")
        .unwrap();
    let event = done.entity["CloudEvent"].as_str().unwrap();
    assert!(
        event.contains("TensorFlowNormal") && event.contains("TensorFlowLite"),
        "{event}"
    );
    let apart = w
        .rows()
        .await
        .into_iter()
        .filter(|r| r.entity["EventType"] == "Export")
        .count();
    assert_eq!(apart, 3, "each export's notification has its row");
    w.assert_no_secrets().await;
}

// Multi-threaded: the local Event Grid topic keeps answering while a command runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_was_down_gets_every_event_and_the_others_go_on() {
    let mut w = world(true).await;
    // The webhook receiver is down; Event Grid refuses everything for good (400).
    w.topic.set_failing(Some(400));
    w.handlers.push(Handler::start_worker(&w.env));
    w.api.train(w.project).await;
    w.wait("the queue has every event", 90, |w, outbox| {
        outbox.len() == EXPECTED.len()
            && outbox
                .iter()
                .any(|r| r.entity["CloudEventType"] == "io.cvchain.chain.completed")
            && w.queued.len() >= EXPECTED.len()
            && outbox.iter().all(|r| {
                r.entity
                    .get("EventGridDelivery")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.contains("failed"))
            })
    })
    .await;
    assert_eq!(
        w.queued_ids(),
        w.outbox_ids().await,
        "the queue was not held up"
    );
    assert!(w.receiver.records().is_empty());
    // The webhook's events wait; Event Grid's are recorded as failed with the answer, tried once.
    let outbox = w.outbox().await;
    assert!(outbox.iter().all(|r| r.entity["Pending"] == true));
    let head: Value =
        serde_json::from_str(outbox[0].entity["WebhookDelivery"].as_str().unwrap()).unwrap();
    assert_eq!(head["state"], "pending");
    assert!(head["attempts"].as_u64().unwrap() >= 1, "{head}");
    for r in &outbox {
        let eg: Value =
            serde_json::from_str(r.entity["EventGridDelivery"].as_str().unwrap()).unwrap();
        assert_eq!(eg["state"], "failed");
        assert_eq!(eg["attempts"], 1);
        assert!(
            eg["answer"].as_str().unwrap().starts_with("HTTP 400"),
            "{eg}"
        );
    }
    let listed = w.cvchain(&["events", "--pending"]);
    let listed_text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success());
    assert!(
        listed_text.contains("12 event(s), 12 pending"),
        "{listed_text}"
    );
    assert!(listed_text.contains("webhook=pending"), "{listed_text}");

    // The receiver comes up: the worker's periodic delivery catches up, in order.
    w.receiver.start();
    w.wait("the webhook caught up", 90, |_, outbox| {
        outbox.iter().all(|r| {
            r.entity
                .get("WebhookDelivery")
                .and_then(Value::as_str)
                .is_some_and(|s| s.contains("delivered"))
        })
    })
    .await;
    let ids = w.outbox_ids().await;
    assert_eq!(
        w.webhook_ids(),
        ids,
        "every event, once, in order: none lost"
    );
    assert!(w.receiver.records().iter().all(|r| r["ok"] == true));
    assert_eq!(w.queued_ids(), ids, "nothing more on the queue");
    // Pending stays: Event Grid's are failed, which is done.
    assert!(
        w.outbox()
            .await
            .iter()
            .all(|r| r.entity["Pending"] == false)
    );

    // `events test`: Event Grid still refuses, and the command says so.
    let out = w.cvchain(&["events", "test"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("✓ queue "), "{text}");
    assert!(text.contains("✓ webhook http://127.0.0.1:"), "{text}");
    assert!(text.contains("✗ Event Grid http://127.0.0.1:"), "{text}");
    assert!(text.contains("HTTP 400"), "{text}");
    w.topic.set_failing(None);
    let out = w.cvchain(&["events", "test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        w.receiver
            .records()
            .iter()
            .any(|r| r["type"] == "io.cvchain.test" && r["ok"] == true)
    );
    assert!(
        w.topic
            .events()
            .iter()
            .any(|e| e["type"] == "io.cvchain.test")
    );
    w.drain_events_queue().await;
    assert!(w.queued.iter().any(|t| t.contains("io.cvchain.test")));

    // `events replay --type`: those events again, same ids, to every sink.
    let released: Vec<String> = w
        .outbox()
        .await
        .iter()
        .filter(|r| r.entity["CloudEventType"] == "io.cvchain.model.released")
        .map(|r| r.entity["EventId"].as_str().unwrap().to_owned())
        .collect();
    let out = w.cvchain(&["events", "replay", "--type", "model.released"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("replayed 2 event(s)"), "{text}");
    // Delivered by the command, or by the worker if it held the project's delivery claim.
    w.wait("the replayed events arrived again", 30, |w, _| {
        let webhook = w.webhook_ids();
        released
            .iter()
            .all(|id| webhook.iter().filter(|i| *i == id).count() == 2)
    })
    .await;
    // `events replay --since`: everything again; Event Grid, which refused them, now has them.
    let out = w.cvchain(&["events", "replay", "--since", "2000-01-01"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.wait("Event Grid got every replayed event", 30, |w, outbox| {
        let topic: BTreeSet<String> = w.topic_ids().into_iter().collect();
        ids.iter().all(|id| topic.contains(id))
            && outbox.iter().all(|r| r.entity["Pending"] == false)
    })
    .await;
    // `events --json`: every event delivered everywhere.
    let out = w.cvchain(&["events", "--json"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), EXPECTED.len());
    for l in &lines {
        for sink in ["queue", "eventgrid", "webhook"] {
            assert_eq!(l["sinks"][sink]["state"], "delivered", "{l}");
        }
        assert!(l["event"]["id"].is_string());
    }
    // `check` reaches each sink.
    let out = w.cvchain(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("✓ event sink: queue {}", w.events_queue)),
        "{text}"
    );
    assert!(text.contains("✓ event sink: Event Grid"), "{text}");
    assert!(text.contains("✓ event sink: webhook"), "{text}");
    w.assert_no_secrets().await;
}

/// A notification's own events are placed at its start and written at its end: while it runs,
/// a round in the same process sends none of its project's events placed after that start
/// (written meanwhile: the export it requested), so no sink takes them first. Once it ends,
/// they all go, in order.
#[tokio::test]
async fn a_round_holds_back_what_a_notification_in_flight_comes_before() {
    use cvchain_core::events::IterationFacts;
    use cvchain_core::history::Prop;
    let mut w = world(false).await;
    let events = events_of(&w.env);
    let pk = w.project.to_string();
    let project = w.project;
    let training = |iteration: Uuid| {
        let mut row = cvchain_testkit::training_completed_row(project, iteration);
        row.properties.set(Prop::Confirmed, true);
        row
    };
    let handling = events.begin(&pk);
    let began = time::OffsetDateTime::now_utc();
    // Written while it runs: placed after its start.
    events
        .record(
            &training(Uuid::new_v4()),
            &IterationFacts::default(),
            None,
            Vec::new(),
        )
        .await
        .unwrap();
    let report = events.deliver(&pk).await.unwrap();
    assert_eq!(report.delivered, 0, "{}", report.describe());
    w.drain_events_queue().await;
    assert!(w.queued.is_empty(), "{:?}", w.queued);
    // Its own, written as it ends, placed at its start.
    events
        .record(
            &training(Uuid::new_v4()),
            &IterationFacts::default(),
            Some(began),
            Vec::new(),
        )
        .await
        .unwrap();
    drop(handling);
    events.deliver(&pk).await.unwrap();
    w.drain_events_queue().await;
    let ids = w.outbox_ids().await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(
        w.queued_ids(),
        ids,
        "in their order, the one placed first first"
    );
}

/// The `DeliverEvents` timer function as the host invokes it, and an event larger than a
/// webhook should carry: sent to the webhook with its long string shortened (a `trimmed`
/// member, the pointer to its history row, and the outbox row saying so), whole to the queue
/// and Event Grid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_delivers_and_an_event_too_large_for_the_webhook_is_sent_trimmed() {
    use cvchain_core::events::{CloudEvent, Sink, outbox_row};
    let mut w = world(false).await;
    w.receiver.start();
    w.handlers.push(Handler::start(&w.env));
    let project = w.project.to_string();
    let event = CloudEvent {
        specversion: "1.0".into(),
        id: Uuid::new_v4().to_string(),
        source: "/cvchain/test".into(),
        kind: "io.cvchain.model.released".into(),
        subject: format!("projects/{project}/iterations/x"),
        time: "2026-12-01T10:00:00Z".into(),
        datacontenttype: "application/json".into(),
        traceparent: None,
        tracestate: None,
        data: serde_json::json!({
            "projectId": project,
            "iterationId": "x",
            "history": {"table": w.table, "partitionKey": project, "rowKey": "ExportStep_x_ONNX"},
            "notes": "n".repeat(25_000),
        }),
    };
    let json = event.to_json();
    let row = outbox_row(
        &project,
        &event,
        "ExportStep_x_ONNX",
        &[Sink::Queue, Sink::EventGrid, Sink::Webhook],
        "00000000000000000001-000",
    );
    let store =
        cvchain_azure::history::store::HistoryStore::new(w.clients.table(&w.table).unwrap());
    store.record(&row).await.unwrap();
    // The host's timer invocation (TimerInfo under the binding's name).
    let body = serde_json::json!({
        "Data": {"timer": {"Schedule": {"AdjustForDST": true},
            "ScheduleStatus": {"Last": "2026-12-01T10:00:00+00:00", "Next": "2026-12-01T10:01:00+00:00",
                "LastUpdated": "2026-12-01T10:00:00+00:00"}, "IsPastDue": false}},
        "Metadata": {"sys": {"MethodName": "DeliverEvents", "UtcNow": "2026-12-01T10:01:00.0012345Z",
            "RandGuid": Uuid::new_v4().to_string()}}
    });
    let rsp = reqwest::Client::new()
        .post(w.handlers[0].url("/DeliverEvents"))
        .header("content-type", "application/json")
        .header("x-azure-functions-invocationid", Uuid::new_v4().to_string())
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let answer: Value = rsp.json().await.unwrap();
    let logs = answer["Logs"].to_string();
    assert!(logs.contains("3 delivered"), "{answer}");
    // The webhook got it trimmed, verified and parsed by the libraries, with the pointer.
    let records = w.receiver.records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["id"], event.id.as_str());
    assert_eq!(r["data"]["trimmed"]["size"], json.len());
    assert_eq!(r["data"]["trimmed"]["by"], "webhook");
    assert_eq!(r["data"]["history"]["rowKey"], "ExportStep_x_ONNX");
    // The long string shortened, just enough, and marked; the JSON re-serialized, not cut.
    let notes = r["data"]["notes"].as_str().unwrap();
    assert!(
        notes.ends_with('…') && notes.len() > 15_000 && notes.len() < 25_000,
        "{}",
        notes.len()
    );
    // The queue and Event Grid took it whole.
    w.drain_events_queue().await;
    assert_eq!(w.queued, vec![json.clone()]);
    assert_eq!(
        w.topic.events(),
        vec![serde_json::from_str::<Value>(&json).unwrap()]
    );
    let stored = w.outbox().await;
    let hook: Value =
        serde_json::from_str(stored[0].entity["WebhookDelivery"].as_str().unwrap()).unwrap();
    assert_eq!(hook["state"], "delivered");
    assert!(
        hook["note"].as_str().unwrap().starts_with("sent trimmed"),
        "{hook}"
    );
    assert_eq!(stored[0].entity["Pending"], false);
    // Nothing left: the next run delivers nothing.
    let rsp = reqwest::Client::new()
        .post(w.handlers[0].url("/DeliverEvents"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let answer: Value = rsp.json().await.unwrap();
    assert!(
        answer["Logs"].to_string().contains("0 delivered"),
        "{answer}"
    );
    assert_eq!(w.receiver.records().len(), 1);
}

/// Event Grid with Microsoft Entra ID: a bearer token for `https://eventgrid.azure.net/.default`
/// over https; a token the topic does not accept is refused for good (401), with the answer.
#[tokio::test]
async fn event_grid_takes_an_entra_id_token_for_its_scope() {
    use cvchain_azure::events::{
        settings::{EventGridAuth, EventGridSettings, EventsSettings},
        sinks::{EVENTGRID_SCOPE, SinkOptions, Sinks},
    };
    use cvchain_core::events::{Sink, delivery::Answer};
    let ca = cvchain_testkit::TestCa::generate();
    let token = format!("token-for:{EVENTGRID_SCOPE}");
    let topic = EventGridTopic::start_https(TopicAuth::Bearer(token), &ca).await;
    let storage = cvchain_azure::storage::settings::parse_connection_string(
        "CVCHAIN_STORAGE",
        "UseDevelopmentStorage=true",
    )
    .unwrap();
    let clients = StorageClients::new(&storage).unwrap();
    let settings = |endpoint: &str| EventsSettings {
        event_grid: Some(EventGridSettings {
            endpoint: url::Url::parse(&format!("{endpoint}?api-version=2018-01-01")).unwrap(),
            auth: EventGridAuth::ManagedIdentity { client_id: None },
        }),
        ..Default::default()
    };
    let credential = std::sync::Arc::new(cvchain_testkit::RecordingCredential::default());
    let sinks = Sinks::new(
        &settings(&topic.endpoint),
        &clients,
        SinkOptions {
            transport: Some(ca.transport()),
            eventgrid_credential: Some(credential.clone()),
            timeout: None,
        },
    )
    .unwrap();
    let event = serde_json::json!({"specversion": "1.0", "id": "e-1", "source": "/cvchain/t",
        "type": "io.cvchain.test", "datacontenttype": "application/json", "data": {}});
    let answers = sinks
        .send(Sink::EventGrid, &[("e-1".into(), event.to_string())])
        .await;
    assert_eq!(answers, vec![Answer::Delivered("HTTP 200".into())]);
    assert_eq!(topic.events(), vec![event.clone()]);
    assert_eq!(*credential.scopes.lock().unwrap(), vec![EVENTGRID_SCOPE]);
    // `cvchain check`'s probe: an empty batch, credentials accepted.
    assert!(sinks.reach(Sink::EventGrid).await.is_ok());
    // Another topic that wants another token: 401, a permanent refusal, said as Event Grid says it.
    let other = EventGridTopic::start_https(TopicAuth::Bearer("other".into()), &ca).await;
    let sinks = Sinks::new(
        &settings(&other.endpoint),
        &clients,
        SinkOptions {
            transport: Some(ca.transport()),
            eventgrid_credential: Some(credential),
            timeout: None,
        },
    )
    .unwrap();
    let answers = sinks
        .send(Sink::EventGrid, &[("e-1".into(), event.to_string())])
        .await;
    let [
        Answer::Refused {
            status: Some(401),
            detail,
            ..
        },
    ] = &answers[..]
    else {
        panic!("{answers:?}")
    };
    assert!(detail.contains("Unauthorized"), "{detail}");
    assert!(!detail.contains("token-for"), "{detail}");
    let check = sinks.reach(Sink::EventGrid).await.unwrap_err();
    assert!(check.contains("EventGrid Data Sender"), "{check}");
}

// ---------------------------------------------------------------------------------------------
// Delivery under load: two instances and a slow receiver, a crash mid-round, one slow project
// among others. The handlers run `serve` and are driven by the `DeliverEvents` timer function.

/// Settings for handlers that only deliver: storage, the history table, the webhook, and a
/// claim of 5 s, so one round outlasts it.
fn delivery_env(
    azurite: &Azurite,
    table: &str,
    receiver: &Receiver,
) -> Vec<(&'static str, String)> {
    vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", unique("cvq")),
        ("CVCHAIN_HISTORY_TABLE", table.to_owned()),
        ("CVCHAIN_WEBHOOK_URL", receiver.url()),
        ("CVCHAIN_WEBHOOK_SECRET", SECRET.into()),
        ("CVCHAIN_CLAIM_SECONDS", "5".into()),
        ("CVCHAIN_EVENTS_RETRY_SECONDS", "1".into()),
    ]
}

/// `count` events of `project`, pending for the webhook, in this order; their ids.
async fn pending_events(
    clients: &StorageClients,
    table: &str,
    project: &str,
    count: usize,
) -> Vec<String> {
    use cvchain_core::events::{CloudEvent, Sink, outbox_row};
    let store = cvchain_azure::history::store::HistoryStore::new(clients.table(table).unwrap());
    let mut ids = Vec::new();
    for i in 0..count {
        let event = CloudEvent {
            specversion: "1.0".into(),
            id: Uuid::new_v4().to_string(),
            source: "/cvchain/test".into(),
            kind: "io.cvchain.model.released".into(),
            subject: format!("projects/{project}/iterations/it-{i}"),
            time: "2026-12-01T10:00:00Z".into(),
            datacontenttype: "application/json".into(),
            traceparent: None,
            tracestate: None,
            data: serde_json::json!({
                "projectId": project,
                "iterationId": format!("it-{i}"),
                "history": {"table": table, "partitionKey": project, "rowKey": format!("ExportStep_{i}")},
            }),
        };
        let row = outbox_row(
            project,
            &event,
            &format!("ExportStep_{i}"),
            &[Sink::Webhook],
            &format!("{:020}-000", i + 1),
        );
        store.record(&row).await.unwrap();
        ids.push(event.id);
    }
    ids
}

/// The `DeliverEvents` timer function, invoked as the host invokes it; its answer, or `None`
/// when the handler did not answer (it was killed).
async fn run_timer(url: String) -> Option<Value> {
    let body = serde_json::json!({
        "Data": {"timer": {"Schedule": {"AdjustForDST": true}, "IsPastDue": false}},
        "Metadata": {"sys": {"MethodName": "DeliverEvents", "UtcNow": "2026-12-01T10:01:00Z",
            "RandGuid": Uuid::new_v4().to_string()}}
    });
    let rsp = reqwest::Client::new()
        .post(format!("{url}/DeliverEvents"))
        .header("content-type", "application/json")
        .header("x-azure-functions-invocationid", Uuid::new_v4().to_string())
        .body(body.to_string())
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .ok()?;
    rsp.json().await.ok()
}

/// Waits (up to `secs`, to bound a hang) until `done` holds.
async fn until(what: &str, secs: u64, done: impl Fn() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < give_up, "{what}: not reached in {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each webhook request, in the order they were answered: (event id, requests in flight when
/// it arrived, verified and parsed).
fn arrivals(receiver: &Receiver) -> Vec<(String, u64, bool)> {
    receiver
        .records()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_owned(),
                r["inFlight"].as_u64().unwrap_or(0),
                r["ok"] == true,
            )
        })
        .collect()
}

/// A receiver that takes 2 s per request, six events (12 s, over two claim lifetimes), and two
/// `serve` instances whose timers run while the first is still delivering: every event arrives
/// once, in order, one request at a time. (Before the claim was held while the round ran, the
/// second instance took the lapsed claim over and sent all six again, two in flight at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_and_a_slow_receiver_send_each_event_once_in_order() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let mut receiver = Receiver::slow(&python(), 2.0, None);
    receiver.start();
    let table = unique("SlowHook");
    let env = delivery_env(&azurite, &table, &receiver);
    let (a, b) = (Handler::start(&env), Handler::start(&env));
    let project = Uuid::new_v4().to_string();
    let ids = pending_events(&clients, &table, &project, 6).await;

    let first = tokio::spawn(run_timer(a.url("")));
    // Once the first has delivered longer than its claim lives, the second's timer runs; and
    // again later.
    until("three events answered", 60, || {
        receiver.records().len() >= 3
    })
    .await;
    let second = run_timer(b.url(""))
        .await
        .expect("the second instance answers");
    until("five events answered", 60, || receiver.records().len() >= 5).await;
    let third = run_timer(b.url(""))
        .await
        .expect("the second instance answers");
    let first = first.await.unwrap().expect("the first instance answers");
    until("every event answered", 60, || {
        receiver.records().len() >= ids.len()
    })
    .await;
    // A moment more: a second send would arrive now.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let got = arrivals(&receiver);
    let got_ids: Vec<&str> = got.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        got_ids,
        ids,
        "each event once, in order\n{}\n{}",
        a.stderr(),
        b.stderr()
    );
    assert!(
        got.iter().all(|(_, n, _)| *n == 1),
        "one request at a time: {got:?}"
    );
    assert!(got.iter().all(|(_, _, ok)| *ok), "{:?}", receiver.records());
    assert!(first["Logs"].to_string().contains("6 delivered"), "{first}");
    for other in [&second, &third] {
        assert!(
            other["Logs"]
                .to_string()
                .contains("being delivered by another instance"),
            "{other}"
        );
    }
    let outbox = cvchain_azure::events::outbox::Outbox::new(
        cvchain_azure::history::store::HistoryStore::new(clients.table(&table).unwrap()),
    );
    assert!(
        outbox
            .list(Some(&project), true, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The instance delivering is killed mid-round (SIGKILL): the other takes its claim over once it
/// lapses and sends the rest; what was delivered before is not sent again, so at most the event
/// in flight arrives twice, and the order holds. (Before each event's state was saved as it was
/// delivered, the whole round was sent again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_round_sends_again_at_most_the_event_in_flight() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let mut receiver = Receiver::slow(&python(), 1.5, None);
    receiver.start();
    let table = unique("CrashHook");
    let env = delivery_env(&azurite, &table, &receiver);
    let (mut a, b) = (Handler::start(&env), Handler::start(&env));
    let project = Uuid::new_v4().to_string();
    let ids = pending_events(&clients, &table, &project, 6).await;

    let first = tokio::spawn(run_timer(a.url("")));
    until("two events answered", 60, || receiver.records().len() >= 2).await;
    a.kill9();
    assert!(
        first.await.unwrap().is_none(),
        "the first instance was killed mid-round"
    );
    let outbox = cvchain_azure::events::outbox::Outbox::new(
        cvchain_azure::history::store::HistoryStore::new(clients.table(&table).unwrap()),
    );
    let give_up = Instant::now() + Duration::from_secs(90);
    while !outbox
        .list(Some(&project), true, 100)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < give_up,
            "the second instance never delivered the rest"
        );
        run_timer(b.url("")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let got: Vec<String> = arrivals(&receiver)
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    let mut once = got.clone();
    once.dedup();
    assert_eq!(once, ids, "in order, nothing lost: {got:?}");
    assert!(
        got.len() <= ids.len() + 1,
        "at most the event in flight twice: {got:?}"
    );
    assert!(arrivals(&receiver).iter().all(|(_, _, ok)| *ok));
}

/// Another instance takes the claim while a round runs (here: the claim row replaced, as a
/// takeover after a lapse would): the round's next renewal finds it lost and the round stops at
/// once, sending nothing more; the new holder delivers the rest. (Before, a round never looked
/// at its claim again and sent everything.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_loses_its_claim_stops() {
    use cvchain_core::claims::{ClaimKey, claim_row};
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let mut receiver = Receiver::slow(&python(), 1.5, None);
    receiver.start();
    let table = unique("LostClaim");
    let env = delivery_env(&azurite, &table, &receiver);
    let handler = Handler::start(&env);
    let project = Uuid::new_v4().to_string();
    let ids = pending_events(&clients, &table, &project, 6).await;

    let round = tokio::spawn(run_timer(handler.url("")));
    until("one event answered", 60, || !receiver.records().is_empty()).await;
    let taken = claim_row(
        &ClaimKey::deliver(&project),
        Uuid::new_v4(),
        time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    );
    clients
        .table(&table)
        .unwrap()
        .upsert(
            &cvchain_azure::history::to_entity(&taken),
            cvchain_azure::storage::table::UpdateMode::Replace,
        )
        .await
        .unwrap();
    let answer = round.await.unwrap().expect("the handler answers");
    assert!(
        answer["Logs"].to_string().contains("1 round(s) stopped"),
        "{answer}"
    );
    // The request in flight when the claim was lost may still be answered; nothing after it.
    let sent = receiver.records().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = receiver.records().len();
    assert!(
        after <= sent + 1 && after < ids.len(),
        "{sent} then {after} of {}",
        ids.len()
    );
    let got: Vec<String> = arrivals(&receiver)
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(got, ids[..got.len()], "in order, once");
    assert!(arrivals(&receiver).iter().all(|(_, _, ok)| *ok));
}

/// One project's receiver is slow (every request of that project takes 2 s); the timer's round
/// delivers the other projects meanwhile rather than after it. (Before, projects went one after
/// the other, the slow one first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_project_does_not_hold_up_the_others() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    // Projects are delivered in key order when one at a time: the slow one sorts first.
    let slow = "00000000-0000-4000-8000-000000000001".to_owned();
    let mut receiver = Receiver::slow(&python(), 2.0, Some(&slow));
    receiver.start();
    let table = unique("Projects");
    let env = delivery_env(&azurite, &table, &receiver);
    let handler = Handler::start(&env);
    let slow_ids = pending_events(&clients, &table, &slow, 3).await;
    let mut fast_ids = Vec::new();
    for n in 1..=3 {
        let fast = format!("ffffffff-0000-4000-8000-00000000000{n}");
        fast_ids.extend(pending_events(&clients, &table, &fast, 1).await);
    }
    let answer = run_timer(handler.url("")).await.unwrap();
    assert!(
        answer["Logs"].to_string().contains("6 delivered"),
        "{answer}"
    );
    let got: Vec<String> = arrivals(&receiver)
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    let last_slow = got.iter().rposition(|id| slow_ids.contains(id)).unwrap();
    for id in &fast_ids {
        let at = got.iter().position(|g| g == id).unwrap();
        assert!(
            at < last_slow,
            "a fast project waited for the slow one: {got:?}"
        );
    }
    // The slow project's own order holds.
    let slow_got: Vec<&String> = got.iter().filter(|id| slow_ids.contains(id)).collect();
    assert_eq!(slow_got, slow_ids.iter().collect::<Vec<_>>());
    assert!(arrivals(&receiver).iter().all(|(_, _, ok)| *ok));
}

// ---------------------------------------------------------------------------------------------
// What a sink answers is read only in part, and never records part of a secret.

/// What a local sink answers every request with.
#[derive(Clone, Copy)]
enum Answering {
    /// `status` and a body of this many bytes, generated as it is written (never held).
    Huge(u16, u64),
    /// 401, echoing the request's `aeg-sas-key` and its query after 180 bytes of padding.
    Echo,
}

/// A local sink on a loopback port; counts what it wrote and whether the client closed the
/// connection before the whole answer was written.
struct LocalSink {
    url: String,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    closed_early: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LocalSink {
    async fn start(answering: Answering) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sink = Self {
            url: format!("http://127.0.0.1:{port}/api/events"),
            written: Default::default(),
            closed_early: Default::default(),
            answered: Default::default(),
        };
        let (written, closed_early, answered) = (
            sink.written.clone(),
            sink.closed_early.clone(),
            sink.answered.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (written, closed_early, answered) =
                    (written.clone(), closed_early.clone(), answered.clone());
                tokio::spawn(async move {
                    // The request: its head, then as many body bytes as it says.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let head_end = loop {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let original = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    match answering {
                        Answering::Huge(status, size) => {
                            let head = format!(
                                "HTTP/1.1 {status} Trouble\r\ncontent-type: text/plain\r\ncontent-length: {size}\r\n\r\n"
                            );
                            if conn.write_all(head.as_bytes()).await.is_err() {
                                return;
                            }
                            let block = vec![b'x'; 64 * 1024];
                            let mut sent = 0u64;
                            while sent < size {
                                let n = block.len().min((size - sent) as usize);
                                match conn.write(&block[..n]).await {
                                    Ok(0) | Err(_) => {
                                        closed_early.store(true, SeqCst);
                                        break;
                                    }
                                    Ok(n) => {
                                        sent += n as u64;
                                        written.fetch_add(n as u64, SeqCst);
                                    }
                                }
                            }
                        }
                        Answering::Echo => {
                            let key = original
                                .lines()
                                .find_map(|l| {
                                    l.split_once(':')
                                        .filter(|(k, _)| k.eq_ignore_ascii_case("aeg-sas-key"))
                                })
                                .map(|(_, v)| v.trim().to_owned())
                                .unwrap_or_default();
                            let query = original
                                .lines()
                                .next()
                                .and_then(|l| l.split(' ').nth(1))
                                .and_then(|p| p.split_once('?'))
                                .map(|(_, q)| q.to_owned())
                                .unwrap_or_default();
                            let body = format!(
                                "{} the key {key} is not valid for {query} (and more)",
                                "e".repeat(180)
                            );
                            let answer = format!(
                                "HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = conn.write_all(answer.as_bytes()).await;
                        }
                    }
                    answered.fetch_add(1, SeqCst);
                });
            }
        });
        sink
    }
}

/// The sinks of these settings (the webhook and Event Grid at `url`), with a long timeout so
/// only the reading's own bound can stop it.
fn sinks_at(url: &str, code: &str) -> cvchain_azure::events::sinks::Sinks {
    use cvchain_azure::events::{
        settings::EventsSettings,
        sinks::{SinkOptions, Sinks},
    };
    let vars = [
        ("CVCHAIN_WEBHOOK_URL", format!("{url}?code={code}")),
        ("CVCHAIN_WEBHOOK_SECRET", SECRET.to_owned()),
        (
            "CVCHAIN_EVENTGRID_ENDPOINT",
            format!("{url}?api-version=2018-01-01"),
        ),
        ("CVCHAIN_EVENTGRID_KEY", TOPIC_KEY.to_owned()),
    ];
    let lookup = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    };
    let settings = EventsSettings::from_vars(&cvchain_core::config::Vars::new(&lookup)).unwrap();
    let storage = cvchain_azure::storage::settings::parse_connection_string(
        "CVCHAIN_STORAGE",
        "UseDevelopmentStorage=true",
    )
    .unwrap();
    Sinks::new(
        &settings,
        &StorageClients::new(&storage).unwrap(),
        SinkOptions {
            timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        },
    )
    .unwrap()
}

fn one_event() -> Vec<(String, String)> {
    let event = serde_json::json!({"specversion": "1.0", "id": "e-1", "source": "/cvchain/t",
        "type": "io.cvchain.test", "datacontenttype": "application/json", "data": {}});
    vec![("e-1".into(), event.to_string())]
}

/// A webhook and an Event Grid topic answering 500 with a body of 400 MB (generated as it is
/// written): cvchain reads a few kilobytes of it and closes the connection, on every attempt.
/// (Before, it read the whole answer into memory: 818 MB for one such answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_answer_is_read_only_in_part() {
    use cvchain_core::events::{Sink, delivery::Answer};
    use std::sync::atomic::Ordering::SeqCst;
    const SIZE: u64 = 400 * 1024 * 1024;
    for sink in [Sink::Webhook, Sink::EventGrid] {
        let local = LocalSink::start(Answering::Huge(500, SIZE)).await;
        let sinks = sinks_at(&local.url, "code-value-1");
        for attempt in 1..=2 {
            let answers = sinks.send(sink, &one_event()).await;
            let [
                Answer::Refused {
                    status: Some(500),
                    detail,
                    ..
                },
            ] = &answers[..]
            else {
                panic!("{sink:?}: {answers:?}")
            };
            assert!(detail.starts_with("HTTP 500"), "{detail}");
            assert!(detail.len() < 1024, "{}", detail.len());
            until("the local sink done writing", 60, || {
                local.answered.load(SeqCst) >= attempt
            })
            .await;
        }
        let written = local.written.load(SeqCst);
        eprintln!("{sink:?}: the sink wrote {written} of 2 × {SIZE} bytes");
        assert!(
            local.closed_early.load(SeqCst),
            "{sink:?}: the connection was not closed early"
        );
        // Two attempts: each at most what the socket buffers hold, far from the 400 MB.
        assert!(
            written < 64 * 1024 * 1024,
            "{sink:?}: {written} bytes were read"
        );
    }
}

/// Answers that echo what the request carried (Event Grid's key, the webhook URL's `?code=`),
/// past where the answer is cut: no part of either is kept. (Before, the answer was cut first
/// and redacted after, and the start of the key survived the cut.)
#[tokio::test]
async fn an_answer_that_echoes_a_secret_keeps_no_part_of_it() {
    use cvchain_core::events::{Sink, delivery::Answer};
    let local = LocalSink::start(Answering::Echo).await;
    let code = "Zm9vLWNvZGUtZm9yLXRoZS1ob29r";
    let sinks = sinks_at(&local.url, code);
    for (sink, secret) in [(Sink::EventGrid, TOPIC_KEY), (Sink::Webhook, code)] {
        let answers = sinks.send(sink, &one_event()).await;
        let [
            Answer::Refused {
                status: Some(401),
                detail,
                ..
            },
        ] = &answers[..]
        else {
            panic!("{sink:?}: {answers:?}")
        };
        assert!(detail.contains("the key"), "{detail}");
        for part in secret.as_bytes().windows(6) {
            let part = std::str::from_utf8(part).unwrap();
            assert!(
                !detail.contains(part),
                "{sink:?} kept {part:?} of a secret: {detail}"
            );
        }
        // And as the outbox row records it.
        let state = cvchain_core::events::delivery::after_attempt(
            &Default::default(),
            &answers[0],
            &Default::default(),
            "e-1",
            time::OffsetDateTime::now_utc(),
        );
        let recorded = state.to_json();
        for part in secret.as_bytes().windows(6) {
            assert!(
                !recorded.contains(std::str::from_utf8(part).unwrap()),
                "{recorded}"
            );
        }
    }
}

/// `cvchain check` and `cvchain events test` name the webhook without its query, also when
/// the HTTP client's error quotes the URL (nothing listens there). (Before, `check` printed the
/// error with the URL and its `?code=` in clear.)
#[tokio::test]
async fn check_and_events_test_never_show_the_webhook_query() {
    let azurite = Azurite::start();
    let code = "c2VjcmV0LWNvZGUtb2YtdGhlLWhvb2s";
    let closed = cvchain_testkit::free_port();
    let env = [
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", unique("cvq")),
        ("CVCHAIN_HISTORY_TABLE", unique("Check")),
        (
            "CVCHAIN_WEBHOOK_URL",
            format!("http://127.0.0.1:{closed}/hook?code={code}"),
        ),
        ("CVCHAIN_WEBHOOK_SECRET", SECRET.to_owned()),
    ];
    for args in [&["check"][..], &["events", "test"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_cvchain"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "{args:?}: nothing listens there\n{text}"
        );
        assert!(
            text.contains(&format!("webhook http://127.0.0.1:{closed}/hook")),
            "{args:?}: {text}"
        );
        for part in code.as_bytes().windows(6) {
            let part = std::str::from_utf8(part).unwrap();
            assert!(
                !text.contains(part),
                "{args:?} showed part of the query: {text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Names no one would choose: every event stays a CloudEvent.

/// A project whose name holds quotes, backslashes, U+2028 and U+2029 and a spelling of `sig=`
/// that redaction cannot fix in place runs its chain with every sink; then a training whose
/// iteration name is 10,000 quotes is recorded and delivered. Every sink gets CloudEvents the
/// SDK reads and every webhook verifies; the names arrive as they were (the unredactable part
/// replaced, the overlong one shortened and marked), and no event is withheld whole. (Before,
/// the history transaction failed on U+2028, the `sig` spelling withheld whole events and the
/// 10,000 quotes were stored cut inside a string: not JSON, signed and sent all the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_reach_every_sink_as_cloudevents() {
    use cvchain_core::events::{IterationFacts, OUTBOX_MAX_EVENT};
    use cvchain_core::history::Prop;
    let name = format!(
        "{}\u{2028}{}\u{2029} W \\u002573ig=X",
        "\"".repeat(100),
        "\\".repeat(50)
    );
    let mut w = world_named(true, &name).await;
    w.receiver.start();
    w.handlers.push(Handler::start_worker(&w.env));
    w.api.train(w.project).await;
    w.wait(
        "the chain complete, every event delivered to every sink",
        90,
        |w, outbox| {
            let n = outbox.len();
            outbox
                .iter()
                .any(|r| r.entity["CloudEventType"] == "io.cvchain.chain.completed")
                && outbox.iter().all(|r| r.entity["Pending"] == false)
                && w.queued.len() >= n
                && w.receiver.records().len() >= n
                && w.topic.events().len() >= n
        },
    )
    .await;
    // (Which channel moves a chain under this name makes is the lifecycle's business: the
    // name is withheld from the Training row, so its release paths and channels differ from
    // the manifest the gate wrote; here every event the chain told arrives, in order.)
    let ids = w.outbox_ids().await;
    assert!(ids.len() >= 8, "{ids:?}");
    assert_eq!(w.webhook_ids(), ids, "webhook");
    assert_eq!(w.queued_ids(), ids, "queue");
    assert_eq!(w.topic_ids(), ids, "Event Grid");
    let trained = w
        .receiver
        .records()
        .into_iter()
        .find(|r| r["type"] == "io.cvchain.training.completed")
        .unwrap();
    assert_eq!(
        trained["data"]["projectName"],
        cvchain_core::redact::WITHHELD,
        "the value that holds a secret is replaced, not the event"
    );
    assert_eq!(trained["data"]["iterationName"], "Iteration 1");

    // A name as long as no project allows, recorded through the same outbox and delivered.
    let lookup = |k: &str| w.env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
    let settings = cvchain::settings::Settings::from_lookup(&lookup).unwrap();
    let events = cvchain::events::Events::from_settings(&settings, &w.clients, Default::default())
        .unwrap()
        .unwrap();
    let long = "\"".repeat(10_000);
    let iteration = Uuid::new_v4();
    let mut row = cvchain_testkit::training_completed_row(w.project, iteration);
    let p = &mut row.properties;
    // As Custom Vision confirmed it: only a confirmed training is told.
    p.set(Prop::Confirmed, true);
    p.set(Prop::ProjectName, "Widgets \u{2028}");
    p.set(Prop::IterationName, long.as_str());
    p.set(Prop::GateVerdict, "failed");
    p.set(Prop::GateReasons, format!("{long}; sig=abc"));
    events
        .record(&row, &IterationFacts::default(), None, Vec::new())
        .await
        .unwrap();
    events.deliver(&w.project.to_string()).await.unwrap();
    let n = ids.len() + 2;
    w.wait(
        "the long name's events delivered everywhere",
        60,
        |w, outbox| {
            outbox.len() == n
                && outbox.iter().all(|r| r.entity["Pending"] == false)
                && w.receiver.records().len() >= n
                && w.topic.events().len() >= n
                && w.queued.len() >= n
        },
    )
    .await;
    for r in w.outbox().await {
        let stored = r.entity["CloudEvent"].as_str().unwrap();
        let e: Value =
            serde_json::from_str(stored).unwrap_or_else(|e| panic!("{e}: {stored:.200}"));
        assert!(
            e["id"].is_string() && e["data"]["history"].is_object(),
            "{e:.200}"
        );
        assert!(
            cvchain_core::bounds::encoded_units(stored) <= OUTBOX_MAX_EVENT,
            "{}",
            stored.len()
        );
    }
    let records = w.receiver.records();
    assert!(records.iter().all(|r| r["ok"] == true), "{records:?}");
    let long_one = records
        .iter()
        .find(|r| {
            r["subject"]
                .as_str()
                .unwrap_or_default()
                .contains(&iteration.to_string())
        })
        .unwrap();
    let got = long_one["data"]["iterationName"].as_str().unwrap();
    assert!(
        got.starts_with("\"\"\"\"") && got.ends_with('…'),
        "{got:.40}"
    );
    assert!(long_one["data"]["trimmed"]["by"].is_string(), "{long_one}");
    assert_eq!(long_one["data"]["projectName"], "Widgets \u{2028}");
    // The queue's messages and Event Grid's batches, read by the SDK too.
    let mut texts = w.queued.clone();
    texts.extend(w.topic.events().iter().map(Value::to_string));
    let parsed = parse_with_sdk(&w.python, &texts);
    assert_eq!(parsed.len(), 2 * n);
    assert_eq!(w.webhook_ids(), w.outbox_ids().await);
    assert!(w.topic.refused().is_empty(), "{:?}", w.topic.refused());
    w.assert_no_secrets().await;
}

// ---------------------------------------------------------------------------------------------
// Consumers on their defaults: the events queue as a queue-triggered Function reads it.

/// The events machinery of `env` (as `serve` or the worker would build it), in this process.
fn events_of(env: &[(&str, String)]) -> std::sync::Arc<cvchain::events::Events> {
    let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
    let settings = cvchain::settings::Settings::from_lookup(&lookup).unwrap();
    let storage = settings.storage.clone();
    cvchain::events::Events::from_settings(
        &settings,
        &StorageClients::new(&storage).unwrap(),
        Default::default(),
    )
    .unwrap()
    .unwrap()
}

/// Events for the queue sink of `project`, in this order: a plain one, one whose names hold
/// what XML and JSON escape (`<&>'"`, U+2028, U+FFFE), and one whose name is 20,000 CJK
/// characters: whole in the outbox (its 30,000 UTF-16 units), 60 KB of UTF-8, whole as text
/// and over 64 KiB once base64.
async fn queue_events(clients: &StorageClients, table: &str, project: &str) -> Vec<String> {
    use cvchain_core::events::{CloudEvent, Sink, outbox_row};
    let store = cvchain_azure::history::store::HistoryStore::new(clients.table(table).unwrap());
    let mut ids = Vec::new();
    for (i, name) in [
        "Widgets".to_owned(),
        "<b>&'\"\u{2028}\u{FFFE}\u{FFFF} Wid\\gets".to_owned(),
        "名".repeat(20_000),
    ]
    .into_iter()
    .enumerate()
    {
        let event = CloudEvent {
            specversion: "1.0".into(),
            id: Uuid::new_v4().to_string(),
            source: "/cvchain/test".into(),
            kind: "io.cvchain.model.released".into(),
            subject: format!("projects/{project}/iterations/it-{i}"),
            time: "2026-12-01T10:00:00Z".into(),
            datacontenttype: "application/json".into(),
            traceparent: None,
            tracestate: None,
            data: serde_json::json!({
                "projectId": project,
                "projectName": name,
                "iterationId": format!("it-{i}"),
                "history": {"table": table, "partitionKey": project, "rowKey": format!("ExportStep_{i}")},
            }),
        };
        let row = outbox_row(
            project,
            &event,
            &format!("ExportStep_{i}"),
            &[Sink::Queue],
            &format!("{:020}-000", i + 1),
        );
        store.record(&row).await.unwrap();
        ids.push(event.id);
    }
    ids
}

/// Reads `count` messages of `queue` with Microsoft's Python queue SDK, decoding as `encoding`
/// says (`base64`: its TextBase64DecodePolicy, as a default queue trigger decodes); each
/// message's attributes as the CloudEvents SDK read them. Panics naming what did not decode.
fn read_queue_with_sdk(
    python: &str,
    connection: &str,
    queue: &str,
    encoding: &str,
    count: usize,
) -> Vec<Value> {
    let out = Command::new(python)
        .arg(repo_root().join("tests/python/events_receiver.py"))
        .args([
            "read-queue",
            connection,
            queue,
            encoding,
            &count.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Microsoft's queue SDK ({encoding}) could not read the events queue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The events queue is written base64 by default, so Microsoft's queue SDK with its base64
/// decode policy (what a default Functions queue trigger does) reads every event, in order; a
/// 60 KB event is shortened to fit 64 KiB as base64 sends it. With
/// `CVCHAIN_EVENTS_QUEUE_ENCODING=none` the same events are JSON text the SDK reads without a
/// policy, the 60 KB one whole, the characters XML cannot carry escaped in their JSON strings.
/// (Before, each message was raw JSON: the base64 policy refused the first one, as a default
/// trigger would have sent it to the poison queue.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_queue_reads_as_a_default_queue_trigger_reads_it() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let python = python();
    for encoding in ["base64", "none"] {
        let table = unique("QueueEnc");
        let queue = unique("cvevents");
        let mut env = vec![
            ("CVCHAIN_STORAGE", azurite.connection_string()),
            ("CVCHAIN_HISTORY_TABLE", table.clone()),
            ("CVCHAIN_EVENTS_QUEUE", queue.clone()),
        ];
        if encoding == "none" {
            env.push(("CVCHAIN_EVENTS_QUEUE_ENCODING", "none".into()));
        }
        let events = events_of(&env);
        let project = Uuid::new_v4().to_string();
        let ids = queue_events(&clients, &table, &project).await;
        let report = events.deliver(&project).await.unwrap();
        assert_eq!(report.delivered, 3, "{encoding}: {report:?}");
        let got = read_queue_with_sdk(&python, &azurite.connection_string(), &queue, encoding, 3);
        let got_ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(got_ids, ids, "{encoding}: every event, in order");
        assert_eq!(
            got[1]["data"]["projectName"], "<b>&'\"\u{2028}\u{FFFE}\u{FFFF} Wid\\gets",
            "{encoding}: the same names"
        );
        for e in &got {
            assert!(e["messageSize"].as_u64().unwrap() <= 64 * 1024, "{e:.200}");
        }
        let large = &got[2]["data"];
        if encoding == "base64" {
            assert_eq!(large["trimmed"]["by"], "queue", "{large:.300}");
            assert!(large["projectName"].as_str().unwrap().ends_with('…'));
        } else {
            assert!(large.get("trimmed").is_none(), "whole as text");
            assert_eq!(
                large["projectName"].as_str().unwrap().chars().count(),
                20_000
            );
        }
    }
}

/// `count` events of `project`, for `sinks`, in this order; their ids.
async fn events_for(
    clients: &StorageClients,
    table: &str,
    project: &str,
    sinks: &[cvchain_core::events::Sink],
    count: usize,
) -> Vec<String> {
    use cvchain_core::events::{CloudEvent, outbox_row};
    let store = cvchain_azure::history::store::HistoryStore::new(clients.table(table).unwrap());
    let mut ids = Vec::new();
    for i in 0..count {
        let event = CloudEvent {
            specversion: "1.0".into(),
            id: Uuid::new_v4().to_string(),
            source: "/cvchain/test".into(),
            kind: "io.cvchain.export.requested".into(),
            subject: format!("projects/{project}/iterations/it-{i}"),
            time: "2026-12-01T10:00:00Z".into(),
            datacontenttype: "application/json".into(),
            traceparent: None,
            tracestate: None,
            data: serde_json::json!({"projectId": project, "iterationId": format!("it-{i}"),
                "history": {"table": table, "partitionKey": project, "rowKey": format!("ExportStep_{i}")}}),
        };
        let row = outbox_row(
            project,
            &event,
            &format!("ExportStep_{i}"),
            sinks,
            &format!("{:020}-000", i + 1),
        );
        store.record(&row).await.unwrap();
        ids.push(event.id);
    }
    ids
}

/// An Event Grid namespace topic (`…/topics/<name>:publish`) is published to with its own
/// scheme: `api-version=2023-11-01` and `Authorization: SharedAccessKey <key>` (the local topic
/// refuses a custom topic's `aeg-sas-key`, as the service does), or a bearer token over https;
/// `cvchain check` says which kind it detected. (Before, a namespace topic got `aeg-sas-key`:
/// every publish was refused with 401.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_topic_is_published_to_with_its_own_scheme() {
    use cvchain_azure::events::{
        settings::{EventGridAuth, EventGridSettings, EventsSettings},
        sinks::{EVENTGRID_SCOPE, SinkOptions, Sinks},
    };
    use cvchain_core::events::{Sink, delivery::Answer};
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let topic =
        EventGridTopic::start_namespace("cvchain-events", TopicAuth::Key(TOPIC_KEY.into())).await;
    assert!(topic.endpoint.ends_with("/topics/cvchain-events:publish"));
    let table = unique("Namespace");
    let env = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CVCHAIN_QUEUE", unique("cvq")),
        ("CVCHAIN_EVENTGRID_ENDPOINT", topic.endpoint.clone()),
        ("CVCHAIN_EVENTGRID_KEY", TOPIC_KEY.into()),
    ];
    let project = Uuid::new_v4().to_string();
    let ids = events_for(&clients, &table, &project, &[Sink::EventGrid], 3).await;
    let report = events_of(&env).deliver(&project).await.unwrap();
    assert_eq!(report.delivered, 3, "{report:?}: {:?}", topic.refused());
    assert!(topic.refused().is_empty(), "{:?}", topic.refused());
    assert_eq!(topic.batches(), 1, "one request for the three");
    let got: Vec<String> = topic
        .events()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids);
    let texts: Vec<String> = topic.events().iter().map(Value::to_string).collect();
    assert_eq!(parse_with_sdk(&python(), &texts).len(), 3);
    // `cvchain check` names the kind and its scheme.
    let out = Command::new(env!("CARGO_BIN_EXE_cvchain"))
        .arg("check")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("event sink: Event Grid"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.starts_with("✓")
            && line.contains("namespace topic (api-version 2023-11-01, a key goes in Authorization: SharedAccessKey)"),
        "{line}"
    );
    assert!(!text.contains(TOPIC_KEY), "{text}");
    // A wrong key: refused for good, the answer recorded, the key never in it.
    let wrong =
        EventGridTopic::start_namespace("cvchain-events", TopicAuth::Key("other".into())).await;
    let settings = |endpoint: &str, auth: EventGridAuth| EventsSettings {
        event_grid: Some(EventGridSettings {
            endpoint: url::Url::parse(&format!("{endpoint}?api-version=2023-11-01")).unwrap(),
            auth,
        }),
        ..Default::default()
    };
    let sinks = Sinks::new(
        &settings(
            &wrong.endpoint,
            EventGridAuth::Key(azure_core::credentials::Secret::new(TOPIC_KEY)),
        ),
        &clients,
        SinkOptions::default(),
    )
    .unwrap();
    let answers = sinks.send(Sink::EventGrid, &one_event()).await;
    let [
        Answer::Refused {
            status: Some(401),
            detail,
            ..
        },
    ] = &answers[..]
    else {
        panic!("{answers:?}")
    };
    assert!(!detail.contains(TOPIC_KEY), "{detail}");
    // Microsoft Entra ID: a bearer token for Event Grid's scope, over https.
    let ca = cvchain_testkit::TestCa::generate();
    let token = format!("token-for:{EVENTGRID_SCOPE}");
    let entra = EventGridTopic::start_namespace_https("cv", TopicAuth::Bearer(token), &ca).await;
    let credential = std::sync::Arc::new(cvchain_testkit::RecordingCredential::default());
    let sinks = Sinks::new(
        &settings(
            &entra.endpoint,
            EventGridAuth::ManagedIdentity { client_id: None },
        ),
        &clients,
        SinkOptions {
            transport: Some(ca.transport()),
            eventgrid_credential: Some(credential.clone()),
            timeout: None,
        },
    )
    .unwrap();
    let answers = sinks.send(Sink::EventGrid, &one_event()).await;
    assert_eq!(
        answers,
        vec![Answer::Delivered("HTTP 200".into())],
        "{:?}",
        entra.refused()
    );
    assert_eq!(entra.events().len(), 1);
    assert_eq!(*credential.scopes.lock().unwrap(), vec![EVENTGRID_SCOPE]);
}

// ---------------------------------------------------------------------------------------------
// People are consumers too: Teams and Slack.

const CONSOLE: &str = "https://cv-app.azurewebsites.net/api/history";

/// Validates Teams messages with Microsoft's Adaptive Cards library (`tests/node`, the pinned
/// `adaptivecards` npm package); each card's texts as the library read them back.
fn validate_cards(messages: &[Value]) -> Vec<Vec<String>> {
    use std::io::Write;
    let mut child = Command::new("node")
        .arg(repo_root().join("tests/node/adaptive_cards.js"))
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (Node.js 20, as for Azurite)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(messages).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        out.status.success() && results.len() == messages.len(),
        "the Adaptive Cards library refused a card: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    results
        .iter()
        .map(|r| {
            r["texts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

/// The event id a chat message names in its footer (`… · event <id>`).
fn event_id_of(message: &Value) -> String {
    let text = message.to_string();
    let at = text.rfind("event ").expect("a footer naming the event") + "event ".len();
    text[at..at + 36].to_owned()
}

/// Every Teams card cvchain makes, of every event type and of names no one would choose
/// (10,000 quotes, `<>&`, U+2028, 80,000 characters; 5,000 reasons), is an Adaptive Card 1.5
/// that Microsoft's library parses and validates whole, within Teams's 28 KB.
#[test]
fn every_teams_card_is_an_adaptive_card_microsofts_library_reads_whole() {
    use cvchain_core::events::{CloudEvent, EventType, Routing, Sink, delivery::chat_for};
    let routing = Routing {
        console: Some(CONSOLE.into()),
        ..Default::default()
    };
    let project = Uuid::new_v4().to_string();
    let hostile = [
        "Widgets".to_owned(),
        format!(
            "{}<b>&\u{2028}\\ *x* [l](https://e.example)",
            "\"".repeat(10_000)
        ),
        "名".repeat(80_000),
    ];
    let mut messages = Vec::new();
    for kind in EventType::ALL {
        for name in &hostile {
            let event = CloudEvent {
                specversion: "1.0".into(),
                id: Uuid::new_v4().to_string(),
                source: "/cvchain/test".into(),
                kind: kind.as_str().into(),
                subject: format!("projects/{project}/iterations/x"),
                time: "2026-12-01T10:00:00Z".into(),
                datacontenttype: "application/json".into(),
                traceparent: None,
                tracestate: None,
                data: serde_json::json!({
                    "projectId": project, "projectName": name, "iterationId": "x",
                    "iterationName": name, "verdict": "failed", "passed": false,
                    "reasons": (0..5_000).map(|n| format!("rule {n} of {:.40}", name)).collect::<Vec<_>>(),
                    "metrics": {"precision": 0.9, "recall": null, "mAP": 0.5},
                    "channel": "production", "pointer": true, "reason": name,
                    "previousIteration": {"id": "y", "name": name},
                    "platform": "ONNX", "flavor": null, "status": "Failed",
                    "exports": [{"platform": "ONNX", "status": "Done"}, {"platform": name, "status": "Refused", "reason": name}],
                }),
            };
            let body = chat_for(&event, Sink::Teams, &routing).body;
            assert!(body.len() <= 28_000, "{kind:?}: {}", body.len());
            messages.push(serde_json::from_str::<Value>(&body).unwrap());
        }
    }
    let texts = validate_cards(&messages);
    assert!(
        texts
            .iter()
            .all(|t| t.iter().any(|s| s.starts_with(CONSOLE))),
        "each card links to the console"
    );
}

/// A chain through the worker tells Teams and Slack what an ML team acts on, in order, once:
/// the gate's verdict with the metrics and reasons, production moving (with the previous
/// holder), an export that failed, the chain completed; then a training that failed. The other
/// events are recorded as skipped for chat and hold up nothing. Each Teams card is validated by
/// Microsoft's Adaptive Cards library, each Slack payload checked by the local webhook. Replay
/// sends a chosen event again and never an unchosen one; `events test` and `check` reach both;
/// no URL key (Teams's `sig`, Slack's path key) is ever shown or kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_tells_teams_and_slack_what_people_act_on_in_order_once() {
    use cvchain_testkit::chat::Receiver as Chat;
    let mut w = world(true).await;
    w._standin.set_faults(Faults {
        next_metrics: vec![Metrics {
            precision: 0.9,
            recall: 0.85,
            average_precision: 0.88,
        }],
        fail_export_platforms: vec!["TensorFlow".into()],
        ..Default::default()
    });
    let teams = Chat::teams().await;
    let slack = Chat::slack().await;
    w.env.push(("CVCHAIN_TEAMS_WEBHOOK_URL", teams.url.clone()));
    w.env.push(("CVCHAIN_SLACK_WEBHOOK_URL", slack.url.clone()));
    w.env.push(("CVCHAIN_CONSOLE_URL", format!("{CONSOLE}/")));
    w.receiver.start();
    w.handlers.push(Handler::start_worker(&w.env));
    let iteration = w.api.train(w.project).await;
    let want = [
        "io.cvchain.gate.evaluated",
        "io.cvchain.channel.moved",
        "io.cvchain.export.failed",
        "io.cvchain.chain.completed",
    ];
    w.wait("the chain told, chat caught up", 90, |_, outbox| {
        outbox
            .iter()
            .any(|r| r.entity["CloudEventType"] == "io.cvchain.chain.completed")
            && outbox.iter().all(|r| r.entity["Pending"] == false)
            && teams.messages().len() >= want.len()
            && slack.messages().len() >= want.len()
    })
    .await;
    assert!(teams.refused().is_empty(), "{:?}", teams.refused());
    assert!(slack.refused().is_empty(), "{:?}", slack.refused());
    let outbox = w.outbox().await;
    let state = |r: &StoredEntity, prop: &str| -> String {
        let s: Value = serde_json::from_str(r.entity[prop].as_str().unwrap()).unwrap();
        s["state"].as_str().unwrap().to_owned()
    };
    // The chosen events, in the outbox's order, delivered; every other one skipped.
    let chosen: Vec<(String, String)> = outbox
        .iter()
        .filter(|r| state(r, "TeamsDelivery") == "delivered")
        .map(|r| {
            (
                r.entity["CloudEventType"].as_str().unwrap().to_owned(),
                r.entity["EventId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let kinds: Vec<&str> = chosen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, want);
    for r in &outbox {
        let s = state(r, "TeamsDelivery");
        assert!(s == "delivered" || s == "skipped", "{s}");
        assert_eq!(s, state(r, "SlackDelivery"));
        assert_eq!(
            state(r, "WebhookDelivery"),
            "delivered",
            "the webhook gets everything"
        );
    }
    assert!(
        outbox.len() > want.len() + 4,
        "most events are not for chat"
    );
    let ids: Vec<&str> = chosen.iter().map(|(_, id)| id.as_str()).collect();
    for (name, chat) in [("Teams", &teams), ("Slack", &slack)] {
        let got: Vec<String> = chat.messages().iter().map(event_id_of).collect();
        assert_eq!(got, ids, "{name}: each chosen event once, in order");
    }
    // What the messages say, as Microsoft's library reads the cards back.
    let cards = validate_cards(&teams.messages());
    let link = format!("{CONSOLE}/{}", w.project);
    let has = |texts: &[String], want: &str| texts.iter().any(|t| t.contains(want));
    let gate = &cards[0];
    for want in [
        "Gate passed: Widgets · Iteration 1",
        "90.0%",
        "85.0%",
        "88.0%",
        "passed",
        "map 0.88 >= 0.80",
        &link,
    ] {
        assert!(has(gate, want), "{want} in {gate:?}");
    }
    let moved = &cards[1];
    for want in [
        "Production moved: Widgets · Iteration 1",
        "Previous holder",
        "none (its first holder)",
        "gate",
    ] {
        assert!(has(moved, want), "{want} in {moved:?}");
    }
    let failed = &cards[2];
    assert!(
        has(failed, "Export failed") && has(failed, "TensorFlow"),
        "{failed:?}"
    );
    let done = &cards[3];
    assert!(
        has(done, "Export chain completed, 1 export(s) failed"),
        "{done:?}"
    );
    assert!(
        has(done, "ONNX: Done") && has(done, "TensorFlow (TensorFlowLite): Failed"),
        "{done:?}"
    );
    let slack_text: Vec<String> = slack.messages().iter().map(Value::to_string).collect();
    assert!(slack_text[0].contains(":white_check_mark: Gate passed: Widgets · Iteration 1"));
    assert!(slack_text[0].contains(&format!("<{link}|Open in the console>")));
    assert!(slack_text[1].contains("Production moved"));
    assert!(slack_text[2].contains(":x: Export failed"));
    let _ = iteration;

    // A training that fails: told at once.
    w._standin.set_faults(Faults {
        fail_training: true,
        ..Default::default()
    });
    w.api.train(w.project).await;
    w.wait("the failed training told", 60, |_, _| {
        teams.messages().len() > want.len() && slack.messages().len() > want.len()
    })
    .await;
    let last = validate_cards(&teams.messages()[want.len()..]);
    assert!(has(&last[0], "Training failed: Widgets"), "{last:?}");
    assert!(
        slack.messages()[want.len()]
            .to_string()
            .contains(":x: Training failed")
    );

    // Replay: a chosen event again (same message), an unchosen one never.
    let before = teams.messages().len();
    let out = w.cvchain(&["events", "replay", "--type", "gate.evaluated"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = w.cvchain(&["events", "replay", "--type", "export.requested"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.wait("the replayed verdict told again", 30, |_, outbox| {
        teams.messages().len() > before
            && slack.messages().len() > before
            && outbox.iter().all(|r| r.entity["Pending"] == false)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for chat in [&teams, &slack] {
        let again: Vec<String> = chat.messages()[before..].iter().map(event_id_of).collect();
        assert_eq!(again, [ids[0]], "only the verdict, once more");
    }
    let listed = String::from_utf8_lossy(&w.cvchain(&["events"]).stdout).into_owned();
    assert!(
        listed.contains("teams=skipped") && listed.contains("slack=delivered"),
        "{listed}"
    );

    // `events test` reaches both (a card the library reads); `check` reaches both.
    let out = w.cvchain(&["events", "test"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("✓ Teams http://127.0.0.1:") && text.contains("✓ Slack http://127.0.0.1:"),
        "{text}"
    );
    let test_card = teams.messages().last().unwrap().clone();
    assert!(has(
        &validate_cards(&[test_card])[0],
        "cvchain test message"
    ));
    assert!(
        slack
            .messages()
            .last()
            .unwrap()
            .to_string()
            .contains("cvchain test message")
    );
    let check = String::from_utf8_lossy(&w.cvchain(&["check"]).stdout).into_owned();
    assert!(
        check.contains("✓ event sink: Teams http://127.0.0.1:"),
        "{check}"
    );
    assert!(
        check.contains("✓ event sink: Slack http://127.0.0.1:"),
        "{check}"
    );
    assert!(
        check.contains("/services/T0CVCHAIN/B0CVCHAIN/REDACTED"),
        "{check}"
    );
    // No key of either URL anywhere: outputs, logs, rows, what every sink got.
    for shown in [&text, &check, &listed] {
        assert!(
            !shown.contains(&teams.key) && !shown.contains(&slack.key),
            "{shown}"
        );
    }
    let mut everything: Vec<String> = w.handlers.iter().map(|h| h.stderr()).collect();
    everything.extend(
        w.rows()
            .await
            .iter()
            .map(|r| Value::Object(r.entity.clone()).to_string()),
    );
    everything.extend(teams.messages().iter().map(Value::to_string));
    everything.extend(slack.messages().iter().map(Value::to_string));
    cvchain_testkit::assert_no_secrets(
        "logs, rows and chat messages",
        &everything.join("\n"),
        &[&teams.key, &slack.key, TOPIC_KEY, KEY],
    );
    w.assert_no_secrets().await;
}
