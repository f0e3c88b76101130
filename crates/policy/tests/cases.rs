//! Table-driven conformance suite: every file in `tests/cases/` holds policies
//! and requests with the decision Istio's semantics give, or documents with
//! the validation result Istio's admission gives.
//!
//! Requests use the `meshward check` input format and run through the same
//! [`Checker`] the CLI uses. JWTs are minted at test time with the keys in
//! `tests/keys/` so expiry is relative to now.

// A test that cannot set itself up should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshward_policy::api::MeshConfig;
use meshward_policy::check::{CheckInput, Checker, OneOrMany};
use meshward_policy::{PolicySet, load};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[allow(dead_code)]
    description: String,
    #[serde(default)]
    mesh: Option<Value>,
    #[serde(default)]
    policies: String,
    #[serde(default)]
    cases: Vec<Case>,
    #[serde(default)]
    validate: Vec<ValidateCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    input: Value,
    #[serde(default)]
    jwt: Option<Jwt>,
    /// Several tokens, placed in order after `jwt` (a header already set
    /// gets one more value).
    #[serde(default)]
    jwts: Vec<Jwt>,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Jwt {
    /// RS256, RS384, PS256, ES256, HS256-RSA-PUBLIC (HMAC keyed with the RSA public key), none.
    #[serde(default = "default_alg")]
    alg: String,
    /// Header kid; defaults to the signing key's id. `~` for none.
    #[serde(default)]
    kid: Option<String>,
    /// Sign with this key instead: rsa, rsa-other, ec.
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    claims: serde_json::Map<String, Value>,
    /// `header` (Authorization: Bearer), `header:NAME:PREFIX`, `param:NAME`, `cookie:NAME`.
    #[serde(default = "default_at")]
    at: String,
    /// A literal token instead of a minted one.
    #[serde(default)]
    raw: Option<String>,
    /// More header parameters (`crit`, `b64`, ...) for the minted token.
    #[serde(default)]
    header: serde_json::Map<String, Value>,
}

fn default_alg() -> String {
    "RS256".into()
}
fn default_at() -> String {
    "header".into()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Expect {
    decision: String,
    #[serde(default)]
    status: Option<u16>,
    /// `ns/name`, or `~` to require that no policy decided.
    #[serde(default, deserialize_with = "some")]
    policy: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    rule: Option<Option<usize>>,
    #[serde(default)]
    mtls_mode: Option<String>,
    #[serde(default)]
    audited: Option<bool>,
    #[serde(default)]
    audit_policy: Option<String>,
    #[serde(default)]
    dry_run: Option<Vec<BTreeMap<String, Value>>>,
    #[serde(default)]
    stage: Option<String>,
    /// Substrings the reason must contain.
    #[serde(default)]
    reason: Vec<String>,
    #[serde(default, deserialize_with = "some")]
    request_principal: Option<Option<String>>,
    /// Header name → expected value; `~` means the header must be absent.
    #[serde(default)]
    upstream_headers: BTreeMap<String, Option<String>>,
    #[serde(default)]
    www_authenticate: Option<String>,
}

fn some<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateCase {
    name: String,
    yaml: String,
    /// Whether the one document in `yaml` is loaded as a valid policy.
    valid: bool,
    /// Every error the document gets, each as a substring of its text
    /// (message, field or resource): each needle names a different error,
    /// and there are no others. Absent means none.
    #[serde(default)]
    errors: Vec<String>,
    /// Every warning, as `errors` (absent means none).
    #[serde(default)]
    warnings: Vec<String>,
    /// How many policies load: one when `valid`, none otherwise, unless
    /// given (documents of other kinds beside a policy, several policies).
    #[serde(default)]
    policies: Option<usize>,
    /// Substrings no warning may contain.
    #[serde(default)]
    no_warnings: Vec<String>,
    /// The mesh config in force (Istio's defaults when absent), for the
    /// warnings that depend on it, as `meshward validate --mesh-config`.
    #[serde(default)]
    mesh: Option<Value>,
    /// Expected 1-based line of the first error.
    #[serde(default)]
    line: Option<usize>,
}

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn read_key(name: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(name)).unwrap_or_else(|e| panic!("test key {name}: {e}"))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn mint(jwt: &Jwt) -> String {
    if let Some(raw) = &jwt.raw {
        return raw.clone();
    }
    let mut claims = jwt.claims.clone();
    for time_claim in ["exp", "nbf", "iat"] {
        if let Some(Value::Number(offset)) = claims.get(time_claim) {
            let offset = offset.as_i64().unwrap_or(0);
            claims.insert(time_claim.into(), Value::from(now() + offset));
        }
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    if jwt.alg == "none" {
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        return format!("{header}.{payload}.");
    }
    let (alg, key, default_kid) = match (jwt.alg.as_str(), jwt.key.as_deref()) {
        ("HS256-RSA-PUBLIC", _) => (
            Algorithm::HS256,
            EncodingKey::from_secret(&read_key("rsa-public.pem")),
            "rsa-1",
        ),
        ("ES256", None | Some("ec")) => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&read_key("ec.pem")).expect("ec key"),
            "ec-1",
        ),
        (alg, key) => {
            let file = if key == Some("rsa-other") {
                "rsa-other.pem"
            } else {
                "rsa.pem"
            };
            let alg: Algorithm = alg.parse().unwrap_or_else(|_| panic!("unknown alg {alg}"));
            (
                alg,
                EncodingKey::from_rsa_pem(&read_key(file)).expect("rsa key"),
                if key == Some("rsa-other") {
                    "rsa-2"
                } else {
                    "rsa-1"
                },
            )
        }
    };
    let mut header = Header::new(alg);
    header.kid = match jwt.kid.as_deref() {
        None => Some(default_kid.to_owned()),
        Some("~") => None,
        Some(kid) => Some(kid.to_owned()),
    };
    if !jwt.header.is_empty() {
        let mut fields = serde_json::to_value(&header).expect("a header is JSON");
        if let Some(fields) = fields.as_object_mut() {
            fields.extend(jwt.header.clone());
        }
        header = serde_json::from_value(fields).expect("header parameters of the right types");
    }
    jsonwebtoken::encode(&header, &claims, &key).expect("signing a test token")
}

fn place_token(input: &mut Value, jwt: &Jwt, token: &str) {
    let http = input
        .get_mut("http")
        .and_then(Value::as_object_mut)
        .expect("a jwt case needs an http request");
    let headers = http
        .entry("headers")
        .or_insert_with(|| Value::Object(Default::default()))
        .as_object_mut()
        .expect("headers is an object");
    let parts: Vec<&str> = jwt.at.splitn(3, ':').collect();
    match parts.as_slice() {
        ["header"] => add_header(headers, "authorization", format!("Bearer {token}")),
        ["header", name, prefix] => add_header(headers, name, format!("{prefix}{token}")),
        ["header", name] => add_header(headers, name, token.to_owned()),
        ["param", name] => {
            let path = http
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("/")
                .to_owned();
            let sep = if path.contains('?') { '&' } else { '?' };
            http.insert(
                "path".into(),
                Value::from(format!("{path}{sep}{name}={token}")),
            );
        }
        ["cookie", name] => {
            add_header(headers, "cookie", format!("other=1; {name}={token}"));
        }
        other => panic!("unknown token location {other:?}"),
    }
}

/// Sets a header, or adds a value when it is already there.
fn add_header(headers: &mut serde_json::Map<String, Value>, name: &str, value: String) {
    match headers.get_mut(name) {
        None => {
            headers.insert(name.to_owned(), Value::from(value));
        }
        Some(Value::Array(values)) => values.push(Value::from(value)),
        Some(first) => *first = Value::from(vec![first.clone(), Value::from(value)]),
    }
}

fn run_case(file: &str, set: &PolicySet, case: &Case) -> Result<(), String> {
    let mut input = case.input.clone();
    for jwt in case.jwt.iter().chain(&case.jwts) {
        let token = mint(jwt);
        place_token(&mut input, jwt, &token);
    }
    let input: CheckInput = serde_json::from_value(input).map_err(|e| format!("bad input: {e}"))?;
    let out = Checker::default().check(set, &input);
    let got = serde_json::to_value(&out).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let e = &case.expect;
    let mut expect_eq = |what: &str, want: Value, have: &Value| {
        if &want != have {
            problems.push(format!("{what}: want {want}, got {have}"));
        }
    };
    expect_eq(
        "decision",
        Value::from(e.decision.clone()),
        &got["decision"],
    );
    if let Some(s) = e.status {
        expect_eq("status", Value::from(s), &got["status"]);
    }
    if let Some(p) = &e.policy {
        expect_eq(
            "policy",
            serde_json::to_value(p).unwrap_or_default(),
            &got["policy"],
        );
    }
    if let Some(r) = &e.rule {
        expect_eq(
            "rule",
            serde_json::to_value(r).unwrap_or_default(),
            &got["rule"],
        );
    }
    if let Some(m) = &e.mtls_mode {
        expect_eq("mtls_mode", Value::from(m.clone()), &got["mtls_mode"]);
    }
    if let Some(a) = e.audited {
        expect_eq("audited", Value::from(a), &got["audited"]);
    }
    if let Some(a) = &e.audit_policy {
        expect_eq("audit_policy", Value::from(a.clone()), &got["audit_policy"]);
    }
    if let Some(s) = &e.stage {
        expect_eq("stage", Value::from(s.clone()), &got["stage"]);
    }
    if let Some(p) = &e.request_principal {
        let have = got.get("request_principal").cloned().unwrap_or(Value::Null);
        expect_eq(
            "request_principal",
            serde_json::to_value(p).unwrap_or_default(),
            &have,
        );
    }
    if let Some(w) = &e.www_authenticate {
        let have = got
            .get("www_authenticate")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !have.contains(w.as_str()) {
            problems.push(format!(
                "www_authenticate: want it to contain {w:?}, got {have:?}"
            ));
        }
    }
    if let Some(dry) = &e.dry_run {
        let have = got["dry_run"].as_array().cloned().unwrap_or_default();
        if have.len() != dry.len() {
            problems.push(format!(
                "dry_run: want {} results, got {}",
                dry.len(),
                Value::Array(have.clone())
            ));
        }
        for (want, have) in dry.iter().zip(&have) {
            for (k, v) in want {
                if &have[k] != v {
                    problems.push(format!("dry_run.{k}: want {v}, got {}", have[k]));
                }
            }
        }
    }
    let reason = got["reason"].as_str().unwrap_or_default();
    for needle in &e.reason {
        if !reason.contains(needle.as_str()) {
            problems.push(format!(
                "reason: want it to contain {needle:?}, got {reason:?}"
            ));
        }
    }
    for (name, want) in &e.upstream_headers {
        let have = out
            .upstream_headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| match v {
                OneOrMany::One(v) => v.clone(),
                OneOrMany::Many(vs) => vs.join(","),
            });
        if &have != want {
            problems.push(format!(
                "upstream header {name}: want {want:?}, got {have:?}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{file}: case {:?}:\n    {}\n    output: {got}",
            case.name,
            problems.join("\n    ")
        ))
    }
}

fn run_validate(file: &str, case: &ValidateCase) -> Result<(), String> {
    let mut loaded = load::load_str("case.yaml", &case.yaml);
    let mesh: MeshConfig = match &case.mesh {
        Some(m) => serde_json::from_value(m.clone()).map_err(|e| format!("mesh: {e}"))?,
        None => MeshConfig::default(),
    };
    let mesh_warnings = loaded.mesh_warnings(&mesh);
    loaded.diagnostics.extend(mesh_warnings);
    let errors: Vec<String> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.to_string())
        .collect();
    let warnings: Vec<String> = loaded
        .diagnostics
        .iter()
        .filter(|d| !d.is_error())
        .map(|d| d.to_string())
        .collect();
    let mut problems = Vec::new();
    let valid = errors.is_empty() && loaded.policies.len() == 1;
    if valid != case.valid {
        problems.push(format!(
            "valid: want {}, got {valid} ({} policies)",
            case.valid,
            loaded.policies.len()
        ));
    }
    let want_policies = case.policies.unwrap_or(usize::from(case.valid));
    if loaded.policies.len() != want_policies {
        problems.push(format!(
            "policies loaded: want {want_policies}, got {}",
            loaded.policies.len()
        ));
    }
    problems.extend(match_exactly("error", &case.errors, &errors));
    problems.extend(match_exactly("warning", &case.warnings, &warnings));
    for needle in &case.no_warnings {
        if warnings.iter().any(|w| w.contains(needle.as_str())) {
            problems.push(format!("a warning contains {needle:?}"));
        }
    }
    if let Some(line) = case.line {
        let have = loaded
            .diagnostics
            .iter()
            .find(|d| d.is_error())
            .map(|d| d.location.line);
        if have != Some(line) {
            problems.push(format!("line: want {line}, got {have:?}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{file}: validate {:?}:\n    {}\n    errors: {errors:#?}\n    warnings: {warnings:#?}",
            case.name,
            problems.join("\n    ")
        ))
    }
}

/// Pairs each needle with a different diagnostic containing it (first
/// fit, needles in order), and reports needles left without one and
/// diagnostics no needle accounts for.
fn match_exactly(what: &str, needles: &[String], have: &[String]) -> Vec<String> {
    let mut unclaimed: Vec<&String> = have.iter().collect();
    let mut problems = Vec::new();
    for needle in needles {
        match unclaimed.iter().position(|d| d.contains(needle.as_str())) {
            Some(i) => {
                unclaimed.remove(i);
            }
            None => problems.push(format!("no {what} contains {needle:?}")),
        }
    }
    problems.extend(
        unclaimed
            .into_iter()
            .map(|d| format!("unexpected {what}: {d}")),
    );
    problems
}

/// The number of cases the suite holds today; raise it when adding cases.
const MIN_CASES: usize = 984;

#[test]
fn conformance_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let jwks = String::from_utf8(read_key("jwks.json")).expect("jwks is UTF-8");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/cases exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let only = std::env::var("CASES").ok();
    let (mut passed, mut failures) = (0usize, Vec::new());
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable case file");
        let file: CaseFile =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mesh: MeshConfig = match &file.mesh {
            Some(m) => {
                serde_json::from_value(m.clone()).unwrap_or_else(|e| panic!("{name}: mesh: {e}"))
            }
            None => MeshConfig::default(),
        };
        let policies = file.policies.replace("{{JWKS}}", &jwks);
        let loaded = load::load_str(&name, &policies);
        let errors: Vec<String> = loaded
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| d.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{name}: policies do not load:\n{}",
            errors.join("\n")
        );
        assert!(
            !file.cases.is_empty() || !file.validate.is_empty(),
            "{name}: a case file holds at least one case"
        );
        let set = PolicySet::new(mesh, loaded.into_policies());
        for case in &file.cases {
            match run_case(&name, &set, case) {
                Ok(()) => passed += 1,
                Err(e) => failures.push(e),
            }
        }
        for case in &file.validate {
            match run_validate(&name, case) {
                Ok(()) => passed += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    println!("conformance: {passed} passed, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    match only {
        // A filter that selects nothing is a mistake, not a pass.
        Some(filter) => assert!(passed > 0, "CASES={filter:?} selects no case"),
        // The suite only grows: a lost file or a parse that silently yields
        // fewer cases fails here.
        None => assert!(
            passed >= MIN_CASES,
            "the suite holds {MIN_CASES} cases or more; it ran {passed}"
        ),
    }
}
