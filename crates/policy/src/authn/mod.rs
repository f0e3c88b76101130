//! Request authentication: finding, verifying and using JWTs, as Istio's
//! RequestAuthentication configures Envoy's `jwt_authn` filter.
//!
//! A request without a token passes (authorization decides whether that is
//! acceptable); a request with a token that no rule can verify is rejected
//! with 401 (403 when only the audience is wrong).

pub mod jwks;
mod principal;
mod token;
pub mod verified;

use std::sync::Arc;

use base64::Engine as _;

pub use jwks::{JwksCache, JwksFetcher};
pub use principal::JwtPrincipal;
use token::{Location, extract};

use crate::api::{JwtRule, RequestAuthentication};
use crate::request::HttpRequest;
use verified::VerifiedTokens;

/// Claims Envoy always treats as space-delimited lists when matching.
const SPACE_DELIMITED_DEFAULTS: [&str; 2] = ["permission", "scope"];
/// Clock skew allowed on `exp` and `nbf` (Envoy's default).
const CLOCK_SKEW_SECONDS: u64 = 60;

/// What request authentication concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthnOutcome {
    /// No token at any configured location (or no JWT rules apply, or a CORS preflight).
    NoToken,
    /// A token verified; the principal and the header changes to make upstream.
    Authenticated {
        principal: Box<JwtPrincipal>,
        headers: HeaderEdits,
    },
    /// A token was present and no rule accepted it.
    Failed(AuthnFailure),
}

/// Why a present token was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthnFailure {
    /// 401, or 403 for an audience mismatch (as Envoy).
    pub status: u16,
    /// Envoy's wording: "Jwt is expired", "Jwt verification fails", ...
    pub message: String,
}

impl AuthnFailure {
    fn unauthorized(message: impl Into<String>) -> Self {
        AuthnFailure {
            status: 401,
            message: message.into(),
        }
    }

    /// The `www-authenticate` value for the response, for the request's URI.
    /// As Envoy builds it: the original URI, with the path (query included)
    /// cut to 256 characters.
    pub fn www_authenticate(&self, request: &HttpRequest, scheme: &str) -> String {
        let mut end = request.path.len().min(256);
        while !request.path.is_char_boundary(end) {
            end -= 1;
        }
        let path = &request.path[..end];
        format!(
            "Bearer realm=\"{scheme}://{}{path}\", error=\"invalid_token\"",
            request.host
        )
    }
}

/// Header changes for the upstream request after successful authentication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Headers to remove (the token's header when not forwarded).
    pub remove: Vec<String>,
    /// Headers to set, replacing any value the client sent.
    pub set: Vec<(String, String)>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty()
    }

    pub fn apply(&self, request: &mut HttpRequest) {
        for name in &self.remove {
            request.remove_header(name);
        }
        for (name, value) in &self.set {
            request.set_header(name, value.clone());
        }
    }
}

/// A JWT rule ready to use: its key source and token locations.
#[derive(Debug, Clone)]
struct CompiledRule {
    rule: JwtRule,
    keys: KeySource,
    locations: Vec<Location>,
    space_delimited: Arc<[String]>,
}

#[derive(Debug, Clone)]
enum KeySource {
    Inline(Arc<jwks::KeySet>),
    Remote {
        uri: String,
        timeout: std::time::Duration,
    },
    /// Validation admits neither-set rules; tokens for them cannot verify.
    None,
}

/// The JWT rules of one workload (all applicable RequestAuthentications, merged).
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    rules: Vec<CompiledRule>,
    jwks: Arc<JwksCache>,
    /// Every header some rule writes from a verified token. A client must
    /// never be able to send one itself, so they are removed from every
    /// request before any are set (as Envoy sanitizes them).
    output_headers: Vec<String>,
}

impl Authenticator {
    /// Merges the rules of every applicable policy, sorted by issuer as Istio does.
    pub fn new(policies: &[&RequestAuthentication], jwks: Arc<JwksCache>) -> Authenticator {
        let mut rules: Vec<&JwtRule> = policies
            .iter()
            .flat_map(|p| p.spec.jwt_rules.iter())
            .collect();
        rules.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        let rules = rules
            .into_iter()
            .map(|rule| {
                let keys = if !rule.jwks.is_empty() {
                    match jwks::parse_jwks(&rule.jwks) {
                        Ok(set) => KeySource::Inline(Arc::new(jwks::KeySet::new(&set))),
                        Err(_) => KeySource::None,
                    }
                } else if !rule.jwks_uri.is_empty() {
                    KeySource::Remote {
                        uri: rule.jwks_uri.clone(),
                        timeout: rule
                            .timeout
                            .as_deref()
                            .and_then(|t| crate::duration::parse_timeout(t).ok())
                            .unwrap_or(jwks::DEFAULT_FETCH_TIMEOUT),
                    }
                } else {
                    KeySource::None
                };
                let mut space_delimited: Vec<String> = SPACE_DELIMITED_DEFAULTS
                    .iter()
                    .map(|s| s.to_string())
                    .chain(rule.space_delimited_claims.iter().cloned())
                    .collect();
                space_delimited.sort();
                space_delimited.dedup();
                CompiledRule {
                    locations: token::locations(rule),
                    rule: rule.clone(),
                    keys,
                    space_delimited: space_delimited.into(),
                }
            })
            .collect();
        let mut output_headers: Vec<String> = policies
            .iter()
            .flat_map(|p| p.spec.jwt_rules.iter())
            .flat_map(|r| {
                std::iter::once(r.output_payload_to_header.as_str())
                    .chain(r.output_claim_to_headers.iter().map(|c| c.header.as_str()))
            })
            .filter(|h| !h.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        output_headers.sort();
        output_headers.dedup();
        Authenticator {
            rules,
            jwks,
            output_headers,
        }
    }

    /// Headers only a verified token may set; strip them from every request.
    pub fn output_headers(&self) -> &[String] {
        &self.output_headers
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a rule looks for tokens anywhere but the default locations
    /// (`fromHeaders`, `fromParams` or `fromCookies` naming others). A
    /// decision record says only whether the `Authorization: Bearer`
    /// header held a token, so `meshward replay` cannot tell what an
    /// unverified request carried there.
    pub fn reads_tokens_elsewhere(&self) -> bool {
        let defaults = token::locations(&crate::api::JwtRule::default());
        self.rules
            .iter()
            .flat_map(|r| &r.locations)
            .any(|l| !defaults.contains(l))
    }

    /// Whether a rule takes tokens of `issuer` for one of `audiences`: the
    /// question `meshward replay` asks of a token verified when it was
    /// logged (its keys and times are not checked again; the token itself
    /// is never logged).
    pub fn accepts(&self, issuer: &str, audiences: &[String]) -> bool {
        self.rules.iter().any(|r| {
            r.rule.issuer == issuer
                && (r.rule.audiences.is_empty()
                    || r.rule.audiences.iter().any(|a| audiences.contains(a)))
        })
    }

    /// Authenticates one request as Envoy's `jwt_authn` does under the
    /// requirement Istio generates for these rules, plus one rule of
    /// meshward's: every token at any configured location must verify.
    ///
    /// Istio asks Envoy for `requires_any {rule, allow_missing}` with one
    /// rule, and `requires_any {R0, R1, .., requires_all {requires_any {Ri,
    /// allow_missing}, ..}}` with several (the outer list lets rules share a
    /// location). Each rule (an Envoy provider) verifies every token at its
    /// own locations, and succeeds only if all of them verify. So a request
    /// carrying a good token and a forged one at a rule's locations is
    /// refused, and the forged token never reaches the application.
    ///
    /// The outer list lets one rule's success stand although another rule's
    /// token failed: a good token in rule A's header next to a forged one in
    /// rule B's header would pass Envoy, forged token and all. meshward
    /// refuses that request: a token no successful rule vouches for fails
    /// the request, as Istio documents RequestAuthentication ("a request
    /// with an invalid token is rejected").
    pub fn authenticate(&self, request: &HttpRequest) -> AuthnOutcome {
        if self.rules.is_empty() || is_cors_preflight(request) {
            return AuthnOutcome::NoToken;
        }
        let mut parsed = ParsedTokens::new(self.jwks.verified_tokens());
        let verdicts: Vec<RuleVerdict> = self
            .rules
            .iter()
            .map(|rule| self.verify_rule(rule, extract(request, &rule.locations), &mut parsed))
            .collect();
        let Some(chosen) = verdicts.iter().position(RuleVerdict::verified) else {
            return match requirement_failure(&verdicts) {
                Some(failure) => AuthnOutcome::Failed(failure),
                None => AuthnOutcome::NoToken,
            };
        };
        if let Some(failure) = self.unvouched_token(&verdicts) {
            return AuthnOutcome::Failed(failure);
        }
        let rule = &self.rules[chosen].rule;
        match verdicts.into_iter().nth(chosen) {
            Some(RuleVerdict::Verified { tokens, principal }) => AuthnOutcome::Authenticated {
                headers: output_headers(rule, &tokens, &principal),
                principal: Box::new(principal),
            },
            // `chosen` is the position of a verified verdict.
            _ => AuthnOutcome::Failed(AuthnFailure::unauthorized("Jwt verification fails")),
        }
    }

    /// One rule over every token at its locations, as an Envoy provider
    /// verifies them: the last token found first, stopping at the first
    /// failure. When all verify, the first token found is the principal
    /// (Envoy's metadata holds the last one it verified).
    fn verify_rule(
        &self,
        rule: &CompiledRule,
        tokens: Vec<token::Found>,
        parsed: &mut ParsedTokens,
    ) -> RuleVerdict {
        for found in tokens.iter().rev() {
            if let Err(rejection) =
                self.verify_token(rule, &found.token, parsed.parse(&found.token))
            {
                return RuleVerdict::Failed { tokens, rejection };
            }
        }
        let Some(first) = tokens.first() else {
            return RuleVerdict::Missed;
        };
        let claims = match parsed.parse(&first.token) {
            Ok(token) => token.claims.clone(),
            // Verified above, so it parsed.
            Err(failure) => {
                return RuleVerdict::Failed {
                    rejection: Rejection::of(failure.clone()),
                    tokens,
                };
            }
        };
        RuleVerdict::Verified {
            principal: JwtPrincipal::new(claims, rule.space_delimited.clone()),
            tokens,
        }
    }

    /// One token with one rule, in Envoy's order: shape, issuer, time,
    /// audience, then signature — so the cheap checks say what is wrong
    /// before any key is needed.
    fn verify_token(
        &self,
        rule: &CompiledRule,
        token: &str,
        parsed: &Result<Arc<ParsedToken>, AuthnFailure>,
    ) -> Result<(), Rejection> {
        let parsed = parsed.as_ref().map_err(|f| Rejection::of(f.clone()))?;
        let issuer = parsed
            .claims
            .get("iss")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if !rule.rule.issuer.is_empty() && rule.rule.issuer != issuer {
            return Err(Rejection {
                failure: AuthnFailure::unauthorized("Jwt issuer is not configured"),
                unknown_issuer: true,
            });
        }
        self.verify_with_rule(token, parsed, rule)
            .map_err(Rejection::of)
    }

    /// With some rule verified: the failure of a rule whose token sits where
    /// no verified rule looks, if there is one (see [`Self::authenticate`]).
    fn unvouched_token(&self, verdicts: &[RuleVerdict]) -> Option<AuthnFailure> {
        let vouched = |location: &Location| {
            verdicts
                .iter()
                .zip(&self.rules)
                .any(|(v, rule)| v.verified() && rule.locations.contains(location))
        };
        verdicts.iter().find_map(|verdict| match verdict {
            RuleVerdict::Failed { tokens, rejection }
                if tokens.iter().any(|found| !vouched(&found.location)) =>
            {
                Some(rejection.failure.clone())
            }
            _ => None,
        })
    }

    /// Time, audience and signature, in Envoy's order, for one rule.
    fn verify_with_rule(
        &self,
        token: &str,
        parsed: &Arc<ParsedToken>,
        rule: &CompiledRule,
    ) -> Result<(), AuthnFailure> {
        let (header, claims) = (&parsed.header, &*parsed.claims);
        check_time(claims)?;
        check_audience(claims, &rule.rule.audiences)?;
        let keys = match &rule.keys {
            KeySource::Inline(keys) => keys.clone(),
            KeySource::Remote { uri, timeout } => self
                .jwks
                .keys(uri, *timeout)
                .map_err(|_| AuthnFailure::unauthorized("Jwks remote fetch is failed"))?,
            KeySource::None => return Err(VerifyError::NoKey.into_failure()),
        };
        // Shape, issuer, time and audience were checked above, hit or not.
        let verified = self.jwks.verified_tokens();
        if verified.verified(token, &keys, now()) {
            return Ok(());
        }
        let mut used = keys;
        let mut result = used.verify(token, header.kid.as_deref(), header.alg);
        if result == Err(false)
            && let KeySource::Remote { uri, timeout } = &rule.keys
            && let Some(fresh) = self.jwks.refresh_for_unknown_kid(uri, *timeout)
        {
            result = fresh.verify(token, header.kid.as_deref(), header.alg);
            used = fresh;
        }
        match result {
            // Valid until `exp` with the clock skew check_time allows.
            Ok(()) => verified.insert(
                token,
                used,
                expiry(claims).map(|exp| exp.saturating_add(CLOCK_SKEW_SECONDS as i64)),
                parsed.clone(),
            ),
            Err(_) => verified.evict(token),
        }
        result.map_err(|candidate| {
            if candidate {
                VerifyError::Failed
            } else {
                VerifyError::NoKey
            }
            .into_failure()
        })
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The token's `exp`, if it has a numeric one.
fn expiry(claims: &serde_json::Map<String, serde_json::Value>) -> Option<i64> {
    let exp = claims.get("exp")?;
    exp.as_i64().or(exp.as_f64().map(|f| f as i64))
}

/// `exp` and `nbf`, with Envoy's clock skew; both are optional.
fn check_time(claims: &serde_json::Map<String, serde_json::Value>) -> Result<(), AuthnFailure> {
    let number = |k: &str| {
        claims
            .get(k)
            .map(|v| v.as_i64().or(v.as_f64().map(|f| f as i64)))
    };
    let now = now();
    let skew = CLOCK_SKEW_SECONDS as i64;
    match number("nbf") {
        Some(None) => return Err(AuthnFailure::unauthorized("Jwt payload is an invalid JSON")),
        Some(Some(nbf)) if nbf > now.saturating_add(skew) => {
            return Err(AuthnFailure::unauthorized("Jwt not yet valid"));
        }
        _ => {}
    }
    match number("exp") {
        Some(None) => Err(AuthnFailure::unauthorized("Jwt payload is an invalid JSON")),
        Some(Some(exp)) if exp < now.saturating_sub(skew) => {
            Err(AuthnFailure::unauthorized("Jwt is expired"))
        }
        _ => Ok(()),
    }
}

/// Envoy's `CheckAudience`: when audiences are configured, one `aud` value
/// must equal one of them, comparing without an `http(s)://` scheme and a
/// trailing slash. A mismatch is 403, not 401.
fn check_audience(
    claims: &serde_json::Map<String, serde_json::Value>,
    configured: &[String],
) -> Result<(), AuthnFailure> {
    if configured.is_empty() {
        return Ok(());
    }
    fn canonical(aud: &str) -> &str {
        let aud = aud
            .strip_prefix("https://")
            .or_else(|| aud.strip_prefix("http://"))
            .unwrap_or(aud);
        aud.strip_suffix('/').unwrap_or(aud)
    }
    let token_auds: Vec<&str> = match claims.get("aud") {
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    if token_auds
        .iter()
        .any(|a| configured.iter().any(|c| canonical(a) == canonical(c)))
    {
        Ok(())
    } else {
        Err(AuthnFailure {
            status: 403,
            message: "Audiences in Jwt are not allowed".into(),
        })
    }
}

fn is_cors_preflight(request: &HttpRequest) -> bool {
    request.method == "OPTIONS"
        && request.header("origin").is_some_and(|v| !v.is_empty())
        && request
            .header("access-control-request-method")
            .is_some_and(|v| !v.is_empty())
}

enum VerifyError {
    /// No key has a compatible `kid` and `alg`.
    NoKey,
    /// A key matched by `kid`/`alg`, and the signature did not verify with it.
    Failed,
}

impl VerifyError {
    fn into_failure(self) -> AuthnFailure {
        match self {
            VerifyError::NoKey => {
                AuthnFailure::unauthorized("Jwks doesn't have key to match kid or alg from Jwt")
            }
            VerifyError::Failed => AuthnFailure::unauthorized("Jwt verification fails"),
        }
    }
}

/// Headers to set or remove upstream after `rule` verified every token in
/// `tokens`: each token's header goes unless forwarded, and the output
/// headers come from the principal's token, the first found.
fn output_headers(
    rule: &JwtRule,
    tokens: &[token::Found],
    principal: &JwtPrincipal,
) -> HeaderEdits {
    let mut edits = HeaderEdits::default();
    if !rule.forward_original_token {
        for header in tokens.iter().filter_map(|found| found.header.as_ref()) {
            if !edits.remove.contains(header) {
                edits.remove.push(header.clone());
            }
        }
    }
    if !rule.output_payload_to_header.is_empty()
        && let Some(found) = tokens.first()
    {
        let payload = found.token.split('.').nth(1).unwrap_or_default();
        edits.set.push((
            rule.output_payload_to_header.to_ascii_lowercase(),
            payload.trim_end_matches('=').to_owned(),
        ));
    }
    for c in &rule.output_claim_to_headers {
        if let Some(value) = principal.claim_for_header(&c.claim) {
            edits.set.push((c.header.to_ascii_lowercase(), value));
        }
    }
    edits
}

/// What one rule (an Envoy provider) concluded about the tokens at its
/// locations.
enum RuleVerdict {
    /// No token at any of its locations (Envoy's `JwtMissed`).
    Missed,
    /// Every token there verified.
    Verified {
        tokens: Vec<token::Found>,
        principal: JwtPrincipal,
    },
    /// A token there did not verify.
    Failed {
        tokens: Vec<token::Found>,
        rejection: Rejection,
    },
}

impl RuleVerdict {
    fn verified(&self) -> bool {
        matches!(self, RuleVerdict::Verified { .. })
    }
}

/// Why a rule refused a token, and whether only for its issuer (Envoy's
/// `JwtUnknownIssuer`, which `requires_any` ranks below other failures).
struct Rejection {
    failure: AuthnFailure,
    unknown_issuer: bool,
}

impl Rejection {
    fn of(failure: AuthnFailure) -> Rejection {
        Rejection {
            failure,
            unknown_issuer: false,
        }
    }
}

/// The failure Envoy answers with when no rule verified (none when every
/// rule found no token). `requires_all {requires_any {Ri, allow_missing}}`
/// fails with the first rule that failed; the outer `requires_any` then
/// reports the last failure that is neither a missing token nor an unknown
/// issuer among its children (the rules, then that `requires_all`), else
/// the first unknown issuer.
fn requirement_failure(verdicts: &[RuleVerdict]) -> Option<AuthnFailure> {
    let rejections: Vec<&Rejection> = verdicts
        .iter()
        .filter_map(|v| match v {
            RuleVerdict::Failed { rejection, .. } => Some(rejection),
            _ => None,
        })
        .collect();
    let requires_all = *rejections.first()?;
    let mut reported: Option<&Rejection> = None;
    for rejection in rejections.into_iter().chain([requires_all]) {
        if !rejection.unknown_issuer || reported.is_none() {
            reported = Some(rejection);
        }
    }
    reported.map(|r| r.failure.clone())
}

/// A token's header and claims, decoded once per request however many rules
/// look at it, and kept decoded while the token is in the verified-token
/// cache.
#[derive(Debug, Default)]
pub(crate) struct ParsedToken {
    pub(crate) header: jsonwebtoken::Header,
    pub(crate) claims: Arc<serde_json::Map<String, serde_json::Value>>,
}

/// Tokens decoded so far in one request. Not `Debug`: it holds tokens.
struct ParsedTokens<'a> {
    /// Tokens verified before, kept decoded.
    verified: &'a VerifiedTokens,
    parsed: Vec<(String, Result<Arc<ParsedToken>, AuthnFailure>)>,
}

impl<'a> ParsedTokens<'a> {
    fn new(verified: &'a VerifiedTokens) -> Self {
        ParsedTokens {
            verified,
            parsed: Vec::new(),
        }
    }

    /// `token` decoded: as the cache holds it if it verified before
    /// (decoding depends on its text alone), else now.
    fn parse(&mut self, token: &str) -> &Result<Arc<ParsedToken>, AuthnFailure> {
        let index = match self.parsed.iter().position(|(t, _)| t == token) {
            Some(index) => index,
            None => {
                let parsed = match self.verified.parsed(token) {
                    Some(parsed) => Ok(parsed),
                    None => parse_token(token).map(Arc::new),
                };
                self.parsed.push((token.to_owned(), parsed));
                self.parsed.len() - 1
            }
        };
        &self.parsed[index].1
    }
}

/// Header parameters that change what a signature means, which this
/// verifier does not implement, so a token using them is refused rather than
/// read as if they were absent (the JWT library parses `crit` and keeps
/// `b64` among unknown fields, and checks neither). Envoy checks neither
/// either; refusing is what RFC 7515 asks.
fn check_extensions(header: &jsonwebtoken::Header) -> Result<(), AuthnFailure> {
    // RFC 7797: with `b64: false` the payload is signed as raw bytes, not as
    // its base64url form. `true` is the default meaning.
    if header
        .extras
        .inner()
        .get("b64")
        .is_some_and(|b64| b64 != &serde_json::Value::Bool(true))
    {
        return Err(AuthnFailure::unauthorized(
            "Jwt header has an unencoded payload (b64: false), which is not supported",
        ));
    }
    // RFC 7515 §4.1.11: a recipient that does not understand an extension
    // listed in `crit` must reject the token; meshward understands none (an
    // empty list is itself invalid).
    if header.crit.is_some() {
        return Err(AuthnFailure::unauthorized(
            "Jwt header lists critical extensions (crit) that are not supported",
        ));
    }
    Ok(())
}

/// Shape, header and payload, with Envoy's messages.
fn parse_token(token: &str) -> Result<ParsedToken, AuthnFailure> {
    // Envoy splits on '.' skipping empty parts: "h.p." has two sections.
    if token.split('.').filter(|p| !p.is_empty()).count() != 3 {
        return Err(AuthnFailure::unauthorized(
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ));
    }
    let payload_b64 = token.split('.').nth(1).unwrap_or_default();
    let header = jsonwebtoken::decode_header(token).map_err(|_| {
        AuthnFailure::unauthorized("Jwt header is an invalid JSON or uses an unsupported algorithm")
    })?;
    check_extensions(&header)?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload_b64.trim_end_matches('='))
        .map_err(|_| AuthnFailure::unauthorized("Jwt payload is an invalid Base64"))?;
    let claims = serde_json::from_slice(&payload)
        .map_err(|_| AuthnFailure::unauthorized("Jwt payload is an invalid JSON"))?;
    Ok(ParsedToken {
        header,
        claims: Arc::new(claims),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use jsonwebtoken::EncodingKey;

    use super::*;
    use crate::authn::jwks::{FetchError, JwksFetcher};

    /// Serves the given bodies in turn, then the last one forever, and
    /// counts the fetches.
    struct Rotating(Mutex<Vec<&'static str>>, AtomicUsize);

    impl Rotating {
        fn new(bodies: Vec<&'static str>) -> Arc<Rotating> {
            Arc::new(Rotating(Mutex::new(bodies), AtomicUsize::new(0)))
        }
        fn fetches(&self) -> usize {
            self.1.load(Ordering::SeqCst)
        }
    }

    impl JwksFetcher for Rotating {
        fn fetch(&self, _uri: &str, _timeout: Duration) -> Result<String, FetchError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let mut bodies = self.0.lock().unwrap();
            let body = if bodies.len() > 1 {
                bodies.remove(0)
            } else {
                bodies[0]
            };
            Ok(body.to_owned())
        }
    }

    fn token(kid: &str) -> String {
        let key = EncodingKey::from_rsa_pem(include_bytes!("../../tests/keys/rsa.pem")).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid.into());
        let claims = serde_json::json!({"iss": "rotating", "sub": "alice"});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    fn authenticator(fetcher: Arc<Rotating>, refresh: Duration) -> Authenticator {
        let mut ra = RequestAuthentication::default();
        ra.spec.jwt_rules.push(JwtRule {
            issuer: "rotating".into(),
            jwks_uri: "http://127.0.0.1:1/jwks".into(),
            ..JwtRule::default()
        });
        let cache = JwksCache::with_timing(Some(fetcher), jwks::DEFAULT_CACHE_DURATION, refresh);
        Authenticator::new(&[&ra], Arc::new(cache))
    }

    fn request(token: &str) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("authorization".into(), format!("Bearer {token}"))],
            ..HttpRequest::default()
        }
    }

    #[test]
    fn an_unknown_kid_refreshes_the_keys_once() {
        // The first fetch returns keys from before the rotation (no rsa-1);
        // the token's unknown kid makes the authenticator fetch again.
        let fetcher = Rotating::new(vec![
            include_str!("../../tests/keys/jwks-rotated.json"),
            include_str!("../../tests/keys/jwks.json"),
        ]);
        let authn = authenticator(fetcher.clone(), Duration::ZERO);
        for attempt in 0..2 {
            match authn.authenticate(&request(&token("rsa-1"))) {
                AuthnOutcome::Authenticated { principal, .. } => {
                    assert_eq!(principal.principal(), "rotating/alice")
                }
                other => panic!(
                    "attempt {attempt}: expected the refreshed keys to verify the token, got {other:?}"
                ),
            }
            // The first fetch, and one refresh for the unknown kid; the
            // second request finds the kid in the refreshed keys.
            assert_eq!(fetcher.fetches(), 2, "attempt {attempt}");
        }
    }

    #[test]
    fn refreshes_are_rate_limited() {
        // Within the refresh interval the stale keys stay: the token is refused
        // rather than turning each bogus kid into a fetch.
        let fetcher = Rotating::new(vec![
            include_str!("../../tests/keys/jwks-rotated.json"),
            include_str!("../../tests/keys/jwks.json"),
        ]);
        let authn = authenticator(fetcher.clone(), Duration::from_secs(3600));
        for attempt in 0..3 {
            match authn.authenticate(&request(&token("rsa-1"))) {
                AuthnOutcome::Failed(f) => {
                    assert_eq!(f.status, 401);
                    assert_eq!(
                        f.message,
                        "Jwks doesn't have key to match kid or alg from Jwt"
                    );
                }
                other => panic!("attempt {attempt}: expected a refusal, got {other:?}"),
            }
            assert_eq!(
                fetcher.fetches(),
                1,
                "attempt {attempt}: only the first fetch"
            );
        }
    }

    fn token_with(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_rsa_pem(include_bytes!("../../tests/keys/rsa.pem")).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    fn current_keys(authn: &Authenticator) -> Arc<jwks::KeySet> {
        authn
            .jwks
            .keys("http://127.0.0.1:1/jwks", jwks::DEFAULT_FETCH_TIMEOUT)
            .unwrap()
    }

    #[test]
    fn a_verified_token_is_remembered_by_its_exact_text() {
        let fetcher = Rotating::new(vec![include_str!("../../tests/keys/jwks.json")]);
        let authn = authenticator(fetcher, Duration::from_secs(3600));
        let good = token("rsa-1");
        assert!(matches!(
            authn.authenticate(&request(&good)),
            AuthnOutcome::Authenticated { .. }
        ));
        let cache = authn.jwks.verified_tokens();
        assert_eq!(cache.len(), 1);
        assert!(cache.verified(&good, &current_keys(&authn), now()));
        // The same header and claims under another signature: not the
        // cached token, so verified, and refused.
        let (signed, _) = good.rsplit_once('.').unwrap();
        let forged = format!("{signed}.AAAA");
        match authn.authenticate(&request(&forged)) {
            AuthnOutcome::Failed(f) => assert_eq!(f.message, "Jwt verification fails"),
            other => panic!("a forged signature passed: {other:?}"),
        }
        assert_eq!(cache.len(), 1, "a failure is not remembered");
    }

    #[test]
    fn a_remembered_token_is_not_decoded_again() {
        let fetcher = Rotating::new(vec![include_str!("../../tests/keys/jwks.json")]);
        let authn = authenticator(fetcher, Duration::from_secs(3600));
        let good = token("rsa-1");
        let claims = || match authn.authenticate(&request(&good)) {
            AuthnOutcome::Authenticated { principal, .. } => principal.claims,
            other => panic!("refused: {other:?}"),
        };
        let (first, second) = (claims(), claims());
        assert!(Arc::ptr_eq(&first, &second), "the cached decoding");
        assert_eq!(first.get("sub"), Some(&serde_json::json!("alice")));
    }

    #[test]
    fn a_remembered_token_is_still_held_to_its_exp_and_nbf() {
        let fetcher = Rotating::new(vec![include_str!("../../tests/keys/jwks.json")]);
        let authn = authenticator(fetcher, Duration::from_secs(3600));
        let keys = current_keys(&authn);
        let expired =
            token_with(serde_json::json!({"iss": "rotating", "sub": "a", "exp": now() - 3600}));
        let early =
            token_with(serde_json::json!({"iss": "rotating", "sub": "a", "nbf": now() + 3600}));
        // As if each had verified earlier, for as long as its keys stay.
        for t in [&expired, &early] {
            let parsed = Arc::new(parse_token(t).unwrap());
            authn
                .jwks
                .verified_tokens()
                .insert(t, keys.clone(), None, parsed);
        }
        for (t, why) in [(&expired, "Jwt is expired"), (&early, "Jwt not yet valid")] {
            match authn.authenticate(&request(t)) {
                AuthnOutcome::Failed(f) => assert_eq!(f.message, why),
                other => panic!("a remembered token skipped the clock: {other:?}"),
            }
        }
    }

    #[test]
    fn a_key_removed_from_the_jwks_no_longer_vouches_for_a_remembered_token() {
        // The first fetch has rsa-1; every later one (each request fetches:
        // nothing is fresh) has it no more.
        let fetcher = Rotating::new(vec![
            include_str!("../../tests/keys/jwks.json"),
            include_str!("../../tests/keys/jwks-rotated.json"),
        ]);
        let mut ra = RequestAuthentication::default();
        ra.spec.jwt_rules.push(JwtRule {
            issuer: "rotating".into(),
            jwks_uri: "http://127.0.0.1:1/jwks".into(),
            ..JwtRule::default()
        });
        let cache = JwksCache::with_timing(Some(fetcher), Duration::ZERO, Duration::ZERO);
        let authn = Authenticator::new(&[&ra], Arc::new(cache));
        let t = token("rsa-1");
        assert!(matches!(
            authn.authenticate(&request(&t)),
            AuthnOutcome::Authenticated { .. }
        ));
        assert_eq!(authn.jwks.verified_tokens().len(), 1);
        match authn.authenticate(&request(&t)) {
            AuthnOutcome::Failed(f) => assert_eq!(
                f.message,
                "Jwks doesn't have key to match kid or alg from Jwt"
            ),
            other => panic!("a removed key still vouched: {other:?}"),
        }
        assert!(authn.jwks.verified_tokens().is_empty(), "evicted");
    }
}

#[cfg(test)]
mod key_selection_tests {
    use jsonwebtoken::EncodingKey;

    use super::*;

    /// The test JWKS with the RSA key's `alg` and `use` replaced.
    fn jwks_with(alg: Option<&str>, key_use: Option<&str>) -> String {
        let mut set: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/keys/jwks.json")).unwrap();
        let key = &mut set["keys"][0];
        if let Some(alg) = alg {
            key["alg"] = alg.into();
        }
        if let Some(key_use) = key_use {
            key["use"] = key_use.into();
        }
        set.to_string()
    }

    fn authenticate(issuer: &str, jwks: String) -> AuthnOutcome {
        let mut ra = RequestAuthentication::default();
        ra.spec.jwt_rules.push(JwtRule {
            issuer: issuer.into(),
            jwks,
            ..JwtRule::default()
        });
        let authn = Authenticator::new(&[&ra], Arc::default());
        let key = EncodingKey::from_rsa_pem(include_bytes!("../../tests/keys/rsa.pem")).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        let claims = serde_json::json!({"iss": "https://any.example", "sub": "alice"});
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        authn.authenticate(&HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("authorization".into(), format!("Bearer {token}"))],
            ..HttpRequest::default()
        })
    }

    fn refused(outcome: AuthnOutcome) -> String {
        match outcome {
            AuthnOutcome::Failed(f) => f.message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_key_stating_its_own_algorithm_only_serves_it() {
        assert!(matches!(
            authenticate("https://any.example", jwks_with(Some("RS256"), None)),
            AuthnOutcome::Authenticated { .. }
        ));
        assert_eq!(
            refused(authenticate(
                "https://any.example",
                jwks_with(Some("PS256"), None)
            )),
            "Jwks doesn't have key to match kid or alg from Jwt"
        );
    }

    #[test]
    fn encryption_keys_never_verify_signatures() {
        assert_eq!(
            refused(authenticate(
                "https://any.example",
                jwks_with(Some("RSA-OAEP"), None)
            )),
            "Jwks doesn't have key to match kid or alg from Jwt"
        );
        assert_eq!(
            refused(authenticate(
                "https://any.example",
                jwks_with(None, Some("enc"))
            )),
            "Jwks doesn't have key to match kid or alg from Jwt"
        );
    }

    #[test]
    fn an_empty_issuer_accepts_any_issuer() {
        let jwks = jwks_with(None, None);
        match authenticate("", jwks) {
            AuthnOutcome::Authenticated { principal, .. } => {
                assert_eq!(principal.issuer, "https://any.example")
            }
            other => panic!("expected success, got {other:?}"),
        }
    }
}
