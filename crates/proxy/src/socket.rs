//! The socket options transparent mode needs, through socket2 (no
//! `unsafe` here): the original destination of a connection the capture
//! rules redirected, and the mark that exempts the proxy's own connections
//! from capture.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

/// Where a redirected connection was going before the capture rules sent
/// it to the proxy (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6).
/// An IPv4 address seen through an IPv6 socket is given as IPv4.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}

/// IPv4-mapped IPv6 addresses as the IPv4 addresses they are, so one
/// service address matches however the connection arrived.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The source address inbound connections to the application come from
/// in transparent mode. The capture rules let the proxy's loopback traffic
/// from this address through untouched, while its other loopback traffic to
/// the workload's own address is captured as inbound (a workload calling
/// itself through the mesh); the application sees this address as its peer.
pub const INBOUND_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
pub const INBOUND_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// How the proxy opens its own connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dial {
    /// `SO_MARK` for every connection, so the capture rules exempt it
    /// (needs CAP_NET_ADMIN; a proxy running as its own uid needs none).
    pub mark: Option<u32>,
    /// Connect from [`INBOUND_SOURCE_V4`]/[`INBOUND_SOURCE_V6`]: the
    /// transparent inbound path to the application.
    pub inbound_source: bool,
}

impl Dial {
    /// Connects to `addr` within `timeout`.
    pub async fn connect(self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        if self == Dial::default() {
            return tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| timed_out())?;
        }
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(mark) = self.mark {
            SockRef::from(&socket).set_mark(mark)?;
        }
        if self.inbound_source {
            let source = match addr {
                SocketAddr::V4(_) => IpAddr::V4(INBOUND_SOURCE_V4),
                SocketAddr::V6(_) => IpAddr::V6(INBOUND_SOURCE_V6),
            };
            // ::6 is not a local address unless configured; binding it
            // needs IP_FREEBIND, as for any address not (yet) local.
            if source.is_ipv6() {
                SockRef::from(&socket).set_freebind_v6(true)?;
            }
            socket.bind(SocketAddr::new(source, 0))?;
        }
        tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| timed_out())?
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
}

/// Marks a socket the proxy opened some other way (a UDP socket, a
/// client library's connection).
pub fn set_mark<'s, S>(socket: &'s S, mark: u32) -> io::Result<()>
where
    SockRef<'s>: From<&'s S>,
{
    SockRef::from(socket).set_mark(mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_canonical() {
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:9080".parse().unwrap();
        assert_eq!(canonical(mapped), "198.18.0.2:9080".parse().unwrap());
        let v6: SocketAddr = "[2001:2::2]:9080".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn a_connection_not_redirected_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.unwrap();
        // No NAT entry: the kernel says so rather than inventing one.
        assert!(original_dst(&server).is_err());
    }

    #[tokio::test]
    async fn the_default_dial_connects_plainly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = Dial::default()
            .connect(addr, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn the_inbound_source_is_what_the_application_sees() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dial = Dial {
            mark: None,
            inbound_source: true,
        };
        let (stream, accepted) = tokio::join!(
            dial.connect(addr, Duration::from_secs(5)),
            listener.accept()
        );
        stream.unwrap();
        assert_eq!(accepted.unwrap().1.ip(), IpAddr::V4(INBOUND_SOURCE_V4));
    }
}
