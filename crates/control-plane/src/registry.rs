//! The workload registry: from `WorkloadEntry` and `ServiceEntry` objects,
//! which workloads exist (namespace, labels, identity) and, per service
//! host, its endpoints and the identities allowed to run it — Istio's
//! secure naming, derived the way istiod derives it from a service's
//! endpoints' service accounts plus the entry's `subjectAltNames`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub use meshward_api::resources::{Endpoint, Service};
use meshward_identity::spiffe::SpiffeId;
use meshward_policy::api::{
    DestinationRule, RegistryObject, ServiceEntry, WorkloadEntry, WorkloadEntrySpec,
};
use serde::{Deserialize, Serialize};

/// One workload as policies and proxies see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// `namespace/name` of its WorkloadEntry.
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `spiffe://TD/ns/NS/sa/SA`; the service account is `default` when the
    /// entry names none, as in Istio.
    pub identity: String,
    pub address: String,
}

/// The registry derived from a set of objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub workloads: Vec<Workload>,
    pub services: BTreeMap<String, Service>,
}

fn identity(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    let sa = if service_account.is_empty() {
        "default"
    } else {
        service_account
    };
    SpiffeId::istio(trust_domain, namespace, sa)
        .map(|id| id.to_string())
        // A name that cannot form a SPIFFE ID is kept verbatim: it then
        // matches no certificate, so nothing is allowed by it.
        .unwrap_or_else(|_| format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}"))
}

/// Each host's load balancer, from the DestinationRule for it: its `host`
/// as written, or, for a short name, that name in the rule's namespace
/// (`ratings` in `bookinfo` is `ratings.bookinfo` or
/// `ratings.bookinfo.svc.cluster.local`). Of several rules for one host
/// the oldest wins, as Istio takes the first.
fn apply_load_balancers(
    services: &mut BTreeMap<String, Service>,
    mut rules: Vec<&DestinationRule>,
) {
    rules.sort_by(|a, b| {
        (
            &a.metadata.creation_timestamp,
            &a.metadata.namespace,
            &a.metadata.name,
        )
            .cmp(&(
                &b.metadata.creation_timestamp,
                &b.metadata.namespace,
                &b.metadata.name,
            ))
    });
    for rule in rules {
        let Some(simple) = rule.spec.simple_load_balancer() else {
            continue;
        };
        let host = rule.spec.host.to_ascii_lowercase();
        let ns = rule.metadata.namespace_or_default();
        let names = [
            host.clone(),
            format!("{host}.{ns}"),
            format!("{host}.{ns}.svc.cluster.local"),
        ];
        for service in services.values_mut() {
            if service.load_balancer.is_none() && names.contains(&service.host) {
                service.load_balancer = Some(simple.to_owned());
            }
        }
    }
}

/// The label Istio puts on a workload to say whether it runs a proxy.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Whether a workload runs a proxy, and so is called with mutual TLS. A
/// WorkloadEntry does unless it says otherwise with Istio's
/// `security.istio.io/tlsMode` label (anything but `istio`).
fn has_proxy(spec: &WorkloadEntrySpec) -> bool {
    spec.labels
        .get(TLS_MODE_LABEL)
        .is_none_or(|mode| mode == "istio")
}

/// A `MESH_EXTERNAL` entry's endpoints are outside the mesh: no proxy.
fn mesh_external(se: &ServiceEntry) -> bool {
    se.spec.location == Some(meshward_policy::api::ServiceLocation::MeshExternal)
}

impl Registry {
    pub fn new<'a>(
        objects: impl IntoIterator<Item = &'a RegistryObject>,
        trust_domain: &str,
    ) -> Registry {
        let mut entries: Vec<&WorkloadEntry> = Vec::new();
        let mut services: Vec<&ServiceEntry> = Vec::new();
        let mut rules: Vec<&DestinationRule> = Vec::new();
        for object in objects {
            match object {
                RegistryObject::WorkloadEntry(we) => entries.push(we),
                RegistryObject::ServiceEntry(se) => services.push(se),
                RegistryObject::DestinationRule(dr) => rules.push(dr),
                // Ingress configuration: sent to gateways as it is (push).
                RegistryObject::Gateway(_) | RegistryObject::VirtualService(_) => {}
            }
        }
        let workloads: Vec<Workload> = entries
            .iter()
            .map(|we| {
                let namespace = we.metadata.namespace_or_default().to_owned();
                Workload {
                    name: format!("{namespace}/{}", we.metadata.name),
                    identity: identity(trust_domain, &namespace, &we.spec.service_account),
                    labels: we.spec.labels.clone(),
                    address: we.spec.address.clone(),
                    namespace,
                }
            })
            .collect();
        let mut by_host: BTreeMap<String, Service> = BTreeMap::new();
        // Hosts that may get allocated addresses, with the creation time of
        // their oldest qualifying entry (allocation goes oldest first).
        let mut qualifying: BTreeMap<String, Option<jiff::Timestamp>> = BTreeMap::new();
        for se in services {
            let namespace = se.metadata.namespace_or_default();
            let ports: BTreeMap<u16, String> = se
                .spec
                .ports
                .iter()
                .filter_map(|p| {
                    // Without a protocol, Istio reads the port's name
                    // (`http-web`, `grpc`, ...).
                    let protocol = if p.protocol.is_empty() {
                        p.name.clone()
                    } else {
                        p.protocol.clone()
                    };
                    Some((u16::try_from(p.number).ok()?, protocol))
                })
                .collect();
            let mut endpoints = Vec::new();
            let external = mesh_external(se);
            let endpoint = |spec: &WorkloadEntrySpec, ns: &str| Endpoint {
                plaintext: external || !has_proxy(spec),
                address: spec.address.clone(),
                ports: se
                    .spec
                    .ports
                    .iter()
                    .filter_map(|p| {
                        let number = u16::try_from(p.number).ok()?;
                        // The workload's port of the same name, else targetPort, else the number.
                        let target = spec
                            .ports
                            .get(&p.name)
                            .copied()
                            .or(p.target_port)
                            .unwrap_or(p.number);
                        Some((number, u16::try_from(target).ok()?))
                    })
                    .collect(),
                identity: identity(trust_domain, ns, &spec.service_account),
            };
            match &se.spec.workload_selector {
                Some(selector) => {
                    for we in entries.iter().filter(|we| {
                        we.metadata.namespace_or_default() == namespace
                            && selector.matches(&we.spec.labels)
                    }) {
                        endpoints.push(endpoint(&we.spec, namespace));
                    }
                }
                None => {
                    for spec in &se.spec.endpoints {
                        endpoints.push(endpoint(spec, namespace));
                    }
                }
            }
            endpoints.sort();
            let mut identities: BTreeSet<String> =
                endpoints.iter().map(|e| e.identity.clone()).collect();
            identities.extend(se.spec.subject_alt_names.iter().cloned());
            let resolution = se.spec.effective_resolution();
            let by_dns = matches!(
                resolution,
                meshward_policy::api::Resolution::Dns
                    | meshward_policy::api::Resolution::DnsRoundRobin
            );
            for host in &se.spec.hosts {
                // `resolution: DNS` without endpoints: the host itself is
                // resolved and called, as Istio's STRICT_DNS cluster does
                // (it runs no proxy of the mesh).
                let endpoints = if by_dns && endpoints.is_empty() && !host.starts_with('*') {
                    vec![Endpoint {
                        address: host.to_ascii_lowercase(),
                        ports: ports
                            .keys()
                            .map(|&n| {
                                let target = se
                                    .spec
                                    .ports
                                    .iter()
                                    .find(|p| u32::from(n) == p.number)
                                    .and_then(|p| p.target_port)
                                    .and_then(|t| u16::try_from(t).ok())
                                    .unwrap_or(n);
                                (n, target)
                            })
                            .collect(),
                        identity: String::new(),
                        plaintext: true,
                    }]
                } else {
                    endpoints.clone()
                };
                let service = by_host
                    .entry(host.to_ascii_lowercase())
                    .or_insert_with(|| Service {
                        host: host.to_ascii_lowercase(),
                        entry: format!("{namespace}/{}", se.metadata.name),
                        ..Service::default()
                    });
                // Several entries for one host merge, as Istio merges them.
                service.ports.extend(ports.clone());
                service
                    .resolution
                    .get_or_insert_with(|| resolution.as_str().to_owned());
                service.endpoints.extend(endpoints.iter().cloned());
                service.endpoints.sort();
                service.endpoints.dedup();
                service.identities.extend(identities.iter().cloned());
                for address in &se.spec.addresses {
                    if !service.addresses.contains(address) {
                        service.addresses.push(address.clone());
                    }
                }
                if se.auto_allocates() && !host.starts_with('*') {
                    let created = se.metadata.creation_timestamp;
                    let oldest = qualifying.entry(service.host.clone()).or_insert(created);
                    *oldest = match (*oldest, created) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
        }
        allocate_addresses(&mut by_host, qualifying);
        apply_load_balancers(&mut by_host, rules);
        Registry {
            workloads,
            services: by_host,
        }
    }

    /// Which WorkloadEntry a proxy is: the one it claims (`NAMESPACE/NAME`,
    /// from `meshward proxy --workload`), or, without a claim, the only one
    /// that runs as its identity. An entry is given to a proxy only when
    /// the entry's identity is the certificate's and, when the entry has an
    /// address, the connection comes from it: the entry's labels decide
    /// which policies the proxy enforces, so another workload's must never
    /// reach it. `Ok(None)`: no claim and no entry runs as this identity
    /// (the proxy gets its identity's namespace, without labels).
    pub fn resolve(
        &self,
        identity: &str,
        peer: Option<IpAddr>,
        claim: Option<&str>,
    ) -> Result<Option<&Workload>, Refusal> {
        let workload = match claim {
            Some(claim) => {
                // Printable ASCII only: the claim is echoed in logs and status.
                let well_formed = claim.len() <= MAX_CLAIM
                    && claim.bytes().all(|b| b.is_ascii_graphic())
                    && claim.split_once('/').is_some_and(|(ns, name)| {
                        !ns.is_empty() && !name.is_empty() && !name.contains('/')
                    });
                if !well_formed {
                    return Err(Refusal::Malformed {
                        claim: claim.chars().take(MAX_CLAIM).collect(),
                    });
                }
                let workload =
                    self.workloads
                        .iter()
                        .find(|w| w.name == claim)
                        .ok_or_else(|| Refusal::NoSuchWorkload {
                            claim: claim.to_owned(),
                        })?;
                if workload.identity != identity {
                    return Err(Refusal::WrongIdentity {
                        workload: workload.name.clone(),
                        runs_as: workload.identity.clone(),
                        certificate: identity.to_owned(),
                    });
                }
                workload
            }
            None => {
                let candidates: Vec<&Workload> = self
                    .workloads
                    .iter()
                    .filter(|w| w.identity == identity)
                    .collect();
                match candidates.as_slice() {
                    [] => return Ok(None),
                    [only] => *only,
                    several => {
                        return Err(Refusal::Ambiguous {
                            identity: identity.to_owned(),
                            workloads: several.iter().map(|w| w.name.clone()).collect(),
                        });
                    }
                }
            }
        };
        check_address(workload, peer)?;
        Ok(Some(workload))
    }
}

/// Addresses for hosts whose entries give none, from the ranges Istio
/// allocates from, so that an application can resolve the host (the proxy's
/// DNS answers these) and the proxy can tell which service a captured
/// connection is for. Each host gets one IPv4 address in 240.240.0.0/16 and
/// the IPv6 address 2001:2::f0f0:N with the same N.
///
/// Every proxy must agree, and an address must not move while applications
/// hold it: the slot is a hash of the host (FNV-1a, as Istio's hashes), and
/// a taken slot moves the host on to the next free one. Hosts are placed
/// oldest entry first (`creationTimestamp`, then host name), so a new entry
/// never takes a slot from an existing one; addresses that entries give
/// themselves inside the range are never handed out. The range's first and
/// last addresses (240.240.0.0, 240.240.255.255) are never used.
fn allocate_addresses(
    services: &mut BTreeMap<String, Service>,
    qualifying: BTreeMap<String, Option<jiff::Timestamp>>,
) {
    let mut taken = vec![false; SLOTS as usize + 1];
    for service in services.values() {
        for address in &service.addresses {
            if address.contains('/') {
                // A range written in an entry takes every slot it covers.
                let Ok(net) = address.parse::<ipnet::IpNet>() else {
                    continue;
                };
                for slot in 1..=SLOTS {
                    let (v4, v6) = addresses_of(slot);
                    if net.contains(&IpAddr::V4(v4)) || net.contains(&IpAddr::V6(v6)) {
                        taken[slot as usize] = true;
                    }
                }
            } else if let Some(slot) = address.parse().ok().and_then(slot_of) {
                taken[slot as usize] = true;
            }
        }
    }
    let mut order: Vec<(Option<jiff::Timestamp>, String)> = qualifying
        .into_iter()
        .filter(|(host, _)| services.get(host).is_some_and(|s| s.addresses.is_empty()))
        .map(|(host, created)| (created, host))
        .collect();
    // Untimed entries (not from the store) after timed ones, by host.
    order.sort_by(|(a, ha), (b, hb)| (a.is_none(), a, ha).cmp(&(b.is_none(), b, hb)));
    let mut free = SLOTS as usize - taken.iter().filter(|t| **t).count();
    for (_, host) in order {
        if free == 0 {
            tracing::warn!(%host, "no address left to allocate in 240.240.0.0/16: the host is not given one");
            continue;
        }
        let mut slot = 1 + fnv1a(host.as_bytes()) % SLOTS;
        while taken[slot as usize] {
            slot = slot % SLOTS + 1;
        }
        taken[slot as usize] = true;
        free -= 1;
        if let Some(service) = services.get_mut(&host) {
            let (v4, v6) = addresses_of(slot);
            service.addresses = vec![v4.to_string(), v6.to_string()];
            service.auto_allocated = true;
        }
    }
}

/// Allocation slots: 1..=SLOTS, the addresses of 240.240.0.0/16 but its
/// first and last.
const SLOTS: u32 = (1 << 16) - 2;

/// The addresses of a slot.
fn addresses_of(slot: u32) -> (std::net::Ipv4Addr, std::net::Ipv6Addr) {
    let n = slot as u16;
    let v4 = std::net::Ipv4Addr::new(240, 240, (n >> 8) as u8, n as u8);
    let v6 = std::net::Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0xf0f0, n);
    (v4, v6)
}

/// The slot an address written in an entry occupies, if it is one.
fn slot_of(address: IpAddr) -> Option<u32> {
    let n = match address {
        IpAddr::V4(v4) => match v4.octets() {
            [240, 240, a, b] => u16::from_be_bytes([a, b]),
            _ => return None,
        },
        IpAddr::V6(v6) => match v6.segments() {
            [0x2001, 2, 0, 0, 0, 0, 0xf0f0, n] => n,
            _ => return None,
        },
    };
    (1..=SLOTS).contains(&u32::from(n)).then_some(u32::from(n))
}

/// 32-bit FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash: u32, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Kubernetes' limits: a namespace of 63 characters, a name of 253, and the `/`.
const MAX_CLAIM: usize = 63 + 1 + 253;

/// Where an entry has an address, the proxy's connection must come from it.
fn check_address(workload: &Workload, peer: Option<IpAddr>) -> Result<(), Refusal> {
    if workload.address.is_empty() {
        return Ok(());
    }
    let Ok(address) = workload.address.parse::<IpAddr>() else {
        return Err(Refusal::UncheckableAddress {
            workload: workload.name.clone(),
            address: workload.address.clone(),
        });
    };
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    let peer = peer.map(|p| p.to_canonical());
    if peer == Some(address.to_canonical()) {
        return Ok(());
    }
    Err(Refusal::WrongAddress {
        workload: workload.name.clone(),
        address: workload.address.clone(),
        peer: peer.map_or_else(|| "an unknown address".to_owned(), |p| p.to_string()),
    })
}

/// Why the server refuses to tell a proxy which workload it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the claimed workload {claim:?} is not NAMESPACE/NAME (meshward proxy --workload)")]
    Malformed { claim: String },
    #[error(
        "no WorkloadEntry {claim}: the proxy claims a workload the registry does not have (meshward get WorkloadEntry)"
    )]
    NoSuchWorkload { claim: String },
    #[error(
        "workload {workload} runs as {runs_as}; the certificate is {certificate}: a proxy gets a WorkloadEntry only with that entry's identity"
    )]
    WrongIdentity {
        workload: String,
        runs_as: String,
        certificate: String,
    },
    #[error(
        "workload {workload} is at {address}; the proxy connects from {peer}: a proxy gets a WorkloadEntry only from that entry's address"
    )]
    WrongAddress {
        workload: String,
        address: String,
        peer: String,
    },
    #[error(
        "workload {workload} has the address {address:?}, which is not an IP address: the proxy's connection cannot be checked against it"
    )]
    UncheckableAddress { workload: String, address: String },
    #[error(
        "{} WorkloadEntries run as {identity} ({}): the proxy must say which one it is (meshward proxy --workload NAMESPACE/NAME)",
        workloads.len(),
        workloads.join(", ")
    )]
    Ambiguous {
        identity: String,
        workloads: Vec<String>,
    },
    /// Not the registry's refusal but the stream's: a revoked certificate
    /// gets no configuration, whichever workload it is.
    #[error("the proxy's certificate is revoked ({0}): it gets no configuration")]
    Revoked(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(yaml: &str) -> Registry {
        let loaded = meshward_policy::load::load_str("r.yaml", yaml);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        Registry::new(&loaded.registry, "cluster.local")
    }

    #[test]
    fn a_dns_entry_without_endpoints_is_its_own_named_endpoint_and_resolution_travels() {
        let r = registry(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 80, name: http, protocol: HTTP, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: any, namespace: egress}
spec:
  hosts: [any.example]
  addresses: [198.19.0.0/16]
  location: MESH_EXTERNAL
  resolution: NONE
  ports: [{number: 443, name: tls, protocol: TLS}]
"#,
        );
        let api = &r.services["api.example.com"];
        assert_eq!(api.resolution.as_deref(), Some("DNS"));
        assert_eq!(api.endpoints.len(), 1);
        let endpoint = &api.endpoints[0];
        assert_eq!(endpoint.address, "api.example.com");
        assert_eq!(endpoint.ports, BTreeMap::from([(80, 8080), (443, 443)]));
        assert!(endpoint.plaintext);
        let any = &r.services["any.example"];
        assert_eq!(any.resolution.as_deref(), Some("NONE"));
        assert!(any.endpoints.is_empty());
        assert_eq!(any.addresses, vec!["198.19.0.0/16".to_owned()]);
    }

    #[test]
    fn a_destination_rule_sets_its_hosts_load_balancer_by_full_or_short_name() {
        let r = registry(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings.bookinfo.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.18.0.3}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews.bookinfo]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.18.0.4}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews.bookinfo
  trafficPolicy: {loadBalancer: {simple: RANDOM}, connectionPool: {tcp: {maxConnections: 10}}}
"#,
        );
        assert_eq!(
            r.services["ratings.bookinfo.svc.cluster.local"]
                .load_balancer
                .as_deref(),
            Some("ROUND_ROBIN")
        );
        assert_eq!(
            r.services["reviews.bookinfo"].load_balancer.as_deref(),
            Some("RANDOM")
        );
    }

    #[test]
    fn a_destination_rule_that_says_what_meshward_does_not_do_is_warned_about() {
        let loaded = meshward_policy::load::load_str(
            "dr.yaml",
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: ns}
spec:
  host: r
  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}, outlierDetection: {consecutive5xxErrors: 1}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bad, namespace: ns}
spec:
  host: r
  trafficPolicy: {loadBalancer: {simple: FASTEST}}
",
        );
        let text: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(loaded.registry.len(), 1, "{text:#?}");
        for expected in [
            "dr.yaml:6: warning: DestinationRule ns/r: spec.trafficPolicy.loadBalancer.simple: meshward does not pass connections through",
            "warning: DestinationRule ns/r: spec.trafficPolicy.outlierDetection:",
            "warning: DestinationRule ns/r: spec.subsets:",
            "error: DestinationRule ns/bad: spec.trafficPolicy.loadBalancer.simple: \"FASTEST\" is not one of",
        ] {
            assert!(
                text.iter().any(|t| t.contains(expected)),
                "{expected}\n{text:#?}"
            );
        }
    }

    #[test]
    fn endpoints_without_a_proxy_are_marked_plaintext_and_a_port_without_protocol_reads_its_name() {
        let r = registry(
            r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: meshed, namespace: shop}
spec: {address: 198.18.0.2, labels: {app: cart}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: legacy, namespace: shop}
spec: {address: 198.18.0.3, labels: {app: cart, security.istio.io/tlsMode: disabled}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart.shop]
  ports: [{number: 8080, name: grpc-api}]
  workloadSelector: {labels: {app: cart}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.example]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 198.18.0.9}]
"#,
        );
        let cart = &r.services["cart.shop"];
        assert_eq!(cart.ports[&8080], "grpc-api");
        let plaintext: Vec<(&str, bool)> = cart
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.plaintext))
            .collect();
        assert_eq!(plaintext, vec![("198.18.0.2", false), ("198.18.0.3", true)]);
        assert!(
            r.services["db.example"]
                .endpoints
                .iter()
                .all(|e| e.plaintext)
        );
    }

    const BOOKINFO: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {address: 127.0.0.1, ports: {http: 19081}, labels: {app: reviews, version: v1}, serviceAccount: reviews}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {address: 127.0.0.2, ports: {http: 19082}, labels: {app: reviews, version: v2}, serviceAccount: reviews-v2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-other-ns, namespace: other}
spec: {address: 127.0.0.9, labels: {app: reviews}, serviceAccount: evil}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews.bookinfo]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: reviews}}
  subjectAltNames: ["spiffe://cluster.local/ns/bookinfo/sa/reviews-canary"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: bookinfo}
spec:
  hosts: [db.bookinfo]
  ports: [{number: 5432, name: tcp, protocol: TCP, targetPort: 15432}]
  endpoints: [{address: 127.0.0.5, serviceAccount: db}]
"#;

    fn entry(name: &str, hosts: &str, extra: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  hosts: [{hosts}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n{extra}---\n"
        )
    }

    fn addresses(r: &Registry, host: &str) -> (Vec<String>, bool) {
        let s = &r.services[host];
        (s.addresses.clone(), s.auto_allocated)
    }

    #[test]
    fn hosts_without_addresses_get_one_v4_and_one_v6_from_istios_ranges() {
        let r = registry(&format!(
            "{}{}{}",
            entry(
                "a",
                "a.example",
                "  resolution: STATIC\n  endpoints: [{address: 192.0.2.1}]\n"
            ),
            entry("b", "b.example", "  workloadSelector: {labels: {app: b}}\n"),
            entry(
                "c",
                "c.example",
                "  addresses: [192.0.2.10, 10.1.0.0/16]\n  resolution: STATIC\n"
            ),
        ));
        for host in ["a.example", "b.example"] {
            let (addresses, auto) = addresses(&r, host);
            assert!(auto, "{host}");
            let [v4, v6] = addresses.as_slice() else {
                panic!("{host}: {addresses:?}")
            };
            let v4: std::net::Ipv4Addr = v4.parse().unwrap();
            let v6: std::net::Ipv6Addr = v6.parse().unwrap();
            let net4: ipnet::Ipv4Net = "240.240.0.0/16".parse().unwrap();
            let net6: ipnet::Ipv6Net = "2001:2::/48".parse().unwrap();
            assert!(
                net4.contains(&v4) && net6.contains(&v6),
                "{host}: {v4} {v6}"
            );
            assert!(v4 != net4.network() && v4 != net4.broadcast(), "{v4}");
            assert_eq!(
                v6.segments()[7],
                u16::from_be_bytes([v4.octets()[2], v4.octets()[3]]),
                "one slot, both families"
            );
        }
        assert_ne!(addresses(&r, "a.example"), addresses(&r, "b.example"));
        assert_eq!(
            addresses(&r, "c.example"),
            (vec!["192.0.2.10".into(), "10.1.0.0/16".into()], false),
            "an entry's own addresses, as written"
        );
    }

    #[test]
    fn only_entries_istio_allocates_for_get_addresses() {
        let r = registry(&format!(
            "{}{}{}{}{}",
            entry("wild", "'*.wild.example'", "  resolution: STATIC\n  endpoints: [{address: 192.0.2.1}]\n"),
            entry("none", "none.example", "  resolution: NONE\n"),
            entry("unset", "unset.example", ""),
            entry(
                "optout",
                "optout.example",
                "  resolution: DNS\n"
            )
            .replace(
                "name: optout, namespace: ns}",
                "name: optout, namespace: ns, labels: {networking.istio.io/enable-autoallocate-ip: 'false'}}"
            ),
            entry("dns", "dns.example", "  resolution: DNS\n"),
        ));
        for host in [
            "*.wild.example",
            "none.example",
            "unset.example",
            "optout.example",
        ] {
            assert_eq!(addresses(&r, host), (vec![], false), "{host}");
        }
        assert!(addresses(&r, "dns.example").1, "resolution DNS qualifies");
    }

    #[test]
    fn allocation_is_deterministic_and_stable_when_entries_are_added() {
        let entries: Vec<String> = (0..50)
            .map(|i| {
                entry(
                    &format!("s{i}"),
                    &format!("s{i}.example"),
                    "  resolution: DNS\n",
                )
            })
            .collect();
        let base = entries.concat();
        let before = registry(&base);
        // The same entries in another order: the same addresses.
        let reversed: String = entries.iter().rev().map(String::as_str).collect();
        assert_eq!(registry(&reversed).services, before.services);
        // Unrelated entries added: nobody moves.
        let more: String = (0..50)
            .map(|i| {
                entry(
                    &format!("n{i}"),
                    &format!("n{i}.example"),
                    "  resolution: DNS\n",
                )
            })
            .collect();
        let after = registry(&format!("{more}{base}"));
        for (host, service) in &before.services {
            assert_eq!(after.services[host].addresses, service.addresses, "{host}");
        }
        let all: BTreeSet<&String> = after.services.values().flat_map(|s| &s.addresses).collect();
        assert_eq!(all.len(), 200, "every host its own pair");
    }

    #[test]
    fn on_a_collision_the_older_entry_keeps_its_slot() {
        // Two hosts that hash to one slot.
        let mut first_of_slot = std::collections::HashMap::new();
        let (a, b) = (0..)
            .map(|i| format!("h{i}.example"))
            .find_map(|h| {
                let slot = 1 + fnv1a(h.as_bytes()) % SLOTS;
                first_of_slot
                    .get(&slot)
                    .cloned()
                    .map(|o: String| (o, h.clone()))
                    .or_else(|| {
                        first_of_slot.insert(slot, h);
                        None
                    })
            })
            .unwrap();
        // The newer entry's host sorts first, so only the age can keep the
        // older one in its slot.
        let (old, new) = if a < b { (b, a) } else { (a, b) };
        let slot = 1 + fnv1a(old.as_bytes()) % SLOTS;
        let (v4, _) = addresses_of(slot);
        let timed = |name: &str, host: &str, at: &str| {
            entry(name, host, "  resolution: DNS\n").replace(
                "namespace: ns}",
                &format!("namespace: ns, creationTimestamp: '{at}'}}"),
            )
        };
        let alone = registry(&timed("old", &old, "2025-01-01T00:00:00Z"));
        assert_eq!(alone.services[&old].addresses[0], v4.to_string());
        // The newer entry is listed first too: the older still keeps the
        // slot, the newer takes the next one.
        let both = registry(&format!(
            "{}{}",
            timed("a-new", &new, "2026-01-01T00:00:00Z"),
            timed("old", &old, "2025-01-01T00:00:00Z")
        ));
        assert_eq!(
            both.services[&old].addresses,
            alone.services[&old].addresses
        );
        assert_eq!(
            both.services[&new].addresses[0],
            addresses_of(slot % SLOTS + 1).0.to_string()
        );
    }

    #[test]
    fn addresses_written_inside_the_range_are_never_handed_out() {
        let host = "taken.example";
        let slot = 1 + fnv1a(host.as_bytes()) % SLOTS;
        let (v4, _) = addresses_of(slot);
        let r = registry(&format!(
            "{}{}",
            entry(
                "mine",
                "mine.example",
                &format!("  addresses: [{v4}]\n  resolution: STATIC\n")
            ),
            entry("taken", host, "  resolution: DNS\n"),
        ));
        assert_eq!(
            r.services[host].addresses[0],
            addresses_of(slot % SLOTS + 1).0.to_string()
        );
        // A range covering the whole block leaves nothing to allocate.
        let r = registry(&format!(
            "{}{}",
            entry(
                "all",
                "all.example",
                "  addresses: [240.240.0.0/16]\n  resolution: STATIC\n"
            ),
            entry("taken", host, "  resolution: DNS\n"),
        ));
        assert_eq!(addresses(&r, host), (vec![], false));
    }

    #[test]
    fn secure_naming_comes_from_the_selected_workloads_service_accounts() {
        let r = registry(BOOKINFO);
        let reviews = &r.services["reviews.bookinfo"];
        assert_eq!(
            reviews
                .identities
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            [
                "spiffe://cluster.local/ns/bookinfo/sa/reviews",
                "spiffe://cluster.local/ns/bookinfo/sa/reviews-canary",
                "spiffe://cluster.local/ns/bookinfo/sa/reviews-v2",
            ],
            "a workload of another namespace is never selected"
        );
        assert_eq!(reviews.endpoints.len(), 2);
        assert_eq!(
            reviews.endpoints[0].ports[&9080], 19081,
            "the named workload port"
        );
        let db = &r.services["db.bookinfo"];
        assert_eq!(db.endpoints[0].ports[&5432], 15432, "targetPort");
        assert_eq!(
            db.endpoints[0].identity,
            "spiffe://cluster.local/ns/bookinfo/sa/db"
        );
    }

    #[test]
    fn a_proxy_is_the_only_workload_its_identity_and_address_name() {
        let r = registry(BOOKINFO);
        let w = r
            .resolve(
                "spiffe://cluster.local/ns/bookinfo/sa/reviews-v2",
                Some("::ffff:127.0.0.2".parse().unwrap()),
                None,
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            (w.name.as_str(), w.labels["version"].as_str()),
            ("bookinfo/reviews-v2", "v2")
        );
        assert_eq!(
            r.resolve(
                "spiffe://cluster.local/ns/bookinfo/sa/nobody",
                Some(LOCAL),
                None
            ),
            Ok(None),
            "an identity without a WorkloadEntry gets none"
        );
    }

    /// reviews-v1 and reviews-v2 as `meshward up` runs them: one service
    /// account, one address.
    const SHARED: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {address: 127.0.0.1, labels: {app: reviews, version: v1}, serviceAccount: bookinfo-reviews}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {address: 127.0.0.1, labels: {app: reviews, version: v2}, serviceAccount: bookinfo-reviews}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings, namespace: bookinfo}
spec: {labels: {app: ratings}, serviceAccount: bookinfo-ratings}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: details, namespace: bookinfo}
spec: {address: details.example, labels: {app: details}, serviceAccount: bookinfo-details}
"#;

    const REVIEWS: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_correct_claim_picks_that_workload_among_several() {
        let r = registry(SHARED);
        for (claim, version) in [("bookinfo/reviews-v1", "v1"), ("bookinfo/reviews-v2", "v2")] {
            let w = r
                .resolve(REVIEWS, Some(LOCAL), Some(claim))
                .unwrap()
                .unwrap();
            assert_eq!(
                (w.name.as_str(), w.labels["version"].as_str()),
                (claim, version)
            );
        }
        // The IPv4-mapped form of the entry's address is the same address.
        let w = r
            .resolve(
                REVIEWS,
                Some("::ffff:127.0.0.1".parse().unwrap()),
                Some("bookinfo/reviews-v2"),
            )
            .unwrap()
            .unwrap();
        assert_eq!(w.name, "bookinfo/reviews-v2");
        // An entry without an address is claimed by identity alone.
        let w = r
            .resolve(
                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings",
                Some("10.1.2.3".parse().unwrap()),
                Some("bookinfo/ratings"),
            )
            .unwrap()
            .unwrap();
        assert_eq!(w.name, "bookinfo/ratings");
    }

    #[test]
    fn several_candidates_without_a_claim_are_refused_never_picked() {
        let r = registry(SHARED);
        let refusal = r.resolve(REVIEWS, Some(LOCAL), None).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Ambiguous {
                identity: REVIEWS.into(),
                workloads: vec!["bookinfo/reviews-v1".into(), "bookinfo/reviews-v2".into()],
            }
        );
        let text = refusal.to_string();
        assert!(
            text.contains("bookinfo/reviews-v1, bookinfo/reviews-v2")
                && text.contains("--workload"),
            "{text}"
        );
    }

    #[test]
    fn a_claim_with_another_identity_is_refused() {
        let r = registry(SHARED);
        let ratings = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings";
        let refusal = r
            .resolve(ratings, Some(LOCAL), Some("bookinfo/reviews-v2"))
            .unwrap_err();
        assert_eq!(
            refusal.to_string(),
            format!(
                "workload bookinfo/reviews-v2 runs as {REVIEWS}; the certificate is {ratings}: \
                 a proxy gets a WorkloadEntry only with that entry's identity"
            )
        );
    }

    #[test]
    fn a_claim_from_another_address_is_refused() {
        let r = registry(SHARED);
        let refusal = r
            .resolve(
                REVIEWS,
                Some("127.0.0.2".parse().unwrap()),
                Some("bookinfo/reviews-v2"),
            )
            .unwrap_err();
        assert!(
            matches!(&refusal, Refusal::WrongAddress { peer, .. } if peer == "127.0.0.2"),
            "{refusal}"
        );
        // No address known for the connection: nothing to check it against.
        assert!(matches!(
            r.resolve(REVIEWS, None, Some("bookinfo/reviews-v2")),
            Err(Refusal::WrongAddress { .. })
        ));
        // An address that is not an IP cannot be checked: refused, not skipped.
        assert!(matches!(
            r.resolve(
                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details",
                Some(LOCAL),
                Some("bookinfo/details")
            ),
            Err(Refusal::UncheckableAddress { .. })
        ));
    }

    #[test]
    fn the_only_candidate_without_a_claim_must_still_come_from_its_address() {
        let r = registry(BOOKINFO);
        let refusal = r
            .resolve(
                "spiffe://cluster.local/ns/bookinfo/sa/reviews-v2",
                Some(LOCAL),
                None,
            )
            .unwrap_err();
        assert!(matches!(refusal, Refusal::WrongAddress { .. }), "{refusal}");
    }

    #[test]
    fn a_claim_naming_no_entry_or_malformed_is_refused() {
        let r = registry(SHARED);
        assert_eq!(
            r.resolve(REVIEWS, Some(LOCAL), Some("bookinfo/reviews-v3")),
            Err(Refusal::NoSuchWorkload {
                claim: "bookinfo/reviews-v3".into()
            })
        );
        for claim in [
            "reviews-v2",
            "/reviews-v2",
            "bookinfo/",
            "a/b/c",
            "bookinfo/reviews-v2\nERROR a forged log line",
            "bookinfo/reviews v2",
            &"x/".repeat(400),
        ] {
            assert!(
                matches!(
                    r.resolve(REVIEWS, Some(LOCAL), Some(claim)),
                    Err(Refusal::Malformed { claim: kept }) if kept.len() <= MAX_CLAIM
                ),
                "{claim}"
            );
        }
    }
}
