//! The in-process test harness: a small mesh on 127.0.0.1 with a CA
//! ([`ca`]), workload certificates, echo applications ([`apps`]), proxies
//! started in-process on ports the system chooses with their own temp dirs
//! ([`proxy`]), clients ([`client`]), a fake upstream resolver and a DNS
//! client ([`dns`]), and metric assertions by parsed value ([`prometheus`]).
//!
//! Compiled for the crate's own tests and, with the `testing` feature, for
//! any crate's tests (`meshward_proxy::testing::*`). Every listener binds
//! port 0 and its address is read back from what was bound, so tests
//! running in parallel never race for a port.
//!
//! Waits are on conditions with a generous deadline ([`eventually`]), never
//! on sleeps.

// Test support: a failed setup step (a temp dir, a certificate, a bind)
// must fail the test at once, where it happened, so unwrap and expect are
// the right tools here, as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod apps;
pub mod ca;
pub mod client;
pub mod dns;
pub mod prometheus;
pub mod proxy;

use std::time::Duration;

pub use apps::{counting_echo_app, echo_app, tcp_echo};
pub use ca::{Ca, TD, id};
pub use client::{closed_addr, get, h2, raw_exchange, seen};
pub use prometheus::{Labels, Scrape, ScrapeError};
pub use proxy::{ProxySpec, STRICT_NS, TestProxy, read_json_lines, start_proxy, start_proxy_with};

/// How long a change gets to take effect: generous, as CI machines are
/// shared; it costs time only when a test fails.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Waits until `f` holds, or fails the test after [`SETTLE`].
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    eventually_async(what, async || f()).await;
}

/// [`eventually`] for a condition that must await (a request).
pub async fn eventually_async(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // pacing: the poll interval
    }
}
