//! What to do with a message: pure functions of the message, the settings and what was observed
//! (Custom Vision's answers, the history rows). The application's processor gathers the
//! observations, calls these, and carries the actions out through the adapters.

use crate::chain::{ChainPlan, EntryState, ExportTarget, Next};
use crate::config::ChainSettings;
use crate::customvision::{CvError, Export, Iteration, IterationPerformance, Project, codes};
use crate::history::{
    HistoryRow, PoisonCopy, Prop, Props, RowStatus, StepRow, enrich_training, notification_row,
    rejected_row, step_row, step_row_key,
};
use crate::message::{Incoming, fits_queue_message};
use crate::notification::{ExportStatus, Notification, Parsed, TrainingStatus};
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
    /// Publish the iteration (its outcome goes into the Training row).
    Publish {
        project: Uuid,
        iteration: Uuid,
        name: String,
        prediction_id: String,
    },
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
}

/// What was observed, as far as `Needs` asked.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub project: Option<Project>,
    pub iteration: Option<Iteration>,
    pub performance: Option<IterationPerformance>,
    pub exports: Option<Vec<Export>>,
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
        },
        Notification::Export { .. } if chain => Needs {
            project: false,
            iteration: true,
            performance: false,
            exports: true,
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
        return (accepted(), vec![Action::Record(row)]);
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
            if let Some(it) = &observed.iteration
                && !it.status.eq_ignore_ascii_case("Completed")
            {
                return (
                    Decision::Retry(format!(
                        "Custom Vision still reports iteration {iteration_id} as {:?}",
                        it.status
                    )),
                    Vec::new(),
                );
            }
            if let (Some(publish), Some(it)) = (&config.chain.publish, &observed.iteration) {
                if it.is_published() {
                    row.properties.set(
                        Prop::PublishStatus,
                        format!(
                            "already published as {}",
                            it.publish_name.clone().unwrap_or_default()
                        ),
                    );
                } else {
                    actions.push(Action::Publish {
                        project: *project_id,
                        iteration: *iteration_id,
                        name: publish.name.clone(),
                        prediction_id: publish.prediction_resource_id.clone(),
                    });
                }
            }
            if chain_configured {
                actions.push(Action::Chain {
                    project: *project_id,
                    iteration: *iteration_id,
                });
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
            if chain_configured {
                actions.push(Action::Chain {
                    project: *project_id,
                    iteration: *iteration_id,
                });
            }
        }
        _ => {}
    }
    actions.push(Action::Record(row));
    (accepted(), actions)
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
        Some(_) => vec![StepWrite::Merge {
            partition_key: project.to_string(),
            row_key: rk,
            properties: props,
        }],
        None => {
            let mut row = step_row(
                project,
                iteration,
                in_chain.as_ref().map_or(0, |(i, _)| *i),
                &target,
                EntryState::Done,
            );
            if in_chain.is_none() {
                row.properties.set_int(Prop::ChainPosition, 0);
            }
            row.properties.set(Prop::EndedAt, now);
            row.properties.extend(props);
            vec![StepWrite::Insert(row)]
        }
    }
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
            let mut row = step_row(
                project,
                iteration,
                in_chain.as_ref().map_or(0, |(i, _)| *i),
                &target,
                EntryState::Done,
            );
            if in_chain.is_none() {
                row.properties.set_int(Prop::ChainPosition, 0);
            }
            row.properties.set(Prop::EndedAt, now);
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
