//! A small Table storage client on `azure_core`'s HTTP pipeline: the GA SDK has no Tables crate.
//!
//! JSON over the Table REST API (2019-02-02): create table, insert, upserts, ETag-conditional
//! writes, point reads, queries with continuation, and entity-group transactions (`$batch`: a
//! changeset of writes to one partition, all or nothing). 404, 409 and 412 come back as typed
//! outcomes, not errors, because callers build idempotence on them.

use super::{StorageError, status_u16};
use azure_core::{
    credentials::Secret,
    http::{
        Context, Method, Pipeline, PipelineSendOptions, RawResponse, Request, Url,
        headers::HeaderName,
    },
};
use cvchain_core::history::is_valid_key;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};

const SERVICE: &str = "table";
const API_VERSION: &str = "2019-02-02";
/// Everything but RFC 3986 unreserved characters is escaped in keys and query values.
const ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// An entity's properties, as the service's JSON gives them (`PartitionKey`, `RowKey` included).
pub type Entity = Map<String, Value>;

/// An entity read back, with the ETag that conditional writes need.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntity {
    pub entity: Entity,
    pub etag: String,
}

/// What a conditional write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written; the new ETag.
    Written { etag: String },
    /// Insert: an entity with these keys already exists (409).
    AlreadyExists,
    /// Update or delete: the entity changed since it was read (412), or is gone (404).
    Conflict,
}

/// One page of a query.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub entities: Vec<StoredEntity>,
    pub next: Option<Continuation>,
}

/// Where the next page starts (the service's `x-ms-continuation-*` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    pub next_partition_key: String,
    pub next_row_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateMode {
    /// PUT: the entity becomes exactly what is sent.
    Replace,
    /// PATCH (MERGE): properties sent are added or overwritten, others stay.
    Merge,
}

/// One write of an entity-group transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOp {
    /// Insert; the transaction fails (409) if an entity with these keys exists.
    Insert(Entity),
    /// Insert-or-merge, unconditionally.
    Merge(Entity),
    /// Delete if the entity's ETag is still `etag` (a claim given back in the same request as
    /// the write it guarded); the transaction fails (412, or 404) otherwise.
    Delete {
        partition_key: String,
        row_key: String,
        etag: String,
    },
}

impl BatchOp {
    /// The keys it writes, checked as tables require.
    fn keys(&self) -> Result<(&str, &str), StorageError> {
        match self {
            BatchOp::Insert(e) | BatchOp::Merge(e) => check_keys(e),
            BatchOp::Delete {
                partition_key,
                row_key,
                ..
            } => {
                for k in [partition_key, row_key] {
                    if !is_valid_key(k) {
                        return Err(StorageError::Other {
                            service: SERVICE,
                            detail: "a key contains a character tables forbid".into(),
                        });
                    }
                }
                Ok((partition_key, row_key))
            }
        }
    }
}

/// What an entity-group transaction did: everything, or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    Committed,
    /// Nothing was written: operation `index` (when the service says which) was refused.
    Refused {
        index: Option<usize>,
        status: u16,
        code: String,
    },
}

/// A client for one table.
#[derive(Clone)]
pub struct TableClient {
    service: Url,
    table: String,
    pipeline: Pipeline,
    sas: Option<Secret>,
}

impl std::fmt::Debug for TableClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableClient")
            .field("service", &self.service.as_str())
            .field("table", &self.table)
            .finish()
    }
}

impl TableClient {
    /// `service` is the table service URL (`https://acct.table.core.windows.net`, or Azurite's
    /// `http://127.0.0.1:10002/devstoreaccount1`); authentication comes from the pipeline's
    /// policies, or from `sas` appended to each URL.
    pub fn new(service: Url, table: &str, pipeline: Pipeline, sas: Option<Secret>) -> Self {
        Self {
            service,
            table: table.to_owned(),
            pipeline,
            sas,
        }
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The table's URL, for messages (never carries the SAS).
    pub fn url(&self) -> String {
        format!(
            "{}/{}",
            self.service.as_str().trim_end_matches('/'),
            self.table
        )
    }

    /// Creates the table; `Ok(false)` when it already existed.
    pub async fn create_if_missing(&self) -> Result<bool, StorageError> {
        let mut req = self.request(Method::Post, "Tables", &[]);
        req.insert_header("prefer", "return-no-content");
        set_json(&mut req, &serde_json::json!({ "TableName": self.table }));
        let rsp = self.send(&mut req).await?;
        match status_u16(rsp.status()) {
            201 | 204 => Ok(true),
            409 => Ok(false),
            _ => Err(service_error(&rsp)),
        }
    }

    /// Inserts if no entity has these keys: the building block of idempotent records and claims.
    pub async fn insert(&self, entity: &Entity) -> Result<WriteOutcome, StorageError> {
        check_keys(entity)?;
        let mut req = self.request(Method::Post, &self.table, &[]);
        req.insert_header("prefer", "return-no-content");
        set_json(&mut req, &Value::Object(entity.clone()));
        let rsp = self.send(&mut req).await?;
        match status_u16(rsp.status()) {
            201 | 204 => Ok(WriteOutcome::Written { etag: etag(&rsp) }),
            409 => Ok(WriteOutcome::AlreadyExists),
            _ => Err(service_error(&rsp)),
        }
    }

    /// Insert-or-replace / insert-or-merge, unconditionally.
    pub async fn upsert(&self, entity: &Entity, mode: UpdateMode) -> Result<String, StorageError> {
        match self.write(entity, mode, None).await? {
            WriteOutcome::Written { etag } => Ok(etag),
            other => Err(StorageError::Other {
                service: SERVICE,
                detail: format!("unconditional upsert answered {other:?}"),
            }),
        }
    }

    /// Replaces or merges only if the entity still has `etag` (`*` = any existing entity).
    pub async fn update(
        &self,
        entity: &Entity,
        mode: UpdateMode,
        etag: &str,
    ) -> Result<WriteOutcome, StorageError> {
        self.write(entity, mode, Some(etag)).await
    }

    async fn write(
        &self,
        entity: &Entity,
        mode: UpdateMode,
        if_match: Option<&str>,
    ) -> Result<WriteOutcome, StorageError> {
        let (pk, rk) = check_keys(entity)?;
        let method = match mode {
            UpdateMode::Replace => Method::Put,
            UpdateMode::Merge => Method::Patch,
        };
        let mut req = self.request(method, &entity_path(&self.table, pk, rk), &[]);
        if let Some(tag) = if_match {
            req.insert_header("if-match", tag.to_owned());
        }
        set_json(&mut req, &Value::Object(entity.clone()));
        let rsp = self.send(&mut req).await?;
        match status_u16(rsp.status()) {
            200 | 201 | 204 => Ok(WriteOutcome::Written { etag: etag(&rsp) }),
            404 | 412 if if_match.is_some() => Ok(WriteOutcome::Conflict),
            _ => Err(service_error(&rsp)),
        }
    }

    /// Deletes if the entity still has `etag` (`*` = whatever it is now).
    pub async fn delete(
        &self,
        pk: &str,
        rk: &str,
        etag: &str,
    ) -> Result<WriteOutcome, StorageError> {
        let mut req = self.request(Method::Delete, &entity_path(&self.table, pk, rk), &[]);
        req.insert_header("if-match", etag.to_owned());
        let rsp = self.send(&mut req).await?;
        match status_u16(rsp.status()) {
            204 => Ok(WriteOutcome::Written {
                etag: String::new(),
            }),
            404 | 412 => Ok(WriteOutcome::Conflict),
            _ => Err(service_error(&rsp)),
        }
    }

    /// Reads one entity; `None` when it does not exist.
    pub async fn get(&self, pk: &str, rk: &str) -> Result<Option<StoredEntity>, StorageError> {
        let mut req = self.request(Method::Get, &entity_path(&self.table, pk, rk), &[]);
        let rsp = self.send(&mut req).await?;
        match status_u16(rsp.status()) {
            200 => {
                let tag = etag(&rsp);
                let value: Value = parse_body(&rsp)?;
                let mut stored = stored_entity(value)?;
                if stored.etag.is_empty() {
                    stored.etag = tag;
                }
                Ok(Some(stored))
            }
            404 => Ok(None),
            _ => Err(service_error(&rsp)),
        }
    }

    /// One page of entities matching an OData `$filter` (see [`filter_eq`] for safe literals).
    pub async fn query_page(
        &self,
        filter: Option<&str>,
        top: Option<u32>,
        from: Option<&Continuation>,
    ) -> Result<Page, StorageError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(f) = filter {
            query.push(("$filter", f.to_owned()));
        }
        if let Some(t) = top {
            query.push(("$top", t.to_string()));
        }
        if let Some(c) = from {
            query.push(("NextPartitionKey", c.next_partition_key.clone()));
            if let Some(rk) = &c.next_row_key {
                query.push(("NextRowKey", rk.clone()));
            }
        }
        let mut req = self.request(Method::Get, &format!("{}()", self.table), &query);
        let rsp = self.send(&mut req).await?;
        if status_u16(rsp.status()) != 200 {
            return Err(service_error(&rsp));
        }
        let next = header(&rsp, "x-ms-continuation-nextpartitionkey").map(|pk| Continuation {
            next_partition_key: pk,
            next_row_key: header(&rsp, "x-ms-continuation-nextrowkey"),
        });
        let body: Value = parse_body(&rsp)?;
        let entities = match body.get("value") {
            Some(Value::Array(items)) => items
                .iter()
                .cloned()
                .map(stored_entity)
                .collect::<Result<Vec<_>, _>>()?,
            _ => {
                return Err(StorageError::Other {
                    service: SERVICE,
                    detail: "query answer has no `value` array".into(),
                });
            }
        };
        Ok(Page { entities, next })
    }

    /// Every entity matching `filter`, following continuations, up to `limit` entities.
    pub async fn query(
        &self,
        filter: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntity>, StorageError> {
        let mut out = Vec::new();
        let mut next: Option<Continuation> = None;
        loop {
            let remaining = limit.saturating_sub(out.len());
            if remaining == 0 {
                break;
            }
            let top = remaining.min(1000) as u32;
            let page = self.query_page(filter, Some(top), next.as_ref()).await?;
            out.extend(page.entities);
            match page.next {
                Some(c) => next = Some(c),
                None => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Writes `ops` as one entity-group transaction: in order, all or nothing. They must share
    /// one PartitionKey and name each entity once; at most 100.
    pub async fn transact(&self, ops: &[BatchOp]) -> Result<BatchOutcome, StorageError> {
        if ops.is_empty() {
            return Ok(BatchOutcome::Committed);
        }
        if ops.len() > 100 {
            return Err(StorageError::Other {
                service: SERVICE,
                detail: format!("a transaction holds at most 100 writes, not {}", ops.len()),
            });
        }
        let mut partition = None;
        for op in ops {
            let (pk, _) = op.keys()?;
            if partition.get_or_insert(pk) != &pk {
                return Err(StorageError::Other {
                    service: SERVICE,
                    detail: "a transaction's writes must share one PartitionKey".into(),
                });
            }
        }
        let id = uuid::Uuid::new_v4();
        let (batch, changeset) = (format!("batch_{id}"), format!("changeset_{id}"));
        let base = self.service.as_str().trim_end_matches('/');
        let mut body =
            format!("--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n");
        for op in ops {
            let (pk, rk) = op.keys()?;
            let (line, prefer, json) = match op {
                BatchOp::Insert(e) => (
                    format!("POST {base}/{} HTTP/1.1", self.table),
                    "Prefer: return-no-content\r\n".to_owned(),
                    entity_json(e),
                ),
                BatchOp::Merge(e) => (
                    format!("MERGE {base}/{} HTTP/1.1", entity_path(&self.table, pk, rk)),
                    String::new(),
                    entity_json(e),
                ),
                BatchOp::Delete { etag, .. } => (
                    format!(
                        "DELETE {base}/{} HTTP/1.1",
                        entity_path(&self.table, pk, rk)
                    ),
                    format!("If-Match: {etag}\r\n"),
                    String::new(),
                ),
            };
            body.push_str(&format!(
                "--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
                 {line}\r\nContent-Type: application/json\r\nAccept: application/json;odata=minimalmetadata\r\n\
                 DataServiceVersion: 3.0\r\n{prefer}\r\n{json}\r\n"
            ));
        }
        body.push_str(&format!("--{changeset}--\r\n--{batch}--\r\n"));
        let mut req = self.request(Method::Post, "$batch", &[]);
        req.insert_header("content-type", format!("multipart/mixed; boundary={batch}"));
        req.set_body(body.into_bytes());
        let rsp = self.send(&mut req).await?;
        let status = status_u16(rsp.status());
        if !(200..300).contains(&status) && status != 409 && status != 400 {
            return Err(service_error(&rsp));
        }
        let text = String::from_utf8_lossy(rsp.body().as_ref()).into_owned();
        Ok(batch_outcome(status, &text))
    }

    fn request(&self, method: Method, path: &str, query: &[(&str, String)]) -> Request {
        let mut url = format!("{}/{}", self.service.as_str().trim_end_matches('/'), path);
        let mut sep = '?';
        for (k, v) in query {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&utf8_percent_encode(v, ESCAPE).to_string());
            sep = '&';
        }
        if let Some(sas) = &self.sas {
            url.push(sep);
            url.push_str(sas.secret());
        }
        let url = Url::parse(&url).expect("table URL built from a valid service URL");
        let mut req = Request::new(url, method);
        req.insert_header("x-ms-version", API_VERSION);
        req.insert_header("dataserviceversion", "3.0");
        req.insert_header("maxdataserviceversion", "3.0;NetFx");
        req.insert_header("accept", "application/json;odata=minimalmetadata");
        req.insert_header(
            "x-ms-date",
            azure_core::time::to_rfc7231(&azure_core::time::OffsetDateTime::now_utc()),
        );
        req
    }

    async fn send(&self, req: &mut Request) -> Result<RawResponse, StorageError> {
        self.pipeline
            .send(
                &Context::new(),
                req,
                Some(PipelineSendOptions {
                    skip_checks: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| StorageError::from_azure(SERVICE, &e))
    }
}

/// Reads a `$batch` answer: each operation's status line (`HTTP/1.1 204 No Content`); the first
/// that is not 2xx failed the transaction, and its error message starts with the operation's
/// index (`1:The specified entity already exists.`).
fn batch_outcome(outer: u16, text: &str) -> BatchOutcome {
    let mut parts = text.split("HTTP/1.1 ").skip(1);
    let failed = parts.find_map(|part| {
        let status: u16 = part.get(..3)?.parse().ok()?;
        (!(200..300).contains(&status)).then_some((status, part))
    });
    let Some((status, part)) =
        failed.or_else(|| (!(200..300).contains(&outer)).then_some((outer, text)))
    else {
        return BatchOutcome::Committed;
    };
    let error: Option<Value> = part
        .find('{')
        .and_then(|at| {
            serde_json::Deserializer::from_str(&part[at..])
                .into_iter()
                .next()
        })
        .and_then(Result::ok);
    let err = error.as_ref().and_then(|e| e.get("odata.error"));
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(|m| m.get("value").or(Some(m)))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let index = message
        .split_once(':')
        .and_then(|(n, _)| n.trim().parse::<usize>().ok());
    BatchOutcome::Refused {
        index,
        status,
        code,
    }
}

/// `table(PartitionKey='…',RowKey='…')` with quotes doubled, then escaped.
fn entity_path(table: &str, pk: &str, rk: &str) -> String {
    let lit = |k: &str| utf8_percent_encode(&k.replace('\'', "''"), ESCAPE).to_string();
    format!("{table}(PartitionKey='{}',RowKey='{}')", lit(pk), lit(rk))
}

/// An OData `eq` comparison with a string literal, quotes doubled so values cannot break out.
pub fn filter_eq(property: &str, value: &str) -> String {
    filter_cmp(property, "eq", value)
}

/// An OData comparison (`eq`, `ge`, `lt`, …) with a string literal, quoted as [`filter_eq`].
pub fn filter_cmp(property: &str, op: &str, value: &str) -> String {
    format!("{property} {op} '{}'", value.replace('\'', "''"))
}

/// Keys must be strings without the characters the service forbids.
fn check_keys(entity: &Entity) -> Result<(&str, &str), StorageError> {
    let key = |name: &str| -> Result<&str, StorageError> {
        let v = entity
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| StorageError::Other {
                service: SERVICE,
                detail: format!("entity has no string {name}"),
            })?;
        if !is_valid_key(v) {
            return Err(StorageError::Other {
                service: SERVICE,
                detail: format!("{name} contains a character tables forbid (/ \\ # ? or control)"),
            });
        }
        Ok(v)
    };
    Ok((key("PartitionKey")?, key("RowKey")?))
}

fn set_json(req: &mut Request, value: &Value) {
    req.insert_header("content-type", "application/json");
    req.set_body(json_text(value).into_bytes());
}

/// An entity as a request carries it: see [`json_text`].
fn entity_json(entity: &Entity) -> String {
    json_text(entity)
}

/// JSON text with U+2028 and U+2029 escaped (`\u2028`, as JSON allows). A `$batch` body is
/// multipart text that is read line by line: Azurite finds each operation's JSON with a pattern
/// whose `.` stops at a JavaScript line terminator, and U+2028 and U+2029 are ones, so a name
/// holding one, written raw, cut the entity's JSON short and failed the transaction (500). Escaped,
/// the JSON is one line whatever it holds and the value stored is the same; single writes use it
/// too, so every write spells a value alike. `bounds::encoded_units` counts them as escaped.
fn json_text(value: &impl serde::Serialize) -> String {
    // A map of strings to JSON values always serializes.
    let text = serde_json::to_string(value).unwrap_or_default();
    if text.contains(['\u{2028}', '\u{2029}']) {
        // Outside strings JSON has no room for them: every one is inside a string value.
        text.replace('\u{2028}', "\\u2028")
            .replace('\u{2029}', "\\u2029")
    } else {
        text
    }
}

fn header(rsp: &RawResponse, name: &'static str) -> Option<String> {
    rsp.headers()
        .get_optional_string(&HeaderName::from_static(name))
}

fn etag(rsp: &RawResponse) -> String {
    header(rsp, "etag").unwrap_or_default()
}

fn parse_body(rsp: &RawResponse) -> Result<Value, StorageError> {
    serde_json::from_slice(rsp.body().as_ref()).map_err(|e| StorageError::Other {
        service: SERVICE,
        detail: format!("answer is not JSON: {e}"),
    })
}

/// Moves `odata.etag` out of the properties and drops the other `odata.*` annotations.
fn stored_entity(value: Value) -> Result<StoredEntity, StorageError> {
    let Value::Object(mut map) = value else {
        return Err(StorageError::Other {
            service: SERVICE,
            detail: "entity is not a JSON object".into(),
        });
    };
    let etag = match map.remove("odata.etag") {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    map.retain(|k, _| !k.starts_with("odata.") && !k.contains("@odata."));
    Ok(StoredEntity { entity: map, etag })
}

/// The service's error code and message from `{"odata.error":{…}}`, or the status alone.
fn service_error(rsp: &RawResponse) -> StorageError {
    let status = status_u16(rsp.status());
    let body: Option<Value> = serde_json::from_slice(rsp.body().as_ref()).ok();
    let err = body.as_ref().and_then(|b| b.get("odata.error"));
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| header(rsp, "x-ms-error-code"))
        .map(|c| format!(" {c}"))
        .unwrap_or_default();
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(|m| m.get("value").or(Some(m)))
        .and_then(Value::as_str)
        .map(|m| m.lines().next().unwrap_or_default().to_owned())
        .unwrap_or_else(|| rsp.status().canonical_reason().into_owned());
    StorageError::from_status(
        SERVICE,
        status,
        code,
        cvchain_core::redact::redact(&message),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_quoted_and_escaped() {
        assert_eq!(
            entity_path("T", "it's", "a b"),
            "T(PartitionKey='it%27%27s',RowKey='a%20b')"
        );
    }

    #[test]
    fn filters_cannot_be_broken_out_of() {
        assert_eq!(
            filter_eq("ProjectId", "x' or PartitionKey ne '"),
            "ProjectId eq 'x'' or PartitionKey ne '''"
        );
    }

    #[test]
    fn forbidden_key_characters_are_refused() {
        for k in ["a/b", "a\\b", "a#b", "a?b", "a\u{1}b"] {
            assert!(!is_valid_key(k), "{k:?}");
        }
        assert!(is_valid_key("Training_3c2a1b0d-8e7f"));
    }

    #[test]
    fn batch_answers_say_which_operation_failed() {
        let ok = "--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_1\r\n\r\n\
            --changesetresponse_1\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\
            --changesetresponse_1\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\
            --changesetresponse_1--\r\n--batchresponse_1--";
        assert_eq!(batch_outcome(202, ok), BatchOutcome::Committed);
        let failed = "--batchresponse_1\r\n--changesetresponse_1\r\nContent-Type: application/http\r\n\r\n\
            HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n\r\n\
            {\"odata.error\":{\"code\":\"EntityAlreadyExists\",\"message\":{\"lang\":\"en-US\",\
            \"value\":\"1:The specified entity already exists.\\nRequestId:x\"}}}\r\n\
            --changesetresponse_1--\r\n--batchresponse_1--";
        assert_eq!(
            batch_outcome(202, failed),
            BatchOutcome::Refused {
                index: Some(1),
                status: 409,
                code: "EntityAlreadyExists".into()
            }
        );
    }

    #[test]
    fn line_terminators_of_javascript_are_escaped_and_nothing_else_changes() {
        let e = entity_pk("a\u{2028}b\u{2029}c \u{85} 😀 \"\n");
        let text = entity_json(&e);
        assert!(!text.contains(['\u{2028}', '\u{2029}', '\n']), "{text}");
        assert!(text.contains(r"a\u2028b\u2029c"), "{text}");
        assert_eq!(serde_json::from_str::<Entity>(&text).unwrap(), e);
        let plain = entity_pk("é 😀");
        assert_eq!(entity_json(&plain), serde_json::to_string(&plain).unwrap());
    }

    fn entity_pk(name: &str) -> Entity {
        let mut e = Entity::new();
        e.insert("PartitionKey".into(), "p".into());
        e.insert("RowKey".into(), "r".into());
        e.insert("Name".into(), name.into());
        e
    }

    #[test]
    fn annotations_are_stripped_and_the_etag_kept() {
        let v = serde_json::json!({
            "odata.etag": "W/\"x\"",
            "odata.metadata": "m",
            "PartitionKey": "p",
            "RowKey": "r",
            "Timestamp@odata.type": "Edm.DateTime",
            "Timestamp": "2026-01-01T00:00:00Z",
        });
        let e = stored_entity(v).unwrap();
        assert_eq!(e.etag, "W/\"x\"");
        assert_eq!(
            e.entity.keys().collect::<Vec<_>>(),
            vec!["PartitionKey", "RowKey", "Timestamp"]
        );
    }
}
