//! The routing table of transparent mode: from the address an application
//! called (the original destination of its captured connection) to the
//! service port it meant, and from the address a peer called to the
//! workload port it reached. Built from every service the control plane
//! sends; replaced whole on each update, keeping the targets (and their
//! pooled connections) of service ports that did not change.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use meshward_api::resources::Service;
use meshward_identity::spiffe::SpiffeId;
use meshward_policy::api::OutboundMode;

use crate::config::{InboundPort, Protocol, Upstream, UpstreamTls};
use crate::identity::WorkloadIdentity;
use crate::inbound::InboundTarget;
use crate::metrics::Metrics;
use crate::outbound::{Destination, OutboundTarget, Route};
use crate::socket::Dial;

/// What an outbound connection to an address is.
pub enum Outbound {
    /// A service port of the registry.
    Service(Route),
    /// Unknown: passed through as plain TCP (`ALLOW_ANY`, Envoy's
    /// PassthroughCluster).
    Passthrough,
    /// Unknown and refused (`REGISTRY_ONLY`, Envoy's BlackHoleCluster).
    BlackHole,
}

/// Identifies a target across updates: the same service port, and for a
/// call to one endpoint's own address, that endpoint.
type TargetKey = (String, u16, Option<SocketAddr>);

/// One version of the table.
#[derive(Default)]
struct Table {
    /// Exact service addresses and endpoint addresses.
    exact: HashMap<SocketAddr, Route>,
    /// Service addresses given as CIDR ranges, looked up after exact ones.
    ranges: Vec<(IpNet, u16, Route)>,
    targets: HashMap<TargetKey, Arc<OutboundTarget>>,
    /// The protocol of each workload port a service declares, by the
    /// workload address and port its endpoints are at.
    inbound: HashMap<SocketAddr, Protocol>,
    mode: OutboundMode,
}

/// The table in force and what building targets needs.
pub struct Routes {
    identity: WorkloadIdentity,
    timeout: Duration,
    mark: Option<u32>,
    metrics: Arc<Metrics>,
    table: RwLock<Arc<Table>>,
    /// Inbound targets by original destination and protocol, so the
    /// application's pooled connections are reused. Bounded: past the
    /// bound a target is made for the one connection.
    inbound: Mutex<HashMap<(SocketAddr, Protocol), Arc<InboundTarget>>>,
}

/// Distinct original destinations whose inbound targets are kept.
const INBOUND_TARGETS: usize = 1024;

/// A table built and ready to be put in force.
pub struct Prepared {
    table: Table,
    updates: Vec<(Arc<OutboundTarget>, Destination)>,
}

impl Routes {
    pub fn new(
        identity: WorkloadIdentity,
        timeout: Duration,
        mark: Option<u32>,
        metrics: Arc<Metrics>,
    ) -> Routes {
        Routes {
            identity,
            timeout,
            mark,
            metrics,
            table: RwLock::new(Arc::new(Table::default())),
            inbound: Mutex::new(HashMap::new()),
        }
    }

    /// The socket mark of the proxy's own connections.
    pub fn mark(&self) -> Option<u32> {
        self.mark
    }

    fn current(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Where a connection the application made to `dst` goes.
    pub fn outbound(&self, dst: SocketAddr) -> Outbound {
        let table = self.current();
        let found = table.exact.get(&dst).cloned().or_else(|| {
            table
                .ranges
                .iter()
                .find(|(net, port, _)| *port == dst.port() && net.contains(&dst.ip()))
                .map(|(_, _, route)| route.clone())
        });
        match (found, table.mode) {
            (Some(route), _) => Outbound::Service(route),
            (None, OutboundMode::AllowAny) => Outbound::Passthrough,
            (None, OutboundMode::RegistryOnly) => Outbound::BlackHole,
        }
    }

    /// The workload port a peer's connection to `dst` reached: the
    /// protocol a service declares for it, else detected (Istio's inbound
    /// passthrough), forwarded to the application at `dst` itself.
    pub fn inbound(&self, dst: SocketAddr) -> Arc<InboundTarget> {
        let protocol = self
            .current()
            .inbound
            .get(&dst)
            .copied()
            .unwrap_or(Protocol::Sniff);
        let mut cache = self.inbound.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(target) = cache.get(&(dst, protocol)) {
            return target.clone();
        }
        let target = Arc::new(InboundTarget::new(
            InboundPort {
                listen: dst,
                port: dst.port(),
                app: dst,
                protocol,
            },
            Some(dst.ip()),
            self.timeout,
            Dial {
                mark: self.mark,
                inbound_source: true,
            },
            self.metrics.clone(),
        ));
        if cache.len() < INBOUND_TARGETS {
            cache.insert((dst, protocol), target.clone());
        }
        target
    }

    /// Builds the table for `services` without putting anything in force.
    pub fn prepare(
        &self,
        services: &BTreeMap<String, Service>,
        mode: OutboundMode,
    ) -> Result<Prepared, crate::ProxyError> {
        let current = self.current();
        let mut table = Table {
            mode,
            ..Table::default()
        };
        let mut updates = Vec::new();
        let mut exact: HashMap<SocketAddr, Vec<Arc<OutboundTarget>>> = HashMap::new();
        let mut ranges: Vec<(IpNet, u16, Vec<Arc<OutboundTarget>>)> = Vec::new();
        for service in services.values() {
            for (&port, protocol_name) in &service.ports {
                let protocol = Protocol::from_port_name(protocol_name);
                let identities = identities(service);
                let all: Vec<(SocketAddr, bool)> = service
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        let target_port = e.ports.get(&port).copied()?;
                        let ip: IpAddr = e.address.parse().ok()?;
                        Some((SocketAddr::new(ip, target_port), e.plaintext))
                    })
                    .collect();
                for &(endpoint, _) in &all {
                    table.inbound.entry(endpoint).or_insert(protocol);
                }
                // Calls to the service's addresses are balanced over its
                // endpoints. When some endpoints have no proxy and others
                // do, only those with one are used (fail closed: the
                // service's traffic is never sent in the clear).
                let meshed: Vec<SocketAddr> = all.iter().filter(|e| !e.1).map(|e| e.0).collect();
                let (endpoints, tls) = if meshed.is_empty() && !all.is_empty() {
                    (all.iter().map(|e| e.0).collect(), UpstreamTls::Disable)
                } else {
                    (meshed, UpstreamTls::IstioMutual)
                };
                let mut target_for =
                    |endpoints: Vec<SocketAddr>,
                     tls: UpstreamTls,
                     key: TargetKey|
                     -> Result<Arc<OutboundTarget>, crate::ProxyError> {
                        let upstream = Upstream {
                            service: service.host.clone(),
                            port,
                            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
                            endpoints,
                            identities: identities.clone(),
                            protocol,
                            tls,
                            lb: service
                                .load_balancer
                                .as_deref()
                                .and_then(|lb| lb.parse().ok())
                                .unwrap_or_default(),
                        };
                        let target = match current.targets.get(&key) {
                            Some(existing)
                                if existing.upstream.protocol == upstream.protocol
                                    && existing.upstream.tls == upstream.tls
                                    && existing.upstream.lb == upstream.lb =>
                            {
                                updates.push((
                                    existing.clone(),
                                    existing.prepare_destination(
                                        &self.identity,
                                        upstream.endpoints.clone(),
                                        upstream.identities.clone(),
                                    )?,
                                ));
                                existing.clone()
                            }
                            _ => Arc::new(OutboundTarget::new(
                                &upstream,
                                &self.identity,
                                self.timeout,
                                Dial {
                                    mark: self.mark,
                                    inbound_source: false,
                                },
                                &self.metrics,
                            )?),
                        };
                        table.targets.insert(key, target.clone());
                        Ok(target)
                    };
                let balanced = target_for(endpoints, tls, (service.host.clone(), port, None))?;
                for address in &service.addresses {
                    if let Ok(ip) = address.parse::<IpAddr>() {
                        exact
                            .entry(SocketAddr::new(ip, port))
                            .or_default()
                            .push(balanced.clone());
                    } else if let Ok(net) = address.parse::<IpNet>() {
                        match ranges.iter_mut().find(|(n, p, _)| *n == net && *p == port) {
                            Some((_, _, targets)) => targets.push(balanced.clone()),
                            None => ranges.push((net, port, vec![balanced.clone()])),
                        }
                    }
                }
                // A call to one endpoint's own address reaches that endpoint.
                for &(endpoint, plaintext) in &all {
                    let tls = if plaintext {
                        UpstreamTls::Disable
                    } else {
                        UpstreamTls::IstioMutual
                    };
                    let pinned = target_for(
                        vec![endpoint],
                        tls,
                        (service.host.clone(), port, Some(endpoint)),
                    )?;
                    exact.entry(endpoint).or_default().push(pinned);
                }
            }
        }
        table.exact = exact
            .into_iter()
            .map(|(addr, targets)| (addr, route(targets)))
            .collect();
        table.ranges = ranges
            .into_iter()
            .map(|(net, port, targets)| (net, port, route(targets)))
            .collect();
        Ok(Prepared { table, updates })
    }

    /// Puts a prepared table in force.
    pub fn commit(&self, prepared: Prepared) {
        for (target, destination) in prepared.updates {
            target.set_destination(destination);
        }
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(prepared.table);
        // Protocols may have changed: inbound targets are made anew.
        self.inbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// What `/config_dump` shows: each address and the services there.
    pub fn dump(&self) -> Vec<(String, Vec<String>)> {
        let table = self.current();
        let names = |route: &Route| match route {
            Route::One(t) => vec![t.upstream.name()],
            Route::ByHost(ts) => ts.iter().map(|t| t.upstream.name()).collect(),
        };
        let mut out: Vec<(String, Vec<String>)> = table
            .exact
            .iter()
            .map(|(addr, route)| (addr.to_string(), names(route)))
            .chain(
                table
                    .ranges
                    .iter()
                    .map(|(net, port, route)| (format!("{net}:{port}"), names(route))),
            )
            .collect();
        out.sort();
        out
    }
}

/// Several services at one address are told apart by HTTP `Host`; the
/// first (by host name, as the table is built in host order) takes the rest.
fn route(mut targets: Vec<Arc<OutboundTarget>>) -> Route {
    targets.dedup_by(|a, b| Arc::ptr_eq(a, b));
    if targets.len() == 1 {
        Route::One(targets.remove(0))
    } else {
        Route::ByHost(targets.into())
    }
}

/// Secure naming: the identities allowed to serve `service`. A name that
/// is not a SPIFFE ID can match no certificate and is left out.
pub fn identities(service: &Service) -> Vec<SpiffeId> {
    service
        .identities
        .iter()
        .filter_map(|i| match SpiffeId::parse(i) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(service = %service.host, identity = %i, "ignoring an identity that is not a SPIFFE ID: {e}");
                None
            }
        })
        .collect()
}
