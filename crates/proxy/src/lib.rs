//! `meshward proxy`: the policy enforcement point beside each workload.
//!
//! Data flows one way: a listener accepts a connection and hands it, with
//! its destination, to [`inbound`] or [`outbound`]; those settle the
//! transport (mutual TLS, [`identity`]), detect the protocol ([`sniff`]),
//! ask the policy engine ([`meshward_policy`]) through the [`policies`] in
//! force, and [`forward`] to the application or the next workload.
//! Decisions are written to the access and audit logs ([`log`]) and counted
//! ([`metrics`]); [`admin`] serves both.

#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod control;
pub mod dns;
pub mod ext_authz;
pub mod facts;
pub mod forward;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod io;
pub mod jwks;
pub mod log;
pub mod metrics;
pub mod outbound;
pub mod policies;
pub mod report;
pub mod revocation;
pub mod sniff;
pub mod socket;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transparent;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Limits, ProxyConfig, UpstreamTls};
use crate::ext_authz::ExtAuthz;
use crate::identity::WorkloadIdentity;
use crate::inbound::InboundTarget;
use crate::log::{LogSink, LogTarget, Logs};
use crate::metrics::Metrics;
use crate::outbound::OutboundTarget;
use crate::policies::PolicyStore;

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listening on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: String,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("opening the {what} log {target:?}: {source}")]
    Log {
        what: &'static str,
        target: LogTarget,
        source: std::io::Error,
    },
    #[error("upstream {0}: the service name is not a valid TLS server name")]
    ServerName(String),
    #[error("DNS proxy: {0}")]
    Dns(#[from] dns::DnsError),
}

/// Where the access and audit logs go, and what their inbound records keep.
#[derive(Debug, Clone)]
pub struct LogTargets {
    pub access: LogTarget,
    pub audit: LogTarget,
    pub facts: facts::FactSettings,
}

/// A listener as `/config_dump` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerInfo {
    pub address: SocketAddr,
    /// `inbound|PORT` or `outbound|PORT|HOST`.
    pub name: String,
    pub forward_to: Vec<String>,
    pub protocol: &'static str,
    /// `mutual`, or `disable` for plaintext upstreams; peer authentication
    /// decides inbound.
    pub tls: &'static str,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Listeners {
    pub inbound: Vec<ListenerInfo>,
    pub outbound: Vec<ListenerInfo>,
    /// The DNS proxy's addresses, each UDP and TCP.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<SocketAddr>,
}

/// What every connection of a proxy shares.
pub struct Shared {
    pub identity: WorkloadIdentity,
    server_tls: Arc<rustls::ServerConfig>,
    pub policies: PolicyStore,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub logs: Logs,
    ext_authz: ExtAuthz,
    /// Draining: stop accepting, finish in-flight HTTP requests.
    shutdown: CancellationToken,
    /// The grace period is over: close whatever is still open.
    stop_now: CancellationToken,
    http: auto::Builder<TokioExecutor>,
    pub listeners: Listeners,
    /// Transparent mode's routing table, which the control plane fills.
    pub routes: Option<Arc<transparent::Routes>>,
    dns: Option<dns::DnsState>,
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    outbound: Vec<Arc<OutboundTarget>>,
    tracker: TaskTracker,
    drain_grace: Duration,
    pub admin_address: Option<SocketAddr>,
}

impl Proxy {
    /// Binds every listener (failing before serving anything if one cannot
    /// be bound) and starts serving.
    pub async fn start(
        config: ProxyConfig,
        identity: WorkloadIdentity,
        policies: PolicyStore,
        logs: LogTargets,
    ) -> Result<Proxy, ProxyError> {
        let metrics = Arc::new(Metrics::default());
        // Istio's labels name this workload by its configuration until the
        // control plane says which WorkloadEntry it is.
        (metrics.istio).set_local(
            &identity.id,
            &config.workload.namespace,
            &config.workload.labels,
            None,
        );
        let open = |what, target: &LogTarget| {
            LogSink::open(target, metrics.log_records_dropped.clone()).map_err(|source| {
                ProxyError::Log {
                    what,
                    target: target.clone(),
                    source,
                }
            })
        };
        let logs = Logs {
            access: open("access", &logs.access)?.reporting(logs.facts.report.clone()),
            audit: open("audit", &logs.audit)?,
            facts: logs.facts,
        };
        let limits = config.limits;
        let bind = |addr: SocketAddr, what: String| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Bind { addr, what, source })
        };

        let mut listeners = Listeners::default();
        let mut inbound = Vec::new();
        for port in &config.inbound {
            let listener = bind(port.listen, format!("inbound|{}", port.port)).await?;
            let address = listener.local_addr().unwrap_or(port.listen);
            let mut port = port.clone();
            if port.port == 0 {
                // Listening on port 0 with no policy port given: policies
                // name the port the system chose.
                port.port = address.port();
            }
            let name = format!("inbound|{}", port.port);
            listeners.inbound.push(ListenerInfo {
                address,
                name,
                forward_to: vec![port.app.to_string()],
                protocol: port.protocol.as_str(),
                tls: "peer-authentication",
            });
            let target = InboundTarget::new(
                port,
                None,
                limits.connect_timeout,
                socket::Dial {
                    mark: config.mark,
                    inbound_source: false,
                },
                metrics.clone(),
            );
            inbound.push((listener, Arc::new(target)));
        }
        let mut outbound = Vec::new();
        for upstream in &config.upstreams {
            let name = format!("outbound|{}|{}", upstream.port, upstream.service);
            let listener = bind(upstream.listen, name.clone()).await?;
            let target = OutboundTarget::new(
                upstream,
                &identity,
                limits.connect_timeout,
                socket::Dial {
                    mark: config.mark,
                    inbound_source: false,
                },
                &metrics,
            )?;
            listeners.outbound.push(ListenerInfo {
                address: listener.local_addr().unwrap_or(upstream.listen),
                name,
                forward_to: upstream.endpoints.iter().map(ToString::to_string).collect(),
                protocol: upstream.protocol.as_str(),
                tls: match upstream.tls {
                    UpstreamTls::IstioMutual => "mutual",
                    UpstreamTls::Disable => "disable",
                },
            });
            outbound.push((listener, Arc::new(target)));
        }
        let routes = config.transparent.as_ref().map(|_| {
            Arc::new(transparent::Routes::new(
                identity.clone(),
                limits.connect_timeout,
                config.mark,
                metrics.clone(),
            ))
        });
        let mut captured = Vec::new();
        if let Some(transparent) = &config.transparent {
            let lists = [
                (&transparent.outbound, "outbound-capture", false),
                (&transparent.inbound, "inbound-capture", true),
            ];
            for (addrs, name, inbound) in lists {
                for &addr in addrs {
                    let listener = transparent::bind(addr).map_err(|source| ProxyError::Bind {
                        addr,
                        what: name.into(),
                        source,
                    })?;
                    let Some(listener) = listener else {
                        tracing::info!(%addr, "no IPv6 here: {name} listens on IPv4 only");
                        continue;
                    };
                    let info = ListenerInfo {
                        address: listener.local_addr().unwrap_or(addr),
                        name: name.into(),
                        forward_to: vec!["original destination".into()],
                        protocol: "auto",
                        tls: if inbound {
                            "peer-authentication"
                        } else {
                            "mutual"
                        },
                    };
                    if inbound {
                        listeners.inbound.push(info);
                    } else {
                        listeners.outbound.push(info);
                    }
                    captured.push((listener, inbound));
                }
            }
        }
        let admin = match config.admin {
            Some(addr) => Some(bind(addr, "admin".into()).await?),
            None => None,
        };
        let dns = match &config.dns {
            Some(dns_config) => {
                let names =
                    dns::DnsNames::new(&config.workload.namespace, dns_config.await_services);
                let server =
                    dns::DnsServer::bind(dns_config, names.clone(), metrics.clone()).await?;
                listeners.dns = server.addresses().to_vec();
                Some((server.state(names), server))
            }
            None => None,
        };
        let (dns_state, dns_server) = dns.unzip();

        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .max_headers(limits.max_headers);
        // HTTP/2 peers that vanish are found by pings.
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        let shared = Arc::new(Shared {
            server_tls: identity.server_config()?,
            identity,
            policies,
            limits,
            metrics,
            logs,
            ext_authz: ExtAuthz::new(
                ext_authz::MeshServices {
                    upstreams: outbound.iter().map(|(_, t)| t.clone()).collect(),
                    routes: routes.clone(),
                },
                socket::Dial {
                    mark: config.mark,
                    inbound_source: false,
                },
            ),
            shutdown: CancellationToken::new(),
            stop_now: CancellationToken::new(),
            http,
            listeners,
            routes: routes.clone(),
            dns: dns_state,
        });

        let tracker = TaskTracker::new();
        let outbound_targets: Vec<Arc<OutboundTarget>> =
            outbound.iter().map(|(_, t)| t.clone()).collect();
        for (listener, target) in inbound {
            let shared = shared.clone();
            let conns = tracker.clone();
            tracker.spawn(accept_loop(listener, shared.clone(), move |tcp, peer| {
                conns.spawn(inbound::serve(tcp, peer, target.clone(), shared.clone()));
            }));
        }
        for (listener, target) in outbound {
            let shared = shared.clone();
            let conns = tracker.clone();
            tracker.spawn(accept_loop(listener, shared.clone(), move |tcp, peer| {
                conns.spawn(outbound::serve(
                    tcp,
                    peer,
                    outbound::Route::One(target.clone()),
                    shared.clone(),
                ));
            }));
        }
        if let Some(routes) = &routes {
            // Services whose endpoints are names are resolved through the
            // upstream resolvers (the DNS proxy's, else resolv.conf's).
            let upstreams = config
                .dns
                .as_ref()
                .map(|d| d.upstreams.clone())
                .filter(|u| !u.is_empty())
                .map(Ok)
                .unwrap_or_else(|| {
                    dns::forwarder::resolv_conf(std::path::Path::new(dns::RESOLV_CONF))
                        .map(|(upstreams, _)| upstreams)
                });
            match upstreams
                .and_then(|u| dns::Forwarder::new(u, Duration::from_secs(5), config.mark))
            {
                Ok(resolver) => {
                    tokio::spawn(
                        routes
                            .clone()
                            .resolve_names(resolver, shared.shutdown.clone()),
                    );
                }
                Err(e) => {
                    tracing::warn!("services whose endpoints are DNS names cannot be resolved: {e}")
                }
            }
            for (listener, inbound) in captured {
                let shared = shared.clone();
                let conns = tracker.clone();
                let routes = routes.clone();
                tracker.spawn(accept_loop(listener, shared.clone(), move |tcp, peer| {
                    if inbound {
                        conns.spawn(transparent::serve_inbound(
                            tcp,
                            peer,
                            routes.clone(),
                            shared.clone(),
                        ));
                    } else {
                        conns.spawn(transparent::serve_outbound(
                            tcp,
                            peer,
                            routes.clone(),
                            shared.clone(),
                        ));
                    }
                }));
            }
        }
        if let Some(server) = dns_server {
            tracker.spawn(server.serve(shared.shutdown.clone()));
        }
        let admin_address = match admin {
            Some(listener) => {
                let addr = listener.local_addr().ok();
                tokio::spawn(admin::serve(listener, shared.clone()));
                addr
            }
            None => None,
        };
        Ok(Proxy {
            shared,
            outbound: outbound_targets,
            tracker,
            drain_grace: config.drain_grace,
            admin_address,
        })
    }

    pub fn policies(&self) -> &PolicyStore {
        &self.shared.policies
    }

    /// The services this workload calls, for the control plane to route.
    pub fn outbound(&self) -> &[Arc<OutboundTarget>] {
        &self.outbound
    }

    /// Transparent mode's routing table; `None` in explicit mode.
    pub fn routes(&self) -> Option<Arc<transparent::Routes>> {
        self.shared.routes.clone()
    }

    /// The names the DNS proxy answers, for the control plane to update;
    /// `None` without a DNS proxy.
    pub fn dns(&self) -> Option<&dns::DnsNames> {
        self.shared.dns.as_ref().map(|d| &d.names)
    }

    pub fn identity(&self) -> &WorkloadIdentity {
        &self.shared.identity
    }

    pub fn listeners(&self) -> &Listeners {
        &self.shared.listeners
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Stops accepting, lets in-flight HTTP requests finish and asks HTTP
    /// connections to close, then waits up to the grace period for every
    /// connection to end. Returns whether all ended in time.
    pub async fn shutdown(self) -> bool {
        self.shared.shutdown.cancel();
        self.tracker.close();
        let drained = tokio::time::timeout(self.drain_grace, self.tracker.wait())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(grace = ?self.drain_grace, "connections still open after the drain grace period; closing them");
            self.shared.stop_now.cancel();
            // Closing is immediate; the bound only guards against a stuck task.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
        }
        // The last connections' records, before the process exits.
        self.shared.logs.flush();
        drained
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    on_accept: impl Fn(tokio::net::TcpStream, SocketAddr),
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => on_accept(tcp, peer),
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection until it ends, or until
/// shutdown, when it finishes in-flight requests and closes.
async fn serve_http<I, S>(shared: &Shared, io: I, service: S)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            ::http::Request<Incoming>,
            Response = ::http::Response<crate::http::Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = shared.http.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("HTTP connection ended: {e}");
            }
        }
        _ = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shared.stop_now.cancelled() => {}
            }
        }
    }
}
