//! `meshward demo-authz`, the example authorizer of `examples/ext-authz/`,
//! as a process asked by a real gRPC client of Envoy's ext_authz API: it
//! allows the allowed caller with the header, and denies the rest with 403,
//! its header and its reason; TCP checks are decided by the caller; each
//! check is logged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};

const SLEEP: &str = "spiffe://cluster.local/ns/foo/sa/sleep";

fn check(principal: &str, header: Option<&str>, http: bool) -> CheckRequest {
    let headers = header
        .map(|v| {
            [("x-ext-authz".to_owned(), v.to_owned())]
                .into_iter()
                .collect()
        })
        .unwrap_or_default();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                principal: principal.into(),
                ..Default::default()
            }),
            request: http.then(|| attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/anything".into(),
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
fn demo_authz_decides_on_the_header_and_the_callers_spiffe_id() {
    let authz = spawn(
        "meshward demo-authz",
        meshward().args([
            "demo-authz",
            "--listen",
            "127.0.0.1:0",
            "--allow-principal",
            SLEEP,
        ]),
    );
    let stderr = authz.logs.wait_for_stderr("demo-authz: grpc://", START);
    let addr: SocketAddr = stderr
        .lines()
        .find_map(|l| l.strip_prefix("demo-authz: grpc://"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ask = |request: CheckRequest| -> CheckResponse {
        runtime.block_on(async {
            let mut client = AuthorizationClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            tokio::time::timeout(SETTLE, client.check(request))
                .await
                .unwrap()
                .unwrap()
                .into_inner()
        })
    };
    let allowed = ask(check(SLEEP, Some("allow"), true));
    assert_eq!(allowed.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = allowed.http_response else {
        panic!("an ok_response")
    };
    assert_eq!(ok.headers[0].header.as_ref().unwrap().value, "allowed");

    for (principal, header, why) in [
        (SLEEP, None, "header x-ext-authz: allow is missing"),
        (
            "spiffe://cluster.local/ns/foo/sa/other",
            Some("allow"),
            "caller \"spiffe://cluster.local/ns/foo/sa/other\" is not allowed",
        ),
    ] {
        let denied = ask(check(principal, header, true));
        assert_eq!(denied.status.unwrap().code, 7, "PERMISSION_DENIED");
        let Some(HttpResponse::DeniedResponse(d)) = denied.http_response else {
            panic!("a denied_response")
        };
        assert_eq!(d.status.unwrap().code, 403);
        assert!(d.body.contains(why), "{}", d.body);
        assert_eq!(d.headers[0].header.as_ref().unwrap().value, "denied");
    }
    // TCP: no request in the check; the caller decides.
    assert_eq!(ask(check(SLEEP, None, false)).status.unwrap().code, 0);
    assert_eq!(
        ask(check("spiffe://cluster.local/ns/x/sa/y", None, false))
            .status
            .unwrap()
            .code,
        7
    );
    // Every check is one JSON line on its standard error.
    let checks = || -> Vec<serde_json::Value> {
        authz
            .logs
            .stderr()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until(SETTLE, "a line per check", || checks().len() == 5);
    let lines = checks();
    assert_eq!(lines[0]["verdict"], "allow");
    assert_eq!(lines[0]["source"], SLEEP);
    assert_eq!(lines[0]["path"], "/anything");
    assert_eq!(lines[1]["verdict"], "deny");
}
