//! Istio's certificate service, `istio.v1.auth.IstioCertificateService`,
//! served over TLS with the CA's own certificate.
//!
//! The caller is authenticated first, by whichever [`CallerAuthenticator`]
//! accepts it (a bootstrap token, or a valid workload certificate presented
//! over mutual TLS for renewal); the CA then signs the CSR for that identity
//! and nothing else.

use std::sync::Arc;
use std::time::Duration;

use meshward_api::istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshward_api::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::bundle::TrustBundle;
use crate::ca::{CaError, CertificateAuthority, IssuedChain};
use crate::chain;
use crate::limits::Limits;
pub use crate::port::{DRAIN_TIME, ServeError, describe_listener, serve_routes};
use crate::spiffe::SpiffeId;
use crate::tls::{self, WatchedCert};
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
    counters: Arc<CaCounters>,
    /// Identities only the server itself issues (its own, the admin's):
    /// never signed for a caller, whatever it holds.
    reserved: Vec<SpiffeId>,
}

/// Certificate requests signed and refused, for the server's metrics.
#[derive(Debug, Default)]
pub struct CaCounters {
    pub signed: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticators: Vec<Box<dyn CallerAuthenticator>>,
    ) -> CaService {
        CaService {
            ca,
            authenticators,
            counters: Arc::default(),
            reserved: Vec::new(),
        }
    }

    /// Refuses to sign for `reserved` identities.
    pub fn with_reserved(mut self, reserved: Vec<SpiffeId>) -> CaService {
        self.reserved = reserved;
        self
    }

    /// The counters this service updates.
    pub fn counters(&self) -> Arc<CaCounters> {
        self.counters.clone()
    }

    /// Each authenticator is tried in turn and the first that accepts the
    /// caller decides. If none does, every failure is reported.
    fn authenticate(&self, caller: &Caller<'_>) -> Result<(SpiffeId, &'static str), Status> {
        let mut failures = Vec::new();
        for authenticator in &self.authenticators {
            match authenticator.authenticate(caller) {
                Ok(Some(id)) => return Ok((id, authenticator.name())),
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
        let peer = request.remote_addr();
        let (identity, authenticated_by) = self
            .authenticate(&Caller {
                bearer: bearer.as_deref(),
                peer_certs: peer_certs.as_deref(),
            })
            .inspect_err(|status| {
                self.counters
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    ?peer,
                    reason = status.message(),
                    "certificate request refused: unauthenticated"
                )
            })?;
        if self.reserved.contains(&identity) {
            self.counters
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(?peer, %identity, "certificate request refused: a reserved identity");
            return Err(Status::permission_denied(format!(
                "{identity} is reserved to the control plane; it is never issued on request"
            )));
        }
        let request = request.into_inner();
        let ttl = (request.validity_duration > 0)
            .then(|| Duration::from_secs(request.validity_duration as u64));
        let chain = self
            .ca
            .sign_csr(&request.csr, &identity, ttl)
            .map_err(|e| {
                self.counters.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(?peer, %identity, authenticated_by, error = %e, "certificate request refused");
                status_for(e)
            })?;
        self.counters
            .signed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(?peer, %identity, authenticated_by, "signed a workload certificate");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain.to_pem_list(),
        }))
    }
}

/// The control plane's own identity: `spiffe://TD/ns/ROOT_NS/sa/meshward`.
pub fn server_spiffe_id(
    ca: &CertificateAuthority,
    root_namespace: &str,
) -> Result<SpiffeId, CaError> {
    SpiffeId::istio(ca.trust_domain(), root_namespace, "meshward")
        .map_err(|e| CaError::Sign(e.to_string()))
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
    let id = server_spiffe_id(ca, root_namespace)?;
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

/// The server's own certificate, kept fresh: issued now and again at half
/// its lifetime, published for the TLS acceptor to read on every handshake.
pub struct ServerCertificate {
    pub cert: WatchedCert,
    /// Ends the renewal task when dropped.
    _renewal: tokio::task::JoinHandle<()>,
}

impl ServerCertificate {
    pub fn start(
        ca: Arc<CertificateAuthority>,
        root_namespace: String,
        extra_sans: Vec<String>,
        ttl: Duration,
    ) -> Result<ServerCertificate, CaError> {
        let issue = move || -> Result<Arc<CertifiedKey>, CaError> {
            let (key, chain) = server_identity(&ca, &root_namespace, &extra_sans, ttl)?;
            tls::certified_key(&key, &chain).map_err(|e| CaError::Sign(e.to_string()))
        };
        let (tx, rx) = watch::channel(Some(issue()?));
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 2).await;
                match issue() {
                    Ok(cert) => {
                        tx.send_replace(Some(cert));
                        tracing::info!("renewed the server's own certificate");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the server's own certificate failed; retrying in a minute")
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(ServerCertificate {
            cert: WatchedCert(rx),
            _renewal: renewal,
        })
    }
}

impl Drop for ServerCertificate {
    fn drop(&mut self) {
        self._renewal.abort();
    }
}

/// Serves the certificate service alone on `listener`, within the default
/// [`Limits`], until `shutdown` completes, then drains for at most
/// [`DRAIN_TIME`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    ca: Arc<CertificateAuthority>,
    server_cert: WatchedCert,
    authenticators: Vec<Box<dyn CallerAuthenticator>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let routes = tonic::service::Routes::new(
        IstioCertificateServiceServer::new(CaService::new(ca.clone(), authenticators))
            .max_decoding_message_size(crate::limits::CREATE_CERTIFICATE_MAX_MESSAGE),
    );
    serve_routes(
        listener,
        &ca,
        server_cert,
        routes,
        Limits::default(),
        shutdown,
    )
    .await
}
