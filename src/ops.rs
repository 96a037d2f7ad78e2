//! Operator commands: `check` reaches every dependency with the configured credentials and says
//! what to fix; `replay` moves poison messages back to the queue after a fix, recording each.

use crate::customvision::TrainingApi;
use crate::history::{HistoryRow, Received, store::HistoryStore};
use crate::settings::{Settings, StorageAuth};
use crate::storage::{
    StorageError,
    connection::StorageClients,
    queue::{poison_queue_name, send_text},
};
use azure_core::http::StatusCode;
use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
use serde_json::json;
use time::OffsetDateTime;

/// One line of `cvchain check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "✓" } else { "✗" };
        write!(f, "{mark} {}", self.what)?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// What to fix when storage says no: the setting, and the role for identity-based access.
fn storage_hint(settings: &Settings, role: &str, e: &StorageError) -> String {
    let setting = &settings.storage.source;
    match (e, &settings.storage.auth) {
        (StorageError::Denied { .. }, StorageAuth::Token(_)) => {
            format!("{e} — give the identity in {setting}__credential/__clientId the role {role}")
        }
        (StorageError::Denied { .. }, _) => format!("{e} — fix the key or SAS in {setting}"),
        (StorageError::Unreachable { .. }, _) => {
            format!("{e} — check the endpoints in {setting}")
        }
        _ => format!("{e} (setting {setting})"),
    }
}

fn ok(what: String, detail: impl Into<String>) -> Check {
    Check {
        what,
        ok: true,
        detail: detail.into(),
    }
}

fn failed(what: String, detail: String) -> Check {
    Check {
        what,
        ok: false,
        detail,
    }
}

/// Reaches the queue, the poison queue, the history table, the containers and Custom Vision.
pub async fn check(
    settings: &Settings,
    clients: &StorageClients,
    cv: Option<&dyn TrainingApi>,
) -> Vec<Check> {
    let mut out = Vec::new();
    for name in [
        settings.queue_name.clone(),
        poison_queue_name(&settings.queue_name),
    ] {
        let what = format!("queue {name}");
        let result = match clients.queue(&name) {
            Ok(q) => match q.get_properties(None).await {
                Ok(_) => Ok("reachable".to_owned()),
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                    Ok("does not exist yet (created on first use)".to_owned())
                }
                Err(e) => Err(StorageError::from_azure("queue", &e)),
            },
            Err(e) => Err(e),
        };
        out.push(match result {
            Ok(d) => ok(what, d),
            Err(e) => failed(
                what,
                storage_hint(settings, "Storage Queue Data Contributor", &e),
            ),
        });
    }

    let what = format!("table {}", settings.history_table);
    let result = match clients.table(&settings.history_table) {
        Ok(t) => match t.query_page(None, Some(1), None).await {
            Ok(_) => Ok("reachable".to_owned()),
            Err(StorageError::Service { status: 404, .. }) => {
                Ok("does not exist yet (created on first use)".to_owned())
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    out.push(match result {
        Ok(d) => ok(what, d),
        Err(e) => failed(
            what,
            storage_hint(settings, "Storage Table Data Contributor", &e),
        ),
    });

    let mut containers = vec![(settings.release.container.clone(), "release container")];
    if let Some(url) = &settings.release.backup_container
        && let Some(name) = url
            .path_segments()
            .and_then(|mut s| s.rfind(|p| !p.is_empty()))
    {
        containers.push((name.to_owned(), "backup container"));
    }
    for (name, kind) in containers {
        let what = format!("{kind} {name}");
        let result = match clients.blob_service() {
            Ok(s) => match s.blob_container_client(&name).get_properties(None).await {
                Ok(_) => Ok("reachable".to_owned()),
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                    Ok(if kind == "release container" {
                        "does not exist yet (created on first copy)".to_owned()
                    } else {
                        "does not exist yet (Custom Vision creates it)".to_owned()
                    })
                }
                Err(e) => Err(StorageError::from_azure("blob", &e)),
            },
            Err(e) => Err(e),
        };
        out.push(match result {
            Ok(d) => ok(what, d),
            Err(e) => failed(what, storage_hint(settings, "Storage Blob Data Owner", &e)),
        });
    }

    match (cv, &settings.custom_vision) {
        (Some(cv), Some(cfg)) => {
            let what = format!("Custom Vision {}", cfg.endpoint);
            // A project that cannot exist: NotFoundProject proves the key or identity works.
            out.push(match cv.get_project(uuid::Uuid::nil()).await {
                Ok(_) => ok(what, "reachable"),
                Err(e) if e.is_not_found() => ok(what, "reachable, credentials accepted"),
                Err(e) => {
                    let fix = match &cfg.auth {
                        crate::settings::CvAuthSetting::Key(_) => {
                            "fix CUSTOM_VISION_TRAINING_KEY or CUSTOM_VISION_ENDPOINT".to_owned()
                        }
                        crate::settings::CvAuthSetting::ManagedIdentity { .. } => {
                            "give the identity (CUSTOM_VISION_CLIENT_ID) a Custom Vision role, and use a custom-subdomain CUSTOM_VISION_ENDPOINT".to_owned()
                        }
                    };
                    failed(what, format!("{e} — {fix}"))
                }
            });
        }
        _ => out.push(ok(
            "Custom Vision".into(),
            "not configured (CUSTOM_VISION_ENDPOINT unset): notifications are only recorded",
        )),
    }
    out
}

/// Replayed messages get a row each in this partition.
pub const REPLAYED_PARTITION: &str = "_replayed";

/// Moves up to `limit` messages from `<queue>-poison` back to the queue; returns how many.
pub async fn replay(
    settings: &Settings,
    clients: &StorageClients,
    history: &HistoryStore,
    limit: usize,
) -> Result<usize, StorageError> {
    let poison = clients.queue(&poison_queue_name(&settings.queue_name))?;
    let queue = clients.queue(&settings.queue_name)?;
    let mut moved = 0;
    while moved < limit {
        let want = (limit - moved).min(32) as i32;
        let got = match poison
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(want),
                visibility_timeout: Some(60),
                ..Default::default()
            }))
            .await
        {
            Ok(r) => r
                .into_model()
                .map_err(|e| StorageError::from_azure("queue", &e))?,
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => break,
            Err(e) => return Err(StorageError::from_azure("queue", &e)),
        };
        let items = got.items.unwrap_or_default();
        if items.is_empty() {
            break;
        }
        for m in items {
            let text = m.message_text.clone().unwrap_or_default();
            let id = m.message_id.clone().unwrap_or_default();
            // Send first, then record, then delete: a crash leaves a duplicate, never a loss.
            send_text(&queue, &text).await?;
            let received = Received {
                text: text.clone(),
                message_id: Some(id.clone()),
                dequeue_count: m.dequeue_count.unwrap_or(1).clamp(1, u32::MAX as i64) as u32,
                received_at: OffsetDateTime::now_utc(),
            };
            let mut row: HistoryRow = crate::history::failed_row(&received, "replayed", false);
            row.partition_key = REPLAYED_PARTITION.to_owned();
            row.properties.insert("EventType".into(), json!("Replayed"));
            row.properties.insert("Status".into(), json!("Replayed"));
            row.properties.remove("Transient");
            row.properties
                .insert("Reason".into(), json!("moved back from the poison queue"));
            history.record(&row).await?;
            poison
                .delete_message(&id, m.pop_receipt.as_deref().unwrap_or_default(), None)
                .await
                .map_err(|e| StorageError::from_azure("queue", &e))?;
            moved += 1;
        }
    }
    Ok(moved)
}
