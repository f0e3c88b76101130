//! The verified identity a JWT carries, as `request.auth.*` attributes.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{Map, Value};

/// A verified token's claims and the attributes derived from them.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtPrincipal {
    pub issuer: String,
    pub subject: String,
    /// `aud`, a string or a list in the token.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// Shared with the verified-token cache, which keeps a token decoded.
    pub claims: Arc<Map<String, Value>>,
    /// Top-level claims matched as space-delimited lists (`scope`, `permission`, ...).
    pub space_delimited: Arc<[String]>,
}

impl JwtPrincipal {
    pub fn new(claims: Arc<Map<String, Value>>, space_delimited: Arc<[String]>) -> JwtPrincipal {
        let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let audiences = match claims.get("aud") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        JwtPrincipal {
            issuer: text("iss").unwrap_or_default(),
            subject: text("sub").unwrap_or_default(),
            audiences,
            presenter: text("azp"),
            claims,
            space_delimited,
        }
    }

    /// `request.auth.principal`: `iss/sub`.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }

    /// The string values of a claim path for matching: a string claim (split
    /// on spaces for space-delimited claims), or the strings of a list claim.
    /// Numbers, booleans and objects have none, as in Envoy.
    pub fn claim_values(&self, path: &[String]) -> Option<Vec<Cow<'_, str>>> {
        let (first, rest) = path.split_first()?;
        let mut value = self.claims.get(first)?;
        for key in rest {
            value = value.as_object()?.get(key)?;
        }
        match value {
            Value::String(s)
                if rest.is_empty() && self.space_delimited.iter().any(|c| c == first) =>
            {
                Some(s.split_whitespace().map(Cow::Borrowed).collect())
            }
            Value::String(s) => Some(vec![Cow::Borrowed(s.as_str())]),
            Value::Array(list) => Some(
                list.iter()
                    .filter_map(|v| v.as_str().map(Cow::Borrowed))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// A claim (dotted path for nested claims) as a header value: strings,
    /// booleans and integers only, as Envoy's `claim_to_headers`.
    pub fn claim_for_header(&self, claim: &str) -> Option<String> {
        let mut parts = claim.split('.');
        let mut value = self.claims.get(parts.next()?)?;
        for key in parts {
            value = value.as_object()?.get(key)?;
        }
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            _ => None,
        }
    }
}
