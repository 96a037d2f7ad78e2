//! `process(message) -> Outcome`: plan, then carry the actions out against storage. Every entry
//! point (the Functions handler, later the queue worker) goes through here.

use crate::history::{
    Received,
    store::{HistoryStore, Recorded},
};
use crate::plan::{Action, Decision, PlanConfig, plan, plan_unreadable};
use crate::settings::Settings;
use crate::storage::{
    StorageError,
    connection::StorageClients,
    queue::{poison_queue_name, send_text},
};
use azure_storage_queue::QueueClient;
use serde_json::json;

/// How a message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Understood and recorded.
    Recorded,
    /// Rejected for good: recorded and copied to the poison queue.
    Rejected,
}

/// The result of processing one message; the message can be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub disposition: Disposition,
    /// `PartitionKey/RowKey` of the history row.
    pub row: String,
    /// True when the row was already there: a redelivery, nothing changed.
    pub duplicate: bool,
    /// Lines for the invocation's log; never a secret.
    pub logs: Vec<String>,
}

/// Why a message could not be processed now. It stays on the queue and is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    #[error("could not record the message: {0}")]
    Storage(#[from] StorageError),
}

impl ProcessError {
    /// True when a retry may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ProcessError::Storage(e) => e.is_transient(),
        }
    }
}

/// The adapters the actions need.
pub struct Processor {
    history: HistoryStore,
    poison: QueueClient,
    config: PlanConfig,
    table_name: String,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("history", &self.history)
            .field("poison_queue", &self.config.poison_queue)
            .finish()
    }
}

impl Processor {
    pub fn new(settings: &Settings, clients: &StorageClients) -> Result<Self, StorageError> {
        let poison_queue = poison_queue_name(&settings.queue_name);
        Ok(Self {
            history: HistoryStore::new(clients.table(&settings.history_table)?),
            poison: clients.queue(&poison_queue)?,
            config: PlanConfig { poison_queue },
            table_name: settings.history_table.clone(),
        })
    }

    pub fn history(&self) -> &HistoryStore {
        &self.history
    }

    /// Processes one queue message.
    pub async fn process(&self, received: &Received) -> Result<Outcome, ProcessError> {
        let (decision, actions) = plan(received, &self.config);
        self.carry_out(decision, actions).await
    }

    /// Records something that arrived but could not be read as a message at all.
    pub async fn process_unreadable(
        &self,
        received: &Received,
        reason: &str,
    ) -> Result<Outcome, ProcessError> {
        let (decision, actions) = plan_unreadable(received, reason, &self.config);
        self.carry_out(decision, actions).await
    }

    async fn carry_out(
        &self,
        decision: Decision,
        actions: Vec<Action>,
    ) -> Result<Outcome, ProcessError> {
        let mut logs = Vec::new();
        let mut row_desc = String::new();
        let mut duplicate = false;
        let mut poison_already_sent = false;
        let mut recorded_row: Option<(String, String)> = None;
        for action in actions {
            match action {
                Action::Record(row) => {
                    row_desc = format!("{}/{}", self.table_name, row.describe());
                    match self.history.record(&row).await? {
                        Recorded::Inserted => {
                            logs.push(format!("recorded {row_desc}"));
                        }
                        Recorded::AlreadyPresent(existing) => {
                            duplicate = true;
                            poison_already_sent =
                                existing.entity.get("PoisonCopy") == Some(&json!("sent"));
                            logs.push(format!(
                                "{row_desc} already recorded: a redelivery, left unchanged"
                            ));
                        }
                    }
                    recorded_row = Some((row.partition_key, row.row_key));
                }
                Action::CopyToPoison { queue, text } => {
                    if poison_already_sent {
                        continue;
                    }
                    let sent_as = send_text(&self.poison, &text).await?;
                    if let Some((pk, rk)) = &recorded_row {
                        self.history
                            .merge(
                                pk,
                                rk,
                                serde_json::Map::from_iter([
                                    ("PoisonCopy".to_owned(), json!("sent")),
                                    ("PoisonEncoding".to_owned(), json!(sent_as.as_str())),
                                ]),
                            )
                            .await?;
                    }
                    logs.push(format!("copied the message to queue {queue}"));
                }
            }
        }
        let disposition = match &decision {
            Decision::Accepted(parsed) => {
                logs.insert(0, format!("received {}", parsed.notification));
                Disposition::Recorded
            }
            Decision::Rejected { reason, .. } => {
                logs.insert(0, format!("rejected: {}", crate::redact::redact(reason)));
                Disposition::Rejected
            }
        };
        Ok(Outcome {
            disposition,
            row: row_desc,
            duplicate,
            logs,
        })
    }
}
