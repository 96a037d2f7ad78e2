//! What cvchain's tests and benchmarks share, so no test reaches into another's files:
//!
//! - [`copy_proxy`]: a fault proxy in front of Azurite's blob port that makes copies slow
//!   (`pending`, then `success`, `failed` or `aborted`), as a real service's are;
//! - [`azurite`]: an Azurite of the test's own (free loopback ports, its own data folder or
//!   memory, stopped on drop), on `cvchain-standin`'s launcher;
//! - [`eventgrid`]: a local Event Grid topic (custom or namespace) that checks what the service
//!   checks (no emulator exists);
//! - [`chat`]: local Teams Workflows and Slack incoming webhooks that check what each service
//!   documents;
//! - [`latency_proxy`]: a proxy that gives Azurite and the stand-in a cloud's latency and
//!   finds an invocation's critical path in sequential round trips (the benchmark's model);
//! - [`handler`]: the `cvchain` binary started as the Functions host starts it (`serve`) or as a
//!   queue worker;
//! - [`host`]: the Functions host's queue trigger, played against a running handler;
//! - [`standin`]: the Custom Vision stand-in's configuration and REST API, as a user's script
//!   would call it;
//! - [`tls`]: a test CA and token credentials for Microsoft Entra ID paths;
//! - [`secrets`]: the scan that fails a test when a secret leaks into logs or rows;
//! - [`hot_path`]: the per-notification CPU work the benchmarks measure.

pub mod azurite;
pub mod chat;
pub mod copy_proxy;
pub mod demo;
pub mod eventgrid;
pub mod handler;
pub mod host;
pub mod hot_path;
pub mod latency_proxy;
pub mod secrets;
pub mod standin;
pub mod tls;

pub use azurite::{Azurite, unique};
pub use copy_proxy::{CopyEnd, CopyFaults, CopyProxy};
pub use demo::DemoRun;
pub use eventgrid::{EventGridTopic, TopicAuth};
pub use handler::Handler;
pub use host::{HostEmulator, PumpStats, deliver_to_both, host_envelope, take_messages};
pub use secrets::{assert_no_secrets, find_secret};
pub use standin::{StandinApi, standin_calls, standin_config};
pub use tls::{AzuriteTokenCredential, RecordingCredential, TestCa};

use std::path::PathBuf;

/// A `TrainingCompleted` notification's history row as cvchain keys it, with only what names
/// it (not yet confirmed by Custom Vision: a caller that wants it told sets `Confirmed`).
pub fn training_completed_row(
    project: uuid::Uuid,
    iteration: uuid::Uuid,
) -> cvchain_core::history::HistoryRow {
    use cvchain_core::history::{HistoryRow, Prop, Props, RowKind, RowStatus, training_row_key};
    use cvchain_core::notification::{EventStatus, Kind, TrainingStatus};
    let mut p = Props::new();
    p.set(
        Prop::EventType,
        RowKind::Notification(Kind::Training).as_str(),
    );
    p.set(
        Prop::Status,
        RowStatus::Event(EventStatus::TrainingCompleted).as_str(),
    );
    p.set(Prop::ProjectId, project.to_string());
    p.set(Prop::IterationId, iteration.to_string());
    HistoryRow {
        partition_key: project.to_string(),
        row_key: training_row_key(iteration, TrainingStatus::Completed),
        properties: p,
    }
}

/// The repository root (where `node_modules`, `host.json` and `tests/fixtures` are).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// A blob's bytes, read through cvchain's own clients (panics when it cannot be read).
pub async fn blob_bytes(
    clients: &cvchain_azure::storage::clients::StorageClients,
    container: &str,
    name: &str,
) -> Vec<u8> {
    clients
        .blob_service()
        .unwrap()
        .blob_container_client(container)
        .blob_client(name)
        .download(None)
        .await
        .unwrap_or_else(|e| panic!("{container}/{name}: {e}"))
        .body
        .collect()
        .await
        .unwrap()
        .to_vec()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    cvchain_standin::azurite::free_port().expect("a free loopback port")
}

/// A notification fixture from `tests/fixtures/notifications`.
pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("tests/fixtures/notifications").join(name)).unwrap()
}
