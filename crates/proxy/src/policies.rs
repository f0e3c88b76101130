//! The policies in force, and where they come from.
//!
//! A [`PolicyStore`] holds one compiled [`Snapshot`] at a time. Every request
//! reads the current one; a change replaces it whole, so a request is decided
//! by one consistent version and the next request sees the new one. Long-lived
//! TCP connections subscribe to changes and are re-checked.
//!
//! Standalone proxies read a directory ([`watch_dir`]); the control plane
//! will feed the same store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_policy::api::{MeshConfig, Policy};
use meshward_policy::authn::JwksCache;
use meshward_policy::load;
use meshward_policy::{PolicySet, Workload, WorkloadPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One version of the configuration, compiled for this workload.
#[derive(Debug)]
pub struct Snapshot {
    /// Starts at 1 and grows by one with every accepted change.
    pub version: u64,
    pub policy: WorkloadPolicy,
    pub set: PolicySet,
    /// Where it was read from.
    pub source: String,
    pub loaded_at: SystemTime,
    /// Whether some `jwksUri` may have to be fetched while authenticating.
    pub fetches_jwks: bool,
}

/// Whom the policies are compiled for.
#[derive(Debug, Clone)]
enum Enforcer {
    Sidecar,
    /// An ingress gateway serving these Gateways (namespace, name), which
    /// policies' `targetRef`s may name.
    Gateway(Vec<(String, String)>),
}

impl Snapshot {
    fn new(
        version: u64,
        workload: &Workload,
        enforcer: &Enforcer,
        set: PolicySet,
        source: String,
    ) -> Snapshot {
        Snapshot {
            version,
            policy: match enforcer {
                Enforcer::Sidecar => set.for_workload(workload),
                Enforcer::Gateway(served) => set.for_gateway(workload, served),
            },
            fetches_jwks: !jwks_uris(&set, workload).is_empty(),
            set,
            source,
            loaded_at: SystemTime::now(),
        }
    }
}

/// Every `jwksUri` of the RequestAuthentications that apply to `workload`,
/// with its timeout.
fn jwks_uris(set: &PolicySet, workload: &Workload) -> Vec<(String, Option<String>)> {
    let mut uris = Vec::new();
    for policy in set.policies() {
        if let Policy::RequestAuthentication(ra) = policy
            && matches!(
                set.applicability(policy, workload),
                meshward_policy::resolve::Applicability::Applies(_)
            )
        {
            for rule in &ra.spec.jwt_rules {
                if !rule.jwks_uri.is_empty() {
                    uris.push((rule.jwks_uri.clone(), rule.timeout.clone()));
                }
            }
        }
    }
    uris
}

/// The current snapshot, shared by every connection.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    /// The workload policies are compiled for. Locked by writers only, one
    /// change at a time; readers never wait for it.
    writer: Arc<std::sync::Mutex<(Workload, Enforcer)>>,
    /// Changes looked at and turned down, so that "the old policies are
    /// still in force" can be told apart from "nobody looked yet".
    refused: Arc<std::sync::Mutex<Refused>>,
}

/// How many changes were refused, and why the last one was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refused {
    pub count: u64,
    pub last_error: Option<String>,
}

impl PolicyStore {
    pub fn new(workload: Workload, set: PolicySet, source: String) -> PolicyStore {
        PolicyStore::with_enforcer(workload, Enforcer::Sidecar, set, source)
    }

    /// A store for an ingress gateway: compiled with
    /// [`PolicySet::for_gateway`], for the Gateways it serves.
    pub fn for_gateway(workload: Workload, set: PolicySet, source: String) -> PolicyStore {
        PolicyStore::with_enforcer(workload, Enforcer::Gateway(Vec::new()), set, source)
    }

    fn with_enforcer(
        workload: Workload,
        enforcer: Enforcer,
        set: PolicySet,
        source: String,
    ) -> PolicyStore {
        let snapshot = Snapshot::new(1, &workload, &enforcer, set, source);
        PolicyStore {
            tx: Arc::new(watch::channel(Arc::new(snapshot)).0),
            writer: Arc::new(std::sync::Mutex::new((workload, enforcer))),
            refused: Arc::default(),
        }
    }

    /// The workload policies are compiled for.
    pub fn workload(&self) -> Workload {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// Records a change that was not put in force.
    pub fn refuse(&self, error: String) {
        let mut refused = self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        refused.count += 1;
        refused.last_error = Some(error);
    }

    /// The changes refused so far.
    pub fn refused(&self) -> Refused {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Puts `set` in force from the next request on; returns the new version.
    /// The new snapshot is compiled before it is swapped in, so requests
    /// keep reading the old one meanwhile.
    pub fn replace(&self, set: PolicySet, source: String) -> u64 {
        self.replace_for(set, None, source)
    }

    /// Like [`PolicyStore::replace`], and when `workload` is given (the
    /// control plane says which workload this is), compiles for it from now on.
    pub fn replace_for(&self, set: PolicySet, workload: Option<Workload>, source: String) -> u64 {
        self.replace_with(set, workload, None, source)
    }

    /// Like [`PolicyStore::replace_for`], for a gateway store, which from
    /// now on serves the Gateways `served` (namespace, name).
    pub fn replace_for_gateway(
        &self,
        set: PolicySet,
        workload: Option<Workload>,
        served: Vec<(String, String)>,
        source: String,
    ) -> u64 {
        self.replace_with(set, workload, Some(served), source)
    }

    fn replace_with(
        &self,
        set: PolicySet,
        workload: Option<Workload>,
        served: Option<Vec<(String, String)>>,
        source: String,
    ) -> u64 {
        // A writer that panicked left nothing half-done: the swap is one step.
        let mut current = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(workload) = workload {
            current.0 = workload;
        }
        if let (Some(served), Enforcer::Gateway(now)) = (served, &mut current.1) {
            *now = served;
        }
        let version = self.tx.borrow().version + 1;
        let snapshot = Snapshot::new(version, &current.0, &current.1, set, source);
        self.tx.send_replace(Arc::new(snapshot));
        version
    }
}

/// A policy directory and the mesh config file read with it.
#[derive(Debug, Clone)]
pub struct DirSource {
    pub paths: Vec<PathBuf>,
    pub mesh_config: Option<PathBuf>,
}

/// Why a configuration was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    MeshConfig(String),
    #[error(
        "{count} error(s) in the policies; the previous configuration stays in force:\n{details}"
    )]
    Invalid { count: usize, details: String },
}

impl DirSource {
    /// Reads and validates everything; any error refuses the whole change,
    /// as a partial policy set could allow what the full one denies.
    pub fn load(&self, jwks: &Arc<JwksCache>) -> Result<PolicySet, LoadError> {
        let mesh = match &self.mesh_config {
            None => MeshConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    LoadError::MeshConfig(format!("reading mesh config {}: {e}", path.display()))
                })?;
                load::load_mesh_config(&path.display().to_string(), &text)
                    .map_err(|d| LoadError::MeshConfig(d.to_string()))?
            }
        };
        let loaded = load::load_paths(&self.paths);
        for warning in loaded.diagnostics.iter().filter(|d| !d.is_error()) {
            tracing::warn!("{warning}");
        }
        let errors = loaded.errors();
        if !errors.is_empty() {
            return Err(LoadError::Invalid {
                count: errors.len(),
                details: errors.join("\n"),
            });
        }
        Ok(PolicySet::new(mesh, loaded.into_policies()).with_jwks(jwks.clone()))
    }

    pub fn describe(&self) -> String {
        let paths: Vec<String> = self.paths.iter().map(|p| p.display().to_string()).collect();
        paths.join(", ")
    }

    fn fingerprint(&self) -> u64 {
        let mut paths = self.paths.clone();
        paths.extend(self.mesh_config.clone());
        load::fingerprint(&paths)
    }
}

/// Polls `source` every `interval` and puts each valid change in force. An
/// invalid change is logged with every error, and the previous
/// configuration keeps deciding.
pub async fn watch_dir(
    source: DirSource,
    store: PolicyStore,
    jwks: Arc<JwksCache>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut seen = source.fingerprint();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let current = {
            let source = source.clone();
            match tokio::task::spawn_blocking(move || source.fingerprint()).await {
                Ok(f) => f,
                Err(_) => continue,
            }
        };
        if current == seen {
            continue;
        }
        seen = current;
        let loaded = {
            let (source, jwks) = (source.clone(), jwks.clone());
            tokio::task::spawn_blocking(move || source.load(&jwks)).await
        };
        match loaded {
            Ok(Ok(set)) => {
                let version = store.replace(set, source.describe());
                tracing::info!(version, source = %source.describe(), "policies changed; the new version is in force");
                warm_jwks(&store, &jwks);
            }
            Ok(Err(e)) => {
                tracing::error!("policy change refused: {e}");
                store.refuse(e.to_string());
            }
            Err(e) => {
                tracing::error!("policy reload failed: {e}");
                store.refuse(format!("policy reload failed: {e}"));
            }
        }
    }
}

/// Fetches the JWKS of every `jwksUri` the current policies use, off the
/// request path, so the first request with a token does not wait for it.
pub fn warm_jwks(store: &PolicyStore, jwks: &Arc<JwksCache>) {
    let snapshot = store.current();
    let uris = jwks_uris(&snapshot.set, &snapshot.policy.workload);
    if uris.is_empty() {
        return;
    }
    let jwks = jwks.clone();
    tokio::task::spawn_blocking(move || {
        for (uri, timeout) in uris {
            let timeout = timeout
                .as_deref()
                .and_then(meshward_policy::duration::parse)
                .unwrap_or(Duration::from_secs(5));
            if let Err(e) = jwks.keys(&uri, timeout) {
                tracing::warn!(%uri, "fetching JWKS: {e}");
            }
        }
    });
}
