use super::*;
use crate::message::Received;
use crate::notification::parse;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use time::macros::datetime;

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const I: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

fn received(text: &str, id: Option<&str>) -> Received {
    Received {
        text: text.to_owned(),
        message_id: id.map(str::to_owned),
        dequeue_count: 2,
        received_at: datetime!(2026-11-26 10:00:00 UTC),
    }
}

fn incoming(text: &str, id: Option<&str>) -> Incoming {
    Incoming::decode(received(text, id))
}

fn row_for(text: &str, id: Option<&str>) -> HistoryRow {
    let m = incoming(text, id);
    notification_row(&m, &parse(text).unwrap())
}

fn export(uri: &str) -> String {
    format!(
        r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}","exportStatus":"ExportCompleted","modelUri":"{uri}"}}}}"#
    )
}

#[test]
fn keys_come_from_the_event_and_the_message_id() {
    let training = format!(
        r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{P}","iterationId":"{I}","trainingStatus":"TrainingCompleted"}}}}"#
    );
    let row = row_for(&training, Some("id-1"));
    assert_eq!(row.partition_key, P);
    assert_eq!(row.row_key, format!("Training_{I}_TrainingCompleted"));
    // The same event under another message id maps to the same row.
    assert_eq!(row_for(&training, Some("id-2")).row_key, row.row_key);

    let backup = format!("https://acct.blob.core.windows.net/backups/{P}%20-%20{I}.ONNX");
    let row = row_for(&export(&backup), Some("id-1"));
    assert_eq!(row.row_key, format!("Export_{I}_ONNX_ExportCompleted"));
    assert_eq!(row.properties[Prop::ModelPlatform], "ONNX");

    // A SAS URL to Custom Vision's own blob names no platform: the message id tells exports apart.
    let row = row_for(
        &export("https://cv.blob.core.windows.net/x/model.zip?sig=abc"),
        Some("id-9"),
    );
    assert_eq!(row.row_key, format!("Export_{I}_msg-id-9_ExportCompleted"));

    let ct =
        format!(r#"{{"version":"1.0","type":"ConnectionTest","Content":{{"projectId":"{P}"}}}}"#);
    assert_eq!(row_for(&ct, Some("abc")).row_key, "ConnectionTest_abc");
    // Without an id, a hash of the text keeps redeliveries on one row.
    let a = row_for(&ct, None).row_key;
    assert!(a.starts_with("ConnectionTest_sha256-"), "{a}");
    assert_eq!(row_for(&ct, None).row_key, a);
    // An unsafe id is hashed with the text: its redeliveries share a row, other messages with
    // the same text do not.
    let b = row_for(&ct, Some("a/b#c")).row_key;
    assert!(b.starts_with("ConnectionTest_sha256-"), "{b}");
    assert_eq!(row_for(&ct, Some("a/b#c")).row_key, b);
    assert_ne!(row_for(&ct, Some("a/b#d")).row_key, b);
    assert_ne!(b, a);
}

#[test]
fn a_second_message_for_the_same_event_gets_its_own_row_and_says_why() {
    let backup = format!("https://acct.blob.core.windows.net/backups/{P}%20-%20{I}.ONNX");
    let forged = row_for(&export(&backup), Some("forged-1"));
    let genuine = incoming(&export(&backup), Some("genuine-1"));
    let row = notification_row(&genuine, genuine.parsed.as_ref().unwrap());
    assert_eq!(row.row_key, forged.row_key);
    let Existing::Another { row: own, note } = existing_row(&row, &forged, &genuine.key) else {
        panic!("taken for a redelivery");
    };
    assert_eq!(own.row_key, format!("{}_genuine-1", forged.row_key));
    assert_eq!(own.properties[Prop::SameEventAs], forged.row_key);
    let why = own.properties.text(Prop::Disagreement);
    assert!(
        why.starts_with(
            "message forged-1, received 2026-11-26T10:00:00.0000000Z recorded this event first"
        ),
        "{why}"
    );
    assert!(
        why.ends_with("; the same text under another message id"),
        "{why}"
    );
    assert!(note.text(Prop::Disagreement).contains(&own.row_key));
    // A different modelUri is named.
    let other = row_for(
        &export("https://acct.blob.core.windows.net/backups/other.onnx"),
        Some("forged-2"),
    );
    let mut first = forged.clone();
    first.properties = other.properties.clone();
    let Existing::Another { row: own, .. } = existing_row(&row, &first, &genuine.key) else {
        panic!("taken for a redelivery");
    };
    assert!(
        own.properties
            .text(Prop::Disagreement)
            .contains("other.onnx")
    );
    // The message's own row is a redelivery, with or without an id.
    assert_eq!(existing_row(&row, &row, &genuine.key), Existing::Redelivery);
    let anonymous = row_for(&export(&backup), None);
    assert_eq!(
        existing_row(&anonymous, &anonymous.clone(), "sha256-x"),
        Existing::Redelivery
    );
    // Rows keyed by the message itself are never disambiguated.
    let rejected = rejected_row(&incoming("{oops", Some("r")), "bad", None);
    let mut other = rejected.clone();
    other.properties.set(Prop::MessageId, "someone-else");
    assert_eq!(existing_row(&rejected, &other, "r"), Existing::Redelivery);
}

#[test]
fn names_from_the_service_make_readable_keys_in_range() {
    use crate::chain::ExportTarget;
    let target = |p: &str, f: Option<&str>| ExportTarget {
        platform: p.into(),
        flavor: f.map(str::to_owned),
    };
    let i: Uuid = I.parse().unwrap();
    assert_eq!(
        step_row_key(i, &target("TensorFlow", Some("TensorFlowLite"))),
        format!("ExportStep_{I}_TensorFlow-TensorFlowLite")
    );
    let (from, to) = step_key_range(i);
    let mut keys = std::collections::HashSet::new();
    for p in [
        "ON/NX",
        "ON#NX",
        "ON?NX",
        "ON\\NX",
        "ON\tNX",
        "ON NX",
        "ÜNNX",
        &"x".repeat(600),
    ] {
        let k = step_row_key(i, &target(p, Some("f/l")));
        assert!(is_valid_key(&k), "{k}");
        assert!(
            k.as_str() >= from.as_str() && k.as_str() < to.as_str(),
            "{k} out of range"
        );
        assert!(keys.insert(k), "{p}: two names share a key");
    }
}

#[test]
fn rows_carry_the_required_properties() {
    let text = export(&format!(
        "https://acct.blob.core.windows.net/b/{P}%20-%20{I}.TensorFlow?sv=1&sig=SECRET"
    ));
    let row = row_for(&text, Some("m"));
    let p = &row.properties;
    for key in [
        Prop::EventType,
        Prop::ProjectId,
        Prop::IterationId,
        Prop::Status,
        Prop::ReceivedAt,
        Prop::MessageId,
        Prop::DequeueCount,
        Prop::Raw,
        Prop::Encoding,
        Prop::ModelUri,
    ] {
        assert!(p.contains(key), "missing {key:?}");
    }
    assert_eq!(p[Prop::EventType], "Export");
    assert_eq!(p[Prop::Status], "ExportCompleted");
    assert_eq!(p[Prop::IterationId], I);
    assert_eq!(p[Prop::DequeueCount], 2i64);
    // As a table entity ("2026-11-26T10:00:00.0000000Z", Edm.DateTime): cvchain-azure's
    // history entity tests.
    assert_eq!(p[Prop::ReceivedAt], datetime!(2026-11-26 10:00:00 UTC));
    assert_eq!(
        p[Prop::ModelUri],
        format!("https://acct.blob.core.windows.net/b/{P}%20-%20{I}.TensorFlow")
    );
    let all = format!("{p:?}");
    assert!(!all.contains("SECRET"), "{all}");
    assert!(p[Prop::Raw].as_text().unwrap().contains("sig=REDACTED"));
}

#[test]
fn base64_messages_are_redacted_inside_the_encoding() {
    let text = export("https://cv.blob.core.windows.net/x/model.zip?sig=SECRET");
    let b64 = STANDARD.encode(&text);
    let m = incoming(&b64, Some("m"));
    let row = notification_row(&m, &parse(&b64).unwrap());
    let raw = row.properties[Prop::Raw].as_text().unwrap();
    let decoded = String::from_utf8(STANDARD.decode(raw).unwrap()).unwrap();
    assert!(decoded.contains("sig=REDACTED"), "{decoded}");
    assert!(!decoded.contains("SECRET"));
    assert_eq!(row.properties[Prop::Encoding], "base64");
    assert!(
        row.properties[Prop::Decoded]
            .as_text()
            .unwrap()
            .contains("sig=REDACTED")
    );
}

#[test]
fn unknown_kinds_keep_their_type_and_version() {
    let row = row_for(
        &format!(r#"{{"version":"2.0","type":"Publish","Content":{{"projectId":"{P}"}}}}"#),
        Some("u1"),
    );
    assert_eq!(row.partition_key, P);
    assert_eq!(row.row_key, "Unknown_u1");
    assert_eq!(row.properties[Prop::UnknownType], "Publish");
    assert_eq!(row.properties[Prop::Version], "2.0");
    assert_eq!(row.properties[Prop::Status], "Unrecognized");
    let row = row_for(r#"{"type":"Other"}"#, Some("u2"));
    assert_eq!(row.partition_key, NO_PROJECT_PARTITION);
}

#[test]
fn rejected_rows_live_apart_and_say_why() {
    let m = incoming("{oops", Some("bad-1"));
    let row = rejected_row(
        &m,
        "invalid JSON at line 1, column 2: key must be a string",
        None,
    );
    assert_eq!(row.partition_key, REJECTED_PARTITION);
    assert_eq!(row.row_key, "bad-1");
    assert_eq!(row.properties[Prop::EventType], "Rejected");
    assert_eq!(row.properties[Prop::Raw], "{oops");
    assert!(
        row.properties[Prop::Reason]
            .as_text()
            .unwrap()
            .starts_with("invalid JSON")
    );
}

#[test]
fn table_datetimes_have_at_most_seven_fractional_digits() {
    assert_eq!(
        table_datetime(datetime!(2026-11-26 10:00:00.123456789 +02:00)),
        "2026-11-26T08:00:00.1234567Z"
    );
}

#[test]
fn huge_and_binary_text_is_bounded_and_escaped() {
    let text = format!("\u{1}{}", "x".repeat(60_000));
    let row = rejected_row(&incoming(&text, None), "too large", None);
    let raw = row.properties[Prop::Raw].as_text().unwrap();
    assert!(raw.starts_with("\\u{1}x"));
    assert!(encoded_units(raw) <= MAX_PROPERTY_UNITS);
    assert!(
        raw.ends_with("of 60005 characters kept]"),
        "{}",
        &raw[raw.len() - 50..]
    );
    assert_eq!(row.properties[Prop::RawTruncated], true);
    // Bounded by what the table counts, not by characters: U+0085 is six units escaped.
    let text = format!(r#"{{"type":"x","pad":"{}"}}"#, "\u{85}".repeat(30_000));
    let m = incoming(&text, Some("nel"));
    let row = notification_row(&m, m.parsed.as_ref().unwrap());
    assert!(encoded_units(row.properties.text(Prop::Raw)) <= MAX_PROPERTY_UNITS);
    assert_eq!(seal(&row.properties), row.properties);
}

#[test]
fn only_backup_blob_names_give_a_platform() {
    let n = parse(&export("https://a/b")).unwrap().notification;
    let ok = format!("https://a.blob.core.windows.net/c/{P}%20-%20{I}.DockerFile");
    assert_eq!(
        platform_from_model_uri(&ok, &n).as_deref(),
        Some("DockerFile")
    );
    for bad in [
        format!("https://a/c/{P}%20-%20{I}"),
        format!("https://a/c/{P}%20-%20{I}.x/y"),
        format!("https://a/c/other%20-%20{I}.ONNX"),
        format!("https://a/c/{P}%20-%20{I}.ON%2FNX"),
        // Blob names are case-sensitive: not the name Custom Vision writes.
        format!(
            "https://a/c/{}%20-%20{}.ONNX",
            P.to_uppercase(),
            I.to_uppercase()
        ),
    ] {
        assert_eq!(platform_from_model_uri(&bad, &n), None, "{bad}");
    }
}
