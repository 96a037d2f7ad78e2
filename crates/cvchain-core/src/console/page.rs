//! The console's HTML: the project list and a project's page (channels, the chart with the
//! gate's thresholds, iterations with their exports and download links, recent events,
//! failures) and, when actions are on, plain forms to promote an iteration and roll a channel
//! back. No script at all: the forms work without JavaScript, and the Content-Security-Policy
//! allows nothing but the page's own style (by hash) and posting forms to itself. Every name
//! is escaped; links are made only from paths and URLs cvchain made.

use super::{FailureView, HolderView, ProjectSummary, ProjectView};
use crate::forms::FormKey;
use crate::gate::{Gate, Metric, Rule};
use crate::report::IterationView;

/// Escapes text for HTML (element content and quoted attributes).
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// The series the chart draws, with their colours.
pub const SERIES: &[(&str, &str)] = &[
    ("precision", "#1f77b4"),
    ("recall", "#d62728"),
    ("mAP", "#2ca02c"),
];

/// The page's only style, inline; the Content-Security-Policy allows exactly this text.
const STYLE: &str = "body{font-family:sans-serif;margin:2em;background:#fff;color:#222;max-width:80em}\
table{border-collapse:collapse;margin-bottom:1.5em}td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}\
ul{margin:0;padding-left:1em}.passed{color:#2ca02c}.failed{color:#d62728}small{color:#666}\
.notice{padding:.6em 1em;border:1px solid #999;background:#f4f4f4;margin:1em 0}.notice.bad{border-color:#d62728}\
form{display:inline;margin:0}input,select,button{font:inherit;font-size:90%}code{font-size:90%}";

/// The console's Content-Security-Policy: nothing may load or run but its own inline style (by
/// hash), forms post only to the console, and no page may frame it.
pub fn content_security_policy() -> String {
    use base64::Engine as _;
    use sha2::{Digest, Sha256};
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// Where the console lives and what every link carries along: under the Functions host the
/// function key (`code`), so a link followed from the page passes the host's check too.
#[derive(Debug, Clone, Default)]
pub struct Nav {
    /// `/api/history`.
    pub base: String,
    /// Query parameters every link and form keeps, already encoded (`code=…`), or empty.
    pub keep: String,
}

impl Nav {
    /// A console path with the kept query and `extra` (already encoded) appended.
    pub fn link(&self, path: &str, extra: &str) -> String {
        let query: Vec<&str> = [self.keep.as_str(), extra]
            .into_iter()
            .filter(|q| !q.is_empty())
            .collect();
        let url = format!("{}{path}", self.base);
        if query.is_empty() {
            url
        } else {
            format!("{url}?{}", query.join("&"))
        }
    }
}

/// What the page needs to render forms: the console's key and the browser's session, to issue
/// each form's anti-forgery token (see [`crate::forms`]).
pub struct Forms<'a> {
    pub key: &'a FormKey,
    pub session: &'a str,
    /// Unix seconds.
    pub now: i64,
}

/// A line at the head of the page: what an action did, or why it did nothing.
#[derive(Debug, Clone)]
pub struct Notice {
    pub ok: bool,
    pub lines: Vec<String>,
}

fn head(title: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width"><title>{t}</title><style>{STYLE}</style></head><body>"#,
        t = esc(title)
    )
}

fn notice_html(n: Option<&Notice>) -> String {
    let Some(n) = n else {
        return String::new();
    };
    let lines: Vec<String> = n.lines.iter().map(|l| esc(l)).collect();
    format!(
        r#"<div class="notice{}" role="status" id="notice">{}</div>"#,
        if n.ok { "" } else { " bad" },
        lines.join("<br>")
    )
}

fn name_or_id<'a>(name: &'a str, id: &'a str) -> &'a str {
    if name.is_empty() { id } else { name }
}

fn holder_cell(h: Option<&HolderView>) -> String {
    match h {
        None => "-".into(),
        Some(h) => format!(
            "{}<br><small>since {} ({})</small>",
            esc(name_or_id(&h.iteration_name, &h.iteration_id)),
            esc(&short_time(&h.since)),
            esc(&h.reason)
        ),
    }
}

/// `2026-12-01 10:00:00` from an RFC 3339 or table time.
fn short_time(t: &str) -> String {
    t.chars().take(19).collect::<String>().replace('T', " ")
}

/// The project list.
pub fn projects_page(list: &[ProjectSummary], nav: &Nav, notice: Option<&Notice>) -> String {
    let mut rows = String::new();
    for p in list {
        let newest = match &p.newest {
            None => "-".into(),
            Some(v) => format!(
                "{} <small>{}</small><br>precision {} · recall {} · mAP {}{}",
                esc(name_or_id(&v.iteration_name, &v.iteration_id)),
                esc(&short_time(&v.trained_at)),
                pct(v.precision),
                pct(v.recall),
                pct(v.average_precision),
                v.gate
                    .as_ref()
                    .map(|g| format!(r#" · gate <span class="{0}">{0}</span>"#, esc(g)))
                    .unwrap_or_default()
            ),
        };
        rows.push_str(&format!(
            r#"<tr><td><a href="{href}">{name}</a><br><small><code>{id}</code></small></td><td>{}</td><td>{newest}</td><td>{}</td><td>{}</td></tr>"#,
            p.iterations,
            holder_cell(p.production.as_ref()),
            holder_cell(p.latest.as_ref()),
            href = esc(&nav.link(&format!("/{}", p.project_id), "")),
            name = esc(name_or_id(&p.project_name, &p.project_id)),
            id = esc(&p.project_id),
        ));
    }
    let body = if list.is_empty() {
        "<p>No trained iteration is recorded yet.</p>".to_owned()
    } else {
        format!(
            "<table><tr><th>project</th><th>iterations</th><th>newest iteration</th><th>production</th><th>latest</th></tr>{rows}</table>"
        )
    };
    format!(
        "{}<h1>Models</h1>{}{body}</body></html>",
        head("cvchain — models"),
        notice_html(notice)
    )
}

/// A project's page.
pub fn project_page(
    view: &ProjectView,
    gate: &Gate,
    nav: &Nav,
    forms: Option<&Forms<'_>>,
    notice: Option<&Notice>,
    next: Option<&str>,
) -> String {
    let title = name_or_id(&view.project_name, &view.project_id);
    let link = |path: &str| -> String {
        match view.downloads.get(path) {
            Some(url) if is_web_link(url) => {
                format!(r#"<a href="{}">{}</a>"#, esc(url), esc(path))
            }
            _ => esc(path),
        }
    };
    let project_path = format!("/{}", view.project_id);
    let token =
        |action: &str| forms.map(|f| f.key.issue(action, &view.project_id, f.session, f.now));

    // Channels: per target, production and latest side by side; the pointer first.
    let mut targets: Vec<String> = view
        .channels
        .iter()
        .filter(|h| !h.pointer)
        .map(|h| h.target.clone())
        .collect();
    targets.sort();
    targets.dedup();
    let holder = |channel: &str, target: &str| {
        view.channels
            .iter()
            .find(|h| h.channel == channel && !h.pointer && h.target == target)
    };
    let cell = |h: Option<&HolderView>| match h {
        None => "<td>-</td>".to_owned(),
        Some(h) => format!(
            r#"<td data-channel="{}" data-target="{}">{}<br><small>since {} · {}{}</small><br><small>{}</small></td>"#,
            esc(&h.channel),
            esc(&h.target),
            esc(name_or_id(&h.iteration_name, &h.iteration_id)),
            esc(&short_time(&h.since)),
            esc(&h.reason),
            if h.previous_name.is_empty() && h.previous_id.is_empty() {
                String::new()
            } else {
                format!(
                    " · before: {}",
                    esc(name_or_id(&h.previous_name, &h.previous_id))
                )
            },
            link(&h.channel_path)
        ),
    };
    let mut channel_rows = String::new();
    if let Some(p) = view.channels.iter().find(|h| h.pointer) {
        channel_rows.push_str(&format!(
            r#"<tr><td>production pointer <small>(what is published)</small></td><td data-channel="production" data-target="pointer">{}<br><small>since {} · {}{}</small></td><td></td></tr>"#,
            esc(name_or_id(&p.iteration_name, &p.iteration_id)),
            esc(&short_time(&p.since)),
            esc(&p.reason),
            if p.previous_name.is_empty() && p.previous_id.is_empty() {
                String::new()
            } else {
                format!(" · before: {}", esc(name_or_id(&p.previous_name, &p.previous_id)))
            }
        ));
    }
    for t in &targets {
        channel_rows.push_str(&format!(
            "<tr><td>{}</td>{}{}</tr>",
            esc(t),
            cell(holder("production", t)),
            cell(holder("latest", t))
        ));
    }
    let rollback_forms = match token("rollback") {
        Some(tok) => ["production", "latest"]
            .iter()
            .filter(|c| view.channels.iter().any(|h| h.channel == **c))
            .map(|c| {
                format!(
                    r#"<form method="post" action="{action}"><input type="hidden" name="token" value="{tok}"><input type="hidden" name="channel" value="{c}"><button type="submit" name="rollback" value="{c}">Roll {c} back</button></form> "#,
                    action = esc(&nav.link(&format!("{project_path}/rollback"), "")),
                    tok = esc(&tok),
                )
            })
            .collect::<String>(),
        None => String::new(),
    };
    let channels = if view.channels.is_empty() {
        "<p>No channel has moved yet: a channel follows an iteration once its exports are released.</p>".to_owned()
    } else {
        format!(
            "<table id=\"channels\"><tr><th>target</th><th>production</th><th>latest</th></tr>{channel_rows}</table><p>{rollback_forms}{manifest}</p>",
            manifest = view
                .manifest
                .as_ref()
                .map(|m| format!("<small>manifest: {}</small>", link(m)))
                .unwrap_or_default()
        )
    };

    // Iterations.
    let promote_token = token("promote");
    let mut iteration_rows = String::new();
    for v in &view.iterations {
        let exports: Vec<String> = v
            .exports
            .iter()
            .map(|e| {
                let target = if e.flavor.is_empty() {
                    e.platform.clone()
                } else {
                    format!("{}:{}", e.platform, e.flavor)
                };
                let release = if e.release_path.is_empty() {
                    String::new()
                } else {
                    format!(" → {}", link(&e.release_path))
                };
                format!(
                    "<li>{} <b>{}</b>{release}</li>",
                    esc(&target),
                    esc(&e.status)
                )
            })
            .collect();
        let gate_html = match &v.gate {
            Some(verdict) => format!(
                r#"<span class="{0}" data-gate="{0}">{0}</span><br><small>{1}</small>"#,
                esc(verdict),
                esc(&v.gate_reasons)
            ),
            None => "-".into(),
        };
        let holds: Vec<String> = v
            .channels
            .iter()
            .map(|c| format!("<li>{}</li>", esc(c)))
            .collect();
        let form = match &promote_token {
            Some(tok) if v.exports.iter().any(|e| !e.release_path.is_empty()) => format!(
                r#"<form method="post" action="{action}"><input type="hidden" name="token" value="{tok}"><input type="hidden" name="iteration" value="{id}"><select name="channel" aria-label="channel"><option>production</option><option>latest</option></select> <input name="reason" maxlength="200" placeholder="reason" aria-label="reason"> <button type="submit">Promote</button></form>"#,
                action = esc(&nav.link(&format!("{project_path}/promote"), "")),
                tok = esc(tok),
                id = esc(&v.iteration_id),
            ),
            _ => String::new(),
        };
        iteration_rows.push_str(&format!(
            r#"<tr data-iteration="{id}"><td>{name}<br><small>{at}</small></td><td>{}</td><td>{}</td><td>{}</td><td>{gate_html}</td><td><ul>{}</ul></td><td><ul>{}</ul></td><td>{form}</td></tr>"#,
            pct(v.precision),
            pct(v.recall),
            pct(v.average_precision),
            exports.join(""),
            holds.join(""),
            id = esc(&v.iteration_id),
            name = esc(name_or_id(&v.iteration_name, &v.iteration_id)),
            at = esc(&short_time(&v.trained_at)),
        ));
    }
    let iterations = format!(
        "<table id=\"iterations\"><tr><th>iteration</th><th>precision</th><th>recall</th><th>mAP</th><th>gate</th><th>exports</th><th>holds</th><th></th></tr>{iteration_rows}</table>{}",
        next.map(|n| format!(
            r#"<p><a rel="next" href="{}">older iterations</a></p>"#,
            esc(n)
        ))
        .unwrap_or_default()
    );

    // Events and failures.
    let events = if view.events.is_empty() {
        "<p>No event recorded (no sink configured, or nothing happened yet).</p>".to_owned()
    } else {
        // Newest first.
        let rows: String = view.events.iter().rev().map(event_row).collect();
        format!(
            "<table id=\"events\"><tr><th>time</th><th>event</th><th>iteration</th><th>delivery</th></tr>{rows}</table>"
        )
    };
    let failures = if view.failures.is_empty() {
        "<p>Nothing failed.</p>".to_owned()
    } else {
        let rows: String = view.failures.iter().map(failure_row).collect();
        format!(
            "<table id=\"failures\"><tr><th>when</th><th>what</th><th>why</th></tr>{rows}</table>"
        )
    };
    let expiry = view
        .downloads_expire
        .as_ref()
        .map(|e| {
            format!(
                "<p><small>Download links read one blob each and work until {} (reload the page for fresh ones).</small></p>",
                esc(&short_time(e))
            )
        })
        .unwrap_or_default();
    format!(
        r#"{head}<p><a href="{home}">all models</a></p><h1>{t}</h1><p><small>project <code>{id}</code></small></p>{notice}<h2>Channels</h2>{channels}<h2>Iterations</h2>{chart}{iterations}{expiry}<h2>Recent events</h2>{events}<h2>Failures</h2>{failures}</body></html>"#,
        head = head(&format!("{title} — cvchain")),
        home = esc(&nav.link("", "")),
        t = esc(title),
        id = esc(&view.project_id),
        notice = notice_html(notice),
        chart = chart_svg(&view.iterations, gate),
    )
}

/// Only web links: a row's URL is text anyone with table access could write.
fn is_web_link(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

fn event_row(e: &serde_json::Value) -> String {
    let ev = &e["event"];
    let kind = ev["type"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("io.cvchain.");
    let detail = [
        ev["data"]["channel"].as_str(),
        ev["data"]["platform"].as_str(),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ");
    let sinks: Vec<String> = e["sinks"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(sink, st)| {
                    format!(
                        "{}: {}",
                        esc(sink),
                        esc(st["state"].as_str().unwrap_or("pending"))
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "<tr><td><small>{}</small></td><td>{}{}</td><td>{}</td><td><small>{}</small></td></tr>",
        esc(&short_time(ev["time"].as_str().unwrap_or_default())),
        esc(kind),
        if detail.is_empty() {
            String::new()
        } else {
            format!(" <small>{}</small>", esc(&detail))
        },
        esc(ev["data"]["iterationName"].as_str().unwrap_or_default()),
        sinks.join("<br>")
    )
}

fn failure_row(f: &FailureView) -> String {
    format!(
        "<tr><td><small>{}</small></td><td>{}: {}</td><td>{}</td></tr>",
        esc(&short_time(&f.at)),
        esc(&f.kind),
        esc(&f.what),
        esc(&f.reason)
    )
}

/// The range the chart shows: the values and thresholds with a margin, on a grid of 5 %, and
/// at least 20 % tall, so iterations whose metrics sit close together are told apart.
fn y_range(values: &[f64]) -> (f64, f64) {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return (0.0, 1.0);
    }
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut lo = ((min - 0.02) * 20.0).floor() / 20.0;
    let mut hi = ((max + 0.02) * 20.0).ceil() / 20.0;
    while hi - lo < 0.2 - 1e-9 {
        lo -= 0.05;
        hi += 0.05;
    }
    lo = lo.max(0.0);
    hi = hi.min(1.0);
    if hi - lo < 0.2 - 1e-9 {
        if lo <= 0.0 {
            hi = 0.2;
        } else {
            lo = 0.8;
        }
    }
    (lo, hi)
}

/// An inline SVG line chart of precision, recall and mAP across iterations, oldest first, with
/// each `metric>=x` rule of the gate drawn as a dashed line in its metric's colour.
pub fn chart_svg(views: &[IterationView], gate: &Gate) -> String {
    let mut points: Vec<&IterationView> = views.iter().collect();
    points.sort_by(|a, b| a.trained_at.cmp(&b.trained_at));
    let value = |v: &IterationView, series: &str| match series {
        "precision" => v.precision,
        "recall" => v.recall,
        _ => v.average_precision,
    };
    let thresholds: Vec<(&str, &str, f64)> = gate
        .rules
        .iter()
        .filter_map(|r| match r {
            Rule::AtLeast(m, x) => {
                let series = match m {
                    Metric::Precision => "precision",
                    Metric::Recall => "recall",
                    Metric::Map => "mAP",
                };
                let colour = SERIES.iter().find(|(n, _)| *n == series)?.1;
                Some((series, colour, *x))
            }
            Rule::Improves(_) => None,
        })
        .collect();
    let all: Vec<f64> = points
        .iter()
        .flat_map(|v| SERIES.iter().filter_map(|(s, _)| value(v, s)))
        .chain(thresholds.iter().map(|t| t.2))
        .collect();
    let (lo, hi) = y_range(&all);
    let (w, h, left, right, top, bottom) = (720.0, 300.0, 52.0, 130.0, 16.0, 44.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let n = points.len().max(1);
    let x = |i: usize| {
        if n == 1 {
            left + plot_w / 2.0
        } else {
            left + plot_w * i as f64 / (n - 1) as f64
        }
    };
    let y = |v: f64| top + plot_h * (1.0 - ((v - lo) / (hi - lo)).clamp(0.0, 1.0));
    let mut svg = format!(
        r#"<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="precision, recall and mAP by iteration, from {:.0}% to {:.0}%">"#,
        lo * 100.0,
        hi * 100.0
    );
    let steps = ((hi - lo) / 0.05).round() as usize;
    let every = if steps > 10 { 2 } else { 1 };
    for k in (0..=steps).step_by(every) {
        let tick = lo + 0.05 * k as f64;
        svg.push_str(&format!(
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{:.0}%</text>"##,
            w - right,
            left - 6.0,
            y(tick) + 4.0,
            tick * 100.0,
            y = y(tick)
        ));
    }
    for (series, colour, at) in &thresholds {
        svg.push_str(&format!(
            r#"<line data-threshold="{series}" x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" font-size="11" fill="{colour}">gate: {series} ≥ {:.0}%</text>"#,
            w - right,
            w - right + 6.0,
            y(*at) + 4.0,
            at * 100.0,
            yy = y(*at)
        ));
    }
    for (i, v) in points.iter().enumerate() {
        let label: String = if v.iteration_name.is_empty() {
            v.iteration_id.chars().take(8).collect()
        } else {
            v.iteration_name.clone()
        };
        svg.push_str(&format!(
            r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
            x(i),
            h - bottom + 18.0,
            esc(&label)
        ));
    }
    for (name, colour) in SERIES {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .filter_map(|(i, v)| value(v, name).map(|val| (x(i), y(val))))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        svg.push_str(&format!(
            r#"<polyline data-series="{name}" fill="none" stroke="{colour}" stroke-width="3" points="{}"/>"#,
            path.join(" ")
        ));
        for (a, b) in pts {
            svg.push_str(&format!(
                r#"<circle cx="{a:.1}" cy="{b:.1}" r="5" fill="{colour}"/>"#
            ));
        }
    }
    for (i, (name, colour)) in SERIES.iter().enumerate() {
        let lx = left + 10.0 + 110.0 * i as f64;
        svg.push_str(&format!(
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}" font-size="12">{name}</text>"#,
            h - 14.0,
            lx + 16.0,
            h - 3.0
        ));
    }
    svg.push_str("</svg>");
    svg
}
