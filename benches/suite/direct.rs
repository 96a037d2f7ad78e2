//! The baseline: a minimal client that makes, for each message, the storage and Custom Vision
//! calls cvchain makes (the suite counts both in Azurite's request log to show they match),
//! without the host protocol, message validation, planning, claims bookkeeping logic or
//! history enrichment: what the same work costs with nothing of cvchain around it.

use crate::workload::{Env, Kind, Message};
use azure_storage_blob::models::{BlobClientStartCopyFromUrlOptions, BlobTags};
use cvchain_azure::customvision::{
    TrainingApi,
    client::{CvAuth, CvRetry, TrainingClient},
};
use cvchain_azure::storage::table::{Entity, TableClient, UpdateMode, WriteOutcome, filter_eq};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub struct Direct {
    env_clients: cvchain_azure::storage::clients::StorageClients,
    table: TableClient,
    cv: TrainingClient,
    release: azure_storage_blob::BlobContainerClient,
    backup_url: String,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn entity(pk: &str, rk: &str, fields: &[(&str, Value)]) -> Entity {
    let mut e = Entity::new();
    e.insert("PartitionKey".into(), json!(pk));
    e.insert("RowKey".into(), json!(rk));
    for (k, v) in fields {
        e.insert((*k).into(), v.clone());
    }
    e
}

impl Direct {
    pub async fn new(env: &Env, max_rps: u32) -> Self {
        let table = env.clients.table(&env.table).unwrap();
        table.create_if_missing().await.unwrap();
        let release = env
            .clients
            .blob_service()
            .unwrap()
            .blob_container_client(&env.release);
        let _ = release.create(None).await;
        let endpoint = url::Url::parse(&env.standin.endpoint()).unwrap();
        Self {
            env_clients: env.clients.clone(),
            table,
            cv: TrainingClient::new(
                &endpoint,
                CvAuth::Key(crate::workload::KEY.into()),
                max_rps,
                CvRetry::default(),
            ),
            release,
            backup_url: env.azurite.container_url(&env.backup),
        }
    }

    /// Takes a claim row, waiting while another message of the iteration holds it.
    async fn claim(&self, e: &Entity) -> Result<String, Error> {
        for _ in 0..500 {
            match self.table.insert(e).await? {
                WriteOutcome::Written { etag } => return Ok(etag),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        Err("claim held for 10 s".into())
    }

    /// Inserts unless the row is there (as cvchain records: a row that exists is left alone).
    async fn insert(&self, e: &Entity) -> Result<(), Error> {
        self.table.insert(e).await?;
        Ok(())
    }

    /// One message, start to end.
    pub async fn handle(&self, text: &str) -> Result<(), Error> {
        let v: Value = serde_json::from_str(text)?;
        let c = &v["Content"];
        let p = Uuid::parse_str(c["projectId"].as_str().unwrap_or_default())?;
        let i = Uuid::parse_str(c["iterationId"].as_str().unwrap_or_default())?;
        let model_uri = c["modelUri"].as_str().unwrap_or_default();
        let kind = if c["trainingStatus"].is_string() {
            Kind::TrainingCompleted
        } else if model_uri.ends_with(".ONNX") {
            Kind::ExportOnnx
        } else {
            Kind::ExportTensorFlow
        };
        let it = self.cv.get_iteration(p, i).await?;
        let project = self.cv.get_project(p).await?;
        let perf = self.cv.get_iteration_performance(p, i).await?;
        let exports = self.cv.get_exports(p, i).await?;
        let pk = p.to_string();
        let steps = format!(
            "{} and RowKey ge 'Step_{i}' and RowKey lt 'Step_{i}~'",
            filter_eq("PartitionKey", &pk)
        );
        self.table.query(Some(&steps), 1000).await?;
        let row = |what: &str| {
            entity(
                &pk,
                &format!("{what}_{i}_{}", Uuid::new_v4()),
                &[
                    ("EventType", json!(what)),
                    ("IterationId", json!(i.to_string())),
                    ("ProjectName", json!(project.name)),
                    ("IterationName", json!(it.name)),
                    ("Precision", json!(perf.precision)),
                    ("Recall", json!(perf.recall)),
                    ("MessageText", json!(text)),
                ],
            )
        };
        let step = |platform: &str, status: &str| {
            entity(
                &pk,
                &format!("Step_{i}_{platform}"),
                &[
                    ("Platform", json!(platform)),
                    ("Status", json!(status)),
                    ("IterationId", json!(i.to_string())),
                ],
            )
        };
        match kind {
            Kind::TrainingCompleted => {
                self.insert(&step("ONNX", "Done")).await?;
                self.insert(&step("TensorFlow", "Done")).await?;
                let claim = self.claim(&step("Claim_CoreML", "held")).await?;
                self.cv.get_exports(p, i).await?;
                self.cv.export_iteration(p, i, "CoreML", None).await?;
                self.table
                    .delete(&pk, &format!("Step_{i}_Claim_CoreML"), &claim)
                    .await?;
                self.insert(&step("CoreML", "Requested")).await?;
                self.insert(&row("Training")).await?;
            }
            Kind::ExportOnnx | Kind::ExportTensorFlow => {
                // As cvchain: every export GetExports reports done (CoreML may still be running).
                let done: Vec<&str> = ["ONNX", "TensorFlow", "CoreML"]
                    .into_iter()
                    .filter(|p| {
                        exports
                            .iter()
                            .any(|e| e.platform == *p && e.status == "Done")
                    })
                    .collect();
                for platform in done {
                    let claim_rk = format!("Claim_{i}_{platform}");
                    let claim = self
                        .claim(&entity(&pk, &claim_rk, &[("Purpose", json!("Copy"))]))
                        .await?;
                    let name = format!("{p} - {i}.{platform}");
                    let source = self.env_clients.blob_at(&url::Url::parse(&format!(
                        "{}/{}",
                        self.backup_url,
                        name.replace(' ', "%20")
                    ))?)?;
                    let props = source.get_properties(None).await?;
                    let dest_path = format!("{}/{}/{platform}.zip", project.name, it.name);
                    let dest = self.release.blob_client(&dest_path);
                    let current = dest.get_properties(None).await.is_ok();
                    if !current {
                        use azure_storage_blob::models::BlobClientGetPropertiesResultHeaders;
                        let tags = format!("project={p}&iteration={i}&platform={platform}");
                        let options = BlobClientStartCopyFromUrlOptions {
                            metadata: Some(HashMap::from([
                                ("projectid".to_owned(), p.to_string()),
                                ("iterationid".to_owned(), i.to_string()),
                                ("platform".to_owned(), platform.to_owned()),
                            ])),
                            blob_tags_string: Some(tags),
                            source_if_match: props.etag()?,
                            ..Default::default()
                        };
                        dest.start_copy_from_url(source.url().to_string(), Some(options))
                            .await?;
                        dest.get_properties(None).await?;
                        let _: HashMap<String, String> =
                            source.get_tags(None).await?.into_model()?.into();
                        let wanted: BlobTags = HashMap::from([
                            ("project".to_owned(), p.to_string()),
                            ("iteration".to_owned(), i.to_string()),
                            ("platform".to_owned(), platform.to_owned()),
                        ])
                        .into();
                        source.set_tags(wanted.try_into()?, None).await?;
                    }
                    self.table.delete(&pk, &claim_rk, &claim).await?;
                    if !current {
                        self.table
                            .upsert(&step(platform, "Released"), UpdateMode::Merge)
                            .await?;
                    }
                }
                self.table.query(Some(&steps), 1000).await?;
                if kind == Kind::ExportOnnx {
                    self.table
                        .upsert(&step("ONNX", "Done"), UpdateMode::Merge)
                        .await?;
                }
                self.insert(&row("Export")).await?;
            }
        }
        Ok(())
    }
}

/// Every message, `concurrency` at a time, from memory.
pub async fn run(direct: &Direct, messages: &[Message], concurrency: usize) -> Duration {
    let started = Instant::now();
    futures::stream::iter(messages)
        .map(|m| async move {
            direct
                .handle(&m.text)
                .await
                .unwrap_or_else(|e| panic!("direct client, {:?}: {e}", m.kind))
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}

/// As the worker consumes its queue: receive up to `batch` at a time, at most one and a half
/// batches in flight, delete each message once handled.
pub async fn run_queue(direct: Arc<Direct>, env: &Env, total: usize, batch: usize) -> Duration {
    use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
    let queue = Arc::new(env.clients.queue(&env.queue).unwrap());
    let permits = Arc::new(tokio::sync::Semaphore::new(batch + batch / 2));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    while done.load(std::sync::atomic::Ordering::Relaxed) < total {
        while let Some(joined) = tasks.try_join_next() {
            // A failed message would stay on the queue and the loop would never end.
            joined.expect("the direct queue consumer failed a message");
        }
        let free = permits.available_permits();
        if free == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let got = queue
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(free.min(batch) as i32),
                visibility_timeout: Some(60),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_model()
            .unwrap()
            .items
            .unwrap_or_default();
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for m in got {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let (direct, queue, done) = (direct.clone(), queue.clone(), done.clone());
            tasks.spawn(async move {
                let text = m.message_text.unwrap_or_default();
                direct
                    .handle(&text)
                    .await
                    .unwrap_or_else(|e| panic!("direct client: {e}"));
                queue
                    .delete_message(
                        m.message_id.as_deref().unwrap_or_default(),
                        m.pop_receipt.as_deref().unwrap_or_default(),
                        None,
                    )
                    .await
                    .unwrap();
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(permit);
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("the direct queue consumer failed a message");
    }
    started.elapsed()
}
