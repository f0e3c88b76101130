//! TLS from the outside world: the operator's certificate and key for a
//! Gateway server (`credentialName` in `--credentials-dir`, or file paths),
//! and for MUTUAL the CA that client certificates must chain to. TLS 1.2
//! and 1.3 with ECDHE and AES-GCM only (the mesh's own provider), ALPN h2
//! and http/1.1. The files are watched: a changed certificate is put in
//! force for new handshakes while open connections carry on; one that does
//! not load (half written, key not matching) leaves the last good one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use meshward_policy::api::ServerTls as TlsSettings;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::identity::{ALPN_H2, ALPN_HTTP11};

/// The files of one server's credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// MUTUAL: the CA certificates client certificates must chain to.
    pub ca: Option<PathBuf>,
    /// `TLSV1_3` asked as the minimum.
    pub tls13_only: bool,
}

impl CertSource {
    /// The files a server's `tls` names: `credentialName` as `NAME.crt`,
    /// `NAME.key` and (MUTUAL) `NAME-cacert.crt` in `dir`, else the paths.
    pub fn new(tls: &TlsSettings, dir: Option<&Path>) -> Result<CertSource, String> {
        let mutual = tls.mode.as_deref() == Some("MUTUAL");
        let tls13_only = tls.min_protocol_version.as_deref() == Some("TLSV1_3");
        if !tls.credential_name.is_empty() {
            let Some(dir) = dir else {
                return Err(format!(
                    "credentialName {:?} needs the gateway's --credentials-dir",
                    tls.credential_name
                ));
            };
            let name = &tls.credential_name;
            let ca = dir.join(format!("{name}-cacert.crt"));
            return Ok(CertSource {
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
                ca: if mutual { Some(ca) } else { None },
                tls13_only,
            });
        }
        Ok(CertSource {
            cert: PathBuf::from(&tls.server_certificate),
            key: PathBuf::from(&tls.private_key),
            ca: (mutual && !tls.ca_certificates.is_empty())
                .then(|| PathBuf::from(&tls.ca_certificates)),
            tls13_only,
        })
    }

    /// What changes when a file is rewritten: modification time and length
    /// of each.
    fn stamp(&self) -> Stamp {
        [Some(&self.cert), Some(&self.key), self.ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
            })
            .collect()
    }

    fn build(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = meshward_identity::tls::provider();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("reading the certificate {}: {e}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("no certificate in {}", self.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| format!("reading the private key {}: {e}", self.key.display()))?;
        let certified = CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
            format!(
                "{} and {}: {e} (does the key belong to the certificate?)",
                self.cert.display(),
                self.key.display()
            )
        })?;
        let versions: &[&rustls::SupportedProtocolVersion] = if self.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?;
        let builder = match &self.ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                let cas = CertificateDer::pem_file_iter(ca)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("reading the client CA {}: {e}", ca.display()))?;
                for c in cas {
                    roots
                        .add(c)
                        .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("no CA certificate in {}", ca.display()));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        // A resumed session would skip the client certificate check.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// What the files looked like: modification time and length of each.
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// One server's TLS, reloaded when its files change. A server whose files
/// do not load (yet) has none, and refuses handshakes until they do: the
/// rest of the configuration — other servers, policies — is not held back
/// by one missing credential.
pub struct ServerTls {
    pub source: CertSource,
    current: RwLock<(Stamp, Option<Arc<rustls::ServerConfig>>)>,
}

impl ServerTls {
    /// The server's TLS from its files, and why it has none if it has none.
    pub fn load(source: CertSource) -> (ServerTls, Option<String>) {
        let stamp = source.stamp();
        let (config, error) = match source.build() {
            Ok(config) => (Some(config), None),
            Err(e) => (None, Some(e)),
        };
        let tls = ServerTls {
            source,
            current: RwLock::new((stamp, config)),
        };
        (tls, error)
    }

    /// The configuration for the next handshake; `None` while the files
    /// have never loaded.
    pub fn config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }

    /// Rebuilds when the files changed since the last look; returns what
    /// happened, for the log (`None`: unchanged).
    pub fn reload(&self) -> Option<Result<(), String>> {
        let stamp = self.source.stamp();
        if self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            == stamp
        {
            return None;
        }
        let built = self.source.build();
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(match built {
            Ok(config) => {
                *current = (stamp, Some(config));
                Ok(())
            }
            Err(e) => {
                // Looked at: said once, until the files change again.
                current.0 = stamp;
                Err(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_rewritten_pair_is_taken_only_once_key_and_certificate_match() {
        let dir = tempfile::tempdir().unwrap();
        let source = CertSource {
            cert: dir.path().join("a.crt"),
            key: dir.path().join("a.key"),
            ca: None,
            tls13_only: false,
        };
        let (cert, key) = issue("first");
        std::fs::write(&source.cert, &cert).unwrap();
        std::fs::write(&source.key, &key).unwrap();
        let (tls, error) = ServerTls::load(source.clone());
        assert_eq!(error, None);
        let first = tls.config().unwrap();
        assert!(tls.reload().is_none(), "nothing changed");

        // The certificate first: it does not match the key on disk.
        let (cert2, key2) = issue("second-with-a-longer-name");
        std::fs::write(&source.cert, &cert2).unwrap();
        let refused = tls.reload().expect("a change is seen");
        assert!(
            refused.unwrap_err().contains("does the key belong"),
            "mismatch named"
        );
        assert!(
            Arc::ptr_eq(&first, &tls.config().unwrap()),
            "the old pair stays in force"
        );
        // Looked at once: not again until the files change.
        assert!(tls.reload().is_none());

        std::fs::write(&source.key, &key2).unwrap();
        assert_eq!(tls.reload(), Some(Ok(())));
        assert!(
            !Arc::ptr_eq(&first, &tls.config().unwrap()),
            "the new pair is in force"
        );
    }

    #[test]
    fn a_credential_that_appears_later_is_served_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let source = CertSource {
            cert: dir.path().join("late.crt"),
            key: dir.path().join("late.key"),
            ca: None,
            tls13_only: false,
        };
        let (tls, error) = ServerTls::load(source.clone());
        assert!(
            error.unwrap().contains("late.crt"),
            "the missing file is named"
        );
        assert!(tls.config().is_none(), "no handshake until it loads");
        let (cert, key) = issue("late");
        std::fs::write(&source.key, &key).unwrap();
        std::fs::write(&source.cert, &cert).unwrap();
        assert_eq!(tls.reload(), Some(Ok(())));
        assert!(tls.config().is_some());
    }
}
