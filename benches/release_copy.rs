//! Benchmark: the server-side release copy of a large model in Azurite, with the process's time
//! and peak RSS. The copy runs in the storage service, so RSS must not grow with the model size.
//!
//!     cargo bench --bench release_copy                 # 1 MiB, 64 MiB and 1 GiB
//!     CVCHAIN_BENCH_SIZES_MIB=1,1024 cargo bench --bench release_copy
//!
//! Needs Azurite in node_modules (`npm ci`). Prints a Markdown table.

use azure_storage_blob::models::BlockLookupList;
use cvchain_azure::storage::{blobs::ReleaseStore, clients::StorageClients};
use cvchain_core::release::{
    DEFAULT_TEMPLATE, PathTemplate, ReleaseFacts, ReleaseNames, ReleasePlan, Source,
};
use std::time::Instant;
use uuid::Uuid;

const BLOCK: usize = 8 * 1024 * 1024;

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS (VmHWM) so it measures only what follows.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Writes a blob of `size` bytes in 8 MiB blocks, so the bench itself never holds the model.
async fn write_model(clients: &StorageClients, container: &str, name: &str, size: usize) {
    let c = clients
        .blob_service()
        .unwrap()
        .blob_container_client(container);
    let _ = c.create(None).await;
    let blob = c.blob_client(name).block_blob_client();
    let mut ids = Vec::new();
    let chunk: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8).collect();
    let mut written = 0;
    let mut n = 0u32;
    while written < size {
        let len = BLOCK.min(size - written);
        let id = format!("block-{n:08}").into_bytes();
        blob.stage_block(
            &id,
            len as u64,
            azure_core::http::RequestContent::from(chunk[..len].to_vec()),
            None,
        )
        .await
        .unwrap();
        ids.push(id);
        written += len;
        n += 1;
    }
    let list = BlockLookupList {
        latest: Some(ids),
        ..Default::default()
    };
    blob.commit_block_list(list.try_into().unwrap(), None)
        .await
        .unwrap();
}

fn main() {
    let sizes: Vec<usize> = std::env::var("CVCHAIN_BENCH_SIZES_MIB")
        .unwrap_or_else(|_| "1,64,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse::<usize>().ok())
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let azurite = cvchain_testkit::Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let backup_url = url::Url::parse(&format!(
        "http://127.0.0.1:{}/devstoreaccount1/benchbackups",
        azurite.blob_port
    ))
    .unwrap();
    let store = ReleaseStore::new(
        &clients,
        "benchmodels",
        Some(backup_url),
        PathTemplate::parse(DEFAULT_TEMPLATE).unwrap(),
    )
    .unwrap();

    println!("| model size | copy time | process RSS before | peak RSS during copy | growth |");
    println!("|---:|---:|---:|---:|---:|");
    for mib in sizes {
        let (p, i) = (Uuid::new_v4(), Uuid::new_v4());
        let name = format!("{p} - {i}.ONNX");
        runtime.block_on(write_model(
            &clients,
            "benchbackups",
            &name,
            mib * 1024 * 1024,
        ));
        let plan = ReleasePlan {
            platform: "ONNX".into(),
            flavor: None,
            source: Source::Backup { blob_name: name },
            fallback: None,
            expect_free: false,
        };
        let names = ReleaseNames {
            project_id: p,
            project_name: format!("bench-{mib}"),
            iteration_id: i,
            iteration_name: "Iteration 1".into(),
            platform: "ONNX".into(),
            flavor: None,
        };
        reset_peak();
        let before = status_kib("VmRSS:");
        let start = Instant::now();
        let done = runtime
            .block_on(store.release(&plan, &names, &ReleaseFacts::default()))
            .unwrap();
        let elapsed = start.elapsed();
        let peak = status_kib("VmHWM:");
        assert!(done.copied);
        assert_eq!(done.size, (mib * 1024 * 1024) as u64);
        println!(
            "| {mib} MiB | {:.1} ms | {:.1} MiB | {:.1} MiB | {:+.1} MiB |",
            elapsed.as_secs_f64() * 1000.0,
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
            (peak as f64 - before as f64) / 1024.0,
        );
    }
}
