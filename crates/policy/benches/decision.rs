//! Decision time per request as the number of applicable policies grows, and
//! JWT verification time.
//!
//! `indexed`: policies whose rules name exact paths or principals, the common
//! shape, which the authorizer looks up instead of scanning.
//! `scanned`: policies whose rules use only prefix matches, which no index can
//! serve: every rule is evaluated (the worst case, shown for honesty).
//! Each measurement runs the whole inbound pipeline (mTLS mode, request
//! authentication, authorization), as the proxy does per request.

// A test that cannot set itself up should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshward_policy::api::MeshConfig;
use meshward_policy::authn::{Authenticator, JwksCache};
use meshward_policy::authz::CustomVerdict;
use meshward_policy::{Connection, HttpRequest, PolicySet, Workload, load};

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

fn policies(n: usize, indexed: bool) -> String {
    let mut yaml = String::new();
    for i in 0..n {
        let (principal, path) = if indexed {
            (
                format!("\"cluster.local/ns/ns{i}/sa/sa{i}\""),
                format!("\"/api/v1/resource{i}\""),
            )
        } else {
            (
                format!("\"cluster.local/ns/ns{i}/*\""),
                format!("\"/api/v1/resource{i}/*\""),
            )
        };
        let action = if i % 10 == 9 { "DENY" } else { "ALLOW" };
        yaml.push_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i:05}, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: {action}\n  rules:\n  - from:\n    - source: {{principals: [{principal}]}}\n    to:\n    - operation: {{methods: [\"GET\"], paths: [{path}]}}\n---\n"
        ));
    }
    yaml
}

fn decision(c: &mut Criterion) {
    let workload = Workload {
        namespace: "bench".into(),
        labels: BTreeMap::from([("app".to_owned(), "api".to_owned())]),
    };
    let mut group = c.benchmark_group("decision");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for indexed in [true, false] {
        for n in SIZES {
            let loaded = load::load_str("bench.yaml", &policies(n, indexed));
            assert!(!loaded.has_errors(), "benchmark policies are valid");
            let set = PolicySet::new(MeshConfig::default(), loaded.into_policies());
            let compiled = set.for_workload(&workload);
            // The request the last ALLOW policy allows: a scan sees every rule first.
            let last = (0..n).rev().find(|i| i % 10 != 9).unwrap_or(0);
            let connection = Connection {
                source_ip: Some([10, 0, 0, 1].into()),
                source_principal: Some(format!("spiffe://cluster.local/ns/ns{last}/sa/sa{last}")),
                destination_port: 8080,
                ..Connection::default()
            };
            let path = if indexed {
                format!("/api/v1/resource{last}")
            } else {
                format!("/api/v1/resource{last}/x")
            };
            let request = HttpRequest {
                method: "GET".into(),
                path: format!("{path}?q=1"),
                host: "api.bench:8080".into(),
                headers: vec![("user-agent".into(), "bench".into())],
                remote_ip: None,
            };
            let check = compiled.check(&connection, Some(&request), |_| {
                CustomVerdict::Error("none".into())
            });
            assert!(
                check.allowed(),
                "benchmark request is allowed: {}",
                check.reason(&compiled, &connection, Some(&request))
            );
            let label = if indexed { "indexed" } else { "scanned" };
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| {
                    black_box(compiled.check(
                        black_box(&connection),
                        Some(black_box(&request)),
                        |_| CustomVerdict::Allow,
                    ))
                })
            });
        }
    }
    group.finish();
}

fn jwt(c: &mut Criterion) {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/");
    let read = |f: &str| std::fs::read(format!("{keys}{f}")).unwrap_or_default();
    let jwks = String::from_utf8(read("jwks.json")).unwrap_or_default();
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: bench}}\nspec:\n  jwtRules:\n  - issuer: bench\n    audiences: [api]\n    jwks: '{jwks}'\n"
    );
    let loaded = load::load_str("jwt.yaml", &yaml);
    let policies: Vec<_> = loaded
        .into_policies()
        .into_iter()
        .filter_map(|p| match p {
            meshward_policy::api::Policy::RequestAuthentication(ra) => Some(ra),
            _ => None,
        })
        .collect();
    let authenticator = Authenticator::new(
        &policies.iter().collect::<Vec<_>>(),
        Arc::new(JwksCache::default()),
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims =
        serde_json::json!({"iss": "bench", "sub": "alice", "aud": "api", "exp": now + 3600});
    let mut group = c.benchmark_group("jwt");
    for (alg, key, kid) in [
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&read("rsa.pem")),
            "rsa-1",
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&read("ec.pem")),
            "ec-1",
        ),
    ] {
        let Ok(key) = key else {
            panic!("benchmark key loads")
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap_or_default();
        let request = HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            host: "api".into(),
            headers: vec![("authorization".into(), format!("Bearer {token}"))],
            remote_ip: None,
        };
        assert!(matches!(
            authenticator.authenticate(&request),
            meshward_policy::authn::AuthnOutcome::Authenticated { .. }
        ));
        group.bench_function(format!("{alg:?}"), |b| {
            b.iter(|| black_box(authenticator.authenticate(black_box(&request))))
        });
    }
    group.finish();
}

criterion_group!(benches, decision, jwt);
criterion_main!(benches);
