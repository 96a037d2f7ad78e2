//! Outbound events, in the application: history writes that carry the events they emit (one
//! transaction each, see `HistoryStore::record_with`), and delivery of the outbox to the sinks.
//!
//! Delivery runs after each invocation for the project it touched (in the background, so the
//! chain never waits for a sink), every minute from the `DeliverEvents` timer function, and
//! periodically in `cvchain worker` (up to [`PROJECTS_AT_ONCE`] projects at once, so a slow
//! one holds up no other). One deliverer per project at a time: a claim row, held (renewed) for
//! as long as the round runs, and the round stops the moment it is lost; each event's state is
//! saved as soon as its sink answered (each Event Grid request's together), so a crash or a
//! takeover sends again at most the one event, or request, that was in flight. Within a project
//! each sink takes events in order (a round here holds back what was written since a
//! notification still in flight here began: its own events come first), and a sink that is
//! down only holds up itself. Which events exist and what an answer means is the core's
//! (`cvchain_core::events`).

use crate::settings::Settings;
use cvchain_azure::events::{
    outbox::{Outbox, sequence},
    sinks::{SinkOptions, Sinks},
};
use cvchain_azure::history::{
    claims::{Claim, Claims, HoldError},
    store::{HistoryStore, Recorded, TailWrite},
};
use cvchain_azure::storage::{StorageError, clients::StorageClients, settings::StorageAuth};
use cvchain_core::claims::ClaimKey;
use cvchain_core::events::{
    CloudEvent, DeliveryState, EventContext, EventType, IterationFacts, OutboxRow, Routing, Sink,
    chain_completed,
    delivery::{self, Answer, RetryPolicy, after_attempt, batches, due_for, fit},
    insert_events, outbox_row_routed, step_write_events,
};
use cvchain_core::history::{HistoryRow, StepRow};
use cvchain_core::plan::{Observed, StepWrite};
use futures::StreamExt as _;
use std::sync::Arc;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tracing::Instrument as _;
use uuid::Uuid;

/// Projects the timer's round (and the worker's) delivers at once: a project whose sink is slow
/// takes one of them, not everyone's turn.
pub const PROJECTS_AT_ONCE: usize = 8;

/// What a delivery round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    /// Refused and waiting for a retry.
    pub waiting: usize,
    /// Given up for good (recorded on the outbox row).
    pub failed: usize,
    /// Projects another instance was delivering at that moment.
    pub busy: usize,
    /// Rounds stopped because their claim was lost (renewals failed, or it was taken over):
    /// whoever holds it now goes on.
    pub stopped: usize,
    /// Projects not delivered for a storage error (the timer's round goes on with the others;
    /// the next run tries them again).
    pub errors: usize,
}

impl DeliveryReport {
    fn add(&mut self, other: &DeliveryReport) {
        self.delivered += other.delivered;
        self.waiting += other.waiting;
        self.failed += other.failed;
        self.busy += other.busy;
        self.stopped += other.stopped;
        self.errors += other.errors;
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} delivered, {} waiting for a retry, {} failed for good",
            self.delivered, self.waiting, self.failed
        );
        if self.busy > 0 {
            s.push_str(&format!(
                ", {} project(s) being delivered by another instance",
                self.busy
            ));
        }
        if self.stopped > 0 {
            s.push_str(&format!(
                ", {} round(s) stopped: the project's claim was lost (its new holder goes on)",
                self.stopped
            ));
        }
        if self.errors > 0 {
            s.push_str(&format!(
                ", {} project(s) not delivered for a storage error (the next run tries again)",
                self.errors
            ));
        }
        s
    }
}

/// The outbox and the sinks.
pub struct Events {
    history: HistoryStore,
    outbox: Outbox,
    pub sinks: Sinks,
    ctx: EventContext,
    /// The queue's encoding, the Event Grid endpoint's kind, what chat is told.
    routing: Routing,
    claims: Claims,
    retry: RetryPolicy,
    /// How often `cvchain worker` delivers what is pending.
    pub deliver_every: std::time::Duration,
    /// The notifications this process is handling now, by project and when each began.
    in_flight: InFlight,
}

/// Notifications being processed in this process: each one's own events are written when it
/// ends but placed at its start, so until it ends a delivery round here sends none of its
/// project's events placed after that start ([`delivery::settled`]). A round on another
/// instance does not know of them (see `docs/events.md`, Order).
#[derive(Debug, Default)]
struct InFlight {
    next: std::sync::atomic::AtomicU64,
    began: std::sync::Mutex<Vec<(u64, String, OffsetDateTime)>>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, String, OffsetDateTime)>> {
        // A panic while holding it cannot leave the list half-changed (one push or remove).
        self.began.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the earliest notification of `partition_key` still in flight begins the order.
    fn horizon(&self, partition_key: &str) -> Option<String> {
        self.lock()
            .iter()
            .filter(|(_, pk, _)| pk == partition_key)
            .map(|(_, _, at)| *at)
            .min()
            .map(|at| sequence(at, 0))
    }
}

/// A notification in flight ([`Events::begin`]); dropping it ends it.
#[must_use = "the notification is in flight only while this is held"]
pub struct Handling {
    events: Arc<Events>,
    id: u64,
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.events
            .in_flight
            .lock()
            .retain(|(id, _, _)| *id != self.id);
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("sinks", &self.sinks)
            .field("source", &self.ctx.source)
            .finish()
    }
}

/// The storage account's name, for the default `source`.
fn account_name(settings: &Settings) -> String {
    if let StorageAuth::SharedKey { account, .. } = &settings.storage.auth {
        return account.clone();
    }
    let url = &settings.storage.table_endpoint;
    match url.host() {
        Some(url::Host::Domain(d)) if d != "localhost" => {
            d.split('.').next().unwrap_or(d).to_owned()
        }
        _ => url
            .path_segments()
            .and_then(|mut s| s.find(|p| !p.is_empty()))
            .unwrap_or("account")
            .to_owned(),
    }
}

impl Events {
    /// The events machinery the settings describe; `None` when no sink is configured (then no
    /// event is recorded at all).
    pub fn from_settings(
        settings: &Settings,
        clients: &StorageClients,
        options: SinkOptions,
    ) -> Result<Option<Arc<Self>>, StorageError> {
        if !settings.events.any() {
            return Ok(None);
        }
        let table = &settings.history_table;
        let source = settings
            .events
            .source
            .clone()
            .unwrap_or_else(|| EventContext::default_source(&account_name(settings), table));
        let release_container = format!(
            "{}/{}",
            settings
                .storage
                .blob_endpoint
                .as_str()
                .trim_end_matches('/'),
            settings.release.container
        );
        let history = HistoryStore::new(clients.table(table)?);
        Ok(Some(Arc::new(Self {
            outbox: Outbox::new(history.clone()),
            history,
            sinks: Sinks::new(&settings.events, clients, options)?,
            ctx: EventContext {
                source,
                table: table.clone(),
                release_container: Some(release_container),
            },
            routing: settings.events.routing(),
            claims: Claims::new(
                clients.table(table)?,
                std::time::Duration::from_secs(settings.claim_seconds),
            ),
            retry: settings.events.retry,
            deliver_every: settings.events.deliver_every,
            in_flight: InFlight::default(),
        })))
    }

    pub fn context(&self) -> &EventContext {
        &self.ctx
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The outbox rows of `events`, placed in the project's order at `at`.
    fn rows_for(
        &self,
        partition_key: &str,
        describes: &str,
        events: &[CloudEvent],
        at: OffsetDateTime,
    ) -> Vec<HistoryRow> {
        let sinks = self.sinks.configured();
        events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                // The chain's trace context travels with the event (its id stays the change's).
                let traced = match crate::telemetry::event_trace(e) {
                    Some(tp) => e.clone().in_trace(&tp, None),
                    None => e.clone(),
                };
                outbox_row_routed(
                    partition_key,
                    &traced,
                    describes,
                    &sinks,
                    &self.routing,
                    &sequence(at, i),
                )
            })
            .collect()
    }

    /// Inserts `row` (unless it exists) with the events it emits, plus `extra` events, each
    /// with its place in the project's order. The row's own events take theirs at `at` (a
    /// notification's: when its processing began, so `training.completed` comes before the
    /// export it started, although its row is written last), or now.
    pub async fn record(
        &self,
        row: &HistoryRow,
        facts: &IterationFacts,
        at: Option<OffsetDateTime>,
        extra: Vec<(CloudEvent, OffsetDateTime)>,
    ) -> Result<Recorded, StorageError> {
        let outbox = self.outbox_of(row, facts, at, extra);
        self.history.record_with(row, &outbox, None).await
    }

    /// The outbox rows `record` writes with `row`.
    pub fn outbox_of(
        &self,
        row: &HistoryRow,
        facts: &IterationFacts,
        at: Option<OffsetDateTime>,
        extra: Vec<(CloudEvent, OffsetDateTime)>,
    ) -> Vec<HistoryRow> {
        let now = OffsetDateTime::now_utc();
        let own = insert_events(row, facts, &self.ctx, now);
        let mut outbox = self.rows_for(&row.partition_key, &row.row_key, &own, at.unwrap_or(now));
        for (event, at) in extra {
            outbox.extend(self.rows_for(&row.partition_key, &row.row_key, &[event], at));
        }
        outbox
    }

    /// Records several rows of one change (each unless it exists, with the events it emits)
    /// in one transaction when they share a partition.
    pub async fn record_all(
        &self,
        rows: &[HistoryRow],
        facts: &IterationFacts,
    ) -> Result<(), StorageError> {
        let groups: Vec<(HistoryRow, Vec<HistoryRow>)> = rows
            .iter()
            .map(|r| (r.clone(), self.outbox_of(r, facts, None, Vec::new())))
            .collect();
        self.history.record_groups(&groups).await
    }

    /// Records a notification row with the events it emits; `chain_done` names the (project,
    /// iteration) whose chain this message saw complete, at `chain_ended_at`.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_notification(
        &self,
        row: &HistoryRow,
        observed: &Observed,
        chain_done: Option<(Uuid, Uuid)>,
        at: OffsetDateTime,
        chain_ended_at: OffsetDateTime,
        known: Option<&[StepRow]>,
        tail: &[TailWrite],
    ) -> Result<Recorded, StorageError> {
        let facts = facts(observed);
        let extra = self
            .completion(row, &facts, chain_done, chain_ended_at, known)
            .await?;
        let outbox = self.outbox_of(row, &facts, Some(at), extra);
        self.history.record_with_tail(row, &outbox, tail).await
    }

    /// `chain.completed`, when this message saw the chain of `chain_done` complete.
    async fn completion(
        &self,
        row: &HistoryRow,
        facts: &IterationFacts,
        chain_done: Option<(Uuid, Uuid)>,
        chain_ended_at: OffsetDateTime,
        known: Option<&[StepRow]>,
    ) -> Result<Vec<(CloudEvent, OffsetDateTime)>, StorageError> {
        let Some((project, iteration)) = chain_done else {
            return Ok(Vec::new());
        };
        // The steps as this message read and wrote them, when it did: no second read.
        let steps = match known {
            Some(k) => k.to_vec(),
            None => self.history.steps(project, iteration).await?,
        };
        let event = chain_completed(
            row,
            &project.to_string(),
            &iteration.to_string(),
            &steps,
            facts,
            &self.ctx,
            chain_ended_at,
        );
        Ok(vec![(event, chain_ended_at)])
    }

    /// The outbox rows of a notification row recorded apart (another message recorded its
    /// event first, and told that event): only `chain.completed`, when this message ended the
    /// chain. Its id is the chain's, so a chain told complete already is not told again.
    pub async fn completion_rows(
        &self,
        row: &HistoryRow,
        observed: &Observed,
        chain_done: Option<(Uuid, Uuid)>,
        chain_ended_at: OffsetDateTime,
        known: Option<&[StepRow]>,
    ) -> Result<Vec<HistoryRow>, StorageError> {
        let facts = facts(observed);
        let mut rows = Vec::new();
        for (event, at) in self
            .completion(row, &facts, chain_done, chain_ended_at, known)
            .await?
        {
            rows.extend(self.rows_for(&row.partition_key, &row.row_key, &[event], at));
        }
        Ok(rows)
    }

    /// Writes a step row change with the events it emits; what the row said before comes from
    /// `steps` (as the writer read them). `release`: the claim that guarded the change, given
    /// back in the same transaction.
    pub async fn write_step(
        &self,
        w: &StepWrite,
        steps: &[StepRow],
        observed: &Observed,
        release: Option<&Claim>,
    ) -> Result<(), StorageError> {
        let outbox = self.step_outbox(w, steps, observed, OffsetDateTime::now_utc());
        match w {
            StepWrite::Insert(row) => self
                .history
                .record_with(row, &outbox, release)
                .await
                .map(|_| ()),
            StepWrite::Merge {
                partition_key,
                row_key,
                properties,
            } => {
                self.history
                    .merge_with(partition_key, row_key, properties, &outbox, release)
                    .await
            }
        }
    }

    /// The outbox rows of the events a step row change emits, told from the row as `steps`
    /// (the writer's) has it, at `at` (their time and place in the project's order).
    pub fn step_outbox(
        &self,
        w: &StepWrite,
        steps: &[StepRow],
        observed: &Observed,
        at: OffsetDateTime,
    ) -> Vec<HistoryRow> {
        let (pk, rk) = match w {
            StepWrite::Insert(row) => (&row.partition_key, &row.row_key),
            StepWrite::Merge {
                partition_key,
                row_key,
                ..
            } => (partition_key, row_key),
        };
        let events =
            step_write_events(w, StepRow::find(steps, rk), &facts(observed), &self.ctx, at);
        self.rows_for(pk, rk, &events, at)
    }

    /// Marks a notification of `partition_key` in flight from now until the guard is dropped:
    /// call it before the processing takes the moment its own events are placed at.
    pub fn begin(self: &Arc<Self>, partition_key: &str) -> Handling {
        let id = self
            .in_flight
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.in_flight
            .lock()
            .push((id, partition_key.to_owned(), OffsetDateTime::now_utc()));
        Handling {
            events: self.clone(),
            id,
        }
    }

    /// `partition_key`'s pending events a round may send now, in order.
    async fn pending(&self, partition_key: &str) -> Result<Vec<OutboxRow>, StorageError> {
        let mut rows = self.outbox.list(Some(partition_key), true, 10_000).await?;
        let settled =
            delivery::settled(&rows, self.in_flight.horizon(partition_key).as_deref()).len();
        rows.truncate(settled);
        Ok(rows)
    }

    /// Delivers `partition_key`'s pending events in the background: the invocation that wrote
    /// them does not wait for a sink.
    pub fn deliver_later(self: &Arc<Self>, partition_key: String) {
        let me = self.clone();
        // The round is a child of the invocation that wrote the events (in its chain's trace).
        let round = crate::telemetry::round_span(&partition_key, Some(&tracing::Span::current()));
        tokio::spawn(async move {
            match me.deliver(&partition_key).instrument(round).await {
                Ok(r) if r == DeliveryReport::default() => {}
                Ok(r) => tracing::info!(project = %partition_key, "events: {}", r.describe()),
                Err(e) => {
                    tracing::warn!(project = %partition_key, error = %e, "events: delivery failed; the timer retries")
                }
            }
        });
    }

    /// Delivers every project's pending events every `deliver_every`, until dropped or aborted
    /// (`cvchain worker`'s periodic task: what the `DeliverEvents` timer is under the host).
    pub fn periodic(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(me.deliver_every).await;
                match me
                    .deliver_all()
                    .instrument(crate::telemetry::timer_span())
                    .await
                {
                    Ok(r) if r == DeliveryReport::default() => {}
                    Ok(r) => tracing::info!("events: {}", r.describe()),
                    Err(e) => tracing::warn!(error = %e, "events: periodic delivery failed"),
                }
            }
        })
    }

    /// Every project with pending events (the timer function and the worker's periodic task),
    /// [`PROJECTS_AT_ONCE`] at a time. A project that fails (a storage error) is logged and
    /// counted, and the others go on; only when every one failed is it an error.
    pub async fn deliver_all(&self) -> Result<DeliveryReport, StorageError> {
        let projects = self.outbox.pending_projects().await?;
        let count = projects.len();
        let mut results = futures::stream::iter(projects)
            .map(|pk| async move {
                let round = crate::telemetry::round_span(&pk, None);
                let result = self.deliver(&pk).instrument(round).await;
                (pk, result)
            })
            .buffer_unordered(PROJECTS_AT_ONCE);
        let mut report = DeliveryReport::default();
        let mut first_error = None;
        while let Some((pk, result)) = results.next().await {
            match result {
                Ok(r) => report.add(&r),
                Err(e) => {
                    tracing::warn!(project = %pk, error = %e, "events: delivery failed; the next run tries again");
                    report.errors += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        if crate::telemetry::metrics_on() {
            self.measure_outbox_age().await;
        }
        match first_error {
            Some(e) if report.errors == count => Err(e),
            _ => Ok(report),
        }
    }

    /// The age of the oldest event still pending after a round over every project (one query
    /// of the pending rows, made only when metrics are exported).
    async fn measure_outbox_age(&self) {
        if let Ok(rows) = self.outbox.list(None, true, 10_000).await {
            let now = OffsetDateTime::now_utc();
            let oldest = rows
                .iter()
                .filter(|r| r.pending)
                .filter_map(|r| r.time)
                .min();
            let age = oldest.map_or(0.0, |t| (now - t).as_seconds_f64());
            crate::telemetry::outbox_age(age);
        }
    }

    /// Delivers one project's pending events to every sink that is due, under the project's
    /// delivery claim (taken only when something is due), held for as long as the round runs:
    /// renewed while it sends, and the round stopped the moment the claim is lost. After the
    /// claim is given back it looks once more, so events written while it held the claim (by an
    /// invocation that found it held) are not left for the timer.
    pub async fn deliver(&self, partition_key: &str) -> Result<DeliveryReport, StorageError> {
        let mut report = DeliveryReport::default();
        for _ in 0..5 {
            // Nothing due (the usual case for a redelivery): one query, no claim.
            let rows = self.pending(partition_key).await?;
            let now = OffsetDateTime::now_utc();
            if Sink::ALL
                .into_iter()
                .all(|s| due_for(&rows, s, now).is_empty())
            {
                break;
            }
            let Some(claim) = self
                .claims
                .acquire(&ClaimKey::deliver(partition_key))
                .await?
            else {
                report.busy += 1;
                return Ok(report);
            };
            let round = match self.claims.hold(claim, self.round(partition_key)).await {
                Ok(round) => round?,
                Err(HoldError::Lost(claim)) => {
                    tracing::warn!(project = %partition_key, claim = %claim, "events: the delivery claim was lost mid-round; the round stopped (its new holder goes on)");
                    report.stopped += 1;
                    return Ok(report);
                }
                Err(HoldError::Storage(e)) => return Err(e),
            };
            report.add(&round);
            if round.delivered == 0 {
                break;
            }
        }
        Ok(report)
    }

    /// One round: each sink, on its own (a slow or dead one holds up no other), takes its due
    /// events in order; each event's state is saved as soon as its sink answered.
    async fn round(&self, partition_key: &str) -> Result<DeliveryReport, StorageError> {
        let rows = self.pending(partition_key).await?;
        let now = OffsetDateTime::now_utc();
        // The rows as saved so far: every save writes a row's states for all sinks and whether
        // it is still pending, so saves of one row by two sinks go one after the other.
        let saved = Mutex::new(rows.clone());
        let sends = self
            .sinks
            .configured()
            .into_iter()
            .map(|sink| self.deliver_to(sink, due_for(&rows, sink, now), &saved));
        let mut report = DeliveryReport::default();
        let mut first_error = None;
        for result in futures::future::join_all(sends).await {
            match result {
                Ok(r) => report.add(&r),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Sends `due` to `sink` in order, one event per request (one request per batch for Event
    /// Grid), recording each answer before the next request; stops at the first refusal (the
    /// rest keep their place in the order).
    async fn deliver_to(
        &self,
        sink: Sink,
        due: Vec<&OutboxRow>,
        saved: &Mutex<Vec<OutboxRow>>,
    ) -> Result<DeliveryReport, StorageError> {
        let mut report = DeliveryReport::default();
        let fitted: Vec<delivery::Fitted> = due
            .iter()
            .map(|r| fit(r, sink, &self.ctx, &self.routing))
            .collect();
        let groups = match sink {
            Sink::EventGrid => {
                let sizes: Vec<usize> = fitted.iter().map(|f| f.body.len()).collect();
                let (bytes, count) = self.sinks.eventgrid_request_limits();
                batches(&sizes, bytes, count)
            }
            _ => (0..due.len()).map(|i| i..i + 1).collect(),
        };
        let destination = self.sinks.describe(sink);
        for group in groups {
            // Each event's delivery is a span in the event's own trace (its chain's); an Event
            // Grid request carries several, and runs under the first one's.
            let spans: Vec<tracing::Span> = group
                .clone()
                .map(|i| {
                    crate::telemetry::delivery_span(
                        sink.as_str(),
                        &destination,
                        &due[i].id,
                        &due[i].kind,
                        fitted[i].trace,
                    )
                })
                .collect();
            let answer = match sink {
                Sink::EventGrid => {
                    let bodies: Vec<&str> = fitted[group.clone()]
                        .iter()
                        .map(|f| f.body.as_str())
                        .collect();
                    self.sinks
                        .send_batch(&bodies)
                        .instrument(spans[0].clone())
                        .await
                }
                _ => {
                    let i = group.start;
                    let traceparent =
                        crate::telemetry::delivery_traceparent(&spans[0], fitted[i].trace);
                    self.sinks
                        .send_one(sink, &due[i].id, &fitted[i].body, traceparent.as_deref())
                        .instrument(spans[0].clone())
                        .await
                }
            };
            let now = OffsetDateTime::now_utc();
            let mut states = Vec::new();
            for (n, i) in group.enumerate() {
                let row = due[i];
                let mut state = after_attempt(&row.state(sink), &answer, &self.retry, &row.id, now);
                if fitted[i].trimmed.is_some() {
                    state.note = fitted[i].trimmed.clone();
                }
                let outcome = match state.state {
                    delivery::State::Delivered => "delivered",
                    delivery::State::Failed => "failed",
                    _ => "retry",
                };
                crate::telemetry::delivery(sink.as_str(), outcome);
                crate::telemetry::delivery_done(&spans[n], outcome, state.answer.as_deref());
                self.tell(sink, row, &state, &answer, &mut report);
                states.push((row.row_key.clone(), state));
            }
            self.save_states(sink, &states, saved).await?;
            if !matches!(answer, Answer::Delivered(_)) {
                break;
            }
        }
        Ok(report)
    }

    /// Counts and logs what an answer made of one event.
    fn tell(
        &self,
        sink: Sink,
        row: &OutboxRow,
        state: &DeliveryState,
        answer: &Answer,
        report: &mut DeliveryReport,
    ) {
        match (&state.state, answer) {
            (delivery::State::Delivered, _) => report.delivered += 1,
            (delivery::State::Failed, _) => {
                report.failed += 1;
                tracing::warn!(
                    sink = %self.sinks.describe(sink),
                    event = %row.id,
                    answer = state.answer.as_deref().unwrap_or_default(),
                    "events: a sink refused an event for good; `cvchain events replay` sends it again"
                );
            }
            (_, Answer::Refused { .. }) => {
                report.waiting += 1;
                tracing::warn!(
                    sink = %self.sinks.describe(sink),
                    next = state.next_at.as_deref().unwrap_or_default(),
                    answer = state.answer.as_deref().unwrap_or_default(),
                    "events: a sink did not take an event; it waits for a retry"
                );
            }
            _ => {}
        }
    }

    /// Saves `sink`'s new states of these rows (one transaction for several).
    async fn save_states(
        &self,
        sink: Sink,
        states: &[(String, DeliveryState)],
        saved: &Mutex<Vec<OutboxRow>>,
    ) -> Result<(), StorageError> {
        let mut rows = saved.lock().await;
        let mut changed = Vec::new();
        for (row_key, state) in states {
            if let Some(row) = rows.iter_mut().find(|r| &r.row_key == row_key) {
                row.states.retain(|(s, _)| *s != sink);
                row.states.push((sink, state.clone()));
                changed.push(row.clone());
            }
        }
        self.outbox.save_all(&changed).await
    }

    /// `cvchain events replay`: the matching events become pending again for every configured
    /// sink (same ids), then are delivered; a chat sink is again told only the chosen ones.
    pub async fn replay(
        &self,
        project: Option<&str>,
        since: Option<OffsetDateTime>,
        kind: Option<EventType>,
    ) -> Result<(usize, DeliveryReport), StorageError> {
        let rows = self.outbox.list(project, false, 100_000).await?;
        let sinks = self.sinks.configured();
        let mut projects: Vec<String> = Vec::new();
        let mut count = 0;
        for r in rows.iter().filter(|r| {
            since.is_none_or(|s| r.time.is_some_and(|t| t >= s))
                && kind.is_none_or(|k| r.kind == k.as_str())
        }) {
            let event = CloudEvent::from_json(&r.event).unwrap_or_else(|_| CloudEvent {
                specversion: "1.0".into(),
                id: r.id.clone(),
                source: self.ctx.source.clone(),
                kind: r.kind.clone(),
                subject: r.subject.clone(),
                time: String::new(),
                datacontenttype: cvchain_core::events::DATA_CONTENT_TYPE.into(),
                traceparent: None,
                tracestate: None,
                data: serde_json::Value::Null,
            });
            self.outbox
                .reset_to(r, &self.routing.initial_states(&sinks, &event))
                .await?;
            count += 1;
            if !projects.contains(&r.partition_key) {
                projects.push(r.partition_key.clone());
            }
        }
        let mut report = DeliveryReport::default();
        for p in projects {
            report.add(&self.deliver(&p).await?);
        }
        Ok((count, report))
    }

    /// `cvchain events test`: one `io.cvchain.test` event to every sink, now, with each answer.
    /// Not recorded in the outbox.
    pub async fn test(&self) -> Vec<(Sink, String, Answer)> {
        let id = uuid::Uuid::new_v4().to_string();
        let event = cvchain_core::events::test_event(&self.ctx, &id, OffsetDateTime::now_utc());
        let mut out = Vec::new();
        for sink in self.sinks.configured() {
            let body = if sink.is_chat() {
                delivery::chat_for(&event, sink, &self.routing).body
            } else {
                event.to_json()
            };
            let answer = self
                .sinks
                .send(sink, &[(id.clone(), body)])
                .await
                .into_iter()
                .next()
                .unwrap_or(Answer::Refused {
                    status: None,
                    detail: "not sent".into(),
                    retry_after: None,
                });
            out.push((sink, self.sinks.describe(sink), answer));
        }
        out
    }
}

/// What Custom Vision said about the iteration, for the events' names and metrics.
pub fn facts(observed: &Observed) -> IterationFacts {
    let perf = observed.performance.as_ref();
    IterationFacts {
        project_name: observed
            .project
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default(),
        iteration_name: observed
            .iteration
            .as_ref()
            .map(|i| i.name.clone())
            .unwrap_or_default(),
        precision: perf.and_then(|p| p.precision),
        recall: perf.and_then(|p| p.recall),
        map: perf.and_then(|p| p.average_precision),
    }
}
