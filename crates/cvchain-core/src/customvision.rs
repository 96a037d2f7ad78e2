//! Custom Vision Training API v3.3: the models cvchain reads and the classification of its
//! errors (transient or permanent). The client that calls the service is an adapter
//! (`cvchain_azure::customvision`); the stand-in that plays it locally is `cvchain-standin`.

use serde::{Deserialize, Deserializer, Serialize};
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
    /// 5xx, timeouts, refused connections. 401/403 (a key or role to fix) also count, so the
    /// message stays queued and reaches the poison queue instead of being dropped.
    pub fn is_transient(&self) -> bool {
        match self {
            CvError::Service { status, .. } => {
                matches!(*status, 401 | 403 | 408 | 429) || *status >= 500
            }
            CvError::Unreachable { .. } | CvError::Timeout { .. } | CvError::Credential(_) => true,
            CvError::Decode { .. } => false,
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
