//! `cvchain promote`: moves a channel to an iteration by hand, bypassing the gate (the history
//! row says so); for `production` the pointer moves and publishing follows.

use crate::settings::Settings;
use crate::startup::Application;
use anyhow::Context;
use cvchain_core::channels::{Channel, IterationRef, iteration_ref};
use cvchain_core::history::{TrainingRow, table_datetime};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The project (its id).
    #[arg(long)]
    pub project: Uuid,
    /// The iteration (its id).
    #[arg(long)]
    pub iteration: Uuid,
    /// `production` or `latest`.
    #[arg(long, default_value = "production", value_parser = super::parse_channel)]
    pub channel: Channel,
    /// Why, for the history.
    #[arg(long)]
    pub reason: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    super::runtime()?.block_on(async move {
        let app = Application::build(settings)?;
        let name = super::project_name(&app, args.project).await?;
        let iteration = iteration(&app, args.project, args.iteration).await?;
        let done = app
            .processor
            .lifecycle()
            .promote_by_hand(
                args.project,
                &name,
                args.channel,
                &iteration,
                args.reason.as_deref(),
                OffsetDateTime::now_utc(),
            )
            .await?
            .map_err(|why| anyhow::anyhow!("nothing promoted: {why}"))?;
        super::print_manual(&done);
        super::deliver_events(&app, args.project).await;
        if done.change.moves.is_empty() && done.change.pointer.is_none() && done.failed.is_empty() {
            println!(
                "{} already holds {} (or it has no release copy yet)",
                args.channel.as_str(),
                iteration.name
            );
        }
        super::fail_on_failed(&done)?;
        anyhow::Ok(())
    })
}

/// The iteration's name, training time and metrics: from Custom Vision when it is configured,
/// else from its Training row.
async fn iteration(app: &Application, project: Uuid, id: Uuid) -> anyhow::Result<IterationRef> {
    if let Some(cv) = app.training_api() {
        let it = cv.get_iteration(project, id).await?;
        let perf = cv.get_iteration_performance(project, id).await.ok();
        return Ok(iteration_ref(&it, perf.as_ref()));
    }
    let rows = app
        .history()
        .recent(Some(&project.to_string()), 5000)
        .await?;
    let t = rows
        .iter()
        .filter_map(TrainingRow::from_row)
        .find(|t| t.iteration_id == id.to_string())
        .with_context(|| format!("no Training row for iteration {id} in project {project}"))?;
    Ok(IterationRef {
        id,
        name: t.iteration_name,
        trained_at: t.trained_at.map(table_datetime),
        precision: t.precision,
        recall: t.recall,
        map: t.average_precision,
    })
}
