//! The control plane driving real proxies: policies applied to the server
//! are enforced on the next requests, a proxy gets only its namespace's and
//! the root namespace's policies, secure naming comes from the registry, and
//! proxies fail static while the server is down and resync when it returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::*;

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
    // A debounce long enough that commits under any load come within it.
    let debounce = ["--debounce", "1s", "--debounce-max", "20s"];
    let mut mesh = server_with(
        &dir,
        &[
            &["--listen", &listen, "--metrics", &metrics.to_string()],
            &debounce[..],
        ]
        .concat(),
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
    let (web, web_admin) = mesh.proxy(
        "web",
        "web",
        &["--inbound".into(), format!("{web_in}={app},protocol=http")],
    );
    let (sleep, _) = mesh.proxy(
        "sleep",
        "sleep",
        &[
            "--upstream".into(),
            format!("web.web:80={sleep_out},protocol=http"),
        ],
    );

    // Endpoints and secure naming from the registry; policies enforced.
    eventually_status(sleep_out, "/public/x", 200, SETTLE);
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
    eventually_status(sleep_out, "/public/x", 403, SETTLE);
    // An invalid apply, sent to the server's API (`meshward apply` would
    // refuse it before sending): refused in the loader's words, and
    // nothing changes, stored or enforced.
    let deny_x = || {
        let out = mesh.admin(&["get", "AuthorizationPolicy", "deny-x", "-n", "web"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let stored = deny_x();
    let refused = mesh
        .apply_via_api("bad.yaml", &DENY_X.replace("DENY", "NOPE"))
        .expect_err("the server accepted an invalid policy");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("bad.yaml:6: error: AuthorizationPolicy web/deny-x: spec.action"),
        "{refused:?}"
    );
    assert_eq!(deny_x(), stored);
    assert_eq!(http_get(sleep_out, "/public/x").unwrap().0, 403);
    assert_eq!(http_get(sleep_out, "/public/y").unwrap().0, 200);

    // `meshward status` shows both proxies in sync (once web acknowledged).
    let status = wait_for(SETTLE, || {
        let status = mesh.admin(&["status"]);
        let status = String::from_utf8_lossy(&status.stdout).into_owned();
        if status.matches("SYNCED").count() == 2 {
            Ok(status)
        } else {
            Err(status)
        }
    });
    assert!(status.contains("web/web"), "{status}");

    let (_, text) = http_get(metrics, "/metrics").unwrap();
    for (series, value) in [
        ("meshward_server_connected_proxies", 2.0),
        ("meshward_server_csr_signed_total", 2.0),
        ("meshward_server_nacks_total", 0.0),
    ] {
        assert_eq!(metric(&text, series), Some(value), "{series} in\n{text}");
    }
    assert!(
        metric(&text, "meshward_server_push_latency_seconds_count").is_some_and(|n| n > 0.0),
        "{text}"
    );

    // A burst of 100 applies makes a push per debounce window, not per
    // change. Four clients apply 25 policies each at once, so changes
    // follow each other as fast as the store commits them.
    let pushes = |text: &str| metric(text, "meshward_server_pushes_total").unwrap();
    let before = pushes(&text);
    let burst_started = std::time::Instant::now();
    let mut clients = Vec::new();
    for client in 0..4 {
        let burst = dir.join(format!("burst-{client}"));
        std::fs::create_dir_all(&burst).unwrap();
        for i in client * 25..(client + 1) * 25 {
            std::fs::write(
                burst.join(format!("p{i:03}.yaml")),
                DENY_X
                    .replace("deny-x", &format!("burst-{i}"))
                    .replace("/public/x", &format!("/burst/{i}")),
            )
            .unwrap();
        }
        clients.push(spawn(
            "meshward apply",
            meshward()
                .args(["apply", "-f", burst.to_str().unwrap()])
                .args(["--server", &format!("https://{}", mesh.ca_addr)])
                .args(["--data-dir", mesh.data.to_str().unwrap()]),
        ));
    }
    for client in &mut clients {
        let status = client.wait_exit(COMMAND);
        assert!(status.success(), "{status}{}", client.logs.dump());
    }
    for last in [24, 49, 74, 99] {
        eventually_status(sleep_out, &format!("/burst/{last}"), 403, SETTLE);
    }
    let after = pushes(&http_get(metrics, "/metrics").unwrap().1);
    let windows = burst_started.elapsed().as_secs_f64() / 20.0;
    println!(
        "100 applies made {} pushes in {:?}",
        after - before,
        burst_started.elapsed()
    );
    // Only web's view changes (the policies are in its namespace): one push
    // per 20 s window of the burst, plus the last (one per change would be
    // 100).
    assert!(
        after - before <= windows.ceil() + 1.0,
        "100 applies made {} pushes",
        after - before
    );

    // The server goes away: once the proxies have tried to reconnect and
    // failed (logged after this point, after the loss of the stream), they
    // keep enforcing and serving.
    let marks = [web.logs.stderr_mark(), sleep.logs.stderr_mark()];
    let _ = mesh.server.0.kill();
    let _ = mesh.server.0.wait();
    for (proxy, mark) in [&web, &sleep].into_iter().zip(marks) {
        proxy
            .logs
            .wait_for_new_stderr(mark, "control plane unavailable (connecting: ", SETTLE);
    }
    assert_eq!(http_get(sleep_out, "/public/x").unwrap().0, 403);
    assert_eq!(http_get(sleep_out, "/public/y").unwrap().0, 200);

    // It comes back; a change made then reaches the proxies.
    mesh = server_with(&dir, &[&["--listen", &listen][..], &debounce[..]].concat());
    let out = mesh.admin(&["delete", "AuthorizationPolicy", "deny-x", "-n", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually_status(sleep_out, "/public/x", 200, SETTLE);

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
    eventually_status(sleep_out, "/public/x", 503, SETTLE);
}
