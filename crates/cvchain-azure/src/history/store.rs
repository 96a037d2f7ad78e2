//! The history table: insert-if-absent writes, so a redelivered message leaves its row unchanged.

use super::{from_stored, props_to_entity, to_entity};
use crate::storage::{
    StorageError,
    table::{Continuation, StoredEntity, TableClient, UpdateMode, WriteOutcome, filter_eq},
};
use cvchain_core::history::{HistoryRow, Prop, Props, StepRow, step_key_range};
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
        Ok(self
            .step_rows(project, iteration)
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

    /// One page of trained iterations (their Training rows, up to `limit`, from `from` on) and
    /// the export step rows of each, for the history page: a request reads one bounded page,
    /// never the whole table. The continuation is where the next page starts.
    pub async fn iterations_page(
        &self,
        project: Option<&str>,
        limit: u32,
        from: Option<&Continuation>,
    ) -> Result<(Vec<HistoryRow>, Option<Continuation>), StorageError> {
        use futures::StreamExt;
        let mut filter = filter_eq("EventType", "Training");
        if let Some(p) = project {
            filter = format!("{} and {filter}", filter_eq("PartitionKey", p));
        }
        let page = match self
            .table
            .query_page(Some(&filter), Some(limit), from)
            .await
        {
            Err(StorageError::Service { status: 404, .. }) => return Ok((Vec::new(), None)),
            other => other?,
        };
        let trainings: Vec<HistoryRow> = page.entities.iter().map(from_stored).collect();
        let iterations: Vec<(Uuid, Uuid)> = trainings
            .iter()
            .filter_map(|t| {
                Some((
                    t.partition_key.parse().ok()?,
                    t.properties.text(Prop::IterationId).parse().ok()?,
                ))
            })
            .collect();
        let steps: Vec<Result<Vec<HistoryRow>, StorageError>> = futures::stream::iter(iterations)
            .map(|(p, i)| self.step_rows(p, i))
            .buffer_unordered(8)
            .collect()
            .await;
        let mut rows = trainings;
        for s in steps {
            rows.extend(s?);
        }
        Ok((rows, page.next))
    }

    /// The iteration's export step rows, as stored.
    async fn step_rows(
        &self,
        project: Uuid,
        iteration: Uuid,
    ) -> Result<Vec<HistoryRow>, StorageError> {
        let (from, to) = step_key_range(iteration);
        let filter = format!(
            "{} and {} and {}",
            filter_eq("PartitionKey", &project.to_string()),
            format_args!("RowKey ge '{}'", from.replace('\'', "''")),
            format_args!("RowKey lt '{}'", to.replace('\'', "''")),
        );
        self.query(Some(&filter), 1000).await
    }
}
