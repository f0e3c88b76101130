//! `examples/ext-authz/tour.md`, end to end: `meshward up` in network
//! namespaces with `meshward demo-authz` as a workload of the mesh, the
//! tour's MeshConfig applied, and curl in the workloads. The authorizer is
//! reached by httpbin's proxy over mutual TLS, by name, and decides on the
//! header and the caller's SPIFFE ID.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The tour's MeshConfig (its section 1).
const MESH: &str = "extensionProviders:
- name: demo-authz
  envoyExtAuthzGrpc:
    service: ext-authz.foo
    port: 9000
    timeout: 2s
    includeRequestBodyInCheck: {maxRequestBytes: 4096, allowPartialMessage: true}
";

struct Tour {
    _up: Spawned,
    data: PathBuf,
}

impl Tour {
    /// `curl -sS -m 10 ARGS` in `workload`: (exit code, output).
    fn curl(&self, workload: &str, args: &[&str]) -> (i32, String) {
        let out = output(
            meshward()
                .args(["exec", "--data-dir", self.data.to_str().unwrap(), workload])
                .args(["--", "curl", "-sS", "-m", "10", "-w", "\n%{http_code}"])
                .args(args),
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// (status, body) of a request from `workload`.
    fn call(&self, workload: &str, args: &[&str]) -> (u16, String) {
        let (_, out) = self.curl(workload, args);
        let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }
}

#[test]
fn the_ext_authz_tour_in_namespaces() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let root = tempdir("ext-authz-tour");
    let dir = root.join("ext-authz");
    std::fs::create_dir_all(&dir).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/ext-authz");
    for file in ["workloads.yaml", "policies.yaml"] {
        std::fs::copy(example.join(file), dir.join(file)).unwrap();
    }
    let data = root.join("data");
    // The authorizer's command is `meshward demo-authz`: on the PATH.
    let bin_dir = Path::new(bin()).parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut up = spawn(
        "meshward up",
        meshward().env("PATH", &path).args([
            "up",
            dir.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ]),
    );
    let up_json = data.join("up.json");
    let text = wait_for(START, || {
        up.assert_running();
        std::fs::read_to_string(&up_json).map_err(|e| format!("{}: {e}", up_json.display()))
    });
    let mesh: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(mesh["mode"], "namespaced", "{mesh}");
    let tour = Tour { _up: up, data };

    // Before the provider is defined, the CUSTOM policy fails closed.
    let (status, _) = tour.call(
        "foo/sleep",
        &[
            "-H",
            "x-ext-authz: allow",
            "http://httpbin.foo:8000/anything",
        ],
    );
    assert_eq!(status, 403, "no provider yet: denied");

    let mesh_file = root.join("mesh.yaml");
    std::fs::write(&mesh_file, MESH).unwrap();
    let applied = output(meshward().args([
        "apply",
        "--mesh-config",
        "-f",
        mesh_file.to_str().unwrap(),
        "--data-dir",
        tour.data.to_str().unwrap(),
    ]));
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // sleep with the header: allowed, with the authorizer's header at httpbin.
    let body = wait_for(SETTLE, || {
        let (status, body) = tour.call(
            "foo/sleep",
            &[
                "-H",
                "x-ext-authz: allow",
                "http://httpbin.foo:8000/anything",
            ],
        );
        if status == 200 {
            Ok(body)
        } else {
            Err(format!("sleep with the header: {status} {body}"))
        }
    });
    assert!(
        body.contains("x-ext-authz-check-result") && body.contains("allowed"),
        "{body}"
    );
    // A body is checked and reaches httpbin.
    let (status, body) = tour.call(
        "foo/sleep",
        &[
            "-H",
            "x-ext-authz: allow",
            "-d",
            "{\"order\": 1}",
            "http://httpbin.foo:8000/orders",
        ],
    );
    assert_eq!(status, 200, "{body}");

    // Without the header, and from another caller: the authorizer's denial.
    let (status, body) = tour.call("foo/sleep", &["http://httpbin.foo:8000/anything"]);
    assert_eq!(status, 403);
    assert!(
        body.contains("denied by meshward demo-authz: header x-ext-authz: allow is missing"),
        "{body}"
    );
    let (status, body) = tour.call(
        "foo/other",
        &[
            "-H",
            "x-ext-authz: allow",
            "http://httpbin.foo:8000/anything",
        ],
    );
    assert_eq!(status, 403);
    assert!(
        body.contains("caller \"spiffe://cluster.local/ns/foo/sa/other\" is not allowed"),
        "{body}"
    );

    // The authorizer saw the callers' SPIFFE IDs, from httpbin's proxy.
    let log = tour.data.join("logs").join("foo.ext-authz.app.log");
    wait_until(SETTLE, "the authorizer's lines", || {
        std::fs::read_to_string(&log).is_ok_and(|t| {
            t.contains("\"source\":\"spiffe://cluster.local/ns/foo/sa/other\"")
                && t.contains("\"destination\":\"spiffe://cluster.local/ns/foo/sa/httpbin\"")
        })
    });
}
