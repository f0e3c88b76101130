//! Several servers on one etcd: a three-member etcd cluster on loopback
//! ports, two meshward servers sharing it (and one CA), real proxies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;

/// One etcd member, restartable with its data.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    process: Option<Spawned>,
}

struct Etcd {
    members: Vec<Member>,
    cluster: String,
}

/// The members' data (64 MB of preallocated log each) goes with them.
impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            drop(m.process.take());
            let _ = std::fs::remove_dir_all(&m.data);
        }
    }
}

impl Etcd {
    /// Three members, started; returns once the cluster answers healthy.
    fn start(dir: &Path) -> Etcd {
        let members: Vec<Member> = (1..=3)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
                peer: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
                data: dir.join(format!("etcd-m{i}")),
                process: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd { members, cluster };
        for i in 0..3 {
            etcd.start_member(i);
        }
        etcd.wait_healthy();
        etcd
    }

    fn start_member(&mut self, i: usize) {
        let cluster = self.cluster.clone();
        let m = &mut self.members[i];
        let mut command = std::process::Command::new("etcd");
        command
            .args(["--name", &m.name, "--data-dir", m.data.to_str().unwrap()])
            .args(["--listen-client-urls", &format!("http://{}", m.client)])
            .args(["--advertise-client-urls", &format!("http://{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
            ])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-token", "meshward-test"])
            .args(["--initial-cluster-state", "new"])
            // Short elections: a lost member is noticed in well under a
            // second on loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--max-txn-ops", "1024", "--log-level", "warn"]);
        m.process = Some(spawn(&format!("etcd {}", m.name), &mut command));
    }

    fn kill_member(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut p) = m.process.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(p.pid()).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            p.wait_exit(SETTLE);
        }
    }

    /// Every running member says the cluster is healthy (has a leader).
    fn wait_healthy(&self) {
        wait_for(START, || {
            for m in self.members.iter().filter(|m| m.process.is_some()) {
                match http_get(m.client, "/health") {
                    Some((200, body)) if body.contains("\"health\":\"true\"") => {}
                    other => return Err(format!("etcd {}: {other:?}", m.name)),
                }
            }
            Ok(())
        });
    }

    fn store(&self) -> String {
        let list: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}", list.join(","))
    }
}

/// Server A (which makes the CA and shares it, sealed) and server B (an
/// empty data directory: it takes the CA from etcd), both on `etcd`, both
/// given the same sealing key.
fn two_servers(dir: &Path, etcd: &Etcd) -> (Mesh, Mesh) {
    let key = sealing_key(dir, 1);
    let shared = [
        "--store",
        &etcd.store(),
        "--ca-key-encryption-key-file",
        key.to_str().unwrap(),
        "--debounce",
        "50ms",
        "--debounce-max",
        "200ms",
    ];
    let a = server_with(&dir.join("a"), &shared);
    let b = server_with(&dir.join("b"), &shared);
    (a, b)
}

/// A 32-byte sealing key file (hex), `seed` its every byte.
fn sealing_key(dir: &Path, seed: u8) -> PathBuf {
    let path = dir.join(format!("sealing-{seed}.key"));
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&path, format!("{seed:02x}").repeat(32)).unwrap();
    path
}

/// `meshward server` that is expected to refuse to start: its output.
fn refused_server(dir: &Path, extra: &[&str]) -> String {
    let out = output(
        meshward()
            .args(["server", "--data-dir", dir.join("data").to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0"])
            .args(extra),
    );
    assert!(!out.status.success(), "the server started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every value etcd holds, as `(key, value)`, through its JSON gateway.
fn etcd_values(etcd: &Etcd) -> Vec<(String, Vec<u8>)> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let member = etcd.members[0].client;
    let out = output(std::process::Command::new("curl").args([
        "-sS",
        "-m",
        "10",
        "-X",
        "POST",
        &format!("http://{member}/v3/kv/range"),
        "-d",
        // Every key: from "\0" to the end.
        r#"{"key":"AA==","range_end":"AA=="}"#,
    ]));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    body["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let key = b64.decode(kv["key"].as_str().unwrap()).unwrap();
            let value = b64
                .decode(kv["value"].as_str().unwrap_or_default())
                .unwrap();
            (String::from_utf8_lossy(&key).into_owned(), value)
        })
        .collect()
}

fn apply(mesh: &Mesh, name: &str, yaml: &str) -> std::process::Output {
    let file = mesh.dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    mesh.admin(&["apply", "-f", file.to_str().unwrap()])
}

fn policy(name: &str, path: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: web}}\nspec:\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [\"{path}\"]}}}}]}}]\n"
    )
}

const REGISTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: web}
spec: {address: 127.0.0.1, ports: {http: WEB_PORT}, labels: {app: web}, serviceAccount: web}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: sleep, namespace: sleep}
spec: {address: 127.0.0.1, labels: {app: sleep}, serviceAccount: sleep}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: web}
spec:
  hosts: [web.web]
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: web}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

fn skip() -> bool {
    let missing = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_err();
    if missing {
        eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
    }
    missing
}

#[test]
fn servers_on_one_etcd_serve_one_mesh() {
    if skip() {
        return;
    }
    let dir = tempdir("etcd");
    let mut etcd = Etcd::start(&dir);
    let (a, b) = two_servers(&dir, &etcd);

    // One CA: B took A's, sealed in etcd, which never holds a private key
    // in the clear.
    let read = |mesh: &Mesh, file: &str| std::fs::read(mesh.data.join(file)).unwrap();
    assert_eq!(read(&a, "ca/ca-key.pem"), read(&b, "ca/ca-key.pem"));
    assert_eq!(read(&a, "token-key.pem"), read(&b, "token-key.pem"));
    let values = etcd_values(&etcd);
    assert!(
        values.iter().any(|(k, _)| k == "/meshward/shared/ca"),
        "{:?}",
        values.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    for (key, value) in &values {
        assert!(
            !value.windows(11).any(|w| w == b"PRIVATE KEY"),
            "{key} holds a private key in the clear"
        );
    }
    // A server with another key cannot open it; one with a CA of its own
    // and no key refuses to split the mesh.
    let said = refused_server(
        &dir.join("c"),
        &[
            "--store",
            &etcd.store(),
            "--ca-key-encryption-key-file",
            sealing_key(&dir, 2).to_str().unwrap(),
        ],
    );
    assert!(said.contains("does not open with this key"), "{said}");
    let said = refused_server(&dir.join("d"), &["--store", &etcd.store()]);
    assert!(said.contains("is not the one the other servers"), "{said}");

    let web_in = free_port();
    let sleep_out: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let out = apply(
        &a,
        "registry.yaml",
        &REGISTRY.replace("WEB_PORT", &web_in.to_string()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // web's proxy on B (its certificate from B), sleep's on A (from A): a
    // certificate of one server verifies at the proxy of the other.
    let app = app("web");
    let (_web, _) = b.proxy(
        "web",
        "web",
        &["--inbound".into(), format!("{web_in}={app},protocol=http")],
    );
    let (_sleep, sleep_admin) = a.proxy(
        "sleep",
        "sleep",
        &[
            "--upstream".into(),
            format!("web.web:80={sleep_out},protocol=http"),
            // Both servers: A first.
            "--control-plane".into(),
            format!("{},{}", a.ca_addr, b.ca_addr),
            "--ca-address".into(),
            format!("https://{},https://{}", a.ca_addr, b.ca_addr),
        ],
    );
    eventually_status(sleep_out, "/x", 200, SETTLE);
    // Either server's status lists every proxy, with its server.
    let listed_with = |server: &Mesh, proxy: &str, on: &Mesh| {
        let status = String::from_utf8(server.admin(&["status"]).stdout).unwrap();
        status
            .lines()
            .any(|l| l.contains(proxy) && l.contains(&on.ca_addr) && l.contains("SYNCED"))
    };
    for server in [&a, &b] {
        wait_until(SETTLE, "status lists both servers' proxies", || {
            listed_with(server, "/ns/web/sa/web ", &b)
                && listed_with(server, "/ns/sleep/sa/sleep ", &a)
        });
    }

    // Applied through A, enforced by the proxy on B.
    let out = apply(&a, "deny-x.yaml", &policy("deny-x", "/x"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually_status(sleep_out, "/x", 403, SETTLE);
    // And B lists it, as its own store's.
    let got = b.admin(&["get", "ap", "deny-x", "-n", "web"]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );

    // Applies through both servers at once: none is lost, and each is a
    // version of its own (one commit over the other, never side by side).
    let version = |mesh: &Mesh| -> u64 {
        let status = String::from_utf8(mesh.admin(&["status"]).stdout).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("config version "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no version in {status}"))
    };
    let before = version(&a);
    std::thread::scope(|scope| {
        for (server, side) in [(&a, "a"), (&b, "b")] {
            scope.spawn(move || {
                for i in 0..8 {
                    let name = format!("{side}-{i}");
                    let out = apply(
                        server,
                        &format!("{name}.yaml"),
                        &policy(&name, &format!("/{name}")),
                    );
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
    });
    wait_until(
        SETTLE,
        "both servers at the version of 16 more commits",
        || version(&a) == before + 16 && version(&b) == before + 16,
    );
    let listed = String::from_utf8(a.admin(&["get", "ap", "-n", "web"]).stdout).unwrap();
    for side in ["a", "b"] {
        for i in 0..8 {
            assert!(
                listed.contains(&format!("{side}-{i}")),
                "{side}-{i} was lost: {listed}"
            );
        }
    }

    // One member gone: writes and pushes go on.
    etcd.kill_member(2);
    let out = apply(&b, "deny-y.yaml", &policy("deny-y", "/y"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually_status(sleep_out, "/y", 403, SETTLE);

    // Quorum lost: the proxies keep the last configuration and the CA still
    // issues (tokens are checked without the store); an apply is refused,
    // saying why.
    etcd.kill_member(1);
    let out = apply(&a, "deny-z.yaml", &policy("deny-z", "/z"));
    assert!(!out.status.success(), "an apply without quorum succeeded");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("etcd"), "{said}");
    assert_eq!(http_get(sleep_out, "/y").unwrap().0, 403);
    assert_eq!(http_get(sleep_out, "/z").unwrap().0, 200);
    let (_issued, _) = b.proxy(
        "sleep",
        "other",
        &[
            "--upstream".into(),
            format!("web.web:80=127.0.0.1:{},protocol=http", free_port()),
        ],
    );

    // Quorum back: the apply goes through.
    etcd.start_member(1);
    etcd.start_member(2);
    etcd.wait_healthy();
    wait_until(SETTLE, "an apply succeeds once etcd has its quorum", || {
        apply(&a, "deny-z.yaml", &policy("deny-z", "/z"))
            .status
            .success()
    });
    eventually_status(sleep_out, "/z", 403, SETTLE);

    // A, sleep's server, killed: sleep's proxy resyncs from B, which then
    // pushes to it, and requests through it succeed throughout.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut a = a;
    let failed = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut failed = Vec::new();
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 100_000 {
                match http_get(sleep_out, "/ok") {
                    Some((200, _)) => {}
                    other => failed.push(other),
                }
                sent += 1;
            }
            failed
        });
        a.server.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = a.server.halt();
        let out = apply(&b, "deny-w.yaml", &policy("deny-w", "/w"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eventually_status(sleep_out, "/w", 403, SETTLE);
        // B serves it now, and A's record is gone with A's lease.
        wait_until(SETTLE, "B lists sleep's proxy as its own, synced", || {
            listed_with(&b, "/ns/sleep/sa/sleep ", &b)
        });
        wait_until(SETTLE, "no server lists the dead server's proxies", || {
            let status = String::from_utf8(b.admin(&["status"]).stdout).unwrap();
            !status.contains(&a.ca_addr)
        });
        let dump = http_get(sleep_admin, "/config_dump").unwrap().1;
        assert!(dump.contains("control plane, version"), "{dump}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        traffic.join().unwrap()
    });
    assert!(
        failed.is_empty(),
        "requests failed during the failover: {failed:?}"
    );
}
