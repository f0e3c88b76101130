//! Distribution: each proxy's stream, in xDS's delta style.
//!
//! A proxy connects with its workload certificate and may claim a workload
//! (`meshward proxy --workload NAMESPACE/NAME`); the registry checks the
//! claim against the certificate and the connection's address, or, without
//! one, finds the only workload the certificate can be. When it cannot tell
//! — the claim does not hold, or several workloads share the identity — the
//! stream is refused with a status that says why, and the refusal is kept
//! for `meshward status`: a proxy is never given another workload's labels.
//! The same check runs again before every push, so a proxy whose claim
//! stops holding (its WorkloadEntry changed) is cut off.
//!
//! A proxy receives only what concerns it: the policies of its namespace
//! and the root namespace, the mesh config, the trust bundle, its own
//! workload, the services it subscribes to (their endpoints and the
//! identities allowed to run them; `*` subscribes to all of them), and the
//! whole revocation list. The
//! first response on a stream is a
//! full snapshot; after that, a change to the store is pushed — after a
//! short debounce, so a burst of applies makes a bounded number of pushes —
//! as the resources that changed and the names removed. Every response
//! carries a nonce that the proxy ACKs, or NACKs with the error, staying on
//! its last good version.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshward_api::control::distribution_server::Distribution;
use meshward_api::control::{
    DistributionRequest, DistributionResponse, ProxyStatus, RefusedProxy, Resource,
};
use meshward_api::types;
use meshward_identity::spiffe::SpiffeId;
use meshward_identity::tls::spiffe_id_of;
use meshward_policy::api::{Action, AuthorizationPolicy, Policy, RegistryObject};
use meshward_policy::learn::record::RecordWorkload;
use meshward_policy::validate::DRY_RUN_ANNOTATION;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::adapters::Map;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::registry::{Refusal, Registry};
use crate::store::{Config, Store};

/// A NACK's error is kept (and logged) up to this many characters.
const MAX_NACK: usize = 1024;
/// A stream must say what it subscribes to within this.
const FIRST_MESSAGE: Duration = Duration::from_secs(30);
/// At most this many refused proxies are remembered for `status`...
const MAX_REFUSED: usize = 64;
/// ...each until this long after its last refusal (a refused proxy retries
/// at least every 12 s, so one still trying stays listed).
const REFUSED_KEPT: Duration = Duration::from_secs(120);

/// What `meshward status` shows of one stream.
#[derive(Debug, Clone, Default)]
struct Session {
    identity: String,
    workload: String,
    /// The workload the proxy claimed, if any.
    claim: String,
    peer: String,
    certificate_expiry: i64,
    sent_version: u64,
    acked_version: u64,
    nack: String,
}

/// A proxy refused recently: who, from where, and why.
#[derive(Debug, Clone)]
struct Refused {
    identity: String,
    claim: String,
    peer: Option<SocketAddr>,
    certificate_expiry: i64,
    reason: String,
    last: std::time::SystemTime,
    attempts: u64,
}

impl Refused {
    /// One proxy, as far as the server can tell: its identity, its claim
    /// and the address it connects from (the port changes every time).
    fn is(&self, identity: &str, claim: &str, peer: Option<SocketAddr>) -> bool {
        self.identity == identity
            && self.claim == claim
            && self.peer.map(|p| p.ip().to_canonical()) == peer.map(|p| p.ip().to_canonical())
    }
}

/// A resource as streams share it: encoded once per store version, held
/// by every stream it concerns (in its view, and in what it last sent)
/// without a copy per proxy.
type Shared = Arc<Resource>;

/// What one store version means for streams, derived once and shared by
/// every stream: the registry, and each policy, service and the mesh
/// config already encoded as a resource.
struct Derived {
    version: u64,
    registry: Registry,
    /// (namespace, resource) per policy.
    policies: Vec<(String, Shared)>,
    /// Per service, by host as the registry keys it.
    services: HashMap<String, Shared>,
    mesh: Shared,
    /// The whole list, for every proxy (it is small).
    revocations: Shared,
    /// Every Gateway and VirtualService, for gateways only: each gateway
    /// picks the Gateways whose selector matches its labels and the
    /// VirtualServices bound to them.
    ingress: Vec<Shared>,
    root_namespace: String,
}

/// Every stream, and the signal that the store changed.
pub struct Hub {
    store: Arc<Store>,
    trust_domain: String,
    bundle: Shared,
    changes: watch::Sender<u64>,
    sessions: Mutex<HashMap<u64, Session>>,
    refused: Mutex<Vec<Refused>>,
    next_session: AtomicU64,
    derived: Mutex<Option<Arc<Derived>>>,
    /// How long a stream waits after a change for more changes...
    pub debounce: Duration,
    /// ...and at most this long in all, so a steady stream of changes
    /// still gets pushed.
    pub debounce_max: Duration,
    /// Pushes sent (full and delta), and NACKs received.
    pub pushes: AtomicU64,
    pub nacks: AtomicU64,
    /// Seconds from a store change to each push it caused.
    pub push_latency: prometheus_client::metrics::histogram::Histogram,
    changed_at: Mutex<std::time::Instant>,
    /// Learning (`meshward server --dry-run-policies`): every ALLOW and
    /// DENY AuthorizationPolicy goes to proxies in dry-run, decided and
    /// logged but not enforced. The store keeps them as they are.
    pub dry_run_policies: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn resource(name: String, type_url: &str, body: Vec<u8>) -> Shared {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    Arc::new(Resource {
        name,
        type_url: type_url.to_owned(),
        version: format!("{:016x}", hasher.finish()),
        body,
    })
}

impl Hub {
    pub fn new(store: Arc<Store>, trust_domain: String, bundle_pem: String) -> Hub {
        let version = store.config().version;
        Hub {
            store,
            trust_domain,
            bundle: resource(
                "bundle".into(),
                types::TRUST_BUNDLE,
                bundle_pem.into_bytes(),
            ),
            changes: watch::channel(version).0,
            sessions: Mutex::default(),
            refused: Mutex::default(),
            next_session: AtomicU64::new(1),
            derived: Mutex::default(),
            debounce: Duration::from_millis(100),
            debounce_max: Duration::from_secs(1),
            pushes: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
            push_latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16),
            ),
            changed_at: Mutex::new(std::time::Instant::now()),
            dry_run_policies: false,
        }
    }

    pub fn store_version(&self) -> u64 {
        self.store.config().version
    }

    /// The store changed: every stream recomputes (after its debounce).
    pub fn changed(&self, version: u64) {
        *lock(&self.changed_at) = std::time::Instant::now();
        self.changes.send_replace(version);
    }

    /// The store versions the hub has been told of, as streams see them.
    #[cfg(test)]
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn connected(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn status(&self) -> Vec<ProxyStatus> {
        let mut out: Vec<ProxyStatus> = lock(&self.sessions)
            .values()
            .map(|s| ProxyStatus {
                identity: s.identity.clone(),
                workload: s.workload.clone(),
                peer_address: s.peer.clone(),
                certificate_expiry: s.certificate_expiry,
                sent_version: s.sent_version,
                acked_version: s.acked_version,
                nack: s.nack.clone(),
                server: String::new(),
            })
            .collect();
        out.sort_by(|a, b| (&a.workload, &a.identity).cmp(&(&b.workload, &b.identity)));
        out
    }

    /// What this server records of itself in a shared store: its proxies'
    /// [`Hub::status`], as a protobuf `StatusResponse`.
    /// `server` names this server in it (its advertised address).
    pub fn record(&self, server: &str) -> Vec<u8> {
        let mut proxies = self.status();
        for p in &mut proxies {
            p.server = server.to_owned();
        }
        prost::Message::encode_to_vec(&meshward_api::control::StatusResponse {
            proxies,
            ..Default::default()
        })
    }

    /// The proxies refused within [`REFUSED_KEPT`], newest first.
    pub fn refused(&self) -> Vec<RefusedProxy> {
        let mut refused = lock(&self.refused);
        forget_old(&mut refused);
        let mut out: Vec<&Refused> = refused.iter().collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.last));
        out.into_iter()
            .map(|r| RefusedProxy {
                identity: r.identity.clone(),
                claimed_workload: r.claim.clone(),
                peer_address: r.peer.map(|p| p.to_string()).unwrap_or_default(),
                reason: r.reason.clone(),
                last_refused: unix_seconds(r.last),
                attempts: r.attempts,
                certificate_expiry: r.certificate_expiry,
            })
            .collect()
    }

    /// Records and logs a refusal: logged once per proxy and reason, then
    /// counted, so a proxy retrying does not flood the log.
    fn refuse(&self, session: &Session, peer: Option<SocketAddr>, refusal: &Refusal) {
        let reason = refusal.to_string();
        let mut refused = lock(&self.refused);
        forget_old(&mut refused);
        let now = std::time::SystemTime::now();
        match refused
            .iter_mut()
            .find(|r| r.is(&session.identity, &session.claim, peer))
        {
            Some(r) if r.reason == reason => {
                r.attempts += 1;
                r.last = now;
                r.peer = peer;
                r.certificate_expiry = session.certificate_expiry;
                tracing::debug!(
                    identity = %session.identity,
                    claim = %session.claim,
                    attempts = r.attempts,
                    "refused a proxy again: {reason}"
                );
                return;
            }
            Some(r) => *r = refused_now(session, peer, reason.clone(), now),
            None => {
                if refused.len() >= MAX_REFUSED
                    && let Some(oldest) = (0..refused.len()).min_by_key(|&i| refused[i].last)
                {
                    refused.swap_remove(oldest);
                }
                refused.push(refused_now(session, peer, reason.clone(), now));
            }
        }
        tracing::warn!(
            identity = %session.identity,
            claim = %session.claim,
            peer = %session.peer,
            "refused a proxy's distribution stream: {reason}"
        );
    }

    /// The proxy was accepted: it is no longer listed as refused.
    fn accepted(&self, session: &Session, peer: Option<SocketAddr>) {
        lock(&self.refused).retain(|r| !r.is(&session.identity, &session.claim, peer));
    }

    fn derived(&self, config: &Config) -> Arc<Derived> {
        let mut derived = lock(&self.derived);
        if let Some(d) = derived.as_ref().filter(|d| d.version == config.version) {
            return d.clone();
        }
        let policies = config
            .policies
            .iter()
            .filter_map(|policy| {
                let body = match policy {
                    Policy::AuthorizationPolicy(ap) if self.dry_run_policies => {
                        serde_json::to_vec(&in_dry_run(ap)).ok()?
                    }
                    _ => serde_json::to_vec(policy).ok()?,
                };
                Some((
                    policy.metadata().namespace_or_default().to_owned(),
                    resource(policy_name(policy), types::POLICY, body),
                ))
            })
            .collect();
        let registry = Registry::new(&config.registry, &self.trust_domain);
        let services = registry
            .services
            .iter()
            .filter_map(|(host, service)| {
                let body = serde_json::to_vec(service).ok()?;
                let name = format!("service/{}", service.host);
                Some((host.clone(), resource(name, types::SERVICE, body)))
            })
            .collect();
        let d = Arc::new(Derived {
            version: config.version,
            registry,
            policies,
            services,
            mesh: resource(
                "mesh".into(),
                types::MESH_CONFIG,
                serde_json::to_vec(&config.mesh).unwrap_or_default(),
            ),
            revocations: resource(
                "revocations".into(),
                types::REVOCATIONS,
                serde_json::to_vec(&config.revocations).unwrap_or_default(),
            ),
            root_namespace: config.mesh.root_namespace.clone(),
            ingress: config
                .registry
                .iter()
                .filter_map(|object| {
                    let type_url = match object {
                        RegistryObject::Gateway(_) => types::GATEWAY,
                        RegistryObject::VirtualService(_) => types::VIRTUAL_SERVICE,
                        _ => return None,
                    };
                    let meta = object.metadata();
                    let name = format!(
                        "{}/{}/{}",
                        object.kind(),
                        meta.namespace_or_default(),
                        meta.name
                    );
                    Some(resource(name, type_url, serde_json::to_vec(object).ok()?))
                })
                .collect(),
        });
        *derived = Some(d.clone());
        d
    }

    /// Everything one proxy is sent, by resource name; refused when the
    /// registry cannot tell which workload the proxy is.
    fn view(
        &self,
        identity: &SpiffeId,
        peer: Option<SocketAddr>,
        claim: Option<&str>,
        subscribe: &[String],
        gateway: bool,
    ) -> Result<(u64, String, BTreeMap<String, Shared>), Refusal> {
        let config = self.store.config();
        let derived = self.derived(&config);
        let registry = &derived.registry;
        let id = identity.to_string();
        let workload = registry.resolve(&id, peer.map(|p| p.ip()), claim)?.cloned();
        let namespace = workload
            .as_ref()
            .map(|w| w.namespace.clone())
            .or_else(|| identity.istio_parts().map(|(ns, _)| ns.to_owned()))
            .unwrap_or_default();
        let mut out = BTreeMap::new();
        let mut put = |r: Shared| {
            out.insert(r.name.clone(), r);
        };
        for (ns, policy) in &derived.policies {
            if *ns == namespace || *ns == derived.root_namespace {
                put(policy.clone());
            }
        }
        put(derived.mesh.clone());
        put(derived.revocations.clone());
        put(self.bundle.clone());
        if gateway {
            for r in &derived.ingress {
                put(r.clone());
            }
        }
        let own = serde_json::json!({
            "name": workload.as_ref().map(|w| w.name.clone()),
            "namespace": namespace,
            "labels": workload.as_ref().map(|w| w.labels.clone()).unwrap_or_default(),
        });
        put(resource(
            "workload".into(),
            types::WORKLOAD,
            own.to_string().into_bytes(),
        ));
        // `*`: every service (a transparent proxy routes by destination and
        // answers DNS for all of them); otherwise the hosts named.
        if subscribe.iter().any(|h| h == "*") {
            for service in derived.services.values() {
                put(service.clone());
            }
        } else {
            for host in subscribe {
                if let Some(service) = derived.services.get(&host.to_ascii_lowercase()) {
                    put(service.clone());
                }
            }
        }
        let name = workload.map(|w| w.name).unwrap_or_default();
        Ok((config.version, name, out))
    }
}

/// The status a refused stream ends with: the claim does not hold
/// (`PermissionDenied`), or the server cannot tell which workload the proxy
/// is (`FailedPrecondition`). The message is the refusal's, for the proxy's
/// log.
pub(crate) fn refused_status(refusal: &Refusal) -> Status {
    match refusal {
        Refusal::Malformed { .. } => Status::invalid_argument(refusal.to_string()),
        Refusal::WrongIdentity { .. } | Refusal::WrongAddress { .. } | Refusal::Revoked(_) => {
            Status::permission_denied(refusal.to_string())
        }
        Refusal::NoSuchWorkload { .. }
        | Refusal::UncheckableAddress { .. }
        | Refusal::Ambiguous { .. } => Status::failed_precondition(refusal.to_string()),
    }
}

fn forget_old(refused: &mut Vec<Refused>) {
    refused.retain(|r| r.last.elapsed().is_ok_and(|age| age < REFUSED_KEPT));
}

fn refused_now(
    session: &Session,
    peer: Option<SocketAddr>,
    reason: String,
    now: std::time::SystemTime,
) -> Refused {
    Refused {
        identity: session.identity.clone(),
        claim: session.claim.clone(),
        peer,
        certificate_expiry: session.certificate_expiry,
        reason,
        last: now,
        attempts: 1,
    }
}

fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Hub {
    /// Whether `certificate` (a caller's, verified at its handshake) has
    /// been revoked since: a connection outlives revocation, so every
    /// request on it (each push, each decision report) checks again.
    pub(crate) fn check_revocation(
        &self,
        certificate: &tonic::transport::CertificateDer<'_>,
    ) -> Result<(), Refusal> {
        self.store
            .revocations()
            .current()
            .check_certificate(certificate)
            .map_err(|revoked| Refusal::Revoked(revoked.to_string()))
    }

    /// The workload a proxy speaks for — its identity, connecting from
    /// `peer`, claiming `claim` — as the distribution stream places it;
    /// with no entry for the identity, its namespace without name or
    /// labels. Decision reports (`decisions.rs`) are filed under it,
    /// whatever the records say.
    pub fn workload_of(
        &self,
        identity: &SpiffeId,
        peer: Option<SocketAddr>,
        claim: Option<&str>,
    ) -> Result<RecordWorkload, Refusal> {
        let config = self.store.config();
        let derived = self.derived(&config);
        let id = identity.to_string();
        Ok(
            match derived.registry.resolve(&id, peer.map(|p| p.ip()), claim)? {
                Some(w) => RecordWorkload {
                    namespace: w.namespace.clone(),
                    name: w.name.split_once('/').map(|(_, n)| n.to_owned()),
                    labels: w.labels.clone(),
                },
                None => RecordWorkload {
                    namespace: identity
                        .istio_parts()
                        .map(|(ns, _)| ns.to_owned())
                        .unwrap_or_default(),
                    name: None,
                    labels: BTreeMap::new(),
                },
            },
        )
    }
}

/// The caller's SPIFFE ID and certificate expiry (Unix seconds), from the
/// client certificate verified in the TLS handshake.
pub(crate) fn caller<T>(request: &Request<T>, missing: &str) -> Result<(SpiffeId, i64), Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated(missing.to_owned()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated(missing.to_owned()))?;
    let identity = spiffe_id_of(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
    let expiry = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .unwrap_or(0);
    Ok((identity, expiry))
}

/// `policy` as a proxy gets it while learning: an ALLOW or DENY policy
/// with `istio.io/dry-run: "true"` (the only actions Istio runs in
/// dry-run); others unchanged.
fn in_dry_run(policy: &AuthorizationPolicy) -> Policy {
    let mut policy = policy.clone();
    if matches!(policy.spec.action, Action::Allow | Action::Deny) {
        policy
            .metadata
            .annotations
            .insert(DRY_RUN_ANNOTATION.to_owned(), "true".to_owned());
    }
    Policy::AuthorizationPolicy(policy)
}

fn policy_name(policy: &Policy) -> String {
    let meta = policy.metadata();
    format!(
        "{}/{}/{}",
        policy.kind().as_str(),
        meta.namespace_or_default(),
        meta.name
    )
}

/// The gRPC service over a [`Hub`].
pub struct DistributionService(pub Arc<Hub>);

/// What a stream's task hands to the stream's response body: boxed, since
/// a tokio channel allocates room for 32 items at once, per stream.
type Outgoing = Result<Box<DistributionResponse>, Status>;

fn unbox(item: Outgoing) -> Result<DistributionResponse, Status> {
    item.map(|response| *response)
}

#[tonic::async_trait]
impl Distribution for DistributionService {
    type StreamStream =
        Map<ReceiverStream<Outgoing>, fn(Outgoing) -> Result<DistributionResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<DistributionRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated("a proxy connects with its workload certificate")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let identity = spiffe_id_of(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let expiry = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| c.validity().not_after.timestamp())
            .unwrap_or(0);
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let hub = self.0.clone();
        let id = hub.next_session.fetch_add(1, Ordering::Relaxed);
        lock(&hub.sessions).insert(
            id,
            Session {
                identity: identity.to_string(),
                peer: peer.map(|p| p.to_string()).unwrap_or_default(),
                certificate_expiry: expiry,
                ..Session::default()
            },
        );
        tokio::spawn(async move {
            // The chain the connection's TLS handshake verified, shared
            // with it rather than copied; its leaf is there (checked above).
            let result = match certs.first() {
                Some(leaf) => session(&hub, id, &identity, leaf, peer, inbound, tx).await,
                None => Ok(()),
            };
            lock(&hub.sessions).remove(&id);
            if let Err(e) = result {
                tracing::debug!(%identity, "distribution stream ended: {e}");
            }
        });
        Ok(Response::new(
            ReceiverStream::new(rx).map(unbox as fn(_) -> _),
        ))
    }
}

async fn session(
    hub: &Hub,
    id: u64,
    identity: &SpiffeId,
    certificate: &tonic::transport::CertificateDer<'static>,
    peer: Option<SocketAddr>,
    mut inbound: Streaming<DistributionRequest>,
    tx: mpsc::Sender<Outgoing>,
) -> Result<(), Status> {
    let first = tokio::time::timeout(FIRST_MESSAGE, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no subscription within 30 s"))??;
    let Some(first) = first else {
        return Ok(());
    };
    let mut subscribe = first.subscribe;
    let gateway = first.gateway;
    // The claim is the first request's; later requests cannot change it.
    let claim = (!first.workload.is_empty()).then_some(first.workload);
    let this = {
        let mut sessions = lock(&hub.sessions);
        let Some(s) = sessions.get_mut(&id) else {
            return Ok(());
        };
        s.claim = claim.clone().unwrap_or_default();
        s.clone()
    };
    let mut accepted = false;
    let mut changes = hub.changes.subscribe();
    changes.borrow_and_update();
    // What the proxy was last sent, to send only what differs from it.
    let mut sent: BTreeMap<String, Shared> = BTreeMap::new();
    let mut nonce = 0u64;
    let mut pending: Option<(String, u64)> = None;
    let mut full = true;
    loop {
        // Checked with every version, like the claim: a proxy revoked while
        // connected is cut off at the next push.
        let revoked = hub.check_revocation(certificate);
        let (version, workload, view) = match revoked
            .and_then(|()| hub.view(identity, peer, claim.as_deref(), &subscribe, gateway))
        {
            Ok(view) => view,
            Err(refusal) => {
                hub.refuse(&this, peer, &refusal);
                // The proxy reads why from the status; it may be gone.
                let _ = tx.send(Err(refused_status(&refusal))).await;
                return Ok(());
            }
        };
        if !accepted {
            accepted = true;
            hub.accepted(&this, peer);
        }
        let changed: Vec<Resource> = view
            .values()
            .filter(|r| sent.get(&r.name).is_none_or(|s| s.version != r.version))
            .map(|r| Resource::clone(r))
            .collect();
        let removed: Vec<String> = sent
            .keys()
            .filter(|k| !view.contains_key(*k))
            .cloned()
            .collect();
        if full || !changed.is_empty() || !removed.is_empty() {
            nonce += 1;
            let response = DistributionResponse {
                system_version: version.to_string(),
                resources: if full {
                    view.values().map(|r| Resource::clone(r)).collect()
                } else {
                    changed
                },
                removed: if full { Vec::new() } else { removed },
                nonce: nonce.to_string(),
                full,
            };
            if tx.send(Ok(Box::new(response))).await.is_err() {
                return Ok(());
            }
            hub.pushes.fetch_add(1, Ordering::Relaxed);
            if !full {
                hub.push_latency
                    .observe(lock(&hub.changed_at).elapsed().as_secs_f64());
            }
            pending = Some((nonce.to_string(), version));
            full = false;
            sent = view;
            if let Some(s) = lock(&hub.sessions).get_mut(&id) {
                s.sent_version = version;
                s.workload = workload;
            }
        } else if let Some(s) = lock(&hub.sessions).get_mut(&id) {
            // Nothing of this version concerns the proxy: once it ACKs what
            // it was sent, it is current with this version too.
            match &mut pending {
                Some((_, pending_version)) => *pending_version = version,
                None if s.nack.is_empty() => s.acked_version = version,
                None => {}
            }
            s.sent_version = version;
        }
        // Wait for an answer, a subscription change or a store change.
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let Some(request) = message? else { return Ok(()) };
                    if let Some((expected, version)) = &pending
                        && &request.response_nonce == expected
                    {
                        if let Some(s) = lock(&hub.sessions).get_mut(&id) {
                            if request.error_detail.is_empty() {
                                s.acked_version = *version;
                                s.nack.clear();
                            } else {
                                // The proxy's words, bounded.
                                s.nack = request.error_detail.chars().take(MAX_NACK).collect();
                                hub.nacks.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%identity, version, error = %s.nack, "a proxy refused a configuration");
                            }
                        }
                        pending = None;
                    }
                    if !request.subscribe.is_empty() && request.subscribe != subscribe {
                        subscribe = request.subscribe;
                        break;
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    // As istiod debounces: wait until changes stop for
                    // `debounce`, but no longer than `debounce_max`.
                    let started = tokio::time::Instant::now();
                    changes.borrow_and_update();
                    loop {
                        tokio::time::sleep(hub.debounce).await;
                        let more = changes.has_changed().unwrap_or(false);
                        changes.borrow_and_update();
                        if !more || started.elapsed() >= hub.debounce_max {
                            break;
                        }
                    }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
"#;

    fn hub(dir: &tempfile::TempDir) -> Hub {
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        store.apply("workloads.yaml", SHARED).unwrap();
        Hub::new(store, "cluster.local".into(), String::new())
    }

    fn reviews() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews").unwrap()
    }

    fn peer() -> Option<SocketAddr> {
        Some("127.0.0.1:40000".parse().unwrap())
    }

    fn session(claim: &str) -> Session {
        Session {
            identity: reviews().to_string(),
            claim: claim.into(),
            ..Session::default()
        }
    }

    #[test]
    fn a_proxy_is_sent_the_labels_of_the_workload_it_claims() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(&dir);
        for (claim, version) in [("bookinfo/reviews-v1", "v1"), ("bookinfo/reviews-v2", "v2")] {
            let (_, name, view) = hub
                .view(&reviews(), peer(), Some(claim), &[], false)
                .unwrap();
            assert_eq!(name, claim);
            let own: serde_json::Value = serde_json::from_slice(&view["workload"].body).unwrap();
            assert_eq!(own["labels"]["version"], version, "{own}");
        }
    }

    #[test]
    fn gateways_and_virtual_services_reach_gateways_only() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(&dir);
        let ingress = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: ["*"]
  gateways: [istio-system/web]
  http:
  - route: [{destination: {host: reviews.bookinfo.svc.cluster.local}}]
"#;
        hub.store.apply("ingress.yaml", ingress).unwrap();
        let claim = Some("bookinfo/reviews-v1");
        let (_, _, sidecar) = hub.view(&reviews(), peer(), claim, &[], false).unwrap();
        assert!(
            sidecar
                .values()
                .all(|r| r.type_url != types::GATEWAY && r.type_url != types::VIRTUAL_SERVICE),
            "{:?}",
            sidecar.keys()
        );
        let (_, _, gateway) = hub.view(&reviews(), peer(), claim, &[], true).unwrap();
        let gw = &gateway["Gateway/istio-system/web"];
        assert_eq!(gw.type_url, types::GATEWAY);
        let body: serde_json::Value = serde_json::from_slice(&gw.body).unwrap();
        assert_eq!(body["spec"]["selector"]["istio"], "ingressgateway");
        assert_eq!(
            gateway["VirtualService/bookinfo/reviews"].type_url,
            types::VIRTUAL_SERVICE
        );
    }

    #[test]
    fn a_refused_proxy_is_listed_once_with_why_until_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(&dir);
        let unclaimed = session("");
        let refusal = hub.view(&reviews(), peer(), None, &[], false).unwrap_err();
        assert!(matches!(refusal, Refusal::Ambiguous { .. }), "{refusal}");
        let status = refused_status(&refusal);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(status.message(), refusal.to_string());
        // The proxy retries from another port: the same proxy, counted.
        hub.refuse(&unclaimed, peer(), &refusal);
        hub.refuse(
            &unclaimed,
            Some("[::ffff:127.0.0.1]:40001".parse().unwrap()),
            &refusal,
        );
        let listed = hub.refused();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].attempts, 2);
        assert_eq!(listed[0].reason, refusal.to_string());
        assert_eq!(listed[0].claimed_workload, "");
        assert_eq!(hub.connected(), 0, "a refused proxy is not a connected one");

        // Another proxy's refusal is its own row.
        let claimed = session("bookinfo/reviews-v3");
        let other = hub
            .view(&reviews(), peer(), Some("bookinfo/reviews-v3"), &[], false)
            .unwrap_err();
        hub.refuse(&claimed, peer(), &other);
        let claims: Vec<String> = hub
            .refused()
            .into_iter()
            .map(|r| r.claimed_workload)
            .collect();
        assert_eq!(claims.len(), 2, "{claims:?}");
        assert!(
            claims.contains(&"bookinfo/reviews-v3".to_owned()),
            "{claims:?}"
        );

        hub.accepted(&unclaimed, peer());
        assert_eq!(hub.refused().len(), 1);
    }

    #[test]
    fn the_record_of_refusals_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(&dir);
        let refusal = hub.view(&reviews(), peer(), None, &[], false).unwrap_err();
        for i in 0..(MAX_REFUSED + 10) {
            hub.refuse(&session(&format!("bookinfo/w{i}")), peer(), &refusal);
        }
        assert_eq!(hub.refused().len(), MAX_REFUSED);
    }

    fn services(view: &BTreeMap<String, Shared>) -> Vec<String> {
        view.keys()
            .filter(|k| k.starts_with("service/"))
            .cloned()
            .collect()
    }

    #[test]
    fn a_star_subscribes_to_every_service_and_its_changes() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(&dir);
        let entry = |name: &str, extra: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: bookinfo}}\nspec:\n  hosts: [{name}.bookinfo]\n  ports: [{{number: 9080, name: http, protocol: HTTP}}]\n  workloadSelector: {{labels: {{app: reviews}}}}\n{extra}"
            )
        };
        hub.store
            .apply(
                "services.yaml",
                &format!("{}---\n{}", entry("reviews", ""), entry("ratings", "")),
            )
            .unwrap();
        let claim = Some("bookinfo/reviews-v1");
        let (_, _, named) = hub
            .view(
                &reviews(),
                peer(),
                claim,
                &["Reviews.bookinfo".into()],
                false,
            )
            .unwrap();
        assert_eq!(services(&named), ["service/reviews.bookinfo"]);
        let (_, _, all) = hub
            .view(&reviews(), peer(), claim, &["*".into()], false)
            .unwrap();
        assert_eq!(
            services(&all),
            ["service/ratings.bookinfo", "service/reviews.bookinfo"]
        );
        // A new service, and a change to one the proxy never named, are in
        // its next view: the stream sends what differs from the last.
        hub.store
            .apply(
                "services.yaml",
                &format!(
                    "{}---\n{}---\n{}",
                    entry("reviews", ""),
                    entry("ratings", "  addresses: [192.0.2.7]\n"),
                    entry("details", "")
                ),
            )
            .unwrap();
        let (_, _, next) = hub
            .view(&reviews(), peer(), claim, &["*".into()], false)
            .unwrap();
        assert_eq!(
            services(&next),
            [
                "service/details.bookinfo",
                "service/ratings.bookinfo",
                "service/reviews.bookinfo"
            ]
        );
        let ratings = |v: &BTreeMap<String, Shared>| v["service/ratings.bookinfo"].clone();
        assert_ne!(ratings(&next).version, ratings(&all).version);
        let body: crate::registry::Service = serde_json::from_slice(&ratings(&next).body).unwrap();
        assert_eq!(body.addresses, ["192.0.2.7"]);
        assert_eq!(
            next["service/reviews.bookinfo"].version, all["service/reviews.bookinfo"].version,
            "an unchanged service is not sent again"
        );
    }

    #[test]
    fn a_claim_that_stops_holding_is_refused_on_the_next_view() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(&dir);
        let claim = Some("bookinfo/reviews-v2");
        assert!(hub.view(&reviews(), peer(), claim, &[], false).is_ok());
        hub.store
            .apply(
                "workloads.yaml",
                &SHARED.replace(
                    "version: v2}, serviceAccount: bookinfo-reviews",
                    "version: v2}, serviceAccount: bookinfo-reviews-v2",
                ),
            )
            .unwrap();
        let refusal = hub.view(&reviews(), peer(), claim, &[], false).unwrap_err();
        assert!(
            matches!(&refusal, Refusal::WrongIdentity { runs_as, .. } if runs_as.ends_with("/sa/bookinfo-reviews-v2")),
            "{refusal}"
        );
        assert_eq!(
            refused_status(&refusal).code(),
            tonic::Code::PermissionDenied
        );
        // The other workload of that identity is now the only candidate.
        let (_, name, _) = hub.view(&reviews(), peer(), None, &[], false).unwrap();
        assert_eq!(name, "bookinfo/reviews-v1");
    }
}
