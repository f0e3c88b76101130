//! Traffic to this workload: peer authentication, then HTTP or TCP handling
//! with request authentication and authorization, then the application.
//!
//! [`serve`] takes an accepted connection and its [`InboundTarget`] — the
//! workload port it is for — not a listener: explicit listeners resolve the
//! target from the port they own, and transparent capture can resolve it from
//! the original destination without changing anything here.

pub(crate) mod http;
mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use meshward_policy::api::MtlsMode;
use meshward_policy::{Connection, Stage};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::Shared;
use crate::config::{InboundPort, Protocol};
use crate::forward::HttpPools;
use crate::identity::{Peer, handshake_failure};
use crate::io::{Rewind, read_prefix};
use crate::log::AccessRecord;
use crate::metrics::{DecisionLabels, Direction};
use crate::sniff::{self, Transport};

/// One workload port and the way to its application.
pub struct InboundTarget {
    pub port: InboundPort,
    pub app: HttpPools,
    pub connector: crate::forward::Connector,
    /// The address peers connected to, when it is not the listener's own
    /// (a captured connection's original destination).
    pub destination_ip: Option<std::net::IpAddr>,
    /// `inbound|PORT` and the application's address, as records name them.
    log_names: (Arc<str>, Arc<str>),
}

impl InboundTarget {
    /// A target forwarding to `port.app`, dialing with `dial`.
    pub fn new(
        port: InboundPort,
        destination_ip: Option<std::net::IpAddr>,
        timeout: std::time::Duration,
        dial: crate::socket::Dial,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> InboundTarget {
        let connector =
            crate::forward::Connector::new(vec![port.app], None, timeout, dial, metrics);
        InboundTarget {
            app: HttpPools::new(connector.clone(), connector.clone(), port.protocol),
            connector,
            log_names: (
                format!("inbound|{}", port.port).into(),
                port.app.to_string().into(),
            ),
            port,
            destination_ip,
        }
    }
}

/// What is known about a connection once its transport is settled.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub connection: Connection,
    pub peer_addr: SocketAddr,
    /// The verified mTLS peer; `None` for plaintext.
    pub peer: Option<Peer>,
    pub started: Instant,
    pub start_time: SystemTime,
}

impl ConnInfo {
    /// The connection's two ends as a CUSTOM authorizer is told them.
    pub fn peers(&self, identity: &crate::identity::WorkloadIdentity) -> crate::ext_authz::Peers {
        let destination = SocketAddr::new(
            self.connection
                .destination_ip
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            self.connection.destination_port,
        );
        crate::ext_authz::Peers {
            source: self.peer_addr,
            source_principal: self.peer.as_ref().map(|p| p.id.clone()),
            destination,
            destination_principal: identity.id.to_string(),
        }
    }

    fn record(&self, target: &InboundTarget, protocol: &'static str, version: u64) -> AccessRecord {
        let mut record = AccessRecord::new(
            self.start_time,
            Direction::Inbound,
            protocol,
            self.peer_addr,
            target.log_names.0.clone(),
        );
        record.source_principal = self.peer.as_ref().map(|p| p.id.clone());
        record.upstream = Some(target.log_names.1.clone());
        record.config_version = version;
        record
    }
}

/// Serves one accepted connection to `target`.
pub async fn serve(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    target: Arc<InboundTarget>,
    shared: Arc<Shared>,
) {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let start_time = SystemTime::now();
    let port = target.port.port;
    let mode = shared.policies.current().policy.mtls.mode_for_port(port);
    // STRICT needs no look: anything but the mesh's TLS fails it. The other
    // modes look without consuming: the mesh's mutual TLS is terminated; an
    // application's own TLS and plaintext pass through as plaintext peers.
    let tls = match mode {
        MtlsMode::Strict => true,
        _ => match sniff::transport(
            &tcp,
            shared.limits.detection_timeout,
            shared.limits.handshake_timeout,
        )
        .await
        {
            None => return,
            Some(transport) => transport == Transport::MeshTls,
        },
    };
    let mut info = ConnInfo {
        connection: Connection {
            source_ip: Some(peer_addr.ip()),
            source_principal: None,
            destination_ip: target
                .destination_ip
                .or_else(|| tcp.local_addr().ok().map(|a| a.ip())),
            destination_port: port,
            sni: None,
        },
        peer_addr,
        peer: None,
        started,
        start_time,
    };
    if !tls {
        if admit(&info, &target, &shared) {
            dispatch(tcp, info, target, shared).await;
        }
        return;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.server_tls.clone());
    let stream =
        match tokio::time::timeout(shared.limits.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let reason = handshake_failure(&e);
                shared.metrics.handshake(Direction::Inbound, reason);
                tracing::debug!(peer = %peer_addr, port, "inbound TLS handshake failed: {e}");
                let reason = match reason {
                    // Plaintext on a STRICT port: said as the engine words it.
                    "not_tls" => match shared
                        .policies
                        .current()
                        .policy
                        .admit_connection(&info.connection)
                    {
                        Err(refusal) => refusal,
                        Ok(_) => format!("TLS handshake failed (not TLS): {e}"),
                    },
                    _ => format!("TLS handshake failed ({reason}): {e}"),
                };
                refuse(&info, &target, &shared, mode, reason);
                return;
            }
            Err(_) => {
                shared.metrics.handshake(Direction::Inbound, "timeout");
                refuse(
                    &info,
                    &target,
                    &shared,
                    mode,
                    "TLS handshake timed out".into(),
                );
                return;
            }
        };
    shared.metrics.handshake(Direction::Inbound, "ok");
    let session = stream.get_ref().1;
    info.peer = Peer::of(session);
    // Lives as long as this connection is served.
    let _revocation = info.peer.as_ref().and_then(|peer| {
        crate::revocation::watch(
            stream.get_ref().0,
            peer,
            &shared.identity.revocations,
            Direction::Inbound,
            &shared.metrics,
        )
    });
    info.connection.sni = session.server_name().map(str::to_owned);
    info.connection.source_principal = info.peer.as_ref().map(|p| p.id.to_string());
    if admit(&info, &target, &shared) {
        dispatch(stream, info, target, shared).await;
    }
}

/// Peer authentication with the policies in force now.
fn admit(info: &ConnInfo, target: &InboundTarget, shared: &Shared) -> bool {
    let snapshot = shared.policies.current();
    match snapshot.policy.admit_connection(&info.connection) {
        Ok(_) => true,
        Err(reason) => {
            let mode = snapshot
                .policy
                .mtls
                .mode_for_port(info.connection.destination_port);
            refuse(info, target, shared, mode, reason);
            false
        }
    }
}

/// Logs and counts a connection refused before any byte reached the application.
fn refuse(
    info: &ConnInfo,
    target: &InboundTarget,
    shared: &Shared,
    mode: MtlsMode,
    reason: String,
) {
    let snapshot = shared.policies.current();
    let policy = snapshot
        .policy
        .mtls
        .source_for_port(info.connection.destination_port);
    shared
        .metrics
        .connections
        .get_or_create(&DecisionLabels {
            direction: Direction::Inbound,
            decision: "deny",
            policy: policy.clone(),
        })
        .inc();
    let mut record = info.record(target, "TCP", snapshot.version);
    record.decision = "deny";
    record.stage = Some(Stage::PeerAuthentication);
    record.policy = Some(policy);
    record.reason = Some(reason);
    record.mtls_mode = Some(mode.as_str());
    crate::facts::add(&mut record, shared, &snapshot.policy, info, None, None);
    record.duration_ms = info.started.elapsed().as_secs_f64() * 1e3;
    shared.logs.access.write(&record);
}

/// HTTP or TCP, by declaration or by the first bytes.
async fn dispatch<S>(mut stream: S, info: ConnInfo, target: Arc<InboundTarget>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match target.port.protocol {
        Protocol::Http | Protocol::Http2 => http::serve(stream, info, target, shared).await,
        Protocol::Tcp => tcp::serve(stream, info, target, shared).await,
        Protocol::Sniff => {
            let prefix = match read_prefix(
                &mut stream,
                sniff::MAX_PREFIX,
                sniff::decided,
                shared.limits.detection_timeout,
                shared.limits.handshake_timeout,
            )
            .await
            {
                Ok(p) => p,
                Err(_) => return,
            };
            let is_http = sniff::is_http(&prefix);
            let stream = Rewind::new(prefix, stream);
            if is_http {
                http::serve(stream, info, target, shared).await
            } else {
                tcp::serve(stream, info, target, shared).await
            }
        }
    }
}
