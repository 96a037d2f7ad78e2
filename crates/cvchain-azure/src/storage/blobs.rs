//! Release copies: a server-side async Copy Blob into the release container, polled to
//! completion and verified, with index tags and metadata. Model bytes never pass through the
//! process.

use super::{StorageError, clients::StorageClients};
use azure_core::http::{StatusCode, Url};
use azure_storage_blob::{
    BlobClient, BlobContainerClient,
    models::{
        BlobClientGetPropertiesResultHeaders, BlobClientStartCopyFromUrlOptions, BlobTags,
        CopyStatus,
    },
};
use cvchain_core::redact::url_without_secrets;
use cvchain_core::release::{
    BeforeCopy, CopyState, PathTemplate, ReleaseFacts, ReleaseNames, ReleasePlan, Released, Source,
    before_copy, belongs_elsewhere, index_tags, release_metadata, tags_header,
};
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

const SERVICE: &str = "blob";

/// Why a release was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Both the plain and the id-qualified path hold blobs that are not this export's: nothing
    /// is overwritten, and retrying cannot help until someone moves one of them.
    #[error("refused: {0}")]
    Refused(String),
}

/// The release container and the sources a release may read.
pub struct ReleaseStore {
    clients: StorageClients,
    container: BlobContainerClient,
    container_name: String,
    backup_container: Option<Url>,
    template: PathTemplate,
    copy_timeout: Duration,
}

impl std::fmt::Debug for ReleaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseStore")
            .field("container", &self.container_name)
            .finish()
    }
}

fn err(e: azure_core::Error) -> StorageError {
    StorageError::from_azure(SERVICE, &e)
}

impl ReleaseStore {
    pub fn new(
        clients: &StorageClients,
        container: &str,
        backup_container: Option<Url>,
        template: PathTemplate,
    ) -> Result<Self, StorageError> {
        Ok(Self {
            container: clients.blob_service()?.blob_container_client(container),
            clients: clients.clone(),
            container_name: container.to_owned(),
            backup_container,
            template,
            copy_timeout: Duration::from_secs(600),
        })
    }

    /// How long one release waits for its copy before leaving it to the next delivery (10
    /// minutes unless set).
    pub fn with_copy_timeout(mut self, timeout: Duration) -> Self {
        self.copy_timeout = timeout;
        self
    }

    /// A client for a blob of the backup container.
    fn backup_blob(&self, name: &str) -> Result<BlobClient, StorageError> {
        let Some(base) = &self.backup_container else {
            return Err(StorageError::Other {
                service: SERVICE,
                detail: "no backup container configured".into(),
            });
        };
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|_| StorageError::Other {
                service: SERVICE,
                detail: "the backup container URL cannot hold a blob name".into(),
            })?
            .pop_if_empty()
            .extend(name.split('/'));
        self.clients.blob_at(&url)
    }

    fn download_client(&self, url: &str) -> Result<BlobClient, StorageError> {
        let parsed = Url::parse(url).map_err(|_| StorageError::Other {
            service: SERVICE,
            detail: "downloadUri is not a URL".into(),
        })?;
        self.clients.anonymous_blob(&parsed)
    }

    /// Copies one export into the release container, unless the copy there is current.
    pub async fn release(
        &self,
        plan: &ReleasePlan,
        names: &ReleaseNames,
        facts: &ReleaseFacts,
    ) -> Result<Released, ReleaseError> {
        self.release_from(plan, names, facts, None).await
    }

    /// What a release copies from, read ahead (beside taking the copy's claim, say) for
    /// [`release_from`](Self::release_from).
    pub async fn read_source(&self, plan: &ReleasePlan) -> Result<ReleaseSource, ReleaseError> {
        self.source(plan).await.map(ReleaseSource)
    }

    /// As [`release`](Self::release), with the source read ahead when given.
    pub async fn release_from(
        &self,
        plan: &ReleasePlan,
        names: &ReleaseNames,
        facts: &ReleaseFacts,
        source: Option<Result<ReleaseSource, ReleaseError>>,
    ) -> Result<Released, ReleaseError> {
        // The source and the plain destination are read together (independent round trips);
        // a destination expected free is not read: the copy is conditional on it.
        let mut path = self.template.render(names, false);
        let read_source = async {
            match source {
                Some(read) => read.map(|s| s.0),
                None => self.source(plan).await,
            }
        };
        let (source, plain_destination) = if plan.expect_free {
            (read_source.await, Ok(None))
        } else {
            tokio::join!(read_source, self.destination(&path))
        };
        let (source_client, copy_source, backup, props) = source?;
        let source_etag = props
            .etag()
            .map_err(err)?
            .map(|e| e.as_ref().trim_matches('"').to_owned())
            .unwrap_or_default();
        let source_len = props.content_length().map_err(err)?.unwrap_or(0);

        // The destination: the plain path, or the id-qualified one when the plain path holds
        // another project's or iteration's model.
        let mut existing = plain_destination?;
        if let Some(d) = &existing
            && belongs_elsewhere(&d.metadata, names.project_id, names.iteration_id)
        {
            let plain = path;
            path = self.template.render(names, true);
            existing = self.destination(&path).await?;
            // Nothing that is not this export's is overwritten, on this path either.
            if let Some(d) = &existing
                && belongs_elsewhere(&d.metadata, names.project_id, names.iteration_id)
            {
                return Err(ReleaseError::Refused(format!(
                    "{plain} and {path} in {} both hold blobs that are not this export's",
                    self.container_name
                )));
            }
        }
        let dest = self.container.blob_client(&path);
        let dest_url = self.readable_url(&path);
        let tags = index_tags(
            names.project_id,
            names.iteration_id,
            &plan.platform,
            plan.flavor.as_deref(),
        );
        // A copy still running into the destination is waited for, never started twice.
        for _ in 0..3 {
            let Some(d) = &existing else { break };
            match before_copy(&d.metadata, d.copy, &source_etag, source_len) {
                BeforeCopy::Current => {
                    return Ok(Released {
                        url: dest_url,
                        path,
                        size: source_len,
                        millis: 0,
                        copied: false,
                        etag: d.etag.clone(),
                        content_md5: None,
                    });
                }
                BeforeCopy::AwaitCopy => {
                    // Its end (failed or not) is read again below.
                    let _ = self.wait_for_copy(&dest).await;
                    existing = self.destination(&path).await?;
                }
                BeforeCopy::Copy => break,
            }
        }
        if existing
            .as_ref()
            .is_some_and(|d| d.copy == CopyState::Pending)
        {
            return Err(StorageError::Unreachable {
                service: SERVICE,
                detail: format!(
                    "a copy into {path} is still pending; the next delivery looks again"
                ),
            }
            .into());
        }

        let started = Instant::now();
        let metadata = release_metadata(names, facts, &copy_source, &source_etag, source_len);
        let options = BlobClientStartCopyFromUrlOptions {
            metadata: Some(metadata),
            blob_tags_string: Some(tags_header(&tags)),
            source_if_match: Some(props.etag().map_err(err)?.unwrap_or_else(|| "*".into())),
            // The destination as it was read: a writer that got there meanwhile is not
            // overwritten (the copy fails with 412 and the next delivery looks again).
            if_match: existing
                .as_ref()
                .and_then(|d| d.etag.clone())
                .map(Into::into),
            if_none_match: existing.is_none().then(|| "*".into()),
            ..Default::default()
        };
        // The container is created on the first 404 rather than before every copy: one request
        // fewer per release (the benchmark's request count showed it on every copy).
        // `None`: the destination expected free is not.
        let copying = async {
            match dest
                .start_copy_from_url(copy_source.clone(), Some(options.clone()))
                .await
            {
                Err(e)
                    if e.http_status() == Some(StatusCode::NotFound)
                        && is_container_missing(&e) =>
                {
                    self.ensure_container().await?;
                    Ok(Some(
                        dest.start_copy_from_url(copy_source.clone(), Some(options))
                            .await
                            .map_err(err)?,
                    ))
                }
                Err(e)
                    if plan.expect_free
                        && matches!(
                            e.http_status(),
                            Some(StatusCode::Conflict | StatusCode::PreconditionFailed)
                        ) =>
                {
                    Ok(None)
                }
                other => other.map(Some).map_err(err),
            }
        };
        // The copy request sets the destination's tags (`x-ms-tags`); only the backup needs
        // them, set beside the copy (nothing orders the two).
        let tagging = async {
            match backup {
                true => self.ensure_tags(&source_client, &tags).await,
                false => Ok(()),
            }
        };
        let (started_copy, tagged) = tokio::join!(copying, tagging);
        let Some(started_copy) = started_copy? else {
            // Expected free, and something is there: read it and judge it as usual (current,
            // a copy running, another project's, or stale).
            let plan = ReleasePlan {
                expect_free: false,
                ..plan.clone()
            };
            return Box::pin(self.release(&plan, names, facts)).await;
        };
        tagged?;
        let header = |name: &'static str| {
            started_copy
                .headers()
                .get_optional_string(&azure_core::http::headers::HeaderName::from_static(name))
        };
        // A copy that finished at once (within an account it usually does) is the source, byte
        // for byte: its ETag comes with the answer and its MD5 is the source's. Otherwise the
        // copy is polled until it ends and its length checked.
        let (size, copy_etag, copy_md5) =
            if header("x-ms-copy-status").is_some_and(|st| st.eq_ignore_ascii_case("success")) {
                use base64::Engine as _;
                let md5 = props
                    .content_md5()
                    .map_err(err)?
                    .map(|m| base64::engine::general_purpose::STANDARD.encode(m));
                (source_len, header("etag"), md5)
            } else {
                self.wait_for_copy(&dest).await?
            };
        if size != source_len {
            return Err(StorageError::Other {
                service: SERVICE,
                detail: format!(
                    "the copy of {} holds {size} bytes, the source {source_len}",
                    plan.platform
                ),
            }
            .into());
        }
        Ok(Released {
            url: dest_url,
            path,
            size,
            millis: started.elapsed().as_millis() as u64,
            copied: true,
            etag: copy_etag,
            content_md5: copy_md5,
        })
    }

    /// What the destination holds now, if anything.
    /// The release's source: its client, its URL for the copy, whether it is the backup blob,
    /// and its properties (ETag and length for the currency check). A missing backup falls back
    /// to GetExports' downloadUri.
    async fn source(&self, plan: &ReleasePlan) -> Result<SourceRead, ReleaseError> {
        Ok(match &plan.source {
            Source::Backup { blob_name } => {
                let c = self.backup_blob(blob_name)?;
                match c.get_properties(None).await {
                    Ok(props) => {
                        let url = c.url().to_string();
                        (c, url, true, props)
                    }
                    Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                        let Some(url) = &plan.fallback else {
                            return Err(err(e).into());
                        };
                        let c = self.download_client(url)?;
                        let props = c.get_properties(None).await.map_err(err)?;
                        (c, url.clone(), false, props)
                    }
                    Err(e) => return Err(err(e).into()),
                }
            }
            Source::Download { url } => {
                let c = self.download_client(url)?;
                let props = c.get_properties(None).await.map_err(err)?;
                (c, url.clone(), false, props)
            }
        })
    }

    async fn destination(&self, path: &str) -> Result<Option<Destination>, StorageError> {
        match self.container.blob_client(path).get_properties(None).await {
            Ok(p) => Ok(Some(Destination {
                metadata: p.metadata().map_err(err)?,
                copy: match p.copy_status().map_err(err)? {
                    None => CopyState::None,
                    Some(CopyStatus::Pending) => CopyState::Pending,
                    Some(CopyStatus::Success) => CopyState::Success,
                    Some(_) => CopyState::Failed,
                },
                etag: p.etag().map_err(err)?.map(|e| e.to_string()),
            })),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    async fn ensure_container(&self) -> Result<(), StorageError> {
        match self.container.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status() == Some(StatusCode::Conflict) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// Polls the destination until the copy ends; returns its length, ETag and Content-MD5.
    async fn wait_for_copy(
        &self,
        dest: &BlobClient,
    ) -> Result<(u64, Option<String>, Option<String>), StorageError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let p = dest.get_properties(None).await.map_err(err)?;
            match p.copy_status().map_err(err)? {
                Some(CopyStatus::Success) | None => {
                    use base64::Engine as _;
                    return Ok((
                        p.content_length().map_err(err)?.unwrap_or(0),
                        p.etag().map_err(err)?.map(|e| e.to_string()),
                        p.content_md5()
                            .map_err(err)?
                            .map(|m| base64::engine::general_purpose::STANDARD.encode(m)),
                    ));
                }
                Some(CopyStatus::Pending) => {}
                Some(other) => {
                    let why = p
                        .copy_status_description()
                        .map_err(err)?
                        .unwrap_or_default();
                    return Err(StorageError::Service {
                        service: SERVICE,
                        status: 500,
                        code: format!(" Copy{other:?}"),
                        message: cvchain_core::redact::redact(&why),
                    });
                }
            }
            if start.elapsed() > self.copy_timeout {
                return Err(StorageError::Unreachable {
                    service: SERVICE,
                    detail: "the copy is still pending; the next delivery will look again".into(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Sets the tags (one write: reading them first to skip it costs as much).
    async fn ensure_tags(
        &self,
        blob: &BlobClient,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), StorageError> {
        let wanted: HashMap<String, String> = tags.clone().into_iter().collect();
        let body: BlobTags = wanted.into();
        blob.set_tags(body.try_into().map_err(err)?, None)
            .await
            .map_err(err)?;
        Ok(())
    }

    /// The blob's URL with `/` kept between path segments (the SDK escapes it), no SAS.
    fn readable_url(&self, path: &str) -> String {
        let mut url = self.container.url().clone();
        url.set_query(None);
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(path.split('/'));
        }
        url_without_secrets(url.as_str())
    }

    pub fn container_name(&self) -> &str {
        &self.container_name
    }
}

/// A destination blob, as a release sees it.
struct Destination {
    metadata: HashMap<String, String>,
    copy: CopyState,
    etag: Option<String>,
}

/// A 404 that says the container, not the blob, is missing.
fn is_container_missing(e: &azure_core::Error) -> bool {
    matches!(
        e.kind(),
        azure_core::error::ErrorKind::HttpResponse { error_code: Some(code), .. }
            if code == "ContainerNotFound"
    )
}

/// A release's source as read: its client, its URL for the copy, whether it is the backup
/// blob, and its properties (ETag and length for the currency check).
type SourceRead = (
    BlobClient,
    String,
    bool,
    azure_core::http::Response<
        azure_storage_blob::models::BlobClientGetPropertiesResult,
        azure_core::http::NoFormat,
    >,
);

/// A release's source, read ahead for [`ReleaseStore::release_from`].
pub struct ReleaseSource(SourceRead);
