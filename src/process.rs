//! `process(message) -> Outcome`: gather what the plan needs, call the core's decisions, carry
//! the actions out against storage and Custom Vision. Every entry point (the Functions handler,
//! the queue worker) goes through here. Nothing is decided here that the core could decide.

use crate::settings::Settings;
use azure_storage_queue::QueueClient;
use cvchain_azure::customvision::TrainingApi;
use cvchain_azure::history::{
    claims::{Claims, HoldError},
    store::{HistoryStore, Recorded},
};
use cvchain_azure::storage::{
    StorageError,
    blobs::{ReleaseError, ReleaseStore},
    clients::StorageClients,
    queue::{poison_queue_name, send_text},
    rejected::store_text,
};
use cvchain_core::chain::{ExportTarget, Next, plan_chain};
use cvchain_core::claims::ClaimKey;
use cvchain_core::customvision::{CvError, codes};
use cvchain_core::history::{
    Existing, PoisonCopy, Prop, Props, StepRow, existing_row, failed_row, table_datetime,
};
use cvchain_core::message::Incoming;
use cvchain_core::notification::Notification;
use cvchain_core::plan::{
    Action, Decision, Observed, PlanConfig, RequestOutcome, StepWrite, chain_position,
    describe_next, needs, plan, plan_unreadable, refused_targets, release_refused_writes,
    release_writes, request_outcome, step_after_request, step_exists, step_writes,
};
use cvchain_core::redact::scrub;
use cvchain_core::release::{ModelUri, ReleaseFacts, ReleaseNames, plan_releases};
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

/// Why a message could not be processed now. It stays on the queue and is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    CustomVision(#[from] CvError),
    #[error("not ready: {0}")]
    NotReady(String),
}

impl From<HoldError> for ProcessError {
    fn from(e: HoldError) -> Self {
        match e {
            HoldError::Storage(e) => ProcessError::Storage(e),
            // Whoever holds the claim now finishes the work; this delivery is retried.
            lost @ HoldError::Lost(_) => ProcessError::NotReady(lost.to_string()),
        }
    }
}

impl ProcessError {
    /// True when a retry may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ProcessError::Storage(e) => e.is_transient(),
            ProcessError::CustomVision(e) => e.is_transient(),
            ProcessError::NotReady(_) => true,
        }
    }
}

/// The adapters the actions need.
pub struct Processor {
    history: HistoryStore,
    poison: QueueClient,
    /// Where rejected texts too large for the poison queue are kept (named like it).
    rejected: azure_storage_blob::BlobContainerClient,
    config: PlanConfig,
    table_name: String,
    cv: Option<Arc<dyn TrainingApi>>,
    releases: ReleaseStore,
    max_dequeue: u32,
    claims: Claims,
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
            table_name: settings.history_table.clone(),
            cv,
        })
    }

    pub fn history(&self) -> &HistoryStore {
        &self.history
    }

    /// Processes one queue message. When it fails on the delivery the host will not retry
    /// (`DequeueCount` at `CVCHAIN_MAX_DEQUEUE`), the final failure is recorded first, so every
    /// poison-queue entry has a matching row.
    pub async fn process(&self, incoming: &Incoming) -> Result<Outcome, ProcessError> {
        let result = self.process_once(incoming).await;
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
        let observed = match &incoming.parsed {
            Ok(parsed) => self.observe(&parsed.notification).await?,
            Err(_) => Observed::default(),
        };
        let (decision, actions) = plan(incoming, &observed, &self.config);
        if let Decision::Retry(reason) = &decision {
            return Err(ProcessError::NotReady(reason.clone()));
        }
        self.carry_out(decision, actions, &observed, &incoming.key)
            .await
    }

    /// Records something that arrived but could not be read as a message at all.
    pub async fn process_unreadable(
        &self,
        incoming: &Incoming,
        reason: &str,
    ) -> Result<Outcome, ProcessError> {
        let (decision, actions) = plan_unreadable(incoming, reason, &self.config);
        self.carry_out(decision, actions, &Observed::default(), &incoming.key)
            .await
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
        if needs.iteration {
            match cv.get_iteration(project, iteration).await {
                Ok(it) => o.iteration = Some(it),
                Err(e) => {
                    o.problem = Some(permanent("iteration", &e)?);
                    return Ok(o);
                }
            }
        }
        if needs.project {
            match cv.get_project(project).await {
                Ok(p) => o.project = Some(p),
                Err(e) => {
                    o.problem = Some(permanent("project", &e)?);
                    return Ok(o);
                }
            }
        }
        if needs.performance {
            match cv.get_iteration_performance(project, iteration).await {
                Ok(p) => o.performance = Some(p),
                // No performance is no reason to stop the chain.
                Err(e) => {
                    permanent("performance", &e)?;
                }
            }
        }
        if needs.exports {
            match cv.get_exports(project, iteration).await {
                Ok(e) => o.exports = Some(e),
                Err(e) => {
                    o.problem = Some(permanent("exports", &e)?);
                    return Ok(o);
                }
            }
        }
        Ok(o)
    }

    async fn carry_out(
        &self,
        decision: Decision,
        actions: Vec<Action>,
        observed: &Observed,
        message_key: &str,
    ) -> Result<Outcome, ProcessError> {
        let now = OffsetDateTime::now_utc();
        let mut logs = Vec::new();
        let mut row_desc = String::new();
        let mut duplicate = false;
        let mut poison_already_sent = false;
        let mut recorded_row: Option<(String, String)> = None;
        let mut chain_status: Option<String> = None;
        let mut publish_status: Option<String> = None;
        for action in actions {
            match action {
                Action::Publish {
                    project,
                    iteration,
                    name,
                    prediction_id,
                } => {
                    let status = self
                        .publish(project, iteration, &name, &prediction_id)
                        .await?;
                    logs.push(format!("publish: {status}"));
                    publish_status = Some(status);
                }
                Action::Release {
                    project,
                    iteration,
                    model_uri,
                } => {
                    self.release(project, iteration, &model_uri, observed, now, &mut logs)
                        .await?;
                }
                Action::Chain { project, iteration } => {
                    let status = self
                        .run_chain(project, iteration, observed, now, &mut logs)
                        .await?;
                    logs.push(format!("export chain: {status}"));
                    chain_status = Some(status);
                }
                Action::Record(mut row) => {
                    if let Some(s) = &chain_status {
                        row.properties.set(Prop::ChainStatus, s);
                    }
                    if let Some(s) = &publish_status {
                        row.properties.set(Prop::PublishStatus, s);
                    }
                    row_desc = format!("{}/{}", self.table_name, row.describe());
                    let mut recorded = self.history.record(&row).await?;
                    // A row under this event's keys that another message wrote: this message
                    // gets its own row, and both say so.
                    if let Recorded::AlreadyPresent(existing) = &recorded
                        && let Existing::Another { row: own, note } =
                            existing_row(&row, existing, message_key)
                    {
                        let first = existing.row_key.clone();
                        row = own;
                        row_desc = format!("{}/{}", self.table_name, row.describe());
                        recorded = self.history.record(&row).await?;
                        if recorded == Recorded::Inserted {
                            self.history
                                .merge(&row.partition_key, &first, &note)
                                .await?;
                            tracing::warn!(
                                row = %row_desc,
                                first = %first,
                                "another message recorded this event first; recorded apart"
                            );
                        }
                    }
                    match recorded {
                        Recorded::Inserted => {
                            logs.push(format!("recorded {row_desc}"));
                        }
                        Recorded::AlreadyPresent(existing) => {
                            duplicate = true;
                            poison_already_sent = matches!(
                                existing.properties.text(Prop::PoisonCopy),
                                s if s == PoisonCopy::Sent.as_str()
                                    || s == PoisonCopy::Stored.as_str()
                            );
                            logs.push(format!(
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
                    logs.push(format!("copied the message to queue {queue}"));
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
                    logs.push(format!(
                        "too large for the poison queue: stored whole as blob {container}/{blob}"
                    ));
                }
            }
        }
        let disposition = match &decision {
            Decision::Accepted(notification) => {
                logs.insert(0, format!("received {notification}"));
                Disposition::Recorded
            }
            Decision::Rejected { reason, .. } => {
                logs.insert(0, format!("rejected: {reason}"));
                Disposition::Rejected
            }
            Decision::Retry(reason) => return Err(ProcessError::NotReady(reason.clone())),
        };
        Ok(Outcome {
            disposition,
            row: row_desc,
            duplicate,
            // Lines may quote what a message said (an unknown type): never a secret.
            logs: logs.iter().map(|l| scrub(l)).collect(),
        })
    }

    async fn publish(
        &self,
        project: Uuid,
        iteration: Uuid,
        name: &str,
        prediction_id: &str,
    ) -> Result<String, ProcessError> {
        let Some(cv) = &self.cv else {
            return Ok("no Custom Vision endpoint".into());
        };
        match cv
            .publish_iteration(project, iteration, name, prediction_id)
            .await
        {
            Ok(_) => Ok(format!("published as {name}")),
            Err(e) if e.code() == Some(codes::ITERATION_IS_PUBLISHED) => {
                Ok("already published".into())
            }
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => Ok(format!("refused: {e}")),
        }
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
        logs: &mut Vec<String>,
    ) -> Result<String, ProcessError> {
        let chain = &self.config.chain.exports;
        let (Some(cv), Some(it)) = (&self.cv, observed.iteration.as_ref()) else {
            return Ok("no iteration to export".into());
        };
        let mut exports = observed.exports.clone().unwrap_or_default();
        let mut steps = self.history.steps(project, iteration).await?;
        let mut refused = refused_targets(chain, &steps);
        for _ in 0..=2 * chain.len() + 1 {
            let plan = plan_chain(chain, it, &exports, &refused);
            for w in step_writes(project, iteration, &plan, &steps, now) {
                self.write_step(&w).await?;
            }
            let Next::Request(target) = &plan.next else {
                if let Next::NotReady(r) = &plan.next {
                    return Err(ProcessError::NotReady(r.clone()));
                }
                return Ok(describe_next(&plan.next));
            };
            // One requester at a time; inside the claim, GetExports is asked again, so a request
            // another instance made a moment ago is seen, not repeated.
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
            // Custom Vision's retries can outlast the claim: it is renewed while they run.
            let asked = self
                .claims
                .hold(claim, async {
                    let fresh = cv.get_exports(project, iteration).await?;
                    if fresh.iter().any(|e| target.matches(e)) {
                        return Ok(Err(fresh));
                    }
                    Ok(Ok(cv
                        .export_iteration(
                            project,
                            iteration,
                            &target.platform,
                            target.flavor.as_deref(),
                        )
                        .await))
                })
                .await?;
            let result = match asked.map_err(ProcessError::CustomVision)? {
                Err(fresh) => {
                    exports = fresh;
                    continue;
                }
                Ok(result) => result,
            };
            let outcome = request_outcome(&result);
            if outcome == RequestOutcome::Transient {
                return Err(result
                    .err()
                    .map(ProcessError::CustomVision)
                    .unwrap_or_else(|| ProcessError::NotReady("export".into())));
            }
            if let Some(w) = step_after_request(
                project,
                iteration,
                chain_position(chain, target),
                target,
                &outcome,
                step_exists(&steps, iteration, target),
                now,
            ) {
                self.write_step(&w).await?;
            }
            match outcome {
                RequestOutcome::Refused(reason) => {
                    logs.push(format!("export {target} refused: {reason}"));
                    refused.push(target.clone());
                    steps = self.history.steps(project, iteration).await?;
                }
                _ => return Ok(describe_next(&plan.next)),
            }
        }
        Ok("stopped after refusals".into())
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
        logs: &mut Vec<String>,
    ) -> Result<(), ProcessError> {
        let exports = observed.exports.clone().unwrap_or_default();
        let plans = plan_releases(
            project,
            iteration,
            &exports,
            model_uri,
            self.config.backup_container.is_some(),
        );
        if plans.is_empty() {
            return Ok(());
        }
        let steps: Vec<StepRow> = self.history.steps(project, iteration).await?;
        let facts = ReleaseFacts {
            precision: observed.performance.as_ref().and_then(|p| p.precision),
            recall: observed.performance.as_ref().and_then(|p| p.recall),
            exported_at: table_datetime(now),
        };
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
            let Some(claim) = self
                .claims
                .acquire(&ClaimKey::copy(project, iteration, &target))
                .await?
            else {
                return Err(ProcessError::NotReady(format!(
                    "{target} is being copied by another invocation"
                )));
            };
            // A copy is polled for up to ten minutes: the claim is renewed while it runs, and
            // the work stops the moment the claim is lost.
            let released = self
                .claims
                .hold(claim, self.releases.release(&plan, &names, &facts))
                .await?;
            let released = match released {
                Ok(r) => r,
                Err(ReleaseError::Storage(e)) => return Err(e.into()),
                // Permanent: recorded on the step row; the other exports go on.
                Err(ReleaseError::Refused(reason)) => {
                    tracing::warn!(export = %target, "release refused: {reason}");
                    logs.push(format!("release of {target} refused: {reason}"));
                    for w in release_refused_writes(
                        project,
                        iteration,
                        &self.config.chain.exports,
                        &target,
                        &reason,
                        &steps,
                        now,
                    ) {
                        self.write_step(&w).await?;
                    }
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
            for w in release_writes(
                project,
                iteration,
                &self.config.chain.exports,
                &target,
                &released,
                &steps,
                now,
            ) {
                self.write_step(&w).await?;
            }
        }
        Ok(())
    }

    async fn write_step(&self, w: &StepWrite) -> Result<(), ProcessError> {
        match w {
            StepWrite::Insert(row) => {
                self.history.record(row).await?;
            }
            StepWrite::Merge {
                partition_key,
                row_key,
                properties,
            } => {
                self.history
                    .merge(partition_key, row_key, properties)
                    .await?;
            }
        }
        Ok(())
    }
}
