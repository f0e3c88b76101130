//! JSON Web Key Sets: inline from the policy, or fetched from `jwksUri`
//! through a [`JwksFetcher`] and cached.
//!
//! The policy crate does no I/O itself: whoever embeds it (the proxy, the
//! CLI) supplies the fetcher. Keys are refreshed when they are older than the
//! cache lifetime, and early when a token names a key id the cached set does
//! not have (key rotation), at most once per refresh interval so a stream of
//! bogus `kid`s cannot turn into a stream of fetches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;

/// How long fetched keys are used before they are fetched again (Envoy's default).
pub const DEFAULT_CACHE_DURATION: Duration = Duration::from_secs(300);
/// The least time between two fetches of one URI triggered by unknown key ids.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Fetches the body of a `jwksUri`. Implementations should time out.
pub trait JwksFetcher: Send + Sync {
    fn fetch(&self, uri: &str) -> Result<String, FetchError>;
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("fetching {uri}: {reason}")]
pub struct FetchError {
    pub uri: String,
    pub reason: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("not a JSON Web Key Set: {0}")]
    Parse(String),
    #[error("the key set has no keys")]
    Empty,
}

/// Parses a JWKS document (`{"keys":[...]}`), or a single JWK as Istio also accepts.
pub fn parse_jwks(text: &str) -> Result<JwkSet, JwksError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| JwksError::Parse(e.to_string()))?;
    // A single key (an object with "kty" and no "keys") is accepted as a set of one.
    let is_single_key = value.get("keys").is_none() && value.get("kty").is_some();
    let set = if is_single_key {
        serde_json::from_value::<jsonwebtoken::jwk::Jwk>(value)
            .map(|key| JwkSet { keys: vec![key] })
            .map_err(|e| JwksError::Parse(e.to_string()))?
    } else {
        serde_json::from_value::<JwkSet>(value).map_err(|e| JwksError::Parse(e.to_string()))?
    };
    if set.keys.is_empty() {
        return Err(JwksError::Empty);
    }
    Ok(set)
}

struct Entry {
    keys: Option<Arc<JwkSet>>,
    fetched_at: Instant,
}

/// Keys fetched from `jwksUri`s, shared by every workload of a process.
pub struct JwksCache {
    fetcher: Option<Arc<dyn JwksFetcher>>,
    entries: Mutex<HashMap<String, Entry>>,
    cache_duration: Duration,
    min_refresh_interval: Duration,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("has_fetcher", &self.fetcher.is_some())
            .field("cache_duration", &self.cache_duration)
            .finish()
    }
}

impl Default for JwksCache {
    fn default() -> Self {
        JwksCache::new(None)
    }
}

impl JwksCache {
    /// A cache that fetches with `fetcher`; `None` means no remote keys at all
    /// (tokens for a `jwksUri`-only issuer then fail verification).
    pub fn new(fetcher: Option<Arc<dyn JwksFetcher>>) -> JwksCache {
        JwksCache::with_timing(fetcher, DEFAULT_CACHE_DURATION, MIN_REFRESH_INTERVAL)
    }

    pub fn with_timing(
        fetcher: Option<Arc<dyn JwksFetcher>>,
        cache_duration: Duration,
        min_refresh_interval: Duration,
    ) -> JwksCache {
        JwksCache {
            fetcher,
            entries: Mutex::new(HashMap::new()),
            cache_duration,
            min_refresh_interval,
        }
    }

    /// The keys for `uri`, fetching them when absent or expired. `Err` says why none are usable.
    pub fn keys(&self, uri: &str) -> Result<Arc<JwkSet>, String> {
        if let Some(keys) = self.cached(uri, self.cache_duration) {
            return Ok(keys);
        }
        self.fetch(uri)
    }

    /// Fetches again because a token named a key id the cached set lacks,
    /// unless the last fetch was too recent. Returns the (possibly new) keys.
    pub fn refresh_for_unknown_kid(&self, uri: &str) -> Option<Arc<JwkSet>> {
        if let Some(keys) = self.cached(uri, self.min_refresh_interval) {
            return Some(keys);
        }
        self.fetch(uri).ok()
    }

    fn cached(&self, uri: &str, max_age: Duration) -> Option<Arc<JwkSet>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(uri)?;
        if entry.fetched_at.elapsed() < max_age {
            entry.keys.clone()
        } else {
            None
        }
    }

    fn fetch(&self, uri: &str) -> Result<Arc<JwkSet>, String> {
        let Some(fetcher) = &self.fetcher else {
            return Err(format!("no fetcher configured for jwksUri {uri}"));
        };
        // Not holding the lock while fetching: other URIs stay usable.
        let result = fetcher
            .fetch(uri)
            .map_err(|e| e.to_string())
            .and_then(|body| parse_jwks(&body).map_err(|e| format!("{uri}: {e}")))
            .map(Arc::new);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(keys) => {
                entries.insert(
                    uri.to_owned(),
                    Entry {
                        keys: Some(keys.clone()),
                        fetched_at: Instant::now(),
                    },
                );
            }
            Err(_) => {
                // Keep serving the last good keys; remember the attempt so a
                // failing endpoint is not hammered.
                let entry = entries.entry(uri.to_owned()).or_insert(Entry {
                    keys: None,
                    fetched_at: Instant::now(),
                });
                entry.fetched_at = Instant::now();
                if let Some(keys) = &entry.keys {
                    return Ok(keys.clone());
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    struct Counting(AtomicUsize, Result<String, ()>);
    impl JwksFetcher for Counting {
        fn fetch(&self, uri: &str) -> Result<String, FetchError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.clone().map_err(|_| FetchError {
                uri: uri.into(),
                reason: "down".into(),
            })
        }
    }

    #[test]
    fn parses_sets_and_single_keys() {
        assert_eq!(parse_jwks(JWKS).map(|s| s.keys.len()).ok(), Some(1));
        let single = r#"{"kty":"oct","k":"c2VjcmV0","kid":"h"}"#;
        assert_eq!(parse_jwks(single).map(|s| s.keys.len()).ok(), Some(1));
        assert!(parse_jwks(r#"{"keys":[]}"#).is_err());
        assert!(parse_jwks("not json").is_err());
        assert!(parse_jwks(r#"{"keys":"nope"}"#).is_err());
        assert!(parse_jwks(r#"{"foo":1}"#).is_err());
    }

    #[test]
    fn caches_and_rate_limits_refreshes() {
        let fetcher = Arc::new(Counting(AtomicUsize::new(0), Ok(JWKS.into())));
        let cache = JwksCache::new(Some(fetcher.clone()));
        assert!(cache.keys("http://x/jwks").is_ok());
        assert!(cache.keys("http://x/jwks").is_ok());
        assert_eq!(fetcher.0.load(Ordering::SeqCst), 1);
        // Within the refresh interval an unknown kid does not refetch.
        assert!(cache.refresh_for_unknown_kid("http://x/jwks").is_some());
        assert_eq!(fetcher.0.load(Ordering::SeqCst), 1);
        let eager = JwksCache::with_timing(
            Some(fetcher.clone()),
            DEFAULT_CACHE_DURATION,
            Duration::ZERO,
        );
        assert!(eager.keys("http://y/jwks").is_ok());
        assert!(eager.refresh_for_unknown_kid("http://y/jwks").is_some());
        assert_eq!(fetcher.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn failing_fetch_is_an_error_not_a_panic() {
        let fetcher = Arc::new(Counting(AtomicUsize::new(0), Err(())));
        let cache = JwksCache::new(Some(fetcher));
        assert!(cache.keys("http://down/jwks").is_err());
        assert!(JwksCache::new(None).keys("http://x").is_err());
    }
}
