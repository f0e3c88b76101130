//! Traffic from this workload to a service it calls: the application
//! speaks plain HTTP or TCP to a local listener, and the proxy carries it
//! to one of the service's endpoints over mutual TLS, accepting the server
//! only if secure naming allows its identity. HTTP rides pooled connections.
//!
//! Like the inbound side, [`serve`] takes the destination ([`OutboundTarget`]),
//! not a listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshward_identity::error_chain;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::Shared;
use crate::balance::{Balancer, Picked};
use crate::config::{Protocol, Upstream, UpstreamTls};
use crate::forward::{Connector, HttpPools, MeshTls};
use crate::http::{
    Body, BodyEnd, BoxError, Counted, grpc_status_in, is_grpc, local_reply, logged_response_body,
    protocol_name, request_authority, set_upstream_target, strip_hop_by_hop,
};
use crate::identity::{ALPN_H2, ALPN_HTTP11, ServerIdentity, WorkloadIdentity};
use crate::io::{Metered, Rewind, read_prefix};
use crate::log::AccessRecord;
use crate::metrics::istio::{self, ResponseFlags, TrafficLabels};
use crate::metrics::{ConnDecisions, DecisionLabels, Direction};
use crate::sniff;
use crate::socket::Dial;

/// One service port the workload calls: its endpoints, each with its own
/// connection pools, so that every HTTP request (and every TCP connection)
/// is balanced on its own rather than riding whichever connection is idle.
pub struct OutboundTarget {
    pub upstream: Upstream,
    /// The endpoints in force. Replaced whole when the destination changes:
    /// connections pooled for old endpoints or identities are not used again.
    endpoints: std::sync::RwLock<Arc<Balancer<EndpointPools>>>,
    /// The endpoints and identities the current route was made for.
    destination: std::sync::Mutex<(Vec<SocketAddr>, Vec<meshward_identity::spiffe::SpiffeId>)>,
    /// Every connector of this target with the ALPN it offers (HTTP/1.1
    /// pool, HTTP/2 pool, TCP), so a new route reaches them all.
    routes: [(Connector, &'static [&'static [u8]]); 3],
    /// `outbound|PORT|SERVICE`, as records name it.
    log_name: Arc<str>,
    /// `SERVICE:PORT`: the authority of a request that names none.
    authority: String,
}

/// One endpoint of a target and the ways to reach it (clones share the
/// pools).
#[derive(Clone)]
pub struct EndpointPools {
    pub addr: SocketAddr,
    pub http: HttpPools,
    /// Raw connections (TCP), dialing this endpoint first.
    pub tcp: Connector,
}

impl OutboundTarget {
    pub fn new(
        upstream: &Upstream,
        identity: &WorkloadIdentity,
        timeout: std::time::Duration,
        dial: Dial,
        metrics: &Arc<crate::metrics::Metrics>,
    ) -> Result<OutboundTarget, crate::ProxyError> {
        const H1: &[&[u8]] = &[ALPN_HTTP11];
        const H2: &[&[u8]] = &[ALPN_H2];
        const TCP: &[&[u8]] = &[];
        let connector = |alpn: &[&[u8]]| -> Result<Connector, crate::ProxyError> {
            let tls = mesh_tls(upstream, identity, upstream.identities.clone(), alpn)?;
            Ok(Connector::new(
                upstream.endpoints.clone(),
                tls,
                timeout,
                dial,
                metrics.clone(),
            ))
        };
        let routes = [
            (connector(H1)?, H1),
            (connector(H2)?, H2),
            (connector(TCP)?, TCP),
        ];
        Ok(OutboundTarget {
            endpoints: std::sync::RwLock::new(balanced(
                &routes,
                upstream,
                &upstream.endpoints,
                None,
            )),
            log_name: format!("outbound|{}|{}", upstream.port, upstream.service).into(),
            authority: format!("{}:{}", upstream.service, upstream.port),
            upstream: upstream.clone(),
            destination: std::sync::Mutex::new((
                upstream.endpoints.clone(),
                upstream.identities.clone(),
            )),
            routes,
        })
    }

    /// An endpoint for one request or connection, busy while it is held;
    /// `None` when the service has no endpoint.
    pub fn pick(&self) -> Option<Picked<EndpointPools>> {
        self.endpoints
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pick()
    }

    /// A connector to the service's endpoints offering HTTP/2 (taken in
    /// turn, with the service's mutual TLS and secure naming): what a gRPC
    /// client of the proxy's own (a CUSTOM authorizer's) dials through.
    pub fn h2_connector(&self) -> Connector {
        self.routes[1].0.clone()
    }

    /// The endpoints in force.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.destination
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// Builds what [`OutboundTarget::set_destination`] puts in force: every
    /// TLS config for new endpoints and secure-naming identities. Nothing
    /// changes yet, so a failure leaves the target as it was.
    pub fn prepare_destination(
        &self,
        identity: &WorkloadIdentity,
        endpoints: Vec<SocketAddr>,
        identities: Vec<meshward_identity::spiffe::SpiffeId>,
    ) -> Result<Destination, crate::ProxyError> {
        let tls = [0, 1, 2].map(|i| {
            mesh_tls(
                &self.upstream,
                identity,
                identities.clone(),
                self.routes[i].1,
            )
        });
        let [a, b, c] = tls;
        Ok(Destination {
            endpoints,
            identities,
            tls: [a?, b?, c?],
        })
    }

    /// Endpoints and identities from the control plane. When they change,
    /// pooled connections are left to finish and new requests open
    /// connections checked against the new identities.
    pub fn set_destination(&self, destination: Destination) {
        let mut current = self
            .destination
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 == destination.endpoints && current.1 == destination.identities {
            return;
        }
        for ((connector, _), tls) in self.routes.iter().zip(destination.tls) {
            connector.set_route(destination.endpoints.clone(), tls);
        }
        let mut endpoints = self
            .endpoints
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Same identities: the endpoints that stay keep their pooled
        // connections (checked against those identities already).
        let keep = (current.1 == destination.identities).then(|| endpoints.clone());
        *endpoints = balanced(
            &self.routes,
            &self.upstream,
            &destination.endpoints,
            keep.as_deref(),
        );
        drop(endpoints);
        *current = (destination.endpoints, destination.identities);
    }
}

/// Pools per endpoint, each dialing its endpoint first (another only when
/// that one refuses); those of `keep` are reused for the endpoints it has.
fn balanced(
    routes: &[(Connector, &'static [&'static [u8]]); 3],
    upstream: &Upstream,
    endpoints: &[SocketAddr],
    keep: Option<&Balancer<EndpointPools>>,
) -> Arc<Balancer<EndpointPools>> {
    let [(h1, _), (h2, _), (tcp, _)] = routes;
    let pools = endpoints
        .iter()
        .map(|&addr| {
            keep.and_then(|b| b.values().find(|p| p.addr == addr).cloned())
                .unwrap_or_else(|| EndpointPools {
                    addr,
                    http: HttpPools::new(h1.pinned(addr), h2.pinned(addr), upstream.protocol),
                    tcp: tcp.pinned(addr),
                })
        })
        .collect();
    Arc::new(Balancer::new(upstream.lb, pools))
}

/// A destination ready to be put in force.
pub struct Destination {
    endpoints: Vec<SocketAddr>,
    identities: Vec<meshward_identity::spiffe::SpiffeId>,
    tls: [Option<MeshTls>; 3],
}

/// Mutual TLS to `upstream` accepting only `identities`, offering `alpn`;
/// `None` for `tls=DISABLE`.
fn mesh_tls(
    upstream: &Upstream,
    identity: &WorkloadIdentity,
    identities: Vec<meshward_identity::spiffe::SpiffeId>,
    alpn: &[&[u8]],
) -> Result<Option<MeshTls>, crate::ProxyError> {
    match upstream.tls {
        UpstreamTls::Disable => Ok(None),
        UpstreamTls::IstioMutual => Ok(Some(MeshTls {
            connector: tokio_rustls::TlsConnector::from(identity.client_config(identities, alpn)?),
            server_name: rustls::pki_types::ServerName::try_from(upstream.service.clone())
                .map_err(|_| crate::ProxyError::ServerName(upstream.name()))?,
            revocations: identity.revocations.clone(),
        })),
    }
}

impl OutboundTarget {
    /// Istio's labels for traffic to this service, answered by `server`.
    pub(crate) fn istio_labels(
        &self,
        shared: &Shared,
        server: Option<&str>,
        protocol: istio::Protocol,
    ) -> TrafficLabels {
        (shared.metrics.istio).outbound(&self.upstream.service, server, self.mutual_tls(), protocol)
    }

    fn mutual_tls(&self) -> bool {
        self.upstream.tls == UpstreamTls::IstioMutual
    }
}

/// Where an application's connection goes: one service port, or — when
/// several services share the address it called — the one its HTTP `Host`
/// names (TCP, which names none, goes to the first).
#[derive(Clone)]
pub enum Route {
    One(Arc<OutboundTarget>),
    ByHost(Arc<[Arc<OutboundTarget>]>),
}

impl Route {
    /// The target a connection or request without a matching host uses.
    fn first(&self) -> &Arc<OutboundTarget> {
        match self {
            Route::One(target) => target,
            // Never built empty (see the transparent routing table).
            Route::ByHost(targets) => &targets[0],
        }
    }

    fn protocol(&self) -> Protocol {
        match self {
            Route::One(target) => target.upstream.protocol,
            Route::ByHost(targets) => {
                let first = targets[0].upstream.protocol;
                if targets.iter().all(|t| t.upstream.protocol == first) {
                    first
                } else {
                    Protocol::Sniff
                }
            }
        }
    }

    /// The target whose service the request's authority names: the host
    /// itself or a shorter form of it (`ratings.bookinfo` for
    /// `ratings.bookinfo.svc.cluster.local`).
    pub fn for_authority(&self, authority: Option<&str>) -> &Arc<OutboundTarget> {
        let Route::ByHost(targets) = self else {
            return self.first();
        };
        let host = authority
            .and_then(|a| a.parse::<http::uri::Authority>().ok())
            .map(|a| a.host().trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or_default();
        targets
            .iter()
            .find(|t| {
                let service = &t.upstream.service;
                *service == host
                    || (service.starts_with(&host)
                        && service.as_bytes().get(host.len()) == Some(&b'.'))
            })
            .unwrap_or(&targets[0])
    }
}

/// Serves one connection from the application to `route`.
pub async fn serve(mut tcp: TcpStream, peer: SocketAddr, route: Route, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    match route.protocol() {
        Protocol::Http | Protocol::Http2 => serve_http(tcp, peer, route, shared).await,
        Protocol::Tcp => serve_tcp(tcp, peer, route.first().clone(), shared).await,
        Protocol::Sniff => {
            let Ok(prefix) = read_prefix(
                &mut tcp,
                sniff::MAX_PREFIX,
                sniff::decided,
                shared.limits.detection_timeout,
                shared.limits.handshake_timeout,
            )
            .await
            else {
                return;
            };
            let is_http = sniff::is_http(&prefix);
            let stream = Rewind::new(prefix, tcp);
            if is_http {
                serve_http(stream, peer, route, shared).await
            } else {
                serve_tcp(stream, peer, route.first().clone(), shared).await
            }
        }
    }
}

fn record(target: &OutboundTarget, peer: SocketAddr, protocol: &'static str) -> AccessRecord {
    AccessRecord::new(
        SystemTime::now(),
        Direction::Outbound,
        protocol,
        peer,
        target.log_name.clone(),
    )
}

async fn serve_http<S>(stream: S, peer: SocketAddr, route: Route, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = Arc::new(HttpConnection {
        peer,
        requests: Default::default(),
        decisions: Default::default(),
    });
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let target = route
                .for_authority(
                    request
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .or_else(|| request.uri().authority().map(|a| a.as_str())),
                )
                .clone();
            handle(request, connection.clone(), target, shared.clone())
        })
    };
    crate::serve_http(&shared, TokioIo::new(stream), service).await;
}

/// One application connection: its address, and the metric handles its
/// requests reuse.
struct HttpConnection {
    peer: SocketAddr,
    requests: istio::ConnRequests,
    decisions: ConnDecisions,
}

async fn handle(
    request: Request<Incoming>,
    connection: Arc<HttpConnection>,
    target: Arc<OutboundTarget>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let grpc = is_grpc(request.headers());
    let protocol = istio::Protocol::http(grpc);
    let logging = shared.logs.access.is_enabled();
    let mut record = record(&target, connection.peer, protocol_name(request.version()));
    // A reply of the proxy's own, counted as Istio counts requests.
    let reply = |flags: ResponseFlags,
                 response: Response<Body>,
                 request_bytes: u64|
     -> Result<Response<Body>, Infallible> {
        let traffic = target
            .istio_labels(&shared, None, protocol)
            .with_flags(flags);
        let elapsed = started.elapsed();
        (shared.metrics.istio).local_reply(traffic, &response, elapsed, request_bytes);
        Ok(response)
    };
    let (parts, body) = request.into_parts();
    // The path and query as the application sent them (the URI is replaced).
    let target_path = parts.uri.path_and_query().cloned();
    let target_path = target_path.as_ref().map_or("/", |pq| pq.as_str());
    let path = meshward_policy::authz::normalize::strip_query(target_path);
    if logging {
        record.method = Some(parts.method.to_string());
        record.path = Some(path.to_owned());
    }
    let request_view = Request::from_parts(parts, ());
    let authority = request_authority(&request_view, Some(&target.authority)).ok();
    let (mut parts, ()) = request_view.into_parts();
    let Some(endpoint) = target.pick() else {
        record.status = Some(503);
        record.error = Some("no endpoint".into());
        record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        shared.logs.access.write(&record);
        shared.metrics.upstream_error(Direction::Outbound);
        let response = local_reply(503, "no healthy upstream", grpc);
        return reply(ResponseFlags::NoHealthyUpstream, response, 0);
    };
    let (client, version) = endpoint.http.for_version(parts.version);
    parts.version = version;
    strip_hop_by_hop(&mut parts.headers);
    let targeted = authority.as_ref().and_then(|a| {
        if logging {
            record.authority = Some(a.to_string());
        }
        set_upstream_target(&mut parts, a, path, target_path)
    });
    if targeted.is_none() {
        record.status = Some(400);
        record.decision = "deny";
        record.error =
            Some("bad request: the authority (Host) is not HOST[:PORT], or is repeated".into());
        record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        shared.logs.access.write(&record);
        let response = crate::http::bad_request(grpc);
        return reply(ResponseFlags::DownstreamProtocolError, response, 0);
    }
    let received = Arc::new(AtomicU64::new(0));
    let body: Body = Counted::new(body, received.clone())
        .map_err(|e| Box::new(e) as BoxError)
        .boxed();
    // Every request this proxy forwards is allowed here: the server's proxy decides.
    let decided = |shared: &Shared| {
        let metrics = &shared.metrics;
        (metrics.decision(&connection.decisions, Direction::Outbound, true, None))
            .record(started.elapsed());
    };
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            decided(&shared);
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let status = parts.status.as_u16();
            record.status = Some(status);
            let server = parts
                .extensions
                .get::<ServerIdentity>()
                .map(|s| s.0.clone());
            let grpc_status = grpc.then(|| grpc_status_in(&parts.headers)).flatten();
            let (metrics, mutual_tls) = (shared.metrics.clone(), target.mutual_tls());
            let count = move |end: &BodyEnd, request_bytes| {
                // The endpoint is busy until its response has streamed.
                drop(endpoint);
                let handles = (metrics.istio).outbound_request(
                    &connection.requests,
                    &target.upstream.service,
                    server.as_deref(),
                    mutual_tls,
                    protocol,
                    (status, grpc_status.or(end.grpc_status)),
                );
                handles.record(started.elapsed(), request_bytes, end.bytes);
            };
            let body = logged_response_body(
                body,
                record,
                received,
                started,
                shared.logs.access.clone(),
                count,
            );
            Ok(Response::from_parts(parts, body))
        }
        Err(e) => {
            decided(&shared);
            shared.metrics.upstream_error(Direction::Outbound);
            let error = error_chain(&e);
            record.status = Some(503);
            record.error = Some(error);
            record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
            shared.logs.access.write(&record);
            let response = local_reply(
                503,
                "upstream connect error or disconnect/reset before headers",
                grpc,
            );
            let request_bytes = received.load(std::sync::atomic::Ordering::Relaxed);
            reply(
                ResponseFlags::UpstreamConnectionFailure,
                response,
                request_bytes,
            )
        }
    }
}

async fn serve_tcp<S>(stream: S, peer: SocketAddr, target: Arc<OutboundTarget>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let mut record = record(&target, peer, "TCP");
    let counted = |decision| {
        shared
            .metrics
            .connections
            .get_or_create(&DecisionLabels {
                direction: Direction::Outbound,
                decision,
                policy: String::new(),
            })
            .inc();
    };
    let connected = match target.pick() {
        Some(endpoint) => endpoint.tcp.connect().await.map(|c| (c, endpoint)),
        None => Err(crate::forward::ConnectError::NoEndpoints),
    };
    let tcp = istio::Protocol::Tcp;
    match connected {
        Ok(((mut upstream, server), _busy)) => {
            counted("allow");
            let server = server.map(|s| s.id);
            let labels = target.istio_labels(&shared, server.as_deref(), tcp);
            let connection = shared.metrics.istio.tcp_opened(&labels);
            let mut stream = Metered::new(stream, &connection);
            record.upstream = server.map(|s| s.to_string().into());
            record
                .relay(&mut stream, &mut upstream, &shared.stop_now)
                .await;
        }
        Err(e) => {
            counted("allow");
            shared.metrics.upstream_error(Direction::Outbound);
            let flags = match &e {
                crate::forward::ConnectError::NoEndpoints => ResponseFlags::NoHealthyUpstream,
                _ => ResponseFlags::UpstreamConnectionFailure,
            };
            let labels = target.istio_labels(&shared, None, tcp).with_flags(flags);
            // Opened and closed at once, as Envoy counts a failed one.
            drop(shared.metrics.istio.tcp_opened(&labels));
            record.error = Some(error_chain(&e));
        }
    }
    record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
    shared.logs.access.write(&record);
}
