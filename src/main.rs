//! The `cvchain` command line. Each subcommand is a thin shell over the library.

use anyhow::{Context, bail};
use cvchain::{server, settings, stage, storage::connection::StorageClients, telemetry};
use std::{path::PathBuf, sync::Arc, time::Duration};

const USAGE: &str = "\
cvchain: Azure Custom Vision notifications → an event-driven MLOps chain

USAGE:
  cvchain serve                 Run as the Azure Functions custom handler
                                (listens on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT)
  cvchain stage-app [OUT]       Stage the Functions app folder (default dist/app) with this
                                binary as the handler, ready for `func start --script-root OUT`
                                and zip deploy. Run from the repository root.
  cvchain --version

Settings come from the environment; see README.md.";

/// How long SIGTERM waits for in-flight invocations.
const DRAIN: Duration = Duration::from_secs(20);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") if args.len() == 1 => serve(),
        Some("stage-app") if args.len() <= 2 => {
            let out = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("dist/app"));
            let binary = std::env::current_exe().context("cannot find this executable")?;
            let layout = stage::stage(std::path::Path::new("."), &out, &binary)?;
            println!(
                "staged {} (handler `{}`, functions: {})",
                out.display(),
                layout.executable,
                layout.functions.join(", ")
            );
            Ok(())
        }
        Some("--version") | Some("-V") => {
            println!("cvchain {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("help") | Some("--help") | Some("-h") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(_) => bail!("unknown arguments {args:?}\n\n{USAGE}"),
    }
}

fn serve() -> anyhow::Result<()> {
    telemetry::init(settings::log_format_from_env());
    let settings = settings::from_env()?;
    let port = settings::handler_port(&|k| std::env::var(k).ok())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let clients = StorageClients::new(&settings.storage)?;
        let processor = cvchain::process::Processor::new(&settings, &clients)?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        tracing::info!(
            storage = ?settings.storage,
            queue = %settings.queue_name,
            table = %settings.history_table,
            "settings validated"
        );
        let state = server::AppState {
            processor: Arc::new(processor),
        };
        server::serve(listener, state, DRAIN).await?;
        Ok(())
    })
}
