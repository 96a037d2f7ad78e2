//! `cvchain channels`: every release channel with the iteration it holds and its metrics, from
//! the manifests in the release container.

use crate::settings::Settings;
use crate::startup::Application;
use cvchain_core::channels::{Channel, Manifest};
use uuid::Uuid;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this project (its id).
    #[arg(long)]
    pub project: Option<Uuid>,
    /// The manifests as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    super::runtime()?.block_on(async move {
        let app = Application::build(settings)?;
        let manifests = app
            .processor
            .lifecycle()
            .channels
            .manifests(args.project)
            .await?;
        if args.json {
            let all: Vec<&Manifest> = manifests.iter().map(|l| &l.manifest).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else if manifests.is_empty() {
            println!("no channels yet");
        } else {
            for l in &manifests {
                print!("{}", render(&l.path, &l.manifest));
            }
        }
        anyhow::Ok(())
    })
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// One project's channels as a table.
pub fn render(path: &str, m: &Manifest) -> String {
    let mut out = format!(
        "{} ({}), {path} revision {}\n",
        m.project_name, m.project_id, m.revision
    );
    if let Some(p) = &m.production_pointer {
        out.push_str(&format!(
            "  production follows {} ({}, since {})\n",
            p.iteration.name,
            p.reason.as_str(),
            p.promoted_at
        ));
    }
    out.push_str(&format!(
        "  {:<11} {:<28} {:<14} {:>9} {:>7} {:>7}  {:<9} {}\n",
        "channel", "target", "iteration", "precision", "recall", "mAP", "reason", "previous"
    ));
    for channel in Channel::ALL {
        let Some(state) = m.channels.get(&channel) else {
            continue;
        };
        for e in state.targets.values() {
            let it = &e.holder.iteration;
            out.push_str(&format!(
                "  {:<11} {:<28} {:<14} {:>9} {:>7} {:>7}  {:<9} {}\n",
                channel.as_str(),
                e.target().to_string(),
                it.name,
                pct(it.precision),
                pct(it.recall),
                pct(it.map),
                e.holder.reason.as_str(),
                e.previous.as_ref().map(|p| p.name.as_str()).unwrap_or("-")
            ));
        }
    }
    out
}
