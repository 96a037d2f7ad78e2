//! The workload: Azurite and the Custom Vision stand-in of a run's own, projects trained and
//! exported through the stand-in's API, and the notifications the stand-in wrote for them, as
//! the service would have. Setting up is not timed.

use cvchain_azure::storage::clients::StorageClients;
use cvchain_azure::storage::settings::DEV_ACCOUNT;
use cvchain_core::notification::{ExportStatus, Notification, TrainingStatus};
use cvchain_standin::{COMPACT_DOMAIN, Standin, StandinConfig};
use cvchain_testkit::latency_proxy::LatencyProxy;
use cvchain_testkit::{Azurite, StandinApi, standin_config, unique};
use futures::StreamExt;
use std::time::Duration;
use uuid::Uuid;

pub const KEY: &str = "bench-training-key";
/// Every iteration is trained and exported to the first two before the run: a TrainingCompleted
/// then requests the third, and the first ExportCompleted copies all three to the release
/// container (the third is finished by the time its iteration's export messages arrive).
pub const CHAIN: &str = "ONNX,TensorFlow,CoreML";
/// Above what the runs reach: the Custom Vision limit is measured in its own section.
pub const FAST_CV_RPS: &str = "1000";

/// One notification as Custom Vision wrote it.
#[derive(Debug, Clone)]
pub struct Message {
    pub text: String,
    pub id: String,
    pub kind: Kind,
    pub project: Uuid,
    pub iteration: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    TrainingCompleted,
    ExportOnnx,
    ExportTensorFlow,
}

pub struct Env {
    pub azurite: Azurite,
    pub clients: StorageClients,
    pub standin: Standin,
    /// The queue `worker` reads (the stand-in writes to `setup_queue`).
    pub queue: String,
    pub setup_queue: String,
    pub table: String,
    pub backup: String,
    pub release: String,
    /// With a latency model: the proxy cvchain and the stand-in reach storage and Custom
    /// Vision through (the harness's own `clients` go to Azurite directly).
    pub proxy: Option<LatencyProxy>,
}

impl Env {
    pub async fn start(debug: bool) -> Self {
        Self::start_with_delay(debug, 0).await
    }

    /// As `start`, with the stand-in taking `delay_ms` to train and to export.
    pub async fn start_with_delay(debug: bool, delay_ms: u64) -> Self {
        Self::start_full(debug, delay_ms, None).await
    }

    /// As `start`, with every request of cvchain and the stand-in through a proxy that delays
    /// it by the storage or the Custom Vision latency.
    pub async fn start_with_latency(debug: bool, latency: (Duration, Duration)) -> Self {
        Self::start_full(debug, 0, Some(latency)).await
    }

    async fn start_full(debug: bool, delay_ms: u64, latency: Option<(Duration, Duration)>) -> Self {
        let azurite = tokio::task::block_in_place(|| {
            if debug {
                Azurite::builder().debug_log().start()
            } else {
                Azurite::builder().in_memory().start()
            }
        });
        let clients = StorageClients::new(&azurite.storage_settings())
            .unwrap()
            .with_application_id("cvchain-bench");
        let proxy = latency.map(|(storage, cv)| LatencyProxy::start(&azurite, storage, cv));
        // The stand-in writes to the account as cvchain sees it (through the proxy, if any).
        let standin_clients = match &proxy {
            Some(p) => StorageClients::new(
                &cvchain_azure::storage::settings::parse_connection_string(
                    "CVCHAIN_STORAGE",
                    &p.connection_string(),
                )
                .unwrap(),
            )
            .unwrap(),
            None => clients.clone(),
        };
        let standin = Standin::start(StandinConfig {
            model_size: 4096,
            // A round of 500 messages needs about 170 projects: more than one S0 resource holds.
            max_projects: 10_000,
            // Off: the benchmarks measure cvchain, not the service's limit; the rate section
            // turns it on once its workload is set up.
            rate_limit: None,
            ..standin_config(&standin_clients, KEY, delay_ms)
        })
        .await
        .unwrap();
        if let Some(p) = &proxy {
            p.set_custom_vision(&standin.endpoint());
        }
        let env = Self {
            queue: unique("work"),
            setup_queue: unique("setup"),
            table: unique("history"),
            backup: unique("backup"),
            release: unique("models"),
            azurite,
            clients,
            standin,
            proxy,
        };
        let blobs = env.clients.blob_service().unwrap();
        blobs
            .blob_container_client(&env.backup)
            .create(None)
            .await
            .unwrap();
        for q in [&env.queue, &env.setup_queue] {
            cvchain_azure::storage::queue::create_if_missing(&env.clients.queue(q).unwrap())
                .await
                .unwrap();
        }
        env
    }

    /// The account as cvchain and the stand-in reach it: `(connection string, blob URL, queue
    /// URL)`, through the proxy when there is one.
    fn account(&self) -> (String, String, String) {
        match &self.proxy {
            Some(p) => (
                p.connection_string(),
                format!("http://127.0.0.1:{}/{DEV_ACCOUNT}", p.blob_port),
                format!("http://127.0.0.1:{}/{DEV_ACCOUNT}", p.queue_port),
            ),
            None => (
                self.azurite.connection_string(),
                self.azurite.blob_url(),
                format!("http://127.0.0.1:{}/{DEV_ACCOUNT}", self.azurite.queue_port),
            ),
        }
    }

    /// A container's URL as the stand-in and cvchain see it.
    pub fn container_uri(&self, name: &str) -> String {
        format!("{}/{name}", self.account().1)
    }

    /// A queue's URL as the stand-in and cvchain see it.
    pub fn queue_uri(&self, name: &str) -> String {
        format!("{}/{name}", self.account().2)
    }

    /// The Custom Vision endpoint cvchain calls.
    pub fn custom_vision_endpoint(&self) -> String {
        match &self.proxy {
            Some(p) => p.custom_vision_endpoint(),
            None => self.standin.endpoint(),
        }
    }

    /// cvchain's settings for this environment (`max_rps` Custom Vision calls per second).
    pub fn settings(&self, max_rps: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CVCHAIN_STORAGE", self.account().0),
            ("CVCHAIN_QUEUE", self.queue.clone()),
            ("CVCHAIN_HISTORY_TABLE", self.table.clone()),
            ("CUSTOM_VISION_ENDPOINT", self.custom_vision_endpoint()),
            ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
            ("CVCHAIN_EXPORTS", CHAIN.into()),
            ("CVCHAIN_BACKUP_CONTAINER", self.container_uri(&self.backup)),
            ("CVCHAIN_RELEASE_CONTAINER", self.release.clone()),
            ("CVCHAIN_CV_MAX_RPS", max_rps.into()),
            ("RUST_LOG", "warn".into()),
        ]
    }

    /// Trains and exports `iterations` projects (one iteration each) and returns the messages
    /// the stand-in wrote, every TrainingCompleted first, then the ONNX exports, then the
    /// TensorFlow ones, so no two messages of an iteration are in flight together.
    pub async fn prepare(&self, iterations: usize) -> Vec<Message> {
        let api = StandinApi::with_storage(&self.standin.endpoint(), KEY, &self.clients);
        let queue_uri = self.queue_uri(&self.setup_queue);
        let container_uri = self.container_uri(&self.backup);
        futures::stream::iter(0..iterations)
            .map(|k| {
                let (api, queue_uri, container_uri) = (&api, &queue_uri, &container_uri);
                async move {
                    let name = format!("Bench {k:05}");
                    let project = api
                        .create_project(&[
                            ("name", name.as_str()),
                            ("domainId", COMPACT_DOMAIN),
                            ("notificationQueueUri", queue_uri),
                            ("exportModelContainerUri", container_uri),
                        ])
                        .await;
                    let iteration = api.train(project).await;
                    let it_path = format!("projects/{project}/iterations/{iteration}");
                    api.wait_for(&it_path, |v| v["status"] == "Completed").await;
                    for platform in ["ONNX", "TensorFlow"] {
                        api.post(&format!("{it_path}/export"), &[("platform", platform)])
                            .await;
                    }
                    api.wait_for(&format!("{it_path}/export"), |v| {
                        v.as_array().is_some_and(|a| {
                            a.len() == 2 && a.iter().all(|e| e["status"] == "Done")
                        })
                    })
                    .await;
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
        let mut messages = self.drain_setup_queue(3 * iterations).await;
        messages.sort_by_key(|m| (m.kind, m.project));
        messages
    }

    /// Reads the stand-in's notifications (skipping ConnectionTest) until `want` are in.
    async fn drain_setup_queue(&self, want: usize) -> Vec<Message> {
        use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
        let q = self.clients.queue(&self.setup_queue).unwrap();
        let mut out = Vec::with_capacity(want);
        let mut idle = 0;
        while out.len() < want {
            let got = q
                .receive_messages(Some(QueueClientReceiveMessagesOptions {
                    number_of_messages: Some(32),
                    visibility_timeout: Some(3600),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_model()
                .unwrap()
                .items
                .unwrap_or_default();
            if got.is_empty() {
                idle += 1;
                assert!(
                    idle < 100,
                    "the stand-in wrote {} of {want} messages",
                    out.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            for m in got {
                let text = m.message_text.unwrap_or_default();
                let parsed = cvchain_core::notification::parse(&text).expect("stand-in message");
                let kind = match &parsed.notification {
                    Notification::Training {
                        status: TrainingStatus::Completed,
                        ..
                    } => Kind::TrainingCompleted,
                    Notification::Export {
                        status: ExportStatus::Completed,
                        model_uri: Some(uri),
                        ..
                    } if uri.ends_with(".ONNX") => Kind::ExportOnnx,
                    Notification::Export {
                        status: ExportStatus::Completed,
                        ..
                    } => Kind::ExportTensorFlow,
                    _ => continue,
                };
                out.push(Message {
                    project: parsed.notification.project_id().unwrap(),
                    iteration: parsed.notification.iteration_id().unwrap(),
                    text,
                    id: m.message_id.unwrap_or_default(),
                    kind,
                });
            }
        }
        out
    }

    /// Puts `messages` on the worker's queue (not timed).
    pub async fn enqueue(&self, messages: &[Message]) {
        let q = self.clients.queue(&self.queue).unwrap();
        futures::stream::iter(messages)
            .map(|m| {
                let q = &q;
                async move {
                    cvchain_azure::storage::queue::send_text(q, &m.text)
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
    }

    /// Messages on the worker's queue, visible or not.
    pub async fn queue_length(&self) -> u64 {
        self.clients
            .queue(&self.queue)
            .unwrap()
            .get_properties(None)
            .await
            .ok()
            .and_then(|r| {
                use azure_storage_queue::models::QueueClientGetPropertiesResultHeaders;
                r.approximate_messages_count().ok().flatten()
            })
            .map(|n| n.max(0) as u64)
            .unwrap_or(u64::MAX)
    }
}
