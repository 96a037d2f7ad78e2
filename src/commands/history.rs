//! `cvchain history`: the trained iterations, newest first, with precision, recall, mAP, each
//! export's status and release path; or the raw rows.

use crate::settings::Settings;
use cvchain_azure::history::store::HistoryStore;
use cvchain_azure::storage::{clients::StorageClients, table::filter_eq};
use cvchain_core::report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this project's rows (its id).
    #[arg(long)]
    pub project: Option<String>,
    /// JSON instead of a table (with --rows: one object per line).
    #[arg(long)]
    pub json: bool,
    /// The raw history rows instead of the iterations.
    #[arg(long)]
    pub rows: bool,
    /// How many rows to read at most.
    #[arg(long, default_value_t = 5000)]
    pub limit: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    super::runtime()?.block_on(async move {
        let clients = StorageClients::new(&settings.storage)?;
        let store = HistoryStore::new(clients.table(&settings.history_table)?);
        let project = args.project.as_deref();
        if args.rows && args.json {
            // The entities as stored, newest first.
            let filter = project.map(|p| filter_eq("PartitionKey", p));
            let mut entities = store.entities(filter.as_deref(), args.limit).await?;
            entities.sort_by_key(|e| {
                std::cmp::Reverse(
                    e.entity
                        .get("ReceivedAt")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                )
            });
            for e in &entities {
                println!("{}", serde_json::to_string(&e.entity)?);
            }
            return Ok(());
        }
        let rows = store.recent(project, args.limit).await?;
        match (args.rows, args.json) {
            (true, _) => print!("{}", report::render_rows(&rows)),
            (false, true) => println!(
                "{}",
                serde_json::to_string_pretty(&report::iterations(&rows))?
            ),
            (false, false) => print!("{}", report::render(&report::iterations(&rows))),
        }
        anyhow::Ok(())
    })
}
