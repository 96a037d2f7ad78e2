//! The history table: insert-if-absent writes, so a redelivered message leaves its row unchanged.
//! A write can carry outbox rows (the events it emits, `cvchain_core::events`): they go in the
//! same entity-group transaction, so the change and its events exist together or not at all.

use super::claims::Claim;
use super::{from_stored, props_to_entity, to_entity};
use crate::storage::{
    StorageError,
    table::{
        BatchOp, BatchOutcome, Continuation, StoredEntity, TableClient, UpdateMode, WriteOutcome,
        filter_cmp, filter_eq,
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

/// A write an invocation made but did not send yet: it goes in the transaction that records
/// the notification's row, so an export's work costs one request where it shares the
/// project's partition (all of it does). Each keeps what it guaranteed alone: its outbox rows
/// with it, and the claim that guarded it given back in the same transaction.
#[derive(Debug, Clone)]
pub enum TailWrite {
    /// Insert unless present (a step row, a channel move's row), with its outbox rows.
    Insert {
        row: HistoryRow,
        outbox: Vec<HistoryRow>,
        release: Option<Claim>,
    },
    /// Insert-or-merge some properties of a row, with its outbox rows.
    Merge {
        partition_key: String,
        row_key: String,
        properties: Props,
        outbox: Vec<HistoryRow>,
        release: Option<Claim>,
    },
}

impl TailWrite {
    fn partition_key(&self) -> &str {
        match self {
            TailWrite::Insert { row, .. } => &row.partition_key,
            TailWrite::Merge { partition_key, .. } => partition_key,
        }
    }

    /// The claim this write gives back, if any.
    pub fn release(&self) -> Option<&Claim> {
        match self {
            TailWrite::Insert { release, .. } | TailWrite::Merge { release, .. } => {
                release.as_ref()
            }
        }
    }
}

/// What an operation of a tail transaction stands for, to drop what the service refused.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TailPart {
    /// A tail entry's write (an insert refused 409 exists: it and its outbox rows go).
    Write,
    /// Several changes of one row folded into an insert: refused, only writes one after
    /// another can judge it.
    Folded,
    /// An outbox row (refused 409: told already, dropped).
    Outbox,
    /// A claim given back (refused 404/412: no longer ours, left to its holder).
    Release,
    /// The notification's row (refused 409: recorded already).
    Row,
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
                self.found_after_conflict(row).await
            }
        }
    }

    /// Records the notification's `row` with its `outbox` rows and the `tail` of writes the
    /// invocation left for it, in one transaction where they fit (one partition, at most 100
    /// operations). An insert of the tail whose row exists is dropped with its outbox rows, an
    /// outbox row told already is dropped, a claim no longer ours is left to its holder; when
    /// the row itself exists, the tail is written without it and the row found there returned.
    /// Anything else the service refuses falls back to one write after another, in order.
    pub async fn record_with_tail(
        &self,
        row: &HistoryRow,
        outbox: &[HistoryRow],
        tail: &[TailWrite],
    ) -> Result<Recorded, StorageError> {
        if tail.is_empty() {
            return self.record_with(row, outbox, None).await;
        }
        let shared = tail.iter().all(|t| t.partition_key() == row.partition_key)
            && tail
                .iter()
                .filter_map(TailWrite::release)
                .all(|c| c.partition_key == row.partition_key);
        if shared && let Some(mut ops) = tail_ops(tail) {
            ops.push((TailPart::Row, BatchOp::Insert(to_entity(row))));
            for r in outbox {
                if !ops.iter().any(|(_, op)| same_row(op, &r.row_key)) {
                    ops.push((TailPart::Outbox, BatchOp::Insert(to_entity(r))));
                }
            }
            if let Some(recorded) = self.transact_tail(row, ops).await? {
                return Ok(recorded);
            }
        }
        self.flush_tail(tail).await?;
        self.record_with(row, outbox, None).await
    }

    /// The tail transaction, dropping what the service refused and trying again; `None` when it
    /// refused something this cannot judge (the caller writes one by one).
    async fn transact_tail(
        &self,
        row: &HistoryRow,
        mut ops: Vec<(TailPart, BatchOp)>,
    ) -> Result<Option<Recorded>, StorageError> {
        let mut created = false;
        let mut row_exists = false;
        // Each round drops at least one operation: bounded by their number.
        for _ in 0..=ops.len() {
            if ops.len() > 100 {
                return Ok(None);
            }
            let batch: Vec<BatchOp> = ops.iter().map(|(_, op)| op.clone()).collect();
            match self.table.transact(&batch).await? {
                BatchOutcome::Committed => {
                    if !row_exists {
                        return Ok(Some(Recorded::Inserted));
                    }
                    return self.found_after_conflict(row).await.map(Some);
                }
                BatchOutcome::Refused { status: 404, .. } if !created => {
                    self.table.create_if_missing().await?;
                    created = true;
                }
                BatchOutcome::Refused {
                    index: Some(i),
                    status,
                    ..
                } if i < ops.len() => match (ops[i].0, status) {
                    (TailPart::Outbox, 409) | (TailPart::Release, 404 | 412) => {
                        ops.remove(i);
                    }
                    (TailPart::Write, 409) if matches!(ops[i].1, BatchOp::Insert(_)) => {
                        // The row exists: it, its outbox rows and nothing else of it go.
                        ops.remove(i);
                        while i < ops.len() && ops[i].0 == TailPart::Outbox {
                            ops.remove(i);
                        }
                    }
                    (TailPart::Row, 409) => {
                        row_exists = true;
                        ops.truncate(i);
                        if ops.is_empty() {
                            return Ok(None);
                        }
                    }
                    _ => return Ok(None),
                },
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Writes a tail one write after another, as each would have been written alone.
    pub async fn flush_tail(&self, tail: &[TailWrite]) -> Result<(), StorageError> {
        for t in tail {
            match t {
                TailWrite::Insert {
                    row,
                    outbox,
                    release,
                } => {
                    self.record_with(row, outbox, release.as_ref()).await?;
                }
                TailWrite::Merge {
                    partition_key,
                    row_key,
                    properties,
                    outbox,
                    release,
                } => {
                    self.merge_with(partition_key, row_key, properties, outbox, release.as_ref())
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// The row a write of `row` conflicted with, as it is there.
    async fn found_after_conflict(&self, row: &HistoryRow) -> Result<Recorded, StorageError> {
        let existing = self
            .get(&row.partition_key, &row.row_key)
            .await?
            .ok_or_else(|| StorageError::Other {
                service: "table",
                detail: format!("row {} vanished after a conflict", row.describe()),
            })?;
        Ok(Recorded::AlreadyPresent(existing))
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
    /// `release`: a claim (of this row's partition) given back in the same transaction, once
    /// the row is written: who takes the claim next sees the row, for one request less.
    pub async fn record_with(
        &self,
        row: &HistoryRow,
        outbox: &[HistoryRow],
        release: Option<&Claim>,
    ) -> Result<Recorded, StorageError> {
        if outbox.is_empty() && release.is_none() {
            return self.record(row).await;
        }
        let first = BatchOp::Insert(to_entity(row));
        match self.transact_with(first, outbox, release).await? {
            None => Ok(Recorded::Inserted),
            Some(_) => {
                // The row is there (another writer's): the claim that guarded it is given back
                // all the same, or it would stay held until it expires.
                if let Some(c) = release {
                    let _ = self
                        .table
                        .transact(&[BatchOp::Delete {
                            partition_key: c.partition_key.clone(),
                            row_key: c.row_key.clone(),
                            etag: c.etag.clone(),
                        }])
                        .await;
                }
                self.found_after_conflict(row).await
            }
        }
    }

    /// Inserts `row` (a message's own row for an event another message recorded first) and
    /// merges `note` into that first row (`first_row_key`, same partition), in one transaction;
    /// a row already there is left as it is, and the note with it. `outbox`: events the row
    /// carries (the chain's completion, when this message ended it), written with it as
    /// [`record_with`](Self::record_with) does, the note then.
    pub async fn record_apart(
        &self,
        row: &HistoryRow,
        outbox: &[HistoryRow],
        first_row_key: &str,
        note: &Props,
        tail: &[TailWrite],
    ) -> Result<Recorded, StorageError> {
        if !outbox.is_empty() || !tail.is_empty() {
            // The note goes with the tail, before the row: one transaction where they fit.
            let mut tail = tail.to_vec();
            tail.push(TailWrite::Merge {
                partition_key: row.partition_key.clone(),
                row_key: first_row_key.to_owned(),
                properties: note.clone(),
                outbox: Vec::new(),
                release: None,
            });
            return self.record_with_tail(row, outbox, &tail).await;
        }
        let e = keyed(note, &row.partition_key, first_row_key);
        let ops = [BatchOp::Insert(to_entity(row)), BatchOp::Merge(e)];
        match self.table.transact(&ops).await? {
            BatchOutcome::Committed => Ok(Recorded::Inserted),
            // The table is there: the first row is in it. The row exists, or the service did
            // not say which failed: as `record`, which reads it.
            _ => {
                let recorded = self.record(row).await?;
                if recorded == Recorded::Inserted {
                    self.merge(&row.partition_key, first_row_key, note).await?;
                }
                Ok(recorded)
            }
        }
    }

    /// Inserts several rows of one partition, each with its outbox rows, in one transaction
    /// (the rows one change made: a channel move's rows): a row that exists already (a
    /// redelivery completing what a crash left) is left as it is and its outbox rows with it;
    /// an outbox row that exists already is dropped. Rows of several partitions, or more than
    /// a transaction holds, are recorded one by one.
    pub async fn record_groups(
        &self,
        groups: &[(HistoryRow, Vec<HistoryRow>)],
    ) -> Result<(), StorageError> {
        let partition = groups.first().map(|(r, _)| r.partition_key.as_str());
        let size: usize = groups.iter().map(|(_, o)| 1 + o.len()).sum();
        let shared = groups.iter().all(|(r, o)| {
            Some(r.partition_key.as_str()) == partition
                && o.iter()
                    .all(|x| Some(x.partition_key.as_str()) == partition)
        });
        if groups.len() < 2 || !shared || size > 100 {
            return self.record_one_by_one(groups).await;
        }
        // Each op's group, and whether it is the group's own row.
        let mut live: Vec<(usize, bool, &HistoryRow)> = Vec::with_capacity(size);
        for (g, (row, outbox)) in groups.iter().enumerate() {
            live.push((g, true, row));
            live.extend(outbox.iter().map(|o| (g, false, o)));
        }
        let mut created = false;
        while !live.is_empty() {
            let ops: Vec<BatchOp> = live
                .iter()
                .map(|(_, _, r)| BatchOp::Insert(to_entity(r)))
                .collect();
            match self.table.transact(&ops).await? {
                BatchOutcome::Committed => return Ok(()),
                BatchOutcome::Refused { status: 404, .. } if !created => {
                    self.table.create_if_missing().await?;
                    created = true;
                }
                BatchOutcome::Refused {
                    index: Some(i),
                    status: 409,
                    ..
                } if i < live.len() => {
                    let (g, own, _) = live[i];
                    if own {
                        live.retain(|(x, _, _)| *x != g);
                    } else {
                        live.remove(i);
                    }
                }
                // The service did not say which: one by one.
                BatchOutcome::Refused {
                    index: None,
                    status: 409,
                    ..
                } => {
                    return self.record_one_by_one(groups).await;
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
        Ok(())
    }

    async fn record_one_by_one(
        &self,
        groups: &[(HistoryRow, Vec<HistoryRow>)],
    ) -> Result<(), StorageError> {
        for (row, outbox) in groups {
            if outbox.is_empty() {
                self.record_once(row).await?;
            } else {
                self.record_with(row, outbox, None).await?;
            }
        }
        Ok(())
    }

    /// As [`merge`](Self::merge), with outbox rows (and `release`, as in
    /// [`record_with`](Self::record_with)) in the same transaction.
    pub async fn merge_with(
        &self,
        partition_key: &str,
        row_key: &str,
        properties: &Props,
        outbox: &[HistoryRow],
        release: Option<&Claim>,
    ) -> Result<(), StorageError> {
        if outbox.is_empty() && release.is_none() {
            return self.merge(partition_key, row_key, properties).await;
        }
        let e = keyed(properties, partition_key, row_key);
        match self
            .transact_with(BatchOp::Merge(e), outbox, release)
            .await?
        {
            None => Ok(()),
            Some(status) => Err(StorageError::Service {
                service: "table",
                status,
                code: String::new(),
                message: format!("the merge into {partition_key}/{row_key} was refused"),
            }),
        }
    }

    /// `first`, the outbox rows and the claim's release in one transaction. Outbox rows that
    /// exist already are dropped and the rest sent again; a claim that is no longer ours (taken
    /// over: its ETag changed, or gone) is left out and left to its holder; `Some(status)` when
    /// `first` itself was refused (409: the row exists). Creates the table on first use.
    async fn transact_with(
        &self,
        first: BatchOp,
        outbox: &[HistoryRow],
        release: Option<&Claim>,
    ) -> Result<Option<u16>, StorageError> {
        let mut rest: Vec<&HistoryRow> = outbox.iter().collect();
        let partition = match &first {
            BatchOp::Insert(e) | BatchOp::Merge(e) => {
                e["PartitionKey"].as_str().unwrap_or_default().to_owned()
            }
            BatchOp::Delete { partition_key, .. } => partition_key.clone(),
        };
        let mut release = release.filter(|c| c.partition_key == partition);
        let mut created = false;
        loop {
            let mut ops = vec![first.clone()];
            ops.extend(rest.iter().map(|r| BatchOp::Insert(to_entity(r))));
            if let Some(c) = release {
                ops.push(BatchOp::Delete {
                    partition_key: c.partition_key.clone(),
                    row_key: c.row_key.clone(),
                    etag: c.etag.clone(),
                });
            }
            let last = ops.len() - 1;
            match self.table.transact(&ops).await? {
                BatchOutcome::Committed => return Ok(None),
                BatchOutcome::Refused {
                    index,
                    status: 404 | 412,
                    ..
                } if release.is_some() && index.is_none_or(|i| i == last) => {
                    release = None;
                }
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
                        BatchOp::Delete {
                            partition_key,
                            row_key,
                            ..
                        } => (partition_key.clone(), row_key.clone()),
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
        let e = keyed(properties, partition_key, row_key);
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
                let e = keyed(properties, partition_key, row_key);
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

    /// A notification's row and its message's row apart (see `existing_row`), in one range
    /// read when the apart key extends the row's key (it does unless the message key made it
    /// hashed): a second message about one event is told from its redelivery in one round trip.
    /// Rows apart of other messages in the range are passed over.
    pub async fn get_with_apart(
        &self,
        partition_key: &str,
        row_key: &str,
        apart_key: &str,
    ) -> Result<(Option<HistoryRow>, Option<HistoryRow>), StorageError> {
        if !apart_key.starts_with(row_key) {
            let Some(first) = self.get(partition_key, row_key).await? else {
                return Ok((None, None));
            };
            return Ok((Some(first), self.get(partition_key, apart_key).await?));
        }
        let filter = format!(
            "{} and {} and {}",
            filter_eq("PartitionKey", partition_key),
            filter_cmp("RowKey", "ge", row_key),
            filter_cmp("RowKey", "le", apart_key),
        );
        let (mut first, mut apart) = (None, None);
        for row in self.query(Some(&filter), 1000).await? {
            if row.row_key == row_key {
                first = Some(row);
            } else if row.row_key == apart_key {
                apart = Some(row);
            }
        }
        Ok((first, apart))
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
            filter_cmp("RowKey", "ge", &from),
            filter_cmp("RowKey", "lt", &to),
        );
        self.query(Some(&filter), 1000).await
    }
}

/// The tail as one transaction's operations. A transaction may touch a row once: changes of
/// one row are folded into one operation (a merge into the insert or merge before it), and an
/// outbox row or a claim already in it is not added twice. `None` when two inserts (or an
/// insert after a merge) meet on one row, which only writes one after another can judge.
fn tail_ops(tail: &[TailWrite]) -> Option<Vec<(TailPart, BatchOp)>> {
    let mut ops: Vec<(TailPart, BatchOp)> = Vec::new();
    for t in tail {
        let (op, rows) = match t {
            TailWrite::Insert { row, outbox, .. } => (BatchOp::Insert(to_entity(row)), outbox),
            TailWrite::Merge {
                partition_key,
                row_key,
                properties,
                outbox,
                ..
            } => (
                BatchOp::Merge(keyed(properties, partition_key, row_key)),
                outbox,
            ),
        };
        let key = op_row_key(&op).to_owned();
        match ops.iter_mut().find(|(_, o)| same_row(o, &key)) {
            None => ops.push((TailPart::Write, op)),
            Some((part, existing)) => match (existing, op) {
                // Folded: the insert's refusal can no longer drop it alone.
                (BatchOp::Insert(a), BatchOp::Merge(b)) => {
                    a.extend(b);
                    *part = TailPart::Folded;
                }
                (BatchOp::Merge(a), BatchOp::Merge(b)) => a.extend(b),
                _ => return None,
            },
        }
        for r in rows {
            if !ops.iter().any(|(_, o)| same_row(o, &r.row_key)) {
                ops.push((TailPart::Outbox, BatchOp::Insert(to_entity(r))));
            }
        }
        if let Some(c) = t.release()
            && !ops.iter().any(|(_, o)| same_row(o, &c.row_key))
        {
            ops.push((
                TailPart::Release,
                BatchOp::Delete {
                    partition_key: c.partition_key.clone(),
                    row_key: c.row_key.clone(),
                    etag: c.etag.clone(),
                },
            ));
        }
    }
    Some(ops)
}

fn op_row_key(op: &BatchOp) -> &str {
    match op {
        BatchOp::Insert(e) | BatchOp::Merge(e) => e["RowKey"].as_str().unwrap_or_default(),
        BatchOp::Delete { row_key, .. } => row_key,
    }
}

/// Whether `op` touches the row `row_key` (all of a tail shares one partition).
fn same_row(op: &BatchOp, row_key: &str) -> bool {
    op_row_key(op) == row_key
}

/// `props` as the entity of row `row_key` in `partition_key`.
fn keyed(props: &Props, partition_key: &str, row_key: &str) -> crate::storage::table::Entity {
    let mut e = props_to_entity(props);
    e.insert("PartitionKey".into(), partition_key.into());
    e.insert("RowKey".into(), row_key.into());
    e
}
