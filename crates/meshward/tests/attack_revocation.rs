//! Attack suite, revocation: `meshward revoke` against running processes.
//!
//! A server and two proxies configured by it (`web` serves HTTP and TCP,
//! `sleep` calls it). Revoking the client's identity refuses its next
//! handshake at the server's proxy and cuts the connections it holds open
//! (TCP, and an HTTP request in flight); revoking the server's certificate
//! by serial makes its clients refuse and cut it. At the CA: a revoked
//! identity or serial gets no renewal and no bootstrap, a revoked token id
//! is refused, a single-use token works once (also when raced, and after a
//! restart), a lifetime beyond `--max-workload-cert-ttl` is refused as
//! Istio refuses it, and only the admin can revoke.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use meshward_api::istio_ca::IstioCertificateRequest;
use meshward_api::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Waits for `condition`, failing with `what` after `within`.
fn wait_until(what: &str, within: Duration, condition: impl FnMut() -> bool) {
    common::wait_until(within, what, condition);
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn config_dump(admin: SocketAddr) -> serde_json::Value {
    let (status, body) = http_get(admin, "/config_dump").expect("the admin port answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of one series on a proxy's `/stats/prometheus` (0 when
/// absent), and the whole text for messages.
fn scrape(admin: SocketAddr, series: &str) -> (f64, String) {
    let (_, text) = http_get(admin, "/stats/prometheus").expect("the admin port answers");
    (metric(&text, series).unwrap_or(0.0), text)
}

fn assert_metric_at_least(admin: SocketAddr, series: &str, min: f64) {
    let (value, text) = scrape(admin, series);
    assert!(
        value >= min,
        "{series} is {value}, wanted at least {min}:\n{text}"
    );
}

/// Whether a proxy has `value` on its revocation list.
fn lists(admin: SocketAddr, value: &str) -> bool {
    config_dump(admin)["revocations"]
        .as_array()
        .is_some_and(|list| list.iter().any(|r| r["value"] == value))
}

/// GET over HTTP/1.1; the status, or `None` if no answer came in `timeout`.
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: web.web\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// An HTTP application: `/hold` tells the test it arrived, then is never
/// answered (its connection lasts until the proxy drops it); anything else
/// gets 200.
fn holding_app() -> (SocketAddr, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived, held) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let arrived = arrived.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                if line.split_whitespace().nth(1) == Some("/hold") {
                    let _ = arrived.send(());
                    // Until the proxy closes its side.
                    let _ = reader.read_to_end(&mut Vec::new());
                    return;
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
            });
        }
    });
    (addr, held)
}

/// A TCP application that echoes what it reads.
fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    addr
}

/// Sends `ping` on an open TCP connection and reads it back.
fn round_trip(conn: &mut TcpStream) {
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

/// Whether the connection was closed by the other side: a read ends (EOF or
/// reset) rather than timing out.
fn closed(conn: &mut TcpStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    match conn.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn registry(http_port: u16, tcp_port: u16) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web, namespace: web}}
spec: {{address: 127.0.0.1, ports: {{http: {http_port}, tcp: {tcp_port}}}, labels: {{app: web}}, serviceAccount: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: sleep, namespace: sleep}}
spec: {{address: 127.0.0.1, labels: {{app: sleep}}, serviceAccount: sleep}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: web}}
spec:
  hosts: [web.web]
  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 81, name: tcp, protocol: TCP}}]
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
"#
    )
}

/// A server, `web` (HTTP and TCP, behind its proxy) and `sleep` (calling
/// both through its proxy), with one HTTP and one TCP connection from
/// `sleep` to `web` known to work.
struct TwoProxies {
    mesh: Mesh,
    _web: Spawned,
    _sleep: Spawned,
    web_admin: SocketAddr,
    sleep_admin: SocketAddr,
    /// `sleep`'s local listeners for `web.web:80` (HTTP) and `:81` (TCP).
    http_out: SocketAddr,
    tcp_out: SocketAddr,
    /// A `/hold` request reached `web`'s application.
    held: mpsc::Receiver<()>,
}

fn two_proxies(name: &str) -> TwoProxies {
    let dir = tempdir(name);
    let mesh = server(&dir);
    let (web_http, web_tcp) = (free_port(), free_port());
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, registry(web_http, web_tcp)).unwrap();
    let out = mesh.admin(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (app, held) = holding_app();
    let echo = echo_app();
    let (web, web_admin) = mesh.proxy(
        "web",
        "web",
        &[
            "--inbound".into(),
            format!("{web_http}={app},protocol=http"),
            "--inbound".into(),
            format!("{web_tcp}={echo},protocol=tcp"),
        ],
    );
    let http_out: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tcp_out: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (sleep, sleep_admin) = mesh.proxy(
        "sleep",
        "sleep",
        &[
            "--upstream".into(),
            format!("web.web:80={http_out},protocol=http"),
            "--upstream".into(),
            format!("web.web:81={tcp_out},protocol=tcp"),
        ],
    );
    wait_until(
        "sleep reaches web over mutual TLS",
        Duration::from_secs(10),
        || get(http_out, "/", Duration::from_secs(10)) == Some(200),
    );
    TwoProxies {
        mesh,
        _web: web,
        _sleep: sleep,
        web_admin,
        sleep_admin,
        http_out,
        tcp_out,
        held,
    }
}

fn revoke(mesh: &Mesh, kind: &str, value: &str, reason: &str) -> Output {
    mesh.admin(&["revoke", kind, value, "--reason", reason])
}

fn tcp_connection(addr: SocketAddr) -> TcpStream {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    round_trip(&mut conn);
    conn
}

#[test]
fn a_revoked_client_is_refused_at_the_handshake_and_its_open_connections_are_cut() {
    let m = two_proxies("attack-revoke-client");
    let sleep_id = spiffe("sleep", "sleep");

    // Open from sleep to web: a TCP connection, and an HTTP request that
    // web's application holds.
    let mut tcp = tcp_connection(m.tcp_out);
    let http_out = m.http_out;
    let in_flight = std::thread::spawn(move || get(http_out, "/hold", Duration::from_secs(60)));
    m.held
        .recv_timeout(Duration::from_secs(20))
        .expect("the held request reached web's application");

    let out = revoke(&m.mesh, "identity", &sleep_id, "laptop stolen");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("identity {sleep_id} revoked")),
        "{}",
        stdout(&out)
    );

    // Both open connections are cut by web's proxy: the TCP one closes,
    // the held request ends with sleep's proxy answering 503.
    assert!(
        closed(&mut tcp),
        "the open TCP connection from the revoked client was not closed"
    );
    assert_eq!(
        in_flight.join().unwrap(),
        Some(503),
        "the request in flight on a connection from the revoked client was not cut"
    );
    assert!(lists(m.web_admin, &sleep_id), "web's proxy has the list");
    let cut = r#"meshward_revoked_peer_connections_closed_total{direction="inbound"}"#;
    assert_metric_at_least(m.web_admin, cut, 2.0);

    // New connections are refused at web's handshake.
    assert_eq!(get(m.http_out, "/", Duration::from_secs(20)), Some(503));
    let mut again = TcpStream::connect(m.tcp_out).unwrap();
    let _ = again.write_all(b"ping");
    assert!(
        closed(&mut again),
        "a new TCP connection from the revoked client was served"
    );
    let refused = r#"meshward_tls_handshakes_total{direction="inbound",result="revoked"}"#;
    assert_metric_at_least(m.web_admin, refused, 2.0);
    // The refusals are web's: sleep's proxy refused no server.
    let sleep_refused = r#"meshward_tls_handshakes_total{direction="outbound",result="revoked"}"#;
    assert_eq!(scrape(m.sleep_admin, sleep_refused).0, 0.0);

    // At the CA: no renewal with a certificate of that identity (the
    // server's port refuses it at the handshake), no bootstrap with a token
    // for it (the CA refuses the identity).
    let issued = issue(&m.mesh, "sleep", "sleep", "renew-sleep");
    let renewal = create_certificate(&m.mesh, &sleep_id, None, Some(&issued), 0).unwrap_err();
    assert_revoked_at_the_handshake(&renewal);
    let token = std::fs::read_to_string(m.mesh.token("sleep", "sleep")).unwrap();
    let bootstrap =
        create_certificate(&m.mesh, &sleep_id, Some(token.trim()), None, 0).unwrap_err();
    assert_eq!(bootstrap.code(), Code::PermissionDenied, "{bootstrap}");
    // Another identity is untouched.
    let web = issue(&m.mesh, "web", "web", "renew-web");
    create_certificate(&m.mesh, &spiffe("web", "web"), None, Some(&web), 0).unwrap();

    // The revoked proxy's configuration stream is cut off as well: status
    // lists it as refused, with the revocation as the reason, while web's
    // proxy stays connected.
    let mut status = String::new();
    wait_until(
        "status lists the revoked proxy as refused",
        Duration::from_secs(60),
        || {
            status = stdout(&m.mesh.admin(&["status"]));
            status.lines().any(|l| {
                l.contains(&sleep_id)
                    && l.contains("REFUSED")
                    && l.contains(&format!("identity {sleep_id} was revoked"))
            })
        },
    );
    assert!(
        status
            .lines()
            .any(|l| l.contains(&spiffe("web", "web")) && l.contains("SYNCED")),
        "{status}"
    );
}

#[test]
fn a_server_certificate_revoked_by_serial_is_refused_and_cut_by_its_clients() {
    let m = two_proxies("attack-revoke-serial");
    let mut tcp = tcp_connection(m.tcp_out);
    let serial = config_dump(m.web_admin)["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();

    let out = revoke(&m.mesh, "serial", &serial, "key leaked");
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(
        "sleep's proxy has the list",
        Duration::from_secs(10),
        || lists(m.sleep_admin, &serial),
    );

    // sleep's proxy cuts its open connection to web, and refuses web's
    // certificate on the next handshake (the outbound side).
    assert!(
        closed(&mut tcp),
        "the open TCP connection to the revoked server was not closed"
    );
    let cut = r#"meshward_revoked_peer_connections_closed_total{direction="outbound"}"#;
    assert_metric_at_least(m.sleep_admin, cut, 1.0);
    assert_eq!(get(m.http_out, "/", Duration::from_secs(20)), Some(503));
    let refused = r#"meshward_tls_handshakes_total{direction="outbound",result="revoked"}"#;
    assert_metric_at_least(m.sleep_admin, refused, 1.0);

    // At the CA, by serial: the certificate `meshward ca inspect` names is
    // not renewed; another certificate of the same identity is.
    let first = issue(&m.mesh, "web", "web", "first");
    let second = issue(&m.mesh, "web", "web", "second");
    let serial = serial_of(&first.0);
    let out = revoke(&m.mesh, "serial", &serial.to_uppercase(), "");
    assert!(out.status.success(), "{}", stderr(&out));
    let web = spiffe("web", "web");
    let renewal = create_certificate(&m.mesh, &web, None, Some(&first), 0).unwrap_err();
    assert_revoked_at_the_handshake(&renewal);
    create_certificate(&m.mesh, &web, None, Some(&second), 0).unwrap();
}

/// A call refused by the server's TLS handshake, before any service saw
/// it: a transport failure, never an answer from the CA. With TLS 1.3 the
/// client may already be writing when the server's alert arrives, so it
/// sees the `certificate_revoked` alert, a broken pipe or a closed
/// connection; any alert it does see must be that one.
fn assert_revoked_at_the_handshake(status: &tonic::Status) {
    // A service's answer has no transport error behind it; the ways the
    // end of the connection reaches the client (the alert, a broken pipe,
    // "connection closed") all do.
    let text = format!("{status:?}");
    assert!(
        text.contains("tonic::transport::Error(Transport"),
        "answered by a service, not refused at the handshake: {text}"
    );
    assert!(
        !text.contains("alert") || text.contains("received fatal alert: CertificateRevoked"),
        "refused with another alert: {text}"
    );
}

#[test]
fn tokens_lifetimes_and_who_may_revoke_at_a_running_ca() {
    let dir = tempdir("attack-revoke-tokens");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut mesh = server_with(&dir, &["--listen", &listen]);
    let id = spiffe("web", "web");

    // A single-use token works once.
    let (once, _) = token(&mesh, &["--single-use"]);
    create_certificate(&mesh, &id, Some(&once), None, 0).unwrap();
    let second = create_certificate(&mesh, &id, Some(&once), None, 0).unwrap_err();
    assert_eq!(second.code(), Code::Unauthenticated, "{second}");
    assert!(second.message().contains("already used"), "{second}");

    // Raced: of six simultaneous uses of a fresh one, exactly one gets a
    // certificate.
    let (raced, _) = token(&mesh, &["--single-use"]);
    let racing: Vec<_> = (0..6)
        .map(|_| {
            let (ca_addr, data, id, raced) = (
                mesh.ca_addr.clone(),
                mesh.data.clone(),
                id.clone(),
                raced.clone(),
            );
            std::thread::spawn(move || {
                create_certificate_at(&ca_addr, &data, &id, Some(&raced), None, 0).is_ok()
            })
        })
        .collect();
    let granted = racing
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|granted| *granted)
        .count();
    assert_eq!(granted, 1, "a single-use token raced six times");

    // A revoked token id is refused; other tokens still work.
    let (reusable, token_id) = token(&mesh, &[]);
    create_certificate(&mesh, &id, Some(&reusable), None, 0).unwrap();
    let out = revoke(&mesh, "token", &token_id, "pasted in a chat");
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = create_certificate(&mesh, &id, Some(&reusable), None, 0).unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(
        refused
            .message()
            .contains(&format!("token {token_id} was revoked")),
        "{refused}"
    );
    let (other, _) = token(&mesh, &[]);
    create_certificate(&mesh, &id, Some(&other), None, 0).unwrap();

    // Lifetimes: 90 days is refused as Istio refuses it, at bootstrap and
    // at renewal; unasked, a certificate lives 24 h.
    const DAY: i64 = 24 * 3600;
    let long = create_certificate(&mesh, &id, Some(&other), None, 90 * DAY).unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument, "{long}");
    assert!(
        long.message().contains("greater than the max allowed TTL"),
        "{long}"
    );
    let issued = issue(&mesh, "web", "web", "lifetimes");
    let long = create_certificate(&mesh, &id, None, Some(&issued), 90 * DAY).unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument, "{long}");
    let chain = create_certificate(&mesh, &id, Some(&other), None, 0).unwrap();
    assert_eq!(lifetime(&chain), DAY);
    let chain = create_certificate(&mesh, &id, Some(&other), None, DAY).unwrap();
    assert_eq!(lifetime(&chain), DAY, "exactly the maximum is allowed");

    // Only the admin revokes: a workload's certificate is refused, and
    // the list does not change.
    let workload_cert = issue(&mesh, "web", "web", "not-admin");
    let out = output(
        meshward()
            .args(["revoke", "identity", &spiffe("sleep", "sleep")])
            .args(["--server", &format!("https://{}", mesh.ca_addr)])
            .args([
                "--admin-dir",
                workload_cert.0.parent().unwrap().to_str().unwrap(),
            ]),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("may not change configuration"),
        "{}",
        stderr(&out)
    );
    // Nor can the control plane's own identity be revoked.
    let out = revoke(&mesh, "identity", &spiffe("istio-system", "meshward"), "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("control plane's own identity"),
        "{}",
        stderr(&out)
    );
    // Nonsense is refused with what to give instead.
    let out = revoke(&mesh, "serial", "not-hex", "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("meshward ca inspect"),
        "{}",
        stderr(&out)
    );

    // `get revocations` lists the one revocation, as a table and as JSON.
    let table = stdout(&mesh.admin(&["get", "revocations"]));
    assert!(table.starts_with("KIND"), "{table}");
    assert!(table.contains(&format!("token     {token_id}")), "{table}");
    assert!(table.contains("pasted in a chat"), "{table}");
    let json = listed(&mesh);
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["kind"], "token");
    assert_eq!(json[0]["value"], token_id.as_str());
    assert!(json[0]["revokedAt"].as_str().unwrap().ends_with('Z'));

    // After a restart: still revoked, still used; a lower maximum applies.
    let _ = mesh.server.0.kill();
    let _ = mesh.server.0.wait();
    mesh = server_with(
        &dir,
        &["--listen", &listen, "--max-workload-cert-ttl", "1h"],
    );
    assert_eq!(listed(&mesh), json, "the list survives a restart");
    let again = create_certificate(&mesh, &id, Some(&once), None, 0).unwrap_err();
    assert_eq!(again.code(), Code::Unauthenticated, "{again}");
    assert!(again.message().contains("already used"), "{again}");
    let again = create_certificate(&mesh, &id, Some(&reusable), None, 0).unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied, "{again}");
    let chain = create_certificate(&mesh, &id, Some(&other), None, 0).unwrap();
    assert_eq!(lifetime(&chain), 3600, "unasked: the lower maximum");
    let long = create_certificate(&mesh, &id, Some(&other), None, 2 * 3600).unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument, "{long}");
}

/// `meshward get revocations -o json`.
fn listed(mesh: &Mesh) -> Vec<serde_json::Value> {
    let out = mesh.admin(&["get", "revocations", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `meshward token create` for web/web with `extra` flags: (token, its id).
fn token(mesh: &Mesh, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "token",
        "create",
        "--data-dir",
        mesh.data.to_str().unwrap(),
        "-n",
        "web",
        "--service-account",
        "web",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    let id = stderr(&out)
        .lines()
        .find_map(|l| l.strip_prefix("token id: "))
        .expect("token create prints the token's id")
        .trim()
        .to_owned();
    (stdout(&out).trim().to_owned(), id)
}

/// `meshward ca issue` into `dir/<name>`: (cert chain, key).
fn issue(mesh: &Mesh, ns: &str, sa: &str, name: &str) -> (PathBuf, PathBuf) {
    let out = mesh.dir.join(name);
    run(&[
        "ca",
        "issue",
        "--data-dir",
        mesh.data.to_str().unwrap(),
        "-n",
        ns,
        "--service-account",
        sa,
        "--out",
        out.to_str().unwrap(),
    ]);
    (out.join("cert-chain.pem"), out.join("key.pem"))
}

fn create_certificate(
    mesh: &Mesh,
    id: &str,
    token: Option<&str>,
    client: Option<&(PathBuf, PathBuf)>,
    ttl: i64,
) -> Result<Vec<String>, tonic::Status> {
    create_certificate_at(&mesh.ca_addr, &mesh.data, id, token, client, ttl)
}

/// Istio's CreateCertificate for `id` with a fresh key, authenticated by a
/// bootstrap token or a client certificate (renewal).
fn create_certificate_at(
    ca_addr: &str,
    data: &Path,
    id: &str,
    token: Option<&str>,
    client: Option<&(PathBuf, PathBuf)>,
    ttl: i64,
) -> Result<Vec<String>, tonic::Status> {
    let id = meshward_identity::SpiffeId::parse(id).unwrap();
    let (_key, csr) = meshward_identity::ca::new_key_and_csr(&id).unwrap();
    let root = std::fs::read_to_string(data.join("root-cert.pem")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = Channel::from_shared(format!("https://{ca_addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .expect("connects to the CA");
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: ttl,
            metadata: None,
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
    })
}

/// Seconds from a chain's leaf's notBefore to its notAfter, without the
/// minute it is backdated by.
fn lifetime(chain: &[String]) -> i64 {
    let certs = meshward_identity::pem::parse_certificates(&chain.concat()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
    leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp() - 60
}

/// The server's own port refuses a revoked client certificate at the
/// handshake, so it gets no service and none of the room the server gives
/// authenticated connections: an old admin credential, revoked by its
/// serial, can change nothing, while the current one still can; the admin
/// identity itself cannot be revoked.
#[test]
fn a_revoked_certificate_is_refused_at_the_servers_own_port() {
    let dir = tempdir("attack-revoke-port");
    let mesh = server(&dir);
    let old_admin = issue(&mesh, "istio-system", "meshward-admin", "old-admin");
    let old_admin_dir = old_admin.0.parent().unwrap().to_str().unwrap().to_owned();
    let as_old_admin = |args: &[&str]| {
        output(
            meshward()
                .args(args)
                .args(["--server", &format!("https://{}", mesh.ca_addr)])
                .args(["--admin-dir", &old_admin_dir]),
        )
    };
    let before = as_old_admin(&["get", "revocations"]);
    assert!(before.status.success(), "{}", stderr(&before));

    let serial = serial_of(&old_admin.0);
    let out = revoke(&mesh, "serial", &serial, "old admin credential");
    assert!(out.status.success(), "{}", stderr(&out));

    // The next connection with the old credential ends in its handshake.
    let refused = as_old_admin(&["revoke", "identity", &spiffe("web", "web")]);
    assert!(!refused.status.success());
    // The same credential worked a moment ago; now the call never reaches
    // the service: the connection ends. TLS 1.3 reports the server's alert
    // to a client that may already be writing, so the client sees the
    // alert, a broken pipe or a closed connection — never the service's
    // own refusal.
    let why = stderr(&refused);
    assert!(
        [
            "transport error",
            "connection closed",
            "broken pipe",
            "alert"
        ]
        .iter()
        .any(|w| why.contains(w))
            && !why.contains("may not change configuration"),
        "not refused at the handshake: {why}"
    );
    let entries = listed(&mesh);
    assert_eq!(
        entries.len(),
        1,
        "the old admin revoked nothing: {entries:?}"
    );

    // The current admin credential is untouched, and the admin identity
    // cannot be revoked (the credential of every start would go with it).
    let out = revoke(
        &mesh,
        "identity",
        &spiffe("istio-system", "meshward-admin"),
        "",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("revoke an old admin certificate by its serial"),
        "{}",
        stderr(&out)
    );
    assert_eq!(listed(&mesh).len(), 1);
}

/// A certificate's serial as `meshward ca inspect` prints it: what an
/// operator hands to `meshward revoke serial`.
fn serial_of(cert: &Path) -> String {
    let inspected = run(&["ca", "inspect", cert.to_str().unwrap()]);
    stdout(&inspected)
        .lines()
        .find_map(|l| l.strip_prefix("serial:"))
        .expect("ca inspect prints a serial")
        .trim()
        .to_owned()
}
