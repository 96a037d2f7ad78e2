//! Claims: at most one invocation at a time may request an export or copy a model, even when
//! the queue delivers the same message to two instances at once. A claim is an insert-if-absent
//! row; a claim whose holder crashed expires and is taken over with an ETag-conditional update,
//! so exactly one contender wins. No check-then-act. Which key guards what, and when a claim has
//! lapsed, is decided in `cvchain_core::claims`.
//!
//! Work can outlast a claim's lifetime (a copy is polled for up to ten minutes, a Custom Vision
//! call retried for minutes), so [`Claims::hold`] renews the claim while the work runs, as the
//! worker renews its message lease, and stops the work the moment the claim turns out to be
//! lost: two holders never work at once.

use super::{from_stored, props_to_entity, to_entity};
use crate::storage::{
    StorageError,
    table::{TableClient, UpdateMode, WriteOutcome},
};
use cvchain_core::claims::{ClaimKey, claim_row, is_expired};
use cvchain_core::history::{Prop, Props};
use std::future::Future;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;
use uuid::Uuid;

/// Why work under a claim did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// The claim lapsed or was taken over while the work ran; the work was stopped. Retrying
    /// later is right: the new holder finishes or resumes it.
    #[error("the claim {0} lapsed while its work ran; the work was stopped")]
    Lost(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A held claim; release it when the work is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub partition_key: String,
    pub row_key: String,
    pub etag: String,
    pub owner: Uuid,
    /// Taken over from a holder whose claim expired (it may have crashed mid-work).
    pub taken_over: bool,
    /// When its stored expiry was computed (it lasts a lifetime from then), which may be well
    /// before the claim is used: taking a claim over takes three round trips, and a copy reads
    /// its source beside taking its claim.
    pub set_at: Instant,
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
        let asked = Instant::now();
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
            set_at: asked,
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
            WriteOutcome::Written { etag } => {
                // Its holder stopped renewing it: crashed, or stalled past its lifetime.
                tracing::warn!(claim = %rk, "took over an expired claim");
                Ok(Some(held(etag, true)))
            }
            _ => Ok(None),
        }
    }

    /// Extends a held claim by another lifetime (ETag-conditional); `None` when it was taken
    /// over meanwhile.
    pub async fn renew(&self, claim: &Claim) -> Result<Option<Claim>, StorageError> {
        let asked = Instant::now();
        let expires = OffsetDateTime::now_utc()
            + time::Duration::try_from(self.ttl).unwrap_or(time::Duration::minutes(2));
        let mut props = Props::new();
        props.set(Prop::ExpiresAt, expires);
        let mut entity = props_to_entity(&props);
        entity.insert("PartitionKey".into(), claim.partition_key.clone().into());
        entity.insert("RowKey".into(), claim.row_key.clone().into());
        match self
            .table
            .update(&entity, UpdateMode::Merge, &claim.etag)
            .await?
        {
            WriteOutcome::Written { etag } => Ok(Some(Claim {
                etag,
                set_at: asked,
                ..claim.clone()
            })),
            _ => Ok(None),
        }
    }

    /// Runs `work` under `claim`, renewing it every third of its lifetime, then gives it back.
    /// When a renewal finds the claim taken over, or renewals keep failing until the claim is
    /// about to lapse, `work` is dropped at once and [`HoldError::Lost`] returned.
    pub async fn hold<T>(
        &self,
        claim: Claim,
        work: impl Future<Output = T>,
    ) -> Result<T, HoldError> {
        let (out, claim) = self.hold_keep(claim, work).await?;
        // A claim not given back expires on its own: the work's outcome matters more.
        if let Err(e) = self.release(&claim).await {
            tracing::warn!(error = %e, claim = %claim.row_key, "cannot give a claim back; it expires");
        }
        Ok(out)
    }

    /// As [`hold`](Self::hold), but the claim is not given back: it is returned as last
    /// renewed, for the caller to give back in the transaction that records the work
    /// (`HistoryStore::record_with`), or with [`release`](Self::release).
    pub async fn hold_keep<T>(
        &self,
        claim: Claim,
        work: impl Future<Output = T>,
    ) -> Result<(T, Claim), HoldError> {
        let period = (self.ttl / 3).max(Duration::from_millis(100));
        let mut claim = claim;
        // Renewed a third of its life after its expiry was set, which may be now already.
        let mut next = claim.set_at + period;
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok((out, claim)),
                _ = tokio::time::sleep_until(next) => {
                    match self.renew(&claim).await {
                        Ok(Some(renewed)) => {
                            claim = renewed;
                            next = Instant::now() + period;
                        }
                        Ok(None) => return Err(HoldError::Lost(claim.row_key.clone())),
                        Err(e) => {
                            tracing::warn!(error = %e, claim = %claim.row_key, "cannot renew a claim; retrying");
                            // Stop before the claim can lapse under the work.
                            if Instant::now() + period / 2 >= claim.set_at + self.ttl {
                                return Err(HoldError::Lost(claim.row_key.clone()));
                            }
                            next = Instant::now() + (period / 4).max(Duration::from_millis(50));
                        }
                    }
                }
            }
        }
    }

    /// Renews the claims in `kept` every third of their lifetime, for as long as it runs (beside
    /// the work that gives them back at its end; it never ends on its own). A claim is renewed
    /// first soon after it is added, since its holder may have renewed it last up to a third of
    /// its life before; a renewal that fails is tried again soon. A claim found taken over is
    /// marked lost, so it is not given back.
    pub async fn keep_renewed(&self, kept: &Kept) -> std::convert::Infallible {
        let period = (self.ttl / 3).max(Duration::from_millis(100));
        let tick = period / 4;
        loop {
            tokio::time::sleep(tick).await;
            let _gate = kept.gate.lock().await;
            let now = Instant::now();
            let due: Vec<Claim> = kept
                .held
                .lock()
                .expect("no panic holds it")
                .values()
                .filter(|k| k.due <= now)
                .filter_map(|k| k.claim.clone())
                .collect();
            for claim in due {
                let (renewed, next) = match self.renew(&claim).await {
                    Ok(r) => (r, Instant::now() + period),
                    Err(e) => {
                        tracing::warn!(error = %e, claim = %claim.row_key, "cannot renew a claim; retrying");
                        (Some(claim.clone()), Instant::now() + tick)
                    }
                };
                let mut map = kept.held.lock().expect("no panic holds it");
                if let Some(slot) = map.get_mut(&claim.row_key) {
                    *slot = KeptClaim {
                        claim: renewed,
                        due: next,
                    };
                }
            }
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

/// A kept claim as last renewed (`None`: taken over) and when its next renewal is due.
#[derive(Debug, Clone)]
struct KeptClaim {
    claim: Option<Claim>,
    due: Instant,
}

/// Claims whose work is done, held until the transaction that records the work gives them
/// back (see [`Claims::keep_renewed`]). Renewals and that transaction take turns (`gate`), so
/// the transaction sends each claim's ETag as last renewed.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    held: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, KeptClaim>>>,
    gate: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Kept {
    /// Holds `claim` until it is given back; its first renewal is due at once.
    pub fn add(&self, claim: Claim) {
        self.held.lock().expect("no panic holds it").insert(
            claim.row_key.clone(),
            KeptClaim {
                claim: Some(claim),
                due: Instant::now(),
            },
        );
    }

    /// Waits for renewals to pause; they resume when the guard is dropped.
    pub async fn pause(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    /// `claim` as last renewed (`None`: taken over meanwhile, not ours to give back).
    pub fn current(&self, claim: &Claim) -> Option<Claim> {
        match self
            .held
            .lock()
            .expect("no panic holds it")
            .get(&claim.row_key)
        {
            Some(slot) => slot.claim.clone(),
            None => Some(claim.clone()),
        }
    }

    /// No longer held (given back, or left to expire).
    pub fn forget(&self, claim: &Claim) {
        self.held
            .lock()
            .expect("no panic holds it")
            .remove(&claim.row_key);
    }
}
