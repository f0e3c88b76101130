//! What both directions do with HTTP: reading a request for the policy
//! engine, local replies, forwarding hygiene and byte counting.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use meshward_policy::HttpRequest;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends: a forwarded one or a local reply.
pub type Body = BoxBody<Bytes, BoxError>;

pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// A header's value as text: as it is when it is UTF-8 (nearly always,
/// and checked fast), else with each invalid byte replaced.
fn text(value: &HeaderValue) -> String {
    match std::str::from_utf8(value.as_bytes()) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
    }
}

/// The request as the policy engine reads it. An absolute-form HTTP/1
/// target, and CONNECT's authority form, are kept whole, so the engine
/// refuses them as Envoy does.
pub fn policy_request<B>(request: &Request<B>) -> HttpRequest {
    let uri = request.uri();
    let absolute = request.version() != Version::HTTP_2 && uri.scheme().is_some();
    let path = if absolute || request.method() == http::Method::CONNECT {
        uri.to_string()
    } else {
        uri.path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned())
    };
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| request.headers().get(header::HOST).map(text))
        .unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), text(v)))
        .collect();
    HttpRequest {
        method: request.method().as_str().to_owned(),
        path,
        host,
        headers,
        remote_ip: None::<IpAddr>,
    }
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status a local reply maps to, as Envoy maps them.
fn grpc_status(status: u16) -> u8 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// A reply made by the proxy itself. gRPC callers get a trailers-only
/// response whose `grpc-status` says what the HTTP status would have.
pub fn local_reply(status: u16, message: &str, grpc: bool) -> Response<Body> {
    let mut response = if grpc {
        let mut r = Response::new(full(Bytes::new()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(grpc_status(status))),
        );
        let encoded = percent_encode(message);
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(message.to_owned()));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    response
        .headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("meshward"));
    response
}

fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A 400 that also ends the connection: after a malformed request, what
/// follows on the connection cannot be trusted to be framed as intended.
pub fn bad_request(grpc: bool) -> Response<Body> {
    let mut response = local_reply(400, "Bad Request", grpc);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Connection-level headers are for one hop only (RFC 9110 §7.6.1), and
/// HTTP/2 forbids them outright.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    // `te: trailers` is the one value that may cross (gRPC needs it).
    let trailers_only = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
}

/// Sets the headers of `edits` on `headers`. A value HTTP cannot carry
/// (a claim with a newline) is left out rather than sent broken.
pub fn apply_edits(headers: &mut HeaderMap, remove: &[String], set: &[(String, String)]) {
    for name in remove {
        headers.remove(name.as_str());
    }
    for (name, value) in set {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                headers.insert(name, value);
            }
            _ => tracing::debug!(header = %name, "a header value is not valid in HTTP; not set"),
        }
    }
}

/// Removes one trailing dot from the request's host, in the URI's authority
/// and in `Host`, before anything reads them, as Envoy's
/// `strip_trailing_host_dot` does: the engine authorizes, and the
/// application receives, `blocked.example`, never `blocked.example.`.
pub fn strip_trailing_host_dot<B>(request: &mut Request<B>) {
    use meshward_policy::request::strip_trailing_host_dot as strip;
    if let Some(authority) = request
        .uri()
        .authority()
        .and_then(|a| strip(a.as_str()))
        .and_then(|a| Authority::try_from(a).ok())
    {
        let mut parts = request.uri().clone().into_parts();
        parts.authority = Some(authority);
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    let hosts: Vec<HeaderValue> = request
        .headers()
        .get_all(header::HOST)
        .iter()
        .cloned()
        .collect();
    let stripped = |value: &HeaderValue| {
        value
            .to_str()
            .ok()
            .and_then(strip)
            .and_then(|s| HeaderValue::from_str(&s).ok())
    };
    if hosts.iter().any(|h| stripped(h).is_some()) {
        request.headers_mut().remove(header::HOST);
        for host in hosts {
            let value = stripped(&host).unwrap_or(host);
            request.headers_mut().append(header::HOST, value);
        }
    }
}

/// Why a request names no authority the proxy can authorize and forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadAuthority {
    /// Neither `:authority` nor `Host`: HTTP/1.1 requires `Host` (RFC 9112
    /// §3.2), and Envoy refuses any request without one.
    #[error("bad request: no Host header (HTTP/1.1 requires one, RFC 9112 §3.2)")]
    Missing,
    /// User info, a path or query smuggled into it, or `Host` repeated.
    #[error("bad request: the authority (Host) is not HOST[:PORT], or is repeated")]
    Invalid,
}

/// The authority a request is for (`:authority`, else the one `Host`), or
/// `fallback` when it names none. Refused when it is not a plain
/// `host[:port]` or `Host` is repeated: the authority authorized must be the
/// one the application gets.
pub fn request_authority<B>(
    request: &Request<B>,
    fallback: Option<&str>,
) -> Result<Authority, BadAuthority> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(BadAuthority::Invalid);
    }
    let text = match (request.uri().authority(), first, fallback) {
        (Some(a), _, _) => a.as_str().to_owned(),
        (None, Some(h), _) => h.to_str().map_err(|_| BadAuthority::Invalid)?.to_owned(),
        (None, None, Some(fallback)) => fallback.to_owned(),
        (None, None, None) => return Err(BadAuthority::Missing),
    };
    if text.is_empty() || text.contains(['@', '/', '?', '#']) {
        return Err(BadAuthority::Invalid);
    }
    Authority::try_from(text).map_err(|_| BadAuthority::Invalid)
}

/// What the upstream gets: the URI `http://AUTHORITY` + the path as
/// authorized + the original query, and the authority in `Host` for
/// HTTP/1.1 (HTTP/2 carries it in `:authority`).
pub fn set_upstream_target(
    parts: &mut http::request::Parts,
    authority: &Authority,
    path: &str,
    original_target: &str,
) -> Option<()> {
    let query =
        &original_target[meshward_policy::authz::normalize::strip_query(original_target).len()..];
    let path_and_query = PathAndQuery::try_from(format!("{path}{query}")).ok()?;
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query(path_and_query)
        .build()
        .ok()?;
    if parts.version == Version::HTTP_2 {
        parts.headers.remove(header::HOST);
    } else {
        parts.headers.insert(
            header::HOST,
            HeaderValue::from_str(authority.as_str()).ok()?,
        );
    }
    Some(())
}

/// The response body for the client: counted, and the access record
/// written (with bytes both ways and the duration) when it ends or is
/// abandoned.
///
/// `done` runs then too, first, with what the body showed and the request
/// body's bytes: Istio's metrics are counted, and whatever it holds is
/// released (an endpoint counted busy while its response streams, for
/// least-request balancing).
pub fn logged_response_body<F>(
    body: hyper::body::Incoming,
    mut record: crate::log::AccessRecord,
    received: Arc<AtomicU64>,
    started: std::time::Instant,
    access: crate::log::LogSink,
    done: F,
) -> Body
where
    F: FnOnce(&BodyEnd, u64) + Send + Sync + Unpin + 'static,
{
    OnDone::new(body, move |end: &BodyEnd| {
        let request_bytes = received.load(Ordering::Relaxed);
        done(end, request_bytes);
        record.bytes_received = request_bytes;
        record.bytes_sent = end.bytes;
        record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        access.write(&record);
    })
    .map_err(|e| Box::new(e) as BoxError)
    .boxed()
}

/// The `grpc-status` of a response's headers (a trailers-only response)
/// or trailers: one of gRPC's codes (0 to 16). Any other value, which an
/// upstream could vary at will, is none, so it never becomes a label value.
pub fn grpc_status_in(headers: &HeaderMap) -> Option<u32> {
    let status: u32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    (status <= 16).then_some(status)
}

/// Counts the bytes of a body as they pass.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Counted<B> {
        Counted { inner, count }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a response body showed by the time it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyEnd {
    /// Data bytes passed on.
    pub bytes: u64,
    /// The `grpc-status` of its trailers.
    pub grpc_status: Option<u32>,
}

/// A body that counts its bytes, notes a `grpc-status` trailer, and runs a
/// closure with both when it is finished or abandoned: the access log is
/// written, and Istio's metrics counted, when the exchange is really over.
pub struct OnDone<B, F: FnOnce(&BodyEnd)> {
    inner: B,
    end: BodyEnd,
    done: Option<F>,
}

impl<B, F: FnOnce(&BodyEnd)> OnDone<B, F> {
    pub fn new(inner: B, done: F) -> OnDone<B, F> {
        OnDone {
            inner,
            end: BodyEnd::default(),
            done: Some(done),
        }
    }
}

impl<B, F: FnOnce(&BodyEnd)> Drop for OnDone<B, F> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(&self.end);
        }
    }
}

impl<B, F> HttpBody for OnDone<B, F>
where
    B: HttpBody<Data = Bytes> + Unpin,
    F: FnOnce(&BodyEnd) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.end.bytes += data.len() as u64;
            } else if let Some(status) = frame.trailers_ref().and_then(grpc_status_in) {
                self.end.grpc_status = Some(status);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_do_not_cross() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::UPGRADE).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-keep").unwrap(), "1");
    }

    #[test]
    fn absolute_form_reaches_the_engine_whole() {
        let r = Request::get("http://evil/admin").body(()).unwrap();
        assert_eq!(policy_request(&r).path, "http://evil/admin");
        let r = Request::get("/a?b=c")
            .header("host", "Web:80")
            .body(())
            .unwrap();
        let p = policy_request(&r);
        assert_eq!((p.path.as_str(), p.host.as_str()), ("/a?b=c", "Web:80"));
    }

    #[test]
    fn the_upstream_gets_the_authorized_path_and_authority() {
        let (mut parts, _) = Request::get("/a/../admin?x=1")
            .header("host", "svc:80")
            .body(())
            .unwrap()
            .into_parts();
        let authority = Authority::from_static("svc:80");
        set_upstream_target(&mut parts, &authority, "/admin", "/a/../admin?x=1").unwrap();
        assert_eq!(parts.uri.to_string(), "http://svc:80/admin?x=1");
        assert_eq!(parts.headers["host"], "svc:80");
    }

    #[test]
    fn a_host_that_is_not_an_authority_is_refused() {
        let with = |host: &str| {
            let r = Request::get("/public")
                .header("host", host)
                .body(())
                .unwrap();
            request_authority(&r, None).map(|a| a.to_string())
        };
        assert_eq!(with("web:80").as_deref(), Ok("web:80"));
        assert_eq!(with("web/admin?"), Err(BadAuthority::Invalid));
        assert_eq!(with("user@web"), Err(BadAuthority::Invalid));
        assert_eq!(with("web#x"), Err(BadAuthority::Invalid));
        assert_eq!(with(""), Err(BadAuthority::Invalid));
        let twice = Request::get("/")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap();
        assert_eq!(
            request_authority(&twice, Some("x:1")),
            Err(BadAuthority::Invalid)
        );
        let none = Request::get("/").body(()).unwrap();
        assert_eq!(request_authority(&none, None), Err(BadAuthority::Missing));
        assert_eq!(
            request_authority(&none, Some("127.0.0.1:1")).unwrap(),
            "127.0.0.1:1"
        );
    }

    #[test]
    fn a_trailing_host_dot_is_removed_before_anything_reads_the_host() {
        let mut r = Request::get("/")
            .header("host", "blocked.example.:8080")
            .body(())
            .unwrap();
        strip_trailing_host_dot(&mut r);
        assert_eq!(r.headers()["host"], "blocked.example:8080");
        assert_eq!(policy_request(&r).host, "blocked.example:8080");
        let mut r = Request::get("http://blocked.example./x").body(()).unwrap();
        strip_trailing_host_dot(&mut r);
        assert_eq!(r.uri().to_string(), "http://blocked.example/x");
        let mut r = Request::get("/").header("host", "web:80").body(()).unwrap();
        strip_trailing_host_dot(&mut r);
        assert_eq!(r.headers()["host"], "web:80");
    }

    #[test]
    fn only_grpcs_own_status_codes_are_read() {
        let status = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_str(value).unwrap());
            grpc_status_in(&h)
        };
        assert_eq!(status("0"), Some(0));
        assert_eq!(status("16"), Some(16));
        for bad in ["17", "4294967295", "-1", "ok", ""] {
            assert_eq!(status(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_status_in(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_replies_carry_the_status_in_headers() {
        let r = local_reply(403, "RBAC: access denied", true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["grpc-message"], "RBAC: access denied");
        let r = local_reply(401, "Jwt is missing", false);
        assert_eq!(r.status(), 401);
    }
}
