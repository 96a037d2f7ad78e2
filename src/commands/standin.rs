//! `cvchain standin`: the local Custom Vision alone, for your own training scripts. Prints the
//! endpoint and key to give Microsoft's SDKs (only those two differ from Azure), and writes
//! notifications and model backups to the storage account given with `--storage` (or
//! `CVCHAIN_STORAGE`), where the queue and container a project names must already exist.

use anyhow::Context;
use cvchain_azure::storage::{
    clients::StorageClients,
    settings::{STORAGE_SETTING, StorageSettings, parse_connection_string},
};
use cvchain_standin::{Standin, StandinConfig};
use std::time::Duration;

/// The key `cvchain standin` accepts unless `--key` says otherwise.
pub const DEFAULT_KEY: &str = "cvchain-standin-training-key";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port on 127.0.0.1 (default: a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// The training key clients must send (`Training-Key` header).
    #[arg(long, default_value = DEFAULT_KEY)]
    pub key: String,
    /// Storage connection string for notifications and backups (default: CVCHAIN_STORAGE;
    /// `UseDevelopmentStorage=true` for Azurite on its default ports).
    #[arg(long)]
    pub storage: Option<String>,
    /// How long a training takes, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub train_seconds: f64,
    /// How long an export takes, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub export_seconds: f64,
}

/// The lines that tell a user how to point an SDK at a stand-in.
pub fn sdk_instructions(endpoint: &str, key: &str, storage: Option<&StorageSettings>) -> String {
    let storage = match storage {
        Some(s) => format!(
            "  storage:       queues at {}, containers at {} (create them before CreateProject)",
            s.queue_endpoint.as_str().trim_end_matches('/'),
            s.blob_endpoint.as_str().trim_end_matches('/')
        ),
        None => {
            "  storage:       none: projects cannot be wired to a queue or container (--storage)"
                .to_owned()
        }
    };
    format!(
        "Custom Vision stand-in (Training API v3.3 and v3.4-preview)\n  \
         endpoint:      {endpoint}\n  \
         training key:  {key}\n\
         {storage}\n  \
         Python SDK:    CustomVisionTrainingClient(\"{endpoint}\", ApiKeyCredentials(in_headers={{\"Training-key\": \"{key}\"}}))"
    )
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    if !(0.0..=3600.0).contains(&v) {
        anyhow::bail!("--{name} must be from 0 to 3600 seconds, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::telemetry::init(crate::settings::log_format_from_env());
    let connection = args
        .storage
        .clone()
        .or_else(|| std::env::var("CVCHAIN_STORAGE").ok())
        .filter(|c| !c.trim().is_empty());
    let settings = connection
        .as_deref()
        .map(|c| parse_connection_string(STORAGE_SETTING, c))
        .transpose()
        .context("--storage")?;
    let config = StandinConfig {
        training_key: args.key.clone(),
        storage: settings.as_ref().map(StorageClients::new).transpose()?,
        train_delay: seconds("train-seconds", args.train_seconds)?,
        export_delay: seconds("export-seconds", args.export_seconds)?,
        model_size: 256 * 1024,
        ..Default::default()
    };
    super::runtime()?.block_on(async move {
        let standin = Standin::start_on(config, args.port)
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{}", args.port))?;
        println!(
            "{}\nCtrl-C stops.",
            sdk_instructions(&standin.endpoint(), &args.key, settings.as_ref())
        );
        crate::server::shutdown_signal().await;
        drop(standin);
        Ok(())
    })
}
