//! The workload registry: from `WorkloadEntry` and `ServiceEntry` objects,
//! which workloads exist (namespace, labels, identity) and, per service
//! host, its endpoints and the identities allowed to run it — Istio's
//! secure naming, derived the way istiod derives it from a service's
//! endpoints' service accounts plus the entry's `subjectAltNames`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub use meshward_api::resources::{Endpoint, Service};
use meshward_identity::spiffe::SpiffeId;
use meshward_policy::api::{RegistryObject, ServiceEntry, WorkloadEntry, WorkloadEntrySpec};
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
    se.spec.other.get("location").and_then(|v| v.as_str()) == Some("MESH_EXTERNAL")
}

impl Registry {
    pub fn new<'a>(
        objects: impl IntoIterator<Item = &'a RegistryObject>,
        trust_domain: &str,
    ) -> Registry {
        let mut entries: Vec<&WorkloadEntry> = Vec::new();
        let mut services: Vec<&ServiceEntry> = Vec::new();
        for object in objects {
            match object {
                RegistryObject::WorkloadEntry(we) => entries.push(we),
                RegistryObject::ServiceEntry(se) => services.push(se),
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
            for host in &se.spec.hosts {
                let service = by_host
                    .entry(host.to_ascii_lowercase())
                    .or_insert_with(|| Service {
                        host: host.to_ascii_lowercase(),
                        entry: format!("{namespace}/{}", se.metadata.name),
                        ..Service::default()
                    });
                // Several entries for one host merge, as Istio merges them.
                service.ports.extend(ports.clone());
                service.endpoints.extend(endpoints.iter().cloned());
                service.endpoints.sort();
                service.endpoints.dedup();
                service.identities.extend(identities.iter().cloned());
            }
        }
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
