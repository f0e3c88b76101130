//! From observed traffic to least-privilege policy, with the built binary:
//! `meshward suggest` and `meshward replay` on logs, and on a running
//! `meshward up` mesh whose traffic they learn from.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo")
}

fn meshward_out(args: &[&str]) -> Output {
    output(meshward().args(args))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One inbound record, as a proxy writes it (version 1).
fn record(app: &str, caller: Option<&str>, method: &str, path: &str, decision: &str) -> String {
    let mut r = serde_json::json!({
        "time": "2025-01-01T10:00:00.000Z", "type": "access", "direction": "inbound",
        "protocol": "HTTP/1.1", "source_address": "127.0.0.1:50000",
        "destination": "inbound|9080", "method": method, "path": path,
        "authority": format!("{app}.shop:9080"), "status": 200, "decision": decision,
        "stage": "authorization", "config_version": 1, "duration_ms": 1.0,
        "bytes_received": 0, "bytes_sent": 0, "v": 1,
        "workload": {"namespace": "shop", "name": format!("{app}-v1"), "labels": {"app": app, "version": "v1"}},
        "destination_ip": "127.0.0.1", "destination_port": 9080
    });
    if let Some(caller) = caller {
        r["source_principal"] = caller.into();
    }
    r.to_string()
}

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

fn shop_log(dir: &Path) -> PathBuf {
    let lines = [
        record("cart", Some(FRONTEND), "GET", "/cart/17", "allow"),
        record("cart", Some(FRONTEND), "GET", "/cart/18", "allow"),
        record("cart", Some(FRONTEND), "POST", "/cart/17/items", "allow"),
        record("orders", Some(FRONTEND), "GET", "/orders", "allow"),
        "{\"truncated".to_owned(),
    ];
    let log = dir.join("shop.jsonl");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    log
}

#[test]
fn suggest_validate_and_replay_from_the_command_line() {
    let dir = tempdir("learn-cli");
    let log = shop_log(&dir);
    let log = log.to_str().unwrap();

    let out = meshward_out(&["suggest", "--log", log]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(yaml.contains("name: cart-observed"), "{yaml}");
    assert!(
        yaml.contains(r#"- "/cart/{*}"  # 2 requests, 2 paths"#),
        "{yaml}"
    );
    assert!(yaml.contains(r#"methods: ["POST"]"#), "{yaml}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("shop.jsonl:5: not a decision record"),
        "{stderr}"
    );
    let suggested = dir.join("suggested.yaml");
    std::fs::write(&suggested, &yaml).unwrap();
    let suggested = suggested.to_str().unwrap();

    // What suggest writes passes validate --strict: no error, no warning.
    let out = meshward_out(&["validate", "--strict", "-f", suggested]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let out = meshward_out(&["replay", "-f", suggested, "--log", log]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("replayed 4 request(s): 0 allowed → denied, 0 denied → allowed, 0 undecidable, 4 unchanged"),
        "{}",
        text(&out.stdout)
    );

    // allow-nothing alone breaks every call, and says which.
    let nothing = dir.join("nothing.yaml");
    std::fs::write(
        &nothing,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: shop}\nspec: {}\n",
    )
    .unwrap();
    let nothing = nothing.to_str().unwrap();
    let out = meshward_out(&["replay", "-f", nothing, "--log", log]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("allowed → denied: 4 request(s)"),
        "{report}"
    );
    assert!(
        report.contains("  shop/cart-v1: 3 request(s), decided by no ALLOW rule matched\n"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "    1× {FRONTEND} POST cart.shop:9080/cart/17/items (port 9080)"
        )),
        "{report}"
    );
    let out = meshward_out(&["replay", "-f", nothing, "--log", log, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["allowed_to_denied"], 4, "{json}");
    assert_eq!(json["groups"][0]["change"], "allowed_to_denied", "{json}");

    // No window to read: the error says where it looked and why.
    let out = meshward_out(&["suggest", "--data-dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("decisions: no decisions reported there"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `meshward up` picks free ports by binding and releasing them; two
/// meshes starting at once could pick the same. One at a time.
static ONE_MESH: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Up {
    up: Spawned,
    dir: PathBuf,
    data: PathBuf,
    mesh: serde_json::Value,
}

impl Up {
    /// `meshward up --explicit` on bookinfo's workloads with `policies`.
    fn start(name: &str, policies: &str, extra: &[&str]) -> Up {
        let root = tempdir(name);
        let dir = root.join("bookinfo");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(example().join("workloads.yaml"), dir.join("workloads.yaml")).unwrap();
        std::fs::write(dir.join("policies.yaml"), policies).unwrap();
        Up::launch(dir, &root.join("data"), extra)
    }

    /// `meshward up --explicit DIR --data-dir DATA EXTRA..`, once ready.
    fn launch(dir: PathBuf, data: &Path, extra: &[&str]) -> Up {
        let data = data.to_path_buf();
        let up_json = data.join("up.json");
        // A mesh started here before left its own.
        let _ = std::fs::remove_file(&up_json);
        let mut up = spawn(
            "meshward up",
            meshward()
                .args(["up", dir.to_str().unwrap(), "--data-dir"])
                .arg(&data)
                .arg("--explicit")
                .args(extra),
        );
        let text = wait_for(START, || {
            up.assert_running();
            std::fs::read_to_string(&up_json).map_err(|e| format!("{}: {e}", up_json.display()))
        });
        Up {
            up,
            dir,
            data,
            mesh: serde_json::from_str(&text).unwrap(),
        }
    }

    /// Where `from` calls `service` (`host:port`).
    fn call(&self, from: &str, service: &str) -> SocketAddr {
        let workload = self.mesh["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == from)
            .unwrap_or_else(|| panic!("no workload {from}"));
        workload["upstreams"][service]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Inbound records in the access logs so far.
    fn inbound_records(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(self.data.join("logs")) else {
            return 0;
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.ends_with(".jsonl") && !name.ends_with(".audit.jsonl")
            })
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|t| {
                t.lines()
                    .filter(|l| l.contains("\"direction\":\"inbound\""))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .count()
    }

    fn stop(mut self) {
        let status = self.up.stop();
        assert!(status.success(), "{status:?}{}", self.up.logs.dump());
    }
}

/// One request over plain HTTP/1.1: its status (`None`: no answer).
fn request(addr: SocketAddr, method: &str, path: &str) -> Option<u16> {
    request_with(addr, method, path, "")
}

/// [`request`] with `headers` (`name: value\r\n` each).
fn request_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, SETTLE).ok()?;
    s.set_read_timeout(Some(SETTLE)).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: bookinfo\r\n{headers}content-length: 0\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

const ALLOW_ALL: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: bookinfo}
spec: {rules: [{}]}
";

/// The issue's acceptance test: bookinfo under allow-all, a fixed set of
/// calls, `suggest`, the suggestion checked by `validate --strict` and
/// `replay`, then applied: every observed call still passes, and what was
/// never observed (sleep → reviews, a POST where only GET was seen) is
/// denied.
#[test]
fn bookinfo_learns_least_privilege_from_its_traffic() {
    let _one = ONE_MESH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let up = Up::start("learn-bookinfo", ALLOW_ALL, &[]);
    let calls: Vec<(&str, &str, &str, &str)> = vec![
        (
            "bookinfo/sleep",
            "productpage.bookinfo:9080",
            "GET",
            "/productpage",
        ),
        (
            "bookinfo/productpage",
            "reviews.bookinfo:9080",
            "GET",
            "/reviews/0",
        ),
        (
            "bookinfo/productpage",
            "reviews.bookinfo:9080",
            "GET",
            "/reviews/1",
        ),
        (
            "bookinfo/productpage",
            "reviews.bookinfo:9080",
            "GET",
            "/reviews/2",
        ),
        (
            "bookinfo/productpage",
            "ratings.bookinfo:9080",
            "GET",
            "/ratings/0",
        ),
        (
            "bookinfo/reviews-v1",
            "ratings.bookinfo:9080",
            "GET",
            "/ratings/0",
        ),
        (
            "bookinfo/reviews-v2",
            "ratings.bookinfo:9080",
            "GET",
            "/ratings/1",
        ),
        (
            "bookinfo/admin",
            "ratings.bookinfo:9080",
            "POST",
            "/ratings/0",
        ),
    ];
    // Twice: reviews has two workloads, and either may get each call.
    for _ in 0..2 {
        for (from, service, method, path) in &calls {
            let status = request(up.call(from, service), method, path);
            assert_eq!(status, Some(200), "{from} → {method} {service}{path}");
        }
    }
    let expected = 2 * calls.len();
    wait_until(SETTLE, "every call in the access logs", || {
        up.inbound_records() >= expected
    });

    let logs = up.data.join("logs");
    let logs = logs.to_str().unwrap();
    let out = meshward_out(&["suggest", "--log", logs, "-n", "bookinfo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(
        yaml.contains(r#"principals: ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]"#),
        "{yaml}"
    );
    assert!(yaml.contains("name: reviews-observed"), "{yaml}");
    assert!(yaml.contains(r#"- "/reviews/{*}""#), "{yaml}");
    let suggested = up.dir.parent().unwrap().join("suggested.yaml");
    std::fs::write(&suggested, &yaml).unwrap();
    let suggested = suggested.to_str().unwrap();
    let out = meshward_out(&["validate", "--strict", "-f", suggested]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // Nothing observed would break; the same policies change nothing;
    // allow-nothing alone would break every call.
    let out = meshward_out(&["replay", "-f", suggested, "--log", logs]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report = text(&out.stdout);
    assert!(report.contains(" 0 allowed → denied, "), "{report}");
    let in_force = up.dir.join("policies.yaml");
    let out = meshward_out(&["replay", "-f", in_force.to_str().unwrap(), "--log", logs]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!(
            "replayed {expected} request(s): 0 allowed → denied, 0 denied → allowed, 0 undecidable, {expected} unchanged"
        )),
        "{}",
        text(&out.stdout)
    );
    let nothing = up.dir.parent().unwrap().join("allow-nothing.yaml");
    std::fs::write(
        &nothing,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: bookinfo}\nspec: {}\n",
    )
    .unwrap();
    let out = meshward_out(&["replay", "-f", nothing.to_str().unwrap(), "--log", logs]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains(&format!("allowed → denied: {expected} request(s)")),
        "{report}"
    );
    assert!(
        report.contains("spiffe://cluster.local/ns/bookinfo/sa/sleep GET bookinfo/productpage"),
        "{report}"
    );

    // Applied: the unobserved call is denied once the suggestion is in
    // force, and every observed call still passes.
    std::fs::write(&in_force, &yaml).unwrap();
    let sleep_to_reviews = up.call("bookinfo/sleep", "reviews.bookinfo:9080");
    wait_until(SETTLE, "sleep → reviews denied", || {
        request(sleep_to_reviews, "GET", "/reviews/0") == Some(403)
    });
    for (from, service, method, path) in &calls {
        for _ in 0..2 {
            let status = request(up.call(from, service), method, path);
            assert_eq!(status, Some(200), "{from} → {method} {service}{path}");
        }
    }
    let productpage_to_reviews = up.call("bookinfo/productpage", "reviews.bookinfo:9080");
    assert_eq!(
        request(productpage_to_reviews, "POST", "/reviews/0"),
        Some(403),
        "a POST where only GET was seen"
    );
    let reviews_to_ratings = up.call("bookinfo/reviews-v1", "ratings.bookinfo:9080");
    assert_eq!(
        request(reviews_to_ratings, "GET", "/admin"),
        Some(403),
        "a path never seen"
    );
    // An Authorization value whose 7th byte falls inside a multi-byte
    // character is logged like any other (the proxy used to panic on it
    // and drop the connection).
    assert_eq!(
        request_with(
            productpage_to_reviews,
            "GET",
            "/reviews/0",
            "authorization: Bearer\u{e9}x\r\n"
        ),
        Some(200),
        "a multi-byte Authorization value"
    );
    let root = up.dir.parent().unwrap().to_owned();
    up.stop();
    std::fs::remove_dir_all(root).ok();
}

/// Records in the server's window so far.
fn window_records(data: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(data.join("decisions")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The tour's loop on the walkthrough's hand-written policies: `up --learn`
/// enforces none of them while the app's normal traffic flows, and the
/// proxies report it to the server; `suggest --data-dir` and `replay
/// --data-dir` read the server's window; replay shows what the
/// hand-written policies would have broken (productpage → ratings, which
/// they forgot) and that with the suggestion nothing breaks; applied (up
/// again, enforcing), the observed calls pass and sleep → reviews, never
/// observed, is denied.
#[test]
fn up_learns_in_dry_run_and_suggest_reads_the_servers_window() {
    let _one = ONE_MESH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let policies = std::fs::read_to_string(example().join("policies.yaml")).unwrap();
    let up = Up::start("learn-live", &policies, &["--learn"]);
    let jwt = format!(
        "authorization: Bearer {}\r\n",
        std::fs::read_to_string(example().join("alice.jwt"))
            .unwrap()
            .trim()
    );
    let traffic: Vec<(&str, &str, &str, &str)> = vec![
        (
            "bookinfo/sleep",
            "productpage.bookinfo:9080",
            "/productpage",
            jwt.as_str(),
        ),
        (
            "bookinfo/productpage",
            "reviews.bookinfo:9080",
            "/reviews/0",
            "",
        ),
        (
            "bookinfo/productpage",
            "reviews.bookinfo:9080",
            "/reviews/1",
            "",
        ),
        (
            "bookinfo/reviews-v1",
            "ratings.bookinfo:9080",
            "/ratings/0",
            "",
        ),
        (
            "bookinfo/reviews-v2",
            "ratings.bookinfo:9080",
            "/ratings/0",
            "",
        ),
        // Forgotten by the hand-written policies: only dry-run lets it by.
        (
            "bookinfo/productpage",
            "ratings.bookinfo:9080",
            "/ratings/0",
            "",
        ),
    ];
    for _ in 0..2 {
        for (from, service, path, headers) in &traffic {
            let status = request_with(up.call(from, service), "GET", path, headers);
            assert_eq!(status, Some(200), "{from} → {service}{path} while learning");
        }
    }
    let expected = 2 * traffic.len();
    wait_until(SETTLE, "every decision in the server's window", || {
        window_records(&up.data).len() >= expected
    });
    let window = window_records(&up.data);
    let record = &window[0];
    assert_eq!(record["v"], 1, "{record}");
    assert!(
        record["reporter"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://cluster.local/ns/bookinfo/"),
        "{record}"
    );
    assert_eq!(record["workload"]["namespace"], "bookinfo", "{record}");

    let data = up.data.to_str().unwrap().to_owned();
    let dir = up.dir.to_str().unwrap().to_owned();
    let out = meshward_out(&[
        "suggest",
        "--data-dir",
        &data,
        "-n",
        "bookinfo",
        "--policies",
        &dir,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(
        !yaml.contains("name: allow-nothing"),
        "DIR has one already: {yaml}"
    );
    assert!(
        text(&out.stderr).contains(", 0 allow-nothing"),
        "{}",
        text(&out.stderr)
    );
    let suggested = up.dir.parent().unwrap().join("suggested.yaml");
    std::fs::write(&suggested, &yaml).unwrap();
    let suggested = suggested.to_str().unwrap().to_owned();
    let out = meshward_out(&["validate", "--strict", "-f", &suggested]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The hand-written policies would break productpage → ratings.
    let out = meshward_out(&["replay", "-f", &dir, "--data-dir", &data]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report = text(&out.stdout);
    assert!(
        report.contains("allowed → denied: 2 request(s)"),
        "{report}"
    );
    assert!(
        report.contains("  bookinfo/ratings: 2 request(s), decided by no ALLOW rule matched\n"),
        "{report}"
    );
    assert!(
        report.contains("2× spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage GET bookinfo/ratings/0 (port 9080)"),
        "{report}"
    );
    // With the suggestion beside them, nothing breaks.
    let out = meshward_out(&["replay", "-f", &dir, "-f", &suggested, "--data-dir", &data]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(" 0 allowed → denied, "),
        "{}",
        text(&out.stdout)
    );

    // Applied: up again without --learn, the suggestion beside the
    // hand-written policies.
    let (dir, data) = (up.dir.clone(), up.data.clone());
    up.stop();
    std::fs::copy(&suggested, dir.join("suggested.yaml")).unwrap();
    let up = Up::launch(dir, &data, &[]);
    let sleep_to_reviews = up.call("bookinfo/sleep", "reviews.bookinfo:9080");
    assert_eq!(
        request(sleep_to_reviews, "GET", "/reviews/0"),
        Some(403),
        "never observed"
    );
    for (from, service, path, headers) in &traffic {
        let status = request_with(up.call(from, service), "GET", path, headers);
        assert_eq!(status, Some(200), "{from} → {service}{path} enforced");
    }
    let root = up.dir.parent().unwrap().to_owned();
    up.stop();
    std::fs::remove_dir_all(root).ok();
}

/// A workload reporting decisions to a running `meshward server` speaks
/// for its own workload only: records claiming another workload are
/// refused, the rest are filed under the workload the registry says its
/// certificate is, whatever they say, and a client without a workload
/// certificate cannot report at all.
#[test]
fn a_proxy_cannot_report_decisions_for_another_workload() {
    use meshward_api::control::DecisionBatch;
    use meshward_api::control::decisions_client::DecisionsClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    let dir = tempdir("attack-decisions");
    let mesh = server(&dir);
    let entries = dir.join("entries.yaml");
    std::fs::write(
        &entries,
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: web}\nspec: {serviceAccount: web, labels: {app: web}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vault, namespace: bank}\nspec: {serviceAccount: vault, labels: {app: vault}}\n",
    )
    .unwrap();
    let applied = mesh.admin(&["apply", "-f", entries.to_str().unwrap()]);
    assert!(applied.status.success(), "{applied:?}");
    let (cert, key, root) = mesh.issue("web", "web");
    let root = std::fs::read_to_string(root).unwrap();
    let forged = |namespace: &str, name: &str| {
        serde_json::json!({
            "time": "2025-01-01T10:00:00.000Z", "type": "access", "direction": "inbound",
            "protocol": "HTTP/1.1", "source_address": "127.0.0.1:1",
            "source_principal": "spiffe://cluster.local/ns/evil/sa/attacker",
            "method": "GET", "path": "/secrets", "decision": "allow", "v": 1,
            "workload": {"namespace": namespace, "name": name, "labels": {"app": "vault"}},
            "destination_port": 80
        })
        .to_string()
        .into_bytes()
    };
    let batch = DecisionBatch {
        records: vec![
            forged("bank", "vault"),
            forged("web", "web"),
            br#"{"type":"access","direction":"outbound","v":1}"#.to_vec(),
            b"not json".to_vec(),
        ],
        dropped: 0,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kept_late = runtime.block_on(async {
        let connect = |identity: Option<Identity>| {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&root))
                .domain_name("localhost");
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            let url = format!("https://{}", mesh.ca_addr);
            async move {
                Channel::from_shared(url)
                    .unwrap()
                    .tls_config(tls)
                    .unwrap()
                    .connect()
                    .await
            }
        };
        let identity = Identity::from_pem(
            std::fs::read_to_string(&cert).unwrap(),
            std::fs::read_to_string(&key).unwrap(),
        );
        let channel = connect(Some(identity)).await.unwrap();
        let mut web = DecisionsClient::new(channel);
        let answer = web.report(batch.clone()).await.unwrap().into_inner();
        assert_eq!((answer.kept, answer.refused), (1, 3), "{answer:?}");
        // Without a workload certificate, the call is refused.
        let stranger = DecisionsClient::new(connect(None).await.unwrap())
            .report(batch.clone())
            .await;
        match stranger {
            Err(status) => assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}"),
            Ok(answer) => panic!("a stranger reported: {answer:?}"),
        }
        // Revoked, web can report no more, even on the connection it
        // opened before.
        let revoked = mesh.admin(&[
            "revoke",
            "identity",
            "spiffe://cluster.local/ns/web/sa/web",
            "--reason",
            "compromised",
        ]);
        assert!(revoked.status.success(), "{revoked:?}");
        let deadline = tokio::time::Instant::now() + SETTLE;
        let mut kept_late = 0;
        loop {
            match web.report(batch.clone()).await {
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
                    assert!(status.message().contains("revoked"), "{status}");
                    break kept_late;
                }
                Ok(answer) => {
                    // Kept before the revocation reached the server.
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "still reporting: {answer:?}"
                    );
                    kept_late += answer.into_inner().kept;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await; // pacing: between polls of a deadline-bounded wait
                }
            }
        }
    });
    let window = window_records(&mesh.data);
    assert_eq!(window.len() as u64, 1 + kept_late, "{window:#?}");
    assert_eq!(
        window[0]["workload"],
        serde_json::json!({"namespace": "web", "name": "web", "labels": {"app": "web"}})
    );
    assert_eq!(
        window[0]["reporter"],
        "spiffe://cluster.local/ns/web/sa/web"
    );
    std::fs::remove_dir_all(dir).ok();
}
