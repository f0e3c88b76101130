//! The meshward control plane: the config store, the workload registry and
//! secure naming, and what each proxy is sent.

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod decisions;
pub mod metrics;
pub mod push;
pub mod record;
pub mod registry;
pub mod store;
pub mod watch;
