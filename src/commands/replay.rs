//! `cvchain replay`: moves poison messages back to the queue after a fix, recording each move.

use crate::settings::Settings;
use azure_core::http::StatusCode;
use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
use cvchain_azure::history::store::HistoryStore;
use cvchain_azure::storage::{
    StorageError,
    clients::StorageClients,
    queue::{poison_queue_name, send_text},
};
use cvchain_core::history::replayed_row;
use cvchain_core::message::{Incoming, Received};
use time::OffsetDateTime;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many messages to move at most.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let moved = super::runtime()?.block_on(async {
        let clients = StorageClients::new(&settings.storage)?;
        let store = HistoryStore::new(clients.table(&settings.history_table)?);
        anyhow::Ok(replay(&settings, &clients, &store, args.limit).await?)
    })?;
    println!(
        "moved {moved} message(s) from {} back to {}",
        poison_queue_name(&settings.queue_name),
        settings.queue_name
    );
    Ok(())
}

/// Moves up to `limit` messages from `<queue>-poison` back to the queue; returns how many.
pub async fn replay(
    settings: &Settings,
    clients: &StorageClients,
    history: &HistoryStore,
    limit: usize,
) -> Result<usize, StorageError> {
    let poison = clients.queue(&poison_queue_name(&settings.queue_name))?;
    let queue = clients.queue(&settings.queue_name)?;
    let mut moved = 0;
    while moved < limit {
        let want = (limit - moved).min(32) as i32;
        let got = match poison
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(want),
                visibility_timeout: Some(60),
                ..Default::default()
            }))
            .await
        {
            Ok(r) => r
                .into_model()
                .map_err(|e| StorageError::from_azure("queue", &e))?,
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => break,
            Err(e) => return Err(StorageError::from_azure("queue", &e)),
        };
        let items = got.items.unwrap_or_default();
        if items.is_empty() {
            break;
        }
        for m in items {
            let text = m.message_text.clone().unwrap_or_default();
            let id = m.message_id.clone().unwrap_or_default();
            // Send first, then record, then delete: a crash leaves a duplicate, never a loss.
            send_text(&queue, &text).await?;
            let incoming = Incoming::decode(Received {
                text,
                message_id: Some(id.clone()),
                dequeue_count: m.dequeue_count.unwrap_or(1).clamp(1, u32::MAX as i64) as u32,
                received_at: OffsetDateTime::now_utc(),
            });
            history.record(&replayed_row(&incoming)).await?;
            poison
                .delete_message(&id, m.pop_receipt.as_deref().unwrap_or_default(), None)
                .await
                .map_err(|e| StorageError::from_azure("queue", &e))?;
            moved += 1;
        }
    }
    Ok(moved)
}
