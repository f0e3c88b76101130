//! What the policy engine is asked about: one connection and, for HTTP, one request.
//!
//! These types are filled by the proxy from the wire and by `meshward check`
//! from JSON; both then call the same pipeline.

use std::net::IpAddr;

/// The SPIFFE URI scheme prefix that Istio strips before matching principals.
pub const SPIFFE_PREFIX: &str = "spiffe://";

/// The transport facts about a connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connection {
    pub source_ip: Option<IpAddr>,
    /// The peer's SPIFFE ID (`spiffe://td/ns/N/sa/S`) from its verified
    /// certificate; `None` for a plaintext peer.
    pub source_principal: Option<String>,
    pub destination_ip: Option<IpAddr>,
    /// The workload port the connection arrived on.
    pub destination_port: u16,
    /// The TLS server name the peer asked for.
    pub sni: Option<String>,
}

/// One HTTP request as the application would receive it.
#[derive(Clone, Default, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    /// The request target: path with optional query, as on the request line.
    pub path: String,
    /// The `:authority` / `Host`, with port if the client sent one, as
    /// Envoy hands it to its filters: see [`HttpRequest::normalize_authority`].
    pub host: String,
    /// A repeated header appears once per value. Names compare without
    /// regard to case, as HTTP says.
    pub headers: Vec<(String, String)>,
    /// The original client address (from trusted `X-Forwarded-For`); defaults to the peer.
    pub remote_ip: Option<IpAddr>,
}

/// Headers whose values are credentials: never printed.
const SECRET_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// Debug output goes to logs, so credentials are left out: the values of
/// credential headers and the query string (which may carry `access_token`).
impl std::fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = crate::authz::normalize::strip_query(&self.path);
        let query = if path.len() < self.path.len() {
            "?<redacted>"
        } else {
            ""
        };
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let secret = SECRET_HEADERS.iter().any(|s| k.eq_ignore_ascii_case(s));
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("path", &format_args!("{path}{query}"))
            .field("host", &self.host)
            .field("headers", &headers)
            .field("remote_ip", &self.remote_ip)
            .finish()
    }
}

impl HttpRequest {
    /// All values of a header (name lower-cased), joined with `,` as a proxy
    /// would fold them; `None` when absent.
    pub fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        let mut values = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let first = values.next()?;
        match values.next() {
            None => Some(std::borrow::Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = format!("{first},{second}");
                for v in values {
                    joined.push(',');
                    joined.push_str(v);
                }
                Some(std::borrow::Cow::Owned(joined))
            }
        }
    }

    /// Removes one trailing dot from the host ([`strip_trailing_host_dot`]),
    /// in `host` and in a `Host` header, before anything reads them.
    pub fn normalize_authority(&mut self) {
        if let Some(host) = strip_trailing_host_dot(&self.host) {
            self.host = host;
        }
        for (name, value) in &mut self.headers {
            if name.eq_ignore_ascii_case("host")
                && let Some(host) = strip_trailing_host_dot(value)
            {
                *value = host;
            }
        }
    }

    pub fn remove_header(&mut self, name: &str) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    pub fn set_header(&mut self, name: &str, value: String) {
        self.remove_header(name);
        self.headers.push((name.to_owned(), value));
    }

    /// Every value of query parameter `name`, in order, percent-decoded.
    pub fn query_params<'a>(&'a self, name: &'a str) -> impl Iterator<Item = String> + 'a {
        let query = self.path.split_once('?').map_or("", |(_, q)| q);
        let query = query.split('#').next().unwrap_or_default();
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter_map(move |pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(k) == name).then(|| decode(v))
            })
    }

    /// Every value of cookie `name` from the `cookie` headers, in order.
    pub fn cookies<'a>(&'a self, name: &'a str) -> impl Iterator<Item = String> + 'a {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(move |c| {
                let (k, v) = c.trim().split_once('=')?;
                // Names are compared trimmed, as applications read them
                // (`session =x` is cookie `session` to Go and Node): a
                // token the application would read is never skipped here.
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
            })
    }
}

/// The authority without one trailing dot on its host, the port kept
/// (`blocked.example.:8080` → `blocked.example:8080`), as Envoy's
/// `strip_trailing_host_dot` leaves it; `None` when there is none to remove.
/// A fully qualified name is the same host, so it must not get past a rule
/// on `hosts` written without the dot, and the application gets the host
/// that was authorized.
pub fn strip_trailing_host_dot(authority: &str) -> Option<String> {
    let dot = authority.rfind('.')?;
    match authority.as_bytes().get(dot + 1) {
        None => Some(authority[..dot].to_owned()),
        // A dot right before a colon precedes a port: IPv6 addresses never
        // have one there.
        Some(b':') => Some(format!("{}{}", &authority[..dot], &authority[dot + 1..])),
        Some(_) => None,
    }
}

fn decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// The parts of a peer identity that policies match on, read the way
/// Istio's generated matchers read the certificate's URI SAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity<'a> {
    /// Without the `spiffe://` scheme (`td/ns/N/sa/S`); `None` when the
    /// identity is not a SPIFFE ID, which only `principals: ["*"]` matches.
    pub principal: Option<&'a str>,
    /// Every segment that follows an `ns` segment and has a segment after it:
    /// Istio matches namespaces with the regex `.*/ns/<ns>/.*` on the URI.
    pub namespaces: Vec<&'a str>,
    /// Every `ns/sa` pair matching Istio's `spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?`.
    pub service_accounts: Vec<String>,
}

impl<'a> PeerIdentity<'a> {
    pub fn parse(uri: &'a str) -> PeerIdentity<'a> {
        let principal = uri.strip_prefix(SPIFFE_PREFIX);
        let parts: Vec<&str> = uri.split('/').collect();
        let mut namespaces = Vec::new();
        let mut service_accounts = Vec::new();
        for i in 0..parts.len() {
            if parts[i] != "ns" || i + 2 >= parts.len() {
                continue;
            }
            namespaces.push(parts[i + 1]);
            // `spiffe://` splits into "spiffe:", "", then the trust domain: the
            // service-account regex needs the scheme and a non-empty domain first.
            let after_domain = principal.is_some() && (i > 3 || (i == 3 && !parts[2].is_empty()));
            if !after_domain {
                continue;
            }
            for j in i + 2..parts.len().saturating_sub(1) {
                if parts[j] == "sa" && !parts[j + 1].is_empty() {
                    service_accounts.push(format!("{}/{}", parts[i + 1], parts[j + 1]));
                }
            }
        }
        PeerIdentity {
            principal,
            namespaces,
            service_accounts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_parts() {
        let id = PeerIdentity::parse("spiffe://cluster.local/ns/foo/sa/bar");
        assert_eq!(id.principal, Some("cluster.local/ns/foo/sa/bar"));
        assert_eq!(id.namespaces, ["foo"]);
        assert_eq!(id.service_accounts, ["foo/bar"]);
        let odd = PeerIdentity::parse("spiffe://td/workload/x");
        assert!(odd.namespaces.is_empty());
    }

    /// IDs that are not exactly `td/ns/N/sa/S` still match as Istio's regexes do.
    #[test]
    fn longer_ids_follow_istio_regexes() {
        let id = PeerIdentity::parse("spiffe://td/ns/legacy/sa/x/extra");
        assert_eq!(id.namespaces, ["legacy"]);
        assert_eq!(id.service_accounts, ["legacy/x"]);
        let id = PeerIdentity::parse("spiffe://td/ns/a/team/t/sa/b");
        assert_eq!(id.service_accounts, ["a/b"]);
        // No segment after the namespace: `.*/ns/<ns>/.*` needs one.
        assert!(
            PeerIdentity::parse("spiffe://td/ns/a")
                .namespaces
                .is_empty()
        );
        // Not SPIFFE: no principal to match, no service account.
        let raw = PeerIdentity::parse("td/ns/a/sa/b");
        assert_eq!(raw.principal, None);
        assert_eq!(raw.namespaces, ["a"]);
        assert!(raw.service_accounts.is_empty());
    }

    #[test]
    fn one_trailing_host_dot_is_removed_and_the_port_kept() {
        let strip = strip_trailing_host_dot;
        assert_eq!(
            strip("blocked.example.").as_deref(),
            Some("blocked.example")
        );
        assert_eq!(
            strip("blocked.example.:8080").as_deref(),
            Some("blocked.example:8080")
        );
        assert_eq!(
            strip("blocked.example..").as_deref(),
            Some("blocked.example.")
        );
        assert_eq!(strip("blocked.example"), None);
        assert_eq!(strip("blocked.example:8080"), None);
        assert_eq!(strip("10.0.0.1:80"), None);
        assert_eq!(strip("[::ffff:10.0.0.1]:80"), None);
        assert_eq!(strip("web"), None);
        let mut request = HttpRequest {
            host: "Web.Example.:80".into(),
            headers: vec![("Host".into(), "Web.Example.:80".into())],
            ..Default::default()
        };
        request.normalize_authority();
        assert_eq!(request.host, "Web.Example:80");
        assert_eq!(request.headers[0].1, "Web.Example:80");
    }

    #[test]
    fn query_and_cookies() {
        let req = HttpRequest {
            path: "/a?x=1&access_token=abc%2Edef&y&&access_token=second#f".into(),
            headers: vec![
                ("cookie".into(), "a=1; session=tok; b=2".into()),
                ("Cookie".into(), "session=\"again\"".into()),
                // Spaces around the name: still the cookie applications read.
                ("cookie".into(), "x=1; session =spaced".into()),
            ],
            ..Default::default()
        };
        let all = |name| req.query_params(name).collect::<Vec<_>>();
        assert_eq!(all("access_token"), ["abc.def", "second"]);
        assert_eq!(all("y"), [""]);
        assert!(all("z").is_empty());
        let cookies = |name| req.cookies(name).collect::<Vec<_>>();
        assert_eq!(cookies("session"), ["tok", "again", "spaced"]);
        assert!(cookies("c").is_empty());
    }

    #[test]
    fn debug_output_has_no_credentials() {
        let req = HttpRequest {
            method: "GET".into(),
            path: "/a?access_token=secret1".into(),
            headers: vec![
                ("Authorization".into(), "Bearer secret2".into()),
                ("cookie".into(), "session=secret3".into()),
                ("x-request-id".into(), "visible".into()),
            ],
            ..Default::default()
        };
        let printed = format!("{req:?}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(
            printed.contains("visible") && printed.contains("/a?<redacted>"),
            "{printed}"
        );
    }

    #[test]
    fn folded_headers() {
        let req = HttpRequest {
            headers: vec![("x".into(), "1".into()), ("x".into(), "2".into())],
            ..Default::default()
        };
        assert_eq!(req.header("x").as_deref(), Some("1,2"));
        assert_eq!(req.header("y"), None);
    }
}
