//! Transparent mode: the application is unchanged. Capture rules
//! (`meshward capture`, or `meshward proxy --capture`) redirect the
//! workload's outbound TCP to the outbound capture port (15001) and its
//! inbound TCP to the inbound capture port (15006). Each captured
//! connection's original destination decides what it is:
//!
//! - outbound: the service port at that address ([`routes`]), served by
//!   [`crate::outbound::serve`] as an explicit listener's would be; an
//!   address the registry does not know is passed through or refused
//!   (MeshConfig `outboundTrafficPolicy`, [`passthrough`]);
//! - inbound: the workload port, served by [`crate::inbound::serve`] with
//!   that port's peer authentication and authorization, then forwarded to
//!   the application at the same address and port, from 127.0.0.6.
//!
//! The proxy's own connections carry its socket mark (or run as its uid),
//! which the capture rules let through, so nothing loops.

pub mod passthrough;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::Shared;
use crate::socket;
pub use routes::{Outbound, Routes};

/// The capture ports, Istio's numbers.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;

/// Where the capture listeners are.
#[derive(Debug, Clone)]
pub struct TransparentConfig {
    /// Outbound capture listeners (IPv4 and IPv6 wildcard by default).
    pub outbound: Vec<SocketAddr>,
    /// Inbound capture listeners.
    pub inbound: Vec<SocketAddr>,
}

impl TransparentConfig {
    /// Listeners on these ports. Outbound: loopback only, where REDIRECT
    /// delivers what the workload's own processes send — never reachable
    /// from elsewhere (a host's DNAT to the port could otherwise have the
    /// proxy dial out with the workload's identity for a stranger).
    /// Inbound: every address (REDIRECT delivers to the address of the
    /// interface a connection came in on); IPv6 ones IPv6-only.
    pub fn on_ports(outbound: u16, inbound: u16) -> TransparentConfig {
        TransparentConfig {
            outbound: vec![
                SocketAddr::from(([127, 0, 0, 1], outbound)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, outbound)),
            ],
            inbound: vec![
                SocketAddr::from(([0, 0, 0, 0], inbound)),
                SocketAddr::from(([0u16; 8], inbound)),
            ],
        }
    }
}

impl Default for TransparentConfig {
    fn default() -> Self {
        TransparentConfig::on_ports(OUTBOUND_PORT, INBOUND_PORT)
    }
}

/// Binds a capture listener. An IPv6 wildcard is IPv6-only, so it can sit
/// beside the IPv4 one; a host without IPv6 simply has no IPv6 listener
/// (`Ok(None)`), since nothing can be captured there either.
pub fn bind(addr: SocketAddr) -> std::io::Result<Option<TcpListener>> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => match TcpSocket::new_v6() {
            Ok(socket) => socket,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(None),
            Err(e) => return Err(e),
        },
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        socket2::SockRef::from(&socket).set_only_v6(true)?;
    }
    match socket.bind(addr) {
        Err(e) if addr.is_ipv6() && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            return Ok(None);
        }
        other => other?,
    }
    socket.listen(1024).map(Some)
}

/// The original destination of a captured connection; `None` (and a log
/// line) for one that was not redirected — made straight to the capture
/// port, it would otherwise loop back into the proxy.
fn destination(tcp: &TcpStream, direction: &'static str) -> Option<SocketAddr> {
    match socket::original_dst(tcp) {
        Ok(dst) if Some(dst) == tcp.local_addr().ok().map(socket::canonical) => {
            tracing::debug!(direction, %dst, "refusing a connection made to the capture port itself");
            None
        }
        Ok(dst) => Some(dst),
        Err(e) => {
            tracing::debug!(direction, "no original destination: {e}");
            None
        }
    }
}

/// Serves one connection captured on its way out of the workload.
pub async fn serve_outbound(
    tcp: TcpStream,
    peer: SocketAddr,
    routes: Arc<Routes>,
    shared: Arc<Shared>,
) {
    let Some(dst) = destination(&tcp, "outbound") else {
        return;
    };
    match routes.outbound(dst) {
        Outbound::Service(route) => crate::outbound::serve(tcp, peer, route, shared).await,
        Outbound::Passthrough => {
            passthrough::pass(
                tcp,
                peer,
                dst,
                passthrough::PASSTHROUGH,
                routes.mark(),
                shared,
            )
            .await
        }
        Outbound::Original(name) => {
            passthrough::pass(tcp, peer, dst, &name, routes.mark(), shared).await
        }
        Outbound::BlackHole => passthrough::refuse(peer, dst, &shared),
    }
}

/// Serves one connection captured on its way into the workload.
pub async fn serve_inbound(
    tcp: TcpStream,
    peer: SocketAddr,
    routes: Arc<Routes>,
    shared: Arc<Shared>,
) {
    let Some(dst) = destination(&tcp, "inbound") else {
        return;
    };
    let target = routes.inbound(dst);
    crate::inbound::serve(tcp, peer, target, shared).await
}
