//! meshward's workload identities: SPIFFE IDs, the mesh CA that issues
//! X.509-SVIDs over Istio's CSR API, and the trust bundle workloads verify
//! peers with.
//!
//! ```
//! use meshward_identity::SpiffeId;
//!
//! let id: SpiffeId = "spiffe://cluster.local/ns/foo/sa/bar".parse().unwrap();
//! assert_eq!(id.istio_parts(), Some(("foo", "bar")));
//! assert!("spiffe://Cluster.Local/ns/foo".parse::<SpiffeId>().is_err());
//! ```

#![forbid(unsafe_code)]

pub mod agent;
pub mod bundle;
pub mod ca;
pub mod chain;
pub mod error_text;
pub mod limits;
pub mod pem;
pub mod port;
pub mod revocation;
pub mod sealed;
pub mod service;
pub mod spiffe;
pub mod tls;
pub mod token;

pub use bundle::TrustBundle;
pub use ca::{CaError, CaFiles, CertificateAuthority, IssuedChain};
pub use error_text::error_chain;
pub use spiffe::SpiffeId;
