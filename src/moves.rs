//! Moves by hand: `cvchain promote`, `cvchain rollback` and the console's forms all come here,
//! so a move from the page is looked up, checked and carried out exactly as one from the command
//! line (the checks themselves are the lifecycle's: the release against the history, the
//! manifest as evidence).

use crate::error::ProcessError;
use crate::lifecycle::Manual;
use crate::process::Processor;
use cvchain_core::channels::{Channel, IterationRef, iteration_ref};
use cvchain_core::history::{TrainingRow, table_datetime};
use time::OffsetDateTime;
use uuid::Uuid;

/// Why a move by hand did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoveError {
    /// Nothing was moved, for a reason someone must look at (no such iteration, nothing to roll
    /// back to, a manifest that does not match the history…).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Failed(#[from] ProcessError),
}

/// The project's name: from Custom Vision when it is configured, else from its Training rows.
pub async fn project_name(processor: &Processor, project: Uuid) -> Result<String, MoveError> {
    if let Some(cv) = &processor.lifecycle().cv {
        return Ok(cv
            .get_project(project)
            .await
            .map_err(ProcessError::from)?
            .name);
    }
    let rows = processor
        .history()
        .recent(Some(&project.to_string()), 5000)
        .await
        .map_err(ProcessError::from)?;
    rows.iter()
        .filter_map(TrainingRow::from_row)
        .map(|t| t.project_name)
        .find(|n| !n.is_empty())
        .ok_or_else(|| {
            MoveError::Refused(format!(
                "project {project} has no Training row with its name, and CUSTOM_VISION_ENDPOINT is not set"
            ))
        })
}

/// The iteration's name, training time and metrics: from Custom Vision when it is configured,
/// else from its Training row.
pub async fn iteration(
    processor: &Processor,
    project: Uuid,
    id: Uuid,
) -> Result<IterationRef, MoveError> {
    if let Some(cv) = &processor.lifecycle().cv {
        let it = cv
            .get_iteration(project, id)
            .await
            .map_err(|e| match e.is_not_found() {
                true => MoveError::Refused(format!(
                    "Custom Vision does not know iteration {id} in project {project}"
                )),
                false => MoveError::Failed(e.into()),
            })?;
        let perf = cv.get_iteration_performance(project, id).await.ok();
        return Ok(iteration_ref(&it, perf.as_ref()));
    }
    let rows = processor
        .history()
        .recent(Some(&project.to_string()), 5000)
        .await
        .map_err(ProcessError::from)?;
    let t = rows
        .iter()
        .filter_map(TrainingRow::from_row)
        .find(|t| t.iteration_id == id.to_string())
        .ok_or_else(|| {
            MoveError::Refused(format!(
                "no Training row for iteration {id} in project {project}"
            ))
        })?;
    Ok(IterationRef {
        id,
        name: t.iteration_name,
        trained_at: t.trained_at.map(table_datetime),
        precision: t.precision,
        recall: t.recall,
        map: t.average_precision,
    })
}

/// `channel` moves to `iteration` for every target it has a release copy of, bypassing the gate.
pub async fn promote(
    processor: &Processor,
    project: Uuid,
    iteration_id: Uuid,
    channel: Channel,
    reason: Option<&str>,
) -> Result<Manual, MoveError> {
    let name = project_name(processor, project).await?;
    let iteration = iteration(processor, project, iteration_id).await?;
    processor
        .lifecycle()
        .promote_by_hand(
            project,
            &name,
            channel,
            &iteration,
            reason,
            OffsetDateTime::now_utc(),
        )
        .await?
        .map_err(|why| MoveError::Refused(format!("nothing promoted: {why}")))
}

/// `channel` goes back to its previous holder.
pub async fn rollback(
    processor: &Processor,
    project: Uuid,
    channel: Channel,
) -> Result<Manual, MoveError> {
    let name = project_name(processor, project).await?;
    processor
        .lifecycle()
        .rollback(project, &name, channel, OffsetDateTime::now_utc())
        .await?
        .map_err(|why| MoveError::Refused(format!("nothing rolled back: {why}")))
}

/// What a move by hand did, a line each: the pointer, each target, publishing, and every move
/// that could not be carried out (taken back out of the manifest and recorded).
pub fn describe(done: &Manual) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = &done.change.pointer {
        out.push(format!(
            "production pointer: {} → {} ({})",
            p.from.as_ref().map(|f| f.name.as_str()).unwrap_or("-"),
            p.to.name,
            p.reason.as_str()
        ));
    }
    for m in &done.change.moves {
        out.push(format!(
            "{} {}: {} → {} ({}) at {}",
            m.channel.as_str(),
            m.target,
            m.from.as_ref().map(|f| f.name.as_str()).unwrap_or("-"),
            m.to.iteration.name,
            m.to.reason.as_str(),
            m.to.channel_path
        ));
    }
    if let Some(p) = &done.publish {
        out.push(format!("publish: {p}"));
    }
    for f in &done.failed {
        out.push(f.describe());
    }
    out
}

/// Whether the move did nothing at all (the channel already held the iteration, or it has no
/// release copy yet).
pub fn is_noop(done: &Manual) -> bool {
    done.change.moves.is_empty() && done.change.pointer.is_none() && done.failed.is_empty()
}
