//! Attacks on how the control plane tells proxies which workload they are
//! (issue 10, point 1), against running processes.
//!
//! Two WorkloadEntries that share a service account and an address (as
//! `meshward up examples/bookinfo` runs reviews-v1 and reviews-v2) must each
//! be enforced with their own labels; a proxy that claims a workload it is
//! not, or that could be one of several, must be refused with a reason that
//! `meshward status` shows, and must not serve as if it had no policies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;

const REVIEWS: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
const RATINGS: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings";

/// Waits until `check` returns `Some`, for at most `within`; `what` says
/// what was awaited when it never comes.
fn wait_for<T>(within: Duration, what: impl Fn() -> String, check: impl Fn() -> Option<T>) -> T {
    common::wait_for(within, || check().ok_or_else(&what))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The lines of `meshward status` about `workload` (its first column).
fn rows<'a>(status: &'a str, workload: &str) -> Vec<&'a str> {
    status
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(workload))
        .collect()
}

fn config_dump(admin: SocketAddr) -> serde_json::Value {
    let (status, body) = http_get(admin, "/config_dump").unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn policy_names(dump: &serde_json::Value) -> Vec<String> {
    dump["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `meshward up DIR`, stopped with SIGTERM (as Ctrl-C) when the test ends,
/// however it ends, so everything it started stops with it.
struct Up {
    _process: Spawned,
    data: PathBuf,
    mesh: serde_json::Value,
}

impl Up {
    fn start(root: &Path, dir: &Path) -> Up {
        let data = root.join("data");
        let mut process = spawn(
            "meshward up",
            meshward()
                .args(["up", "--explicit", dir.to_str().unwrap(), "--data-dir"])
                .arg(&data),
        );
        // up.json is written once everything is ready (or reported not).
        let mesh = common::wait_for(START, || {
            process.assert_running();
            let text = std::fs::read_to_string(data.join("up.json"))
                .map_err(|e| format!("meshward up is not ready: {e}"))?;
            serde_json::from_str(&text).map_err(|e| e.to_string())
        });
        Up {
            _process: process,
            data,
            mesh,
        }
    }

    fn workload(&self, name: &str) -> &serde_json::Value {
        self.mesh["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("no workload {name} in {}", self.mesh))
    }

    /// Where peers reach `workload`'s port 9080 (its proxy's inbound).
    fn inbound(&self, workload: &str) -> SocketAddr {
        self.workload(workload)["ports"]["9080"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn admin_of(&self, workload: &str) -> SocketAddr {
        self.workload(workload)["admin"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A `meshward` command against up's control plane, as its admin.
    fn admin(&self, args: &[&str]) -> Output {
        output(
            meshward()
                .args(args)
                .args(["--server", self.mesh["control_plane"].as_str().unwrap()])
                .arg("--data-dir")
                .arg(&self.data),
        )
    }

    fn proxy_log(&self, workload: &str) -> String {
        let file = self
            .data
            .join("logs")
            .join(format!("{}.proxy.log", workload.replace('/', ".")));
        std::fs::read_to_string(file).unwrap_or_default()
    }
}

/// reviews-v1 and reviews-v2 as in examples/bookinfo: one service account;
/// `up` gives both the address 127.0.0.1. A DENY selects v2 only.
const SHARED_MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {serviceAccount: bookinfo-reviews, labels: {app: reviews, version: v1}, ports: {http: 9080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {serviceAccount: bookinfo-reviews, labels: {app: reviews, version: v2}, ports: {http: 9080}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-v2-secret, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews, version: v2}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/secret"]}}]}]
"#;

#[test]
fn workloads_sharing_a_service_account_are_each_enforced_with_their_own_labels() {
    let root = tempdir("attack-workload-shared");
    let dir = root.join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), SHARED_MESH).unwrap();
    let up = Up::start(&root, &dir);
    let (v1, v2) = (
        up.inbound("bookinfo/reviews-v1"),
        up.inbound("bookinfo/reviews-v2"),
    );

    // The DENY selecting version v2 is enforced at v2, and only there. /ok
    // answering at v2 shows it is configured, not refusing everything.
    assert_eq!(http_get(v2, "/secret").unwrap().0, 403);
    assert_eq!(http_get(v2, "/ok").unwrap().0, 200);
    assert_eq!(http_get(v1, "/secret").unwrap().0, 200);

    // Each proxy holds its own entry's labels, and describe against the
    // running server agrees with what each proxy enforces.
    for (workload, version, applies) in [
        ("bookinfo/reviews-v1", "v1", false),
        ("bookinfo/reviews-v2", "v2", true),
    ] {
        let dump = config_dump(up.admin_of(workload));
        assert_eq!(dump["workload"]["labels"]["version"], version, "{dump}");
        assert_eq!(
            policy_names(&dump).contains(&"deny-v2-secret".to_owned()),
            applies,
            "{workload}: {dump}"
        );
        let describe = up.admin(&[
            "describe",
            "-n",
            "bookinfo",
            "-l",
            &format!("app=reviews,version={version}"),
        ]);
        assert!(describe.status.success(), "{}", text(&describe));
        let describe = String::from_utf8_lossy(&describe.stdout).into_owned();
        let (applying, not_applying) = describe
            .split_once("Policies that do not apply:")
            .unwrap_or_else(|| panic!("{describe}"));
        assert_eq!(
            applying.contains("deny-v2-secret"),
            applies,
            "{workload}: {describe}"
        );
        assert_eq!(
            not_applying.contains("deny-v2-secret"),
            !applies,
            "{workload}: {describe}"
        );
    }

    // `status` lists each workload once, in sync.
    let status = wait_for(
        Duration::from_secs(10),
        || format!("status: {}", text(&up.admin(&["status"]))),
        || {
            let status = String::from_utf8_lossy(&up.admin(&["status"]).stdout).into_owned();
            let (r1, r2) = (
                rows(&status, "bookinfo/reviews-v1"),
                rows(&status, "bookinfo/reviews-v2"),
            );
            (r1.len() == 1 && r2.len() == 1 && r1[0].contains("SYNCED") && r2[0].contains("SYNCED"))
                .then_some(status.clone())
        },
    );
    assert!(!status.contains("REFUSED"), "{status}");

    // reviews-v2's entry, edited in the directory `up` watches (which owns
    // it), now runs as another service account: its proxy's claim no
    // longer holds, so the next push cuts it off, and status says why. It
    // keeps enforcing the configuration it had, as its own.
    let edited = SHARED_MESH.replace(
        "name: reviews-v2, namespace: bookinfo}\nspec: {serviceAccount: bookinfo-reviews,",
        "name: reviews-v2, namespace: bookinfo}\nspec: {serviceAccount: bookinfo-reviews-v2,",
    );
    assert_ne!(edited, SHARED_MESH);
    std::fs::write(dir.join("mesh.yaml"), edited).unwrap();
    let reason = format!(
        "workload bookinfo/reviews-v2 runs as spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews-v2; \
         the certificate is {REVIEWS}"
    );
    let status = wait_for(
        Duration::from_secs(10),
        || format!("status: {}", text(&up.admin(&["status"]))),
        || {
            let status = String::from_utf8_lossy(&up.admin(&["status"]).stdout).into_owned();
            let r2 = rows(&status, "bookinfo/reviews-v2");
            (r2.len() == 1 && r2[0].contains("REFUSED") && r2[0].contains(&reason))
                .then_some(status.clone())
        },
    );
    assert_eq!(rows(&status, "bookinfo/reviews-v1").len(), 1, "{status}");
    wait_for(
        Duration::from_secs(10),
        || {
            format!(
                "reviews-v2's proxy log: {}",
                up.proxy_log("bookinfo/reviews-v2")
            )
        },
        || {
            up.proxy_log("bookinfo/reviews-v2")
                .contains(&reason)
                .then_some(())
        },
    );
    assert_eq!(http_get(v2, "/secret").unwrap().0, 403);
    assert_eq!(http_get(v2, "/ok").unwrap().0, 200);
    let dump = config_dump(up.admin_of("bookinfo/reviews-v2"));
    assert_eq!(dump["workload"]["labels"]["version"], "v2", "{dump}");
}

/// The registry of the refusal tests: reviews-v1 and reviews-v2 share a
/// service account and an address; reviews-v3 is elsewhere.
const REGISTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {address: 127.0.0.1, serviceAccount: bookinfo-reviews, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {address: 127.0.0.1, serviceAccount: bookinfo-reviews, labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v3, namespace: bookinfo}
spec: {address: 127.0.0.2, serviceAccount: bookinfo-reviews-v3, labels: {app: reviews, version: v3}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings, namespace: bookinfo}
spec: {address: 127.0.0.1, serviceAccount: bookinfo-ratings, labels: {app: ratings}}
"#;

/// A proxy started by hand: (process, its inbound, its admin).
struct Proxy {
    process: Spawned,
    inbound: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    fn start(mesh: &Mesh, sa: &str, claim: Option<&str>, app: SocketAddr) -> Proxy {
        let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut command = meshward();
        command
            .args(["proxy", "--identity"])
            .arg(format!("spiffe://cluster.local/ns/bookinfo/sa/{sa}"))
            .args(["--inbound", &format!("{inbound}={app},protocol=http")])
            .args(["--control-plane", &mesh.ca_addr])
            .args(["--ca-address", &format!("https://{}", mesh.ca_addr)])
            .arg("--ca-root")
            .arg(mesh.data.join("root-cert.pem"))
            .args(["--ca-server-name", "localhost", "--token-file"])
            .arg(mesh.token("bookinfo", sa))
            .args(["--admin", &admin.to_string()])
            .args(["--access-log", "off", "--audit-log", "off"]);
        if let Some(claim) = claim {
            command.args(["--workload", claim]);
        }
        let process = spawn(&format!("meshward proxy ({sa})"), &mut command);
        // Ready: it has its certificate, so it has reached the server.
        eventually_status(admin, "/healthz/ready", 200, START);
        Proxy {
            process,
            inbound,
            admin,
        }
    }

    fn log(&self) -> String {
        self.process.logs.stderr()
    }
}

/// How many times `status` says a refused proxy (its row) was refused.
fn attempts(row: &str) -> u64 {
    if row.contains("(once from") {
        return 1;
    }
    row.split(" times from")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn proxies_the_server_cannot_identify_are_refused_and_status_says_why() {
    let dir = tempdir("attack-workload-refused");
    let mesh = server(&dir);
    let file = dir.join("registry.yaml");
    std::fs::write(&file, REGISTRY).unwrap();
    let applied = mesh.admin(&["apply", "-f", file.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", text(&applied));
    let app = app("app");

    // Each attack, and the reason the server gives for refusing it.
    let cases = [
        (
            "ratings's certificate claiming reviews-v2",
            Proxy::start(&mesh, "bookinfo-ratings", Some("bookinfo/reviews-v2"), app),
            "bookinfo/reviews-v2",
            format!("workload bookinfo/reviews-v2 runs as {REVIEWS}; the certificate is {RATINGS}"),
        ),
        (
            "reviews's certificate without a claim",
            Proxy::start(&mesh, "bookinfo-reviews", None, app),
            "-",
            format!(
                "2 WorkloadEntries run as {REVIEWS} (bookinfo/reviews-v1, bookinfo/reviews-v2): \
                 the proxy must say which one it is (meshward proxy --workload NAMESPACE/NAME)"
            ),
        ),
        (
            "reviews-v3 claimed from another address",
            Proxy::start(
                &mesh,
                "bookinfo-reviews-v3",
                Some("bookinfo/reviews-v3"),
                app,
            ),
            "bookinfo/reviews-v3",
            "workload bookinfo/reviews-v3 is at 127.0.0.2; the proxy connects from 127.0.0.1"
                .to_owned(),
        ),
    ];
    // Backward compatible: the only entry of an identity, without a claim.
    let ratings = Proxy::start(&mesh, "bookinfo-ratings", None, app);

    // Retried with backoff and refused each time: status lists each refused
    // proxy once, with the reason, once it has been refused a few times.
    let status = wait_for(
        Duration::from_secs(20),
        || format!("status: {}", text(&mesh.admin(&["status"]))),
        || {
            let status = String::from_utf8_lossy(&mesh.admin(&["status"]).stdout).into_owned();
            let all = cases.iter().all(|(_, _, workload, reason)| {
                let refused: Vec<&str> = rows(&status, workload)
                    .into_iter()
                    .filter(|r| r.contains(reason.as_str()))
                    .collect();
                refused.len() == 1 && refused[0].contains("REFUSED") && attempts(refused[0]) >= 3
            });
            let synced = rows(&status, "bookinfo/ratings");
            (all && synced.len() == 1 && synced[0].contains("SYNCED")).then_some(status.clone())
        },
    );
    for (attack, proxy, _, reason) in &cases {
        // Fail closed: with no configuration, everything inbound is denied,
        // never served as if no policy applied.
        assert_eq!(http_get(proxy.inbound, "/ok").unwrap().0, 403, "{attack}");
        let dump = config_dump(proxy.admin);
        assert!(
            dump["config"]["source"]
                .as_str()
                .unwrap()
                .starts_with("awaiting the control plane"),
            "{attack}: {dump}"
        );
        assert_eq!(
            dump["workload"]["labels"],
            serde_json::json!({}),
            "{attack}: no entry's labels: {dump}"
        );
        // The proxy says why, once, however often it retried.
        let log = proxy.log();
        assert_eq!(
            log.matches("the control plane refused this proxy").count(),
            1,
            "{attack}: {log}\n{status}"
        );
        assert!(log.contains(reason.as_str()), "{attack}: {log}");
    }
    // The accepted proxy is configured with its own entry.
    eventually_status(ratings.inbound, "/ok", 200, Duration::from_secs(5));
    let dump = config_dump(ratings.admin);
    assert_eq!(dump["workload"]["labels"]["app"], "ratings", "{dump}");
}
