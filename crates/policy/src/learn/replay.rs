//! Deciding recorded requests again under other policies, and what would
//! change: allowed → denied, denied → allowed, grouped by destination
//! workload and the policy that decides now.
//!
//! Each record is decided by this crate's pipeline
//! ([`WorkloadPolicy::authenticated_as`], then CUSTOM and authorization as
//! the proxy runs them). A record that lacks a fact the proposed policies
//! read (a claim or header not recorded, a CUSTOM verdict never asked, a
//! token never verified) is reported as undecidable, never guessed.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::record::DecisionRecord;
use crate::authz::CustomVerdict;
use crate::pipeline::{InboundDecision, Stage};
use crate::request::{Connection, HttpRequest};
use crate::resolve::{PolicySet, Workload, WorkloadPolicy};

/// What became of one recorded decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    AllowedToDenied,
    DeniedToAllowed,
    Undecidable,
    Unchanged,
}

impl Change {
    fn title(self) -> &'static str {
        match self {
            Change::AllowedToDenied => "allowed → denied",
            Change::DeniedToAllowed => "denied → allowed",
            Change::Undecidable => "undecidable",
            Change::Unchanged => "unchanged",
        }
    }
}

/// Requests of one kind of change, one workload and one deciding policy
/// (or, when undecidable, one reason).
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub change: Change,
    pub workload: String,
    /// What decides now (`bookinfo/allow-nothing`, `no ALLOW rule
    /// matched`, ...), or why it cannot be decided.
    pub decided_by: String,
    pub count: u64,
    /// A few distinct requests, most frequent first.
    pub examples: Vec<Example>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub request: String,
    pub count: u64,
    /// Why it is decided so now.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// The outcome of a replay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Replay {
    pub records: u64,
    pub allowed_to_denied: u64,
    pub denied_to_allowed: u64,
    pub undecidable: u64,
    pub unchanged: u64,
    pub groups: Vec<Group>,
}

/// How many examples each group keeps.
const EXAMPLES: usize = 3;

impl Replay {
    /// Whether a request that was allowed would be denied.
    pub fn breaks(&self) -> bool {
        self.allowed_to_denied > 0
    }

    /// For people: a summary line, then each group with its examples.
    pub fn text(&self) -> String {
        let mut out = format!(
            "replayed {} request(s): {} allowed → denied, {} denied → allowed, {} undecidable, {} unchanged\n",
            self.records,
            self.allowed_to_denied,
            self.denied_to_allowed,
            self.undecidable,
            self.unchanged
        );
        let mut last = None;
        for group in &self.groups {
            if last != Some(group.change) {
                let total: u64 = self
                    .groups
                    .iter()
                    .filter(|g| g.change == group.change)
                    .map(|g| g.count)
                    .sum();
                out.push_str(&format!("\n{}: {total} request(s)\n", group.change.title()));
                last = Some(group.change);
            }
            let by = match group.change {
                Change::Undecidable => "",
                _ => "decided by ",
            };
            out.push_str(&format!(
                "  {}: {} request(s), {by}{}\n",
                group.workload, group.count, group.decided_by
            ));
            for example in &group.examples {
                out.push_str(&format!("    {}× {}\n", example.count, example.request));
                if !example.reason.is_empty() {
                    out.push_str(&format!("       {}\n", example.reason));
                }
            }
        }
        out
    }
}

/// Decides every record again under `set` and groups what changed.
pub fn replay(set: &PolicySet, records: &[DecisionRecord]) -> Replay {
    let mut compiled: HashMap<Workload, WorkloadPolicy> = HashMap::new();
    let mut report = Replay::default();
    // (change, workload, decided by) → count, and per request: count, reason.
    type Key = (Change, String, String);
    type Examples = BTreeMap<String, (u64, String)>;
    let mut groups: BTreeMap<Key, (u64, Examples)> = BTreeMap::new();
    for record in records {
        report.records += 1;
        let workload = record.workload.as_ref();
        let name = workload.map_or_else(|| "(unknown workload)".to_owned(), |w| w.to_string());
        let policy = workload.map(|w| {
            &*compiled
                .entry(w.workload())
                .or_insert_with_key(|w| set.for_workload(w))
        });
        let decided = match refused_before_policy(record) {
            // Whatever the record lacks, no policy changes it.
            true => Ok(None),
            false => policy
                .ok_or_else(no_facts)
                .and_then(|p| decide_again(p, record).map(|d| d.map(|d| (p, d)))),
        };
        let (change, decided_by, reason) = match decided {
            Err(why) => (Change::Undecidable, why, String::new()),
            Ok(None) => (Change::Unchanged, String::new(), String::new()),
            Ok(Some((policy, decision))) => {
                let change = match (record.allowed(), decision.allowed()) {
                    (true, false) => Change::AllowedToDenied,
                    (false, true) => Change::DeniedToAllowed,
                    _ => Change::Unchanged,
                };
                if change == Change::Unchanged {
                    (change, String::new(), String::new())
                } else {
                    let (connection, http) = request_of(record);
                    let reason = decision.reason(policy, &connection, http.as_ref());
                    (change, decided_by(&decision, policy, &connection), reason)
                }
            }
        };
        match change {
            Change::Unchanged => {
                report.unchanged += 1;
                continue;
            }
            Change::AllowedToDenied => report.allowed_to_denied += 1,
            Change::DeniedToAllowed => report.denied_to_allowed += 1,
            Change::Undecidable => report.undecidable += 1,
        }
        let group = groups.entry((change, name, decided_by)).or_default();
        group.0 += 1;
        let example = group
            .1
            .entry(record.describe())
            .or_insert_with(|| (0, reason));
        example.0 += 1;
    }
    report.groups = groups
        .into_iter()
        .map(|((change, workload, decided_by), (count, examples))| {
            let mut examples: Vec<Example> = examples
                .into_iter()
                .map(|(request, (count, reason))| Example {
                    request,
                    count,
                    reason,
                })
                .collect();
            examples.sort_by(|a, b| {
                b.count
                    .cmp(&a.count)
                    .then_with(|| a.request.cmp(&b.request))
            });
            examples.truncate(EXAMPLES);
            Group {
                change,
                workload,
                decided_by,
                count,
                examples,
            }
        })
        .collect();
    report
        .groups
        .sort_by(|a, b| a.change.cmp(&b.change).then_with(|| b.count.cmp(&a.count)));
    report
}

fn no_facts() -> String {
    "the record has no workload facts (written by a proxy before record version 1)".to_owned()
}

/// Whether the proxy refused `record`'s request itself, before any policy
/// (stage `request`: such records are written without facts).
fn refused_before_policy(record: &DecisionRecord) -> bool {
    record.stage == Some(Stage::Request)
}

/// The connection and request as the proxy put them to the engine.
fn request_of(record: &DecisionRecord) -> (Connection, Option<HttpRequest>) {
    let connection = Connection {
        source_ip: record.source_address.map(|a| a.ip()),
        source_principal: record.source_principal.clone(),
        destination_ip: record.destination_ip,
        destination_port: record.destination_port.unwrap_or_default(),
        sni: record.sni.clone(),
    };
    let http = record.is_http().then(|| HttpRequest {
        method: record.method.clone().unwrap_or_default(),
        path: record
            .original_path
            .clone()
            .or_else(|| record.path.clone())
            .unwrap_or_else(|| "/".to_owned()),
        host: record.authority.clone().unwrap_or_default(),
        headers: record
            .headers
            .iter()
            .flatten()
            .filter_map(|(name, value)| Some((name.clone(), value.clone()?)))
            .collect(),
        remote_ip: record.remote_ip,
    });
    (connection, http)
}

/// The decision `policy` makes for `record`: `Ok(None)` when no policy
/// decided it (the proxy refused the request itself), `Err` with the fact
/// that is missing when it cannot be known.
pub fn decide_again(
    policy: &WorkloadPolicy,
    record: &DecisionRecord,
) -> Result<Option<InboundDecision>, String> {
    if refused_before_policy(record) {
        return Ok(None);
    }
    if record.v < 1 || record.workload.is_none() || record.destination_port.is_none() {
        return Err(no_facts());
    }
    match record.stage {
        Some(Stage::RequestAuthentication) if !record.allowed() => {
            return Err(
                "its token failed verification when logged, and a token is never logged to verify again"
                    .to_owned(),
            );
        }
        _ => {}
    }
    let (connection, http) = request_of(record);
    if record.stage == Some(Stage::PeerAuthentication) && !record.allowed() {
        return match policy.authenticated_as(&connection, None, None) {
            Err(denied) => Ok(Some(*denied)),
            Ok(_) => Err(
                "peer authentication refused it before any request was read; the proposed policies accept the connection, and what it would have sent is unknown"
                    .to_owned(),
            ),
        };
    }
    let principal = match (&record.request_auth, &http) {
        (Some(auth), Some(_)) if !policy.authn.is_empty() => {
            if !policy.authn.accepts(&auth.issuer, &auth.audiences) {
                return Err(format!(
                    "its token (issuer {:?}) was verified when logged; no proposed RequestAuthentication takes it, and a token is never logged to verify again",
                    auth.issuer
                ));
            }
            Some(auth.principal())
        }
        // No RequestAuthentication applies: the token is not read at all.
        (Some(_), Some(_)) => None,
        (None, Some(_)) if record.bearer_token && !policy.authn.is_empty() => {
            return Err(
                "it carried a bearer token that no RequestAuthentication read when logged; the proposed ones would verify it, and a token is never logged"
                    .to_owned(),
            );
        }
        (None, Some(_)) if policy.authn.reads_tokens_elsewhere() => {
            return Err(
                "the proposed RequestAuthentications read tokens from headers, parameters or cookies besides `Authorization: Bearer`, and the record does not say whether it carried one there (a token is never logged)"
                    .to_owned(),
            );
        }
        _ => None,
    };
    if http.is_some() {
        let references = policy.authz.references();
        if let Some(name) = references.headers.iter().find(|name| {
            !record
                .headers
                .as_ref()
                .is_some_and(|h| h.contains_key(*name))
        }) {
            return Err(format!(
                "the policies read request.headers[{name}], which the record does not hold (`meshward proxy --log-header {name}` records it)"
            ));
        }
        if let Some(auth) = record.request_auth.as_ref().filter(|_| principal.is_some())
            && let Some(path) = references.claims.iter().find(|p| !auth.holds(p))
        {
            return Err(format!(
                "the policies read request.auth.claims[{}], which was not recorded (no policy in force read it when logged)",
                path.join("][")
            ));
        }
    }
    let authenticated = match policy.authenticated_as(&connection, http.as_ref(), principal) {
        Ok(a) => a,
        Err(denied) => return Ok(Some(*denied)),
    };
    let provider = {
        let attrs = authenticated.attributes(policy, &connection, http.as_ref());
        policy
            .authz
            .custom_check(&attrs)
            .map(|c| c.provider.name.clone())
    };
    let custom = match provider {
        None => None,
        Some(provider) => Some(match record.ext_authz.as_deref() {
            Some("allow") => CustomVerdict::Allow,
            Some("deny") => CustomVerdict::Deny(record.status.unwrap_or(403)),
            Some("error") => CustomVerdict::Error("it failed when logged".to_owned()),
            _ => {
                return Err(format!(
                    "a CUSTOM policy would ask provider {provider:?}, which was not asked when it was logged"
                ));
            }
        }),
    };
    Ok(Some(authenticated.authorize(
        policy,
        &connection,
        http.as_ref(),
        custom,
    )))
}

/// What decides now, in a few words: the policy and rule, or why none.
fn decided_by(
    decision: &InboundDecision,
    policy: &WorkloadPolicy,
    connection: &Connection,
) -> String {
    match decision.stage {
        Stage::PeerAuthentication => format!(
            "peer authentication ({})",
            policy.mtls.source_for_port(connection.destination_port)
        ),
        Stage::Request => "the request itself".to_owned(),
        Stage::RequestAuthentication => "request authentication".to_owned(),
        Stage::Authorization => match decision.authz.as_ref().and_then(|a| a.deciding.as_ref()) {
            Some(rule) => match rule.rule {
                Some(n) => format!("{} rule {n}", rule.policy),
                None => rule.policy.to_string(),
            },
            None if decision.allowed() => "no ALLOW policy applies".to_owned(),
            None => "no ALLOW rule matched".to_owned(),
        },
    }
}
