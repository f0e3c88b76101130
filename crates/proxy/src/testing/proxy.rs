//! Proxies started in-process, each with its own temp dir (policies, access
//! and audit logs) and listeners on ports the system chose.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshward_policy::authn::JwksCache;
use meshward_policy::{Workload, load};

use super::prometheus::Scrape;
use crate::config::{InboundPort, Limits, ProxyConfig, Upstream};
use crate::identity::WorkloadIdentity;
use crate::log::LogTarget;
use crate::policies::{DirSource, PolicyStore};
use crate::{LogTargets, Proxy};

/// A proxy to start: specs in the command line's syntax
/// (`--inbound`, `--upstream`), listening on port 0.
pub struct ProxySpec<'a> {
    pub identity: WorkloadIdentity,
    pub namespace: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    /// `0=APP_ADDR,protocol=http[,port=POLICY_PORT]`: the policy port is
    /// the port bound unless given.
    pub inbound: Vec<String>,
    /// `HOST:PORT=127.0.0.1:0,endpoint=..,identity=..`.
    pub upstreams: Vec<String>,
    /// The contents of the policy directory's one file.
    pub policies: &'a str,
    pub mesh_config: Option<&'a str>,
}

/// A proxy under test, with its policy directory and access log.
pub struct TestProxy {
    pub proxy: Option<Proxy>,
    pub store: PolicyStore,
    pub dir: tempfile::TempDir,
    /// Where each inbound spec's listener was bound, in spec order.
    pub inbound: Vec<SocketAddr>,
    /// Where each upstream spec's listener was bound, in spec order.
    pub outbound: Vec<SocketAddr>,
}

impl TestProxy {
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.dir.path().join("access.log"))
    }

    pub fn audit_log(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.dir.path().join("audit.log"))
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// The proxy's metrics now, parsed from what `/stats/prometheus` serves.
    pub fn scrape(&self) -> Scrape {
        let proxy = self.proxy.as_ref().expect("the proxy is running");
        let text = proxy.metrics().encode();
        Scrape::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// Puts `yaml` in force now (as a control plane would).
    pub fn set_policies(&self, yaml: &str) {
        let loaded = load::load_str("test.yaml", yaml);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        let set = meshward_policy::PolicySet::new(Default::default(), loaded.into_policies());
        self.store.replace(set, "test".into());
    }
}

/// The records of a JSON-lines log; a line still being written (no newline
/// yet) is left for the next read, any other line must parse.
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON: {l}: {e}", path.display()))
        })
        .collect()
}

/// Starts a proxy whose policy directory watcher polls every 100 ms. Every
/// listener must be on port 0: the addresses bound are read back into
/// [`TestProxy::inbound`] and [`TestProxy::outbound`], so tests running in
/// parallel never race for a port.
pub async fn start_proxy(spec: ProxySpec<'_>) -> TestProxy {
    start_proxy_with(spec, Default::default()).await
}

/// [`start_proxy`], keeping `facts` in its access records (`--workload`,
/// `--log-header`).
pub async fn start_proxy_with(spec: ProxySpec<'_>, facts: crate::facts::FactSettings) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("policies.yaml"), spec.policies).unwrap();
    let mesh_config = spec.mesh_config.map(|m| {
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, m).unwrap();
        path
    });
    let inbound: Vec<InboundPort> = spec.inbound.iter().map(|s| s.parse().unwrap()).collect();
    let upstreams: Vec<Upstream> = spec.upstreams.iter().map(|s| s.parse().unwrap()).collect();
    let fixed = inbound
        .iter()
        .map(|p| p.listen)
        .chain(upstreams.iter().map(|u| u.listen))
        .find(|a| a.port() != 0);
    assert!(
        fixed.is_none(),
        "listen on port 0, not {fixed:?}: a fixed port races with tests running in parallel"
    );
    let source = DirSource {
        paths: vec![policy_dir.clone()],
        mesh_config,
    };
    let jwks = Arc::new(JwksCache::default());
    let set = source.load(&jwks).unwrap();
    let workload = Workload {
        namespace: spec.namespace.into(),
        labels: spec
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let store = PolicyStore::new(workload.clone(), set, source.describe());
    tokio::spawn(crate::policies::watch_dir(
        source,
        store.clone(),
        jwks,
        Duration::from_millis(100),
        tokio_util::sync::CancellationToken::new(),
    ));
    let config = ProxyConfig {
        workload,
        inbound,
        upstreams,
        admin: Some("127.0.0.1:0".parse().unwrap()),
        limits: Limits::default(),
        drain_grace: Duration::from_secs(3),
        mark: None,
        transparent: None,
        dns: None,
    };
    let logs = LogTargets {
        access: LogTarget::File(dir.path().join("access.log")),
        audit: LogTarget::File(dir.path().join("audit.log")),
        facts,
    };
    let proxy = Proxy::start(config, spec.identity, store.clone(), logs)
        .await
        .unwrap();
    let listeners = proxy.listeners();
    let bound = |l: &[crate::ListenerInfo]| l.iter().map(|l| l.address).collect();
    TestProxy {
        inbound: bound(&listeners.inbound),
        outbound: bound(&listeners.outbound),
        proxy: Some(proxy),
        store,
        dir,
    }
}

/// Namespace `web` in STRICT mode.
pub const STRICT_NS: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: web}
spec:
  mtls: {mode: STRICT}
"#;
