//! The inbound decision for one connection or request: effective mTLS mode
//! for the port, then request authentication, then authorization — the same
//! steps, in the same order, for the proxy and for `meshward check`.

use serde::Serialize;

use crate::api::MtlsMode;
use crate::authn::{AuthnOutcome, HeaderEdits, JwtPrincipal};
use crate::authz::{Attributes, AuthzDecision, CustomCheck, CustomVerdict, Verdict};
use crate::request::{Connection, HttpRequest};
use crate::resolve::WorkloadPolicy;

/// Which step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    PeerAuthentication,
    /// The request itself is malformed (Envoy rejects it before any filter).
    Request,
    RequestAuthentication,
    Authorization,
}

/// The outcome of the inbound pipeline.
#[derive(Debug, Clone)]
pub struct InboundDecision {
    pub verdict: Verdict,
    /// 200 when allowed; 401/403 (or a CUSTOM provider's status) when denied.
    pub status: u16,
    pub stage: Stage,
    pub mtls_mode: MtlsMode,
    /// Why the mTLS or JWT step refused; authorization explains itself
    /// through [`InboundDecision::reason`].
    pub refusal: Option<String>,
    /// Present when authorization ran.
    pub authz: Option<AuthzDecision>,
    pub principal: Option<JwtPrincipal>,
    /// For a 401: the `www-authenticate` value.
    pub www_authenticate: Option<String>,
    /// For an allowed, JWT-authenticated request: the header changes to make
    /// before forwarding (token removal, claim and payload headers).
    pub header_edits: Option<HeaderEdits>,
}

impl InboundDecision {
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    fn denied(stage: Stage, status: u16, mode: MtlsMode, reason: String) -> InboundDecision {
        InboundDecision {
            verdict: Verdict::Deny,
            status,
            stage,
            mtls_mode: mode,
            refusal: Some(reason),
            authz: None,
            principal: None,
            www_authenticate: None,
            header_edits: None,
        }
    }

    /// One line for humans on why: the refusal of the mTLS or JWT step, or
    /// the authorizer's explanation, rebuilt from the same request.
    pub fn reason(
        &self,
        policy: &WorkloadPolicy,
        connection: &Connection,
        http: Option<&HttpRequest>,
    ) -> String {
        if let Some(refusal) = &self.refusal {
            return refusal.clone();
        }
        match &self.authz {
            Some(authz) => {
                let attrs = Attributes::new(
                    connection,
                    http,
                    self.principal.as_ref(),
                    policy.normalization,
                );
                policy.authz.explain(&attrs, authz)
            }
            None => String::new(),
        }
    }

    /// The headers the application receives for `request` if allowed.
    pub fn upstream_headers(&self, request: &HttpRequest) -> Option<Vec<(String, String)>> {
        if !self.allowed() {
            return None;
        }
        let mut upstream = request.clone();
        if let Some(edits) = &self.header_edits {
            edits.apply(&mut upstream);
        }
        Some(upstream.headers)
    }
}

impl WorkloadPolicy {
    /// The mTLS step alone: whether this connection may be accepted on its port.
    pub fn admit_connection(&self, connection: &Connection) -> Result<MtlsMode, String> {
        let port = connection.destination_port;
        let mode = self.mtls.mode_for_port(port);
        match (mode, connection.source_principal.is_some()) {
            (MtlsMode::Strict, false) => Err(format!(
                "plaintext connection refused: port {port} requires mutual TLS (STRICT from {})",
                self.mtls.source_for_port(port)
            )),
            (MtlsMode::Disable, true) => Err(format!(
                "mutual TLS connection refused: port {port} accepts plaintext only (DISABLE from {})",
                self.mtls.source_for_port(port)
            )),
            _ => Ok(mode),
        }
    }

    /// Runs the whole inbound pipeline. `ext_authz` answers a CUSTOM check when one is needed.
    pub fn check(
        &self,
        connection: &Connection,
        http: Option<&HttpRequest>,
        ext_authz: impl FnOnce(&CustomCheck<'_>) -> CustomVerdict,
    ) -> InboundDecision {
        let authenticated = match self.authenticate(connection, http) {
            Ok(a) => a,
            Err(denied) => return *denied,
        };
        let custom = {
            let attrs = authenticated.attributes(self, connection, http);
            self.authz
                .custom_check(&attrs)
                .map(|check| ext_authz(&check))
        };
        authenticated.authorize(self, connection, http, custom)
    }

    /// The steps before authorization: peer authentication, request sanity
    /// and request authentication. A refusal is the final decision. Callers
    /// that consult a CUSTOM provider asynchronously (the proxy) ask
    /// `authz.custom_check` on [`Authenticated::attributes`] in between, then
    /// call [`Authenticated::authorize`]; [`WorkloadPolicy::check`] does the
    /// same synchronously.
    pub fn authenticate(
        &self,
        connection: &Connection,
        http: Option<&HttpRequest>,
    ) -> Result<Authenticated, Box<InboundDecision>> {
        let mode = self.admit(connection, http)?;
        let (principal, edits) = match http.map(|h| self.authn.authenticate(h)) {
            None | Some(AuthnOutcome::NoToken) => (None, None),
            Some(AuthnOutcome::Authenticated { principal, headers }) => {
                (Some(*principal), Some(headers))
            }
            Some(AuthnOutcome::Failed(failure)) => {
                let mut d = InboundDecision::denied(
                    Stage::RequestAuthentication,
                    failure.status,
                    mode,
                    format!("request authentication failed: {}", failure.message),
                );
                if let Some(h) = http {
                    let scheme = if connection.source_principal.is_some() {
                        "https"
                    } else {
                        "http"
                    };
                    d.www_authenticate = Some(failure.www_authenticate(h, scheme));
                }
                return Err(Box::new(d));
            }
        };
        Ok(Authenticated {
            mode,
            principal,
            edits,
        })
    }
}

impl WorkloadPolicy {
    /// Peer authentication, then what Envoy refuses before any filter.
    fn admit(
        &self,
        connection: &Connection,
        http: Option<&HttpRequest>,
    ) -> Result<MtlsMode, Box<InboundDecision>> {
        let mode = match self.admit_connection(connection) {
            Ok(mode) => mode,
            Err(reason) => {
                return Err(Box::new(InboundDecision::denied(
                    Stage::PeerAuthentication,
                    403,
                    self.mtls.mode_for_port(connection.destination_port),
                    reason,
                )));
            }
        };
        if let Some(h) = http
            && let Err((status, reason)) = check_request(h)
        {
            return Err(Box::new(InboundDecision::denied(
                Stage::Request,
                status,
                mode,
                reason,
            )));
        }
        Ok(mode)
    }

    /// The steps before authorization for a request whose token was
    /// verified earlier, with `principal` its outcome (`None`: no token).
    /// `meshward replay` decides logged requests again this way: tokens are
    /// never logged, so request authentication cannot run twice, and the
    /// caller checks first that these rules would take the token
    /// ([`crate::authn::Authenticator::accepts`]). Peer authentication and
    /// the request checks run as in [`WorkloadPolicy::authenticate`].
    pub fn authenticated_as(
        &self,
        connection: &Connection,
        http: Option<&HttpRequest>,
        principal: Option<JwtPrincipal>,
    ) -> Result<Authenticated, Box<InboundDecision>> {
        let mode = self.admit(connection, http)?;
        Ok(Authenticated {
            mode,
            principal: principal.filter(|_| http.is_some()),
            edits: None,
        })
    }
}

/// A connection or request that passed the steps before authorization.
#[derive(Debug, Clone)]
pub struct Authenticated {
    mode: MtlsMode,
    principal: Option<JwtPrincipal>,
    edits: Option<HeaderEdits>,
}

impl Authenticated {
    /// What authorization matches on, for asking `authz.custom_check`.
    pub fn attributes<'a>(
        &'a self,
        policy: &WorkloadPolicy,
        connection: &'a Connection,
        http: Option<&'a HttpRequest>,
    ) -> Attributes<'a> {
        Attributes::new(
            connection,
            http,
            self.principal.as_ref(),
            policy.normalization,
        )
    }

    /// Authorizes, given the CUSTOM provider's answer if one was asked.
    pub fn authorize(
        self,
        policy: &WorkloadPolicy,
        connection: &Connection,
        http: Option<&HttpRequest>,
        custom: Option<CustomVerdict>,
    ) -> InboundDecision {
        let authz = {
            let attrs = self.attributes(policy, connection, http);
            policy.authz.decide(&attrs, custom)
        };
        // Output headers a client sent itself are removed whether or not a
        // token verified; a verified token's values are then set.
        let mut header_edits = HeaderEdits {
            remove: policy.authn.output_headers().to_vec(),
            set: Vec::new(),
        };
        if let Some(edits) = self.edits {
            header_edits.remove.extend(edits.remove);
            header_edits.set.extend(edits.set);
        }
        let header_edits =
            (authz.allowed() && http.is_some() && !header_edits.is_empty()).then_some(header_edits);
        InboundDecision {
            verdict: authz.verdict,
            status: if authz.allowed() { 200 } else { authz.status },
            stage: Stage::Authorization,
            mtls_mode: self.mode,
            refusal: None,
            authz: Some(authz),
            principal: self.principal,
            www_authenticate: None,
            header_edits,
        }
    }
}

/// What Envoy refuses before any filter runs: a path that is not in origin
/// form (404, as Envoy's `absolute_path_rejected`; `OPTIONS *` excepted), and
/// a NUL byte, raw or percent-encoded, in the path (400), which no
/// normalization can make safe.
fn check_request(request: &HttpRequest) -> Result<(), (u16, String)> {
    let path = crate::authz::normalize::strip_query(&request.path);
    let asterisk = request.method == "OPTIONS" && path == "*";
    if !path.starts_with('/') && !asterisk {
        return Err((
            404,
            "bad request: the path is not in origin form (it must start with /)".to_owned(),
        ));
    }
    let bytes = path.as_bytes();
    let encoded_nul = bytes
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0');
    if encoded_nul || path.contains('\0') {
        return Err((
            400,
            "bad request: the path contains a NUL character (%00)".to_owned(),
        ));
    }
    Ok(())
}
