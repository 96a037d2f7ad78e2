//! Custom Vision Training API v3.3: the models cvchain reads and the classification of its
//! errors (transient or permanent). The client that calls the service is an adapter
//! (`cvchain_azure::customvision`); the stand-in that plays it locally is `cvchain-standin`.

use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};
use serde_json::Value;
use uuid::Uuid;

/// The service writes `null` where a list, string or flag is empty: read it as the default.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// Service error codes cvchain acts on (the enum has 130; others are carried as text).
pub mod codes {
    pub const EXPORT_ALREADY_IN_PROGRESS: &str = "BadRequestExportAlreadyInProgress";
    pub const EXPORT_WHILE_TRAINING: &str = "BadRequestExportWhileTraining";
    pub const ITERATION_NOT_TRAINED: &str = "BadRequestIterationIsNotTrained";
    pub const UNSUPPORTED_EXPORT_PLATFORM: &str = "BadRequestProjectUnsupportedExportPlatform";
    pub const EXPORT_VALIDATION_FAILED: &str = "BadRequestExportValidationFailed";
    pub const ITERATION_IS_PUBLISHED: &str = "BadRequestIterationIsPublished";
    pub const NOT_FOUND_PROJECT: &str = "NotFoundProject";
    pub const NOT_FOUND_ITERATION: &str = "NotFoundIteration";
    pub const NOT_FOUND_ITERATION_PERFORMANCE: &str = "NotFoundIterationPerformance";
    pub const BAD_REQUEST_INVALID: &str = "BadRequestInvalid";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ProjectSettings {
    pub domain_id: Option<Uuid>,
    pub classification_type: Option<String>,
    pub target_export_platforms: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Project {
    #[serde(deserialize_with = "nullable")]
    pub id: Uuid,
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    #[serde(deserialize_with = "nullable")]
    pub description: String,
    #[serde(deserialize_with = "nullable")]
    pub settings: ProjectSettings,
    pub created: Option<String>,
    pub last_modified: Option<String>,
    pub status: Option<String>,
    /// Fields of the answer that could not be read and were taken as absent (see
    /// [`decode_lenient`]); recorded in the history row.
    #[serde(
        rename = "_cvchainDecodeNotes",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub decode_notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Iteration {
    #[serde(deserialize_with = "nullable")]
    pub id: Uuid,
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    #[serde(deserialize_with = "nullable")]
    pub status: String,
    pub created: Option<String>,
    pub last_modified: Option<String>,
    pub trained_at: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub project_id: Uuid,
    #[serde(deserialize_with = "nullable")]
    pub exportable: bool,
    #[serde(deserialize_with = "nullable")]
    pub exportable_to: Vec<String>,
    pub domain_id: Option<Uuid>,
    pub classification_type: Option<String>,
    pub training_type: Option<String>,
    pub reserved_budget_in_hours: Option<i32>,
    pub training_time_in_minutes: Option<i32>,
    pub publish_name: Option<String>,
    pub original_publish_resource_id: Option<String>,
    /// Fields of the answer that could not be read and were taken as absent (see
    /// [`decode_lenient`]); recorded in the history row.
    #[serde(
        rename = "_cvchainDecodeNotes",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub decode_notes: Vec<String>,
}

impl Iteration {
    /// Whether the iteration's domain can export to `platform` (case-insensitive).
    pub fn can_export_to(&self, platform: &str) -> bool {
        self.exportable
            && self
                .exportable_to
                .iter()
                .any(|p| p.eq_ignore_ascii_case(platform))
    }

    pub fn is_published(&self) -> bool {
        self.publish_name.as_deref().is_some_and(|n| !n.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct TagPerformance {
    pub id: Option<Uuid>,
    pub name: Option<String>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub average_precision: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct IterationPerformance {
    #[serde(deserialize_with = "nullable")]
    pub per_tag_performance: Vec<TagPerformance>,
    pub precision: Option<f64>,
    pub precision_std_deviation: Option<f64>,
    pub recall: Option<f64>,
    pub recall_std_deviation: Option<f64>,
    pub average_precision: Option<f64>,
    /// Fields of the answer that could not be read and were taken as absent (see
    /// [`decode_lenient`]); recorded in the history row.
    #[serde(
        rename = "_cvchainDecodeNotes",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub decode_notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Export {
    #[serde(deserialize_with = "nullable")]
    pub platform: String,
    /// `Exporting`, `Failed` or `Done`.
    #[serde(deserialize_with = "nullable")]
    pub status: String,
    pub download_uri: Option<String>,
    /// `null` means none.
    pub flavor: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub newer_version_available: bool,
    /// Fields of the answer that could not be read and were taken as absent (see
    /// [`decode_lenient`]); recorded in the history row.
    #[serde(
        rename = "_cvchainDecodeNotes",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub decode_notes: Vec<String>,
}

impl Export {
    pub fn is_done(&self) -> bool {
        self.status.eq_ignore_ascii_case("Done")
    }
    pub fn is_failed(&self) -> bool {
        self.status.eq_ignore_ascii_case("Failed")
    }
    pub fn is_exporting(&self) -> bool {
        self.status.eq_ignore_ascii_case("Exporting")
    }

    /// A status the spec does not define (`Exporting`, `Failed`, `Done`).
    pub fn is_unknown_status(&self) -> bool {
        !(self.is_done() || self.is_failed() || self.is_exporting())
    }
}

/// Where [`decode_lenient`] leaves its notes in an object before the model reads it.
pub const DECODE_NOTES: &str = "_cvchainDecodeNotes";

/// The fields an operation's answer cannot do without (per element, for a list). `None`: an
/// operation whose answer is read strictly.
pub fn required_fields(operation: &str) -> Option<&'static [&'static str]> {
    match operation {
        "GetIteration" | "GetIterations" | "TrainProject" | "UpdateIteration" => {
            Some(&["id", "status"])
        }
        "GetProject" | "GetProjects" | "CreateProject" | "UpdateProject" => Some(&["id"]),
        "GetExports" | "ExportIteration" => Some(&["platform", "status"]),
        "GetIterationPerformance" => Some(&[]),
        _ => None,
    }
}

/// Reads an answer as the real service may send it: a field outside [`required_fields`] whose
/// value does not fit the model (a `domainId` that is not a UUID, a number as text…) is taken as
/// absent and noted (the model's `decode_notes`) instead of failing the whole answer. A required
/// field that does not fit, or an answer that is not JSON, is an error: the answer cannot be used.
pub fn decode_lenient<T: DeserializeOwned>(operation: &str, body: &[u8]) -> Result<T, String> {
    use serde_path_to_error::Segment;
    let Some(required) = required_fields(operation) else {
        return serde_json::from_slice(body).map_err(|e| e.to_string());
    };
    let mut value: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    // The required fields must be there at all (the models default what is missing).
    let present = |object: &Value, at: &str| -> Result<(), String> {
        let Some(fields) = object.as_object() else {
            return Err(format!("{at}expected an object, found {}", kind(object)));
        };
        match required
            .iter()
            .find(|k| fields.get(**k).is_none_or(Value::is_null))
        {
            Some(k) => Err(format!("{at}{k} is missing")),
            None => Ok(()),
        }
    };
    let list = matches!(operation, "GetExports" | "GetIterations" | "GetProjects");
    match (&value, list) {
        (Value::Array(items), true) => {
            for (i, item) in items.iter().enumerate() {
                present(item, &format!("[{i}]: "))?;
            }
        }
        (other, false) => present(other, "")?,
        (other, true) => return Err(format!("expected a list, found {}", kind(other))),
    }
    for _ in 0..64 {
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        let unusable = || format!("{}: {}", e.path(), e.inner());
        let segments: Vec<&Segment> = e.path().iter().collect();
        // A list answer: the field is in one of its elements.
        let (element, field) = match segments.split_first() {
            Some((Segment::Seq { index }, rest)) => (Some(*index), rest),
            _ => (None, &segments[..]),
        };
        let keys: Vec<&str> = field
            .iter()
            .map_while(|s| match s {
                Segment::Map { key } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        let Some((last, parents)) = keys.split_last() else {
            return Err(unusable());
        };
        if required.contains(&keys[0]) {
            return Err(unusable());
        }
        let object = match element {
            Some(i) => &mut value[i],
            None => &mut value,
        };
        let mut target = &mut *object;
        for k in parents {
            target = &mut target[*k];
        }
        if target.get(*last).is_none_or(Value::is_null) {
            // Absent already, and still unreadable: the model needs it.
            return Err(unusable());
        }
        let raw: String = crate::redact::redact(&target[*last].to_string())
            .chars()
            .take(80)
            .collect();
        target[*last] = Value::Null;
        let note = format!(
            "{}: {raw} could not be read ({}); taken as absent",
            keys.join("."),
            e.inner()
        );
        match object.get_mut(DECODE_NOTES).and_then(Value::as_array_mut) {
            Some(notes) => notes.push(note.into()),
            None => object[DECODE_NOTES] = Value::from(vec![note]),
        }
    }
    Err(format!("{operation}: too many fields could not be read"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A failed call, classified so callers know whether a retry can help. Never holds the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CvError {
    /// The service answered with an error body (`{"code","message"}` or the gateway's
    /// `{"error":{"code","message"}}`).
    #[error("Custom Vision {operation} answered HTTP {status} {code}: {message}")]
    Service {
        operation: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("Custom Vision {operation} is unreachable: {detail}")]
    Unreachable {
        operation: &'static str,
        detail: String,
    },
    #[error("Custom Vision {operation} did not answer within {seconds} s")]
    Timeout {
        operation: &'static str,
        seconds: u64,
    },
    #[error("Custom Vision {operation} answered something cvchain cannot read: {detail}")]
    Decode {
        operation: &'static str,
        detail: String,
    },
    #[error("no Microsoft Entra ID token for Custom Vision: {0}")]
    Credential(String),
}

impl CvError {
    /// True when the same call may succeed later without anyone changing anything: 408, 429,
    /// 5xx, timeouts, refused connections. 401/403 (a key or role to fix) and an answer that
    /// cannot be read also count, so the message is retried and reaches the poison queue with
    /// the reason instead of being dropped.
    pub fn is_transient(&self) -> bool {
        match self {
            CvError::Service { status, .. } => {
                matches!(*status, 401 | 403 | 408 | 429) || *status >= 500
            }
            // An answer cvchain cannot use at all: retried, then poisoned with the reason,
            // never taken as the end of the chain.
            CvError::Unreachable { .. }
            | CvError::Timeout { .. }
            | CvError::Credential(_)
            | CvError::Decode { .. } => true,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            CvError::Service { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The project or iteration does not exist (any more).
    pub fn is_not_found(&self) -> bool {
        matches!(self, CvError::Service { status: 404, .. })
            || self.code().is_some_and(|c| c.starts_with("NotFound"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_examples_deserialize() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/customvision/"
        );
        let read = |name: &str| -> serde_json::Value {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(format!("{dir}{name}")).unwrap())
                    .unwrap();
            v["responses"]["200"]["body"].clone()
        };
        let it: Iteration = serde_json::from_value(read("GetIteration.json")).unwrap();
        assert_eq!(it.name, "Iteration 2");
        assert!(it.exportable_to.contains(&"ONNX".to_owned()));
        assert!(
            !it.can_export_to("ONNX"),
            "exportable is false in the example"
        );
        let exports: Vec<Export> = serde_json::from_value(read("GetExports.json")).unwrap();
        assert!(exports[0].is_done());
        assert_eq!(exports[0].flavor, None);
        let e: Export = serde_json::from_value(read("ExportIteration.json")).unwrap();
        assert!(e.is_exporting());
        let p: Project = serde_json::from_value(read("GetProject.json")).unwrap();
        assert!(!p.name.is_empty());
        let training: Iteration = serde_json::from_value(read("TrainProject.json")).unwrap();
        assert_eq!(training.domain_id, None);
        let nulls: Iteration = serde_json::from_value(
            serde_json::json!({"name": null, "exportableTo": null, "exportable": null}),
        )
        .unwrap();
        assert!(nulls.exportable_to.is_empty() && !nulls.exportable);
    }

    #[test]
    fn an_unreadable_optional_field_is_absent_and_noted() {
        let body = br#"{"id": "6c8f7a3e-0000-4000-8000-000000000001", "name": "Iteration 1",
            "status": "Completed", "domainId": "not-a-uuid", "trainingTimeInMinutes": "7",
            "exportable": true, "exportableTo": ["ONNX", 3], "newField": {"x": 1}}"#;
        let it: Iteration = decode_lenient("GetIteration", body).unwrap();
        assert_eq!(it.domain_id, None);
        assert_eq!(it.training_time_in_minutes, None);
        assert!(it.exportable && it.exportable_to.is_empty());
        assert_eq!(it.decode_notes.len(), 3, "{:?}", it.decode_notes);
        assert!(
            it.decode_notes[0].starts_with("domainId: \"not-a-uuid\""),
            "{:?}",
            it.decode_notes
        );
        // Nested fields are dropped alone; list answers note per element.
        let p: Project = decode_lenient(
            "GetProject",
            br#"{"id": "6c8f7a3e-0000-4000-8000-000000000001", "name": "P",
                 "settings": {"domainId": 12, "classificationType": "Multiclass"}}"#,
        )
        .unwrap();
        assert_eq!(p.settings.domain_id, None);
        assert_eq!(
            p.settings.classification_type.as_deref(),
            Some("Multiclass")
        );
        assert_eq!(p.decode_notes.len(), 1);
        let exports: Vec<Export> = decode_lenient(
            "GetExports",
            br#"[{"platform": "ONNX", "status": "Done", "flavor": 5, "downloadUri": "https://x/y?sig=SECRET"},
                 {"platform": "CoreML", "status": "Queued"}]"#,
        )
        .unwrap();
        assert_eq!(exports[0].flavor, None);
        assert!(!exports[0].decode_notes[0].contains("SECRET"));
        assert!(exports[1].decode_notes.is_empty() && exports[1].is_unknown_status());
        // A well-formed answer has no notes and serializes without the notes key.
        let clean: Iteration = decode_lenient(
            "GetIteration",
            br#"{"id": "6c8f7a3e-0000-4000-8000-000000000001", "status": "Training"}"#,
        )
        .unwrap();
        assert!(clean.decode_notes.is_empty());
        assert!(
            !serde_json::to_string(&clean)
                .unwrap()
                .contains(DECODE_NOTES)
        );
    }

    #[test]
    fn an_answer_without_its_required_fields_cannot_be_used() {
        for (op, body) in [
            (
                "GetIteration",
                &br#"{"id": "nope", "status": "Completed"}"#[..],
            ),
            (
                "GetIteration",
                br#"{"id": "6c8f7a3e-0000-4000-8000-000000000001", "status": 3}"#,
            ),
            (
                "GetExports",
                br#"[{"platform": "ONNX", "status": "Done"}, {"status": "Done", "platform": []}]"#,
            ),
            ("GetProject", b"<html>gateway timeout</html>"),
            ("GetIteration", b"[]"),
            ("GetIteration", b"{}"),
        ] {
            let r = decode_lenient::<Iteration>(op, body);
            assert!(r.is_err() || op != "GetIteration", "{op} {r:?}");
            if op == "GetExports" {
                assert!(decode_lenient::<Vec<Export>>(op, body).is_err());
            }
            if op == "GetProject" {
                assert!(decode_lenient::<Project>(op, body).is_err());
            }
        }
        let e = CvError::Decode {
            operation: "GetIteration",
            detail: "id: invalid".into(),
        };
        assert!(e.is_transient(), "retried, then poisoned with the reason");
    }

    #[test]
    fn transient_and_permanent_errors_are_told_apart() {
        let svc = |status, code: &str| CvError::Service {
            operation: "GetIteration",
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(svc(429, "").is_transient());
        assert!(svc(503, "").is_transient());
        assert!(svc(401, "401").is_transient());
        assert!(!svc(400, codes::EXPORT_ALREADY_IN_PROGRESS).is_transient());
        assert!(!svc(404, codes::NOT_FOUND_ITERATION).is_transient());
        assert!(svc(400, codes::NOT_FOUND_ITERATION).is_not_found());
    }
}
