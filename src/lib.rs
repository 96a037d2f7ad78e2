//! cvchain, the application: the entry points and the shell that carries the core's decisions
//! out. One notification flows one way through four layers that never reach backwards:
//!
//! - entry points: [`commands`] (one module per command) on one start-up, [`startup`]; the
//!   Functions handler [`server`] and the queue [`worker`] differ only in how a message arrives
//!   and how its outcome is reported;
//! - protocol: the host's envelope and the queue message text, decoded once in `cvchain-core`
//!   (`envelope`, `message`);
//! - domain, pure: `cvchain-core` decides (`plan`, `chain`, `release`, `claims`, typed history
//!   rows);
//! - adapters: `cvchain-azure` (storage, Tables, blobs, queues, the Custom Vision client, the
//!   history store, claims).
//!
//! [`process`] joins them: it gathers what the plan needs, calls the core, and carries the actions
//! out; [`lifecycle`] carries out the channel moves, publishing and retention (for `process` and
//! for the `promote`, `rollback` and `channels` commands); [`events`] writes history changes
//! with the CloudEvents they emit and delivers the outbox to the sinks; [`error`] says whether a retry helps. [`settings`] assembles what each part parses; [`stage`] builds the Functions app folder;
//! [`telemetry`] sets up logging. The local Custom Vision and Azurite (`cvchain-standin`) come in
//! only with the `standin` feature, for `cvchain dev`.

pub mod commands;
pub mod console;
pub mod error;
pub mod events;
pub mod lifecycle;
pub mod moves;
pub mod process;
pub mod server;
pub mod settings;
pub mod stage;
pub mod startup;
pub mod telemetry;
pub mod worker;
