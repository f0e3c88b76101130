//! `when` condition keys: which attribute each names and which values it takes.

use std::fmt;

use crate::validate::{check_ip_or_cidr, check_port};

/// A request attribute a rule can test.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attr {
    /// The peer's SPIFFE ID without `spiffe://`; absent for plaintext peers.
    SourcePrincipal,
    /// The namespace in the peer's identity.
    SourceNamespace,
    /// `<namespace>/<service account>` from the peer's identity.
    SourceServiceAccount,
    /// The direct peer address.
    SourceIp,
    /// The original client address (`X-Forwarded-For` aware); the peer address otherwise.
    RemoteIp,
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `iss/sub` of the verified JWT.
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    /// A claim path, `request.auth.claims[a][b]`.
    RequestClaim(Vec<String>),
    /// A lower-cased header name; all values folded with `,`.
    RequestHeader(String),
    /// A lower-cased header name; matches one element of the `,`-folded value.
    InlineHeader(String),
    Host,
    Method,
    Path,
    /// `experimental.envoy.filters.*`: accepted for compatibility, never present.
    Experimental(String),
}

impl Attr {
    /// Attributes that only exist for HTTP requests. On a TCP connection,
    /// Istio drops a rule using them from ALLOW policies and drops the
    /// field from DENY, AUDIT and CUSTOM rules.
    pub fn is_http_only(&self) -> bool {
        matches!(
            self,
            Attr::RequestPrincipal
                | Attr::RequestAudiences
                | Attr::RequestPresenter
                | Attr::RequestClaim(_)
                | Attr::RequestHeader(_)
                | Attr::InlineHeader(_)
                | Attr::Host
                | Attr::Method
                | Attr::Path
        )
    }

    /// Attributes that come from the peer's mTLS identity.
    pub fn is_peer_identity(&self) -> bool {
        matches!(
            self,
            Attr::SourcePrincipal | Attr::SourceNamespace | Attr::SourceServiceAccount
        )
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::SourcePrincipal => f.write_str("source.principal"),
            Attr::SourceNamespace => f.write_str("source.namespace"),
            Attr::SourceServiceAccount => f.write_str("source.serviceAccount"),
            Attr::SourceIp => f.write_str("source.ip"),
            Attr::RemoteIp => f.write_str("remote.ip"),
            Attr::DestinationIp => f.write_str("destination.ip"),
            Attr::DestinationPort => f.write_str("destination.port"),
            Attr::ConnectionSni => f.write_str("connection.sni"),
            Attr::RequestPrincipal => f.write_str("request.auth.principal"),
            Attr::RequestAudiences => f.write_str("request.auth.audiences"),
            Attr::RequestPresenter => f.write_str("request.auth.presenter"),
            Attr::RequestClaim(path) => {
                f.write_str("request.auth.claims")?;
                for p in path {
                    write!(f, "[{p}]")?;
                }
                Ok(())
            }
            Attr::RequestHeader(h) => write!(f, "request.headers[{h}]"),
            Attr::InlineHeader(h) => write!(f, "request.experimental.inline.headers[{h}]"),
            Attr::Host => f.write_str("request.host"),
            Attr::Method => f.write_str("request.method"),
            Attr::Path => f.write_str("request.path"),
            Attr::Experimental(k) => f.write_str(k),
        }
    }
}

/// A parsed `when[].key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionKey(pub Attr);

/// Why a `when` key is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "unknown attribute: {0}; supported keys are request.headers[NAME], source.ip, remote.ip, source.namespace, source.principal, source.serviceAccount, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[NAME], destination.ip, destination.port, connection.sni and experimental.envoy.filters.*"
    )]
    Unknown(String),
    #[error("bad key ({0}): should have format a[b]")]
    BadMapKey(String),
    #[error("attribute {0} is replaced by the metadata.namespace")]
    DestinationNamespace(String),
    #[error("attribute {0} is replaced by the workload selector")]
    DestinationLabels(String),
    #[error("deprecated attribute {0}: only supported in v1alpha1")]
    Deprecated(String),
}

impl ConditionKey {
    pub fn parse(key: &str) -> Result<ConditionKey, KeyError> {
        // Istio matches these by prefix, so `request.headers` alone (or any
        // other spelling without brackets) is a malformed map key, not an unknown one.
        for prefix in [
            "request.headers",
            "request.experimental.inline.headers",
            "request.auth.claims",
            "experimental.envoy.filters.",
        ] {
            let bracket = key.starts_with(prefix) && key[prefix.len()..].starts_with('[');
            if key.starts_with(prefix) && !bracket && !prefix.ends_with('.') {
                return Err(KeyError::BadMapKey(key.into()));
            }
        }
        let attr = match key {
            "source.ip" => Attr::SourceIp,
            "remote.ip" => Attr::RemoteIp,
            "source.namespace" => Attr::SourceNamespace,
            "source.principal" => Attr::SourcePrincipal,
            "source.serviceAccount" => Attr::SourceServiceAccount,
            "request.auth.principal" => Attr::RequestPrincipal,
            "request.auth.audiences" => Attr::RequestAudiences,
            "request.auth.presenter" => Attr::RequestPresenter,
            "destination.ip" => Attr::DestinationIp,
            "destination.port" => Attr::DestinationPort,
            "connection.sni" => Attr::ConnectionSni,
            k if k.starts_with("request.headers[") => {
                let names = map_key(k, "request.headers")?;
                match names.as_slice() {
                    [name] => Attr::RequestHeader(name.to_ascii_lowercase()),
                    _ => return Err(KeyError::BadMapKey(k.into())),
                }
            }
            k if k.starts_with("request.experimental.inline.headers[") => {
                let names = map_key(k, "request.experimental.inline.headers")?;
                match names.as_slice() {
                    [name] => Attr::InlineHeader(name.to_ascii_lowercase()),
                    _ => return Err(KeyError::BadMapKey(k.into())),
                }
            }
            k if k.starts_with("request.auth.claims[") => {
                Attr::RequestClaim(map_key(k, "request.auth.claims")?)
            }
            k if k.starts_with("experimental.envoy.filters.") => {
                if !(k.ends_with(']') && k.find('[').is_some_and(|open| open + 2 < k.len())) {
                    return Err(KeyError::BadMapKey(k.into()));
                }
                Attr::Experimental(k.into())
            }
            "destination.namespace" => return Err(KeyError::DestinationNamespace(key.into())),
            k if k.starts_with("destination.labels") => {
                return Err(KeyError::DestinationLabels(key.into()));
            }
            "destination.name" | "destination.user" => {
                return Err(KeyError::Deprecated(key.into()));
            }
            k => return Err(KeyError::Unknown(k.into())),
        };
        Ok(ConditionKey(attr))
    }

    /// Checks one `values`/`notValues` entry for this key.
    pub fn check_value(&self, value: &str) -> Result<(), String> {
        match self.0 {
            Attr::SourceIp | Attr::RemoteIp | Attr::DestinationIp => {
                check_ip_or_cidr(value).map(|_| ())
            }
            Attr::DestinationPort => check_port(value).map(|_| ()),
            Attr::SourceServiceAccount => crate::validate::check_service_accounts(
                "source.serviceAccount",
                std::slice::from_ref(&value.to_owned()),
            )
            .map_err(|(_, e)| e),
            _ => Ok(()),
        }
    }
}

/// `prefix[a][b]` into `[a, b]`; every name non-empty.
fn map_key(key: &str, prefix: &'static str) -> Result<Vec<String>, KeyError> {
    let bad = || KeyError::BadMapKey(key.into());
    let inner = key
        .strip_prefix(prefix)
        .and_then(|k| k.strip_prefix('['))
        .and_then(|k| k.strip_suffix(']'))
        .ok_or_else(bad)?;
    let names: Vec<String> = inner.split("][").map(str::to_owned).collect();
    if names.iter().any(|n| n.is_empty() || n.contains(['[', ']'])) {
        return Err(bad());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(
            ConditionKey::parse("request.headers[X-Token]").map(|k| k.0),
            Ok(Attr::RequestHeader("x-token".into()))
        );
        assert_eq!(
            ConditionKey::parse("request.auth.claims[a][b]").map(|k| k.0),
            Ok(Attr::RequestClaim(vec!["a".into(), "b".into()]))
        );
        assert!(ConditionKey::parse("request.headers[]").is_err());
        assert!(ConditionKey::parse("request.headers[a").is_err());
        assert!(ConditionKey::parse("request.auth.claims[]").is_err());
        assert!(ConditionKey::parse("request.auth.claims[a][]").is_err());
        assert!(ConditionKey::parse("source.foo").is_err());
        assert!(ConditionKey::parse("experimental.envoy.filters.x.y[z]").is_ok());
    }
}
