//! The config API of `meshward server` as processes: apply, get, delete,
//! validation refusals, the admin credential, restarts, and the watched
//! config directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

fn stored(mesh: &Mesh) -> Vec<serde_json::Value> {
    let out = mesh.admin(&["get", "all", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn repo(path: &str) -> String {
    format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn applied_configuration_is_validated_kept_across_restarts_and_admin_only() {
    let dir = tempdir("control-apply");
    let mut mesh = server(&dir);

    let out = mesh.admin(&["apply", "-f", &repo("examples/zero-trust/policies.yaml")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("AuthorizationPolicy/foo/deny-legacy created"),
        "{stdout}"
    );
    let before = stored(&mesh);
    assert_eq!(before.len(), 6);
    let created = before[0]["metadata"]["creationTimestamp"].clone();
    assert!(created.is_string());

    // describe works on what the server holds, as on files.
    let live = mesh.admin(&["describe", "-n", "foo", "-l", "app=httpbin"]);
    let files = output(meshward().args([
        "describe",
        "-f",
        &repo("examples/zero-trust/policies.yaml"),
        "-n",
        "foo",
        "-l",
        "app=httpbin",
    ]));
    assert!(
        live.status.success(),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&live.stdout),
        String::from_utf8_lossy(&files.stdout)
    );

    // An invalid document: refused with validate's words, nothing changes.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: foo}\nspec: {action: NOPE}\n",
    )
    .unwrap();
    let out = mesh.admin(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:4: error: AuthorizationPolicy foo/bad: spec.action"),
        "{stderr}"
    );
    assert_eq!(stored(&mesh).len(), 6);

    // Not the admin: a workload certificate is refused.
    let workload = dir.join("workload-cert");
    run(&[
        "ca",
        "issue",
        "--data-dir",
        mesh.data.to_str().unwrap(),
        "-n",
        "foo",
        "--service-account",
        "sleep",
        "--out",
        workload.to_str().unwrap(),
    ]);
    let out = output(
        meshward()
            .args([
                "apply",
                "-f",
                &repo("examples/mtls/policies.yaml"),
                "--server",
                &format!("https://{}", mesh.ca_addr),
            ])
            .args(["--admin-dir", workload.to_str().unwrap()]),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("may not change configuration"), "{stderr}");

    // Delete, then restart: what was applied is still there, as it was.
    let out = mesh.admin(&["delete", "AuthorizationPolicy", "deny-legacy", "-n", "foo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stored(&mesh).len(), 5);
    let _ = mesh.server.0.kill();
    let _ = mesh.server.0.wait();
    mesh = server(&dir);
    let after = stored(&mesh);
    assert_eq!(after.len(), 5);
    assert_eq!(
        after[0]["metadata"]["creationTimestamp"], created,
        "creationTimestamp kept"
    );
}

#[test]
fn the_config_directory_is_watched_and_a_broken_file_changes_nothing() {
    // Objects in examples/mtls/policies.yaml and examples/jwt/policies.yaml.
    const MTLS: usize = 3;
    const JWT: usize = 3;
    let dir = tempdir("control-dir");
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::copy(
        repo("examples/mtls/policies.yaml"),
        config.join("mtls.yaml"),
    )
    .unwrap();
    let mesh = server_with(&dir, &["--config-dir", config.to_str().unwrap()]);
    let holds = |count: usize| {
        wait_for(SETTLE, || {
            let n = stored(&mesh).len();
            if n == count {
                Ok(())
            } else {
                Err(format!("the server holds {n} objects, not {count}"))
            }
        })
    };
    holds(MTLS);
    std::fs::copy(repo("examples/jwt/policies.yaml"), config.join("jwt.yaml")).unwrap();
    holds(MTLS + JWT);
    // A broken file: the directory is refused whole (the server says so),
    // nothing changes.
    std::fs::write(config.join("broken.yaml"), "kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\nmetadata: {name: x}\nspec: {action: NOPE}\n").unwrap();
    let refused = mesh
        .server_logs
        .wait_for_stderr("config directory refused", SETTLE);
    assert!(
        mesh.server_logs.stderr().contains("broken.yaml:4: error"),
        "{refused}\n{}",
        mesh.server_logs.stderr()
    );
    assert_eq!(stored(&mesh).len(), MTLS + JWT);
    // Removing files removes their objects.
    std::fs::remove_file(config.join("broken.yaml")).unwrap();
    std::fs::remove_file(config.join("jwt.yaml")).unwrap();
    holds(MTLS);
}
