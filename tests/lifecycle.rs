//! The model lifecycle end to end (Azurite, the stand-in, `cvchain serve` and `cvchain worker`):
//! four iterations of one project, one below the gate, one passing, one passing the thresholds
//! but worse than the second (`improves:map`), one better. Every message is delivered three
//! times, two of them at the same moment to two instances. At the end `production` and `latest`
//! hold the fourth, the channel copies equal their release copies and are found by their tags,
//! the manifest says so, the prediction endpoint serves production, and retention has deleted
//! exactly what its rules allow. Then a late message of an older iteration moves nothing, and
//! `promote` and `rollback` move production by hand.

use azure_storage_blob::models::BlobClientGetPropertiesResultHeaders;
use cvchain_azure::storage::{clients::StorageClients, queue::send_text, table::StoredEntity};
use cvchain_standin::{COMPACT_DOMAIN, Faults, Metrics, Standin};
use cvchain_testkit::{Azurite, Handler, StandinApi, unique};
use serde_json::Value;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

const KEY: &str = "lifecycle-key-93b1";
const CHAIN: &str = "ONNX, TensorFlow:TensorFlowLite";
const TARGETS: [&str; 2] = ["ONNX", "TensorFlow-TensorFlowLite"];
const PREDICTION: &str =
    "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/pred";
/// mAP of the four iterations: below 0.80, passing, passing but not better, better.
const MAPS: [f64; 4] = [0.70, 0.85, 0.82, 0.90];

struct World {
    azurite: Azurite,
    standin: Standin,
    clients: StorageClients,
    api: StandinApi,
    table: String,
    /// Where the stand-in writes the notifications.
    source: String,
    project: Uuid,
    env: Vec<(&'static str, String)>,
    handlers: Vec<Handler>,
}

async fn world(extra: &[(&'static str, String)]) -> World {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let standin = Standin::start(cvchain_testkit::standin_config(&clients, KEY, 50))
        .await
        .unwrap();
    standin.set_faults(Faults {
        next_metrics: MAPS
            .iter()
            .map(|m| Metrics {
                precision: *m,
                recall: *m,
                average_precision: *m,
            })
            .collect(),
        ..Default::default()
    });
    let source = unique("cvsource");
    let table = unique("Lifecycle");
    let backup = azurite.container_url("cvbackups");
    let mut env = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", unique("cvq")),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", CHAIN.into()),
        ("CVCHAIN_BACKUP_CONTAINER", backup.clone()),
        ("CVCHAIN_GATE", "map>=0.80,improves:map".into()),
        ("CVCHAIN_PUBLISH_NAME", "prod".into()),
        ("CVCHAIN_PREDICTION_RESOURCE_ID", PREDICTION.into()),
        // Deliveries are counted by hand here; the host's give-up is not what is tested.
        ("CVCHAIN_MAX_DEQUEUE", "100".into()),
        ("CVCHAIN_WORKER_RETRY_SECONDS", "1".into()),
        ("CVCHAIN_WORKER_MAX_POLL_SECONDS", "1".into()),
    ];
    env.extend(extra.iter().cloned());
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
        azurite,
        standin,
        clients,
        api,
        table,
        source,
        project,
        env,
        handlers: Vec::new(),
    }
}

impl World {
    fn queue(&self) -> String {
        self.env
            .iter()
            .find(|(k, _)| *k == "CVCHAIN_QUEUE")
            .unwrap()
            .1
            .clone()
    }

    async fn rows(&self) -> Vec<StoredEntity> {
        self.clients
            .table(&self.table)
            .unwrap()
            .query(None, 10_000)
            .await
            .unwrap_or_default()
    }

    async fn rows_of(&self, kind: &str) -> Vec<StoredEntity> {
        self.rows()
            .await
            .into_iter()
            .filter(|r| r.entity["EventType"] == kind)
            .collect()
    }

    /// The next messages of the stand-in's queue, deleted from it.
    async fn take(&self) -> Vec<(String, String)> {
        cvchain_testkit::take_messages(&self.clients, &self.source).await
    }

    /// One message to both `serve` instances at the same moment, then once more to each: three
    /// deliveries or more, as the host makes them when it retries. A 500 (the other instance
    /// holds a claim) is retried, as the host would.
    async fn deliver(&self, text: &str, id: &str) {
        cvchain_testkit::deliver_to_both(&self.handlers[0], &self.handlers[1], text, id).await;
    }

    /// Whether the iteration's exports are all released, and every notification has been
    /// handled.
    async fn released(&self, iteration: Uuid) -> bool {
        let steps = self
            .rows_of("ExportStep")
            .await
            .into_iter()
            .filter(|r| r.entity["IterationId"] == iteration.to_string())
            .filter(|r| r.entity.contains_key("ReleaseUrl"))
            .count();
        steps == TARGETS.len()
    }

    /// Trains the next iteration and drives the chain through `serve` until it is released.
    async fn train_with_serve(&self) -> Uuid {
        let iteration = self.api.train(self.project).await;
        let start = Instant::now();
        loop {
            let batch = self.take().await;
            for (text, id) in &batch {
                self.deliver(text, id).await;
            }
            if batch.is_empty() && self.released(iteration).await && self.quiet().await {
                return iteration;
            }
            assert!(start.elapsed() < Duration::from_secs(90), "iteration stuck");
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Trains the next iteration; its messages go three times each onto the workers' queue.
    async fn train_with_workers(&self) -> Uuid {
        let iteration = self.api.train(self.project).await;
        let target = self.clients.queue(&self.queue()).unwrap();
        let start = Instant::now();
        loop {
            let batch = self.take().await;
            for (text, _) in &batch {
                for _ in 0..3 {
                    send_text(&target, text).await.unwrap();
                }
            }
            if batch.is_empty() && self.released(iteration).await && self.quiet().await {
                return iteration;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "iteration stuck"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Nothing left to do: the stand-in is idle, and the workers' queue (in-flight messages
    /// included) is empty.
    async fn quiet(&self) -> bool {
        let exports = self
            .api
            .get(&format!("projects/{}/iterations", self.project))
            .await;
        let busy = exports
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["status"] == "Training");
        if busy {
            return false;
        }
        let q = self.clients.queue(&self.queue()).unwrap();
        let count = q
            .get_properties(None)
            .await
            .ok()
            .map(|p| {
                p.headers()
                    .get_optional_string(&azure_core::http::headers::HeaderName::from_static(
                        "x-ms-approximate-messages-count",
                    ))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        count == 0
    }

    async fn blob(
        &self,
        path: &str,
    ) -> Option<(Vec<u8>, HashMap<String, String>, Option<Vec<u8>>)> {
        let blob = self
            .clients
            .blob_service()
            .unwrap()
            .blob_container_client("models")
            .blob_client(path);
        let props = blob.get_properties(None).await.ok()?;
        let meta = props.metadata().unwrap();
        let md5 = props.content_md5().unwrap();
        let body = blob
            .download(None)
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .to_vec();
        Some((body, meta, md5))
    }

    async fn manifest(&self) -> Value {
        let (bytes, ..) = self
            .blob("Widgets/channels.json")
            .await
            .expect("a manifest");
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Blobs of the release container with these tags.
    async fn tagged(&self, filter: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let service = self.clients.blob_service().unwrap();
        let mut pages = service
            .find_blobs_by_tags(filter, None)
            .unwrap()
            .into_pages();
        let mut out = Vec::new();
        while let Some(page) = pages.try_next().await.unwrap() {
            for b in page.into_model().unwrap().blob_items {
                out.push(b.name.unwrap_or_default());
            }
        }
        out.sort();
        out
    }

    async fn published(&self) -> Vec<String> {
        self.api
            .get(&format!("projects/{}/iterations", self.project))
            .await
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["publishName"] == "prod")
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Runs a command of the binary with this world's settings.
    fn command(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(cvchain_testkit::handler::cvchain_bin());
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Everything the four iterations should have left, whichever entry point ran them.
    async fn assert_end_state(&self, its: &[Uuid]) {
        let fourth = its[3].to_string();
        // The gate's verdicts, with their reasons.
        let training = self.rows_of("Training").await;
        let verdict = |i: usize| {
            let r = training
                .iter()
                .find(|r| r.entity["IterationId"] == its[i].to_string())
                .unwrap();
            (
                r.entity["GateVerdict"].as_str().unwrap().to_owned(),
                r.entity["GateReasons"].as_str().unwrap().to_owned(),
            )
        };
        assert_eq!(verdict(0), ("failed".into(), "map 0.70 < 0.80".into()));
        assert_eq!(verdict(1).0, "passed");
        assert_eq!(
            verdict(2),
            ("failed".into(), "map 0.82 <= production's 0.85".into())
        );
        assert_eq!(verdict(3).0, "passed");

        // The manifest: both channels on the fourth, for both targets.
        let m = self.manifest().await;
        assert_eq!(m["schema"], "cvchain.channels/1");
        assert_eq!(m["productionPointer"]["iteration"]["id"], fourth);
        for channel in ["production", "latest"] {
            for target in TARGETS {
                let e = &m["channels"][channel]["targets"][target];
                assert_eq!(e["iteration"]["id"], fourth, "{channel} {target}: {e}");
                assert_eq!(e["iteration"]["mAP"], 0.90);
                // The channel copy equals the release copy it came from.
                let (release, _, release_md5) =
                    self.blob(e["releasePath"].as_str().unwrap()).await.unwrap();
                let (copy, meta, copy_md5) =
                    self.blob(e["channelPath"].as_str().unwrap()).await.unwrap();
                assert_eq!(copy, release, "{channel} {target}");
                assert_eq!(copy_md5, release_md5);
                assert_eq!(e["size"], release.len());
                assert_eq!(meta["iterationid"], fourth);
                assert_eq!(meta["channel"], channel);
                assert_eq!(meta["map"], "0.9000");
                let previous = if channel == "production" { 1 } else { 2 };
                assert_eq!(e["previous"]["id"], its[previous].to_string(), "{channel}");
                assert_eq!(meta["previousiterationid"], its[previous].to_string());
            }
            // Found by their tags, as a deployment would look for them.
            let found = self
                .tagged(&format!(
                    "\"channel\"='{channel}' AND \"projectId\"='{}' AND \"platform\"='ONNX'",
                    self.project
                ))
                .await;
            assert_eq!(found, vec![format!("Widgets/channels/{channel}/ONNX.zip")]);
        }
        // The prediction endpoint serves production.
        assert_eq!(self.published().await, vec![fourth.clone()]);
        // Every move once: latest moved for each of the four iterations, production for the
        // second and the fourth (for both targets), and the pointer twice.
        let moves = self.rows_of("ChannelMove").await;
        let target_moves = moves
            .iter()
            .filter(|r| {
                r.entity
                    .get("Platform")
                    .and_then(Value::as_str)
                    .is_some_and(|p| !p.is_empty())
            })
            .count();
        let pointer_moves = moves.len() - target_moves;
        assert_eq!((target_moves, pointer_moves), (12, 2), "{moves:#?}");
        // Nothing failed or was poisoned on the way.
        assert!(self.rows_of("Failed").await.is_empty());
        assert!(self.rows_of("Rejected").await.is_empty());
    }
}

// Several threads: the commands run as processes that call the stand-in, which runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_iterations_through_serve_twice_at_once_with_retention_promote_and_rollback() {
    let mut w = world(&[("CVCHAIN_KEEP_ITERATIONS", "2".into())]).await;
    w.handlers = vec![Handler::start(&w.env), Handler::start(&w.env)];
    let mut its = Vec::new();
    for _ in 0..4 {
        its.push(w.train_with_serve().await);
    }
    w.assert_end_state(&its).await;

    // Retention (N = 2): the first and the second iterations went, each with its row; the
    // third and the fourth stay.
    let left: Vec<String> = w
        .api
        .get(&format!("projects/{}/iterations", w.project))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&its[2].to_string()) && left.contains(&its[3].to_string()));
    let mut deleted: Vec<String> = w
        .rows_of("IterationDeleted")
        .await
        .iter()
        .map(|r| r.entity["IterationId"].as_str().unwrap().to_owned())
        .collect();
    deleted.sort();
    let mut want = vec![its[0].to_string(), its[1].to_string()];
    want.sort();
    assert_eq!(deleted, want);
    let second = w
        .rows_of("IterationDeleted")
        .await
        .into_iter()
        .find(|r| r.entity["IterationId"] == its[1].to_string())
        .unwrap();
    assert!(
        second.entity["Kept"]
            .as_str()
            .unwrap()
            .contains("among the newest 2"),
        "{second:?}"
    );

    // A late ExportCompleted of the third iteration moves nothing.
    let revision = w.manifest().await["revision"].clone();
    let late = format!(
        r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{}","iterationId":"{}","exportStatus":"ExportCompleted","modelUri":""}}}}"#,
        w.project, its[2]
    );
    w.deliver(&late, "late-1").await;
    assert_eq!(w.manifest().await["revision"], revision);

    // Promote the third by hand: production moves back to it, publishing follows, the row
    // says the gate was bypassed.
    let project = w.project.to_string();
    let (ok, out) = w.command(&[
        "promote",
        "--project",
        &project,
        "--iteration",
        &its[2].to_string(),
        "--reason",
        "field test",
    ]);
    assert!(ok, "{out}");
    let m = w.manifest().await;
    for target in TARGETS {
        let e = &m["channels"]["production"]["targets"][target];
        assert_eq!(e["iteration"]["id"], its[2].to_string());
        assert_eq!(e["reason"], "manual");
        assert!(
            e["note"]
                .as_str()
                .unwrap()
                .contains("the gate was not consulted")
        );
    }
    assert_eq!(w.published().await, vec![its[2].to_string()]);
    assert!(w.rows_of("ChannelMove").await.iter().any(|r| {
        r.entity
            .get("Note")
            .and_then(Value::as_str)
            .is_some_and(|n| n.contains("field test"))
    }));

    // Roll back: production returns to the fourth, which is published again.
    let (ok, out) = w.command(&["rollback", "--project", &project]);
    assert!(ok, "{out}");
    let m = w.manifest().await;
    assert_eq!(
        m["productionPointer"]["iteration"]["id"],
        its[3].to_string()
    );
    for target in TARGETS {
        let e = &m["channels"]["production"]["targets"][target];
        assert_eq!(e["iteration"]["id"], its[3].to_string());
        assert_eq!(e["reason"], "rollback");
        let (copy, meta, _) = w.blob(e["channelPath"].as_str().unwrap()).await.unwrap();
        let (release, ..) = w.blob(e["releasePath"].as_str().unwrap()).await.unwrap();
        assert_eq!(copy, release);
        assert_eq!(meta["reason"], "rollback");
    }
    assert_eq!(w.published().await, vec![its[3].to_string()]);
    // The third is vetoed now: its redelivered message does not take production back.
    w.deliver(&late, "late-2").await;
    assert_eq!(
        w.manifest().await["channels"]["production"]["targets"]["ONNX"]["iteration"]["id"],
        its[3].to_string()
    );

    // `cvchain channels` shows the same manifest.
    let (ok, out) = w.command(&["channels", "--project", &project, "--json"]);
    assert!(ok, "{out}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0], w.manifest().await);
    let (ok, out) = w.command(&["channels", "--project", &project]);
    assert!(ok && out.contains("production follows"), "{out}");

    let secrets = [KEY, cvchain_azure::storage::settings::DEV_ACCOUNT_KEY];
    for h in &w.handlers {
        cvchain_testkit::assert_no_secrets("the handlers' logs", &h.stderr(), &secrets);
    }
    let rows = serde_json::to_string(&w.rows().await.iter().map(|r| &r.entity).collect::<Vec<_>>())
        .unwrap();
    cvchain_testkit::assert_no_secrets("the history rows", &rows, &secrets);
    drop(w.azurite);
}

#[tokio::test]
async fn four_iterations_through_two_workers_with_every_message_three_times() {
    let mut w = world(&[]).await;
    w.handlers = vec![Handler::start_worker(&w.env), Handler::start_worker(&w.env)];
    let mut its = Vec::new();
    for _ in 0..4 {
        its.push(w.train_with_workers().await);
    }
    w.assert_end_state(&its).await;
    // Without retention every iteration stays.
    let all = w
        .api
        .get(&format!("projects/{}/iterations", w.project))
        .await;
    assert_eq!(all.as_array().unwrap().len(), 4);
    assert!(w.rows_of("IterationDeleted").await.is_empty());
    drop(w.standin);
}

#[tokio::test]
async fn a_manifest_someone_else_wrote_is_left_alone_and_named() {
    let w = world(&[]).await;
    let mut w = w;
    w.handlers = vec![Handler::start(&w.env), Handler::start(&w.env)];
    // Someone else's file where the manifest goes.
    let blob = w
        .clients
        .blob_service()
        .unwrap()
        .blob_container_client("models");
    let _ = blob.create(None).await;
    blob.blob_client("Widgets/channels.json")
        .upload(
            azure_core::http::RequestContent::from(br#"{"hello":"world"}"#.to_vec()),
            None,
        )
        .await
        .unwrap();
    let first = w.train_with_serve().await;
    let (bytes, ..) = w.blob("Widgets/channels.json").await.unwrap();
    assert_eq!(bytes, br#"{"hello":"world"}"#);
    let exports = w.rows_of("Export").await;
    let statuses: Vec<&str> = exports
        .iter()
        .filter_map(|r| r.entity.get("ChannelStatus").and_then(Value::as_str))
        .collect();
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("Widgets/channels.json was not written by cvchain")),
        "{statuses:?}"
    );
    // The release copies are there all the same.
    assert!(w.released(first).await);
}
