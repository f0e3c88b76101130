//! Workload certificates from the agent, used by real TLS connections on
//! 127.0.0.1: rotation every ~1.5 s without breaking new or open
//! connections, secure naming, STRICT/PERMISSIVE client certificates, and
//! trust-domain aliases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use meshward_identity::SpiffeId;
use meshward_identity::agent::{self, AgentConfig};
use meshward_identity::tls::{
    self, SecureNamingVerifier, SpiffeClientVerifier, TrustDomains, WatchedCert,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::danger::ClientCertVerifier as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::istio("cluster.local", "foo", sa).unwrap()
}

fn mesh_domains() -> TrustDomains {
    TrustDomains(vec!["cluster.local".into()])
}

/// An agent for `identity`, with certificates of `ttl`, ready (first certificate in hand).
async fn agent_for(mesh: &common::Mesh, identity: SpiffeId, ttl: Duration) -> WatchedCert {
    let token = mesh
        .tokens
        .create(&identity, Duration::from_secs(600))
        .unwrap();
    let mut config = AgentConfig::new(
        identity,
        format!("https://{}", mesh.addr),
        "localhost".into(),
        mesh.bundle.clone(),
        Some(token),
    );
    config.ttl = Some(ttl);
    config.initial_backoff = Duration::from_millis(100);
    let (cert, _task) = agent::start(config);
    let mut rx = cert.0.clone();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|c| c.is_some()))
        .await
        .expect("first certificate within 60 s")
        .unwrap();
    cert
}

/// A TLS server that answers each line with the client's SPIFFE ID (or "plaintext-identity").
async fn echo_server(
    cert: WatchedCert,
    clients: Arc<SpiffeClientVerifier>,
) -> std::net::SocketAddr {
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(cert, clients).unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned())
                    .map(|c| {
                        tls::spiffe_id_of(&c)
                            .map(|id| id.to_string())
                            .unwrap_or_default()
                    })
                    .unwrap_or_else(|| "no-client-certificate".into());
                let (read, mut write) = tokio::io::split(stream);
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(_)) = lines.next_line().await {
                    if write
                        .write_all(format!("{peer}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Client =
    tokio::io::Lines<BufReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>>;

struct Conn {
    lines: Client,
    write: tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
    server_cert: CertificateDer<'static>,
}

impl Conn {
    async fn ask(&mut self) -> Result<String, String> {
        self.write
            .write_all(b"who am i\n")
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(30), self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => Err("closed".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    cert: WatchedCert,
    server: Arc<SecureNamingVerifier>,
) -> Result<Conn, String> {
    let connector = TlsConnector::from(Arc::new(tls::client_config(cert, server).unwrap()));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = connector
        .connect(ServerName::try_from("workload").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or("no server certificate")?;
    let (read, write) = tokio::io::split(stream);
    let mut conn = Conn {
        lines: BufReader::new(read).lines(),
        write,
        server_cert,
    };
    // TLS 1.3 reports a refused client certificate on the first read.
    conn.ask().await.map(|_| conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_keeps_working_across_rotations() {
    let mesh = common::start().await;
    let ttl = Duration::from_secs(3);
    let server_cert = agent_for(&mesh, id("server"), ttl).await;
    let client_cert = agent_for(&mesh, id("client"), ttl).await;
    let addr = echo_server(
        server_cert,
        SpiffeClientVerifier::new(&mesh.bundle, mesh_domains(), true).unwrap(),
    )
    .await;
    let naming =
        SecureNamingVerifier::new(&mesh.bundle, mesh_domains(), vec![id("server")]).unwrap();

    // Opened before any rotation, used throughout.
    let mut long_lived = connect(addr, client_cert.clone(), naming.clone())
        .await
        .unwrap();
    let mut served = vec![long_lived.server_cert.clone()];
    let start = tokio::time::Instant::now();
    // Rounds until the server's certificate has rotated twice (about two
    // lifetimes of a 3 s certificate), however long the machine takes;
    // bounded.
    while served.len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the server's certificate rotated {} time(s) in {:?}",
            served.len() - 1,
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(700)).await; // pacing: rounds spread over the rotations
        let mut fresh = connect(addr, client_cert.clone(), naming.clone())
            .await
            .unwrap_or_else(|e| panic!("a new connection at {:?} failed: {e}", start.elapsed()));
        assert_eq!(
            fresh.ask().await.unwrap(),
            id("client").to_string(),
            "the server sees the client's identity"
        );
        assert_eq!(
            long_lived.ask().await.unwrap(),
            id("client").to_string(),
            "the open connection still works"
        );
        if !served.contains(&fresh.server_cert) {
            served.push(fresh.server_cert.clone());
        }
    }
}

#[tokio::test]
async fn secure_naming_refuses_a_server_with_the_wrong_identity() {
    let mesh = common::start().await;
    let impostor = agent_for(&mesh, id("impostor"), Duration::from_secs(600)).await;
    let client_cert = agent_for(&mesh, id("client"), Duration::from_secs(600)).await;
    let addr = echo_server(
        impostor,
        SpiffeClientVerifier::new(&mesh.bundle, mesh_domains(), true).unwrap(),
    )
    .await;
    let naming =
        SecureNamingVerifier::new(&mesh.bundle, mesh_domains(), vec![id("datastore")]).unwrap();
    let err = connect(addr, client_cert, naming)
        .await
        .err()
        .expect("refused");
    assert!(
        err.contains("secure naming") && err.contains("impostor"),
        "{err}"
    );
}

#[tokio::test]
async fn strict_requires_a_client_certificate_and_permissive_does_not() {
    let mesh = common::start().await;
    let server_cert = agent_for(&mesh, id("server"), Duration::from_secs(600)).await;
    let no_cert = WatchedCert(tokio::sync::watch::channel(None).1);
    let naming =
        SecureNamingVerifier::new(&mesh.bundle, mesh_domains(), vec![id("server")]).unwrap();

    let strict = echo_server(
        server_cert.clone(),
        SpiffeClientVerifier::new(&mesh.bundle, mesh_domains(), true).unwrap(),
    )
    .await;
    let refused = connect(strict, no_cert.clone(), naming.clone())
        .await
        .err()
        .expect("STRICT refuses a client without a certificate");
    assert_eq!(refused, "received fatal alert: CertificateRequired");

    let permissive = echo_server(
        server_cert,
        SpiffeClientVerifier::new(&mesh.bundle, mesh_domains(), false).unwrap(),
    )
    .await;
    let mut conn = connect(permissive, no_cert, naming)
        .await
        .expect("PERMISSIVE accepts it");
    assert_eq!(conn.ask().await.unwrap(), "no-client-certificate");
}

#[tokio::test]
async fn foreign_trust_domains_are_refused_unless_aliased() {
    let mesh = common::start().await;
    let server_cert = agent_for(&mesh, id("server"), Duration::from_secs(600)).await;
    let client_cert = agent_for(&mesh, id("client"), Duration::from_secs(600)).await;
    let naming =
        SecureNamingVerifier::new(&mesh.bundle, mesh_domains(), vec![id("server")]).unwrap();

    // A server whose mesh is "new.td": cluster.local clients are foreign...
    let only_new = TrustDomains(vec!["new.td".into()]);
    let addr = echo_server(
        server_cert.clone(),
        SpiffeClientVerifier::new(&mesh.bundle, only_new, true).unwrap(),
    )
    .await;
    let refused = connect(addr, client_cert.clone(), naming.clone())
        .await
        .err()
        .expect("a foreign trust domain is refused");
    // A valid certificate that is not acceptable: certificate_unknown.
    assert_eq!(refused, "received fatal alert: CertificateUnknown");
    // The alert is generic; the verifier says why.
    let leaf = client_cert.0.borrow().clone().expect("a certificate").cert[0].clone();
    let reason = SpiffeClientVerifier::new(&mesh.bundle, TrustDomains(vec!["new.td".into()]), true)
        .unwrap()
        .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
        .expect_err("the verifier refuses the foreign trust domain")
        .to_string();
    assert!(reason.contains("cluster.local"), "{reason}");
    // ...unless cluster.local is one of its aliases.
    let aliased = TrustDomains(vec!["new.td".into(), "cluster.local".into()]);
    let addr = echo_server(
        server_cert,
        SpiffeClientVerifier::new(&mesh.bundle, aliased, true).unwrap(),
    )
    .await;
    assert!(connect(addr, client_cert, naming).await.is_ok());
}

/// The CA is not there when the agent starts: the agent backs off and
/// retries, publishes nothing meanwhile, and gets its certificate once the
/// CA listens.
#[tokio::test]
async fn the_agent_waits_for_a_ca_that_starts_later() {
    use meshward_identity::service::{
        self, BootstrapTokens, CallerAuthenticator, ServerCertificate,
    };
    use meshward_identity::token::TokenAuthority;
    use meshward_identity::{CaFiles, CertificateAuthority};

    // The CA's files exist (the agent needs the bundle and a token), but
    // nothing serves them yet.
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&CaFiles::new(dir.path().join("ca")), "cluster.local")
            .unwrap(),
    );
    let token = TokenAuthority::load_or_create(dir.path(), "cluster.local")
        .unwrap()
        .create(&id("late"), Duration::from_secs(600))
        .unwrap();
    // Where the CA will be: for now something that hangs up on every
    // connection, counting them.
    let refusing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = refusing.local_addr().unwrap().port();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = attempts.clone();
    let refuser = tokio::spawn(async move {
        while let Ok((tcp, _)) = refusing.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(tcp);
        }
    });

    let mut config = AgentConfig::new(
        id("late"),
        format!("https://127.0.0.1:{port}"),
        "localhost".into(),
        ca.bundle().clone(),
        Some(token),
    );
    config.initial_backoff = Duration::from_millis(100);
    config.max_backoff = Duration::from_millis(400);
    let (cert, _task) = agent::start(config);
    // It tried, failed and tried again: nothing is published meanwhile.
    tokio::time::timeout(Duration::from_secs(60), async {
        while attempts.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await; // pacing: the poll interval
        }
    })
    .await
    .expect("the agent retried within 60 s");
    assert!(
        cert.0.borrow().is_none(),
        "nothing is published while the CA cannot be reached"
    );
    refuser.abort();
    let _ = refuser.await;

    // Now the CA comes up on that port.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let server_cert = ServerCertificate::start(
        ca.clone(),
        "istio-system".into(),
        Vec::new(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let authenticators: Vec<Box<dyn CallerAuthenticator>> = vec![Box::new(BootstrapTokens(
        TokenAuthority::load_or_create(dir.path(), "cluster.local").unwrap(),
    ))];
    let server = tokio::spawn(service::serve(
        listener,
        ca,
        server_cert.cert.clone(),
        authenticators,
        std::future::pending(),
    ));
    let mut rx = cert.0.clone();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|c| c.is_some()))
        .await
        .expect("a certificate within 60 s of the CA coming up")
        .unwrap();
    server.abort();
}
