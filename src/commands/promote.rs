//! `cvchain promote`: moves a channel to an iteration by hand, bypassing the gate (the history
//! row says so); for `production` the pointer moves and publishing follows.

use crate::settings::Settings;
use crate::startup::Application;
use cvchain_core::channels::Channel;
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
        let done = crate::moves::promote(
            &app.processor,
            args.project,
            args.iteration,
            args.channel,
            args.reason.as_deref(),
        )
        .await?;
        super::print_manual(&done);
        super::deliver_events(&app, args.project).await;
        if crate::moves::is_noop(&done) {
            println!(
                "{} already holds iteration {} (or it has no release copy yet)",
                args.channel.as_str(),
                args.iteration
            );
        }
        super::fail_on_failed(&done)?;
        anyhow::Ok(())
    })
}
