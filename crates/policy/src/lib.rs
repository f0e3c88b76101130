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
//!
//! ```
//! use meshward_policy::{Connection, HttpRequest, PolicySet, Workload, api::MeshConfig, load};
//!
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: deny-legacy, namespace: foo}
//! spec:
//!   action: DENY
//!   rules:
//!   - from:
//!     - source: {namespaces: ["legacy"]}
//! "#;
//! let loaded = load::load_str("policies.yaml", yaml);
//! assert!(!loaded.has_errors());
//! let set = PolicySet::new(MeshConfig::default(), loaded.into_policies());
//! let workload = set.for_workload(&Workload { namespace: "foo".into(), ..Workload::default() });
//!
//! let connection = Connection {
//!     source_principal: Some("spiffe://cluster.local/ns/legacy/sa/default".into()),
//!     destination_port: 8080,
//!     ..Connection::default()
//! };
//! let request = HttpRequest { method: "GET".into(), path: "/".into(), ..HttpRequest::default() };
//! let decision = workload.check(&connection, Some(&request), |_| unreachable!("no CUSTOM policy"));
//! assert!(!decision.allowed());
//! assert_eq!(
//!     decision.reason(&workload, &connection, Some(&request)),
//!     r#"denied by foo/deny-legacy rule 0: source.namespaces matched "legacy""#
//! );
//! ```

#![forbid(unsafe_code)]

pub mod api;
pub mod authn;
pub mod authz;
pub mod check;
pub mod diagnostic;
pub mod duration;
pub mod ingress;
pub mod learn;
pub mod load;
pub mod pipeline;
pub mod request;
pub mod resolve;
pub mod validate;

pub use diagnostic::{Diagnostic, Location, Severity};
pub use pipeline::{Authenticated, InboundDecision, Stage};
pub use request::{Connection, HttpRequest};
pub use resolve::{PolicySet, Workload, WorkloadPolicy};
