//! The decision record: one JSON object per line, written by a proxy for
//! every request or connection it decides (its access log, and what it
//! reports to the server), read back by `meshward suggest` and `meshward
//! replay`. The format is versioned (`v`) and documented in
//! `docs/decision-records.md`; this module holds the parts the engine
//! defines — which facts a decision needs, and how to put them back into
//! a request — so that writing and reading cannot drift apart.
//!
//! A record keeps what deciding again needs, and only that: the facts every
//! decision reads (caller, addresses, workload, port, method, host, path
//! without query, the verified JWT's issuer, subject, audiences and
//! presenter), plus the claims the policies in force read and the headers
//! an operator asked for (never credentials). A token is never kept.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::authn::JwtPrincipal;
use crate::authz::{References, Verdict};
use crate::pipeline::Stage;
use crate::request::HttpRequest;
use crate::resolve::Workload;

/// The version of the record format this build writes. Records without
/// `v` (version 0) come from proxies that did not keep the facts below.
pub const RECORD_VERSION: u32 = 1;

/// Headers never recorded, whatever is asked: they carry credentials.
pub const NEVER_RECORDED_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// The workload a decision was made for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordWorkload {
    pub namespace: String,
    /// The WorkloadEntry's name, when the proxy knows it (`--workload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl RecordWorkload {
    pub fn of(workload: &Workload, name: Option<&str>) -> RecordWorkload {
        RecordWorkload {
            namespace: workload.namespace.clone(),
            name: name.map(str::to_owned),
            labels: workload.labels.clone(),
        }
    }

    /// The workload as policies select it.
    pub fn workload(&self) -> Workload {
        Workload {
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
        }
    }
}

impl std::fmt::Display for RecordWorkload {
    /// `namespace/name`, or `namespace/{k=v,..}` without a name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{}/{name}", self.namespace),
            None => {
                let labels: Vec<String> = self
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                write!(f, "{}/{{{}}}", self.namespace, labels.join(","))
            }
        }
    }
}

/// What request authentication established: the verified JWT's standard
/// attributes and the claims the policies in force read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestAuth {
    pub issuer: String,
    pub subject: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presenter: Option<String>,
    /// Each claim path a policy in force read, with the values authorization
    /// matched on; a path the token lacks is kept with no values, so that
    /// "absent" and "not recorded" stay apart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimValues>,
}

/// One claim path and its string values (`None`: absent, or no string values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimValues {
    pub path: Vec<String>,
    pub values: Option<Vec<String>>,
}

impl RequestAuth {
    /// The facts of `principal` that deciding again needs, given what the
    /// policies in force read.
    pub fn of(principal: &JwtPrincipal, references: &References) -> RequestAuth {
        RequestAuth {
            issuer: principal.issuer.clone(),
            subject: principal.subject.clone(),
            audiences: principal.audiences.clone(),
            presenter: principal.presenter.clone(),
            claims: references
                .claims
                .iter()
                .map(|path| ClaimValues {
                    path: path.clone(),
                    values: principal
                        .claim_values(path)
                        .map(|values| values.into_iter().map(|v| v.into_owned()).collect()),
                })
                .collect(),
        }
    }

    /// Whether the record holds claim `path`.
    pub fn holds(&self, path: &[String]) -> bool {
        self.claims.iter().any(|c| c.path == path)
    }

    /// A principal that authorization reads exactly as it read the one
    /// recorded: each recorded claim is rebuilt as a list of its values, so
    /// [`JwtPrincipal::claim_values`] gives them back unchanged (split
    /// already, where the claim was space-delimited).
    pub fn principal(&self) -> JwtPrincipal {
        let mut claims = Map::new();
        for claim in &self.claims {
            let Some(values) = &claim.values else {
                continue;
            };
            let leaf = Value::Array(values.iter().cloned().map(Value::String).collect());
            insert_path(&mut claims, &claim.path, leaf);
        }
        JwtPrincipal {
            issuer: self.issuer.clone(),
            subject: self.subject.clone(),
            audiences: self.audiences.clone(),
            presenter: self.presenter.clone(),
            claims: Arc::new(claims),
            space_delimited: Arc::from([]),
        }
    }
}

/// Puts `leaf` at `path` in nested objects; a path that runs into a value
/// which is not an object (records that contradict themselves) is left out.
fn insert_path(map: &mut Map<String, Value>, path: &[String], leaf: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        map.entry(first.clone()).or_insert(leaf);
        return;
    }
    let next = map
        .entry(first.clone())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(inner) = next {
        insert_path(inner, rest, leaf);
    }
}

/// The values of the headers `names` (lower-cased; credentials never), as
/// authorization reads them: every value folded with `,`, `None` when absent.
pub fn header_values(request: &HttpRequest, names: &[String]) -> BTreeMap<String, Option<String>> {
    names
        .iter()
        .filter(|name| !NEVER_RECORDED_HEADERS.contains(&name.as_str()))
        .map(|name| (name.clone(), request.header(name).map(|v| v.into_owned())))
        .collect()
}

/// Whether `request` carries a token at a default location (`Authorization:
/// Bearer`, or the `access_token` query parameter, which records leave out
/// with the rest of the query): recorded when no token was verified, so
/// that replaying under request authentication knows it cannot tell. Other
/// locations are not recorded: under rules that read them, replay reports
/// unverified requests as undecidable.
pub fn has_bearer_token(request: &HttpRequest) -> bool {
    request
        .header("authorization")
        .is_some_and(|v| v.len() > 7 && starts_with_ignore_ascii_case(&v, "bearer "))
        || request.query_params("access_token").any(|t| !t.is_empty())
}

/// Whether `value` starts with `prefix`, ASCII case folded. Compares bytes:
/// `value` comes from the network, and slicing it at `prefix.len()` could
/// cut a multi-byte character.
fn starts_with_ignore_ascii_case(value: &str, prefix: &str) -> bool {
    value
        .as_bytes()
        .get(..prefix.len())
        .is_some_and(|b| b.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// Whether `s` is an HTTP token (RFC 9110 `tchar`s, at least one): what a
/// request method can be.
pub fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `c` may break a line or a document where a record's strings are
/// written out (YAML comments, terminal lines): control characters but the
/// tab (which header values may hold), the Unicode line and paragraph
/// separators (line breaks to YAML 1.1), and the byte-order mark.
pub fn is_unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\t') || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

/// `line` with every [`is_unsafe_char`] escaped (`\\u{a}`), so that a
/// record's strings cannot end or forge a line of a report.
fn one_line(line: String) -> String {
    if !line.chars().any(is_unsafe_char) {
        return line;
    }
    line.chars()
        .map(|c| match is_unsafe_char(c) {
            true => c.escape_unicode().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// One record as `suggest` and `replay` read it. Fields they do not use
/// are ignored, so records may grow new fields within a version.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DecisionRecord {
    #[serde(default)]
    pub v: u32,
    #[serde(default)]
    pub time: Option<jiff::Timestamp>,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub direction: String,
    /// `HTTP/1.1`, `HTTP/2` or `TCP`.
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub source_address: Option<SocketAddr>,
    #[serde(default)]
    pub source_principal: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    /// As authorized: normalized, without query.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub decision: Option<Verdict>,
    #[serde(default)]
    pub stage: Option<Stage>,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub rule: Option<usize>,
    #[serde(default)]
    pub ext_authz: Option<String>,
    // Version 1.
    #[serde(default)]
    pub workload: Option<RecordWorkload>,
    #[serde(default)]
    pub destination_ip: Option<IpAddr>,
    #[serde(default)]
    pub destination_port: Option<u16>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub remote_ip: Option<IpAddr>,
    /// The path as received (without query), when normalization changed it.
    #[serde(default)]
    pub original_path: Option<String>,
    #[serde(default)]
    pub request_auth: Option<RequestAuth>,
    #[serde(default)]
    pub bearer_token: bool,
    #[serde(default)]
    pub headers: Option<BTreeMap<String, Option<String>>>,
}

impl DecisionRecord {
    pub fn is_http(&self) -> bool {
        self.protocol != "TCP" && self.method.is_some()
    }

    pub fn allowed(&self) -> bool {
        self.decision == Some(Verdict::Allow)
    }

    /// One line naming the request, for reports: caller, method, host and
    /// path (HTTP) or port (TCP).
    pub fn describe(&self) -> String {
        let caller = match (&self.source_principal, &self.source_address) {
            (Some(p), _) => p.clone(),
            (None, Some(a)) => format!("plaintext {}", a.ip()),
            (None, None) => "plaintext".to_owned(),
        };
        let port = self
            .destination_port
            .map(|p| format!(" (port {p})"))
            .unwrap_or_default();
        let line = match (&self.method, &self.path) {
            (Some(method), Some(path)) if self.is_http() => {
                let host = self.authority.as_deref().unwrap_or("");
                format!("{caller} {method} {host}{path}{port}")
            }
            _ => format!("{caller} TCP{port}"),
        };
        one_line(line)
    }
}

/// Records read from one or more logs, and what was left out.
#[derive(Debug, Default)]
pub struct Records {
    /// Inbound decisions, in the order read.
    pub records: Vec<DecisionRecord>,
    /// Lines that are not records, as `file:line: why` (the first few).
    pub unreadable: Vec<String>,
    pub unreadable_count: usize,
    /// Records of other kinds (outbound, audit, dry-run), skipped.
    pub other: usize,
}

/// How many unreadable lines are named one by one.
const NAMED_UNREADABLE: usize = 5;

impl Records {
    /// Reads JSON Lines from `input`, named `source` in messages. Blank
    /// lines are skipped; a line that is not a record is counted and named,
    /// not fatal (a log being written may end in half a line).
    pub fn read(&mut self, source: &str, input: impl BufRead) -> std::io::Result<()> {
        for (i, line) in input.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<DecisionRecord>(&line) {
                Ok(record) if record.kind == "access" && record.direction == "inbound" => {
                    self.records.push(record);
                }
                Ok(_) => self.other += 1,
                Err(e) => {
                    self.unreadable_count += 1;
                    if self.unreadable.len() < NAMED_UNREADABLE {
                        self.unreadable
                            .push(format!("{source}:{}: not a decision record: {e}", i + 1));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(claims: Value) -> JwtPrincipal {
        let Value::Object(claims) = claims else {
            panic!("an object")
        };
        JwtPrincipal::new(Arc::new(claims), Arc::from(["scope".to_owned()]))
    }

    /// Written and read back, the facts give authorization the same values.
    #[test]
    fn claims_round_trip() {
        let jwt = principal(serde_json::json!({
            "iss": "https://issuer/x", "sub": "alice", "aud": ["a", "b"], "azp": "web",
            "scope": "read write", "groups": ["dev", "ops"], "nested": {"team": "blue"},
            "n": 7
        }));
        let refs = References {
            claims: vec![
                vec!["scope".into()],
                vec!["groups".into()],
                vec!["nested".into(), "team".into()],
                vec!["n".into()],
                vec!["missing".into()],
            ],
            headers: vec![],
        };
        let recorded = RequestAuth::of(&jwt, &refs);
        let json = serde_json::to_string(&recorded).unwrap();
        let back: RequestAuth = serde_json::from_str(&json).unwrap();
        assert_eq!(back, recorded);
        let rebuilt = back.principal();
        for path in &refs.claims {
            assert_eq!(
                rebuilt.claim_values(path),
                jwt.claim_values(path),
                "{path:?}"
            );
            assert!(back.holds(path));
        }
        assert!(!back.holds(&["other".into()]));
        assert_eq!(rebuilt.principal(), "https://issuer/x/alice");
        assert_eq!(rebuilt.audiences, ["a", "b"]);
        assert_eq!(rebuilt.presenter.as_deref(), Some("web"));
    }

    #[test]
    fn credentials_are_never_recorded() {
        let request = HttpRequest {
            headers: vec![
                ("Authorization".into(), "Bearer x".into()),
                ("cookie".into(), "s=1".into()),
                ("x-a".into(), "1".into()),
                ("x-a".into(), "2".into()),
            ],
            ..HttpRequest::default()
        };
        let names = ["authorization", "cookie", "x-a", "x-b"].map(String::from);
        let values = header_values(&request, &names);
        assert_eq!(values.len(), 2);
        assert_eq!(values["x-a"].as_deref(), Some("1,2"));
        assert_eq!(values["x-b"], None);
        assert!(has_bearer_token(&request));
    }

    /// A value whose 7th byte falls inside a multi-byte character is read,
    /// not sliced (slicing the `str` there panicked).
    #[test]
    fn bearer_check_takes_any_value() {
        let with = |value: &str| HttpRequest {
            headers: vec![("authorization".into(), value.into())],
            ..HttpRequest::default()
        };
        assert!(!has_bearer_token(&with("Bearer\u{e9}x")));
        assert!(!has_bearer_token(&with("\u{1f600}\u{1f600}x")));
        assert!(has_bearer_token(&with("bEaReR \u{e9}")));
        assert!(!has_bearer_token(&with("Bearer ")));
    }

    /// The query is never recorded, so a token there is flagged.
    #[test]
    fn a_token_in_the_default_query_parameter_is_flagged() {
        let at = |path: &str| HttpRequest {
            path: path.into(),
            ..HttpRequest::default()
        };
        assert!(has_bearer_token(&at("/a?x=1&access_token=abc")));
        assert!(!has_bearer_token(&at("/a?access_token=")));
        assert!(!has_bearer_token(&at("/a?other_token=abc")));
    }

    #[test]
    fn reading_skips_and_names() {
        let text = concat!(
            r#"{"v":1,"time":"2024-05-01T10:00:00.000Z","type":"access","direction":"inbound","protocol":"HTTP/1.1","source_address":"127.0.0.1:5000","decision":"allow","method":"GET","path":"/a","workload":{"namespace":"ns","name":"w","labels":{"app":"w"}},"destination_port":80,"new_field":1}"#,
            "\n\n",
            r#"{"time":"2024-05-01T10:00:00.000Z","type":"access","direction":"outbound","decision":"allow"}"#,
            "\n",
            "{\"half\n"
        );
        let mut records = Records::default();
        records.read("a.jsonl", text.as_bytes()).unwrap();
        assert_eq!(records.records.len(), 1);
        assert_eq!(records.other, 1);
        assert_eq!(records.unreadable_count, 1);
        assert!(
            records.unreadable[0].starts_with("a.jsonl:4: "),
            "{:?}",
            records.unreadable
        );
        let r = &records.records[0];
        assert_eq!(r.v, 1);
        assert_eq!(r.workload.as_ref().unwrap().to_string(), "ns/w");
        assert_eq!(r.describe(), "plaintext 127.0.0.1 GET /a (port 80)");
    }
}
