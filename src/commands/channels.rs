//! `cvchain channels`: every release channel with the iteration it holds and its metrics, from
//! the manifests in the release container, and the moves that could not happen, from the
//! history. A manifest that cannot be used is named with why, and the command fails.

use crate::settings::Settings;
use crate::startup::Application;
use cvchain_core::channels::{Channel, FailedMoveRow, Manifest};
use cvchain_core::history::{HistoryRow, RowKind};
use std::collections::BTreeMap;
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
        let listed = app
            .processor
            .lifecycle()
            .channels
            .manifests(args.project)
            .await?;
        let failed = failed_moves(&app, args.project).await?;
        // A manifest that cannot be used is named, never read as channels.
        let mut refused = Vec::new();
        let mut usable = Vec::new();
        for l in &listed {
            match &l.manifest {
                Ok(loaded) => usable.push(loaded),
                Err(e) => refused.push(format!("{}: refused: {e}", l.path)),
            }
        }
        if args.json {
            let all: Vec<&Manifest> = usable.iter().map(|l| &l.manifest).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            if listed.is_empty() && failed.is_empty() {
                println!("no channels yet");
            }
            for l in &usable {
                print!("{}", render(&l.path, &l.manifest));
                print!("{}", render_failed(failed.get(&l.manifest.project_id)));
            }
            for (project, moves) in &failed {
                if !usable.iter().any(|l| l.manifest.project_id == *project) {
                    println!("project {project}:");
                    print!("{}", render_failed(Some(moves)));
                }
            }
        }
        for r in &refused {
            eprintln!("{r}");
        }
        if !refused.is_empty() {
            anyhow::bail!(
                "{} manifest(s) cannot be used (see above); cvchain leaves them alone",
                refused.len()
            );
        }
        anyhow::Ok(())
    })
}

/// The failed moves no later move made moot, by project.
async fn failed_moves(
    app: &Application,
    project: Option<Uuid>,
) -> anyhow::Result<BTreeMap<Uuid, Vec<FailedMoveRow>>> {
    use cvchain_azure::storage::table::filter_eq;
    let mut filter = format!(
        "({} or {})",
        filter_eq("EventType", RowKind::ChannelMoveFailed.as_str()),
        filter_eq("EventType", RowKind::ChannelMove.as_str())
    );
    if let Some(p) = project {
        filter = format!("{} and {filter}", filter_eq("PartitionKey", &p.to_string()));
    }
    let rows = app.history().query(Some(&filter), 100_000).await?;
    let mut by_project: BTreeMap<Uuid, Vec<HistoryRow>> = BTreeMap::new();
    for r in rows {
        if let Ok(p) = Uuid::parse_str(&r.partition_key) {
            by_project.entry(p).or_default().push(r);
        }
    }
    Ok(by_project
        .into_iter()
        .map(|(p, rows)| (p, FailedMoveRow::open(&rows)))
        .filter(|(_, f)| !f.is_empty())
        .collect())
}

/// The failed moves of one project, one line each.
pub fn render_failed(moves: Option<&Vec<FailedMoveRow>>) -> String {
    let Some(moves) = moves.filter(|m| !m.is_empty()) else {
        return String::new();
    };
    let mut out =
        String::from("  failed moves (not carried out; the channel stayed where it was):\n");
    for m in moves {
        out.push_str(&format!("    {}\n", m.describe()));
    }
    out
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
