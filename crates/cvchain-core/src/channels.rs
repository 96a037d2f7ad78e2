//! Release channels: `latest` and `production`, per project and export target, and the manifest
//! that says which iteration holds each (`{projectName}/channels.json` in the release
//! container). Pure: the manifest is read and written by the adapter with ETag-conditional
//! writes; here it is parsed, changed and serialized, and every move is decided.
//!
//! - `latest` holds the newest released iteration (by `trainedAt`).
//! - `production` follows the project's production pointer: the iteration that passed the gate
//!   (or was promoted or rolled back to by hand). A target's channel moves to it as soon as that
//!   iteration's release copy of the target exists. Publishing follows the same pointer.
//! - Nothing moves backwards on its own: an older iteration never replaces a newer holder, and an
//!   iteration rolled back from is never promoted again automatically. Only `promote` and
//!   `rollback` move a channel backwards, on purpose.

use crate::chain::ExportTarget;
use crate::customvision::{Iteration, IterationPerformance};
use crate::gate::Metrics;
use crate::history::{HistoryRow, Prop, Props, RowKind, parse_service_time, safe_key};
use crate::release::{ReleaseNames, metadata_value, sanitize};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

mod trust;
mod validate;

pub use trust::{
    FailedMove, FailedMoveRow, Mismatch, failed_move_row, recorded_iteration, verify_release,
};
pub use validate::{MAX_MANIFEST_BYTES, MAX_MODEL_SIZE, MAX_REVISION, MAX_TARGETS, VETO_DEPTH};

pub const CHANNEL_PATH_SETTING: &str = "CVCHAIN_CHANNEL_PATH";
/// Where a channel's copy of an export goes in the release container.
pub const DEFAULT_CHANNEL_TEMPLATE: &str =
    "{projectName}/channels/{channel}/{platform}-{flavor}.zip";
/// The manifest's schema, so a JSON file someone else wrote is never taken for it.
pub const SCHEMA: &str = "cvchain.channels/1";
/// How many earlier holders each entry remembers (for rollback).
pub const HISTORY_DEPTH: usize = 10;

/// A release channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Latest,
    Production,
}

impl Channel {
    pub const ALL: [Channel; 2] = [Channel::Latest, Channel::Production];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Latest => "latest",
            Channel::Production => "production",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// Why a channel moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// `production`: the iteration passed the gate.
    Gate,
    /// `latest`: the iteration is the newest released one.
    Newest,
    /// `cvchain promote`, bypassing the gate.
    Manual,
    /// `cvchain rollback`, to the previous holder.
    Rollback,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Gate => "gate",
            Reason::Newest => "newest",
            Reason::Manual => "manual",
            Reason::Rollback => "rollback",
        }
    }
}

/// An iteration, as the manifest names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IterationRef {
    pub id: Uuid,
    pub name: String,
    /// RFC 3339; what "newer" means.
    pub trained_at: Option<String>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    #[serde(rename = "mAP")]
    pub map: Option<f64>,
}

impl IterationRef {
    pub fn metrics(&self) -> Metrics {
        Metrics {
            precision: self.precision,
            recall: self.recall,
            map: self.map,
        }
    }

    fn trained(&self) -> Option<OffsetDateTime> {
        self.trained_at
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
    }

    /// The iteration as a manifest may hold it: a name of at most 1024 characters without
    /// control characters, a training time only when it is RFC 3339, metrics only within 0..1,
    /// so that cvchain never writes a manifest it would refuse to read.
    pub fn bounded(&self) -> IterationRef {
        IterationRef {
            id: self.id,
            name: bounded_text(&self.name),
            trained_at: self
                .trained_at
                .clone()
                .filter(|t| t.len() <= 64 && OffsetDateTime::parse(t, &Rfc3339).is_ok()),
            precision: unit(self.precision),
            recall: unit(self.recall),
            map: unit(self.map),
        }
    }

    /// Strictly trained after `other`. An iteration without a training time is newer than
    /// nothing that has one.
    pub fn is_newer_than(&self, other: &IterationRef) -> bool {
        match (self.trained(), other.trained()) {
            (Some(a), Some(b)) => a > b,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

fn unit(v: Option<f64>) -> Option<f64> {
    v.filter(|v| (0.0..=1.0).contains(v))
}

/// At most 1024 characters, control characters as spaces.
fn bounded_text(s: &str) -> String {
    s.chars()
        .take(1024)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// What holds a channel for one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub iteration: IterationRef,
    /// The iteration's release copy of the target, in the release container.
    pub release_path: String,
    /// The channel's copy.
    pub channel_path: String,
    pub size: u64,
    /// The release copy's Content-MD5 (base64), when it has one.
    pub content_md5: Option<String>,
    pub promoted_at: String,
    pub reason: Reason,
    /// The manifest revision that made this holder.
    pub revision: u64,
    /// A note for people: a promotion that bypassed the gate says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One channel's entry for one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub platform: String,
    pub flavor: Option<String>,
    #[serde(flatten)]
    pub holder: Holder,
    /// The holder before this one (also the last of `history`), for deploy scripts.
    pub previous: Option<IterationRef>,
    /// Earlier holders, oldest first, up to [`HISTORY_DEPTH`]: where rollback goes.
    #[serde(default)]
    pub history: Vec<Holder>,
}

impl Entry {
    pub fn target(&self) -> ExportTarget {
        ExportTarget {
            platform: self.platform.clone(),
            flavor: self.flavor.clone(),
        }
    }
}

/// The project's production pointer: what production is on, or moving to, for every target,
/// and what the prediction endpoint serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pointer {
    pub iteration: IterationRef,
    pub reason: Reason,
    pub promoted_at: String,
    pub revision: u64,
    /// Earlier pointers, oldest first.
    #[serde(default)]
    pub history: Vec<PointerStep>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PointerStep {
    pub iteration: IterationRef,
    pub reason: Reason,
    pub promoted_at: String,
}

/// One channel across the project's targets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelState {
    /// Iterations rolled back from: never moved to again automatically.
    #[serde(default)]
    pub vetoed: Vec<Uuid>,
    /// By target key (`ONNX`, `TensorFlow-TensorFlowLite`).
    #[serde(default)]
    pub targets: BTreeMap<String, Entry>,
}

/// `{projectName}/channels.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema: String,
    pub project_id: Uuid,
    pub project_name: String,
    /// Raised by every change.
    pub revision: u64,
    pub updated_at: String,
    pub production_pointer: Option<Pointer>,
    #[serde(default)]
    pub channels: BTreeMap<Channel, ChannelState>,
}

/// Why a stored manifest cannot be used. Never overwritten blindly: the problem is recorded and
/// the blob left alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{path} is not valid JSON ({detail}); fix or delete it")]
    NotJson { path: String, detail: String },
    #[error("{path} was not written by cvchain (no \"schema\": \"{SCHEMA}\"); move it away")]
    NotOurs { path: String },
    #[error("{path} is the manifest of project {other}")]
    OtherProject { path: String, other: Uuid },
    /// Larger than any manifest cvchain writes: not read at all.
    #[error(
        "{path} is larger than any manifest cvchain writes ({size} bytes or more; the limit is {limit} bytes); it was not read: move it away"
    )]
    TooLarge { path: String, size: u64, limit: u64 },
    /// A field out of cvchain's own bounds, or a path that is not this project's.
    #[error("{path} cannot be used: {field} {problem}; move it away (cvchain starts a new one)")]
    Invalid {
        path: String,
        field: String,
        problem: String,
    },
}

/// A release copy an iteration has of one target: what a channel can move to.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    pub target: ExportTarget,
    pub release_path: String,
    pub size: u64,
    pub content_md5: Option<String>,
}

/// One channel move, decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub channel: Channel,
    pub target: ExportTarget,
    pub to: Holder,
    pub from: Option<IterationRef>,
}

/// A move of the production pointer.
#[derive(Debug, Clone, PartialEq)]
pub struct PointerMove {
    pub to: IterationRef,
    pub from: Option<IterationRef>,
    pub reason: Reason,
    pub revision: u64,
}

/// What a change did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    pub pointer: Option<PointerMove>,
    pub moves: Vec<Move>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.pointer.is_none() && self.moves.is_empty()
    }
}

/// Where the channel copies and the manifest go: the channel template, rendered with the same
/// tokens and sanitizing as release paths; and the release template, which tells this
/// project's release copies from anyone else's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub template: crate::release::PathTemplate,
    /// `CVCHAIN_RELEASE_PATH`.
    pub release: crate::release::PathTemplate,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            template: crate::release::PathTemplate::parse_channel(DEFAULT_CHANNEL_TEMPLATE)
                .expect("the default channel template is valid"),
            release: crate::release::PathTemplate::parse(crate::release::DEFAULT_TEMPLATE)
                .expect("the default release template is valid"),
        }
    }
}

impl Paths {
    /// The channel copy of `target`; with `qualify`, names carry their ids (when the plain
    /// path holds another project's blob).
    pub fn channel_path(
        &self,
        project_id: Uuid,
        project_name: &str,
        channel: Channel,
        target: &ExportTarget,
        qualify: bool,
    ) -> String {
        let names = ReleaseNames {
            project_id,
            project_name: project_name.to_owned(),
            iteration_id: Uuid::nil(),
            iteration_name: String::new(),
            platform: target.platform.clone(),
            flavor: target.flavor.clone(),
        };
        self.template
            .render_channel(&names, channel.as_str(), qualify)
    }
}

/// The manifest's path: `{projectName}/channels.json`, or with `qualify`
/// `{projectName}-{projectId}/channels.json`.
pub fn manifest_path(project_id: Uuid, project_name: &str, qualify: bool) -> String {
    let clean = sanitize(project_name);
    let dir = if clean.is_empty() {
        project_id.to_string()
    } else if qualify {
        format!("{clean}-{project_id}")
    } else {
        clean
    };
    format!("{dir}/channels.json")
}

/// RFC 3339 in UTC, to the millisecond.
fn now_text(now: OffsetDateTime) -> String {
    let utc = now.to_offset(time::UtcOffset::UTC);
    utc.replace_millisecond(utc.millisecond())
        .unwrap_or(utc)
        .format(&Rfc3339)
        .unwrap_or_default()
}

impl Manifest {
    pub fn new(project_id: Uuid, project_name: &str, now: OffsetDateTime) -> Self {
        Self {
            schema: SCHEMA.into(),
            project_id,
            project_name: bounded_text(project_name),
            revision: 0,
            updated_at: now_text(now),
            production_pointer: None,
            channels: BTreeMap::new(),
        }
    }

    /// Reads a stored manifest of `project`: refused when it is larger than any cvchain writes,
    /// not cvchain's, another project's, or out of its bounds (see `validate`).
    pub fn parse(
        path: &str,
        bytes: &[u8],
        project: Uuid,
        paths: &Paths,
    ) -> Result<Self, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                path: path.into(),
                size: bytes.len() as u64,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::NotJson {
                path: path.into(),
                detail: e.to_string(),
            })?;
        if value.get("schema").and_then(|s| s.as_str()) != Some(SCHEMA) {
            return Err(ManifestError::NotOurs { path: path.into() });
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| ManifestError::NotJson {
            path: path.into(),
            detail: e.to_string(),
        })?;
        if m.project_id != project {
            return Err(ManifestError::OtherProject {
                path: path.into(),
                other: m.project_id,
            });
        }
        m.validate(path, paths)?;
        Ok(m)
    }

    /// Every change raises the revision. Saturating, so it never panics or wraps to a lower
    /// revision (a manifest anywhere near the top is refused when read: see `MAX_REVISION`).
    fn bump(&mut self, now: OffsetDateTime) {
        self.revision = self.revision.saturating_add(1);
        self.updated_at = now_text(now);
    }

    /// Where `channel`'s copy of `target` lives: an existing entry keeps its place (a channel
    /// is a stable address; a loser of a race for a path was moved elsewhere on purpose), a
    /// new one goes where `fresh` says (`None`: nowhere, both paths hold someone else's).
    fn place(
        &self,
        channel: Channel,
        target: &ExportTarget,
        fresh: &dyn Fn(Channel, &ExportTarget) -> Option<String>,
    ) -> Option<String> {
        match self.entry(channel, target) {
            Some(e) => Some(e.holder.channel_path.clone()),
            None => fresh(channel, target),
        }
    }

    /// The entry's channel copy goes to `to`: its path `from` holds a blob that is not this
    /// project's (another project of the same name won the race for it). `false` when the
    /// entry is no longer at `from` (another writer moved it already).
    pub fn relocate(
        &mut self,
        channel: Channel,
        target: &ExportTarget,
        from: &str,
        to: &str,
        now: OffsetDateTime,
    ) -> bool {
        let Some(e) = self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.targets.get_mut(&target.key()))
        else {
            return false;
        };
        if e.holder.channel_path != from {
            return false;
        }
        e.holder.channel_path = to.to_owned();
        self.bump(now);
        true
    }

    /// A move that could not be carried out is taken back, so the manifest never claims a
    /// copy that is not there: when the entry still holds `iteration` at `revision`, its
    /// previous holder comes back (or the entry goes, when it had none). `false` when a later
    /// move replaced it already.
    pub fn withdraw(
        &mut self,
        channel: Channel,
        target: &ExportTarget,
        iteration: Uuid,
        revision: u64,
        now: OffsetDateTime,
    ) -> bool {
        let Some(state) = self.channels.get_mut(&channel) else {
            return false;
        };
        let key = target.key();
        let Some(e) = state.targets.get(&key) else {
            return false;
        };
        if e.holder.iteration.id != iteration || e.holder.revision != revision {
            return false;
        }
        if let Some(mut e) = state.targets.remove(&key)
            && let Some(back) = e.history.pop()
        {
            e.previous = e.history.last().map(|h| h.iteration.clone());
            e.holder = back;
            state.targets.insert(key, e);
        }
        self.bump(now);
        true
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        v.push(b'\n');
        v
    }

    pub fn entry(&self, channel: Channel, target: &ExportTarget) -> Option<&Entry> {
        self.channels.get(&channel)?.targets.get(&target.key())
    }

    pub fn is_vetoed(&self, channel: Channel, iteration: Uuid) -> bool {
        self.channels
            .get(&channel)
            .is_some_and(|c| c.vetoed.contains(&iteration))
    }

    /// Every iteration a channel or the pointer holds (retention keeps them).
    pub fn held_iterations(&self) -> Vec<Uuid> {
        let mut out: Vec<Uuid> = self
            .channels
            .values()
            .flat_map(|c| c.targets.values().map(|e| e.holder.iteration.id))
            .chain(self.production_pointer.iter().map(|p| p.iteration.id))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// As [`withdraw`](Self::withdraw), for a move that did not push its predecessor into the
    /// history (a rollback): the entry goes back to `before`, as it was before the move (`None`:
    /// there was none).
    pub fn restore(
        &mut self,
        channel: Channel,
        target: &ExportTarget,
        iteration: Uuid,
        revision: u64,
        before: Option<Entry>,
        now: OffsetDateTime,
    ) -> bool {
        let Some(state) = self.channels.get_mut(&channel) else {
            return false;
        };
        let key = target.key();
        if !state
            .targets
            .get(&key)
            .is_some_and(|e| e.holder.iteration.id == iteration && e.holder.revision == revision)
        {
            return false;
        }
        match before {
            Some(e) => state.targets.insert(key, e),
            None => state.targets.remove(&key),
        };
        self.bump(now);
        true
    }

    /// An iteration passed the gate: the pointer moves to it, unless it is older than the
    /// pointer, already there, or was rolled back from.
    pub fn gate_passed(&mut self, iteration: &IterationRef, now: OffsetDateTime) -> Change {
        if self.is_vetoed(Channel::Production, iteration.id) {
            return Change::default();
        }
        if let Some(p) = &self.production_pointer
            && (p.iteration.id == iteration.id || !iteration.is_newer_than(&p.iteration))
        {
            return Change::default();
        }
        self.bump(now);
        let pointer = self.set_pointer(iteration.clone(), Reason::Gate, now);
        Change {
            pointer: Some(pointer),
            moves: Vec::new(),
        }
    }

    fn set_pointer(
        &mut self,
        iteration: IterationRef,
        reason: Reason,
        now: OffsetDateTime,
    ) -> PointerMove {
        let old = self.production_pointer.take();
        let from = old.as_ref().map(|p| p.iteration.clone());
        let mut history = old.as_ref().map(|p| p.history.clone()).unwrap_or_default();
        if let Some(p) = old {
            history.push(PointerStep {
                iteration: p.iteration,
                reason: p.reason,
                promoted_at: p.promoted_at,
            });
        }
        trim(&mut history);
        let iteration = iteration.bounded();
        self.production_pointer = Some(Pointer {
            iteration: iteration.clone(),
            reason,
            promoted_at: now_text(now),
            revision: self.revision,
            history,
        });
        PointerMove {
            to: iteration,
            from,
            reason,
            revision: self.revision,
        }
    }

    /// The channel moves an iteration's release copies allow on their own: `latest` when it is
    /// newer than the holder; `production` when it is the production pointer. `channel_path`
    /// names a new entry's channel copy (an existing entry keeps its place); a new entry with
    /// no place does not move.
    pub fn released(
        &mut self,
        iteration: &IterationRef,
        releases: &[Release],
        channel_path: &dyn Fn(Channel, &ExportTarget) -> Option<String>,
        now: OffsetDateTime,
    ) -> Change {
        let mut wanted: Vec<(Channel, &Release, Reason)> = Vec::new();
        for r in releases {
            if !self.is_vetoed(Channel::Latest, iteration.id) {
                let newer = match self.entry(Channel::Latest, &r.target) {
                    None => true,
                    Some(e) => {
                        e.holder.iteration.id != iteration.id
                            && iteration.is_newer_than(&e.holder.iteration)
                    }
                };
                if newer {
                    wanted.push((Channel::Latest, r, Reason::Newest));
                }
            }
            if let Some(p) = &self.production_pointer
                && p.iteration.id == iteration.id
                && !self.is_vetoed(Channel::Production, iteration.id)
                && self
                    .entry(Channel::Production, &r.target)
                    .is_none_or(|e| e.holder.iteration.id != iteration.id)
            {
                wanted.push((Channel::Production, r, p.reason));
            }
        }
        let wanted: Vec<(Channel, &Release, Reason, String)> = wanted
            .into_iter()
            .filter_map(|(c, r, reason)| {
                Some((c, r, reason, self.place(c, &r.target, channel_path)?))
            })
            .collect();
        if wanted.is_empty() {
            return Change::default();
        }
        self.bump(now);
        let moves = wanted
            .into_iter()
            .map(|(channel, r, reason, place)| {
                let holder = self.holder(iteration, r, place, reason, now);
                self.set_holder(channel, &r.target, holder, None)
            })
            .collect();
        Change {
            pointer: None,
            moves,
        }
    }

    fn holder(
        &self,
        iteration: &IterationRef,
        r: &Release,
        channel_path: String,
        reason: Reason,
        now: OffsetDateTime,
    ) -> Holder {
        Holder {
            iteration: iteration.bounded(),
            release_path: r.release_path.clone(),
            channel_path,
            size: r.size,
            content_md5: r.content_md5.clone(),
            promoted_at: now_text(now),
            reason,
            revision: self.revision,
            note: None,
        }
    }

    /// Puts `holder` in place; the old holder goes to the history, unless `history` replaces it
    /// (a rollback takes the history's last holder out).
    fn set_holder(
        &mut self,
        channel: Channel,
        target: &ExportTarget,
        holder: Holder,
        history: Option<Vec<Holder>>,
    ) -> Move {
        let state = self.channels.entry(channel).or_default();
        let old = state.targets.remove(&target.key());
        let from = old.as_ref().map(|e| e.holder.iteration.clone());
        let history = match (history, old) {
            (Some(h), _) => h,
            (None, Some(e)) => {
                let mut h = e.history;
                h.push(e.holder);
                trim(&mut h);
                h
            }
            (None, None) => Vec::new(),
        };
        state.targets.insert(
            target.key(),
            Entry {
                platform: target.platform.clone(),
                flavor: target.flavor.clone(),
                previous: history.last().map(|h| h.iteration.clone()),
                holder: holder.clone(),
                history,
            },
        );
        Move {
            channel,
            target: target.clone(),
            to: holder,
            from,
        }
    }

    /// `cvchain promote`: `channel` moves to `iteration` for every target it has a release copy
    /// of, whatever the gate said; for `production` the pointer moves too, and a veto on the
    /// iteration is lifted.
    pub fn promote(
        &mut self,
        channel: Channel,
        iteration: &IterationRef,
        releases: &[Release],
        channel_path: &dyn Fn(Channel, &ExportTarget) -> Option<String>,
        note: &str,
        now: OffsetDateTime,
    ) -> Change {
        self.bump(now);
        let state = self.channels.entry(channel).or_default();
        state.vetoed.retain(|v| *v != iteration.id);
        let pointer = (channel == Channel::Production)
            .then(|| self.set_pointer(iteration.clone(), Reason::Manual, now));
        let moves = releases
            .iter()
            .filter(|r| {
                self.entry(channel, &r.target)
                    .is_none_or(|e| e.holder.iteration.id != iteration.id)
            })
            .filter_map(|r| Some((r.clone(), self.place(channel, &r.target, channel_path)?)))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(r, place)| {
                let mut holder = self.holder(iteration, &r, place, Reason::Manual, now);
                holder.note = Some(bounded_text(note));
                self.set_holder(channel, &r.target, holder, None)
            })
            .collect();
        Change { pointer, moves }
    }

    /// `cvchain rollback`: every target of `channel` goes back to its previous holder, and the
    /// iterations rolled back from are vetoed there; for `production` the pointer goes back too.
    /// Targets without a previous holder stay. Each copy stays at its channel's place, and the
    /// iterations moved to are named as `recorded` (cvchain's history) names them, where it
    /// does, rather than as the manifest does.
    pub fn rollback(
        &mut self,
        channel: Channel,
        now: OffsetDateTime,
        recorded: &dyn Fn(Uuid) -> Option<IterationRef>,
    ) -> Result<Change, String> {
        let state = self.channels.get(&channel).cloned().unwrap_or_default();
        let pointer_back = match (&self.production_pointer, channel) {
            (Some(p), Channel::Production) => p.history.last().cloned(),
            _ => None,
        };
        let any_target = state.targets.values().any(|e| !e.history.is_empty());
        if !any_target && pointer_back.is_none() {
            return Err(format!(
                "the {} channel has no previous holder to roll back to",
                channel.as_str()
            ));
        }
        self.bump(now);
        let mut vetoed: Vec<Uuid> = state
            .targets
            .values()
            .map(|e| e.holder.iteration.id)
            .collect();
        let mut change = Change::default();
        if let (Some(back), Some(p)) = (pointer_back, self.production_pointer.clone()) {
            vetoed.push(p.iteration.id);
            let mut history = p.history.clone();
            history.pop();
            let back_to = recorded(back.iteration.id)
                .unwrap_or(back.iteration)
                .bounded();
            self.production_pointer = Some(Pointer {
                iteration: back_to.clone(),
                reason: Reason::Rollback,
                promoted_at: now_text(now),
                revision: self.revision,
                history,
            });
            change.pointer = Some(PointerMove {
                to: back_to,
                from: Some(p.iteration),
                reason: Reason::Rollback,
                revision: self.revision,
            });
        }
        for entry in state.targets.values() {
            let mut history = entry.history.clone();
            let Some(mut back) = history.pop() else {
                continue;
            };
            back.promoted_at = now_text(now);
            back.reason = Reason::Rollback;
            back.revision = self.revision;
            back.note = None;
            back.channel_path = entry.holder.channel_path.clone();
            if let Some(it) = recorded(back.iteration.id) {
                back.iteration = it.bounded();
            }
            change
                .moves
                .push(self.set_holder(channel, &entry.target(), back, Some(history)));
        }
        let state = self.channels.entry(channel).or_default();
        for v in vetoed {
            if !state.vetoed.contains(&v) {
                state.vetoed.push(v);
            }
        }
        trim_to(&mut state.vetoed, VETO_DEPTH);
        Ok(change)
    }
}

/// The iteration as the manifest names it, from what Custom Vision reported.
pub fn iteration_ref(
    iteration: &Iteration,
    performance: Option<&IterationPerformance>,
) -> IterationRef {
    let metrics = performance.map(Metrics::from).unwrap_or_default();
    IterationRef {
        id: iteration.id,
        name: iteration.name.clone(),
        trained_at: iteration.trained_at.clone(),
        precision: metrics.precision,
        recall: metrics.recall,
        map: metrics.map,
    }
}

fn move_props(
    project: Uuid,
    channel: Channel,
    it: &IterationRef,
    from: Option<&IterationRef>,
) -> Props {
    let mut p = Props::new();
    p.set(Prop::EventType, RowKind::ChannelMove.as_str());
    p.set(Prop::ProjectId, project.to_string());
    p.set(Prop::IterationId, it.id.to_string());
    p.set(Prop::IterationName, &it.name);
    p.set(Prop::Channel, channel.as_str());
    for (prop, v) in [
        (Prop::Precision, it.precision),
        (Prop::Recall, it.recall),
        (Prop::AveragePrecision, it.map),
    ] {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            p.set(prop, v);
        }
    }
    if let Some(from) = from {
        p.set(Prop::PreviousIterationId, from.id.to_string());
        p.set(Prop::PreviousIterationName, &from.name);
    }
    p
}

/// The history row of one channel move. Its key carries the manifest revision, so recording
/// the same move again changes nothing.
pub fn move_row(project: Uuid, mv: &Move) -> HistoryRow {
    let mut p = move_props(project, mv.channel, &mv.to.iteration, mv.from.as_ref());
    p.set(Prop::Platform, &mv.target.platform);
    p.set(Prop::Flavor, mv.target.flavor.clone().unwrap_or_default());
    p.set(Prop::Reason, mv.to.reason.as_str());
    p.set(Prop::ReleasePath, &mv.to.release_path);
    p.set(Prop::ChannelPath, &mv.to.channel_path);
    p.set_int(Prop::Revision, mv.to.revision as i64);
    if let Some(at) = parse_service_time(&mv.to.promoted_at) {
        p.set(Prop::PromotedAt, at);
    }
    if let Some(note) = &mv.to.note {
        p.set(Prop::Note, note);
    }
    HistoryRow {
        partition_key: project.to_string(),
        row_key: safe_key(format!(
            "ChannelMove_{}_{}_r{:010}",
            mv.channel.as_str(),
            mv.target.key(),
            mv.to.revision
        )),
        properties: p,
    }
}

/// The history row of a move of the production pointer (what publishing follows).
pub fn pointer_row(
    project: Uuid,
    pm: &PointerMove,
    at: OffsetDateTime,
    note: Option<&str>,
) -> HistoryRow {
    let mut p = move_props(project, Channel::Production, &pm.to, pm.from.as_ref());
    p.set(Prop::Reason, pm.reason.as_str());
    p.set_int(Prop::Revision, pm.revision as i64);
    p.set(Prop::PromotedAt, at);
    p.set(
        Prop::Note,
        note.map(str::to_owned).unwrap_or_else(|| {
            format!(
                "production now follows {}; publishing follows it",
                pm.to.name
            )
        }),
    );
    HistoryRow {
        partition_key: project.to_string(),
        row_key: format!("ChannelMove_production_pointer_r{:010}", pm.revision),
        properties: p,
    }
}

/// What to call on the prediction endpoint so that it serves the production pointer: unpublish
/// whatever else holds the publish name, then publish the pointer unless it is published. Run
/// again after a crash between the two, it does what is left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishSteps {
    pub unpublish: Vec<Uuid>,
    pub publish: Option<Uuid>,
}

pub fn publish_steps(iterations: &[Iteration], pointer: Uuid, publish_name: &str) -> PublishSteps {
    let unpublish = iterations
        .iter()
        .filter(|i| i.id != pointer && i.publish_name.as_deref() == Some(publish_name))
        .map(|i| i.id)
        .collect();
    let publish = iterations
        .iter()
        .find(|i| i.id == pointer)
        .filter(|i| !i.is_published())
        .map(|i| i.id);
    PublishSteps { unpublish, publish }
}

fn trim<T>(history: &mut Vec<T>) {
    trim_to(history, HISTORY_DEPTH);
}

/// Keeps the newest `depth` (the last ones).
fn trim_to<T>(list: &mut Vec<T>, depth: usize) {
    if list.len() > depth {
        let cut = list.len() - depth;
        list.drain(..cut);
    }
}

/// What to do about a channel copy before a move copies into it. A copy still running is
/// waited for rather than started twice, and one that failed or was aborted is redone whatever
/// revision its metadata names (the copy request set it before the bytes arrived); one that
/// ended well stays if it holds this revision or a newer one.
pub fn before_sync(
    held_revision: u64,
    copy: crate::release::CopyState,
    wanted: u64,
) -> crate::release::BeforeCopy {
    use crate::release::{BeforeCopy, CopyState};
    match copy {
        CopyState::Pending => BeforeCopy::AwaitCopy,
        CopyState::Failed => BeforeCopy::Copy,
        CopyState::None | CopyState::Success if held_revision >= wanted => BeforeCopy::Current,
        CopyState::None | CopyState::Success => BeforeCopy::Copy,
    }
}

/// The channel copy's metadata: which iteration it is, how good, since when and why.
pub fn channel_metadata(
    channel: Channel,
    mv: &Move,
    project_id: Uuid,
    project_name: &str,
) -> std::collections::HashMap<String, String> {
    let it = &mv.to.iteration;
    let mut m = std::collections::HashMap::new();
    m.insert(
        crate::release::META_PROJECT_ID.into(),
        project_id.to_string(),
    );
    m.insert(crate::release::META_ITERATION_ID.into(), it.id.to_string());
    m.insert("projectname".into(), metadata_value(project_name));
    m.insert("iterationname".into(), metadata_value(&it.name));
    m.insert("channel".into(), channel.as_str().into());
    m.insert("platform".into(), metadata_value(&mv.target.platform));
    if let Some(f) = &mv.target.flavor {
        m.insert("flavor".into(), metadata_value(f));
    }
    for (k, v) in [
        ("precision", it.precision),
        ("recall", it.recall),
        ("map", it.map),
    ] {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            m.insert(k.into(), format!("{v:.4}"));
        }
    }
    m.insert("promotedat".into(), mv.to.promoted_at.clone());
    m.insert("reason".into(), mv.to.reason.as_str().into());
    if let Some(from) = &mv.from {
        m.insert("previousiterationid".into(), from.id.to_string());
        m.insert("previousiterationname".into(), metadata_value(&from.name));
    }
    m.insert("releasepath".into(), metadata_value(&mv.to.release_path));
    m
}

#[cfg(test)]
mod tests;
