//! Istio's admission rules for `Gateway` and `VirtualService`
//! (`pkg/config/validation`: `ValidateGateway`, `ValidateVirtualService`),
//! for the fields meshward's ingress gateway reads, with the limits of what
//! it implements: a field that would change what the gateway does and that
//! it does not do is an error; one that changes nothing it serves is a
//! warning. Fields it does not type at all are refused by the loader.

use crate::api::{Gateway, HttpRoute, RETRY_ON, ServerTls, StringMatch, VirtualService};
use crate::diagnostic::FieldIssue;
use crate::duration::parse as parse_duration;
use crate::validate::{Issues, validate_metadata};

/// The server protocols the gateway serves.
pub const SERVER_PROTOCOLS: [&str; 3] = ["HTTP", "HTTPS", "HTTP2"];

/// The TLS modes the gateway terminates.
pub const TLS_MODES: [&str; 2] = ["SIMPLE", "MUTUAL"];

/// A host as Istio accepts it in a Gateway or VirtualService: a DNS name,
/// maybe with a leading `*.` wildcard, or `*` alone.
fn host_ok(host: &str) -> bool {
    if host == "*" {
        return true;
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `ValidateGateway`, for meshward's subset.
pub fn validate_gateway(gateway: &Gateway) -> Vec<FieldIssue> {
    let mut v = Issues::default();
    validate_metadata(&gateway.metadata, &mut v);
    if gateway.spec.servers.is_empty() {
        v.error("spec.servers", "gateway must have at least one server");
    }
    let mut ports = std::collections::BTreeMap::new();
    for (i, server) in gateway.spec.servers.iter().enumerate() {
        let at = format!("spec.servers[{i}]");
        let port = &server.port;
        if !(1..=65535).contains(&port.number) {
            v.error(
                format!("{at}.port.number"),
                format!("port number {} must be in the range 1..65535", port.number),
            );
        }
        let protocol = port.protocol.to_ascii_uppercase();
        if !SERVER_PROTOCOLS.contains(&protocol.as_str()) {
            v.error(
                format!("{at}.port.protocol"),
                format!(
                    "protocol {:?}: meshward's gateway serves {} (TCP, TLS, GRPC and passthrough servers are not supported)",
                    port.protocol,
                    SERVER_PROTOCOLS.join(", ")
                ),
            );
        }
        if port.target_port.is_some() {
            v.warning(
                format!("{at}.port.targetPort"),
                "targetPort is deprecated and not used: the gateway listens on port.number",
            );
        }
        if let Some(previous) = ports.insert(port.number, protocol.clone())
            && previous != protocol
        {
            v.error(
                format!("{at}.port"),
                format!(
                    "port {} is already a {previous} server: servers sharing a port must share its protocol",
                    port.number
                ),
            );
        }
        if server.bind.is_some() {
            v.warning(
                format!("{at}.bind"),
                "bind is not used: meshward's gateway listens on its --listen address",
            );
        }
        if server.hosts.is_empty() {
            v.error(
                format!("{at}.hosts"),
                "server config must contain at least one host",
            );
        }
        for (j, host) in server.hosts.iter().enumerate() {
            let name = host.split_once('/').map_or(host.as_str(), |(_, h)| h);
            if !host_ok(name) {
                v.error(
                    format!("{at}.hosts[{j}]"),
                    format!("invalid host {host:?}: a DNS name, *.DOMAIN or *, maybe NAMESPACE/ before it"),
                );
            }
        }
        match (&server.tls, protocol.as_str()) {
            (None, "HTTPS") => v.error(
                format!("{at}.tls"),
                "server must have TLS settings for HTTPS/TLS protocols",
            ),
            (Some(tls), "HTTPS") => validate_server_tls(&mut v, &format!("{at}.tls"), tls),
            (Some(tls), _) => {
                if tls.mode.is_some()
                    || !tls.credential_name.is_empty()
                    || !tls.server_certificate.is_empty()
                {
                    v.error(
                        format!("{at}.tls"),
                        format!(
                            "a {protocol} server is plaintext: TLS settings other than httpsRedirect need protocol HTTPS"
                        ),
                    );
                }
            }
            (None, _) => {}
        }
    }
    v.0
}

fn validate_server_tls(v: &mut Issues, at: &str, tls: &ServerTls) {
    if tls.https_redirect {
        v.warning(
            format!("{at}.httpsRedirect"),
            "httpsRedirect on an HTTPS server changes nothing",
        );
    }
    let mode = tls.mode.as_deref().unwrap_or("SIMPLE");
    if !TLS_MODES.contains(&mode) {
        v.error(
            format!("{at}.mode"),
            format!(
                "mode {mode:?}: meshward's gateway terminates SIMPLE and MUTUAL TLS only (PASSTHROUGH, AUTO_PASSTHROUGH, ISTIO_MUTUAL and OPTIONAL_MUTUAL are not supported)"
            ),
        );
        return;
    }
    let files = !tls.server_certificate.is_empty() || !tls.private_key.is_empty();
    if !tls.credential_name.is_empty() {
        if files {
            v.error(
                format!("{at}.credentialName"),
                "give credentialName or serverCertificate/privateKey, not both",
            );
        }
        if tls.credential_name.contains(['/', '\\']) || tls.credential_name.starts_with('.') {
            v.error(
                format!("{at}.credentialName"),
                format!(
                    "credentialName {:?} must be a plain name: it names NAME.crt and NAME.key in the gateway's credentials directory",
                    tls.credential_name
                ),
            );
        }
    } else {
        if tls.server_certificate.is_empty() {
            v.error(
                format!("{at}.serverCertificate"),
                format!("{mode} mode requires a server certificate (serverCertificate or credentialName)"),
            );
        }
        if tls.private_key.is_empty() {
            v.error(
                format!("{at}.privateKey"),
                format!("{mode} mode requires a private key (privateKey or credentialName)"),
            );
        }
        if mode == "MUTUAL" && tls.ca_certificates.is_empty() {
            v.error(
                format!("{at}.caCertificates"),
                "MUTUAL mode requires caCertificates (or credentialName with NAME-cacert.crt)",
            );
        }
    }
    if mode == "SIMPLE" && !tls.ca_certificates.is_empty() {
        v.warning(
            format!("{at}.caCertificates"),
            "caCertificates is used only in MUTUAL mode: SIMPLE asks no client certificate",
        );
    }
    for (field, value) in [
        ("minProtocolVersion", &tls.min_protocol_version),
        ("maxProtocolVersion", &tls.max_protocol_version),
    ] {
        match value.as_deref() {
            None | Some("TLS_AUTO") => {}
            Some("TLSV1_0" | "TLSV1_1") if field == "minProtocolVersion" => v.warning(
                format!("{at}.{field}"),
                "meshward never accepts less than TLS 1.2: the floor stays TLSV1_2",
            ),
            Some("TLSV1_2" | "TLSV1_3") if field == "minProtocolVersion" => {}
            Some("TLSV1_3") => {}
            Some(other) => v.error(
                format!("{at}.{field}"),
                format!(
                    "{other:?}: meshward's gateway serves TLS 1.2 and 1.3 and takes TLSV1_2 or TLSV1_3 here"
                ),
            ),
        }
    }
}

/// `ValidateVirtualService`, for meshward's subset.
pub fn validate_virtual_service(vs: &VirtualService) -> Vec<FieldIssue> {
    let mut v = Issues::default();
    validate_metadata(&vs.metadata, &mut v);
    if vs.spec.hosts.is_empty() {
        v.error("spec.hosts", "virtual service must have at least one host");
    }
    for (i, host) in vs.spec.hosts.iter().enumerate() {
        if !host_ok(host) {
            v.error(
                format!("spec.hosts[{i}]"),
                format!("invalid host {host:?}: a DNS name, *.DOMAIN or *"),
            );
        }
    }
    if vs.spec.gateways.is_empty() {
        v.warning(
            "spec.gateways",
            "no gateways: this VirtualService would apply to sidecars (mesh), where meshward does not route by VirtualService",
        );
    }
    for (i, gateway) in vs.spec.gateways.iter().enumerate() {
        if gateway == "mesh" {
            v.warning(
                format!("spec.gateways[{i}]"),
                "meshward's sidecars do not route by VirtualService: mesh is not used",
            );
        } else if gateway.is_empty() || gateway.matches('/').count() > 1 {
            v.error(
                format!("spec.gateways[{i}]"),
                format!("invalid gateway {gateway:?}: NAME or NAMESPACE/NAME"),
            );
        }
    }
    if !vs.spec.export_to.is_empty() {
        v.warning(
            "spec.exportTo",
            "exportTo is not used: a VirtualService binds to the gateways it names",
        );
    }
    if vs.spec.http.is_empty() {
        v.error(
            "spec.http",
            "http must have at least one route (tcp and tls routes are not supported)",
        );
    }
    for (i, route) in vs.spec.http.iter().enumerate() {
        validate_http_route(&mut v, &format!("spec.http[{i}]"), route);
    }
    v.0
}

fn validate_http_route(v: &mut Issues, at: &str, route: &HttpRoute) {
    if route.route.is_empty() {
        v.error(
            format!("{at}.route"),
            "HTTP route is required (redirect, direct response and delegate are not supported)",
        );
    }
    let weighted = route.route.iter().any(|r| r.weight.is_some());
    let total: u64 = route
        .route
        .iter()
        .map(|r| u64::from(r.weight.unwrap_or(0)))
        .sum();
    if weighted && total == 0 {
        v.error(
            format!("{at}.route"),
            "total destination weight must be greater than 0",
        );
    }
    for (j, dest) in route.route.iter().enumerate() {
        let d = format!("{at}.route[{j}].destination");
        if !host_ok(&dest.destination.host) || dest.destination.host.starts_with('*') {
            v.error(
                format!("{d}.host"),
                format!("invalid destination host {:?}", dest.destination.host),
            );
        }
        if let Some(port) = &dest.destination.port
            && !(1..=65535).contains(&port.number)
        {
            v.error(
                format!("{d}.port.number"),
                format!("port number {} must be in the range 1..65535", port.number),
            );
        }
    }
    for (j, m) in route.matches.iter().enumerate() {
        let mat = format!("{at}.match[{j}]");
        if let Some(uri) = &m.uri {
            string_match(v, &format!("{mat}.uri"), uri);
        }
        if let Some(method) = &m.method {
            string_match(v, &format!("{mat}.method"), method);
        }
        if let Some(authority) = &m.authority {
            string_match(v, &format!("{mat}.authority"), authority);
        }
        for (name, value) in &m.headers {
            let field = format!("{mat}.headers.{name}");
            if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
                v.error(&field, "header name must be lowercase");
            }
            // `{}`: the header is present, with any value.
            if value != &StringMatch::default() {
                string_match(v, &field, value);
            }
        }
    }
    if let Some(rewrite) = &route.rewrite {
        if rewrite.authority.is_some() {
            v.error(
                format!("{at}.rewrite.authority"),
                "rewriting the authority is not supported by meshward's gateway",
            );
        }
        if rewrite.uri.as_deref().is_some_and(|u| !u.starts_with('/')) {
            v.error(format!("{at}.rewrite.uri"), "rewrite.uri must start with /");
        }
        if rewrite.uri.is_some() && route.matches.iter().any(|m| uri_regex(m.uri.as_ref())) {
            v.warning(
                format!("{at}.rewrite.uri"),
                "with a regex uri match, rewrite.uri replaces the whole path",
            );
        }
    }
    if let Some(timeout) = &route.timeout
        && parse_duration(timeout).is_none()
    {
        v.error(
            format!("{at}.timeout"),
            format!("invalid duration {timeout:?} (write 5s, 0.5s or 250ms)"),
        );
    }
    if let Some(retries) = &route.retries {
        if let Some(t) = &retries.per_try_timeout
            && parse_duration(t).is_none()
        {
            v.error(
                format!("{at}.retries.perTryTimeout"),
                format!("invalid duration {t:?} (write 5s, 0.5s or 250ms)"),
            );
        }
        for condition in retries.conditions() {
            if !RETRY_ON.contains(&condition) {
                v.error(
                    format!("{at}.retries.retryOn"),
                    format!(
                        "retry condition {condition:?} is not supported: meshward retries on {}",
                        RETRY_ON.join(", ")
                    ),
                );
            }
        }
    }
}

fn uri_regex(m: Option<&StringMatch>) -> bool {
    m.is_some_and(|m| m.regex.is_some())
}

fn string_match(v: &mut Issues, field: &str, m: &StringMatch) {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|s| **s)
        .count();
    if set != 1 {
        v.error(field, "exactly one of exact, prefix or regex must be set");
    }
    if let Some(re) = &m.regex
        && let Err(e) = regex::Regex::new(re)
    {
        v.error(
            field,
            format!("invalid regex {re:?}: {}", e.to_string().replace('\n', " ")),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::diagnostic::Severity;
    use crate::load::load_str;

    fn errors(text: &str) -> Vec<String> {
        load_str("ingress.yaml", text).errors()
    }

    const GATEWAY: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["bookinfo.example"]
    tls: {mode: SIMPLE, credentialName: bookinfo}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
    tls: {httpsRedirect: true}
"#;

    #[test]
    fn a_gateway_and_its_virtual_service_load() {
        let vs = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: bookinfo}
spec:
  hosts: ["bookinfo.example"]
  gateways: ["istio-system/web"]
  http:
  - match: [{uri: {prefix: /api/}, headers: {x-canary: {exact: "1"}}}]
    rewrite: {uri: /}
    timeout: 5s
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: "connect-failure,503"}
    route:
    - destination: {host: reviews.bookinfo.svc.cluster.local, port: {number: 9080}}
      weight: 80
    - destination: {host: ratings.bookinfo.svc.cluster.local}
      weight: 20
"#;
        let loaded = load_str("ingress.yaml", &format!("{GATEWAY}{vs}"));
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        assert_eq!(loaded.registry.len(), 2);
        assert!(
            loaded
                .diagnostics
                .iter()
                .all(|d| d.severity != Severity::Error)
        );
    }

    #[test]
    fn unsupported_fields_are_refused_at_their_line() {
        let text = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v}
spec:
  hosts: [a.example]
  gateways: [web]
  http:
  - route:
    - destination: {host: a.default.svc.cluster.local}
    mirror: {host: b}
"#;
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("ingress.yaml:10:"), "{e:?}");
        assert!(e[0].contains("mirror"), "{e:?}");
    }

    #[test]
    fn istio_rules_are_checked_with_the_field_named() {
        let cases = [
            (
                "servers:\n  - port: {number: 443, protocol: HTTPS}\n    hosts: [a.example]",
                "spec.servers[0].tls: server must have TLS settings",
            ),
            (
                "servers:\n  - port: {number: 443, protocol: HTTPS}\n    hosts: [a.example]\n    tls: {mode: PASSTHROUGH}",
                "spec.servers[0].tls.mode: mode \"PASSTHROUGH\"",
            ),
            (
                "servers:\n  - port: {number: 443, protocol: HTTPS}\n    hosts: [a.example]\n    tls: {mode: MUTUAL, serverCertificate: /c, privateKey: /k}",
                "spec.servers[0].tls.caCertificates: MUTUAL mode requires caCertificates",
            ),
            (
                "servers:\n  - port: {number: 9000, protocol: TCP}\n    hosts: [a.example]",
                "spec.servers[0].port.protocol",
            ),
            (
                "servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts: [\"bad host\"]",
                "spec.servers[0].hosts[0]: invalid host",
            ),
            (
                "servers:\n  - port: {number: 443, protocol: HTTPS}\n    hosts: [a.example]\n    tls: {credentialName: ../x}",
                "must be a plain name",
            ),
        ];
        for (spec, expected) in cases {
            let text = format!(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g}}\nspec:\n  {spec}\n"
            );
            let e = errors(&text);
            assert!(e.iter().any(|e| e.contains(expected)), "{spec}: {e:?}");
        }
        let vs_cases = [
            (
                "- match: [{uri: {regex: \"(\"}}]\n    route: [{destination: {host: a}}]",
                "spec.http[0].match[0].uri: invalid regex",
            ),
            (
                "- match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: a}}]",
                "exactly one of exact, prefix or regex",
            ),
            (
                "- route: [{destination: {host: a}}]\n    retries: {attempts: 2, retryOn: retriable-4xx}",
                "retry condition \"retriable-4xx\" is not supported",
            ),
            (
                "- route: [{destination: {host: a}}]\n    timeout: soon",
                "spec.http[0].timeout: invalid duration",
            ),
            (
                "- route: [{destination: {host: a}, weight: 0}]",
                "total destination weight must be greater than 0",
            ),
            ("- match: [{uri: {prefix: /}}]", "HTTP route is required"),
        ];
        for (http, expected) in vs_cases {
            let text = format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [a.example]\n  gateways: [g]\n  http:\n  {http}\n"
            );
            let e = errors(&text);
            assert!(e.iter().any(|e| e.contains(expected)), "{http}: {e:?}");
        }
    }

    #[test]
    fn a_gateway_is_held_to_selectors_and_gateway_target_refs_not_peer_authentication() {
        let text = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-selector, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules: [{to: [{operation: {paths: [/selected]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-target, namespace: web}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: front}
  action: DENY
  rules: [{to: [{operation: {paths: [/targeted]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-target, namespace: web}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: elsewhere}
  action: DENY
  rules: [{to: [{operation: {paths: [/other]}}]}]
"#;
        let loaded = load_str("p.yaml", text);
        assert!(!loaded.has_errors(), "{:?}", loaded.errors());
        let set = crate::PolicySet::new(Default::default(), loaded.into_policies());
        let workload = crate::Workload {
            namespace: "istio-system".into(),
            labels: [("istio".to_owned(), "ingressgateway".to_owned())].into(),
        };
        let policy = set.for_gateway(&workload, &[("web".into(), "front".into())]);
        let connection = crate::Connection {
            source_ip: Some("203.0.113.9".parse().unwrap()),
            destination_port: 443,
            ..Default::default()
        };
        let status = |path: &str| {
            let request = crate::HttpRequest {
                method: "GET".into(),
                path: path.into(),
                host: "a.example".into(),
                ..Default::default()
            };
            policy
                .check(&connection, Some(&request), |_| unreachable!())
                .status
        };
        // STRICT does not refuse the outside world's connection...
        assert_eq!(status("/open"), 200);
        // ...while selectors and Gateway targetRefs apply, and only those.
        assert_eq!(status("/selected"), 403);
        assert_eq!(status("/targeted"), 403);
        assert_eq!(status("/other"), 200);
    }
}
