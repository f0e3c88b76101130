//! Turning policy rules into matchers, once per configuration change.
//!
//! A rule is compiled into clauses (`attribute ∈ values`, possibly negated);
//! sources and operations are conjunctions of clauses, `from` and `to` are
//! disjunctions of those. The TCP form of a rule is derived here too, with
//! Istio's rule for HTTP-only attributes.

use ipnet::IpNet;

use crate::api::{Action, Condition, MeshConfig, Operation, Rule, Source};
use crate::authz::attributes::{Attributes, Value as AttrValue};
use crate::authz::condition::{Attr, ConditionKey};
use crate::authz::matcher::StringMatch;
use crate::authz::path_template::{self, PathTemplate};
use crate::authz::trust_domain;
use crate::validate::{check_ip_or_cidr, check_port};

/// One accepted value of a clause.
#[derive(Debug, Clone)]
pub(crate) enum ValueMatch {
    Str(StringMatch),
    Template(PathTemplate),
    Net(IpNet),
    Port(u16),
    /// The attribute is present at all (`*` on a header, even an empty one).
    Exists,
    /// A `requestPrincipals` value split at its last `/` into issuer and subject.
    IssSub(StringMatch, StringMatch),
    /// One element of a `,`-folded header value.
    Element(StringMatch),
}

impl ValueMatch {
    fn matches(&self, value: &AttrValue<'_>) -> bool {
        match (self, value) {
            (ValueMatch::Str(m), AttrValue::Str(s)) => m.matches(s),
            (ValueMatch::Str(m), AttrValue::List(l)) => l.iter().any(|s| m.matches(s)),
            (ValueMatch::Str(StringMatch::Presence), AttrValue::Opaque) => true,
            (ValueMatch::Template(t), AttrValue::Str(s)) => t.matches(s),
            (ValueMatch::Net(n), AttrValue::Ip(ip)) => n.contains(ip),
            (ValueMatch::Port(p), AttrValue::Port(q)) => p == q,
            (ValueMatch::Exists, _) => true,
            (ValueMatch::IssSub(i, s), AttrValue::IssSub(iss, sub)) => {
                i.matches(iss) && s.matches(sub)
            }
            (ValueMatch::Element(m), AttrValue::Str(s)) => s.split(',').any(|e| m.matches(e)),
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            ValueMatch::Str(m) => m.to_string(),
            ValueMatch::Template(t) => format!("{:?}", t.as_str()),
            ValueMatch::Net(n) => format!("\"{n}\""),
            ValueMatch::Port(p) => format!("\"{p}\""),
            ValueMatch::Exists => "\"*\"".to_owned(),
            ValueMatch::IssSub(i, s) => format!("issuer {i} and subject {s}"),
            ValueMatch::Element(m) => m.to_string(),
        }
    }
}

/// `attribute matches one of values`, or with `negate`, matches none of them.
#[derive(Debug, Clone)]
pub(crate) struct Clause {
    pub(crate) attr: Attr,
    pub(crate) values: Vec<ValueMatch>,
    pub(crate) negate: bool,
    /// The policy field it came from, for explanations (`source.namespaces`).
    pub(crate) field: String,
}

impl Clause {
    /// The matching value, when the clause holds by a positive match.
    fn first_match(&self, attrs: &Attributes<'_>) -> Option<&ValueMatch> {
        let value = attrs.value(&self.attr)?;
        self.values.iter().find(|m| m.matches(&value))
    }

    pub(crate) fn matches(&self, attrs: &Attributes<'_>) -> bool {
        self.first_match(attrs).is_some() != self.negate
    }

    fn explain(&self, attrs: &Attributes<'_>) -> String {
        match (self.negate, self.first_match(attrs)) {
            (false, Some(m)) => format!("{} matched {}", self.field, m.describe()),
            (true, _) => match attrs.value(&self.attr) {
                Some(_) => format!("{} did not match", self.field),
                None => format!("{} (no {} on this request)", self.field, self.attr),
            },
            (false, None) => format!("{} did not match", self.field),
        }
    }
}

/// A conjunction of clauses; empty matches everything.
#[derive(Debug, Clone, Default)]
pub(crate) struct Conjunction(pub(crate) Vec<Clause>);

impl Conjunction {
    fn matches(&self, attrs: &Attributes<'_>) -> bool {
        self.0.iter().all(|c| c.matches(attrs))
    }
}

/// A compiled rule of one policy.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub(crate) policy: usize,
    pub(crate) rule: usize,
    /// OR of sources; empty: any source.
    pub(crate) from: Vec<Conjunction>,
    /// OR of operations; empty: any operation.
    pub(crate) to: Vec<Conjunction>,
    pub(crate) when: Conjunction,
}

impl CompiledRule {
    pub(crate) fn matches(&self, attrs: &Attributes<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(attrs)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(attrs)))
            && self.when.matches(attrs)
    }

    /// Why this (matching) rule matched: its positive clauses first, briefly.
    pub(crate) fn explain(&self, attrs: &Attributes<'_>) -> String {
        let from = self.from.iter().find(|c| c.matches(attrs));
        let to = self.to.iter().find(|c| c.matches(attrs));
        let clauses = from
            .into_iter()
            .chain(to)
            .chain(std::iter::once(&self.when))
            .flat_map(|c| c.0.iter());
        // Positive clauses say most about why a rule matched; list them first.
        let (positive, negative): (Vec<&Clause>, Vec<&Clause>) = clauses.partition(|c| !c.negate);
        let total = positive.len() + negative.len();
        let mut out = String::new();
        for clause in positive.iter().chain(negative.iter()).take(3) {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&clause.explain(attrs));
        }
        if total > 3 {
            out.push_str(&format!(", and {} more", total - 3));
        }
        if out.is_empty() {
            out.push_str("the rule matches every request");
        }
        out
    }

    /// Every clause of the rule.
    pub(crate) fn clauses(&self) -> impl Iterator<Item = &Clause> {
        self.from
            .iter()
            .chain(self.to.iter())
            .flat_map(|c| c.0.iter())
            .chain(self.when.0.iter())
    }

    /// The rule as it applies to a TCP connection, or `None` when it cannot
    /// apply. ALLOW rules that use HTTP-only attributes never match TCP
    /// traffic; DENY, AUDIT and CUSTOM rules lose those clauses and so match
    /// more (Istio's fail-closed choice).
    pub(crate) fn for_tcp(&self, action: Action) -> Option<CompiledRule> {
        let uses_http = self.clauses().any(|c| c.attr.is_http_only());
        if !uses_http {
            return Some(self.clone());
        }
        if action == Action::Allow {
            return None;
        }
        let strip = |c: &Conjunction| {
            Conjunction(
                c.0.iter()
                    .filter(|c| !c.attr.is_http_only())
                    .cloned()
                    .collect(),
            )
        };
        Some(CompiledRule {
            policy: self.policy,
            rule: self.rule,
            from: self.from.iter().map(strip).collect(),
            to: self.to.iter().map(strip).collect(),
            when: strip(&self.when),
        })
    }

    /// Exact normalized paths one of which every match requires.
    pub(crate) fn required_paths(&self) -> Option<Vec<&str>> {
        required_exact(&self.to, &Attr::Path)
    }

    /// Exact principals one of which every match requires.
    pub(crate) fn required_principals(&self) -> Option<Vec<&str>> {
        required_exact(&self.from, &Attr::SourcePrincipal)
    }

    /// Ports one of which every match requires.
    pub(crate) fn required_ports(&self) -> Option<Vec<u16>> {
        if self.to.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for op in &self.to {
            let clause =
                op.0.iter()
                    .find(|c| !c.negate && c.attr == Attr::DestinationPort)?;
            for v in &clause.values {
                match v {
                    ValueMatch::Port(p) => out.push(*p),
                    _ => return None,
                }
            }
        }
        Some(out)
    }
}

fn required_exact<'r>(alternatives: &'r [Conjunction], attr: &Attr) -> Option<Vec<&'r str>> {
    if alternatives.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for alt in alternatives {
        let clause = alt.0.iter().find(|c| !c.negate && c.attr == *attr)?;
        for v in &clause.values {
            match v {
                ValueMatch::Str(StringMatch::Exact(s)) => out.push(s.as_str()),
                _ => return None,
            }
        }
    }
    Some(out)
}

/// Compiles one rule of a policy; `None` when Istio would skip it (an ALLOW
/// rule with a value that does not compile, or any rule with an unknown key).
pub(crate) fn compile_rule(
    rule: &Rule,
    policy: usize,
    index: usize,
    action: crate::api::Action,
    policy_namespace: &str,
    mesh: &MeshConfig,
) -> Option<CompiledRule> {
    let mut dropped = false;
    let mut unknown_key = false;
    let compiled = CompiledRule {
        policy,
        rule: index,
        from: rule
            .from
            .iter()
            .map(|f| {
                f.source
                    .as_ref()
                    .map(|s| compile_source(s, policy_namespace, mesh, &mut dropped))
                    .unwrap_or_default()
            })
            .collect(),
        to: rule
            .to
            .iter()
            .map(|t| {
                t.operation
                    .as_ref()
                    .map(|o| compile_operation(o, &mut dropped))
                    .unwrap_or_default()
            })
            .collect(),
        when: Conjunction(
            rule.when
                .iter()
                .flat_map(|c| {
                    unknown_key |= ConditionKey::parse(&c.key).is_err();
                    compile_condition(c, policy_namespace, mesh, &mut dropped)
                })
                .collect(),
        ),
    };
    if unknown_key || (dropped && action == crate::api::Action::Allow) {
        return None;
    }
    Some(compiled)
}

/// Adds a clause for one field. A value that does not compile (validation
/// rejects those, but the engine does not trust its input) is dropped and
/// recorded in `dropped`: the caller then applies Istio's `checkError` —
/// an ALLOW rule with such a value is skipped whole, a DENY/AUDIT/CUSTOM rule
/// loses the value (and the field, if no value is left), matching more.
fn push(
    out: &mut Vec<Clause>,
    dropped: &mut bool,
    attr: Attr,
    field: &str,
    values: &[String],
    negate: bool,
    value: impl Fn(&str) -> Option<ValueMatch>,
) {
    if values.is_empty() {
        return;
    }
    let compiled: Vec<ValueMatch> = values.iter().filter_map(|v| value(v)).collect();
    *dropped |= compiled.len() != values.len();
    if compiled.is_empty() {
        return;
    }
    out.push(Clause {
        attr,
        values: compiled,
        negate,
        field: field.to_owned(),
    });
}

fn string(v: &str) -> Option<ValueMatch> {
    Some(ValueMatch::Str(StringMatch::parse(v)))
}

fn namespace(v: &str) -> Option<ValueMatch> {
    Some(ValueMatch::Str(StringMatch::parse_glob(v)))
}

fn net(v: &str) -> Option<ValueMatch> {
    // Validation rejects bad CIDRs; a value that slips through matches nothing.
    check_ip_or_cidr(v).ok().map(ValueMatch::Net)
}

fn port(v: &str) -> Option<ValueMatch> {
    check_port(v).ok().map(ValueMatch::Port)
}

fn path(v: &str) -> Option<ValueMatch> {
    if path_template::is_template(v) {
        PathTemplate::parse(v).ok().map(ValueMatch::Template)
    } else {
        string(v)
    }
}

fn host(v: &str) -> Option<ValueMatch> {
    // Attributes carry the authority lower-cased; the policy side is lowered once here.
    Some(ValueMatch::Str(StringMatch::parse_ignore_case(v)))
}

fn header(v: &str) -> Option<ValueMatch> {
    Some(match StringMatch::parse(v) {
        StringMatch::Presence => ValueMatch::Exists,
        m => ValueMatch::Str(m),
    })
}

fn inline_header(v: &str) -> Option<ValueMatch> {
    Some(match StringMatch::parse(v) {
        StringMatch::Presence => ValueMatch::Exists,
        m => ValueMatch::Element(m),
    })
}

/// Istio's `requestPrincipalGenerator`: the issuer may contain `/`, so the
/// value is split at its last `/`; `*` at either end widens the side it is on.
fn request_principal(v: &str) -> Option<ValueMatch> {
    use StringMatch::{Exact, Prefix, Presence, Suffix};
    let split = v.rfind('/').map(|i| (&v[..i], &v[i + 1..]));
    let (iss, sub) = if v == "*" {
        (Presence, Presence)
    } else if let Some(rest) = v.strip_prefix('*') {
        match split {
            Some((iss, sub)) => (
                if iss == "*" {
                    Presence
                } else {
                    Suffix(iss[1..].to_owned())
                },
                Exact(sub.to_owned()),
            ),
            None => (Presence, Suffix(rest.to_owned())),
        }
    } else if let Some(rest) = v.strip_suffix('*') {
        match split {
            Some((iss, sub)) => (
                Exact(iss.to_owned()),
                if sub == "*" {
                    Presence
                } else {
                    Prefix(sub[..sub.len() - 1].to_owned())
                },
            ),
            None => (Prefix(rest.to_owned()), Presence),
        }
    } else {
        match split {
            Some((iss, sub)) => (Exact(iss.to_owned()), Exact(sub.to_owned())),
            None => (Exact(v.to_owned()), Exact(String::new())),
        }
    };
    Some(ValueMatch::IssSub(iss, sub))
}

/// `sa` alone in `serviceAccounts` means the policy's own namespace.
fn qualify_service_accounts(values: &[String], namespace: &str) -> Vec<String> {
    values
        .iter()
        .map(|v| {
            if v.contains('/') {
                v.clone()
            } else {
                format!("{namespace}/{v}")
            }
        })
        .collect()
}

fn compile_source(
    s: &Source,
    policy_namespace: &str,
    mesh: &MeshConfig,
    dropped: &mut bool,
) -> Conjunction {
    let mut c = Vec::new();
    let service_accounts = qualify_service_accounts(&s.service_accounts, policy_namespace);
    let not_service_accounts = qualify_service_accounts(&s.not_service_accounts, policy_namespace);
    let principals = trust_domain::expand_principals(&s.principals, mesh);
    let not_principals = trust_domain::expand_principals(&s.not_principals, mesh);
    push(
        &mut c,
        dropped,
        Attr::SourcePrincipal,
        "source.principals",
        &principals,
        false,
        string,
    );
    push(
        &mut c,
        dropped,
        Attr::SourcePrincipal,
        "source.notPrincipals",
        &not_principals,
        true,
        string,
    );
    push(
        &mut c,
        dropped,
        Attr::RequestPrincipal,
        "source.requestPrincipals",
        &s.request_principals,
        false,
        request_principal,
    );
    push(
        &mut c,
        dropped,
        Attr::RequestPrincipal,
        "source.notRequestPrincipals",
        &s.not_request_principals,
        true,
        request_principal,
    );
    push(
        &mut c,
        dropped,
        Attr::SourceNamespace,
        "source.namespaces",
        &s.namespaces,
        false,
        namespace,
    );
    push(
        &mut c,
        dropped,
        Attr::SourceNamespace,
        "source.notNamespaces",
        &s.not_namespaces,
        true,
        namespace,
    );
    push(
        &mut c,
        dropped,
        Attr::SourceServiceAccount,
        "source.serviceAccounts",
        &service_accounts,
        false,
        string,
    );
    push(
        &mut c,
        dropped,
        Attr::SourceServiceAccount,
        "source.notServiceAccounts",
        &not_service_accounts,
        true,
        string,
    );
    push(
        &mut c,
        dropped,
        Attr::SourceIp,
        "source.ipBlocks",
        &s.ip_blocks,
        false,
        net,
    );
    push(
        &mut c,
        dropped,
        Attr::SourceIp,
        "source.notIpBlocks",
        &s.not_ip_blocks,
        true,
        net,
    );
    push(
        &mut c,
        dropped,
        Attr::RemoteIp,
        "source.remoteIpBlocks",
        &s.remote_ip_blocks,
        false,
        net,
    );
    push(
        &mut c,
        dropped,
        Attr::RemoteIp,
        "source.notRemoteIpBlocks",
        &s.not_remote_ip_blocks,
        true,
        net,
    );
    Conjunction(c)
}

fn compile_operation(o: &Operation, dropped: &mut bool) -> Conjunction {
    let mut c = Vec::new();
    push(
        &mut c,
        dropped,
        Attr::Host,
        "operation.hosts",
        &o.hosts,
        false,
        host,
    );
    push(
        &mut c,
        dropped,
        Attr::Host,
        "operation.notHosts",
        &o.not_hosts,
        true,
        host,
    );
    push(
        &mut c,
        dropped,
        Attr::DestinationPort,
        "operation.ports",
        &o.ports,
        false,
        port,
    );
    push(
        &mut c,
        dropped,
        Attr::DestinationPort,
        "operation.notPorts",
        &o.not_ports,
        true,
        port,
    );
    push(
        &mut c,
        dropped,
        Attr::Method,
        "operation.methods",
        &o.methods,
        false,
        string,
    );
    push(
        &mut c,
        dropped,
        Attr::Method,
        "operation.notMethods",
        &o.not_methods,
        true,
        string,
    );
    push(
        &mut c,
        dropped,
        Attr::Path,
        "operation.paths",
        &o.paths,
        false,
        path,
    );
    push(
        &mut c,
        dropped,
        Attr::Path,
        "operation.notPaths",
        &o.not_paths,
        true,
        path,
    );
    Conjunction(c)
}

fn compile_condition(
    cond: &Condition,
    policy_namespace: &str,
    mesh: &MeshConfig,
    dropped: &mut bool,
) -> Vec<Clause> {
    let Ok(ConditionKey(attr)) = ConditionKey::parse(&cond.key) else {
        // Istio skips a rule with an unknown key, whatever its action.
        *dropped = true;
        return Vec::new();
    };
    let convert: fn(&str) -> Option<ValueMatch> = match attr {
        Attr::SourceIp | Attr::RemoteIp | Attr::DestinationIp => net,
        Attr::DestinationPort => port,
        Attr::RequestPrincipal => request_principal,
        Attr::RequestHeader(_) => header,
        Attr::InlineHeader(_) => inline_header,
        Attr::SourceNamespace => namespace,
        _ => string,
    };
    let (values, not_values) = match attr {
        Attr::SourcePrincipal => (
            trust_domain::expand_principals(&cond.values, mesh),
            trust_domain::expand_principals(&cond.not_values, mesh),
        ),
        Attr::SourceServiceAccount => (
            qualify_service_accounts(&cond.values, policy_namespace),
            qualify_service_accounts(&cond.not_values, policy_namespace),
        ),
        _ => (cond.values.clone(), cond.not_values.clone()),
    };
    let mut c = Vec::new();
    let field = format!("when {}", cond.key);
    push(
        &mut c,
        dropped,
        attr.clone(),
        &field,
        &values,
        false,
        convert,
    );
    push(
        &mut c,
        dropped,
        attr,
        &format!("{field} notValues"),
        &not_values,
        true,
        convert,
    );
    c
}
