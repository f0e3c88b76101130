//! The workload registry without Kubernetes: Istio's own `networking.istio.io`
//! kinds, `WorkloadEntry` (one workload: address, ports, labels, service
//! account) and `ServiceEntry` (a service: hosts, ports, and the workloads
//! that run it, selected by labels or listed inline). Only the fields that
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
    /// `addresses`, `location`, `resolution`, `exportTo`: kept, not used.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
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
}

impl RegistryObject {
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryObject::WorkloadEntry(_) => "WorkloadEntry",
            RegistryObject::ServiceEntry(_) => "ServiceEntry",
        }
    }

    pub fn metadata(&self) -> &super::ObjectMeta {
        match self {
            RegistryObject::WorkloadEntry(o) => &o.metadata,
            RegistryObject::ServiceEntry(o) => &o.metadata,
        }
    }
}
