//! The history as people read it: one entry per trained iteration with its performance and its
//! exports. Pure: built from history rows, used by `cvchain history` (and a history page later).

use crate::storage::table::StoredEntity;
use serde::Serialize;
use serde_json::Value;

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

fn text(e: &serde_json::Map<String, Value>, k: &str) -> String {
    match e.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

/// Iterations newest first, each with its exports in chain order.
pub fn iterations(rows: &[StoredEntity]) -> Vec<IterationView> {
    let mut out: Vec<IterationView> = rows
        .iter()
        .map(|r| &r.entity)
        .filter(|e| text(e, "EventType") == "Training")
        .map(|e| IterationView {
            project_id: text(e, "ProjectId"),
            project_name: text(e, "ProjectName"),
            iteration_id: text(e, "IterationId"),
            iteration_name: text(e, "IterationName"),
            status: text(e, "Status"),
            trained_at: {
                let t = text(e, "TrainedAt");
                if t.is_empty() {
                    text(e, "ReceivedAt")
                } else {
                    t
                }
            },
            precision: e.get("Precision").and_then(Value::as_f64),
            recall: e.get("Recall").and_then(Value::as_f64),
            average_precision: e.get("AveragePrecision").and_then(Value::as_f64),
            exports: Vec::new(),
        })
        .collect();
    for view in &mut out {
        let mut steps: Vec<&serde_json::Map<String, Value>> = rows
            .iter()
            .map(|r| &r.entity)
            .filter(|e| {
                text(e, "EventType") == "ExportStep" && text(e, "IterationId") == view.iteration_id
            })
            .collect();
        steps.sort_by_key(|e| {
            let p = e.get("ChainPosition").and_then(Value::as_i64).unwrap_or(0);
            (if p == 0 { i64::MAX } else { p }, text(e, "RowKey"))
        });
        view.exports = steps
            .into_iter()
            .map(|e| ExportView {
                platform: text(e, "Platform"),
                flavor: text(e, "Flavor"),
                status: text(e, "Status"),
                release_path: text(e, "ReleasePath"),
                release_url: text(e, "ReleaseUrl"),
            })
            .collect();
    }
    out.sort_by(|a, b| b.trained_at.cmp(&a.trained_at));
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
    use serde_json::json;

    fn row(v: Value) -> StoredEntity {
        StoredEntity {
            entity: v.as_object().unwrap().clone(),
            etag: String::new(),
        }
    }

    fn rows() -> Vec<StoredEntity> {
        vec![
            row(
                json!({"EventType": "Training", "ProjectId": "p", "ProjectName": "Widgets", "IterationId": "i1",
                "IterationName": "Iteration 1", "Status": "TrainingCompleted", "TrainedAt": "2026-11-20T10:00:00.0000000Z",
                "Precision": 0.9, "Recall": 0.8, "AveragePrecision": 0.85}),
            ),
            row(
                json!({"EventType": "Training", "ProjectId": "p", "ProjectName": "Widgets", "IterationId": "i2",
                "IterationName": "Iteration 2", "Status": "TrainingCompleted", "TrainedAt": "2026-11-26T10:00:00.0000000Z",
                "Precision": 0.95, "Recall": 0.9, "AveragePrecision": 0.93}),
            ),
            row(
                json!({"EventType": "ExportStep", "IterationId": "i2", "Platform": "TensorFlow", "Flavor": "TensorFlowLite",
                "ChainPosition": 2, "Status": "Exporting", "RowKey": "b"}),
            ),
            row(
                json!({"EventType": "ExportStep", "IterationId": "i2", "Platform": "ONNX", "Flavor": "",
                "ChainPosition": 1, "Status": "Done", "ReleasePath": "Widgets/Iteration-2/ONNX.zip", "RowKey": "a"}),
            ),
            row(json!({"EventType": "Export", "IterationId": "i2"})),
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
