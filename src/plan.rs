//! What to do with a message: pure functions of the message, the settings and what was observed
//! (Custom Vision's answers, the history rows). The adapters in `process` gather the
//! observations and carry the actions out.

use crate::chain::{ChainPlan, EntryState, ExportTarget, Next};
use crate::customvision::{CvError, Export, Iteration, IterationPerformance, Project, codes};
use crate::history::{
    HistoryRow, Received, enrich_training, notification_row, rejected_row, step_row, step_row_key,
    time_property,
};
use crate::notification::{ExportStatus, Notification, ParseError, Parsed, TrainingStatus};
use crate::release::{ModelUri, classify_model_uri};
use crate::settings::ChainSettings;
use crate::storage::table::{Entity, StoredEntity};
use serde_json::{Value, json};
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

/// What cvchain made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Understood (including `Unknown` kinds, which are recorded, not rejected).
    Accepted(Parsed),
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

/// Parses the message, or plans its rejection.
pub fn parse_or_reject(received: &Received, config: &PlanConfig) -> Result<Parsed, Box<Plan>> {
    crate::notification::parse(&received.text).map_err(|e: ParseError| {
        Box::new(reject(
            received,
            &e.to_string(),
            e.field().map(str::to_owned),
            config,
        ))
    })
}

/// Decides for something that arrived but could not even be read as a message (a broken envelope).
pub fn plan_unreadable(
    received: &Received,
    reason: &str,
    config: &PlanConfig,
) -> (Decision, Vec<Action>) {
    reject(received, reason, None, config)
}

fn reject(
    received: &Received,
    reason: &str,
    field: Option<String>,
    config: &PlanConfig,
) -> (Decision, Vec<Action>) {
    let mut row = rejected_row(received, reason, field.as_deref());
    row.properties
        .insert("PoisonQueue".into(), json!(config.poison_queue));
    row.properties.insert("PoisonCopy".into(), json!("pending"));
    (
        Decision::Rejected {
            reason: reason.to_owned(),
            field,
        },
        vec![
            Action::Record(row),
            Action::CopyToPoison {
                queue: config.poison_queue.clone(),
                text: received.text.clone(),
            },
        ],
    )
}

/// Decides for a notification that parsed, given what was observed. The history row comes
/// last, so a failure before it leaves no row and the redelivery does the work again.
pub fn plan_notification(
    received: &Received,
    parsed: &Parsed,
    observed: &Observed,
    config: &PlanConfig,
) -> (Decision, Vec<Action>) {
    let n = &parsed.notification;
    let mut row = notification_row(received, parsed);
    let mut actions = Vec::new();
    let chain_configured = config.custom_vision && !config.chain.exports.is_empty();
    if !config.allows(n) {
        row.properties.insert("Ignored".into(), json!(true));
        row.properties.insert(
            "ChainStatus".into(),
            json!("ignored: the project is not in CVCHAIN_PROJECTS"),
        );
        return (
            Decision::Accepted(parsed.clone()),
            vec![Action::Record(row)],
        );
    }
    if let Some(problem) = &observed.problem {
        row.properties
            .insert("ChainStatus".into(), json!(format!("stopped: {problem}")));
        return (
            Decision::Accepted(parsed.clone()),
            vec![Action::Record(row)],
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
                    row.properties.insert(
                        "PublishStatus".into(),
                        json!(format!(
                            "already published as {}",
                            it.publish_name.clone().unwrap_or_default()
                        )),
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
                row.properties.insert("ModelUriStatus".into(), json!(note));
                if matches!(class, ModelUri::Refused { .. }) {
                    // The platform in an untrusted URL proves nothing: such a message gets a row
                    // of its own instead of passing for the genuine event.
                    row.row_key = format!(
                        "Export_{iteration_id}_msg-{}_{}",
                        received.message_key(),
                        status.as_str()
                    );
                    row.properties.remove("ModelPlatform");
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
    (Decision::Accepted(parsed.clone()), actions)
}

/// Reads the refused entries from an iteration's step rows.
pub fn refused_targets(chain: &[ExportTarget], steps: &[StoredEntity]) -> Vec<ExportTarget> {
    chain
        .iter()
        .filter(|t| {
            steps.iter().any(|s| {
                s.entity.get("Platform") == Some(&json!(t.platform))
                    && s.entity.get("Flavor") == Some(&json!(t.flavor.clone().unwrap_or_default()))
                    && s.entity.get("Status") == Some(&json!("Refused"))
            })
        })
        .cloned()
        .collect()
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
        properties: Entity,
    },
}

/// Brings the step rows in line with the chain's state. Writes only what differs, so a
/// redelivered message writes nothing.
pub fn step_writes(
    project: Uuid,
    iteration: Uuid,
    plan: &ChainPlan,
    steps: &[StoredEntity],
    now: OffsetDateTime,
) -> Vec<StepWrite> {
    let mut out = Vec::new();
    for (position, (target, state)) in plan.entries.iter().enumerate() {
        let status = match state {
            EntryState::Pending | EntryState::Refused => continue,
            other => other.as_str(),
        };
        let rk = step_row_key(iteration, target);
        let existing = steps
            .iter()
            .find(|s| s.entity.get("RowKey") == Some(&json!(rk)));
        match existing {
            None => {
                let mut row = step_row(project, iteration, position, target, status);
                if state.is_final() {
                    time_property(&mut row.properties, "EndedAt", now);
                }
                if *state == EntryState::Skipped {
                    row.properties.insert(
                        "Reason".into(),
                        json!("the iteration cannot export to this platform (exportableTo)"),
                    );
                }
                out.push(StepWrite::Insert(row));
            }
            Some(row) => {
                let current = row.entity.get("Status").and_then(Value::as_str);
                // A final status never goes back (a later GetExports cannot undo an end).
                let current_final =
                    matches!(current, Some("Done" | "Failed" | "Skipped" | "Refused"));
                if current == Some(status) || current_final {
                    continue;
                }
                let mut props = Entity::new();
                props.insert("Status".into(), json!(status));
                if state.is_final() && !row.entity.contains_key("EndedAt") {
                    time_property(&mut props, "EndedAt", now);
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
    let (status, reason) = match outcome {
        RequestOutcome::Exporting { note } => ("Exporting", note.clone()),
        RequestOutcome::Refused(r) => ("Refused", Some(r.clone())),
        RequestOutcome::Transient => return None,
    };
    let mut props = Entity::new();
    props.insert("Status".into(), json!(status));
    time_property(&mut props, "RequestedAt", now);
    if status == "Refused" {
        time_property(&mut props, "EndedAt", now);
    }
    if let Some(r) = reason {
        props.insert("Reason".into(), json!(crate::redact::redact(&r)));
    }
    Some(if existed {
        StepWrite::Merge {
            partition_key: project.to_string(),
            row_key: step_row_key(iteration, target),
            properties: props,
        }
    } else {
        let mut row = step_row(project, iteration, position, target, status);
        row.properties.extend(props);
        StepWrite::Insert(row)
    })
}

/// Records a release copy on the export's step row: the chain entry the export answers, or a
/// row of its own (`ChainPosition` 0) for an export outside the chain.
pub fn release_writes(
    project: Uuid,
    iteration: Uuid,
    chain: &[ExportTarget],
    export: &ExportTarget,
    released: &crate::storage::blobs::Released,
    steps: &[StoredEntity],
    now: OffsetDateTime,
) -> Vec<StepWrite> {
    let as_export = Export {
        platform: export.platform.clone(),
        flavor: export.flavor.clone(),
        status: "Done".into(),
        ..Default::default()
    };
    let in_chain = chain
        .iter()
        .enumerate()
        .find(|(_, t)| t.matches(&as_export))
        .map(|(i, t)| (i, t.clone()));
    let target = in_chain
        .as_ref()
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| export.clone());
    let mut props = Entity::new();
    props.insert("ReleaseUrl".into(), json!(released.url));
    props.insert("ReleasePath".into(), json!(released.path));
    // OData JSON carries Int64 values as strings.
    props.insert("ReleaseSize".into(), json!(released.size.to_string()));
    props.insert("ReleaseSize@odata.type".into(), json!("Edm.Int64"));
    props.insert("CopyMillis".into(), json!(released.millis.to_string()));
    props.insert("CopyMillis@odata.type".into(), json!("Edm.Int64"));
    time_property(&mut props, "ReleasedAt", now);
    let rk = step_row_key(iteration, &target);
    if steps
        .iter()
        .any(|s| s.entity.get("RowKey") == Some(&json!(rk)))
    {
        vec![StepWrite::Merge {
            partition_key: project.to_string(),
            row_key: rk,
            properties: props,
        }]
    } else {
        let mut row = step_row(
            project,
            iteration,
            in_chain.as_ref().map_or(0, |(i, _)| *i),
            &target,
            "Done",
        );
        if in_chain.is_none() {
            row.properties.insert("ChainPosition".into(), json!(0));
        }
        time_property(&mut row.properties, "EndedAt", now);
        row.properties.extend(props);
        vec![StepWrite::Insert(row)]
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
