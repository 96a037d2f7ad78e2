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
    pub release_size: Option<i64>,
    /// `released`, or why there is no release copy (`refused: …`).
    pub release_status: Option<String>,
    /// The row itself, so a write to it can be applied to this view too.
    pub row: HistoryRow,
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
            release_size: p.int(Prop::ReleaseSize),
            release_status: non_empty(Prop::ReleaseStatus),
            row: row.clone(),
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
    /// The gate's verdict (`passed`, `failed`), when one was recorded.
    pub gate_verdict: Option<String>,
    pub gate_reasons: String,
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
            gate_verdict: Some(p.text(Prop::GateVerdict).to_owned()).filter(|v| !v.is_empty()),
            gate_reasons: p.text(Prop::GateReasons).to_owned(),
        })
    }

    /// What Custom Vision reported about the iteration when its training completed, as the row
    /// recorded it: enough for the notifications that follow (names, state, exportability,
    /// metrics) without asking again. `None` when the row lacks any of it.
    pub fn facts(row: &HistoryRow) -> Option<TrainingFacts> {
        use crate::customvision::{Iteration, IterationPerformance, Project};
        let t = Self::from_row(row)?;
        let p = &row.properties;
        let status = p.text(Prop::IterationStatus);
        if status.is_empty() || t.project_name.is_empty() || t.iteration_name.is_empty() {
            return None;
        }
        let exportable = p.flag(Prop::Exportable)?;
        let id = uuid::Uuid::parse_str(&t.iteration_id).ok()?;
        let project_id = uuid::Uuid::parse_str(&t.project_id).ok()?;
        Some(TrainingFacts {
            project: Project {
                id: project_id,
                name: t.project_name.clone(),
                ..Default::default()
            },
            iteration: Iteration {
                id,
                project_id,
                name: t.iteration_name.clone(),
                status: status.to_owned(),
                trained_at: p.time(Prop::TrainedAt).and_then(|at| {
                    at.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                }),
                exportable,
                exportable_to: p
                    .text(Prop::ExportableTo)
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                domain_id: uuid::Uuid::parse_str(p.text(Prop::DomainId)).ok(),
                training_type: Some(p.text(Prop::TrainingType).to_owned())
                    .filter(|s| !s.is_empty()),
                training_time_in_minutes: p.int(Prop::TrainingTimeInMinutes).map(|m| m as i32),
                ..Default::default()
            },
            performance: (t.precision.is_some()
                || t.recall.is_some()
                || t.average_precision.is_some())
            .then(|| IterationPerformance {
                precision: t.precision,
                recall: t.recall,
                average_precision: t.average_precision,
                ..Default::default()
            }),
        })
    }

    /// Whether the gate passed this iteration (`None` when no verdict was recorded).
    pub fn passed_gate(&self) -> Option<bool> {
        self.gate_verdict.as_deref().map(|v| v == "passed")
    }
}

/// What a Training row says about its project and iteration (see [`TrainingRow::facts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingFacts {
    pub project: crate::customvision::Project,
    pub iteration: crate::customvision::Iteration,
    pub performance: Option<crate::customvision::IterationPerformance>,
}

/// A channel move, read back: which iteration holds which channel for which target, as of which
/// manifest revision.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMoveRow {
    pub channel: String,
    /// Empty for a move of the production pointer.
    pub platform: String,
    pub flavor: String,
    pub iteration_id: String,
    pub iteration_name: String,
    pub revision: i64,
    pub reason: String,
}

impl ChannelMoveRow {
    pub fn from_row(row: &HistoryRow) -> Option<Self> {
        if row.kind() != Some(RowKind::ChannelMove) {
            return None;
        }
        let p = &row.properties;
        Some(Self {
            channel: p.text(Prop::Channel).to_owned(),
            platform: p.text(Prop::Platform).to_owned(),
            flavor: p.text(Prop::Flavor).to_owned(),
            iteration_id: p.text(Prop::IterationId).to_owned(),
            iteration_name: p.text(Prop::IterationName).to_owned(),
            revision: p.int(Prop::Revision).unwrap_or(0),
            reason: p.text(Prop::Reason).to_owned(),
        })
    }

    /// Who holds each (channel, target) according to the moves among `rows`: the move with the
    /// highest revision wins. Pointer moves (no platform) are left out.
    pub fn holders(rows: &[HistoryRow]) -> Vec<ChannelMoveRow> {
        let mut latest: std::collections::BTreeMap<(String, String, String), ChannelMoveRow> =
            std::collections::BTreeMap::new();
        for m in rows.iter().filter_map(Self::from_row) {
            if m.platform.is_empty() {
                continue;
            }
            let key = (m.channel.clone(), m.platform.clone(), m.flavor.clone());
            if latest.get(&key).is_none_or(|cur| cur.revision < m.revision) {
                latest.insert(key, m);
            }
        }
        latest.into_values().collect()
    }
}
