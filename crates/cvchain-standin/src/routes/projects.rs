//! Domains and projects: CreateProject (the storage URIs as query parameters, as the v3.3 docs
//! pass them, or in the `CreateProjectOptions` body, as Microsoft's SDKs send them), GetProjects,
//! GetProject, UpdateProject (the URIs in `settings`), DeleteProject; the integration is set up
//! and checked before the project is accepted.

use crate::api::{ApiError, ApiResult, Params, json_body, now_string, optional_json, parse_id};
use crate::spec::{self, ApiVersion, DOMAINS, GENERAL_DOMAIN};
use crate::state::{ProjectState, S};
use crate::storage::{self, Target};
use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::StatusCode,
    response::IntoResponse,
};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

fn domain_view(d: &spec::Domain) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "type": "Classification",
        "exportable": d.compact,
        "enabled": true,
    })
}

pub async fn get_domains() -> Json<Value> {
    Json(Value::Array(DOMAINS.iter().map(domain_view).collect()))
}

pub async fn get_domain(Path(domain): Path<String>) -> ApiResult {
    let id = parse_id(&domain)?;
    spec::domain(&id)
        .map(|d| Json(domain_view(d)).into_response())
        .ok_or_else(|| ApiError::not_found("NotFoundDomain", format!("Domain {id} not found")))
}

pub async fn get_projects(State(s): State<S>) -> Json<Value> {
    let w = s.world();
    Json(Value::Array(w.projects.iter().map(|p| p.view()).collect()))
}

pub async fn get_project(State(s): State<S>, Path(project): Path<String>) -> ApiResult {
    let id = parse_id(&project)?;
    let mut w = s.world();
    Ok(Json(w.project(id)?.view()).into_response())
}

pub async fn delete_project(State(s): State<S>, Path(project): Path<String>) -> ApiResult {
    let id = parse_id(&project)?;
    let mut w = s.world();
    w.project(id)?;
    w.projects.retain(|p| p.id != id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn known_domain(value: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(value)
        .ok()
        .filter(|d| spec::domain(d).is_some())
        .ok_or_else(|| {
            ApiError::bad_request(
                "BadRequestProjectUnknownDomain",
                format!("{value} is not a known domain (GetDomains lists them)"),
            )
        })
}

fn classification(value: &str) -> Result<String, ApiError> {
    ["Multiclass", "Multilabel"]
        .into_iter()
        .find(|c| c.eq_ignore_ascii_case(value))
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::bad_request(
                "BadRequestProjectUnknownClassification",
                format!("{value} is not a classification type (Multiclass or Multilabel)"),
            )
        })
}

fn platforms(version: ApiVersion, names: &[String]) -> Result<Vec<String>, ApiError> {
    names
        .iter()
        .map(|n| {
            version
                .spec()
                .platform(n.trim())
                .map(str::to_owned)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "BadRequestProjectUnsupportedExportPlatform",
                        format!("{n} is not an export platform"),
                    )
                })
        })
        .collect()
}

/// Resolves the URIs against the stand-in's account and runs the service's access checks: a
/// test blob in the container, then the ConnectionTest message on the queue.
async fn set_up(
    s: &S,
    version: ApiVersion,
    project: Uuid,
    queue: Option<&str>,
    container: Option<&str>,
) -> Result<(Option<Target>, Option<Target>), ApiError> {
    if queue.is_none() && container.is_none() {
        return Ok((None, None));
    }
    let refused = |message: String| {
        ApiError::bad_request(
            version
                .spec()
                .code_or("BadRequestInvalidUri", "BadRequestInvalid"),
            message,
        )
    };
    let Some(storage) = &s.config.storage else {
        return Err(refused(
            "this Custom Vision has no storage account to write notifications or backups to (start the stand-in with a storage connection)".into(),
        ));
    };
    let settings = storage.settings();
    let queue = queue
        .map(|u| storage::resolve("notificationQueueUri", u, &settings.queue_endpoint))
        .transpose()
        .map_err(refused)?;
    let container = container
        .map(|u| storage::resolve("exportModelContainerUri", u, &settings.blob_endpoint))
        .transpose()
        .map_err(refused)?;
    let failed = |e: storage::SetupError| {
        if e.transient {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ErrorUnknown", e.message)
        } else {
            refused(e.message)
        }
    };
    if let Some(c) = &container {
        storage::check_container(storage, c, project)
            .await
            .map_err(failed)?;
    }
    if let Some(q) = &queue {
        storage::connection_test(storage, q, project, s.config.base64_messages)
            .await
            .map_err(failed)?;
    }
    Ok((queue, container))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CreateProjectOptions {
    export_model_container_uri: Option<String>,
    notification_queue_uri: Option<String>,
}

pub async fn create_project(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> ApiResult {
    let q = Params::parse(query.as_deref());
    let name = q.get("name").ok_or_else(|| ApiError::required("name"))?;
    if name.trim().is_empty() || name.len() > 256 {
        return Err(ApiError::bad_request(
            "BadRequestProjectName",
            "The project name must have 1 to 256 characters",
        ));
    }
    let domain_id = known_domain(q.get("domainId").unwrap_or(GENERAL_DOMAIN))?;
    let classification_type = classification(q.get("classificationType").unwrap_or("Multiclass"))?;
    let targets: Vec<String> = q
        .get("targetExportPlatforms")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let target_export_platforms = platforms(version, &targets)?;
    let options: CreateProjectOptions = optional_json(&body, "options")?.unwrap_or_default();
    let queue_uri = options
        .notification_queue_uri
        .filter(|u| !u.is_empty())
        .or_else(|| q.get("notificationQueueUri").map(str::to_owned));
    let container_uri = options
        .export_model_container_uri
        .filter(|u| !u.is_empty())
        .or_else(|| q.get("exportModelContainerUri").map(str::to_owned));
    let max_projects = s.config.max_projects;
    if s.world().projects.len() >= max_projects {
        return Err(ApiError::bad_request(
            "BadRequestExceedProjectLimit",
            format!("The resource holds at most {max_projects} projects"),
        ));
    }
    let id = Uuid::new_v4();
    let (queue, container) = set_up(
        &s,
        version,
        id,
        queue_uri.as_deref(),
        container_uri.as_deref(),
    )
    .await?;
    let now = now_string();
    let project = ProjectState {
        id,
        name: name.to_owned(),
        description: q.get("description").unwrap_or_default().to_owned(),
        domain_id,
        classification_type,
        target_export_platforms,
        created: now.clone(),
        last_modified: now,
        queue,
        container,
        trained: 0,
        iterations: Vec::new(),
        tags: Vec::new(),
        images: Vec::new(),
        dataset: 0,
    };
    let view = project.view();
    s.world().projects.push(project);
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProjectUpdate {
    name: Option<String>,
    description: Option<String>,
    settings: Option<SettingsUpdate>,
}

/// `null` and absent alike leave a setting as it is; for the two URIs an empty string removes
/// the integration.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SettingsUpdate {
    domain_id: Option<String>,
    classification_type: Option<String>,
    target_export_platforms: Option<Vec<String>>,
    export_model_container_uri: Option<String>,
    notification_queue_uri: Option<String>,
}

pub async fn update_project(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    Path(project): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&project)?;
    let update: ProjectUpdate = json_body(&body, "updatedProject")?;
    let settings = update.settings.unwrap_or_default();
    if let Some(n) = &update.name
        && (n.trim().is_empty() || n.len() > 256)
    {
        return Err(ApiError::bad_request(
            "BadRequestProjectName",
            "The project name must have 1 to 256 characters",
        ));
    }
    let domain = settings
        .domain_id
        .as_deref()
        .map(known_domain)
        .transpose()?;
    let class = settings
        .classification_type
        .as_deref()
        .map(classification)
        .transpose()?;
    let targets = settings
        .target_export_platforms
        .as_deref()
        .map(|t| platforms(version, t))
        .transpose()?;
    // Only a changed URI is set up (and tested) again.
    let (old_queue, old_container) = {
        let mut w = s.world();
        let p = w.project(id)?;
        (
            p.queue.as_ref().map(|t| t.uri.clone()),
            p.container.as_ref().map(|t| t.uri.clone()),
        )
    };
    let changed = |new: &Option<String>, old: &Option<String>| match new {
        Some(u) if !u.is_empty() && Some(u) != old.as_ref() => Some(u.clone()),
        _ => None,
    };
    let new_queue = changed(&settings.notification_queue_uri, &old_queue);
    let new_container = changed(&settings.export_model_container_uri, &old_container);
    let (queue, container) = set_up(
        &s,
        version,
        id,
        new_queue.as_deref(),
        new_container.as_deref(),
    )
    .await?;
    let mut w = s.world();
    let p = w.project(id)?;
    if let Some(n) = update.name {
        p.name = n;
    }
    if let Some(d) = update.description {
        p.description = d;
    }
    if let Some(d) = domain {
        p.domain_id = d;
    }
    if let Some(c) = class {
        p.classification_type = c;
    }
    if let Some(t) = targets {
        p.target_export_platforms = t;
    }
    match (settings.notification_queue_uri.as_deref(), queue) {
        (_, Some(q)) => p.queue = Some(q),
        (Some(""), None) => p.queue = None,
        _ => {}
    }
    match (settings.export_model_container_uri.as_deref(), container) {
        (_, Some(c)) => p.container = Some(c),
        (Some(""), None) => p.container = None,
        _ => {}
    }
    p.last_modified = now_string();
    Ok(Json(p.view()).into_response())
}
