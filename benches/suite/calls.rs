//! Counts the storage requests a client made, from Azurite's `--debug` log, by kind
//! ("Table POST insert", "Blob HEAD", …), so cvchain and the direct client can be shown to make
//! the same calls.

use crate::workload::{Env, Kind, Message};
use std::collections::{BTreeMap, HashMap};
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

/// One client's storage requests and Custom Vision calls, read after each message it handled
/// (the messages go one at a time), kept in all and by message kind.
pub struct PerMessage {
    who: &'static str,
    debug: bool,
    from: usize,
    cv: HashMap<String, u64>,
    /// Every request, the stand-in's included (the totals the table reports).
    pub all: Vec<String>,
    /// The client's own requests (the stand-in's left out), by message kind.
    by_kind: BTreeMap<Kind, Vec<String>>,
    /// Custom Vision calls by message kind and operation.
    cv_by_kind: BTreeMap<Kind, BTreeMap<String, u64>>,
    messages: BTreeMap<Kind, u64>,
}

impl PerMessage {
    /// Counts from here on, once what came before is in the log.
    pub async fn start(env: &Env, who: &'static str, debug: bool) -> Self {
        settle(log(env)).await;
        let (_, from) = requests_since(log(env), 0);
        Self {
            who,
            debug,
            from,
            cv: env.standin.calls().counts,
            all: Vec::new(),
            by_kind: BTreeMap::new(),
            cv_by_kind: BTreeMap::new(),
            messages: BTreeMap::new(),
        }
    }

    /// Takes what `m` made since the message before, once Azurite's log has caught up (it
    /// writes a request's line a moment after answering it).
    pub async fn after(&mut self, env: &Env, m: &Message) {
        settle(log(env)).await;
        let (requests, own) = self.read(env);
        let cv = self.cv_since(env);
        if self.debug {
            println!("{} {:?} {}:", self.who, m.kind, m.project);
            for (kind, url, standin) in &requests {
                let by = if *standin { "  (stand-in)" } else { "" };
                println!("    {kind:<22} {}{by}", short(url));
            }
            println!("    Custom Vision: {cv:?}");
        }
        self.by_kind.entry(m.kind).or_default().extend(own);
        let calls = self.cv_by_kind.entry(m.kind).or_default();
        for (op, n) in cv {
            *calls.entry(op).or_insert(0) += n;
        }
        *self.messages.entry(m.kind).or_insert(0) += 1;
    }

    /// Takes what landed after the last message (the stand-in's last writes).
    pub fn finish(&mut self, env: &Env) {
        self.read(env);
        self.cv_since(env);
    }

    pub fn cv_total(&self) -> u64 {
        self.cv_by_kind.values().flat_map(|m| m.values()).sum()
    }

    /// Prints, per message kind, the requests and calls per message where the two differ.
    pub fn compare(&self, other: &PerMessage) {
        for (kind, n) in &self.messages {
            let per = |p: &PerMessage| -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
                let n = p.messages.get(kind).copied().unwrap_or(1).max(1) as f64;
                let storage = tally(p.by_kind.get(kind).map(Vec::as_slice).unwrap_or_default())
                    .into_iter()
                    .map(|(k, c)| (k, c as f64 / n))
                    .collect();
                let cv = p
                    .cv_by_kind
                    .get(kind)
                    .map(|m| m.iter().map(|(k, c)| (k.clone(), *c as f64 / n)).collect())
                    .unwrap_or_default();
                (storage, cv)
            };
            let (a, b) = (per(self), per(other));
            if a == b {
                println!("  {kind:?} ({n} messages): the same requests and calls");
                continue;
            }
            println!("  {kind:?} ({n} messages), per message: storage / Custom Vision");
            println!("    {:<8} {:?} / {:?}", self.who, a.0, a.1);
            println!("    {:<8} {:?} / {:?}", other.who, b.0, b.1);
        }
    }

    /// The requests since the last read: kind, URL, whether the stand-in made it; and the
    /// client's own kinds.
    fn read(&mut self, env: &Env) -> (Vec<(String, String, bool)>, Vec<String>) {
        let log = log(env);
        let (everything, end) = entries_since(log, self.from);
        let (own, _) = entries_but(log, self.from, &["cvchain-standin"]);
        self.from = end;
        self.all.extend(everything.iter().map(|(k, _)| k.clone()));
        // The stand-in's are those missing from the client's own, in order.
        let mut rest = own.iter().peekable();
        let requests = everything
            .into_iter()
            .map(|(kind, url)| {
                let mine = rest.peek().is_some_and(|(k, u)| *k == kind && *u == url);
                if mine {
                    rest.next();
                }
                (kind, url, !mine)
            })
            .collect();
        (requests, own.into_iter().map(|(k, _)| k).collect())
    }

    fn cv_since(&mut self, env: &Env) -> BTreeMap<String, u64> {
        let now = env.standin.calls().counts;
        let out = now
            .iter()
            .map(|(op, n)| (op.clone(), n - self.cv.get(op).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        self.cv = now;
        out
    }
}

/// Waits until the log has stopped growing for a moment.
async fn settle(log: &Path) {
    let size = || std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let mut last = size();
    let mut still = 0;
    while still < 3 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let now = size();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
}

fn log(env: &Env) -> &Path {
    env.azurite
        .debug_log
        .as_deref()
        .expect("an Azurite with its debug log")
}

/// A request's URL without the host and account, for reading.
fn short(url: &str) -> &str {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = path.split_once('/').map_or(path, |(_, rest)| rest);
    path.split_once('/').map_or(path, |(_, rest)| rest)
}
