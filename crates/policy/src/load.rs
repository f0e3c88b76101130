//! Reading policy documents from files, directories and standard input.
//!
//! A file may hold many YAML documents. Each one is split out and read on its
//! own, so a broken document is reported with its line and the valid documents
//! around it still load. Every document is then validated
//! ([`crate::validate`]) and only valid ones are returned as policies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_saphyr::granit_parser::{Event, Parser};

use crate::api::{
    AuthorizationPolicy, Kind, MeshConfig, Policy, RequestAuthentication, SECURITY_GROUP,
    SECURITY_VERSIONS,
};
use crate::api::{
    DEFAULT_NAMESPACE, NETWORKING_GROUP, NETWORKING_VERSIONS, PeerAuthentication, RegistryObject,
    SIMPLE_LOAD_BALANCERS,
};
use crate::diagnostic::{Diagnostic, Location, Severity};
use crate::validate;

/// The name standard input is reported under.
pub const STDIN: &str = "<stdin>";

/// A valid policy and where it was read from.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub location: Location,
    pub policy: Policy,
    /// Where each field is, for problems found after loading.
    lines: Arc<LineMap>,
}

/// Everything read from some inputs: the valid policies, the registry
/// objects, and every problem found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub policies: Vec<LoadedPolicy>,
    /// `WorkloadEntry`, `ServiceEntry`, `DestinationRule`, `Gateway` and
    /// `VirtualService` documents.
    pub registry: Vec<RegistryObject>,
    pub diagnostics: Vec<Diagnostic>,
    /// How many documents were read (valid or not, skipped ones included).
    pub documents: usize,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// Every error, one line each as `meshward validate` prints it.
    pub fn errors(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(ToString::to_string)
            .collect()
    }

    pub fn extend(&mut self, other: Loaded) {
        self.policies.extend(other.policies);
        self.registry.extend(other.registry);
        self.diagnostics.extend(other.diagnostics);
        self.documents += other.documents;
    }

    pub fn into_policies(self) -> Vec<Policy> {
        self.policies.into_iter().map(|p| p.policy).collect()
    }

    /// Warnings that depend on the mesh configuration in force, placed like
    /// validation's: a rule on paths that path normalization leaves open
    /// ([`validate::path_normalization_warning`]), a CUSTOM policy whose
    /// HTTP provider TCP connections escape ([`validate::custom_on_tcp_warning`]).
    pub fn mesh_warnings(&self, mesh: &MeshConfig) -> Vec<Diagnostic> {
        self.policies
            .iter()
            .flat_map(|p| {
                let issues = [
                    validate::path_normalization_warning(&p.policy, mesh.normalization()),
                    validate::custom_on_tcp_warning(&p.policy, mesh),
                ];
                issues.into_iter().flatten().map(move |issue| Diagnostic {
                    severity: issue.severity,
                    location: Location {
                        file: p.location.file.clone(),
                        line: p.lines.line_of(&issue.field),
                        column: None,
                    },
                    resource: Some(p.policy.display_name()),
                    field: Some(issue.field),
                    message: issue.message,
                })
            })
            .collect()
    }

    /// The path normalization warnings of [`Loaded::mesh_warnings`] as one
    /// sentence, for a command that starts a whole mesh and says it once.
    pub fn path_normalization_summary(&self, mesh: &MeshConfig) -> Option<String> {
        let mode = mesh.normalization();
        let risk = validate::path_normalization_risk(mode)?;
        let names: Vec<String> = self
            .policies
            .iter()
            .filter(|p| validate::path_normalization_warning(&p.policy, mode).is_some())
            .map(|p| p.policy.display_name())
            .collect();
        (!names.is_empty()).then(|| {
            format!(
                "{} match request paths in DENY, AUDIT or CUSTOM rules (or ALLOW notPaths): {risk}",
                names.join(", ")
            )
        })
    }
}

/// Reads every path: files as they are, directories recursively (`.yaml`,
/// `.yml` and `.json` files, in name order), `-` as standard input.
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Loaded {
    let mut loaded = Loaded::default();
    for path in paths {
        let path = path.as_ref();
        if path == Path::new("-") {
            let mut text = String::new();
            match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
                Ok(_) => loaded.extend(load_str(STDIN, &text)),
                Err(e) => loaded.diagnostics.push(io_error(STDIN, &e)),
            }
            continue;
        }
        match files_under(path) {
            Ok(files) => {
                for file in files {
                    loaded.extend(load_file(&file));
                }
            }
            Err(e) => loaded
                .diagnostics
                .push(io_error(&path.display().to_string(), &e)),
        }
    }
    loaded
}

/// Reads one file.
pub fn load_file(path: &Path) -> Loaded {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&name, &text),
        Err(e) => Loaded {
            diagnostics: vec![io_error(&name, &e)],
            ..Loaded::default()
        },
    }
}

fn io_error(name: &str, e: &std::io::Error) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        location: Location {
            file: name.into(),
            line: 0,
            column: None,
        },
        resource: None,
        field: None,
        message: format!("cannot read: {e}"),
    }
}

/// The policy files [`load_paths`] would read under `path`, in the same order.
pub fn policy_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    files_under(path)
}

/// A cheap fingerprint of what [`load_paths`] would read: every file's name,
/// size and modification time. Watchers compare it to notice a change
/// without parsing anything.
pub fn fingerprint<P: AsRef<Path>>(paths: &[P]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        match files_under(path.as_ref()) {
            Ok(files) => {
                for file in files {
                    file.hash(&mut hasher);
                    match std::fs::metadata(&file) {
                        Ok(meta) => {
                            meta.len().hash(&mut hasher);
                            meta.modified().ok().hash(&mut hasher);
                        }
                        Err(e) => e.kind().hash(&mut hasher),
                    }
                }
            }
            Err(e) => e.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
}

fn files_under(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        // Reading reports a missing file with its name.
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut visited = std::collections::HashSet::new();
    walk(path, &mut visited, &mut files)?;
    Ok(files)
}

/// Collects policy files below `dir`, in name order. Symbolic links to
/// directories are followed once each: a link back up the tree ends there.
fn walk(
    dir: &Path,
    visited: &mut std::collections::HashSet<PathBuf>,
    files: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    if !visited.insert(std::fs::canonicalize(dir)?) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            walk(&entry, visited, files)?;
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            files.push(entry);
        }
    }
    Ok(())
}

/// What one document turned out to be.
enum Read {
    Policy(LoadedPolicy),
    Registry(RegistryObject),
    Skipped,
}

/// The registry rules Istio's webhook applies to the fields meshward uses.
fn validate_registry(object: &RegistryObject) -> Result<(), (&'static str, String)> {
    let port_ok = |p: u32| (1..=65535).contains(&p);
    let check_workload = |w: &crate::api::WorkloadEntrySpec, field: &'static str| {
        for (name, port) in &w.ports {
            if !port_ok(*port) {
                return Err((field, format!("port {name}: {port} is not 1-65535")));
            }
        }
        if !w.address.is_empty()
            && w.address.parse::<std::net::IpAddr>().is_err()
            && !w.address.starts_with("unix://")
            && w.address.contains(['/', ' '])
        {
            return Err((
                field,
                format!("address {:?} is not an IP address or host name", w.address),
            ));
        }
        Ok(())
    };
    match object {
        RegistryObject::WorkloadEntry(we) => check_workload(&we.spec, "spec"),
        RegistryObject::ServiceEntry(se) => {
            if se.spec.hosts.is_empty() || se.spec.hosts.iter().any(String::is_empty) {
                return Err((
                    "spec.hosts",
                    "at least one non-empty host is required".into(),
                ));
            }
            for p in &se.spec.ports {
                if !port_ok(p.number) {
                    return Err((
                        "spec.ports",
                        format!("port number {} is not 1-65535", p.number),
                    ));
                }
            }
            if se.spec.workload_selector.is_some() && !se.spec.endpoints.is_empty() {
                return Err((
                    "spec.workloadSelector",
                    "only one of workloadSelector or endpoints can be set".into(),
                ));
            }
            for e in &se.spec.endpoints {
                check_workload(e, "spec.endpoints")?;
            }
            Ok(())
        }
        RegistryObject::DestinationRule(dr) => {
            if dr.spec.host.is_empty() {
                return Err(("spec.host", "host is required".into()));
            }
            match dr.spec.simple_load_balancer() {
                Some(simple) if !SIMPLE_LOAD_BALANCERS.contains(&simple) => Err((
                    "spec.trafficPolicy.loadBalancer.simple",
                    format!(
                        "{simple:?} is not one of {}",
                        SIMPLE_LOAD_BALANCERS.join(", ")
                    ),
                )),
                _ => Ok(()),
            }
        }
        // Checked in full by `crate::ingress`.
        RegistryObject::Gateway(_) | RegistryObject::VirtualService(_) => Ok(()),
    }
}

/// Reads every document of one YAML (or JSON) text.
pub fn load_str(file: &str, text: &str) -> Loaded {
    let file: Arc<str> = file.into();
    let mut loaded = Loaded::default();
    for chunk in split_documents(text) {
        let value = match serde_saphyr::from_str::<serde_json::Value>(chunk.text) {
            Ok(serde_json::Value::Null) => continue, // empty or comment-only document
            Ok(value) => value,
            Err(e) => {
                let (line, column, message) = yaml_error(&e);
                loaded.documents += 1;
                loaded.diagnostics.push(Diagnostic {
                    severity: Severity::Error,
                    location: Location {
                        file: file.clone(),
                        line: chunk.first_line + line.saturating_sub(1),
                        column,
                    },
                    resource: None,
                    field: None,
                    message: format!("invalid YAML: {message}"),
                });
                continue;
            }
        };
        loaded.documents += 1;
        let lines = Arc::new(LineMap::build(chunk.text, chunk.first_line));
        let doc = Document {
            file: &file,
            lines: &lines,
        };
        match doc.read(value) {
            Ok(Read::Registry(object)) => {
                let resource = format!(
                    "{} {}/{}",
                    object.kind(),
                    object.metadata().namespace_or_default(),
                    object.metadata().name
                );
                match validate_registry(&object) {
                    Ok(()) => {
                        let problems = match &object {
                            RegistryObject::ServiceEntry(se) => {
                                validate::validate_service_entry(se)
                            }
                            RegistryObject::DestinationRule(dr) => {
                                validate::validate_destination_rule(dr)
                            }
                            RegistryObject::Gateway(gw) => crate::ingress::validate_gateway(gw),
                            RegistryObject::VirtualService(vs) => {
                                crate::ingress::validate_virtual_service(vs)
                            }
                            RegistryObject::WorkloadEntry(_) => Vec::new(),
                        };
                        let valid = !problems.iter().any(|p| p.severity == Severity::Error);
                        loaded.diagnostics.extend(problems.into_iter().map(|p| {
                            doc.diagnostic(
                                p.severity,
                                Some(resource.clone()),
                                Some(p.field),
                                p.message,
                            )
                        }));
                        if valid {
                            loaded.registry.push(object);
                        }
                    }
                    Err((field, message)) => loaded.diagnostics.push(doc.diagnostic(
                        Severity::Error,
                        Some(resource),
                        Some(field.to_owned()),
                        message,
                    )),
                }
            }
            Ok(Read::Policy(loaded_policy)) => {
                let problems = validate::validate(&loaded_policy.policy);
                let resource = loaded_policy.policy.display_name();
                let valid = !problems.iter().any(|p| p.severity == Severity::Error);
                loaded.diagnostics.extend(problems.into_iter().map(|p| {
                    doc.diagnostic(p.severity, Some(resource.clone()), Some(p.field), p.message)
                }));
                if valid {
                    loaded.policies.push(loaded_policy);
                }
            }
            Ok(Read::Skipped) => {}
            Err(diagnostic) => loaded.diagnostics.push(*diagnostic),
        }
    }
    loaded
}

/// Where a YAML parse error is (line and column within the text parsed,
/// 1-based; line 0 when unknown) and what it is, without the parser's own
/// rendering, which repeats the line and column and quotes the text.
fn yaml_error(e: &serde_saphyr::Error) -> (usize, Option<usize>, String) {
    use serde_saphyr::MessageFormatter as _;
    let at = e.location().filter(|l| l.line() > 0);
    let message: String = serde_saphyr::UserMessageFormatter
        .format_message(e.without_snippet())
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    (
        at.map_or(0, |l| usize::try_from(l.line()).unwrap_or(usize::MAX)),
        at.and_then(|l| usize::try_from(l.column()).ok())
            .filter(|c| *c > 0),
        message,
    )
}

/// One YAML document's text and the line of the file it starts on.
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

/// Splits a YAML stream at its document markers (`---` or `...` at column 0).
///
/// YAML forbids those markers inside any scalar at column 0, so splitting on
/// them is exact, and it lets each document be parsed on its own: a syntax
/// error in one document does not hide the documents after it.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0usize;
    let mut first_line = 1usize;
    let mut offset = 0usize;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end_matches(['\n', '\r']);
        let is_start = is_marker(trimmed, "---");
        let is_end = is_marker(trimmed, "...");
        if (is_start || is_end) && offset > start {
            chunks.push(Chunk {
                text: &text[start..offset],
                first_line,
            });
        }
        if is_start || is_end {
            // A `---` line belongs to the document it opens (it may carry content);
            // a `...` line closes the previous one and belongs to none.
            start = if is_start {
                offset
            } else {
                offset + line.len()
            };
            first_line = if is_start { index + 1 } else { index + 2 };
        }
        offset += line.len();
    }
    if offset > start {
        chunks.push(Chunk {
            text: &text[start..],
            first_line,
        });
    }
    chunks
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Maps field paths (`spec.rules[0].from`) to the line they are written on.
#[derive(Debug, Default)]
pub(crate) struct LineMap {
    lines: HashMap<String, usize>,
    first_line: usize,
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
    /// A complex (non-scalar) mapping key: its contents have no field path.
    Opaque {
        depth: usize,
    },
}

impl LineMap {
    fn build(text: &str, first_line: usize) -> LineMap {
        let mut lines = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let line = first_line + span.start.line().saturating_sub(1);
            match event {
                Event::Scalar(..) | Event::Alias(_) => {
                    let scalar = match &event {
                        Event::Scalar(v, ..) => v.to_string(),
                        _ => String::new(),
                    };
                    match stack.last_mut() {
                        Some(Frame::Map { path, key }) => {
                            // A scalar with no pending key is a key; otherwise it is that key's value.
                            if key.take().is_none() {
                                lines.entry(join(path, &scalar)).or_insert(line);
                                *key = Some(scalar);
                            }
                        }
                        Some(Frame::Seq { path, next }) => {
                            lines.entry(format!("{path}[{next}]")).or_insert(line);
                            *next += 1;
                        }
                        Some(Frame::Opaque { .. }) | None => {}
                    }
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    let is_map = matches!(event, Event::MappingStart(..));
                    let path = match stack.last_mut() {
                        None => Some(String::new()),
                        // No pending key: this collection is a complex key.
                        Some(Frame::Map { path, key }) => key.take().map(|k| join(path, &k)),
                        Some(Frame::Seq { path, next }) => {
                            let p = format!("{path}[{next}]");
                            *next += 1;
                            lines.entry(p.clone()).or_insert(line);
                            Some(p)
                        }
                        Some(Frame::Opaque { depth }) => {
                            *depth += 1;
                            continue;
                        }
                    };
                    stack.push(match path {
                        Some(path) if is_map => Frame::Map { path, key: None },
                        Some(path) => Frame::Seq { path, next: 0 },
                        None => Frame::Opaque { depth: 0 },
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    if let Some(Frame::Opaque { depth }) = stack.last_mut()
                        && *depth > 0
                    {
                        *depth -= 1;
                        continue;
                    }
                    if let Some(Frame::Opaque { .. }) = stack.pop()
                        && let Some(Frame::Map { key, .. }) = stack.last_mut()
                    {
                        *key = Some(String::from("<complex key>"));
                    }
                }
                _ => {}
            }
        }
        LineMap { lines, first_line }
    }

    /// The line of `path`, or of its nearest written ancestor (a missing field
    /// is reported where its parent is).
    pub(crate) fn line_of(&self, path: &str) -> usize {
        let mut path = path;
        loop {
            if let Some(line) = self.lines.get(path) {
                return *line;
            }
            match path.rfind(['.', '[']) {
                Some(i) => path = &path[..i],
                None => return self.first_line,
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// One parsed document of a file, with what is needed to place its problems.
struct Document<'a> {
    file: &'a Arc<str>,
    lines: &'a Arc<LineMap>,
}

impl Document<'_> {
    fn diagnostic(
        &self,
        severity: Severity,
        resource: Option<String>,
        field: Option<String>,
        message: String,
    ) -> Diagnostic {
        let line = field
            .as_deref()
            .map_or(self.lines.first_line, |f| self.lines.line_of(f));
        Diagnostic {
            severity,
            location: Location {
                file: self.file.clone(),
                line,
                column: None,
            },
            resource,
            field,
            message,
        }
    }

    fn error(&self, resource: Option<String>, field: &str, message: String) -> Box<Diagnostic> {
        Box::new(self.diagnostic(Severity::Error, resource, Some(field.to_owned()), message))
    }

    /// Turns a document into a typed policy or registry object; other kinds
    /// are skipped.
    fn read(&self, value: serde_json::Value) -> Result<Read, Box<Diagnostic>> {
        let serde_json::Value::Object(map) = &value else {
            return Err(self.error(
                None,
                "",
                "a document must be a mapping with apiVersion, kind, metadata and spec".into(),
            ));
        };
        let kind_str = map.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        let api_version = map
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        let name = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or_default();
        let namespace = map
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or(DEFAULT_NAMESPACE);
        let resource = (!kind_str.is_empty()).then(|| format!("{kind_str} {namespace}/{name}"));
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        if group == NETWORKING_GROUP
            && matches!(
                kind_str,
                "WorkloadEntry" | "ServiceEntry" | "DestinationRule" | "Gateway" | "VirtualService"
            )
        {
            if !NETWORKING_VERSIONS.contains(&version) {
                return Err(self.error(
                    resource,
                    "apiVersion",
                    format!("version {version:?} of {NETWORKING_GROUP} is not supported; use v1"),
                ));
            }
            if name.is_empty() {
                return Err(self.error(
                    resource,
                    "metadata.name",
                    "metadata.name is required".into(),
                ));
            }
            return Ok(Read::Registry(match kind_str {
                "WorkloadEntry" => RegistryObject::WorkloadEntry(self.typed(value, &resource)?),
                "ServiceEntry" => RegistryObject::ServiceEntry(self.typed(value, &resource)?),
                "Gateway" => RegistryObject::Gateway(self.typed(value, &resource)?),
                "VirtualService" => RegistryObject::VirtualService(self.typed(value, &resource)?),
                _ => RegistryObject::DestinationRule(self.typed(value, &resource)?),
            }));
        }
        let Some(kind) = Kind::parse(kind_str) else {
            if kind_str.is_empty() {
                return Err(self.error(None, "kind", "missing kind: expected PeerAuthentication, RequestAuthentication or AuthorizationPolicy".into()));
            }
            if group == SECURITY_GROUP {
                return Err(self.error(resource, "kind", format!("unknown kind {kind_str:?} in {SECURITY_GROUP}: expected PeerAuthentication, RequestAuthentication or AuthorizationPolicy")));
            }
            // Other kinds (Deployments, Services, ...) often share a file with policies.
            return Ok(Read::Skipped);
        };
        if group != SECURITY_GROUP {
            return Err(self.error(
                resource,
                "apiVersion",
                format!("apiVersion {api_version:?} is not {SECURITY_GROUP}/v1 or {SECURITY_GROUP}/v1beta1"),
            ));
        }
        if !SECURITY_VERSIONS.contains(&version) {
            return Err(self.error(
                resource,
                "apiVersion",
                format!("version {version:?} of {SECURITY_GROUP} is not supported; use v1 (or v1beta1, the same schema)"),
            ));
        }
        if name.is_empty() {
            return Err(self.error(
                resource,
                "metadata.name",
                "metadata.name is required".into(),
            ));
        }
        let policy = match kind {
            Kind::PeerAuthentication => self
                .typed::<PeerAuthentication>(value, &resource)
                .map(Policy::PeerAuthentication),
            Kind::RequestAuthentication => self
                .typed::<RequestAuthentication>(value, &resource)
                .map(Policy::RequestAuthentication),
            Kind::AuthorizationPolicy => self
                .typed::<AuthorizationPolicy>(value, &resource)
                .map(Policy::AuthorizationPolicy),
        }?;
        Ok(Read::Policy(LoadedPolicy {
            location: Location {
                file: self.file.clone(),
                line: self.lines.first_line,
                column: None,
            },
            policy,
            lines: self.lines.clone(),
        }))
    }

    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
        &self,
        value: serde_json::Value,
        resource: &Option<String>,
    ) -> Result<T, Box<Diagnostic>> {
        let typed: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
            let field = e.path().to_string();
            let message = e.inner().to_string();
            self.error(resource.clone(), &field, message)
        })?;
        // serde reads a struct from a sequence too (`mtls: [STRICT]`); the
        // schema says mapping, so such a document is refused.
        let written = serde_json::to_value(&typed).unwrap_or_default();
        if let Some(field) = sequence_for_mapping(&value, &written, String::new()) {
            return Err(self.error(
                resource.clone(),
                &field,
                "expected a mapping (key: value pairs), found a sequence".into(),
            ));
        }
        Ok(typed)
    }
}

/// The first path where the document has a sequence and its typed reading a mapping.
fn sequence_for_mapping(
    original: &serde_json::Value,
    typed: &serde_json::Value,
    path: String,
) -> Option<String> {
    use serde_json::Value;
    match (original, typed) {
        (Value::Array(_), Value::Object(_)) => Some(path),
        (Value::Object(o), Value::Object(t)) => t.iter().find_map(|(k, tv)| {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            o.get(k).and_then(|ov| sequence_for_mapping(ov, tv, child))
        }),
        (Value::Array(o), Value::Array(t)) => o
            .iter()
            .zip(t)
            .enumerate()
            .find_map(|(i, (ov, tv))| sequence_for_mapping(ov, tv, format!("{path}[{i}]"))),
        _ => None,
    }
}

/// Reads a MeshConfig: either MeshConfig YAML itself, or Istio's `istio`
/// ConfigMap whose `data.mesh` holds it.
pub fn load_mesh_config(file: &str, text: &str) -> Result<MeshConfig, Box<Diagnostic>> {
    let at = |line: usize, column: Option<usize>, message: String| {
        Box::new(Diagnostic {
            severity: Severity::Error,
            location: Location {
                file: file.into(),
                line,
                column,
            },
            resource: Some("MeshConfig".into()),
            field: None,
            message,
        })
    };
    let value: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| {
        let (line, column, message) = yaml_error(&e);
        at(line, column, format!("invalid YAML: {message}"))
    })?;
    let value = match value.get("data").and_then(|d| d.get("mesh")) {
        Some(serde_json::Value::String(mesh)) => serde_saphyr::from_str(mesh).map_err(|e| {
            // Placed at `data.mesh`; the error's place is in its text.
            let (line, column, message) = yaml_error(&e);
            let place = match column {
                Some(column) => format!(" (its line {line}, column {column})"),
                None if line > 0 => format!(" (its line {line})"),
                None => String::new(),
            };
            at(
                LineMap::build(text, 1).line_of("data.mesh"),
                None,
                format!("data.mesh is not valid YAML: {message}{place}"),
            )
        })?,
        _ => value,
    };
    let value = if value.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        value
    };
    let lines = LineMap::build(text, 1);
    serde_path_to_error::deserialize::<_, MeshConfig>(value).map_err(|e| {
        let field = e.path().to_string();
        let mut d = at(lines.line_of(&field), None, e.inner().to_string());
        d.field = Some(field);
        d
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_read_separately_and_placed_by_line() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: x}\nspec: {}\n---\n: : bad yaml [\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: x}\nspec:\n  action: NOPE\n";
        let loaded = load_str("f.yaml", text);
        assert_eq!(loaded.documents, 3);
        assert_eq!(
            loaded.policies.len(),
            1,
            "the valid first document still loads"
        );
        let lines: Vec<usize> = loaded.diagnostics.iter().map(|d| d.location.line).collect();
        assert_eq!(lines, [6, 12], "{:?}", loaded.diagnostics);
    }

    #[test]
    fn a_yaml_error_names_file_line_and_column_once() {
        // The broken document starts on line 6: the parser's line (3, in
        // the document) is not what the user needs, nor said twice.
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: x}\nspec: {}\n---\nmetadata:\n  name: x\n  namespace: [\n";
        let loaded = load_str("f.yaml", text);
        let shown: Vec<String> = loaded.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            shown,
            ["f.yaml:8:14: error: invalid YAML: unclosed bracket '['"]
        );
        // JSON output gains the column only where there is one.
        let json = serde_json::to_value(&loaded.diagnostics[0].location).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"file": "f.yaml", "line": 8, "column": 14})
        );
    }

    #[test]
    fn a_mesh_config_yaml_error_names_file_line_and_column_once() {
        let e =
            load_mesh_config("mesh.yaml", "trustDomain: x\ntrustDomainAliases: [\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "mesh.yaml:2:21: error: MeshConfig: invalid YAML: unclosed bracket '['"
        );
        // In Istio's ConfigMap, at `data.mesh`, with the place in its text.
        let configmap = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio}\ndata:\n  mesh: |\n    trustDomain: [\n";
        let e = load_mesh_config("istio.yaml", configmap).unwrap_err();
        assert_eq!(
            e.to_string(),
            "istio.yaml:5: error: MeshConfig: data.mesh is not valid YAML: unclosed bracket '[' (its line 1, column 14)"
        );
    }

    #[test]
    fn an_unreadable_file_is_named_without_an_invented_line() {
        let loaded = load_paths(&["/nonexistent/meshward/policy.yaml"]);
        let shown = loaded.diagnostics[0].to_string();
        assert!(
            shown.starts_with("/nonexistent/meshward/policy.yaml: error: cannot read: "),
            "{shown}"
        );
    }

    #[test]
    fn registry_kinds_load_beside_policies_and_are_checked() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: bookinfo}
spec:
  address: 127.0.0.1
  ports: {http: 19080}
  labels: {app: reviews, version: v1}
  serviceAccount: reviews
  network: net1
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews.bookinfo]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: broken, namespace: bookinfo}
spec:
  hosts: []
"#;
        let loaded = load_str("registry.yaml", text);
        assert_eq!(loaded.registry.len(), 2, "{:?}", loaded.diagnostics);
        let RegistryObject::WorkloadEntry(we) = &loaded.registry[0] else {
            panic!("not a WorkloadEntry")
        };
        assert_eq!(we.spec.service_account, "reviews");
        assert_eq!(we.spec.other["network"], "net1", "unused fields are kept");
        let d = &loaded.diagnostics[0];
        assert_eq!(
            (d.location.line, d.field.as_deref()),
            (26, Some("spec.hosts")),
            "{d}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_loop_ends() {
        let dir = std::env::temp_dir().join(format!("meshward-load-loop-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/p.yaml"), "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: x}\nspec: {}\n").unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).unwrap();
        // On its own thread, so a walk that never ends fails the test
        // instead of hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        let walked = dir.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load_paths(&[&walked]).policies.len());
        });
        let policies = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("loading a directory with a symlink loop ends");
        assert_eq!(policies, 1, "the policy is read once");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
