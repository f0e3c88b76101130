//! HTTP/1.1, HTTP/2 and gRPC through a pair of proxies with authorization,
//! JWT request authentication, CUSTOM ext_authz, logs, live policy changes,
//! and the request-hygiene limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshward_proxy::testing::*;

const ALLOW_GET_PUBLIC: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-public, namespace: web}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/sleep/sa/sleep"]}}]
    to: [{operation: {methods: ["GET", "POST"], paths: ["/public/*", "/pkg.Svc/Allowed"]}}]
"#;

struct Pair {
    server: TestProxy,
    client: TestProxy,
}

/// web (app `protocol` on its port) behind a server proxy; sleep's proxy
/// calls it over mutual TLS.
async fn pair(ca: &Ca, protocol: &str, policies: &str, mesh: Option<&str>) -> Pair {
    let app = echo_app("web").await;
    let server = start_proxy(ProxySpec {
        identity: ca.identity(&id("web", "web")),
        namespace: "web",
        labels: &[("app", "web")],
        inbound: vec![format!("0={app},protocol={protocol}")],
        upstreams: vec![],
        policies,
        mesh_config: mesh,
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
    Pair { server, client }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_are_authorized_and_the_deciding_policy_is_logged() {
    let ca = Ca::new();
    let p = pair(&ca, "http", ALLOW_GET_PUBLIC, None).await;
    let (status, body, _) = get(p.client.outbound[0], "/public/a?q=1", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body)["version"], "HTTP/1.1");
    assert_eq!(seen(&body)["path"], "/public/a?q=1");

    let (status, body, _) = get(p.client.outbound[0], "/admin", &[]).await.unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    // Path normalization: the path forwarded is the path authorized.
    let (status, body, _) = get(p.client.outbound[0], "/public/../admin", &[])
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    let (status, body, _) = get(p.client.outbound[0], "/public/x/../b", &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(seen(&body)["path"], "/public/b");

    eventually("the access log has the four decisions", || {
        p.server.access_log().len() >= 4
    })
    .await;
    let log = p.server.access_log();
    let allowed = log.iter().find(|r| r["path"] == "/public/a").unwrap();
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["policy"], "web/allow-public");
    assert_eq!(allowed["rule"], 0);
    assert_eq!(
        allowed["source_principal"],
        "spiffe://cluster.local/ns/sleep/sa/sleep"
    );
    assert_eq!(allowed["status"], 200);
    assert!(allowed["bytes_sent"].as_u64().unwrap() > 0);
    let denied = log.iter().find(|r| r["path"] == "/admin").unwrap();
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["status"], 403);
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("no ALLOW rule matched"),
        "{denied}"
    );
    let metrics = p.server.scrape();
    assert_eq!(
        metrics.get(
            "meshward_requests_total",
            &[
                ("direction", "inbound"),
                ("decision", "allow"),
                ("policy", "web/allow-public")
            ]
        ),
        Some(2.0),
        "{metrics}"
    );
    // Four client connections, one pooled mutual TLS connection between the proxies.
    assert_eq!(
        metrics.get(
            "meshward_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_pass_through_with_authorization() {
    let ca = Ca::new();
    let p = pair(&ca, "grpc", ALLOW_GET_PUBLIC, None).await;
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];

    let (status, _, body, trailers) =
        h2(p.client.outbound[0], "POST", "/pkg.Svc/Allowed", &grpc).await;
    assert_eq!(status, 200);
    assert_eq!(seen(&body)["version"], "HTTP/2.0");
    assert_eq!(
        trailers.unwrap()["grpc-status"],
        "0",
        "trailers cross both proxies"
    );

    let (status, headers, _, _) = h2(p.client.outbound[0], "POST", "/pkg.Svc/Denied", &grpc).await;
    assert_eq!(status, 200, "gRPC denials are trailers-only responses");
    assert_eq!(headers["grpc-status"], "7");
    assert_eq!(headers["grpc-message"], "RBAC: access denied");

    let (status, _, body, _) = h2(p.client.outbound[0], "GET", "/public/h2", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen(&body)["version"], "HTTP/2.0");
    let (status, _, _, _) = h2(p.client.outbound[0], "GET", "/private", &[]).await;
    assert_eq!(status, 403);
    let metrics = p.server.scrape();
    assert_eq!(
        metrics.get(
            "meshward_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        ),
        Some(1.0),
        "HTTP/2 requests share one connection: {metrics}"
    );
}

const JWT_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: web}
spec:
  jwtRules:
  - issuer: "https://issuer.test"
    jwks: |
      JWKS
    outputClaimToHeaders:
    - {header: x-jwt-sub, claim: sub}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: web}
spec:
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
"#;

fn mint(issuer: &str, exp_offset: i64) -> String {
    let key = std::fs::read("../policy/tests/keys/rsa.pem").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let claims = serde_json::json!({"iss": issuer, "sub": "alice", "exp": now + exp_offset});
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&key).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_valid_expired_missing_and_wrong_issuer() {
    let ca = Ca::new();
    let jwks = std::fs::read_to_string("../policy/tests/keys/jwks.json").unwrap();
    let policies = JWT_POLICIES.replace("JWKS", jwks.trim());
    let p = pair(&ca, "http", &policies, None).await;
    let out = p.client.outbound[0];
    let bearer = |t: String| format!("Bearer {t}");

    let valid = bearer(mint("https://issuer.test", 600));
    let (status, body, _) = get(
        out,
        "/",
        &[("authorization", &valid), ("x-jwt-sub", "mallory")],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        seen(&body)["headers"]["x-jwt-sub"],
        "alice",
        "claim header set, forged one gone"
    );

    let expired = bearer(mint("https://issuer.test", -600));
    let (status, body, headers) = get(out, "/", &[("authorization", &expired)]).await.unwrap();
    assert_eq!((status, body.as_str()), (401, "Jwt is expired"));
    let challenge = headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer realm=\"https://web.test/\""),
        "{challenge}"
    );

    let (status, body, _) = get(out, "/", &[("x-jwt-sub", "mallory")]).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (403, "RBAC: access denied"),
        "missing token"
    );

    let other = bearer(mint("https://other.test", 600));
    let (status, body, _) = get(out, "/", &[("authorization", &other)]).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (401, "Jwt issuer is not configured")
    );

    eventually("the JWT decisions are logged", || {
        p.server.access_log().len() >= 4
    })
    .await;
    let log = p.server.access_log();
    assert_eq!(log[0]["request_principal"], "https://issuer.test/alice");
    assert_eq!(log[1]["stage"], "request_authentication");
    assert_eq!(log[2]["policy"], "web/require-jwt");
    let text = std::fs::read_to_string(p.server.dir.path().join("access.log")).unwrap();
    assert!(!text.contains(&valid[7..]), "a token was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_in_the_directory_applies_to_the_next_request() {
    let ca = Ca::new();
    let p = pair(&ca, "http", "", None).await;
    let out = p.client.outbound[0];
    // One keep-alive connection through both proxies, kept across the change.
    let tcp = tokio::net::TcpStream::connect(out).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut send = async |path: &str| {
        let r = http::Request::get(path)
            .header("host", "web")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(r).await.unwrap();
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        status
    };
    assert_eq!(send("/admin").await, 200);
    std::fs::write(
        p.server.policy_dir().join("deny-admin.yaml"),
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: web}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"#,
    )
    .unwrap();
    eventually_async("the new policy to be applied", async || {
        send("/admin").await == 403
    })
    .await;
    assert_eq!(
        send("/other").await,
        200,
        "the same connection still serves"
    );

    // An invalid change is refused; the previous policies stay in force.
    std::fs::write(
        p.server.policy_dir().join("broken.yaml"),
        "kind: AuthorizationPolicy\nspec: {action: NOPE}\n",
    )
    .unwrap();
    eventually("the broken change is read and refused", || {
        p.server.store.refused().count == 1
    })
    .await;
    let refused = p.server.store.refused();
    let error = refused.last_error.unwrap();
    assert!(
        error.contains("broken.yaml") && error.contains("previous configuration stays in force"),
        "{error}"
    );
    assert_eq!(send("/admin").await, 403);
    assert_eq!(p.server.store.current().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_and_dry_run_records() {
    let ca = Ca::new();
    let policies = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: web}
spec:
  action: AUDIT
  rules: [{to: [{operation: {paths: ["/audited"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: would-deny
  namespace: web
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/audited"]}}]}]
"#;
    let p = pair(&ca, "http", policies, None).await;
    let (status, _, _) = get(p.client.outbound[0], "/audited", &[]).await.unwrap();
    assert_eq!(
        status, 200,
        "neither AUDIT nor dry-run changes the decision"
    );
    eventually("two audit records", || p.server.audit_log().len() == 2).await;
    let audit = p.server.audit_log();
    assert_eq!(audit[0]["type"], "audit");
    assert_eq!(audit[0]["policy"], "web/audit-all");
    assert_eq!(audit[1]["type"], "dry_run");
    assert_eq!(audit[1]["policy"], "web/would-deny");
    assert_eq!(audit[1]["result"], "deny");
    assert_eq!(audit[1]["decision"], "allow");
}

/// An HTTP authorizer: allows when `x-ext-authz: allow`, adding a header
/// for the application; denies otherwise with its own body.
async fn authorizer() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |r: http::Request<hyper::body::Incoming>| async move {
                        let allow = r.headers().get("x-ext-authz").is_some_and(|v| v == "allow");
                        let path_ok = r.uri().path().starts_with("/check/");
                        let response = if allow && path_ok {
                            http::Response::builder()
                                .status(200)
                                .header("x-ext-authz-check-result", "allowed")
                                .header("x-other", "no")
                        } else {
                            http::Response::builder()
                                .status(403)
                                .header("x-ext-authz-check-result", "denied")
                        };
                        Ok::<_, std::convert::Infallible>(
                            response
                                .body(Full::new(Bytes::from_static(b"denied by ext_authz")))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// Requests `proxy` reports (Istio's metrics) as 403s flagged `UAEX`:
/// denied by the CUSTOM authorizer.
fn denied_by_authorizer(proxy: &TestProxy) -> f64 {
    let scrape = proxy.scrape();
    scrape
        .iter()
        .filter(|(name, labels, _)| {
            *name == "istio_requests_total"
                && labels["response_flags"] == "UAEX"
                && labels["response_code"] == "403"
        })
        .map(|(_, _, value)| value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_authorization_asks_the_http_provider() {
    let ca = Ca::new();
    let authz = authorizer().await;
    let mesh = format!(
        r#"
extensionProviders:
- name: ext
  envoyExtAuthzHttp:
    service: 127.0.0.1
    port: {}
    pathPrefix: /check
    includeRequestHeadersInCheck: ["x-ext-authz"]
    headersToUpstreamOnAllow: ["x-ext-authz-check-result"]
    headersToDownstreamOnDeny: ["x-ext-authz-check-result"]
"#,
        authz.port()
    );
    let policies = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: web}
spec:
  action: CUSTOM
  provider: {name: ext}
  rules: [{to: [{operation: {paths: ["/guarded/*"]}}]}]
"#;
    let p = pair(&ca, "http", policies, Some(&mesh)).await;
    let out = p.client.outbound[0];
    let (status, body, _) = get(out, "/guarded/a", &[("x-ext-authz", "allow")])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        seen(&body)["headers"]["x-ext-authz-check-result"],
        "allowed"
    );
    assert!(seen(&body)["headers"]["x-other"].is_null());

    let (status, body, headers) = get(out, "/guarded/a", &[("x-ext-authz", "deny")])
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (403, "denied by ext_authz"));
    assert_eq!(headers["x-ext-authz-check-result"], "denied");
    // Istio's metrics flag it as Envoy's ext_authz does (counted before
    // the denial is sent).
    assert_eq!(denied_by_authorizer(&p.server), 1.0);

    let (status, _, _) = get(out, "/open", &[]).await.unwrap();
    assert_eq!(
        status, 200,
        "no CUSTOM rule matched: the provider is not asked"
    );

    // A provider that cannot be reached fails closed (failOpen is false):
    // nothing listens on its port, which must stay closed (never bound).
    let closed_port = closed_addr().port();
    let down = mesh.replace(
        &format!("port: {}", authz.port()),
        &format!("port: {closed_port}"),
    );
    let p = pair(&ca, "http", policies, Some(&down)).await;
    let (status, _, _) = get(
        p.client.outbound[0],
        "/guarded/a",
        &[("x-ext-authz", "allow")],
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "an unreachable provider fails closed");
    assert_eq!(denied_by_authorizer(&p.server), 1.0);
    let provider = format!("provider \"ext\" (127.0.0.1:{closed_port})");
    eventually("the provider error is logged", || {
        p.server.access_log().iter().any(|r| {
            r["decision"] == "deny"
                && r["status"] == 403
                && r["policy"] == "web/ext"
                && r["reason"].as_str().is_some_and(|s| s.contains(&provider))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_oversized_requests_are_refused() {
    let ca = Ca::new();
    let p = pair(&ca, "http", "", None).await;
    let port = p.server.inbound[0]; // PERMISSIVE: plaintext reaches the HTTP parser.

    // Both framings: Transfer-Encoding wins, Content-Length is dropped, and
    // the connection closes after the response (RFC 9112 §6.3), so a request
    // hidden after the body is never read.
    let both = raw_exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
    )
    .await;
    assert_eq!(both.matches("HTTP/1.1 ").count(), 1, "{both}");
    assert!(both.contains("connection: close"), "{both}");
    assert!(!both.contains("content-length\":"), "{both}");
    assert!(!both.contains("smuggled"), "{both}");

    let folded = raw_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: web\r\nX-A: a\r\n  folded\r\n\r\n",
    )
    .await;
    assert!(folded.starts_with("HTTP/1.1 400"), "{folded}");

    let two_lengths = raw_exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    )
    .await;
    assert!(two_lengths.starts_with("HTTP/1.1 400"), "{two_lengths}");

    let mut many = String::from("GET / HTTP/1.1\r\nHost: web\r\n");
    for i in 0..101 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let many = raw_exchange(port, many.as_bytes()).await;
    assert!(many.starts_with("HTTP/1.1 431"), "{many}");

    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: web\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let long = raw_exchange(port, long.as_bytes()).await;
    assert!(
        long.starts_with("HTTP/1.1 431") || long.starts_with("HTTP/1.1 414"),
        "{long}"
    );

    let nul = raw_exchange(port, b"GET /a%00b HTTP/1.1\r\nHost: web\r\n\r\n").await;
    assert!(nul.starts_with("HTTP/1.1 400"), "{nul}");

    // A Host that would put another path on the wire, or two Hosts.
    let host_path = raw_exchange(port, b"GET /public HTTP/1.1\r\nHost: web/admin?\r\n\r\n").await;
    assert!(host_path.starts_with("HTTP/1.1 400"), "{host_path}");
    let two_hosts = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");

    let (status, _, _) = get(port, "/fine", &[]).await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pausing_mid_method_is_still_read_as_http() {
    let ca = Ca::new();
    let app = echo_app("web").await;
    let server = start_proxy(ProxySpec {
        identity: ca.identity(&id("web", "web")),
        namespace: "web",
        labels: &[],
        inbound: vec![format!("0={app},protocol=auto")],
        upstreams: vec![],
        policies: "",
        mesh_config: None,
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(server.inbound[0])
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"G").await.unwrap();
    // The pause is the attack: it outlasts the wait for a connection's first
    // bytes several times over, so a detector that timed out into TCP here
    // would let the forged header through.
    let pause = meshward_proxy::config::Limits::default().detection_timeout * 4;
    tokio::time::sleep(pause).await; // pacing: the pause is what is tested
    tcp.write_all(b"ET / HTTP/1.1\r\nHost: web\r\nx-forwarded-client-cert: forged\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(SETTLE, tcp.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        !out.contains("forged"),
        "read as TCP: the forged header reached the app\n{out}"
    );
}
