//! The ingress gateway (`meshward gateway`): the perimeter proxy where
//! traffic from outside meets the mesh. It is a proxy like the sidecar —
//! the same identity agent, control-plane stream, policy engine, logs and
//! outbound mutual TLS with secure naming and balancing — whose listeners
//! are the ports of the Gateways that select its labels, whose TLS is the
//! operator's ([`tls`]), and whose requests are routed by the
//! VirtualServices bound to those Gateways ([`routes`], [`request`]).
//!
//! The control plane sends every Gateway and VirtualService; the gateway
//! keeps those that select it, builds a [`routes::Table`] (a server whose
//! certificate does not load is kept, refusing handshakes until it does,
//! so one missing credential never holds back the rest), then binds the ports
//! the new table names and closes those it no longer names.

pub mod request;
pub mod routes;
pub mod tls;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshward_policy::api::{Gateway as GatewayObject, VirtualService};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::transparent::Routes;
use crate::{Proxy, Shared};
use request::Conn;
use routes::{Credentials, PortProtocol, Table};

/// How the gateway is run.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The address every port listens on.
    pub listen: IpAddr,
    /// Gateway port number → the local port that serves it (0: any free
    /// one). A port not named here is served on its own number.
    pub port_map: BTreeMap<u16, u16>,
    /// Where `credentialName` credentials are (`NAME.crt`, `NAME.key`,
    /// `NAME-cacert.crt`).
    pub credentials_dir: Option<PathBuf>,
    /// How often certificate files are looked at for changes.
    pub reload_interval: Duration,
}

/// One listening port.
struct Listening {
    addr: SocketAddr,
    stop: CancellationToken,
}

/// A running gateway.
pub struct Gateway {
    config: GatewayConfig,
    shared: Arc<Shared>,
    /// Every service of the mesh, by host: where routes send requests.
    pub services: Arc<Routes>,
    table: RwLock<Arc<Table>>,
    listening: Mutex<BTreeMap<u16, Listening>>,
    tracker: TaskTracker,
    bound: watch::Sender<BTreeMap<u16, SocketAddr>>,
}

impl Gateway {
    /// A gateway serving through `proxy`'s identity, policies, logs and
    /// drain. It listens on nothing until its first configuration.
    pub fn start(proxy: &Proxy, config: GatewayConfig) -> Arc<Gateway> {
        let shared = proxy.shared.clone();
        let services = Arc::new(Routes::new(
            shared.identity.clone(),
            shared.limits.connect_timeout,
            None,
            shared.metrics.clone(),
        ));
        let gateway = Arc::new(Gateway {
            config,
            shared,
            services,
            table: RwLock::new(Arc::new(Table::default())),
            listening: Mutex::new(BTreeMap::new()),
            tracker: proxy.tracker.clone(),
            bound: watch::channel(BTreeMap::new()).0,
        });
        tokio::spawn(gateway.clone().reload_certificates());
        gateway
    }

    /// The table in force.
    pub fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Gateway port number → the address serving it; changes with the
    /// configuration.
    pub fn bound(&self) -> watch::Receiver<BTreeMap<u16, SocketAddr>> {
        self.bound.subscribe()
    }

    /// Builds the table for these objects and the gateway's `labels`
    /// without putting anything in force.
    pub fn prepare(
        &self,
        gateways: &[GatewayObject],
        virtual_services: &[VirtualService],
        labels: &BTreeMap<String, String>,
    ) -> Result<Table, String> {
        routes::compile(
            gateways,
            virtual_services,
            labels,
            &Credentials {
                dir: self.config.credentials_dir.as_deref(),
            },
            &self.table(),
        )
    }

    /// Puts `table` in force: binds the ports it names that are not bound
    /// yet (a port that cannot be bound is logged and left out) and stops
    /// listening on the others; open connections carry on.
    pub fn commit(self: &Arc<Self>, table: Table) {
        for problem in &table.problems {
            tracing::error!("gateway: {problem}");
        }
        let wanted: Vec<u16> = table.ports.keys().copied().collect();
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        let mut listening = self
            .listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        listening.retain(|port, l| {
            let keep = wanted.contains(port);
            if !keep {
                l.stop.cancel();
                tracing::info!(port, addr = %l.addr, "gateway port closed: no server names it");
            }
            keep
        });
        for port in wanted {
            if listening.contains_key(&port) {
                continue;
            }
            let local = self.config.port_map.get(&port).copied().unwrap_or(port);
            let addr = SocketAddr::new(self.config.listen, local);
            match bind(addr) {
                Ok(listener) => {
                    let addr = listener.local_addr().unwrap_or(addr);
                    let stop = CancellationToken::new();
                    self.tracker
                        .spawn(self.clone().accept(listener, port, stop.clone()));
                    listening.insert(port, Listening { addr, stop });
                }
                Err(e) => tracing::error!(
                    port,
                    %addr,
                    "gateway port cannot be bound ({e}): its servers are not served"
                ),
            }
        }
        let bound = listening.iter().map(|(p, l)| (*p, l.addr)).collect();
        self.bound.send_replace(bound);
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, port: u16, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => return,
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    self.tracker.spawn(self.clone().serve(tcp, peer, port));
                }
                Err(e) => {
                    tracing::warn!("gateway accept failed: {e}");
                    // Out of file descriptors and the like: pause rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// One connection: TLS by SNI for an HTTPS port, then HTTP/1.1 or
    /// HTTP/2.
    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, port: u16) {
        let _ = tcp.set_nodelay(true);
        let local_ip = tcp.local_addr().ok().map(|a| a.ip());
        let table = self.table();
        let Some(served) = table.ports.get(&port) else {
            return;
        };
        let mut conn = Conn {
            port,
            https: served.protocol == PortProtocol::Https,
            sni: None,
            peer_addr: peer,
            local_ip,
            client_cert_sha256: None,
        };
        if !conn.https {
            return self.serve_http(tcp, conn).await;
        }
        let handshake = async {
            let acceptor =
                tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
            let start = acceptor.await.map_err(|e| e.to_string())?;
            let sni = start.client_hello().server_name().map(str::to_owned);
            let server = Table::server_for_sni(served, sni.as_deref())
                .ok_or_else(|| format!("no server for SNI {sni:?}"))?;
            let config = server
                .tls
                .as_ref()
                .and_then(|t| t.config())
                .ok_or("the server's certificate has not loaded")?;
            let stream = start.into_stream(config).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((stream, sni))
        };
        let (stream, sni) =
            match tokio::time::timeout(self.shared.limits.handshake_timeout, handshake).await {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, port, "gateway TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, port, "gateway TLS handshake timed out");
                    return;
                }
            };
        conn.sni = sni;
        conn.client_cert_sha256 = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(crate::identity::fingerprint);
        self.serve_http(stream, conn).await;
    }

    async fn serve_http<S>(self: Arc<Self>, stream: S, conn: Conn)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = Arc::new(conn);
        let shared = self.shared.clone();
        let service =
            hyper::service::service_fn(move |req| request::handle(req, conn.clone(), self.clone()));
        crate::serve_http(&shared, TokioIo::new(stream), service).await;
    }

    /// Looks at the certificate files of every HTTPS server, and puts a
    /// changed one in force for new handshakes.
    async fn reload_certificates(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let table = self.table();
            for server in table.ports.values().flat_map(|p| &p.servers) {
                let Some(tls) = &server.tls else { continue };
                match tls.reload() {
                    None => {}
                    Some(Ok(())) => tracing::info!(
                        gateway = %server.gateway,
                        cert = %tls.source.cert.display(),
                        "gateway certificate reloaded"
                    ),
                    Some(Err(e)) => tracing::error!(
                        gateway = %server.gateway,
                        "gateway certificate not reloaded, the previous one stays in force: {e}"
                    ),
                }
            }
        }
    }
}

/// A listener with `SO_REUSEADDR`, so a restarted gateway rebinds at once.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
