//! cvchain: turns Azure Custom Vision's storage-queue notifications into an event-driven MLOps chain.
//!
//! One notification flows one way: an entry point (`server`) decodes the transport (`host`),
//! `plan` decides in pure code what to do with the typed `notification`, and `process` carries the
//! actions out through the adapters (`history`, `storage`).

pub mod chain;
pub mod cli;
pub mod customvision;
pub mod dev;
pub mod fuzzing;
pub mod history;
pub mod host;
pub mod notification;
pub mod ops;
pub mod plan;
pub mod process;
pub mod redact;
pub mod release;
pub mod report;
pub mod server;
pub mod settings;
pub mod stage;
pub mod storage;
pub mod telemetry;
pub mod transport;
pub mod worker;
