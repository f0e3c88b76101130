//! CUSTOM authorization through Envoy's gRPC ext_authz API: a real gRPC
//! authorizer (envoy-types' `envoy.service.auth.v3.Authorization`, served by
//! tonic) behind real proxies and clients — allow with header and query
//! edits, denials with the authorizer's status, headers and body, timeouts
//! with failOpen, request bodies (whole, too long, partial, as bytes) for
//! gRPC and HTTP providers, TCP connections, and an authorizer inside the
//! mesh reached over mutual TLS with secure naming. The CheckRequest the
//! authorizer records is compared field by field with what Envoy sends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::address::Address as PbAddress;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as PbHeader, HeaderValueOption, QueryParameter, socket_address,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::pb::google::rpc::Status;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshward_proxy::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The test authorizer. HTTP requests: `x-authz: allow` allows with edits,
/// `x-authz: hang` never answers, anything else denies with 418. TCP
/// connections: allowed while `tcp_allow` is set. Every check is recorded,
/// with the caller's `x-forwarded-client-cert` when a proxy forwarded it.
#[derive(Clone, Default)]
struct Authorizer {
    seen: Arc<Mutex<Vec<CheckRequest>>>,
    xfcc: Arc<Mutex<Vec<String>>>,
    tcp_allow: Arc<AtomicBool>,
}

fn header(key: &str, value: &str, append_action: i32) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(PbHeader {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for Authorizer {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        if let Some(xfcc) = request.metadata().get("x-forwarded-client-cert") {
            self.xfcc
                .lock()
                .unwrap()
                .push(xfcc.to_str().unwrap().to_owned());
        }
        let check = request.into_inner();
        self.seen.lock().unwrap().push(check.clone());
        let http = check
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let ok = || CheckResponse {
            status: Some(Status::default()),
            ..Default::default()
        };
        let denied = || CheckResponse {
            status: Some(Status {
                code: 7,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 418 }),
                headers: vec![header("x-denied-by", "grpc-authorizer", 2)],
                body: "no tea for you".into(),
            })),
            dynamic_metadata: None,
        };
        let Some(http) = http else {
            let allowed = self.tcp_allow.load(Ordering::SeqCst);
            return Ok(tonic::Response::new(if allowed { ok() } else { denied() }));
        };
        let response = match http.headers.get("x-authz").map(String::as_str) {
            Some("allow") => CheckResponse {
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![
                        header("x-authz-user", "alice", 2),
                        header("x-appended", "second", 0),
                    ],
                    headers_to_remove: vec!["x-remove-me".into()],
                    response_headers_to_add: vec![header("x-authz-said", "yes", 2)],
                    query_parameters_to_set: vec![QueryParameter {
                        key: "user".into(),
                        value: "alice".into(),
                    }],
                    query_parameters_to_remove: vec!["token".into()],
                    ..Default::default()
                })),
                dynamic_metadata: Some(Struct {
                    fields: [(
                        "tenant".to_owned(),
                        Value {
                            kind: Some(value::Kind::StringValue("acme".into())),
                        },
                    )]
                    .into_iter()
                    .collect(),
                }),
                ..ok()
            },
            Some("hang") => std::future::pending().await,
            _ => denied(),
        };
        Ok(tonic::Response::new(response))
    }
}

impl Authorizer {
    /// Serves on 127.0.0.1, on a port the system chooses.
    async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = AuthorizationServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        addr
    }

    fn checks(&self) -> Vec<CheckRequest> {
        self.seen.lock().unwrap().clone()
    }
}

/// What the application received: head and exact body bytes.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

/// An HTTP/1.1 server that records every request whole and answers 200
/// with `answer`: the application, and an HTTP authorizer that allows.
async fn recorder(answer: &'static [u8]) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |r: http::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let (parts, body) = r.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            record.lock().unwrap().push(Received {
                                path: parts.uri.path_and_query().unwrap().to_string(),
                                headers: parts.headers,
                                body,
                            });
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(answer),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// The application: records every request.
async fn recording_app() -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    recorder(b"app").await
}

/// An HTTP/1.1 request through `addr` with `body`.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Bytes) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.web");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let response = tokio::time::timeout(SETTLE, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(SETTLE, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, headers, body)
}

const CUSTOM: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: web}
spec:
  action: CUSTOM
  provider: {name: grpc}
  rules: [{}]
"#;

fn grpc_mesh(authorizer: SocketAddr, extra: &str) -> String {
    format!(
        "extensionProviders:\n- name: grpc\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {}\n{extra}",
        authorizer.port()
    )
}

/// web's proxy in front of `app` (port `protocol`), and sleep's proxy
/// calling it over mutual TLS.
async fn pair(
    ca: &Ca,
    app: SocketAddr,
    protocol: &str,
    policies: &str,
    mesh: &str,
    upstreams: Vec<String>,
) -> (TestProxy, TestProxy) {
    let server = start_proxy(ProxySpec {
        identity: ca.identity(&id("web", "web")),
        namespace: "web",
        labels: &[("app", "web")],
        inbound: vec![format!("0={app},protocol={protocol}")],
        upstreams,
        policies,
        mesh_config: Some(mesh),
    })
    .await;
    let client = start_proxy(ProxySpec {
        identity: ca.identity(&id("sleep", "sleep")),
        namespace: "sleep",
        labels: &[],
        inbound: vec![],
        upstreams: vec![format!(
            "web.web:80=127.0.0.1:0,endpoint={},identity=spiffe://cluster.local/ns/web/sa/web,protocol={protocol}",
            server.inbound[0]
        )],
        policies: "",
        mesh_config: None,
    })
    .await;
    (server, client)
}

fn socket(address: &Option<envoy_types::pb::envoy::config::core::v3::Address>) -> SocketAddr {
    let Some(PbAddress::SocketAddress(s)) = address.as_ref().and_then(|a| a.address.clone()) else {
        panic!("not a socket address: {address:?}")
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = s.port_specifier else {
        panic!("no port: {s:?}")
    };
    SocketAddr::new(s.address.parse().unwrap(), port as u16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_provider_allows_with_edits_and_gets_the_check_request_envoy_sends() {
    let ca = Ca::new();
    let authz = Authorizer::default();
    let authz_addr = authz.start().await;
    let (app, received) = recording_app().await;
    let (server, client) = pair(&ca, app, "http", CUSTOM, &grpc_mesh(authz_addr, ""), vec![]).await;
    let before = std::time::SystemTime::now();
    let (status, headers, body) = send(
        client.outbound[0],
        "GET",
        "/items/./a?token=secret&keep=1",
        &[
            ("x-authz", "allow"),
            ("x-remove-me", "gone"),
            ("x-appended", "first"),
            ("X-Mixed-Case", "v"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(headers["x-authz-said"], "yes", "response_headers_to_add");

    // What the application received: the authorizer's edits applied.
    let got = received.lock().unwrap()[0].clone();
    assert_eq!(got.path, "/items/a?keep=1&user=alice", "query edits");
    assert_eq!(got.headers["x-authz-user"], "alice");
    let appended: Vec<_> = got.headers.get_all("x-appended").iter().collect();
    assert_eq!(appended, ["first", "second"], "APPEND_IF_EXISTS_OR_ADD");
    assert!(
        got.headers.get("x-remove-me").is_none(),
        "headers_to_remove"
    );

    // The CheckRequest, field by field, as Envoy's documentation of
    // AttributeContext describes each one for this request.
    let checks = authz.checks();
    assert_eq!(checks.len(), 1);
    let attrs = checks[0].attributes.clone().unwrap();
    let source = attrs.source.unwrap();
    // source.principal: the peer certificate's URI SAN.
    assert_eq!(source.principal, "spiffe://cluster.local/ns/sleep/sa/sleep");
    assert_eq!(socket(&source.address).ip().to_string(), "127.0.0.1");
    let destination = attrs.destination.unwrap();
    // destination.principal: the local certificate's URI SAN.
    assert_eq!(
        destination.principal,
        "spiffe://cluster.local/ns/web/sa/web"
    );
    assert_eq!(
        socket(&destination.address).port(),
        server.inbound[0].port()
    );
    let request = attrs.request.unwrap();
    // request.time: when the proxy got the request's first byte.
    let time = request.time.unwrap();
    let since = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    };
    assert!(time.seconds >= since(before) && time.seconds <= since(std::time::SystemTime::now()));
    let http = request.http.unwrap();
    // id: the stream id, a decimal number.
    assert!(http.id.parse::<u64>().is_ok(), "{}", http.id);
    assert_eq!(http.method, "GET");
    // path: the normalized path with the query; query and fragment stay empty.
    assert_eq!(http.path, "/items/a?token=secret&keep=1");
    assert_eq!(http.query, "");
    assert_eq!(http.fragment, "");
    assert_eq!(http.host, "web.web");
    // scheme of the downstream connection: mutual TLS.
    assert_eq!(http.scheme, "https");
    assert_eq!(http.protocol, "HTTP/1.1");
    // size: the Content-Length (0 here, as the client sent one).
    let length: i64 = http
        .headers
        .get("content-length")
        .map_or(-1, |v| v.parse().unwrap());
    assert_eq!(http.size, length);
    // headers: lower-cased keys, pseudo-headers included.
    let h: &HashMap<String, String> = &http.headers;
    assert_eq!(h[":authority"], "web.web");
    assert_eq!(h[":method"], "GET");
    assert_eq!(h[":path"], "/items/a?token=secret&keep=1");
    assert_eq!(h["x-mixed-case"], "v");
    assert_eq!(h["x-authz"], "allow");
    assert!(h.keys().all(|k| k.to_ascii_lowercase() == *k));
    assert!(
        !h.contains_key("x-forwarded-client-cert"),
        "never what the client claimed about identity"
    );
    // No body asked for: none sent.
    assert!(http.body.is_empty() && http.raw_body.is_empty());
    assert!(!h.contains_key("x-envoy-auth-partial-body"));

    // The verdict and the dynamic metadata are logged with the request.
    eventually("the access record", || {
        server.access_log().iter().any(|r| {
            r["ext_authz"] == "allow"
                && r["ext_authz_metadata"]["tenant"] == "acme"
                && r["status"] == 200
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_provider_denials_reach_the_client_with_status_headers_and_body() {
    let ca = Ca::new();
    let authz = Authorizer::default();
    let authz_addr = authz.start().await;
    let (app, received) = recording_app().await;
    let (server, client) = pair(&ca, app, "http", CUSTOM, &grpc_mesh(authz_addr, ""), vec![]).await;
    let (status, headers, body) = send(
        client.outbound[0],
        "GET",
        "/x",
        &[("x-authz", "no")],
        Vec::new(),
    )
    .await;
    assert_eq!((status, body.as_ref()), (418, b"no tea for you".as_ref()));
    assert_eq!(headers["x-denied-by"], "grpc-authorizer");
    assert!(
        received.lock().unwrap().is_empty(),
        "nothing reached the app"
    );
    eventually("the denial is logged", || {
        server.access_log().iter().any(|r| {
            r["decision"] == "deny" && r["ext_authz"] == "deny" && r["policy"] == "web/ext"
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_provider_timeouts_follow_fail_open_and_status_on_error() {
    let ca = Ca::new();
    let authz = Authorizer::default();
    let authz_addr = authz.start().await;
    let (app, received) = recording_app().await;
    let closed = grpc_mesh(
        authz_addr,
        "    timeout: 0.3s\n    statusOnError: \"503\"\n",
    );
    let (_server, client) = pair(&ca, app, "http", CUSTOM, &closed, vec![]).await;
    let (status, _, _) = send(
        client.outbound[0],
        "GET",
        "/x",
        &[("x-authz", "hang")],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 503, "failOpen false: statusOnError");
    assert!(received.lock().unwrap().is_empty());

    let open = grpc_mesh(authz_addr, "    timeout: 0.3s\n    failOpen: true\n");
    let (_server, client) = pair(&ca, app, "http", CUSTOM, &open, vec![]).await;
    let (status, _, _) = send(
        client.outbound[0],
        "GET",
        "/x",
        &[("x-authz", "hang")],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200, "failOpen true lets it through");
    assert_eq!(received.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_checked_and_the_application_gets_the_same_bytes() {
    let ca = Ca::new();
    let authz = Authorizer::default();
    let authz_addr = authz.start().await;
    let (app, received) = recording_app().await;
    let whole = grpc_mesh(
        authz_addr,
        "    includeRequestBodyInCheck: {maxRequestBytes: 16}\n",
    );
    let (_server, client) = pair(&ca, app, "http", CUSTOM, &whole, vec![]).await;
    let allow = [("x-authz", "allow")];

    let (status, _, _) = send(
        client.outbound[0],
        "POST",
        "/b",
        &allow,
        b"hello, body".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let http = |i: usize| {
        authz.checks()[i]
            .attributes
            .clone()
            .unwrap()
            .request
            .unwrap()
            .http
            .unwrap()
    };
    let checked = http(0);
    assert_eq!(checked.body, "hello, body");
    assert_eq!(checked.size, 11);
    assert_eq!(checked.headers["x-envoy-auth-partial-body"], "false");
    assert_eq!(received.lock().unwrap()[0].body, "hello, body");

    // Longer than maxRequestBytes: 413, the authorizer is not asked.
    let (status, _, _) = send(client.outbound[0], "POST", "/b", &allow, vec![b'x'; 17]).await;
    assert_eq!(status, 413);
    assert_eq!(authz.checks().len(), 1);
    assert_eq!(received.lock().unwrap().len(), 1);

    // allowPartialMessage: the first maxRequestBytes are checked, all of
    // it is forwarded; packAsBytes: the bytes as they are, in raw_body.
    let partial = grpc_mesh(
        authz_addr,
        "    includeRequestBodyInCheck: {maxRequestBytes: 16, allowPartialMessage: true, packAsBytes: true}\n",
    );
    let (_server, client) = pair(&ca, app, "http", CUSTOM, &partial, vec![]).await;
    let mut sent: Vec<u8> = (0..=255u8).collect();
    sent.extend_from_slice(&[0xff; 100_000]);
    let (status, _, _) = send(client.outbound[0], "POST", "/b", &allow, sent.clone()).await;
    assert_eq!(status, 200);
    let checked = http(1);
    assert_eq!(checked.raw_body, sent[..16]);
    assert!(checked.body.is_empty());
    assert_eq!(checked.headers["x-envoy-auth-partial-body"], "true");
    assert_eq!(
        received.lock().unwrap()[1].body,
        sent,
        "every byte, in order"
    );
}

/// An HTTP authorizer that records each check (head and body) and allows.
async fn http_authorizer() -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    recorder(b"").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_providers_get_the_body_too() {
    let ca = Ca::new();
    let (authz, bodies) = http_authorizer().await;
    let (app, received) = recording_app().await;
    let mesh = format!(
        "extensionProviders:\n- name: grpc\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {}\n    includeRequestBodyInCheck: {{maxRequestBytes: 64}}\n",
        authz.port()
    );
    let (_server, client) = pair(&ca, app, "http", CUSTOM, &mesh, vec![]).await;
    let (status, _, _) = send(client.outbound[0], "PUT", "/b", &[], b"{\"a\":1}".to_vec()).await;
    assert_eq!(status, 200);
    assert_eq!(bodies.lock().unwrap()[0].body, "{\"a\":1}");
    assert_eq!(received.lock().unwrap()[0].body, "{\"a\":1}");
    let (status, _, _) = send(client.outbound[0], "PUT", "/b", &[], vec![b'y'; 65]).await;
    assert_eq!(status, 413);
    assert_eq!(bodies.lock().unwrap().len(), 1);
}

/// A TCP application that counts the bytes it receives and echoes them.
async fn counting_tcp_app() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, b) = (accepted.clone(), bytes.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let b = b.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    b.fetch_add(n, Ordering::SeqCst);
                    if tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted, bytes)
}

/// Writes `msg` and reads until the echo or the close.
async fn exchange(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(msg).await;
    let mut out = vec![0u8; msg.len()];
    match tokio::time::timeout(SETTLE, tcp.read_exact(&mut out)).await {
        Ok(Ok(_)) => out,
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_checked_once_before_any_byte_reaches_the_application() {
    let ca = Ca::new();
    let authz = Authorizer::default();
    let authz_addr = authz.start().await;
    let (app, accepted, bytes) = counting_tcp_app().await;
    let (server, client) = pair(&ca, app, "tcp", CUSTOM, &grpc_mesh(authz_addr, ""), vec![]).await;

    // Denied: the application is never connected to, so no byte reaches it.
    assert!(exchange(client.outbound[0], b"secret").await.is_empty());
    assert_eq!(authz.checks().len(), 1);
    eventually("the denied connection is logged", || {
        server
            .access_log()
            .iter()
            .any(|r| r["protocol"] == "TCP" && r["decision"] == "deny" && r["ext_authz"] == "deny")
    })
    .await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    assert_eq!(bytes.load(Ordering::SeqCst), 0);
    // Istio's metrics flag it as Envoy's ext_authz does.
    let flagged: f64 = server
        .scrape()
        .iter()
        .filter(|(name, labels, _)| {
            *name == "istio_tcp_connections_opened_total" && labels["response_flags"] == "UAEX"
        })
        .map(|(_, _, value)| value)
        .sum();
    assert_eq!(flagged, 1.0);

    // Allowed: one check for the connection, whatever it carries.
    authz.tcp_allow.store(true, Ordering::SeqCst);
    let mut tcp = TcpStream::connect(client.outbound[0]).await.unwrap();
    for _ in 0..3 {
        tcp.write_all(b"ping").await.unwrap();
        let mut out = [0u8; 4];
        tokio::time::timeout(SETTLE, tcp.read_exact(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&out, b"ping");
    }
    assert_eq!(authz.checks().len(), 2, "one Check per connection");
    // TCP checks carry the connection attributes only.
    let attrs = authz.checks()[1].attributes.clone().unwrap();
    assert!(attrs.request.is_none());
    assert_eq!(
        attrs.source.unwrap().principal,
        "spiffe://cluster.local/ns/sleep/sa/sleep"
    );
    assert_eq!(
        attrs.destination.unwrap().principal,
        "spiffe://cluster.local/ns/web/sa/web"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_providers_are_ignored_on_tcp_as_istio_ignores_them() {
    let ca = Ca::new();
    let (authz, bodies) = http_authorizer().await;
    let app = tcp_echo().await;
    let mesh = format!(
        "extensionProviders:\n- name: grpc\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {}\n",
        authz.port()
    );
    let (_server, client) = pair(&ca, app, "tcp", CUSTOM, &mesh, vec![]).await;
    assert_eq!(exchange(client.outbound[0], b"hi").await, b"hi");
    assert!(
        bodies.lock().unwrap().is_empty(),
        "the HTTP provider was not asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_authorizer_in_the_mesh_is_reached_over_mutual_tls_with_secure_naming() {
    let ca = Ca::new();
    let authz = Authorizer::default();
    let authz_addr = authz.start().await;
    // The authorizer runs in the mesh, behind its own proxy (STRICT).
    let strict = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: authz}
spec: {mtls: {mode: STRICT}}
"#;
    let authz_proxy = start_proxy(ProxySpec {
        identity: ca.identity(&id("authz", "ext-authz")),
        namespace: "authz",
        labels: &[],
        inbound: vec![format!("0={authz_addr},protocol=grpc")],
        upstreams: vec![],
        policies: strict,
        mesh_config: None,
    })
    .await;
    let (app, received) = recording_app().await;
    let mesh = "extensionProviders:\n- name: grpc\n  envoyExtAuthzGrpc:\n    service: authz/ext-authz.authz.svc.cluster.local\n    port: 9000\n    timeout: 10s\n";
    let upstream = |identity: &str| {
        vec![format!(
            "ext-authz.authz.svc.cluster.local:9000=127.0.0.1:0,endpoint={},identity={identity},protocol=grpc",
            authz_proxy.inbound[0]
        )]
    };
    let (_server, client) = pair(
        &ca,
        app,
        "http",
        CUSTOM,
        mesh,
        upstream("spiffe://cluster.local/ns/authz/sa/ext-authz"),
    )
    .await;
    let (status, _, _) = send(
        client.outbound[0],
        "GET",
        "/m",
        &[("x-authz", "allow")],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(received.lock().unwrap().len(), 1);
    // The authorizer's proxy saw web's certificate.
    let xfcc = authz.xfcc.lock().unwrap().clone();
    assert_eq!(xfcc.len(), 1);
    assert!(
        xfcc[0].ends_with("URI=spiffe://cluster.local/ns/web/sa/web"),
        "{xfcc:?}"
    );

    // Secure naming: a server not allowed to run the service is refused,
    // and the check fails closed.
    let (server, client) = pair(
        &ca,
        app,
        "http",
        CUSTOM,
        mesh,
        upstream("spiffe://cluster.local/ns/authz/sa/someone-else"),
    )
    .await;
    let (status, _, _) = send(
        client.outbound[0],
        "GET",
        "/m",
        &[("x-authz", "allow")],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 403);
    eventually("the refused authorizer is logged", || {
        server.access_log().iter().any(|r| {
            r["ext_authz"] == "error"
                && r["reason"].as_str().is_some_and(|s| {
                    s.contains("secure naming: the server is spiffe://cluster.local/ns/authz/sa/ext-authz, which is not allowed to run this service")
                })
        })
    })
    .await;
    assert_eq!(
        authz.checks().len(),
        1,
        "the impostor check never reached it"
    );
    assert_eq!(received.lock().unwrap().len(), 1);
}

/// Sends the head of a POST whose body comes from `body` (chunked, it ends
/// when the sender is dropped) and returns the response's status.
async fn streaming_post(
    addr: SocketAddr,
    body: tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
) -> u16 {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body));
    let request = http::Request::post("/stream")
        .header("host", "web.web")
        .header("x-authz", "allow")
        .body(body)
        .unwrap();
    let response = tokio::time::timeout(SETTLE, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_bodies_are_checked_without_waiting_for_their_end() {
    let ca = Ca::new();
    let authz = Authorizer::default();
    let authz_addr = authz.start().await;
    let (app, received) = recording_app().await;
    let data = |s: &'static [u8]| Ok(hyper::body::Frame::data(Bytes::from_static(s)));

    // Over the limit while the client is still sending: 413 at once, the
    // rest never read (the sender stays open until the answer is in).
    let whole = grpc_mesh(
        authz_addr,
        "    includeRequestBodyInCheck: {maxRequestBytes: 16}\n",
    );
    let (_server, client) = pair(&ca, app, "http", CUSTOM, &whole, vec![]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(data(b"0123456789abcdefg")).await.unwrap();
    assert_eq!(streaming_post(client.outbound[0], rx).await, 413);
    assert!(authz.checks().is_empty());
    drop(tx);

    // allowPartialMessage: checked once maxRequestBytes are in, while the
    // client has not finished; then every byte reaches the application.
    let partial = grpc_mesh(
        authz_addr,
        "    includeRequestBodyInCheck: {maxRequestBytes: 16, allowPartialMessage: true}\n",
    );
    let (_server, client) = pair(&ca, app, "http", CUSTOM, &partial, vec![]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(data(b"0123456789abcdefgh")).await.unwrap();
    let post = tokio::spawn(streaming_post(client.outbound[0], rx));
    eventually("the check before the body ends", || {
        authz.checks().len() == 1
    })
    .await;
    tx.send(data(b"-and-the-rest")).await.unwrap();
    drop(tx);
    assert_eq!(post.await.unwrap(), 200);
    let http = authz.checks()[0]
        .attributes
        .clone()
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap();
    assert_eq!(http.body, "0123456789abcdef");
    assert_eq!(http.headers["x-envoy-auth-partial-body"], "true");
    assert_eq!(
        received.lock().unwrap()[0].body,
        "0123456789abcdefgh-and-the-rest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_authorizer_in_the_mesh_is_reached_over_mutual_tls() {
    let ca = Ca::new();
    let (authz_addr, checks) = http_authorizer().await;
    let authz_proxy = start_proxy(ProxySpec {
        identity: ca.identity(&id("authz", "ext-authz")),
        namespace: "authz",
        labels: &[],
        inbound: vec![format!("0={authz_addr},protocol=http")],
        upstreams: vec![],
        policies: "",
        mesh_config: None,
    })
    .await;
    let (app, received) = recording_app().await;
    let mesh = "extensionProviders:\n- name: grpc\n  envoyExtAuthzHttp:\n    service: ext-authz.authz.svc.cluster.local\n    port: 8000\n    pathPrefix: /check\n";
    let upstream = vec![format!(
        "ext-authz.authz.svc.cluster.local:8000=127.0.0.1:0,endpoint={},identity=spiffe://cluster.local/ns/authz/sa/ext-authz,protocol=http",
        authz_proxy.inbound[0]
    )];
    let (_server, client) = pair(&ca, app, "http", CUSTOM, mesh, upstream).await;
    let (status, _, _) = send(client.outbound[0], "GET", "/m?q=1", &[], Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(received.lock().unwrap().len(), 1);
    let check = checks.lock().unwrap()[0].clone();
    assert_eq!(check.path, "/check/m?q=1");
    let xfcc = check.headers["x-forwarded-client-cert"].to_str().unwrap();
    assert!(
        xfcc.ends_with("URI=spiffe://cluster.local/ns/web/sa/web"),
        "the authorizer's proxy saw web's certificate: {xfcc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_grpc_provider_fails_closed_and_says_why() {
    let ca = Ca::new();
    let (app, received) = recording_app().await;
    // Nothing listens on this port (never bound).
    let closed = closed_addr();
    let (server, client) = pair(&ca, app, "http", CUSTOM, &grpc_mesh(closed, ""), vec![]).await;
    let (status, _, _) = send(
        client.outbound[0],
        "GET",
        "/x",
        &[("x-authz", "allow")],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 403);
    assert!(received.lock().unwrap().is_empty());
    let why = format!(
        "provider \"grpc\" (127.0.0.1:{}): gRPC status Unavailable: transport error: Connection refused",
        closed.port()
    );
    eventually("the refused connection is logged", || {
        server.access_log().iter().any(|r| {
            r["ext_authz"] == "error" && r["reason"].as_str().is_some_and(|s| s.contains(&why))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_checked_with_their_message_and_keep_their_trailers() {
    let ca = Ca::new();
    let authz = Authorizer::default();
    let authz_addr = authz.start().await;
    let app = echo_app("web").await;
    let mesh = grpc_mesh(
        authz_addr,
        "    includeRequestBodyInCheck: {maxRequestBytes: 64, packAsBytes: true}\n",
    );
    let (_server, client) = pair(&ca, app, "grpc", CUSTOM, &mesh, vec![]).await;
    let grpc = [("content-type", "application/grpc"), ("x-authz", "allow")];
    let (status, _, body, trailers) = h2(client.outbound[0], "POST", "/pkg.Svc/Call", &grpc).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body)["headers"]["x-authz-user"], "alice");
    assert_eq!(
        trailers.unwrap()["grpc-status"],
        "0",
        "the application's trailers"
    );
    let http = authz.checks()[0]
        .attributes
        .clone()
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap();
    assert_eq!(http.protocol, "HTTP/2");
    assert_eq!(http.path, "/pkg.Svc/Call");
    assert_eq!(http.raw_body, [0u8; 5], "the gRPC message, as bytes");
    assert_eq!(http.headers["content-type"], "application/grpc");

    // Denied (418): a gRPC caller gets a gRPC status, not the authorizer's
    // body: 418 is UNKNOWN (2) in Envoy's HTTP-to-gRPC status mapping.
    let grpc = [("content-type", "application/grpc"), ("x-authz", "no")];
    let (status, headers, _, _) = h2(client.outbound[0], "POST", "/pkg.Svc/Call", &grpc).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "2");
}
