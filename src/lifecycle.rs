//! The model lifecycle, carried out: the production pointer and publishing that follows it,
//! channel moves (the manifest under its ETag, then the channel copies, then the rows), manual
//! promotions and rollbacks, and retention. What moves and what goes is decided in
//! `cvchain_core::{gate, channels, retention}`; this module reads what they need and writes
//! what they decided.
//!
//! Channel moves hang off the export chain and never stall it: a move that cannot happen is
//! taken back out of the manifest and recorded (a `ChannelMoveFailed` row and its event), and
//! only a storage failure on a delivery that will be retried makes the message fail. Whatever
//! a manifest says is checked against what cvchain recorded before a channel moves to it.

use crate::error::ProcessError;
use crate::events::Events;
use cvchain_azure::customvision::TrainingApi;
use cvchain_azure::history::store::{HistoryStore, TailWrite};
use cvchain_azure::storage::channels::{ChannelError, ChannelStore, Loaded, Synced};
use cvchain_core::chain::ExportTarget;
use cvchain_core::channels::{
    Change, Channel, FailedMove, IterationRef, Mismatch, Move, PointerMove, Release,
    failed_move_row, move_row, pointer_row, publish_steps, recorded_iteration, verify_release,
};
use cvchain_core::config::PublishSettings;
use cvchain_core::customvision::codes;
use cvchain_core::history::{StepRow, TrainingRow, parse_service_time, training_row_key};
use cvchain_core::notification::TrainingStatus;
use cvchain_core::release::Released;
use cvchain_core::retention;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// How often a manual move decides again when the manifest changed under it.
const ATTEMPTS: usize = 8;

/// The adapters the lifecycle needs.
pub struct Lifecycle {
    pub history: HistoryStore,
    pub channels: ChannelStore,
    pub cv: Option<Arc<dyn TrainingApi>>,
    pub publish: Option<PublishSettings>,
    /// `CVCHAIN_EXPORTS` (retention keeps an iteration until they are all released).
    pub chain: Vec<ExportTarget>,
    /// Outbound events: channel moves and deletions are told.
    pub events: Option<Arc<Events>>,
}

/// The delivery a channel step runs in: its clock, and whether the host delivers the message
/// again (`last`: it will not, so nothing here may fail it).
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub now: OffsetDateTime,
    pub last: bool,
}

/// Which moves an iteration made before a call completes (a redelivery after a crash finds
/// them without their copy or row).
#[derive(Debug, Clone, Copy)]
pub enum Complete<'a> {
    /// Those of the releases this message made or found current (their facts are known).
    Released(&'a [Released]),
    /// Every target the iteration holds.
    Held,
}

/// What a manual move did.
#[derive(Debug, Clone)]
pub struct Manual {
    pub change: Change,
    pub publish: Option<String>,
    /// Moves decided but not carried out: taken back out of the manifest, and recorded.
    pub failed: Vec<FailedMove>,
}

/// What carrying moves out came to.
#[derive(Default)]
struct Carried {
    moved: Vec<Move>,
    /// Recorded as failed: permanent failures, and any on the message's last delivery.
    failed: Vec<FailedMove>,
    /// A storage failure while the message will be delivered again: the message is retried,
    /// and completes the moves it left.
    retry: Option<ProcessError>,
}

impl Lifecycle {
    /// Records a channel move, a failed move or a deletion, with its event when a sink is
    /// configured. Its event takes its place in the project's order when it is written, so a
    /// sink never gets it after an event written later.
    async fn record(
        &self,
        row: &cvchain_core::history::HistoryRow,
        project_name: &str,
    ) -> Result<(), ProcessError> {
        let inserted = match &self.events {
            Some(events) => {
                let facts = cvchain_core::events::IterationFacts {
                    project_name: project_name.to_owned(),
                    ..Default::default()
                };
                events.record(row, &facts, None, Vec::new()).await?
                    == cvchain_azure::history::store::Recorded::Inserted
            }
            // Without sinks nothing reads the row that is there already.
            None => self.history.record_once(row).await?,
        };
        // A move counts once, when its row is written (a redelivery finds it there).
        if inserted {
            use cvchain_core::history::{Prop, RowKind};
            let p = &row.properties;
            match row.kind() {
                Some(RowKind::ChannelMove) => crate::telemetry::channel_move(
                    p.text(Prop::Channel),
                    p.text(Prop::Reason),
                    "moved",
                ),
                Some(RowKind::ChannelMoveFailed) => {
                    crate::telemetry::channel_move(p.text(Prop::Channel), "failed", "failed")
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Records the rows of one change together (one transaction where they share a partition).
    async fn record_all(
        &self,
        rows: &[cvchain_core::history::HistoryRow],
        project_name: &str,
    ) -> Result<(), ProcessError> {
        match &self.events {
            Some(events) => {
                let facts = cvchain_core::events::IterationFacts {
                    project_name: project_name.to_owned(),
                    ..Default::default()
                };
                events.record_all(rows, &facts).await?;
            }
            None => {
                let groups: Vec<_> = rows.iter().map(|r| (r.clone(), Vec::new())).collect();
                self.history.record_groups(&groups).await?;
            }
        }
        Ok(())
    }

    /// Leaves the rows of one change (each unless it exists, with the events it emits) for the
    /// notification's transaction.
    fn defer_all(
        &self,
        rows: &[cvchain_core::history::HistoryRow],
        project_name: &str,
        tail: &mut Vec<TailWrite>,
    ) {
        let facts = cvchain_core::events::IterationFacts {
            project_name: project_name.to_owned(),
            ..Default::default()
        };
        for row in rows {
            let outbox = match &self.events {
                Some(events) => events.outbox_of(row, &facts, None, Vec::new()),
                None => Vec::new(),
            };
            tail.push(TailWrite::Insert {
                row: row.clone(),
                outbox,
                release: None,
            });
        }
    }

    async fn record_failures(
        &self,
        project: Uuid,
        project_name: &str,
        failed: &[FailedMove],
    ) -> Result<(), ProcessError> {
        let now = OffsetDateTime::now_utc();
        for f in failed {
            tracing::warn!(project = %project, "channel move failed: {}", f.describe());
            self.record(&failed_move_row(project, f, now), project_name)
                .await?;
        }
        Ok(())
    }

    /// The iteration passed the gate: the production pointer moves to it unless it is older or
    /// vetoed, and the prediction endpoint follows the pointer. Returns the channel status and,
    /// with publishing configured, the publish status. On the message's `last` delivery
    /// nothing here fails it: what cannot happen is recorded.
    pub async fn promote(
        &self,
        project: Uuid,
        project_name: &str,
        iteration: &IterationRef,
        known: Option<&[StepRow]>,
        d: &Delivery,
    ) -> Result<(String, Option<String>), ProcessError> {
        let (now, last) = (d.now, d.last);
        let (change, loaded) = match self
            .channels
            .update(project, project_name, now, |m| {
                m.gate_passed(iteration, now)
            })
            .await
        {
            Ok(done) => done,
            Err(e) if e.is_transient() && !last => return Err(e.into()),
            Err(e) => {
                let failed = FailedMove {
                    channel: Some(Channel::Production),
                    target: None,
                    iteration: iteration.clone(),
                    release_path: None,
                    channel_path: None,
                    reason: e.to_string(),
                    transient: e.is_transient(),
                };
                self.record_failures(project, project_name, &[failed])
                    .await?;
                let publish = self
                    .publish
                    .as_ref()
                    .map(|_| "not published: the production pointer cannot be read".to_owned());
                return Ok((left_alone(&e), publish));
            }
        };
        let pointer = loaded.manifest.production_pointer.as_ref();
        let status = match (&change.pointer, pointer) {
            (Some(pm), _) => {
                self.record(&pointer_row(project, pm, now, None), project_name)
                    .await?;
                format!("production now follows {} (gate)", pm.to.name)
            }
            (None, Some(p)) if p.iteration.id == iteration.id => {
                // A delivery before this one may have moved the pointer and stopped before its
                // row: the row is written if it is missing (its key is the revision's).
                let pm = PointerMove {
                    to: p.iteration.clone(),
                    from: p.history.last().map(|h| h.iteration.clone()),
                    reason: p.reason,
                    revision: p.revision,
                };
                let at = parse_service_time(&p.promoted_at).unwrap_or(now);
                self.record(&pointer_row(project, &pm, at, None), project_name)
                    .await?;
                format!("production already follows {}", iteration.name)
            }
            (None, Some(p)) => format!(
                "production stays on {} ({} is older or was rolled back from)",
                p.iteration.name, iteration.name
            ),
            (None, None) => "production is empty".into(),
        };
        // Releases that already exist (a redelivery after the exports) move now.
        let mut status = status;
        let moved = self
            .move_channels(project, project_name, iteration, known, Complete::Held, d)
            .await?;
        if moved != "nothing to move" {
            status.push_str(&format!("; {moved}"));
        }
        let publish = match pointer {
            Some(p) => match self.follow_production(project, p.iteration.id).await {
                Ok(s) => s,
                // Publishing hangs off the chain too: the last delivery records why not.
                Err(e) if e.is_transient() && last => Some(format!(
                    "not published: {e} (on the message's last delivery; the next move of production publishes)"
                )),
                Err(e) => return Err(e),
            },
            None => None,
        };
        Ok((status, publish))
    }

    /// Makes the prediction endpoint serve `pointer`: unpublishes whatever else holds the
    /// publish name, then publishes the pointer. A crash between the two is repaired by the
    /// redelivery, which does what is left.
    pub async fn follow_production(
        &self,
        project: Uuid,
        pointer: Uuid,
    ) -> Result<Option<String>, ProcessError> {
        let (Some(cv), Some(publish)) = (&self.cv, &self.publish) else {
            return Ok(None);
        };
        let iterations = cv.get_iterations(project).await?;
        let steps = publish_steps(&iterations, pointer, &publish.name);
        let name_of = |id: Uuid| {
            iterations
                .iter()
                .find(|i| i.id == id)
                .map(|i| i.name.clone())
                .unwrap_or_else(|| id.to_string())
        };
        let mut done = Vec::new();
        for old in &steps.unpublish {
            match cv.unpublish_iteration(project, *old).await {
                Ok(()) => done.push(format!("unpublished {}", name_of(*old))),
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => return Ok(Some(format!("refused to unpublish {}: {e}", name_of(*old)))),
            }
        }
        if let Some(new) = steps.publish {
            match cv
                .publish_iteration(project, new, &publish.name, &publish.prediction_resource_id)
                .await
            {
                Ok(_) => done.push(format!("published {} as {}", name_of(new), publish.name)),
                Err(e) if e.code() == Some(codes::ITERATION_IS_PUBLISHED) => {
                    done.push(format!("{} already published", name_of(new)))
                }
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => done.push(format!("refused: {e}")),
            }
        }
        Ok(Some(if done.is_empty() {
            format!("{} already serves {}", publish.name, name_of(pointer))
        } else {
            done.join("; ")
        }))
    }

    /// The iteration's release copies move the channels they may (`latest` when newer,
    /// `production` when the pointer is on it), under the manifest's ETag; then the channel
    /// copies follow and every move gets its row. Moves this iteration made before (a
    /// redelivery after a crash) are completed the same way, as `complete` says.
    ///
    /// Nothing here stalls the chain: a move that cannot happen is taken back and recorded,
    /// and an error is returned only for a storage failure when the message will be delivered
    /// again (`last` is false).
    pub async fn move_channels(
        &self,
        project: Uuid,
        project_name: &str,
        iteration: &IterationRef,
        known: Option<&[StepRow]>,
        complete: Complete<'_>,
        d: &Delivery,
    ) -> Result<String, ProcessError> {
        self.move_channels_into(
            project,
            project_name,
            iteration,
            known,
            complete,
            d,
            None,
            None,
        )
        .await
    }

    /// As [`move_channels`](Self::move_channels), leaving the moves' rows (with their events)
    /// in `tail` for the transaction that records the notification's row, when given;
    /// `manifest`: the manifest as read a moment ago (its writes are conditional on its ETag,
    /// so one read beside other work is as good as one read now).
    #[allow(clippy::too_many_arguments)]
    pub async fn move_channels_into(
        &self,
        project: Uuid,
        project_name: &str,
        iteration: &IterationRef,
        known: Option<&[StepRow]>,
        complete: Complete<'_>,
        d: &Delivery,
        tail: Option<&mut Vec<TailWrite>>,
        manifest: Option<Result<Loaded, ChannelError>>,
    ) -> Result<String, ProcessError> {
        let read;
        let steps = match known {
            Some(s) => s,
            None => {
                read = self.history.steps(project, iteration.id).await?;
                &read[..]
            }
        };
        match self
            .try_moves(
                project,
                project_name,
                iteration,
                steps,
                complete,
                d,
                tail,
                manifest,
            )
            .await
        {
            Ok(status) => Ok(status),
            // Whatever else went wrong is recorded rather than poisoning the message: on its
            // last delivery, or when no retry can help.
            Err(e) if d.last || !e.is_transient() => {
                let failed: Vec<FailedMove> = releases_from(steps)
                    .into_iter()
                    .map(|r| FailedMove {
                        channel: None,
                        target: Some(r.target),
                        iteration: iteration.clone(),
                        release_path: Some(r.release_path),
                        channel_path: None,
                        reason: e.to_string(),
                        transient: e.is_transient(),
                    })
                    .collect();
                self.record_failures(project, project_name, &failed).await?;
                Ok(format!("failed: {e}"))
            }
            Err(e) => Err(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn try_moves(
        &self,
        project: Uuid,
        project_name: &str,
        iteration: &IterationRef,
        steps: &[StepRow],
        complete: Complete<'_>,
        d: &Delivery,
        tail: Option<&mut Vec<TailWrite>>,
        manifest: Option<Result<Loaded, ChannelError>>,
    ) -> Result<String, ProcessError> {
        let (now, last) = (d.now, d.last);
        let (just_released, complete_held) = match complete {
            Complete::Released(r) => (r, false),
            Complete::Held => (&[][..], true),
        };
        let mut releases = releases_from(steps);
        if releases.is_empty() {
            return Ok("nothing to move".into());
        }
        let failure =
            |channel: Option<Channel>, r: &Release, path: Option<String>, e: String| FailedMove {
                channel,
                target: Some(r.target.clone()),
                iteration: iteration.clone(),
                release_path: Some(r.release_path.clone()),
                channel_path: path,
                reason: e,
                transient: false,
            };
        let loaded = match manifest {
            Some(read) => read,
            None => self.channels.load(project, project_name, now).await,
        };
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) if e.is_transient() && !last => return Err(e.into()),
            Err(e) => {
                // No channel can move while the manifest cannot be used.
                let failed: Vec<FailedMove> = releases
                    .iter()
                    .map(|r| FailedMove {
                        transient: e.is_transient(),
                        ..failure(None, r, None, e.to_string())
                    })
                    .collect();
                self.record_failures(project, project_name, &failed).await?;
                return Ok(left_alone(&e));
            }
        };
        // What would move, to look up only those copies' facts and paths.
        let mut dry = loaded.manifest.clone();
        let plain = |c: Channel, t: &ExportTarget| {
            Some(
                self.channels
                    .paths()
                    .channel_path(project, project_name, c, t, false),
            )
        };
        let wanted = dry.released(iteration, &releases, &plain, now);
        let mut failed = Vec::new();
        // Each release that would move is checked against what cvchain recorded and what the
        // copy says of itself; a release this message just made or found current was checked
        // by the release itself.
        let mut refused: Vec<String> = Vec::new();
        for r in releases.iter_mut() {
            if !wanted.moves.iter().any(|m| m.target == r.target) {
                continue;
            }
            if let Some(done) = just_released.iter().find(|d| d.path == r.release_path)
                && done.etag.is_some()
            {
                r.size = done.size;
                r.content_md5 = done.content_md5.clone();
                continue;
            }
            let copy = self.channels.release_copy(&r.release_path).await?;
            if let Err(m) = verify_release(
                project,
                iteration.id,
                &r.target,
                &r.release_path,
                steps,
                copy.as_ref().map(|c| &c.metadata),
            ) {
                for mv in wanted.moves.iter().filter(|m| m.target == r.target) {
                    failed.push(failure(Some(mv.channel), r, None, m.to_string()));
                }
                refused.push(r.target.key());
                continue;
            }
            if let Some(c) = copy {
                r.size = c.size;
                r.content_md5 = c.content_md5;
            }
        }
        releases.retain(|r| !refused.contains(&r.target.key()));
        // Where each new entry's copy goes: a free path, or none.
        let mut paths: HashMap<(Channel, String), Option<String>> = HashMap::new();
        let new_entries: Vec<&Move> = wanted
            .moves
            .iter()
            .filter(|mv| {
                loaded.manifest.entry(mv.channel, &mv.target).is_none()
                    && !refused.contains(&mv.target.key())
            })
            .collect();
        // Their paths together: one listing of their folder, or one look each at once.
        let wanted_paths: Vec<(Channel, ExportTarget)> = new_entries
            .iter()
            .map(|mv| (mv.channel, mv.target.clone()))
            .collect();
        let found = if wanted_paths.is_empty() {
            Vec::new()
        } else {
            self.channels
                .channel_paths(project, project_name, &wanted_paths)
                .await?
        };
        for (mv, path) in new_entries.into_iter().zip(found) {
            if path.is_none()
                && let Some(r) = releases.iter().find(|r| r.target == mv.target)
            {
                failed.push(failure(
                    Some(mv.channel),
                    r,
                    Some(mv.to.channel_path.clone()),
                    self.both_held(project, project_name, mv.channel, &mv.target),
                ));
            }
            paths.insert((mv.channel, mv.target.key()), path);
        }
        let path_of = |c: Channel, t: &ExportTarget| match paths.get(&(c, t.key())) {
            Some(p) => p.clone(),
            None => plain(c, t),
        };
        let (change, loaded) = match self
            .channels
            .update_from(Some(loaded), project, project_name, now, |m| {
                m.released(iteration, &releases, &path_of, now)
            })
            .await
        {
            Ok(done) => done,
            Err(e) if e.is_transient() && !last => return Err(e.into()),
            Err(e) => {
                let mut failed = failed;
                for mv in &wanted.moves {
                    if let Some(r) = releases.iter().find(|r| r.target == mv.target) {
                        failed.push(FailedMove {
                            transient: e.is_transient(),
                            ..failure(Some(mv.channel), r, None, e.to_string())
                        });
                    }
                }
                self.record_failures(project, project_name, &failed).await?;
                return Ok(left_alone(&e));
            }
        };
        // The moves this message made, and those the same releases made before that a crash may
        // have left without their copy or row (a redelivery completes them).
        let mut moves: Vec<Move> = change.moves.clone();
        for channel in Channel::ALL {
            for r in releases
                .iter()
                .filter(|r| complete_held || just_released.iter().any(|d| d.path == r.release_path))
            {
                if let Some(e) = loaded.manifest.entry(channel, &r.target)
                    && e.holder.iteration.id == iteration.id
                    && !moves
                        .iter()
                        .any(|m| m.channel == channel && m.target == r.target)
                {
                    moves.push(Move {
                        channel,
                        target: r.target.clone(),
                        to: e.holder.clone(),
                        from: e.previous.clone(),
                    });
                }
            }
        }
        let carried = self
            .carry_out_moves(
                project,
                project_name,
                &moves,
                complete,
                loaded.manifest.revision,
                None,
                now,
                last,
            )
            .await?;
        failed.extend(carried.failed);
        let rows: Vec<_> = carried
            .moved
            .iter()
            .map(|mv| move_row(project, mv))
            .collect();
        match tail {
            Some(tail) => self.defer_all(&rows, project_name, tail),
            None => self.record_all(&rows, project_name).await?,
        }
        self.record_failures(project, project_name, &failed).await?;
        if let Some(e) = carried.retry {
            return Err(e);
        }
        Ok(describe(&change, &carried.moved, &failed, iteration))
    }

    /// Why a new entry has no place: both of its paths hold blobs that are not this project's
    /// channel copies.
    fn both_held(
        &self,
        project: Uuid,
        project_name: &str,
        channel: Channel,
        target: &ExportTarget,
    ) -> String {
        let [plain, qualified] = [false, true].map(|q| {
            self.channels
                .paths()
                .channel_path(project, project_name, channel, target, q)
        });
        format!(
            "{plain} and {qualified} both hold blobs that are not this project's channel copies (someone else's); they are left alone"
        )
    }

    /// The channel copies follow the moves. A copy whose path another project of the same name
    /// won moves to the id-qualified path (the manifest says so first, under its ETag). A move
    /// that cannot be carried out is taken back out of the manifest, so it never claims a copy
    /// that is not there, and is returned as failed. A storage failure while the message will
    /// be delivered again is returned to retry it; every move is tried first, and one the
    /// retry would not complete (`complete` says which it does) is taken back too, so none is
    /// left claimed with nobody to copy it. `before`: the manifest as it was before a manual
    /// move, whose entries a failed move goes back to (an automatic move pushed its
    /// predecessor into the history, where taking it back finds it).
    #[allow(clippy::too_many_arguments)]
    async fn carry_out_moves(
        &self,
        project: Uuid,
        project_name: &str,
        moves: &[Move],
        complete: Complete<'_>,
        revision: u64,
        before: Option<&cvchain_core::channels::Manifest>,
        now: OffsetDateTime,
        last: bool,
    ) -> Result<Carried, ProcessError> {
        let (just_released, complete_held) = match complete {
            Complete::Released(r) => (r, false),
            Complete::Held => (&[][..], true),
        };
        let mut out = Carried::default();
        // The copies go to paths of their own: they run together (one round trip, not one per
        // channel), and what each came to is judged in order below.
        let outcomes = futures::future::join_all(moves.iter().map(|mv| {
            let source = just_released
                .iter()
                .find(|d| d.path == mv.to.release_path)
                .and_then(|d| Some((d.etag.as_deref()?, d.size)));
            self.carry_out(project, project_name, mv, source, revision, now)
        }))
        .await;
        for (mv, outcome) in moves.iter().zip(outcomes) {
            let (reason, path, error) = match outcome {
                Ok(Ok(Some(done))) => {
                    out.moved.push(done);
                    continue;
                }
                // A later move replaced this one before its copy: that one carries itself out.
                Ok(Ok(None)) => continue,
                Ok(Err((reason, path))) => (reason, path, None),
                Err(e) => (e.to_string(), mv.to.channel_path.clone(), Some(e)),
            };
            let transient = error.as_ref().is_some_and(|e| e.is_transient());
            let retried = transient && !last;
            // A retry of this message completes the moves of the releases it makes (or all
            // the iteration holds): those stay for it. Any other is taken back, so the
            // manifest never claims a copy nobody will make.
            if retried
                && (complete_held || just_released.iter().any(|d| d.path == mv.to.release_path))
            {
                if out.retry.is_none() {
                    out.retry = error;
                }
                continue;
            }
            let (it, rev) = (mv.to.iteration.id, mv.to.revision);
            let taken_back = self
                .channels
                .update(project, project_name, now, |m| match before {
                    Some(b) => {
                        let was = b.entry(mv.channel, &mv.target).cloned();
                        m.restore(mv.channel, &mv.target, it, rev, was, now)
                    }
                    None => m.withdraw(mv.channel, &mv.target, it, rev, now),
                })
                .await;
            if let Err(e) = taken_back {
                tracing::warn!(project = %project, error = %e, "a failed move could not be taken back out of the manifest");
            }
            if retried {
                // Decided again, and tried again, on the next delivery.
                if out.retry.is_none() {
                    out.retry = error;
                }
                continue;
            }
            out.failed.push(FailedMove {
                channel: Some(mv.channel),
                target: Some(mv.target.clone()),
                iteration: mv.to.iteration.clone(),
                release_path: Some(mv.to.release_path.clone()),
                channel_path: Some(path),
                reason,
                transient,
            });
        }
        Ok(out)
    }

    /// One move's copy: `Ok(Ok(Some(move)))` when the copy is in place (the move as carried
    /// out, at its final path), `Ok(Ok(None))` when a later move replaced it, `Ok(Err(..))`
    /// when it cannot happen (why, and the path it could not use).
    async fn carry_out(
        &self,
        project: Uuid,
        project_name: &str,
        mv: &Move,
        source: Option<(&str, u64)>,
        revision: u64,
        now: OffsetDateTime,
    ) -> Result<Result<Option<Move>, (String, String)>, ProcessError> {
        match self
            .channels
            .sync(project, project_name, mv, source, revision)
            .await?
        {
            Synced::Copied | Synced::Current => return Ok(Ok(Some(mv.clone()))),
            Synced::Foreign => {}
        }
        // Another project of the same name got this path first: the id-qualified one is this
        // project's own, unless someone else's file is there too.
        let qualified =
            self.channels
                .paths()
                .channel_path(project, project_name, mv.channel, &mv.target, true);
        if mv.to.channel_path == qualified || !self.channels.free_for(project, &qualified).await? {
            return Ok(Err((
                self.both_held(project, project_name, mv.channel, &mv.target),
                mv.to.channel_path.clone(),
            )));
        }
        let (_, loaded) = self
            .channels
            .update(project, project_name, now, |m| {
                m.relocate(mv.channel, &mv.target, &mv.to.channel_path, &qualified, now)
            })
            .await?;
        // Relocated by this call or by another delivery a moment ago; anything else is a
        // later move, which carries itself out.
        let Some(e) = loaded.manifest.entry(mv.channel, &mv.target) else {
            return Ok(Ok(None));
        };
        if e.holder.iteration.id != mv.to.iteration.id
            || e.holder.revision != mv.to.revision
            || e.holder.channel_path != qualified
        {
            return Ok(Ok(None));
        }
        let moved = Move {
            to: e.holder.clone(),
            ..mv.clone()
        };
        tracing::info!(
            project = %project,
            from = %mv.to.channel_path,
            to = %qualified,
            "another project of the same name holds the channel path; this one uses its own"
        );
        match self
            .channels
            .sync(
                project,
                project_name,
                &moved,
                source,
                loaded.manifest.revision,
            )
            .await?
        {
            Synced::Copied | Synced::Current => Ok(Ok(Some(moved))),
            Synced::Foreign => Ok(Err((
                self.both_held(project, project_name, mv.channel, &mv.target),
                qualified,
            ))),
        }
    }

    /// Deletes the project's oldest iterations beyond `keep` that nothing needs, each with a row.
    pub async fn retain(
        &self,
        project: Uuid,
        keep: usize,
        now: OffsetDateTime,
    ) -> Result<String, ProcessError> {
        let Some(cv) = &self.cv else {
            return Ok("no Custom Vision endpoint".into());
        };
        let iterations = cv.get_iterations(project).await?;
        if iterations.len() <= keep {
            return Ok(format!(
                "{} iterations, keeping up to {keep}",
                iterations.len()
            ));
        }
        let name = cv.get_project(project).await?.name;
        let held = match self.channels.load(project, &name, now).await {
            Ok(l) => l.manifest.held_iterations().into_iter().collect(),
            Err(e) if e.is_transient() => return Err(e.into()),
            // Without the manifest nobody knows what the channels hold: delete nothing.
            Err(e) => return Ok(format!("nothing deleted: {e}")),
        };
        let steps = self.history.project_steps(project).await?;
        let plan = retention::plan(keep, &iterations, &held, &self.chain, &steps);
        let mut deleted = Vec::new();
        for d in &plan.delete {
            match cv.delete_iteration(project, d.iteration).await {
                Ok(()) => {}
                // Deleted by another instance already.
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    deleted.push(format!("{} refused ({e})", d.name));
                    continue;
                }
            }
            self.record(&retention::deletion_row(project, d, &plan, now), &name)
                .await?;
            deleted.push(d.name.clone());
        }
        Ok(if deleted.is_empty() {
            format!("nothing to delete; kept {}", plan.describe_kept())
        } else {
            format!(
                "deleted {}; kept {}",
                deleted.join(", "),
                plan.describe_kept()
            )
        })
    }

    /// `cvchain promote`: `channel` moves to `iteration` for every target it has a release copy
    /// of, bypassing the gate (the rows say so); for `production` the pointer moves and
    /// publishing follows. Refused, with nothing written, when a release copy is not what
    /// cvchain recorded (`Err` names what does not match).
    pub async fn promote_by_hand(
        &self,
        project: Uuid,
        project_name: &str,
        channel: Channel,
        iteration: &IterationRef,
        reason: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Result<Manual, String>, ProcessError> {
        let steps: Vec<StepRow> = self.history.steps(project, iteration.id).await?;
        let mut releases = releases_from(&steps);
        let mut refused = Vec::new();
        for r in releases.iter_mut() {
            let copy = self.channels.release_copy(&r.release_path).await?;
            if let Err(m) = verify_release(
                project,
                iteration.id,
                &r.target,
                &r.release_path,
                &steps,
                copy.as_ref().map(|c| &c.metadata),
            ) {
                refused.push(m.to_string());
            }
            if let Some(c) = copy {
                r.size = c.size;
                r.content_md5 = c.content_md5;
            }
        }
        let paths = self
            .resolve_paths(project, project_name, channel, &releases)
            .await?;
        for r in &releases {
            if paths.get(&r.target.key()).is_none_or(|p| p.is_none()) {
                refused.push(self.both_held(project, project_name, channel, &r.target));
            }
        }
        if !refused.is_empty() {
            return Ok(Err(refused.join("; ")));
        }
        let note = match reason {
            Some(r) => format!("promoted by hand ({r}); the gate was not consulted"),
            None => "promoted by hand; the gate was not consulted".to_owned(),
        };
        let path_of = |_: Channel, t: &ExportTarget| paths.get(&t.key()).cloned().flatten();
        let mut before = None;
        let (change, loaded) = self
            .channels
            .update(project, project_name, now, |m| {
                before = Some(m.clone());
                m.promote(channel, iteration, &releases, &path_of, &note, now)
            })
            .await?;
        let before = before.unwrap_or_else(|| loaded.manifest.clone());
        Ok(Ok(self
            .finish(
                project,
                project_name,
                change,
                &loaded,
                &before,
                Some(&note),
                now,
            )
            .await?))
    }

    /// `cvchain rollback`: every target of `channel` goes back to its previous holder (the
    /// iterations rolled back from are never promoted there again on their own); for
    /// `production` the pointer goes back and publishing follows. The manifest's previous
    /// holders are checked first, each against the release cvchain recorded for its
    /// iteration and target and the release copy itself, and the pointer's against the
    /// iteration's Training row; the iterations are named as those rows name them. Refused,
    /// with nothing written, when anything does not match (`Err` says what).
    pub async fn rollback(
        &self,
        project: Uuid,
        project_name: &str,
        channel: Channel,
        now: OffsetDateTime,
    ) -> Result<Result<Manual, String>, ProcessError> {
        for _ in 0..ATTEMPTS {
            let loaded = match self.channels.load(project, project_name, now).await {
                Ok(l) => l,
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => return Ok(Err(e.to_string())),
            };
            // The iterations a rollback may go to, as cvchain recorded them.
            let m = &loaded.manifest;
            let mut candidates: Vec<Uuid> = m
                .channels
                .get(&channel)
                .map(|c| {
                    c.targets
                        .values()
                        .filter_map(|e| e.history.last().map(|h| h.iteration.id))
                        .collect()
                })
                .unwrap_or_default();
            if channel == Channel::Production
                && let Some(p) = &m.production_pointer
                && let Some(back) = p.history.last()
            {
                candidates.push(back.iteration.id);
            }
            candidates.sort();
            candidates.dedup();
            let mut recorded: BTreeMap<Uuid, IterationRef> = BTreeMap::new();
            for id in candidates {
                let key = training_row_key(id, TrainingStatus::Completed);
                if let Some(row) = self.history.get(&project.to_string(), &key).await?
                    && let Some(it) = TrainingRow::from_row(&row)
                        .as_ref()
                        .and_then(recorded_iteration)
                {
                    recorded.insert(id, it);
                }
            }
            let mut decided = loaded.manifest.clone();
            let change = match decided.rollback(channel, now, &|id| recorded.get(&id).cloned()) {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            let mut refused: Vec<String> = Vec::new();
            if let Some(pm) = &change.pointer
                && !recorded.contains_key(&pm.to.id)
            {
                refused.push(
                    Mismatch::NotTrained {
                        project,
                        iteration: pm.to.id,
                    }
                    .to_string(),
                );
            }
            for mv in &change.moves {
                let steps = self.history.steps(project, mv.to.iteration.id).await?;
                let copy = self.channels.release_copy(&mv.to.release_path).await?;
                if let Err(m) = verify_release(
                    project,
                    mv.to.iteration.id,
                    &mv.target,
                    &mv.to.release_path,
                    &steps,
                    copy.as_ref().map(|c| &c.metadata),
                ) {
                    refused.push(format!("{} {}: {m}", channel.as_str(), mv.target));
                }
            }
            if !refused.is_empty() {
                return Ok(Err(format!(
                    "{} does not match what cvchain recorded: {}",
                    loaded.path,
                    refused.join("; ")
                )));
            }
            // Written as decided and checked, or decided again when it changed meanwhile.
            let Some(etag) = self.channels.save(&loaded, &decided).await? else {
                continue;
            };
            let written = Loaded {
                manifest: decided,
                etag: Some(etag),
                path: loaded.path.clone(),
            };
            return Ok(Ok(self
                .finish(
                    project,
                    project_name,
                    change,
                    &written,
                    &loaded.manifest,
                    Some("rolled back by hand"),
                    now,
                )
                .await?));
        }
        Err(ChannelError::Contended {
            path: cvchain_core::channels::manifest_path(project, project_name, false),
        }
        .into())
    }

    /// After a manual change: the copies, the rows, and publishing. A copy that cannot be made
    /// is taken back (its entry as it was `before`) and recorded as a failed move (a person is
    /// watching: no retry).
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        project: Uuid,
        project_name: &str,
        change: Change,
        loaded: &Loaded,
        before: &cvchain_core::channels::Manifest,
        note: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Manual, ProcessError> {
        let carried = self
            .carry_out_moves(
                project,
                project_name,
                &change.moves,
                Complete::Held,
                loaded.manifest.revision,
                Some(before),
                now,
                true,
            )
            .await?;
        for mv in &carried.moved {
            self.record(&move_row(project, mv), project_name).await?;
        }
        self.record_failures(project, project_name, &carried.failed)
            .await?;
        if let Some(pm) = &change.pointer {
            self.record(&pointer_row(project, pm, now, note), project_name)
                .await?;
        }
        let publish = match (&change.pointer, &loaded.manifest.production_pointer) {
            (Some(_), Some(p)) => self.follow_production(project, p.iteration.id).await?,
            _ => None,
        };
        Ok(Manual {
            change: Change {
                pointer: change.pointer,
                moves: carried.moved,
            },
            publish,
            failed: carried.failed,
        })
    }

    /// Where each target's copy goes in `channel`: its current path, or a free one (`None`:
    /// both are someone else's).
    async fn resolve_paths(
        &self,
        project: Uuid,
        project_name: &str,
        channel: Channel,
        releases: &[Release],
    ) -> Result<HashMap<String, Option<String>>, ProcessError> {
        let loaded = self
            .channels
            .load(project, project_name, OffsetDateTime::now_utc())
            .await?;
        let mut out = HashMap::new();
        for r in releases {
            let path = match loaded.manifest.entry(channel, &r.target) {
                Some(e) => Some(e.holder.channel_path.clone()),
                None => {
                    self.channels
                        .channel_path(project, project_name, channel, &r.target)
                        .await?
                }
            };
            out.insert(r.target.key(), path);
        }
        Ok(out)
    }
}

/// The releases an iteration has, from its step rows (what cvchain recorded, not what a
/// manifest says).
fn releases_from(steps: &[StepRow]) -> Vec<Release> {
    steps
        .iter()
        .filter_map(|s| {
            Some(Release {
                target: s.target.clone(),
                release_path: s.release_path.clone()?,
                size: s.release_size.unwrap_or(0).max(0) as u64,
                content_md5: None,
            })
        })
        .collect()
}

/// The channel status when the manifest cannot be used or written.
fn left_alone(e: &ChannelError) -> String {
    if e.is_transient() {
        format!("failed (storage kept failing up to the last delivery): {e}")
    } else {
        format!("left alone: {e}")
    }
}

/// One line on what a change to the channels did: the moves carried out, and those that
/// failed.
fn describe(
    change: &Change,
    moved: &[Move],
    failed: &[FailedMove],
    iteration: &IterationRef,
) -> String {
    let mut parts: Vec<String> = moved
        .iter()
        .filter(|m| {
            change
                .moves
                .iter()
                .any(|c| c.channel == m.channel && c.target == m.target)
        })
        .map(|m| format!("{} {} → {}", m.channel.as_str(), m.target, iteration.name))
        .collect();
    parts.extend(failed.iter().map(FailedMove::describe));
    if parts.is_empty() {
        format!("{} moves no channel", iteration.name)
    } else {
        parts.join(", ")
    }
}
