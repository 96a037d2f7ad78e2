//! Tags and training images: CreateTag, GetTags, GetTag, DeleteTag; images from data
//! (multipart or octet-stream), from files (base64 in JSON) and from URLs, CreateImageTags,
//! the tagged and untagged lists and counts, DeleteImages. Each image is judged as the service
//! does (format, size, duplicates), and a batch answers 200 when all were created, 207 when not.

use crate::api::{ApiError, ApiResult, Params, json_body, now_string, parse_id};
use crate::imaging::{self, Verdict};
use crate::spec::ApiVersion;
use crate::state::{ImageState, MAX_TAGS, ProjectState, S, TagState};
use axum::{
    Extension, Json,
    body::Bytes,
    extract::{FromRequest, Multipart, Path, RawQuery, Request, State},
    http::{StatusCode, header::CONTENT_TYPE},
    response::IntoResponse,
};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    sync::Arc,
};
use uuid::Uuid;

/// Images per batch, and tags per request, as the service limits them.
const MAX_BATCH: usize = 64;
const MAX_TAG_IDS: usize = 20;

pub async fn get_tags(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let id = parse_id(&project)?;
    let q = Params::parse(query.as_deref());
    let mut w = s.world();
    let p = w.project(id)?;
    if let Some(it) = q.get("iterationId") {
        p.iteration(parse_id(it)?)?;
    }
    Ok(Json(Value::Array(p.tags.iter().map(|t| p.tag_view(t)).collect())).into_response())
}

pub async fn get_tag(
    State(s): State<S>,
    Path((project, tag)): Path<(String, String)>,
) -> ApiResult {
    let (pid, tid) = (parse_id(&project)?, parse_id(&tag)?);
    let mut w = s.world();
    let p = w.project(pid)?;
    let t = find_tag(p, tid)?;
    Ok(Json(p.tag_view(t)).into_response())
}

fn find_tag(p: &ProjectState, id: Uuid) -> Result<&TagState, ApiError> {
    p.tags
        .iter()
        .find(|t| t.id == id)
        .ok_or_else(|| ApiError::not_found("NotFoundTag", format!("Tag {id} not found")))
}

pub async fn delete_tag(
    State(s): State<S>,
    Path((project, tag)): Path<(String, String)>,
) -> ApiResult {
    let (pid, tid) = (parse_id(&project)?, parse_id(&tag)?);
    let mut w = s.world();
    let p = w.project(pid)?;
    find_tag(p, tid)?;
    p.tags.retain(|t| t.id != tid);
    for i in &mut p.images {
        i.tags.retain(|(t, _)| *t != tid);
    }
    p.touch();
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn create_tag(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let id = parse_id(&project)?;
    let q = Params::parse(query.as_deref());
    let name = q.get("name").ok_or_else(|| ApiError::required("name"))?;
    if name.trim().is_empty() || name.len() > 256 {
        return Err(ApiError::bad_request(
            "BadRequestTagName",
            "A tag name must have 1 to 256 characters",
        ));
    }
    let kind = ["Regular", "Negative", "GeneralProduct"]
        .into_iter()
        .find(|k| k.eq_ignore_ascii_case(q.get("type").unwrap_or("Regular")))
        .ok_or_else(|| {
            ApiError::bad_request(
                "BadRequestTagType",
                "The tag type must be Regular, Negative or GeneralProduct",
            )
        })?;
    let mut w = s.world();
    let p = w.project(id)?;
    if p.tags.iter().any(|t| t.name.eq_ignore_ascii_case(name)) {
        return Err(ApiError::bad_request(
            "BadRequestTagNameNotUnique",
            format!("The project already has a tag named {name}"),
        ));
    }
    if kind == "Negative" && p.tags.iter().any(|t| t.kind == "Negative") {
        return Err(ApiError::bad_request(
            "BadRequestMultipleNegativeTag",
            "A project has at most one Negative tag",
        ));
    }
    if p.tags.len() >= MAX_TAGS {
        return Err(ApiError::bad_request(
            "BadRequestExceedTagPerProjectLimit",
            format!("A project holds at most {MAX_TAGS} tags"),
        ));
    }
    let tag = TagState {
        id: Uuid::new_v4(),
        name: name.to_owned(),
        description: q.get("description").map(str::to_owned),
        kind: kind.to_owned(),
    };
    let view = p.tag_view(&tag);
    p.tags.push(tag);
    p.touch();
    Ok(Json(view).into_response())
}

/// One image to add: its bytes (or why there are none) and the name the answer quotes.
struct Incoming {
    source: String,
    bytes: Result<Vec<u8>, &'static str>,
    tags: Vec<Uuid>,
}

/// Adds a batch and answers the `ImageCreateSummary`.
fn add_images(
    s: &S,
    version: ApiVersion,
    project: Uuid,
    batch: Vec<Incoming>,
    metadata: BTreeMap<String, String>,
) -> ApiResult {
    if batch.is_empty() {
        return Err(ApiError::bad_request(
            "BadRequestImageBatch",
            "The batch holds no image",
        ));
    }
    if batch.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "BadRequestExceededBatchSize",
            format!("A batch holds at most {MAX_BATCH} images"),
        ));
    }
    let endpoint = s.endpoint.get().cloned().unwrap_or_default();
    let mut w = s.world();
    let p = w.project(project)?;
    for tag in batch.iter().flat_map(|i| &i.tags) {
        find_tag(p, *tag)?;
    }
    let mut results = Vec::new();
    let mut all_ok = true;
    let now = now_string();
    for item in batch {
        let status = |name: &'static str| {
            debug_assert!(version.spec().image_statuses.contains(name));
            name
        };
        let (code, image) = match item.bytes {
            Err(why) => (status(why), None),
            Ok(bytes) => match imaging::judge(&bytes) {
                Verdict::Format => (status("ErrorImageFormat"), None),
                Verdict::Size => (status("ErrorImageSize"), None),
                Verdict::Ok { width, height } => {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    bytes.hash(&mut h);
                    let digest = h.finish();
                    let tagged = |tags: &mut Vec<(Uuid, String)>| {
                        for t in &item.tags {
                            if !tags.iter().any(|(x, _)| x == t) {
                                tags.push((*t, now.clone()));
                            }
                        }
                    };
                    if let Some(existing) = p.images.iter_mut().find(|i| i.digest == digest) {
                        tagged(&mut existing.tags);
                        let id = existing.id;
                        ("OKDuplicate", Some(id))
                    } else {
                        let mut image = ImageState {
                            id: Uuid::new_v4(),
                            created: now.clone(),
                            width,
                            height,
                            tags: Vec::new(),
                            digest,
                            bytes: Arc::new(bytes),
                            metadata: metadata.clone(),
                        };
                        tagged(&mut image.tags);
                        let id = image.id;
                        p.images.push(image);
                        ("OK", Some(id))
                    }
                }
            },
        };
        all_ok &= code == "OK";
        let image = image
            .and_then(|id| p.images.iter().find(|i| i.id == id))
            .map(|i| p.image_view(i, &endpoint));
        results.push(json!({
            "sourceUrl": item.source,
            "status": code,
            "image": image,
        }));
    }
    p.touch();
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    Ok((
        status,
        Json(json!({ "isBatchSuccessful": all_ok, "images": results })),
    )
        .into_response())
}

/// CreateImagesFromData: `multipart/form-data` (up to 64 files) or one image as the body.
pub async fn create_images_from_data(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    Path(project): Path<String>,
    RawQuery(query): RawQuery,
    req: Request,
) -> ApiResult {
    let id = parse_id(&project)?;
    let q = Params::parse(query.as_deref());
    let tags = q.ids("tagIds", MAX_TAG_IDS)?;
    let multipart = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let mut batch = Vec::new();
    if multipart {
        let unreadable = |e: String| {
            ApiError::bad_request(
                "BadRequestImageStream",
                format!("the upload cannot be read: {e}"),
            )
        };
        let mut form = Multipart::from_request(req, &())
            .await
            .map_err(|e| unreadable(e.body_text()))?;
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| unreadable(e.body_text()))?
        {
            let source = field
                .file_name()
                .or(field.name())
                .unwrap_or_default()
                .to_owned();
            let bytes = field.bytes().await.map_err(|e| unreadable(e.body_text()))?;
            batch.push(Incoming {
                source,
                bytes: Ok(bytes.to_vec()),
                tags: tags.clone(),
            });
        }
    } else {
        let bytes = Bytes::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad_request("BadRequestImageStream", e.body_text()))?;
        if bytes.is_empty() {
            return Err(ApiError::required("imageData"));
        }
        batch.push(Incoming {
            source: String::new(),
            bytes: Ok(bytes.to_vec()),
            tags,
        });
    }
    add_images(&s, version, id, batch, BTreeMap::new())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileBatch {
    #[serde(default)]
    images: Vec<FileEntry>,
    #[serde(default)]
    tag_ids: Option<Vec<Uuid>>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileEntry {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    contents: Option<String>,
    #[serde(default)]
    tag_ids: Option<Vec<Uuid>>,
}

fn entry_tags(batch: &Option<Vec<Uuid>>, own: &Option<Vec<Uuid>>) -> Result<Vec<Uuid>, ApiError> {
    let mut tags = batch.clone().unwrap_or_default();
    for t in own.iter().flatten() {
        if !tags.contains(t) {
            tags.push(*t);
        }
    }
    if tags.len() > MAX_TAG_IDS {
        return Err(ApiError::bad_request(
            "BadRequestExceedTagPerImageLimit",
            format!("An image takes at most {MAX_TAG_IDS} tags"),
        ));
    }
    Ok(tags)
}

/// CreateImagesFromFiles: `ImageFileCreateBatch`, contents in base64.
pub async fn create_images_from_files(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    Path(project): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&project)?;
    let batch: FileBatch = json_body(&body, "batch")?;
    let mut items = Vec::new();
    for e in &batch.images {
        items.push(Incoming {
            source: e.name.clone().unwrap_or_default(),
            bytes: e
                .contents
                .as_deref()
                .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
                .ok_or("ErrorImageFormat"),
            tags: entry_tags(&batch.tag_ids, &e.tag_ids)?,
        });
    }
    add_images(&s, version, id, items, batch.metadata.unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UrlBatch {
    #[serde(default)]
    images: Vec<UrlEntry>,
    #[serde(default)]
    tag_ids: Option<Vec<Uuid>>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UrlEntry {
    url: String,
    #[serde(default)]
    tag_ids: Option<Vec<Uuid>>,
}

/// CreateImagesFromUrls: the stand-in downloads each URL as the service does; one it cannot
/// fetch is `ErrorSource`.
pub async fn create_images_from_urls(
    State(s): State<S>,
    Extension(version): Extension<ApiVersion>,
    Path(project): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&project)?;
    let batch: UrlBatch = json_body(&body, "batch")?;
    s.world().project(id)?;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ErrorUnknown",
                e.to_string(),
            )
        })?;
    let mut items = Vec::new();
    for e in batch.images.iter().take(MAX_BATCH + 1) {
        let bytes = match http.get(&e.url).send().await {
            Ok(rsp) if rsp.status().is_success() => match rsp.bytes().await {
                Ok(b) => Ok(b.to_vec()),
                Err(_) => Err("ErrorSource"),
            },
            _ => Err("ErrorSource"),
        };
        items.push(Incoming {
            source: e.url.clone(),
            bytes,
            tags: entry_tags(&batch.tag_ids, &e.tag_ids)?,
        });
    }
    add_images(&s, version, id, items, batch.metadata.unwrap_or_default())
}

#[derive(Deserialize)]
struct ImageTagBatch {
    #[serde(default)]
    tags: Vec<ImageTagEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageTagEntry {
    image_id: Uuid,
    tag_id: Uuid,
}

/// CreateImageTags: tags existing images.
pub async fn create_image_tags(
    State(s): State<S>,
    Path(project): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&project)?;
    let batch: ImageTagBatch = json_body(&body, "batch")?;
    if batch.tags.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "BadRequestExceededBatchSize",
            format!("A batch holds at most {MAX_BATCH} image tags"),
        ));
    }
    let mut w = s.world();
    let p = w.project(id)?;
    let (mut created, mut duplicated, mut exceeded) = (Vec::new(), Vec::new(), Vec::new());
    let now = now_string();
    for e in &batch.tags {
        find_tag(p, e.tag_id)?;
        let image = p
            .images
            .iter_mut()
            .find(|i| i.id == e.image_id)
            .ok_or_else(|| {
                ApiError::not_found("NotFoundImage", format!("Image {} not found", e.image_id))
            })?;
        let pair = json!({"imageId": e.image_id, "tagId": e.tag_id});
        if image.tags.iter().any(|(t, _)| *t == e.tag_id) {
            duplicated.push(pair);
        } else if image.tags.len() >= MAX_TAG_IDS {
            exceeded.push(pair);
        } else {
            image.tags.push((e.tag_id, now.clone()));
            created.push(pair);
        }
    }
    p.touch();
    Ok(
        Json(json!({"created": created, "duplicated": duplicated, "exceeded": exceeded}))
            .into_response(),
    )
}

#[derive(Clone, Copy)]
enum Tagging {
    Any,
    Tagged,
    Untagged,
}

fn select<'a>(
    p: &'a ProjectState,
    q: &Params,
    tagging: Tagging,
) -> Result<Vec<&'a ImageState>, ApiError> {
    let tagging = match q.get("taggingStatus") {
        None => tagging,
        Some(t) if t.eq_ignore_ascii_case("All") => Tagging::Any,
        Some(t) if t.eq_ignore_ascii_case("Tagged") => Tagging::Tagged,
        Some(t) if t.eq_ignore_ascii_case("Untagged") => Tagging::Untagged,
        Some(t) => {
            return Err(ApiError::bad_request(
                "BadRequestInvalid",
                format!("taggingStatus must be All, Tagged or Untagged, not {t}"),
            ));
        }
    };
    let tags = q.ids("tagIds", MAX_TAG_IDS)?;
    let mut images: Vec<&ImageState> = p
        .images
        .iter()
        .filter(|i| match tagging {
            Tagging::Any => true,
            Tagging::Tagged => !i.tags.is_empty(),
            Tagging::Untagged => i.tags.is_empty(),
        })
        .filter(|i| tags.is_empty() || i.tags.iter().any(|(t, _)| tags.contains(t)))
        .collect();
    // Newest first, the service's default order.
    if !q
        .get("orderBy")
        .is_some_and(|o| o.eq_ignore_ascii_case("Oldest"))
    {
        images.reverse();
    }
    Ok(images)
}

fn list(s: &S, project: &str, query: Option<String>, tagging: Tagging) -> ApiResult {
    let id = parse_id(project)?;
    let q = Params::parse(query.as_deref());
    let take = q.int("take", 0, 256)?.unwrap_or(50) as usize;
    let skip = q.int("skip", 0, i64::MAX)?.unwrap_or(0) as usize;
    let endpoint = s.endpoint.get().cloned().unwrap_or_default();
    let mut w = s.world();
    let p = w.project(id)?;
    let images = select(p, &q, tagging)?;
    let page: Vec<Value> = images
        .into_iter()
        .skip(skip)
        .take(take)
        .map(|i| p.image_view(i, &endpoint))
        .collect();
    Ok(Json(Value::Array(page)).into_response())
}

fn count(s: &S, project: &str, query: Option<String>, tagging: Tagging) -> ApiResult {
    let id = parse_id(project)?;
    let q = Params::parse(query.as_deref());
    let mut w = s.world();
    let p = w.project(id)?;
    Ok(Json(select(p, &q, tagging)?.len()).into_response())
}

pub async fn get_images(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    list(&s, &project, q, Tagging::Any)
}

pub async fn get_tagged_images(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    list(&s, &project, q, Tagging::Tagged)
}

pub async fn get_untagged_images(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    list(&s, &project, q, Tagging::Untagged)
}

pub async fn image_count(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    count(&s, &project, q, Tagging::Any)
}

pub async fn tagged_image_count(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    count(&s, &project, q, Tagging::Tagged)
}

pub async fn untagged_image_count(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    count(&s, &project, q, Tagging::Untagged)
}

/// DeleteImages: by `imageIds`, or `allImages=true`.
pub async fn delete_images(
    State(s): State<S>,
    Path(project): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let id = parse_id(&project)?;
    let q = Params::parse(query.as_deref());
    let ids = q.ids("imageIds", 256)?;
    let all = q.bool("allImages")?.unwrap_or(false);
    if ids.is_empty() && !all {
        return Err(ApiError::required("imageIds"));
    }
    let mut w = s.world();
    let p = w.project(id)?;
    p.images.retain(|i| !all && !ids.contains(&i.id));
    p.touch();
    Ok(StatusCode::NO_CONTENT.into_response())
}
