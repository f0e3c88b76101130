//! TCP through a proxy pair: authorization per connection, closing on a
//! policy change, and certificate rotation under continuous traffic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshward_identity::service::{self, BootstrapTokens, CallerAuthenticator, ClientCertificates};
use meshward_identity::tls::TrustDomains;
use meshward_identity::token::TokenAuthority;
use meshward_proxy::identity::WorkloadIdentity;
use meshward_proxy::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn tcp_pair(
    ca: &Ca,
    server_id: WorkloadIdentity,
    client_id: WorkloadIdentity,
    policies: &str,
) -> (TestProxy, TestProxy) {
    let app = tcp_echo().await;
    let server = start_proxy(ProxySpec {
        identity: server_id,
        namespace: "db",
        labels: &[("app", "db")],
        inbound: vec![format!("0={app},protocol=tcp")],
        upstreams: vec![],
        policies,
        mesh_config: None,
    })
    .await;
    let client = start_proxy(ProxySpec {
        identity: client_id,
        namespace: "sleep",
        labels: &[],
        inbound: vec![],
        upstreams: vec![format!(
            "db.db:5432=127.0.0.1:0,endpoint={},identity=spiffe://cluster.local/ns/db/sa/db,protocol=tcp",
            server.inbound[0]
        )],
        policies: "",
        mesh_config: None,
    })
    .await;
    let _ = ca;
    (server, client)
}

/// Sends `msg` and reads the echo; `None` if the connection closes first.
async fn echo_once(stream: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
    stream.write_all(msg).await.ok()?;
    let mut buf = vec![0u8; msg.len()];
    match tokio::time::timeout(SETTLE, stream.read_exact(&mut buf)).await {
        Ok(Ok(_)) => Some(buf),
        _ => None,
    }
}

const DENY_SLEEP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: db}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["sleep"]}}]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_tcp_connections_are_closed_and_a_policy_change_closes_open_ones() {
    let ca = Ca::new();
    let (server, client) = tcp_pair(
        &ca,
        ca.identity(&id("db", "db")),
        ca.identity(&id("sleep", "sleep")),
        "",
    )
    .await;

    let mut open = TcpStream::connect(client.outbound[0]).await.unwrap();
    assert_eq!(echo_once(&mut open, b"ping").await.unwrap(), b"ping");
    // Half-close: the client stops sending and still reads the echo of what it sent.
    let mut half = TcpStream::connect(client.outbound[0]).await.unwrap();
    half.write_all(b"last words").await.unwrap();
    half.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(SETTLE, half.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"last words");

    // The policy changes: the open connection is closed, new ones are refused.
    server.set_policies(DENY_SLEEP);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(SETTLE, open.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "the connection stayed open");

    let mut fresh = TcpStream::connect(client.outbound[0]).await.unwrap();
    assert!(
        echo_once(&mut fresh, b"ping").await.is_none(),
        "a denied connection echoed"
    );

    eventually("both closures are logged", || {
        let log = server.access_log();
        log.iter().any(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("closed: the policies changed"))
        }) && log.iter().any(|r| {
            r["decision"] == "deny" && r["policy"] == "db/deny-sleep" && r["protocol"] == "TCP"
        })
    })
    .await;
}

/// A CA serving Istio's certificate API on loopback, and agents that renew
/// short-lived certificates from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_continuous_traffic_fails_no_request() {
    let ca = Ca::new();
    let tokens_dir = tempfile::tempdir().unwrap();
    let tokens = TokenAuthority::load_or_create(tokens_dir.path(), TD).unwrap();
    let server_cert = service::ServerCertificate::start(
        ca.ca.clone(),
        "istio-system".into(),
        vec![],
        Duration::from_secs(3600),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ca_addr = listener.local_addr().unwrap();
    let authenticators: Vec<Box<dyn CallerAuthenticator>> = vec![
        Box::new(BootstrapTokens(
            TokenAuthority::load_or_create(tokens_dir.path(), TD).unwrap(),
        )),
        Box::new(ClientCertificates {
            bundle: ca.ca.bundle().clone(),
            trust_domain: TD.into(),
        }),
    ];
    let watched = server_cert.cert.clone();
    let ca_for_server = ca.ca.clone();
    tokio::spawn(async move {
        let _keep = server_cert;
        service::serve(
            listener,
            ca_for_server,
            watched,
            authenticators,
            std::future::pending(),
        )
        .await
    });
    let agent_identity = |ns: &str, sa: &str| {
        let sid = id(ns, sa);
        let mut config = meshward_identity::agent::AgentConfig::new(
            sid.clone(),
            format!("https://{ca_addr}"),
            "localhost".into(),
            ca.ca.bundle().clone(),
            Some(tokens.create(&sid, Duration::from_secs(600)).unwrap()),
        );
        // Renewed at about half the lifetime: every ~2 s.
        config.ttl = Some(Duration::from_secs(4));
        let (cert, _task) = meshward_identity::agent::start(config);
        WorkloadIdentity {
            id: sid,
            cert,
            bundle: ca.ca.bundle().clone(),
            trust_domains: TrustDomains(vec![TD.into()]),
            revocations: Default::default(),
        }
    };
    let server_identity = agent_identity("db", "db");
    let client_identity = agent_identity("sleep", "sleep");
    let (server_cert, client_cert) = (server_identity.clone(), client_identity.clone());
    eventually("both agents have certificates", || {
        server_cert.has_certificate() && client_cert.has_certificate()
    })
    .await;
    let (server, client) = tcp_pair(&ca, server_identity, client_identity, "").await;

    // Every exchange opens a new connection: a new mutual TLS handshake with
    // whatever certificates are current. Traffic runs until the server's
    // certificate has rotated twice under it and 100 exchanges were made,
    // however long the machine takes (bounded).
    let failures = Arc::new(AtomicU64::new(0));
    let exchanges = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut serials = std::collections::BTreeSet::new();
    let target = client.outbound[0];
    let mut workers = Vec::new();
    for w in 0..4u8 {
        let (failures, exchanges, stop) = (failures.clone(), exchanges.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = match TcpStream::connect(target).await {
                    Ok(mut s) => echo_once(&mut s, &[b'a' + w; 32])
                        .await
                        .is_some_and(|b| b == [b'a' + w; 32]),
                    Err(_) => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                exchanges.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // What the server proxy actually presents: a handshake of our own every
    // 100 ms, as the client proxy would make it, recording the peer's leaf.
    let probe = tokio_rustls::TlsConnector::from(
        client_cert
            .client_config(vec![id("db", "db")], &[])
            .unwrap(),
    );
    let server_name = rustls::pki_types::ServerName::try_from("db.db").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while (serials.len() < 3 || exchanges.load(Ordering::Relaxed) <= 100)
        && tokio::time::Instant::now() < deadline
    {
        let tcp = TcpStream::connect(server.inbound[0]).await.unwrap();
        match probe.connect(server_name.clone(), tcp).await {
            Ok(tls) => {
                let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let summary = meshward_proxy::identity::CertificateSummary::of(&presented)
                    .expect("a certificate summary");
                assert_eq!(
                    summary.spiffe_id.as_deref(),
                    Some("spiffe://cluster.local/ns/db/sa/db")
                );
                serials.insert(summary.serial);
            }
            // The probe's own certificate may be between rotations: the
            // workers count real failures, the probe only watches.
            Err(e) => eprintln!("probe handshake: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing: samples what is presented
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (failures, exchanges) = (
        failures.load(Ordering::Relaxed),
        exchanges.load(Ordering::Relaxed),
    );
    assert!(
        serials.len() >= 3,
        "the server presented only {} rotated certificates",
        serials.len() - 1
    );
    assert!(exchanges > 100, "only {exchanges} exchanges");
    assert_eq!(
        failures, 0,
        "{failures} of {exchanges} exchanges failed across rotations"
    );
    drop(server);
}
