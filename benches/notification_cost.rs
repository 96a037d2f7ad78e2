//! Criterion: the CPU cost of one notification besides I/O (envelope, parsing, planning, rows,
//! answer); see benches/support/hot_path.rs. `cargo bench --bench notification_cost`.

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

criterion_group!(benches, per_notification);

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
