//! From observed traffic to least-privilege policy: per destination
//! workload, one ALLOW AuthorizationPolicy whose rules are the callers that
//! were allowed, each with the operations it was seen doing, plus an
//! `allow-nothing` per namespace.
//!
//! Workloads of one namespace with the same `app` label are one
//! destination, selected by that label: by Istio's convention they are
//! versions of one app behind one service (`reviews-v1`, `reviews-v2`), and
//! a caller's requests go to whichever the load balancer picks, so a policy
//! per version would deny tomorrow what went to the other one today. A
//! workload without `app` is selected by all its labels.
//!
//! Every allowed request that `suggest` takes is allowed by what it writes
//! (the property `tests/learn.rs` checks through the engine), and nothing
//! is wider than what was seen except where Istio cannot say it exactly
//! (noted beside the value) or where asked (`--paths prefixes`). What it
//! leaves out, it says why, in [`Suggestion::notes`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use jiff::Timestamp;

use super::paths::{self, PathMode};
use super::record::{DecisionRecord, RecordWorkload, is_http_token, is_unsafe_char};
use crate::api::{Action, Policy};
use crate::request::{PeerIdentity, SPIFFE_PREFIX};
use crate::validate::DRY_RUN_ANNOTATION;

/// How callers with a mesh identity are named in `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Callers {
    /// `principals`: each caller's identity (least privilege).
    #[default]
    Principals,
    /// `namespaces`: every caller of a namespace alike.
    Namespaces,
}

/// What becomes of callers without a mesh identity (plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Plaintext {
    /// Left out, and said so: an address is not an identity.
    #[default]
    Skip,
    /// `ipBlocks`: each caller's address.
    IpBlocks,
}

/// What to suggest from, and how.
#[derive(Debug, Clone, Default)]
pub struct SuggestOptions {
    /// Only workloads of this namespace.
    pub namespace: Option<String>,
    /// Only this workload (`namespace/name`).
    pub workload: Option<String>,
    /// Only requests at or after this time.
    pub since: Option<Timestamp>,
    /// Leave out operations seen fewer times (0 and 1 keep everything).
    pub min_count: u64,
    pub paths: PathMode,
    pub callers: Callers,
    pub plaintext: Plaintext,
    /// Write every policy with `istio.io/dry-run: "true"`.
    pub dry_run: bool,
    /// Namespaces whose `allow-nothing` exists already (see
    /// [`namespaces_denying_by_default`]): none is written for them.
    pub have_allow_nothing: BTreeSet<String>,
}

/// The YAML, and what it covers and leaves out.
#[derive(Debug, Clone, Default)]
pub struct Suggestion {
    pub yaml: String,
    /// ALLOW policies written (one per workload), and `allow-nothing`s.
    pub policies: usize,
    pub allow_nothing: usize,
    pub rules: usize,
    /// Allowed requests the policies were made from.
    pub requests: u64,
    /// What was left out, and why: one line each.
    pub notes: Vec<String>,
}

/// Namespaces where an `allow-nothing` (an ALLOW policy without selector or
/// rules, enforced) is in `policies`, or where a policy is named
/// `allow-nothing` (which the suggestion would otherwise replace).
pub fn namespaces_denying_by_default(policies: &[Policy]) -> BTreeSet<String> {
    policies
        .iter()
        .filter_map(|p| match p {
            Policy::AuthorizationPolicy(ap) => {
                let empty = ap.spec.action == Action::Allow
                    && ap.spec.rules.is_empty()
                    && ap
                        .spec
                        .selector
                        .as_ref()
                        .is_none_or(|s| s.match_labels.is_empty())
                    && ap.spec.target_refs.is_empty()
                    && ap.spec.target_ref.is_none()
                    && !crate::authz::is_dry_run(ap);
                (empty || ap.metadata.name == ALLOW_NOTHING)
                    .then(|| ap.metadata.namespace_or_default().to_owned())
            }
            _ => None,
        })
        .collect()
}

const ALLOW_NOTHING: &str = "allow-nothing";

/// The time `ago` before now (`--since`); `None` when that is before
/// the representable range, which no record predates.
pub fn time_ago(ago: std::time::Duration) -> Option<Timestamp> {
    let ago = jiff::SignedDuration::try_from(ago).ok()?;
    Timestamp::now().checked_sub(ago).ok()
}

/// How often, and when first and last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    count: u64,
    first: Option<Timestamp>,
    last: Option<Timestamp>,
}

impl Seen {
    fn add(&mut self, other: Seen) {
        self.count += other.count;
        self.first = match (self.first, other.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last = match (self.last, other.last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    fn one(time: Option<Timestamp>) -> Seen {
        Seen {
            count: 1,
            first: time,
            last: time,
        }
    }

    fn describe(&self, what: &str) -> String {
        let plural = if self.count == 1 { "" } else { "s" };
        match (self.first, self.last) {
            (Some(first), Some(last)) => format!(
                "{} {what}{plural}, first seen {}, last seen {}",
                self.count,
                rfc3339(first),
                rfc3339(last)
            ),
            _ => format!("{} {what}{plural}", self.count),
        }
    }
}

fn rfc3339(t: Timestamp) -> String {
    format!("{t:.3}")
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    /// Without `spiffe://`, as `principals` names it.
    Principal(String),
    Namespace(String),
    Address(IpAddr),
}

/// An operation key: the port, and the method (`None`: a TCP connection).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct OpKey {
    port: u16,
    method: Option<String>,
}

type Operations = BTreeMap<OpKey, BTreeMap<String, Seen>>;

/// Suggests policies from `records` (inbound decisions, as read by
/// [`super::record::Records`]).
pub fn suggest(records: &[DecisionRecord], options: &SuggestOptions) -> Suggestion {
    let mut notes = Notes::default();
    let mut observed: BTreeMap<Target, BTreeMap<Caller, Operations>> = BTreeMap::new();
    let mut members: BTreeMap<Target, BTreeSet<String>> = BTreeMap::new();
    let mut namespaces: BTreeSet<String> = options.namespace.iter().cloned().collect();
    let mut total = Seen::default();
    for record in records {
        if options
            .since
            .is_some_and(|since| record.time.is_none_or(|t| t < since))
        {
            continue;
        }
        let (Some(workload), Some(port)) = (&record.workload, record.destination_port) else {
            if record.allowed() {
                notes.count("no_facts", record);
            }
            continue;
        };
        let other_namespace = options
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != workload.namespace);
        let other_workload = options
            .workload
            .as_ref()
            .is_some_and(|w| workload.name.is_none() || *w != workload.to_string());
        if other_namespace || other_workload {
            continue;
        }
        namespaces.insert(workload.namespace.clone());
        if !record.allowed() {
            notes.count("denied", record);
            continue;
        }
        let Some(caller) = caller(record, options, &mut notes) else {
            continue;
        };
        let key = OpKey {
            port,
            method: record.is_http().then(|| record.method.clone()).flatten(),
        };
        let path = match &key.method {
            Some(_) => record.path.clone().unwrap_or_else(|| "/".to_owned()),
            None => String::new(),
        };
        let seen = Seen::one(record.time);
        total.add(seen);
        let target = Target::of(workload);
        members
            .entry(target.clone())
            .or_default()
            .insert(workload.to_string());
        observed
            .entry(target)
            .or_default()
            .entry(caller)
            .or_default()
            .entry(key)
            .or_default()
            .entry(path)
            .or_default()
            .add(seen);
    }

    let mut out = Yaml::default();
    let mut suggestion = Suggestion::default();
    let _ = writeln!(
        out.0,
        "# Suggested by `meshward suggest` from {}.",
        total.describe("allowed request")
    );
    out.0.push_str(
        "# Each ALLOW rule lets one caller do what it was seen doing, no more. Review it,\n\
         # and check it against the traffic with `meshward replay -f FILE` before applying.\n",
    );
    // Workloads no policy can select: their traffic gets no ALLOW rule, so
    // an allow-nothing would deny all of it.
    let mut left_out: BTreeSet<&str> = BTreeSet::new();
    for (target, callers) in observed.iter().filter(|(t, _)| t.selector.is_empty()) {
        let requests: u64 = callers
            .values()
            .flat_map(|o| o.values())
            .flat_map(|p| p.values())
            .map(|s| s.count)
            .sum();
        let note = match &target.name {
            Some(name) => format!(
                "{}: left out ({requests} requests): it has no labels, so no policy can select it alone",
                comment_text(&format!("{}/{name}", target.namespace))
            ),
            None => format!(
                "{}: left out ({requests} requests to a workload known only by its namespace: its proxy reported without a WorkloadEntry or --workload), so no policy can select it",
                comment_text(&target.namespace)
            ),
        };
        notes.push(note);
        left_out.insert(&target.namespace);
    }
    for ns in &namespaces {
        if options.have_allow_nothing.contains(ns) {
            continue;
        }
        if let Some(w) = &options.workload {
            notes.push(format!(
                "{}: no allow-nothing written: --workload {} suggests for one workload, and an allow-nothing would deny every other workload of the namespace",
                comment_text(ns),
                comment_text(w)
            ));
            continue;
        }
        if left_out.contains(ns.as_str()) {
            notes.push(format!(
                "{}: no allow-nothing written: it would deny all traffic to the workloads left out above",
                comment_text(ns)
            ));
            continue;
        }
        out.document();
        out.0.push_str(
            "# Deny by default: an ALLOW policy without rules matches nothing, so\n\
             # every workload of the namespace takes only what a policy allows.\n",
        );
        out.header(ALLOW_NOTHING, ns, options.dry_run);
        out.0.push_str("spec: {}\n");
        suggestion.allow_nothing += 1;
    }
    let mut names: BTreeSet<(String, String)> = BTreeSet::new();
    for (target, callers) in &observed {
        let workload = members
            .get(target)
            .map(|m| {
                m.iter()
                    .map(|w| comment_text(w))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        if target.selector.is_empty() {
            continue;
        }
        let rules: Vec<(&Caller, Seen, Vec<Operation>)> = callers
            .iter()
            .flat_map(|(caller, ops)| {
                operations(ops, options, &mut notes, &workload)
                    .into_iter()
                    .map(move |(seen, operations)| (caller, seen, operations))
            })
            .collect();
        if rules.is_empty() {
            continue;
        }
        let mut name = target.policy_name();
        let mut n = 2;
        while !names.insert((target.namespace.clone(), name.clone())) {
            name = format!("{}-{n}", target.policy_name());
            n += 1;
        }
        out.document();
        let callers = rules.iter().map(|r| r.0).collect::<BTreeSet<_>>().len();
        let _ = writeln!(
            out.0,
            "# {workload}: {callers} caller{}.",
            if callers == 1 { "" } else { "s" }
        );
        out.header(&name, &target.namespace, options.dry_run);
        out.0.push_str("spec:\n  selector:\n    matchLabels:\n");
        for (k, v) in &target.selector {
            let _ = writeln!(out.0, "      {}: {}", scalar(k), scalar(v));
        }
        out.0.push_str("  action: ALLOW\n  rules:\n");
        for (caller, seen, operations) in rules {
            suggestion.rules += 1;
            suggestion.requests += seen.count;
            let _ = writeln!(out.0, "  # {}", seen.describe("request"));
            out.0.push_str("  - from:\n    - source:\n");
            match caller {
                Caller::Principal(p) => {
                    let _ = writeln!(out.0, "        principals: [{}]", quote(p));
                }
                Caller::Namespace(ns) => {
                    let _ = writeln!(out.0, "        namespaces: [{}]", quote(ns));
                }
                Caller::Address(ip) => {
                    let _ = writeln!(out.0, "        ipBlocks: [{}]", quote(&ip.to_string()));
                }
            }
            out.0.push_str("    to:\n");
            for op in operations {
                out.operation(&op);
            }
        }
        suggestion.policies += 1;
    }
    suggestion.yaml = out.0;
    suggestion.notes = notes.finish();
    suggestion
}

/// The caller as `source` names it, or `None` (noted) when it cannot be.
fn caller(record: &DecisionRecord, options: &SuggestOptions, notes: &mut Notes) -> Option<Caller> {
    let Some(uri) = &record.source_principal else {
        return match (options.plaintext, record.source_address) {
            (Plaintext::IpBlocks, Some(address)) => Some(Caller::Address(address.ip())),
            _ => {
                notes.count("plaintext", record);
                None
            }
        };
    };
    if options.callers == Callers::Namespaces
        && let Some(ns) = PeerIdentity::parse(uri).namespaces.first()
    {
        return Some(Caller::Namespace((*ns).to_owned()));
    }
    match uri.strip_prefix(SPIFFE_PREFIX) {
        // A `*` at either end would be read as a wildcard.
        Some(principal) if !principal.starts_with('*') && !principal.ends_with('*') => {
            Some(Caller::Principal(principal.to_owned()))
        }
        _ => {
            notes.count("identity", record);
            None
        }
    }
}

/// One `to.operation`: every method × port × path of it was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Operation {
    methods: Vec<String>,
    ports: Vec<u16>,
    /// `paths` values and what each stands for; empty for TCP.
    paths: Vec<(String, Seen, usize)>,
}

/// A caller's operations, generalized and grouped so that each operation's
/// methods × ports × paths were all seen together (nothing is widened by
/// the cross product), each group with what it covers: the HTTP operations,
/// then the TCP ports. They are two rules: Istio drops a whole ALLOW rule
/// that names an HTTP field from TCP traffic, so ports beside methods and
/// paths in one rule would never admit a connection.
fn operations(
    ops: &Operations,
    options: &SuggestOptions,
    notes: &mut Notes,
    workload: &str,
) -> Vec<(Seen, Vec<Operation>)> {
    let mut covered = Seen::default();
    let mut tcp_covered = Seen::default();
    // (port, paths) → methods; TCP ports on their own.
    type Values = Vec<(String, Seen, usize)>;
    let mut by_paths: BTreeMap<(u16, Vec<String>), (Vec<String>, Values)> = BTreeMap::new();
    let mut tcp: Vec<u16> = Vec::new();
    for (key, observed) in ops {
        match &key.method {
            None => {
                let mut seen = Seen::default();
                observed.values().for_each(|s| seen.add(*s));
                if seen.count < options.min_count {
                    notes.below_min_count += seen.count;
                    continue;
                }
                tcp_covered.add(seen);
                tcp.push(key.port);
            }
            Some(method) => {
                let mut values = Vec::new();
                for g in paths::generalize(observed.keys().map(String::as_str), options.paths) {
                    let mut seen = Seen::default();
                    for member in &g.members {
                        if let Some(s) = observed.get(member) {
                            seen.add(*s);
                        }
                    }
                    if seen.count < options.min_count {
                        notes.below_min_count += seen.count;
                        continue;
                    }
                    covered.add(seen);
                    values.push((g.value, seen, g.members.len()));
                }
                if !values.is_empty() {
                    let names = values.iter().map(|v| v.0.clone()).collect();
                    let entry = by_paths.entry((key.port, names)).or_default();
                    entry.0.push(method.clone());
                    merge_values(&mut entry.1, values);
                }
            }
        }
    }
    // (methods, paths) → ports.
    type MethodsAndPaths = (Vec<String>, Vec<String>);
    let mut by_methods: BTreeMap<MethodsAndPaths, (Vec<u16>, Values)> = BTreeMap::new();
    for ((port, names), (methods, values)) in by_paths {
        let entry = by_methods.entry((methods, names)).or_default();
        entry.0.push(port);
        merge_values(&mut entry.1, values);
    }
    let out: Vec<Operation> = by_methods
        .into_iter()
        .map(|((methods, _), (ports, paths))| Operation {
            methods,
            ports,
            paths,
        })
        .collect();
    let mut groups = Vec::new();
    if !out.is_empty() {
        if out
            .iter()
            .any(|op| op.ports.iter().any(|p| tcp.contains(p)))
        {
            notes.push(format!(
                "{workload}: a port carried both HTTP and TCP traffic from one caller; its TCP rule (ports only) also admits any HTTP request on that port"
            ));
        }
        groups.push((covered, out));
    }
    if !tcp.is_empty() {
        let tcp = Operation {
            methods: Vec::new(),
            ports: tcp,
            paths: Vec::new(),
        };
        groups.push((tcp_covered, vec![tcp]));
    }
    groups
}

/// Adds the counts of `from` to `into`, which holds the same values in
/// the same order (or nothing yet).
fn merge_values(into: &mut Vec<(String, Seen, usize)>, from: Vec<(String, Seen, usize)>) {
    if into.is_empty() {
        *into = from;
        return;
    }
    for (slot, (_, seen, members)) in into.iter_mut().zip(from) {
        slot.1.add(seen);
        slot.2 = slot.2.max(members);
    }
}

/// A destination: the workloads one policy selects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    namespace: String,
    /// `app` alone when the workload has it, else all its labels.
    selector: BTreeMap<String, String>,
    /// The workload's name when it has no `app` label.
    name: Option<String>,
}

impl Target {
    fn of(workload: &RecordWorkload) -> Target {
        match workload.labels.get_key_value("app") {
            Some((k, v)) => Target {
                namespace: workload.namespace.clone(),
                selector: BTreeMap::from([(k.clone(), v.clone())]),
                name: None,
            },
            None => Target {
                namespace: workload.namespace.clone(),
                selector: workload.labels.clone(),
                name: workload.name.clone(),
            },
        }
    }

    /// `APP-observed` (or the workload's name), as a DNS-1123 name.
    fn policy_name(&self) -> String {
        let base = self
            .selector
            .get("app")
            .or(self.name.as_ref())
            .map_or("workload", String::as_str);
        let mut name: String = base
            .chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '-') => c,
                _ => '-',
            })
            .collect();
        name = name.trim_matches('-').to_owned();
        name.truncate(50);
        let name = name.trim_end_matches('-');
        if name.is_empty() {
            "workload-observed".to_owned()
        } else {
            format!("{name}-observed")
        }
    }
}

/// A YAML double-quoted scalar: JSON's string syntax (a subset of it),
/// with every character that is not printable to YAML or that YAML 1.1
/// reads as a line break escaped too (JSON leaves DEL, C1 controls and the
/// Unicode separators as they are). Read back, it is `s`; written out, it
/// is one line whatever `s` holds.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe_char(c) || matches!(c, '\u{fffe}' | '\u{ffff}') => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A string from a record as comment text: as it is when it cannot end the
/// comment's line (or the YAML), quoted otherwise.
fn comment_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(is_unsafe_char) {
        std::borrow::Cow::Owned(quote(s))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A name or label as a plain scalar where YAML reads it back as the same
/// string (a DNS-like name that is not a number, boolean or null), quoted
/// otherwise.
fn scalar(s: &str) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain { s.to_owned() } else { quote(s) }
}

/// Whether `method` can be written in `methods` without a warning: an
/// HTTP token in upper case (methods match case-sensitively).
fn plain_method(method: &str) -> bool {
    is_http_token(method) && !method.bytes().any(|b| b.is_ascii_lowercase())
}

#[derive(Debug, Default)]
struct Yaml(String);

impl Yaml {
    fn document(&mut self) {
        self.0.push_str("---\n");
    }

    fn header(&mut self, name: &str, namespace: &str, dry_run: bool) {
        self.0
            .push_str("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n");
        let _ = writeln!(self.0, "  name: {}", scalar(name));
        let _ = writeln!(self.0, "  namespace: {}", scalar(namespace));
        if dry_run {
            let _ = writeln!(self.0, "  annotations:\n    {DRY_RUN_ANNOTATION}: \"true\"");
        }
    }

    fn operation(&mut self, op: &Operation) {
        self.0.push_str("    - operation:\n");
        let ports: Vec<String> = op.ports.iter().map(|p| quote(&p.to_string())).collect();
        if op.paths.is_empty() {
            let _ = writeln!(self.0, "        ports: [{}]", ports.join(", "));
            return;
        }
        if op.methods.iter().all(|m| plain_method(m)) {
            let methods: Vec<String> = op.methods.iter().map(|m| quote(m)).collect();
            let _ = writeln!(self.0, "        methods: [{}]", methods.join(", "));
        } else {
            let _ = writeln!(
                self.0,
                "        # methods left out (any method): {} cannot be matched as written",
                op.methods
                    .iter()
                    .map(|m| comment_text(m))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let _ = writeln!(self.0, "        ports: [{}]", ports.join(", "));
        self.0.push_str("        paths:\n");
        for (value, seen, members) in &op.paths {
            let what = if *members > 1 {
                format!(", {members} paths")
            } else {
                String::new()
            };
            let wider = if value.ends_with('*') && !value.ends_with("{*}") {
                ", matched as a prefix"
            } else {
                ""
            };
            let plural = if seen.count == 1 { "" } else { "s" };
            let _ = writeln!(
                self.0,
                "        - {}  # {} request{plural}{what}{wider}",
                quote(value),
                seen.count
            );
        }
    }
}

/// What was left out, counted by reason with one example each.
#[derive(Debug, Default)]
struct Notes {
    counted: BTreeMap<&'static str, (u64, String)>,
    below_min_count: u64,
    lines: Vec<String>,
}

impl Notes {
    fn count(&mut self, why: &'static str, record: &DecisionRecord) {
        let entry = self
            .counted
            .entry(why)
            .or_insert_with(|| (0, record.describe()));
        entry.0 += 1;
    }

    fn push(&mut self, line: String) {
        if !self.lines.contains(&line) {
            self.lines.push(line);
        }
    }

    fn finish(mut self) -> Vec<String> {
        for (why, (count, example)) in &self.counted {
            let line = match *why {
                "no_facts" => format!(
                    "{count} allowed request(s) left out: the records have no workload facts (written by a proxy before record version 1), e.g. {example}"
                ),
                "denied" => {
                    format!("{count} denied request(s) not turned into rules, e.g. {example}")
                }
                "plaintext" => format!(
                    "{count} request(s) from callers without a mesh identity left out, e.g. {example}; --plaintext ip-blocks allows them by address"
                ),
                _ => format!(
                    "{count} request(s) from identities principals cannot name left out, e.g. {example}"
                ),
            };
            self.lines.push(line);
        }
        if self.below_min_count > 0 {
            self.lines.push(format!(
                "{} request(s) left out: their operations were seen fewer times than --min-count",
                self.below_min_count
            ));
        }
        self.lines
    }
}
