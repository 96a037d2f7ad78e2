//! Queue helpers over the SDK: sending text (creating the queue when missing), used for the
//! poison copy of rejected messages.

use super::StorageError;
use azure_core::http::StatusCode;
use azure_storage_queue::{QueueClient, models::QueueMessage};
use base64::Engine as _;

/// The queue the Functions host moves failed messages to; cvchain copies rejected ones there too.
pub fn poison_queue_name(queue: &str) -> String {
    format!("{queue}-poison")
}

/// How a text was put on the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentAs {
    /// As it is.
    Text,
    /// Base64 of its UTF-8 bytes, because XML 1.0 cannot carry some of its characters.
    Base64,
}

impl SentAs {
    pub fn as_str(self) -> &'static str {
        match self {
            SentAs::Text => "text",
            SentAs::Base64 => "base64",
        }
    }
}

use cvchain_core::message::xml_safe;

/// Sends `text`, creating the queue if it does not exist yet.
pub async fn send_text(client: &QueueClient, text: &str) -> Result<SentAs, StorageError> {
    match send_to_existing(client, text).await {
        Err(StorageError::Service { status: 404, .. }) => {
            create_if_missing(client).await?;
            send_to_existing(client, text).await
        }
        other => other,
    }
}

/// Sends `text` to a queue that must exist already (a missing queue is a 404 `Service` error):
/// what a writer that may not create queues, such as Custom Vision, does.
pub async fn send_to_existing(client: &QueueClient, text: &str) -> Result<SentAs, StorageError> {
    let (body, sent_as) = if xml_safe(text) {
        (text.to_owned(), SentAs::Text)
    } else {
        (
            base64::engine::general_purpose::STANDARD.encode(text),
            SentAs::Base64,
        )
    };
    let message: QueueMessage = QueueMessage {
        message_text: Some(body),
    };
    let message = message
        .try_into()
        .map_err(|e: azure_core::Error| StorageError::from_azure("queue", &e))?;
    client
        .send_message(message, None)
        .await
        .map(|_| sent_as)
        .map_err(|e| StorageError::from_azure("queue", &e))
}

/// Creates the queue; an existing queue is fine.
pub async fn create_if_missing(client: &QueueClient) -> Result<(), StorageError> {
    match client.create(None).await {
        Ok(_) => Ok(()),
        Err(e) if e.http_status() == Some(StatusCode::Conflict) => Ok(()),
        Err(e) => Err(StorageError::from_azure("queue", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_unsafe_text_is_detected() {
        assert!(xml_safe("{\"a\":\"ü\t\n\"}"));
        assert!(!xml_safe("a\u{0}b"));
        assert!(!xml_safe("a\u{1b}b"));
        assert!(!xml_safe("\u{FFFE}"));
    }

    #[test]
    fn poison_queue_is_named_like_the_hosts() {
        assert_eq!(poison_queue_name("cv"), "cv-poison");
    }
}
