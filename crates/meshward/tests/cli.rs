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
        Some("30 document(s): 20 valid policies, 0 error(s), 5 warning(s)"),
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
        stderr(&o).contains("20 valid policies, 0 error(s), 5 warning(s)"),
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
