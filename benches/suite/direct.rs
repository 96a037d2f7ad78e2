//! The baseline: a minimal client that makes, for each message of the throughput workload, the
//! storage requests and Custom Vision calls cvchain makes (the suite counts both, per message
//! kind, in Azurite's request log and the stand-in's count to show they match), with the same
//! clients, straight-line: no host protocol, message validation, planning, claims bookkeeping
//! logic or history enrichment. What the same work costs with nothing of cvchain around it.
//!
//! One function per step, in cvchain's order (docs/benchmarks.md lists each request of an
//! ExportCompleted and why):
//!
//! - TrainingCompleted: [`redelivered`](Direct::redelivered); Custom Vision's four reads beside
//!   the step rows; [`chain`](Direct::chain) (a step row for each export already there, the
//!   next export requested under its claim), its rows written one after another
//!   ([`flush`](Direct::flush)); [`pointer`](Direct::pointer) (the production pointer in the
//!   manifest, its row); [`notification_row`](Direct::notification_row).
//! - ExportCompleted: [`redelivered`](Direct::redelivered); the Training row then GetExports
//!   (Custom Vision's three other reads too when the row is not there yet), beside the step
//!   rows; [`release`](Direct::release) (each finished export not released yet, and the one the
//!   message is about: claim and source together, the destination unless expected free, the
//!   copy beside the backup's tags), the manifest read beside it, then
//!   [`channels`](Direct::channels) (free paths, manifest write, channel copies); beside all
//!   that, [`chain`](Direct::chain) (nothing left to request in this workload); then
//!   [`notification_row`](Direct::notification_row): the step rows with their claims given
//!   back, the move rows and the notification's row in one `$batch`.

use crate::workload::{CHAIN, Env, Kind, Message};
use azure_core::http::{RequestContent, StatusCode};
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders,
    BlobClientStartCopyFromUrlOptions, BlobTags, BlockBlobClientUploadOptions,
};
use azure_storage_blob::{BlobClient, BlobContainerClient};
use cvchain_azure::customvision::{
    TrainingApi,
    client::{CvAuth, CvRetry, TrainingClient},
};
use cvchain_azure::storage::table::{
    BatchOp, BatchOutcome, Entity, StoredEntity, TableClient, WriteOutcome, filter_eq,
};
use cvchain_core::customvision::Export;
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub struct Direct {
    env_clients: cvchain_azure::storage::clients::StorageClients,
    table: TableClient,
    cv: TrainingClient,
    release: BlobContainerClient,
    backup_url: String,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

const CHANNELS: [&str; 2] = ["latest", "production"];

fn entity(pk: &str, rk: &str, fields: &[(&str, Value)]) -> Entity {
    let mut e = Entity::new();
    e.insert("PartitionKey".into(), json!(pk));
    e.insert("RowKey".into(), json!(rk));
    for (k, v) in fields {
        e.insert((*k).into(), v.clone());
    }
    e
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What a message is about.
struct Msg<'a> {
    text: &'a str,
    kind: Kind,
    p: Uuid,
    i: Uuid,
    pk: String,
    /// The export's platform (ExportCompleted).
    platform: String,
}

impl Msg<'_> {
    fn row_key(&self) -> String {
        match self.kind {
            Kind::TrainingCompleted => training_key(self.i),
            _ => format!("Export_{}_{}_ExportCompleted", self.i, self.platform),
        }
    }
}

fn training_key(i: Uuid) -> String {
    format!("Training_{i}_TrainingCompleted")
}

fn step_key(i: Uuid, platform: &str) -> String {
    format!("ExportStep_{i}_{platform}")
}

/// The names and metrics rows and paths carry.
struct Facts {
    project_name: String,
    iteration_name: String,
    precision: Option<f64>,
    recall: Option<f64>,
}

impl Facts {
    /// A path segment of a name, as cvchain's default templates render it.
    fn project_path(&self) -> String {
        self.project_name.replace(' ', "-")
    }

    fn iteration_path(&self) -> String {
        self.iteration_name.replace(' ', "-")
    }
}

/// A release copy this message made or found current.
struct Released {
    platform: String,
    path: String,
    etag: String,
}

/// Row writes left for the transaction that records the notification's row: one operation per
/// row (changes of one row folded into one), each with the claim it gives back.
struct Tail(Vec<(BatchOp, Option<BatchOp>)>);

impl Tail {
    fn new() -> Self {
        Self(Vec::new())
    }

    fn push(&mut self, op: BatchOp, release: Option<BatchOp>) {
        let key = |op: &BatchOp| match op {
            BatchOp::Insert(e) | BatchOp::Merge(e) => e["RowKey"].clone(),
            BatchOp::Delete { row_key, .. } => json!(row_key),
        };
        let Some((held, held_release)) = self.0.iter_mut().find(|(o, _)| key(o) == key(&op)) else {
            self.0.push((op, release));
            return;
        };
        if let (
            BatchOp::Insert(e) | BatchOp::Merge(e),
            BatchOp::Insert(more) | BatchOp::Merge(more),
        ) = (&mut *held, op)
        {
            let mut folded = std::mem::take(e);
            folded.extend(more);
            *held = BatchOp::Merge(folded);
        }
        if held_release.is_none() {
            *held_release = release;
        }
    }

    fn append(&mut self, other: Tail) {
        for (op, release) in other.0 {
            self.push(op, release);
        }
    }
}

/// A claim given back at the ETag it was taken with.
fn give_back(pk: &str, rk: &str, etag: &str) -> BatchOp {
    BatchOp::Delete {
        partition_key: pk.to_owned(),
        row_key: rk.to_owned(),
        etag: etag.to_owned(),
    }
}

impl Direct {
    pub async fn new(env: &Env, max_rps: u32) -> Self {
        let table = env.clients.table(&env.table).unwrap();
        table.create_if_missing().await.unwrap();
        let release = env
            .clients
            .blob_service()
            .unwrap()
            .blob_container_client(&env.release);
        let _ = release.create(None).await;
        let endpoint = url::Url::parse(&env.standin.endpoint()).unwrap();
        Self {
            env_clients: env.clients.clone(),
            table,
            cv: TrainingClient::new(
                &endpoint,
                CvAuth::Key(crate::workload::KEY.into()),
                max_rps,
                CvRetry::default(),
            ),
            release,
            backup_url: env.azurite.container_url(&env.backup),
        }
    }

    /// One message, start to end.
    pub async fn handle(&self, text: &str) -> Result<(), Error> {
        let v: Value = serde_json::from_str(text)?;
        let c = &v["Content"];
        let p = Uuid::parse_str(c["projectId"].as_str().unwrap_or_default())?;
        let model_uri = c["modelUri"].as_str().unwrap_or_default();
        let kind = if c["trainingStatus"].is_string() {
            Kind::TrainingCompleted
        } else if model_uri.ends_with(".ONNX") {
            Kind::ExportOnnx
        } else {
            Kind::ExportTensorFlow
        };
        let m = Msg {
            text,
            kind,
            p,
            i: Uuid::parse_str(c["iterationId"].as_str().unwrap_or_default())?,
            pk: p.to_string(),
            platform: model_uri.rsplit('.').next().unwrap_or_default().to_owned(),
        };
        if self.redelivered(&m).await? {
            return Ok(());
        }
        match kind {
            Kind::TrainingCompleted => self.training(&m).await,
            Kind::ExportOnnx | Kind::ExportTensorFlow => self.export(&m).await,
        }
    }

    async fn training(&self, m: &Msg<'_>) -> Result<(), Error> {
        // Custom Vision's four reads, beside the step rows.
        let (it, project, perf, exports, steps) = tokio::join!(
            self.cv.get_iteration(m.p, m.i),
            self.cv.get_project(m.p),
            self.cv.get_iteration_performance(m.p, m.i),
            self.cv.get_exports(m.p, m.i),
            self.steps(m)
        );
        let (it, perf) = (it?, perf?);
        let facts = Facts {
            project_name: project?.name,
            iteration_name: it.name.clone(),
            precision: perf.precision,
            recall: perf.recall,
        };
        // The chain's row writes go before the promotion, one after another.
        let mut tail = Tail::new();
        self.chain(m, &exports?, &steps?, &mut tail).await?;
        self.flush(tail).await?;
        self.pointer(m, &facts).await?;
        self.notification_row(m, &facts, Tail::new()).await
    }

    async fn export(&self, m: &Msg<'_>) -> Result<(), Error> {
        // What Custom Vision said at training is on the Training row: one read, then GetExports
        // (the three other reads too when the row is not there yet: an export handled before
        // its training); beside them, the step rows.
        let (observed, steps) = tokio::join!(self.observe_export(m), self.steps(m));
        let ((facts, exports), steps) = (observed?, steps?);
        // The release (the manifest read beside it), then the channel moves; beside them, the
        // chain. Their row writes wait for the notification's row: one transaction.
        let (mut release_tail, mut chain_tail, mut moves_tail) =
            (Tail::new(), Tail::new(), Tail::new());
        let left = async {
            let (released, manifest) = tokio::join!(
                self.release(m, &facts, &exports, &steps, &mut release_tail),
                self.manifest(&facts)
            );
            self.channels(m, &facts, &released?, manifest?, &mut moves_tail)
                .await
        };
        let right = self.chain(m, &exports, &steps, &mut chain_tail);
        let (moved, chained) = tokio::join!(left, right);
        moved?;
        chained?;
        release_tail.append(chain_tail);
        release_tail.append(moves_tail);
        self.notification_row(m, &facts, release_tail).await
    }

    /// The Training row's facts (or Custom Vision's, without it) and GetExports.
    async fn observe_export(&self, m: &Msg<'_>) -> Result<(Facts, Vec<Export>), Error> {
        if let Some(row) = self.table.get(&m.pk, &training_key(m.i)).await? {
            let training = Value::Object(row.entity);
            let text = |k: &str| training[k].as_str().unwrap_or_default().to_owned();
            let facts = Facts {
                project_name: text("ProjectName"),
                iteration_name: text("IterationName"),
                precision: training["Precision"].as_f64(),
                recall: training["Recall"].as_f64(),
            };
            return Ok((facts, self.cv.get_exports(m.p, m.i).await?));
        }
        let (it, project, perf, exports) = tokio::join!(
            self.cv.get_iteration(m.p, m.i),
            self.cv.get_project(m.p),
            self.cv.get_iteration_performance(m.p, m.i),
            self.cv.get_exports(m.p, m.i),
        );
        let perf = perf?;
        let facts = Facts {
            project_name: project?.name,
            iteration_name: it?.name,
            precision: perf.precision,
            recall: perf.recall,
        };
        Ok((facts, exports?))
    }

    /// Step: whether this message's row is there already (a redelivery: nothing to do). One
    /// range read, as cvchain's, which also holds the rows apart of other messages about the
    /// event.
    async fn redelivered(&self, m: &Msg<'_>) -> Result<bool, Error> {
        let key = m.row_key();
        let filter = format!(
            "{} and RowKey ge '{key}' and RowKey lt '{key}`'",
            filter_eq("PartitionKey", &m.pk)
        );
        let rows = self.table.query(Some(&filter), 1000).await?;
        Ok(rows
            .iter()
            .any(|r| r.entity.get("RowKey").and_then(Value::as_str) == Some(&key)))
    }

    /// The iteration's step rows.
    async fn steps(&self, m: &Msg<'_>) -> Result<Vec<StoredEntity>, Error> {
        let filter = format!(
            "{} and RowKey ge 'ExportStep_{i}_' and RowKey lt 'ExportStep_{i}`'",
            filter_eq("PartitionKey", &m.pk),
            i = m.i
        );
        Ok(self.table.query(Some(&filter), 1000).await?)
    }

    /// Takes a claim row, waiting while another message of the iteration holds it.
    async fn claim(&self, pk: &str, rk: &str, purpose: &str) -> Result<String, Error> {
        let expires = time::OffsetDateTime::now_utc() + time::Duration::minutes(2);
        let e = entity(
            pk,
            rk,
            &[
                ("Purpose", json!(purpose)),
                ("Owner", json!(Uuid::new_v4().to_string())),
                ("ExpiresAt@odata.type", json!("Edm.DateTime")),
                (
                    "ExpiresAt",
                    json!(
                        expires
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default()
                    ),
                ),
            ],
        );
        for _ in 0..500 {
            match self.table.insert(&e).await? {
                WriteOutcome::Written { etag } => return Ok(etag),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        Err("claim held for 10 s".into())
    }

    /// Writes a tail one write after another, each with the claim it gives back.
    async fn flush(&self, tail: Tail) -> Result<(), Error> {
        for (op, release) in tail.0 {
            match (op, release) {
                (BatchOp::Insert(e), None) => {
                    self.table.insert(&e).await?;
                }
                (op, release) => {
                    let ops: Vec<BatchOp> = std::iter::once(op).chain(release).collect();
                    match self.table.transact(&ops).await? {
                        BatchOutcome::Committed => {}
                        refused => return Err(format!("step row: {refused:?}").into()),
                    }
                }
            }
        }
        Ok(())
    }

    /// Step: the export chain. Each entry Custom Vision exported already gets its step row; the
    /// first entry neither exported nor on a step row is requested, under its claim: the step
    /// row read again inside it, the request, the new step row with the claim given back. The
    /// rows are left in `tail`.
    async fn chain(
        &self,
        m: &Msg<'_>,
        exports: &[Export],
        steps: &[StoredEntity],
        tail: &mut Tail,
    ) -> Result<(), Error> {
        for (position, platform) in CHAIN.split(',').enumerate() {
            let key = step_key(m.i, platform);
            if steps.iter().any(|s| s.entity["RowKey"] == key) {
                continue;
            }
            let step = |status: &str| {
                entity(
                    &m.pk,
                    &key,
                    &[
                        ("Platform", json!(platform)),
                        ("Flavor", json!("")),
                        ("Position", json!(position)),
                        ("Status", json!(status)),
                        ("IterationId", json!(m.i.to_string())),
                        ("RequestedAt", json!(now())),
                    ],
                )
            };
            if exports.iter().any(|e| e.platform == platform) {
                tail.push(BatchOp::Insert(step("Done")), None);
                continue;
            }
            let claim_rk = format!("Claim_{}_{platform}", m.i);
            let claim = self.claim(&m.pk, &claim_rk, "ExportRequest").await?;
            // Another message of the iteration requested it while this one waited for the
            // claim (the queue consumer may get an export before its training): its step row
            // says so, and the claim goes back alone.
            if self.table.get(&m.pk, &key).await?.is_some() {
                self.table.delete(&m.pk, &claim_rk, &claim).await?;
                break;
            }
            self.cv.export_iteration(m.p, m.i, platform, None).await?;
            tail.push(
                BatchOp::Insert(step("Requested")),
                Some(give_back(&m.pk, &claim_rk, &claim)),
            );
            break;
        }
        Ok(())
    }

    /// Step: the release copies. Every finished export whose step row has no release yet, and
    /// the one the message is about, each under its claim.
    async fn release(
        &self,
        m: &Msg<'_>,
        facts: &Facts,
        exports: &[Export],
        steps: &[StoredEntity],
        tail: &mut Tail,
    ) -> Result<Vec<Released>, Error> {
        let mut out = Vec::new();
        for e in exports.iter().filter(|e| e.status == "Done") {
            let key = step_key(m.i, &e.platform);
            let released = steps.iter().any(|s| {
                s.entity["RowKey"] == key
                    && s.entity.get("ReleasePath").is_some_and(Value::is_string)
            });
            if released && e.platform != m.platform {
                continue;
            }
            // A first delivery expects the destination of an export no step row records a
            // release of to be free: it copies without reading it.
            out.push(
                self.release_copy(m, facts, &e.platform, !released, tail)
                    .await?,
            );
        }
        Ok(out)
    }

    /// One release copy: claim and source together; the destination (unless expected free);
    /// the copy, unless the destination is a copy of this source already, beside the backup's
    /// tags; the step row with the claim given back, left in `tail` (or the claim alone, now,
    /// when the copy was current). A destination expected free that is not is read and judged.
    async fn release_copy(
        &self,
        m: &Msg<'_>,
        facts: &Facts,
        platform: &str,
        expect_free: bool,
        tail: &mut Tail,
    ) -> Result<Released, Error> {
        let claim_rk = format!("ReleaseClaim_{}_{platform}", m.i);
        let name = format!("{} - {}.{platform}", m.p, m.i);
        let source = self.env_clients.blob_at(&url::Url::parse(&format!(
            "{}/{}",
            self.backup_url,
            name.replace(' ', "%20")
        ))?)?;
        let path = format!(
            "{}/{}/{platform}.zip",
            facts.project_path(),
            facts.iteration_path()
        );
        let dest = self.release.blob_client(&path);
        let (claim, props) = tokio::join!(
            self.claim(&m.pk, &claim_rk, "Copy"),
            source.get_properties(None)
        );
        let (claim, props) = (claim?, props?);
        let source_etag = props.etag()?.map(|e| e.to_string()).unwrap_or_default();
        let source_len = props.content_length()?.unwrap_or(0);
        let tags = HashMap::from([
            ("projectId".to_owned(), m.p.to_string()),
            ("iterationId".to_owned(), m.i.to_string()),
            ("platform".to_owned(), platform.to_owned()),
        ]);
        let mut expect_free = expect_free;
        let (copied, started) = loop {
            let existing = match expect_free {
                true => None,
                false => dest.get_properties(None).await.ok(),
            };
            let current = existing.as_ref().is_some_and(|d| {
                d.metadata()
                    .ok()
                    .and_then(|md| md.get("sourceetag").cloned())
                    .is_some_and(|e| e == source_etag.trim_matches('"'))
            });
            if current {
                self.table.delete(&m.pk, &claim_rk, &claim).await?;
                let etag = existing
                    .and_then(|d| d.etag().ok().flatten())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                return Ok(Released {
                    platform: platform.to_owned(),
                    path,
                    etag,
                });
            }
            let started = Instant::now();
            let options = BlobClientStartCopyFromUrlOptions {
                metadata: Some(HashMap::from([
                    ("projectid".to_owned(), m.p.to_string()),
                    ("iterationid".to_owned(), m.i.to_string()),
                    ("projectname".to_owned(), facts.project_path()),
                    ("iterationname".to_owned(), facts.iteration_path()),
                    ("platform".to_owned(), platform.to_owned()),
                    (
                        "sourceetag".to_owned(),
                        source_etag.trim_matches('"').to_owned(),
                    ),
                    ("sourcelength".to_owned(), source_len.to_string()),
                    ("exportedat".to_owned(), now()),
                ])),
                blob_tags_string: Some(tags_header(&tags)),
                source_if_match: props.etag()?,
                if_none_match: existing.is_none().then(|| "*".into()),
                if_match: existing
                    .as_ref()
                    .and_then(|d| d.etag().ok().flatten())
                    .map(|e| e.to_string().into()),
                ..Default::default()
            };
            // The backup's tags beside the copy.
            let wanted: BlobTags = tags.clone().into();
            let (copied, tagged) = tokio::join!(
                dest.start_copy_from_url(source.url().to_string(), Some(options)),
                async { source.set_tags(wanted.try_into()?, None).await }
            );
            tagged?;
            match copied {
                Err(e)
                    if expect_free
                        && matches!(
                            e.http_status(),
                            Some(StatusCode::PreconditionFailed | StatusCode::Conflict)
                        ) =>
                {
                    expect_free = false;
                }
                copied => break (copied?, started),
            }
        };
        let etag = copied
            .headers()
            .get_optional_string(&azure_core::http::headers::HeaderName::from_static("etag"))
            .unwrap_or_default();
        let step = entity(
            &m.pk,
            &step_key(m.i, platform),
            &[
                ("ReleaseStatus", json!("Released")),
                ("ReleaseUrl", json!(dest.url().to_string())),
                ("ReleasePath", json!(path)),
                ("ReleaseSize", json!(source_len)),
                ("CopyMillis", json!(started.elapsed().as_millis() as u64)),
                ("ReleasedAt", json!(now())),
                ("Status", json!("Done")),
                ("EndedAt", json!(now())),
            ],
        );
        tail.push(
            BatchOp::Merge(step),
            Some(give_back(&m.pk, &claim_rk, &claim)),
        );
        Ok(Released {
            platform: platform.to_owned(),
            path,
            etag,
        })
    }

    /// The manifest as read (one ranged GET) and its ETag; an empty one when there is none.
    async fn manifest(&self, facts: &Facts) -> Result<(Value, Option<String>), Error> {
        let blob = self
            .release
            .blob_client(&format!("{}/channels.json", facts.project_path()));
        let limit = cvchain_core::channels::MAX_MANIFEST_BYTES;
        let options = BlobClientDownloadOptions {
            range: Some((0..limit + 1).into()),
            ..Default::default()
        };
        match blob.download(Some(options)).await {
            Ok(rsp) => {
                let etag = rsp.properties.etag.as_ref().map(|e| e.to_string());
                let bytes = rsp.body.collect().await?;
                Ok((serde_json::from_slice(&bytes)?, etag))
            }
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                Ok((json!({"revision": 0, "channels": {}}), None))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the manifest under the ETag it was read with (or only if there is none); `false`
    /// when another write got there first.
    async fn save_manifest(
        &self,
        m: &Msg<'_>,
        facts: &Facts,
        manifest: &Value,
        etag: Option<String>,
    ) -> Result<bool, Error> {
        let blob = self
            .release
            .blob_client(&format!("{}/channels.json", facts.project_path()));
        let tags = HashMap::from([
            ("projectId".to_owned(), m.p.to_string()),
            ("manifest".to_owned(), "channels".to_owned()),
        ]);
        let mut options = BlockBlobClientUploadOptions {
            blob_content_type: Some("application/json".into()),
            blob_tags_string: Some(tags_header(&tags)),
            ..Default::default()
        };
        match etag {
            Some(etag) => options.if_match = Some(etag.into()),
            None => options.if_none_match = Some("*".into()),
        }
        let body = RequestContent::from(serde_json::to_vec_pretty(manifest)?);
        match blob.upload(body, Some(options)).await {
            Ok(_) => Ok(true),
            // Changed (412) or created (409) since it was read.
            Err(e)
                if matches!(
                    e.http_status(),
                    Some(StatusCode::PreconditionFailed | StatusCode::Conflict)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Step (TrainingCompleted): the production pointer moves to the iteration in the manifest,
    /// and the move gets its row.
    async fn pointer(&self, m: &Msg<'_>, facts: &Facts) -> Result<(), Error> {
        // Read again and written again while another message's write gets in between.
        let mut written = None;
        for _ in 0..8 {
            let (mut manifest, etag) = self.manifest(facts).await?;
            let revision = manifest["revision"].as_u64().unwrap_or(0) + 1;
            manifest["projectId"] = json!(m.p.to_string());
            manifest["projectName"] = json!(facts.project_name);
            manifest["revision"] = json!(revision);
            manifest["productionPointer"] = json!({
                "iteration": {
                    "id": m.i.to_string(),
                    "name": facts.iteration_name,
                    "precision": facts.precision,
                    "recall": facts.recall,
                },
                "reason": "gate",
                "revision": revision,
                "promotedAt": now(),
                "history": [],
            });
            if self.save_manifest(m, facts, &manifest, etag).await? {
                written = Some(revision);
                break;
            }
        }
        let revision = written.ok_or("the manifest kept changing")?;
        let row = entity(
            &m.pk,
            &format!("ChannelMove_production_pointer_r{revision:010}"),
            &[
                ("EventType", json!("ChannelMove")),
                ("Channel", json!("production")),
                ("ProjectId", json!(m.pk)),
                ("ProjectName", json!(facts.project_name)),
                ("IterationId", json!(m.i.to_string())),
                ("IterationName", json!(facts.iteration_name)),
                ("Precision", json!(facts.precision)),
                ("Recall", json!(facts.recall)),
                ("Reason", json!("gate")),
                ("Revision", json!(revision)),
                ("PromotedAt", json!(now())),
                (
                    "Note",
                    json!(format!(
                        "production now follows {}; publishing follows it",
                        facts.iteration_name
                    )),
                ),
            ],
        );
        self.table.insert(&row).await?;
        Ok(())
    }

    /// Step (ExportCompleted): the channels follow the releases. A `latest` or `production`
    /// entry this iteration holds already gets its copy brought in line; a new one needs a free
    /// path (one listing of their folder for two or more, one look for one), the manifest (as
    /// read beside the release) written under its ETag, and its copy (the copies run
    /// together); every move's row is left in `tail`.
    async fn channels(
        &self,
        m: &Msg<'_>,
        facts: &Facts,
        released: &[Released],
        manifest: (Value, Option<String>),
        tail: &mut Tail,
    ) -> Result<(), Error> {
        let held = |manifest: &Value, channel: &str, platform: &str| {
            manifest["channels"][channel][platform]["iterationId"] == json!(m.i.to_string())
        };
        let path = |channel: &str, r: &Released| {
            format!(
                "{}/channels/{channel}/{}.zip",
                facts.project_path(),
                r.platform
            )
        };
        // Read again and decided again while another message's write gets in between.
        let mut attempts = 0;
        let mut read = Some(manifest);
        let (manifest, moves, revision) = loop {
            attempts += 1;
            if attempts > 8 {
                return Err("the manifest kept changing".into());
            }
            let (mut manifest, etag) = match read.take() {
                Some(read) => read,
                None => self.manifest(facts).await?,
            };
            let mut moves = Vec::new();
            for r in released {
                for channel in CHANNELS {
                    moves.push((channel, r, held(&manifest, channel, &r.platform)));
                }
            }
            // Whether each new entry's path is free (or this project's channel copy).
            let new: Vec<_> = moves.iter().copied().filter(|(_, _, held)| !held).collect();
            let owners = self.path_owners(facts, &new, &path).await?;
            for ((channel, r, _), owner) in new.iter().zip(owners) {
                if owner.is_some_and(|o| o != m.pk) {
                    return Err(format!("{} is someone else's", path(channel, r)).into());
                }
            }
            let revision = manifest["revision"].as_u64().unwrap_or(0) + 1;
            if new.is_empty() {
                break (manifest, moves, revision - 1);
            }
            manifest["revision"] = json!(revision);
            for (channel, r, _) in &new {
                manifest["channels"][*channel][&r.platform] = json!({
                    "iterationId": m.i.to_string(),
                    "iterationName": facts.iteration_name,
                    "precision": facts.precision,
                    "recall": facts.recall,
                    "releasePath": r.path,
                    "channelPath": path(channel, r),
                    "reason": "released",
                    "revision": revision,
                    "promotedAt": now(),
                    "history": [],
                });
            }
            if self.save_manifest(m, facts, &manifest, etag).await? {
                break (manifest, moves, revision);
            }
        };
        // The copies, together.
        let copies = futures::future::join_all(moves.iter().map(|(channel, r, _)| {
            let revision = manifest["channels"][*channel][&r.platform]["revision"]
                .as_u64()
                .unwrap_or(revision);
            let to = path(channel, r);
            async move { self.channel_copy(m, facts, channel, r, &to, revision).await }
        }))
        .await;
        for ((channel, r, _), copied) in moves.iter().zip(copies) {
            let revision = copied?;
            let row = entity(
                &m.pk,
                &format!("ChannelMove_{channel}_{}_r{revision:010}", r.platform),
                &[
                    ("EventType", json!("ChannelMove")),
                    ("Channel", json!(channel)),
                    ("ProjectId", json!(m.pk)),
                    ("ProjectName", json!(facts.project_name)),
                    ("IterationId", json!(m.i.to_string())),
                    ("IterationName", json!(facts.iteration_name)),
                    ("Precision", json!(facts.precision)),
                    ("Recall", json!(facts.recall)),
                    ("Platform", json!(r.platform)),
                    ("Flavor", json!("")),
                    ("Reason", json!("released")),
                    ("ReleasePath", json!(r.path)),
                    ("ChannelPath", json!(path(channel, r))),
                    ("Revision", json!(revision)),
                    ("PromotedAt", json!(now())),
                ],
            );
            tail.push(BatchOp::Insert(row), None);
        }
        Ok(())
    }

    /// Who holds each new entry's path (`None`: free, or no owner said): with two or more, one
    /// listing of their channel folder (with metadata, one page); with one, its properties.
    async fn path_owners(
        &self,
        facts: &Facts,
        new: &[(&str, &Released, bool)],
        path: &impl Fn(&str, &Released) -> String,
    ) -> Result<Vec<Option<String>>, Error> {
        match new {
            [] => Ok(Vec::new()),
            [(channel, r, _)] => match self
                .release
                .blob_client(&path(channel, r))
                .get_properties(None)
                .await
            {
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(vec![None]),
                Err(e) => Err(e.into()),
                Ok(p) => Ok(vec![p.metadata()?.get("projectid").cloned()]),
            },
            _ => {
                use azure_storage_blob::models::{
                    BlobContainerClientListBlobsOptions, ListBlobsIncludeItem,
                };
                let options = BlobContainerClientListBlobsOptions {
                    prefix: Some(format!("{}/channels/", facts.project_path())),
                    include: Some(vec![ListBlobsIncludeItem::Metadata]),
                    maxresults: Some(cvchain_azure::storage::channels::LIST_PAGE),
                    ..Default::default()
                };
                let mut pages = self.release.list_blobs(Some(options))?.into_pages();
                let mut owners: HashMap<String, Option<String>> = HashMap::new();
                if let Some(page) = pages.next().await {
                    for b in page?.into_model()?.blob_items {
                        let meta = b.metadata.and_then(|m| m.values).unwrap_or_default();
                        if let Some(name) = b.name {
                            owners.insert(name, meta.get("projectid").cloned());
                        }
                    }
                }
                Ok(new
                    .iter()
                    .map(|(channel, r, _)| owners.get(&path(channel, r)).cloned().flatten())
                    .collect())
            }
        }
    }

    /// One channel copy, conditional on the path being free; when it is not (a copy of this
    /// move made before), the copy there is looked at. Returns the move's revision.
    async fn channel_copy(
        &self,
        m: &Msg<'_>,
        facts: &Facts,
        channel: &str,
        r: &Released,
        path: &str,
        revision: u64,
    ) -> Result<u64, Error> {
        let dest = self.release.blob_client(path);
        let source: BlobClient = self.release.blob_client(&r.path);
        let tags = HashMap::from([
            ("projectId".to_owned(), m.p.to_string()),
            ("iterationId".to_owned(), m.i.to_string()),
            ("platform".to_owned(), r.platform.clone()),
            ("channel".to_owned(), channel.to_owned()),
        ]);
        let options = BlobClientStartCopyFromUrlOptions {
            metadata: Some(HashMap::from([
                ("projectid".to_owned(), m.p.to_string()),
                ("projectname".to_owned(), facts.project_path()),
                ("iterationid".to_owned(), m.i.to_string()),
                ("platform".to_owned(), r.platform.clone()),
                ("channel".to_owned(), channel.to_owned()),
                ("revision".to_owned(), revision.to_string()),
                ("sourceetag".to_owned(), r.etag.trim_matches('"').to_owned()),
            ])),
            blob_tags_string: Some(tags_header(&tags)),
            source_if_match: Some(r.etag.clone().into()),
            if_none_match: Some("*".into()),
            ..Default::default()
        };
        match dest
            .start_copy_from_url(source.url().to_string(), Some(options))
            .await
        {
            Ok(_) => Ok(revision),
            Err(e)
                if matches!(
                    e.http_status(),
                    Some(StatusCode::PreconditionFailed | StatusCode::Conflict)
                ) =>
            {
                let held = dest.get_properties(None).await?.metadata()?;
                Ok(held
                    .get("revision")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(revision))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Step: the notification's row, written last (the redelivery marker), in one transaction
    /// with the `tail` (a row of it there already is left out, a claim no longer held too, and
    /// the rest sent again).
    async fn notification_row(&self, m: &Msg<'_>, facts: &Facts, tail: Tail) -> Result<(), Error> {
        let event = match m.kind {
            Kind::TrainingCompleted => "TrainingCompleted",
            _ => "ExportCompleted",
        };
        let row = entity(
            &m.pk,
            &m.row_key(),
            &[
                ("EventType", json!(event)),
                ("IterationId", json!(m.i.to_string())),
                ("ProjectName", json!(facts.project_name)),
                ("IterationName", json!(facts.iteration_name)),
                ("Precision", json!(facts.precision)),
                ("Recall", json!(facts.recall)),
                ("ModelPlatform", json!(m.platform)),
                ("MessageText", json!(m.text)),
                ("ReceivedAt", json!(now())),
            ],
        );
        if tail.0.is_empty() {
            self.table.insert(&row).await?;
            return Ok(());
        }
        let mut ops: Vec<BatchOp> = tail
            .0
            .into_iter()
            .flat_map(|(op, release)| std::iter::once(op).chain(release))
            .collect();
        ops.push(BatchOp::Insert(row));
        while !ops.is_empty() {
            match self.table.transact(&ops).await? {
                BatchOutcome::Committed => return Ok(()),
                BatchOutcome::Refused {
                    index: Some(i),
                    status,
                    ..
                } if i + 1 < ops.len()
                    && matches!(
                        (&ops[i], status),
                        (BatchOp::Insert(_), 409) | (BatchOp::Delete { .. }, 404 | 412)
                    ) =>
                {
                    ops.remove(i);
                }
                refused => return Err(format!("notification row: {refused:?}").into()),
            }
        }
        Ok(())
    }
}

/// `x-ms-tags`: `k=v&…`, URL-encoded.
fn tags_header(tags: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = tags
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                url::form_urlencoded::byte_serialize(k.as_bytes()).collect::<String>(),
                url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
            )
        })
        .collect();
    pairs.sort();
    pairs.join("&")
}

/// Every message, `concurrency` at a time, from memory.
pub async fn run(direct: &Direct, messages: &[Message], concurrency: usize) -> Duration {
    let started = Instant::now();
    futures::stream::iter(messages)
        .map(|m| async move {
            direct
                .handle(&m.text)
                .await
                .unwrap_or_else(|e| panic!("direct client, {:?}: {e}", m.kind))
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}

/// As the worker consumes its queue: receive up to `batch` at a time, at most one and a half
/// batches in flight, delete each message once handled.
pub async fn run_queue(direct: Arc<Direct>, env: &Env, total: usize, batch: usize) -> Duration {
    use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
    let queue = Arc::new(env.clients.queue(&env.queue).unwrap());
    let permits = Arc::new(tokio::sync::Semaphore::new(batch + batch / 2));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    while done.load(std::sync::atomic::Ordering::Relaxed) < total {
        while let Some(joined) = tasks.try_join_next() {
            // A failed message would stay on the queue and the loop would never end.
            joined.expect("the direct queue consumer failed a message");
        }
        let free = permits.available_permits();
        if free == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let got = queue
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(free.min(batch) as i32),
                visibility_timeout: Some(60),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_model()
            .unwrap()
            .items
            .unwrap_or_default();
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for m in got {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let (direct, queue, done) = (direct.clone(), queue.clone(), done.clone());
            tasks.spawn(async move {
                let text = m.message_text.unwrap_or_default();
                direct
                    .handle(&text)
                    .await
                    .unwrap_or_else(|e| panic!("direct client: {e}"));
                queue
                    .delete_message(
                        m.message_id.as_deref().unwrap_or_default(),
                        m.pop_receipt.as_deref().unwrap_or_default(),
                        None,
                    )
                    .await
                    .unwrap();
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(permit);
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("the direct queue consumer failed a message");
    }
    started.elapsed()
}
