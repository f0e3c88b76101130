//! The trust bundle: every root certificate a workload trusts. A list, so a
//! root can be rotated with overlap: old and new trusted together until every
//! workload holds a certificate from the new one.

use std::path::Path;

use rustls_pki_types::CertificateDer;

use crate::pem::{self, PemError};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> TrustBundle {
        let mut bundle = TrustBundle::default();
        for root in roots {
            bundle.add(root);
        }
        bundle
    }

    pub fn read(path: &Path) -> Result<TrustBundle, PemError> {
        Ok(TrustBundle::new(pem::read_certificates(path)?))
    }

    pub fn from_pem(text: &str) -> Result<TrustBundle, String> {
        Ok(TrustBundle::new(pem::parse_certificates(text)?))
    }

    /// Adds a root unless it is already there.
    pub fn add(&mut self, root: CertificateDer<'static>) {
        if !self.roots.contains(&root) {
            self.roots.push(root);
        }
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn contains(&self, cert: &CertificateDer<'_>) -> bool {
        self.roots.iter().any(|r| r.as_ref() == cert.as_ref())
    }

    pub fn to_pem(&self) -> String {
        self.roots.iter().map(pem::encode_certificate).collect()
    }
}
