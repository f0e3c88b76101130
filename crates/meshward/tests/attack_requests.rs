//! Attacks on request handling, against running `meshward server` and
//! `meshward proxy` processes (issue 10): requests carrying a forged token
//! next to a good one, and an application that records everything it
//! receives, so a test can say that an attack never reached it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
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
    proxy: Spawned,
    _mesh: Mesh,
}

impl Sidecar {
    fn start(name: &str, policy_yaml: &str, app: SocketAddr) -> Sidecar {
        Sidecar::start_on(name, policy_yaml, app, &[free_port()])
    }

    /// With an inbound HTTP port for each of `ports` (the first is `port`).
    fn start_on(name: &str, policy_yaml: &str, app: SocketAddr, ports: &[u16]) -> Sidecar {
        let dir = tempdir(&format!("attack-{name}"));
        let mesh = server(&dir);
        let policy_dir = dir.join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("policies.yaml"), policies(policy_yaml)).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let inbound = ports.iter().flat_map(|port| {
            [
                "--inbound".to_owned(),
                format!("{port}={app},protocol=http"),
            ]
        });
        let proxy = spawn(
            "proxy",
            Command::new(bin())
                .args([
                    "proxy",
                    "--identity",
                    "spiffe://cluster.local/ns/web/sa/web",
                    "--label",
                    "app=web",
                ])
                .args(inbound)
                .args([
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
                ]),
        );
        wait_until(Duration::from_secs(60), "the proxy is ready", || {
            http_get(admin, "/healthz/ready").map(|r| r.0) == Some(200)
        });
        Sidecar {
            port: ports[0],
            admin,
            proxy,
            _mesh: mesh,
        }
    }
}

impl Sidecar {
    /// The proxy process is still running and still answers.
    fn assert_alive(&mut self) {
        assert!(self.proxy.process.try_wait().is_none(), "the proxy exited");
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
        // `=` is one of the characters a template operator matches (Envoy's
        // kLiteral): `key=value` segments do not slip past.
        "/allow/admin/x=1",
        "/store/k=v/cart",
        // Raw characters a path may not hold are percent-encoded by
        // normalization (as Envoy's is), so templates match them.
        "/allow/admin/café",
        "/store/a|b/cart",
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

/// For the property tests: a port where nothing is allowed (every request
/// that gets as far as a policy is refused) and a port that serves, to show
/// the proxy still works.
const FUZZ_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: web}
spec:
  jwtRules:
  - issuer: https://issuer.example
    jwks: '{{JWKS}}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-the-live-port, namespace: web}
spec:
  action: ALLOW
  rules:
  - to:
    - operation: {ports: ["{{LIVE}}"]}
"#;

/// Writes `request`, then reads until the proxy closes. Once a whole
/// response has arrived, or nothing has for a second, the writing side is
/// closed, so a proxy keeping the connection for another request, or still
/// waiting for more of this one, sees its end and must close too. Those
/// moments decide when to stop waiting, never what is asserted.
fn fuzz_exchange(port: u16, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let _ = s.write_all(request);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut ended = false;
    let end = |s: &TcpStream, ended: &mut bool| {
        if !*ended {
            let _ = s.shutdown(std::net::Shutdown::Write);
            *ended = true;
        }
    };
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if first_response_len(&out).is_some_and(|len| out.len() >= len) {
                    end(&s, &mut ended);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    Instant::now() < deadline,
                    "the proxy neither answered nor closed: {:?}",
                    String::from_utf8_lossy(request)
                );
                end(&s, &mut ended);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("reading the reply: {e}"),
        }
    }
}

/// The length of the first response in `bytes`, head and body, once its
/// head has arrived and says how long its body is.
fn first_response_len(bytes: &[u8]) -> Option<usize> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]);
    let length = head.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    })?;
    Some(end + 4 + length)
}

/// The statuses of the HTTP/1.x responses in `bytes`, if that is all they
/// are and every one is a 4xx. A reset may cut the last one short, but
/// what arrived of it must still be the start of a 4xx response.
fn only_4xx_responses(bytes: &[u8]) -> Result<Vec<u16>, String> {
    let mut statuses = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            let text = String::from_utf8_lossy(rest);
            let cut_short = ["HTTP/1.1 4", "HTTP/1.0 4"]
                .iter()
                .any(|p| text.starts_with(p) || p.starts_with(text.as_ref()));
            return cut_short
                .then_some(statuses)
                .ok_or_else(|| format!("not an HTTP response: {text:?}"));
        };
        let head = String::from_utf8_lossy(&rest[..end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = match status_line.split(' ').collect::<Vec<_>>().as_slice() {
            ["HTTP/1.1" | "HTTP/1.0", code, ..] if code.len() == 3 => code
                .parse()
                .map_err(|_| format!("bad status line {status_line:?}"))?,
            _ => return Err(format!("bad status line {status_line:?}")),
        };
        if !(400..500).contains(&status) {
            return Err(format!("status {status}: {head:?}"));
        }
        statuses.push(status);
        let mut length = None;
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header line {line:?}"))?;
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    length = Some(
                        value
                            .trim()
                            .parse::<usize>()
                            .map_err(|_| format!("bad content-length {value:?}"))?,
                    )
                }
                "transfer-encoding" => return Err(format!("a chunked reply: {head:?}")),
                _ => {}
            }
        }
        let body_start = end + 4;
        // Without a length the body runs to the close.
        let body_end = length.map_or(rest.len(), |n| (body_start + n).min(rest.len()));
        rest = &rest[body_end..];
    }
    Ok(statuses)
}

#[test]
fn only_4xx_responses_reads_what_it_says() {
    let ok = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\n\r\nRBAC: access deniedHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 4";
    assert_eq!(only_4xx_responses(ok), Ok(vec![403, 400]));
    assert_eq!(only_4xx_responses(b""), Ok(vec![]));
    assert_eq!(only_4xx_responses(b"HTT"), Ok(vec![]));
    assert!(only_4xx_responses(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err());
    assert!(only_4xx_responses(b"HTTP/1.1 503 x\r\ncontent-length: 0\r\n\r\n").is_err());
    assert!(only_4xx_responses(b"HTTP/1.1 2").is_err());
    assert!(only_4xx_responses(b"garbage").is_err());
    assert!(
        only_4xx_responses(b"HTTP/1.1 401 x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
            .is_err()
    );
}

/// Arbitrary request heads: raw bytes, and heads built from request lines
/// and header lines that are mostly well formed, so that many reach the
/// policy engine and some the HTTP parser's every refusal.
fn request_heads() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let bytes = |max| proptest::collection::vec(any::<u8>(), 0..max);
    let method = prop_oneof![
        4 => proptest::sample::select(vec!["GET", "POST", "OPTIONS", "DELETE", "PUT"])
            .prop_map(str::to_owned),
        1 => "[!-~]{0,12}",
    ];
    let target = prop_oneof![
        6 => "/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,60}",
        1 => "/[!-~]{0,60}",
        1 => "[ -~]{0,40}",
        1 => Just("*".to_owned()),
    ];
    let version = prop_oneof![
        4 => Just("HTTP/1.1".to_owned()),
        2 => Just("HTTP/1.0".to_owned()),
        1 => "HTTP/[0-9]\\.[0-9]",
        1 => "[ -~]{0,10}",
    ];
    let header = prop_oneof![
        6 => ("[A-Za-z0-9-]{1,20}", "[ -~]{0,60}")
            .prop_map(|(name, value)| format!("{name}: {value}").into_bytes()),
        3 => proptest::sample::select(vec![
            "host: blocked.example.",
            "host:",
            "content-length: 5",
            "transfer-encoding: chunked",
            "connection: keep-alive",
            "expect: 100-continue",
            "authorization: Bearer a.b.c",
            "x-forwarded-client-cert: By=spiffe://cluster.local/ns/web/sa/web",
        ])
        .prop_map(|h| h.as_bytes().to_vec()),
        1 => bytes(40),
    ];
    // Most carry a Host, without which any request is refused at once.
    let host = prop_oneof![
        4 => Just(b"host: web.example".to_vec()),
        1 => "host: [ -~]{0,30}".prop_map(String::into_bytes),
        1 => Just(Vec::new()),
    ];
    let structured = (
        method,
        target,
        version,
        host,
        proptest::collection::vec(header, 0..6),
    )
        .prop_map(|(method, target, version, host, headers)| {
            let mut head = format!("{method} {target} {version}\r\n").into_bytes();
            for h in std::iter::once(host)
                .filter(|h| !h.is_empty())
                .chain(headers)
            {
                head.extend(h);
                head.extend(b"\r\n");
            }
            head.extend(b"\r\n");
            head
        });
    let raw = bytes(1024).prop_map(|mut head| {
        head.extend(b"\r\n\r\n");
        head
    });
    prop_oneof![1 => raw, 3 => structured]
}

/// What kind of bearer token a case sends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TokenKind {
    /// Any bytes, which HTTP may not even carry in a header.
    Raw,
    /// Printable text: a header value, but never a token that verifies.
    Text,
    /// Three base64url sections: a JWT's shape, never a valid one.
    Shaped,
}

/// Arbitrary bearer tokens: raw bytes, text, three base64url sections of
/// arbitrary bytes, and well-formed tokens of the right issuer with an
/// arbitrary signature.
fn tokens() -> impl proptest::strategy::Strategy<Value = (Vec<u8>, TokenKind)> {
    use base64::Engine as _;
    use proptest::prelude::*;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let bytes = |max| proptest::collection::vec(any::<u8>(), 0..max);
    let raw = bytes(512).prop_map(|t| (t, TokenKind::Raw));
    let text = "[ -~]{0,300}".prop_map(|t| (t.into_bytes(), TokenKind::Text));
    let sections = (bytes(96), bytes(192), bytes(96)).prop_map(move |(h, p, s)| {
        let token = format!("{}.{}.{}", b64(&h), b64(&p), b64(&s));
        (token.into_bytes(), TokenKind::Shaped)
    });
    let forged = (
        proptest::sample::select(vec!["RS256", "ES256", "HS256", "none", "PS512"]),
        "[ -~]{0,24}",
        bytes(300),
    )
        .prop_map(move |(alg, sub, sig)| {
            let header = serde_json::json!({"alg": alg, "kid": "rsa-1", "typ": "JWT"});
            let claims = serde_json::json!({"iss": "https://issuer.example", "sub": sub});
            let token = format!(
                "{}.{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes()),
                b64(&sig)
            );
            (token.into_bytes(), TokenKind::Shaped)
        });
    prop_oneof![raw, text, sections, forged]
}

#[test]
fn arbitrary_heads_and_tokens_get_a_4xx_and_the_proxy_keeps_serving() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let app = App::start();
    let (fuzz, live) = (free_port(), free_port());
    let yaml = FUZZ_POLICIES.replace("{{LIVE}}", &live.to_string());
    // The runner's closures are `Fn`; checking the process needs `&mut`.
    let web = std::cell::RefCell::new(Sidecar::start_on("fuzz", &yaml, app.addr, &[fuzz, live]));
    let alive = || {
        web.borrow_mut().assert_alive();
        let r = reply(live, &get("/alive", &[]));
        assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");
    };
    alive();
    let config = || Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    };

    // Request heads: the proxy answers 4xx or closes; nothing reaches the
    // application.
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    TestRunner::new(config())
        .run(&request_heads(), |head| {
            let statuses = only_4xx_responses(&fuzz_exchange(fuzz, &head)).map_err(|e| {
                TestCaseError::fail(format!(
                    "{e}\nfor head {:?}",
                    String::from_utf8_lossy(&head)
                ))
            })?;
            seen.borrow_mut().extend(statuses);
            alive();
            Ok(())
        })
        .unwrap();
    // Both the HTTP parser and the policy engine were reached (each with
    // probability far above 99.99% in 96 cases).
    let seen = seen.into_inner();
    assert!(seen.contains(&400) && seen.contains(&403), "{seen:?}");

    // Tokens: one complete 4xx each (400 for a header HTTP cannot carry,
    // 401 for a token that fails, 403 when no token is left to verify and
    // nothing is allowed); a JWT-shaped one is always refused by request
    // authentication with Envoy's message.
    TestRunner::new(config())
        .run(&tokens(), |(token, kind)| {
            let mut request =
                b"GET /jwt HTTP/1.1\r\nhost: web.example\r\nconnection: close\r\nauthorization: Bearer "
                    .to_vec();
            request.extend(&token);
            request.extend(b"\r\n\r\n");
            let bytes = fuzz_exchange(fuzz, &request);
            let token = String::from_utf8_lossy(&token);
            let statuses = only_4xx_responses(&bytes)
                .map_err(|e| TestCaseError::fail(format!("{e}\nfor token {token:?}")))?;
            let text = String::from_utf8_lossy(&bytes);
            let expected = match kind {
                TokenKind::Raw => statuses.len() == 1,
                TokenKind::Text => statuses == [401] || statuses == [403],
                TokenKind::Shaped => statuses == [401] && text.contains("\r\n\r\nJwt "),
            };
            proptest::prop_assert!(expected, "{kind:?} token {token:?}: {text:?}");
            alive();
            Ok(())
        })
        .unwrap();

    let received = app.received();
    assert!(
        received
            .iter()
            .all(|h| h.starts_with("GET /alive HTTP/1.1\r\n")),
        "a request other than the liveness checks reached the application: {received:#?}"
    );
    assert_eq!(received.len(), 1 + 2 * 96);
}
