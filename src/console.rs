//! The registry console, served by `cvchain serve` as the `History` function (under the host's
//! `api` prefix): `/api/history` lists the projects, `/api/history/{projectId}` is a project's
//! page, and, unless `CVCHAIN_CONSOLE_ACTIONS=off`, `POST …/{projectId}/promote` and
//! `…/rollback` move its channels through the same code as `cvchain promote` and `rollback`
//! ([`crate::moves`]). The views and the page are the core's (`cvchain_core::console`); this
//! module reads what they need, signs the download links and checks each form's anti-forgery
//! token.
//!
//! Every answer is locked down: a Content-Security-Policy that allows no script, `nosniff`,
//! `no-store` (the page holds short-lived download links) and `no-referrer` (a link followed
//! from the page never carries the page's URL, with its function key, to the blob service).

use crate::process::Processor;
use crate::settings::{CONSOLE_ACTIONS_SETTING, CONSOLE_SECRET_SETTING, Settings};
use axum::{
    Json,
    body::Bytes,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use cvchain_azure::events::outbox::Outbox;
use cvchain_azure::history::store::HistoryStore;
use cvchain_azure::storage::table::Continuation;
use cvchain_azure::storage::{clients::StorageClients, links::Links, settings::StorageAuth};
use cvchain_core::channels::Channel;
use cvchain_core::console::{
    ProjectView,
    page::{self, Forms, Nav, Notice},
    projects,
};
use cvchain_core::forms::{FormKey, SESSION_COOKIE, session_from_cookies, session_value};
use cvchain_core::gate::Gate;
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// Where the host forwards the History function's requests.
pub const BASE: &str = "/api/history";
/// Trained iterations per page, unless `?limit=` says otherwise (up to [`PAGE_MAX`]).
const PAGE: u32 = 50;
const PAGE_MAX: u32 = 200;
/// Events a project's page shows (the newest).
const RECENT_EVENTS: usize = 50;
/// Rows the list reads at most, of each kind (Training rows, channel moves).
const LIST_ROWS: usize = 5_000;

/// What the console needs besides the processor.
pub struct Console {
    actions: bool,
    key: FormKey,
    links: Links,
    container: String,
    gate: Gate,
    outbox: Outbox,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("actions", &self.actions)
            .finish()
    }
}

impl Console {
    /// The form key: `CVCHAIN_CONSOLE_SECRET`; else derived from the account key (every instance
    /// has the same); else this instance's own, which only suits one instance (said at start).
    pub fn new(settings: &Settings, clients: &StorageClients, history: &HistoryStore) -> Self {
        let key = match (&settings.console.secret, &settings.storage.auth) {
            (Some(s), _) => FormKey::derive(s.as_bytes()),
            (None, StorageAuth::SharedKey { key, .. }) => FormKey::derive(key.secret().as_bytes()),
            (None, _) => {
                if settings.console.actions {
                    tracing::info!(
                        "the console's forms are signed with a key of this instance: set {CONSOLE_SECRET_SETTING} when several instances serve the console"
                    );
                }
                let mut random = Uuid::new_v4().as_bytes().to_vec();
                random.extend(Uuid::new_v4().as_bytes());
                FormKey::new(&random)
            }
        };
        Self {
            actions: settings.console.actions,
            key,
            links: Links::new(clients),
            container: settings.release.container.clone(),
            gate: settings.lifecycle.gate.clone(),
            outbox: Outbox::new(history.clone()),
        }
    }
}

/// Adds the headers every console answer carries.
fn locked(mut rsp: Response) -> Response {
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&page::content_security_policy()).expect("an ASCII policy"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    rsp
}

fn error(status: StatusCode, why: &str) -> Response {
    locked((status, Json(serde_json::json!({ "error": why }))).into_response())
}

/// The request's query, parsed.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Self {
        Self(
            url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    /// What links keep: the function key the host checks (`code`).
    fn nav(&self) -> Nav {
        let mut keep = url::form_urlencoded::Serializer::new(String::new());
        if let Some(code) = self.get("code") {
            keep.append_pair("code", code);
        }
        Nav {
            base: BASE.into(),
            keep: keep.finish(),
        }
    }

    /// JSON for API clients, HTML for browsers or `?format=html`.
    fn wants_html(&self, headers: &HeaderMap) -> bool {
        let format = self.get("format").unwrap_or_default();
        format == "html"
            || (format != "json"
                && headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.contains("text/html")))
    }
}

/// `GET /api/history`: every project, by name.
pub async fn list(
    processor: &Processor,
    _console: &Console,
    headers: &HeaderMap,
    raw_query: Option<&str>,
) -> Response {
    let q = Query::parse(raw_query);
    let history = processor.history();
    let read = async {
        let trainings = history
            .query(Some("EventType eq 'Training'"), LIST_ROWS)
            .await?;
        let moves = history
            .query(Some("EventType eq 'ChannelMove'"), LIST_ROWS)
            .await?;
        Ok::<_, cvchain_azure::storage::StorageError>((trainings, moves))
    };
    let (trainings, moves) = match read.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "console: cannot read the history table");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the history table cannot be read right now",
            );
        }
    };
    let list = projects(&trainings, &moves);
    if q.wants_html(headers) {
        locked(Html(page::projects_page(&list, &q.nav(), None)).into_response())
    } else {
        locked(Json(list).into_response())
    }
}

/// The session cookie the browser sent, or a new one to set.
fn session(headers: &HeaderMap) -> (String, Option<String>) {
    if let Some(s) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session_from_cookies)
    {
        return (s.to_owned(), None);
    }
    let mut random = Uuid::new_v4().as_bytes().to_vec();
    random.extend(Uuid::new_v4().as_bytes());
    let value = session_value(&random);
    // `Secure` wherever the browser is not on this machine (a browser keeps it only over https).
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let local = ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|h| host == *h || host.starts_with(&format!("{h}:")));
    let cookie = format!(
        "{SESSION_COOKIE}={value}; Path={BASE}; HttpOnly; SameSite=Strict{}",
        if local { "" } else { "; Secure" }
    );
    (value, Some(cookie))
}

fn parse_project(project: &str) -> Option<Uuid> {
    Uuid::parse_str(project).ok()
}

fn not_a_project() -> Response {
    error(StatusCode::BAD_REQUEST, "projectId must be a UUID")
}

/// Reads what a project's page shows. `Err` answers the request.
async fn view(
    processor: &Processor,
    console: &Console,
    project: Uuid,
    q: &Query,
) -> Result<(ProjectView, Option<String>), Response> {
    let pk = project.to_string();
    let limit = match q.get("limit").map(str::parse::<u32>) {
        None => PAGE,
        Some(Ok(n)) if n >= 1 => n.min(PAGE_MAX),
        Some(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "limit must be a whole number from 1",
            ));
        }
    };
    let from = q.get("npk").map(|npk| Continuation {
        next_partition_key: npk.to_owned(),
        next_row_key: q.get("nrk").map(str::to_owned),
    });
    let history = processor.history();
    let read = async {
        let (page, next) = history
            .iterations_page(Some(&pk), limit, from.as_ref())
            .await?;
        let moves = history.channel_rows(project).await?;
        let poisoned = history.failed_rows(project).await?;
        let events = console.outbox.list(Some(&pk), false, 1000).await?;
        Ok::<_, cvchain_azure::storage::StorageError>((page, next, moves, poisoned, events))
    };
    let (page, next, moves, poisoned, events) = read.await.map_err(|e| {
        tracing::error!(error = %e, project = %pk, "console: cannot read the history table");
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the history table cannot be read right now",
        )
    })?;
    let mut view = ProjectView::build(&pk, &page, &moves, &events, &poisoned, RECENT_EVENTS);
    let now = OffsetDateTime::now_utc();
    // The manifest, as the channels read it (validated; a refused one is a failure to show).
    if !view.project_name.is_empty() || !view.channels.is_empty() {
        match processor
            .lifecycle()
            .channels
            .load(project, &view.project_name, now)
            .await
        {
            Ok(loaded) if loaded.etag.is_some() => view.manifest = Some(loaded.path),
            Ok(_) => {}
            Err(e) => view.failures.insert(
                0,
                cvchain_core::console::FailureView {
                    kind: "manifest".into(),
                    at: String::new(),
                    what: "the channels manifest cannot be used".into(),
                    reason: e.to_string(),
                },
            ),
        }
    }
    // A link for each blob the page names: one blob each, read only, short-lived.
    if console.links.can_sign() {
        for path in view.blob_paths() {
            match console.links.read_url(&console.container, &path, now).await {
                Ok(Some(url)) => {
                    view.downloads.insert(path, url.to_string());
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "console: cannot sign download links");
                    break;
                }
            }
        }
        if !view.downloads.is_empty() {
            let until =
                now + time::Duration::try_from(console.links.lifetime()).unwrap_or_default();
            view.downloads_expire = Some(cvchain_core::events::rfc3339(until));
        }
    }
    let next = next.map(|c| {
        let mut extra = url::form_urlencoded::Serializer::new(String::new());
        extra.append_pair("limit", &limit.to_string());
        if let Some(f) = q.get("format") {
            extra.append_pair("format", f);
        }
        extra.append_pair("npk", &c.next_partition_key);
        if let Some(rk) = &c.next_row_key {
            extra.append_pair("nrk", rk);
        }
        q.nav().link(&format!("/{pk}"), &extra.finish())
    });
    Ok((view, next))
}

/// Renders a project's page (with a notice after an action) as the request asked.
async fn render(
    processor: &Processor,
    console: &Console,
    project: Uuid,
    headers: &HeaderMap,
    q: &Query,
    status: StatusCode,
    notice: Option<Notice>,
) -> Response {
    let (view, next) = match view(processor, console, project, q).await {
        Ok(v) => v,
        Err(rsp) => return rsp,
    };
    let mut rsp = if q.wants_html(headers) {
        let (session, set_cookie) = session(headers);
        let forms = console.actions.then(|| Forms {
            key: &console.key,
            session: &session,
            now: OffsetDateTime::now_utc().unix_timestamp(),
        });
        let html = page::project_page(
            &view,
            &console.gate,
            &q.nav(),
            forms.as_ref(),
            notice.as_ref(),
            next.as_deref(),
        );
        let mut rsp = (status, Html(html)).into_response();
        if let (true, Some(c)) = (console.actions, set_cookie)
            && let Ok(v) = HeaderValue::from_str(&c)
        {
            rsp.headers_mut().insert(header::SET_COOKIE, v);
        }
        rsp
    } else {
        let mut body = serde_json::to_value(&view).unwrap_or_default();
        if let Some(n) = &notice {
            body["result"] = serde_json::json!({ "ok": n.ok, "lines": n.lines });
        }
        (status, Json(body)).into_response()
    };
    if let Some(n) = &next
        && let Ok(v) = HeaderValue::from_str(&format!("<{n}>; rel=\"next\""))
    {
        rsp.headers_mut().insert(header::LINK, v);
    }
    locked(rsp)
}

/// `GET /api/history/{projectId}`.
pub async fn project(
    processor: &Processor,
    console: &Console,
    project: &str,
    headers: &HeaderMap,
    raw_query: Option<&str>,
) -> Response {
    let Some(project) = parse_project(project) else {
        return not_a_project();
    };
    let q = Query::parse(raw_query);
    render(
        processor,
        console,
        project,
        headers,
        &q,
        StatusCode::OK,
        None,
    )
    .await
}

/// What a form asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Promote,
    Rollback,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Promote => "promote",
            Action::Rollback => "rollback",
        }
    }
}

/// `POST /api/history/{projectId}/promote` and `…/rollback`: refused (403, nothing changes)
/// without a valid anti-forgery token or with actions off; else the move, and the page with
/// what it did.
pub async fn act(
    processor: &Arc<Processor>,
    console: &Console,
    project: &str,
    action: Action,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    body: Bytes,
) -> Response {
    let Some(project) = parse_project(project) else {
        return not_a_project();
    };
    if !console.actions {
        return error(
            StatusCode::FORBIDDEN,
            &format!("the console is read-only ({CONSOLE_ACTIONS_SETTING}=off)"),
        );
    }
    let form = Query::parse(std::str::from_utf8(&body).ok());
    let session = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session_from_cookies);
    if let Err(e) = console.key.check(
        form.get("token"),
        action.as_str(),
        &project.to_string(),
        session,
        OffsetDateTime::now_utc().unix_timestamp(),
    ) {
        tracing::warn!(project = %project, action = action.as_str(), "console: a form was refused: {e}");
        return error(StatusCode::FORBIDDEN, &format!("{e}; nothing was changed"));
    }
    let channel = match form.get("channel").and_then(Channel::parse) {
        Some(c) => c,
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "channel must be production or latest",
            );
        }
    };
    let done = match action {
        Action::Promote => {
            let Some(iteration) = form.get("iteration").and_then(|i| Uuid::parse_str(i).ok())
            else {
                return error(StatusCode::BAD_REQUEST, "iteration must be an iteration id");
            };
            let reason: String = form
                .get("reason")
                .map(|r| r.trim().chars().take(200).collect())
                .unwrap_or_default();
            let reason = Some(reason).filter(|r| !r.is_empty());
            crate::moves::promote(processor, project, iteration, channel, reason.as_deref()).await
        }
        Action::Rollback => crate::moves::rollback(processor, project, channel).await,
    };
    let (status, notice) = match done {
        Ok(done) => {
            if let Some(events) = processor.events() {
                events.deliver_later(project.to_string());
            }
            let mut lines = crate::moves::describe(&done);
            if crate::moves::is_noop(&done) {
                lines.push(format!(
                    "{} already holds it (or it has no release copy yet): nothing moved",
                    channel.as_str()
                ));
            }
            let ok = done.failed.is_empty();
            (StatusCode::OK, Notice { ok, lines })
        }
        Err(crate::moves::MoveError::Refused(why)) => (
            StatusCode::CONFLICT,
            Notice {
                ok: false,
                lines: vec![why],
            },
        ),
        Err(crate::moves::MoveError::Failed(e)) => {
            tracing::error!(error = %e, project = %project, "console: a move failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Notice {
                    ok: false,
                    lines: vec![format!("{e}; try again")],
                },
            )
        }
    };
    let q = Query::parse(raw_query);
    render(
        processor,
        console,
        project,
        headers,
        &q,
        status,
        Some(notice),
    )
    .await
}
