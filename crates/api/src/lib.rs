//! meshward's gRPC APIs, generated from the protos in `proto/`.

#![forbid(unsafe_code)]

/// Istio's certificate service, `istio.v1.auth.IstioCertificateService`.
pub mod istio_ca {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("istio.v1.auth");
}
