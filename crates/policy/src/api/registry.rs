//! The workload registry without Kubernetes: Istio's own `networking.istio.io`
//! kinds, `WorkloadEntry` (one workload: address, ports, labels, service
//! account) and `ServiceEntry` (a service: hosts, ports, and the workloads
//! that run it, selected by labels or listed inline), and of
//! `DestinationRule` the load balancer of a host. Only the fields that
//! identity and secure naming need are typed; the rest of each spec is kept
//! as written, so Istio YAML loads unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Object;

/// The API group of the registry kinds.
pub const NETWORKING_GROUP: &str = "networking.istio.io";
/// Its versions with the schema read here.
pub const NETWORKING_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

pub type WorkloadEntry = Object<WorkloadEntrySpec>;
pub type ServiceEntry = Object<ServiceEntrySpec>;
pub type DestinationRule = Object<DestinationRuleSpec>;

/// `DestinationRule.spec`: what meshward reads of it is how a host's
/// endpoints share its traffic (`trafficPolicy.loadBalancer.simple`); the
/// rest (subsets, connection pools, outlier detection, TLS settings) is
/// kept as written and not used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// `DestinationRule.spec.trafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// `trafficPolicy.loadBalancer`: `simple` is read; `consistentHash` and
/// locality settings are kept, not used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// The `simple` load balancers Istio's API names.
pub const SIMPLE_LOAD_BALANCERS: [&str; 6] = [
    "UNSPECIFIED",
    "LEAST_CONN",
    "RANDOM",
    "PASSTHROUGH",
    "ROUND_ROBIN",
    "LEAST_REQUEST",
];

impl DestinationRuleSpec {
    /// The `simple` load balancer it asks for, if any.
    pub fn simple_load_balancer(&self) -> Option<&str> {
        self.traffic_policy
            .as_ref()?
            .load_balancer
            .as_ref()?
            .simple
            .as_deref()
    }
}

/// `WorkloadEntry.spec` (also a `ServiceEntry` inline endpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: String,
    /// Port name → number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
    /// `network`, `locality`, `weight`: kept, not used.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// One `ServiceEntry.spec.ports[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// `ServiceEntry.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// Selects WorkloadEntries (of the ServiceEntry's namespace) by labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelectorLabels>,
    /// Inline endpoints, instead of a selector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntrySpec>,
    /// Extra identities allowed to run the service (Istio's
    /// `subjectAltNames`), beside those of its workloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// The service's virtual addresses: IPs, or CIDR ranges (which match
    /// destinations but are never answered by DNS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<ServiceLocation>,
    /// Unset is Istio's `NONE`; see [`ServiceEntrySpec::effective_resolution`]
    /// for how meshward reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    /// `exportTo` and the rest: kept, not used.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// `ServiceEntry.spec.location`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceLocation {
    MeshExternal,
    MeshInternal,
}

/// `ServiceEntry.spec.resolution`: how the proxy finds where to send a
/// connection to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// To the address the application connected to (passthrough).
    None,
    /// To the entry's endpoints, by their IP addresses.
    Static,
    /// To the endpoints (or hosts) resolved by DNS.
    Dns,
    /// As `Dns`, one address at a time.
    DnsRoundRobin,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::None => "NONE",
            Resolution::Static => "STATIC",
            Resolution::Dns => "DNS",
            Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
        }
    }
}

/// The label with which a ServiceEntry opts out of address auto-allocation
/// (`"false"`), as in Istio.
pub const AUTOALLOCATE_LABEL: &str = "networking.istio.io/enable-autoallocate-ip";

impl ServiceEntry {
    /// Whether the control plane allocates addresses for this entry's hosts
    /// (Istio's `ShouldV2AutoAllocateIP`): not when it has addresses of its
    /// own, not for resolution `NONE` (the proxy could not tell which host
    /// an application meant from an address it made up), not when the
    /// entry opts out with [`AUTOALLOCATE_LABEL`]. Wildcard hosts never get
    /// one (the registry checks each host).
    pub fn auto_allocates(&self) -> bool {
        self.spec.addresses.is_empty()
            && self.spec.effective_resolution() != Resolution::None
            && !self
                .metadata
                .labels
                .get(AUTOALLOCATE_LABEL)
                .is_some_and(|v| v.eq_ignore_ascii_case("false"))
    }
}

impl ServiceEntrySpec {
    /// The resolution meshward acts on. Istio's default is `NONE`, but
    /// meshward has always sent a service's traffic to the endpoints its
    /// entry names (a `workloadSelector` or inline `endpoints`), which is
    /// `STATIC`: so an entry that leaves `resolution` unset and names
    /// endpoints is read as `STATIC`, and one that names none as `NONE`.
    /// An explicit value is taken as written.
    pub fn effective_resolution(&self) -> Resolution {
        match self.resolution {
            Some(r) => r,
            None if self.workload_selector.is_some() || !self.endpoints.is_empty() => {
                Resolution::Static
            }
            None => Resolution::None,
        }
    }
}

/// `ServiceEntry.spec.workloadSelector`: `labels`, not `matchLabels`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelectorLabels {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl WorkloadSelectorLabels {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// One registry object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RegistryObject {
    WorkloadEntry(WorkloadEntry),
    ServiceEntry(ServiceEntry),
    DestinationRule(DestinationRule),
    Gateway(super::Gateway),
    VirtualService(super::VirtualService),
}

impl RegistryObject {
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryObject::WorkloadEntry(_) => "WorkloadEntry",
            RegistryObject::ServiceEntry(_) => "ServiceEntry",
            RegistryObject::DestinationRule(_) => "DestinationRule",
            RegistryObject::Gateway(_) => "Gateway",
            RegistryObject::VirtualService(_) => "VirtualService",
        }
    }

    pub fn metadata(&self) -> &super::ObjectMeta {
        match self {
            RegistryObject::WorkloadEntry(o) => &o.metadata,
            RegistryObject::ServiceEntry(o) => &o.metadata,
            RegistryObject::DestinationRule(o) => &o.metadata,
            RegistryObject::Gateway(o) => &o.metadata,
            RegistryObject::VirtualService(o) => &o.metadata,
        }
    }
}
