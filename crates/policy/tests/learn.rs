//! `suggest` and `replay` together: for any set of logged requests, the
//! policies `suggest` writes pass `validate --strict`'s checks and allow
//! every request it took (replay never reports allowed → denied); paths
//! are generalized only where they varied.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use meshward_policy::api::MeshConfig;
use meshward_policy::authz::Verdict;
use meshward_policy::authz::normalize::normalize;
use meshward_policy::learn::paths::{self, PathMode};
use meshward_policy::learn::record::{DecisionRecord, RecordWorkload};
use meshward_policy::learn::{Callers, Plaintext, SuggestOptions, replay, suggest};
use meshward_policy::{PolicySet, Stage, load};
use proptest::prelude::*;

/// The suggestion loaded as `meshward validate --strict` loads it: no
/// error, no warning, the mesh config's warnings included.
fn strictly_valid(yaml: &str) -> PolicySet {
    let loaded = load::load_str("suggested.yaml", yaml);
    let mesh = MeshConfig::default();
    let mut diagnostics: Vec<String> = loaded.diagnostics.iter().map(|d| d.to_string()).collect();
    diagnostics.extend(loaded.mesh_warnings(&mesh).iter().map(|d| d.to_string()));
    assert!(diagnostics.is_empty(), "{diagnostics:#?}\n{yaml}");
    PolicySet::new(mesh, loaded.into_policies())
}

#[derive(Debug, Clone)]
struct Call {
    workload: (&'static str, &'static str, &'static str),
    caller: Option<&'static str>,
    source: &'static str,
    port: u16,
    /// `None`: a TCP connection.
    request: Option<(&'static str, String)>,
    allowed: bool,
}

fn record(call: &Call, second: i64) -> DecisionRecord {
    let (namespace, name, app) = call.workload;
    let (method, raw) = match &call.request {
        Some((m, p)) => (Some(m.to_string()), Some(p.clone())),
        None => (None, None),
    };
    let path = raw
        .as_deref()
        .map(|p| normalize(p, Default::default()).into_owned());
    DecisionRecord {
        v: 1,
        time: Some(jiff::Timestamp::from_second(1_700_000_000 + second).unwrap()),
        kind: "access".into(),
        direction: "inbound".into(),
        protocol: if method.is_some() { "HTTP/1.1" } else { "TCP" }.into(),
        source_address: Some(SocketAddr::new(call.source.parse().unwrap(), 40000)),
        source_principal: call.caller.map(str::to_owned),
        original_path: raw.filter(|r| Some(r) != path.as_ref()),
        method,
        path,
        authority: Some("svc:9080".into()),
        status: Some(if call.allowed { 200 } else { 403 }),
        decision: Some(if call.allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        }),
        stage: Some(Stage::Authorization),
        workload: Some(RecordWorkload {
            namespace: namespace.into(),
            name: Some(name.into()),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        }),
        destination_ip: Some("198.18.0.9".parse().unwrap()),
        destination_port: Some(call.port),
        ..DecisionRecord::default()
    }
}

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage";
const REVIEWS: (&str, &str, &str) = ("bookinfo", "reviews-v1", "reviews");

fn bookinfo_calls() -> Vec<DecisionRecord> {
    let calls = [
        Call {
            workload: REVIEWS,
            caller: Some(PRODUCTPAGE),
            source: "198.18.0.2",
            port: 9080,
            request: Some(("GET", "/reviews/0".into())),
            allowed: true,
        },
        Call {
            workload: REVIEWS,
            caller: Some(PRODUCTPAGE),
            source: "198.18.0.2",
            port: 9080,
            request: Some(("GET", "/reviews/1".into())),
            allowed: true,
        },
        Call {
            workload: ("bookinfo", "ratings", "ratings"),
            caller: Some("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"),
            source: "198.18.0.3",
            port: 9080,
            request: Some(("GET", "/ratings/0".into())),
            allowed: true,
        },
        Call {
            workload: ("bookinfo", "ratings", "ratings"),
            caller: None,
            source: "198.18.0.7",
            port: 9080,
            request: Some(("GET", "/health".into())),
            allowed: true,
        },
        Call {
            workload: ("bookinfo", "db", "db"),
            caller: Some("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"),
            source: "198.18.0.4",
            port: 5432,
            request: None,
            allowed: true,
        },
        Call {
            workload: REVIEWS,
            caller: Some("spiffe://cluster.local/ns/bookinfo/sa/sleep"),
            source: "198.18.0.5",
            port: 9080,
            request: Some(("GET", "/reviews/0".into())),
            allowed: false,
        },
    ];
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| record(c, i as i64))
        .collect()
}

#[test]
fn bookinfo_suggestion_allows_what_was_seen_and_nothing_else() {
    let records = bookinfo_calls();
    let suggestion = suggest(&records, &SuggestOptions::default());
    let yaml = &suggestion.yaml;
    let set = strictly_valid(yaml);
    assert_eq!(
        (suggestion.policies, suggestion.allow_nothing),
        (3, 1),
        "{yaml}"
    );
    assert!(
        yaml.contains(r#"- "/reviews/{*}"  # 2 requests, 2 paths"#),
        "{yaml}"
    );
    assert!(
        yaml.contains("  # 2 requests, first seen 2023-11-14T22:13:20.000Z, last seen 2023-11-14T22:13:21.000Z\n  - from:"),
        "{yaml}"
    );
    assert!(yaml.contains(r#"ports: ["5432"]"#), "{yaml}");
    assert!(!yaml.contains("dry-run"), "{yaml}");
    // The plaintext caller and the denied request are left out, and said so.
    let notes = suggestion.notes.join("\n");
    assert!(
        notes.contains("1 request(s) from callers without a mesh identity"),
        "{notes}"
    );
    assert!(notes.contains("1 denied request(s)"), "{notes}");

    let report = replay(&set, &records);
    // Only the plaintext health check breaks: --plaintext ip-blocks covers it.
    assert_eq!(report.allowed_to_denied, 1, "{}", report.text());
    assert!(
        report
            .text()
            .contains("plaintext 198.18.0.7 GET svc:9080/health")
    );
    assert_eq!(report.denied_to_allowed, 0, "{}", report.text());

    // What was never seen is denied: a POST, another path, another caller.
    let unseen = [
        Call {
            workload: REVIEWS,
            caller: Some(PRODUCTPAGE),
            source: "198.18.0.2",
            port: 9080,
            request: Some(("POST", "/reviews/0".into())),
            allowed: true,
        },
        Call {
            workload: REVIEWS,
            caller: Some(PRODUCTPAGE),
            source: "198.18.0.2",
            port: 9080,
            request: Some(("GET", "/admin".into())),
            allowed: true,
        },
        Call {
            workload: REVIEWS,
            caller: Some("spiffe://cluster.local/ns/bookinfo/sa/sleep"),
            source: "198.18.0.5",
            port: 9080,
            request: Some(("GET", "/reviews/0".into())),
            allowed: true,
        },
        Call {
            workload: ("bookinfo", "details", "details"),
            caller: Some(PRODUCTPAGE),
            source: "198.18.0.2",
            port: 9080,
            request: Some(("GET", "/details/0".into())),
            allowed: true,
        },
    ];
    let unseen: Vec<DecisionRecord> = unseen.iter().map(|c| record(c, 0)).collect();
    let report = replay(&set, &unseen);
    assert_eq!(report.allowed_to_denied, 4, "{}", report.text());

    let with_ip = suggest(
        &records,
        &SuggestOptions {
            plaintext: Plaintext::IpBlocks,
            dry_run: true,
            ..SuggestOptions::default()
        },
    );
    assert!(
        with_ip.yaml.contains(r#"ipBlocks: ["198.18.0.7"]"#),
        "{}",
        with_ip.yaml
    );
    assert!(with_ip.yaml.contains(r#"istio.io/dry-run: "true""#));
    // In dry-run nothing is enforced: nothing breaks, and the request
    // denied when logged (by policies not in this set) would pass.
    let report = replay(&strictly_valid(&with_ip.yaml), &records);
    assert_eq!(
        (report.allowed_to_denied, report.denied_to_allowed),
        (0, 1),
        "{}",
        report.text()
    );
}

#[test]
fn filters_and_existing_allow_nothing() {
    let records = bookinfo_calls();
    let only = suggest(
        &records,
        &SuggestOptions {
            workload: Some("bookinfo/ratings".into()),
            have_allow_nothing: BTreeSet::from(["bookinfo".to_owned()]),
            callers: Callers::Namespaces,
            ..SuggestOptions::default()
        },
    );
    strictly_valid(&only.yaml);
    assert_eq!((only.policies, only.allow_nothing), (1, 0), "{}", only.yaml);
    assert!(
        only.yaml.contains("name: ratings-observed\n"),
        "{}",
        only.yaml
    );
    assert!(
        only.yaml.contains(r#"namespaces: ["bookinfo"]"#),
        "{}",
        only.yaml
    );
    let later = suggest(
        &records,
        &SuggestOptions {
            since: Some(jiff::Timestamp::from_second(1_700_000_000 + 4).unwrap()),
            ..SuggestOptions::default()
        },
    );
    assert_eq!(later.requests, 1, "{}", later.yaml);
    let frequent = suggest(
        &records,
        &SuggestOptions {
            min_count: 2,
            ..SuggestOptions::default()
        },
    );
    assert_eq!(frequent.policies, 1, "{}", frequent.yaml);
    assert!(frequent.notes.iter().any(|n| n.contains("--min-count")));
}

// Properties.

const PRINCIPALS: [&str; 3] = [
    "spiffe://cluster.local/ns/a/sa/one",
    "spiffe://cluster.local/ns/a/sa/two",
    "spiffe://cluster.local/ns/b/sa/three",
];
/// Two versions of `web` share its policy.
const WORKLOADS: [(&str, &str, &str); 4] = [
    ("a", "web-v1", "web"),
    ("a", "web-v2", "web"),
    ("a", "api", "api"),
    ("b", "db", "db"),
];

/// Path segments: ids, names, and what templates must not take apart.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,3}",
        "(users|orders|items|v1)",
        Just(String::new()),
        Just("..".to_owned()),
        Just("a*".to_owned()),
        Just("{x}".to_owned()),
        Just("%2F".to_owned()),
        Just("caf\u{e9}".to_owned()),
    ]
}

fn raw_path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..4).prop_map(|s| format!("/{}", s.join("/")))
}

fn call() -> impl Strategy<Value = Call> {
    (
        0..WORKLOADS.len(),
        prop::option::weighted(0.85, 0..PRINCIPALS.len()),
        prop_oneof![Just(9080u16), Just(8080u16)],
        prop::option::weighted(
            0.85,
            (
                prop_oneof![Just("GET"), Just("POST"), Just("PUT")],
                raw_path(),
            ),
        ),
        prop::bool::weighted(0.9),
        0..3u8,
    )
        .prop_map(|(w, p, port, request, allowed, source)| Call {
            workload: WORKLOADS[w],
            caller: p.map(|p| PRINCIPALS[p]),
            source: ["127.0.0.1", "127.0.0.2", "::1"][source as usize],
            port,
            request,
            allowed,
        })
}

fn options() -> impl Strategy<Value = SuggestOptions> {
    (
        prop_oneof![
            Just(PathMode::Exact),
            Just(PathMode::Templates),
            Just(PathMode::Prefixes)
        ],
        prop_oneof![Just(Callers::Principals), Just(Callers::Namespaces)],
        prop_oneof![Just(Plaintext::Skip), Just(Plaintext::IpBlocks)],
        0..2u64,
    )
        .prop_map(|(paths, callers, plaintext, min_count)| SuggestOptions {
            paths,
            callers,
            plaintext,
            min_count,
            ..SuggestOptions::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// suggest ∘ replay never reports allowed → denied, except for the
    /// requests suggest says it left out (plaintext callers, unless asked
    /// for by address); and what it writes passes `validate --strict`.
    #[test]
    fn suggested_policies_allow_every_request_they_were_made_from(
        calls in prop::collection::vec(call(), 0..40),
        options in options(),
    ) {
        let records: Vec<DecisionRecord> =
            calls.iter().enumerate().map(|(i, c)| record(c, i as i64)).collect();
        let suggestion = suggest(&records, &options);
        let set = strictly_valid(&suggestion.yaml);
        let report = replay(&set, &records);
        let left_out = match options.plaintext {
            Plaintext::IpBlocks => 0,
            Plaintext::Skip => calls.iter().filter(|c| c.allowed && c.caller.is_none()).count() as u64,
        };
        prop_assert_eq!(report.allowed_to_denied, left_out, "{}\n{}", report.text(), suggestion.yaml);
        prop_assert_eq!(report.undecidable, 0, "{}", report.text());
    }

    /// Every observed path is matched by the value that stands for it, and a
    /// template has `{*}` only where the paths it matches differ.
    #[test]
    fn templates_never_merge_segments_that_were_always_constant(
        raw in prop::collection::vec(raw_path(), 0..30),
    ) {
        let observed: BTreeSet<String> =
            raw.iter().map(|p| normalize(p, Default::default()).into_owned()).collect();
        let generalized = paths::generalize(observed.iter().map(String::as_str), PathMode::Templates);
        let members: usize = generalized.iter().map(|g| g.members.len()).sum();
        prop_assert_eq!(members, observed.len());
        for g in &generalized {
            for m in &g.members {
                prop_assert!(paths::matches(&g.value, m), "{} does not match {}", g.value, m);
            }
            if !g.value.contains("{*}") {
                continue;
            }
            let template: Vec<&str> = g.value[1..].split('/').collect();
            let matched: Vec<Vec<&str>> = observed
                .iter()
                .filter(|p| paths::matches(&g.value, p))
                .map(|p| p[1..].split('/').collect())
                .collect();
            for (i, seg) in template.iter().enumerate() {
                let seen: BTreeSet<&str> = matched.iter().map(|p| p[i]).collect();
                if *seg == "{*}" {
                    prop_assert!(seen.len() >= 2, "{}: segment {} was always {:?}", g.value, i, seen);
                } else {
                    prop_assert_eq!(seen.len(), 1);
                }
            }
            prop_assert!(template.iter().any(|s| *s != "{*}"), "{} has no literal segment", g.value);
        }
    }
}

/// A record's strings cannot add to the YAML `suggest` writes: a method,
/// workload name, path or caller holding line breaks (and the characters
/// YAML 1.1 reads as ones) stays inside its comment or quoted scalar, and
/// the output holds exactly the policies `suggest` counted.
#[test]
fn record_strings_cannot_inject_yaml() {
    let injected = "X\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: injected, namespace: bookinfo}\nspec: {rules: [{}]}\n";
    let mut records = Vec::new();
    for (i, breaker) in ["\n", "\r", "\u{85}", "\u{2028}", "\u{2029}"]
        .into_iter()
        .enumerate()
    {
        let forged = injected.replace('\n', breaker);
        let mut r = bookinfo_calls().remove(0);
        r.time = Some(jiff::Timestamp::from_second(1_700_000_000 + i as i64).unwrap());
        r.method = Some(forged.clone());
        r.path = Some(format!("/a{forged}"));
        r.source_principal = Some(format!("spiffe://cluster.local/ns/bookinfo/sa/x{forged}"));
        r.workload.as_mut().unwrap().name = Some(format!("reviews{forged}"));
        records.push(r);
    }
    let suggestion = suggest(&records, &SuggestOptions::default());
    let yaml = &suggestion.yaml;
    let set = strictly_valid(yaml);
    assert_eq!(
        (suggestion.policies, suggestion.allow_nothing),
        (1, 1),
        "{yaml}"
    );
    assert_eq!(set.policies().len(), 2, "{yaml}");
    let names: Vec<&str> = set
        .policies()
        .iter()
        .map(|p| p.metadata().name.as_str())
        .collect();
    assert_eq!(names, ["allow-nothing", "reviews-observed"], "{yaml}");
    for line in yaml.split(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']) {
        assert!(
            !line.starts_with("apiVersion") || line == "apiVersion: security.istio.io/v1",
            "{line:?} in {yaml}"
        );
        assert!(
            !line.chars().any(|c| c.is_control() && c != '\t'),
            "{line:?}"
        );
    }
    assert_eq!(yaml.matches("\napiVersion: ").count(), 2, "{yaml}");
    assert_eq!(yaml.matches("\n---\n").count(), 2, "{yaml}");
}

/// A request the proxy refused itself, before any policy (stage
/// `request`, written without workload facts), is one no policy changes:
/// replay reports it unchanged, not undecidable.
#[test]
fn requests_refused_before_any_policy_replay_unchanged() {
    let refused = DecisionRecord {
        v: 1,
        kind: "access".into(),
        direction: "inbound".into(),
        protocol: "HTTP/1.1".into(),
        source_address: Some("198.18.0.2:40000".parse().unwrap()),
        status: Some(400),
        decision: Some(Verdict::Deny),
        stage: Some(Stage::Request),
        ..DecisionRecord::default()
    };
    let set = strictly_valid(&suggest(&bookinfo_calls(), &SuggestOptions::default()).yaml);
    let report = replay(&set, &[refused]);
    assert_eq!(
        (report.records, report.unchanged, report.undecidable),
        (1, 1, 0),
        "{}",
        report.text()
    );
}

/// `allow-nothing` is written only where it breaks nothing observed: not
/// with `--workload` (it would deny the namespace's other workloads), and
/// not in a namespace one of whose workloads no policy can select; each
/// time a note says why, and a workload known only by its namespace is
/// not said to lack labels.
#[test]
fn allow_nothing_only_where_every_workload_is_covered() {
    let records = bookinfo_calls();
    let one = suggest(
        &records,
        &SuggestOptions {
            workload: Some("bookinfo/ratings".into()),
            ..SuggestOptions::default()
        },
    );
    strictly_valid(&one.yaml);
    assert_eq!((one.policies, one.allow_nothing), (1, 0), "{}", one.yaml);
    assert!(!one.yaml.contains("allow-nothing"), "{}", one.yaml);
    assert!(
        one.notes
            .iter()
            .any(|n| n
                .starts_with("bookinfo: no allow-nothing written: --workload bookinfo/ratings")),
        "{:#?}",
        one.notes
    );

    let mut unselectable = records.clone();
    let mut by_namespace = records[0].clone();
    by_namespace.workload = Some(RecordWorkload {
        namespace: "bookinfo".into(),
        name: None,
        labels: BTreeMap::new(),
    });
    unselectable.push(by_namespace);
    let mut unlabelled = records[0].clone();
    unlabelled.workload = Some(RecordWorkload {
        namespace: "other".into(),
        name: Some("bare".into()),
        labels: BTreeMap::new(),
    });
    unselectable.push(unlabelled);
    let all = suggest(&unselectable, &SuggestOptions::default());
    strictly_valid(&all.yaml);
    assert_eq!((all.policies, all.allow_nothing), (3, 0), "{}", all.yaml);
    let notes = all.notes.join("\n");
    for expected in [
        "bookinfo: left out (1 requests to a workload known only by its namespace",
        "other/bare: left out (1 requests): it has no labels",
        "bookinfo: no allow-nothing written: it would deny all traffic to the workloads left out above",
        "other: no allow-nothing written",
    ] {
        assert!(notes.contains(expected), "{expected:?} not in {notes}");
    }
    assert!(!notes.contains("bookinfo/{}"), "{notes}");
}

/// Replay does not guess about tokens it cannot see: a record says only
/// whether the `Authorization: Bearer` header held one, so under proposed
/// RequestAuthentications that read other headers, parameters or cookies,
/// a request without a verified token is undecidable for their workloads
/// (and decided as before where the rules read the default header only).
#[test]
fn tokens_at_locations_records_do_not_cover_are_undecidable() {
    let records = bookinfo_calls();
    let suggested = suggest(&records, &SuggestOptions::default()).yaml;
    let with_rule = |locations: &str| {
        let yaml = format!(
            "{suggested}---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: bookinfo}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  jwtRules:\n  - issuer: https://issuer.example\n    jwksUri: https://issuer.example/jwks\n{locations}"
        );
        let loaded = load::load_str("proposed.yaml", &yaml);
        let errors: Vec<String> = loaded
            .diagnostics
            .iter()
            .map(|d| d.to_string())
            .filter(|d| d.contains("error"))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}\n{yaml}");
        replay(
            &PolicySet::new(MeshConfig::default(), loaded.into_policies()),
            &records,
        )
    };
    // Two allowed requests and one denied one reach reviews.
    for locations in [
        "    fromHeaders: [{name: x-token}]\n",
        "    fromParams: [token]\n",
        "    fromCookies: [session]\n",
    ] {
        let report = with_rule(locations);
        assert_eq!(report.undecidable, 3, "{locations}{}", report.text());
        assert!(
            report.text().contains("besides `Authorization: Bearer`"),
            "{}",
            report.text()
        );
    }
    for locations in [
        "",
        "    fromHeaders: [{name: Authorization, prefix: \"Bearer \"}]\n",
    ] {
        let report = with_rule(locations);
        assert_eq!(report.undecidable, 0, "{locations:?}{}", report.text());
    }
}
