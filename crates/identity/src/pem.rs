//! PEM files: reading certificate lists, and writing private keys so that
//! nobody but the owner can ever read them.

use std::io::Write;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PemError + '_ {
    move |source| PemError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every `CERTIFICATE` block of a PEM text, in order.
pub fn parse_certificates(text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("not valid PEM: {e}"))?;
    let certs: Vec<CertificateDer<'static>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Ok(certs)
}

pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_certificates(&text).map_err(|reason| PemError::Invalid {
        path: path.to_path_buf(),
        reason,
    })
}

/// One `CERTIFICATE` block, with LF line endings.
pub fn encode_certificate(der: &CertificateDer<'_>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}

/// Writes a file readable by anyone (certificates), replacing it atomically.
pub fn write_public(path: &Path, contents: &str) -> Result<(), PemError> {
    write_atomic(path, contents, 0o644)
}

/// Writes a private key: mode 0600 from the moment the file exists, replaced atomically.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PemError> {
    write_atomic(path, contents, 0o600)
}

fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), PemError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
