//! Download links: a short-lived, read-only SAS for one blob, so a browser (or a deploy script)
//! can fetch a model from the private release container with no other credential.
//!
//! - Under a connection string with an account key: a service SAS signed with the key.
//! - Under Microsoft Entra ID (a managed identity): a user delegation SAS, signed with a key that
//!   Get User Delegation Key hands out (kept and reused until shortly before it expires).
//! - Under a connection string with a SAS: no link. The connection's own SAS may reach the whole
//!   container or account for a long time; it is never handed on.
//!
//! Every link names one blob (`sr=b`), reads only (`sp=r`), starts a few minutes in the past
//! (clock skew) and ends after [`Links::lifetime`]. The account key and the delegation key stay
//! here: only signatures leave.

use super::{StorageError, clients::StorageClients, settings::StorageAuth};
use azure_core::{
    credentials::Secret,
    hmac::hmac_sha256,
    http::{RequestContent, Url},
};
use azure_storage_blob::models::KeyInfo;
use std::time::Duration;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::Mutex;

const SERVICE: &str = "blob";
/// The SAS version the links are signed for.
pub const SAS_VERSION: &str = "2020-12-06";
/// How long a link lasts unless set.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Links start this long before they are made, for clocks that run behind.
const SKEW: time::Duration = time::Duration::minutes(5);
/// A delegation key is asked for this long (the service allows up to seven days; short keeps a
/// leaked one short-lived too).
const KEY_LIFETIME: time::Duration = time::Duration::hours(2);

/// A user delegation key as Get User Delegation Key returned it.
#[derive(Clone)]
struct DelegationKey {
    oid: String,
    tid: String,
    start: String,
    expiry: String,
    expires_at: OffsetDateTime,
    service: String,
    version: String,
    /// Base64 of the key's bytes.
    value: Secret,
}

/// Makes download links for blobs of one account.
pub struct Links {
    clients: StorageClients,
    lifetime: Duration,
    key: Mutex<Option<DelegationKey>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// The account a storage endpoint names: its host's first label in Azure
/// (`acct.blob.core.windows.net`), its first path segment on an emulator
/// (`http://127.0.0.1:10000/devstoreaccount1`).
pub fn account_of(endpoint: &Url) -> Option<String> {
    match endpoint.host() {
        Some(url::Host::Domain(d)) if d != "localhost" && d.contains('.') => {
            d.split('.').next().map(str::to_owned)
        }
        _ => endpoint
            .path_segments()
            .and_then(|mut s| s.find(|p| !p.is_empty()))
            .map(str::to_owned),
    }
}

/// Seconds-precision UTC, as SAS fields are written.
fn sas_time(t: OffsetDateTime) -> String {
    let t = t
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn other(detail: impl Into<String>) -> StorageError {
    StorageError::Other {
        service: SERVICE,
        detail: detail.into(),
    }
}

/// The `/blob/{account}/{container}/{blob}` a blob SAS signs.
fn canonical(account: &str, container: &str, blob: &str) -> String {
    format!("/blob/{account}/{container}/{blob}")
}

/// A read-only service SAS for one blob, signed with the account key (version 2020-12-06:
/// permissions, start, expiry, resource, identifier, IP, protocol, version, `b`, snapshot,
/// encryption scope, then the five response headers).
pub fn service_sas(
    account: &str,
    key: &Secret,
    container: &str,
    blob: &str,
    start: OffsetDateTime,
    expiry: OffsetDateTime,
    https_only: bool,
) -> Result<String, StorageError> {
    let (st, se) = (sas_time(start), sas_time(expiry));
    let spr = if https_only { "https" } else { "" };
    let resource = canonical(account, container, blob);
    let to_sign = format!("r\n{st}\n{se}\n{resource}\n\n\n{spr}\n{SAS_VERSION}\nb\n\n\n\n\n\n\n");
    let sig = hmac_sha256(&to_sign, key).map_err(|_| other("the account key is not base64"))?;
    let mut q = format!("sv={SAS_VERSION}&sr=b&sp=r&st={}&se={}", enc(&st), enc(&se));
    if https_only {
        q.push_str("&spr=https");
    }
    q.push_str(&format!("&sig={}", enc(&sig)));
    Ok(q)
}

/// A read-only user delegation SAS for one blob (version 2020-12-06).
fn delegation_sas(
    account: &str,
    k: &DelegationKey,
    container: &str,
    blob: &str,
    start: OffsetDateTime,
    expiry: OffsetDateTime,
    https_only: bool,
) -> Result<String, StorageError> {
    let (st, se) = (sas_time(start), sas_time(expiry));
    let spr = if https_only { "https" } else { "" };
    let resource = canonical(account, container, blob);
    // permissions, start, expiry, resource, skoid, sktid, skt, ske, sks, skv, saoid, suoid,
    // scid, IP, protocol, version, resource type, snapshot, encryption scope, rscc … rsct.
    let to_sign = [
        "r",
        &st,
        &se,
        &resource,
        &k.oid,
        &k.tid,
        &k.start,
        &k.expiry,
        &k.service,
        &k.version,
        "",
        "",
        "",
        "",
        spr,
        SAS_VERSION,
        "b",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
    ]
    .join("\n");
    let sig =
        hmac_sha256(&to_sign, &k.value).map_err(|_| other("the delegation key is not base64"))?;
    let mut q = format!(
        "sv={SAS_VERSION}&sr=b&sp=r&st={}&se={}&skoid={}&sktid={}&skt={}&ske={}&sks={}&skv={}",
        enc(&st),
        enc(&se),
        enc(&k.oid),
        enc(&k.tid),
        enc(&k.start),
        enc(&k.expiry),
        enc(&k.service),
        enc(&k.version),
    );
    if https_only {
        q.push_str("&spr=https");
    }
    q.push_str(&format!("&sig={}", enc(&sig)));
    Ok(q)
}

impl Links {
    pub fn new(clients: &StorageClients) -> Self {
        Self {
            clients: clients.clone(),
            lifetime: DEFAULT_LIFETIME,
            key: Mutex::new(None),
        }
    }

    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// How long a link lasts.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Whether this account's settings can sign links at all (not under a connection SAS).
    pub fn can_sign(&self) -> bool {
        !matches!(self.clients.settings().auth, StorageAuth::Sas { .. })
    }

    /// A link that reads `blob` of `container` until `now + lifetime`; `None` under a connection
    /// SAS (see the module's doc).
    pub async fn read_url(
        &self,
        container: &str,
        blob: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Url>, StorageError> {
        let endpoint = &self.clients.settings().blob_endpoint;
        let account =
            account_of(endpoint).ok_or_else(|| other(format!("no account name in {endpoint}")))?;
        let https_only = endpoint.scheme() == "https";
        let start = now - SKEW;
        let expiry = now + time::Duration::try_from(self.lifetime).unwrap_or(SKEW);
        let query = match &self.clients.settings().auth {
            StorageAuth::Sas { .. } => return Ok(None),
            StorageAuth::SharedKey { account, key } => {
                service_sas(account, key, container, blob, start, expiry, https_only)?
            }
            StorageAuth::Token(_) => {
                let key = self.delegation_key(now, expiry).await?;
                delegation_sas(&account, &key, container, blob, start, expiry, https_only)?
            }
        };
        let mut url = endpoint.clone();
        url.path_segments_mut()
            .map_err(|_| other(format!("{endpoint} cannot hold a blob name")))?
            .pop_if_empty()
            .push(container)
            .extend(blob.split('/'));
        url.set_query(Some(&query));
        Ok(Some(url))
    }

    /// The delegation key, asked for again when it would expire before a link made now.
    async fn delegation_key(
        &self,
        now: OffsetDateTime,
        link_expiry: OffsetDateTime,
    ) -> Result<DelegationKey, StorageError> {
        let mut held = self.key.lock().await;
        if let Some(k) = held.as_ref()
            && k.expires_at > link_expiry + SKEW
        {
            return Ok(k.clone());
        }
        let info = KeyInfo {
            start: Some(now - SKEW),
            expiry: Some(now + KEY_LIFETIME),
            ..Default::default()
        };
        let body: RequestContent<KeyInfo, azure_core::http::XmlFormat> = info
            .try_into()
            .map_err(|_| other("cannot write the key request"))?;
        let rsp = self
            .clients
            .blob_service()?
            .get_user_delegation_key(body, None)
            .await
            .map_err(|e| StorageError::from_azure(SERVICE, &e))?;
        let k = rsp
            .into_model()
            .map_err(|e| StorageError::from_azure(SERVICE, &e))?;
        let missing = |what: &str| other(format!("the user delegation key has no {what}"));
        let start = k.signed_start.ok_or_else(|| missing("start"))?;
        let expiry = k.signed_expiry.ok_or_else(|| missing("expiry"))?;
        use base64::Engine as _;
        let key = DelegationKey {
            oid: k.signed_oid.ok_or_else(|| missing("object id"))?,
            tid: k.signed_tid.ok_or_else(|| missing("tenant id"))?,
            start: sas_time(start),
            expiry: sas_time(expiry),
            expires_at: expiry,
            service: k.signed_service.unwrap_or_else(|| "b".into()),
            version: k.signed_version.ok_or_else(|| missing("version"))?,
            value: Secret::new(
                base64::engine::general_purpose::STANDARD
                    .encode(k.value.ok_or_else(|| missing("value"))?),
            ),
        };
        *held = Some(key.clone());
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn the_account_comes_from_the_host_or_the_emulators_path() {
        let a = |u: &str| account_of(&Url::parse(u).unwrap());
        assert_eq!(
            a("https://acct.blob.core.windows.net/"),
            Some("acct".into())
        );
        assert_eq!(
            a("http://127.0.0.1:10000/devstoreaccount1"),
            Some("devstoreaccount1".into())
        );
        assert_eq!(
            a("http://localhost:10000/devstoreaccount1/"),
            Some("devstoreaccount1".into())
        );
    }

    /// The service SAS Microsoft's documentation describes, field by field: one blob, read
    /// only, and the signature over exactly these values.
    #[test]
    fn a_service_sas_reads_one_blob_for_a_while() {
        let key = Secret::new("a2V5LWJ5dGVzLWZvci10ZXN0aW5nLW9ubHk=");
        let q = service_sas(
            "acct",
            &key,
            "models",
            "Widgets/Iteration 1/ONNX.zip",
            datetime!(2026-12-01 10:00:00.5 UTC),
            datetime!(2026-12-01 10:15:00 UTC),
            true,
        )
        .unwrap();
        let to_sign = "r\n2026-12-01T10:00:00Z\n2026-12-01T10:15:00Z\n\
                       /blob/acct/models/Widgets/Iteration 1/ONNX.zip\n\n\nhttps\n2020-12-06\nb\n\n\n\n\n\n\n";
        let sig = hmac_sha256(to_sign, &key).unwrap();
        assert_eq!(
            q,
            format!(
                "sv=2020-12-06&sr=b&sp=r&st=2026%2D12%2D01T10%3A00%3A00Z&se=2026%2D12%2D01T10%3A15%3A00Z&spr=https&sig={}",
                enc(&sig)
            )
        );
        assert!(!q.contains(key.secret()));
    }
}
