//! A stored manifest is a blob anyone with write access to the release container can rewrite:
//! every field is checked against the bounds cvchain itself keeps and against this project's
//! paths before anything reads it as a channel. A manifest that fails is refused whole, naming
//! the blob and the field.

use super::{
    Channel, Entry, HISTORY_DEPTH, Holder, IterationRef, Manifest, ManifestError, Paths, Pointer,
    manifest_path,
};
use crate::chain::ExportTarget;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

/// The largest manifest read. Ten holders per target and channel with their names and notes
/// come to a few kilobytes per target; a manifest of every platform and flavor stays far below
/// this. A larger blob is refused unread.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Revisions rise by one per change: 2^40 is a change a second for 34,000 years, far from any
/// overflow (u64, the table's Int64, a JavaScript number in a deploy script).
pub const MAX_REVISION: u64 = 1 << 40;
/// Targets per channel: more than every platform and flavor Custom Vision exports to.
pub const MAX_TARGETS: usize = 64;
/// Iterations a channel remembers having been rolled back from (the oldest are forgotten).
pub const VETO_DEPTH: usize = 100;
/// Block blobs end below 2^48 bytes.
pub const MAX_MODEL_SIZE: u64 = 1 << 48;
/// Names, notes and times, in characters.
const MAX_TEXT: usize = 1024;
/// Platforms and flavors, in characters.
const MAX_KEY: usize = 64;

struct Check<'a> {
    path: &'a str,
}

impl Check<'_> {
    fn fail(&self, field: impl Into<String>, problem: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.to_owned(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn text(&self, field: &str, v: &str, max: usize) -> Result<(), ManifestError> {
        let n = v.chars().count();
        if n > max {
            return Err(self.fail(field, format!("is {n} characters long (at most {max})")));
        }
        if v.chars().any(|c| c.is_control()) {
            return Err(self.fail(field, "holds control characters"));
        }
        Ok(())
    }

    fn time(&self, field: &str, v: &str) -> Result<(), ManifestError> {
        self.text(field, v, 64)?;
        OffsetDateTime::parse(v, &Rfc3339)
            .map(|_| ())
            .map_err(|_| self.fail(field, format!("{v:?} is not an RFC 3339 time")))
    }

    fn revision(&self, field: &str, v: u64, at_most: u64) -> Result<(), ManifestError> {
        if v > at_most {
            return Err(self.fail(field, format!("{v} is out of range (at most {at_most})")));
        }
        Ok(())
    }

    fn iteration(&self, field: &str, it: &IterationRef) -> Result<(), ManifestError> {
        if it.id.is_nil() {
            return Err(self.fail(format!("{field}.id"), "is the nil id"));
        }
        self.text(&format!("{field}.name"), &it.name, MAX_TEXT)?;
        if let Some(t) = &it.trained_at {
            self.time(&format!("{field}.trainedAt"), t)?;
        }
        for (name, v) in [
            ("precision", it.precision),
            ("recall", it.recall),
            ("mAP", it.map),
        ] {
            if let Some(v) = v
                && !(0.0..=1.0).contains(&v)
            {
                return Err(self.fail(format!("{field}.{name}"), format!("{v} is not within 0..1")));
            }
        }
        Ok(())
    }
}

/// What a manifest's paths must be: this project's.
struct Scope<'a> {
    project: Uuid,
    name: &'a str,
    paths: &'a Paths,
}

impl Scope<'_> {
    fn holder(
        &self,
        c: &Check,
        field: &str,
        channel: Channel,
        target: &ExportTarget,
        h: &Holder,
        revision: u64,
    ) -> Result<(), ManifestError> {
        c.iteration(&format!("{field}.iteration"), &h.iteration)?;
        c.text(&format!("{field}.releasePath"), &h.release_path, MAX_TEXT)?;
        if !self.paths.is_release_path(
            self.project,
            self.name,
            h.iteration.id,
            target,
            &h.release_path,
        ) {
            return Err(c.fail(
                format!("{field}.releasePath"),
                format!(
                    "{:?} is not one of project {}'s release paths for {target}",
                    h.release_path, self.project
                ),
            ));
        }
        let ours = [false, true].map(|q| {
            self.paths
                .channel_path(self.project, self.name, channel, target, q)
        });
        if !ours.contains(&h.channel_path) {
            return Err(c.fail(
                format!("{field}.channelPath"),
                format!(
                    "{:?} is not project {}'s {} channel path for {target} ({} or {})",
                    h.channel_path,
                    self.project,
                    channel.as_str(),
                    ours[0],
                    ours[1]
                ),
            ));
        }
        if h.size > MAX_MODEL_SIZE {
            return Err(c.fail(
                format!("{field}.size"),
                format!("{} is out of range", h.size),
            ));
        }
        if let Some(md5) = &h.content_md5 {
            use base64::Engine as _;
            let ok = md5.len() == 24
                && base64::engine::general_purpose::STANDARD
                    .decode(md5)
                    .is_ok_and(|b| b.len() == 16);
            if !ok {
                return Err(c.fail(format!("{field}.contentMd5"), "is not a base64 MD5"));
            }
        }
        c.time(&format!("{field}.promotedAt"), &h.promoted_at)?;
        c.revision(&format!("{field}.revision"), h.revision, revision)?;
        if let Some(note) = &h.note {
            c.text(&format!("{field}.note"), note, MAX_TEXT)?;
        }
        Ok(())
    }

    fn entry(
        &self,
        c: &Check,
        channel: Channel,
        key: &str,
        e: &Entry,
        revision: u64,
    ) -> Result<(), ManifestError> {
        let field = format!("channels.{}.targets.{key}", channel.as_str());
        c.text(&format!("{field}.platform"), &e.platform, MAX_KEY)?;
        if e.platform.is_empty() {
            return Err(c.fail(format!("{field}.platform"), "is empty"));
        }
        if let Some(f) = &e.flavor {
            c.text(&format!("{field}.flavor"), f, MAX_KEY)?;
        }
        let target = e.target();
        if target.key() != key {
            return Err(c.fail(
                field,
                format!("is filed under {key:?} but is {:?}", target.key()),
            ));
        }
        self.holder(c, &field, channel, &target, &e.holder, revision)?;
        if e.history.len() > HISTORY_DEPTH {
            return Err(c.fail(
                format!("{field}.history"),
                format!(
                    "holds {} holders (at most {HISTORY_DEPTH})",
                    e.history.len()
                ),
            ));
        }
        for (i, h) in e.history.iter().enumerate() {
            self.holder(
                c,
                &format!("{field}.history[{i}]"),
                channel,
                &target,
                h,
                revision,
            )?;
        }
        let last = e.history.last().map(|h| h.iteration.id);
        if let Some(p) = &e.previous {
            c.iteration(&format!("{field}.previous"), p)?;
        }
        if e.previous.as_ref().map(|p| p.id) != last {
            return Err(c.fail(
                format!("{field}.previous"),
                "is not the last holder of its history",
            ));
        }
        Ok(())
    }

    fn pointer(&self, c: &Check, p: &Pointer, revision: u64) -> Result<(), ManifestError> {
        c.iteration("productionPointer.iteration", &p.iteration)?;
        c.time("productionPointer.promotedAt", &p.promoted_at)?;
        c.revision("productionPointer.revision", p.revision, revision)?;
        if p.history.len() > HISTORY_DEPTH {
            return Err(c.fail(
                "productionPointer.history",
                format!("holds {} steps (at most {HISTORY_DEPTH})", p.history.len()),
            ));
        }
        for (i, s) in p.history.iter().enumerate() {
            c.iteration(
                &format!("productionPointer.history[{i}].iteration"),
                &s.iteration,
            )?;
            c.time(
                &format!("productionPointer.history[{i}].promotedAt"),
                &s.promoted_at,
            )?;
        }
        Ok(())
    }
}

impl Manifest {
    /// Checks every field against cvchain's own bounds and this project's paths: `path` is
    /// where the manifest was read, which its project name must match.
    pub fn validate(&self, path: &str, paths: &Paths) -> Result<(), ManifestError> {
        let c = Check { path };
        c.revision("revision", self.revision, MAX_REVISION)?;
        c.text("projectName", &self.project_name, MAX_TEXT)?;
        if ![false, true]
            .iter()
            .any(|q| manifest_path(self.project_id, &self.project_name, *q) == path)
        {
            return Err(c.fail(
                "projectName",
                format!(
                    "{:?} does not go with the manifest's path",
                    self.project_name
                ),
            ));
        }
        c.time("updatedAt", &self.updated_at)?;
        let scope = Scope {
            project: self.project_id,
            name: &self.project_name,
            paths,
        };
        if let Some(p) = &self.production_pointer {
            scope.pointer(&c, p, self.revision)?;
        }
        for (channel, state) in &self.channels {
            let field = format!("channels.{}", channel.as_str());
            if state.vetoed.len() > VETO_DEPTH {
                return Err(c.fail(
                    format!("{field}.vetoed"),
                    format!(
                        "holds {} iterations (at most {VETO_DEPTH})",
                        state.vetoed.len()
                    ),
                ));
            }
            if state.targets.len() > MAX_TARGETS {
                return Err(c.fail(
                    format!("{field}.targets"),
                    format!(
                        "holds {} targets (at most {MAX_TARGETS})",
                        state.targets.len()
                    ),
                ));
            }
            for (key, e) in &state.targets {
                scope.entry(&c, *channel, key, e, self.revision)?;
            }
        }
        Ok(())
    }
}

/// One piece of a path pattern: text as it is, or a sanitized name (letters, digits, `.`, `_`
/// and `-`, at least one).
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Name,
}

/// Stands for a name the pattern leaves open; letters only, so sanitizing keeps it whole.
const ANY_ITERATION: &str = "cvchainAnyIterationName";
const ANY_FLAVOR: &str = "cvchainAnyFlavor";

fn pattern(rendered: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut rest = rendered;
    loop {
        let next = [ANY_ITERATION, ANY_FLAVOR]
            .iter()
            .filter_map(|m| rest.find(m).map(|i| (i, m.len())))
            .min();
        match next {
            Some((i, len)) => {
                if i > 0 {
                    out.push(Piece::Text(rest[..i].to_owned()));
                }
                out.push(Piece::Name);
                rest = &rest[i + len..];
            }
            None => {
                if !rest.is_empty() {
                    out.push(Piece::Text(rest.to_owned()));
                }
                return out;
            }
        }
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Whether `s` is what `pieces` describe. A name never crosses a `/`, so the search stays
/// within one path segment.
fn matches(pieces: &[Piece], s: &str) -> bool {
    match pieces.split_first() {
        None => s.is_empty(),
        Some((Piece::Text(t), rest)) => {
            s.strip_prefix(t.as_str()).is_some_and(|r| matches(rest, r))
        }
        Some((Piece::Name, rest)) => {
            // Sanitized names neither start nor end with `.` or `-` (so never `.` or `..`).
            let run = s.find(|c: char| !name_char(c)).unwrap_or(s.len());
            let edge = |c: char| matches!(c, '.' | '-');
            !s.starts_with(edge)
                && (1..=run).any(|i| !s[..i].ends_with(edge) && matches(rest, &s[i..]))
        }
    }
}

impl Paths {
    /// Whether `path` is one of the project's release paths of `target` for this iteration,
    /// whatever the iteration was called when it was released (a rename changes the name, not
    /// whose path it is): the release template rendered with the project's name and id, the
    /// iteration's id, any iteration name, and for a target without a flavor any flavor.
    pub fn is_release_path(
        &self,
        project: Uuid,
        project_name: &str,
        iteration: Uuid,
        target: &ExportTarget,
        path: &str,
    ) -> bool {
        let flavors: Vec<Option<String>> = match &target.flavor {
            Some(f) => vec![Some(f.clone())],
            None => vec![None, Some(ANY_FLAVOR.to_owned())],
        };
        for qualify in [false, true] {
            for iteration_name in [ANY_ITERATION, ""] {
                for flavor in &flavors {
                    let names = crate::release::ReleaseNames {
                        project_id: project,
                        project_name: project_name.to_owned(),
                        iteration_id: iteration,
                        iteration_name: iteration_name.to_owned(),
                        platform: target.platform.clone(),
                        flavor: flavor.clone(),
                    };
                    if matches(&pattern(&self.release.render(&names, qualify)), path) {
                        return true;
                    }
                }
            }
        }
        false
    }
}
