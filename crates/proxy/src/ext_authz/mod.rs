//! CUSTOM authorization: asking the external authorizer a CUSTOM policy
//! names, as Envoy's `ext_authz` filters do for MeshConfig's providers.
//!
//! One decision flow serves both provider kinds: the proxy describes what
//! is being checked ([`Check`]: the connection, and for HTTP the request and
//! maybe its body), the provider's client ([`http`] for
//! `envoyExtAuthzHttp`, [`grpc`] for `envoyExtAuthzGrpc`) turns that into
//! its wire form and the answer back into an [`ExtAuthzAnswer`], and this
//! module applies the provider's `timeout` and turns every failure into
//! [`CustomVerdict::Error`], which `failOpen` and `statusOnError` turn into a
//! decision in the policy engine. Request bodies are buffered by [`body`].

pub mod body;
pub mod grpc;
pub mod http;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use ::http::header::{HeaderMap, HeaderName, HeaderValue};
use ::http::{Method, Version};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use meshward_policy::api::ExtensionProvider;
use meshward_policy::authz::CustomVerdict;
use tokio::net::TcpStream;

pub use body::CheckedBody;

use crate::outbound::OutboundTarget;
use crate::socket::Dial;

/// Istio's default provider timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The two ends of the connection being checked, as Envoy's
/// `AttributeContext.source` / `.destination` describe them.
#[derive(Debug, Clone)]
pub struct Peers {
    pub source: SocketAddr,
    /// The peer's SPIFFE ID URI; `None` for a plaintext peer.
    pub source_principal: Option<Arc<str>>,
    pub destination: SocketAddr,
    /// This workload's SPIFFE ID URI.
    pub destination_principal: String,
}

/// One HTTP request being checked, as the application would receive it.
#[derive(Debug, Clone, Copy)]
pub struct HttpCheck<'a> {
    pub method: &'a Method,
    /// Path (as authorized) and query.
    pub target: &'a str,
    pub authority: &'a str,
    /// `https` when the request came over the mesh's mutual TLS.
    pub scheme: &'static str,
    pub version: Version,
    pub headers: &'a HeaderMap,
    /// The buffered body, when the provider asks for it.
    pub body: Option<&'a CheckedBody>,
    pub time: SystemTime,
}

/// What is checked: a connection, and for HTTP the request on it.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    pub peers: &'a Peers,
    /// `None` for a TCP connection (gRPC providers only).
    pub http: Option<HttpCheck<'a>>,
}

/// How a header the authorizer names is applied (Envoy's
/// `HeaderValueOption.append_action`, or its deprecated `append`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderAction {
    /// Another value beside any there are.
    Append,
    /// Only if the header is absent.
    AddIfAbsent,
    /// Replaces every value, or adds.
    Overwrite,
    /// Replaces every value; nothing if the header is absent.
    OverwriteIfExists,
}

/// One header the authorizer asks to add or change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMutation {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: HeaderAction,
}

impl HeaderMutation {
    pub fn overwrite(name: HeaderName, value: HeaderValue) -> HeaderMutation {
        HeaderMutation {
            name,
            value,
            action: HeaderAction::Overwrite,
        }
    }
}

/// Applies `mutations` to `headers`, in order.
pub fn apply_headers(headers: &mut HeaderMap, mutations: &[HeaderMutation]) {
    for m in mutations {
        match m.action {
            HeaderAction::Append => {
                headers.append(m.name.clone(), m.value.clone());
            }
            HeaderAction::AddIfAbsent => {
                if !headers.contains_key(&m.name) {
                    headers.insert(m.name.clone(), m.value.clone());
                }
            }
            HeaderAction::Overwrite => {
                headers.insert(m.name.clone(), m.value.clone());
            }
            HeaderAction::OverwriteIfExists => {
                if headers.contains_key(&m.name) {
                    headers.insert(m.name.clone(), m.value.clone());
                }
            }
        }
    }
}

/// The authorizer's answer and what it asks the proxy to change.
#[derive(Debug, Default)]
pub struct ExtAuthzAnswer {
    pub verdict: Verdict,
    /// Headers for the application, applied after `remove_headers`.
    pub upstream_headers: Vec<HeaderMutation>,
    /// Headers taken off the request before it reaches the application.
    pub remove_headers: Vec<HeaderName>,
    /// Query parameters set on (replacing any of the same name) and removed
    /// from the request's query.
    pub query_set: Vec<(String, String)>,
    pub query_remove: Vec<String>,
    /// Headers for the client: on the application's response when allowed,
    /// on the denial otherwise.
    pub downstream_headers: Vec<HeaderMutation>,
    /// The authorizer's body for the client, on denial.
    pub body: Bytes,
    /// gRPC providers' `dynamic_metadata`, as JSON, for the log.
    pub dynamic_metadata: Option<serde_json::Value>,
}

/// [`CustomVerdict`], defaulting to an error so that an answer never built
/// on purpose never allows.
#[derive(Debug, Clone)]
pub struct Verdict(pub CustomVerdict);

impl Default for Verdict {
    fn default() -> Verdict {
        Verdict(CustomVerdict::Error("no answer".into()))
    }
}

impl ExtAuthzAnswer {
    /// Applies what the authorizer asked of the request forwarded
    /// (`remove_headers`, then `upstream_headers`) to `headers`; returns
    /// the headers it asked for on the response.
    pub fn apply_upstream(self, headers: &mut HeaderMap) -> Vec<HeaderMutation> {
        for name in &self.remove_headers {
            headers.remove(name);
        }
        apply_headers(headers, &self.upstream_headers);
        self.downstream_headers
    }

    pub fn error(message: String) -> ExtAuthzAnswer {
        ExtAuthzAnswer {
            verdict: Verdict(CustomVerdict::Error(message)),
            ..Default::default()
        }
    }

    /// The verdict as the access log names it.
    pub fn verdict_name(&self) -> &'static str {
        match self.verdict.0 {
            CustomVerdict::Allow => "allow",
            CustomVerdict::Deny(_) => "deny",
            CustomVerdict::Error(_) => "error",
        }
    }

    pub fn allowed(&self) -> bool {
        matches!(self.verdict.0, CustomVerdict::Allow)
    }

    /// `target` (path and query) with the authorizer's query edits.
    pub fn edit_query(&self, target: &str) -> String {
        if self.query_set.is_empty() && self.query_remove.is_empty() {
            return target.to_owned();
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut params: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let key_of = |k: &str| {
            percent_encoding::percent_decode_str(k)
                .decode_utf8_lossy()
                .into_owned()
        };
        params.retain(|(k, _)| !self.query_remove.iter().any(|r| *r == key_of(k)));
        for (key, value) in &self.query_set {
            let value = encode_query(value);
            match params.iter_mut().find(|(k, _)| key_of(k) == *key) {
                Some(slot) => slot.1 = value,
                None => params.push((encode_query(key), value)),
            }
        }
        if params.is_empty() {
            return path.to_owned();
        }
        let query: Vec<String> = params
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{path}?{}", query.join("&"))
    }
}

/// What a query key or value may hold unencoded (RFC 3986 unreserved).
const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode_query(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, QUERY).to_string()
}

/// Why a provider gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0}")]
    Request(String),
    #[error(transparent)]
    Http(#[from] hyper_util::client::legacy::Error),
    #[error("gRPC status {code:?}: {message}")]
    Grpc { code: tonic::Code, message: String },
}

/// The client every CUSTOM check goes through.
#[derive(Clone)]
pub struct ExtAuthz {
    http: http::HttpProvider,
    grpc: grpc::GrpcProvider,
}

impl ExtAuthz {
    /// `mesh` finds the authorizers that run in the mesh (reached over mutual
    /// TLS with secure naming); others are called in plaintext, through
    /// `dial` (the proxy's socket mark, so capture lets them out).
    pub fn new(mesh: MeshServices, dial: Dial) -> ExtAuthz {
        let plain = PlainDial {
            dial,
            timeout: CONNECT_TIMEOUT,
        };
        ExtAuthz {
            http: http::HttpProvider::new(mesh.clone(), plain),
            grpc: grpc::GrpcProvider::new(mesh, plain),
        }
    }

    /// Asks `provider` about `check`, within its timeout.
    pub async fn check(&self, provider: &ExtensionProvider, check: Check<'_>) -> ExtAuthzAnswer {
        let (service, port, timeout) = match (
            &provider.envoy_ext_authz_http,
            &provider.envoy_ext_authz_grpc,
        ) {
            (Some(h), _) => (&h.service, h.port, &h.timeout),
            (None, Some(g)) => (&g.service, g.port, &g.timeout),
            (None, None) => {
                return ExtAuthzAnswer::error(format!(
                    "provider {:?} is not an ext_authz provider",
                    provider.name
                ));
            }
        };
        let timeout = timeout
            .as_deref()
            .and_then(meshward_policy::duration::parse)
            .unwrap_or(DEFAULT_TIMEOUT);
        let asked = async {
            if let Some(h) = &provider.envoy_ext_authz_http {
                match check.http {
                    Some(request) => self.http.check(h, request).await,
                    None => Err(ProviderError::Request(
                        "an envoyExtAuthzHttp provider cannot check a TCP connection".into(),
                    )),
                }
            } else if let Some(g) = &provider.envoy_ext_authz_grpc {
                self.grpc.check(g, port, check).await
            } else {
                Err(ProviderError::Request("no provider".into()))
            }
        };
        match tokio::time::timeout(timeout, asked).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => ExtAuthzAnswer::error(format!(
                "provider {:?} ({}:{port}): {}",
                provider.name,
                service_host(service),
                meshward_identity::error_chain(&e)
            )),
            Err(_) => ExtAuthzAnswer::error(format!(
                "provider {:?} did not answer within {timeout:?}",
                provider.name
            )),
        }
    }
}

/// Connecting to an authorizer gives up after this (the check's own
/// `timeout` bounds the whole call).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Plaintext connections to an authorizer outside the mesh: its name
/// resolved at each connection, each address tried in turn, every socket
/// made by the proxy's [`Dial`] (with its `SO_MARK`, which the capture rules
/// exempt, so the call is not captured again).
#[derive(Debug, Clone, Copy)]
pub struct PlainDial {
    dial: Dial,
    timeout: Duration,
}

impl tower_service::Service<::http::Uri> for PlainDial {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: ::http::Uri) -> Self::Future {
        let this = *self;
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?;
            let port = uri.port_u16().unwrap_or(80);
            let mut failure = std::io::Error::other(format!("{host}: no address"));
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match this.dial.connect(addr, this.timeout).await {
                    Ok(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        return Ok(TokioIo::new(tcp));
                    }
                    Err(e) => failure = e,
                }
            }
            Err(failure)
        })
    }
}

/// `service` may be `namespace/host`; the host is what is dialed.
pub fn service_host(service: &str) -> &str {
    service.rsplit_once('/').map_or(service, |(_, host)| host)
}

/// The services of the mesh the proxy can reach: the `--upstream` targets
/// and, in transparent mode, the routing table the control plane fills.
#[derive(Clone, Default)]
pub struct MeshServices {
    pub upstreams: Vec<Arc<OutboundTarget>>,
    pub routes: Option<Arc<crate::transparent::Routes>>,
}

impl MeshServices {
    /// The target serving `host:port` (see [`same_service`]).
    pub fn find(&self, host: &str, port: u16) -> Option<Arc<OutboundTarget>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let names = |t: &OutboundTarget| {
            t.upstream.port == port && same_service(&t.upstream.service, &host)
        };
        self.upstreams
            .iter()
            .find(|t| names(t))
            .cloned()
            .or_else(|| self.routes.as_ref()?.find_target(|t| names(t)))
    }
}

/// Whether a provider's `host` names the mesh's `service`: the same name, a
/// shorter form of it that names the namespace (`ext-authz.foo` for
/// `ext-authz.foo.svc.cluster.local`),
/// or its Kubernetes form (`ext-authz.foo.svc.cluster.local` for a
/// ServiceEntry host `ext-authz.foo`), as Istio users write providers.
fn same_service(service: &str, host: &str) -> bool {
    let longer = |long: &str, short: &str| {
        long.strip_prefix(short)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some()
    };
    service == host
        // A bare name could be any namespace's: the namespace must be named.
        || (host.contains('.') && longer(service, host))
        || host
            .strip_prefix(service)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| rest == "svc" || rest.starts_with("svc."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(set: &[(&str, &str)], remove: &[&str]) -> ExtAuthzAnswer {
        ExtAuthzAnswer {
            query_set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            query_remove: remove.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn query_edits_replace_add_and_remove_parameters() {
        let a = answer(&[("user", "alice b"), ("new", "1")], &["token"]);
        assert_eq!(
            a.edit_query("/p?token=x&user=bob&keep=2"),
            "/p?user=alice%20b&keep=2&new=1"
        );
        assert_eq!(answer(&[], &["a"]).edit_query("/p?a=1"), "/p");
        assert_eq!(answer(&[], &[]).edit_query("/p?a=1&&b"), "/p?a=1&&b");
        assert_eq!(answer(&[("k", "v")], &[]).edit_query("/p"), "/p?k=v");
    }

    #[test]
    fn header_actions_follow_envoy() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        let n = |s: &'static str| HeaderName::from_static(s);
        let mut h = HeaderMap::new();
        h.insert("a", v("1"));
        h.insert("b", v("1"));
        let m = |name, action| HeaderMutation {
            name: n(name),
            value: v("2"),
            action,
        };
        apply_headers(
            &mut h,
            &[
                m("a", HeaderAction::Append),
                m("b", HeaderAction::AddIfAbsent),
                m("c", HeaderAction::AddIfAbsent),
                m("d", HeaderAction::OverwriteIfExists),
                m("b", HeaderAction::OverwriteIfExists),
                m("e", HeaderAction::Overwrite),
            ],
        );
        let all = |k| h.get_all(k).iter().cloned().collect::<Vec<_>>();
        assert_eq!(all("a"), [v("1"), v("2")]);
        assert_eq!(all("b"), [v("2")]);
        assert_eq!(all("c"), [v("2")]);
        assert!(h.get("d").is_none());
        assert_eq!(all("e"), [v("2")]);
    }

    #[test]
    fn providers_name_mesh_services_as_istio_users_write_them() {
        assert!(same_service("ext-authz.foo", "ext-authz.foo"));
        assert!(same_service(
            "ext-authz.foo.svc.cluster.local",
            "ext-authz.foo"
        ));
        assert!(same_service(
            "ext-authz.foo",
            "ext-authz.foo.svc.cluster.local"
        ));
        assert!(same_service("ext-authz.foo", "ext-authz.foo.svc"));
        assert!(!same_service("ext-authz.foo", "ext-authz.foobar"));
        assert!(!same_service("ext-authz.foo", "ext-authz.foo.evil.example"));
        assert!(
            !same_service("ext-authz.foo", "ext-authz"),
            "another namespace's, maybe"
        );
    }

    #[test]
    fn an_answer_never_built_does_not_allow() {
        assert!(!ExtAuthzAnswer::default().allowed());
    }
}
