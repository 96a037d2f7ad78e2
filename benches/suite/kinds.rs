//! What each kind of invocation costs, as a Flex Consumption bill and the next export's delay
//! see it: one `serve`, warm, a 3-entry chain, each figure one invocation as the host sends it
//! (duration of the POST, storage requests in Azurite's log, Custom Vision calls in the
//! stand-in's count), median over `rounds` projects. Only cvchain's storage requests count: the
//! stand-in's (it writes models and notifications as the service does) and the benchmark's own
//! carry other application ids in their `User-Agent`. With `CVCHAIN_BENCH_BEFORE_BIN` (a cvchain
//! binary built from an earlier revision, see `scripts/bench`), the same rounds run against it
//! too, alternating, each on an Azurite and stand-in of its own.

use crate::calls;
use crate::workload::{Env, KEY};
use cvchain_azure::storage::settings::DEV_ACCOUNT;
use cvchain_standin::COMPACT_DOMAIN;
use cvchain_testkit::{Handler, StandinApi, host_envelope, unique};
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The invocations of one project, in the order the chain makes them.
pub const KINDS: [(&str, &str); 7] = [
    ("ConnectionTest", "reported"),
    (
        "TrainingCompleted (requests the first export)",
        "≤ 60 ms, ≤ 5 CV calls",
    ),
    ("the same, redelivered", "≤ 20 ms, ≤ 1 CV call, ≤ 2 storage"),
    (
        "ExportCompleted, first export (copy + next request)",
        "≤ 80 ms, ≤ 10 storage",
    ),
    ("ExportCompleted, second export", "≤ 80 ms, ≤ 10 storage"),
    ("ExportCompleted, third export", "≤ 80 ms, ≤ 10 storage"),
    (
        "ExportCompleted, redelivered",
        "≤ 20 ms, ≤ 1 CV call, ≤ 2 storage",
    ),
];

/// One invocation's cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub duration: Duration,
    pub storage: usize,
    pub cv: u64,
}

/// A `serve` on an environment of its own.
pub struct Runner {
    pub env: Env,
    pub handler: Handler,
    http: reqwest::Client,
}

impl Runner {
    pub async fn start(bin: Option<&Path>) -> Self {
        Self::start_with(bin, &[]).await
    }

    /// As `start`, with more settings (telemetry's).
    pub async fn start_with(bin: Option<&Path>, extra: &[(&'static str, String)]) -> Self {
        let env = Env::start(true).await;
        let mut settings = env.settings("10");
        settings.extend(extra.iter().cloned());
        let vars: Vec<(&str, String)> = settings.iter().map(|(k, v)| (*k, v.clone())).collect();
        let handler = tokio::task::block_in_place(|| match bin {
            Some(b) => Handler::start_with(b, "serve", &vars),
            None => Handler::start(&vars),
        });
        Self {
            env,
            handler,
            http: reqwest::Client::new(),
        }
    }

    fn cv_total(&self) -> u64 {
        self.env.standin.calls().counts.values().sum()
    }

    /// Delivers one message as the host does and measures what it cost.
    async fn deliver(&self, text: &str, id: &str, dequeue: u32) -> Sample {
        let log = self.env.azurite.debug_log.as_ref().unwrap();
        // What came before (taking the message off the queue) is in the log by now.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (_, from) = calls::requests_since(log, 0);
        let cv0 = self.cv_total();
        let started = Instant::now();
        for attempt in 0..20 {
            let rsp = self
                .http
                .post(self.handler.url("/CustomVisionNotification"))
                .header("content-type", "application/json; charset=utf-8")
                .body(host_envelope(text, id, dequeue + attempt))
                .send()
                .await
                .unwrap();
            if rsp.status().is_success() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let duration = started.elapsed();
        // Azurite writes its log a moment after it answers.
        tokio::time::sleep(Duration::from_millis(150)).await;
        // cvchain's own requests: the stand-in and this harness name other applications.
        let (kinds, _) = calls::requests_but(log, from, &["cvchain-standin", "cvchain-bench"]);
        if std::env::var("CVCHAIN_BENCH_KINDS_DEBUG").is_ok() {
            eprintln!("{text:.60}… {:?}", calls::tally(&kinds));
        }
        Sample {
            duration,
            storage: kinds.len(),
            cv: self.cv_total() - cv0,
        }
    }

    /// The next message of `project` on `queue`, taken off it.
    async fn next_message(&self, queue: &str, wanted: &str) -> (String, String) {
        let q = self.env.clients.queue(queue).unwrap();
        let started = Instant::now();
        loop {
            let got = q
                .receive_messages(None)
                .await
                .ok()
                .and_then(|r| r.into_model().ok())
                .and_then(|m| m.items)
                .unwrap_or_default();
            for m in got {
                let text = m.message_text.clone().unwrap_or_default();
                let id = m.message_id.clone().unwrap();
                q.delete_message(&id, m.pop_receipt.as_deref().unwrap(), None)
                    .await
                    .unwrap();
                if text.contains(wanted) {
                    return (text, id);
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no {wanted} message"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One project through the whole chain, each invocation measured.
    pub async fn round(&self) -> [Sample; 7] {
        let api = StandinApi::with_storage(&self.env.standin.endpoint(), KEY, &self.env.clients);
        let queue = unique("kinds");
        let queue_uri = format!(
            "http://127.0.0.1:{}/{DEV_ACCOUNT}/{queue}",
            self.env.azurite.queue_port
        );
        let backup = self.env.azurite.container_url(&self.env.backup);
        let project: Uuid = api
            .create_project(&[
                ("name", queue.as_str()),
                ("domainId", COMPACT_DOMAIN),
                ("notificationQueueUri", queue_uri.as_str()),
                ("exportModelContainerUri", backup.as_str()),
            ])
            .await;
        let mut out = [Sample::default(); 7];
        let (text, id) = self.next_message(&queue, "ConnectionTest").await;
        out[0] = self.deliver(&text, &id, 1).await;
        api.train(project).await;
        let (text, id) = self.next_message(&queue, "TrainingCompleted").await;
        out[1] = self.deliver(&text, &id, 1).await;
        out[2] = self.deliver(&text, &id, 2).await;
        let mut last = (String::new(), String::new());
        for (i, slot) in [3, 4, 5].into_iter().enumerate() {
            let (text, id) = self.next_message(&queue, "ExportCompleted").await;
            out[slot] = self.deliver(&text, &id, 1).await;
            let _ = i;
            last = (text, id);
        }
        out[6] = self.deliver(&last.0, &last.1, 2).await;
        out
    }
}

/// The median of each kind's samples.
pub fn medians(samples: &[[Sample; 7]]) -> [Sample; 7] {
    let mut out = [Sample::default(); 7];
    for (k, slot) in out.iter_mut().enumerate() {
        let mut d: Vec<Duration> = samples.iter().map(|s| s[k].duration).collect();
        let mut st: Vec<usize> = samples.iter().map(|s| s[k].storage).collect();
        let mut cv: Vec<u64> = samples.iter().map(|s| s[k].cv).collect();
        d.sort();
        st.sort();
        cv.sort();
        *slot = Sample {
            duration: d[d.len() / 2],
            storage: st[st.len() / 2],
            cv: cv[cv.len() / 2],
        };
    }
    out
}
