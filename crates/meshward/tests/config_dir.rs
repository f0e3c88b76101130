//! One owner per object, against a running `meshward server --config-dir`
//! (and `meshward up`, which runs one): the directory owns what its files
//! define — editing a file takes effect, also over an object the API wrote
//! first, and `delete` or `apply` of such an object is refused, naming the
//! file — while the API's own objects survive every reload. A broken file
//! keeps its objects' last good version while the other files' changes
//! apply; two files defining one object are an error naming both; nothing
//! is said again at every reload.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn policy(name: &str, path: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: web}}\nspec: {{action: DENY, rules: [{{to: [{{operation: {{paths: [{path}]}}}}]}}]}}\n"
    )
}

const WORKLOAD: &str = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: web}\nspec: {address: 127.0.0.1, serviceAccount: web, labels: {app: web, version: v1}, ports: {http: 8080}}\n";

/// Writes `text` into the watched directory as `name`, whole (renamed
/// into place, as an editor saves).
fn put(config: &Path, name: &str, text: &str) {
    let tmp = config.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, config.join(name)).unwrap();
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The object the server holds, `None` when it holds none.
fn get(
    admin: impl Fn(&[&str]) -> std::process::Output,
    kind: &str,
    name: &str,
) -> Option<serde_json::Value> {
    let out = admin(&["get", kind, name, "-n", "web", "-o", "json"]);
    if !out.status.success() {
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not found"),
            "{}",
            text(&out)
        );
        return None;
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.into_iter().next()
}

/// The path of a policy made by [`policy`], as the server holds it.
fn path_of(mesh: &Mesh, name: &str) -> Option<String> {
    get(|a| mesh.admin(a), "AuthorizationPolicy", name).map(|p| {
        p["spec"]["rules"][0]["to"][0]["operation"]["paths"][0]
            .as_str()
            .unwrap()
            .to_owned()
    })
}

fn owner_of(object: &serde_json::Value) -> &str {
    object["metadata"]["annotations"]["meshward.io/source"]
        .as_str()
        .unwrap_or_else(|| panic!("no owner in {object}"))
}

/// Waits until the server holds policy `name` with `path` (`None`: holds
/// no such policy).
fn holds(mesh: &Mesh, name: &str, path: Option<&str>) {
    wait_for(SETTLE, || {
        let now = path_of(mesh, name);
        if now.as_deref() == path {
            Ok(())
        } else {
            Err(format!("{name} is {now:?}, not {path:?}"))
        }
    });
}

fn config_dir(root: &Path) -> PathBuf {
    let config = root.join("config");
    std::fs::create_dir_all(&config).unwrap();
    config
}

#[test]
fn the_directory_owns_what_it_defines_and_the_apis_own_objects_survive_its_reloads() {
    let root = tempdir("config-dir-owner");
    let config = config_dir(&root);
    put(&config, "workloads.yaml", WORKLOAD);
    let mesh = server_with(&root, &["--config-dir", config.to_str().unwrap()]);
    let policies = config.join("policies.yaml").display().to_string();
    wait_until(SETTLE, "the directory's WorkloadEntry is held", || {
        get(|a| mesh.admin(a), "WorkloadEntry", "web").is_some()
    });

    // The API writes two objects; then a file defines one of them: the
    // file takes it over, and its content is in force.
    let api = root.join("api.yaml");
    std::fs::write(
        &api,
        format!(
            "{}---\n{}",
            policy("taken", "/api"),
            policy("api-only", "/api")
        ),
    )
    .unwrap();
    let out = mesh.admin(&["apply", "-f", api.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let taken = get(|a| mesh.admin(a), "AuthorizationPolicy", "taken").unwrap();
    assert_eq!(owner_of(&taken), "api");
    put(&config, "policies.yaml", &policy("taken", "/from-file"));
    holds(&mesh, "taken", Some("/from-file"));
    let taken = get(|a| mesh.admin(a), "AuthorizationPolicy", "taken").unwrap();
    assert_eq!(owner_of(&taken), format!("file:{policies}"));

    // Editing the file changes it; editing a WorkloadEntry takes effect.
    put(
        &config,
        "policies.yaml",
        &policy("taken", "/edited-in-file"),
    );
    holds(&mesh, "taken", Some("/edited-in-file"));
    put(
        &config,
        "workloads.yaml",
        &WORKLOAD.replace("version: v1", "version: v2"),
    );
    wait_until(SETTLE, "the edited WorkloadEntry is in force", || {
        get(|a| mesh.admin(a), "WorkloadEntry", "web")
            .is_some_and(|we| we["spec"]["labels"]["version"] == "v2")
    });

    // `delete` and `apply` of it are refused, naming the file; nothing
    // changes.
    let refusal =
        format!("AuthorizationPolicy web/taken is defined by {policies}: edit or remove it there");
    let out = mesh.admin(&["delete", "AuthorizationPolicy", "taken", "-n", "web"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&refusal), "{}", text(&out));
    std::fs::write(&api, policy("taken", "/api-again")).unwrap();
    let out = mesh.admin(&["apply", "-f", api.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&refusal), "{}", text(&out));
    assert_eq!(path_of(&mesh, "taken").as_deref(), Some("/edited-in-file"));

    // The API's own object went through every reload untouched, and stays
    // the API's to change.
    let api_only = get(|a| mesh.admin(a), "AuthorizationPolicy", "api-only").unwrap();
    assert_eq!(owner_of(&api_only), "api");
    assert_eq!(path_of(&mesh, "api-only").as_deref(), Some("/api"));

    // Removing the file deletes its object, never the API's.
    std::fs::remove_file(config.join("policies.yaml")).unwrap();
    holds(&mesh, "taken", None);
    assert_eq!(path_of(&mesh, "api-only").as_deref(), Some("/api"));
    let out = mesh.admin(&["delete", "AuthorizationPolicy", "api-only", "-n", "web"]);
    assert!(out.status.success(), "{}", text(&out));

    // Three reloads after the takeover (each logged before the next one
    // ran): the takeover was said once, and no reload warned about the
    // API's objects.
    let logs = mesh.server_logs.stderr();
    assert_eq!(
        logs.matches("the API had written this object").count(),
        1,
        "{logs}"
    );
    assert!(!logs.contains("the API's stays"), "{logs}");
}

#[test]
fn a_broken_file_holds_back_only_itself_and_two_files_defining_one_object_are_an_error() {
    let root = tempdir("config-dir-broken");
    let config = config_dir(&root);
    put(&config, "a.yaml", &policy("deny-a", "/a-1"));
    put(&config, "b.yaml", &policy("deny-b", "/b-1"));
    let mesh = server_with(&root, &["--config-dir", config.to_str().unwrap()]);
    let [a, b, c] = ["a.yaml", "b.yaml", "c.yaml"].map(|f| config.join(f).display().to_string());
    holds(&mesh, "deny-a", Some("/a-1"));
    holds(&mesh, "deny-b", Some("/b-1"));

    // a.yaml breaks as it changes, while b.yaml changes too: b.yaml's
    // change applies, a.yaml's object keeps its last good version, and the
    // error names a.yaml's line.
    put(
        &config,
        "a.yaml",
        &policy("deny-a", "/a-2").replace("DENY", "NOPE"),
    );
    put(&config, "b.yaml", &policy("deny-b", "/b-two"));
    holds(&mesh, "deny-b", Some("/b-two"));
    mesh.server_logs.wait_for_stderr(
        &format!("{a}:4: error: AuthorizationPolicy web/deny-a: spec.action"),
        SETTLE,
    );
    let refused = format!("{a} not put in force; its objects keep their last good version");
    mesh.server_logs.wait_for_stderr(&refused, SETTLE);
    assert_eq!(path_of(&mesh, "deny-a").as_deref(), Some("/a-1"));

    // b.yaml changes twice more: the error is not said again.
    put(&config, "b.yaml", &policy("deny-b", "/b-three"));
    holds(&mesh, "deny-b", Some("/b-three"));
    put(&config, "b.yaml", &policy("deny-b", "/b-fourth"));
    holds(&mesh, "deny-b", Some("/b-fourth"));
    let logs = mesh.server_logs.stderr();
    assert_eq!(logs.matches(&refused).count(), 1, "{logs}");
    assert_eq!(path_of(&mesh, "deny-a").as_deref(), Some("/a-1"));

    // c.yaml defines b.yaml's object too: an error naming both files;
    // b.yaml's definition stays, and none of c.yaml is taken.
    put(
        &config,
        "c.yaml",
        &format!("{}---\n{}", policy("deny-c", "/c"), policy("deny-b", "/c")),
    );
    mesh.server_logs.wait_for_stderr(
        &format!(
            "{c}: error: AuthorizationPolicy web/deny-b: also defined by {b}; the definition in {b} stays"
        ),
        SETTLE,
    );
    assert_eq!(path_of(&mesh, "deny-b").as_deref(), Some("/b-fourth"));
    assert_eq!(path_of(&mesh, "deny-c"), None);

    // Both fixed: each applies.
    put(&config, "a.yaml", &policy("deny-a", "/a-three"));
    put(&config, "c.yaml", &policy("deny-c", "/c"));
    holds(&mesh, "deny-a", Some("/a-three"));
    holds(&mesh, "deny-c", Some("/c"));
    assert_eq!(path_of(&mesh, "deny-b").as_deref(), Some("/b-fourth"));
}

/// Under `meshward up`, which places each workload through the API (the
/// address and ports it chose) while its directory defines the entries.
#[test]
fn under_up_the_directory_owns_its_workload_entries_and_up_places_them() {
    let root = tempdir("config-dir-up");
    let dir = root.join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    let entry = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: web}\nspec: {serviceAccount: web, labels: {app: web, version: v1}, ports: {http: 8080}}\n";
    std::fs::write(dir.join("workloads.yaml"), entry).unwrap();
    let data = root.join("data");
    let mut up = spawn(
        "meshward up",
        meshward()
            .args(["up", "--explicit", dir.to_str().unwrap(), "--data-dir"])
            .arg(&data),
    );
    let started: serde_json::Value = wait_for(START, || {
        up.assert_running();
        let text = std::fs::read_to_string(data.join("up.json"))
            .map_err(|e| format!("meshward up is not ready: {e}"))?;
        serde_json::from_str(&text).map_err(|e| e.to_string())
    });
    let server = started["control_plane"].as_str().unwrap().to_owned();
    let admin = |args: &[&str]| {
        output(
            meshward()
                .args(args)
                .args(["--server", &server])
                .arg("--data-dir")
                .arg(&data),
        )
    };
    let file = dir.join("workloads.yaml");
    let file = std::path::absolute(&file).unwrap().display().to_string();

    // The entry is the file's, placed where `up` runs it.
    let held = get(admin, "WorkloadEntry", "web").unwrap();
    assert_eq!(owner_of(&held), format!("file:{file}"), "{held}");
    assert_eq!(held["spec"]["address"], "127.0.0.1", "{held}");
    assert_ne!(held["spec"]["ports"]["http"], 8080, "{held}");
    let placed = held["spec"]["ports"]["http"].clone();

    // Editing it in the directory takes effect, still placed.
    std::fs::write(
        dir.join("workloads.yaml"),
        entry.replace("version: v1", "version: v2"),
    )
    .unwrap();
    let held = wait_for(SETTLE, || {
        let held = get(admin, "WorkloadEntry", "web").unwrap();
        if held["spec"]["labels"]["version"] == "v2" {
            Ok(held)
        } else {
            Err(format!("not edited yet: {held}"))
        }
    });
    assert_eq!(held["spec"]["address"], "127.0.0.1", "{held}");
    assert_eq!(held["spec"]["ports"]["http"], placed, "{held}");

    // `delete` is refused, naming the file.
    let out = admin(&["delete", "WorkloadEntry", "web", "-n", "web"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "WorkloadEntry web/web is defined by {file}: edit or remove it there"
        )),
        "{}",
        text(&out)
    );
    let logs = up.logs.stderr();
    assert!(!logs.contains("the API's stays"), "{logs}");
    assert!(!logs.contains("the API had written this object"), "{logs}");
}
