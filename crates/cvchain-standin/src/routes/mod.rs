//! The Training API's routes for each version, the gate every call passes (authentication, call
//! counting, injected faults), and the stand-in's own `/_standin/…` endpoints.

mod exports;
mod images;
mod iterations;
mod projects;

use crate::api::{ApiError, error};
use crate::faults::{ExportCall, Faults, next_f64};
use crate::spec::ApiVersion;
use crate::state::S;
use axum::{
    Extension, Json, Router,
    extract::{DefaultBodyLimit, Path, Request, State},
    http::{HeaderValue, StatusCode, Uri},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;
use std::{collections::HashMap, time::Duration};
use uuid::Uuid;

/// Batches of up to 64 images of up to 6 MB.
const BODY_LIMIT: usize = 400 * 1024 * 1024;

pub fn router(shared: S) -> Router {
    let mut inner = Router::new();
    for version in ApiVersion::ALL {
        inner = inner.nest(
            &format!("/customvision/{}/training", version.path()),
            api(shared.clone(), version),
        );
    }
    let inner = inner
        .route("/_standin/faults", post(set_faults).get(get_faults))
        .route("/_standin/calls", get(get_calls))
        .route("/_standin/images/{project}/{image}", get(get_image_bytes))
        .fallback(|uri: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "{} is not a Training API path (the stand-in serves /customvision/v3.3/training and /customvision/v3.4-preview/training)",
                    uri.path()
                ),
            )
        })
        .with_state(shared);
    // Runs before routing: `Training` in any casing reaches the same routes.
    Router::new()
        .fallback_service(inner)
        .layer(middleware::map_request(normalize_path))
}

fn api(shared: S, version: ApiVersion) -> Router<S> {
    Router::new()
        .route("/domains", get(projects::get_domains))
        .route("/domains/{domain}", get(projects::get_domain))
        .route(
            "/projects",
            get(projects::get_projects).post(projects::create_project),
        )
        .route(
            "/projects/{project}",
            get(projects::get_project)
                .patch(projects::update_project)
                .delete(projects::delete_project),
        )
        .route(
            "/projects/{project}/tags",
            get(images::get_tags).post(images::create_tag),
        )
        .route(
            "/projects/{project}/tags/{tag}",
            get(images::get_tag).delete(images::delete_tag),
        )
        .route(
            "/projects/{project}/images",
            get(images::get_images)
                .post(images::create_images_from_data)
                .delete(images::delete_images),
        )
        .route("/projects/{project}/images/count", get(images::image_count))
        .route(
            "/projects/{project}/images/files",
            post(images::create_images_from_files),
        )
        .route(
            "/projects/{project}/images/urls",
            post(images::create_images_from_urls),
        )
        .route(
            "/projects/{project}/images/tags",
            post(images::create_image_tags),
        )
        .route(
            "/projects/{project}/images/tagged",
            get(images::get_tagged_images),
        )
        .route(
            "/projects/{project}/images/tagged/count",
            get(images::tagged_image_count),
        )
        .route(
            "/projects/{project}/images/untagged",
            get(images::get_untagged_images),
        )
        .route(
            "/projects/{project}/images/untagged/count",
            get(images::untagged_image_count),
        )
        .route("/projects/{project}/train", post(iterations::train_project))
        .route(
            "/projects/{project}/iterations",
            get(iterations::get_iterations),
        )
        .route(
            "/projects/{project}/iterations/{iteration}",
            get(iterations::get_iteration)
                .patch(iterations::update_iteration)
                .delete(iterations::delete_iteration),
        )
        .route(
            "/projects/{project}/iterations/{iteration}/performance",
            get(iterations::get_performance),
        )
        .route(
            "/projects/{project}/iterations/{iteration}/export",
            get(exports::get_exports).post(exports::export_iteration),
        )
        .route(
            "/projects/{project}/iterations/{iteration}/publish",
            post(iterations::publish_iteration).delete(iterations::unpublish_iteration),
        )
        .fallback(|uri: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} is not an operation of this API", uri.path()),
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "BadRequestNotSupported",
                "The method is not supported for this resource",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(shared, gate))
        .layer(Extension(version))
}

/// `/customvision/{version}/Training/…` in any casing → `…/training/…`.
async fn normalize_path(mut req: Request) -> Request {
    let path = req.uri().path();
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() > 3
        && segments[1].eq_ignore_ascii_case("customvision")
        && segments[3].eq_ignore_ascii_case("training")
        && (segments[1] != "customvision" || segments[3] != "training")
    {
        let mut fixed: Vec<&str> = segments.clone();
        fixed[1] = "customvision";
        fixed[3] = "training";
        let mut rebuilt = fixed.join("/");
        if let Some(q) = req.uri().query() {
            rebuilt = format!("{rebuilt}?{q}");
        }
        if let Ok(uri) = rebuilt.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// The operation a request is, for the call log (its path relative to the version's base).
fn operation_name(method: &str, path: &str) -> &'static str {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("GET", ["domains"]) => "GetDomains",
        ("GET", ["domains", _]) => "GetDomain",
        ("GET", ["projects"]) => "GetProjects",
        ("POST", ["projects"]) => "CreateProject",
        ("GET", ["projects", _]) => "GetProject",
        ("PATCH", ["projects", _]) => "UpdateProject",
        ("DELETE", ["projects", _]) => "DeleteProject",
        ("GET", ["projects", _, "tags"]) => "GetTags",
        ("POST", ["projects", _, "tags"]) => "CreateTag",
        ("GET", ["projects", _, "tags", _]) => "GetTag",
        ("DELETE", ["projects", _, "tags", _]) => "DeleteTag",
        ("GET", ["projects", _, "images"]) => "GetImages",
        ("POST", ["projects", _, "images"]) => "CreateImagesFromData",
        ("DELETE", ["projects", _, "images"]) => "DeleteImages",
        ("GET", ["projects", _, "images", "count"]) => "GetImageCount",
        ("POST", ["projects", _, "images", "files"]) => "CreateImagesFromFiles",
        ("POST", ["projects", _, "images", "urls"]) => "CreateImagesFromUrls",
        ("POST", ["projects", _, "images", "tags"]) => "CreateImageTags",
        ("GET", ["projects", _, "images", "tagged"]) => "GetTaggedImages",
        ("GET", ["projects", _, "images", "tagged", "count"]) => "GetTaggedImageCount",
        ("GET", ["projects", _, "images", "untagged"]) => "GetUntaggedImages",
        ("GET", ["projects", _, "images", "untagged", "count"]) => "GetUntaggedImageCount",
        ("POST", ["projects", _, "train"]) => "TrainProject",
        ("GET", ["projects", _, "iterations"]) => "GetIterations",
        ("GET", ["projects", _, "iterations", _]) => "GetIteration",
        ("PATCH", ["projects", _, "iterations", _]) => "UpdateIteration",
        ("DELETE", ["projects", _, "iterations", _]) => "DeleteIteration",
        ("GET", ["projects", _, "iterations", _, "performance"]) => "GetIterationPerformance",
        ("GET", ["projects", _, "iterations", _, "export"]) => "GetExports",
        ("POST", ["projects", _, "iterations", _, "export"]) => "ExportIteration",
        ("POST", ["projects", _, "iterations", _, "publish"]) => "PublishIteration",
        ("DELETE", ["projects", _, "iterations", _, "publish"]) => "UnpublishIteration",
        _ => "Unknown",
    }
}

/// Authentication, call counting and fault injection, before any operation runs.
async fn gate(State(s): State<S>, req: Request, next: Next) -> Response {
    let op = operation_name(req.method().as_str(), req.uri().path());
    let key_ok = req
        .headers()
        .get("training-key")
        .or_else(|| req.headers().get("ocp-apim-subscription-key"))
        .and_then(|v| v.to_str().ok())
        .is_some_and(|k| k == s.config.training_key);
    let bearer = match (&s.config.accept_bearer, req.headers().get("authorization")) {
        (Some(token), Some(v)) => v.to_str().ok() == Some(format!("Bearer {token}").as_str()),
        _ => false,
    };
    let authenticated = key_ok || bearer;
    let (throttled, fault, slow, retry_after) = {
        let mut st = s.world();
        let now = s.started.elapsed();
        let ms = now.as_millis() as u64;
        st.calls.timeline_ms.push(ms);
        // The resource's calls per second, for every caller together; a refused call is not
        // served, so it does not count against the second.
        if authenticated && let Err(wait) = st.admit(now) {
            *st.calls.throttled.entry(op.to_owned()).or_default() += 1;
            st.calls.throttled_ms.push(ms);
            (Some(wait), None, None, 0)
        } else {
            *st.calls.counts.entry(op.to_owned()).or_default() += 1;
            let f = st.faults.clone();
            let roll = next_f64(&mut st.rng);
            let fault = if roll < f.failure_rate {
                let share = f.throttle_share.unwrap_or(0.5).clamp(0.0, 1.0);
                Some(if roll < f.failure_rate * share {
                    429
                } else {
                    500
                })
            } else {
                None
            };
            let slow = next_f64(&mut st.rng) < f.slow_rate;
            if fault.is_some() {
                *st.calls.faults.entry(op.to_owned()).or_default() += 1;
                if op == "ExportIteration" {
                    st.calls.exports.push(export_call(req.uri(), "fault"));
                }
            }
            (
                None,
                fault,
                slow.then_some(f.slow_ms),
                f.retry_after_seconds,
            )
        }
    };
    if !authenticated {
        // The gateway's shape, not the service's: the request never reached Custom Vision.
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}})),
        )
            .into_response();
    }
    if let Some(wait) = throttled {
        // Whole seconds, rounded up: the header counts seconds.
        return too_many_requests(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
    }
    if let Some(ms) = slow {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match fault {
        Some(429) => too_many_requests(retry_after),
        Some(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ErrorUnknown",
            "An internal error occurred (injected by the stand-in)",
        ),
        None => next.run(req).await,
    }
}

/// 429 as the service answers it over its calls-per-second limit.
fn too_many_requests(retry_after_seconds: u64) -> Response {
    let mut rsp = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({"error": {"code": "429", "message": "Requests to the Custom Vision Training API have exceeded rate limit. Please retry after 1 second."}})),
    )
        .into_response();
    rsp.headers_mut().insert(
        "retry-after",
        HeaderValue::from_str(&retry_after_seconds.to_string()).expect("digits"),
    );
    rsp
}

pub(crate) fn export_call(uri: &Uri, outcome: &str) -> ExportCall {
    let segs: Vec<&str> = uri.path().split('/').collect();
    let id = |name: &str| {
        segs.iter()
            .position(|s| *s == name)
            .and_then(|i| segs.get(i + 1))
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_default()
    };
    let q: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    ExportCall {
        project_id: id("projects"),
        iteration_id: id("iterations"),
        platform: q.get("platform").cloned().unwrap_or_default(),
        flavor: q.get("flavor").cloned(),
        outcome: outcome.into(),
    }
}

async fn set_faults(State(s): State<S>, Json(f): Json<Faults>) -> Json<Faults> {
    s.world().faults = f.clone();
    Json(f)
}

async fn get_faults(State(s): State<S>) -> Json<Faults> {
    Json(s.world().faults.clone())
}

async fn get_calls(State(s): State<S>) -> Json<crate::faults::CallLog> {
    Json(s.world().calls.clone())
}

/// The image bytes behind an image's `originalImageUri`.
async fn get_image_bytes(
    State(s): State<S>,
    Path((p, i)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (pid, iid) = (crate::api::parse_id(&p)?, crate::api::parse_id(&i)?);
    let mut w = s.world();
    let project = w.project(pid)?;
    let image =
        project.images.iter().find(|x| x.id == iid).ok_or_else(|| {
            ApiError::not_found("NotFoundImage", format!("Image {iid} not found"))
        })?;
    Ok((
        [("content-type", "application/octet-stream")],
        image.bytes.as_ref().clone(),
    )
        .into_response())
}
