//! Release channels in the release container: the manifest (`{projectName}/channels.json`),
//! read and written with ETag conditions so concurrent updates never lose one, and the channel
//! copies, server-side copies of release copies that converge on the manifest's newest revision.
//! What moves is decided in `cvchain_core::channels`.

use super::{StorageError, clients::StorageClients};
use azure_core::http::{RequestContent, StatusCode};
use azure_storage_blob::{
    BlobClient, BlobContainerClient,
    models::{
        BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders,
        BlobClientStartCopyFromUrlOptions, BlockBlobClientUploadOptions, CopyStatus,
    },
};
use cvchain_core::chain::ExportTarget;
use cvchain_core::channels::{
    Change, Channel, MAX_MANIFEST_BYTES, MAX_REVISION, Manifest, ManifestError, Move, Paths,
    before_sync, channel_metadata, manifest_path,
};
use cvchain_core::release::{BeforeCopy, CopyState, index_tags, tags_header};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use uuid::Uuid;

const SERVICE: &str = "blob";
/// Conflicting writers retry this many times before the message is retried as a whole.
const ATTEMPTS: usize = 8;

fn err(e: azure_core::Error) -> StorageError {
    StorageError::from_azure(SERVICE, &e)
}

/// Why the channels could not be updated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The manifest blob is not one cvchain can use; it is left alone.
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("the manifest {path} kept changing under {ATTEMPTS} attempts")]
    Contended { path: String },
}

impl ChannelError {
    /// Storage trouble and contention pass; a manifest someone must fix does not.
    pub fn is_transient(&self) -> bool {
        match self {
            ChannelError::Storage(e) => e.is_transient(),
            ChannelError::Manifest(_) => false,
            ChannelError::Contended { .. } => true,
        }
    }
}

/// Whether a change to a manifest needs writing.
pub trait Changed {
    fn changed(&self) -> bool;
}

impl Changed for Change {
    fn changed(&self) -> bool {
        !self.is_empty()
    }
}

impl Changed for bool {
    fn changed(&self) -> bool {
        *self
    }
}

/// A manifest as read, with what a conditional write needs.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: String,
    pub manifest: Manifest,
    /// `None`: there is no manifest yet (the write must not overwrite one that appears).
    pub etag: Option<String>,
}

/// A blob's properties as the channel code reads them.
struct BlobProps {
    meta: HashMap<String, String>,
    etag: String,
    len: u64,
    md5: Option<Vec<u8>>,
    copy: CopyState,
}

/// What a channel copy sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    Copied,
    /// The copy already held this revision or a newer one.
    Current,
    /// The channel path holds a blob that is not this project's channel copy (another project
    /// of the same name won the race for it, or someone put a file there): nothing written.
    Foreign,
}

/// A release copy as a channel move needs it: its size and Content-MD5 for the manifest, its
/// metadata to check whose model it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseCopy {
    pub size: u64,
    pub content_md5: Option<String>,
    pub metadata: HashMap<String, String>,
}

/// A blob read up to a bound.
enum Bounded {
    Fits(Vec<u8>, String),
    /// Larger than the bound: at least this many bytes (the whole length when the service
    /// said it).
    TooLarge(u64),
}

pub struct ChannelStore {
    container: BlobContainerClient,
    paths: Paths,
    copy_timeout: Duration,
}

impl std::fmt::Debug for ChannelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelStore").finish()
    }
}

impl ChannelStore {
    pub fn new(
        clients: &StorageClients,
        container: &str,
        paths: Paths,
    ) -> Result<Self, StorageError> {
        Ok(Self {
            container: clients.blob_service()?.blob_container_client(container),
            paths,
            copy_timeout: Duration::from_secs(600),
        })
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    fn blob(&self, path: &str) -> BlobClient {
        self.container.blob_client(path)
    }

    /// Reads at most `limit` + 1 bytes of a blob (one ranged GET), so a blob far larger than
    /// any manifest costs no more memory than a manifest.
    async fn get_bounded(&self, path: &str, limit: u64) -> Result<Option<Bounded>, StorageError> {
        let options = BlobClientDownloadOptions {
            range: Some((0..limit + 1).into()),
            ..Default::default()
        };
        match self.blob(path).download(Some(options)).await {
            Ok(rsp) => {
                let etag = rsp
                    .properties
                    .etag
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                // `bytes 0-N/TOTAL`: the whole length, when the service says it.
                let total = rsp
                    .headers
                    .get_optional_str(&azure_core::http::headers::HeaderName::from_static(
                        "content-range",
                    ))
                    .and_then(|r| r.rsplit('/').next()?.trim().parse::<u64>().ok());
                if let Some(total) = total.filter(|t| *t > limit) {
                    return Ok(Some(Bounded::TooLarge(total)));
                }
                let bytes = rsp.body.collect().await.map_err(err)?;
                if bytes.len() as u64 > limit {
                    return Ok(Some(Bounded::TooLarge(total.unwrap_or(bytes.len() as u64))));
                }
                Ok(Some(Bounded::Fits(bytes.to_vec(), etag)))
            }
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// A manifest blob, read within the bound and checked (`None`: there is none).
    async fn read_manifest(
        &self,
        path: &str,
        project: Uuid,
    ) -> Result<Option<Result<(Manifest, String), ManifestError>>, StorageError> {
        Ok(match self.get_bounded(path, MAX_MANIFEST_BYTES).await? {
            None => None,
            Some(Bounded::TooLarge(size)) => Some(Err(ManifestError::TooLarge {
                path: path.to_owned(),
                size,
                limit: MAX_MANIFEST_BYTES,
            })),
            Some(Bounded::Fits(bytes, etag)) => {
                Some(Manifest::parse(path, &bytes, project, &self.paths).map(|m| (m, etag)))
            }
        })
    }

    /// The project's manifest: at `{projectName}/channels.json`, or at the id-qualified path when
    /// that holds another project's. A new one when there is none yet.
    pub async fn load(
        &self,
        project: Uuid,
        project_name: &str,
        now: OffsetDateTime,
    ) -> Result<Loaded, ChannelError> {
        let mut last = None;
        for qualify in [false, true] {
            let path = manifest_path(project, project_name, qualify);
            match self.read_manifest(&path, project).await? {
                None => {
                    return Ok(Loaded {
                        path,
                        manifest: Manifest::new(project, project_name, now),
                        etag: None,
                    });
                }
                Some(read) => match read {
                    Ok((manifest, etag)) => {
                        return Ok(Loaded {
                            path,
                            manifest,
                            etag: Some(etag),
                        });
                    }
                    // Another project of the same name: it keeps its path, this one qualifies.
                    Err(e @ ManifestError::OtherProject { .. }) if !qualify => last = Some(e),
                    Err(e) => return Err(e.into()),
                },
            }
        }
        Err(last.expect("the plain path was tried").into())
    }

    /// Writes the manifest if nobody changed it since it was read; `None` when somebody did.
    pub async fn save(
        &self,
        loaded: &Loaded,
        manifest: &Manifest,
    ) -> Result<Option<String>, StorageError> {
        let mut tags = BTreeMap::new();
        tags.insert("projectId".to_owned(), manifest.project_id.to_string());
        tags.insert("manifest".to_owned(), "channels".to_owned());
        let mut options = BlockBlobClientUploadOptions {
            blob_content_type: Some("application/json".into()),
            blob_tags_string: Some(tags_header(&tags)),
            ..Default::default()
        };
        match &loaded.etag {
            Some(etag) => options.if_match = Some(etag.clone().into()),
            None => options.if_none_match = Some("*".into()),
        }
        let body = RequestContent::from(manifest.to_json());
        let blob = self.blob(&loaded.path);
        let result = match blob.upload(body.clone(), Some(options.clone())).await {
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                self.ensure_container().await?;
                blob.upload(body, Some(options)).await
            }
            other => other,
        };
        match result {
            Ok(rsp) => Ok(Some(rsp.etag.map(|e| e.to_string()).unwrap_or_default())),
            // 412: changed since read; 409: created since read (If-None-Match).
            Err(e)
                if matches!(
                    e.http_status(),
                    Some(StatusCode::PreconditionFailed | StatusCode::Conflict)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Applies `f` to the project's manifest and writes it under the ETag it was read with,
    /// reading again when another writer got there first. Returns what changed and the manifest
    /// as written (or as read, when nothing changed).
    pub async fn update<C: Changed>(
        &self,
        project: Uuid,
        project_name: &str,
        now: OffsetDateTime,
        f: impl FnMut(&mut Manifest) -> C,
    ) -> Result<(C, Loaded), ChannelError> {
        self.update_from(None, project, project_name, now, f).await
    }

    /// As `update`, starting from a manifest the caller read a moment ago (it is read again
    /// only when somebody wrote it since).
    pub async fn update_from<C: Changed>(
        &self,
        mut read: Option<Loaded>,
        project: Uuid,
        project_name: &str,
        now: OffsetDateTime,
        mut f: impl FnMut(&mut Manifest) -> C,
    ) -> Result<(C, Loaded), ChannelError> {
        let mut path = String::new();
        for _ in 0..ATTEMPTS {
            let mut loaded = match read.take() {
                Some(l) => l,
                None => self.load(project, project_name, now).await?,
            };
            path = loaded.path.clone();
            let before = loaded.manifest.clone();
            let change = f(&mut loaded.manifest);
            if !change.changed() {
                // Nothing written: the manifest stays as read.
                loaded.manifest = before;
                return Ok((change, loaded));
            }
            if let Some(etag) = self.save(&loaded, &loaded.manifest).await? {
                loaded.etag = Some(etag);
                return Ok((change, loaded));
            }
        }
        Err(ChannelError::Contended { path })
    }

    async fn properties(&self, path: &str) -> Result<Option<BlobProps>, StorageError> {
        match self.blob(path).get_properties(None).await {
            Ok(p) => Ok(Some(BlobProps {
                meta: p.metadata().map_err(err)?,
                etag: p
                    .etag()
                    .map_err(err)?
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                len: p.content_length().map_err(err)?.unwrap_or(0),
                md5: p.content_md5().map_err(err)?,
                copy: match p.copy_status().map_err(err)? {
                    None => CopyState::None,
                    Some(CopyStatus::Pending) => CopyState::Pending,
                    Some(CopyStatus::Success) => CopyState::Success,
                    Some(_) => CopyState::Failed,
                },
            })),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// A release copy's size, Content-MD5 (base64) and metadata; `None` when it is gone.
    pub async fn release_copy(
        &self,
        release_path: &str,
    ) -> Result<Option<ReleaseCopy>, StorageError> {
        use base64::Engine as _;
        Ok(self.properties(release_path).await?.map(|p| ReleaseCopy {
            size: p.len,
            content_md5: p
                .md5
                .map(|m| base64::engine::general_purpose::STANDARD.encode(m)),
            metadata: p.meta,
        }))
    }

    /// Whether `path` is free, or holds this project's channel copy.
    pub async fn free_for(&self, project: Uuid, path: &str) -> Result<bool, StorageError> {
        Ok(match self.properties(path).await? {
            None => true,
            Some(p) => owner(&p.meta) == Some(project) && is_channel(&p.meta),
        })
    }

    /// Where a new channel entry's copy goes: the plain path, unless it holds a blob of another
    /// project or one cvchain did not write; then the id-qualified path. `None` when both are
    /// taken: nothing that is not this project's is ever overwritten.
    pub async fn channel_path(
        &self,
        project: Uuid,
        project_name: &str,
        channel: Channel,
        target: &ExportTarget,
    ) -> Result<Option<String>, StorageError> {
        for qualify in [false, true] {
            let path = self
                .paths
                .channel_path(project, project_name, channel, target, qualify);
            if self.free_for(project, &path).await? {
                return Ok(Some(path));
            }
        }
        Ok(None)
    }

    /// As [`channel_path`](Self::channel_path) for several new entries at once. Their plain
    /// paths share a folder (`{projectName}/channels/` by default): one listing of it, with
    /// metadata, answers for all of them when it fits a page of [`LIST_PAGE`]; otherwise, or
    /// for a single entry, each path is looked at on its own. An id-qualified path is looked
    /// at only when its plain path is taken.
    pub async fn channel_paths(
        &self,
        project: Uuid,
        project_name: &str,
        wanted: &[(Channel, ExportTarget)],
    ) -> Result<Vec<Option<String>>, StorageError> {
        let plains: Vec<String> = wanted
            .iter()
            .map(|(c, t)| self.paths.channel_path(project, project_name, *c, t, false))
            .collect();
        let listed = match folder_of(&plains) {
            Some(folder) if plains.len() > 1 => self.list_folder(folder).await?,
            _ => None,
        };
        let Some(listed) = listed else {
            let found = futures::future::join_all(
                wanted
                    .iter()
                    .map(|(c, t)| self.channel_path(project, project_name, *c, t)),
            )
            .await;
            return found.into_iter().collect();
        };
        let mut out = Vec::with_capacity(wanted.len());
        for ((c, t), plain) in wanted.iter().zip(plains) {
            let free = match listed.get(&plain) {
                None => true,
                Some(meta) => owner(meta) == Some(project) && is_channel(meta),
            };
            if free {
                out.push(Some(plain));
                continue;
            }
            let qualified = self.paths.channel_path(project, project_name, *c, t, true);
            out.push(
                self.free_for(project, &qualified)
                    .await?
                    .then_some(qualified),
            );
        }
        Ok(out)
    }

    /// The blobs in `folder` with their metadata, when they fit one page; `None` otherwise.
    async fn list_folder(
        &self,
        folder: &str,
    ) -> Result<Option<HashMap<String, HashMap<String, String>>>, StorageError> {
        use azure_storage_blob::models::{
            BlobContainerClientListBlobsOptions, ListBlobsIncludeItem,
        };
        use futures::TryStreamExt as _;
        let options = BlobContainerClientListBlobsOptions {
            prefix: Some(folder.to_owned()),
            include: Some(vec![ListBlobsIncludeItem::Metadata]),
            maxresults: Some(LIST_PAGE),
            ..Default::default()
        };
        let mut pages = match self.container.list_blobs(Some(options)) {
            Ok(p) => p.into_pages(),
            Err(e) => return Err(err(e)),
        };
        let page = match pages.try_next().await {
            Ok(Some(page)) => page.into_model().map_err(err)?,
            Ok(None) => return Ok(Some(HashMap::new())),
            // No container yet: nothing is in it.
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                return Ok(Some(HashMap::new()));
            }
            Err(e) => return Err(err(e)),
        };
        if page.next_marker.as_deref().is_some_and(|m| !m.is_empty()) {
            return Ok(None);
        }
        Ok(Some(
            page.blob_items
                .into_iter()
                .filter_map(|b| {
                    let meta = b.metadata.and_then(|m| m.values).unwrap_or_default();
                    Some((b.name?, meta))
                })
                .collect(),
        ))
    }

    /// Brings the channel copy of a move in line with it, unless the copy already holds this
    /// revision or a newer one. Copies are conditional on the copy's ETag as read, so of two
    /// writers the older revision can never land last.
    /// `source`: the release copy's ETag and length when the caller read them a moment ago;
    /// `manifest_revision`: the manifest's revision as the caller wrote or read it.
    pub async fn sync(
        &self,
        project: Uuid,
        project_name: &str,
        mv: &Move,
        source: Option<(&str, u64)>,
        manifest_revision: u64,
    ) -> Result<Synced, StorageError> {
        let dest = self.blob(&mv.to.channel_path);
        // A first move to this channel path found it free a moment ago: copy without looking
        // again (the copy is conditional on the path being free still).
        let mut assume_free = mv.from.is_none() && mv.to.revision > 0;
        for _ in 0..ATTEMPTS {
            let current = if std::mem::take(&mut assume_free) {
                None
            } else {
                self.properties(&mv.to.channel_path).await?
            };
            if let Some(BlobProps { meta, copy, .. }) = &current {
                if owner(meta) != Some(project) || !is_channel(meta) {
                    return Ok(Synced::Foreign);
                }
                let revision = self
                    .held_revision(project, project_name, meta, manifest_revision)
                    .await?;
                match before_sync(revision, *copy, mv.to.revision) {
                    BeforeCopy::Current => return Ok(Synced::Current),
                    // Another delivery's copy is running: wait for its end and look again,
                    // never start a second copy into it.
                    BeforeCopy::AwaitCopy => match self.wait_for_copy(&dest).await {
                        Err(e @ StorageError::Unreachable { .. }) => return Err(e),
                        _ => continue,
                    },
                    BeforeCopy::Copy => {}
                }
            }
            let release = self.blob(&mv.to.release_path);
            let (source_etag, source_len) = match source {
                Some((etag, len)) => (etag.to_owned(), len),
                None => match self.properties(&mv.to.release_path).await? {
                    Some(p) => (p.etag, p.len),
                    None => {
                        return Err(StorageError::Other {
                            service: SERVICE,
                            detail: format!("the release copy {} is gone", mv.to.release_path),
                        });
                    }
                },
            };
            let mut metadata = channel_metadata(mv.channel, mv, project, project_name);
            metadata.insert("revision".into(), mv.to.revision.to_string());
            metadata.insert(
                "sourceetag".into(),
                source_etag.trim_matches('"').to_owned(),
            );
            let mut tags = index_tags(
                project,
                mv.to.iteration.id,
                &mv.target.platform,
                mv.target.flavor.as_deref(),
            );
            tags.insert("channel".into(), mv.channel.as_str().into());
            let mut options = BlobClientStartCopyFromUrlOptions {
                metadata: Some(metadata),
                blob_tags_string: Some(tags_header(&tags)),
                source_if_match: Some(source_etag.into()),
                ..Default::default()
            };
            match &current {
                Some(p) => options.if_match = Some(p.etag.clone().into()),
                None => options.if_none_match = Some("*".into()),
            }
            match dest
                .start_copy_from_url(release.url().to_string(), Some(options))
                .await
            {
                // Finished at once (a copy within the account usually is): done.
                Ok(rsp)
                    if rsp
                        .headers()
                        .get_optional_string(&azure_core::http::headers::HeaderName::from_static(
                            "x-ms-copy-status",
                        ))
                        .is_some_and(|s| s.eq_ignore_ascii_case("success")) =>
                {
                    return Ok(Synced::Copied);
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.http_status(),
                        Some(StatusCode::PreconditionFailed | StatusCode::Conflict)
                    ) =>
                {
                    // Another writer got there first: look again.
                    continue;
                }
                Err(e) => return Err(err(e)),
            }
            let size = self.wait_for_copy(&dest).await?;
            if size != source_len {
                return Err(StorageError::Other {
                    service: SERVICE,
                    detail: format!(
                        "the channel copy {} holds {size} bytes, its source {source_len}",
                        mv.to.channel_path
                    ),
                });
            }
            return Ok(Synced::Copied);
        }
        Err(StorageError::Other {
            service: SERVICE,
            detail: format!("{} kept changing while it was copied", mv.to.channel_path),
        })
    }

    /// The revision a channel copy holds, as far as it can be believed: a copy records the
    /// manifest revision it was made for, which no manifest has passed yet only if something
    /// else wrote it (a manifest since moved away and started again, a rewritten revision).
    /// Such a revision, or one out of range, counts as none, so the copy is made again rather
    /// than frozen. The manifest is read again only in that rare case.
    async fn held_revision(
        &self,
        project: Uuid,
        project_name: &str,
        meta: &HashMap<String, String>,
        manifest_revision: u64,
    ) -> Result<u64, StorageError> {
        let held = meta
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("revision"))
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .filter(|r| *r <= MAX_REVISION)
            .unwrap_or(0);
        if held <= manifest_revision {
            return Ok(held);
        }
        let now = OffsetDateTime::now_utc();
        match self.load(project, project_name, now).await {
            Ok(l) if l.manifest.revision >= held => Ok(held),
            Ok(_) | Err(ChannelError::Manifest(_)) => Ok(0),
            Err(ChannelError::Storage(e)) => Err(e),
            Err(ChannelError::Contended { .. }) => Ok(held),
        }
    }

    async fn ensure_container(&self) -> Result<(), StorageError> {
        match self.container.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status() == Some(StatusCode::Conflict) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// Polls the channel copy until its copy ends; returns its length.
    async fn wait_for_copy(&self, dest: &BlobClient) -> Result<u64, StorageError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let p = dest.get_properties(None).await.map_err(err)?;
            match p.copy_status().map_err(err)? {
                Some(CopyStatus::Success) | None => {
                    return Ok(p.content_length().map_err(err)?.unwrap_or(0));
                }
                Some(CopyStatus::Pending) => {}
                Some(other) => {
                    return Err(StorageError::Service {
                        service: SERVICE,
                        status: 500,
                        code: format!(" Copy{other:?}"),
                        message: "the channel copy did not complete".into(),
                    });
                }
            }
            if start.elapsed() > self.copy_timeout {
                return Err(StorageError::Unreachable {
                    service: SERVICE,
                    detail: "the channel copy is still pending; the next delivery looks again"
                        .into(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Every manifest in the release container (found by its index tags), optionally one
    /// project's; one that cannot be used is listed with why, naming its blob.
    pub async fn manifests(&self, project: Option<Uuid>) -> Result<Vec<Listed>, ChannelError> {
        use futures::TryStreamExt as _;
        let mut filter = "\"manifest\"='channels'".to_owned();
        if let Some(p) = project {
            filter.push_str(&format!(" AND \"projectId\"='{p}'"));
        }
        let mut pages = self
            .container
            .find_blobs_by_tags(&filter, None)
            .map_err(err)?
            .into_pages();
        let mut out = Vec::new();
        while let Some(page) = pages.try_next().await.map_err(err)? {
            for b in page.into_model().map_err(err)?.blob_items {
                let Some(name) = b.name else { continue };
                let id = b
                    .tags
                    .and_then(project_tag)
                    .and_then(|v| Uuid::parse_str(&v).ok());
                // Find Blobs by Tags returns only the tags its filter names: without a project,
                // the project comes from the blob's own tags (one Get Blob Tags each).
                let id = match id.or(project) {
                    Some(id) => Some(id),
                    None => self.project_of(&name).await?,
                };
                let Some(id) = id else { continue };
                if let Some(read) = self.read_manifest(&name, id).await? {
                    out.push(Listed {
                        project: id,
                        manifest: read.map(|(manifest, etag)| Loaded {
                            manifest,
                            path: name.clone(),
                            etag: Some(etag),
                        }),
                        path: name,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// The `projectId` among a blob's tags.
fn project_tag(tags: azure_storage_blob::models::BlobTags) -> Option<String> {
    tags.blob_tag_set
        .into_iter()
        .flatten()
        .find(|t| t.key.as_deref() == Some("projectId"))
        .and_then(|t| t.value)
}

impl ChannelStore {
    /// The project a manifest blob's own tags name (`None` when it names none, or is gone).
    async fn project_of(&self, path: &str) -> Result<Option<Uuid>, StorageError> {
        match self.blob(path).get_tags(None).await {
            Ok(rsp) => Ok(rsp
                .into_model()
                .ok()
                .and_then(project_tag)
                .and_then(|v| Uuid::parse_str(&v).ok())),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }
}

/// A manifest blob found by its tags: the manifest, or why it cannot be used.
#[derive(Debug, Clone)]
pub struct Listed {
    pub path: String,
    /// The project its tags name.
    pub project: Uuid,
    pub manifest: Result<Loaded, ManifestError>,
}

/// The project a blob's metadata names, if any.
fn owner(meta: &HashMap<String, String>) -> Option<Uuid> {
    meta.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(cvchain_core::release::META_PROJECT_ID))
        .and_then(|(_, v)| Uuid::parse_str(v).ok())
}

fn is_channel(meta: &HashMap<String, String>) -> bool {
    meta.keys().any(|k| k.eq_ignore_ascii_case("channel"))
}

/// How many blobs a listing of a channel folder may hold to answer for its paths in one
/// request (two channels of a ten-entry chain, with room to spare).
pub const LIST_PAGE: i32 = 50;

/// The folder all `paths` share (up to and including its last `/`), if any.
fn folder_of(paths: &[String]) -> Option<&str> {
    let first = paths.first()?;
    let mut common = first.len();
    for p in &paths[1..] {
        common = common.min(
            first
                .bytes()
                .zip(p.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    let folder = &first[..common];
    let end = folder.rfind('/')? + 1;
    Some(&first[..end])
}
