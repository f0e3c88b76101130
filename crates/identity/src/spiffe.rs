//! SPIFFE IDs: `spiffe://<trust-domain>/<path>`, per the SPIFFE ID spec, and
//! Istio's `ns/<namespace>/sa/<service-account>` path form.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec's limit on the whole ID, in bytes.
const MAX_LEN: usize = 2048;
/// The SPIFFE spec's limit on the trust domain name, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A SPIFFE ID that satisfies the spec: lower-case trust domain of
/// `[a-z0-9.-_]`, path segments of `[a-zA-Z0-9.-_]`, none empty, `.` or `..`,
/// and no query, fragment, port or userinfo.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    /// Starts with `/` unless empty.
    path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("a SPIFFE ID must start with spiffe://")]
    Scheme,
    #[error("a SPIFFE ID may be at most {MAX_LEN} bytes")]
    TooLong,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain may be at most {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error(
        "the trust domain {0:?} may only contain a-z, 0-9, '.', '-' and '_' (no port, userinfo or upper case)"
    )]
    TrustDomainChars(String),
    #[error(
        "path segment {0:?} is not allowed: segments must be non-empty, not '.' or '..', and use only a-z, A-Z, 0-9, '.', '-' and '_'"
    )]
    Segment(String),
    #[error("a SPIFFE ID has no query or fragment")]
    QueryOrFragment,
    #[error("the path must not end with '/'")]
    TrailingSlash,
    #[error(
        "{0:?} is not an Istio workload identity (expected ns/<namespace>/sa/<service-account>)"
    )]
    NotIstio(String),
}

fn is_trust_domain_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn check_segment(segment: &str) -> Result<(), SpiffeError> {
    let ok = !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::Segment(segment.to_owned()))
    }
}

/// Checks a trust domain name on its own (as given on a command line).
pub fn check_trust_domain(td: &str) -> Result<(), SpiffeError> {
    if td.is_empty() {
        return Err(SpiffeError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeError::TrustDomainTooLong);
    }
    if !td.bytes().all(is_trust_domain_char) {
        return Err(SpiffeError::TrustDomainChars(td.to_owned()));
    }
    Ok(())
}

impl SpiffeId {
    pub fn parse(id: &str) -> Result<SpiffeId, SpiffeError> {
        if id.len() > MAX_LEN {
            return Err(SpiffeError::TooLong);
        }
        let rest = id.strip_prefix(SCHEME).ok_or(SpiffeError::Scheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        if path.ends_with('/') {
            return Err(SpiffeError::TrailingSlash);
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                check_segment(segment)?;
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn istio(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeError> {
        check_trust_domain(trust_domain)?;
        check_segment(namespace)?;
        check_segment(service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            path: format!("/ns/{namespace}/sa/{service_account}"),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service account)` when the path is Istio's `ns/N/sa/S`.
    pub fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut parts = self.path.strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The same identity in another trust domain (for trust-domain aliases).
    pub fn in_trust_domain(&self, trust_domain: &str) -> Result<SpiffeId, SpiffeError> {
        check_trust_domain(trust_domain)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            path: self.path.clone(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/foo/sa/bar").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.istio_parts(), Some(("foo", "bar")));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/foo/sa/bar");
        assert_eq!(SpiffeId::istio("cluster.local", "foo", "bar").unwrap(), id);
        assert_eq!(SpiffeId::parse("spiffe://td").unwrap().path(), "");
    }

    #[test]
    fn rejects_what_the_spec_rejects() {
        for bad in [
            "http://td/x",
            "spiffe://",
            "spiffe:///x",
            "spiffe://TD/x",
            "spiffe://td:8080/x",
            "spiffe://user@td/x",
            "spiffe://td/x?q",
            "spiffe://td/x#f",
            "spiffe://td/x/",
            "spiffe://td//x",
            "spiffe://td/./x",
            "spiffe://td/../x",
            "spiffe://td/x y",
            "spiffe://td/é",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(3000))).is_err());
        assert!(SpiffeId::istio("td", "a/b", "c").is_err());
    }

    #[test]
    fn istio_form_is_exact() {
        assert_eq!(
            SpiffeId::parse("spiffe://td/ns/a/sa/b/c")
                .unwrap()
                .istio_parts(),
            None
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td/workload")
                .unwrap()
                .istio_parts(),
            None
        );
    }
}
