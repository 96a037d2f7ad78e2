//! `cvchain worker`: consumes the queue itself, without a Functions host, with the host's queue
//! trigger semantics: batches, a visibility lease renewed while a message is processed, bounded
//! concurrency, delete on success, release for a retry on failure, `<queue>-poison` after the
//! last delivery, polling backoff while the queue is empty, and a drain on shutdown. Each message
//! goes through the same `Processor::process` as `serve`.

use crate::process::Processor;
use azure_core::http::headers::HeaderName;
use azure_storage_queue::{
    QueueClient,
    models::{QueueClientReceiveMessagesOptions, ReceivedMessage},
};
use cvchain_azure::storage::queue::{create_if_missing, send_text};
use cvchain_core::config::{SettingsError, Vars};
use cvchain_core::message::{Incoming, Received};
use cvchain_core::redact::redact;
use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};
use time::OffsetDateTime;
use tokio::{sync::Semaphore, task::JoinSet};

/// How the worker consumes the queue (the host's defaults, unless set).
#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    /// Messages taken per receive (1-32; the host's `batchSize` is 16).
    pub batch: u32,
    /// The lease on a message being processed; renewed at half of it.
    pub visibility: Duration,
    /// How long a failed message stays invisible before its retry.
    pub retry_delay: Duration,
    /// The longest wait between polls of an empty queue.
    pub max_poll: Duration,
    /// The delivery after which a failing message goes to `<queue>-poison`.
    pub max_dequeue: u32,
    /// How long shutdown waits for messages in progress.
    pub drain: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            batch: 16,
            visibility: Duration::from_secs(60),
            retry_delay: Duration::from_secs(30),
            max_poll: Duration::from_secs(10),
            max_dequeue: crate::settings::DEFAULT_MAX_DEQUEUE,
            drain: Duration::from_secs(20),
        }
    }
}

impl WorkerOptions {
    /// `CVCHAIN_WORKER_BATCH` (1-32), `CVCHAIN_WORKER_VISIBILITY_SECONDS`,
    /// `CVCHAIN_WORKER_RETRY_SECONDS`, `CVCHAIN_WORKER_MAX_POLL_SECONDS`, each defaulting to the
    /// host's behaviour ([`WorkerOptions::default`]); the last delivery is `CVCHAIN_MAX_DEQUEUE`.
    pub fn from_vars(vars: &Vars, max_dequeue: u32) -> Result<Self, SettingsError> {
        let d = Self::default();
        let secs = |name, default: Duration, range| {
            vars.number(name, default.as_secs(), range, "", "")
                .map(Duration::from_secs)
        };
        Ok(Self {
            batch: vars.number("CVCHAIN_WORKER_BATCH", d.batch.into(), 1..=32, "", "")? as u32,
            visibility: secs("CVCHAIN_WORKER_VISIBILITY_SECONDS", d.visibility, 2..=3600)?,
            retry_delay: secs("CVCHAIN_WORKER_RETRY_SECONDS", d.retry_delay, 0..=3600)?,
            max_poll: secs("CVCHAIN_WORKER_MAX_POLL_SECONDS", d.max_poll, 1..=600)?,
            max_dequeue,
            drain: d.drain,
        })
    }

    /// From the process environment.
    pub fn from_env(max_dequeue: u32) -> Result<Self, SettingsError> {
        let lookup = |k: &str| std::env::var(k).ok();
        Self::from_vars(&Vars::new(&lookup), max_dequeue)
    }
}

/// What a run did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    pub completed: u64,
    pub retried: u64,
    pub poisoned: u64,
}

/// Consumes `queue` until `shutdown` completes, then drains.
pub async fn run(
    processor: Arc<Processor>,
    queue: Arc<QueueClient>,
    poison: Arc<QueueClient>,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> WorkerStats {
    let concurrency = (options.batch + options.batch / 2).max(1) as usize;
    let permits = Arc::new(Semaphore::new(concurrency));
    let stats = Arc::new(Mutex::new(WorkerStats::default()));
    let mut tasks = JoinSet::new();
    let mut idle = Duration::from_millis(100);
    // A fresh deployment may not have the queue yet: create it rather than poll a 404.
    if let Err(e) = create_if_missing(&queue).await {
        tracing::warn!(error = %e, "cannot create the queue; polling anyway");
    }
    // Pending events go out on a timer too (retries, and what a crash left behind).
    let deliverer = processor.events().map(|e| e.periodic());
    tokio::pin!(shutdown);
    tracing::info!(
        batch = options.batch,
        concurrency,
        "worker polling the queue"
    );
    loop {
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let free = permits.available_permits();
        if free == 0 {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
            }
        }
        let n = free.min(options.batch.clamp(1, 32) as usize) as i32;
        let received = tokio::select! {
            _ = &mut shutdown => break,
            r = queue.receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(n),
                visibility_timeout: Some(secs(options.visibility)),
                ..Default::default()
            })) => r,
        };
        let messages = match received.and_then(|r| r.into_model()) {
            Ok(m) => m.items.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %redact(&e.to_string()), "cannot read the queue; retrying");
                Vec::new()
            }
        };
        if messages.is_empty() {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(idle) => {}
            }
            idle = (idle * 2).min(options.max_poll);
            continue;
        }
        idle = Duration::from_millis(100);
        for m in messages {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (processor, queue, poison, stats) = (
                processor.clone(),
                queue.clone(),
                poison.clone(),
                stats.clone(),
            );
            tasks.spawn(async move {
                let outcome = handle(&processor, &queue, &poison, &options, m).await;
                let mut s = stats.lock().expect("stats");
                match outcome {
                    Handled::Completed => s.completed += 1,
                    Handled::Retried => s.retried += 1,
                    Handled::Poisoned => s.poisoned += 1,
                }
                drop(permit);
            });
        }
    }
    tracing::info!(
        in_flight = tasks.len(),
        "shutdown requested; draining the worker"
    );
    if let Some(d) = deliverer {
        d.abort();
    }
    let drained = tokio::time::timeout(options.drain, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "messages still in progress after the drain; their leases expire and they are retried"
        );
        tasks.abort_all();
    }
    *stats.lock().expect("stats")
}

enum Handled {
    Completed,
    Retried,
    Poisoned,
}

fn secs(d: Duration) -> i32 {
    d.as_secs().clamp(1, 7 * 24 * 3600) as i32
}

/// One message: process it under a renewed lease, then delete, release or poison it.
async fn handle(
    processor: &Processor,
    queue: &Arc<QueueClient>,
    poison: &QueueClient,
    options: &WorkerOptions,
    m: ReceivedMessage,
) -> Handled {
    let id = m.message_id.clone().unwrap_or_default();
    let pop = Arc::new(Mutex::new(m.pop_receipt.clone().unwrap_or_default()));
    let text = m.message_text.clone().unwrap_or_default();
    let dequeue_count = m.dequeue_count.unwrap_or(1).clamp(1, u32::MAX as i64) as u32;
    let received = Received {
        text: text.clone(),
        message_id: Some(id.clone()),
        dequeue_count,
        received_at: OffsetDateTime::now_utc(),
    };

    // Keep the message invisible while it is processed, however long that takes. The renewer
    // is stopped between renewals, never during one: a renewal the service took changes the
    // pop receipt, which the delete below needs.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let renewer = {
        let (queue, pop, id) = (queue.clone(), pop.clone(), id.clone());
        let visibility = options.visibility;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(visibility / 2) => {}
                    _ = &mut stopped => return,
                }
                let current = pop.lock().expect("pop").clone();
                if let Some(next) = set_visibility(&queue, &id, &current, secs(visibility)).await {
                    *pop.lock().expect("pop") = next;
                }
            }
        })
    };
    let incoming = Incoming::decode(received);
    let traced = crate::telemetry::invocation(
        &incoming,
        crate::telemetry::Trigger::Worker,
        processor.queue_name(),
        None,
    );
    let result = traced.run(processor.process(&incoming)).await;
    let (outcome, decision, error) = crate::process::traced(&result);
    traced.finish(outcome, decision.as_deref(), error.as_deref());
    let _ = stop.send(());
    let _ = renewer.await;
    let pop = pop.lock().expect("pop").clone();

    match result {
        Ok(outcome) => {
            for line in &outcome.logs {
                tracing::info!(message = %id, "{line}");
            }
            if let Err(e) = queue.delete_message(&id, &pop, None).await {
                // The message comes back and is processed again, to the same effect.
                tracing::warn!(error = %redact(&e.to_string()), "cannot delete a processed message");
            }
            Handled::Completed
        }
        Err(e) if dequeue_count >= options.max_dequeue => {
            tracing::error!(error = %e, dequeue_count, "giving up; moving the message to the poison queue");
            match send_text(poison, &text).await {
                Ok(_) => {
                    let _ = queue.delete_message(&id, &pop, None).await;
                    Handled::Poisoned
                }
                Err(pe) => {
                    tracing::error!(error = %pe, "cannot write the poison queue; the message stays");
                    Handled::Retried
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, transient = e.is_transient(), dequeue_count, "processing failed; retrying later");
            let _ = set_visibility(queue, &id, &pop, secs(options.retry_delay)).await;
            Handled::Retried
        }
    }
}

/// Update Message with a new visibility timeout; returns the new pop receipt.
async fn set_visibility(queue: &QueueClient, id: &str, pop: &str, seconds: i32) -> Option<String> {
    match queue.update_message(id, pop, seconds, None).await {
        Ok(rsp) => rsp
            .headers()
            .get_optional_string(&HeaderName::from_static("x-ms-popreceipt")),
        Err(e) => {
            tracing::warn!(error = %redact(&e.to_string()), "cannot update a message's visibility");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn options(pairs: &[(&str, &str)]) -> Result<WorkerOptions, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| map.get(k).cloned();
        WorkerOptions::from_vars(&Vars::new(&lookup), 3)
    }

    #[test]
    fn options_default_to_the_hosts_and_name_a_wrong_setting() {
        let o = options(&[]).unwrap();
        let d = WorkerOptions::default();
        assert_eq!(
            (
                o.batch,
                o.visibility,
                o.retry_delay,
                o.max_poll,
                o.max_dequeue
            ),
            (d.batch, d.visibility, d.retry_delay, d.max_poll, 3)
        );
        let o = options(&[
            ("CVCHAIN_WORKER_BATCH", "4"),
            ("CVCHAIN_WORKER_RETRY_SECONDS", "0"),
        ])
        .unwrap();
        assert_eq!((o.batch, o.retry_delay), (4, Duration::ZERO));
        for (name, value) in [
            ("CVCHAIN_WORKER_BATCH", "33"),
            ("CVCHAIN_WORKER_VISIBILITY_SECONDS", "1"),
            ("CVCHAIN_WORKER_MAX_POLL_SECONDS", "x"),
        ] {
            assert_eq!(options(&[(name, value)]).unwrap_err().setting, name);
        }
    }
}
