//! The ingress gateway as processes: `meshward server`, sidecars in front
//! of demo applications, and `meshward gateway` configured by the control
//! plane with Istio's Gateway and VirtualService, asked by curl and
//! `openssl s_client` from outside (127.0.0.1 only): TLS versions and
//! ciphers, SNI, MUTUAL, httpsRedirect, HTTP/2, routing, JWT and
//! `remoteIpBlocks` at the edge with trusted hops, certificate reload under
//! traffic, retries, 404 and 503.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;

/// An outside CA and the certificates it issues, as PEM files.
struct OutsideCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    cert: PathBuf,
}

impl OutsideCa {
    fn new(dir: &Path, name: &str) -> OutsideCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let cert = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&cert, issuer.pem()).unwrap();
        OutsideCa { issuer, cert }
    }

    /// A certificate for `names` with CN `cn`: (certificate PEM, key PEM).
    fn issue(&self, cn: &str, names: &[&str], client: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a credential as `credentialName` reads it: NAME.crt, NAME.key.
    fn write(&self, dir: &Path, name: &str, cn: &str, names: &[&str]) {
        let (cert, key) = self.issue(cn, names, false);
        std::fs::write(dir.join(format!("{name}.crt")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    }
}

/// An application answering every request with `status` and its name.
fn fixed_app(name: &'static str, status: u16) -> SocketAddr {
    use std::io::{BufRead, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let body = format!("{{\"name\":\"{name}\"}}");
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
    addr
}

/// Istio's JWT keys from the policy tests (`crates/policy/tests/keys`).
fn keys() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/tests/keys")
}

/// A token from https://issuer.example for `sub`, expiring `exp_from_now`
/// seconds from now (negative: expired).
fn token(sub: &str, exp_from_now: i64) -> String {
    let pem = std::fs::read(keys().join("rsa.pem")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let claims = serde_json::json!({
        "iss": "https://issuer.example", "sub": sub, "exp": now + exp_from_now,
    });
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

/// The registry: three workloads of service account `web` behind sidecars,
/// and the services made of them.
fn registry(ports: [u16; 3]) -> String {
    let [p1, p2, p3] = ports;
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-1, namespace: web}}
spec: {{address: 127.0.0.1, ports: {{http: {p1}}}, labels: {{app: web, version: v1}}, serviceAccount: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-2, namespace: web}}
spec: {{address: 127.0.0.1, ports: {{http: {p2}}}, labels: {{app: web, version: v2, flaky: "yes"}}, serviceAccount: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: broken, namespace: web}}
spec: {{address: 127.0.0.1, ports: {{http: {p3}}}, labels: {{flaky: "yes"}}, serviceAccount: web}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web-v1, namespace: web}}
spec:
  hosts: [web-v1.web.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web-v2, namespace: web}}
spec:
  hosts: [web-v2.web.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: flaky, namespace: web}}
spec:
  hosts: [flaky.web.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{flaky: "yes"}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: flaky, namespace: web}}
spec:
  host: flaky.web.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: empty, namespace: web}}
spec:
  hosts: [empty.web.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: nothing}}}}
"#
    )
}

const INGRESS: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: front, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [bookinfo.example]
    tls: {mode: SIMPLE, credentialName: bookinfo}
  - port: {number: 443, name: https-other, protocol: HTTPS}
    hosts: [other.example]
    tls: {mode: SIMPLE, credentialName: other}
  - port: {number: 443, name: https-mtls, protocol: HTTPS}
    hosts: [mtls.example]
    tls: {mode: MUTUAL, credentialName: mtls}
  - port: {number: 443, name: https-late, protocol: HTTPS}
    hosts: [late.example]
    tls: {mode: SIMPLE, credentialName: late}
  - port: {number: 80, name: http-redirect, protocol: HTTP}
    hosts: [bookinfo.example]
    tls: {httpsRedirect: true}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [plain.example]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: web}
spec:
  hosts: [bookinfo.example, other.example, mtls.example, late.example]
  gateways: [istio-system/front]
  http:
  - match: [{uri: {exact: /exact}}]
    route: [{destination: {host: web-v1}}]
  - match: [{uri: {regex: "/items/[0-9]+"}}]
    route: [{destination: {host: web-v2}}]
  - match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: web-v2}}]
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v1/}
    route: [{destination: {host: web-v1.web.svc.cluster.local, port: {number: 80}}}]
  - match: [{uri: {prefix: /weighted}}]
    route:
    - {destination: {host: web-v1}, weight: 80}
    - {destination: {host: web-v2}, weight: 20}
  - match: [{uri: {prefix: /flaky-retried}}]
    retries: {attempts: 2, retryOn: "503"}
    route: [{destination: {host: flaky}}]
  - match: [{uri: {prefix: /flaky}}]
    route: [{destination: {host: flaky}}]
  - match: [{uri: {prefix: /empty}}]
    route: [{destination: {host: empty}}]
  - match: [{uri: {prefix: /unknown}}]
    route: [{destination: {host: nowhere.web.svc.cluster.local}}]
  - route: [{destination: {host: web-v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: plain, namespace: web}
spec:
  hosts: [plain.example]
  gateways: [istio-system/front]
  http:
  - match: [{uri: {prefix: /only}}]
    route: [{destination: {host: web-v2}}]
"#;

/// Policies at the edge: JWT from https://issuer.example, required under
/// `/secure/`; clients from 203.0.113.0/24 refused under `/ip/`.
const EDGE_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: edge-jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  jwtRules:
  - issuer: https://issuer.example
    jwks: '{{JWKS}}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/secure/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-range, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from: [{source: {remoteIpBlocks: ["203.0.113.0/24"]}}]
    to: [{operation: {paths: ["/ip/*"]}}]
"#;

struct Edge {
    dir: PathBuf,
    creds: PathBuf,
    outside: OutsideCa,
    client_ca: OutsideCa,
    foreign_ca: OutsideCa,
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
    gateway: Spawned,
    _sidecars: Vec<Spawned>,
    _apps: Vec<Spawned>,
    mesh: Mesh,
}

fn apply(mesh: &Mesh, dir: &Path, name: &str, yaml: &str, mesh_config: bool) {
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    let mut args = vec!["apply"];
    if mesh_config {
        args.push("--mesh-config");
    }
    args.extend(["-f", file.to_str().unwrap()]);
    let out = mesh.admin(&args);
    assert!(
        out.status.success(),
        "apply {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `meshward proxy` for `workload` of service account web, serving
/// `inbound` in front of `app`.
fn sidecar(mesh: &Mesh, workload: &str, inbound: u16, app: SocketAddr) -> Spawned {
    let mut command = meshward();
    command
        .args([
            "proxy",
            "--identity",
            "spiffe://cluster.local/ns/web/sa/web",
        ])
        .args(["--workload", &format!("web/{workload}")])
        .args([
            "--inbound",
            &format!("127.0.0.1:{inbound}={app},protocol=http"),
        ])
        .args(["--control-plane", &mesh.ca_addr])
        .args(["--ca-address", &format!("https://{}", mesh.ca_addr)])
        .args([
            "--ca-root",
            mesh.data.join("root-cert.pem").to_str().unwrap(),
        ])
        .args(["--ca-server-name", "localhost"])
        .args(["--token-file", mesh.token("web", "web").to_str().unwrap()])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .args(["--access-log", "off", "--audit-log", "off"]);
    let process = spawn(&format!("meshward proxy ({workload})"), &mut command);
    process
        .logs
        .wait_for_stderr("meshward proxy: admin on", START);
    process
}

impl Edge {
    fn start(name: &str) -> Edge {
        let dir = tempdir(name);
        let mesh = server(&dir);
        let creds = dir.join("credentials");
        std::fs::create_dir_all(&creds).unwrap();
        let outside = OutsideCa::new(&dir, "outside");
        let client_ca = OutsideCa::new(&dir, "clients");
        let foreign_ca = OutsideCa::new(&dir, "foreign");
        outside.write(&creds, "bookinfo", "bookinfo-1", &["bookinfo.example"]);
        outside.write(&creds, "other", "other-1", &["other.example"]);
        outside.write(&creds, "mtls", "mtls-1", &["mtls.example"]);
        std::fs::copy(&client_ca.cert, creds.join("mtls-cacert.crt")).unwrap();

        let mut apps = Vec::new();
        let mut demo = |name: &str| {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let app = spawn(
                &format!("demo-app {name}"),
                meshward().args(["demo-app", "--name", name, "--listen", &addr.to_string()]),
            );
            apps.push(app);
            addr
        };
        let v1 = demo("v1");
        let v2 = demo("v2");
        let broken = fixed_app("broken", 503);
        let inbound = [free_port(), free_port(), free_port()];
        apply(&mesh, &dir, "registry.yaml", &registry(inbound), false);
        let jwks = std::fs::read_to_string(keys().join("jwks.json")).unwrap();
        apply(
            &mesh,
            &dir,
            "edge.yaml",
            &EDGE_POLICIES.replace("{{JWKS}}", jwks.trim()),
            false,
        );
        apply(&mesh, &dir, "ingress.yaml", INGRESS, false);
        let sidecars = vec![
            sidecar(&mesh, "web-1", inbound[0], v1),
            sidecar(&mesh, "web-2", inbound[1], v2),
            sidecar(&mesh, "broken", inbound[2], broken),
        ];

        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut command = meshward();
        command
            .args(["gateway", "--control-plane", &mesh.ca_addr])
            .args(["--ca-address", &format!("https://{}", mesh.ca_addr)])
            .args([
                "--ca-root",
                mesh.data.join("root-cert.pem").to_str().unwrap(),
            ])
            .args(["--ca-server-name", "localhost"])
            .args([
                "--token-file",
                mesh.token("istio-system", "istio-ingressgateway-service-account")
                    .to_str()
                    .unwrap(),
            ])
            .args(["--listen", "127.0.0.1", "--port", "443=0", "--port", "80=0"])
            .args(["--credentials-dir", creds.to_str().unwrap()])
            .args(["--cert-reload-interval", "100ms"])
            .args(["--admin", &admin.to_string()])
            .args(["--audit-log", "off"])
            .env("MESHWARD_LOG", "warn,meshward_proxy::gateway=info");
        let gateway = spawn("meshward gateway", &mut command);
        let port = |number: u16| -> SocketAddr {
            let line = gateway
                .logs
                .wait_for_stderr(&format!("meshward gateway: port {number} on "), START);
            line.rsplit(' ').next().unwrap().trim().parse().unwrap()
        };
        let (https, http) = (port(443), port(80));
        let edge = Edge {
            dir,
            creds,
            outside,
            client_ca,
            foreign_ca,
            http,
            https,
            admin,
            gateway,
            _sidecars: sidecars,
            _apps: apps,
            mesh,
        };
        // Served end to end once every sidecar has its configuration.
        for path in ["/exact", "/items/1", "/flaky-retried"] {
            wait_for(START, || match edge.get("bookinfo.example", path, &[]) {
                (200, _) => Ok(()),
                other => Err(format!("GET {path}: {other:?}")),
            });
        }
        edge
    }

    /// curl over HTTPS to `host` (SNI and Host), trusting the outside CA:
    /// (status, body); status 0 when no HTTP answer came.
    fn get(&self, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
        self.curl(host, self.https, "https", path, extra)
    }

    fn curl(
        &self,
        host: &str,
        addr: SocketAddr,
        scheme: &str,
        path: &str,
        extra: &[&str],
    ) -> (u16, String) {
        let port = addr.port();
        let out = output(
            Command::new("curl")
                .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
                .args(["--cacert", self.outside.cert.to_str().unwrap()])
                .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
                .args(extra)
                .arg(format!("{scheme}://{host}:{port}{path}")),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// curl with `-w WRITE_OUT` and the body thrown away: what it printed.
    fn curl_w(
        &self,
        host: &str,
        addr: SocketAddr,
        scheme: &str,
        path: &str,
        write_out: &str,
        extra: &[&str],
    ) -> String {
        let port = addr.port();
        let out = output(
            Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "20",
                    "-o",
                    "/dev/null",
                    "-w",
                    write_out,
                ])
                .args(["--cacert", self.outside.cert.to_str().unwrap()])
                .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
                .args(extra)
                .arg(format!("{scheme}://{host}:{port}{path}")),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The JSON a demo application answered with.
    fn seen(&self, host: &str, path: &str, extra: &[&str]) -> serde_json::Value {
        let (status, body) = self.get(host, path, extra);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    /// `openssl s_client` to the HTTPS port with `args`: whether the
    /// handshake completed, and what it printed.
    fn s_client(&self, args: &[&str]) -> (bool, String) {
        let out = output_with_input(
            Command::new("openssl")
                .args(["s_client", "-connect", &self.https.to_string()])
                .args(["-CAfile", self.outside.cert.to_str().unwrap()])
                .args(args),
            b"",
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let done = text.contains("-----BEGIN CERTIFICATE-----")
            && text.contains("Verify return code: 0 (ok)")
            && !text.contains("Cipher is (NONE)");
        (done, text)
    }
}

#[test]
fn tls_offers_only_tls12_and_13_with_ecdhe_aes_gcm_picks_by_sni_and_checks_client_certificates() {
    let edge = Edge::start("gateway-tls");
    fn sni(name: &str) -> [&str; 2] {
        ["-servername", name]
    }

    // Versions: 1.2 and 1.3, nothing older.
    for (version, ok) in [
        ("-tls1_2", true),
        ("-tls1_3", true),
        ("-tls1_1", false),
        ("-tls1", false),
    ] {
        let mut args = vec![version];
        args.extend(sni("bookinfo.example"));
        if !ok {
            // OpenSSL 3 refuses old versions itself at its default level.
            args.extend(["-cipher", "DEFAULT@SECLEVEL=0"]);
        }
        let (done, text) = edge.s_client(&args);
        assert_eq!(done, ok, "{version}: {text}");
    }
    // TLS 1.2 suites: ECDHE with AES-GCM only.
    for (cipher, ok) in [
        ("ECDHE-ECDSA-AES128-GCM-SHA256", true),
        ("ECDHE-ECDSA-AES256-GCM-SHA384", true),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", false),
        ("ECDHE-ECDSA-AES128-SHA256", false),
        ("ECDHE-ECDSA-AES256-SHA", false),
    ] {
        let mut args = vec!["-tls1_2", "-cipher", cipher];
        args.extend(sni("bookinfo.example"));
        let (done, text) = edge.s_client(&args);
        assert_eq!(done, ok, "{cipher}: {text}");
    }
    // TLS 1.3 suites: AES-GCM only.
    for (suite, ok) in [
        ("TLS_AES_128_GCM_SHA256", true),
        ("TLS_AES_256_GCM_SHA384", true),
        ("TLS_CHACHA20_POLY1305_SHA256", false),
    ] {
        let mut args = vec!["-tls1_3", "-ciphersuites", suite];
        args.extend(sni("bookinfo.example"));
        let (done, text) = edge.s_client(&args);
        assert_eq!(done, ok, "{suite}: {text}");
    }

    // SNI picks the server, and with it the certificate.
    let (_, text) = edge.s_client(&sni("other.example"));
    assert!(text.contains("CN = other-1"), "{text}");
    let (_, text) = edge.s_client(&sni("bookinfo.example"));
    assert!(text.contains("CN = bookinfo-1"), "{text}");
    // No server for the name (and none for `*`): no handshake.
    let (done, text) = edge.s_client(&sni("unknown.example"));
    assert!(!done, "{text}");
    let (done, text) = edge.s_client(&["-noservername"]);
    assert!(!done, "{text}");
    // A server whose credential is not there: refused, while the others
    // serve; once its files appear, it serves too.
    let (done, text) = edge.s_client(&sni("late.example"));
    assert!(!done, "{text}");
    edge.outside
        .write(&edge.creds, "late", "late-1", &["late.example"]);
    wait_for(SETTLE, || {
        let (_, text) = edge.s_client(&sni("late.example"));
        if text.contains("CN = late-1") {
            Ok(())
        } else {
            Err(format!("late.example not served yet: {text}"))
        }
    });
    // A Host the SNI's server does not serve: 404.
    let (status, _) = edge.get("bookinfo.example", "/exact", &["-H", "host: other.example"]);
    assert_eq!(status, 404);

    // HTTP/1.1 and HTTP/2 by ALPN.
    for (flag, version) in [("--http1.1", "200 1.1"), ("--http2", "200 2")] {
        let got = edge.curl_w(
            "bookinfo.example",
            edge.https,
            "https",
            "/exact",
            "%{http_code} %{http_version}",
            &[flag],
        );
        assert_eq!(got, version, "{flag}");
    }

    // MUTUAL: a client certificate of the configured CA, and only that.
    let client = |ca: &OutsideCa, name: &str| -> (PathBuf, PathBuf) {
        let (cert, key) = ca.issue(name, &[], true);
        let (c, k) = (
            edge.dir.join(format!("{name}.crt")),
            edge.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    };
    let (good_cert, good_key) = client(&edge.client_ca, "client");
    let (bad_cert, bad_key) = client(&edge.foreign_ca, "stranger");
    let with = |c: &Path, k: &Path| {
        edge.get(
            "mtls.example",
            "/exact",
            &["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()],
        )
        .0
    };
    assert_eq!(with(&good_cert, &good_key), 200);
    assert_eq!(
        with(&bad_cert, &bad_key),
        0,
        "a foreign CA's client certificate is refused"
    );
    assert_eq!(
        edge.get("mtls.example", "/exact", &[]).0,
        0,
        "no client certificate"
    );

    // httpsRedirect on the plaintext port.
    let got = edge.curl_w(
        "bookinfo.example",
        edge.http,
        "http",
        "/a/b?c=d",
        "%{http_code} %{redirect_url}",
        &[],
    );
    assert_eq!(got, "301 https://bookinfo.example/a/b?c=d");
}

#[test]
fn virtual_services_route_by_uri_method_headers_and_weight_into_the_mesh() {
    let edge = Edge::start("gateway-routes");
    let name = |v: &serde_json::Value| v["name"].as_str().unwrap_or_default().to_owned();
    assert_eq!(name(&edge.seen("bookinfo.example", "/exact", &[])), "v1");
    assert_eq!(name(&edge.seen("bookinfo.example", "/items/42", &[])), "v2");
    // The regex holds for the whole path only.
    assert_eq!(
        name(&edge.seen("bookinfo.example", "/items/42x", &[])),
        "v1"
    );
    assert_eq!(
        name(&edge.seen("bookinfo.example", "/", &["-H", "x-version: v2"])),
        "v2"
    );
    // rewrite.uri replaces the matched prefix, the query stays.
    let seen = edge.seen("bookinfo.example", "/api/list?x=1", &[]);
    assert_eq!(seen["path"], "/v1/list?x=1", "{seen}");

    // What the backend sees: the gateway's identity in XFCC (set by its
    // sidecar from the gateway's certificate), never the client's own XFCC,
    // the client appended to X-Forwarded-For, the scheme.
    let seen = edge.seen(
        "bookinfo.example",
        "/exact",
        &[
            "-H",
            "x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://cluster.local/ns/admin/sa/admin",
            "-H",
            "x-forwarded-for: 198.51.100.4",
        ],
    );
    let xfcc = seen["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(
        xfcc.ends_with(
            "URI=spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
        ),
        "{xfcc}"
    );
    assert!(!xfcc.contains("evil") && !xfcc.contains("admin"), "{xfcc}");
    assert_eq!(
        seen["headers"]["x-forwarded-for"], "198.51.100.4, 127.0.0.1",
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{seen}");
    assert_eq!(
        seen["headers"]["host"],
        format!("bookinfo.example:{}", edge.https.port()),
        "the client's Host goes on: {seen}"
    );

    // Weights: 80/20 over 1,000 requests, within 10 points. One curl
    // process, many requests on kept-alive connections.
    let url = format!("https://bookinfo.example:{}/weighted", edge.https.port());
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--max-time", "120"])
        .args(["--cacert", edge.outside.cert.to_str().unwrap()])
        .args([
            "--resolve",
            &format!("bookinfo.example:{}:127.0.0.1", edge.https.port()),
        ])
        .args(["-w", "\n"]);
    for _ in 0..1000 {
        command.arg(&url);
    }
    let out = output(&mut command);
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        answers.len(),
        1000,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v1 = answers
        .iter()
        .filter(|l| l.contains("\"name\":\"v1\""))
        .count();
    let v2 = answers
        .iter()
        .filter(|l| l.contains("\"name\":\"v2\""))
        .count();
    assert_eq!(v1 + v2, 1000);
    assert!(
        (700..=900).contains(&v1),
        "v1 {v1}, v2 {v2} of 1000 at 80/20"
    );

    // Istio's metrics, the gateway reporting as the source: at least the
    // weighted requests answered by web, over mutual TLS.
    let (_, metrics) = http_get(edge.admin, "/stats/prometheus").unwrap();
    let answered: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_principal=\"spiffe://cluster.local/ns/web/sa/web\"")
                && l.contains("response_code=\"200\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(answered >= 1000.0, "{answered} in:\n{metrics}");
}

#[test]
fn jwt_and_remote_ip_blocks_apply_at_the_edge_with_trusted_hops() {
    let edge = Edge::start("gateway-edge");
    let bearer = |t: &str| format!("authorization: Bearer {t}");
    assert_eq!(edge.get("bookinfo.example", "/secure/x", &[]).0, 403);
    let (status, body) = edge.get(
        "bookinfo.example",
        "/secure/x",
        &["-H", &bearer(&token("alice", 3600))],
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = edge.get(
        "bookinfo.example",
        "/secure/x",
        &["-H", &bearer(&token("alice", -3600)), "-D", "-"],
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Jwt is expired"), "{body}");
    edge.gateway
        .logs
        .wait_for_stdout("\"policy\":\"istio-system/require-jwt\"", SETTLE);

    // No trusted hop: X-Forwarded-For is the client's to write, so it is
    // ignored, and the connection's address decides.
    let from = |xff: &str| {
        edge.get(
            "bookinfo.example",
            "/ip/x",
            &["-H", &format!("x-forwarded-for: {xff}")],
        )
        .0
    };
    assert_eq!(from("203.0.113.7"), 200);
    let topology =
        |n: u32| format!("defaultConfig:\n  gatewayTopology:\n    numTrustedProxies: {n}\n");
    // One trusted proxy: the entry it appended (the rightmost) is the client.
    apply(&edge.mesh, &edge.dir, "mesh1.yaml", &topology(1), true);
    wait_for(SETTLE, || match from("203.0.113.7") {
        403 => Ok(()),
        s => Err(format!("one trusted hop, client 203.0.113.7: {s}")),
    });
    // A spoofed entry left of the trusted proxy's changes nothing.
    assert_eq!(from("203.0.113.7, 198.51.100.1"), 200);
    // Fewer entries than trusted hops: the connection's address.
    assert_eq!(from(""), 200);
    // Two trusted proxies: the second entry from the right.
    apply(&edge.mesh, &edge.dir, "mesh2.yaml", &topology(2), true);
    wait_for(SETTLE, || match from("203.0.113.7, 198.51.100.1") {
        403 => Ok(()),
        s => Err(format!("two trusted hops: {s}")),
    });
    assert_eq!(from("198.51.100.1, 203.0.113.7"), 200);
    assert_eq!(from("203.0.113.7, 198.51.100.1, 198.51.100.2"), 200);
}

#[test]
fn a_certificate_rewritten_during_traffic_is_served_without_a_failed_request() {
    let edge = Edge::start("gateway-reload");
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        let ca = edge.outside.cert.clone();
        let port = edge.https.port();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                // A new connection (and handshake) per request.
                let out = output(
                    Command::new("curl")
                        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
                        .args(["--cacert", ca.to_str().unwrap()])
                        .args(["--resolve", &format!("bookinfo.example:{port}:127.0.0.1")])
                        .arg(format!("https://bookinfo.example:{port}/exact")),
                );
                if String::from_utf8_lossy(&out.stdout) != "200" {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    wait_until(SETTLE, "traffic flows", || done.load(Ordering::SeqCst) >= 5);
    // Rewritten in place, certificate first: for a moment the key does
    // not match, which must leave the old pair in force.
    edge.outside
        .write(&edge.creds, "bookinfo", "bookinfo-2", &["bookinfo.example"]);
    wait_for(SETTLE, || {
        let (_, text) = edge.s_client(&["-servername", "bookinfo.example"]);
        if text.contains("CN = bookinfo-2") {
            Ok(())
        } else {
            Err("the new certificate is not served yet".to_string())
        }
    });
    let after = done.load(Ordering::SeqCst);
    wait_until(SETTLE, "traffic flows on", || {
        done.load(Ordering::SeqCst) >= after + 5
    });
    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "{} requests{}",
        done.load(Ordering::SeqCst),
        edge.gateway.logs.dump()
    );
    edge.gateway
        .logs
        .wait_for_stderr("gateway certificate reloaded", SETTLE);
}

#[test]
fn retries_reach_another_endpoint_and_failures_answer_404_and_503() {
    let edge = Edge::start("gateway-retries");
    // Round robin over a broken endpoint (503) and a good one: without
    // retries every other request fails; with `retryOn: 503` none does.
    let statuses = |path: &str| -> Vec<u16> {
        (0..10)
            .map(|_| edge.get("bookinfo.example", path, &[]).0)
            .collect()
    };
    let plain = statuses("/flaky");
    assert_eq!(plain.iter().filter(|s| **s == 503).count(), 5, "{plain:?}");
    let retried = statuses("/flaky-retried");
    assert!(retried.iter().all(|s| *s == 200), "{retried:?}");

    // Unknown host, and no route for a known one: 404.
    let plain_port = |host: &str, path: &str| edge.curl(host, edge.http, "http", path, &[]).0;
    assert_eq!(plain_port("unknown.example", "/only"), 404);
    assert_eq!(plain_port("plain.example", "/elsewhere"), 404);
    assert_eq!(plain_port("plain.example", "/only"), 200);
    // A service without endpoints, and one the registry does not have: 503.
    assert_eq!(edge.get("bookinfo.example", "/empty", &[]).0, 503);
    assert_eq!(edge.get("bookinfo.example", "/unknown", &[]).0, 503);
    edge.gateway
        .logs
        .wait_for_stdout("\"reason\":\"no server for this host\"", SETTLE);
}

/// `meshward up` on examples/bookinfo with its gateway (on a port of the
/// test's own): the gateway is published on 127.0.0.1 and listed in
/// `up.json`, with the CA of the certificate `up` made, and the tour's
/// step works from the machine: 403 without a token, productpage's answer
/// with one (called over mutual TLS as the gateway), 401 expired.
#[test]
fn up_publishes_the_bookinfo_gateway_with_a_certificate_it_made() {
    up_bookinfo_gateway("gateway-up", &["--explicit"], "explicit");
}

/// The same in namespaced mode (as root): the gateway runs in the lab and
/// is published through a relay on 127.0.0.1; nothing from the machine's
/// namespace connects into the lab.
#[test]
fn up_publishes_the_bookinfo_gateway_from_the_lab() {
    common::netns::require_root!();
    up_bookinfo_gateway("gateway-up-ns", &[], "namespaced");
}

fn up_bookinfo_gateway(name: &str, extra: &[&str], mode: &str) {
    let root = tempdir(name);
    let dir = root.join("bookinfo");
    std::fs::create_dir_all(&dir).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
    for file in ["workloads.yaml", "policies.yaml"] {
        std::fs::copy(example.join(file), dir.join(file)).unwrap();
    }
    let port = free_port();
    let gateway = std::fs::read_to_string(example.join("gateway.yaml"))
        .unwrap()
        .replace("number: 443", &format!("number: {port}"));
    std::fs::write(dir.join("gateway.yaml"), gateway).unwrap();
    let data = root.join("data");
    let mut up = spawn(
        "meshward up",
        meshward()
            .args(["up", dir.to_str().unwrap(), "--data-dir"])
            .arg(&data)
            .args(extra),
    );
    let up_json = data.join("up.json");
    let text = wait_for(START, || {
        up.assert_running();
        std::fs::read_to_string(&up_json).map_err(|e| format!("{}: {e}", up_json.display()))
    });
    let mesh: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(mesh["mode"], mode, "{mesh}");
    let published = &mesh["gateways"][0];
    assert_eq!(published["port"], port, "{mesh}");
    assert_eq!(published["hosts"][0], "bookinfo.example", "{mesh}");
    assert_eq!(
        published["url"],
        format!("https://127.0.0.1:{port}"),
        "{mesh}"
    );
    let ca = mesh["gateway_ca"].as_str().unwrap().to_owned();
    assert!(Path::new(&ca).starts_with(&data), "{ca}");

    let get = |token: Option<&str>| -> (u16, String) {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
            .args(["--cacert", &ca])
            .args(["--resolve", &format!("bookinfo.example:{port}:127.0.0.1")]);
        if let Some(file) = token {
            let jwt = std::fs::read_to_string(example.join(file)).unwrap();
            command.args(["-H", &format!("authorization: Bearer {}", jwt.trim())]);
        }
        let out = output(command.arg(format!("https://bookinfo.example:{port}/productpage")));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    };
    let (status, body) = get(Some("alice.jwt"));
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["name"], "productpage", "{seen}");
    assert!(
        seen["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap()
            .ends_with(
                "URI=spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
            ),
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-jwt-sub"], "alice", "{seen}");
    assert_eq!(get(None), (403, "RBAC: access denied".into()));
    assert_eq!(get(Some("expired.jwt")), (401, "Jwt is expired".into()));
}
