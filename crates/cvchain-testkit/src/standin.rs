//! The Custom Vision stand-in, as the tests set it up and as a user's script would call it.

use cvchain_azure::storage::clients::StorageClients;
use std::time::Duration;

/// The stand-in's call log over HTTP, as any client would read it.
pub async fn standin_calls(endpoint: &str) -> cvchain_standin::CallLog {
    reqwest::get(format!("{endpoint}/_standin/calls"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The Custom Vision stand-in's REST API, as a user's script would call it to set a project up.
pub struct StandinApi {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
    /// The user's storage account: the queue and container a project is wired to are created
    /// there first, as a user creates them in Azure before CreateProject.
    pub storage: Option<StorageClients>,
    script: cvchain_standin::script::TrainingScript,
}

impl StandinApi {
    pub fn new(endpoint: &str, key: &str) -> Self {
        Self {
            base: format!("{endpoint}/customvision/v3.3/training"),
            key: key.to_owned(),
            http: reqwest::Client::new(),
            storage: None,
            script: cvchain_standin::script::TrainingScript::new(endpoint, key),
        }
    }

    /// A user with this storage account: `create_project` creates the queue and container its
    /// URIs name before wiring the project to them.
    pub fn with_storage(endpoint: &str, key: &str, storage: &StorageClients) -> Self {
        Self {
            storage: Some(storage.clone()),
            ..Self::new(endpoint, key)
        }
    }

    /// POSTs, retrying while the stand-in injects faults or refuses for rate, and returns the
    /// JSON answer.
    pub async fn post(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        for _ in 0..50 {
            let rsp = self
                .http
                .post(format!("{}/{path}", self.base))
                .query(query)
                .header("Training-Key", &self.key)
                .send()
                .await
                .unwrap();
            if rsp.status().is_success() {
                return rsp.json().await.unwrap();
            }
            wait_if_refused(&rsp).await;
        }
        panic!("POST {path} kept failing");
    }

    /// GETs, waiting out refusals for rate (429), and returns the JSON answer, an error's too.
    pub async fn get(&self, path: &str) -> serde_json::Value {
        for _ in 0..30 {
            let rsp = self
                .http
                .get(format!("{}/{path}", self.base))
                .header("Training-Key", &self.key)
                .send()
                .await
                .unwrap();
            if rsp.status().as_u16() != 429 {
                return rsp.json().await.unwrap();
            }
            wait_if_refused(&rsp).await;
        }
        panic!("GET {path} kept being refused for rate");
    }

    /// CreateProject with the given query (name, domainId, notificationQueueUri, …); with
    /// [`StandinApi::with_storage`], creates the queue and container first.
    pub async fn create_project(&self, query: &[(&str, &str)]) -> uuid::Uuid {
        if let Some(storage) = &self.storage {
            for (k, v) in query {
                match *k {
                    "notificationQueueUri" => create_queue(storage, &last_segment(v)).await,
                    "exportModelContainerUri" => create_container(storage, &last_segment(v)).await,
                    _ => {}
                }
            }
        }
        let p = self.post("projects", query).await;
        uuid::Uuid::parse_str(p["id"].as_str().unwrap()).unwrap()
    }

    /// TrainProject, as a training script does: the first time, two tags with enough images
    /// each; then a forced training (the same images may train again). Returns the new
    /// iteration's id. Retries while the stand-in injects faults.
    pub async fn train(&self, project: uuid::Uuid) -> uuid::Uuid {
        for _ in 0..50 {
            let tagged = self
                .get(&format!("projects/{project}/images/tagged/count"))
                .await;
            // Idempotent (tags are reused, images come back as duplicates), so a try cut short
            // by an injected fault is simply made again.
            let enough = 2 * cvchain_standin::MIN_IMAGES_PER_TAG as u64;
            if tagged.as_u64().is_some_and(|n| n >= enough)
                || self
                    .script
                    .add_tagged_images(project, &["widget", "gadget"], 0)
                    .await
                    .is_ok()
            {
                break;
            }
        }
        let it = self
            .post(
                &format!("projects/{project}/train"),
                &[("forceTrain", "true")],
            )
            .await;
        uuid::Uuid::parse_str(it["id"].as_str().unwrap()).unwrap()
    }

    /// The training-script client behind this API (v3.4-preview, as the SDKs use).
    pub fn script(&self) -> &cvchain_standin::script::TrainingScript {
        &self.script
    }

    /// Polls until `check` holds for the JSON at `path`.
    pub async fn wait_for(&self, path: &str, check: impl Fn(&serde_json::Value) -> bool) {
        // Every 100 ms: a poll is a call, and the resource serves 10 a second to everyone.
        for _ in 0..200 {
            if check(&self.get(path).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{path} never got there");
    }
}

/// After a 429, waits as its `Retry-After` says (a second if it says nothing).
async fn wait_if_refused(rsp: &reqwest::Response) {
    if rsp.status().as_u16() == 429 {
        let secs = rsp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1)
            .min(60);
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
}

/// The stand-in's configuration for tests: this key, writing to `clients`' account, training and
/// exports completing after `delay_ms`. Override fields with struct update syntax.
pub fn standin_config(
    clients: &StorageClients,
    key: &str,
    delay_ms: u64,
) -> cvchain_standin::StandinConfig {
    cvchain_standin::StandinConfig {
        training_key: key.into(),
        storage: Some(clients.clone()),
        train_delay: Duration::from_millis(delay_ms),
        export_delay: Duration::from_millis(delay_ms),
        ..Default::default()
    }
}

fn last_segment(uri: &str) -> String {
    url::Url::parse(uri)
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.rfind(|p| !p.is_empty()).map(str::to_owned))
        })
        .unwrap_or_default()
}

/// Creates a queue in `storage` (an existing one is fine), as a user does before wiring a
/// project to it.
pub async fn create_queue(storage: &StorageClients, name: &str) {
    cvchain_azure::storage::queue::create_if_missing(&storage.queue(name).unwrap())
        .await
        .unwrap();
}

/// Creates a container in `storage` (an existing one is fine).
pub async fn create_container(storage: &StorageClients, name: &str) {
    let c = storage.blob_service().unwrap().blob_container_client(name);
    if let Err(e) = c.create(None).await {
        assert_eq!(
            e.http_status(),
            Some(azure_core::http::StatusCode::Conflict),
            "create container {name}: {e}"
        );
    }
}
