//! What the stand-in holds in memory, and how each record reads in the service's JSON for a
//! given API version.

use crate::api::ApiError;
use crate::config::StandinConfig;
use crate::faults::{CallLog, Faults};
use crate::spec::{self, ApiVersion};
use crate::storage::Target;
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::Instant,
};
use uuid::Uuid;

/// The service's cap on iterations per project (TrainProject answers
/// `BadRequestExceedIterationPerProjectLimit` beyond it).
pub const MAX_ITERATIONS: usize = 20;
/// Tags per project (S0).
pub const MAX_TAGS: usize = 500;
/// Images each tag needs before a project can train (the service's documented minimum).
pub const MIN_IMAGES_PER_TAG: usize = 5;

pub struct Shared {
    pub config: StandinConfig,
    pub world: Mutex<World>,
    pub started: Instant,
    /// The stand-in's own address, for the image URIs it hands out.
    pub endpoint: OnceLock<String>,
}

pub type S = Arc<Shared>;

impl World {
    /// Serves a call arriving at `now` if fewer than the limit were served in the second before
    /// it; otherwise the time until one of those leaves the second (the `Retry-After`).
    pub fn admit(&mut self, now: std::time::Duration) -> Result<(), std::time::Duration> {
        let Some(limit) = self.rate_limit else {
            return Ok(());
        };
        let second = std::time::Duration::from_secs(1);
        while self.served.front().is_some_and(|t| now >= *t + second) {
            self.served.pop_front();
        }
        if self.served.len() >= limit.max(1) as usize {
            return Err(self.served[0] + second - now);
        }
        self.served.push_back(now);
        Ok(())
    }
}

impl Shared {
    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct World {
    pub projects: Vec<ProjectState>,
    /// Calls served per second, or none for no limit (from the config, changed at run time).
    pub rate_limit: Option<u32>,
    /// When the calls served in the last second arrived, oldest first.
    pub served: std::collections::VecDeque<std::time::Duration>,
    pub faults: Faults,
    pub calls: CallLog,
    pub rng: u64,
}

impl World {
    pub fn project(&mut self, id: Uuid) -> Result<&mut ProjectState, ApiError> {
        self.projects
            .iter_mut()
            .find(|p| p.id == id)
            .ok_or_else(|| {
                ApiError::not_found("NotFoundProject", format!("Project {id} not found"))
            })
    }
}

pub struct ProjectState {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub domain_id: Uuid,
    pub classification_type: String,
    pub target_export_platforms: Vec<String>,
    pub created: String,
    pub last_modified: String,
    pub queue: Option<Target>,
    pub container: Option<Target>,
    /// Numbers iteration names: a deleted iteration's number is not reused.
    pub trained: u32,
    pub iterations: Vec<IterationState>,
    pub tags: Vec<TagState>,
    pub images: Vec<ImageState>,
    /// Moves on every change to images or tags; an iteration remembers the one it trained on.
    pub dataset: u64,
}

pub struct TagState {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub kind: String,
}

pub struct ImageState {
    pub id: Uuid,
    pub created: String,
    pub width: u32,
    pub height: u32,
    /// Tag ids with when each was applied.
    pub tags: Vec<(Uuid, String)>,
    pub digest: u64,
    pub bytes: Arc<Vec<u8>>,
    pub metadata: BTreeMap<String, String>,
}

pub struct IterationState {
    pub id: Uuid,
    pub name: String,
    /// `Training`, `Completed` or `Failed`.
    pub status: &'static str,
    pub created: String,
    pub last_modified: String,
    pub trained_at: Option<String>,
    pub domain_id: Uuid,
    pub classification_type: String,
    pub training_type: String,
    pub reserved_budget_in_hours: i64,
    pub training_time_in_minutes: i64,
    pub publish_name: String,
    pub publish_resource: Option<String>,
    pub dataset: u64,
    /// The tags it trained on (id, name).
    pub tags: Vec<(Uuid, String)>,
    pub performance: Option<Performance>,
    pub exports: Vec<ExportState>,
    pub training_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Performance {
    pub precision: f64,
    pub recall: f64,
    pub average_precision: f64,
    pub per_tag: Vec<(Uuid, String, f64, f64, f64)>,
}

pub struct ExportState {
    pub platform: String,
    pub flavor: Option<String>,
    /// `Exporting`, `Done` or `Failed`.
    pub status: &'static str,
    pub download_uri: String,
}

impl ProjectState {
    pub fn iteration(&mut self, id: Uuid) -> Result<&mut IterationState, ApiError> {
        self.iterations
            .iter_mut()
            .find(|i| i.id == id)
            .ok_or_else(|| {
                ApiError::not_found("NotFoundIteration", format!("Iteration {id} not found"))
            })
    }

    pub fn image_count(&self, tag: Uuid) -> usize {
        self.images
            .iter()
            .filter(|i| i.tags.iter().any(|(t, _)| *t == tag))
            .count()
    }

    pub fn touch(&mut self) {
        self.dataset += 1;
        self.last_modified = crate::api::now_string();
    }

    pub fn view(&self) -> Value {
        let mut settings = json!({
            "domainId": self.domain_id,
            "classificationType": self.classification_type,
            "targetExportPlatforms": self.target_export_platforms,
            "useNegativeSet": true,
            "imageProcessingSettings": { "augmentationMethods": {} },
        });
        // The service echoes the integration it was given.
        if let Some(c) = &self.container {
            settings["exportModelContainerUri"] = json!(c.uri);
        }
        if let Some(q) = &self.queue {
            settings["notificationQueueUri"] = json!(q.uri);
        }
        json!({
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "settings": settings,
            "created": self.created,
            "lastModified": self.last_modified,
            "thumbnailUri": "",
            "drModeEnabled": false,
            "status": "Succeeded",
        })
    }

    pub fn tag_view(&self, t: &TagState) -> Value {
        json!({
            "id": t.id,
            "name": t.name,
            "description": t.description,
            "type": t.kind,
            "imageCount": self.image_count(t.id),
        })
    }

    pub fn image_view(&self, i: &ImageState, endpoint: &str) -> Value {
        let uri = format!("{endpoint}/_standin/images/{}/{}", self.id, i.id);
        let tags: Vec<Value> = i
            .tags
            .iter()
            .map(|(id, at)| {
                let name = self
                    .tags
                    .iter()
                    .find(|t| t.id == *id)
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                json!({ "tagId": id, "tagName": name, "created": at })
            })
            .collect();
        json!({
            "id": i.id,
            "created": i.created,
            "width": i.width,
            "height": i.height,
            "resizedImageUri": uri,
            "thumbnailUri": uri,
            "originalImageUri": uri,
            "tags": if tags.is_empty() { Value::Null } else { Value::Array(tags) },
            "regions": Value::Null,
            "metadata": if i.metadata.is_empty() { Value::Null } else { json!(i.metadata) },
        })
    }
}

impl IterationState {
    pub fn is_published(&self) -> bool {
        !self.publish_name.is_empty()
    }

    pub fn exportable(&self) -> bool {
        self.status == "Completed" && spec::domain(&self.domain_id).is_some_and(|d| d.compact)
    }

    /// The iteration as `version` describes it: `exportableTo` lists that version's platforms.
    pub fn view(&self, project: Uuid, version: ApiVersion) -> Value {
        let mut v = json!({
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "created": self.created,
            "lastModified": self.last_modified,
            "trainedAt": self.trained_at,
            "projectId": project,
            "exportable": self.exportable(),
            "exportableTo": version.spec().platforms,
            "domainId": self.domain_id,
            "classificationType": self.classification_type,
            "trainingType": self.training_type,
            "reservedBudgetInHours": self.reserved_budget_in_hours,
            "trainingTimeInMinutes": self.training_time_in_minutes,
            "publishName": self.publish_name,
            "originalPublishResourceId": self.publish_resource.clone().unwrap_or_default(),
        });
        if version == ApiVersion::V3_4Preview
            && let Some(e) = &self.training_error
        {
            v["trainingErrorDetails"] = json!(e);
        }
        v
    }

    pub fn performance_view(&self, p: &Performance) -> Value {
        json!({
            "perTagPerformance": p.per_tag.iter().map(|(id, name, precision, recall, ap)| json!({
                "id": id,
                "name": name,
                "precision": precision,
                "precisionStdDeviation": 0.01,
                "recall": recall,
                "recallStdDeviation": 0.02,
                "averagePrecision": ap,
            })).collect::<Vec<_>>(),
            "precision": p.precision,
            "precisionStdDeviation": 0.01,
            "recall": p.recall,
            "recallStdDeviation": 0.02,
            "averagePrecision": p.average_precision,
        })
    }
}

impl ExportState {
    pub fn view(&self) -> Value {
        json!({
            "platform": self.platform,
            "status": self.status,
            "downloadUri": self.download_uri,
            "flavor": self.flavor,
            "newerVersionAvailable": false,
        })
    }

    pub fn same_target(&self, platform: &str, flavor: Option<&str>) -> bool {
        self.platform.eq_ignore_ascii_case(platform)
            && self.flavor.as_deref().map(str::to_ascii_lowercase)
                == flavor.map(str::to_ascii_lowercase)
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;
    use std::time::Duration;

    fn world(limit: Option<u32>) -> World {
        World {
            projects: Vec::new(),
            rate_limit: limit,
            served: Default::default(),
            faults: Faults::default(),
            calls: CallLog::default(),
            rng: 1,
        }
    }

    #[test]
    fn the_eleventh_call_within_a_second_waits_for_the_first_to_leave_it() {
        let ms = Duration::from_millis;
        let mut w = world(Some(10));
        for t in 0..10 {
            assert_eq!(w.admit(ms(t * 50)), Ok(()));
        }
        assert_eq!(w.admit(ms(600)), Err(ms(400)));
        assert_eq!(w.admit(ms(999)), Err(ms(1)), "refusals do not count");
        assert_eq!(w.admit(ms(1000)), Ok(()));
        assert_eq!(w.admit(ms(1001)), Err(ms(49)));
        let mut off = world(None);
        assert!((0..100).all(|_| off.admit(ms(0)).is_ok()));
    }
}
