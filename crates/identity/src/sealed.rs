//! Secrets sealed with an operator's key: how several servers share one CA
//! (its private key, the bootstrap-token key) through a store they all
//! read, without the store ever holding them in the clear.
//!
//! AES-256-GCM (aws-lc-rs), a random 96-bit nonce per seal, and a context
//! string bound in as associated data, so a sealed value only opens as
//! what it was sealed for. Sealed bytes are `nonce || ciphertext || tag`.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;

/// Why a key could not be read or a value not opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "{path}: a sealing key is 32 bytes: raw, 64 hex digits or base64 (make one with `openssl rand -out {path} 32`)"
    )]
    BadKey { path: String },
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("no random nonce could be made")]
    Random,
    #[error("{0}: it does not open with this key (another key sealed it, or it was changed)")]
    WrongKey(String),
}

/// An operator's key, from a file.
pub struct SealingKey(LessSafeKey);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    /// Reads a 32-byte key: the raw bytes, or 64 hex digits, or base64.
    pub fn read(path: &std::path::Path) -> Result<SealingKey, SealError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| SealError::Read {
            path: shown.clone(),
            source,
        })?;
        let key = if bytes.len() == 32 {
            bytes
        } else {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            hex::decode(&text)
                .ok()
                .or_else(|| base64::engine::general_purpose::STANDARD.decode(&text).ok())
                .unwrap_or_default()
        };
        SealingKey::from_bytes(&key).ok_or(SealError::BadKey { path: shown })
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(key: &[u8]) -> Option<SealingKey> {
        if key.len() != 32 {
            return None;
        }
        UnboundKey::new(&AES_256_GCM, key)
            .ok()
            .map(|k| SealingKey(LessSafeKey::new(k)))
    }

    /// `plain`, sealed for `context`.
    pub fn seal(&self, context: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut sealed = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// What `sealed` holds, if this key sealed it for `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let wrong = || SealError::WrongKey(context.to_owned());
        if sealed.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut body)
            .map_err(|_| wrong())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_context() {
        let key = SealingKey::from_bytes(&[7; 32]).unwrap();
        let sealed = key.seal("ca", b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(
            !sealed.windows(7).any(|w| w == b"PRIVATE"),
            "the sealed bytes hold the plain text"
        );
        assert_eq!(
            key.open("ca", &sealed).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert!(key.open("other", &sealed).is_err(), "another context");
        let other = SealingKey::from_bytes(&[8; 32]).unwrap();
        assert!(other.open("ca", &sealed).is_err(), "another key");
        let mut changed = sealed.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert!(key.open("ca", &changed).is_err(), "a changed value");
        assert_ne!(
            key.seal("ca", b"x").unwrap(),
            key.seal("ca", b"x").unwrap(),
            "a fresh nonce each time"
        );
    }

    #[test]
    fn keys_are_read_raw_hex_or_base64_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        for text in [
            vec![1u8; 32],
            "01".repeat(32).into_bytes(),
            base64::engine::general_purpose::STANDARD
                .encode([1u8; 32])
                .into_bytes(),
        ] {
            std::fs::write(&path, &text).unwrap();
            let key = SealingKey::read(&path).unwrap();
            let sealed = key.seal("c", b"v").unwrap();
            assert_eq!(
                SealingKey::from_bytes(&[1; 32])
                    .unwrap()
                    .open("c", &sealed)
                    .unwrap(),
                b"v"
            );
        }
        std::fs::write(&path, b"too short").unwrap();
        assert!(matches!(
            SealingKey::read(&path),
            Err(SealError::BadKey { .. })
        ));
    }
}
