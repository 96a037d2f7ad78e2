//! cvchain's adapters: everything that talks to Azure. Each module has one job and an error type
//! that says whether a retry can help.
//!
//! - [`storage`]: the storage connection from settings, the SDK's clients built from it, and the
//!   two pieces the GA SDK lacks, each one small module: SharedKey signing as an `azure_core`
//!   policy ([`storage::shared_key`]) and a Table client ([`storage::table`]); release copies
//!   ([`storage::blobs`]) and queue messages ([`storage::queue`]).
//! - [`customvision`]: the Training API client, its settings and its process-wide rate limit.
//! - [`history`]: typed history rows as table entities, the history store, claims.
//! - [`events`]: the event sinks (queue, Event Grid, webhook), their settings, the outbox.
//! - [`transport`]: one lazily built HTTP client per set of clients.
//!
//! The decisions these adapters carry out live in `cvchain-core`.

pub mod customvision;
pub mod events;
pub mod history;
pub mod storage;
pub mod telemetry;
pub mod transport;

/// The name cvchain's requests carry in their `User-Agent`.
pub const USER_AGENT_NAME: &str = "cvchain";
