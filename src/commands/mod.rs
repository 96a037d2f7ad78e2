//! The command line, one module per command. [`Cli`] is the whole interface: clap generates the
//! usage text and each command's `--help` from it, and names any argument it does not know.

pub mod channels;
pub mod check;
#[cfg(feature = "standin")]
pub mod dev;
pub mod events;
pub mod history;
pub mod invoke;
pub mod promote;
pub mod replay;
pub mod rollback;
pub mod serve;
pub mod stage_app;
#[cfg(feature = "standin")]
pub mod standin;
pub mod worker;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// cvchain: Azure Custom Vision notifications → an event-driven MLOps chain.
///
/// Settings come from the environment (the names Azure Functions uses); see docs/settings.md.
#[derive(Debug, Parser)]
#[command(name = "cvchain", version, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line. `serve` alone, as the Functions host starts the handler, is taken
    /// without building clap's parser for every command and flag: that is more of start-up's
    /// CPU before the first answer than reading and checking the settings (about 160,000
    /// instructions against 130,000, callgrind). Anything else goes through clap.
    pub fn from_env() -> Self {
        let mut args = std::env::args_os().skip(1);
        match (args.next(), args.next()) {
            (Some(command), None) if command == "serve" => Cli {
                command: Command::Serve,
            },
            _ => Cli::parse(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as the Azure Functions custom handler.
    ///
    /// Listens on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT (8080 when unset).
    Serve,
    /// Consume the queue without a Functions host.
    ///
    /// The same processing as serve, with the host's queue semantics; see docs/settings.md for the
    /// CVCHAIN_WORKER_* settings.
    Worker,
    /// Run the whole chain locally (development builds only).
    ///
    /// Starts Azurite (from node_modules, unless CVCHAIN_STORAGE is set), the Custom Vision
    /// stand-in and the worker; trains a demo project and shows the exports and copies happen.
    Dev(DevArgs),
    /// Run the local Custom Vision alone, for your own training scripts (development builds).
    ///
    /// Serves the Training API (v3.3 and v3.4-preview) on 127.0.0.1 and prints the endpoint and
    /// key to give Microsoft's SDKs; notifications and backups go to the --storage account.
    Standin(StandinArgs),
    /// The trained iterations, newest first, or the raw rows.
    ///
    /// Precision, recall, mAP, each export's status and release path; --rows for the raw
    /// history rows.
    History(history::Args),
    /// Reach every dependency with the configured credentials; say what to fix.
    ///
    /// The queue, the poison queue, the history table, the containers, Custom Vision and
    /// each event sink.
    Check,
    /// Every release channel with the iteration it holds and its metrics.
    Channels(channels::Args),
    /// Move a channel to an iteration by hand, bypassing the gate.
    ///
    /// For `production` the pointer moves and publishing follows; the history row says the gate
    /// was not consulted.
    Promote(promote::Args),
    /// Move a channel back to its previous holder.
    ///
    /// The iteration rolled back from is not promoted there again on its own.
    Rollback(rollback::Args),
    /// Move poison messages back to the queue, recording each move.
    Replay(replay::Args),
    /// The outbound events (the outbox) with each sink's delivery state.
    ///
    /// `events replay` sends events again; `events test` sends one io.cvchain.test event to
    /// every configured sink and shows each answer.
    Events(events::Args),
    /// Deliver a queue message to a running handler as the Functions host does.
    Invoke(invoke::Args),
    /// Stage the Functions app folder with this binary as the handler.
    ///
    /// Ready for `func start --script-root OUT`; --zip also writes the deployment zip.
    StageApp(stage_app::Args),
}

#[cfg(feature = "standin")]
pub use dev::Args as DevArgs;
#[cfg(feature = "standin")]
pub use standin::Args as StandinArgs;

/// `cvchain dev`'s arguments, kept in builds without the stand-in so the command can say why
/// it is not there.
#[cfg(not(feature = "standin"))]
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Leave everything running after the demo.
    #[arg(long)]
    pub keep: bool,
    /// Print each chain's trace as a tree.
    #[arg(long)]
    pub trace: bool,
}

/// `cvchain standin`'s arguments, kept in builds without the stand-in so the command can say
/// why it is not there.
#[cfg(not(feature = "standin"))]
#[derive(Debug, clap::Args)]
pub struct StandinArgs {
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub storage: Option<String>,
    #[arg(long)]
    pub train_seconds: Option<f64>,
    #[arg(long)]
    pub export_seconds: Option<f64>,
}

/// What a build without the `standin` feature answers for the commands that need it.
pub const NO_STANDIN: &str = "`cvchain dev` is not in this build: the deployment package is built \
without the local Custom Vision stand-in (the `standin` feature). Run it from a development \
build: `scripts/run-local`, or `cargo run -- dev`.";

/// The same for `cvchain standin`.
pub const NO_STANDIN_COMMAND: &str = "`cvchain standin` is not in this build: the deployment \
package is built without the local Custom Vision stand-in (the `standin` feature). Run it from a \
development build: `cargo run -- standin`.";

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            // Logging and telemetry start on the command's runtime (the exporters use it).
            Command::Serve => serve::run(),
            Command::Worker => worker::run(),
            #[cfg(feature = "standin")]
            Command::Dev(args) => dev::run(args),
            #[cfg(not(feature = "standin"))]
            Command::Dev(_) => anyhow::bail!(NO_STANDIN),
            #[cfg(feature = "standin")]
            Command::Standin(args) => standin::run(args),
            #[cfg(not(feature = "standin"))]
            Command::Standin(_) => anyhow::bail!(NO_STANDIN_COMMAND),
            Command::History(args) => history::run(args),
            Command::Check => check::run(),
            Command::Channels(args) => channels::run(args),
            Command::Promote(args) => promote::run(args),
            Command::Rollback(args) => rollback::run(args),
            Command::Replay(args) => replay::run(args),
            Command::Events(args) => events::run(args),
            Command::Invoke(args) => invoke::run(args),
            Command::StageApp(args) => stage_app::run(args),
        }
    }
}

/// `production` or `latest`.
fn parse_channel(s: &str) -> Result<cvchain_core::channels::Channel, String> {
    cvchain_core::channels::Channel::parse(s)
        .ok_or_else(|| format!("{s:?} is not a channel (production or latest)"))
}

/// What a manual move did, one line each, with the moves that could not be carried out.
fn print_manual(done: &crate::lifecycle::Manual) {
    for line in crate::moves::describe(done) {
        println!("{line}");
    }
}

/// A manual move some of whose copies could not be made fails the command (they were taken
/// back out of the manifest and recorded).
fn fail_on_failed(done: &crate::lifecycle::Manual) -> anyhow::Result<()> {
    if done.failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} move(s) could not be carried out (see above); the channels stayed where they were",
            done.failed.len()
        )
    }
}

/// Sends the events a manual change recorded (the channel moves) now, rather than at the next
/// notification or timer run; says so when a sink did not take them.
async fn deliver_events(app: &crate::startup::Application, project: uuid::Uuid) {
    if let Some(events) = app.processor.events() {
        match events.deliver(&project.to_string()).await {
            Ok(r) if r.waiting + r.failed + r.busy + r.stopped > 0 => {
                println!("events: {}", r.describe())
            }
            Ok(_) => {}
            Err(e) => println!("events: not delivered now ({e}); the timer delivers them"),
        }
    }
}

/// How long SIGTERM waits for telemetry to be exported (the collector may be away).
pub const TELEMETRY_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// The async runtime a command runs on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("cannot start the async runtime")
}

/// Runs a long-lived command (`serve`, `worker`, `dev`) to its end, then leaves without waiting
/// for blocking tasks: a telemetry flush still stuck past [`TELEMETRY_FLUSH`] (an exporter
/// retrying a collector that is away) must not hold the exit after SIGTERM.
fn run_then_leave<T>(work: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    let rt = runtime()?;
    let out = rt.block_on(work);
    rt.shutdown_background();
    Ok(out)
}
