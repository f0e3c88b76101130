//! The names the DNS proxy answers itself, and with which addresses.
//!
//! Built from the services the control plane sends and the proxy's own
//! namespace, as Istio's DNS proxy builds its lookup table: each service
//! host answers with the service's addresses (CIDR ranges are never
//! answered), and a Kubernetes-style host `NAME.NS.svc.cluster.local`
//! also answers as `NAME.NS`, `NAME.NS.svc` and, in the proxy's own
//! namespace, `NAME`. A wildcard host (`*.example.com`) answers every name
//! below it that has no entry of its own. A host without an address
//! (a `NONE` service, say) is not a mesh name: its queries are forwarded.
//!
//! Names are matched without regard to case or a trailing dot.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use hickory_proto::rr::RecordType;
use meshward_api::resources::Service;
use serde::Serialize;

/// The cluster domain Kubernetes-style hosts end with.
const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// The addresses one name answers with, in the order the service lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Addresses {
    /// The host the name stands for (itself, or the host it is a short
    /// form of).
    pub host: String,
    pub addresses: Vec<IpAddr>,
}

/// A snapshot of the names answered locally; replaced whole when services
/// change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    /// By name, lower case, without a trailing dot.
    exact: HashMap<String, Addresses>,
    /// `*.example.com` hosts, by what follows the `*.` (`example.com`).
    wildcard: HashMap<String, Addresses>,
}

impl NameTable {
    /// The table for a proxy in `namespace` that knows `services`.
    pub fn new(services: &[Service], namespace: &str) -> NameTable {
        let namespace = namespace.to_ascii_lowercase();
        let mut table = NameTable::default();
        let mut short_forms: Vec<(String, Addresses)> = Vec::new();
        for service in services {
            let host = normalize(&service.host);
            let addresses: Vec<IpAddr> = service
                .addresses
                .iter()
                // CIDR ranges (and anything else that is not one address)
                // cannot be an answer.
                .filter_map(|a| a.parse().ok())
                .collect();
            if host.is_empty() || addresses.is_empty() {
                continue;
            }
            let entry = Addresses {
                host: host.clone(),
                addresses,
            };
            if let Some(suffix) = host.strip_prefix("*.") {
                merge(&mut table.wildcard, suffix.to_owned(), entry);
                continue;
            }
            if let Some((name, ns)) = kubernetes_parts(&host) {
                short_forms.push((format!("{name}.{ns}"), entry.clone()));
                short_forms.push((format!("{name}.{ns}.svc"), entry.clone()));
                if ns == namespace {
                    short_forms.push((name.to_owned(), entry.clone()));
                }
            }
            merge(&mut table.exact, host, entry);
        }
        // After every written host: one takes precedence over another
        // host's short form of the same name.
        for (name, entry) in short_forms {
            merge(&mut table.exact, name, entry);
        }
        table
    }

    /// What the proxy answers for `name` and `record_type`: `None` when the
    /// name is not the mesh's, or the type is not an address type (the
    /// query is then forwarded); otherwise the addresses of that type,
    /// possibly none (an empty NOERROR answer, never NXDOMAIN, as Istio
    /// answers: the name exists).
    pub fn lookup(&self, name: &str, record_type: RecordType) -> Option<Vec<IpAddr>> {
        let wanted = match record_type {
            RecordType::A => IpAddr::is_ipv4,
            RecordType::AAAA => IpAddr::is_ipv6,
            _ => return None,
        };
        let found = self.find(&normalize(name))?;
        Some(found.addresses.iter().copied().filter(wanted).collect())
    }

    fn find(&self, name: &str) -> Option<&Addresses> {
        if let Some(found) = self.exact.get(name) {
            return Some(found);
        }
        // The most specific wildcard: for a.b.example.com, *.b.example.com
        // before *.example.com.
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(found) = self.wildcard.get(parent) {
                return Some(found);
            }
            rest = parent;
        }
        None
    }

    /// Every name answered, with its addresses, for `/config_dump`.
    pub fn names(&self) -> BTreeMap<String, &Addresses> {
        self.exact
            .iter()
            .map(|(name, a)| (name.clone(), a))
            .chain(self.wildcard.iter().map(|(s, a)| (format!("*.{s}"), a)))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

/// Lower case, no trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `(NAME, NS)` of `NAME.NS.svc.cluster.local`.
fn kubernetes_parts(host: &str) -> Option<(&str, &str)> {
    let (name, ns) = host
        .strip_suffix(CLUSTER_DOMAIN)?
        .strip_suffix('.')?
        .split_once('.')?;
    (!name.is_empty() && !ns.is_empty() && !ns.contains('.')).then_some((name, ns))
}

/// Two services naming one host answer with both's addresses.
fn merge(map: &mut HashMap<String, Addresses>, name: String, entry: Addresses) {
    match map.get_mut(&name) {
        Some(existing) if existing.host == entry.host => {
            for a in entry.addresses {
                if !existing.addresses.contains(&a) {
                    existing.addresses.push(a);
                }
            }
        }
        // A short form two hosts share cannot exist (NAME.NS names one
        // host), except for a host written out as one: that one wins.
        Some(existing) if existing.host == name => {}
        _ => {
            map.insert(name, entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(host: &str, addresses: &[&str]) -> Service {
        Service {
            host: host.into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..Service::default()
        }
    }

    fn ips(list: &[&str]) -> Option<Vec<IpAddr>> {
        Some(list.iter().map(|a| a.parse().unwrap()).collect())
    }

    fn table() -> NameTable {
        NameTable::new(
            &[
                service(
                    "ratings.bookinfo.svc.cluster.local",
                    &["240.240.0.7", "2001:2::f0f0:7"],
                ),
                service("reviews.bookinfo", &["240.240.1.2"]),
                service("db.other.svc.cluster.local", &["192.0.2.5"]),
                service(
                    "legacy.example",
                    &["10.1.0.0/16", "192.0.2.9", "2001:db8::/64"],
                ),
                service("ranges.example", &["10.2.0.0/16"]),
                service("noaddress.example", &[]),
                service("*.wild.example", &["192.0.2.20"]),
                service("*.deep.wild.example", &["192.0.2.21"]),
            ],
            "bookinfo",
        )
    }

    #[test]
    fn a_kubernetes_style_host_answers_in_every_short_form() {
        let t = table();
        for name in [
            "ratings.bookinfo.svc.cluster.local",
            "ratings.bookinfo.svc",
            "ratings.bookinfo",
            "ratings",
        ] {
            assert_eq!(
                t.lookup(name, RecordType::A),
                ips(&["240.240.0.7"]),
                "{name}"
            );
            assert_eq!(
                t.lookup(name, RecordType::AAAA),
                ips(&["2001:2::f0f0:7"]),
                "{name}"
            );
        }
        // Another namespace's service: every form but the bare name.
        for name in ["db.other", "db.other.svc", "db.other.svc.cluster.local"] {
            assert_eq!(t.lookup(name, RecordType::A), ips(&["192.0.2.5"]), "{name}");
        }
        assert_eq!(
            t.lookup("db", RecordType::A),
            None,
            "not in the proxy's namespace"
        );
    }

    #[test]
    fn a_service_entry_host_answers_as_itself() {
        let t = table();
        assert_eq!(
            t.lookup("reviews.bookinfo", RecordType::A),
            ips(&["240.240.1.2"])
        );
        assert_eq!(
            t.lookup("reviews", RecordType::A),
            None,
            "not a Kubernetes host"
        );
        assert_eq!(
            t.lookup("reviews.bookinfo.svc.cluster.local", RecordType::A),
            None
        );
    }

    #[test]
    fn case_and_a_trailing_dot_do_not_matter() {
        let t = table();
        for name in ["Ratings.BookInfo.", "RATINGS", "reviews.bookinfo."] {
            assert!(
                t.lookup(name, RecordType::A).is_some_and(|a| !a.is_empty()),
                "{name}"
            );
        }
    }

    #[test]
    fn a_name_without_an_address_of_the_asked_type_is_answered_empty() {
        let t = table();
        assert_eq!(t.lookup("reviews.bookinfo", RecordType::AAAA), Some(vec![]));
        assert_eq!(
            t.lookup("reviews.bookinfo", RecordType::MX),
            None,
            "not an address type: forwarded"
        );
        assert_eq!(t.lookup("example.test", RecordType::A), None);
    }

    #[test]
    fn cidr_ranges_are_never_answered() {
        let t = table();
        assert_eq!(
            t.lookup("legacy.example", RecordType::A),
            ips(&["192.0.2.9"])
        );
        assert_eq!(t.lookup("legacy.example", RecordType::AAAA), Some(vec![]));
        assert_eq!(
            t.lookup("ranges.example", RecordType::A),
            None,
            "only ranges: not a name to answer"
        );
        assert_eq!(t.lookup("noaddress.example", RecordType::A), None);
    }

    #[test]
    fn wildcard_hosts_answer_the_names_below_them() {
        let t = table();
        assert_eq!(
            t.lookup("a.wild.example", RecordType::A),
            ips(&["192.0.2.20"])
        );
        assert_eq!(
            t.lookup("a.b.wild.example", RecordType::A),
            ips(&["192.0.2.20"])
        );
        assert_eq!(
            t.lookup("a.deep.wild.example", RecordType::A),
            ips(&["192.0.2.21"]),
            "the most specific wildcard"
        );
        assert_eq!(t.lookup("wild.example", RecordType::A), None);
    }

    #[test]
    fn hosts_of_several_services_merge_and_written_hosts_win_over_short_forms() {
        let t = NameTable::new(
            &[
                service("a.example", &["192.0.2.1"]),
                service("A.example.", &["192.0.2.2", "192.0.2.1"]),
                service("x.ns.svc.cluster.local", &["192.0.2.3"]),
                service("x.ns", &["192.0.2.4"]),
            ],
            "ns",
        );
        assert_eq!(
            t.lookup("a.example", RecordType::A),
            ips(&["192.0.2.1", "192.0.2.2"])
        );
        assert_eq!(t.lookup("x.ns", RecordType::A), ips(&["192.0.2.4"]));
        assert_eq!(t.lookup("x.ns.svc", RecordType::A), ips(&["192.0.2.3"]));
        assert_eq!(t.lookup("x", RecordType::A), ips(&["192.0.2.3"]));
    }
}
