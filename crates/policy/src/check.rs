//! The JSON Lines model of `meshward check`: one request in, one decision out.
//!
//! Kept in the engine crate so the CLI and the test suites speak exactly the
//! same format and run exactly the same pipeline.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::authz::{CustomVerdict, DryRunResult, Verdict};
use crate::request::{Connection, HttpRequest};
use crate::resolve::{PolicySet, Workload, WorkloadPolicy};

/// One input line.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckInput {
    pub workload: Workload,
    pub port: u16,
    #[serde(default)]
    pub source: SourceInput,
    #[serde(default)]
    pub destination: DestinationInput,
    #[serde(default)]
    pub sni: Option<String>,
    /// Absent: a TCP connection.
    #[serde(default)]
    pub http: Option<HttpInput>,
    /// Offline verdicts for CUSTOM providers, by provider name:
    /// `"allow"`, `"deny"`, `"deny:<status>"` or `"error"`.
    #[serde(default)]
    pub ext_authz: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInput {
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// The peer's SPIFFE ID; absent means a plaintext peer.
    #[serde(default)]
    pub principal: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationInput {
    #[serde(default)]
    pub ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpInput {
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub headers: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    pub remote_ip: Option<IpAddr>,
}

fn default_method() -> String {
    "GET".into()
}

fn default_path() -> String {
    "/".into()
}

/// A header value or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// One output line.
#[derive(Debug, Clone, Serialize)]
pub struct CheckOutput {
    pub decision: Verdict,
    pub status: u16,
    pub mtls_mode: crate::api::MtlsMode,
    pub reason: String,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub audited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_policy: Option<String>,
    pub dry_run: Vec<DryRunResult>,
    pub stage: crate::pipeline::Stage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_principal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub www_authenticate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_headers: Option<BTreeMap<String, OneOrMany>>,
}

impl Serialize for OneOrMany {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            OneOrMany::One(v) => s.serialize_str(v),
            OneOrMany::Many(v) => v.serialize(s),
        }
    }
}

impl CheckInput {
    pub fn connection(&self) -> Connection {
        Connection {
            source_ip: self.source.ip,
            source_principal: self.source.principal.clone(),
            destination_ip: self.destination.ip,
            destination_port: self.port,
            sni: self.sni.clone(),
        }
    }

    pub fn http_request(&self) -> Option<HttpRequest> {
        let h = self.http.as_ref()?;
        let mut headers = Vec::new();
        for (name, value) in &h.headers {
            let name = name.to_ascii_lowercase();
            match value {
                OneOrMany::One(v) => headers.push((name, v.clone())),
                OneOrMany::Many(vs) => headers.extend(vs.iter().map(|v| (name.clone(), v.clone()))),
            }
        }
        let host = if h.host.is_empty() {
            headers
                .iter()
                .find(|(k, _)| k == "host")
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        } else {
            h.host.clone()
        };
        let mut request = HttpRequest {
            method: h.method.clone(),
            path: h.path.clone(),
            host,
            headers,
            remote_ip: h.remote_ip,
        };
        // As the proxy does before asking the engine.
        request.normalize_authority();
        Some(request)
    }

    fn custom_verdict(&self, provider: &str) -> CustomVerdict {
        match self.ext_authz.get(provider).map(String::as_str) {
            Some("allow") => CustomVerdict::Allow,
            Some("deny") => CustomVerdict::Deny(403),
            Some(v) if v.starts_with("deny:") => CustomVerdict::Deny(
                v[5..]
                    .parse()
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .unwrap_or(403),
            ),
            Some("error") => CustomVerdict::Error("offline verdict: error".into()),
            Some(other) => CustomVerdict::Error(format!("unknown offline verdict {other:?}")),
            None => CustomVerdict::Error(format!(
                "no offline verdict for provider {provider:?}; add \"ext_authz\":{{\"{provider}\":\"allow\"}} to the input line"
            )),
        }
    }
}

/// Compiled policies per workload, so a long input compiles each workload once.
#[derive(Debug, Default)]
pub struct Checker {
    compiled: HashMap<Workload, WorkloadPolicy>,
}

impl Checker {
    pub fn check(&mut self, set: &PolicySet, input: &CheckInput) -> CheckOutput {
        let policy = self
            .compiled
            .entry(input.workload.clone())
            .or_insert_with(|| set.for_workload(&input.workload));
        let connection = input.connection();
        let http = input.http_request();
        let d = policy.check(&connection, http.as_ref(), |c| {
            input.custom_verdict(&c.provider.name)
        });
        let deciding = d.authz.as_ref().and_then(|a| a.deciding.clone());
        let audit = d.authz.as_ref().and_then(|a| a.audit.clone());
        let upstream_headers = http
            .as_ref()
            .and_then(|h| d.upstream_headers(h))
            .map(|headers| {
                let mut map: BTreeMap<String, OneOrMany> = BTreeMap::new();
                for (k, v) in headers {
                    match map.remove(&k) {
                        None => {
                            map.insert(k, OneOrMany::One(v));
                        }
                        Some(OneOrMany::One(first)) => {
                            map.insert(k, OneOrMany::Many(vec![first, v]));
                        }
                        Some(OneOrMany::Many(mut all)) => {
                            all.push(v);
                            map.insert(k, OneOrMany::Many(all));
                        }
                    }
                }
                map
            });
        CheckOutput {
            decision: d.verdict,
            status: d.status,
            mtls_mode: d.mtls_mode,
            reason: d.reason(policy, &connection, http.as_ref()),
            policy: deciding.as_ref().map(|r| r.policy.to_string()),
            rule: deciding.and_then(|r| r.rule),
            audited: audit.is_some(),
            audit_policy: audit.map(|a| a.policy.to_string()),
            dry_run: d.authz.map(|a| a.dry_run).unwrap_or_default(),
            stage: d.stage,
            request_principal: d.principal.map(|p| p.principal()),
            www_authenticate: d.www_authenticate,
            upstream_headers,
        }
    }
}
