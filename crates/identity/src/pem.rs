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
    let file = write_temp(path, contents)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io(file.path()))?;
    }
    persist(file, path, true)
}

/// Writes a private key, replacing any file there atomically. The key is
/// only ever in a file of mode 0600 with a random name (created with
/// O_EXCL, so nothing planted there is followed), then renamed into place;
/// on any error the temporary file is removed.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PemError> {
    persist(write_temp(path, contents)?, path, true)
}

/// Like [`write_private`], but fails with `AlreadyExists` if `path` exists:
/// of two processes creating the same key, exactly one wins.
pub fn create_private(path: &Path, contents: &str) -> Result<(), PemError> {
    persist(write_temp(path, contents)?, path, false)
}

/// Renames the temporary file to `path` (or, without `replace`, only if
/// nothing is there) and makes the rename durable.
fn persist(file: tempfile::NamedTempFile, path: &Path, replace: bool) -> Result<(), PemError> {
    let persisted = if replace {
        file.persist(path)
    } else {
        file.persist_noclobber(path)
    };
    persisted.map_err(|e| PemError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    sync_dir(path)
}

/// A temporary file in `path`'s directory (mode 0600), holding `contents`, flushed to disk.
fn write_temp(path: &Path, contents: &str) -> Result<tempfile::NamedTempFile, PemError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut file = tempfile::Builder::new()
        .prefix(".meshward-")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    file.write_all(contents.as_bytes())
        .map_err(io(file.path()))?;
    file.as_file().sync_all().map_err(io(file.path()))?;
    Ok(file)
}

/// Makes a rename durable: the directory entry reaches the disk too.
fn sync_dir(path: &Path) -> Result<(), PemError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::File::open(dir) {
        Ok(d) => {
            let _ = d.sync_all();
            Ok(())
        }
        Err(e) => Err(PemError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}
