//! Validation of security policies, rule for rule as Istio's admission webhook
//! (`pkg/config/validation`) applies them, plus warnings for configurations
//! that are valid but almost certainly not what the author meant.
//!
//! Validation sees one object at a time and never panics: every problem is a
//! [`FieldIssue`] naming the field path, so the loader can point at the line.

use crate::api::{
    Action, AuthorizationPolicy, JwtRule, ObjectMeta, Operation, PathNormalizationMode,
    PeerAuthentication, Policy, PolicyTargetReference, RequestAuthentication, Resolution,
    ServiceEntry, Source, WorkloadSelector,
};
use crate::authz::condition::ConditionKey;
use crate::authz::path_template;
use crate::diagnostic::FieldIssue;

/// The annotation that makes an AuthorizationPolicy report instead of enforce.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// All problems with one policy. Errors make it invalid; warnings do not.
pub fn validate(policy: &Policy) -> Vec<FieldIssue> {
    let mut v = Issues::default();
    validate_metadata(policy.metadata(), &mut v);
    if !matches!(policy, Policy::AuthorizationPolicy(_))
        && policy
            .metadata()
            .annotations
            .contains_key(DRY_RUN_ANNOTATION)
    {
        v.error(
            format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
            format!(
                "{} has unsupported annotation {DRY_RUN_ANNOTATION}, please remove the annotation",
                policy.kind()
            ),
        );
    }
    match policy {
        Policy::PeerAuthentication(pa) => validate_peer_authentication(pa, &mut v),
        Policy::RequestAuthentication(ra) => validate_request_authentication(ra, &mut v),
        Policy::AuthorizationPolicy(ap) => validate_authorization_policy(ap, &mut v),
    }
    v.0
}

#[derive(Default)]
pub(crate) struct Issues(pub(crate) Vec<FieldIssue>);

impl Issues {
    pub(crate) fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(FieldIssue::error(field, message));
    }
    pub(crate) fn warning(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(FieldIssue::warning(field, message));
    }
    /// Two checks can find the same fault (an empty service account is
    /// both an empty value and a bad service account): say it once.
    fn push(&mut self, issue: FieldIssue) {
        if !self.0.contains(&issue) {
            self.0.push(issue);
        }
    }
}

pub(crate) fn validate_metadata(meta: &ObjectMeta, v: &mut Issues) {
    if let Err(e) = check_dns1123_subdomain(&meta.name) {
        v.error(
            "metadata.name",
            format!("invalid name {:?}: {e}", meta.name),
        );
    }
    if let Some(ns) = &meta.namespace
        && let Err(e) = check_dns1123_label(ns)
    {
        v.error(
            "metadata.namespace",
            format!("invalid namespace {ns:?}: {e}"),
        );
    }
}

fn validate_peer_authentication(pa: &PeerAuthentication, v: &mut Issues) {
    let spec = &pa.spec;
    validate_selector(spec.selector.as_ref(), v);
    let has_selector = spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    if spec.port_modes().next().is_some() && !has_selector {
        v.error(
            "spec.portLevelMtls",
            "mesh/namespace peer authentication cannot have port level mTLS: add a selector (portLevelMtls requires selector)",
        );
    }
    if spec
        .port_level_mtls
        .as_ref()
        .is_some_and(|ports| ports.is_empty())
    {
        v.error(
            "spec.portLevelMtls",
            "port level mTLS, if defined, must have at least one element",
        );
    }
    for (port, _) in spec.port_modes() {
        match port.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => {}
            _ => v.error(
                format!("spec.portLevelMtls.{port}"),
                format!("port must be in range 1..65535, found {port:?}"),
            ),
        }
    }
}

fn validate_request_authentication(ra: &RequestAuthentication, v: &mut Issues) {
    let spec = &ra.spec;
    validate_targeting(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        v,
    );
    let mut issuers = std::collections::HashSet::new();
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let path = format!("spec.jwtRules[{i}]");
        if !rule.issuer.is_empty() && !issuers.insert(rule.issuer.as_str()) {
            v.warning(
                format!("{path}.issuer"),
                format!("issuer {:?} appears in more than one jwtRule; only the first is used to verify its tokens", rule.issuer),
            );
        }
        validate_jwt_rule(rule, &path, v);
    }
}

fn validate_jwt_rule(rule: &JwtRule, path: &str, v: &mut Issues) {
    if rule.issuer.is_empty() && rule.jwks_uri.is_empty() {
        v.error(
            format!("{path}.issuer"),
            "issuer or jwksUri must be non-empty string",
        );
    }
    for (i, aud) in rule.audiences.iter().enumerate() {
        if aud.is_empty() {
            v.error(
                format!("{path}.audiences[{i}]"),
                "audience must be non-empty string",
            );
        }
    }
    if !rule.jwks_uri.is_empty()
        && let Err(e) = check_jwks_uri(&rule.jwks_uri)
    {
        v.error(format!("{path}.jwksUri"), e);
    }
    if !rule.jwks.is_empty() {
        if let Err(e) = crate::authn::jwks::parse_jwks(&rule.jwks) {
            v.error(format!("{path}.jwks"), format!("jwks parse error: {e}"));
        }
        if !rule.jwks_uri.is_empty() {
            v.warning(
                format!("{path}.jwksUri"),
                "both jwks and jwksUri are set: the inline jwks is used and jwksUri is ignored",
            );
        }
    }
    if rule.jwks.is_empty() && rule.jwks_uri.is_empty() {
        v.warning(
            format!("{path}.jwksUri"),
            "neither jwks nor jwksUri is set: keys would be discovered via OpenID configuration, which meshward does not do; tokens from this issuer are rejected",
        );
    }
    for (i, header) in rule.from_headers.iter().enumerate() {
        if header.name.is_empty() {
            v.error(
                format!("{path}.fromHeaders[{i}].name"),
                "location header name must be non-empty string",
            );
        } else if let Err(e) = check_header_name(&header.name) {
            v.error(format!("{path}.fromHeaders[{i}].name"), e);
        }
    }
    for (i, param) in rule.from_params.iter().enumerate() {
        if param.is_empty() {
            v.error(
                format!("{path}.fromParams[{i}]"),
                "location query must be non-empty string",
            );
        }
    }
    for (i, cookie) in rule.from_cookies.iter().enumerate() {
        if cookie.is_empty() {
            v.error(
                format!("{path}.fromCookies[{i}]"),
                "cookie name must be non-empty string",
            );
        }
    }
    if !rule.output_payload_to_header.is_empty()
        && let Err(e) = check_header_name(&rule.output_payload_to_header)
    {
        // Istio admits any value here; a name that is not a header token cannot be sent.
        v.warning(format!("{path}.outputPayloadToHeader"), e);
    }
    for (i, c) in rule.output_claim_to_headers.iter().enumerate() {
        let p = format!("{path}.outputClaimToHeaders[{i}]");
        if c.header.is_empty() || c.claim.is_empty() {
            v.error(
                &p,
                "outputClaimToHeaders header and claim value must be non-empty string",
            );
            continue;
        }
        if !c
            .header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            v.error(
                format!("{p}.header"),
                format!("header name {} is not a valid header name", c.header),
            );
        }
    }
    for (i, claim) in rule.space_delimited_claims.iter().enumerate() {
        if claim.is_empty() {
            v.error(
                format!("{path}.spaceDelimitedClaims[{i}]"),
                "claim name must be non-empty string",
            );
        }
    }
    if let Some(timeout) = &rule.timeout
        && let Err(e) = crate::duration::parse_timeout(timeout)
    {
        v.error(format!("{path}.timeout"), e);
    }
}

fn validate_authorization_policy(ap: &AuthorizationPolicy, v: &mut Issues) {
    let spec = &ap.spec;
    validate_targeting(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        v,
    );
    match spec.action {
        Action::Custom if spec.rules.is_empty() => v.error(
            "spec.rules",
            "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        ),
        Action::Custom if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) => {
            v.error("spec.provider.name", "`provider.name` must not be empty")
        }
        Action::Deny if spec.rules.is_empty() => v.error(
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        ),
        _ => {}
    }
    if spec.provider.is_some() && spec.action != Action::Custom {
        v.error(
            "spec.provider",
            format!(
                "`provider` must not be with non CUSTOM action, found {}",
                spec.action
            ),
        );
    }
    if let Some(value) = ap.metadata.annotations.get(DRY_RUN_ANNOTATION) {
        let field = format!("metadata.annotations.{DRY_RUN_ANNOTATION}");
        match spec.action {
            Action::Allow | Action::Deny => {
                if parse_bool(value).is_none() {
                    v.error(
                        field,
                        format!("annotation {DRY_RUN_ANNOTATION} has invalid value ({value}): use \"true\" or \"false\""),
                    );
                }
            }
            other => v.error(
                field,
                format!("the annotation {DRY_RUN_ANNOTATION} currently only supports action ALLOW/DENY, found action {other}"),
            ),
        }
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let p = format!("{path}.from[{j}].source");
            match &from.source {
                None => v.error(
                    &p,
                    format!("`from.source` must not be nil, found at rule {i}"),
                ),
                Some(src) => validate_source(src, spec.action, &p, i, v),
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let p = format!("{path}.to[{j}].operation");
            match &to.operation {
                None => v.error(
                    &p,
                    format!("`to.operation` must not be nil, found at rule {i}"),
                ),
                Some(op) => validate_operation(op, &p, i, v),
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            let p = format!("{path}.when[{j}]");
            if cond.key.is_empty() {
                v.error(format!("{p}.key"), "`key` must not be empty");
                continue;
            }
            if cond.values.is_empty() && cond.not_values.is_empty() {
                v.error(
                    &p,
                    format!(
                        "at least one of `values` or `notValues` must be set for key {}",
                        cond.key
                    ),
                );
                continue;
            }
            let key = match ConditionKey::parse(&cond.key) {
                Ok(key) => key,
                Err(e) => {
                    v.error(format!("{p}.key"), e.to_string());
                    continue;
                }
            };
            if spec.action == Action::Custom
                && (key.0.is_peer_identity() || cond.key.starts_with("request.auth."))
            {
                v.error(
                    format!("{p}.key"),
                    format!("{} is currently not supported with CUSTOM action", cond.key),
                );
            }
            for (field, values) in [("values", &cond.values), ("notValues", &cond.not_values)] {
                for (k, value) in values.iter().enumerate() {
                    if value.is_empty() {
                        v.error(
                            format!("{p}.{field}[{k}]"),
                            format!("empty value not allowed, found in {}", cond.key),
                        );
                        continue;
                    }
                    if let Err(e) = key.check_value(value) {
                        v.error(format!("{p}.{field}[{k}]"), e);
                    }
                }
            }
        }
    }
    if spec.action == Action::Deny && spec.rules.iter().any(denies_all_tcp) {
        v.warning(
            "spec.rules",
            "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port",
        );
    }
}

/// Istio's warning condition: a DENY rule whose `from` or `to` uses only
/// HTTP attributes turns into "deny every TCP connection" on TCP ports.
fn denies_all_tcp(rule: &crate::api::Rule) -> bool {
    // Every source field but requestPrincipals works on TCP.
    let tcp_in_from = rule.from.iter().filter_map(|f| f.source.as_ref()).any(|s| {
        s.fields()
            .iter()
            .any(|(name, list)| !name.contains("equestPrincipals") && !list.is_empty())
    });
    let tcp_in_to = rule
        .to
        .iter()
        .filter_map(|t| t.operation.as_ref())
        .any(|o| !o.ports.is_empty() || !o.not_ports.is_empty());
    let from_exists = !rule.from.is_empty();
    let to_exists = !rule.to.is_empty();
    (from_exists && !to_exists && !tcp_in_from) || (to_exists && !tcp_in_to)
}

/// What meshward does not do of a DestinationRule it accepts: a warning for
/// each part that changes nothing, so no one relies on it unknowingly.
pub fn validate_destination_rule(dr: &crate::api::DestinationRule) -> Vec<FieldIssue> {
    let mut v = Issues::default();
    if dr.spec.simple_load_balancer() == Some("PASSTHROUGH") {
        v.warning(
            "spec.trafficPolicy.loadBalancer.simple",
            "meshward does not pass connections through to their original destination: \
             PASSTHROUGH balances as LEAST_REQUEST",
        );
    }
    for field in dr.spec.other.keys() {
        v.warning(
            format!("spec.{field}"),
            "meshward reads only host and trafficPolicy.loadBalancer.simple of a DestinationRule: this field is kept, not used",
        );
    }
    if let Some(policy) = &dr.spec.traffic_policy {
        for field in policy.other.keys() {
            v.warning(
                format!("spec.trafficPolicy.{field}"),
                "meshward reads only trafficPolicy.loadBalancer.simple: this field is kept, not used",
            );
        }
    }
    v.0
}

/// Istio's `ValidateServiceEntry`, for the fields that say where a service
/// is and how it is reached: `addresses`, `resolution` and what each
/// resolution requires of `hosts`, `endpoints` and `ports`, with Istio's
/// messages. The resolution rules apply to a `resolution` written in the
/// entry; an entry that leaves it unset is read as meshward always read it
/// (see [`crate::api::ServiceEntrySpec::effective_resolution`]), so YAML
/// meshward loaded before still loads.
pub fn validate_service_entry(se: &ServiceEntry) -> Vec<FieldIssue> {
    let mut v = Issues::default();
    let spec = &se.spec;
    for (i, address) in spec.addresses.iter().enumerate() {
        if let Err(e) = check_service_address(address) {
            v.error(format!("spec.addresses[{i}]"), e);
        }
    }
    let resolution = spec.resolution;
    if spec.addresses.iter().any(|a| a.contains('/'))
        && let Some(r) = resolution
        && !matches!(r, Resolution::None | Resolution::Static)
    {
        v.error(
            "spec.addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        );
    }
    if spec.addresses.is_empty()
        && !se.auto_allocates()
        && let Some(i) = spec
            .ports
            .iter()
            .position(|p| p.protocol.is_empty() || p.protocol == "TCP")
    {
        v.warning(
            format!("spec.ports[{i}]"),
            "addresses are required for ports serving TCP (or unset) protocol when IP Autoallocation is not enabled",
        );
    }
    match resolution {
        None => {}
        Some(Resolution::None) => {
            if !spec.endpoints.is_empty() {
                v.error(
                    "spec.endpoints",
                    "no endpoints should be provided for resolution type none",
                );
            }
            if spec.workload_selector.is_some() {
                v.warning(
                    "spec.workloadSelector",
                    "workloadSelector should not be set when resolution mode is NONE",
                );
            }
        }
        Some(Resolution::Static) => {
            for (i, endpoint) in spec.endpoints.iter().enumerate() {
                let address = &endpoint.address;
                if address.is_empty() {
                    if !endpoint.other.contains_key("network") {
                        v.error(format!("spec.endpoints[{i}]"), "address is required");
                    }
                } else if !address.starts_with("unix://")
                    && address.parse::<std::net::IpAddr>().is_err()
                {
                    v.error(
                        format!("spec.endpoints[{i}].address"),
                        format!("endpoint address {address:?} is not a valid IP address"),
                    );
                }
            }
        }
        Some(r @ (Resolution::Dns | Resolution::DnsRoundRobin)) => {
            if spec.endpoints.is_empty()
                && let Some((i, e)) = spec
                    .hosts
                    .iter()
                    .enumerate()
                    .find_map(|(i, h)| check_fqdn(h).err().map(|e| (i, e)))
            {
                v.error(
                    format!("spec.hosts[{i}]"),
                    format!(
                        "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode {}, {e}",
                        r.as_str()
                    ),
                );
            }
            if r == Resolution::DnsRoundRobin && spec.endpoints.len() > 1 {
                v.error(
                    "spec.endpoints",
                    format!(
                        "there must only be 0 or 1 endpoint for resolution mode {}",
                        r.as_str()
                    ),
                );
            }
            for (i, endpoint) in spec.endpoints.iter().enumerate() {
                let address = &endpoint.address;
                if address.parse::<std::net::IpAddr>().is_err() && check_fqdn(address).is_err() {
                    v.error(
                        format!("spec.endpoints[{i}].address"),
                        format!(
                            "endpoint address {address:?} is not a valid FQDN or an IP address"
                        ),
                    );
                }
            }
            if !spec.addresses.is_empty()
                && spec.hosts.len() > 1
                && spec.ports.iter().any(|p| {
                    matches!(
                        p.protocol.to_ascii_lowercase().as_str(),
                        "tcp" | "https" | "tls" | "mongo" | "redis" | "mysql"
                    )
                })
            {
                v.warning(
                    "spec.hosts",
                    "service entry can not have more than one host specified simultaneously with address and tcp port",
                );
            }
        }
    }
    // Plain TCP carries nothing that tells the hosts apart, unless the
    // hosts are ignored (resolution NONE).
    if resolution.is_some_and(|r| r != Resolution::None)
        && spec.hosts.len() > 1
        && let Some(i) = spec.ports.iter().position(|p| {
            !matches!(
                p.protocol.to_ascii_lowercase().as_str(),
                "http" | "http2" | "http_proxy" | "grpc" | "grpc-web" | "https" | "tls"
            )
        })
    {
        v.error(
            format!("spec.ports[{i}]"),
            "multiple hosts provided with non-HTTP, non-TLS ports",
        );
    }
    v.0
}

/// A ServiceEntry address as Istio's `ValidateIPSubnet` reads it: a CIDR
/// block when it has one `/`, else an IP address.
fn check_service_address(value: &str) -> Result<(), String> {
    if value.matches('/').count() == 1 {
        return value
            .parse::<ipnet::IpNet>()
            .map(drop)
            .map_err(|_| format!("{value} is not a valid CIDR block"));
    }
    value
        .parse::<std::net::IpAddr>()
        .map(drop)
        .map_err(|_| format!("{value} is not a valid IP"))
}

/// Istio's `ValidateFQDN`: 1-255 characters, DNS-1123 labels (of either
/// case), an optional trailing dot, a top-level label that is not a number.
fn check_fqdn(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!("domain name {name:?} too long (max 255)"));
    }
    if name.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    let parts: Vec<&str> = name.split('.').collect();
    let tld = parts[parts.len() - 1];
    if tld.parse::<i64>().is_ok() {
        return Err(format!(
            "domain name {name:?} invalid (top level domain {tld:?} cannot be all-numeric)"
        ));
    }
    for (i, label) in parts.iter().enumerate() {
        if i == parts.len() - 1 && label.is_empty() {
            break;
        }
        let b = label.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric();
        if !ok {
            return Err(format!(
                "domain name {name:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

/// Go's `strconv.ParseBool`, which Istio uses for the dry-run annotation.
pub(crate) fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn validate_source(src: &Source, action: Action, path: &str, rule: usize, v: &mut Issues) {
    let lists = src.fields();
    if lists.iter().all(|(_, l)| l.is_empty()) {
        v.error(
            path,
            format!("`from.source` must not be empty, found at rule {rule}"),
        );
    }
    for (name, list) in lists {
        for (i, value) in list.iter().enumerate() {
            if value.is_empty() {
                v.error(
                    format!("{path}.{name}[{i}]"),
                    format!("empty value not allowed, found in {name}"),
                );
            }
        }
    }
    for (name, list) in [
        ("ipBlocks", &src.ip_blocks),
        ("notIpBlocks", &src.not_ip_blocks),
        ("remoteIpBlocks", &src.remote_ip_blocks),
        ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
    ] {
        for (i, value) in list.iter().enumerate() {
            if !value.is_empty()
                && let Err(e) = check_ip_or_cidr(value)
            {
                v.error(format!("{path}.{name}[{i}]"), e);
            }
        }
    }
    let has_sa = !src.service_accounts.is_empty() || !src.not_service_accounts.is_empty();
    if has_sa
        && (!src.principals.is_empty()
            || !src.not_principals.is_empty()
            || !src.namespaces.is_empty()
            || !src.not_namespaces.is_empty())
    {
        v.error(
            format!("{path}.serviceAccounts"),
            format!(
                "cannot set serviceAccounts with namespaces or principals, found at rule {rule}"
            ),
        );
    }
    for (name, list) in [
        ("serviceAccounts", &src.service_accounts),
        ("notServiceAccounts", &src.not_service_accounts),
    ] {
        if let Err((i, e)) = check_service_accounts(name, list) {
            v.error(format!("{path}.{name}[{i}]"), e);
        }
    }
    if action == Action::Custom {
        const IDENTITY: [&str; 8] = [
            "namespaces",
            "notNamespaces",
            "serviceAccounts",
            "notServiceAccounts",
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
        ];
        for (name, list) in src.fields() {
            if IDENTITY.contains(&name) && !list.is_empty() {
                v.error(
                    format!("{path}.{name}"),
                    format!(
                        "From.{}{} is currently not supported with CUSTOM action",
                        name[..1].to_ascii_uppercase(),
                        &name[1..]
                    ),
                );
            }
        }
    }
}

fn validate_operation(op: &Operation, path: &str, rule: usize, v: &mut Issues) {
    let lists = op.fields();
    if lists.iter().all(|(_, l)| l.is_empty()) {
        v.error(
            path,
            format!("`to.operation` must not be empty, found at rule {rule}"),
        );
    }
    for (name, list) in lists {
        for (i, value) in list.iter().enumerate() {
            if value.is_empty() {
                v.error(
                    format!("{path}.{name}[{i}]"),
                    format!("empty value not allowed, found in {name}"),
                );
            }
        }
    }
    for (name, list) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
        for (i, value) in list.iter().enumerate() {
            if !value.is_empty()
                && let Err(e) = check_port(value)
            {
                v.error(format!("{path}.{name}[{i}]"), e);
            }
        }
    }
    for (name, list) in [("methods", &op.methods), ("notMethods", &op.not_methods)] {
        for (i, value) in list.iter().enumerate() {
            if value.is_empty() {
                continue;
            }
            let token = value.trim_start_matches('*').trim_end_matches('*');
            if !token.bytes().all(is_tchar) {
                // Istio admits any string; such a method can never be on a request.
                v.warning(
                    format!("{path}.{name}[{i}]"),
                    format!("method {value:?} is not an HTTP method token (such as GET or POST) and can never match"),
                );
            } else if token.bytes().any(|b| b.is_ascii_lowercase()) {
                v.warning(
                    format!("{path}.{name}[{i}]"),
                    format!("method {value:?} is lowercase; methods match case-sensitively, so it will not match {:?}", value.to_ascii_uppercase()),
                );
            }
        }
    }
    for (name, list) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
        for (i, value) in list.iter().enumerate() {
            if let Err(e) = path_template::check(value) {
                v.error(format!("{path}.{name}[{i}]"), e);
            }
        }
    }
}

/// Requests that path normalization `BASE` leaves as they are, and that an
/// application may still serve as `/admin`.
pub const BASE_BYPASSES: &str = "//admin, /admin%2Fx, /x/..%2Fadmin, /admin%5Cx";

/// What path normalization `mode` (the mesh's `pathNormalization`) leaves
/// open to a rule on paths, and the setting that closes it; `None` when
/// slashes are merged. Istio's default, `BASE`, is the one Istio's own
/// documentation calls vulnerable (CVE-2021-31920).
pub fn path_normalization_risk(mode: PathNormalizationMode) -> Option<String> {
    let (name, also) = match mode.effective() {
        PathNormalizationMode::None => ("NONE (", ", /x/../admin"),
        PathNormalizationMode::Base | PathNormalizationMode::Default => {
            ("BASE (Istio's default; ", "")
        }
        PathNormalizationMode::MergeSlashes | PathNormalizationMode::DecodeAndMergeSlashes => {
            return None;
        }
    };
    Some(format!(
        "under path normalization {name}vulnerable to CVE-2021-31920) requests such as \
         {BASE_BYPASSES}{also} reach the application as written and escape a rule on /admin \
         or /admin/*, though an application that merges slashes or decodes %2F and %5C serves \
         them as /admin or below it; set MeshConfig \
         `pathNormalization: {{normalization: MERGE_SLASHES}}` (closes //admin) or, strictest, \
         `DECODE_AND_MERGE_SLASHES` (closes all of them)"
    ))
}

/// A warning for a policy whose paths a request can slip past under path
/// normalization `mode`: a DENY, AUDIT or CUSTOM rule on `paths` or
/// `notPaths` (a request escaping a DENY is let through, one escaping a
/// CUSTOM rule is never sent to the authorizer, one escaping AUDIT is not
/// logged), or an ALLOW rule on `notPaths` (which then allows the request
/// it meant to exclude). One warning per policy, at its first such field.
pub fn path_normalization_warning(
    policy: &Policy,
    mode: PathNormalizationMode,
) -> Option<FieldIssue> {
    let Policy::AuthorizationPolicy(ap) = policy else {
        return None;
    };
    let risk = path_normalization_risk(mode)?;
    let action = ap.spec.action;
    for (r, rule) in ap.spec.rules.iter().enumerate() {
        for (t, to) in rule.to.iter().enumerate() {
            let Some(op) = &to.operation else { continue };
            let field = match action {
                Action::Allow => (!op.not_paths.is_empty()).then_some("notPaths"),
                _ if !op.paths.is_empty() => Some("paths"),
                _ => (!op.not_paths.is_empty()).then_some("notPaths"),
            };
            if let Some(field) = field {
                let article = match action {
                    Action::Allow | Action::Audit => "an",
                    Action::Deny | Action::Custom => "a",
                };
                return Some(FieldIssue::warning(
                    format!("spec.rules[{r}].to[{t}].operation.{field}"),
                    format!("{article} {action} rule on {field}: {risk}"),
                ));
            }
        }
    }
    None
}

/// A CUSTOM policy whose provider is `envoyExtAuthzHttp` and which has a
/// rule that TCP traffic could match (no host, method or path, no request
/// principal): Istio ignores such a policy on TCP ports (an HTTP
/// authorizer cannot judge a connection), so those connections are not
/// checked by it, which its author may not expect.
pub fn custom_on_tcp_warning(policy: &Policy, mesh: &crate::api::MeshConfig) -> Option<FieldIssue> {
    let Policy::AuthorizationPolicy(ap) = policy else {
        return None;
    };
    if ap.spec.action != Action::Custom {
        return None;
    }
    let name = &ap.spec.provider.as_ref()?.name;
    mesh.extension_provider(name)?
        .envoy_ext_authz_http
        .as_ref()?;
    let tcp_rule = ap.spec.rules.iter().any(|rule| {
        let http_to = rule
            .to
            .iter()
            .filter_map(|t| t.operation.as_ref())
            .any(|op| {
                op.fields().iter().any(|(field, values)| {
                    !values.is_empty() && !matches!(*field, "ports" | "notPorts")
                })
            });
        let http_from = rule
            .from
            .iter()
            .filter_map(|f| f.source.as_ref())
            .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty());
        !http_to && !http_from
    });
    tcp_rule.then(|| {
        FieldIssue::warning(
            "spec.provider.name",
            format!(
                "provider {name:?} is envoyExtAuthzHttp, which checks HTTP requests only: on TCP ports this policy is ignored, as Istio ignores it, and connections are not checked by it; use an envoyExtAuthzGrpc provider to check TCP connections"
            ),
        )
    })
}

/// `selector` and `targetRef(s)` are alternatives; each is checked on its own terms.
fn validate_targeting(
    selector: Option<&WorkloadSelector>,
    target_ref: Option<&PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    v: &mut Issues,
) {
    let set = [
        selector.is_some(),
        target_ref.is_some(),
        !target_refs.is_empty(),
    ];
    if set.iter().filter(|s| **s).count() > 1 {
        v.error(
            "spec",
            "only one of targetRefs or workloadSelector can be set (selector, targetRef and targetRefs are alternatives)",
        );
    }
    validate_selector(selector, v);
    if let Some(r) = target_ref {
        validate_target_ref(r, "spec.targetRef", v);
    }
    for (i, r) in target_refs.iter().enumerate() {
        validate_target_ref(r, &format!("spec.targetRefs[{i}]"), v);
    }
}

fn validate_target_ref(r: &PolicyTargetReference, path: &str, v: &mut Issues) {
    const ALLOWED: [(&str, &str); 4] = [
        ("gateway.networking.k8s.io", "Gateway"),
        ("gateway.networking.k8s.io", "GatewayClass"),
        ("", "Service"),
        ("networking.istio.io", "ServiceEntry"),
    ];
    if !ALLOWED.contains(&(r.group.as_str(), r.kind.as_str())) {
        v.error(
            path,
            format!(
                "targetRef must be to one of {}; found group {:?} kind {:?}",
                ALLOWED
                    .iter()
                    .map(|(g, k)| if g.is_empty() {
                        format!("core/{k}")
                    } else {
                        format!("{g}/{k}")
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                r.group,
                r.kind
            ),
        );
    }
    if r.name.is_empty() {
        v.error(format!("{path}.name"), "targetRef name must be set");
    }
    if !r.namespace.is_empty() {
        v.error(
            format!("{path}.namespace"),
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        );
    }
    v.warning(
        path,
        "policies with targetRef attach to gateways and waypoints; meshward sidecars are selected by `selector`, so this policy applies to no sidecar workload (meshward's ingress gateway applies it when it names a Gateway the gateway serves)",
    );
}

fn validate_selector(selector: Option<&WorkloadSelector>, v: &mut Issues) {
    let Some(selector) = selector else { return };
    if selector.match_labels.is_empty() {
        v.warning("spec.selector", "workload selector specified without labels: it selects every workload in the namespace");
    }
    for (k, value) in &selector.match_labels {
        let path = format!("spec.selector.matchLabels.{k}");
        if k.is_empty() {
            v.error(
                &path,
                format!(
                    "empty key is not supported in selector: {:?}",
                    format!("{k}={value}")
                ),
            );
            continue;
        }
        if k.contains('*') || value.contains('*') {
            v.error(
                &path,
                format!(
                    "wildcard is not supported in selector: {:?}",
                    format!("{k}={value}")
                ),
            );
            continue;
        }
        // Kubernetes labels cannot have these values, so the selector would match nothing.
        if let Err(e) = check_label_key(k) {
            v.warning(
                &path,
                format!("label key {k:?} can never be on a workload: {e}"),
            );
        }
        if let Err(e) = check_label_value(value) {
            v.warning(
                &path,
                format!("label value {value:?} can never be on a workload: {e}"),
            );
        }
    }
}

// ---- value checks shared with the matchers ----

/// A port as Istio's `ValidatePorts` reads it: decimal digits, 0-65535.
pub(crate) fn check_port(value: &str) -> Result<u16, String> {
    let bad = || format!("bad port ({value}): must be a number in 0-65535");
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse::<u16>().map_err(|_| bad())
}

/// An address or CIDR as Istio's `ValidateIPs` reads it. Host bits may be set
/// in a CIDR (`10.0.0.1/8` means `10.0.0.0/8`).
pub(crate) fn check_ip_or_cidr(value: &str) -> Result<ipnet::IpNet, String> {
    if value.contains('/') {
        return value
            .parse::<ipnet::IpNet>()
            .map(|n| n.trunc())
            .map_err(|e| format!("bad CIDR range ({value}): {e}"));
    }
    value
        .parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("bad IP address ({value})"))
}

/// Istio's `CheckServiceAccount`: `sa` or `namespace/sa`, no wildcards, at most 16.
pub(crate) fn check_service_accounts(key: &str, values: &[String]) -> Result<(), (usize, String)> {
    if values.len() > 16 {
        return Err((
            16,
            format!(
                "may not have more than 16 values, found {} in {key}",
                values.len()
            ),
        ));
    }
    for (i, value) in values.iter().enumerate() {
        let err = |m: String| Err((i, m));
        if value.is_empty() {
            return err(format!("empty value not allowed, found in {key}"));
        }
        if value.contains('*') {
            return err(format!("wildcard not allowed, found in {key}"));
        }
        match value.matches('/').count() {
            0 => {}
            1 => {
                let (ns, sa) = value.split_once('/').unwrap_or_default();
                if ns.is_empty() {
                    return err(format!(
                        "expected format 'serviceAccount' or 'namespace/serviceAccount', found empty namespace {value:?} in {key}"
                    ));
                }
                if sa.is_empty() {
                    return err(format!(
                        "expected format 'serviceAccount' or 'namespace/serviceAccount', found empty serviceAccount {value:?} in {key}"
                    ));
                }
            }
            _ => {
                return err(format!(
                    "expected format 'serviceAccount' or 'namespace/serviceAccount', found {value:?} in {key}"
                ));
            }
        }
        if value.len() > 320 {
            return err(format!(
                "value cannot exceed 320 characters, found {value:?} in {key}"
            ));
        }
    }
    Ok(())
}

fn check_jwks_uri(uri: &str) -> Result<(), String> {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("", uri));
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "URI scheme {scheme:?} is not supported (jwksUri {uri:?} must be an http:// or https:// URL)"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            if !port.is_empty() && !authority.ends_with(']') && port.parse::<u16>().is_err() {
                return Err(format!("invalid port {port:?} in jwksUri {uri:?}"));
            }
            if authority.ends_with(']') {
                authority
            } else {
                host
            }
        }
        _ => authority,
    };
    if host.is_empty() {
        return Err(format!("jwksUri {uri:?} has no host"));
    }
    Ok(())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(format!("invalid HTTP header name {name:?}"));
    }
    Ok(())
}

fn check_dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1-63 characters");
    }
    let b = s.as_bytes();
    let ok = b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(
            "must consist of lower case alphanumeric characters or '-', and start and end with an alphanumeric character",
        )
    }
}

fn check_dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1-253 characters");
    }
    for part in s.split('.') {
        check_dns1123_label(part)
            .map_err(|_| "must consist of lower case alphanumeric characters, '-' or '.', and start and end with an alphanumeric character")?;
    }
    Ok(())
}

fn check_label_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("name part must be 1-63 characters");
    }
    let b = s.as_bytes();
    let ok = b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(
            "must consist of alphanumeric characters, '-', '_' or '.', and start and end with an alphanumeric character",
        )
    }
}

fn check_label_key(k: &str) -> Result<(), &'static str> {
    match k.split_once('/') {
        Some((prefix, name)) => {
            check_dns1123_subdomain(prefix).map_err(|_| "prefix must be a DNS subdomain")?;
            check_label_name(name)
        }
        None => check_label_name(k),
    }
}

fn check_label_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Ok(());
    }
    check_label_name(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::Severity;

    #[test]
    fn custom_policies_with_http_providers_warn_that_tcp_escapes_them() {
        let mesh = |kind: &str| crate::api::MeshConfig {
            extension_providers: vec![crate::api::ExtensionProvider {
                name: "ext".into(),
                envoy_ext_authz_http: (kind == "http").then(Default::default),
                envoy_ext_authz_grpc: (kind == "grpc").then(Default::default),
            }],
            ..Default::default()
        };
        let policy = |rules: &str| {
            let text = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n  action: CUSTOM\n  provider: {{name: ext}}\n  rules: {rules}\n"
            );
            let loaded = crate::load::load_str("p.yaml", &text);
            assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
            loaded.into_policies().remove(0)
        };
        let warning = custom_on_tcp_warning(&policy("[{}]"), &mesh("http")).unwrap();
        assert_eq!(warning.field, "spec.provider.name");
        assert!(
            warning.message.contains("envoyExtAuthzHttp"),
            "{}",
            warning.message
        );
        let ports = policy("[{to: [{operation: {ports: [\"5432\"]}}]}]");
        assert!(custom_on_tcp_warning(&ports, &mesh("http")).is_some());
        // Rules only HTTP can match, or a gRPC provider: nothing escapes.
        let paths = policy("[{to: [{operation: {paths: [/admin]}}]}]");
        assert!(custom_on_tcp_warning(&paths, &mesh("http")).is_none());
        assert!(custom_on_tcp_warning(&policy("[{}]"), &mesh("grpc")).is_none());
        assert!(custom_on_tcp_warning(&policy("[{}]"), &mesh("none")).is_none());
    }

    /// `(line, field, severity, message)` of each diagnostic for one
    /// ServiceEntry spec, and whether it loaded.
    fn service_entry(spec: &str) -> (bool, Vec<(usize, String, Severity, String)>) {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se, namespace: ns}}\nspec:\n{spec}"
        );
        let loaded = crate::load::load_str("se.yaml", &text);
        let issues = loaded
            .diagnostics
            .iter()
            .map(|d| {
                assert_eq!(d.resource.as_deref(), Some("ServiceEntry ns/se"), "{d}");
                (
                    d.location.line,
                    d.field.clone().unwrap_or_default(),
                    d.severity,
                    d.message.clone(),
                )
            })
            .collect();
        (loaded.registry.len() == 1, issues)
    }

    fn error(line: usize, field: &str, message: &str) -> (usize, String, Severity, String) {
        (line, field.into(), Severity::Error, message.into())
    }

    fn warning(line: usize, field: &str, message: &str) -> (usize, String, Severity, String) {
        (line, field.into(), Severity::Warning, message.into())
    }

    #[test]
    fn service_entry_addresses_are_ips_or_cidrs() {
        let (ok, issues) = service_entry(
            "  hosts: [db.example]\n  addresses:\n  - 192.0.2.1\n  - 2001:db8::1\n  - 10.0.0.0/8\n  - db.example\n  - 10.0.0.0/33\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: STATIC\n",
        );
        assert!(!ok, "an entry with a bad address is refused");
        assert_eq!(
            issues,
            [
                error(10, "spec.addresses[3]", "db.example is not a valid IP"),
                error(
                    11,
                    "spec.addresses[4]",
                    "10.0.0.0/33 is not a valid CIDR block"
                ),
            ]
        );
        let (ok, issues) = service_entry(
            "  hosts: [db.example]\n  addresses: [10.0.0.0/8]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: DNS\n",
        );
        assert!(!ok);
        assert_eq!(
            issues,
            [error(
                6,
                "spec.addresses",
                "CIDR addresses are allowed only for NONE/STATIC resolution types"
            )]
        );
    }

    #[test]
    fn what_istio_refuses_per_resolution() {
        // NONE: no endpoints; a selector is only a warning.
        let (ok, issues) = service_entry(
            "  hosts: [a.example]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: NONE\n  endpoints: [{address: 192.0.2.1}]\n",
        );
        assert!(!ok);
        assert_eq!(
            issues,
            [error(
                8,
                "spec.endpoints",
                "no endpoints should be provided for resolution type none"
            )]
        );
        let (ok, issues) = service_entry(
            "  hosts: [a.example]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: NONE\n  workloadSelector: {labels: {app: a}}\n",
        );
        assert!(ok, "{issues:?}");
        assert_eq!(
            issues,
            [warning(
                8,
                "spec.workloadSelector",
                "workloadSelector should not be set when resolution mode is NONE"
            )]
        );
        // STATIC: endpoints by IP address.
        let (ok, issues) = service_entry(
            "  hosts: [a.example]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints:\n  - address: a.internal\n",
        );
        assert!(!ok);
        assert_eq!(
            issues,
            [error(
                9,
                "spec.endpoints[0].address",
                "endpoint address \"a.internal\" is not a valid IP address"
            )]
        );
        // DNS: hosts must be names when there are no endpoints; at most one
        // endpoint for DNS_ROUND_ROBIN.
        let (ok, issues) = service_entry(
            "  hosts: [a.example, '*.b.example']\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n",
        );
        assert!(!ok);
        assert_eq!(
            issues,
            [error(
                5,
                "spec.hosts[1]",
                "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode DNS, domain name \"*.b.example\" invalid (label \"*\" invalid)"
            )]
        );
        let (ok, issues) = service_entry(
            "  hosts: [a.example]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: a1.example}, {address: 192.0.2.2}]\n",
        );
        assert!(!ok);
        assert_eq!(
            issues,
            [error(
                8,
                "spec.endpoints",
                "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN"
            )]
        );
        // Several hosts share a TCP port only when the hosts are ignored.
        let (ok, issues) = service_entry(
            "  hosts: [a.example, b.example]\n  ports: [{number: 80, name: http, protocol: HTTP}, {number: 5432, name: tcp, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 192.0.2.1}]\n",
        );
        assert!(!ok);
        assert_eq!(
            issues,
            [error(
                6,
                "spec.ports[1]",
                "multiple hosts provided with non-HTTP, non-TLS ports"
            )]
        );
        let (ok, _) = service_entry(
            "  hosts: [a.example, b.example]\n  addresses: [192.0.2.9]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: NONE\n",
        );
        assert!(ok);
        // A resolution Istio does not have.
        let (ok, issues) = service_entry("  hosts: [a.example]\n  resolution: DYNAMIC\n");
        assert!(!ok);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(
            (issues[0].0, issues[0].2),
            (6, Severity::Error),
            "{issues:?}"
        );
    }

    #[test]
    fn an_unset_resolution_keeps_entries_valid_as_before() {
        // meshward's examples: no resolution, a selector; and inline
        // endpoints by host name.
        for spec in [
            "  hosts: [reviews.bookinfo]\n  ports: [{number: 9080, name: http, protocol: HTTP}]\n  workloadSelector: {labels: {app: reviews}}\n",
            "  hosts: [db.bookinfo, db2.bookinfo]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  endpoints: [{address: db.internal}]\n",
            "  hosts: [db.bookinfo]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  location: MESH_INTERNAL\n  endpoints: [{address: 127.0.0.5}]\n",
        ] {
            let (ok, issues) = service_entry(spec);
            assert!(ok && issues.is_empty(), "{spec}: {issues:?}");
        }
        // No address, none allocated, and TCP: Istio's warning.
        let (ok, issues) =
            service_entry("  hosts: [db.example]\n  ports: [{number: 5432, name: tcp}]\n");
        assert!(ok);
        assert_eq!(
            issues,
            [warning(
                6,
                "spec.ports[0]",
                "addresses are required for ports serving TCP (or unset) protocol when IP Autoallocation is not enabled"
            )]
        );
    }

    #[test]
    fn fqdns() {
        assert!(check_fqdn("a.example").is_ok());
        assert!(check_fqdn("A-1.Example.").is_ok());
        assert!(check_fqdn("a.example.123").is_err());
        assert!(check_fqdn("a..example").is_err());
        assert!(check_fqdn("-a.example").is_err());
        assert!(check_fqdn("").is_err());
        assert!(check_fqdn(&"a".repeat(256)).is_err());
    }

    #[test]
    fn jwks_uri_rules() {
        assert!(check_jwks_uri("https://example.com/jwks").is_ok());
        assert!(check_jwks_uri("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_jwks_uri("http://[::1]:8080/jwks").is_ok());
        assert!(check_jwks_uri("ftp://example.com/jwks").is_err());
        assert!(check_jwks_uri("example.com/jwks").is_err());
        assert!(check_jwks_uri("https:///jwks").is_err());
        assert!(check_jwks_uri("https://example.com:port/jwks").is_err());
    }

    #[test]
    fn label_rules() {
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("app.kubernetes.io/name").is_ok());
        assert!(check_label_key("-app").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("v1.2_3").is_ok());
        assert!(check_label_value("bad value").is_err());
    }

    #[test]
    fn ports_and_ips() {
        assert_eq!(check_port("8080"), Ok(8080));
        assert!(check_port("65536").is_err());
        assert!(check_port("http").is_err());
        assert!(check_ip_or_cidr("10.0.0.0/8").is_ok());
        assert!(check_ip_or_cidr("10.0.0.1").is_ok());
        assert!(check_ip_or_cidr("::1").is_ok());
        assert!(check_ip_or_cidr("10.0.0.0/33").is_err());
        assert_eq!(check_port("080"), Ok(80));
        assert!(check_port("+80").is_err());
        assert!(check_port("").is_err());
        assert_eq!(
            check_ip_or_cidr("10.1.2.3/8").map(|n| n.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert!(check_ip_or_cidr("example.com").is_err());
    }
}
