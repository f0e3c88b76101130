//! Object metadata and the workload-targeting fields shared by all kinds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The namespace a resource lands in when its metadata names none, as with `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The part of Kubernetes `ObjectMeta` that policy semantics depend on.
///
/// Other metadata fields (uid, resourceVersion, managedFields, ...) are accepted
/// and ignored so objects exported from a cluster load unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Decides PeerAuthentication conflicts: the oldest policy wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<jiff::Timestamp>,
}

impl ObjectMeta {
    pub fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// `spec.selector`: the workloads (by label) a policy applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// The first label that stops the selector from matching, for explanations.
    pub fn first_mismatch(&self, labels: &BTreeMap<String, String>) -> Option<(&str, &str)> {
        self.match_labels
            .iter()
            .find(|(k, v)| labels.get(*k) != Some(*v))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `k=v,k2=v2`, the form users type on the command line.
    pub fn to_label_string(&self) -> String {
        self.match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `spec.targetRef(s)`: a Gateway API style reference to what a policy attaches to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}
