//! The admin credential: a client certificate for the identity
//! `spiffe://TD/ns/ROOT_NS/sa/meshward-admin`, made by the server in its data
//! directory (key 0600) and renewed at every start. The config API accepts
//! nothing else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshward_identity::ca::{self, CaError, CertificateAuthority};
use meshward_identity::pem;
use meshward_identity::spiffe::SpiffeId;

use crate::api::ADMIN_SERVICE_ACCOUNT;

/// How long an admin certificate lives; a new one is made at each start.
const ADMIN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where the admin credential lives in a data directory.
pub fn admin_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("admin")
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("making the admin credential: {0}")]
    Ca(#[from] CaError),
    #[error("writing the admin credential: {0}")]
    Write(#[from] pem::PemError),
    #[error("the admin identity: {0}")]
    Identity(String),
}

/// Issues the admin certificate into `dir`: `cert-chain.pem`, `key.pem`
/// (0600) and `root-cert.pem`. Returns the admin identity.
pub fn write_admin_credential(
    authority: &CertificateAuthority,
    root_namespace: &str,
    dir: &Path,
) -> Result<SpiffeId, AdminError> {
    let id = SpiffeId::istio(
        authority.trust_domain(),
        root_namespace,
        ADMIN_SERVICE_ACCOUNT,
    )
    .map_err(|e| AdminError::Identity(e.to_string()))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let chain = authority.issue_for_key(&key, &id, &[], ADMIN_TTL)?;
    std::fs::create_dir_all(dir).map_err(|e| pem::PemError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    pem::write_private(&dir.join("key.pem"), &key.serialize_pem())?;
    pem::write_public(&dir.join("cert-chain.pem"), &chain.to_pem())?;
    ca::write_bundle(&dir.join("root-cert.pem"), authority.bundle())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_identity::ca::CaFiles;

    #[test]
    fn the_admin_credential_is_the_admin_identity_with_a_private_key_file() {
        let data = tempfile::tempdir().unwrap();
        let authority =
            CertificateAuthority::load_or_create(&CaFiles::new(data.path()), "cluster.local")
                .unwrap();
        let dir = admin_dir(data.path());
        let id = write_admin_credential(&authority, "istio-system", &dir).unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/meshward-admin"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "the admin key is its owner's only");
        }
        let chain_pem = std::fs::read_to_string(dir.join("cert-chain.pem")).unwrap();
        let certs = pem::parse_certificates(&chain_pem).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let verified = meshward_identity::chain::verify(&certs, authority.bundle(), now).unwrap();
        assert_eq!(verified.id, id);
        // The key on disk is the certificate's.
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("key.pem")).unwrap())
            .unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
            authority.bundle().to_pem(),
            "the admin trusts the mesh's roots"
        );

        // Every start makes a new one.
        write_admin_credential(&authority, "istio-system", &dir).unwrap();
        let again = std::fs::read_to_string(dir.join("cert-chain.pem")).unwrap();
        assert_ne!(again, chain_pem);
    }
}
