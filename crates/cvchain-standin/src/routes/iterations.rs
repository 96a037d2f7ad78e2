//! TrainProject and the iteration lifecycle: training needs tagged images (at least
//! [`MIN_IMAGES_PER_TAG`] per tag, two tags for a Multiclass project) and something new since the
//! last training (or `forceTrain`), takes the configured time, and notifies the project's queue;
//! GetIterations, GetIteration, UpdateIteration, DeleteIteration, GetIterationPerformance,
//! PublishIteration and UnpublishIteration.

use crate::api::{ApiError, ApiResult, Params, json_body, now_string, optional_json, parse_id};
use crate::faults::next_f64;
use crate::spec::ApiVersion;
use crate::state::{
    IterationState, MAX_ITERATIONS, MIN_IMAGES_PER_TAG, Performance, ProjectState, S,
};
use crate::storage;
use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::StatusCode,
    response::IntoResponse,
};
use cvchain_core::notification::{Notification, TrainingStatus};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct TrainingParameters {
    #[serde(default)]
    selected_tags: Option<Vec<Uuid>>,
}

/// The tags a training would use, or why the project cannot train.
fn training_tags(
    p: &ProjectState,
    selected: Option<&[Uuid]>,
) -> Result<Vec<(Uuid, String)>, ApiError> {
    let tags: Vec<_> = p
        .tags
        .iter()
        .filter(|t| selected.is_none_or(|s| s.contains(&t.id)))
        .collect();
    if let Some(sel) = selected
        && let Some(missing) = sel.iter().find(|id| !p.tags.iter().any(|t| t.id == **id))
    {
        return Err(ApiError::not_found(
            "NotFoundTag",
            format!("Tag {missing} not found"),
        ));
    }
    let regular: Vec<_> = tags.iter().filter(|t| t.kind != "Negative").collect();
    if regular.is_empty() || p.images.iter().all(|i| i.tags.is_empty()) {
        return Err(ApiError::bad_request(
            "BadRequestTrainingValidationFailed",
            format!(
                "Nothing to train on: tag images first (at least {MIN_IMAGES_PER_TAG} per tag)"
            ),
        ));
    }
    for t in &tags {
        let n = p.image_count(t.id);
        if n < MIN_IMAGES_PER_TAG {
            return Err(ApiError::bad_request(
                "BadRequestTrainingValidationFailed",
                format!(
                    "Tag {} has {n} images; each tag needs at least {MIN_IMAGES_PER_TAG}",
                    t.name
                ),
            ));
        }
    }
    if p.classification_type == "Multiclass" {
        if regular.len() < 2 {
            return Err(ApiError::bad_request(
                "BadRequestMultiClassClassificationTrainingValidationFailed",
                "A Multiclass project needs at least two tags with images",
            ));
        }
        if p.images.iter().any(|i| {
            i.tags
                .iter()
                .filter(|(t, _)| regular.iter().any(|r| r.id == *t))
                .count()
                > 1
        }) {
            return Err(ApiError::bad_request(
                "BadRequestMultiClassClassificationTrainingValidationFailed",
                "In a Multiclass project an image has one tag; some have more",
            ));
        }
    }
    Ok(tags.iter().map(|t| (t.id, t.name.clone())).collect())
}

pub async fn train_project(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    Path(project): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&project)?;
    let q = Params::parse(query.as_deref());
    let training_type = ["Regular", "Advanced"]
        .into_iter()
        .find(|t| t.eq_ignore_ascii_case(q.get("trainingType").unwrap_or("Regular")))
        .ok_or_else(|| {
            ApiError::bad_request(
                "BadRequestInvalid",
                "trainingType must be Regular or Advanced",
            )
        })?;
    let budget = q
        .int("reservedBudgetInHours", 0, i32::MAX as i64)?
        .unwrap_or(0);
    let force = q.bool("forceTrain")?.unwrap_or(false);
    if let Some(email) = q.get("notificationEmailAddress")
        && !email.contains('@')
    {
        return Err(ApiError::bad_request(
            "BadRequestInvalidEmailAddress",
            format!("{email} is not an email address"),
        ));
    }
    let params: TrainingParameters =
        optional_json(&body, "trainingParameters")?.unwrap_or_default();
    let view = {
        let mut w = s.world();
        let p = w.project(id)?;
        if p.iterations.iter().any(|i| i.status == "Training") {
            return Err(ApiError::bad_request(
                "BadRequestTrainingAlreadyInProgress",
                "The project is already training",
            ));
        }
        let tags = training_tags(p, params.selected_tags.as_deref())?;
        if !force
            && p.iterations
                .iter()
                .rev()
                .find(|i| i.status == "Completed")
                .is_some_and(|i| i.dataset == p.dataset)
        {
            return Err(ApiError::bad_request(
                "BadRequestTrainingNotNeeded",
                "Nothing changed since the last training (use forceTrain to train anyway)",
            ));
        }
        if p.iterations.len() >= MAX_ITERATIONS {
            return Err(ApiError::bad_request(
                "BadRequestExceedIterationPerProjectLimit",
                format!(
                    "The project has reached its limit of {MAX_ITERATIONS} iterations; delete one before training"
                ),
            ));
        }
        p.trained += 1;
        let now = now_string();
        let it = IterationState {
            id: Uuid::new_v4(),
            name: format!("Iteration {}", p.trained),
            status: "Training",
            created: now.clone(),
            last_modified: now,
            trained_at: None,
            domain_id: p.domain_id,
            classification_type: p.classification_type.clone(),
            training_type: training_type.to_owned(),
            reserved_budget_in_hours: budget,
            training_time_in_minutes: 0,
            publish_name: String::new(),
            publish_resource: None,
            dataset: p.dataset,
            tags,
            performance: None,
            exports: Vec::new(),
            training_error: None,
        };
        let view = it.view(id, version);
        let iid = it.id;
        p.iterations.push(it);
        let s2 = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(s2.config.train_delay).await;
            finish_training(&s2, id, iid).await;
        });
        view
    };
    Ok(Json(view).into_response())
}

async fn finish_training(s: &S, project: Uuid, iteration: Uuid) {
    let (queue, status) = {
        let mut w = s.world();
        let fail = w.faults.fail_training;
        let a = next_f64(&mut w.rng);
        let b = next_f64(&mut w.rng);
        let given =
            (!fail && !w.faults.next_metrics.is_empty()).then(|| w.faults.next_metrics.remove(0));
        let Ok(p) = w.project(project) else {
            return;
        };
        let queue = p.queue.as_ref().map(|q| q.name.clone());
        let Ok(it) = p.iteration(iteration) else {
            return;
        };
        let now = now_string();
        it.last_modified = now.clone();
        if fail {
            it.status = "Failed";
            it.training_error = Some("Training failed (injected by the stand-in)".into());
            (queue, TrainingStatus::Failed)
        } else {
            it.status = "Completed";
            it.trained_at = Some(now);
            it.training_time_in_minutes = 1;
            let (precision, recall, ap) = match given {
                Some(m) => (m.precision, m.recall, m.average_precision),
                None => {
                    let (p, r) = (0.80 + 0.19 * a, 0.75 + 0.2 * b);
                    (p, r, (p + r) / 2.0)
                }
            };
            it.performance = Some(Performance {
                precision,
                recall,
                average_precision: ap,
                per_tag: it
                    .tags
                    .iter()
                    .map(|(id, name)| (*id, name.clone(), precision, recall, ap))
                    .collect(),
            });
            (queue, TrainingStatus::Completed)
        }
    };
    if let (Some(storage), Some(queue)) = (&s.config.storage, queue) {
        let n = Notification::Training {
            project_id: project,
            iteration_id: iteration,
            status,
        };
        storage::notify(storage, &queue, &n, s.config.base64_messages).await;
    }
}

pub async fn get_iterations(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    Path(project): Path<String>,
) -> ApiResult {
    let id = parse_id(&project)?;
    let mut w = s.world();
    let p = w.project(id)?;
    Ok(Json(Value::Array(
        p.iterations.iter().map(|i| i.view(id, version)).collect(),
    ))
    .into_response())
}

pub async fn get_iteration(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    Path((project, iteration)): Path<(String, String)>,
) -> ApiResult {
    let (pid, iid) = (parse_id(&project)?, parse_id(&iteration)?);
    let mut w = s.world();
    Ok(Json(w.project(pid)?.iteration(iid)?.view(pid, version)).into_response())
}

#[derive(Deserialize)]
struct IterationUpdate {
    name: Option<String>,
}

/// UpdateIteration: renames (names are unique within a project).
pub async fn update_iteration(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    Path((project, iteration)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let (pid, iid) = (parse_id(&project)?, parse_id(&iteration)?);
    let update: IterationUpdate = json_body(&body, "updatedIteration")?;
    let name = update.name.ok_or_else(|| ApiError::required("name"))?;
    if name.trim().is_empty() || name.len() > 256 {
        return Err(ApiError::bad_request(
            "BadRequestIterationName",
            "An iteration name must have 1 to 256 characters",
        ));
    }
    let mut w = s.world();
    let p = w.project(pid)?;
    p.iteration(iid)?;
    if p.iterations.iter().any(|i| i.id != iid && i.name == name) {
        return Err(ApiError::bad_request(
            "BadRequestIterationNameNotUnique",
            format!("Another iteration is named {name}"),
        ));
    }
    let it = p.iteration(iid)?;
    it.name = name;
    it.last_modified = now_string();
    Ok(Json(it.view(pid, version)).into_response())
}

/// DeleteIteration: a published iteration must be unpublished first, as the service requires;
/// one still training cannot be deleted either. Its exports go with it.
pub async fn delete_iteration(
    State(s): State<S>,
    Path((project, iteration)): Path<(String, String)>,
) -> ApiResult {
    let (pid, iid) = (parse_id(&project)?, parse_id(&iteration)?);
    let mut w = s.world();
    let p = w.project(pid)?;
    let it = p.iteration(iid)?;
    if it.is_published() {
        return Err(ApiError::bad_request(
            "BadRequestIterationIsPublished",
            "The iteration is published; unpublish it before deleting it",
        ));
    }
    if it.status == "Training" {
        return Err(ApiError::bad_request(
            "BadRequestIterationValidationFailed",
            "The iteration is still training",
        ));
    }
    p.iterations.retain(|i| i.id != iid);
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn get_performance(
    State(s): State<S>,
    Path((project, iteration)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let (pid, iid) = (parse_id(&project)?, parse_id(&iteration)?);
    let q = Params::parse(query.as_deref());
    for name in ["threshold", "overlapThreshold"] {
        if let Some(v) = q.get(name)
            && v.parse::<f64>()
                .map(|x| !(0.0..=1.0).contains(&x))
                .unwrap_or(true)
        {
            return Err(ApiError::bad_request(
                "BadRequestInvalid",
                format!("{name} must be a number between 0 and 1"),
            ));
        }
    }
    let mut w = s.world();
    let it = w.project(pid)?.iteration(iid)?;
    match &it.performance {
        Some(perf) => Ok(Json(it.performance_view(perf)).into_response()),
        None => Err(ApiError::not_found(
            "NotFoundIterationPerformance",
            "The iteration has no performance yet (it is not trained)",
        )),
    }
}

/// PublishIteration. A publish name serves one iteration of a project on a prediction resource:
/// another iteration holding it is replaced only with `overwrite=true`.
pub async fn publish_iteration(
    State(s): State<S>,
    Path((project, iteration)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let (pid, iid) = (parse_id(&project)?, parse_id(&iteration)?);
    let q = Params::parse(query.as_deref());
    let name = q
        .get("publishName")
        .ok_or_else(|| ApiError::required("publishName"))?
        .to_owned();
    let prediction = q
        .get("predictionId")
        .ok_or_else(|| ApiError::required("predictionId"))?
        .to_owned();
    if name.len() > 256 || name.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(ApiError::bad_request(
            "BadRequestInvalidPublishName",
            "Invalid publish name",
        ));
    }
    if !prediction.starts_with("/subscriptions/") {
        return Err(ApiError::bad_request(
            "BadRequestInvalidPublishTarget",
            "predictionId must be the prediction resource's full resource id (/subscriptions/…)",
        ));
    }
    let overwrite = q.bool("overwrite")?.unwrap_or(false);
    let mut w = s.world();
    let p = w.project(pid)?;
    let it = p.iteration(iid)?;
    if it.status != "Completed" {
        return Err(ApiError::bad_request(
            "BadRequestIterationIsNotTrained",
            "Iteration is not trained",
        ));
    }
    if it.is_published() {
        return Err(ApiError::bad_request(
            "BadRequestIterationIsPublished",
            "Iteration is already published",
        ));
    }
    if let Some(holder) = p.iterations.iter_mut().find(|o| {
        o.publish_name == name && o.publish_resource.as_deref() == Some(prediction.as_str())
    }) {
        if !overwrite {
            return Err(ApiError::bad_request(
                "BadRequestInvalidPublishName",
                format!("The publish name {name} is already in use by another iteration"),
            ));
        }
        holder.publish_name.clear();
        holder.publish_resource = None;
    }
    let it = p.iteration(iid)?;
    it.publish_name = name;
    it.publish_resource = Some(prediction);
    Ok(Json(true).into_response())
}

pub async fn unpublish_iteration(
    State(s): State<S>,
    Path((project, iteration)): Path<(String, String)>,
) -> ApiResult {
    let (pid, iid) = (parse_id(&project)?, parse_id(&iteration)?);
    let mut w = s.world();
    let it = w.project(pid)?.iteration(iid)?;
    if !it.is_published() {
        return Err(ApiError::bad_request(
            "BadRequestIterationNotPublished",
            "Iteration is not published",
        ));
    }
    it.publish_name.clear();
    it.publish_resource = None;
    Ok(StatusCode::NO_CONTENT.into_response())
}
