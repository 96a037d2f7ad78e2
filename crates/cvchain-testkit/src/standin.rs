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
}

impl StandinApi {
    pub fn new(endpoint: &str, key: &str) -> Self {
        Self {
            base: format!("{endpoint}/customvision/v3.3/training"),
            key: key.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// POSTs, retrying while the stand-in injects faults, and returns the JSON answer.
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
        }
        panic!("POST {path} kept failing");
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}/{path}", self.base))
            .header("Training-Key", &self.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// CreateProject with the given query (name, domainId, notificationQueueUri, …).
    pub async fn create_project(&self, query: &[(&str, &str)]) -> uuid::Uuid {
        let p = self.post("projects", query).await;
        uuid::Uuid::parse_str(p["id"].as_str().unwrap()).unwrap()
    }

    /// TrainProject; returns the new iteration's id.
    pub async fn train(&self, project: uuid::Uuid) -> uuid::Uuid {
        let it = self.post(&format!("projects/{project}/train"), &[]).await;
        uuid::Uuid::parse_str(it["id"].as_str().unwrap()).unwrap()
    }

    /// Polls until `check` holds for the JSON at `path`.
    pub async fn wait_for(&self, path: &str, check: impl Fn(&serde_json::Value) -> bool) {
        for _ in 0..500 {
            if check(&self.get(path).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{path} never got there");
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
