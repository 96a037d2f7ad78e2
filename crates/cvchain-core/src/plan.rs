//! What to do with a message: pure functions of the message, the settings and what was observed
//! (Custom Vision's answers, the history rows). The application's processor gathers the
//! observations, calls these, and carries the actions out through the adapters.

use crate::chain::{ChainPlan, EntryState, ExportTarget, Next};
use crate::channels::{IterationRef, iteration_ref};
use crate::config::{ChainSettings, LifecycleSettings};
use crate::customvision::{CvError, Export, Iteration, IterationPerformance, Project, codes};
use crate::gate::{Metrics, Verdict};
use crate::history::{
    HistoryRow, PoisonCopy, Prop, Props, RowStatus, StepRow, enrich_training, notification_row,
    rejected_row, step_row, step_row_key,
};
use crate::message::{Incoming, fits_queue_message};
use crate::notification::{EventStatus, ExportStatus, Notification, Parsed, TrainingStatus};
use crate::release::{ModelUri, Released, classify_model_uri};
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

/// What cvchain made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Understood (including `Unknown` kinds, which are recorded, not rejected).
    Accepted(Notification),
    /// Cannot be processed, now or ever: recorded and copied to the poison queue.
    Rejected {
        reason: String,
        field: Option<String>,
    },
    /// Custom Vision is not ready yet (an iteration still training): try again later.
    Retry(String),
}

/// One effect to carry out, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Insert the row unless a row with its keys exists.
    Record(HistoryRow),
    /// Copy the message text to the poison queue, once per recorded row.
    CopyToPoison { queue: String, text: String },
    /// A rejected text too large for the poison queue: stored whole as a blob in the container
    /// named like the poison queue, once per recorded row, and the row points to it.
    StoreRejected {
        container: String,
        blob: String,
        text: String,
    },
    /// The iteration passed the gate: the project's production pointer moves to it (unless it
    /// is older than the pointer or was rolled back from) and, with publishing configured, the
    /// prediction endpoint follows the pointer.
    Promote {
        project: Uuid,
        project_name: String,
        iteration: IterationRef,
    },
    /// After a release: the iteration's release copies move the channels they may move (see
    /// `channels`).
    Channels {
        project: Uuid,
        project_name: String,
        iteration: IterationRef,
    },
    /// When the chain is complete ([`retention_due`]): delete the project's oldest iterations
    /// beyond `CVCHAIN_KEEP_ITERATIONS` that nothing needs.
    Retain { project: Uuid, keep: usize },
    /// Run the export chain for the iteration (see `process`: it requests the next export).
    Chain { project: Uuid, iteration: Uuid },
    /// Copy the iteration's finished exports into the release container (see `release`).
    Release {
        project: Uuid,
        iteration: Uuid,
        model_uri: ModelUri,
    },
}

/// A decision and the actions that carry it out.
pub type Plan = (Decision, Vec<Action>);

/// The position of `target` in the chain (0 when it is not in it).
pub fn chain_position(chain: &[ExportTarget], target: &ExportTarget) -> usize {
    chain.iter().position(|c| c == target).unwrap_or(0)
}

/// What the planner needs from the settings.
#[derive(Debug, Clone, Default)]
pub struct PlanConfig {
    pub poison_queue: String,
    pub chain: ChainSettings,
    /// A Custom Vision endpoint is configured.
    pub custom_vision: bool,
    /// The container Custom Vision backs models up to (`exportModelContainerUri`).
    pub backup_container: Option<Url>,
    /// Only these projects are acted on (`CVCHAIN_PROJECTS`); `None` means all.
    pub projects: Option<Vec<Uuid>>,
    /// The gate, the channels and retention.
    pub lifecycle: LifecycleSettings,
}

impl PlanConfig {
    /// Whether cvchain acts on this notification's project.
    pub fn allows(&self, n: &Notification) -> bool {
        match (&self.projects, n.project_id()) {
            (Some(list), Some(p)) => list.contains(&p),
            (Some(_), None) => false,
            (None, _) => true,
        }
    }
}

/// What to look up in Custom Vision and the history before deciding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub project: bool,
    pub iteration: bool,
    pub performance: bool,
    pub exports: bool,
    /// The iteration now in production (the gate compares with it).
    pub production: bool,
}

/// The iteration now in production, as far as it was looked up.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Production {
    /// Not asked for.
    #[default]
    NotLooked,
    Empty,
    /// The pointer's iteration, and the one before it (what an iteration already in production
    /// was compared with).
    Iteration {
        current: IterationRef,
        previous: Option<IterationRef>,
    },
    /// The manifest cannot be read: the gate cannot compare, so it fails.
    Unknown(String),
}

/// What was observed, as far as `Needs` asked.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub project: Option<Project>,
    pub iteration: Option<Iteration>,
    pub performance: Option<IterationPerformance>,
    pub exports: Option<Vec<Export>>,
    pub production: Production,
    /// A permanent Custom Vision refusal while looking (iteration gone…): recorded; the chain
    /// stops for this message.
    pub problem: Option<String>,
}

/// What a notification needs looked up.
pub fn needs(n: &Notification, config: &PlanConfig) -> Needs {
    if !config.custom_vision || !config.allows(n) {
        return Needs::default();
    }
    let chain = !config.chain.exports.is_empty();
    match n {
        Notification::Training {
            status: TrainingStatus::Completed,
            ..
        } => Needs {
            project: true,
            iteration: true,
            performance: true,
            exports: chain,
            production: config.lifecycle.gate.compares_with_production(),
        },
        // A finished export is released: names, performance and GetExports are needed.
        Notification::Export {
            status: ExportStatus::Completed,
            ..
        } => Needs {
            project: true,
            iteration: true,
            performance: true,
            exports: true,
            production: false,
        },
        Notification::Export { .. } if chain => Needs {
            project: false,
            iteration: true,
            performance: false,
            exports: true,
            production: false,
        },
        // A failed training is announced only once Custom Vision confirms it (the iteration
        // exists and failed); its names come with the answers.
        Notification::Training {
            status: TrainingStatus::Failed,
            ..
        } => Needs {
            project: true,
            iteration: true,
            ..Needs::default()
        },
        _ => Needs::default(),
    }
}

/// Decides for a decoded message: its rejection when it is not a notification, else
/// [`plan_notification`].
pub fn plan(incoming: &Incoming, observed: &Observed, config: &PlanConfig) -> Plan {
    match &incoming.parsed {
        Ok(parsed) => plan_notification(incoming, parsed, observed, config),
        Err(e) => reject(
            incoming,
            &e.to_string(),
            e.field().map(str::to_owned),
            config,
        ),
    }
}

/// The row a notification is recorded under, worth looking for before anything else: the row
/// is written last, after every other effect, so when this message's own row exists (see
/// [`existing_row`](crate::history::existing_row)) it was handled and a redelivery has nothing
/// to do. The keys are the ones [`plan_notification`] records, whatever was observed. `None`
/// when recording the row is all there is to do (a ConnectionTest, a failed training without
/// Custom Vision): the insert itself tells a redelivery, so a read first would only add a
/// request.
pub fn redelivery_probe(
    incoming: &Incoming,
    parsed: &Parsed,
    config: &PlanConfig,
) -> Option<HistoryRow> {
    let (_, actions) = plan_notification(incoming, parsed, &Observed::default(), config);
    let only_the_row = actions.iter().all(|a| matches!(a, Action::Record(_)));
    if only_the_row && needs(&parsed.notification, config) == Needs::default() {
        return None;
    }
    actions.into_iter().rev().find_map(|a| match a {
        Action::Record(row) => Some(row),
        _ => None,
    })
}

/// Decides for something that arrived but could not even be read as a message (a broken envelope).
pub fn plan_unreadable(incoming: &Incoming, reason: &str, config: &PlanConfig) -> Plan {
    reject(incoming, reason, None, config)
}

fn reject(incoming: &Incoming, reason: &str, field: Option<String>, config: &PlanConfig) -> Plan {
    let mut row = rejected_row(incoming, reason, field.as_deref());
    row.properties.set(Prop::PoisonQueue, &config.poison_queue);
    row.properties
        .set(Prop::PoisonCopy, PoisonCopy::Pending.as_str());
    let text = incoming.received.text.clone();
    let copy = if fits_queue_message(&text) {
        Action::CopyToPoison {
            queue: config.poison_queue.clone(),
            text,
        }
    } else {
        Action::StoreRejected {
            container: config.poison_queue.clone(),
            blob: row.row_key.clone(),
            text,
        }
    };
    (
        Decision::Rejected {
            reason: reason.to_owned(),
            field,
        },
        vec![Action::Record(row), copy],
    )
}

/// Decides for a notification that parsed, given what was observed. The history row comes
/// last, so a failure before it leaves no row and the redelivery does the work again.
pub fn plan_notification(
    incoming: &Incoming,
    parsed: &Parsed,
    observed: &Observed,
    config: &PlanConfig,
) -> Plan {
    let n = &parsed.notification;
    let accepted = || Decision::Accepted(n.clone());
    let mut row = notification_row(incoming, parsed);
    note_decoding(&mut row, observed);
    let mut actions = Vec::new();
    let chain_configured = config.custom_vision && !config.chain.exports.is_empty();
    if !config.allows(n) {
        row.properties.set(Prop::Ignored, true);
        row.properties.set(
            Prop::ChainStatus,
            "ignored: the project is not in CVCHAIN_PROJECTS",
        );
        return (accepted(), vec![Action::Record(row)]);
    }
    if let Some(problem) = &observed.problem {
        row.properties
            .set(Prop::ChainStatus, format!("stopped: {problem}"));
        if matches!(n, Notification::Training { .. }) {
            row.properties.set(
                Prop::Confirmation,
                format!("unconfirmed: Custom Vision answered {problem}"),
            );
        }
        return (accepted(), vec![Action::Record(row)]);
    }
    if let Notification::Training { .. } = n
        && !config.custom_vision
    {
        row.properties.set(
            Prop::Confirmation,
            "unconfirmed: no Custom Vision endpoint is configured to confirm it with",
        );
    }
    match n {
        Notification::Training {
            project_id,
            iteration_id,
            status: TrainingStatus::Completed,
        } if config.custom_vision => {
            enrich_training(
                &mut row,
                observed.project.as_ref(),
                observed.iteration.as_ref(),
                observed.performance.as_ref(),
            );
            if let Some(it) = &observed.iteration {
                // The service says the opposite: recorded, neither announced nor acted on.
                if it.status.eq_ignore_ascii_case("Failed") {
                    confirm(&mut row, it);
                    row.properties.set(
                        Prop::ChainStatus,
                        "stopped: Custom Vision reports the training failed",
                    );
                    return (accepted(), vec![Action::Record(row)]);
                }
                if !it.status.eq_ignore_ascii_case("Completed") {
                    return (
                        Decision::Retry(format!(
                            "Custom Vision still reports iteration {iteration_id} as {:?}",
                            it.status
                        )),
                        Vec::new(),
                    );
                }
                confirm(&mut row, it);
            }
            let verdict = gate_verdict(observed, config);
            row.properties.set(
                Prop::GateVerdict,
                if verdict.passed { "passed" } else { "failed" },
            );
            row.properties.set(
                Prop::GateReasons,
                crate::message::bounded(&verdict.describe(), 1024).0,
            );
            // The chain first: the channels and publishing hang off it and never hold it up.
            if chain_configured {
                actions.push(Action::Chain {
                    project: *project_id,
                    iteration: *iteration_id,
                });
            }
            match &observed.iteration {
                Some(it) if verdict.passed => actions.push(Action::Promote {
                    project: *project_id,
                    project_name: project_name(observed),
                    iteration: iteration_ref(it, observed.performance.as_ref()),
                }),
                _ if config.chain.publish.is_some() => row.properties.set(
                    Prop::PublishStatus,
                    format!("not published: the gate failed ({})", verdict.describe()),
                ),
                _ => {}
            }
            if let Some(keep) = config.lifecycle.keep_iterations {
                actions.push(Action::Retain {
                    project: *project_id,
                    keep,
                });
            }
        }
        Notification::Training {
            iteration_id,
            status: TrainingStatus::Failed,
            ..
        } if config.custom_vision => {
            enrich_training(
                &mut row,
                observed.project.as_ref(),
                observed.iteration.as_ref(),
                None,
            );
            match &observed.iteration {
                // Custom Vision's status can trail its notification by a moment.
                Some(it) if is_training(&it.status) => {
                    return (
                        Decision::Retry(format!(
                            "Custom Vision still reports iteration {iteration_id} as {:?}",
                            it.status
                        )),
                        Vec::new(),
                    );
                }
                Some(it) => confirm(&mut row, it),
                None => row.properties.set(
                    Prop::Confirmation,
                    "unconfirmed: Custom Vision did not describe the iteration",
                ),
            }
        }
        Notification::Export {
            project_id,
            iteration_id,
            status,
            model_uri,
        } if config.custom_vision => {
            if *status == ExportStatus::Completed {
                let class =
                    classify_model_uri(model_uri.as_deref(), config.backup_container.as_ref());
                let note = match &class {
                    ModelUri::None => "none".to_owned(),
                    ModelUri::InBackup { .. } => "accepted: inside the backup container".to_owned(),
                    ModelUri::Refused { reason } => {
                        format!(
                            "refused ({reason}); not fetched, GetExports' downloadUri used instead"
                        )
                    }
                };
                row.properties.set(Prop::ModelUriStatus, note);
                if matches!(class, ModelUri::Refused { .. }) {
                    // The platform in an untrusted URL proves nothing: such a message gets a row
                    // of its own instead of passing for the genuine event.
                    row.row_key = format!(
                        "Export_{iteration_id}_msg-{}_{}",
                        incoming.key,
                        status.as_str()
                    );
                    row.properties.remove(Prop::ModelPlatform);
                }
                actions.push(Action::Release {
                    project: *project_id,
                    iteration: *iteration_id,
                    model_uri: class,
                });
            }
            // The export chain is the spine: the next export is requested before any channel
            // moves, so a move that cannot happen never holds the chain up.
            if chain_configured {
                actions.push(Action::Chain {
                    project: *project_id,
                    iteration: *iteration_id,
                });
            }
            if *status == ExportStatus::Completed
                && let Some(it) = &observed.iteration
            {
                actions.push(Action::Channels {
                    project: *project_id,
                    project_name: project_name(observed),
                    iteration: iteration_ref(it, observed.performance.as_ref()),
                });
            }
            if chain_configured && let Some(keep) = config.lifecycle.keep_iterations {
                actions.push(Action::Retain {
                    project: *project_id,
                    keep,
                });
            }
        }
        _ => {}
    }
    actions.push(Action::Record(row));
    (accepted(), actions)
}

/// Whether Custom Vision's iteration status says it is still training.
fn is_training(status: &str) -> bool {
    status.eq_ignore_ascii_case("Training") || status.eq_ignore_ascii_case("Queued")
}

/// Marks a Training row confirmed when Custom Vision reports the outcome it claims
/// (`TrainingCompleted`: the iteration is `Completed`; `TrainingFailed`: `Failed`), and says why
/// not otherwise. Only a confirmed notification is announced: a forged one for an iteration
/// that does not exist, or that says the opposite of the service, is recorded, never signed.
fn confirm(row: &mut HistoryRow, it: &Iteration) {
    let claimed = match row.status() {
        Some(RowStatus::Event(EventStatus::TrainingCompleted)) => "Completed",
        Some(RowStatus::Event(EventStatus::TrainingFailed)) => "Failed",
        _ => return,
    };
    if it.status.eq_ignore_ascii_case(claimed) {
        row.properties.set(Prop::Confirmed, true);
        row.properties.set(
            Prop::Confirmation,
            format!("confirmed: Custom Vision reports the iteration {claimed}"),
        );
    } else {
        row.properties.set(
            Prop::Confirmation,
            format!(
                "contradicted: Custom Vision reports the iteration {}, not {claimed}",
                crate::message::bounded(&it.status, 64).0
            ),
        );
    }
}

/// The project's name as Custom Vision reported it (empty when it did not).
fn project_name(observed: &Observed) -> String {
    observed
        .project
        .as_ref()
        .map(|p| p.name.clone())
        .unwrap_or_default()
}

/// The gate's verdict on the observed iteration, against the iteration now in production.
pub fn gate_verdict(observed: &Observed, config: &PlanConfig) -> Verdict {
    let gate = &config.lifecycle.gate;
    let metrics = observed
        .performance
        .as_ref()
        .map(Metrics::from)
        .unwrap_or_default();
    match &observed.production {
        Production::Unknown(why) if gate.compares_with_production() => Verdict {
            passed: false,
            reasons: vec![format!("the iteration in production is unknown: {why}")],
        },
        // An iteration already in production (a redelivery, or a copy of the message another
        // instance handled a moment ago) is judged as it was: against the one before it.
        Production::Iteration { current, previous }
            if observed
                .iteration
                .as_ref()
                .is_some_and(|i| i.id == current.id) =>
        {
            gate.evaluate(&metrics, previous.as_ref().map(|p| p.metrics()).as_ref())
        }
        Production::Iteration { current, .. } => gate.evaluate(&metrics, Some(&current.metrics())),
        _ => gate.evaluate(&metrics, None),
    }
}

/// Whether the chain has nothing more to do, so retention may run.
pub fn retention_due(next: Option<&Next>) -> bool {
    match next {
        // No chain configured for this notification: retention runs right away.
        None => true,
        Some(n) => matches!(n, Next::Empty | Next::Complete | Next::NotExportable(_)),
    }
}

/// The step row's reason for an export whose status cvchain does not know.
pub const UNKNOWN_EXPORT_STATUS: &str = "Custom Vision reports a status cvchain does not know \
(not Exporting, Done or Failed): the chain moved on; the export is released if it reports Done";

/// Notes what could not be read in Custom Vision's answers (see `decode_lenient`).
fn note_decoding(row: &mut HistoryRow, observed: &Observed) {
    let notes: Vec<&String> = observed
        .project
        .iter()
        .flat_map(|p| &p.decode_notes)
        .chain(observed.iteration.iter().flat_map(|i| &i.decode_notes))
        .chain(observed.performance.iter().flat_map(|p| &p.decode_notes))
        .chain(
            observed
                .exports
                .iter()
                .flatten()
                .flat_map(|e| &e.decode_notes),
        )
        .collect();
    if !notes.is_empty() {
        let text: Vec<&str> = notes.iter().map(|n| n.as_str()).collect();
        row.properties.set(Prop::DecodeNotes, text.join("; "));
    }
}

/// Reads the refused entries from an iteration's step rows.
pub fn refused_targets(chain: &[ExportTarget], steps: &[StepRow]) -> Vec<ExportTarget> {
    chain
        .iter()
        .filter(|t| {
            steps.iter().any(|s| {
                s.target.platform == t.platform
                    && s.target.flavor == t.flavor
                    && s.state == Some(EntryState::Refused)
            })
        })
        .cloned()
        .collect()
}

/// Whether the iteration has a step row for `target`.
pub fn step_exists(steps: &[StepRow], iteration: Uuid, target: &ExportTarget) -> bool {
    StepRow::find(steps, &step_row_key(iteration, target)).is_some()
}

/// A write to an export step row.
#[derive(Debug, Clone, PartialEq)]
pub enum StepWrite {
    /// A new row (inserted if absent).
    Insert(HistoryRow),
    /// Properties to merge into an existing row.
    Merge {
        partition_key: String,
        row_key: String,
        properties: Props,
    },
}

/// Applies a write to the step rows as read, so what a message wrote is what its next decision
/// sees, without reading the rows again.
pub fn apply_step_write(steps: &mut Vec<StepRow>, w: &StepWrite) {
    match w {
        StepWrite::Insert(row) => match steps.iter_mut().find(|s| s.row_key == row.row_key) {
            // Insert-if-absent: an existing row stays as it was.
            Some(_) => {}
            None => steps.push(StepRow::from_row(row)),
        },
        StepWrite::Merge {
            partition_key,
            row_key,
            properties,
        } => match steps.iter_mut().find(|s| s.row_key == *row_key) {
            Some(s) => {
                let mut row = s.row.clone();
                row.properties.extend(properties.clone());
                *s = StepRow::from_row(&row);
            }
            None => steps.push(StepRow::from_row(&HistoryRow {
                partition_key: partition_key.clone(),
                row_key: row_key.clone(),
                properties: properties.clone(),
            })),
        },
    }
}

/// Brings the step rows in line with the chain's state. Writes only what differs, so a
/// redelivered message writes nothing.
pub fn step_writes(
    project: Uuid,
    iteration: Uuid,
    plan: &ChainPlan,
    steps: &[StepRow],
    now: OffsetDateTime,
) -> Vec<StepWrite> {
    let mut out = Vec::new();
    for (position, (target, state)) in plan.entries.iter().enumerate() {
        if matches!(state, EntryState::Pending | EntryState::Refused) {
            continue;
        }
        let rk = step_row_key(iteration, target);
        match StepRow::find(steps, &rk) {
            None => {
                let mut row = step_row(project, iteration, position, target, *state);
                if state.is_final() {
                    row.properties.set(Prop::EndedAt, now);
                }
                if *state == EntryState::Skipped {
                    row.properties.set(
                        Prop::Reason,
                        "the iteration cannot export to this platform (exportableTo)",
                    );
                }
                if *state == EntryState::Unknown {
                    row.properties.set(Prop::Reason, UNKNOWN_EXPORT_STATUS);
                }
                out.push(StepWrite::Insert(row));
            }
            Some(row) => {
                // A final status never goes back (a later GetExports cannot undo an end).
                if row.state == Some(*state) || row.state.is_some_and(|s| s.is_final()) {
                    continue;
                }
                let mut props = Props::new();
                props.set(Prop::Status, RowStatus::Step(*state).as_str());
                if state.is_final() && !row.ended {
                    props.set(Prop::EndedAt, now);
                }
                out.push(StepWrite::Merge {
                    partition_key: project.to_string(),
                    row_key: rk,
                    properties: props,
                });
            }
        }
    }
    out
}

/// How an ExportIteration call ended, for the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Accepted (or already in progress, which counts as done): the entry is exporting.
    Exporting { note: Option<String> },
    /// Refused for good: recorded, and the chain moves to the next entry.
    Refused(String),
    /// Try the whole message again later.
    Transient,
}

/// Classifies the answer to ExportIteration.
pub fn request_outcome(result: &Result<Export, CvError>) -> RequestOutcome {
    match result {
        Ok(_) => RequestOutcome::Exporting { note: None },
        Err(e) if e.code() == Some(codes::EXPORT_ALREADY_IN_PROGRESS) => {
            RequestOutcome::Exporting {
                note: Some("already in progress".into()),
            }
        }
        Err(e) if e.is_transient() || e.code() == Some(codes::EXPORT_WHILE_TRAINING) => {
            RequestOutcome::Transient
        }
        Err(e) => RequestOutcome::Refused(e.to_string()),
    }
}

/// The step row write after a request.
pub fn step_after_request(
    project: Uuid,
    iteration: Uuid,
    position: usize,
    target: &ExportTarget,
    outcome: &RequestOutcome,
    existed: bool,
    now: OffsetDateTime,
) -> Option<StepWrite> {
    let (state, reason) = match outcome {
        RequestOutcome::Exporting { note } => (EntryState::Exporting, note.clone()),
        RequestOutcome::Refused(r) => (EntryState::Refused, Some(r.clone())),
        RequestOutcome::Transient => return None,
    };
    let mut props = Props::new();
    props.set(Prop::Status, RowStatus::Step(state).as_str());
    props.set(Prop::RequestedAt, now);
    if state == EntryState::Refused {
        props.set(Prop::EndedAt, now);
    }
    if let Some(r) = reason {
        props.set(Prop::Reason, crate::redact::redact(&r));
    }
    Some(if existed {
        StepWrite::Merge {
            partition_key: project.to_string(),
            row_key: step_row_key(iteration, target),
            properties: props,
        }
    } else {
        let mut row = step_row(project, iteration, position, target, state);
        row.properties.extend(props);
        StepWrite::Insert(row)
    })
}

/// The chain entry an export answers: its position and target. An entry without a flavor
/// answers an export of its platform with any flavor.
pub fn chain_entry(chain: &[ExportTarget], export: &ExportTarget) -> Option<(usize, ExportTarget)> {
    let as_export = Export {
        platform: export.platform.clone(),
        flavor: export.flavor.clone(),
        status: "Done".into(),
        ..Default::default()
    };
    chain
        .iter()
        .enumerate()
        .find(|(_, t)| t.matches(&as_export))
        .map(|(i, t)| (i, t.clone()))
}

/// The releases this notification is due: the export it names (a backup blob names its
/// platform), whatever its step row says, so a re-export replaces a stale copy; and every other
/// finished export whose step row records no release yet, so a lost message leaves no model
/// behind. Exports released before are not looked at again: the cost of a notification does not
/// grow with the chain.
pub fn releases_due(
    plans: Vec<crate::release::ReleasePlan>,
    model_uri: &ModelUri,
    project: Uuid,
    iteration: Uuid,
    chain: &[ExportTarget],
    steps: &[StepRow],
) -> Vec<crate::release::ReleasePlan> {
    let named = match model_uri {
        ModelUri::InBackup { blob_name } => {
            let prefix = format!("{project} - {iteration}.");
            blob_name.strip_prefix(&prefix).map(str::to_owned)
        }
        _ => None,
    };
    let unreleased = |p: &crate::release::ReleasePlan| {
        let target = ExportTarget {
            platform: p.platform.clone(),
            flavor: p.flavor.clone(),
        };
        let entry = chain_entry(chain, &target).map_or(target, |(_, t)| t);
        StepRow::find(steps, &step_row_key(iteration, &entry))
            .is_none_or(|s| s.release_url.is_none())
    };
    let is_named = |p: &crate::release::ReleasePlan| named.as_deref() == Some(p.platform.as_str());
    // Two flavors of one platform share the backup blob's name, and the notification does not
    // say which flavor it is about: the one not released yet is the export that just ended; one
    // released already is verified again only when no other is waiting (a re-export).
    let named_waiting = plans.iter().any(|p| is_named(p) && unreleased(p));
    plans
        .into_iter()
        .filter_map(|mut p| {
            let fresh = unreleased(&p);
            // The export the message names is verified again when none of its flavors waits.
            let named_again = is_named(&p) && !named_waiting;
            if !fresh && !named_again {
                return None;
            }
            p.expect_free = fresh;
            Some(p)
        })
        .collect()
}

/// Records a release copy on the export's step row: the chain entry the export answers, or a
/// row of its own (`ChainPosition` 0) for an export outside the chain. A copy that was already
/// current is recorded only where its row does not say so yet (a holder that crashed after
/// copying but before recording left it unrecorded).
pub fn release_writes(
    project: Uuid,
    iteration: Uuid,
    chain: &[ExportTarget],
    export: &ExportTarget,
    released: &Released,
    steps: &[StepRow],
    now: OffsetDateTime,
) -> Vec<StepWrite> {
    let in_chain = chain_entry(chain, export);
    let target = in_chain
        .as_ref()
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| export.clone());
    let mut props = Props::new();
    props.set(Prop::ReleaseStatus, RELEASED);
    props.set(Prop::ReleaseUrl, &released.url);
    props.set(Prop::ReleasePath, &released.path);
    props.set_int(Prop::ReleaseSize, released.size as i64);
    props.set_int(Prop::CopyMillis, released.millis as i64);
    props.set(Prop::ReleasedAt, now);
    let rk = step_row_key(iteration, &target);
    match StepRow::find(steps, &rk) {
        Some(step) if !released.copied && step.release_url.as_deref() == Some(&released.url) => {
            Vec::new()
        }
        Some(step) => {
            // Released means exported: the step's end is written with its release, so the
            // chain has no second write to make to this row.
            if !step.state.is_some_and(|st| st.is_final()) {
                props.set(Prop::Status, RowStatus::Step(EntryState::Done).as_str());
            }
            if !step.ended {
                props.set(Prop::EndedAt, now);
            }
            vec![StepWrite::Merge {
                partition_key: project.to_string(),
                row_key: rk,
                properties: props,
            }]
        }
        None => {
            let mut row = done_step_row(project, iteration, in_chain.as_ref(), &target, now);
            row.properties.extend(props);
            vec![StepWrite::Insert(row)]
        }
    }
}

/// A step row, ended now, for an export found done without one: the chain entry's position,
/// or `ChainPosition` 0 for an export outside the chain.
fn done_step_row(
    project: Uuid,
    iteration: Uuid,
    in_chain: Option<&(usize, ExportTarget)>,
    target: &ExportTarget,
    now: OffsetDateTime,
) -> HistoryRow {
    let mut row = step_row(
        project,
        iteration,
        in_chain.map_or(0, |(i, _)| *i),
        target,
        EntryState::Done,
    );
    if in_chain.is_none() {
        row.properties.set_int(Prop::ChainPosition, 0);
    }
    row.properties.set(Prop::EndedAt, now);
    row
}

/// A step row's `ReleaseStatus` once its copy is made.
pub const RELEASED: &str = "released";

/// Records on the export's step row why it has no release copy (both its paths hold blobs
/// that are not this export's). A redelivery that finds the same refusal writes nothing.
pub fn release_refused_writes(
    project: Uuid,
    iteration: Uuid,
    chain: &[ExportTarget],
    export: &ExportTarget,
    reason: &str,
    steps: &[StepRow],
    now: OffsetDateTime,
) -> Vec<StepWrite> {
    let in_chain = chain_entry(chain, export);
    let target = in_chain
        .as_ref()
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| export.clone());
    let status = format!("refused: {reason}");
    let rk = step_row_key(iteration, &target);
    match StepRow::find(steps, &rk) {
        Some(step) if step.release_status.as_deref() == Some(status.as_str()) => Vec::new(),
        Some(_) => {
            let mut props = Props::new();
            props.set(Prop::ReleaseStatus, status);
            vec![StepWrite::Merge {
                partition_key: project.to_string(),
                row_key: rk,
                properties: props,
            }]
        }
        None => {
            let mut row = done_step_row(project, iteration, in_chain.as_ref(), &target, now);
            row.properties.set(Prop::ReleaseStatus, status);
            vec![StepWrite::Insert(row)]
        }
    }
}

/// One line on where the chain stands, for the row and the logs.
pub fn describe_next(next: &Next) -> String {
    match next {
        Next::Empty => "no exports configured".into(),
        Next::Request(t) => format!("requested {t}"),
        Next::Wait(t) => format!("waiting for {t}"),
        Next::Complete => "complete".into(),
        Next::NotExportable(r) => format!("not exportable: {r}"),
        Next::NotReady(r) => format!("not ready: {r}"),
    }
}

#[cfg(test)]
mod tests;
