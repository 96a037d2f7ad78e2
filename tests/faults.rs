//! Fault runs of 200 notifications each (40 projects: a ConnectionTest, a Training and three
//! Exports apiece), driven as the Functions host drives `cvchain serve`: storage stopped and
//! restarted mid-run, Custom Vision failing a fifth of its calls, the handler killed with SIGKILL
//! mid-invocation and restarted. After each, every notification is processed exactly once:
//! rows, export requests and release blobs are counted, and nothing is lost.

use cvchain_azure::storage::{clients::StorageClients, table::StoredEntity};
use cvchain_standin::{COMPACT_DOMAIN, Faults, Standin, StandinConfig};
use cvchain_testkit::{
    Azurite, Handler, HostEmulator, PumpStats, blob_bytes, standin_calls, unique,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "faults-training-key";
const PROJECTS: usize = 40;
const CHAIN: &str = "ONNX, TensorFlow:TensorFlowLite, DockerFile:Linux";
const EXPORTS: usize = PROJECTS * 3;

struct Fleet {
    azurite: Azurite,
    standin: Standin,
    handler: Handler,
    host: Arc<HostEmulator>,
    clients: StorageClients,
    table: String,
}

/// The fault runs are heavy (an Azurite, a stand-in and a handler each, 200 notifications):
/// run one at a time so that two cores are not shared five ways and leases stay meaningful.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn fleet() -> Fleet {
    fleet_with(false).await
}

/// What every fault run starts from: its own Azurite, a stand-in, a queue, a history table and
/// a backup container.
struct Ground {
    azurite: Azurite,
    clients: StorageClients,
    standin: Standin,
    queue: String,
    table: String,
    backup: String,
}

impl Ground {
    async fn new() -> Self {
        let azurite = Azurite::start();
        let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
        let standin = Standin::start(StandinConfig {
            model_size: 4096,
            // The faults under test are the injected ones, at 1000 calls a second: the
            // resource's own limit would make these runs minutes longer than their deadlines.
            // Its 429s have tests of their own (customvision_client.rs, the rate benchmark).
            rate_limit: None,
            ..cvchain_testkit::standin_config(&clients, KEY, 20)
        })
        .await
        .unwrap();
        Self {
            backup: azurite.container_url("cvbackups"),
            queue: unique("fq"),
            table: unique("History"),
            azurite,
            clients,
            standin,
        }
    }

    /// The handler's and workers' settings: short claims, leases and polls.
    fn env(&self, chain: &str, max_dequeue: u32) -> Vec<(&'static str, String)> {
        vec![
            ("CVCHAIN_STORAGE", self.azurite.connection_string()),
            ("CVCHAIN_QUEUE", self.queue.clone()),
            ("CVCHAIN_HISTORY_TABLE", self.table.clone()),
            ("CUSTOM_VISION_ENDPOINT", self.standin.endpoint()),
            ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
            ("CVCHAIN_EXPORTS", chain.into()),
            ("CVCHAIN_BACKUP_CONTAINER", self.backup.clone()),
            ("CVCHAIN_CV_MAX_RPS", "1000".into()),
            ("CVCHAIN_CLAIM_SECONDS", "3".into()),
            ("CVCHAIN_MAX_DEQUEUE", max_dequeue.to_string()),
            ("RUST_LOG", "warn".into()),
            ("CVCHAIN_WORKER_VISIBILITY_SECONDS", "10".into()),
            ("CVCHAIN_WORKER_RETRY_SECONDS", "1".into()),
            ("CVCHAIN_WORKER_MAX_POLL_SECONDS", "1".into()),
        ]
    }
}

/// With `worker`, `cvchain worker` consumes the queue itself instead of serve + the host.
async fn fleet_with(worker: bool) -> Fleet {
    let ground = Ground::new().await;
    let env = &ground.env(CHAIN, 20)[..];
    let Ground {
        azurite,
        clients,
        standin,
        queue,
        table,
        backup,
    } = ground;
    let handler = if worker {
        Handler::start_worker(env)
    } else {
        Handler::start(env)
    };
    let mut host = HostEmulator::new(&clients, &queue, handler.url(""));
    host.max_dequeue = 20;
    host.visibility_seconds = 1;
    // 40 projects wired to the queue and the backup container, each trained once.
    let api = cvchain_testkit::StandinApi::with_storage(&standin.endpoint(), KEY, &clients);
    let queue_uri = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{queue}",
        azurite.queue_port
    );
    for n in 0..PROJECTS {
        let name = format!("Project {n}");
        let pid = api
            .create_project(&[
                ("name", name.as_str()),
                ("domainId", COMPACT_DOMAIN),
                ("notificationQueueUri", queue_uri.as_str()),
                ("exportModelContainerUri", backup.as_str()),
            ])
            .await;
        api.train(pid).await;
    }
    Fleet {
        azurite,
        standin,
        handler,
        host: Arc::new(host),
        clients,
        table,
    }
}

impl Fleet {
    async fn rows(&self) -> Vec<StoredEntity> {
        self.clients
            .table(&self.table)
            .unwrap()
            .query(None, 100_000)
            .await
            .unwrap_or_default()
    }

    /// Done when every export has its notification row and its release recorded.
    async fn done(&self) -> bool {
        let rows = self.rows().await;
        let count = |kind: &str| {
            rows.iter()
                .filter(|r| r.entity["EventType"] == kind && !r.entity.contains_key("SameEventAs"))
                .count()
        };
        let released = rows
            .iter()
            .filter(|r| {
                r.entity["EventType"] == "ExportStep" && r.entity.contains_key("ReleaseUrl")
            })
            .count();
        count("Export") == EXPORTS && released == EXPORTS
    }

    /// Rounds until done; `fault` runs once, when `at` notifications have completed.
    async fn run<F, Fut>(&mut self, at: u32, fault: F) -> PumpStats
    where
        F: FnOnce(&mut Fleet) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut stats = PumpStats::default();
        let mut fault = Some(fault);
        let start = Instant::now();
        loop {
            let n = self.host.round(&mut stats).await;
            if stats.completed >= at
                && let Some(f) = fault.take()
            {
                f(self).await;
            }
            if n == 0 && fault.is_none() && self.done().await {
                return stats;
            }
            if start.elapsed() > Duration::from_secs(240) {
                let log = self.handler.stderr();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!("the run did not finish: {stats:?}\n{}", tail.join("\n"));
            }
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// With the worker consuming the queue: waits until done, applying `fault` once when `at`
    /// Export rows exist.
    async fn run_worker<F, Fut>(&mut self, at: usize, fault: F)
    where
        F: FnOnce(&mut Fleet) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut fault = Some(fault);
        let start = Instant::now();
        loop {
            let exports = self
                .rows()
                .await
                .iter()
                .filter(|r| r.entity["EventType"] == "Export")
                .count();
            if exports >= at
                && let Some(f) = fault.take()
            {
                f(self).await;
            }
            if fault.is_none() && self.done().await {
                // Let the worker finish deleting what it processed.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return;
            }
            if start.elapsed() > Duration::from_secs(240) {
                let log = self.handler.stderr();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!("the worker did not finish\n{}", tail.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Everything happened exactly once, and nothing is missing.
    async fn assert_exactly_once(&self) {
        let rows = self.rows().await;
        // A notification the producer sent twice (its queue write retried while storage was
        // away) is a second message: it has a row of its own that names the first and says the
        // texts agree. Each event is counted once, under its own key.
        let (events, seconds): (Vec<&StoredEntity>, Vec<&StoredEntity>) = rows
            .iter()
            .partition(|r| !r.entity.contains_key("SameEventAs"));
        for s in &seconds {
            assert!(
                s.entity["Disagreement"]
                    .as_str()
                    .is_some_and(|d| d.ends_with("the same text under another message id")),
                "a second message that disagrees: {s:?}"
            );
        }
        let of = |kind: &str| -> Vec<&StoredEntity> {
            events
                .iter()
                .copied()
                .filter(|r| r.entity["EventType"] == kind)
                .collect()
        };
        assert_eq!(of("ConnectionTest").len(), PROJECTS, "ConnectionTest rows");
        assert_eq!(of("Training").len(), PROJECTS, "Training rows");
        assert_eq!(of("Export").len(), EXPORTS, "Export rows");
        let steps = of("ExportStep");
        assert_eq!(steps.len(), EXPORTS, "export step rows");
        assert!(
            steps.iter().all(|s| s.entity["Status"] == "Done"),
            "steps all done"
        );
        for kind in ["Rejected", "Failed", "Unknown"] {
            assert!(of(kind).is_empty(), "{kind} rows: {:?}", of(kind));
        }
        // A holder killed after its work was done may leave its claim behind: harmless, it
        // expires (CVCHAIN_CLAIM_SECONDS = 3 here) and the next contender takes it over.
        let horizon = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
        for c in of("Claim") {
            let at =
                cvchain_core::history::parse_service_time(c.entity["ExpiresAt"].as_str().unwrap())
                    .unwrap();
            assert!(at <= horizon, "a claim that does not expire: {c:?}");
        }

        let calls = standin_calls(&self.standin.endpoint()).await;
        let accepted: Vec<_> = calls
            .exports
            .iter()
            .filter(|e| e.outcome == "accepted")
            .collect();
        assert_eq!(accepted.len(), EXPORTS, "accepted export requests");
        let unique: HashSet<_> = accepted
            .iter()
            .map(|e| (e.iteration_id, e.platform.clone(), e.flavor.clone()))
            .collect();
        assert_eq!(unique.len(), EXPORTS, "an export was requested twice");
        let repeated = calls
            .exports
            .iter()
            .filter(|e| e.outcome == "alreadyInProgress")
            .count();
        assert_eq!(repeated, 0, "requests the service had to refuse as repeats");

        // One release blob per export, found by its tags, equal to its backup.
        use futures::TryStreamExt;
        let service = self.clients.blob_service().unwrap();
        let mut pages = service
            .find_blobs_by_tags("\"source\"='customvision'", None)
            .unwrap()
            .into_pages();
        let mut releases: HashSet<String> = HashSet::new();
        let mut channels: HashSet<String> = HashSet::new();
        while let Some(page) = pages.try_next().await.unwrap() {
            for item in page.into_model().unwrap().blob_items {
                if item.container_name.as_deref() == Some("models") {
                    let name = item.name.clone().unwrap();
                    if name.contains("/channels/") {
                        channels.insert(name);
                    } else {
                        releases.insert(name);
                    }
                }
            }
        }
        assert_eq!(releases.len(), EXPORTS, "release blobs");
        // One iteration per project, no gate: `latest` and `production` each hold every export.
        assert_eq!(channels.len(), 2 * EXPORTS, "channel copies");
        // Spot-check contents against the backups.
        for name in releases.iter().take(6) {
            let body = blob_bytes(&self.clients, "models", name).await;
            assert_eq!(body.len(), 4096, "{name}");
        }

        // Nothing lost: the queue and the poison queue are empty.
        let mut stats = PumpStats::default();
        assert_eq!(self.host.round(&mut stats).await, 0);
        let poison = self
            .host
            .poison
            .peek_messages(None)
            .await
            .ok()
            .and_then(|r| r.into_model().ok())
            .and_then(|m| m.items)
            .unwrap_or_default();
        assert!(poison.is_empty(), "poisoned: {poison:?}");

        // No key and no SAS signature in any log line or row.
        let secrets = [KEY, cvchain_azure::storage::settings::DEV_ACCOUNT_KEY];
        cvchain_testkit::assert_no_secrets("the handler's logs", &self.handler.stderr(), &secrets);
        let all =
            serde_json::to_string(&rows.iter().map(|r| &r.entity).collect::<Vec<_>>()).unwrap();
        cvchain_testkit::assert_no_secrets("the history rows", &all, &secrets);
    }
}

#[tokio::test]
async fn storage_stopped_and_restarted_mid_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut f = fleet().await;
    let mut stats = PumpStats::default();
    while stats.completed < 60 {
        if f.host.round(&mut stats).await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Storage goes away while a batch is in flight, and stays away for three seconds.
    let host = f.host.clone();
    let batch = tokio::spawn(async move {
        let mut s = PumpStats::default();
        host.round(&mut s).await;
        s
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    f.azurite.stop();
    let cut = batch.await.unwrap();
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        f.host.round(&mut stats).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f.azurite.restart();
    let rest = f.run(0, |_| async {}).await;
    let _ = (cut, rest);
    f.assert_exactly_once().await;
}

#[tokio::test]
async fn custom_vision_failing_a_fifth_of_its_calls() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut f = fleet().await;
    f.standin.set_faults(Faults {
        failure_rate: 0.2,
        retry_after_seconds: 0,
        slow_rate: 0.05,
        slow_ms: 300,
        ..Default::default()
    });
    let stats = f.run(0, |_| async {}).await;
    let calls = standin_calls(&f.standin.endpoint()).await;
    assert!(
        calls.faults.values().sum::<u64>() > 50,
        "too few faults injected: {:?}",
        calls.faults
    );
    let _ = stats;
    f.assert_exactly_once().await;
}

#[tokio::test]
async fn the_handler_killed_mid_invocation_and_restarted() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut f = fleet().await;
    let mut stats = PumpStats::default();
    // Let the run get going, then kill the handler while a batch is in flight.
    while stats.completed < 50 {
        if f.host.round(&mut stats).await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for _ in 0..3 {
        let host = f.host.clone();
        let batch = tokio::spawn(async move {
            let mut s = PumpStats::default();
            host.round(&mut s).await;
            s
        });
        tokio::time::sleep(Duration::from_millis(15)).await;
        f.handler.kill9();
        let s = batch.await.unwrap();
        stats.failures += s.failures;
        f.handler.restart();
    }
    let rest = f.run(0, |_| async {}).await;
    assert!(
        stats.failures + rest.failures > 0,
        "no invocation was cut off"
    );
    f.assert_exactly_once().await;
}

#[tokio::test]
async fn the_worker_with_a_flaky_custom_vision() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut f = fleet_with(true).await;
    f.standin.set_faults(Faults {
        failure_rate: 0.2,
        retry_after_seconds: 0,
        slow_rate: 0.05,
        slow_ms: 300,
        ..Default::default()
    });
    f.run_worker(0, |_| async {}).await;
    f.assert_exactly_once().await;
}

#[tokio::test]
async fn the_worker_killed_mid_message_and_restarted() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut f = fleet_with(true).await;
    f.run_worker(20, |f| {
        f.handler.kill9();
        f.handler.restart();
        async {}
    })
    .await;
    f.assert_exactly_once().await;
}

/// Long copies (issue 17): a fault proxy in front of Azurite's blob port keeps every copy
/// `pending` for two seconds, twice the one-second claims, then lets it succeed, fail
/// or abort. Two `cvchain serve` instances share the queue, and redeliveries come while copies
/// run. cvchain polls each copy to its end, renews its claim meanwhile (no claim is ever taken
/// over), never starts a second copy into a destination whose copy is running, copies again
/// after a failed or aborted copy, records each release once, and gives a message up as
/// documented when its copy keeps failing: the last failure in `_failed`, the message poisoned.
#[tokio::test]
async fn long_copies_pending_failing_and_aborted_across_two_instances() {
    use cvchain_testkit::{CopyEnd, CopyFaults, CopyProxy};
    // A redelivery that finds a live invocation copying answers "not ready", and that costs a
    // dequeue: the window before a message is given up (here some 8 × 3 s, the host's default
    // being 5 × 30 s) has to outlast a copy that fails once and is redone with its claim held
    // (two polled 2 s copies, some 7 s when idle, twice that on a loaded 2-core machine).
    const MAX_DEQUEUE: i64 = 8;
    let _one = ONE_AT_A_TIME.lock().await;
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let proxy = CopyProxy::start(
        azurite.blob_port,
        CopyFaults {
            pending_for: Duration::from_secs(2),
            rules: vec![
                ("Fail-once".into(), vec![CopyEnd::Failed, CopyEnd::Success]),
                (
                    "Abort-once".into(),
                    vec![CopyEnd::Aborted, CopyEnd::Success],
                ),
                ("Always-fails".into(), vec![CopyEnd::Failed]),
            ],
        },
    );
    let queue = unique("lq");
    let table = unique("History");
    let backup = azurite.container_url("cvbackups");
    let standin = Standin::start(StandinConfig {
        model_size: 4096,
        ..cvchain_testkit::standin_config(&clients, KEY, 50)
    })
    .await
    .unwrap();
    let env = [
        ("CVCHAIN_STORAGE", proxy.connection_string(&azurite)),
        ("CVCHAIN_QUEUE", queue.clone()),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", "ONNX".into()),
        ("CVCHAIN_BACKUP_CONTAINER", backup.clone()),
        ("CVCHAIN_CV_MAX_RPS", "1000".into()),
        // Short, so claims are renewed several times in each copy, with a margin for a storage
        // round trip on a loaded machine (a renewal is due with two thirds of the life left).
        ("CVCHAIN_CLAIM_SECONDS", "2".into()),
        ("CVCHAIN_MAX_DEQUEUE", MAX_DEQUEUE.to_string()),
        ("RUST_LOG", "warn".into()),
    ];
    let handlers = [Handler::start(&env), Handler::start(&env)];
    let hosts: Vec<Arc<HostEmulator>> = handlers
        .iter()
        .map(|h| {
            let mut host = HostEmulator::new(&clients, &queue, h.url(""));
            host.max_dequeue = MAX_DEQUEUE;
            host.visibility_seconds = 3;
            Arc::new(host)
        })
        .collect();
    let api = cvchain_testkit::StandinApi::with_storage(&standin.endpoint(), KEY, &clients);
    let queue_uri = azurite.queue_url(&queue);
    let mut projects = Vec::new();
    for name in [
        "Fine 1",
        "Fine 2",
        "Fail-once",
        "Abort-once",
        "Always-fails",
    ] {
        let p = api
            .create_project(&[
                ("name", name),
                ("domainId", COMPACT_DOMAIN),
                ("notificationQueueUri", &queue_uri),
                ("exportModelContainerUri", &backup),
            ])
            .await;
        let i = api.train(p).await;
        projects.push((name, p, i));
    }
    let rows = || async {
        clients
            .table(&table)
            .unwrap()
            .query(None, 10_000)
            .await
            .unwrap_or_default()
    };
    let released = |rows: &[StoredEntity], p: uuid::Uuid| {
        rows.iter().any(|r| {
            r.entity["PartitionKey"] == p.to_string()
                && r.entity["EventType"] == "ExportStep"
                && r.entity.contains_key("ReleaseUrl")
        })
    };
    // Both channels (`latest`, `production`: no gate) follow each release, copied through
    // the same proxy: their copies are slow, fail and are aborted as the release copies are.
    let moved = |rows: &[StoredEntity], p: uuid::Uuid| {
        rows.iter()
            .filter(|r| {
                r.entity["PartitionKey"] == p.to_string()
                    && r.entity["EventType"] == "ChannelMove"
                    && r.entity.contains_key("ChannelPath")
            })
            .count()
    };
    // Each instance's host pumps on its own, as two hosts do: a message that becomes visible
    // again while one instance still works on it goes to whichever asks first.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pumps: Vec<_> = hosts
        .iter()
        .map(|host| {
            let (host, stop) = (host.clone(), stop.clone());
            tokio::spawn(async move {
                let mut stats = PumpStats::default();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if host.round(&mut stats).await == 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                stats
            })
        })
        .collect();
    let start = Instant::now();
    loop {
        let now = rows().await;
        let given_up = now.iter().any(|r| r.entity["PartitionKey"] == "_failed");
        if given_up
            && projects[..4]
                .iter()
                .all(|(_, p, _)| released(&now, *p) && moved(&now, *p) == 2)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run did not finish\n{:?}\n{:?}\n{}\n{}",
            now.iter()
                .map(|r| format!("{} {}", r.entity["PartitionKey"], r.entity["RowKey"]))
                .collect::<Vec<_>>(),
            proxy.log(),
            handlers[0].stderr(),
            handlers[1].stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pumps {
        p.await.unwrap();
    }
    // Let any delivery still in flight end.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = rows().await;
    let log = proxy.log();
    let starts = log.starts();
    // Copies started into a project's release path, or into its two channel paths.
    let starts_in = |name: &str, channels: bool| -> usize {
        starts
            .iter()
            .filter(|(dest, _)| {
                let dest = dest.replace("%2F", "/");
                dest.contains(&format!("/models/{name}/"))
                    && dest.contains("/channels/") == channels
            })
            .map(|(_, n)| *n)
            .sum()
    };
    let starts_of = |name: &str| starts_in(name, false);
    // Polled while pending; never a second copy into a destination whose copy was running.
    assert!(log.polls_while_pending > 0, "{log:?}");
    // Release copies are claimed, so no second Copy Blob is even asked for. Channel copies
    // are guarded by conditional requests instead (no claim: two requests fewer per move): a
    // redelivery's copy into a channel path whose copy is running is refused by the service
    // (409 `PendingCopyOperation`), and cvchain then waits for that copy; the counts below show
    // no channel copy ran twice.
    assert!(
        log.refused.iter().all(|d| d.contains("%2Fchannels%2F")),
        "{log:?}"
    );
    // One copy per model, and one more after each failed or aborted copy.
    assert_eq!(starts_of("Fine-1"), 1, "{starts:?}");
    assert_eq!(starts_of("Fine-2"), 1, "{starts:?}");
    assert_eq!(starts_of("Fail-once"), 2, "{starts:?}");
    assert_eq!(starts_of("Abort-once"), 2, "{starts:?}");
    assert!(starts_of("Always-fails") >= 1, "{starts:?}");
    // The same for each channel copy: a failed or aborted one is redone, never taken for
    // current although its metadata names the revision.
    assert_eq!(starts_in("Fine-1", true), 2, "{starts:?}");
    assert_eq!(starts_in("Fine-2", true), 2, "{starts:?}");
    assert_eq!(starts_in("Fail-once", true), 4, "{starts:?}");
    assert_eq!(starts_in("Abort-once", true), 4, "{starts:?}");
    assert_eq!(starts_in("Always-fails", true), 0, "{starts:?}");
    // Each release recorded once, on its step row; the models are the backups.
    for (name, p, i) in &projects[..4] {
        let steps: Vec<&StoredEntity> = rows
            .iter()
            .filter(|r| {
                r.entity["PartitionKey"] == p.to_string() && r.entity["EventType"] == "ExportStep"
            })
            .collect();
        assert_eq!(steps.len(), 1, "{name}: {steps:?}");
        let path = steps[0].entity["ReleasePath"].as_str().unwrap();
        let copy = blob_bytes(&clients, "models", path).await;
        let original = blob_bytes(&clients, "cvbackups", &format!("{p} - {i}.ONNX")).await;
        assert_eq!(copy, original, "{name}");
        for r in rows.iter().filter(|r| {
            r.entity["PartitionKey"] == p.to_string() && r.entity.contains_key("ChannelPath")
        }) {
            let path = r.entity["ChannelPath"].as_str().unwrap();
            let channel = blob_bytes(&clients, "models", path).await;
            assert_eq!(channel, original, "{name}: {path}");
        }
    }
    // The copy that keeps failing: the last delivery's failure recorded, the message poisoned,
    // no release recorded.
    let (_, p, _) = projects[4];
    assert!(!released(&rows, p));
    let failed: Vec<&StoredEntity> = rows
        .iter()
        .filter(|r| r.entity["PartitionKey"] == "_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].entity["Raw"]
            .as_str()
            .unwrap()
            .contains(&p.to_string())
    );
    let poison = hosts[0]
        .poison
        .peek_messages(None)
        .await
        .unwrap()
        .into_model()
        .unwrap()
        .items
        .unwrap_or_default();
    assert_eq!(poison.len(), 1, "{poison:?}");
    // The claims outlasted the copies: none was ever taken over from a live holder.
    for h in &handlers {
        let log = h.stderr();
        assert!(!log.contains("took over an expired claim"), "{log}");
        assert!(!log.contains("lapsed while its work ran"), "{log}");
        cvchain_testkit::assert_no_secrets(
            "the handler's logs",
            &log,
            &[KEY, cvchain_azure::storage::settings::DEV_ACCOUNT_KEY],
        );
    }
}

/// A copy that outlasts the delivery that started it (issue 17): the delivery gives up
/// waiting and is retried; the retry finds the copy still running and waits for it instead of
/// starting a second one, and then records the release.
#[tokio::test]
async fn a_copy_that_outlasts_its_delivery_is_resumed_not_restarted() {
    use cvchain_azure::storage::blobs::ReleaseStore;
    use cvchain_core::release::{
        DEFAULT_TEMPLATE, PathTemplate, ReleaseFacts, ReleaseNames, ReleasePlan, Source,
    };
    use cvchain_testkit::{CopyFaults, CopyProxy};
    let azurite = Azurite::start();
    let proxy = CopyProxy::start(
        azurite.blob_port,
        CopyFaults {
            pending_for: Duration::from_secs(3),
            rules: Vec::new(),
        },
    );
    let direct = StorageClients::new(&azurite.storage_settings()).unwrap();
    let through_proxy = StorageClients::new(
        &cvchain_azure::storage::settings::parse_connection_string(
            "CVCHAIN_STORAGE",
            &proxy.connection_string(&azurite),
        )
        .unwrap(),
    )
    .unwrap();
    let (p, i) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let backup = direct
        .blob_service()
        .unwrap()
        .blob_container_client("cvbackups");
    let _ = backup.create(None).await;
    let name = format!("{p} - {i}.ONNX");
    backup
        .blob_client(&name)
        .upload(
            azure_core::http::RequestContent::from(vec![7u8; 4096]),
            None,
        )
        .await
        .unwrap();
    let store = ReleaseStore::new(
        &through_proxy,
        "models",
        Some(url::Url::parse(&azurite.container_url("cvbackups")).unwrap()),
        PathTemplate::parse(DEFAULT_TEMPLATE).unwrap(),
    )
    .unwrap()
    .with_copy_timeout(Duration::from_secs(1));
    let plan = ReleasePlan {
        platform: "ONNX".into(),
        flavor: None,
        source: Source::Backup { blob_name: name },
        fallback: None,
        expect_free: false,
    };
    let names = ReleaseNames {
        project_id: p,
        project_name: "Slow".into(),
        iteration_id: i,
        iteration_name: "Iteration 1".into(),
        platform: "ONNX".into(),
        flavor: None,
    };
    let facts = ReleaseFacts::default();
    let first = store.release(&plan, &names, &facts).await;
    assert!(
        first
            .as_ref()
            .is_err_and(|e| e.to_string().contains("still pending")),
        "{first:?}"
    );
    let second = store.release(&plan, &names, &facts).await.unwrap();
    assert_eq!(second.path, "Slow/Iteration-1/ONNX.zip");
    let log = proxy.log();
    assert_eq!(log.copies.len(), 1, "{log:?}");
    assert_eq!(log.refused_while_pending, 0);
    assert!(log.polls_while_pending >= 2, "{log:?}");
    // A third delivery finds the copy current and writes nothing.
    let third = store.release(&plan, &names, &facts).await.unwrap();
    assert!(!third.copied);
    assert_eq!(proxy.log().copies.len(), 1);
}

/// Projects with one name (Custom Vision does not make names unique) racing their first
/// channel moves: eight projects named `Twin`, trained at the same moment, their notifications
/// taken by two `cvchain worker`s while Custom Vision fails a fifth of its calls, and the host's
/// give-up at its default five deliveries. Every plain channel path is wanted by all eight at
/// once; one gets each, the others take their id-qualified paths. Nothing is poisoned, every
/// export is requested once and released, no move fails, and every channel copy holds its own
/// project's model.
#[tokio::test]
async fn same_named_projects_racing_their_first_moves() {
    const TWINS: usize = 8;
    const TWO: &str = "ONNX, TensorFlow:TensorFlowLite";
    let _one = ONE_AT_A_TIME.lock().await;
    let ground = Ground::new().await;
    let Ground {
        azurite,
        clients,
        standin,
        queue,
        table,
        backup,
    } = &ground;
    let env = ground.env(TWO, 5);
    let workers = [Handler::start_worker(&env), Handler::start_worker(&env)];
    let api = cvchain_testkit::StandinApi::with_storage(&standin.endpoint(), KEY, clients);
    let queue_uri = azurite.queue_url(queue);
    let mut projects = Vec::new();
    for _ in 0..TWINS {
        projects.push(
            api.create_project(&[
                ("name", "Twin"),
                ("domainId", COMPACT_DOMAIN),
                ("notificationQueueUri", &queue_uri),
                ("exportModelContainerUri", backup),
            ])
            .await,
        );
    }
    standin.set_faults(Faults {
        failure_rate: 0.2,
        retry_after_seconds: 0,
        slow_rate: 0.05,
        slow_ms: 300,
        ..Default::default()
    });
    // The trainings end together, so the first moves do too.
    let iterations: Vec<uuid::Uuid> =
        futures::future::join_all(projects.iter().map(|p| api.train(*p))).await;
    let rows = || async {
        clients
            .table(table)
            .unwrap()
            .query(None, 10_000)
            .await
            .unwrap_or_default()
    };
    let of = |rows: &[StoredEntity], kind: &str| -> Vec<StoredEntity> {
        rows.iter()
            .filter(|r| {
                r.entity.get("EventType").and_then(|k| k.as_str()) == Some(kind)
                    && !r.entity.contains_key("SameEventAs")
            })
            .cloned()
            .collect()
    };
    let target_moves = |rows: &[StoredEntity]| -> Vec<StoredEntity> {
        of(rows, "ChannelMove")
            .into_iter()
            .filter(|r| {
                r.entity
                    .get("Platform")
                    .and_then(|p| p.as_str())
                    .is_some_and(|p| !p.is_empty())
            })
            .collect()
    };
    let start = Instant::now();
    let rows = loop {
        let now = rows().await;
        let released = of(&now, "ExportStep")
            .iter()
            .filter(|r| r.entity.contains_key("ReleaseUrl"))
            .count();
        if of(&now, "Export").len() == 2 * TWINS
            && released == 2 * TWINS
            && target_moves(&now).len() == 4 * TWINS
        {
            break now;
        }
        if start.elapsed() > Duration::from_secs(150) {
            let tails: Vec<String> = workers
                .iter()
                .map(|w| {
                    let log = w.stderr();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    tail.join("\n")
                })
                .collect();
            panic!(
                "the run did not finish: {} Export rows, {released} released, {} moves\n{}",
                of(&now, "Export").len(),
                target_moves(&now).len(),
                tails.join("\n--\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // Nothing poisoned, nothing failed, no move recorded as failed.
    let poison = clients
        .queue(&format!("{queue}-poison"))
        .unwrap()
        .peek_messages(None)
        .await
        .ok()
        .and_then(|r| r.into_model().ok())
        .and_then(|m| m.items)
        .unwrap_or_default();
    assert!(poison.is_empty(), "poisoned: {poison:?}");
    for kind in ["Failed", "Rejected", "ChannelMoveFailed"] {
        assert!(of(&rows, kind).is_empty(), "{kind}: {:?}", of(&rows, kind));
    }
    assert!(rows.iter().all(|r| r.entity["PartitionKey"] != "_failed"));
    // Every export requested once.
    let calls = standin_calls(&standin.endpoint()).await;
    let accepted: HashSet<_> = calls
        .exports
        .iter()
        .filter(|e| e.outcome == "accepted")
        .map(|e| (e.iteration_id, e.platform.clone()))
        .collect();
    assert_eq!(accepted.len(), 2 * TWINS, "{:?}", calls.exports);
    assert!(calls.faults.values().sum::<u64>() > 0, "no fault injected");
    // Each channel copy at a path of its own, holding its own project's model.
    let mut paths = HashSet::new();
    for (p, i) in projects.iter().zip(&iterations) {
        let moves: Vec<StoredEntity> = target_moves(&rows)
            .into_iter()
            .filter(|r| r.entity["PartitionKey"] == p.to_string())
            .collect();
        assert_eq!(moves.len(), 4, "{p}: {moves:?}");
        for m in moves {
            let path = m.entity["ChannelPath"].as_str().unwrap().to_owned();
            assert!(paths.insert(path.clone()), "two projects at {path}");
            let platform = m.entity["Platform"].as_str().unwrap();
            let release = of(&rows, "ExportStep")
                .into_iter()
                .find(|s| {
                    s.entity["PartitionKey"] == p.to_string() && s.entity["Platform"] == platform
                })
                .unwrap();
            let release = release.entity["ReleasePath"].as_str().unwrap().to_owned();
            let copy = clients
                .blob_service()
                .unwrap()
                .blob_container_client("models")
                .blob_client(&path);
            let meta = {
                use azure_storage_blob::models::BlobClientGetPropertiesResultHeaders;
                copy.get_properties(None).await.unwrap().metadata().unwrap()
            };
            assert_eq!(meta["projectid"], p.to_string(), "{path}");
            assert_eq!(meta["iterationid"], i.to_string(), "{path}");
            assert_eq!(
                blob_bytes(clients, "models", &path).await,
                blob_bytes(clients, "models", &release).await,
                "{path}"
            );
        }
    }
    // The plain paths went to one project each, the others to their own.
    assert!(paths.contains("Twin/channels/latest/ONNX.zip"), "{paths:?}");
    let _ = &workers;
}
