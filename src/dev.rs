//! `cvchain dev`: the whole chain on one machine. Starts Azurite from `node_modules` (unless
//! `CVCHAIN_STORAGE` is set), the Custom Vision stand-in and the worker; creates a demo project,
//! trains it, and lets the notifications drive the real chain, printing each event and a progress
//! bar; ends with the history and the release blobs.

use crate::customvision::standin::{COMPACT_DOMAIN, Standin, StandinConfig};
use crate::history::store::HistoryStore;
use crate::settings::{self, Settings};
use crate::storage::{connection::StorageClients, table::StoredEntity};
use anyhow::{Context, bail};
use azure_core::http::{Method, Request, Url, new_http_client};
use futures::TryStreamExt;
use serde_json::Value;
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

const DEMO_KEY: &str = "cvchain-dev-training-key";
const DEFAULT_CHAIN: &str = "ONNX, TensorFlow:TensorFlowLite, DockerFile:Linux";

/// Azurite started for the run; stopped (SIGTERM, so it saves its data) on drop.
struct LocalAzurite {
    child: Child,
    ports: [u16; 3],
}

impl Drop for LocalAzurite {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_azurite(root: &Path) -> anyhow::Result<LocalAzurite> {
    let exe = root.join("node_modules/.bin/azurite");
    if !exe.exists() {
        bail!(
            "Azurite is not installed at {}: run `npm ci` in the repository root (scripts/run-local does it)",
            exe.display()
        );
    }
    let data = root.join(".azurite");
    std::fs::create_dir_all(&data)?;
    let ports = [free_port()?, free_port()?, free_port()?];
    let child = Command::new(&exe)
        .args([
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--location",
        ])
        .arg(&data)
        .args(["--blobHost", "127.0.0.1", "--queueHost", "127.0.0.1"])
        .args(["--tableHost", "127.0.0.1"])
        .args(["--blobPort", &ports[0].to_string()])
        .args(["--queuePort", &ports[1].to_string()])
        .args(["--tablePort", &ports[2].to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let azurite = LocalAzurite { child, ports };
    for port in ports {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("Azurite did not open port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(azurite)
}

/// The settings of the run: the environment's, with local defaults filled in.
fn dev_settings(storage: &str, standin: &str, run: &str) -> anyhow::Result<Settings> {
    let blob = storage_blob_url(storage)?;
    let backup = format!("{}/cvbackups", blob.trim_end_matches('/'));
    let defaults: Vec<(String, String)> = vec![
        ("CVCHAIN_STORAGE".into(), storage.into()),
        ("CVCHAIN_QUEUE".into(), format!("cvchain-dev-{run}")),
        ("CVCHAIN_HISTORY_TABLE".into(), format!("CvchainDev{run}")),
        ("CUSTOM_VISION_ENDPOINT".into(), standin.into()),
        ("CUSTOM_VISION_TRAINING_KEY".into(), DEMO_KEY.into()),
        ("CVCHAIN_EXPORTS".into(), DEFAULT_CHAIN.into()),
        ("CVCHAIN_BACKUP_CONTAINER".into(), backup),
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
    Ok(settings::from_lookup(&lookup)?)
}

fn storage_blob_url(connection: &str) -> anyhow::Result<String> {
    let s = settings::parse_connection_string("CVCHAIN_STORAGE", connection)?;
    Ok(s.blob_endpoint.to_string())
}

async fn post_json(url: &str) -> anyhow::Result<Value> {
    let mut req = Request::new(Url::parse(url)?, Method::Post);
    req.insert_header("training-key", DEMO_KEY);
    req.set_body(Vec::new());
    let rsp = new_http_client(None).execute_request(&req).await?;
    let (status, _, body) = rsp.deconstruct();
    let body = body.collect().await?;
    if !status.is_success() {
        bail!("{url}: HTTP {}", u16::from(status));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Runs the demo; with `keep`, leaves everything running until Ctrl-C.
pub async fn run(root: PathBuf, keep: bool) -> anyhow::Result<()> {
    let run_id = format!("{:08x}", rand_u32());
    let (azurite, connection) = match std::env::var("CVCHAIN_STORAGE") {
        Ok(c) if !c.trim().is_empty() => {
            println!("● storage: CVCHAIN_STORAGE from the environment");
            (None, c)
        }
        _ => {
            let a = start_azurite(&root)?;
            let c = format!(
                "DefaultEndpointsProtocol=http;AccountName={acct};AccountKey={key};BlobEndpoint=http://127.0.0.1:{}/{acct};QueueEndpoint=http://127.0.0.1:{}/{acct};TableEndpoint=http://127.0.0.1:{}/{acct};",
                a.ports[0],
                a.ports[1],
                a.ports[2],
                acct = settings::DEV_ACCOUNT,
                key = settings::DEV_ACCOUNT_KEY,
            );
            println!(
                "● Azurite on 127.0.0.1:{}/{}/{} (data in .azurite/)",
                a.ports[0], a.ports[1], a.ports[2]
            );
            (Some(a), c)
        }
    };
    let bootstrap = settings::parse_connection_string("CVCHAIN_STORAGE", &connection)?;
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

    let settings = dev_settings(&connection, &standin.endpoint(), &run_id)?;
    let (clients, processor) = crate::process::build(&settings)?;
    let processor = Arc::new(processor);
    let (queue, poison) = crate::worker::queues(&settings, &clients)?;
    let mut options = settings::worker_options(&|k| std::env::var(k).ok(), settings.max_dequeue)?;
    options.max_poll = Duration::from_millis(500);
    options.retry_delay = Duration::from_secs(2);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(crate::worker::run(
        processor,
        queue,
        poison,
        options,
        async {
            let _ = stop_rx.await;
        },
    ));
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
    let api = format!("{}/customvision/v3.3/training", standin.endpoint());
    let project = post_json(&format!(
        "{api}/projects?name=Widget%20Detector&domainId={COMPACT_DOMAIN}&notificationQueueUri={}&exportModelContainerUri={}",
        enc(&queue_uri),
        enc(&backup)
    ))
    .await?;
    let pid = project["id"].as_str().unwrap_or_default().to_owned();
    println!("● project \"Widget Detector\" {pid} created; training…");
    post_json(&format!("{api}/projects/{pid}/train")).await?;

    let store = HistoryStore::new(clients.table(&settings.history_table)?);
    let total = settings.chain.exports.len();
    let started = Instant::now();
    let mut seen: HashSet<String> = HashSet::new();
    let mut last_bar = String::new();
    loop {
        let rows = crate::cli::history_rows(&store, Some(&pid), 1000).await?;
        let mut ordered = rows.clone();
        ordered.sort_by_key(|r| text(r, "Timestamp"));
        for r in &ordered {
            let key = format!("{}|{}", text(r, "RowKey"), text(r, "Status"));
            if seen.insert(key)
                && let Some(line) = describe(r)
            {
                println!("{line}");
            }
        }
        let released = rows
            .iter()
            .filter(|r| text(r, "EventType") == "ExportStep" && r.entity.contains_key("ReleaseUrl"))
            .count();
        let bar = progress(released, total);
        if bar != last_bar {
            println!("{bar}");
            last_bar = bar;
        }
        if released >= total && total > 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the chain did not finish within two minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "\n● chain complete in {:.1} s\n\nHistory ({}):",
        started.elapsed().as_secs_f64(),
        settings.history_table
    );
    let rows = crate::cli::history_rows(&store, Some(&pid), 1000).await?;
    print!(
        "{}",
        crate::report::render(&crate::report::iterations(&rows))
    );
    println!(
        "\nRelease blobs (container {}):",
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
    if keep {
        println!(
            "\n● still running (Ctrl-C stops). Point `func start --script-root dist/app` at the same storage with\n  CVCHAIN_STORAGE / AzureWebJobsStorage = the Azurite connection string (account {}, blob port {})",
            settings::DEV_ACCOUNT,
            azurite.as_ref().map(|a| a.ports[0]).unwrap_or(0)
        );
        crate::server::shutdown_signal().await;
    }
    let _ = stop_tx.send(());
    let _ = worker.await;
    drop(standin);
    drop(azurite);
    Ok(())
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn rand_u32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

fn text(r: &StoredEntity, k: &str) -> String {
    match r.entity.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

/// One line per event worth telling.
fn describe(r: &StoredEntity) -> Option<String> {
    let status = text(r, "Status");
    match text(r, "EventType").as_str() {
        "ConnectionTest" => Some("  ✓ storage integration confirmed (ConnectionTest)".into()),
        "Training" => Some(format!(
            "  ✓ {} trained: precision {}, recall {}, mAP {}",
            text(r, "IterationName"),
            pct(r, "Precision"),
            pct(r, "Recall"),
            pct(r, "AveragePrecision")
        )),
        "ExportStep" => {
            let target = match text(r, "Flavor").as_str() {
                "" => text(r, "Platform"),
                f => format!("{}:{f}", text(r, "Platform")),
            };
            match status.as_str() {
                "Exporting" => Some(format!("  → export {target} requested")),
                "Done" if r.entity.contains_key("ReleaseUrl") => Some(format!(
                    "  ✓ {target} exported and released to {}",
                    text(r, "ReleasePath")
                )),
                "Done" => Some(format!("  ✓ {target} exported")),
                other => Some(format!("  ! {target}: {other} {}", text(r, "Reason"))),
            }
        }
        "Export" | "Claim" => None,
        other => Some(format!("  · {other}: {status}")),
    }
}

fn pct(r: &StoredEntity, k: &str) -> String {
    r.entity
        .get(k)
        .and_then(Value::as_f64)
        .map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
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
