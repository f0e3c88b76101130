//! The gateway's routing table, compiled from the Gateways that select it
//! and the VirtualServices bound to them: per listening port its servers
//! (hosts, TLS, redirect), and per server the HTTP routes of the
//! VirtualServices whose hosts it serves. Built whole on every
//! configuration and swapped in; requests read one version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use meshward_policy::api::{Gateway, HttpRoute, StringMatch, VirtualService};
use meshward_policy::duration;

use super::tls::{CertSource, ServerTls};

/// A Gateway server's protocol as the gateway serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// Plaintext HTTP/1.1 (and HTTP/2 with prior knowledge: `HTTP2`).
    Http,
    /// TLS terminated here, then HTTP/1.1 or HTTP/2 by ALPN.
    Https,
}

/// One port the gateway listens on, and the servers on it.
pub struct Port {
    pub number: u16,
    pub protocol: PortProtocol,
    pub servers: Vec<Arc<CompiledServer>>,
}

/// One `servers[]` entry of a Gateway, with its routes.
pub struct CompiledServer {
    /// `namespace/name` of its Gateway.
    pub gateway: String,
    pub hosts: Vec<String>,
    /// TLS for HTTPS servers.
    pub tls: Option<Arc<ServerTls>>,
    pub https_redirect: bool,
    /// The VirtualServices for this server's hosts, most specific host first.
    pub virtual_services: Vec<Arc<CompiledVirtualService>>,
}

/// The HTTP routes of one VirtualService.
pub struct CompiledVirtualService {
    /// `namespace/name`.
    pub name: String,
    pub hosts: Vec<String>,
    pub routes: Vec<Route>,
}

/// One `http[]` route.
pub struct Route {
    /// `namespace/name` of the VirtualService and the route's index or name.
    pub name: String,
    matches: Vec<Match>,
    pub destinations: Vec<WeightedDestination>,
    total_weight: u64,
    rewrite_uri: Option<String>,
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
}

/// A destination and its share.
pub struct WeightedDestination {
    /// The host names to look the service up by: as written, then (a short
    /// name) in the VirtualService's namespace.
    pub hosts: Vec<String>,
    pub port: Option<u16>,
    weight: u64,
}

/// `retries`, compiled.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Retry when the upstream cannot be reached or drops the request.
    pub on_failure: bool,
    /// Retry on the response statuses these accept.
    status_conditions: Vec<fn(u16) -> bool>,
}

impl RetryPolicy {
    pub fn retries_status(&self, status: u16) -> bool {
        self.status_conditions.iter().any(|c| c(status))
    }
}

struct Match {
    uri: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(String, Matcher)>,
    ignore_uri_case: bool,
}

enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
    /// A header match `{}`: any value.
    Any,
}

impl Matcher {
    fn new(m: &StringMatch) -> Option<Matcher> {
        if let Some(e) = &m.exact {
            return Some(Matcher::Exact(e.clone()));
        }
        if let Some(p) = &m.prefix {
            return Some(Matcher::Prefix(p.clone()));
        }
        // RE2 semantics: the whole value must match.
        let re = m.regex.as_ref()?;
        regex::Regex::new(&format!("^(?:{re})$"))
            .ok()
            .map(Matcher::Regex)
    }

    fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            Matcher::Exact(e) if ignore_case => e.eq_ignore_ascii_case(value),
            Matcher::Exact(e) => e == value,
            Matcher::Prefix(p) if ignore_case => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(re) => re.is_match(value),
            Matcher::Any => true,
        }
    }
}

/// What a request is routed by.
pub struct RequestFacts<'a> {
    /// The path without its query.
    pub path: &'a str,
    pub method: &'a str,
    /// `:authority` / `Host` as sent.
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
}

impl Match {
    fn holds(&self, request: &RequestFacts<'_>) -> bool {
        self.uri
            .as_ref()
            .is_none_or(|m| m.matches(request.path, self.ignore_uri_case))
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(request.method, false))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(request.authority, false))
            && self.headers.iter().all(|(name, m)| {
                let values: Vec<&str> = request
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                // Absent never matches; repeated values are folded as Envoy does.
                !values.is_empty() && m.matches(&values.join(","), false)
            })
    }
}

impl Route {
    /// The first match that holds, by index (`Some(None)`: the route has
    /// no matches and takes every request).
    fn matched(&self, request: &RequestFacts<'_>) -> Option<Option<usize>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().position(|m| m.holds(request)).map(Some)
    }

    /// A destination by weight; `None` when every weight is 0.
    pub fn pick(&self) -> Option<&WeightedDestination> {
        if self.total_weight == 0 {
            return None;
        }
        let mut at = fastrand::u64(0..self.total_weight);
        self.destinations.iter().find(|d| {
            if at < d.weight {
                return true;
            }
            at -= d.weight;
            false
        })
    }

    /// The path the upstream gets: with `rewrite.uri`, the matched prefix
    /// (a prefix match's) or the whole path replaced, the query kept.
    pub fn rewritten(&self, matched: Option<usize>, target: &str) -> Option<String> {
        let uri = self.rewrite_uri.as_deref()?;
        let path = meshward_policy::authz::normalize::strip_query(target);
        let query = &target[path.len()..];
        let prefix = matched
            .and_then(|i| self.matches.get(i))
            .and_then(|m| match &m.uri {
                Some(Matcher::Prefix(p)) => Some(p.len()),
                _ => None,
            });
        let rest = match prefix {
            Some(len) => path.get(len..).unwrap_or_default(),
            None => "",
        };
        // `/api/` rewritten to `/` with rest `v1` gives `/v1`, not `//v1`.
        let joined = if uri.ends_with('/') && rest.starts_with('/') {
            format!("{uri}{}", &rest[1..])
        } else {
            format!("{uri}{rest}")
        };
        Some(format!("{joined}{query}"))
    }
}

/// A route chosen for a request.
pub struct Chosen<'a> {
    pub virtual_service: &'a CompiledVirtualService,
    pub route: &'a Route,
    pub matched: Option<usize>,
}

/// Whether `host` (no port, lower case) is one `pattern` names: equal, or
/// under a `*.` wildcard, or `*`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// How specific a host pattern is: exact names before wildcards, longer
/// wildcards before shorter, as Envoy picks a virtual host.
fn specificity(pattern: &str) -> (bool, usize) {
    (!pattern.starts_with('*'), pattern.len())
}

impl CompiledServer {
    pub fn serves(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| host_matches(h, host))
    }

    /// The route for a request to `host`: the VirtualService whose host
    /// names it most specifically, then its first route that matches.
    pub fn route(&self, host: &str, request: &RequestFacts<'_>) -> Option<Chosen<'_>> {
        let best = self
            .virtual_services
            .iter()
            .filter_map(|vs| {
                vs.hosts
                    .iter()
                    .filter(|h| host_matches(h, host))
                    .map(|h| specificity(h))
                    .max()
                    .map(|s| (s, vs))
            })
            .max_by_key(|(s, _)| *s)
            .map(|(s, _)| s)?;
        // Of equally specific VirtualServices, the first (by name) wins.
        self.virtual_services
            .iter()
            .filter(|vs| {
                vs.hosts
                    .iter()
                    .any(|h| host_matches(h, host) && specificity(h) == best)
            })
            .find_map(|vs| {
                vs.routes.iter().find_map(|route| {
                    route.matched(request).map(|matched| Chosen {
                        virtual_service: vs,
                        route,
                        matched,
                    })
                })
            })
    }
}

/// Everything the gateway serves.
#[derive(Default)]
pub struct Table {
    pub ports: BTreeMap<u16, Port>,
    /// The Gateways served, (namespace, name): policies with a Gateway
    /// `targetRef` name these.
    pub served: Vec<(String, String)>,
    /// What did not load (a server's credential), for the log.
    pub problems: Vec<String>,
}

impl Table {
    /// The HTTPS servers of a port, for choosing by SNI.
    pub fn server_for_sni(port: &Port, sni: Option<&str>) -> Option<Arc<CompiledServer>> {
        let sni = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        let mut candidates = port.servers.iter().filter(|s| s.tls.is_some());
        match sni {
            // The server naming the host most specifically.
            Some(name) => candidates
                .filter_map(|s| {
                    s.hosts
                        .iter()
                        .filter(|h| host_matches(h, &name))
                        .map(|h| specificity(h))
                        .max()
                        .map(|spec| (spec, s))
                })
                .max_by_key(|(spec, _)| *spec)
                .map(|(_, s)| s.clone()),
            // Without SNI, only a server for every host (`*`).
            None => candidates
                .find(|s| s.hosts.iter().any(|h| h == "*"))
                .cloned(),
        }
    }
}

/// Where credentials named by `credentialName` are.
pub struct Credentials<'a> {
    pub dir: Option<&'a std::path::Path>,
}

/// Builds the table for the gateway with `labels` from every Gateway and
/// VirtualService. A server whose certificate files do not load is kept
/// without TLS (its handshakes fail until they load, see [`ServerTls`]);
/// a server naming a credential with no credentials directory is an error
/// (nothing changes).
pub fn compile(
    gateways: &[Gateway],
    virtual_services: &[VirtualService],
    labels: &BTreeMap<String, String>,
    credentials: &Credentials<'_>,
    previous: &Table,
) -> Result<Table, String> {
    let mut selected: Vec<&Gateway> = gateways.iter().filter(|g| g.selects(labels)).collect();
    selected.sort_by_key(|g| g.key());
    let mut table = Table::default();
    let mut vss: Vec<&VirtualService> = virtual_services.iter().collect();
    vss.sort_by_key(|v| v.key());
    // TLS already loaded for the same files is kept, with its reload state.
    let mut previous_tls: Vec<Arc<ServerTls>> = previous
        .ports
        .values()
        .flat_map(|p| p.servers.iter().filter_map(|s| s.tls.clone()))
        .collect();
    for gateway in selected {
        let gw_ns = gateway.metadata.namespace_or_default().to_owned();
        let gw_name = gateway.metadata.name.clone();
        table.served.push((gw_ns.clone(), gw_name.clone()));
        let bound: Vec<&VirtualService> = vss
            .iter()
            .copied()
            .filter(|v| v.binds(&gw_ns, &gw_name))
            .collect();
        for (i, server) in gateway.spec.servers.iter().enumerate() {
            let at = format!("Gateway {gw_ns}/{gw_name} servers[{i}]");
            let number =
                u16::try_from(server.port.number).map_err(|_| format!("{at}: bad port"))?;
            let protocol = match server.port.protocol.to_ascii_uppercase().as_str() {
                "HTTPS" => PortProtocol::Https,
                _ => PortProtocol::Http,
            };
            // `namespace/host`: only that namespace's VirtualServices bind.
            let hosts: Vec<(Option<&str>, String)> = server
                .hosts
                .iter()
                .map(|h| match h.split_once('/') {
                    Some((ns, host)) => (
                        (ns != "*")
                            .then_some(ns)
                            .map(|ns| if ns == "." { gw_ns.as_str() } else { ns }),
                        host.to_ascii_lowercase(),
                    ),
                    None => (None, h.to_ascii_lowercase()),
                })
                .collect();
            let tls = match (&server.tls, protocol) {
                (Some(settings), PortProtocol::Https) => {
                    let source = CertSource::new(settings, credentials.dir)
                        .map_err(|e| format!("{at}.tls: {e}"))?;
                    let kept = previous_tls.iter().position(|t| t.source == source);
                    Some(match kept {
                        Some(i) => previous_tls.swap_remove(i),
                        None => {
                            let (tls, error) = ServerTls::load(source);
                            if let Some(e) = error {
                                table.problems.push(format!(
                                    "{at}.tls: {e}; the server refuses handshakes until its files load"
                                ));
                            }
                            Arc::new(tls)
                        }
                    })
                }
                _ => None,
            };
            let mut virtual_services = Vec::new();
            for vs in &bound {
                let ns = vs.metadata.namespace_or_default();
                let vs_hosts: Vec<String> = vs
                    .spec
                    .hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .filter(|h| {
                        hosts.iter().any(|(only_ns, sh)| {
                            only_ns.is_none_or(|n| n == ns)
                                && (host_matches(sh, h) || host_matches(h, sh))
                        })
                    })
                    .collect();
                if vs_hosts.is_empty() {
                    continue;
                }
                virtual_services.push(Arc::new(compile_virtual_service(vs, vs_hosts)?));
            }
            let compiled = Arc::new(CompiledServer {
                gateway: format!("{gw_ns}/{gw_name}"),
                hosts: hosts.into_iter().map(|(_, h)| h).collect(),
                tls,
                https_redirect: server.tls.as_ref().is_some_and(|t| t.https_redirect)
                    && protocol == PortProtocol::Http,
                virtual_services,
            });
            let port = table.ports.entry(number).or_insert_with(|| Port {
                number,
                protocol,
                servers: Vec::new(),
            });
            if port.protocol != protocol {
                return Err(format!(
                    "{at}: port {number} is served as another protocol by an earlier server"
                ));
            }
            port.servers.push(compiled);
        }
    }
    Ok(table)
}

fn compile_virtual_service(
    vs: &VirtualService,
    hosts: Vec<String>,
) -> Result<CompiledVirtualService, String> {
    let name = vs.key();
    let ns = vs.metadata.namespace_or_default();
    let routes = vs
        .spec
        .http
        .iter()
        .enumerate()
        .map(|(i, r)| compile_route(&name, ns, i, r))
        .collect::<Result<_, _>>()?;
    Ok(CompiledVirtualService {
        name,
        hosts,
        routes,
    })
}

fn compile_route(vs: &str, ns: &str, index: usize, route: &HttpRoute) -> Result<Route, String> {
    let at = format!("VirtualService {vs} http[{index}]");
    let matcher = |m: &Option<StringMatch>, field: &str| -> Result<Option<Matcher>, String> {
        m.as_ref()
            .map(|m| Matcher::new(m).ok_or_else(|| format!("{at}: {field}: bad match")))
            .transpose()
    };
    let matches = route
        .matches
        .iter()
        .map(|m| {
            Ok(Match {
                uri: matcher(&m.uri, "uri")?,
                method: matcher(&m.method, "method")?,
                authority: matcher(&m.authority, "authority")?,
                headers: m
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            if *v == StringMatch::default() {
                                Matcher::Any
                            } else {
                                Matcher::new(v)
                                    .ok_or_else(|| format!("{at}: headers.{k}: bad match"))?
                            },
                        ))
                    })
                    .collect::<Result<_, String>>()?,
                ignore_uri_case: m.ignore_uri_case,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let weighted = route.route.iter().any(|d| d.weight.is_some());
    let destinations: Vec<WeightedDestination> = route
        .route
        .iter()
        .map(|d| {
            let host = d.destination.host.to_ascii_lowercase();
            let mut hosts = vec![host.clone()];
            if !host.contains('.') {
                hosts.push(format!("{host}.{ns}.svc.cluster.local"));
            }
            WeightedDestination {
                hosts,
                port: d
                    .destination
                    .port
                    .as_ref()
                    .and_then(|p| u16::try_from(p.number).ok()),
                weight: match (weighted, d.weight) {
                    (_, Some(w)) => u64::from(w),
                    (false, None) => 100,
                    (true, None) => 0,
                },
            }
        })
        .collect();
    let parse = |d: &Option<String>, field: &str| -> Result<Option<Duration>, String> {
        d.as_deref()
            .map(|t| duration::parse(t).ok_or_else(|| format!("{at}.{field}: invalid duration")))
            .transpose()
    };
    let retries = match &route.retries {
        Some(r) if r.attempts > 0 => {
            let mut policy = RetryPolicy {
                attempts: r.attempts,
                per_try_timeout: parse(&r.per_try_timeout, "retries.perTryTimeout")?,
                on_failure: false,
                status_conditions: Vec::new(),
            };
            for condition in r.conditions() {
                match condition {
                    "connect-failure" | "refused-stream" | "reset" => policy.on_failure = true,
                    "503" => policy.status_conditions.push(|s| s == 503),
                    "gateway-error" => {
                        policy.on_failure = true;
                        policy.status_conditions.push(|s| matches!(s, 502..=504));
                    }
                    "5xx" => {
                        policy.on_failure = true;
                        policy.status_conditions.push(|s| s >= 500);
                    }
                    other => {
                        return Err(format!("{at}.retries.retryOn: {other:?} is not supported"));
                    }
                }
            }
            Some(policy)
        }
        _ => None,
    };
    Ok(Route {
        name: if route.name.is_empty() {
            format!("{vs}/http[{index}]")
        } else {
            format!("{vs}/{}", route.name)
        },
        total_weight: destinations.iter().map(|d| d.weight).sum(),
        destinations,
        matches,
        rewrite_uri: route.rewrite.as_ref().and_then(|r| r.uri.clone()),
        timeout: parse(&route.timeout, "timeout")?,
        retries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(yaml: &str) -> VirtualService {
        let loaded = meshward_policy::load::load_str("vs.yaml", yaml);
        assert!(!loaded.has_errors(), "{:?}", loaded.errors());
        match loaded.registry.into_iter().next() {
            Some(meshward_policy::api::RegistryObject::VirtualService(v)) => v,
            other => panic!("{other:?}"),
        }
    }

    fn facts<'a>(path: &'a str, method: &'a str, headers: &'a HeaderMap) -> RequestFacts<'a> {
        RequestFacts {
            path,
            method,
            authority: "shop.example",
            headers,
        }
    }

    const ROUTES: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: web}
spec:
  hosts: [shop.example]
  gateways: [istio-system/front]
  http:
  - match: [{uri: {exact: /exact}}]
    route: [{destination: {host: exact}}]
  - match: [{uri: {regex: "/items/[0-9]+"}}]
    route: [{destination: {host: regex}}]
  - match: [{headers: {x-canary: {exact: "yes"}}, method: {exact: POST}}]
    route: [{destination: {host: canary}}]
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /}
    route: [{destination: {host: api}}]
  - match: [{headers: {x-debug: {}}}]
    route: [{destination: {host: debug}}]
  - route:
    - {destination: {host: a, port: {number: 8080}}, weight: 75}
    - {destination: {host: b}, weight: 25}
"#;

    fn compiled() -> CompiledVirtualService {
        let v = vs(ROUTES);
        compile_virtual_service(&v, v.spec.hosts.clone()).unwrap()
    }

    fn first_host(vs: &CompiledVirtualService, path: &str, method: &str, h: &HeaderMap) -> String {
        let request = facts(path, method, h);
        let route = vs
            .routes
            .iter()
            .find(|r| r.matched(&request).is_some())
            .unwrap();
        route.destinations[0].hosts[0].clone()
    }

    #[test]
    fn routes_match_in_order_by_uri_method_and_headers() {
        let vs = compiled();
        let none = HeaderMap::new();
        assert_eq!(first_host(&vs, "/exact", "GET", &none), "exact");
        assert_eq!(first_host(&vs, "/exact/more", "GET", &none), "a");
        assert_eq!(first_host(&vs, "/items/42", "GET", &none), "regex");
        // The regex must match the whole path.
        assert_eq!(first_host(&vs, "/items/42x", "GET", &none), "a");
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "yes".parse().unwrap());
        assert_eq!(first_host(&vs, "/", "POST", &canary), "canary");
        assert_eq!(first_host(&vs, "/", "GET", &canary), "a");
        assert_eq!(first_host(&vs, "/api/v1", "GET", &none), "api");
        let mut debug = HeaderMap::new();
        debug.insert("x-debug", "".parse().unwrap());
        assert_eq!(first_host(&vs, "/", "GET", &debug), "debug");
        // A short name is also looked up in the VirtualService's namespace.
        assert_eq!(
            vs.routes[5].destinations[0].hosts,
            ["a", "a.web.svc.cluster.local"]
        );
        assert_eq!(vs.routes[5].destinations[0].port, Some(8080));
    }

    #[test]
    fn a_prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
        let vs = compiled();
        let api = &vs.routes[3];
        assert_eq!(
            api.rewritten(Some(0), "/api/v1/x?q=1").as_deref(),
            Some("/v1/x?q=1")
        );
        assert_eq!(vs.routes[0].rewritten(Some(0), "/exact"), None);
    }

    #[test]
    fn weights_share_requests() {
        let vs = compiled();
        let route = &vs.routes[5];
        let a = (0..4000)
            .filter(|_| route.pick().unwrap().hosts[0] == "a")
            .count();
        assert!(
            (2700..3300).contains(&a),
            "{a} of 4000 to the 75 % destination"
        );
    }

    #[test]
    fn hosts_match_exactly_or_under_wildcards() {
        assert!(host_matches("*", "a.example"));
        assert!(host_matches("*.example", "a.example"));
        assert!(!host_matches("*.example", "example"));
        assert!(host_matches("A.example", "a.example"));
        assert!(!host_matches("a.example", "b.example"));
    }
}
