//! The history table: insert-if-absent writes, so a redelivered message leaves its row unchanged.
//! A write can carry outbox rows (the events it emits, `cvchain_core::events`): they go in the
//! same entity-group transaction, so the change and its events exist together or not at all.

use super::{from_stored, props_to_entity, to_entity};
use crate::storage::{
    StorageError,
    table::{
        BatchOp, BatchOutcome, Continuation, StoredEntity, TableClient, UpdateMode, WriteOutcome,
        filter_eq,
    },
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

    /// As [`record`](Self::record), with the outbox rows of the events the row emits, in one
    /// transaction: a redelivery finds the row there and writes nothing, and an outbox row that
    /// exists already (the same event, written by another change or instance) is left as it is.
    pub async fn record_with(
        &self,
        row: &HistoryRow,
        outbox: &[HistoryRow],
    ) -> Result<Recorded, StorageError> {
        if outbox.is_empty() {
            return self.record(row).await;
        }
        let first = BatchOp::Insert(to_entity(row));
        match self.transact_with(first, outbox).await? {
            None => Ok(Recorded::Inserted),
            Some(_) => {
                let existing = self
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

    /// As [`merge`](Self::merge), with outbox rows in the same transaction.
    pub async fn merge_with(
        &self,
        partition_key: &str,
        row_key: &str,
        properties: &Props,
        outbox: &[HistoryRow],
    ) -> Result<(), StorageError> {
        if outbox.is_empty() {
            return self.merge(partition_key, row_key, properties).await;
        }
        let mut e = props_to_entity(properties);
        e.insert("PartitionKey".into(), partition_key.into());
        e.insert("RowKey".into(), row_key.into());
        match self.transact_with(BatchOp::Merge(e), outbox).await? {
            None => Ok(()),
            Some(status) => Err(StorageError::Service {
                service: "table",
                status,
                code: String::new(),
                message: format!("the merge into {partition_key}/{row_key} was refused"),
            }),
        }
    }

    /// `first` and the outbox rows in one transaction. Outbox rows that exist already are
    /// dropped and the rest sent again; `Some(status)` when `first` itself was refused (409: the
    /// row exists). Creates the table on first use.
    async fn transact_with(
        &self,
        first: BatchOp,
        outbox: &[HistoryRow],
    ) -> Result<Option<u16>, StorageError> {
        let mut rest: Vec<&HistoryRow> = outbox.iter().collect();
        let mut created = false;
        loop {
            let mut ops = vec![first.clone()];
            ops.extend(rest.iter().map(|r| BatchOp::Insert(to_entity(r))));
            match self.table.transact(&ops).await? {
                BatchOutcome::Committed => return Ok(None),
                BatchOutcome::Refused { status: 404, .. } if !created => {
                    self.table.create_if_missing().await?;
                    created = true;
                }
                BatchOutcome::Refused {
                    index: Some(0),
                    status,
                    ..
                } => return Ok(Some(status)),
                BatchOutcome::Refused {
                    index: Some(i),
                    status: 409,
                    ..
                } if i <= rest.len() => {
                    rest.remove(i - 1);
                }
                BatchOutcome::Refused {
                    index: None,
                    status: 409,
                    ..
                } => {
                    // The service did not say which: find out by reading.
                    let (pk, rk) = match &first {
                        BatchOp::Insert(e) | BatchOp::Merge(e) => (
                            e["PartitionKey"].as_str().unwrap_or_default().to_owned(),
                            e["RowKey"].as_str().unwrap_or_default().to_owned(),
                        ),
                    };
                    if matches!(first, BatchOp::Insert(_))
                        && self.table.get(&pk, &rk).await?.is_some()
                    {
                        return Ok(Some(409));
                    }
                    let before = rest.len();
                    let mut kept = Vec::new();
                    for r in rest {
                        if self
                            .table
                            .get(&r.partition_key, &r.row_key)
                            .await?
                            .is_none()
                        {
                            kept.push(r);
                        }
                    }
                    rest = kept;
                    if rest.len() == before {
                        return Err(StorageError::Other {
                            service: "table",
                            detail: "a transaction conflicted on no row that exists".into(),
                        });
                    }
                }
                BatchOutcome::Refused { status, code, .. } => {
                    return Err(StorageError::from_status(
                        "table",
                        status,
                        if code.is_empty() {
                            code
                        } else {
                            format!(" {code}")
                        },
                        "the transaction was refused".into(),
                    ));
                }
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

    /// Adds or overwrites properties of several rows of one partition: together, in one
    /// transaction per hundred rows (all or nothing), so rows that changed together are
    /// recorded together.
    pub async fn merge_all(
        &self,
        partition_key: &str,
        rows: &[(String, Props)],
    ) -> Result<(), StorageError> {
        if let [(row_key, properties)] = rows {
            return self.merge(partition_key, row_key, properties).await;
        }
        let ops: Vec<BatchOp> = rows
            .iter()
            .map(|(row_key, properties)| {
                let mut e = props_to_entity(properties);
                e.insert("PartitionKey".into(), partition_key.into());
                e.insert("RowKey".into(), row_key.clone().into());
                BatchOp::Merge(e)
            })
            .collect();
        for chunk in ops.chunks(100) {
            if let BatchOutcome::Refused { status, code, .. } = self.table.transact(chunk).await? {
                return Err(StorageError::from_status(
                    "table",
                    status,
                    if code.is_empty() {
                        code
                    } else {
                        format!(" {code}")
                    },
                    format!("the merge into {} rows was refused", chunk.len()),
                ));
            }
        }
        Ok(())
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

    /// The project's channel moves and failed moves (`ChannelMove_…`, `ChannelMoveFailed_…`):
    /// one range of its partition.
    pub async fn channel_rows(&self, project: Uuid) -> Result<Vec<HistoryRow>, StorageError> {
        let filter = format!(
            "{} and RowKey ge 'ChannelMove' and RowKey lt 'ChannelMovf'",
            filter_eq("PartitionKey", &project.to_string()),
        );
        self.query(Some(&filter), 10_000).await
    }

    /// The project's messages given up after their last delivery (its rows in `_failed`).
    pub async fn failed_rows(&self, project: Uuid) -> Result<Vec<HistoryRow>, StorageError> {
        let filter = format!(
            "{} and {}",
            filter_eq("PartitionKey", cvchain_core::history::FAILED_PARTITION),
            filter_eq("ProjectId", &project.to_string()),
        );
        self.query(Some(&filter), 1000).await
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
