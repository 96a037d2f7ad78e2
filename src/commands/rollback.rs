//! `cvchain rollback`: moves a channel back to its previous holder, from the manifest; the
//! iteration rolled back from is never promoted there again on its own.

use crate::settings::Settings;
use crate::startup::Application;
use cvchain_core::channels::Channel;
use uuid::Uuid;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The project (its id).
    #[arg(long)]
    pub project: Uuid,
    /// `production` or `latest`.
    #[arg(long, default_value = "production", value_parser = super::parse_channel)]
    pub channel: Channel,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    super::runtime()?.block_on(async move {
        let app = Application::build(settings)?;
        let done = crate::moves::rollback(&app.processor, args.project, args.channel).await?;
        super::print_manual(&done);
        super::deliver_events(&app, args.project).await;
        super::fail_on_failed(&done)
    })
}
