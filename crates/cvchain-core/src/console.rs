//! The registry console's views: what the history says about the projects and each project's
//! channels, iterations, events and failures, as the page, its JSON and the CLI read them. Pure:
//! built from the history rows cvchain itself wrote (a channel's holder comes from its
//! `ChannelMove` rows, not from the manifest, which anyone with access to the release container
//! could rewrite). The page itself is [`page`].

pub mod page;

use crate::channels::FailedMoveRow;
use crate::events::OutboxRow;
use crate::history::{HistoryRow, Prop, RowKind, StepRow, TrainingRow};
use crate::report::{IterationView, iterations};
use serde::Serialize;
use std::collections::BTreeMap;

/// Who holds a channel for one target (or the production pointer), by its newest move.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HolderView {
    /// `production` or `latest`.
    pub channel: String,
    /// The production pointer (what publishing follows), rather than one target's copy.
    pub pointer: bool,
    /// `ONNX`, `TensorFlow:TensorFlowLite`; empty for the pointer.
    pub target: String,
    pub iteration_id: String,
    pub iteration_name: String,
    /// When it moved there (RFC 3339).
    pub since: String,
    /// `gate`, `newest`, `manual` or `rollback`.
    pub reason: String,
    pub previous_id: String,
    pub previous_name: String,
    pub revision: i64,
    pub release_path: String,
    pub channel_path: String,
    pub note: String,
}

fn target_of(platform: &str, flavor: &str) -> String {
    if flavor.is_empty() {
        platform.to_owned()
    } else {
        format!("{platform}:{flavor}")
    }
}

fn rfc3339(t: Option<time::OffsetDateTime>) -> String {
    t.map(crate::events::rfc3339).unwrap_or_default()
}

/// The holders the moves among `rows` leave: per channel and target (and the pointer), the move
/// with the highest revision. Production first, then latest; the pointer before the targets.
pub fn holders(rows: &[HistoryRow]) -> Vec<HolderView> {
    let mut newest: BTreeMap<(u8, bool, String), HolderView> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.kind() == Some(RowKind::ChannelMove))
    {
        let p = &r.properties;
        let platform = p.text(Prop::Platform);
        let view = HolderView {
            channel: p.text(Prop::Channel).to_owned(),
            pointer: platform.is_empty(),
            target: target_of(platform, p.text(Prop::Flavor)),
            iteration_id: p.text(Prop::IterationId).to_owned(),
            iteration_name: p.text(Prop::IterationName).to_owned(),
            since: rfc3339(p.time(Prop::PromotedAt)),
            reason: p.text(Prop::Reason).to_owned(),
            previous_id: p.text(Prop::PreviousIterationId).to_owned(),
            previous_name: p.text(Prop::PreviousIterationName).to_owned(),
            revision: p.int(Prop::Revision).unwrap_or(0),
            release_path: p.text(Prop::ReleasePath).to_owned(),
            channel_path: p.text(Prop::ChannelPath).to_owned(),
            note: p.text(Prop::Note).to_owned(),
        };
        let order = u8::from(view.channel != "production");
        let key = (
            order,
            !view.pointer,
            format!("{}\u{0}{}", view.channel, view.target),
        );
        if newest
            .get(&key)
            .is_none_or(|cur| cur.revision < view.revision)
        {
            newest.insert(key, view);
        }
    }
    newest.into_values().collect()
}

/// Something that went wrong and stays visible: an export that failed or was refused, a channel
/// move that could not happen, a message given up after its last delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureView {
    /// `export`, `channel move` or `message`.
    pub kind: String,
    /// When (RFC 3339), when known.
    pub at: String,
    /// What failed, in a few words (`ONNX of Iteration 2`).
    pub what: String,
    pub reason: String,
}

/// The project's failures among its rows (failed or refused export steps, channel moves no later
/// move made moot) and the messages given up on (`poisoned`: its rows in the `_failed`
/// partition), newest first.
pub fn failures(rows: &[HistoryRow], poisoned: &[HistoryRow]) -> Vec<FailureView> {
    use crate::chain::EntryState;
    let names: BTreeMap<String, String> = rows
        .iter()
        .filter_map(TrainingRow::from_row)
        .map(|t| (t.iteration_id, t.iteration_name))
        .collect();
    let name_of = |id: &str| {
        names
            .get(id)
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| id.to_owned())
    };
    let mut out = Vec::new();
    for s in StepRow::all(rows) {
        if !matches!(s.state, Some(EntryState::Failed | EntryState::Refused)) {
            continue;
        }
        out.push(FailureView {
            kind: "export".into(),
            at: rfc3339(s.row.properties.time(Prop::EndedAt)),
            what: format!(
                "{} of {} ({})",
                s.target,
                name_of(&s.iteration_id),
                s.state.map(|st| st.as_str()).unwrap_or_default()
            ),
            reason: s.reason.clone(),
        });
    }
    for f in FailedMoveRow::open(rows) {
        let target = if f.platform.is_empty() {
            "pointer".to_owned()
        } else {
            target_of(&f.platform, &f.flavor)
        };
        let channel = if f.channel.is_empty() {
            "channels"
        } else {
            &f.channel
        };
        out.push(FailureView {
            kind: "channel move".into(),
            at: rfc3339(f.at),
            what: format!(
                "{channel} {target} → {}",
                if f.iteration_name.is_empty() {
                    &f.iteration_id
                } else {
                    &f.iteration_name
                }
            ),
            reason: f.reason,
        });
    }
    for r in poisoned {
        let p = &r.properties;
        out.push(FailureView {
            kind: "message".into(),
            at: rfc3339(p.time(Prop::ReceivedAt)),
            what: format!(
                "message {} given up after {} deliveries",
                p.text(Prop::MessageId),
                p.int(Prop::DequeueCount).unwrap_or(0)
            ),
            reason: p.text(Prop::Reason).to_owned(),
        });
    }
    out.sort_by(|a, b| b.at.cmp(&a.at));
    out
}

/// One event as `cvchain events --json` prints it (and the page's JSON holds it): the event,
/// and each sink's delivery state.
pub fn event_json(r: &OutboxRow) -> serde_json::Value {
    let event: serde_json::Value =
        serde_json::from_str(&r.event).unwrap_or(serde_json::Value::Null);
    let sinks: serde_json::Map<String, serde_json::Value> = r
        .sinks
        .iter()
        .map(|s| {
            (
                s.as_str().to_owned(),
                serde_json::to_value(r.state(*s)).unwrap_or_default(),
            )
        })
        .collect();
    serde_json::json!({
        "partitionKey": r.partition_key,
        "rowKey": r.row_key,
        "pending": r.pending,
        "describes": r.describes,
        "sinks": sinks,
        "event": event,
    })
}

/// One project in the list: its name, its newest iteration, and who holds its channels.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSummary {
    pub project_id: String,
    pub project_name: String,
    /// Trained iterations recorded.
    pub iterations: usize,
    pub newest: Option<IterationView>,
    /// The production pointer's holder, if production holds anything.
    pub production: Option<HolderView>,
    /// The newest `latest` move of any target.
    pub latest: Option<HolderView>,
}

/// The projects among `trainings` (Training rows, any project) and `moves` (ChannelMove rows),
/// by name then id.
pub fn projects(trainings: &[HistoryRow], moves: &[HistoryRow]) -> Vec<ProjectSummary> {
    let mut by_project: BTreeMap<String, Vec<HistoryRow>> = BTreeMap::new();
    for r in trainings.iter().chain(moves) {
        by_project
            .entry(r.partition_key.clone())
            .or_default()
            .push(r.clone());
    }
    let mut out: Vec<ProjectSummary> = by_project
        .into_iter()
        .map(|(project_id, rows)| {
            let views = iterations(&rows);
            let held = holders(&rows);
            let production = held
                .iter()
                .find(|h| h.pointer && h.channel == "production")
                .cloned();
            let latest = held
                .iter()
                .filter(|h| h.channel == "latest")
                .max_by(|a, b| a.since.cmp(&b.since))
                .cloned();
            let project_name = views
                .iter()
                .map(|v| v.project_name.clone())
                .find(|n| !n.is_empty())
                .unwrap_or_default();
            ProjectSummary {
                iterations: views.len(),
                newest: views.into_iter().next(),
                project_id,
                project_name,
                production,
                latest,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (a.project_name.to_lowercase(), &a.project_id)
            .cmp(&(b.project_name.to_lowercase(), &b.project_id))
    });
    out
}

/// A download link for a blob of the release container, made by the shell (a short-lived
/// read-only SAS for that one blob); keyed by the blob's path.
pub type Links = BTreeMap<String, String>;

/// A project's page: its channels, a page of its iterations, its recent events and its
/// failures, and the download links the page offers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectView {
    pub project_id: String,
    pub project_name: String,
    pub channels: Vec<HolderView>,
    /// The same entries as `cvchain history --project … --json`.
    pub iterations: Vec<IterationView>,
    /// The project's most recent events, the same objects in the same order (oldest first) as
    /// the end of `cvchain events --project … --json`.
    pub events: Vec<serde_json::Value>,
    pub failures: Vec<FailureView>,
    /// The channels manifest's path in the release container, when there is one.
    pub manifest: Option<String>,
    /// Release and channel copies (and the manifest) by path: a link that reads that blob.
    pub downloads: Links,
    /// When the links stop working (RFC 3339).
    pub downloads_expire: Option<String>,
}

impl ProjectView {
    /// Builds the view from the project's rows: `page` (a page of Training rows and their step
    /// rows), `moves` (its ChannelMove and ChannelMoveFailed rows), `outbox` (its events in the
    /// order they happened; the last `recent_events` are kept), `poisoned` (its rows in
    /// `_failed`).
    pub fn build(
        project_id: &str,
        page: &[HistoryRow],
        moves: &[HistoryRow],
        outbox: &[OutboxRow],
        poisoned: &[HistoryRow],
        recent_events: usize,
    ) -> Self {
        let mut rows: Vec<HistoryRow> = page.to_vec();
        rows.extend(moves.iter().cloned());
        let iterations = iterations(&rows);
        let events = &outbox[outbox.len().saturating_sub(recent_events)..];
        let project_name = iterations
            .iter()
            .map(|v| v.project_name.clone())
            .find(|n| !n.is_empty())
            .unwrap_or_default();
        Self {
            project_id: project_id.to_owned(),
            project_name,
            channels: holders(moves),
            failures: failures(&rows, poisoned),
            iterations,
            events: events.iter().map(event_json).collect(),
            manifest: None,
            downloads: Links::new(),
            downloads_expire: None,
        }
    }

    /// Every blob path the page links to: release copies, channel copies.
    pub fn blob_paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self
            .iterations
            .iter()
            .flat_map(|v| v.exports.iter().map(|e| e.release_path.clone()))
            .chain(
                self.channels
                    .iter()
                    .flat_map(|h| [h.release_path.clone(), h.channel_path.clone()]),
            )
            .chain(self.manifest.clone())
            .filter(|p| !p.is_empty())
            .collect();
        paths.sort();
        paths.dedup();
        paths
    }
}

#[cfg(test)]
mod tests;
