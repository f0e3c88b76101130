//! Istio's certificate service, `istio.v1.auth.IstioCertificateService`,
//! served over TLS with the CA's own certificate.
//!
//! The caller is authenticated first, by whichever [`CallerAuthenticator`]
//! accepts it (a bootstrap token, or a valid workload certificate presented
//! over mutual TLS for renewal); the CA then signs the CSR for that identity
//! and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshward_api::istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshward_api::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::bundle::TrustBundle;
use crate::ca::{CaError, CertificateAuthority, IssuedChain};
use crate::chain;
use crate::spiffe::SpiffeId;
use crate::token::TokenAuthority;

/// What the service knows about a caller before authenticating it.
pub struct Caller<'a> {
    /// The `authorization: Bearer <token>` value, without the scheme.
    pub bearer: Option<&'a str>,
    /// The client certificate chain from the TLS handshake, leaf first.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
}

/// Decides who a caller is. Implementations must not log credentials.
pub trait CallerAuthenticator: Send + Sync + 'static {
    /// A short name for error messages ("bootstrap token", "client certificate").
    fn name(&self) -> &'static str;
    /// `Ok(None)`: this authenticator has nothing to say (no credential of
    /// its kind); `Err`: a credential was presented and is not acceptable.
    fn authenticate(&self, caller: &Caller<'_>) -> Result<Option<SpiffeId>, String>;
}

/// `authorization: Bearer <meshward bootstrap token>`.
pub struct BootstrapTokens(pub TokenAuthority);

impl CallerAuthenticator for BootstrapTokens {
    fn name(&self) -> &'static str {
        "bootstrap token"
    }

    fn authenticate(&self, caller: &Caller<'_>) -> Result<Option<SpiffeId>, String> {
        match caller.bearer {
            None => Ok(None),
            Some(token) => self.0.verify(token).map(Some).map_err(|e| e.to_string()),
        }
    }
}

/// A workload certificate of this mesh, presented over mutual TLS: renewal.
pub struct ClientCertificates {
    pub bundle: TrustBundle,
    pub trust_domain: String,
}

impl CallerAuthenticator for ClientCertificates {
    fn name(&self) -> &'static str {
        "client certificate"
    }

    fn authenticate(&self, caller: &Caller<'_>) -> Result<Option<SpiffeId>, String> {
        let Some(chain) = caller.peer_certs.filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let verified = chain::verify(chain, &self.bundle, now).map_err(|e| e.to_string())?;
        if verified.id.trust_domain() != self.trust_domain {
            return Err(format!(
                "{} is not of trust domain {}",
                verified.id, self.trust_domain
            ));
        }
        Ok(Some(verified.id))
    }
}

/// The gRPC service.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    authenticators: Vec<Box<dyn CallerAuthenticator>>,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticators: Vec<Box<dyn CallerAuthenticator>>,
    ) -> CaService {
        CaService { ca, authenticators }
    }

    /// The first authenticator that recognises the caller decides; a
    /// presented credential that fails is reported, never skipped silently.
    fn authenticate(&self, caller: &Caller<'_>) -> Result<SpiffeId, Status> {
        let mut failures = Vec::new();
        for authenticator in &self.authenticators {
            match authenticator.authenticate(caller) {
                Ok(Some(id)) => return Ok(id),
                Ok(None) => {}
                Err(e) => failures.push(format!("{}: {e}", authenticator.name())),
            }
        }
        Err(Status::unauthenticated(if failures.is_empty() {
            "request authenticate failure: no credential (send authorization: Bearer <token> or a client certificate)".to_owned()
        } else {
            format!("request authenticate failure: {}", failures.join("; "))
        }))
    }
}

fn status_for(e: CaError) -> Status {
    match e {
        CaError::MalformedCsr(_)
        | CaError::IdentityMismatch { .. }
        | CaError::CaRequested
        | CaError::TtlTooLong { .. }
        | CaError::WrongTrustDomain { .. } => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::to_owned);
        let peer_certs: Option<Vec<CertificateDer<'static>>> = request.peer_certs().map(|certs| {
            certs
                .iter()
                .map(|c| CertificateDer::from(c.as_ref().to_vec()))
                .collect()
        });
        let identity = self.authenticate(&Caller {
            bearer: bearer.as_deref(),
            peer_certs: peer_certs.as_deref(),
        })?;
        let request = request.into_inner();
        let ttl = (request.validity_duration > 0)
            .then(|| Duration::from_secs(request.validity_duration as u64));
        let chain = self
            .ca
            .sign_csr(&request.csr, &identity, ttl)
            .map_err(status_for)?;
        tracing::info!(identity = %identity, "signed a workload certificate");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain.to_pem_list(),
        }))
    }
}

/// The control plane's own serving certificate: its SPIFFE ID plus the names
/// Istio agents dial (`istiod.<root-namespace>.svc`), `localhost`, 127.0.0.1
/// and any extra names. The key is made here and never leaves memory.
pub fn server_identity(
    ca: &CertificateAuthority,
    root_namespace: &str,
    extra_sans: &[String],
    ttl: Duration,
) -> Result<(KeyPair, IssuedChain), CaError> {
    let id = SpiffeId::istio(ca.trust_domain(), root_namespace, "meshward")
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let mut sans: Vec<SanType> = Vec::new();
    let names = [
        "localhost".to_owned(),
        format!("meshward.{root_namespace}.svc"),
        format!("istiod.{root_namespace}.svc"),
    ];
    for name in names.iter().chain(extra_sans) {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => {
                sans.push(SanType::DnsName(name.clone().try_into().map_err(
                    |e: rcgen::Error| CaError::Sign(format!("--san {name:?}: {e}")),
                )?))
            }
        }
    }
    sans.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let chain = ca.issue_for_key(&key, &id, &sans, ttl)?;
    Ok((key, chain))
}

/// How long in-flight requests may finish after shutdown is asked for.
/// Idle connections (a client that keeps its channel open) do not hold the
/// server up past it.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Serves the certificate service on `listener` until `shutdown` completes,
/// then drains for at most [`DRAIN_TIME`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    ca: Arc<CertificateAuthority>,
    server_key: &KeyPair,
    server_chain: &IssuedChain,
    authenticators: Vec<Box<dyn CallerAuthenticator>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            server_chain.to_pem(),
            server_key.serialize_pem(),
        ))
        // Client certificates are optional (a bootstrap token suffices) but,
        // when presented, must chain to the mesh's roots.
        .client_ca_root(Certificate::from_pem(ca.bundle().to_pem()))
        .client_auth_optional(true);
    let service = CaService::new(ca, authenticators);
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    let server = Server::builder()
        .tls_config(tls)?
        .add_service(IstioCertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(tokio_stream_from(listener), shutdown);
    let deadline = async {
        if stopped.await.is_ok() {
            tokio::time::sleep(DRAIN_TIME).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result,
        () = deadline => Ok(()),
    }
}

/// Accepted connections with Nagle's algorithm off: small gRPC frames must
/// not wait for the peer's delayed ACK (a 40 ms stall per request otherwise).
fn tokio_stream_from(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The address a server listens on, for messages.
pub fn describe_listener(addr: SocketAddr) -> String {
    format!("https://{addr} (istio.v1.auth.IstioCertificateService)")
}
