//! Attacks on request handling, against running `meshward server` and
//! `meshward proxy` processes (issue 10): requests carrying a forged token
//! next to a good one, and an application that records everything it
//! receives, so a test can say that an attack never reached it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The policies every sidecar here enforces. `{{JWKS}}` is the test keys'
/// JWKS (`crates/policy/tests/keys`).
const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: web}
spec:
  jwtRules:
  - issuer: https://issuer.example
    jwks: '{{JWKS}}'
    outputClaimToHeaders:
    - {header: x-jwt-sub, claim: sub}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-blocked-host, namespace: web}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        hosts: ["blocked.example", "blocked.example:*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin-paths, namespace: web}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/allow/admin/{**}", "/store/{**}/cart"]
"#;

fn keys() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/tests/keys")
}

/// `POLICIES` with the test JWKS in place.
fn policies(yaml: &str) -> String {
    let jwks = std::fs::read_to_string(keys().join("jwks.json")).unwrap();
    yaml.replace("{{JWKS}}", jwks.trim())
}

/// A token from https://issuer.example for `sub`, valid for an hour, with
/// kid `rsa-1`, signed with `key` (`rsa.pem` is the key the JWKS holds;
/// `rsa-other.pem` forges), and the header changed by `header`.
fn mint(sub: &str, key: &str, header: impl FnOnce(&mut jsonwebtoken::Header)) -> String {
    let pem = std::fs::read(keys().join(key)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    header(&mut h);
    let claims =
        serde_json::json!({"iss": "https://issuer.example", "sub": sub, "exp": now + 3600});
    jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

fn good_token(sub: &str) -> String {
    mint(sub, "rsa.pem", |_| {})
}

/// Claims kid `rsa-1` but is signed by another key.
fn forged_token(sub: &str) -> String {
    mint(sub, "rsa-other.pem", |_| {})
}

/// An HTTP/1.1 application that records the head (request line and
/// headers) of every request it receives and answers `200 ok`.
struct App {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl App {
    fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = heads.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let recorded = recorded.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    recorded.lock().unwrap().push(head);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                });
            }
        });
        App { addr, heads }
    }

    /// Every head received so far.
    fn received(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// The head of the one request received for `path`.
    fn request_for(&self, path: &str) -> String {
        let found: Vec<String> = self
            .received()
            .into_iter()
            .filter(|h| h.split_whitespace().nth(1) == Some(path))
            .collect();
        assert_eq!(found.len(), 1, "requests for {path}: {found:?}");
        found[0].clone()
    }
}

/// A `meshward server` and a `meshward proxy` for web/sa/web (label
/// app=web) in front of an application, PERMISSIVE, so plaintext requests
/// can be written byte by byte.
struct Sidecar {
    /// The inbound HTTP port.
    port: u16,
    admin: SocketAddr,
    proxy: Process,
    _mesh: Mesh,
}

impl Sidecar {
    fn start(name: &str, policy_yaml: &str, app: SocketAddr) -> Sidecar {
        let dir = tempdir(&format!("attack-{name}"));
        let mesh = server(&dir);
        let policy_dir = dir.join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("policies.yaml"), policies(policy_yaml)).unwrap();
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(bin())
            .args([
                "proxy",
                "--identity",
                "spiffe://cluster.local/ns/web/sa/web",
                "--label",
                "app=web",
                "--inbound",
                &format!("{port}={app},protocol=http"),
                "--policies",
                policy_dir.to_str().unwrap(),
                "--ca-address",
                &format!("https://{}", mesh.ca_addr),
                "--ca-root",
                mesh.data.join("root-cert.pem").to_str().unwrap(),
                "--ca-server-name",
                "localhost",
                "--token-file",
                mesh.token("web", "web").to_str().unwrap(),
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
        let proxy = Process(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(admin, "/healthz/ready").map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "the proxy did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        Sidecar {
            port,
            admin,
            proxy,
            _mesh: mesh,
        }
    }
}

impl Sidecar {
    /// The proxy process is still running and still answers.
    fn assert_alive(&mut self) {
        assert!(
            self.proxy.0.try_wait().unwrap().is_none(),
            "the proxy exited"
        );
        assert_eq!(
            http_get(self.admin, "/healthz/ready").map(|r| r.0),
            Some(200)
        );
    }
}

/// Writes `request` as is and returns every byte the proxy sent until it
/// closed the connection (a reset after a reply ends the reading too).
/// Requests say `connection: close`; the connection stays open for writing,
/// as a half-closed client connection ends the exchange on the proxy's side.
fn exchange(port: u16, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The proxy may answer and close before reading all of a bad request.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the reply: {e}"),
        }
    }
    out
}

/// The first response on a connection.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn reply(port: u16, request: &str) -> Reply {
    let raw = exchange(port, request.as_bytes());
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete reply to {request:?}: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn get(path: &str, headers: &[(&str, &str)]) -> String {
    let mut r = format!("GET {path} HTTP/1.1\r\nhost: web.example\r\nconnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

#[test]
fn a_request_with_a_forged_token_beside_a_good_one_is_refused() {
    let app = App::start();
    let mut web = Sidecar::start("tokens", POLICIES, app.addr);
    let good = good_token("alice");
    let forged = forged_token("admin");
    let bearer = |t: &str| format!("Bearer {t}");
    let attacks = [
        (
            "/two-headers/good-first".to_owned(),
            vec![bearer(&good), bearer(&forged)],
        ),
        (
            "/two-headers/forged-first".to_owned(),
            vec![bearer(&forged), bearer(&good)],
        ),
        (
            format!("/params/good-first?access_token={good}&access_token={forged}"),
            vec![],
        ),
        (
            format!("/params/forged-first?access_token={forged}&access_token={good}"),
            vec![],
        ),
        (
            format!("/header-and-param/forged-param?access_token={forged}"),
            vec![bearer(&good)],
        ),
        (
            format!("/header-and-param/forged-header?access_token={good}"),
            vec![bearer(&forged)],
        ),
    ];
    for (path, authorization) in &attacks {
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|v| ("authorization", v.as_str()))
            .collect();
        let r = reply(web.port, &get(path, &headers));
        let what = path.split('?').next().unwrap();
        assert_eq!(r.status, 401, "{what}: {r:?}");
        assert_eq!(r.body, "Jwt verification fails", "{what}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer realm=\"http://web.example")
                    && v.ends_with("error=\"invalid_token\"")),
            "{what}: {r:?}"
        );
    }

    // Honest requests pass, and the application sees no token, only the
    // verified subject.
    let one = reply(
        web.port,
        &get("/honest/one", &[("authorization", &bearer(&good))]),
    );
    assert_eq!(one.status, 200, "{one:?}");
    let second = good_token("bob");
    let two = reply(
        web.port,
        &get(
            "/honest/two",
            &[
                ("authorization", &bearer(&good)),
                ("authorization", &bearer(&second)),
            ],
        ),
    );
    assert_eq!(two.status, 200, "{two:?}");
    for path in ["/honest/one", "/honest/two"] {
        let head = app.request_for(path);
        assert!(head.contains("x-jwt-sub: alice\r\n"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("authorization"),
            "{head}"
        );
    }

    // No attack reached the application, and the forged token never did.
    let received = app.received();
    assert_eq!(received.len(), 2, "{received:#?}");
    assert!(received.iter().all(|h| !h.contains(&forged)));
    web.assert_alive();
}

#[test]
fn tokens_with_critical_header_extensions_are_refused() {
    let app = App::start();
    let mut web = Sidecar::start("crit", POLICIES, app.addr);
    // Signed with the right key: only the header's extensions are wrong.
    let critical = mint("admin", "rsa.pem", |h| {
        h.crit = Some(vec!["exp-ext".into()]);
        h.extras.insert("exp-ext", 1);
    });
    let unencoded = mint("admin", "rsa.pem", |h| {
        h.crit = Some(vec!["b64".into()]);
        h.extras.insert("b64", false);
    });
    let unencoded_uncritical = mint("admin", "rsa.pem", |h| {
        h.extras.insert("b64", false);
    });
    let refusals = [
        (
            "/crit",
            &critical,
            "Jwt header lists critical extensions (crit) that are not supported",
        ),
        (
            "/b64",
            &unencoded,
            "Jwt header has an unencoded payload (b64: false), which is not supported",
        ),
        (
            "/b64-not-critical",
            &unencoded_uncritical,
            "Jwt header has an unencoded payload (b64: false), which is not supported",
        ),
    ];
    for (path, token, message) in refusals {
        let r = reply(
            web.port,
            &get(path, &[("authorization", &format!("Bearer {token}"))]),
        );
        assert_eq!((r.status, r.body.as_str()), (401, message), "{path}: {r:?}");
    }
    let ok = reply(
        web.port,
        &get(
            "/plain",
            &[("authorization", &format!("Bearer {}", good_token("alice")))],
        ),
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    let received = app.received();
    assert_eq!(received.len(), 1, "{received:#?}");
    assert!(received[0].starts_with("GET /plain "), "{received:#?}");
    web.assert_alive();
}

#[test]
fn a_trailing_dot_does_not_get_a_host_past_a_deny() {
    let app = App::start();
    let mut web = Sidecar::start("host-dot", POLICIES, app.addr);
    let request =
        |host: &str| format!("GET /{host} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    for host in [
        "blocked.example",
        "blocked.example.",
        "BLOCKED.example.",
        "blocked.example.:8080",
    ] {
        let r = reply(web.port, &request(host));
        assert_eq!(
            (r.status, r.body.as_str()),
            (403, "RBAC: access denied"),
            "Host: {host}: {r:?}"
        );
    }
    // Another host passes, and the application gets it without the dot.
    let r = reply(web.port, &request("web.example.:8080"));
    assert_eq!(r.status, 200, "{r:?}");
    let head = app.request_for("/web.example.:8080");
    assert!(head.contains("host: web.example:8080\r\n"), "{head}");
    assert_eq!(app.received().len(), 1, "{:#?}", app.received());
    web.assert_alive();
}

#[test]
fn a_double_star_template_matches_empty_and_slashes_so_nothing_slips_past_a_deny() {
    let app = App::start();
    let mut web = Sidecar::start("double-star", POLICIES, app.addr);
    // `{**}` is zero or more characters, slashes included (Envoy's
    // `[pchar/]*`): the empty remainder and an empty middle are matched.
    for path in [
        "/allow/admin/",
        "/allow/admin/users/7",
        "/store//cart",
        "/store/a/b/cart",
    ] {
        let r = reply(web.port, &get(path, &[]));
        assert_eq!(
            (r.status, r.body.as_str()),
            (403, "RBAC: access denied"),
            "{path}: {r:?}"
        );
    }
    // What the templates do not cover passes.
    for path in ["/allow/admin", "/store/cart"] {
        let r = reply(web.port, &get(path, &[]));
        assert_eq!(r.status, 200, "{path}: {r:?}");
        app.request_for(path);
    }
    assert_eq!(app.received().len(), 2, "{:#?}", app.received());
    web.assert_alive();
}

#[test]
fn a_request_without_a_host_gets_400_and_never_reaches_the_application() {
    let app = App::start();
    let mut web = Sidecar::start("no-host", POLICIES, app.addr);
    let refused = [
        // RFC 9112 §3.2: HTTP/1.1 requires Host.
        "GET /no-host HTTP/1.1\r\nconnection: close\r\n\r\n",
        // Envoy (HTTP/1.0 enabled, no default host) refuses it too.
        "GET /no-host-1.0 HTTP/1.0\r\n\r\n",
        "GET /empty-host HTTP/1.1\r\nhost:\r\nconnection: close\r\n\r\n",
        "GET /two-hosts HTTP/1.1\r\nhost: web.example\r\nhost: blocked.example\r\nconnection: close\r\n\r\n",
        "GET /user-info HTTP/1.1\r\nhost: admin@web.example\r\nconnection: close\r\n\r\n",
    ];
    for request in refused {
        let r = reply(web.port, request);
        assert_eq!(
            (r.status, r.body.as_str()),
            (400, "Bad Request"),
            "{request:?}: {r:?}"
        );
        assert_eq!(r.header("connection"), Some("close"), "{request:?}: {r:?}");
    }
    // With a Host, both versions are served.
    for request in [
        "GET /with-host HTTP/1.1\r\nhost: web.example\r\nconnection: close\r\n\r\n",
        "GET /with-host-1.0 HTTP/1.0\r\nhost: web.example\r\n\r\n",
    ] {
        let r = reply(web.port, request);
        assert_eq!(r.status, 200, "{request:?}: {r:?}");
    }
    app.request_for("/with-host");
    app.request_for("/with-host-1.0");
    assert_eq!(app.received().len(), 2, "{:#?}", app.received());
    web.assert_alive();
}
