//! Where an exported model is copied from and to, decided without I/O: which source URL is safe
//! to use, the release blob's readable path, its tags and metadata, and whether an existing copy
//! is current.

use crate::customvision::Export;
use std::collections::BTreeMap;
use url::Url;
use uuid::Uuid;

/// The default release path: readable, deterministic, one blob per export.
pub const DEFAULT_TEMPLATE: &str = "{projectName}/{iterationName}/{platform}-{flavor}.zip";
pub const DEFAULT_CONTAINER: &str = "models";
const TOKENS: &[&str] = &[
    "projectName",
    "projectId",
    "iterationName",
    "iterationId",
    "platform",
    "flavor",
];
/// A channel path names no iteration: it is the stable place a channel's model is fetched from.
const CHANNEL_TOKENS: &[&str] = &["projectName", "projectId", "platform", "flavor", "channel"];

/// `CVCHAIN_RELEASE_PATH` or `CVCHAIN_CHANNEL_PATH`: text with `{token}`s, checked once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate(String);

/// The `{token}`s of a template, each known.
fn tokens<'a>(text: &'a str, known: &[&str]) -> Result<Vec<&'a str>, String> {
    let mut rest = text;
    let mut seen = Vec::new();
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            return Err("has a `{` without its `}`".into());
        };
        let token = &rest[start + 1..start + len];
        if !known.contains(&token) {
            return Err(format!(
                "unknown token {{{token}}}; known: {}",
                known
                    .iter()
                    .map(|t| format!("{{{t}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        seen.push(token);
        rest = &rest[start + len + 1..];
    }
    Ok(seen)
}

impl PathTemplate {
    /// A release path template (`CVCHAIN_RELEASE_PATH`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("must not be empty".into());
        }
        let seen = tokens(t, TOKENS)?;
        // Without the platform (and flavor) two exports of one iteration would share a blob.
        if !seen.contains(&"platform") || !seen.contains(&"flavor") {
            return Err("must contain {platform} and {flavor}, or exports would collide".into());
        }
        if !seen
            .iter()
            .any(|t| *t == "iterationName" || *t == "iterationId")
            || !seen
                .iter()
                .any(|t| *t == "projectName" || *t == "projectId")
        {
            return Err(
                "must name the project and the iteration ({projectName} or {projectId}, {iterationName} or {iterationId})"
                    .into(),
            );
        }
        Ok(Self(t.to_owned()))
    }

    /// A channel path template (`CVCHAIN_CHANNEL_PATH`): the release tokens but the
    /// iteration's, plus `{channel}`.
    pub fn parse_channel(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("must not be empty".into());
        }
        let seen = tokens(t, CHANNEL_TOKENS)?;
        if !seen.contains(&"channel") || !seen.contains(&"platform") || !seen.contains(&"flavor") {
            return Err(
                "must contain {channel}, {platform} and {flavor}, or channels would collide".into(),
            );
        }
        if !seen
            .iter()
            .any(|t| *t == "projectName" || *t == "projectId")
        {
            return Err("must name the project ({projectName} or {projectId})".into());
        }
        Ok(Self(t.to_owned()))
    }

    /// The blob path of a channel's copy of an export: [`PathTemplate::render`] with
    /// `{channel}`.
    pub fn render_channel(&self, names: &ReleaseNames, channel: &str, qualify: bool) -> String {
        PathTemplate(self.0.replace("{channel}", &sanitize(channel))).render(names, qualify)
    }

    /// The blob path for an export. Names are sanitized; with `qualify`, each name is followed
    /// by its id (used when the plain path belongs to another project or iteration). An absent
    /// flavor drops the separator before it.
    pub fn render(&self, names: &ReleaseNames, qualify: bool) -> String {
        let name_or_id = |name: &str, id: Uuid| {
            let clean = sanitize(name);
            if clean.is_empty() {
                id.to_string()
            } else if qualify {
                format!("{clean}-{id}")
            } else {
                clean
            }
        };
        let flavor = names.flavor.as_deref().map(sanitize).unwrap_or_default();
        let mut out = self.0.clone();
        for (token, value) in [
            (
                "projectName",
                name_or_id(&names.project_name, names.project_id),
            ),
            ("projectId", names.project_id.to_string()),
            (
                "iterationName",
                name_or_id(&names.iteration_name, names.iteration_id),
            ),
            ("iterationId", names.iteration_id.to_string()),
            ("platform", sanitize(&names.platform)),
            ("flavor", flavor.clone()),
        ] {
            out = out.replace(&format!("{{{token}}}"), &value);
        }
        if flavor.is_empty() {
            for (from, to) in [
                ("-.", "."),
                ("_.", "."),
                ("--", "-"),
                ("/-", "/"),
                ("-/", "/"),
            ] {
                out = out.replace(from, to);
            }
            out = out.trim_end_matches(['-', '_']).to_owned();
        }
        // No empty segments, no `.` or `..` segments.
        out.split('/')
            .filter(|s| !s.is_empty() && *s != "." && *s != "..")
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// What a release path is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseNames {
    pub project_id: Uuid,
    pub project_name: String,
    pub iteration_id: Uuid,
    pub iteration_name: String,
    pub platform: String,
    pub flavor: Option<String>,
}

/// Letters, digits, `.`, `_` and `-`; runs of anything else become one `-`.
pub fn sanitize(name: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            out.push(c);
            dash = false;
        } else if !dash {
            out.push('-');
            dash = true;
        }
    }
    let out = out.trim_matches(['-', '.']).to_owned();
    out.chars().take(100).collect()
}

/// Where the message's `modelUri` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelUri {
    /// Absent or empty.
    None,
    /// A blob in the configured backup container; the name is decoded.
    InBackup { blob_name: String },
    /// Anywhere else: never fetched.
    Refused { reason: String },
}

/// Accepts a `modelUri` only inside the backup container (same scheme, host, port and container
/// path), so a forged message cannot make cvchain read from anywhere else.
pub fn classify_model_uri(model_uri: Option<&str>, backup: Option<&Url>) -> ModelUri {
    let Some(raw) = model_uri.filter(|u| !u.trim().is_empty()) else {
        return ModelUri::None;
    };
    let Some(backup) = backup else {
        return ModelUri::Refused {
            reason: "no backup container is configured (CVCHAIN_BACKUP_CONTAINER)".into(),
        };
    };
    let Ok(url) = Url::parse(raw.trim()) else {
        return ModelUri::Refused {
            reason: "not a URL".into(),
        };
    };
    let same_origin = url.scheme() == backup.scheme()
        && url.host_str().map(str::to_ascii_lowercase)
            == backup.host_str().map(str::to_ascii_lowercase)
        && url.port_or_known_default() == backup.port_or_known_default();
    let prefix = format!("{}/", backup.path().trim_end_matches('/'));
    let inside = same_origin
        && url.path().starts_with(&prefix)
        && url.username().is_empty()
        && url.password().is_none();
    if !inside {
        return ModelUri::Refused {
            reason: "outside the backup container".into(),
        };
    }
    let encoded = &url.path()[prefix.len()..];
    match percent_encoding::percent_decode_str(encoded).decode_utf8() {
        Ok(name) if !name.is_empty() && !name.split('/').any(|s| s == ".." || s == ".") => {
            ModelUri::InBackup {
                blob_name: name.into_owned(),
            }
        }
        _ => ModelUri::Refused {
            reason: "not a blob name".into(),
        },
    }
}

/// The backup blob Custom Vision writes for an export.
pub fn backup_blob_name(project: Uuid, iteration: Uuid, platform: &str) -> String {
    format!("{project} - {iteration}.{platform}")
}

/// Where one export is copied from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The backup blob, in cvchain's own storage account.
    Backup { blob_name: String },
    /// GetExports' `downloadUri` (a SAS URL Custom Vision reported; not logged as is).
    Download { url: String },
}

/// One release to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasePlan {
    pub platform: String,
    pub flavor: Option<String>,
    pub source: Source,
    /// GetExports' `downloadUri`, tried when the backup blob is not there.
    pub fallback: Option<String>,
    /// Nothing recorded a release of this export: its destination is expected free, so the
    /// copy goes out conditional on that (`If-None-Match: *`) without reading it first; a
    /// destination that is there after all is read and judged as usual.
    pub expect_free: bool,
}

/// The releases for an iteration's finished exports. The backup blob is used when it can only
/// be this export's (the name carries no flavor, so not when two flavors of one platform are
/// done) and the message pointed there or a backup container is configured; otherwise the
/// `downloadUri` GetExports reports, which comes from the Training API, not from the message.
pub fn plan_releases(
    project: Uuid,
    iteration: Uuid,
    exports: &[Export],
    model_uri: &ModelUri,
    backup_configured: bool,
) -> Vec<ReleasePlan> {
    let done: Vec<&Export> = exports.iter().filter(|e| e.is_done()).collect();
    done.iter()
        .filter_map(|e| {
            let same_platform = done
                .iter()
                .filter(|o| o.platform.eq_ignore_ascii_case(&e.platform))
                .count();
            let download = e
                .download_uri
                .as_deref()
                .filter(|u| Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "https" | "http")))
                .map(str::to_owned);
            let backup_name = backup_blob_name(project, iteration, &e.platform);
            // Blob names are case-sensitive: `… .onnx` is another blob than `… .ONNX`.
            let pointed_here =
                matches!(model_uri, ModelUri::InBackup { blob_name } if *blob_name == backup_name);
            let source = if same_platform == 1 && (pointed_here || backup_configured) {
                Source::Backup {
                    blob_name: match model_uri {
                        ModelUri::InBackup { blob_name } if pointed_here => blob_name.clone(),
                        _ => backup_name,
                    },
                }
            } else {
                Source::Download {
                    url: download.clone()?,
                }
            };
            let fallback = match source {
                Source::Backup { .. } => download,
                Source::Download { .. } => None,
            };
            Some(ReleasePlan {
                platform: e.platform.clone(),
                flavor: e.flavor.clone().filter(|f| !f.is_empty()),
                source,
                fallback,
                expect_free: false,
            })
        })
        .collect()
}

/// Blob index tags: keys and values use only the characters Azure allows (letters, digits,
/// space, `+ - . / : = _`), at most 10 tags, values up to 256 characters.
pub fn index_tags(
    project: Uuid,
    iteration: Uuid,
    platform: &str,
    flavor: Option<&str>,
) -> BTreeMap<String, String> {
    let clean = |v: &str| -> String {
        v.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || " +-./:=_".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(256)
            .collect()
    };
    let mut tags = BTreeMap::new();
    tags.insert("projectId".to_owned(), project.to_string());
    tags.insert("iterationId".to_owned(), iteration.to_string());
    tags.insert("platform".to_owned(), clean(platform));
    if let Some(f) = flavor.filter(|f| !f.is_empty()) {
        tags.insert("flavor".to_owned(), clean(f));
    }
    tags.insert("source".to_owned(), "customvision".to_owned());
    tags
}

/// The `x-ms-tags` form: `k=v&k=v`, URL-encoded.
pub fn tags_header(tags: &BTreeMap<String, String>) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(tags.iter())
        .finish()
}

/// Metadata values travel as HTTP headers: printable ASCII only, so anything else (and `%`)
/// is percent-encoded as UTF-8.
pub fn metadata_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c.is_ascii() && !c.is_ascii_control() && c != '%' {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// What the release copy's metadata records about its source.
pub const META_SOURCE_ETAG: &str = "sourceetag";
pub const META_SOURCE_LENGTH: &str = "sourcelength";
pub const META_PROJECT_ID: &str = "projectid";
pub const META_ITERATION_ID: &str = "iterationid";

/// What one release did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// The release blob's URL, without any SAS.
    pub url: String,
    /// Its path in the release container.
    pub path: String,
    pub size: u64,
    /// Copy duration; 0 when the copy was already current.
    pub millis: u64,
    /// False when the destination already held this export and nothing was written.
    pub copied: bool,
    /// The release copy's ETag and Content-MD5 (base64), when the release read them: a channel
    /// copy made from it in the same invocation needs not read them again.
    pub etag: Option<String>,
    pub content_md5: Option<String>,
}

/// What the release metadata says besides names and ids.
#[derive(Debug, Clone, Default)]
pub struct ReleaseFacts {
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub exported_at: String,
}

/// The release copy's metadata: names and ids, the facts, and the source it was copied from
/// (its URL without a SAS, its ETag and length, which make a later copy of it a no-op).
pub fn release_metadata(
    names: &ReleaseNames,
    facts: &ReleaseFacts,
    source: &str,
    etag: &str,
    len: u64,
) -> std::collections::HashMap<String, String> {
    let mut m = std::collections::HashMap::new();
    m.insert(META_PROJECT_ID.into(), names.project_id.to_string());
    m.insert(META_ITERATION_ID.into(), names.iteration_id.to_string());
    m.insert("projectname".into(), metadata_value(&names.project_name));
    m.insert(
        "iterationname".into(),
        metadata_value(&names.iteration_name),
    );
    m.insert("platform".into(), metadata_value(&names.platform));
    if let Some(f) = &names.flavor {
        m.insert("flavor".into(), metadata_value(f));
    }
    if let Some(p) = facts.precision {
        m.insert("precision".into(), format!("{p:.4}"));
    }
    if let Some(r) = facts.recall {
        m.insert("recall".into(), format!("{r:.4}"));
    }
    m.insert("exportedat".into(), facts.exported_at.clone());
    // A URL is already percent-encoded: encoded again, `%20` would read `%2520`.
    let source = crate::redact::url_without_secrets(source);
    m.insert(
        "source".into(),
        if source.bytes().all(|b| b.is_ascii_graphic()) {
            source
        } else {
            metadata_value(&source)
        },
    );
    m.insert(META_SOURCE_ETAG.into(), etag.to_owned());
    m.insert(META_SOURCE_LENGTH.into(), len.to_string());
    m
}

/// A copy is current when it records the source's ETag and length.
pub fn is_current(
    dest_metadata: &std::collections::HashMap<String, String>,
    source_etag: &str,
    source_length: u64,
) -> bool {
    let get = |k: &str| {
        dest_metadata
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
    };
    get(META_SOURCE_ETAG) == Some(source_etag.trim_matches('"'))
        && get(META_SOURCE_LENGTH) == Some(source_length.to_string().as_str())
}

/// Where a copy into a destination blob stands (its `x-ms-copy-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    /// Not written by a copy.
    None,
    Pending,
    Success,
    /// Failed or aborted: the blob holds no usable model.
    Failed,
}

/// What to do about a destination before copying into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforeCopy {
    /// It already holds this source: nothing to write.
    Current,
    /// A copy into it is still running (started by a holder whose claim lapsed, or by a
    /// delivery that gave up waiting): wait for it to end, then look again, rather than start
    /// a second copy of the same model.
    AwaitCopy,
    Copy,
}

/// Decides from the destination's metadata and copy state. A copy that failed or has not
/// ended is never taken for a current one, whatever its metadata says.
pub fn before_copy(
    dest_metadata: &std::collections::HashMap<String, String>,
    copy: CopyState,
    source_etag: &str,
    source_length: u64,
) -> BeforeCopy {
    match copy {
        CopyState::Pending => BeforeCopy::AwaitCopy,
        CopyState::Failed => BeforeCopy::Copy,
        CopyState::None | CopyState::Success
            if is_current(dest_metadata, source_etag, source_length) =>
        {
            BeforeCopy::Current
        }
        _ => BeforeCopy::Copy,
    }
}

/// Whether a blob at the plain path belongs to another project or iteration.
pub fn belongs_elsewhere(
    dest_metadata: &std::collections::HashMap<String, String>,
    project: Uuid,
    iteration: Uuid,
) -> bool {
    let get = |k: &str| {
        dest_metadata
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    match (get(META_PROJECT_ID), get(META_ITERATION_ID)) {
        (Some(p), Some(i)) => p != project.to_string() || i != iteration.to_string(),
        // Not ours at all (someone else's file): do not overwrite it.
        _ => true,
    }
}

#[cfg(test)]
mod tests;
