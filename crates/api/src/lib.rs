//! meshward's gRPC APIs, generated from the protos in `proto/`.

#![forbid(unsafe_code)]

pub mod codec;

/// Istio's certificate service, `istio.v1.auth.IstioCertificateService`.
pub mod istio_ca {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("istio.v1.auth");
}

/// meshward's control-plane APIs: configuration and distribution.
pub mod control {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meshward.v1");
}

/// The `type_url`s of distributed resources.
pub mod types {
    pub const POLICY: &str = "meshward.io/Policy";
    pub const MESH_CONFIG: &str = "meshward.io/MeshConfig";
    pub const TRUST_BUNDLE: &str = "meshward.io/TrustBundle";
    pub const SERVICE: &str = "meshward.io/Service";
    pub const WORKLOAD: &str = "meshward.io/Workload";
    /// The whole revocation list, sent to every proxy.
    pub const REVOCATIONS: &str = "meshward.io/Revocations";
    /// A `networking.istio.io` Gateway, as JSON, sent to gateways only.
    pub const GATEWAY: &str = "meshward.io/Gateway";
    /// A `networking.istio.io` VirtualService, as JSON, sent to gateways only.
    pub const VIRTUAL_SERVICE: &str = "meshward.io/VirtualService";
}

/// The JSON bodies of distributed resources that are meshward's own (policies
/// travel as the Istio objects themselves).
pub mod resources {
    use std::collections::{BTreeMap, BTreeSet};

    use serde::{Deserialize, Serialize};

    /// One address of a service, and who runs it there.
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
    pub struct Endpoint {
        pub address: String,
        /// Service port number → the port the workload listens on.
        pub ports: BTreeMap<u16, u16>,
        pub identity: String,
        /// The endpoint has no proxy: it is called in plaintext (a
        /// `MESH_EXTERNAL` entry's endpoints, or a workload labelled
        /// `security.istio.io/tlsMode` other than `istio`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub plaintext: bool,
    }

    /// A service host: its ports, endpoints, and the identities allowed to
    /// serve it (what a client's proxy checks: secure naming).
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Service {
        pub host: String,
        /// `namespace/name` of the ServiceEntry.
        pub entry: String,
        /// Port number → Istio protocol name (`HTTP`, `GRPC`, `TCP`, ...).
        pub ports: BTreeMap<u16, String>,
        pub endpoints: Vec<Endpoint>,
        pub identities: BTreeSet<String>,
        /// The service's virtual addresses (IPs, or CIDR ranges): its
        /// ServiceEntries' `addresses`, or those the control plane
        /// allocated when they give none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub addresses: Vec<String>,
        /// The `addresses` were allocated by the control plane (from
        /// 240.240.0.0/16 and 2001:2::/48), not written in an entry.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub auto_allocated: bool,
        /// How its endpoints are found, Istio's `resolution` (`NONE`,
        /// `STATIC`, `DNS`, `DNS_ROUND_ROBIN`): with `DNS`, endpoint
        /// addresses may be names, resolved by the proxy; with `NONE`, a
        /// connection goes to the address the application called.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub resolution: Option<String>,
        /// A DestinationRule's `trafficPolicy.loadBalancer.simple` for the
        /// host (`LEAST_REQUEST` when none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub load_balancer: Option<String>,
    }

    /// The proxy's own workload, as the registry knows it.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct OwnWorkload {
        /// `namespace/name` of its WorkloadEntry, if one matched.
        pub name: Option<String>,
        pub namespace: String,
        pub labels: BTreeMap<String, String>,
    }

    /// What a revocation names.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum RevocationKind {
        /// A workload identity (SPIFFE ID): every certificate and token for it.
        Identity,
        /// One certificate, by its serial number.
        Serial,
        /// One bootstrap token, by its id (`jti`).
        Token,
    }

    impl RevocationKind {
        pub const ALL: [RevocationKind; 3] = [
            RevocationKind::Identity,
            RevocationKind::Serial,
            RevocationKind::Token,
        ];

        pub fn as_str(self) -> &'static str {
            match self {
                RevocationKind::Identity => "identity",
                RevocationKind::Serial => "serial",
                RevocationKind::Token => "token",
            }
        }
    }

    impl std::str::FromStr for RevocationKind {
        type Err = String;

        fn from_str(s: &str) -> Result<Self, Self::Err> {
            RevocationKind::ALL
                .into_iter()
                .find(|k| k.as_str().eq_ignore_ascii_case(s))
                .ok_or_else(|| format!("{s:?} is not identity, serial or token"))
        }
    }

    /// One entry of the revocation list, as the store keeps it, `meshward get
    /// revocations` shows it and proxies receive it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Revocation {
        pub kind: RevocationKind,
        /// The SPIFFE ID, the serial (lower-case hex bytes joined by `:`, as
        /// `meshward ca inspect` prints it) or the token id.
        pub value: String,
        pub reason: String,
        /// RFC 3339.
        pub revoked_at: String,
    }
}
