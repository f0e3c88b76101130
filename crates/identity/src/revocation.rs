//! Revocation: workload identities, certificate serials and bootstrap token
//! ids the mesh no longer trusts.
//!
//! The control plane keeps the list in its store. The CA refuses to issue
//! for anything on it (bootstrap and renewal), and every proxy gets the whole
//! list and refuses revoked peers at the TLS handshake. A [`RevocationList`]
//! is one version of the list; [`Revocations`] is the version in force,
//! shared by everything that checks it and replaced whole, so a check reads
//! one consistent list and a change reaches the next check.

use std::collections::BTreeMap;
use std::sync::Arc;

use meshward_api::resources::{Revocation, RevocationKind};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use x509_parser::prelude::*;

use crate::spiffe::SpiffeId;

/// A revocation entry that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error(
        "{0:?} is not a SPIFFE ID (spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT): {1}"
    )]
    Identity(String, String),
    #[error(
        "{0:?} is not a certificate serial: give hex bytes, with or without `:` (as `meshward ca inspect` prints it)"
    )]
    Serial(String),
    #[error(
        "{0:?} is not a token id: 1 to 128 characters of letters, digits, `-`, `_` and `.` (as `meshward token create` prints it)"
    )]
    Token(String),
}

/// Why something was refused: it is on the list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {} was revoked at {}{}", .kind.as_str(), .value, .revoked_at, reason_suffix(.reason))]
pub struct Revoked {
    pub kind: RevocationKind,
    pub value: String,
    pub reason: String,
    pub revoked_at: String,
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// The form a value is kept and compared in: a SPIFFE ID as it prints, a
/// serial as lower-case hex bytes joined by `:` without leading zero bytes,
/// a token id as given.
pub fn canonical(kind: RevocationKind, value: &str) -> Result<String, RevocationError> {
    let value = value.trim();
    match kind {
        RevocationKind::Identity => SpiffeId::parse(value)
            .map(|id| id.to_string())
            .map_err(|e| RevocationError::Identity(value.to_owned(), e.to_string())),
        RevocationKind::Serial => {
            let digits: String = value
                .strip_prefix("0x")
                .unwrap_or(value)
                .chars()
                .filter(|c| *c != ':')
                .collect();
            let bytes = (!digits.is_empty() && digits.len() <= 128)
                .then(|| {
                    // An odd number of digits has an implied leading zero.
                    let padded = if digits.len() % 2 == 1 {
                        format!("0{digits}")
                    } else {
                        digits
                    };
                    hex::decode(padded).ok()
                })
                .flatten()
                .ok_or_else(|| RevocationError::Serial(value.to_owned()))?;
            Ok(serial_hex(&bytes))
        }
        RevocationKind::Token => {
            let ok = (1..=128).contains(&value.len())
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if ok {
                Ok(value.to_owned())
            } else {
                Err(RevocationError::Token(value.to_owned()))
            }
        }
    }
}

/// A serial number's bytes (big-endian, as DER holds them) in canonical
/// form: the same number prints the same whatever its leading zeros.
pub fn serial_hex(raw: &[u8]) -> String {
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let significant = &raw[first..];
    if significant.is_empty() {
        return "00".into();
    }
    significant
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The SPIFFE ID (if it has one) and canonical serial of a certificate.
pub fn certificate_facts(der: &CertificateDer<'_>) -> Option<(Option<String>, String)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let id = crate::chain::spiffe_id(&cert).ok().map(|id| id.to_string());
    Some((id, serial_hex(cert.raw_serial())))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    reason: String,
    revoked_at: String,
}

/// One version of the list: what is revoked, by kind and canonical value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    entries: BTreeMap<(RevocationKind, String), Entry>,
}

impl RevocationList {
    /// The list of `entries`; any entry that cannot be understood refuses
    /// the whole list (the caller keeps the one it had).
    pub fn new<'a>(
        entries: impl IntoIterator<Item = &'a Revocation>,
    ) -> Result<RevocationList, RevocationError> {
        let mut list = RevocationList::default();
        for e in entries {
            list.entries.insert(
                (e.kind, canonical(e.kind, &e.value)?),
                Entry {
                    reason: e.reason.clone(),
                    revoked_at: e.revoked_at.clone(),
                },
            );
        }
        Ok(list)
    }

    /// The entries, by kind and value.
    pub fn entries(&self) -> Vec<Revocation> {
        self.entries
            .iter()
            .map(|((kind, value), e)| Revocation {
                kind: *kind,
                value: value.clone(),
                reason: e.reason.clone(),
                revoked_at: e.revoked_at.clone(),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `value` must be canonical (see [`canonical`]).
    fn check(&self, kind: RevocationKind, value: &str) -> Result<(), Revoked> {
        match self.entries.get(&(kind, value.to_owned())) {
            None => Ok(()),
            Some(e) => Err(Revoked {
                kind,
                value: value.to_owned(),
                reason: e.reason.clone(),
                revoked_at: e.revoked_at.clone(),
            }),
        }
    }

    pub fn check_identity(&self, id: &SpiffeId) -> Result<(), Revoked> {
        self.check(RevocationKind::Identity, &id.to_string())
    }

    /// `serial` in canonical form ([`serial_hex`]).
    pub fn check_serial(&self, serial: &str) -> Result<(), Revoked> {
        self.check(RevocationKind::Serial, serial)
    }

    pub fn check_token(&self, id: &str) -> Result<(), Revoked> {
        self.check(RevocationKind::Token, id)
    }

    /// A peer, by the identity and serial of its certificate.
    pub fn check_peer(&self, id: Option<&str>, serial: &str) -> Result<(), Revoked> {
        if let Some(id) = id {
            self.check(RevocationKind::Identity, id)?;
        }
        self.check_serial(serial)
    }

    /// A peer's leaf certificate. One that cannot be parsed is refused by
    /// the chain checks anyway; here it has nothing revoked to match.
    pub fn check_certificate(&self, der: &CertificateDer<'_>) -> Result<(), Revoked> {
        match certificate_facts(der) {
            Some((id, serial)) => self.check_peer(id.as_deref(), &serial),
            None => Ok(()),
        }
    }
}

/// The list in force, shared: the server feeds it from its store, a proxy
/// from the control plane; checks read it on every handshake and request,
/// open connections wait on it.
#[derive(Debug, Clone)]
pub struct Revocations(Arc<watch::Sender<Arc<RevocationList>>>);

impl Default for Revocations {
    fn default() -> Self {
        Revocations(Arc::new(watch::channel(Arc::default()).0))
    }
}

impl Revocations {
    /// An empty list.
    pub fn new() -> Revocations {
        Revocations::default()
    }

    pub fn current(&self) -> Arc<RevocationList> {
        self.0.borrow().clone()
    }

    /// Puts `list` in force; `true` if it differs from the one it replaces
    /// (only then are waiters woken).
    pub fn replace(&self, list: RevocationList) -> bool {
        self.0.send_if_modified(|current| {
            if **current == list {
                false
            } else {
                *current = Arc::new(list);
                true
            }
        })
    }

    /// Resolves when a peer with this identity and serial is revoked: at
    /// once if it already is.
    pub async fn until_revoked(&self, id: Option<&str>, serial: &str) -> Revoked {
        let mut changes = self.0.subscribe();
        loop {
            let verdict = changes.borrow_and_update().check_peer(id, serial);
            if let Err(revoked) = verdict {
                return revoked;
            }
            if changes.changed().await.is_err() {
                // Nobody can change the list any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: RevocationKind, value: &str) -> Revocation {
        Revocation {
            kind,
            value: value.into(),
            reason: "key leaked".into(),
            revoked_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn serials_compare_as_numbers_whatever_their_spelling() {
        let canonical_serial = |s| canonical(RevocationKind::Serial, s);
        assert_eq!(canonical_serial("4A:0b:FF").unwrap(), "4a:0b:ff");
        assert_eq!(canonical_serial("4a0bff").unwrap(), "4a:0b:ff");
        assert_eq!(canonical_serial("00:4a:0b:ff").unwrap(), "4a:0b:ff");
        assert_eq!(canonical_serial("0x4a0bff").unwrap(), "4a:0b:ff");
        assert_eq!(canonical_serial("a0bff").unwrap(), "0a:0b:ff");
        assert_eq!(serial_hex(&[0, 0x4a, 0x0b, 0xff]), "4a:0b:ff");
        assert_eq!(serial_hex(&[0]), "00");
        for bad in ["", "xyz", "4a:0g", ":"] {
            assert!(canonical_serial(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identities_and_token_ids_are_checked() {
        assert_eq!(
            canonical(
                RevocationKind::Identity,
                " spiffe://cluster.local/ns/a/sa/b "
            )
            .unwrap(),
            "spiffe://cluster.local/ns/a/sa/b"
        );
        assert!(canonical(RevocationKind::Identity, "ns/a/sa/b").is_err());
        assert_eq!(
            canonical(RevocationKind::Token, "3f2a-_.x").unwrap(),
            "3f2a-_.x"
        );
        assert!(canonical(RevocationKind::Token, "a b").is_err());
        assert!(canonical(RevocationKind::Token, "").is_err());
        assert!(canonical(RevocationKind::Token, &"a".repeat(129)).is_err());
    }

    #[test]
    fn a_list_refuses_what_it_names_and_nothing_else() {
        let list = RevocationList::new(&[
            entry(RevocationKind::Identity, "spiffe://cluster.local/ns/a/sa/b"),
            entry(RevocationKind::Serial, "00:01:02"),
            entry(RevocationKind::Token, "t1"),
        ])
        .unwrap();
        let revoked = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let other = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/c").unwrap();
        let refused = list.check_identity(&revoked).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "identity spiffe://cluster.local/ns/a/sa/b was revoked at 2026-01-01T00:00:00Z: key leaked"
        );
        assert!(list.check_identity(&other).is_ok());
        assert!(list.check_serial("01:02").is_err());
        assert!(list.check_serial("01:03").is_ok());
        assert!(list.check_token("t1").is_err());
        assert!(list.check_token("t2").is_ok());
        assert!(list.check_peer(Some(&other.to_string()), "01:02").is_err());
        assert!(list.check_peer(Some(&revoked.to_string()), "99").is_err());
        assert!(list.check_peer(None, "99").is_ok());
        // One bad entry refuses the list.
        assert!(RevocationList::new(&[entry(RevocationKind::Serial, "zz")]).is_err());
    }

    #[test]
    fn a_certificate_is_matched_by_its_identity_or_its_serial() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::CertificateAuthority::load_or_create(
            &crate::CaFiles::new(dir.path()),
            "cluster.local",
        )
        .unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let (_key, csr) = crate::ca::new_key_and_csr(&id).unwrap();
        let chain = ca.sign_csr(&csr, &id, None).unwrap();
        let (found_id, serial) = certificate_facts(chain.leaf()).unwrap();
        assert_eq!(found_id.as_deref(), Some(id.to_string().as_str()));
        let by_serial = RevocationList::new(&[entry(RevocationKind::Serial, &serial)]).unwrap();
        assert!(by_serial.check_certificate(chain.leaf()).is_err());
        let by_id =
            RevocationList::new(&[entry(RevocationKind::Identity, &id.to_string())]).unwrap();
        assert!(by_id.check_certificate(chain.leaf()).is_err());
        assert!(
            RevocationList::default()
                .check_certificate(chain.leaf())
                .is_ok()
        );
    }

    #[tokio::test]
    async fn waiters_wake_when_their_peer_is_revoked() {
        let revocations = Revocations::new();
        let waiting = {
            let revocations = revocations.clone();
            tokio::spawn(async move { revocations.until_revoked(None, "01").await })
        };
        // An unrelated change wakes it, but it goes on waiting; the same
        // list again is no change at all.
        let unrelated = RevocationList::new(&[entry(RevocationKind::Serial, "02")]).unwrap();
        assert!(revocations.replace(unrelated.clone()));
        assert!(!revocations.replace(unrelated));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        revocations.replace(
            RevocationList::new(&[
                entry(RevocationKind::Serial, "02"),
                entry(RevocationKind::Serial, "01"),
            ])
            .unwrap(),
        );
        let revoked = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(revoked.value, "01");
        // Already revoked: resolves at once.
        let now = revocations.until_revoked(None, "02").await;
        assert_eq!(now.kind, RevocationKind::Serial);
    }
}
