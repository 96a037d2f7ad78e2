//! People are consumers too: which events reach a Teams or Slack channel, and the message each
//! becomes, decided here in pure code.
//!
//! - [`ChatSelection`] (`CVCHAIN_CHAT_EVENTS`): the event types a channel is told; by default
//!   what an ML team acts on (a training that failed, the gate's verdict, production moving, a
//!   move that failed, a chain completed, an export that failed). Events not chosen are recorded
//!   as skipped for the chat sinks, so they never hold up the order.
//! - [`Summary`]: what a message says, read from the event's typed data (the project and
//!   iteration, the metrics with the gate's verdict and reasons, the channel moved and its
//!   previous holder, each export's outcome) and a link to the console's page of the project.
//! - [`teams_message`] and [`slack_message`]: the Teams Workflows message (an Adaptive Card 1.5
//!   attachment) and the Slack incoming-webhook payload (`text` and Block Kit `blocks`), each
//!   serialized once and within its service's limits: when too large, its text fields are
//!   shortened (ending in `…`) and it is built again; its JSON is never cut.

use super::{CloudEvent, EventType};
use crate::redact::shorten;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// `CVCHAIN_CHAT_EVENTS`.
pub const CHAT_EVENTS_SETTING: &str = "CVCHAIN_CHAT_EVENTS";
/// `CVCHAIN_CONSOLE_URL`: the console's public base URL; a project's page is
/// `{base}/{projectId}`.
pub const CONSOLE_URL_SETTING: &str = "CVCHAIN_CONSOLE_URL";
/// What a Teams Workflows webhook takes (the message as posted, in bytes of JSON).
pub const TEAMS_MAX_BYTES: usize = 28_000;
/// The Adaptive Card version Teams renders (and the highest it renders).
pub const ADAPTIVE_CARD_VERSION: &str = "1.5";
/// Slack's Block Kit limits: blocks per message, characters of a section's text, of one of its
/// fields, fields per section, characters of a header, elements of a context block.
pub const SLACK_MAX_BLOCKS: usize = 50;
pub const SLACK_MAX_SECTION_CHARS: usize = 3000;
pub const SLACK_MAX_FIELD_CHARS: usize = 2000;
pub const SLACK_MAX_FIELDS: usize = 10;
pub const SLACK_MAX_HEADER_CHARS: usize = 150;
/// Reasons or exports listed in one message; more are counted, not listed.
const MAX_LIST: usize = 20;

/// The event types chat gets when `CVCHAIN_CHAT_EVENTS` is unset.
pub const DEFAULT_CHAT_EVENTS: [EventType; 6] = [
    EventType::TrainingFailed,
    EventType::GateEvaluated,
    EventType::ChannelMoved,
    EventType::ChannelMoveFailed,
    EventType::ChainCompleted,
    EventType::ExportFailed,
];

/// Which events reach the chat sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSelection {
    types: BTreeSet<EventType>,
    /// `channel.moved:all`: every channel move (each target's `latest` and `production` copy);
    /// otherwise only production's moves, one per move (the pointer's).
    every_move: bool,
}

impl Default for ChatSelection {
    fn default() -> Self {
        Self {
            types: DEFAULT_CHAT_EVENTS.into_iter().collect(),
            every_move: false,
        }
    }
}

impl ChatSelection {
    /// Event types (`gate.evaluated` or `io.cvchain.gate.evaluated`) separated by `,`, `;` or
    /// spaces; `channel.moved:all` for every channel move; `all` for every type. The error
    /// names the entry and what is allowed.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut types = BTreeSet::new();
        let mut every_move = false;
        for entry in text
            .split([',', ';', ' ', '\t', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if entry.eq_ignore_ascii_case("all") {
                types.extend(EventType::ALL.into_iter().filter(|t| *t != EventType::Test));
                every_move = true;
                continue;
            }
            let (name, all) = match entry.rsplit_once(':') {
                Some((n, a)) if a.eq_ignore_ascii_case("all") => (n, true),
                _ => (entry, false),
            };
            let kind = EventType::parse(name)
                .filter(|t| *t != EventType::Test)
                .ok_or_else(|| {
                    let names: Vec<&str> = EventType::ALL
                        .iter()
                        .filter(|t| **t != EventType::Test)
                        .map(|t| t.as_str().trim_start_matches("io.cvchain."))
                        .collect();
                    format!(
                        "{entry:?} is not an event type (one of {}, channel.moved:all, or all)",
                        names.join(", ")
                    )
                })?;
            if all && kind != EventType::ChannelMoved {
                return Err(format!(
                    "{entry:?}: only channel.moved takes :all (every channel and target)"
                ));
            }
            every_move |= all;
            types.insert(kind);
        }
        if types.is_empty() {
            return Err("names no event type".into());
        }
        Ok(Self { types, every_move })
    }

    /// Whether a chat channel is told `event`. A channel move is told when it moves production
    /// as a whole (the pointer: one message per move), unless every move was asked for.
    pub fn wants(&self, event: &CloudEvent) -> bool {
        let Some(kind) = event.event_type() else {
            return false;
        };
        if kind == EventType::Test {
            return true;
        }
        if !self.types.contains(&kind) {
            return false;
        }
        if kind == EventType::ChannelMoved && !self.every_move {
            return event.data.get("channel").and_then(|c| c.as_str()) == Some("production")
                && event.data.get("pointer").and_then(|p| p.as_bool()) == Some(true);
        }
        true
    }

    /// As the settings would say it.
    pub fn describe(&self) -> String {
        self.types
            .iter()
            .map(|t| {
                let short = t.as_str().trim_start_matches("io.cvchain.");
                match (t, self.every_move) {
                    (EventType::ChannelMoved, true) => format!("{short}:all"),
                    (EventType::ChannelMoved, false) => format!("{short} (production)"),
                    _ => short.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How a message should look: good news, bad news, a warning, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Good,
    Attention,
    Warning,
    Neutral,
}

/// One line of facts: `Precision: 88.0%`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub title: String,
    pub value: String,
}

/// What a chat message says, whichever service it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub tone: Tone,
    /// `Gate passed`, `Production moved`, …
    pub title: String,
    /// The project's name (its id when the name is unknown); empty for the test message.
    pub project: String,
    /// The iteration's name (or id); empty when the event names none.
    pub iteration: String,
    pub facts: Vec<Fact>,
    /// A heading and its items (the gate's reasons, each export's outcome).
    pub lists: Vec<(String, Vec<String>)>,
    /// The event's type, time and id: where to look it up (`cvchain events`).
    pub footer: String,
    /// The console's page of the project.
    pub link: Option<String>,
}

impl Summary {
    /// `Gate passed: Widgets · Iteration 2`.
    pub fn headline(&self) -> String {
        let mut s = self.title.clone();
        let names: Vec<&str> = [self.project.as_str(), self.iteration.as_str()]
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect();
        if !names.is_empty() {
            s.push_str(": ");
            s.push_str(&names.join(" · "));
        }
        s
    }

    /// Every text at most `max` characters (the link and the fact titles, cvchain's own, stay).
    fn shortened(&self, max: usize) -> Self {
        let cut = |s: &String| shorten(s, max);
        Self {
            tone: self.tone,
            title: cut(&self.title),
            project: cut(&self.project),
            iteration: cut(&self.iteration),
            facts: self
                .facts
                .iter()
                .map(|f| Fact {
                    title: f.title.clone(),
                    value: cut(&f.value),
                })
                .collect(),
            lists: self
                .lists
                .iter()
                .map(|(h, items)| (h.clone(), items.iter().map(cut).collect()))
                .collect(),
            footer: cut(&self.footer),
            link: self.link.clone(),
        }
    }

    fn longest(&self) -> usize {
        let count = |s: &String| s.chars().count();
        [
            count(&self.title),
            count(&self.project),
            count(&self.iteration),
            count(&self.footer),
        ]
        .into_iter()
        .chain(self.facts.iter().map(|f| count(&f.value)))
        .chain(self.lists.iter().flat_map(|(_, i)| i.iter().map(count)))
        .max()
        .unwrap_or(0)
    }
}

/// The members of an event's data a message uses; what is missing or of another type is
/// left out (an event recorded trimmed keeps its ids).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Data {
    project_id: Option<String>,
    project_name: Option<String>,
    iteration_id: Option<String>,
    iteration_name: Option<String>,
    metrics: Option<Metrics>,
    verdict: Option<String>,
    reasons: Vec<String>,
    publish_status: Option<String>,
    channel_status: Option<String>,
    channel: Option<String>,
    pointer: Option<bool>,
    platform: Option<String>,
    flavor: Option<String>,
    reason: Option<String>,
    previous_iteration: Option<Previous>,
    note: Option<String>,
    status: Option<String>,
    exports: Vec<ExportOutcome>,
    transient: Option<bool>,
    release_path: Option<String>,
    channel_path: Option<String>,
    kept: Option<String>,
    message: Option<String>,
    trimmed: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Metrics {
    precision: Option<f64>,
    recall: Option<f64>,
    #[serde(rename = "mAP")]
    map: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Previous {
    id: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ExportOutcome {
    platform: Option<String>,
    flavor: Option<String>,
    status: Option<String>,
    reason: Option<String>,
}

fn present(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn percent(v: Option<f64>) -> String {
    match v.filter(|v| v.is_finite()) {
        Some(v) => format!("{:.1}%", v * 100.0),
        None => "n/a".into(),
    }
}

fn target(platform: &Option<String>, flavor: &Option<String>) -> Option<String> {
    present(platform).map(|p| match present(flavor) {
        Some(f) => format!("{p} ({f})"),
        None => p.to_owned(),
    })
}

/// The console's page of `project`: `{console}/{projectId}` (the id percent-encoded).
pub fn console_link(console: &str, project: &str) -> String {
    let id = percent_encoding::utf8_percent_encode(project, percent_encoding::NON_ALPHANUMERIC)
        .to_string()
        .replace("%2D", "-");
    format!("{}/{id}", console.trim_end_matches('/'))
}

/// What the message about `event` says, with a link to the project's page when `console` is
/// set (`CVCHAIN_CONSOLE_URL`).
pub fn summarize(event: &CloudEvent, console: Option<&str>) -> Summary {
    let data: Data = serde_json::from_value(event.data.clone()).unwrap_or_else(|_| Data {
        project_id: event
            .data
            .get("projectId")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        iteration_id: event
            .data
            .get("iterationId")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        ..Default::default()
    });
    let kind = event.event_type();
    let project = present(&data.project_name)
        .or(present(&data.project_id))
        .unwrap_or_default()
        .to_owned();
    let iteration = present(&data.iteration_name)
        .or(present(&data.iteration_id))
        .unwrap_or_default()
        .to_owned();
    let mut facts = Vec::new();
    let mut fact = |title: &str, value: String| {
        if !value.trim().is_empty() {
            facts.push(Fact {
                title: title.to_owned(),
                value,
            });
        }
    };
    let mut lists = Vec::new();
    let metrics = |fact: &mut dyn FnMut(&str, String), m: &Option<Metrics>| {
        if let Some(m) = m {
            fact("Precision", percent(m.precision));
            fact("Recall", percent(m.recall));
            fact("mAP", percent(m.map));
        }
    };
    let (tone, title) = match kind {
        Some(EventType::TrainingCompleted) => {
            metrics(&mut fact, &data.metrics);
            (Tone::Neutral, "Training completed".to_owned())
        }
        Some(EventType::TrainingFailed) => {
            fact(
                "Reason",
                present(&data.reason)
                    .unwrap_or("Custom Vision reported TrainingFailed")
                    .to_owned(),
            );
            (Tone::Attention, "Training failed".to_owned())
        }
        Some(EventType::GateEvaluated) => {
            let passed = present(&data.verdict) == Some("passed");
            metrics(&mut fact, &data.metrics);
            fact(
                "Verdict",
                present(&data.verdict).unwrap_or("unknown").to_owned(),
            );
            if let Some(s) = present(&data.channel_status) {
                fact("Channels", s.to_owned());
            }
            if let Some(s) = present(&data.publish_status) {
                fact("Publishing", s.to_owned());
            }
            if !data.reasons.is_empty() {
                lists.push((
                    if passed { "Rules held" } else { "Why" }.to_owned(),
                    data.reasons.clone(),
                ));
            }
            if passed {
                (Tone::Good, "Gate passed".to_owned())
            } else {
                (Tone::Attention, "Gate refused".to_owned())
            }
        }
        Some(EventType::ChannelMoved) => {
            let channel = present(&data.channel).unwrap_or("a channel").to_owned();
            fact("Channel", channel.clone());
            if let Some(t) = target(&data.platform, &data.flavor) {
                fact("Target", t);
            }
            fact("Now", iteration.clone());
            let previous = match &data.previous_iteration {
                Some(p) => match (present(&p.name), present(&p.id)) {
                    (Some(n), Some(id)) => format!("{n} ({id})"),
                    (Some(n), None) => n.to_owned(),
                    (None, Some(id)) => id.to_owned(),
                    (None, None) => "none".into(),
                },
                None => "none (its first holder)".into(),
            };
            fact("Previous holder", previous);
            if let Some(r) = present(&data.reason) {
                fact("Why", r.to_owned());
            }
            metrics(&mut fact, &data.metrics);
            if let Some(n) = present(&data.note) {
                fact("Note", n.to_owned());
            }
            let mut t = channel;
            if let Some(c) = t.get_mut(..1) {
                c.make_ascii_uppercase();
            }
            (Tone::Good, format!("{t} moved"))
        }
        Some(EventType::ChannelMoveFailed) => {
            fact(
                "Channel",
                present(&data.channel).unwrap_or("unknown").to_owned(),
            );
            fact(
                "Target",
                target(&data.platform, &data.flavor)
                    .unwrap_or_else(|| "the production pointer".into()),
            );
            fact(
                "Reason",
                present(&data.reason).unwrap_or("unknown").to_owned(),
            );
            if data.transient == Some(true) {
                fact(
                    "Transient",
                    "yes: storage kept failing; the next notification tries again".into(),
                );
            }
            if let Some(p) = present(&data.channel_path) {
                fact("Channel path", p.to_owned());
            }
            (Tone::Warning, "Channel move failed".to_owned())
        }
        Some(EventType::ChainCompleted) => {
            metrics(&mut fact, &data.metrics);
            let mut failed = 0;
            let lines: Vec<String> = data
                .exports
                .iter()
                .map(|e| {
                    let status = present(&e.status).unwrap_or("unknown");
                    if matches!(status, "Failed" | "Refused") {
                        failed += 1;
                    }
                    let name = target(&e.platform, &e.flavor).unwrap_or_else(|| "?".into());
                    match present(&e.reason) {
                        Some(r) => format!("{name}: {status} ({r})"),
                        None => format!("{name}: {status}"),
                    }
                })
                .collect();
            if !lines.is_empty() {
                lists.push(("Exports".into(), lines));
            }
            if failed > 0 {
                (
                    Tone::Warning,
                    format!("Export chain completed, {failed} export(s) failed"),
                )
            } else {
                (Tone::Good, "Export chain completed".to_owned())
            }
        }
        Some(EventType::ExportFailed) => {
            if let Some(t) = target(&data.platform, &data.flavor) {
                fact("Target", t);
            }
            fact(
                "Status",
                present(&data.status).unwrap_or("Failed").to_owned(),
            );
            if let Some(r) = present(&data.reason) {
                fact("Reason", r.to_owned());
            }
            (Tone::Attention, "Export failed".to_owned())
        }
        Some(EventType::ExportRequested) => {
            if let Some(t) = target(&data.platform, &data.flavor) {
                fact("Target", t);
            }
            (Tone::Neutral, "Export requested".to_owned())
        }
        Some(EventType::ModelReleased) => {
            if let Some(t) = target(&data.platform, &data.flavor) {
                fact("Target", t);
            }
            if let Some(p) = present(&data.release_path) {
                fact("Release path", p.to_owned());
            }
            metrics(&mut fact, &data.metrics);
            (Tone::Good, "Model released".to_owned())
        }
        Some(EventType::IterationDeleted) => {
            if let Some(r) = present(&data.reason) {
                fact("Reason", r.to_owned());
            }
            if let Some(k) = present(&data.kept) {
                fact("Kept", k.to_owned());
            }
            (Tone::Neutral, "Iteration deleted by retention".to_owned())
        }
        Some(EventType::Test) => {
            fact(
                "Message",
                present(&data.message)
                    .unwrap_or("a test message from `cvchain events test`")
                    .to_owned(),
            );
            (Tone::Neutral, "cvchain test message".to_owned())
        }
        None => (Tone::Neutral, format!("cvchain event {}", event.kind)),
    };
    if data.trimmed.is_some() {
        fact(
            "Note",
            "the event was recorded shortened; `cvchain history` has every fact".into(),
        );
    }
    for (_, items) in &mut lists {
        if items.len() > MAX_LIST {
            let more = items.len() - MAX_LIST;
            items.truncate(MAX_LIST);
            items.push(format!("… and {more} more"));
        }
    }
    let short_kind = event.kind.trim_start_matches("io.cvchain.");
    let footer = match event.time.as_str() {
        "" => format!("cvchain · {short_kind} · event {}", event.id),
        t => format!("cvchain · {short_kind} · {t} · event {}", event.id),
    };
    let link = match (console, kind, present(&data.project_id)) {
        (Some(c), Some(EventType::Test), _) => Some(c.trim_end_matches('/').to_owned()),
        (Some(c), _, Some(p)) => Some(console_link(c, p)),
        _ => None,
    };
    Summary {
        tone,
        title,
        project: if kind == Some(EventType::Test) {
            String::new()
        } else {
            project
        },
        iteration,
        facts,
        lists,
        footer,
        link,
    }
}

/// A message ready to post: its JSON, and why it was shortened, when it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub body: String,
    pub trimmed: Option<String>,
}

/// The largest every-text length at which `fits` holds, and the body built there.
fn fit_summary(
    s: &Summary,
    build: impl Fn(&Summary) -> String,
    fits: impl Fn(&str) -> bool,
    limit: &str,
) -> Message {
    let body = build(s);
    if fits(&body) {
        return Message {
            body,
            trimmed: None,
        };
    }
    let (mut lo, mut hi) = (0usize, s.longest());
    let mut best = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let candidate = build(&s.shortened(mid));
        if fits(&candidate) {
            best = Some(candidate);
            lo = mid + 1;
        } else if mid == 0 {
            break;
        } else {
            hi = mid - 1;
        }
    }
    let body = best.unwrap_or_else(|| {
        // Even names of nothing do not fit (thousands of list items): the headline alone.
        let bare = Summary {
            facts: Vec::new(),
            lists: Vec::new(),
            ..s.shortened(64)
        };
        build(&bare)
    });
    Message {
        trimmed: Some(format!(
            "sent shortened: {} bytes over {limit}; texts end in …",
            build(s).len()
        )),
        body,
    }
}

// ---------------------------------------------------------------------------------------------
// Teams: a Workflows message with one Adaptive Card attachment.

#[derive(Debug, Serialize)]
struct TeamsMessage {
    #[serde(rename = "type")]
    kind: &'static str,
    attachments: Vec<TeamsAttachment>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TeamsAttachment {
    content_type: &'static str,
    /// Always `null`, as the Workflows template expects it.
    content_url: Option<String>,
    content: AdaptiveCard,
}

#[derive(Debug, Serialize)]
struct AdaptiveCard {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "$schema")]
    schema: &'static str,
    version: &'static str,
    body: Vec<CardElement>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    actions: Vec<CardAction>,
    /// Teams: use the channel's full width.
    msteams: MsTeams,
}

#[derive(Debug, Serialize)]
struct MsTeams {
    width: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type")]
enum CardElement {
    TextBlock {
        text: String,
        wrap: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        weight: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        color: Option<&'static str>,
        #[serde(rename = "isSubtle", skip_serializing_if = "Option::is_none")]
        is_subtle: Option<bool>,
    },
    FactSet {
        facts: Vec<CardFact>,
    },
}

#[derive(Debug, Serialize)]
struct CardFact {
    title: String,
    value: String,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type")]
enum CardAction {
    #[serde(rename = "Action.OpenUrl")]
    OpenUrl { title: String, url: String },
}

/// Text for a card: Teams renders a TextBlock's and a fact's text as markdown, so a name such as
/// `[docs](https://…)` would become a link in a message cvchain posts. A zero-width space between
/// `]` and `(` (and after `<`, which starts an autolink) keeps such text as it reads.
pub fn teams_text(text: &str) -> String {
    text.replace("](", "]\u{200B}(").replace('<', "<\u{200B}")
}

fn text_block(text: String) -> CardElement {
    CardElement::TextBlock {
        text: teams_text(&text),
        wrap: true,
        weight: None,
        size: None,
        color: None,
        is_subtle: None,
    }
}

fn teams_card(s: &Summary) -> String {
    let color = match s.tone {
        Tone::Good => "Good",
        Tone::Attention => "Attention",
        Tone::Warning => "Warning",
        Tone::Neutral => "Default",
    };
    let mut body = vec![CardElement::TextBlock {
        text: teams_text(&s.headline()),
        wrap: true,
        weight: Some("Bolder"),
        size: Some("Medium"),
        color: Some(color),
        is_subtle: None,
    }];
    if !s.facts.is_empty() {
        body.push(CardElement::FactSet {
            facts: s
                .facts
                .iter()
                .map(|f| CardFact {
                    title: teams_text(&f.title),
                    value: teams_text(&f.value),
                })
                .collect(),
        });
    }
    for (heading, items) in &s.lists {
        body.push(CardElement::TextBlock {
            text: teams_text(heading),
            wrap: true,
            weight: Some("Bolder"),
            size: None,
            color: None,
            is_subtle: None,
        });
        let lines: Vec<String> = items.iter().map(|i| format!("- {i}")).collect();
        body.push(text_block(lines.join("\r")));
    }
    body.push(CardElement::TextBlock {
        text: teams_text(&s.footer),
        wrap: true,
        weight: None,
        size: Some("Small"),
        color: None,
        is_subtle: Some(true),
    });
    let actions = s
        .link
        .iter()
        .map(|url| CardAction::OpenUrl {
            title: "Open in the console".into(),
            url: url.clone(),
        })
        .collect();
    let message = TeamsMessage {
        kind: "message",
        attachments: vec![TeamsAttachment {
            content_type: "application/vnd.microsoft.card.adaptive",
            content_url: None,
            content: AdaptiveCard {
                kind: "AdaptiveCard",
                schema: "http://adaptivecards.io/schemas/adaptive-card.json",
                version: ADAPTIVE_CARD_VERSION,
                body,
                actions,
                msteams: MsTeams { width: "Full" },
            },
        }],
    };
    // Strings and structs of strings: serializing cannot fail.
    serde_json::to_string(&message).unwrap_or_default()
}

/// The Teams Workflows message: an Adaptive Card (1.5) with the headline, the facts, the
/// lists, a footer and a button to the console; within [`TEAMS_MAX_BYTES`].
pub fn teams_message(s: &Summary) -> Message {
    fit_summary(
        s,
        teams_card,
        |b| b.len() <= TEAMS_MAX_BYTES,
        &format!("Teams's limit of {TEAMS_MAX_BYTES}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Slack: an incoming webhook's `text` and Block Kit `blocks`.

#[derive(Debug, Serialize)]
struct SlackMessage {
    /// The notification's text (and what clients without blocks show).
    text: String,
    blocks: Vec<SlackBlock>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum SlackBlock {
    Header {
        text: SlackText,
    },
    Section {
        #[serde(skip_serializing_if = "Option::is_none")]
        text: Option<SlackText>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        fields: Vec<SlackText>,
    },
    Context {
        elements: Vec<SlackText>,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type")]
enum SlackText {
    #[serde(rename = "mrkdwn")]
    Mrkdwn { text: String },
    #[serde(rename = "plain_text")]
    Plain { text: String, emoji: bool },
}

/// Slack's three control characters, as its formatting asks.
pub fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `raw` shortened until `render` of it is at most `max` characters.
fn within(raw: &str, max: usize, render: impl Fn(&str) -> String) -> String {
    let whole = render(raw);
    if whole.chars().count() <= max {
        return whole;
    }
    let (mut lo, mut hi) = (0usize, raw.chars().count());
    let mut best = render(&shorten(raw, 0));
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let candidate = render(&shorten(raw, mid));
        if candidate.chars().count() <= max {
            best = candidate;
            lo = mid + 1;
        } else if mid == 0 {
            break;
        } else {
            hi = mid - 1;
        }
    }
    best
}

fn slack_payload(s: &Summary) -> (String, bool) {
    let emoji = match s.tone {
        Tone::Good => ":white_check_mark:",
        Tone::Attention => ":x:",
        Tone::Warning => ":warning:",
        Tone::Neutral => ":information_source:",
    };
    let headline = s.headline();
    let shortened = std::cell::Cell::new(false);
    let fit = |raw: &str, max: usize, render: &dyn Fn(&str) -> String| {
        let out = within(raw, max, render);
        if out != render(raw) {
            shortened.set(true);
        }
        out
    };
    let header = fit(&headline, SLACK_MAX_HEADER_CHARS, &|t| t.to_owned());
    let mut blocks = vec![SlackBlock::Header {
        text: SlackText::Plain {
            text: header,
            emoji: true,
        },
    }];
    for chunk in s.facts.chunks(SLACK_MAX_FIELDS) {
        let fields = chunk
            .iter()
            .map(|f| {
                let title = slack_escape(&f.title);
                SlackText::Mrkdwn {
                    text: fit(&f.value, SLACK_MAX_FIELD_CHARS, &|v| {
                        format!("*{title}*\n{}", slack_escape(v))
                    }),
                }
            })
            .collect();
        blocks.push(SlackBlock::Section { text: None, fields });
    }
    for (heading, items) in &s.lists {
        let heading = slack_escape(heading);
        let render = |max: usize| {
            let lines: Vec<String> = items
                .iter()
                .map(|i| format!("• {}", slack_escape(&shorten(i, max))))
                .collect();
            format!("*{heading}*\n{}", lines.join("\n"))
        };
        let longest = items.iter().map(|i| i.chars().count()).max().unwrap_or(0);
        let mut text = render(longest);
        if text.chars().count() > SLACK_MAX_SECTION_CHARS {
            shortened.set(true);
            let (mut lo, mut hi) = (0usize, longest);
            text = render(0);
            while lo <= hi {
                let mid = lo + (hi - lo) / 2;
                let candidate = render(mid);
                if candidate.chars().count() <= SLACK_MAX_SECTION_CHARS {
                    text = candidate;
                    lo = mid + 1;
                } else if mid == 0 {
                    break;
                } else {
                    hi = mid - 1;
                }
            }
        }
        blocks.push(SlackBlock::Section {
            text: Some(SlackText::Mrkdwn { text }),
            fields: Vec::new(),
        });
    }
    if let Some(url) = &s.link {
        // `<url|label>`: a `|` or `>` in the URL would end it early.
        let url = url.replace('|', "%7C").replace('>', "%3E");
        blocks.push(SlackBlock::Section {
            text: Some(SlackText::Mrkdwn {
                text: format!("<{url}|Open in the console>"),
            }),
            fields: Vec::new(),
        });
    }
    let footer = fit(&s.footer, SLACK_MAX_SECTION_CHARS, &slack_escape);
    blocks.push(SlackBlock::Context {
        elements: vec![SlackText::Mrkdwn { text: footer }],
    });
    blocks.truncate(SLACK_MAX_BLOCKS);
    let text = fit(&headline, SLACK_MAX_SECTION_CHARS, &|t| {
        format!("{emoji} {}", slack_escape(t))
    });
    let message = SlackMessage { text, blocks };
    (
        serde_json::to_string(&message).unwrap_or_default(),
        shortened.get(),
    )
}

/// The Slack incoming-webhook payload: `text` (the notification's) and `blocks` (a header, the
/// facts as fields, the lists, the console link, a context footer), each text within Block
/// Kit's limits.
pub fn slack_message(s: &Summary) -> Message {
    let (body, shortened) = slack_payload(s);
    Message {
        body,
        trimmed: shortened.then(|| {
            "sent shortened: a text was over Slack's block limits; texts end in …".to_owned()
        }),
    }
}
