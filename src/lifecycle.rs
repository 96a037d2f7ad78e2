//! The model lifecycle, carried out: the production pointer and publishing that follows it,
//! channel moves (the manifest under its ETag, then the channel copies, then the rows), manual
//! promotions and rollbacks, and retention. What moves and what goes is decided in
//! `cvchain_core::{gate, channels, retention}`; this module reads what they need and writes
//! what they decided.

use crate::error::ProcessError;
use crate::events::Events;
use cvchain_azure::customvision::TrainingApi;
use cvchain_azure::history::store::HistoryStore;
use cvchain_azure::storage::channels::{ChannelStore, Loaded};
use cvchain_core::chain::ExportTarget;
use cvchain_core::channels::{
    Change, Channel, IterationRef, Move, Release, move_row, pointer_row, publish_steps,
};
use cvchain_core::config::PublishSettings;
use cvchain_core::customvision::codes;
use cvchain_core::history::StepRow;
use cvchain_core::release::Released;
use cvchain_core::retention;
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

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

impl Lifecycle {
    /// Records a channel move or a deletion, with its event when a sink is configured.
    async fn record(
        &self,
        row: &cvchain_core::history::HistoryRow,
        project_name: &str,
    ) -> Result<(), ProcessError> {
        match &self.events {
            Some(events) => {
                let facts = cvchain_core::events::IterationFacts {
                    project_name: project_name.to_owned(),
                    ..Default::default()
                };
                events.record(row, &facts, None, Vec::new()).await?;
            }
            // Without sinks nothing reads the row that is there already.
            None => {
                self.history.record_once(row).await?;
            }
        }
        Ok(())
    }

    /// The iteration passed the gate: the production pointer moves to it unless it is older or
    /// vetoed, and the prediction endpoint follows the pointer. Returns the channel status and,
    /// with publishing configured, the publish status.
    pub async fn promote(
        &self,
        project: Uuid,
        project_name: &str,
        iteration: &IterationRef,
        known: Option<&[StepRow]>,
        now: OffsetDateTime,
    ) -> Result<(String, Option<String>), ProcessError> {
        let (change, loaded) = match self
            .channels
            .update(project, project_name, now, |m| {
                m.gate_passed(iteration, now)
            })
            .await
        {
            Ok(done) => done,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                let publish = self
                    .publish
                    .as_ref()
                    .map(|_| "not published: the production pointer cannot be read".to_owned());
                return Ok((format!("left alone: {e}"), publish));
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
            .move_channels(project, project_name, iteration, known, &[], now)
            .await?;
        if moved != "nothing to move" {
            status.push_str(&format!("; {moved}"));
        }
        let publish = match pointer {
            Some(p) => self.follow_production(project, p.iteration.id).await?,
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
    /// redelivery after a crash) are completed the same way.
    pub async fn move_channels(
        &self,
        project: Uuid,
        project_name: &str,
        iteration: &IterationRef,
        known: Option<&[StepRow]>,
        just_released: &[Released],
        now: OffsetDateTime,
    ) -> Result<String, ProcessError> {
        let read;
        let steps = match known {
            Some(s) => s,
            None => {
                read = self.history.steps(project, iteration.id).await?;
                &read[..]
            }
        };
        let mut releases: Vec<Release> = steps
            .iter()
            .filter_map(|s| {
                Some(Release {
                    target: s.target.clone(),
                    release_path: s.release_path.clone()?,
                    size: s.release_size.unwrap_or(0).max(0) as u64,
                    content_md5: None,
                })
            })
            .collect();
        if releases.is_empty() {
            return Ok("nothing to move".into());
        }
        let loaded = match self.channels.load(project, project_name, now).await {
            Ok(l) => l,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => return Ok(format!("left alone: {e}")),
        };
        // What would move, to look up only those copies' facts and paths.
        let mut dry = loaded.manifest.clone();
        let plain = |c: Channel, t: &ExportTarget| {
            self.channels
                .paths()
                .channel_path(project, project_name, c, t, false)
        };
        let wanted = dry.released(iteration, &releases, &plain, now);
        let mut paths = std::collections::HashMap::new();
        for mv in &wanted.moves {
            if let Some(e) = loaded.manifest.entry(mv.channel, &mv.target) {
                paths.insert((mv.channel, mv.target.key()), e.holder.channel_path.clone());
                continue;
            }
            match self
                .channels
                .channel_path(project, project_name, mv.channel, &mv.target)
                .await?
            {
                Some(p) => {
                    paths.insert((mv.channel, mv.target.key()), p);
                }
                None => {
                    releases.retain(|r| r.target != mv.target);
                }
            }
        }
        for r in releases.iter_mut() {
            if !wanted.moves.iter().any(|m| m.target == r.target) {
                continue;
            }
            // Copied a moment ago by this invocation: its facts are known.
            if let Some(done) = just_released.iter().find(|d| d.path == r.release_path)
                && done.etag.is_some()
            {
                r.size = done.size;
                r.content_md5 = done.content_md5.clone();
            } else if let Some((size, md5)) = self.channels.release_facts(&r.release_path).await? {
                r.size = size;
                r.content_md5 = md5;
            }
        }
        let path_of = |c: Channel, t: &ExportTarget| {
            paths
                .get(&(c, t.key()))
                .cloned()
                .unwrap_or_else(|| plain(c, t))
        };
        let (change, loaded) = match self
            .channels
            .update_from(Some(loaded), project, project_name, now, |m| {
                m.released(iteration, &releases, &path_of, now)
            })
            .await
        {
            Ok(done) => done,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => return Ok(format!("left alone: {e}")),
        };
        // The moves this message made, and those the same releases made before that a crash may
        // have left without their copy or row (a redelivery completes them).
        let mut moves: Vec<Move> = change.moves.clone();
        for channel in Channel::ALL {
            for r in releases
                .iter()
                .filter(|r| just_released.iter().any(|d| d.path == r.release_path))
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
        self.carry_out_moves(project, project_name, &moves, just_released)
            .await?;
        Ok(describe_change(&change, iteration))
    }

    /// The channel copies follow the moves, then each move gets its history row (the copy
    /// first, so a row never announces a copy that is not there).
    pub async fn carry_out_moves(
        &self,
        project: Uuid,
        project_name: &str,
        moves: &[Move],
        just_released: &[Released],
    ) -> Result<(), ProcessError> {
        for mv in moves {
            let source = just_released
                .iter()
                .find(|d| d.path == mv.to.release_path)
                .and_then(|d| Some((d.etag.as_deref()?, d.size)));
            self.channels
                .sync(project, project_name, mv, source)
                .await?;
            self.record(&move_row(project, mv), project_name).await?;
        }
        Ok(())
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

    /// The releases an iteration has, from its step rows.
    async fn releases_of(
        &self,
        project: Uuid,
        iteration: Uuid,
    ) -> Result<Vec<Release>, ProcessError> {
        let steps: Vec<StepRow> = self.history.steps(project, iteration).await?;
        Ok(steps
            .iter()
            .filter_map(|s| {
                Some(Release {
                    target: s.target.clone(),
                    release_path: s.release_path.clone()?,
                    size: s.release_size.unwrap_or(0).max(0) as u64,
                    content_md5: None,
                })
            })
            .collect())
    }

    /// `cvchain promote`: `channel` moves to `iteration` for every target it has a release copy
    /// of, bypassing the gate (the rows say so); for `production` the pointer moves and
    /// publishing follows.
    pub async fn promote_by_hand(
        &self,
        project: Uuid,
        project_name: &str,
        channel: Channel,
        iteration: &IterationRef,
        reason: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(Change, Option<String>), ProcessError> {
        let mut releases = self.releases_of(project, iteration.id).await?;
        for r in releases.iter_mut() {
            if let Some((size, md5)) = self.channels.release_facts(&r.release_path).await? {
                r.size = size;
                r.content_md5 = md5;
            }
        }
        let paths = self
            .resolve_paths(project, project_name, channel, &releases)
            .await?;
        releases.retain(|r| paths.contains_key(&r.target.key()));
        let note = match reason {
            Some(r) => format!("promoted by hand ({r}); the gate was not consulted"),
            None => "promoted by hand; the gate was not consulted".to_owned(),
        };
        let path_of = |_: Channel, t: &ExportTarget| paths[&t.key()].clone();
        let (change, loaded) = self
            .channels
            .update(project, project_name, now, |m| {
                m.promote(channel, iteration, &releases, &path_of, &note, now)
            })
            .await?;
        self.finish(project, project_name, &change, &loaded, Some(&note), now)
            .await
    }

    /// `cvchain rollback`: every target of `channel` goes back to its previous holder (the
    /// iterations rolled back from are never promoted there again on their own); for
    /// `production` the pointer goes back and publishing follows.
    pub async fn rollback(
        &self,
        project: Uuid,
        project_name: &str,
        channel: Channel,
        now: OffsetDateTime,
    ) -> Result<Result<(Change, Option<String>), String>, ProcessError> {
        let mut refused = None;
        let (change, loaded) = self
            .channels
            .update(project, project_name, now, |m| {
                match m.rollback(channel, now) {
                    Ok(c) => c,
                    Err(e) => {
                        refused = Some(e);
                        Change::default()
                    }
                }
            })
            .await?;
        if let Some(e) = refused {
            return Ok(Err(e));
        }
        Ok(Ok(self
            .finish(
                project,
                project_name,
                &change,
                &loaded,
                Some("rolled back by hand"),
                now,
            )
            .await?))
    }

    /// After a manual change: the copies, the rows, and publishing.
    async fn finish(
        &self,
        project: Uuid,
        project_name: &str,
        change: &Change,
        loaded: &Loaded,
        note: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(Change, Option<String>), ProcessError> {
        self.carry_out_moves(project, project_name, &change.moves, &[])
            .await?;
        if let Some(pm) = &change.pointer {
            self.record(&pointer_row(project, pm, now, note), project_name)
                .await?;
        }
        let publish = match (&change.pointer, &loaded.manifest.production_pointer) {
            (Some(_), Some(p)) => self.follow_production(project, p.iteration.id).await?,
            _ => None,
        };
        Ok((change.clone(), publish))
    }

    /// Where each target's copy goes in `channel`: its current path, or a free one.
    async fn resolve_paths(
        &self,
        project: Uuid,
        project_name: &str,
        channel: Channel,
        releases: &[Release],
    ) -> Result<std::collections::HashMap<String, String>, ProcessError> {
        let loaded = self
            .channels
            .load(project, project_name, OffsetDateTime::now_utc())
            .await?;
        let mut out = std::collections::HashMap::new();
        for r in releases {
            let path = match loaded.manifest.entry(channel, &r.target) {
                Some(e) => Some(e.holder.channel_path.clone()),
                None => {
                    self.channels
                        .channel_path(project, project_name, channel, &r.target)
                        .await?
                }
            };
            if let Some(p) = path {
                out.insert(r.target.key(), p);
            }
        }
        Ok(out)
    }
}

/// One line on what a change to the channels did.
fn describe_change(change: &Change, iteration: &IterationRef) -> String {
    if change.moves.is_empty() {
        return format!("{} moves no channel", iteration.name);
    }
    let moved: Vec<String> = change
        .moves
        .iter()
        .map(|m| format!("{} {} → {}", m.channel.as_str(), m.target, iteration.name))
        .collect();
    moved.join(", ")
}
