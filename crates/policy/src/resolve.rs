//! Which policies apply to a workload, and the effective settings they give.
//!
//! [`PolicySet::applicability`] is the one place that decides whether a policy
//! applies to a workload; compiling ([`PolicySet::for_workload`]) and
//! explaining (`meshward describe`) both use it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use crate::api::{Kind, MeshConfig, MtlsMode, PathNormalizationMode, PeerAuthentication, Policy};
use crate::authn::{Authenticator, JwksCache};
use crate::authz::{Authorizer, PolicyRef};

/// A workload as policies see it: where it runs and its labels.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
pub struct Workload {
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// How a policy reaches a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Root namespace, no selector: every workload of the mesh.
    Mesh,
    /// Root namespace with a selector: matching workloads in every namespace.
    MeshSelector,
    /// The workload's namespace, no selector.
    Namespace,
    /// The workload's namespace, a selector that matches it.
    Workload,
}

impl Scope {
    pub fn describe(self) -> &'static str {
        match self {
            Scope::Mesh => "mesh-wide (root namespace, no selector)",
            Scope::MeshSelector => "mesh-wide by selector (root namespace)",
            Scope::Namespace => "namespace-wide",
            Scope::Workload => "workload (selector matches)",
        }
    }
}

/// Whether a policy applies to a workload, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applicability {
    Applies(Scope),
    DoesNotApply(String),
}

/// A validated set of policies plus the mesh configuration they are read with.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    mesh: Arc<MeshConfig>,
    policies: Vec<Policy>,
    by_namespace: HashMap<String, Vec<usize>>,
    jwks: Arc<JwksCache>,
}

impl PolicySet {
    pub fn new(mesh: MeshConfig, policies: Vec<Policy>) -> PolicySet {
        let mut by_namespace: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in policies.iter().enumerate() {
            by_namespace
                .entry(p.metadata().namespace_or_default().to_owned())
                .or_default()
                .push(i);
        }
        PolicySet {
            mesh: Arc::new(mesh),
            policies,
            by_namespace,
            jwks: Arc::new(JwksCache::default()),
        }
    }

    /// Uses `cache` (with its fetcher) for `jwksUri` keys.
    pub fn with_jwks(mut self, cache: Arc<JwksCache>) -> PolicySet {
        self.jwks = cache;
        self
    }

    pub fn mesh(&self) -> &MeshConfig {
        &self.mesh
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Whether `policy` applies to `workload`, with Istio's scoping rules.
    pub fn applicability(&self, policy: &Policy, workload: &Workload) -> Applicability {
        let meta = policy.metadata();
        let ns = meta.namespace_or_default();
        let root = self.mesh.root_namespace.as_str();
        let selector = policy.selector();
        let target_refs = policy.target_refs();
        if !target_refs.is_empty() {
            return Applicability::DoesNotApply(
                "targetRef attaches it to a gateway or waypoint; sidecar workloads ignore it"
                    .into(),
            );
        }
        let has_selector = selector.is_some_and(|s| !s.match_labels.is_empty());
        if ns != root && ns != workload.namespace {
            return Applicability::DoesNotApply(format!(
                "it is in namespace {ns:?}; it applies only to workloads there (or mesh-wide from the root namespace {root:?})"
            ));
        }
        if has_selector
            && let Some(sel) = selector
            && let Some((k, v)) = sel.first_mismatch(&workload.labels)
        {
            return Applicability::DoesNotApply(format!(
                "selector {} does not match (label {k}={v} is {})",
                sel.to_label_string(),
                match workload.labels.get(k) {
                    Some(have) => format!("{k}={have}"),
                    None => "missing".to_owned(),
                }
            ));
        }
        let scope = match (ns == root, has_selector) {
            (true, false) => Scope::Mesh,
            (true, true) => {
                if policy.kind() == Kind::PeerAuthentication {
                    return Applicability::DoesNotApply(
                        "a PeerAuthentication in the root namespace with a selector is ignored, as Istio ignores it; put it in the workload's namespace".into(),
                    );
                }
                if workload.namespace == root {
                    Scope::Workload
                } else {
                    Scope::MeshSelector
                }
            }
            (false, false) => Scope::Namespace,
            (false, true) => Scope::Workload,
        };
        Applicability::Applies(scope)
    }

    /// Candidate policies for a workload: its namespace's and the root namespace's.
    fn candidates<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a Policy> + 'a {
        let root = self.mesh.root_namespace.as_str();
        let mut namespaces = vec![workload.namespace.as_str()];
        if root != workload.namespace {
            namespaces.push(root);
        }
        namespaces
            .into_iter()
            .filter_map(|ns| self.by_namespace.get(ns))
            .flatten()
            .map(|i| &self.policies[*i])
    }

    /// Every policy of the set with whether it applies to `workload`, for explanations.
    pub fn explain(&self, workload: &Workload) -> Vec<(&Policy, Applicability)> {
        self.policies
            .iter()
            .map(|p| (p, self.applicability(p, workload)))
            .collect()
    }

    /// The policies that apply to `workload`, compiled.
    pub fn for_workload(&self, workload: &Workload) -> WorkloadPolicy {
        let mut peer = Vec::new();
        let mut request = Vec::new();
        let mut authz = Vec::new();
        for policy in self.candidates(workload) {
            let Applicability::Applies(scope) = self.applicability(policy, workload) else {
                continue;
            };
            match policy {
                Policy::PeerAuthentication(p) => peer.push((p, scope)),
                Policy::RequestAuthentication(p) => request.push(p),
                Policy::AuthorizationPolicy(p) => authz.push(p),
            }
        }
        WorkloadPolicy {
            workload: workload.clone(),
            mtls: MtlsPolicy::compose(&peer),
            authn: Authenticator::new(&request, self.jwks.clone()),
            authz: Authorizer::new(&authz, &self.mesh),
            normalization: self.mesh.normalization(),
        }
    }
}

impl PolicySet {
    /// The policies of an ingress gateway (`meshward gateway`) whose labels
    /// are `workload`'s and which serves the Gateway objects `gateways`
    /// (namespace, name). Request authentication and authorization apply
    /// as to any workload — by selector on its labels, from its namespace
    /// or the root namespace — and also through a `targetRef` to
    /// `gateway.networking.k8s.io` `Gateway` naming one of `gateways` in
    /// the policy's own namespace. PeerAuthentication does not apply: the
    /// gateway's listeners take TLS from outside the mesh (or plaintext),
    /// which Istio never holds to a PeerAuthentication; the mode is Istio's
    /// default, PERMISSIVE.
    pub fn for_gateway(
        &self,
        workload: &Workload,
        gateways: &[(String, String)],
    ) -> WorkloadPolicy {
        let mut namespaces: Vec<&str> = vec![&workload.namespace, &self.mesh.root_namespace];
        namespaces.extend(gateways.iter().map(|(ns, _)| ns.as_str()));
        namespaces.sort_unstable();
        namespaces.dedup();
        let mut request = Vec::new();
        let mut authz = Vec::new();
        for policy in namespaces
            .iter()
            .filter_map(|ns| self.by_namespace.get(*ns))
            .flatten()
            .map(|i| &self.policies[*i])
        {
            let refs = policy.target_refs();
            let applies = if refs.is_empty() {
                matches!(
                    self.applicability(policy, workload),
                    Applicability::Applies(_)
                )
            } else {
                let ns = policy.metadata().namespace_or_default();
                refs.iter().any(|r| {
                    r.group == GATEWAY_API_GROUP
                        && r.kind == "Gateway"
                        && gateways.iter().any(|(g_ns, g)| g_ns == ns && *g == r.name)
                })
            };
            match policy {
                Policy::RequestAuthentication(p) if applies => request.push(p),
                Policy::AuthorizationPolicy(p) if applies => authz.push(p),
                _ => {}
            }
        }
        WorkloadPolicy {
            workload: workload.clone(),
            mtls: MtlsPolicy::compose(&[]),
            authn: Authenticator::new(&request, self.jwks.clone()),
            authz: Authorizer::new(&authz, &self.mesh),
            normalization: self.mesh.normalization(),
        }
    }
}

/// The group of Kubernetes Gateway API's `Gateway`, which a policy's
/// `targetRef` names to attach to a gateway.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

fn policy_ref(meta: &crate::api::ObjectMeta) -> PolicyRef {
    PolicyRef::new(meta.namespace_or_default(), &meta.name)
}

/// Everything that decides for one workload, compiled once per config change.
#[derive(Debug, Clone)]
pub struct WorkloadPolicy {
    pub workload: Workload,
    pub mtls: MtlsPolicy,
    pub authn: Authenticator,
    pub authz: Authorizer,
    pub normalization: PathNormalizationMode,
}

/// The effective mutual TLS mode of a workload, per port, and which policy set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MtlsPolicy {
    /// The mode for ports without a port-level setting.
    pub mode: MtlsMode,
    /// The policy the mode came from; `None` means Istio's default, PERMISSIVE.
    pub decided_by: Option<PolicyRef>,
    pub port_modes: BTreeMap<u16, MtlsMode>,
    /// The workload-level policy whose portLevelMtls gave `port_modes`.
    pub port_policy: Option<PolicyRef>,
    /// Policies that apply but lost to an older one at the same level.
    pub superseded: Vec<(PolicyRef, PolicyRef)>,
}

impl MtlsPolicy {
    pub fn mode_for_port(&self, port: u16) -> MtlsMode {
        self.port_modes.get(&port).copied().unwrap_or(self.mode)
    }

    /// Which policy decided the mode of `port`, for explanations.
    pub fn source_for_port(&self, port: u16) -> String {
        if self.port_modes.contains_key(&port) {
            match &self.port_policy {
                Some(p) => format!("{p} portLevelMtls[{port}]"),
                None => "portLevelMtls".into(),
            }
        } else {
            match &self.decided_by {
                Some(p) => p.to_string(),
                None => "default (no PeerAuthentication sets a mode)".into(),
            }
        }
    }

    /// Istio's `ComposePeerAuthentication`: at each level (mesh, namespace,
    /// workload) the oldest policy wins; the narrowest level with a mode set
    /// decides; UNSET inherits; PERMISSIVE when nothing is set. Port-level
    /// modes come only from the workload-level policy, UNSET taking the
    /// workload's resolved mode.
    fn compose(policies: &[(&PeerAuthentication, Scope)]) -> MtlsPolicy {
        let mut superseded = Vec::new();
        let mut pick = |level: &[Scope]| -> Option<&PeerAuthentication> {
            let mut at_level: Vec<&PeerAuthentication> = policies
                .iter()
                .filter(|(_, s)| level.contains(s))
                .map(|(p, _)| *p)
                .collect();
            at_level.sort_by(|a, b| oldest_first(&a.metadata, &b.metadata));
            let winner = at_level.first().copied()?;
            for loser in &at_level[1..] {
                superseded.push((policy_ref(&loser.metadata), policy_ref(&winner.metadata)));
            }
            Some(winner)
        };
        let mesh = pick(&[Scope::Mesh]);
        let namespace = pick(&[Scope::Namespace]);
        let workload = pick(&[Scope::Workload, Scope::MeshSelector]);
        let mut mode = MtlsMode::Permissive;
        let mut decided_by = None;
        for level in [mesh, namespace, workload].into_iter().flatten() {
            let level_mode = level.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
            if level_mode != MtlsMode::Unset {
                mode = level_mode;
                decided_by = Some(policy_ref(&level.metadata));
            }
        }
        let mut port_modes = BTreeMap::new();
        if let Some(w) = workload {
            for (port, m) in w.spec.port_modes() {
                if let Ok(port) = port.parse::<u16>() {
                    let m = if m.mode == MtlsMode::Unset {
                        mode
                    } else {
                        m.mode
                    };
                    port_modes.insert(port, m);
                }
            }
        }
        MtlsPolicy {
            mode,
            decided_by,
            port_policy: workload
                .filter(|w| w.spec.port_modes().next().is_some())
                .map(|w| policy_ref(&w.metadata)),
            port_modes,
            superseded,
        }
    }
}

/// Oldest first: by creationTimestamp (policies without one count as newest),
/// then name, then namespace — the order Istio sorts configs in.
pub fn oldest_first(a: &crate::api::ObjectMeta, b: &crate::api::ObjectMeta) -> std::cmp::Ordering {
    let ts = |m: &crate::api::ObjectMeta| (m.creation_timestamp.is_none(), m.creation_timestamp);
    ts(a)
        .cmp(&ts(b))
        .then_with(|| a.name.cmp(&b.name))
        .then_with(|| a.namespace_or_default().cmp(b.namespace_or_default()))
}
