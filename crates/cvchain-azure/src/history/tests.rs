//! The rows the core builds, as the table requests carry them.

use super::*;
use cvchain_core::chain::{EntryState, ExportTarget};
use cvchain_core::customvision::{Iteration, IterationPerformance};
use cvchain_core::history::{enrich_training, notification_row, step_row};
use cvchain_core::message::{Incoming, Received};
use cvchain_core::plan::{StepWrite, release_writes};
use cvchain_core::release::Released;
use serde_json::json;
use time::macros::datetime;
use uuid::Uuid;

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const I: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

fn training_row() -> HistoryRow {
    let text = format!(
        r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{P}","iterationId":"{I}","trainingStatus":"TrainingCompleted"}}}}"#
    );
    let incoming = Incoming::decode(Received {
        text,
        message_id: Some("m".into()),
        dequeue_count: 2,
        received_at: datetime!(2026-11-26 10:00:00 UTC),
    });
    let mut row = notification_row(&incoming, incoming.parsed.as_ref().unwrap());
    enrich_training(
        &mut row,
        None,
        Some(&Iteration {
            name: "Iteration 3".into(),
            status: "Completed".into(),
            trained_at: Some("2026-11-26T09:58:00Z".into()),
            training_time_in_minutes: Some(4),
            ..Default::default()
        }),
        Some(&IterationPerformance {
            precision: Some(0.9),
            ..Default::default()
        }),
    );
    row
}

#[test]
fn times_doubles_and_counts_carry_their_edm_types() {
    let e = to_entity(&training_row());
    assert_eq!(e["PartitionKey"], P);
    assert_eq!(e["RowKey"], format!("Training_{I}_TrainingCompleted"));
    assert_eq!(e["ReceivedAt"], "2026-11-26T10:00:00.0000000Z");
    assert_eq!(e["ReceivedAt@odata.type"], "Edm.DateTime");
    assert_eq!(e["TrainedAt"], "2026-11-26T09:58:00.0000000Z");
    assert_eq!(e["TrainedAt@odata.type"], "Edm.DateTime");
    assert_eq!(e["TrainingTimeInMinutes"], 4);
    assert_eq!(e["DequeueCount"], 2);
    assert!(!e.contains_key("DequeueCount@odata.type"));
    assert_eq!(e["Precision"], 0.9);
    assert_eq!(e["Precision@odata.type"], "Edm.Double");
    assert_eq!(e["EventType"], "Training");
    assert_eq!(e["Exportable"], false);
}

#[test]
fn release_sizes_are_int64_strings() {
    let p = Uuid::parse_str(P).unwrap();
    let i = Uuid::parse_str(I).unwrap();
    let onnx = ExportTarget {
        platform: "ONNX".into(),
        flavor: None,
    };
    let existing = step_row(p, i, 0, &onnx, EntryState::Exporting);
    let released = Released {
        url: "https://a.blob.core.windows.net/models/W/I/ONNX.zip".into(),
        path: "W/I/ONNX.zip".into(),
        size: 1234,
        millis: 56,
        copied: true,
        ..Default::default()
    };
    let now = datetime!(2026-11-26 10:05 UTC);
    let writes = release_writes(
        p,
        i,
        std::slice::from_ref(&onnx),
        &onnx,
        &released,
        &[cvchain_core::history::StepRow::from_row(&existing)],
        now,
    );
    let [StepWrite::Merge { properties, .. }] = &writes[..] else {
        panic!("{writes:?}")
    };
    let e = props_to_entity(properties);
    assert_eq!(e["ReleaseSize"], "1234");
    assert_eq!(e["ReleaseSize@odata.type"], "Edm.Int64");
    assert_eq!(e["CopyMillis"], "56");
    assert_eq!(e["ReleasedAt"], "2026-11-26T10:05:00.0000000Z");
    assert_eq!(to_entity(&existing)["ChainPosition"], 1);
}

#[test]
fn stored_entities_read_back_as_the_rows_that_were_written() {
    let row = training_row();
    let mut stored = to_entity(&row);
    // What the service adds: its timestamp, annotations, properties of others.
    stored.insert("Timestamp".into(), json!("2026-11-26T10:00:01.5Z"));
    stored.insert("Timestamp@odata.type".into(), json!("Edm.DateTime"));
    stored.insert("SomeoneElses".into(), json!("x"));
    let back = from_entity(&stored);
    assert_eq!(back.partition_key, row.partition_key);
    assert_eq!(back.row_key, row.row_key);
    let mut expected = row.properties.clone();
    expected.set(Prop::Timestamp, datetime!(2026-11-26 10:00:01.5 UTC));
    assert_eq!(back.properties, expected);
    // Written back, the service's timestamp is left out.
    assert!(!to_entity(&back).contains_key("Timestamp"));
    // Int64 as a number and a double as a string (other writers) read too; junk is left out.
    let e: Entity = serde_json::from_value(json!({
        "PartitionKey": "p", "RowKey": "r", "ReleaseSize": 5, "Recall": "0.5",
        "EndedAt": "not a time", "ChainPosition": "3"
    }))
    .unwrap();
    let r = from_entity(&e);
    assert_eq!(r.properties[Prop::ReleaseSize], 5i64);
    assert_eq!(r.properties[Prop::Recall], 0.5);
    assert_eq!(r.properties[Prop::ChainPosition], 3i64);
    assert!(!r.properties.contains(Prop::EndedAt));
}
