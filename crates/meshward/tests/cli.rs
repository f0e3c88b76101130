//! The `meshward` binary, run as users run it: on the repository's examples,
//! on broken input, and on standard input.

// A test that cannot set itself up should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn meshward(args: &[&str], stdin: Option<&str>) -> Output {
    common::output_with_input(
        Command::new(common::bin()).args(args).current_dir(repo()),
        stdin.unwrap_or("").as_bytes(),
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `meshward check` on a policy path and a requests file, which must succeed.
fn check(policies: &str, requests: &str) -> Vec<serde_json::Value> {
    let o = meshward(&["check", "-f", policies, "--input", requests], None);
    assert!(o.status.success(), "{}", stderr(&o));
    results(&o)
}

/// Two string fields of each result, for comparing a whole run at once.
fn fields<'a>(results: &'a [serde_json::Value], a: &str, b: &str) -> Vec<(&'a str, &'a str)> {
    results
        .iter()
        .map(|v| (v[a].as_str().unwrap_or("-"), v[b].as_str().unwrap_or("-")))
        .collect()
}

fn results(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn validate_accepts_every_example() {
    let o = meshward(&["validate", "-f", "examples/"], None);
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(
        stderr(&o).lines().last(),
        Some("42 document(s): 24 valid policies, 0 error(s), 5 warning(s)"),
        "{}",
        stderr(&o)
    );
    // The warnings, by where and what: DENY rules on HTTP-only fields
    // (Istio's own warning), and DENY rules on paths under Istio's default
    // path normalization, BASE.
    let http_only = "spec.rules: configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule";
    let base = "spec.rules[0].to[0].operation.paths: a DENY rule on paths: under path normalization BASE (Istio's default; vulnerable to CVE-2021-31920)";
    let expected = [
        (
            "examples/jwt/policies.yaml:32",
            "foo/require-jwt",
            http_only,
        ),
        (
            "examples/jwt/policies.yaml:48",
            "foo/admin-group",
            http_only,
        ),
        ("examples/jwt/policies.yaml:51", "foo/admin-group", base),
        (
            "examples/zero-trust/policies.yaml:90",
            "foo/deny-status-teapot",
            http_only,
        ),
        (
            "examples/zero-trust/policies.yaml:93",
            "foo/deny-status-teapot",
            base,
        ),
    ]
    .map(|(at, policy, what)| format!("{at}: warning: AuthorizationPolicy {policy}: {what}"));
    // Sorted as `expected` is: by file, then line.
    let out = stdout(&o);
    let mut warnings: Vec<&str> = out.lines().collect();
    warnings.sort_unstable();
    assert_eq!(warnings.len(), expected.len(), "{out}");
    for (warning, expected) in warnings.iter().zip(&expected) {
        assert!(
            warning.starts_with(expected.as_str()),
            "wanted {expected:?}, got {warning:?}"
        );
    }
}

#[test]
fn validate_reports_file_line_resource_and_field_and_keeps_valid_documents() {
    let dir = tempdir();
    let file = dir.join("mixed.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: good, namespace: foo}\nspec:\n  rules: [{}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: foo}\nspec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
    )
    .expect("write");
    let o = meshward(&["validate", "-f", file.to_str().expect("utf-8")], None);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("mixed.yaml:14: error: AuthorizationPolicy foo/bad: spec.rules[0].to[0].operation.ports[0]: bad port (http)"),
        "{out}"
    );
    assert!(
        stderr(&o).contains("2 document(s): 1 valid policy, 1 error(s)"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn check_decides_the_zero_trust_example() {
    let r = check(
        "examples/zero-trust/policies.yaml",
        "examples/zero-trust/requests.jsonl",
    );
    assert_eq!(
        fields(&r, "decision", "policy"),
        [
            ("allow", "foo/httpbin-viewer"),
            ("deny", "-"),
            ("allow", "foo/httpbin-viewer"),
            ("allow", "foo/httpbin-admin"),
            ("deny", "foo/deny-legacy"),
            ("deny", "-"),
            ("deny", "-"),
        ]
    );
    assert_eq!(r[1]["audited"], true);
    assert_eq!(r[2]["dry_run"][0]["decision"], "deny");
    assert_eq!(
        r[4]["reason"],
        "denied by foo/deny-legacy rule 0: source.namespaces matched \"legacy\""
    );
}

#[test]
fn check_applies_mtls_modes() {
    let r = check("examples/mtls/", "examples/mtls/requests.jsonl");
    assert_eq!(
        fields(&r, "decision", "mtls_mode"),
        [
            ("allow", "STRICT"),
            ("deny", "STRICT"),
            ("allow", "DISABLE"),
            ("allow", "PERMISSIVE")
        ]
    );
    assert!(
        r[1]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("requires mutual TLS"),
        "{}",
        r[1]
    );
}

#[test]
fn check_verifies_jwts() {
    let r = check("examples/jwt/policies.yaml", "examples/jwt/requests.jsonl");
    let got: Vec<(&str, u64)> = r
        .iter()
        .map(|v| {
            (
                v["decision"].as_str().unwrap_or(""),
                v["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("allow", 200),
            ("deny", 403),
            ("deny", 401),
            ("deny", 401),
            ("allow", 200)
        ]
    );
    assert_eq!(r[0]["request_principal"], "testing@secure.istio.io/alice");
    assert_eq!(r[0]["upstream_headers"]["x-jwt-sub"], "alice");
    assert!(
        r[0]["upstream_headers"].get("authorization").is_none(),
        "token is not forwarded by default"
    );
    assert!(
        r[2]["www_authenticate"]
            .as_str()
            .unwrap_or("")
            .starts_with("Bearer realm=")
    );
}

#[test]
fn check_reads_policies_and_requests_from_stdin_and_reports_bad_lines() {
    let policy =
        std::fs::read_to_string(repo().join("examples/zero-trust/policies.yaml")).expect("example");
    let dir = tempdir();
    // Line 1: decided by a policy from standard input (without policies,
    // it would be allowed by default, by no policy).
    let first = std::fs::read_to_string(repo().join("examples/zero-trust/requests.jsonl"))
        .expect("example")
        .lines()
        .next()
        .expect("a request")
        .to_owned();
    let requests = dir.join("r.jsonl");
    std::fs::write(&requests, format!("{first}\nnot json\n")).expect("write");
    let o = meshward(
        &[
            "check",
            "-f",
            "-",
            "--input",
            requests.to_str().expect("utf-8"),
            "-o",
            "text",
        ],
        Some(&policy),
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "a bad input line makes the exit status 1"
    );
    let out = stdout(&o);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines[0][..5],
        ["LINE", "DECISION", "STATUS", "MTLS", "POLICY"],
        "{out}"
    );
    assert_eq!(
        lines[1][..5],
        ["1", "allow", "200", "PERMISSIVE", "foo/httpbin-viewer"],
        "{out}"
    );
    assert_eq!(
        lines[2][..3],
        ["2", "error", &format!("{}:2:", requests.display())],
        "{out}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn check_refuses_invalid_policies() {
    let o = meshward(
        &[
            "check",
            "-f",
            "-",
            "--input",
            "examples/zero-trust/requests.jsonl",
        ],
        Some(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {action: NOPE}\n",
        ),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("<stdin>:4: error: AuthorizationPolicy default/x: spec.action"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn describe_explains_what_applies_and_what_does_not() {
    let o = meshward(
        &[
            "describe",
            "-f",
            "examples/zero-trust/",
            "-f",
            "examples/mtls/",
            "--namespace",
            "foo",
            "--labels",
            "app=finance",
            "--port",
            "9090",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "workload mode: STRICT (from istio-system/default)",
        "port 9090: DISABLE (from foo/finance-metrics portLevelMtls[9090])",
        "foo/deny-legacy  [namespace-wide, 1 rule(s)]",
        "foo/allow-nothing  [namespace-wide, 0 rule(s)]",
        "default: DENY (an enforced ALLOW policy applies)",
        "AuthorizationPolicy foo/httpbin-viewer: selector app=httpbin does not match (label app=httpbin is app=finance)",
        "PeerAuthentication legacy/default: it is in namespace \"legacy\"",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[test]
fn validate_refuses_an_empty_port_level_mtls_and_an_empty_issuer() {
    let o = meshward(
        &["validate", "-f", "-"],
        Some(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: foo}\nspec:\n  selector: {matchLabels: {app: web}}\n  portLevelMtls: {}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: foo}\nspec:\n  jwtRules:\n  - issuer: \"\"\n    jwksUri: https://issuer.example/jwks\n",
        ),
    );
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    for needle in [
        "<stdin>:6: error: PeerAuthentication foo/pa: spec.portLevelMtls: port level mTLS, if defined, must have at least one element",
        "<stdin>:13: error: RequestAuthentication foo/ra: spec.jwtRules[0].issuer: issuer must be non-empty string when set",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(
        stderr(&o).contains("2 document(s): 0 valid policies, 2 error(s)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn validate_describe_and_up_warn_about_paths_that_base_normalization_leaves_open() {
    let dir = tempdir();
    let merge = dir.join("mesh-merge-slashes.yaml");
    std::fs::write(
        &merge,
        "pathNormalization: {normalization: MERGE_SLASHES}\n",
    )
    .expect("write");
    let merge = merge.to_str().expect("utf-8");

    // validate: the examples' two DENY rules on paths, under Istio's default.
    let o = meshward(&["validate", "-f", "examples/"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "examples/jwt/policies.yaml:51: warning: AuthorizationPolicy foo/admin-group: spec.rules[0].to[0].operation.paths: a DENY rule on paths: under path normalization BASE (Istio's default; vulnerable to CVE-2021-31920) requests such as //admin, /admin%2Fx, /x/..%2Fadmin, /admin%5Cx reach the application as written",
        "examples/zero-trust/policies.yaml:93: warning: AuthorizationPolicy foo/deny-status-teapot: spec.rules[0].to[0].operation.paths: a DENY rule on paths: under path normalization BASE",
        "set MeshConfig `pathNormalization: {normalization: MERGE_SLASHES}` (closes //admin) or, strictest, `DECODE_AND_MERGE_SLASHES` (closes all of them)",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert_eq!(out.matches("CVE-2021-31920").count(), 2, "{out}");
    // The other three warnings are Istio's own (DENY rules that also deny TCP).
    assert!(
        stderr(&o).contains("24 valid policies, 0 error(s), 5 warning(s)"),
        "{}",
        stderr(&o)
    );
    let strict = meshward(&["validate", "--strict", "-f", "examples/jwt/"], None);
    assert_eq!(strict.status.code(), Some(1));
    // The mesh config in force decides: merged slashes leave nothing to warn about.
    let o = meshward(
        &["validate", "-f", "examples/", "--mesh-config", merge],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("CVE-2021-31920"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("0 error(s), 3 warning(s)"),
        "{}",
        stderr(&o)
    );

    // describe: under the policies that apply to the workload.
    let describe = |extra: &[&str]| {
        let mut args = vec![
            "describe",
            "-f",
            "examples/jwt/",
            "-n",
            "foo",
            "-l",
            "app=httpbin",
        ];
        args.extend(extra);
        let o = meshward(&args, None);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let out = describe(&[]);
    assert!(
        out.contains("  warning: AuthorizationPolicy foo/admin-group: spec.rules[0].to[0].operation.paths: a DENY rule on paths: under path normalization BASE (Istio's default; vulnerable to CVE-2021-31920)"),
        "{out}"
    );
    assert_eq!(out.matches("CVE-2021-31920").count(), 1, "{out}");
    assert!(!describe(&["--mesh-config", merge]).contains("CVE-2021-31920"));

    // up: once for the whole directory, before it starts anything (this one
    // has no WorkloadEntry, so up stops right after).
    let mesh_dir = dir.join("up-mesh");
    std::fs::create_dir_all(&mesh_dir).expect("mkdir");
    let deny = |name: &str, path: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {{ports: [\"80\"], paths: [\"{path}\"]}}\n"
        )
    };
    std::fs::write(mesh_dir.join("a.yaml"), deny("deny-admin", "/admin*")).expect("write");
    std::fs::write(mesh_dir.join("b.yaml"), deny("deny-debug", "/debug/*")).expect("write");
    let o = meshward(&["up", mesh_dir.to_str().expect("utf-8")], None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.matches("CVE-2021-31920").count(), 1, "{err}");
    assert!(
        err.contains("meshward up: warning: AuthorizationPolicy foo/deny-admin, AuthorizationPolicy foo/deny-debug match request paths in DENY, AUDIT or CUSTOM rules (or ALLOW notPaths): under path normalization BASE (Istio's default; vulnerable to CVE-2021-31920)"),
        "{err}"
    );
    assert!(
        err.contains("has no WorkloadEntry: nothing to run"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "meshward-cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));

    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A policy that takes its keys from `jwks_uri`, and the first request of the
/// JWT example (a valid token from issuer testing@secure.istio.io).
fn jwks_uri_case(jwks_uri: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = tempdir();
    let policy = dir.join("ra.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwksUri: {jwks_uri}\n"
        ),
    )
    .expect("write policy");
    let requests = dir.join("requests.jsonl");
    let first = std::fs::read_to_string(repo().join("examples/jwt/requests.jsonl"))
        .expect("example requests")
        .lines()
        .next()
        .expect("one request")
        .to_owned();
    std::fs::write(&requests, first + "\n").expect("write requests");
    (dir, policy, requests)
}

#[test]
fn check_fetches_jwks_uri_over_http() {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("addr").port();
    let jwks =
        std::fs::read_to_string(repo().join("crates/policy/tests/keys/jwks.json")).expect("jwks");
    // Accepting without blocking, so the thread ends (and join returns)
    // within the deadline even if the CLI never connects.
    listener.set_nonblocking(true).expect("non-blocking");
    let server = std::thread::spawn(move || {
        // Serve exactly one request, then stop: the CLI fetches once and caches.
        let (mut stream, _) = common::wait_for(common::COMMAND, || {
            listener
                .accept()
                .map_err(|e| format!("no connection to the JWKS server: {e}"))
        });
        stream.set_nonblocking(false).expect("blocking");
        stream.set_read_timeout(Some(common::SETTLE)).ok();
        let mut request_line = String::new();
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        reader.read_line(&mut request_line).expect("request line");
        let mut line = String::new();
        while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
            line.clear();
        }
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
            jwks.len()
        )
        .expect("respond");
        request_line
    });
    let (dir, policy, requests) = jwks_uri_case(&format!("http://127.0.0.1:{port}/jwks"));
    let r = check(
        policy.to_str().expect("utf-8"),
        requests.to_str().expect("utf-8"),
    );
    assert_eq!(r[0]["decision"], "allow", "{}", r[0]);
    assert_eq!(r[0]["request_principal"], "testing@secure.istio.io/alice");
    let request_line = server.join().expect("server thread");
    assert!(
        request_line.starts_with("GET /jwks HTTP/1.1"),
        "{request_line}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn check_uses_a_local_jwks_file_instead_of_fetching() {
    // Port 9 on loopback (discard) is never contacted: the override answers.
    let uri = "http://127.0.0.1:9/never-fetched";
    let (dir, policy, requests) = jwks_uri_case(uri);
    let keys = repo().join("crates/policy/tests/keys/jwks.json");
    let o = meshward(
        &[
            "check",
            "-f",
            policy.to_str().expect("utf-8"),
            "--input",
            requests.to_str().expect("utf-8"),
            "--jwks",
            &format!("{uri}={}", keys.display()),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(results(&o)[0]["decision"], "allow");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn check_rejects_tokens_when_jwks_cannot_be_fetched() {
    // Nothing listens on a port we bound and closed: the fetch fails, the token is rejected.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (dir, policy, requests) = jwks_uri_case(&format!("http://127.0.0.1:{port}/jwks"));
    let r = check(
        policy.to_str().expect("utf-8"),
        requests.to_str().expect("utf-8"),
    );
    assert_eq!(r[0]["decision"], "deny");
    assert_eq!(r[0]["status"], 401);
    assert_eq!(
        r[0]["reason"],
        "request authentication failed: Jwks remote fetch is failed"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn ca_init_issue_inspect_and_token_create() {
    let dir = tempdir();
    let data = dir.join("data");
    let data_s = data.to_str().expect("utf-8");
    let o = meshward(
        &[
            "ca",
            "init",
            "--data-dir",
            data_s,
            "--trust-domain",
            "example.org",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("trust domain: example.org"),
        "{}",
        stdout(&o)
    );

    let out = dir.join("workload");
    let o = meshward(
        &[
            "ca",
            "issue",
            "--data-dir",
            data_s,
            "-n",
            "foo",
            "--service-account",
            "bar",
            "--out",
            out.to_str().expect("utf-8"),
            "--ttl",
            "2h",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("key.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let chain = out.join("cert-chain.pem");
    let bundle = data.join("root-cert.pem");
    let o = meshward(
        &[
            "ca",
            "inspect",
            chain.to_str().expect("utf-8"),
            "--bundle",
            bundle.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("SPIFFE ID:   spiffe://example.org/ns/foo/sa/bar"),
        "{text}"
    );
    assert!(text.contains("chain:       verifies against"), "{text}");

    // Against another mesh's bundle the chain does not verify: exit 1.
    let other = dir.join("other");
    let o = meshward(
        &["ca", "init", "--data-dir", other.to_str().expect("utf-8")],
        None,
    );
    assert!(o.status.success());
    let other_bundle = other.join("root-cert.pem");
    let o = meshward(
        &[
            "ca",
            "inspect",
            chain.to_str().expect("utf-8"),
            "--bundle",
            other_bundle.to_str().expect("utf-8"),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("does NOT verify"), "{}", stdout(&o));

    // A token is the only thing printed: one line, three JWT sections.
    let o = meshward(
        &[
            "token",
            "create",
            "--data-dir",
            data_s,
            "-n",
            "foo",
            "--service-account",
            "bar",
            "--ttl",
            "10m",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let token = stdout(&o);
    assert_eq!(token.lines().count(), 1);
    assert_eq!(token.trim().split('.').count(), 3);

    // The data directory keeps its trust domain.
    let o = meshward(
        &[
            "ca",
            "init",
            "--data-dir",
            data_s,
            "--trust-domain",
            "other.org",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("initialised for trust domain \"example.org\""),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `meshward server` as a process: it announces its address, issues a
/// certificate for a token made by `meshward token create`, and stops
/// cleanly on SIGTERM.
#[test]
fn server_issues_certificates_and_stops_on_sigterm() {
    use meshward_api::istio_ca::IstioCertificateRequest;
    use meshward_api::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let dir = tempdir();
    let data = dir.join("data");
    let data_s = data.to_str().expect("utf-8").to_owned();
    let mut server = common::spawn(
        "meshward server",
        Command::new(common::bin()).args([
            "server",
            "--data-dir",
            &data_s,
            "--listen",
            "127.0.0.1:0",
        ]),
    );
    let line = server
        .logs
        .wait_for_stdout("listening on https://", common::START);
    let addr = line
        .strip_prefix("listening on https://")
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the server says where it listens")
        .to_owned();

    let token = stdout(&meshward(
        &[
            "token",
            "create",
            "--data-dir",
            &data_s,
            "-n",
            "foo",
            "--service-account",
            "bar",
        ],
        None,
    ))
    .trim()
    .to_owned();
    let bundle = std::fs::read_to_string(data.join("root-cert.pem")).expect("bundle");
    let id = meshward_identity::SpiffeId::istio("cluster.local", "foo", "bar").expect("id");
    let (_key, csr) = meshward_identity::ca::new_key_and_csr(&id).expect("csr");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let chain = runtime.block_on(async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&bundle))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://{addr}"))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .timeout(common::COMMAND)
            .connect()
            .await
            .expect("connects");
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: None,
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .expect("issued")
            .into_inner()
            .cert_chain
    });
    let certs = meshward_identity::pem::parse_certificates(&chain.concat()).expect("pem");
    let bundle = meshward_identity::TrustBundle::from_pem(&bundle).expect("bundle");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    assert_eq!(
        meshward_identity::chain::verify(&certs, &bundle, now)
            .expect("verifies")
            .id,
        id
    );

    let status = server.stop();
    assert!(status.success(), "exit status {status}");
    server
        .logs
        .wait_for_stdout("meshward server: stopped", common::SETTLE);
    std::fs::remove_dir_all(dir).ok();
}

/// Runs `meshward ARGS` with `--data-dir DATA` and nothing else to find
/// the server by.
fn with_data_dir(data: &Path, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--data-dir", data.to_str().expect("utf-8")]);
    meshward(&all, None)
}

/// The server's record in its data directory, parsed.
fn server_record(data: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(data.join("server.json")).ok()?;
    Some(serde_json::from_str(&text).expect("server.json is JSON"))
}

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `meshward server` records where it listens in its data directory; every
/// config API command given only `--data-dir` uses it, and it is gone when
/// the server stops.
#[test]
fn commands_find_the_server_from_its_data_directory() {
    use nix::sys::signal::Signal;

    let dir = tempdir();
    let mut mesh = common::server(&dir);
    let record = server_record(&mesh.data).expect("the server recorded itself");
    assert_eq!(record["address"], mesh.ca_addr.as_str(), "{record}");
    assert_eq!(record["server_name"], "localhost", "{record}");
    assert_eq!(record["pid"], mesh.server.pid(), "{record}");

    let zero_trust = repo().join("examples/zero-trust/policies.yaml");
    let o = with_data_dir(
        &mesh.data,
        &["apply", "-f", zero_trust.to_str().expect("utf-8")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("AuthorizationPolicy/foo/deny-legacy created"),
        "{}",
        stdout(&o)
    );
    let o = with_data_dir(&mesh.data, &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("config version "), "{}", stdout(&o));
    // --server wins, and may be HOST:PORT.
    let o = with_data_dir(&mesh.data, &["status", "--server", &mesh.ca_addr]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with_data_dir(&mesh.data, &["get", "ap", "deny-legacy", "-n", "foo"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("name: deny-legacy"), "{}", stdout(&o));
    let o = with_data_dir(
        &mesh.data,
        &["revoke", "token", "found-test-token", "--reason", "test"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with_data_dir(&mesh.data, &["describe", "-n", "foo", "-l", "app=httpbin"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("foo/deny-legacy"), "{}", stdout(&o));
    let o = with_data_dir(&mesh.data, &["delete", "ap", "deny-legacy", "-n", "foo"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "AuthorizationPolicy/foo/deny-legacy deleted\n");

    // A clean exit removes the record; the commands then say where they
    // looked and fall back to the default address.
    mesh.server.signal(Signal::SIGTERM);
    common::wait_for(common::SETTLE, || {
        mesh.server
            .try_wait()
            .ok_or_else(|| "the server is still running".to_owned())
    });
    assert_eq!(
        server_record(&mesh.data),
        None,
        "the record outlived the server"
    );
    let o = with_data_dir(&mesh.data, &["status"]);
    assert_eq!(o.status.code(), Some(2));
    // What answers on the default port (likely nothing) is not the test's.
    let expected = format!(
        "error: connecting to the server at https://127.0.0.1:15012 (the default: no --server, and no server recorded in {}): ",
        mesh.data.join("server.json").display()
    );
    assert!(stderr(&o).starts_with(&expected), "{}", stderr(&o));
    std::fs::remove_dir_all(dir).ok();
}

/// A failed connection says which address was tried, where it came from,
/// why (each cause once) and what to do.
#[test]
fn a_failed_connection_names_the_address_its_origin_and_each_cause_once() {
    use nix::sys::signal::Signal;

    let dir = tempdir();
    // From --server: a port nothing listens on.
    let port = closed_port();
    let mut mesh = common::server(&dir);
    let o = meshward(
        &[
            "status",
            "--server",
            &format!("https://127.0.0.1:{port}"),
            "--data-dir",
            mesh.data.to_str().expect("utf-8"),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        format!(
            "error: connecting to the server at https://127.0.0.1:{port} (from --server): transport error: tcp connect error: Connection refused (os error 111)\nis `meshward server --data-dir {}` or `meshward up` running? give --server or --data-dir\n",
            mesh.data.display()
        )
    );

    // From the record of a server that was killed: it is tried, and said
    // to be stale.
    let pid = mesh.server.pid();
    mesh.server.signal(Signal::SIGKILL);
    common::wait_for(common::SETTLE, || {
        mesh.server
            .try_wait()
            .ok_or_else(|| "the server is still running".to_owned())
    });
    assert!(
        server_record(&mesh.data).is_some(),
        "a killed server leaves its record"
    );
    let o = with_data_dir(&mesh.data, &["get", "all"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(
        err,
        format!(
            "error: connecting to the server at https://{} (recorded in {} by pid {pid}, which is no longer running): transport error: tcp connect error: Connection refused (os error 111)\nis `meshward server --data-dir {}` or `meshward up` running? give --server or --data-dir\n",
            mesh.ca_addr,
            mesh.data.join("server.json").display(),
            mesh.data.display()
        )
    );
    assert_eq!(err.matches("tcp connect error").count(), 1, "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// A second server on a data directory in use names the process that
/// holds it, instead of redb's lock error twice.
#[test]
fn a_second_server_on_a_data_directory_names_the_process_holding_it() {
    let dir = tempdir();
    let mut mesh = common::server(&dir);
    let before = server_record(&mesh.data).expect("recorded");
    let o = meshward(
        &[
            "server",
            "--data-dir",
            mesh.data.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(
        err,
        format!(
            "error: another meshward process holds {}: pid {}, the server listening on https://{} (as {} records); stop it, or give this server another --data-dir\n",
            mesh.data.display(),
            mesh.server.pid(),
            mesh.ca_addr,
            mesh.data.join("server.json").display()
        )
    );
    assert!(!err.contains("Database already open"), "{err}");
    // The first server is untouched: still serving, still recorded.
    assert!(mesh.server.try_wait().is_none(), "the first server stopped");
    assert_eq!(server_record(&mesh.data), Some(before));
    let o = with_data_dir(&mesh.data, &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(dir).ok();
}

/// `meshward up` starts its server on a random port with its data
/// directory: `--data-dir` alone finds it.
#[test]
fn commands_find_the_server_of_meshward_up_from_its_data_directory() {
    let dir = tempdir();
    let mesh_dir = dir.join("mesh");
    std::fs::create_dir_all(&mesh_dir).expect("mkdir");
    std::fs::write(
        mesh_dir.join("web.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: demo}\nspec:\n  serviceAccount: web\n  labels: {app: web}\n  ports: {http: 8080}\n",
    )
    .expect("write");
    let data = dir.join("data");
    let mut up = common::spawn(
        "meshward up",
        Command::new(common::bin())
            .args(["up", mesh_dir.to_str().expect("utf-8"), "--data-dir"])
            .arg(&data),
    );
    let control_plane = common::wait_for(common::START, || {
        up.assert_running();
        let text = std::fs::read_to_string(data.join("up.json"))
            .map_err(|e| format!("meshward up is not ready: {e}"))?;
        let mesh: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        Ok(mesh["control_plane"]
            .as_str()
            .expect("an address")
            .to_owned())
    });
    let record = server_record(&data).expect("up's server recorded itself");
    assert_eq!(
        format!("https://{}", record["address"].as_str().expect("address")),
        control_plane
    );
    // The workload's proxy is connected: status, through the record, shows it.
    common::wait_for(common::SETTLE, || {
        let o = with_data_dir(&data, &["status"]);
        let out = stdout(&o);
        (o.status.success()
            && out
                .lines()
                .any(|l| l.starts_with("demo/web ") && l.contains("SYNCED")))
        .then_some(())
        .ok_or(format!("{out}{}", stderr(&o)))
    });
    let o = with_data_dir(&data, &["get", "we", "web", "-n", "demo", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    drop(up);
    std::fs::remove_dir_all(dir).ok();
}

/// `get` and `delete` take Istio's short names and plurals in any case;
/// `-n` is the namespace of both, `default` unless given; an unknown kind
/// is refused (exit 1) with the list, before any server is asked.
#[test]
fn get_and_delete_take_kubectl_kinds_and_namespaces() {
    // No server: the kind is refused first.
    let nowhere = format!("https://127.0.0.1:{}", closed_port());
    for (args, command, listed_last) in [
        (&["get", "policies"][..], "get", "MeshConfig, or all\n"),
        (
            &["delete", "policies", "x"][..],
            "delete",
            "Gateway (gw), VirtualService (vs)\n",
        ),
    ] {
        let mut args = args.to_vec();
        args.extend(["--server", &nowhere, "--admin-dir", "/nonexistent"]);
        let o = meshward(&args, None);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.starts_with(&format!(
                "error: unknown kind \"policies\": {command} takes AuthorizationPolicy (ap), PeerAuthentication (pa), RequestAuthentication (ra), WorkloadEntry (we), ServiceEntry (se), DestinationRule (dr)"
            )),
            "{err}"
        );
        assert!(err.ends_with(listed_last), "{err}");
    }

    let dir = tempdir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mesh = common::server(&dir);
    let file = dir.join("objects.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: here, namespace: default}\nspec: {}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: there, namespace: web}\nspec: {}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: web}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: web}\nspec: {jwtRules: [{issuer: issuer.example, jwksUri: 'https://issuer.example/jwks'}]}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: web}\nspec: {hosts: [api.web.svc], ports: [{number: 80, name: http, protocol: HTTP}], workloadSelector: {labels: {app: api}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: api-1, namespace: web}\nspec: {address: 127.0.0.1, serviceAccount: api, labels: {app: api}, ports: {http: 8080}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api, namespace: web}\nspec: {host: api.web.svc, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}\n",
    )
    .expect("write");
    let o = mesh.admin(&["apply", "-f", file.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let names = |args: &[&str]| -> Vec<String> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let o = mesh.admin(&all);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let objects: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).expect("JSON");
        objects
            .iter()
            .map(|o| {
                format!(
                    "{} {}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["metadata"]["namespace"].as_str().unwrap_or("?"),
                    o["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    for (words, expected) in [
        (
            &["ap", "AuthorizationPolicy", "authorizationpolicies", "AP"][..],
            "AuthorizationPolicy web/there",
        ),
        (
            &["pa", "peerauthentication", "PeerAuthentications"],
            "PeerAuthentication web/strict",
        ),
        (
            &["ra", "requestauthentications"],
            "RequestAuthentication web/jwt",
        ),
        (&["we", "workloadentries"], "WorkloadEntry web/api-1"),
        (&["se", "serviceentries"], "ServiceEntry web/api"),
        (
            &["dr", "destinationrules", "DestinationRule"],
            "DestinationRule web/api",
        ),
    ] {
        for word in words {
            assert_eq!(
                names(&["get", word, "-n", "web"]),
                [expected],
                "get {word} -n web"
            );
        }
    }
    // Without -n: namespace default, as delete; -A: every namespace.
    assert_eq!(names(&["get", "ap"]), ["AuthorizationPolicy default/here"]);
    let mut every = names(&["get", "ap", "-A"]);
    every.sort();
    assert_eq!(
        every,
        [
            "AuthorizationPolicy default/here",
            "AuthorizationPolicy web/there"
        ]
    );
    let o = mesh.admin(&["get", "se"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert_eq!(
        stderr(&o),
        "no ServiceEntry in namespace default (-A: every namespace)\n"
    );
    let o = mesh.admin(&["get", "ap", "there"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "AuthorizationPolicy default/there not found\n");

    let o = mesh.admin(&["delete", "ap", "there"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "AuthorizationPolicy/default/there not found\n");
    let o = mesh.admin(&["delete", "AP", "here"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "AuthorizationPolicy/default/here deleted\n");
    let o = mesh.admin(&["delete", "dr", "api", "-n", "web"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(names(&["get", "all", "-A"]).len(), 5);
    std::fs::remove_dir_all(dir).ok();
}

/// A YAML error is placed at file:line:column once, by validate and apply
/// alike.
#[test]
fn yaml_errors_name_file_line_and_column_once() {
    let dir = tempdir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("broken.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: fine, namespace: foo}\nspec: {}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n  namespace: [\n",
    )
    .expect("write");
    let expected = format!(
        "{}:10:14: error: invalid YAML: unclosed bracket '['",
        file.display()
    );
    let o = meshward(&["validate", "-f", file.to_str().expect("utf-8")], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), [expected.as_str()]);
    let o = meshward(
        &[
            "apply",
            "-f",
            file.to_str().expect("utf-8"),
            "--admin-dir",
            "/nonexistent",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with(&format!("{expected}\n")), "{err}");
    for repeated in ["error: line", "line 5 column", "line 10 column"] {
        assert!(!err.contains(repeated), "{repeated:?} in {err}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `describe` against a running server names the stored objects its
/// warnings are about, and no file: they come from none.
#[test]
fn live_describe_warns_without_an_invented_location() {
    let dir = tempdir();
    let mesh = common::server(&dir);
    let zero_trust = repo().join("examples/zero-trust/policies.yaml");
    let o = mesh.admin(&["apply", "-f", zero_trust.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = mesh.admin(&["describe", "-n", "foo", "-l", "app=httpbin"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.lines().any(|l| l.starts_with("warning: AuthorizationPolicy foo/deny-status-teapot: spec.rules: configured AuthorizationPolicy will deny all traffic to TCP ports")),
        "{err}"
    );
    assert!(!err.contains("server:"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn validate_and_describe_say_which_provider_a_custom_policy_calls_and_where_it_applies() {
    let dir = tempdir();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(
        &mesh,
        "extensionProviders:\n- name: http-authz\n  envoyExtAuthzHttp: {service: authz.foo.svc.cluster.local, port: 8000}\n- name: grpc-authz\n  envoyExtAuthzGrpc:\n    service: opa.foo.svc.cluster.local\n    port: 9191\n    includeRequestBodyInCheck: {maxRequestBytes: 8192, allowPartialMessage: true, packAsBytes: true}\n",
    )
    .expect("write");
    let mesh = mesh.to_str().expect("utf-8");
    let policies = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: by-http, namespace: foo}\nspec:\n  selector: {matchLabels: {app: a}}\n  action: CUSTOM\n  provider: {name: http-authz}\n  rules: [{}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: by-grpc, namespace: foo}\nspec:\n  selector: {matchLabels: {app: b}}\n  action: CUSTOM\n  provider: {name: grpc-authz}\n  rules: [{}]\n";
    let o = meshward(
        &["validate", "-f", "-", "--mesh-config", mesh],
        Some(policies),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("<stdin>:7: warning: AuthorizationPolicy foo/by-http: spec.provider.name: provider \"http-authz\" is envoyExtAuthzHttp, which checks HTTP requests only: on TCP ports this policy is ignored"),
        "{out}"
    );
    assert!(
        !out.contains("foo/by-grpc"),
        "a gRPC provider checks TCP: {out}"
    );

    let describe = |app: &str| {
        let o = meshward(
            &[
                "describe",
                "-f",
                "-",
                "--mesh-config",
                mesh,
                "-n",
                "foo",
                "-l",
                app,
            ],
            Some(policies),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let out = describe("app=a");
    assert!(
        out.contains("provider http-authz (envoyExtAuthzHttp: asked for HTTP requests only; on TCP ports the policy is ignored, as in Istio)"),
        "{out}"
    );
    let out = describe("app=b");
    assert!(
        out.contains(
            "provider grpc-authz (envoyExtAuthzGrpc: asked for HTTP requests and TCP connections)"
        ),
        "{out}"
    );
}
