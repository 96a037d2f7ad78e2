//! Typed views of stored rows: what the decisions and the reports read back.

use super::{HistoryRow, Prop, RowKind, RowStatus};
use crate::chain::{EntryState, ExportTarget};
use crate::notification::Kind;
use time::OffsetDateTime;

/// An export step row, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    pub row_key: String,
    pub iteration_id: String,
    pub target: ExportTarget,
    /// 1-based position in the chain; 0 for an export outside it.
    pub position: i64,
    /// `None` when the row's status is missing or not a step state.
    pub state: Option<EntryState>,
    pub ended: bool,
    pub reason: String,
    pub release_url: Option<String>,
    pub release_path: Option<String>,
    /// `released`, or why there is no release copy (`refused: …`).
    pub release_status: Option<String>,
}

impl StepRow {
    /// Reads a row as a step row. Rows are read leniently: a property that is missing reads as
    /// empty, so a row that a merge created before its insert still reads.
    pub fn from_row(row: &HistoryRow) -> Self {
        let p = &row.properties;
        let non_empty = |prop| Some(p.text(prop).to_owned()).filter(|s| !s.is_empty());
        Self {
            row_key: row.row_key.clone(),
            iteration_id: p.text(Prop::IterationId).to_owned(),
            target: ExportTarget {
                platform: p.text(Prop::Platform).to_owned(),
                flavor: non_empty(Prop::Flavor),
            },
            position: p.int(Prop::ChainPosition).unwrap_or(0),
            state: match row.status() {
                Some(RowStatus::Step(s)) => Some(s),
                _ => None,
            },
            ended: p.contains(Prop::EndedAt),
            reason: p.text(Prop::Reason).to_owned(),
            release_url: non_empty(Prop::ReleaseUrl),
            release_path: non_empty(Prop::ReleasePath),
            release_status: non_empty(Prop::ReleaseStatus),
        }
    }

    /// The step rows among `rows`.
    pub fn all(rows: &[HistoryRow]) -> Vec<StepRow> {
        rows.iter()
            .filter(|r| r.kind() == Some(RowKind::ExportStep))
            .map(StepRow::from_row)
            .collect()
    }

    /// The row with this key, if any.
    pub fn find<'a>(steps: &'a [StepRow], row_key: &str) -> Option<&'a StepRow> {
        steps.iter().find(|s| s.row_key == row_key)
    }
}

/// A Training row, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingRow {
    pub project_id: String,
    pub project_name: String,
    pub iteration_id: String,
    pub iteration_name: String,
    pub status: String,
    /// When Custom Vision trained it, or when the notification arrived.
    pub trained_at: Option<OffsetDateTime>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub average_precision: Option<f64>,
}

impl TrainingRow {
    /// The row as a Training row, when it is one.
    pub fn from_row(row: &HistoryRow) -> Option<Self> {
        if row.kind() != Some(RowKind::Notification(Kind::Training)) {
            return None;
        }
        let p = &row.properties;
        Some(Self {
            project_id: p.text(Prop::ProjectId).to_owned(),
            project_name: p.text(Prop::ProjectName).to_owned(),
            iteration_id: p.text(Prop::IterationId).to_owned(),
            iteration_name: p.text(Prop::IterationName).to_owned(),
            status: p.text(Prop::Status).to_owned(),
            trained_at: p.time(Prop::TrainedAt).or(p.time(Prop::ReceivedAt)),
            precision: p.double(Prop::Precision),
            recall: p.double(Prop::Recall),
            average_precision: p.double(Prop::AveragePrecision),
        })
    }
}
