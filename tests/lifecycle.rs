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
        self.train_in(self.project).await
    }

    /// As `train_with_serve`, for any project wired to this world's queue.
    async fn train_in(&self, project: Uuid) -> Uuid {
        let iteration = self.api.train(project).await;
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

    /// Writes a blob of the release container, as anyone with write access to it can; a
    /// manifest keeps the index tags cvchain finds manifests by.
    async fn put(&self, path: &str, body: &[u8]) {
        let container = self
            .clients
            .blob_service()
            .unwrap()
            .blob_container_client("models");
        let _ = container.create(None).await;
        let options = path.ends_with("channels.json").then(|| {
            azure_storage_blob::models::BlockBlobClientUploadOptions {
                blob_tags_string: Some(format!("manifest=channels&projectId={}", self.project)),
                ..Default::default()
            }
        });
        container
            .blob_client(path)
            .upload(
                azure_core::http::RequestContent::from(body.to_vec()),
                options,
            )
            .await
            .unwrap();
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
        let failed = self.rows_of("Failed").await;
        assert!(failed.is_empty(), "{failed:#?}");
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

/// A release copy as cvchain leaves it (its metadata names the project and the iteration) and
/// the export's step row recording it, written by hand: what a release leaves behind.
async fn plant_release(
    clients: &StorageClients,
    history: &cvchain_azure::history::store::HistoryStore,
    project: Uuid,
    iteration: Uuid,
    path: &str,
    body: &[u8],
) -> cvchain_core::release::Released {
    use cvchain_core::chain::{EntryState, ExportTarget};
    use cvchain_core::history::{Prop, step_row};
    let blob = clients
        .blob_service()
        .unwrap()
        .blob_container_client("models");
    let _ = blob.create(None).await;
    let b = blob.blob_client(path);
    b.upload(azure_core::http::RequestContent::from(body.to_vec()), None)
        .await
        .unwrap();
    let meta: HashMap<String, String> = [
        ("projectid", project.to_string()),
        ("iterationid", iteration.to_string()),
        ("platform", "ONNX".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    b.set_metadata(&meta, None).await.unwrap();
    let target = ExportTarget {
        platform: "ONNX".into(),
        flavor: None,
    };
    let mut row = step_row(project, iteration, 0, &target, EntryState::Done);
    row.properties.set(Prop::ReleaseStatus, "released");
    row.properties
        .set(Prop::ReleaseUrl, format!("http://x/models/{path}"));
    row.properties.set(Prop::ReleasePath, path);
    row.properties.set_int(Prop::ReleaseSize, body.len() as i64);
    history.record(&row).await.unwrap();
    cvchain_core::release::Released {
        url: format!("http://x/models/{path}"),
        path: path.to_owned(),
        size: body.len() as u64,
        millis: 0,
        copied: true,
        etag: None,
        content_md5: None,
    }
}

/// Two projects named alike make their first move at the same moment: both find
/// `Twin/channels/latest/ONNX.zip` free, both write it into their manifests, and the second
/// copy loses to the first. The loser takes the id-qualified path (its manifest says so, under
/// its ETag) and copies there; nothing of the winner's is touched, and no error reaches the
/// message. Played step by step through the lifecycle, so the interleaving is the race's.
#[tokio::test]
async fn same_named_projects_racing_for_a_channel_path_each_get_a_path_of_their_own() {
    use cvchain_azure::history::store::HistoryStore;
    use cvchain_azure::storage::channels::ChannelStore;
    use cvchain_core::channels::{Channel, IterationRef, Release};
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let table = unique("Race");
    let history = HistoryStore::new(clients.table(&table).unwrap());
    let paths = cvchain_core::config::LifecycleSettings::default().channels;
    let lifecycle = cvchain::lifecycle::Lifecycle {
        history: history.clone(),
        channels: ChannelStore::new(&clients, "models", paths.clone()).unwrap(),
        cv: None,
        publish: None,
        chain: Vec::new(),
        events: None,
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (ia, ib) = (Uuid::new_v4(), Uuid::new_v4());
    let it = |id: Uuid| IterationRef {
        id,
        name: "Iteration 1".into(),
        trained_at: Some("2026-11-30T10:00:00Z".into()),
        precision: Some(0.9),
        recall: Some(0.9),
        map: Some(0.9),
    };
    let ra = plant_release(
        &clients,
        &history,
        a,
        ia,
        "Twin/Iteration-1/ONNX.zip",
        b"model A",
    )
    .await;
    let rb = plant_release(
        &clients,
        &history,
        b,
        ib,
        &format!("Twin-{b}/Iteration-1-{ib}/ONNX.zip"),
        b"model B",
    )
    .await;
    let now = time::OffsetDateTime::now_utc();
    let plain = "Twin/channels/latest/ONNX.zip".to_owned();
    // A found the plain path free and wrote it into its manifest; its copy has not run yet.
    let release_a = Release {
        target: cvchain_core::chain::ExportTarget {
            platform: "ONNX".into(),
            flavor: None,
        },
        release_path: ra.path.clone(),
        size: 7,
        content_md5: None,
    };
    let to_plain = |c: Channel, t: &cvchain_core::chain::ExportTarget| {
        Some(paths.channel_path(a, "Twin", c, t, false))
    };
    lifecycle
        .channels
        .update(a, "Twin", now, |m| {
            m.released(&it(ia), std::slice::from_ref(&release_a), &to_plain, now)
        })
        .await
        .unwrap();
    // B finds the plain path free too, and its copy lands first.
    let steps_b = history.steps(b, ib).await.unwrap();
    let delivery = cvchain::lifecycle::Delivery {
        now,
        // Not the message's last delivery: a failure here would retry it, and stall nothing
        // yet.
        last: false,
    };
    lifecycle
        .move_channels(
            b,
            "Twin",
            &it(ib),
            Some(&steps_b),
            cvchain::lifecycle::Complete::Released(std::slice::from_ref(&rb)),
            &delivery,
        )
        .await
        .unwrap();
    // A's copy loses: A moves to the id-qualified path instead of failing the message.
    let steps_a = history.steps(a, ia).await.unwrap();
    let status = lifecycle
        .move_channels(
            a,
            "Twin",
            &it(ia),
            Some(&steps_a),
            cvchain::lifecycle::Complete::Released(std::slice::from_ref(&ra)),
            &delivery,
        )
        .await;
    assert!(
        status.as_ref().is_ok_and(|s| !s.contains("failed")),
        "{status:?}"
    );
    let qualified = format!("Twin-{a}/channels/latest/ONNX.zip");
    let manifest = |path: String| {
        let clients = clients.clone();
        async move {
            let bytes = cvchain_testkit::blob_bytes(&clients, "models", &path).await;
            serde_json::from_slice::<Value>(&bytes).unwrap()
        }
    };
    let ma = manifest("Twin/channels.json".into()).await;
    assert_eq!(ma["projectId"], a.to_string());
    assert_eq!(
        ma["channels"]["latest"]["targets"]["ONNX"]["channelPath"],
        qualified.as_str()
    );
    let mb = manifest(format!("Twin-{b}/channels.json")).await;
    assert_eq!(
        mb["channels"]["latest"]["targets"]["ONNX"]["channelPath"],
        plain.as_str()
    );
    // Each path holds its own project's model.
    assert_eq!(
        cvchain_testkit::blob_bytes(&clients, "models", &plain).await,
        b"model B"
    );
    assert_eq!(
        cvchain_testkit::blob_bytes(&clients, "models", &qualified).await,
        b"model A"
    );
    let moved: Vec<HashMap<String, Value>> = clients
        .table(&table)
        .unwrap()
        .query(None, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.entity["EventType"] == "ChannelMove")
        .map(|r| r.entity.into_iter().collect())
        .collect();
    let of = |p: Uuid| {
        moved
            .iter()
            .filter(|r| r["PartitionKey"] == p.to_string())
            .map(|r| r["ChannelPath"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(of(a), vec![qualified.clone()]);
    assert_eq!(of(b), vec![plain.clone()]);
}

/// Puts a forged manifest in place and runs `cvchain rollback`: it must be refused naming
/// `names`, with nothing written, copied or announced (`expect`: production's ONNX copy, and
/// the number of move rows).
async fn refused(w: &World, what: &str, forged: Vec<u8>, names: &str, expect: (&[u8], usize)) {
    w.put("Widgets/channels.json", &forged).await;
    let (ok, out) = w.command(&["rollback", "--project", &w.project.to_string()]);
    assert!(!ok, "{what}: the rollback went through: {out}");
    assert!(out.contains(names), "{what}: {out}");
    assert!(
        w.blob("Widgets/channels.json").await.unwrap().0 == forged,
        "{what}: the manifest was written"
    );
    let copy = w
        .blob("Widgets/channels/production/ONNX.zip")
        .await
        .unwrap()
        .0;
    assert!(copy == expect.0, "{what}: production's copy changed");
    assert_eq!(w.rows_of("ChannelMove").await.len(), expect.1, "{what}");
}

/// A project wired to the world's queue and backup container.
async fn another_project(w: &World, name: &str) -> Uuid {
    let queue_uri = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{}",
        w.azurite.queue_port, w.source
    );
    let backup = w.azurite.container_url("cvbackups");
    w.api
        .create_project(&[
            ("name", name),
            ("domainId", COMPACT_DOMAIN),
            ("notificationQueueUri", &queue_uri),
            ("exportModelContainerUri", &backup),
        ])
        .await
}

/// The manifest in the release container is a blob anyone with write access can rewrite: it is
/// evidence, checked against what cvchain recorded (the step rows' release paths, the release
/// copies' own metadata) and against its own bounds before anything acts on it. A previous
/// holder rewritten to another project's iteration, or to an iteration that never was, is
/// refused with what does not match, and nothing is written, copied or announced; an absurd
/// revision or a manifest larger than any cvchain writes is refused naming the blob, and the
/// chain goes on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_is_evidence_not_authority() {
    let mut w = world(&[("CVCHAIN_GATE", "map>=0.0".into())]).await;
    w.handlers = vec![Handler::start(&w.env), Handler::start(&w.env)];
    let gadgets = another_project(&w, "Gadgets").await;
    let first = w.train_with_serve().await;
    let second = w.train_with_serve().await;
    let g1 = w.train_in(gadgets).await;
    let project = w.project.to_string();
    let release_of = |rows: &[StoredEntity], p: Uuid, i: Uuid, platform: &str| {
        rows.iter()
            .find(|r| {
                r.entity["PartitionKey"] == p.to_string()
                    && r.entity["IterationId"] == i.to_string()
                    && r.entity["Platform"] == platform
            })
            .map(|r| r.entity["ReleasePath"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let steps = w.rows_of("ExportStep").await;
    let original = w.blob("Widgets/channels.json").await.unwrap().0;
    let genuine: Value = serde_json::from_slice(&original).unwrap();
    assert_eq!(
        genuine["channels"]["production"]["targets"]["ONNX"]["previous"]["id"],
        first.to_string()
    );
    let production_copy = || async {
        w.blob("Widgets/channels/production/ONNX.zip")
            .await
            .unwrap()
            .0
    };
    let second_model = w
        .blob(&release_of(&steps, w.project, second, "ONNX"))
        .await
        .unwrap()
        .0;
    assert!(production_copy().await == second_model);
    let moves_before = w.rows_of("ChannelMove").await.len();
    // Rewrites the genuine manifest's previous holders (each target's and the pointer's).
    let forge = |previous: &dyn Fn(&str, &mut Value)| {
        let mut m = genuine.clone();
        for (platform, key) in [("ONNX", TARGETS[0]), ("TensorFlow", TARGETS[1])] {
            let e = &mut m["channels"]["production"]["targets"][key];
            let last = e["history"].as_array_mut().unwrap().last_mut().unwrap();
            previous(platform, last);
            e["previous"] = last["iteration"].clone();
        }
        let pointer = &mut m["productionPointer"]["history"];
        let last = pointer.as_array_mut().unwrap().last_mut().unwrap();
        let mut holder = serde_json::json!({"iteration": last["iteration"].clone()});
        previous("ONNX", &mut holder);
        last["iteration"] = holder["iteration"].clone();
        serde_json::to_vec_pretty(&m).unwrap()
    };
    // Another project's iteration, with its own release copies, as the previous holder.
    let gadgets_ref = |it: &mut Value| {
        it["iteration"]["id"] = g1.to_string().into();
    };
    let forged = forge(&|platform, holder| {
        gadgets_ref(holder);
        if holder.get("releasePath").is_some() {
            holder["releasePath"] = release_of(&steps, gadgets, g1, platform).into();
        }
    });
    let expect = (&second_model[..], moves_before);
    refused(
        &w,
        "another project's release",
        forged,
        &release_of(&steps, gadgets, g1, "ONNX"),
        expect,
    )
    .await;
    // The same iteration id under one of this project's own release paths.
    refused(
        &w,
        "another project's iteration",
        forge(&|_, holder| gadgets_ref(holder)),
        &g1.to_string(),
        expect,
    )
    .await;
    // An iteration that never was: nothing moves, and the manifest does not say it did.
    let ghost = Uuid::new_v4();
    refused(
        &w,
        "a ghost",
        forge(&|platform, holder| {
            holder["iteration"]["id"] = ghost.to_string().into();
            holder["iteration"]["name"] = "Ghost".into();
            if holder.get("releasePath").is_some() {
                let file = if platform == "ONNX" {
                    "ONNX.zip"
                } else {
                    "TensorFlow-TensorFlowLite.zip"
                };
                holder["releasePath"] = format!("Widgets/Ghost/{file}").into();
            }
        }),
        &ghost.to_string(),
        expect,
    )
    .await;

    // Larger than any manifest cvchain writes: refused unread, naming the blob.
    let mut huge = genuine.clone();
    huge["channels"]["production"]["targets"]["ONNX"]["note"] = "x".repeat(3 << 20).into();
    w.put("Widgets/channels.json", &serde_json::to_vec(&huge).unwrap())
        .await;
    let (ok, out) = w.command(&["channels", "--project", &project]);
    assert!(!ok && out.contains("Widgets/channels.json"), "{out}");
    assert!(
        out.contains("bytes") && !out.contains("production follows"),
        "{out}"
    );

    // An absurd revision: refused naming the blob; the next training's chain goes on all the
    // same, its moves recorded as failed.
    let mut absurd = genuine.clone();
    absurd["revision"] = u64::MAX.into();
    let absurd = serde_json::to_vec_pretty(&absurd).unwrap();
    w.put("Widgets/channels.json", &absurd).await;
    let (ok, out) = w.command(&["channels", "--project", &project]);
    assert!(!ok && out.contains("Widgets/channels.json"), "{out}");
    assert!(
        out.contains("revision") && !out.contains("production follows"),
        "{out}"
    );
    let third = w.train_with_serve().await;
    assert!(w.released(third).await);
    assert!(w.blob("Widgets/channels.json").await.unwrap().0 == absurd);
    let statuses: Vec<String> = w
        .rows_of("Export")
        .await
        .iter()
        .filter(|r| r.entity["IterationId"] == third.to_string())
        .filter_map(|r| r.entity.get("ChannelStatus")?.as_str().map(str::to_owned))
        .collect();
    assert!(
        !statuses.is_empty()
            && statuses
                .iter()
                .all(|s| s.contains("Widgets/channels.json") && s.contains("revision")),
        "{statuses:?}"
    );
    assert!(production_copy().await == second_model);

    // The genuine manifest back: the same rollback goes through.
    w.put("Widgets/channels.json", &original).await;
    let (ok, out) = w.command(&["rollback", "--project", &project]);
    assert!(ok, "{out}");
    let first_model = w
        .blob(&release_of(&steps, w.project, first, "ONNX"))
        .await
        .unwrap()
        .0;
    assert!(production_copy().await == first_model);
    assert_eq!(
        w.manifest().await["productionPointer"]["iteration"]["id"],
        first.to_string()
    );

    // A channel copy that claims a revision no manifest has reached (its metadata rewritten,
    // or left by a manifest since moved away) is not believed: the next move copies over it
    // rather than taking it for newer.
    let latest = w
        .clients
        .blob_service()
        .unwrap()
        .blob_container_client("models")
        .blob_client("Widgets/channels/latest/ONNX.zip");
    let mut meta = latest
        .get_properties(None)
        .await
        .unwrap()
        .metadata()
        .unwrap();
    meta.insert("revision".into(), "999999999".into());
    latest.set_metadata(&meta, None).await.unwrap();
    let fourth = w.train_with_serve().await;
    let fourth_model = w
        .blob(&release_of(
            &w.rows_of("ExportStep").await,
            w.project,
            fourth,
            "ONNX",
        ))
        .await
        .unwrap()
        .0;
    assert!(
        w.blob("Widgets/channels/latest/ONNX.zip").await.unwrap().0 == fourth_model,
        "the latest copy is not the fourth iteration's model: taken for current"
    );
}

/// A channel move that cannot happen never stalls the chain: the next export is requested and
/// every model released whatever the channels do. Here every `latest` copy fails (the service
/// reports the copy `failed`, a transient failure: the message is retried, and on its last
/// delivery the failed move is recorded and the message answered 200, never poisoned), and
/// both of production's ONNX paths hold someone else's files (a permanent impossibility:
/// recorded on the first delivery, not retried). Each failed move is a history row with its
/// event, the manifest never claims a move that did not happen, and `cvchain channels` shows
/// them.
// Several threads: `cvchain promote` runs as a process that calls the stand-in, which runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_move_that_cannot_happen_never_stalls_the_chain() {
    use cvchain_testkit::{CopyEnd, CopyFaults, CopyProxy, HostEmulator};
    let mut w = world(&[
        ("CVCHAIN_GATE", "map>=0.0".into()),
        ("CVCHAIN_MAX_DEQUEUE", "3".into()),
        ("CVCHAIN_EVENTS_QUEUE", unique("cvevents")),
    ])
    .await;
    let proxy = CopyProxy::start(
        w.azurite.blob_port,
        CopyFaults {
            pending_for: Duration::from_millis(50),
            rules: vec![("channels%2Flatest".into(), vec![CopyEnd::Failed])],
        },
    );
    w.env
        .push(("CVCHAIN_STORAGE", proxy.connection_string(&w.azurite)));
    w.handlers = vec![Handler::start(&w.env)];
    let host = HostEmulator::new(&w.clients, &w.queue(), w.handlers[0].url(""));
    let foreign = [
        "Widgets/channels/production/ONNX.zip".to_owned(),
        format!("Widgets-{}/channels/production/ONNX.zip", w.project),
    ];
    for path in &foreign {
        w.put(path, b"someone else's file").await;
    }
    let iteration = w.api.train(w.project).await;
    let mut answers: Vec<(String, Vec<u16>)> = Vec::new();
    let start = Instant::now();
    loop {
        let batch = w.take().await;
        for (text, id) in &batch {
            let mut got = Vec::new();
            for count in 1..=3 {
                let status = host.redeliver(text, id, count).await;
                got.push(status);
                if status == 200 {
                    break;
                }
            }
            let kind: Value = serde_json::from_str(text).unwrap();
            let kind = kind["Content"]["exportStatus"]
                .as_str()
                .or(kind["Content"]["trainingStatus"].as_str())
                .unwrap_or("ConnectionTest")
                .to_owned();
            answers.push((kind, got));
        }
        if batch.is_empty() && w.released(iteration).await && w.quiet().await {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "stuck: {answers:?}\n{}",
            w.handlers[0].stderr()
        );
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every message was taken by its last delivery at the latest; none poisoned.
    assert!(
        answers.iter().all(|(_, got)| got.last() == Some(&200)),
        "{answers:?}\n{}",
        w.handlers[0].stderr()
    );
    // The failing copies were retried (the first deliveries of the exports failed).
    assert!(
        answers
            .iter()
            .filter(|(k, _)| k == "ExportCompleted")
            .all(|(_, got)| got.len() == 3),
        "{answers:?}"
    );
    assert!(w.rows_of("Failed").await.is_empty());
    // The failed moves: a row each, with its event.
    let failed = w.rows_of("ChannelMoveFailed").await;
    let mut seen: Vec<(String, String, bool)> = failed
        .iter()
        .map(|r| {
            (
                r.entity["Channel"].as_str().unwrap().to_owned(),
                r.entity["Platform"].as_str().unwrap().to_owned(),
                r.entity["Transient"].as_bool().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("latest".into(), "ONNX".into(), true),
            ("latest".into(), "TensorFlow".into(), true),
            ("production".into(), "ONNX".into(), false),
        ],
        "{failed:#?}"
    );
    let told = w
        .rows_of("Outbox")
        .await
        .iter()
        .filter(|r| r.entity["CloudEventType"] == "io.cvchain.channel.move_failed")
        .count();
    assert_eq!(told, 3);
    // What did move, moved: production's TensorFlow target, and the pointer.
    let m = w.manifest().await;
    assert_eq!(
        m["channels"]["latest"]["targets"],
        serde_json::json!({}),
        "{m:#}"
    );
    let production = m["channels"]["production"]["targets"].as_object().unwrap();
    assert_eq!(
        production.keys().collect::<Vec<_>>(),
        vec!["TensorFlow-TensorFlowLite"]
    );
    assert_eq!(
        production["TensorFlow-TensorFlowLite"]["iteration"]["id"],
        iteration.to_string()
    );
    // Someone else's files are as they were.
    for path in &foreign {
        assert_eq!(w.blob(path).await.unwrap().0, b"someone else's file");
    }
    // The notification rows and `cvchain channels` say what failed.
    let statuses: Vec<String> = w
        .rows_of("Export")
        .await
        .iter()
        .filter_map(|r| r.entity.get("ChannelStatus")?.as_str().map(str::to_owned))
        .collect();
    assert!(
        statuses.iter().any(|s| s.contains("failed")),
        "{statuses:?}"
    );
    let (ok, out) = w.command(&["channels", "--project", &w.project.to_string()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("failed") && out.contains("latest") && out.contains("someone else"),
        "{out}"
    );
    // By hand, the same: the copies fail, the command says so and fails, and the manifest is
    // as it was.
    let before = w.blob("Widgets/channels.json").await.unwrap().0;
    let (ok, out) = w.command(&[
        "promote",
        "--project",
        &w.project.to_string(),
        "--iteration",
        &iteration.to_string(),
        "--channel",
        "latest",
    ]);
    assert!(!ok && out.contains("could not be carried out"), "{out}");
    let after: Value =
        serde_json::from_slice(&w.blob("Widgets/channels.json").await.unwrap().0).unwrap();
    let before: Value = serde_json::from_slice(&before).unwrap();
    assert_eq!(after["channels"]["latest"], before["channels"]["latest"]);
    assert!(after["revision"].as_u64() > before["revision"].as_u64());
}
