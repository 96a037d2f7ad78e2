//! Outbound events, carried out: the sinks' settings, the sinks themselves (a Storage queue,
//! an Event Grid topic, a Standard Webhooks endpoint) and the outbox rows' delivery state. Which
//! events exist, in what order a sink takes them and what an answer means is decided in
//! `cvchain_core::events`.

pub mod outbox;
pub mod settings;
pub mod sinks;
