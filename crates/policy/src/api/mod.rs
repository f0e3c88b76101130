//! Typed Istio API resources, field for field as in `security.istio.io`.
//!
//! The structs mirror Istio's protobuf schema (`istio.io/api/security/v1`) in its
//! JSON/YAML form (camelCase). `v1` and `v1beta1` share one schema, so one set of
//! types serves both. Unknown fields are rejected, as Kubernetes' structural
//! schema validation would, so a typo never silently weakens a policy.

mod authorization;
mod gateway;
mod mesh;
mod meta;
mod peer_authentication;
mod registry;
mod request_authentication;

pub use authorization::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, ExtensionProviderRef,
    Operation, Rule, RuleFrom, RuleTo, Source, authorization_spec,
};
pub use gateway::{
    DEFAULT_RETRY_ON, Destination, Gateway, GatewayPort, GatewaySpec, HttpMatch, HttpRoute,
    PortSelector, RETRY_ON, Retries, Rewrite, RouteDestination, Server, ServerTls, StringMatch,
    VirtualService, VirtualServiceSpec,
};
pub use mesh::{
    DefaultProxyConfig, EnvoyExtAuthzGrpc, EnvoyExtAuthzHttp, ExtensionProvider,
    ForwardClientCertDetails, GatewayTopology, MeshConfig, OutboundMode, OutboundTrafficPolicy,
    PathNormalization, PathNormalizationMode, RequestBodyInCheck,
};
pub use meta::{DEFAULT_NAMESPACE, ObjectMeta, PolicyTargetReference, WorkloadSelector};
pub use peer_authentication::{
    MtlsMode, PeerAuthentication, PeerAuthenticationMtls, PeerAuthenticationSpec,
};
pub use registry::{
    AUTOALLOCATE_LABEL, DestinationRule, DestinationRuleSpec, LoadBalancerSettings,
    NETWORKING_GROUP, NETWORKING_VERSIONS, RegistryObject, Resolution, SIMPLE_LOAD_BALANCERS,
    ServiceEntry, ServiceEntrySpec, ServiceLocation, ServicePort, TrafficPolicy, WorkloadEntry,
    WorkloadEntrySpec, WorkloadSelectorLabels,
};
pub use request_authentication::{
    ClaimToHeader, JwtHeader, JwtRule, RequestAuthentication, RequestAuthenticationSpec,
};

use serde::{Deserialize, Serialize};

/// The API group of every security kind meshward reads.
pub const SECURITY_GROUP: &str = "security.istio.io";
/// API versions of [`SECURITY_GROUP`] that share the schema implemented here.
pub const SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// A Kubernetes-style object: type, metadata and a typed spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
    /// Kubernetes adds `status` to stored objects; it carries no policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl<S> Object<S> {
    /// `namespace/name`, the way Istio names a policy in logs.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace_or_default(),
            self.metadata.name
        )
    }
}

/// One of the security kinds. Serializes as the object itself (its
/// `apiVersion` and `kind` say which).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Policy {
    PeerAuthentication(PeerAuthentication),
    RequestAuthentication(RequestAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
}

/// Which security kind a document is, from its `kind` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    PeerAuthentication,
    RequestAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 3] = [
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
        Kind::AuthorizationPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    pub fn parse(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Policy {
    pub fn kind(&self) -> Kind {
        match self {
            Policy::PeerAuthentication(_) => Kind::PeerAuthentication,
            Policy::RequestAuthentication(_) => Kind::RequestAuthentication,
            Policy::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Policy::PeerAuthentication(o) => &o.metadata,
            Policy::RequestAuthentication(o) => &o.metadata,
            Policy::AuthorizationPolicy(o) => &o.metadata,
        }
    }

    /// `spec.selector`, for every kind.
    pub fn selector(&self) -> Option<&WorkloadSelector> {
        match self {
            Policy::PeerAuthentication(o) => o.spec.selector.as_ref(),
            Policy::RequestAuthentication(o) => o.spec.selector.as_ref(),
            Policy::AuthorizationPolicy(o) => o.spec.selector.as_ref(),
        }
    }

    /// `spec.targetRef` and `spec.targetRefs` together; PeerAuthentication has neither.
    pub fn target_refs(&self) -> Vec<&PolicyTargetReference> {
        let (one, many) = match self {
            Policy::PeerAuthentication(_) => return Vec::new(),
            Policy::RequestAuthentication(o) => (&o.spec.target_ref, &o.spec.target_refs),
            Policy::AuthorizationPolicy(o) => (&o.spec.target_ref, &o.spec.target_refs),
        };
        one.iter().chain(many).collect()
    }

    /// `Kind namespace/name`, as errors name a resource.
    pub fn display_name(&self) -> String {
        let m = self.metadata();
        format!("{} {}/{}", self.kind(), m.namespace_or_default(), m.name)
    }
}
