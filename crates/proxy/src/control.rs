//! Configuration from the control plane: one distribution stream to
//! `meshward server`, over mutual TLS with the workload certificate. The
//! server is accepted only as the control plane's own identity (secure
//! naming, as for any upstream).
//!
//! Each response is applied whole or not at all: the policies must load and
//! validate with the engine, the mesh config, services and the revocation
//! list must parse. A
//! good one is put in force and ACKed; a bad one is NACKed with the error
//! and the proxy stays on its last good version. When the server is away,
//! the proxy keeps enforcing what it has (fail static, never open) and
//! reconnects with capped, jittered backoff; every new stream starts with a
//! full snapshot.
//!
//! The proxy says which workload it is (`--workload NAMESPACE/NAME`); the
//! server refuses the stream when that claim does not hold or when it
//! cannot tell which workload the proxy is. A refused proxy never takes
//! another workload's labels: it keeps what it enforced (the last good
//! configuration, or, before any, [`awaiting_configuration`]: every inbound
//! request denied), logs the server's reason once, and retries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshward_api::control::distribution_client::DistributionClient;
use meshward_api::control::{DistributionRequest, DistributionResponse, Resource};
use meshward_api::resources::{OwnWorkload, Revocation, Service};
use meshward_api::types;
use meshward_identity::error_chain;
use meshward_identity::revocation::RevocationList;
use meshward_identity::spiffe::SpiffeId;
use meshward_policy::api::{AuthorizationPolicy, MeshConfig, ObjectMeta, Policy, RegistryObject};
use meshward_policy::authn::JwksCache;
use meshward_policy::{PolicySet, Workload, load};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::dns::DnsNames;
use crate::forward::{Connector, MeshTls};
use crate::gateway::Gateway;
use crate::identity::{ALPN_H2, WorkloadIdentity};
use crate::metrics::Metrics;
use crate::outbound::OutboundTarget;
use crate::policies::PolicyStore;
use crate::transparent::Routes;

/// Where the control plane is and who it must be.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Every server's address: a stream goes to the first that answers,
    /// and after a loss the next server is tried first.
    pub addresses: Vec<SocketAddr>,
    /// The name sent as SNI.
    pub server_name: String,
    /// The identity the server's certificate must carry.
    pub identity: SpiffeId,
    /// The WorkloadEntry this proxy says it is, `NAMESPACE/NAME`.
    pub workload: Option<String>,
    /// The socket mark of the proxy's own connections (under capture).
    pub mark: Option<u32>,
}

/// `ADDRESS,ADDRESS (IDENTITY)`, as the proxy names its servers.
impl std::fmt::Display for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, address) in self.addresses.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{address}")?;
        }
        write!(f, " ({})", self.identity)
    }
}

/// The name of the policy a proxy enforces until its first configuration.
pub const AWAITING: &str = "meshward-awaiting-control-plane";

/// What a proxy configured by the control plane enforces before its first
/// configuration is in force — at start, and for as long as the server
/// refuses it: an ALLOW policy without rules in the root namespace, which
/// denies every inbound request and connection. A proxy that does not yet
/// know its policies (or which workload the server takes it for) must not
/// serve as if it had none, which would allow everything.
pub fn awaiting_configuration(mesh: MeshConfig) -> PolicySet {
    let deny_all = AuthorizationPolicy {
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        metadata: ObjectMeta {
            name: AWAITING.into(),
            namespace: Some(mesh.root_namespace.clone()),
            ..ObjectMeta::default()
        },
        ..AuthorizationPolicy::default()
    };
    PolicySet::new(mesh, vec![Policy::AuthorizationPolicy(deny_all)])
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// Unreachable, closed or lost: the proxy reconnects.
    Lost(String),
    /// The server refused this proxy: its claim does not hold, or the
    /// server cannot tell which workload it is. Retrying may succeed once
    /// the registry changes.
    Refused(String),
}

impl Ended {
    fn from_status(status: &tonic::Status) -> Ended {
        match status.code() {
            tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument => Ended::Refused(status.message().to_owned()),
            _ => Ended::Lost(status.message().to_owned()),
        }
    }
}

/// Reconnection backoff: doubling from 200 ms, at most 10 s, ±20 % jitter.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the services the control plane sends are put into.
pub struct Targets {
    /// Explicit mode's services, each on its own listener.
    pub outbound: Vec<Arc<OutboundTarget>>,
    /// Transparent mode's routing table.
    pub routes: Option<Arc<Routes>>,
    /// The names the DNS proxy answers.
    pub dns: Option<DnsNames>,
    /// Istio's metrics name this workload and the services' namespaces.
    pub metrics: Arc<Metrics>,
    /// An ingress gateway: its Gateways and VirtualServices.
    pub gateway: Option<Arc<Gateway>>,
}

/// What a stream currently holds, by resource name.
type Resources = BTreeMap<String, Resource>;

/// Runs until `stop`: connect, receive, apply, answer; reconnect on loss.
/// With a DNS proxy (`dns`), the proxy subscribes to every service and its
/// DNS answers for all of them.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    control_plane: ControlPlane,
    identity: WorkloadIdentity,
    store: PolicyStore,
    outbound: Vec<Arc<OutboundTarget>>,
    routes: Option<Arc<Routes>>,
    dns: Option<DnsNames>,
    jwks: Arc<JwksCache>,
    metrics: Arc<Metrics>,
    gateway: Option<Arc<Gateway>>,
    stop: CancellationToken,
) {
    let targets = Targets {
        // A gateway routes by service name through its own table.
        routes: routes.or_else(|| gateway.as_ref().map(|g| g.services.clone())),
        outbound,
        dns,
        metrics: metrics.clone(),
        gateway,
    };
    // Without a certificate the server would refuse the stream: wait for
    // the agent's first one, so a normal start says nothing alarming.
    let mut cert = identity.cert.0.clone();
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = cert.wait_for(Option::is_some) => {}
    }
    let mut backoff = BACKOFF_START;
    // Whether any configuration from the control plane was ever in force.
    let mut configured = false;
    // The last way a stream ended, logged once until it changes.
    let mut last_ended: Option<Ended> = None;
    // Where the next stream starts among the servers.
    let mut first = 0;
    loop {
        let mut applied = false;
        let session = stream(
            &control_plane,
            first,
            &identity,
            &store,
            &targets,
            &jwks,
            &metrics,
            &mut applied,
        );
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = session => outcome,
        };
        if applied {
            // A stream that delivered something resets the backoff, and a
            // later failure is news again.
            backoff = BACKOFF_START;
            configured = true;
            last_ended = None;
        }
        if let Err(ended) = outcome {
            let enforcing = if configured {
                "enforcing the last good configuration"
            } else {
                "denying every inbound request until a configuration arrives"
            };
            let repeated = last_ended.as_ref() == Some(&ended);
            match &ended {
                _ if repeated => tracing::debug!(?ended, "control plane stream ended again"),
                Ended::Refused(reason) => tracing::error!(
                    servers = ?control_plane.addresses,
                    workload = control_plane.workload.as_deref().unwrap_or("(none claimed)"),
                    "the control plane refused this proxy: {reason}; {enforcing}, retrying"
                ),
                Ended::Lost(e) => tracing::warn!(
                    servers = ?control_plane.addresses,
                    "control plane unavailable ({e}); {enforcing}"
                ),
            }
            if matches!(ended, Ended::Lost(_)) {
                // The next stream tries another server first; a new one
                // starts from a full snapshot, as every stream does.
                first = (first + 1) % control_plane.addresses.len().max(1);
            }
            last_ended = Some(ended);
        }
        let jitter = 0.8 + 0.4 * (rand_fraction());
        let wait = backoff.mul_f64(jitter);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A fraction in [0, 1) from the clock: jitter needs no more.
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

/// A gRPC channel to the control plane: mutual TLS with the workload
/// certificate, the server accepted only as `control_plane.identity`,
/// its servers tried from the `first`.
pub(crate) async fn channel(
    control_plane: &ControlPlane,
    first: usize,
    identity: &WorkloadIdentity,
    metrics: &Arc<Metrics>,
) -> Result<tonic::transport::Channel, String> {
    let tls = MeshTls {
        connector: tokio_rustls::TlsConnector::from(
            identity
                .client_config(vec![control_plane.identity.clone()], &[ALPN_H2])
                .map_err(|e| e.to_string())?,
        ),
        server_name: rustls::pki_types::ServerName::try_from(control_plane.server_name.clone())
            .map_err(|e| e.to_string())?,
        revocations: identity.revocations.clone(),
    };
    let mut addresses = control_plane.addresses.clone();
    let len = addresses.len();
    addresses.rotate_left(first.min(len));
    let connector = Connector::new(
        addresses,
        Some(tls),
        Duration::from_secs(5),
        crate::socket::Dial {
            mark: control_plane.mark,
            inbound_source: false,
        },
        metrics.clone(),
    );
    // Pings find a server that vanished without closing the stream.
    tonic::transport::Endpoint::from_static("http://control-plane")
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connecting: {}", error_chain(&e)))
}

/// One stream, until the server ends it; `applied` is set once it put a
/// response in force.
#[allow(clippy::too_many_arguments)]
async fn stream(
    control_plane: &ControlPlane,
    first: usize,
    identity: &WorkloadIdentity,
    store: &PolicyStore,
    targets: &Targets,
    jwks: &Arc<JwksCache>,
    metrics: &Arc<Metrics>,
    applied: &mut bool,
) -> Result<(), Ended> {
    let lost = |e: &dyn std::fmt::Display| Ended::Lost(e.to_string());
    let channel = channel(control_plane, first, identity, metrics)
        .await
        .map_err(Ended::Lost)?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DistributionRequest {
        // The services this workload calls: their endpoints and identities;
        // all of them (`*`) when it routes by destination or answers DNS
        // for the mesh.
        subscribe: if targets.routes.is_some() || targets.dns.is_some() {
            vec!["*".to_owned()]
        } else {
            targets
                .outbound
                .iter()
                .map(|t| t.upstream.service.clone())
                .collect()
        },
        workload: control_plane.workload.clone().unwrap_or_default(),
        gateway: targets.gateway.is_some(),
        ..Default::default()
    })
    .await
    .map_err(|e| lost(&e))?;
    let mut responses = DistributionClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| Ended::from_status(&s))?
        .into_inner();
    let mut good: Resources = BTreeMap::new();
    while let Some(response) = responses
        .message()
        .await
        .map_err(|s| Ended::from_status(&s))?
    {
        let nonce = response.nonce.clone();
        let version = response.system_version.clone();
        let candidate = merge(&good, response);
        let answer = match apply(&candidate, identity, store, targets, jwks, &version) {
            Ok(()) => {
                good = candidate;
                *applied = true;
                tracing::info!(version, "configuration from the control plane is in force");
                DistributionRequest {
                    response_nonce: nonce,
                    ..Default::default()
                }
            }
            Err(error) => {
                tracing::error!(
                    version,
                    "configuration from the control plane refused: {error}"
                );
                DistributionRequest {
                    response_nonce: nonce,
                    error_detail: error,
                    ..Default::default()
                }
            }
        };
        if tx.send(answer).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// The resources after `response`: a full snapshot replaces everything.
fn merge(current: &Resources, response: DistributionResponse) -> Resources {
    let mut next = if response.full {
        BTreeMap::new()
    } else {
        current.clone()
    };
    for name in response.removed {
        next.remove(&name);
    }
    for resource in response.resources {
        next.insert(resource.name.clone(), resource);
    }
    next
}

/// Everything parsed before anything changes; then policies and routes.
fn apply(
    resources: &Resources,
    identity: &WorkloadIdentity,
    store: &PolicyStore,
    targets: &Targets,
    jwks: &Arc<JwksCache>,
    version: &str,
) -> Result<(), String> {
    let mut policies: Vec<Policy> = Vec::new();
    let mut mesh = MeshConfig::default();
    let mut own: Option<OwnWorkload> = None;
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let mut revocations = RevocationList::default();
    let mut gateways = Vec::new();
    let mut virtual_services = Vec::new();
    for resource in resources.values() {
        let body = std::str::from_utf8(&resource.body)
            .map_err(|_| format!("{}: not UTF-8", resource.name))?;
        match resource.type_url.as_str() {
            types::POLICY => {
                let loaded = load::load_str(&resource.name, body);
                if loaded.has_errors() {
                    return Err(loaded.errors().join("; "));
                }
                policies.extend(loaded.policies.into_iter().map(|p| p.policy));
            }
            types::MESH_CONFIG => {
                mesh = serde_json::from_str(body).map_err(|e| format!("{}: {e}", resource.name))?;
            }
            types::WORKLOAD => {
                own = Some(
                    serde_json::from_str(body).map_err(|e| format!("{}: {e}", resource.name))?,
                );
            }
            types::SERVICE => {
                let service: Service =
                    serde_json::from_str(body).map_err(|e| format!("{}: {e}", resource.name))?;
                services.insert(service.host.clone(), service);
            }
            types::REVOCATIONS => {
                let entries: Vec<Revocation> =
                    serde_json::from_str(body).map_err(|e| format!("{}: {e}", resource.name))?;
                revocations =
                    RevocationList::new(&entries).map_err(|e| format!("{}: {e}", resource.name))?;
            }
            types::GATEWAY | types::VIRTUAL_SERVICE => {
                let loaded = load::load_str(&resource.name, body);
                if loaded.has_errors() {
                    return Err(loaded.errors().join("; "));
                }
                for object in loaded.registry {
                    match object {
                        RegistryObject::Gateway(g) => gateways.push(g),
                        RegistryObject::VirtualService(v) => virtual_services.push(v),
                        _ => return Err(format!("{}: not a {}", resource.name, resource.type_url)),
                    }
                }
            }
            // The bundle is read at start; rotating it live is not done yet.
            types::TRUST_BUNDLE => {}
            other => tracing::debug!(type_url = other, "ignoring an unknown resource type"),
        }
    }
    let mut routes = Vec::new();
    for target in &targets.outbound {
        let Some(service) = services.get(&target.upstream.service) else {
            // Not (or no longer) in the registry: nowhere to send it.
            routes.push((target, Vec::new(), Vec::new()));
            continue;
        };
        let endpoints: Vec<SocketAddr> = service
            .endpoints
            .iter()
            .filter_map(|e| {
                let port = e.ports.get(&target.upstream.port).copied()?;
                Some(SocketAddr::new(e.address.parse().ok()?, port))
            })
            .collect();
        routes.push((
            target,
            endpoints,
            crate::transparent::routes::identities(service),
        ));
    }
    let table = match &targets.routes {
        Some(table) => Some(
            table
                .prepare(&services, mesh.outbound_mode())
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    // The gateway's table, for the labels it will have.
    let ingress = match &targets.gateway {
        Some(gateway) => {
            let labels = match &own {
                Some(own) if own.name.is_some() => own.labels.clone(),
                _ => store.workload().labels,
            };
            Some(gateway.prepare(&gateways, &virtual_services, &labels)?)
        }
        None => None,
    };
    let mut ingress_table = None;
    let prepared = routes
        .into_iter()
        .map(|(target, endpoints, identities)| {
            target
                .prepare_destination(identity, endpoints, identities)
                .map(|route| (target, route))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Everything parsed and built: now it all takes effect. Revocations
    // first, so nothing is put in force that a revoked peer could still use.
    if identity.revocations.replace(revocations) {
        tracing::info!(
            entries = identity.revocations.current().len(),
            "revocation list updated"
        );
    }
    let set = PolicySet::new(mesh, policies).with_jwks(jwks.clone());
    let istio = &targets.metrics.istio;
    if let Some(own) = &own {
        istio.set_local(
            &identity.id,
            &own.namespace,
            &own.labels,
            own.name.as_deref(),
        );
    }
    istio.set_services(services.values());
    // A gateway without a WorkloadEntry keeps the labels it was started
    // with (`istio: ingressgateway`): they select its Gateways and policies.
    let workload = own
        .filter(|own| targets.gateway.is_none() || own.name.is_some())
        .map(|own| Workload {
            namespace: own.namespace,
            labels: own.labels,
        });
    let source = format!("control plane, version {version}");
    match (&targets.gateway, ingress) {
        (Some(_), Some(table)) => {
            store.replace_for_gateway(set, workload, table.served.clone(), source);
            ingress_table = Some(table);
        }
        _ => {
            store.replace_for(set, workload, source);
        }
    }
    for (target, route) in prepared {
        target.set_destination(route);
    }
    if let (Some(routes), Some(table)) = (&targets.routes, table) {
        routes.commit(table);
    }
    if let Some(dns) = &targets.dns {
        dns.set_services(&services.into_values().collect::<Vec<_>>());
    }
    if let (Some(gateway), Some(table)) = (&targets.gateway, ingress_table) {
        gateway.commit(table);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_targets() -> Targets {
        Targets {
            outbound: Vec::new(),
            routes: None,
            dns: None,
            metrics: Arc::default(),
            gateway: None,
        }
    }

    fn policy(name: &str, body: &str) -> Resource {
        Resource {
            name: name.into(),
            type_url: types::POLICY.into(),
            version: "1".into(),
            body: body.as_bytes().to_vec(),
        }
    }

    const GOOD: &str = r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"a","namespace":"web"},"spec":{"action":"DENY","rules":[{}]}}"#;

    #[test]
    fn deltas_merge_and_snapshots_replace() {
        let first = DistributionResponse {
            resources: vec![policy("a", GOOD), policy("b", GOOD)],
            full: true,
            ..Default::default()
        };
        let held = merge(&BTreeMap::new(), first);
        let delta = DistributionResponse {
            resources: vec![policy("c", GOOD)],
            removed: vec!["a".into()],
            ..Default::default()
        };
        let held = merge(&held, delta);
        assert_eq!(held.keys().collect::<Vec<_>>(), ["b", "c"]);
        let snapshot = DistributionResponse {
            resources: vec![policy("d", GOOD)],
            full: true,
            ..Default::default()
        };
        assert_eq!(merge(&held, snapshot).keys().collect::<Vec<_>>(), ["d"]);
    }

    #[test]
    fn before_its_first_configuration_a_proxy_denies_everything() {
        let set = awaiting_configuration(MeshConfig::default());
        let workload = Workload {
            namespace: "bookinfo".into(),
            labels: [("app".to_owned(), "reviews".to_owned())].into(),
        };
        let policy = set.for_workload(&workload);
        let connection = meshward_policy::Connection {
            source_principal: Some("spiffe://cluster.local/ns/bookinfo/sa/productpage".into()),
            destination_port: 9080,
            ..Default::default()
        };
        let http = meshward_policy::HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            host: "reviews".into(),
            ..Default::default()
        };
        let decision = policy.check(&connection, Some(&http), |_| unreachable!("no CUSTOM"));
        assert!(!decision.allowed(), "{decision:?}");
        assert_eq!(decision.status, 403);
        let tcp = policy.check(&connection, None, |_| unreachable!("no CUSTOM"));
        assert!(!tcp.allowed(), "{tcp:?}");
    }

    #[test]
    fn a_refusal_is_told_apart_from_a_lost_stream() {
        for code in [
            tonic::Code::PermissionDenied,
            tonic::Code::FailedPrecondition,
            tonic::Code::InvalidArgument,
        ] {
            assert_eq!(
                Ended::from_status(&tonic::Status::new(code, "why")),
                Ended::Refused("why".into())
            );
        }
        assert_eq!(
            Ended::from_status(&tonic::Status::unavailable("gone")),
            Ended::Lost("gone".into())
        );
    }

    /// A workload identity of a fresh CA (no certificate yet), an empty
    /// policy store and a JWKS cache: what `apply` puts configuration into.
    fn fixture() -> (
        tempfile::TempDir,
        WorkloadIdentity,
        PolicyStore,
        Arc<JwksCache>,
    ) {
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = meshward_identity::ca::CertificateAuthority::load_or_create(
            &meshward_identity::ca::CaFiles::new(ca_dir.path().join("ca")),
            "cluster.local",
        )
        .unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let identity = WorkloadIdentity {
            id: SpiffeId::parse("spiffe://cluster.local/ns/web/sa/web").unwrap(),
            cert: meshward_identity::tls::WatchedCert(rx),
            bundle: ca.bundle().clone(),
            trust_domains: meshward_identity::tls::TrustDomains(vec!["cluster.local".into()]),
            revocations: Default::default(),
        };
        let store = PolicyStore::new(Workload::default(), PolicySet::default(), "start".into());
        let jwks = Arc::new(JwksCache::default());
        (ca_dir, identity, store, jwks)
    }

    #[tokio::test]
    async fn an_invalid_resource_is_refused_and_nothing_changes() {
        let (_ca_dir, identity, store, jwks) = fixture();
        let mut held = BTreeMap::new();
        held.insert("a".to_owned(), policy("a", GOOD));
        apply(&held, &identity, &store, &no_targets(), &jwks, "1").unwrap();
        assert_eq!(store.current().version, 2);
        held.insert(
            "bad".to_owned(),
            policy(
                "bad",
                &GOOD.replace("DENY", "NOPE").replace("\"a\"", "\"bad\""),
            ),
        );
        let error = apply(&held, &identity, &store, &no_targets(), &jwks, "2").unwrap_err();
        assert!(error.contains("spec.action"), "{error}");
        assert_eq!(
            store.current().version,
            2,
            "the last good configuration stays"
        );
    }

    #[tokio::test]
    async fn services_reach_the_dns_names_with_the_configuration_or_not_at_all() {
        let (_ca_dir, identity, store, jwks) = fixture();
        let dns = DnsNames::new("bookinfo", true);
        let targets = Targets {
            outbound: Vec::new(),
            routes: None,
            dns: Some(dns.clone()),
            metrics: Arc::default(),
            gateway: None,
        };
        let service = |host: &str, address: &str| Resource {
            name: format!("service/{host}"),
            type_url: types::SERVICE.into(),
            version: "1".into(),
            body: serde_json::to_vec(&Service {
                host: host.into(),
                addresses: vec![address.into()],
                ..Service::default()
            })
            .unwrap(),
        };
        let a = |name: &str| {
            dns.current()
                .lookup(name, hickory_proto::rr::RecordType::A)
                .map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        let mut held = BTreeMap::new();
        held.insert(
            "service/ratings.bookinfo".to_owned(),
            service("ratings.bookinfo", "240.240.0.7"),
        );
        apply(&held, &identity, &store, &targets, &jwks, "1").unwrap();
        assert_eq!(a("ratings.bookinfo"), Some(vec!["240.240.0.7".to_owned()]));
        // Refused as a whole: the new service is not answered either.
        held.insert(
            "service/details.bookinfo".to_owned(),
            service("details.bookinfo", "240.240.0.8"),
        );
        held.insert(
            "bad".to_owned(),
            policy("bad", &GOOD.replace("DENY", "NOPE")),
        );
        apply(&held, &identity, &store, &targets, &jwks, "2").unwrap_err();
        assert_eq!(a("details.bookinfo"), None);
        assert_eq!(a("ratings.bookinfo"), Some(vec!["240.240.0.7".to_owned()]));
        // A service the control plane removed is no longer answered.
        held.remove("bad");
        held.remove("service/ratings.bookinfo");
        apply(&held, &identity, &store, &targets, &jwks, "3").unwrap();
        assert_eq!(a("ratings.bookinfo"), None);
        assert_eq!(a("details.bookinfo"), Some(vec!["240.240.0.8".to_owned()]));
    }

    #[tokio::test]
    async fn istios_labels_name_the_workload_entry_and_the_services_it_serves() {
        let (_ca_dir, identity, store, jwks) = fixture();
        let targets = no_targets();
        let resource = |name: &str, type_url: &str, body: Vec<u8>| Resource {
            name: name.into(),
            type_url: type_url.into(),
            version: "1".into(),
            body,
        };
        let own = OwnWorkload {
            name: Some("web/web-v2".into()),
            namespace: "web".into(),
            labels: [("app", "web"), ("version", "v2")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
        };
        let service = Service {
            host: "web.web".into(),
            entry: "web/web".into(),
            identities: ["spiffe://cluster.local/ns/web/sa/web".to_owned()].into(),
            ..Service::default()
        };
        let mut held = BTreeMap::new();
        held.insert(
            "workload".to_owned(),
            resource(
                "workload",
                types::WORKLOAD,
                serde_json::to_vec(&own).unwrap(),
            ),
        );
        held.insert(
            "service/web.web".to_owned(),
            resource(
                "service/web.web",
                types::SERVICE,
                serde_json::to_vec(&service).unwrap(),
            ),
        );
        apply(&held, &identity, &store, &targets, &jwks, "1").unwrap();
        let istio = &targets.metrics.istio;
        let local = istio.local();
        assert_eq!((&*local.name, &*local.namespace), ("web-v2", "web"));
        assert_eq!((&*local.app, &*local.version), ("web", "v2"));
        let inbound = istio.inbound(None, None, crate::metrics::istio::Protocol::Tcp);
        assert_eq!(
            &*inbound.service.host, "web.web",
            "the one service it serves"
        );
        assert_eq!(&*inbound.service.namespace, "web");

        // Refused as a whole: the labels stay.
        held.insert(
            "bad".to_owned(),
            policy("bad", &GOOD.replace("DENY", "NOPE")),
        );
        held.remove("service/web.web");
        apply(&held, &identity, &store, &targets, &jwks, "2").unwrap_err();
        let inbound = istio.inbound(None, None, crate::metrics::istio::Protocol::Tcp);
        assert_eq!(&*inbound.service.host, "web.web");
    }

    #[tokio::test]
    async fn the_revocation_list_is_put_in_force_or_refused_whole() {
        let (_ca_dir, identity, store, jwks) = fixture();
        let list = |body: &str| Resource {
            name: "revocations".into(),
            type_url: types::REVOCATIONS.into(),
            version: "1".into(),
            body: body.as_bytes().to_vec(),
        };
        let mut held = BTreeMap::new();
        held.insert(
            "revocations".to_owned(),
            list(r#"[{"kind":"serial","value":"0A:0B","reason":"lost","revokedAt":"t"}]"#),
        );
        apply(&held, &identity, &store, &no_targets(), &jwks, "1").unwrap();
        assert!(
            identity
                .revocations
                .current()
                .check_serial("0a:0b")
                .is_err()
        );
        held.insert(
            "revocations".to_owned(),
            list(r#"[{"kind":"serial","value":"not hex","reason":"","revokedAt":"t"}]"#),
        );
        let error = apply(&held, &identity, &store, &no_targets(), &jwks, "2").unwrap_err();
        assert!(error.contains("not a certificate serial"), "{error}");
        assert!(
            identity
                .revocations
                .current()
                .check_serial("0a:0b")
                .is_err(),
            "the last good list stays"
        );
    }
}
