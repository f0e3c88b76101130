//! Prometheus metrics, served on the admin port at `/stats/prometheus`:
//! meshward's own (`meshward_*`) and Istio's standard metrics
//! (`istio_*`, [`istio`]).

pub mod istio;
pub mod recent;

use std::fmt::Write as _;

use meshward_policy::authz::PolicyRef;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which way traffic flows through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From a peer to this workload.
    Inbound,
    /// From this workload to a service it calls.
    Outbound,
    /// From outside the mesh, through the ingress gateway.
    Gateway,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Gateway => "gateway",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    pub direction: Direction,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The deciding policy (`namespace/name`), empty when none decided.
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
    /// `ok`, or why it failed: `not_tls`, `no_client_certificate`, `unknown_ca`,
    /// `expired`, `revoked`, `trust_domain`, `secure_naming`, `timeout`, `protocol`, `other`.
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    /// `local` (a mesh name, answered from the table), `forwarded` (an
    /// upstream's answer, NXDOMAIN included) or `failed` (the proxy's own
    /// error: SERVFAIL when no upstream answered, FORMERR, NOTIMP).
    pub result: &'static str,
}

/// One decision's `meshward_requests` counter and its direction's
/// `meshward_request_duration_seconds`.
#[derive(Clone)]
pub struct DecisionHandles {
    requests: Counter,
    duration: Histogram,
}

impl DecisionHandles {
    /// Counts a request decided `elapsed` after its headers arrived.
    pub fn record(&self, elapsed: std::time::Duration) {
        self.requests.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// The decision metrics one connection has fetched (see [`recent`]).
#[derive(Default)]
pub struct ConnDecisions(recent::Recent<(Direction, bool, Option<PolicyRef>), DecisionHandles>);

/// Every metric the proxy keeps.
pub struct Metrics {
    pub requests: Family<DecisionLabels, Counter>,
    pub connections: Family<DecisionLabels, Counter>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub request_duration: Family<DirectionLabels, Histogram>,
    pub upstream_errors: Family<DirectionLabels, Counter>,
    pub revoked_peers_cut: Family<DirectionLabels, Counter>,
    pub certificate_expiry: Gauge,
    pub config_version: Gauge,
    pub log_records_dropped: Counter,
    pub dns_queries: Family<DnsLabels, Counter>,
    /// Istio's standard metrics, with Istio's names and labels.
    pub istio: istio::IstioMetrics,
    registry: Registry,
}

fn duration_histogram() -> Histogram {
    // 50 µs to ~26 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut root = Registry::default();
        let istio = istio::IstioMetrics::register(root.sub_registry_with_prefix("istio"));
        let registry = root.sub_registry_with_prefix("meshward");
        let requests = Family::<DecisionLabels, Counter>::default();
        let connections = Family::<DecisionLabels, Counter>::default();
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let request_duration = Family::<DirectionLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let upstream_errors = Family::<DirectionLabels, Counter>::default();
        let revoked_peers_cut = Family::<DirectionLabels, Counter>::default();
        let certificate_expiry = Gauge::default();
        let config_version = Gauge::default();
        let log_records_dropped = Counter::default();
        let dns_queries = Family::<DnsLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by direction, decision and deciding policy",
            requests.clone(),
        );
        registry.register(
            "connections",
            "Connections by direction, decision and deciding policy (TCP ports, and refusals by peer authentication)",
            connections.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes by direction and result (ok or the failure reason)",
            handshakes.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's headers to its response's headers",
            request_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Requests and connections that could not reach the application or upstream",
            upstream_errors.clone(),
        );
        registry.register(
            "revoked_peer_connections_closed",
            "Open connections closed because the peer's identity or certificate was revoked",
            revoked_peers_cut.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the workload certificate expires (Unix time); 0 before the first one",
            certificate_expiry.clone(),
        );
        registry.register(
            "config_version",
            "The version of the policies in force",
            config_version.clone(),
        );
        registry.register(
            "log_records_dropped",
            "Access and audit records dropped because the log writer fell behind",
            log_records_dropped.clone(),
        );
        registry.register(
            "dns_queries",
            "Queries to the DNS proxy by result: answered locally, forwarded upstream, or failed",
            dns_queries.clone(),
        );
        Metrics {
            requests,
            connections,
            handshakes,
            request_duration,
            upstream_errors,
            revoked_peers_cut,
            certificate_expiry,
            config_version,
            log_records_dropped,
            dns_queries,
            istio,
            registry: root,
        }
    }
}

impl Metrics {
    pub fn handshake(&self, direction: Direction, result: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    pub fn upstream_error(&self, direction: Direction) {
        self.upstream_errors
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub fn dns_query(&self, result: &'static str) {
        self.dns_queries.get_or_create(&DnsLabels { result }).inc();
    }

    /// `meshward_requests` and `meshward_request_duration_seconds` of a
    /// request `policy` decided (or none did), as `connection` keeps them.
    pub fn decision(
        &self,
        connection: &ConnDecisions,
        direction: Direction,
        allowed: bool,
        policy: Option<&PolicyRef>,
    ) -> DecisionHandles {
        connection.0.get(
            |(d, a, p)| *d == direction && *a == allowed && p.as_ref() == policy,
            || {
                let labels = DecisionLabels {
                    direction,
                    decision: if allowed { "allow" } else { "deny" },
                    policy: policy.map(PolicyRef::to_string).unwrap_or_default(),
                };
                let handles = DecisionHandles {
                    requests: self.requests.get_or_create(&labels).clone(),
                    duration: (self.request_duration)
                        .get_or_create(&DirectionLabels { direction })
                        .clone(),
                };
                ((direction, allowed, policy.cloned()), handles)
            },
        )
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing to a String cannot fail; an empty scrape is the safe answer.
            out.clear();
        }
        out
    }
}
