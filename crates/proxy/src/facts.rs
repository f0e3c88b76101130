//! The facts an inbound decision record keeps so the decision can be made
//! again offline (`meshward replay`) and learned from (`meshward suggest`):
//! the destination workload, the destination address and port, SNI, the
//! path as received, the verified JWT's attributes and the claims the
//! policies in force read, and the headers the operator named
//! (`--log-header`; credentials never). The format is
//! `meshward_policy::learn::record`'s, documented in
//! `docs/decision-records.md`.
//!
//! Facts are gathered only while something reads records — the access log
//! or decision reporting (`LogSink::is_enabled` says either) — so a proxy
//! with both off does no work for them.

use meshward_policy::authn::JwtPrincipal;
use meshward_policy::authz::normalize;
use meshward_policy::learn::record::{
    NEVER_RECORDED_HEADERS, RecordWorkload, RequestAuth, has_bearer_token, header_values,
};
use meshward_policy::{HttpRequest, WorkloadPolicy};

use crate::Shared;
use crate::inbound::ConnInfo;
use crate::log::AccessRecord;

/// What records keep beyond the standard facts.
#[derive(Debug, Clone, Default)]
pub struct FactSettings {
    /// The WorkloadEntry's name (`--workload NS/NAME`), when known.
    pub workload_name: Option<String>,
    /// Lower-cased header names whose values are kept (`--log-header`).
    pub headers: Vec<String>,
    /// Where inbound records are also sent (`--report-decisions`).
    pub report: Option<crate::report::Reporter>,
}

/// Why a header cannot be logged.
#[derive(Debug, thiserror::Error)]
#[error("--log-header {0}: credentials are never logged")]
pub struct CredentialHeader(String);

impl FactSettings {
    /// Settings for `workload` (`NS/NAME`) keeping `headers`, refusing
    /// credential headers.
    pub fn new(
        workload: Option<&str>,
        headers: &[String],
    ) -> Result<FactSettings, CredentialHeader> {
        let mut names: Vec<String> = Vec::new();
        for header in headers {
            let name = header.to_ascii_lowercase();
            if NEVER_RECORDED_HEADERS.contains(&name.as_str()) {
                return Err(CredentialHeader(header.clone()));
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(FactSettings {
            workload_name: workload
                .and_then(|w| w.split_once('/'))
                .map(|(_, name)| name.to_owned()),
            headers: names,
            report: None,
        })
    }
}

/// Adds the facts of one inbound decision to `record`: by `policy` (the
/// one that decided), for the connection `info` and, for HTTP, the request
/// `http` as the engine saw it, with `principal` the verified JWT's.
pub(crate) fn add(
    record: &mut AccessRecord,
    shared: &Shared,
    policy: &WorkloadPolicy,
    info: &ConnInfo,
    http: Option<&HttpRequest>,
    principal: Option<&JwtPrincipal>,
) {
    if !shared.logs.access.is_enabled() {
        return;
    }
    let settings = &shared.logs.facts;
    let connection = &info.connection;
    record.workload = Some(RecordWorkload::of(
        &policy.workload,
        settings.workload_name.as_deref(),
    ));
    record.destination_ip = connection.destination_ip;
    record.destination_port = Some(connection.destination_port);
    record.sni = connection.sni.clone();
    let Some(http) = http else { return };
    record.remote_ip = http
        .remote_ip
        .filter(|ip| Some(*ip) != connection.source_ip);
    let received = normalize::strip_query(&http.path);
    if record.path.as_deref() != Some(received) {
        record.original_path = Some(received.to_owned());
    }
    match principal {
        Some(principal) => {
            record.request_auth = Some(RequestAuth::of(principal, policy.authz.references()));
        }
        None => record.bearer_token = has_bearer_token(http),
    }
    if !settings.headers.is_empty() {
        record.headers = Some(header_values(http, &settings.headers));
    }
}
