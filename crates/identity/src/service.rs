//! Istio's certificate service, `istio.v1.auth.IstioCertificateService`,
//! served over TLS with the CA's own certificate.
//!
//! The caller is authenticated first, by whichever [`CallerAuthenticator`]
//! accepts it (a bootstrap token, or a valid workload certificate presented
//! over mutual TLS for renewal). Then the [`Revocations`] in force are
//! checked (the identity; the token's id or the certificate's serial), the
//! CA signs the CSR for that identity and nothing else, and a single-use
//! token is spent in the [`TokenLedger`] before the certificate is sent.

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
use crate::revocation::{Revocations, Revoked};
use crate::spiffe::SpiffeId;
use crate::tls::{self, WatchedCert};
use crate::token::{TokenAuthority, Uses};

/// What the service knows about a caller before authenticating it.
pub struct Caller<'a> {
    /// The `authorization: Bearer <token>` value, without the scheme.
    pub bearer: Option<&'a str>,
    /// The client certificate chain from the TLS handshake, leaf first.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
}

/// Who a caller is, and with what it proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub identity: SpiffeId,
    pub credential: Credential,
}

/// The credential a caller authenticated with, as revocation names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A bootstrap token: its id (tokens made before ids have none), whether
    /// it may be used once only, and its expiry (Unix seconds).
    Token {
        id: Option<String>,
        uses: Uses,
        expires: u64,
    },
    /// A workload certificate: its serial ([`crate::revocation::serial_hex`]).
    Certificate { serial: String },
    /// Another kind (an embedder's): revocable by identity only.
    Other,
}

/// Decides who a caller is. Implementations must not log credentials.
pub trait CallerAuthenticator: Send + Sync + 'static {
    /// A short name for error messages ("bootstrap token", "client certificate").
    fn name(&self) -> &'static str;
    /// `Ok(None)`: this authenticator has nothing to say (no credential of
    /// its kind); `Err`: a credential was presented and is not acceptable.
    fn authenticate(&self, caller: &Caller<'_>) -> Result<Option<Authenticated>, String>;
}

/// `authorization: Bearer <meshward bootstrap token>`.
pub struct BootstrapTokens(pub TokenAuthority);

impl CallerAuthenticator for BootstrapTokens {
    fn name(&self) -> &'static str {
        "bootstrap token"
    }

    fn authenticate(&self, caller: &Caller<'_>) -> Result<Option<Authenticated>, String> {
        let Some(token) = caller.bearer else {
            return Ok(None);
        };
        let token = self.0.verify_claims(token).map_err(|e| e.to_string())?;
        Ok(Some(Authenticated {
            identity: token.identity,
            credential: Credential::Token {
                id: token.id,
                uses: token.uses,
                expires: token.expires,
            },
        }))
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

    fn authenticate(&self, caller: &Caller<'_>) -> Result<Option<Authenticated>, String> {
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
        Ok(Some(Authenticated {
            identity: verified.id,
            credential: Credential::Certificate {
                serial: verified.serial,
            },
        }))
    }
}

/// Where single-use bootstrap tokens are recorded as spent: the control
/// plane's store, so a restart does not make one usable again.
pub trait TokenLedger: Send + Sync + 'static {
    /// Records token `id` as used, atomically: of concurrent calls for one
    /// id, exactly one returns `Ok(true)`; every later one `Ok(false)`.
    /// `expires` (Unix seconds) is when the record may be forgotten (the
    /// token is refused as expired after it anyway).
    fn spend(&self, id: &str, expires: u64) -> Result<bool, String>;
}

/// The gRPC service.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    authenticators: Vec<Box<dyn CallerAuthenticator>>,
    counters: Arc<CaCounters>,
    /// Identities only the server itself issues (its own, the admin's):
    /// never signed for a caller, whatever it holds.
    reserved: Vec<SpiffeId>,
    revocations: Revocations,
    /// Without one, single-use tokens are refused: they could not be
    /// honoured.
    ledger: Option<Arc<dyn TokenLedger>>,
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
            revocations: Revocations::new(),
            ledger: None,
        }
    }

    /// Refuses identities, certificate serials and token ids `revocations`
    /// names (read at every request).
    pub fn with_revocations(mut self, revocations: Revocations) -> CaService {
        self.revocations = revocations;
        self
    }

    /// Honours single-use tokens, recording them in `ledger`.
    pub fn with_token_ledger(mut self, ledger: Arc<dyn TokenLedger>) -> CaService {
        self.ledger = Some(ledger);
        self
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
    fn authenticate(&self, caller: &Caller<'_>) -> Result<(Authenticated, &'static str), Status> {
        let mut failures = Vec::new();
        for authenticator in &self.authenticators {
            match authenticator.authenticate(caller) {
                Ok(Some(authenticated)) => return Ok((authenticated, authenticator.name())),
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

/// The caller's identity and credential against the list in force.
fn check_revocations(revocations: &Revocations, caller: &Authenticated) -> Result<(), Revoked> {
    let list = revocations.current();
    list.check_identity(&caller.identity)?;
    match &caller.credential {
        Credential::Token { id: Some(id), .. } => list.check_token(id),
        Credential::Certificate { serial } => list.check_serial(serial),
        Credential::Token { id: None, .. } | Credential::Other => Ok(()),
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
        let (caller, authenticated_by) = self
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
        let identity = caller.identity.clone();
        let refuse = |status: Status| {
            self.counters
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(?peer, %identity, authenticated_by, reason = status.message(), "certificate request refused");
            status
        };
        if self.reserved.contains(&identity) {
            return Err(refuse(Status::permission_denied(format!(
                "{identity} is reserved to the control plane; it is never issued on request"
            ))));
        }
        if let Err(revoked) = check_revocations(&self.revocations, &caller) {
            return Err(refuse(Status::permission_denied(format!(
                "{revoked}; no certificate is issued for it"
            ))));
        }
        let spend = match &caller.credential {
            Credential::Token {
                id: Some(id),
                uses: Uses::Once,
                expires,
            } => match &self.ledger {
                Some(ledger) => Some((ledger.clone(), id.clone(), *expires)),
                None => {
                    return Err(refuse(Status::unauthenticated(
                        "request authenticate failure: single-use tokens are not accepted by this server (it keeps no record of used tokens)",
                    )));
                }
            },
            _ => None,
        };
        let request = request.into_inner();
        let ttl = (request.validity_duration > 0)
            .then(|| Duration::from_secs(request.validity_duration as u64));
        let chain = self
            .ca
            .sign_csr(&request.csr, &identity, ttl)
            .map_err(|e| refuse(status_for(e)))?;
        // Spent only now, so a request refused above leaves the token
        // usable; of two racing requests, the ledger lets one through.
        if let Some((ledger, id, expires)) = spend {
            let spent = tokio::task::spawn_blocking(move || ledger.spend(&id, expires)).await;
            match spent {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    return Err(refuse(Status::unauthenticated(
                        "request authenticate failure: bootstrap token: this single-use token was already used",
                    )));
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "recording a single-use token failed");
                    return Err(refuse(Status::unavailable(
                        "the single-use token could not be recorded as used; try again",
                    )));
                }
                Err(e) => return Err(refuse(Status::internal(e.to_string()))),
            }
        }
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
        Revocations::new(),
        routes,
        Limits::default(),
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use meshward_api::resources::{Revocation, RevocationKind};
    use tonic::Code;

    use super::*;
    use crate::CaFiles;
    use crate::revocation::RevocationList;

    /// Spent ids in memory; the control plane's store is the real one.
    #[derive(Default)]
    struct MemoryLedger(Mutex<HashSet<String>>);

    impl TokenLedger for MemoryLedger {
        fn spend(&self, id: &str, _expires: u64) -> Result<bool, String> {
            Ok(self
                .0
                .lock()
                .map_err(|e| e.to_string())?
                .insert(id.to_owned()))
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        tokens: TokenAuthority,
        service: Arc<CaService>,
        revocations: Revocations,
        revoked: Mutex<Vec<Revocation>>,
        id: SpiffeId,
    }

    fn fixture(ledger: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(
            CertificateAuthority::load_or_create(&CaFiles::new(dir.path()), "cluster.local")
                .unwrap(),
        );
        let tokens = || TokenAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let revocations = Revocations::new();
        let mut service = CaService::new(ca, vec![Box::new(BootstrapTokens(tokens()))])
            .with_revocations(revocations.clone());
        if ledger {
            service = service.with_token_ledger(Arc::new(MemoryLedger::default()));
        }
        Fixture {
            tokens: tokens(),
            _dir: dir,
            service: Arc::new(service),
            revocations,
            revoked: Mutex::default(),
            id: SpiffeId::parse("spiffe://cluster.local/ns/web/sa/web").unwrap(),
        }
    }

    impl Fixture {
        async fn ask(&self, token: &str) -> Result<IstioCertificateResponse, Status> {
            let (_key, csr) = crate::ca::new_key_and_csr(&self.id).unwrap();
            self.ask_with(token, csr).await
        }

        async fn ask_with(
            &self,
            token: &str,
            csr: String,
        ) -> Result<IstioCertificateResponse, Status> {
            let mut request = Request::new(IstioCertificateRequest {
                csr,
                validity_duration: 0,
                metadata: None,
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            self.service
                .create_certificate(request)
                .await
                .map(Response::into_inner)
        }

        /// Adds one entry to the list in force.
        fn revoke(&self, kind: RevocationKind, value: &str) {
            let mut entries = self.revoked.lock().unwrap();
            entries.push(Revocation {
                kind,
                value: value.into(),
                reason: "test".into(),
                revoked_at: "2026-01-01T00:00:00Z".into(),
            });
            self.revocations
                .replace(RevocationList::new(entries.iter()).unwrap());
        }
    }

    #[tokio::test]
    async fn revoked_identities_and_token_ids_get_nothing() {
        let f = fixture(false);
        let first = f
            .tokens
            .issue(&f.id, Duration::from_secs(600), Uses::Reusable)
            .unwrap();
        let second = f.tokens.create(&f.id, Duration::from_secs(600)).unwrap();
        f.ask(&first.token).await.unwrap();

        f.revoke(RevocationKind::Token, &first.id);
        let refused = f.ask(&first.token).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
        assert!(
            refused
                .message()
                .contains(&format!("token {} was revoked", first.id)),
            "{refused}"
        );
        // Another token for the same identity still works...
        f.ask(&second).await.unwrap();
        // ...until the identity itself is revoked.
        f.revoke(RevocationKind::Identity, &f.id.to_string());
        let refused = f.ask(&second).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
        assert!(
            refused
                .message()
                .contains("identity spiffe://cluster.local/ns/web/sa/web was revoked"),
            "{refused}"
        );
    }

    #[test]
    fn a_renewal_is_checked_by_identity_and_by_serial() {
        let list = RevocationList::new(&[Revocation {
            kind: RevocationKind::Serial,
            value: "0a:0b".into(),
            reason: String::new(),
            revoked_at: "t".into(),
        }])
        .unwrap();
        let revocations = Revocations::new();
        revocations.replace(list);
        let caller = |serial: &str| Authenticated {
            identity: SpiffeId::parse("spiffe://cluster.local/ns/web/sa/web").unwrap(),
            credential: Credential::Certificate {
                serial: serial.into(),
            },
        };
        assert!(check_revocations(&revocations, &caller("0a:0b")).is_err());
        assert!(check_revocations(&revocations, &caller("0a:0c")).is_ok());
    }

    #[tokio::test]
    async fn a_single_use_token_is_spent_once_even_by_racing_requests() {
        let f = Arc::new(fixture(true));
        let once = f
            .tokens
            .issue(&f.id, Duration::from_secs(600), Uses::Once)
            .unwrap();
        // A refused request (a CSR for someone else) does not spend it.
        let other = SpiffeId::parse("spiffe://cluster.local/ns/web/sa/admin").unwrap();
        let (_key, wrong_csr) = crate::ca::new_key_and_csr(&other).unwrap();
        let refused = f.ask_with(&once.token, wrong_csr).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");

        let racing: Vec<_> = (0..8)
            .map(|_| {
                let f = f.clone();
                let token = once.token.clone();
                tokio::spawn(async move { f.ask(&token).await })
            })
            .collect();
        let mut granted = 0;
        for request in racing {
            match request.await.unwrap() {
                Ok(_) => granted += 1,
                Err(refused) => {
                    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
                    assert!(refused.message().contains("already used"), "{refused}");
                }
            }
        }
        assert_eq!(granted, 1, "exactly one of eight racing uses succeeds");
    }

    #[tokio::test]
    async fn without_a_ledger_single_use_tokens_are_refused() {
        let f = fixture(false);
        let once = f
            .tokens
            .issue(&f.id, Duration::from_secs(600), Uses::Once)
            .unwrap();
        let refused = f.ask(&once.token).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
        assert!(refused.message().contains("single-use"), "{refused}");
    }
}
