//! `meshward demo-authz`: a small external authorizer for CUSTOM policies,
//! speaking Envoy's gRPC ext_authz API (`envoy.service.auth.v3.Authorization`)
//! as OPA's Envoy plugin and other authorizers do, so `envoyExtAuthzGrpc`
//! providers can be tried without installing one.
//!
//! It allows an HTTP request when its `x-ext-authz` header is `allow` and
//! the caller (the CheckRequest's `source.principal`, the peer's SPIFFE ID)
//! is one of `--allow-principal` (anyone when none is given); it then adds
//! `x-ext-authz-check-result: allowed` for the application and the client.
//! It denies everything else with 403, `x-ext-authz-check-result: denied`
//! and a body saying why. A TCP connection (no request in the check) is
//! allowed when its caller is. Each check is printed as one JSON line on
//! standard error (where `meshward up` keeps an application's log).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to serve gRPC (plaintext HTTP/2; in a mesh its proxy adds mutual TLS).
    #[arg(long)]
    listen: SocketAddr,
    /// A caller's SPIFFE ID to allow (repeatable); anyone when none is given.
    #[arg(long = "allow-principal", value_name = "SPIFFE_ID")]
    allow: Vec<String>,
}

/// The header a request must carry, with `allow`, to be allowed.
const ASK: &str = "x-ext-authz";
/// The header the answer adds, as Istio's sample ext-authz server does.
const RESULT: &str = "x-ext-authz-check-result";

struct Authorizer {
    allow: Vec<String>,
}

/// `OVERWRITE_IF_EXISTS_OR_ADD`.
const OVERWRITE: i32 = 2;

fn result_header(value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: RESULT.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: OVERWRITE,
        ..Default::default()
    }
}

impl Authorizer {
    /// The verdict on `check`: `Ok` to allow, `Err(why)` to deny.
    fn decide(&self, check: &CheckRequest) -> Result<(), String> {
        let attributes = check.attributes.as_ref();
        let principal = attributes
            .and_then(|a| a.source.as_ref())
            .map(|s| s.principal.as_str())
            .unwrap_or_default();
        if !self.allow.is_empty() && !self.allow.iter().any(|p| p == principal) {
            return Err(format!("caller {principal:?} is not allowed"));
        }
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        match http {
            None => Ok(()),
            Some(http) if http.headers.get(ASK).is_some_and(|v| v == "allow") => Ok(()),
            Some(_) => Err(format!("header {ASK}: allow is missing")),
        }
    }
}

#[tonic::async_trait]
impl Authorization for Authorizer {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let check = request.into_inner();
        let verdict = self.decide(&check);
        let attributes = check.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        eprintln!(
            "{}",
            serde_json::json!({
                "source": attributes.and_then(|a| a.source.as_ref()).map(|s| &s.principal),
                "destination": attributes.and_then(|a| a.destination.as_ref()).map(|s| &s.principal),
                "method": http.map(|h| &h.method),
                "path": http.map(|h| &h.path),
                "host": http.map(|h| &h.host),
                "verdict": if verdict.is_ok() { "allow" } else { "deny" },
                "reason": verdict.as_ref().err(),
            })
        );
        let response = match verdict {
            Ok(()) => CheckResponse {
                status: Some(Status::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![result_header("allowed")],
                    response_headers_to_add: vec![result_header("allowed")],
                    ..Default::default()
                })),
                dynamic_metadata: None,
            },
            Err(why) => CheckResponse {
                // PERMISSION_DENIED
                status: Some(Status {
                    code: 7,
                    message: why.clone(),
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 403 }),
                    headers: vec![result_header("denied")],
                    body: format!("denied by meshward demo-authz: {why}\n"),
                })),
                dynamic_metadata: None,
            },
        };
        Ok(tonic::Response::new(response))
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}", args.listen))?;
        eprintln!("demo-authz: grpc://{}", listener.local_addr()?);
        let service = AuthorizationServer::new(Authorizer { allow: args.allow });
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
            )
            .await
            .context("serving")?;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};

    fn check(principal: &str, header: Option<&str>, http: bool) -> CheckRequest {
        let headers = header
            .map(|v| [(ASK.to_owned(), v.to_owned())].into_iter().collect())
            .unwrap_or_default();
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(attribute_context::Peer {
                    principal: principal.into(),
                    ..Default::default()
                }),
                request: http.then(|| attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        headers,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decides_on_the_header_and_the_caller() {
        let sleep = "spiffe://cluster.local/ns/foo/sa/sleep";
        let a = Authorizer {
            allow: vec![sleep.into()],
        };
        assert!(a.decide(&check(sleep, Some("allow"), true)).is_ok());
        assert!(a.decide(&check(sleep, Some("deny"), true)).is_err());
        assert!(a.decide(&check(sleep, None, true)).is_err());
        assert!(
            a.decide(&check(
                "spiffe://cluster.local/ns/x/sa/y",
                Some("allow"),
                true
            ))
            .is_err()
        );
        assert!(
            a.decide(&check(sleep, None, false)).is_ok(),
            "TCP: the caller decides"
        );
        let anyone = Authorizer { allow: vec![] };
        assert!(anyone.decide(&check("", Some("allow"), true)).is_ok());
    }
}
