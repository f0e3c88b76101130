//! What a client can make the server hold, and for how long.
//!
//! The server's port cannot refuse strangers outright: a workload that
//! bootstraps with a token has no client certificate yet. So a connection
//! is one of two kinds, decided by its TLS handshake:
//!
//! - **authenticated**: it presented a client certificate that chains to
//!   the mesh's roots (rustls verified it). A mesh member: its connection
//!   may live as long as it likes (a proxy's distribution stream does), with
//!   ordinary HTTP/2 limits.
//! - **unauthenticated**: no client certificate (yet: connections in their
//!   TLS handshake count here too). It may call only CreateCertificate, has
//!   a handful of small streams, a short life, and draws its request bytes
//!   from one budget shared by all such connections; the connections are
//!   counted per peer address and in total, and those over either count are
//!   closed at once.
//!
//! Together these bound what strangers can make the server hold, whatever
//! they send and from however many addresses: about `total × (TLS and
//! HTTP/2 state ~30 KiB + streams × ~20 KiB + 64 KiB of unread flow-control
//! window) + body budget`, with the defaults 64 × 170 KiB + 4 MiB ≈ 15 MiB,
//! each byte for at most a connection's lifetime. The attack tests of
//! `meshward` (`tests/attack_server.rs`) measure it on a running server.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The largest CreateCertificate request the CA decodes. A CSR is a few
/// hundred bytes of PEM (an ECDSA P-256 key with one URI SAN: ~600 B; an
/// RSA 4096 one: ~2 KiB), and Istio's agents add a little metadata.
pub const CREATE_CERTIFICATE_MAX_MESSAGE: usize = 64 * 1024;

/// The one method a connection without a client certificate may call.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Everything the server bounds on its port.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Unauthenticated connections (in their handshake or after) from one
    /// peer (an IPv4 address, an IPv6 /64).
    pub unauthenticated_per_peer: usize,
    /// Unauthenticated connections in total.
    pub unauthenticated_total: usize,
    /// Request-body bytes all unauthenticated connections may hold at once
    /// (a request being received holds its bytes until it is decoded).
    pub unauthenticated_body_bytes: usize,
    pub unauthenticated: ConnectionLimits,
    pub authenticated: ConnectionLimits,
}

/// Limits of one connection, by kind.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// HTTP/2 streams open at once on one connection; more are refused
    /// (RST_STREAM REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows: how much a client may send that the
    /// server has not yet read. 65,535 is the protocol's floor.
    pub stream_window: u32,
    pub connection_window: u32,
    /// The largest HTTP/2 frame accepted (16 KiB is the protocol's floor).
    pub max_frame_size: u32,
    /// The largest header block (the decoded header list) of one request.
    pub max_header_list_size: u32,
    /// Response bytes buffered per stream for a client that does not read.
    pub max_send_buffer: usize,
    /// From a request's headers to its response's headers: a unary call
    /// must arrive whole and be answered within it; a stream must be
    /// accepted (its messages then flow as long as both sides like).
    pub request_timeout: Duration,
    /// How long the connection may stay open at all; then it is asked to go
    /// away (GOAWAY) and, [`CLOSE_GRACE`] later, closed. `None`: no limit.
    pub lifetime: Option<Duration>,
    /// HTTP/2 pings find peers that vanished without closing.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// After GOAWAY, how long requests in flight may take before the connection
/// is closed regardless.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            // A local mesh runs every proxy from 127.0.0.1 and each opens an
            // unauthenticated connection to bootstrap; retries absorb bursts.
            unauthenticated_per_peer: 32,
            // Each such connection lives seconds and a bootstrap takes
            // milliseconds: 64 at once serve hundreds of bootstraps a second.
            unauthenticated_total: 64,
            // Room for thousands of bootstraps (a CSR is ~1 KiB) or 64
            // requests at the size limit.
            unauthenticated_body_bytes: 4 << 20,
            unauthenticated: ConnectionLimits {
                // A bootstrap is one call. Each open stream costs the
                // server some 20 KiB besides its body.
                max_concurrent_streams: 2,
                stream_window: 65_535,
                connection_window: 65_535,
                max_frame_size: 16_384,
                // A bearer token is at most a few KiB.
                max_header_list_size: 8 << 10,
                max_send_buffer: 64 << 10,
                request_timeout: Duration::from_secs(10),
                lifetime: Some(Duration::from_secs(20)),
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(10),
            },
            authenticated: ConnectionLimits {
                max_concurrent_streams: 100,
                stream_window: 1 << 20,
                connection_window: 2 << 20,
                max_frame_size: 16_384,
                max_header_list_size: 16 << 10,
                max_send_buffer: 400 << 10,
                request_timeout: Duration::from_secs(30),
                lifetime: None,
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(10),
            },
        }
    }
}

impl ConnectionLimits {
    /// An HTTP/2 server connection builder with these limits.
    pub fn http2(&self) -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
        let mut builder =
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(self.max_concurrent_streams)
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .adaptive_window(false)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_send_buf_size(self.max_send_buffer)
            // Rapid reset (CVE-2023-44487): streams a client opens and
            // cancels before they are served, and streams it makes the
            // server reset, are capped; past the cap the connection ends.
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(256)
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout);
        builder
    }
}

/// The key connections are counted under: an IPv4 address, or an IPv6
/// address's /64 (one host commonly holds a whole /64), IPv4-mapped IPv6
/// addresses as IPv4.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "{peer} already has {limit} connections without a client certificate (the limit per peer address; \
         raise it with `meshward server --max-unauthenticated-per-peer` if many workloads share an address)"
    )]
    PerPeer { peer: IpAddr, limit: usize },
    #[error(
        "{limit} connections without a client certificate are open (the limit in total; \
         `meshward server --max-unauthenticated`)"
    )]
    Total { limit: usize },
}

/// Counts unauthenticated connections, per peer and in total.
#[derive(Debug)]
pub struct Admission {
    per_peer: usize,
    total: usize,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    peers: HashMap<IpAddr, usize>,
}

fn lock(counts: &Mutex<Counts>) -> MutexGuard<'_, Counts> {
    // The counts stay consistent whatever panicked: every update is one
    // step under the lock.
    counts.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Admission {
    pub fn new(per_peer: usize, total: usize) -> Admission {
        Admission {
            per_peer,
            total,
            counts: Arc::default(),
        }
    }

    /// Counts a new connection from `peer`, or refuses it. The count lasts
    /// as long as the returned [`Admitted`].
    pub fn admit(&self, peer: IpAddr) -> Result<Admitted, Refused> {
        let key = peer_key(peer);
        let mut counts = lock(&self.counts);
        if counts.total >= self.total {
            return Err(Refused::Total { limit: self.total });
        }
        let of_peer = counts.peers.entry(key).or_insert(0);
        if *of_peer >= self.per_peer {
            return Err(Refused::PerPeer {
                peer: key,
                limit: self.per_peer,
            });
        }
        *of_peer += 1;
        counts.total += 1;
        Ok(Admitted {
            key,
            counts: self.counts.clone(),
        })
    }

    /// Connections counted now: (from `peer`, in total).
    pub fn counted(&self, peer: IpAddr) -> (usize, usize) {
        let counts = lock(&self.counts);
        (
            counts.peers.get(&peer_key(peer)).copied().unwrap_or(0),
            counts.total,
        )
    }
}

/// One counted connection; dropping it (the connection closed, or it
/// authenticated) uncounts it.
#[derive(Debug)]
pub struct Admitted {
    key: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.peers.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.peers.remove(&self.key);
            }
        }
    }
}

/// Lets one log line through per interval, so that a flood of refused
/// connections cannot flood the log; reports how many it held back.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)`: log now, mentioning the `n` events held back since the
    /// last line; `None`: hold this one back.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, held) = &mut *state;
        if last.is_some_and(|last| now.saturating_duration_since(last) < self.every) {
            *held += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held))
    }
}

/// A request body whose bytes are counted against a shared budget for as
/// long as the body lives: the decoder keeps what it read until the
/// message is complete and the body is dropped. When the budget is spent
/// the body fails with RESOURCE_EXHAUSTED instead of growing.
pub struct BudgetedBody<B> {
    inner: B,
    budget: Option<Arc<Semaphore>>,
    held: Option<OwnedSemaphorePermit>,
}

impl<B> BudgetedBody<B> {
    /// `budget: None` counts nothing (an authenticated connection).
    pub fn new(inner: B, budget: Option<Arc<Semaphore>>) -> BudgetedBody<B> {
        BudgetedBody {
            inner,
            budget,
            held: None,
        }
    }

    /// Bytes this body holds from the budget.
    pub fn held(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    fn charge(&mut self, bytes: usize) -> Result<(), tonic::Status> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let permit = u32::try_from(bytes)
            .ok()
            .and_then(|n| budget.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| {
                tonic::Status::resource_exhausted(
                    "the server is receiving as many requests from clients without a client certificate as it holds; retry later",
                )
            })?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Ok(())
    }
}

impl<B> Body for BudgetedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => {
                return Poll::Ready(Some(Err(tonic::Status::from_error(e.into()))));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref()
            && let Err(status) = self.charge(data.len())
        {
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use http_body_util::BodyExt;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn peers_are_ipv4_addresses_and_ipv6_64s() {
        assert_eq!(peer_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(peer_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            peer_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn a_peer_over_its_share_is_refused_and_others_are_not() {
        let admission = Admission::new(2, 10);
        let a1 = admission.admit(ip("10.0.0.1")).unwrap();
        let _a2 = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            admission.admit(ip("10.0.0.1")).unwrap_err(),
            Refused::PerPeer {
                peer: ip("10.0.0.1"),
                limit: 2
            }
        );
        let _b = admission.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(admission.counted(ip("10.0.0.1")), (2, 3));
        // A closed connection frees its place.
        drop(a1);
        assert_eq!(admission.counted(ip("10.0.0.1")), (1, 2));
        let _a3 = admission.admit(ip("10.0.0.1")).unwrap();
    }

    #[test]
    fn the_total_is_capped_across_peers_and_freed_on_drop() {
        let admission = Admission::new(5, 3);
        let held: Vec<Admitted> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .map(|p| admission.admit(ip(p)).unwrap())
            .collect();
        assert_eq!(
            admission.admit(ip("10.0.0.4")).unwrap_err(),
            Refused::Total { limit: 3 }
        );
        drop(held);
        assert_eq!(admission.counted(ip("10.0.0.1")), (0, 0));
        assert!(
            lock(&admission.counts).peers.is_empty(),
            "no entries left behind"
        );
        admission.admit(ip("10.0.0.4")).unwrap();
    }

    #[test]
    fn ipv6_hosts_of_one_64_share_a_count() {
        let admission = Admission::new(1, 10);
        let _a = admission.admit(ip("2001:db8::1")).unwrap();
        assert!(matches!(
            admission.admit(ip("2001:db8::2")),
            Err(Refused::PerPeer { .. })
        ));
    }

    #[test]
    fn refusal_messages_say_what_to_change() {
        let message = Refused::PerPeer {
            peer: ip("10.0.0.1"),
            limit: 32,
        }
        .to_string();
        assert!(message.contains("10.0.0.1"), "{message}");
        assert!(
            message.contains("--max-unauthenticated-per-peer"),
            "{message}"
        );
        assert!(
            Refused::Total { limit: 256 }
                .to_string()
                .contains("--max-unauthenticated`"),
        );
    }

    #[test]
    fn the_log_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(throttle.allow(t0), Some(0));
        assert_eq!(throttle.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(throttle.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(throttle.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(throttle.allow(t0 + Duration::from_secs(11)), None);
    }

    fn body_of(
        chunks: &[&'static [u8]],
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        http_body_util::StreamBody::new(tokio_stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_holds_its_bytes_from_the_budget_until_dropped() {
        let budget = Arc::new(Semaphore::new(10));
        let mut body = BudgetedBody::new(body_of(&[b"abcd", b"efg"]), Some(budget.clone()));
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        assert_eq!(body.held(), 7);
        assert_eq!(budget.available_permits(), 3);
        drop(body);
        assert_eq!(budget.available_permits(), 10);
    }

    #[tokio::test]
    async fn a_body_past_the_budget_fails_with_resource_exhausted() {
        let budget = Arc::new(Semaphore::new(6));
        let first = BudgetedBody::new(body_of(&[b"abcd"]), Some(budget.clone()));
        let mut first = first;
        first.frame().await.unwrap().unwrap();
        let mut second = BudgetedBody::new(body_of(&[b"xy", b"z"]), Some(budget.clone()));
        second.frame().await.unwrap().unwrap();
        let status = second.frame().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        // The failed body still held only what it had; all comes back.
        drop((first, second));
        assert_eq!(budget.available_permits(), 6);
    }

    #[tokio::test]
    async fn without_a_budget_nothing_is_counted() {
        let mut body = BudgetedBody::new(body_of(&[b"abcdefgh"]), None);
        body.frame().await.unwrap().unwrap();
        assert_eq!(body.held(), 0);
    }
}
