use super::*;
use crate::chain::{ExportTarget, plan_chain};
use crate::config::PublishSettings;
use crate::history::{REJECTED_PARTITION, StepRow, Value, step_row};
use crate::message::Received;
use time::macros::datetime;

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const I: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

fn pid() -> Uuid {
    Uuid::parse_str(P).unwrap()
}
fn iid() -> Uuid {
    Uuid::parse_str(I).unwrap()
}

fn received(text: &str) -> Received {
    Received {
        text: text.to_owned(),
        message_id: Some("m-1".into()),
        dequeue_count: 1,
        received_at: datetime!(2026-11-26 10:00 UTC),
    }
}

fn config() -> PlanConfig {
    PlanConfig {
        poison_queue: "cv-poison".into(),
        ..Default::default()
    }
}

fn chain_config() -> PlanConfig {
    PlanConfig {
        poison_queue: "cv-poison".into(),
        chain: ChainSettings {
            exports: crate::chain::parse_chain("ONNX, TensorFlow:TensorFlowLite").unwrap(),
            publish: None,
        },
        custom_vision: true,
        backup_container: Some(Url::parse("https://acct.blob.core.windows.net/cvbackups").unwrap()),
        projects: None,
        lifecycle: Default::default(),
    }
}

fn training_completed() -> String {
    format!(
        r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{P}","iterationId":"{I}","trainingStatus":"TrainingCompleted"}}}}"#
    )
}

fn export_completed() -> String {
    format!(
        r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}","exportStatus":"ExportCompleted","modelUri":""}}}}"#
    )
}

fn plan_text(text: &str, observed: &Observed, config: &PlanConfig) -> (Decision, Vec<Action>) {
    plan(&Incoming::decode(received(text)), observed, config)
}

fn completed_iteration() -> Iteration {
    Iteration {
        id: iid(),
        name: "Iteration 3".into(),
        status: "Completed".into(),
        trained_at: Some("2026-11-26T09:58:00Z".into()),
        training_time_in_minutes: Some(4),
        exportable: true,
        exportable_to: vec!["ONNX".into(), "TensorFlow".into()],
        ..Default::default()
    }
}

#[test]
fn a_notification_is_recorded_once_and_nothing_else_without_custom_vision() {
    let text =
        format!(r#"{{"version":"1.0","type":"ConnectionTest","Content":{{"projectId":"{P}"}}}}"#);
    let (decision, actions) = plan_text(&text, &Observed::default(), &config());
    assert!(matches!(decision, Decision::Accepted(_)));
    assert_eq!(actions.len(), 1);
    let Action::Record(row) = &actions[0] else {
        panic!("expected a record")
    };
    assert_eq!(row.partition_key, P);
    assert_eq!(row.row_key, "ConnectionTest_m-1");
    // Training without Custom Vision: recorded, nothing asked.
    let n = crate::notification::parse(&training_completed())
        .unwrap()
        .notification;
    assert_eq!(needs(&n, &config()), Needs::default());
    let (_, actions) = plan_text(&training_completed(), &Observed::default(), &config());
    assert!(matches!(&actions[..], [Action::Record(_)]));
}

#[test]
fn an_unknown_kind_is_recorded_not_rejected() {
    let (decision, actions) = plan_text(
        r#"{"version":"1.0","type":"Publish","Content":{}}"#,
        &Observed::default(),
        &chain_config(),
    );
    assert!(matches!(decision, Decision::Accepted(_)));
    assert!(matches!(&actions[..], [Action::Record(r)] if r.row_key == "Unknown_m-1"));
}

#[test]
fn a_malformed_message_is_recorded_and_copied_to_the_poison_queue() {
    let (decision, actions) = plan_text("{not json", &Observed::default(), &config());
    let Decision::Rejected { reason, field } = decision else {
        panic!("expected a rejection")
    };
    assert!(
        reason.starts_with("invalid JSON at line 1, column 2"),
        "{reason}"
    );
    assert_eq!(field, None);
    match &actions[..] {
        [Action::Record(row), Action::CopyToPoison { queue, text }] => {
            assert_eq!(row.partition_key, REJECTED_PARTITION);
            assert_eq!(row.properties[Prop::PoisonCopy], "pending");
            assert_eq!(queue, "cv-poison");
            assert_eq!(text, "{not json");
        }
        other => panic!("unexpected actions {other:?}"),
    }
}

#[test]
fn a_rejection_names_the_field() {
    let (decision, _) = plan_text(
        r#"{"version":"1.0","type":"Training","Content":{"projectId":"x"}}"#,
        &Observed::default(),
        &config(),
    );
    assert_eq!(
        decision,
        Decision::Rejected {
            reason: "field `Content.projectId` must be a UUID, found \"x\"".into(),
            field: Some("Content.projectId".into()),
        }
    );
}

#[test]
fn an_unreadable_envelope_is_rejected_with_its_reason() {
    let (decision, actions) = plan_unreadable(
        &Incoming::decode(received("garbage")),
        "invocation body is not JSON",
        &config(),
    );
    assert!(matches!(decision, Decision::Rejected { .. }));
    assert_eq!(actions.len(), 2);
}

#[test]
fn training_completed_asks_for_everything_and_runs_the_chain() {
    let n = crate::notification::parse(&training_completed())
        .unwrap()
        .notification;
    assert_eq!(
        needs(&n, &chain_config()),
        Needs {
            project: true,
            iteration: true,
            performance: true,
            exports: true,
            production: false,
        }
    );
    let observed = Observed {
        project: Some(Project {
            name: "Widgets".into(),
            ..Default::default()
        }),
        iteration: Some(completed_iteration()),
        performance: Some(IterationPerformance {
            precision: Some(0.9),
            recall: Some(0.8),
            average_precision: Some(0.85),
            ..Default::default()
        }),
        exports: Some(vec![]),
        production: Production::NotLooked,
        problem: None,
    };
    let (decision, actions) = plan_text(&training_completed(), &observed, &chain_config());
    assert!(matches!(decision, Decision::Accepted(_)));
    // The chain first: the channels hang off it.
    match &actions[..] {
        [
            Action::Chain { project, iteration },
            Action::Promote {
                iteration: promoted,
                ..
            },
            Action::Record(row),
        ] => {
            // No gate configured: every iteration passes and production follows it.
            assert_eq!(promoted.id, iid());
            assert_eq!(promoted.map, Some(0.85));
            assert_eq!(row.properties[Prop::GateVerdict], "passed");
            assert_eq!(row.properties[Prop::GateReasons], "no gate configured");
            assert_eq!((*project, *iteration), (pid(), iid()));
            let p = &row.properties;
            assert_eq!(p[Prop::ProjectName], "Widgets");
            assert_eq!(p[Prop::IterationName], "Iteration 3");
            assert_eq!(p[Prop::TrainedAt], datetime!(2026-11-26 09:58 UTC));
            assert_eq!(p[Prop::TrainingTimeInMinutes], 4i64);
            assert_eq!(p[Prop::Precision], 0.9);
            assert_eq!(p[Prop::Recall], 0.8);
            assert_eq!(p[Prop::AveragePrecision], 0.85);
            // As a table entity: tests/history_entities.rs in cvchain-azure.
            assert!(matches!(p[Prop::Precision], Value::Double(_)));
        }
        other => panic!("unexpected actions {other:?}"),
    }
}

#[test]
fn only_an_iteration_that_passes_the_gate_is_promoted_and_published() {
    let mut config = chain_config();
    config.chain.publish = Some(PublishSettings {
        name: "prod".into(),
        prediction_resource_id: "/subscriptions/x".into(),
    });
    config.lifecycle.gate = crate::gate::Gate::parse("recall>=0.80,improves:map").unwrap();
    let perf = |recall: f64, map: f64| IterationPerformance {
        precision: Some(0.9),
        recall: Some(recall),
        average_precision: Some(map),
        ..Default::default()
    };
    let mut observed = Observed {
        iteration: Some(completed_iteration()),
        performance: Some(perf(0.78, 0.9)),
        production: Production::Empty,
        ..Default::default()
    };
    let promoted = |actions: &[Action]| actions.iter().any(|a| matches!(a, Action::Promote { .. }));
    let record = |actions: &[Action]| match actions.last() {
        Some(Action::Record(row)) => row.clone(),
        other => panic!("{other:?}"),
    };
    let (_, actions) = plan_text(&training_completed(), &observed, &config);
    assert!(!promoted(&actions));
    let row = record(&actions);
    assert_eq!(row.properties[Prop::GateVerdict], "failed");
    assert_eq!(row.properties[Prop::GateReasons], "recall 0.78 < 0.80");
    assert_eq!(
        row.properties[Prop::PublishStatus],
        "not published: the gate failed (recall 0.78 < 0.80)"
    );
    // Good enough, and production is empty: promoted.
    observed.performance = Some(perf(0.85, 0.9));
    let (_, actions) = plan_text(&training_completed(), &observed, &config);
    assert!(promoted(&actions));
    // Not better than production's mAP: not promoted.
    let mut prod = crate::channels::iteration_ref(&completed_iteration(), Some(&perf(0.9, 0.95)));
    prod.id = Uuid::from_u128(7);
    observed.production = Production::Iteration {
        current: prod.clone(),
        previous: None,
    };
    let (_, actions) = plan_text(&training_completed(), &observed, &config);
    assert!(!promoted(&actions));
    assert_eq!(
        record(&actions).properties[Prop::GateReasons],
        "map 0.90 <= production's 0.95"
    );
    // Already in production (another instance handled a copy of this message a moment ago):
    // judged against the iteration before it, as the first copy was.
    let mut this = crate::channels::iteration_ref(&completed_iteration(), Some(&perf(0.85, 0.9)));
    this.id = iid();
    observed.production = Production::Iteration {
        current: this,
        previous: Some(prod),
    };
    observed.performance = Some(perf(0.85, 0.97));
    let (_, actions) = plan_text(&training_completed(), &observed, &config);
    assert!(promoted(&actions));
    assert_eq!(
        record(&actions).properties[Prop::GateReasons],
        "recall 0.85 >= 0.80; map 0.97 > production's 0.95"
    );
    observed.performance = Some(perf(0.85, 0.9));
    // Production cannot be read: the gate cannot compare, so it fails.
    observed.production = Production::Unknown("models/W/channels.json is not valid JSON".into());
    let (_, actions) = plan_text(&training_completed(), &observed, &config);
    assert!(!promoted(&actions));
    assert!(
        record(&actions).properties[Prop::GateReasons]
            .as_text()
            .unwrap()
            .starts_with("the iteration in production is unknown")
    );
}

#[test]
fn retention_runs_when_the_chain_is_complete() {
    let mut config = chain_config();
    config.lifecycle.keep_iterations = Some(2);
    let (_, actions) = plan_text(&export_completed(), &Observed::default(), &config);
    assert!(matches!(
        &actions[..],
        [
            Action::Release { .. },
            Action::Chain { .. },
            Action::Retain { keep: 2, .. },
            Action::Record(_)
        ]
    ));
    assert!(retention_due(None));
    assert!(retention_due(Some(&Next::Complete)));
    assert!(!retention_due(Some(&Next::Wait(
        chain_config().chain.exports[0].clone()
    ))));
}

/// A channel move can never hold the chain up: on an `ExportCompleted` the release comes
/// first, then the next export is requested, and only then do the channels move.
#[test]
fn the_chain_runs_before_the_channels_move() {
    let mut config = chain_config();
    config.lifecycle.keep_iterations = Some(2);
    let observed = Observed {
        project: Some(Project {
            name: "Widgets".into(),
            ..Default::default()
        }),
        iteration: Some(completed_iteration()),
        exports: Some(vec![]),
        ..Default::default()
    };
    let (_, actions) = plan_text(&export_completed(), &observed, &config);
    assert!(
        matches!(
            &actions[..],
            [
                Action::Release { .. },
                Action::Chain { .. },
                Action::Channels { .. },
                Action::Retain { keep: 2, .. },
                Action::Record(_)
            ]
        ),
        "{actions:?}"
    );
}

#[test]
fn an_iteration_still_training_is_retried_later() {
    let mut it = completed_iteration();
    it.status = "Training".into();
    let observed = Observed {
        iteration: Some(it),
        ..Default::default()
    };
    let (decision, actions) = plan_text(&training_completed(), &observed, &chain_config());
    assert!(matches!(decision, Decision::Retry(_)));
    assert!(actions.is_empty());
}

#[test]
fn a_vanished_iteration_is_recorded_and_stops() {
    let observed = Observed {
        problem: Some("iteration not found".into()),
        ..Default::default()
    };
    let (decision, actions) = plan_text(&export_completed(), &observed, &chain_config());
    assert!(matches!(decision, Decision::Accepted(_)));
    let [Action::Record(row)] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(
        row.properties[Prop::ChainStatus],
        "stopped: iteration not found"
    );
}

#[test]
fn export_notifications_run_the_chain_only_when_one_is_configured() {
    let (_, actions) = plan_text(&export_completed(), &Observed::default(), &chain_config());
    assert!(matches!(
        &actions[..],
        [
            Action::Release { .. },
            Action::Chain { .. },
            Action::Record(_)
        ]
    ));
    let failed = export_completed().replace("ExportCompleted", "ExportFailed");
    let (_, actions) = plan_text(&failed, &Observed::default(), &chain_config());
    assert!(matches!(
        &actions[..],
        [Action::Chain { .. }, Action::Record(_)]
    ));
    let (_, actions) = plan_text(&export_completed(), &Observed::default(), &config());
    assert!(matches!(&actions[..], [Action::Record(_)]));
    let mut no_chain = chain_config();
    no_chain.chain.exports.clear();
    let (_, actions) = plan_text(&training_completed(), &Observed::default(), &no_chain);
    assert!(matches!(&actions[..], [Action::Record(_)]));
    // Without a chain a finished export is still released.
    let (_, actions) = plan_text(&export_completed(), &Observed::default(), &no_chain);
    assert!(matches!(
        &actions[..],
        [Action::Release { .. }, Action::Record(_)]
    ));
}

#[test]
fn a_forged_model_uri_is_refused_and_said_so() {
    let forged = format!(
        r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}","exportStatus":"ExportCompleted","modelUri":"https://evil.example.com/x.zip?sig=abc"}}}}"#
    );
    let (_, actions) = plan_text(&forged, &Observed::default(), &chain_config());
    let Action::Release { model_uri, .. } = &actions[0] else {
        panic!("{actions:?}")
    };
    assert!(matches!(model_uri, ModelUri::Refused { .. }));
    let Some(Action::Record(row)) = actions.last() else {
        panic!()
    };
    let note = row.properties[Prop::ModelUriStatus].as_text().unwrap();
    assert!(
        note.starts_with("refused (outside the backup container)"),
        "{note}"
    );
    let inside = format!(
        r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}","exportStatus":"ExportCompleted","modelUri":"https://acct.blob.core.windows.net/cvbackups/{P}%20-%20{I}.ONNX"}}}}"#
    );
    let (_, actions) = plan_text(&inside, &Observed::default(), &chain_config());
    assert!(matches!(
        &actions[0],
        Action::Release {
            model_uri: ModelUri::InBackup { .. },
            ..
        }
    ));
}

fn stored(row: &HistoryRow) -> StepRow {
    StepRow::from_row(row)
}

#[test]
fn step_rows_follow_the_chain_and_write_only_changes() {
    let chain = chain_config().chain.exports;
    let now = datetime!(2026-11-26 10:05 UTC);
    let it = completed_iteration();
    let exports = vec![Export {
        platform: "ONNX".into(),
        status: "Exporting".into(),
        ..Default::default()
    }];
    let plan = plan_chain(&chain, &it, &exports, &[]);
    let writes = step_writes(pid(), iid(), &plan, &[], now);
    // ONNX exporting gets a row; TensorFlow is pending and gets none yet.
    let [StepWrite::Insert(row)] = &writes[..] else {
        panic!("{writes:?}")
    };
    assert_eq!(row.row_key, format!("ExportStep_{I}_ONNX"));
    assert_eq!(row.properties[Prop::Status], "Exporting");
    assert_eq!(row.properties[Prop::ChainPosition], 1i64);

    // The same state again writes nothing.
    let steps = vec![stored(row)];
    assert!(step_writes(pid(), iid(), &plan, &steps, now).is_empty());

    // ONNX done: a merge with the end time.
    let exports = vec![Export {
        platform: "ONNX".into(),
        status: "Done".into(),
        ..Default::default()
    }];
    let plan = plan_chain(&chain, &it, &exports, &[]);
    let writes = step_writes(pid(), iid(), &plan, &steps, now);
    let [StepWrite::Merge { properties, .. }] = &writes[..] else {
        panic!("{writes:?}")
    };
    assert_eq!(properties[Prop::Status], "Done");
    assert_eq!(properties[Prop::EndedAt], now);
}

#[test]
fn skipped_entries_get_a_row_with_the_reason() {
    let chain = chain_config().chain.exports;
    let mut it = completed_iteration();
    it.exportable_to = vec!["TensorFlow".into()];
    let plan = plan_chain(&chain, &it, &[], &[]);
    let writes = step_writes(pid(), iid(), &plan, &[], datetime!(2026-11-26 10:05 UTC));
    let [StepWrite::Insert(row)] = &writes[..] else {
        panic!("{writes:?}")
    };
    assert_eq!(row.properties[Prop::Status], "Skipped");
    assert!(
        row.properties[Prop::Reason]
            .as_text()
            .unwrap()
            .contains("exportableTo")
    );
}

#[test]
fn request_answers_are_classified() {
    let err = |status, code: &str| -> Result<Export, CvError> {
        Err(CvError::Service {
            operation: "ExportIteration",
            status,
            code: code.into(),
            message: "m".into(),
        })
    };
    assert_eq!(
        request_outcome(&Ok(Export::default())),
        RequestOutcome::Exporting { note: None }
    );
    assert_eq!(
        request_outcome(&err(400, codes::EXPORT_ALREADY_IN_PROGRESS)),
        RequestOutcome::Exporting {
            note: Some("already in progress".into())
        }
    );
    assert_eq!(request_outcome(&err(429, "429")), RequestOutcome::Transient);
    assert_eq!(
        request_outcome(&err(500, "ErrorUnknown")),
        RequestOutcome::Transient
    );
    assert_eq!(
        request_outcome(&err(400, codes::EXPORT_WHILE_TRAINING)),
        RequestOutcome::Transient
    );
    assert!(matches!(
        request_outcome(&err(400, codes::UNSUPPORTED_EXPORT_PLATFORM)),
        RequestOutcome::Refused(_)
    ));
}

#[test]
fn refused_steps_are_read_back() {
    let chain = chain_config().chain.exports;
    let t = chain[1].clone();
    let w = step_after_request(
        pid(),
        iid(),
        1,
        &t,
        &RequestOutcome::Refused("no".into()),
        false,
        datetime!(2026-11-26 10:05 UTC),
    )
    .unwrap();
    let StepWrite::Insert(row) = w else { panic!() };
    assert_eq!(row.properties[Prop::Status], "Refused");
    assert_eq!(refused_targets(&chain, &[stored(&row)]), vec![t]);
    assert_eq!(
        step_after_request(
            pid(),
            iid(),
            0,
            &chain[0],
            &RequestOutcome::Transient,
            false,
            datetime!(2026-11-26 10:05 UTC)
        ),
        None
    );
}

#[test]
fn a_release_lands_on_its_chain_entry_or_on_a_row_of_its_own() {
    let chain = chain_config().chain.exports;
    let now = datetime!(2026-11-26 10:05 UTC);
    let released = Released {
        url: "https://a.blob.core.windows.net/models/W/I/ONNX.zip".into(),
        path: "W/I/ONNX.zip".into(),
        size: 1234,
        millis: 56,
        copied: true,
        ..Default::default()
    };
    let onnx12 = ExportTarget {
        platform: "ONNX".into(),
        flavor: Some("ONNX12".into()),
    };
    // The chain's ONNX entry (no flavor) answers an ONNX12 export: its row is updated.
    let existing = step_row(pid(), iid(), 0, &chain[0], EntryState::Exporting);
    let writes = release_writes(
        pid(),
        iid(),
        &chain,
        &onnx12,
        &released,
        &[stored(&existing)],
        now,
    );
    let [
        StepWrite::Merge {
            row_key,
            properties,
            ..
        },
    ] = &writes[..]
    else {
        panic!("{writes:?}")
    };
    assert_eq!(row_key, &existing.row_key);
    assert_eq!(properties[Prop::ReleaseSize], 1234i64);
    assert!(matches!(properties[Prop::ReleaseSize], Value::Int64(_)));
    assert_eq!(properties[Prop::ReleaseUrl], released.url);
    // An export outside the chain gets its own row.
    let coreml = ExportTarget {
        platform: "CoreML".into(),
        flavor: None,
    };
    let writes = release_writes(pid(), iid(), &chain, &coreml, &released, &[], now);
    let [StepWrite::Insert(row)] = &writes[..] else {
        panic!("{writes:?}")
    };
    assert_eq!(row.properties[Prop::ChainPosition], 0i64);
    assert_eq!(row.properties[Prop::Status], "Done");
    assert_eq!(row.row_key, format!("ExportStep_{I}_CoreML"));
}

#[test]
fn a_current_copy_is_recorded_only_where_its_row_does_not_say_so() {
    let chain = chain_config().chain.exports;
    let now = datetime!(2026-11-26 10:05 UTC);
    let current = Released {
        url: "https://a.blob.core.windows.net/models/W/I/ONNX.zip".into(),
        path: "W/I/ONNX.zip".into(),
        size: 1234,
        millis: 0,
        copied: false,
        ..Default::default()
    };
    let mut step = step_row(pid(), iid(), 0, &chain[0], EntryState::Done);
    // A holder copied but crashed before recording: the row gets the release now.
    let writes = release_writes(
        pid(),
        iid(),
        &chain,
        &chain[0],
        &current,
        &[stored(&step)],
        now,
    );
    assert!(
        matches!(&writes[..], [StepWrite::Merge { .. }]),
        "{writes:?}"
    );
    // Recorded already: nothing to write.
    step.properties.set(Prop::ReleaseUrl, &current.url);
    assert!(
        release_writes(
            pid(),
            iid(),
            &chain,
            &chain[0],
            &current,
            &[stored(&step)],
            now
        )
        .is_empty()
    );
    // A fresh copy over a recorded one is recorded again (new size, new time).
    let fresh = Released {
        copied: true,
        ..current
    };
    let writes = release_writes(
        pid(),
        iid(),
        &chain,
        &chain[0],
        &fresh,
        &[stored(&step)],
        now,
    );
    assert_eq!(writes.len(), 1);
    assert_eq!(chain_position(&chain, &chain[1]), 1);
    assert!(step_exists(&[stored(&step)], iid(), &chain[0]));
    assert!(!step_exists(&[stored(&step)], iid(), &chain[1]));
}

#[test]
fn projects_outside_the_allow_list_are_recorded_as_ignored() {
    let mut config = chain_config();
    config.projects = Some(vec![Uuid::from_u128(42)]);
    let n = crate::notification::parse(&training_completed())
        .unwrap()
        .notification;
    assert_eq!(needs(&n, &config), Needs::default());
    let (decision, actions) = plan_text(&training_completed(), &Observed::default(), &config);
    assert!(matches!(decision, Decision::Accepted(_)));
    let [Action::Record(row)] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(row.properties[Prop::Ignored], true);
    config.projects = Some(vec![pid()]);
    let (_, actions) = plan_text(&training_completed(), &Observed::default(), &config);
    assert!(matches!(&actions[0], Action::Chain { .. }));
}

#[test]
fn what_could_not_be_read_is_noted_in_the_row_and_the_chain_goes_on() {
    let body = format!(
        r#"{{"id": "{I}", "name": "Iteration 3", "status": "Completed", "domainId": "not-a-uuid",
            "exportable": true, "exportableTo": ["ONNX", "TensorFlow"]}}"#
    );
    let it: Iteration =
        crate::customvision::decode_lenient("GetIteration", body.as_bytes()).unwrap();
    let observed = Observed {
        iteration: Some(it),
        exports: Some(vec![]),
        ..Default::default()
    };
    let (decision, actions) = plan_text(&training_completed(), &observed, &chain_config());
    assert!(matches!(decision, Decision::Accepted(_)));
    // No gate configured: the iteration passes it, so production moves to it too.
    let [
        Action::Chain { .. },
        Action::Promote { .. },
        Action::Record(row),
    ] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    let notes = row.properties[Prop::DecodeNotes].as_text().unwrap();
    assert!(notes.starts_with("domainId: \"not-a-uuid\""), "{notes}");
    assert!(!row.properties.contains(Prop::DomainId));
}

#[test]
fn an_export_in_an_unknown_status_gets_a_row_that_says_so() {
    let chain = chain_config().chain.exports;
    let exports = vec![Export {
        platform: "ONNX".into(),
        status: "Queued".into(),
        ..Default::default()
    }];
    let plan = plan_chain(&chain, &completed_iteration(), &exports, &[]);
    assert_eq!(plan.next, crate::chain::Next::Request(chain[1].clone()));
    let writes = step_writes(pid(), iid(), &plan, &[], datetime!(2026-11-26 10:05 UTC));
    let [StepWrite::Insert(row)] = &writes[..] else {
        panic!("{writes:?}")
    };
    assert_eq!(row.properties[Prop::Status], "Unknown");
    assert_eq!(row.properties[Prop::Reason], UNKNOWN_EXPORT_STATUS);
    assert!(!row.properties.contains(Prop::EndedAt));
    // When it turns Done, the row follows.
    let done = vec![Export {
        status: "Done".into(),
        ..exports[0].clone()
    }];
    let plan = plan_chain(&chain, &completed_iteration(), &done, &[]);
    let writes = step_writes(
        pid(),
        iid(),
        &plan,
        &[stored(row)],
        datetime!(2026-11-26 10:06 UTC),
    );
    assert!(
        matches!(&writes[..], [StepWrite::Merge { properties, .. }, ..] if properties[Prop::Status] == "Done"),
        "{writes:?}"
    );
}

#[test]
fn a_notification_releases_its_export_and_whatever_was_left_behind() {
    use crate::release::{ReleasePlan, Source};
    let chain = chain_config().chain.exports;
    let plan = |platform: &str, flavor: Option<&str>| ReleasePlan {
        platform: platform.into(),
        flavor: flavor.map(Into::into),
        source: Source::Download {
            url: "https://x/y".into(),
        },
        fallback: None,
        expect_free: false,
    };
    let plans = vec![
        plan("ONNX", None),
        plan("TensorFlow", Some("TensorFlowLite")),
    ];
    let mut onnx = step_row(pid(), iid(), 0, &chain[0], EntryState::Done);
    onnx.properties
        .set(Prop::ReleaseUrl, "https://a/models/W/1/ONNX.zip");
    let tf = step_row(pid(), iid(), 1, &chain[1], EntryState::Done);
    let steps = vec![stored(&onnx), stored(&tf)];
    let names = |v: Vec<crate::release::ReleasePlan>| -> Vec<String> {
        v.into_iter().map(|p| p.platform).collect()
    };
    // Named ONNX (released before: a re-export is verified again), and TensorFlow, left behind.
    let backup = ModelUri::InBackup {
        blob_name: format!("{P} - {I}.ONNX"),
    };
    assert_eq!(
        names(releases_due(
            plans.clone(),
            &backup,
            pid(),
            iid(),
            &chain,
            &steps
        )),
        vec!["ONNX", "TensorFlow"]
    );
    // Nothing named: only what is not released yet.
    assert_eq!(
        names(releases_due(
            plans.clone(),
            &ModelUri::None,
            pid(),
            iid(),
            &chain,
            &steps
        )),
        vec!["TensorFlow"]
    );
    // Everything released: a notification about TensorFlow verifies only TensorFlow.
    let mut tf = tf;
    tf.properties
        .set(Prop::ReleaseUrl, "https://a/models/W/1/TF.zip");
    let steps = vec![stored(&onnx), stored(&tf)];
    let named_tf = ModelUri::InBackup {
        blob_name: format!("{P} - {I}.TensorFlow"),
    };
    assert_eq!(
        names(releases_due(plans, &named_tf, pid(), iid(), &chain, &steps)),
        vec!["TensorFlow"]
    );
}

/// Two flavors of one platform share the backup blob's name: the notification of the second is
/// about the one not released yet, and the first's release copy is left as it is.
#[test]
fn a_second_flavor_of_a_platform_releases_only_itself() {
    let target = |flavor: &str| ExportTarget {
        platform: "TensorFlow".into(),
        flavor: Some(flavor.into()),
    };
    let (lite, normal) = (target("TensorFlowLite"), target("TensorFlowNormal"));
    let chain = vec![lite.clone(), normal.clone()];
    let plan = |t: &ExportTarget| crate::release::ReleasePlan {
        platform: t.platform.clone(),
        flavor: t.flavor.clone(),
        source: crate::release::Source::Download {
            url: "https://x/y".into(),
        },
        fallback: None,
        expect_free: false,
    };
    let plans = vec![plan(&lite), plan(&normal)];
    let mut first = step_row(pid(), iid(), 0, &lite, EntryState::Done);
    first
        .properties
        .set(Prop::ReleaseUrl, "https://a/models/W/1/TFLite.zip");
    let second = step_row(pid(), iid(), 1, &normal, EntryState::Done);
    let named = ModelUri::InBackup {
        blob_name: format!("{P} - {I}.TensorFlow"),
    };
    let due = releases_due(
        plans.clone(),
        &named,
        pid(),
        iid(),
        &chain,
        &[stored(&first), stored(&second)],
    );
    assert_eq!(
        due.iter().map(|p| p.flavor.clone()).collect::<Vec<_>>(),
        vec![normal.flavor.clone()]
    );
    // Both released: a re-export verifies both again.
    let mut second = second;
    second
        .properties
        .set(Prop::ReleaseUrl, "https://a/models/W/1/TFNormal.zip");
    let due = releases_due(
        plans,
        &named,
        pid(),
        iid(),
        &chain,
        &[stored(&first), stored(&second)],
    );
    assert_eq!(due.len(), 2);
}

fn key_to_read_first(text: &str, config: &PlanConfig) -> Option<(String, String)> {
    let incoming = Incoming::decode(received(text));
    let parsed = incoming.parsed.as_ref().expect("a readable message");
    redelivery_probe(&incoming, parsed, config).map(|r| (r.partition_key, r.row_key))
}

#[test]
fn a_redelivery_is_looked_for_first_where_handling_costs_more_than_the_row() {
    let (_, actions) = plan_text(&training_completed(), &Observed::default(), &chain_config());
    let Some(Action::Record(row)) = actions.last() else {
        panic!("the row comes last: {actions:?}")
    };
    assert_eq!(
        key_to_read_first(&training_completed(), &chain_config()),
        Some((row.partition_key.clone(), row.row_key.clone()))
    );
    assert!(key_to_read_first(&export_completed(), &chain_config()).is_some());
}

#[test]
fn a_notification_that_is_only_its_row_is_not_read_first() {
    let connection_test =
        format!(r#"{{"version":"1.0","type":"ConnectionTest","Content":{{"projectId":"{P}"}}}}"#);
    assert_eq!(key_to_read_first(&connection_test, &chain_config()), None);
    // Without Custom Vision a finished training is its row alone too.
    assert_eq!(key_to_read_first(&training_completed(), &config()), None);
}

fn training_failed() -> String {
    training_completed().replace("TrainingCompleted", "TrainingFailed")
}

fn training_row_of(actions: &[Action]) -> &HistoryRow {
    let Some(Action::Record(row)) = actions.last() else {
        panic!("the row comes last: {actions:?}")
    };
    row
}

#[test]
fn a_failed_training_is_confirmed_with_custom_vision_before_it_counts() {
    let n = crate::notification::parse(&training_failed())
        .unwrap()
        .notification;
    let asked = needs(&n, &chain_config());
    assert!(asked.iteration && asked.project, "{asked:?}");
    assert!(!asked.exports && !asked.performance);
    // Its redelivery is looked for first: handling it costs Custom Vision calls.
    assert!(key_to_read_first(&training_failed(), &chain_config()).is_some());

    let mut failed = completed_iteration();
    failed.status = "Failed".into();
    let observed = Observed {
        iteration: Some(failed),
        project: Some(Project {
            id: pid(),
            name: "Widgets".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (decision, actions) = plan_text(&training_failed(), &observed, &chain_config());
    assert!(matches!(decision, Decision::Accepted(_)));
    let row = training_row_of(&actions);
    assert_eq!(
        actions.len(),
        1,
        "a failed training runs nothing: {actions:?}"
    );
    assert_eq!(row.properties[Prop::Confirmed], true);
    assert_eq!(row.properties[Prop::ProjectName], "Widgets");
    assert_eq!(row.properties[Prop::IterationName], "Iteration 3");

    // The iteration does not exist (a made-up id): recorded, never confirmed.
    let gone = Observed {
        problem: Some("iteration not found (NotFound)".into()),
        ..Default::default()
    };
    let (_, actions) = plan_text(&training_failed(), &gone, &chain_config());
    let row = training_row_of(&actions);
    assert_eq!(row.properties.flag(Prop::Confirmed), None);
    assert!(
        row.properties
            .text(Prop::Confirmation)
            .starts_with("unconfirmed: Custom Vision answered iteration not found"),
        "{:?}",
        row.properties.text(Prop::Confirmation)
    );

    // The service says the iteration completed: the notification is contradicted.
    let (_, actions) = plan_text(
        &training_failed(),
        &Observed {
            iteration: Some(completed_iteration()),
            ..Default::default()
        },
        &chain_config(),
    );
    let row = training_row_of(&actions);
    assert_eq!(row.properties.flag(Prop::Confirmed), None);
    assert_eq!(
        row.properties[Prop::Confirmation],
        "contradicted: Custom Vision reports the iteration Completed, not Failed"
    );

    // Still training: the service's status may trail its notification, so ask again later.
    let mut training = completed_iteration();
    training.status = "Training".into();
    let (decision, _) = plan_text(
        &training_failed(),
        &Observed {
            iteration: Some(training),
            ..Default::default()
        },
        &chain_config(),
    );
    assert!(matches!(decision, Decision::Retry(_)));
}

#[test]
fn a_training_is_confirmed_only_when_custom_vision_agrees() {
    let observed = Observed {
        iteration: Some(completed_iteration()),
        ..Default::default()
    };
    let (_, actions) = plan_text(&training_completed(), &observed, &chain_config());
    assert_eq!(training_row_of(&actions).properties[Prop::Confirmed], true);

    // A TrainingCompleted for an iteration the service reports failed: recorded, nothing run.
    let mut failed = completed_iteration();
    failed.status = "Failed".into();
    let (decision, actions) = plan_text(
        &training_completed(),
        &Observed {
            iteration: Some(failed),
            ..Default::default()
        },
        &chain_config(),
    );
    assert!(matches!(decision, Decision::Accepted(_)));
    assert_eq!(actions.len(), 1, "nothing but the row: {actions:?}");
    let row = training_row_of(&actions);
    assert_eq!(row.properties.flag(Prop::Confirmed), None);
    assert_eq!(
        row.properties[Prop::Confirmation],
        "contradicted: Custom Vision reports the iteration Failed, not Completed"
    );

    // Without Custom Vision nothing can confirm it; outside CVCHAIN_PROJECTS nothing is asked.
    let (_, actions) = plan_text(&training_completed(), &Observed::default(), &config());
    let row = training_row_of(&actions);
    assert_eq!(row.properties.flag(Prop::Confirmed), None);
    assert!(
        row.properties
            .text(Prop::Confirmation)
            .starts_with("unconfirmed: no Custom Vision")
    );
    let mut only_others = chain_config();
    only_others.projects = Some(vec![Uuid::from_u128(7)]);
    let (_, actions) = plan_text(&training_completed(), &observed, &only_others);
    assert_eq!(
        training_row_of(&actions).properties.flag(Prop::Confirmed),
        None
    );
}
