use super::*;
use std::collections::HashMap;

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const I: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

fn pid() -> Uuid {
    Uuid::parse_str(P).unwrap()
}
fn iid() -> Uuid {
    Uuid::parse_str(I).unwrap()
}

fn names(platform: &str, flavor: Option<&str>) -> ReleaseNames {
    ReleaseNames {
        project_id: pid(),
        project_name: "Widget Detector (prod)".into(),
        iteration_id: iid(),
        iteration_name: "Iteration 3".into(),
        platform: platform.into(),
        flavor: flavor.map(Into::into),
    }
}

fn backup() -> Url {
    Url::parse("https://acct.blob.core.windows.net/cvbackups").unwrap()
}

#[test]
fn the_default_path_is_readable_and_drops_a_missing_flavor() {
    let t = PathTemplate::parse(DEFAULT_TEMPLATE).unwrap();
    assert_eq!(
        t.render(&names("TensorFlow", Some("TensorFlowLite")), false),
        "Widget-Detector-prod/Iteration-3/TensorFlow-TensorFlowLite.zip"
    );
    assert_eq!(
        t.render(&names("ONNX", None), false),
        "Widget-Detector-prod/Iteration-3/ONNX.zip"
    );
    assert_eq!(
        t.render(&names("ONNX", None), true),
        format!("Widget-Detector-prod-{P}/Iteration-3-{I}/ONNX.zip")
    );
}

#[test]
fn names_that_sanitize_to_nothing_use_ids_and_never_escape_the_container() {
    let t = PathTemplate::parse(DEFAULT_TEMPLATE).unwrap();
    let mut n = names("ONNX", None);
    n.project_name = "../../".into();
    n.iteration_name = "スプリント".into();
    assert_eq!(t.render(&n, false), format!("{P}/{I}/ONNX.zip"));
    assert_eq!(sanitize("  a/b\\c..d  "), "a-b-c..d");
    let t = PathTemplate::parse("{projectId}/../{iterationId}/{platform}{flavor}").unwrap();
    assert!(!t.render(&n, false).contains(".."));
}

#[test]
fn templates_are_checked() {
    for (text, want) in [
        ("", "must not be empty"),
        (
            "{projectName}/{iterationName}/{platform}.zip",
            "must contain {platform} and {flavor}",
        ),
        (
            "{projectName}/{platform}-{flavor}",
            "must name the project and the iteration",
        ),
        (
            "{projectName}/{iterationName}/{platfrom}-{flavor}",
            "unknown token {platfrom}",
        ),
        (
            "{projectName}/{iterationName}/{platform-{flavor}",
            "unknown token",
        ),
        (
            "{projectName}/{iterationName}/{platform}-{flavor",
            "without its `}`",
        ),
    ] {
        let e = PathTemplate::parse(text).unwrap_err();
        assert!(e.contains(want), "{text}: {e}");
    }
    assert!(
        PathTemplate::parse("releases/{projectId}/{iterationId}/{platform}_{flavor}.bin").is_ok()
    );
}

#[test]
fn only_model_uris_inside_the_backup_container_are_used() {
    let inside = format!("https://acct.blob.core.windows.net/cvbackups/{P}%20-%20{I}.ONNX");
    assert_eq!(
        classify_model_uri(Some(&inside), Some(&backup())),
        ModelUri::InBackup {
            blob_name: format!("{P} - {I}.ONNX")
        }
    );
    for forged in [
        "https://evil.example.com/cvbackups/model.zip",
        "https://acct.blob.core.windows.net/other/model.zip",
        "https://acct.blob.core.windows.net/cvbackups-evil/model.zip",
        "http://acct.blob.core.windows.net/cvbackups/model.zip",
        "https://acct.blob.core.windows.net:444/cvbackups/model.zip",
        "https://user:pw@acct.blob.core.windows.net/cvbackups/model.zip",
        "https://acct.blob.core.windows.net/cvbackups/",
        "https://acct.blob.core.windows.net/cvbackups/%2E%2E/other/x",
        "not a url",
    ] {
        assert!(
            matches!(
                classify_model_uri(Some(forged), Some(&backup())),
                ModelUri::Refused { .. }
            ),
            "{forged}"
        );
    }
    assert!(matches!(
        classify_model_uri(Some(&inside), None),
        ModelUri::Refused { .. }
    ));
    assert_eq!(
        classify_model_uri(Some(" "), Some(&backup())),
        ModelUri::None
    );
    assert_eq!(classify_model_uri(None, Some(&backup())), ModelUri::None);
}

fn export(platform: &str, flavor: Option<&str>, status: &str, uri: &str) -> Export {
    Export {
        platform: platform.into(),
        flavor: flavor.map(Into::into),
        status: status.into(),
        download_uri: Some(uri.into()),
        newer_version_available: false,
        decode_notes: Vec::new(),
    }
}

#[test]
fn releases_cover_finished_exports_from_a_safe_source() {
    let exports = [
        export(
            "ONNX",
            None,
            "Done",
            "https://cv.blob.core.windows.net/x/onnx.zip?sig=s",
        ),
        export(
            "DockerFile",
            Some("Linux"),
            "Done",
            "https://cv.blob.core.windows.net/x/dl.zip?sig=s",
        ),
        export(
            "DockerFile",
            Some("ARM"),
            "Done",
            "https://cv.blob.core.windows.net/x/da.zip?sig=s",
        ),
        export("CoreML", None, "Exporting", ""),
        export("TensorFlow", None, "Failed", ""),
    ];
    let pointed = ModelUri::InBackup {
        blob_name: format!("{P} - {I}.ONNX"),
    };
    let plans = plan_releases(pid(), iid(), &exports, &pointed, true);
    assert_eq!(plans.len(), 3);
    assert_eq!(
        plans[0].source,
        Source::Backup {
            blob_name: format!("{P} - {I}.ONNX")
        }
    );
    // If the backup is missing after all, GetExports' URL is the way back.
    assert_eq!(
        plans[0].fallback.as_deref(),
        Some("https://cv.blob.core.windows.net/x/onnx.zip?sig=s")
    );
    assert_eq!(plans[1].fallback, None);
    // Two DockerFile flavors share one backup name: each comes from its own downloadUri.
    assert!(matches!(&plans[1].source, Source::Download { url } if url.ends_with("dl.zip?sig=s")));
    assert!(matches!(&plans[2].source, Source::Download { url } if url.ends_with("da.zip?sig=s")));

    // A refused modelUri without a backup container: only GetExports' URLs are used.
    let refused = ModelUri::Refused {
        reason: "outside".into(),
    };
    let plans = plan_releases(pid(), iid(), &exports[..1], &refused, false);
    assert!(matches!(&plans[0].source, Source::Download { .. }));
    // Blob names are case-sensitive: a modelUri naming `… .onnx` or upper-case ids points at
    // another blob, and the genuine backup is used.
    for other in [
        format!("{P} - {I}.onnx"),
        format!("{} - {}.ONNX", P.to_uppercase(), I.to_uppercase()),
    ] {
        let pointed = ModelUri::InBackup { blob_name: other };
        let plans = plan_releases(pid(), iid(), &exports[..1], &pointed, true);
        assert_eq!(
            plans[0].source,
            Source::Backup {
                blob_name: format!("{P} - {I}.ONNX")
            }
        );
    }
    // No usable downloadUri, no backup: nothing to copy.
    let none = [export("ONNX", None, "Done", "")];
    assert!(plan_releases(pid(), iid(), &none, &ModelUri::None, false).is_empty());
}

#[test]
fn tags_stay_within_azures_rules() {
    let tags = index_tags(pid(), iid(), "TensorFlow", Some("Tensor Flow#Lite"));
    assert_eq!(tags.len(), 5);
    assert_eq!(tags["flavor"], "Tensor Flow_Lite");
    assert_eq!(tags["source"], "customvision");
    assert_eq!(index_tags(pid(), iid(), "ONNX", None).len(), 4);
    assert!(tags_header(&tags).contains("flavor=Tensor+Flow_Lite"));
}

#[test]
fn metadata_is_ascii_and_currency_is_checked_by_etag_and_length() {
    assert_eq!(metadata_value("Détecteur 1"), "D%C3%A9tecteur 1");
    // The source is a URL: percent-encoded once, as it is.
    let names = ReleaseNames {
        project_id: pid(),
        project_name: "Widgets".into(),
        iteration_id: iid(),
        iteration_name: "Iteration 1".into(),
        platform: "ONNX".into(),
        flavor: None,
    };
    let source = format!("https://a.blob.core.windows.net/b/{P}%20-%20{I}.ONNX?sv=1&sig=s");
    let m = release_metadata(&names, &ReleaseFacts::default(), &source, "0x1", 3);
    assert_eq!(
        m["source"],
        format!("https://a.blob.core.windows.net/b/{P}%20-%20{I}.ONNX")
    );
    let meta: HashMap<String, String> = [
        ("SourceEtag".to_owned(), "0x8D1".to_owned()),
        ("sourcelength".to_owned(), "42".to_owned()),
        ("projectid".to_owned(), P.to_owned()),
        ("iterationid".to_owned(), I.to_owned()),
    ]
    .into();
    assert!(is_current(&meta, "\"0x8D1\"", 42));
    assert!(!is_current(&meta, "0x8D2", 42));
    assert!(!is_current(&meta, "0x8D1", 43));
    assert!(!belongs_elsewhere(&meta, pid(), iid()));
    assert!(belongs_elsewhere(&meta, Uuid::nil(), iid()));
    assert!(belongs_elsewhere(&HashMap::new(), pid(), iid()));
}

#[test]
fn a_copy_that_failed_or_runs_is_never_current() {
    let meta: HashMap<String, String> = [
        ("sourceetag".to_owned(), "0x8D1".to_owned()),
        ("sourcelength".to_owned(), "42".to_owned()),
    ]
    .into();
    for (copy, want) in [
        (CopyState::None, BeforeCopy::Current),
        (CopyState::Success, BeforeCopy::Current),
        (CopyState::Pending, BeforeCopy::AwaitCopy),
        (CopyState::Failed, BeforeCopy::Copy),
    ] {
        assert_eq!(before_copy(&meta, copy, "0x8D1", 42), want, "{copy:?}");
    }
    assert_eq!(
        before_copy(&meta, CopyState::Success, "0x8D2", 42),
        BeforeCopy::Copy
    );
    assert_eq!(
        before_copy(&HashMap::new(), CopyState::Pending, "0x8D1", 42),
        BeforeCopy::AwaitCopy
    );
}
