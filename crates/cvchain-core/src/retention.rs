//! Iteration retention (`CVCHAIN_KEEP_ITERATIONS`): Custom Vision holds at most 20 iterations
//! per project, and training fails with `BadRequestExceedIterationPerProjectLimit` beyond. When
//! an iteration's chain is complete, the project's oldest iterations beyond the newest N are
//! deleted, but never one whose model would be lost or that something still uses.

use crate::chain::{EntryState, ExportTarget};
use crate::customvision::Iteration;
use crate::history::{HistoryRow, Prop, Props, RowKind, StepRow, parse_service_time};
use std::collections::BTreeSet;
use time::OffsetDateTime;
use uuid::Uuid;

pub const KEEP_ITERATIONS_SETTING: &str = "CVCHAIN_KEEP_ITERATIONS";
/// The service's cap.
pub const MAX_ITERATIONS: u64 = 20;

/// What retention decided about one iteration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub iteration: Uuid,
    pub name: String,
    pub trained_at: Option<String>,
    /// Why it is deleted, or why it is kept.
    pub why: String,
}

/// Which iterations to delete and which are kept, with the reasons.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Oldest first.
    pub delete: Vec<Decision>,
    pub kept: Vec<Decision>,
}

impl Plan {
    /// One line on what was kept and why, for each deletion's history row.
    pub fn describe_kept(&self) -> String {
        self.kept
            .iter()
            .map(|k| format!("{} ({})", k.name, k.why))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The history row of a deletion: the iteration, why, and what was kept and why.
pub fn deletion_row(project: Uuid, d: &Decision, plan: &Plan, at: OffsetDateTime) -> HistoryRow {
    let mut p = Props::new();
    p.set(Prop::EventType, RowKind::IterationDeleted.as_str());
    p.set(Prop::ProjectId, project.to_string());
    p.set(Prop::IterationId, d.iteration.to_string());
    p.set(Prop::IterationName, &d.name);
    if let Some(t) = d.trained_at.as_deref().and_then(parse_service_time) {
        p.set(Prop::TrainedAt, t);
    }
    p.set(Prop::Reason, &d.why);
    p.set(
        Prop::Kept,
        crate::message::bounded(&plan.describe_kept(), 4000).0,
    );
    p.set(Prop::EndedAt, at);
    HistoryRow {
        partition_key: project.to_string(),
        row_key: format!("Deleted_{}", d.iteration),
        properties: p,
    }
}

fn when(it: &Iteration) -> Option<OffsetDateTime> {
    it.trained_at
        .as_deref()
        .or(it.created.as_deref())
        .and_then(parse_service_time)
}

/// Why an iteration beyond the newest `keep` must stay, if it must: published, held by a
/// channel, not completed (training, failed midway) or not all of its configured exports
/// released. `steps` are the project's export step rows.
fn must_keep(
    it: &Iteration,
    held: &BTreeSet<Uuid>,
    chain: &[ExportTarget],
    steps: &[StepRow],
) -> Option<String> {
    if it.is_published() {
        return Some(format!(
            "published as {}",
            it.publish_name.as_deref().unwrap_or_default()
        ));
    }
    if held.contains(&it.id) {
        return Some("held by a channel".into());
    }
    if !it.status.eq_ignore_ascii_case("Completed") {
        return Some(format!("status {}", it.status));
    }
    let id = it.id.to_string();
    for target in chain {
        let step = steps
            .iter()
            .find(|s| s.iteration_id == id && s.target == *target);
        match step.and_then(|s| s.state.map(|st| (s, st))) {
            None => return Some(format!("{target} not exported by the chain yet")),
            Some((_, EntryState::Pending | EntryState::Exporting)) => {
                return Some(format!("{target} still exporting"));
            }
            Some((_, EntryState::Failed)) => {
                return Some(format!(
                    "{target} failed to export: no release copy to keep"
                ));
            }
            Some((_, EntryState::Unknown)) => {
                return Some(format!(
                    "{target} export status unknown: it may still be released"
                ));
            }
            Some((s, EntryState::Done)) if s.release_url.is_none() => {
                return Some(format!("{target} not released yet"));
            }
            // Released, or nothing to release (the domain cannot export it, or the service
            // refused it for good).
            Some(_) => {}
        }
    }
    None
}

/// Keeps the newest `keep` iterations (by training time) and plans the deletion of every older
/// one that nothing needs.
pub fn plan(
    keep: usize,
    iterations: &[Iteration],
    held: &BTreeSet<Uuid>,
    chain: &[ExportTarget],
    steps: &[StepRow],
) -> Plan {
    let mut sorted: Vec<&Iteration> = iterations.iter().collect();
    // Newest first; an iteration without a time counts as newest (it is still training).
    sorted.sort_by(|a, b| match (when(a), when(b)) {
        (Some(x), Some(y)) => y.cmp(&x),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (None, None) => a.name.cmp(&b.name),
    });
    let decision = |it: &Iteration, why: String| Decision {
        iteration: it.id,
        name: it.name.clone(),
        trained_at: it.trained_at.clone(),
        why,
    };
    let mut out = Plan::default();
    for (i, it) in sorted.iter().enumerate() {
        if i < keep {
            out.kept
                .push(decision(it, format!("among the newest {keep}")));
            continue;
        }
        match must_keep(it, held, chain, steps) {
            Some(why) => out.kept.push(decision(it, why)),
            None => out.delete.push(decision(
                it,
                format!("older than the newest {keep} (CVCHAIN_KEEP_ITERATIONS)"),
            )),
        }
    }
    out.delete.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{HistoryRow, Prop, Props, RowKind, RowStatus};

    fn it(n: u128, day: u8) -> Iteration {
        Iteration {
            id: Uuid::from_u128(n),
            name: format!("Iteration {n}"),
            status: "Completed".into(),
            trained_at: Some(format!("2026-11-{day:02}T10:00:00Z")),
            ..Default::default()
        }
    }

    fn onnx() -> ExportTarget {
        ExportTarget {
            platform: "ONNX".into(),
            flavor: None,
        }
    }

    fn step(n: u128, state: EntryState, released: bool) -> StepRow {
        let mut p = Props::new();
        p.set(Prop::EventType, RowKind::ExportStep.as_str());
        p.set(Prop::IterationId, Uuid::from_u128(n).to_string());
        p.set(Prop::Platform, "ONNX");
        p.set(Prop::Flavor, "");
        p.set(Prop::Status, RowStatus::Step(state).as_str());
        if released {
            p.set(Prop::ReleaseUrl, "https://a/models/x.zip");
        }
        StepRow::from_row(&HistoryRow {
            partition_key: "p".into(),
            row_key: format!("ExportStep_{n}_ONNX"),
            properties: p,
        })
    }

    #[test]
    fn only_what_nothing_needs_is_deleted_oldest_first() {
        let mut iterations: Vec<Iteration> = (1..=7).map(|n| it(n, n as u8)).collect();
        iterations[1].publish_name = Some("prod".into()); // 2: published
        iterations[3].status = "Training".into(); // 4: training
        let held = BTreeSet::from([Uuid::from_u128(3)]); // 3: in a channel
        let steps = vec![
            step(1, EntryState::Done, true),
            step(2, EntryState::Done, true),
            step(3, EntryState::Done, true),
            step(5, EntryState::Exporting, false), // 5: still exporting
            step(6, EntryState::Done, true),
            step(7, EntryState::Done, true),
        ];
        let p = plan(2, &iterations, &held, &[onnx()], &steps);
        let deleted: Vec<Uuid> = p.delete.iter().map(|d| d.iteration).collect();
        assert_eq!(deleted, vec![Uuid::from_u128(1)]);
        let why = |n: u128| {
            p.kept
                .iter()
                .find(|k| k.iteration == Uuid::from_u128(n))
                .unwrap()
                .why
                .clone()
        };
        assert_eq!(why(7), "among the newest 2");
        assert_eq!(why(6), "among the newest 2");
        assert_eq!(why(5), "ONNX still exporting");
        assert_eq!(why(4), "status Training");
        assert_eq!(why(3), "held by a channel");
        assert_eq!(why(2), "published as prod");
        assert!(
            p.describe_kept()
                .contains("Iteration 5 (ONNX still exporting)")
        );
    }

    #[test]
    fn an_export_that_is_not_released_keeps_its_iteration() {
        let iterations = vec![it(1, 1), it(2, 2), it(3, 3)];
        let none = BTreeSet::new();
        // No chain rows at all (trained before cvchain ran): kept.
        let p = plan(1, &iterations, &none, &[onnx()], &[]);
        assert!(p.delete.is_empty());
        assert!(
            p.kept
                .iter()
                .any(|k| k.why == "ONNX not exported by the chain yet")
        );
        let steps = vec![
            step(1, EntryState::Failed, false),
            step(2, EntryState::Skipped, false),
        ];
        let p = plan(1, &iterations, &none, &[onnx()], &steps);
        assert_eq!(p.delete.len(), 1);
        assert_eq!(p.delete[0].iteration, Uuid::from_u128(2));
        assert!(p.kept.iter().any(|k| k.why.contains("failed to export")));
        // Without a chain nothing needs releasing: everything beyond N goes.
        let p = plan(1, &iterations, &none, &[], &[]);
        assert_eq!(p.delete.len(), 2);
        assert_eq!(p.delete[0].iteration, Uuid::from_u128(1));
    }
}
