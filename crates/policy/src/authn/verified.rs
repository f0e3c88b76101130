//! Tokens whose signature verified, as Envoy's `jwt_authn` caches them
//! (`jwt_cache_config`): a client sends the same token on every request,
//! and checking its signature again is most of what a JWT costs.
//!
//! What is cached is only that *these keys* verified *this exact token*'s
//! signature. Everything else is checked on every request, hit or not:
//! the token's shape, issuer, `nbf`/`exp` against the clock and audience
//! come before the cache is asked, and an entry is used only if the keys
//! in force for its issuer are the very set that verified it (after a
//! JWKS refresh, the token is verified again against the new set, so a
//! key removed from the JWKS no longer vouches for what it signed; a
//! failure evicts the entry). An entry is dropped once its token's `exp`
//! has passed, and the cache holds at most its capacity (least recently
//! used first out).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use super::ParsedToken;
use super::jwks::KeySet;

/// Envoy's default `jwt_cache_size`.
pub const DEFAULT_CAPACITY: usize = 100;

/// One verified token.
struct Entry {
    /// The set that verified the signature.
    keys: Arc<KeySet>,
    /// The token's `exp` (Unix seconds, clock skew included), if it has one.
    expires: Option<i64>,
    /// The token decoded, so that a hit decodes nothing.
    parsed: Arc<ParsedToken>,
}

/// A bounded cache of verified tokens (no capacity: nothing is cached).
pub struct VerifiedTokens {
    entries: Option<Mutex<lru::LruCache<Box<str>, Entry>>>,
}

impl std::fmt::Debug for VerifiedTokens {
    // Never the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedTokens")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        VerifiedTokens::new(DEFAULT_CAPACITY)
    }
}

impl VerifiedTokens {
    /// A cache of at most `capacity` tokens (0: none).
    pub fn new(capacity: usize) -> VerifiedTokens {
        VerifiedTokens {
            entries: NonZeroUsize::new(capacity).map(|c| Mutex::new(lru::LruCache::new(c))),
        }
    }

    pub fn capacity(&self) -> usize {
        self.entries
            .as_ref()
            .map_or(0, |e| self.lock(e).cap().get())
    }

    fn lock<'a>(
        &self,
        entries: &'a Mutex<lru::LruCache<Box<str>, Entry>>,
    ) -> std::sync::MutexGuard<'a, lru::LruCache<Box<str>, Entry>> {
        entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `keys` verified `token`'s signature before, and the token
    /// has not expired (`now`, Unix seconds). An entry for other keys, or
    /// expired, is removed.
    pub fn verified(&self, token: &str, keys: &Arc<KeySet>, now: i64) -> bool {
        let Some(entries) = &self.entries else {
            return false;
        };
        let mut entries = self.lock(entries);
        let Some(entry) = entries.get(token) else {
            return false;
        };
        if Arc::ptr_eq(&entry.keys, keys) && entry.expires.is_none_or(|exp| exp >= now) {
            return true;
        }
        entries.pop(token);
        false
    }

    /// Records that `keys` verified `token`, which expires at `expires`
    /// and decodes as `parsed`.
    pub(crate) fn insert(
        &self,
        token: &str,
        keys: Arc<KeySet>,
        expires: Option<i64>,
        parsed: Arc<ParsedToken>,
    ) {
        if let Some(entries) = &self.entries {
            let entry = Entry {
                keys,
                expires,
                parsed,
            };
            self.lock(entries).put(token.into(), entry);
        }
    }

    /// `token` decoded, if it is cached (whatever its keys or `exp`: it
    /// decodes the same either way, and is checked as any other).
    pub(crate) fn parsed(&self, token: &str) -> Option<Arc<ParsedToken>> {
        let entries = self.entries.as_ref()?;
        self.lock(entries).peek(token).map(|e| e.parsed.clone())
    }

    /// Forgets `token` (its signature failed with the keys in force).
    pub fn evict(&self, token: &str) {
        if let Some(entries) = &self.entries {
            self.lock(entries).pop(token);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, |e| self.lock(e).len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed() -> Arc<ParsedToken> {
        Arc::default()
    }

    fn keys() -> Arc<KeySet> {
        Arc::new(KeySet::new(&jsonwebtoken::jwk::JwkSet { keys: vec![] }))
    }

    #[test]
    fn a_hit_needs_the_same_keys_and_an_unexpired_token() {
        let cache = VerifiedTokens::new(10);
        let (k1, k2) = (keys(), keys());
        cache.insert("t", k1.clone(), Some(100), parsed());
        assert!(cache.verified("t", &k1, 50));
        assert!(
            cache.verified("t", &k1, 100),
            "exp is inclusive, as check_time"
        );
        assert!(!cache.verified("other", &k1, 50), "only that exact token");
        // Other keys (a refreshed JWKS): a miss, and the entry is gone.
        assert!(!cache.verified("t", &k2, 50));
        assert!(!cache.verified("t", &k1, 50), "evicted by the miss");
        // Past its exp: a miss, and gone.
        cache.insert("t", k1.clone(), Some(100), parsed());
        assert!(!cache.verified("t", &k1, 101));
        assert!(cache.is_empty());
        // A token without exp stays valid as long as its keys do.
        cache.insert("forever", k1.clone(), None, parsed());
        assert!(cache.verified("forever", &k1, i64::MAX));
        cache.evict("forever");
        assert!(!cache.verified("forever", &k1, 0));
    }

    #[test]
    fn the_cache_is_bounded_least_recently_used_first_out() {
        let cache = VerifiedTokens::new(2);
        let k = keys();
        cache.insert("a", k.clone(), None, parsed());
        cache.insert("b", k.clone(), None, parsed());
        assert!(cache.verified("a", &k, 0), "a used: b is now the oldest");
        cache.insert("c", k.clone(), None, parsed());
        assert_eq!(cache.len(), 2);
        assert!(!cache.verified("b", &k, 0), "b went out");
        assert!(cache.verified("a", &k, 0) && cache.verified("c", &k, 0));
    }

    #[test]
    fn a_cached_token_is_kept_decoded_whatever_its_keys() {
        let cache = VerifiedTokens::new(10);
        let decoded = parsed();
        cache.insert("t", keys(), Some(100), decoded.clone());
        let hit = cache.parsed("t").expect("cached");
        assert!(Arc::ptr_eq(&hit, &decoded));
        assert!(cache.parsed("other").is_none());
        cache.evict("t");
        assert!(cache.parsed("t").is_none(), "gone with its entry");
    }

    #[test]
    fn no_capacity_caches_nothing() {
        let cache = VerifiedTokens::new(0);
        let k = keys();
        cache.insert("a", k.clone(), None, parsed());
        assert!(!cache.verified("a", &k, 0));
        assert_eq!(cache.capacity(), 0);
    }
}
