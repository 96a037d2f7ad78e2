//! The local stand-ins for the services cvchain talks to, for `cvchain dev`, `cvchain standin`
//! and the tests; never part of the deployed handler (the `standin` feature of the `cvchain`
//! binary is off in the package `scripts/package` builds).
//!
//! - [`Standin`]: a Custom Vision Training API (v3.3 and v3.4-preview) that Microsoft's SDKs can
//!   drive unchanged: projects, tags, images, training, iterations, exports, publishing, and the
//!   service's storage integration, each request checked against the OpenAPI specs, every error
//!   a `CustomVisionError` body; plus injectable faults (Custom Vision has no emulator).
//! - [`script`]: what a user's training script does, for the demo and the tests.
//! - [`azurite`]: Azurite, the storage emulator, on free loopback ports.
//!
//! Modules: `spec` (the specs' enums) and `api` (errors, parameters) at the bottom; `state`
//! (records and their JSON), `storage` (the integration), `imaging` and `package` (what an
//! export's zip holds) above them; `routes`
//! (one module per group of operations, and the gate) on top; `server` runs it.

mod api;
pub mod azurite;
mod config;
mod faults;
mod imaging;
pub mod package;
mod routes;
pub mod script;
mod server;
pub mod spec;
mod state;
mod storage;

pub use api::ApiError;
pub use config::{MAX_PROJECTS, RATE_LIMIT, StandinConfig};
pub use faults::{CallLog, ExportCall, Faults, Metrics};
pub use imaging::{MAX_IMAGE_BYTES, solid_png};
pub use package::ExportPackage;
pub use server::{Standin, serve_tls, tls_acceptor};
pub use spec::{ApiVersion, COMPACT_DOMAIN, DOMAINS, GENERAL_DOMAIN};
pub use state::{MAX_ITERATIONS, MIN_IMAGES_PER_TAG};
pub use storage::INTERNAL_CONTAINER;
