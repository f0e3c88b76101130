//! Authorization with Istio's semantics: CUSTOM, then DENY, then ALLOW;
//! AUDIT marks, dry-run reports, and every decision explains itself.
//!
//! An [`Authorizer`] is built once per workload and configuration (the
//! policies that apply to that workload, compiled and indexed) and then
//! answers per request by looking up only the rules that could match. The
//! explanation of a decision is built on demand ([`Authorizer::explain`]),
//! not per request.

pub(crate) mod attributes;
pub(crate) mod compile;
pub mod condition;
pub mod matcher;
pub mod normalize;
pub mod path_template;
pub(crate) mod trust_domain;

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

pub use attributes::Attributes;
use compile::CompiledRule;

use crate::api::{Action, AuthorizationPolicy, ExtensionProvider, MeshConfig};
use crate::validate::{DRY_RUN_ANNOTATION, parse_bool};

/// A policy by `namespace/name`; cheap to clone, as decisions carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyRef {
    pub namespace: std::sync::Arc<str>,
    pub name: std::sync::Arc<str>,
}

impl PolicyRef {
    pub fn new(namespace: &str, name: &str) -> PolicyRef {
        PolicyRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Serialize for RuleRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("RuleRef", 3)?;
        st.serialize_field("policy", &self.policy.to_string())?;
        st.serialize_field("rule", &self.rule)?;
        st.serialize_field("action", &self.action)?;
        st.end()
    }
}

/// The policy, rule and action behind an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub rule: Option<usize>,
    pub action: Action,
}

/// allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// What a dry-run policy would have done to this request on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DryRunResult {
    #[serde(serialize_with = "display")]
    pub policy: PolicyRef,
    pub action: Action,
    /// The rule that matched, if any.
    pub rule: Option<usize>,
    pub decision: Verdict,
}

fn display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Why authorization decided as it did; [`Authorizer::explain`] turns it
/// (with the request) into a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The deciding rule matched: a DENY rule, or an ALLOW rule.
    Matched,
    /// A CUSTOM rule matched and its provider said no.
    CustomDenied { provider: String },
    /// A CUSTOM rule matched and its provider failed, with failOpen false.
    CustomFailed { provider: String, error: String },
    /// A CUSTOM rule matched and nobody asked its provider.
    CustomNotConsulted { provider: String },
    /// A CUSTOM rule matched but the workload's provider setup is invalid.
    InvalidProvider(String),
    /// ALLOW policies apply and none of their rules matched.
    NoAllowMatched,
    /// No authorization policy applies at all.
    NoPolicies,
    /// Policies apply, no DENY rule matched and no enforced ALLOW policy applies.
    NoAllowPolicies,
}

/// The outcome of authorization for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzDecision {
    pub verdict: Verdict,
    /// The rule that decided; `None` when nothing matched (allow with no
    /// ALLOW policies, or deny-by-default with no ALLOW rule matching).
    pub deciding: Option<RuleRef>,
    pub outcome: Outcome,
    /// The first AUDIT rule that matched: the request is to be audit-logged.
    pub audit: Option<RuleRef>,
    pub dry_run: Vec<DryRunResult>,
    /// The HTTP status for a CUSTOM denial or provider error (403 otherwise).
    pub status: u16,
}

impl AuthzDecision {
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// The answer of an external authorizer for a CUSTOM policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomVerdict {
    Allow,
    /// Denied, with the status the provider returned (403 if it did not say).
    Deny(u16),
    /// The provider could not be reached or answered nonsense.
    Error(String),
}

/// A CUSTOM rule matched: this provider must be asked before deciding.
#[derive(Debug, Clone)]
pub struct CustomCheck<'a> {
    pub rule: RuleRef,
    pub provider: &'a ExtensionProvider,
}

#[derive(Debug, Clone)]
struct PolicyInfo {
    key: PolicyRef,
    action: Action,
    provider: Option<String>,
}

/// Rules of one action for one protocol, indexed by what can be looked up
/// exactly (normalized path, peer principal, destination port) so a request
/// only evaluates the rules that could match it.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleSet {
    rules: Vec<CompiledRule>,
    by_path: HashMap<String, Vec<u32>>,
    by_principal: HashMap<String, Vec<u32>>,
    by_port: HashMap<u16, Vec<u32>>,
    scan: Vec<u32>,
}

impl RuleSet {
    fn new(rules: Vec<CompiledRule>) -> RuleSet {
        let mut set = RuleSet::default();
        for (i, rule) in rules.iter().enumerate() {
            let id = i as u32;
            let push = |map: &mut HashMap<String, Vec<u32>>, keys: Vec<&str>| {
                for key in keys {
                    let ids = map.entry(key.to_owned()).or_default();
                    if ids.last() != Some(&id) {
                        ids.push(id);
                    }
                }
            };
            if let Some(paths) = rule.required_paths() {
                push(&mut set.by_path, paths);
            } else if let Some(principals) = rule.required_principals() {
                push(&mut set.by_principal, principals);
            } else if let Some(ports) = rule.required_ports() {
                for port in ports {
                    let ids = set.by_port.entry(port).or_default();
                    if ids.last() != Some(&id) {
                        ids.push(id);
                    }
                }
            } else {
                set.scan.push(id);
            }
        }
        set.rules = rules;
        set
    }

    /// The first rule (in policy order) that matches.
    fn first_match(&self, attrs: &Attributes<'_>) -> Option<&CompiledRule> {
        let mut best: Option<u32> = None;
        let mut consider = |ids: &[u32]| {
            for &id in ids {
                if best.is_some_and(|b| id >= b) {
                    break;
                }
                if self.rules[id as usize].matches(attrs) {
                    best = Some(id);
                    break;
                }
            }
        };
        if let Some(ids) = attrs.path().and_then(|p| self.by_path.get(p)) {
            consider(ids);
        }
        if let Some(ids) = attrs.principal().and_then(|p| self.by_principal.get(p)) {
            consider(ids);
        }
        if let Some(ids) = self.by_port.get(&attrs.destination_port) {
            consider(ids);
        }
        consider(&self.scan);
        best.map(|id| &self.rules[id as usize])
    }
}

/// One action's rules, for HTTP requests and for TCP connections.
#[derive(Debug, Clone, Default)]
struct ActionRules {
    http: RuleSet,
    tcp: RuleSet,
}

impl ActionRules {
    fn new(rules: Vec<CompiledRule>, action: Action, on_tcp: bool) -> Self {
        let tcp = rules
            .iter()
            .filter(|_| on_tcp)
            .filter_map(|r| r.for_tcp(action))
            .collect();
        ActionRules {
            http: RuleSet::new(rules),
            tcp: RuleSet::new(tcp),
        }
    }

    fn for_request(&self, attrs: &Attributes<'_>) -> &RuleSet {
        if attrs.is_http() {
            &self.http
        } else {
            &self.tcp
        }
    }
}

#[derive(Debug, Clone)]
struct DryRunPolicy {
    policy: usize,
    rules: ActionRules,
}

/// The compiled authorization policies of one workload.
#[derive(Debug, Clone)]
pub struct Authorizer {
    policies: Vec<PolicyInfo>,
    custom: ActionRules,
    deny: ActionRules,
    allow: ActionRules,
    audit: ActionRules,
    dry_run: Vec<DryRunPolicy>,
    /// The provider CUSTOM policies use, when they agree on exactly one that
    /// MeshConfig defines as an authorizer; otherwise why not.
    provider: Result<Option<ExtensionProvider>, String>,
    /// Enforced (not dry-run) ALLOW policies apply: requests no ALLOW rule
    /// matches are denied. Decided at compile time, not per request.
    has_allow: bool,
    references: References,
}

/// The request facts beyond the connection, method, path and host that the
/// rules of one workload read: what a decision record must keep for the
/// decision to be made again offline (`meshward replay`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// `request.auth.claims[..]` paths, each once, in first-use order.
    pub claims: Vec<Vec<String>>,
    /// Lower-cased header names (`request.headers[..]` and the inline form).
    pub headers: Vec<String>,
}

impl References {
    fn of<'r>(rules: impl Iterator<Item = &'r CompiledRule>) -> References {
        let mut refs = References::default();
        for clause in rules.flat_map(CompiledRule::clauses) {
            match &clause.attr {
                condition::Attr::RequestClaim(path) if !refs.claims.contains(path) => {
                    refs.claims.push(path.clone());
                }
                condition::Attr::RequestHeader(name) | condition::Attr::InlineHeader(name)
                    if !refs.headers.contains(name) =>
                {
                    refs.headers.push(name.clone());
                }
                _ => {}
            }
        }
        refs
    }

    /// Whether nothing beyond the standard facts is read.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty() && self.headers.is_empty()
    }
}

impl Default for Authorizer {
    fn default() -> Self {
        Authorizer {
            policies: Vec::new(),
            custom: ActionRules::default(),
            deny: ActionRules::default(),
            allow: ActionRules::default(),
            audit: ActionRules::default(),
            dry_run: Vec::new(),
            provider: Ok(None),
            has_allow: false,
            references: References::default(),
        }
    }
}

/// Whether an AuthorizationPolicy is in dry-run: the annotation parses as true.
/// A value that does not parse leaves the policy enforced (fail closed).
pub fn is_dry_run(policy: &AuthorizationPolicy) -> bool {
    matches!(policy.spec.action, Action::Allow | Action::Deny)
        && policy
            .metadata
            .annotations
            .get(DRY_RUN_ANNOTATION)
            .and_then(|v| parse_bool(v))
            .unwrap_or(false)
}

impl Authorizer {
    /// Compiles the policies that apply to one workload.
    pub fn new(policies: &[&AuthorizationPolicy], mesh: &MeshConfig) -> Authorizer {
        let mut sorted: Vec<&AuthorizationPolicy> = policies.to_vec();
        sorted.sort_by(|a, b| crate::resolve::oldest_first(&a.metadata, &b.metadata));
        let mut infos = Vec::with_capacity(sorted.len());
        let mut by_action: HashMap<Action, Vec<CompiledRule>> = HashMap::new();
        let mut dry_run = Vec::new();
        for (idx, policy) in sorted.iter().enumerate() {
            let namespace = policy.metadata.namespace_or_default();
            infos.push(PolicyInfo {
                key: PolicyRef::new(namespace, &policy.metadata.name),
                action: policy.spec.action,
                provider: policy.spec.provider.as_ref().map(|p| p.name.clone()),
            });
            let rules: Vec<CompiledRule> = policy
                .spec
                .rules
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    compile::compile_rule(r, idx, i, policy.spec.action, namespace, mesh)
                })
                .collect();
            if is_dry_run(policy) {
                dry_run.push(DryRunPolicy {
                    policy: idx,
                    rules: ActionRules::new(rules, policy.spec.action, true),
                });
            } else {
                by_action
                    .entry(policy.spec.action)
                    .or_default()
                    .extend(rules);
            }
        }
        let provider = custom_provider(&infos, mesh);
        // When several rules match, the one reported is the first in the
        // order of Envoy's RBAC policy map: by the name Istio gives each rule,
        // `ns[<ns>]-policy[<name>]-rule[<i>]`, compared as strings.
        let envoy_name = |r: &CompiledRule| {
            let key = &infos[r.policy].key;
            format!(
                "ns[{}]-policy[{}]-rule[{}]",
                key.namespace, key.name, r.rule
            )
        };
        let mut take = |a: Action| {
            let mut rules = by_action.remove(&a).unwrap_or_default();
            rules.sort_by_cached_key(envoy_name);
            rules
        };
        // An HTTP ext_authz provider cannot judge a TCP connection: Istio skips
        // such CUSTOM policies on TCP. An invalid provider denies everywhere.
        let custom_on_tcp = match &provider {
            Ok(Some(p)) => p.envoy_ext_authz_grpc.is_some(),
            Ok(None) => false,
            Err(_) => true,
        };
        let has_allow = sorted
            .iter()
            .any(|p| p.spec.action == Action::Allow && !is_dry_run(p));
        let custom = ActionRules::new(take(Action::Custom), Action::Custom, custom_on_tcp);
        let deny = ActionRules::new(take(Action::Deny), Action::Deny, true);
        let allow = ActionRules::new(take(Action::Allow), Action::Allow, true);
        let audit = ActionRules::new(take(Action::Audit), Action::Audit, true);
        // The HTTP form of a rule set holds every rule; the TCP form, fewer clauses.
        let references = References::of(
            [&custom, &deny, &allow, &audit]
                .into_iter()
                .chain(dry_run.iter().map(|d| &d.rules))
                .flat_map(|set| set.http.rules.iter()),
        );
        Authorizer {
            has_allow,
            custom,
            deny,
            allow,
            audit,
            policies: infos,
            dry_run,
            provider,
            references,
        }
    }

    /// The claims and headers this workload's rules read.
    pub fn references(&self) -> &References {
        &self.references
    }

    fn rule_ref(&self, rule: &CompiledRule) -> RuleRef {
        let info = &self.policies[rule.policy];
        RuleRef {
            policy: info.key.clone(),
            rule: Some(rule.rule),
            action: info.action,
        }
    }

    /// The external check a request needs before [`Authorizer::decide`], if a
    /// CUSTOM rule with a valid provider matches it.
    pub fn custom_check(&self, attrs: &Attributes<'_>) -> Option<CustomCheck<'_>> {
        let rule = self.custom.for_request(attrs).first_match(attrs)?;
        match &self.provider {
            Ok(Some(provider)) => Some(CustomCheck {
                rule: self.rule_ref(rule),
                provider,
            }),
            _ => None,
        }
    }

    /// Decides, given the external authorizer's answer for the check
    /// [`Authorizer::custom_check`] asked for (`None` if it asked for none).
    pub fn decide(&self, attrs: &Attributes<'_>, custom: Option<CustomVerdict>) -> AuthzDecision {
        let decision = |verdict, deciding: Option<&CompiledRule>, outcome, status| AuthzDecision {
            verdict,
            deciding: deciding.map(|r| self.rule_ref(r)),
            outcome,
            audit: self
                .audit
                .for_request(attrs)
                .first_match(attrs)
                .map(|r| self.rule_ref(r)),
            dry_run: self.dry_run_results(attrs),
            status,
        };

        if let Some(rule) = self.custom.for_request(attrs).first_match(attrs) {
            match (&self.provider, custom) {
                (Err(why), _) => {
                    return decision(
                        Verdict::Deny,
                        Some(rule),
                        Outcome::InvalidProvider(why.clone()),
                        403,
                    );
                }
                (Ok(Some(p)), Some(CustomVerdict::Deny(status))) => {
                    let outcome = Outcome::CustomDenied {
                        provider: p.name.clone(),
                    };
                    return decision(Verdict::Deny, Some(rule), outcome, status);
                }
                (Ok(Some(p)), Some(CustomVerdict::Error(error))) => {
                    if !p.fail_open() {
                        let outcome = Outcome::CustomFailed {
                            provider: p.name.clone(),
                            error,
                        };
                        return decision(Verdict::Deny, Some(rule), outcome, p.status_on_error());
                    }
                }
                (Ok(Some(p)), None) => {
                    let outcome = Outcome::CustomNotConsulted {
                        provider: p.name.clone(),
                    };
                    return decision(Verdict::Deny, Some(rule), outcome, 403);
                }
                // The provider allowed: go on with DENY and ALLOW.
                (Ok(_), _) => {}
            }
        }

        if let Some(rule) = self.deny.for_request(attrs).first_match(attrs) {
            return decision(Verdict::Deny, Some(rule), Outcome::Matched, 403);
        }
        if !self.has_allow {
            let outcome = if self.policies.is_empty() {
                Outcome::NoPolicies
            } else {
                Outcome::NoAllowPolicies
            };
            return decision(Verdict::Allow, None, outcome, 200);
        }
        match self.allow.for_request(attrs).first_match(attrs) {
            Some(rule) => decision(Verdict::Allow, Some(rule), Outcome::Matched, 200),
            None => decision(Verdict::Deny, None, Outcome::NoAllowMatched, 403),
        }
    }

    /// One line for humans: which policy and rule decided, and what matched
    /// ("denied by foo/deny-legacy rule 0: source.namespaces matched \"legacy\"").
    /// Computed on demand, from the decision and the same request.
    pub fn explain(&self, attrs: &Attributes<'_>, decision: &AuthzDecision) -> String {
        let Some(r) = &decision.deciding else {
            return match decision.outcome {
                Outcome::NoPolicies => "allowed: no authorization policy applies".to_owned(),
                Outcome::NoAllowPolicies => {
                    "allowed: no DENY rule matched and no ALLOW policy applies".to_owned()
                }
                _ => {
                    let names: Vec<String> = self
                        .policies
                        .iter()
                        .enumerate()
                        .filter(|(i, p)| {
                            p.action == Action::Allow
                                && !self.dry_run.iter().any(|d| d.policy == *i)
                        })
                        .map(|(_, p)| p.key.to_string())
                        .collect();
                    let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
                    let more = if names.len() > 5 {
                        format!(" and {} more", names.len() - 5)
                    } else {
                        String::new()
                    };
                    let tcp = if attrs.is_http() {
                        ""
                    } else {
                        " (rules with HTTP-only fields never match TCP traffic)"
                    };
                    format!(
                        "denied: no ALLOW rule matched{tcp}; ALLOW policies that apply: {shown}{more}"
                    )
                }
            };
        };
        let rule_no = r.rule.unwrap_or(0);
        let set = match r.action {
            Action::Custom => &self.custom,
            Action::Deny => &self.deny,
            Action::Allow => &self.allow,
            Action::Audit => &self.audit,
        };
        let why = set
            .for_request(attrs)
            .first_match(attrs)
            .map(|rule| rule.explain(attrs))
            .unwrap_or_default();
        match &decision.outcome {
            Outcome::InvalidProvider(e) => format!("denied by {} rule {rule_no}: {e}", r.policy),
            Outcome::CustomDenied { provider } => {
                format!(
                    "denied by CUSTOM {} rule {rule_no}: provider {provider:?} denied the request ({why})",
                    r.policy
                )
            }
            Outcome::CustomFailed { provider, error } => format!(
                "denied by CUSTOM {} rule {rule_no}: provider {provider:?} failed ({error}) and failOpen is false",
                r.policy
            ),
            Outcome::CustomNotConsulted { provider } => format!(
                "denied by CUSTOM {} rule {rule_no}: provider {provider:?} was not consulted",
                r.policy
            ),
            _ => {
                let verb = if decision.verdict == Verdict::Allow {
                    "allowed"
                } else {
                    "denied"
                };
                format!("{verb} by {} rule {rule_no}: {why}", r.policy)
            }
        }
    }

    /// Authorizes in one call, asking `ext_authz` when a CUSTOM rule matches.
    pub fn authorize(
        &self,
        attrs: &Attributes<'_>,
        ext_authz: impl FnOnce(&CustomCheck<'_>) -> CustomVerdict,
    ) -> AuthzDecision {
        let custom = self.custom_check(attrs).map(|check| ext_authz(&check));
        self.decide(attrs, custom)
    }

    fn dry_run_results(&self, attrs: &Attributes<'_>) -> Vec<DryRunResult> {
        self.dry_run
            .iter()
            .map(|d| {
                let info = &self.policies[d.policy];
                let matched = d.rules.for_request(attrs).first_match(attrs);
                let decision = match (info.action, matched.is_some()) {
                    (Action::Deny, true) | (Action::Allow, false) => Verdict::Deny,
                    _ => Verdict::Allow,
                };
                DryRunResult {
                    policy: info.key.clone(),
                    action: info.action,
                    rule: matched.map(|r| r.rule),
                    decision,
                }
            })
            .collect()
    }
}

/// Istio supports one CUSTOM provider per workload, and it must be defined
/// in MeshConfig as an ext_authz provider. Anything else makes every CUSTOM
/// rule deny what it matches.
fn custom_provider(
    infos: &[PolicyInfo],
    mesh: &MeshConfig,
) -> Result<Option<ExtensionProvider>, String> {
    let customs: Vec<&PolicyInfo> = infos
        .iter()
        .filter(|p| p.action == Action::Custom)
        .collect();
    if let Some(p) = customs
        .iter()
        .find(|p| p.provider.as_deref().is_none_or(str::is_empty))
    {
        return Err(format!("CUSTOM policy {} names no provider", p.key));
    }
    let mut names: Vec<&str> = customs
        .iter()
        .filter_map(|p| p.provider.as_deref())
        .collect();
    names.sort_unstable();
    names.dedup();
    match names.as_slice() {
        [] => Ok(None),
        [name] => match mesh.extension_provider(name) {
            Some(p) if p.is_authorizer() => Ok(Some(p.clone())),
            Some(_) => Err(format!(
                "CUSTOM provider {name:?} is not an envoyExtAuthzHttp or envoyExtAuthzGrpc provider"
            )),
            None => Err(format!(
                "CUSTOM provider {name:?} is not defined in meshConfig.extensionProviders"
            )),
        },
        many => Err(format!(
            "only 1 provider can be used per workload, found multiple providers: {}",
            many.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Operation, Rule, RuleFrom, RuleTo, Source, authorization_spec};
    use crate::request::{Connection, HttpRequest};

    fn policy(name: &str, action: Action, rule: Rule) -> AuthorizationPolicy {
        let mut p = AuthorizationPolicy::default();
        p.metadata.name = name.into();
        p.metadata.namespace = Some("foo".into());
        p.spec = authorization_spec(vec![rule], action);
        p
    }

    fn from_ips(ip_blocks: &[&str], not_ip_blocks: &[&str]) -> Rule {
        Rule {
            from: vec![RuleFrom {
                source: Some(Source {
                    ip_blocks: ip_blocks.iter().map(|s| s.to_string()).collect(),
                    not_ip_blocks: not_ip_blocks.iter().map(|s| s.to_string()).collect(),
                    ..Source::default()
                }),
            }],
            ..Rule::default()
        }
    }

    fn decide(policies: &[AuthorizationPolicy], ip: [u8; 4]) -> AuthzDecision {
        let refs: Vec<&AuthorizationPolicy> = policies.iter().collect();
        let authz = Authorizer::new(&refs, &MeshConfig::default());
        let connection = Connection {
            source_ip: Some(ip.into()),
            destination_port: 80,
            ..Connection::default()
        };
        let http = HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            ..HttpRequest::default()
        };
        let attrs = Attributes::new(
            &connection,
            Some(&http),
            None,
            crate::api::PathNormalizationMode::Base,
        );
        authz.authorize(&attrs, |_| CustomVerdict::Allow)
    }

    // Policies built in code skip validation; the engine must still fail closed
    // the way Istio's builder does (`checkError`).

    #[test]
    fn an_allow_rule_with_a_bad_value_is_skipped_not_widened() {
        let allow = policy("allow", Action::Allow, from_ips(&[], &["10.0.0.0/33"]));
        assert_eq!(decide(&[allow], [192, 168, 0, 1]).verdict, Verdict::Deny);
    }

    #[test]
    fn a_deny_rule_loses_only_its_bad_value() {
        let deny = policy("deny", Action::Deny, from_ips(&["bad", "10.0.0.0/8"], &[]));
        assert_eq!(
            decide(std::slice::from_ref(&deny), [10, 1, 1, 1]).verdict,
            Verdict::Deny
        );
        assert_eq!(decide(&[deny], [192, 168, 0, 1]).verdict, Verdict::Allow);
    }

    #[test]
    fn a_deny_field_left_without_values_is_dropped_and_matches_more() {
        let deny = policy("deny", Action::Deny, from_ips(&["bad"], &[]));
        assert_eq!(decide(&[deny], [192, 168, 0, 1]).verdict, Verdict::Deny);
    }

    #[test]
    fn a_custom_policy_without_provider_denies_what_it_matches() {
        let mut custom = policy(
            "custom",
            Action::Custom,
            Rule {
                to: vec![RuleTo {
                    operation: Some(Operation {
                        paths: vec!["/".into()],
                        ..Operation::default()
                    }),
                }],
                ..Rule::default()
            },
        );
        custom.spec.provider = None;
        let d = decide(&[custom], [10, 0, 0, 1]);
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(
            matches!(d.outcome, Outcome::InvalidProvider(ref why) if why.contains("names no provider"))
        );
    }
}
