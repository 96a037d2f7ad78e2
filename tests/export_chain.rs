//! End to end: Azurite, the Custom Vision stand-in and `cvchain serve`, driven exactly as the
//! Functions host drives it (messages taken from the queue, POSTed in the host's envelope,
//! deleted on 2xx, retried on anything else).

use cvchain_azure::storage::{clients::StorageClients, table::StoredEntity};
use cvchain_standin::{COMPACT_DOMAIN, Faults, Standin};
use cvchain_testkit::{Azurite, Handler, HostEmulator, standin_calls, unique};
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

const KEY: &str = "e2e-training-key-5f3c";
const CHAIN: &str = "ONNX, TensorFlow:TensorFlowLite, DockerFile:Linux";

struct World {
    azurite: Azurite,
    standin: Standin,
    _handler: Handler,
    host: HostEmulator,
    table: String,
    project: Uuid,
}

async fn world(faults: Option<Faults>, chain: &str) -> World {
    world_with(faults, chain, &[]).await
}

async fn world_with(faults: Option<Faults>, chain: &str, extra: &[(&str, String)]) -> World {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let queue = unique("cvq");
    let table = unique("History");
    let container_uri = azurite.container_url("cvbackups");
    let standin = Standin::start(cvchain_testkit::standin_config(&clients, KEY, 100))
        .await
        .unwrap();
    let mut env = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", queue.clone()),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", chain.into()),
        ("CVCHAIN_BACKUP_CONTAINER", container_uri.clone()),
        ("CVCHAIN_RELEASE_CONTAINER", "models".into()),
    ];
    env.extend(extra.iter().cloned());
    let handler = Handler::start(&env);
    let host = HostEmulator::new(&clients, &queue, handler.url(""));
    if let Some(f) = faults {
        standin.set_faults(f);
    }
    // The user's set-up: a project on a compact domain wired to the queue and a backup
    // container, then a training run.
    // The stand-in may be injecting faults: the helper retries like any client would.
    let api = cvchain_testkit::StandinApi::with_storage(&standin.endpoint(), KEY, &clients);
    let queue_uri = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{queue}",
        azurite.queue_port
    );
    let project = api
        .create_project(&[
            ("name", "Widgets"),
            ("domainId", COMPACT_DOMAIN),
            ("notificationQueueUri", &queue_uri),
            ("exportModelContainerUri", &container_uri),
        ])
        .await;
    api.train(project).await;
    World {
        azurite,
        standin,
        _handler: handler,
        host,
        table,
        project,
    }
}

/// A release blob as seen by `find_blobs_by_tags` and its properties.
#[derive(Debug, PartialEq)]
struct ReleaseBlob {
    name: String,
    tags: std::collections::HashMap<String, String>,
    etag: String,
    metadata: std::collections::HashMap<String, String>,
    content: Vec<u8>,
}

impl World {
    /// Every log line the handler wrote and every row it recorded: no key, no SAS signature.
    async fn assert_no_secrets(&self) {
        let secrets = [KEY, cvchain_azure::storage::settings::DEV_ACCOUNT_KEY];
        cvchain_testkit::assert_no_secrets("the handler's logs", &self._handler.stderr(), &secrets);
        let rows = serde_json::to_string(
            &self
                .rows()
                .await
                .iter()
                .map(|r| &r.entity)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        cvchain_testkit::assert_no_secrets("the history rows", &rows, &secrets);
    }

    fn clients(&self) -> StorageClients {
        StorageClients::new(&self.azurite.storage_settings()).unwrap()
    }

    /// The release and backup blobs of one iteration, found by their index tags (channel copies,
    /// which carry the same tags plus `channel`, are tests/lifecycle.rs's).
    async fn releases(&self, iteration: &str) -> Vec<ReleaseBlob> {
        use azure_storage_blob::models::BlobClientGetPropertiesResultHeaders;
        use futures::TryStreamExt;
        let service = self.clients().blob_service().unwrap();
        let filter = format!(
            "\"projectId\"='{}' AND \"iterationId\"='{iteration}'",
            self.project
        );
        let mut pages = service
            .find_blobs_by_tags(&filter, None)
            .unwrap()
            .into_pages();
        let mut out = Vec::new();
        while let Some(page) = pages.try_next().await.unwrap() {
            for item in page.into_model().unwrap().blob_items {
                let container = item.container_name.clone().unwrap();
                let name = item.name.clone().unwrap();
                let blob = service.blob_container_client(&container).blob_client(&name);
                let props = blob.get_properties(None).await.unwrap();
                let tags: std::collections::HashMap<String, String> = blob
                    .get_tags(None)
                    .await
                    .unwrap()
                    .into_model()
                    .unwrap()
                    .into();
                if tags.contains_key("channel") {
                    continue;
                }
                let content = blob
                    .download(None)
                    .await
                    .unwrap()
                    .body
                    .collect()
                    .await
                    .unwrap();
                out.push(ReleaseBlob {
                    name: format!("{container}/{name}"),
                    tags,
                    etag: props.etag().unwrap().unwrap().to_string(),
                    metadata: props.metadata().unwrap(),
                    content: content.to_vec(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    async fn backup(&self, iteration: &str, platform: &str) -> Vec<u8> {
        let name = format!("{} - {iteration}.{platform}", self.project);
        cvchain_testkit::blob_bytes(&self.clients(), "cvbackups", &name).await
    }

    async fn rows(&self) -> Vec<StoredEntity> {
        let clients = StorageClients::new(&self.azurite.storage_settings()).unwrap();
        let table = clients.table(&self.table).unwrap();
        // Before the first message the table does not exist yet.
        table.query(None, 10_000).await.unwrap_or_default()
    }

    async fn rows_of(&self, event: &str) -> Vec<StoredEntity> {
        let mut rows: Vec<StoredEntity> = self
            .rows()
            .await
            .into_iter()
            .filter(|r| r.entity["EventType"] == event)
            .collect();
        rows.sort_by_key(|r| r.entity["RowKey"].as_str().unwrap_or_default().to_owned());
        rows
    }

    /// Pumps until the chain has ended: every export's notification recorded.
    async fn run_chain(&self, exports: usize, timeout: Duration) -> cvchain_testkit::PumpStats {
        self.host
            .pump_until(timeout, || async {
                let steps = self.rows_of("ExportStep").await;
                let ended = steps
                    .iter()
                    .filter(|r| matches!(r.entity["Status"].as_str(), Some("Done" | "Failed")))
                    .count();
                ended == exports && self.rows_of("Export").await.len() == exports
            })
            .await
    }
}

fn accepted(calls: &cvchain_standin::CallLog) -> Vec<(String, Option<String>)> {
    calls
        .exports
        .iter()
        .filter(|e| e.outcome == "accepted")
        .map(|e| (e.platform.clone(), e.flavor.clone()))
        .collect()
}

fn expected_order() -> Vec<(String, Option<String>)> {
    vec![
        ("ONNX".into(), None),
        ("TensorFlow".into(), Some("TensorFlowLite".into())),
        ("DockerFile".into(), Some("Linux".into())),
    ]
}

#[tokio::test]
async fn training_runs_the_three_exports_in_order_exactly_once() {
    let w = world(None, CHAIN).await;
    let stats = w.run_chain(3, Duration::from_secs(60)).await;
    assert_eq!(stats.failures, 0, "{stats:?}");

    let calls = standin_calls(&w.standin.endpoint()).await;
    assert_eq!(
        calls.counts.get("ExportIteration"),
        Some(&3),
        "{:?}",
        calls.exports
    );
    assert_eq!(accepted(&calls), expected_order());

    // The training row, enriched from GetIteration, GetIterationPerformance and GetProject.
    let training = w.rows_of("Training").await;
    assert_eq!(training.len(), 1);
    let t = &training[0].entity;
    assert_eq!(t["PartitionKey"], w.project.to_string());
    assert_eq!(t["Status"], "TrainingCompleted");
    assert_eq!(t["ProjectName"], "Widgets");
    assert_eq!(t["IterationName"], "Iteration 1");
    assert_eq!(t["TrainingTimeInMinutes"], 1);
    assert_eq!(t["DomainId"], COMPACT_DOMAIN);
    assert!(t["TrainedAt"].as_str().unwrap().ends_with('Z'));
    for m in ["Precision", "Recall", "AveragePrecision"] {
        let v = t[m].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{m}={v}");
    }
    assert_eq!(t["ChainStatus"], "requested ONNX");

    // One row per export, in chain order, with when it was requested and when it ended.
    let steps = w.rows_of("ExportStep").await;
    assert_eq!(steps.len(), 3);
    let mut by_position: Vec<&serde_json::Map<String, Value>> =
        steps.iter().map(|s| &s.entity).collect();
    by_position.sort_by_key(|e| e["ChainPosition"].as_i64());
    for (e, (platform, flavor)) in by_position.iter().zip(expected_order()) {
        assert_eq!(e["Platform"], platform.as_str());
        assert_eq!(e["Flavor"], flavor.unwrap_or_default().as_str());
        assert_eq!(e["Status"], "Done");
        let requested = e["RequestedAt"].as_str().unwrap();
        let ended = e["EndedAt"].as_str().unwrap();
        assert!(requested <= ended, "{requested} > {ended}");
    }

    // Each export's notification has its row, and the last one says the chain is complete.
    let exports = w.rows_of("Export").await;
    assert_eq!(exports.len(), 3);
    let statuses: Vec<&str> = exports
        .iter()
        .map(|r| r.entity["ChainStatus"].as_str().unwrap())
        .collect();
    assert!(statuses.contains(&"complete"), "{statuses:?}");
    assert!(
        statuses.contains(&"requested TensorFlow:TensorFlowLite"),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&"requested DockerFile:Linux"),
        "{statuses:?}"
    );
    assert_eq!(w.rows_of("ConnectionTest").await.len(), 1);

    if std::env::var("CVCHAIN_SHOW_ROWS").is_ok() {
        for r in w.rows().await {
            eprintln!("{}", serde_json::to_string(&r.entity).unwrap());
        }
    }
    // One release blob per export, found by its tags, with the backup's content.
    let iteration = t["IterationId"].as_str().unwrap().to_owned();
    let releases = w.releases(&iteration).await;
    let release_names: Vec<&str> = releases
        .iter()
        .filter(|r| r.name.starts_with("models/"))
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        release_names,
        vec![
            "models/Widgets/Iteration-1/DockerFile-Linux.zip",
            "models/Widgets/Iteration-1/ONNX.zip",
            "models/Widgets/Iteration-1/TensorFlow-TensorFlowLite.zip",
        ]
    );
    for r in releases.iter().filter(|r| r.name.starts_with("models/")) {
        let platform = &r.tags["platform"];
        assert_eq!(
            r.content,
            w.backup(&iteration, platform).await,
            "{}",
            r.name
        );
        assert_eq!(r.tags["source"], "customvision");
        assert_eq!(r.tags["iterationId"], iteration);
        assert_eq!(r.metadata["projectname"], "Widgets");
        assert_eq!(r.metadata["iterationname"], "Iteration 1");
        assert!(r.metadata["precision"].parse::<f64>().is_ok());
        assert!(r.metadata["recall"].parse::<f64>().is_ok());
        assert!(!r.metadata["source"].contains("sig="), "{:?}", r.metadata);
        assert!(
            r.metadata["source"].contains("/cvbackups/"),
            "{:?}",
            r.metadata
        );
    }
    // The backups are tagged too.
    assert_eq!(
        releases
            .iter()
            .filter(|r| r.name.starts_with("cvbackups/"))
            .count(),
        3
    );
    // Each export's row records its release (URL without a SAS, size, copy time).
    let steps = w.rows_of("ExportStep").await;
    for e in steps.iter().map(|s| &s.entity) {
        let url = e["ReleaseUrl"].as_str().unwrap();
        assert!(
            url.contains("/models/Widgets/Iteration-1/") && !url.contains('?'),
            "{url}"
        );
        let size: u64 = e["ReleaseSize"].as_str().unwrap().parse().unwrap();
        assert!(size > 0);
        assert!(e.contains_key("CopyMillis"));
    }

    // Every message delivered twice more, as the host may: nothing changes, not even an ETag.
    let before = w.rows().await;
    let messages = w.host.completed.lock().unwrap().clone();
    assert_eq!(
        messages.len(),
        5,
        "ConnectionTest, Training and three Exports"
    );
    for (text, id) in &messages {
        for count in [2, 3] {
            assert_eq!(w.host.redeliver(text, id, count).await, 200);
        }
    }
    assert_eq!(w.rows().await, before);
    let calls = standin_calls(&w.standin.endpoint()).await;
    assert_eq!(calls.counts.get("ExportIteration"), Some(&3));
    // ... and the release container is exactly as it was.
    assert_eq!(w.releases(&iteration).await, releases);
    w.assert_no_secrets().await;
}

#[tokio::test]
async fn a_forged_model_uri_is_refused_without_a_request_to_its_host() {
    let w = world(None, "ONNX").await;
    let stats = w.run_chain(1, Duration::from_secs(60)).await;
    assert_eq!(stats.failures, 0);
    let iteration = w.rows_of("Training").await[0].entity["IterationId"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = w.releases(&iteration).await;

    // A host that counts every connection it gets.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = trap.local_addr().unwrap().port();
    trap.set_nonblocking(true).unwrap();
    let forged = format!(
        r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{}","iterationId":"{iteration}","exportStatus":"ExportCompleted","modelUri":"http://127.0.0.1:{port}/cvbackups/{} - {iteration}.ONNX?sig=forged"}}}}"#,
        w.project, w.project
    );
    assert_eq!(w.host.redeliver(&forged, "forged-1", 1).await, 200);
    assert!(
        trap.accept().is_err(),
        "cvchain connected to the forged modelUri's host"
    );
    let row = w
        .rows_of("Export")
        .await
        .into_iter()
        .find(|r| r.entity["MessageId"] == "forged-1")
        .expect("a row for the forged message");
    let note = row.entity["ModelUriStatus"].as_str().unwrap();
    assert!(
        note.starts_with("refused (outside the backup container)"),
        "{note}"
    );
    assert!(
        !serde_json::to_string(&row.entity)
            .unwrap()
            .contains("sig=forged")
    );
    // The release stays as it was.
    assert_eq!(w.releases(&iteration).await, before);
    w.assert_no_secrets().await;
}

#[tokio::test]
async fn a_flaky_custom_vision_and_triple_deliveries_still_export_each_entry_once() {
    let faults = Faults {
        failure_rate: 0.2,
        retry_after_seconds: 0,
        ..Default::default()
    };
    let mut w = world(Some(faults), CHAIN).await;
    w.host.deliveries = 3;
    w.run_chain(3, Duration::from_secs(120)).await;
    let calls = standin_calls(&w.standin.endpoint()).await;
    assert!(
        calls.faults.values().sum::<u64>() > 0,
        "the stand-in should have injected faults: {:?}",
        calls.counts
    );
    // Retries, but no export requested twice: each accepted exactly once, in order.
    assert_eq!(accepted(&calls), expected_order(), "{:?}", calls.exports);
    let steps = w.rows_of("ExportStep").await;
    assert_eq!(steps.len(), 3);
    assert!(steps.iter().all(|s| s.entity["Status"] == "Done"));
    assert_eq!(w.rows_of("Training").await.len(), 1);
    assert_eq!(w.rows_of("Export").await.len(), 3);
    w.assert_no_secrets().await;
}

#[tokio::test]
async fn skipped_and_failed_exports_are_recorded_and_the_chain_moves_on() {
    // OpenVino is not in exportableTo for v3.3, the API version cvchain speaks (compact domains
    // export it from v3.4-preview on); ONNX exports fail.
    let faults = Faults {
        fail_export_platforms: vec!["ONNX".into()],
        ..Default::default()
    };
    let w = world(Some(faults), "OpenVino, ONNX, CoreML").await;
    w.host
        .pump_until(Duration::from_secs(60), || async {
            let steps = w.rows_of("ExportStep").await;
            steps.len() == 3
                && steps.iter().all(|s| {
                    matches!(
                        s.entity["Status"].as_str(),
                        Some("Done" | "Failed" | "Skipped")
                    )
                })
                && w.rows_of("Export").await.len() == 2
        })
        .await;
    let steps = w.rows_of("ExportStep").await;
    let status = |platform: &str| {
        steps
            .iter()
            .find(|s| s.entity["Platform"] == platform)
            .map(|s| s.entity["Status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status("OpenVino").as_deref(), Some("Skipped"));
    assert_eq!(status("ONNX").as_deref(), Some("Failed"));
    assert_eq!(status("CoreML").as_deref(), Some("Done"));
    let calls = standin_calls(&w.standin.endpoint()).await;
    assert_eq!(
        accepted(&calls),
        vec![("ONNX".to_owned(), None), ("CoreML".to_owned(), None)]
    );
    let failed: Vec<StoredEntity> = w
        .rows_of("Export")
        .await
        .into_iter()
        .filter(|r| r.entity["Status"] == "ExportFailed")
        .collect();
    assert_eq!(failed.len(), 1);
}

#[tokio::test]
async fn training_completed_publishes_the_iteration_once() {
    let prediction =
        "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/pred";
    let mut w = world_with(
        None,
        "ONNX",
        &[
            ("CVCHAIN_PUBLISH_NAME", "production".into()),
            ("CVCHAIN_PREDICTION_RESOURCE_ID", prediction.into()),
        ],
    )
    .await;
    w.host.deliveries = 2;
    w.run_chain(1, Duration::from_secs(60)).await;
    let training = w.rows_of("Training").await;
    assert_eq!(
        training[0].entity["PublishStatus"],
        "published Iteration 1 as production"
    );
    let calls = standin_calls(&w.standin.endpoint()).await;
    // The redelivery found the iteration published and did not ask again.
    assert_eq!(calls.counts.get("PublishIteration"), Some(&1));
    let iteration: Value = reqwest::Client::new()
        .get(format!(
            "{}/customvision/v3.3/training/projects/{}/iterations/{}",
            w.standin.endpoint(),
            w.project,
            training[0].entity["IterationId"].as_str().unwrap()
        ))
        .header("Training-Key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(iteration["publishName"], "production");
    assert_eq!(iteration["originalPublishResourceId"], prediction);
}

#[tokio::test]
async fn the_last_failed_delivery_is_recorded_before_the_message_is_poisoned() {
    let w = world(None, CHAIN).await;
    // Let the set-up messages through, then make Custom Vision fail every call.
    w.host
        .pump_until(Duration::from_secs(30), || async {
            !w.rows_of("ConnectionTest").await.is_empty()
        })
        .await;
    // The resource's own limit off: every refusal is an injected one, each answered at once.
    w.standin.set_rate_limit(None);
    w.standin.set_faults(Faults {
        failure_rate: 1.0,
        throttle_share: Some(1.0),
        retry_after_seconds: 0,
        ..Default::default()
    });
    let message = format!(
        r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{}","iterationId":"{}","trainingStatus":"TrainingCompleted"}}}}"#,
        w.project,
        Uuid::new_v4()
    );
    assert_eq!(w.host.redeliver(&message, "doomed-1", 2).await, 500);
    assert!(w.rows_of("Failed").await.is_empty());
    assert_eq!(w.host.redeliver(&message, "doomed-1", 5).await, 500);
    let failed = w.rows_of("Failed").await;
    assert_eq!(failed.len(), 1);
    let f = &failed[0].entity;
    assert_eq!(f["PartitionKey"], "_failed");
    assert_eq!(f["RowKey"], "doomed-1");
    assert_eq!(f["DequeueCount"], 5);
    assert_eq!(f["Transient"], true);
    assert!(f["Reason"].as_str().unwrap().contains("429"), "{f:?}");
    assert_eq!(f["Raw"], message);
    w.assert_no_secrets().await;
}

#[tokio::test]
async fn sigterm_lets_the_invocation_in_flight_finish() {
    let mut w = world(None, "ONNX").await;
    w.host
        .pump_until(Duration::from_secs(30), || async {
            !w.rows_of("ConnectionTest").await.is_empty()
        })
        .await;
    // Every Custom Vision call now takes 700 ms, and a TrainingCompleted makes several.
    w.standin.set_faults(Faults {
        slow_rate: 1.0,
        slow_ms: 700,
        ..Default::default()
    });
    let message = format!(
        r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{}","iterationId":"{}","trainingStatus":"TrainingCompleted"}}}}"#,
        w.project,
        Uuid::new_v4()
    );
    let url = format!("{}/CustomVisionNotification", w._handler.url(""));
    let body = cvchain_testkit::host_envelope(&message, "inflight-1", 1);
    let inflight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exit = {
        let handler = &mut w._handler;
        let waiter = tokio::task::spawn_blocking({
            let pid = handler.pid();
            move || {
                std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .unwrap()
            }
        });
        waiter.await.unwrap();
        let status = inflight
            .await
            .unwrap()
            .expect("the in-flight invocation got an answer");
        // The iteration is unknown to Custom Vision: recorded as stopped, answered 200.
        assert_eq!(status, 200);
        handler.signal_and_wait("TERM", Duration::from_secs(25))
    };
    let exit = exit.expect("the handler exits within the drain bound");
    assert!(exit.success(), "{exit}");
    let stderr = w._handler.stderr();
    assert!(stderr.contains("shutdown requested"), "{stderr}");
    let row = w
        .rows_of("Training")
        .await
        .into_iter()
        .find(|r| r.entity["MessageId"] == "inflight-1")
        .expect("the in-flight message was recorded");
    assert!(
        row.entity["ChainStatus"]
            .as_str()
            .unwrap()
            .starts_with("stopped:")
    );
}
