//! Hostile and malformed input, table-driven: each input with the error it must produce. No
//! panic, and nothing grows beyond the input: the parser refuses over 64 KiB and serde_json's
//! recursion limit stops deep nesting.

use base64::Engine as _;
use cvchain_core::envelope::{EnvelopeError, TRIGGER_BINDING, decode_queue_invocation};
use cvchain_core::notification::{MAX_MESSAGE_BYTES, parse};

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const I: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

fn training(content: &str) -> String {
    format!(r#"{{"version":"1.0","type":"Training","Content":{content}}}"#)
}

fn training_with(project: &str, iteration: &str, status: &str) -> String {
    training(&format!(
        r#"{{"projectId":{project},"iterationId":{iteration},"trainingStatus":{status}}}"#
    ))
}

fn export_with(model_uri: &str) -> String {
    format!(
        r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}","exportStatus":"ExportCompleted","modelUri":{model_uri}}}}}"#
    )
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// (name, message text, expected error text)
fn cases() -> Vec<(&'static str, String, String)> {
    let q = |s: &str| format!("\"{s}\"");
    let (p, i) = (q(P), q(I));
    let done = q("TrainingCompleted");
    vec![
        ("empty", String::new(), "message is empty".into()),
        ("blank", " \t\r\n ".into(), "message is empty".into()),
        ("bom only", "\u{feff}".into(), "message is empty".into()),
        ("truncated object", "{".into(), "invalid JSON at line 1, column 1: EOF while parsing an object".into()),
        ("truncated value", r#"{"type":"#.into(), "invalid JSON at line 1, column 8: EOF while parsing a value".into()),
        ("truncated string", r#"{"type":"Train"#.into(), "invalid JSON at line 1, column 14: EOF while parsing a string".into()),
        ("trailing comma", r#"{"type":"Training",}"#.into(), "invalid JSON at line 1, column 20: trailing comma".into()),
        ("NaN", r#"{"type":NaN}"#.into(), "invalid JSON at line 1, column 9: expected value".into()),
        ("single quotes", "{'type':'Training'}".into(), "invalid JSON at line 1, column 2: key must be a string".into()),
        ("array", "[]".into(), "message JSON must be an object, found an array".into()),
        ("array of messages", format!("[{}]", training_with(&p, &i, &done)), "message JSON must be an object, found an array".into()),
        ("no type", "{}".into(), "missing field `type`".into()),
        ("type null", r#"{"type":null}"#.into(), "field `type` must be a string, found null".into()),
        ("type array", r#"{"type":["Training"]}"#.into(), "field `type` must be a string, found an array".into()),
        ("type object", r#"{"type":{}}"#.into(), "field `type` must be a string, found an object".into()),
        ("type bool", r#"{"type":true}"#.into(), "field `type` must be a string, found a boolean".into()),
        ("version object", r#"{"type":"Training","version":{}}"#.into(), "field `version` must be a string, found an object".into()),
        ("no content", r#"{"version":"1.0","type":"Training"}"#.into(), "missing field `Content`".into()),
        ("content array", training("[]"), "field `Content` must be an object, found an array".into()),
        ("content null", training("null"), "field `Content` must be an object, found null".into()),
        ("project number", training_with("123", &i, &done), "field `Content.projectId` must be a string, found a number".into()),
        ("huge number", training_with("123456789012345678901234567890", &i, &done), "field `Content.projectId` must be a string, found a number".into()),
        ("number out of range", training_with("1e400", &i, &done), "invalid JSON at line 1, column 63: number out of range".into()),
        ("project empty", training_with(&q(""), &i, &done), "field `Content.projectId` must be a UUID, found \"\"".into()),
        ("path traversal id", training_with(&q("../../etc/passwd"), &i, &done), "field `Content.projectId` must be a UUID, found \"../../etc/passwd\"".into()),
        ("odata injection id", training_with(&q("x' or PartitionKey ne '"), &i, &done), "field `Content.projectId` must be a UUID, found \"x' or PartitionKey ne '\"".into()),
        ("uuid then traversal", training_with(&q(&format!("{P}/../x")), &i, &done), format!("field `Content.projectId` must be a UUID, found \"{P}/../x\"")),
        ("uuid without hyphens", training_with(&q(&P.replace('-', "")), &i, &done), format!("field `Content.projectId` must be a UUID, found \"{}\"", P.replace('-', ""))),
        ("urn uuid", training_with(&q(&format!("urn:uuid:{P}")), &i, &done), format!("field `Content.projectId` must be a UUID, found \"urn:uuid:{P}\"")),
        ("control characters in id", training_with(&q("\\u0000\\u001b[31m"), &i, &done), "field `Content.projectId` must be a UUID, found \"??[31m\"".into()),
        ("no iteration", training(&format!(r#"{{"projectId":{p},"trainingStatus":{done}}}"#)), "missing field `Content.iterationId`".into()),
        ("iteration null", training_with(&p, "null", &done), "field `Content.iterationId` must be a string, found null".into()),
        ("status empty", training_with(&p, &i, &q("")), "field `Content.trainingStatus` has unknown value \"\"; expected one of TrainingCompleted, TrainingFailed".into()),
        ("status injection", training_with(&p, &i, &q("TrainingCompleted; DROP TABLE")), "field `Content.trainingStatus` has unknown value \"TrainingCompleted; DROP TABLE\"; expected one of TrainingCompleted, TrainingFailed".into()),
        ("status number", training_with(&p, &i, "1"), "field `Content.trainingStatus` must be a string, found a number".into()),
        ("no export status", format!(r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{P}","iterationId":"{I}"}}}}"#), "missing field `Content.exportStatus`".into()),
        ("javascript uri", export_with(&q("javascript:alert(1)")), "field `Content.modelUri` must be an absolute http(s) URL".into()),
        ("file uri", export_with(&q("file:///etc/passwd")), "field `Content.modelUri` must be an absolute http(s) URL".into()),
        ("hostless uri", export_with(&q("http://")), "field `Content.modelUri` must be an absolute http(s) URL".into()),
        ("uri object", export_with("{}"), "field `Content.modelUri` must be a string, found an object".into()),
        ("content twice", r#"{"version":"1.0","type":"Training","Content":{},"content":{}}"#.into(), "field `content` appears more than once (keys are matched case-insensitively)".into()),
        ("project id twice", training(&format!(r#"{{"projectId":{p},"ProjectId":{p}}}"#)), "field `Content.projectId` appears more than once (keys are matched case-insensitively)".into()),
        ("deep nesting", format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)), "invalid JSON at line 1, column 128: recursion limit exceeded".into()),
        ("deep object", format!("{}{}", "{\"a\":".repeat(5_000), "}".repeat(5_000)), "invalid JSON at line 1, column 636: recursion limit exceeded".into()),
        ("over 64 KiB", format!("{}{}", training_with(&p, &i, &done), " ".repeat(MAX_MESSAGE_BYTES)), format!("message is {} bytes; a queue message holds at most 65536 bytes", training_with(&p, &i, &done).len() + MAX_MESSAGE_BYTES)),
        ("base64 of garbage", b64(&[0x00, 0x9f, 0x92, 0x96, 0xff, 0x10]), "message is base64 but the decoded bytes are not UTF-8 (at byte 1)".into()),
        ("base64 of invalid UTF-8 JSON", b64(b"{\"type\":\"\xff\"}"), "message is base64 but the decoded bytes are not UTF-8 (at byte 9)".into()),
        ("base64 of text", b64(b"hello world"), "message is neither JSON nor base64-encoded JSON".into()),
        ("base64 of base64", b64(b64(training_with(&p, &i, &done).as_bytes()).as_bytes()), "message is neither JSON nor base64-encoded JSON".into()),
        ("not base64", "not base64 !!!".into(), "message is neither JSON nor base64-encoded JSON".into()),
        ("NUL", "\u{0}".into(), "message is neither JSON nor base64-encoded JSON".into()),
        ("xml", "<QueueMessage><MessageText>x</MessageText></QueueMessage>".into(), "message is neither JSON nor base64-encoded JSON".into()),
    ]
}

#[test]
fn each_malformed_message_gets_its_precise_error() {
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (name, input, expected) in cases {
        match parse(&input) {
            Ok(parsed) => panic!("{name}: parsed as {:?}", parsed.notification),
            Err(e) => assert_eq!(e.to_string(), expected, "{name}"),
        }
    }
}

#[test]
fn malformed_envelopes_are_refused_with_the_reason() {
    let cases: Vec<(&str, Vec<u8>, EnvelopeError)> = vec![
        (
            "empty body",
            b"".to_vec(),
            EnvelopeError::NotJson("EOF while parsing a value at line 1 column 0".into()),
        ),
        (
            "invalid UTF-8",
            b"\xff\xfe{}".to_vec(),
            EnvelopeError::NotJson("invalid UTF-8 at byte 0".into()),
        ),
        ("null", b"null".to_vec(), EnvelopeError::NotAnObject),
        (
            "string",
            br#""{\"Data\":{}}""#.to_vec(),
            EnvelopeError::NotAnObject,
        ),
        (
            "data array",
            br#"{"Data":[]}"#.to_vec(),
            EnvelopeError::MissingData,
        ),
        (
            "no binding",
            br#"{"Data":{}}"#.to_vec(),
            EnvelopeError::MissingBinding("notification".into()),
        ),
        (
            "binding null",
            br#"{"Data":{"notification":null}}"#.to_vec(),
            EnvelopeError::MissingBinding("notification".into()),
        ),
        (
            "deep envelope",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            EnvelopeError::NotJson("recursion limit exceeded at line 1 column 128".into()),
        ),
    ];
    for (name, body, expected) in cases {
        assert_eq!(
            decode_queue_invocation(&body, TRIGGER_BINDING).unwrap_err(),
            expected,
            "{name}"
        );
    }
}

#[test]
fn odd_metadata_is_tolerated_not_trusted() {
    for (count, expected) in [
        (r#""-1""#, 1),
        (r#""0""#, 1),
        ("1e30", u32::MAX),
        (r#""18446744073709551616""#, 1),
        (r#""3""#, 3),
        ("7", 7),
        (r#""\"4\"""#, 4),
        ("[]", 1),
    ] {
        let body = format!(
            r#"{{"Data":{{"notification":"\"x\""}},"Metadata":{{"DequeueCount":{count},"Id":{{"evil":1}}}}}}"#
        );
        let inv = decode_queue_invocation(body.as_bytes(), TRIGGER_BINDING).unwrap();
        assert_eq!(inv.dequeue_count, expected, "{count}");
        assert_eq!(inv.message_id, None);
    }
}
