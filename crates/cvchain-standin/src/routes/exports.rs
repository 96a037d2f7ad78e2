//! ExportIteration and GetExports. The platform and flavor are checked against the request's API
//! version's enums (v3.4-preview adds OpenVino), the iteration must be trained on a compact
//! domain, and a second export of the same target is refused as the service refuses it. An
//! export ends after the configured time: the package (a zip laid out as the service's, see
//! `crate::package`) is written to the service's own storage (GetExports' `downloadUri`, behind
//! a SAS) and to the project's backup container, and the Export notification goes to the
//! project's queue.

use super::export_call;
use crate::api::{ApiError, ApiResult, Params, parse_id};
use crate::package::ExportPackage;
use crate::spec::ApiVersion;
use crate::state::{ExportState, ProjectState, S};
use crate::storage::{self, INTERNAL_CONTAINER};
use axum::{
    Extension, Json,
    extract::{Path, RawQuery, State},
    http::Uri,
    response::IntoResponse,
};
use cvchain_core::notification::{ExportStatus, Notification};
use serde_json::Value;
use uuid::Uuid;

/// Blob names in URLs: everything but RFC 3986 unreserved characters escaped.
const URL_PATH_ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

pub async fn get_exports(
    State(s): State<S>,
    Path((project, iteration)): Path<(String, String)>,
) -> ApiResult {
    let (pid, iid) = (parse_id(&project)?, parse_id(&iteration)?);
    let mut w = s.world();
    let it = w.project(pid)?.iteration(iid)?;
    Ok(Json(Value::Array(
        it.exports.iter().map(ExportState::view).collect(),
    ))
    .into_response())
}

pub async fn export_iteration(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    uri: Uri,
    Path((project, iteration)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let result = request_export(&s, version, &project, &iteration, query.as_deref());
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(e) if e.code == "BadRequestExportAlreadyInProgress" => "alreadyInProgress",
        Err(_) => "rejected",
    };
    s.world().calls.exports.push(export_call(&uri, outcome));
    let (view, pid, iid, platform, flavor) = result?;
    let s2 = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep(s2.config.export_delay).await;
        finish_export(&s2, pid, iid, platform, flavor).await;
    });
    Ok(Json(view).into_response())
}

type Accepted = (Value, Uuid, Uuid, String, Option<String>);

fn request_export(
    s: &S,
    version: ApiVersion,
    project: &str,
    iteration: &str,
    query: Option<&str>,
) -> Result<Accepted, ApiError> {
    let (pid, iid) = (parse_id(project)?, parse_id(iteration)?);
    let q = Params::parse(query);
    let platform = q
        .get("platform")
        .ok_or_else(|| ApiError::required("platform"))?;
    let (platform, flavor) = version
        .spec()
        .export_target(platform, q.get("flavor"))
        .map_err(|m| ApiError::bad_request("BadRequestExportValidationFailed", m))?;
    let mut w = s.world();
    let it = w.project(pid)?.iteration(iid)?;
    match it.status {
        "Completed" => {}
        "Training" => {
            return Err(ApiError::bad_request(
                "BadRequestExportWhileTraining",
                "Cannot export while training",
            ));
        }
        _ => {
            return Err(ApiError::bad_request(
                "BadRequestIterationIsNotTrained",
                "Iteration is not trained",
            ));
        }
    }
    if !it.exportable() {
        return Err(ApiError::bad_request(
            "BadRequestProjectUnsupportedExportPlatform",
            format!(
                "The iteration cannot be exported to {platform}: it was not trained on a compact domain"
            ),
        ));
    }
    if it
        .exports
        .iter()
        .any(|e| e.same_target(&platform, flavor.as_deref()))
    {
        // The service says this even after the first export finished.
        return Err(ApiError::bad_request(
            "BadRequestExportAlreadyInProgress",
            format!("{iid} is already queued for export"),
        ));
    }
    let export = ExportState {
        platform: platform.clone(),
        flavor: flavor.clone(),
        status: "Exporting",
        download_uri: String::new(),
    };
    let view = export.view();
    it.exports.push(export);
    Ok((view, pid, iid, platform, flavor))
}

async fn finish_export(
    s: &S,
    project: Uuid,
    iteration: Uuid,
    platform: String,
    flavor: Option<String>,
) {
    let (queue, container, mut fail, package) = {
        let mut w = s.world();
        let fail = w
            .faults
            .fail_export_platforms
            .iter()
            .any(|p| p.eq_ignore_ascii_case(&platform));
        let Ok(p) = w.project(project) else {
            return;
        };
        let (queue, container) = (
            p.queue.as_ref().map(|q| q.name.clone()),
            p.container.clone(),
        );
        let package = package_of(p, iteration, &platform, flavor.as_deref());
        (queue, container, fail, package)
    };
    let blob_name = format!("{project} - {iteration}.{platform}");
    let mut model_uri = None;
    let mut download_uri = String::new();
    let body = if fail {
        Vec::new()
    } else {
        package.zip(s.config.model_size).unwrap_or_else(|e| {
            // Cannot happen writing to memory; the export fails as the service's would.
            tracing::warn!(error = %e, "stand-in could not package an export");
            fail = true;
            Vec::new()
        })
    };
    if !fail && let Some(st) = &s.config.storage {
        // The service's own copy, reachable through a SAS: GetExports' downloadUri.
        let internal_name = format!(
            "{project}/{iteration}/{}.zip",
            match &flavor {
                Some(f) => format!("{platform}-{f}"),
                None => platform.clone(),
            }
        );
        match storage::upload(st, INTERNAL_CONTAINER, &internal_name, &body).await {
            Ok(url) => {
                download_uri = storage::with_sas(st, &url, INTERNAL_CONTAINER, &internal_name)
            }
            Err(e) => tracing::warn!(error = %e, "stand-in could not store an export"),
        }
        // The backup in the user's container, named as the documentation says.
        model_uri = match &container {
            Some(c) => match storage::upload(st, &c.name, &blob_name, &body).await {
                Ok(_) => Some(format!(
                    "{}/{}",
                    c.url,
                    percent_encoding::utf8_percent_encode(&blob_name, URL_PATH_ESCAPE)
                )),
                Err(e) => {
                    tracing::warn!(error = %e, container = %c.name, "stand-in could not write a model backup");
                    Some(download_uri.clone())
                }
            },
            None => Some(download_uri.clone()),
        };
    }
    {
        let mut w = s.world();
        if let Ok(p) = w.project(project)
            && let Ok(it) = p.iteration(iteration)
            && let Some(e) = it
                .exports
                .iter_mut()
                .find(|e| e.platform == platform && e.flavor == flavor)
        {
            e.status = if fail { "Failed" } else { "Done" };
            e.download_uri = download_uri;
        }
    }
    if let (Some(st), Some(queue)) = (&s.config.storage, queue) {
        let n = Notification::Export {
            project_id: project,
            iteration_id: iteration,
            status: if fail {
                ExportStatus::Failed
            } else {
                ExportStatus::Completed
            },
            model_uri: if fail { None } else { model_uri },
        };
        storage::notify(st, &queue, &n, s.config.base64_messages).await;
    }
}

/// What the export of `iteration` holds: its tags, classification type and training time (an
/// iteration deleted while exporting leaves the project's type and no tags).
fn package_of(
    p: &mut ProjectState,
    iteration: Uuid,
    platform: &str,
    flavor: Option<&str>,
) -> ExportPackage {
    let project = p.id;
    let mut package = ExportPackage {
        project,
        iteration,
        platform: platform.to_owned(),
        flavor: flavor.map(str::to_owned),
        multilabel: p.classification_type.eq_ignore_ascii_case("Multilabel"),
        labels: Vec::new(),
        trained_at: String::new(),
    };
    if let Ok(it) = p.iteration(iteration) {
        package.multilabel = it.classification_type.eq_ignore_ascii_case("Multilabel");
        package.labels = it.tags.iter().map(|(_, name)| name.clone()).collect();
        package.trained_at = it.trained_at.clone().unwrap_or_default();
    }
    package
}
