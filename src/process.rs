//! `process(message) -> Outcome`: gather what the plan needs, call the core's decisions, carry
//! the actions out against storage and Custom Vision. Every entry point (the Functions handler,
//! the queue worker) goes through here. Nothing is decided here that the core could decide.

use crate::error::ProcessError;
use crate::events::Events;
use crate::lifecycle::{Complete, Delivery, Lifecycle};
use crate::settings::Settings;
use azure_storage_queue::QueueClient;
use cvchain_azure::customvision::TrainingApi;
use cvchain_azure::history::{
    claims::{Claim, Claims, Kept},
    store::{HistoryStore, Recorded, TailWrite},
};
use cvchain_azure::storage::{
    StorageError,
    blobs::{ReleaseError, ReleaseStore},
    channels::ChannelStore,
    clients::StorageClients,
    queue::{poison_queue_name, send_text},
    rejected::store_text,
};
use cvchain_core::chain::{EntryState, ExportTarget, Next, plan_chain};
use cvchain_core::claims::ClaimKey;
use cvchain_core::customvision::CvError;
use cvchain_core::history::{
    Existing, PoisonCopy, Prop, Props, StepRow, TrainingRow, apart_key, existing_row, failed_row,
    step_row_key, table_datetime, training_row_key,
};
use cvchain_core::message::Incoming;
use cvchain_core::notification::{Notification, TrainingStatus};
use cvchain_core::plan::{
    Action, Decision, Observed, PlanConfig, Production, RequestOutcome, StepWrite,
    apply_step_write, chain_position, describe_next, needs, plan, plan_unreadable,
    redelivery_probe, refused_targets, release_refused_writes, release_writes, releases_due,
    request_outcome, retention_due, step_after_request, step_exists, step_writes,
};
use cvchain_core::redact::scrub;
use cvchain_core::release::{ModelUri, ReleaseFacts, ReleaseNames, Released, plan_releases};
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// How a message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Understood and recorded.
    Recorded,
    /// Rejected for good: recorded and copied to the poison queue.
    Rejected,
}

/// The result of processing one message; the message can be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub disposition: Disposition,
    /// `table/PartitionKey/RowKey` of the history row.
    pub row: String,
    /// True when the row was already there: a redelivery, nothing changed.
    pub duplicate: bool,
    /// Lines for the invocation's log; never a secret.
    pub logs: Vec<String>,
}

/// What one message's actions share: the iteration's step rows (read once, kept in line with
/// what the message writes), the lines for the invocation's log, and the step row writes (with
/// the claims they give back) left for the transaction that records the notification's row.
#[derive(Default)]
struct Scratch {
    steps: Option<Vec<StepRow>>,
    logs: Vec<String>,
    tail: Vec<TailWrite>,
    /// When set, the events of the tail's step row changes are told later (the chain run beside
    /// the release): each change, by its place in the tail.
    later: Option<Vec<(usize, StepWrite)>>,
    /// The claims the tail gives back, renewed until it is written.
    kept: Kept,
    /// Not a redelivery: what the step rows do not record is taken not to exist yet (a
    /// redelivery may follow a failure that left something behind, so it looks first).
    first_delivery: bool,
}

/// What the reads before planning found: another message's row under this event's keys (this
/// message's goes apart), the iteration's step rows.
#[derive(Default)]
struct Found {
    first_row: Option<cvchain_core::history::HistoryRow>,
    steps: Option<Vec<StepRow>>,
    first_delivery: bool,
}

/// The adapters the actions need.
pub struct Processor {
    history: HistoryStore,
    poison: QueueClient,
    /// Where rejected texts too large for the poison queue are kept (named like it).
    rejected: azure_storage_blob::BlobContainerClient,
    config: PlanConfig,
    table_name: String,
    /// The notification queue (spans name it).
    queue_name: String,
    cv: Option<Arc<dyn TrainingApi>>,
    releases: ReleaseStore,
    lifecycle: Lifecycle,
    max_dequeue: u32,
    claims: Claims,
    /// Outbound events (`None`: no sink configured, no event recorded).
    events: Option<Arc<Events>>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("history", &self.history)
            .field("poison_queue", &self.config.poison_queue)
            .field("custom_vision", &self.cv.is_some())
            .finish()
    }
}

impl Processor {
    /// Storage from `clients`; Custom Vision as given (`None`: record only).
    pub fn new(
        settings: &Settings,
        clients: &StorageClients,
        cv: Option<Arc<dyn TrainingApi>>,
    ) -> Result<Self, StorageError> {
        let poison_queue = poison_queue_name(&settings.queue_name);
        let events = Events::from_settings(settings, clients, Default::default())?;
        Ok(Self {
            history: HistoryStore::new(clients.table(&settings.history_table)?),
            poison: clients.queue(&poison_queue)?,
            rejected: clients.blob_service()?.blob_container_client(&poison_queue),
            config: PlanConfig {
                poison_queue,
                chain: settings.chain.clone(),
                custom_vision: cv.is_some(),
                backup_container: settings.release.backup_container.clone(),
                projects: settings.projects.clone(),
                lifecycle: settings.lifecycle.clone(),
            },
            max_dequeue: settings.max_dequeue,
            claims: Claims::new(
                clients.table(&settings.history_table)?,
                std::time::Duration::from_secs(settings.claim_seconds),
            ),
            releases: ReleaseStore::new(
                clients,
                &settings.release.container,
                settings.release.backup_container.clone(),
                settings.release.template.clone(),
            )?,
            lifecycle: Lifecycle {
                history: HistoryStore::new(clients.table(&settings.history_table)?),
                channels: ChannelStore::new(
                    clients,
                    &settings.release.container,
                    settings.lifecycle.channels.clone(),
                )?,
                cv: cv.clone(),
                publish: settings.chain.publish.clone(),
                chain: settings.chain.exports.clone(),
                events: events.clone(),
            },
            events,
            table_name: settings.history_table.clone(),
            queue_name: settings.queue_name.clone(),
            cv,
        })
    }

    pub fn history(&self) -> &HistoryStore {
        &self.history
    }

    /// The notification queue's name.
    pub fn queue_name(&self) -> &str {
        &self.queue_name
    }

    /// Outbound events, when a sink is configured.
    pub fn events(&self) -> Option<&Arc<Events>> {
        self.events.as_ref()
    }

    /// The lifecycle operations (`promote`, `rollback`, `channels` use them too).
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Processes one queue message. When it fails on the delivery the host will not retry
    /// (`DequeueCount` at `CVCHAIN_MAX_DEQUEUE`), the final failure is recorded first, so every
    /// poison-queue entry has a matching row.
    pub async fn process(&self, incoming: &Incoming) -> Result<Outcome, ProcessError> {
        // Its own events are placed at its start: deliveries here hold back what its project
        // writes meanwhile until it ends, so no sink gets those first.
        let handling = match (&self.events, &incoming.parsed) {
            (Some(events), Ok(parsed)) => parsed
                .notification
                .project_id()
                .map(|project| events.begin(&project.to_string())),
            _ => None,
        };
        let result = self.process_once(incoming).await;
        drop(handling);
        // The events this message recorded (and any its project still owes) go out now, in the
        // background: the answer to the host does not wait for a sink.
        if let (Ok(_), Some(events), Ok(parsed)) = (&result, &self.events, &incoming.parsed)
            && let Some(project) = parsed.notification.project_id()
        {
            events.deliver_later(project.to_string());
        }
        if let Err(e) = &result
            && incoming.received.dequeue_count >= self.max_dequeue
        {
            let row = failed_row(incoming, &e.to_string(), e.is_transient());
            match self.history.record(&row).await {
                Ok(_) => tracing::error!(
                    row = %row.describe(),
                    "giving up after {} deliveries; the host moves the message to the poison queue",
                    incoming.received.dequeue_count
                ),
                Err(record_error) => tracing::error!(
                    error = %record_error,
                    "giving up, and the final failure could not be recorded either"
                ),
            }
        }
        result
    }

    async fn process_once(&self, incoming: &Incoming) -> Result<Outcome, ProcessError> {
        // A redelivery of a handled notification costs one read: the row and, when another
        // message recorded this event first, this one's row apart (two exports of one
        // platform, see `carry_out`), both in one range.
        // Another message's row found by the probe: recording this one's goes straight to the
        // row apart, without trying the first's keys again.
        let mut first_row = None;
        if let Ok(parsed) = &incoming.parsed
            && let Some(row) = redelivery_probe(incoming, parsed, &self.config)
            && let (Some(existing), mine) = self
                .history
                .get_with_apart(
                    &row.partition_key,
                    &row.row_key,
                    &apart_key(&row.row_key, &incoming.key),
                )
                .await?
            && let Some(row) = match existing_row(&row, &existing, &incoming.key) {
                Existing::Redelivery => Some(row),
                Existing::Another { row: own, .. } => {
                    if mine.is_none() {
                        first_row = Some(existing);
                    }
                    mine.map(|_| own)
                }
            }
        {
            let row_desc = format!("{}/{}", self.table_name, row.describe());
            return Ok(Outcome {
                disposition: Disposition::Recorded,
                logs: vec![
                    format!("received {}", parsed.notification),
                    format!("{row_desc} already recorded: a redelivery, left unchanged"),
                ],
                row: row_desc,
                duplicate: true,
            });
        }
        // What Custom Vision (or the Training row) says, and the iteration's step rows when the
        // plan will read them: independent, so they go out together.
        let (observed, steps) = match &incoming.parsed {
            Ok(parsed) => {
                let n = &parsed.notification;
                let steps = async {
                    match (n.project_id(), n.iteration_id()) {
                        (Some(p), Some(i)) if self.reads_steps(n) => {
                            Ok::<_, ProcessError>(Some(self.history.steps(p, i).await?))
                        }
                        _ => Ok(None),
                    }
                };
                let (observed, steps) = tokio::join!(self.observe(n), steps);
                (observed?, steps?)
            }
            Err(_) => (Observed::default(), None),
        };
        let (decision, actions) = plan(incoming, &observed, &self.config);
        if let Decision::Retry(reason) = &decision {
            return Err(ProcessError::NotReady(reason.clone()));
        }
        let last = incoming.received.dequeue_count >= self.max_dequeue;
        self.carry_out(
            decision,
            actions,
            &observed,
            &incoming.key,
            last,
            Found {
                first_row,
                steps,
                first_delivery: incoming.received.dequeue_count <= 1,
            },
        )
        .await
    }

    /// Records something that arrived but could not be read as a message at all.
    pub async fn process_unreadable(
        &self,
        incoming: &Incoming,
        reason: &str,
    ) -> Result<Outcome, ProcessError> {
        let (decision, actions) = plan_unreadable(incoming, reason, &self.config);
        self.carry_out(
            decision,
            actions,
            &Observed::default(),
            &incoming.key,
            true,
            Found::default(),
        )
        .await
    }

    /// Whether the plan for `n` reads the iteration's step rows (a finished training runs the
    /// chain, a finished export releases): read beside the observations.
    fn reads_steps(&self, n: &Notification) -> bool {
        use cvchain_core::notification::ExportStatus;
        self.cv.is_some()
            && self.config.allows(n)
            && match n {
                Notification::Training {
                    status: TrainingStatus::Completed,
                    ..
                } => !self.config.chain.exports.is_empty(),
                Notification::Export {
                    status: ExportStatus::Completed,
                    ..
                } => true,
                _ => false,
            }
    }

    /// Asks Custom Vision what the plan needs. Transient failures end the invocation (the
    /// message is retried); permanent ones are observations the plan records.
    async fn observe(&self, n: &Notification) -> Result<Observed, ProcessError> {
        let mut o = Observed::default();
        let needs = needs(n, &self.config);
        let (Some(cv), Some(project), Some(iteration)) =
            (&self.cv, n.project_id(), n.iteration_id())
        else {
            return Ok(o);
        };
        let permanent = |what: &str, e: &CvError| -> Result<String, ProcessError> {
            if e.is_transient() {
                Err(ProcessError::CustomVision(e.clone()))
            } else if e.is_not_found() {
                Ok(format!("{what} not found ({})", e.code().unwrap_or("404")))
            } else {
                Ok(format!("{what}: {e}"))
            }
        };
        let mut needs = needs;
        // After training, what Custom Vision said about the iteration is on its Training row:
        // one storage read instead of three calls against the service's quota.
        if matches!(n, Notification::Export { .. })
            && (needs.iteration || needs.project || needs.performance)
            && let Some(row) = self
                .history
                .get(
                    &project.to_string(),
                    &training_row_key(iteration, TrainingStatus::Completed),
                )
                .await?
            && let Some(facts) = TrainingRow::facts(&row)
        {
            o.project = Some(facts.project);
            o.iteration = Some(facts.iteration);
            o.performance = facts.performance;
            needs.iteration = false;
            needs.project = false;
            needs.performance = false;
        }
        // Nothing orders these reads: they go out together (the rate limiter lets a burst
        // through), and their answers are judged in the order the chain needs them.
        let (it, proj, perf, exports) = tokio::join!(
            async {
                match needs.iteration {
                    true => Some(cv.get_iteration(project, iteration).await),
                    false => None,
                }
            },
            async {
                match needs.project {
                    true => Some(cv.get_project(project).await),
                    false => None,
                }
            },
            async {
                match needs.performance {
                    true => Some(cv.get_iteration_performance(project, iteration).await),
                    false => None,
                }
            },
            async {
                match needs.exports {
                    true => Some(cv.get_exports(project, iteration).await),
                    false => None,
                }
            },
        );
        // A transient failure anywhere retries the message, before any answer is used.
        for e in [
            it.as_ref().and_then(|r| r.as_ref().err()),
            proj.as_ref().and_then(|r| r.as_ref().err()),
            perf.as_ref().and_then(|r| r.as_ref().err()),
            exports.as_ref().and_then(|r| r.as_ref().err()),
        ]
        .into_iter()
        .flatten()
        {
            if e.is_transient() {
                return Err(ProcessError::CustomVision(e.clone()));
            }
        }
        match it {
            Some(Ok(i)) => o.iteration = Some(i),
            Some(Err(e)) => {
                o.problem = Some(permanent("iteration", &e)?);
                return Ok(o);
            }
            None => {}
        }
        match proj {
            Some(Ok(p)) => o.project = Some(p),
            Some(Err(e)) => {
                o.problem = Some(permanent("project", &e)?);
                return Ok(o);
            }
            None => {}
        }
        // No performance is no reason to stop the chain.
        if let Some(Ok(p)) = perf {
            o.performance = Some(p);
        }
        match exports {
            Some(Ok(e)) => o.exports = Some(e),
            Some(Err(e)) => {
                o.problem = Some(permanent("exports", &e)?);
                return Ok(o);
            }
            None => {}
        }
        if needs.production {
            let name = o
                .project
                .as_ref()
                .map(|p| p.name.clone())
                .unwrap_or_default();
            o.production = match self
                .lifecycle
                .channels
                .load(project, &name, OffsetDateTime::now_utc())
                .await
            {
                Ok(loaded) => match loaded.manifest.production_pointer {
                    Some(p) => Production::Iteration {
                        previous: p.history.last().map(|h| h.iteration.clone()),
                        current: p.iteration,
                    },
                    None => Production::Empty,
                },
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => Production::Unknown(e.to_string()),
            };
        }
        Ok(o)
    }

    /// Carries the actions out in order. `last`: the host will not deliver this message again,
    /// so a channel move or publishing that cannot happen now is recorded rather than failing
    /// it (side effects never poison a notification whose chain went on).
    async fn carry_out(
        &self,
        decision: Decision,
        actions: Vec<Action>,
        observed: &Observed,
        message_key: &str,
        last: bool,
        found: Found,
    ) -> Result<Outcome, ProcessError> {
        let Found {
            first_row,
            steps,
            first_delivery,
        } = found;
        let mut scratch = Scratch {
            steps,
            first_delivery,
            ..Default::default()
        };
        let kept = scratch.kept.clone();
        // The claims the tail gives back stay renewed while the rest of the work runs.
        let result = tokio::select! {
            result = self.carry_out_actions(
                decision,
                actions,
                observed,
                message_key,
                last,
                first_row,
                &mut scratch,
            ) => result,
            never = self.claims.keep_renewed(&kept) => match never {},
        };
        // What is left of the tail (the row was not recorded: an error, or no row) is written
        // now: it records work done.
        match self.flush(&mut scratch).await {
            Err(e) if result.is_ok() => Err(e),
            _ => result,
        }
    }

    /// Writes the tail one write after another; when that fails, its claims are given back
    /// (the next delivery finds the work and records it).
    async fn flush(&self, scratch: &mut Scratch) -> Result<(), ProcessError> {
        if scratch.tail.is_empty() {
            return Ok(());
        }
        let _paused = scratch.kept.pause().await;
        let tail = patched(&std::mem::take(&mut scratch.tail), &scratch.kept);
        let flushed = self.history.flush_tail(&tail).await;
        forget_all(&tail, &scratch.kept);
        if let Err(e) = flushed {
            for c in tail.iter().filter_map(TailWrite::release) {
                self.give_back(c).await;
            }
            return Err(e.into());
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn carry_out_actions(
        &self,
        decision: Decision,
        actions: Vec<Action>,
        observed: &Observed,
        message_key: &str,
        last: bool,
        first_row: Option<cvchain_core::history::HistoryRow>,
        scratch: &mut Scratch,
    ) -> Result<Outcome, ProcessError> {
        let now = OffsetDateTime::now_utc();
        let mut row_desc = String::new();
        let mut duplicate = false;
        let mut poison_already_sent = false;
        let mut recorded_row: Option<(String, String)> = None;
        let mut chain_status: Option<String> = None;
        // Where the chain stands after this message (`None`: no chain ran).
        let mut chain_next: Option<Next> = None;
        // When the chain run ended: `chain.completed` takes its place in the order there, before
        // what retention does next.
        let mut chain_ended_at = now;
        let mut publish_status: Option<String> = None;
        let mut channel_status: Option<String> = None;
        let mut retention_status: Option<String> = None;
        // The iteration's step rows, read once and kept in line with what this message writes.
        // What this message released: the channel moves copy from it without reading it again.
        let mut released: Vec<Released> = Vec::new();
        let delivery = Delivery { now, last };
        // The chain and the release share only the step rows this message read: the next
        // export is requested beside the release and the channel moves (what each found is
        // taken at its own action below, in the order they are listed).
        let beside = actions.iter().find_map(|a| match a {
            Action::Chain { project, iteration } => Some((*project, *iteration)),
            _ => None,
        });
        let moves = actions.iter().find_map(|a| match a {
            Action::Channels {
                project,
                project_name,
                iteration,
            } => Some((*project, project_name.clone(), iteration.clone())),
            _ => None,
        });
        let mut chain_ran: Option<Result<Option<Next>, ProcessError>> = None;
        let mut channels_ran: Option<Result<String, ProcessError>> = None;
        for action in actions {
            match action {
                Action::Release {
                    project,
                    iteration,
                    model_uri,
                } if beside == Some((project, iteration)) => {
                    let (done, chain, channels) = self
                        .release_beside_chain(
                            (project, iteration),
                            &model_uri,
                            moves.as_ref(),
                            observed,
                            &delivery,
                            scratch,
                        )
                        .await;
                    chain_ran = Some(chain);
                    channels_ran = channels;
                    released = done?;
                }
                Action::Promote {
                    project,
                    project_name,
                    iteration,
                } => {
                    // What the promotion reads of the history is written first.
                    self.flush(scratch).await?;
                    let known = self
                        .steps(&mut scratch.steps, project, iteration.id)
                        .await?;
                    let (channels, publish) = self
                        .lifecycle
                        .promote(project, &project_name, &iteration, Some(known), &delivery)
                        .await?;
                    scratch.logs.push(format!("channels: {channels}"));
                    channel_status = Some(channels);
                    if let Some(p) = publish {
                        scratch.logs.push(format!("publish: {p}"));
                        publish_status = Some(p);
                    }
                }
                Action::Channels {
                    project,
                    project_name,
                    iteration,
                } => {
                    let status = match channels_ran.take() {
                        Some(ran) => ran?,
                        None => {
                            let known = self
                                .steps(&mut scratch.steps, project, iteration.id)
                                .await?;
                            self.lifecycle
                                .move_channels_into(
                                    project,
                                    &project_name,
                                    &iteration,
                                    Some(known),
                                    Complete::Released(&released),
                                    &delivery,
                                    Some(&mut scratch.tail),
                                    None,
                                )
                                .await?
                        }
                    };
                    scratch.logs.push(format!("channels: {status}"));
                    channel_status = Some(status);
                    // The chain ran first; its completion is told after the moves it released.
                    chain_ended_at = OffsetDateTime::now_utc();
                }
                Action::Retain { project, keep } => {
                    // Retention reads the project's step rows: this message's are written first.
                    self.flush(scratch).await?;
                    let status = if retention_due(chain_next.as_ref()) {
                        self.lifecycle.retain(project, keep, now).await?
                    } else {
                        "waiting for the chain to complete".to_owned()
                    };
                    scratch.logs.push(format!("retention: {status}"));
                    retention_status = Some(status);
                }
                Action::Release {
                    project,
                    iteration,
                    model_uri,
                } => {
                    released = self
                        .release(project, iteration, &model_uri, observed, now, scratch)
                        .await?;
                }
                Action::Chain { project, iteration } => {
                    let next = match chain_ran.take() {
                        Some(ran) => ran?,
                        None => {
                            self.run_chain(project, iteration, observed, now, scratch)
                                .await?
                        }
                    };
                    let status = next
                        .as_ref()
                        .map(describe_next)
                        .unwrap_or_else(|| "no iteration to export".into());
                    scratch.logs.push(format!("export chain: {status}"));
                    chain_status = Some(status);
                    chain_next = Some(next.unwrap_or(Next::Empty));
                    chain_ended_at = OffsetDateTime::now_utc();
                }
                Action::Record(mut row) => {
                    if let Some(s) = &chain_status {
                        row.properties.set(Prop::ChainStatus, s);
                    }
                    if let Some(s) = &publish_status {
                        row.properties.set(Prop::PublishStatus, s);
                    }
                    if let Some(s) = &channel_status {
                        row.properties.set(Prop::ChannelStatus, s);
                    }
                    if let Some(s) = &retention_status {
                        row.properties.set(Prop::RetentionStatus, s);
                    }
                    row_desc = format!("{}/{}", self.table_name, row.describe());
                    let known = first_row.as_ref().filter(|f| {
                        f.partition_key == row.partition_key && f.row_key == row.row_key
                    });
                    // The tail goes with the row, its claims as last renewed (renewals wait).
                    let paused = scratch.kept.pause().await;
                    let tail = patched(&scratch.tail, &scratch.kept);
                    let mut recorded = match &self.events {
                        _ if known.is_some() => {
                            Recorded::AlreadyPresent(known.cloned().expect("just checked"))
                        }
                        Some(events) => {
                            let done = (chain_next == Some(Next::Complete))
                                .then(|| decision_ids(&decision))
                                .flatten();
                            events
                                .record_notification(
                                    &row,
                                    observed,
                                    done,
                                    now,
                                    chain_ended_at,
                                    scratch.steps.as_deref(),
                                    &tail,
                                )
                                .await?
                        }
                        None => self.history.record_with_tail(&row, &[], &tail).await?,
                    };
                    // Written with the row (a failure leaves the tail to `flush`, which gives
                    // its claims back when it cannot write it either).
                    if known.is_none() {
                        forget_all(&tail, &scratch.kept);
                        scratch.tail.clear();
                    }
                    // A row under this event's keys that another message wrote: this message
                    // gets its own row, and both say so. It tells no event of its own (the event
                    // was told when the first row was written), only the chain's completion
                    // when this message ended the chain.
                    if let Recorded::AlreadyPresent(existing) = &recorded
                        && let Existing::Another { row: own, note } =
                            existing_row(&row, existing, message_key)
                    {
                        let first = existing.row_key.clone();
                        row = own;
                        row_desc = format!("{}/{}", self.table_name, row.describe());
                        // When this message ended the chain, the row apart carries its
                        // completion: the first row was written before the chain was done.
                        let done = (chain_next == Some(Next::Complete))
                            .then(|| decision_ids(&decision))
                            .flatten();
                        let outbox = match &self.events {
                            Some(events) => {
                                events
                                    .completion_rows(
                                        &row,
                                        observed,
                                        done,
                                        chain_ended_at,
                                        scratch.steps.as_deref(),
                                    )
                                    .await?
                            }
                            None => Vec::new(),
                        };
                        // The tail, unless the first write took it already.
                        let rest: &[TailWrite] = match scratch.tail.is_empty() {
                            true => &[],
                            false => &tail,
                        };
                        recorded = self
                            .history
                            .record_apart(&row, &outbox, &first, &note, rest)
                            .await?;
                        forget_all(rest, &scratch.kept);
                        scratch.tail.clear();
                        if recorded == Recorded::Inserted {
                            tracing::warn!(
                                row = %row_desc,
                                first = %first,
                                "another message recorded this event first; recorded apart"
                            );
                        }
                    }
                    drop(paused);
                    match recorded {
                        Recorded::Inserted => {
                            // The gate's verdict counts once, when its row is written.
                            if let Some(v) = Some(row.properties.text(Prop::GateVerdict))
                                .filter(|v| !v.is_empty())
                            {
                                crate::telemetry::gate_verdict(v);
                            }
                            scratch.logs.push(format!("recorded {row_desc}"));
                        }
                        Recorded::AlreadyPresent(existing) => {
                            duplicate = true;
                            poison_already_sent = matches!(
                                existing.properties.text(Prop::PoisonCopy),
                                s if s == PoisonCopy::Sent.as_str()
                                    || s == PoisonCopy::Stored.as_str()
                            );
                            scratch.logs.push(format!(
                                "{row_desc} already recorded: a redelivery, left unchanged"
                            ));
                        }
                    }
                    recorded_row = Some((row.partition_key, row.row_key));
                }
                Action::CopyToPoison { queue, text } => {
                    if poison_already_sent {
                        continue;
                    }
                    let sent_as = send_text(&self.poison, &text).await?;
                    if let Some((pk, rk)) = &recorded_row {
                        let mut sent = Props::new();
                        sent.set(Prop::PoisonCopy, PoisonCopy::Sent.as_str());
                        sent.set(Prop::PoisonEncoding, sent_as.as_str());
                        self.history.merge(pk, rk, &sent).await?;
                    }
                    scratch
                        .logs
                        .push(format!("copied the message to queue {queue}"));
                }
                Action::StoreRejected {
                    container,
                    blob,
                    text,
                } => {
                    if poison_already_sent {
                        continue;
                    }
                    store_text(&self.rejected, &blob, &text).await?;
                    if let Some((pk, rk)) = &recorded_row {
                        let mut stored = Props::new();
                        stored.set(Prop::PoisonCopy, PoisonCopy::Stored.as_str());
                        stored.set(Prop::PoisonBlob, &blob);
                        self.history.merge(pk, rk, &stored).await?;
                    }
                    scratch.logs.push(format!(
                        "too large for the poison queue: stored whole as blob {container}/{blob}"
                    ));
                }
            }
        }
        let disposition = match &decision {
            Decision::Accepted(notification) => {
                scratch.logs.insert(0, format!("received {notification}"));
                Disposition::Recorded
            }
            Decision::Rejected { reason, .. } => {
                scratch.logs.insert(0, format!("rejected: {reason}"));
                Disposition::Rejected
            }
            Decision::Retry(reason) => return Err(ProcessError::NotReady(reason.clone())),
        };
        Ok(Outcome {
            disposition,
            row: row_desc,
            duplicate,
            // Lines may quote what a message said (an unknown type): never a secret.
            logs: scratch.logs.iter().map(|l| scrub(l)).collect(),
        })
    }

    /// The release, then the channel moves (`moves`, with the manifest read beside the
    /// release), beside the chain's next request. The chain's step row changes join the tail
    /// after the release's, their events told as if it had run after the release (from the
    /// rows as the release left them, in that place in the order), so nothing a sink sees
    /// changes; the chain only no longer waits.
    #[allow(clippy::type_complexity)]
    async fn release_beside_chain(
        &self,
        (project, iteration): (Uuid, Uuid),
        model_uri: &ModelUri,
        moves: Option<&(Uuid, String, cvchain_core::channels::IterationRef)>,
        observed: &Observed,
        delivery: &Delivery,
        scratch: &mut Scratch,
    ) -> (
        Result<Vec<Released>, ProcessError>,
        Result<Option<Next>, ProcessError>,
        Option<Result<String, ProcessError>>,
    ) {
        let now = delivery.now;
        let mut chain_scratch = Scratch {
            steps: scratch.steps.clone(),
            later: Some(Vec::new()),
            kept: scratch.kept.clone(),
            first_delivery: scratch.first_delivery,
            ..Default::default()
        };
        let mut released_at = now;
        // Where the release's changes end in the tail (the moves' rows follow them).
        let mut release_end = scratch.tail.len();
        let left = async {
            let manifest = async {
                match moves {
                    Some((p, name, _)) => Some(self.lifecycle.channels.load(*p, name, now).await),
                    None => None,
                }
            };
            let (done, manifest) = tokio::join!(
                self.release(project, iteration, model_uri, observed, now, scratch),
                manifest
            );
            released_at = OffsetDateTime::now_utc();
            release_end = scratch.tail.len();
            let done = match done {
                Ok(d) => d,
                Err(e) => return (Err(e), None),
            };
            let Some((p, name, it)) = moves else {
                return (Ok(done), None);
            };
            let moved = async {
                let known = self.steps(&mut scratch.steps, *p, it.id).await?;
                self.lifecycle
                    .move_channels_into(
                        *p,
                        name,
                        it,
                        Some(known),
                        Complete::Released(&done),
                        delivery,
                        Some(&mut scratch.tail),
                        manifest,
                    )
                    .await
            }
            .await;
            (Ok(done), Some(moved))
        };
        let right = self.run_chain(project, iteration, observed, now, &mut chain_scratch);
        let ((done, moved), chain) = tokio::join!(left, right);
        // The chain's changes, after the release's: their events from the rows as the release
        // left them, at the moment it ended (before the moves' events), in their own order.
        let Scratch {
            logs,
            mut tail,
            later,
            ..
        } = chain_scratch;
        for (k, (i, w)) in later.unwrap_or_default().into_iter().enumerate() {
            if let Some(events) = &self.events {
                let at = released_at + time::Duration::microseconds(k as i64);
                let rows = events.step_outbox(
                    &w,
                    scratch.steps.as_deref().unwrap_or_default(),
                    observed,
                    at,
                );
                match &mut tail[i] {
                    TailWrite::Insert { outbox, .. } | TailWrite::Merge { outbox, .. } => {
                        *outbox = rows
                    }
                }
            }
            if let Some(steps) = scratch.steps.as_mut() {
                apply_step_write(steps, &w);
            }
        }
        // In the tail as one after another: the release's, the chain's, the moves'.
        let mut moves_rows = scratch.tail.split_off(release_end.min(scratch.tail.len()));
        scratch.logs.extend(logs);
        scratch.tail.append(&mut tail);
        scratch.tail.append(&mut moves_rows);
        (done, chain, moved)
    }

    /// Requests the next export of the chain. The decisions are the core's (`plan_chain`,
    /// `step_writes`, `request_outcome`); this loop only carries them out, and asks again when
    /// the service refuses an entry for good, so the chain moves on.
    async fn run_chain(
        &self,
        project: Uuid,
        iteration: Uuid,
        observed: &Observed,
        now: OffsetDateTime,
        scratch: &mut Scratch,
    ) -> Result<Option<Next>, ProcessError> {
        let Scratch {
            steps: cache,
            logs,
            tail,
            later,
            kept,
            ..
        } = scratch;
        let chain = &self.config.chain.exports;
        let (Some(cv), Some(it)) = (&self.cv, observed.iteration.as_ref()) else {
            return Ok(None);
        };
        let mut exports = observed.exports.clone().unwrap_or_default();
        let steps = self.steps(cache, project, iteration).await?;
        let mut refused = refused_targets(chain, steps);
        for _ in 0..=2 * chain.len() + 1 {
            let plan = plan_chain(chain, it, &exports, &refused);
            let steps = self.steps(cache, project, iteration).await?;
            for w in step_writes(project, iteration, &plan, steps, now) {
                self.defer_step(&w, cache, tail, later, kept, observed, None);
            }
            let Next::Request(target) = &plan.next else {
                if let Next::NotReady(r) = &plan.next {
                    return Err(ProcessError::NotReady(r.clone()));
                }
                return Ok(Some(plan.next));
            };
            // One requester at a time. Inside the claim, a request another instance made a moment
            // ago shows in its step row, which it writes before giving the claim back; a claim
            // taken over from a holder that crashed asks GetExports, the source of truth.
            let Some(claim) = self
                .claims
                .acquire(&ClaimKey::export_request(project, iteration, target))
                .await?
            else {
                // Another invocation is at it (or crashed holding it: the claim expires). Ask for a
                // retry rather than acknowledging, so the chain cannot stall on a dead claim.
                return Err(ProcessError::NotReady(format!(
                    "{target} is being requested by another invocation"
                )));
            };
            /// What the request under the claim came to.
            enum Asked {
                /// GetExports shows the export already (a claim taken over).
                Exists(Vec<cvchain_core::customvision::Export>),
                /// Its step row shows another instance requested it a moment ago.
                Requested,
                Answered(RequestOutcome, Option<CvError>),
            }
            let taken_over = claim.taken_over;
            let position = chain_position(chain, target);
            // The claim is renewed while the work runs (Custom Vision's retries can outlast it),
            // and given back only after the step row is written: whoever takes it next sees the
            // row. A claim taken over from a holder that crashed asks GetExports, the source of
            // truth, since that holder may have requested without writing its row.
            let (asked, claim) =
                self.claims
                    .hold_keep(claim, async {
                        if taken_over {
                            let fresh = cv.get_exports(project, iteration).await?;
                            if fresh.iter().any(|e| target.matches(e)) {
                                return Ok::<_, ProcessError>(Asked::Exists(fresh));
                            }
                        } else {
                            let key = step_row_key(iteration, target);
                            let row = self.history.get(&project.to_string(), &key).await?;
                            if row.map(|r| StepRow::from_row(&r)).is_some_and(|s| {
                                s.state.is_some_and(|st| st != EntryState::Pending)
                            }) {
                                return Ok(Asked::Requested);
                            }
                        }
                        let result = cv
                            .export_iteration(
                                project,
                                iteration,
                                &target.platform,
                                target.flavor.as_deref(),
                            )
                            .await;
                        Ok(Asked::Answered(request_outcome(&result), result.err()))
                    })
                    .await?;
            // The step row the answer calls for, written with the claim's release in one
            // transaction: whoever takes the claim next sees the row.
            let written = match &asked {
                Ok(Asked::Answered(outcome, _)) if *outcome != RequestOutcome::Transient => {
                    let write = async {
                        let exists = step_exists(
                            self.steps(cache, project, iteration).await?,
                            iteration,
                            target,
                        );
                        match step_after_request(
                            project, iteration, position, target, outcome, exists, now,
                        ) {
                            Some(w) => {
                                self.defer_step(
                                    &w,
                                    cache,
                                    tail,
                                    later,
                                    kept,
                                    observed,
                                    Some(claim.clone()),
                                );
                                Ok::<_, ProcessError>(true)
                            }
                            None => Ok(false),
                        }
                    };
                    write.await
                }
                _ => Ok(false),
            };
            if !matches!(written, Ok(true)) {
                self.give_back(&claim).await;
            }
            written?;
            let asked = asked?;
            match asked {
                Asked::Exists(fresh) => {
                    exports = fresh;
                    continue;
                }
                Asked::Requested => return Ok(Some(Next::Wait(target.clone()))),
                Asked::Answered(RequestOutcome::Transient, error) => {
                    return Err(error
                        .map(ProcessError::CustomVision)
                        .unwrap_or_else(|| ProcessError::NotReady("export".into())));
                }
                Asked::Answered(RequestOutcome::Refused(reason), _) => {
                    logs.push(format!("export {target} refused: {reason}"));
                    refused.push(target.clone());
                }
                Asked::Answered(..) => return Ok(Some(plan.next)),
            }
        }
        Ok(Some(Next::NotReady("stopped after refusals".into())))
    }

    /// Copies every finished export of the iteration that has no current release copy, and
    /// records each copy on its export step row.
    async fn release(
        &self,
        project: Uuid,
        iteration: Uuid,
        model_uri: &ModelUri,
        observed: &Observed,
        now: OffsetDateTime,
        scratch: &mut Scratch,
    ) -> Result<Vec<Released>, ProcessError> {
        let Scratch {
            steps: cache,
            logs,
            tail,
            later,
            kept,
            first_delivery,
        } = scratch;
        let exports = observed.exports.clone().unwrap_or_default();
        let plans = plan_releases(
            project,
            iteration,
            &exports,
            model_uri,
            self.config.backup_container.is_some(),
        );
        if plans.is_empty() {
            return Ok(Vec::new());
        }
        let steps = self.steps(cache, project, iteration).await?.clone();
        let plans = releases_due(
            plans,
            model_uri,
            project,
            iteration,
            &self.config.chain.exports,
            &steps,
        )
        .into_iter()
        .map(|mut p| {
            p.expect_free &= *first_delivery;
            p
        })
        .collect::<Vec<_>>();
        let facts = ReleaseFacts {
            precision: observed.performance.as_ref().and_then(|p| p.precision),
            recall: observed.performance.as_ref().and_then(|p| p.recall),
            exported_at: table_datetime(now),
        };
        let mut done = Vec::new();
        for plan in plans {
            let names = ReleaseNames {
                project_id: project,
                project_name: observed
                    .project
                    .as_ref()
                    .map(|p| p.name.clone())
                    .unwrap_or_default(),
                iteration_id: iteration,
                iteration_name: observed
                    .iteration
                    .as_ref()
                    .map(|i| i.name.clone())
                    .unwrap_or_default(),
                platform: plan.platform.clone(),
                flavor: plan.flavor.clone(),
            };
            let target = ExportTarget {
                platform: plan.platform.clone(),
                flavor: plan.flavor.clone(),
            };
            // One copier at a time per export; the store re-checks the destination inside.
            // The source is read beside taking the claim (a read changes nothing).
            let key = ClaimKey::copy(project, iteration, &target);
            let (claim, source) =
                tokio::join!(self.claims.acquire(&key), self.releases.read_source(&plan));
            let Some(claim) = claim? else {
                return Err(ProcessError::NotReady(format!(
                    "{target} is being copied by another invocation"
                )));
            };
            // A copy is polled for up to ten minutes: the claim is renewed while it runs, and
            // the work stops the moment the claim is lost.
            let (released, claim) = self
                .claims
                .hold_keep(
                    claim,
                    self.releases
                        .release_from(&plan, &names, &facts, Some(source)),
                )
                .await?;
            // The claim goes back with the step row's write (one transaction), or alone.
            let mut claim = Some(claim);
            let released = match released {
                Ok(r) => r,
                Err(ReleaseError::Storage(e)) => {
                    if let Some(c) = claim.take() {
                        self.give_back(&c).await;
                    }
                    return Err(e.into());
                }
                // Permanent: recorded on the step row; the other exports go on.
                Err(ReleaseError::Refused(reason)) => {
                    tracing::warn!(export = %target, "release refused: {reason}");
                    logs.push(format!("release of {target} refused: {reason}"));
                    let writes = release_refused_writes(
                        project,
                        iteration,
                        &self.config.chain.exports,
                        &target,
                        &reason,
                        &steps,
                        now,
                    );
                    self.defer_steps(&writes, cache, tail, later, kept, observed, claim.take())
                        .await;
                    continue;
                }
            };
            if released.copied {
                logs.push(format!(
                    "released {target} to {}/{} ({} bytes, {} ms)",
                    self.releases.container_name(),
                    released.path,
                    released.size,
                    released.millis
                ));
            } else {
                logs.push(format!("release of {target} is current: {}", released.path));
            }
            let writes = release_writes(
                project,
                iteration,
                &self.config.chain.exports,
                &target,
                &released,
                &steps,
                now,
            );
            self.defer_steps(&writes, cache, tail, later, kept, observed, claim.take())
                .await;
            done.push(released);
        }
        Ok(done)
    }

    /// Leaves step row changes for the notification's transaction, the first with `release`
    /// given back in it (or now, alone, when there is none).
    #[allow(clippy::too_many_arguments)]
    async fn defer_steps(
        &self,
        writes: &[StepWrite],
        cache: &mut Option<Vec<StepRow>>,
        tail: &mut Vec<TailWrite>,
        later: &mut Option<Vec<(usize, StepWrite)>>,
        kept: &Kept,
        observed: &Observed,
        release: Option<Claim>,
    ) {
        let mut release = release;
        for w in writes {
            self.defer_step(w, cache, tail, later, kept, observed, release.take());
            // A release records what happened whatever the row says by then: a row another
            // message wrote meanwhile (the chain's request, written at the end of its
            // invocation) gets the release merged in, not lost to insert-if-absent. Its events
            // are the insert's, as told from the rows this message read.
            if let Some(last) = tail.last_mut()
                && let TailWrite::Insert {
                    row,
                    outbox,
                    release,
                } = last
            {
                *last = TailWrite::Merge {
                    partition_key: row.partition_key.clone(),
                    row_key: row.row_key.clone(),
                    properties: std::mem::take(&mut row.properties),
                    outbox: std::mem::take(outbox),
                    release: release.take(),
                };
            }
        }
        if let Some(c) = release {
            self.give_back(&c).await;
        }
    }

    /// Leaves a step row change (with the events it emits, told from the row as this message
    /// knows it, and `release` given back with it) for the transaction that records the
    /// notification's row, and keeps the message's step rows in line.
    #[allow(clippy::too_many_arguments)]
    fn defer_step(
        &self,
        w: &StepWrite,
        cache: &mut Option<Vec<StepRow>>,
        tail: &mut Vec<TailWrite>,
        later: &mut Option<Vec<(usize, StepWrite)>>,
        kept: &Kept,
        observed: &Observed,
        release: Option<Claim>,
    ) {
        if let Some(c) = &release {
            kept.add(c.clone());
        }
        let outbox = match (later.as_mut(), &self.events) {
            (Some(later), _) => {
                later.push((tail.len(), w.clone()));
                Vec::new()
            }
            (None, Some(events)) => events.step_outbox(
                w,
                cache.as_deref().unwrap_or_default(),
                observed,
                OffsetDateTime::now_utc(),
            ),
            (None, None) => Vec::new(),
        };
        tail.push(match w {
            StepWrite::Insert(row) => TailWrite::Insert {
                row: row.clone(),
                outbox,
                release,
            },
            StepWrite::Merge {
                partition_key,
                row_key,
                properties,
            } => TailWrite::Merge {
                partition_key: partition_key.clone(),
                row_key: row_key.clone(),
                properties: properties.clone(),
                outbox,
                release,
            },
        });
        if let Some(steps) = cache.as_mut() {
            apply_step_write(steps, w);
        }
    }

    /// Gives a claim back; one not given back expires on its own.
    async fn give_back(&self, claim: &Claim) {
        if let Err(e) = self.claims.release(claim).await {
            tracing::warn!(error = %e, claim = %claim.row_key, "cannot give a claim back; it expires");
        }
    }

    /// The iteration's step rows: read on first use, then kept in line with this message's
    /// writes.
    async fn steps<'a>(
        &self,
        cache: &'a mut Option<Vec<StepRow>>,
        project: Uuid,
        iteration: Uuid,
    ) -> Result<&'a mut Vec<StepRow>, ProcessError> {
        if cache.is_none() {
            *cache = Some(self.history.steps(project, iteration).await?);
        }
        Ok(cache.as_mut().expect("just read"))
    }
}

/// How an invocation's result reads on its span and in its metrics: the outcome, the decision
/// (what the plan decided and the chain did, from the invocation's log lines, already free of
/// secrets) and, for a failure, the error.
pub fn traced(
    result: &Result<Outcome, ProcessError>,
) -> (cvchain_core::trace::Outcome, Option<String>, Option<String>) {
    use cvchain_core::trace::Outcome as T;
    match result {
        Ok(o) => {
            let outcome = match (&o.disposition, o.duplicate) {
                (Disposition::Rejected, _) => T::Rejected,
                (Disposition::Recorded, true) => T::Duplicate,
                (Disposition::Recorded, false) => T::Recorded,
            };
            let decision: Vec<&str> = o
                .logs
                .iter()
                .map(String::as_str)
                .filter(|l| {
                    [
                        "rejected:",
                        "export chain:",
                        "channels:",
                        "publish:",
                        "retention:",
                        "released ",
                        "release of ",
                        "export ",
                    ]
                    .iter()
                    .any(|p| l.starts_with(p))
                })
                .collect();
            let decision = if decision.is_empty() {
                o.logs.first().cloned()
            } else {
                Some(decision.join("; "))
            };
            (outcome, decision, None)
        }
        Err(ProcessError::NotReady(why)) => (T::Retry, Some(format!("not ready: {why}")), None),
        Err(e) => (T::Failed, None, Some(scrub(&e.to_string()))),
    }
}

/// The project and iteration a notification is about.
fn decision_ids(decision: &Decision) -> Option<(Uuid, Uuid)> {
    match decision {
        Decision::Accepted(n) => Some((n.project_id()?, n.iteration_id()?)),
        _ => None,
    }
}

/// The tail with each claim as last renewed; one taken over meanwhile is not given back.
fn patched(tail: &[TailWrite], kept: &Kept) -> Vec<TailWrite> {
    tail.iter()
        .cloned()
        .map(|mut t| {
            let (TailWrite::Insert { release, .. } | TailWrite::Merge { release, .. }) = &mut t;
            if let Some(c) = release.take() {
                *release = kept.current(&c);
            }
            t
        })
        .collect()
}

/// The tail's claims are no longer renewed: given back with it, or left to expire.
fn forget_all(tail: &[TailWrite], kept: &Kept) {
    for c in tail.iter().filter_map(TailWrite::release) {
        kept.forget(c);
    }
}
