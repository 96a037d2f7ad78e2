//! What a move is checked against before it happens, and what is left when it cannot happen.
//!
//! A manifest says which release copy a channel should hold; cvchain's history says which
//! release copies it made. Before a channel moves (automatically, by `promote` or by
//! `rollback`) the release it moves to must be one the history records for this project,
//! iteration and target, at the very path the manifest names, and the release copy's own
//! metadata must name the same project and iteration. A move that cannot happen is a history
//! row of its own (`ChannelMoveFailed`), told as `io.cvchain.channel.move_failed`.

use super::{Channel, IterationRef};
use crate::chain::ExportTarget;
use crate::history::{HistoryRow, Prop, Props, RowKind, StepRow, TrainingRow, safe_key};
use crate::release::{META_ITERATION_ID, META_PROJECT_ID};
use std::collections::HashMap;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

/// Why a move was refused: what the manifest claims and what cvchain recorded disagree.
/// Permanent: retrying cannot change the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "cvchain recorded no release of {target} for iteration {iteration} in project {project}"
    )]
    NotReleased {
        project: Uuid,
        iteration: Uuid,
        target: String,
    },
    #[error(
        "the release of {target} for iteration {iteration} is {recorded}, not {claimed} as the manifest says"
    )]
    OtherPath {
        iteration: Uuid,
        target: String,
        recorded: String,
        claimed: String,
    },
    #[error("the release copy {path} is gone")]
    CopyGone { path: String },
    #[error(
        "the release copy {path} names project {names_project} and iteration {names_iteration}, not project {project}'s iteration {iteration}"
    )]
    CopyOfAnother {
        path: String,
        project: Uuid,
        iteration: Uuid,
        names_project: String,
        names_iteration: String,
    },
    #[error("cvchain recorded no training of iteration {iteration} in project {project}")]
    NotTrained { project: Uuid, iteration: Uuid },
}

/// Checks a release a channel is to move to: `steps` are the iteration's step rows as the
/// history holds them in the project's partition, `copy` the release copy's metadata (`None`
/// when it is gone).
pub fn verify_release(
    project: Uuid,
    iteration: Uuid,
    target: &ExportTarget,
    release_path: &str,
    steps: &[StepRow],
    copy: Option<&HashMap<String, String>>,
) -> Result<(), Mismatch> {
    let recorded = steps
        .iter()
        .filter(|s| s.iteration_id == iteration.to_string() && s.target.key() == target.key())
        .find_map(|s| s.release_path.clone())
        .ok_or_else(|| Mismatch::NotReleased {
            project,
            iteration,
            target: target.to_string(),
        })?;
    if recorded != release_path {
        return Err(Mismatch::OtherPath {
            iteration,
            target: target.to_string(),
            recorded,
            claimed: release_path.to_owned(),
        });
    }
    let meta = copy.ok_or_else(|| Mismatch::CopyGone {
        path: release_path.to_owned(),
    })?;
    let get = |k: &str| {
        meta.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (p, i) = (get(META_PROJECT_ID), get(META_ITERATION_ID));
    if p != project.to_string() || i != iteration.to_string() {
        return Err(Mismatch::CopyOfAnother {
            path: release_path.to_owned(),
            project,
            iteration,
            names_project: if p.is_empty() { "none".into() } else { p },
            names_iteration: if i.is_empty() { "none".into() } else { i },
        });
    }
    Ok(())
}

/// The iteration as cvchain recorded it when its training completed: what a move announces,
/// rather than what a manifest says about it.
pub fn recorded_iteration(row: &TrainingRow) -> Option<IterationRef> {
    Some(IterationRef {
        id: Uuid::parse_str(&row.iteration_id).ok()?,
        name: row.iteration_name.clone(),
        trained_at: row.trained_at.and_then(|t| t.format(&Rfc3339).ok()),
        precision: row.precision,
        recall: row.recall,
        map: row.average_precision,
    })
}

/// A move that could not happen.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedMove {
    /// `None`: the manifest itself could not be used, so no channel could move.
    pub channel: Option<Channel>,
    /// `None`: the production pointer.
    pub target: Option<ExportTarget>,
    pub iteration: IterationRef,
    pub release_path: Option<String>,
    pub channel_path: Option<String>,
    pub reason: String,
    /// A storage failure that outlasted the message's deliveries (a later move may succeed),
    /// rather than something someone must fix.
    pub transient: bool,
}

impl FailedMove {
    /// One line: which move, and why not.
    pub fn describe(&self) -> String {
        let channel = self.channel.map(|c| c.as_str()).unwrap_or("channels");
        let target = match &self.target {
            Some(t) => t.to_string(),
            None => "pointer".into(),
        };
        format!(
            "{channel} {target} → {} failed: {}",
            self.iteration.name, self.reason
        )
    }
}

/// The row of a failed move: one per channel, target and iteration (a redelivery that fails
/// the same way changes nothing).
pub fn failed_move_row(project: Uuid, f: &FailedMove, at: OffsetDateTime) -> HistoryRow {
    let mut p = Props::new();
    p.set(Prop::EventType, RowKind::ChannelMoveFailed.as_str());
    p.set(Prop::ProjectId, project.to_string());
    p.set(Prop::IterationId, f.iteration.id.to_string());
    p.set(Prop::IterationName, &f.iteration.name);
    p.set(Prop::Channel, f.channel.map(|c| c.as_str()).unwrap_or(""));
    if let Some(t) = &f.target {
        p.set(Prop::Platform, &t.platform);
        p.set(Prop::Flavor, t.flavor.clone().unwrap_or_default());
    }
    for (prop, v) in [
        (Prop::Precision, f.iteration.precision),
        (Prop::Recall, f.iteration.recall),
        (Prop::AveragePrecision, f.iteration.map),
    ] {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            p.set(prop, v);
        }
    }
    if let Some(r) = &f.release_path {
        p.set(Prop::ReleasePath, r);
    }
    if let Some(c) = &f.channel_path {
        p.set(Prop::ChannelPath, c);
    }
    p.set(
        Prop::Reason,
        crate::message::bounded(&crate::redact::redact(&f.reason), 1024).0,
    );
    p.set(Prop::Transient, f.transient);
    p.set(Prop::EndedAt, at);
    let target = f
        .target
        .as_ref()
        .map(|t| t.key())
        .unwrap_or_else(|| "pointer".into());
    HistoryRow {
        partition_key: project.to_string(),
        row_key: safe_key(format!(
            "ChannelMoveFailed_{}_{target}_{}",
            f.channel.map(|c| c.as_str()).unwrap_or("any"),
            f.iteration.id
        )),
        properties: p,
    }
}

/// A failed move, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedMoveRow {
    /// Empty: every channel (the manifest could not be used).
    pub channel: String,
    /// Empty: the production pointer.
    pub platform: String,
    pub flavor: String,
    pub iteration_id: String,
    pub iteration_name: String,
    pub reason: String,
    pub transient: bool,
    pub at: Option<OffsetDateTime>,
}

impl FailedMoveRow {
    pub fn from_row(row: &HistoryRow) -> Option<Self> {
        if row.kind() != Some(RowKind::ChannelMoveFailed) {
            return None;
        }
        let p = &row.properties;
        Some(Self {
            channel: p.text(Prop::Channel).to_owned(),
            platform: p.text(Prop::Platform).to_owned(),
            flavor: p.text(Prop::Flavor).to_owned(),
            iteration_id: p.text(Prop::IterationId).to_owned(),
            iteration_name: p.text(Prop::IterationName).to_owned(),
            reason: p.text(Prop::Reason).to_owned(),
            transient: p.flag(Prop::Transient).unwrap_or(false),
            at: p.time(Prop::EndedAt),
        })
    }

    /// The failed moves among `rows` that no later move of the same channel and target has
    /// made moot, oldest first.
    pub fn open(rows: &[HistoryRow]) -> Vec<FailedMoveRow> {
        let moves: Vec<(&str, &str, &str, Option<OffsetDateTime>)> = rows
            .iter()
            .filter(|r| r.kind() == Some(RowKind::ChannelMove))
            .map(|r| {
                let p = &r.properties;
                (
                    p.text(Prop::Channel),
                    p.text(Prop::Platform),
                    p.text(Prop::Flavor),
                    p.time(Prop::PromotedAt),
                )
            })
            .collect();
        let mut out: Vec<FailedMoveRow> = rows
            .iter()
            .filter_map(Self::from_row)
            .filter(|f| {
                !moves.iter().any(|(c, pl, fl, at)| {
                    (f.channel.is_empty() || f.channel == *c)
                        && f.platform == *pl
                        && f.flavor == *fl
                        && matches!((at, f.at), (Some(a), Some(b)) if *a >= b)
                })
            })
            .collect();
        out.sort_by_key(|f| f.at);
        out
    }

    /// One line for `cvchain channels`.
    pub fn describe(&self) -> String {
        let channel = if self.channel.is_empty() {
            "channels"
        } else {
            &self.channel
        };
        let target = match (self.platform.as_str(), self.flavor.as_str()) {
            ("", _) => "pointer".to_owned(),
            (p, "") => p.to_owned(),
            (p, f) => format!("{p}:{f}"),
        };
        let at = self
            .at
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        format!(
            "{channel} {target} → {} failed at {at}{}: {}",
            self.iteration_name,
            if self.transient {
                " (storage kept failing)"
            } else {
                ""
            },
            self.reason
        )
    }
}
