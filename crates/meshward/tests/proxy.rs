//! `meshward proxy` as a process: certificate from `meshward server` with a
//! bootstrap token, real `curl` and `openssl s_client` clients, the admin
//! endpoints, and draining on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;

/// The web workload's proxy, for these tests.
trait WebProxy {
    /// Starts a proxy for web/sa/web in front of `app`, STRICT on its port,
    /// draining for at most `drain_grace` on SIGTERM.
    fn web_proxy(&self, app: SocketAddr, drain_grace: &str) -> (Spawned, u16, SocketAddr, PathBuf);
}

impl WebProxy for Mesh {
    fn web_proxy(&self, app: SocketAddr, drain_grace: &str) -> (Spawned, u16, SocketAddr, PathBuf) {
        let policies = self.dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("strict.yaml"),
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: web}\nspec: {mtls: {mode: STRICT}}\n",
        )
        .unwrap();
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = self.dir.join("access.log");
        let proxy = spawn(
            "meshward proxy",
            meshward().args([
                "proxy",
                "--identity",
                "spiffe://cluster.local/ns/web/sa/web",
                "--label",
                "app=web",
                "--inbound",
                &format!("{port}={app},protocol=http"),
                "--policies",
                policies.to_str().unwrap(),
                "--ca-address",
                &format!("https://{}", self.ca_addr),
                "--ca-root",
                self.data.join("root-cert.pem").to_str().unwrap(),
                "--ca-server-name",
                "localhost",
                "--token-file",
                self.token("web", "web").to_str().unwrap(),
                "--admin",
                &admin.to_string(),
                "--access-log",
                log.to_str().unwrap(),
                "--audit-log",
                "off",
                "--drain-grace",
                drain_grace,
            ]),
        );
        eventually_status(admin, "/healthz/ready", 200, START);
        (proxy, port, admin, log)
    }
}

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is required (.ci/run installs it)"
    );
    name.to_owned()
}

fn curl(args: &[&str]) -> Output {
    output(
        Command::new(tool("curl"))
            .args(["-sS", "--max-time", "30"])
            .args(args),
    )
}

#[test]
fn the_proxy_serves_curl_and_openssl_over_mutual_tls_and_refuses_outsiders() {
    let dir = tempdir("clients");
    let mesh = server(&dir);
    let (_proxy, port, admin, log) = mesh.web_proxy(app("web"), "5s");
    let url = format!("https://127.0.0.1:{port}/hello");
    let (cert, key, root) = mesh.issue("sleep", "sleep");
    let (cert, key, root) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        root.to_str().unwrap(),
    );

    // A mesh client certificate: served. (The server certificate carries a
    // SPIFFE ID, not a DNS name, so curl is told not to check the name.)
    let ok = curl(&["-k", "--cacert", root, "--cert", cert, "--key", key, &url]);
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        "web /hello",
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // Plaintext to a STRICT port: refused.
    let plain = curl(&[&format!("http://127.0.0.1:{port}/hello")]);
    assert!(!plain.status.success(), "plaintext was served");

    // TLS without a client certificate: refused.
    let anonymous = curl(&["-k", &url]);
    assert!(
        !anonymous.status.success(),
        "a client without a certificate was served"
    );

    // openssl s_client with a mesh certificate, then with one from another CA.
    // `-quiet` keeps the connection after the request is sent, until the
    // server closes it (`connection: close`) or refuses the handshake.
    let s_client = |cert: &str, key: &str| {
        let mut s_client = spawn(
            "openssl s_client",
            Command::new(tool("openssl")).args([
                "s_client",
                "-quiet",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-cert",
                cert,
                "-key",
                key,
                "-CAfile",
                root,
            ]),
        );
        s_client.input(b"GET /openssl HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n");
        s_client.wait_exit(COMMAND);
        s_client.logs.wait_closed(SETTLE);
        (s_client.logs.stdout(), s_client.logs.stderr())
    };
    let (stdout, stderr) = s_client(cert, key);
    assert!(
        stdout.starts_with("HTTP/1.1 200") && stdout.ends_with("web /openssl"),
        "{stdout}\n{stderr}"
    );

    let other_dir = dir.join("other");
    run(&["ca", "init", "--data-dir", other_dir.to_str().unwrap()]);
    let other_out = dir.join("other-cert");
    run(&[
        "ca",
        "issue",
        "--data-dir",
        other_dir.to_str().unwrap(),
        "-n",
        "sleep",
        "--service-account",
        "sleep",
        "--out",
        other_out.to_str().unwrap(),
    ]);
    let (stdout, stderr) = s_client(
        other_out.join("cert-chain.pem").to_str().unwrap(),
        other_out.join("key.pem").to_str().unwrap(),
    );
    assert!(
        !stdout.contains("200"),
        "a foreign CA's certificate was served: {stdout}"
    );
    assert!(stderr.contains("alert"), "{stderr}");

    // The admin port: configuration without keys, metrics, and the log.
    let (status, dump) = http_get(admin, "/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        dump["certificate"]["spiffe_id"],
        "spiffe://cluster.local/ns/web/sa/web"
    );
    assert_eq!(dump["mtls"]["mode"], "STRICT");
    assert_eq!(dump["policies"][0]["name"], "strict");
    assert!(!dump.to_string().contains("PRIVATE KEY"));
    // Counted as each exchange ends, which the client may see first.
    let expected = [
        (
            r#"meshward_requests_total{direction="inbound",decision="allow",policy=""}"#,
            2.0,
        ),
        (
            r#"meshward_tls_handshakes_total{direction="inbound",result="unknown_ca"}"#,
            1.0,
        ),
        // Both requests timed.
        (
            r#"meshward_request_duration_seconds_count{direction="inbound"}"#,
            2.0,
        ),
        ("meshward_config_version", 1.0),
    ];
    let metrics = wait_for(SETTLE, || {
        let (_, metrics) = http_get(admin, "/stats/prometheus").ok_or("no metrics")?;
        for (series, value) in expected {
            let got = metric(&metrics, series);
            if got != Some(value) {
                return Err(format!("{series} is {got:?}, not {value}, in\n{metrics}"));
            }
        }
        Ok(metrics)
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = metric(&metrics, "meshward_certificate_expiry_timestamp_seconds");
    assert!(expiry.is_some_and(|t| t > now), "{expiry:?} in\n{metrics}");
    wait_until(
        SETTLE,
        "the mesh client's request in the access log",
        || {
            std::fs::read_to_string(&log).is_ok_and(|log| {
                log.contains(r#""source_principal":"spiffe://cluster.local/ns/sleep/sa/sleep""#)
            })
        },
    );
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempdir("drain");
    let mesh = server(&dir);
    let held = HeldApp::start("web");
    // A grace long enough that only the drain, not its end, is tested.
    let (mut proxy, port, _admin, _log) = mesh.web_proxy(held.addr, "60s");
    let (cert, key, root) = mesh.issue("sleep", "sleep");
    let url = format!("https://127.0.0.1:{port}/hold");
    let args: Vec<String> = [
        "-k",
        "--cacert",
        root.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        &url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let in_flight = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args)
    });
    // The request is at the application, held there: in flight.
    held.arrived("/hold");
    proxy.process.signal(nix::sys::signal::Signal::SIGTERM);
    proxy
        .logs
        .wait_for_stderr("meshward proxy: draining", SETTLE);
    wait_until(SETTLE, "the proxy to stop accepting", || {
        TcpStream::connect(("127.0.0.1", port)).is_err()
    });
    proxy.assert_running();
    held.release();
    let done = in_flight.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&done.stdout),
        "web /hold",
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let status = proxy.wait_exit(SETTLE);
    assert!(status.success(), "{status:?}");
}
