//! `cvchain events`: the outbox with each sink's delivery state; `events replay` sends events
//! again; `events test` sends one `io.cvchain.test` event to every sink and shows each answer.

use crate::events::Events;
use crate::settings::Settings;
use anyhow::Context as _;
use cvchain_azure::events::outbox::Outbox;
use cvchain_azure::history::store::HistoryStore;
use cvchain_azure::storage::clients::StorageClients;
use cvchain_core::events::{CloudEvent, EventType, OutboxRow, Sink, delivery::Answer};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Only events some sink has yet to take.
    #[arg(long)]
    pub pending: bool,
    /// Only this project's events.
    #[arg(long, value_name = "ID")]
    pub project: Option<uuid::Uuid>,
    /// One JSON object per line: the event and each sink's delivery state.
    #[arg(long)]
    pub json: bool,
    /// At most this many events.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Send events again to every configured sink (same ids), then deliver them.
    Replay(ReplayArgs),
    /// Send one io.cvchain.test event to every configured sink and show each answer.
    Test,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Only events that happened at or after TIME (RFC 3339, or a date: 2026-12-01).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<OffsetDateTime>,
    /// Only events of this type (io.cvchain.model.released, or model.released).
    #[arg(long = "type", value_name = "T", value_parser = parse_type)]
    pub kind: Option<EventType>,
    /// Only this project's events.
    #[arg(long, value_name = "ID")]
    pub project: Option<uuid::Uuid>,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &date_format)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| format!("{s:?} is not a time (2026-12-01T10:00:00Z) or a date (2026-12-01)"))
}

fn parse_type(s: &str) -> Result<EventType, String> {
    EventType::parse(s).ok_or_else(|| {
        let all: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        format!("{s:?} is not an event type ({})", all.join(", "))
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    super::runtime()?.block_on(async {
        let clients = StorageClients::new(&settings.storage)?;
        match args.action {
            None => list(&settings, &clients, &args).await,
            Some(Action::Replay(r)) => replay(&settings, &clients, r).await,
            Some(Action::Test) => test(&settings, &clients).await,
        }
    })
}

fn events(settings: &Settings, clients: &StorageClients) -> anyhow::Result<std::sync::Arc<Events>> {
    Events::from_settings(settings, clients, Default::default())?.context(
        "no event sink is configured: set CVCHAIN_EVENTS_QUEUE, CVCHAIN_EVENTGRID_ENDPOINT, CVCHAIN_WEBHOOK_URL, CVCHAIN_TEAMS_WEBHOOK_URL or CVCHAIN_SLACK_WEBHOOK_URL",
    )
}

/// One line (or JSON object) per event.
pub fn render(rows: &[OutboxRow], as_json: bool) -> String {
    let mut out = String::new();
    for r in rows {
        if as_json {
            out.push_str(&cvchain_core::console::event_json(r).to_string());
            out.push('\n');
            continue;
        }
        let subject = CloudEvent::from_json(&r.event)
            .map(|e| e.subject)
            .unwrap_or_default();
        let time = r
            .time
            .map(cvchain_core::events::rfc3339)
            .unwrap_or_default();
        let states: Vec<String> = r
            .sinks
            .iter()
            .map(|s| format!("{}={}", s.as_str(), r.state(*s).describe()))
            .collect();
        out.push_str(&format!(
            "{time}  {:<30}  {}  {subject}  {}\n",
            r.kind.trim_start_matches("io.cvchain."),
            r.id,
            states.join("  ")
        ));
    }
    out
}

async fn list(settings: &Settings, clients: &StorageClients, args: &Args) -> anyhow::Result<()> {
    let outbox = Outbox::new(HistoryStore::new(clients.table(&settings.history_table)?));
    let project = args.project.map(|p| p.to_string());
    let mut rows = outbox
        .list(project.as_deref(), args.pending, 100_000)
        .await?;
    rows.sort_by(|a, b| (a.time, &a.sequence).cmp(&(b.time, &b.sequence)));
    let skip = rows.len().saturating_sub(args.limit);
    let rows = &rows[skip..];
    print!("{}", render(rows, args.json));
    if !args.json {
        let pending = rows.iter().filter(|r| r.pending).count();
        println!("{} event(s), {pending} pending", rows.len());
    }
    Ok(())
}

async fn replay(
    settings: &Settings,
    clients: &StorageClients,
    args: ReplayArgs,
) -> anyhow::Result<()> {
    let events = events(settings, clients)?;
    let project = args.project.map(|p| p.to_string());
    let (count, report) = events
        .replay(project.as_deref(), args.since, args.kind)
        .await?;
    let sinks: Vec<String> = events
        .sinks
        .configured()
        .iter()
        .map(|s| events.sinks.describe(*s))
        .collect();
    println!(
        "replayed {count} event(s) to {}: {}",
        sinks.join(", "),
        report.describe()
    );
    Ok(())
}

async fn test(settings: &Settings, clients: &StorageClients) -> anyhow::Result<()> {
    let events = events(settings, clients)?;
    let mut failed = 0;
    for (sink, what, answer) in events.test().await {
        match answer {
            Answer::Delivered(a) => println!("✓ {what}: {a}"),
            Answer::Refused { detail, .. } => {
                failed += 1;
                println!("✗ {what}: {detail}{}", hint(sink));
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} sink(s) did not take the test event");
    }
    Ok(())
}

fn hint(sink: Sink) -> &'static str {
    match sink {
        Sink::Queue => " — check CVCHAIN_EVENTS_QUEUE and the role Storage Queue Data Contributor",
        Sink::EventGrid => {
            " — check CVCHAIN_EVENTGRID_ENDPOINT and CVCHAIN_EVENTGRID_KEY (or the identity's EventGrid Data Sender role)"
        }
        Sink::Webhook => {
            " — check CVCHAIN_WEBHOOK_URL and that the receiver uses CVCHAIN_WEBHOOK_SECRET"
        }
        Sink::Teams => {
            " — check CVCHAIN_TEAMS_WEBHOOK_URL (the URL of the Workflows flow \"Post to a channel when a webhook request is received\", with its sig)"
        }
        Sink::Slack => {
            " — check CVCHAIN_SLACK_WEBHOOK_URL (the incoming webhook's URL, and that its channel still exists)"
        }
    }
}
