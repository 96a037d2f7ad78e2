//! Claims: at most one invocation at a time may request an export or copy a model, even when
//! the queue delivers the same message to two instances at once. A claim is an insert-if-absent
//! row; a claim whose holder crashed expires and is taken over with an ETag-conditional update,
//! so exactly one contender wins. No check-then-act. Which key guards what, and when a claim has
//! lapsed, is decided in `cvchain_core::claims`.

use super::{from_stored, to_entity};
use crate::storage::{
    StorageError,
    table::{TableClient, UpdateMode, WriteOutcome},
};
use cvchain_core::claims::{ClaimKey, claim_row, is_expired};
use std::time::Duration;
use time::OffsetDateTime;
use uuid::Uuid;

/// A held claim; release it when the work is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub partition_key: String,
    pub row_key: String,
    pub etag: String,
    pub owner: Uuid,
    /// Taken over from a holder whose claim expired (it may have crashed mid-work).
    pub taken_over: bool,
}

#[derive(Debug, Clone)]
pub struct Claims {
    table: TableClient,
    ttl: Duration,
}

impl Claims {
    pub fn new(table: TableClient, ttl: Duration) -> Self {
        Self { table, ttl }
    }

    /// Takes the claim, or `None` while someone else holds it.
    pub async fn acquire(&self, key: &ClaimKey) -> Result<Option<Claim>, StorageError> {
        let owner = Uuid::new_v4();
        let now = OffsetDateTime::now_utc();
        let expires =
            now + time::Duration::try_from(self.ttl).unwrap_or(time::Duration::minutes(2));
        let entity = to_entity(&claim_row(key, owner, expires));
        let (pk, rk) = (key.partition_key.as_str(), key.row_key.as_str());
        let held = |etag, taken_over| Claim {
            partition_key: pk.into(),
            row_key: rk.into(),
            etag,
            owner,
            taken_over,
        };
        let first = match self.table.insert(&entity).await {
            Err(StorageError::Service { status: 404, .. }) => {
                self.table.create_if_missing().await?;
                self.table.insert(&entity).await?
            }
            other => other?,
        };
        if let WriteOutcome::Written { etag } = first {
            return Ok(Some(held(etag, false)));
        }
        // Held: take it over only if it expired, and only if nobody else did first.
        let Some(current) = self.table.get(pk, rk).await? else {
            return Ok(None);
        };
        if !is_expired(&from_stored(&current), now) {
            return Ok(None);
        }
        match self
            .table
            .update(&entity, UpdateMode::Replace, &current.etag)
            .await?
        {
            WriteOutcome::Written { etag } => Ok(Some(held(etag, true))),
            _ => Ok(None),
        }
    }

    /// Gives the claim back; a claim that expired and was taken over is left to its new holder.
    pub async fn release(&self, claim: &Claim) -> Result<(), StorageError> {
        self.table
            .delete(&claim.partition_key, &claim.row_key, &claim.etag)
            .await
            .map(|_| ())
    }
}
