//! A mesh CA in a temp dir, and the workload identities it issues.

use std::sync::Arc;
use std::time::Duration;

use meshward_identity::ca::{CaFiles, CertificateAuthority, IssuedChain};
use meshward_identity::spiffe::SpiffeId;
use meshward_identity::tls::{self, TrustDomains, WatchedCert};

use crate::identity::WorkloadIdentity;

/// The test mesh's trust domain.
pub const TD: &str = "cluster.local";

/// `spiffe://cluster.local/ns/{ns}/sa/{sa}`.
pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/ns/{ns}/sa/{sa}")).unwrap()
}

/// A mesh CA in a temp dir.
pub struct Ca {
    pub dir: tempfile::TempDir,
    pub ca: Arc<CertificateAuthority>,
}

impl Default for Ca {
    fn default() -> Ca {
        Ca::new()
    }
}

impl Ca {
    pub fn new() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertificateAuthority::load_or_create(&CaFiles::new(dir.path().join("ca")), TD).unwrap();
        Ca {
            dir,
            ca: Arc::new(ca),
        }
    }

    /// A certificate for `id`, fixed (no renewal).
    pub fn cert(&self, id: &SpiffeId) -> WatchedCert {
        let (key, chain) = self.issue(id);
        let certified = tls::certified_key(&key, &chain).unwrap();
        let (tx, rx) = tokio::sync::watch::channel(Some(certified));
        // The sender lives as long as the test process: the value never changes.
        std::mem::forget(tx);
        WatchedCert(rx)
    }

    /// A fresh P-256 key and a one-hour certificate chain for `id`.
    pub fn issue(&self, id: &SpiffeId) -> (rcgen::KeyPair, IssuedChain) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = self
            .ca
            .issue_for_key(&key, id, &[], Duration::from_secs(3600))
            .unwrap();
        (key, chain)
    }

    /// What a proxy for `id` runs with: its certificate, this CA's bundle.
    pub fn identity(&self, id: &SpiffeId) -> WorkloadIdentity {
        WorkloadIdentity {
            id: id.clone(),
            cert: self.cert(id),
            bundle: self.ca.bundle().clone(),
            trust_domains: TrustDomains(vec![TD.into()]),
            revocations: Default::default(),
        }
    }
}
