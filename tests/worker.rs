//! `cvchain worker`: the host's queue semantics without a host. The chain and fault runs are in
//! `tests/faults.rs` (the worker passes the same 200-notification suites as serve); these are
//! the worker's own duties: poison, retries, the lease, the drain.

use cvchain_azure::storage::{clients::StorageClients, queue::send_text, table::StoredEntity};
use cvchain_standin::{COMPACT_DOMAIN, Faults, Standin};
use cvchain_testkit::{Azurite, Handler, StandinApi, standin_calls, unique};
use std::time::{Duration, Instant};

const KEY: &str = "worker-key";

struct Setup {
    _azurite: Azurite,
    standin: Standin,
    worker: Handler,
    clients: StorageClients,
    queue: String,
    table: String,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let standin = Standin::start(cvchain_testkit::standin_config(&clients, KEY, 20))
        .await
        .unwrap();
    let queue = unique("wq");
    let table = unique("History");
    let mut env = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", queue.clone()),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", "ONNX".into()),
        ("CVCHAIN_WORKER_RETRY_SECONDS", "1".into()),
        ("CVCHAIN_WORKER_MAX_POLL_SECONDS", "1".into()),
    ];
    for (k, v) in extra {
        env.push((k, v.to_string()));
    }
    let worker = Handler::start_worker(&env);
    Setup {
        _azurite: azurite,
        standin,
        worker,
        clients,
        queue,
        table,
    }
}

impl Setup {
    async fn rows(&self) -> Vec<StoredEntity> {
        self.clients
            .table(&self.table)
            .unwrap()
            .query(None, 10_000)
            .await
            .unwrap_or_default()
    }

    async fn wait_for_row(&self, event: &str) -> StoredEntity {
        let start = Instant::now();
        loop {
            if let Some(r) = self
                .rows()
                .await
                .into_iter()
                .find(|r| r.entity["EventType"] == event)
            {
                return r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {event} row: {}",
                self.worker.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn poison(&self) -> Vec<String> {
        self.clients
            .queue(&format!("{}-poison", self.queue))
            .unwrap()
            .peek_messages(None)
            .await
            .ok()
            .and_then(|r| r.into_model().ok())
            .and_then(|m| m.items)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.message_text)
            .collect()
    }

    async fn queue_is_empty(&self) -> bool {
        self.clients
            .queue(&self.queue)
            .unwrap()
            .peek_messages(None)
            .await
            .ok()
            .and_then(|r| r.into_model().ok())
            .and_then(|m| m.items)
            .unwrap_or_default()
            .is_empty()
    }
}

#[tokio::test]
async fn a_malformed_message_is_recorded_copied_to_poison_and_removed() {
    let s = setup(&[]).await;
    send_text(&s.clients.queue(&s.queue).unwrap(), "{broken")
        .await
        .unwrap();
    let row = s.wait_for_row("Rejected").await;
    assert_eq!(row.entity["Raw"], "{broken");
    assert!(
        row.entity["Reason"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON")
    );
    // A message being processed is invisible, so an empty peek does not mean it is done: wait
    // for the poison copy too (it comes after the row).
    let start = Instant::now();
    while !s.queue_is_empty().await || s.poison().await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.poison().await, vec!["{broken".to_owned()]);
}

#[tokio::test]
async fn a_failing_message_is_retried_then_recorded_and_poisoned() {
    let s = setup(&[("CVCHAIN_MAX_DEQUEUE", "3")]).await;
    s.standin.set_faults(Faults {
        failure_rate: 1.0,
        throttle_share: Some(1.0),
        retry_after_seconds: 0,
        ..Default::default()
    });
    let message = format!(
        r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{}","iterationId":"{}","trainingStatus":"TrainingCompleted"}}}}"#,
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4()
    );
    send_text(&s.clients.queue(&s.queue).unwrap(), &message)
        .await
        .unwrap();
    let failed = s.wait_for_row("Failed").await;
    assert_eq!(failed.entity["DequeueCount"], 3);
    assert_eq!(failed.entity["Raw"], message);
    let start = Instant::now();
    while s.poison().await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.poison().await, vec![message]);
    assert!(s.queue_is_empty().await);
}

#[tokio::test]
async fn a_slow_message_keeps_its_lease_and_is_processed_once() {
    // A two-second lease, renewed every second, while processing takes several seconds.
    let s = setup(&[("CVCHAIN_WORKER_VISIBILITY_SECONDS", "2")]).await;
    let api = StandinApi::with_storage(&s.standin.endpoint(), KEY, &s.clients);
    let backup_less_queue = format!(
        "http://127.0.0.1:{}/devstoreaccount1/{}",
        s._azurite.queue_port, s.queue
    );
    let pid = api
        .create_project(&[
            ("name", "Slow"),
            ("domainId", COMPACT_DOMAIN),
            ("notificationQueueUri", backup_less_queue.as_str()),
        ])
        .await;
    s.wait_for_row("ConnectionTest").await;
    s.standin.set_faults(Faults {
        slow_rate: 1.0,
        slow_ms: 900,
        ..Default::default()
    });
    api.train(pid).await;
    let training = s.wait_for_row("Training").await;
    assert_eq!(training.entity["DequeueCount"], 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = standin_calls(&s.standin.endpoint()).await;
    assert_eq!(
        calls.counts.get("ExportIteration"),
        Some(&1),
        "{:?}",
        calls.counts
    );
    let log = s.worker.stderr();
    assert!(!log.contains("cannot delete a processed message"), "{log}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut s = setup(&[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = s
        .worker
        .signal_and_wait("TERM", Duration::from_secs(25))
        .expect("the worker exits after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(s.worker.stderr().contains("draining"));
}
