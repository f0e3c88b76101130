//! Istio's security walkthrough, end to end: `meshward up examples/bookinfo`
//! with real processes, called with real HTTP clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;

/// `meshward up` picks free ports by binding and releasing them; two meshes
/// starting at once in one test process could pick the same. One at a time.
static ONE_MESH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_mesh() -> std::sync::MutexGuard<'static, ()> {
    ONE_MESH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Up {
    up: Spawned,
    dir: PathBuf,
    data: PathBuf,
    mesh: serde_json::Value,
    user: User,
}

/// Who runs `meshward`: this test's user (root in CI), or an ordinary one.
#[derive(Clone, Copy, Debug, PartialEq)]
enum User {
    Me,
    /// `nobody` (uid and gid 65534), through `setpriv`: `up` makes its
    /// namespaces in a user namespace of its own.
    Nobody,
}

const NOBODY: u32 = 65534;

impl User {
    /// `meshward`, run as this user.
    fn meshward(self) -> std::process::Command {
        match self {
            User::Me => meshward(),
            User::Nobody => {
                let mut command = std::process::Command::new("setpriv");
                command
                    .args([
                        &format!("--reuid={NOBODY}"),
                        &format!("--regid={NOBODY}"),
                        "--clear-groups",
                        "--",
                    ])
                    .arg(bin());
                command
            }
        }
    }
}

impl Up {
    /// `meshward up` on a copy of examples/bookinfo.
    fn start(name: &str) -> Up {
        let root = tempdir(name);
        let dir = root.join("bookinfo");
        std::fs::create_dir_all(&dir).unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
        for file in ["workloads.yaml", "policies.yaml"] {
            std::fs::copy(example.join(file), dir.join(file)).unwrap();
        }
        Up::launch(&root, dir, &["--explicit"], User::Me)
    }

    /// `meshward up` on a copy of examples/bookinfo, namespaced, run by
    /// `user` (owning the copy and the data directory).
    fn start_namespaced(name: &str, user: User) -> Up {
        let root = tempdir(name);
        let dir = root.join("bookinfo");
        std::fs::create_dir_all(&dir).unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
        for file in ["workloads.yaml", "policies.yaml"] {
            std::fs::copy(example.join(file), dir.join(file)).unwrap();
        }
        if user == User::Nobody {
            for path in [
                &root,
                &dir,
                &dir.join("workloads.yaml"),
                &dir.join("policies.yaml"),
            ] {
                std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
            }
        }
        let up = Up::launch(&root, dir, &[], user);
        assert_eq!(up.mesh["mode"], "namespaced", "{}", up.mesh);
        assert_eq!(
            up.mesh["user_namespace"].is_object(),
            user == User::Nobody,
            "{}",
            up.mesh
        );
        up
    }

    /// `meshward exec --data-dir DATA WORKLOAD -- curl -sS -m 10 ARGS`:
    /// (curl's exit code, its output).
    fn exec_curl(&self, workload: &str, args: &[&str]) -> (i32, String) {
        let out = output(
            self.user
                .meshward()
                .args(["exec", "--data-dir", self.data.to_str().unwrap(), workload])
                .args(["--", "curl", "-sS", "-m", "10"])
                .args(args),
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The HTTP status of GET `url` from `workload` (0: no response).
    fn exec_status(&self, workload: &str, url: &str, headers: &[&str]) -> u16 {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(url);
        self.exec_curl(workload, &args)
            .1
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// `meshward up DIR` with state under `root`; returns once it wrote
    /// `up.json` (everything ready, or reported as not). Fails at once,
    /// with its output, if `up` exits first.
    fn launch(root: &Path, dir: PathBuf, extra: &[&str], user: User) -> Up {
        let data = root.join("data");
        let mut up = spawn(
            "meshward up",
            user.meshward()
                .args([
                    "up",
                    dir.to_str().unwrap(),
                    "--data-dir",
                    data.to_str().unwrap(),
                ])
                .args(extra),
        );
        let up_json = data.join("up.json");
        // `up` writes up.json whole (renamed into place) once ready.
        let text = wait_for(START, || {
            up.assert_running();
            std::fs::read_to_string(&up_json).map_err(|e| format!("{}: {e}", up_json.display()))
        });
        let mesh = serde_json::from_str(&text).unwrap();
        Up {
            up,
            dir,
            data,
            mesh,
            user,
        }
    }

    fn workload(&self, name: &str) -> &serde_json::Value {
        self.mesh["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    /// Where `from` calls `service` (`host:port`).
    fn call(&self, from: &str, service: &str) -> SocketAddr {
        self.workload(from)["upstreams"][service]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn log(&self, workload: &str) -> Vec<serde_json::Value> {
        let file = self
            .data
            .join("logs")
            .join(format!("{}.jsonl", workload.replace('/', ".")));
        read_lines(&file)
    }

    /// SIGTERM, as Ctrl-C: everything `up` started stops.
    fn stop(mut self) {
        let admins: Vec<SocketAddr> = self.mesh["workloads"]
            .as_array()
            .unwrap()
            .iter()
            // In its namespace, a proxy's admin address is not this one's.
            .filter(|w| w["netns"].is_null())
            .filter_map(|w| w["admin"].as_str().map(|a| a.parse().unwrap()))
            .collect();
        let group = self.mesh["process_group"].as_i64().unwrap();
        let status = self.up.stop();
        assert!(status.success(), "{status:?}{}", self.up.logs.dump());
        // `up` reaped its children before exiting: its group is empty.
        let group = nix::unistd::Pid::from_raw(i32::try_from(group).unwrap());
        assert_eq!(
            nix::sys::signal::killpg(group, None),
            Err(nix::errno::Errno::ESRCH),
            "a process of up's group outlived it"
        );
        for admin in admins {
            assert!(
                http_get(admin, "/healthz/ready").is_none(),
                "a proxy outlived meshward up"
            );
        }
    }
}

/// The records of a JSON-lines log; a line still being written (no newline
/// yet) is left for the next read, any other line must parse.
fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON: {l}: {e}", path.display()))
        })
        .collect()
}

/// GET with headers, over plain HTTP/1.1 (std only): (status, body).
fn get(addr: SocketAddr, path: &str, headers: &[(&str, String)]) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, SETTLE).ok()?;
    s.set_read_timeout(Some(SETTLE)).ok()?;
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: bookinfo\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

fn token(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/bookinfo")
        .join(name);
    format!("Bearer {}", std::fs::read_to_string(path).unwrap().trim())
}

fn status_soon(addr: SocketAddr, path: &str, headers: &[(&str, String)], want: u16) {
    wait_for(SETTLE, || {
        let got = get(addr, path, headers).map(|r| r.0);
        if got == Some(want) {
            Ok(())
        } else {
            Err(format!("GET {path}: wanted {want}, got {got:?}"))
        }
    });
}

#[test]
fn the_zero_trust_walkthrough() {
    let _one = one_mesh();
    let up = Up::start("walkthrough");
    let jwt = [("authorization", token("alice.jwt"))];

    // deny-all, then the calls the app makes: A→B and B→C allowed, A→C not.
    let sleep_to_productpage = up.call("bookinfo/sleep", "productpage.bookinfo:9080");
    assert_eq!(get(sleep_to_productpage, "/", &jwt).unwrap().0, 200);
    let productpage_to_reviews = up.call("bookinfo/productpage", "reviews.bookinfo:9080");
    assert_eq!(
        get(productpage_to_reviews, "/reviews/0", &[]).unwrap().0,
        200
    );
    let reviews_to_ratings = up.call("bookinfo/reviews-v1", "ratings.bookinfo:9080");
    assert_eq!(get(reviews_to_ratings, "/ratings/0", &[]).unwrap().0, 200);
    let sleep_to_reviews = up.call("bookinfo/sleep", "reviews.bookinfo:9080");
    assert_eq!(
        get(sleep_to_reviews, "/reviews/0", &[]).unwrap().0,
        403,
        "A→C"
    );
    assert_eq!(get(productpage_to_reviews, "/", &[]).unwrap().0, 200);
    let admin_to_ratings = up.call("bookinfo/admin", "ratings.bookinfo:9080");
    assert_eq!(
        get(admin_to_ratings, "/anything", &[]).unwrap().0,
        200,
        "admin has full access"
    );

    // A→B→C through the applications themselves.
    let (status, body) = get(
        sleep_to_productpage,
        "/call/reviews.bookinfo:9080/call/ratings.bookinfo:9080/ratings/0",
        &jwt,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let chain: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(chain["call"]["status"], 200, "{chain}");
    assert_eq!(chain["call"]["body"]["call"]["status"], 200, "{chain}");
    assert_eq!(
        chain["call"]["body"]["call"]["body"]["name"], "ratings",
        "{chain}"
    );
    // The ratings workload saw reviews' identity, set by the proxies.
    let xfcc = chain["call"]["body"]["call"]["body"]["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap();
    assert!(
        xfcc.ends_with("URI=spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"),
        "{xfcc}"
    );

    // JWT: valid passes, expired fails, missing fails where the DENY demands it.
    let (status, body) = get(sleep_to_productpage, "/headers", &jwt).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"x-jwt-sub\":\"alice\""), "{body}");
    let expired = [("authorization", token("expired.jwt"))];
    assert_eq!(
        get(sleep_to_productpage, "/", &expired).unwrap(),
        (401, "Jwt is expired".into())
    );
    assert_eq!(get(sleep_to_productpage, "/", &[]).unwrap().0, 403);

    // The deciding policy is in the access log.
    wait_until(SETTLE, "decisions in the access logs", || {
        let reviews_log: Vec<serde_json::Value> = ["bookinfo/reviews-v1", "bookinfo/reviews-v2"]
            .iter()
            .flat_map(|w| up.log(w))
            .collect();
        let allowed = reviews_log
            .iter()
            .any(|r| r["policy"] == "bookinfo/reviews-viewer" && r["decision"] == "allow");
        let denied = reviews_log.iter().any(|r| {
            r["decision"] == "deny"
                && r["source_principal"] == "spiffe://cluster.local/ns/bookinfo/sa/sleep"
        });
        allowed && denied
    });

    // STRICT refuses a workload without a proxy; PERMISSIVE lets it in again
    // (to authorization, which still decides).
    let legacy_to_productpage = up.call("legacy/legacy", "productpage.bookinfo:9080");
    assert!(
        get(legacy_to_productpage, "/", &[]).is_none(),
        "STRICT served plaintext"
    );
    // Refused by peer authentication, which says why.
    let refusal = wait_for(SETTLE, || {
        let log = up.log("bookinfo/productpage");
        log.iter()
            .find(|r| r["stage"] == "peer_authentication")
            .cloned()
            .ok_or_else(|| format!("no peer authentication record in {log:#?}"))
    });
    assert_eq!(refusal["decision"], "deny", "{refusal}");
    assert_eq!(refusal["destination"], "inbound|9080", "{refusal}");
    assert_eq!(refusal["mtls_mode"], "STRICT", "{refusal}");
    assert_eq!(refusal["policy"], "bookinfo/default", "{refusal}");
    assert!(refusal["source_principal"].is_null(), "{refusal}");
    assert_eq!(
        refusal["reason"],
        "plaintext connection refused: port 9080 requires mutual TLS (STRICT from bookinfo/default)",
        "{refusal}"
    );
    let policies = up.dir.join("policies.yaml");
    let text = std::fs::read_to_string(&policies).unwrap();
    std::fs::write(
        &policies,
        text.replace(
            "spec: {mtls: {mode: STRICT}}",
            "spec: {mtls: {mode: PERMISSIVE}}",
        ),
    )
    .unwrap();
    status_soon(legacy_to_productpage, "/", &[], 403);
    // The access log says authorization decided, under PERMISSIVE.
    wait_until(SETTLE, "a PERMISSIVE plaintext record", || {
        up.log("bookinfo/productpage").iter().any(|r| {
            r["stage"] == "authorization"
                && r["mtls_mode"] == "PERMISSIVE"
                && r["source_principal"].is_null()
        })
    });

    // A policy applied while traffic flows takes effect.
    std::fs::write(
        up.dir.join("deny-reviews-0.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-reviews-0, namespace: bookinfo}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [/reviews/0]}}]}]\n",
    )
    .unwrap();
    status_soon(productpage_to_reviews, "/reviews/0", &[], 403);
    assert_eq!(
        get(productpage_to_reviews, "/reviews/1", &[]).unwrap().0,
        200
    );

    // A broken file: the error is printed, the previous policies stay.
    std::fs::write(up.dir.join("broken.yaml"), "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: bookinfo}\nspec: {action: NOPE}\n").unwrap();
    up.up.logs.wait_for_stderr("broken.yaml:4: error", SETTLE);
    assert_eq!(
        get(productpage_to_reviews, "/reviews/0", &[]).unwrap().0,
        403
    );
    assert_eq!(
        get(productpage_to_reviews, "/reviews/1", &[]).unwrap().0,
        200
    );

    up.stop();
}

#[test]
fn the_zero_trust_walkthrough_in_namespaces_by_name() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    namespaced_tour("walkthrough-ns", User::Me);
}

/// The same tour as an ordinary user: `up` makes its lab in a user
/// namespace of its own, and `exec` joins it.
#[test]
fn the_zero_trust_walkthrough_in_namespaces_without_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root, to become another user (setpriv)");
        return;
    }
    namespaced_tour("walkthrough-userns", User::Nobody);
}

fn namespaced_tour(name: &str, user: User) {
    let _one = one_mesh();
    let up = Up::start_namespaced(name, user);
    let jwt = format!("authorization: {}", token("alice.jwt"));
    let productpage = "http://productpage.bookinfo:9080";

    // Each workload has its own address; services are called by name from
    // inside a workload, through its proxy.
    let addresses: Vec<&str> = up.mesh["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["address"].as_str())
        .collect();
    assert_eq!(addresses.len(), 7, "{}", up.mesh);
    // The operator's commands on the machine reach the lab's control plane
    // with nothing but the data directory: it records the relay, on
    // loopback (the machine has no route into the lab).
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(up.data.join("server.json")).unwrap())
            .unwrap();
    assert!(
        record["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{record}"
    );
    let status = output(
        user.meshward()
            .args(["status", "--data-dir", up.data.to_str().unwrap()]),
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        text.contains("bookinfo/reviews-v2") && text.contains("SYNCED"),
        "{text}"
    );
    assert!(
        addresses.iter().all(|a| a.starts_with("198.18.0.")),
        "{addresses:?}"
    );
    assert_eq!(
        up.exec_status("bookinfo/sleep", &format!("{productpage}/"), &[&jwt]),
        200
    );
    assert_eq!(
        up.exec_status(
            "bookinfo/productpage",
            "http://reviews.bookinfo:9080/reviews/0",
            &[]
        ),
        200
    );
    assert_eq!(
        up.exec_status(
            "bookinfo/sleep",
            "http://reviews.bookinfo:9080/reviews/0",
            &[]
        ),
        403,
        "A→C"
    );

    // A→B→C through the applications, by name; ratings sees reviews' identity.
    let (code, body) = up.exec_curl(
        "bookinfo/sleep",
        &[
            "-H",
            &jwt,
            &format!(
                "{productpage}/call/reviews.bookinfo:9080/call/ratings.bookinfo:9080/ratings/0"
            ),
        ],
    );
    assert_eq!(code, 0, "{body}");
    let chain: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ratings = &chain["call"]["body"]["call"]["body"];
    assert_eq!(ratings["name"], "ratings", "{chain}");
    assert!(
        ratings["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap()
            .ends_with("URI=spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"),
        "{chain}"
    );

    // reviews-v1 and reviews-v2 both answer reviews.bookinfo.
    let urls: Vec<String> = (0..40)
        .map(|i| format!("http://reviews.bookinfo:9080/reviews/{i}"))
        .collect();
    let mut args: Vec<&str> = vec!["-w", "\n"];
    args.extend(urls.iter().map(String::as_str));
    let (code, out) = up.exec_curl("bookinfo/productpage", &args);
    assert_eq!(code, 0, "{out}");
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    for version in ["reviews-v1", "reviews-v2"] {
        assert!(
            names.iter().any(|n| n == version),
            "{version} never answered: {names:?}"
        );
    }

    // JWT.
    let expired = format!("authorization: {}", token("expired.jwt"));
    assert_eq!(
        up.exec_status("bookinfo/sleep", &format!("{productpage}/"), &[&expired]),
        401
    );
    assert_eq!(
        up.exec_status("bookinfo/sleep", &format!("{productpage}/"), &[]),
        403
    );

    // STRICT refuses legacy (no proxy) calling productpage by name; under
    // PERMISSIVE it reaches authorization, and productpage-require-jwt
    // denies it (it has no token).
    assert_eq!(
        up.exec_status("legacy/legacy", &format!("{productpage}/"), &[]),
        0
    );
    let policies = up.dir.join("policies.yaml");
    let text = std::fs::read_to_string(&policies).unwrap();
    std::fs::write(
        &policies,
        text.replace(
            "spec: {mtls: {mode: STRICT}}",
            "spec: {mtls: {mode: PERMISSIVE}}",
        ),
    )
    .unwrap();
    wait_until(SETTLE, "PERMISSIVE lets legacy reach authorization", || {
        up.exec_status("legacy/legacy", &format!("{productpage}/"), &[]) == 403
    });
    wait_until(SETTLE, "productpage-require-jwt denied legacy", || {
        up.log("bookinfo/productpage").iter().any(|r| {
            r["decision"] == "deny"
                && r["policy"] == "bookinfo/productpage-require-jwt"
                && r["source_principal"].is_null()
        })
    });

    // A policy on one version: reviews-v2 denies, reviews-v1 still answers.
    std::fs::write(
        up.dir.join("deny-v2.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-v2, namespace: bookinfo}\nspec:\n  selector: {matchLabels: {app: reviews, version: v2}}\n  action: DENY\n  rules: [{}]\n",
    )
    .unwrap();
    wait_until(SETTLE, "v2 denies while v1 answers", || {
        let (_, out) = up.exec_curl(
            "bookinfo/productpage",
            &[
                "-w",
                "\n%{http_code}\n",
                "http://reviews.bookinfo:9080/a",
                "http://reviews.bookinfo:9080/b",
                "http://reviews.bookinfo:9080/c",
                "http://reviews.bookinfo:9080/d",
            ],
        );
        out.contains("\"name\":\"reviews-v1\"") && out.lines().any(|l| l == "403")
    });
    // Records are written in batches: wait for the denial's.
    wait_until(SETTLE, "reviews-v2 logs its denial", || {
        up.log("bookinfo/reviews-v2")
            .iter()
            .any(|r| r["decision"] == "deny" && r["policy"] == "bookinfo/deny-v2")
    });
    assert!(
        !up.log("bookinfo/reviews-v1")
            .iter()
            .any(|r| r["policy"] == "bookinfo/deny-v2")
    );

    let namespaces: Vec<String> = up.mesh["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["netns"].as_str().map(str::to_owned))
        .collect();
    let user_namespace = up.mesh["user_namespace"]["pid"]
        .as_i64()
        .map(|pid| namespace_of(pid, "user").unwrap());
    up.stop();
    // Its namespaces go with it.
    match user_namespace {
        None => {
            let listed = netns_list();
            for ns in namespaces {
                assert!(!listed.contains(&ns), "{ns} outlived meshward up: {listed}");
            }
        }
        // Its lab lived in its user namespace, never in the machine's
        // list; nothing is left in that namespace, so it is gone too.
        Some(userns) => assert_user_namespace_empty(&userns),
    }
}

/// `ip netns list`.
fn netns_list() -> String {
    String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

/// The namespace of kind `kind` (`user`, `net`) process `pid` is in, as
/// `/proc/PID/ns/KIND` names it (`user:[4026532…]`).
fn namespace_of(pid: i64, kind: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|p| p.display().to_string())
}

/// Waits until no process is in user namespace `userns`.
fn assert_user_namespace_empty(userns: &str) {
    let inside = || -> Vec<i64> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i64>().ok())
            .filter(|pid| namespace_of(*pid, "user").as_deref() == Some(userns))
            .collect()
    };
    wait_for(SETTLE, || {
        let left = inside();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("processes left in up's user namespace: {left:?}"))
        }
    });
}

/// `meshward up` killed with SIGKILL takes every process it started with
/// it; as root, its namespaces stay listed until the next `up` removes
/// them; as an ordinary user, they vanish with its user namespace.
#[test]
fn a_killed_namespaced_up_leaves_nothing_behind() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let _one = one_mesh();
    let kill = |up: &mut Up| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(up.up.pid()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // Reaped: a zombie would still count as in its user namespace.
        up.up.wait_exit(SETTLE);
    };
    let gone = |up: &Up| {
        let group = nix::unistd::Pid::from_raw(
            i32::try_from(up.mesh["process_group"].as_i64().unwrap()).unwrap(),
        );
        wait_until(SETTLE, "every process up started is gone", || {
            nix::sys::signal::killpg(group, None) == Err(nix::errno::Errno::ESRCH)
        });
    };

    let mut up = Up::start_namespaced("killed-userns", User::Nobody);
    let userns = namespace_of(up.up.pid().into(), "user").unwrap();
    kill(&mut up);
    gone(&up);
    assert_user_namespace_empty(&userns);

    let mut up = Up::start_namespaced("killed-root", User::Me);
    let namespaces: Vec<String> = up.mesh["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["netns"].as_str().map(str::to_owned))
        .collect();
    kill(&mut up);
    gone(&up);
    let listed = netns_list();
    assert!(
        namespaces.iter().all(|ns| listed.contains(ns.as_str())),
        "a SIGKILLed up cannot remove its namespaces: {listed}"
    );
    let next = Up::start_namespaced("killed-root-next", User::Me);
    let listed = netns_list();
    for ns in &namespaces {
        assert!(
            !listed.contains(ns.as_str()),
            "{ns} outlived the next up: {listed}"
        );
    }
    next.stop();
}

#[test]
fn a_workload_that_fails_to_start_is_reported() {
    let _one = one_mesh();
    let root = tempdir("up-failing");
    let dir = root.join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: demo}
spec: {serviceAccount: web, labels: {app: web}, ports: {http: 80}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: broken
  namespace: demo
  annotations: {meshward.io/command: "exit 3"}
spec: {serviceAccount: broken, labels: {app: broken}, ports: {http: 80}}
"#,
    )
    .unwrap();
    let up = Up::launch(&root, dir, &["--ready-timeout", "5s"], User::Me);
    // Written before up.json, so already there (or on its way through the pipe).
    up.up
        .logs
        .wait_for_stderr("demo/broken (application) exited", SETTLE);
    up.up
        .logs
        .wait_for_stderr("not ready after 5s: demo/broken", SETTLE);
    up.stop();
}

/// Where namespaces cannot be made (here: no `ip` on the PATH), `up` says
/// why and runs the mesh in explicit mode.
#[test]
fn where_namespaces_cannot_be_made_up_says_why_and_runs_explicit() {
    let _one = one_mesh();
    let root = tempdir("up-no-ip");
    let (dir, data, empty) = (root.join("mesh"), root.join("data"), root.join("bin"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: demo}\nspec: {serviceAccount: web, labels: {app: web}, ports: {http: 80}}\n",
    )
    .unwrap();
    let mut up = spawn(
        "meshward up",
        meshward()
            .args([
                "up",
                dir.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
            ])
            .env("PATH", &empty),
    );
    up.logs.wait_for_stderr(
        "namespaced mode needs `ip`: apt-get install iproute2; running in explicit mode",
        SETTLE,
    );
    let up_json = data.join("up.json");
    let text = wait_for(START, || {
        up.assert_running();
        std::fs::read_to_string(&up_json).map_err(|e| format!("{}: {e}", up_json.display()))
    });
    let mesh: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(mesh["mode"], "explicit", "{mesh}");
    assert!(up.stop().success());
}
