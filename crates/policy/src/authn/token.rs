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

/// Every token at `locations`, in order: each value of a repeated header,
/// query parameter or cookie is a token of its own.
///
/// Envoy reads every value of a header but only the first value of a query
/// parameter or cookie. meshward reads them all, so that
/// `?access_token=GOOD&access_token=BAD` cannot pass with the second token
/// unverified: an application may read either value.
pub(super) fn extract(request: &HttpRequest, locations: &[Location]) -> Vec<Found> {
    let mut out = Vec::new();
    for location in locations {
        let found = |token: String, header: Option<&String>| Found {
            token,
            header: header.cloned(),
            location: location.clone(),
        };
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
                        out.push(found(token.to_owned(), Some(name)));
                    }
                }
            }
            Location::Param(name) => out.extend(
                request
                    .query_params(name)
                    .filter(|t| !t.is_empty())
                    .map(|t| found(t, None)),
            ),
            Location::Cookie(name) => out.extend(
                request
                    .cookies(name)
                    .filter(|t| !t.is_empty())
                    .map(|t| found(t, None)),
            ),
        }
    }
    out
}
