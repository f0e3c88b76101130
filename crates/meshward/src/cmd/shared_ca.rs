//! One CA for the servers of one shared store (etcd).
//!
//! Every server must sign with the same CA, so that each accepts the
//! others' certificates and a proxy's certificate verifies wherever it
//! goes. Two ways:
//!
//! - The operator gives every server the same CA files (Istio's plug-in
//!   layout in `DATA/ca`, and the same `token-key.pem`).
//! - With `--ca-key-encryption-key-file KEY` on every server, the first
//!   server seals its CA (the files of `DATA/ca`, `token-key.pem` and
//!   `trust-domain`) with KEY (AES-256-GCM, `meshward_identity::sealed`)
//!   and shares it through the store; each later server opens it and
//!   writes it into its data directory (keys 0600) before it starts. The
//!   store never holds a private key in the clear, and a server without
//!   KEY cannot read it.
//!
//! Either way each server then checks its root certificate against the
//! mesh's (shared in the clear on first start): a server with another CA
//! refuses to start rather than split the mesh.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use meshward_control_plane::store::Store;
use meshward_identity::ca::CertificateAuthority;
use meshward_identity::pem;
use meshward_identity::sealed::SealingKey;
use meshward_identity::token::TOKEN_KEY;

/// The shared name of the sealed CA, also its sealing context.
const SEALED: &str = "ca";
/// The shared name of the mesh's root certificate(s).
const ROOT: &str = "root-cert.pem";
/// What the CA is in a data directory, besides the files of `ca/`.
const TOP_FILES: [&str; 2] = ["trust-domain", TOKEN_KEY];

/// Before the CA is opened: a data directory of a server on a shared store
/// with a sealed CA takes that CA. Returns whether the directory had a CA
/// of its own before (then it must be the mesh's).
pub fn before_open(store: &Store, data: &Path, key: Option<&SealingKey>) -> anyhow::Result<bool> {
    let had_own = data.join("ca").join("ca-key.pem").exists();
    let (true, Some(key)) = (store.is_shared(), key) else {
        return Ok(had_own);
    };
    if let Some(sealed) = store.shared(SEALED)? {
        install(data, &open(key, &sealed)?, false)?;
    }
    Ok(had_own)
}

/// After the CA is opened: the first server shares it sealed (with a key),
/// and every server's root must be the mesh's. Returns `true` when this
/// server lost a race to share a CA it had just made, and took the
/// winner's instead: the CA must then be opened again.
pub fn after_open(
    store: &Store,
    data: &Path,
    key: Option<&SealingKey>,
    had_own: bool,
    ca: &CertificateAuthority,
) -> anyhow::Result<bool> {
    if !store.is_shared() {
        return Ok(false);
    }
    let root = ca.bundle().to_pem();
    // The root first: of servers starting together one is the mesh's
    // first, and only it shares its (sealed) CA.
    if store.share_once(ROOT, root.clone().into_bytes())? {
        if let Some(key) = key {
            let sealed = key.seal(SEALED, &pack(data)?).context("sealing the CA")?;
            if !store.share_once(SEALED, sealed)? {
                bail!(
                    "the store has a sealed CA but had no root certificate: remove {}shared/ca from etcd, or start with the data directory that sealed it",
                    store.describe()
                );
            }
        }
        return Ok(false);
    }
    let mesh = store.shared(ROOT)?.unwrap_or_default();
    if mesh == root.as_bytes() {
        return Ok(false);
    }
    // Another CA is the mesh's. A data directory whose CA was made just
    // now takes the mesh's, sealed by the first server (which may still
    // be sharing it).
    if let (Some(key), false) = (key, had_own) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(theirs) = store.shared(SEALED)? {
                install(data, &open(key, &theirs)?, true)?;
                return Ok(true);
            }
            if std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200)); // pacing: the first server is sealing its CA
        }
    }
    bail!(
        "this server's CA ({}/root-cert.pem) is not the one the other servers of {} sign with: \
         give every server the same CA (Istio's plug-in files in DATA/ca and the same \
         {TOKEN_KEY}), or start every server with --ca-key-encryption-key-file so the first \
         shares its CA",
        data.display(),
        store.describe()
    )
}

/// The CA's files of `data`, as JSON: relative path → contents.
fn pack(data: &Path) -> anyhow::Result<Vec<u8>> {
    let mut files = BTreeMap::new();
    for name in TOP_FILES {
        let path = data.join(name);
        if path.exists() {
            files.insert(name.to_owned(), read(&path)?);
        }
    }
    let dir = data.join("ca");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file()
            && let Ok(name) = entry.file_name().into_string()
            && !name.starts_with('.')
        {
            files.insert(format!("ca/{name}"), read(&entry.path())?);
        }
    }
    Ok(serde_json::to_vec(&files)?)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Opens the sealed CA: relative path → contents.
fn open(key: &SealingKey, sealed: &[u8]) -> anyhow::Result<BTreeMap<String, String>> {
    let plain = key
        .open(SEALED, sealed)
        .context("the CA shared in the store (is --ca-key-encryption-key-file the key the first server was given?)")?;
    let files: BTreeMap<String, String> =
        serde_json::from_slice(&plain).context("the CA shared in the store")?;
    // Only the CA's own files, inside the data directory.
    for name in files.keys() {
        let known = TOP_FILES.contains(&name.as_str())
            || name
                .strip_prefix("ca/")
                .is_some_and(|n| !n.is_empty() && !n.contains('/') && !n.starts_with('.'));
        if !known {
            bail!("the CA shared in the store names {name:?}, which is not a CA file");
        }
    }
    Ok(files)
}

/// Writes the mesh's CA into `data` (private keys 0600). A file already
/// there that differs is refused unless `replace`: that directory has a
/// CA of its own.
fn install(data: &Path, files: &BTreeMap<String, String>, replace: bool) -> anyhow::Result<()> {
    for (name, text) in files {
        let path = data.join(name);
        if !replace
            && let Ok(existing) = std::fs::read_to_string(&path)
            && existing != *text
        {
            bail!(
                "{} differs from the mesh's CA shared in the store: this data directory has a CA \
                 of its own; use an empty --data-dir, or remove {}/ca and {}/{TOKEN_KEY}",
                path.display(),
                data.display(),
                data.display()
            );
        }
    }
    std::fs::create_dir_all(data.join("ca"))
        .with_context(|| format!("creating {}/ca", data.display()))?;
    for (name, text) in files {
        let path = data.join(name);
        if name.contains("key") {
            pem::write_private(&path, text)?;
        } else {
            pem::write_public(&path, text)?;
        }
    }
    Ok(())
}
