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

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// How long fetched keys are used before they are fetched again (Envoy's default).
pub const DEFAULT_CACHE_DURATION: Duration = Duration::from_secs(300);
/// The least time between two fetches of one URI (after a failure, or
/// triggered by unknown key ids).
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// How long keys are still used while their endpoint keeps failing.
pub const MAX_STALE: Duration = Duration::from_secs(3600);
/// Istio's default `jwtRules[].timeout`.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches the body of a `jwksUri`, giving up after `timeout`.
pub trait JwksFetcher: Send + Sync {
    fn fetch(&self, uri: &str, timeout: Duration) -> Result<String, FetchError>;
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

/// One JWK, ready to verify: which tokens it may verify, and its key decoded
/// once rather than per request.
pub struct PreparedKey {
    kid: Option<String>,
    /// The `alg` the key states, as written; such a key serves only that algorithm.
    stated_alg: Option<String>,
    /// `use: enc`: never used to verify a signature.
    encryption: bool,
    /// The algorithms the key's type can verify.
    algorithms: Vec<Algorithm>,
    key: Option<DecodingKey>,
    /// The key parsed once per algorithm it can verify, so a request pays
    /// only for the signature check (parsing an RSA key from its JWK
    /// components costs as much as verifying with it).
    parsed: Vec<(Algorithm, aws_lc_rs::signature::ParsedPublicKey)>,
}

/// The key of `jwk`, parsed for each algorithm in `algorithms` that aws-lc
/// verifies directly (RS*, PS*, ES256, ES384). Others are left to
/// jsonwebtoken.
fn parse_key(
    jwk: &jsonwebtoken::jwk::Jwk,
    algorithms: &[Algorithm],
) -> Vec<(Algorithm, aws_lc_rs::signature::ParsedPublicKey)> {
    use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaPublicKeyComponents};
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decode = |s: &str| b64.decode(s.trim_end_matches('=')).ok();
    let mut out = Vec::new();
    match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let (Some(n), Some(e)) = (decode(&rsa.n), decode(&rsa.e)) else {
                return out;
            };
            let components = RsaPublicKeyComponents {
                n: &n[..],
                e: &e[..],
            };
            for alg in algorithms {
                let params: &'static sig::RsaParameters = match alg {
                    Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
                    Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
                    Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
                    Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
                    Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
                    _ => continue,
                };
                if let Ok(parsed) = components.to_parsed_public_key(params) {
                    out.push((*alg, parsed));
                }
            }
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            let (Some(x), Some(y)) = (decode(&ec.x), decode(&ec.y)) else {
                return out;
            };
            let (alg, verification): (Algorithm, &'static sig::EcdsaVerificationAlgorithm) =
                match ec.curve {
                    EllipticCurve::P256 => (Algorithm::ES256, &sig::ECDSA_P256_SHA256_FIXED),
                    EllipticCurve::P384 => (Algorithm::ES384, &sig::ECDSA_P384_SHA384_FIXED),
                    _ => return out,
                };
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            if algorithms.contains(&alg)
                && let Ok(parsed) = ParsedPublicKey::new(verification, &point)
            {
                out.push((alg, parsed));
            }
        }
        _ => {}
    }
    out
}

/// A key set ready to verify tokens.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<PreparedKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<Option<&str>> = self.keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

impl KeySet {
    pub fn new(set: &JwkSet) -> KeySet {
        use Algorithm::*;
        let keys = set
            .keys
            .iter()
            .map(|jwk| {
                let algorithms = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
                    AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                        EllipticCurve::P256 => vec![ES256],
                        EllipticCurve::P384 => vec![ES384],
                        _ => vec![],
                    },
                    AlgorithmParameters::OctetKeyPair(_) => vec![EdDSA],
                    AlgorithmParameters::OctetKey(_) => vec![HS256, HS384, HS512],
                    _ => vec![],
                };
                PreparedKey {
                    parsed: parse_key(jwk, &algorithms),
                    kid: jwk.common.key_id.clone(),
                    stated_alg: jwk.common.key_algorithm.map(|a| a.to_string()),
                    encryption: matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)),
                    algorithms,
                    key: DecodingKey::from_jwk(jwk).ok(),
                }
            })
            .collect();
        KeySet { keys }
    }

    /// Verifies a token's signature as Envoy's `verifyJwt`. A key is a
    /// candidate unless it and the token name different `kid`s, or it states
    /// an `alg` other than the token's, or it is an encryption key. A
    /// candidate verifies only an algorithm its key type allows, so an RSA
    /// public key is never used as an HMAC secret and `none` never verifies.
    /// `Ok(false)`: no candidate; `Err(())`: candidates, none verified.
    pub fn verify(&self, token: &str, kid: Option<&str>, alg: Algorithm) -> Result<(), bool> {
        let Some((message, signature)) = token.rsplit_once('.') else {
            return Err(false);
        };
        let alg_name = format!("{alg:?}");
        let mut candidate = false;
        for k in &self.keys {
            if let (Some(kid), Some(key_id)) = (kid, &k.kid)
                && kid != key_id
            {
                continue;
            }
            if k.stated_alg
                .as_ref()
                .is_some_and(|stated| *stated != alg_name)
                || k.encryption
            {
                continue;
            }
            candidate = true;
            if !k.algorithms.contains(&alg) {
                continue;
            }
            if let Some((_, parsed)) = k.parsed.iter().find(|(a, _)| *a == alg) {
                use base64::Engine as _;
                let verified = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(signature)
                    .is_ok_and(|sig| parsed.verify_sig(message.as_bytes(), &sig).is_ok());
                if verified {
                    return Ok(());
                }
                continue;
            }
            let Some(key) = &k.key else { continue };
            if jsonwebtoken::crypto::verify(signature, message.as_bytes(), key, alg)
                .unwrap_or(false)
            {
                return Ok(());
            }
        }
        Err(candidate)
    }
}

struct Entry {
    /// The last keys fetched successfully.
    keys: Option<Arc<KeySet>>,
    /// When `keys` were fetched.
    fetched_at: Option<Instant>,
    /// When the last fetch started, successful or not. Set before fetching,
    /// so concurrent callers do not start the same fetch again.
    attempted_at: Instant,
}

/// Keys fetched from `jwksUri`s, shared by every workload of a process,
/// and the tokens those (and inline) keys verified
/// ([`super::verified::VerifiedTokens`]).
pub struct JwksCache {
    fetcher: Option<Arc<dyn JwksFetcher>>,
    entries: Mutex<HashMap<String, Entry>>,
    cache_duration: Duration,
    min_refresh_interval: Duration,
    verified: super::verified::VerifiedTokens,
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

/// What to do about a URI, decided under the lock.
enum Plan {
    Use(Arc<KeySet>),
    Refuse(String),
    Fetch,
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
            verified: super::verified::VerifiedTokens::default(),
        }
    }

    /// This cache, remembering at most `capacity` verified tokens (0:
    /// none; Envoy's `jwt_cache_size`, 100 by default).
    pub fn with_verified_tokens(mut self, capacity: usize) -> JwksCache {
        self.verified = super::verified::VerifiedTokens::new(capacity);
        self
    }

    /// The tokens whose signature verified.
    pub fn verified_tokens(&self) -> &super::verified::VerifiedTokens {
        &self.verified
    }

    /// The keys for `uri`: cached while fresh, fetched when absent or
    /// expired. A failing endpoint is retried at most once per refresh
    /// interval; meanwhile its last keys are used, for up to [`MAX_STALE`].
    pub fn keys(&self, uri: &str, timeout: Duration) -> Result<Arc<KeySet>, String> {
        match self.plan(uri, self.cache_duration) {
            Plan::Use(keys) => Ok(keys),
            Plan::Refuse(why) => Err(why),
            Plan::Fetch => self.fetch(uri, timeout),
        }
    }

    /// Fetches again because a token named a key id the cached set lacks,
    /// unless the last fetch was too recent. Returns the (possibly new) keys.
    pub fn refresh_for_unknown_kid(&self, uri: &str, timeout: Duration) -> Option<Arc<KeySet>> {
        match self.plan(uri, Duration::ZERO) {
            Plan::Use(keys) => Some(keys),
            Plan::Refuse(_) => None,
            Plan::Fetch => self.fetch(uri, timeout).ok(),
        }
    }

    /// Keys younger than `max_age` are used; otherwise a fetch is due unless
    /// one started within the refresh interval, in which case the last keys
    /// (if not too stale) or a refusal stand.
    fn plan(&self, uri: &str, max_age: Duration) -> Plan {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(entry) = entries.get_mut(uri) {
            let fresh = entry
                .fetched_at
                .is_some_and(|t| now.duration_since(t) < max_age);
            if let (true, Some(keys)) = (fresh, &entry.keys) {
                return Plan::Use(keys.clone());
            }
            if now.duration_since(entry.attempted_at) < self.min_refresh_interval {
                let usable = entry
                    .fetched_at
                    .is_some_and(|t| now.duration_since(t) < MAX_STALE);
                return match (&entry.keys, usable) {
                    (Some(keys), true) => Plan::Use(keys.clone()),
                    _ => Plan::Refuse(format!("{uri}: the last fetch failed; retrying later")),
                };
            }
            entry.attempted_at = now;
        } else {
            entries.insert(
                uri.to_owned(),
                Entry {
                    keys: None,
                    fetched_at: None,
                    attempted_at: now,
                },
            );
        }
        Plan::Fetch
    }

    fn fetch(&self, uri: &str, timeout: Duration) -> Result<Arc<KeySet>, String> {
        let Some(fetcher) = &self.fetcher else {
            return Err(format!("no fetcher configured for jwksUri {uri}"));
        };
        // The lock is not held while fetching: other URIs stay usable.
        let result = fetcher
            .fetch(uri, timeout)
            .map_err(|e| e.to_string())
            .and_then(|body| parse_jwks(&body).map_err(|e| format!("{uri}: {e}")))
            .map(|set| Arc::new(KeySet::new(&set)));
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(uri.to_owned()).or_insert(Entry {
            keys: None,
            fetched_at: None,
            attempted_at: Instant::now(),
        });
        match result {
            Ok(keys) => {
                entry.keys = Some(keys.clone());
                entry.fetched_at = Some(Instant::now());
                Ok(keys)
            }
            Err(e) => match (&entry.keys, entry.fetched_at) {
                (Some(keys), Some(t)) if t.elapsed() < MAX_STALE => Ok(keys.clone()),
                _ => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    struct Counting(AtomicUsize, Result<String, ()>);
    impl JwksFetcher for Counting {
        fn fetch(&self, uri: &str, _timeout: Duration) -> Result<String, FetchError> {
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
        assert!(cache.keys("http://x/jwks", DEFAULT_FETCH_TIMEOUT).is_ok());
        assert!(cache.keys("http://x/jwks", DEFAULT_FETCH_TIMEOUT).is_ok());
        assert_eq!(fetcher.0.load(Ordering::SeqCst), 1);
        // Within the refresh interval an unknown kid does not refetch.
        assert!(
            cache
                .refresh_for_unknown_kid("http://x/jwks", DEFAULT_FETCH_TIMEOUT)
                .is_some()
        );
        assert_eq!(fetcher.0.load(Ordering::SeqCst), 1);
        let eager = JwksCache::with_timing(
            Some(fetcher.clone()),
            DEFAULT_CACHE_DURATION,
            Duration::ZERO,
        );
        assert!(eager.keys("http://y/jwks", DEFAULT_FETCH_TIMEOUT).is_ok());
        assert!(
            eager
                .refresh_for_unknown_kid("http://y/jwks", DEFAULT_FETCH_TIMEOUT)
                .is_some()
        );
        assert_eq!(fetcher.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_failing_endpoint_is_not_hammered() {
        let fetcher = Arc::new(Counting(AtomicUsize::new(0), Err(())));
        let cache = JwksCache::new(Some(fetcher.clone()));
        for _ in 0..100 {
            assert!(
                cache
                    .keys("http://down/jwks", DEFAULT_FETCH_TIMEOUT)
                    .is_err()
            );
            assert!(
                cache
                    .refresh_for_unknown_kid("http://down/jwks", DEFAULT_FETCH_TIMEOUT)
                    .is_none()
            );
        }
        assert_eq!(
            fetcher.0.load(Ordering::SeqCst),
            1,
            "one fetch per refresh interval"
        );
        assert!(
            JwksCache::new(None)
                .keys("http://x", DEFAULT_FETCH_TIMEOUT)
                .is_err()
        );
    }
}
