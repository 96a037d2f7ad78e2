//! The outbox, read and updated: each project's outbox rows live in its partition of the history
//! table (written with the changes they describe, `HistoryStore::record_with`); here they are
//! listed, their per-sink delivery state recorded, and replays reset.

use crate::history::store::HistoryStore;
use crate::storage::{StorageError, table::filter_eq};
use cvchain_core::events::{DeliveryState, OutboxRow, Sink, delivery, outbox_key_range};
use cvchain_core::history::{Prop, Props};

/// A sortable place in a project's order of events: the write's clock (nanoseconds) and the
/// event's index within the write.
pub fn sequence(now: time::OffsetDateTime, index: usize) -> String {
    format!("{:020}-{index:03}", now.unix_timestamp_nanos().max(0))
}

#[derive(Debug, Clone)]
pub struct Outbox {
    history: HistoryStore,
}

impl Outbox {
    pub fn new(history: HistoryStore) -> Self {
        Self { history }
    }

    fn filter(project: Option<&str>, pending_only: bool) -> String {
        let (from, to) = outbox_key_range();
        let mut f = format!("RowKey ge '{from}' and RowKey lt '{to}'");
        if let Some(p) = project {
            f = format!("{} and {f}", filter_eq("PartitionKey", p));
        }
        if pending_only {
            f.push_str(" and Pending eq true");
        }
        f
    }

    /// Outbox rows, in each project's order (of one project, or of all).
    pub async fn list(
        &self,
        project: Option<&str>,
        pending_only: bool,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StorageError> {
        let rows = self
            .history
            .query(Some(&Self::filter(project, pending_only)), limit)
            .await?;
        Ok(OutboxRow::all_in_order(&rows))
    }

    /// The projects that have events some sink has yet to take.
    pub async fn pending_projects(&self) -> Result<Vec<String>, StorageError> {
        let mut projects: Vec<String> = self
            .list(None, true, 100_000)
            .await?
            .into_iter()
            .map(|r| r.partition_key)
            .collect();
        projects.dedup();
        Ok(projects)
    }

    /// Records the row's delivery states, and whether the event is still pending for any sink.
    pub async fn save(&self, row: &OutboxRow) -> Result<(), StorageError> {
        self.save_all(std::slice::from_ref(row)).await
    }

    /// As [`save`](Self::save), for rows of one project in one transaction: the events of one
    /// Event Grid request are recorded together, as they were sent.
    pub async fn save_all(&self, rows: &[OutboxRow]) -> Result<(), StorageError> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let writes: Vec<(String, Props)> = rows
            .iter()
            .map(|row| {
                let mut p = Props::new();
                for (sink, state) in &row.states {
                    p.set(sink.prop(), state.to_json());
                }
                p.set(Prop::Pending, delivery::still_pending(row));
                (row.row_key.clone(), p)
            })
            .collect();
        self.history.merge_all(&first.partition_key, &writes).await
    }

    /// `cvchain events replay`: the event is pending again for `sinks` (its id unchanged), as if
    /// never sent.
    pub async fn reset(&self, row: &OutboxRow, sinks: &[Sink]) -> Result<(), StorageError> {
        let states: Vec<(Sink, DeliveryState)> = sinks
            .iter()
            .map(|s| (*s, DeliveryState::default()))
            .collect();
        self.reset_to(row, &states).await
    }

    /// As [`reset`](Self::reset), each sink starting from the state given (pending, or skipped
    /// for a chat sink that is not told the event: `Routing::initial_states`).
    pub async fn reset_to(
        &self,
        row: &OutboxRow,
        states: &[(Sink, DeliveryState)],
    ) -> Result<(), StorageError> {
        let mut p = Props::new();
        for (s, state) in states {
            p.set(s.prop(), state.to_json());
        }
        let sinks: Vec<Sink> = states.iter().map(|(s, _)| *s).collect();
        p.set(Prop::Sinks, delivery::sinks_text(&sinks));
        p.set(Prop::Pending, states.iter().any(|(_, s)| !s.is_done()));
        self.history
            .merge(&row.partition_key, &row.row_key, &p)
            .await
    }
}
