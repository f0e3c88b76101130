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
