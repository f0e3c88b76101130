//! Checking a certificate chain against a trust bundle, and reading the
//! SPIFFE identity it carries. Used by the agent on every certificate it is
//! given and by `meshward ca inspect`; TLS handshakes use rustls verifiers.

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::*;

use crate::bundle::TrustBundle;
use crate::spiffe::{SpiffeError, SpiffeId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain is empty")]
    Empty,
    #[error("certificate {index} of the chain cannot be parsed: {reason}")]
    Parse { index: usize, reason: String },
    #[error("the workload certificate must have exactly one URI SAN, found {0}")]
    UriSans(usize),
    #[error("the workload certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    Spiffe(#[from] SpiffeError),
    #[error("the workload certificate must not be a CA")]
    LeafIsCa,
    #[error(
        "certificate {index} of the chain is not valid now (valid {not_before} to {not_after})"
    )]
    Expired {
        index: usize,
        not_before: String,
        not_after: String,
    },
    #[error("certificate {index} is not signed by the next certificate of the chain")]
    BadSignature { index: usize },
    #[error("certificate {index} signs another but is not a CA with the keyCertSign usage")]
    NotCa { index: usize },
    #[error("the chain does not lead to any root of the trust bundle")]
    UntrustedRoot,
    #[error(
        "the workload certificate's key usage must be digitalSignature without keyCertSign or cRLSign"
    )]
    LeafKeyUsage,
    #[error("the chain is not valid: {0}")]
    Rejected(String),
}

/// What a verified chain says about its workload certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLeaf {
    pub id: SpiffeId,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// The leaf's serial, as revocations name it ([`crate::revocation::serial_hex`]).
    pub serial: String,
}

fn parse<'a>(index: usize, der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, ChainError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| ChainError::Parse {
            index,
            reason: e.to_string(),
        })
}

/// The single SPIFFE ID of a workload certificate.
pub fn spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, ChainError> {
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => Ok(SpiffeId::parse(uri)?),
        other => Err(ChainError::UriSans(other.len())),
    }
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    cert.basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca)
}

/// A CA that may sign certificates: basicConstraints CA and, when key usage
/// is present, keyCertSign.
fn can_sign(cert: &X509Certificate<'_>) -> bool {
    is_ca(cert)
        && match cert.key_usage() {
            Ok(Some(ku)) => ku.value.key_cert_sign(),
            Ok(None) => true,
            Err(_) => false,
        }
}

/// Verifies `chain` (leaf first) at unix time `now` with webpki (path
/// building to a root of the bundle, validity, signatures with modern
/// algorithms only, CA constraints, name constraints, the clientAuth usage),
/// then checks the leaf is an X.509-SVID: not a CA, one SPIFFE URI SAN, no
/// certificate-signing key usage.
pub fn verify(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: i64,
) -> Result<VerifiedLeaf, ChainError> {
    let Some((leaf_der, intermediates)) = chain.split_first() else {
        return Err(ChainError::Empty);
    };
    let anchors: Vec<rustls_pki_types::TrustAnchor<'_>> = bundle
        .roots()
        .iter()
        .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
        .collect();
    let end_entity = webpki::EndEntityCert::try_from(leaf_der).map_err(|e| ChainError::Parse {
        index: 0,
        reason: e.to_string(),
    })?;
    let time = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now).unwrap_or(0),
    ));
    let algorithms = crate::tls::provider().signature_verification_algorithms.all;
    end_entity
        .verify_for_usage(
            algorithms,
            &anchors,
            intermediates,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| from_webpki(e, chain))?;

    let certs: Vec<X509Certificate<'_>> = chain
        .iter()
        .enumerate()
        .map(|(i, c)| parse(i, c))
        .collect::<Result<_, _>>()?;
    let leaf = &certs[0];
    if is_ca(leaf) {
        return Err(ChainError::LeafIsCa);
    }
    if let Ok(Some(ku)) = leaf.key_usage()
        && (ku.value.key_cert_sign() || ku.value.crl_sign() || !ku.value.digital_signature())
    {
        return Err(ChainError::LeafKeyUsage);
    }
    let id = spiffe_id(leaf)?;
    Ok(VerifiedLeaf {
        id,
        not_before: leaf.validity().not_before.timestamp(),
        not_after: certs
            .iter()
            .map(|c| c.validity().not_after.timestamp())
            .min()
            .unwrap_or(0),
        serial: crate::revocation::serial_hex(leaf.raw_serial()),
    })
}

fn from_webpki(e: webpki::Error, chain: &[CertificateDer<'_>]) -> ChainError {
    let validity = |index: usize| {
        chain
            .get(index)
            .and_then(|der| X509Certificate::from_der(der).ok())
            .map(|(_, c)| {
                (
                    c.validity().not_before.to_string(),
                    c.validity().not_after.to_string(),
                )
            })
            .unwrap_or_default()
    };
    match e {
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
            let (not_before, not_after) = validity(0);
            ChainError::Expired {
                index: 0,
                not_before,
                not_after,
            }
        }
        webpki::Error::UnknownIssuer => ChainError::UntrustedRoot,
        webpki::Error::CaUsedAsEndEntity => ChainError::LeafIsCa,
        webpki::Error::InvalidSignatureForPublicKey => ChainError::BadSignature { index: 0 },
        other => ChainError::Rejected(format!("{other:?}")),
    }
}

/// Checks a signing CA's chain (CA certificate first): as [`verify`], but the
/// first certificate must itself be able to sign.
pub fn verify_ca(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: i64,
) -> Result<(), ChainError> {
    let certs = verify_path(chain, bundle, now)?;
    if can_sign(&certs[0]) {
        Ok(())
    } else {
        Err(ChainError::NotCa { index: 0 })
    }
}

/// The checks every chain gets: parse, validity, signatures, issuers able to
/// sign, anchored in the bundle.
fn verify_path<'a>(
    chain: &'a [CertificateDer<'_>],
    bundle: &TrustBundle,
    now: i64,
) -> Result<Vec<X509Certificate<'a>>, ChainError> {
    if chain.is_empty() {
        return Err(ChainError::Empty);
    }
    let certs: Vec<X509Certificate<'_>> = chain
        .iter()
        .enumerate()
        .map(|(i, c)| parse(i, c))
        .collect::<Result<_, _>>()?;
    let at = ASN1Time::from_timestamp(now).map_err(|e| ChainError::Parse {
        index: 0,
        reason: e.to_string(),
    })?;
    for (index, cert) in certs.iter().enumerate() {
        if !cert.validity().is_valid_at(at) {
            return Err(ChainError::Expired {
                index,
                not_before: cert.validity().not_before.to_string(),
                not_after: cert.validity().not_after.to_string(),
            });
        }
    }
    for index in 0..certs.len() - 1 {
        let issuer = &certs[index + 1];
        if !can_sign(issuer) {
            return Err(ChainError::NotCa { index: index + 1 });
        }
        certs[index]
            .verify_signature(Some(issuer.public_key()))
            .map_err(|_| ChainError::BadSignature { index })?;
    }
    let last_index = certs.len() - 1;
    let last = &certs[last_index];
    let anchored = bundle.contains(&chain[last_index])
        || bundle.roots().iter().any(|root| {
            X509Certificate::from_der(root).is_ok_and(|(_, root)| {
                can_sign(&root)
                    && root.validity().is_valid_at(at)
                    && last.verify_signature(Some(root.public_key())).is_ok()
            })
        });
    if !anchored {
        return Err(ChainError::UntrustedRoot);
    }
    Ok(certs)
}
