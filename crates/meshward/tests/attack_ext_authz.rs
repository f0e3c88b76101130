//! Request bodies a CUSTOM authorizer asks for (`includeRequestBodyInCheck`),
//! attacked on a running `meshward proxy` process: a client streaming a
//! body far longer than `maxRequestBytes` (and one declaring such a length)
//! cannot make the proxy hold it. Without `allowPartialMessage` it gets 413
//! and the application nothing; with it, the check carries the first bytes
//! and the application receives every byte; either way the proxy's resident
//! memory stays within a bound far below the body's size. The authorizer
//! is `meshward demo-authz`, a process too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;

/// What the attacker streams: 64 MiB.
const BODY: usize = 64 << 20;
/// How much the proxy's peak resident memory may grow meanwhile.
const GROWTH_KIB: u64 = 20 << 10;

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident memory now, and the high-water mark reset (Linux `clear_refs` 5).
fn rss_and_reset_peak(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    proc_status_kib(pid, "VmRSS:")
}

/// An application that counts the body bytes it receives (never holding
/// them) and answers with the count.
fn counting_app() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let total = Arc::new(AtomicU64::new(0));
    let counted = total.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |r: http::Request<hyper::body::Incoming>| {
                            let counted = counted.clone();
                            async move {
                                use http_body_util::BodyExt;
                                let mut body = r.into_body();
                                let mut n = 0u64;
                                while let Some(Ok(frame)) = body.frame().await {
                                    if let Some(data) = frame.data_ref() {
                                        n += data.len() as u64;
                                    }
                                }
                                counted.fetch_add(n, Ordering::SeqCst);
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from(n.to_string())),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
    });
    (addr, total)
}

struct Setup {
    port: u16,
    proxy: Spawned,
    _authz: Spawned,
    _mesh: Mesh,
}

/// `meshward server`, `meshward demo-authz`, and a `meshward proxy` for
/// web (PERMISSIVE, so raw HTTP can be written to it) whose every request
/// is decided by the authorizer, with `body` as `includeRequestBodyInCheck`.
fn setup(name: &str, app: SocketAddr, body: &str) -> Setup {
    let dir = tempdir(&format!("attack-ext-authz-{name}"));
    let mesh = server(&dir);
    let authz = spawn(
        "meshward demo-authz",
        meshward().args(["demo-authz", "--listen", "127.0.0.1:0"]),
    );
    let line = authz.logs.wait_for_stderr("demo-authz: grpc://", START);
    let authz_addr: SocketAddr = line
        .lines()
        .find_map(|l| l.strip_prefix("demo-authz: grpc://"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let policy_dir = dir.join("policies");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(
        policy_dir.join("policies.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: web}\nspec:\n  action: CUSTOM\n  provider: {name: demo}\n  rules: [{}]\n",
    )
    .unwrap();
    let mesh_config = dir.join("mesh.yaml");
    std::fs::write(
        &mesh_config,
        format!(
            "extensionProviders:\n- name: demo\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {}\n    timeout: 10s\n    includeRequestBodyInCheck: {body}\n",
            authz_addr.port()
        ),
    )
    .unwrap();
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = spawn(
        "proxy",
        Command::new(bin()).args([
            "proxy",
            "--identity",
            "spiffe://cluster.local/ns/web/sa/web",
            "--label",
            "app=web",
            "--inbound",
            &format!("{port}={app},protocol=http"),
            "--policies",
            policy_dir.to_str().unwrap(),
            "--mesh-config",
            mesh_config.to_str().unwrap(),
            "--ca-address",
            &format!("https://{}", mesh.ca_addr),
            "--ca-root",
            mesh.data.join("root-cert.pem").to_str().unwrap(),
            "--ca-server-name",
            "localhost",
            "--token-file",
            mesh.token("web", "web").to_str().unwrap(),
            "--admin",
            &admin.to_string(),
            "--access-log",
            "off",
            "--audit-log",
            "off",
        ]),
    );
    wait_until(Duration::from_secs(60), "the proxy is ready", || {
        http_get(admin, "/healthz/ready").map(|r| r.0) == Some(200)
    });
    Setup {
        port,
        proxy,
        _authz: authz,
        _mesh: mesh,
    }
}

/// Streams a chunked body of [`BODY`] bytes after `head`, in 64 KiB
/// chunks, stopping early if the proxy stops reading (it answered), then
/// returns the response's status line and body.
fn stream(port: u16, head: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(SETTLE)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'a'; 64 << 10];
    let mut sent = 0;
    while sent < BODY {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        if s.write_all(&framed).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

const HEAD: &str = "POST /upload HTTP/1.1\r\nhost: web\r\nx-ext-authz: allow\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";

#[test]
fn a_body_longer_than_max_request_bytes_is_refused_without_being_held() {
    let (app, received) = counting_app();
    let mut setup = setup("whole", app, "{maxRequestBytes: 1024}");
    let pid = setup.proxy.pid();
    let before = rss_and_reset_peak(pid);
    let reply = stream(setup.port, HEAD);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply:.200}");
    // A declared length over the limit: refused before any of it is read.
    let mut s = TcpStream::connect(("127.0.0.1", setup.port)).unwrap();
    s.set_read_timeout(Some(SETTLE)).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: web\r\nx-ext-authz: allow\r\ncontent-length: 1073741824\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        out.starts_with(b"HTTP/1.1 413"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let peak = proc_status_kib(pid, "VmHWM:");
    assert!(
        peak < before + GROWTH_KIB,
        "the proxy grew from {before} KiB to a peak of {peak} KiB"
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        0,
        "nothing reached the app"
    );
    setup.proxy.assert_running();
}

#[test]
fn a_partial_message_is_checked_and_streamed_whole_without_being_held() {
    let (app, received) = counting_app();
    let mut setup = setup(
        "partial",
        app,
        "{maxRequestBytes: 1024, allowPartialMessage: true}",
    );
    let pid = setup.proxy.pid();
    let before = rss_and_reset_peak(pid);
    let reply = stream(setup.port, HEAD);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:.200}");
    assert!(reply.ends_with(&BODY.to_string()), "{reply:.200}");
    assert_eq!(received.load(Ordering::SeqCst), BODY as u64, "every byte");
    let peak = proc_status_kib(pid, "VmHWM:");
    assert!(
        peak < before + GROWTH_KIB,
        "the proxy grew from {before} KiB to a peak of {peak} KiB"
    );
    setup.proxy.assert_running();
}
