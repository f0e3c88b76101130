//! The config API of `meshward server` as processes: apply, get, delete,
//! validation refusals, the admin credential, restarts, and the watched
//! config directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

fn stored(mesh: &Mesh) -> Vec<serde_json::Value> {
    let out = mesh.admin(&["get", "all", "-A", "-o", "json"]);
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
    for out in [&live, &files] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let described = String::from_utf8_lossy(&live.stdout);
    assert!(described.contains("foo/deny-legacy"), "{described}");
    assert_eq!(described, String::from_utf8_lossy(&files.stdout));

    // An invalid document, sent to the server's API (`meshward apply`
    // would refuse it before sending, below): refused whole, in the
    // loader's words — the valid document before it is not written either —
    // and nothing changes.
    let snapshot = || {
        let out = mesh.admin(&["get", "all", "-A", "-o", "yaml"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let unchanged = snapshot();
    let bad = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: fine, namespace: foo}\nspec: {action: DENY, rules: [{}]}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: foo}\nspec: {action: NOPE}\n";
    let refused = mesh
        .apply_via_api("bad.yaml", bad)
        .expect_err("the server accepted an invalid document");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let errors: Vec<&str> = refused.message().lines().collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("bad.yaml:9: error: AuthorizationPolicy foo/bad: spec.action"),
        "{errors:#?}"
    );
    assert_eq!(snapshot(), unchanged);

    // `meshward apply` refuses it itself, with validate's words.
    let bad_file = dir.join("bad.yaml");
    std::fs::write(&bad_file, bad).unwrap();
    let out = mesh.admin(&["apply", "-f", bad_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:9: error: AuthorizationPolicy foo/bad: spec.action"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was applied"), "{stderr}");
    assert_eq!(snapshot(), unchanged);

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
    // A broken file: refused (the server says so), nothing changes.
    std::fs::write(config.join("broken.yaml"), "kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\nmetadata: {name: x}\nspec: {action: NOPE}\n").unwrap();
    mesh.server_logs
        .wait_for_stderr("broken.yaml not put in force", SETTLE);
    mesh.server_logs.wait_for_stderr(
        "broken.yaml:4: error: AuthorizationPolicy default/x: spec.action",
        SETTLE,
    );
    assert_eq!(stored(&mesh).len(), MTLS + JWT);
    // Removing files removes their objects.
    std::fs::remove_file(config.join("broken.yaml")).unwrap();
    std::fs::remove_file(config.join("jwt.yaml")).unwrap();
    holds(MTLS);
}
