//! The workload's identity as the proxy uses it: the certificate it presents
//! (kept current by the identity agent), the roots it trusts, and the TLS
//! configurations made from them.

use std::sync::Arc;

use meshward_identity::bundle::TrustBundle;
use meshward_identity::revocation::{Revocations, serial_hex};
use meshward_identity::spiffe::SpiffeId;
use meshward_identity::tls::{
    self, SecureNamingVerifier, SpiffeClientVerifier, TrustDomains, WatchedCert,
};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Who this workload is, and with which certificate.
#[derive(Debug, Clone)]
pub struct WorkloadIdentity {
    pub id: SpiffeId,
    /// Holds `None` until the first certificate arrives.
    pub cert: WatchedCert,
    pub bundle: TrustBundle,
    /// The mesh's trust domain and its aliases: peers from these are accepted.
    pub trust_domains: TrustDomains,
    /// Peers refused at the handshake, and cut when revoked while connected.
    pub revocations: Revocations,
}

/// ALPN for HTTP/2 between proxies.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 between proxies.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// Offered by every meshward client beside the protocol it wants, as
/// Istio's sidecars offer `istio`: it tells a PERMISSIVE port the mesh's
/// mutual TLS from an application's own TLS, which passes through.
pub const ALPN_MESH: &[u8] = b"istio";

impl WorkloadIdentity {
    pub fn has_certificate(&self) -> bool {
        self.cert.0.borrow().is_some()
    }

    /// Inbound mutual TLS: a client certificate of the mesh is required
    /// whenever TLS is used (PERMISSIVE differs from STRICT only in also
    /// accepting plaintext, which never reaches TLS).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let clients = SpiffeClientVerifier::with_revocations(
            &self.bundle,
            self.trust_domains.clone(),
            true,
            self.revocations.clone(),
        )?;
        let mut config = tls::server_config(self.cert.clone(), clients)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec(), ALPN_MESH.to_vec()];
        Ok(Arc::new(config))
    }

    /// Outbound mutual TLS to a service run by one of `allowed`, offering
    /// `alpn` and the mesh marker.
    pub fn client_config(
        &self,
        allowed: Vec<SpiffeId>,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let server = SecureNamingVerifier::with_revocations(
            &self.bundle,
            self.trust_domains.clone(),
            allowed,
            self.revocations.clone(),
        )?;
        let mut config = tls::client_config(self.cert.clone(), server)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.alpn_protocols.push(ALPN_MESH.to_vec());
        Ok(Arc::new(config))
    }

    /// What `/config_dump` shows of the certificate: never the key.
    pub fn summary(&self) -> Option<CertificateSummary> {
        let current = self.cert.0.borrow().clone()?;
        let leaf = current.cert.first()?;
        let mut summary = CertificateSummary::of(leaf)?;
        summary.chain_length = current.cert.len();
        Some(summary)
    }
}

/// The facts about a certificate that operators ask for.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateSummary {
    pub spiffe_id: Option<String>,
    pub serial: String,
    pub issuer: String,
    pub not_before: String,
    pub not_after: String,
    /// Unix seconds, for metrics.
    #[serde(skip)]
    pub not_after_unix: i64,
    pub sha256: String,
    pub chain_length: usize,
}

impl CertificateSummary {
    pub fn of(der: &CertificateDer<'_>) -> Option<CertificateSummary> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let validity = cert.validity();
        Some(CertificateSummary {
            spiffe_id: tls::spiffe_id_of(der).ok().map(|id| id.to_string()),
            serial: cert.raw_serial_as_string(),
            issuer: cert.issuer().to_string(),
            not_before: validity.not_before.to_string(),
            not_after: validity.not_after.to_string(),
            not_after_unix: validity.not_after.timestamp(),
            sha256: fingerprint(der),
            chain_length: 1,
        })
    }
}

/// SHA-256 of a certificate, lower-case hex: the `Hash=` of XFCC.
pub fn fingerprint(der: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(der.as_ref()))
}

/// A verified peer: who it is and which certificate it showed.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The SPIFFE ID (`spiffe://td/ns/N/sa/S`).
    pub id: Arc<str>,
    pub cert_sha256: String,
    /// Its certificate's serial, as revocations name it.
    pub serial: Arc<str>,
}

impl Peer {
    /// The verified peer of a TLS session; `None` if it showed no certificate
    /// (which the verifiers only allow on no path that reaches here).
    pub fn of(session: &rustls::CommonState) -> Option<Peer> {
        let leaf = session.peer_certificates()?.first()?;
        let id = tls::spiffe_id_of(leaf).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
        Some(Peer {
            id: Arc::from(id.to_string()),
            cert_sha256: fingerprint(leaf),
            serial: Arc::from(serial_hex(cert.raw_serial())),
        })
    }
}

/// The verified SPIFFE ID of the server a pooled HTTP connection reached,
/// put in the extensions of every response it carries.
#[derive(Debug, Clone)]
pub struct ServerIdentity(pub Arc<str>);

impl ServerIdentity {
    /// The server of a TLS session, if it showed a SPIFFE certificate.
    pub fn of(session: &rustls::CommonState) -> Option<ServerIdentity> {
        let leaf = session.peer_certificates()?.first()?;
        let id = tls::spiffe_id_of(leaf).ok()?;
        Some(ServerIdentity(Arc::from(id.to_string())))
    }
}

/// Why a handshake failed, as a metric label.
pub fn handshake_failure(error: &std::io::Error) -> &'static str {
    use meshward_identity::tls::PeerRefused;
    use rustls::{CertificateError, Error};
    if error.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "protocol";
    };
    match tls {
        // The peer spoke something else: plaintext on a STRICT port.
        Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => "not_tls",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidCertificate(CertificateError::Revoked)
        | Error::AlertReceived(rustls::AlertDescription::CertificateRevoked) => "revoked",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "unknown_ca",
        Error::AlertReceived(rustls::AlertDescription::UnknownCA) => "unknown_ca",
        Error::AlertReceived(rustls::AlertDescription::BadCertificate) => "bad_certificate",
        Error::InvalidCertificate(CertificateError::Other(other)) => {
            match other.0.downcast_ref::<PeerRefused>() {
                Some(PeerRefused::SecureNaming { .. }) => "secure_naming",
                Some(PeerRefused::TrustDomain { .. }) => "trust_domain",
                None => "bad_certificate",
            }
        }
        Error::InvalidCertificate(_) => "bad_certificate",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use meshward_identity::tls::PeerRefused;

    use super::*;

    fn io(error: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, error)
    }

    #[test]
    fn a_refusal_is_counted_by_its_reason_not_its_words() {
        let naming = PeerRefused::SecureNaming {
            id: "spiffe://td/ns/a/sa/b".into(),
            allowed: "spiffe://td/ns/a/sa/c".into(),
        };
        let domain = PeerRefused::TrustDomain {
            id: "spiffe://other/ns/a/sa/b".into(),
            domain: "other".into(),
            trusted: "td".into(),
        };
        assert_eq!(
            handshake_failure(&io(naming.clone().into())),
            "secure_naming"
        );
        assert_eq!(handshake_failure(&io(domain.into())), "trust_domain");
        // The words alone no longer decide.
        let words = rustls::Error::General("secure naming and trust domain".into());
        assert_eq!(handshake_failure(&io(words)), "protocol");
        // The message still says why, for logs.
        let shown = rustls::Error::from(naming).to_string();
        assert!(
            shown.contains("secure naming: the server is spiffe://td/ns/a/sa/b"),
            "{shown}"
        );
    }
}
