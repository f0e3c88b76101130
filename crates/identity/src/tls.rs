//! TLS between workloads: rustls configured for SPIFFE identities.
//!
//! The stock name check does not work with URI-only certificates, so:
//! - the server side verifies client chains against the trust bundle, then
//!   requires the client's SPIFFE ID to be of the mesh's trust domain or an
//!   alias, and hands that identity to policy evaluation;
//! - the client side verifies the server's chain, then does Istio's
//!   **secure naming** check: the server's SPIFFE ID must be one of the
//!   identities allowed to run the service it dialed;
//! - both refuse a peer whose identity or certificate serial is on the
//!   revocation list in force ([`Revocations`]) with the `certificate_revoked`
//!   alert.
//!
//! Certificates come from a watch channel read on every handshake, so a
//! rotated certificate is used by the next connection without touching
//! existing ones. Only ECDHE key exchange with AES-GCM, TLS 1.2 minimum,
//! TLS 1.3 preferred (the suites Istio lists). Sessions are never resumed:
//! a resumed session skips the peer's certificate, and with it the
//! revocation check, so every connection verifies its peer afresh
//! (connections are pooled, so few handshakes are full ones anyway).

use std::sync::Arc;

use rcgen::KeyPair;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};
use tokio::sync::watch;
use x509_parser::prelude::*;

use crate::bundle::TrustBundle;
use crate::ca::IssuedChain;
use crate::chain;
use crate::revocation::Revocations;
use crate::spiffe::SpiffeId;

/// aws-lc-rs with only ECDHE + AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_256_GCM_SHA384,
        TLS13_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a peer with a valid certificate is refused all the same. It travels
/// inside rustls' error (`CertificateError::Other`), so that those who
/// count refusals by reason read the reason, not the message's words.
#[derive(Clone, thiserror::Error)]
pub enum PeerRefused {
    #[error("peer {id} is of trust domain {domain}, not one this mesh trusts ({trusted})")]
    TrustDomain {
        id: String,
        domain: String,
        trusted: String,
    },
    #[error(
        "secure naming: the server is {id}, which is not allowed to run this service (allowed: {allowed})"
    )]
    SecureNaming { id: String, allowed: String },
}

/// As its message: rustls shows an `Other` certificate error with `Debug`.
impl std::fmt::Debug for PeerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl From<PeerRefused> for Error {
    fn from(refused: PeerRefused) -> Error {
        Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(refused),
        )))
    }
}

/// The trust domains a peer may belong to: the mesh's and its aliases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomains(pub Vec<String>);

impl TrustDomains {
    fn check(&self, id: &SpiffeId) -> Result<(), Error> {
        if self.0.iter().any(|td| td == id.trust_domain()) {
            Ok(())
        } else {
            Err(PeerRefused::TrustDomain {
                id: id.to_string(),
                domain: id.trust_domain().to_owned(),
                trusted: self.0.join(", "),
            }
            .into())
        }
    }
}

fn root_store(bundle: &TrustBundle) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for root in bundle.roots() {
        roots.add(root.clone())?;
    }
    Ok(Arc::new(roots))
}

/// The SPIFFE ID of a peer's leaf certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    let (_, x509) = X509Certificate::from_der(cert)
        .map_err(|e| Error::General(format!("unparsable peer certificate: {e}")))?;
    chain::spiffe_id(&x509).map_err(|e| Error::General(e.to_string()))
}

/// A revoked peer is refused with the `certificate_revoked` alert; who and
/// why goes to the debug log (rustls' error carries no text; the proxy
/// counts refusals by reason, and a revoked peer retrying must not flood
/// the log).
fn check_revoked(
    revocations: &Revocations,
    end_entity: &CertificateDer<'_>,
    side: &str,
) -> Result<(), Error> {
    revocations
        .current()
        .check_certificate(end_entity)
        .map_err(|revoked| {
            tracing::debug!(%revoked, "TLS handshake refused: the {side} is revoked");
            Error::InvalidCertificate(rustls::CertificateError::Revoked)
        })
}

/// Server side: verifies client certificates of the mesh.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domains: TrustDomains,
    revocations: Revocations,
}

impl SpiffeClientVerifier {
    /// `required`: STRICT (a client certificate is mandatory) or PERMISSIVE
    /// (optional, but verified when presented). Nothing is revoked.
    pub fn new(
        bundle: &TrustBundle,
        trust_domains: TrustDomains,
        required: bool,
    ) -> Result<Arc<Self>, Error> {
        Self::with_revocations(bundle, trust_domains, required, Revocations::new())
    }

    /// As [`SpiffeClientVerifier::new`], refusing clients `revocations` names
    /// (read at every handshake).
    pub fn with_revocations(
        bundle: &TrustBundle,
        trust_domains: TrustDomains,
        required: bool,
        revocations: Revocations,
    ) -> Result<Arc<Self>, Error> {
        let builder = WebPkiClientVerifier::builder_with_provider(root_store(bundle)?, provider());
        let builder = if required {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        let inner = builder.build().map_err(|e| Error::General(e.to_string()))?;
        Ok(Arc::new(SpiffeClientVerifier {
            inner,
            trust_domains,
            revocations,
        }))
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.trust_domains.check(&spiffe_id_of(end_entity)?)?;
        check_revoked(&self.revocations, end_entity, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server's chain must verify, and its SPIFFE ID must be
/// one of the identities allowed to run the target service.
#[derive(Debug)]
pub struct SecureNamingVerifier {
    roots: Arc<RootCertStore>,
    trust_domains: TrustDomains,
    allowed: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
    revocations: Revocations,
}

impl SecureNamingVerifier {
    /// Nothing is revoked.
    pub fn new(
        bundle: &TrustBundle,
        trust_domains: TrustDomains,
        allowed: Vec<SpiffeId>,
    ) -> Result<Arc<Self>, Error> {
        Self::with_revocations(bundle, trust_domains, allowed, Revocations::new())
    }

    /// As [`SecureNamingVerifier::new`], refusing servers `revocations` names
    /// (read at every handshake).
    pub fn with_revocations(
        bundle: &TrustBundle,
        trust_domains: TrustDomains,
        allowed: Vec<SpiffeId>,
        revocations: Revocations,
    ) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(SecureNamingVerifier {
            roots: root_store(bundle)?,
            trust_domains,
            allowed,
            algorithms: provider().signature_verification_algorithms,
            revocations,
        }))
    }
}

impl ServerCertVerifier for SecureNamingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = spiffe_id_of(end_entity)?;
        self.trust_domains.check(&id)?;
        // An allowed identity may appear under any trust domain of the mesh
        // (its own or an alias), as Istio expands secure-naming SANs.
        let allowed = self.allowed.iter().any(|a| {
            a == &id
                || (a.path() == id.path()
                    && self.trust_domains.0.iter().any(|td| td == a.trust_domain()))
        });
        if !allowed {
            let allowed: Vec<String> = self.allowed.iter().map(ToString::to_string).collect();
            return Err(PeerRefused::SecureNaming {
                id: id.to_string(),
                allowed: allowed.join(", "),
            }
            .into());
        }
        check_revoked(&self.revocations, end_entity, "server")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A workload certificate and its key, ready for rustls. The chain sent to
/// peers is the leaf and its intermediates (the root stays in the bundle).
pub fn certified_key(key: &KeyPair, chain: &IssuedChain) -> Result<Arc<CertifiedKey>, Error> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider().key_provider.load_private_key(der)?;
    let mut certs = chain.certificates.clone();
    if certs.len() > 1 {
        certs.pop();
    }
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

/// The current workload certificate, read on every handshake.
#[derive(Debug, Clone)]
pub struct WatchedCert(pub watch::Receiver<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for WatchedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().clone()
    }
}

impl ResolvesClientCert for WatchedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().clone()
    }

    fn has_certs(&self) -> bool {
        self.0.borrow().is_some()
    }
}

/// A server config for a workload port: its certificate from `cert`, client
/// certificates verified by `clients`.
pub fn server_config(
    cert: WatchedCert,
    clients: Arc<SpiffeClientVerifier>,
) -> Result<rustls::ServerConfig, Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(Arc::new(cert));
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config for calling one service: its certificate from `cert`,
/// the server checked by `server`.
pub fn client_config(
    cert: WatchedCert,
    server: Arc<SecureNamingVerifier>,
) -> Result<rustls::ClientConfig, Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(server)
        .with_client_cert_resolver(Arc::new(cert));
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use meshward_api::resources::{Revocation, RevocationKind};

    use super::*;
    use crate::revocation::{RevocationList, certificate_facts};

    #[test]
    fn both_verifiers_refuse_a_revoked_peer_from_the_next_handshake_on() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::CertificateAuthority::load_or_create(
            &crate::CaFiles::new(dir.path()),
            "cluster.local",
        )
        .unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/web/sa/web").unwrap();
        let (_key, csr) = crate::ca::new_key_and_csr(&id).unwrap();
        let chain = ca.sign_csr(&csr, &id, None).unwrap();
        let leaf = chain.leaf();
        let intermediates = &chain.certificates[1..chain.certificates.len() - 1];
        let domains = TrustDomains(vec!["cluster.local".into()]);
        let revocations = Revocations::new();
        let clients = SpiffeClientVerifier::with_revocations(
            ca.bundle(),
            domains.clone(),
            true,
            revocations.clone(),
        )
        .unwrap();
        let servers = SecureNamingVerifier::with_revocations(
            ca.bundle(),
            domains,
            vec![id.clone()],
            revocations.clone(),
        )
        .unwrap();
        let name = ServerName::try_from("web.web").unwrap();
        let now = UnixTime::now();
        let client = || clients.verify_client_cert(leaf, intermediates, now);
        let server = || servers.verify_server_cert(leaf, intermediates, &name, &[], now);
        assert!(client().is_ok());
        assert!(server().is_ok());

        let (_, serial) = certificate_facts(leaf).unwrap();
        for (kind, value) in [
            (RevocationKind::Serial, serial),
            (RevocationKind::Identity, id.to_string()),
        ] {
            revocations.replace(
                RevocationList::new(&[Revocation {
                    kind,
                    value,
                    reason: String::new(),
                    revoked_at: "t".into(),
                }])
                .unwrap(),
            );
            let revoked = Error::InvalidCertificate(rustls::CertificateError::Revoked);
            assert_eq!(client().unwrap_err(), revoked, "{kind:?}");
            assert_eq!(server().unwrap_err(), revoked, "{kind:?}");
        }
        revocations.replace(RevocationList::default());
        assert!(client().is_ok(), "lifted");
    }
}
