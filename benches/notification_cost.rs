//! Criterion: the CPU cost of one notification besides I/O (envelope, parsing, planning, rows,
//! answer); see benches/support/hot_path.rs. `cargo bench --bench notification_cost`. And the
//! events a training tells, made into sealed outbox rows (`events/outbox_rows`).

use cvchain_testkit::hot_path;

use criterion::{Criterion, criterion_group};
use std::hint::black_box;

fn per_notification(c: &mut Criterion) {
    let config = hot_path::config();
    let observed = hot_path::observed();
    let mut group = c.benchmark_group("notification");
    for case in hot_path::cases() {
        group.bench_function(case.name, |b| {
            b.iter(|| hot_path::process(black_box(&case.body), &observed, &config))
        });
    }
    group.finish();
}

/// The outbox rows of a `TrainingCompleted` with a verdict (two events), as they are written:
/// the events built, redacted and bounded (`events::shape`), the rows sealed.
fn outbox_rows(c: &mut Criterion) {
    use cvchain_core::events::{EventContext, IterationFacts, Sink, insert_events, outbox_row};
    use cvchain_core::history::{Prop, seal};
    let (project, iteration) = (
        "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f",
        "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d",
    );
    let mut row = cvchain_testkit::training_completed_row(
        project.parse().expect("a UUID"),
        iteration.parse().expect("a UUID"),
    );
    let p = &mut row.properties;
    p.set(Prop::ReceivedAt, time::OffsetDateTime::UNIX_EPOCH);
    p.set(Prop::ProjectName, "Widget Detector");
    p.set(Prop::IterationName, "Iteration 2");
    p.set(Prop::Precision, 0.9);
    p.set(Prop::Recall, 0.8);
    p.set(Prop::AveragePrecision, 0.85);
    p.set(Prop::ExportableTo, "ONNX,TensorFlow,CoreML");
    p.set(Prop::GateVerdict, "passed");
    p.set(Prop::GateReasons, "map 0.85 >= 0.80; recall 0.80 >= 0.75");
    let ctx = EventContext {
        source: "/cvchain/acct/CustomVisionHistory".into(),
        table: "CustomVisionHistory".into(),
        release_container: Some("https://acct.blob.core.windows.net/models".into()),
    };
    let sinks = [Sink::Queue, Sink::EventGrid, Sink::Webhook];
    c.bench_function("events/outbox_rows", |b| {
        b.iter(|| {
            let events = insert_events(
                black_box(&row),
                &IterationFacts::default(),
                &ctx,
                time::OffsetDateTime::UNIX_EPOCH,
            );
            events
                .iter()
                .map(|e| seal(&outbox_row(project, e, &row.row_key, &sinks, "1").properties).len())
                .sum::<usize>()
        })
    });
}

criterion_group!(benches, per_notification, outbox_rows);

/// `CVCHAIN_HOTPATH_LOOP=n` runs each case n times without criterion: for callgrind
/// (`scripts/bench profile`).
fn main() {
    if let Some(n) = std::env::var("CVCHAIN_HOTPATH_LOOP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let (config, observed) = (hot_path::config(), hot_path::observed());
        let mut sent = 0;
        for case in hot_path::cases() {
            for _ in 0..n {
                sent += hot_path::process(black_box(&case.body), &observed, &config);
            }
        }
        println!("{sent} bytes");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
