//! What each kind of invocation costs, as a Flex Consumption bill and the next export's delay
//! see it: one `serve`, warm, a 5-entry chain, each figure one invocation as the host sends it
//! (duration of the POST, storage requests in Azurite's log, Custom Vision calls in the
//! stand-in's count), median over `rounds` projects; every invocation is delivered a second time
//! at once (a redelivery of work that is done). Only cvchain's storage requests count: the
//! stand-in's (it writes models and notifications as the service does) and the benchmark's own
//! carry other application ids in their `User-Agent`. With `CVCHAIN_BENCH_BEFORE_BIN` (a cvchain
//! binary built from an earlier revision, see `scripts/bench`), the same rounds run against it
//! too, alternating, each on an Azurite and stand-in of its own.
//!
//! With a [`Latency`] model, a proxy in front of Azurite and the stand-in delays every request
//! (as storage in-region and Custom Vision do), and each invocation's critical path is counted
//! from the proxy's log: the longest chain of requests each sent after the one before answered.

use crate::calls;
use crate::workload::{Env, KEY};
use cvchain_standin::COMPACT_DOMAIN;
use cvchain_testkit::latency_proxy::Critical;
use cvchain_testkit::{Handler, StandinApi, host_envelope, unique};
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The chain the kinds run: the five entries, with `TensorFlowNormal` for its
/// `TensorFlowJs`, a flavor the Training API does not have (v3.3 and v3.4-preview: Linux,
/// Windows, ARM, ONNX10, ONNX12, TensorFlowNormal, TensorFlowLite), which the stand-in refuses as
/// the service does. So five exports end, and the last shares its platform, and so its backup
/// blob's name and its notification's key, with the second.
pub const CHAIN: &str =
    "ONNX, TensorFlow:TensorFlowLite, CoreML, DockerFile:Linux, TensorFlow:TensorFlowNormal";
/// The exports that end with an ExportCompleted.
const EXPORTS: usize = 5;

/// The invocations of one project, in the order the chain makes them, with their targets.
pub fn kinds() -> Vec<(String, &'static str)> {
    const REDELIVERY: &str = "≤ 20 ms, 0 CV, ≤ 2 storage";
    let mut k = vec![
        ("ConnectionTest".to_owned(), "reported"),
        (
            "TrainingCompleted (requests the first export)".to_owned(),
            "≤ 60 ms, ≤ 5 CV",
        ),
        ("the same, redelivered".to_owned(), REDELIVERY),
    ];
    for n in 1..=EXPORTS {
        let what = match n {
            1 => format!("ExportCompleted 1 of {EXPORTS} (copy, next request, channels)"),
            EXPORTS => {
                format!("ExportCompleted {n} of {EXPORTS} (last: copy, channels, chain.completed)")
            }
            _ => format!("ExportCompleted {n} of {EXPORTS}"),
        };
        k.push((what, "≤ 15 storage, ≤ the first's"));
        k.push(("the same, redelivered".to_owned(), REDELIVERY));
    }
    k
}

/// How many invocations a round measures.
pub fn count() -> usize {
    3 + 2 * EXPORTS
}

/// One invocation's cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub duration: Duration,
    pub storage: usize,
    /// Storage requests of the background delivery of the invocation's events (after the
    /// answer: the outbox read, the delivery claim, one queue message and one state save per
    /// event).
    pub delivery: usize,
    pub cv: u64,
    /// With a latency model: the critical path.
    pub critical: Critical,
}

/// A latency model: what each request waits before the proxy forwards it.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub storage: Duration,
    pub custom_vision: Duration,
}

/// A `serve` on an environment of its own.
pub struct Runner {
    pub env: Env,
    pub handler: Handler,
    http: reqwest::Client,
    /// The events queue (its requests are the delivery's).
    events: String,
}

impl Runner {
    pub async fn start(bin: Option<&Path>, latency: Option<Latency>) -> Self {
        Self::start_with(bin, latency, &[]).await
    }

    /// As `start`, with more settings (telemetry's).
    pub async fn start_with(
        bin: Option<&Path>,
        latency: Option<Latency>,
        extra: &[(&'static str, String)],
    ) -> Self {
        let env = match latency {
            Some(l) => Env::start_with_latency(true, (l.storage, l.custom_vision)).await,
            None => Env::start(true).await,
        };
        let mut settings = env.settings("10");
        for (k, v) in settings.iter_mut() {
            if *k == "CVCHAIN_EXPORTS" {
                *v = CHAIN.into();
            }
        }
        // Events on, as an operator runs it: every change writes its outbox rows, and each
        // invocation's events are delivered (in the background) to a queue.
        let events = unique("events");
        settings.push(("CVCHAIN_EVENTS_QUEUE", events.clone()));
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
            events,
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
        if let Some(p) = &self.env.proxy {
            p.clear();
        }
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
        let critical = self
            .env
            .proxy
            .as_ref()
            .map(|p| p.critical_path())
            .unwrap_or_default();
        // Azurite writes its log a moment after it answers.
        tokio::time::sleep(Duration::from_millis(150)).await;
        // cvchain's own requests: the stand-in and this harness name other applications.
        let (entries, _) = calls::entries_but(log, from, &["cvchain-standin", "cvchain-bench"]);
        // The delivery of the events is told by what it addresses: the outbox, the delivery
        // claim, the events queue.
        let (delivery, kinds): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(_, url)| {
            url.contains("Outbox") || url.contains("DeliveryClaim") || url.contains(&self.events)
        });
        let kinds: Vec<String> = kinds.into_iter().map(|(k, _)| k).collect();
        if std::env::var("CVCHAIN_BENCH_KINDS_DEBUG").is_ok() {
            eprintln!(
                "{text:.60}… {:?}; delivery {}",
                calls::tally(&kinds),
                delivery.len()
            );
        }
        Sample {
            duration,
            storage: kinds.len(),
            delivery: delivery.len(),
            cv: self.cv_total() - cv0,
            critical,
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

    /// One project through the whole chain, each invocation measured, then delivered again.
    pub async fn round(&self) -> Vec<Sample> {
        let api = StandinApi::with_storage(&self.env.standin.endpoint(), KEY, &self.env.clients);
        let queue = unique("kinds");
        let queue_uri = self.env.queue_uri(&queue);
        let backup = self.env.container_uri(&self.env.backup);
        let project: Uuid = api
            .create_project(&[
                ("name", queue.as_str()),
                ("domainId", COMPACT_DOMAIN),
                ("notificationQueueUri", queue_uri.as_str()),
                ("exportModelContainerUri", backup.as_str()),
            ])
            .await;
        let mut out = Vec::with_capacity(count());
        let (text, id) = self.next_message(&queue, "ConnectionTest").await;
        out.push(self.deliver(&text, &id, 1).await);
        api.train(project).await;
        let (text, id) = self.next_message(&queue, "TrainingCompleted").await;
        out.push(self.deliver(&text, &id, 1).await);
        out.push(self.deliver(&text, &id, 2).await);
        for _ in 0..EXPORTS {
            let (text, id) = self.next_message(&queue, "ExportCompleted").await;
            out.push(self.deliver(&text, &id, 1).await);
            out.push(self.deliver(&text, &id, 2).await);
        }
        if std::env::var("CVCHAIN_BENCH_KINDS_DEBUG").is_ok() {
            let log = self.handler.stderr();
            eprintln!("{}", &log[log.len().saturating_sub(6000)..]);
        }
        out
    }
}

fn mid<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// The median of each kind's samples.
pub fn medians(samples: &[Vec<Sample>]) -> Vec<Sample> {
    (0..samples[0].len())
        .map(|k| Sample {
            duration: mid(samples.iter().map(|s| s[k].duration).collect()),
            storage: mid(samples.iter().map(|s| s[k].storage).collect()),
            delivery: mid(samples.iter().map(|s| s[k].delivery).collect()),
            cv: mid(samples.iter().map(|s| s[k].cv).collect()),
            critical: Critical {
                storage: mid(samples.iter().map(|s| s[k].critical.storage).collect()),
                custom_vision: mid(samples
                    .iter()
                    .map(|s| s[k].critical.custom_vision)
                    .collect()),
            },
        })
        .collect()
}
