//! meshward bootstrap tokens: how a new workload proves who it is the first
//! time it asks the CA for a certificate.
//!
//! A token is a JWT (ES256) signed with the control plane's token key
//! (`token-key.pem`, mode 0600), naming one workload identity, for this CA
//! only, with an expiry and an id (`jti`) that `meshward revoke token`
//! names. Whoever holds it can get that identity's certificate until it
//! expires — or once, for a single-use token — so it is printed once and
//! never logged.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};

use crate::pem::{self, PemError};
use crate::spiffe::SpiffeId;

pub const TOKEN_KEY: &str = "token-key.pem";
/// Who signs and who accepts these tokens: nothing else should.
const ISSUER: &str = "meshward";
const AUDIENCE: &str = "meshward-ca";
/// Tokens are for bootstrapping: an hour unless asked.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// A token is a bearer credential for an identity: a day at most.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] PemError),
    #[error("the token key is unusable: {0}")]
    Key(String),
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token is expired")]
    Expired,
    #[error("a token may live at most {max:?}; asked for {asked:?}")]
    TooLong { asked: Duration, max: Duration },
    #[error("the token was made for {found}, not for this mesh ({expected})")]
    WrongTrustDomain { found: String, expected: String },
}

/// How often a token may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uses {
    /// Until it expires.
    Reusable,
    /// Once: the server records its id when it is used.
    Once,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    /// The workload's SPIFFE ID.
    sub: String,
    iat: u64,
    exp: u64,
    /// The token's id: random, what revocation and single use record.
    /// Tokens made before ids existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    /// meshward's own claim: the server accepts the token once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    single_use: bool,
}

/// A token just made, and its id.
#[derive(Debug)]
pub struct NewToken {
    pub token: String,
    pub id: String,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub identity: SpiffeId,
    pub id: Option<String>,
    pub uses: Uses,
    /// Unix seconds.
    pub expires: u64,
}

/// Signs and checks bootstrap tokens.
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    trust_domain: String,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenAuthority {
    /// Loads the token key from `dir`, creating it (0600) on first use.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<TokenAuthority, TokenError> {
        let path = dir.join(TOKEN_KEY);
        let key_pem = if path.exists() {
            std::fs::read_to_string(&path).map_err(pem::io(&path))?
        } else {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| TokenError::Key(e.to_string()))?;
            let pem_text = key.serialize_pem();
            pem::write_private(&path, &pem_text)?;
            pem_text
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| TokenError::Key(format!("{}: {e}", path.display())))?;
        let encoding = EncodingKey::from_ec_pem(key_pem.as_bytes())
            .map_err(|e| TokenError::Key(e.to_string()))?;
        let decoding = DecodingKey::from_ec_pem(key.public_key_pem().as_bytes())
            .map_err(|e| TokenError::Key(e.to_string()))?;
        Ok(TokenAuthority {
            encoding,
            decoding,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// A reusable token for `identity`, valid for `ttl`.
    pub fn create(&self, identity: &SpiffeId, ttl: Duration) -> Result<String, TokenError> {
        self.issue(identity, ttl, Uses::Reusable).map(|t| t.token)
    }

    /// A token for `identity`, valid for `ttl`, used as `uses` says, with a
    /// fresh random id.
    pub fn issue(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
        uses: Uses,
    ) -> Result<NewToken, TokenError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(TokenError::WrongTrustDomain {
                found: identity.trust_domain().to_owned(),
                expected: self.trust_domain.clone(),
            });
        }
        if ttl > MAX_TOKEN_TTL || ttl.is_zero() {
            return Err(TokenError::TooLong {
                asked: ttl,
                max: MAX_TOKEN_TTL,
            });
        }
        let iat = now();
        let id = hex::encode(rand::random::<[u8; 16]>());
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: identity.to_string(),
            iat,
            exp: iat + ttl.as_secs(),
            jti: Some(id.clone()),
            single_use: uses == Uses::Once,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .map_err(|e| TokenError::Key(e.to_string()))?;
        Ok(NewToken { token, id })
    }

    /// The identity a token proves, if it is ours, unexpired and for this mesh.
    pub fn verify(&self, token: &str) -> Result<SpiffeId, TokenError> {
        self.verify_claims(token).map(|t| t.identity)
    }

    /// Everything a token says, if it is ours, unexpired and for this mesh.
    /// Whether its id is revoked or already used is for the caller to check.
    pub fn verify_claims(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                other => TokenError::Invalid(format!("{other:?}")),
            },
        )?;
        // Tokens minted elsewhere with this key still obey the lifetime cap.
        if data.claims.exp.saturating_sub(data.claims.iat) > MAX_TOKEN_TTL.as_secs()
            || data.claims.iat > now() + 60
        {
            return Err(TokenError::Invalid(
                "lifetime longer than a day, or issued in the future".into(),
            ));
        }
        let id =
            SpiffeId::parse(&data.claims.sub).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(TokenError::WrongTrustDomain {
                found: id.trust_domain().to_owned(),
                expected: self.trust_domain.clone(),
            });
        }
        let jti = data.claims.jti;
        if let Some(jti) = &jti {
            crate::revocation::canonical(meshward_api::resources::RevocationKind::Token, jti)
                .map_err(|e| TokenError::Invalid(e.to_string()))?;
        }
        if data.claims.single_use && jti.is_none() {
            return Err(TokenError::Invalid(
                "a single-use token without an id".into(),
            ));
        }
        Ok(VerifiedToken {
            identity: id,
            id: jti,
            uses: if data.claims.single_use {
                Uses::Once
            } else {
                Uses::Reusable
            },
            expires: data.claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(dir: &Path) -> TokenAuthority {
        TokenAuthority::load_or_create(dir, "cluster.local").unwrap()
    }

    #[test]
    fn round_trip_and_key_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let id = SpiffeId::istio("cluster.local", "foo", "bar").unwrap();
        let token = authority(dir.path())
            .create(&id, DEFAULT_TOKEN_TTL)
            .unwrap();
        // A restarted authority (same key file) accepts it.
        assert_eq!(authority(dir.path()).verify(&token).unwrap(), id);
        let claims = authority(dir.path()).verify_claims(&token).unwrap();
        assert_eq!(claims.uses, Uses::Reusable);
        assert_eq!(claims.id.as_ref().map(String::len), Some(32), "a random id");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(TOKEN_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn refuses_expired_forged_and_foreign_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let a = authority(dir.path());
        let id = SpiffeId::istio("cluster.local", "foo", "bar").unwrap();
        // Expired: made with an exp in the past.
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: id.to_string(),
            iat: 1,
            exp: 2,
            jti: None,
            single_use: false,
        };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &a.encoding).unwrap();
        assert!(matches!(a.verify(&expired), Err(TokenError::Expired)));
        // Wrong audience.
        let claims = Claims {
            iss: ISSUER.into(),
            aud: "someone-else".into(),
            sub: id.to_string(),
            iat: now(),
            exp: now() + 60,
            jti: None,
            single_use: false,
        };
        let wrong_aud =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &a.encoding).unwrap();
        assert!(matches!(a.verify(&wrong_aud), Err(TokenError::Invalid(_))));
        // Forged: signed by another mesh's key.
        let other = tempfile::tempdir().unwrap();
        let forged = authority(other.path())
            .create(&id, DEFAULT_TOKEN_TTL)
            .unwrap();
        assert!(matches!(a.verify(&forged), Err(TokenError::Invalid(_))));
        // Garbage.
        assert!(a.verify("not.a.token").is_err());
        // Lifetimes beyond a day are refused when made and when checked.
        assert!(matches!(
            a.create(&id, Duration::from_secs(25 * 3600)),
            Err(TokenError::TooLong { .. })
        ));
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: id.to_string(),
            iat: now(),
            exp: now() + 30 * 24 * 3600,
            jti: None,
            single_use: false,
        };
        let long =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &a.encoding).unwrap();
        assert!(matches!(a.verify(&long), Err(TokenError::Invalid(_))));
        // Another trust domain cannot even be asked for.
        let foreign = SpiffeId::istio("other.td", "foo", "bar").unwrap();
        assert!(matches!(
            a.create(&foreign, DEFAULT_TOKEN_TTL),
            Err(TokenError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn single_use_tokens_say_so_and_every_token_has_its_own_id() {
        let dir = tempfile::tempdir().unwrap();
        let a = authority(dir.path());
        let id = SpiffeId::istio("cluster.local", "foo", "bar").unwrap();
        let once = a.issue(&id, DEFAULT_TOKEN_TTL, Uses::Once).unwrap();
        let claims = a.verify_claims(&once.token).unwrap();
        assert_eq!(claims.uses, Uses::Once);
        assert_eq!(claims.id.as_deref(), Some(once.id.as_str()));
        assert_eq!(claims.identity, id);
        let again = a.issue(&id, DEFAULT_TOKEN_TTL, Uses::Once).unwrap();
        assert_ne!(again.id, once.id);
        // A single-use claim without an id cannot be honoured: refused.
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: id.to_string(),
            iat: now(),
            exp: now() + 60,
            jti: None,
            single_use: true,
        };
        let no_id =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &a.encoding).unwrap();
        assert!(matches!(
            a.verify_claims(&no_id),
            Err(TokenError::Invalid(_))
        ));
    }
}
