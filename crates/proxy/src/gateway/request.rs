//! One request at the gateway: the server for its host (404 when none),
//! the HTTPS redirect, the client's address (`X-Forwarded-For` as far as
//! `numTrustedProxies` says), the policy engine — the same decision, logs
//! and denials as the sidecar's inbound side — then the VirtualService
//! route (404 when none), and forwarding to the chosen service over the
//! mesh's mutual TLS with the route's rewrite, timeout and retries (503
//! when no endpoint answers).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use meshward_identity::error_chain;
use meshward_policy::Connection;
use meshward_policy::Stage;
use meshward_policy::api::ForwardClientCertDetails;
use meshward_policy::authz::normalize;

use super::Gateway;
use super::routes::{RequestFacts, Route, Table};
use crate::balance::Picked;
use crate::ext_authz::{ExtAuthzAnswer, apply_headers};
use crate::http::{
    Body, BodyEnd, Counted, XFCC, apply_edits, full, grpc_status_in, is_grpc, local_reply,
    logged_response_body, policy_request, protocol_name, request_authority, set_upstream_target,
    strip_hop_by_hop, strip_trailing_host_dot,
};
use crate::inbound::ConnInfo;
use crate::inbound::http::{Decided, audit, decide, denial, describe_decision, record_and_log};
use crate::log::AccessRecord;
use crate::metrics::istio::{self, RequestLabels, ResponseFlags};
use crate::metrics::{DecisionLabels, Direction, DirectionLabels};
use crate::outbound::{EndpointPools, OutboundTarget};

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The largest request body kept for replaying on a retry: a route with
/// retries refuses a larger one (413).
const REPLAY_LIMIT: usize = 1 << 20;

/// What one accepted connection is.
pub struct Conn {
    /// The Gateway port number (what policies name).
    pub port: u16,
    pub https: bool,
    pub sni: Option<String>,
    pub peer_addr: SocketAddr,
    pub local_ip: Option<IpAddr>,
    /// The SHA-256 of a MUTUAL client's certificate.
    pub client_cert_sha256: Option<String>,
}

/// The client as policies see it (`remote.ip`): with `trusted` proxies in
/// front appending to `X-Forwarded-For`, the address that many entries from
/// its right (Envoy's `xff_num_trusted_hops`); otherwise, or when the
/// header has fewer entries or a bad one there, the connection's peer.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: u32) -> IpAddr {
    if trusted == 0 {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all(XFF)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let n = usize::try_from(trusted).unwrap_or(usize::MAX);
    if entries.len() < n {
        return peer;
    }
    entries[entries.len() - n].parse().unwrap_or(peer)
}

pub async fn handle(
    mut request: Request<Incoming>,
    conn: Arc<Conn>,
    gateway: Arc<Gateway>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let start_time = SystemTime::now();
    let shared = gateway.shared.clone();
    let snapshot = shared.policies.current();
    let grpc = is_grpc(request.headers());
    strip_trailing_host_dot(&mut request);
    let mut record = AccessRecord::new(
        start_time,
        Direction::Gateway,
        protocol_name(request.version()),
        conn.peer_addr,
        format!("gateway|{}", conn.port).into(),
    );
    record.config_version = snapshot.version;
    let mut view = policy_request(&request);
    record.method = Some(view.method.clone());
    record.path =
        Some(normalize::normalize(&view.path, snapshot.policy.normalization).into_owned());
    let finish = |mut record: AccessRecord, status: u16, allowed: bool| {
        record.status = Some(status);
        record.decision = if allowed { "allow" } else { "deny" };
        let metrics = &shared.metrics;
        metrics
            .requests
            .get_or_create(&DecisionLabels {
                direction: Direction::Gateway,
                decision: record.decision,
                policy: record.policy.clone().unwrap_or_default(),
            })
            .inc();
        metrics
            .request_duration
            .get_or_create(&DirectionLabels {
                direction: Direction::Gateway,
            })
            .observe(started.elapsed().as_secs_f64());
        record
    };
    // A reply of the gateway's own, logged with why.
    let local = |record: AccessRecord, status: u16, allowed: bool, reason: &str| {
        let mut record = finish(record, status, allowed);
        record.reason = Some(reason.to_owned());
        record_and_log(&shared, record, started);
        Ok(local_reply(status, reason, grpc))
    };

    let authority = match request_authority(&request, None) {
        Ok(authority) => authority,
        Err(bad) => {
            let mut record = finish(record, 400, false);
            record.stage = Some(Stage::Request);
            record.reason = Some(bad.to_string());
            record_and_log(&shared, record, started);
            return Ok(crate::http::bad_request(grpc));
        }
    };
    record.authority = Some(authority.to_string());
    let host = authority.host().to_ascii_lowercase();
    let table = gateway.table();
    let server = table.ports.get(&conn.port).and_then(|port| {
        if conn.https {
            Table::server_for_sni(port, conn.sni.as_deref()).filter(|s| s.serves(&host))
        } else {
            port.servers
                .iter()
                .filter(|s| s.tls.is_none())
                .find(|s| s.serves(&host))
                .cloned()
        }
    });
    let Some(server) = server else {
        return local(record, 404, false, "no server for this host");
    };
    if server.https_redirect {
        let target = view.path.clone();
        let mut response = local_reply(301, "", false);
        *response.body_mut() = full(Bytes::new());
        if let Ok(location) = HeaderValue::from_str(&format!("https://{host}{target}")) {
            response
                .headers_mut()
                .insert(http::header::LOCATION, location);
        }
        let mut record = finish(record, 301, true);
        record.reason = Some("httpsRedirect".into());
        record_and_log(&shared, record, started);
        return Ok(response);
    }

    let topology = snapshot.set.mesh().gateway_topology();
    view.remote_ip = Some(client_ip(
        request.headers(),
        conn.peer_addr.ip(),
        topology.num_trusted_proxies,
    ));
    let info = ConnInfo {
        connection: Connection {
            source_ip: Some(conn.peer_addr.ip()),
            source_principal: None,
            destination_ip: conn.local_ip,
            destination_port: conn.port,
            sni: conn.sni.clone(),
        },
        peer_addr: conn.peer_addr,
        peer: None,
        started,
        start_time,
    };
    let (mut parts, body) = request.into_parts();
    let decided = decide(&shared, &snapshot, &info, &parts, body, &view, start_time).await;
    let Decided {
        decision,
        ext,
        body,
    } = match decided {
        Ok(decided) => decided,
        Err(refused) => {
            // As at a sidecar: the body a CUSTOM provider was to see could
            // not be held.
            let (status, message) = refused.logged(&shared, finish, record, started);
            return Ok(local_reply(status, message, grpc));
        }
    };
    record.ext_authz = ext.as_ref().map(ExtAuthzAnswer::verdict_name);
    if let Some(metadata) = ext.as_ref().and_then(|e| e.dynamic_metadata.clone()) {
        record.ext_authz_metadata = Some(metadata);
    }
    describe_decision(&mut record, &decision, &snapshot.policy, &info, &view);
    audit(&shared, &snapshot, &info, &view, &decision, &record);
    if !decision.allowed() {
        let record = finish(record, decision.status, false);
        record_and_log(&shared, record, started);
        return Ok(denial(&decision, ext, grpc));
    }

    let path = normalize::strip_query(&view.path);
    let facts = RequestFacts {
        path,
        method: &view.method,
        authority: authority.as_str(),
        headers: &parts.headers,
    };
    let Some(chosen) = server.route(&host, &facts) else {
        return local(record, 404, true, "no route for this request");
    };
    let route = chosen.route;
    record.route = Some(route.name.clone());
    let Some(destination) = route.pick() else {
        return local(
            record,
            503,
            true,
            "the route's destinations all have weight 0",
        );
    };
    let Some(target) = destination
        .hosts
        .iter()
        .find_map(|h| gateway.services.service(h, destination.port))
    else {
        record.error = Some(format!(
            "{}: no service {}{} in the registry",
            route.name,
            destination.hosts[0],
            destination
                .port
                .map(|p| format!(":{p}"))
                .unwrap_or_default()
        ));
        shared.metrics.upstream_error(Direction::Gateway);
        return local(record, 503, true, "no healthy upstream");
    };

    // The upstream request: the path as authorized (and rewritten), the
    // forwarding headers, nothing the client claimed about identity.
    let authorized = normalize::normalize(&view.path, snapshot.policy.normalization).into_owned();
    // The CUSTOM authorizer's query edits apply to the query forwarded.
    let edited = match &ext {
        Some(ext) => ext.edit_query(&view.path),
        None => view.path.clone(),
    };
    let query = &edited[normalize::strip_query(&edited).len()..];
    let target_path = route
        .rewritten(chosen.matched, &format!("{authorized}{query}"))
        .unwrap_or_else(|| format!("{authorized}{query}"));
    strip_hop_by_hop(&mut parts.headers);
    let upstream_path = normalize::strip_query(&target_path).to_owned();
    if set_upstream_target(&mut parts, &authority, &upstream_path, &target_path).is_none() {
        let mut record = finish(record, 400, false);
        record.stage = Some(Stage::Request);
        record.reason = Some("bad request: the path cannot be forwarded".into());
        record_and_log(&shared, record, started);
        return Ok(crate::http::bad_request(grpc));
    }
    forwarding_headers(
        &mut parts.headers,
        &conn,
        topology.num_trusted_proxies,
        topology.forward_client_cert_details.unwrap_or_default(),
        &shared.identity.id.to_string(),
    );
    if let Some(edits) = &decision.header_edits {
        apply_edits(&mut parts.headers, &edits.remove, &edits.set);
    }
    let downstream_headers = ext
        .map(|ext| ext.apply_upstream(&mut parts.headers))
        .unwrap_or_default();
    let received = Arc::new(AtomicU64::new(0));
    let body: Body = Counted::new(body, received.clone()).boxed();
    record.upstream = Some(format!("{}:{}", target.upstream.service, target.upstream.port).into());
    // Istio's metrics: the gateway reports as the source of the request.
    let protocol = istio::Protocol::http(grpc);
    match forward(&target, route, parts, body).await {
        Ok((response, endpoint, server_identity)) => {
            let (mut parts, body) = response.into_parts();
            apply_headers(&mut parts.headers, &downstream_headers);
            strip_hop_by_hop(&mut parts.headers);
            let mut record = finish(record, parts.status.as_u16(), true);
            let mut labels = RequestLabels {
                traffic: target.istio_labels(&shared, server_identity.as_deref(), protocol),
                response_code: parts.status.as_u16(),
                grpc_status: grpc.then(|| grpc_status_in(&parts.headers)).flatten(),
            };
            record.upstream = Some(match server_identity {
                Some(id) => format!("{} ({id})", endpoint.addr).into(),
                None => endpoint.addr.to_string().into(),
            });
            let metrics = shared.metrics.clone();
            let body = logged_response_body(
                body,
                record,
                received,
                started,
                shared.logs.access.clone(),
                move |end: &BodyEnd, request_bytes| {
                    // The endpoint is busy until its response has streamed.
                    drop(endpoint);
                    labels.grpc_status = labels.grpc_status.or(end.grpc_status);
                    (metrics.istio).request(&labels, started.elapsed(), request_bytes, end.bytes);
                },
            );
            Ok(Response::from_parts(parts, body))
        }
        Err(failure) => {
            shared.metrics.upstream_error(Direction::Gateway);
            let flags = match failure {
                Failure::NoEndpoint => ResponseFlags::NoHealthyUpstream,
                _ => ResponseFlags::UpstreamConnectionFailure,
            };
            let (status, message) = match failure {
                Failure::NoEndpoint => (503, "no healthy upstream"),
                Failure::Timeout => (504, "upstream request timeout"),
                Failure::TooLarge => (413, "request body too large for a route with retries"),
                Failure::Upstream(_) => (
                    503,
                    "upstream connect error or disconnect/reset before headers",
                ),
            };
            if let Failure::Upstream(e) = failure {
                record.error = Some(e);
            }
            let mut record = finish(record, status, true);
            record.reason = Some(message.to_owned());
            let request_bytes = received.load(std::sync::atomic::Ordering::Relaxed);
            record_and_log(&shared, record, started);
            let response = local_reply(status, message, grpc);
            let traffic = target
                .istio_labels(&shared, None, protocol)
                .with_flags(flags);
            (shared.metrics.istio).local_reply(
                traffic,
                &response,
                started.elapsed(),
                request_bytes,
            );
            Ok(response)
        }
    }
}

/// `X-Forwarded-For` (the peer appended), `X-Forwarded-Proto` (the
/// client's scheme, unless trusted proxies in front set it) and
/// `X-Forwarded-Client-Cert` as `forwardClientCertDetails` says.
fn forwarding_headers(
    headers: &mut HeaderMap,
    conn: &Conn,
    trusted: u32,
    xfcc: ForwardClientCertDetails,
    own_id: &str,
) {
    let peer = conn.peer_addr.ip().to_string();
    let existing: Vec<String> = headers
        .get_all(XFF)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    headers.remove(XFF);
    let appended = if existing.is_empty() {
        peer
    } else {
        format!("{}, {peer}", existing.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&appended) {
        headers.insert(XFF, v);
    }
    if trusted == 0 || !headers.contains_key(XFP) {
        headers.insert(
            XFP,
            HeaderValue::from_static(if conn.https { "https" } else { "http" }),
        );
    }
    let own = conn
        .client_cert_sha256
        .as_ref()
        .map(|hash| format!("By={own_id};Hash={hash}"));
    use ForwardClientCertDetails as F;
    match xfcc {
        F::Sanitize | F::Undefined => {
            headers.remove(XFCC);
        }
        F::ForwardOnly => {}
        F::AlwaysForwardOnly => {
            if conn.client_cert_sha256.is_none() {
                headers.remove(XFCC);
            }
        }
        F::SanitizeSet => {
            headers.remove(XFCC);
            if let Some(v) = own.and_then(|o| HeaderValue::from_str(&o).ok()) {
                headers.insert(XFCC, v);
            }
        }
        F::AppendForward => {
            if let Some(own) = own {
                let value = match headers.get(XFCC).and_then(|v| v.to_str().ok()) {
                    Some(before) => format!("{before},{own}"),
                    None => own,
                };
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(XFCC, v);
                }
            }
        }
    }
}

/// Why forwarding failed.
enum Failure {
    /// The service has no endpoint (left).
    NoEndpoint,
    /// The route's `timeout` passed.
    Timeout,
    /// The last attempt's error.
    Upstream(String),
    /// The body is too large to keep for retries.
    TooLarge,
}

type Forwarded = (Response<Incoming>, Picked<EndpointPools>, Option<Arc<str>>);

/// Sends the request to one of the target's endpoints, and again (to
/// another endpoint where there is one, as Istio's `previous_hosts`
/// predicate asks) as the route's retries allow, within its timeout.
async fn forward(
    target: &OutboundTarget,
    route: &Route,
    parts: http::request::Parts,
    body: Body,
) -> Result<Forwarded, Failure> {
    let deadline = route.timeout.map(|t| Instant::now() + t);
    let retries = route.retries.as_ref();
    let attempts = 1 + retries.map_or(0, |r| r.attempts);
    // Retrying needs the body again.
    let (mut once, replay) = if attempts > 1 {
        (None, Some(buffered(body).await?))
    } else {
        (Some(body), None)
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last = Failure::NoEndpoint;
    let mut held = Some(parts);
    for attempt in 1..=attempts {
        let Some(endpoint) = pick_untried(target, &tried) else {
            return Err(last);
        };
        tried.push(endpoint.addr);
        let Some(version_in) = held.as_ref().map(|p| p.version) else {
            return Err(last);
        };
        let (client, version) = endpoint.http.for_version(version_in);
        let body = match &replay {
            Some(bytes) => full(bytes.clone()),
            None => once.take().unwrap_or_else(|| full(Bytes::new())),
        };
        // The last attempt takes the request head itself, earlier ones a copy.
        let mut upstream = if attempt == attempts {
            let Some(mut head) = held.take() else {
                return Err(last);
            };
            head.version = version;
            Request::from_parts(head, body)
        } else {
            let Some(head) = held.as_ref() else {
                return Err(last);
            };
            let mut copy = Request::new(body);
            *copy.method_mut() = head.method.clone();
            *copy.uri_mut() = head.uri.clone();
            *copy.version_mut() = version;
            *copy.headers_mut() = head.headers.clone();
            copy
        };
        // The authority travels as `:authority` in HTTP/2, as `Host` in
        // HTTP/1.1, whichever the client spoke.
        if version == http::Version::HTTP_2 {
            upstream.headers_mut().remove(http::header::HOST);
        } else if let Some(v) = upstream
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            upstream.headers_mut().insert(http::header::HOST, v);
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = match (remaining, retries.and_then(|r| r.per_try_timeout)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sent = client.request(upstream);
        let result = match limit {
            Some(limit) => tokio::time::timeout(limit, sent).await.ok(),
            None => Some(sent.await),
        };
        let more = attempt < attempts;
        match result {
            Some(Ok(response)) => {
                if more && retries.is_some_and(|r| r.retries_status(response.status().as_u16())) {
                    last =
                        Failure::Upstream(format!("{} from {}", response.status(), endpoint.addr));
                    continue;
                }
                let server = response
                    .extensions()
                    .get::<crate::identity::ServerIdentity>()
                    .map(|s| s.0.clone());
                return Ok((response, endpoint, server));
            }
            Some(Err(e)) => {
                last = Failure::Upstream(error_chain(&e));
                if !(more && retries.is_some_and(|r| r.on_failure)) {
                    return Err(last);
                }
            }
            None => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Failure::Timeout);
                }
                last = Failure::Upstream(format!("per-try timeout at {}", endpoint.addr));
                if !(more && retries.is_some_and(|r| r.on_failure)) {
                    return Err(last);
                }
            }
        }
        // Envoy's base retry back-off.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(last)
}

/// The request body in memory, so it can be sent again; refused past
/// [`REPLAY_LIMIT`].
async fn buffered(mut body: Body) -> Result<Bytes, Failure> {
    let mut kept = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| Failure::Upstream(format!("reading the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            kept.extend_from_slice(&data);
            if kept.len() > REPLAY_LIMIT {
                return Err(Failure::TooLarge);
            }
        }
    }
    Ok(kept.freeze())
}

/// An endpoint not tried yet for this request when the balancer offers
/// one within a few picks, else whichever it picks.
fn pick_untried(target: &OutboundTarget, tried: &[SocketAddr]) -> Option<Picked<EndpointPools>> {
    let mut picked = target.pick()?;
    for _ in 0..4 {
        if !tried.contains(&picked.addr) {
            break;
        }
        picked = target.pick()?;
    }
    Some(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_entry_as_many_hops_from_the_right_as_are_trusted() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(XFF, "1.1.1.1, 2.2.2.2".parse().unwrap());
        headers.append(XFF, "3.3.3.3".parse().unwrap());
        assert_eq!(client_ip(&headers, peer, 0), peer);
        assert_eq!(client_ip(&headers, peer, 1).to_string(), "3.3.3.3");
        assert_eq!(client_ip(&headers, peer, 2).to_string(), "2.2.2.2");
        assert_eq!(client_ip(&headers, peer, 3).to_string(), "1.1.1.1");
        // Fewer entries than trusted hops: the peer.
        assert_eq!(client_ip(&headers, peer, 4), peer);
        headers.insert(XFF, "not-an-ip".parse().unwrap());
        assert_eq!(client_ip(&headers, peer, 1), peer);
    }

    #[test]
    fn forwarding_headers_append_the_peer_and_handle_xfcc_as_configured() {
        let conn = |cert: bool| Conn {
            port: 443,
            https: true,
            sni: None,
            peer_addr: "203.0.113.5:40000".parse().unwrap(),
            local_ip: None,
            client_cert_sha256: cert.then(|| "ab12".to_owned()),
        };
        let incoming = || {
            let mut h = HeaderMap::new();
            h.insert(XFF, "198.51.100.1".parse().unwrap());
            h.insert(XFP, "http".parse().unwrap());
            h.insert(XFCC, "By=spiffe://evil;URI=spiffe://x".parse().unwrap());
            h
        };
        let gw = "spiffe://cluster.local/ns/istio-system/sa/gw";
        use ForwardClientCertDetails as F;
        let run = |trusted, mode, cert| {
            let mut h = incoming();
            forwarding_headers(&mut h, &conn(cert), trusted, mode, gw);
            h
        };

        let h = run(0, F::Sanitize, false);
        assert_eq!(h[XFF], "198.51.100.1, 203.0.113.5");
        assert_eq!(
            h[XFP], "https",
            "the client's own X-Forwarded-Proto is replaced"
        );
        assert!(h.get(XFCC).is_none(), "sanitized by default");
        assert_eq!(
            run(1, F::Sanitize, false)[XFP],
            "http",
            "kept behind a trusted proxy"
        );
        assert_eq!(
            run(0, F::ForwardOnly, false)[XFCC],
            "By=spiffe://evil;URI=spiffe://x"
        );
        assert!(run(0, F::AlwaysForwardOnly, false).get(XFCC).is_none());
        assert!(run(0, F::AlwaysForwardOnly, true).get(XFCC).is_some());
        assert_eq!(
            run(0, F::SanitizeSet, true)[XFCC],
            format!("By={gw};Hash=ab12")
        );
        assert_eq!(
            run(0, F::AppendForward, true)[XFCC],
            format!("By=spiffe://evil;URI=spiffe://x,By={gw};Hash=ab12")
        );
    }
}
