//! SharedKey request signing as an `azure_core` policy: the GA SDK has no account-key auth, and
//! connection strings and Azurite need it.
//!
//! Placed in `per_try_policies`, it runs after the retry policy on every try, so each try gets a
//! fresh `x-ms-date`. Canonicalization follows Microsoft's "Authorize with Shared Key" (the
//! 2009-09-19+ form for Blob and Queue, the Table form for Table).

use azure_core::{
    credentials::Secret,
    hmac::hmac_sha256,
    http::{
        Context, Request, Url,
        policies::{Policy, PolicyResult},
    },
};
use std::{borrow::Cow, sync::Arc};

/// Which canonicalization the service expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Blob,
    Queue,
    Table,
}

/// Signs each request with the account key.
#[derive(Clone)]
pub struct SharedKeyPolicy {
    account: String,
    key: Secret,
    service: Service,
}

impl std::fmt::Debug for SharedKeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SharedKeyPolicy")
            .field("account", &self.account)
            .field("service", &self.service)
            .finish()
    }
}

impl SharedKeyPolicy {
    pub fn new(account: impl Into<String>, key: Secret, service: Service) -> Arc<Self> {
        Arc::new(Self {
            account: account.into(),
            key,
            service,
        })
    }

    /// Stamps `x-ms-date` and `Authorization` on the request.
    pub fn sign(&self, request: &mut Request) -> azure_core::Result<()> {
        let date = azure_core::time::to_rfc7231(&azure_core::time::OffsetDateTime::now_utc());
        request.insert_header("x-ms-date", date);
        let string_to_sign = string_to_sign(self.service, &self.account, request);
        let signature = hmac_sha256(&string_to_sign, &self.key)?;
        request.insert_header(
            "authorization",
            format!("SharedKey {}:{}", self.account, signature),
        );
        Ok(())
    }
}

#[async_trait::async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        self.sign(request)?;
        next[0].send(ctx, request, &next[1..]).await
    }
}

fn header<'a>(request: &'a Request, name: &str) -> Cow<'a, str> {
    request
        .headers()
        .iter()
        .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
        .map(|(_, v)| Cow::Borrowed(v.as_str()))
        .unwrap_or(Cow::Borrowed(""))
}

/// The exact text the service signs for this request.
pub fn string_to_sign(service: Service, account: &str, request: &Request) -> String {
    let verb = request.method().as_ref().to_ascii_uppercase();
    match service {
        Service::Table => {
            // VERB \n Content-MD5 \n Content-Type \n Date \n CanonicalizedResource
            format!(
                "{verb}\n{}\n{}\n{}\n{}",
                header(request, "content-md5"),
                header(request, "content-type"),
                header(request, "x-ms-date"),
                table_resource(account, request.url())
            )
        }
        Service::Blob | Service::Queue => {
            let length = match request.body().len() {
                Some(0) | None => String::new(),
                Some(n) => n.to_string(),
            };
            let mut s = String::with_capacity(256);
            s.push_str(&verb);
            s.push('\n');
            for name in ["content-encoding", "content-language"] {
                s.push_str(&header(request, name));
                s.push('\n');
            }
            s.push_str(&length);
            s.push('\n');
            for name in [
                "content-md5",
                "content-type",
                // Date is empty: x-ms-date is always set and signed among the x-ms- headers.
                "date",
                "if-modified-since",
                "if-match",
                "if-none-match",
                "if-unmodified-since",
                "range",
            ] {
                if name != "date" {
                    s.push_str(&header(request, name));
                }
                s.push('\n');
            }
            s.push_str(&canonical_headers(request));
            s.push_str(&blob_queue_resource(account, request.url()));
            s
        }
    }
}

/// `x-ms-*` headers, lower-cased, sorted, one `name:value\n` each.
fn canonical_headers(request: &Request) -> String {
    let mut headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            let name = k.as_str().to_ascii_lowercase();
            name.starts_with("x-ms-").then(|| {
                let value = v.as_str().split_whitespace().collect::<Vec<_>>().join(" ");
                (name, value)
            })
        })
        .collect();
    headers.sort();
    headers
        .into_iter()
        .map(|(k, v)| format!("{k}:{v}\n"))
        .collect()
}

/// `/account/path` then each query parameter, lower-cased and sorted, as `\nname:v1,v2`.
fn blob_queue_resource(account: &str, url: &Url) -> String {
    let mut s = format!("/{account}{}", url.path());
    let mut params: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in url.query_pairs() {
        let k = k.to_ascii_lowercase();
        match params.iter_mut().find(|(name, _)| *name == k) {
            Some((_, values)) => values.push(v.into_owned()),
            None => params.push((k, vec![v.into_owned()])),
        }
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, mut values) in params {
        values.sort();
        s.push('\n');
        s.push_str(&k);
        s.push(':');
        s.push_str(&values.join(","));
    }
    s
}

/// `/account/path`, plus `?comp=…` when the request has one.
fn table_resource(account: &str, url: &Url) -> String {
    let mut s = format!("/{account}{}", url.path());
    if let Some((_, comp)) = url.query_pairs().find(|(k, _)| k == "comp") {
        s.push_str("?comp=");
        s.push_str(&comp);
    }
    s
}

/// A read-only blob service SAS (version 2019-12-12) signed with the account key: the kind of
/// URL Custom Vision hands out as `downloadUri`. Used by the stand-in.
pub fn blob_read_sas(
    account: &str,
    key: &Secret,
    container: &str,
    blob: &str,
    expiry: &str,
) -> azure_core::Result<String> {
    let version = "2019-12-12";
    let resource = format!("/blob/{account}/{container}/{blob}");
    // sp, st, se, canonicalizedResource, si, sip, spr, sv, sr, snapshot, rscc, rscd, rsce, rscl, rsct
    let string_to_sign = format!("r\n\n{expiry}\n{resource}\n\n\n\n{version}\nb\n\n\n\n\n\n");
    let sig = hmac_sha256(&string_to_sign, key)?;
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    Ok(format!(
        "sv={version}&sr=b&sp=r&se={}&sig={}",
        enc(expiry),
        enc(&sig)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::Method;

    fn request(method: Method, url: &str) -> Request {
        Request::new(Url::parse(url).unwrap(), method)
    }

    #[test]
    fn blob_string_to_sign_follows_the_documented_layout() {
        let mut r = request(
            Method::Put,
            "http://127.0.0.1:10000/devstoreaccount1/models/a%20-%20b.ONNX?comp=tags&timeout=30",
        );
        r.insert_header("x-ms-version", "2025-11-05");
        r.insert_header("x-ms-date", "Thu, 26 Nov 2026 10:00:00 GMT");
        r.insert_header("content-type", "application/xml");
        r.insert_header("if-match", "\"0x1\"");
        r.set_body(b"<Tags/>".to_vec());
        let s = string_to_sign(Service::Blob, "devstoreaccount1", &r);
        assert_eq!(
            s,
            "PUT\n\n\n7\n\napplication/xml\n\n\n\"0x1\"\n\n\n\n\
             x-ms-date:Thu, 26 Nov 2026 10:00:00 GMT\nx-ms-version:2025-11-05\n\
             /devstoreaccount1/devstoreaccount1/models/a%20-%20b.ONNX\ncomp:tags\ntimeout:30"
        );
    }

    #[test]
    fn an_empty_body_signs_an_empty_length() {
        let r = request(
            Method::Get,
            "https://acct.queue.core.windows.net/q/messages",
        );
        let s = string_to_sign(Service::Queue, "acct", &r);
        assert!(s.starts_with("GET\n\n\n\n"), "{s:?}");
        assert!(s.ends_with("/acct/q/messages"), "{s:?}");
    }

    #[test]
    fn table_string_to_sign_keeps_only_comp() {
        let mut r = request(
            Method::Get,
            "http://127.0.0.1:10002/devstoreaccount1/History()?$filter=PartitionKey%20eq%20'a'&comp=list",
        );
        r.insert_header("x-ms-date", "Thu, 26 Nov 2026 10:00:00 GMT");
        r.insert_header("content-type", "application/json");
        let s = string_to_sign(Service::Table, "devstoreaccount1", &r);
        assert_eq!(
            s,
            "GET\n\napplication/json\nThu, 26 Nov 2026 10:00:00 GMT\n\
             /devstoreaccount1/devstoreaccount1/History()?comp=list"
        );
    }

    #[test]
    fn signing_stamps_date_and_authorization_without_showing_the_key() {
        let key = Secret::new("c2VjcmV0");
        let policy = SharedKeyPolicy::new("acct", key, Service::Blob);
        let mut r = request(
            Method::Get,
            "https://acct.blob.core.windows.net/c?restype=container",
        );
        policy.sign(&mut r).unwrap();
        let auth = header(&r, "authorization").into_owned();
        assert!(auth.starts_with("SharedKey acct:"), "{auth}");
        assert!(!header(&r, "x-ms-date").is_empty());
        assert!(!format!("{policy:?}").contains("c2VjcmV0"));
    }
}
