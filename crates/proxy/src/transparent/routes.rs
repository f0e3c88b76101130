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
    /// A service of `resolution: NONE` (named for the log): passed through
    /// to the address called, as Envoy's ORIGINAL_DST cluster does.
    Original(Arc<str>),
    /// Unknown: passed through as plain TCP (`ALLOW_ANY`, Envoy's
    /// PassthroughCluster).
    Passthrough,
    /// Unknown and refused (`REGISTRY_ONLY`, Envoy's BlackHoleCluster).
    BlackHole,
}

/// Identifies a target across updates: the same service port, and for a
/// call to one endpoint's own address, that endpoint.
type TargetKey = (String, u16, Option<SocketAddr>);

/// What is at one address of the table.
#[derive(Clone)]
enum Entry {
    Service(Route),
    /// A `resolution: NONE` service, by its log name.
    Original(Arc<str>),
}

/// One version of the table.
#[derive(Default)]
struct Table {
    /// Exact service addresses and endpoint addresses.
    exact: HashMap<SocketAddr, Entry>,
    /// Service addresses given as CIDR ranges, looked up after exact ones,
    /// the narrowest first.
    ranges: Vec<(IpNet, u16, Entry)>,
    targets: HashMap<TargetKey, Arc<OutboundTarget>>,
    /// The protocol of each workload port a service declares, by the
    /// workload address and port its endpoints are at.
    inbound: HashMap<SocketAddr, Protocol>,
    mode: OutboundMode,
    /// Targets whose endpoints are names, resolved in the background.
    resolving: Vec<Resolving>,
    /// False until the control plane's first services are in force: until
    /// then every destination is refused, so nothing leaves uncontrolled
    /// (in plaintext, or past `REGISTRY_ONLY`) while the proxy does not
    /// know the mesh yet.
    configured: bool,
}

/// A target with endpoints named rather than addressed.
struct Resolving {
    target: Arc<OutboundTarget>,
    /// Its endpoints given by address.
    addressed: Vec<SocketAddr>,
    /// The names to resolve, with the port to call on each.
    names: Vec<(String, u16)>,
}

/// How often named endpoints are resolved again (Envoy's STRICT_DNS
/// default refresh rate is 5 s; names of external services change rarely,
/// and a change is also picked up on every configuration).
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

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
    /// Told on every commit, so named endpoints are resolved at once.
    changed: tokio::sync::Notify,
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
            changed: tokio::sync::Notify::new(),
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

    /// A service port's target the table holds, the first `pick` takes.
    pub fn find_target(
        &self,
        pick: impl Fn(&OutboundTarget) -> bool,
    ) -> Option<Arc<OutboundTarget>> {
        self.current().targets.values().find(|t| pick(t)).cloned()
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
            _ if !table.configured => Outbound::BlackHole,
            (Some(Entry::Service(route)), _) => Outbound::Service(route),
            (Some(Entry::Original(name)), _) => Outbound::Original(name),
            (None, OutboundMode::AllowAny) => Outbound::Passthrough,
            (None, OutboundMode::RegistryOnly) => Outbound::BlackHole,
        }
    }

    /// The balanced target of a service port by the service's host name,
    /// for callers that route by name (the ingress gateway); without a
    /// port, the service's only one. `None` before the first configuration
    /// and for unknown hosts and ports.
    pub fn service(&self, host: &str, port: Option<u16>) -> Option<Arc<OutboundTarget>> {
        let table = self.current();
        if !table.configured {
            return None;
        }
        match port {
            Some(port) => table.targets.get(&(host.to_owned(), port, None)).cloned(),
            None => {
                let mut ports = table
                    .targets
                    .iter()
                    .filter(|((h, _, pinned), _)| h == host && pinned.is_none());
                let (_, only) = ports.next()?;
                ports.next().is_none().then(|| only.clone())
            }
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
            configured: true,
            ..Table::default()
        };
        let mut updates = Vec::new();
        let mut exact: HashMap<SocketAddr, Vec<Arc<OutboundTarget>>> = HashMap::new();
        let mut ranges: Vec<(IpNet, u16, Vec<Arc<OutboundTarget>>)> = Vec::new();
        let mut original_exact: HashMap<SocketAddr, Entry> = HashMap::new();
        let mut original_ranges: Vec<(IpNet, u16, Entry)> = Vec::new();
        for service in services.values() {
            // `resolution: NONE`: the service's addresses are its own, and a
            // connection to one goes where the application sent it.
            if service.resolution.as_deref() == Some("NONE") {
                for &port in service.ports.keys() {
                    let original =
                        Entry::Original(Arc::from(format!("outbound|{port}|{}", service.host)));
                    for address in &service.addresses {
                        if let Ok(ip) = address.parse::<IpAddr>() {
                            original_exact
                                .entry(SocketAddr::new(ip, port))
                                .or_insert(original.clone());
                        } else if let Ok(net) = address.parse::<IpNet>() {
                            original_ranges.push((net, port, original.clone()));
                        }
                    }
                }
                continue;
            }
            for (&port, protocol_name) in &service.ports {
                let protocol = Protocol::from_port_name(protocol_name);
                let identities = identities(service);
                // Endpoints named rather than addressed (`resolution: DNS`):
                // resolved by the proxy, now and every 30 s.
                let names: Vec<(String, u16, bool)> = service
                    .endpoints
                    .iter()
                    .filter(|e| e.address.parse::<IpAddr>().is_err())
                    .filter_map(|e| Some((e.address.clone(), *e.ports.get(&port)?, e.plaintext)))
                    .collect();
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
                let any_meshed = !meshed.is_empty() || names.iter().any(|n| !n.2);
                let no_endpoint = all.is_empty() && names.is_empty();
                let (endpoints, tls) = if !any_meshed && !no_endpoint {
                    (all.iter().map(|e| e.0).collect(), UpstreamTls::Disable)
                } else {
                    (meshed, UpstreamTls::IstioMutual)
                };
                let names: Vec<(String, u16)> = names
                    .into_iter()
                    .filter(|n| n.2 == (tls == UpstreamTls::Disable))
                    .map(|(name, port, _)| (name, port))
                    .collect();
                let addressed = endpoints.clone();
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
                if !names.is_empty() {
                    table.resolving.push(Resolving {
                        target: balanced.clone(),
                        addressed,
                        names,
                    });
                }
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
            .map(|(addr, targets)| (addr, Entry::Service(route(targets))))
            .collect();
        // A NONE service's own addresses, where no other service is.
        for (addr, original) in original_exact {
            table.exact.entry(addr).or_insert(original);
        }

        table.ranges = ranges
            .into_iter()
            .map(|(net, port, targets)| (net, port, Entry::Service(route(targets))))
            .chain(original_ranges)
            .collect();
        // The most specific range first, as a longest-prefix match.
        table
            .ranges
            .sort_by_key(|(net, _, _)| std::cmp::Reverse(net.prefix_len()));
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
        self.changed.notify_one();
    }

    /// Resolves the endpoints that are names (`resolution: DNS`) through
    /// `resolver` — the upstream resolvers, from sockets carrying the
    /// proxy's mark, never the mesh's own names — at each new table and
    /// every [`RESOLVE_EVERY`], and puts the addresses in force beside the
    /// endpoints given by address. A name that does not resolve keeps its
    /// last addresses. Runs until `stop`.
    pub async fn resolve_names(
        self: Arc<Self>,
        resolver: crate::dns::Forwarder,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let this = self;
        let mut last: HashMap<String, Vec<IpAddr>> = HashMap::new();
        loop {
            let table = this.current();
            for resolving in &table.resolving {
                let mut endpoints = resolving.addressed.clone();
                for (name, port) in &resolving.names {
                    match resolver.lookup(name).await {
                        Ok(addresses) => {
                            last.insert(name.clone(), addresses);
                        }
                        Err(e) => tracing::warn!(%name, "resolving an endpoint: {e}"),
                    }
                    endpoints.extend(
                        last.get(name)
                            .into_iter()
                            .flatten()
                            .map(|ip| SocketAddr::new(*ip, *port)),
                    );
                }
                endpoints.sort();
                endpoints.dedup();
                let target = &resolving.target;
                match target.prepare_destination(
                    &this.identity,
                    endpoints,
                    target.upstream.identities.clone(),
                ) {
                    Ok(destination) => target.set_destination(destination),
                    Err(e) => tracing::warn!(service = %target.upstream.name(), "{e}"),
                }
            }
            tokio::select! {
                () = this.changed.notified() => {}
                () = tokio::time::sleep(RESOLVE_EVERY) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// What `/config_dump` shows: each address and the service ports
    /// there, with how they are reached.
    pub fn dump(&self) -> serde_json::Value {
        let table = self.current();
        let describe = |entry: &Entry| -> Vec<serde_json::Value> {
            let targets: Vec<&Arc<OutboundTarget>> = match entry {
                Entry::Service(Route::One(t)) => vec![t],
                Entry::Service(Route::ByHost(ts)) => ts.iter().collect(),
                Entry::Original(name) => {
                    return vec![serde_json::json!({
                        "service": name.to_string(),
                        "resolution": "NONE",
                    })];
                }
            };
            targets
                .into_iter()
                .map(|t| {
                    serde_json::json!({
                        "service": t.upstream.name(),
                        "protocol": t.upstream.protocol.as_str(),
                        "tls": match t.upstream.tls {
                            UpstreamTls::IstioMutual => "ISTIO_MUTUAL",
                            UpstreamTls::Disable => "DISABLE",
                        },
                        "load_balancer": t.upstream.lb.as_str(),
                        "endpoints": t.endpoints().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    })
                })
                .collect()
        };
        let mut routes: BTreeMap<String, Vec<serde_json::Value>> = table
            .exact
            .iter()
            .map(|(addr, entry)| (addr.to_string(), describe(entry)))
            .collect();
        routes.extend(
            table
                .ranges
                .iter()
                .map(|(net, port, entry)| (format!("{net}:{port}"), describe(entry))),
        );
        serde_json::json!({
            "configured": table.configured,
            "outbound_traffic_policy": match table.mode {
                OutboundMode::AllowAny => "ALLOW_ANY",
                OutboundMode::RegistryOnly => "REGISTRY_ONLY",
            },
            "by_address": routes,
        })
    }
}

/// Several services at one address are told apart by HTTP `Host`; the
/// first takes the rest: a meshed one before any without a proxy (so an
/// entry claiming a meshed workload's address as plaintext cannot turn its
/// TCP traffic into plaintext), then by host name.
fn route(mut targets: Vec<Arc<OutboundTarget>>) -> Route {
    targets.dedup_by(|a, b| Arc::ptr_eq(a, b));
    // Stable: host order is kept within each kind.
    targets.sort_by_key(|t| t.upstream.tls == UpstreamTls::Disable);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use meshward_api::resources::Endpoint;

    use super::*;
    use crate::testing::ca::{Ca, id};

    fn routes() -> Routes {
        let ca = Ca::new();
        Routes::new(
            ca.identity(&id("bookinfo", "productpage")),
            Duration::from_secs(1),
            None,
            Arc::new(Metrics::default()),
        )
    }

    fn endpoint(address: &str, port: u16, target: u16, plaintext: bool) -> Endpoint {
        Endpoint {
            address: address.into(),
            ports: BTreeMap::from([(port, target)]),
            identity: "spiffe://cluster.local/ns/bookinfo/sa/ratings".into(),
            plaintext,
        }
    }

    fn service(
        host: &str,
        addresses: &[&str],
        protocol: &str,
        endpoints: Vec<Endpoint>,
    ) -> Service {
        Service {
            host: host.into(),
            entry: format!("bookinfo/{host}"),
            ports: BTreeMap::from([(9080, protocol.into())]),
            identities: endpoints
                .iter()
                .map(|e| e.identity.clone())
                .collect::<BTreeSet<_>>(),
            endpoints,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..Service::default()
        }
    }

    fn table(routes: &Routes, services: Vec<Service>, mode: OutboundMode) {
        let services = services.into_iter().map(|s| (s.host.clone(), s)).collect();
        let prepared = routes.prepare(&services, mode).unwrap();
        routes.commit(prepared);
    }

    fn hosts(outbound: Outbound) -> Vec<(String, Vec<SocketAddr>, UpstreamTls)> {
        match outbound {
            Outbound::Service(Route::One(t)) => {
                vec![(t.upstream.service.clone(), t.endpoints(), t.upstream.tls)]
            }
            Outbound::Service(Route::ByHost(ts)) => ts
                .iter()
                .map(|t| (t.upstream.service.clone(), t.endpoints(), t.upstream.tls))
                .collect(),
            Outbound::Passthrough => {
                vec![("PassthroughCluster".into(), vec![], UpstreamTls::Disable)]
            }
            Outbound::Original(name) => vec![(name.to_string(), vec![], UpstreamTls::Disable)],
            Outbound::BlackHole => vec![("BlackHoleCluster".into(), vec![], UpstreamTls::Disable)],
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_service_address_balances_over_its_endpoints_and_an_endpoint_address_reaches_that_endpoint()
    {
        let routes = routes();
        let ratings = service(
            "ratings.bookinfo",
            &["240.240.0.10", "2001:2::10"],
            "HTTP",
            vec![
                endpoint("198.18.0.3", 9080, 9080, false),
                endpoint("198.18.0.4", 9080, 19080, false),
            ],
        );
        table(&routes, vec![ratings], OutboundMode::AllowAny);
        let both = vec![addr("198.18.0.3:9080"), addr("198.18.0.4:19080")];
        for vip in ["240.240.0.10:9080", "[2001:2::10]:9080"] {
            assert_eq!(
                hosts(routes.outbound(addr(vip))),
                vec![(
                    "ratings.bookinfo".into(),
                    both.clone(),
                    UpstreamTls::IstioMutual
                )]
            );
        }
        // The endpoint's own address and port: that endpoint only.
        assert_eq!(
            hosts(routes.outbound(addr("198.18.0.4:19080"))),
            vec![(
                "ratings.bookinfo".into(),
                vec![addr("198.18.0.4:19080")],
                UpstreamTls::IstioMutual
            )]
        );
        // Another port of a known address is not the service.
        assert_eq!(
            hosts(routes.outbound(addr("240.240.0.10:80")))[0].0,
            "PassthroughCluster"
        );
        // Inbound: the declared protocol at the endpoint's address and port.
        assert_eq!(
            routes.inbound(addr("198.18.0.4:19080")).port.protocol,
            Protocol::Http
        );
        assert_eq!(
            routes.inbound(addr("198.18.0.4:22")).port.protocol,
            Protocol::Sniff
        );
        let target = routes.inbound(addr("198.18.0.4:19080"));
        assert_eq!(target.port.app, addr("198.18.0.4:19080"));
        assert_eq!(target.port.port, 19080);
    }

    #[test]
    fn nothing_leaves_before_the_first_configuration() {
        let routes = routes();
        // ALLOW_ANY is the default, yet nothing passes before the control
        // plane's first services.
        assert!(matches!(
            routes.outbound(addr("198.18.9.9:80")),
            Outbound::BlackHole
        ));
        table(&routes, vec![], OutboundMode::AllowAny);
        assert!(matches!(
            routes.outbound(addr("198.18.9.9:80")),
            Outbound::Passthrough
        ));
    }

    #[test]
    fn a_meshed_service_wins_an_address_over_one_without_a_proxy_and_the_narrowest_range_wins() {
        let routes = routes();
        // "a-claim" sorts first, yet the meshed service keeps TCP to its
        // endpoint's address.
        let claim = service(
            "a-claim.example",
            &[],
            "TCP",
            vec![endpoint("198.18.0.3", 9080, 9080, true)],
        );
        let ratings = service(
            "ratings.bookinfo",
            &[],
            "TCP",
            vec![endpoint("198.18.0.3", 9080, 9080, false)],
        );
        let wide = service(
            "wide.example",
            &["198.19.0.0/16"],
            "TCP",
            vec![endpoint("198.18.0.7", 9080, 9080, true)],
        );
        let narrow = service(
            "narrow.example",
            &["198.19.4.0/24"],
            "TCP",
            vec![endpoint("198.18.0.8", 9080, 9080, true)],
        );
        table(
            &routes,
            vec![claim, ratings, wide, narrow],
            OutboundMode::AllowAny,
        );
        let first = hosts(routes.outbound(addr("198.18.0.3:9080")));
        assert_eq!(
            (first[0].0.as_str(), first[0].2),
            ("ratings.bookinfo", UpstreamTls::IstioMutual)
        );
        assert_eq!(
            hosts(routes.outbound(addr("198.19.4.5:9080")))[0].0,
            "narrow.example"
        );
        assert_eq!(
            hosts(routes.outbound(addr("198.19.5.5:9080")))[0].0,
            "wide.example"
        );
    }

    #[test]
    fn a_resolution_none_service_passes_its_addresses_through_and_named_endpoints_are_resolved_later()
     {
        let routes = routes();
        let mut none = service(
            "egress.example",
            &["198.19.0.0/16", "198.18.5.5"],
            "TCP",
            vec![],
        );
        none.resolution = Some("NONE".into());
        let mut api = service(
            "api.example",
            &["240.240.1.1"],
            "HTTP",
            vec![
                endpoint("api.example", 9080, 443, true),
                endpoint("198.18.0.9", 9080, 9080, true),
            ],
        );
        api.resolution = Some("DNS".into());
        table(&routes, vec![none, api], OutboundMode::RegistryOnly);
        for dst in ["198.19.3.4:9080", "198.18.5.5:9080"] {
            assert!(
                matches!(routes.outbound(addr(dst)), Outbound::Original(ref n) if &**n == "outbound|9080|egress.example"),
                "{dst}"
            );
        }
        // Until resolved, the endpoints given by address.
        assert_eq!(
            hosts(routes.outbound(addr("240.240.1.1:9080"))),
            vec![(
                "api.example".into(),
                vec![addr("198.18.0.9:9080")],
                UpstreamTls::Disable
            )]
        );
        let table = routes.current();
        assert_eq!(table.resolving.len(), 1);
        assert_eq!(
            table.resolving[0].names,
            vec![("api.example".to_owned(), 443)]
        );
    }

    #[test]
    fn unknown_destinations_follow_the_outbound_traffic_policy() {
        let routes = routes();
        table(&routes, vec![], OutboundMode::RegistryOnly);
        assert!(matches!(
            routes.outbound(addr("198.18.9.9:80")),
            Outbound::BlackHole
        ));
        table(&routes, vec![], OutboundMode::AllowAny);
        assert!(matches!(
            routes.outbound(addr("198.18.9.9:80")),
            Outbound::Passthrough
        ));
    }

    #[test]
    fn services_sharing_an_address_are_told_apart_by_host() {
        let routes = routes();
        let a = service(
            "a.example",
            &["240.240.0.20"],
            "HTTP",
            vec![endpoint("198.18.0.5", 9080, 9080, false)],
        );
        let b = service(
            "b.example",
            &["240.240.0.20"],
            "HTTP",
            vec![endpoint("198.18.0.6", 9080, 9080, false)],
        );
        table(&routes, vec![a, b], OutboundMode::AllowAny);
        let Outbound::Service(route) = routes.outbound(addr("240.240.0.20:9080")) else {
            panic!("not a service");
        };
        let pick = |host: Option<&str>| route.for_authority(host).upstream.service.clone();
        assert_eq!(pick(Some("b.example:9080")), "b.example");
        assert_eq!(pick(Some("B.EXAMPLE.")), "b.example");
        assert_eq!(pick(Some("a.example")), "a.example");
        // No match: the first, by host name.
        assert_eq!(pick(Some("c.example")), "a.example");
        assert_eq!(pick(None), "a.example");
    }

    #[test]
    fn a_short_host_names_the_longer_service() {
        let routes = routes();
        let a = service(
            "ratings.bookinfo.svc.cluster.local",
            &["240.240.0.30"],
            "HTTP",
            vec![],
        );
        let b = service(
            "reviews.bookinfo.svc.cluster.local",
            &["240.240.0.30"],
            "HTTP",
            vec![],
        );
        table(&routes, vec![a, b], OutboundMode::AllowAny);
        let Outbound::Service(route) = routes.outbound(addr("240.240.0.30:9080")) else {
            panic!("not a service");
        };
        assert_eq!(
            route
                .for_authority(Some("reviews.bookinfo:9080"))
                .upstream
                .service,
            "reviews.bookinfo.svc.cluster.local"
        );
        // A prefix that is not a whole label names nothing.
        assert_eq!(
            route.for_authority(Some("reviews.book")).upstream.service,
            "ratings.bookinfo.svc.cluster.local"
        );
    }

    #[test]
    fn endpoints_without_a_proxy_are_called_in_plaintext_but_never_mixed_into_a_meshed_service() {
        let routes = routes();
        let external = service(
            "db.example",
            &["240.240.0.40"],
            "TCP",
            vec![endpoint("198.18.0.7", 9080, 5432, true)],
        );
        let mixed = service(
            "mixed.example",
            &["240.240.0.41"],
            "HTTP",
            vec![
                endpoint("198.18.0.8", 9080, 9080, false),
                endpoint("198.18.0.9", 9080, 9080, true),
            ],
        );
        table(&routes, vec![external, mixed], OutboundMode::AllowAny);
        assert_eq!(
            hosts(routes.outbound(addr("240.240.0.40:9080"))),
            vec![(
                "db.example".into(),
                vec![addr("198.18.0.7:5432")],
                UpstreamTls::Disable
            )]
        );
        assert_eq!(
            hosts(routes.outbound(addr("240.240.0.41:9080"))),
            vec![(
                "mixed.example".into(),
                vec![addr("198.18.0.8:9080")],
                UpstreamTls::IstioMutual
            )]
        );
        // Called at its own address, the plaintext endpoint is plaintext.
        assert_eq!(
            hosts(routes.outbound(addr("198.18.0.9:9080")))[0].2,
            UpstreamTls::Disable
        );
    }

    #[test]
    fn an_update_keeps_the_targets_of_unchanged_service_ports_and_moves_endpoints_live() {
        let routes = routes();
        let one = service(
            "ratings.bookinfo",
            &["240.240.0.10"],
            "HTTP",
            vec![endpoint("198.18.0.3", 9080, 9080, false)],
        );
        table(&routes, vec![one], OutboundMode::AllowAny);
        let Outbound::Service(Route::One(before)) = routes.outbound(addr("240.240.0.10:9080"))
        else {
            panic!("not one service");
        };
        let two = service(
            "ratings.bookinfo",
            &["240.240.0.10"],
            "HTTP",
            vec![
                endpoint("198.18.0.3", 9080, 9080, false),
                endpoint("198.18.0.4", 9080, 9080, false),
            ],
        );
        table(&routes, vec![two], OutboundMode::AllowAny);
        let Outbound::Service(Route::One(after)) = routes.outbound(addr("240.240.0.10:9080"))
        else {
            panic!("not one service");
        };
        assert!(
            Arc::ptr_eq(&before, &after),
            "the target (and its pools) is kept"
        );
        assert_eq!(
            after.endpoints(),
            vec![addr("198.18.0.3:9080"), addr("198.18.0.4:9080")]
        );
        // Removed from the registry: unknown again.
        table(&routes, vec![], OutboundMode::RegistryOnly);
        assert!(matches!(
            routes.outbound(addr("240.240.0.10:9080")),
            Outbound::BlackHole
        ));
    }

    #[test]
    fn a_cidr_address_matches_every_address_in_it() {
        let routes = routes();
        let range = service(
            "range.example",
            &["198.19.0.0/16"],
            "TCP",
            vec![endpoint("198.18.0.7", 9080, 9080, true)],
        );
        table(&routes, vec![range], OutboundMode::RegistryOnly);
        assert_eq!(
            hosts(routes.outbound(addr("198.19.4.5:9080")))[0].0,
            "range.example"
        );
        assert!(matches!(
            routes.outbound(addr("198.19.4.5:9081")),
            Outbound::BlackHole
        ));
    }
}
