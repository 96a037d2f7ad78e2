//! Claims: at most one invocation at a time may request an export or copy a model, even when
//! the queue delivers the same message to two instances at once. A claim is an insert-if-absent
//! row; a claim whose holder crashed expires and is taken over with an ETag-conditional update,
//! so exactly one contender wins. No check-then-act.

use crate::history::{parse_service_time, table_datetime};
use crate::storage::{
    StorageError,
    table::{Entity, TableClient, UpdateMode, WriteOutcome},
};
use serde_json::{Value, json};
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
}

/// Whether a claim row has expired at `now` (a row without a readable expiry counts as expired).
pub fn is_expired(entity: &Entity, now: OffsetDateTime) -> bool {
    entity
        .get("ExpiresAt")
        .and_then(Value::as_str)
        .and_then(parse_service_time)
        .is_none_or(|at| at <= now)
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

    fn entity(
        &self,
        pk: &str,
        rk: &str,
        owner: Uuid,
        purpose: &str,
        now: OffsetDateTime,
    ) -> Entity {
        let expires =
            now + time::Duration::try_from(self.ttl).unwrap_or(time::Duration::minutes(2));
        let mut e = Entity::new();
        e.insert("PartitionKey".into(), json!(pk));
        e.insert("RowKey".into(), json!(rk));
        e.insert("EventType".into(), json!("Claim"));
        e.insert("Owner".into(), json!(owner.to_string()));
        e.insert("Purpose".into(), json!(purpose));
        e.insert("ExpiresAt".into(), json!(table_datetime(expires)));
        e.insert("ExpiresAt@odata.type".into(), json!("Edm.DateTime"));
        e
    }

    /// Takes the claim, or `None` while someone else holds it.
    pub async fn acquire(
        &self,
        pk: &str,
        rk: &str,
        purpose: &str,
    ) -> Result<Option<Claim>, StorageError> {
        let owner = Uuid::new_v4();
        let now = OffsetDateTime::now_utc();
        let entity = self.entity(pk, rk, owner, purpose, now);
        let first = match self.table.insert(&entity).await {
            Err(StorageError::Service { status: 404, .. }) => {
                self.table.create_if_missing().await?;
                self.table.insert(&entity).await?
            }
            other => other?,
        };
        if let WriteOutcome::Written { etag } = first {
            return Ok(Some(Claim {
                partition_key: pk.into(),
                row_key: rk.into(),
                etag,
                owner,
            }));
        }
        // Held: take it over only if it expired, and only if nobody else did first.
        let Some(current) = self.table.get(pk, rk).await? else {
            return Ok(None);
        };
        if !is_expired(&current.entity, now) {
            return Ok(None);
        }
        match self
            .table
            .update(&entity, UpdateMode::Replace, &current.etag)
            .await?
        {
            WriteOutcome::Written { etag } => Ok(Some(Claim {
                partition_key: pk.into(),
                row_key: rk.into(),
                etag,
                owner,
            })),
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

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn expiry_is_read_from_the_row() {
        let mut e = Entity::new();
        let now = datetime!(2026-11-26 10:00 UTC);
        assert!(is_expired(&e, now));
        e.insert("ExpiresAt".into(), json!("2026-11-26T10:01:00.0000000Z"));
        assert!(!is_expired(&e, now));
        assert!(is_expired(&e, datetime!(2026-11-26 10:01 UTC)));
    }
}
