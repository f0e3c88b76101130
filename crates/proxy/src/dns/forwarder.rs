//! Queries the proxy does not answer itself go to the upstream resolvers:
//! the `nameserver`s of `/etc/resolv.conf`, or `--dns-upstream`. As Istio's
//! DNS proxy does, each is tried in turn with the client's own protocol
//! (UDP or TCP), and the first answer, whatever its code (NXDOMAIN
//! included), goes back to the client; when none answers in time the
//! client gets SERVFAIL.
//!
//! Every socket the forwarder uses is made here ([`MarkedSockets`], the
//! runtime hickory's client streams draw sockets from), so that under
//! capture each carries the proxy's socket mark (`SO_MARK`) and the
//! firewall lets the proxy's own queries out instead of sending them back
//! to it. hickory's streams add what a resolver needs against spoofed
//! answers: a random query id and source port per query, and an answer
//! accepted only from the server asked, with that id and that question.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use hickory_net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_net::runtime::{RuntimeProvider, TokioHandle, TokioTime};
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::{DnsExchange, DnsRequestSender, Protocol};
use hickory_net::{DnsHandle, DnsMultiplexer, NetError};
use hickory_proto::op::{DnsRequest, DnsRequestOptions, Edns, Message, Query};
use socket2::{Domain, Socket, Type};
use tokio_stream::StreamExt;

use super::DnsError;

/// What is asked of the upstream resolvers for one client query.
#[derive(Debug, Clone)]
pub struct Question {
    pub query: Query,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The client's EDNS, if it sent one: its payload size and DO bit are
    /// asked for upstream.
    pub edns: Option<Edns>,
    pub protocol: Protocol,
}

/// The upstream resolvers, and how to reach them.
#[derive(Clone)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    /// For each upstream in turn.
    timeout: Duration,
    sockets: MarkedSockets,
}

impl Forwarder {
    /// Fails when a `mark` is asked for and cannot be set (setting
    /// `SO_MARK` needs `CAP_NET_ADMIN`): better at start than as SERVFAIL
    /// on every query.
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        mark: Option<u32>,
    ) -> Result<Forwarder, DnsError> {
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        if let Some(mark) = mark {
            Socket::new(Domain::IPV4, Type::DGRAM, None)
                .and_then(|s| set_mark(&s, Some(mark)))
                .map_err(|source| DnsError::Mark { mark, source })?;
        }
        Ok(Forwarder {
            upstreams,
            timeout,
            sockets: MarkedSockets {
                mark,
                handle: TokioHandle::default(),
            },
        })
    }

    /// The addresses upstream resolvers give for `host` (A and AAAA), for
    /// services whose endpoints are names (`resolution: DNS`). Asked of
    /// the upstreams directly, never of the mesh's own table, which would
    /// answer with the service's own address.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let name = hickory_proto::rr::Name::from_ascii(host)
            .map_err(|e| format!("{host:?} is not a DNS name: {e}"))?;
        let mut addresses = Vec::new();
        let mut failures = Vec::new();
        for kind in [
            hickory_proto::rr::RecordType::A,
            hickory_proto::rr::RecordType::AAAA,
        ] {
            let question = Question {
                query: Query::query(name.clone(), kind),
                recursion_desired: true,
                checking_disabled: false,
                edns: None,
                protocol: Protocol::Udp,
            };
            match self.forward(&question).await {
                Ok(answer) => {
                    addresses.extend(answer.answers.iter().filter_map(|r| match &r.data {
                        hickory_proto::rr::RData::A(a) => Some(IpAddr::V4(a.0)),
                        hickory_proto::rr::RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    }))
                }
                Err(e) => failures.push(e),
            }
        }
        if addresses.is_empty() && !failures.is_empty() {
            return Err(failures.join("; "));
        }
        Ok(addresses)
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The first upstream answer, with the upstream's id (the caller puts
    /// the client's back); `Err` with why each upstream failed.
    pub async fn forward(&self, question: &Question) -> Result<Message, String> {
        let mut failures = Vec::new();
        for upstream in &self.upstreams {
            let exchange = self.exchange(*upstream, question);
            match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => failures.push(format!("{upstream}: {e}")),
                Err(_) => failures.push(format!("{upstream}: no answer within {:?}", self.timeout)),
            }
        }
        Err(failures.join("; "))
    }

    async fn exchange(
        &self,
        upstream: SocketAddr,
        question: &Question,
    ) -> Result<Message, NetError> {
        // A new id, chosen at random, for the upstream query.
        let mut message = Message::query();
        message.metadata.recursion_desired = question.recursion_desired;
        message.metadata.checking_disabled = question.checking_disabled;
        message.add_query(question.query.clone());
        if let Some(client) = &question.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(client.max_payload().max(512));
            edns.set_dnssec_ok(client.flags().dnssec_ok);
            message.set_edns(edns);
        }
        let request = DnsRequest::new(message, DnsRequestOptions::default());
        let response = match question.protocol {
            Protocol::Tcp => {
                let (connect, sender) =
                    TcpClientStream::new(upstream, None, Some(self.timeout), self.sockets.clone());
                let multiplexer =
                    DnsMultiplexer::new(connect.await?, sender).with_timeout(self.timeout);
                let (exchange, background) = DnsExchange::<MarkedSockets>::from_stream(multiplexer);
                let mut responses = exchange.send(request);
                tokio::pin!(background);
                tokio::select! {
                    biased;
                    response = responses.next() => response,
                    // The connection ended: an answer that came first is
                    // still there to take.
                    () = &mut background => responses.next().await,
                }
            }
            _ => {
                let mut udp = UdpClientStream::builder(upstream, self.sockets.clone())
                    .with_timeout(Some(self.timeout))
                    .build();
                udp.send_message(request).next().await
            }
        };
        match response {
            Some(response) => Ok(response?.into_message()),
            None => Err(NetError::from("the upstream closed without answering")),
        }
    }
}

/// The `nameserver`s of a resolv.conf, on port 53, and its `timeout`.
pub fn resolv_conf(path: &Path) -> Result<(Vec<SocketAddr>, Duration), DnsError> {
    let text = std::fs::read(path).map_err(|source| DnsError::ResolvConf {
        path: path.to_owned(),
        reason: source.to_string(),
    })?;
    let config = resolv_conf::Config::parse(&text).map_err(|e| DnsError::ResolvConf {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let upstreams = config
        .nameservers
        .iter()
        .map(|ip| SocketAddr::new(IpAddr::from(ip), 53))
        .collect();
    Ok((
        upstreams,
        Duration::from_secs(u64::from(config.timeout.max(1))),
    ))
}

/// The sockets of the forwarder's queries: made by meshward, each with the
/// proxy's mark when one is configured.
#[derive(Clone)]
pub(crate) struct MarkedSockets {
    mark: Option<u32>,
    handle: TokioHandle,
}

type Made<T> = Pin<Box<dyn Send + Future<Output = io::Result<T>>>>;

impl RuntimeProvider for MarkedSockets {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = tokio::net::UdpSocket;
    type Tcp = AsyncIoTokioAsStd<tokio::net::TcpStream>;

    fn create_handle(&self) -> TokioHandle {
        self.handle.clone()
    }

    fn connect_tcp(
        &self,
        server: SocketAddr,
        bind: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> Made<Self::Tcp> {
        let mark = self.mark;
        Box::pin(async move {
            let socket = Socket::new(Domain::for_address(server), Type::STREAM, None)?;
            set_mark(&socket, mark)?;
            socket.set_nonblocking(true)?;
            socket.set_tcp_nodelay(true)?;
            if let Some(bind) = bind {
                socket.bind(&bind.into())?;
            }
            let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
            let wait_for = wait_for.unwrap_or(Duration::from_secs(5));
            match tokio::time::timeout(wait_for, socket.connect(server)).await {
                Ok(stream) => Ok(AsyncIoTokioAsStd(stream?)),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {server}: no answer within {wait_for:?}"),
                )),
            }
        })
    }

    fn bind_udp(&self, local: SocketAddr, _server: SocketAddr) -> Made<Self::Udp> {
        let mark = self.mark;
        Box::pin(async move {
            let socket = Socket::new(Domain::for_address(local), Type::DGRAM, None)?;
            set_mark(&socket, mark)?;
            socket.set_nonblocking(true)?;
            socket.bind(&local.into())?;
            tokio::net::UdpSocket::from_std(socket.into())
        })
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_mark(socket: &Socket, mark: Option<u32>) -> io::Result<()> {
    match mark {
        Some(mark) => socket.set_mark(mark),
        None => Ok(()),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_mark(_: &Socket, mark: Option<u32>) -> io::Result<()> {
    match mark {
        Some(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "socket marks (SO_MARK) exist on Linux only",
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_on_port_53() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver 2001:db8::53\noptions timeout:2 ndots:5\n",
        )
        .unwrap();
        let (upstreams, timeout) = resolv_conf(&path).unwrap();
        assert_eq!(
            upstreams,
            [
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
        assert_eq!(timeout, Duration::from_secs(2));
        let missing = resolv_conf(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    /// Setting a mark needs CAP_NET_ADMIN: as root (CI), every socket the
    /// forwarder makes carries it; otherwise the forwarder refuses to start.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn every_forwarder_socket_carries_the_mark() {
        const MARK: u32 = 0x539;
        let upstream = vec!["127.0.0.1:53".parse().unwrap()];
        let forwarder = match Forwarder::new(upstream, Duration::from_secs(1), Some(MARK)) {
            Ok(f) => f,
            Err(DnsError::Mark { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                eprintln!("skipped: setting SO_MARK needs CAP_NET_ADMIN ({source})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let sockets = forwarder.sockets.clone();
        let udp = sockets
            .bind_udp(
                "127.0.0.1:0".parse().unwrap(),
                "127.0.0.1:53".parse().unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(socket2::SockRef::from(&udp).mark().unwrap(), MARK);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = sockets
            .connect_tcp(listener.local_addr().unwrap(), None, None)
            .await
            .unwrap();
        assert_eq!(socket2::SockRef::from(&tcp.0).mark().unwrap(), MARK);
        // Without a mark, none is set.
        let plain = Forwarder::new(
            vec!["127.0.0.1:53".parse().unwrap()],
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        let udp = plain
            .sockets
            .bind_udp(
                "127.0.0.1:0".parse().unwrap(),
                "127.0.0.1:53".parse().unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(socket2::SockRef::from(&udp).mark().unwrap(), 0);
    }
}
