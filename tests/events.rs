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
//!   event arrives, in order, none lost; then `events test`, `events replay` and `check`.

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
            _dir: dir,
        }
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
            ("name", "Widgets"),
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

    /// Takes what the events queue holds now.
    async fn drain_events_queue(&mut self) {
        loop {
            let got = cvchain_testkit::take_messages(&self.clients, &self.events_queue).await;
            if got.is_empty() {
                return;
            }
            self.queued.extend(got.into_iter().map(|(text, _)| text));
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

/// The `DeliverEvents` timer function as the host invokes it, and an event larger than a
/// webhook should carry: sent trimmed to the webhook (with a pointer to its history row and the
/// outbox row saying so), whole to the queue and Event Grid.
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
    assert_eq!(r["data"]["history"]["rowKey"], "ExportStep_x_ONNX");
    assert!(r["data"].get("notes").is_none());
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
