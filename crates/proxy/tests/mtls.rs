//! Peer authentication and secure naming, on loopback with real clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use meshward_identity::spiffe::SpiffeId;
use meshward_identity::tls::TrustDomains;
use meshward_proxy::identity::WorkloadIdentity;
use meshward_proxy::testing::*;

/// A server proxy for `web` (identity web/sa/web) in front of an echo app.
async fn web(ca: &Ca, policies: &str, extra_inbound: &[&str]) -> (TestProxy, SocketAddr) {
    let app = echo_app("web").await;
    let mut inbound = vec![format!("0={app},protocol=http")];
    inbound.extend(
        extra_inbound
            .iter()
            .map(|s| s.replace("APP", &app.to_string())),
    );
    let proxy = start_proxy(ProxySpec {
        identity: ca.identity(&id("web", "web")),
        namespace: "web",
        labels: &[("app", "web")],
        inbound,
        upstreams: vec![],
        policies,
        mesh_config: None,
    })
    .await;
    (proxy, app)
}

/// A client workload's proxy (sleep/sa/sleep) with an upstream to `server`
/// that expects `expected` to run it.
async fn client(ca: &Ca, server: SocketAddr, expected: &SpiffeId, extra: &str) -> TestProxy {
    start_proxy(ProxySpec {
        identity: ca.identity(&id("sleep", "sleep")),
        namespace: "sleep",
        labels: &[("app", "sleep")],
        inbound: vec![],
        upstreams: vec![format!(
            "web.web:80=127.0.0.1:0,endpoint={server},identity={expected},protocol=http{extra}"
        )],
        policies: "",
        mesh_config: None,
    })
    .await
}

/// Inbound handshakes that ended with `result` (0 before the first).
fn handshakes(proxy: &TestProxy, result: &str) -> f64 {
    proxy
        .scrape()
        .get(
            "meshward_tls_handshakes_total",
            &[("direction", "inbound"), ("result", result)],
        )
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_and_certificates_from_another_ca() {
    let ca = Ca::new();
    let (server, _) = web(&ca, STRICT_NS, &[]).await;
    let port = server.inbound[0];

    // Plaintext: the handshake never starts, the connection is closed.
    assert!(get(port, "/", &[]).await.is_none());
    eventually("the plaintext refusal is logged", || {
        server.access_log().iter().any(|r| {
            r["decision"] == "deny"
                && r["stage"] == "peer_authentication"
                && r["reason"]
                    .as_str()
                    .unwrap()
                    .contains("plaintext connection refused: port")
        })
    })
    .await;

    // A certificate from another CA, for a mesh-looking identity.
    let other = Ca::new();
    let impostor = WorkloadIdentity {
        id: id("sleep", "sleep"),
        cert: other.cert(&id("sleep", "sleep")),
        bundle: ca.ca.bundle().clone(),
        trust_domains: TrustDomains(vec![TD.into()]),
        revocations: Default::default(),
    };
    let config = impostor
        .client_config(vec![id("web", "web")], &[b"http/1.1"])
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(port).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let outcome = async {
        let tls = connector
            .connect("web.web".try_into().unwrap(), tcp)
            .await
            .ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .ok()?;
        tokio::spawn(conn);
        let r = http::Request::get("/")
            .header("host", "web")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        sender.send_request(r).await.ok()
    }
    .await;
    assert!(outcome.is_none(), "a foreign CA's certificate was accepted");
    eventually("the unknown CA is counted", || {
        handshakes(&server, "unknown_ca") == 1.0
    })
    .await;
    assert_eq!(handshakes(&server, "not_tls"), 1.0);

    // The mesh's own client gets through.
    let sleep = client(&ca, port, &id("web", "web"), "").await;
    let (status, body, _) = get(sleep.outbound[0], "/hello", &[]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body)["path"], "/hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_mutual_tls_and_plaintext_on_one_port() {
    let ca = Ca::new();
    let (server, _) = web(&ca, "", &[]).await;
    let port = server.inbound[0];
    let sleep = client(&ca, port, &id("web", "web"), "").await;

    let (status, body, _) = get(port, "/plain", &[]).await.unwrap();
    assert_eq!(status, 200);
    assert!(seen(&body)["headers"]["x-forwarded-client-cert"].is_null());

    let (status, body, _) = get(sleep.outbound[0], "/mtls", &[]).await.unwrap();
    assert_eq!(status, 200);
    let xfcc = seen(&body)["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/web/sa/web;Hash="),
        "{xfcc}"
    );
    assert!(
        xfcc.ends_with(";URI=spiffe://cluster.local/ns/sleep/sa/sleep"),
        "{xfcc}"
    );

    // Records are written when a response ends, by the log thread.
    eventually("both requests are logged", || {
        server.access_log().len() == 2
    })
    .await;
    let log = server.access_log();
    let principals: Vec<&str> = log
        .iter()
        .filter_map(|r| r["source_principal"].as_str())
        .collect();
    assert_eq!(principals, ["spiffe://cluster.local/ns/sleep/sa/sleep"]);
    assert!(log.iter().all(|r| r["mtls_mode"] == "PERMISSIVE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_port_level_overrides() {
    let ca = Ca::new();
    // Workload STRICT, its second port DISABLE.
    let policies = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: web}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "18081": {mode: DISABLE}
"#;
    // The second port listens where the system chose; 18081 is only the
    // port policies name it by (`port=`), so no fixed port is bound.
    let (server, _) = web(&ca, policies, &["0=APP,protocol=http,port=18081"]).await;
    let (strict, disabled) = (server.inbound[0], server.inbound[1]);

    assert!(
        get(strict, "/", &[]).await.is_none(),
        "STRICT port served plaintext"
    );
    let refusal = format!(
        "plaintext connection refused: port {} requires mutual TLS (STRICT from web/web)",
        strict.port()
    );
    eventually("the STRICT port logs its refusal", || {
        server.access_log().iter().any(|r| {
            r["decision"] == "deny"
                && r["stage"] == "peer_authentication"
                && r["reason"] == refusal.as_str()
        })
    })
    .await;
    let (status, _, _) = get(disabled, "/", &[]).await.unwrap();
    assert_eq!(status, 200, "DISABLE port refused plaintext");

    let to_strict = client(&ca, strict, &id("web", "web"), "").await;
    let (status, _, _) = get(to_strict.outbound[0], "/", &[]).await.unwrap();
    assert_eq!(status, 200, "STRICT port refused mutual TLS");

    // Mutual TLS to a DISABLE port is refused, and the client's proxy says so.
    let to_disabled = client(&ca, disabled, &id("web", "web"), "").await;
    let (status, _, _) = get(to_disabled.outbound[0], "/", &[]).await.unwrap();
    assert_eq!(status, 503);
    eventually("the refusal names the port-level mode", || {
        server.access_log().iter().any(|r| {
            r["reason"].as_str().is_some_and(|s| {
                s.contains("port 18081 accepts plaintext only")
                    && s.contains("web/web portLevelMtls[18081]")
            })
        })
    })
    .await;

    // A client with tls=DISABLE reaches the DISABLE port in plaintext.
    let plain = client(&ca, disabled, &id("web", "web"), ",tls=DISABLE").await;
    let (status, _, _) = get(plain.outbound[0], "/", &[]).await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_naming_refuses_a_valid_certificate_for_the_wrong_identity() {
    let ca = Ca::new();
    // The workload behind the address has a good mesh certificate — as
    // `web/sa/impostor`, which is not allowed to run web.web.
    let (app, reached) = counting_echo_app("impostor").await;
    let impostor = start_proxy(ProxySpec {
        identity: ca.identity(&id("web", "impostor")),
        namespace: "web",
        labels: &[],
        inbound: vec![format!("0={app},protocol=http")],
        upstreams: vec![],
        policies: "",
        mesh_config: None,
    })
    .await;
    let sleep = client(&ca, impostor.inbound[0], &id("web", "web"), "").await;
    let (status, _, _) = get(sleep.outbound[0], "/", &[]).await.unwrap();
    assert_eq!(status, 503);
    // Istio's metrics (counted before the 503 is sent): an upstream failure,
    // and no destination principal — only a verified server names one.
    let scrape = sleep.scrape();
    let requests: Vec<_> = scrape
        .iter()
        .filter(|(name, _, _)| *name == "istio_requests_total")
        .collect();
    assert_eq!(requests.len(), 1, "{scrape}");
    let (_, labels, count) = requests[0];
    let label = |name: &str| labels[name].as_str();
    assert_eq!(
        (label("response_code"), label("response_flags"), count),
        ("503", "UF", 1.0)
    );
    assert_eq!(label("destination_principal"), "unknown");
    assert_eq!(label("destination_workload"), "unknown");
    assert_eq!(label("destination_service"), "web.web");
    eventually("the client's log says secure naming refused", || {
        sleep.access_log().iter().any(|r| {
            r["error"].as_str().is_some_and(|e| {
                e.contains("secure naming")
                    && e.contains("spiffe://cluster.local/ns/web/sa/impostor")
            })
        })
    })
    .await;
    // The impostor's proxy did complete a handshake (its certificate is a
    // valid mesh certificate), but the client refused to send it anything.
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the impostor's application was reached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_identity_headers_never_reach_the_application() {
    let ca = Ca::new();
    let (server, _) = web(&ca, "", &[]).await;
    let sleep = client(&ca, server.inbound[0], &id("web", "web"), "").await;
    let forged = [(
        "x-forwarded-client-cert",
        "By=spiffe://cluster.local/ns/web/sa/web;URI=spiffe://cluster.local/ns/admin/sa/root",
    )];
    // Through mutual TLS: replaced by the proxy's own value.
    let (_, body, _) = get(sleep.outbound[0], "/", &forged).await.unwrap();
    let xfcc = seen(&body)["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!xfcc.contains("admin"), "{xfcc}");
    assert!(xfcc.ends_with("URI=spiffe://cluster.local/ns/sleep/sa/sleep"));
    // Plaintext: removed.
    let (_, body, _) = get(server.inbound[0], "/", &forged).await.unwrap();
    assert!(seen(&body)["headers"]["x-forwarded-client-cert"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applications_own_tls_passes_through_a_permissive_port() {
    let ca = Ca::new();
    let app = tcp_echo().await;
    let server = start_proxy(ProxySpec {
        identity: ca.identity(&id("db", "db")),
        namespace: "db",
        labels: &[],
        inbound: vec![format!("0={app},protocol=tcp")],
        upstreams: vec![],
        policies: "",
        mesh_config: None,
    })
    .await;
    // A ClientHello without the mesh's ALPN marker, as an application's own
    // TLS client sends it: it must reach the application untouched.
    let config = rustls::ClientConfig::builder_with_provider(meshward_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        "db.example".try_into().unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.inbound[0])
        .await
        .unwrap();
    tcp.write_all(&hello).await.unwrap();
    let mut echoed = vec![0u8; hello.len()];
    tokio::time::timeout(SETTLE, tcp.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        echoed, hello,
        "the application's ClientHello did not pass through"
    );
}
