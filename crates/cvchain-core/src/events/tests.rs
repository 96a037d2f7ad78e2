use super::delivery::{
    Answer, RetryPolicy, State, after_attempt, batches, due_for, for_sink, settled, still_pending,
};
use super::webhook::{VerifyError, parse_secret, secret_text, sign, verify};
use super::*;
use crate::chain::ExportTarget;
use crate::channels::{Channel, Holder, IterationRef, Move, PointerMove, Reason};
use crate::history::{StepRow, step_row};
use std::time::Duration;
use time::macros::datetime;
use uuid::Uuid;

const PROJECT: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const ITERATION: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

fn ctx() -> EventContext {
    EventContext {
        source: EventContext::default_source("acct", "CustomVisionHistory"),
        table: "CustomVisionHistory".into(),
        release_container: Some("https://acct.blob.core.windows.net/models".into()),
    }
}

fn facts() -> IterationFacts {
    IterationFacts {
        project_name: "Widgets".into(),
        iteration_name: "Iteration 2".into(),
        precision: Some(0.9),
        recall: Some(0.8),
        map: Some(0.85),
    }
}

fn now() -> OffsetDateTime {
    datetime!(2026-12-01 10:00:00 UTC)
}

fn training_row(status: EventStatus, verdict: Option<&str>) -> HistoryRow {
    let mut p = Props::new();
    p.set(
        Prop::EventType,
        RowKind::Notification(Kind::Training).as_str(),
    );
    p.set(Prop::Status, RowStatus::Event(status).as_str());
    p.set(Prop::ProjectId, PROJECT);
    p.set(Prop::IterationId, ITERATION);
    p.set(Prop::ReceivedAt, datetime!(2026-12-01 09:00:00.123 UTC));
    p.set(Prop::Confirmed, true);
    if status == EventStatus::TrainingCompleted {
        p.set(Prop::ProjectName, "Widgets");
        p.set(Prop::IterationName, "Iteration 2");
        p.set(Prop::TrainedAt, datetime!(2026-12-01 08:59:00 UTC));
        p.set(Prop::Precision, 0.9);
        p.set(Prop::Recall, 0.8);
        p.set(Prop::AveragePrecision, 0.85);
        p.set(Prop::Exportable, true);
        p.set(Prop::ExportableTo, "ONNX,TensorFlow");
    }
    if let Some(v) = verdict {
        p.set(Prop::GateVerdict, v);
        p.set(Prop::GateReasons, "map 0.85 >= 0.80; recall 0.80 >= 0.75");
    }
    HistoryRow {
        partition_key: PROJECT.into(),
        row_key: format!("Training_{ITERATION}_{}", status.as_str()),
        properties: p,
    }
}

fn target(platform: &str, flavor: Option<&str>) -> ExportTarget {
    ExportTarget {
        platform: platform.into(),
        flavor: flavor.map(str::to_owned),
    }
}

fn ids() -> (Uuid, Uuid) {
    (
        Uuid::parse_str(PROJECT).unwrap(),
        Uuid::parse_str(ITERATION).unwrap(),
    )
}

#[test]
fn a_completed_training_tells_its_metrics_and_the_gates_verdict() {
    let row = training_row(EventStatus::TrainingCompleted, Some("passed"));
    let events = insert_events(&row, &IterationFacts::default(), &ctx(), now());
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["io.cvchain.training.completed", "io.cvchain.gate.evaluated"]
    );
    let e = &events[0];
    assert_eq!(e.specversion, "1.0");
    assert_eq!(e.source, "/cvchain/acct/CustomVisionHistory");
    assert_eq!(
        e.subject,
        format!("projects/{PROJECT}/iterations/{ITERATION}")
    );
    assert_eq!(e.time, "2026-12-01T09:00:00.123Z");
    assert_eq!(e.datacontenttype, "application/json");
    assert_eq!(e.data["projectName"], "Widgets");
    assert_eq!(e.data["iterationName"], "Iteration 2");
    assert_eq!(e.data["metrics"]["mAP"], 0.85);
    assert_eq!(e.data["exportableTo"], json!(["ONNX", "TensorFlow"]));
    assert_eq!(e.data["history"]["rowKey"], row.row_key);
    let g = &events[1];
    assert_eq!(g.data["verdict"], "passed");
    assert_eq!(g.data["passed"], true);
    assert_eq!(
        g.data["reasons"],
        json!(["map 0.85 >= 0.80", "recall 0.80 >= 0.75"])
    );
    assert_ne!(e.id, g.id);
    // The same row again (a redelivery) gets the same ids, whenever it is built.
    let again = insert_events(
        &row,
        &IterationFacts::default(),
        &ctx(),
        now() + time::Duration::HOUR,
    );
    assert_eq!(again, events);
    // Ids are UUIDs: no `.`, as Standard Webhooks' webhook-id needs.
    assert!(Uuid::parse_str(&e.id).is_ok());
}

#[test]
fn a_training_custom_vision_did_not_confirm_tells_nothing() {
    for status in [EventStatus::TrainingCompleted, EventStatus::TrainingFailed] {
        let mut row = training_row(status, Some("passed"));
        row.properties.remove(Prop::Confirmed);
        assert_eq!(
            insert_events(&row, &facts(), &ctx(), now()),
            Vec::new(),
            "{status:?} unconfirmed"
        );
        row.properties.set(Prop::Confirmed, false);
        assert_eq!(insert_events(&row, &facts(), &ctx(), now()), Vec::new());
    }
}

#[test]
fn a_failed_training_and_a_training_without_verdict() {
    let events = insert_events(
        &training_row(EventStatus::TrainingFailed, None),
        &IterationFacts::default(),
        &ctx(),
        now(),
    );
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "io.cvchain.training.failed");
    let events = insert_events(
        &training_row(EventStatus::TrainingCompleted, None),
        &IterationFacts::default(),
        &ctx(),
        now(),
    );
    assert_eq!(events.len(), 1, "no verdict recorded: no gate event");
}

fn step(state: EntryState) -> HistoryRow {
    let (p, i) = ids();
    step_row(p, i, 0, &target("ONNX", None), state)
}

#[test]
fn step_rows_tell_requests_failures_and_releases_once() {
    let (p, i) = ids();
    // Requested: a new row in Exporting.
    let mut row = step(EntryState::Exporting);
    row.properties.set(Prop::RequestedAt, now());
    let requested = step_write_events(
        &StepWrite::Insert(row.clone()),
        None,
        &facts(),
        &ctx(),
        now(),
    );
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0].kind, "io.cvchain.export.requested");
    assert_eq!(requested[0].data["platform"], "ONNX");
    assert_eq!(requested[0].data["chainPosition"], 1);
    assert_eq!(requested[0].data["iterationName"], "Iteration 2");
    let before = StepRow::from_row(&row);
    // Done by GetExports: nothing to tell yet (the release tells).
    let mut done = Props::new();
    done.set(Prop::Status, "Done");
    done.set(Prop::EndedAt, now());
    let w = StepWrite::Merge {
        partition_key: p.to_string(),
        row_key: row.row_key.clone(),
        properties: done,
    };
    assert!(step_write_events(&w, Some(&before), &facts(), &ctx(), now()).is_empty());
    // Released.
    let mut rel = Props::new();
    rel.set(
        Prop::ReleaseUrl,
        "https://acct.blob.core.windows.net/models/Widgets/Iteration-2/ONNX.zip",
    );
    rel.set(Prop::ReleasePath, "Widgets/Iteration-2/ONNX.zip");
    rel.set_int(Prop::ReleaseSize, 1234);
    rel.set(Prop::ReleasedAt, now());
    let merge = |props: Props| StepWrite::Merge {
        partition_key: p.to_string(),
        row_key: row.row_key.clone(),
        properties: props,
    };
    let released = step_write_events(&merge(rel.clone()), Some(&before), &facts(), &ctx(), now());
    assert_eq!(released.len(), 1);
    let r = &released[0];
    assert_eq!(r.kind, "io.cvchain.model.released");
    assert_eq!(r.data["size"], 1234);
    assert_eq!(r.data["metrics"]["precision"], 0.9);
    assert!(!r.to_json().contains('?'), "a URL without its query");
    // A redelivery that sees the copy recorded: nothing.
    let mut after = before.clone();
    after.release_url = Some(rel.text(Prop::ReleaseUrl).to_owned());
    after.state = Some(EntryState::Done);
    assert!(step_write_events(&merge(rel), Some(&after), &facts(), &ctx(), now()).is_empty());
    // Failed, and refused: export.failed with the reason.
    let mut failed = Props::new();
    failed.set(Prop::Status, "Refused");
    failed.set(Prop::Reason, "BadRequestProjectUnsupportedExportPlatform");
    let f = step_write_events(&merge(failed), Some(&before), &facts(), &ctx(), now());
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "io.cvchain.export.failed");
    assert_eq!(f[0].data["status"], "Refused");
    assert_eq!(
        f[0].data["reason"],
        "BadRequestProjectUnsupportedExportPlatform"
    );
    // Each change of the row has its own id, and the same change the same id.
    let ids: std::collections::BTreeSet<&str> = [&requested[0], r, &f[0]]
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ids.len(), 3);
    let _ = i;
}

#[test]
fn skipped_and_unknown_steps_tell_nothing() {
    for s in [EntryState::Skipped, EntryState::Unknown, EntryState::Done] {
        let events = insert_events(&step(s), &facts(), &ctx(), now());
        assert!(events.is_empty(), "{s:?}");
    }
    let failed = insert_events(&step(EntryState::Failed), &facts(), &ctx(), now());
    assert_eq!(failed[0].kind, "io.cvchain.export.failed");
}

fn iteration_ref(name: &str, id: Uuid) -> IterationRef {
    IterationRef {
        id,
        name: name.into(),
        trained_at: Some("2026-12-01T08:59:00Z".into()),
        precision: Some(0.9),
        recall: Some(0.8),
        map: Some(0.85),
    }
}

#[test]
fn channel_moves_name_both_iterations_and_urls() {
    let (p, i) = ids();
    let prev = Uuid::from_u128(7);
    let mv = Move {
        channel: Channel::Production,
        target: target("TensorFlow", Some("TensorFlowLite")),
        to: Holder {
            iteration: iteration_ref("Iteration 2", i),
            release_path: "Widgets/Iteration 2/TensorFlow-TensorFlowLite.zip".into(),
            channel_path: "Widgets/channels/production/TensorFlow-TensorFlowLite.zip".into(),
            size: 10,
            content_md5: None,
            promoted_at: "2026-12-01T10:00:00.000Z".into(),
            reason: Reason::Gate,
            revision: 4,
            note: None,
        },
        from: Some(iteration_ref("Iteration 1", prev)),
    };
    let row = crate::channels::move_row(p, &mv);
    let events = insert_events(&row, &facts(), &ctx(), now());
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.kind, "io.cvchain.channel.moved");
    assert_eq!(e.data["channel"], "production");
    assert_eq!(e.data["pointer"], false);
    assert_eq!(e.data["flavor"], "TensorFlowLite");
    assert_eq!(e.data["reason"], "gate");
    assert_eq!(e.data["revision"], 4);
    assert_eq!(e.data["previousIteration"]["name"], "Iteration 1");
    assert_eq!(
        e.data["releaseUrl"],
        "https://acct.blob.core.windows.net/models/Widgets/Iteration%202/TensorFlow-TensorFlowLite.zip"
    );
    assert_eq!(
        e.data["channelUrl"],
        "https://acct.blob.core.windows.net/models/Widgets/channels/production/TensorFlow-TensorFlowLite.zip"
    );
    let pm = PointerMove {
        to: iteration_ref("Iteration 2", i),
        from: None,
        reason: Reason::Gate,
        revision: 3,
    };
    let row = crate::channels::pointer_row(p, &pm, now(), None);
    let e = &insert_events(&row, &facts(), &ctx(), now())[0];
    assert_eq!(e.data["pointer"], true);
    assert_eq!(e.data["platform"], Value::Null);
    assert_eq!(e.data["previousIteration"], Value::Null);
}

#[test]
fn a_retention_deletion_says_why_and_what_was_kept() {
    let (p, i) = ids();
    let d = crate::retention::Decision {
        iteration: i,
        name: "Iteration 1".into(),
        trained_at: Some("2026-11-01T00:00:00Z".into()),
        why: "older than the newest 2".into(),
    };
    let plan = crate::retention::Plan {
        delete: vec![d.clone()],
        kept: Vec::new(),
    };
    let row = crate::retention::deletion_row(p, &d, &plan, now());
    let e = &insert_events(&row, &facts(), &ctx(), now())[0];
    assert_eq!(e.kind, "io.cvchain.iteration.deleted");
    assert_eq!(e.data["reason"], "older than the newest 2");
    assert_eq!(e.time, "2026-12-01T10:00:00Z");
}

#[test]
fn the_chain_completes_once_per_iteration() {
    let (p, i) = ids();
    let mut onnx = step(EntryState::Done);
    onnx.properties.set(
        Prop::ReleaseUrl,
        "https://acct.blob.core.windows.net/models/x.zip",
    );
    let mut tf = step_row(p, i, 1, &target("TensorFlow", None), EntryState::Refused);
    tf.properties.set(Prop::Reason, "unsupported");
    let steps = StepRow::all(&[tf, onnx]);
    let row_a = training_row(EventStatus::TrainingCompleted, None);
    let mut row_b = row_a.clone();
    row_b.row_key = format!("Export_{ITERATION}_ONNX_ExportCompleted");
    let a = chain_completed(&row_a, PROJECT, ITERATION, &steps, &facts(), &ctx(), now());
    let b = chain_completed(&row_b, PROJECT, ITERATION, &steps, &facts(), &ctx(), now());
    assert_eq!(a.id, b.id, "whichever notification sees it");
    assert_eq!(a.kind, "io.cvchain.chain.completed");
    let exports = a.data["exports"].as_array().unwrap();
    assert_eq!(exports[0]["platform"], "ONNX", "in chain order");
    assert_eq!(exports[1]["status"], "Refused");
    assert_eq!(exports[1]["reason"], "unsupported");
}

#[test]
fn an_outbox_row_reads_back_as_written() {
    let e = &insert_events(
        &training_row(EventStatus::TrainingCompleted, None),
        &facts(),
        &ctx(),
        now(),
    )[0];
    let row = outbox_row(
        PROJECT,
        e,
        "Training_x",
        &[Sink::Queue, Sink::Webhook],
        "0001-00",
    );
    assert_eq!(row.row_key, format!("Outbox_{}", e.id));
    assert_eq!(row.kind(), Some(RowKind::Outbox));
    let o = OutboxRow::from_row(&row).unwrap();
    assert_eq!(o.sinks, [Sink::Queue, Sink::Webhook]);
    assert!(o.pending);
    assert_eq!(CloudEvent::from_json(&o.event).unwrap(), *e);
    assert_eq!(o.state(Sink::Queue), DeliveryState::default());
    assert_eq!(o.kind, "io.cvchain.training.completed");
    assert_eq!(
        EventType::parse("model.released"),
        Some(EventType::ModelReleased)
    );
    assert_eq!(
        EventType::parse("io.cvchain.CHANNEL.moved"),
        Some(EventType::ChannelMoved)
    );
}

fn outbox(seq: &str, sinks: &[Sink]) -> OutboxRow {
    let e = test_event(&ctx(), &format!("id-{seq}"), now());
    OutboxRow::from_row(&outbox_row(PROJECT, &e, "x", sinks, seq)).unwrap()
}

#[test]
fn answers_become_states() {
    let policy = RetryPolicy::default();
    let s0 = DeliveryState::default();
    let ok = after_attempt(
        &s0,
        &Answer::Delivered("HTTP 204".into()),
        &policy,
        "a",
        now(),
    );
    assert_eq!((ok.state, ok.attempts), (State::Delivered, 1));
    // 5xx, a refused connection: later, with backoff.
    let down = Answer::Refused {
        status: None,
        detail: "connection refused".into(),
        retry_after: None,
    };
    let s1 = after_attempt(&s0, &down, &policy, "a", now());
    assert_eq!(s1.state, State::Pending);
    assert!(!s1.is_due(now()));
    assert!(s1.is_due(now() + time::Duration::seconds(6)));
    let s2 = after_attempt(&s1, &down, &policy, "a", now() + time::Duration::seconds(6));
    assert!(!s2.is_due(now() + time::Duration::seconds(6 + 14)));
    assert!(s2.is_due(now() + time::Duration::seconds(6 + 17)));
    // Retry-After wins over the backoff.
    let throttled = Answer::Refused {
        status: Some(429),
        detail: "HTTP 429".into(),
        retry_after: Some(Duration::from_secs(120)),
    };
    let s = after_attempt(&s0, &throttled, &policy, "a", now());
    assert!(!s.is_due(now() + time::Duration::seconds(119)));
    assert!(s.is_due(now() + time::Duration::seconds(120)));
    // A 4xx other than 408/429: failed for good, with the answer.
    for status in [400, 401, 404, 410, 413, 301] {
        let s = after_attempt(
            &s0,
            &Answer::Refused {
                status: Some(status),
                detail: format!("HTTP {status}: no sig=abc"),
                retry_after: None,
            },
            &policy,
            "a",
            now(),
        );
        assert_eq!(s.state, State::Failed, "{status}");
        assert!(!s.answer.as_ref().unwrap().contains("abc"), "redacted");
    }
    for status in [408, 429, 500, 503] {
        let s = after_attempt(
            &s0,
            &Answer::Refused {
                status: Some(status),
                detail: "x".into(),
                retry_after: None,
            },
            &policy,
            "a",
            now(),
        );
        assert_eq!(s.state, State::Pending, "{status}");
    }
    // Failing for three days: given up.
    let late = after_attempt(&s1, &down, &policy, "a", now() + time::Duration::hours(73));
    assert_eq!(late.state, State::Failed);
    assert!(late.answer.unwrap().starts_with("gave up after 2 attempts"));
    // The state survives its JSON.
    assert_eq!(DeliveryState::parse(&s2.to_json()), s2);
    assert_eq!(DeliveryState::parse("not json"), DeliveryState::default());
}

#[test]
fn backoff_grows_threefold_to_its_cap() {
    let p = RetryPolicy {
        first: Duration::from_secs(5),
        ..Default::default()
    };
    let waits: Vec<u64> = (1..=4).map(|n| p.backoff(n, "").as_secs()).collect();
    assert_eq!(waits, [5, 15, 45, 135]);
    assert_eq!(p.backoff(30, "").as_secs(), 12 * 3600);
    let jittered = p.backoff(2, "some-event-id");
    assert!(jittered >= Duration::from_secs(15) && jittered <= Duration::from_millis(16_500));
}

#[test]
fn a_notification_in_flight_holds_back_what_was_written_after_it_began() {
    let rows = vec![
        outbox("00000000000000000010-000", &[Sink::Queue]),
        outbox("00000000000000000020-000", &[Sink::Queue]),
        outbox("00000000000000000030-001", &[Sink::Queue]),
    ];
    let seqs =
        |rows: &[OutboxRow]| -> Vec<String> { rows.iter().map(|r| r.sequence.clone()).collect() };
    assert_eq!(settled(&rows, None).len(), 3, "nothing in flight");
    // Began at 20: its own events go at 20, before the one written at 20 and the later ones.
    assert_eq!(
        seqs(settled(&rows, Some("00000000000000000020-000"))),
        ["00000000000000000010-000"]
    );
    assert_eq!(settled(&rows, Some("00000000000000000005-000")).len(), 0);
    assert_eq!(settled(&rows, Some("00000000000000000040-000")).len(), 3);
}

#[test]
fn a_sink_takes_events_in_order_and_never_past_one_waiting() {
    let mut rows = vec![
        outbox("1", &[Sink::Webhook, Sink::Queue]),
        outbox("2", &[Sink::Webhook, Sink::Queue]),
        outbox("3", &[Sink::Webhook]),
    ];
    let due: Vec<&str> = due_for(&rows, Sink::Webhook, now())
        .iter()
        .map(|r| r.sequence.as_str())
        .collect();
    assert_eq!(due, ["1", "2", "3"]);
    // The first waits for its retry: the webhook takes nothing; the queue is not held up.
    let waiting = after_attempt(
        &DeliveryState::default(),
        &Answer::Refused {
            status: Some(503),
            detail: "down".into(),
            retry_after: None,
        },
        &RetryPolicy::default(),
        "",
        now(),
    );
    rows[0].states.push((Sink::Webhook, waiting));
    assert!(due_for(&rows, Sink::Webhook, now()).is_empty());
    assert_eq!(due_for(&rows, Sink::Queue, now()).len(), 2);
    assert!(due_for(&rows, Sink::EventGrid, now()).is_empty());
    // A failed one is passed over.
    rows[0].states = vec![(
        Sink::Webhook,
        DeliveryState {
            state: State::Failed,
            ..Default::default()
        },
    )];
    assert_eq!(due_for(&rows, Sink::Webhook, now()).len(), 2);
    assert!(still_pending(&rows[0]), "the queue has not taken it");
    rows[0].states.push((
        Sink::Queue,
        DeliveryState {
            state: State::Delivered,
            ..Default::default()
        },
    ));
    assert!(!still_pending(&rows[0]));
}

fn stored(e: &CloudEvent, sinks: &[Sink]) -> OutboxRow {
    OutboxRow::from_row(&outbox_row(PROJECT, e, "Training_x", sinks, "1")).unwrap()
}

#[test]
fn an_event_too_large_for_a_sink_is_sent_with_its_strings_shortened() {
    let mut e = insert_events(
        &training_row(EventStatus::TrainingCompleted, None),
        &facts(),
        &ctx(),
        now(),
    )
    .remove(0);
    let small = for_sink(&stored(&e, &[Sink::Webhook]), Sink::Webhook, &ctx());
    assert_eq!((small.body, small.trimmed), (e.to_json(), None));
    e.data["projectName"] = json!("x".repeat(25_000));
    let json = e.to_json();
    // Whole in the outbox (under its limit), shortened for the webhook only.
    let row = outbox_row(PROJECT, &e, "Training_x", &[Sink::Webhook], "1");
    assert_eq!(row.properties.text(Prop::CloudEvent), json);
    assert!(!row.properties.contains(Prop::Note));
    let o = OutboxRow::from_row(&row).unwrap();
    assert_eq!(for_sink(&o, Sink::Queue, &ctx()).trimmed, None);
    let f = for_sink(&o, Sink::Webhook, &ctx());
    assert!(f.body.len() <= Sink::Webhook.max_event_bytes());
    assert!(f.trimmed.unwrap().contains("over the webhook's limit"));
    let back = CloudEvent::from_json(&f.body).unwrap();
    assert_eq!(
        (&back.id, &back.subject, &back.time),
        (&e.id, &e.subject, &e.time)
    );
    assert_eq!(back.data["history"]["rowKey"], e.data["history"]["rowKey"]);
    assert_eq!(back.data["iterationId"], ITERATION);
    assert_eq!(back.data["trimmed"]["size"], json.len());
    assert_eq!(back.data["trimmed"]["by"], "webhook");
    assert_eq!(back.data["trimmed"]["strings"], 1);
    // Only the long string was shortened, and says so; every other member is as it was.
    let name = back.data["projectName"].as_str().unwrap();
    assert!(
        name.starts_with("xxxx") && name.ends_with('…'),
        "{name:.20}"
    );
    assert!(name.len() > 15_000, "shortened just enough: {}", name.len());
    assert_eq!(back.data["metrics"], e.data["metrics"]);
    assert_eq!(back.data["iterationName"], "Iteration 2");
    // Larger than a table property holds: recorded shortened, and the row says so.
    e.data["projectName"] = json!("x".repeat(100_000));
    let row = outbox_row(PROJECT, &e, "Training_x", &[Sink::Webhook], "1");
    let text = row.properties.text(Prop::CloudEvent);
    assert!(crate::bounds::encoded_units(text) <= OUTBOX_MAX_EVENT);
    assert!(
        row.properties
            .text(Prop::Note)
            .contains("over the outbox's limit"),
        "{}",
        row.properties.text(Prop::Note)
    );
    let back = CloudEvent::from_json(text).unwrap();
    assert_eq!(back.id, e.id);
    assert_eq!(back.data["trimmed"]["by"], "outbox");
    // Arrays too many to shorten into the bound: the data is reduced to its ids.
    e.data["projectName"] = json!("Widgets");
    e.data["exportableTo"] = json!(vec!["ONNX"; 20_000]);
    let o = stored(&e, &[Sink::Webhook]);
    let f = for_sink(&o, Sink::Webhook, &ctx());
    let back = CloudEvent::from_json(&f.body).unwrap();
    assert!(back.data.get("exportableTo").is_none());
    assert_eq!(back.data["projectId"], PROJECT);
    assert!(
        back.data["trimmed"]["note"]
            .as_str()
            .unwrap()
            .contains("ids")
    );
}

#[test]
fn a_stored_event_that_does_not_read_is_sent_as_an_event_all_the_same() {
    let e = test_event(&ctx(), "id-1", now());
    let mut o = stored(&e, &[Sink::Webhook]);
    // As the seal of an earlier version cut it: inside a string.
    o.event = e.to_json()[..60].to_owned();
    o.subject = format!("projects/{PROJECT}/iterations/{ITERATION}");
    o.iteration_id = ITERATION.into();
    for sink in Sink::ALL {
        let f = for_sink(&o, sink, &ctx());
        let back = CloudEvent::from_json(&f.body).unwrap();
        assert_eq!(back.id, "id-1");
        assert_eq!(back.kind, "io.cvchain.test");
        assert_eq!(back.source, ctx().source);
        assert_eq!(back.time, "2026-12-01T10:00:00Z");
        assert_eq!(back.data["history"]["rowKey"], "Training_x");
        assert_eq!(back.data["iterationId"], ITERATION);
    }
    // An empty time or subject is left out rather than sent as "" (not a time).
    o.time = None;
    o.subject.clear();
    let f = for_sink(&o, Sink::Queue, &ctx());
    let v: serde_json::Value = serde_json::from_str(&f.body).unwrap();
    assert!(v.get("time").is_none() && v.get("subject").is_none(), "{v}");
}

#[test]
fn signatures_match_the_standard_webhooks_reference() {
    // The example of Standard Webhooks' libraries: the same secret, id, timestamp and body
    // give the same signature.
    let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let body = br#"{"test": 2432232314}"#;
    let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
    assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    let ok = |sigs: &str, ts: i64, body: &[u8]| {
        verify(
            &key,
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
            Some(&ts.to_string()),
            Some(sigs),
            body,
            1614265330 + 10,
        )
    };
    assert_eq!(ok(&sig, 1614265330, body), Ok(()));
    assert_eq!(ok(&format!("v1a,xyz {sig}"), 1614265330, body), Ok(()));
    assert_eq!(
        ok(&sig, 1614265330, br#"{"test": 2432232315}"#),
        Err(VerifyError::NoMatch)
    );
    assert!(matches!(
        ok(&sig, 1614265330 - 600, body),
        Err(VerifyError::OutsideTolerance(_))
    ));
}

#[test]
fn secrets_are_checked_without_being_quoted() {
    let good = secret_text(&[7u8; 32]);
    assert_eq!(parse_secret(&good).unwrap(), vec![7u8; 32]);
    for bad in [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_not base64!",
        &secret_text(&[1u8; 8]),
    ] {
        let e = parse_secret(bad).unwrap_err();
        assert!(!e.contains(bad.trim_start_matches("whsec_")), "{e}");
    }
}

/// Names no one would choose, each a way the stored or sent event once stopped being JSON or
/// stopped being an event.
fn hostile_names() -> Vec<String> {
    vec![
        // Fits the outbox's bound as JSON (20,000 bytes) but not once the table escapes it again.
        "\"".repeat(10_000),
        // A spelling redaction cannot fix in place: the whole event used to be withheld.
        r"Widgets \u002573ig=X".into(),
        "a\u{2028}b\u{2029}c \u{85}d \u{feff}e \u{200f}f 😀 \u{0}".into(),
        "\\".repeat(12_000),
        "€".repeat(40_000),
        "sig=SECRET1 ".repeat(3_000),
    ]
}

#[test]
fn hostile_names_make_events_that_stay_events_in_the_outbox() {
    for (name, both) in hostile_names()
        .into_iter()
        .flat_map(|n| [(n.clone(), false), (n, true)])
    {
        let mut row = training_row(EventStatus::TrainingCompleted, Some("passed"));
        row.properties.set(Prop::ProjectName, name.as_str());
        if both {
            row.properties.set(Prop::IterationName, name.as_str());
        }
        let events = insert_events(&row, &facts(), &ctx(), now());
        assert_eq!(events.len(), 2);
        for e in events {
            let what = format!(
                "{} with a name of {} characters",
                e.kind,
                name.chars().count()
            );
            let out = outbox_row(PROJECT, &e, &row.row_key, &[Sink::Webhook], "1");
            let stored = out.properties.text(Prop::CloudEvent);
            // Written as it is: sealing the row (redaction, the table's bound) changes nothing.
            let sealed = crate::history::seal(&out.properties);
            assert_eq!(
                sealed.text(Prop::CloudEvent),
                stored,
                "{what}: sealing changed it"
            );
            let back = CloudEvent::from_json(stored).unwrap_or_else(|err| panic!("{what}: {err}"));
            assert_eq!(
                (
                    &back.id,
                    &back.kind,
                    &back.subject,
                    &back.time,
                    &back.source
                ),
                (&e.id, &e.kind, &e.subject, &e.time, &e.source),
                "{what}"
            );
            assert_eq!(back.data["history"], e.data["history"], "{what}");
            assert_eq!(back.data["projectId"], PROJECT, "{what}");
            assert_eq!(crate::redact::find_leak(stored), None, "{what}");
            // The name is kept, or shortened and the event says so, or (holding a secret in a
            // spelling that cannot be redacted) replaced: never the whole event.
            let got = back.data["projectName"].as_str().unwrap_or_default();
            assert!(
                got == name
                    || back.data["trimmed"].is_object()
                    || got == crate::redact::WITHHELD
                    || !got.contains("SECRET1"),
                "{what}: {got:.80}"
            );
            if name.contains("SECRET1") {
                assert!(!stored.contains("SECRET1"), "{what}");
            }
            // Each sink gets a CloudEvent within its limit, shortened from the data again.
            let o = OutboxRow::from_row(&out).unwrap();
            for sink in Sink::ALL {
                let f = for_sink(&o, sink, &ctx());
                assert!(f.body.len() <= sink.max_event_bytes(), "{what} to {sink:?}");
                let sent = CloudEvent::from_json(&f.body)
                    .unwrap_or_else(|err| panic!("{what} to {sink:?}: {err}"));
                assert_eq!((&sent.id, &sent.time), (&e.id, &e.time), "{what}");
                assert_eq!(sent.data["history"], e.data["history"], "{what}");
                assert_eq!(crate::redact::find_leak(&f.body), None, "{what}");
            }
        }
    }
}

#[test]
fn event_grid_batches_keep_the_order_within_their_bounds() {
    assert!(batches(&[], 100, 10).is_empty());
    // 2 + 40 + 1 + 40 = 83 fits 100; a third does not.
    assert_eq!(batches(&[40, 40, 40], 100, 10), [0..2, 2..3]);
    assert_eq!(batches(&[40, 40, 40], 1000, 2), [0..2, 2..3]);
    // One larger than the bound goes alone, and the rest go on.
    assert_eq!(batches(&[10, 500, 10, 10], 100, 10), [0..1, 1..2, 2..4]);
    let sizes = vec![1000; 2_500];
    let b = batches(&sizes, 1_000_000, 100);
    assert_eq!(b.len(), 25);
    assert!(b.iter().all(|r| r.len() == 100));
    assert_eq!(b.last().unwrap().end, 2_500);
}

#[test]
fn a_failed_channel_move_is_told() {
    use crate::channels::{FailedMove, failed_move_row};
    let p = Uuid::from_u128(99);
    let it = IterationRef {
        id: Uuid::from_u128(2),
        name: "Iteration 2".into(),
        trained_at: None,
        precision: Some(0.9),
        recall: None,
        map: None,
    };
    let f = FailedMove {
        channel: Some(Channel::Latest),
        target: Some(ExportTarget {
            platform: "ONNX".into(),
            flavor: None,
        }),
        iteration: it,
        release_path: Some("Widgets/Iteration-2/ONNX.zip".into()),
        channel_path: Some("Widgets/channels/latest/ONNX.zip".into()),
        reason: "both paths hold someone else's blobs".into(),
        transient: false,
    };
    let at = datetime!(2026-11-30 12:00 UTC);
    let row = failed_move_row(p, &f, at);
    let events = insert_events(&row, &IterationFacts::default(), &ctx(), at);
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.kind, "io.cvchain.channel.move_failed");
    assert_eq!(e.event_type(), Some(EventType::ChannelMoveFailed));
    assert_eq!(
        e.subject,
        format!("projects/{p}/iterations/{}", Uuid::from_u128(2))
    );
    assert_eq!(e.data["channel"], "latest");
    assert_eq!(e.data["platform"], "ONNX");
    assert_eq!(e.data["pointer"], false);
    assert_eq!(e.data["transient"], false);
    assert_eq!(e.data["reason"], "both paths hold someone else's blobs");
    assert_eq!(e.data["failedAt"], "2026-11-30T12:00:00Z");
    // The same failure recorded again is the same event.
    let again = insert_events(
        &failed_move_row(p, &f, at),
        &IterationFacts::default(),
        &ctx(),
        at,
    );
    assert_eq!(again[0].id, e.id);
    assert_eq!(
        EventType::parse("channel.move_failed"),
        Some(EventType::ChannelMoveFailed)
    );
}

// ---------------------------------------------------------------------------------------------
// Chat: which events reach Teams and Slack, and the messages they become.

fn pointer_move(from: Option<IterationRef>) -> CloudEvent {
    let (p, i) = ids();
    let pm = PointerMove {
        to: iteration_ref("Iteration 2", i),
        from,
        reason: Reason::Gate,
        revision: 3,
    };
    insert_events(
        &crate::channels::pointer_row(p, &pm, now(), None),
        &facts(),
        &ctx(),
        now(),
    )
    .remove(0)
}

fn target_move(channel: Channel) -> CloudEvent {
    let (p, i) = ids();
    let mv = Move {
        channel,
        target: target("ONNX", None),
        to: Holder {
            iteration: iteration_ref("Iteration 2", i),
            release_path: "Widgets/Iteration 2/ONNX.zip".into(),
            channel_path: "Widgets/channels/x/ONNX.zip".into(),
            size: 10,
            content_md5: None,
            promoted_at: "2026-12-01T10:00:00.000Z".into(),
            reason: Reason::Gate,
            revision: 4,
            note: None,
        },
        from: None,
    };
    insert_events(&crate::channels::move_row(p, &mv), &facts(), &ctx(), now()).remove(0)
}

fn gate(verdict: &str) -> CloudEvent {
    insert_events(
        &training_row(EventStatus::TrainingCompleted, Some(verdict)),
        &facts(),
        &ctx(),
        now(),
    )
    .remove(1)
}

#[test]
fn chat_is_told_what_people_act_on_and_production_once_per_move() {
    use super::chat::ChatSelection;
    let d = ChatSelection::default();
    let completed = insert_events(
        &training_row(EventStatus::TrainingCompleted, Some("passed")),
        &facts(),
        &ctx(),
        now(),
    );
    assert_eq!(completed[0].kind, "io.cvchain.training.completed");
    assert!(!d.wants(&completed[0]), "not every training");
    assert!(d.wants(&completed[1]), "the gate's verdict");
    let failed = insert_events(
        &training_row(EventStatus::TrainingFailed, None),
        &facts(),
        &ctx(),
        now(),
    );
    assert!(d.wants(&failed[0]));
    assert!(d.wants(&pointer_move(None)), "production moved");
    assert!(
        !d.wants(&target_move(Channel::Production)),
        "each target's copy"
    );
    assert!(
        !d.wants(&target_move(Channel::Latest)),
        "each target's latest"
    );
    let mut requested = step(EntryState::Exporting);
    requested.properties.set(Prop::RequestedAt, now());
    let requested = insert_events(&requested, &facts(), &ctx(), now()).remove(0);
    assert!(!d.wants(&requested), "not every export.requested");
    assert!(d.wants(&insert_events(&step(EntryState::Failed), &facts(), &ctx(), now())[0]));
    // Chosen by name, short or full; every move on request; mistakes named.
    let s = ChatSelection::parse("io.cvchain.export.requested; channel.moved:all").unwrap();
    assert!(s.wants(&requested) && s.wants(&target_move(Channel::Latest)));
    assert!(!s.wants(&gate("passed")));
    assert!(ChatSelection::parse("all").unwrap().wants(&completed[0]));
    for bad in ["gate.evaluted", "gate.evaluated:all", "test", " , "] {
        let e = ChatSelection::parse(bad).unwrap_err();
        assert!(
            e.contains(bad.trim_matches([' ', ','])) || e.contains("no event"),
            "{e}"
        );
    }
    assert!(
        d.describe().contains("channel.moved (production)"),
        "{}",
        d.describe()
    );
}

#[test]
fn events_chat_does_not_want_are_skipped_and_hold_up_nothing() {
    let routing = Routing::default();
    let sinks = [Sink::Webhook, Sink::Teams, Sink::Slack];
    let mut requested = step(EntryState::Exporting);
    requested.properties.set(Prop::RequestedAt, now());
    let requested = insert_events(&requested, &facts(), &ctx(), now()).remove(0);
    let rows: Vec<OutboxRow> = [(requested, "1"), (gate("failed"), "2")]
        .iter()
        .map(|(e, seq)| {
            OutboxRow::from_row(&outbox_row_routed(PROJECT, e, "x", &sinks, &routing, seq)).unwrap()
        })
        .collect();
    assert_eq!(rows[0].state(Sink::Teams).state, State::Skipped);
    assert_eq!(rows[0].state(Sink::Slack).state, State::Skipped);
    assert_eq!(rows[0].state(Sink::Webhook), DeliveryState::default());
    assert!(rows[0].pending, "the webhook still has to take it");
    assert_eq!(rows[1].state(Sink::Teams), DeliveryState::default());
    assert_eq!(rows[0].state(Sink::Teams).describe(), "skipped");
    // The skipped one does not hold up the gate's verdict for chat.
    for sink in [Sink::Teams, Sink::Slack] {
        let due: Vec<&str> = due_for(&rows, sink, now())
            .iter()
            .map(|r| r.sequence.as_str())
            .collect();
        assert_eq!(due, ["2"], "{sink:?}");
    }
    assert_eq!(due_for(&rows, Sink::Webhook, now()).len(), 2);
    // Only chat sinks, nothing chosen: not pending at all.
    let only_chat = outbox_row_routed(
        PROJECT,
        &rows_event(&rows[0]),
        "x",
        &[Sink::Teams],
        &routing,
        "3",
    );
    assert_eq!(only_chat.properties.flag(Prop::Pending), Some(false));
    // Replay starts from the same decision.
    let states = routing.initial_states(&sinks, &gate("passed"));
    assert!(states.iter().all(|(_, s)| s.state == State::Pending));
}

fn rows_event(row: &OutboxRow) -> CloudEvent {
    CloudEvent::from_json(&row.event).unwrap()
}

fn teams_card(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["type"], "message");
    let attachments = v["attachments"].as_array().unwrap();
    assert_eq!(attachments.len(), 1);
    let a = &attachments[0];
    assert_eq!(a["contentType"], "application/vnd.microsoft.card.adaptive");
    assert!(a.get("contentUrl").is_some_and(Value::is_null), "{a}");
    let card = &a["content"];
    assert_eq!(card["type"], "AdaptiveCard");
    assert_eq!(
        card["$schema"],
        "http://adaptivecards.io/schemas/adaptive-card.json"
    );
    assert_eq!(card["version"], "1.5");
    card.clone()
}

fn all_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(all_text).collect::<Vec<_>>().join("\n"),
        Value::Object(m) => m.values().map(all_text).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

fn slack_checked(body: &str) -> Value {
    use super::chat::*;
    let v: Value = serde_json::from_str(body).unwrap();
    assert!(!v["text"].as_str().unwrap().is_empty());
    let blocks = v["blocks"].as_array().unwrap();
    assert!(!blocks.is_empty() && blocks.len() <= SLACK_MAX_BLOCKS);
    for b in blocks {
        let chars = |t: &Value| t["text"].as_str().unwrap().chars().count();
        match b["type"].as_str().unwrap() {
            "header" => {
                assert_eq!(b["text"]["type"], "plain_text");
                assert!(chars(&b["text"]) <= SLACK_MAX_HEADER_CHARS);
            }
            "section" => {
                if let Some(t) = b.get("text") {
                    assert_eq!(t["type"], "mrkdwn");
                    assert!(chars(t) <= SLACK_MAX_SECTION_CHARS);
                }
                let fields = b.get("fields").and_then(Value::as_array);
                for f in fields.into_iter().flatten() {
                    assert!(chars(f) <= SLACK_MAX_FIELD_CHARS);
                }
                assert!(fields.is_none_or(|f| f.len() <= SLACK_MAX_FIELDS));
                assert!(b.get("text").is_some() || fields.is_some(), "{b}");
            }
            "context" => {
                assert!(b["elements"].as_array().unwrap().len() <= 10);
            }
            other => panic!("unexpected block {other}"),
        }
    }
    v
}

fn routing_with_console() -> Routing {
    Routing {
        console: Some("https://cv-app.azurewebsites.net/api/history".into()),
        ..Default::default()
    }
}

#[test]
fn chat_messages_name_the_project_iteration_metrics_verdict_and_link() {
    let r = routing_with_console();
    let link = format!("https://cv-app.azurewebsites.net/api/history/{PROJECT}");
    // The gate refused: the verdict, its reasons, the metrics as percentages.
    let e = gate("failed");
    let teams = delivery::chat_for(&e, Sink::Teams, &r);
    assert_eq!(teams.trimmed, None);
    let card = teams_card(&teams.body);
    let text = all_text(&card);
    for want in [
        "Gate refused: Widgets · Iteration 2",
        "90.0%",
        "80.0%",
        "85.0%",
        "map 0.85 >= 0.80",
        "recall 0.80 >= 0.75",
        "failed",
        &e.id,
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    assert_eq!(card["body"][0]["color"], "Attention");
    assert_eq!(card["actions"][0]["type"], "Action.OpenUrl");
    assert_eq!(card["actions"][0]["url"], link.as_str());
    let slack = slack_checked(&delivery::chat_for(&e, Sink::Slack, &r).body);
    assert_eq!(slack["text"], ":x: Gate refused: Widgets · Iteration 2");
    let text = all_text(&slack);
    assert!(
        text.contains(&format!("<{link}|Open in the console>")),
        "{text}"
    );
    assert!(text.contains("• map 0.85 &gt;= 0.80"), "escaped: {text}");
    // Production moved: the channel, the new and the previous holder.
    let prev = Uuid::from_u128(7);
    let e = pointer_move(Some(iteration_ref("Iteration 1", prev)));
    let text = all_text(&teams_card(&delivery::chat_for(&e, Sink::Teams, &r).body));
    for want in [
        "Production moved: Widgets · Iteration 2",
        "Previous holder",
        &format!("Iteration 1 ({prev})"),
        "gate",
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    let text = all_text(&slack_checked(
        &delivery::chat_for(&pointer_move(None), Sink::Slack, &r).body,
    ));
    assert!(text.contains("none (its first holder)"), "{text}");
    // A chain: every export's outcome.
    let (p, i) = ids();
    let mut steps = vec![StepRow::from_row(&step(EntryState::Done))];
    let mut failed = StepRow::from_row(&step(EntryState::Failed));
    failed.target = target("TensorFlow", Some("TensorFlowLite"));
    failed.reason = "Custom Vision reports the export failed".into();
    steps.push(failed);
    let row = training_row(EventStatus::TrainingCompleted, None);
    let done = chain_completed(
        &row,
        &p.to_string(),
        &i.to_string(),
        &steps,
        &facts(),
        &ctx(),
        now(),
    );
    let text = all_text(&slack_checked(
        &delivery::chat_for(&done, Sink::Slack, &r).body,
    ));
    assert!(
        text.contains("Export chain completed, 1 export(s) failed"),
        "{text}"
    );
    assert!(text.contains("• ONNX: Done"), "{text}");
    assert!(
        text.contains(
            "• TensorFlow (TensorFlowLite): Failed (Custom Vision reports the export failed)"
        ),
        "{text}"
    );
    // No console set: no link at all.
    let card = teams_card(&delivery::chat_for(&done, Sink::Teams, &Routing::default()).body);
    assert!(card.get("actions").is_none(), "{card}");
    // Every type makes a message for both services.
    let mut every = vec![
        test_event(&ctx(), "t-1", now()),
        target_move(Channel::Latest),
    ];
    every.extend(insert_events(
        &training_row(EventStatus::TrainingFailed, None),
        &facts(),
        &ctx(),
        now(),
    ));
    every.extend(insert_events(
        &step(EntryState::Failed),
        &facts(),
        &ctx(),
        now(),
    ));
    for e in &every {
        teams_card(&delivery::chat_for(e, Sink::Teams, &r).body);
        slack_checked(&delivery::chat_for(e, Sink::Slack, &r).body);
    }
}

#[test]
fn hostile_and_huge_names_make_messages_within_each_services_limits() {
    use super::chat::TEAMS_MAX_BYTES;
    let r = routing_with_console();
    let mut e = gate("failed");
    let name = format!(
        "{}<b>&\u{2028}\"\\ {}",
        "\"".repeat(20_000),
        "x".repeat(60_000)
    );
    e.data["projectName"] = json!(name);
    e.data["iterationName"] = json!("<@channel> &amp; *bold*");
    let reasons: Vec<String> = (0..5_000)
        .map(|n| format!("rule {n} {}", "y".repeat(500)))
        .collect();
    e.data["reasons"] = json!(reasons);
    let teams = delivery::chat_for(&e, Sink::Teams, &r);
    assert!(teams.body.len() <= TEAMS_MAX_BYTES, "{}", teams.body.len());
    assert!(
        teams
            .trimmed
            .as_deref()
            .unwrap()
            .starts_with("sent shortened")
    );
    let card = teams_card(&teams.body);
    let text = all_text(&card);
    assert!(text.contains("Gate refused: \"\"\"\""), "{text:.80}");
    assert!(text.contains('…'));
    assert!(
        text.contains("… and 4980 more"),
        "a list is counted past 20"
    );
    assert_eq!(
        card["actions"][0]["url"],
        format!("https://cv-app.azurewebsites.net/api/history/{PROJECT}").as_str()
    );
    let slack = delivery::chat_for(&e, Sink::Slack, &r);
    assert!(slack.trimmed.is_some());
    slack_checked(&slack.body);
    // Slack's control characters never reach its mrkdwn raw: no mention, no injected link.
    let mut e2 = gate("failed");
    e2.data["iterationName"] = json!("<@channel> &amp; <https://evil.example|click>");
    let v = slack_checked(&delivery::chat_for(&e2, Sink::Slack, &r).body);
    assert_eq!(
        v["text"],
        ":x: Gate refused: Widgets · &lt;@channel&gt; &amp;amp; &lt;https://evil.example|click&gt;"
    );
    // A secret in a value is redacted before any message is made.
    let mut e = gate("failed");
    e.data["reasons"] = json!(["see https://x.blob.core.windows.net/c/b?sv=1&sig=c2VjcmV0"]);
    for sink in [Sink::Teams, Sink::Slack] {
        let body = delivery::chat_for(&e, sink, &r).body;
        assert!(!body.contains("c2VjcmV0"), "{body}");
        assert!(crate::redact::find_leak(&body).is_none());
    }
}

#[test]
fn the_queue_bound_counts_the_message_as_its_encoding_sends_it() {
    use super::wire::QueueEncoding;
    let mut e = test_event(&ctx(), "q-1", now());
    // 56 KB of JSON: whole as text, over 64 KiB once base64.
    e.data = json!({"projectId": PROJECT, "notes": "n".repeat(56_000)});
    let mut o = stored(&e, &[Sink::Queue]);
    // (The outbox row keeps 30,000 units; here the sink's bound is what is tested.)
    o.event = e.to_json();
    let text = Routing {
        queue_encoding: QueueEncoding::None,
        ..Default::default()
    };
    let f = delivery::fit(&o, Sink::Queue, &ctx(), &text);
    assert_eq!(
        (f.body.as_str(), f.trimmed.as_deref()),
        (e.to_json().as_str(), None)
    );
    let f = delivery::fit(&o, Sink::Queue, &ctx(), &Routing::default());
    assert!(QueueEncoding::Base64.sent_size(&f.body) <= 64 * 1024);
    assert!(
        f.trimmed
            .as_deref()
            .unwrap()
            .contains("bytes as sent (base64)"),
        "{:?}",
        f.trimmed
    );
    let back = CloudEvent::from_json(&f.body).unwrap();
    assert_eq!(back.data["trimmed"]["by"], "queue");
    assert_eq!(back.data["trimmed"]["limit"], 65_536);
    // Quotes count as XML carries them: 12,000 of them make 72 KB as sent.
    e.data = json!({"projectId": PROJECT, "notes": "\"".repeat(12_000)});
    o.event = e.to_json();
    let f = delivery::fit(&o, Sink::Queue, &ctx(), &text);
    assert!(f.trimmed.is_some());
    assert!(QueueEncoding::None.sent_size(&f.body) <= 64 * 1024);
}

#[test]
fn a_name_never_becomes_a_link_in_a_teams_card() {
    use super::chat::teams_text;
    let t = teams_text("Widgets [docs](https://evil.example) <https://evil.example>");
    assert!(!t.contains("]("), "{t}");
    assert!(!t.contains("<h"), "{t}");
    // Read as it was written: only invisible characters were added.
    assert_eq!(
        t.replace('\u{200B}', ""),
        "Widgets [docs](https://evil.example) <https://evil.example>"
    );
}

#[test]
fn an_event_carries_its_chains_trace_and_keeps_its_id() {
    use crate::trace::{SpanId, TraceParent, chain_trace_id};
    let (project, iteration) = ids();
    let events = insert_events(
        &training_row(EventStatus::TrainingCompleted, Some("passed")),
        &facts(),
        &ctx(),
        now(),
    );
    let parent = TraceParent {
        trace_id: chain_trace_id(project, iteration),
        parent_id: SpanId([1, 2, 3, 4, 5, 6, 7, 8]),
        sampled: true,
    };
    for e in &events {
        let traced = e.clone().in_trace(&parent, None);
        // The id is the change's, whatever trace made it.
        assert_eq!(traced.id, e.id);
        let json: Value = serde_json::from_str(&traced.to_json()).unwrap();
        assert_eq!(json["traceparent"], parent.header().as_str());
        assert!(json.get("tracestate").is_none());
        // Stored and sent, shortened or not, it keeps its context.
        let row = stored(&traced, &[Sink::Webhook]);
        let fitted = for_sink(&row, Sink::Webhook, &ctx());
        assert_eq!(fitted.trace, Some(parent));
        let sent: Value = serde_json::from_str(&fitted.body).unwrap();
        assert_eq!(sent["traceparent"], parent.header().as_str());
        let tiny = shape::shrink(
            &traced,
            shape::Bound {
                by: "webhook",
                limit: 300,
                measure: shape::Measure::Bytes,
            },
        );
        let tiny: Value = serde_json::from_str(&tiny.json).unwrap();
        assert_eq!(tiny["traceparent"], parent.header().as_str());
    }
    // Without a trace the member is left out; an invalid one is not kept.
    assert!(!events[0].to_json().contains("traceparent"));
    let mut forged = events[0].clone();
    forged.traceparent = Some("00-sig=c2VjcmV0-x-01".into());
    assert_eq!(shape::redacted(&forged).traceparent, None);
}
