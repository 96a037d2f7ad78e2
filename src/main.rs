//! The `cvchain` command line. Each subcommand is a thin shell over the library.

use anyhow::{Context, bail};
use cvchain::{
    cli, history::store::HistoryStore, server, settings, stage,
    storage::connection::StorageClients, telemetry,
};
use std::{path::PathBuf, sync::Arc, time::Duration};

const USAGE: &str = "\
cvchain: Azure Custom Vision notifications → an event-driven MLOps chain

USAGE:
  cvchain serve                 Run as the Azure Functions custom handler
                                (listens on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT)
  cvchain dev [--keep]          Run the whole chain locally: Azurite (from node_modules, unless
                                CVCHAIN_STORAGE is set), the Custom Vision stand-in and the worker;
                                train a demo project and watch the exports and copies happen
  cvchain worker                Consume the queue without a Functions host (same processing
                                as serve; see README for the CVCHAIN_WORKER_* settings)
  cvchain history [--project ID] [--json] [--rows] [--limit N]
                                The trained iterations, newest first: precision, recall, mAP,
                                exports and release paths (--rows: the raw rows)
  cvchain check                 Reach the queue, table, containers and Custom Vision with the
                                configured credentials; say what to fix
  cvchain replay [--limit N]    Move poison messages back to the queue (default 100), recording
                                each move
  cvchain invoke [--url URL] [--id ID] [--dequeue-count N] FILE|-
                                Deliver a queue message to a running handler exactly as
                                the Functions host does (default URL http://127.0.0.1:7072/)
  cvchain stage-app [OUT] [--binary PATH] [--zip ZIP]
                                Stage the Functions app folder (default dist/app) with this
                                binary (or PATH) as the handler, ready for
                                `func start --script-root OUT`; --zip also writes it as the
                                deployment zip. Run from the repository root.
  cvchain --version

Settings come from the environment; see README.md.";

/// How long SIGTERM waits for in-flight invocations.
const DRAIN: Duration = Duration::from_secs(20);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    match command.as_str() {
        "serve" if rest.is_empty() => serve(),
        "worker" if rest.is_empty() => worker(),
        "dev" if rest.is_empty() || rest == ["--keep"] => {
            if std::env::var("RUST_LOG").is_err() {
                // SAFETY: single-threaded here, before the runtime and logging start.
                unsafe { std::env::set_var("RUST_LOG", "warn") };
            }
            telemetry::init(settings::log_format_from_env());
            let keep = rest.first().is_some_and(|a| a == "--keep");
            runtime()?.block_on(cvchain::dev::run(std::env::current_dir()?, keep))
        }
        "history" => history(rest),
        "check" if rest.is_empty() => check(),
        "replay" => replay(rest),
        "invoke" => invoke(rest),
        "stage-app" => stage_app(rest),
        "--version" | "-V" => {
            println!("cvchain {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown arguments {args:?}\n\n{USAGE}"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("cannot start the async runtime")
}

fn serve() -> anyhow::Result<()> {
    telemetry::init(settings::log_format_from_env());
    let settings = settings::from_env()?;
    let port = settings::handler_port(&|k| std::env::var(k).ok())?;
    runtime()?.block_on(async move {
        let (_, processor) = cvchain::process::build(&settings)?;
        if settings.custom_vision.is_none() {
            tracing::info!("no CUSTOM_VISION_ENDPOINT: recording notifications only");
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        tracing::info!(
            storage = ?settings.storage,
            queue = %settings.queue_name,
            table = %settings.history_table,
            custom_vision = ?settings.custom_vision,
            exports = %settings.chain.exports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            "settings validated"
        );
        let state = server::AppState {
            processor: Arc::new(processor),
        };
        server::serve(listener, state, DRAIN).await?;
        Ok(())
    })
}

fn worker() -> anyhow::Result<()> {
    telemetry::init(settings::log_format_from_env());
    let settings = settings::from_env()?;
    let options = settings::worker_options(&|k| std::env::var(k).ok(), settings.max_dequeue)?;
    runtime()?.block_on(async move {
        let (clients, processor) = cvchain::process::build(&settings)?;
        let processor = Arc::new(processor);
        let (queue, poison) = cvchain::worker::queues(&settings, &clients)?;
        tracing::info!(
            storage = ?settings.storage,
            queue = %settings.queue_name,
            table = %settings.history_table,
            ?options,
            "settings validated"
        );
        let stats =
            cvchain::worker::run(processor, queue, poison, options, server::shutdown_signal())
                .await;
        tracing::info!(?stats, "worker stopped");
        Ok(())
    })
}

/// Parsed `--name value` options and positional arguments.
type Parsed<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>);

/// `--name value` options, then positional arguments.
fn options<'a>(args: &'a [String], known: &[&str], flags: &[&str]) -> anyhow::Result<Parsed<'a>> {
    let mut opts = Vec::new();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if flags.contains(&a.as_str()) {
            opts.push((a.as_str(), ""));
        } else if known.contains(&a.as_str()) {
            let v = it.next().with_context(|| format!("{a} needs a value"))?;
            opts.push((a.as_str(), v.as_str()));
        } else if a.starts_with("--") {
            bail!("unknown option {a}\n\n{USAGE}");
        } else {
            positional.push(a.as_str());
        }
    }
    Ok((opts, positional))
}

fn opt<'a>(opts: &[(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    opts.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

fn stage_app(args: &[String]) -> anyhow::Result<()> {
    let (opts, positional) = options(args, &["--binary", "--zip"], &[])?;
    if positional.len() > 1 {
        bail!("stage-app takes one output folder\n\n{USAGE}");
    }
    let out = PathBuf::from(positional.first().copied().unwrap_or("dist/app"));
    let binary = match opt(&opts, "--binary") {
        Some(b) => PathBuf::from(b),
        None => std::env::current_exe().context("cannot find this executable")?,
    };
    let layout = stage::stage(std::path::Path::new("."), &out, &binary)?;
    println!(
        "staged {} (handler `{}`, functions: {})",
        out.display(),
        layout.executable,
        layout.functions.join(", ")
    );
    if let Some(zip) = opt(&opts, "--zip") {
        let entries = stage::package(&out, std::path::Path::new(zip))?;
        println!("packaged {zip}:");
        for e in &entries {
            println!("  {:o} {:>10} {}", e.mode, e.size, e.name);
        }
    }
    Ok(())
}

fn history(args: &[String]) -> anyhow::Result<()> {
    let (opts, positional) = options(args, &["--project", "--limit"], &["--json", "--rows"])?;
    if !positional.is_empty() {
        bail!("history takes no positional arguments\n\n{USAGE}");
    }
    let limit: usize = opt(&opts, "--limit")
        .map(str::parse)
        .transpose()
        .context("--limit must be a number")?
        .unwrap_or(5000);
    let settings = settings::from_env()?;
    runtime()?.block_on(async move {
        let clients = StorageClients::new(&settings.storage)?;
        let store = HistoryStore::new(clients.table(&settings.history_table)?);
        let rows = cli::history_rows(&store, opt(&opts, "--project"), limit).await?;
        match (
            opt(&opts, "--rows").is_some(),
            opt(&opts, "--json").is_some(),
        ) {
            (true, true) => {
                for r in &rows {
                    println!("{}", serde_json::to_string(&r.entity)?);
                }
            }
            (true, false) => print!("{}", cli::render_table(&rows)),
            (false, true) => println!(
                "{}",
                serde_json::to_string_pretty(&cvchain::report::iterations(&rows))?
            ),
            (false, false) => print!(
                "{}",
                cvchain::report::render(&cvchain::report::iterations(&rows))
            ),
        }
        Ok(())
    })
}

fn check() -> anyhow::Result<()> {
    let settings = settings::from_env()?;
    println!("✓ settings valid");
    let failures = runtime()?.block_on(async {
        let clients = StorageClients::new(&settings.storage)?;
        let cv = cvchain::process::training_client(&settings)?;
        let checks = cvchain::ops::check(
            &settings,
            &clients,
            cv.as_ref()
                .map(|c| c as &dyn cvchain::customvision::TrainingApi),
        )
        .await;
        for c in &checks {
            println!("{c}");
        }
        anyhow::Ok(checks.iter().filter(|c| !c.ok).count())
    })?;
    if failures > 0 {
        bail!("{failures} check(s) failed");
    }
    Ok(())
}

fn replay(args: &[String]) -> anyhow::Result<()> {
    let (opts, positional) = options(args, &["--limit"], &[])?;
    if !positional.is_empty() {
        bail!("replay takes no positional arguments\n\n{USAGE}");
    }
    let limit: usize = opt(&opts, "--limit")
        .map(str::parse)
        .transpose()
        .context("--limit must be a number")?
        .unwrap_or(100);
    let settings = settings::from_env()?;
    let moved = runtime()?.block_on(async {
        let clients = StorageClients::new(&settings.storage)?;
        let store = HistoryStore::new(clients.table(&settings.history_table)?);
        anyhow::Ok(cvchain::ops::replay(&settings, &clients, &store, limit).await?)
    })?;
    println!(
        "moved {moved} message(s) from {} back to {}",
        cvchain::storage::queue::poison_queue_name(&settings.queue_name),
        settings.queue_name
    );
    Ok(())
}

fn invoke(args: &[String]) -> anyhow::Result<()> {
    let (opts, positional) = options(args, &["--url", "--id", "--dequeue-count"], &[])?;
    let [file] = positional[..] else {
        bail!("invoke takes one FILE (or - for standard input)\n\n{USAGE}");
    };
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
    };
    let url = opt(&opts, "--url").unwrap_or("http://127.0.0.1:7072/");
    let id = opt(&opts, "--id")
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let dequeue: u32 = opt(&opts, "--dequeue-count")
        .map(str::parse)
        .transpose()
        .context("--dequeue-count must be a number")?
        .unwrap_or(1);
    let (status, body) = runtime()?.block_on(cli::invoke(url, &text, &id, dequeue))?;
    println!("HTTP {status} {body}");
    if !(200..300).contains(&status) {
        bail!("the handler answered HTTP {status}");
    }
    Ok(())
}
