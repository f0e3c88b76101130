//! HTTP to this workload: per request, request authentication and
//! authorization (CUSTOM, DENY, ALLOW, AUDIT, dry-run) by the policy engine,
//! then forwarding to the application with the path as authorized, a
//! proxy-set `x-forwarded-client-cert` and the JWT output headers.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime};

use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshward_policy::authz::{CustomVerdict, PolicyRef, normalize};
use meshward_policy::{HttpRequest, InboundDecision, Stage, WorkloadPolicy};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{ConnInfo, InboundTarget};
use crate::Shared;
use crate::ext_authz::body::{Held, hold};
use crate::ext_authz::{Check, ExtAuthzAnswer, HttpCheck, apply_headers};
use crate::http::{
    Body, BodyEnd, BoxError, Counted, XFCC, apply_edits, is_grpc, local_reply,
    logged_response_body, policy_request, protocol_name, request_authority, set_upstream_target,
    strip_hop_by_hop, strip_trailing_host_dot,
};
use crate::log::AuditRecord;
use crate::metrics::istio::{self, ResponseFlags};
use crate::metrics::{ConnDecisions, Direction};
use crate::policies::Snapshot;

/// Serves HTTP/1.1 or HTTP/2 (by its preface) on an admitted connection.
pub async fn serve<S>(stream: S, info: ConnInfo, target: Arc<InboundTarget>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = Arc::new(HttpConnection::new(info, &shared));
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |request| {
            handle(request, connection.clone(), target.clone(), shared.clone())
        })
    };
    crate::serve_http(&shared, TokioIo::new(stream), service).await;
}

/// What every request of one connection shares: the peer, the
/// `x-forwarded-client-cert` value the application is given, and the
/// metric handles the requests reuse.
struct HttpConnection {
    info: ConnInfo,
    xfcc: Option<HeaderValue>,
    requests: istio::ConnRequests,
    decisions: ConnDecisions,
}

impl HttpConnection {
    fn new(info: ConnInfo, shared: &Shared) -> HttpConnection {
        let xfcc = info.peer.as_ref().and_then(|peer| {
            let value = format!(
                "By={};Hash={};URI={}",
                shared.identity.id, peer.cert_sha256, peer.id
            );
            HeaderValue::from_str(&value).ok()
        });
        HttpConnection {
            info,
            xfcc,
            requests: Default::default(),
            decisions: Default::default(),
        }
    }
}

/// A forwarded request's Istio metrics: fetched when its response's
/// headers arrive, or, for a gRPC status sent in trailers, at its end.
enum Handles {
    Now(istio::RequestHandles),
    AtEnd(Arc<Shared>, Arc<HttpConnection>, String),
}

async fn handle(
    mut request: Request<Incoming>,
    connection: Arc<HttpConnection>,
    target: Arc<InboundTarget>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let start_time = SystemTime::now();
    let info = &connection.info;
    let snapshot = shared.policies.current();
    let grpc = is_grpc(request.headers());
    let protocol = istio::Protocol::http(grpc);
    strip_trailing_host_dot(&mut request);
    let view = policy_request(&request);
    let logging = shared.logs.access.is_enabled();
    let mut record = info.record(&target, protocol_name(request.version()), snapshot.version);
    record.time = start_time;
    if logging {
        record.method = Some(view.method.clone());
        record.authority = Some(view.host.clone());
        record.path =
            Some(normalize::normalize(&view.path, snapshot.policy.normalization).into_owned());
    }
    let peer = info.peer.as_ref().map(|p| &*p.id);
    // A reply of the proxy's own, counted as Istio counts requests.
    let reply = |flags: ResponseFlags,
                 response: Response<Body>,
                 request_bytes: u64|
     -> Result<Response<Body>, Infallible> {
        let traffic = (shared.metrics.istio)
            .inbound(peer, Some(&view.host), protocol)
            .with_flags(flags);
        let elapsed = started.elapsed();
        (shared.metrics.istio).local_reply(traffic, &response, elapsed, request_bytes);
        Ok(response)
    };
    // The request decided: counted, and its record told how.
    let finish = |mut record: crate::log::AccessRecord,
                  status: u16,
                  allowed: bool,
                  policy: Option<&PolicyRef>| {
        record.status = Some(status);
        record.decision = if allowed { "allow" } else { "deny" };
        let metrics = &shared.metrics;
        (metrics.decision(&connection.decisions, Direction::Inbound, allowed, policy))
            .record(started.elapsed());
        record
    };

    // Refused before any policy, as Envoy does: a request without Host
    // (HTTP/1.1 and HTTP/1.0 alike, as Envoy with HTTP/1.0 enabled), or
    // with one the application would not get as authorized.
    let authority = match request_authority(&request, None) {
        Ok(authority) => authority,
        Err(bad) => {
            let mut record = finish(record, 400, false, None);
            record.stage = Some(Stage::Request);
            record.reason = Some(bad.to_string());
            record_and_log(&shared, record, started);
            let flags = ResponseFlags::DownstreamProtocolError;
            return reply(flags, crate::http::bad_request(grpc), 0);
        }
    };
    let (parts, body) = request.into_parts();
    let decided = decide(&shared, &snapshot, info, &parts, body, &view, start_time).await;
    let Decided {
        decision,
        ext,
        body,
    } = match decided {
        Ok(decided) => decided,
        Err(refused) => {
            let finish = |record, status, allowed| finish(record, status, allowed, None);
            let (status, message) = refused.logged(&shared, finish, record, started);
            return reply(ResponseFlags::None, local_reply(status, message, grpc), 0);
        }
    };
    record.ext_authz = ext.as_ref().map(ExtAuthzAnswer::verdict_name);
    if let Some(metadata) = ext.as_ref().and_then(|e| e.dynamic_metadata.clone()) {
        tracing::info!(%metadata, "CUSTOM authorizer's dynamic metadata");
        record.ext_authz_metadata = Some(metadata);
    }
    let deciding = decision
        .authz
        .as_ref()
        .and_then(|a| a.deciding.as_ref())
        .map(|rule| &rule.policy);
    if logging {
        describe_decision(&mut record, &decision, &snapshot.policy, info, &view);
        let principal = decision.principal.as_ref();
        crate::facts::add(
            &mut record,
            &shared,
            &snapshot.policy,
            info,
            Some(&view),
            principal,
        );
    }
    audit(&shared, &snapshot, info, &view, &decision, &record);

    if !decision.allowed() {
        let record = finish(record, decision.status, false, deciding);
        record_and_log(&shared, record, started);
        // Denied by the CUSTOM authorizer (its denial or its failure), as
        // Envoy's ext_authz flags it.
        let external =
            decision.stage == Stage::Authorization && ext.as_ref().is_some_and(|e| !e.allowed());
        let flags = match external {
            true => ResponseFlags::UnauthorizedExternalService,
            false => ResponseFlags::None,
        };
        return reply(flags, denial(&decision, ext, grpc), 0);
    }

    // Forward: the path as authorized, the identity headers as the proxy
    // sets them, nothing the client claimed about identity.
    let mut parts = parts;
    let authorized_path = normalize::normalize(&view.path, snapshot.policy.normalization);
    // The authorizer's query edits apply to the query forwarded.
    let original_target = match &ext {
        Some(ext) => ext.edit_query(&view.path),
        None => view.path.clone(),
    };
    let (client, version) = target.app.for_version(parts.version);
    parts.version = version;
    strip_hop_by_hop(&mut parts.headers);
    if set_upstream_target(&mut parts, &authority, &authorized_path, &original_target).is_none() {
        let mut record = finish(record, 400, false, deciding);
        record.stage = Some(Stage::Request);
        record.reason = Some("bad request: the path cannot be forwarded as authorized".into());
        record_and_log(&shared, record, started);
        let flags = ResponseFlags::DownstreamProtocolError;
        return reply(flags, crate::http::bad_request(grpc), 0);
    }
    parts.headers.remove(XFCC);
    if let Some(xfcc) = &connection.xfcc {
        parts.headers.insert(XFCC, xfcc.clone());
    }
    if let Some(edits) = &decision.header_edits {
        apply_edits(&mut parts.headers, &edits.remove, &edits.set);
    }
    let downstream_headers = ext
        .map(|ext| ext.apply_upstream(&mut parts.headers))
        .unwrap_or_default();

    let received = Arc::new(AtomicU64::new(0));
    let body: Body = Counted::new(body, received.clone()).boxed();
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            apply_headers(&mut parts.headers, &downstream_headers);
            strip_hop_by_hop(&mut parts.headers);
            let record = finish(record, parts.status.as_u16(), true, deciding);
            let status = parts.status.as_u16();
            let grpc_status = grpc.then(|| crate::http::grpc_status_in(&parts.headers));
            // The labels are known now, unless a gRPC response's status is
            // still to come in its trailers.
            let handles = match grpc_status {
                Some(None) => Handles::AtEnd(shared.clone(), connection.clone(), view.host.clone()),
                known => Handles::Now((shared.metrics.istio).inbound_request(
                    &connection.requests,
                    peer,
                    &view.host,
                    protocol,
                    (status, known.flatten()),
                )),
            };
            let count = move |end: &BodyEnd, request_bytes| {
                let handles = match handles {
                    Handles::Now(handles) => handles,
                    Handles::AtEnd(shared, connection, host) => (shared.metrics.istio)
                        .inbound_request(
                            &connection.requests,
                            connection.info.peer.as_ref().map(|p| &*p.id),
                            &host,
                            protocol,
                            (status, end.grpc_status),
                        ),
                };
                handles.record(started.elapsed(), request_bytes, end.bytes);
            };
            let body = logged_response_body(
                body,
                record,
                received,
                started,
                shared.logs.access.clone(),
                count,
            );
            Ok(Response::from_parts(parts, body))
        }
        Err(e) => {
            shared.metrics.upstream_error(Direction::Inbound);
            let mut record = finish(record, 503, true, deciding);
            record.error = Some(e.to_string());
            record_and_log(&shared, record, started);
            let response = local_reply(
                503,
                "upstream connect error or disconnect/reset before headers",
                grpc,
            );
            let flags = ResponseFlags::UpstreamConnectionFailure;
            let request_bytes = received.load(std::sync::atomic::Ordering::Relaxed);
            reply(flags, response, request_bytes)
        }
    }
}

/// The engine's decision, the CUSTOM authorizer's answer if it was asked,
/// and the body to forward (the bytes it checked, then the rest).
pub(crate) struct Decided {
    pub(crate) decision: InboundDecision,
    pub(crate) ext: Option<ExtAuthzAnswer>,
    pub(crate) body: Body,
}

/// Why a request's body could not be held for its CUSTOM check.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyRefused {
    #[error(
        "the request body is longer than provider {0:?}'s includeRequestBodyInCheck.maxRequestBytes (and allowPartialMessage is false)"
    )]
    TooLarge(String),
    #[error("the request body failed before the CUSTOM check: {0}")]
    Failed(String),
}

impl BodyRefused {
    /// Logs the request as refused for this, and says what the client is
    /// answered: the body the CUSTOM provider was to see could not be
    /// held, too long (Envoy's 413, before failOpen is considered), or
    /// failed on the client's side (400).
    pub(crate) fn logged(
        &self,
        shared: &Shared,
        finish: impl FnOnce(crate::log::AccessRecord, u16, bool) -> crate::log::AccessRecord,
        record: crate::log::AccessRecord,
        started: Instant,
    ) -> (u16, &'static str) {
        let (status, message) = match self {
            BodyRefused::TooLarge(_) => (413, "Payload Too Large"),
            BodyRefused::Failed(_) => (400, "Bad Request"),
        };
        let mut record = finish(record, status, false);
        record.stage = Some(Stage::Authorization);
        record.reason = Some(self.to_string());
        record_and_log(shared, record, started);
        (status, message)
    }
}

/// Runs the engine: authentication, then CUSTOM (asked asynchronously,
/// with the body held first when the provider asks for it), then the rest
/// of authorization.
pub(crate) async fn decide(
    shared: &Shared,
    snapshot: &Snapshot,
    info: &ConnInfo,
    parts: &http::request::Parts,
    body: Incoming,
    view: &HttpRequest,
    time: SystemTime,
) -> Result<Decided, BodyRefused> {
    let policy = &snapshot.policy;
    let forward = |body: Incoming| -> Body { body.map_err(|e| Box::new(e) as BoxError).boxed() };
    let authenticated = match blocking_allowed(snapshot, || {
        policy.authenticate(&info.connection, Some(view))
    }) {
        Ok(a) => a,
        Err(denied) => {
            return Ok(Decided {
                decision: *denied,
                ext: None,
                body: forward(body),
            });
        }
    };
    let provider = {
        let attrs = authenticated.attributes(policy, &info.connection, Some(view));
        policy
            .authz
            .custom_check(&attrs)
            .map(|c| c.provider.clone())
    };
    let Some(provider) = provider else {
        let decision = authenticated.authorize(policy, &info.connection, Some(view), None);
        return Ok(Decided {
            decision,
            ext: None,
            body: forward(body),
        });
    };
    let (checked, body) = match provider.request_body() {
        Some(settings) => match hold(&parts.headers, body, settings).await {
            Held::Ready(checked, body) => (Some(checked), body),
            Held::TooLarge => return Err(BodyRefused::TooLarge(provider.name.clone())),
            Held::Failed(e) => return Err(BodyRefused::Failed(e)),
        },
        None => (None, forward(body)),
    };
    // The authorizer sees the request as the application would: the path
    // as authorized, no identity header the client set itself.
    let path = normalize::normalize(&view.path, policy.normalization);
    let query = &view.path[normalize::strip_query(&view.path).len()..];
    let mut headers = parts.headers.clone();
    headers.remove(XFCC);
    for name in policy.authn.output_headers() {
        headers.remove(name.as_str());
    }
    let target = format!("{path}{query}");
    let peers = info.peers(&shared.identity);
    let check = Check {
        peers: &peers,
        http: Some(HttpCheck {
            method: &parts.method,
            target: &target,
            authority: &view.host,
            scheme: if info.peer.is_some() { "https" } else { "http" },
            version: parts.version,
            headers: &headers,
            body: checked.as_ref(),
            time,
        }),
    };
    let ext = shared.ext_authz.check(&provider, check).await;
    let custom = Some(ext.verdict.0.clone());
    let decision = authenticated.authorize(policy, &info.connection, Some(view), custom);
    Ok(Decided {
        decision,
        ext: Some(ext),
        body,
    })
}

/// Request authentication may fetch a `jwksUri` (at most every 30 s, within
/// the rule's timeout): on a multi-threaded runtime that happens off the
/// scheduler, so other connections are not held up. Inline keys never fetch.
fn blocking_allowed<T>(snapshot: &Snapshot, f: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi && snapshot.fetches_jwks {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

pub(crate) fn describe_decision(
    record: &mut crate::log::AccessRecord,
    decision: &InboundDecision,
    policy: &WorkloadPolicy,
    info: &ConnInfo,
    view: &HttpRequest,
) {
    record.stage = Some(decision.stage);
    record.mtls_mode = Some(decision.mtls_mode.as_str());
    record.request_principal = decision
        .principal
        .as_ref()
        .map(|p| format!("{}/{}", p.issuer, p.subject));
    if let Some(rule) = decision.authz.as_ref().and_then(|a| a.deciding.as_ref()) {
        record.policy = Some(rule.policy.to_string());
        record.rule = rule.rule;
    }
    if !decision.allowed() {
        record.reason = Some(decision.reason(policy, &info.connection, Some(view)));
    }
}

pub(crate) fn audit(
    shared: &Shared,
    snapshot: &Snapshot,
    info: &ConnInfo,
    view: &HttpRequest,
    decision: &InboundDecision,
    record: &crate::log::AccessRecord,
) {
    let Some(authz) = &decision.authz else { return };
    if !shared.logs.audit.is_enabled() || (authz.audit.is_none() && authz.dry_run.is_empty()) {
        return;
    }
    let base = |kind, policy: String, rule, result: String| AuditRecord {
        time: record.time,
        kind,
        source_address: info.peer_addr,
        source_principal: info.peer.as_ref().map(|p| p.id.clone()),
        destination: record.destination.clone(),
        method: Some(view.method.clone()),
        path: record.path.clone(),
        policy,
        rule,
        result,
        decision: if decision.allowed() { "allow" } else { "deny" },
        config_version: snapshot.version,
    };
    if let Some(rule) = &authz.audit {
        shared.logs.audit.write(&base(
            "audit",
            rule.policy.to_string(),
            rule.rule,
            "audit".into(),
        ));
    }
    for dry in &authz.dry_run {
        let result = serde_json::to_value(dry.decision)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        shared
            .logs
            .audit
            .write(&base("dry_run", dry.policy.to_string(), dry.rule, result));
    }
}

pub(crate) fn record_and_log(
    shared: &Shared,
    mut record: crate::log::AccessRecord,
    started: Instant,
) {
    record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
    shared.logs.access.write(&record);
}

/// The client's answer to a denied request, as Envoy words it.
pub(crate) fn denial(
    decision: &InboundDecision,
    ext: Option<ExtAuthzAnswer>,
    grpc: bool,
) -> Response<Body> {
    let status = decision.status;
    match decision.stage {
        Stage::RequestAuthentication => {
            let message = decision
                .refusal
                .as_deref()
                .and_then(|r| r.strip_prefix("request authentication failed: "))
                .unwrap_or("Jwt verification fails");
            let mut response = local_reply(status, message, grpc);
            if let Some(v) = decision
                .www_authenticate
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                response
                    .headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, v);
            }
            response
        }
        Stage::Request => crate::http::bad_request(grpc),
        Stage::PeerAuthentication => local_reply(status, "RBAC: access denied", grpc),
        Stage::Authorization => match ext {
            // The authorizer's own denial: its status, body and headers.
            Some(ext) if matches!(ext.verdict.0, CustomVerdict::Deny(_)) => {
                let mut response = if grpc {
                    local_reply(status, "RBAC: access denied", true)
                } else {
                    let mut r = local_reply(status, "", false);
                    *r.body_mut() = crate::http::full(ext.body);
                    r.headers_mut().remove(http::header::CONTENT_TYPE);
                    r
                };
                apply_headers(response.headers_mut(), &ext.downstream_headers);
                response
            }
            _ => local_reply(status, "RBAC: access denied", grpc),
        },
    }
}
