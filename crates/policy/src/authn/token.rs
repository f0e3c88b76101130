//! Where tokens are looked for, and taking them out of a request.

use crate::api::JwtRule;
use crate::request::HttpRequest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Location {
    /// A header (lower-cased name) with a value prefix to strip.
    Header {
        name: String,
        prefix: String,
    },
    Param(String),
    Cookie(String),
}

/// A rule's token locations. Explicit `fromHeaders`/`fromParams`/`fromCookies`
/// replace the defaults (`Authorization: Bearer` and `access_token`).
pub(super) fn locations(rule: &JwtRule) -> Vec<Location> {
    let explicit: Vec<Location> = rule
        .from_headers
        .iter()
        .map(|h| Location::Header {
            name: h.name.to_ascii_lowercase(),
            prefix: h.prefix.clone(),
        })
        .chain(rule.from_params.iter().cloned().map(Location::Param))
        .chain(rule.from_cookies.iter().cloned().map(Location::Cookie))
        .collect();
    if !explicit.is_empty() {
        return explicit;
    }
    vec![
        Location::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        },
        Location::Param("access_token".into()),
    ]
}

/// A token taken from a request. Not `Debug`: a token is never printed.
#[derive(Clone)]
pub(super) struct Found {
    pub(super) token: String,
    /// The header it came from, to remove unless forwarded.
    pub(super) header: Option<String>,
    pub(super) location: Location,
}

pub(super) fn extract(request: &HttpRequest, locations: &[Location]) -> Vec<Found> {
    let mut out = Vec::new();
    for location in locations {
        match location {
            Location::Header { name, prefix } => {
                for (_, value) in request
                    .headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                {
                    let token = value
                        .get(..prefix.len())
                        .filter(|p| p.eq_ignore_ascii_case(prefix))
                        .and_then(|_| value.get(prefix.len()..));
                    if let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) {
                        out.push(Found {
                            token: token.to_owned(),
                            header: Some(name.clone()),
                            location: location.clone(),
                        });
                    }
                }
            }
            Location::Param(name) => {
                if let Some(token) = request.query_param(name).filter(|t| !t.is_empty()) {
                    out.push(Found {
                        token,
                        header: None,
                        location: location.clone(),
                    });
                }
            }
            Location::Cookie(name) => {
                if let Some(token) = request.cookie(name).filter(|t| !t.is_empty()) {
                    out.push(Found {
                        token,
                        header: None,
                        location: location.clone(),
                    });
                }
            }
        }
    }
    out
}
