//! The control plane driving real proxies: policies applied to the server
//! are enforced on the next requests, a proxy gets only its namespace's and
//! the root namespace's policies, secure naming comes from the registry, and
//! proxies fail static while the server is down and resync when it returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Starts `meshward proxy` with `args` plus the control plane and an admin
/// port; waits until it is ready and configured by the control plane.
fn proxy(mesh: &Mesh, ns: &str, sa: &str, args: &[String]) -> (Process, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(bin())
        .args([
            "proxy",
            "--identity",
            &format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
        ])
        .args(args)
        .args(["--control-plane", &mesh.ca_addr])
        .args(["--ca-address", &format!("https://{}", mesh.ca_addr)])
        .args([
            "--ca-root",
            mesh.data.join("root-cert.pem").to_str().unwrap(),
        ])
        .args(["--ca-server-name", "localhost"])
        .args(["--token-file", mesh.token(ns, sa).to_str().unwrap()])
        .args([
            "--admin",
            &admin.to_string(),
            "--access-log",
            "off",
            "--audit-log",
            "off",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dump = http_get(admin, "/config_dump");
        if let Some((200, body)) = &dump
            && body.contains("control plane, version")
            && http_get(admin, "/healthz/ready").map(|r| r.0) == Some(200)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy was not configured: {dump:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (process, admin)
}

fn apply(mesh: &Mesh, dir: &Path, name: &str, yaml: &str) -> std::process::Output {
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    mesh.admin(&["apply", "-f", file.to_str().unwrap()])
}

fn registry(web_port: u16, web_sa: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web, namespace: web}}
spec: {{address: 127.0.0.1, ports: {{http: {web_port}}}, labels: {{app: web}}, serviceAccount: {web_sa}}}
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
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: web}}}}
"#
    )
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-public, namespace: web}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/sleep/sa/sleep"]}}]
    to: [{operation: {methods: [GET], paths: ["/public/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-everything, namespace: other}
spec: {}
"#;

const DENY_X: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-x, namespace: web}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/public/x"]}}]}]
"#;

#[test]
fn the_control_plane_drives_proxies_and_they_fail_static_without_it() {
    let dir = tempdir("push");
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut mesh = server_with(
        &dir,
        &["--listen", &listen, "--metrics", &metrics.to_string()],
    );
    let web_in = free_port();
    let sleep_out: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    assert!(
        apply(&mesh, &dir, "registry.yaml", &registry(web_in, "web"))
            .status
            .success()
    );
    assert!(
        apply(&mesh, &dir, "policies.yaml", POLICIES)
            .status
            .success()
    );

    let app = app("web");
    let (_web, web_admin) = proxy(
        &mesh,
        "web",
        "web",
        &["--inbound".into(), format!("{web_in}={app},protocol=http")],
    );
    let (_sleep, _) = proxy(
        &mesh,
        "sleep",
        "sleep",
        &[
            "--upstream".into(),
            format!("web.web:80={sleep_out},protocol=http"),
        ],
    );

    // Endpoints and secure naming from the registry; policies enforced.
    eventually_status(sleep_out, "/public/x", 200, Duration::from_secs(5));
    assert_eq!(http_get(sleep_out, "/private").unwrap().0, 403);

    // Only its namespace's and the root namespace's policies, and the
    // registry's labels.
    let (_, dump) = http_get(web_admin, "/config_dump").unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let names: Vec<&str> = dump["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let mut names = names;
    names.sort_unstable();
    assert_eq!(names, ["allow-public", "default"], "{dump}");
    assert_eq!(dump["workload"]["labels"]["app"], "web");
    assert_eq!(dump["mtls"]["mode"], "STRICT");

    // A policy applied is enforced on the next requests.
    assert!(apply(&mesh, &dir, "deny.yaml", DENY_X).status.success());
    eventually_status(sleep_out, "/public/x", 403, Duration::from_secs(5));
    // An invalid apply changes nothing.
    let bad = apply(&mesh, &dir, "bad.yaml", &DENY_X.replace("DENY", "NOPE"));
    assert!(!bad.status.success());
    assert_eq!(http_get(sleep_out, "/public/x").unwrap().0, 403);
    assert_eq!(http_get(sleep_out, "/public/y").unwrap().0, 200);

    // `meshward status` shows both proxies in sync.
    let status = mesh.admin(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.matches("SYNCED").count(), 2, "{status}");
    assert!(status.contains("web/web"), "{status}");

    let (_, text) = http_get(metrics, "/metrics").unwrap();
    for needle in [
        "meshward_server_connected_proxies 2",
        "meshward_server_csr_signed_total 2",
        "meshward_server_push_latency_seconds_count",
        "meshward_server_nacks_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }

    // A burst of 100 applies makes a bounded number of pushes (debounce).
    let pushes = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("meshward_server_pushes_total "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = pushes(&text);
    let burst = dir.join("burst");
    std::fs::create_dir_all(&burst).unwrap();
    for i in 0..100 {
        std::fs::write(
            burst.join(format!("p{i:03}.yaml")),
            DENY_X
                .replace("deny-x", &format!("burst-{i}"))
                .replace("/public/x", &format!("/burst/{i}")),
        )
        .unwrap();
    }
    let burst_started = Instant::now();
    let out = mesh.admin(&["apply", "-f", burst.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually_status(sleep_out, "/burst/99", 403, Duration::from_secs(5));
    let after = pushes(&http_get(metrics, "/metrics").unwrap().1);
    // web gets every policy (its namespace); sleep's view does not change.
    // At most one push per second of burst (debounceMax) per affected
    // proxy, plus the last; without debouncing, web alone would get 100.
    let bound = 2 * (burst_started.elapsed().as_secs() + 2);
    assert!(
        after - before <= bound,
        "100 applies made {} pushes (bound {bound})",
        after - before
    );

    // The server goes away: the proxies keep enforcing and serving.
    let _ = mesh.server.0.kill();
    let _ = mesh.server.0.wait();
    assert_eq!(http_get(sleep_out, "/public/x").unwrap().0, 403);
    assert_eq!(http_get(sleep_out, "/public/y").unwrap().0, 200);

    // It comes back; a change made then reaches the proxies.
    mesh = server_with(&dir, &["--listen", &listen]);
    let out = mesh.admin(&["delete", "AuthorizationPolicy", "deny-x", "-n", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually_status(sleep_out, "/public/x", 200, Duration::from_secs(20));

    // Secure naming is the registry's: when web's entry names another
    // service account, the client refuses the real web workload.
    assert!(
        apply(
            &mesh,
            &dir,
            "registry.yaml",
            &registry(web_in, "someone-else")
        )
        .status
        .success()
    );
    eventually_status(sleep_out, "/public/x", 503, Duration::from_secs(5));
}
