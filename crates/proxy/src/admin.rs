//! The admin port: readiness, the configuration in force, and metrics.
//!
//! - `/healthz/ready`: 200 once the workload has a certificate and every
//!   listener is up, 503 before.
//! - `/config_dump`: the workload, the policies in force and how they apply,
//!   the listeners, a summary of the certificate (never the key), and the
//!   names the DNS proxy answers.
//! - `/stats/prometheus`: the metrics.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshward_policy::resolve::Applicability;
use serde_json::json;
use tokio::net::TcpListener;

use crate::Shared;
use crate::http::{Body, full};

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = {
                let shared = shared.clone();
                hyper::service::service_fn(move |request| route(request, shared.clone()))
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn route(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    if request.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"));
    }
    Ok(match request.uri().path() {
        "/healthz/ready" => {
            if shared.identity.has_certificate() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for the workload certificate\n",
                )
            }
        }
        "/config_dump" => {
            let mut r = Response::new(full(config_dump(&shared)));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        "/stats/prometheus" | "/metrics" => {
            let snapshot = shared.policies.current();
            shared.metrics.config_version.set(snapshot.version as i64);
            let expiry = shared.identity.summary().map_or(0, |s| s.not_after_unix);
            shared.metrics.certificate_expiry.set(expiry);
            let mut r = Response::new(full(shared.metrics.encode()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz/ready, /config_dump, /stats/prometheus\n",
        ),
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

fn config_dump(shared: &Shared) -> String {
    let snapshot = shared.policies.current();
    let workload = &snapshot.policy.workload;
    let policies: Vec<serde_json::Value> = snapshot
        .set
        .policies()
        .iter()
        .filter_map(|p| match snapshot.set.applicability(p, workload) {
            Applicability::Applies(scope) => Some(json!({
                "kind": p.kind().as_str(),
                "namespace": p.metadata().namespace_or_default(),
                "name": p.metadata().name,
                "scope": scope,
                "policy": p,
            })),
            Applicability::DoesNotApply(_) => None,
        })
        .collect();
    let dump = json!({
        "workload": {
            "identity": shared.identity.id.to_string(),
            "namespace": workload.namespace,
            "labels": workload.labels,
        },
        "config": {
            "version": snapshot.version,
            "source": snapshot.source,
            "loaded_at": crate::log::timestamp(snapshot.loaded_at),
            "mesh": snapshot.set.mesh(),
        },
        "mtls": snapshot.policy.mtls,
        "policies": policies,
        "listeners": {
            "inbound": shared.listeners.inbound,
            "outbound": shared.listeners.outbound,
            "dns": shared.listeners.dns,
        },
        "certificate": shared.identity.summary(),
        "trust_domains": shared.identity.trust_domains.0,
        "revocations": shared.identity.revocations.current().entries(),
        // Transparent mode: each address the workload may call and the
        // service ports there.
        "routes": shared.routes.as_ref().map(|r| r.dump()),
        "dns": shared.dns.as_ref().map(|d| d.dump()),
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
