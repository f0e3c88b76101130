//! Connections to where traffic goes next — the local application (inbound)
//! or a service's endpoints (outbound) — and the HTTP connection pools on
//! top of them: HTTP/1.1 keep-alive and HTTP/2 multiplexing.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::Protocol;
use crate::http::Body;
use crate::identity::{Peer, handshake_failure};
use crate::io::UpstreamStream;
use crate::metrics::{Direction, Metrics};
use crate::socket::Dial;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no endpoint to connect to")]
    NoEndpoints,
    #[error("connecting to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Mutual TLS settings for one destination.
#[derive(Clone)]
pub struct MeshTls {
    pub connector: TlsConnector,
    /// The SNI sent: the service's host name.
    pub server_name: ServerName<'static>,
    /// Open connections to a server revoked later are cut.
    pub revocations: meshward_identity::revocation::Revocations,
}

/// Where a destination is and how to talk to it; replaced whole when the
/// control plane sends new endpoints or identities.
struct Route {
    endpoints: Vec<SocketAddr>,
    tls: Option<MeshTls>,
}

/// Dials one destination's endpoints, with mutual TLS or without. Clones
/// share the route, so an update reaches every pool at once. A connector
/// [`pinned`](Connector::pinned) to an endpoint dials it first (the pool of
/// that endpoint's connections); others take the endpoints in turn. A
/// refused or timed-out connect tries the next endpoint, up to
/// [`CONNECT_ATTEMPTS`] in all; a TLS failure does not (the endpoint
/// answered, and it is not who the service is allowed to be).
#[derive(Clone)]
pub struct Connector {
    route: Arc<std::sync::RwLock<Arc<Route>>>,
    next: Arc<AtomicUsize>,
    first: Option<SocketAddr>,
    timeout: Duration,
    dial: Dial,
    metrics: Arc<Metrics>,
}

/// Endpoints one connection tries before giving up: Envoy's default of one
/// attempt plus Istio's default of two retries on connect failure.
pub const CONNECT_ATTEMPTS: usize = 3;

impl Connector {
    pub fn new(
        endpoints: Vec<SocketAddr>,
        tls: Option<MeshTls>,
        timeout: Duration,
        dial: Dial,
        metrics: Arc<Metrics>,
    ) -> Connector {
        Connector {
            route: Arc::new(std::sync::RwLock::new(Arc::new(Route { endpoints, tls }))),
            next: Arc::new(AtomicUsize::new(0)),
            first: None,
            timeout,
            dial,
            metrics,
        }
    }

    /// This connector, dialing `endpoint` first.
    pub fn pinned(&self, endpoint: SocketAddr) -> Connector {
        Connector {
            first: Some(endpoint),
            ..self.clone()
        }
    }

    /// New endpoints and TLS settings, for the connections opened from now on.
    pub fn set_route(&self, endpoints: Vec<SocketAddr>, tls: Option<MeshTls>) {
        *self
            .route
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(Route { endpoints, tls });
    }

    /// The endpoints one connection tries, in order.
    fn attempts(&self, endpoints: &[SocketAddr]) -> Vec<SocketAddr> {
        let start = self
            .first
            .and_then(|first| endpoints.iter().position(|e| *e == first))
            .unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len());
        (0..endpoints.len().min(CONNECT_ATTEMPTS))
            .map(|i| endpoints[(start + i) % endpoints.len()])
            .collect()
    }

    /// Opens one connection. Returns the verified server identity for
    /// mutual TLS.
    pub async fn connect(&self) -> Result<(UpstreamStream, Option<Peer>), ConnectError> {
        let route = self
            .route
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if route.endpoints.is_empty() {
            return Err(ConnectError::NoEndpoints);
        }
        let mut failure = ConnectError::NoEndpoints;
        for addr in self.attempts(&route.endpoints) {
            let tcp = match self.dial.connect(addr, self.timeout).await {
                Ok(tcp) => tcp,
                Err(source) if source.kind() == std::io::ErrorKind::TimedOut => {
                    failure = ConnectError::Timeout {
                        addr,
                        timeout: self.timeout,
                    };
                    continue;
                }
                Err(source) => {
                    failure = ConnectError::Tcp { addr, source };
                    continue;
                }
            };
            return self.secure(&route, addr, tcp).await;
        }
        Err(failure)
    }

    /// Mutual TLS over `tcp` when the route asks for it.
    async fn secure(
        &self,
        route: &Route,
        addr: SocketAddr,
        tcp: TcpStream,
    ) -> Result<(UpstreamStream, Option<Peer>), ConnectError> {
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &route.tls else {
            return Ok((UpstreamStream::Plain(tcp), None));
        };
        let handshake = tls.connector.connect(tls.server_name.clone(), tcp);
        let stream = match tokio::time::timeout(self.timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                self.metrics
                    .handshake(Direction::Outbound, handshake_failure(&source));
                return Err(ConnectError::Tls { addr, source });
            }
            Err(_) => {
                self.metrics.handshake(Direction::Outbound, "timeout");
                return Err(ConnectError::Timeout {
                    addr,
                    timeout: self.timeout,
                });
            }
        };
        self.metrics.handshake(Direction::Outbound, "ok");
        let peer = Peer::of(stream.get_ref().1);
        let watch = peer.as_ref().and_then(|peer| {
            crate::revocation::watch(
                stream.get_ref().0,
                peer,
                &tls.revocations,
                Direction::Outbound,
                &self.metrics,
            )
        });
        Ok((UpstreamStream::Tls(Box::new(stream), watch), peer))
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(TokioIo::new(this.connect().await?.0)) })
    }
}

/// HTTP connection pools to one destination: one per HTTP version, so a
/// request keeps the version it came with (gRPC needs HTTP/2 end to end).
#[derive(Clone)]
pub struct HttpPools {
    h1: Client<Connector, Body>,
    h2: Client<Connector, Body>,
    protocol: Protocol,
}

/// Idle pooled connections are closed after this: well before the peer's
/// own idle limit ([`crate::config::Limits::header_timeout`]), so a request
/// is never sent on a connection the other side is closing.
const POOL_IDLE: Duration = Duration::from_secs(30);

impl HttpPools {
    /// `h1` and `h2` dial through connectors that offer the matching ALPN.
    pub fn new(h1: Connector, h2: Connector, protocol: Protocol) -> HttpPools {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .set_host(false);
        let h1 = builder.build(h1);
        builder.http2_only(true).timer(TokioTimer::new());
        let h2 = builder.build(h2);
        HttpPools { h1, h2, protocol }
    }

    /// The pool for a request that arrived as `version` on a port of this
    /// destination's protocol: `http` ports speak HTTP/1.1 upstream,
    /// `http2`/`grpc` ports HTTP/2, undeclared ones keep the request's version.
    pub fn for_version(&self, version: Version) -> (&Client<Connector, Body>, Version) {
        let h2 = match self.protocol {
            Protocol::Http => false,
            Protocol::Http2 => true,
            Protocol::Tcp | Protocol::Sniff => version == Version::HTTP_2,
        };
        if h2 {
            (&self.h2, Version::HTTP_2)
        } else {
            (&self.h1, Version::HTTP_11)
        }
    }
}
