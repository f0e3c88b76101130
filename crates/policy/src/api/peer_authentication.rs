//! `PeerAuthentication`: which mutual TLS mode a workload's ports accept.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Object, WorkloadSelector};

pub type PeerAuthentication = Object<PeerAuthenticationSpec>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerAuthenticationMtls>,
    /// Keyed by workload port. YAML keys are strings here so that a bad key
    /// (`"http"`) is reported by validation with its field path, not as a
    /// type error. `Some` when written, even empty, which Istio refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<String, PeerAuthenticationMtls>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationMtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

impl PeerAuthenticationSpec {
    /// The port-level modes, by port as written.
    pub fn port_modes(&self) -> impl Iterator<Item = (&String, &PeerAuthenticationMtls)> {
        self.port_level_mtls.iter().flatten()
    }
}

/// Istio's `PeerAuthentication.MutualTLS.Mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent (namespace, then mesh); PERMISSIVE when nothing is set.
    #[default]
    Unset,
    /// Plaintext only.
    Disable,
    /// Mutual TLS and plaintext on the same port.
    Permissive,
    /// Mutual TLS only.
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
