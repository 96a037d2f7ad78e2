//! The history as people read it: one entry per trained iteration with its performance and its
//! exports, as a table, JSON or an HTML page with a chart; and the raw rows as a table. Pure:
//! built from history rows, used by `cvchain history`, the history page and `cvchain dev`.

use crate::history::{ChannelMoveRow, HistoryRow, Prop, StepRow, TrainingRow, table_datetime};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IterationView {
    pub project_id: String,
    pub project_name: String,
    pub iteration_id: String,
    pub iteration_name: String,
    pub status: String,
    pub trained_at: String,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub average_precision: Option<f64>,
    /// The gate's verdict: `passed` or `failed` (absent for iterations recorded before the
    /// gate existed).
    pub gate: Option<String>,
    /// Why: the rules that failed, or held.
    pub gate_reasons: String,
    /// The channels this iteration holds, as `production ONNX`.
    pub channels: Vec<String>,
    pub exports: Vec<ExportView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportView {
    pub platform: String,
    pub flavor: String,
    pub status: String,
    pub release_path: String,
    pub release_url: String,
}

/// Iterations newest first, each with its exports in chain order.
pub fn iterations(rows: &[HistoryRow]) -> Vec<IterationView> {
    let steps = StepRow::all(rows);
    let mut out: Vec<IterationView> = rows
        .iter()
        .filter_map(TrainingRow::from_row)
        .map(|t| IterationView {
            project_id: t.project_id,
            project_name: t.project_name,
            iteration_id: t.iteration_id,
            iteration_name: t.iteration_name,
            status: t.status,
            trained_at: t.trained_at.map(table_datetime).unwrap_or_default(),
            precision: t.precision,
            recall: t.recall,
            average_precision: t.average_precision,
            gate: t.gate_verdict,
            gate_reasons: t.gate_reasons,
            channels: Vec::new(),
            exports: Vec::new(),
        })
        .collect();
    let holders = ChannelMoveRow::holders(rows);
    for view in &mut out {
        view.channels = holders
            .iter()
            .filter(|h| h.iteration_id == view.iteration_id)
            .map(|h| {
                let target = if h.flavor.is_empty() {
                    h.platform.clone()
                } else {
                    format!("{}:{}", h.platform, h.flavor)
                };
                format!("{} {target}", h.channel)
            })
            .collect();
        let mut mine: Vec<&StepRow> = steps
            .iter()
            .filter(|s| s.iteration_id == view.iteration_id)
            .collect();
        mine.sort_by_key(|s| {
            let p = s.position;
            (if p == 0 { i64::MAX } else { p }, s.row_key.clone())
        });
        view.exports = mine
            .into_iter()
            .map(|s| ExportView {
                platform: s.target.platform.clone(),
                flavor: s.target.flavor.clone().unwrap_or_default(),
                status: s.state.map(|st| st.as_str().to_owned()).unwrap_or_default(),
                release_path: s.release_path.clone().unwrap_or_default(),
                release_url: s.release_url.clone().unwrap_or_default(),
            })
            .collect();
    }
    out.sort_by(|a, b| b.trained_at.cmp(&a.trained_at));
    out
}

/// Rows newest first (by `ReceivedAt`).
pub fn newest_first(rows: &mut [HistoryRow]) {
    rows.sort_by_key(|r| std::cmp::Reverse(r.properties.time(Prop::ReceivedAt)));
}

/// A fixed-width table of the columns people look for first.
pub fn render_rows(rows: &[HistoryRow]) -> String {
    let columns = [
        "ReceivedAt",
        "EventType",
        "Status",
        "PartitionKey",
        "IterationId",
        "RowKey",
    ];
    let cell = |r: &HistoryRow, c: &str| -> String {
        match c {
            "PartitionKey" => r.partition_key.clone(),
            "RowKey" => r.row_key.clone(),
            name => Prop::from_name(name)
                .and_then(|p| r.properties.get(p))
                .map(|v| v.display())
                .unwrap_or_default(),
        }
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(r, c)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(columns.to_vec());
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out.push_str(&format!("({} rows)\n", rows.len()));
    out
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// A readable table: an iteration per line, then one line per export.
pub fn render(views: &[IterationView]) -> String {
    if views.is_empty() {
        return "no trained iterations recorded yet\n".into();
    }
    let mut out = format!(
        "{:<20} {:<16} {:<20} {:>9} {:>7} {:>7}\n",
        "project", "iteration", "trained at", "precision", "recall", "mAP"
    );
    for v in views {
        let project = if v.project_name.is_empty() {
            &v.project_id
        } else {
            &v.project_name
        };
        let iteration = if v.iteration_name.is_empty() {
            &v.iteration_id
        } else {
            &v.iteration_name
        };
        let trained: String = v.trained_at.chars().take(19).collect();
        out.push_str(&format!(
            "{:<20} {:<16} {:<20} {:>9} {:>7} {:>7}\n",
            cut(project, 20),
            cut(iteration, 16),
            trained.replace('T', " "),
            pct(v.precision),
            pct(v.recall),
            pct(v.average_precision)
        ));
        if v.status != "TrainingCompleted" {
            out.push_str(&format!("    {}\n", v.status));
        }
        for e in &v.exports {
            let target = if e.flavor.is_empty() {
                e.platform.clone()
            } else {
                format!("{}:{}", e.platform, e.flavor)
            };
            let release = if e.release_path.is_empty() {
                String::new()
            } else {
                format!("  → {}", e.release_path)
            };
            out.push_str(&format!("    {:<28} {:<10}{release}\n", target, e.status));
        }
        if let Some(verdict) = &v.gate {
            out.push_str(&format!("    gate {verdict}: {}\n", v.gate_reasons));
        }
        if !v.channels.is_empty() {
            out.push_str(&format!("    holds {}\n", v.channels.join(", ")));
        }
    }
    out
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Value;
    use time::macros::datetime;

    fn row(row_key: &str, props: Vec<(Prop, Value)>) -> HistoryRow {
        HistoryRow {
            partition_key: "p".into(),
            row_key: row_key.into(),
            properties: props.into_iter().collect(),
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn rows() -> Vec<HistoryRow> {
        use Prop::*;
        vec![
            row(
                "t1",
                vec![
                    (EventType, text("Training")),
                    (ProjectId, text("p")),
                    (ProjectName, text("Widgets")),
                    (IterationId, text("i1")),
                    (IterationName, text("Iteration 1")),
                    (Status, text("TrainingCompleted")),
                    (TrainedAt, Value::Time(datetime!(2026-11-20 10:00 UTC))),
                    (Precision, Value::Double(0.9)),
                    (Recall, Value::Double(0.8)),
                    (AveragePrecision, Value::Double(0.85)),
                ],
            ),
            row(
                "t2",
                vec![
                    (EventType, text("Training")),
                    (ProjectId, text("p")),
                    (ProjectName, text("Widgets")),
                    (IterationId, text("i2")),
                    (IterationName, text("Iteration 2")),
                    (Status, text("TrainingCompleted")),
                    (TrainedAt, Value::Time(datetime!(2026-11-26 10:00 UTC))),
                    (Precision, Value::Double(0.95)),
                    (Recall, Value::Double(0.9)),
                    (AveragePrecision, Value::Double(0.93)),
                ],
            ),
            row(
                "b",
                vec![
                    (EventType, text("ExportStep")),
                    (IterationId, text("i2")),
                    (Platform, text("TensorFlow")),
                    (Flavor, text("TensorFlowLite")),
                    (ChainPosition, Value::Int(2)),
                    (Status, text("Exporting")),
                ],
            ),
            row(
                "a",
                vec![
                    (EventType, text("ExportStep")),
                    (IterationId, text("i2")),
                    (Platform, text("ONNX")),
                    (Flavor, text("")),
                    (ChainPosition, Value::Int(1)),
                    (Status, text("Done")),
                    (ReleasePath, text("Widgets/Iteration-2/ONNX.zip")),
                ],
            ),
            row(
                "e",
                vec![(EventType, text("Export")), (IterationId, text("i2"))],
            ),
            row(
                "m1",
                vec![
                    (EventType, text("ChannelMove")),
                    (Channel, text("production")),
                    (Platform, text("ONNX")),
                    (Flavor, text("")),
                    (IterationId, text("i1")),
                    (Revision, Value::Int64(1)),
                ],
            ),
            row(
                "m2",
                vec![
                    (EventType, text("ChannelMove")),
                    (Channel, text("production")),
                    (Platform, text("ONNX")),
                    (Flavor, text("")),
                    (IterationId, text("i2")),
                    (Revision, Value::Int64(2)),
                ],
            ),
        ]
    }

    #[test]
    fn iterations_come_newest_first_with_exports_in_chain_order() {
        let v = iterations(&rows());
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].iteration_name, "Iteration 2");
        assert_eq!(v[0].exports.len(), 2);
        assert_eq!(v[0].exports[0].platform, "ONNX");
        assert_eq!(v[0].exports[1].flavor, "TensorFlowLite");
        assert!(v[1].exports.is_empty());
        assert_eq!(v[0].trained_at, "2026-11-26T10:00:00.0000000Z");
        // The newest move of a channel says who holds it.
        assert_eq!(v[0].channels, vec!["production ONNX"]);
        assert!(v[1].channels.is_empty());
    }

    #[test]
    fn the_row_table_aligns_columns() {
        let r = row(
            "Training_x",
            vec![
                (Prop::EventType, text("Training")),
                (Prop::Status, text("TrainingCompleted")),
                (
                    Prop::ReceivedAt,
                    Value::Time(datetime!(2026-11-26 10:00 UTC)),
                ),
                (Prop::IterationId, text("i")),
            ],
        );
        let t = render_rows(&[r]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ReceivedAt                    EventType  Status"));
        assert!(lines[1].contains("TrainingCompleted  p"));
        assert_eq!(lines[2], "(1 rows)");
    }

    #[test]
    fn the_table_reads_well() {
        let t = render(&iterations(&rows()));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("project"), "{t}");
        assert!(
            lines[1].contains("Iteration 2")
                && lines[1].contains("95.0%")
                && lines[1].contains("93.0%"),
            "{t}"
        );
        assert!(
            lines[2].contains("ONNX") && lines[2].contains("→ Widgets/Iteration-2/ONNX.zip"),
            "{t}"
        );
        assert!(
            lines[3].contains("TensorFlow:TensorFlowLite") && lines[3].contains("Exporting"),
            "{t}"
        );
        assert_eq!(render(&[]), "no trained iterations recorded yet\n");
    }
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The series the chart draws, with their colours.
pub const SERIES: &[(&str, &str)] = &[
    ("precision", "#1f77b4"),
    ("recall", "#d62728"),
    ("mAP", "#2ca02c"),
];

/// An inline SVG line chart of precision, recall and mAP across iterations, oldest first.
pub fn chart_svg(views: &[IterationView]) -> String {
    let mut points: Vec<&IterationView> = views.iter().collect();
    points.sort_by(|a, b| a.trained_at.cmp(&b.trained_at));
    let (w, h, left, right, top, bottom) = (640.0, 280.0, 48.0, 16.0, 16.0, 40.0);
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
    let y = |v: f64| top + plot_h * (1.0 - v.clamp(0.0, 1.0));
    let mut svg = format!(
        r#"<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="precision, recall and mAP by iteration">"#
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        svg.push_str(&format!(
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{:.0}%</text>"##,
            w - right,
            left - 6.0,
            y(tick) + 4.0,
            tick * 100.0,
            y = y(tick)
        ));
    }
    for (i, v) in points.iter().enumerate() {
        let label = if v.iteration_name.is_empty() {
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
        let value = |v: &IterationView| match *name {
            "precision" => v.precision,
            "recall" => v.recall,
            _ => v.average_precision,
        };
        let pts: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .filter_map(|(i, v)| value(v).map(|val| (x(i), y(val))))
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

/// The page's only style, inline; the Content-Security-Policy allows exactly this text.
const STYLE: &str = "body{font-family:sans-serif;margin:2em;background:#fff;color:#222}table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}ul{margin:0;padding-left:1em}.gate-passed{color:#2ca02c}.gate-failed{color:#d62728}";

/// The history page's Content-Security-Policy: nothing may load or run but its own inline
/// style (by hash); the chart is inline SVG and needs nothing else.
pub fn content_security_policy() -> String {
    use base64::Engine as _;
    use sha2::{Digest, Sha256};
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// The history page: the chart, then each iteration with its exports, and a link to the next
/// page when there is one.
pub fn html_page(title: &str, views: &[IterationView], next: Option<&str>) -> String {
    let mut rows = String::new();
    for v in views {
        let exports: Vec<String> = v
            .exports
            .iter()
            .map(|e| {
                let target = if e.flavor.is_empty() {
                    e.platform.clone()
                } else {
                    format!("{}:{}", e.platform, e.flavor)
                };
                // Only web links: a row's URL is text anyone with table access could write.
                let linkable = ["https://", "http://"]
                    .iter()
                    .any(|p| e.release_url.to_ascii_lowercase().starts_with(p));
                let release = if e.release_url.is_empty() {
                    String::new()
                } else if !linkable {
                    format!(" → {}", esc(&e.release_path))
                } else {
                    format!(
                        r#" → <a href="{}">{}</a>"#,
                        esc(&e.release_url),
                        esc(&e.release_path)
                    )
                };
                format!(
                    "<li>{} <b>{}</b>{release}</li>",
                    esc(&target),
                    esc(&e.status)
                )
            })
            .collect();
        let gate = match &v.gate {
            Some(verdict) => format!(
                r#"<span class="gate-{}">{}</span><br><small>{}</small>"#,
                esc(verdict),
                esc(verdict),
                esc(&v.gate_reasons)
            ),
            None => "-".into(),
        };
        let channels: Vec<String> = v
            .channels
            .iter()
            .map(|c| format!("<li>{}</li>", esc(c)))
            .collect();
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{gate}</td><td><ul>{}</ul></td><td><ul>{}</ul></td></tr>",
            esc(if v.project_name.is_empty() { &v.project_id } else { &v.project_name }),
            esc(if v.iteration_name.is_empty() { &v.iteration_id } else { &v.iteration_name }),
            esc(&v.trained_at.chars().take(19).collect::<String>().replace('T', " ")),
            pct(v.precision),
            pct(v.recall),
            pct(v.average_precision),
            channels.join(""),
            exports.join("")
        ));
    }
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>{STYLE}</style>
</head><body><h1>{t}</h1>{chart}<h2>Iterations</h2><table><tr><th>project</th><th>iteration</th><th>trained at</th><th>precision</th><th>recall</th><th>mAP</th><th>gate</th><th>channels</th><th>exports</th></tr>{rows}</table>{more}</body></html>"#,
        t = esc(title),
        chart = chart_svg(views),
        more = next
            .map(|n| format!(r#"<p><a rel="next" href="{}">next page</a></p>"#, esc(n)))
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod page_tests {
    use super::*;

    fn view(name: &str, at: &str, p: f64) -> IterationView {
        IterationView {
            project_id: "p".into(),
            project_name: "W<i>dgets".into(),
            iteration_id: "i".into(),
            iteration_name: name.into(),
            status: "TrainingCompleted".into(),
            trained_at: at.into(),
            precision: Some(p),
            recall: Some(p - 0.1),
            average_precision: None,
            gate: Some("failed".into()),
            gate_reasons: "recall <b>low</b>".into(),
            channels: vec!["latest ONNX".into()],
            exports: vec![],
        }
    }

    #[test]
    fn the_chart_draws_each_series_oldest_first_and_escapes_names() {
        let views = vec![
            view("Iteration 2", "2026-11-26", 0.9),
            view("Iteration 1", "2026-11-20", 0.5),
        ];
        let svg = chart_svg(&views);
        assert!(svg.contains(r#"data-series="precision""#));
        assert!(svg.contains(r#"data-series="recall""#));
        // mAP has no values: no line for it.
        assert!(!svg.contains(r#"data-series="mAP""#));
        // Iteration 1 (0.5) is drawn left of Iteration 2 (0.9): y 128.0 then 38.4.
        assert!(svg.contains(r#"points="48.0,128.0 624.0,38.4""#), "{svg}");
        let page = html_page("History", &views, Some("/api/history?x=1&y=2"));
        assert!(page.contains(r#"<a rel="next" href="/api/history?x=1&amp;y=2">"#));
        assert!(page.contains(&format!("<style>{STYLE}</style>")));
        assert!(content_security_policy().starts_with("default-src 'none'; style-src 'sha256-"));
        assert!(page.contains("W&lt;i&gt;dgets") && !page.contains("W<i>dgets"));
        assert!(page.contains(r#"<span class="gate-failed">failed</span><br><small>recall &lt;b&gt;low&lt;/b&gt;</small>"#));
        assert!(page.contains("<li>latest ONNX</li>"));
    }
}
