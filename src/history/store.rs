//! The history table: insert-if-absent writes, so a redelivered message leaves its row unchanged.

use super::HistoryRow;
use crate::storage::{
    StorageError,
    table::{Entity, StoredEntity, TableClient, UpdateMode, WriteOutcome},
};

/// What recording a row did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// The row is new.
    Inserted,
    /// A row with these keys was already there (a redelivery); it is left as it was.
    AlreadyPresent(StoredEntity),
}

#[derive(Debug, Clone)]
pub struct HistoryStore {
    table: TableClient,
}

impl HistoryStore {
    pub fn new(table: TableClient) -> Self {
        Self { table }
    }

    pub fn table(&self) -> &TableClient {
        &self.table
    }

    /// Inserts the row unless one with its keys exists; creates the table on first use.
    pub async fn record(&self, row: &HistoryRow) -> Result<Recorded, StorageError> {
        let entity = row.to_entity();
        let outcome = match self.table.insert(&entity).await {
            Err(StorageError::Service { status: 404, .. }) => {
                self.table.create_if_missing().await?;
                self.table.insert(&entity).await?
            }
            other => other?,
        };
        match outcome {
            WriteOutcome::Written { .. } => Ok(Recorded::Inserted),
            WriteOutcome::AlreadyExists | WriteOutcome::Conflict => {
                let existing = self
                    .table
                    .get(&row.partition_key, &row.row_key)
                    .await?
                    .ok_or_else(|| StorageError::Other {
                        service: "table",
                        detail: format!("row {} vanished after a conflict", row.describe()),
                    })?;
                Ok(Recorded::AlreadyPresent(existing))
            }
        }
    }

    /// Adds or overwrites some properties of an existing row.
    pub async fn merge(
        &self,
        partition_key: &str,
        row_key: &str,
        properties: Entity,
    ) -> Result<(), StorageError> {
        let mut e = properties;
        e.insert("PartitionKey".into(), partition_key.into());
        e.insert("RowKey".into(), row_key.into());
        self.table.upsert(&e, UpdateMode::Merge).await.map(|_| ())
    }

    pub async fn get(
        &self,
        partition_key: &str,
        row_key: &str,
    ) -> Result<Option<StoredEntity>, StorageError> {
        self.table.get(partition_key, row_key).await
    }

    /// Rows matching an OData filter, newest partitions first is not guaranteed: table order.
    pub async fn query(
        &self,
        filter: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntity>, StorageError> {
        match self.table.query(filter, limit).await {
            Err(StorageError::Service { status: 404, .. }) => Ok(Vec::new()),
            other => other,
        }
    }
}
