//! The local stand-ins for the services cvchain talks to, for `cvchain dev` and the tests; never
//! part of the deployed handler (the `standin` feature of the `cvchain` binary is off in the
//! package `scripts/package` builds).
//!
//! - [`Standin`]: a Custom Vision Training API that follows the OpenAPI spec for the operations
//!   cvchain and training scripts use, with the service's storage integration and injectable
//!   faults (Custom Vision has no emulator of its own).
//! - [`azurite`]: Azurite, the storage emulator, on free loopback ports.

pub mod azurite;
mod server;

pub use server::*;
