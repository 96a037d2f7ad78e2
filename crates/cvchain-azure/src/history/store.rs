//! The history table: insert-if-absent writes, so a redelivered message leaves its row unchanged.

use super::{from_stored, props_to_entity, to_entity};
use crate::storage::{
    StorageError,
    table::{StoredEntity, TableClient, UpdateMode, WriteOutcome, filter_eq},
};
use cvchain_core::history::{HistoryRow, Props, StepRow, step_key_range};
use cvchain_core::report::newest_first;
use uuid::Uuid;

/// What recording a row did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// The row is new.
    Inserted,
    /// A row with these keys was already there (a redelivery); it is left as it was.
    AlreadyPresent(HistoryRow),
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
        let entity = to_entity(row);
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
                Ok(Recorded::AlreadyPresent(from_stored(&existing)))
            }
        }
    }

    /// Inserts the row unless one with its keys exists, without reading the one that does:
    /// `false` when it was there already.
    pub async fn record_once(&self, row: &HistoryRow) -> Result<bool, StorageError> {
        let entity = to_entity(row);
        let outcome = match self.table.insert(&entity).await {
            Err(StorageError::Service { status: 404, .. }) => {
                self.table.create_if_missing().await?;
                self.table.insert(&entity).await?
            }
            other => other?,
        };
        Ok(matches!(outcome, WriteOutcome::Written { .. }))
    }

    /// Adds or overwrites some properties of a row.
    pub async fn merge(
        &self,
        partition_key: &str,
        row_key: &str,
        properties: &Props,
    ) -> Result<(), StorageError> {
        let mut e = props_to_entity(properties);
        e.insert("PartitionKey".into(), partition_key.into());
        e.insert("RowKey".into(), row_key.into());
        self.table.upsert(&e, UpdateMode::Merge).await.map(|_| ())
    }

    pub async fn get(
        &self,
        partition_key: &str,
        row_key: &str,
    ) -> Result<Option<HistoryRow>, StorageError> {
        Ok(self
            .table
            .get(partition_key, row_key)
            .await?
            .as_ref()
            .map(from_stored))
    }

    /// The iteration's export step rows.
    pub async fn steps(
        &self,
        project: Uuid,
        iteration: Uuid,
    ) -> Result<Vec<StepRow>, StorageError> {
        let (from, to) = step_key_range(iteration);
        let filter = format!(
            "{} and {} and {}",
            filter_eq("PartitionKey", &project.to_string()),
            format_args!("RowKey ge '{}'", from.replace('\'', "''")),
            format_args!("RowKey lt '{}'", to.replace('\'', "''")),
        );
        Ok(self
            .query(Some(&filter), 1000)
            .await?
            .iter()
            .map(StepRow::from_row)
            .collect())
    }

    /// Every export step row of the project (retention reads them all).
    pub async fn project_steps(&self, project: Uuid) -> Result<Vec<StepRow>, StorageError> {
        let filter = format!(
            "{} and RowKey ge 'ExportStep_' and RowKey lt 'ExportStep`'",
            filter_eq("PartitionKey", &project.to_string()),
        );
        Ok(self
            .query(Some(&filter), 100_000)
            .await?
            .iter()
            .map(StepRow::from_row)
            .collect())
    }

    /// Rows matching an OData filter, in table order; none when the table does not exist yet.
    pub async fn query(
        &self,
        filter: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HistoryRow>, StorageError> {
        Ok(self
            .entities(filter, limit)
            .await?
            .iter()
            .map(from_stored)
            .collect())
    }

    /// The stored entities themselves, as the table gives them (`cvchain history --rows --json`).
    pub async fn entities(
        &self,
        filter: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntity>, StorageError> {
        match self.table.query(filter, limit).await {
            Err(StorageError::Service { status: 404, .. }) => Ok(Vec::new()),
            other => other,
        }
    }

    /// Up to `limit` rows, newest first, of one project (by partition) or of all.
    pub async fn recent(
        &self,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HistoryRow>, StorageError> {
        let filter = project.map(|p| filter_eq("PartitionKey", p));
        let mut rows = self.query(filter.as_deref(), limit).await?;
        newest_first(&mut rows);
        Ok(rows)
    }
}
