//! The service's storage integration, played against the stand-in's storage account: a
//! `notificationQueueUri` or `exportModelContainerUri` must name a queue or container that
//! exists in that account, and the set-up writes to both (a test blob under
//! `CustomVision-TestPermission/`, then the ConnectionTest message) before it is accepted, as
//! the service checks its access. Nothing is created: a missing queue or container, or one in
//! another account, fails the set-up locally as it would in Azure.

use cvchain_azure::storage::{
    StorageError, clients::StorageClients, queue::send_to_existing, settings::StorageAuth,
    shared_key::blob_read_sas,
};
use cvchain_core::notification::Notification;
use std::time::Duration;
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

/// Where models live when a project has no backup container (the service's own storage; the
/// stand-in creates this one, it is not the user's).
pub const INTERNAL_CONTAINER: &str = "standin-exports";

/// A queue or container a URI names in the stand-in's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its name in the account.
    pub name: String,
    /// The URI as the user gave it (echoed in the project's settings).
    pub uri: String,
    /// Its URL without a query, for building blob URLs.
    pub url: String,
}

/// Why a set-up failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupError {
    /// Storage unreachable or busy: another try may work.
    pub transient: bool,
    pub message: String,
}

impl SetupError {
    fn permanent(message: String) -> Self {
        Self {
            transient: false,
            message,
        }
    }
}

fn same_host(a: &Url, b: &Url) -> bool {
    let host = |u: &Url| match u.host_str() {
        Some(h) if h.eq_ignore_ascii_case("localhost") => "127.0.0.1".to_owned(),
        Some(h) => h.to_ascii_lowercase(),
        None => String::new(),
    };
    a.scheme() == b.scheme()
        && host(a) == host(b)
        && a.port_or_known_default() == b.port_or_known_default()
}

/// The queue or container `uri` names, when it lies directly under `endpoint` (the account's
/// queue or blob endpoint); otherwise a message saying why the service could not use it. Never
/// quotes the URI's query, which may hold a SAS.
pub fn resolve(setting: &str, uri: &str, endpoint: &Url) -> Result<Target, String> {
    let url = Url::parse(uri.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .ok_or_else(|| format!("{setting} is not an absolute http(s) URL"))?;
    let mut bare = url.clone();
    bare.set_query(None);
    bare.set_fragment(None);
    let segments: Vec<&str> = bare
        .path_segments()
        .map(|s| s.filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    let base: Vec<&str> = endpoint
        .path_segments()
        .map(|s| s.filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    let account = format!(
        "{}://{}{}",
        endpoint.scheme(),
        endpoint.host_str().unwrap_or_default(),
        endpoint.port().map(|p| format!(":{p}")).unwrap_or_default()
    );
    let in_account = same_host(&bare, endpoint)
        && segments.len() == base.len() + 1
        && segments[..base.len()] == base[..];
    if !in_account {
        return Err(format!(
            "{setting} {} is not a {} in the storage account this Custom Vision can write to ({account}/{})",
            bare.as_str().trim_end_matches('/'),
            if setting.contains("Queue") {
                "queue"
            } else {
                "container"
            },
            base.join("/")
        ));
    }
    let name = percent_encoding::percent_decode_str(segments[base.len()])
        .decode_utf8_lossy()
        .into_owned();
    Ok(Target {
        name,
        uri: uri.trim().to_owned(),
        url: bare.as_str().trim_end_matches('/').to_owned(),
    })
}

fn describe(e: &StorageError) -> SetupError {
    SetupError {
        transient: e.is_transient(),
        message: e.to_string(),
    }
}

/// The service's access check on a backup container: a test blob, written and deleted.
pub async fn check_container(
    storage: &StorageClients,
    container: &Target,
    project: Uuid,
) -> Result<(), SetupError> {
    let service = storage.blob_service().map_err(|e| describe(&e))?;
    let blob = service
        .blob_container_client(&container.name)
        .blob_client(&format!("CustomVision-TestPermission/{project}"));
    match blob
        .upload(
            azure_core::http::RequestContent::from(b"test".to_vec()),
            None,
        )
        .await
    {
        Ok(_) => {
            let _ = blob.delete(None).await;
            Ok(())
        }
        Err(e) => {
            let e = StorageError::from_azure("blob", &e);
            Err(match &e {
                StorageError::Service { status: 404, .. } => SetupError::permanent(format!(
                    "exportModelContainerUri names container {} which does not exist: create it first",
                    container.name
                )),
                _ => SetupError {
                    message: format!(
                        "exportModelContainerUri: container {} cannot be written: {e}",
                        container.name
                    ),
                    ..describe(&e)
                },
            })
        }
    }
}

/// The ConnectionTest message, which also proves the queue exists and can be written.
pub async fn connection_test(
    storage: &StorageClients,
    queue: &Target,
    project: Uuid,
    base64: bool,
) -> Result<(), SetupError> {
    let n = Notification::ConnectionTest {
        project_id: project,
    };
    send(storage, &queue.name, &n, base64)
        .await
        .map_err(|e| match &e {
            StorageError::Service { status: 404, .. } => SetupError::permanent(format!(
                "notificationQueueUri names queue {} which does not exist: create it first",
                queue.name
            )),
            _ => SetupError {
                message: format!(
                    "notificationQueueUri: queue {} cannot be written: {e}",
                    queue.name
                ),
                ..describe(&e)
            },
        })
}

async fn send(
    storage: &StorageClients,
    queue: &str,
    n: &Notification,
    base64: bool,
) -> Result<(), StorageError> {
    use base64::Engine as _;
    let Some(message) = n.to_message() else {
        return Ok(());
    };
    let mut text = message.to_string();
    if base64 {
        text = base64::engine::general_purpose::STANDARD.encode(text);
    }
    let q = storage.queue(queue)?;
    send_to_existing(&q, &text).await.map(|_| ())
}

/// A notification after training or an export. Like the service, keeps trying while storage is
/// unavailable (a lost notification would stall the chain), but not when the queue is gone.
pub async fn notify(storage: &StorageClients, queue: &str, n: &Notification, base64: bool) {
    for attempt in 0..120u32 {
        match send(storage, queue, n, base64).await {
            Ok(()) => return,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, attempt, "stand-in could not write a notification yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, queue, "stand-in dropped a notification: the queue cannot be written");
                return;
            }
        }
    }
}

/// Writes a model blob; retries while storage is unavailable. Creates the container only when
/// it is the service's own ([`INTERNAL_CONTAINER`]).
pub async fn upload(
    storage: &StorageClients,
    container: &str,
    name: &str,
    body: &[u8],
) -> Result<String, StorageError> {
    let service = storage.blob_service()?;
    let c = service.blob_container_client(container);
    let blob = c.blob_client(name);
    let mut last = None;
    for attempt in 0..120u32 {
        match blob
            .upload(azure_core::http::RequestContent::from(body.to_vec()), None)
            .await
        {
            Ok(_) => return Ok(blob.url().to_string()),
            Err(e) => {
                let e = StorageError::from_azure("blob", &e);
                if container == INTERNAL_CONTAINER
                    && matches!(e, StorageError::Service { status: 404, .. })
                {
                    // The service's own container, made on first use: nothing to warn about.
                    match c.create(None).await {
                        Ok(_) => continue,
                        Err(e)
                            if e.http_status() == Some(azure_core::http::StatusCode::Conflict) =>
                        {
                            continue;
                        }
                        Err(_) => {}
                    }
                } else if !e.is_transient() {
                    return Err(e);
                }
                tracing::warn!(error = %e, attempt, "stand-in could not write a model blob yet");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(last.unwrap_or(StorageError::Other {
        service: "blob",
        detail: "gave up".into(),
    }))
}

/// A read SAS for a blob, as GetExports' `downloadUri` carries one.
pub fn with_sas(storage: &StorageClients, url: &str, container: &str, name: &str) -> String {
    match &storage.settings().auth {
        StorageAuth::SharedKey { account, key } => {
            let expiry = (OffsetDateTime::now_utc() + time::Duration::days(1))
                .replace_nanosecond(0)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            match blob_read_sas(account, key, container, name, &expiry) {
                Ok(sas) => format!("{url}?{sas}"),
                Err(_) => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_must_name_a_queue_or_container_directly_in_the_account() {
        let azurite = Url::parse("http://127.0.0.1:10001/devstoreaccount1").unwrap();
        let ok = resolve(
            "notificationQueueUri",
            "http://localhost:10001/devstoreaccount1/cv-q?sv=x&sig=secret",
            &azurite,
        )
        .unwrap();
        assert_eq!(ok.name, "cv-q");
        assert_eq!(ok.url, "http://localhost:10001/devstoreaccount1/cv-q");
        for wrong in [
            "http://127.0.0.1:10001/otheraccount/cv-q",
            "http://127.0.0.1:10002/devstoreaccount1/cv-q",
            "https://127.0.0.1:10001/devstoreaccount1/cv-q",
            "http://127.0.0.1:10001/devstoreaccount1/cv-q/extra",
            "http://127.0.0.1:10001/devstoreaccount1",
            "not a url",
        ] {
            let e = resolve("notificationQueueUri", wrong, &azurite).unwrap_err();
            assert!(!e.contains("secret"), "{e}");
        }
        let azure = Url::parse("https://acct.blob.core.windows.net/").unwrap();
        assert_eq!(
            resolve(
                "exportModelContainerUri",
                "https://ACCT.blob.core.windows.net/backups/",
                &azure
            )
            .unwrap()
            .name,
            "backups"
        );
        assert!(
            resolve(
                "exportModelContainerUri",
                "https://other.blob.core.windows.net/backups",
                &azure
            )
            .unwrap_err()
            .contains("acct.blob.core.windows.net")
        );
    }
}
