//! Counts the storage requests a client made, from Azurite's `--debug` log, by kind
//! ("Table POST insert", "Blob HEAD", …), so cvchain and the direct client can be shown to make
//! the same calls.

use std::collections::BTreeMap;
use std::path::Path;

/// Kind of each request logged since byte `from`; returns them and the new end offset.
pub fn requests_since(log: &Path, from: usize) -> (Vec<String>, usize) {
    let (entries, end) = entries_since(log, from);
    (entries.into_iter().map(|(k, _)| k).collect(), end)
}

/// Kind and URL of each request logged since byte `from`, and the new end offset.
pub fn entries_since(log: &Path, from: usize) -> (Vec<(String, String)>, usize) {
    let text = std::fs::read(log).unwrap_or_default();
    let end = text.len();
    let text = String::from_utf8_lossy(&text[from.min(end)..]).into_owned();
    // An insert names its row only in its body: the requests that wrote the events' delivery
    // claim are marked by it, so they count with the delivery, not the invocation.
    let request_id = |l: &str| l.split_whitespace().nth(1).map(str::to_owned);
    let delivery_claims: std::collections::HashSet<String> = text
        .lines()
        .filter(|l| l.contains("\"RowKey\":\"DeliveryClaim"))
        .filter_map(request_id)
        .collect();
    let entries = text
        .lines()
        .filter_map(|l| {
            let service = ["Blob", "Queue", "Table"]
                .into_iter()
                .find(|s| l.contains(&format!("{s}StorageContextMiddleware: RequestMethod=")))?;
            let method = l
                .split("RequestMethod=")
                .nth(1)?
                .split_whitespace()
                .next()?;
            let url = l.split("RequestURL=").nth(1)?.split_whitespace().next()?;
            let mut named = url.to_owned();
            if request_id(l).is_some_and(|id| delivery_claims.contains(&id)) {
                named.push_str("#DeliveryClaim");
            }
            Some((kind(service, method, url), named))
        })
        .collect();
    (entries, end)
}

/// As `entries_since`, without the requests whose `User-Agent` begins with one of `others`
/// (the stand-in's, the benchmark's own).
pub fn entries_but(log: &Path, from: usize, others: &[&str]) -> (Vec<(String, String)>, usize) {
    let text = std::fs::read(log).unwrap_or_default();
    let end = text.len();
    let text = String::from_utf8_lossy(&text[from.min(end)..]).into_owned();
    let markers: Vec<String> = others
        .iter()
        .map(|o| format!("\"user-agent\":\"{o} "))
        .collect();
    let mine: String = text
        .lines()
        .filter(|l| !markers.iter().any(|m| l.contains(m)))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = std::env::temp_dir().join(format!("cvchain-calls-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let part = dir.join("part.log");
    std::fs::write(&part, &mine).unwrap();
    if let Ok(dir) = std::env::var("CVCHAIN_BENCH_KINDS_DUMP") {
        let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        std::fs::write(format!("{dir}/{n:02}.log"), &mine).unwrap();
    }
    let (entries, _) = entries_since(&part, 0);
    (entries, end)
}

/// A request's kind: service, method and what it addressed, without names or keys.
pub fn kind(service: &str, method: &str, url: &str) -> String {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let what = match service {
        "Table" => {
            if path.ends_with("Tables") {
                "table"
            } else if path.ends_with("()") || query.contains("filter") {
                "query"
            } else if path.ends_with(')') {
                "entity"
            } else {
                "insert"
            }
        }
        "Blob" => {
            if query.contains("comp=tags") {
                "tags"
            } else if query.contains("restype=container") {
                "container"
            } else {
                "blob"
            }
        }
        _ => {
            if path.ends_with("/messages") || path.contains("/messages/") {
                "messages"
            } else {
                "queue"
            }
        }
    };
    format!("{service} {method} {what}")
}

/// How many of each kind.
pub fn tally(kinds: &[String]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for k in kinds {
        *m.entry(k.clone()).or_insert(0) += 1;
    }
    m
}
