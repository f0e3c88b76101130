//! The mesh certificate authority.
//!
//! Files follow Istio's plug-in CA layout in one directory: `ca-cert.pem` and
//! `ca-key.pem` (the signing CA and its key), `cert-chain.pem` (the signing
//! CA up to the root) and `root-cert.pem` (the root). An operator who drops
//! their own intermediate there gets it used (plug-in CA); otherwise a
//! self-signed root is created on first start and reused after. Extra roots
//! in `trusted-roots.pem` join the trust bundle, for rotating the root with
//! overlap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::bundle::TrustBundle;
use crate::pem::{self, PemError};
use crate::spiffe::SpiffeId;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const TRUSTED_ROOTS: &str = "trusted-roots.pem";

/// Istio's default workload certificate lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Istio's default maximum workload certificate lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The self-signed root's lifetime.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long in the past, so a peer whose clock runs a
/// little behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    File(#[from] PemError),
    #[error("{dir}: a plug-in CA needs {missing}; found only some of ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem (add the missing files, or remove them all to let meshward create a root)", dir = dir.display())]
    Incomplete { dir: PathBuf, missing: String },
    #[error("{path}: not a usable private key: {reason}", path = path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{path}: the CA certificate cannot be used to sign: {reason}", path = path.display())]
    CaCert { path: PathBuf, reason: String },
    #[error("{dir}: ca-key.pem is not the key of ca-cert.pem; put the matching key there", dir = dir.display())]
    KeyMismatch { dir: PathBuf },
    #[error("the certificate signing request is malformed or its signature is invalid: {0}")]
    MalformedCsr(String),
    #[error(
        "the certificate signing request asks for {requested}, but the caller is {authenticated}"
    )]
    IdentityMismatch {
        requested: String,
        authenticated: String,
    },
    #[error(
        "the certificate signing request asks for a CA certificate; workload certificates are never CAs"
    )]
    CaRequested,
    #[error("requested TTL {requested:?} is greater than the max allowed TTL {max:?}")]
    TtlTooLong { requested: Duration, max: Duration },
    #[error("the identity's trust domain {found} is not this CA's ({expected})")]
    WrongTrustDomain { found: String, expected: String },
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Where the CA's files live.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub dir: PathBuf,
}

impl CaFiles {
    pub fn new(dir: impl Into<PathBuf>) -> CaFiles {
        CaFiles { dir: dir.into() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// How the CA came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaMode {
    /// Created by meshward in this directory (now or on an earlier start).
    SelfSigned,
    /// The operator's intermediate: the chain goes up to their root.
    PlugIn,
}

/// A certificate chain as issued: leaf first, root last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedChain {
    pub certificates: Vec<CertificateDer<'static>>,
}

impl IssuedChain {
    /// One PEM block per certificate, as Istio's `CreateCertificate` returns them.
    pub fn to_pem_list(&self) -> Vec<String> {
        self.certificates
            .iter()
            .map(pem::encode_certificate)
            .collect()
    }

    pub fn to_pem(&self) -> String {
        self.to_pem_list().concat()
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certificates[0]
    }
}

pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// From the signing CA up to the root.
    ca_chain: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
    mode: CaMode,
    max_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("mode", &self.mode)
            .field("chain_len", &self.ca_chain.len())
            .finish()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `files`, or creates a self-signed root there when
    /// the directory holds none of the CA files.
    pub fn load_or_create(
        files: &CaFiles,
        trust_domain: &str,
    ) -> Result<CertificateAuthority, CaError> {
        let names = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];
        let mut present: Vec<bool> = names.iter().map(|n| files.path(n).exists()).collect();
        // The key is written first when a root is created: with only the key
        // there, another process is most likely writing the rest right now.
        if present.iter().any(|p| *p) && present.iter().any(|p| !p) && files.path(CA_KEY).exists() {
            wait_for(files, &names);
            present = names.iter().map(|n| files.path(n).exists()).collect();
        }
        if present.iter().all(|p| !p) {
            match create_root(files, trust_domain) {
                Ok(()) => {}
                // Another process is creating the root right now: use theirs.
                Err(CaError::File(PemError::Io { source, .. }))
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    wait_for(files, &names);
                }
                Err(e) => return Err(e),
            }
        } else if present.iter().any(|p| !p) {
            let missing: Vec<&str> = names
                .iter()
                .zip(&present)
                .filter(|(_, p)| !**p)
                .map(|(n, _)| *n)
                .collect();
            return Err(CaError::Incomplete {
                dir: files.dir.clone(),
                missing: missing.join(", "),
            });
        }
        Self::load(files, trust_domain)
    }

    fn load(files: &CaFiles, trust_domain: &str) -> Result<CertificateAuthority, CaError> {
        let key_path = files.path(CA_KEY);
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| PemError::Io {
            path: key_path.clone(),
            source: e,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let cert_path = files.path(CA_CERT);
        let ca_cert = pem::read_certificates(&cert_path)?.remove(0);
        // Every root in root-cert.pem is trusted (old and new during a rotation);
        // the chain served to workloads ends at the one ca-cert.pem leads to.
        let roots = pem::read_certificates(&files.path(ROOT_CERT))?;
        let mut ca_chain = pem::read_certificates(&files.path(CERT_CHAIN))?;
        if ca_chain.first() != Some(&ca_cert) {
            ca_chain.insert(0, ca_cert.clone());
        }
        ca_chain.dedup();
        let mut bundle = TrustBundle::new(roots.clone());
        let trusted = files.path(TRUSTED_ROOTS);
        if trusted.exists() {
            for extra in pem::read_certificates(&trusted)? {
                bundle.add(extra);
            }
        }
        let check = |reason: String| CaError::CaCert {
            path: cert_path.clone(),
            reason,
        };
        // Refuse what would sign certificates nobody can verify, as Istio
        // checks a plug-in CA at startup.
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&ca_cert).map_err(|e| check(e.to_string()))?;
        if parsed.tbs_certificate.subject_pki.raw
            != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(CaError::KeyMismatch {
                dir: files.dir.clone(),
            });
        }
        let now = OffsetDateTime::now_utc().unix_timestamp();
        crate::chain::verify_ca(&ca_chain, &TrustBundle::new(roots.clone()), now).map_err(|e| {
            check(format!(
                "{e} (checked ca-cert.pem through cert-chain.pem to root-cert.pem)"
            ))
        })?;
        if let Some(root) = roots.iter().find(|r| {
            ca_chain.last() != Some(*r) && {
                // Append the root the chain leads to, when cert-chain.pem stops below it.
                ca_chain.last().is_some_and(|last| {
                    crate::chain::verify_ca(
                        &[last.clone(), (*r).clone()],
                        &TrustBundle::new(vec![(*r).clone()]),
                        now,
                    )
                    .is_ok()
                })
            }
        }) {
            ca_chain.push(root.clone());
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| check(e.to_string()))?;
        let mode = if roots.contains(&ca_cert) {
            CaMode::SelfSigned
        } else {
            CaMode::PlugIn
        };
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            issuer,
            ca_chain,
            bundle,
            mode,
            max_ttl: DEFAULT_MAX_TTL,
        })
    }

    /// The longest lifetime a CSR may ask for (Istio's
    /// `MAX_WORKLOAD_CERT_TTL`).
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> CertificateAuthority {
        self.max_ttl = max_ttl;
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn mode(&self) -> CaMode {
        self.mode
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Signs a CSR for `identity`, the caller's authenticated identity.
    ///
    /// Only the CSR's public key is used. A CSR that names another identity
    /// or asks to be a CA is refused; everything else in the certificate
    /// comes from `identity` and this CA.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedChain, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
        for san in &csr.params.subject_alt_names {
            let requested = match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            };
            if requested != identity.to_string() {
                return Err(CaError::IdentityMismatch {
                    requested,
                    authenticated: identity.to_string(),
                });
            }
        }
        if matches!(csr.params.is_ca, IsCa::Ca(_)) {
            return Err(CaError::CaRequested);
        }
        // The key type comes from the CSR's SubjectPublicKeyInfo itself (rcgen
        // would infer it from the CSR's signature algorithm, which can differ).
        let spki = csr_public_key(csr_pem)?;
        // As Istio's CA: a lifetime asked for beyond the maximum is refused,
        // not shortened. Unasked, the default, but never beyond the maximum.
        let ttl = match ttl {
            Some(ttl) if ttl > self.max_ttl => {
                return Err(CaError::TtlTooLong {
                    requested: ttl,
                    max: self.max_ttl,
                });
            }
            Some(ttl) => ttl,
            None => DEFAULT_TTL.min(self.max_ttl),
        };
        let params = self.workload_params(identity, ttl, &[])?;
        self.sign(&params, &spki)
    }

    /// Issues a certificate for a key the caller holds (the control plane's
    /// own serving key, the admin credential), with extra DNS/IP names. The
    /// workload maximum does not apply: these lifetimes are the server's own
    /// choice, as Istio's CA signs its own certificates unchecked.
    pub fn issue_for_key(
        &self,
        key: &KeyPair,
        identity: &SpiffeId,
        extra_sans: &[SanType],
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        let params = self.workload_params(identity, ttl, extra_sans)?;
        self.sign(&params, key)
    }

    fn workload_params(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
        extra_sans: &[SanType],
    ) -> Result<CertificateParams, CaError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                found: identity.trust_domain().to_owned(),
                expected: self.trust_domain.clone(),
            });
        }
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        // X.509-SVID: the identity is the URI SAN; the subject stays empty.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = std::iter::once(SanType::URI(uri))
            .chain(extra_sans.iter().cloned())
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        Ok(params)
    }

    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<IssuedChain, CaError> {
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut certificates = vec![cert.der().clone()];
        certificates.extend(self.ca_chain.iter().cloned());
        Ok(IssuedChain { certificates })
    }
}

/// The SubjectPublicKeyInfo of a CSR whose signature rcgen has already verified.
fn csr_public_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, CaError> {
    use x509_parser::prelude::FromDer;
    let der = ::pem::parse(csr_pem).map_err(|e| CaError::MalformedCsr(e.to_string()))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.contents())
            .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
    rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| CaError::MalformedCsr(format!("unsupported public key: {e}")))
}

/// A positive 128-bit serial: 16 random bytes with the top bit cleared and
/// never all zero.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Waits (briefly) until another process has written all the CA files.
fn wait_for(files: &CaFiles, names: &[&str]) {
    for _ in 0..50 {
        if names.iter().all(|n| files.path(n).exists()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Creates a self-signed root (ECDSA P-256, 10 years) in `files`.
fn create_root(files: &CaFiles, trust_domain: &str) -> Result<(), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "meshward root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_TTL;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let cert_pem = pem::encode_certificate(cert.der());
    // The key first: a crash between the writes leaves an incomplete
    // directory, which the next start reports instead of silently replacing.
    pem::create_private(&files.path(CA_KEY), &key.serialize_pem())?;
    pem::write_public(&files.path(CA_CERT), &cert_pem)?;
    pem::write_public(&files.path(CERT_CHAIN), &cert_pem)?;
    pem::write_public(&files.path(ROOT_CERT), &cert_pem)?;
    Ok(())
}

/// A new workload key (ECDSA P-256) and a CSR for `identity`, made in memory.
pub fn new_key_and_csr(identity: &SpiffeId) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let csr_pem = csr.pem().map_err(|e| CaError::Sign(e.to_string()))?;
    Ok((key, csr_pem))
}

/// Where a CA's trust bundle goes for clients: `<data-dir>/root-cert.pem`.
pub fn write_bundle(path: &Path, bundle: &TrustBundle) -> Result<(), CaError> {
    Ok(pem::write_public(path, &bundle.to_pem())?)
}
