//! Rejected texts too large for the poison queue (over 64 KiB, or a broken invocation body of up
//! to 1 MiB): stored whole as blobs in a container named like the poison queue, so nothing is
//! lost and the message can be answered for good.

use super::StorageError;
use azure_core::http::{RequestContent, StatusCode};
use azure_storage_blob::{BlobContainerClient, models::BlobClientUploadOptions};

const SERVICE: &str = "blob";

/// Writes `text` to `blob` in `container` unless a blob of that name is there already (a
/// redelivery stored it), creating the container on first use.
pub async fn store_text(
    container: &BlobContainerClient,
    blob: &str,
    text: &str,
) -> Result<(), StorageError> {
    let client = container.blob_client(blob);
    let upload = || {
        client.upload(
            RequestContent::from(text.as_bytes().to_vec()),
            Some(
                BlobClientUploadOptions {
                    blob_content_type: Some("text/plain; charset=utf-8".into()),
                    ..Default::default()
                }
                .if_not_exists(),
            ),
        )
    };
    let first = upload().await;
    let result = match first {
        Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
            match container.create(None).await {
                Ok(_) => {}
                Err(e) if e.http_status() == Some(StatusCode::Conflict) => {}
                Err(e) => return Err(StorageError::from_azure(SERVICE, &e)),
            }
            upload().await
        }
        other => other,
    };
    match result {
        Ok(_) => Ok(()),
        // Already stored by an earlier delivery.
        Err(e)
            if matches!(
                e.http_status(),
                Some(StatusCode::Conflict | StatusCode::PreconditionFailed)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(StorageError::from_azure(SERVICE, &e)),
    }
}
