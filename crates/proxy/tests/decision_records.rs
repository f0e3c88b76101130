//! Access records keep the facts a decision needs, and only those: a
//! proxy's own log, read back and decided again under the same policies
//! (`meshward_policy::learn::replay`), changes nothing; under other
//! policies, it says what would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshward_policy::learn::{Records, replay};
use meshward_policy::{PolicySet, load};
use meshward_proxy::facts::FactSettings;
use meshward_proxy::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: web}
spec:
  jwtRules:
  - issuer: "https://issuer.test"
    jwks: |
      JWKS
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: web}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/sleep/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/public/*"]}}]
    when: [{key: "request.auth.claims[groups]", values: ["dev"]}]
  - to: [{operation: {paths: ["/tenant"]}}]
    when: [{key: "request.headers[x-tenant]", values: ["a"]}]
"#;

fn policies() -> String {
    let jwks = std::fs::read_to_string("../policy/tests/keys/jwks.json").unwrap();
    POLICIES.replace("JWKS", jwks.trim())
}

fn token(groups: &[&str]) -> String {
    let key = std::fs::read("../policy/tests/keys/rsa.pem").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let claims = serde_json::json!({
        "iss": "https://issuer.test", "sub": "alice", "aud": "web",
        "groups": groups, "secret": "not-for-logs", "exp": now + 600
    });
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&key).unwrap();
    format!(
        "Bearer {}",
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    )
}

fn set(yaml: &str) -> PolicySet {
    let loaded = load::load_str("policies.yaml", yaml);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    PolicySet::new(Default::default(), loaded.into_policies())
}

fn records(proxy: &TestProxy) -> Records {
    let text = std::fs::read_to_string(proxy.dir.path().join("access.log")).unwrap();
    let mut records = Records::default();
    records.read("access.log", text.as_bytes()).unwrap();
    assert_eq!(records.unreadable_count, 0, "{:?}", records.unreadable);
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_records_keep_the_facts_and_replay_to_the_same_decisions() {
    let ca = Ca::new();
    let policies = policies();
    let app = echo_app("web").await;
    let facts = FactSettings::new(Some("web/web-1"), &["X-Tenant".to_owned()]).unwrap();
    let server = start_proxy_with(
        ProxySpec {
            identity: ca.identity(&id("web", "web")),
            namespace: "web",
            labels: &[("app", "web")],
            inbound: vec![format!("0={app},protocol=http")],
            upstreams: vec![],
            policies: &policies,
            mesh_config: None,
        },
        facts,
    )
    .await;
    let client = start_proxy(ProxySpec {
        identity: ca.identity(&id("sleep", "sleep")),
        namespace: "sleep",
        labels: &[],
        inbound: vec![],
        upstreams: vec![format!(
            "web.web:80=127.0.0.1:0,endpoint={},identity=spiffe://cluster.local/ns/web/sa/web,protocol=http",
            server.inbound[0]
        )],
        policies: "",
        mesh_config: None,
    })
    .await;
    let out = client.outbound[0];
    let dev = token(&["dev"]);
    let ops = token(&["ops"]);
    // (path, headers, status)
    type Call<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);
    let calls: [Call; 5] = [
        ("/public/a?q=1", vec![("authorization", &dev)], 200),
        ("/public/x/../b", vec![("authorization", &dev)], 200),
        ("/public/a", vec![("authorization", &ops)], 403),
        (
            "/tenant",
            vec![("x-tenant", "a"), ("cookie", "s=secret")],
            200,
        ),
        ("/tenant", vec![("x-tenant", "b")], 403),
    ];
    for (path, headers, want) in &calls {
        let (status, body, _) = get(out, path, headers).await.unwrap();
        assert_eq!(status, *want, "{path}: {body}");
    }
    eventually("every decision is logged", || {
        server.access_log().len() >= calls.len()
    })
    .await;
    let log = server.access_log();
    let first = &log[0];
    assert_eq!(first["v"], 1);
    assert_eq!(
        first["workload"],
        serde_json::json!({"namespace": "web", "name": "web-1", "labels": {"app": "web"}})
    );
    assert_eq!(first["destination_port"], server.inbound[0].port());
    assert_eq!(first["destination_ip"], "127.0.0.1");
    assert_eq!(first["path"], "/public/a");
    assert_eq!(
        first["request_auth"],
        serde_json::json!({"issuer": "https://issuer.test", "subject": "alice",
            "audiences": ["web"], "claims": [{"path": ["groups"], "values": ["dev"]}]})
    );
    assert_eq!(first["headers"], serde_json::json!({"x-tenant": null}));
    assert_eq!(log[1]["original_path"], "/public/x/../b");
    assert_eq!(log[1]["path"], "/public/b");
    assert_eq!(log[3]["headers"], serde_json::json!({"x-tenant": "a"}));
    let text = std::fs::read_to_string(server.dir.path().join("access.log")).unwrap();
    for secret in [&dev[7..], "not-for-logs", "s=secret"] {
        assert!(!text.contains(secret), "{secret} was logged");
    }

    let records = records(&server);
    assert_eq!(records.records.len(), calls.len());
    let same = replay(&set(&policies), &records.records);
    assert_eq!(
        (same.unchanged, same.records),
        (calls.len() as u64, calls.len() as u64),
        "{}",
        same.text()
    );

    // Without the claim rule, the two dev requests would be denied.
    let narrower = policies.replace(
        r#"when: [{key: "request.auth.claims[groups]", values: ["dev"]}]"#,
        r#"when: [{key: "request.auth.claims[groups]", values: ["admin"]}]"#,
    );
    let changed = replay(&set(&narrower), &records.records);
    assert_eq!(changed.allowed_to_denied, 2, "{}", changed.text());
    assert!(changed.breaks());
    let group = &changed.groups[0];
    assert_eq!(
        (group.workload.as_str(), group.decided_by.as_str()),
        ("web/web-1", "no ALLOW rule matched")
    );
    // A claim no policy read when logged cannot be decided.
    let other_claim = policies.replace("claims[groups]", "claims[team]");
    let unknown = replay(&set(&other_claim), &records.records);
    assert_eq!(unknown.undecidable, 3, "{}", unknown.text());
    assert!(
        unknown.groups[0]
            .decided_by
            .contains("request.auth.claims[team]"),
        "{}",
        unknown.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_refused_connections_keep_their_facts() {
    let ca = Ca::new();
    let app = tcp_echo().await;
    let strict = STRICT_NS.to_owned()
        + r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: web}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["sleep"]}}]}]
"#;
    let server = start_proxy(ProxySpec {
        identity: ca.identity(&id("web", "web")),
        namespace: "web",
        labels: &[("app", "db")],
        inbound: vec![format!("0={app},protocol=tcp")],
        upstreams: vec![],
        policies: &strict,
        mesh_config: None,
    })
    .await;
    let client = start_proxy(ProxySpec {
        identity: ca.identity(&id("other", "client")),
        namespace: "other",
        labels: &[],
        inbound: vec![],
        upstreams: vec![format!(
            "db.web:5432=127.0.0.1:0,endpoint={},identity=spiffe://cluster.local/ns/web/sa/web,protocol=tcp",
            server.inbound[0]
        )],
        policies: "",
        mesh_config: None,
    })
    .await;
    // Allowed over mutual TLS, then plaintext refused by STRICT.
    let mut allowed = tokio::net::TcpStream::connect(client.outbound[0])
        .await
        .unwrap();
    allowed.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    allowed.read_exact(&mut buf).await.unwrap();
    drop(allowed);
    let mut plain = tokio::net::TcpStream::connect(server.inbound[0])
        .await
        .unwrap();
    let _ = plain.write_all(b"hello").await;
    let _ = plain.read(&mut buf).await;
    eventually("both connections are logged", || {
        server.access_log().len() >= 2
    })
    .await;
    let records = records(&server);
    let refused = records
        .records
        .iter()
        .find(|r| r.source_principal.is_none())
        .unwrap();
    assert_eq!(
        refused.workload.as_ref().unwrap().to_string(),
        "web/{app=db}"
    );
    assert_eq!(refused.destination_port, Some(server.inbound[0].port()));
    assert!(!refused.allowed());

    let same = replay(&set(&strict), &records.records);
    assert_eq!(same.unchanged, 2, "{}", same.text());
    // Denying namespace `other`: the allowed connection breaks.
    let deny_other = strict.replace(r#"namespaces: ["sleep"]"#, r#"namespaces: ["other"]"#);
    let denied = replay(&set(&deny_other), &records.records);
    assert_eq!(denied.allowed_to_denied, 1, "{}", denied.text());
    assert_eq!(denied.groups[0].decided_by, "web/deny-sleep rule 0");
    // PERMISSIVE would accept the plaintext connection: what it would have
    // sent is unknown.
    let permissive = strict.replace("STRICT", "PERMISSIVE");
    let open = replay(&set(&permissive), &records.records);
    assert_eq!(open.undecidable, 1, "{}", open.text());
}
