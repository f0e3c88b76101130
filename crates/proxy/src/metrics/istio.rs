//! Istio's standard metrics, exported beside meshward's own so that Istio's
//! Grafana dashboards and Kiali's graph read a meshward mesh: Istio's
//! names, types, histogram buckets and label set (that of Istio's sidecar
//! stats filter, without the optional locality labels).
//!
//! | metric | type | counted |
//! |---|---|---|
//! | `istio_requests_total` | counter | every HTTP/gRPC request, once its response is complete |
//! | `istio_request_duration_milliseconds` | histogram | request start to the end of the response |
//! | `istio_request_bytes` | histogram | request body bytes |
//! | `istio_response_bytes` | histogram | response body bytes |
//! | `istio_tcp_connections_opened_total` | counter | TCP connections (not HTTP ones, as Istio) |
//! | `istio_tcp_connections_closed_total` | counter | the same, when they close |
//! | `istio_tcp_received_bytes_total` | counter | bytes from the downstream peer, as they pass |
//! | `istio_tcp_sent_bytes_total` | counter | bytes to the downstream peer, as they pass |
//!
//! Where the labels come from:
//!
//! - `reporter`: `destination` for traffic into this workload, `source`
//!   for traffic out of it.
//! - This proxy's own workload (the destination inbound, the source
//!   outbound): [`Workload::local`] — the WorkloadEntry the control plane
//!   says this proxy serves, else the `service.istio.io/workload-name`
//!   label, else the identity's service account (Istio's fallbacks); the
//!   canonical service and revision from the labels by Istio's rules.
//! - The peer: known only by its verified SPIFFE ID ([`Workload::peer`]).
//!   Istio's sidecars learn the peer's workload, app and version through
//!   metadata exchange; meshward has none, so the peer's workload is named
//!   by its service account and its namespace is the identity's; its
//!   canonical service, revision, app and version are `unknown`. A
//!   plaintext peer is `unknown` throughout.
//! - `*_principal`: `spiffe://…` identities from the mutual TLS session
//!   (inbound: the client's, and this workload's own; outbound: this
//!   workload's own and the server's verified one); `unknown` in plaintext.
//! - `destination_service`: outbound, the service called (its host, as
//!   configured or from the registry); inbound, the known service the
//!   request's `Host` names, else the one service whose identities include
//!   this workload's, else `unknown`. `destination_service_name` is the
//!   host (Istio names a ServiceEntry's services by their host) and
//!   `destination_service_namespace` its entry's namespace, when known.
//! - `*_cluster`: [`CLUSTER`] for this workload and for peers with a mesh
//!   identity: a meshward mesh is one cluster.
//! - `connection_security_policy`: `mutual_tls` or `none`, on both sides
//!   (Istio's sidecars write `unknown` on the source side; meshward knows).
//!
//! Every label value is bounded: it comes from configuration (this
//! workload, the registry's services) or from a verified certificate, never
//! from what a client writes — a `Host` that names no known service does
//! not become a label value, and paths never do.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use super::recent::Recent;
use meshward_identity::spiffe::SpiffeId;
use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A value that is not known, as Istio writes it.
pub const UNKNOWN: &str = "unknown";

/// The cluster every workload of a meshward mesh is in. Istio names the
/// cluster of every known workload (`Kubernetes` by default), and Kiali
/// drops series whose namespace is known but whose cluster is `unknown`.
pub const CLUSTER: &str = "meshward";

/// Envoy's default histogram buckets, which Istio's histograms use:
/// milliseconds for durations, bytes for sizes.
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Canonical service name labels, in Istio's order of precedence.
const NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// Canonical revision labels, in Istio's order of precedence.
const REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];
/// A WorkloadEntry's label naming its workload (Istio's
/// `service.istio.io/workload-name`).
const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

static UNKNOWN_VALUE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(UNKNOWN));

fn unknown() -> Arc<str> {
    UNKNOWN_VALUE.clone()
}

/// Who reports: the proxy of the destination (inbound) or of the source
/// (outbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// `request_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
    Tcp,
}

impl Protocol {
    /// `grpc` for a gRPC request, else `http`.
    pub fn http(grpc: bool) -> Protocol {
        if grpc { Protocol::Grpc } else { Protocol::Http }
    }
}

/// `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    MutualTls,
    None,
}

impl SecurityPolicy {
    pub fn of(mutual_tls: bool) -> SecurityPolicy {
        if mutual_tls {
            SecurityPolicy::MutualTls
        } else {
            SecurityPolicy::None
        }
    }
}

/// `response_flags`: Envoy's short names for why a request or connection
/// went wrong; `-` when nothing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResponseFlags {
    #[default]
    None,
    /// `UH`: no endpoint to send it to (also the `BlackHoleCluster`).
    NoHealthyUpstream,
    /// `UF`: the upstream could not be reached, or failed before answering.
    UpstreamConnectionFailure,
    /// `UAEX`: denied by a CUSTOM (external) authorizer.
    UnauthorizedExternalService,
    /// `DPE`: a request the proxy refused as malformed.
    DownstreamProtocolError,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::NoHealthyUpstream => "UH",
            ResponseFlags::UpstreamConnectionFailure => "UF",
            ResponseFlags::UnauthorizedExternalService => "UAEX",
            ResponseFlags::DownstreamProtocolError => "DPE",
        }
    }
}

macro_rules! label_value {
    ($($ty:ty => |$v:ident| $e:expr),* $(,)?) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                let $v = self;
                EncodeLabelValue::encode(&$e, encoder)
            }
        }
    )*};
}

label_value! {
    Reporter => |r| match r { Reporter::Source => "source", Reporter::Destination => "destination" },
    Protocol => |p| match p { Protocol::Http => "http", Protocol::Grpc => "grpc", Protocol::Tcp => "tcp" },
    SecurityPolicy => |s| match s { SecurityPolicy::MutualTls => "mutual_tls", SecurityPolicy::None => "none" },
    ResponseFlags => |f| f.as_str(),
}

/// A workload as Istio's labels name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub cluster: Arc<str>,
}

impl Workload {
    /// Nothing known: a plaintext peer, or no connection.
    pub fn unknown() -> Workload {
        Workload {
            name: unknown(),
            namespace: unknown(),
            canonical_service: unknown(),
            canonical_revision: unknown(),
            app: unknown(),
            version: unknown(),
            cluster: unknown(),
        }
    }

    /// A peer known by its verified SPIFFE ID: with Istio's `ns/N/sa/S`
    /// form, its workload is named by the service account `S` (there is no
    /// metadata exchange to learn more) in namespace `N`, in this mesh's
    /// cluster; anything else is `unknown`.
    pub fn peer(id: &str) -> Workload {
        let Some((namespace, account)) = SpiffeId::parse(id)
            .ok()
            .and_then(|id| id.istio_parts().map(|(n, s)| (Arc::from(n), Arc::from(s))))
        else {
            return Workload::unknown();
        };
        Workload {
            name: account,
            namespace,
            cluster: Arc::from(CLUSTER),
            ..Workload::unknown()
        }
    }

    /// This proxy's own workload: `entry` is the WorkloadEntry
    /// (`namespace/name`) the control plane says it serves. Its name is,
    /// as Istio derives it for a WorkloadEntry, the
    /// `service.istio.io/workload-name` label, else the entry's name, else
    /// (no entry known) the identity's service account; its canonical
    /// service and revision are Istio's (`service.istio.io/canonical-*`,
    /// `app.kubernetes.io/*`, `app`/`version`, else the workload name and
    /// `latest`); `app` and `version` are those labels, else the
    /// canonical ones.
    pub fn local(
        id: &SpiffeId,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        entry: Option<&str>,
    ) -> Workload {
        let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).map(String::as_str);
        let name = label(&[WORKLOAD_NAME_LABEL])
            .or_else(|| entry.map(|e| e.rsplit_once('/').map_or(e, |(_, name)| name)))
            .or_else(|| id.istio_parts().map(|(_, account)| account))
            .filter(|n| !n.is_empty())
            .unwrap_or(UNKNOWN);
        let namespace = Some(namespace)
            .filter(|n| !n.is_empty())
            .or_else(|| id.istio_parts().map(|(ns, _)| ns))
            .unwrap_or(UNKNOWN);
        let canonical_service = label(&NAME_LABELS).unwrap_or(name);
        let canonical_revision = label(&REVISION_LABELS).unwrap_or("latest");
        Workload {
            name: Arc::from(name),
            namespace: Arc::from(namespace),
            app: Arc::from(label(&["app"]).unwrap_or(canonical_service)),
            version: Arc::from(label(&["version"]).unwrap_or(canonical_revision)),
            canonical_service: Arc::from(canonical_service),
            canonical_revision: Arc::from(canonical_revision),
            cluster: Arc::from(CLUSTER),
        }
    }
}

/// `destination_service`, `_name` and `_namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub host: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
}

impl Service {
    pub fn unknown() -> Service {
        Service {
            host: unknown(),
            name: unknown(),
            namespace: unknown(),
        }
    }

    /// A service by its host, in `namespace` when known. Istio names the
    /// services of a ServiceEntry by their host, so the name is the host.
    pub fn new(host: &str, namespace: Option<&str>) -> Service {
        let host: Arc<str> = Arc::from(host);
        Service {
            name: host.clone(),
            host,
            namespace: namespace
                .filter(|n| !n.is_empty())
                .map_or_else(unknown, Arc::from),
        }
    }
}

/// The labels of every Istio metric: TCP's whole set, and HTTP's without
/// `response_code` and `grpc_response_status`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source: Arc<Workload>,
    pub source_principal: Arc<str>,
    pub destination: Arc<Workload>,
    pub destination_principal: Arc<str>,
    pub service: Arc<Service>,
    pub protocol: Protocol,
    pub response_flags: ResponseFlags,
    pub security: SecurityPolicy,
}

impl TrafficLabels {
    pub fn with_flags(mut self, flags: ResponseFlags) -> TrafficLabels {
        self.response_flags = flags;
        self
    }

    /// Istio's labels in Istio's order; `response` (the HTTP status and the
    /// gRPC status, empty when there is none) for request metrics.
    fn encode(
        &self,
        encoder: &mut LabelSetEncoder,
        response: Option<(u16, Option<u32>)>,
    ) -> Result<(), std::fmt::Error> {
        /// A label value by reference (prometheus-client encodes owned ones).
        struct Ref<'a, V>(&'a V);
        impl<V: EncodeLabelValue> EncodeLabelValue for Ref<'_, V> {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                self.0.encode(encoder)
            }
        }
        fn label(
            encoder: &mut LabelSetEncoder,
            key: &str,
            value: &impl EncodeLabelValue,
        ) -> Result<(), std::fmt::Error> {
            (key, Ref(value)).encode(encoder.encode_label())
        }
        let (s, d) = (&*self.source, &*self.destination);
        label(encoder, "reporter", &self.reporter)?;
        label(encoder, "source_workload", &s.name)?;
        label(encoder, "source_canonical_service", &s.canonical_service)?;
        label(encoder, "source_canonical_revision", &s.canonical_revision)?;
        label(encoder, "source_workload_namespace", &s.namespace)?;
        label(encoder, "source_principal", &self.source_principal)?;
        label(encoder, "source_app", &s.app)?;
        label(encoder, "source_version", &s.version)?;
        label(encoder, "source_cluster", &s.cluster)?;
        label(encoder, "destination_workload", &d.name)?;
        label(encoder, "destination_workload_namespace", &d.namespace)?;
        label(
            encoder,
            "destination_principal",
            &self.destination_principal,
        )?;
        label(encoder, "destination_app", &d.app)?;
        label(encoder, "destination_version", &d.version)?;
        label(encoder, "destination_service", &self.service.host)?;
        label(
            encoder,
            "destination_canonical_service",
            &d.canonical_service,
        )?;
        label(
            encoder,
            "destination_canonical_revision",
            &d.canonical_revision,
        )?;
        label(encoder, "destination_service_name", &self.service.name)?;
        label(
            encoder,
            "destination_service_namespace",
            &self.service.namespace,
        )?;
        label(encoder, "destination_cluster", &d.cluster)?;
        label(encoder, "request_protocol", &self.protocol)?;
        if let Some((code, grpc)) = response {
            label(encoder, "response_code", &code)?;
            label(encoder, "grpc_response_status", &grpc)?;
        }
        label(encoder, "response_flags", &self.response_flags)?;
        label(encoder, "connection_security_policy", &self.security)
    }
}

impl EncodeLabelSet for TrafficLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        TrafficLabels::encode(self, encoder, None)
    }
}

/// The labels of an HTTP or gRPC request's metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub traffic: TrafficLabels,
    /// The HTTP status the client got (200 for a gRPC error, which is in
    /// `grpc_status`).
    pub response_code: u16,
    /// gRPC requests only: the `grpc-status` of the response's headers or
    /// trailers.
    pub grpc_status: Option<u32>,
}

impl RequestLabels {
    /// `traffic`'s labels with the HTTP status and the gRPC status.
    pub fn new(traffic: TrafficLabels, (response_code, grpc_status): (u16, Option<u32>)) -> Self {
        RequestLabels {
            traffic,
            response_code,
            grpc_status,
        }
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.traffic
            .encode(encoder, Some((self.response_code, self.grpc_status)))
    }
}

/// What the labels are drawn from: this workload and the services known.
#[derive(Clone)]
struct Known {
    /// This workload's SPIFFE ID.
    principal: Arc<str>,
    local: Arc<Workload>,
    /// Known services by host.
    services: BTreeMap<String, Arc<Service>>,
    /// The one known service whose identities include this workload's
    /// (what an inbound request is for when its `Host` names none).
    served: Option<Arc<Service>>,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Istio's standard metrics, and what their labels are drawn from.
pub struct IstioMetrics {
    requests: Family<RequestLabels, Counter>,
    request_duration: Histograms<RequestLabels>,
    request_bytes: Histograms<RequestLabels>,
    response_bytes: Histograms<RequestLabels>,
    tcp_opened: Family<TrafficLabels, Counter>,
    tcp_closed: Family<TrafficLabels, Counter>,
    tcp_received: Family<TrafficLabels, Counter>,
    tcp_sent: Family<TrafficLabels, Counter>,
    known: RwLock<Arc<Known>>,
}

impl IstioMetrics {
    /// Registers every family in `registry`, which prefixes them `istio_`.
    pub fn register(registry: &mut Registry) -> IstioMetrics {
        let histograms = || Histograms::new_with_constructor(histogram as fn() -> Histogram);
        let metrics = IstioMetrics {
            requests: Family::default(),
            request_duration: histograms(),
            request_bytes: histograms(),
            response_bytes: histograms(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_received: Family::default(),
            tcp_sent: Family::default(),
            known: RwLock::new(Arc::new(Known {
                principal: unknown(),
                local: Arc::new(Workload::unknown()),
                services: BTreeMap::new(),
                served: None,
            })),
        };
        registry.register(
            "requests",
            "Requests handled by the proxy (Istio's request count)",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_milliseconds",
            "Duration of requests, to the end of the response",
            metrics.request_duration.clone(),
        );
        registry.register(
            "request_bytes",
            "HTTP request body sizes",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "response_bytes",
            "HTTP response body sizes",
            metrics.response_bytes.clone(),
        );
        registry.register(
            "tcp_connections_opened",
            "TCP connections opened",
            metrics.tcp_opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP connections closed",
            metrics.tcp_closed.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes received during request in case of a TCP connection",
            metrics.tcp_received.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent during response in case of a TCP connection",
            metrics.tcp_sent.clone(),
        );
        metrics
    }

    fn known(&self) -> Arc<Known> {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn update(&self, change: impl FnOnce(&mut Known)) {
        let mut known = self
            .known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Known::clone(&known);
        change(&mut next);
        *known = Arc::new(next);
    }

    /// This proxy's identity and workload (see [`Workload::local`]).
    pub fn set_local(
        &self,
        id: &SpiffeId,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        entry: Option<&str>,
    ) {
        let local = Arc::new(Workload::local(id, namespace, labels, entry));
        self.update(|known| {
            known.principal = Arc::from(id.to_string());
            known.local = local;
        });
    }

    /// This proxy's workload as the labels name it.
    pub fn local(&self) -> Arc<Workload> {
        self.known().local.clone()
    }

    /// The services of the registry, replacing those known before.
    pub fn set_services<'a>(
        &self,
        services: impl IntoIterator<Item = &'a meshward_api::resources::Service>,
    ) {
        self.update(|known| {
            let mut served = Vec::new();
            known.services = services
                .into_iter()
                .map(|s| {
                    let namespace = s.entry.split_once('/').map(|(ns, _)| ns);
                    let service = Arc::new(Service::new(&s.host, namespace));
                    if s.identities.contains(&*known.principal) {
                        served.push(service.clone());
                    }
                    (s.host.clone(), service)
                })
                .collect();
            known.served = match served.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            };
        });
    }

    /// The service whose host is `host` (one this workload calls), with its
    /// namespace when the registry knows it.
    fn service(known: &Known, host: &str) -> Arc<Service> {
        known
            .services
            .get(host)
            .cloned()
            .unwrap_or_else(|| Arc::new(Service::new(host, None)))
    }

    /// What an inbound request is for: the known service `authority` names
    /// (its host, or a shorter form of it: `ratings.bookinfo` for
    /// `ratings.bookinfo.svc.cluster.local`, when only one fits), else the
    /// one this workload serves, else `unknown`. A client's `Host` only
    /// selects among known services; it never becomes a value itself.
    fn inbound_service(known: &Known, authority: Option<&str>) -> Arc<Service> {
        let host = authority
            .and_then(|a| a.parse::<http::uri::Authority>().ok())
            .map(|a| a.host().trim_end_matches('.').to_ascii_lowercase());
        let named = host.as_deref().and_then(|host| {
            if let Some(service) = known.services.get(host) {
                return Some(service.clone());
            }
            let mut longer = known
                .services
                .range::<str, _>((std::ops::Bound::Excluded(host), std::ops::Bound::Unbounded))
                .take_while(|(h, _)| h.starts_with(host))
                .filter(|(h, _)| h.as_bytes().get(host.len()) == Some(&b'.'));
            match (longer.next(), longer.next()) {
                (Some((_, service)), None) => Some(service.clone()),
                _ => None,
            }
        });
        named
            .or_else(|| known.served.clone())
            .unwrap_or_else(|| Arc::new(Service::unknown()))
    }

    /// The labels of traffic into this workload from `peer` (its verified
    /// SPIFFE ID; `None` for plaintext), for the service `authority` names.
    pub fn inbound(
        &self,
        peer: Option<&str>,
        authority: Option<&str>,
        protocol: Protocol,
    ) -> TrafficLabels {
        let known = self.known();
        TrafficLabels {
            reporter: Reporter::Destination,
            source: Arc::new(peer.map_or_else(Workload::unknown, Workload::peer)),
            source_principal: peer.map_or_else(unknown, Arc::from),
            destination: known.local.clone(),
            destination_principal: match peer {
                Some(_) => known.principal.clone(),
                None => unknown(),
            },
            service: Self::inbound_service(&known, authority),
            protocol,
            response_flags: ResponseFlags::None,
            security: SecurityPolicy::of(peer.is_some()),
        }
    }

    /// The labels of traffic from this workload to the service `host`,
    /// answered by `server` (its verified SPIFFE ID; `None` in plaintext
    /// or when no server answered), over mutual TLS or not.
    pub fn outbound(
        &self,
        host: &str,
        server: Option<&str>,
        mutual_tls: bool,
        protocol: Protocol,
    ) -> TrafficLabels {
        let known = self.known();
        TrafficLabels {
            reporter: Reporter::Source,
            source: known.local.clone(),
            source_principal: if mutual_tls {
                known.principal.clone()
            } else {
                unknown()
            },
            destination: Arc::new(server.map_or_else(Workload::unknown, Workload::peer)),
            destination_principal: server.map_or_else(unknown, Arc::from),
            service: Self::service(&known, host),
            protocol,
            response_flags: ResponseFlags::None,
            security: SecurityPolicy::of(mutual_tls),
        }
    }

    /// Counts one HTTP or gRPC request.
    pub fn request(
        &self,
        labels: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.handles(labels)
            .record(duration, request_bytes, response_bytes);
    }

    /// The four request metrics of `labels`, fetched once.
    pub fn handles(&self, labels: &RequestLabels) -> RequestHandles {
        RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.request_duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// The request metrics of an inbound request from `peer` for the
    /// service `authority` names, as `connection` keeps them.
    pub fn inbound_request(
        &self,
        connection: &ConnRequests,
        peer: Option<&str>,
        authority: &str,
        protocol: Protocol,
        response: (u16, Option<u32>),
    ) -> RequestHandles {
        let key = (authority, None, protocol, response);
        self.kept(connection, key, || {
            self.inbound(peer, Some(authority), protocol)
        })
    }

    /// The request metrics of an outbound request to the service `host`,
    /// answered by `server`, as `connection` keeps them.
    pub fn outbound_request(
        &self,
        connection: &ConnRequests,
        host: &str,
        server: Option<&str>,
        mutual_tls: bool,
        protocol: Protocol,
        response: (u16, Option<u32>),
    ) -> RequestHandles {
        let key = (host, server, protocol, response);
        self.kept(connection, key, || {
            self.outbound(host, server, mutual_tls, protocol)
        })
    }

    /// The handles `connection` keeps for `(host, server, protocol,
    /// response)` under what is known now, or those of `traffic`'s labels.
    fn kept(
        &self,
        connection: &ConnRequests,
        (host, server, protocol, response): (&str, Option<&str>, Protocol, (u16, Option<u32>)),
        traffic: impl FnOnce() -> TrafficLabels,
    ) -> RequestHandles {
        let known = self.known();
        connection.0.get(
            |key| key.is(&known, host, server, protocol, response),
            || {
                let labels = RequestLabels::new(traffic(), response);
                let key = RequestKey::new(&known, host, server, protocol, response);
                (key, self.handles(&labels))
            },
        )
    }

    /// Counts a request the proxy answered itself (a denial, an error),
    /// whose response is whole: its status, its `grpc-status` for gRPC,
    /// its body's size.
    pub fn local_reply<B: hyper::body::Body>(
        &self,
        traffic: TrafficLabels,
        response: &http::Response<B>,
        duration: Duration,
        request_bytes: u64,
    ) {
        let grpc_status = match traffic.protocol {
            Protocol::Grpc => crate::http::grpc_status_in(response.headers()),
            _ => None,
        };
        let labels = RequestLabels {
            traffic,
            response_code: response.status().as_u16(),
            grpc_status,
        };
        let response_bytes = response.body().size_hint().exact().unwrap_or(0);
        self.request(&labels, duration, request_bytes, response_bytes);
    }

    /// Counts a TCP connection opened; it is counted closed when the
    /// returned value is dropped.
    pub fn tcp_opened(&self, labels: &TrafficLabels) -> TcpConnection {
        self.tcp_opened.get_or_create(labels).inc();
        TcpConnection {
            closed: self.tcp_closed.get_or_create(labels).clone(),
            received: self.tcp_received.get_or_create(labels).clone(),
            sent: self.tcp_sent.get_or_create(labels).clone(),
        }
    }
}

/// One label set's request metrics: counting through these is counting
/// in their families.
#[derive(Clone)]
pub struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestHandles {
    /// Counts one request: its histograms first, so that a scrape that
    /// counts it also has its observations.
    pub fn record(&self, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.duration.observe(duration.as_secs_f64() * 1e3);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
        self.requests.inc();
    }
}

/// The request metrics one connection has fetched (see [`super::recent`]).
#[derive(Default)]
pub struct ConnRequests(Recent<RequestKey, RequestHandles>);

/// What a request's labels were drawn from, besides the connection's own
/// peer: what was known then (a change of the services or of this
/// workload makes new labels), the host, the answering server, the
/// protocol and the response.
pub struct RequestKey {
    known: Arc<Known>,
    host: Box<str>,
    server: Option<Box<str>>,
    protocol: Protocol,
    response: (u16, Option<u32>),
}

impl RequestKey {
    fn new(
        known: &Arc<Known>,
        host: &str,
        server: Option<&str>,
        protocol: Protocol,
        response: (u16, Option<u32>),
    ) -> RequestKey {
        RequestKey {
            known: known.clone(),
            host: host.into(),
            server: server.map(Into::into),
            protocol,
            response,
        }
    }

    fn is(
        &self,
        known: &Arc<Known>,
        host: &str,
        server: Option<&str>,
        protocol: Protocol,
        response: (u16, Option<u32>),
    ) -> bool {
        Arc::ptr_eq(&self.known, known)
            && *self.host == *host
            && self.server.as_deref() == server
            && self.protocol == protocol
            && self.response == response
    }
}

/// An open TCP connection's counters: its bytes both ways (see
/// [`crate::io::Metered`]), and its close, counted on drop.
pub struct TcpConnection {
    closed: Counter,
    /// Bytes from the downstream peer.
    pub received: Counter,
    /// Bytes to the downstream peer.
    pub sent: Counter,
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        self.closed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scrape;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn metrics() -> (Registry, IstioMetrics) {
        let mut registry = Registry::default();
        let metrics = IstioMetrics::register(registry.sub_registry_with_prefix("istio"));
        (registry, metrics)
    }

    fn scrape(registry: &Registry) -> Scrape {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        Scrape::parse(&text).unwrap()
    }

    fn service(host: &str, entry: &str, identities: &[&str]) -> meshward_api::resources::Service {
        meshward_api::resources::Service {
            host: host.into(),
            entry: entry.into(),
            identities: identities.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_local_workload_is_named_as_istio_names_a_workload_entry() {
        let reviews = id("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews");
        let v2 = labels(&[("app", "reviews"), ("version", "v2")]);
        let w = Workload::local(&reviews, "bookinfo", &v2, Some("bookinfo/reviews-v2"));
        assert_eq!(&*w.name, "reviews-v2");
        assert_eq!(&*w.namespace, "bookinfo");
        assert_eq!(
            (&*w.canonical_service, &*w.canonical_revision),
            ("reviews", "v2")
        );
        assert_eq!((&*w.app, &*w.version), ("reviews", "v2"));
        assert_eq!(&*w.cluster, CLUSTER);

        // No entry known: the workload-name label, else the service account.
        let named = labels(&[(WORKLOAD_NAME_LABEL, "reviews")]);
        assert_eq!(
            &*Workload::local(&reviews, "bookinfo", &named, None).name,
            "reviews"
        );
        let bare = Workload::local(&reviews, "", &BTreeMap::new(), None);
        assert_eq!(&*bare.name, "bookinfo-reviews");
        assert_eq!(&*bare.namespace, "bookinfo", "the identity's namespace");
        assert_eq!(
            (&*bare.canonical_service, &*bare.canonical_revision),
            ("bookinfo-reviews", "latest"),
            "Istio's fallbacks: the workload name and `latest`"
        );
        assert_eq!((&*bare.app, &*bare.version), ("bookinfo-reviews", "latest"));

        // Istio's precedence among the canonical labels.
        let all = labels(&[
            ("service.istio.io/canonical-name", "canon"),
            ("app.kubernetes.io/name", "k8s"),
            ("app", "plain"),
            ("app.kubernetes.io/version", "1.2"),
            ("version", "v1"),
        ]);
        let w = Workload::local(&reviews, "bookinfo", &all, None);
        assert_eq!(
            (&*w.canonical_service, &*w.canonical_revision),
            ("canon", "1.2")
        );
        assert_eq!((&*w.app, &*w.version), ("plain", "v1"));
    }

    #[test]
    fn a_peer_is_known_by_its_verified_identity_only() {
        let p = Workload::peer("spiffe://cluster.local/ns/sleep/sa/sleep-sa");
        assert_eq!((&*p.name, &*p.namespace), ("sleep-sa", "sleep"));
        assert_eq!(&*p.cluster, CLUSTER);
        for unknown in [
            &p.canonical_service,
            &p.canonical_revision,
            &p.app,
            &p.version,
        ] {
            assert_eq!(&**unknown, UNKNOWN);
        }
        assert_eq!(
            Workload::peer("spiffe://cluster.local/custom/path"),
            Workload::unknown()
        );
        assert_eq!(Workload::peer("not an id"), Workload::unknown());
    }

    #[test]
    fn a_connections_kept_handles_follow_what_is_known() {
        let (registry, m) = metrics();
        let connection = ConnRequests::default();
        let count = || {
            let handles = m.inbound_request(
                &connection,
                None,
                "api.web:8080",
                Protocol::Http,
                (200, None),
            );
            handles.record(Duration::from_millis(1), 0, 0);
        };
        // Requests counted under `service`, in how many series.
        let requests = |service: &str| {
            let scraped = scrape(&registry);
            let series: Vec<f64> = scraped
                .iter()
                .filter(|(name, labels, _)| {
                    *name == "istio_requests_total"
                        && labels.get("destination_service").map(String::as_str) == Some(service)
                })
                .map(|(_, _, value)| value)
                .collect();
            (series.len() == 1).then(|| series[0])
        };
        count();
        count();
        assert_eq!(requests(UNKNOWN), Some(2.0), "one label set, kept");
        // The service becomes known: the same host now counts under it.
        m.set_services([&service(
            "api.web",
            "web/api",
            &["spiffe://cluster.local/ns/web/sa/api"],
        )]);
        count();
        assert_eq!(requests("api.web"), Some(1.0));
        assert_eq!(requests(UNKNOWN), Some(2.0));
    }

    #[test]
    fn an_inbound_host_only_selects_among_known_services() {
        let (_, m) = metrics();
        let web = id("spiffe://cluster.local/ns/web/sa/web");
        m.set_local(&web, "web", &BTreeMap::new(), Some("web/web-v1"));
        let for_host = |authority: Option<&str>| {
            m.inbound(None, authority, Protocol::Http)
                .service
                .host
                .to_string()
        };
        assert_eq!(for_host(Some("anything")), UNKNOWN, "no service known yet");
        m.set_services([
            &service(
                "web.web",
                "web/web",
                &["spiffe://cluster.local/ns/web/sa/web"],
            ),
            &service(
                "web.web.svc.cluster.local",
                "web/web-k8s",
                &["spiffe://cluster.local/ns/web/sa/other"],
            ),
            &service(
                "api.web",
                "web/api",
                &["spiffe://cluster.local/ns/web/sa/other"],
            ),
        ]);
        assert_eq!(
            for_host(Some("api.web:8080")),
            "api.web",
            "named by its host"
        );
        assert_eq!(
            for_host(Some("API.web.")),
            "api.web",
            "case and a trailing dot"
        );
        assert_eq!(
            for_host(Some("web.web.svc")),
            "web.web.svc.cluster.local",
            "a short form"
        );
        assert_eq!(
            for_host(Some("evil.example")),
            "web.web",
            "a host naming no known service: the one this workload serves"
        );
        assert_eq!(
            for_host(Some("web")),
            "web.web",
            "`web` is short for two services, so it names neither"
        );
        assert_eq!(for_host(None), "web.web");
        let inbound = m.inbound(None, Some("api.web"), Protocol::Http);
        assert_eq!(&*inbound.service.namespace, "web");
        assert_eq!(&*inbound.service.name, "api.web");

        // Two services with this identity: none is the one it serves.
        m.set_services([
            &service("a.web", "web/a", &["spiffe://cluster.local/ns/web/sa/web"]),
            &service("b.web", "web/b", &["spiffe://cluster.local/ns/web/sa/web"]),
        ]);
        assert_eq!(for_host(Some("evil.example")), UNKNOWN);
        assert_eq!(for_host(Some("b.web")), "b.web");
    }

    #[test]
    fn labels_are_istios_both_ways() {
        let (_, m) = metrics();
        let sleep = id("spiffe://cluster.local/ns/sleep/sa/sleep");
        m.set_local(
            &sleep,
            "sleep",
            &labels(&[("app", "sleep")]),
            Some("sleep/sleep"),
        );
        m.set_services([&service("web.web", "web/web", &[])]);
        let out = m.outbound(
            "web.web",
            Some("spiffe://cluster.local/ns/web/sa/web"),
            true,
            Protocol::Grpc,
        );
        assert_eq!(out.reporter, Reporter::Source);
        assert_eq!(&*out.source.name, "sleep");
        assert_eq!(
            &*out.source_principal,
            "spiffe://cluster.local/ns/sleep/sa/sleep"
        );
        assert_eq!(&*out.destination.name, "web");
        assert_eq!(
            &*out.destination_principal,
            "spiffe://cluster.local/ns/web/sa/web"
        );
        assert_eq!(*out.service, Service::new("web.web", Some("web")));
        assert_eq!(out.security, SecurityPolicy::MutualTls);

        let plain = m.outbound("legacy.example", None, false, Protocol::Tcp);
        assert_eq!(&*plain.source_principal, UNKNOWN);
        assert_eq!(*plain.destination, Workload::unknown());
        assert_eq!(*plain.service, Service::new("legacy.example", None));
        assert_eq!(&*plain.service.namespace, UNKNOWN);
        assert_eq!(plain.security, SecurityPolicy::None);

        let plaintext_in = m.inbound(None, None, Protocol::Http);
        assert_eq!(plaintext_in.reporter, Reporter::Destination);
        assert_eq!(
            &*plaintext_in.destination_principal, UNKNOWN,
            "as Istio: no TLS, no principal"
        );
        assert_eq!(&*plaintext_in.destination.name, "sleep");
    }

    #[test]
    fn families_names_buckets_and_label_set_are_istios() {
        let (registry, m) = metrics();
        let web = id("spiffe://cluster.local/ns/web/sa/web");
        m.set_local(
            &web,
            "web",
            &labels(&[("app", "web"), ("version", "v1")]),
            Some("web/web-v1"),
        );
        let traffic = m.inbound(
            Some("spiffe://cluster.local/ns/sleep/sa/sleep"),
            None,
            Protocol::Grpc,
        );
        let request = RequestLabels {
            traffic: traffic.clone(),
            response_code: 200,
            grpc_status: Some(7),
        };
        m.request(&request, Duration::from_micros(700), 5, 2000);
        {
            let tcp = traffic.clone();
            let conn = m.tcp_opened(&TrafficLabels {
                protocol: Protocol::Tcp,
                ..tcp
            });
            conn.received.inc_by(3);
            conn.sent.inc_by(4);
        }
        let scrape = scrape(&registry);
        let common = [
            ("reporter", "destination"),
            ("source_workload", "sleep"),
            ("source_canonical_service", "unknown"),
            ("source_canonical_revision", "unknown"),
            ("source_workload_namespace", "sleep"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/sleep/sa/sleep",
            ),
            ("source_app", "unknown"),
            ("source_version", "unknown"),
            ("source_cluster", "meshward"),
            ("destination_workload", "web-v1"),
            ("destination_workload_namespace", "web"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/web/sa/web",
            ),
            ("destination_app", "web"),
            ("destination_version", "v1"),
            ("destination_service", "unknown"),
            ("destination_canonical_service", "web"),
            ("destination_canonical_revision", "v1"),
            ("destination_service_name", "unknown"),
            ("destination_service_namespace", "unknown"),
            ("destination_cluster", "meshward"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = common.to_vec();
            all.extend_from_slice(extra);
            all
        };
        let http = with(&[
            ("request_protocol", "grpc"),
            ("response_code", "200"),
            ("grpc_response_status", "7"),
        ]);
        assert_eq!(
            scrape.get("istio_requests_total", &http),
            Some(1.0),
            "{scrape}"
        );
        let bucket = |name: &str, le: &'static str| {
            let mut labels = http.clone();
            labels.push(("le", le));
            scrape.get(name, &labels)
        };
        // 0.7 ms: above 0.5, within 1.
        assert_eq!(
            bucket("istio_request_duration_milliseconds_bucket", "0.5"),
            Some(0.0)
        );
        assert_eq!(
            bucket("istio_request_duration_milliseconds_bucket", "1.0"),
            Some(1.0)
        );
        assert_eq!(
            bucket("istio_request_duration_milliseconds_bucket", "3600000.0"),
            Some(1.0)
        );
        assert_eq!(
            bucket("istio_request_duration_milliseconds_bucket", "+Inf"),
            Some(1.0)
        );
        assert_eq!(
            scrape.get("istio_request_duration_milliseconds_count", &http),
            Some(1.0)
        );
        assert_eq!(bucket("istio_request_bytes_bucket", "5.0"), Some(1.0));
        assert_eq!(bucket("istio_request_bytes_bucket", "1.0"), Some(0.0));
        assert_eq!(scrape.get("istio_request_bytes_sum", &http), Some(5.0));
        assert_eq!(bucket("istio_response_bytes_bucket", "1000.0"), Some(0.0));
        assert_eq!(bucket("istio_response_bytes_bucket", "2500.0"), Some(1.0));
        let buckets = scrape
            .iter()
            .filter(|(name, labels, _)| {
                *name == "istio_request_duration_milliseconds_bucket"
                    && labels.get("request_protocol").map(String::as_str) == Some("grpc")
            })
            .count();
        assert_eq!(buckets, BUCKETS.len() + 1, "Envoy's buckets and +Inf");

        let tcp = with(&[("request_protocol", "tcp")]);
        assert_eq!(
            scrape.get("istio_tcp_connections_opened_total", &tcp),
            Some(1.0)
        );
        assert_eq!(
            scrape.get("istio_tcp_connections_closed_total", &tcp),
            Some(1.0)
        );
        assert_eq!(
            scrape.get("istio_tcp_received_bytes_total", &tcp),
            Some(3.0)
        );
        assert_eq!(scrape.get("istio_tcp_sent_bytes_total", &tcp), Some(4.0));

        // An HTTP request without a gRPC status: an empty label, as Istio.
        let plain = RequestLabels {
            traffic: TrafficLabels {
                protocol: Protocol::Http,
                ..traffic
            }
            .with_flags(ResponseFlags::UnauthorizedExternalService),
            response_code: 403,
            grpc_status: None,
        };
        m.request(&plain, Duration::ZERO, 0, 0);
        let scrape = self::scrape(&registry);
        let mut denied = common.to_vec();
        denied.retain(|(k, _)| *k != "response_flags");
        denied.extend([
            ("response_flags", "UAEX"),
            ("request_protocol", "http"),
            ("response_code", "403"),
            ("grpc_response_status", ""),
        ]);
        assert_eq!(
            scrape.get("istio_requests_total", &denied),
            Some(1.0),
            "{scrape}"
        );
    }
}
