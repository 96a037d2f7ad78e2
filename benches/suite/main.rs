//! The benchmark suite: cold start, per-notification cost, throughput, memory and the Custom
//! Vision call rate, each beside its baseline in the same run, written as a Markdown table.
//!
//!     scripts/bench            # builds what it needs, runs criterion and this, prints the table
//!
//! Settings: CVCHAIN_BENCH_MESSAGES (5000), CVCHAIN_BENCH_COLD_RUNS (25),
//! CVCHAIN_BENCH_SECTIONS (cold,cost,kinds,latency,calls,throughput,memory,rate,telemetry),
//! CVCHAIN_BENCH_OUT (target/bench/results.md), CVCHAIN_BENCH_KIND_ROUNDS (20),
//! CVCHAIN_BENCH_RATE_MESSAGES (480), CVCHAIN_BENCH_BEFORE_BIN, CVCHAIN_BENCH_EXE (the cvchain
//! measured; scripts/bench gives the release build, the one users run),
//! CVCHAIN_BENCH_KINDS_DEBUG (a tally per invocation), CVCHAIN_BENCH_KINDS_DUMP=<dir> (each
//! invocation's requests from Azurite's log). Needs Azurite in node_modules (`npm ci`).
use cvchain_testkit::hot_path;

mod calls;
mod coldstart;
mod direct;
mod drive;
mod kinds;
mod workload;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use workload::{Env, FAST_CV_RPS, Kind, Message};

/// Counts allocations, for the per-notification count.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The table, one row per measure.
#[derive(Default)]
struct Table {
    rows: Vec<[String; 5]>,
}

impl Table {
    fn row(
        &mut self,
        measure: &str,
        cvchain: String,
        baseline: String,
        ratio: String,
        target: &str,
    ) {
        let r = [
            measure.to_owned(),
            cvchain,
            baseline,
            ratio,
            target.to_owned(),
        ];
        println!("| {} |", r.join(" | "));
        self.rows.push(r);
    }

    fn markdown(&self) -> String {
        let mut s = String::from(
            "| Measure | cvchain | Baseline | Ratio | Target |\n|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The cvchain measured: the release build `scripts/bench` gives (its symbols, which
/// `build/startup-order.txt` names, are the release profile's, not the bench profile's), or
/// the bench build beside this suite.
fn cvchain_exe() -> PathBuf {
    std::env::var_os("CVCHAIN_BENCH_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cvchain")))
}

/// The minimal axum server, built by `cargo build --release --example baseline_server`.
fn baseline_exe() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_cvchain"))
        .parent()
        .unwrap()
        .join("examples/baseline_server");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --example baseline_server` (scripts/bench does)",
        p.display()
    );
    p
}

fn main() {
    let sections = setting(
        "CVCHAIN_BENCH_SECTIONS",
        "cold,cost,kinds,latency,calls,throughput,memory,rate,telemetry",
    );
    let on = |s: &str| sections.split(',').any(|x| x.trim() == s);
    let messages: usize = setting("CVCHAIN_BENCH_MESSAGES", "5000").parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut table = Table::default();
    println!("| Measure | cvchain | Baseline | Ratio | Target |\n|---|---|---|---|---|");
    rt.block_on(async {
        if on("cold") {
            cold_start(&mut table).await;
        }
        if on("cost") {
            cost(&mut table);
        }
        if on("kinds") {
            per_kind(&mut table).await;
        }
        if on("latency") {
            latency_model(&mut table).await;
        }
        if on("calls") {
            call_counts(&mut table).await;
        }
        if on("throughput") {
            throughput(&mut table, messages).await;
        }
        if on("memory") {
            memory(&mut table).await;
        }
        if on("rate") {
            rate(&mut table).await;
        }
        if on("telemetry") {
            telemetry(&mut table).await;
        }
    });
    let out = PathBuf::from(setting("CVCHAIN_BENCH_OUT", "target/bench/results.md"));
    let _ = std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")));
    let mut text = table.markdown();
    let _ = writeln!(
        text,
        "\nMachine: {} cores, {}; {}.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        time::OffsetDateTime::now_utc().date()
    );
    std::fs::write(&out, text).unwrap();
    println!("\nwritten to {}", out.display());
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Cold start: exec → first answer to `GET /`, beside the minimal axum server; binary sizes.
async fn cold_start(table: &mut Table) {
    let runs: usize = setting("CVCHAIN_BENCH_COLD_RUNS", "25").parse().unwrap();
    let env = Env::start(false).await;
    let settings = env.settings(FAST_CV_RPS);
    let (exe, base) = (cvchain_exe(), baseline_exe());
    let (c, b) = tokio::task::block_in_place(|| {
        coldstart::compare(runs, (&exe, &["serve"], &settings), (&base, &[], &[]))
    });
    table.row(
        &format!("Ready: exec to first `GET /` answer (median of {runs})"),
        ms(c),
        format!("{} (minimal axum)", ms(b)),
        format!("{:.2}", c.as_secs_f64() / b.as_secs_f64()),
        "≤ 15 ms",
    );
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    table.row(
        "Release binary size (stripped, thin LTO)",
        format!("{:.1} MiB", size(&exe) as f64 / 1048576.0),
        format!("{:.1} MiB (minimal axum)", size(&base) as f64 / 1048576.0),
        format!("{:.2}", size(&exe) as f64 / size(&base) as f64),
        "reported",
    );
}

/// CPU per notification (criterion's median, when `cargo bench --bench notification_cost` ran
/// first) and allocations per notification (counted here).
fn cost(table: &mut Table) {
    let (config, observed) = (hot_path::config(), hot_path::observed());
    for case in hot_path::cases() {
        let estimates = PathBuf::from(format!(
            "target/criterion/notification/{}/new/estimates.json",
            case.name
        ));
        let cpu = std::fs::read_to_string(&estimates)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["median"]["point_estimate"].as_f64())
            .map_or("run notification_cost first".to_owned(), |ns| {
                format!("{:.1} µs", ns / 1000.0)
            });
        hot_path::process(&case.body, &observed, &config);
        let (a0, b0) = (
            ALLOCS.load(Ordering::Relaxed),
            ALLOC_BYTES.load(Ordering::Relaxed),
        );
        const N: u64 = 1000;
        for _ in 0..N {
            hot_path::process(&case.body, &observed, &config);
        }
        let allocs = (ALLOCS.load(Ordering::Relaxed) - a0) / N;
        let bytes = (ALLOC_BYTES.load(Ordering::Relaxed) - b0) / N;
        table.row(
            &format!("{}: CPU besides I/O (criterion median)", case.name),
            cpu,
            "—".into(),
            "—".into(),
            "reported",
        );
        table.row(
            &format!("{}: allocations per notification", case.name),
            format!("{allocs} ({:.1} KiB)", bytes as f64 / 1024.0),
            "—".into(),
            "—".into(),
            "reported",
        );
    }
}

/// Storage requests and Custom Vision calls per notification, cvchain and the direct client,
/// from Azurite's request log and the stand-in's counts: the baseline does the same work.
/// Each client gets the same messages one at a time, so each message's requests are its own:
/// when the kinds differ, they are printed per message kind (the stand-in's own writes left
/// out there: they land whenever its exports end). `CVCHAIN_BENCH_CALLS_DEBUG=1` prints every
/// message's requests and calls, in order.
async fn call_counts(table: &mut Table) {
    const ITERATIONS: usize = 10;
    let debug = std::env::var_os("CVCHAIN_BENCH_CALLS_DEBUG").is_some();
    // cvchain, one message at a time.
    let env = Env::start(true).await;
    let messages = env.prepare(ITERATIONS).await;
    let handler = drive::start_serve(&env, FAST_CV_RPS);
    // The table and the release container are there before the first message, as the direct
    // client makes them when it starts: their one-off creation is no notification's.
    let table_client = env.clients.table(&env.table).unwrap();
    table_client.create_if_missing().await.unwrap();
    let blobs = env.clients.blob_service().unwrap();
    let _ = blobs.blob_container_client(&env.release).create(None).await;
    let mut ours = calls::PerMessage::start(&env, "cvchain", debug).await;
    for m in &messages {
        drive::drive_serve(&handler, std::slice::from_ref(m), 1).await;
        ours.after(&env, m).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ours.finish(&env);
    drop(handler);
    // The direct client, on an environment of its own.
    let env = Env::start(true).await;
    let messages = env.prepare(ITERATIONS).await;
    let direct = direct::Direct::new(&env, 1000).await;
    let mut theirs = calls::PerMessage::start(&env, "direct", debug).await;
    for m in &messages {
        direct
            .handle(&m.text)
            .await
            .unwrap_or_else(|e| panic!("direct client, {:?}: {e}", m.kind));
        theirs.after(&env, m).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    theirs.finish(&env);
    let n = messages.len() as f64;
    let (a, b) = (calls::tally(&ours.all), calls::tally(&theirs.all));
    if a != b {
        println!("request kinds differ:\n  cvchain {a:?}\n  direct  {b:?}");
    }
    ours.compare(&theirs);
    table.row(
        "Storage requests per notification (Azurite's log)",
        format!("{:.2}", ours.all.len() as f64 / n),
        format!("{:.2} (direct client)", theirs.all.len() as f64 / n),
        format!("{:.2}", ours.all.len() as f64 / theirs.all.len() as f64),
        "same calls",
    );
    table.row(
        "Custom Vision calls per notification (stand-in's count)",
        format!("{:.2}", ours.cv_total() as f64 / n),
        format!("{:.2} (direct client)", theirs.cv_total() as f64 / n),
        format!("{:.2}", ours.cv_total() as f64 / theirs.cv_total() as f64),
        "same calls",
    );
}

/// Each kind of invocation: duration, storage requests and Custom Vision calls, median of
/// `CVCHAIN_BENCH_KIND_ROUNDS` (20) projects; beside the binary in `CVCHAIN_BENCH_BEFORE_BIN`
/// (an earlier revision) when it is set, alternating round by round.
async fn per_kind(table: &mut Table) {
    let rounds: usize = setting("CVCHAIN_BENCH_KIND_ROUNDS", "20").parse().unwrap();
    let (now, then) = kind_rounds(rounds, None).await;
    let show = |s: &kinds::Sample| {
        format!(
            "{}, {} storage (+{} delivering), {} CV",
            ms(s.duration),
            s.storage,
            s.delivery,
            s.cv
        )
    };
    for (k, (name, target)) in kinds::kinds().iter().enumerate() {
        let (baseline, ratio) = match &then {
            Some(t) => (
                format!("{} (before)", show(&t[k])),
                format!(
                    "{:.2}",
                    now[k].duration.as_secs_f64() / t[k].duration.as_secs_f64()
                ),
            ),
            None => ("—".into(), "—".into()),
        };
        table.row(
            &format!("{name} (median of {rounds})"),
            show(&now[k]),
            baseline,
            ratio,
            target,
        );
    }
}

/// A collector stand-in for the benchmark: takes any OTLP/HTTP request and answers 200 with an
/// empty body (what it costs cvchain to export, not what a collector does with it).
async fn otlp_sink() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}

/// Telemetry's cost: `serve`'s start-up and each kind of invocation with telemetry off (no
/// `OTEL_*` or Application Insights setting) and on (OTLP/HTTP to a local sink: traces and
/// metrics), and, with `CVCHAIN_BENCH_BEFORE_BIN` (the build before telemetry), that build too,
/// all alternating run by run, so "off" beside "before" shows what telemetry costs when unused.
async fn telemetry(table: &mut Table) {
    let runs: usize = setting("CVCHAIN_BENCH_COLD_RUNS", "25").parse().unwrap();
    let rounds: usize = setting("CVCHAIN_BENCH_KIND_ROUNDS", "20").parse().unwrap();
    let before_bin = std::env::var("CVCHAIN_BENCH_BEFORE_BIN")
        .ok()
        .map(PathBuf::from);
    let (port, _sink) = otlp_sink().await;
    let on_vars: Vec<(&'static str, String)> = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000".into()),
    ];
    // Start-up.
    let env = Env::start(false).await;
    let off = env.settings(FAST_CV_RPS);
    let mut on = off.clone();
    on.extend(on_vars.iter().cloned());
    let exe = cvchain_exe();
    let (mut t_off, mut t_on, mut t_before) = (Vec::new(), Vec::new(), Vec::new());
    tokio::task::block_in_place(|| {
        coldstart::once(&exe, &["serve"], &off);
        coldstart::once(&exe, &["serve"], &on);
        if let Some(b) = &before_bin {
            coldstart::once(b, &["serve"], &off);
        }
        for _ in 0..runs {
            t_off.push(coldstart::once(&exe, &["serve"], &off));
            t_on.push(coldstart::once(&exe, &["serve"], &on));
            if let Some(b) = &before_bin {
                t_before.push(coldstart::once(b, &["serve"], &off));
            }
        }
    });
    let (m_off, m_on) = (coldstart::median(&mut t_off), coldstart::median(&mut t_on));
    let before = (!t_before.is_empty()).then(|| coldstart::median(&mut t_before));
    table.row(
        &format!("Ready, telemetry off (median of {runs})"),
        ms(m_off),
        before.map_or("—".into(), |b| format!("{} (before telemetry)", ms(b))),
        before.map_or("—".into(), |b| {
            format!("{:.2}", m_off.as_secs_f64() / b.as_secs_f64())
        }),
        "unchanged",
    );
    table.row(
        &format!("Ready, telemetry on: OTLP/HTTP (median of {runs})"),
        ms(m_on),
        format!("{} (off)", ms(m_off)),
        format!("{:.2}", m_on.as_secs_f64() / m_off.as_secs_f64()),
        "reported",
    );
    if let Some(b) = &before_bin {
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        table.row(
            "Release binary size, with telemetry",
            format!("{:.1} MiB", size(&exe) as f64 / 1048576.0),
            format!("{:.1} MiB (before telemetry)", size(b) as f64 / 1048576.0),
            format!("{:.2}", size(&exe) as f64 / size(b) as f64),
            "reported",
        );
    }
    drop(env);
    // Each kind of invocation.
    let r_off = kinds::Runner::start(None, None).await;
    let r_on = kinds::Runner::start_with(None, None, &on_vars).await;
    let r_before = match &before_bin {
        Some(b) => Some(kinds::Runner::start(Some(b), None).await),
        None => None,
    };
    let (mut s_off, mut s_on, mut s_before) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        s_off.push(r_off.round().await);
        s_on.push(r_on.round().await);
        if let Some(r) = &r_before {
            s_before.push(r.round().await);
        }
    }
    let (k_off, k_on) = (kinds::medians(&s_off), kinds::medians(&s_on));
    let k_before = (!s_before.is_empty()).then(|| kinds::medians(&s_before));
    for (k, (name, _)) in kinds::kinds().iter().enumerate() {
        let before = k_before.as_ref().map(|b| b[k].duration);
        table.row(
            &format!("{name}, telemetry off / on (median of {rounds})"),
            format!("{} / {}", ms(k_off[k].duration), ms(k_on[k].duration)),
            before.map_or("—".into(), |b| format!("{} (before telemetry)", ms(b))),
            format!(
                "{:.2} / {:.2}",
                before.map_or(1.0, |b| k_off[k].duration.as_secs_f64() / b.as_secs_f64()),
                k_on[k].duration.as_secs_f64() / k_off[k].duration.as_secs_f64()
            ),
            "off: unchanged",
        );
    }
}

/// `rounds` rounds of every kind, against this build and (alternating) the "before" binary.
async fn kind_rounds(
    rounds: usize,
    latency: Option<kinds::Latency>,
) -> (Vec<kinds::Sample>, Option<Vec<kinds::Sample>>) {
    let before_bin = std::env::var("CVCHAIN_BENCH_BEFORE_BIN")
        .ok()
        .map(PathBuf::from);
    let after = kinds::Runner::start(None, latency).await;
    let before = match &before_bin {
        Some(b) => Some(kinds::Runner::start(Some(b), latency).await),
        None => None,
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(after.round().await);
        if let Some(b) = &before {
            theirs.push(b.round().await);
        }
    }
    (
        kinds::medians(&ours),
        (!theirs.is_empty()).then(|| kinds::medians(&theirs)),
    )
}

/// The cloud-latency model: every storage request delayed by `CVCHAIN_BENCH_STORAGE_MS` (5) and
/// every Custom Vision call by `CVCHAIN_BENCH_CV_MS` (60) through a proxy; each kind's duration
/// and its critical path (sequential round trips), this build beside the "before" one.
async fn latency_model(table: &mut Table) {
    let rounds: usize = setting("CVCHAIN_BENCH_LATENCY_ROUNDS", "10")
        .parse()
        .unwrap();
    let storage_ms: u64 = setting("CVCHAIN_BENCH_STORAGE_MS", "5").parse().unwrap();
    let cv_ms: u64 = setting("CVCHAIN_BENCH_CV_MS", "60").parse().unwrap();
    let latency = kinds::Latency {
        storage: Duration::from_millis(storage_ms),
        custom_vision: Duration::from_millis(cv_ms),
    };
    let (now, then) = kind_rounds(rounds, Some(latency)).await;
    let show = |s: &kinds::Sample| {
        format!(
            "{}, path {} storage + {} CV",
            ms(s.duration),
            s.critical.storage,
            s.critical.custom_vision
        )
    };
    for (k, (name, _)) in kinds::kinds().iter().enumerate() {
        let target = if name.starts_with("ExportCompleted") {
            "≤ 8 storage round trips"
        } else {
            "reported"
        };
        let (baseline, ratio) = match &then {
            Some(t) => (
                format!("{} (before)", show(&t[k])),
                format!(
                    "{:.2}",
                    now[k].duration.as_secs_f64() / t[k].duration.as_secs_f64()
                ),
            ),
            None => ("—".into(), "—".into()),
        };
        table.row(
            &format!("{storage_ms} ms storage, {cv_ms} ms CV: {name} (median of {rounds})"),
            show(&now[k]),
            baseline,
            ratio,
            target,
        );
    }
}

/// The workload of `n` messages on a fresh environment.
async fn fresh(n: usize) -> (Env, Vec<Message>) {
    let env = Env::start(false).await;
    let mut messages = env.prepare(n.div_ceil(3)).await;
    messages.truncate(n);
    (env, messages)
}

/// `n` notifications through serve (24 at once, the host's default) and worker, each beside the
/// direct client doing the same calls. Azurite looks entities and blobs up by scanning (LokiJS),
/// so its own speed falls as a run's data grows (28/s at 300 messages, 9/s at 1,500, for both
/// clients): the messages go in rounds of `CVCHAIN_BENCH_ROUND` (500) on a fresh Azurite and
/// stand-in each; cvchain and its baseline run at the same time, so drift hits both alike.
async fn throughput(table: &mut Table, n: usize) {
    const CONCURRENCY: usize = 24;
    let round: usize = setting("CVCHAIN_BENCH_ROUND", "500").parse().unwrap();
    let (mut serve_t, mut direct_t, mut worker_t, mut queue_t) = Default::default();
    let (mut idle, mut peak24, mut retries) = (0, 0, 0);
    let mut done = 0;
    while done < n {
        let size = round.min(n - done);
        // cvchain and its baseline side by side, each on its own Azurite and stand-in, at the
        // same moment: whatever else the machine does hits both alike.
        let ((env_a, msgs_a), (env_b, msgs_b)) = tokio::join!(fresh(size), fresh(size));
        let handler = drive::start_serve(&env_a, FAST_CV_RPS);
        idle = idle.max(drive::status_kib(handler.pid(), "VmRSS:"));
        let d = direct::Direct::new(&env_b, 1000).await;
        let (serve, direct_elapsed) = tokio::join!(
            drive::drive_serve(&handler, &msgs_a, CONCURRENCY),
            direct::run(&d, &msgs_b, CONCURRENCY)
        );
        peak24 = peak24.max(drive::status_kib(handler.pid(), "VmHWM:"));
        serve_t += serve.elapsed;
        retries += serve.retries;
        direct_t += direct_elapsed;
        drop(handler);
        drop((env_a, env_b));

        let ((env_a, msgs_a), (env_b, msgs_b)) = tokio::join!(fresh(size), fresh(size));
        tokio::join!(env_a.enqueue(&msgs_a), env_b.enqueue(&msgs_b));
        let d = Arc::new(direct::Direct::new(&env_b, 1000).await);
        let ((worker, handler), queue_elapsed) = tokio::join!(
            drive::drive_worker(&env_a, msgs_a.len(), FAST_CV_RPS),
            direct::run_queue(d, &env_b, msgs_b.len(), 16)
        );
        worker_t += worker.elapsed;
        queue_t += queue_elapsed;
        drop(handler);
        drop((env_a, env_b));
        done += size;
        println!("  throughput: {done} of {n} notifications");
    }
    let serve = drive::RunStats {
        messages: n,
        elapsed: serve_t,
        retries,
        gave_up: 0,
    };
    let worker = drive::RunStats {
        messages: n,
        elapsed: worker_t,
        ..Default::default()
    };
    let (direct_http, direct_queue): (Duration, Duration) = (direct_t, queue_t);
    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64();
    let direct_rate = rate(n, direct_http);
    table.row(
        &format!(
            "Throughput, {n} notifications through `serve`, {CONCURRENCY} at once (rounds of {round})"
        ),
        format!("{:.0}/s ({} retried)", serve.per_second(), serve.retries),
        format!("{direct_rate:.0}/s (direct client)"),
        format!("{:.2}", serve.per_second() / direct_rate),
        "≥ 0.9",
    );
    let direct_q = rate(n, direct_queue);
    table.row(
        &format!("Throughput, {n} notifications through `worker`, batch 16 (rounds of {round})"),
        format!("{:.0}/s", worker.per_second()),
        format!("{direct_q:.0}/s (direct queue consumer)"),
        format!("{:.2}", worker.per_second() / direct_q),
        "≥ 0.9",
    );
    table.row(
        "Idle RSS of `serve` (ready, before the first invocation)",
        mib(idle),
        "—".into(),
        "—".into(),
        "≤ 15 MB",
    );
    table.row(
        &format!("Peak RSS of `serve`, {CONCURRENCY} at once"),
        mib(peak24),
        "—".into(),
        "—".into(),
        "reported",
    );
}

/// Peak RSS at 64 concurrent invocations, and while a 1 GiB model is copied.
async fn memory(table: &mut Table) {
    let (env, mut messages) = fresh(3 * 215).await;
    // The last iteration's ONNX backup becomes a 1 GiB model; its export messages go last.
    let big = messages.last().unwrap().iteration;
    let big_export: Vec<Message> = messages
        .iter()
        .filter(|m| m.iteration == big && m.kind == Kind::ExportOnnx)
        .cloned()
        .collect();
    messages.retain(|m| !(m.iteration == big && m.kind != Kind::TrainingCompleted));
    let handler = drive::start_serve(&env, FAST_CV_RPS);
    let base = tokio::task::block_in_place(|| {
        let exe = baseline_exe();
        let port = cvchain_testkit::free_port();
        let mut child = std::process::Command::new(&exe)
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let rss = drive::status_kib(child.id(), "VmRSS:");
        let _ = child.kill();
        let _ = child.wait();
        rss
    });
    drive::reset_peak(handler.pid());
    drive::drive_serve(&handler, &messages, 64).await;
    let peak64 = drive::status_kib(handler.pid(), "VmHWM:");
    table.row(
        &format!(
            "Peak RSS of `serve`, 64 at once ({} notifications)",
            messages.len()
        ),
        mib(peak64),
        format!("{} idle (minimal axum)", mib(base)),
        "—".into(),
        "≤ 40 MB",
    );

    let m = &big_export[0];
    let blob = format!("{} - {}.ONNX", m.project, m.iteration);
    write_big_blob(&env, &blob, 1 << 30).await;
    let before = drive::status_kib(handler.pid(), "VmRSS:");
    drive::reset_peak(handler.pid());
    let copy = drive::drive_serve(&handler, &big_export, 1).await;
    let peak = drive::status_kib(handler.pid(), "VmHWM:");
    table.row(
        "Peak RSS of `serve` while a 1 GiB model is released",
        mib(peak),
        format!("{} before", mib(before)),
        format!("{:.2}", peak as f64 / before as f64),
        &format!("flat (copy took {:.1} s)", copy.elapsed.as_secs_f64()),
    );
}

/// Replaces a backup blob with `size` bytes, staged in 8 MiB blocks.
async fn write_big_blob(env: &Env, name: &str, size: usize) {
    use azure_storage_blob::models::BlockLookupList;
    const BLOCK: usize = 8 << 20;
    let blob = env
        .clients
        .blob_service()
        .unwrap()
        .blob_container_client(&env.backup)
        .blob_client(name)
        .block_blob_client();
    let chunk: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8).collect();
    let mut ids = Vec::new();
    for n in 0..size.div_ceil(BLOCK) {
        let id = format!("block-{n:08}").into_bytes();
        let len = BLOCK.min(size - n * BLOCK);
        blob.stage_block(
            &id,
            len as u64,
            azure_core::http::RequestContent::from(chunk[..len].to_vec()),
            None,
        )
        .await
        .unwrap();
        ids.push(id);
    }
    let list = BlockLookupList {
        latest: Some(ids),
        ..Default::default()
    };
    blob.commit_block_list(list.try_into().unwrap(), None)
        .await
        .unwrap();
}

/// What one rate run saw at the stand-in.
struct RateRun {
    /// Calls that arrived (refused ones included), in ms since the stand-in started, sorted.
    arrived: Vec<u64>,
    /// Calls served, likewise.
    served: Vec<u64>,
    refused: usize,
    notifications: usize,
    /// Invocations answered non-2xx (delivered again).
    failed: u64,
    /// Messages that failed 20 deliveries.
    gave_up: u64,
    elapsed: Duration,
}

impl RateRun {
    /// The most of `times` in any one-second window starting after the first `warm_up`.
    fn max_window(times: &[u64], from: u64) -> usize {
        let first = times.partition_point(|t| *t < from);
        (first..times.len())
            .map(|i| times[i..].partition_point(|t| *t < times[i] + 1000))
            .max()
            .unwrap_or(0)
    }

    fn refused_share(&self) -> f64 {
        self.refused as f64 / self.arrived.len().max(1) as f64
    }
}

/// `RATE_INSTANCES` `serve` processes (`bin`, or this build) sharing one stand-in that serves
/// 10 calls a second, each given its share of the notifications at 24 at once.
async fn rate_run(bin: Option<&Path>, max_rps: &str, n: usize) -> RateRun {
    // TrainingCompleted only: each instance then works on projects of its own, as the
    // notifications of different projects do, and nothing waits on another instance's export.
    let (env, messages) = fresh(3 * n).await;
    let messages: Vec<Message> = messages
        .into_iter()
        .filter(|m| m.kind == Kind::TrainingCompleted)
        .collect();
    // Set up without the limit (the service's resource would take minutes); measured with it.
    env.standin
        .set_rate_limit(Some(cvchain_standin::RATE_LIMIT));
    let settings = env.settings(max_rps);
    let vars: Vec<(&str, String)> = settings.iter().map(|(k, v)| (*k, v.clone())).collect();
    let handlers: Vec<cvchain_testkit::Handler> = (0..RATE_INSTANCES)
        .map(|_| {
            tokio::task::block_in_place(|| match bin {
                Some(b) => cvchain_testkit::Handler::start_with(b, "serve", &vars),
                None => cvchain_testkit::Handler::start(&vars),
            })
        })
        .collect();
    let before = env.standin.calls();
    let (skip, skip_refused) = (before.timeline_ms.len(), before.throttled_ms.len());
    let started = std::time::Instant::now();
    let shares: Vec<Vec<Message>> = (0..RATE_INSTANCES)
        .map(|i| {
            messages
                .iter()
                .skip(i)
                .step_by(RATE_INSTANCES)
                .cloned()
                .collect()
        })
        .collect();
    let runs = futures::future::join_all(
        handlers
            .iter()
            .zip(&shares)
            .map(|(h, share)| drive::drive_serve_counting(h, share, 24)),
    )
    .await;
    let elapsed = started.elapsed();
    // Why invocations failed, from the instances' logs.
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for h in &handlers {
        for line in h
            .stderr()
            .lines()
            .filter(|l| l.contains("invocation failed"))
        {
            let reason = line
                .split("error=")
                .nth(1)
                .unwrap_or(line)
                .chars()
                .take(120)
                .collect::<String>();
            *reasons.entry(reason).or_default() += 1;
        }
    }
    for (reason, n) in &reasons {
        eprintln!("rate: {n} invocations failed: {reason}");
    }
    let calls = env.standin.calls();
    let mut arrived = calls.timeline_ms[skip..].to_vec();
    arrived.sort_unstable();
    let mut refused = calls.throttled_ms[skip_refused..].to_vec();
    refused.sort_unstable();
    // Served = arrived less refused (both sorted).
    let mut served = Vec::with_capacity(arrived.len());
    let mut r = refused.iter().peekable();
    for t in &arrived {
        if r.peek() == Some(&t) {
            r.next();
        } else {
            served.push(*t);
        }
    }
    RateRun {
        refused: refused.len(),
        served,
        arrived,
        notifications: messages.len(),
        failed: runs.iter().map(|r| r.retries).sum(),
        gave_up: runs.iter().map(|r| r.gave_up).sum(),
        elapsed,
    }
}

/// `serve` instances sharing one Custom Vision resource in the rate section.
const RATE_INSTANCES: usize = 8;
/// Seconds of the rate run before the window count starts: instances that start together, each
/// with a burst, overshoot until their first 429s come back.
const RATE_WARM_UP_MS: u64 = 5000;

/// Eight `serve` instances share one resource that serves 10 calls a second and refuses the
/// rest, as Custom Vision does; beside the build in `CVCHAIN_BENCH_BEFORE_BIN` (its static share
/// of the limit per instance, as the template set it) when that is set.
async fn rate(table: &mut Table) {
    let n: usize = setting("CVCHAIN_BENCH_RATE_MESSAGES", "480")
        .parse()
        .unwrap();
    let limit = cvchain_standin::RATE_LIMIT as usize;
    let ours = rate_run(None, &limit.to_string(), n).await;
    let before_bin = std::env::var("CVCHAIN_BENCH_BEFORE_BIN")
        .ok()
        .map(PathBuf::from);
    // The old template's setting for 8 instances: 10 / 8, at least 1.
    let static_share = (limit / RATE_INSTANCES).max(1);
    let before = match &before_bin {
        Some(b) => Some(rate_run(Some(b), &static_share.to_string(), n).await),
        None => None,
    };
    let from = |r: &RateRun| r.arrived.first().copied().unwrap_or(0) + RATE_WARM_UP_MS;
    let window = |r: &RateRun| {
        format!(
            "max {} served ({} arrived)",
            RateRun::max_window(&r.served, from(r)),
            RateRun::max_window(&r.arrived, from(r))
        )
    };
    let refused = |r: &RateRun| {
        format!(
            "{:.1}% ({} of {})",
            r.refused_share() * 100.0,
            r.refused,
            r.arrived.len()
        )
    };
    let pace = |r: &RateRun| {
        format!(
            "{:.1} calls/s, {} failed ({} messages given up)",
            r.served.len() as f64 / r.elapsed.as_secs_f64(),
            r.failed,
            r.gave_up
        )
    };
    let before_cell = |f: &dyn Fn(&RateRun) -> String| match &before {
        Some(b) => format!("{} (before, {static_share}/s each)", f(b)),
        None => format!("limit {limit}/s"),
    };
    table.row(
        &format!(
            "Custom Vision calls in any 1 s window after the first {} s, {RATE_INSTANCES} `serve` on one resource ({} notifications, {:.0} s)",
            RATE_WARM_UP_MS / 1000,
            ours.notifications,
            ours.elapsed.as_secs_f64()
        ),
        window(&ours),
        before_cell(&window),
        format!(
            "{:.2}",
            RateRun::max_window(&ours.served, from(&ours)) as f64 / limit as f64
        ),
        &format!("≤ {limit}"),
    );
    table.row(
        &format!("Calls refused (429), {RATE_INSTANCES} `serve` on one resource"),
        refused(&ours),
        before_cell(&refused),
        "—".into(),
        "< 5%",
    );
    table.row(
        &format!("Calls served per second and invocations failed, {RATE_INSTANCES} `serve`"),
        pace(&ours),
        before_cell(&pace),
        match &before {
            Some(b) => format!(
                "{:.2}",
                (ours.served.len() as f64 / ours.elapsed.as_secs_f64())
                    / (b.served.len() as f64 / b.elapsed.as_secs_f64())
            ),
            None => "—".into(),
        },
        "reported; 0 failed",
    );
}
