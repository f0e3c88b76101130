//! Properties that must hold for any input: loading and deciding never
//! panic, and the same request always gets the same decision.

// A test that cannot set itself up should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshward_policy::api::{
    Action, AuthorizationPolicy, Condition, JwtHeader, JwtRule, MeshConfig, MtlsMode, ObjectMeta,
    Operation, PeerAuthentication, PeerAuthenticationMtls, PeerAuthenticationSpec, Policy,
    RequestAuthentication, RequestAuthenticationSpec, Rule, RuleFrom, RuleTo, Source,
    WorkloadSelector,
};
use meshward_policy::authz::normalize::normalize;
use meshward_policy::authz::path_template::PathTemplate;
use meshward_policy::check::{
    CheckInput, Checker, DestinationInput, HttpInput, OneOrMany, SourceInput,
};
use meshward_policy::{PolicySet, Workload, load};
use proptest::prelude::*;

/// Values that exercise every match form and the identity shapes.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_owned()),
        Just("".to_owned()),
        Just("cluster.local/ns/foo/sa/bar".to_owned()),
        Just("*/ns/foo/sa/*".to_owned()),
        Just("foo".to_owned()),
        Just("/api/{*}".to_owned()),
        Just("/api/{**}".to_owned()),
        Just("10.0.0.0/8".to_owned()),
        Just("8080".to_owned()),
        Just("GET".to_owned()),
        "[a-z/*.:{}0-9-]{0,12}",
        "\\PC{0,8}",
    ]
}

fn values() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(value(), 0..3)
}

fn source() -> impl Strategy<Value = Source> {
    (
        values(),
        values(),
        values(),
        values(),
        values(),
        values(),
        values(),
    )
        .prop_map(|(a, b, c, d, e, f, g)| Source {
            principals: a,
            not_principals: b,
            request_principals: c,
            namespaces: d,
            not_namespaces: e,
            ip_blocks: f,
            remote_ip_blocks: g,
            ..Source::default()
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    (values(), values(), values(), values(), values()).prop_map(|(a, b, c, d, e)| Operation {
        hosts: a,
        ports: b,
        methods: c,
        paths: d,
        not_paths: e,
        ..Operation::default()
    })
}

fn condition() -> impl Strategy<Value = Condition> {
    (
        prop_oneof![
            Just("request.headers[x-a]".to_owned()),
            Just("source.ip".to_owned()),
            Just("source.namespace".to_owned()),
            Just("request.auth.claims[g][h]".to_owned()),
            Just("destination.port".to_owned()),
            Just("connection.sni".to_owned()),
            "[a-z.\\[\\]]{0,20}",
        ],
        values(),
        values(),
    )
        .prop_map(|(key, values, not_values)| Condition {
            key,
            values,
            not_values,
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(prop::option::of(source()), 0..2),
        prop::collection::vec(prop::option::of(operation()), 0..2),
        prop::collection::vec(condition(), 0..2),
    )
        .prop_map(|(from, to, when)| Rule {
            from: from.into_iter().map(|source| RuleFrom { source }).collect(),
            to: to
                .into_iter()
                .map(|operation| RuleTo { operation })
                .collect(),
            when,
        })
}

/// Label sets for workloads and selectors: empty, matching, and not.
fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop_oneof![Just("app".to_owned()), Just("version".to_owned())],
        prop_oneof![
            Just("web".to_owned()),
            Just("v1".to_owned()),
            Just("v2".to_owned())
        ],
        0..3,
    )
}

fn selector() -> impl Strategy<Value = Option<WorkloadSelector>> {
    prop::option::of(labels().prop_map(|match_labels| WorkloadSelector { match_labels }))
}

fn namespace() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("foo"), Just("istio-system"), Just("bar")]
}

fn meta(name: String, ns: &str, dry_run: bool, age: i64) -> ObjectMeta {
    let mut annotations = BTreeMap::new();
    if dry_run {
        annotations.insert("istio.io/dry-run".to_owned(), "true".to_owned());
    }
    ObjectMeta {
        name,
        namespace: Some(ns.into()),
        annotations,
        creation_timestamp: jiff::Timestamp::from_second(1_700_000_000 + age).ok(),
        ..ObjectMeta::default()
    }
}

fn authorization_policy(i: usize) -> impl Strategy<Value = Policy> {
    (
        prop::collection::vec(rule(), 0..3),
        prop_oneof![
            Just(Action::Allow),
            Just(Action::Deny),
            Just(Action::Audit),
            Just(Action::Custom)
        ],
        any::<bool>(),
        namespace(),
        selector(),
    )
        .prop_map(move |(rules, action, dry_run, ns, selector)| {
            let mut spec = meshward_policy::api::authorization_spec(rules, action);
            spec.selector = selector;
            Policy::AuthorizationPolicy(AuthorizationPolicy {
                api_version: "security.istio.io/v1".into(),
                kind: "AuthorizationPolicy".into(),
                metadata: meta(format!("ap{i}"), ns, dry_run, i as i64),
                spec,
                status: None,
            })
        })
}

fn mtls_mode() -> impl Strategy<Value = MtlsMode> {
    prop_oneof![
        Just(MtlsMode::Unset),
        Just(MtlsMode::Disable),
        Just(MtlsMode::Permissive),
        Just(MtlsMode::Strict)
    ]
}

fn peer_authentication(i: usize) -> impl Strategy<Value = Policy> {
    (
        namespace(),
        selector(),
        prop::option::of(mtls_mode()),
        // Absent, empty (which validation refuses) and set.
        prop::option::of(prop::collection::btree_map(
            prop_oneof![
                Just("8080".to_owned()),
                Just("9090".to_owned()),
                "[0-9a-z]{0,5}"
            ],
            mtls_mode(),
            0..2,
        )),
        // Creation order decides conflicts: equal timestamps too.
        0i64..3,
    )
        .prop_map(move |(ns, selector, mode, ports, age)| {
            Policy::PeerAuthentication(PeerAuthentication {
                api_version: "security.istio.io/v1".into(),
                kind: "PeerAuthentication".into(),
                metadata: meta(format!("pa{i}"), ns, false, age),
                spec: PeerAuthenticationSpec {
                    selector,
                    mtls: mode.map(|mode| PeerAuthenticationMtls { mode }),
                    port_level_mtls: ports.map(|ports| {
                        ports
                            .into_iter()
                            .map(|(port, mode)| (port, PeerAuthenticationMtls { mode }))
                            .collect()
                    }),
                },
                status: None,
            })
        })
}

/// The issuers tokens are minted for, and one nobody mints for.
const ISSUERS: [&str; 3] = [
    "https://a.example",
    "https://b.example",
    "https://c.example",
];

fn request_authentication(i: usize) -> impl Strategy<Value = Policy> {
    let rule = (
        prop::sample::select(&ISSUERS[..]),
        prop::collection::vec(prop_oneof![Just("svc".to_owned()), "[a-z]{0,3}"], 0..2),
        prop::option::of(prop_oneof![
            Just(("x-jwt".to_owned(), String::new())),
            Just(("authorization".to_owned(), "Bearer ".to_owned()))
        ]),
        prop::collection::vec(prop_oneof![Just("token".to_owned()), "[a-z_]{0,6}"], 0..2),
        any::<bool>(),
    )
        .prop_map(
            |(issuer, audiences, header, from_params, forward)| JwtRule {
                issuer: issuer.into(),
                audiences,
                jwks: JWKS.clone(),
                from_headers: header
                    .into_iter()
                    .map(|(name, prefix)| JwtHeader { name, prefix })
                    .collect(),
                from_params,
                forward_original_token: forward,
                output_payload_to_header: "x-payload".into(),
                ..JwtRule::default()
            },
        );
    (namespace(), selector(), prop::collection::vec(rule, 0..3)).prop_map(
        move |(ns, selector, jwt_rules)| {
            Policy::RequestAuthentication(RequestAuthentication {
                api_version: "security.istio.io/v1".into(),
                kind: "RequestAuthentication".into(),
                metadata: meta(format!("ra{i}"), ns, false, 0),
                spec: RequestAuthenticationSpec {
                    selector,
                    jwt_rules,
                    ..RequestAuthenticationSpec::default()
                },
                status: None,
            })
        },
    )
}

fn policy(i: usize) -> impl Strategy<Value = Policy> {
    prop_oneof![
        3 => authorization_policy(i),
        1 => peer_authentication(i),
        1 => request_authentication(i),
    ]
}

static JWKS: LazyLock<String> = LazyLock::new(|| include_str!("keys/jwks.json").to_owned());

/// Tokens signed with the test RSA key (`kid: rsa-1`), one per issuer
/// (the first two with audience `svc`), plus an expired one.
static TOKENS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let key = EncodingKey::from_rsa_pem(include_bytes!("keys/rsa.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let far = 4_000_000_000u64;
    let claims = [
        serde_json::json!({"iss": ISSUERS[0], "sub": "alice", "aud": "svc", "exp": far, "groups": ["g"]}),
        serde_json::json!({"iss": ISSUERS[1], "sub": "bob", "aud": "svc", "exp": far}),
        serde_json::json!({"iss": ISSUERS[2], "sub": "carol", "exp": far}),
        serde_json::json!({"iss": ISSUERS[0], "sub": "old", "exp": 1}),
    ];
    claims
        .iter()
        .map(|c| jsonwebtoken::encode(&header, c, &key).unwrap())
        .collect()
});

/// Where a token goes, and which: none, minted ones, and garbage.
fn token_headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let token = prop_oneof![
        (0..4usize).prop_map(|i| TOKENS[i].clone()),
        "[A-Za-z0-9_.-]{0,24}",
    ];
    let placed = (
        prop_oneof![
            Just(("authorization".to_owned(), "Bearer ".to_owned())),
            Just(("x-jwt".to_owned(), String::new())),
            Just(("x-payload".to_owned(), String::new())),
        ],
        token,
    )
        .prop_map(|((name, prefix), token)| (name, format!("{prefix}{token}")));
    prop::collection::vec(placed, 0..3)
}

fn request() -> impl Strategy<Value = CheckInput> {
    (
        prop::option::of(prop_oneof![
            Just("spiffe://cluster.local/ns/foo/sa/bar".to_owned()),
            Just("spiffe://other/ns/x/sa/y".to_owned()),
            "[a-z:/]{0,20}",
        ]),
        prop::option::of((
            prop_oneof![
                Just("GET".to_owned()),
                Just("POST".to_owned()),
                "[A-Za-z]{0,6}"
            ],
            "(/[a-z%.\\\\{}?#]{0,6}){0,4}",
            "[a-zA-Z.:0-9]{0,12}",
            prop::collection::btree_map("[a-z-]{1,5}", "[ -~]{0,8}", 0..3),
            token_headers(),
            prop::option::of(prop_oneof![
                (0..4usize).prop_map(|i| format!("?token={}", TOKENS[i])),
                Just("?token=x".to_owned()),
            ]),
        )),
        prop_oneof![Just(8080u16), Just(9090), any::<u16>()],
        prop_oneof![Just("foo"), Just("bar")],
        labels(),
    )
        .prop_map(|(principal, http, port, ns, labels)| CheckInput {
            workload: Workload {
                namespace: ns.into(),
                labels,
            },
            port,
            source: SourceInput {
                ip: Some([10, 0, 0, 1].into()),
                principal,
            },
            destination: DestinationInput::default(),
            sni: None,
            http: http.map(|(method, path, host, headers, tokens, query)| {
                let mut all: BTreeMap<String, OneOrMany> = headers
                    .into_iter()
                    .map(|(k, v)| (k, OneOrMany::One(v)))
                    .collect();
                for (name, value) in tokens {
                    match all.remove(&name) {
                        None => all.insert(name, OneOrMany::One(value)),
                        Some(OneOrMany::One(first)) => {
                            all.insert(name, OneOrMany::Many(vec![first, value]))
                        }
                        Some(OneOrMany::Many(mut many)) => {
                            many.push(value);
                            all.insert(name, OneOrMany::Many(many))
                        }
                    };
                }
                HttpInput {
                    method,
                    path: format!("{path}{}", query.unwrap_or_default()),
                    host,
                    headers: all,
                    remote_ip: None,
                }
            }),
            ext_authz: BTreeMap::new(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn loading_any_text_never_panics(text in "\\PC{0,400}") {
        let _ = load::load_str("fuzz.yaml", &text);
        let _ = load::load_mesh_config("mesh.yaml", &text);
    }

    #[test]
    fn loading_policy_shaped_yaml_never_panics(
        kind in prop_oneof![Just("AuthorizationPolicy".to_owned()), Just("PeerAuthentication".to_owned()), Just("RequestAuthentication".to_owned()), "[A-Za-z]{0,8}"],
        body in "(  [a-zA-Z]{1,10}: (\\[\\]|\\{\\}|[a-z0-9*/\"-]{0,8}|\\n    - [a-z*]{0,5})\\n){0,6}",
    ) {
        let text = format!("apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: x\nspec:\n{body}---\n{body}");
        let _ = load::load_str("fuzz.yaml", &text);
    }

    #[test]
    fn normalization_is_idempotent_and_leaves_no_dot_segments(path in "\\PC{0,40}|(/([a-z.]{0,3}|%2[eEfF]|%5[cC]|\\\\)){0,6}") {
        for mode in [
            meshward_policy::api::PathNormalizationMode::None,
            meshward_policy::api::PathNormalizationMode::Base,
            meshward_policy::api::PathNormalizationMode::MergeSlashes,
            meshward_policy::api::PathNormalizationMode::DecodeAndMergeSlashes,
        ] {
            let once = normalize(&path, mode);
            prop_assert!(!once.contains('?'), "{mode:?}: {once:?}");
            let twice = normalize(&once, mode);
            prop_assert_eq!(&once, &twice, "{:?} is not idempotent", mode);
            if mode != meshward_policy::api::PathNormalizationMode::None {
                prop_assert!(
                    !once.split('/').any(|seg| seg == ".." || seg == "."),
                    "{mode:?} left a dot segment in {once:?} (from {path:?})"
                );
            }
        }
    }

    #[test]
    fn any_template_text_parses_or_is_refused_without_panic(template in "(/(\\{\\*\\}|\\{\\*\\*\\}|[a-z*{}]{0,3})){0,4}", path in "\\PC{0,40}") {
        if let Ok(t) = PathTemplate::parse(&template) {
            let _ = t.matches(&path);
        }
    }

    #[test]
    fn a_template_matches_every_path_it_describes(
        parts in prop::collection::vec(
            prop_oneof![Just(None), Just(Some(String::new())), "[a-z0-9]{1,4}".prop_map(Some)],
            1..5,
        ),
        many in prop::option::of(prop::collection::vec("[a-z0-9]{1,4}", 1..4)),
        fills in prop::collection::vec("[a-z0-9-]{1,4}", 5),
    ) {
        // A valid template: literal segments and `{*}` (None), with `{**}`
        // last when present. A path built by putting a segment in place of
        // each `{*}` and one or more segments in place of `{**}` matches.
        let parts: Vec<Option<String>> = parts
            .into_iter()
            .map(|p| p.filter(|s| !s.is_empty()))
            .collect();
        let mut template = String::new();
        let mut path = String::new();
        for (i, part) in parts.iter().enumerate() {
            match part {
                Some(lit) => {
                    template.push_str(&format!("/{lit}"));
                    path.push_str(&format!("/{lit}"));
                }
                None => {
                    template.push_str("/{*}");
                    path.push_str(&format!("/{}", fills[i]));
                }
            }
        }
        if let Some(segments) = &many {
            template.push_str("/{**}");
            path.push_str(&format!("/{}", segments.join("/")));
        }
        let t = PathTemplate::parse(&template);
        prop_assert!(t.is_ok(), "{template:?}: {t:?}");
        let t = t.unwrap();
        prop_assert!(t.matches(&path), "{template} should match {path}");
        // One segment more than the template allows never matches unless
        // the template ends in `{**}`.
        if many.is_none() {
            let longer = format!("{path}/extra");
            prop_assert!(!t.matches(&longer), "{template} should not match {longer}");
        }
    }

    #[test]
    fn decisions_never_panic_and_are_deterministic(
        policies in (0usize..8).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>()),
        requests in prop::collection::vec(request(), 1..6),
    ) {
        // Arbitrary policies include invalid ones: the engine must cope with
        // whatever is handed to it, not only with what validation lets
        // through. Two sets built from the same policies, and two checkers,
        // must agree on every request, field for field.
        let a_set = PolicySet::new(MeshConfig::default(), policies.clone());
        let b_set = PolicySet::new(MeshConfig::default(), policies);
        let mut first = Checker::default();
        let mut second = Checker::default();
        for req in &requests {
            let a = serde_json::to_value(first.check(&a_set, req)).unwrap();
            let b = serde_json::to_value(second.check(&b_set, req)).unwrap();
            prop_assert_eq!(a, b);
        }
    }
}
