//! The Functions host's queue trigger, played against a running handler: its envelope, its
//! receive-POST-delete loop, its retries and its poison queue.

use cvchain_azure::storage::{clients::StorageClients, queue::send_text};
use std::time::{Duration, Instant};

/// The envelope the host POSTs for a queue message: the text JSON-encoded twice, numbers as
/// strings, `Id` and `PopReceipt` double-encoded, `sys` a real object.
pub fn host_envelope(message_text: &str, message_id: &str, dequeue_count: u32) -> String {
    let twice = |s: &str| serde_json::to_string(&serde_json::to_string(s).unwrap()).unwrap();
    format!(
        r#"{{"Data":{{"notification":{}}},"Metadata":{{"DequeueCount":"{dequeue_count}","ExpirationTime":"2026-12-03T10:00:00+00:00","Id":{},"InsertionTime":"2026-11-26T10:00:00+00:00","NextVisibleTime":"2026-11-26T10:10:00+00:00","PopReceipt":{},"sys":{{"MethodName":"CustomVisionNotification","RandGuid":"e59556b5-0000-0000-0000-000000000000","UtcNow":"2026-11-26T10:00:00.1234567Z"}}}}}}"#,
        twice(message_text),
        twice(message_id),
        twice("MThGZWIyMDI1MDM6MDY6MjA3NjM1"),
    )
}

/// Up to 16 messages of a queue, deleted from it: `(text, id)` each. Tests read what the
/// stand-in notified this way and deliver it themselves.
pub async fn take_messages(clients: &StorageClients, queue: &str) -> Vec<(String, String)> {
    use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
    let q = clients.queue(queue).unwrap();
    let got = q
        .receive_messages(Some(QueueClientReceiveMessagesOptions {
            number_of_messages: Some(16),
            visibility_timeout: Some(30),
            ..Default::default()
        }))
        .await
        .ok()
        .and_then(|r| r.into_model().ok())
        .and_then(|m| m.items)
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in got {
        let id = m.message_id.clone().unwrap();
        q.delete_message(&id, m.pop_receipt.as_deref().unwrap(), None)
            .await
            .unwrap();
        out.push((m.message_text.unwrap_or_default(), id));
    }
    out
}

/// One message to two `serve` instances at the same moment, then to each until it succeeds and
/// once more after that: three deliveries or more, as a host retrying makes them. A non-2xx
/// (the other instance holds a claim) is retried, as the host would.
pub async fn deliver_to_both(a: &crate::Handler, b: &crate::Handler, text: &str, id: &str) {
    let http = reqwest::Client::new();
    let post = |h: &crate::Handler, n: u32| {
        http.post(h.url("/CustomVisionNotification"))
            .header("content-type", "application/json")
            .body(host_envelope(text, id, n))
            .send()
    };
    let (ra, rb) = tokio::join!(post(a, 1), post(b, 1));
    let mut count = 1;
    let mut ok = [
        ra.unwrap().status().is_success(),
        rb.unwrap().status().is_success(),
    ];
    for (i, h) in [a, b].into_iter().enumerate() {
        // Until it succeeds, then once more (a redelivery).
        let mut extra = 1;
        while !ok[i] || extra > 0 {
            count += 1;
            // About a minute: an instance may wait out the resource's limit (429, Retry-After)
            // while the other holds the claim.
            assert!(count < 400, "message {id} kept failing");
            let r = post(h, count).await.unwrap();
            if r.status().is_success() {
                if ok[i] {
                    extra -= 1;
                }
                ok[i] = true;
            } else {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    }
}

/// Plays the Functions host's queue trigger against a running handler: receives messages with a
/// visibility lease, POSTs each as the host does, deletes on 2xx, leaves it for a retry on
/// non-2xx, and moves it to `<queue>-poison` once `DequeueCount` reaches `max_dequeue`.
pub struct HostEmulator {
    pub queue: azure_storage_queue::QueueClient,
    pub poison: azure_storage_queue::QueueClient,
    pub handler_url: String,
    pub http: reqwest::Client,
    pub max_dequeue: i64,
    /// How many times each message is POSTed before it is deleted (1 = the host's normal case;
    /// more plays redeliveries).
    pub deliveries: u32,
    pub visibility_seconds: i32,
    /// Every message completed, as (text, id), in order.
    pub completed: std::sync::Mutex<Vec<(String, String)>>,
}

/// What a pump did.
#[derive(Debug, Default, Clone)]
pub struct PumpStats {
    pub posts: u32,
    pub failures: u32,
    pub completed: u32,
    pub poisoned: u32,
}

impl HostEmulator {
    pub fn new(clients: &StorageClients, queue: &str, handler_url: String) -> Self {
        Self {
            queue: clients.queue(queue).unwrap(),
            poison: clients.queue(&format!("{queue}-poison")).unwrap(),
            handler_url,
            http: reqwest::Client::new(),
            max_dequeue: 5,
            deliveries: 1,
            visibility_seconds: 2,
            completed: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// One receive-and-deliver round; returns how many messages it saw.
    pub async fn round(&self, stats: &mut PumpStats) -> usize {
        use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
        let got = match self
            .queue
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(16),
                visibility_timeout: Some(self.visibility_seconds),
                ..Default::default()
            }))
            .await
        {
            Ok(rsp) => rsp.into_model().unwrap(),
            // No queue yet, or storage down: the host just polls again later.
            Err(_) => return 0,
        };
        let messages = got.items.unwrap_or_default();
        let n = messages.len();
        // The host runs a batch's invocations concurrently.
        let outcomes =
            futures::future::join_all(messages.into_iter().map(|m| self.deliver(m))).await;
        for o in outcomes {
            stats.posts += o.posts;
            stats.failures += o.failures;
            stats.completed += o.completed;
            stats.poisoned += o.poisoned;
        }
        n
    }

    /// One message, as the host handles it: POST, then delete, retry later or poison.
    async fn deliver(&self, m: azure_storage_queue::models::ReceivedMessage) -> PumpStats {
        let mut stats = PumpStats::default();
        {
            let text = m.message_text.clone().unwrap_or_default();
            let id = m.message_id.clone().unwrap_or_default();
            let pop = m.pop_receipt.clone().unwrap_or_default();
            let count = m.dequeue_count.unwrap_or(1);
            let mut ok = false;
            for extra in 0..self.deliveries {
                let body = host_envelope(&text, &id, (count as u32) + extra);
                let rsp = self
                    .http
                    .post(format!("{}/CustomVisionNotification", self.handler_url))
                    .header("content-type", "application/json; charset=utf-8")
                    .body(body)
                    .send()
                    .await;
                stats.posts += 1;
                ok = matches!(&rsp, Ok(r) if r.status().is_success());
                if !ok {
                    stats.failures += 1;
                    break;
                }
            }
            if ok {
                // A failed delete (storage down) only means a redelivery later.
                if self.queue.delete_message(&id, &pop, None).await.is_ok() {
                    self.completed
                        .lock()
                        .unwrap()
                        .push((text.clone(), id.clone()));
                }
                stats.completed += 1;
            } else if count >= self.max_dequeue && send_text(&self.poison, &text).await.is_ok() {
                let _ = self.queue.delete_message(&id, &pop, None).await;
                stats.poisoned += 1;
            }
        }
        stats
    }

    /// POSTs a message again, as a redelivery would; returns the HTTP status.
    pub async fn redeliver(&self, text: &str, id: &str, dequeue_count: u32) -> u16 {
        self.http
            .post(format!("{}/CustomVisionNotification", self.handler_url))
            .header("content-type", "application/json; charset=utf-8")
            .body(host_envelope(text, id, dequeue_count))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Pumps until `done()` holds after a round, or `timeout` passes.
    pub async fn pump_until<F, Fut>(&self, timeout: Duration, mut done: F) -> PumpStats
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut stats = PumpStats::default();
        let start = Instant::now();
        loop {
            let n = self.round(&mut stats).await;
            if done().await {
                return stats;
            }
            assert!(
                start.elapsed() < timeout,
                "gave up after {timeout:?}: {stats:?}"
            );
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
