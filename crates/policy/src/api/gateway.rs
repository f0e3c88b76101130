//! Ingress: Istio's `networking.istio.io` `Gateway` (which ports and hosts
//! the ingress gateway serves, with which certificates) and `VirtualService`
//! (where each request to those hosts goes), the subset an ingress gateway
//! needs. Every struct refuses fields it does not type, so a routing
//! feature meshward does not implement (mirroring, fault injection,
//! redirects, CORS, header manipulation, TCP and TLS routes...) is an error
//! at its line instead of a route silently doing less than written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Object;

pub type Gateway = Object<GatewaySpec>;
pub type VirtualService = Object<VirtualServiceSpec>;

/// `Gateway.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// The gateway workloads (by their labels) that serve these servers.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<Server>,
}

/// `Gateway.spec.servers[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    pub port: GatewayPort,
    /// Host names served, each maybe `namespace/host` (Istio's form; the
    /// namespace part only limits which VirtualServices may bind).
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// A name for the server, for logs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Istio binds the port on this address (`bind`); meshward's gateway
    /// listens on every server on its `--listen` address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
}

/// `servers[].port`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayPort {
    pub number: u32,
    #[serde(default)]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Istio's deprecated `targetPort`: not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// `servers[].tls`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    /// On an HTTP server: answer every request with a 301 to `https://`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub https_redirect: bool,
    /// `SIMPLE` (server certificate) or `MUTUAL` (and a client certificate
    /// from `caCertificates`); `PASSTHROUGH`, `AUTO_PASSTHROUGH`,
    /// `ISTIO_MUTUAL` and `OPTIONAL_MUTUAL` are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server_certificate: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub private_key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_certificates: String,
    /// `NAME`: `NAME.crt`, `NAME.key` and (MUTUAL) `NAME-cacert.crt` in the
    /// gateway's `--credentials-dir`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential_name: String,
    /// `TLSV1_2` or `TLSV1_3` (meshward never offers less than 1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<String>,
    /// Only `TLSV1_3` or unset (`TLS_AUTO`, `TLSV1_2` cap the version, which
    /// meshward does not do) are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_protocol_version: Option<String>,
}

/// `VirtualService.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    /// `name` or `namespace/name` of Gateways; `mesh` (sidecars) is not
    /// served by meshward and is warned about.
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// Visibility across namespaces: kept, not used (warned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

/// `http[]`: matched in order, the first whose any `match` holds wins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Any of these (none: every request).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// The whole request, retries included (`5s`, `0.5s`, `250ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
}

/// `http[].match[]`: every field given must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Header name (lower case) → value match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// Istio's `ignoreUriCase`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
}

/// Istio's `StringMatch`: exactly one of `exact`, `prefix`, `regex` (RE2
/// syntax, matched against the whole value).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// `http[].route[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    /// Share of the requests, relative to the route's other destinations
    /// (unset: 100 when alone, 0 beside weighted ones, as Istio reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// `route[].destination`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

/// `destination.port`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: u32,
}

/// `http[].rewrite`: the matched part of the path (a `prefix` match's
/// prefix, else the whole path) is replaced by `uri`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// `http[].retries`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Comma-separated Envoy retry conditions; meshward acts on
    /// `connect-failure`, `refused-stream`, `reset` (all: the upstream
    /// could not be reached or dropped the request before answering),
    /// `5xx`, `gateway-error` and `503`; others are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
}

/// The `retryOn` conditions meshward implements.
pub const RETRY_ON: [&str; 6] = [
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "503",
];

/// Istio's default `retryOn` when `retries` gives none.
pub const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,503";

impl Retries {
    /// The conditions in force.
    pub fn conditions(&self) -> impl Iterator<Item = &str> {
        self.retry_on
            .as_deref()
            .unwrap_or(DEFAULT_RETRY_ON)
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
    }
}

impl Gateway {
    /// Whether the gateway workload with `labels` serves this Gateway (an
    /// empty selector selects every gateway, as Istio's does).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.spec
            .selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl VirtualService {
    /// Whether this VirtualService binds to `gateway` (`namespace/name`):
    /// named in `gateways` as `name` (its own namespace) or
    /// `namespace/name`.
    pub fn binds(&self, gateway_namespace: &str, gateway_name: &str) -> bool {
        let own = self.metadata.namespace_or_default();
        self.spec.gateways.iter().any(|g| match g.split_once('/') {
            Some((ns, name)) => ns == gateway_namespace && name == gateway_name,
            None => own == gateway_namespace && g == gateway_name,
        })
    }
}
