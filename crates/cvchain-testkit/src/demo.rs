//! A run like `cvchain dev`'s, for the tests that look at its results (the console, the
//! documented examples): its own Azurite and stand-in, `cvchain worker` running the chain, and
//! a project "Widgets" trained twice, the second training better so the gate promotes it.

use crate::{Azurite, Handler, StandinApi, unique};
use cvchain_azure::storage::clients::StorageClients;
use cvchain_standin::{COMPACT_DOMAIN, Faults, Metrics, Standin};
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const DEMO_KEY: &str = "demo-training-key-51c0";
pub const DEMO_CHAIN: &str = "ONNX, TensorFlow:TensorFlowLite";
pub const DEMO_GATE: &str = "map>=0.80,improves:map";
/// Precision, recall and mAP of the two trainings.
pub const DEMO_METRICS: [(f64, f64, f64); 2] = [(0.88, 0.84, 0.86), (0.93, 0.90, 0.92)];

pub struct DemoRun {
    pub azurite: Azurite,
    pub standin: Standin,
    pub clients: StorageClients,
    /// The settings every cvchain process of the run takes.
    pub env: Vec<(&'static str, String)>,
    pub project: Uuid,
    /// The two trained iterations, oldest first.
    pub iterations: Vec<Uuid>,
    pub worker: Handler,
}

impl DemoRun {
    /// Starts everything and trains twice, each time until the chain completed.
    pub async fn start() -> Self {
        let azurite = Azurite::start();
        let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
        let standin = Standin::start(crate::standin_config(&clients, DEMO_KEY, 50))
            .await
            .unwrap();
        standin.set_faults(Faults {
            next_metrics: DEMO_METRICS
                .iter()
                .map(|&(precision, recall, average_precision)| Metrics {
                    precision,
                    recall,
                    average_precision,
                })
                .collect(),
            ..Default::default()
        });
        let queue = unique("demoq");
        let backup = azurite.container_url("cvbackups");
        let env = vec![
            ("CVCHAIN_STORAGE", azurite.connection_string()),
            ("CVCHAIN_QUEUE", queue.clone()),
            ("CVCHAIN_HISTORY_TABLE", unique("Demo")),
            ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
            ("CUSTOM_VISION_TRAINING_KEY", DEMO_KEY.into()),
            ("CVCHAIN_EXPORTS", DEMO_CHAIN.into()),
            ("CVCHAIN_BACKUP_CONTAINER", backup.clone()),
            ("CVCHAIN_GATE", DEMO_GATE.into()),
            ("CVCHAIN_EVENTS_QUEUE", unique("demoev")),
            ("CVCHAIN_WORKER_RETRY_SECONDS", "1".into()),
            ("CVCHAIN_WORKER_MAX_POLL_SECONDS", "1".into()),
        ];
        let worker = Handler::start_worker(&env);
        let api = StandinApi::with_storage(&standin.endpoint(), DEMO_KEY, &clients);
        let project = api
            .create_project(&[
                ("name", "Widgets"),
                ("domainId", COMPACT_DOMAIN),
                ("notificationQueueUri", &azurite.queue_url(&queue)),
                ("exportModelContainerUri", &backup),
            ])
            .await;
        let mut run = DemoRun {
            azurite,
            standin,
            clients,
            env,
            project,
            iterations: Vec::new(),
            worker,
        };
        for _ in 0..2 {
            let it = api.train(project).await;
            run.iterations.push(it);
            run.wait_for_chain(it).await;
        }
        run.wait_until_settled().await;
        run
    }

    /// Until every event is delivered and nothing more is written: what the run shows then
    /// (the console's JSON, the CLI's output) no longer changes between two reads.
    pub async fn wait_until_settled(&self) {
        let until = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        loop {
            let rows = self.rows().await;
            let pending = rows
                .iter()
                .filter(|r| {
                    r.entity["RowKey"]
                        .as_str()
                        .is_some_and(|k| k.starts_with("Outbox_"))
                        && r.entity.get("Pending").and_then(|v| v.as_bool()) != Some(false)
                })
                .count();
            let seen: Vec<String> = rows
                .iter()
                .map(|r| serde_json::to_string(&r.entity).unwrap_or_default())
                .collect();
            if pending == 0 && last.as_ref() == Some(&seen) {
                return;
            }
            assert!(
                Instant::now() < until,
                "{pending} events still pending after a minute\n{}",
                self.worker.stderr()
            );
            last = Some(seen);
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    }

    /// One of the run's settings.
    pub fn setting(&self, name: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// The history table's rows (none while it is not there yet).
    async fn rows(&self) -> Vec<cvchain_azure::storage::table::StoredEntity> {
        self.clients
            .table(&self.setting("CVCHAIN_HISTORY_TABLE"))
            .unwrap()
            .query(None, 10_000)
            .await
            .unwrap_or_default()
    }

    /// Until both exports of the iteration are released and its `latest` channels moved.
    pub async fn wait_for_chain(&self, iteration: Uuid) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = self.rows().await;
            let released = rows
                .iter()
                .filter(|r| {
                    r.entity["RowKey"]
                        .as_str()
                        .is_some_and(|k| k.starts_with(&format!("ExportStep_{iteration}")))
                        && r.entity.contains_key("ReleaseUrl")
                })
                .count();
            let latest = rows
                .iter()
                .filter(|r| {
                    r.entity["EventType"] == "ChannelMove"
                        && r.entity["Channel"] == "latest"
                        && r.entity["IterationId"] == iteration.to_string()
                })
                .count();
            if released == 2 && latest == 2 {
                return;
            }
            assert!(
                Instant::now() < until,
                "the chain of {iteration} did not complete: {released} released, {latest} latest moves\n{}",
                self.worker.stderr()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
