//! The request as authorization sees it: every attribute a rule can test,
//! computed once per request.

use std::borrow::Cow;
use std::net::IpAddr;

use crate::api::PathNormalizationMode;
use crate::authn::JwtPrincipal;
use crate::authz::condition::Attr;
use crate::authz::normalize;
use crate::request::{Connection, HttpRequest, PeerIdentity};

/// A request (or TCP connection) ready to be matched.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    /// The peer's identity as presented (a SPIFFE URI), if any.
    peer_uri: Option<&'a str>,
    /// Namespaces and service accounts read from `peer_uri`, on first use:
    /// most requests never need them.
    peer: std::cell::OnceCell<Option<PeerIdentity<'a>>>,
    pub(crate) source_ip: Option<IpAddr>,
    pub(crate) remote_ip: Option<IpAddr>,
    pub(crate) destination_ip: Option<IpAddr>,
    pub(crate) destination_port: u16,
    pub(crate) sni: Option<&'a str>,
    pub(crate) http: Option<HttpAttributes<'a>>,
}

#[derive(Debug, Clone)]
pub(crate) struct HttpAttributes<'a> {
    pub(crate) request: &'a HttpRequest,
    /// Normalized, without query.
    pub(crate) path: Cow<'a, str>,
    /// Lower-cased authority.
    pub(crate) host: Cow<'a, str>,
    pub(crate) jwt: Option<&'a JwtPrincipal>,
}

/// One attribute's value(s) for matching.
pub(crate) enum Value<'v> {
    Str(Cow<'v, str>),
    List(Vec<Cow<'v, str>>),
    Ip(IpAddr),
    Port(u16),
    /// The verified JWT's `iss` and `sub`.
    IssSub(&'v str, &'v str),
    /// Present, but not matchable by value: only presence (`*`) matches it.
    Opaque,
}

impl<'a> Attributes<'a> {
    pub fn new(
        connection: &'a Connection,
        http: Option<&'a HttpRequest>,
        jwt: Option<&'a JwtPrincipal>,
        normalization: PathNormalizationMode,
    ) -> Attributes<'a> {
        let remote_ip = http.and_then(|h| h.remote_ip).or(connection.source_ip);
        Attributes {
            peer_uri: connection.source_principal.as_deref(),
            peer: std::cell::OnceCell::new(),
            source_ip: connection.source_ip,
            remote_ip,
            destination_ip: connection.destination_ip,
            destination_port: connection.destination_port,
            sni: connection.sni.as_deref(),
            http: http.map(|request| HttpAttributes {
                request,
                path: normalize::normalize(&request.path, normalization),
                host: if request.host.bytes().any(|b| b.is_ascii_uppercase()) {
                    Cow::Owned(request.host.to_ascii_lowercase())
                } else {
                    Cow::Borrowed(request.host.as_str())
                },
                jwt,
            }),
        }
    }

    pub fn is_http(&self) -> bool {
        self.http.is_some()
    }

    /// The peer's SPIFFE ID without `spiffe://`; `None` for plaintext peers
    /// and identities that are not SPIFFE IDs.
    pub(crate) fn principal(&self) -> Option<&str> {
        self.peer_uri
            .and_then(|u| u.strip_prefix(crate::request::SPIFFE_PREFIX))
    }

    fn peer(&self) -> Option<&PeerIdentity<'a>> {
        self.peer
            .get_or_init(|| self.peer_uri.map(PeerIdentity::parse))
            .as_ref()
    }

    pub(crate) fn path(&self) -> Option<&str> {
        self.http.as_ref().map(|h| h.path.as_ref())
    }

    pub(crate) fn value(&self, attr: &Attr) -> Option<Value<'_>> {
        fn s(v: &str) -> Value<'_> {
            Value::Str(Cow::Borrowed(v))
        }
        match attr {
            Attr::SourcePrincipal => self.peer_uri.map(|_| match self.principal() {
                Some(principal) => s(principal),
                None => Value::Opaque,
            }),
            Attr::SourceNamespace => self.peer().and_then(|p| {
                (!p.namespaces.is_empty())
                    .then(|| Value::List(p.namespaces.iter().map(|n| Cow::Borrowed(*n)).collect()))
            }),
            Attr::SourceServiceAccount => self.peer().and_then(|p| {
                (!p.service_accounts.is_empty()).then(|| {
                    Value::List(
                        p.service_accounts
                            .iter()
                            .map(|sa| Cow::Borrowed(sa.as_str()))
                            .collect(),
                    )
                })
            }),
            Attr::SourceIp => self.source_ip.map(Value::Ip),
            Attr::RemoteIp => self.remote_ip.map(Value::Ip),
            Attr::DestinationIp => self.destination_ip.map(Value::Ip),
            Attr::DestinationPort => Some(Value::Port(self.destination_port)),
            Attr::ConnectionSni => self.sni.map(s),
            Attr::Experimental(_) => None,
            http_attr => {
                let http = self.http.as_ref()?;
                match http_attr {
                    Attr::Host => Some(s(&http.host)),
                    Attr::Method => Some(s(&http.request.method)),
                    Attr::Path => Some(s(&http.path)),
                    Attr::RequestHeader(name) => http.request.header(name).map(Value::Str),
                    Attr::InlineHeader(name) => http.request.header(name).map(Value::Str),
                    Attr::RequestPrincipal => http
                        .jwt
                        .map(|j| Value::IssSub(j.issuer.as_str(), j.subject.as_str())),
                    Attr::RequestAudiences => http.jwt.map(|j| {
                        Value::List(
                            j.audiences
                                .iter()
                                .map(|a| Cow::Borrowed(a.as_str()))
                                .collect(),
                        )
                    }),
                    Attr::RequestPresenter => http.jwt.and_then(|j| j.presenter.as_deref()).map(s),
                    Attr::RequestClaim(path) => {
                        http.jwt.and_then(|j| j.claim_values(path)).map(Value::List)
                    }
                    _ => None,
                }
            }
        }
    }
}
