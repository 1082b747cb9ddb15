//! loginflow: a streaming ETL from SQS to PostgreSQL.
//!
//! The stages, in the order a message meets them ([`pipeline::run`] composes them):
//!
//! - [`source`]: long-polling SQS receivers, the byte budget, the registry of held messages, visibility extension
//! - [`dedup`]: the SNS key rule, then a moka TTL cache of committed messages
//! - [`mask`]: decode + validate, keyed HMAC-SHA256 of `ip` and `device_id`, sealing ([`transform`])
//! - [`windows`] and [`sink`]: windows that grow with load, one transaction each
//! - [`acks`]: delete from the queue after commit
//!
//! What they share: [`records`] (the record types), [`transform`] (one message's rule),
//! [`decode`], [`shapes`], [`masker`], [`vault`] (sealing), [`sqs`], [`schema`], [`retry`], [`errors`],
//! [`metrics`], [`http`], [`summary`]. Around them: [`config`] (flags and environment) and
//! [`commands`] (seed, redrive, reveal, forget, remask, replay).

pub mod acks;
pub mod commands;
pub mod config;
pub mod decode;
pub mod dedup;
pub mod errors;
pub mod http;
pub mod mask;
pub mod masker;
pub mod metrics;
pub mod pipeline;
pub mod records;
pub mod retry;
pub mod schema;
pub mod shapes;
pub mod sink;
pub mod source;
pub mod sqs;
pub mod summary;
pub mod transform;
pub mod vault;
pub mod windows;

pub use pipeline::{run, RunError, RunSummary, Settings};
