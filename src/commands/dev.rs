//! `cvchain dev`: the whole chain on one machine. Starts Azurite from `node_modules` (unless
//! `CVCHAIN_STORAGE` is set), the Custom Vision stand-in and the worker; creates a demo project,
//! trains it, and lets the notifications drive the real chain, printing each event and a progress
//! bar; ends with the history and the release blobs.

use crate::settings::Settings;
use crate::startup::Application;
use crate::worker::WorkerOptions;
use anyhow::{Context, bail};
use cvchain_azure::storage::{
    clients::StorageClients,
    settings::{STORAGE_SETTING, parse_connection_string},
};
use cvchain_core::events::Sink;
use cvchain_core::history::{HistoryRow, Prop, RowKind, RowStatus, StepRow};
use cvchain_core::notification::Kind;
use cvchain_core::report;
use cvchain_standin::azurite::{self, Azurite, Data};
use cvchain_standin::{
    COMPACT_DOMAIN, Faults, Metrics, Standin, StandinConfig, script::TrainingScript,
};
use futures::TryStreamExt;
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};
use uuid::Uuid;

const DEMO_KEY: &str = "cvchain-dev-training-key";
const DEFAULT_CHAIN: &str = "ONNX, TensorFlow:TensorFlowLite, DockerFile:Linux";
/// The demo's gate: the second training is better, so production moves to it.
const DEFAULT_GATE: &str = "map>=0.80,improves:map";
/// The demo's two trainings: a good one, then a better one.
const DEMO_PERFORMANCE: [(f64, f64, f64); 2] = [(0.88, 0.84, 0.86), (0.93, 0.90, 0.92)];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Leave Azurite, the stand-in and the worker running after the demo (Ctrl-C stops).
    #[arg(long)]
    pub keep: bool,
    /// Print each chain's trace as a tree when the demo ends: every invocation, its storage and
    /// Custom Vision calls and the events' deliveries, with their durations (no collector
    /// needed; OTEL_EXPORTER_OTLP_ENDPOINT still exports them too).
    #[arg(long)]
    pub trace: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if std::env::var("RUST_LOG").is_err() {
        // SAFETY: single-threaded here, before the runtime and logging start.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    super::run_then_leave(async move {
        let mut settings = crate::telemetry::TelemetrySettings::from_env();
        settings.tree = args.trace;
        let telemetry =
            crate::telemetry::init_with(crate::settings::log_format_from_env(), &settings);
        let result = demo(std::env::current_dir()?, args.keep, &telemetry).await;
        telemetry.shutdown(super::TELEMETRY_FLUSH).await;
        result
    })?
}

/// Azurite for the run, with its data in `.azurite/` of the repository. A previous run's data
/// is removed first, so each run shows the paths a first release gets in production (an
/// earlier demo project of the same name would hold them, and this run's copies would take the
/// id-qualified paths).
fn start_azurite(root: &Path) -> anyhow::Result<Azurite> {
    let data = root.join(".azurite");
    if std::fs::read_dir(&data).is_ok_and(|mut d| d.next().is_some()) {
        std::fs::remove_dir_all(&data).with_context(|| {
            format!(
                "cannot remove the previous run's data in {}",
                data.display()
            )
        })?;
        println!("● removed the previous run's demo data (.azurite/)");
    }
    Ok(Azurite::start(azurite::Options::new(
        root,
        Data::Dir(data),
    ))?)
}

/// The settings of the run: the environment's, with local defaults filled in.
fn dev_settings(
    storage: &str,
    standin: &str,
    run: &str,
    webhook: &LocalReceiver,
) -> anyhow::Result<Settings> {
    let blob = storage_blob_url(storage)?;
    let backup = format!("{}/cvbackups", blob.trim_end_matches('/'));
    let defaults: Vec<(String, String)> = vec![
        ("CVCHAIN_STORAGE".into(), storage.into()),
        ("CVCHAIN_QUEUE".into(), format!("cvchain-dev-{run}")),
        ("CVCHAIN_HISTORY_TABLE".into(), format!("CvchainDev{run}")),
        ("CUSTOM_VISION_ENDPOINT".into(), standin.into()),
        ("CUSTOM_VISION_TRAINING_KEY".into(), DEMO_KEY.into()),
        ("CVCHAIN_EXPORTS".into(), DEFAULT_CHAIN.into()),
        ("CVCHAIN_GATE".into(), DEFAULT_GATE.into()),
        ("CVCHAIN_BACKUP_CONTAINER".into(), backup),
        // Events go to the local receiver, which checks each signature and prints the event.
        ("CVCHAIN_WEBHOOK_URL".into(), webhook.url.clone()),
        ("CVCHAIN_WEBHOOK_SECRET".into(), webhook.secret.clone()),
        ("CVCHAIN_EVENTS_RETRY_SECONDS".into(), "1".into()),
    ];
    let lookup = move |k: &str| -> Option<String> {
        match k {
            // The stand-in is this run's Custom Vision: never a real endpoint by accident.
            "CUSTOM_VISION_ENDPOINT"
            | "CUSTOM_VISION_TRAINING_KEY"
            | "CUSTOM_VISION_CREDENTIAL" => defaults
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone()),
            _ => std::env::var(k).ok().filter(|v| !v.is_empty()).or_else(|| {
                defaults
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            }),
        }
    };
    Ok(Settings::from_lookup(&lookup)?)
}

fn storage_blob_url(connection: &str) -> anyhow::Result<String> {
    let s = parse_connection_string(STORAGE_SETTING, connection)?;
    Ok(s.blob_endpoint.to_string())
}

/// Runs the demo; with `keep`, leaves everything running until Ctrl-C.
async fn demo(
    root: PathBuf,
    keep: bool,
    telemetry: &crate::telemetry::Telemetry,
) -> anyhow::Result<()> {
    let run_id = format!("{:08x}", rand_u32());
    let (azurite, connection) = match std::env::var("CVCHAIN_STORAGE") {
        Ok(c) if !c.trim().is_empty() => {
            println!("● storage: CVCHAIN_STORAGE from the environment");
            (None, c)
        }
        _ => {
            let a = start_azurite(&root)?;
            let c = a.connection_string();
            println!(
                "● Azurite on 127.0.0.1:{}/{}/{} (data in .azurite/)",
                a.blob_port, a.queue_port, a.table_port
            );
            (Some(a), c)
        }
    };
    let bootstrap = parse_connection_string(STORAGE_SETTING, &connection)?;
    let clients = StorageClients::new(&bootstrap)?;
    let standin = Standin::start(StandinConfig {
        training_key: DEMO_KEY.into(),
        storage: Some(clients.clone()),
        train_delay: Duration::from_millis(800),
        export_delay: Duration::from_millis(600),
        model_size: 256 * 1024,
        ..Default::default()
    })
    .await?;
    println!("● Custom Vision stand-in on {}", standin.endpoint());
    standin.set_faults(Faults {
        next_metrics: DEMO_PERFORMANCE
            .iter()
            .map(|&(precision, recall, average_precision)| Metrics {
                precision,
                recall,
                average_precision,
            })
            .collect(),
        ..Default::default()
    });

    let receiver = LocalReceiver::start().await?;
    let settings = dev_settings(&connection, &standin.endpoint(), &run_id, &receiver)?;
    if let Some(w) = &settings.events.webhook {
        println!(
            "● events: CloudEvents to {} (a local Standard Webhooks receiver here unless CVCHAIN_WEBHOOK_URL is set)",
            cvchain_azure::events::settings::display_url(&w.url)
        );
    }
    let app = Application::build(settings.clone())?;
    let clients = app.clients.clone();
    let store = app.history().clone();
    let app_lifecycle = app.processor.clone();
    let mut options = WorkerOptions::from_env(settings.max_dequeue)?;
    options.max_poll = Duration::from_millis(500);
    options.retry_delay = Duration::from_secs(2);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(app.run_worker(options, async {
        let _ = stop_rx.await;
    }));
    println!(
        "● worker on queue {} → table {}; chain: {}",
        settings.queue_name,
        settings.history_table,
        settings
            .chain
            .exports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" → ")
    );

    // The user's part: a project wired to the queue and a backup container, then a training.
    let blob = storage_blob_url(&connection)?;
    let queue_uri = format!(
        "{}/{}",
        settings
            .storage
            .queue_endpoint
            .as_str()
            .trim_end_matches('/'),
        settings.queue_name
    );
    let backup = format!("{}/cvbackups", blob.trim_end_matches('/'));
    // As in Azure, the queue and the container exist before the project names them.
    cvchain_azure::storage::queue::create_if_missing(&clients.queue(&settings.queue_name)?).await?;
    if let Err(e) = clients
        .blob_service()?
        .blob_container_client("cvbackups")
        .create(None)
        .await
        && e.http_status() != Some(azure_core::http::StatusCode::Conflict)
    {
        bail!("cannot create the backup container cvbackups: {e}");
    }
    let script = TrainingScript::new(&standin.endpoint(), DEMO_KEY);
    let project_id = script
        .create_project(
            "Widget Detector",
            COMPACT_DOMAIN,
            Some(&queue_uri),
            Some(&backup),
        )
        .await?;
    script
        .add_tagged_images(project_id, &["widget", "gadget"], 0)
        .await?;
    let pid = project_id.to_string();
    println!(
        "● project \"Widget Detector\" {pid} created with tagged images; gate: {}",
        settings.lifecycle.gate
    );
    let total = settings.chain.exports.len();
    let started = Instant::now();
    let mut seen: HashSet<String> = HashSet::new();
    for round in 1..=DEMO_PERFORMANCE.len() {
        println!(
            "\n● training {} ({})…",
            if round == 1 {
                "a first model"
            } else {
                "a better model"
            },
            if round == 1 {
                "production is empty"
            } else {
                "production should move to it"
            }
        );
        // The second training adds no images: forced, as a script retraining would.
        script.train(project_id, round > 1).await?;
        watch(&store, &pid, total * round, total, &mut seen, started).await?;
    }
    // The last message's events may still be on their way: once each chain's completion is
    // recorded, deliver what is pending.
    if let Some(events) = app_lifecycle.events() {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let done = events
                .outbox()
                .list(Some(&pid), false, 10_000)
                .await?
                .iter()
                .filter(|r| r.kind == "io.cvchain.chain.completed")
                .count();
            if done >= DEMO_PERFORMANCE.len() || Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        events.deliver_all().await?;
    }
    println!();
    if let Some(events) = app_lifecycle.events() {
        let rows = events.outbox().list(Some(&pid), false, 10_000).await?;
        for sink in events.sinks.configured() {
            let local = sink == Sink::Webhook
                && settings
                    .events
                    .webhook
                    .as_ref()
                    .is_some_and(|w| w.url.as_str() == receiver.url);
            if local {
                let (received, bad) = receiver.counts();
                println!(
                    "● {received} event(s) received by the local webhook receiver, {} signature(s) verified{}",
                    received - bad,
                    if bad > 0 {
                        format!(", {bad} refused")
                    } else {
                        String::new()
                    }
                );
            } else {
                println!(
                    "● events to {}: {}",
                    events.sinks.describe(sink),
                    delivery_summary(&rows, sink)
                );
            }
        }
    }
    println!(
        "\n● both chains complete in {:.1} s\n\nHistory ({}):",
        started.elapsed().as_secs_f64(),
        settings.history_table
    );
    let rows = store.recent(Some(&pid), 1000).await?;
    print!("{}", report::render(&report::iterations(&rows)));
    let lifecycle = app_lifecycle.lifecycle();
    for listed in lifecycle
        .channels
        .manifests(Uuid::parse_str(&pid).ok())
        .await?
    {
        println!(
            "\nChannels ({} in {}):",
            listed.path, settings.release.container
        );
        match &listed.manifest {
            Ok(loaded) => print!(
                "{}",
                super::channels::render(&loaded.path, &loaded.manifest)
            ),
            Err(e) => println!("  refused: {e}"),
        }
    }
    println!(
        "\nRelease and channel blobs (container {}), found by their index tags:",
        settings.release.container
    );
    // Found the way a deployment pipeline would: by the project's index tags.
    let service = clients.blob_service()?;
    let filter = format!("\"projectId\"='{pid}' AND \"source\"='customvision'");
    let mut pages = service.find_blobs_by_tags(&filter, None)?.into_pages();
    while let Some(page) = pages.try_next().await? {
        for b in page.into_model()?.blob_items {
            let container = b.container_name.unwrap_or_default();
            if container == settings.release.container {
                println!("  {container}/{}", b.name.unwrap_or_default());
            }
        }
    }
    if telemetry.tracing() {
        // What the invocations still hold open (their delivery rounds) ends first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let spans = telemetry.kept_spans().await;
        println!(
            "\nTraces (one per chain: each invocation, its calls and the events' deliveries):\n{}",
            crate::telemetry::render_tree(&spans)
        );
    }
    if keep {
        println!(
            "\n{}",
            super::standin::sdk_instructions(
                &standin.endpoint(),
                DEMO_KEY,
                Some(&settings.storage)
            )
        );
        let env = handed_over(
            &settings,
            azurite.as_ref().map(|_| connection.as_str()),
            &standin.endpoint(),
            &receiver,
        );
        let file = root.join(DEV_ENV);
        write_env_file(&file, &env)?;
        println!(
            "\n● still running (Ctrl-C stops). In another shell, `source {DEV_ENV}` (written now), or:\n"
        );
        print!("{env}");
        println!(
            "\n  then `cvchain history`, `cvchain channels`, `cvchain events`, or `func start --script-root dist/app`\n  (with AzureWebJobsStorage=\"$CVCHAIN_STORAGE\") all work on this run."
        );
        crate::server::shutdown_signal().await;
        // The environment it describes ends now.
        let _ = std::fs::remove_file(&file);
    }
    let _ = stop_tx.send(());
    let _ = worker.await;
    drop(standin);
    drop(azurite);
    Ok(())
}

/// Prints each event as the rows show it, with a progress bar, until `want` exports are
/// released in all.
async fn watch(
    store: &cvchain_azure::history::store::HistoryStore,
    pid: &str,
    want: usize,
    per_iteration: usize,
    seen: &mut HashSet<String>,
    started: Instant,
) -> anyhow::Result<()> {
    let mut last_bar = String::new();
    loop {
        let rows = store.recent(Some(pid), 1000).await?;
        let mut ordered = rows.clone();
        ordered.sort_by_key(|r| r.properties.time(Prop::Timestamp));
        for r in &ordered {
            // A released step is told once, whatever its status says by then (the copy is
            // recorded a moment before the step's status moves to Done).
            let key = if r.properties.contains(Prop::ReleaseUrl) {
                format!("{}|released", r.row_key)
            } else {
                format!("{}|{}", r.row_key, r.properties.text(Prop::Status))
            };
            if seen.insert(key)
                && let Some(line) = describe(r)
            {
                println!("{line}");
            }
        }
        let released = StepRow::all(&rows)
            .iter()
            .filter(|s| s.release_url.is_some())
            .count();
        // This training's releases: the earlier ones are already counted.
        let bar = progress(
            released
                .saturating_sub(want - per_iteration)
                .min(per_iteration),
            per_iteration,
        );
        if bar != last_bar {
            println!("{bar}");
            last_bar = bar;
        }
        // Released, and the channels moved (the last release's message moves them).
        let moved = rows
            .iter()
            .filter(|r| r.kind() == Some(RowKind::ChannelMove))
            .count();
        // Latest moves for every target of every training: the chain's last message is done.
        if released >= want && per_iteration > 0 && moved >= want {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("the chains did not finish within three minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where `cvchain dev --keep` writes the environment it hands over.
const DEV_ENV: &str = ".cvchain/dev.env";

/// `export NAME='value'` lines for every setting another shell needs to work on this run. Only
/// values this run made up are written (its Azurite, with the emulator's well-known account key;
/// the stand-in and its demo key; the local receiver's secret): a setting that came from the
/// environment, maybe a real secret, is named, never quoted.
fn handed_over(
    settings: &Settings,
    own_storage: Option<&str>,
    standin: &str,
    receiver: &LocalReceiver,
) -> String {
    let mut out = String::new();
    let mut export = |name: &str, value: &str| {
        out.push_str(&format!(
            "export {name}='{}'\n",
            value.replace('\'', "'\\''")
        ));
    };
    let mut from_env = Vec::new();
    match own_storage {
        Some(c) => export(STORAGE_SETTING, c),
        None => from_env.push(STORAGE_SETTING),
    }
    export("CVCHAIN_QUEUE", &settings.queue_name);
    export("CVCHAIN_HISTORY_TABLE", &settings.history_table);
    export("CVCHAIN_RELEASE_CONTAINER", &settings.release.container);
    if let Some(b) = &settings.release.backup_container {
        export(
            "CVCHAIN_BACKUP_CONTAINER",
            &cvchain_azure::events::settings::display_url(b),
        );
    }
    let chain: Vec<String> = settings
        .chain
        .exports
        .iter()
        .map(|t| t.to_string())
        .collect();
    export("CVCHAIN_EXPORTS", &chain.join(", "));
    let gate = settings.lifecycle.gate.to_string();
    if !gate.is_empty() {
        export("CVCHAIN_GATE", &gate);
    }
    export("CUSTOM_VISION_ENDPOINT", standin);
    export("CUSTOM_VISION_TRAINING_KEY", DEMO_KEY);
    match &settings.events.webhook {
        Some(w) if w.url.as_str() == receiver.url => {
            export("CVCHAIN_WEBHOOK_URL", &receiver.url);
            export("CVCHAIN_WEBHOOK_SECRET", &receiver.secret);
        }
        Some(_) => from_env.extend(["CVCHAIN_WEBHOOK_URL", "CVCHAIN_WEBHOOK_SECRET"]),
        None => {}
    }
    for name in [
        "CVCHAIN_EVENTS_QUEUE",
        "CVCHAIN_EVENTGRID_ENDPOINT",
        "CVCHAIN_EVENTGRID_KEY",
    ] {
        if std::env::var(name).is_ok_and(|v| !v.is_empty()) {
            from_env.push(name);
        }
    }
    if !from_env.is_empty() {
        out.push_str(&format!(
            "# also set, as in this shell's environment: {}\n",
            from_env.join(", ")
        ));
    }
    out
}

/// Writes the handed-over environment, readable by its owner only.
fn write_env_file(path: &Path, env: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = format!(
        "# cvchain dev --keep: the settings of the running demo; `source` this file.\n{env}"
    );
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// How a sink fared with the project's events: `12 of 12 delivered`, and what is not.
fn delivery_summary(rows: &[cvchain_core::events::OutboxRow], sink: Sink) -> String {
    use cvchain_core::events::delivery::State;
    let mine: Vec<_> = rows.iter().filter(|r| r.sinks.contains(&sink)).collect();
    let count = |s: State| mine.iter().filter(|r| r.state(sink).state == s).count();
    let (delivered, pending, failed) = (
        count(State::Delivered),
        count(State::Pending),
        count(State::Failed),
    );
    let mut text = format!("{delivered} of {} event(s) delivered", mine.len());
    if pending > 0 {
        text.push_str(&format!(", {pending} pending (`cvchain events` shows why)"));
    }
    if failed > 0 {
        text.push_str(&format!(
            ", {failed} failed (`cvchain events replay` sends them again)"
        ));
    }
    text
}

fn rand_u32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

/// One line per event worth telling.
fn describe(r: &HistoryRow) -> Option<String> {
    let p = &r.properties;
    let status = p.text(Prop::Status);
    let pct = |prop| {
        p.double(prop)
            .map(|v| format!("{:.1}%", v * 100.0))
            .unwrap_or_else(|| "-".into())
    };
    match r.kind() {
        Some(RowKind::Notification(Kind::ConnectionTest)) => {
            Some("  ✓ storage integration confirmed (ConnectionTest)".into())
        }
        Some(RowKind::Notification(Kind::Training)) => Some(format!(
            "  ✓ {} trained: precision {}, recall {}, mAP {}; gate {} ({})",
            p.text(Prop::IterationName),
            pct(Prop::Precision),
            pct(Prop::Recall),
            pct(Prop::AveragePrecision),
            p.text(Prop::GateVerdict),
            p.text(Prop::GateReasons)
        )),
        Some(RowKind::ChannelMove) if p.text(Prop::Platform).is_empty() => Some(format!(
            "  ★ production now follows {} ({})",
            p.text(Prop::IterationName),
            p.text(Prop::Reason)
        )),
        Some(RowKind::ChannelMove) => {
            let flavor = p.text(Prop::Flavor);
            let target = if flavor.is_empty() {
                p.text(Prop::Platform).to_owned()
            } else {
                format!("{}:{flavor}", p.text(Prop::Platform))
            };
            Some(format!(
                "  ★ {} {target} → {} ({})",
                p.text(Prop::Channel),
                p.text(Prop::IterationName),
                p.text(Prop::ChannelPath)
            ))
        }
        Some(RowKind::ExportStep) => {
            let step = StepRow::from_row(r);
            let target = match &step.target.flavor {
                None => step.target.platform.clone(),
                Some(f) => format!("{}:{f}", step.target.platform),
            };
            match (r.status(), &step.release_path) {
                (_, Some(path)) if step.release_url.is_some() => {
                    Some(format!("  ✓ {target} exported and released to {path}"))
                }
                (Some(RowStatus::Step(cvchain_core::chain::EntryState::Exporting)), _) => {
                    Some(format!("  → export {target} requested"))
                }
                (Some(RowStatus::Step(cvchain_core::chain::EntryState::Done)), _) => {
                    Some(format!("  ✓ {target} exported"))
                }
                _ => Some(format!("  ! {target}: {status} {}", step.reason)),
            }
        }
        Some(RowKind::Notification(Kind::Export) | RowKind::Claim | RowKind::Outbox) => None,
        other => Some(format!(
            "  · {}: {status}",
            other.map(RowKind::as_str).unwrap_or("row")
        )),
    }
}

fn progress(done: usize, total: usize) -> String {
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    format!(
        "  [{}{}] {done}/{total} exports released",
        "#".repeat(filled),
        "-".repeat(width - filled)
    )
}

/// A local Standard Webhooks receiver: verifies each request's signature with the secret it
/// shares with the worker, and prints the event.
struct LocalReceiver {
    url: String,
    secret: String,
    counts: std::sync::Arc<std::sync::Mutex<(usize, usize)>>,
}

impl LocalReceiver {
    async fn start() -> anyhow::Result<Self> {
        use axum::{
            Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post,
        };
        use cvchain_core::events::{CloudEvent, webhook};
        let mut random = Uuid::new_v4().as_bytes().to_vec();
        random.extend(Uuid::new_v4().as_bytes());
        let secret = webhook::secret_text(&random);
        let key = webhook::parse_secret(&secret).map_err(anyhow::Error::msg)?;
        let counts = std::sync::Arc::new(std::sync::Mutex::new((0usize, 0usize)));
        type Shared = (Vec<u8>, std::sync::Arc<std::sync::Mutex<(usize, usize)>>);
        async fn receive(
            State((key, counts)): State<Shared>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let verified = webhook::verify(
                &key,
                h("webhook-id"),
                h("webhook-timestamp"),
                h("webhook-signature"),
                &body,
                now,
            );
            let mut c = counts.lock().expect("counts");
            c.0 += 1;
            match (
                verified,
                CloudEvent::from_json(&String::from_utf8_lossy(&body)),
            ) {
                (Ok(()), Ok(e)) => {
                    let name = e
                        .data
                        .get("iterationName")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default();
                    let what = e
                        .data
                        .get("platform")
                        .and_then(|v| v.as_str())
                        .map(|p| format!(" {p}"))
                        .unwrap_or_default();
                    println!(
                        "    ⚑ event {}{what} ({name}) — signature verified",
                        e.kind.trim_start_matches("io.cvchain.")
                    );
                    StatusCode::NO_CONTENT
                }
                (Err(e), _) => {
                    c.1 += 1;
                    println!("    ✗ webhook request refused: {e}");
                    StatusCode::UNAUTHORIZED
                }
                (_, Err(e)) => {
                    c.1 += 1;
                    println!("    ✗ webhook request refused: {e}");
                    StatusCode::BAD_REQUEST
                }
            }
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}/events", listener.local_addr()?);
        let app = Router::new()
            .route("/events", post(receive))
            .with_state((key, counts.clone()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            secret,
            counts,
        })
    }

    /// Requests received, and how many were refused.
    fn counts(&self) -> (usize, usize) {
        *self.counts.lock().expect("counts")
    }
}
