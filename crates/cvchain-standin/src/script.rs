//! What a user's training script does against Custom Vision (create a project wired to storage,
//! tag images, train), over HTTP like any client: `cvchain dev` and the tests set projects up
//! with it, so the stand-in sees the same calls Microsoft's SDKs make.

use crate::imaging::solid_png;
use crate::state::MIN_IMAGES_PER_TAG;
use serde_json::Value;
use uuid::Uuid;

/// A failed call: the operation, the HTTP status and the service's code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{operation} answered HTTP {status} {code}: {message}")]
pub struct ScriptError {
    pub operation: String,
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// Sends refused for rate (429) before a call gives up.
const MAX_TRIES: u32 = 30;

/// A Training API client for set-up scripts (v3.4-preview, the SDKs' default).
#[derive(Clone)]
pub struct TrainingScript {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl TrainingScript {
    pub fn new(endpoint: &str, key: &str) -> Self {
        Self {
            base: format!(
                "{}/customvision/v3.4-preview/training",
                endpoint.trim_end_matches('/')
            ),
            key: key.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Sends a request; answers the JSON body (`Null` for none) or the service's error.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value, ScriptError> {
        let operation = format!("{method} {path}");
        let failed = |status: u16, code: &str, message: String| ScriptError {
            operation: operation.clone(),
            status,
            code: code.to_owned(),
            message,
        };
        // Over the resource's calls per second the service answers 429: wait as it says, as
        // Microsoft's SDKs do, and send again.
        let mut tries = 0;
        let rsp = loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}/{path}", self.base))
                .query(query)
                .header("Training-Key", &self.key);
            if let Some(b) = &body {
                req = req.json(b);
            }
            let rsp = req.send().await.map_err(|e| failed(0, "", e.to_string()))?;
            tries += 1;
            if rsp.status().as_u16() != 429 || tries >= MAX_TRIES {
                break rsp;
            }
            let wait = rsp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1)
                .min(60);
            tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
        };
        let status = rsp.status().as_u16();
        let text = rsp
            .text()
            .await
            .map_err(|e| failed(status, "", e.to_string()))?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|e| failed(status, "", e.to_string()))?
        };
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let code = value["code"]
                .as_str()
                .or(value["error"]["code"].as_str())
                .unwrap_or_default();
            let message = value["message"]
                .as_str()
                .or(value["error"]["message"].as_str())
                .unwrap_or_default()
                .to_owned();
            Err(failed(status, code, message))
        }
    }

    /// CreateProject with the storage URIs in the body, as Microsoft's SDKs send them.
    pub async fn create_project(
        &self,
        name: &str,
        domain: &str,
        queue_uri: Option<&str>,
        container_uri: Option<&str>,
    ) -> Result<Uuid, ScriptError> {
        let mut options = serde_json::Map::new();
        if let Some(q) = queue_uri {
            options.insert("notificationQueueUri".into(), q.into());
        }
        if let Some(c) = container_uri {
            options.insert("exportModelContainerUri".into(), c.into());
        }
        let body = (!options.is_empty()).then_some(Value::Object(options));
        let p = self
            .call(
                reqwest::Method::POST,
                "projects",
                &[("name", name), ("domainId", domain)],
                body,
            )
            .await?;
        Ok(id_of(&p))
    }

    /// Creates `tags` and uploads [`MIN_IMAGES_PER_TAG`] distinct small PNGs for each: enough
    /// for the project to train. `salt` varies the pictures between calls.
    pub async fn add_tagged_images(
        &self,
        project: Uuid,
        tags: &[&str],
        salt: u8,
    ) -> Result<(), ScriptError> {
        use base64::Engine as _;
        let existing = self
            .call(
                reqwest::Method::GET,
                &format!("projects/{project}/tags"),
                &[],
                None,
            )
            .await?;
        for (n, name) in tags.iter().enumerate() {
            let tag = match existing
                .as_array()
                .and_then(|a| a.iter().find(|t| t["name"] == *name))
            {
                Some(t) => id_of(t),
                None => id_of(
                    &self
                        .call(
                            reqwest::Method::POST,
                            &format!("projects/{project}/tags"),
                            &[("name", name)],
                            None,
                        )
                        .await?,
                ),
            };
            let images: Vec<Value> = (0..MIN_IMAGES_PER_TAG)
                .map(|i| {
                    let png = solid_png(16, [n as u8, i as u8, salt]);
                    serde_json::json!({
                        "name": format!("{name}-{salt}-{i}.png"),
                        "contents": base64::engine::general_purpose::STANDARD.encode(png),
                    })
                })
                .collect();
            self.call(
                reqwest::Method::POST,
                &format!("projects/{project}/images/files"),
                &[],
                Some(serde_json::json!({"images": images, "tagIds": [tag]})),
            )
            .await?;
        }
        Ok(())
    }

    /// TrainProject; answers the new iteration's id.
    pub async fn train(&self, project: Uuid, force: bool) -> Result<Uuid, ScriptError> {
        let query: &[(&str, &str)] = if force {
            &[("forceTrain", "true")]
        } else {
            &[]
        };
        let it = self
            .call(
                reqwest::Method::POST,
                &format!("projects/{project}/train"),
                query,
                None,
            )
            .await?;
        Ok(id_of(&it))
    }
}

fn id_of(v: &Value) -> Uuid {
    v["id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_default()
}
