//! cvchain's core: every decision, in pure code. No I/O, no clock, no async runtime: what the
//! world looks like is passed in, and what to do comes back as values the adapters carry out.
//!
//! A notification flows through it one way:
//!
//! - [`envelope`]: the Azure Functions custom-handler envelope, decoded (and encoded for `invoke`);
//! - [`message`]: the queue message as it arrived, decoded once into a typed [`message::Incoming`];
//! - [`notification`]: what Custom Vision sent, typed;
//! - [`plan`]: the message, the configuration and what was observed → the actions, using
//!   [`chain`] (which export comes next), [`release`] (where a model is copied from and to),
//!   [`claims`] (who may request or copy), [`gate`] (may it go to production), [`channels`]
//!   (which iteration `latest` and `production` hold) and [`retention`] (which iterations go);
//! - [`history`]: the typed rows everything is recorded in, and the views read back from them;
//! - [`report`]: the history as people read it (the `history` command and page);
//! - [`events`]: the CloudEvents a history change emits, their outbox rows, and how each sink
//!   gets them (order, retries, size, Standard Webhooks signatures).
//!
//! Beside them: [`bounds`] (sizes as Table storage counts them), [`customvision`] (the Training API's models and error classes), [`config`] (the
//! settings the decisions take, and the one number parser settings use), [`redact`] (secrets out
//! of every text that is stored or logged), [`trace`] (which trace an invocation joins, W3C
//! `traceparent`, what telemetry attributes say) and [`fuzzing`] (entry points for the fuzz targets).

pub mod bounds;
pub mod chain;
pub mod channels;
pub mod claims;
pub mod config;
pub mod console;
pub mod customvision;
pub mod envelope;
pub mod events;
pub mod forms;
pub mod fuzzing;
pub mod gate;
pub mod history;
pub mod message;
pub mod notification;
pub mod plan;
pub mod ratelimit;
pub mod redact;
pub mod release;
pub mod report;
pub mod retention;
pub mod trace;
