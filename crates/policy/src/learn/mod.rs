//! Learning policy from traffic, and checking a policy change against it.
//!
//! Proxies write a [`record::DecisionRecord`] for every decision, holding
//! the facts the engine decided on. [`suggest`] turns the allowed ones into
//! least-privilege ALLOW policies; [`replay`] decides every recorded request
//! again under other policies, with this crate's own pipeline (never a
//! second reading of policy), and reports what would change. Neither does
//! any I/O beyond reading the records it is handed.

pub mod paths;
pub mod record;
pub mod replay;
pub mod suggest;

pub use paths::PathMode;
pub use record::{DecisionRecord, RECORD_VERSION, Records};
pub use replay::{Change, Replay, replay};
pub use suggest::{Callers, Plaintext, SuggestOptions, Suggestion, suggest};
