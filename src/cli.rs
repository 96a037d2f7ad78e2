//! Small operator commands over the library: `invoke` plays the Functions host against a running
//! handler, `history` lists recorded rows.

use crate::history::store::HistoryStore;
use crate::host::{FUNCTION_NAME, encode_queue_invocation};
use crate::storage::table::{StoredEntity, filter_eq};
use azure_core::http::{Method, Request, Url, new_http_client};
use serde_json::Value;

/// POSTs `message_text` to a handler as the host would; returns the status and the body.
pub async fn invoke(
    base_url: &str,
    message_text: &str,
    message_id: &str,
    dequeue_count: u32,
) -> anyhow::Result<(u16, String)> {
    let url = Url::parse(base_url)?.join(FUNCTION_NAME)?;
    let mut req = Request::new(url, Method::Post);
    req.insert_header("content-type", "application/json; charset=utf-8");
    req.insert_header(
        "x-azure-functions-invocationid",
        uuid::Uuid::new_v4().to_string(),
    );
    req.set_body(encode_queue_invocation(message_text, message_id, dequeue_count).into_bytes());
    let rsp = new_http_client(None).execute_request(&req).await?;
    let (status, _, body) = rsp.deconstruct();
    let body = body.collect_string().await?;
    Ok((u16::from(status), body))
}

/// Rows, newest first, optionally for one project.
pub async fn history_rows(
    store: &HistoryStore,
    project: Option<&str>,
    limit: usize,
) -> anyhow::Result<Vec<StoredEntity>> {
    let filter = project.map(|p| filter_eq("PartitionKey", p));
    let mut rows = store.query(filter.as_deref(), limit).await?;
    rows.sort_by_key(|r| std::cmp::Reverse(text(r, "ReceivedAt")));
    Ok(rows)
}

fn text(row: &StoredEntity, key: &str) -> String {
    match row.entity.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// A fixed-width table of the columns people look for first.
pub fn render_table(rows: &[StoredEntity]) -> String {
    let columns = [
        "ReceivedAt",
        "EventType",
        "Status",
        "PartitionKey",
        "IterationId",
        "RowKey",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| text(r, c)).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_columns() {
        let row = StoredEntity {
            entity: serde_json::json!({
                "PartitionKey": "p", "RowKey": "Training_x", "EventType": "Training",
                "Status": "TrainingCompleted", "ReceivedAt": "2026-11-26T10:00:00Z", "IterationId": "i"
            })
            .as_object()
            .unwrap()
            .clone(),
            etag: String::new(),
        };
        let t = render_table(&[row]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ReceivedAt            EventType  Status"));
        assert!(lines[1].contains("TrainingCompleted  p"));
        assert_eq!(lines[2], "(1 rows)");
    }
}
