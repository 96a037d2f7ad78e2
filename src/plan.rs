//! What to do with a message: a pure function of the message and the settings. The adapters in
//! `process` carry the actions out.

use crate::history::{HistoryRow, Received, notification_row, rejected_row};
use crate::notification::{Parsed, parse};
use serde_json::json;

/// What cvchain made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Understood (including `Unknown` kinds, which are recorded, not rejected).
    Accepted(Parsed),
    /// Cannot be processed, now or ever: recorded and copied to the poison queue.
    Rejected {
        reason: String,
        field: Option<String>,
    },
}

/// One effect to carry out, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Insert the row unless a row with its keys exists.
    Record(HistoryRow),
    /// Copy the message text to the poison queue, once per recorded row.
    CopyToPoison { queue: String, text: String },
}

/// What the planner needs from the settings.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    pub poison_queue: String,
}

/// Decides for a queue message.
pub fn plan(received: &Received, config: &PlanConfig) -> (Decision, Vec<Action>) {
    match parse(&received.text) {
        Ok(parsed) => {
            let row = notification_row(received, &parsed);
            (Decision::Accepted(parsed), vec![Action::Record(row)])
        }
        Err(e) => reject(
            received,
            &e.to_string(),
            e.field().map(str::to_owned),
            config,
        ),
    }
}

/// Decides for something that arrived but could not even be read as a message (a broken envelope).
pub fn plan_unreadable(
    received: &Received,
    reason: &str,
    config: &PlanConfig,
) -> (Decision, Vec<Action>) {
    reject(received, reason, None, config)
}

fn reject(
    received: &Received,
    reason: &str,
    field: Option<String>,
    config: &PlanConfig,
) -> (Decision, Vec<Action>) {
    let mut row = rejected_row(received, reason, field.as_deref());
    row.properties
        .insert("PoisonQueue".into(), json!(config.poison_queue));
    row.properties.insert("PoisonCopy".into(), json!("pending"));
    (
        Decision::Rejected {
            reason: reason.to_owned(),
            field,
        },
        vec![
            Action::Record(row),
            Action::CopyToPoison {
                queue: config.poison_queue.clone(),
                text: received.text.clone(),
            },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::REJECTED_PARTITION;
    use time::macros::datetime;

    fn received(text: &str) -> Received {
        Received {
            text: text.to_owned(),
            message_id: Some("m-1".into()),
            dequeue_count: 1,
            received_at: datetime!(2026-11-26 10:00 UTC),
        }
    }

    fn config() -> PlanConfig {
        PlanConfig {
            poison_queue: "cv-poison".into(),
        }
    }

    #[test]
    fn a_notification_is_recorded_once_and_nothing_else() {
        let text = r#"{"version":"1.0","type":"ConnectionTest","Content":{"projectId":"b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f"}}"#;
        let (decision, actions) = plan(&received(text), &config());
        assert!(matches!(decision, Decision::Accepted(_)));
        assert_eq!(actions.len(), 1);
        let Action::Record(row) = &actions[0] else {
            panic!("expected a record")
        };
        assert_eq!(row.partition_key, "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f");
        assert_eq!(row.row_key, "ConnectionTest_m-1");
    }

    #[test]
    fn an_unknown_kind_is_recorded_not_rejected() {
        let (decision, actions) = plan(
            &received(r#"{"version":"1.0","type":"Publish","Content":{}}"#),
            &config(),
        );
        assert!(matches!(decision, Decision::Accepted(_)));
        assert!(matches!(&actions[..], [Action::Record(r)] if r.row_key == "Unknown_m-1"));
    }

    #[test]
    fn a_malformed_message_is_recorded_and_copied_to_the_poison_queue() {
        let (decision, actions) = plan(&received("{not json"), &config());
        let Decision::Rejected { reason, field } = decision else {
            panic!("expected a rejection")
        };
        assert!(
            reason.starts_with("invalid JSON at line 1, column 2"),
            "{reason}"
        );
        assert_eq!(field, None);
        match &actions[..] {
            [Action::Record(row), Action::CopyToPoison { queue, text }] => {
                assert_eq!(row.partition_key, REJECTED_PARTITION);
                assert_eq!(row.properties["PoisonCopy"], "pending");
                assert_eq!(queue, "cv-poison");
                assert_eq!(text, "{not json");
            }
            other => panic!("unexpected actions {other:?}"),
        }
    }

    #[test]
    fn a_rejection_names_the_field() {
        let (decision, _) = plan(
            &received(r#"{"version":"1.0","type":"Training","Content":{"projectId":"x"}}"#),
            &config(),
        );
        assert_eq!(
            decision,
            Decision::Rejected {
                reason: "field `Content.projectId` must be a UUID, found \"x\"".into(),
                field: Some("Content.projectId".into()),
            }
        );
    }

    #[test]
    fn an_unreadable_envelope_is_rejected_with_its_reason() {
        let (decision, actions) = plan_unreadable(
            &received("garbage"),
            "invocation body is not JSON",
            &config(),
        );
        assert!(matches!(decision, Decision::Rejected { .. }));
        assert_eq!(actions.len(), 2);
    }
}
