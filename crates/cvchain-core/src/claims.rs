//! Claims, decided: which key guards which piece of work, what a claim row holds, and when a
//! claim has lapsed. The adapter (`cvchain_azure::history::claims`) takes and gives them back
//! with conditional writes.

use crate::chain::ExportTarget;
use crate::history::{HistoryRow, Prop, Props, RowKind, key_part, safe_key};
use time::OffsetDateTime;
use uuid::Uuid;

/// The work a claim guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Requesting one export of an iteration (ExportIteration).
    ExportRequest,
    /// Copying one export into the release container.
    Copy,
    /// Delivering a project's outbox: one deliverer at a time, so no sink gets an event twice.
    Deliver,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::ExportRequest => "ExportIteration",
            Purpose::Copy => "Copy",
            Purpose::Deliver => "DeliverEvents",
        }
    }
}

/// Which claim guards a piece of work: its row in the project's partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimKey {
    pub partition_key: String,
    pub row_key: String,
    pub purpose: Purpose,
}

impl ClaimKey {
    /// One requester at a time for an export of an iteration.
    pub fn export_request(project: Uuid, iteration: Uuid, target: &ExportTarget) -> Self {
        Self {
            partition_key: project.to_string(),
            row_key: safe_key(format!("Claim_{iteration}_{}", key_part(&target.key()))),
            purpose: Purpose::ExportRequest,
        }
    }

    /// One copier at a time for an export's release copy.
    pub fn copy(project: Uuid, iteration: Uuid, target: &ExportTarget) -> Self {
        Self {
            partition_key: project.to_string(),
            row_key: safe_key(format!(
                "ReleaseClaim_{iteration}_{}",
                key_part(&target.key())
            )),
            purpose: Purpose::Copy,
        }
    }
}

impl ClaimKey {
    /// One deliverer at a time for a project's outbox (a partition key: a project id, or a
    /// partition such as `_noproject`).
    pub fn deliver(partition_key: &str) -> Self {
        Self {
            partition_key: partition_key.to_owned(),
            row_key: "DeliveryClaim".into(),
            purpose: Purpose::Deliver,
        }
    }
}

/// The row that holds a claim for `owner` until `expires_at`.
pub fn claim_row(key: &ClaimKey, owner: Uuid, expires_at: OffsetDateTime) -> HistoryRow {
    let mut properties = Props::new();
    properties.set(Prop::EventType, RowKind::Claim.as_str());
    properties.set(Prop::Owner, owner.to_string());
    properties.set(Prop::Purpose, key.purpose.as_str());
    properties.set(Prop::ExpiresAt, expires_at);
    HistoryRow {
        partition_key: key.partition_key.clone(),
        row_key: key.row_key.clone(),
        properties,
    }
}

/// Whether a claim row has expired at `now` (a row without a readable expiry counts as expired).
pub fn is_expired(row: &HistoryRow, now: OffsetDateTime) -> bool {
    row.properties
        .time(Prop::ExpiresAt)
        .is_none_or(|at| at <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn expiry_is_read_from_the_row() {
        let key = ClaimKey::copy(
            Uuid::nil(),
            Uuid::nil(),
            &ExportTarget {
                platform: "ONNX".into(),
                flavor: None,
            },
        );
        let now = datetime!(2026-11-26 10:00 UTC);
        let mut row = claim_row(&key, Uuid::nil(), datetime!(2026-11-26 10:01 UTC));
        assert!(!is_expired(&row, now));
        assert!(is_expired(&row, datetime!(2026-11-26 10:01 UTC)));
        row.properties.remove(Prop::ExpiresAt);
        assert!(is_expired(&row, now));
        assert_eq!(row.row_key, format!("ReleaseClaim_{}_ONNX", Uuid::nil()));
        assert_eq!(row.properties[Prop::Purpose], "Copy");
    }
}
