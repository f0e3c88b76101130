//! The part of Istio's `MeshConfig` that security decisions depend on.

use serde::{Deserialize, Serialize};

/// Mesh-wide settings. Unknown MeshConfig fields (access logging, tracing, ...)
/// are accepted and ignored so a real `istio` ConfigMap's `mesh` loads as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    /// Policies here without a selector apply mesh-wide.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domain_aliases: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extension_providers: Vec<ExtensionProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<PathNormalization>,
    /// What a transparent proxy does with traffic to destinations the
    /// registry does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// `defaultConfig`: of the proxies' defaults, the ingress gateway's
    /// `gatewayTopology` is read; the rest is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_config: Option<DefaultProxyConfig>,
}

/// `MeshConfig.defaultConfig` (Istio's `ProxyConfig`), the part meshward reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DefaultProxyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_topology: Option<GatewayTopology>,
}

/// `ProxyConfig.gatewayTopology`: what the ingress gateway may believe of
/// the headers in front of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTopology {
    /// How many proxies in front of the gateway append to
    /// `X-Forwarded-For` (Envoy's `xff_num_trusted_hops`): the client is
    /// the address that many entries from the right; 0 trusts none and
    /// takes the connection's peer.
    #[serde(default)]
    pub num_trusted_proxies: u32,
    /// What the gateway does with an incoming `X-Forwarded-Client-Cert`
    /// (Envoy's `forward_client_cert_details`); unset is `SANITIZE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_client_cert_details: Option<ForwardClientCertDetails>,
}

/// Envoy's `forward_client_cert_details`, as Istio names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ForwardClientCertDetails {
    /// Istio's `UNDEFINED`: the default, `SANITIZE`.
    Undefined,
    /// Removed; the mesh sees only what the gateway itself sets.
    #[default]
    Sanitize,
    /// Passed on unchanged, nothing added.
    ForwardOnly,
    /// Passed on with the gateway's own element appended.
    AppendForward,
    /// Replaced by the gateway's own element.
    SanitizeSet,
    /// Passed on as is when the client connection is mutual TLS, else
    /// removed.
    AlwaysForwardOnly,
}

/// Istio's `outboundTrafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: OutboundMode,
}

/// `ALLOW_ANY` (Istio's default): unknown destinations are passed through
/// as plain TCP. `REGISTRY_ONLY`: they are refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    #[default]
    AllowAny,
    RegistryOnly,
}

fn default_root_namespace() -> String {
    "istio-system".to_owned()
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            root_namespace: default_root_namespace(),
            trust_domain: default_trust_domain(),
            trust_domain_aliases: Vec::new(),
            extension_providers: Vec::new(),
            path_normalization: None,
            outbound_traffic_policy: None,
            default_config: None,
        }
    }
}

impl MeshConfig {
    pub fn extension_provider(&self, name: &str) -> Option<&ExtensionProvider> {
        self.extension_providers.iter().find(|p| p.name == name)
    }

    pub fn outbound_mode(&self) -> OutboundMode {
        self.outbound_traffic_policy
            .as_ref()
            .map(|p| p.mode)
            .unwrap_or_default()
    }

    /// `defaultConfig.gatewayTopology`, or its defaults.
    pub fn gateway_topology(&self) -> GatewayTopology {
        self.default_config
            .as_ref()
            .and_then(|d| d.gateway_topology.clone())
            .unwrap_or_default()
    }

    pub fn normalization(&self) -> PathNormalizationMode {
        self.path_normalization
            .as_ref()
            .map(|p| p.normalization)
            .unwrap_or_default()
            .effective()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathNormalization {
    #[serde(default)]
    pub normalization: PathNormalizationMode,
}

/// `MeshConfig.ProxyPathNormalization.NormalizationType`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalizationMode {
    /// Istio's default, which is [`PathNormalizationMode::Base`].
    #[default]
    Default,
    None,
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

impl PathNormalizationMode {
    pub fn effective(self) -> PathNormalizationMode {
        match self {
            PathNormalizationMode::Default => PathNormalizationMode::Base,
            other => other,
        }
    }
}

/// `MeshConfig.extensionProviders[]`: the kinds a CUSTOM policy can name.
/// Providers of other kinds (tracing, logging) are kept by name only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_http: Option<EnvoyExtAuthzHttp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_grpc: Option<EnvoyExtAuthzGrpc>,
}

impl ExtensionProvider {
    /// Whether a failing provider lets requests through.
    pub fn fail_open(&self) -> bool {
        match (&self.envoy_ext_authz_http, &self.envoy_ext_authz_grpc) {
            (Some(h), _) => h.fail_open,
            (None, Some(g)) => g.fail_open,
            (None, None) => false,
        }
    }

    /// The status to deny with when the provider fails: `statusOnError`, 403 if unset or invalid.
    pub fn status_on_error(&self) -> u16 {
        let configured = match (&self.envoy_ext_authz_http, &self.envoy_ext_authz_grpc) {
            (Some(h), _) => h.status_on_error.as_str(),
            (None, Some(g)) => g.status_on_error.as_str(),
            (None, None) => "",
        };
        configured
            .parse()
            .ok()
            .filter(|c| (200..600).contains(c))
            .unwrap_or(403)
    }

    /// The request body settings of either kind.
    pub fn request_body(&self) -> Option<&RequestBodyInCheck> {
        match (&self.envoy_ext_authz_http, &self.envoy_ext_authz_grpc) {
            (Some(h), _) => h.include_request_body_in_check.as_ref(),
            (None, Some(g)) => g.include_request_body_in_check.as_ref(),
            (None, None) => None,
        }
    }

    /// The kind, as MeshConfig names it.
    pub fn kind(&self) -> &'static str {
        match (&self.envoy_ext_authz_http, &self.envoy_ext_authz_grpc) {
            (Some(_), _) => "envoyExtAuthzHttp",
            (None, Some(_)) => "envoyExtAuthzGrpc",
            (None, None) => "other",
        }
    }

    /// Whether a CUSTOM policy can use this provider for authorization.
    pub fn is_authorizer(&self) -> bool {
        self.envoy_ext_authz_http.is_some() || self.envoy_ext_authz_grpc.is_some()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyExtAuthzHttp {
    pub service: String,
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path_prefix: String,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status_on_error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub include_additional_headers_in_check: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_allow: Vec<String>,
    /// The request body in the check request's own body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_request_body_in_check: Option<RequestBodyInCheck>,
    /// Accepted for compatibility; meshward has no route cache to clear.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear_route_cache: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyExtAuthzGrpc {
    pub service: String,
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status_on_error: String,
    /// The request body in `attributes.request.http.body` / `raw_body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_request_body_in_check: Option<RequestBodyInCheck>,
    /// Accepted for compatibility; meshward has no route cache to clear.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear_route_cache: bool,
}

/// `EnvoyExternalAuthorizationRequestBody`: how much of a request body the
/// proxy holds before asking the provider (Envoy's `with_request_body`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestBodyInCheck {
    /// The most body bytes held; a longer body is refused with 413 unless
    /// `allowPartialMessage`, which sends the first `maxRequestBytes`.
    #[serde(default)]
    pub max_request_bytes: u32,
    #[serde(default)]
    pub allow_partial_message: bool,
    /// gRPC providers: the body as bytes (`raw_body`) rather than UTF-8 (`body`).
    #[serde(default)]
    pub pack_as_bytes: bool,
}
