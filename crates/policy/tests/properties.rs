//! Properties that must hold for any input: loading and deciding never
//! panic, and the same request always gets the same decision.

// A test that cannot set itself up should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use meshward_policy::api::{
    Action, AuthorizationPolicy, Condition, MeshConfig, ObjectMeta, Operation, Policy, Rule,
    RuleFrom, RuleTo, Source,
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

fn policy(i: usize) -> impl Strategy<Value = AuthorizationPolicy> {
    (
        prop::collection::vec(rule(), 0..3),
        prop_oneof![
            Just(Action::Allow),
            Just(Action::Deny),
            Just(Action::Audit),
            Just(Action::Custom)
        ],
        any::<bool>(),
        prop_oneof![Just("foo"), Just("istio-system"), Just("bar")],
    )
        .prop_map(move |(rules, action, dry_run, ns)| {
            let mut annotations = BTreeMap::new();
            if dry_run {
                annotations.insert("istio.io/dry-run".to_owned(), "true".to_owned());
            }
            AuthorizationPolicy {
                api_version: "security.istio.io/v1".into(),
                kind: "AuthorizationPolicy".into(),
                metadata: ObjectMeta {
                    name: format!("p{i}"),
                    namespace: Some(ns.into()),
                    annotations,
                    ..ObjectMeta::default()
                },
                spec: meshward_policy::api::authorization_spec(rules, action),
                status: None,
            }
        })
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
        )),
        any::<u16>(),
    )
        .prop_map(|(principal, http, port)| CheckInput {
            workload: Workload {
                namespace: "foo".into(),
                labels: BTreeMap::new(),
            },
            port,
            source: SourceInput {
                ip: Some([10, 0, 0, 1].into()),
                principal,
            },
            destination: DestinationInput::default(),
            sni: None,
            http: http.map(|(method, path, host, headers)| HttpInput {
                method,
                path,
                host,
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (k, OneOrMany::One(v)))
                    .collect(),
                remote_ip: None,
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
    fn normalization_and_templates_never_panic(path in "\\PC{0,40}", template in "(/(\\{\\*\\}|\\{\\*\\*\\}|[a-z*{}]{0,3})){0,4}") {
        for mode in [
            meshward_policy::api::PathNormalizationMode::None,
            meshward_policy::api::PathNormalizationMode::Base,
            meshward_policy::api::PathNormalizationMode::MergeSlashes,
            meshward_policy::api::PathNormalizationMode::DecodeAndMergeSlashes,
        ] {
            let once = normalize(&path, mode);
            prop_assert!(!once.contains('?'));
        }
        if let Ok(t) = PathTemplate::parse(&template) {
            let _ = t.matches(&path);
        }
    }

    #[test]
    fn decisions_never_panic_and_are_deterministic(
        policies in (0usize..6).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>()),
        requests in prop::collection::vec(request(), 1..6),
    ) {
        // Arbitrary policies include invalid ones: the engine must cope with
        // whatever is handed to it, not only with what validation lets through.
        let set = PolicySet::new(MeshConfig::default(), policies.into_iter().map(Policy::AuthorizationPolicy).collect());
        let mut first = Checker::default();
        let mut second = Checker::default();
        for req in &requests {
            let a = serde_json::to_string(&first.check(&set, req)).unwrap_or_default();
            let b = serde_json::to_string(&second.check(&set, req)).unwrap_or_default();
            prop_assert_eq!(a, b);
        }
    }
}
