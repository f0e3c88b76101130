//! The workload registry: from `WorkloadEntry` and `ServiceEntry` objects,
//! which workloads exist (namespace, labels, identity) and, per service
//! host, its endpoints and the identities allowed to run it — Istio's
//! secure naming, derived the way istiod derives it from a service's
//! endpoints' service accounts plus the entry's `subjectAltNames`.

use std::collections::{BTreeMap, BTreeSet};

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
                .filter_map(|p| Some((u16::try_from(p.number).ok()?, p.protocol.clone())))
                .collect();
            let mut endpoints = Vec::new();
            let endpoint = |spec: &WorkloadEntrySpec, ns: &str| Endpoint {
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

    /// The workload a proxy with `identity` runs as. When several
    /// WorkloadEntries share the identity, the proxy's address must pick
    /// one; if it matches none of them, none is chosen (the proxy gets its
    /// namespace's policies without labels) rather than another workload's.
    pub fn workload_for(
        &self,
        identity: &str,
        address: Option<std::net::IpAddr>,
    ) -> Option<&Workload> {
        let candidates: Vec<&Workload> = self
            .workloads
            .iter()
            .filter(|w| w.identity == identity)
            .collect();
        let address = address.map(|a| a.to_canonical());
        let by_address = address.and_then(|ip| {
            candidates.iter().copied().find(|w| {
                w.address
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.to_canonical() == ip)
            })
        });
        match (by_address, candidates.as_slice()) {
            (Some(w), _) => Some(w),
            (None, [only]) => Some(only),
            _ => None,
        }
    }
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
    fn a_proxy_is_the_workload_its_identity_and_address_name() {
        let r = registry(BOOKINFO);
        let w = r
            .workload_for(
                "spiffe://cluster.local/ns/bookinfo/sa/reviews-v2",
                Some("::ffff:127.0.0.2".parse().unwrap()),
            )
            .unwrap();
        assert_eq!(
            (w.name.as_str(), w.labels["version"].as_str()),
            ("bookinfo/reviews-v2", "v2")
        );
        assert!(
            r.workload_for("spiffe://cluster.local/ns/bookinfo/sa/nobody", None)
                .is_none()
        );
    }
}
