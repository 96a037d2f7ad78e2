//! Drives `cvchain serve` as the Functions host does (the envelope it POSTs, a number of
//! invocations at once, a failed invocation delivered again with the next `DequeueCount`) and
//! `cvchain worker` from its queue, and reads a process's memory from /proc.

use crate::workload::{Env, Message};
use cvchain_testkit::Handler;
use futures::StreamExt;
use std::time::{Duration, Instant};

/// What one run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunStats {
    pub messages: usize,
    pub elapsed: Duration,
    /// Invocations answered non-2xx and delivered again.
    pub retries: u64,
    /// Messages still failing after 20 deliveries.
    pub gave_up: u64,
}

impl RunStats {
    pub fn per_second(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

/// A field of /proc/<pid>/status, in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets a process's peak RSS (VmHWM), so the next reading covers only what follows.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Starts `cvchain serve` with the environment's settings; returns once `GET /` answers.
pub fn start_serve(env: &Env, max_rps: &str) -> Handler {
    let settings = env.settings(max_rps);
    let vars: Vec<(&str, String)> = settings.iter().map(|(k, v)| (*k, v.clone())).collect();
    tokio::task::block_in_place(|| Handler::start(&vars))
}

/// Starts `cvchain worker` on the environment's queue.
pub fn start_worker(env: &Env, max_rps: &str) -> Handler {
    let mut settings = env.settings(max_rps);
    // An empty queue is polled again soon: the run ends when the queue is empty.
    settings.push(("CVCHAIN_WORKER_MAX_POLL_SECONDS", "1".into()));
    let vars: Vec<(&str, String)> = settings.iter().map(|(k, v)| (*k, v.clone())).collect();
    tokio::task::block_in_place(|| Handler::start_worker(&vars))
}

/// POSTs every message to the handler, `concurrency` at a time, as the host does; panics on a
/// message that fails 20 times.
pub async fn drive_serve(handler: &Handler, messages: &[Message], concurrency: usize) -> RunStats {
    let stats = drive_serve_counting(handler, messages, concurrency).await;
    assert_eq!(stats.gave_up, 0, "{}", handler.stderr());
    stats
}

/// As [`drive_serve`], counting the messages that fail 20 times instead of panicking.
pub async fn drive_serve_counting(
    handler: &Handler,
    messages: &[Message],
    concurrency: usize,
) -> RunStats {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let url = handler.url("/CustomVisionNotification");
    let started = Instant::now();
    let gave_up = std::sync::atomic::AtomicU64::new(0);
    let retries: u64 = futures::stream::iter(messages)
        .map(|m| {
            let (http, url, gave_up) = (&http, &url, &gave_up);
            async move {
                for (retries, dequeue) in (1..=20u32).enumerate() {
                    let body = cvchain_core::envelope::encode_queue_invocation(
                        &m.text,
                        &m.id,
                        dequeue,
                        time::OffsetDateTime::now_utc(),
                        uuid::Uuid::new_v4(),
                    );
                    let rsp = http
                        .post(url)
                        .header("content-type", "application/json; charset=utf-8")
                        .body(body)
                        .send()
                        .await;
                    if matches!(&rsp, Ok(r) if r.status().is_success()) {
                        return retries as u64;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                eprintln!("{:?} {} failed 20 times", m.kind, m.project);
                gave_up.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                20
            }
        })
        .buffer_unordered(concurrency)
        .fold(0u64, |a, r| async move { a + r })
        .await;
    RunStats {
        messages: messages.len(),
        elapsed: started.elapsed(),
        retries,
        gave_up: gave_up.into_inner(),
    }
}

/// Starts the worker on a queue already holding `messages` and waits until it is empty.
pub async fn drive_worker(env: &Env, messages: usize, max_rps: &str) -> (RunStats, Handler) {
    let started = Instant::now();
    let worker = start_worker(env, max_rps);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if env.queue_length().await == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "the worker did not empty its queue: {}",
            worker.stderr()
        );
    }
    let stats = RunStats {
        messages,
        elapsed: started.elapsed(),
        ..Default::default()
    };
    (stats, worker)
}
