//! meshward's policy engine: Istio's `security.istio.io` policies, loaded,
//! validated, resolved per workload and decided with Istio's semantics.
//!
//! The proxy enforces with it, the control plane validates with it and the
//! CLI answers "would this be allowed, and why?" with it. It does no network
//! I/O; JWKS fetching goes through [`authn::JwksFetcher`], supplied by the
//! embedder.
//!
//! Flow: [`load`] (text → typed [`api`] objects, [`validate`]d) →
//! [`resolve::PolicySet`] (which policies apply to a workload) →
//! [`resolve::WorkloadPolicy`] (compiled: mTLS modes, [`authn::Authenticator`],
//! [`authz::Authorizer`]) → [`pipeline`] (one decision per request).

#![forbid(unsafe_code)]

pub mod api;
pub mod authn;
pub mod authz;
pub mod check;
pub mod diagnostic;
pub mod duration;
pub mod load;
pub mod pipeline;
pub mod request;
pub mod resolve;
pub mod validate;

pub use diagnostic::{Diagnostic, Location, Severity};
pub use pipeline::{InboundDecision, Stage};
pub use request::{Connection, HttpRequest};
pub use resolve::{PolicySet, Workload, WorkloadPolicy};
