//! The history as people read it: one entry per trained iteration with its performance and its
//! exports, as a table or JSON; and the raw rows as a table. Pure: built from history rows, used
//! by `cvchain history`, the console (`crate::console`) and `cvchain dev`.

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
