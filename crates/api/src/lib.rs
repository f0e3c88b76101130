//! meshward's gRPC APIs, generated from the protos in `proto/`.

#![forbid(unsafe_code)]

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
    }

    /// The proxy's own workload, as the registry knows it.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct OwnWorkload {
        /// `namespace/name` of its WorkloadEntry, if one matched.
        pub name: Option<String>,
        pub namespace: String,
        pub labels: BTreeMap<String, String>,
    }
}
