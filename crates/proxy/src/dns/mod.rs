//! The DNS proxy: what Istio's sidecar agent does for DNS, so that an
//! application resolves the mesh's service names without any DNS of the
//! mesh's own.
//!
//! Under capture, the application's DNS (UDP and TCP port 53) is
//! redirected to the proxy's DNS port (15053, on 127.0.0.1 and ::1, where
//! iptables `REDIRECT` delivers locally generated packets). The proxy
//! answers the names of the services it knows ([`names`]) with their
//! addresses — the ServiceEntries' `addresses`, or those the control plane
//! allocated — and forwards every other query to the upstream resolvers
//! ([`forwarder`]). The names come from the services the control plane
//! pushes, and are swapped in whole while serving ([`DnsNames`]).
//!
//! Messages are read and written by the hickory-dns crates; nothing here
//! parses DNS by hand.

pub mod forwarder;
pub mod names;
mod server;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshward_api::resources::Service;
use serde_json::json;
use tokio::sync::watch;

pub use forwarder::Forwarder;
pub use names::NameTable;
pub use server::DnsServer;

/// The DNS port Istio's sidecar agent listens on.
pub const DNS_PORT: u16 = 15053;
/// Where the upstream resolvers are found by default.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Per upstream, when resolv.conf does not say (its own default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the DNS proxy serves and where it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP, each address.
    pub listen: Vec<SocketAddr>,
    /// Empty: the `nameserver`s of `/etc/resolv.conf`.
    pub upstreams: Vec<SocketAddr>,
    /// The proxy's socket mark (`SO_MARK`), put on every upstream socket so
    /// the capture rules let the proxy's own queries out.
    pub mark: Option<u32>,
    /// How long each upstream gets; `None`: resolv.conf's `timeout`, or
    /// [`DEFAULT_TIMEOUT`] with `upstreams` given.
    pub timeout: Option<Duration>,
    /// The names come from a control plane: until its first services
    /// arrive, every query is answered SERVFAIL (the client retries), as
    /// Istio's agent answers before its first name table — forwarded, a
    /// mesh name would get the upstream's NXDOMAIN, which the application
    /// may act on or cache.
    pub await_services: bool,
}

impl DnsConfig {
    /// 127.0.0.1:15053 and [::1]:15053.
    pub fn default_listen() -> Vec<SocketAddr> {
        vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DNS_PORT),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DNS_PORT),
        ]
    }
}

/// Why the DNS proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "reading the upstream resolvers from {}: {reason} (or give --dns-upstream ADDR)",
        path.display()
    )]
    ResolvConf { path: PathBuf, reason: String },
    #[error(
        "no upstream resolver to forward to: /etc/resolv.conf names no nameserver; give --dns-upstream ADDR"
    )]
    NoUpstream,
    #[error(
        "setting the socket mark {mark:#x} on the DNS proxy's sockets: {source} (SO_MARK needs CAP_NET_ADMIN)"
    )]
    Mark { mark: u32, source: std::io::Error },
    #[error(
        "upstream resolver {upstream} is the DNS proxy's own address {listen}: its queries would come back to it"
    )]
    Loop {
        upstream: SocketAddr,
        listen: SocketAddr,
    },
}

/// The names the DNS proxy answers, swapped whole while it serves: the
/// handle the control plane's stream puts services through. `None` until
/// the first services when they are awaited ([`DnsConfig::await_services`]).
#[derive(Clone)]
pub struct DnsNames {
    table: Arc<watch::Sender<Option<Arc<NameTable>>>>,
    namespace: Arc<str>,
}

impl DnsNames {
    /// For a proxy in `namespace` (bare names of this namespace's
    /// Kubernetes-style hosts are answered): no names yet, and, when
    /// `awaiting`, no answers either until [`DnsNames::set_services`].
    pub fn new(namespace: &str, awaiting: bool) -> DnsNames {
        let first = (!awaiting).then(|| Arc::new(NameTable::default()));
        DnsNames {
            table: Arc::new(watch::Sender::new(first)),
            namespace: namespace.into(),
        }
    }

    /// Answers from now on for `services` (every service the proxy knows),
    /// and for nothing else.
    pub fn set_services(&self, services: &[Service]) {
        let table = NameTable::new(services, &self.namespace);
        self.table.send_if_modified(|current| {
            let changed = current.as_deref() != Some(&table);
            if changed {
                *current = Some(Arc::new(table));
            }
            changed
        });
    }

    /// The table in force (empty while the first services are awaited).
    pub fn current(&self) -> Arc<NameTable> {
        self.table.borrow().clone().unwrap_or_default()
    }

    fn subscribe(&self) -> watch::Receiver<Option<Arc<NameTable>>> {
        self.table.subscribe()
    }
}

/// What `/config_dump` shows of the DNS proxy.
pub(crate) struct DnsState {
    pub names: DnsNames,
    pub upstreams: Vec<SocketAddr>,
}

impl DnsState {
    pub fn dump(&self) -> serde_json::Value {
        let awaiting = self.names.table.borrow().is_none();
        let table = self.names.current();
        json!({
            "upstreams": self.upstreams,
            "awaiting_services": awaiting,
            "names": table.names(),
        })
    }
}
