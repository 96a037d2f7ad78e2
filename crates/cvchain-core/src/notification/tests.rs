use super::*;
use base64::engine::general_purpose::STANDARD;

const PROJECT: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const ITERATION: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/notifications/",
            $name
        ))
    };
}

fn project() -> Uuid {
    Uuid::parse_str(PROJECT).unwrap()
}
fn iteration() -> Uuid {
    Uuid::parse_str(ITERATION).unwrap()
}

/// Each fixture: its expected notification, and the same after re-serializing in canonical form.
fn fixtures() -> Vec<(&'static str, &'static str, Notification)> {
    vec![
        (
            "connection-test",
            fixture!("connection-test.json"),
            Notification::ConnectionTest {
                project_id: project(),
            },
        ),
        (
            "training-completed",
            fixture!("training-completed.json"),
            Notification::Training {
                project_id: project(),
                iteration_id: iteration(),
                status: TrainingStatus::Completed,
            },
        ),
        (
            "training-completed-pascal",
            fixture!("training-completed-pascal.json"),
            Notification::Training {
                project_id: project(),
                iteration_id: iteration(),
                status: TrainingStatus::Completed,
            },
        ),
        (
            "training-failed",
            fixture!("training-failed.json"),
            Notification::Training {
                project_id: project(),
                iteration_id: iteration(),
                status: TrainingStatus::Failed,
            },
        ),
        (
            "export-completed",
            fixture!("export-completed.json"),
            Notification::Export {
                project_id: project(),
                iteration_id: iteration(),
                status: ExportStatus::Completed,
                model_uri: Some(format!(
                    "https://contoso.blob.core.windows.net/cvbackups/{PROJECT}%20-%20{ITERATION}.ONNX"
                )),
            },
        ),
        (
            "export-completed-sas-reordered",
            fixture!("export-completed-sas-reordered.json"),
            Notification::Export {
                project_id: project(),
                iteration_id: iteration(),
                status: ExportStatus::Completed,
                model_uri: Some("https://cvstore.blob.core.windows.net/exports/model.zip?sv=2020-08-04&se=2030-01-01&sr=b&sp=r&sig=SECRETsignatureVALUE%3D".into()),
            },
        ),
        (
            "export-failed",
            fixture!("export-failed.json"),
            Notification::Export {
                project_id: project(),
                iteration_id: iteration(),
                status: ExportStatus::Failed,
                model_uri: None,
            },
        ),
    ]
}

#[test]
fn documented_examples_and_variants_parse() {
    for (name, text, expected) in fixtures() {
        let parsed = parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.notification, expected, "{name}");
        assert_eq!(parsed.encoding, Encoding::Raw, "{name}");
    }
}

#[test]
fn known_kinds_round_trip_through_the_canonical_message() {
    for (name, text, _) in fixtures() {
        let first = parse(text).unwrap().notification;
        let canonical = first.to_message().expect("known kind").to_string();
        let second = parse(&canonical).unwrap().notification;
        assert_eq!(first, second, "{name}");
        // Canonical form uses the documented casing.
        let v: Value = serde_json::from_str(&canonical).unwrap();
        assert_eq!(v["version"], "1.0");
        assert!(v["Content"]["projectId"].is_string(), "{name}");
    }
}

#[test]
fn base64_bom_and_whitespace_variants_parse_the_same() {
    for (name, text, expected) in fixtures() {
        let b64 = STANDARD.encode(text);
        let variants = [
            (format!("\u{feff}{text}"), Encoding::Raw),
            (format!("  \r\n\t{text}\n\n "), Encoding::Raw),
            (b64.clone(), Encoding::Base64),
            (format!(" {b64}\n"), Encoding::Base64),
            (STANDARD.encode(format!("\u{feff}{text}")), Encoding::Base64),
            (b64.trim_end_matches('=').to_owned(), Encoding::Base64),
        ];
        for (i, (variant, encoding)) in variants.iter().enumerate() {
            let parsed = parse(variant).unwrap_or_else(|e| panic!("{name} variant {i}: {e}"));
            assert_eq!(parsed.notification, expected, "{name} variant {i}");
            assert_eq!(parsed.encoding, *encoding, "{name} variant {i}");
        }
    }
}

#[test]
fn unknown_types_and_versions_are_kept_not_rejected() {
    let n = parse(fixture!("unknown-type.json")).unwrap().notification;
    assert_eq!(
        n,
        Notification::Unknown {
            kind: "Publish".into(),
            version: Some("1.0".into()),
            project_id: Some(project()),
        }
    );
    let n = parse(fixture!("unknown-version.json"))
        .unwrap()
        .notification;
    assert_eq!(
        n,
        Notification::Unknown {
            kind: "Training".into(),
            version: Some("2.0".into()),
            project_id: Some(project()),
        }
    );
    // A future version may change anything, so even an invalid body is kept as Unknown.
    let n = parse(r#"{"version":"3","type":"Export","Content":{"projectId":42}}"#)
        .unwrap()
        .notification;
    assert!(matches!(
        n,
        Notification::Unknown {
            project_id: None,
            ..
        }
    ));
    assert_eq!(n.to_message(), None);
}

#[test]
fn a_missing_version_is_taken_as_1_0_and_numeric_versions_are_accepted() {
    let n = parse(&format!(
        r#"{{"type":"ConnectionTest","Content":{{"projectId":"{PROJECT}"}}}}"#
    ))
    .unwrap()
    .notification;
    assert_eq!(
        n,
        Notification::ConnectionTest {
            project_id: project()
        }
    );
    let n = parse(&format!(
        r#"{{"version":1.0,"type":"ConnectionTest","Content":{{"projectId":"{PROJECT}"}}}}"#
    ))
    .unwrap()
    .notification;
    assert!(matches!(n, Notification::ConnectionTest { .. }));
}

#[test]
fn braces_around_uuids_are_accepted() {
    let n = parse(&format!(
        r#"{{"version":"1.0","type":"ConnectionTest","Content":{{"projectId":"{{{PROJECT}}}"}}}}"#
    ))
    .unwrap()
    .notification;
    assert_eq!(n.project_id(), Some(project()));
}

fn training(content: &str) -> String {
    format!(r#"{{"version":"1.0","type":"Training","Content":{content}}}"#)
}

#[test]
fn rejections_name_the_field_and_the_problem() {
    let big = format!(
        "{}{}",
        fixture!("connection-test.json"),
        " ".repeat(MAX_MESSAGE_BYTES)
    );
    let cases: Vec<(String, ParseError)> = vec![
        (
            big.clone(),
            ParseError::TooLarge {
                len: big.len(),
                max: MAX_MESSAGE_BYTES,
            },
        ),
        ("".into(), ParseError::Empty),
        ("\u{feff}  \n".into(), ParseError::Empty),
        ("hello world".into(), ParseError::NotJsonOrBase64),
        (
            STANDARD.encode("not json at all"),
            ParseError::NotJsonOrBase64,
        ),
        (
            STANDARD.encode([0x7b, 0xff, 0xfe, 0x7d]),
            ParseError::InvalidUtf8 { at: 1 },
        ),
        (
            "[1,2]".into(),
            ParseError::NotAnObject { found: "an array" },
        ),
        (
            r#"{"type":"Training""#.into(),
            ParseError::InvalidJson {
                line: 1,
                column: 18,
                reason: "EOF while parsing an object".into(),
            },
        ),
        (
            r#"{"version":"1.0"}"#.into(),
            ParseError::MissingField {
                field: "type".into(),
            },
        ),
        (
            r#"{"version":"1.0","type":7}"#.into(),
            ParseError::WrongType {
                field: "type".into(),
                expected: "a string",
                found: "a number",
            },
        ),
        (
            r#"{"version":"1.0","type":"Training"}"#.into(),
            ParseError::MissingField {
                field: "Content".into(),
            },
        ),
        (
            r#"{"version":"1.0","type":"Training","Content":"x"}"#.into(),
            ParseError::WrongType {
                field: "Content".into(),
                expected: "an object",
                found: "a string",
            },
        ),
        (
            r#"{"version":"1.0","type":"Training","Content":{},"content":{}}"#.into(),
            ParseError::DuplicateField {
                field: "content".into(),
            },
        ),
        (
            training(&format!(
                r#"{{"iterationId":"{ITERATION}","trainingStatus":"TrainingCompleted"}}"#
            )),
            ParseError::MissingField {
                field: "Content.projectId".into(),
            },
        ),
        (
            training(&format!(
                r#"{{"projectId":"{PROJECT}","trainingStatus":"TrainingCompleted"}}"#
            )),
            ParseError::MissingField {
                field: "Content.iterationId".into(),
            },
        ),
        (
            training(&format!(
                r#"{{"projectId":"not-a-uuid","iterationId":"{ITERATION}","trainingStatus":"TrainingCompleted"}}"#
            )),
            ParseError::InvalidUuid {
                field: "Content.projectId".into(),
                value: "not-a-uuid".into(),
            },
        ),
        (
            training(&format!(
                r#"{{"projectId":"{PROJECT}","iterationId":"{}","trainingStatus":"TrainingCompleted"}}"#,
                ITERATION.replace('-', "")
            )),
            ParseError::InvalidUuid {
                field: "Content.iterationId".into(),
                value: ITERATION.replace('-', ""),
            },
        ),
        (
            training(&format!(
                r#"{{"projectId":"{PROJECT}","iterationId":"{ITERATION}","trainingStatus":"Queued"}}"#
            )),
            ParseError::UnknownStatus {
                field: "Content.trainingStatus".into(),
                value: "Queued".into(),
                expected: "TrainingCompleted, TrainingFailed",
            },
        ),
        (
            training(&format!(
                r#"{{"projectId":"{PROJECT}","iterationId":"{ITERATION}"}}"#
            )),
            ParseError::MissingField {
                field: "Content.trainingStatus".into(),
            },
        ),
        (
            training(&format!(
                r#"{{"projectId":{{"a":1}},"iterationId":"{ITERATION}","trainingStatus":"TrainingCompleted"}}"#
            )),
            ParseError::WrongType {
                field: "Content.projectId".into(),
                expected: "a string",
                found: "an object",
            },
        ),
        (
            format!(
                r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{PROJECT}","iterationId":"{ITERATION}","exportStatus":"Exporting"}}}}"#
            ),
            ParseError::UnknownStatus {
                field: "Content.exportStatus".into(),
                value: "Exporting".into(),
                expected: "ExportCompleted, ExportFailed",
            },
        ),
        (
            format!(
                r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{PROJECT}","iterationId":"{ITERATION}","exportStatus":"ExportCompleted","modelUri":"file:///etc/passwd"}}}}"#
            ),
            ParseError::InvalidUrl {
                field: "Content.modelUri".into(),
            },
        ),
        (
            format!(
                r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{PROJECT}","iterationId":"{ITERATION}","exportStatus":"ExportCompleted","modelUri":12}}}}"#
            ),
            ParseError::WrongType {
                field: "Content.modelUri".into(),
                expected: "a string",
                found: "a number",
            },
        ),
    ];
    for (i, (input, expected)) in cases.into_iter().enumerate() {
        let got = parse(&input).expect_err(&format!("case {i} should fail"));
        assert_eq!(got, expected, "case {i}");
    }
}

#[test]
fn errors_never_quote_a_model_uri() {
    let text = r#"{"version":"1.0","type":"Export","Content":{"projectId":"b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f","iterationId":"3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d","exportStatus":"ExportCompleted","modelUri":"ftp://x/y?sig=SECRET"}}"#;
    let err = parse(text).unwrap_err().to_string();
    assert!(!err.contains("SECRET"), "{err}");
    assert!(err.contains("Content.modelUri"), "{err}");
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(matches!(parse(&deep), Err(ParseError::InvalidJson { .. })));
}
